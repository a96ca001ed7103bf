//! Erasure in the PostgreSQL store's log, as in the SQLite store (see its `erasure.rs`): as
//! an erasing delete is logged, every earlier entry holding its row loses what the row's
//! merged state superseded. `gw_log_keys` says which entries hold which row, by key hash.

use std::collections::{BTreeMap, BTreeSet};

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::erase::erases;
use driftless_core::{Batch, RowState};
use postgres::Transaction;

use super::connection::Stmts;
use super::merge::fetch_states;
use super::tables::key_hash;
use crate::error::Result;
use crate::storage::common::{RowKey, readable, scrub_batch};

/// Scrubs what the erasing deletes in `change` (about to be logged; the merged states already
/// saved) superseded, from the tenant's earlier log entries and from `change` itself; returns
/// the scrubbed change if it differs.
pub(super) fn scrub(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    change: &Batch,
) -> Result<Option<Batch>> {
    let erased: BTreeSet<RowKey> =
        change.rows.iter().filter(|r| erases(&r.state)).map(|r| (r.table.clone(), encode_key(&r.pk))).collect();
    if erased.is_empty() {
        return Ok(None);
    }
    let wanted: Vec<(String, Vec<u8>)> = erased.iter().map(|(t, k)| (t.clone(), key_hash(k))).collect();
    let stored = fetch_states(tx, stmts, limits, tenant, &wanted)?;
    let mut merged: BTreeMap<RowKey, RowState> = BTreeMap::new();
    for (table, key) in erased {
        if let Some((row, _)) = stored.get(&(table.clone(), key_hash(&key))) {
            merged.insert((table, key), row.state.clone());
        }
    }
    let (tables, hashes): (Vec<&str>, Vec<Vec<u8>>) = merged.keys().map(|(t, k)| (t.as_str(), key_hash(k))).unzip();
    let stmt = stmts.get(
        tx,
        "SELECT DISTINCT k.seq FROM unnest($2::text[], $3::bytea[]) AS u(t, h)
         JOIN driftless.gw_log_keys k ON k.tenant = $1 AND k.tbl = u.t AND k.pkh = u.h",
    )?;
    let seqs: Vec<i64> = tx.query(&stmt, &[&tenant, &tables, &hashes])?.iter().map(|r| r.get(0)).collect();
    let stmt =
        stmts.get(tx, "SELECT seq, change FROM driftless.gw_log WHERE tenant = $1 AND seq = ANY($2::bigint[])")?;
    let mut rewritten: Vec<(i64, Vec<u8>)> = Vec::new();
    for r in tx.query(&stmt, &[&tenant, &seqs])? {
        let seq: i64 = r.get(0);
        let Some(mut logged) = readable(r.get(1), limits, tenant, seq) else { continue };
        if scrub_batch(&mut logged, |key| merged.get(key)) {
            rewritten.push((seq, encode_payload(&logged)));
        }
    }
    if !rewritten.is_empty() {
        let (seqs, changes): (Vec<i64>, Vec<Vec<u8>>) = rewritten.into_iter().unzip();
        let stmt = stmts.get(
            tx,
            "UPDATE driftless.gw_log l SET change = u.c FROM unnest($2::bigint[], $3::bytea[]) AS u(s, c)
             WHERE l.tenant = $1 AND l.seq = u.s",
        )?;
        tx.execute(&stmt, &[&tenant, &seqs, &changes])?;
    }
    let mut scrubbed = change.clone();
    let changed = scrub_batch(&mut scrubbed, |key| merged.get(key));
    Ok(changed.then_some(scrubbed))
}

/// The rows `change` holds, as the index names them: tables and key hashes.
pub(super) fn keys(change: &Batch) -> (Vec<&str>, Vec<Vec<u8>>) {
    change.rows.iter().map(|r| (r.table.as_str(), key_hash(&encode_key(&r.pk)))).unzip()
}

/// Notes which rows the log entry `seq` holds.
pub(super) fn index(tx: &mut Transaction<'_>, stmts: &mut Stmts, tenant: &str, seq: i64, change: &Batch) -> Result<()> {
    let (tables, hashes) = keys(change);
    let stmt = stmts.get(
        tx,
        "INSERT INTO driftless.gw_log_keys(tenant, tbl, pkh, seq)
         SELECT $1, t, h, $4 FROM unnest($2::text[], $3::bytea[]) AS u(t, h) ON CONFLICT DO NOTHING",
    )?;
    tx.execute(&stmt, &[&tenant, &tables, &hashes, &seq])?;
    Ok(())
}

/// Indexes the log entries written before the index existed (the upgrade to it), a page at
/// a time.
pub(super) fn index_existing(tx: &mut Transaction<'_>) -> Result<()> {
    let mut stmts = Stmts::default();
    let (mut tenant, mut seq) = (String::new(), 0i64);
    loop {
        let page = tx.query(
            "SELECT tenant, seq, change FROM driftless.gw_log WHERE (tenant, seq) > ($1, $2)
             ORDER BY tenant, seq LIMIT 1000",
            &[&tenant, &seq],
        )?;
        let Some(last) = page.last() else { return Ok(()) };
        (tenant, seq) = (last.get(0), last.get(1));
        for r in &page {
            let (t, s): (String, i64) = (r.get(0), r.get(1));
            match decode_payload(r.get(2), &Limits::default()) {
                Ok(batch) => index(tx, &mut stmts, &t, s, &batch)?,
                // Only a store run with raised limits holds one: it is served as before, but
                // a delete will not scrub it.
                Err(e) => {
                    tracing::warn!(seq = s, tenant = t, error = %e, "a log entry is left out of the erasure index")
                }
            }
        }
    }
}
