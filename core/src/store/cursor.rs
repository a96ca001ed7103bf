//! The pull cursor: how far into the gateway's log this replica has caught up. It is kept
//! in the same database as the data and moves in the same transaction as the changes it
//! covers, so a crash never skips or repeats a position. Resetting it makes the sync layer
//! fetch the current state again (a snapshot) at its next pull.

use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;
use crate::protocol::LogCursor;

const POSITION_KEY: &str = "sync.cursor";
const TAG_KEY: &str = "sync.cursor_tag";

pub(crate) fn get(conn: &Connection) -> Result<Option<LogCursor>> {
    let read = |key: &str| -> Result<Option<String>> {
        Ok(conn
            .prepare_cached("SELECT value FROM _driftless_state WHERE key = ?1")?
            .query_row([key], |r| r.get::<_, String>(0))
            .optional()?)
    };
    let Some(position) = read(POSITION_KEY)?.and_then(|p| p.parse().ok()) else { return Ok(None) };
    let tag = read(TAG_KEY)?.and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Some(LogCursor { position, tag }))
}

pub(crate) fn set(conn: &Connection, cursor: LogCursor) -> Result<()> {
    let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO _driftless_state(key, value) VALUES (?1, ?2)")?;
    stmt.execute([POSITION_KEY, &cursor.position.to_string()])?;
    stmt.execute([TAG_KEY, &cursor.tag.to_string()])?;
    Ok(())
}

pub(crate) fn reset(conn: &Connection) -> Result<()> {
    conn.prepare_cached("DELETE FROM _driftless_state WHERE key IN (?1, ?2)")?.execute([POSITION_KEY, TAG_KEY])?;
    Ok(())
}
