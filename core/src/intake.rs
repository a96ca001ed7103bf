//! Validating and merging a batch into a row store: the one piece of merge code that the
//! device's store and every gateway store run, each behind [`RowStore`].
//!
//! For each row of a batch, in order: the store says whether it takes the row at all (a
//! table it does not track is skipped; a row no replica could take is refused on its own);
//! timestamps of a writer whose clock runs past the allowed drift are bounded (the gateway
//! does this, the first replica that accepts a write); the stored state and the roles of its
//! nodes are loaded; the incoming state is joined in; a state grown past the limits is
//! refused; a row whose state did not change is a duplicate (a redelivery); otherwise the
//! store writes it, and may still refuse it (a constraint of the table that shows it). One
//! bad row never stops the rows after it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::batch::{Batch, RowChange};
use crate::clock::{Hlc, NodeId};
use crate::codec::Limits;
use crate::merge::{bound_future_timestamps, join_row};
use crate::schema::SyncSchema;
use crate::scope::{DeviceScope, Held, Move, ScopeKey, may_write, may_write_held, references, scopes_of};
use crate::state::RowState;
use crate::value::Value;
use crate::view::is_visible;

mod vouch;
pub use vouch::Vouch;

/// Whether a store takes a row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Merge,
    /// Not this store's business (a table it does not track, or only sends).
    Skip,
    /// No replica could take it, for this reason.
    Refuse(String),
}

/// What a store did with a merged row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Done,
    /// Not merged after all, for this reason (nothing of it was kept).
    Refused(String),
}

/// A row store the shared merge runs against. Every call happens inside the store's own
/// transaction, which the caller opened and commits.
pub trait RowStore {
    type Error;

    /// Called once before the rows of a batch are merged, with all of them: a store whose
    /// reads cost a round trip loads them at once here.
    fn prefetch(&mut self, _rows: &[RowChange]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Whether this store takes `row`.
    fn admit(&mut self, row: &RowChange) -> Result<Admit, Self::Error>;

    /// The state held for the row's key (empty if none) and the roles of the nodes in it
    /// as this store knows them.
    fn load(&mut self, row: &RowChange) -> Result<(RowState, BTreeMap<NodeId, String>), Self::Error>;

    /// The keys of the scopes holding a row of a table held by reference (a store that keeps
    /// no scopes: none). Asked only at the gateway, of rows a scoped device writes.
    fn holders(&mut self, _table: &str, _pk: &[Value]) -> Result<Vec<ScopeKey>, Self::Error> {
        Ok(Vec::new())
    }

    /// Whether every node in `state` is the sending device's own (bound to it, in this batch
    /// or before). Asked only at the gateway, of rows held by reference that no scope holds.
    fn written_by_sender(&mut self, _state: &RowState) -> Result<bool, Self::Error> {
        Ok(false)
    }

    /// Called once `incoming` was joined into `merged`, whether it changed anything or not.
    fn joined(&mut self, _incoming: &RowChange, _merged: &RowState) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Keeps a row whose state changed: `merged` is the whole new state and `roles` the roles
    /// of its nodes (the stored ones and the batch's).
    fn write(
        &mut self,
        incoming: &RowChange,
        merged: RowChange,
        roles: &BTreeMap<NodeId, String>,
    ) -> Result<Written, Self::Error>;
}

/// Timestamps past `limit` become `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockBound {
    pub limit: Hlc,
    pub to: Hlc,
}

impl ClockBound {
    /// The gateway's bound: later than `now_ms + max_drift_ms` becomes `now_ms`.
    pub fn at(now_ms: u64, max_drift_ms: u64) -> ClockBound {
        ClockBound { limit: Hlc::new(now_ms.saturating_add(max_drift_ms), u16::MAX), to: Hlc::new(now_ms, 0) }
    }
}

