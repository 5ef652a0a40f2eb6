//! Forwarding rules: what a request and its response look like on the other
//! side of the sidecar, and the errors the proxy answers itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::body::ClientBody;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::body::{RequestBody, ResponseBody};
use crate::config::Config;
use crate::error_chain;
use crate::error_reports::ErrorReports;
use crate::h1::{Conn, Outgoing, UpstreamBody};
use crate::metrics::Metrics;
use crate::mozlog::RequestSummary;
use crate::pool::{Pool, SendError};
use crate::upstream::{self, UpstreamClient};

/// Forwards requests to the one configured upstream.
pub struct Proxy {
    pool: Pool,
    /// For bodies the sidecar has already read (reports passed on).
    copies: UpstreamClient<http_body_util::Full<bytes::Bytes>>,
    /// Copies in flight at most; more are not sent (and say so).
    copy_slots: Arc<tokio::sync::Semaphore>,
    /// The authority every forwarded URI carries (the pool key).
    authority: Authority,
    /// Header carrying the request id.
    rid_header: HeaderName,
    /// Longest wait for the response head.
    response_header_timeout: Duration,
    /// Longest pause of a client between two reads of a request body
    /// (`server.idle_timeout`); then 408.
    body_stall_timeout: Duration,
    /// Where WebSocket and other upgraded tunnels are tracked for shutdown.
    tunnels: TaskTracker,
    /// Turns error responses into `upstream.error` and `broken_link` events.
    errors: ErrorReports,
    metrics: Arc<Metrics>,
}

