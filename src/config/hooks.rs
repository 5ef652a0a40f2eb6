//! `[[hooks]]` (which events go where, how) and `[delivery]` (how the
//! outbox sends them). Per-hook rules are checked after deserialization by
//! [`validate`], which also compiles and test-renders every template.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ItemProblem;
use super::types::HumanDuration;

/// One outgoing webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Unique name (rows in the outbox carry it).
    pub name: String,
    /// Event types that trigger it.
    pub events: Vec<String>,
    /// Where to send: `http://` or `https://`.
    pub url: String,
    /// POST, PUT or PATCH.
    #[serde(default)]
    pub method: HookMethod,
    /// Extra request headers; values may contain anything, colons included.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body's content type; JSON types get JSON-escaped template values.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// A minijinja template with `event`, `host` and `service` in scope; none
    /// sends `{"id","type","time","data"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Standard Webhooks secret (`whsec_…`): signs every attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A file holding the secret (a mounted Kubernetes secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

/// The methods a hook may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum HookMethod {
    /// POST (the default).
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
}

fn default_content_type() -> String {
    "application/json".into()
}

/// How the outbox delivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Longest one attempt may take (connect, send, answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Waits before each retry (±20 % jitter); after the last, the row is `error`.
    pub retry_schedule: Vec<HumanDuration>,
    /// Outbox rows older than this are deleted (sent and error alike).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// For `https://` hooks: a PEM file of CA certificates to trust besides
    /// the platform's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        DeliveryConfig {
            concurrency: 8,
            timeout: Duration::from_secs(15),
            retry_schedule: [
                Duration::from_secs(5),
                minutes(5),
                minutes(30),
                minutes(120),
                minutes(300),
                minutes(600),
                minutes(600),
            ]
            .into_iter()
            .map(HumanDuration)
            .collect(),
            retention: Duration::from_secs(30 * 86_400),
            ca_file: None,
        }
    }
}

/// Checks every hook, reading `secret_file`s into `secret`; `service` is
/// the name templates see.
pub(super) fn validate(
    hooks: &mut [HookConfig],
    delivery: &DeliveryConfig,
    service: &str,
) -> Vec<ItemProblem> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, hook) in hooks.iter_mut().enumerate() {
        let mut problem =
            |key: &'static str, reason: String| problems.push(ItemProblem { index, key, reason });
        if hook.name.trim().is_empty() {
            problem("name", "a hook needs a non-empty name".into());
        } else if !seen.insert(hook.name.clone()) {
            problem(
                "name",
                format!("`{}` is used by two hooks; names must be unique", hook.name),
            );
        }
        if hook.events.is_empty() {
            problem(
                "events",
                format!(
                    "a hook needs at least one event: {}",
                    crate::events::KINDS.join(", ")
                ),
            );
        }
        for event in &hook.events {
            if !crate::events::KINDS.contains(&event.as_str()) {
                problem(
                    "events",
                    format!(
                        "`{event}` is not an event; expected one of {}",
                        crate::events::KINDS.join(", ")
                    ),
                );
            }
        }
        match hook.url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => problem(
                "url",
                format!(
                    "`{}` is not valid: expected an http:// or https:// URL",
                    super::mask::mask_url_password(&hook.url)
                ),
            ),
        }
        for (name, value) in &hook.headers {
            if http::HeaderName::try_from(name.as_str()).is_err() {
                problem("headers", format!("`{name}` is not a valid header name"));
            } else if http::HeaderValue::try_from(value.as_str()).is_err() {
                problem(
                    "headers",
                    format!("the value of `{name}` has characters a header cannot carry"),
                );
            }
        }
        if http::HeaderValue::try_from(hook.content_type.as_str()).is_err() {
            problem(
                "content_type",
                format!("`{}` is not a valid content type", hook.content_type),
            );
        }
        if let Some(file) = &hook.secret_file {
            match super::read_text_file(file) {
                Ok(text) if hook.secret.is_none() => hook.secret = Some(text.trim().to_owned()),
                Ok(_) => problem(
                    "secret_file",
                    "give `secret` or `secret_file`, not both".into(),
                ),
                Err(e) => problem(
                    "secret_file",
                    format!("cannot read {}: {e}", file.display()),
                ),
            }
        }
        if let Some(secret) = &hook.secret {
            if let Err(e) = crate::hooks::Secret::parse(secret) {
                problem("secret", e);
            }
        }
        if let Err(e) = crate::hooks::Template::verify(hook, service) {
            problem("template", e);
        }
    }
    if delivery.concurrency == 0 {
        problems.push(ItemProblem {
            index: usize::MAX,
            key: "concurrency",
            reason: "delivery.concurrency must be at least 1".into(),
        });
    }
    problems
}
