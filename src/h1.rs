//! HTTP/1.1 to the app, written and read inside the request's own task.
//!
//! hyper's client connection runs as a task of its own: each request is
//! handed to it over a channel, each response and every body chunk comes
//! back over another, and each hand-over is a task wake-up. Under load that
//! was about 40 % of the proxy's user-space cycles (issue 9's profile). Here
//! the request's task writes the head and body to the app's socket itself,
//! parses the response head with httparse (as hyper does) and reads the body
//! frame by frame straight from the socket as the client side asks for it.
//!
//! What the wire format needs (RFC 9112):
//! - the request goes out with `Content-Length` when its length is known,
//!   chunked otherwise (trailers included);
//! - interim 1xx responses other than 101 are skipped;
//! - the response body is delimited by `Transfer-Encoding: chunked`, then
//!   `Content-Length`, then the end of the connection (§6.3); HEAD, 1xx, 204
//!   and 304 responses have none; a malformed or conflicting length is an
//!   error (a 502), never a guess;
//! - a connection is reused only when the response said nothing against it
//!   (HTTP/1.1, no `Connection: close`), both bodies were sent and read to
//!   their exact ends and no byte is left over.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::upstream::UpstreamStream;

/// Longest response head accepted from the app.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;
/// Read buffer size.
const READ_SIZE: usize = 16 * 1024;
/// Longest chunk-size line (with extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

/// An open connection to the app and the bytes read from it but not used.
pub struct Conn {
    io: UpstreamStream,
    buf: BytesMut,
    /// Bytes arrived since the current exchange began.
    received: bool,
    /// Scratch space for the fields of response heads.
    places: FieldPlaces,
}

impl Conn {
    /// A connection on a freshly opened stream.
    pub fn new(io: UpstreamStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            received: false,
            places: Vec::new(),
        }
    }

    /// Whether an idle connection can carry a request: the app has neither
    /// closed it nor sent anything unasked. Costs no system call unless the
    /// socket was reported readable.
    pub fn is_usable(&mut self) -> bool {
        self.buf.is_empty() && self.io.is_open_and_quiet()
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        let Conn {
            io, buf, received, ..
        } = self;
        let filled = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buf));
        *received |= matches!(filled, Ok(n) if n > 0);
        Poll::Ready(filled)
    }

    /// The stream and what was read past the response head, for a tunnel.
    pub fn into_parts(self) -> (UpstreamStream, Bytes) {
        (self.io, self.buf.freeze())
    }
}

