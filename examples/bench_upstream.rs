//! A bare HTTP/1.1 upstream for `bench/`: every request gets a 200 with a
//! 1 KiB body (Content-Length set) on a keep-alive connection, except
//! - `POST /upload`: reads the body to its end, answers `{"bytes":n}`;
//! - `GET /download/<n>`: n bytes (Content-Length set), in 64 KiB chunks;
//! - `GET /ws` with `Connection: Upgrade` and an `Upgrade` header (e.g.
//!   `websocket`): 101 with the same `Upgrade`, then every byte read from the
//!   tunnel is written back unchanged until the client closes its side (a
//!   WebSocket-style upgrade without WebSocket framing: the sidecar only
//!   tunnels bytes). Used by `examples/mixed_load.rs`.
//!
//! Usage: `bench_upstream [ADDR]` (default `127.0.0.1:0`). The bound address
//! is printed as the first line of stdout so the caller can read the port.
//! The worker thread count can be set with `BENCH_UPSTREAM_THREADS`
//! (default: all CPUs).

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BODY_LEN: usize = 1024;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = std::env::var("BENCH_UPSTREAM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        runtime.worker_threads(n);
    }
    runtime.build()?.block_on(serve(addr))
}

async fn serve(addr: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&addr).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_addr()?)?;
        out.flush()?;
    }
    let body = Bytes::from(vec![b'x'; BODY_LEN]);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // EMFILE and friends: keep serving the connections we have.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(respond(req, body).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn respond(mut req: Request<Incoming>, small: Bytes) -> Response<Body> {
    if req.uri().path() == "/ws" {
        if let Some(protocol) = req.headers().get(UPGRADE).cloned() {
            return echo_tunnel(&mut req, protocol);
        }
    }
    let path = req.uri().path();
    if path == "/upload" {
        let mut body = req.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        let text = format!("{{\"bytes\":{bytes}}}");
        return Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    }
    if let Some(n) = path
        .strip_prefix("/download/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        const CHUNK: u64 = 64 * 1024;
        let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
        let chunks = (0..n.div_ceil(CHUNK)).map(move |i| {
            let len = (n - i * CHUNK).min(CHUNK) as usize;
            Ok(hyper::body::Frame::data(chunk.slice(..len)))
        });
        let stream = StreamBody::new(futures_util::stream::iter(chunks));
        let mut resp = Response::new(BodyExt::boxed(stream));
        resp.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(n));
        return resp;
    }
    let mut resp = Response::new(Full::new(small).map_err(|e| match e {}).boxed());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(BODY_LEN));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Switches protocols and echoes the tunnel's bytes back until EOF.
fn echo_tunnel(req: &mut Request<Incoming>, protocol: HeaderValue) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut().insert(UPGRADE, protocol);
    resp
}
