//! Reading the outbox as batches, acknowledging entries, and paging through snapshots.

use std::collections::BTreeMap;

use rusqlite::Connection;

use super::Inner;
use crate::batch::{Batch, RowChange};
use crate::codec::{decode_key, decode_row_state};
use crate::error::{Error, Result};

/// Oldest unacknowledged local changes, ready to encode and send.
#[derive(Debug, Clone)]
pub struct OutboxBatch {
    /// Sequence number of the first entry (acknowledge with `ack(first_seq, last_seq)`).
    pub first_seq: i64,
    pub last_seq: i64,
    pub batch: Batch,
}

/// Up to `max_rows` entries with sequence numbers in `after + 1 ..= upto`, oldest first.
pub(crate) fn read(
    conn: &Connection,
    inner: &Inner,
    after: i64,
    upto: i64,
    max_rows: usize,
) -> Result<Option<OutboxBatch>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, tbl, pk, change FROM _driftless_outbox WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(rusqlite::params![after, upto, max_rows as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, Vec<u8>>(3)?))
    })?;
    let mut batch = Batch::default();
    let (mut first, mut last) = (None, 0);
    for row in rows {
        let (seq, tbl, pk, change) = row?;
        first.get_or_insert(seq);
        last = seq;
        batch.rows.push(row_change(inner, tbl, &pk, &change)?);
    }
    let Some(first_seq) = first else { return Ok(None) };
    // Every node whose writes the batch carries, with its role: entries re-sent after a new
    // gateway epoch, or written before this store took a new node id, name other nodes.
    for row in &batch.rows {
        for node in row.state.write_counters().into_keys() {
            if let Some(role) = inner.nodes.roles.get(&node) {
                batch.roles.insert(node, role.clone());
            }
        }
    }
    if !inner.role.is_empty() {
        batch.roles.insert(inner.node, inner.role.clone());
    }
    Ok(Some(OutboxBatch { first_seq, last_seq: last, batch }))
}

fn row_change(inner: &Inner, tbl: i64, pk: &[u8], state: &[u8]) -> Result<RowChange> {
    let t = inner.catalog.by_id(tbl).ok_or_else(|| Error::Corrupt(format!("outbox entry for unknown table {tbl}")))?;
    let info = &inner.catalog.tables[t];
    let limits = &inner.opts.limits;
    let corrupt = |e| Error::Corrupt(format!("stored change of {}: {e}", info.name));
    Ok(RowChange {
        table: info.name.clone(),
        pk: decode_key(pk, limits).map_err(corrupt)?,
        state: decode_row_state(state, &inner.nodes.interner, &info.columns, limits).map_err(corrupt)?,
    })
}

pub(crate) fn ack(conn: &Connection, first: i64, last: i64) -> Result<usize> {
    Ok(conn.prepare_cached("DELETE FROM _driftless_outbox WHERE seq BETWEEN ?1 AND ?2")?.execute([first, last])?)
}

/// Acknowledges `first..=last`, moving the entries at the positions in `refused` (counted
/// among the entries of the range, oldest first) aside with their reasons.
pub(crate) fn ack_refusing(
    conn: &Connection,
    first: i64,
    last: i64,
    refused: &[(u32, String)],
    now_ms: u64,
) -> Result<usize> {
    if !refused.is_empty() {
        let seqs: Vec<i64> = conn
            .prepare_cached("SELECT seq FROM _driftless_outbox WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")?
            .query_map([first, last], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for (index, reason) in refused {
            if let Some(&seq) = seqs.get(*index as usize) {
                reject(conn, seq, seq, reason, now_ms)?;
            }
        }
    }
    ack(conn, first, last)
}

/// Moves entries `first..=last` from the outbox to `_driftless_rejected` with `reason`.
pub(crate) fn reject(conn: &Connection, first: i64, last: i64, reason: &str, now_ms: u64) -> Result<usize> {
    let moved = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO _driftless_rejected(seq, tbl, pk, change, created_ms, rejected_ms, reason)
             SELECT seq, tbl, pk, change, created_ms, ?3, ?4 FROM _driftless_outbox WHERE seq BETWEEN ?1 AND ?2",
        )?
        .execute(rusqlite::params![first, last, now_ms as i64, reason])?;
    ack(conn, first, last)?;
    Ok(moved)
}

pub(crate) fn pending(conn: &Connection, inner: &Inner) -> Result<u64> {
    let mut n: i64 = conn.query_row("SELECT count(*) FROM _driftless_outbox", [], |r| r.get(0))?;
    for info in inner.catalog.tables.iter().filter(|t| t.journal) {
        n += super::capture::journaled_rows(conn, info)? as i64;
    }
    Ok(n as u64)
}

/// Where a snapshot page ended: the last table id and key returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCursor {
    pub table_id: i64,
    pub key: Vec<u8>,
}

pub(crate) fn snapshot(
    conn: &Connection,
    inner: &Inner,
    cursor: Option<&SnapshotCursor>,
    max_rows: usize,
) -> Result<(Batch, Option<SnapshotCursor>)> {
    let (tbl, key) = cursor.map_or((i64::MIN, Vec::new()), |c| (c.table_id, c.key.clone()));
    let mut stmt = conn.prepare_cached(
        "SELECT tbl, pk, meta FROM _driftless_rows WHERE (tbl, pk) > (?1, ?2) ORDER BY tbl, pk LIMIT ?3",
    )?;
    let rows = stmt.query_map(rusqlite::params![tbl, key, max_rows as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    let mut batch = Batch::default();
    let mut next = None;
    let mut roles = BTreeMap::new();
    for row in rows {
        let (tbl, pk, meta) = row?;
        let change = row_change(inner, tbl, &pk, &meta)?;
        for node in change.state.nodes() {
            if let Some(role) = inner.nodes.roles.get(&node) {
                roles.insert(node, role.clone());
            }
        }
        batch.rows.push(change);
        next = Some(SnapshotCursor { table_id: tbl, key: pk });
    }
    batch.roles = roles;
    let more = batch.rows.len() == max_rows;
    Ok((batch, if more { next } else { None }))
}
