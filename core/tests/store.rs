//! The device store: capture, sealing, refusal of bad tables, schema changes, outbox.

mod common;

use common::*;
use driftless_core::{ColumnPolicy, Direction, Error, Store, StoreOptions, TableSpec, Value};

#[test]
fn write_through_a_second_plain_connection_is_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let other = rusqlite::Connection::open(dir.path().join("a.db")).expect("plain connection");
    other.execute("INSERT INTO inspections(id, site, status) VALUES ('i1', 'north', 'open')", []).expect("insert");
    let out = store.outbox_batch(10).expect("outbox").expect("a change");
    assert_eq!(out.batch.rows.len(), 1);
    let row = &out.batch.rows[0];
    assert_eq!(row.pk, vec![text("i1")]);
    assert_eq!(row.state.fields["site"].entries[0].value, text("north"));
    assert_eq!(row.state.fields["status"].entries[0].value, text("open"));
}

#[test]
fn write_from_the_sqlite3_shell_is_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let status = std::process::Command::new("sqlite3")
        .arg(dir.path().join("a.db"))
        .arg("INSERT INTO inspections(id, status) VALUES ('s1', 'logged'); UPDATE inspections SET notes = 'from shell' WHERE id = 's1';")
        .status();
    // Skipped without the shell (a toolchain-only machine); .ci/run installs it and requires it.
    let status = match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("DRIFTLESS_REQUIRE_TOOLS").is_none() => {
            eprintln!("skipped: sqlite3 is not installed");
            return;
        }
        other => other.expect("run the sqlite3 shell"),
    };
    assert!(status.success());
    let out = store.outbox_batch(10).expect("outbox").expect("a change");
    let state = &out.batch.rows[0].state;
    assert_eq!(state.fields["notes"].entries[0].value, text("from shell"));
    assert_eq!(state.fields["status"].entries[0].value, text("logged"));
}

#[test]
fn repeated_edits_between_seals_coalesce_into_one_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    exec(&mut store, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    drain(&mut store);
    for i in 0..10 {
        exec(&mut store, &format!("UPDATE inspections SET notes = 'edit {i}' WHERE id = 'i1'"));
    }
    let out = store.outbox_batch(10).expect("outbox").expect("a change");
    assert_eq!(out.batch.rows.len(), 1);
    let state = &out.batch.rows[0].state;
    assert_eq!(state.fields.len(), 1, "only the changed field ships");
    assert_eq!(state.fields["notes"].entries[0].value, text("edit 9"));
}

#[test]
fn remote_apply_is_not_captured_as_a_local_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(
        &mut a,
        "INSERT INTO inspections(id, status) VALUES ('i1', 'open'); INSERT INTO inspections(id) VALUES ('i2')",
    );
    exec(&mut b, "INSERT INTO inspections(id, status) VALUES ('b1', 'mine')");
    b.seal().expect("seal");
    sync(&mut a, &mut [&mut b]);
    assert_eq!(rows(&b, "SELECT id, status FROM inspections ORDER BY id").len(), 3);
    // Only b's own insert is waiting to ship.
    let out = b.outbox_batch(10).expect("outbox").expect("b's own change");
    assert_eq!(out.batch.rows.len(), 1);
    assert_eq!(out.batch.rows[0].pk, vec![text("b1")]);
    b.ack(out.first_seq, out.last_seq).expect("ack");
    assert!(b.outbox_batch(10).expect("outbox").is_none());
    assert_eq!(b.pending_changes().expect("pending"), 0);
}

#[test]
fn rows_present_when_tracking_starts_are_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    exec(&mut store, INSPECTIONS);
    exec(&mut store, "INSERT INTO inspections(id, site) VALUES ('old1', 'x'), ('old2', 'y')");
    store.track("inspections", TableSpec::new()).expect("track");
    assert_eq!(store.pending_changes().expect("pending"), 2);
    let out = store.outbox_batch(10).expect("outbox").expect("changes");
    assert_eq!(out.batch.rows.len(), 2);
}

