//! From events to deliveries: a subscriber renders matching events into
//! outbox rows (in batches, one fsync each), and a sender claims due rows and
//! delivers them, bounded in concurrency and time, never following
//! redirects, retrying on the schedule with jitter, honouring Retry-After,
//! and giving up at once on 410.

use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rusqlite::Connection;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, Semaphore};

use super::outbox::{self, Attempted, Row};
use super::{Secret, Template};
use crate::config::{Config, DeliveryConfig, HookConfig, HookMethod};
use crate::error_chain;
use crate::events::{Bus, Event};
use crate::reports::store::{millis, unix_ms};

type HookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Events rendered into rows per transaction, at most.
const BATCH: usize = 512;
/// How much of a receiver's answer is read (then the connection is reused).
const MAX_ANSWER: usize = 64 * 1024;
/// With nothing due, the sender sleeps until the next retry is due, until an
/// event is queued, or this long at most (rows another process made due).
const IDLE: Duration = Duration::from_secs(60);
/// Retention runs this often.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// One configured hook, ready to send.
struct Target {
    name: String,
    events: Vec<String>,
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    template: Template,
    secret: Option<Secret>,
}

impl Target {
    fn new(hook: &HookConfig, service: &str) -> Result<Target, String> {
        let uri: Uri = hook
            .url
            .parse()
            .map_err(|e| format!("hook `{}`: url: {e}", hook.name))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &hook.headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|e| format!("hook `{}`: header: {e}", hook.name))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|e| format!("hook `{}`: header: {e}", hook.name))?;
            headers.append(name, value);
        }
        let content_type = HeaderValue::try_from(hook.content_type.as_str())
            .map_err(|e| format!("hook `{}`: {e}", hook.name))?;
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("dockerflow-sidecar/", env!("CARGO_PKG_VERSION"))),
        );
        let secret = hook
            .secret
            .as_deref()
            .map(Secret::parse)
            .transpose()
            .map_err(|e| format!("hook `{}`: {e}", hook.name))?;
        Ok(Target {
            name: hook.name.clone(),
            events: hook.events.clone(),
            method: match hook.method {
                HookMethod::Post => Method::POST,
                HookMethod::Put => Method::PUT,
                HookMethod::Patch => Method::PATCH,
            },
            uri,
            headers,
            template: Template::new(hook, service)?,
            secret,
        })
    }
}

/// The hooks of a running sidecar (or of a CLI `hooks send`).
pub struct Hooks {
    targets: RwLock<Arc<Vec<Arc<Target>>>>,
    delivery: DeliveryConfig,
    db: Arc<Mutex<Connection>>,
    wake: Notify,
    /// Built on first use when no hook is configured at start-up: loading
    /// the platform's roots costs ~18 M instructions (several ms) of
    /// start-up and ~0.3 MB, for deliveries that may never happen.
    client: OnceLock<HookClient>,
    /// The event kinds the hooks take, declared on the bus once started.
    interest: Mutex<Option<crate::events::Interest>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// When the outbox gauges were last refreshed.
    stats_at: Mutex<Option<std::time::Instant>>,
}

impl Hooks {
    /// Opens the outbox and prepares the configured hooks.
    pub fn new(config: &Config, metrics: Arc<crate::metrics::Metrics>) -> Result<Hooks, String> {
        let conn = outbox::open(&config.state.path)?;
        let hooks = Hooks {
            targets: RwLock::new(Arc::new(targets(config)?)),
            delivery: config.delivery.clone(),
            db: Arc::new(Mutex::new(conn)),
            wake: Notify::new(),
            client: OnceLock::new(),
            interest: Mutex::new(None),
            metrics,
            stats_at: Mutex::new(None),
        };
        // A bad CA file is a configuration error, reported at start-up.
        if !config.hooks.is_empty() || config.delivery.ca_file.is_some() {
            hooks.client()?;
        }
        Ok(hooks)
    }

