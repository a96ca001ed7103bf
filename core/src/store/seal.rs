//! Sealing: turning the change journal into outbox entries with causal metadata.
//!
//! Runs at the start of every transaction that applies remote changes, so a local write's
//! causal context is what the device had seen when the write happened, never what arrived
//! after it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::Connection;

use super::catalog::TableInfo;
use super::{Inner, capture, meta, track};
use crate::clock::Dot;
use crate::codec::encode_key;
use crate::error::Result;
use crate::merge::{LocalWrite, write_local_delete, write_local_upsert};
use crate::state::{Counter, RowState};
use crate::value::Value;
use crate::view;

/// What a seal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Outbox entries written.
    pub rows: usize,
    /// Field writes they carry.
    pub fields: usize,
}

/// One journal row joined with the current table row.
struct Journaled {
    pk: Vec<Value>,
    masks: Vec<u64>,
    present: bool,
    values: Vec<Value>,
}

pub(crate) fn seal(conn: &Connection, inner: &mut Inner) -> Result<SealReport> {
    track::check_schema(conn, inner)?;
    seal_journal(conn, inner)
}

/// Seals without first checking table shapes (used while re-tracking a changed table, when
/// the old triggers and the old column list still agree with each other).
pub(crate) fn seal_journal(conn: &Connection, inner: &mut Inner) -> Result<SealReport> {
    let mut report = SealReport::default();
    let mut ticked = None;
    for t in 0..inner.catalog.tables.len() {
        if !inner.catalog.tables[t].captures() {
            continue;
        }
        let journal = read_journal(conn, inner, t)?;
        if journal.is_empty() {
            continue;
        }
        let hlc = *ticked.get_or_insert_with(|| {
            let now = inner.now();
            inner.clock.tick(now)
        });
        for row in journal {
            let key = encode_key(&row.pk);
            let info = &inner.catalog.tables[t];
            let old = meta::load(conn, &inner.nodes, info, &key, &inner.opts.limits)?;
            let existed = old.is_some();
            let mut state = old.unwrap_or_default();
            let had_conflicts = meta::has_conflicts(inner, t, &state);
            let info = &inner.catalog.tables[t];
            let deltas = counter_deltas(info, &state, row.present.then_some(&row.values[..]));
            let dot = Dot { node: inner.node, counter: inner.counter + 1 };
            let change = if row.present {
                let values: Vec<(String, Value)> = info
                    .app
                    .iter()
                    .zip(row.values)
                    .filter(|(c, _)| !c.counter && row.masks[(c.idx / 63) as usize] & (1 << (c.idx % 63)) != 0)
                    .map(|(c, v)| (c.name.clone(), v))
                    .collect();
                // Nothing changed in a row the app already sees (`UPDATE t SET x = x`): no write.
                // In particular this must not settle a delete/update conflict by itself.
                if values.is_empty() && deltas.is_empty() && existed && view::is_visible(&state, &info.spec) {
                    continue;
                }
                write_local_upsert(&mut state, dot, hlc, LocalWrite { values, counter_deltas: deltas })
            } else {
                // Inserted and deleted between two seals, or already gone: nothing to ship.
                if !existed || !view::is_visible(&state, &info.spec) {
                    continue;
                }
                write_local_delete(&mut state, dot, hlc, deltas)
            };
            inner.counter += 1;
            report.rows += 1;
            report.fields += change.fields.len() + change.counters.len();
            meta::save(conn, inner, t, &key, &state, had_conflicts)?;
            let bytes = meta::encode(conn, inner, t, &change)?;
            let now = inner.now();
            conn.prepare_cached("INSERT INTO _driftless_outbox(tbl, pk, change, created_ms) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![inner.catalog.tables[t].id, key, bytes, now as i64])?;
        }
        conn.execute(&format!("DELETE FROM \"{}\"", inner.catalog.tables[t].pending_table()), [])?;
    }
    if ticked.is_some() {
        inner.save_clocks(conn)?;
    }
    Ok(report)
}

/// Reads the journal and folds every entry of one row into one (masks OR-ed), in order of
/// each row's first entry.
fn read_journal(conn: &Connection, inner: &Inner, t: usize) -> Result<Vec<Journaled>> {
    let info = &inner.catalog.tables[t];
    let (nk, nm) = (info.pk.len(), info.mask_words());
    let mut stmt = conn.prepare_cached(&capture::seal_query(info))?;
    let rows = stmt.query_map([], |r| {
        let pk = (0..nk).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()?;
        let masks = (0..nm).map(|i| r.get::<_, i64>(nk + i).map(|m| m as u64)).collect::<rusqlite::Result<Vec<_>>>()?;
        let base = nk + nm;
        let present: bool = r.get(base)?;
        let values =
            (0..info.app.len()).map(|i| r.get::<_, Value>(base + 1 + i)).collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Journaled { pk, masks, present, values })
    })?;
    let mut folded: Vec<Journaled> = Vec::new();
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    for row in rows {
        let row = row?;
        match index.entry(encode_key(&row.pk)) {
            Entry::Vacant(v) => {
                v.insert(folded.len());
                folded.push(row);
            }
            Entry::Occupied(o) => {
                let into = &mut folded[*o.get()];
                for (m, add) in into.masks.iter_mut().zip(&row.masks) {
                    *m |= add;
                }
            }
        }
    }
    Ok(folded)
}

/// Each counter column's change since the state last saw it: the row's value now (0 once the
/// row is gone) minus the sum of every node's part. Exact whatever the writes were (REPLACE
/// included), because after every seal and apply the column shows exactly that sum.
fn counter_deltas(info: &TableInfo, state: &RowState, values: Option<&[Value]>) -> Vec<(String, i64)> {
    info.app
        .iter()
        .enumerate()
        .filter(|(_, c)| c.counter)
        .filter_map(|(i, c)| {
            let now = values.map_or(0, |v| counter_value(&v[i]));
            let known = state.counters.get(&c.name).map_or(0, Counter::value);
            let delta = now.wrapping_sub(known);
            (delta != 0).then(|| (c.name.clone(), delta))
        })
        .collect()
}

/// A counter column's value as an integer, as `CAST(x AS INTEGER)` would read it.
fn counter_value(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        // `as` truncates toward zero and saturates, like SQLite's cast.
        Value::Real(r) => *r as i64,
        Value::Text(t) => t.trim().parse::<f64>().map_or(0, |f| f as i64),
        Value::Null | Value::Blob(_) => 0,
    }
}
