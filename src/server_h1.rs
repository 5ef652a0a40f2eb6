//! HTTP/1.1 from clients, read and written inside the connection's own task.
//!
//! hyper's server connection drove each request through its dispatcher: a
//! state machine per connection that parses into its own buffers, hands the
//! request to the service, encodes the response into a write queue and polls
//! the body through several layers. callgrind put about 9,500 of the ~30,000
//! user-space instructions of a proxied request in it (issue 9). Here the
//! connection's task parses the head with httparse (as hyper does), calls the
//! router, and writes the response head and body with one vectored write
//! when the body is at hand, as `h1.rs` does on the app's side.
//!
//! What it keeps of hyper's behaviour (RFC 9112), which `tests/hostile.rs`
//! and `tests/proxy.rs` hold it to:
//! - a head that does not parse is answered 400 (431 when it is too large or
//!   has too many fields), logged, and the connection closes;
//! - `Transfer-Encoding` must end in `chunked` (else 400) and is not allowed
//!   in HTTP/1.0; with `Content-Length` too, the length is dropped and the
//!   connection closes after the response; `Content-Length` values must agree;
//! - `Expect: 100-continue` is answered when the body is first read;
//! - keep-alive as HTTP/1.1 and 1.0 define it; a response without a known
//!   length goes chunked to HTTP/1.1 clients (trailers only to a client that
//!   sent `TE: trailers`) and close-delimited to HTTP/1.0 ones;
//! - a client that closes its connection while its request is in flight
//!   cancels the request (the summary line says 499);
//! - an upgraded connection (101) is handed to the tunnel with the bytes
//!   read past the request head;
//! - a connection that opens with the HTTP/2 preface (h2c with prior
//!   knowledge, or h2 over TLS) is served by hyper's HTTP/2 server.
//!
//! `server.idle_timeout` bounds the wait for each request head, from the
//! end of the previous response: idle keep-alive connections and slow heads
//! alike.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{ClientBody, ResponseBody};
use crate::h1::{Chunked, Step};
use crate::mozlog::RequestSummary;
use crate::App;

/// Longest request head (hyper's default buffer limit); longer gets 431.
const MAX_HEAD: usize = 400 * 1024;
/// Most header fields in a request head (hyper's default); more gets 431.
const MAX_HEADERS: usize = 100;
/// Longest request target (what `http::Uri` takes); longer gets 414.
const MAX_TARGET: usize = 65_534;
/// The most of an unread request body read and dropped after the response
/// to keep the connection; a longer one closes it.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Response bytes held before they must be written (backpressure).
const WRITE_AHEAD: usize = 64 * 1024;
/// Read buffer growth.
const READ_SIZE: usize = 8 * 1024;
/// Body data up to this size is copied next to the head, so that head and
/// body leave in one write; larger frames are written from where they are.
const COPY_LIMIT: usize = 4 * 1024;
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client stream: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An upgraded connection, as the tunnel gets it.
pub struct Upgraded {
    pub io: Box<dyn Io>,
    /// What the client sent after the request head, to go to the app first.
    pub early: Bytes,
}

/// Put in a request's extensions when it asks for an upgrade: resolves with
/// the connection once the 101 has been written. (Extensions must be
/// `Clone`; only the first taker gets the connection.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The connection, once upgraded; `None` if it was taken already.
    pub fn take(&self) -> Option<tokio::sync::oneshot::Receiver<Upgraded>> {
        lock(&self.0).take()
    }
}

