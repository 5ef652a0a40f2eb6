//! Every Prometheus metric the sidecar exports, defined here and nowhere
//! else. Names follow Prometheus conventions: the `dockerflow_sidecar_`
//! prefix, base units (`_seconds`, `_bytes`), `_total` for counters.
//!
//! Request-path updates are lock-free and allocation-free: every labelled
//! child used per request (route × method × status class, the duration
//! histograms) is resolved once here, and an update is an atomic add.
//! Label sets that come from configuration (check and hook names) or from a
//! bounded list (report types) are resolved off the request path.

use std::time::Duration;

use http::Method;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The prefix of every sidecar metric.
pub const PREFIX: &str = "dockerflow_sidecar";

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// Forwarded to the app.
    Proxy = 0,
    /// `/__version__`, `/__heartbeat__`, `/__lbheartbeat__`.
    Dockerflow = 1,
    /// A report path.
    Report = 2,
    /// Refused before routing (malformed, 400/431).
    Malformed = 3,
}

const ROUTES: [&str; 4] = ["proxy", "dockerflow", "report", "malformed"];
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Report types with their own label value; any other is `other` (the type
/// comes from the browser, so it must not mint label values).
const REPORT_TYPES: [&str; 12] = [
    "csp-violation",
    "network-error",
    "expect-ct",
    "hpkp",
    "deprecation",
    "intervention",
    "crash",
    "coep",
    "coop",
    "document-policy-violation",
    "permissions-policy-violation",
    "integrity-violation",
];

/// What happened to one accepted report.
#[derive(Debug, Clone, Copy)]
pub enum ReportOutcome {
    /// A new row.
    Stored = 0,
    /// Folded into an identical row (its count grew).
    Deduplicated = 1,
    /// Browser-extension noise, counted and dropped.
    Noise = 2,
    /// Queue full, or the write failed.
    Dropped = 3,
}

const REPORT_OUTCOMES: [&str; 4] = ["stored", "deduplicated", "noise", "dropped"];

/// Why a report request was refused before any report was read.
pub const REJECTIONS: [&str; 6] = [
    "method",
    "content_type",
    "rate_limited",
    "too_large",
    "timeout",
    "invalid",
];

/// Every metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    durations: Vec<Histogram>,
    /// Request body bytes received from clients (forwarded or read).
    pub request_bytes: IntCounter,
    /// Response body bytes sent to clients.
    pub response_bytes: IntCounter,
    /// Client connections open now.
    pub open_connections: IntGauge,
    /// Upgraded tunnels (WebSocket…) open now.
    pub open_tunnels: IntGauge,
    /// Connections to the app that could not be opened.
    pub upstream_connect_errors: IntCounter,
    /// Requests the app did not answer in time (504).
    pub upstream_timeouts: IntCounter,
    /// Requests sent again on a new connection after a pooled one was lost.
    pub upstream_retries: IntCounter,
    /// Log lines dropped because stdout could not keep up (brought up to
    /// date at each scrape).
    pub log_lines_dropped: IntCounter,
    /// Connections to the app open now, in use or idle in the pool.
    pub upstream_connections: IntGauge,
    check_level: IntGaugeVec,
    check_duration: GaugeVec,
    /// The checks of the last round, to drop those that disappear.
    checks_shown: std::sync::Mutex<Vec<String>>,
    /// The heartbeat's overall level (0 ok … 50 critical).
    pub heartbeat_level: IntGauge,
    reports: Vec<IntCounter>,
    rejections: Vec<IntCounter>,
    hook_deliveries: IntCounterVec,
    outbox_rows: IntGaugeVec,
    /// Age of the oldest outbox row still waiting, in seconds (0: none).
    pub outbox_oldest_waiting: Gauge,
    mail: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("{PREFIX}_{name}"), help)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            opts(
                "requests_total",
                "Requests answered, by route class, method and status class.",
            ),
            &["route", "method", "code"],
        )
        .expect("valid metric");
        let mut requests = Vec::with_capacity(ROUTES.len() * METHODS.len() * CLASSES.len());
        for route in ROUTES {
            for method in METHODS {
                for class in CLASSES {
                    requests.push(requests_vec.with_label_values(&[route, method, class]));
                }
            }
        }
        let durations_vec = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}_request_duration_seconds"),
                "Time from a request's arrival to the end of its response, by route class.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let durations = ROUTES
            .iter()
            .map(|r| durations_vec.with_label_values(&[r]))
            .collect();
        let reports_vec = IntCounterVec::new(
            opts(
                "reports_total",
                "Browser reports accepted, by type and what became of them.",
            ),
            &["type", "outcome"],
        )
        .expect("valid metric");
        let mut reports = Vec::new();
        for kind in REPORT_TYPES.iter().chain(&["other"]) {
            for outcome in REPORT_OUTCOMES {
                reports.push(reports_vec.with_label_values(&[kind, outcome]));
            }
        }
        let rejections_vec = IntCounterVec::new(
            opts(
                "report_requests_rejected_total",
                "Report requests refused before any report was read, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let rejections = REJECTIONS
            .iter()
            .map(|r| rejections_vec.with_label_values(&[r]))
            .collect();
        let build_info = IntGaugeVec::new(
            opts("build_info", "The running build: always 1."),
            &["version", "commit"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("DOCKERFLOW_SIDECAR_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        let counter =
            |name: &str, help: &str| IntCounter::with_opts(opts(name, help)).expect("valid metric");
        let gauge =
            |name: &str, help: &str| IntGauge::with_opts(opts(name, help)).expect("valid metric");
        let metrics = Metrics {
            requests,
            durations,
            request_bytes: counter(
                "request_body_bytes_total",
                "Request body bytes received from clients.",
            ),
            response_bytes: counter(
                "response_body_bytes_total",
                "Response body bytes sent to clients.",
            ),
            open_connections: gauge("open_connections", "Client connections open now."),
            open_tunnels: gauge(
                "open_tunnels",
                "Upgraded connections (WebSocket and others) open now.",
            ),
            upstream_connect_errors: counter(
                "upstream_connect_errors_total",
                "Connections to the app that could not be opened.",
            ),
            upstream_timeouts: counter(
                "upstream_timeouts_total",
                "Requests the app did not answer within upstream.response_header_timeout.",
            ),
            log_lines_dropped: counter(
                "log_lines_dropped_total",
                "Log lines (request.summary and others) dropped because stdout could not keep up and the 16 MiB buffer was full.",
            ),
            upstream_retries: counter(
                "upstream_retries_total",
                "Requests sent again on a new connection because the pooled connection they went on was closed by the app before answering (only requests never written, or idempotent ones without a body).",
            ),
            upstream_connections: gauge(
                "upstream_connections",
                "Connections to the app open now, in use or idle in the pool.",
            ),
            check_level: IntGaugeVec::new(
                opts(
                    "heartbeat_check_level",
                    "Each heartbeat check's level in the last round (0 ok, 10 debug, 20 info, 30 warning, 40 error, 50 critical).",
                ),
                &["check"],
            )
            .expect("valid metric"),
            check_duration: GaugeVec::new(
                opts(
                    "heartbeat_check_duration_seconds",
                    "How long each heartbeat check took in the last round.",
                ),
                &["check"],
            )
            .expect("valid metric"),
            checks_shown: std::sync::Mutex::new(Vec::new()),
            heartbeat_level: gauge(
                "heartbeat_level",
                "The heartbeat's overall level in the last round (the worst check's).",
            ),
            reports,
            rejections,
            hook_deliveries: IntCounterVec::new(
                opts(
                    "hook_deliveries_total",
                    "Hook delivery attempts, by hook and outcome (sent, retry, error).",
                ),
                &["hook", "outcome"],
            )
            .expect("valid metric"),
            outbox_rows: IntGaugeVec::new(
                opts(
                    "hook_outbox_rows",
                    "Rows in the hook outbox, by status.",
                ),
                &["status"],
            )
            .expect("valid metric"),
            outbox_oldest_waiting: Gauge::with_opts(opts(
                "hook_outbox_oldest_waiting_seconds",
                "Age of the oldest outbox row still waiting to be sent (0 when none).",
            ))
            .expect("valid metric"),
            mail: IntCounterVec::new(
                opts(
                    "mail_total",
                    "Error mail, by outcome (sent, suppressed, failed, dropped).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(requests_vec),
            Box::new(durations_vec),
            Box::new(metrics.request_bytes.clone()),
            Box::new(metrics.response_bytes.clone()),
            Box::new(metrics.open_connections.clone()),
            Box::new(metrics.open_tunnels.clone()),
            Box::new(metrics.upstream_connect_errors.clone()),
            Box::new(metrics.upstream_timeouts.clone()),
            Box::new(metrics.upstream_retries.clone()),
            Box::new(metrics.log_lines_dropped.clone()),
            Box::new(metrics.upstream_connections.clone()),
            Box::new(metrics.check_level.clone()),
            Box::new(metrics.check_duration.clone()),
            Box::new(metrics.heartbeat_level.clone()),
            Box::new(reports_vec),
            Box::new(rejections_vec),
            Box::new(metrics.hook_deliveries.clone()),
            Box::new(metrics.outbox_rows.clone()),
            Box::new(metrics.outbox_oldest_waiting.clone()),
            Box::new(metrics.mail.clone()),
            Box::new(build_info),
            #[cfg(target_os = "linux")]
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        for status in ["waiting", "sending", "sent", "error"] {
            metrics.outbox_rows.with_label_values(&[status]).set(0);
        }
        for outcome in ["sent", "suppressed", "failed", "dropped"] {
            metrics.mail.with_label_values(&[outcome]);
        }
        metrics
    }

    /// Counts one finished request.
    pub fn request(&self, route: RouteClass, method: Option<&Method>, code: u16, took: Duration) {
        let method = method.map_or(METHODS.len() - 1, method_index);
        let class = match code {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let route = route as usize;
        self.requests[(route * METHODS.len() + method) * CLASSES.len() + class].inc();
        // A tunnel (101) is counted when it closes; how long it stayed open
        // is not a response time.
        if code != 101 {
            self.durations[route].observe(took.as_secs_f64());
        }
    }

    /// Counts a report by its (browser-given) type and outcome.
    pub fn report(&self, kind: &str, outcome: ReportOutcome) {
        let kind = REPORT_TYPES
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(REPORT_TYPES.len());
        self.reports[kind * REPORT_OUTCOMES.len() + outcome as usize].inc();
    }

    /// Counts a refused report request; `reason` is one of [`REJECTIONS`].
    pub fn report_rejected(&self, reason: &str) {
        if let Some(i) = REJECTIONS.iter().position(|r| *r == reason) {
            self.rejections[i].inc();
        }
    }

    /// Records a round of heartbeat checks: each one's level and duration.
    /// Checks of the previous round that are gone (a merged check the app
    /// no longer reports) stop being exported.
    pub fn checks(&self, round: &[(&str, u8, Duration)]) {
        let mut shown = self.checks_shown.lock().unwrap_or_else(|p| p.into_inner());
        for gone in shown
            .iter()
            .filter(|n| !round.iter().any(|(name, ..)| name == n))
        {
            let _ = self.check_level.remove_label_values(&[gone]);
            let _ = self.check_duration.remove_label_values(&[gone]);
        }
        for (name, level, took) in round {
            self.check_level
                .with_label_values(&[name])
                .set(i64::from(*level));
            self.check_duration
                .with_label_values(&[name])
                .set(took.as_secs_f64());
        }
        *shown = round.iter().map(|(name, ..)| (*name).to_owned()).collect();
    }

    /// Counts one hook delivery attempt (`sent`, `retry`, `error`).
    pub fn hook_delivery(&self, hook: &str, outcome: &str) {
        self.hook_deliveries
            .with_label_values(&[hook, outcome])
            .inc();
    }

    /// Sets the outbox row counts (statuses not given are 0).
    pub fn outbox(&self, rows: &[(String, i64)], oldest_waiting: Option<Duration>) {
        for status in ["waiting", "sending", "sent", "error"] {
            let n = rows
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.outbox_rows.with_label_values(&[status]).set(n);
        }
        self.outbox_oldest_waiting
            .set(oldest_waiting.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Counts mail by outcome (`sent`, `suppressed`, `failed`, `dropped`).
    pub fn mail(&self, outcome: &str, n: u64) {
        self.mail.with_label_values(&[outcome]).inc_by(n);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

fn method_index(method: &Method) -> usize {
    let index = match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    };
    index.min(METHODS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counters_land_on_their_labels() {
        let m = Metrics::new();
        m.request(
            RouteClass::Proxy,
            Some(&Method::GET),
            200,
            Duration::from_millis(3),
        );
        m.request(
            RouteClass::Proxy,
            Some(&Method::GET),
            204,
            Duration::from_millis(3),
        );
        m.request(RouteClass::Report, Some(&Method::POST), 429, Duration::ZERO);
        m.request(RouteClass::Malformed, None, 400, Duration::ZERO);
        m.request(
            RouteClass::Proxy,
            Some(&Method::from_bytes(b"PURGE").unwrap()),
            503,
            Duration::ZERO,
        );
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "dockerflow_sidecar_requests_total{code=\"2xx\",method=\"GET\",route=\"proxy\"} 2",
            "dockerflow_sidecar_requests_total{code=\"4xx\",method=\"POST\",route=\"report\"} 1",
            "dockerflow_sidecar_requests_total{code=\"4xx\",method=\"other\",route=\"malformed\"} 1",
            "dockerflow_sidecar_requests_total{code=\"5xx\",method=\"other\",route=\"proxy\"} 1",
            "dockerflow_sidecar_request_duration_seconds_count{route=\"proxy\"} 3",
            "dockerflow_sidecar_build_info{commit=",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn report_types_from_browsers_cannot_mint_labels() {
        let m = Metrics::new();
        m.report("csp-violation", ReportOutcome::Stored);
        m.report("made-up-by-an-attacker", ReportOutcome::Stored);
        m.report("another-one", ReportOutcome::Noise);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "dockerflow_sidecar_reports_total{outcome=\"stored\",type=\"csp-violation\"} 1"
        ));
        assert!(
            text.contains("dockerflow_sidecar_reports_total{outcome=\"stored\",type=\"other\"} 1")
        );
        assert!(!text.contains("attacker"));
    }
}