/// Marks a response the proxy made itself because forwarding failed.
#[derive(Clone, Copy)]
struct ProxyFailure(&'static str);

/// Report copies passed on to the app at once, at most (each holds its body).
const COPIES_IN_FLIGHT: usize = 64;

// Constants, not `HeaderName::from_static` calls: at run time that call
// compares the name with every standard header's (about 300 instructions).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus `Proxy-Connection`, which old clients still send.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Proxy {
    /// A proxy for `config.upstream`, tracking tunnels in `tunnels` and
    /// reporting error responses through `errors`.
    pub fn new(
        config: &Config,
        tunnels: TaskTracker,
        errors: ErrorReports,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, String> {
        let open = &metrics.upstream_connections;
        Ok(Proxy {
            pool: Pool::new(
                upstream::UpstreamConnector::new(&config.upstream, open.clone())?,
                config.server.workers(),
                config.upstream.pool_max_idle,
                config.upstream.pool_idle_timeout,
                metrics.upstream_retries.clone(),
            ),
            copies: upstream::client(&config.upstream, open.clone())?,
            copy_slots: Arc::new(tokio::sync::Semaphore::new(COPIES_IN_FLIGHT)),
            authority: upstream::authority(&config.upstream.url),
            body_stall_timeout: config.server.idle_timeout,
            rid_header: config.logging.request_id_header.name.clone(),
            response_header_timeout: config.upstream.response_header_timeout,
            tunnels,
            errors,
            metrics,
        })
    }

    /// Sends `req` to the upstream and returns its response (or a 502/504),
    /// with `summary` attached so the line is written when the response or
    /// the tunnel ends.
    pub async fn forward(
        &self,
        req: Request<ClientBody>,
        peer: SocketAddr,
        https: bool,
        rid: HeaderValue,
        summary: RequestSummary,
    ) -> Response<ResponseBody> {
        // Only when a hook or mail wants error events: a copy of the head.
        let snapshot = self.errors.snapshot(&req, peer, summary.started());
        let resp = self
            .forward_inner(req, peer, https, rid.clone(), summary)
            .await;
        let Some(snapshot) = snapshot else {
            return resp;
        };
        let cause = resp.extensions().get::<ProxyFailure>().map(|f| f.0);
        match self
            .errors
            .on_response(snapshot, resp.status(), cause, &rid)
        {
            Some(capture) => resp.map(|body| body.with_capture(capture)),
            None => resp,
        }
    }

    async fn forward_inner(
        &self,
        mut req: Request<ClientBody>,
        peer: SocketAddr,
        https: bool,
        rid: HeaderValue,
        mut summary: RequestSummary,
    ) -> Response<ResponseBody> {
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| ClientUpgrade::of(&mut req));
        let target_authority = req.uri().authority().cloned();

        *req.uri_mut() = origin_form(req.uri());
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        set_host(headers, target_authority.as_ref(), &self.authority);
        if let Some(protocol) = &upgrade {
            restore_upgrade(headers, protocol.clone());
        }
        append_forwarded_for(headers, peer);
        forwarded_proto(headers, https);
        headers.insert(self.rid_header.clone(), rid.clone());

        let (parts, body) = req.into_parts();
        let (body, body_sent) = RequestBody::new(
            body,
            self.metrics.request_bytes.clone(),
            self.body_stall_timeout,
        );
        // Encoded here: a request is 312 bytes, its encoding 128, and every
        // future of the await chain below holds it (some twice).
        let out = Outgoing::new(Request::from_parts(parts, body));
        let mut resp = match self.send(out, body_sent).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(e)) => {
                let (status, text) = if e.is_connect() {
                    self.metrics.upstream_connect_errors.inc();
                    (StatusCode::BAD_GATEWAY, "upstream unreachable")
                } else if e.is_client_body_stalled() {
                    (StatusCode::REQUEST_TIMEOUT, "request body timed out")
                } else if e.is_client_body() {
                    (StatusCode::BAD_REQUEST, "bad request body")
                } else {
                    (StatusCode::BAD_GATEWAY, "upstream failed")
                };
                summary.fail(status.as_u16(), format!("{text}: {}", error_chain(&e)));
                return self.error_response(status, text, rid, summary);
            }
            Err(_) => {
                self.metrics.upstream_timeouts.inc();
                let limit = humantime::format_duration(self.response_header_timeout);
                let status = StatusCode::GATEWAY_TIMEOUT;
                summary.fail(
                    status.as_u16(),
                    format!("upstream sent no response head within {limit}"),
                );
                return self.error_response(status, "upstream timed out", rid, summary);
            }
        };
        summary.set_code(resp.status().as_u16());

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let response_upgrade = if switching {
            upgrade_protocol(resp.headers())
        } else {
            None
        };
        strip_hop_by_hop(resp.headers_mut());
        resp.headers_mut()
            .insert(self.rid_header.clone(), rid.clone());

        match (client_upgrade, response_upgrade) {
            (Some(client_side), Some(protocol)) => {
                restore_upgrade(resp.headers_mut(), protocol);
                let upstream_side = resp.body_mut().take_upgraded();
                let open = crate::server::GaugeGuard::new(&self.metrics.open_tunnels);
                self.tunnels
                    .spawn(tunnel(client_side, upstream_side, summary, open));
                resp.map(|_| ResponseBody::empty())
            }
            // RFC 9110 §15.2.2: a 101 must name the protocol, and only one
            // the client asked for; anything else cannot be relayed.
            _ if switching => {
                let status = StatusCode::BAD_GATEWAY;
                summary.fail(
                    status.as_u16(),
                    "upstream switched protocols without a matching upgrade request".into(),
                );
                self.error_response(status, "upstream failed", rid, summary)
            }
            _ => resp.map(|body| ResponseBody::upstream(body).with_summary(summary)),
        }
    }

    /// Passes a copy of a request the sidecar answered itself (an accepted
    /// report, with `reports.forward`) on to the app, in the background and
    /// tracked for shutdown; at most `COPIES_IN_FLIGHT` at once (beyond that
    /// the copy is skipped with a warning). The app's answer is only logged
    /// when it is an error.
    pub fn send_copy(
        &self,
        head: Request<()>,
        body: bytes::Bytes,
        peer: SocketAddr,
        https: bool,
        rid: HeaderValue,
    ) {
        let (head, ()) = head.into_parts();
        let (method, uri, mut headers) = (head.method, head.uri, head.headers);
        let target = uri.authority().cloned();
        strip_hop_by_hop(&mut headers);
        set_host(&mut headers, target.as_ref(), &self.authority);
        append_forwarded_for(&mut headers, peer);
        forwarded_proto(&mut headers, https);
        headers.insert(self.rid_header.clone(), rid);
        headers.remove(header::CONTENT_LENGTH);
        let mut req = Request::new(http_body_util::Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = self.upstream_uri(&uri);
        *req.headers_mut() = headers;
        let Ok(slot) = self.copy_slots.clone().try_acquire_owned() else {
            tracing::warn!("too many reports being passed on to the app: this one is not");
            return;
        };
        let client = self.copies.clone();
        let limit = self.response_header_timeout;
        self.tunnels.spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(limit, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {}
                Ok(Ok(resp)) => tracing::warn!(
                    status = resp.status().as_u16(),
                    "the app refused a forwarded report"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "could not forward a report to the app")
                }
                Err(_) => tracing::warn!("forwarding a report to the app timed out"),
            }
        });
    }

    /// Sends the request; `None` when no response head arrived within the
    /// response-header timeout, counted from when the request body was sent.
    async fn send(
        &self,
        req: Outgoing<RequestBody>,
        body_sent: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Result<Result<Response<UpstreamBody>, SendError>, tokio::time::error::Elapsed> {
        // Pinned once, and only borrowed below: a second copy of it inside
        // a `Timeout` would double this future's size, and every level of
        // the await chain copies it whole.
        let response = self.pool.send(req);
        tokio::pin!(response);
        let Some(body_sent) = body_sent else {
            // No body to send: the clock starts now.
            return tokio::time::timeout(self.response_header_timeout, response).await;
        };
        tokio::select! {
            biased;
            result = &mut response => Ok(result),
            // Resolves when the body ends, fails or is dropped: in every case
            // the app has had the whole request it is going to get.
            _ = body_sent => tokio::time::timeout(self.response_header_timeout, response).await,
        }
    }

    /// The URI sent upstream: the configured authority with the request's
    /// path and query exactly as received. The client's URI never picks the
    /// destination, even in absolute form.
    fn upstream_uri(&self, uri: &Uri) -> Uri {
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    fn error_response(
        &self,
        status: StatusCode,
        text: &'static str,
        rid: HeaderValue,
        summary: RequestSummary,
    ) -> Response<ResponseBody> {
        let mut resp = crate::dockerflow::text(status, text);
        resp.extensions_mut().insert(ProxyFailure(text));
        resp.headers_mut().insert(self.rid_header.clone(), rid);
        resp.map(|b| b.with_summary(summary))
    }
}

/// The client's side of an upgrade: from the sidecar's HTTP/1.1 server, or
/// from hyper's.
enum ClientUpgrade {
    Own(tokio::sync::oneshot::Receiver<crate::server_h1::Upgraded>),
    Hyper(hyper::upgrade::OnUpgrade),
}

impl ClientUpgrade {
    fn of(req: &mut Request<ClientBody>) -> ClientUpgrade {
        let own = req
            .extensions_mut()
            .remove::<crate::server_h1::OnUpgrade>()
            .and_then(|upgrade| upgrade.take());
        match own {
            Some(own) => ClientUpgrade::Own(own),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// The client's connection once switched, and the bytes it sent past
    /// its request head.
    async fn connection(self) -> Result<crate::server_h1::Upgraded, String> {
        match self {
            ClientUpgrade::Own(own) => own
                .await
                .map_err(|_| "the client connection was not handed over".to_owned()),
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(upgraded) => Ok(crate::server_h1::Upgraded {
                    io: Box::new(TokioIo::new(upgraded)),
                    early: bytes::Bytes::new(),
                }),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Copies bytes both ways between the client and the app once both sides
/// have switched protocols; the summary line is written when it ends.
async fn tunnel(
    client: ClientUpgrade,
    upstream: Option<Conn>,
    summary: RequestSummary,
    open: crate::server::GaugeGuard,
) {
    use tokio::io::AsyncWriteExt;
    let _summary = summary;
    let _open = open;
    let Some(upstream) = upstream else {
        return;
    };
    // What the app sent right after its 101 goes to the client first, and
    // what the client sent right after its request to the app.
    let (mut upstream, early) = upstream.into_parts();
    match client.connection().await {
        Ok(client) => {
            let mut client_io = client.io;
            if !early.is_empty() {
                if let Err(e) = client_io.write_all(&early).await {
                    tracing::debug!(error = %e, "tunnel closed with an error");
                    return;
                }
            }
            if !client.early.is_empty() {
                if let Err(e) = upstream.write_all(&client.early).await {
                    tracing::debug!(error = %e, "tunnel closed with an error");
                    return;
                }
            }
            if let Err(e) = tokio::io::copy_bidirectional(&mut client_io, &mut upstream).await {
                tracing::debug!(error = %e, "tunnel closed with an error");
            }
        }
        Err(e) => tracing::warn!(error = %e, "upgrade failed"),
    }
}

/// The protocol a request or 101 response asks to switch to: an `Upgrade`
/// header together with the `upgrade` token in `Connection` (RFC 9110 §7.8).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    connection_tokens(headers)
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
        .then(|| upgrade.clone())
}

/// Every token of every `Connection` header value.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    crate::h1::tokens(headers, &header::CONNECTION)
}

/// Removes hop-by-hop headers and every header named in a `Connection`
/// value (RFC 9110 §7.6.1). `TE: trailers` is kept: it tells the app the
/// client accepts trailers, which the sidecar passes through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one look at each name present is
    // cheaper than hashing all six for removals that find nothing.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    let te_trailers =
        crate::h1::tokens(headers, &header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        // TE is itself hop-by-hop: a sender of TE must list it in Connection
        // (RFC 9110 §10.1.4).
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
    }
}

/// Puts back what an upgrade needs after hop-by-hop stripping.
fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The Host the app sees. The target's authority wins when the request has
/// one: an HTTP/2 `:authority` (RFC 9113 §8.3.1) or an absolute-form target
/// (RFC 9112 §3.2.2). Otherwise the client's Host is kept, and a request with
/// none (HTTP/1.0) gets the upstream's authority, since HTTP/1.1 requires Host.
fn set_host(headers: &mut HeaderMap, target: Option<&Authority>, upstream: &Authority) {
    let value = match target {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None if headers.contains_key(header::HOST) => return,
        None => None,
    };
    let value = value.or_else(|| HeaderValue::from_str(upstream.as_str()).ok());
    if let Some(value) = value {
        headers.insert(header::HOST, value);
    }
}

/// The target as the app gets it: origin form, path and query exactly as
/// received (an absolute-form target loses its scheme and authority, which
/// went to Host).
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.authority().is_none() && uri.scheme().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// `X-Forwarded-Proto`: `https` when the sidecar terminated TLS itself
/// (whatever the client claimed); on plain HTTP a value already present (a
/// load balancer in front) is kept, else `http`.
fn forwarded_proto(headers: &mut HeaderMap, https: bool) {
    if https {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    } else {
        headers
            .entry(X_FORWARDED_PROTO)
            .or_insert(HeaderValue::from_static("http"));
    }
}

/// Appends the peer's address to `X-Forwarded-For`, joining any values
/// already present into one header.
fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    use std::fmt::Write as _;
    let name = X_FORWARDED_FOR;
    if !headers.contains_key(&name) {
        headers.insert(name, peer_ip_value(peer.ip()));
        return;
    }
    // One allocation, handed to the header value as is.
    let mut joined = String::with_capacity(48);
    for value in headers.get_all(&name) {
        if let Ok(v) = value.to_str() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    let _ = write!(joined, "{}", peer.ip().to_canonical());
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(name, value);
    }
}

/// The peer's address as a header value. Formatting an address costs
/// about a thousand instructions (a tenth of the proxy's own work per
/// request), and the peers of a sidecar are few (a load balancer, the
/// kubelet): the last one is kept per thread.
fn peer_ip_value(ip: std::net::IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let ip = ip.to_canonical();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((cached, value)) if *cached == ip => value.clone(),
            _ => {
                let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
                    .expect("an IP address is a valid header value");
                *last = Some((ip, value.clone()));
                value
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_headers_named_in_any_connection_value() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-one, keep-alive"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("X-Two"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-three", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-three"]);
    }

    #[test]
    fn keeps_te_trailers_only() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none());
    }

    #[test]
    fn forwarded_for_joins_existing_values() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        append_forwarded_for(&mut h, "[::ffff:10.0.0.9]:4000".parse().unwrap());
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"
        );
    }

    #[test]
    fn forwarded_for_is_each_peers_own_address() {
        // The per-thread cache of the last address must never answer for
        // another peer.
        for peer in [
            "10.0.0.1:1",
            "10.0.0.2:2",
            "10.0.0.2:3",
            "[::1]:4",
            "[::ffff:10.0.0.1]:5",
        ] {
            let mut h = HeaderMap::new();
            let peer: SocketAddr = peer.parse().unwrap();
            append_forwarded_for(&mut h, peer);
            assert_eq!(
                h.get("x-forwarded-for").unwrap(),
                peer.ip().to_canonical().to_string().as_str()
            );
        }
    }

    #[test]
    fn upgrade_needs_the_connection_token() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&h).is_none());
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
    }
}
