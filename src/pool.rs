//! The proxy's pool of HTTP/1.1 connections to the app.
//!
//! hyper-util's general-purpose client keys its pool by scheme and host in a
//! locked hash map and, for every HTTP/1 request whose response body is still
//! streaming, spawns a task that waits for the connection to be free again.
//! The proxy talks to one upstream only, so its pool is a stack of idle
//! connections, and a connection goes back on it when the response body that
//! used it has been read to its end: no task, no hashing, no timer per
//! request (issue 9's profile put hyper-util's pool and that task at about a
//! tenth of the proxy's user time).
//!
//! Safety of reuse: a request goes on an idle connection only if hyper says
//! the connection is ready. A reused connection can still turn out closed by
//! the app (its keep-alive timeout raced our request):
//! - before the request was written, hyper hands the request back untouched
//!   and it goes once more on a new connection, whatever its method;
//! - after it was written but before any response came, it goes once more on
//!   a new connection only if it is idempotent (RFC 9110 §9.2.2: GET, HEAD,
//!   OPTIONS, TRACE, PUT, DELETE) and has no body, as nginx does with its
//!   cached connections. A POST, or any request with a body, gets the error
//!   (a 502): it may have reached the app and is never sent twice.
//!
//! A new connection is never retried: its failure is the app's answer.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};

use crate::upstream::UpstreamConnector;

/// Pooled connections to the one upstream.
pub struct Pool<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    connector: UpstreamConnector,
    /// Idle connections, most recently used last (reused first: it is the
    /// one least likely to have been closed by the app).
    idle: Mutex<Vec<Idle<B>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Set once the idle reaper runs.
    reaper: std::sync::Once,
    /// Requests sent again after their reused connection was lost.
    retries: prometheus::IntCounter,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// A connection lent to one exchange: give it back with [`Lease::release`]
/// once the response body has been read to its end. Dropped instead (an
/// upgrade, a body cut short), the connection closes when hyper is done
/// with it.
pub struct Lease<B> {
    sender: SendRequest<B>,
    pool: Weak<Shared<B>>,
}

/// A request body that can make an identical copy of itself when it is
/// empty, so that its request can be sent again.
pub trait Replay: Sized {
    /// An empty body like this one, or `None` when this one is not empty.
    fn replay(&self) -> Option<Self>;
}

/// A copy of `req` to send again if the connection it goes on fails after
/// writing it: only an idempotent request without a body has one.
fn replay_copy<B: Replay>(req: &Request<B>) -> Option<Request<B>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent {
        return None;
    }
    let mut copy = Request::new(req.body().replay()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether a request written on a reused connection failed because the
/// connection went away (closed, reset) rather than because of what the app
/// answered: only then may it be sent again.
fn connection_lost(e: &hyper::Error) -> bool {
    !(e.is_parse() || e.is_parse_status() || e.is_user() || e.is_timeout())
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened.
    Connect(std::io::Error),
    /// The exchange failed on an open connection.
    Http(hyper::Error),
}

impl SendError {
    /// True when no connection to the app could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    /// Whether the client paused too long in the middle of its request body.
    pub fn is_client_body_stalled(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if e.is::<crate::body::BodyStalled>() {
                return true;
            }
            source = e.source();
        }
        false
    }

    /// Whether the client's request body failed (the client's fault).
    pub fn is_client_body(&self) -> bool {
        matches!(self, SendError::Http(e) if e.is_user())
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("cannot connect to the upstream"),
            SendError::Http(_) => f.write_str("request to the upstream failed"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
        }
    }
}

impl<B> Pool<B>
where
    B: http_body::Body + Replay + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool keeping at most `max_idle` idle connections, each for at most
    /// `idle_timeout`.
    /// Requests sent again are counted in `retries`.
    pub fn new(
        connector: UpstreamConnector,
        max_idle: usize,
        idle_timeout: Duration,
        retries: prometheus::IntCounter,
    ) -> Self {
        Pool {
            shared: Arc::new(Shared {
                connector,
                retries,
                idle: Mutex::new(Vec::new()),
                max_idle,
                idle_timeout,
                reaper: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `req` (its URI in origin form) on an idle connection, or a new
    /// one, and returns the response head with the connection's lease.
    pub async fn send(&self, req: Request<B>) -> Result<(Response<Incoming>, Lease<B>), SendError> {
        let req = match self.checkout() {
            Some(mut sender) => {
                let copy = replay_copy(&req);
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, self.lease(sender))),
                    Err(mut e) => match (e.take_message(), copy) {
                        // Never written: the connection was closed while idle.
                        (Some(req), _) => req,
                        // Written, and the connection was lost before any
                        // response: idempotent and bodiless, so it may go again.
                        (None, Some(copy)) if connection_lost(e.error()) => copy,
                        (None, _) => return Err(SendError::Http(e.into_error())),
                    },
                }
            }
            None => return self.send_new(req).await,
        };
        self.shared.retries.inc();
        tracing::debug!("a pooled connection to the app was closed under a request: sending it again on a new one");
        self.send_new(req).await
    }

    /// Sends `req` on a new connection.
    async fn send_new(&self, req: Request<B>) -> Result<(Response<Incoming>, Lease<B>), SendError> {
        let mut sender = self.connect().await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, self.lease(sender))),
            Err(e) => Err(SendError::Http(e)),
        }
    }

    fn lease(&self, sender: SendRequest<B>) -> Lease<B> {
        Lease {
            sender,
            pool: Arc::downgrade(&self.shared),
        }
    }

    /// The most recently used idle connection that is ready, dropping the
    /// closed and expired ones on the way.
    fn checkout(&self) -> Option<SendRequest<B>> {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Open but not yet free after its last response (its connection
        // task has not run since): kept for the next request.
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(entry) = idle.pop() {
            if entry.sender.is_closed()
                || now.saturating_duration_since(entry.since) >= self.shared.idle_timeout
            {
                continue;
            }
            if entry.sender.is_ready() {
                found = Some(entry.sender);
                break;
            }
            busy.push(entry);
        }
        idle.extend(busy.into_iter().rev());
        found
    }

    async fn connect(&self) -> Result<SendRequest<B>, SendError> {
        let io = self
            .shared
            .connector
            .connect()
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        let weak = Arc::downgrade(&self.shared);
        self.shared
            .reaper
            .call_once(|| drop(tokio::spawn(reap(weak))));
        Ok(sender)
    }
}

impl<B> Lease<B> {
    /// Puts the connection back in the pool: its response has been read in
    /// full, so the next request can use it.
    pub fn release(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_closed() {
            return;
        }
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= pool.max_idle {
            // Full: make room by closing one that cannot serve now (still
            // sending an upload the app answered early, or closed), oldest
            // first; otherwise this one is not kept.
            match idle.iter().position(|e| !e.sender.is_ready()) {
                Some(stale) => drop(idle.remove(stale)),
                None => return,
            }
        }
        idle.push(Idle {
            sender: self.sender,
            since: Instant::now(),
        });
    }
}

/// Closes connections idle for longer than the timeout, every half timeout,
/// for as long as the pool exists.
async fn reap<B>(pool: Weak<Shared<B>>) {
    let Some(period) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 2).max(Duration::from_millis(100)))
    else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<Idle<B>> = {
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|e| {
                !e.sender.is_closed() && now.saturating_duration_since(e.since) < pool.idle_timeout
            });
            *idle = keep;
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }
}