/// Why an exchange with the app failed.
#[derive(Debug)]
pub enum Error {
    /// Reading from or writing to the app failed.
    Io(io::Error),
    /// The app closed the connection before any byte of a response.
    Closed,
    /// The app closed the connection in the middle of a response.
    Truncated(&'static str),
    /// The app's response is not valid HTTP/1.1.
    Malformed(String),
    /// The client's request body failed (its error is the source).
    ClientBody(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// True when the connection went away before any of the response came,
    /// so that a request the app cannot have acted on twice may go again.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Closed => f.write_str("the app closed the connection without a response"),
            Error::Truncated(what) => {
                write!(f, "the app closed the connection in the middle of {what}")
            }
            Error::Malformed(what) => write!(f, "malformed response from the app: {what}"),
            Error::ClientBody(_) => f.write_str("the request body from the client failed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::ClientBody(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A request ready for the wire: its head encoded once (and kept, so that
/// it can be written again on another connection), its body still to come.
pub struct Outgoing<B> {
    head: Bytes,
    method_head: bool,
    /// The method may be sent again (RFC 9110 §9.2.2).
    idempotent: bool,
    chunked: bool,
    body: Option<B>,
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Encodes `req` (its URI in origin form) for HTTP/1.1. The framing
    /// headers are the sidecar's: `Content-Length` when the body's length is
    /// known (or the client sent `Content-Length: 0`), chunked otherwise.
    pub fn new(req: Request<B>) -> Outgoing<B> {
        let (parts, body) = req.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(
            64 + target.len()
                + parts
                    .headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 4)
                    .sum::<usize>(),
        );
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        // The framing headers are the sidecar's own, written below.
        let had_length = parts.headers.contains_key(header::CONTENT_LENGTH);
        let fields = parts.headers.iter().filter(|(name, _)| {
            *name != header::CONTENT_LENGTH && *name != header::TRANSFER_ENCODING
        });
        write_fields(&mut head, fields);
        let empty = body.is_end_stream();
        let mut chunked = false;
        match body.size_hint().exact() {
            _ if empty => {
                if had_length {
                    head.extend_from_slice(b"content-length: 0\r\n");
                }
            }
            Some(n) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                head.extend_from_slice(b"\r\n");
            }
            None => {
                chunked = true;
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
        head.extend_from_slice(b"\r\n");
        Outgoing {
            head: head.into(),
            method_head: parts.method == Method::HEAD,
            idempotent: matches!(
                parts.method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            ),
            chunked,
            body: (!empty).then_some(body),
        }
    }

    /// The same request, to send again: only for an idempotent request
    /// without a body.
    pub fn replay(&self) -> Option<Outgoing<B>> {
        (self.idempotent && self.body.is_none()).then(|| Outgoing {
            head: self.head.clone(),
            method_head: self.method_head,
            idempotent: true,
            chunked: false,
            body: None,
        })
    }
}

/// How an exchange failed, and whether any of the request was written.
pub struct Failure<B> {
    pub error: Error,
    /// The request, when not a byte of it was written: it can go elsewhere
    /// whatever its method.
    pub unsent: Option<Outgoing<B>>,
    /// Whether any byte of a response (an interim one included) came
    /// before the failure: then the request is never sent again.
    pub response_started: bool,
}

/// A response head from the app, its body still on the connection.
pub struct Head {
    pub response: Response<()>,
    pub body: Framing,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
    /// The rest of the request when the app answered before it was all
    /// sent: the response body keeps sending it (an app may stream its
    /// answer to an upload it is still reading).
    pub upload: Option<Box<dyn Pump>>,
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    /// No body (HEAD, 204, 304, or `Content-Length: 0`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the app closes the connection.
    UntilClose,
    /// 101: the connection now carries another protocol.
    Upgrade,
}

/// Writes `req` on `conn` and reads the response head. On success the
/// connection is positioned at the start of the response body.
pub async fn exchange<B>(conn: &mut Conn, mut req: Outgoing<B>) -> Result<Head, Failure<B>>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    conn.received = false;
    let method_head = req.method_head;
    let mut upload = Upload {
        writer: Writer::new(req.head.clone()),
        body: req.body.take(),
        chunked: req.chunked,
    };
    // The head, and the body as it comes, while watching for an early
    // answer (an app may refuse an upload before reading it).
    let early = poll_fn(|cx| {
        if let Some(head) = ready_head(conn, method_head) {
            return Poll::Ready(head.map(Some));
        }
        match upload.poll_pump(&mut conn.io, cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(None)),
            Poll::Ready(Err(e)) => {
                // An app that answered and closed (a 413) makes the write
                // fail: its answer may already be here.
                if !matches!(e, Error::ClientBody(_)) {
                    if let Poll::Ready(Ok(head)) = poll_read_head(conn, cx, method_head) {
                        return Poll::Ready(Ok(Some(head)));
                    }
                }
                Poll::Ready(Err(e))
            }
            Poll::Pending => poll_read_head(conn, cx, method_head).map_ok(Some),
        }
    })
    .await;
    let written = upload.writer.wrote;
    let error = match early {
        Ok(Some(mut head)) => {
            if !upload.is_done() {
                // Answered before the request was sent in full: the rest
                // goes with the response body, and the connection is only
                // reused if it all went.
                head.upload = Some(Box::new(upload));
            }
            return Ok(head);
        }
        Ok(None) => match poll_fn(|cx| poll_read_head(conn, cx, method_head)).await {
            Ok(head) => return Ok(head),
            Err(e) => e,
        },
        Err(e) => e,
    };
    // Not a byte written means the body was not touched either.
    if !written {
        req.body = upload.body.take();
    }
    Err(Failure {
        unsent: (!written && !matches!(error, Error::ClientBody(_))).then_some(req),
        response_started: conn.received,
        error,
    })
}

/// What is left of a request being sent: queued bytes and the body.
struct Upload<B> {
    writer: Writer,
    body: Option<B>,
    chunked: bool,
}

/// Sends the rest of a request; object-safe so that a response body can
/// carry it without knowing the request body's type.
pub trait Pump: Send {
    /// Writes and pulls the body until it has all been sent (`Ok`), it
    /// fails, or it must wait.
    fn poll_pump(
        &mut self,
        io: &mut UpstreamStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>>;
}

impl<B> Upload<B> {
    fn is_done(&self) -> bool {
        self.body.is_none() && self.writer.is_empty()
    }
}

impl<B> Pump for Upload<B>
where
    B: Body<Data = Bytes> + Unpin + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_pump(
        &mut self,
        io: &mut UpstreamStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            ready!(self.writer.poll_flush(io, cx)).map_err(Error::Io)?;
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => self.writer.queue_frame(frame, self.chunked),
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(Error::ClientBody(e.into())));
                }
                None => {
                    if self.chunked && !self.writer.terminated {
                        self.writer.queue(Bytes::from_static(b"0\r\n\r\n"));
                    }
                    self.body = None;
                }
            }
        }
    }
}

