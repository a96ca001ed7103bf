//! Dropping rows that left this device's scope: gone from the app's table and from the
//! store's causal state, without a delete being synced (the row lives on elsewhere).
//!
//! Runs after the store sealed, in the transaction that applies the gateway's page, so the
//! capture journals hold nothing but what the evictions' own deletes (and any cascade of
//! the app's they set off) captured: all of it is dropped. Local changes made before are in
//! the outbox already and ship as they are; the gateway decides on them (a change to a row
//! outside the device's scope is refused, and kept there as a dead letter).

use rusqlite::Connection;

use super::Inner;
use super::catalog::ident;
use super::cursor;
use super::settings;
use crate::batch::RowChange;
use crate::codec::encode_key;
use crate::error::Result;

/// Where the scope version the store holds its rows under is kept.
const SCOPE_KEY: &str = "sync.scope_version";

/// Drops each of `rows` (keys only) this store holds. Returns how many it held.
pub(crate) fn evict(conn: &Connection, inner: &Inner, rows: &[RowChange]) -> Result<usize> {
    let mut held = 0;
    for row in rows {
        let Some(t) = inner.catalog.by_name(&row.table) else { continue };
        let info = &inner.catalog.tables[t];
        if row.pk.len() != info.pk.len() {
            continue;
        }
        let key_match: Vec<String> =
            info.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", ident(c), i + 1)).collect();
        let sql = format!("DELETE FROM {} WHERE {}", ident(&info.name), key_match.join(" AND "));
        held += conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(row.pk.iter()))?;
        forget_row(conn, info.id, &encode_key(&row.pk))?;
    }
    clear_journals(conn, inner)?;
    Ok(held)
}

/// Drops every row of `tables` and resets the pull cursor, so the next pull fetches the
/// device's scope whole; notes that the store holds its rows under scope `version`.
pub(crate) fn rescope(conn: &Connection, inner: &Inner, version: u64, tables: &[String]) -> Result<usize> {
    // Told a scope for the first time, before it ever caught up: the store holds no row it
    // fetched, only what its app wrote (a new device used offline first), which ships and
    // stays.
    if scope_version(conn)?.is_none() && cursor::get(conn)?.is_none() {
        settings::set(conn, SCOPE_KEY, &version.to_string())?;
        return Ok(0);
    }
    let mut dropped = 0;
    for name in tables {
        let Some(t) = inner.catalog.by_name(name) else { continue };
        let info = &inner.catalog.tables[t];
        dropped += conn.execute(&format!("DELETE FROM {}", ident(&info.name)), [])?;
        for sql in [
            "DELETE FROM _driftless_rows WHERE tbl = ?1",
            "DELETE FROM _driftless_conflicted WHERE tbl = ?1",
            "DELETE FROM _driftless_unapplied WHERE tbl = ?1",
        ] {
            conn.prepare_cached(sql)?.execute([info.id])?;
        }
    }
    clear_journals(conn, inner)?;
    cursor::reset(conn)?;
    settings::set(conn, SCOPE_KEY, &version.to_string())?;
    Ok(dropped)
}

/// The scope version the store holds its rows under (`None`: never told one).
pub(crate) fn scope_version(conn: &Connection) -> Result<Option<u64>> {
    Ok(settings::get(conn, SCOPE_KEY)?.and_then(|v| v.parse().ok()))
}

fn forget_row(conn: &Connection, table: i64, key: &[u8]) -> Result<()> {
    for sql in [
        "DELETE FROM _driftless_rows WHERE tbl = ?1 AND pk = ?2",
        "DELETE FROM _driftless_conflicted WHERE tbl = ?1 AND pk = ?2",
        "DELETE FROM _driftless_unapplied WHERE tbl = ?1 AND pk = ?2",
    ] {
        conn.prepare_cached(sql)?.execute(rusqlite::params![table, key])?;
    }
    Ok(())
}

fn clear_journals(conn: &Connection, inner: &Inner) -> Result<()> {
    for info in inner.catalog.tables.iter().filter(|i| i.journal) {
        conn.execute(&format!("DELETE FROM {}", ident(&info.pending_table())), [])?;
    }
    Ok(())
}
