//! Where reports go after intake: a bounded queue to one writer thread that
//! stores them in batches, folding identical reports within the dedup window
//! into one row's count, and deletes what is past retention.

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::ReportOutcome;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

/// Most reports written in one transaction.
const BATCH: usize = 1024;
/// Attempts at committing one batch before it is counted as dropped
/// (about 15 s of retries with the backoff below).
const COMMIT_ATTEMPTS: u32 = 10;
/// Report bodies waiting for the writer at most, in bytes: with `queue`
/// this bounds memory whatever the size of each report.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How often the writer deletes rows past retention (at most; and at start).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// A report as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredReport {
    /// uuid4.
    pub id: String,
    /// Report type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Document URL.
    pub url: Option<String>,
    /// The normalised report, JSON.
    pub body: String,
    /// Unix ms when first received.
    pub created: i64,
    /// Unix ms of the incident.
    pub incident: i64,
    /// Unix ms when last received.
    pub last_seen: i64,
    /// How many identical reports this row stands for.
    pub count: i64,
    /// Effective directive, feature or error type.
    pub directive: Option<String>,
    /// What was blocked.
    pub blocked_url: Option<String>,
    /// enforce / report.
    pub disposition: Option<String>,
    /// Where.
    pub source_file: Option<String>,
    /// Line.
    pub line: Option<i64>,
    /// Column.
    pub column: Option<i64>,
    /// Document status.
    pub status_code: Option<i64>,
    /// Browser.
    pub user_agent: Option<String>,
    /// Hash of what makes two reports identical.
    #[serde(skip)]
    pub dedup_key: i64,
}

enum Msg {
    Report(Box<StoredReport>),
    Flush(SyncSender<()>),
}

/// The intake's handle on the writer.
pub struct ReportStore {
    /// Unbounded as a channel (its blocks are allocated as reports come: a
    /// `sync_channel(10_000)` wrote all its slots up front, 260 KB of every
    /// idle sidecar); `Shared::queued` bounds it.
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    /// Unix seconds of the last "dropped" warning (one per `WARN_EVERY`).
    warned: AtomicU64,
}

/// Counters the intake and the writer share.
struct Shared {
    /// Reports dropped: queue full, or not storable.
    dropped: AtomicU64,
    /// Stored, deduplicated and dropped reports, by type.
    metrics: Arc<crate::metrics::Metrics>,
    /// Body bytes queued and not yet written.
    queued_bytes: AtomicUsize,
    /// Reports queued and not yet written, and how many may be.
    queued: AtomicUsize,
    capacity: usize,
    /// Unix seconds of the last "cannot store" error (one per `WARN_EVERY`),
    /// and the reports lost since it was logged.
    failure_logged: AtomicU64,
    lost_since_logged: AtomicU64,
}

/// At most one warning about dropped reports this often.
const WARN_EVERY: u64 = 10;

/// Unix milliseconds.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// A duration in milliseconds, saturating: "keep for 300000000 years" must
/// not wrap into "delete everything".
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl ReportStore {
    /// Opens the state file (errors are reported now, not later) and starts
    /// the writer thread.
    pub fn start(
        path: &Path,
        dedup_window: Duration,
        retention: Duration,
        queue: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<ReportStore, String> {
        let conn = crate::store::open(path)?;
        let (tx, rx) = mpsc::channel();
        let window = millis(dedup_window);
        let retention = millis(retention);
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            failure_logged: AtomicU64::new(0),
            lost_since_logged: AtomicU64::new(0),
            metrics,
            queued_bytes: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            capacity: queue.max(1),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("report-writer".into())
            .spawn(move || write_loop(conn, rx, writer, window, retention))
            .map_err(|e| format!("cannot start the report writer: {e}"))?;
        Ok(ReportStore {
            tx,
            shared,
            warned: AtomicU64::new(0),
        })
    }

    /// Queues a report; false (and counted) when the queue is full, by
    /// count or by bytes.
    pub fn submit(&self, report: StoredReport) -> bool {
        let bytes = report.body.len();
        let queued_bytes = self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed);
        let kind = if queued_bytes + bytes <= QUEUE_BYTES && queued < self.shared.capacity {
            match self.tx.send(Msg::Report(Box::new(report))) {
                Ok(()) => return true,
                Err(mpsc::SendError(msg)) => match msg {
                    Msg::Report(report) => report.kind,
                    Msg::Flush(_) => String::new(),
                },
            }
        } else {
            report.kind
        };
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.metrics.report(&kind, ReportOutcome::Dropped);
        let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = (unix_ms(SystemTime::now()) / 1000) as u64;
        let last = self.warned.load(Ordering::Relaxed);
        if now >= last + WARN_EVERY
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped,
                "report queue full: reports are counted and dropped"
            );
        }
        false
    }

    /// Reports dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every report queued before this call is
    /// committed; false when the time ran out first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let deadline = Instant::now() + timeout;
        if self.tx.send(Msg::Flush(ack_tx)).is_err() {
            return false;
        }
        ack_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    window: i64,
    retention: i64,
) {
    // A short retention is pruned as often as it asks for; an idle sidecar
    // prunes too (the receive below times out).
    let prune_every = PRUNE_EVERY.min(Duration::from_millis(retention.max(1) as u64));
    let mut last_prune = Instant::now();
    prune_older(&conn, unix_ms(SystemTime::now()).saturating_sub(retention));
    loop {
        let first = match rx.recv_timeout(prune_every) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            write_batch(&mut conn, batch, &shared, window);
        }
        if last_prune.elapsed() >= prune_every {
            prune_older(&conn, unix_ms(SystemTime::now()).saturating_sub(retention));
            last_prune = Instant::now();
        }
    }
}

