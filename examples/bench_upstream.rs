//! A bare HTTP/1.1 upstream for `bench/run.sh`: every request gets a 200 with
//! a 1 KiB body (Content-Length set) on a keep-alive connection.
//!
//! Usage: `bench_upstream [ADDR]` (default `127.0.0.1:0`). The bound address
//! is printed as the first line of stdout so the caller can read the port.
//! The worker thread count can be set with `BENCH_UPSTREAM_THREADS`
//! (default: all CPUs).

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http_body_util::Full;
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
            let service = service_fn(move |_req: Request<Incoming>| {
                let mut resp = Response::new(Full::new(body.clone()));
                let headers = resp.headers_mut();
                headers.insert(CONTENT_LENGTH, HeaderValue::from(BODY_LEN));
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
