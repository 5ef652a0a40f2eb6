//! `[errors]` (which responses become `upstream.error` and `broken_link`
//! events, and what is scrubbed) and `[notify.email]` (mail to admins and
//! managers, like Django's `ADMINS` / `MANAGERS`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ItemProblem;

/// `[errors]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// App statuses that make an `upstream.error` event: codes and ranges,
    /// such as `[500, "502-504"]`. The proxy's own 502 and 504 always do.
    pub server_error_statuses: StatusSet,
    /// How many bytes of the app's error response body the event carries
    /// (scrubbed); 0 for none. At most 65536.
    pub response_body_bytes: usize,
    /// Regexes searched in the path and query of a 404; a match is not a
    /// broken link (Django's `IGNORABLE_404_URLS`).
    pub ignorable_404_urls: Vec<Pattern>,
    /// Regexes searched in the User-Agent of a 404; a match is not a broken
    /// link (crawlers follow stale links all day).
    pub ignorable_user_agents: Vec<Pattern>,
    /// Report only broken links whose Referer is this site.
    pub internal_only: bool,
    /// Client addresses or networks (`10.0.0.0/8`) that mail subjects call
    /// `INTERNAL IP` (Django's `INTERNAL_IPS`).
    pub internal_ips: Vec<IpNetwork>,
    /// Regexes (case-insensitive) for more names whose values are scrubbed,
    /// added to Django's `API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|COOKIE`.
    pub sensitive_names: Vec<Pattern>,
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            server_error_statuses: StatusSet(vec![(500, 599)]),
            response_body_bytes: 0,
            ignorable_404_urls: Vec::new(),
            ignorable_user_agents: vec![Pattern(r"(?i)(bot|crawler|spider|slurp)\b".to_owned())],
            internal_only: false,
            internal_ips: Vec::new(),
            sensitive_names: Vec::new(),
        }
    }
}

impl ErrorsConfig {
    /// The patterns of `sensitive_names`, for the scrubber.
    pub fn sensitive_patterns(&self) -> Vec<String> {
        self.sensitive_names.iter().map(|p| p.0.clone()).collect()
    }
}

/// `[notify]`: where notifications go besides hooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Mail to admins (server errors) and managers (broken links).
    pub email: EmailConfig,
}

/// `[notify.email]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// SMTP server; empty sends no mail.
    pub host: String,
    /// SMTP port (587 for STARTTLS submission, 465 for TLS, 25 for relays).
    pub port: u16,
    /// `none`, `starttls` (required, not opportunistic) or `tls` (implicit).
    pub tls: EmailTls,
    /// A PEM file of extra CA certificates to trust, besides the platform's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// SMTP user; empty sends no AUTH.
    pub username: String,
    /// SMTP password.
    pub password: String,
    /// A file holding the password (a mounted Kubernetes secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The sender (Django's `SERVER_EMAIL`).
    pub from: String,
    /// Who gets server errors (`upstream.error`).
    pub admins: Vec<String>,
    /// Who gets broken links (`broken_link`).
    pub managers: Vec<String>,
    /// Starts every subject (Django's `EMAIL_SUBJECT_PREFIX`).
    pub subject_prefix: String,
    /// At most one message per (kind, status, path) per window; the next one
    /// says how many were suppressed.
    #[serde(with = "humantime_serde")]
    pub rate_limit_window: Duration,
    /// At most this many messages in all per window, whatever the paths (a
    /// crawler hitting thousands of dead links sends a bounded amount of mail).
    pub max_per_window: u32,
    /// Longest one delivery may take (connect, TLS, send).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            host: String::new(),
            port: 587,
            tls: EmailTls::Starttls,
            ca_file: None,
            username: String::new(),
            password: String::new(),
            password_file: None,
            from: "dockerflow-sidecar@localhost".to_owned(),
            admins: Vec::new(),
            managers: Vec::new(),
            subject_prefix: "[dockerflow-sidecar] ".to_owned(),
            rate_limit_window: Duration::from_secs(600),
            max_per_window: 100,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How the SMTP connection is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTls {
    /// Plain text (a relay on localhost).
    None,
    /// STARTTLS, required: a server without it is an error.
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl EmailConfig {
    /// True when mail is configured.
    pub fn enabled(&self) -> bool {
        !self.host.is_empty()
    }

    /// The password, from `password` or `password_file`.
    pub fn password(&self) -> Result<String, String> {
        match &self.password_file {
            Some(path) => super::read_text_file(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| format!("cannot read `{}`: {e}", path.display())),
            None => Ok(self.password.clone()),
        }
    }
}

/// A problem with a key of the table itself (an index past any list).
fn table_problem(key: &'static str, reason: String) -> ItemProblem {
    ItemProblem {
        index: usize::MAX,
        key,
        reason,
    }
}

/// Rules of `[errors]` that one value's type cannot check.
pub(super) fn validate_errors(errors: &ErrorsConfig) -> Vec<ItemProblem> {
    let mut problems = Vec::new();
    if errors.response_body_bytes > 65_536 {
        problems.push(table_problem(
            "response_body_bytes",
            format!(
                "{} is too large: expected at most 65536 (this is a preview, not a copy)",
                errors.response_body_bytes
            ),
        ));
    }
    problems
}

/// Rules across keys of `[notify.email]`.
pub(super) fn validate_email(email: &EmailConfig) -> Vec<ItemProblem> {
    let mut problems = Vec::new();
    let mut problem = |key: &'static str, reason: String| problems.push(table_problem(key, reason));
    if !email.enabled() {
        return problems;
    }
    if email.port == 0 {
        problem(
            "port",
            "0 is not valid: expected a port from 1 to 65535".into(),
        );
    }
    if let Err(e) = email.from.parse::<lettre::message::Mailbox>() {
        problem(
            "from",
            format!("`{}` is not a mail address ({e})", email.from),
        );
    }
    for (key, list) in [("admins", &email.admins), ("managers", &email.managers)] {
        for address in list {
            if let Err(e) = address.parse::<lettre::message::Mailbox>() {
                problem(key, format!("`{address}` is not a mail address ({e})"));
            }
        }
    }
    if email.admins.is_empty() && email.managers.is_empty() {
        problem(
            "host",
            "is set but `admins` and `managers` are both empty: nobody would get mail".into(),
        );
    }
    if !email.password.is_empty() && email.password_file.is_some() {
        problem(
            "password_file",
            "is set together with `password`: set one of them".into(),
        );
    }
    if email.password_file.is_some() {
        if let Err(e) = email.password() {
            problem("password_file", e);
        }
    }
    let has_password = !email.password.is_empty() || email.password_file.is_some();
    if has_password && email.username.is_empty() {
        problem(
            "username",
            "is empty but a password is set: SMTP AUTH needs both".into(),
        );
    }
    if let Some(path) = &email.ca_file {
        if let Err(e) = super::read_file(path) {
            problem("ca_file", format!("cannot read `{}`: {e}", path.display()));
        }
    }
    if email.rate_limit_window.is_zero() {
        problem(
            "rate_limit_window",
            "0s is not valid: expected a window such as \"10m\"".into(),
        );
    }
    problems
}

/// A set of statuses written as codes and ranges: `[500, "502-504"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<StatusItem>", into = "Vec<StatusItem>")]
pub struct StatusSet(pub Vec<(u16, u16)>);

/// One entry of a [`StatusSet`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusItem {
    /// `500`.
    Code(u16),
    /// `"500"` or `"500-599"`.
    Text(String),
}

