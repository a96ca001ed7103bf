//! The join of row states, and local writes expressed as changes to join.
//!
//! Everything here is a pure function over [`RowState`]. Joining is commutative, associative
//! and idempotent, so replicas that have seen the same set of changes hold the same state
//! whatever order, and however many times, the changes arrived.
//!
//! The register join is the classic multi-value register rule: an entry survives unless the
//! other side has seen its dot (its context covers it) and no longer holds it, which means
//! someone overwrote it after seeing it. Per field that gives exactly the three cases:
//! an incoming write already covered is ignored, one whose context covers the local write
//! replaces it, and a concurrent one is kept beside it for the column policy to resolve.

use crate::clock::{Dot, Hlc};
use crate::state::{Counter, CounterPart, Entry, Life, Register, RowState};
use crate::value::Value;

/// Joins `incoming` into `local`; returns whether `local` changed.
pub fn join_register<T: Clone + PartialEq>(local: &mut Register<T>, incoming: &Register<T>) -> bool {
    let before_len = local.entries.len();
    let before_ctx_len = local.ctx.len();
    let old = std::mem::take(&mut local.entries);
    let mut changed = false;
    let mut kept: Vec<Entry<T>> = Vec::with_capacity(old.len() + incoming.entries.len());
    for e in old {
        let still_there = incoming.entries.iter().any(|i| i.dot == e.dot);
        if still_there || !incoming.ctx.covers(e.dot) {
            kept.push(e);
        } else {
            changed = true;
        }
    }
    for e in &incoming.entries {
        let known = kept.iter().any(|k| k.dot == e.dot) || local.ctx.covers(e.dot);
        if !known {
            kept.push(e.clone());
            changed = true;
        }
    }
    kept.sort_by_key(|e| e.dot);
    local.entries = kept;
    if !local.ctx.dominates(&incoming.ctx) {
        local.ctx.join(&incoming.ctx);
        changed = true;
    }
    changed || local.entries.len() != before_len || local.ctx.len() != before_ctx_len
}

/// Joins counter contributions: for each node, the part with the higher sequence wins.
pub fn join_counter(local: &mut Counter, incoming: &Counter) -> bool {
    let mut changed = false;
    for (node, part) in &incoming.0 {
        let slot = local.0.entry(*node).or_default();
        // Equal sequences with different totals only come from a forged batch; taking the
        // larger keeps the join deterministic anyway.
        if (part.seq, part.total) > (slot.seq, slot.total) {
            *slot = *part;
            changed = true;
        }
    }
    changed
}

/// Joins a change or a whole row state into `local`; returns whether anything changed.
pub fn join_row(local: &mut RowState, incoming: &RowState) -> bool {
    let mut changed = join_register(&mut local.life, &incoming.life);
    for (column, reg) in &incoming.fields {
        let slot = local.fields.entry(column.clone()).or_default();
        changed |= join_register(slot, reg);
    }
    for (column, counter) in &incoming.counters {
        let slot = local.counters.entry(column.clone()).or_default();
        changed |= join_counter(slot, counter);
    }
    changed
}

/// A local upsert of one row, as sealed from the capture journal.
#[derive(Debug, Default)]
pub struct LocalWrite {
    /// Ordinary columns whose values changed, with their current values.
    pub values: Vec<(String, Value)>,
    /// Net change of each counter column since the last seal.
    pub counter_deltas: Vec<(String, i64)>,
}

/// Applies a local upsert to `state` under `dot` and returns the change to ship.
///
/// The app wrote after seeing the merged row, so its write supersedes every entry it saw.
/// If the row's life is anything but a single `Alive` (new row, re-insert after a delete, an
/// update that revives a row kept by update-wins), the write also asserts that the row lives.
pub fn write_local_upsert(state: &mut RowState, dot: Dot, hlc: Hlc, write: LocalWrite) -> RowState {
    let mut change = RowState::default();
    let plainly_alive = matches!(state.life.entries.as_slice(), [e] if e.value == Life::Alive);
    if !plainly_alive {
        state.life.overwrite(Life::Alive, dot, hlc);
        change.life = state.life.clone();
    }
    for (column, value) in write.values {
        let reg = state.fields.entry(column.clone()).or_default();
        reg.overwrite(value, dot, hlc);
        change.fields.insert(column, reg.clone());
    }
    add_counter_deltas(state, &mut change, dot, write.counter_deltas);
    change
}