/// Reads until a final response head is in, or the read would block.
fn poll_read_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    method_head: bool,
) -> Poll<Result<Head, Error>> {
    loop {
        if let Some(head) = ready_head(conn, method_head) {
            return Poll::Ready(head);
        }
        if conn.buf.len() >= MAX_HEAD {
            return Poll::Ready(Err(Error::Malformed(format!(
                "response head longer than {} KiB",
                MAX_HEAD / 1024
            ))));
        }
        match ready!(conn.poll_fill(cx)) {
            Ok(0) if conn.buf.is_empty() => return Poll::Ready(Err(Error::Closed)),
            Ok(0) => return Poll::Ready(Err(Error::Truncated("the response head"))),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// A final response head parsed from the buffer, skipping interim ones;
/// `None` when more bytes are needed.
fn ready_head(conn: &mut Conn, method_head: bool) -> Option<Result<Head, Error>> {
    loop {
        if conn.buf.is_empty() {
            return None;
        }
        // Uninitialised: zeroing 128 fields (4 KiB) cost more than parsing
        // a typical head.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &conn.buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(e) => return Some(Err(Error::Malformed(e.to_string()))),
        };
        let code = parsed.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            // 100 Continue, 102, 103: informational, not relayed.
            conn.buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let Ok(status) = StatusCode::from_u16(code) else {
            return Some(Err(Error::Malformed(format!("status {code}"))));
        };
        // Offsets, so that the values can share the head's bytes.
        let base = conn.buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize).wrapping_sub(base);
        conn.places.clear();
        conn.places.extend(parsed.headers.iter().map(|h| {
            (
                at(h.name.as_bytes()),
                h.name.len(),
                at(h.value),
                h.value.len(),
            )
        }));
        let bytes = conn.buf.split_to(len).freeze();
        // One spare slot: the proxy adds the request id.
        return Some(match field_map(&bytes, &conn.places, 1) {
            Ok((map, noted)) => head(status, version, map, noted, method_head),
            Err(e) => Err(Error::Malformed(e)),
        });
    }
}

/// The response head and how its body is delimited (RFC 9112 §6.3).
fn head(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    noted: Noted,
    method_head: bool,
) -> Result<Head, Error> {
    let mut keep_alive = version == Version::HTTP_11
        && !(noted.connection
            && tokens(&headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("close")));
    let body = if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
        Framing::Upgrade
    } else if method_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if noted.transfer_encoding {
        let chunked = tokens(&headers, &header::TRANSFER_ENCODING)
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        if noted.has_content_length {
            headers.remove(header::CONTENT_LENGTH);
            // Both: the length is ignored (§6.3 point 3), and such a
            // connection is not trusted with another request.
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::UntilClose
        }
    } else if noted.has_content_length {
        match noted.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => return Err(Error::Malformed("invalid Content-Length".into())),
        }
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Head {
        response,
        body,
        keep_alive,
        upload: None,
    })
}