impl StatusSet {
    /// True when `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

impl TryFrom<Vec<StatusItem>> for StatusSet {
    type Error = String;

    fn try_from(items: Vec<StatusItem>) -> Result<Self, Self::Error> {
        const VALID: &str =
            "expected HTTP statuses from 100 to 599, as codes or ranges such as \"500-599\"";
        let status = |text: &str| {
            text.trim()
                .parse::<u16>()
                .ok()
                .filter(|s| (100..=599).contains(s))
        };
        items
            .into_iter()
            .map(|item| {
                let (lo, hi) = match &item {
                    StatusItem::Code(code) => (Some(*code), Some(*code)),
                    StatusItem::Text(text) => match text.split_once('-') {
                        Some((lo, hi)) => (status(lo), status(hi)),
                        None => (status(text), status(text)),
                    },
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if (100..=599).contains(&lo) && lo <= hi && hi <= 599 => {
                        Ok((lo, hi))
                    }
                    _ => Err(format!(
                        "`{}` is not valid: {VALID}",
                        match item {
                            StatusItem::Code(c) => c.to_string(),
                            StatusItem::Text(t) => t,
                        }
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(StatusSet)
    }
}

impl From<StatusSet> for Vec<StatusItem> {
    fn from(set: StatusSet) -> Self {
        set.0
            .into_iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    StatusItem::Code(lo)
                } else {
                    StatusItem::Text(format!("{lo}-{hi}"))
                }
            })
            .collect()
    }
}

/// A regular expression, checked to compile (the `regex` crate's syntax).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(pub String);

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        regex::Regex::new(&value)
            .map(|_| Pattern(value.clone()))
            .map_err(|e| {
                let e = e.to_string();
                let last = e.lines().last().unwrap_or_default().trim().to_owned();
                format!("`{value}` is not a valid regex: {last}")
            })
    }
}

impl From<Pattern> for String {
    fn from(value: Pattern) -> Self {
        value.0
    }
}

/// An address (`10.1.2.3`) or network (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpNetwork {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl IpNetwork {
    /// True when `ip` is in the network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for IpNetwork {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let invalid = || {
            format!(
                "`{value}` is not valid: expected an IP address or a network such as 10.0.0.0/8"
            )
        };
        let (addr, prefix) = match value.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (value.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(invalid)?,
            None => max,
        };
        Ok(IpNetwork { addr, prefix })
    }
}

impl From<IpNetwork> for String {
    fn from(value: IpNetwork) -> Self {
        format!("{}/{}", value.addr, value.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets_parse_codes_and_ranges() {
        let set = StatusSet::try_from(vec![
            StatusItem::Code(429),
            StatusItem::Text("502-504".into()),
        ])
        .unwrap();
        assert!(set.contains(429) && set.contains(503) && !set.contains(500));
        for bad in ["600", "504-502", "5xx", "99"] {
            let err = StatusSet::try_from(vec![StatusItem::Text(bad.into())]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn networks_match_addresses() {
        let net = IpNetwork::try_from("10.0.0.0/8".to_owned()).unwrap();
        assert!(net.contains("10.9.8.7".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one = IpNetwork::try_from("fd00::1".to_owned()).unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        let all = IpNetwork::try_from("0.0.0.0/0".to_owned()).unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(IpNetwork::try_from("10.0.0.0/33".to_owned()).is_err());
    }

    #[test]
    fn bad_regexes_are_named() {
        let err = Pattern::try_from("a(b".to_owned()).unwrap_err();
        assert!(err.starts_with("`a(b` is not a valid regex"), "{err}");
    }
}
