//! A bare HTTP/1.1 upstream for `bench/`: every request gets a 200 with a
//! 1 KiB body (Content-Length set) on a keep-alive connection, except
//! - `POST /upload`: reads the body to its end, answers `{"bytes":n}`;
//! - `GET /download/<n>`: n bytes (Content-Length set), in 64 KiB chunks.
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
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
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
                .await;
        });
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn respond(req: Request<Incoming>, small: Bytes) -> Response<Body> {
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
