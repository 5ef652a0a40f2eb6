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
//! the connection is ready, and when a reused connection turns out closed
//! before the request was written (the app closed it while it sat idle),
//! hyper hands the request back untouched and it is sent once more on a new
//! connection. A request that may have reached the app is never sent twice.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
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

    /// True when the request body failed (the client's fault, not the app's).
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
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool keeping at most `max_idle` idle connections, each for at most
    /// `idle_timeout`.
    pub fn new(connector: UpstreamConnector, max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            shared: Arc::new(Shared {
                connector,
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
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(sender))),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closed while idle.
                    Some(req) => req,
                    None => return Err(SendError::Http(e.into_error())),
                },
            },
            None => req,
        };
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
