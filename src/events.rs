//! The in-process event bus: what the sidecar saw, as typed events that
//! hooks, mail and metrics subscribe to (Django's signals, typed). Publishing
//! never waits: a subscriber that falls behind misses events and is told so
//! by `broadcast`'s lag error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::broadcast;

/// Every event type, as hooks name them.
pub const KINDS: [&str; 5] = [
    "heartbeat.failed",
    "heartbeat.passed",
    "report.received",
    "upstream.error",
    "broken_link",
];

/// How many events a slow subscriber may fall behind before it lags.
const CAPACITY: usize = 16_384;

/// One thing that happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique id (uuid4).
    pub id: String,
    /// The event type, such as `heartbeat.failed`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When it happened, RFC 3339.
    pub time: String,
    /// What happened, by type.
    pub data: EventData,
}

/// The data of each event type.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EventData {
    /// `heartbeat.failed`: the heartbeat went from passing to failing.
    HeartbeatFailed {
        /// The overall status text (`error`, `critical`).
        status: &'static str,
        /// The checks above ok, as in the heartbeat's `details`.
        checks: BTreeMap<String, CheckState>,
    },
    /// `report.received`: a browser security report was accepted.
    ReportReceived(Box<crate::reports::ReportFields>),
    /// `upstream.error`: the app answered 5xx, or the proxy answered 502/504.
    UpstreamError(Box<UpstreamError>),
    /// `broken_link`: the app answered 404 to a link from a page (rules in a
    /// later issue).
    BrokenLink(Box<BrokenLink>),
    /// `heartbeat.passed`: the heartbeat passes again.
    HeartbeatPassed {
        /// The overall status text (`ok`, `warning`, …).
        status: &'static str,
        /// The checks that were failing and no longer are.
        recovered: Vec<String>,
    },
}

/// `upstream.error` data. Everything from the request is scrubbed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamError {
    /// Request method.
    pub method: String,
    /// The Host the client asked for (or the HTTP/2 authority).
    pub host: String,
    /// Request path (no query).
    pub path: String,
    /// The query string, scrubbed, as sent (percent-encoded); none without one.
    pub query: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// The request id.
    pub request_id: String,
    /// Milliseconds from the request's arrival to the response head (or to
    /// the proxy giving up).
    pub duration_ms: u64,
    /// The client's address (the peer of the connection).
    pub client: String,
    /// Whether `client` is one of `errors.internal_ips`.
    pub internal_ip: bool,
    /// The User-Agent.
    pub user_agent: String,
    /// The request headers as received, scrubbed (`Cookie` always).
    pub headers: BTreeMap<String, String>,
    /// The first `errors.response_body_bytes` of the app's body, scrubbed;
    /// none when not configured or the proxy answered itself.
    pub body: Option<String>,
    /// Why the proxy failed, when it answered itself (502/504).
    pub cause: Option<String>,
}

/// `broken_link` data. Everything from the request is scrubbed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BrokenLink {
    /// Request method.
    pub method: String,
    /// The Host the client asked for.
    pub host: String,
    /// The missing path.
    pub path: String,
    /// Its query string, scrubbed.
    pub query: Option<String>,
    /// The page that linked to it, scrubbed.
    pub referer: String,
    /// Whether the referer is this site (`http(s)://<host>/…`).
    pub internal: bool,
    /// The browser.
    pub user_agent: String,
    /// The client's address.
    pub client: String,
    /// The request id.
    pub request_id: String,
}

/// A check's state inside an event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckState {
    /// Level name.
    pub status: &'static str,
    /// Level number.
    pub level: u8,
    /// Message id → text.
    pub messages: BTreeMap<String, String>,
}

impl Event {
    /// A new event of `kind` with `data`, now.
    pub fn new(kind: &'static str, data: EventData) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            data,
        }
    }
}

/// The bus: cloneable, one per running sidecar.
#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<Arc<Event>>,
    /// How many [`Interest`]s want each kind (indexed as [`KINDS`]).
    interest: Arc<[AtomicUsize; KINDS.len()]>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            tx: broadcast::channel(CAPACITY).0,
            interest: Arc::new(std::array::from_fn(|_| AtomicUsize::new(0))),
        }
    }
}

/// A subscriber's declared interest in some kinds, so publishers can skip
/// the work of building events nobody takes (the proxy copies request
/// headers only when someone wants `upstream.error` or `broken_link`).
/// Dropping it withdraws the interest.
pub struct Interest {
    counts: Arc<[AtomicUsize; KINDS.len()]>,
    kinds: [bool; KINDS.len()],
}

impl Interest {
    /// Replaces the kinds this subscriber wants (unknown names are ignored).
    pub fn set<S: AsRef<str>>(&mut self, kinds: &[S]) {
        let mut wanted = [false; KINDS.len()];
        for kind in kinds {
            if let Some(i) = KINDS.iter().position(|k| *k == kind.as_ref()) {
                wanted[i] = true;
            }
        }
        for (i, (&was, &now)) in self.kinds.iter().zip(&wanted).enumerate() {
            match (was, now) {
                (false, true) => {
                    self.counts[i].fetch_add(1, Ordering::Relaxed);
                }
                (true, false) => {
                    self.counts[i].fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        self.kinds = wanted;
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        self.set::<&str>(&[]);
    }
}

impl Bus {
    /// Publishes `event` to every current subscriber; never waits.
    pub fn publish(&self, event: Event) {
        // No subscriber is not an error: the event simply has no audience.
        let _ = self.tx.send(Arc::new(event));
    }

    /// A new subscription, receiving events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// A new, empty declaration of interest (see [`Interest::set`]).
    pub fn interest(&self) -> Interest {
        Interest {
            counts: self.interest.clone(),
            kinds: [false; KINDS.len()],
        }
    }

    /// True when some subscriber declared interest in `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .is_some_and(|i| self.interest[i].load(Ordering::Relaxed) > 0)
    }
}