#[test]
fn tables_without_a_usable_key_are_refused_with_an_explanation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    exec(
        &mut store,
        "CREATE TABLE nokey (a TEXT, b TEXT);
         CREATE TABLE rowid_alias (id INTEGER PRIMARY KEY, name TEXT);
         CREATE TABLE composite (site TEXT, seq INTEGER, note TEXT, PRIMARY KEY (site, seq));
         CREATE TABLE blobkey (id BLOB PRIMARY KEY, v REAL);",
    );
    assert!(matches!(store.track("nokey", TableSpec::new()), Err(Error::NoPrimaryKey(_))));
    let err = store.track("rowid_alias", TableSpec::new()).expect_err("refused");
    assert!(matches!(err, Error::RowidPrimaryKey { .. }));
    assert!(err.to_string().contains("collide"), "{err}");
    assert!(matches!(store.track("missing", TableSpec::new()), Err(Error::NoSuchTable(_))));
    assert!(matches!(
        store.track("composite", TableSpec::new().column("nope", ColumnPolicy::Manual)),
        Err(Error::NoSuchColumn { .. })
    ));
    store.track("composite", TableSpec::new()).expect("composite keys are fine");
    store.track("blobkey", TableSpec::new()).expect("blob keys are fine");
    exec(&mut store, "INSERT INTO composite VALUES ('n', 1, 'a'), ('n', 2, 'b')");
    let err = store
        .write(|tx| Ok(tx.execute("INSERT INTO blobkey(id, v) VALUES (NULL, 1.0)", [])?))
        .expect_err("null key refused");
    assert!(err.to_string().contains("must not be NULL"), "{err}");
    let out = store.outbox_batch(10).expect("outbox").expect("changes");
    assert_eq!(out.batch.rows.len(), 2);
}

#[test]
fn a_new_column_is_an_explicit_error_until_retracked_then_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    // Sealed once first: the schema check's statement is then prepared before the change.
    a.seal().expect("sealed before the change");
    exec(&mut a, "ALTER TABLE inspections ADD COLUMN inspector TEXT");
    exec(&mut a, "UPDATE inspections SET inspector = 'kim', status = 'done' WHERE id = 'i1'");
    let err = a.seal().expect_err("schema change must not pass silently");
    assert!(matches!(err, Error::SchemaChanged { .. }), "{err}");
    a.track("inspections", TableSpec::new()).expect("re-track");
    exec(&mut a, "UPDATE inspections SET inspector = 'lee' WHERE id = 'i1'");
    exec(&mut b, "ALTER TABLE inspections ADD COLUMN inspector TEXT");
    b.track("inspections", TableSpec::new()).expect("re-track b");
    sync(&mut a, &mut [&mut b]);
    assert_eq!(rows(&b, "SELECT status, inspector FROM inspections"), vec![vec![text("done"), text("lee")]]);
}

#[test]
fn changes_to_columns_a_replica_lacks_are_kept_and_do_not_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "ALTER TABLE inspections ADD COLUMN inspector TEXT");
    a.track("inspections", TableSpec::new()).expect("re-track");
    exec(&mut a, "INSERT INTO inspections(id, status, inspector) VALUES ('i1', 'open', 'kim')");
    sync(&mut a, &mut [&mut b]);
    assert_eq!(rows(&b, "SELECT id, status FROM inspections"), vec![vec![text("i1"), text("open")]]);
    // Once b adds the column, its snapshot still carries the value it kept.
    let (snap, _) = b.snapshot(None, 10).expect("snapshot");
    assert_eq!(snap.rows[0].state.fields["inspector"].entries[0].value, text("kim"));
}

