//! The shared merge over a store kept in memory: what it decides, row by row.

use std::collections::BTreeMap;

use super::*;
use crate::clock::Dot;
use crate::codec::encode_key;
use crate::merge::{FieldWrite, LocalWrite, write_local_upsert};
use crate::value::Value;

/// A store that keeps states in a map, refuses table `bad`, skips table `skip`, and whose
/// "table" refuses any row whose `v` is -1 (as a CHECK constraint would).
/// A row's state and the roles of its nodes.
type Held = (RowState, BTreeMap<NodeId, String>);

#[derive(Default)]
struct Rows {
    held: BTreeMap<(String, Vec<u8>), Held>,
    joined: usize,
}

impl RowStore for Rows {
    type Error = std::convert::Infallible;

    fn admit(&mut self, row: &RowChange) -> Result<Admit, Self::Error> {
        Ok(match row.table.as_str() {
            "bad" => Admit::Refuse("not here".into()),
            "skip" => Admit::Skip,
            _ => Admit::Merge,
        })
    }

    fn load(&mut self, row: &RowChange) -> Result<(RowState, BTreeMap<NodeId, String>), Self::Error> {
        Ok(self.held.get(&(row.table.clone(), encode_key(&row.pk))).cloned().unwrap_or_default())
    }

    fn joined(&mut self, _: &RowChange, _: &RowState) -> Result<(), Self::Error> {
        self.joined += 1;
        Ok(())
    }

    fn write(
        &mut self,
        _: &RowChange,
        merged: RowChange,
        roles: &BTreeMap<NodeId, String>,
    ) -> Result<Written, Self::Error> {
        let refused =
            merged.state.fields.get("v").is_some_and(|r| r.entries.iter().any(|e| e.value == Value::Integer(-1)));
        if refused {
            return Ok(Written::Refused("CHECK (v >= 0)".into()));
        }
        self.held.insert((merged.table, encode_key(&merged.pk)), (merged.state, roles.clone()));
        Ok(Written::Done)
    }
}

fn key(k: i64) -> (String, Vec<u8>) {
    ("t".to_owned(), encode_key(&[Value::Integer(k)]))
}

fn node(n: u8) -> NodeId {
    NodeId([n; 16])
}

fn row(table: &str, key: i64, node_id: u8, counter: u64, ms: u64, v: i64) -> RowChange {
    let mut state = RowState::default();
    let write = LocalWrite {
        fields: vec![FieldWrite { column: "v".into(), value: Value::Integer(v), hlc: Hlc::new(ms, 0) }],
        ..LocalWrite::default()
    };
    let change = write_local_upsert(&mut state, Dot { node: node(node_id), counter }, Hlc::new(ms, 0), write);
    RowChange { table: table.into(), pk: vec![Value::Integer(key)], state: change }
}

fn rules(limits: &Limits, bound: Option<ClockBound>) -> IntakeRules<'_> {
    IntakeRules { limits, bound, vouch: None, roles: None, scopes: None, keep_changed: true }
}

#[test]
fn each_row_is_decided_on_its_own_and_a_copy_changes_nothing() {
    let limits = Limits::default();
    let mut store = Rows::default();
    let batch = Batch {
        roles: BTreeMap::from([(node(1), "field".to_owned())]),
        rows: vec![
            row("bad", 1, 1, 1, 10, 1),
            row("t", 1, 1, 2, 10, 1),
            row("skip", 1, 1, 3, 10, 1),
            row("t", 2, 1, 4, 10, -1),
        ],
    };
    let first = merge_batch(&mut store, &batch, rules(&limits, None)).unwrap();
    assert_eq!((first.applied, first.duplicates, first.skipped), (1, 0, 1));
    assert_eq!(first.refused, vec![(0, "not here".to_owned()), (3, "CHECK (v >= 0)".to_owned())]);
    assert_eq!(first.changed, vec![batch.rows[1].clone()]);
    // Counters of every row taken, refused by the table or not: the dots were issued.
    assert_eq!(first.counters, BTreeMap::from([(node(1), 4)]));
    // The batch's roles are kept with the row.
    assert_eq!(store.held[&key(1)].1, batch.roles);

    let again = merge_batch(&mut store, &batch, rules(&limits, None)).unwrap();
    assert_eq!((again.applied, again.duplicates, again.changed.len()), (0, 1, 0));
    // The hook sees duplicates too (the device sends back a write it holds an earlier time of).
    assert_eq!(store.joined, 2 + 2);
}

