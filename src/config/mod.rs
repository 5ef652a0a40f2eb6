//! Configuration: the typed settings, their defaults, and how they are layered.
//!
//! Precedence, lowest first: built-in defaults < the TOML file (`--config` or
//! `DOCKERFLOW_CONFIG`) < `DOCKERFLOW_*` environment variables (`__` nests:
//! `DOCKERFLOW_UPSTREAM__URL`) < `PORT` (the listen port only).
//!
//! This is the only module that knows about TOML and environment variables.
//! Every value is validated while it is deserialized, so an error always
//! carries the key and the provider that set it (see [`error`]).

mod error;
mod errors;
mod heartbeat;
mod hooks;
mod mask;
mod reports;
mod types;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use errors::{
    EmailConfig, EmailTls, ErrorsConfig, IpNetwork, NotifyConfig, Pattern, StatusItem, StatusSet,
};
pub use heartbeat::{
    CheckConfig, CheckKind, CheckLevel, HeartbeatConfig, HeartbeatDetails, StatusSpec, Threshold,
};
pub use hooks::{DeliveryConfig, HookConfig, HookMethod};
pub use mask::{mask_url_password, masked_toml};
pub use reports::{ReportsConfig, StateConfig};
pub use types::{ByteSize, FailedStatus, HeaderNameValue, RequestPath, UpstreamUrl};

/// The prefix of every environment variable that sets a key.
pub const ENV_PREFIX: &str = "DOCKERFLOW_";
/// The environment variable that names the TOML file (not a key itself).
pub const CONFIG_ENV: &str = "DOCKERFLOW_CONFIG";

/// Most bytes read from a file the configuration comes from or names (the
/// TOML file, a mounted secret, a URL, a CA bundle): a path such as
/// `/dev/zero` is refused instead of read until memory runs out.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The contents of a file the configuration names, at most [`MAX_FILE_BYTES`].
pub(crate) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB: expected a small file such as a mounted secret",
        ));
    }
    Ok(bytes)
}

/// [`read_file`] as UTF-8 text.
pub(crate) fn read_text_file(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_file(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// Everything the sidecar can be told. Defaults live in the `Default` impls
/// below and nowhere else; `config/dockerflow-sidecar.toml` repeats them and
/// a test keeps the two in agreement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the public listener binds (`PORT` replaces its port).
    pub listen: SocketAddr,
    /// The app the sidecar sits in front of.
    pub upstream: UpstreamConfig,
    /// Client-facing connection settings.
    pub server: ServerConfig,
    /// Where `/__version__` reads the app's version.json.
    pub version: VersionConfig,
    /// The mozlog output.
    pub logging: LoggingConfig,
    /// `/__heartbeat__`.
    pub heartbeat: HeartbeatConfig,
    /// SIGTERM handling.
    pub shutdown: ShutdownConfig,
    /// Browser security report intake.
    pub reports: ReportsConfig,
    /// Outgoing webhooks.
    pub hooks: Vec<HookConfig>,
    /// How the hook outbox delivers.
    pub delivery: DeliveryConfig,
    /// The local state file.
    pub state: StateConfig,
    /// Which app responses become `upstream.error` and `broken_link`
    /// events, and what is scrubbed.
    pub errors: ErrorsConfig,
    /// Mail to admins and managers.
    pub notify: NotifyConfig,
    /// The admin listener: metrics, readiness, drain.
    pub admin: AdminConfig,
    /// TLS on the public listener.
    pub tls: TlsConfig,
}

/// TLS termination on the public listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; empty: plain HTTP.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for a new certificate (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// True when the listener terminates TLS.
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

/// The admin listener (never proxied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin routes at all.
    pub enabled: bool,
    /// Where: `/metrics`, `/__heartbeat__` (full), `/ready`, `POST /drain`.
    pub listen: SocketAddr,
    /// A bearer token every admin request must carry; empty: none.
    pub token: String,
    /// A file holding the token (a mounted Kubernetes secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 9102)),
            token: String::new(),
            token_file: None,
        }
    }
}

