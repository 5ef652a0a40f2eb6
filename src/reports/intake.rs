//! The report endpoint: CORS preflight, method and content type, rate
//! limits and size limits before parsing, then per report: understand,
//! drop extension noise, clean, log, queue for storage, publish. Every
//! answer is a 2xx or a 4xx with a short reason, whatever the input.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::body::ClientBody;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::schema::{self, Report, SchemaError};
use super::store::{unix_ms, ReportStore, StoredReport};
use super::{clean, ReportFields};
use crate::body::ResponseBody;
use crate::config::{Config, LogLevel, ReportsConfig};
use crate::events::{Bus, Event, EventData};
use crate::metrics::{Metrics, ReportOutcome};
use crate::mozlog::{Logger, Severity};

/// Clean the keyed limiter's idle entries every this many requests.
const RETAIN_EVERY: u64 = 4096;

/// What intake counted since start (metrics read these later).
#[derive(Debug, Default)]
pub struct Counters {
    /// Reports understood.
    pub received: AtomicU64,
    /// Reports queued for storage.
    pub queued: AtomicU64,
    /// Reports dropped as browser-extension noise.
    pub noise: AtomicU64,
    /// Requests answered 4xx.
    pub rejected: AtomicU64,
    /// Requests answered 429.
    pub limited: AtomicU64,
}

/// The intake, one per running sidecar.
pub struct Intake {
    config: ReportsConfig,
    store: ReportStore,
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    global: DefaultDirectRateLimiter,
    requests: AtomicU64,
    bus: Bus,
    logger: Arc<Logger>,
    /// Masks secrets in kept query strings and in report bodies.
    scrubber: Arc<crate::scrub::Scrubber>,
    metrics: Arc<Metrics>,
    /// What was counted.
    pub counters: Counters,
}

/// What the router does after intake: answer, and maybe pass a copy on.
pub struct Outcome {
    /// The answer to the browser.
    pub response: Response<ResponseBody>,
    /// The accepted body, when `forward` asks to pass it on to the app.
    pub forward: Option<Bytes>,
}

impl Intake {
    /// Opens the store and sets up the limits from `config.reports`.
    pub fn new(
        config: &Config,
        bus: Bus,
        logger: Arc<Logger>,
        scrubber: Arc<crate::scrub::Scrubber>,
        metrics: Arc<Metrics>,
    ) -> Result<Intake, String> {
        let reports = config.reports.clone();
        let store = ReportStore::start(
            &config.state.path,
            reports.dedup_window,
            reports.retention,
            reports.queue,
            metrics.clone(),
        )?;
        let per_second = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let per_client = RateLimiter::keyed(
            Quota::per_second(per_second(reports.rate_per_client))
                .allow_burst(per_second(reports.burst_per_client)),
        );
        let global = RateLimiter::direct(Quota::per_second(per_second(reports.global_rate)));
        Ok(Intake {
            config: reports,
            store,
            per_client,
            global,
            requests: AtomicU64::new(0),
            bus,
            logger,
            scrubber,
            metrics,
            counters: Counters::default(),
        })
    }

    /// True when `path` is a report path.
    pub fn matches(&self, path: &str) -> bool {
        self.config.paths.iter().any(|p| p == path)
    }

