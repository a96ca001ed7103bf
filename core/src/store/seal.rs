//! Sealing: turning the change journal into outbox entries with causal metadata.
//!
//! Runs at the start of every transaction that applies remote changes, so a local write's
//! causal context is what the device had seen when the write happened, never what arrived
//! after it. Timestamps come from when each write was made (recorded by the trigger), not
//! from when it is sealed.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::Connection;

use super::catalog::TableInfo;
use super::refusals::{self, Origin};
use super::{Inner, capture, meta, track};
use crate::clock::{Dot, Hlc};
use crate::codec::encode_key;
use crate::error::Result;
use crate::merge::{FieldWrite, LocalWrite, write_local_delete, write_local_upsert};
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
    /// Local writes that could not be synced (a value over the size limit), moved aside.
    pub refused: usize,
}

/// One row's journal entries folded together, joined with the current table row.
struct Journaled {
    table: usize,
    pk: Vec<Value>,
    masks: Vec<u64>,
    /// When each captured column (by position in `TableInfo::app`) was last written, in Unix
    /// ms; `None` when no entry said (entries written by the engine itself).
    column_ms: Vec<Option<u64>>,
    /// When the row was last written at all.
    row_ms: Option<u64>,
    present: bool,
    values: Vec<Value>,
}

pub(crate) fn seal(conn: &Connection, inner: &mut Inner) -> Result<SealReport> {
    let mut report = SealReport::default();
    if inner.seal_held {
        return Ok(report);
    }
    track::check_schema(conn, inner)?;
    let mut journal = Vec::new();
    for t in 0..inner.catalog.tables.len() {
        let info = &inner.catalog.tables[t];
        if !info.journal {
            continue;
        }
        if !info.tracked && !track::columns_still_there(conn, info)? {
            // Untracked, then dropped or altered before its last writes were sealed: their
            // values cannot be read any more. Say so, rather than fail every seal from now on.
            let now = inner.now();
            let rows = capture::journaled_rows(conn, info)?;
            let reason = format!("{rows} unsent writes could not be read: the table was changed after untrack");
            refusals::refuse(conn, Origin::Local, &info.name, &[], &reason, now)?;
            capture::drop_journal(conn, info)?;
            inner.catalog.tables[t].journal = false;
            continue;
        }
        journal.extend(read_journal(conn, inner, t)?);
    }
    if journal.is_empty() {
        return Ok(report);
    }
    // Columns a conflict resolution wrote: (table id, key, column).
    let forced: Vec<(i64, Vec<u8>, String)> = {
        let mut stmt = conn.prepare_cached("SELECT tbl, pk, col FROM _driftless_forced")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?
    };
    let now = inner.now();
    // Trigger times come from SQLite's clock; map them onto the store's (the same clock in
    // production, a test's clock in tests) so that both agree on "now".
    let offset = i128::from(now) - i128::from(super::system_clock());
    let to_store_ms = |ms: Option<u64>| -> u64 {
        ms.map_or(now, |m| u64::try_from((i128::from(m) + offset).clamp(0, i128::from(now))).unwrap_or(now))
    };
    // Oldest write first, so dots follow the order writes were made in.
    journal.sort_by_key(|j| to_store_ms(j.row_ms));
    // Every timestamp issued now comes after everything this replica had seen before: the
    // journal was sealed before each remote change was applied, so nothing newer was seen
    // when these writes were made.
    let floor = Hlc(inner.clock.last().0 + 1);
    let stamp = |ms: u64| Hlc::new(ms, 0).max(floor);
    let mut newest = inner.clock.last();
    for row in journal {
        let t = row.table;
        let key = encode_key(&row.pk);
        let info = &inner.catalog.tables[t];
        let old = meta::load(conn, &inner.nodes, info, &key, &inner.opts.limits)?;
        let existed = old.is_some();
        let mut state = old.unwrap_or_default();
        let had_conflicts = meta::has_conflicts(inner, t, &state);
        let info = &inner.catalog.tables[t];
        // (Only counters need the values the app showed.)
        let has_counters = info.counter_columns().next().is_some();
        let mut shown = if has_counters { refusals::shown_counters(conn, info.id, &key)? } else { None };
        // Counter contributions merged before anything said the row exists (an increment
        // that overtook its row's insert on the way here): the app never showed them, so its
        // own value counts from zero.
        let unseen = existed && state.life.entries.is_empty() && !state.counters.is_empty() && shown.is_none();
        if unseen {
            shown = Some(info.counter_columns().map(|c| (c.name.clone(), 0)).collect());
        }
        let deltas = counter_deltas(info, &state, row.present.then_some(&row.values[..]), shown.as_ref());
        let dot = Dot { node: inner.node, counter: inner.counter + 1 };
        let row_hlc = stamp(to_store_ms(row.row_ms));
        let visible = existed && view::is_visible(&state, &info.spec);
        let change = if row.present {
            let is_forced = |c: &str| forced.iter().any(|(tbl, k, col)| *tbl == info.id && *k == key && col == c);
            let mut fields = Vec::new();
            for (i, (c, v)) in info.app.iter().zip(&row.values).enumerate() {
                // A row not shown yet (new, re-inserted, or the new key of a key change) is
                // written whole; a shown one with the columns that changed.
                let marked = row.masks[(c.idx / 63) as usize] & (1 << (c.idx % 63)) != 0;
                if c.counter || (visible && !marked) {
                    continue;
                }
                // The same bits as the row showed (edited and edited back, or a REAL zero the
                // trigger could not tell from -0.0): nothing to write.
                let unchanged = visible
                    && state
                        .fields
                        .get(&c.name)
                        .and_then(|r| view::resolve(r, info.spec.policy(&c.name), &inner.nodes.roles))
                        .is_some_and(|e| e.value == *v);
                if unchanged && !is_forced(&c.name) {
                    continue;
                }
                fields.push(FieldWrite {
                    column: c.name.clone(),
                    value: v.clone(),
                    hlc: stamp(to_store_ms(row.column_ms[i].or(row.row_ms))),
                });
            }
            // Nothing changed in a row the app already sees (`UPDATE t SET x = x`): no write.
            // In particular this must not settle a delete/update conflict by itself.
            if fields.is_empty() && deltas.is_empty() && visible {
                continue;
            }
            write_local_upsert(&mut state, dot, row_hlc, LocalWrite { fields, counter_deltas: deltas })
        } else {
            // Inserted and deleted between two seals, or already gone: nothing to ship.
            if !visible {
                continue;
            }
            write_local_delete(&mut state, dot, row_hlc, deltas, info.spec.delete_policy)
        };
        if let Err(reason) = state.check_limits(&inner.opts.limits) {
            // A value this large could never be loaded again by any replica: keep the app's
            // row as it is, record why it does not sync, and go on with the other rows.
            refusals::refuse(conn, Origin::Local, &info.name, &key, &reason, now)?;
            report.refused += 1;
            continue;
        }
        for e in change
            .life
            .entries
            .iter()
            .map(|e| e.hlc)
            .chain(change.fields.values().flat_map(|r| r.entries.iter().map(|e| e.hlc)))
        {
            newest = newest.max(e);
        }
        inner.counter += 1;
        report.rows += 1;
        report.fields += change.fields.len() + change.counters.len();
        let info = &inner.catalog.tables[t];
        let now_values = || -> Vec<(String, i64)> {
            let value = |i: usize| if row.present { counter_value(&row.values[i]) } else { 0 };
            info.app.iter().enumerate().filter(|(_, c)| c.counter).map(|(i, c)| (c.name.clone(), value(i))).collect()
        };
        if shown.is_some() && !unseen {
            refusals::set_shown_counters(conn, info.id, &key, &now_values())?;
        }
        let unseen_shown = (unseen && row.present).then(now_values);
        meta::save(conn, inner, t, &key, &state, had_conflicts)?;
        if let Some(shown_now) = unseen_shown {
            // The app shows its own value, not the merged sum: recorded like a row the app
            // refused, with the values it shows, so later seals count from those, and shown
            // whole when the row's next change (its insert, still on its way) is applied.
            let reason = "increments arrived before the row did; shown once the row arrives";
            let id = inner.catalog.tables[t].id;
            refusals::record_unapplied(conn, id, &key, reason, now, &shown_now)?;
        }
        let bytes = meta::encode(conn, inner, t, &change)?;
        conn.prepare_cached("INSERT INTO _driftless_outbox(tbl, pk, change, created_ms) VALUES (?1, ?2, ?3, ?4)")?
            .execute(rusqlite::params![inner.catalog.tables[t].id, key, bytes, now as i64])?;
    }
    for info in inner.catalog.tables.iter_mut().filter(|t| t.journal) {
        if info.captures() {
            conn.execute(&format!("DELETE FROM \"{}\"", info.pending_table()), [])?;
        } else {
            // What was journaled before the table stopped being captured is sealed now.
            capture::drop_journal(conn, info)?;
            info.journal = false;
        }
    }
    if !forced.is_empty() {
        conn.execute("DELETE FROM _driftless_forced", [])?;
    }
    inner.clock.witness(newest);
    inner.save_clocks(conn)?;
    Ok(report)
}

