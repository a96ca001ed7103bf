//! When tracking of a table starts (or starts again), its rows are compared with the sync
//! metadata kept for them, so that exactly the app's own changes become writes:
//! - a row with no metadata (never synced) is a new insert;
//! - a synced row whose columns differ from what the metadata says it shows was edited while
//!   nothing captured it (untracked), so those columns, and counters by their difference,
//!   are local writes; columns equal to what it shows are not written again, so tracking a
//!   table twice reissues nothing and invents no conflict;
//! - a synced row the app no longer has was deleted meanwhile;
//! - a column the app did not show before (just added) takes the value the metadata holds
//!   for it, written without being captured.
//!
//! Rows whose merged state the app's own constraints refused are left alone.

use std::collections::HashSet;

use rusqlite::Connection;

use super::catalog::ident;
use super::seal::counter_value;
use super::{Inner, meta};
use crate::codec::{decode_key, encode_key};
use crate::error::{Error, Result};
use crate::value::Value;
use crate::view;

/// Journal entries to write: each row's key and the indexes of the columns it changed.
pub(crate) type Diffs = Vec<(Vec<Value>, Vec<u64>)>;

/// Values to write into the app's rows for columns it did not show before: key, then
/// `(column, value)` pairs.
type NewlyShown = Vec<(Vec<Value>, Vec<(String, Value)>)>;

pub(crate) fn reconcile(conn: &Connection, inner: &Inner, t: usize, newly_shown: &[String]) -> Result<Diffs> {
    let info = &inner.catalog.tables[t];
    let limits = &inner.opts.limits;
    let keys: Vec<String> = info.pk.iter().map(|c| ident(c)).collect();
    let cols: Vec<String> = info.app.iter().map(|c| ident(&c.name)).collect();
    let select = format!(
        "SELECT {} FROM {}",
        keys.iter().chain(cols.iter()).cloned().collect::<Vec<_>>().join(", "),
        ident(&info.name)
    );
    let unapplied: HashSet<Vec<u8>> = {
        let mut stmt = conn.prepare("SELECT pk FROM _driftless_unapplied WHERE tbl = ?1")?;
        stmt.query_map([info.id], |r| r.get::<_, Vec<u8>>(0))?.collect::<rusqlite::Result<_>>()?
    };
    let mut diffs = Diffs::new();
    let mut seen = HashSet::new();
    let mut show = NewlyShown::new();
    {
        let mut stmt = conn.prepare(&select)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let pk = (0..keys.len()).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()?;
            let values =
                (0..cols.len()).map(|i| r.get::<_, Value>(keys.len() + i)).collect::<rusqlite::Result<Vec<_>>>()?;
            let key = encode_key(&pk);
            seen.insert(key.clone());
            if unapplied.contains(&key) {
                continue;
            }
            let state = meta::load(conn, &inner.nodes, info, &key, limits)?;
            let shown = state.as_ref().and_then(|s| view::row_values(s, &info.spec, &inner.nodes.roles));
            let Some(shown) = shown else {
                // Never synced, or deleted as far as sync knows: the app's row is new.
                diffs.push((pk, info.app.iter().map(|c| c.idx).collect()));
                continue;
            };
            let mut changed = Vec::new();
            let mut counters_differ = false;
            let mut new_values = Vec::new();
            for (c, value) in info.app.iter().zip(values) {
                let metadata = shown.iter().find(|(name, _)| name == &c.name).map(|(_, v)| v);
                if newly_shown.contains(&c.name) {
                    if let Some(v) = metadata.filter(|v| **v != value) {
                        new_values.push((c.name.clone(), v.clone()));
                    }
                } else if c.counter {
                    let sum = metadata.map_or(0, counter_value);
                    counters_differ |= counter_value(&value) != sum;
                } else if metadata.is_some_and(|v| *v != value) {
                    changed.push(c.idx);
                }
            }
            if !new_values.is_empty() {
                show.push((pk.clone(), new_values));
            }
            if !changed.is_empty() || counters_differ {
                diffs.push((pk, changed));
            }
        }
    }
    for (pk, values) in &show {
        let sets: Vec<String> =
            values.iter().enumerate().map(|(i, (c, _))| format!("{} = ?{}", ident(c), i + 1)).collect();
        let key_match: Vec<String> =
            keys.iter().enumerate().map(|(i, k)| format!("{k} = ?{}", values.len() + i + 1)).collect();
        let sql = format!("UPDATE {} SET {} WHERE {}", ident(&info.name), sets.join(", "), key_match.join(" AND "));
        let params = values.iter().map(|(_, v)| v).chain(pk.iter());
        conn.execute(&sql, rusqlite::params_from_iter(params))?;
    }
    // Rows sync still shows that the app deleted meanwhile.
    let mut stmt = conn.prepare("SELECT pk FROM _driftless_rows WHERE tbl = ?1")?;
    let synced = stmt.query_map([info.id], |r| r.get::<_, Vec<u8>>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    for key in synced {
        if seen.contains(&key) || unapplied.contains(&key) {
            continue;
        }
        let Some(state) = meta::load(conn, &inner.nodes, info, &key, limits)? else { continue };
        if view::is_visible(&state, &info.spec) {
            let pk = decode_key(&key, limits).map_err(|e| Error::Corrupt(format!("a key of {}: {e}", info.name)))?;
            diffs.push((pk, Vec::new()));
        }
    }
    Ok(diffs)
}