#[test]
fn untrack_stops_capturing_but_still_ships_what_was_written_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    exec(&mut store, "INSERT INTO inspections(id) VALUES ('i1')");
    store.untrack("inspections").expect("untrack");
    exec(&mut store, "INSERT INTO inspections(id) VALUES ('i2')");
    let triggers = rows(&store, "SELECT name FROM sqlite_master WHERE type = 'trigger'");
    assert!(triggers.is_empty(), "{triggers:?}");
    let out = store.outbox_batch(10).expect("outbox").expect("the write made while tracked");
    assert_eq!(out.batch.rows.len(), 1);
    assert_eq!(out.batch.rows[0].pk, vec![text("i1")]);
    store.ack(out.first_seq, out.last_seq).expect("ack");
    assert!(store.outbox_batch(10).expect("outbox").is_none());
    let journals = rows(&store, "SELECT name FROM sqlite_master WHERE name LIKE '_driftless_pending%'");
    assert!(journals.is_empty(), "the emptied journal is dropped: {journals:?}");
    assert!(store.tracked().is_empty());
    assert!(matches!(store.untrack("inspections"), Err(Error::NotTracked(_))));
}

#[test]
fn only_acknowledged_entries_leave_the_outbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    for i in 0..5 {
        exec(&mut store, &format!("INSERT INTO inspections(id) VALUES ('i{i}')"));
        store.seal().expect("seal");
    }
    let first = store.outbox_batch(2).expect("outbox").expect("batch");
    let second = store.outbox_batch_after(first.last_seq, 2).expect("outbox").expect("batch");
    assert_eq!(second.batch.rows[0].pk, vec![text("i2")]);
    // Acks can arrive out of order; nothing unacknowledged is lost.
    store.ack(second.first_seq, second.last_seq).expect("ack");
    assert_eq!(store.pending_changes().expect("pending"), 3);
    let again = store.outbox_batch(10).expect("outbox").expect("batch");
    let keys: Vec<_> = again.batch.rows.iter().map(|r| r.pk[0].clone()).collect();
    assert_eq!(keys, vec![text("i0"), text("i1"), text("i4")]);
}

#[test]
fn key_change_ships_as_delete_and_insert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, site) VALUES ('old', 'x')");
    sync(&mut a, &mut [&mut b]);
    exec(&mut a, "UPDATE inspections SET id = 'new' WHERE id = 'old'");
    sync(&mut a, &mut [&mut b]);
    assert_eq!(rows(&b, "SELECT id, site FROM inspections"), vec![vec![text("new"), text("x")]]);
}

#[test]
fn up_only_tables_ignore_remote_writes_and_down_only_tables_do_not_ship() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut up = open(dir.path(), "up.db", StoreOptions::default(), TableSpec::new().direction(Direction::UpOnly));
    let mut down =
        open(dir.path(), "down.db", StoreOptions::default(), TableSpec::new().direction(Direction::DownOnly));
    exec(&mut a, "INSERT INTO inspections(id) VALUES ('from-a')");
    let batches = drain(&mut a);
    for b in &batches {
        assert_eq!(up.apply(b).expect("apply").skipped, 1);
        down.apply(b).expect("apply");
    }
    assert!(rows(&up, "SELECT id FROM inspections").is_empty());
    assert_eq!(rows(&down, "SELECT id FROM inspections"), vec![vec![text("from-a")]]);
    exec(&mut down, "INSERT INTO inspections(id) VALUES ('local')");
    assert!(down.outbox_batch(10).expect("outbox").is_none());
    exec(&mut up, "INSERT INTO inspections(id) VALUES ('sensor')");
    assert_eq!(up.outbox_batch(10).expect("outbox").expect("ships").batch.rows.len(), 1);
}

