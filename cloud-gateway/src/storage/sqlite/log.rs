//! Reading the log back in the SQLite store: the entries after a cursor, all of them or a
//! scope's chain (see `storage::chains`), and a chain's entry before a position; and filing
//! a new entry in the scope index the chains are read from.

use driftless_core::codec::{Limits, decode_payload};
use driftless_core::scope::Move;
use driftless_core::{Batch, LogCursor};
use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::storage::Logged;
use crate::storage::chains::{Chain, marks};
use crate::storage::scoped::read_moves;

/// The chain's entries after `?2`, at most `?3`, from the entries without scoped rows and,
/// for each of the chain's keys (parameters from `?4` on), the entries filed under it; each
/// part bounded before they are merged, so a device far behind reads a page, not the log.
fn chain_seqs(chain: &Chain) -> String {
    let mut parts = vec![
        "SELECT seq FROM (SELECT seq FROM gw_log WHERE tenant = ?1 AND seq > ?2 AND moves IS NULL
         ORDER BY seq LIMIT ?3)"
            .to_owned(),
    ];
    for i in 0..chain.keys.len() {
        let (t, k) = (4 + 2 * i, 5 + 2 * i);
        parts.push(format!(
            "SELECT seq FROM (SELECT seq FROM gw_log_scopes WHERE tenant = ?1 AND tbl = ?{t} AND skey = ?{k}
             AND seq > ?2 ORDER BY seq LIMIT ?3)"
        ));
    }
    parts.join(" UNION ")
}

pub(super) fn after(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    cursor: u64,
    limit: usize,
    chain: Option<&Chain>,
) -> Result<(Vec<Logged>, bool)> {
    let mut params: Vec<Box<dyn rusqlite::ToSql>> =
        vec![Box::new(tenant.to_owned()), Box::new(cursor as i64), Box::new(limit as i64 + 1)];
    let sql = match chain {
        None => {
            "SELECT seq, origin, change, tag, moves FROM gw_log WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                .to_owned()
        }
        Some(chain) => {
            for (table, key) in &chain.keys {
                params.push(Box::new(table.clone()));
                params.push(Box::new(key.clone()));
            }
            format!(
                "SELECT seq, origin, change, tag, moves FROM gw_log WHERE tenant = ?1 AND seq IN
                 (SELECT seq FROM ({}) ORDER BY seq LIMIT ?3) ORDER BY seq",
                chain_seqs(chain)
            )
        }
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let entries = stmt
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = entries.len() > limit;
    let logged = entries
        .into_iter()
        .take(limit)
        .map(|(seq, origin, change, tag, moves)| {
            Ok(Logged {
                cursor: LogCursor { position: seq as u64, tag: tag as u64 },
                origin,
                change: decode_payload(&change, limits).map_err(|e| Error::Corrupt(e.to_string()))?,
                moves: read_moves(moves.as_deref(), limits)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((logged, more))
}

/// The last entry of `chain` before position `before` (0/0: none).
pub(super) fn chain_before(conn: &Connection, tenant: &str, chain: &Chain, before: u64) -> Result<LogCursor> {
    let mut parts =
        vec!["SELECT max(seq) AS s FROM gw_log WHERE tenant = ?1 AND seq < ?2 AND moves IS NULL".to_owned()];
    let mut params: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(tenant.to_owned()), Box::new(before as i64)];
    for (i, (table, key)) in chain.keys.iter().enumerate() {
        let (t, k) = (3 + 2 * i, 4 + 2 * i);
        parts.push(format!(
            "SELECT max(seq) FROM gw_log_scopes WHERE tenant = ?1 AND tbl = ?{t} AND skey = ?{k} AND seq < ?2"
        ));
        params.push(Box::new(table.clone()));
        params.push(Box::new(key.clone()));
    }
    let sql = format!(
        "SELECT seq, tag FROM gw_log WHERE tenant = ?1 AND seq = (SELECT max(s) FROM ({}))",
        parts.join(" UNION ALL ")
    );
    let found: Option<(i64, i64)> = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(params.iter()), |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(found.map_or_else(LogCursor::default, |(seq, tag)| LogCursor { position: seq as u64, tag: tag as u64 }))
}

/// Files a new entry holding rows of scoped tables under the keys it concerns.
pub(super) fn index_chains(
    conn: &Connection,
    tenant: &str,
    seq: i64,
    change: &Batch,
    moves: &[Option<Move>],
) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO gw_log_scopes(tenant, tbl, skey, seq) VALUES (?1, ?2, ?3, ?4)")?;
    for (table, key) in marks(change, moves) {
        stmt.execute(rusqlite::params![tenant, table, key, seq])?;
    }
    Ok(())
}
