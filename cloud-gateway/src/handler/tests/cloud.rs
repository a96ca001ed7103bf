//! The declared sync schema at the gateway and the cloud tables (writes made to them with
//! plain SQL: `cloud_writes.rs`).

use super::*;

pub(super) const SCHEMA: &str = r#"
[[table]]
name = "t"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "n"
type = "integer"
policy = "counter"

[[table]]
name = "prices"
key = ["sku"]
direction = "down-only"
[[table.column]]
name = "sku"
type = "text"
"#;

/// One batch from a device whose tables are made by `create` and tracked with default specs
/// (counters for `n`), after running `sql`.
pub(super) fn batch_from(dir: &tempfile::TempDir, name: &str, create: &str, sql: &str) -> Vec<u8> {
    let mut s = Store::open(dir.path().join(name), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch(create)?)).expect("schema");
    for (table, _) in s.read(|c| {
        let mut stmt = c.prepare("SELECT name, 0 FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '%sqlite%' AND name NOT LIKE '_driftless%'")?;
        Ok(stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?)
    })
    .expect("tables")
    {
        let spec = TableSpec::new();
        let spec = if table == "t" { spec.column("n", ColumnPolicy::Counter) } else { spec };
        s.track(&table, spec).expect("track");
    }
    s.write(|tx| Ok(tx.execute_batch(sql)?)).expect("write");
    let out = s.outbox_batch(100).expect("outbox").expect("batch");
    encode_batch(&out.batch, EncodeOptions::default())
}

pub(super) fn with_schema(store: &mut dyn GatewayStore) -> HandlerConfig {
    store.install_schema(SCHEMA).expect("install");
    HandlerConfig::default()
}

#[test]
fn schema_versions_grow_only_with_changes_devices_can_follow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    assert!(store.served_schema().expect("schema").is_none());
    assert_eq!(store.install_schema(SCHEMA).expect("first"), 1);
    let relaid = format!("# the same schema, commented\n{SCHEMA}");
    assert_eq!(store.install_schema(&relaid).expect("same"), 1);
    let grown = format!("{SCHEMA}[[table.column]]\nname = \"price\"\ntype = \"real\"\n");
    assert_eq!(store.install_schema(&grown).expect("grown"), 2);
    let dropped = SCHEMA.replace("[[table]]\nname = \"prices\"", "[[table]]\nname = \"costs\"");
    let err = store.install_schema(&dropped).expect_err("a table dropped").to_string();
    assert!(err.contains("table \"prices\" was dropped") && err.contains("version 2"), "{err}");
    assert!(matches!(store.install_schema("[[table]]\nname = 1"), Err(Error::Schema(_))));
    assert_eq!(store.served_schema().expect("schema").map(|s| s.version), Some(2));
}

#[test]
fn the_schema_follows_every_welcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let cfg = with_schema(&mut store);
    let hello = Uplink::Hello {
        device: "a".into(),
        node: NodeId([3; 16]),
        counter: 0,
        outbox_seq: 0,
        receipts: vec![],
        epoch: None,
    };
    let out = handle_uplink(&mut store, &cfg, "driftless/t/a/up", &hello.encode(), NOW).expect("handled");
    let Some(Outgoing::Reply { payload, .. }) = out.get(1) else {
        panic!("expected the schema after the welcome: {out:?}")
    };
    assert_eq!(Downlink::decode(payload, &Limits::default()), Ok(Downlink::Schema { version: 1, text: SCHEMA.into() }));
}

crate::storage::test_backends::on_every_store!(rows_the_schema_does_not_allow_are_refused_and_the_rest_merged);

