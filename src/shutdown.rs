//! The shutdown sequence's shared state: draining (health routes fail, traffic
//! still served), then stopping (listener closed, connections asked to finish),
//! and the tracker of every connection and tunnel that must end first.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One per running sidecar, shared by the server, the routes and the proxy.
#[derive(Default)]
pub struct Shutdown {
    /// Set when the first signal arrives; health routes answer 503.
    draining: AtomicBool,
    /// When draining started (a signal, or `POST /drain` before it).
    drain_started: std::sync::OnceLock<std::time::Instant>,
    /// Cancelled when the drain period is over: connections finish their
    /// in-flight request and close.
    stop: CancellationToken,
    /// Every connection task and tunnel; shutdown waits for it to empty.
    tracker: TaskTracker,
}

impl Shutdown {
    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining (again is a no-op: the first start counts).
    pub fn start_draining(&self) {
        self.drain_started.get_or_init(std::time::Instant::now);
        self.draining.store(true, Ordering::Relaxed);
    }

    /// How long draining has been going on (zero when it has not started).
    pub fn draining_for(&self) -> std::time::Duration {
        self.drain_started
            .get()
            .map_or(std::time::Duration::ZERO, |t| t.elapsed())
    }

    /// Asks every connection to close once its in-flight work is done.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// True once `stop` has been called.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when `stop` has been called.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Where connections and tunnels are spawned.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}