#[test]
fn a_writer_clock_past_the_drift_is_bounded_once_and_reported() {
    let limits = Limits::default();
    let mut store = Rows::default();
    let far = 10_000_000;
    let batch = Batch { roles: BTreeMap::new(), rows: vec![row("t", 1, 7, 1, far, 5), row("t", 2, 8, 1, 900, 5)] };
    let report = merge_batch(&mut store, &batch, rules(&limits, Some(ClockBound::at(1_000, 100)))).unwrap();
    assert_eq!(report.bounded, 1);
    assert_eq!(report.skewed, BTreeMap::from([(node(7), Hlc::new(far, 0))]));
    let held = &store.held[&key(1)].0;
    assert_eq!(held.max_hlc(), Some((node(7), Hlc::new(1_000, 0))));
    // The change as logged carries the bounded time, not the writer's.
    assert_eq!(report.changed[0].state.max_hlc(), Some((node(7), Hlc::new(1_000, 0))));
}

#[test]
fn a_row_grown_past_the_limits_is_refused_and_nothing_of_it_kept() {
    let limits = Limits { max_register_entries: 2, ..Limits::default() };
    let mut store = Rows::default();
    // Three concurrent writers of one field: the third would keep three entries.
    let rows: Vec<RowChange> = (1..=3).map(|n| row("t", 1, n, 1, 10, n as i64)).collect();
    let report = merge_batch(&mut store, &Batch { roles: BTreeMap::new(), rows }, rules(&limits, None)).unwrap();
    assert_eq!(report.applied, 2);
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].0, 2);
    assert!(report.refused[0].1.contains("past a limit"), "{:?}", report.refused);
    assert_eq!(store.held[&key(1)].0.fields["v"].entries.len(), 2);
}

/// What a sender writing as node 1, after node 2's writes up to 3 were merged, may claim.
fn sender_one() -> Vouch {
    Vouch { own: [node(1)].into(), known: BTreeMap::from([(node(1), 1), (node(2), 3)]), ..Vouch::default() }
}

fn vouched<'a>(limits: &'a Limits, vouch: &'a Vouch) -> IntakeRules<'a> {
    IntakeRules { limits, bound: None, vouch: Some(vouch), roles: None, scopes: None, keep_changed: true }
}

#[test]
fn a_sender_writes_only_as_its_own_nodes_and_claims_only_what_was_merged() {
    let limits = Limits::default();
    let mut store = Rows::default();
    // Node 2's write is merged from its own sender first.
    let theirs = Batch { roles: BTreeMap::new(), rows: vec![row("t", 1, 2, 3, 10, 7)] };
    merge_batch(&mut store, &theirs, rules(&limits, None)).unwrap();
    let vouch = sender_one();

    // A forged write as node 2: refused, and its counter not counted.
    let forged = Batch { roles: BTreeMap::new(), rows: vec![row("t", 2, 2, 9, 20, 666)] };
    let report = merge_batch(&mut store, &forged, vouched(&limits, &vouch)).unwrap();
    assert_eq!(report.applied, 0);
    assert!(report.refused[0].1.contains("not the sender's own"), "{:?}", report.refused);
    assert!(report.counters.is_empty());
    assert!(!store.held.contains_key(&key(2)));

    // Node 2's merged write sent back whole is harmless: a duplicate.
    let echoed = merge_batch(&mut store, &theirs, vouched(&limits, &vouch)).unwrap();
    assert_eq!((echoed.duplicates, echoed.refused.len()), (1, 0));

    // A context claiming node 2 up to u64::MAX: refused, and node 2's next write still applies.
    let mut inflated = row("t", 1, 1, 1, 30, 8);
    inflated.state.fields.get_mut("v").expect("v").ctx.advance(node(2), u64::MAX);
    let report =
        merge_batch(&mut store, &Batch { roles: BTreeMap::new(), rows: vec![inflated] }, vouched(&limits, &vouch))
            .unwrap();
    assert!(report.refused[0].1.contains("up to counter 18446744073709551615"), "{:?}", report.refused);
    let next = Batch { roles: BTreeMap::new(), rows: vec![row("t", 1, 2, 4, 40, 9)] };
    assert_eq!(merge_batch(&mut store, &next, rules(&limits, None)).unwrap().applied, 1);

    // An honest write: its own counter is vouched for by the batch, node 2's by the merge.
    let mut honest = row("t", 1, 1, 5, 50, 10);
    honest.state.fields.get_mut("v").expect("v").ctx.advance(node(2), 3);
    let vouch = Vouch { known: BTreeMap::from([(node(1), 5), (node(2), 4)]), ..vouch };
    let report =
        merge_batch(&mut store, &Batch { roles: BTreeMap::new(), rows: vec![honest] }, vouched(&limits, &vouch))
            .unwrap();
    assert_eq!((report.applied, report.refused.len()), (1, 0), "{:?}", report.refused);
}

