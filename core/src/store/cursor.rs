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
    settings::delete(conn, &[SNAPSHOT_KEY])?;
    settings::set(conn, POSITION_KEY, &cursor.position.to_string())?;
    settings::set(conn, TAG_KEY, &cursor.tag.to_string())
}

pub(crate) fn reset(conn: &Connection) -> Result<()> {
    settings::delete(conn, &[POSITION_KEY, TAG_KEY, SNAPSHOT_KEY])?;
    settings::set(conn, RESETS_KEY, &(resets(conn)? + 1).to_string())
}

/// How far a snapshot got, while there is no cursor: the resume token of the next page and
/// the log position the snapshot continues from, kept with the pages applied so that a
/// snapshot interrupted (a disconnect, a restart) goes on where it stopped. Valid only for
/// the reset count it was taken under; a cursor set or reset forgets it.
const SNAPSHOT_KEY: &str = "sync.snapshot_at";

pub(crate) fn snapshot_at(conn: &Connection) -> Result<Option<SnapshotAt>> {
    let Some(saved) = settings::get(conn, SNAPSHOT_KEY)? else { return Ok(None) };
    let parts: Vec<&str> = saved.split(' ').collect();
    // Notes of earlier versions hold no progress.
    let (&[resets_at, position, tag, resume], counts) = parts.split_at_checked(4).unwrap_or((&[], &[])) else {
        return Ok(None);
    };
    if resets_at.parse::<u64>().ok() != Some(resets(conn)?) || get(conn)?.is_some() {
        return Ok(None);
    }
    let (Ok(position), Ok(tag)) = (position.parse(), tag.parse()) else { return Ok(None) };
    let resume = (0..resume.len() / 2)
        .map(|i| u8::from_str_radix(resume.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).ok())
        .collect::<Option<Vec<u8>>>();
    // All four counts or none.
    let counts: Option<Vec<u64>> = counts.iter().map(|c| c.parse().ok()).collect();
    let progress = match counts.as_deref() {
        Some(&[rows_done, rows_total, bytes_done, bytes_total]) => {
            SnapshotProgress { rows_done, rows_total, bytes_done, bytes_total }
        }
        _ => SnapshotProgress::default(),
    };
    Ok(resume.map(|resume| SnapshotAt { resume, log_cursor: LogCursor { position, tag }, progress }))
}

/// Notes how far a snapshot taken under `resets` got, if no cursor was set meanwhile.
pub(crate) fn set_snapshot_at(conn: &Connection, at: &SnapshotAt, at_resets: u64) -> Result<bool> {
    if get(conn)?.is_some() || resets(conn)? != at_resets {
        return Ok(false);
    }
    let hex: String = at.resume.iter().map(|b| format!("{b:02x}")).collect();
    let p = at.progress;
    let note = format!(
        "{at_resets} {} {} {hex} {} {} {} {}",
        at.log_cursor.position, at.log_cursor.tag, p.rows_done, p.rows_total, p.bytes_done, p.bytes_total
    );
    settings::set(conn, SNAPSHOT_KEY, &note)?;
    Ok(true)
}

/// Where a snapshot under way goes on, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotAt {
    /// The next page's resume token.
    pub resume: Vec<u8>,
    /// The log position the snapshot continues from once done.
    pub log_cursor: LogCursor,
    pub progress: SnapshotProgress,
}

/// How far a snapshot got: rows and bytes (as the gateway stores them, before compression)
/// taken in so far, and in all as the gateway counted them when it started (0: not told).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub rows_done: u64,
    pub rows_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}
