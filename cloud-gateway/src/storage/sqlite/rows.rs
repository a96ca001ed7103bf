//! Reading rows back in the SQLite store: one row's merged state, and for snapshots a
//! table's rows in key order, or only those of one scope key, found by the scope index.

use driftless_core::codec::{Limits, decode_payload, encode_key};
use driftless_core::{Batch, Value};
use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::storage::SnapshotPage;
use crate::storage::common::{parse_resume, resume_token};

/// Up to `limit` rows of `table` after key `after`; only those of scope key `skey` if given.
pub(super) fn table_rows(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    table: &str,
    skey: Option<&[u8]>,
    after: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Batch)>> {
    let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?));
    let rows = match skey {
        None => conn
            .prepare_cached(
                "SELECT pk, state FROM gw_rows WHERE tenant = ?1 AND tbl = ?2 AND pk > ?3 ORDER BY pk LIMIT ?4",
            )?
            .query_map(rusqlite::params![tenant, table, after, limit as i64], read)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        Some(skey) => {
            // A table's rows are filed by their scope key, or counted per scope holding them if
            // it is held by reference (storage/refs.rs): one of the two holds none. Asked one
            // after the other, each read goes in index order (a union would sort the states).
            let mut rows = Vec::new();
            for sql in [
                "SELECT s.pk, r.state FROM gw_scope_rows s
                 JOIN gw_rows r ON r.tenant = s.tenant AND r.tbl = s.tbl AND r.pk = s.pk
                 WHERE s.tenant = ?1 AND s.tbl = ?2 AND s.skey = ?3 AND s.pk > ?4 ORDER BY s.pk LIMIT ?5",
                "SELECT c.pk, r.state FROM gw_ref_counts c
                 JOIN gw_rows r ON r.tenant = c.tenant AND r.tbl = c.tbl AND r.pk = c.pk
                 WHERE c.tenant = ?1 AND c.tbl = ?2 AND c.skey = ?3 AND c.pk > ?4 ORDER BY c.pk LIMIT ?5",
            ] {
                rows = conn
                    .prepare_cached(sql)?
                    .query_map(rusqlite::params![tenant, table, skey, after, limit as i64], read)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                if !rows.is_empty() {
                    break;
                }
            }
            rows
        }
    };
    rows.into_iter()
        .map(|(pk, state)| Ok((pk, decode_payload(&state, limits).map_err(|e| Error::Corrupt(e.to_string()))?)))
        .collect()
}

/// How many rows, and their stored bytes: the tenant's, of `table`, or of its scope key `skey`.
pub(super) fn size(conn: &Connection, tenant: &str, table: Option<&str>) -> Result<(u64, u64)> {
    let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, f64>(1)? as u64));
    Ok(match table {
        None => conn
            .prepare_cached("SELECT count(*), total(length(state)) FROM gw_rows WHERE tenant = ?1")?
            .query_row([tenant], read)?,
        Some(table) => conn
            .prepare_cached("SELECT count(*), total(length(state)) FROM gw_rows WHERE tenant = ?1 AND tbl = ?2")?
            .query_row([tenant, table], read)?,
    })
}

/// The rows a scope key holds of a table, counted in its two indexes (a table's rows are
/// filed by key or held by reference, never both; each entry names a row of `gw_rows`).
pub(super) fn scope_count(conn: &Connection, tenant: &str, table: &str, skey: &[u8]) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT (SELECT count(*) FROM gw_scope_rows WHERE tenant = ?1 AND tbl = ?2 AND skey = ?3)
                  + (SELECT count(*) FROM gw_ref_counts WHERE tenant = ?1 AND tbl = ?2 AND skey = ?3)",
        )?
        .query_row(rusqlite::params![tenant, table, skey], |r| r.get(0))?;
    Ok(n as u64)
}

/// A row's merged state as a one-row batch, if it has one.
pub(super) fn row_state(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    table: &str,
    pk: &[Value],
) -> Result<Option<Batch>> {
    let state: Option<Vec<u8>> = conn
        .prepare_cached("SELECT state FROM gw_rows WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?
        .query_row(rusqlite::params![tenant, table, encode_key(pk)], |r| r.get(0))
        .optional()?;
    state.map(|s| decode_payload(&s, limits).map_err(|e| Error::Corrupt(e.to_string()))).transpose()
}

/// A page of every row of the tenant, in table and key order, after `resume` (empty: from
/// the start); `None` if the token names no position.
pub(super) fn snapshot_page(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    resume: &[u8],
    max_rows: usize,
) -> Result<Option<SnapshotPage>> {
    let Some((table, key)) = parse_resume(resume) else { return Ok(None) };
    let rows = conn
        .prepare_cached(
            "SELECT tbl, pk, state FROM gw_rows WHERE tenant = ?1 AND (tbl, pk) > (?2, ?3) ORDER BY tbl, pk LIMIT ?4",
        )?
        .query_map(rusqlite::params![tenant, table, key, max_rows as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut page = SnapshotPage { done: rows.len() < max_rows, ..SnapshotPage::default() };
    for (tbl, pk, state) in rows {
        let b = decode_payload(&state, limits).map_err(|e| Error::Corrupt(e.to_string()))?;
        page.batch.roles.extend(b.roles);
        page.batch.rows.extend(b.rows);
        page.resume = resume_token(&tbl, &pk);
    }
    if page.done {
        page.resume.clear();
    }
    Ok(Some(page))
}
