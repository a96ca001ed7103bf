//! Applying remote batches: join each row's state, then write the resolved row.

use std::collections::{BTreeMap, HashSet};

use rusqlite::{Connection, OptionalExtension};

use super::catalog::{TableInfo, ident};
use super::refusals::{self, Origin};
use super::seal::counter_value;
use super::{Inner, identity, meta, seal};
use crate::batch::{Batch, RowChange};
use crate::clock::{Hlc, NodeId, Observed};
use crate::codec::encode_key;
use crate::error::{Error, Result};
use crate::intake::{Admit, IntakeRules, RowStore, Written, merge_batch};
use crate::merge::holds_earlier_times;
use crate::state::RowState;
use crate::value::Value;
use crate::view;

/// A row whose app-visible state a remote batch changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedRow {
    pub table: String,
    pub pk: Vec<Value>,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The rows whose state changed, for listeners (in batch order, without repeats).
    pub changed: Vec<ChangedRow>,
    /// Rows whose state changed.
    pub applied: usize,
    /// Rows whose changes were all seen before (redelivery).
    pub duplicates: usize,
    /// Rows of tables this store does not track, or tracks as up-only.
    pub skipped: usize,
    /// Field writes in the batch.
    pub field_changes: usize,
    /// Writes from nodes whose clocks ran beyond the allowed drift.
    pub skewed: usize,
    /// Rows merged but refused by the app table's own constraints (see `Store::unapplied`).
    pub unapplied: usize,
    /// Rows not merged because this store cannot take them (see `Store::refused`).
    pub refused: usize,
    /// Rows queued to be sent back because this store held an earlier time for one of their
    /// writes than the sender (see [`crate::holds_earlier_times`]).
    pub sent_back: usize,
    /// Rows dropped because they left this device's scope.
    pub evicted: usize,
    /// Applied with a cursor move (`Store::apply_with_cursor`): whether the cursor was where
    /// the move started, so the batch was applied and the cursor moved, and where the cursor
    /// is now.
    pub moved: bool,
    pub cursor: Option<crate::LogCursor>,
}

/// Why a remote row cannot be merged here, if it cannot: this table's key has another shape.
fn check_key(info: &TableInfo, pk: &[Value]) -> std::result::Result<(), String> {
    if pk.len() != info.pk.len() {
        return Err(format!("the change has {} key values, the table's key has {}", pk.len(), info.pk.len()));
    }
    if pk.contains(&Value::Null) {
        return Err("the change has a NULL key value".into());
    }
    Ok(())
}

/// Merges `batch`. Rows in `hold_back` (table id, key) are merged but not written to the
/// app's table: an earlier attempt found that the app's own constraint rolls back the whole
/// transaction when they are.
pub(crate) fn apply(
    conn: &Connection,
    inner: &mut Inner,
    batch: &Batch,
    hold_back: &HashSet<(i64, Vec<u8>)>,
    evict: &[RowChange],
) -> Result<ApplyReport> {
    if inner.seal_held {
        // Remote changes must not land before the local ones made earlier are sealed.
        return Err(Error::SealHeld);
    }
    // Writes of this node it has no record of issuing: the store is behind its own past (a
    // backup restored where the gateway lost the same writes, so the handshake could not
    // tell). Issuing those dots again would make the next writes duplicates everyone drops:
    // take a new node id before sealing anything.
    let own = batch.rows.iter().map(|r| r.state.max_counter_of(inner.node)).max().unwrap_or(0);
    if own > inner.counter {
        identity::rotate_node(conn, inner)?;
    }
    seal::seal(conn, inner)?;
    // After the seal (the journals are empty) and before the merge (whose app-row writes may
    // set off the app's own triggers, which ship as local changes).
    let evicted = if evict.is_empty() { 0 } else { super::evict::evict(conn, inner, evict, hold_back)? };
    for (node, role) in &batch.roles {
        if *node != inner.node {
            inner.nodes.set_role(conn, *node, role)?;
        }
    }
    // Most stores hold no unapplied row: then no write has one to clear.
    let unapplied_held = refusals::holds_unapplied(conn)?;
    let mut rows =
        DeviceRows { conn, inner, hold_back, table: 0, had_conflicts: false, unapplied_held, extra: Extra::default() };
    let limits = rows.inner.opts.limits.clone();
    let merged = merge_batch(
        &mut rows,
        batch,
        IntakeRules { limits: &limits, bound: None, vouch: None, roles: None, scopes: None, keep_changed: false },
    )?;
    let DeviceRows { inner, extra, .. } = rows;
    for (index, reason) in &merged.refused {
        let row = &batch.rows[*index];
        refusals::refuse(conn, Origin::Remote, &row.table, &encode_key(&row.pk), reason, inner.now())?;
    }
    let mut report = ApplyReport {
        field_changes: batch.field_changes(),
        applied: merged.applied,
        duplicates: merged.duplicates,
        skipped: merged.skipped,
        refused: merged.refused.len(),
        unapplied: extra.unapplied,
        sent_back: extra.sent_back,
        evicted,
        ..ApplyReport::default()
    };
    let mut reported = HashSet::new();
    let mut newest: Vec<(NodeId, Hlc)> = Vec::new();
    for row in merged.changed_at.iter().map(|&i| &batch.rows[i]) {
        if let Some(seen) = row.state.max_hlc() {
            newest.push(seen);
        }
        if reported.insert((row.table.as_str(), encode_key(&row.pk))) {
            report.changed.push(ChangedRow { table: row.table.clone(), pk: row.pk.clone() });
        }
    }
    report.skewed = observe_clocks(conn, inner, &newest)?;
    Ok(report)
}