/// Commits a batch, retrying while the file is locked (a long `reports
/// prune`, an outside transaction) instead of losing it; what is finally
/// lost is counted as dropped. Flushes are acknowledged after.
fn write_batch(conn: &mut Connection, batch: Vec<Msg>, shared: &Shared, window: i64) {
    let mut acks = Vec::new();
    let mut reports = Vec::new();
    for msg in batch {
        match msg {
            Msg::Report(report) => reports.push(report),
            Msg::Flush(ack) => acks.push(ack),
        }
    }
    let bytes: usize = reports.iter().map(|r| r.body.len()).sum();
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=COMMIT_ATTEMPTS {
        let result = (|| -> rusqlite::Result<Vec<bool>> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut folded = Vec::with_capacity(reports.len());
            for report in &reports {
                folded.push(store_one(&tx, report, window)?);
            }
            tx.commit()?;
            Ok(folded)
        })();
        match result {
            Ok(folded) => {
                for (report, folded) in reports.iter().zip(folded) {
                    let outcome = if folded {
                        ReportOutcome::Deduplicated
                    } else {
                        ReportOutcome::Stored
                    };
                    shared.metrics.report(&report.kind, outcome);
                }
                break;
            }
            // Locked by another connection: worth waiting for. Anything
            // else (disk full, read-only or broken file) will not pass by
            // retrying this batch at once, and retrying would stall the
            // queue behind it: the batch is dropped and counted.
            Err(e) if attempt < COMMIT_ATTEMPTS && is_busy(&e) => {
                tracing::warn!(error = %e, attempt = attempt as u64, "cannot store reports yet; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                shared
                    .dropped
                    .fetch_add(reports.len() as u64, Ordering::Relaxed);
                for report in &reports {
                    shared.metrics.report(&report.kind, ReportOutcome::Dropped);
                }
                log_failure(shared, &e, reports.len() as u64);
                break;
            }
        }
    }
    shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    shared.queued.fetch_sub(reports.len(), Ordering::Relaxed);
    for ack in acks {
        let _ = ack.send(());
    }
}

/// Whether SQLite failed only because another connection holds the lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Logs that `lost` reports could not be stored, at most once per
/// `WARN_EVERY` (a full disk fails every batch): the line counts every
/// report lost since the last one.
fn log_failure(shared: &Shared, e: &rusqlite::Error, lost: u64) {
    let lost = shared.lost_since_logged.fetch_add(lost, Ordering::Relaxed) + lost;
    let now = (unix_ms(SystemTime::now()) / 1000) as u64;
    let last = shared.failure_logged.load(Ordering::Relaxed);
    if last != 0 && now < last + WARN_EVERY {
        return;
    }
    shared.failure_logged.store(now, Ordering::Relaxed);
    shared.lost_since_logged.store(0, Ordering::Relaxed);
    tracing::error!(
        error = %e,
        lost,
        every = WARN_EVERY,
        "cannot store reports: counted as dropped (logged at most once per `every` seconds)"
    );
}

