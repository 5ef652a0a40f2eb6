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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamConfig, UpstreamUrl};

/// The client type every upstream request goes through.
pub type UpstreamClient<B> = Client<UpstreamConnector, B>;

/// Builds a pooled client for the configured upstream.
pub fn client<B>(config: &UpstreamConfig) -> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle)
        // Host is the client's, carried through by the proxy; never rewrite it.
        .set_host(false)
        .build(UpstreamConnector::new(config))
}

/// The authority used in request URIs sent through the client. For a Unix
/// socket it only keys the pool; the connector ignores it.
pub fn authority(url: &UpstreamUrl) -> http::uri::Authority {
    match url {
        UpstreamUrl::Http { authority } => authority.clone(),
        UpstreamUrl::Unix { .. } => http::uri::Authority::from_static("upstream.sock"),
    }
}

/// Opens connections to the one configured upstream, whatever the URI says.
#[derive(Clone)]
pub struct UpstreamConnector {
    target: Target,
    connect_timeout: Duration,
}

#[derive(Clone)]
enum Target {
    Tcp(Arc<str>),
    Unix(Arc<PathBuf>),
}

impl UpstreamConnector {
    fn new(config: &UpstreamConfig) -> Self {
        let target = match &config.url {
            UpstreamUrl::Http { authority } => Target::Tcp(Arc::from(authority.as_str())),
            UpstreamUrl::Unix { path } => Target::Unix(Arc::new(path.clone())),
        };
        UpstreamConnector {
            target,
            connect_timeout: config.connect_timeout,
        }
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
        let target = self.target.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let connect = async {
                match &target {
                    Target::Tcp(addr) => {
                        let stream = TcpStream::connect(&**addr).await?;
                        stream.set_nodelay(true)?;
                        Ok(UpstreamStream::Tcp(stream))
                    }
                    Target::Unix(path) => {
                        Ok(UpstreamStream::Unix(UnixStream::connect(&**path).await?))
                    }
                }
            };
            match tokio::time::timeout(limit, connect).await {
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect timed out after {}",
                        humantime::format_duration(limit)
                    ),
                )),
            }
        })
    }
}

/// A connection to the upstream.
pub enum UpstreamStream {
    /// TCP, with TCP_NODELAY.
    Tcp(TcpStream),
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
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
