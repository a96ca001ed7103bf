//! Reading the log back in the PostgreSQL store: its head, the entries after a cursor, and a
//! row's merged state (what a pull serves a row that entered a device's scope).

use driftless_core::codec::{Limits, decode_payload, encode_key};
use driftless_core::{Batch, LogCursor, Value};
use postgres::{Client, GenericClient};

use super::Stmts;
use super::tables::key_hash;
use crate::error::{Error, Result};
use crate::storage::Logged;
use crate::storage::scoped::read_moves;

pub(super) fn head(client: &mut impl GenericClient, stmts: &mut Stmts, tenant: &str) -> Result<LogCursor> {
    let stmt =
        stmts.get(client, "SELECT seq, tag FROM driftless.gw_log WHERE tenant = $1 ORDER BY seq DESC LIMIT 1")?;
    let row = client.query_opt(&stmt, &[&tenant])?;
    Ok(row.map_or(LogCursor::default(), |r| LogCursor {
        position: r.get::<_, i64>(0) as u64,
        tag: r.get::<_, i64>(1) as u64,
    }))
}

pub(super) fn after(
    client: &mut Client,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    cursor: u64,
    limit: usize,
) -> Result<(Vec<Logged>, bool)> {
    let stmt = stmts.get(
        client,
        "SELECT seq, origin, change, tag, moves FROM driftless.gw_log
         WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )?;
    let entries = client.query(&stmt, &[&tenant, &(cursor as i64), &(limit as i64 + 1)])?;
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
                "SELECT s.pkh, r.state FROM driftless.gw_scope_rows s
                 JOIN driftless.gw_rows r ON r.tenant = s.tenant AND r.tbl = s.tbl AND r.pkh = s.pkh
                 WHERE s.tenant = $1 AND s.tbl = $2 AND s.skey = $3 AND s.pkh > $4 ORDER BY s.pkh LIMIT $5",
            )?;
            client.query(&stmt, &[&tenant, &table, &skey, &after, &(limit as i64)])?
        }
    };
    rows.iter().map(|r| Ok((r.get::<_, Vec<u8>>(0), decode(r.get(1), limits)?))).collect()
}

fn decode(bytes: &[u8], limits: &Limits) -> Result<Batch> {
    decode_payload(bytes, limits).map_err(|e| Error::Corrupt(e.to_string()))
}