#[test]
fn a_new_replica_bootstraps_from_a_snapshot_then_syncs_incrementally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = TableSpec::new().column("stock", ColumnPolicy::Counter);
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), spec.clone());
    for i in 0..25 {
        exec(&mut a, &format!("INSERT INTO inspections(id, site, stock) VALUES ('i{i:02}', 's', {i})"));
    }
    exec(&mut a, "DELETE FROM inspections WHERE id = 'i03'");
    a.seal().expect("seal");
    let mut fresh = open(dir.path(), "fresh.db", StoreOptions::default(), spec);
    let mut cursor = None;
    loop {
        let (page, next) = a.snapshot(cursor.as_ref(), 10).expect("snapshot");
        fresh.apply(&page).expect("apply");
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let all = "SELECT id, site, stock FROM inspections ORDER BY id";
    assert_eq!(rows(&fresh, all), rows(&a, all));
    assert_eq!(rows(&fresh, all).len(), 24);
    exec(&mut fresh, "UPDATE inspections SET stock = stock - 1 WHERE id = 'i10'");
    sync(&mut fresh, &mut [&mut a]);
    assert_eq!(rows(&a, "SELECT stock FROM inspections WHERE id = 'i10'"), vec![vec![Value::Integer(9)]]);
}

#[test]
fn case_only_edits_under_a_nocase_collation_are_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    exec(&mut store, "CREATE TABLE people (id TEXT PRIMARY KEY COLLATE NOCASE, name TEXT COLLATE NOCASE)");
    store.track("people", TableSpec::new()).expect("track");
    exec(&mut store, "INSERT INTO people VALUES ('abc', 'bob')");
    drain(&mut store);
    exec(&mut store, "UPDATE people SET name = 'Bob'");
    let out = store.outbox_batch(10).expect("outbox").expect("the case change ships");
    assert_eq!(out.batch.rows[0].state.fields["name"].entries[0].value, text("Bob"));
    store.ack(out.first_seq, out.last_seq).expect("ack");
    // A case-only key change is a key change: the old key is deleted, the new one inserted.
    exec(&mut store, "UPDATE people SET id = 'ABC'");
    let out = store.outbox_batch(10).expect("outbox").expect("the key change ships");
    let keys: Vec<_> = out.batch.rows.iter().map(|r| r.pk[0].clone()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
}

#[test]
fn a_new_role_is_a_new_identity_and_an_empty_role_keeps_the_stored_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    let first =
        Store::open(&path, StoreOptions { role: "crm".into(), ..StoreOptions::default() }).expect("open").node_id();
    let same = Store::open(&path, StoreOptions::default()).expect("open").node_id();
    assert_eq!(first, same);
    let changed =
        Store::open(&path, StoreOptions { role: "erp".into(), ..StoreOptions::default() }).expect("open").node_id();
    assert_ne!(first, changed);
}

#[test]
fn writes_an_app_trigger_makes_while_a_remote_change_is_applied_are_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    exec(
        &mut b,
        "CREATE TABLE history (id TEXT PRIMARY KEY, what TEXT);
         CREATE TRIGGER note_arrivals AFTER INSERT ON inspections
           BEGIN INSERT INTO history VALUES (NEW.id || '-arrived', 'seen on b'); END;",
    );
    b.track("history", TableSpec::new()).expect("track");
    exec(&mut a, "INSERT INTO inspections(id) VALUES ('i1')");
    sync(&mut a, &mut [&mut b]);
    let out = b.outbox_batch(10).expect("outbox").expect("b's trigger wrote a local row");
    assert_eq!(out.batch.rows.len(), 1);
    assert_eq!(out.batch.rows[0].table, "history");
    assert_eq!(out.batch.rows[0].pk, vec![text("i1-arrived")]);
}

#[test]
fn a_remote_row_the_app_table_refuses_is_recorded_and_does_not_block_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    // Only b's app adds a rule of its own: one inspection per site.
    exec(&mut b, "CREATE UNIQUE INDEX one_per_site ON inspections(site)");
    exec(&mut a, "INSERT INTO inspections(id, site) VALUES ('i1', 'north'), ('i2', 'north'), ('i3', 'south')");
    let batches = drain(&mut a);
    let report = b.apply(&batches[0]).expect("the batch applies");
    assert_eq!(report.unapplied, 1);
    assert_eq!(rows(&b, "SELECT id FROM inspections ORDER BY id"), vec![vec![text("i1")], vec![text("i3")]]);
    let refused = b.unapplied().expect("unapplied");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].1, vec![text("i2")]);
    assert!(refused[0].2.contains("UNIQUE"), "{}", refused[0].2);
    // The next change to the row tries again and clears the record.
    exec(&mut a, "UPDATE inspections SET site = 'east' WHERE id = 'i2'");
    sync(&mut a, &mut [&mut b]);
    assert!(b.unapplied().expect("unapplied").is_empty());
    assert_eq!(rows(&b, "SELECT id, site FROM inspections WHERE id = 'i2'"), vec![vec![text("i2"), text("east")]]);
}

