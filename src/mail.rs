//! Error mail, as Django sends it: server errors to `admins`, broken links
//! to `managers`, from the `upstream.error` and `broken_link` events.
//!
//! Off the request path: a subscriber decides (rate limits, builds the
//! message) and hands messages to a sender task through a small queue. An
//! SMTP outage costs failed deliveries, counted and logged, never a request.
//! Mail is best effort: what must not be lost goes through hooks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::config::{Config, EmailConfig, EmailTls};
use crate::events::{BrokenLink, Bus, Event, EventData, Interest, UpstreamError};

/// Messages decided on but not yet sent, at most; beyond, they are dropped.
const QUEUE: usize = 64;
/// Distinct (kind, status, path) keys remembered for rate limiting, at most.
const MAX_KEYS: usize = 10_000;

/// Counts of what happened to mail, for logs and metrics.
#[derive(Debug, Default)]
pub struct MailStats {
    /// Messages the SMTP server accepted.
    pub sent: AtomicU64,
    /// Events not mailed because of the rate limits.
    pub suppressed: AtomicU64,
    /// Messages the SMTP server did not take (down, refused, timed out).
    pub failed: AtomicU64,
    /// Messages dropped because the queue to the SMTP server was full, or
    /// events missed because the mailer fell behind the bus.
    pub dropped: AtomicU64,
}

/// Sends error mail (when `notify.email.host` is set).
pub struct Mailer {
    inner: Option<Arc<Inner>>,
    interest: Mutex<Option<Interest>>,
}

struct Inner {
    from: Mailbox,
    admins: Vec<Mailbox>,
    managers: Vec<Mailbox>,
    subject_prefix: String,
    internal_ips_known: bool,
    window: Duration,
    max_per_window: u32,
    timeout: Duration,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    stats: MailStats,
    metrics: Arc<crate::metrics::Metrics>,
    /// Messages queued or being sent.
    outstanding: AtomicUsize,
    idle: Notify,
    signature: String,
}

impl Mailer {
    /// Prepares the SMTP client of `config.notify.email` (no connection yet).
    pub fn new(config: &Config, metrics: Arc<crate::metrics::Metrics>) -> Result<Mailer, String> {
        let email = &config.notify.email;
        if !email.enabled() {
            return Ok(Mailer {
                inner: None,
                interest: Mutex::new(None),
            });
        }
        let mailboxes = |list: &[String]| -> Result<Vec<Mailbox>, String> {
            list.iter()
                .map(|a| {
                    a.parse()
                        .map_err(|e| format!("`{a}` is not a mail address: {e}"))
                })
                .collect()
        };
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Ok(Mailer {
            inner: Some(Arc::new(Inner {
                from: email
                    .from
                    .parse()
                    .map_err(|e| format!("notify.email.from: {e}"))?,
                admins: mailboxes(&email.admins)?,
                managers: mailboxes(&email.managers)?,
                subject_prefix: email.subject_prefix.clone(),
                internal_ips_known: !config.errors.internal_ips.is_empty(),
                window: email.rate_limit_window,
                max_per_window: email.max_per_window,
                timeout: email.timeout,
                transport: transport(email)?,
                stats: MailStats::default(),
                metrics,
                outstanding: AtomicUsize::new(0),
                idle: Notify::new(),
                signature: format!(
                    "dockerflow-sidecar {} on {host} ({})",
                    env!("CARGO_PKG_VERSION"),
                    config.logging.logger
                ),
            })),
            interest: Mutex::new(None),
        })
    }

    /// What happened to mail so far; `None` when mail is off.
    pub fn stats(&self) -> Option<&MailStats> {
        self.inner.as_deref().map(|i| &i.stats)
    }

    /// Subscribes to the bus and starts the sender (no-op when mail is off).
    pub fn start(&self, bus: &Bus) {
        let Some(inner) = &self.inner else { return };
        let mut interest = bus.interest();
        let mut kinds = Vec::new();
        if !inner.admins.is_empty() {
            kinds.push("upstream.error");
        }
        if !inner.managers.is_empty() {
            kinds.push("broken_link");
        }
        interest.set(&kinds);
        *self.interest.lock().unwrap_or_else(|p| p.into_inner()) = Some(interest);
        let (tx, rx) = mpsc::channel(QUEUE);
        // Undelivered messages go back to the limiter (at most QUEUE + 1 in flight).
        let (failed_tx, failed_rx) = mpsc::unbounded_channel();
        tokio::spawn(decide_loop(inner.clone(), bus.subscribe(), tx, failed_rx));
        tokio::spawn(send_loop(inner.clone(), rx, failed_tx));
    }

