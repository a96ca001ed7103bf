//! The pull cursor: how far into the gateway's log this replica has caught up. It is kept
//! in the same database as the data and moves in the same transaction as the changes it
//! covers, so a crash never skips or repeats a position. Resetting it makes the sync layer
//! fetch the current state again (a snapshot) at its next pull.

use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;
use crate::protocol::LogCursor;

const POSITION_KEY: &str = "sync.cursor";
const TAG_KEY: &str = "sync.cursor_tag";
/// How many times the cursor was reset: an answer may move the cursor only if no reset came
/// between the pull it answers and its arrival (a snapshot started from "no cursor" cannot
/// otherwise tell its own start from a reset made while it ran).
const RESETS_KEY: &str = "sync.cursor_resets";

fn read(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT CAST(value AS TEXT) FROM _driftless_state WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, String>(0))
        .optional()?)
}

pub(crate) fn get(conn: &Connection) -> Result<Option<LogCursor>> {
    let Some(position) = read(conn, POSITION_KEY)?.and_then(|p| p.parse().ok()) else { return Ok(None) };
    let tag = read(conn, TAG_KEY)?.and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Some(LogCursor { position, tag }))
}

/// How many times the cursor has been reset.
pub(crate) fn resets(conn: &Connection) -> Result<u64> {
    Ok(read(conn, RESETS_KEY)?.and_then(|r| r.parse().ok()).unwrap_or(0))
}

pub(crate) fn set(conn: &Connection, cursor: LogCursor) -> Result<()> {
    let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO _driftless_state(key, value) VALUES (?1, ?2)")?;
    stmt.execute([POSITION_KEY, &cursor.position.to_string()])?;
    stmt.execute([TAG_KEY, &cursor.tag.to_string()])?;
    Ok(())
}

pub(crate) fn reset(conn: &Connection) -> Result<()> {
    conn.prepare_cached("DELETE FROM _driftless_state WHERE key IN (?1, ?2)")?.execute([POSITION_KEY, TAG_KEY])?;
    let next = resets(conn)? + 1;
    conn.prepare_cached("INSERT OR REPLACE INTO _driftless_state(key, value) VALUES (?1, ?2)")?
        .execute([RESETS_KEY, &next.to_string()])?;
    Ok(())
}
