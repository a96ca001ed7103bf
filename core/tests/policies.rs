//! Conflict policies between real stores, through the wire codec.

mod common;

use common::*;
use driftless_core::{ColumnPolicy, ConflictKind, DeletePolicy, Store, StoreOptions, TableSpec, Value};

const ALL: &str = "SELECT id, site, status, notes, stock FROM inspections ORDER BY id";

fn pair(spec: TableSpec) -> (tempfile::TempDir, ManualClock, Store, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::at(1_000_000);
    let a = open(dir.path(), "a.db", clock.options("a"), spec.clone());
    let b = open(dir.path(), "b.db", clock.options("b"), spec);
    (dir, clock, a, b)
}

#[test]
fn fields_changed_on_one_side_each_merge_without_conflict() {
    let (_d, _c, mut a, mut b) = pair(TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, site, status) VALUES ('i1', 'north', 'open')");
    exchange(&mut a, &mut b);
    exec(&mut a, "UPDATE inspections SET status = 'done'");
    exec(&mut b, "UPDATE inspections SET notes = 'checked seals'");
    exchange(&mut a, &mut b);
    assert_eq!(rows(&a, ALL), rows(&b, ALL));
    assert_eq!(rows(&a, "SELECT status, notes FROM inspections"), vec![vec![text("done"), text("checked seals")]]);
    assert!(a.conflicts().expect("conflicts").is_empty());
}

#[test]
fn lww_picks_the_later_clock_and_logs_the_conflict() {
    let (_d, clock, mut a, mut b) = pair(TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    exchange(&mut a, &mut b);
    clock.set(2_000_000);
    exec(&mut b, "UPDATE inspections SET status = 'from b (earlier)'");
    b.seal().expect("seal");
    clock.set(3_000_000);
    exec(&mut a, "UPDATE inspections SET status = 'from a (later)'");
    exchange(&mut a, &mut b);
    assert_eq!(rows(&a, ALL), rows(&b, ALL));
    assert_eq!(rows(&b, "SELECT status FROM inspections"), vec![vec![text("from a (later)")]]);
    let conflicts = b.conflicts().expect("conflicts");
    assert_eq!(conflicts, a.conflicts().expect("conflicts"));
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].record.losers[0].value, Some(text("from b (earlier)")));
    assert!(!conflicts[0].record.needs_resolution());
}

