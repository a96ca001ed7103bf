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
//!
//! One write can arrive with two timestamps: the one its writer gave it and the bound the
//! first replica to accept it put on it when the writer's clock ran too far ahead (see
//! [`bound_future_timestamps`]). The join keeps the smaller, which is a semilattice too, so
//! every replica, the writer included, ends up with the bounded one.
//!
//! Two different values under one dot cannot come from a correct replica (a dot names one
//! write); a store that issued a dot twice, or a forged message, can still produce them. The
//! join then keeps the smaller by a fixed total order, so replicas still agree.

use std::cmp::Ordering;

use crate::clock::{Dot, Hlc, NodeId};
use crate::policy::DeletePolicy;
use crate::state::{Counter, CounterPart, Entry, Life, Register, RowState};
use crate::value::Value;

/// A fixed total order on register values, to settle two values under one dot the same way
/// everywhere.
pub trait Tiebreak {
    fn tiebreak(&self, other: &Self) -> Ordering;
}

impl Tiebreak for Life {
    fn tiebreak(&self, other: &Self) -> Ordering {
        self.cmp(other)
    }
}

impl Tiebreak for Value {
    fn tiebreak(&self, other: &Self) -> Ordering {
        let rank = |v: &Value| match v {
            Value::Null => 0,
            Value::Integer(_) => 1,
            Value::Real(_) => 2,
            Value::Text(_) => 3,
            Value::RawText(_) => 4,
            Value::Blob(_) => 5,
        };
        match (self, other) {
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.to_bits().cmp(&b.to_bits()),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::RawText(a), Value::RawText(b)) | (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            (a, b) => rank(a).cmp(&rank(b)),
        }
    }
}

