//! The engine's own tables, created and migrated by version.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// The schema version this build writes.
pub(crate) const VERSION: i64 = 4;

/// The version of the capture triggers this build installs; journals and triggers of tracked
/// tables made by an older one are upgraded when the store opens.
const TRIGGER_VERSION: i64 = 2;

/// Brings the engine's tables up to [`VERSION`], inside the caller's transaction.
pub(crate) fn upgrade(conn: &Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS _driftless_state (key TEXT PRIMARY KEY, value) WITHOUT ROWID")?;
    let found: i64 = conn
        .query_row("SELECT value FROM _driftless_state WHERE key = 'schema_version'", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if found > VERSION {
        return Err(Error::SchemaTooNew { found, supported: VERSION });
    }
    for version in found..VERSION {
        upgrade_from(conn, version)?;
    }
    conn.execute("INSERT OR REPLACE INTO _driftless_state(key, value) VALUES ('schema_version', ?1)", [VERSION])?;
    Ok(())
}

/// One migration step: from `version` to `version + 1`.
fn upgrade_from(conn: &Connection, version: i64) -> Result<()> {
    if version == 0 {
        conn.execute_batch(
            "
            -- Every node seen, by a small local index used inside row metadata.
            CREATE TABLE _driftless_nodes (
                idx  INTEGER PRIMARY KEY,
                id   BLOB NOT NULL UNIQUE,
                role TEXT NOT NULL DEFAULT ''
            );
            CREATE TABLE _driftless_tables (
                id   INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                pk   TEXT NOT NULL,   -- key column names, joined by U+001F
                spec TEXT NOT NULL    -- TableSpec as JSON
            );
            -- Stable indexes for column names inside row metadata; in_app = 0 for columns only
            -- other replicas have (kept so their writes still converge and relay).
            CREATE TABLE _driftless_columns (
                tbl    INTEGER NOT NULL,
                idx    INTEGER NOT NULL,
                name   TEXT NOT NULL,
                in_app INTEGER NOT NULL,
                PRIMARY KEY (tbl, idx)
            ) WITHOUT ROWID;
            -- Causal state of every row ever synced.
            CREATE TABLE _driftless_rows (
                tbl  INTEGER NOT NULL,
                pk   BLOB NOT NULL,
                meta BLOB NOT NULL,
                PRIMARY KEY (tbl, pk)
            ) WITHOUT ROWID;
            -- Sealed local changes waiting for the gateway's ack. AUTOINCREMENT so a sequence
            -- number is never reused and a late ack can never delete a newer entry.
            CREATE TABLE _driftless_outbox (
                seq        INTEGER PRIMARY KEY AUTOINCREMENT,
                tbl        INTEGER NOT NULL,
                pk         BLOB NOT NULL,
                change     BLOB NOT NULL,
                created_ms INTEGER NOT NULL
            );
            -- Rows whose state currently holds a conflict.
            CREATE TABLE _driftless_conflicted (
                tbl INTEGER NOT NULL,
                pk  BLOB NOT NULL,
                PRIMARY KEY (tbl, pk)
            ) WITHOUT ROWID;
            -- Nodes seen writing with clocks beyond the allowed drift.
            CREATE TABLE _driftless_clock_skew (
                node        BLOB PRIMARY KEY,
                hlc         INTEGER NOT NULL,
                observed_ms INTEGER NOT NULL
            );
            ",
        )?;
    }
    if version == 2 {
        conn.execute_batch(
            "
            -- Remote changes merged into a row's state but refused by the app's own table (a
            -- UNIQUE or CHECK constraint of the app's): kept here so one such row never blocks
            -- the rows after it; the next change to the row tries again.
            CREATE TABLE _driftless_unapplied (
                tbl      INTEGER NOT NULL,
                pk       BLOB NOT NULL,
                reason   TEXT NOT NULL,
                at_ms    INTEGER NOT NULL,
                PRIMARY KEY (tbl, pk)
            ) WITHOUT ROWID;
            ",
        )?;
    }
    if version == 3 {
        conn.execute_batch(
            "
            -- Counter values the app row still shows while its merged state is unapplied.
            ALTER TABLE _driftless_unapplied ADD COLUMN shown TEXT;
            -- Untracked tables keep their sync metadata (0 = not tracked).
            ALTER TABLE _driftless_tables ADD COLUMN tracked INTEGER NOT NULL DEFAULT 1;
            -- Changes that were not merged at all, with why: a remote row this store cannot
            -- accept, a local write too large to sync.
            CREATE TABLE _driftless_refused (
                id     INTEGER PRIMARY KEY AUTOINCREMENT,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                origin TEXT NOT NULL,   -- 'local' or 'remote'
                reason TEXT NOT NULL,
                at_ms  INTEGER NOT NULL
            );
            -- Columns the next seal must write even if their value looks unchanged (a conflict
            -- resolution that keeps the value shown must still supersede the other versions).
            CREATE TABLE _driftless_forced (
                tbl    INTEGER NOT NULL,
                pk     BLOB NOT NULL,
                col    TEXT NOT NULL,
                PRIMARY KEY (tbl, pk, col)
            ) WITHOUT ROWID;
            ",
        )?;
    }
    if version == 1 {
        conn.execute_batch(
            "
            -- Outbox entries the gateway refused, moved aside (never deleted) so one poison
            -- batch cannot block the queue.
            CREATE TABLE _driftless_rejected (
                seq         INTEGER PRIMARY KEY,
                tbl         INTEGER NOT NULL,
                pk          BLOB NOT NULL,
                change      BLOB NOT NULL,
                created_ms  INTEGER NOT NULL,
                rejected_ms INTEGER NOT NULL,
                reason      TEXT NOT NULL
            );
            ",
        )?;
    }
    Ok(())
}

/// Brings the journals and triggers of tracked tables up to [`TRIGGER_VERSION`], inside the
/// caller's transaction (after [`upgrade`]).
pub(crate) fn upgrade_journals(conn: &Connection) -> Result<()> {
    let found: i64 = conn
        .query_row("SELECT value FROM _driftless_state WHERE key = 'trigger_version'", [], |r| r.get(0))
        .optional()?
        .unwrap_or(1);
    if found >= TRIGGER_VERSION {
        return Ok(());
    }
    let catalog = super::catalog::Catalog::load(conn)?;
    for info in catalog.tables.iter().filter(|t| t.captures()) {
        super::capture::install(conn, info)?;
    }
    conn.execute(
        "INSERT OR REPLACE INTO _driftless_state(key, value) VALUES ('trigger_version', ?1)",
        [TRIGGER_VERSION],
    )?;
    Ok(())
}
