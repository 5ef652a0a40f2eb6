//! The `upstream` check: the app accepts a connection and answers an HTTP
//! request on a configured path with a status from 200 to 399.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::Empty;

use super::{Check, CheckFuture, Level, Message};
use crate::config::Config;
use crate::upstream::{self, UpstreamClient};

/// Requests `path` from the app.
pub struct UpstreamCheck {
    client: UpstreamClient<Empty<Bytes>>,
    uri: Uri,
    host: HeaderValue,
    target: String,
}

impl UpstreamCheck {
    /// The check for the configured upstream and `heartbeat.upstream_path`.
    pub fn new(config: &Config) -> UpstreamCheck {
        let authority = upstream::authority(&config.upstream.url);
        let path = &config.heartbeat.upstream_path;
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path.0.clone())
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
        UpstreamCheck {
            client: upstream::client(&config.upstream),
            host: HeaderValue::from_str(authority.as_str())
                .unwrap_or(HeaderValue::from_static("localhost")),
            uri,
            target: format!("{}{}", config.upstream.url, path.as_str()),
        }
    }

    fn error(&self, id: &str, text: String) -> Vec<Message> {
        vec![Message {
            id: id.into(),
            level: self.level(),
            text,
        }]
    }
}

impl Check for UpstreamCheck {
    fn name(&self) -> &str {
        "upstream"
    }

    fn level(&self) -> Level {
        Level::ERROR
    }

    fn run(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let mut req = Request::new(Empty::new());
            *req.uri_mut() = self.uri.clone();
            req.headers_mut().insert(header::HOST, self.host.clone());
            req.headers_mut().insert(
                header::USER_AGENT,
                HeaderValue::from_static("dockerflow-sidecar heartbeat"),
            );
            match self.client.request(req).await {
                Ok(resp) if (200..400).contains(&resp.status().as_u16()) => Vec::new(),
                Ok(resp) => self.error(
                    "sidecar.E002",
                    format!("{} answered {}", self.target, resp.status().as_u16()),
                ),
                Err(e) => {
                    let cause = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.to_string());
                    self.error(
                        "sidecar.E001",
                        format!("could not reach {}: {cause}", self.target),
                    )
                }
            }
        })
    }
}