    /// Waits until every queued report is stored (at shutdown); false when
    /// the time ran out first.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.store.flush(timeout)
    }

    /// Reports dropped because the store's queue was full.
    pub fn dropped(&self) -> u64 {
        self.store.dropped()
    }

    /// Answers one request to a report path.
    pub async fn handle(&self, req: Request<ClientBody>, peer: SocketAddr) -> Outcome {
        let outcome = self.intake(req, peer).await;
        let status = outcome.response.status();
        if status.is_client_error() {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            self.metrics.report_rejected(match status {
                StatusCode::METHOD_NOT_ALLOWED => "method",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "content_type",
                StatusCode::TOO_MANY_REQUESTS => "rate_limited",
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                StatusCode::REQUEST_TIMEOUT => "timeout",
                _ => "invalid",
            });
        }
        outcome
    }

    async fn intake(&self, req: Request<ClientBody>, peer: SocketAddr) -> Outcome {
        if req.method() == Method::OPTIONS {
            return self.answer(self.preflight());
        }
        if req.method() != Method::POST {
            let mut resp = self.text(StatusCode::METHOD_NOT_ALLOWED, "reports are POSTed");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
            return self.answer(resp);
        }
        let Some(limit) = self.body_limit(req.headers()) else {
            return self.answer(self.text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected application/csp-report, application/reports+json, application/json or application/expect-ct-report+json",
            ));
        };
        if !self.admit(client_ip(
            &req,
            peer,
            self.config.client_ip_from_forwarded_for,
        )) {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            let mut resp = self.text(StatusCode::TOO_MANY_REQUESTS, "too many reports");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return self.answer(resp);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return self.answer(self.text(StatusCode::PAYLOAD_TOO_LARGE, "report body too large"));
        }
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let read = tokio::time::timeout(
            self.config.body_timeout,
            Limited::new(req.into_body(), limit).collect(),
        );
        let body = match read.await {
            Ok(Ok(body)) => {
                let body = body.to_bytes();
                self.metrics.request_bytes.inc_by(body.len() as u64);
                body
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return self
                    .answer(self.text(StatusCode::PAYLOAD_TOO_LARGE, "report body too large"))
            }
            Ok(Err(_)) => {
                return self
                    .answer(self.text(StatusCode::BAD_REQUEST, "the body could not be read"))
            }
            Err(_) => {
                let mut resp = self.text(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body took too long to arrive",
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return self.answer(resp);
            }
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return self.answer(self.text(StatusCode::BAD_REQUEST, "the body is not UTF-8"));
        };
        let json: serde_json::Value = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(e) => {
                let reason = format!("the body is not JSON ({e})");
                return self.answer(self.owned_text(StatusCode::BAD_REQUEST, reason));
            }
        };
        let batch = match schema::parse(json, user_agent.as_deref(), self.config.max_batch_reports)
        {
            Ok(batch) => batch,
            Err(e @ SchemaError::TooMany(_)) => {
                return self.answer(self.owned_text(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))
            }
            Err(e) => return self.answer(self.owned_text(StatusCode::BAD_REQUEST, e.to_string())),
        };
        let now = SystemTime::now();
        for report in batch.reports {
            self.accept(report, now);
        }
        let mut resp = Response::new(ResponseBody::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        Outcome {
            response: self.with_cors(resp),
            forward: self.config.forward.then_some(body),
        }
    }

    /// One understood report: noise is counted and dropped; the rest is
    /// cleaned, logged, queued and published.
    fn accept(&self, report: Report, now: SystemTime) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        if self.config.drop_extensions && report.is_extension_noise() {
            self.counters.noise.fetch_add(1, Ordering::Relaxed);
            self.metrics.report(&report.kind, ReportOutcome::Noise);
            return;
        }
        let keep = self.config.keep_query_strings;
        let mut secrets = crate::scrub::Secrets::default();
        let mut url = |u: &Option<String>| {
            u.as_deref().map(|u| {
                if keep {
                    // Kept, but never with a password or a token in it.
                    clean::text(&self.scrubber.url(u, &mut secrets))
                } else {
                    clean::text(&clean::cut_query(u))
                }
            })
        };
        let fields = ReportFields {
            // Time-ordered (v7): rows are appended to the id index instead of
            // scattered through it, which keeps inserts fast.
            id: uuid::Uuid::now_v7().to_string(),
            kind: clean::text(&report.kind),
            url: url(&report.document_url),
            directive: report.directive.as_deref().map(clean::text),
            blocked_url: url(&report.blocked_url),
            disposition: report.disposition.as_deref().map(clean::text),
            source_file: url(&report.source_file),
            line: report.line,
            column: report.column,
            status_code: report.status_code,
            user_agent: report.user_agent.as_deref().map(clean::text),
            age: report.age_ms,
        };
        let mut body = report.body;
        if !keep {
            clean::cut_queries_in(&mut body);
        }
        self.scrubber.json(&mut body, &mut secrets);
        let created = unix_ms(now);
        let stored = StoredReport {
            id: fields.id.clone(),
            kind: fields.kind.clone(),
            url: fields.url.clone(),
            body: body.to_string(),
            created,
            incident: created - report.age_ms.min(i64::MAX as u64) as i64,
            last_seen: created,
            count: 1,
            directive: fields.directive.clone(),
            blocked_url: fields.blocked_url.clone(),
            disposition: fields.disposition.clone(),
            source_file: fields.source_file.clone(),
            line: fields.line.map(|n| n.min(i64::MAX as u64) as i64),
            column: fields.column.map(|n| n.min(i64::MAX as u64) as i64),
            status_code: fields.status_code.map(|n| n.min(i64::MAX as u64) as i64),
            user_agent: fields.user_agent.clone(),
            dedup_key: dedup_key(&fields),
        };
        self.log(&fields);
        if self.store.submit(stored) {
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
        }
        self.bus.publish(Event::new(
            "report.received",
            EventData::ReportReceived(Box::new(fields)),
        ));
    }

    fn log(&self, fields: &ReportFields) {
        let severity = match self.config.log_level {
            LogLevel::Error => Severity::Error,
            LogLevel::Warn => Severity::Warning,
            LogLevel::Info => Severity::Info,
            LogLevel::Debug => Severity::Debug,
        };
        self.logger.emit("report", severity, fields, |s| {
            s.push_str(&format!(
                " {} {} {} blocked={}",
                fields.kind,
                fields.url.as_deref().unwrap_or("-"),
                fields.directive.as_deref().unwrap_or("-"),
                fields.blocked_url.as_deref().unwrap_or("-")
            ));
        });
    }

    /// The body limit for the request's content type; `None` when the
    /// type is not one browsers send reports as.
    fn body_limit(&self, headers: &HeaderMap) -> Option<usize> {
        let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let media = value.split(';').next()?.trim().to_ascii_lowercase();
        let limit = match media.as_str() {
            "application/csp-report" | "application/expect-ct-report+json" => {
                self.config.max_body.0
            }
            "application/reports+json" | "application/json" => self.config.max_batch_body.0,
            _ => return None,
        };
        Some(usize::try_from(limit).unwrap_or(usize::MAX))
    }

    /// Global, then per-client rate limits (so a request the global cap
    /// refuses costs the client nothing); also keeps the per-client table
    /// small.
    fn admit(&self, client: IpAddr) -> bool {
        if self.requests.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.per_client.retain_recent();
        }
        self.global.check().is_ok() && self.per_client.check_key(&client_key(client)).is_ok()
    }

    fn preflight(&self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let headers = resp.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type"),
        );
        if let Ok(age) = HeaderValue::from_str(&self.config.cors_max_age.as_secs().to_string()) {
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, age);
        }
        self.with_cors(resp)
    }

    fn with_cors(&self, mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
        if let Ok(origin) = HeaderValue::from_str(&self.config.cors_origin) {
            resp.headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        resp
    }

    fn text(&self, status: StatusCode, reason: &'static str) -> Response<ResponseBody> {
        self.with_cors(crate::dockerflow::text(status, reason))
    }

    fn owned_text(&self, status: StatusCode, reason: String) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::full(reason));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        self.with_cors(resp)
    }

    fn answer(&self, response: Response<ResponseBody>) -> Outcome {
        Outcome {
            response,
            forward: None,
        }
    }
}