    /// Waits until every message decided on has been sent or has failed,
    /// at most the mail timeout.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let _ = tokio::time::timeout(inner.timeout, async {
            loop {
                let idle = inner.idle.notified();
                if inner.outstanding.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

fn transport(email: &EmailConfig) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(email.host.as_str())
        .port(email.port)
        .timeout(Some(email.timeout));
    if email.tls != EmailTls::None {
        let mut params = TlsParameters::builder(email.host.clone());
        if let Some(path) = &email.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "notify.email.ca_file: cannot read `{}`: {e}",
                    path.display()
                )
            })?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| format!("notify.email.ca_file: `{}`: {e}", path.display()))?;
            params = params.add_root_certificate(cert);
        }
        let params = params
            .build_rustls()
            .map_err(|e| format!("notify.email: TLS set-up failed: {e}"))?;
        builder = builder.tls(match email.tls {
            EmailTls::Tls => Tls::Wrapper(params),
            _ => Tls::Required(params),
        });
    }
    if !email.username.is_empty() {
        let password = email.password()?;
        builder = builder.credentials(Credentials::new(email.username.clone(), password));
    }
    Ok(builder.build())
}

/// Longest path kept in a rate-limit key (longer paths share a key).
const MAX_KEY_PATH: usize = 256;
/// Windows a suppressed count waits for its key to come back; then it is
/// folded into the count of "other" messages the next message reports.
const KEEP_WINDOWS: u32 = 3;

/// Rate limiting for one kind (admins and managers each have their own):
/// one message per (status, path) per window, and `max` in all per window.
struct Limiter {
    window: Duration,
    max: u32,
    window_start: Instant,
    sent_in_window: u32,
    keys: HashMap<(u16, String), KeyState>,
    /// Suppressed events whose key is gone (table full, or expired).
    others: u64,
    last_prune: Instant,
}

#[derive(Default)]
struct KeyState {
    last_sent: Option<Instant>,
    suppressed: u64,
    /// When the first suppressed event came (shown, and for expiry).
    since: Option<(SystemTime, Instant)>,
}

/// What the limiter says about one event.
#[derive(Debug, PartialEq)]
enum Decision {
    /// Send; `suppressed` similar events were not mailed since `since`, and
    /// `others` events of other keys were not mailed and will not be counted
    /// anywhere else.
    Send {
        suppressed: u64,
        since: Option<SystemTime>,
        others: u64,
    },
    Suppress,
}

fn key(status: u16, path: &str) -> (u16, String) {
    (status, path.chars().take(MAX_KEY_PATH).collect())
}

impl Limiter {
    fn new(window: Duration, max: u32, now: Instant) -> Limiter {
        Limiter {
            window,
            max,
            window_start: now,
            sent_in_window: 0,
            keys: HashMap::new(),
            others: 0,
            last_prune: now,
        }
    }

