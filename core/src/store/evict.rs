//! Dropping rows that left this device's scope: gone from the app's table and from the
//! store's causal state, without a delete being synced (the row lives on elsewhere).
//!
//! Runs after the store sealed, in the transaction that applies the gateway's page, so the
//! capture journals are empty: what they hold after a row's delete is that delete alone, or
//! also what the app's own foreign keys or triggers did with it. Each row goes in a
//! savepoint of its own. A row whose delete the app refuses (a RESTRICT foreign key, a
//! trigger that aborts) or that takes other rows with it (a cascade) stays as it is, with the
//! reason recorded among the rows the app refused (`Store::unapplied`): removing it would
//! either fail the whole page forever or silently remove rows the device still holds.
//!
//! A row with local changes not yet acknowledged is never dropped: they are the app's, and
//! the row's causal state (a counter's parts above all) must stay with them.

use std::collections::HashSet;

use rusqlite::Connection;

use super::Inner;
use super::catalog::{TableInfo, ident};
use super::cursor;
use super::refusals;
use super::settings;
use crate::batch::RowChange;
use crate::codec::encode_key;
use crate::error::Result;
use crate::value::Value;

/// Where the scope version the store holds its rows under is kept.
const SCOPE_KEY: &str = "sync.scope_version";

/// Drops each of `rows` (keys only) this store holds, but those in `hold_back` (an earlier
/// attempt found that the app rolls the whole transaction back when they go). Returns how
/// many it dropped.
pub(crate) fn evict(
    conn: &Connection,
    inner: &Inner,
    rows: &[RowChange],
    hold_back: &HashSet<(i64, Vec<u8>)>,
) -> Result<usize> {
    let mut dropped = 0;
    for row in rows {
        let Some(t) = inner.catalog.by_name(&row.table) else { continue };
        let info = &inner.catalog.tables[t];
        if row.pk.len() != info.pk.len() {
            continue;
        }
        let key = encode_key(&row.pk);
        if hold_back.contains(&(info.id, key.clone())) {
            let reason = "it left this device's scope, but the app's table rolls back its removal";
            refusals::record_unapplied(conn, info.id, &key, reason, inner.now(), &[])?;
            continue;
        }
        if drop_row(conn, inner, info, &row.pk)? {
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Drops every row of `tables` (but those with local changes waiting) and resets the pull
/// cursor, so the next pull fetches the device's scope whole; notes that the store holds
/// its rows under scope `version`.
pub(crate) fn rescope(conn: &Connection, inner: &Inner, version: u64, tables: &[String]) -> Result<usize> {
    // Told a scope for the first time, before it ever caught up or started a snapshot: the
    // store holds no row it fetched, only what its app wrote (a new device used offline
    // first), which ships and stays. (Pages of a snapshot under way were read for a scope
    // the store never took: they go, and the snapshot starts over.)
    if scope_version(conn)?.is_none() && cursor::get(conn)?.is_none() && cursor::snapshot_at(conn)?.is_none() {
        settings::set(conn, SCOPE_KEY, &version.to_string())?;
        return Ok(0);
    }
    let limits = &inner.opts.limits;
    let mut dropped = 0;
    for name in tables {
        let Some(t) = inner.catalog.by_name(name) else { continue };
        let info = &inner.catalog.tables[t];
        let keys: Vec<Vec<u8>> = conn
            .prepare("SELECT pk FROM _driftless_rows WHERE tbl = ?1")?
            .query_map([info.id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for key in keys {
            let pk = crate::codec::decode_key(&key, limits).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
            if drop_row(conn, inner, info, &pk)? {
                dropped += 1;
            }
        }
    }
    cursor::reset(conn)?;
    settings::set(conn, SCOPE_KEY, &version.to_string())?;
    Ok(dropped)
}

/// The scope version the store holds its rows under (`None`: never told one).
pub(crate) fn scope_version(conn: &Connection) -> Result<Option<u64>> {
    Ok(settings::get(conn, SCOPE_KEY)?.and_then(|v| v.parse().ok()))
}

/// Drops one row if it may go; whether it went.
fn drop_row(conn: &Connection, inner: &Inner, info: &TableInfo, pk: &[Value]) -> Result<bool> {
    let key = encode_key(pk);
    let waiting: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM _driftless_outbox WHERE tbl = ?1 AND pk = ?2)")?
        .query_row(rusqlite::params![info.id, key], |r| r.get(0))?;
    if waiting {
        return Ok(false);
    }
    conn.execute_batch("SAVEPOINT driftless_evict")?;
    let key_match: Vec<String> =
        info.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", ident(c), i + 1)).collect();
    let sql = format!("DELETE FROM {} WHERE {}", ident(&info.name), key_match.join(" AND "));
    let before = conn.total_changes();
    let deleted = conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(pk.iter()));
    if deleted.is_err() && conn.is_autocommit() {
        // The app's RAISE(ROLLBACK) or ON CONFLICT ROLLBACK: the whole transaction is gone.
        // The caller starts over, holding this row back.
        return Err(crate::Error::AppRolledBack { table: info.name.clone(), key });
    }
    let refused = match deleted {
        Err(rusqlite::Error::SqliteFailure(e, msg)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            Some(format!(
                "it left this device's scope, but the app's table refused to remove it: {}",
                msg.unwrap_or_default()
            ))
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO driftless_evict; RELEASE driftless_evict")?;
            return Err(e.into());
        }
        // Anything beyond the row and its own capture (a cascade, a trigger of the app's)
        // would change rows the device still holds, or the app's own.
        Ok(n)
            if conn.total_changes() - before > n as u64 + own_capture(conn, info)?
                || journaled(conn, inner, info)? > 0 =>
        {
            Some("it left this device's scope, but removing it would change other rows of the app's".into())
        }
        Ok(_) => None,
    };
    if let Some(reason) = refused {
        conn.execute_batch("ROLLBACK TO driftless_evict; RELEASE driftless_evict")?;
        refusals::record_unapplied(conn, info.id, &key, &reason, inner.now(), &[])?;
        return Ok(false);
    }
    // The delete's own capture: not a change of the app's.
    if info.journal {
        conn.execute(&format!("DELETE FROM {}", ident(&info.pending_table())), [])?;
    }
    for sql in [
        "DELETE FROM _driftless_rows WHERE tbl = ?1 AND pk = ?2",
        "DELETE FROM _driftless_conflicted WHERE tbl = ?1 AND pk = ?2",
        "DELETE FROM _driftless_unapplied WHERE tbl = ?1 AND pk = ?2",
    ] {
        conn.prepare_cached(sql)?.execute(rusqlite::params![info.id, key])?;
    }
    conn.execute_batch("RELEASE driftless_evict")?;
    Ok(true)
}

/// Rows the capture of `info`'s table wrote (its journal is empty right after a seal).
fn own_capture(conn: &Connection, info: &TableInfo) -> Result<u64> {
    if !info.journal {
        return Ok(0);
    }
    let sql = format!("SELECT count(*) FROM {}", ident(&info.pending_table()));
    Ok(conn.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
}

/// Capture journal entries of the other tables (empty right after a seal).
fn journaled(conn: &Connection, inner: &Inner, except: &TableInfo) -> Result<u64> {
    let mut total = 0;
    for info in inner.catalog.tables.iter().filter(|i| i.journal && i.id != except.id) {
        total += own_capture(conn, info)?;
    }
    Ok(total)
}
