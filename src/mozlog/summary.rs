//! The `request.summary` line: one per request, written when the response
//! (or the tunnel) ends, by dropping the guard that travels with it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use std::borrow::Cow;

use http::header::HeaderValue;
use http::{HeaderMap, Method};
#[cfg(test)]
use serde::Serialize;

use super::{json_str, Logger, Severity};
use crate::metrics::{Metrics, RouteClass};

/// The facts of one request, logged once when dropped. Boxed: the guard
/// travels by value through every layer of the request path (and inside the
/// response body), and each move of 280 bytes inline was a `memcpy`.
pub struct RequestSummary(Box<Facts>);

struct Facts {
    logger: Arc<Logger>,
    metrics: Arc<Metrics>,
    route: RouteClass,
    /// Response body bytes sent so far.
    sent: u64,
    start: Instant,
    /// `None` when the request could not be parsed.
    method: Option<Method>,
    path: String,
    querystring: Option<String>,
    // Header values are kept as received (a reference count, no copy) and
    // turned into text only when the line is written.
    agent: Option<HeaderValue>,
    lang: Option<HeaderValue>,
    rid: Option<HeaderValue>,
    code: u16,
    /// Why the proxy failed the request; `Some` makes the line an error.
    failure: Option<String>,
    /// An explanation that is not a failure of the proxy.
    note: Option<&'static str>,
}

/// The status logged for a request abandoned before its response (nginx's).
const CLIENT_CLOSED: u16 = 499;

/// The line's `Fields`, written by [`Fields::write_json`] (a test holds it
/// equal to what serde_json writes for the derived impl).
#[cfg_attr(test, derive(Serialize))]
struct Fields<'a> {
    errno: u16,
    agent: &'a str,
    lang: &'a str,
    method: &'a str,
    path: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    querystring: Option<&'a str>,
    rid: &'a str,
    t: u64,
    code: u16,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    msg: Option<&'a str>,
}

impl Fields<'_> {
    /// The object, keys in declaration order, as serde_json writes it but
    /// without escaping the constant keys byte by byte on every request.
    fn write_json(&self, buf: &mut Vec<u8>) {
        let mut number = itoa::Buffer::new();
        buf.extend_from_slice(b"{\"errno\":");
        buf.extend_from_slice(number.format(self.errno).as_bytes());
        for (key, value) in [
            (&b",\"agent\":"[..], Some(self.agent)),
            (b",\"lang\":", Some(self.lang)),
            (b",\"method\":", Some(self.method)),
            (b",\"path\":", Some(self.path)),
            (b",\"querystring\":", self.querystring),
            (b",\"rid\":", Some(self.rid)),
        ] {
            if let Some(value) = value {
                buf.extend_from_slice(key);
                json_str(buf, value);
            }
        }
        buf.extend_from_slice(b",\"t\":");
        buf.extend_from_slice(number.format(self.t).as_bytes());
        buf.extend_from_slice(b",\"code\":");
        buf.extend_from_slice(number.format(self.code).as_bytes());
        if let Some(msg) = self.msg {
            buf.extend_from_slice(b",\"msg\":");
            json_str(buf, msg);
        }
        buf.push(b'}');
    }
}