/// Writes `name: value` lines.
fn write_fields<'a>(
    out: &mut Vec<u8>,
    fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Every comma-separated token of every `name` field (`Connection`,
/// `Transfer-Encoding`, `TE`).
pub fn tokens<'a>(
    headers: &'a HeaderMap,
    name: &header::HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The one length every `Content-Length` field agrees on, if they do.
#[cfg(test)]
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        if !agree_length(value.as_bytes(), &mut length) {
            return None;
        }
    }
    length
}

/// Folds one `Content-Length` value (a comma-separated list of decimal
/// lengths) into the length agreed so far; `false` when it is malformed or
/// names another length.
fn agree_length(value: &[u8], length: &mut Option<u64>) -> bool {
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() {
            return false;
        }
        let mut n: u64 = 0;
        for &b in part {
            if !b.is_ascii_digit() {
                return false;
            }
            match n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
            {
                Some(next) => n = next,
                None => return false,
            }
        }
        if length.is_some_and(|l| l != n) {
            return false;
        }
        *length = Some(n);
    }
    true
}

/// Where the fields of a parsed head are, as offsets into it: the name's
/// start and length, the value's start and length. Kept across messages as
/// scratch space.
pub(crate) type FieldPlaces = Vec<(usize, usize, usize, usize)>;

/// The fields a message's framing and hop-by-hop handling depend on, noted
/// while its fields go into the map: the common message carries none of them
/// but `Content-Length`, and then needs no look-up afterwards.
#[derive(Default)]
pub(crate) struct Noted {
    pub connection: bool,
    pub transfer_encoding: bool,
    pub te: bool,
    pub upgrade: bool,
    pub expect: bool,
    pub has_content_length: bool,
    /// The one length every `Content-Length` field agrees on; `None` when
    /// one is malformed or they disagree (or there is none).
    pub content_length: Option<u64>,
}

/// The header map of a parsed head, every value sharing `head`'s bytes,
/// with `spare` more slots (for the fields the proxy adds, so that the map
/// never grows), and what [`Noted`] tracks. Fails on a name `http` refuses
/// or a place outside `head`.
pub(crate) fn field_map(
    head: &Bytes,
    places: &[(usize, usize, usize, usize)],
    spare: usize,
) -> Result<(HeaderMap, Noted), String> {
    let mut map = HeaderMap::with_capacity(places.len() + spare);
    let mut noted = Noted::default();
    let mut lengths_agree = true;
    for &(name_at, name_len, value_at, value_len) in places {
        let (Some(name), Some(value)) = (
            head.get(name_at..name_at.saturating_add(name_len)),
            head.get(value_at..value_at.saturating_add(value_len)),
        ) else {
            return Err("malformed head".into());
        };
        let name = HeaderName::from_bytes(name)
            .map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(name)))?;
        if name == header::CONTENT_LENGTH {
            noted.has_content_length = true;
            lengths_agree &= agree_length(value, &mut noted.content_length);
        } else if name == header::CONNECTION {
            noted.connection = true;
        } else if name == header::TRANSFER_ENCODING {
            noted.transfer_encoding = true;
        } else if name == header::TE {
            noted.te = true;
        } else if name == header::UPGRADE {
            noted.upgrade = true;
        } else if name == header::EXPECT {
            noted.expect = true;
        }
        // SAFETY: httparse accepted these bytes as a field value: HTAB, SP
        // to `~` and 0x80 to 0xFF (its HEADER_VALUE_MAP), exactly the bytes
        // `HeaderValue` allows, so the check it would repeat cannot fail
        // (hyper builds its values the same way; a debug build checks).
        let value = unsafe {
            HeaderValue::from_maybe_shared_unchecked(head.slice(value_at..value_at + value_len))
        };
        map.append(name, value);
    }
    if !lengths_agree {
        noted.content_length = None;
    }
    Ok((map, noted))
}

