//! Listing and resolving conflicts.

use rusqlite::Connection;

use super::catalog::ident;
use super::{Inner, capture, meta, seal};
use crate::codec::{decode_key, encode_key};
use crate::error::{Error, Result};
use crate::value::Value;
use crate::view::{self, ConflictKind, ConflictRecord};

/// A conflict held by one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub table: String,
    pub pk: Vec<Value>,
    pub record: ConflictRecord,
}

pub(crate) fn list(conn: &Connection, inner: &Inner) -> Result<Vec<Conflict>> {
    let mut stmt = conn.prepare_cached("SELECT tbl, pk FROM _driftless_conflicted ORDER BY tbl, pk")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (tbl, key) = row?;
        let Some(t) = inner.catalog.by_id(tbl) else { continue };
        let info = &inner.catalog.tables[t];
        let Some(state) = meta::load(conn, &inner.nodes, info, &key, &inner.opts.limits)? else { continue };
        let pk = decode_key(&key, &inner.opts.limits).map_err(|e| Error::Corrupt(e.to_string()))?;
        for record in view::conflicts(&state, &info.spec, &inner.nodes.roles) {
            out.push(Conflict { table: info.name.clone(), pk: pk.clone(), record });
        }
    }
    Ok(out)
}

pub(crate) fn resolve(
    conn: &Connection,
    inner: &mut Inner,
    table: &str,
    pk: &[Value],
    column: &str,
    value: Value,
) -> Result<()> {
    seal::seal(conn, inner)?;
    let t = inner.catalog.by_name(table).ok_or_else(|| Error::NotTracked(table.to_owned()))?;
    let info = &inner.catalog.tables[t];
    let no_conflict = || Error::NoSuchConflict { table: table.to_owned(), column: column.to_owned() };
    let key = encode_key(pk);
    let state = meta::load(conn, &inner.nodes, info, &key, &inner.opts.limits)?.ok_or_else(no_conflict)?;
    let has_it = view::conflicts(&state, &info.spec, &inner.nodes.roles)
        .iter()
        .any(|c| matches!(&c.kind, ConflictKind::Field { column: col, .. } if col == column));
    let app = info.app.iter().find(|c| c.name == column).ok_or_else(no_conflict)?;
    if !has_it || !view::is_visible(&state, &info.spec) || !info.captures() {
        return Err(no_conflict());
    }
    let keys: Vec<String> = info.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", ident(c), i + 2)).collect();
    let sql = format!("UPDATE {} SET {} = ?1 WHERE {}", ident(&info.name), ident(column), keys.join(" AND "));
    let params: Vec<&Value> = std::iter::once(&value).chain(pk.iter()).collect();
    conn.execute(&sql, rusqlite::params_from_iter(params))?;
    // The value may equal the one shown, which the trigger would not see as a change, and
    // which the seal would take for no change at all.
    capture::journal_rows(conn, info, &[(pk.to_vec(), vec![app.idx])])?;
    conn.execute(
        "INSERT OR IGNORE INTO _driftless_forced(tbl, pk, col) VALUES (?1, ?2, ?3)",
        rusqlite::params![info.id, key, column],
    )?;
    seal::seal(conn, inner)?;
    Ok(())
}