/// Applies a local delete to `state` under `dot` and returns the change to ship.
pub fn write_local_delete(state: &mut RowState, dot: Dot, hlc: Hlc, counter_deltas: Vec<(String, i64)>) -> RowState {
    let seen = state.fields.iter().map(|(c, r)| (c.clone(), r.ctx.clone())).collect();
    state.life.overwrite(Life::Dead { seen }, dot, hlc);
    let mut change = RowState { life: state.life.clone(), ..RowState::default() };
    add_counter_deltas(state, &mut change, dot, counter_deltas);
    change
}

fn add_counter_deltas(state: &mut RowState, change: &mut RowState, dot: Dot, deltas: Vec<(String, i64)>) {
    for (column, delta) in deltas {
        let counter = state.counters.entry(column.clone()).or_default();
        let part = counter.0.entry(dot.node).or_default();
        *part = CounterPart { seq: dot.counter, total: part.total.wrapping_add(delta) };
        let mut own = Counter::default();
        own.0.insert(dot.node, *part);
        change.counters.insert(column, own);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NodeId;

    fn dot(n: u8, c: u64) -> Dot {
        Dot { node: NodeId([n; 16]), counter: c }
    }

    fn write(reg: &Register<Value>, v: i64, d: Dot) -> Register<Value> {
        let mut r = reg.clone();
        r.overwrite(Value::Integer(v), d, Hlc(d.counter));
        r
    }

    #[test]
    fn duplicate_write_is_ignored() {
        let base = Register::default();
        let a = write(&base, 1, dot(1, 1));
        let mut local = base.clone();
        assert!(join_register(&mut local, &a));
        assert!(!join_register(&mut local, &a));
        assert_eq!(local, a);
    }

    #[test]
    fn causally_later_write_replaces_and_stale_one_is_ignored() {
        let a = write(&Register::default(), 1, dot(1, 1));
        let b = write(&a, 2, dot(2, 1));
        let mut local = Register::default();
        join_register(&mut local, &b);
        // The older write arrives late: b's context covers it, so nothing changes.
        assert!(!join_register(&mut local, &a));
        assert_eq!(local.entries.len(), 1);
        assert_eq!(local.entries[0].value, Value::Integer(2));
    }

    #[test]
    fn concurrent_writes_are_both_kept() {
        let base = write(&Register::default(), 0, dot(9, 1));
        let a = write(&base, 1, dot(1, 5));
        let b = write(&base, 2, dot(2, 7));
        let mut ab = a.clone();
        join_register(&mut ab, &b);
        let mut ba = b.clone();
        join_register(&mut ba, &a);
        assert_eq!(ab, ba);
        assert_eq!(ab.entries.len(), 2);
        // A later write that saw both supersedes both.
        let c = write(&ab, 3, dot(3, 1));
        join_register(&mut ab, &c);
        assert_eq!(ab.entries.len(), 1);
    }

    #[test]
    fn concurrent_counter_increments_add_up() {
        let mut a = RowState::default();
        let mut b = RowState::default();
        let da = write_local_upsert(
            &mut a,
            dot(1, 1),
            Hlc(1),
            LocalWrite { values: vec![], counter_deltas: vec![("n".into(), 5)] },
        );
        let db = write_local_upsert(
            &mut b,
            dot(2, 1),
            Hlc(1),
            LocalWrite { values: vec![], counter_deltas: vec![("n".into(), -2)] },
        );
        join_row(&mut a, &db);
        join_row(&mut a, &db);
        join_row(&mut b, &da);
        assert_eq!(a, b);
        assert_eq!(a.counters["n"].value(), 3);
    }
}
