//! The body of every response the sidecar sends: a streamed upstream body or
//! a small local one, carrying the request's summary line until it ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error_reports::Capture;
use crate::h1::UpstreamBody;
use crate::mozlog::RequestSummary;

/// A request body as a client sent it: read by the sidecar's own HTTP/1.1
/// server, or by hyper's HTTP/2 server.
pub enum ClientBody {
    H1(crate::server_h1::H1Body),
    Hyper(Incoming),
}

impl ClientBody {
    /// A body read from an HTTP/1.1 connection.
    pub fn h1(body: crate::server_h1::H1Body) -> ClientBody {
        ClientBody::H1(body)
    }

    /// A body hyper reads (HTTP/2).
    pub fn hyper(body: Incoming) -> ClientBody {
        ClientBody::Hyper(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::H1(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(|e| e.into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// A request body on its way to the app that says when it has been sent in
/// full (the response-header timeout only starts then, so a slow upload is
/// not mistaken for a slow app), and that fails when the client pauses
/// longer than the stall limit between two reads (a slow-body attack holds
/// no connection to the app for longer than that).
pub struct RequestBody {
    inner: ClientBody,
    /// Counts the bytes received.
    received: prometheus::IntCounter,
    /// Fired (or dropped) when the body ends; `None` once done.
    sent: Option<tokio::sync::oneshot::Sender<()>>,
    /// Fires when the client has sent nothing for `limit`; reset by each
    /// frame. `None` for an empty body.
    stall: Option<Stall>,
}

struct Stall {
    timer: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

/// The client paused longer than the limit in the middle of a request body.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent no request body bytes for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyStalled {}

impl RequestBody {
    /// Wraps `inner`, failing it when the client pauses longer than `stall`;
    /// the returned receiver resolves when it has been sent (or abandoned);
    /// there is none for a body that is already empty.
    pub fn new(
        inner: ClientBody,
        received: prometheus::IntCounter,
        stall: Duration,
    ) -> (RequestBody, Option<tokio::sync::oneshot::Receiver<()>>) {
        if inner.is_end_stream() {
            let body = RequestBody {
                inner,
                received,
                sent: None,
                stall: None,
            };
            return (body, None);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = RequestBody {
            inner,
            received,
            sent: Some(tx),
            stall: Some(Stall {
                timer: Box::pin(tokio::time::sleep(stall)),
                limit: stall,
            }),
        };
        (body, Some(rx))
    }

    fn done(&mut self) {
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
        self.stall = None;
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if let Some(stall) = this.stall.as_mut() {
                    if stall.timer.as_mut().poll(cx).is_ready() {
                        let limit = stall.limit;
                        this.done();
                        return Poll::Ready(Some(Err(Box::new(BodyStalled(limit)))));
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received.inc_by(data.len() as u64);
                }
                if this.inner.is_end_stream() {
                    this.done();
                } else if let Some(stall) = this.stall.as_mut() {
                    let deadline = tokio::time::Instant::now() + stall.limit;
                    stall.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body. Dropping it (when the response is fully sent, or the
/// client went away) writes the request.summary line. One pointer: a
/// response moves by value through every layer of the request path, and
/// at 296 bytes each move was a `memcpy` call (seven a request); at 120 the
/// compiler copies it inline.
pub struct ResponseBody(Box<State>);

struct State {
    inner: Inner,
    summary: Option<RequestSummary>,
    /// Collects the start of an error body for its `upstream.error` event.
    capture: Option<Box<Capture>>,
}

enum Inner {
    /// A body the sidecar wrote itself; `None` once sent.
    Full(Option<Bytes>),
    /// The app's body, streamed frame by frame (trailers included) from the
    /// connection it came on, which goes back to the pool once it has ended.
    Upstream(UpstreamBody),
}

impl ResponseBody {
    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody(Box::new(State {
            inner: Inner::Full(None),
            summary: None,
            capture: None,
        }))
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let inner = Inner::Full(if bytes.is_empty() { None } else { Some(bytes) });
        ResponseBody(Box::new(State {
            inner,
            summary: None,
            capture: None,
        }))
    }

    /// The app's streamed body.
    pub fn upstream(body: UpstreamBody) -> Self {
        ResponseBody(Box::new(State {
            inner: Inner::Upstream(body),
            summary: None,
            capture: None,
        }))
    }

    /// Attaches a capture of the body's first bytes, published when it has
    /// enough or the body ends.
    pub fn with_capture(mut self, capture: Capture) -> Self {
        self.0.capture = Some(Box::new(capture));
        self
    }

    /// Attaches the summary line, written when this body is dropped.
    pub fn with_summary(mut self, summary: RequestSummary) -> Self {
        self.0.summary = Some(summary);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::h1::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::h1::Error>>> {
        let this = &mut *self.get_mut().0;
        match &mut this.inner {
            Inner::Full(bytes) => {
                let bytes = bytes.take();
                if let (Some(summary), Some(b)) = (this.summary.as_mut(), &bytes) {
                    summary.add_sent(b.len());
                }
                Poll::Ready(bytes.map(|b| Ok(Frame::data(b))))
            }
            Inner::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Err(e))) => {
                        if let Some(summary) = this.summary.as_mut() {
                            summary.fail_body(format!("upstream response body failed: {e}"));
                        }
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(summary), Some(data)) =
                            (this.summary.as_mut(), frame.data_ref())
                        {
                            summary.add_sent(data.len());
                        }
                        if let (Some(capture), Some(data)) =
                            (this.capture.as_mut(), frame.data_ref())
                        {
                            if capture.feed(data) {
                                // Enough: publish now, not when the body ends.
                                this.capture = None;
                            }
                        }
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0.inner {
            Inner::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(body) => body.size_hint(),
        }
    }
}
