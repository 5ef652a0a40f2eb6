//! The outbox table: every event matching a hook is a row here before
//! anything is sent, and every attempt's outcome is written back. All
//! functions are synchronous; the sender calls them from blocking tasks.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// One delivery.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// The `webhook-id` (stable across retries).
    pub id: String,
    /// The hook's name.
    pub hook: String,
    /// The event type.
    pub event_type: String,
    /// The rendered body.
    pub body: String,
    /// waiting | sending | sent | error.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// Unix ms of the next attempt.
    pub next_attempt: i64,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Unix ms.
    pub created: i64,
    /// Unix ms.
    pub updated: i64,
}

/// Opens the state file for the outbox: every commit reaches the disk
/// (`synchronous=FULL`), so an accepted event survives a crash.
pub fn open(path: &std::path::Path) -> Result<Connection, String> {
    let conn = crate::store::open(path)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| format!("state file {}: synchronous: {e}", path.display()))?;
    Ok(conn)
}

/// Inserts rows in one transaction (one fsync for the batch).
pub fn insert(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO hook_outbox (id, hook, event_type, body, status, attempts, next_attempt, created, updated)
             VALUES (?1, ?2, ?3, ?4, 'waiting', 0, ?5, ?6, ?6)",
        )?;
        for r in rows {
            stmt.execute(params![
                r.id,
                r.hook,
                r.event_type,
                r.body,
                r.next_attempt,
                r.created
            ])?;
        }
    }
    tx.commit()
}

/// Rows left `sending` by a crash go back to `waiting` (at start-up).
pub fn reset_sending(conn: &Connection, now: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE hook_outbox SET status = 'waiting', next_attempt = ?1, updated = ?1 WHERE status = 'sending'",
        params![now],
    )
}

/// Claims up to `limit` due rows: marks them `sending` and returns them.
/// With none due, also says when the next waiting row is (Unix ms).
pub fn claim_due(
    conn: &mut Connection,
    now: i64,
    limit: usize,
) -> rusqlite::Result<(Vec<Row>, Option<i64>)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rows: Vec<Row> = {
        let sql = format!("SELECT {COLUMNS} FROM hook_outbox WHERE status = 'waiting' AND next_attempt <= ?1 ORDER BY next_attempt LIMIT ?2");
        let mut stmt = tx.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![now, limit as i64], row)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE hook_outbox SET status = 'sending', updated = ?2 WHERE id = ?1",
        )?;
        for r in &rows {
            stmt.execute(params![r.id, now])?;
        }
    }
    let next = match rows.is_empty() {
        true => tx.query_row(
            "SELECT MIN(next_attempt) FROM hook_outbox WHERE status = 'waiting'",
            [],
            |r| r.get(0),
        )?,
        false => None,
    };
    tx.commit()?;
    Ok((rows, next))
}

/// What an attempt left a row as.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempted {
    /// waiting (a retry is scheduled), sent or error.
    pub status: &'static str,
    /// Attempts made so far.
    pub attempts: i64,
    /// Unix ms of the next attempt (when waiting).
    pub next_attempt: i64,
    /// HTTP status, when there was an answer.
    pub last_status: Option<i64>,
    /// Why it failed, when it did.
    pub last_error: Option<String>,
}

/// Records an attempt's outcome.
pub fn record(conn: &Connection, id: &str, outcome: &Attempted, now: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE hook_outbox SET status = ?2, attempts = ?3, next_attempt = ?4, last_status = ?5, last_error = ?6, updated = ?7
         WHERE id = ?1",
        params![
            id,
            outcome.status,
            outcome.attempts,
            outcome.next_attempt,
            outcome.last_status,
            outcome.last_error,
            now
        ],
    )?;
    Ok(())
}

/// Records many outcomes in one transaction (one fsync).
pub fn record_all(
    conn: &mut Connection,
    outcomes: &[(String, Attempted)],
    now: i64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for (id, outcome) in outcomes {
        record(&tx, id, outcome, now)?;
    }
    tx.commit()
}

