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

/// A consistent copy of a store's database file, as a phone backup would take.
fn backup(store: &Store, to: &std::path::Path) {
    let _ = std::fs::remove_file(to);
    let conn = rusqlite::Connection::open(store.path()).expect("open");
    conn.execute("VACUUM INTO ?1", [to.to_str().expect("utf-8 path")]).expect("backup");
}

fn restore(from: &std::path::Path, to: &std::path::Path) {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", to.display()));
    }
    std::fs::copy(from, to).expect("restore");
}

#[test]
fn a_store_restored_from_a_backup_takes_a_new_node_before_sealing_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = counter_spec().column("notes", ColumnPolicy::Lww);
    let epoch = driftless_core::Epoch([1; 16]);
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), spec.clone());
    // `cloud` stands in for the gateway: it merges everything a sends.
    let mut cloud = open(dir.path(), "cloud.db", StoreOptions::default(), spec.clone());
    exec(&mut a, "INSERT INTO inspections(id, notes, stock) VALUES ('qty', 'first', 0)");
    for b in drain(&mut a) {
        cloud.apply(&b).expect("apply");
    }
    backup(&a, &dir.path().join("backup.db"));
    exec(&mut a, "UPDATE inspections SET stock = stock + 1");
    exec(&mut a, "UPDATE inspections SET stock = stock + 2, notes = 'edited before the restore'");
    for b in drain(&mut a) {
        cloud.apply(&b).expect("apply");
    }
    let before = a.identity().expect("identity");
    drop(a);

    restore(&dir.path().join("backup.db"), &dir.path().join("a.db"));
    let mut a = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    a.hold_seal();
    std::thread::sleep(Duration::from_millis(5));
    exec(&mut a, "UPDATE inspections SET stock = stock + 5, notes = 'written after the restore'");
    assert!(a.outbox_batch(10).expect("outbox").is_none(), "nothing seals before the identity is confirmed");
    let restored = a.identity().expect("identity");
    assert!(restored.counter < before.counter && restored.outbox_seq < before.outbox_seq);
    let view = driftless_core::GatewayView {
        epoch,
        node_counter: before.counter,
        device_seq: before.outbox_seq,
        node_elsewhere: false,
    };
    let confirmed = a.confirm_identity(&view).expect("confirm");
    assert_eq!(confirmed.retired_node, Some(before.node));
    assert_eq!(confirmed.cursor, None, "what it forgot comes back from a snapshot");
    assert_ne!(a.node_id(), before.node);
    let out = a.outbox_batch(10).expect("outbox").expect("the held write, under the new node");
    assert!(out.first_seq > before.outbox_seq, "sequence numbers are not reused");
    assert!(out.batch.rows[0].state.nodes().contains(&a.node_id()));
    for b in drain(&mut a) {
        cloud.apply(&b).expect("apply");
    }
    let (snapshot, _) = cloud.snapshot(None, 100).expect("snapshot");
    a.apply(&snapshot).expect("apply");
    let q = "SELECT stock, notes FROM inspections";
    let want = vec![vec![Value::Integer(8), text("written after the restore")]];
    assert_eq!(rows(&cloud, q), want);
    assert_eq!(rows(&a, q), want);
    // Confirming again with the same view changes nothing more.
    let again = a.confirm_identity(&driftless_core::GatewayView { node_counter: 0, device_seq: 0, ..view });
    assert_eq!(again.expect("confirm").retired_node, None);
}

#[test]
fn a_new_gateway_epoch_queues_every_row_again_without_double_counting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), counter_spec());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), counter_spec());
    let view = |e: u8| driftless_core::GatewayView {
        epoch: driftless_core::Epoch([e; 16]),
        node_counter: 0,
        device_seq: 0,
        node_elsewhere: false,
    };
    assert!(!a.confirm_identity(&view(1)).expect("first contact").epoch_changed);
    exec(&mut a, "INSERT INTO inspections(id, stock) VALUES ('x', 4), ('y', 1)");
    exec(&mut b, "INSERT INTO inspections(id, stock) VALUES ('z', 2)");
    exchange(&mut a, &mut b);
    exec(&mut a, "UPDATE inspections SET stock = stock + 1 WHERE id = 'x'");
    exchange(&mut a, &mut b);
    let confirmed = a.confirm_identity(&view(2)).expect("new epoch");
    assert!(confirmed.epoch_changed);
    assert_eq!(confirmed.resent_rows, 3, "every row a holds, b's included");
    // A fresh replica that only gets the re-sent rows holds everything, counted once.
    let mut fresh = open(dir.path(), "fresh.db", StoreOptions::default(), counter_spec());
    for batch in drain(&mut a) {
        fresh.apply(&batch).expect("apply");
        b.apply(&batch).expect("apply");
    }
    let q = "SELECT id, stock FROM inspections ORDER BY id";
    let want = vec![
        vec![text("x"), Value::Integer(5)],
        vec![text("y"), Value::Integer(1)],
        vec![text("z"), Value::Integer(2)],
    ];
    assert_eq!(rows(&fresh, q), want);
    assert_eq!(rows(&b, q), want);
}

#[test]
fn a_remote_row_this_store_cannot_take_is_recorded_and_the_rest_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, site) VALUES ('i1', 'north'), ('i2', 'south')");
    let mut batches = drain(&mut a);
    // A replica whose table has another key shape sent the first row.
    batches[0].rows[0].pk.push(text("extra"));
    let report = b.apply(&batches[0]).expect("the batch still applies");
    assert_eq!((report.refused, report.applied), (1, 1));
    assert_eq!(rows(&b, "SELECT id FROM inspections"), vec![vec![text("i2")]]);
    let refused = b.refused().expect("refused");
    assert_eq!(refused.len(), 1);
    assert!(!refused[0].local && refused[0].reason.contains("key values"), "{refused:?}");
}

#[test]
fn a_local_value_too_large_to_sync_is_recorded_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = driftless_core::codec::Limits { max_value_bytes: 1_000, ..Default::default() };
    let opts = StoreOptions { limits, ..StoreOptions::default() };
    let mut a = open(dir.path(), "a.db", opts, TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, notes) VALUES ('big', randomblob(5000)), ('ok', 'fine')");
    let out = a.outbox_batch(10).expect("the store still works").expect("the other row ships");
    assert_eq!(out.batch.rows.len(), 1);
    assert_eq!(out.batch.rows[0].pk, vec![text("ok")]);
    let refused = a.refused().expect("refused");
    assert!(refused[0].local && refused[0].reason.contains("bytes in a value"), "{refused:?}");
    // The store can still load every row it keeps.
    a.snapshot(None, 10).expect("snapshot");
}
