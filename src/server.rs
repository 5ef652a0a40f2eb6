//! The public listener: accept loop, one task per connection (HTTP/1.1 by
//! `server_h1`, HTTP/2 by hyper, upgrades allowed), and the drain sequence.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};

use crate::server_h1;
use crate::App;

/// Binds `addr` for `workers` workers: one listening socket each, all bound
/// to the same address with `SO_REUSEPORT`, so the kernel spreads new
/// connections between them (by a hash of the client's address and port),
/// as nginx's `reuseport` and Envoy's listeners do. No worker ever wakes for
/// a connection another takes.
///
/// `SO_REUSEPORT` would let another process of the same user listen on the
/// same address too and take a share of the connections, silently; so the
/// address is first bound without it, which fails like any bind when
/// something already listens there.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let socket = |reuse_port: bool| -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // As std and tokio bind: a restart finds its port's connections in
        // TIME_WAIT, which would otherwise refuse the bind.
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(reuse_port)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    };
    let listen = |socket: Socket, addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    if workers <= 1 {
        return Ok(vec![listen(socket(false)?, addr)?]);
    }
    // The probe: bound (never listening), so port 0 resolves to the port
    // every worker then binds.
    let probe = socket(false)?;
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the bound address is not an IP address"))?;
    drop(probe);
    (0..workers).map(|_| listen(socket(true)?, addr)).collect()
}

/// Serves `listener` until `signal` resolves, then drains: health routes
/// fail while traffic is still served for `shutdown.drain`, the listener
/// closes, and connections and tunnels get `shutdown.grace` to finish.
///
/// `others` are the other workers (src/main.rs): each accepts on its own
/// socket (see [`bind`]) and serves what it accepted on its own runtime.
/// The drain closes theirs first, then this one.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
    others: Vec<(tokio::runtime::Handle, std::net::TcpListener)>,
) {
    tokio::pin!(signal);

    let close = tokio_util::sync::CancellationToken::new();
    let others: Vec<_> = others
        .into_iter()
        .map(|(worker, socket)| {
            let (app, close) = (app.clone(), close.clone());
            worker.spawn(async move {
                let listener = match TcpListener::from_std(socket) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "a worker cannot listen: it serves nothing");
                        return;
                    }
                };
                accept_until(&app, &listener, close.cancelled()).await;
                take_completed(&app, &listener);
            })
        })
        .collect();

    accept_until(&app, &listener, &mut signal).await;

    // A `POST /drain` (a preStop hook) may have started the drain already:
    // only what is left of it is waited for.
    let drain = app
        .config
        .shutdown
        .drain
        .saturating_sub(app.shutdown.draining_for());
    app.shutdown.start_draining();
    tracing::info!(drain = %humantime::format_duration(drain), "draining: health routes answer 503, traffic still served");
    accept_until(&app, &listener, tokio::time::sleep(drain)).await;

    // The other workers' sockets close first: the kernel then sends what
    // comes to this one, which closes last.
    close.cancel();
    for other in others {
        let _ = other.await;
    }
    take_completed(&app, &listener);
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

/// Connections the kernel has already completed would be reset with the
/// listener: take them, so their first request is served.
fn take_completed(app: &Arc<App>, listener: &TcpListener) {
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        spawn_connection(app.clone(), stream, peer);
    }
}

/// Accepts connections until `until` resolves.
async fn accept_until(app: &Arc<App>, listener: &TcpListener, until: impl Future<Output = ()>) {
    tokio::pin!(until);
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    spawn_connection(app.clone(), stream, peer);
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

/// Serves one connection; on stop it finishes the in-flight request and closes.
fn spawn_connection(app: Arc<App>, stream: TcpStream, peer: SocketAddr) {
    let tracker = app.shutdown.tracker().clone();
    tracker.spawn(connection(app, stream, peer));
}

/// A connection's task. Its allocation is the size of this future, in every
/// state, for as long as the connection is open (idle keep-alive included).
fn connection(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let accepted = tokio::time::Instant::now();
    async move {
        let _open = GaugeGuard::new(&app.metrics.open_connections);
        let _ = stream.set_nodelay(true);
        match app.tls.as_ref().map(|(_, acceptor)| acceptor.clone()) {
            None => server_h1::serve(app, stream, peer, false, accepted).await,
            // Boxed: the handshake and the TLS session are state that every
            // plain connection's task would otherwise be sized for too.
            Some(acceptor) => Box::pin(serve_tls(app, stream, peer, accepted, acceptor)).await,
        }
    }
}

/// A TLS connection: the handshake, then the same server as plain HTTP.
async fn serve_tls(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: tokio::time::Instant,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    // Bounded like the request head: a client that never finishes its
    // handshake does not hold the connection.
    let limit = app.config.server.idle_timeout;
    let handshake = tokio::select! {
        done = tokio::time::timeout(limit, acceptor.accept(stream)) => done,
        _ = app.shutdown.stopped() => return,
    };
    match handshake {
        Ok(Ok(tls)) => server_h1::serve(app, tls, peer, true, accepted).await,
        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What every open connection holds: the HTTP/1.1 server's state, not
    /// HTTP/2's or the TLS handshake's (boxed, for the connections that use
    /// them; inline, they made it 12,360 bytes, BENCHMARKS.md), nor the
    /// request's (boxed while a request is served; inline, 6,176 bytes in a
    /// debug build, and idle keep-alive connections held it too).
    #[tokio::test]
    async fn a_plain_connection_task_is_sized_for_http1_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::default();
        config.admin.enabled = false;
        config.state.path = dir.path().join("state.db");
        let logger = Arc::new(crate::mozlog::Logger::new(
            "test".into(),
            config.logging.format,
            crate::mozlog::Sink::new(Box::new(std::io::sink())).unwrap(),
        ));
        let app = Arc::new(App::new(config, logger).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = connection(app, stream, peer);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2 * 1024, "a connection's task is {size} bytes");
    }
}