#[test]
fn causality_beats_clocks_a_later_write_wins_even_with_an_older_clock() {
    let (_d, clock, mut a, mut b) = pair(TableSpec::new());
    clock.set(5_000_000);
    exec(&mut a, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    exchange(&mut a, &mut b);
    // b's wall clock is behind a's, but b wrote after seeing a's write.
    clock.set(1_000);
    exec(&mut b, "UPDATE inspections SET status = 'closed by b'");
    exchange(&mut a, &mut b);
    assert_eq!(rows(&a, "SELECT status FROM inspections"), vec![vec![text("closed by b")]]);
    assert!(a.conflicts().expect("conflicts").is_empty());
}

#[test]
fn authority_lets_the_trusted_source_win_a_concurrent_edit() {
    let spec = TableSpec::new().column("status", "authority:crm>erp".parse().expect("policy"));
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::at(1_000_000);
    let mut crm = open(dir.path(), "crm.db", clock.options("crm"), spec.clone());
    let mut erp = open(dir.path(), "erp.db", clock.options("erp"), spec.clone());
    let mut mkt = open(dir.path(), "mkt.db", clock.options("marketing"), spec);
    exec(&mut crm, "INSERT INTO inspections(id, status) VALUES ('p1', 'lead')");
    sync(&mut crm, &mut [&mut erp, &mut mkt]);
    exec(&mut crm, "UPDATE inspections SET status = 'customer (crm)'");
    clock.set(9_000_000);
    exec(&mut erp, "UPDATE inspections SET status = 'prospect (erp, newer)'");
    exec(&mut mkt, "UPDATE inspections SET status = 'hot (marketing, newest)'");
    let batches: Vec<_> = [&mut crm, &mut erp, &mut mkt].into_iter().flat_map(drain).collect();
    for s in [&mut crm, &mut erp, &mut mkt] {
        for b in &batches {
            s.apply(b).expect("apply");
        }
    }
    for s in [&crm, &erp, &mkt] {
        assert_eq!(rows(s, "SELECT status FROM inspections"), vec![vec![text("customer (crm)")]]);
    }
    // A write made after seeing the CRM value is not a conflict: it applies.
    exec(&mut erp, "UPDATE inspections SET status = 'invoiced (erp)'");
    sync(&mut erp, &mut [&mut crm]);
    assert_eq!(rows(&crm, "SELECT status FROM inspections"), vec![vec![text("invoiced (erp)")]]);
}

#[test]
fn manual_conflict_is_listed_resolved_and_converges() {
    let (_d, clock, mut a, mut b) = pair(TableSpec::new().column("notes", ColumnPolicy::Manual));
    exec(&mut a, "INSERT INTO inspections(id, notes) VALUES ('i1', 'start')");
    exchange(&mut a, &mut b);
    exec(&mut a, "UPDATE inspections SET notes = 'crack in weld'");
    a.seal().expect("seal");
    clock.set(2_000_000);
    exec(&mut b, "UPDATE inspections SET notes = 'weld ok'");
    exchange(&mut a, &mut b);
    // The provisional value is the last writer's, on both sides.
    assert_eq!(rows(&a, ALL), rows(&b, ALL));
    assert_eq!(rows(&a, "SELECT notes FROM inspections"), vec![vec![text("weld ok")]]);
    let conflicts = a.conflicts().expect("conflicts");
    assert_eq!(conflicts, b.conflicts().expect("conflicts"));
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert!(c.record.needs_resolution());
    assert!(
        matches!(&c.record.kind, ConflictKind::Field { column, policy: ColumnPolicy::Manual } if column == "notes")
    );
    assert_eq!(c.record.losers[0].value, Some(text("crack in weld")));
    // Resolving with the provisional value still writes a dominating version.
    a.resolve_conflict("inspections", &[text("i1")], "notes", text("weld ok")).expect("resolve");
    exchange(&mut a, &mut b);
    assert!(a.conflicts().expect("conflicts").is_empty());
    assert!(b.conflicts().expect("conflicts").is_empty());
    assert_eq!(rows(&b, "SELECT notes FROM inspections"), vec![vec![text("weld ok")]]);
    assert!(a.resolve_conflict("inspections", &[text("i1")], "notes", text("x")).is_err());
}

#[test]
fn concurrent_counter_changes_add_up_exactly() {
    let spec = TableSpec::new().column("stock", ColumnPolicy::Counter);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stores: Vec<Store> =
        (0..3).map(|i| open(dir.path(), &format!("{i}.db"), StoreOptions::default(), spec.clone())).collect();
    exec(&mut stores[0], "INSERT INTO inspections(id, stock) VALUES ('bolts', 100)");
    let first = drain(&mut stores[0]);
    for s in &mut stores[1..] {
        for b in &first {
            s.apply(b).expect("apply");
        }
    }
    for (i, s) in stores.iter_mut().enumerate() {
        for _ in 0..=i {
            exec(s, "UPDATE inspections SET stock = stock - 7");
        }
        exec(s, "UPDATE inspections SET stock = stock + 2");
        s.seal().expect("seal");
    }
    let batches: Vec<_> = stores.iter_mut().flat_map(drain).collect();
    for s in &mut stores {
        // Every batch delivered twice: duplicates must not double-count.
        for b in batches.iter().chain(&batches) {
            s.apply(b).expect("apply");
        }
    }
    for s in &stores {
        assert_eq!(rows(s, "SELECT stock FROM inspections"), vec![vec![Value::Integer(100 - 7 * 6 + 2 * 3)]]);
    }
}

#[test]
fn the_same_batch_applied_five_times_applies_once() {
    let (_d, _c, mut a, mut b) = pair(TableSpec::new().column("stock", ColumnPolicy::Counter));
    exec(&mut a, "INSERT INTO inspections(id, stock) VALUES ('i1', 5); UPDATE inspections SET stock = stock + 1");
    let batches = drain(&mut a);
    let mut reports = Vec::new();
    for _ in 0..5 {
        for batch in &batches {
            reports.push(b.apply(batch).expect("apply"));
        }
    }
    assert_eq!(reports[0].applied, 1);
    assert!(reports[1..].iter().all(|r| r.applied == 0 && r.duplicates == 1));
    assert_eq!(rows(&b, "SELECT stock FROM inspections"), vec![vec![Value::Integer(6)]]);
}

fn delete_race(policy: DeletePolicy) -> (tempfile::TempDir, Store, Store) {
    let (dir, clock, mut a, mut b) = pair(TableSpec::new().delete_policy(policy));
    exec(&mut a, "INSERT INTO inspections(id, site, status) VALUES ('i1', 'north', 'open')");
    exchange(&mut a, &mut b);
    exec(&mut a, "DELETE FROM inspections WHERE id = 'i1'");
    clock.set(2_000_000);
    exec(&mut b, "UPDATE inspections SET status = 'edited while deleted'");
    exchange(&mut a, &mut b);
    (dir, a, b)
}

#[test]
fn delete_wins_keeps_the_row_deleted_and_logs_the_lost_update() {
    let (_dir, a, b) = delete_race(DeletePolicy::DeleteWins);
    assert!(rows(&a, ALL).is_empty());
    assert!(rows(&b, ALL).is_empty());
    let conflicts = a.conflicts().expect("conflicts");
    assert_eq!(conflicts, b.conflicts().expect("conflicts"));
    assert_eq!(conflicts.len(), 1);
    let r = &conflicts[0].record;
    assert!(matches!(r.kind, ConflictKind::DeleteUpdate { policy: DeletePolicy::DeleteWins }));
    assert_eq!(r.winner.value, None);
    assert_eq!(r.losers[0].value, Some(text("edited while deleted")));
}

#[test]
fn update_wins_brings_the_row_back_and_logs_the_lost_delete() {
    let (_dir, mut a, mut b) = delete_race(DeletePolicy::UpdateWins);
    let expected = vec![vec![text("i1"), text("north"), text("edited while deleted"), Value::Null, Value::Integer(0)]];
    assert_eq!(rows(&a, ALL), expected);
    assert_eq!(rows(&b, ALL), expected);
    let conflicts = a.conflicts().expect("conflicts");
    assert_eq!(conflicts, b.conflicts().expect("conflicts"));
    assert_eq!(conflicts[0].record.losers[0].value, None, "the delete lost");
    // A later local edit settles it: the row is plainly alive again everywhere.
    exec(&mut a, "UPDATE inspections SET notes = 'confirmed'");
    exchange(&mut a, &mut b);
    assert!(b.conflicts().expect("conflicts").is_empty());
    assert_eq!(rows(&a, ALL), rows(&b, ALL));
}

#[test]
fn a_row_deleted_and_inserted_again_comes_back_everywhere() {
    let (_d, _c, mut a, mut b) = pair(TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, site) VALUES ('i1', 'north')");
    exchange(&mut a, &mut b);
    exec(&mut b, "DELETE FROM inspections");
    exchange(&mut a, &mut b);
    assert!(rows(&a, ALL).is_empty());
    exec(&mut a, "INSERT INTO inspections(id, site) VALUES ('i1', 'south')");
    exchange(&mut a, &mut b);
    assert_eq!(rows(&b, "SELECT id, site FROM inspections"), vec![vec![text("i1"), text("south")]]);
    assert!(b.conflicts().expect("conflicts").is_empty());
}

#[test]
fn a_clock_far_in_the_future_is_flagged_and_does_not_drag_the_local_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = 1_700_000_000_000u64;
    let ahead = ManualClock::at(now + 365 * 86_400_000);
    let local = ManualClock::at(now);
    let mut skewed = open(dir.path(), "skewed.db", ahead.options("field"), TableSpec::new());
    let mut b = open(dir.path(), "b.db", local.options("field"), TableSpec::new());
    exec(&mut skewed, "INSERT INTO inspections(id, status) VALUES ('i1', 'from the future')");
    let batches = drain(&mut skewed);
    let report = b.apply(&batches[0]).expect("apply");
    assert_eq!(report.skewed, 1);
    let flagged = b.clock_skew().expect("skew");
    assert_eq!(flagged.len(), 1);
    assert_eq!(flagged[0].0, skewed.node_id());
    exec(&mut b, "INSERT INTO inspections(id) VALUES ('i2')");
    let out = b.outbox_batch(10).expect("outbox").expect("change");
    let hlc = out.batch.rows[0].state.life.entries[0].hlc;
    assert!(hlc.millis() <= now + StoreOptions::default().max_clock_drift_ms, "local clock was dragged: {hlc:?}");
}

