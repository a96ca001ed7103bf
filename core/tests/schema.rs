//! Devices following the declared sync schema: tables created and tracked from it, columns
//! added by later versions, mixed fleets, and local tables that contradict it.

mod common;

use common::{exchange, exec, rows, text};
use driftless_core::{ColumnPolicy, Error, Store, StoreOptions, Value};

const V1: &str = include_str!("fixtures/work-orders-v1.toml");

/// V1 plus a column with a default, a policy change and a new table.
fn v2() -> String {
    format!(
        "{}\n[[table.column]]\nname = \"site\"\ntype = \"text\"\ndefault = \"depot\"\n\n\
         [[table]]\nname = \"notes\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n",
        V1.replace("name = \"title\"\ntype = \"text\"", "name = \"title\"\ntype = \"text\"\npolicy = \"manual\"")
    )
}

fn store(dir: &std::path::Path, name: &str) -> Store {
    Store::open(dir.join(name), StoreOptions::default()).expect("open")
}

#[test]
fn a_device_creates_and_tracks_its_tables_from_the_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = (store(dir.path(), "a.db"), store(dir.path(), "b.db"));
    for s in [&mut a, &mut b] {
        let done = s.follow_schema(1, V1).expect("follow");
        assert_eq!(done.created, vec!["work_orders".to_owned()]);
        assert_eq!(s.schema().expect("schema").map(|(v, _)| v), Some(1));
    }
    assert_eq!(a.tracked()[0].1.policy("parts"), &ColumnPolicy::Counter);
    exec(&mut a, "INSERT INTO work_orders(id, title, parts) VALUES ('w1', 'pump', 2)");
    exec(&mut b, "INSERT INTO work_orders(id, title, parts) VALUES ('w1', 'pump', 3)");
    exchange(&mut a, &mut b);
    let q = "SELECT id, title, parts FROM work_orders";
    assert_eq!(rows(&a, q), vec![vec![text("w1"), text("pump"), Value::Integer(5)]]);
    assert_eq!(rows(&a, q), rows(&b, q));
    // Following the same version again does nothing.
    assert_eq!(a.follow_schema(1, V1).expect("again").tracked, Vec::<String>::new());
}

#[test]
fn a_fleet_on_two_versions_converges_and_keeps_columns_it_does_not_know_yet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut old, mut new) = (store(dir.path(), "old.db"), store(dir.path(), "new.db"));
    old.follow_schema(1, V1).expect("v1");
    new.follow_schema(1, V1).expect("v1");
    exec(&mut old, "INSERT INTO work_orders(id, title) VALUES ('w1', 'pump')");
    exchange(&mut old, &mut new);
    let done = new.follow_schema(2, &v2()).expect("v2");
    assert_eq!(done.added, vec![("work_orders".to_owned(), "site".to_owned())]);
    assert_eq!(done.created, vec!["notes".to_owned()]);
    exec(&mut new, "UPDATE work_orders SET site = 'north', parts = parts + 1 WHERE id = 'w1'");
    exec(&mut old, "UPDATE work_orders SET title = 'big pump' WHERE id = 'w1'");
    exchange(&mut old, &mut new);
    assert_eq!(rows(&old, "SELECT title, parts FROM work_orders"), vec![vec![text("big pump"), Value::Integer(1)]]);
    // The device on version 1 kept the site it could not show; version 2 shows it.
    old.follow_schema(2, &v2()).expect("v2");
    let q = "SELECT id, title, site, parts FROM work_orders";
    assert_eq!(rows(&old, q), vec![vec![text("w1"), text("big pump"), text("north"), Value::Integer(1)]]);
    assert_eq!(rows(&old, q), rows(&new, q));
    assert_eq!(
        old.tracked().iter().find(|t| t.0 == "work_orders").expect("tracked").1.policy("title"),
        &ColumnPolicy::Manual
    );
    // Following the added column did not make its value a new local write.
    assert!(old.outbox_batch(10).expect("outbox").is_none());
    // A late copy of version 1 does not undo version 2.
    old.follow_schema(1, V1).expect("late v1");
    assert_eq!(old.schema().expect("schema").map(|(v, _)| v), Some(2));
}

#[test]
fn a_local_table_that_contradicts_the_schema_is_named_and_nothing_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "CREATE TABLE work_orders (id TEXT PRIMARY KEY, title TEXT, parts INTEGER, colour TEXT)",
            "\"colour\" is not in",
        ),
        ("CREATE TABLE work_orders (id TEXT PRIMARY KEY, title BLOB, parts INTEGER)", "\"title\" is declared \"BLOB\""),
        ("CREATE TABLE work_orders (id TEXT, title TEXT, parts INTEGER, PRIMARY KEY (id, title))", "primary key"),
    ];
    for (i, (create, want)) in cases.into_iter().enumerate() {
        let mut s = store(dir.path(), &format!("{i}.db"));
        s.write(|tx| Ok(tx.execute_batch(create)?)).expect("create");
        let err = s.follow_schema(1, V1).expect_err(want);
        assert!(matches!(&err, Error::SchemaMismatch { table, .. } if table == "work_orders"), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(s.tracked().is_empty() && s.schema().expect("schema").is_none());
    }
    // A matching table the app made itself is taken as it is, rows and all.
    let mut s = store(dir.path(), "own.db");
    s.write(|tx| {
        Ok(tx.execute_batch(
            "CREATE TABLE work_orders (id TEXT PRIMARY KEY, title VARCHAR(80), parts INT NOT NULL DEFAULT 0);
             INSERT INTO work_orders VALUES ('w9', 'kept', 4);",
        )?)
    })
    .expect("create");
    assert!(s.follow_schema(1, V1).expect("follow").created.is_empty());
    let out = s.outbox_batch(10).expect("outbox").expect("the app's row ships");
    assert_eq!(out.batch.rows[0].pk, vec![text("w9")]);
    // Local-only tables are the app's own business.
    exec(&mut s, "CREATE TABLE drafts (id TEXT PRIMARY KEY, body TEXT)");
    assert!(s.follow_schema(2, &v2()).is_ok());
}

#[test]
fn a_schema_that_would_recount_or_orphan_synced_data_is_refused_or_untracks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = store(dir.path(), "s.db");
    // Synced so far by hand: parts by value, and a table the schema does not name.
    s.write(|tx| {
        Ok(tx.execute_batch(
            "CREATE TABLE work_orders (id TEXT PRIMARY KEY, title TEXT, parts INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE drafts (id TEXT PRIMARY KEY, body TEXT);",
        )?)
    })
    .expect("create");
    s.track("work_orders", driftless_core::TableSpec::new()).expect("track");
    s.track("drafts", driftless_core::TableSpec::new()).expect("track");
    let err = s.follow_schema(1, V1).expect_err("parts would become a counter");
    assert!(err.to_string().contains("\"parts\" is synced by value here"), "{err}");
    assert_eq!(s.tracked().len(), 2, "nothing changed");
    // Declared as it is synced, the schema is followed and the undeclared table untracked.
    let by_value = V1.replace("policy = \"counter\"", "");
    let done = s.follow_schema(1, &by_value).expect("follow");
    assert_eq!(done.untracked, vec!["drafts".to_owned()]);
    assert_eq!(s.tracked().iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), vec!["work_orders"]);
}