/// On both stores: each schema rule refuses its row with the reason, and the rest is merged.
fn rows_the_schema_does_not_allow_are_refused_and_the_rest_merged(b: &crate::storage::test_backends::Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = b.open();
    let cfg = with_schema(&mut *store);
    let cases = [
        (
            "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0, colour TEXT)",
            "INSERT INTO t VALUES ('x', 1, 'red')",
            "no column \"colour\"",
        ),
        (
            "CREATE TABLE unknown (id TEXT PRIMARY KEY, v TEXT)",
            "INSERT INTO unknown VALUES ('x', 'v')",
            "not in the sync schema",
        ),
        ("CREATE TABLE prices (sku TEXT PRIMARY KEY)", "INSERT INTO prices VALUES ('p1')", "written only by the cloud"),
        (
            "CREATE TABLE t (id TEXT, k TEXT, n INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (id, k))",
            "INSERT INTO t VALUES ('x', 'y', 1)",
            "1 key columns",
        ),
        (
            "CREATE TABLE t (id BLOB PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)",
            "INSERT INTO t VALUES (X'01', 1)",
            "not a blob value",
        ),
    ];
    for (i, (create, sql, want)) in cases.into_iter().enumerate() {
        // Each bad row rides with a good one, which is merged.
        let good = "CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)";
        let (create, sql) = if create.contains("TABLE t ") {
            (create.to_owned(), sql.to_owned())
        } else {
            (format!("{create}; {good}"), format!("{sql}; INSERT INTO t VALUES ('good{i}', 1)"))
        };
        let batch = batch_from(&dir, &format!("d{i}.db"), &create, &sql);
        let msg = Uplink::Batch {
            device: "a".into(),
            id: i as u64,
            first_seq: 1,
            last_seq: 2,
            epoch: None,
            receipts: vec![],
            batch,
        };
        let out = handle_uplink(&mut *store, &cfg, "driftless/t/a/up", &msg.encode(), NOW).expect("handled");
        let Downlink::Ack { refused, .. } = reply(&out) else { panic!("{want}: expected an ack") };
        assert_eq!(refused.len(), 1, "{want}: {refused:?}");
        assert!(refused[0].reason.contains(want), "{want}: {}", refused[0].reason);
        assert!(letters(&mut *store).iter().any(|l| l.reason.contains(want)), "{want}: kept as a dead letter");
    }
    // Only the good rows reached the log.
    let page = store.changes_after("t", "nobody", 0, 100).expect("changes");
    let keys: Vec<_> = page.batch.rows.iter().map(|r| r.pk.clone()).collect();
    assert_eq!(keys, (1..3).map(|i| vec![driftless_core::Value::Text(format!("good{i}"))]).collect::<Vec<_>>());
}

pub(super) const ORDERS: &str = r#"
[[table]]
name = "orders"
key = ["id"]
delete_policy = "update-wins"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "note"
type = "text"
policy = "manual"
[[table.column]]
name = "qty"
type = "integer"
policy = "counter"
[[table.column]]
name = "price"
type = "real"
"#;

/// A device store following `ORDERS`.
pub(super) fn orders_device(dir: &tempfile::TempDir, name: &str) -> Store {
    let mut s = Store::open(dir.path().join(name), StoreOptions::default()).expect("open");
    s.follow_schema(1, ORDERS).expect("follow");
    s
}

/// Ships everything `device` has to the gateway as device `id`.
pub(super) fn ship(store: &mut SqliteStore, cfg: &HandlerConfig, device: &mut Store, id: &str) {
    while let Some(out) = device.outbox_batch(100).expect("outbox") {
        let batch = encode_batch(&out.batch, EncodeOptions::default());
        let msg = Uplink::Batch {
            device: id.into(),
            id: out.last_seq as u64,
            first_seq: out.first_seq,
            last_seq: out.last_seq,
            epoch: None,
            receipts: vec![],
            batch,
        };
        let answer =
            handle_uplink(store, cfg, &format!("driftless/acme/{id}/up"), &msg.encode(), NOW).expect("handled");
        assert!(matches!(reply(&answer), Downlink::Ack { ref refused, .. } if refused.is_empty()));
        device.ack(out.first_seq, out.last_seq).expect("ack");
    }
}

