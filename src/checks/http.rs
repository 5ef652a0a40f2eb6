//! `upstream` and `http` checks: a GET that must answer an expected status,
//! optionally merging the target's own Dockerflow heartbeat into ours.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{error_chain, shown, Check, CheckFuture, CheckResult, Level, Message, Outcome};
use crate::config::{CheckConfig, Config};
use crate::upstream::{self, UpstreamClient};

/// The most of a heartbeat body read for merging.
const MAX_BODY: usize = 1024 * 1024;

/// A GET to the upstream or to any HTTP(S) URL.
pub struct HttpCheck {
    client: HttpClient,
    uri: Uri,
    host: Option<HeaderValue>,
    /// The target as shown in messages.
    target: String,
    level: Level,
    config: CheckConfig,
}

enum HttpClient {
    Upstream(UpstreamClient<Empty<Bytes>>),
    Web(Client<HttpsConnector<HttpConnector>, Empty<Bytes>>),
}

impl HttpCheck {
    /// A check of the configured upstream at the check's `path`.
    pub fn upstream(
        check: &CheckConfig,
        level: Level,
        config: &Config,
    ) -> Result<HttpCheck, String> {
        let authority = upstream::authority(&config.upstream.url);
        let path = check.request_path();
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path.0.clone())
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
        Ok(HttpCheck {
            client: HttpClient::Upstream(upstream::client(
                &config.upstream,
                upstream::uncounted(),
            )?),
            host: HeaderValue::from_str(authority.as_str()).ok(),
            uri,
            target: format!("{}{}", config.upstream.url, path.as_str()),
            level,
            config: check.clone(),
        })
    }

    /// A check of the check's `url`, over HTTP or HTTPS.
    pub fn url(check: &CheckConfig, level: Level) -> Result<HttpCheck, String> {
        let url = check.url.clone().unwrap_or_default();
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{}` is not a URL: {e}", shown(&url)))?;
        let tls = crate::tls::client_config(check.ca_file.as_deref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(HttpCheck {
            client: HttpClient::Web(client),
            host: None,
            uri,
            target: shown(&url),
            level,
            config: check.clone(),
        })
    }

    async fn get(
        &self,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.uri.clone();
        if let Some(host) = &self.host {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("dockerflow-sidecar heartbeat"),
        );
        match &self.client {
            HttpClient::Upstream(client) => client.request(req).await,
            HttpClient::Web(client) => client.request(req).await,
        }
    }

    async fn check(&self) -> Outcome {
        let resp = match self.get().await {
            Ok(resp) => resp,
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E001",
                    self.level,
                    format!("could not reach {}: {}", self.target, error_chain(&e)),
                )
            }
        };
        let status = resp.status().as_u16();
        if !self.config.merge {
            return if self.config.expects(status) {
                Outcome::default()
            } else {
                Outcome::fail(
                    "sidecar.E002",
                    self.level,
                    format!("{} answered {status}", self.target),
                )
            };
        }
        // A failing app answers its heartbeat with 500 and a body saying why:
        // with `merge`, the body matters, not the status.
        let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E008",
                    self.level,
                    format!(
                        "{} answered {status} and its body could not be read: {e}",
                        self.target
                    ),
                )
            }
        };
        match parse_heartbeat(&body) {
            Some(merged) => Outcome {
                messages: Vec::new(),
                merged,
            },
            None => Outcome::fail(
                "sidecar.E008",
                self.level,
                format!(
                    "{} answered {status} without a Dockerflow heartbeat body",
                    self.target
                ),
            ),
        }
    }
}

impl Check for HttpCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(self.check())
    }
}

/// The checks of a python-dockerflow heartbeat body: `checks` gives every
/// name and status; `details`, where present, the level and messages.
fn parse_heartbeat(body: &[u8]) -> Option<Vec<CheckResult>> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let checks = json.get("checks")?.as_object()?;
    json.get("status")?.as_str()?;
    let details = json.get("details").and_then(Value::as_object);
    let results = checks
        .iter()
        .map(|(name, status)| {
            let status_level = status
                .as_str()
                .and_then(Level::from_name)
                .unwrap_or(Level::ERROR);
            let detail = details.and_then(|d| d.get(name));
            let level = detail
                .and_then(|d| d.get("level"))
                .and_then(Value::as_u64)
                .map(|l| Level(l.min(255) as u8))
                .unwrap_or(status_level);
            let messages: Vec<Message> = detail
                .and_then(|d| d.get("messages"))
                .and_then(Value::as_object)
                .map(|messages| {
                    messages
                        .iter()
                        .map(|(id, text)| Message {
                            id: id.clone(),
                            level,
                            text: text
                                .as_str()
                                .map_or_else(|| text.to_string(), str::to_owned),
                        })
                        .collect()
                })
                .unwrap_or_default();
            // The level stands on its own only when no message carries it:
            // otherwise silencing the messages must also silence the level.
            let bare_level = if messages.is_empty() {
                level
            } else {
                Level::OK
            };
            CheckResult {
                name: name.clone(),
                messages,
                bare_level,
                // The check that merged it sets how long it took.
                duration: std::time::Duration::ZERO,
            }
        })
        .collect();
    Some(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_python_dockerflow_body() {
        let body = br#"{"status": "warning", "checks": {"database": "ok", "migrations": "warning"},
            "details": {"migrations": {"status": "warning", "level": 30, "messages": {"dockerflow.health.W001": "Unapplied migrations found"}}}}"#;
        let results = parse_heartbeat(body).unwrap();
        assert_eq!(results.len(), 2);
        let migrations = results.iter().find(|r| r.name == "migrations").unwrap();
        assert_eq!(migrations.level(), Level::WARNING);
        assert_eq!(migrations.messages[0].id, "dockerflow.health.W001");
        let database = results.iter().find(|r| r.name == "database").unwrap();
        assert_eq!(database.level(), Level::OK);
    }

    #[test]
    fn a_status_only_body_is_not_mergeable() {
        assert!(parse_heartbeat(br#"{"status": "ok"}"#).is_none());
        assert!(parse_heartbeat(b"<html>").is_none());
    }
}