#[test]
fn a_sender_that_lost_a_bounded_time_gets_the_row_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::at(1_000_000);
    let mut a = open(dir.path(), "a.db", clock.options("field"), TableSpec::new());
    let mut b = open(dir.path(), "b.db", clock.options("office"), TableSpec::new());
    a.write(|tx| Ok(tx.execute("INSERT INTO inspections(id, notes) VALUES ('i1', 'x')", [])?)).expect("write");
    let sent = drain(&mut a).remove(0);
    // The first replica to accept the write bounded its time; b learned the bounded one.
    let mut bounded = sent.clone();
    for row in &mut bounded.rows {
        let bound = driftless_core::Hlc::new(900_000, 0);
        assert!(!driftless_core::bound_future_timestamps(&mut row.state, bound, bound).is_empty());
    }
    let report = b.apply(&bounded).expect("apply bounded");
    assert_eq!((report.applied, report.sent_back), (1, 0));
    assert_eq!(b.pending_changes().expect("pending"), 0);
    // That replica lost it (restored) and passes the write on with its original time: b keeps
    // the earlier time and sends its row back, so the sender learns it again.
    let report = b.apply(&sent).expect("apply original");
    assert_eq!((report.duplicates, report.sent_back), (1, 1));
    let back = drain(&mut b);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].rows[0].state, bounded.rows[0].state);
    let report = a.apply(&back[0]).expect("apply sent back");
    assert_eq!((report.applied, report.sent_back), (1, 0), "a now holds the bounded time too");
    // Nothing more goes back and forth.
    assert_eq!(a.pending_changes().expect("pending"), 0);
    assert_eq!(b.apply(&bounded).expect("again").sent_back, 0);
}

#[test]
fn an_increment_that_overtook_its_rows_insert_is_not_cancelled_by_a_local_insert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = || TableSpec::new().column("stock", ColumnPolicy::Counter);
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), spec());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), spec());
    let write = |s: &mut Store, sql: &str| s.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
    write(&mut a, "INSERT INTO inspections(id, stock) VALUES ('k', 1)");
    let insert = drain(&mut a).remove(0);
    write(&mut a, "UPDATE inspections SET stock = stock + 4 WHERE id = 'k'");
    let increment = drain(&mut a).remove(0);
    // The increment reaches b before the insert: b merges it, but has no row to show.
    b.apply(&increment).expect("apply increment");
    assert!(rows(&b, "SELECT id FROM inspections").is_empty());
    // b's app creates the row itself, knowing nothing of a's.
    write(&mut b, "INSERT INTO inspections(id, notes, stock) VALUES ('k', 'from b', 0)");
    let from_b = drain(&mut b);
    assert!(
        from_b[0].rows[0].state.counters.get("stock").is_none_or(|c| c.value() == 0),
        "b added nothing to the counter: {:?}",
        from_b[0].rows[0].state.counters
    );
    let stock = "SELECT stock FROM inspections WHERE id = 'k'";
    // b's app keeps showing what it wrote until the row arrives, and counts from that.
    assert_eq!(rows(&b, stock), vec![vec![Value::Integer(0)]]);
    assert_eq!(b.unapplied().expect("unapplied").len(), 1);
    b.apply(&insert).expect("apply insert");
    assert!(b.unapplied().expect("unapplied").is_empty());
    a.apply(&from_b[0]).expect("apply b's change");
    assert_eq!(rows(&a, stock), vec![vec![Value::Integer(5)]]);
    assert_eq!(rows(&b, stock), vec![vec![Value::Integer(5)]]);
}