/// Claims the rows with these ids (whatever their status but `sending`)
/// for an attempt now: the CLI's `hooks send`.
pub fn claim(conn: &mut Connection, ids: &[String], now: i64) -> rusqlite::Result<Vec<Row>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut rows = Vec::new();
    {
        let sql =
            format!("SELECT {COLUMNS} FROM hook_outbox WHERE id = ?1 AND status <> 'sending'");
        let mut select = tx.prepare_cached(&sql)?;
        let mut update = tx.prepare_cached(
            "UPDATE hook_outbox SET status = 'sending', updated = ?2 WHERE id = ?1",
        )?;
        for id in ids {
            if let Some(r) = select.query_row(params![id], row).optional()? {
                update.execute(params![id, now])?;
                rows.push(r);
            }
        }
    }
    tx.commit()?;
    Ok(rows)
}

/// Rows, newest first, filtered by status and hook.
pub fn list(
    conn: &Connection,
    status: Option<&str>,
    hook: Option<&str>,
) -> rusqlite::Result<Vec<Row>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM hook_outbox WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR hook = ?2) ORDER BY created DESC"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![status, hook], row)?;
    rows.collect()
}

/// One row.
pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Row>> {
    let sql = format!("SELECT {COLUMNS} FROM hook_outbox WHERE id = ?1");
    conn.query_row(&sql, params![id], row).optional()
}

/// Rows with `status` created at or before `before` (unix ms).
pub fn count(conn: &Connection, status: &str, before: i64) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM hook_outbox WHERE status = ?1 AND created <= ?2",
        params![status, before],
        |r| r.get(0),
    )
}

/// Rows by status, and when the oldest waiting row was created (Unix ms).
pub type Stats = (Vec<(String, i64)>, Option<i64>);

/// The outbox's [`Stats`].
pub fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let mut by_status =
        conn.prepare_cached("SELECT status, count(*) FROM hook_outbox GROUP BY status")?;
    let rows = by_status
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, i64)>>>()?;
    let oldest = conn.query_row(
        "SELECT min(created) FROM hook_outbox WHERE status = 'waiting'",
        [],
        |r| r.get(0),
    )?;
    Ok((rows, oldest))
}

/// Makes rows due now (replay): by id, or all `waiting`/`error` rows of a
/// hook, or all of them. Returns how many.
pub fn make_due(
    conn: &Connection,
    hook: Option<&str>,
    ids: &[String],
    now: i64,
) -> rusqlite::Result<usize> {
    if !ids.is_empty() {
        let mut n = 0;
        for id in ids {
            n += conn.execute(
                "UPDATE hook_outbox SET status = 'waiting', next_attempt = ?2, updated = ?2 WHERE id = ?1 AND status <> 'sending'",
                params![id, now],
            )?;
        }
        return Ok(n);
    }
    conn.execute(
        "UPDATE hook_outbox SET status = 'waiting', next_attempt = ?2, updated = ?2
         WHERE status IN ('waiting', 'error') AND (?1 IS NULL OR hook = ?1)",
        params![hook, now],
    )
}

/// Deletes rows created before `before`; returns how many.
pub fn prune(conn: &Connection, before: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM hook_outbox WHERE created < ?1 AND status <> 'sending'",
        params![before],
    )
}

const COLUMNS: &str =
    "id, hook, event_type, body, status, attempts, next_attempt, last_status, last_error, created, updated";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        hook: r.get(1)?,
        event_type: r.get(2)?,
        body: r.get(3)?,
        status: r.get(4)?,
        attempts: r.get(5)?,
        next_attempt: r.get(6)?,
        last_status: r.get(7)?,
        last_error: r.get(8)?,
        created: r.get(9)?,
        updated: r.get(10)?,
    })
}