/// This store's tracked tables and metadata as the row store the shared merge runs against.
struct DeviceRows<'a> {
    conn: &'a Connection,
    inner: &'a mut Inner,
    hold_back: &'a HashSet<(i64, Vec<u8>)>,
    /// The catalog index of the row being merged, and whether it held conflicts before.
    table: usize,
    had_conflicts: bool,
    /// Whether `_driftless_unapplied` may hold a row (it did when the merge began, or one
    /// was recorded since).
    unapplied_held: bool,
    extra: Extra,
}

#[derive(Debug, Default)]
struct Extra {
    unapplied: usize,
    sent_back: usize,
}

impl RowStore for DeviceRows<'_> {
    type Error = Error;

    fn admit(&mut self, row: &RowChange) -> Result<Admit> {
        let t = match self.inner.catalog.by_name(&row.table) {
            Some(t) if self.inner.catalog.tables[t].accepts() => t,
            _ => return Ok(Admit::Skip),
        };
        self.table = t;
        // One row this store cannot take is recorded and skipped: it must not stop the rows
        // after it, nor the pull cursor.
        Ok(match check_key(&self.inner.catalog.tables[t], &row.pk) {
            Ok(()) => Admit::Merge,
            Err(reason) => Admit::Refuse(reason),
        })
    }

    fn load(&mut self, row: &RowChange) -> Result<(RowState, BTreeMap<NodeId, String>)> {
        let info = &self.inner.catalog.tables[self.table];
        let key = encode_key(&row.pk);
        let state = meta::load(self.conn, &self.inner.nodes, info, &key, &self.inner.opts.limits)?.unwrap_or_default();
        self.had_conflicts = meta::has_conflicts(self.inner, self.table, &state);
        // Roles live in the node registry, set from each batch before its rows.
        Ok((state, BTreeMap::new()))
    }

    fn joined(&mut self, incoming: &RowChange, merged: &RowState) -> Result<()> {
        let t = self.table;
        if holds_earlier_times(merged, &incoming.state) && self.inner.catalog.tables[t].captures() {
            // The sender lost the bounded time of a write this store holds: send the row
            // back (its whole state; the join on the other side is idempotent).
            let bytes = meta::encode(self.conn, self.inner, t, merged)?;
            self.conn
                .prepare_cached("INSERT INTO _driftless_outbox(tbl, pk, change, created_ms) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![
                    self.inner.catalog.tables[t].id,
                    encode_key(&incoming.pk),
                    bytes,
                    self.inner.now() as i64
                ])?;
            self.extra.sent_back += 1;
        }
        Ok(())
    }

    fn write(&mut self, _: &RowChange, merged: RowChange, _: &BTreeMap<NodeId, String>) -> Result<Written> {
        let (conn, t) = (self.conn, self.table);
        let key = encode_key(&merged.pk);
        let id = self.inner.catalog.tables[t].id;
        let shown = shown_counters(conn, &self.inner.catalog.tables[t], &merged.pk)?;
        let written = if self.hold_back.contains(&(id, key.clone())) {
            Err(Error::AppRolledBack { table: merged.table.clone(), key: key.clone() })
        } else {
            write_app_row(conn, self.inner, t, &merged.pk, &merged.state)
        };
        match written {
            Ok(()) if self.unapplied_held => refusals::clear_unapplied(conn, id, &key)?,
            Ok(()) => {}
            // The app's own constraints refused the row (the failed statement left no trace).
            // The merged state is still saved, so nothing is lost, and the refusal is recorded
            // instead of failing the batch: one such row must not block every row after it.
            Err(Error::Sqlite(e)) if is_constraint(&e) => {
                if conn.is_autocommit() {
                    // ON CONFLICT ROLLBACK or RAISE(ROLLBACK): the whole transaction is gone.
                    // The caller starts over, holding this row back from the app's table.
                    return Err(Error::AppRolledBack { table: merged.table, key });
                }
                self.extra.unapplied += 1;
                self.unapplied_held = true;
                refusals::record_unapplied(conn, id, &key, &e.to_string(), self.inner.now(), &shown)?;
            }
            Err(e @ Error::AppRolledBack { .. }) => {
                self.extra.unapplied += 1;
                self.unapplied_held = true;
                refusals::record_unapplied(conn, id, &key, &e.to_string(), self.inner.now(), &shown)?;
            }
            Err(e) => return Err(e),
        }
        forget_journaled(conn, &self.inner.catalog.tables[t], &merged.pk)?;
        meta::save(conn, self.inner, t, &key, &merged.state, self.had_conflicts)?;
        Ok(Written::Done)
    }
}

