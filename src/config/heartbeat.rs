//! `[heartbeat]` and `[[heartbeat.checks]]`: what `/__heartbeat__` checks and
//! how it answers. Per-kind rules (which keys a kind needs or accepts) are
//! checked after deserialization by [`HeartbeatConfig::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ItemProblem;
use super::types::{FailedStatus, RequestPath};

/// `/__heartbeat__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Status sent when the worst check level is error (40) or above.
    pub failed_status: FailedStatus,
    /// `status` (only `{"status": …}`, Django's production behaviour) or
    /// `full` (`status`, `checks` and `details`).
    pub details: HeartbeatDetails,
    /// Default time limit of a check (a check's own `timeout` wins).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a round of checks answers every poll; concurrent polls
    /// share one round whatever the value.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Message ids to ignore (Django's SILENCED_SYSTEM_CHECKS).
    pub silenced: Vec<String>,
    /// The checks, run concurrently.
    pub checks: Vec<CheckConfig>,
}

/// How much of the heartbeat result is shown to callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeartbeatDetails {
    /// Only the overall status.
    Status,
    /// Status, checks and details.
    Full,
}

/// One `[[heartbeat.checks]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// The key in the heartbeat's `checks`.
    pub name: String,
    /// What is checked.
    pub kind: CheckKind,
    /// `http(s)://…`, `tcp://host:port`, `postgres://…` or `redis://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the URL (a mounted secret); read at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// `upstream`: the request path (default "/"). `disk`, `file`: the
    /// filesystem path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Level reported when the check fails.
    #[serde(default)]
    pub level: CheckLevel,
    /// Time limit of this check (default `heartbeat.timeout`).
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// `upstream`, `http`: statuses that pass, as codes or "200-399" ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<Vec<StatusSpec>>,
    /// `upstream`, `http`: read the target's own Dockerflow heartbeat body
    /// and merge its checks into ours.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    /// `http`, `postgres`: a PEM file of CA certificates to trust besides
    /// the platform's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `postgres`: the query that must succeed (default `SELECT 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `postgres`: a query whose rows mean "migrations pending" (a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations_query: Option<String>,
    /// `disk`: least free space, "500 MiB" or "10%".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free: Option<Threshold>,
    /// `file`: the file must have been modified this recently.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
}

/// The kinds of check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// An HTTP GET to the configured upstream.
    Upstream,
    /// An HTTP(S) GET to any URL.
    Http,
    /// A TCP connection opens.
    Tcp,
    /// A PostgreSQL query runs.
    Postgres,
    /// Redis answers PING.
    Redis,
    /// Free disk space.
    Disk,
    /// A file exists (and is fresh).
    File,
}

/// The level a failing check reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckLevel {
    /// 30: reported, the heartbeat still answers 200.
    Warning,
    /// 40: the heartbeat fails.
    #[default]
    Error,
    /// 50: the heartbeat fails.
    Critical,
}

/// An expected HTTP status: a code, or an inclusive "low-high" range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StatusSpecRepr", into = "StatusSpecRepr")]
pub struct StatusSpec {
    /// Lowest passing code.
    pub low: u16,
    /// Highest passing code.
    pub high: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StatusSpecRepr {
    Code(u16),
    Range(String),
}

impl TryFrom<StatusSpecRepr> for StatusSpec {
    type Error = String;

    fn try_from(value: StatusSpecRepr) -> Result<Self, Self::Error> {
        let valid = "expected a status code such as 204 or a range such as \"200-399\"";
        let (low, high) = match value {
            StatusSpecRepr::Code(code) => (code, code),
            StatusSpecRepr::Range(text) => {
                let parse = |s: &str| {
                    s.trim()
                        .parse::<u16>()
                        .map_err(|_| format!("`{text}` is not valid: {valid}"))
                };
                match text.split_once('-') {
                    Some((low, high)) => (parse(low)?, parse(high)?),
                    None => {
                        let code = parse(&text)?;
                        (code, code)
                    }
                }
            }
        };
        if !(100..=599).contains(&low) || !(100..=599).contains(&high) || low > high {
            return Err(format!(
                "{low}-{high} is not valid: {valid}, within 100-599"
            ));
        }
        Ok(StatusSpec { low, high })
    }
}

impl From<StatusSpec> for StatusSpecRepr {
    fn from(value: StatusSpec) -> Self {
        if value.low == value.high {
            StatusSpecRepr::Code(value.low)
        } else {
            StatusSpecRepr::Range(format!("{}-{}", value.low, value.high))
        }
    }
}

/// A free-space threshold: bytes or a percentage of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Threshold {
    /// At least this many bytes free.
    Bytes(u64),
    /// At least this percentage free.
    Percent(f64),
}

