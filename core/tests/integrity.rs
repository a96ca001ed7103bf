//! Regression tests for ways a change was once lost, doubled or mangled between two stores
//! (issue 7). Each failed before its fix.

mod common;

use std::time::Duration;

use common::*;
use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec, Value};

fn counter_spec() -> TableSpec {
    TableSpec::new().column("stock", ColumnPolicy::Counter)
}

#[test]
fn a_write_sealed_late_still_loses_to_a_write_made_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    exchange(&mut a, &mut b);
    // a writes through a plain connection while nothing seals it (its agent is not running).
    let plain = rusqlite::Connection::open(dir.path().join("a.db")).expect("open");
    plain.execute("UPDATE inspections SET status = 'a: written first'", []).expect("update");
    std::thread::sleep(Duration::from_millis(40));
    exec(&mut b, "UPDATE inspections SET status = 'b: written later'");
    b.seal().expect("seal");
    std::thread::sleep(Duration::from_millis(40));
    // a's agent starts much later and seals then.
    exchange(&mut a, &mut b);
    let want = vec![vec![text("b: written later")]];
    assert_eq!(rows(&a, "SELECT status FROM inspections"), want);
    assert_eq!(rows(&b, "SELECT status FROM inspections"), want);
}

#[test]
fn negative_zero_in_an_untyped_column_is_captured_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = "CREATE TABLE readings (id TEXT PRIMARY KEY, v)";
    let mut a = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    let mut b = Store::open(dir.path().join("b.db"), StoreOptions::default()).expect("open");
    for s in [&mut a, &mut b] {
        exec(s, schema);
        s.track("readings", TableSpec::new()).expect("track");
    }
    let bits = |s: &Store| match &rows(s, "SELECT v FROM readings")[0][0] {
        Value::Real(r) => r.to_bits(),
        other => panic!("not a real: {other:?}"),
    };
    exec(&mut a, "INSERT INTO readings VALUES ('r1', 0.0)");
    exchange(&mut a, &mut b);
    for (what, want) in [("0.0 -> -0.0", (-0.0f64).to_bits()), ("-0.0 -> 0.0", 0)] {
        // A bound parameter, since SQL text folds the literal -0.0 to 0.0.
        let value = f64::from_bits(want);
        a.write(|tx| Ok(tx.execute("UPDATE readings SET v = ?1", [value])?)).expect(what);
        assert_eq!(bits(&a), want, "{what}");
        exchange(&mut a, &mut b);
        assert_eq!(bits(&b), want, "{what} did not travel");
    }
}

#[test]
fn text_that_is_not_utf8_stays_text_with_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    // SQLite keeps whatever bytes a TEXT value was given.
    exec(&mut a, "INSERT INTO inspections(id, notes) VALUES ('i1', CAST(x'6869ff00fe' AS TEXT))");
    exchange(&mut a, &mut b);
    let q = "SELECT typeof(notes), hex(notes) FROM inspections";
    assert_eq!(rows(&b, q), vec![vec![text("text"), text("6869FF00FE")]]);
    assert_eq!(rows(&a, q), rows(&b, q));
}

#[test]
fn a_refused_remote_row_keeps_its_counter_increments_after_a_local_edit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), counter_spec());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), counter_spec());
    exec(&mut a, "INSERT INTO inspections(id, site, stock) VALUES ('i1', 'north', 10), ('i2', 'south', 0)");
    exchange(&mut a, &mut b);
    // Only b's app has this rule; a's next change to i2 breaks it there.
    exec(&mut b, "CREATE UNIQUE INDEX one_per_site ON inspections(site)");
    exec(&mut a, "UPDATE inspections SET site = 'north', stock = stock + 3 WHERE id = 'i2'");
    exchange(&mut a, &mut b);
    assert_eq!(b.unapplied().expect("unapplied").len(), 1);
    // b edits the refused row locally (another column), and adds to its counter.
    exec(&mut b, "UPDATE inspections SET status = 'seen', stock = stock + 1 WHERE id = 'i2'");
    exchange(&mut a, &mut b);
    // a must see both increments: the remote +3 was never cancelled by b's stale value.
    assert_eq!(rows(&a, "SELECT stock FROM inspections WHERE id = 'i2'"), vec![vec![Value::Integer(4)]]);
    // Once b's rule no longer objects, b shows the same.
    exec(&mut b, "DROP INDEX one_per_site");
    exec(&mut a, "UPDATE inspections SET notes = 'retry' WHERE id = 'i2'");
    exchange(&mut a, &mut b);
    let q = "SELECT id, site, status, notes, stock FROM inspections ORDER BY id";
    assert_eq!(rows(&a, q), rows(&b, q));
}

#[test]
fn retracking_a_table_reissues_nothing_and_counts_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), counter_spec());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), counter_spec());
    exec(&mut b, "INSERT INTO inspections(id, stock) VALUES ('qty', 10)");
    exchange(&mut a, &mut b);
    a.untrack("inspections").expect("untrack");
    a.track("inspections", counter_spec()).expect("track");
    assert!(a.outbox_batch(10).expect("outbox").is_none(), "re-tracking shipped existing rows as new writes");
    exec(&mut b, "UPDATE inspections SET stock = stock + 1");
    exchange(&mut a, &mut b);
    let want = vec![vec![Value::Integer(11)]];
    assert_eq!(rows(&a, "SELECT stock FROM inspections"), want);
    assert_eq!(rows(&b, "SELECT stock FROM inspections"), want);
    assert!(a.conflicts().expect("conflicts").is_empty() && b.conflicts().expect("conflicts").is_empty());
}

#[test]
fn edits_made_while_untracked_ship_once_tracked_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), counter_spec());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), counter_spec());
    exec(&mut a, "INSERT INTO inspections(id, site, stock) VALUES ('i1', 'north', 5), ('i2', 'south', 1)");
    exchange(&mut a, &mut b);
    // Written before untrack and not yet shipped: must not be dropped.
    exec(&mut a, "UPDATE inspections SET status = 'unsent' WHERE id = 'i1'");
    a.untrack("inspections").expect("untrack");
    exec(&mut a, "UPDATE inspections SET site = 'east', stock = stock + 2 WHERE id = 'i1'");
    exec(&mut a, "DELETE FROM inspections WHERE id = 'i2'");
    exec(&mut a, "INSERT INTO inspections(id, stock) VALUES ('i3', 7)");
    a.track("inspections", counter_spec()).expect("track");
    exchange(&mut a, &mut b);
    let q = "SELECT id, site, status, stock FROM inspections ORDER BY id";
    let want = vec![
        vec![text("i1"), text("east"), text("unsent"), Value::Integer(7)],
        vec![text("i3"), Value::Null, Value::Null, Value::Integer(7)],
    ];
    assert_eq!(rows(&b, q), want);
    assert_eq!(rows(&a, q), want);
    assert!(b.conflicts().expect("conflicts").is_empty());
}

#[test]
fn a_running_store_notices_a_table_tracked_by_another_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)");
    // The command line tracks a table while the agent's store is open.
    let mut cli = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    cli.track("notes", TableSpec::new()).expect("track");
    drop(cli);
    exec(&mut a, "INSERT INTO notes VALUES ('n1', 'hello')");
    let out = a.outbox_batch(10).expect("outbox").expect("the new table's write ships");
    assert_eq!(out.batch.rows[0].table, "notes");
}