/// Reads the journal and folds every entry of one row into one (masks OR-ed, the latest time
/// per column), in order of each row's first entry.
fn read_journal(conn: &Connection, inner: &Inner, t: usize) -> Result<Vec<Journaled>> {
    let info = &inner.catalog.tables[t];
    let (nk, nm) = (info.pk.len(), info.mask_words());
    let mut stmt = conn.prepare_cached(&info.sql.seal(info))?;
    let rows = stmt.query_map([], |r| {
        let pk = (0..nk).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()?;
        let masks = (0..nm).map(|i| r.get::<_, i64>(nk + i).map(|m| m as u64)).collect::<rusqlite::Result<Vec<_>>>()?;
        let time = r.get::<_, Option<f64>>(nk + nm)?.and_then(capture::julian_to_unix_ms);
        let base = nk + nm + 1;
        let present: bool = r.get(base)?;
        let values =
            (0..info.app.len()).map(|i| r.get::<_, Value>(base + 1 + i)).collect::<rusqlite::Result<Vec<_>>>()?;
        let column_ms = info
            .app
            .iter()
            .map(|c| (masks[(c.idx / 63) as usize] & (1 << (c.idx % 63)) != 0).then_some(time).flatten())
            .collect();
        Ok(Journaled { table: t, pk, masks, column_ms, row_ms: time, present, values })
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
                for (ms, add) in into.column_ms.iter_mut().zip(&row.column_ms) {
                    *ms = (*ms).max(*add);
                }
                into.row_ms = into.row_ms.max(row.row_ms);
                // The join reads the row as it is now, so every entry carries the same values.
                into.present = row.present;
            }
        }
    }
    Ok(folded)
}