impl TryFrom<String> for Threshold {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid =
            "expected a size such as \"500 MiB\" or \"2GB\", or a percentage such as \"10%\"";
        if let Some(percent) = value.trim().strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(Threshold::Percent(p)),
                _ => Err(format!("`{value}` is not valid: {valid}")),
            };
        }
        value
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|size| Threshold::Bytes(size.as_u64()))
            .map_err(|_| format!("`{value}` is not valid: {valid}"))
    }
}

impl From<Threshold> for String {
    fn from(value: Threshold) -> Self {
        match value {
            Threshold::Bytes(bytes) => bytesize::ByteSize(bytes).display().iec().to_string(),
            Threshold::Percent(p) => format!("{p}%"),
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            failed_status: FailedStatus::default(),
            details: HeartbeatDetails::Status,
            timeout: Duration::from_secs(3),
            cache_ttl: Duration::from_secs(1),
            silenced: Vec::new(),
            checks: vec![CheckConfig::upstream()],
        }
    }
}

impl CheckConfig {
    /// The default check: the app answers `GET /` with 200–399.
    pub fn upstream() -> CheckConfig {
        CheckConfig {
            name: "upstream".into(),
            kind: CheckKind::Upstream,
            url: None,
            url_file: None,
            path: Some("/".into()),
            level: CheckLevel::Error,
            timeout: None,
            expected_status: None,
            merge: false,
            ca_file: None,
            query: None,
            migrations_query: None,
            min_free: None,
            max_age: None,
        }
    }

    /// The request path of an `upstream` check.
    pub fn request_path(&self) -> RequestPath {
        self.path
            .clone()
            .and_then(|p| RequestPath::try_from(p).ok())
            .unwrap_or_else(|| RequestPath(http::uri::PathAndQuery::from_static("/")))
    }

    /// True when `status` passes (default 200–399).
    pub fn expects(&self, status: u16) -> bool {
        match &self.expected_status {
            Some(specs) => specs.iter().any(|s| (s.low..=s.high).contains(&status)),
            None => (200..=399).contains(&status),
        }
    }
}