impl RequestSummary {
    /// Starts the clock for a request. With `log_query`, the line carries the
    /// query string, scrubbed then percent-decoded.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        logger: Arc<Logger>,
        metrics: Arc<Metrics>,
        start: Instant,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        rid: HeaderValue,
        log_query: Option<&crate::scrub::Scrubber>,
    ) -> RequestSummary {
        let querystring = log_query.and_then(|scrubber| {
            uri.query().map(|q| {
                let q = scrubber.query(q, &mut crate::scrub::Secrets::default());
                percent_encoding::percent_decode_str(&q)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        });
        RequestSummary(Box::new(Facts {
            logger,
            metrics,
            route: RouteClass::Proxy,
            sent: 0,
            start,
            method: Some(method.clone()),
            path: uri.path().to_owned(),
            querystring,
            agent: headers.get(http::header::USER_AGENT).cloned(),
            lang: headers.get(http::header::ACCEPT_LANGUAGE).cloned(),
            rid: Some(rid),
            code: 0,
            failure: None,
            note: None,
        }))
    }

    /// The line for a request hyper refused before it could be routed (a
    /// malformed request line or headers): no method, path or id is known.
    pub fn unparsed(
        logger: Arc<Logger>,
        metrics: Arc<Metrics>,
        code: u16,
        cause: String,
    ) -> RequestSummary {
        RequestSummary(Box::new(Facts {
            logger,
            metrics,
            route: RouteClass::Malformed,
            sent: 0,
            start: Instant::now(),
            method: None,
            path: String::new(),
            querystring: None,
            agent: None,
            lang: None,
            rid: None,
            code,
            failure: Some(cause),
            note: None,
        }))
    }

    /// Records where the request went (for metrics; the default is proxy).
    pub fn set_route(&mut self, route: RouteClass) {
        self.0.route = route;
    }

    /// Counts response body bytes sent.
    pub fn add_sent(&mut self, bytes: usize) {
        self.0.sent += bytes as u64;
    }

    /// Records the status sent to the client.
    pub fn set_code(&mut self, code: u16) {
        self.0.code = code;
    }

    /// Marks the request as failed at the proxy: the line becomes Severity 3
    /// with `errno` = the status sent and `msg` = `cause`.
    pub fn fail(&mut self, code: u16, cause: String) {
        self.0.code = code;
        self.0.failure = Some(cause);
    }

    /// Marks a response that failed after its head was sent (the status
    /// stays what the client got).
    pub fn fail_body(&mut self, cause: String) {
        self.0.failure = Some(cause);
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.0.start
    }
}

/// A header value as text for the line (lossy for non-UTF-8 bytes; visible
/// ASCII, the usual case, is checked by the cheaper `to_str`).
fn text(value: &Option<HeaderValue>) -> Cow<'_, str> {
    match value {
        None => Cow::Borrowed(""),
        Some(v) => match v.to_str() {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(v.as_bytes()),
        },
    }
}

impl Drop for RequestSummary {
    fn drop(&mut self) {
        let this = &mut *self.0;
        if this.code == 0 {
            // Dropped before any status was chosen: the client went away (or
            // the grace period ended) while the request was still upstream.
            // nginx's 499 says exactly that.
            this.code = CLIENT_CLOSED;
            this.note = Some("client closed the request before the response was sent");
        }
        let took = this.start.elapsed();
        this.metrics
            .request(this.route, this.method.as_ref(), this.code, took);
        if this.sent > 0 {
            this.metrics.response_bytes.inc_by(this.sent);
        }
        let t = took.as_millis() as u64;
        let severity = if this.failure.is_some() {
            Severity::Error
        } else {
            Severity::Info
        };
        let (agent, lang, rid) = (text(&this.agent), text(&this.lang), text(&this.rid));
        let fields = Fields {
            errno: if this.failure.is_some() { this.code } else { 0 },
            agent: &agent,
            lang: &lang,
            method: this.method.as_ref().map_or("", Method::as_str),
            path: &this.path,
            querystring: this.querystring.as_deref(),
            rid: &rid,
            t,
            code: this.code,
            msg: this.failure.as_deref().or(this.note),
        };
        let fields = |buf: &mut Vec<u8>| fields.write_json(buf);
        this.logger
            .emit_json("request.summary", severity, fields, |s| {
                let method = this.method.as_ref().map_or("-", Method::as_str);
                let _ = write!(s, " {} {method} {}", this.code, this.path);
                if let Some(q) = &this.querystring {
                    let _ = write!(s, "?{q}");
                }
                let _ = write!(s, " {t}ms rid={rid}");
                if let Some(msg) = this.failure.as_deref().or(this.note) {
                    let _ = write!(s, " msg={msg:?}");
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written fields are byte for byte serde_json's, with and
    /// without the optional keys, escapes included.
    #[test]
    fn the_fields_are_what_serde_would_write() {
        for (querystring, msg) in [
            (None, None),
            (Some("a=1&b=\"2\""), Some("upstream\tfailed\u{7f}é")),
        ] {
            let fields = Fields {
                errno: 502,
                agent: "Mozilla/5.0 \"quoted\" \\ back\u{1}",
                lang: "",
                method: "GET",
                path: "/x/ü?",
                querystring,
                rid: "0f0e",
                t: u64::MAX,
                code: 502,
                msg,
            };
            let mut buf = Vec::new();
            fields.write_json(&mut buf);
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                serde_json::to_string(&fields).unwrap()
            );
        }
    }
}
