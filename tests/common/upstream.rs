//! A real hyper app for the sidecar to forward to. It answers by path:
//! - `/slow/<ms>`: waits, then 200;
//! - `/status/<code>[/…]`: that status;
//! - `/echo-status/<code>`: that status with the JSON echo of the request
//!   (an error page that shows the request, secrets and all);
//! - `/missing/…`: 404;
//! - `/health`: the status in `Upstream::health`;
//! - `/dockerflow-heartbeat`: a failing python-dockerflow heartbeat body;
//! - `/trailers`: a chunked body with an `x-checksum` trailer;
//! - `/hop`: response headers a proxy must strip;
//! - `/upgrade`: 101 to protocol `echo`, then echoes bytes back;
//! - `/bogus-101`: 101 whatever the request asked;
//! - `/csp-page`, `/csp-page-report-to`: HTML whose CSP the page itself violates;
//! - `/count`: reads the body and answers `{"bytes": n}`;
//! - `/download/<n>`: streams n bytes, rounded down to whole 64 KiB chunks;
//! - anything else: a JSON echo of the request as received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, Infallible>;

/// A running upstream; it stops with the test process.
pub struct Upstream {
    /// Where it listens (TCP only).
    pub addr: Option<SocketAddr>,
    /// Requests it has received.
    pub hits: Arc<AtomicUsize>,
    /// Connections it has accepted (TCP only).
    pub accepted: Arc<AtomicUsize>,
    /// The status `/health` answers (200 at first).
    pub health: Arc<AtomicU16>,
}

impl Upstream {
    /// Starts on a free TCP port.
    pub fn start() -> Upstream {
        Upstream::start_tcp(None)
    }

    /// Starts on a free TCP port speaking TLS with `config` (HTTP/1.1).
    pub fn start_tls(config: rustls::ServerConfig) -> Upstream {
        Upstream::start_tcp(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn start_tcp(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(AtomicU16::new(200));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (counter, status, connections) = (hits.clone(), health.clone(), accepted.clone());
        super::in_background(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (counter, status) = (counter.clone(), status.clone());
                match &tls {
                    None => serve(TokioIo::new(stream), counter, status),
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve(TokioIo::new(tls), counter, status);
                            }
                        });
                    }
                }
            }
        });
        Upstream {
            addr: Some(addr),
            hits,
            accepted,
            health,
        }
    }

    /// Starts on a Unix socket at `path`.
    pub fn start_unix(path: &Path) -> Upstream {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(AtomicU16::new(200));
        let (counter, status) = (hits.clone(), health.clone());
        super::in_background(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                serve(TokioIo::new(stream), counter.clone(), status.clone());
            }
        });
        Upstream {
            addr: None,
            hits,
            accepted: Arc::new(AtomicUsize::new(0)),
            health,
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (TCP only).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Sets the status `/health` answers.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// Waits (with the harness deadline) until `n` requests have arrived.
    pub async fn wait_for_hits(&self, n: usize) {
        let end = std::time::Instant::now() + super::DEADLINE;
        while self.hits() < n {
            assert!(
                std::time::Instant::now() < end,
                "the app saw {} of {n} requests",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn serve<I>(io: TokioIo<I>, hits: Arc<AtomicUsize>, health: Arc<AtomicU16>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            hits.fetch_add(1, Ordering::SeqCst);
            handle(req, health.load(Ordering::SeqCst))
        });
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(io, service)
            .await;
    });
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp
}

fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn handle(mut req: Request<Incoming>, health: u16) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let resp = match segments.as_slice() {
        ["", "slow", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            full(StatusCode::OK, "slow done")
        }
        ["", "health"] => full(StatusCode::from_u16(health).unwrap(), "health"),
        ["", "dockerflow-heartbeat"] => {
            // What a python-dockerflow app answers with a failing database
            // and pending migrations.
            let body = json!({
                "status": "error",
                "checks": {"database": "error", "migrations": "warning", "redis": "ok"},
                "details": {
                    "database": {"status": "error", "level": 40,
                                 "messages": {"dockerflow.health.E001": "Could not connect to database"}},
                    "migrations": {"status": "warning", "level": 30,
                                   "messages": {"dockerflow.health.W001": "Unapplied migrations found"}}
                }
            });
            full(StatusCode::INTERNAL_SERVER_ERROR, body.to_string())
        }
        ["", "echo-status", code] => {
            let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            let echo = json!({
                "uri": req.uri().to_string(),
                "headers": pairs(req.headers()),
            });
            full(code, echo.to_string())
        }
        ["", "missing", ..] => full(StatusCode::NOT_FOUND, "not found"),
        ["", "status", code, ..] => {
            let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            full(code, format!("status {}", code.as_u16()))
        }
        ["", "trailers"] => {
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello "))),
                Ok(Frame::data(Bytes::from_static(b"world"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("x-checksum", "abc123".parse().unwrap());
                    t
                })),
            ];
            let mut resp =
                Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            resp.headers_mut()
                .insert("trailer", "x-checksum".parse().unwrap());
            resp
        }
        ["", "hop"] => {
            let mut resp = full(StatusCode::OK, "hop");
            let h = resp.headers_mut();
            h.insert("connection", "x-upstream-hop".parse().unwrap());
            h.insert("x-upstream-hop", "secret".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-kept", "yes".parse().unwrap());
            resp
        }
        ["", "upgrade"] if req.headers().contains_key("upgrade") => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let mut reply = b"echo:".to_vec();
                                reply.extend_from_slice(&buf[..n]);
                                if io.write_all(&reply).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            resp.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            resp.headers_mut()
                .insert("upgrade", "echo".parse().unwrap());
            resp
        }
        ["", "csp-page"] => {
            // Inline script, inline style, a style attribute and an image:
            // four violations of this policy, reported to /__cspreport__.
            let html = "<!doctype html><html><head><title>csp</title>\
                <style>body { color: red }</style>\
                <script>document.title = 'ran';</script></head>\
                <body><img src=\"/blocked.png\"><p style=\"color: blue\">hello</p></body></html>";
            let mut resp = full(StatusCode::OK, html);
            resp.headers_mut()
                .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            resp.headers_mut().insert(
                "content-security-policy",
                "default-src 'none'; img-src 'none'; script-src 'self'; style-src 'self'; report-uri /__cspreport__"
                    .parse()
                    .unwrap(),
            );
            resp
        }
        ["", "csp-page-report-to"] => {
            let html = "<!doctype html><html><head><title>csp</title></head>\
                <body><img src=\"/blocked.png\"></body></html>";
            let mut resp = full(StatusCode::OK, html);
            resp.headers_mut()
                .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            resp.headers_mut().insert(
                "reporting-endpoints",
                "csp=\"/__cspreport__\"".parse().unwrap(),
            );
            resp.headers_mut().insert(
                "content-security-policy",
                "default-src 'none'; img-src 'none'; report-to csp"
                    .parse()
                    .unwrap(),
            );
            resp
        }
        ["", "bogus-101"] => {
            let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            resp.headers_mut()
                .insert("upgrade", "echo".parse().unwrap());
            resp
        }
        ["", "count"] => {
            let mut body = req.into_body();
            let mut bytes = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    bytes += data.len() as u64;
                }
            }
            full(StatusCode::OK, json!({ "bytes": bytes }).to_string())
        }
        ["", "download", n] => {
            let total: u64 = n.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let count = total / chunk.len() as u64;
            let stream = futures_util::stream::iter(
                (0..count).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
            );
            Response::new(StreamBody::new(stream).boxed())
        }
        _ => {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let headers = pairs(req.headers());
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected.trailers().map(pairs).unwrap_or_default();
            let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
            let echo = json!({
                "method": method, "uri": uri, "version": version,
                "headers": headers, "body": body, "trailers": trailers,
            });
            full(StatusCode::OK, echo.to_string())
        }
    };
    Ok(resp)
}