/// Adds to the count of an identical report within the window (true), or
/// inserts (false).
fn store_one(
    tx: &rusqlite::Transaction<'_>,
    r: &StoredReport,
    window: i64,
) -> rusqlite::Result<bool> {
    let updated = tx.prepare_cached(
        "UPDATE reports SET count = count + 1, last_seen = ?1
         WHERE rowid = (SELECT rowid FROM reports WHERE dedup_key = ?2 AND created >= ?3 ORDER BY created DESC LIMIT 1)",
    )?
    .execute(params![r.created, r.dedup_key, r.created.saturating_sub(window)])?;
    if updated == 0 {
        tx.prepare_cached(
            "INSERT INTO reports (id, type, url, body, created, incident, last_seen, count, directive, blocked_url,
                                  disposition, source_file, line, col, status_code, user_agent, dedup_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?
        .execute(params![
            r.id,
            r.kind,
            r.url,
            r.body,
            r.created,
            r.incident,
            r.created,
            r.directive,
            r.blocked_url,
            r.disposition,
            r.source_file,
            r.line,
            r.column,
            r.status_code,
            r.user_agent,
            r.dedup_key
        ])?;
    }
    Ok(updated > 0)
}

fn prune_older(conn: &Connection, before: i64) {
    match prune(conn, before) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n as u64, "old reports deleted"),
        Err(e) => tracing::error!(error = %e, "cannot delete old reports"),
    }
}

/// Deletes reports first received before `before` (unix ms); returns how many.
pub fn prune(conn: &Connection, before: i64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM reports WHERE created < ?1", params![before])
}

const COLUMNS: &str =
    "id, type, url, body, created, incident, last_seen, count, directive, blocked_url,
                       disposition, source_file, line, col, status_code, user_agent, dedup_key";

fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredReport> {
    Ok(StoredReport {
        id: row.get(0)?,
        kind: row.get(1)?,
        url: row.get(2)?,
        body: row.get(3)?,
        created: row.get(4)?,
        incident: row.get(5)?,
        last_seen: row.get(6)?,
        count: row.get(7)?,
        directive: row.get(8)?,
        blocked_url: row.get(9)?,
        disposition: row.get(10)?,
        source_file: row.get(11)?,
        line: row.get(12)?,
        column: row.get(13)?,
        status_code: row.get(14)?,
        user_agent: row.get(15)?,
        dedup_key: row.get(16)?,
    })
}

/// Reports last seen at or after `since` (unix ms), of `kind` if given, newest first.
pub fn list(
    conn: &Connection,
    since: i64,
    kind: Option<&str>,
) -> rusqlite::Result<Vec<StoredReport>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM reports WHERE last_seen >= ?1 AND (?2 IS NULL OR type = ?2) ORDER BY last_seen DESC"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![since, kind], row)?;
    rows.collect()
}

/// One report by id.
pub fn show(conn: &Connection, id: &str) -> rusqlite::Result<Option<StoredReport>> {
    let sql = format!("SELECT {COLUMNS} FROM reports WHERE id = ?1");
    conn.query_row(&sql, params![id], row).optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(n: i64) -> StoredReport {
        StoredReport {
            id: format!("r{n}"),
            kind: "csp-violation".into(),
            url: None,
            body: "{}".into(),
            created: n,
            incident: n,
            last_seen: n,
            count: 1,
            directive: None,
            blocked_url: None,
            disposition: None,
            source_file: None,
            line: None,
            column: None,
            status_code: None,
            user_agent: None,
            dedup_key: n,
        }
    }

    /// The channel is unbounded; the count of reports not yet written is
    /// what bounds the queue. With the state file locked by someone else,
    /// nothing is written: exactly `queue` reports are taken, the next is
    /// dropped, and what was taken is stored once the lock goes.
    #[test]
    fn the_queue_takes_what_it_is_sized_for_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = ReportStore::start(
            &path,
            Duration::ZERO,
            Duration::from_secs(86_400),
            2,
            Arc::new(crate::metrics::Metrics::new()),
        )
        .unwrap();
        let locker = crate::store::open(&path).unwrap();
        locker.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(store.submit(report(1)));
        assert!(store.submit(report(2)));
        assert!(!store.submit(report(3)), "a third report fit a queue of 2");
        assert_eq!(store.dropped(), 1);
        locker.execute_batch("ROLLBACK").unwrap();
        assert!(store.flush(Duration::from_secs(30)));
        let rows: i64 = locker
            .query_row("SELECT COUNT(*) FROM reports", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2);
        // Written reports leave the queue: there is room again.
        assert!(store.submit(report(4)));
    }
}
