//! The pooled HTTP/1 client to the app, over TCP or a Unix socket.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamConfig, UpstreamUrl};

/// The client type every upstream request goes through.
pub type UpstreamClient<B> = Client<UpstreamConnector, B>;

/// Builds a pooled client for the configured upstream.
pub fn client<B>(
    config: &UpstreamConfig,
    open: prometheus::IntGauge,
) -> Result<UpstreamClient<B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let connector = UpstreamConnector::new(config, open)?;
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle)
        // Host is the client's, carried through by the proxy; never rewrite it.
        .set_host(false)
        .build(connector))
}

/// A gauge no registry exports, for clients whose connections are not
/// the proxy's (the heartbeat's upstream check).
pub fn uncounted() -> prometheus::IntGauge {
    prometheus::IntGauge::new("uncounted", "not exported").expect("valid gauge")
}

/// The authority used in request URIs sent through the client. For a Unix
/// socket it only keys the pool; the connector ignores it.
pub fn authority(url: &UpstreamUrl) -> http::uri::Authority {
    match url {
        UpstreamUrl::Http { authority } | UpstreamUrl::Https { authority } => authority.clone(),
        UpstreamUrl::Unix { .. } => http::uri::Authority::from_static("upstream.sock"),
    }
}

/// Opens connections to the one configured upstream, whatever the URI says.
#[derive(Clone)]
pub struct UpstreamConnector {
    target: Target,
    connect_timeout: Duration,
    /// Connections open now (the pool's size, in use or idle).
    open: prometheus::IntGauge,
}

#[derive(Clone)]
enum Target {
    Tcp(Arc<str>),
    /// TLS over TCP to `addr`, verifying the certificate for `name`.
    Tls {
        addr: Arc<str>,
        name: ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
    },
    Unix(Arc<PathBuf>),
}

impl UpstreamConnector {
    /// The connector for `config.url`; `open` counts its open connections.
    pub fn new(config: &UpstreamConfig, open: prometheus::IntGauge) -> Result<Self, String> {
        let target = match &config.url {
            UpstreamUrl::Http { authority } => Target::Tcp(Arc::from(authority.as_str())),
            UpstreamUrl::Https { authority } => {
                let mut tls = crate::tls::client_config(config.ca_file.as_deref())
                    .map_err(|e| format!("upstream.ca_file: {e}"))?;
                // The pool speaks HTTP/1.1 to the app.
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("upstream.url: `{host}` is not a TLS server name: {e}"))?;
                Target::Tls {
                    addr: Arc::from(authority.as_str()),
                    name,
                    connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                }
            }
            UpstreamUrl::Unix { path } => Target::Unix(Arc::new(path.clone())),
        };
        Ok(UpstreamConnector {
            target,
            connect_timeout: config.connect_timeout,
            open,
        })
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.connect())
    }
}

impl UpstreamConnector {
    /// Opens a new connection to the upstream, within the connect timeout.
    pub fn connect(
        &self,
    ) -> impl Future<Output = io::Result<TokioIo<UpstreamStream>>> + Send + 'static {
        let target = self.target.clone();
        let limit = self.connect_timeout;
        let open = self.open.clone();
        async move {
            let connect = async {
                match &target {
                    Target::Tcp(addr) => {
                        let stream = TcpStream::connect(&**addr).await?;
                        stream.set_nodelay(true)?;
                        Ok(Stream::Tcp(stream))
                    }
                    Target::Tls {
                        addr,
                        name,
                        connector,
                    } => {
                        let stream = TcpStream::connect(&**addr).await?;
                        stream.set_nodelay(true)?;
                        let tls = connector.connect(name.clone(), stream).await?;
                        Ok(Stream::Tls(Box::new(tls)))
                    }
                    Target::Unix(path) => Ok(Stream::Unix(UnixStream::connect(&**path).await?)),
                }
            };
            match tokio::time::timeout(limit, connect).await {
                Ok(result) => result.map(|inner| {
                    TokioIo::new(UpstreamStream {
                        inner,
                        _open: crate::server::GaugeGuard::new(&open),
                    })
                }),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect timed out after {}",
                        humantime::format_duration(limit)
                    ),
                )),
            }
        }
    }
}

/// A connection to the upstream, counted while open.
pub struct UpstreamStream {
    inner: Stream,
    _open: crate::server::GaugeGuard,
}

impl UpstreamStream {
    /// Whether an idle connection is still open and the app has sent
    /// nothing on it: a read that would block. Costs no system call unless
    /// the socket was reported readable.
    pub fn is_open_and_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let would_block =
            |r: io::Result<usize>| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        match &mut self.inner {
            Stream::Tcp(s) => would_block(s.try_read(&mut probe)),
            Stream::Unix(s) => would_block(s.try_read(&mut probe)),
            Stream::Tls(s) => {
                // TLS records (a session ticket) may arrive on a live
                // connection: only plaintext or the end of it counts. With
                // the task's budget spent the read would say nothing.
                if !tokio::task::coop::has_budget_remaining() {
                    return true;
                }
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(s.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }
}

/// The transport of an upstream connection.
pub enum Stream {
    /// TCP, with TCP_NODELAY.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A Unix domain socket.
    Unix(UnixStream),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