/// A change published for every device moves the cursor only from the exact entry it
/// follows: a cursor at that position with another tag was read from a log since rolled back
/// (a gateway restored from a backup reissued the position), and must be pulled, not built on.
#[test]
fn a_cursor_moves_from_the_named_entry_only_tag_included() {
    use driftless_core::{Batch, LogCursor};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO inspections(id, status) VALUES ('i1', 'open')")?)).expect("write");
    let change = a.outbox_batch(10).expect("outbox").expect("a change").batch;
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    let (at, resets) = b.cursor().expect("cursor");
    assert_eq!(at, None);
    let first = LogCursor { position: 7, tag: 70 };
    b.apply_with_cursor(&Batch::default(), &[], None, None, resets, first).expect("snapshot's last page");
    let next = LogCursor { position: 9, tag: 90 };
    // Position right, tag wrong: nothing applied, nothing moved.
    let report = b.apply_with_cursor(&change, &[], Some(7), Some(71), resets, next).expect("apply");
    assert!(!report.moved && report.applied == 0, "{report:?}");
    assert_eq!(report.cursor, Some(first));
    let count = |s: &Store| -> i64 {
        s.read(|c| Ok(c.query_row("SELECT count(*) FROM inspections", [], |r| r.get(0))?)).expect("count")
    };
    assert_eq!(count(&b), 0);
    // The exact entry: applied, and the cursor moved with it.
    let report = b.apply_with_cursor(&change, &[], Some(7), Some(70), resets, next).expect("apply");
    assert!(report.moved && report.applied == 1, "{report:?}");
    assert_eq!((report.cursor, count(&b)), (Some(next), 1));
}

/// A device whose scope changed drops the rows it holds, to fetch its new scope whole, but
/// never one with changes of its app not yet acknowledged: those ship as they are, and the
/// row's causal state (a counter's parts above all) stays with them.
#[test]
fn a_new_scope_drops_the_rows_held_but_not_those_with_unsent_changes() {
    use driftless_core::{Batch, LogCursor};
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = TableSpec::new().column("stock", ColumnPolicy::Counter);
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), spec);
    a.write(|tx| {
        Ok(tx.execute_batch("INSERT INTO inspections(id, status, stock) VALUES ('i1', 'open', 1), ('i2', 'open', 2)")?)
    })
    .expect("write");
    drain(&mut a);
    let (_, resets) = a.cursor().expect("cursor");
    a.apply_with_cursor(&Batch::default(), &[], None, None, resets, LogCursor { position: 3, tag: 30 })
        .expect("caught up");
    a.write(|tx| Ok(tx.execute_batch("UPDATE inspections SET stock = stock + 5 WHERE id = 'i2'")?)).expect("write");
    assert_eq!(a.rescope(1, &["inspections".to_owned()]).expect("rescope"), 1);
    assert_eq!(rows(&a, "SELECT id, stock FROM inspections"), vec![vec![Value::Text("i2".into()), Value::Integer(7)]]);
    assert_eq!(a.cursor().expect("cursor").0, None, "the next pull is a snapshot");
    assert_eq!(a.scope_version().expect("version"), Some(1));
    // The unsent increment still ships, on top of the parts it had.
    let sent = drain(&mut a);
    let counter = &sent[0].rows[0].state.counters["stock"];
    assert_eq!(counter.value(), 7);
}