#[test]
fn a_table_only_some_roles_write_refuses_any_new_action_of_another_roles_node() {
    let limits = Limits::default();
    let mut store = Rows::default();
    // Node 2 (role hq) writes row 1; node 1 (role field) may not write table t.
    let hq = Batch { roles: BTreeMap::new(), rows: vec![row("t", 1, 2, 3, 10, 7)] };
    merge_batch(&mut store, &hq, rules(&limits, None)).unwrap();
    let field = Vouch {
        own: [node(1)].into(),
        known: BTreeMap::from([(node(1), 1), (node(2), 3)]),
        roles: BTreeMap::from([(node(1), "field".to_owned())]),
        writers: BTreeMap::from([("t".to_owned(), vec!["hq".to_owned()])]),
    };
    let one = |row: RowChange| Batch { roles: BTreeMap::new(), rows: vec![row] };

    // Its write, new or to hq's row: refused with the reason.
    for write in [row("t", 2, 1, 1, 20, 1), row("t", 1, 1, 1, 20, 1)] {
        let report = merge_batch(&mut store, &one(write), vouched(&limits, &field)).unwrap();
        assert_eq!(report.applied, 0);
        assert!(report.refused[0].1.contains("written only by roles [\"hq\"]"), "{:?}", report.refused);
    }
    // Its delete of hq's row (a dot with no value): refused too.
    let mut held = store.held[&key(1)].0.clone();
    let delete = crate::merge::write_local_delete(
        &mut held,
        Dot { node: node(1), counter: 1 },
        Hlc::new(30, 0),
        vec![],
        crate::policy::DeletePolicy::DeleteWins,
    );
    let delete = RowChange { table: "t".into(), pk: vec![Value::Integer(1)], state: delete };
    let report = merge_batch(&mut store, &one(delete), vouched(&limits, &field)).unwrap();
    assert_eq!((report.applied, report.refused.len()), (0, 1), "{:?}", report.refused);
    assert_eq!(store.held[&key(1)].0.fields["v"].entries[0].value, Value::Integer(7));

    // hq's row sent back whole by the field device: harmless, a duplicate.
    let echoed = merge_batch(&mut store, &hq, vouched(&limits, &field)).unwrap();
    assert_eq!((echoed.duplicates, echoed.refused.len()), (1, 0));
    // Other tables stay open to it.
    let report = merge_batch(&mut store, &one(row("u", 1, 1, 1, 40, 1)), vouched(&limits, &field)).unwrap();
    assert_eq!((report.applied, report.refused.len()), (1, 0));
    // A node of role hq writes t.
    let hq_sender = Vouch { roles: BTreeMap::from([(node(1), "hq".to_owned())]), ..field };
    let report = merge_batch(&mut store, &one(row("t", 3, 1, 2, 50, 1)), vouched(&limits, &hq_sender)).unwrap();
    assert_eq!((report.applied, report.refused.len()), (1, 0), "{:?}", report.refused);
}

#[test]
fn the_receivers_roles_replace_the_ones_a_batch_declares() {
    let limits = Limits::default();
    let mut store = Rows::default();
    let batch = Batch { roles: BTreeMap::from([(node(1), "hq".to_owned())]), rows: vec![row("t", 1, 1, 1, 10, 1)] };
    let known = BTreeMap::from([(node(1), "field".to_owned())]);
    let rules = IntakeRules {
        limits: &limits,
        bound: None,
        vouch: None,
        roles: Some(&known),
        scopes: None,
        keep_changed: true,
    };
    merge_batch(&mut store, &batch, rules).unwrap();
    assert_eq!(store.held[&key(1)].1, known);
}