/// Each counter column's change since the app last saw it: the row's value now (0 once the
/// row is gone) minus what the app was shown. That is the sum of every node's part, since
/// after every seal and apply the column shows exactly that sum; for a row whose merged
/// state the app's own constraints refused, it is what the app kept showing instead.
fn counter_deltas(
    info: &TableInfo,
    state: &RowState,
    values: Option<&[Value]>,
    shown: Option<&HashMap<String, i64>>,
) -> Vec<(String, i64)> {
    info.app
        .iter()
        .enumerate()
        .filter(|(_, c)| c.counter)
        .filter_map(|(i, c)| {
            let now = values.map_or(0, |v| counter_value(&v[i]));
            let known = match shown.and_then(|s| s.get(&c.name)) {
                Some(&v) => v,
                None => state.counters.get(&c.name).map_or(0, Counter::value),
            };
            let delta = now.wrapping_sub(known);
            (delta != 0).then(|| (c.name.clone(), delta))
        })
        .collect()
}

/// A counter column's value as an integer, as `CAST(x AS INTEGER)` would read it.
pub(crate) fn counter_value(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        // `as` truncates toward zero and saturates, like SQLite's cast.
        Value::Real(r) => *r as i64,
        Value::Text(t) => t.trim().parse::<f64>().map_or(0, |f| f as i64),
        Value::Null | Value::Blob(_) | Value::RawText(_) => 0,
    }
}
