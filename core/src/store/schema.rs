//! The engine's own tables, created and migrated by version.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// The schema version this build writes.
pub(crate) const VERSION: i64 = 3;

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
