//! The pull cursor: how far into the gateway's log this replica has caught up. It is kept
//! in the same database as the data and moves in the same transaction as the changes it
//! covers, so a crash never skips or repeats a position. Resetting it makes the sync layer
//! fetch the current state again (a snapshot) at its next pull.

use rusqlite::Connection;

use super::settings;
use crate::error::Result;
use crate::protocol::LogCursor;

const POSITION_KEY: &str = "sync.cursor";
const TAG_KEY: &str = "sync.cursor_tag";
/// How many times the cursor was reset: an answer may move the cursor only if no reset came
/// between the pull it answers and its arrival (a snapshot started from "no cursor" cannot
/// otherwise tell its own start from a reset made while it ran).
const RESETS_KEY: &str = "sync.cursor_resets";

pub(crate) fn get(conn: &Connection) -> Result<Option<LogCursor>> {
    let Some(position) = settings::get(conn, POSITION_KEY)?.and_then(|p| p.parse().ok()) else { return Ok(None) };
    let tag = settings::get(conn, TAG_KEY)?.and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Some(LogCursor { position, tag }))
}

/// How many times the cursor has been reset.
pub(crate) fn resets(conn: &Connection) -> Result<u64> {
    Ok(settings::get(conn, RESETS_KEY)?.and_then(|r| r.parse().ok()).unwrap_or(0))
}

pub(crate) fn set(conn: &Connection, cursor: LogCursor) -> Result<()> {
    settings::set(conn, POSITION_KEY, &cursor.position.to_string())?;
    settings::set(conn, TAG_KEY, &cursor.tag.to_string())
}

pub(crate) fn reset(conn: &Connection) -> Result<()> {
    settings::delete(conn, &[POSITION_KEY, TAG_KEY])?;
    settings::set(conn, RESETS_KEY, &(resets(conn)? + 1).to_string())
}
