//! Rows that could not go where they belong, kept with their reasons so nothing is dropped
//! silently and one bad row never blocks the ones after it:
//! - `_driftless_unapplied`: remote changes merged into a row's state that the app's own
//!   table constraints refused to show. The counter values the app row still shows are kept
//!   with them, so the next local seal counts from what the app saw, not from the merged sum.
//! - `_driftless_refused`: changes that were not merged at all (a remote row this store
//!   cannot accept, a local write too large to sync), with where they came from.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// The counter values the app row shows while its merged state is unapplied; `None` if the
/// row is not unapplied (the app then shows exactly the merged sums).
pub(crate) fn shown_counters(conn: &Connection, tbl: i64, key: &[u8]) -> Result<Option<HashMap<String, i64>>> {
    let shown: Option<Option<String>> = conn
        .prepare_cached("SELECT shown FROM _driftless_unapplied WHERE tbl = ?1 AND pk = ?2")?
        .query_row(rusqlite::params![tbl, key], |r| r.get(0))
        .optional()?;
    match shown {
        None => Ok(None),
        // Recorded before counter values were kept: fall back to the merged sums.
        Some(None) => Ok(Some(HashMap::new())),
        Some(Some(json)) => serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("counter values of an unapplied row: {e}"))),
    }
}

pub(crate) fn set_shown_counters(conn: &Connection, tbl: i64, key: &[u8], values: &[(String, i64)]) -> Result<()> {
    let map: HashMap<&str, i64> = values.iter().map(|(c, v)| (c.as_str(), *v)).collect();
    let json = serde_json::to_string(&map).map_err(|e| Error::Corrupt(e.to_string()))?;
    conn.prepare_cached("UPDATE _driftless_unapplied SET shown = ?3 WHERE tbl = ?1 AND pk = ?2")?
        .execute(rusqlite::params![tbl, key, json])?;
    Ok(())
}

/// Records that the app refused the merged row. `shown` is what its counter columns show
/// now; a row already recorded keeps the values it had (the app still shows those).
pub(crate) fn record_unapplied(
    conn: &Connection,
    tbl: i64,
    key: &[u8],
    reason: &str,
    now_ms: u64,
    shown: &[(String, i64)],
) -> Result<()> {
    let map: HashMap<&str, i64> = shown.iter().map(|(c, v)| (c.as_str(), *v)).collect();
    let json = serde_json::to_string(&map).map_err(|e| Error::Corrupt(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO _driftless_unapplied(tbl, pk, reason, at_ms, shown) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(tbl, pk) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
    )?
    .execute(rusqlite::params![tbl, key, reason, now_ms as i64, json])?;
    Ok(())
}

/// Whether any row is recorded as unapplied.
pub(crate) fn holds_unapplied(conn: &Connection) -> Result<bool> {
    Ok(conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM _driftless_unapplied)")?.query_row([], |r| r.get(0))?)
}

/// The app row shows the merged state again.
pub(crate) fn clear_unapplied(conn: &Connection, tbl: i64, key: &[u8]) -> Result<()> {
    conn.prepare_cached("DELETE FROM _driftless_unapplied WHERE tbl = ?1 AND pk = ?2")?
        .execute(rusqlite::params![tbl, key])?;
    Ok(())
}

/// Where a refused change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Local,
    Remote,
}

/// Records a change that was not merged, with its reason.
pub(crate) fn refuse(
    conn: &Connection,
    origin: Origin,
    table: &str,
    key: &[u8],
    reason: &str,
    now_ms: u64,
) -> Result<()> {
    let origin = match origin {
        Origin::Local => "local",
        Origin::Remote => "remote",
    };
    conn.prepare_cached("INSERT INTO _driftless_refused(tbl, pk, origin, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(rusqlite::params![table, key, origin, reason, now_ms as i64])?;
    Ok(())
}

/// A change that was not merged, as listed by [`crate::Store::refused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub table: String,
    /// The key, as far as it could be read.
    pub pk: Vec<crate::value::Value>,
    /// A write of this store's (true) or a remote change (false).
    pub local: bool,
    pub reason: String,
    pub at_ms: i64,
}

pub(crate) fn list(conn: &Connection, limits: &crate::codec::Limits) -> Result<Vec<Refused>> {
    let mut stmt = conn.prepare("SELECT tbl, pk, origin, reason, at_ms FROM _driftless_refused ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get(4)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (table, key, origin, reason, at_ms) = row?;
        let pk = crate::codec::decode_key(&key, limits).unwrap_or_default();
        out.push(Refused { table, pk, local: origin == "local", reason, at_ms });
    }
    Ok(out)
}

/// Remote changes the app's own table refused: `(table, key, reason)`, by table and key.
pub(crate) fn unapplied(conn: &Connection, inner: &super::Inner) -> Result<Vec<(String, Vec<crate::Value>, String)>> {
    let mut stmt = conn.prepare("SELECT tbl, pk, reason FROM _driftless_unapplied ORDER BY tbl, pk")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (tbl, key, reason) = row?;
        let Some(t) = inner.catalog.by_id(tbl) else { continue };
        let pk = crate::codec::decode_key(&key, &inner.opts.limits).map_err(|e| Error::Corrupt(e.to_string()))?;
        out.push((inner.catalog.tables[t].name.clone(), pk, reason));
    }
    Ok(out)
}