/// Joins `incoming` into `local`; returns whether `local` changed.
pub fn join_register<T: Clone + PartialEq + Tiebreak>(local: &mut Register<T>, incoming: &Register<T>) -> bool {
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
        if let Some(k) = kept.iter_mut().find(|k| k.dot == e.dot) {
            let smaller = e.hlc.cmp(&k.hlc).then_with(|| e.value.tiebreak(&k.value)) == Ordering::Less;
            if smaller {
                k.hlc = e.hlc;
                k.value = e.value.clone();
                changed = true;
            }
            continue;
        }
        if !local.ctx.covers(e.dot) {
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

/// Whether `local` (already joined with `incoming`) holds an earlier time than `incoming` for
/// one of the writes `incoming` carries. The replica a change came from should hold the
/// earliest time of every write it passes on (the first replica to accept a write bounds its
/// time, and a write seen twice keeps the earlier one), so this happens only when that replica
/// lost the bounded time (a gateway store restored from a backup, with nobody holding
/// evidence of the loss): the receiver must send its row back for the replicas to agree.
pub fn holds_earlier_times(local: &RowState, incoming: &RowState) -> bool {
    fn earlier<T>(local: &Register<T>, incoming: &Register<T>) -> bool {
        incoming.entries.iter().any(|i| local.entries.iter().any(|l| l.dot == i.dot && l.hlc < i.hlc))
    }
    earlier(&local.life, &incoming.life)
        || incoming.fields.iter().any(|(c, r)| local.fields.get(c).is_some_and(|l| earlier(l, r)))
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

/// One column's new value in a local write, with when it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldWrite {
    pub column: String,
    pub value: Value,
    pub hlc: Hlc,
}

/// A local upsert of one row, as sealed from the capture journal.
#[derive(Debug, Default)]
pub struct LocalWrite {
    /// Ordinary columns whose values changed, with their current values.
    pub fields: Vec<FieldWrite>,
    /// Net change of each counter column since the last seal.
    pub counter_deltas: Vec<(String, i64)>,
}

/// Applies a local upsert to `state` under `dot` and returns the change to ship. `hlc` is
/// when the row was last written (it stamps the row's insert, if this is one); each field
/// carries its own time.
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
    for FieldWrite { column, value, hlc } in write.fields {
        let reg = state.fields.entry(column.clone()).or_default();
        reg.overwrite(value, dot, hlc);
        change.fields.insert(column, reg.clone());
    }
    add_counter_deltas(state, &mut change, dot, write.counter_deltas);
    change
}

/// Applies a local delete to `state` under `dot` and returns the change to ship.
///
/// Under delete-wins the delete also erases: every column's values are overwritten by
/// nothing, keeping only the column's context, so each replica the change reaches drops the
/// values it saw (and any copy of them that arrives later, which that context covers) while
/// still telling later writes from earlier ones. Writes the deleter had not seen stay, as the
/// losing side of the delete/update conflict. Under update-wins a concurrent update brings the
/// row back whole, so what the delete saw must stay until then: nothing is erased.
pub fn write_local_delete(
    state: &mut RowState,
    dot: Dot,
    hlc: Hlc,
    counter_deltas: Vec<(String, i64)>,
    policy: DeletePolicy,
) -> RowState {
    let seen = state.fields.iter().map(|(c, r)| (c.clone(), r.ctx.clone())).collect();
    state.life.overwrite(Life::Dead { seen }, dot, hlc);
    let mut change = RowState { life: state.life.clone(), ..RowState::default() };
    if policy == DeletePolicy::DeleteWins {
        for (column, reg) in &mut state.fields {
            reg.entries.clear();
            change.fields.insert(column.clone(), Register { ctx: reg.ctx.clone(), entries: Vec::new() });
        }
    }
    add_counter_deltas(state, &mut change, dot, counter_deltas);
    change
}

/// Bounds every timestamp in `state` later than `limit` to `bound`; returns the nodes whose
/// writes were bounded. The first replica to accept a write calls this, so that a writer whose
/// clock runs ahead cannot win every last-writer-wins conflict for as long as it stays wrong.
/// Causality never depends on timestamps, so bounding one only changes how ties between
/// concurrent writes break.
pub fn bound_future_timestamps(state: &mut RowState, limit: Hlc, bound: Hlc) -> Vec<NodeId> {
    let mut bounded = Vec::new();
    let mut clamp = |dot: Dot, hlc: &mut Hlc| {
        if *hlc > limit {
            *hlc = bound;
            if !bounded.contains(&dot.node) {
                bounded.push(dot.node);
            }
        }
    };
    for e in &mut state.life.entries {
        clamp(e.dot, &mut e.hlc);
    }
    for reg in state.fields.values_mut() {
        for e in &mut reg.entries {
            clamp(e.dot, &mut e.hlc);
        }
    }
    bounded
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
    use crate::clock::{NodeId, VersionVector};

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
    fn two_values_under_one_dot_settle_the_same_way_in_any_order() {
        // Only a store that issued a dot twice (or a forged message) makes these.
        let a = write(&Register::default(), 1, dot(1, 1));
        let b = write(&Register::default(), 2, dot(1, 1));
        let (mut ab, mut ba) = (a.clone(), b.clone());
        join_register(&mut ab, &b);
        join_register(&mut ba, &a);
        assert_eq!(ab, ba);
        assert_eq!(ab.entries[0].value, Value::Integer(1));
        let dead =
            |seen: &[&str]| Life::Dead { seen: seen.iter().map(|c| ((*c).to_owned(), VersionVector::new())).collect() };
        let mut x = Register::default();
        x.overwrite(dead(&["a", "b"]), dot(1, 2), Hlc(5));
        let mut y = Register::default();
        y.overwrite(dead(&["a", "n"]), dot(1, 2), Hlc(5));
        let (mut xy, mut yx) = (x.clone(), y.clone());
        join_register(&mut xy, &y);
        join_register(&mut yx, &x);
        assert_eq!(xy, yx);
    }

    #[test]
    fn one_write_seen_with_two_timestamps_keeps_the_smaller_in_any_order() {
        let a = write(&Register::default(), 1, dot(1, 1));
        let mut bounded = a.clone();
        bounded.entries[0].hlc = Hlc(0);
        let mut x = a.clone();
        assert!(join_register(&mut x, &bounded));
        assert!(!join_register(&mut x, &a));
        let mut y = bounded.clone();
        assert!(!join_register(&mut y, &a));
        assert_eq!(x, y);
        assert_eq!(x.entries[0].hlc, Hlc(0));
    }

    #[test]
    fn timestamps_beyond_the_limit_are_bounded_and_reported() {
        let mut state = RowState::default();
        let change = write_local_upsert(
            &mut state,
            dot(1, 1),
            Hlc(1_000),
            LocalWrite {
                fields: vec![FieldWrite { column: "a".into(), value: Value::Integer(1), hlc: Hlc(1_000) }],
                counter_deltas: vec![],
            },
        );
        let mut bounded = change.clone();
        assert_eq!(bound_future_timestamps(&mut bounded, Hlc(500), Hlc(400)), vec![NodeId([1; 16])]);
        assert_eq!(bounded.fields["a"].entries[0].hlc, Hlc(400));
        assert_eq!(bounded.life.entries[0].hlc, Hlc(400));
        let mut untouched = change.clone();
        assert!(bound_future_timestamps(&mut untouched, Hlc(2_000), Hlc(400)).is_empty());
        assert_eq!(untouched, change);
    }

    #[test]
    fn concurrent_counter_increments_add_up() {
        let mut a = RowState::default();
        let mut b = RowState::default();
        let da = write_local_upsert(
            &mut a,
            dot(1, 1),
            Hlc(1),
            LocalWrite { fields: vec![], counter_deltas: vec![("n".into(), 5)] },
        );
        let db = write_local_upsert(
            &mut b,
            dot(2, 1),
            Hlc(1),
            LocalWrite { fields: vec![], counter_deltas: vec![("n".into(), -2)] },
        );
        join_row(&mut a, &db);
        join_row(&mut a, &db);
        join_row(&mut b, &da);
        assert_eq!(a, b);
        assert_eq!(a.counters["n"].value(), 3);
    }
}
