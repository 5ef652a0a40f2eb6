//! The admin listener, never proxied: `/metrics` (Prometheus),
//! `/__heartbeat__` with full details, `/ready` (for a readiness probe) and
//! `POST /drain` (for a preStop hook), optionally behind a bearer token.
//!
//! Without a token, the routes that reveal or change something (the full
//! heartbeat, `POST /drain`) answer only clients on the loopback interface
//! (a preStop hook runs in the pod); `/metrics` and `/ready` answer anyone.
//! With a token, every route but `/ready` needs it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::ResponseBody;
use crate::checks::Level;
use crate::config::{CheckKind, HeartbeatDetails};
use crate::App;

/// Binds `admin.listen` (when enabled) and serves it in the background
/// until the process ends; returns the bound address.
pub async fn start(app: &Arc<App>) -> std::io::Result<Option<SocketAddr>> {
    let config = &app.config.admin;
    if !config.enabled {
        return Ok(None);
    }
    let token = config.token().map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {} (admin.listen): {e}", config.listen),
        )
    })?;
    let addr = listener.local_addr()?;
    let app = app.clone();
    let token: Option<Arc<str>> = token.map(Arc::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(5);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    // Out of descriptors: wait for some to free up, not spin.
                    tracing::error!(error = %e, "admin accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let (app, token, builder) = (app.clone(), token.clone(), builder.clone());
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let local = peer.ip().to_canonical().is_loopback();
                let service = service_fn(move |req| handle(app.clone(), token.clone(), local, req));
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Some(addr))
}

/// Longest a client may take to send an admin request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

async fn handle(
    app: Arc<App>,
    token: Option<Arc<str>>,
    local: bool,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let path = req.uri().path();
    let guarded = path == "/drain" || path == "/__heartbeat__";
    if token.is_none() && guarded && !local {
        return Ok(text(
            StatusCode::FORBIDDEN,
            "without admin.token this route answers only the loopback interface",
        ));
    }
    // `/ready` reveals and changes nothing, and the kubelet's probe cannot
    // read a secret: it never needs the token.
    if let (Some(token), false) = (&token, path == "/ready") {
        if !authorized(req.headers().get(header::AUTHORIZATION), token) {
            let mut resp = text(StatusCode::UNAUTHORIZED, "a bearer token is required");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dockerflow-sidecar admin\""),
            );
            return Ok(resp);
        }
    }
    let resp = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            app.hooks.update_metrics().await;
            app.metrics
                .log_lines_dropped
                .inc_by(app.logger.take_dropped());
            let mut resp = Response::new(ResponseBody::full(app.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/__heartbeat__") => {
            app.heartbeat
                .respond_with(false, HeartbeatDetails::Full)
                .await
        }
        (&Method::GET | &Method::HEAD, "/ready") => ready(&app).await,
        (&Method::POST, "/drain") => {
            let already = app.shutdown.is_draining();
            app.shutdown.start_draining();
            if !already {
                tracing::info!("draining on request (POST /drain): health routes answer 503, traffic still served");
            }
            crate::dockerflow::json(
                StatusCode::ACCEPTED,
                json!({"status": "draining"}).to_string().into_bytes(),
            )
        }
        (_, "/metrics" | "/__heartbeat__" | "/ready" | "/drain") => {
            let allow = if path == "/drain" {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not an admin route"),
    };
    Ok(resp)
}

/// 200 while serving and every `upstream` check passes; 503 while draining
/// or when the app does not answer its check.
async fn ready(app: &App) -> Response<ResponseBody> {
    if app.shutdown.is_draining() {
        return crate::dockerflow::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}).to_string().into_bytes(),
        );
    }
    let upstream_checks: Vec<&str> = app
        .config
        .heartbeat
        .checks
        .iter()
        .filter(|c| c.kind == CheckKind::Upstream)
        .map(|c| c.name.as_str())
        .collect();
    if upstream_checks.is_empty() {
        return crate::dockerflow::json(
            StatusCode::OK,
            json!({"status": "ready"}).to_string().into_bytes(),
        );
    }
    let report = app.heartbeat.report().await;
    let failing: Vec<&str> = report
        .results()
        .iter()
        .filter(|r| upstream_checks.contains(&r.name.as_str()) && r.level() >= Level::ERROR)
        .map(|r| r.name.as_str())
        .collect();
    if failing.is_empty() {
        crate::dockerflow::json(
            StatusCode::OK,
            json!({"status": "ready"}).to_string().into_bytes(),
        )
    } else {
        crate::dockerflow::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "upstream failing", "checks": failing})
                .to_string()
                .into_bytes(),
        )
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(value: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    crate::dockerflow::text(status, body)
}