    fn decide(&mut self, status: u16, path: &str, now: Instant) -> Decision {
        if now.duration_since(self.window_start) >= self.window {
            self.window_start = now;
            self.sent_in_window = 0;
        }
        if now.duration_since(self.last_prune) >= self.window {
            self.prune(now);
        }
        let key = key(status, path);
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            self.others += 1;
            return Decision::Suppress;
        }
        let state = self.keys.entry(key).or_default();
        let recent = state
            .last_sent
            .is_some_and(|t| now.duration_since(t) < self.window);
        if recent || self.sent_in_window >= self.max {
            state.suppressed += 1;
            state.since.get_or_insert((SystemTime::now(), now));
            return Decision::Suppress;
        }
        self.sent_in_window += 1;
        state.last_sent = Some(now);
        Decision::Send {
            suppressed: std::mem::take(&mut state.suppressed),
            since: state.since.take().map(|(time, _)| time),
            others: std::mem::take(&mut self.others),
        }
    }

    /// A message that was decided on but not delivered: its count (and the
    /// event itself) go back, to be reported by the next one.
    fn undelivered(&mut self, status: u16, path: &str, carried: u64, others: u64) {
        self.others += others;
        match self.keys.get_mut(&key(status, path)) {
            Some(state) => {
                state.suppressed += carried + 1;
                state
                    .since
                    .get_or_insert((SystemTime::now(), Instant::now()));
            }
            None => self.others += carried + 1,
        }
    }

    /// Forgets keys not mailed within the window; suppressed counts wait
    /// `KEEP_WINDOWS` for their key, then move to `others`.
    fn prune(&mut self, now: Instant) {
        self.last_prune = now;
        let window = self.window;
        let keep = window.saturating_mul(KEEP_WINDOWS);
        let mut folded = 0;
        self.keys.retain(|_, k| {
            let sent_recently = k.last_sent.is_some_and(|t| now.duration_since(t) < window);
            let waiting = k.since.is_some_and(|(_, at)| now.duration_since(at) < keep);
            if !sent_recently && !waiting {
                folded += k.suppressed;
                return false;
            }
            true
        });
        self.others += folded;
    }
}

/// A message on its way, with what it accounts for.
struct Outgoing {
    message: Message,
    kind: &'static str,
    status: u16,
    path: String,
    carried: u64,
    others: u64,
}

/// A message that did not go out: (kind, status, path, carried, others).
type Undelivered = (&'static str, u16, String, u64, u64);

async fn decide_loop(
    inner: Arc<Inner>,
    mut rx: broadcast::Receiver<Arc<Event>>,
    tx: mpsc::Sender<Outgoing>,
    mut failed: mpsc::UnboundedReceiver<Undelivered>,
) {
    let now = Instant::now();
    let mut admins = Limiter::new(inner.window, inner.max_per_window, now);
    let mut managers = Limiter::new(inner.window, inner.max_per_window, now);
    loop {
        let event = tokio::select! {
            received = rx.recv() => match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    inner.count("dropped", missed);
                    tracing::warn!(
                        missed,
                        "the mailer fell behind the event bus: events were not mailed"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some((kind, status, path, carried, others)) = failed.recv() => {
                let limiter = if kind == "broken_link" { &mut managers } else { &mut admins };
                limiter.undelivered(status, &path, carried, others);
                continue;
            }
        };
        let (kind, status, path, recipients, limiter) = match &event.data {
            EventData::UpstreamError(e) if !inner.admins.is_empty() => (
                "upstream.error",
                e.status,
                e.path.as_str(),
                &inner.admins,
                &mut admins,
            ),
            EventData::BrokenLink(b) if !inner.managers.is_empty() => (
                "broken_link",
                404,
                b.path.as_str(),
                &inner.managers,
                &mut managers,
            ),
            _ => continue,
        };
        let (carried, others, note) = match limiter.decide(status, path, Instant::now()) {
            Decision::Suppress => {
                inner.count("suppressed", 1);
                continue;
            }
            Decision::Send {
                suppressed,
                since,
                others,
            } => (
                suppressed,
                others,
                suppressed_note(suppressed, since, others, inner.window),
            ),
        };
        let (subject, body) = match &event.data {
            EventData::UpstreamError(e) => server_error_mail(&inner, &event, e),
            EventData::BrokenLink(b) => broken_link_mail(&inner, b),
            _ => continue,
        };
        let body = format!("{body}{note}\n-- \n{}\n", inner.signature);
        let message = match build(&inner, recipients, &subject, body) {
            Ok(message) => message,
            Err(e) => {
                inner.count("failed", 1);
                tracing::error!(error = %e, "could not build an error mail");
                continue;
            }
        };
        inner.outstanding.fetch_add(1, Ordering::AcqRel);
        let outgoing = Outgoing {
            message,
            kind,
            status,
            path: path.to_owned(),
            carried,
            others,
        };
        if tx.try_send(outgoing).is_err() {
            finished(&inner);
            limiter.undelivered(status, path, carried, others);
            let dropped = inner.count("dropped", 1);
            tracing::warn!(
                dropped,
                "the mail queue is full: an error mail was dropped (the next one counts it)"
            );
        }
    }
}

async fn send_loop(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<Outgoing>,
    failed: mpsc::UnboundedSender<Undelivered>,
) {
    while let Some(outgoing) = rx.recv().await {
        let subject = outgoing
            .message
            .headers()
            .get_raw("Subject")
            .unwrap_or_default()
            .to_owned();
        let sent =
            tokio::time::timeout(inner.timeout, inner.transport.send(outgoing.message)).await;
        let delivered = match sent {
            Ok(Ok(_)) => {
                inner.count("sent", 1);
                true
            }
            Ok(Err(e)) => {
                let failed = inner.count("failed", 1);
                tracing::error!(
                    error = %crate::error_chain(&e),
                    subject,
                    failed,
                    "could not send an error mail"
                );
                false
            }
            Err(_) => {
                let failed = inner.count("failed", 1);
                let limit = humantime::format_duration(inner.timeout).to_string();
                tracing::error!(subject, limit, failed, "sending an error mail timed out");
                false
            }
        };
        if !delivered {
            // What it would have reported is reported by the next one.
            let _ = failed.send((
                outgoing.kind,
                outgoing.status,
                outgoing.path,
                outgoing.carried,
                outgoing.others,
            ));
        }
        finished(&inner);
    }
}

impl Inner {
    /// Counts `n` messages with `outcome`; returns the new total.
    fn count(&self, outcome: &str, n: u64) -> u64 {
        self.metrics.mail(outcome, n);
        let counter = match outcome {
            "sent" => &self.stats.sent,
            "suppressed" => &self.stats.suppressed,
            "failed" => &self.stats.failed,
            _ => &self.stats.dropped,
        };
        counter.fetch_add(n, Ordering::Relaxed) + n
    }
}

fn finished(inner: &Inner) {
    if inner.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
        inner.idle.notify_waiters();
    }
}

fn build(
    inner: &Inner,
    recipients: &[Mailbox],
    subject: &str,
    body: String,
) -> Result<Message, lettre::error::Error> {
    let mut builder = Message::builder()
        .from(inner.from.clone())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in recipients {
        builder = builder.to(to.clone());
    }
    builder.body(body)
}

/// A subject line: no control characters (a header cannot hold them), at
/// most 989 characters (Django's limit).
fn subject_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(989)
        .collect()
}