/// The client's address: the peer, or the last `X-Forwarded-For` entry (the
/// one the load balancer in front of the sidecar added) when configured.
fn client_ip(req: &Request<ClientBody>, peer: SocketAddr, from_forwarded_for: bool) -> IpAddr {
    if from_forwarded_for {
        let last = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .next_back();
        if let Some(ip) = last {
            return ip.to_canonical();
        }
    }
    peer.ip().to_canonical()
}

/// The rate-limit key of a client: its address, or its /64 for IPv6 (one
/// host usually owns a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// What makes two reports the same: type, document (without query),
/// directive, disposition, blocked URL and source position. FNV-1a, so the
/// key is the same across builds and restarts.
fn dedup_key(fields: &ReportFields) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |part: &[u8]| {
        for byte in part.iter().chain([&0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    feed(fields.kind.as_bytes());
    feed(clean::cut_query(&text(&fields.url)).as_bytes());
    feed(text(&fields.directive).as_bytes());
    feed(text(&fields.disposition).as_bytes());
    feed(text(&fields.blocked_url).as_bytes());
    feed(text(&fields.source_file).as_bytes());
    feed(&fields.line.unwrap_or(u64::MAX).to_le_bytes());
    feed(&fields.column.unwrap_or(u64::MAX).to_le_bytes());
    hash as i64
}