/// A snapshot interrupted goes on where it stopped: each page but the last notes, with the
/// rows it applied, where the next starts; a cursor set or reset forgets it.
#[test]
fn a_snapshot_notes_where_it_goes_on_until_a_cursor_is_set_or_reset() {
    use driftless_core::{Batch, LogCursor, SnapshotAt, SnapshotProgress};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO inspections(id, status) VALUES ('i1', 'open')")?)).expect("write");
    let page = drain(&mut a).remove(0);
    let (_, resets) = b.cursor().expect("cursor");
    let log = LogCursor { position: 12, tag: 5 };
    // With how far it got of what the gateway counted.
    let progress = SnapshotProgress { rows_done: 1, rows_total: 40, bytes_done: 70, bytes_total: 2_800 };
    let at = SnapshotAt { resume: vec![0, 1, 0xfe], log_cursor: log, progress };
    let report = b.apply_snapshot_page(&page, &[], &at, false, resets).expect("page");
    assert!(report.moved);
    assert_eq!(rows(&b, "SELECT id FROM inspections"), vec![vec![Value::Text("i1".into())]]);
    assert_eq!(b.snapshot_position().expect("position"), Some(at.clone()));
    // A page of a snapshot started before a reset changes nothing.
    let other = SnapshotAt { resume: vec![7], ..at.clone() };
    let report = b.apply_snapshot_page(&Batch::default(), &at.resume, &other, false, resets + 1).expect("page");
    assert!(!report.moved);
    assert_eq!(b.snapshot_position().expect("position"), Some(at.clone()));
    // The last page sets the cursor: nothing to go on with any more.
    let report = b.apply_snapshot_page(&Batch::default(), &at.resume, &at, true, resets).expect("last page");
    assert!(report.moved);
    assert_eq!(b.cursor().expect("cursor").0, Some(log));
    assert_eq!(b.snapshot_position().expect("position"), None);
}

/// Pages asked for ahead arrive while the one before is applied: a page applies only where
/// the last one applied left off, so one that failed is never skipped, not even by the last
/// page, which would set the cursor past rows the device never got.
#[test]
fn a_snapshot_page_that_does_not_follow_the_last_one_applied_changes_nothing() {
    use driftless_core::{LogCursor, SnapshotAt, SnapshotProgress};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    let mut pages = Vec::new();
    for id in ["i1", "i2", "i3"] {
        exec(&mut a, &format!("INSERT INTO inspections(id, status) VALUES ('{id}', 'open')"));
        pages.push(drain(&mut a).remove(0));
    }
    let (_, resets) = b.cursor().expect("cursor");
    let log = LogCursor { position: 3, tag: 1 };
    let at =
        |resume: &[u8]| SnapshotAt { resume: resume.to_vec(), log_cursor: log, progress: SnapshotProgress::default() };
    let ids = |b: &Store| rows(b, "SELECT id FROM inspections ORDER BY id");
    // The first page reads from the start; a page read from elsewhere does not come first.
    assert!(!b.apply_snapshot_page(&pages[1], &[1], &at(&[2]), false, resets).expect("page").moved);
    assert!(b.apply_snapshot_page(&pages[0], &[], &at(&[1]), false, resets).expect("page").moved);
    // The second page failed to apply; the third, asked for ahead, arrives: not applied, and
    // neither is the last page if it comes next.
    assert!(!b.apply_snapshot_page(&pages[2], &[2], &at(&[3]), false, resets).expect("page").moved);
    assert!(!b.apply_snapshot_page(&pages[2], &[3], &at(&[]), true, resets).expect("page").moved);
    assert_eq!(ids(&b), vec![vec![text("i1")]]);
    assert_eq!(b.cursor().expect("cursor").0, None);
    assert_eq!(b.snapshot_position().expect("position").map(|p| p.resume), Some(vec![1]));
    // Asked again from where it stopped, the snapshot goes on and completes.
    assert!(b.apply_snapshot_page(&pages[1], &[1], &at(&[2]), false, resets).expect("page").moved);
    assert!(b.apply_snapshot_page(&pages[2], &[2], &at(&[]), true, resets).expect("page").moved);
    assert_eq!(ids(&b), vec![vec![text("i1")], vec![text("i2")], vec![text("i3")]]);
    assert_eq!(b.cursor().expect("cursor").0, Some(log));
    // A page arriving twice (a request sent again) after the snapshot is done changes nothing.
    assert!(!b.apply_snapshot_page(&pages[2], &[2], &at(&[]), true, resets).expect("page").moved);
}

