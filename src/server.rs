//! The public listener: accept loop, one task per connection (HTTP/1.1 and
//! h2c with prior knowledge, upgrades allowed), and the drain sequence.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::mozlog::RequestSummary;
use crate::router;
use crate::App;

/// Serves `listener` until `signal` resolves, then drains: health routes
/// fail while traffic is still served for `shutdown.drain`, the listener
/// closes, and connections and tunnels get `shutdown.grace` to finish.
pub async fn serve(app: Arc<App>, listener: TcpListener, signal: impl Future<Output = ()>) {
    let builder = Arc::new(connection_builder(&app));
    tokio::pin!(signal);

    accept_until(&app, &listener, &builder, &mut signal).await;

    // A `POST /drain` (a preStop hook) may have started the drain already:
    // only what is left of it is waited for.
    let drain = app
        .config
        .shutdown
        .drain
        .saturating_sub(app.shutdown.draining_for());
    app.shutdown.start_draining();
    tracing::info!(drain = %humantime::format_duration(drain), "draining: health routes answer 503, traffic still served");
    accept_until(&app, &listener, &builder, tokio::time::sleep(drain)).await;

    // Connections the kernel has already completed would be reset with the
    // listener: take them, so their first request is served.
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        spawn_connection(app.clone(), builder.clone(), stream, peer);
    }
    drop(listener);
    app.shutdown.stop();
    let tracker = app.shutdown.tracker();
    tracker.close();
    let grace = app.config.shutdown.grace;
    tracing::info!(
        in_flight = tracker.len() as u64,
        grace = %humantime::format_duration(grace),
        "listener closed: waiting for in-flight requests and tunnels"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            abandoned = tracker.len() as u64,
            "grace period over: closing what is still open"
        );
    } else {
        tracing::info!("all connections finished");
    }
}

/// Accepts connections until `until` resolves.
async fn accept_until(
    app: &Arc<App>,
    listener: &TcpListener,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    spawn_connection(app.clone(), builder.clone(), stream, peer);
                }
                Err(e) => {
                    // Usually EMFILE/ENFILE: wait for descriptors to free up
                    // instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
}

fn connection_builder(app: &App) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.server.idle_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves one connection; on stop it finishes the in-flight request and closes.
fn spawn_connection(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let tracker = app.shutdown.tracker().clone();
    let accepted = tokio::time::Instant::now();
    tracker.spawn(async move {
        let _open = GaugeGuard::new(&app.metrics.open_connections);
        let _ = stream.set_nodelay(true);
        match app.tls.as_ref().map(|(_, acceptor)| acceptor.clone()) {
            None => serve_io(app, builder, TokioIo::new(stream), peer, false, accepted).await,
            Some(acceptor) => {
                // Bounded like the request head: a client that never
                // finishes its handshake does not hold the connection.
                let limit = app.config.server.idle_timeout;
                let handshake = tokio::select! {
                    done = tokio::time::timeout(limit, acceptor.accept(stream)) => done,
                    _ = app.shutdown.stopped() => return,
                };
                match handshake {
                    Ok(Ok(tls)) => {
                        serve_io(app, builder, TokioIo::new(tls), peer, true, accepted).await
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                }
            }
        }
    });
}

/// How long a connection accepted just before the stop may take to send
/// its first request: hyper's graceful shutdown would otherwise close it
/// unread (it looks idle), failing a request the client has already sent.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection's requests (plain or TLS) until it ends or, on
/// stop, until its in-flight request is done; a connection younger than
/// `FIRST_REQUEST_GRACE` is given the rest of it first.
async fn serve_io<I>(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: TokioIo<I>,
    peer: SocketAddr,
    https: bool,
    accepted: tokio::time::Instant,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service_app = app.clone();
    let service = service_fn(move |req| router::handle(service_app.clone(), peer, https, req));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = app.shutdown.stopped() => {
            // While draining, every HTTP/1 response closes its connection,
            // so a young one usually ends by itself once it is answered.
            match tokio::time::timeout_at(accepted + FIRST_REQUEST_GRACE, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        log_connection_error(&app, peer, &*e);
    }
}

/// Holds a gauge one higher while it lives.
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    /// Increments `gauge` until dropped.
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection error that hyper answered itself (a request it could not
/// parse gets 400, or 431 for oversized headers) still gets its
/// request.summary line; anything else is a debug message.
fn log_connection_error(app: &App, peer: SocketAddr, error: &(dyn std::error::Error + 'static)) {
    match error.downcast_ref::<hyper::Error>() {
        Some(e) if e.is_parse() || e.is_parse_too_large() => {
            let code = if e.is_parse_too_large() { 431 } else { 400 };
            drop(RequestSummary::unparsed(
                app.logger.clone(),
                app.metrics.clone(),
                code,
                format!("malformed request from {peer}: {e}"),
            ));
        }
        _ => tracing::debug!(peer = %peer, error = %error, "connection ended with an error"),
    }
}