impl AdminConfig {
    /// The token, from `token` or `token_file`; `None` when neither is set.
    pub fn token(&self) -> Result<Option<String>, String> {
        match &self.token_file {
            Some(path) => {
                let token = read_text_file(path).map_err(|e| {
                    format!("admin.token_file: cannot read `{}`: {e}", path.display())
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(format!("admin.token_file: `{}` is empty", path.display()));
                }
                Ok(Some(token.to_owned()))
            }
            None if self.token.is_empty() => Ok(None),
            None => Ok(Some(self.token.clone())),
        }
    }
}

/// Where and how requests are forwarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `http://host:port` or `unix:/path/to.sock`.
    pub url: UpstreamUrl,
    /// Longest wait for a new upstream connection to open (then 502). An
    /// app whose accept queue is full drops the SYN, and the kernel sends it
    /// again 1 s later, then 3 s: the default waits for two of those.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait from sending a request to receiving the response head (then 504).
    #[serde(with = "humantime_serde")]
    pub response_header_timeout: Duration,
    /// How long an idle pooled connection is kept. Keep it below the app's own
    /// keep-alive timeout (gunicorn: 2 s, Node: 5 s) so the app never closes a
    /// connection the pool is about to reuse.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept in the pool, all workers together (each
    /// worker keeps its share, rounded up).
    pub pool_max_idle: usize,
    /// For an `https://` upstream: a PEM file of CA certificates to trust
    /// besides the platform's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Client-facing connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long an HTTP/1 client connection may sit between requests, and the
    /// longest a client may take to send request headers; then it is closed.
    /// Also the longest pause in the middle of a request body; then 408.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Worker threads, each with a runtime, connections and upstream pool
    /// of its own; 0 means one per CPU the process may use (cgroup quotas
    /// included).
    pub worker_threads: usize,
}

/// The app's version.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VersionConfig {
    /// Candidate paths; the first that exists is served.
    pub files: Vec<PathBuf>,
}

/// The log lines on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `mozlog` (JSON, one object per line) or `text` (for local development).
    pub format: LogFormat,
    /// The mozlog `Logger` field.
    #[serde(deserialize_with = "types::string_or_scalar")]
    pub logger: String,
    /// Least severe level of the sidecar's own messages: error, warn, info, debug.
    pub level: LogLevel,
    /// Add the percent-decoded query string to request.summary lines.
    pub querystring: bool,
    /// Header carrying the request id to the app and back.
    pub request_id_header: HeaderNameValue,
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// mozlog JSON.
    Mozlog,
    /// One human-readable line per message.
    Text,
}

/// Levels for the sidecar's own messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default.
    Info,
    /// Everything.
    Debug,
}

/// SIGTERM / SIGINT handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After the signal: health routes answer 503 but traffic is still served
    /// this long, so load balancers take the pod out first.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// After the drain: the listener is closed and in-flight requests and
    /// tunnels get this long to finish.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            upstream: UpstreamConfig::default(),
            server: ServerConfig::default(),
            version: VersionConfig::default(),
            logging: LoggingConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            shutdown: ShutdownConfig::default(),
            reports: ReportsConfig::default(),
            hooks: Vec::new(),
            delivery: DeliveryConfig::default(),
            state: StateConfig::default(),
            errors: ErrorsConfig::default(),
            notify: NotifyConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: UpstreamUrl::default(),
            connect_timeout: Duration::from_secs(5),
            response_header_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle: 256,
            ca_file: None,
        }
    }
}

impl ServerConfig {
    /// How many workers serve: `worker_threads`, or when it is 0 as many as
    /// CPUs the process may use. The standard library counts the CPU
    /// affinity mask and the container's cgroup quota (v1
    /// `cpu.cfs_quota_us`, v2 `cpu.max`, rounded down, at least 1), so a pod
    /// limited to 1 CPU (or 500m) gets one worker, not one per host core.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Duration::from_secs(60),
            worker_threads: 0,
        }
    }
}

impl Default for VersionConfig {
    fn default() -> Self {
        VersionConfig {
            files: vec![
                PathBuf::from("/app/version.json"),
                PathBuf::from("./version.json"),
            ],
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Mozlog,
            logger: "dockerflow-sidecar".to_owned(),
            level: LogLevel::Info,
            querystring: false,
            request_id_header: HeaderNameValue::default(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain: Duration::from_secs(5),
            grace: Duration::from_secs(20),
        }
    }
}

/// What the command line adds on top of the layered configuration.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config PATH` (wins over `DOCKERFLOW_CONFIG`).
    pub config_file: Option<PathBuf>,
    /// `--upstream URL` (wins over every other source).
    pub upstream: Option<String>,
}

/// The TOML file, read once: figment parses this text and errors find their
/// lines in it, so a file changed during a load cannot give mixed answers.
struct TomlFile<'a> {
    /// Where the text came from (what errors name).
    path: &'a Path,
    /// The file's contents.
    text: &'a str,
}

impl Provider for TomlFile<'_> {
    /// The same metadata as `Toml::file_exact`: values are "from" the file.
    fn metadata(&self) -> Metadata {
        Toml::file_exact(self.path).metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(self.text).data()
    }
}