/// Sync state noted for the next transaction (the agent's last sync time) commits with the
/// change it describes, and waits through a transaction that rolls back.
#[test]
fn noted_sync_state_commits_with_the_next_transaction_that_commits() {
    use driftless_core::LogCursor;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO inspections(id, status) VALUES ('i1', 'open')")?)).expect("write");
    let change = a.outbox_batch(10).expect("outbox").expect("a change").batch;
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    let (_, resets) = b.cursor().expect("cursor");
    // Refused (sealing held): rolled back, the note kept.
    b.hold_seal();
    b.note_sync_state("last_sync_ms", "5");
    assert!(b.apply_with_cursor(&change, &[], None, None, resets, LogCursor { position: 2, tag: 1 }).is_err());
    assert_eq!(b.sync_state("last_sync_ms").expect("state"), None);
    assert_eq!(b.cursor().expect("cursor").0, None);
    // The next transaction that commits writes it.
    b.set_sync_state("connected", "1").expect("set");
    assert_eq!(b.sync_state("last_sync_ms").expect("state").as_deref(), Some("5"));
    // With an apply: in its transaction, once.
    let mut c = open(dir.path(), "c.db", StoreOptions::default(), TableSpec::new());
    c.note_sync_state("last_sync_ms", "9");
    let report =
        c.apply_with_cursor(&change, &[], None, None, resets, LogCursor { position: 2, tag: 1 }).expect("apply");
    assert!(report.moved && report.applied == 1, "{report:?}");
    assert_eq!(c.sync_state("last_sync_ms").expect("state").as_deref(), Some("9"));
    c.set_sync_state("last_sync_ms", "10").expect("set");
    c.set_sync_state("connected", "1").expect("set");
    assert_eq!(c.sync_state("last_sync_ms").expect("state").as_deref(), Some("10"), "written once, not again");
}

/// A store told a scope for the first time holds no row it fetched only if no snapshot is
/// under way: one that applied pages of a scope it never took (told, then cut off) drops
/// them and starts over, or it would go on under the new scope from the old one's token,
/// missing the new scope's rows before it.
#[test]
fn a_first_scope_told_mid_snapshot_starts_the_snapshot_over() {
    use driftless_core::{LogCursor, SnapshotAt, SnapshotProgress};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(dir.path(), "a.db", StoreOptions::default(), TableSpec::new());
    let mut b = open(dir.path(), "b.db", StoreOptions::default(), TableSpec::new());
    // Never told a scope, nothing fetched: nothing to drop, no reset.
    let (_, resets) = b.cursor().expect("cursor");
    assert_eq!(b.rescope(1, &["inspections".to_owned()]).expect("rescope"), 0);
    assert_eq!(b.cursor().expect("cursor").1, resets, "no reset");
    // Another store, told nothing, with a snapshot's first page applied.
    let mut c = open(dir.path(), "c.db", StoreOptions::default(), TableSpec::new());
    exec(&mut a, "INSERT INTO inspections(id, status) VALUES ('i1', 'open')");
    let page = drain(&mut a).remove(0);
    let (_, resets) = c.cursor().expect("cursor");
    let log = LogCursor { position: 3, tag: 1 };
    let at = SnapshotAt { resume: vec![1], log_cursor: log, progress: SnapshotProgress::default() };
    assert!(c.apply_snapshot_page(&page, &[], &at, false, resets).expect("page").moved);
    assert_eq!(c.rescope(2, &["inspections".to_owned()]).expect("rescope"), 1, "the page's row dropped");
    assert_eq!(c.cursor().expect("cursor").1, resets + 1, "reset");
    assert_eq!(c.snapshot_position().expect("position"), None, "the snapshot starts over");
    assert!(rows(&c, "SELECT id FROM inspections").is_empty());
}