/// What the app row's counter columns show right now (0 for a missing row).
fn shown_counters(conn: &Connection, info: &TableInfo, pk: &[Value]) -> Result<Vec<(String, i64)>> {
    let counters: Vec<&str> = info.counter_columns().map(|c| c.name.as_str()).collect();
    if counters.is_empty() {
        return Ok(Vec::new());
    }
    let key_match: Vec<String> =
        info.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", ident(c), i + 1)).collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE {}",
        counters.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", "),
        ident(&info.name),
        key_match.join(" AND ")
    );
    let values: Option<Vec<Value>> = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(pk.iter()), |r| {
            (0..counters.len()).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()
        })
        .optional()?;
    Ok(counters
        .iter()
        .enumerate()
        .map(|(i, c)| ((*c).to_owned(), values.as_ref().map_or(0, |v| counter_value(&v[i]))))
        .collect())
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

/// Drops the journal entries the app-row write just made: that write is the remote change
/// itself, not a local one. Entries for other rows (an app trigger or cascade reacting to it)
/// stay and ship as this device's own changes.
fn forget_journaled(conn: &Connection, info: &TableInfo, pk: &[Value]) -> Result<()> {
    if !info.journal {
        return Ok(());
    }
    conn.prepare_cached(&info.sql.forget(info))?.execute(rusqlite::params_from_iter(pk.iter()))?;
    Ok(())
}

/// Advances the local clock past remote writes, clamping and recording any too far ahead.
fn observe_clocks(conn: &Connection, inner: &mut Inner, seen: &[(NodeId, Hlc)]) -> Result<usize> {
    let now = inner.now();
    let mut skewed = 0;
    for &(node, hlc) in seen {
        if inner.clock.observe(hlc, now) == Observed::Clamped {
            skewed += 1;
            conn.prepare_cached(
                "INSERT INTO _driftless_clock_skew(node, hlc, observed_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET hlc = max(hlc, excluded.hlc), observed_ms = excluded.observed_ms",
            )?
            .execute(rusqlite::params![&node.0[..], hlc.0 as i64, now as i64])?;
        }
    }
    if !seen.is_empty() {
        inner.save_clocks(conn)?;
    }
    Ok(skewed)
}

/// Writes the row as the policies resolve it, or deletes it if it no longer exists.
fn write_app_row(
    conn: &Connection,
    inner: &Inner,
    t: usize,
    pk: &[Value],
    state: &crate::state::RowState,
) -> Result<()> {
    let info = &inner.catalog.tables[t];
    let Some(values) = view::row_values(state, &info.spec, &inner.nodes.roles) else {
        conn.prepare_cached(&info.sql.delete(info))?.execute(rusqlite::params_from_iter(pk.iter()))?;
        return Ok(());
    };
    // The app columns the state holds a value for, in the table's order; a column it holds
    // none for is left as it is (or to its default). Counter columns always show their sum,
    // even before any node has counted.
    let zero = Value::Integer(0);
    let mut slots: Vec<Option<&Value>> = vec![None; info.app.len()];
    for (column, value) in &values {
        if let Some(i) = info.app.iter().position(|c| c.name == *column) {
            slots[i] = Some(value);
        }
    }
    let mut cols: Vec<u32> = Vec::with_capacity(slots.len());
    let mut params: Vec<&Value> = pk.iter().collect();
    for (i, (slot, c)) in slots.iter().zip(&info.app).enumerate() {
        if let Some(value) = slot.or(c.counter.then_some(&zero)) {
            cols.push(i as u32);
            params.push(value);
        }
    }
    conn.prepare_cached(&info.sql.upsert(info, &cols))?.execute(rusqlite::params_from_iter(params))?;
    Ok(())
}