/// Bytes waiting to be written to the app, in order.
struct Writer {
    queue: std::collections::VecDeque<Bytes>,
    wrote: bool,
    /// The last chunk (with trailers) is queued.
    terminated: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl Writer {
    fn new(head: Bytes) -> Writer {
        let mut queue = std::collections::VecDeque::with_capacity(4);
        queue.push_back(head);
        Writer {
            queue,
            wrote: false,
            terminated: false,
            unflushed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty() && !self.unflushed
    }

    fn queue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queue.push_back(bytes);
        }
    }

    /// Queues a body frame, in chunked coding when `chunked`.
    fn queue_frame(&mut self, frame: Frame<Bytes>, chunked: bool) {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                self.queue(Bytes::from(format!("{:x}\r\n", data.len())));
                self.queue(data);
                self.queue(Bytes::from_static(b"\r\n"));
            }
            Ok(data) => self.queue(data),
            Err(frame) => {
                // Trailers: only chunked coding can carry them.
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    let mut text = b"0\r\n".to_vec();
                    write_fields(&mut text, trailers.iter());
                    text.extend_from_slice(b"\r\n");
                    self.queue(text.into());
                    self.terminated = true;
                }
            }
        }
    }

    /// Writes what is queued; `Ready(Ok(n))` once all of it is written.
    fn poll_flush(
        &mut self,
        io: &mut UpstreamStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut total = 0;
        while !self.queue.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 8];
            let count = self.queue.len().min(slices.len());
            for (slice, bytes) in slices.iter_mut().zip(&self.queue) {
                *slice = io::IoSlice::new(bytes);
            }
            let n = match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.wrote = true;
            self.unflushed = true;
            total += n;
            let mut left = n;
            while left > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if front.len() <= left {
                    left -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        // A TLS stream may hold written bytes until it is flushed.
        if self.unflushed {
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(total))
    }
}

/// Where a connection goes when its response has been read to its end.
pub trait Home: Send + Sync {
    /// Takes back a connection ready for another request.
    fn give_back(&self, conn: Conn);
}

/// The app's response body, read from its connection as it is polled. The
/// connection goes home as soon as the body's last byte has been read (and
/// closes if the body is dropped before).
pub struct UpstreamBody {
    conn: Option<Conn>,
    decode: Decode,
    keep_alive: bool,
    home: Option<Box<dyn Home>>,
    /// The rest of a request the app answered early, still being sent.
    upload: Option<Box<dyn Pump>>,
    /// Data was returned since the body last returned `Pending`.
    relayed: bool,
    /// An error held back for one poll (see `poll_frame`).
    failed: Option<Error>,
}

#[derive(Clone, Copy, Debug)]
enum Decode {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// Where the decoding of a chunked body is (RFC 9112 §7.1). One decoder for
/// both directions: the app's response bodies here, the clients' request
/// bodies in `server_h1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Waiting for a chunk-size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    End,
    /// The trailer section after the last chunk.
    Trailers,
}

/// What one step of chunked decoding found in the buffer.
pub(crate) enum Step {
    Data(Bytes),
    /// The body is over; its trailers (often none).
    End(HeaderMap),
    /// More bytes are needed.
    More,
    /// Not valid chunked coding.
    Bad(&'static str),
}

impl Chunked {
    /// Decodes from the start of `buf` up to the next frame or the end.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Step {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Step::Bad("chunk size line too long");
                        }
                        return Step::More;
                    };
                    let Some(size) = chunk_size(&buf[..end]) else {
                        return Step::Bad("invalid chunk size line");
                    };
                    buf.advance(end + 1);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Step::More;
                    }
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    *self = if n == left {
                        Chunked::End
                    } else {
                        Chunked::Data(left - n)
                    };
                    return Step::Data(data);
                }
                Chunked::End => {
                    if buf.len() < 2 {
                        return Step::More;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Step::Bad("no CRLF after chunk data");
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, parsed) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete(done)) => done,
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => {
                            return Step::More
                        }
                        Ok(httparse::Status::Partial) => {
                            return Step::Bad("trailer section too long")
                        }
                        Err(_) => return Step::Bad("malformed trailer section"),
                    };
                    // httparse also takes a bare LF, which another parser
                    // on the way might read differently.
                    if !crlf_only(&buf[..len]) {
                        return Step::Bad("bare LF in the trailer section");
                    }
                    let mut trailers = HeaderMap::new();
                    for field in parsed.iter() {
                        let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) else {
                            return Step::Bad("invalid trailer field");
                        };
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    return Step::End(trailers);
                }
            }
        }
    }
}

