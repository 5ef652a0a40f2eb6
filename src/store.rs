//! The local SQLite state file: opening it (WAL, a busy timeout) and its
//! schema, migrated forward by `user_version`. Shared by the report store
//! now and the hook outbox later; only writer threads write, never the
//! request path.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Schema steps, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE reports (
        id           TEXT PRIMARY KEY,
        type         TEXT NOT NULL,
        url          TEXT,
        body         TEXT NOT NULL,
        created      INTEGER NOT NULL,  -- unix ms, when first received
        incident     INTEGER NOT NULL,  -- unix ms, received minus the report's age
        last_seen    INTEGER NOT NULL,  -- unix ms, when last received
        count        INTEGER NOT NULL DEFAULT 1,
        directive    TEXT,
        blocked_url  TEXT,
        disposition  TEXT,
        source_file  TEXT,
        line         INTEGER,
        col          INTEGER,
        status_code  INTEGER,
        user_agent   TEXT,
        dedup_key    INTEGER NOT NULL
    );
    CREATE INDEX reports_dedup ON reports (dedup_key, created);
    CREATE INDEX reports_created ON reports (created);
",
    "
    CREATE TABLE hook_outbox (
        id            TEXT PRIMARY KEY,   -- the webhook-id, stable across retries
        hook          TEXT NOT NULL,
        event_type    TEXT NOT NULL,
        body          TEXT NOT NULL,
        status        TEXT NOT NULL,      -- waiting | sending | sent | error
        attempts      INTEGER NOT NULL DEFAULT 0,
        next_attempt  INTEGER NOT NULL,   -- unix ms
        last_status   INTEGER,
        last_error    TEXT,
        created       INTEGER NOT NULL,   -- unix ms
        updated       INTEGER NOT NULL    -- unix ms
    );
    CREATE INDEX hook_outbox_due ON hook_outbox (status, next_attempt);
    CREATE INDEX hook_outbox_created ON hook_outbox (created);
",
];

/// Opens (creating if needed) the state file and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection, String> {
    let fail =
        |what: &str, e: rusqlite::Error| format!("state file {}: {what}: {e}", path.display());
    let mut conn = Connection::open(path).map_err(|e| fail("cannot open", e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| fail("busy timeout", e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| fail("cannot switch to WAL", e))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| fail("synchronous", e))?;
    migrate(&mut conn).map_err(|e| fail("cannot migrate the schema", e))?;
    Ok(conn)
}

/// Opens an existing state file for the CLI: read-only for `read_only`
/// commands (no migration, no new -wal/-shm files owned by whoever runs it).
pub fn open_existing(path: &Path, read_only: bool) -> Result<Connection, String> {
    if !path.exists() {
        return Err(format!(
            "state file {} does not exist (set state.path, or run from the sidecar's working directory)",
            path.display()
        ));
    }
    if !read_only {
        return open(path);
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("state file {}: cannot open: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| format!("state file {}: busy timeout: {e}", path.display()))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let applied: usize = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
