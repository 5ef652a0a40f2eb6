//! Error reports: the app's server errors (and the proxy's own 502/504) as
//! `upstream.error` events, and 404s followed from a page as `broken_link`
//! events, by Django's rules (`BrokenLinkEmailsMiddleware`) and ours.
//!
//! The proxy keeps a [`Snapshot`] of a request only when a subscriber wants
//! one of these kinds, so a sidecar with no hook or mail for them does no
//! extra work per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use regex::RegexSet;

use crate::config::{Config, IpNetwork, StatusSet};
use crate::events::{BrokenLink, Bus, Event, EventData, UpstreamError};
use crate::scrub::{Scrubber, Secrets};

/// Turns error responses into events.
pub struct ErrorReports {
    statuses: StatusSet,
    body_bytes: usize,
    ignorable_urls: RegexSet,
    ignorable_agents: RegexSet,
    internal_only: bool,
    internal_ips: Vec<IpNetwork>,
    scrubber: Arc<Scrubber>,
    bus: Bus,
}

/// What is kept of a request in case its response is an error.
pub struct Snapshot {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: SocketAddr,
    start: Instant,
}

/// The first bytes of an error body, collected as it streams to the client;
/// the event is published when enough is collected or the body ends.
pub struct Capture {
    /// `None` once published.
    event: Option<Box<UpstreamError>>,
    buf: Vec<u8>,
    limit: usize,
    secrets: Secrets,
    scrubber: Arc<Scrubber>,
    bus: Bus,
}

impl ErrorReports {
    /// The rules of `config.errors`, scrubbing with `scrubber`, publishing on `bus`.
    pub fn new(config: &Config, scrubber: Arc<Scrubber>, bus: Bus) -> Result<ErrorReports, String> {
        let errors = &config.errors;
        let set = |patterns: &[crate::config::Pattern]| {
            RegexSet::new(patterns.iter().map(|p| p.0.as_str())).map_err(|e| e.to_string())
        };
        Ok(ErrorReports {
            statuses: errors.server_error_statuses.clone(),
            body_bytes: errors.response_body_bytes,
            ignorable_urls: set(&errors.ignorable_404_urls)?,
            ignorable_agents: set(&errors.ignorable_user_agents)?,
            internal_only: errors.internal_only,
            internal_ips: errors.internal_ips.clone(),
            scrubber,
            bus,
        })
    }

    /// A snapshot of the request, or `None` when nobody wants error events.
    pub fn snapshot<B>(
        &self,
        req: &http::Request<B>,
        peer: SocketAddr,
        start: Instant,
    ) -> Option<Box<Snapshot>> {
        if !self.bus.wants("upstream.error") && !self.bus.wants("broken_link") {
            return None;
        }
        Some(Box::new(Snapshot {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            peer,
            start,
        }))
    }

    /// Called with the response head: publishes the event the response
    /// makes, if any, or returns a [`Capture`] to attach to the body when
    /// the event should carry the body's first bytes. `cause` is set when
    /// the proxy answered itself.
    pub fn on_response(
        &self,
        snapshot: Box<Snapshot>,
        status: StatusCode,
        cause: Option<&str>,
        request_id: &HeaderValue,
    ) -> Option<Capture> {
        let code = status.as_u16();
        let server_error = match cause {
            Some(_) => status.is_server_error(),
            None => self.statuses.contains(code),
        };
        if server_error && self.bus.wants("upstream.error") {
            let mut secrets = Secrets::default();
            let event =
                Box::new(self.upstream_error(&snapshot, code, cause, request_id, &mut secrets));
            if cause.is_none() && self.body_bytes > 0 {
                return Some(Capture {
                    event: Some(event),
                    buf: Vec::new(),
                    limit: self.body_bytes,
                    secrets,
                    scrubber: self.scrubber.clone(),
                    bus: self.bus.clone(),
                });
            }
            self.bus.publish(Event::new(
                "upstream.error",
                EventData::UpstreamError(event),
            ));
        } else if code == 404 && cause.is_none() && self.bus.wants("broken_link") {
            if let Some(link) = self.broken_link(&snapshot, request_id) {
                self.bus.publish(Event::new(
                    "broken_link",
                    EventData::BrokenLink(Box::new(link)),
                ));
            }
        }
        None
    }