fn server_error_mail(inner: &Inner, event: &Event, e: &UpstreamError) -> (String, String) {
    let origin = if e.internal_ip {
        "internal"
    } else {
        "EXTERNAL"
    };
    let subject = subject_line(&format!(
        "{}ERROR ({origin} IP): {} {} → {}",
        inner.subject_prefix, e.method, e.path, e.status
    ));
    let reason = http::StatusCode::from_u16(e.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut body = String::new();
    let query = e
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    body.push_str(&format!(
        "{} {}{}{query} → {} {reason}\n",
        e.method, e.host, e.path, e.status
    ));
    match &e.cause {
        Some(cause) => body.push_str(&format!(
            "The sidecar answered itself: {cause} (the app did not answer).\n"
        )),
        None => body.push_str("The app answered with this status.\n"),
    }
    body.push('\n');
    let mut field = |name: &str, value: &str| body.push_str(&format!("{name:<12}{value}\n"));
    field("Request id:", &e.request_id);
    field("Time:", &event.time);
    field("Duration:", &format!("{} ms", e.duration_ms));
    let client = if inner.internal_ips_known {
        format!("{} ({origin})", e.client)
    } else {
        e.client.clone()
    };
    field("Client:", &client);
    field("User agent:", &e.user_agent);
    body.push_str("\nRequest headers:\n");
    for (name, value) in &e.headers {
        body.push_str(&format!("  {name}: {value}\n"));
    }
    if let Some(text) = &e.body {
        body.push_str(&format!(
            "\nResponse body (first {} bytes):\n{text}\n",
            text.len()
        ));
    }
    (subject, body)
}

fn broken_link_mail(inner: &Inner, b: &BrokenLink) -> (String, String) {
    let subject = subject_line(&format!(
        "{}Broken {}link on {}",
        inner.subject_prefix,
        if b.internal { "INTERNAL " } else { "" },
        b.host
    ));
    let query = b
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let body = format!(
        "Referrer: {}\nRequested URL: {}{query}\nUser agent: {}\nIP address: {}\nRequest id: {}\n",
        b.referer, b.path, b.user_agent, b.client, b.request_id
    );
    (subject, body)
}

fn suppressed_note(
    suppressed: u64,
    since: Option<SystemTime>,
    others: u64,
    window: Duration,
) -> String {
    let mut note = String::new();
    if suppressed > 0 {
        let since = since
            .map(|t| format!(" since {}", humantime::format_rfc3339_seconds(t)))
            .unwrap_or_default();
        note.push_str(&format!(
            "\n{suppressed} similar message{} (same status and path) not sent{since}: at most one per {} (and notify.email.max_per_window in all), or not delivered.\n",
            if suppressed == 1 { " was" } else { "s were" },
            humantime::format_duration(window)
        ));
    }
    if others > 0 {
        note.push_str(&format!(
            "\n{others} message{} for other statuses or paths {} not sent (rate limits, or mail that could not be delivered).\n",
            if others == 1 { "" } else { "s" },
            if others == 1 { "was" } else { "were" }
        ));
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(d: Decision) -> bool {
        matches!(d, Decision::Send { .. })
    }

    #[test]
    fn one_message_per_key_per_window_then_the_count() {
        let t0 = Instant::now();
        let window = Duration::from_secs(600);
        let mut l = Limiter::new(window, 100, t0);
        assert!(matches!(
            l.decide(500, "/a", t0),
            Decision::Send { suppressed: 0, .. }
        ));
        for _ in 0..3 {
            assert_eq!(l.decide(500, "/a", t0), Decision::Suppress);
        }
        // Another status or path is another key.
        assert!(sends(l.decide(502, "/a", t0)));
        assert!(sends(l.decide(500, "/b", t0)));
        assert!(matches!(
            l.decide(500, "/a", t0 + window),
            Decision::Send {
                suppressed: 3,
                since: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn the_global_cap_holds_whatever_the_paths() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut l = Limiter::new(window, 2, t0);
        let sent = (0..50)
            .filter(|i| sends(l.decide(404, &format!("/{i}"), t0)))
            .count();
        assert_eq!(sent, 2);
        // Next window: a capped key sends, with its own count.
        assert!(matches!(
            l.decide(404, "/7", t0 + window),
            Decision::Send { suppressed: 1, .. }
        ));
    }

    #[test]
    fn the_key_table_is_bounded_and_recovers() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut l = Limiter::new(window, 1, t0);
        for i in 0..MAX_KEYS + 10 {
            l.decide(404, &format!("/{i}"), t0);
        }
        assert_eq!(l.keys.len(), MAX_KEYS);
        assert_eq!(l.others, 10);
        // Suppressed keys wait a few windows for their key, then their
        // counts are reported by whatever is sent next.
        let later = t0 + window * (KEEP_WINDOWS + 1);
        match l.decide(500, "/new", later) {
            Decision::Send { others, .. } => assert_eq!(others, (MAX_KEYS + 10 - 1) as u64),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.keys.len(), 1);
    }

    #[test]
    fn long_paths_share_a_bounded_key() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(60), 100, t0);
        let long = "/x".repeat(10_000);
        assert!(sends(l.decide(404, &long, t0)));
        assert_eq!(
            l.decide(404, &format!("{long}/other"), t0),
            Decision::Suppress
        );
        assert!(l.keys.keys().all(|(_, p)| p.len() <= MAX_KEY_PATH));
    }

    #[test]
    fn an_undelivered_message_is_counted_by_the_next() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut l = Limiter::new(window, 100, t0);
        assert!(sends(l.decide(500, "/a", t0)));
        l.decide(500, "/a", t0);
        // The first message carried 0 and failed: it and the one suppressed.
        l.undelivered(500, "/a", 0, 0);
        assert!(matches!(
            l.decide(500, "/a", t0 + window),
            Decision::Send { suppressed: 2, .. }
        ));
    }
}