pub(super) fn cloud_rows(store: &SqliteStore, sql: &str) -> Vec<Vec<driftless_core::Value>> {
    let conn = rusqlite::Connection::open(store.path()).expect("open");
    let mut stmt = conn.prepare(sql).expect(sql);
    let n = stmt.column_count();
    stmt.query_map([], |r| (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<Vec<_>>>())
        .expect(sql)
        .collect::<rusqlite::Result<_>>()
        .expect(sql)
}

#[test]
fn merged_rows_are_real_tables_people_query_with_plain_sql() {
    use driftless_core::Value::{Integer, Null, Real, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    // Rows merged before any schema was loaded are shown once one is.
    let (mut a, mut b) = (orders_device(&dir, "a.db"), orders_device(&dir, "b.db"));
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders VALUES ('o1', 'first', 2, -0.0)")?)).expect("write");
    ship(&mut store, &HandlerConfig::default(), &mut a, "a");
    store.install_schema(ORDERS).expect("install");
    let cfg = HandlerConfig::default();
    // Both devices write the same row at once; b also adds a row and deletes nothing.
    a.write(|tx| Ok(tx.execute_batch("UPDATE orders SET note = 'from a', qty = qty + 3 WHERE id = 'o1'")?))
        .expect("write");
    b.write(|tx| {
        Ok(tx.execute_batch(
            "INSERT INTO orders(id, note, qty, price) VALUES ('o1', 'from b', 5, NULL);
             INSERT INTO orders(id, qty) VALUES ('o2', 1);",
        )?)
    })
    .expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    ship(&mut store, &cfg, &mut b, "b");
    let shown = cloud_rows(&store, "SELECT id, qty, price, typeof(price) FROM \"acme.orders\" ORDER BY id");
    assert_eq!(
        shown,
        vec![
            vec![Text("o1".into()), Integer(10), Null, Text("null".into())],
            vec![Text("o2".into()), Integer(1), Null, Text("null".into())],
        ],
        "counters sum every device's increments"
    );
    // The notes conflict waits for review, listed for plain SQL too.
    let review = cloud_rows(
        &store,
        "SELECT tbl, key, col, needs_review FROM \"acme._driftless_conflicts\" WHERE needs_review ORDER BY col",
    );
    assert_eq!(review, vec![vec![Text("orders".into()), Text("'o1'".into()), Text("note".into()), Integer(1)]]);
    // The cloud shows what a device that saw the same writes shows.
    let mut c = orders_device(&dir, "c.db");
    let (snap, _) = {
        let page = store.snapshot_page("acme", &[], 100).expect("snapshot").expect("page");
        (page.batch, ())
    };
    c.apply(&snap).expect("apply");
    let on_device = c.read(|conn| {
        let mut stmt = conn.prepare("SELECT id, note, qty, price FROM orders ORDER BY id")?;
        Ok(stmt
            .query_map([], |r| Ok(vec![r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]))?
            .collect::<rusqlite::Result<Vec<Vec<driftless_core::Value>>>>()?)
    });
    assert_eq!(
        on_device.expect("rows"),
        cloud_rows(&store, "SELECT id, note, qty, price FROM \"acme.orders\" ORDER BY id")
    );
    // A delete removes the row.
    a.apply(&store.changes_after("acme", "a", 0, 100).expect("changes").batch).expect("a catches up");
    a.write(|tx| {
        Ok(tx.execute_batch("DELETE FROM orders WHERE id = 'o2'; UPDATE orders SET price = 2.5 WHERE id = 'o1'")?)
    })
    .expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    assert_eq!(cloud_rows(&store, "SELECT id, price FROM \"acme.orders\""), vec![vec![Text("o1".into()), Real(2.5)]]);
}

#[test]
fn a_first_schema_must_fit_the_rows_synced_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let mut a = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    a.write(
        |tx| Ok(tx.execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, note TEXT, qty INTEGER, price REAL)")?),
    )
    .expect("create");
    // qty synced by value, which the schema declares a counter.
    a.track("orders", TableSpec::new()).expect("track");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders VALUES ('o1', 'n', 2, 1.5)")?)).expect("write");
    ship(&mut store, &HandlerConfig::default(), &mut a, "a");
    let err = store.install_schema(ORDERS).expect_err("does not fit").to_string();
    assert!(err.contains("\"orders\".\"qty\" holds values; the schema declares a counter"), "{err}");
    assert!(store.served_schema().expect("schema").is_none());
}

#[test]
fn every_instance_enforces_the_newest_schema_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut one, mut two) = (open(&dir), open(&dir));
    one.install_schema(ORDERS).expect("v1");
    let mut a = orders_device(&dir, "a.db");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id, qty) VALUES ('o1', 1)")?)).expect("write");
    ship(&mut two, &HandlerConfig::default(), &mut a, "a");
    // Another instance loads version 2; devices follow it and write its new column.
    let v2 = format!("{ORDERS}[[table.column]]\nname = \"site\"\ntype = \"text\"\n");
    one.install_schema(&v2).expect("v2");
    a.follow_schema(2, &v2).expect("follow");
    a.write(|tx| Ok(tx.execute_batch("UPDATE orders SET site = 'north'")?)).expect("write");
    ship(&mut two, &HandlerConfig::default(), &mut a, "a");
    let rows = cloud_rows(&two, "SELECT id, site FROM \"acme.orders\"");
    assert_eq!(rows, vec![vec![driftless_core::Value::Text("o1".into()), driftless_core::Value::Text("north".into())]]);
}

/// Runs SQL on the gateway's database through a connection of its own, as any SQL client.
#[test]
fn a_first_schema_must_fit_the_types_of_rows_synced_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let mut a = Store::open(dir.path().join("a.db"), StoreOptions::default()).expect("open");
    a.write(|tx| {
        Ok(tx.execute_batch(
            "CREATE TABLE orders (id TEXT PRIMARY KEY, note TEXT, qty INTEGER NOT NULL DEFAULT 0, price REAL)",
        )?)
    })
    .expect("create");
    a.track("orders", TableSpec::new().column("qty", ColumnPolicy::Counter).column("note", ColumnPolicy::Manual))
        .expect("track");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders VALUES ('o1', 'n', 2, 'cheap')")?)).expect("write");
    ship(&mut store, &HandlerConfig::default(), &mut a, "a");
    let err = store.install_schema(ORDERS).expect_err("a text price").to_string();
    assert!(err.contains("\"price\" holds real, not a text value"), "{err}");
}
