//! Reading the log back in the PostgreSQL store: its head, the entries after a cursor, and a
//! row's merged state (what a pull serves a row that entered a device's scope).

use driftless_core::codec::{Limits, decode_payload, encode_key};
use driftless_core::{Batch, LogCursor, Value};
use postgres::{Client, GenericClient};

use super::Stmts;
use super::tables::key_hash;
use crate::error::{Error, Result};
use crate::storage::chains::Chain;
use crate::storage::common::{parse_resume, resume_token};
use crate::storage::scoped::read_moves;
use crate::storage::{Logged, SnapshotPage};

pub(super) fn head(client: &mut impl GenericClient, stmts: &mut Stmts, tenant: &str) -> Result<LogCursor> {
    let stmt =
        stmts.get(client, "SELECT seq, tag FROM driftless.gw_log WHERE tenant = $1 ORDER BY seq DESC LIMIT 1")?;
    let row = client.query_opt(&stmt, &[&tenant])?;
    Ok(row.map_or(LogCursor::default(), |r| LogCursor {
        position: r.get::<_, i64>(0) as u64,
        tag: r.get::<_, i64>(1) as u64,
    }))
}

/// Up to `limit` entries after `cursor`, all of them or those of `chain`, and whether more
/// follow.
pub(super) fn after(
    client: &mut Client,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    (cursor, limit): (u64, usize),
    chain: Option<&Chain>,
) -> Result<(Vec<Logged>, bool)> {
    let (cursor, n) = (cursor as i64, limit as i64 + 1);
    let entries = match chain {
        None => {
            let stmt = stmts.get(
                client,
                "SELECT seq, origin, change, tag, moves FROM driftless.gw_log
                 WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )?;
            client.query(&stmt, &[&tenant, &cursor, &n])?
        }
        Some(chain) => {
            // The entries without scoped rows, and those filed under each of the chain's
            // keys, each part bounded before they are merged.
            let stmt = stmts.get(
                client,
                "SELECT seq, origin, change, tag, moves FROM driftless.gw_log WHERE tenant = $1 AND seq IN (
                     SELECT seq FROM (
                         SELECT seq FROM (SELECT seq FROM driftless.gw_log
                             WHERE tenant = $1 AND seq > $2 AND moves IS NULL ORDER BY seq LIMIT $3) a
                         UNION
                         SELECT s.seq FROM unnest($4::text[], $5::bytea[]) AS k(t, h) CROSS JOIN LATERAL (
                             SELECT seq FROM driftless.gw_log_scopes
                             WHERE tenant = $1 AND tbl = k.t AND skey = k.h AND seq > $2 ORDER BY seq LIMIT $3) s
                     ) u ORDER BY seq LIMIT $3)
                 ORDER BY seq",
            )?;
            let (tables, keys) = chain_keys(chain);
            client.query(&stmt, &[&tenant, &cursor, &n, &tables, &keys])?
        }
    };
    let more = entries.len() > limit;
    let logged = entries
        .iter()
        .take(limit)
        .map(|r| {
            Ok(Logged {
                cursor: LogCursor { position: r.get::<_, i64>(0) as u64, tag: r.get::<_, i64>(3) as u64 },
                origin: r.get(1),
                change: decode(r.get(2), limits)?,
                moves: read_moves(r.get(4), limits)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((logged, more))
}

/// The last entry of `chain` before position `before` (0/0: none).
pub(super) fn chain_before(
    client: &mut Client,
    stmts: &mut Stmts,
    tenant: &str,
    chain: &Chain,
    before: u64,
) -> Result<LogCursor> {
    let stmt = stmts.get(
        client,
        "SELECT seq, tag FROM driftless.gw_log WHERE tenant = $1 AND seq = (SELECT max(s) FROM (
             SELECT max(seq) AS s FROM driftless.gw_log WHERE tenant = $1 AND seq < $2 AND moves IS NULL
             UNION ALL
             SELECT (SELECT max(seq) FROM driftless.gw_log_scopes
                     WHERE tenant = $1 AND tbl = k.t AND skey = k.h AND seq < $2)
             FROM unnest($3::text[], $4::bytea[]) AS k(t, h)) m)",
    )?;
    let (tables, keys) = chain_keys(chain);
    let row = client.query_opt(&stmt, &[&tenant, &(before as i64), &tables, &keys])?;
    Ok(row.map_or_else(LogCursor::default, |r| LogCursor {
        position: r.get::<_, i64>(0) as u64,
        tag: r.get::<_, i64>(1) as u64,
    }))
}

/// How many rows, and their stored bytes: the tenant's, or of `table`.
pub(super) fn size(client: &mut Client, stmts: &mut Stmts, tenant: &str, table: Option<&str>) -> Result<(u64, u64)> {
    let row = match table {
        None => {
            let stmt = stmts.get(
                client,
                "SELECT count(*), coalesce(sum(octet_length(state)), 0)::bigint FROM driftless.gw_rows
                 WHERE tenant = $1",
            )?;
            client.query_one(&stmt, &[&tenant])?
        }
        Some(table) => {
            let stmt = stmts.get(
                client,
                "SELECT count(*), coalesce(sum(octet_length(state)), 0)::bigint FROM driftless.gw_rows
                 WHERE tenant = $1 AND tbl = $2",
            )?;
            client.query_one(&stmt, &[&tenant, &table])?
        }
    };
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

/// The rows a scope key holds of a table, counted in its two indexes (filed by key, or held
/// by reference).
pub(super) fn scope_count(
    client: &mut Client,
    stmts: &mut Stmts,
    tenant: &str,
    table: &str,
    skey: &[u8],
) -> Result<u64> {
    let stmt = stmts.get(
        client,
        "SELECT (SELECT count(*) FROM driftless.gw_scope_rows WHERE tenant = $1 AND tbl = $2 AND skey = $3)
              + (SELECT count(*) FROM driftless.gw_ref_counts WHERE tenant = $1 AND tbl = $2 AND skey = $3)",
    )?;
    Ok(client.query_one(&stmt, &[&tenant, &table, &skey])?.get::<_, i64>(0) as u64)
}

fn chain_keys(chain: &Chain) -> (Vec<&str>, Vec<&[u8]>) {
    chain.keys.iter().map(|(t, k)| (t.as_str(), k.as_slice())).unzip()
}

pub(super) fn row_state(
    client: &mut Client,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    table: &str,
    pk: &[Value],
) -> Result<Option<Batch>> {
    let stmt = stmts.get(client, "SELECT state FROM driftless.gw_rows WHERE tenant = $1 AND tbl = $2 AND pkh = $3")?;
    let row = client.query_opt(&stmt, &[&tenant, &table, &key_hash(&encode_key(pk))])?;
    row.map(|r| decode(r.get(0), limits)).transpose()
}

/// Rows of `table` after key hash `after`, in key hash order; only those of scope key
/// `skey` if given (by the scope index).
#[allow(clippy::too_many_arguments)]
pub(super) fn table_rows(
    client: &mut Client,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    table: &str,
    skey: Option<&[u8]>,
    after: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Batch)>> {
    let rows = match skey {
        None => {
            let stmt = stmts.get(
                client,
                "SELECT pkh, state FROM driftless.gw_rows
                 WHERE tenant = $1 AND tbl = $2 AND pkh > $3 ORDER BY pkh LIMIT $4",
            )?;
            client.query(&stmt, &[&tenant, &table, &after, &(limit as i64)])?
        }
        Some(skey) => {
            let stmt = stmts.get(
                client,
                // A table's rows are filed by their scope key, or counted per scope holding them
                // if it is held by reference (storage/refs.rs): one of the two is empty.
                "(SELECT s.pkh, r.state FROM driftless.gw_scope_rows s
                     JOIN driftless.gw_rows r ON r.tenant = s.tenant AND r.tbl = s.tbl AND r.pkh = s.pkh
                     WHERE s.tenant = $1 AND s.tbl = $2 AND s.skey = $3 AND s.pkh > $4 ORDER BY s.pkh LIMIT $5)
                 UNION ALL
                 (SELECT c.pkh, r.state FROM driftless.gw_ref_counts c
                     JOIN driftless.gw_rows r ON r.tenant = c.tenant AND r.tbl = c.tbl AND r.pkh = c.pkh
                     WHERE c.tenant = $1 AND c.tbl = $2 AND c.skey = $3 AND c.pkh > $4 ORDER BY c.pkh LIMIT $5)
                 ORDER BY 1 LIMIT $5",
            )?;
            client.query(&stmt, &[&tenant, &table, &skey, &after, &(limit as i64)])?
        }
    };
    rows.iter().map(|r| Ok((r.get::<_, Vec<u8>>(0), decode(r.get(1), limits)?))).collect()
}

fn decode(bytes: &[u8], limits: &Limits) -> Result<Batch> {
    decode_payload(bytes, limits).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A page of every row of the tenant, by table and key hash, after `resume`; `None` if
/// `resume` is not a token this store made.
pub(super) fn snapshot_page(
    client: &mut Client,
    limits: &Limits,
    tenant: &str,
    resume: &[u8],
    max_rows: usize,
) -> Result<Option<SnapshotPage>> {
    let Some((table, key)) = parse_resume(resume) else { return Ok(None) };
    // Table names compare bytewise (COLLATE "C"), as the SQLite store orders them.
    let rows = client.query(
        "SELECT tbl, pkh, state FROM driftless.gw_rows
         WHERE tenant = $1 AND (tbl COLLATE \"C\", pkh) > ($2 COLLATE \"C\", $3)
         ORDER BY tbl COLLATE \"C\", pkh LIMIT $4",
        &[&tenant, &table, &key, &(max_rows as i64)],
    )?;
    let mut page = SnapshotPage { done: rows.len() < max_rows, ..SnapshotPage::default() };
    for r in rows {
        let b = decode(r.get(2), limits)?;
        page.batch.roles.extend(b.roles);
        page.batch.rows.extend(b.rows);
        page.resume = resume_token(r.get(0), r.get(1));
    }
    if page.done {
        page.resume.clear();
    }
    Ok(Some(page))
}