#[test]
fn insert_or_replace_on_a_counter_counts_the_difference_once() {
    let (_d, _c, mut a, mut b) = pair(TableSpec::new().column("stock", ColumnPolicy::Counter));
    exec(&mut a, "INSERT INTO inspections(id, site, stock) VALUES ('x', 'yard', 10)");
    exchange(&mut a, &mut b);
    // No delete trigger fires for the replaced row (recursive triggers are off by default).
    exec(&mut a, "INSERT OR REPLACE INTO inspections(id, site, stock) VALUES ('x', 'dock', 11)");
    exec(&mut b, "UPDATE inspections SET stock = stock + 5");
    exchange(&mut a, &mut b);
    let want = vec![vec![text("dock"), Value::Integer(16)]];
    assert_eq!(rows(&a, "SELECT site, stock FROM inspections"), want);
    assert_eq!(rows(&b, "SELECT site, stock FROM inspections"), want);
}

#[test]
fn a_row_inserted_again_after_a_delete_starts_its_counter_from_the_inserted_value() {
    let (_d, _c, mut a, mut b) = pair(TableSpec::new().column("stock", ColumnPolicy::Counter));
    exec(&mut a, "INSERT INTO inspections(id, stock) VALUES ('x', 10)");
    exchange(&mut a, &mut b);
    exec(&mut a, "DELETE FROM inspections");
    exec(&mut b, "UPDATE inspections SET stock = stock + 1");
    exchange(&mut a, &mut b);
    assert!(rows(&a, ALL).is_empty() && rows(&b, ALL).is_empty(), "delete wins");
    exec(&mut a, "INSERT INTO inspections(id, stock) VALUES ('x', 0)");
    exchange(&mut a, &mut b);
    let want = vec![vec![Value::Integer(0)]];
    assert_eq!(rows(&a, "SELECT stock FROM inspections"), want);
    assert_eq!(rows(&b, "SELECT stock FROM inspections"), want);
}
