//! Erasure in the SQLite store's log. The log keeps every merged change for devices to pull,
//! so an erasing delete (see `driftless_core::erase`) would erase nothing if the older
//! entries of its row kept their values: as the delete is logged, every earlier entry holding
//! the row loses what the row's merged state has superseded. `gw_log_keys` says which
//! entries hold which row.

use std::collections::{BTreeMap, BTreeSet};

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::erase::erases;
use driftless_core::{Batch, RowState};
use rusqlite::{Connection, OptionalExtension};

use super::merge::load_row;
use crate::error::Error;
use crate::storage::common::{RowKey, readable, scrub_batch};

/// Scrubs what the erasing deletes in `change` (about to be logged) superseded, from the log
/// entries before it and from `change` itself; returns the scrubbed change if it differs.
pub(super) fn scrub(conn: &Connection, limits: &Limits, tenant: &str, change: &Batch) -> Result<Option<Batch>, Error> {
    let mut merged: BTreeMap<RowKey, RowState> = BTreeMap::new();
    for row in change.rows.iter().filter(|r| erases(&r.state)) {
        let key = (row.table.clone(), encode_key(&row.pk));
        if let std::collections::btree_map::Entry::Vacant(slot) = merged.entry(key) {
            let (stored, _) = load_row(conn, limits, tenant, row, &slot.key().1)?;
            slot.insert(stored.state);
        }
    }
    if merged.is_empty() {
        return Ok(None);
    }
    let mut entries: BTreeMap<i64, BTreeSet<&RowKey>> = BTreeMap::new();
    for key in merged.keys() {
        let mut stmt = conn.prepare_cached("SELECT seq FROM gw_log_keys WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?;
        for seq in stmt.query_map(rusqlite::params![tenant, key.0, key.1], |r| r.get::<_, i64>(0))? {
            entries.entry(seq?).or_default().insert(key);
        }
    }
    for (seq, keys) in entries {
        let bytes: Option<Vec<u8>> = conn
            .prepare_cached("SELECT change FROM gw_log WHERE tenant = ?1 AND seq = ?2")?
            .query_row(rusqlite::params![tenant, seq], |r| r.get(0))
            .optional()?;
        let Some(mut logged) = bytes.and_then(|b| readable(&b, limits, tenant, seq)) else { continue };
        if scrub_batch(&mut logged, |key| keys.contains(key).then(|| &merged[key])) {
            conn.prepare_cached("UPDATE gw_log SET change = ?1 WHERE seq = ?2")?
                .execute(rusqlite::params![encode_payload(&logged), seq])?;
        }
    }
    let mut scrubbed = change.clone();
    let changed = scrub_batch(&mut scrubbed, |key| merged.get(key));
    Ok(changed.then_some(scrubbed))
}

/// Notes which rows the log entry `seq` holds.
pub(super) fn index(conn: &Connection, tenant: &str, seq: i64, change: &Batch) -> Result<(), Error> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO gw_log_keys(tenant, tbl, pk, seq) VALUES (?1, ?2, ?3, ?4)")?;
    for row in &change.rows {
        stmt.execute(rusqlite::params![tenant, row.table, encode_key(&row.pk), seq])?;
    }
    Ok(())
}

/// Indexes the log entries written before the index existed (the upgrade to it).
pub(super) fn index_existing(conn: &Connection) -> Result<(), Error> {
    let mut stmt = conn.prepare("SELECT seq, tenant, change FROM gw_log ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (seq, tenant, bytes): (i64, String, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        match decode_payload(&bytes, &Limits::default()) {
            Ok(batch) => index(conn, &tenant, seq, &batch)?,
            // Only a store run with raised limits holds one: it is served as before, but a
            // delete will not scrub it.
            Err(e) => tracing::warn!(seq, tenant, error = %e, "a log entry is left out of the erasure index"),
        }
    }
    Ok(())
}