/// The connection and what has been read from it, shared with the body of
/// the request being served (both only ever run in the connection's task,
/// so the lock is never contended).
struct Conn<I> {
    io: I,
    buf: BytesMut,
    /// The current request's body.
    decode: Decode,
    /// Which request the body state belongs to.
    seq: u64,
    /// `100 Continue` still to be written before the body is read.
    expect: Option<&'static [u8]>,
    /// The client's stream ended (or failed).
    eof: bool,
    /// Bytes at the start of `buf` known not to hold the end of a head.
    scanned: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decode {
    Length(u64),
    Chunked(Chunked),
    Done,
    /// The body was malformed or cut: the connection cannot be reused.
    Failed,
}

/// A request body that is not HTTP/1.1 (bad chunk size, cut off).
#[derive(Debug)]
pub struct BadBody(pub String);

impl std::fmt::Display for BadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadBody {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<I: Io> Conn<I> {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        let filled = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ));
        if !matches!(filled, Ok(n) if n > 0) {
            self.eof = true;
        }
        Poll::Ready(filled)
    }

    /// Writes `bytes` in full.
    fn poll_write_all(&mut self, cx: &mut Context<'_>, bytes: &mut &[u8]) -> Poll<io::Result<()>> {
        while !bytes.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *bytes = &bytes[n..];
        }
        Poll::Ready(Ok(()))
    }

    fn body_done(&self) -> bool {
        matches!(self.decode, Decode::Done | Decode::Length(0))
    }

    /// More body bytes; an error when the client's stream ended first.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(
                self.fail("the client closed the connection in the middle of the request body")
            )),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => {
                self.decode = Decode::Failed;
                Poll::Ready(Err(Box::new(e)))
            }
        }
    }

    fn fail(&mut self, what: &str) -> BoxError {
        self.decode = Decode::Failed;
        Box::new(BadBody(what.to_owned()))
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(mut rest) = self.expect {
            let written = self.poll_write_all(cx, &mut rest);
            self.expect = (!rest.is_empty()).then_some(rest);
            match ready!(written) {
                Ok(()) => self.expect = None,
                Err(e) => {
                    self.decode = Decode::Failed;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        loop {
            match self.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Failed => {
                    return Poll::Ready(Some(Err(Box::new(BadBody(
                        "the request body failed".into(),
                    )))))
                }
                Decode::Length(0) => self.decode = Decode::Done,
                Decode::Length(left) => {
                    if self.buf.is_empty() {
                        if let Err(e) = ready!(self.poll_more(cx)) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    let n = (self.buf.len() as u64).min(left);
                    let data = self.buf.split_to(n as usize).freeze();
                    self.decode = if n == left {
                        Decode::Done
                    } else {
                        Decode::Length(left - n)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Chunked(mut state) => {
                    let step = state.step(&mut self.buf);
                    self.decode = Decode::Chunked(state);
                    match step {
                        Step::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Step::End(trailers) => {
                            self.decode = Decode::Done;
                            if !trailers.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                        }
                        Step::More => {
                            if let Err(e) = ready!(self.poll_more(cx)) {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        Step::Bad(why) => return Poll::Ready(Some(Err(self.fail(why)))),
                    }
                }
            }
        }
    }
}

/// What the request body needs of the connection, without its stream type.
trait BodySource: Send {
    fn poll_body(
        &mut self,
        seq: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>;
    fn state(&self, seq: u64) -> Decode;
}

impl<I: Io> BodySource for Conn<I> {
    fn poll_body(
        &mut self,
        seq: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if seq != self.seq {
            // A body kept past its request never reads the next one, and
            // never passes for complete.
            return Poll::Ready(Some(Err(Box::new(BadBody("the request is over".into())))));
        }
        Conn::poll_body(self, cx)
    }

    fn state(&self, seq: u64) -> Decode {
        if seq != self.seq {
            return Decode::Done;
        }
        self.decode
    }
}

/// A request body read from the client's connection as it is polled.
pub struct H1Body {
    conn: Arc<Mutex<dyn BodySource>>,
    seq: u64,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let seq = self.seq;
        lock(&self.conn).poll_body(seq, cx)
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            lock(&self.conn).state(self.seq),
            Decode::Done | Decode::Length(0)
        )
    }

    fn size_hint(&self) -> SizeHint {
        match lock(&self.conn).state(self.seq) {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// What the response needs to know about its request.
struct Exchange {
    version: Version,
    method_head: bool,
    keep_alive: bool,
    te_trailers: bool,
    upgrade: Option<tokio::sync::oneshot::Sender<Upgraded>>,
}

/// A request head that could not be read: the status to answer, and why.
struct Refused(u16, String);

/// Serves a client connection: HTTP/1.1 on this task, or HTTP/2 by hyper
/// when it opens with the HTTP/2 preface.
pub async fn serve<I: Io>(
    app: Arc<App>,
    io: I,
    peer: SocketAddr,
    https: bool,
    accepted: tokio::time::Instant,
) {
    let conn = Arc::new(Mutex::new(Conn {
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
        decode: Decode::Done,
        seq: 0,
        expect: None,
        eof: false,
        scanned: 0,
    }));
    let idle = app.config.server.idle_timeout;
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let shutdown = app.clone();
    let stopped = shutdown.shutdown.stopped();
    tokio::pin!(stopped);

    // The HTTP/2 preface, or enough of the first bytes to know it is not.
    let h2 = poll_fn(|cx| {
        let mut c = lock(&conn);
        loop {
            let n = c.buf.len().min(H2_PREFACE.len());
            if c.buf[..n] != H2_PREFACE[..n] {
                return Poll::Ready(Some(false));
            }
            if n == H2_PREFACE.len() {
                return Poll::Ready(Some(true));
            }
            match c.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break,
            }
        }
        drop(c);
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if stopped.as_mut().poll(cx).is_ready() && close_on_stop(timer.as_mut(), accepted, cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    match h2 {
        None => return,
        Some(true) => {
            let Ok(conn) = Arc::try_unwrap(conn) else {
                return;
            };
            let conn = conn.into_inner().unwrap_or_else(|e| e.into_inner());
            let io = Rewind {
                early: conn.buf.freeze(),
                io: conn.io,
            };
            // Boxed: hyper's HTTP/2 connection is about 7 KB of state that
            // every HTTP/1.1 connection's task would otherwise carry too
            // (the HTTP/1.1 connection future was 12,016 bytes, now 6,016).
            return Box::pin(serve_h2(app, io, peer, https, accepted)).await;
        }
        Some(false) => {}
    }

    let mut out = Writer::default();
    let mut fields = crate::h1::FieldPlaces::new();
    loop {
        // The next request head, within the idle timeout.
        let read = poll_fn(|cx| {
            let mut c = lock(&conn);
            loop {
                if head_may_be_complete(&mut c) {
                    match parse_head(&mut c, &mut fields) {
                        Ok(Some(head)) => return Poll::Ready(Ok(Some(head))),
                        Ok(None) => {}
                        Err(refused) => return Poll::Ready(Err(refused)),
                    }
                }
                if c.buf.len() >= MAX_HEAD {
                    return Poll::Ready(Err(Refused(
                        431,
                        format!("request head longer than {} KiB", MAX_HEAD / 1024),
                    )));
                }
                if c.eof {
                    return Poll::Ready(Ok(None));
                }
                match c.poll_fill(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(None)),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => break,
                }
            }
            let idle = c.buf.is_empty();
            drop(c);
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            }
            if idle
                && stopped.as_mut().poll(cx).is_ready()
                && close_on_stop(timer.as_mut(), accepted, cx)
            {
                return Poll::Ready(Ok(None));
            }
            Poll::Pending
        })
        .await;
        let (req, mut exchange, close_after) = match read {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(Refused(code, why)) => {
                drop(RequestSummary::unparsed(
                    app.logger.clone(),
                    app.metrics.clone(),
                    code,
                    format!("malformed request from {peer}: {why}"),
                ));
                let _ = write_refusal(&conn, code).await;
                return;
            }
        };
        let seq = {
            let c = lock(&conn);
            c.seq
        };
        let body = H1Body {
            conn: conn.clone(),
            seq,
        };
        let req = req.map(|()| ClientBody::h1(body));

        // The answer, unless the client goes away first. Boxed: the request's
        // future is 4.5 KB, and inline every idle connection would hold it.
        let mut handled = Box::pin(crate::router::handle(app.clone(), peer, https, req));
        let resp = poll_fn(|cx| {
            if let Poll::Ready(Ok(resp)) = handled.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            watch_for_close(&conn, cx)
        })
        .await;
        let Some(resp) = resp else {
            // Dropping the request cancels it; its line says 499.
            return;
        };

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgrade = exchange.upgrade.take();
        let keep_alive =
            match write_response(&conn, &mut out, resp, &exchange, close_after, &app).await {
                Ok(keep_alive) => keep_alive,
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "writing a response failed");
                    return;
                }
            };
        if switching {
            if let Some(upgrade) = upgrade {
                hand_over(conn, upgrade);
            }
            return;
        }
        drop(upgrade);
        timer.as_mut().reset(tokio::time::Instant::now() + idle);
        let drained = !keep_alive
            || poll_fn(|cx| {
                let mut c = lock(&conn);
                loop {
                    match Conn::poll_body(&mut c, cx) {
                        Poll::Ready(None) => return Poll::Ready(true),
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                        Poll::Pending => break,
                    }
                }
                drop(c);
                timer.as_mut().poll(cx).map(|()| false)
            })
            .await;
        let reusable = {
            let c = lock(&conn);
            keep_alive && drained && c.decode == Decode::Done && !c.eof
        };
        if !reusable || app.shutdown.is_stopping() {
            let _ = poll_fn(|cx| Pin::new(&mut lock(&conn).io).poll_shutdown(cx)).await;
            return;
        }
    }
}

/// The `Date` value for now, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == text.len() {
            text.copy_from_slice(formatted.as_bytes());
        }
        last.set((secs, text));
        text
    })
}

/// How long a connection accepted just before the stop may take to send its
/// first request: closing it unread would fail a request the client has
/// already sent.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Once stopped, whether an idle connection closes now. One accepted just
/// before the stop gets the rest of `FIRST_REQUEST_GRACE` for the request its
/// client has already sent: its head timer is brought forward to then (and
/// polled, so that the task wakes when it runs out).
fn close_on_stop(
    mut timer: Pin<&mut tokio::time::Sleep>,
    accepted: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> bool {
    let grace = accepted + FIRST_REQUEST_GRACE;
    if tokio::time::Instant::now() >= grace {
        return true;
    }
    if timer.deadline() > grace {
        timer.as_mut().reset(grace);
    }
    timer.poll(cx).is_ready()
}

/// While a request is being answered: `Ready(None)` when the client has
/// closed its connection. Reads only once the request body is all in (the
/// bytes read are the next request's, kept for later).
fn watch_for_close<I: Io, T>(conn: &Mutex<Conn<I>>, cx: &mut Context<'_>) -> Poll<Option<T>> {
    let mut c = lock(conn);
    while c.body_done() && !c.eof && c.buf.len() < MAX_HEAD {
        match c.poll_fill(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
            Poll::Ready(Ok(_)) => continue,
            Poll::Pending => break,
        }
    }
    Poll::Pending
}

/// Whether the buffer may hold a whole head: small ones are parsed as they
/// come (a malformed request line is refused at once), large ones only once
/// a blank line has arrived, so that a head read in many pieces is not
/// parsed again from the start for each.
fn head_may_be_complete<I: Io>(c: &mut Conn<I>) -> bool {
    const PARSE_ALWAYS: usize = 16 * 1024;
    if c.buf.is_empty() {
        return false;
    }
    if c.buf.len() <= PARSE_ALWAYS {
        return true;
    }
    let from = c.scanned.saturating_sub(3);
    let found = c.buf[from..]
        .windows(2)
        .any(|w| w == b"\n\n" || w == b"\n\r");
    c.scanned = c.buf.len();
    found
}

/// Parses a complete request head at the start of the buffer; `Ok(None)`
/// when more bytes are needed. `fields` is scratch space kept across
/// requests.
#[allow(clippy::type_complexity)]
fn parse_head<I: Io>(
    c: &mut Conn<I>,
    fields: &mut crate::h1::FieldPlaces,
) -> Result<Option<(Request<()>, Exchange, bool)>, Refused> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(&c.buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(Refused(
                431,
                format!("request head longer than {} KiB", MAX_HEAD / 1024),
            ))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ))
        }
        Err(e) => return Err(Refused(400, e.to_string())),
    };
    let base = c.buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize).wrapping_sub(base);
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| Refused(400, "invalid method".into()))?;
    let path = parsed.path.unwrap_or("");
    if path.len() > MAX_TARGET {
        return Err(Refused(
            414,
            format!("request target longer than {MAX_TARGET} bytes"),
        ));
    }
    let target = (at(path.as_bytes()), path.len());
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    fields.clear();
    for h in parsed.headers.iter() {
        fields.push((
            at(h.name.as_bytes()),
            h.name.len(),
            at(h.value),
            h.value.len(),
        ));
    }
    let head = c.buf.split_to(len).freeze();
    c.scanned = 0;
    let slice = |start: usize, n: usize| -> Result<Bytes, Refused> {
        if start <= len && n <= len - start {
            Ok(head.slice(start..start + n))
        } else {
            Err(Refused(400, "malformed head".into()))
        }
    };
    let uri = Uri::from_maybe_shared(slice(target.0, target.1)?)
        .map_err(|e| Refused(400, format!("invalid request target: {e}")))?;
    // Room for what the proxy adds (Host, forwarding headers, the request
    // id), so that the map never grows.
    let (mut map, noted) = crate::h1::field_map(&head, fields, 4).map_err(|e| Refused(400, e))?;

    // The body's framing (RFC 9112 §6.3).
    let mut close_after = false;
    let decode = if noted.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(Refused(
                400,
                "Transfer-Encoding in an HTTP/1.0 request".into(),
            ));
        }
        let chunked = crate::h1::tokens(&map, &header::TRANSFER_ENCODING)
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        if !chunked {
            return Err(Refused(
                400,
                "Transfer-Encoding does not end in chunked".into(),
            ));
        }
        if noted.has_content_length {
            map.remove(header::CONTENT_LENGTH);
            // Both: the length is ignored, and nothing after this body is
            // trusted as a request.
            close_after = true;
        }
        Decode::Chunked(Chunked::Size)
    } else if noted.has_content_length {
        match noted.content_length {
            Some(0) => Decode::Done,
            Some(n) => Decode::Length(n),
            None => return Err(Refused(400, "invalid Content-Length".into())),
        }
    } else {
        Decode::Done
    };
    let connection = |token: &str| {
        noted.connection
            && crate::h1::tokens(&map, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
    };
    let keep_alive = match version {
        Version::HTTP_11 => !connection("close"),
        _ => connection("keep-alive") && !connection("close"),
    };
    let te_trailers = noted.te
        && crate::h1::tokens(&map, &header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
    let expect = version == Version::HTTP_11
        && decode != Decode::Done
        && noted.expect
        && map
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut req = Request::new(());
    let upgrade = noted.upgrade.then(|| crate::proxy::upgrade_protocol(&map));
    let upgrade = upgrade.flatten().map(|_| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        req.extensions_mut()
            .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
        tx
    });
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    c.seq += 1;
    c.decode = decode;
    c.expect = expect.then_some(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
    let exchange = Exchange {
        version,
        method_head: method == Method::HEAD,
        keep_alive,
        te_trailers,
        upgrade,
    };
    Ok(Some((req, exchange, close_after)))
}

/// Bytes waiting to go to the client: the head and small frames in one
/// buffer, large frames after it.
#[derive(Default)]
struct Writer {
    head: Vec<u8>,
    written: usize,
    queue: std::collections::VecDeque<Bytes>,
}

impl Writer {
    fn is_empty(&self) -> bool {
        self.written == self.head.len() && self.queue.is_empty()
    }

    /// Bytes waiting, at least (the head buffer, and whether more is queued).
    fn pending(&self) -> usize {
        self.head.len() - self.written + self.queue.iter().map(Bytes::len).sum::<usize>()
    }

    fn push(&mut self, data: &[u8]) {
        if self.queue.is_empty() {
            self.head.extend_from_slice(data);
        } else {
            self.queue.push_back(Bytes::copy_from_slice(data));
        }
    }

    fn push_bytes(&mut self, data: Bytes) {
        if data.len() <= COPY_LIMIT {
            self.push(&data);
        } else {
            self.queue.push_back(data);
        }
    }

    fn poll_flush<I: Io>(
        &mut self,
        conn: &mut Conn<I>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 8];
            let mut count = 0;
            if self.written < self.head.len() {
                slices[0] = io::IoSlice::new(&self.head[self.written..]);
                count = 1;
            }
            for bytes in self.queue.iter().take(slices.len() - count) {
                slices[count] = io::IoSlice::new(bytes);
                count += 1;
            }
            let mut n = ready!(Pin::new(&mut conn.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let in_head = (self.head.len() - self.written).min(n);
            self.written += in_head;
            n -= in_head;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if front.len() <= n {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        self.head.clear();
        self.written = 0;
        ready!(Pin::new(&mut conn.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }
}

/// How the response body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes the response; `Ok(true)` when the connection may carry another
/// request.
async fn write_response<I: Io>(
    conn: &Mutex<Conn<I>>,
    out: &mut Writer,
    resp: Response<ResponseBody>,
    exchange: &Exchange,
    close_after: bool,
    app: &App,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let mut keep_alive = exchange.keep_alive && !close_after;
    {
        // A request body not read by now is read and dropped after the
        // response if it is short and on its way; otherwise the response
        // says the connection closes (a client must not reuse a connection
        // that closes under it).
        let mut c = lock(conn);
        // Past this point a `100 Continue` would land inside the response.
        let unasked = c.expect.take().is_some();
        let drainable = !unasked
            && match c.decode {
                Decode::Done | Decode::Length(0) => true,
                Decode::Length(n) => n <= DRAIN_LIMIT,
                _ => false,
            };
        if !drainable {
            keep_alive = false;
        }
    }
    let head = &mut out.head;
    // The client's version: a 1.0 client gets a 1.0 response, whatever the
    // app spoke (the framing below is chosen for the client too).
    head.extend_from_slice(if exchange.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    head.extend_from_slice(b"\r\n");
    let no_body_status = status.is_informational() || status == StatusCode::NO_CONTENT;
    let mut length = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            if no_body_status || length.is_some() {
                continue;
            }
            let Some(n) = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                continue;
            };
            length = Some(n);
        } else if *name == header::TRANSFER_ENCODING {
            // The framing is the sidecar's own, decided below.
            continue;
        } else if *name == header::DATE {
            has_date = true;
        } else if *name == header::CONNECTION
            && value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        {
            keep_alive = false;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let bodyless = no_body_status || status == StatusCode::NOT_MODIFIED || exchange.method_head;
    let mut framing = match length {
        Some(n) => Framing::Length(n),
        // No length is made up for a response without a body: a HEAD or a
        // 304 carries the app's, or none (RFC 9110 §8.6).
        None if bodyless => Framing::Empty,
        None => match body.size_hint().exact() {
            Some(n) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                head.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
            None if exchange.version == Version::HTTP_10 => {
                keep_alive = false;
                Framing::UntilClose
            }
            None => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        },
    };
    if bodyless {
        framing = Framing::Empty;
    }
    if !has_date {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(&http_date());
        head.extend_from_slice(b"\r\n");
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if keep_alive && exchange.version == Version::HTTP_10 {
            head.extend_from_slice(b"connection: keep-alive\r\n");
        } else if !keep_alive
            && exchange.version == Version::HTTP_11
            && !parts.headers.contains_key(header::CONNECTION)
        {
            head.extend_from_slice(b"connection: close\r\n");
        }
    }
    head.extend_from_slice(b"\r\n");
    let _ = app;

    let declared: Vec<HeaderName> = crate::h1::tokens(&parts.headers, &header::TRAILER)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();

    // The body, frame by frame; what is at hand is written together.
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut ended = framing == Framing::Empty;
    let mut failed = None;
    poll_fn(|cx| {
        loop {
            if out.pending() >= WRITE_AHEAD {
                // Backpressure: no more of the body is taken until the
                // client has read this.
                let mut c = lock(conn);
                ready!(out.poll_flush(&mut c, cx))?;
            }
            if ended || failed.is_some() {
                break;
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(mut data) => match framing {
                        Framing::Length(_) => {
                            if data.len() as u64 > left {
                                data.truncate(left as usize);
                                failed = Some("the body is longer than its Content-Length");
                            }
                            left -= data.len() as u64;
                            out.push_bytes(data);
                            if left == 0 && failed.is_none() {
                                ended = true;
                            }
                        }
                        Framing::Chunked => {
                            let mut size = [0u8; 18];
                            let line = chunk_line(&mut size, data.len());
                            out.push(line);
                            out.push_bytes(data);
                            out.push(b"\r\n");
                        }
                        Framing::UntilClose => out.push_bytes(data),
                        Framing::Empty => {}
                    },
                    Err(frame) => {
                        if let (Framing::Chunked, true, Ok(trailers)) =
                            (framing, exchange.te_trailers, frame.into_trailers())
                        {
                            let mut text = b"0\r\n".to_vec();
                            // As hyper: only fields the response declared in
                            // `Trailer`, and none that only a head may carry.
                            let sent = trailers.iter().filter(|(name, _)| {
                                declared.contains(name) && trailer_allowed(name)
                            });
                            for (name, value) in sent {
                                text.extend_from_slice(name.as_str().as_bytes());
                                text.extend_from_slice(b": ");
                                text.extend_from_slice(value.as_bytes());
                                text.extend_from_slice(b"\r\n");
                            }
                            text.extend_from_slice(b"\r\n");
                            out.push(&text);
                            ended = true;
                            framing = Framing::Empty;
                        }
                    }
                },
                Poll::Ready(Some(Err(_))) => {
                    failed = Some("the response body failed");
                }
                Poll::Ready(None) => {
                    match framing {
                        Framing::Chunked => out.push(b"0\r\n\r\n"),
                        Framing::Length(_) if left > 0 => {
                            failed = Some("the body ended before its Content-Length");
                        }
                        _ => {}
                    }
                    ended = true;
                }
                Poll::Pending => {
                    // Nothing more at hand: send what is, then wait for the
                    // body (or the client going away).
                    let mut c = lock(conn);
                    if !out.is_empty() {
                        match out.poll_flush(&mut c, cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    drop(c);
                    if let Poll::Ready(None::<()>) = watch_for_close(conn, cx) {
                        return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                    }
                    return Poll::Pending;
                }
            }
        }
        let mut c = lock(conn);
        out.poll_flush(&mut c, cx)
    })
    .await?;
    // The summary line is written when the body is dropped, once sent.
    drop(body);
    if let Some(why) = failed {
        return Err(io::Error::other(why));
    }
    Ok(keep_alive && framing != Framing::UntilClose)
}

/// Whether a field may travel in a trailer section (hyper's list: fields that
/// frame, route, authenticate or describe the message belong in its head).
fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

/// `{size:x}\r\n` for a chunk of `len` bytes.
fn chunk_line(buf: &mut [u8; 18], len: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// Answers a head that could not be read, and closes.
async fn write_refusal<I: Io>(conn: &Mutex<Conn<I>>, code: u16) -> io::Result<()> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    let mut out = Writer::default();
    out.push(b"HTTP/1.1 ");
    out.push(status.as_str().as_bytes());
    out.push(b" ");
    out.push(status.canonical_reason().unwrap_or("").as_bytes());
    out.push(b"\r\ncontent-length: 0\r\nconnection: close\r\ndate: ");
    out.push(&http_date());
    out.push(b"\r\n\r\n");
    poll_fn(|cx| {
        let mut c = lock(conn);
        ready!(out.poll_flush(&mut c, cx))?;
        Pin::new(&mut c.io).poll_shutdown(cx)
    })
    .await
}

/// Gives an upgraded connection to the tunnel waiting for it.
fn hand_over<I: Io>(conn: Arc<Mutex<Conn<I>>>, upgrade: tokio::sync::oneshot::Sender<Upgraded>) {
    let Ok(conn) = Arc::try_unwrap(conn) else {
        tracing::debug!("an upgraded connection is still shared with its request body: closed");
        return;
    };
    let conn = conn.into_inner().unwrap_or_else(|e| e.into_inner());
    let _ = upgrade.send(Upgraded {
        io: Box::new(conn.io),
        early: conn.buf.freeze(),
    });
}

/// A stream with bytes already read from it put back in front.
struct Rewind<I> {
    early: Bytes,
    io: I,
}

impl<I: Io> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: Io> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves an HTTP/2 connection with hyper; on stop it finishes the streams
/// in flight (GOAWAY) and closes.
async fn serve_h2<I: Io>(
    app: Arc<App>,
    io: Rewind<I>,
    peer: SocketAddr,
    https: bool,
    accepted: tokio::time::Instant,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let service_app = app.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        crate::router::handle(service_app.clone(), peer, https, req.map(ClientBody::hyper))
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = app.shutdown.stopped() => {
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
        tracing::debug!(peer = %peer, error = %e, "HTTP/2 connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lines_are_lower_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_line(&mut buf, 1), b"1\r\n");
        assert_eq!(chunk_line(&mut buf, 0x1a2b), b"1a2b\r\n");
        assert_eq!(chunk_line(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }
}