/// How a batch is merged.
#[derive(Debug, Clone, Copy)]
pub struct IntakeRules<'a> {
    pub limits: &'a Limits,
    /// Bound writers' clocks (at the gateway); `None` takes timestamps as they are.
    pub bound: Option<ClockBound>,
    /// What the sender may claim (at the gateway): a row claiming more is refused. `None`
    /// trusts the sender (a device merging what its gateway sent).
    pub vouch: Option<&'a Vouch>,
    /// The roles of the batch's nodes as the receiver knows them, in place of the ones the
    /// batch declares; `None` takes the batch's.
    pub roles: Option<&'a BTreeMap<NodeId, String>>,
    /// The schema's scopes, to record where each changed row moved (at the gateway, which
    /// logs it), and the writer's own scope, outside which its rows are refused.
    pub scopes: Option<ScopeRules<'a>>,
    /// Whether the report keeps the rows as merged ([`IntakeReport::changed`]): the gateway
    /// logs them; a device needs only where they are in the batch.
    pub keep_changed: bool,
}

/// Scopes in a merge.
#[derive(Debug, Clone, Copy)]
pub struct ScopeRules<'a> {
    pub schema: &'a SyncSchema,
    /// The sending device's scope; `None`: a writer every row is open to (the cloud).
    pub writer: Option<&'a DeviceScope>,
}

/// What merging a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeReport {
    /// Rows whose state changed.
    pub applied: usize,
    /// Rows whose changes were all merged before.
    pub duplicates: usize,
    /// Rows the store does not take ([`Admit::Skip`]).
    pub skipped: usize,
    /// Rows refused, by position in the batch, with the reason.
    pub refused: Vec<(usize, String)>,
    /// Writes whose timestamps were bounded.
    pub bounded: usize,
    /// Nodes whose writes were bounded, with the largest timestamp each sent.
    pub skewed: BTreeMap<NodeId, Hlc>,
    /// The highest dot counter of each node among the rows taken (merged or duplicate).
    pub counters: BTreeMap<NodeId, u64>,
    /// Where the rows whose state changed are in the batch, in batch order.
    pub changed_at: Vec<usize>,
    /// With [`IntakeRules::keep_changed`]: those rows as merged (timestamps bounded).
    pub changed: Vec<RowChange>,
    /// With [`IntakeRules::scopes`]: where each row of `changed` moved (`None`: a table
    /// without a scope).
    pub moves: Vec<Option<Move>>,
}