    fn upstream_error(
        &self,
        s: &Snapshot,
        status: u16,
        cause: Option<&str>,
        request_id: &HeaderValue,
        secrets: &mut Secrets,
    ) -> UpstreamError {
        let query = s.uri.query().map(|q| self.scrubber.query(q, secrets));
        let mut headers = self.scrubber.headers(&s.headers, secrets);
        // A secret of the query repeated in a header (X-Original-URL) too.
        if !secrets.is_empty() {
            for value in headers.values_mut() {
                *value = secrets.redact(value);
            }
        }
        UpstreamError {
            method: s.method.to_string(),
            host: host(s),
            path: s.uri.path().to_owned(),
            query,
            status,
            request_id: lossy(request_id),
            duration_ms: s.start.elapsed().as_millis() as u64,
            client: s.peer.ip().to_canonical().to_string(),
            internal_ip: self.internal_ips.iter().any(|n| n.contains(s.peer.ip())),
            user_agent: headers.get("user-agent").cloned().unwrap_or_default(),
            headers,
            body: None,
            cause: cause.map(str::to_owned),
        }
    }

    /// The broken link a 404 is, unless it is ignorable: Django's
    /// `is_ignorable_request` in its order, then ours.
    fn broken_link(&self, s: &Snapshot, request_id: &HeaderValue) -> Option<BrokenLink> {
        let referer = header_text(&s.headers, header::REFERER);
        let domain = host(s);
        let uri = s.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let user_agent = header_text(&s.headers, header::USER_AGENT);
        let internal = is_internal(&domain, &referer);
        if is_ignorable(&domain, uri, &referer, internal)
            || self.ignorable_urls.is_match(uri)
            || self.ignorable_agents.is_match(&user_agent)
            || (self.internal_only && !internal)
        {
            return None;
        }
        let mut secrets = Secrets::default();
        Some(BrokenLink {
            method: s.method.to_string(),
            path: s.uri.path().to_owned(),
            query: s.uri.query().map(|q| self.scrubber.query(q, &mut secrets)),
            referer: self.scrubber.url(&referer, &mut secrets),
            internal,
            user_agent,
            client: s.peer.ip().to_canonical().to_string(),
            request_id: lossy(request_id),
            host: domain,
        })
    }
}

impl Capture {
    /// Adds body bytes; true once the preview is complete. A little more
    /// than the preview is kept, so a secret the cut falls into is still
    /// whole when it is looked for.
    pub fn feed(&mut self, data: &[u8]) -> bool {
        let want = self.limit + self.secrets.max_len();
        let room = want.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&data[..room.min(data.len())]);
        self.buf.len() >= want
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut event) = self.event.take() {
            let mut text = if self.buf.len() <= self.limit {
                // The whole body: JSON can be scrubbed by key too.
                self.scrubber
                    .text(&String::from_utf8_lossy(&self.buf), &mut self.secrets)
            } else {
                // Cut first, never inside a secret, then mask the secrets
                // (masking first would shift later bytes into the preview).
                let cut = self.secrets.safe_cut(&self.buf, self.limit);
                self.secrets
                    .redact(&String::from_utf8_lossy(&self.buf[..cut]))
            };
            let mut end = self.limit.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            event.body = Some(text);
            self.bus.publish(Event::new(
                "upstream.error",
                EventData::UpstreamError(event),
            ));
        }
    }
}

/// Django's `is_ignorable_request`, minus `IGNORABLE_404_URLS` (checked by
/// the caller): no referer; an APPEND_SLASH redirect; an external referer
/// with a query (a search engine); a referer that is the URL itself (a bot).
pub fn is_ignorable(domain: &str, uri: &str, referer: &str, internal: bool) -> bool {
    if referer.is_empty() {
        return true;
    }
    if let Some(without_slash) = uri.strip_suffix('/') {
        if referer == without_slash {
            return true;
        }
    }
    if !internal && referer.contains('?') {
        return true;
    }
    let (netloc, path) = split_url(referer);
    (netloc.is_empty() || netloc == domain) && path == uri
}

/// Django's `is_internal_request`: the referer is `http(s)://<domain>/…`
/// (different subdomains are different domains).
pub fn is_internal(domain: &str, referer: &str) -> bool {
    let rest = referer
        .strip_prefix("https://")
        .or_else(|| referer.strip_prefix("http://"));
    rest.and_then(|r| r.strip_prefix(domain))
        .is_some_and(|r| r.starts_with('/'))
}