impl Config {
    /// Loads the configuration from the process environment, the TOML file and
    /// the command-line `overrides`.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        match Config::file_from(overrides) {
            Some(path) => {
                let text = read_text_file(&path).map_err(|e| ConfigError::unreadable(&path, &e))?;
                Config::layered(
                    Some(&TomlFile {
                        path: &path,
                        text: &text,
                    }),
                    overrides.upstream.as_deref(),
                )
            }
            None => Config::layered(None, overrides.upstream.as_deref()),
        }
    }

    /// Loads `text` as if it were the TOML file at `path` (which is not
    /// read): the same layering under `DOCKERFLOW_*` and `PORT`, the same
    /// validation and the same errors as [`Config::load`].
    pub fn load_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::layered(Some(&TomlFile { path, text }), None)
    }

    /// Defaults < `file` < `DOCKERFLOW_*` < `upstream` < `PORT`, then every
    /// rule that spans keys.
    fn layered(file: Option<&TomlFile>, upstream: Option<&str>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            // Parsed once ourselves first: a syntax error is reported with
            // the path and the line before figment sees it.
            if let Err(e) = toml_edit::ImDocument::parse(file.text) {
                return Err(ConfigError::syntax(file.path, &e));
            }
            figment = figment.merge(file);
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).ignore(&["CONFIG"]).split("__"));
        if let Some(url) = upstream {
            figment = figment.merge(Serialized::default("upstream.url", url));
        }

        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(e, file))?;

        let problems = config.heartbeat.validate();
        if !problems.is_empty() {
            let names: Vec<String> = config
                .heartbeat
                .checks
                .iter()
                .map(|c| c.name.clone())
                .collect();
            return Err(ConfigError::from_items(
                "heartbeat.checks",
                "check",
                "heartbeat",
                &names,
                problems,
                file,
            ));
        }
        let problems = hooks::validate(&mut config.hooks, &config.delivery, &config.logging.logger);
        if !problems.is_empty() {
            let names: Vec<String> = config.hooks.iter().map(|h| h.name.clone()).collect();
            return Err(ConfigError::from_items(
                "hooks", "hook", "delivery", &names, problems, file,
            ));
        }

        let tls = &config.tls;
        let tls_problem = match (
            tls.cert.as_os_str().is_empty(),
            tls.key.as_os_str().is_empty(),
        ) {
            (false, true) => Some((
                "key",
                "is empty but `tls.cert` is set: both are needed".to_owned(),
            )),
            (true, false) => Some((
                "cert",
                "is empty but `tls.key` is set: both are needed".to_owned(),
            )),
            _ if tls.reload_interval.is_zero() => Some((
                "reload_interval",
                "0s is not valid: expected an interval such as \"10s\"".to_owned(),
            )),
            _ => None,
        };
        if let Some((key, reason)) = tls_problem {
            return Err(ConfigError::from_items(
                "tls",
                "",
                "tls",
                &[],
                vec![error::ItemProblem {
                    index: usize::MAX,
                    key,
                    reason,
                }],
                file,
            ));
        }
        if let Err(reason) = config.admin.token() {
            return Err(ConfigError::from_items(
                "admin",
                "",
                "admin",
                &[],
                vec![error::ItemProblem {
                    index: usize::MAX,
                    key: "token_file",
                    reason,
                }],
                file,
            ));
        }
        for (table, problems) in [
            ("errors", errors::validate_errors(&config.errors)),
            ("notify.email", errors::validate_email(&config.notify.email)),
        ] {
            if !problems.is_empty() {
                return Err(ConfigError::from_items(
                    table,
                    "",
                    table,
                    &[],
                    problems,
                    file,
                ));
            }
        }

        if let Ok(port) = std::env::var("PORT") {
            let parsed = port
                .trim()
                .parse::<u16>()
                .map_err(|_| ConfigError::Port(port.clone()))?;
            config.listen.set_port(parsed);
        }
        Ok(config)
    }

    /// The TOML file named by `--config` or, failing that, `DOCKERFLOW_CONFIG`.
    pub fn file_from(overrides: &Overrides) -> Option<PathBuf> {
        overrides.config_file.clone().or_else(|| {
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_text_loads_like_the_file_it_names() {
        let path = Path::new("/etc/sidecar.toml");
        let config = Config::load_toml(path, "[upstream]\nurl = \"unix:/run/app.sock\"\n").unwrap();
        assert_eq!(config.upstream.url.to_string(), "unix:/run/app.sock");

        let err = Config::load_toml(path, "[upstream]\n\nconnect_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`upstream.connect_timeout`") && err.contains("/etc/sidecar.toml, line 3"),
            "{err}"
        );
        let err = Config::load_toml(path, "[upstream\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/sidecar.toml, line 1: not valid TOML"),
            "{err}"
        );
        let err = Config::load_toml(
            path,
            "[[hooks]]\nname = \"a\"\nevents = []\nurl = \"http://x/\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`hooks[0].events` (hook `a`, from /etc/sidecar.toml, line 3)"),
            "{err}"
        );
    }
}
