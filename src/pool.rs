//! The proxy's pool of HTTP/1.1 connections to the app.
//!
//! The proxy talks to one upstream only, so its pool is a stack of idle
//! connections ([`h1::Conn`]), and a connection goes back on it when the
//! response body that used it has been read to its end: no task, no
//! hashing, no timer per request. The exchange itself runs in the request's
//! task ([`crate::h1`]).
//!
//! Safety of reuse: a request goes on an idle connection only if the app has
//! neither closed it nor sent anything on it since (a readiness check that
//! costs no system call unless the socket turned readable). A reused
//! connection can still turn out closed by the app (its keep-alive timeout
//! raced our request):
//! - when not a byte of the request could be written, it goes once more on
//!   a new connection, whatever its method;
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

use http::Response;

use crate::body::RequestBody;
use crate::h1::{self, Conn, Outgoing, UpstreamBody};
use crate::upstream::UpstreamConnector;
use crate::worker;

/// Pooled connections to the one upstream.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: UpstreamConnector,
    /// One stack per worker ([`crate::worker`]): a connection is registered
    /// with its worker's runtime, and is only reused there.
    workers: Box<[PerWorker]>,
    /// At most this many idle connections per worker: the pool's
    /// `max_idle` split between the workers, rounded up.
    max_idle: usize,
    idle_timeout: Duration,
    /// Requests sent again after their reused connection was lost.
    retries: prometheus::IntCounter,
}

struct PerWorker {
    /// Idle connections, most recently used last (reused first: it is the
    /// one least likely to have been closed by the app).
    idle: Mutex<Vec<Idle>>,
    /// Set once this worker's idle reaper runs.
    reaper: std::sync::Once,
}

impl Shared {
    /// The stack of worker `index` (threads beyond the pool's workers share
    /// them).
    fn worker(&self, index: usize) -> &PerWorker {
        &self.workers[index % self.workers.len()]
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Where a response body returns its connection: the pool, and the worker
/// whose runtime the connection is registered with.
struct Home(Weak<Shared>, usize);

impl h1::Home for Home {
    fn give_back(&self, conn: Conn) {
        let Some(pool) = self.0.upgrade() else {
            return;
        };
        let mut idle = pool
            .worker(self.1)
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() < pool.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened.
    Connect(std::io::Error),
    /// The exchange failed on an open connection.
    Http(h1::Error),
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
        matches!(self, SendError::Http(h1::Error::ClientBody(_)))
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

impl Pool {
    /// A pool for `workers` workers, keeping at most `max_idle` idle
    /// connections (split between the workers, rounded up), each for at
    /// most `idle_timeout`.
    /// Requests sent again are counted in `retries`.
    pub fn new(
        connector: UpstreamConnector,
        workers: usize,
        max_idle: usize,
        idle_timeout: Duration,
        retries: prometheus::IntCounter,
    ) -> Self {
        let workers = workers.max(1);
        Pool {
            shared: Arc::new(Shared {
                connector,
                retries,
                workers: (0..workers)
                    .map(|_| PerWorker {
                        idle: Mutex::new(Vec::new()),
                        reaper: std::sync::Once::new(),
                    })
                    .collect(),
                max_idle: max_idle.div_ceil(workers),
                idle_timeout,
            }),
        }
    }

    /// Sends `req` (its URI in origin form) on an idle connection, or a new
    /// one, and returns the response with its body still on the connection.
    pub async fn send(
        &self,
        out: Outgoing<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let out = match self.checkout() {
            Some(mut conn) => {
                let copy = out.replay();
                match h1::exchange(&mut conn, out).await {
                    Ok(head) => return Ok(self.respond(conn, head)),
                    Err(failure) => match (failure.unsent, copy) {
                        // Not a byte written: the app closed the connection
                        // while it was idle.
                        (Some(out), _) => out,
                        // Written, and the connection was lost before any
                        // response: idempotent and bodiless, so it may go again.
                        (None, Some(copy))
                            if !failure.response_started && failure.error.is_connection_lost() =>
                        {
                            copy
                        }
                        (None, _) => return Err(SendError::Http(failure.error)),
                    },
                }
            }
            // Boxed: opening a connection (a connect future of 1.4 KB) is
            // the rare path, and held inline it made this future 2.6 KB,
            // copied whole at each level of every request's await chain.
            None => return Box::pin(self.send_new(out)).await,
        };
        self.shared.retries.inc();
        tracing::debug!("a pooled connection to the app was closed under a request: sending it again on a new one");
        Box::pin(self.send_new(out)).await
    }

    /// Sends `out` on a new connection.
    async fn send_new(
        &self,
        out: Outgoing<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut conn = self.connect().await?;
        match h1::exchange(&mut conn, out).await {
            Ok(head) => Ok(self.respond(conn, head)),
            Err(failure) => Err(SendError::Http(failure.error)),
        }
    }

    fn respond(&self, conn: Conn, mut head: h1::Head) -> Response<UpstreamBody> {
        // A connection is checked out and opened on the worker it serves.
        let home = Box::new(Home(Arc::downgrade(&self.shared), worker::index()));
        let body = UpstreamBody::new(conn, &mut head, home);
        head.response.map(|()| body)
    }

    /// The most recently used idle connection that is still usable,
    /// dropping the closed and expired ones on the way.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self
            .shared
            .worker(worker::index())
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Some(mut entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < self.shared.idle_timeout
                && entry.conn.is_usable()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let io = self
            .shared
            .connector
            .connect()
            .await
            .map_err(SendError::Connect)?;
        let index = worker::index();
        let weak = Arc::downgrade(&self.shared);
        self.shared
            .worker(index)
            .reaper
            .call_once(|| drop(tokio::spawn(reap(weak, index))));
        Ok(Conn::new(io.into_inner()))
    }
}

/// Closes worker `index`'s connections idle for longer than the timeout, or
/// closed by the app, every half timeout, for as long as the pool exists.
/// It runs on that worker, where the connections are registered.
async fn reap(pool: Weak<Shared>, index: usize) {
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
        let expired: Vec<Idle> = {
            let mut idle = pool
                .worker(index)
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (keep, expired) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|e| now.saturating_duration_since(e.since) < pool.idle_timeout);
            *idle = keep;
            idle.retain_mut(|e| e.conn.is_usable());
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }
}