/// Merges `batch` into `store` row by row.
pub fn merge_batch<S: RowStore>(
    store: &mut S,
    batch: &Batch,
    rules: IntakeRules<'_>,
) -> Result<IntakeReport, S::Error> {
    let mut report = IntakeReport::default();
    let scoped = rules.scopes.map(|s| scopes_of(s.schema)).unwrap_or_default();
    let by_reference: Vec<&str> = rules
        .scopes
        .map(|s| references(s.schema).iter().map(|(t, _, _)| t.name.as_str()).collect())
        .unwrap_or_default();
    store.prefetch(&batch.rows)?;
    for (index, row) in batch.rows.iter().enumerate() {
        match store.admit(row)? {
            Admit::Merge => {}
            Admit::Skip => {
                report.skipped += 1;
                continue;
            }
            Admit::Refuse(reason) => {
                report.refused.push((index, reason));
                continue;
            }
        }
        // Copied only to bound its timestamps, or to be kept in the report.
        let mut incoming = Cow::Borrowed(row);
        if let Some(bound) = rules.bound
            && incoming.state.max_hlc().is_some_and(|(_, h)| h > bound.limit)
        {
            for (node, hlc) in stamps(&incoming.state) {
                if hlc > bound.limit {
                    let e = report.skewed.entry(node).or_default();
                    *e = (*e).max(hlc);
                }
            }
            report.bounded += bound_future_timestamps(&mut incoming.to_mut().state, bound.limit, bound.to).len();
        }
        let (mut state, mut roles) = store.load(&incoming)?;
        if let Some(reason) = rules.vouch.and_then(|v| v.check(&row.table, &incoming.state, &state)) {
            report.refused.push((index, format!("a change to {:?} claims too much: {reason}", row.table)));
            continue;
        }
        // Counted only once the sender is known to vouch for them: a refused row's claims
        // must not raise what later batches may claim.
        for (node, c) in incoming.state.write_counters() {
            let e = report.counters.entry(node).or_default();
            *e = (*e).max(c);
        }
        let scope = scoped.get(row.table.as_str());
        // Where the row was, read before the join changes it.
        let was = scope.map(|(scope, table)| Held::of(scope, table, &state, &roles));
        // A row held by reference, written by a scoped device: checked unless the store is
        // recovering from a restore (then devices send back everything, other devices' writes
        // and rows whose naming rows come later in the batch included, as with any claim).
        let referenced = by_reference.contains(&row.table.as_str());
        let checked = referenced && rules.vouch.is_some() && rules.scopes.is_some_and(|s| s.writer.is_some());
        // Whether someone else's row is written blind: a row no scope holds yet (a new customer
        // no order names, or not yet logged as named) stays its writer's to edit, and a change
        // that names every node of the row's writes builds on them (a device that held it: a
        // gateway restored from a backup has not heard yet of the order naming it).
        let theirs = checked
            && state != RowState::default()
            && !state.nodes().iter().all(|n| incoming.state.max_counter_of(*n) > 0)
            && !store.written_by_sender(&state)?;
        let changed = join_row(&mut state, &incoming.state);
        if let Err(e) = state.check_limits(rules.limits) {
            report.refused.push((index, format!("a change to {:?} would grow the row past a limit: {e}", row.table)));
            continue;
        }
        store.joined(&incoming, &state)?;
        if !changed {
            report.duplicates += 1;
            continue;
        }
        roles.extend(rules.roles.unwrap_or(&batch.roles).iter().map(|(n, r)| (*n, r.clone())));
        let moved = scope.zip(was.as_ref()).map(|((scope, table), was)| was.moved_to(scope, table, &state, &roles));
        if let (Some(moved), Some(was), Some(writer), Some((_, table))) =
            (&moved, &was, rules.scopes.and_then(|s| s.writer), scope)
            && !may_write(writer, &row.table, was, moved, is_visible(&state, &table.spec()))
        {
            report.refused.push((index, format!("a change to {:?} is outside this device's scope", row.table)));
            continue;
        }
        // A row held by reference: the writer's scope must pull it in, or no scope may hold it
        // yet and it is the writer's own. Where it moves is the gateway's to log (it follows
        // the rows referencing it).
        if checked && let Some(writer) = rules.scopes.and_then(|s| s.writer) {
            let holders = store.holders(&row.table, &row.pk)?;
            if !may_write_held(writer, &row.table, theirs, &holders) {
                report.refused.push((index, format!("a change to {:?} is outside this device's scope", row.table)));
                continue;
            }
        }
        let moved = if referenced { Some(Move::default()) } else { moved };
        let merged = RowChange { table: incoming.table.clone(), pk: incoming.pk.clone(), state };
        match store.write(&incoming, merged, &roles)? {
            Written::Done => {
                report.applied += 1;
                report.changed_at.push(index);
                if rules.keep_changed {
                    report.changed.push(incoming.into_owned());
                }
                if rules.scopes.is_some() {
                    report.moves.push(moved);
                }
            }
            Written::Refused(reason) => report.refused.push((index, reason)),
        }
    }
    Ok(report)
}

/// Every write's node and timestamp in a state.
fn stamps(state: &RowState) -> Vec<(NodeId, Hlc)> {
    let life = state.life.entries.iter().map(|e| (e.dot.node, e.hlc));
    let fields = state.fields.values().flat_map(|r| r.entries.iter().map(|e| (e.dot.node, e.hlc)));
    life.chain(fields).collect()
}

#[cfg(test)]
mod tests;
