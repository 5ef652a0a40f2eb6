//! A real webhook receiver: records every request and answers by path:
//! - `/ok`: 200;
//! - `/fail/<n>`: 500 for the first n requests, then 200;
//! - `/retry-after`: 503 with `Retry-After: 1` the first time, then 200;
//! - `/gone`: 410;
//! - `/redirect`: 302 to `/ok`;
//! - `/slow`: never answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: String,
    /// When.
    pub at: Instant,
}

/// The receiver; runs until the test process ends.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Starts on a free port.
    pub fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        super::in_background(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, log.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, received }
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (with the harness deadline) until `n` requests to `path` arrived.
    pub fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let end = Instant::now() + super::DEADLINE;
        loop {
            let got: Vec<Received> = self.all().into_iter().filter(|r| r.path == path).collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < end,
                "{} of {n} requests to {path}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().to_string();
    let headers = req.headers().clone();
    let body = String::from_utf8_lossy(
        &req.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
    )
    .into_owned();
    let seen = {
        let mut log = log.lock().unwrap();
        log.push(Received {
            method,
            path: path.clone(),
            headers,
            body,
            at: Instant::now(),
        });
        log.iter().filter(|r| r.path == path).count()
    };
    let respond = |status: StatusCode| {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = status;
        resp
    };
    let segments: Vec<&str> = path.split('/').collect();
    let resp = match segments.as_slice() {
        ["", "fail", n] if seen <= n.parse().unwrap_or(0) => {
            respond(StatusCode::INTERNAL_SERVER_ERROR)
        }
        ["", "retry-after"] if seen == 1 => {
            let mut resp = respond(StatusCode::SERVICE_UNAVAILABLE);
            resp.headers_mut()
                .insert("retry-after", "1".parse().unwrap());
            resp
        }
        ["", "gone"] => respond(StatusCode::GONE),
        ["", "redirect"] => {
            let mut resp = respond(StatusCode::FOUND);
            resp.headers_mut()
                .insert("location", "/ok".parse().unwrap());
            resp
        }
        ["", "slow"] => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            respond(StatusCode::OK)
        }
        _ => respond(StatusCode::OK),
    };
    Ok(resp)
}
