//! Erasure: what an erasing delete removes from the other copies of a row a replica keeps.
//!
//! A delete-wins delete overwrites every column it saw with nothing (see
//! [`write_local_delete`](crate::write_local_delete)), so joining it into a row state drops
//! those values. A replica that also keeps older changes to the row (the gateway's log, which
//! devices pull from) must drop them there too, or the delete erased nothing. What may go is
//! exactly what the merged state has superseded: a value whose column context the state
//! covers and that it no longer holds, and a counter part older than the state's. A replica
//! that later reads the scrubbed change and then the changes after it ends up where it would
//! have with the originals.

use crate::merge::join_register;
use crate::state::{Life, RowState};

/// Whether `change` is a delete that erases (it empties the columns it saw).
pub fn erases(change: &RowState) -> bool {
    let deletes = change.life.entries.iter().any(|e| matches!(e.value, Life::Dead { .. }));
    deletes && !change.fields.is_empty() && change.fields.values().all(|r| r.entries.is_empty())
}

/// Drops from `copy`, an older change to a row, what `merged` (the row's state now) has
/// superseded; returns whether anything was dropped. Contexts stay: they hold no values, and
/// a replica needs them to tell that the dropped writes happened. A copy that lost values
/// also takes the row's life as it is now, so a replica that reads it before the changes
/// after it sees the row as it ends up (deleted), never alive with its values gone.
pub fn drop_superseded(copy: &mut RowState, merged: &RowState) -> bool {
    let mut dropped = false;
    for (column, reg) in &mut copy.fields {
        let Some(now) = merged.fields.get(column) else { continue };
        let before = reg.entries.len();
        reg.entries.retain(|e| now.entries.iter().any(|k| k.dot == e.dot) || !now.ctx.covers(e.dot));
        dropped |= reg.entries.len() != before;
    }
    for (column, counter) in &mut copy.counters {
        let Some(now) = merged.counters.get(column) else { continue };
        let before = counter.0.len();
        counter.0.retain(|node, part| now.0.get(node).is_none_or(|p| p.seq <= part.seq));
        dropped |= counter.0.len() != before;
    }
    if dropped {
        join_register(&mut copy.life, &merged.life);
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Dot, Hlc, NodeId};
    use crate::merge::{FieldWrite, LocalWrite, join_row, write_local_delete, write_local_upsert};
    use crate::policy::DeletePolicy;
    use crate::value::Value;

    fn dot(n: u8, c: u64) -> Dot {
        Dot { node: NodeId([n; 16]), counter: c }
    }

    fn upsert(state: &mut RowState, d: Dot, name: &str, delta: i64) -> RowState {
        let fields = vec![FieldWrite { column: "name".into(), value: Value::Text(name.into()), hlc: Hlc(d.counter) }];
        let counter_deltas = vec![("n".into(), delta)];
        write_local_upsert(state, d, Hlc(d.counter), LocalWrite { fields, counter_deltas })
    }

    #[test]
    fn a_delete_wins_delete_erases_what_it_saw_everywhere_and_keeps_what_it_did_not() {
        let mut a = RowState::default();
        let insert = upsert(&mut a, dot(1, 1), "secret", 5);
        let rename = upsert(&mut a, dot(1, 2), "also secret", 1);
        let mut b = RowState::default();
        join_row(&mut b, &insert);
        // b renames concurrently with a's delete; a's delete saw only a's own writes.
        let concurrent = upsert(&mut b, dot(2, 1), "written meanwhile", 0);
        let delete = write_local_delete(&mut a, dot(1, 3), Hlc(3), vec![("n".into(), -6)], DeletePolicy::DeleteWins);
        assert!(erases(&delete));
        let values = |s: &RowState| s.fields["name"].entries.iter().map(|e| e.value.clone()).collect::<Vec<_>>();
        assert!(values(&a).is_empty());
        // Any order, any repeats: the same state, holding only the value the delete never saw.
        let changes = [&insert, &rename, &concurrent, &delete];
        let mut x = RowState::default();
        for c in changes {
            join_row(&mut x, c);
        }
        let mut y = RowState::default();
        for c in changes.iter().rev().chain(changes.iter()) {
            join_row(&mut y, c);
        }
        assert_eq!(x, y);
        assert_eq!(values(&x), vec![Value::Text("written meanwhile".into())]);
        // Older changes kept elsewhere lose what the state superseded, and nothing else.
        let (mut old_insert, mut old_concurrent) = (insert.clone(), concurrent.clone());
        assert!(drop_superseded(&mut old_insert, &x));
        assert!(old_insert.fields["name"].entries.is_empty());
        assert_eq!(old_insert.fields["name"].ctx, insert.fields["name"].ctx);
        assert!(!old_insert.counters["n"].0.contains_key(&NodeId([1; 16])));
        assert_eq!(old_insert.life, x.life, "the scrubbed copy says the row is deleted");
        assert!(!drop_superseded(&mut old_concurrent, &x));
        // Read in order by a replica that never saw the originals: the same state.
        let mut z = RowState::default();
        for c in [&old_insert, &rename, &old_concurrent, &delete] {
            join_row(&mut z, c);
        }
        assert_eq!(z.fields, x.fields);
        assert_eq!(z.counters["n"].value(), x.counters["n"].value());
    }

    #[test]
    fn an_update_wins_delete_erases_nothing() {
        let mut a = RowState::default();
        upsert(&mut a, dot(1, 1), "kept", 0);
        let delete = write_local_delete(&mut a, dot(1, 2), Hlc(2), vec![], DeletePolicy::UpdateWins);
        assert!(!erases(&delete));
        assert_eq!(a.fields["name"].entries.len(), 1);
    }
}