/// Whether every line ending is CRLF.
fn crlf_only(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'\n' || (i > 0 && bytes[i - 1] == b'\r'))
}

impl UpstreamBody {
    /// The body of `head`'s response on `conn`; the connection goes to
    /// `home` afterwards if it can carry another request.
    pub fn new(conn: Conn, head: &mut Head, home: Box<dyn Home>) -> Self {
        let framing = head.body;
        let decode = match framing {
            Framing::Empty | Framing::Upgrade => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::Chunked(Chunked::Size),
            Framing::UntilClose => Decode::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            decode,
            keep_alive: head.keep_alive,
            home: Some(home),
            upload: head.upload.take(),
            relayed: false,
            failed: None,
        };
        if matches!(framing, Framing::Empty) {
            body.finish();
        }
        body
    }

    /// The connection of a 101 response: the tunnel's upstream side.
    pub fn take_upgraded(&mut self) -> Option<Conn> {
        self.home = None;
        self.conn.take()
    }

    /// The body has ended: the connection goes home if it can carry
    /// another request.
    fn finish(&mut self) {
        self.decode = Decode::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some(home)) = (conn, self.home.take()) {
            // An unfinished upload leaves the connection mid-request.
            if self.keep_alive && conn.buf.is_empty() && self.upload.is_none() {
                home.give_back(conn);
            }
        }
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a body still being read has its connection")
    }

    /// Reads more bytes; fails when the app closed the connection early.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match ready!(self.conn().poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(Error::Truncated("the response body"))),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(Error::Io(e))),
        }
    }

    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match self.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(0) => self.finish(),
                Decode::Length(left) => {
                    if self.conn().buf.is_empty() {
                        if let Err(e) = ready!(self.poll_more(cx)) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    let buf = &mut self.conn().buf;
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    if n == left {
                        self.finish();
                    } else {
                        self.decode = Decode::Length(left - n);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::UntilClose => {
                    let conn = self.conn();
                    if conn.buf.is_empty() {
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => {
                                self.keep_alive = false;
                                self.finish();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return Poll::Ready(Some(Err(Error::Io(e)))),
                        }
                    }
                    let data = self.conn().buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Chunked(mut state) => {
                    let step = state.step(&mut self.conn().buf);
                    self.decode = Decode::Chunked(state);
                    match step {
                        Step::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Step::End(trailers) => {
                            self.finish();
                            if !trailers.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                        }
                        Step::More => {
                            if let Err(e) = ready!(self.poll_more(cx)) {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        Step::Bad(why) => {
                            return Poll::Ready(Some(Err(Error::Malformed(why.into()))))
                        }
                    }
                }
            }
        }
    }
}

/// The size in a chunk-size line (without its LF): hex digits, then
/// nothing, or extensions after `;` (with optional whitespace), then CR.
pub(crate) fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    // Whitespace may follow the size (hyper accepts it too), then
    // extensions after `;`.
    let rest_ok = line[digits..]
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t'))
        .is_none_or(|&b| b == b';');
    // No control character in the extensions (a bare CR among them is read
    // as a line end by some parsers).
    if !rest_ok || line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return None;
    }
    let text = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(text, 16).ok()
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            this.decode = Decode::Done;
            return Poll::Ready(Some(Err(e)));
        }
        if let (Some(upload), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            match upload.poll_pump(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(e)) => {
                    // The answer is still relayed; the connection is not
                    // reused.
                    tracing::debug!(error = %e, "the rest of a request answered early could not be sent");
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        let polled = this.poll_decode(cx);
        match polled {
            Poll::Ready(Some(Err(e))) => {
                // Never reused after an error.
                this.home = None;
                this.conn = None;
                if this.relayed {
                    // Data went to hyper since it last waited: it flushes
                    // what it holds only when the body waits, and drops it
                    // on an error. Wait once, so the client gets the bytes
                    // that did arrive before its connection is cut.
                    this.relayed = false;
                    this.failed = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.decode = Decode::Done;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.relayed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                this.relayed = false;
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decode, Decode::Done | Decode::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1a\r"), Some(26));
        assert_eq!(chunk_size(b"0\r"), Some(0));
        assert_eq!(chunk_size(b"A;name=value\r"), Some(10));
        assert_eq!(chunk_size(b"A ;x\r"), Some(10));
        assert_eq!(chunk_size(b"A\t;x\r"), Some(10));
        assert_eq!(chunk_size(b"1a"), None, "no CR");
        assert_eq!(chunk_size(b"\r"), None);
        assert_eq!(chunk_size(b"-1\r"), None);
        assert_eq!(chunk_size(b"0x10\r"), None);
        assert_eq!(chunk_size(b"1 2\r"), None);
        assert_eq!(chunk_size(b"a \r"), Some(10), "trailing whitespace");
        assert_eq!(chunk_size(b"5;a\rb\r"), None, "bare CR in an extension");
        assert_eq!(chunk_size(b"5;a\0\r"), None, "NUL in an extension");
        assert_eq!(chunk_size(b"ffffffffffffffff\r"), None, "too long to trust");
    }

    /// The fields noted while the map is built are the ones in it, and the
    /// lengths of several `Content-Length` fields must agree.
    #[test]
    fn field_map_notes_the_framing_fields() {
        fn parsed(text: &'static str) -> (Bytes, FieldPlaces) {
            let head = Bytes::from_static(text.as_bytes());
            let mut fields = [httparse::EMPTY_HEADER; 8];
            httparse::parse_headers(&head, &mut fields).unwrap();
            let at = |s: &[u8]| s.as_ptr() as usize - head.as_ptr() as usize;
            let places = fields
                .iter()
                .filter(|h| !h.name.is_empty())
                .map(|h| {
                    (
                        at(h.name.as_bytes()),
                        h.name.len(),
                        at(h.value),
                        h.value.len(),
                    )
                })
                .collect();
            (head, places)
        }
        let (head, places) = parsed(
            "Content-Length: 5\r\nX-A: a\r\ncontent-length: 5, 5\r\nConnection: te\r\nTE: trailers\r\n\r\n",
        );
        let (map, noted) = field_map(&head, &places, 2).unwrap();
        assert_eq!(map.len(), 5);
        assert_eq!(map["x-a"], "a");
        assert_eq!(map["te"], "trailers");
        assert!(noted.has_content_length && noted.connection && noted.te);
        assert!(!noted.transfer_encoding && !noted.upgrade && !noted.expect);
        assert_eq!(noted.content_length, Some(5));

        let (head, places) = parsed(
            "Content-Length: 5\r\nContent-Length: 6\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        );
        let (_, noted) = field_map(&head, &places, 0).unwrap();
        assert_eq!(noted.content_length, None, "5 and 6 disagree");
        assert!(noted.has_content_length && noted.upgrade);
        assert!(noted.transfer_encoding && noted.expect);

        assert!(
            field_map(&head, &[(0, 14, 400, 10)], 0).is_err(),
            "out of range"
        );
        let bad = Bytes::from_static(b"a b: c");
        assert!(field_map(&bad, &[(0, 3, 5, 1)], 0).is_err(), "invalid name");
    }

    #[test]
    fn content_length_must_agree() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(content_length(&h), Some(5));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert_eq!(content_length(&h), Some(5));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(content_length(&h), None);
        for bad in ["", "+5", "5 5", "0x5", "-1", "99999999999999999999999"] {
            let mut h = HeaderMap::new();
            h.append(header::CONTENT_LENGTH, HeaderValue::from_static(bad));
            assert_eq!(content_length(&h), None, "{bad:?}");
        }
    }
}