    /// The delivery client, built on first use.
    fn client(&self) -> Result<&HookClient, String> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let tls = crate::tls::client_config(self.delivery.ca_file.as_deref())
            .map_err(|e| format!("delivery.ca_file: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(self.client.get_or_init(|| client))
    }

    /// Applies the hooks of a reloaded configuration; rows already in the
    /// outbox are delivered with the hook of the same name as it is now.
    pub fn reload(&self, config: &Config) -> Result<usize, String> {
        let new = targets(config)?;
        let count = new.len();
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.declare_interest();
        Ok(count)
    }

    /// Tells the bus which kinds the current hooks take (once started).
    fn declare_interest(&self) {
        let kinds: Vec<String> = self
            .current()
            .iter()
            .flat_map(|t| t.events.iter().cloned())
            .collect();
        if let Some(interest) = self
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            interest.set(&kinds);
        }
    }

    fn current(&self) -> Arc<Vec<Arc<Target>>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Returns rows a crash left `sending` to `waiting` (at least once: they
    /// go out again with the same webhook-id), then starts the subscriber
    /// and the sender. They run until the process ends; what they have not
    /// done is in the outbox for the next start. Only the server calls this:
    /// `hooks send` must not take rows from a running sender.
    pub fn start(self: &Arc<Self>, bus: &Bus) {
        let now = unix_ms(SystemTime::now());
        match outbox::reset_sending(&self.db.lock().unwrap_or_else(|p| p.into_inner()), now) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                rows = n as u64,
                "hook deliveries interrupted by the last stop go out again"
            ),
            Err(e) => tracing::error!(error = %e, "cannot recover the hook outbox"),
        }
        let rx = bus.subscribe();
        *self.interest.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus.interest());
        self.declare_interest();
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(self.clone().enqueue_loop(rx));
        tokio::spawn(self.clone().record_loop(done_rx));
        tokio::spawn(self.clone().send_loop(done_tx));
    }

    /// Writes attempts' outcomes in batches: one transaction (one fsync)
    /// for all that finished meanwhile, not one per delivery.
    async fn record_loop(
        self: Arc<Self>,
        mut done: tokio::sync::mpsc::UnboundedReceiver<(String, Attempted)>,
    ) {
        while let Some(first) = done.recv().await {
            let mut outcomes = vec![first];
            while outcomes.len() < BATCH {
                match done.try_recv() {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(_) => break,
                }
            }
            let now = unix_ms(SystemTime::now());
            let count = outcomes.len();
            match self
                .blocking(move |conn| outbox::record_all(conn, &outcomes, now))
                .await
            {
                // A retry was scheduled, maybe sooner than the sender's sleep.
                Ok(_) => self.wake.notify_one(),
                // The rows stay `sending` and go out again at the next start.
                Err(e) => {
                    tracing::error!(error = %e, rows = count as u64, "cannot record hook deliveries")
                }
            }
        }
    }

    async fn enqueue_loop(self: Arc<Self>, mut rx: tokio::sync::broadcast::Receiver<Arc<Event>>) {
        loop {
            let first = match rx.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => {
                    tracing::error!(
                        missed,
                        "hooks fell behind the event bus: events were missed"
                    );
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let mut events = vec![first];
            while events.len() < BATCH {
                match rx.try_recv() {
                    Ok(event) => events.push(event),
                    Err(_) => break,
                }
            }
            let rows = self.render(&events);
            if rows.is_empty() {
                continue;
            }
            let db = self.db.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
                outbox::insert(&mut conn, &rows).map(|()| rows.len())
            })
            .await;
            match stored {
                Ok(Ok(_)) => self.wake.notify_one(),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot write hook deliveries to the outbox")
                }
                Err(e) => tracing::error!(error = %e, "the outbox writer failed"),
            }
        }
    }

    /// One row per event and matching hook.
    fn render(&self, events: &[Arc<Event>]) -> Vec<Row> {
        let targets = self.current();
        let now = unix_ms(SystemTime::now());
        let mut rows = Vec::new();
        for event in events {
            for target in targets
                .iter()
                .filter(|t| t.events.iter().any(|e| e == event.kind))
            {
                match target.template.render(event) {
                    Ok(body) => rows.push(Row {
                        id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                        hook: target.name.clone(),
                        event_type: event.kind.to_owned(),
                        body,
                        status: "waiting".into(),
                        attempts: 0,
                        next_attempt: now,
                        last_status: None,
                        last_error: None,
                        created: now,
                        updated: now,
                    }),
                    Err(e) => {
                        tracing::error!(hook = %target.name, error = %e, "cannot render a hook body")
                    }
                }
            }
        }
        rows
    }

    async fn send_loop(
        self: Arc<Self>,
        done: tokio::sync::mpsc::UnboundedSender<(String, Attempted)>,
    ) {
        let slots = Arc::new(Semaphore::new(self.delivery.concurrency.max(1)));
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                let before =
                    unix_ms(SystemTime::now()).saturating_sub(millis(self.delivery.retention));
                let _ = self.blocking(move |conn| outbox::prune(conn, before)).await;
                last_prune = Some(std::time::Instant::now());
            }
            let limit = (self.delivery.concurrency.max(1) * 16).max(64);
            let now = unix_ms(SystemTime::now());
            let (rows, next) = match self
                .blocking(move |conn| outbox::claim_due(conn, now, limit))
                .await
            {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the hook outbox");
                    (Vec::new(), Some(now + 1000))
                }
            };
            if rows.is_empty() {
                // An idle sidecar does not wake to ask SQLite: it sleeps
                // until the next retry, a new row, or the next prune. (The
                // claim may have waited for the file's lock: now again.)
                let now = unix_ms(SystemTime::now());
                let pause = next
                    .map(|at| Duration::from_millis(at.saturating_sub(now).max(1) as u64))
                    .unwrap_or(IDLE)
                    .min(IDLE)
                    .min(
                        PRUNE_EVERY
                            .saturating_sub(last_prune.map_or(PRUNE_EVERY, |at| at.elapsed())),
                    );
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            for row in rows {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let hooks = self.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let outcome = hooks.attempt(&row).await;
                    drop(slot);
                    let counted = match outcome.status {
                        "sent" => "sent",
                        "waiting" => "retry",
                        _ => "error",
                    };
                    hooks.metrics.hook_delivery(&row.hook, counted);
                    let _ = done.send((row.id, outcome));
                });
            }
        }
    }

    /// Delivers claimed rows once each, now (the CLI's `hooks send`);
    /// returns each row with what the attempt left it as.
    pub async fn send_now(&self, ids: Vec<String>) -> Result<Vec<(Row, Attempted)>, String> {
        let now = unix_ms(SystemTime::now());
        let rows = self
            .blocking(move |conn| outbox::claim(conn, &ids, now))
            .await
            .map_err(|e| e.to_string())?;
        let mut done = Vec::new();
        for row in rows {
            let outcome = self.attempt(&row).await;
            self.finish(&row, outcome.clone()).await;
            done.push((row, outcome));
        }
        Ok(done)
    }

    /// Refreshes the outbox gauges (rows by status, oldest waiting row), at
    /// most once a second whatever the scrape rate: the query holds the
    /// outbox connection that deliveries use.
    pub async fn update_metrics(&self) {
        {
            let mut last = self.stats_at.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        match self.blocking(|conn| outbox::stats(conn)).await {
            Ok((rows, oldest)) => {
                let now = unix_ms(SystemTime::now());
                let age = oldest.map(|created| {
                    Duration::from_millis(now.saturating_sub(created).max(0) as u64)
                });
                self.metrics.outbox(&rows, age);
            }
            Err(e) => tracing::error!(error = %e, "cannot read the hook outbox for metrics"),
        }
    }

    async fn finish(&self, row: &Row, outcome: Attempted) {
        let id = row.id.clone();
        let now = unix_ms(SystemTime::now());
        let recorded = self
            .blocking(move |conn| outbox::record(conn, &id, &outcome, now))
            .await;
        if let Err(e) = recorded {
            tracing::error!(id = %row.id, error = %e, "cannot record a hook delivery");
        }
    }

    /// One attempt at delivering `row`.
    async fn attempt(&self, row: &Row) -> Attempted {
        let attempts = row.attempts + 1;
        let targets = self.current();
        let Some(target) = targets.iter().find(|t| t.name == row.hook) else {
            return self.give_up(
                attempts,
                None,
                format!("hook `{}` is no longer configured", row.hook),
            );
        };
        let mut req = Request::new(Full::new(Bytes::from(row.body.clone())));
        *req.method_mut() = target.method.clone();
        *req.uri_mut() = target.uri.clone();
        *req.headers_mut() = target.headers.clone();
        // webhook-id and -timestamp always (receivers deduplicate on the
        // id); the signature when the hook has a secret.
        let timestamp = unix_ms(SystemTime::now()) / 1000;
        let signature = target
            .secret
            .as_ref()
            .map(|s| s.sign(&row.id, timestamp, row.body.as_bytes()));
        let standard = [
            ("webhook-id", Some(row.id.clone())),
            ("webhook-timestamp", Some(timestamp.to_string())),
            ("webhook-signature", signature),
        ];
        for (name, value) in standard {
            if let Some(value) = value.and_then(|v| HeaderValue::try_from(v).ok()) {
                req.headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
        }
        let exchange = async {
            let resp = self
                .client()?
                .request(req)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(retry_after);
            // Read (a bounded part of) the answer so the connection can be reused.
            let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
            Ok::<_, String>((status, retry_after))
        };
        match tokio::time::timeout(self.delivery.timeout, exchange).await {
            Ok(Ok((status, _))) if status.is_success() => Attempted {
                status: "sent",
                attempts,
                next_attempt: 0,
                last_status: Some(status.as_u16().into()),
                last_error: None,
            },
            Ok(Ok((status, _))) if status == http::StatusCode::GONE => self.give_up(
                attempts,
                Some(410),
                "gone: the receiver answered 410".into(),
            ),
            Ok(Ok((status, retry_after))) => self.retry(
                attempts,
                Some(status.as_u16().into()),
                format!("the receiver answered {}", status.as_u16()),
                retry_after,
            ),
            Ok(Err(e)) => self.retry(attempts, None, e, None),
            Err(_) => self.retry(
                attempts,
                None,
                format!(
                    "no answer within {}",
                    humantime::format_duration(self.delivery.timeout)
                ),
                None,
            ),
        }
    }

    fn give_up(&self, attempts: i64, last_status: Option<i64>, error: String) -> Attempted {
        Attempted {
            status: "error",
            attempts,
            next_attempt: 0,
            last_status,
            last_error: Some(error),
        }
    }

    /// The next attempt per the schedule (±20 %), or what Retry-After asks;
    /// `error` once the schedule is used up.
    fn retry(
        &self,
        attempts: i64,
        last_status: Option<i64>,
        error: String,
        retry_after: Option<Duration>,
    ) -> Attempted {
        let schedule = &self.delivery.retry_schedule;
        let Some(wait) = usize::try_from(attempts - 1)
            .ok()
            .and_then(|i| schedule.get(i))
        else {
            return self.give_up(
                attempts,
                last_status,
                format!("{error} (after {attempts} attempts)"),
            );
        };
        let jittered = wait.0.mul_f64(0.8 + 0.4 * fastrand::f64());
        let delay = retry_after.map_or(jittered, |asked| asked.min(Duration::from_secs(86_400)));
        Attempted {
            status: "waiting",
            attempts,
            next_attempt: unix_ms(SystemTime::now()).saturating_add(millis(delay)),
            last_status,
            last_error: Some(error),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || {
            f(&mut db.lock().unwrap_or_else(|p| p.into_inner()))
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(rusqlite::Error::ExecuteReturnedResults),
        }
    }
}

fn targets(config: &Config) -> Result<Vec<Arc<Target>>, String> {
    config
        .hooks
        .iter()
        .map(|h| Target::new(h, &config.logging.logger).map(Arc::new))
        .collect()
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}