/// `urllib.parse.urlparse(url)`'s netloc and path: the netloc follows `//`
/// (after a scheme or at the start) up to `/`, `?` or `#`; the path runs up
/// to `?` or `#`.
fn split_url(url: &str) -> (&str, &str) {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let after_scheme = match url.find(':') {
        Some(colon)
            if colon > 0
                && url[..colon]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                && url.as_bytes()[0].is_ascii_alphabetic() =>
        {
            &url[colon + 1..]
        }
        _ => url,
    };
    let (netloc, path) = match after_scheme.strip_prefix("//") {
        Some(rest) => {
            let slash = rest.find('/').unwrap_or(rest.len());
            (&rest[..slash], &rest[slash..])
        }
        None => ("", after_scheme),
    };
    // `;params` of the last segment are not part of urlparse's path.
    let last = path.rfind('/').map_or(0, |i| i + 1);
    let path = match path[last..].find(';') {
        Some(semi) => &path[..last + semi],
        None => path,
    };
    (netloc, path)
}

/// The host the client asked for: the target's authority, else `Host`.
fn host(s: &Snapshot) -> String {
    match s.uri.authority() {
        // Without any userinfo an absolute-form target carried.
        Some(authority) => match authority.port() {
            Some(port) => format!("{}:{}", authority.host(), port),
            None => authority.host().to_owned(),
        },
        None => header_text(&s.headers, header::HOST),
    }
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers.get(name).map(lossy).unwrap_or_default()
}

fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pattern;
    use crate::scrub::MASK;

    fn reports(internal_only: bool) -> ErrorReports {
        let mut config = Config::default();
        config.errors.ignorable_404_urls = vec![Pattern(r"\.php$".into()), Pattern("^/wp-".into())];
        config.errors.internal_only = internal_only;
        ErrorReports::new(&config, Arc::default(), Bus::default()).unwrap()
    }

    /// `Some(internal)` when the 404 is a broken link, `None` when ignored.
    fn verdict(r: &ErrorReports, host: &str, uri: &str, referer: &str, ua: &str) -> Option<bool> {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if !referer.is_empty() {
            headers.insert(header::REFERER, HeaderValue::from_str(referer).unwrap());
        }
        headers.insert(header::USER_AGENT, HeaderValue::from_str(ua).unwrap());
        let snapshot = Snapshot {
            method: Method::GET,
            uri: uri.parse().unwrap(),
            headers,
            peer: "192.0.2.7:5000".parse().unwrap(),
            start: Instant::now(),
        };
        r.broken_link(&snapshot, &HeaderValue::from_static("rid"))
            .map(|link| link.internal)
    }

    /// Django's BrokenLinkEmailsMiddleware cases, in is_ignorable_request's
    /// order, then ours.
    #[test]
    fn broken_link_rules() {
        const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0";
        const BOT: &str =
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
        let missing = "/regular_url/that/does/not/exist";
        let all = reports(false);
        let cases: &[(&str, &str, &str, &str, Option<bool>)] = &[
            // (why, uri, referer, user agent, verdict)
            ("no referer", missing, "", UA, None),
            (
                "internal referer",
                missing,
                "http://testserver/",
                UA,
                Some(true),
            ),
            (
                "https internal referer",
                missing,
                "https://testserver/page",
                UA,
                Some(true),
            ),
            (
                "external referer",
                missing,
                "https://other.example/page",
                UA,
                Some(false),
            ),
            (
                "subdomain is another domain",
                missing,
                "http://www.testserver/",
                UA,
                Some(false),
            ),
            (
                "APPEND_SLASH redirect",
                "/regular_url/that/does/not/exist/",
                missing,
                UA,
                None,
            ),
            (
                "external referer with ? (search engine)",
                missing,
                "https://www.google.com/search?q=x",
                UA,
                None,
            ),
            (
                "internal referer with ? is reported",
                missing,
                "http://testserver/list?page=2",
                UA,
                Some(true),
            ),
            (
                "referer is the URL itself (bot)",
                missing,
                "http://testserver/regular_url/that/does/not/exist",
                UA,
                None,
            ),
            (
                "... whatever the scheme",
                missing,
                "https://testserver/regular_url/that/does/not/exist",
                UA,
                None,
            ),
            ("... or relative", missing, missing, UA, None),
            (
                "the same path on another domain is reported",
                missing,
                "http://anotherserver/regular_url/that/does/not/exist",
                UA,
                Some(false),
            ),
            (
                "the URL with a query differs from its path",
                "/a?b=1",
                "http://testserver/a",
                UA,
                Some(true),
            ),
            (
                "IGNORABLE_404_URLS",
                "/admin/setup.php",
                "http://testserver/",
                UA,
                None,
            ),
            (
                "IGNORABLE_404_URLS anchored",
                "/wp-login",
                "http://testserver/",
                UA,
                None,
            ),
            (
                "a pattern elsewhere does not match",
                "/docs/wp-guide",
                "http://testserver/",
                UA,
                Some(true),
            ),
            (
                "ignorable user agent (ours)",
                missing,
                "http://testserver/",
                BOT,
                None,
            ),
        ];
        for (why, uri, referer, ua, expected) in cases {
            assert_eq!(
                verdict(&all, "testserver", uri, referer, ua),
                *expected,
                "{why}"
            );
        }
        let internal_only = reports(true);
        assert_eq!(
            verdict(
                &internal_only,
                "testserver",
                missing,
                "https://other.example/",
                UA
            ),
            None,
            "internal_only drops external"
        );
        assert_eq!(
            verdict(
                &internal_only,
                "testserver",
                missing,
                "http://testserver/",
                UA
            ),
            Some(true),
            "internal_only keeps internal"
        );
        assert_eq!(
            verdict(
                &all,
                "testserver:8000",
                missing,
                "http://testserver:8000/x",
                UA
            ),
            Some(true),
            "the port is part of the host"
        );
    }

    /// The preview of `page` cut at `limit`, as published.
    fn preview(page: &str, limit: usize, secrets: &[&str]) -> String {
        let bus = Bus::default();
        let mut rx = bus.subscribe();
        let mut known = Secrets::default();
        secrets.iter().for_each(|s| known.add(s));
        let reports = reports(false);
        let snapshot = Snapshot {
            method: Method::GET,
            uri: "/x".parse().unwrap(),
            headers: HeaderMap::new(),
            peer: "192.0.2.7:5000".parse().unwrap(),
            start: Instant::now(),
        };
        let event = reports.upstream_error(
            &snapshot,
            500,
            None,
            &HeaderValue::from_static("r"),
            &mut known,
        );
        let mut capture = Capture {
            event: Some(Box::new(event)),
            buf: Vec::new(),
            limit,
            secrets: known,
            scrubber: Arc::default(),
            bus,
        };
        // In small pieces, as a body streams.
        for chunk in page.as_bytes().chunks(7) {
            if capture.feed(chunk) {
                break;
            }
        }
        drop(capture);
        match &rx.try_recv().unwrap().data {
            EventData::UpstreamError(e) => e.body.clone().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn previews_never_hold_part_of_a_secret() {
        let long = "L".repeat(30) + &"0123456789".repeat(3);
        let page = format!("<p>token {long} and again {long} end</p>");
        // Whatever the cut, no piece of 4 or more characters of the secret.
        for limit in 1..page.len() + 5 {
            let body = preview(&page, limit, &[&long]);
            assert!(body.len() <= limit, "{limit}: {body}");
            for piece in long.as_bytes().windows(6) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(!body.contains(piece), "{limit}: {piece} in {body}");
            }
        }
        // A whole page that fits is kept, masked.
        assert_eq!(
            preview(&page, 4096, &[&long]),
            format!("<p>token {MASK} and again {MASK} end</p>")
        );
        // JSON that fits is scrubbed by key as well.
        assert_eq!(
            preview("{\"password\":\"hunter2\",\"ok\":1}", 4096, &[]),
            format!("{{\"ok\":1,\"password\":\"{MASK}\"}}")
        );
    }

    #[test]
    fn urls_split_like_urlparse() {
        assert_eq!(
            split_url("https://a.example/x/y?q#f"),
            ("a.example", "/x/y")
        );
        assert_eq!(split_url("http://a.example"), ("a.example", ""));
        assert_eq!(split_url("//a.example/p"), ("a.example", "/p"));
        assert_eq!(split_url("/relative/p?x"), ("", "/relative/p"));
        assert_eq!(split_url("p"), ("", "p"));
        assert_eq!(split_url("http://u@h:81/p"), ("u@h:81", "/p"));
        assert_eq!(split_url("http://h/a;x"), ("h", "/a"));
        assert_eq!(split_url("http://h/a;x/b;y?q"), ("h", "/a;x/b"));
    }

    #[test]
    fn internal_means_same_host_and_a_path() {
        assert!(is_internal("app.example", "https://app.example/page"));
        assert!(is_internal("app.example:8000", "http://app.example:8000/"));
        assert!(!is_internal("app.example", "https://app.example.evil/page"));
        assert!(!is_internal("app.example", "https://www.app.example/page"));
        assert!(!is_internal("app.example", "https://app.example"));
        assert!(!is_internal("app.example", "ftp://app.example/x"));
    }
}