impl HeartbeatConfig {
    /// Checks the per-kind rules and reads `url_file`s into `url`.
    pub(super) fn validate(&mut self) -> Vec<ItemProblem> {
        let mut problems = Vec::new();
        if self.timeout == Duration::ZERO {
            problems.push(ItemProblem {
                index: usize::MAX,
                key: "timeout",
                reason: "heartbeat.timeout must be longer than 0s".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for (index, check) in self.checks.iter_mut().enumerate() {
            let mut problem = |key: &'static str, reason: String| {
                problems.push(ItemProblem { index, key, reason })
            };
            if check.name.trim().is_empty() {
                problem("name", "a check needs a non-empty name".into());
            } else if !seen.insert(check.name.clone()) {
                problem(
                    "name",
                    format!(
                        "`{}` is used by two checks; names must be unique",
                        check.name
                    ),
                );
            }
            if let Some(file) = &check.url_file {
                match super::read_text_file(file) {
                    Ok(text) if check.url.is_none() => check.url = Some(text.trim().to_owned()),
                    Ok(_) => problem("url_file", "give `url` or `url_file`, not both".into()),
                    Err(e) => problem("url_file", format!("cannot read {}: {e}", file.display())),
                }
            }
            let kind = check.kind;
            let schemes: &[&str] = match kind {
                CheckKind::Http => &["http", "https"],
                CheckKind::Tcp => &["tcp"],
                CheckKind::Postgres => &["postgres", "postgresql"],
                CheckKind::Redis => &["redis"],
                CheckKind::Upstream | CheckKind::Disk | CheckKind::File => &[],
            };
            match (&check.url, schemes.is_empty()) {
                (None, false) => problem(
                    "url",
                    format!("a `{}` check needs `url` (or `url_file`): {}", kind_name(kind), scheme_list(schemes)),
                ),
                (Some(url), false) => {
                    let scheme = url.split_once("://").map(|(s, _)| s);
                    if !scheme.is_some_and(|s| schemes.contains(&s)) {
                        problem("url", format!("`{}` is not valid: expected {}", super::mask::mask_url_password(url), scheme_list(schemes)));
                    } else if kind == CheckKind::Tcp
                        && url
                            .trim_start_matches("tcp://")
                            .rsplit_once(':')
                            .is_none_or(|(host, p)| host.is_empty() || p.parse::<u16>().is_err())
                    {
                        problem("url", format!("`{}` is not valid: expected tcp://host:port", super::mask::mask_url_password(url)));
                    } else if kind == CheckKind::Http && url.parse::<http::Uri>().is_err() {
                        problem("url", format!("`{}` is not a valid URL", super::mask::mask_url_password(url)));
                    }
                }
                (Some(_), true) if kind == CheckKind::Upstream => problem(
                    "url",
                    "an `upstream` check always asks upstream.url; set `path`, or use kind = \"http\" for another URL".into(),
                ),
                (Some(_), true) => problem("url", format!("a `{}` check takes `path`, not `url`", kind_name(kind))),
                (None, true) => {}
            }
            match kind {
                CheckKind::Upstream => {
                    if let Some(path) = &check.path {
                        if let Err(e) = RequestPath::try_from(path.clone()) {
                            problem("path", e);
                        }
                    }
                }
                CheckKind::Disk | CheckKind::File if check.path.is_none() => {
                    problem(
                        "path",
                        format!(
                            "a `{}` check needs `path`, the filesystem path to look at",
                            kind_name(kind)
                        ),
                    );
                }
                CheckKind::Disk if check.min_free.is_none() => {
                    problem(
                        "min_free",
                        "a `disk` check needs `min_free`, such as \"1 GiB\" or \"10%\"".into(),
                    );
                }
                CheckKind::Http | CheckKind::Tcp | CheckKind::Postgres | CheckKind::Redis
                    if check.path.is_some() =>
                {
                    problem(
                        "path",
                        format!("a `{}` check takes `url`, not `path`", kind_name(kind)),
                    );
                }
                _ => {}
            }
            if check.timeout == Some(Duration::ZERO) {
                problem("timeout", "a check's timeout must be longer than 0s".into());
            }
            if let Some(ca_file) = &check.ca_file {
                if let Err(e) = std::fs::File::open(ca_file) {
                    problem("ca_file", format!("cannot read {}: {e}", ca_file.display()));
                }
            }
            let only = |key: &'static str, set: bool, kinds: &[CheckKind]| {
                (set && !kinds.contains(&kind)).then_some(key)
            };
            let misplaced = [
                only(
                    "expected_status",
                    check.expected_status.is_some(),
                    &[CheckKind::Upstream, CheckKind::Http],
                ),
                only(
                    "merge",
                    check.merge,
                    &[CheckKind::Upstream, CheckKind::Http],
                ),
                only(
                    "ca_file",
                    check.ca_file.is_some(),
                    &[CheckKind::Http, CheckKind::Postgres],
                ),
                only("query", check.query.is_some(), &[CheckKind::Postgres]),
                only(
                    "migrations_query",
                    check.migrations_query.is_some(),
                    &[CheckKind::Postgres],
                ),
                only("min_free", check.min_free.is_some(), &[CheckKind::Disk]),
                only("max_age", check.max_age.is_some(), &[CheckKind::File]),
            ];
            for key in misplaced.into_iter().flatten() {
                problem(
                    key,
                    format!("`{key}` does not apply to a `{}` check", kind_name(kind)),
                );
            }
        }
        problems
    }
}

fn kind_name(kind: CheckKind) -> &'static str {
    match kind {
        CheckKind::Upstream => "upstream",
        CheckKind::Http => "http",
        CheckKind::Tcp => "tcp",
        CheckKind::Postgres => "postgres",
        CheckKind::Redis => "redis",
        CheckKind::Disk => "disk",
        CheckKind::File => "file",
    }
}

fn scheme_list(schemes: &[&str]) -> String {
    let list: Vec<String> = schemes.iter().map(|s| format!("`{s}://…`")).collect();
    format!("a URL starting with {}", list.join(" or "))
}
