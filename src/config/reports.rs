//! `[reports]` (browser security report intake) and `[state]` (the local
//! SQLite file).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::ByteSize;
use super::LogLevel;

/// Browser security reports posted to the sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Paths whose POSTs are reports (exact match, query ignored).
    pub paths: Vec<String>,
    /// Also pass accepted reports on to the app.
    pub forward: bool,
    /// Largest body of one report (`application/csp-report`, Expect-CT, HPKP).
    pub max_body: ByteSize,
    /// Largest body of a Reporting API batch (`application/reports+json`).
    pub max_batch_body: ByteSize,
    /// Most reports in one batch.
    pub max_batch_reports: usize,
    /// Longest a client may take to send a report body (then 408).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Report requests per second from one client address (IPv6: one /64).
    pub rate_per_client: u32,
    /// Requests one client may send at once before `rate_per_client` applies.
    pub burst_per_client: u32,
    /// Report requests per second from everyone together.
    pub global_rate: u32,
    /// Take the client address from the last `X-Forwarded-For` entry (the
    /// one the load balancer in front added) instead of the peer.
    pub client_ip_from_forwarded_for: bool,
    /// Count but drop reports caused by browser extensions.
    pub drop_extensions: bool,
    /// Keep query strings and fragments of URLs in reports (they often carry
    /// personal data); off: they are cut before logging and storing.
    pub keep_query_strings: bool,
    /// Severity of the `report` log line.
    pub log_level: LogLevel,
    /// `Access-Control-Allow-Origin` on preflight answers and reports.
    pub cors_origin: String,
    /// `Access-Control-Max-Age` on preflight answers.
    #[serde(with = "humantime_serde")]
    pub cors_max_age: Duration,
    /// Identical reports within this window add to one stored row's count.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Stored reports older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Reports waiting for the writer at most; past that they are dropped
    /// (counted) and the browser still gets its 204.
    pub queue: usize,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            paths: vec!["/__cspreport__".into()],
            forward: false,
            max_body: ByteSize(64 * 1024),
            max_batch_body: ByteSize(1024 * 1024),
            max_batch_reports: 100,
            body_timeout: Duration::from_secs(10),
            rate_per_client: 50,
            burst_per_client: 100,
            global_rate: 20_000,
            client_ip_from_forwarded_for: false,
            drop_extensions: true,
            keep_query_strings: false,
            log_level: LogLevel::Warn,
            cors_origin: "*".into(),
            cors_max_age: Duration::from_secs(86_400),
            dedup_window: Duration::from_secs(3600),
            retention: Duration::from_secs(30 * 86_400),
            queue: 10_000,
        }
    }
}

/// The local state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The SQLite file (created if missing; WAL mode).
    pub path: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from("dockerflow-sidecar.db"),
        }
    }
}
