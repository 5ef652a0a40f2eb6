//! The in-process event bus: what the sidecar saw, as typed events that
//! hooks, mail and metrics subscribe to (Django's signals, typed). Publishing
//! never waits: a subscriber that falls behind misses events and is told so
//! by `broadcast`'s lag error.

use std::collections::BTreeMap;
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

/// `upstream.error` data.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamError {
    /// Request method.
    pub method: String,
    /// Request path (no query).
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    /// The request id.
    pub request_id: String,
    /// Why the proxy failed, when it did (502/504).
    pub cause: Option<String>,
}

/// `broken_link` data.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BrokenLink {
    /// The missing path.
    pub path: String,
    /// The page that linked to it.
    pub referer: String,
    /// Whether the referer is this site.
    pub internal: bool,
    /// The browser.
    pub user_agent: String,
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
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            tx: broadcast::channel(CAPACITY).0,
        }
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
}
