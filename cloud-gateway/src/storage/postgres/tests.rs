//! What only the PostgreSQL store has to prove: several instances and plain-SQL writers on
//! one database, positions that never let a cursor skip a change, values PostgreSQL holds
//! that SQLite cannot, and the notification that wakes a gateway.

use std::sync::mpsc;
use std::time::Duration;

use driftless_core::{Batch, ColumnPolicy, Store, StoreOptions, TableSpec, Value};

use crate::storage::test_backends::{Backend, TestDb};
use crate::storage::{GatewayStore, Incoming, tenants_of};

const NOW: u64 = 1_800_000_000_000;

fn incoming<'a>(device: &'a str, seq: i64) -> Incoming<'a> {
    Incoming {
        tenant: "acme",
        device,
        first_seq: seq,
        last_seq: seq,
        now_ms: NOW,
        max_drift_ms: 300_000,
        role: None,
        recovering: false,
        legacy: false,
        scope: None,
    }
}

/// A device that counts on row `a` of table `t`; each call to `next` is one batch of `+1`.
struct Counter {
    store: Store,
    seq: i64,
}

impl Counter {
    fn new(dir: &std::path::Path, name: &str) -> Counter {
        let mut store = Store::open(dir.join(name), StoreOptions::default()).expect("open");
        store
            .write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?))
            .expect("table");
        store.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
        store.write(|tx| Ok(tx.execute_batch("INSERT OR IGNORE INTO t VALUES ('a', 0)")?)).expect("row");
        Counter { store, seq: 0 }
    }

    fn next(&mut self) -> (i64, Batch) {
        self.store.write(|tx| Ok(tx.execute_batch("UPDATE t SET n = n + 1 WHERE id = 'a'")?)).expect("count");
        let out = self.store.outbox_batch(100).expect("outbox").expect("batch");
        self.store.ack(out.first_seq, out.last_seq).expect("ack");
        self.seq = out.last_seq;
        (out.last_seq, out.batch)
    }
}

fn counted(gw: &mut dyn GatewayStore) -> i64 {
    let page = gw.snapshot_page("acme", &[], 10).expect("snapshot").expect("page");
    page.batch.rows.iter().find(|r| r.pk == [Value::Text("a".into())]).map_or(0, |r| r.state.counters["n"].value())
}

#[test]
fn two_instances_merging_the_same_row_at_once_lose_no_update() {
    let Some(db) = TestDb::new() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    const EACH: usize = 25;
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        for name in ["tab-1", "tab-2"] {
            let (db, dir, tx) = (&db, dir.path(), tx.clone());
            scope.spawn(move || {
                let mut gw = db.store();
                let mut device = Counter::new(dir, &format!("{name}.db"));
                for _ in 0..EACH {
                    let (seq, batch) = device.next();
                    let outcome = gw.merge(&incoming(name, seq), &batch).expect("merge");
                    tx.send(outcome.logged.expect("logged").position).expect("send");
                }
            });
        }
    });
    drop(tx);
    let mut positions: Vec<u64> = rx.iter().collect();
    positions.sort_unstable();
    // Every merge logged once, at its own position, with no gap.
    assert_eq!(positions, (1..=2 * EACH as u64).collect::<Vec<_>>());
    let mut gw = db.store();
    assert_eq!(counted(&mut gw), 2 * EACH as i64, "every increment of both devices counted");
}

#[test]
fn a_cursor_never_passes_a_position_that_commits_later() {
    let Some(db) = TestDb::new() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Counter::new(dir.path(), "a.db");
    let mut b = Counter::new(dir.path(), "b.db");
    let mut gw = db.store();
    let (seq, batch) = a.next();
    let start = gw.merge(&incoming("tab-a", seq), &batch).expect("merge").logged.expect("logged");
    // Hold tab-a's registry row: its next merge takes its log position and then waits to
    // commit. With positions from a sequence, tab-b's merge would take the next position
    // and commit first, and a device pulling then would move past tab-a's change for good.
    let mut blocker = db.client();
    let mut hold = blocker.transaction().expect("begin");
    hold.execute("SELECT 1 FROM driftless.gw_devices WHERE tenant = 'acme' AND device = 'tab-a' FOR UPDATE", &[])
        .expect("lock");
    let (done_tx, done) = mpsc::channel();
    std::thread::scope(|scope| {
        let (db, done_tx) = (&db, done_tx);
        let (seq_a, batch_a) = a.next();
        let (seq_b, batch_b) = b.next();
        let first = done_tx.clone();
        scope.spawn(move || {
            let mut gw = db.store();
            let logged = gw.merge(&incoming("tab-a", seq_a), &batch_a).expect("merge a").logged;
            first.send(("a", logged)).expect("send");
        });
        std::thread::sleep(Duration::from_millis(200));
        scope.spawn(move || {
            let mut gw = db.store();
            let logged = gw.merge(&incoming("tab-b", seq_b), &batch_b).expect("merge b").logged;
            done_tx.send(("b", logged)).expect("send");
        });
        // Neither commits while tab-a's waits, and a pull now sees nothing past the start.
        assert!(done.recv_timeout(Duration::from_millis(500)).is_err(), "a merge committed past a waiting one");
        let page = gw.changes_after("acme", "observer", start.position, 100).expect("pull");
        assert_eq!((page.cursor, page.batch.rows.len()), (start, 0));
        hold.rollback().expect("release");
        let mut finished: Vec<_> = (0..2).map(|_| done.recv().expect("finished")).collect();
        finished.sort_by_key(|(who, _)| *who);
        let (a_at, b_at) = (finished[0].1.expect("a logged"), finished[1].1.expect("b logged"));
        assert!(a_at.position < b_at.position, "tab-a took its position first and committed first");
    });
    let page = gw.changes_after("acme", "observer", start.position, 100).expect("pull");
    assert_eq!(page.batch.rows.len(), 2, "the observer gets both changes");
}

#[test]
fn a_plain_sql_write_still_open_is_taken_in_before_a_merge_of_its_row() {
    let Some(db) = TestDb::new() else { return };
    let backend = Backend::Pg(Box::new((db, tempfile::tempdir().expect("tempdir"))));
    let Backend::Pg(pg) = &backend else { unreachable!() };
    let db = &pg.0;
    let schema = r#"
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
[[table.column]]
name = "note"
type = "text"
"#;
    let mut gw = db.store();
    gw.install_schema(schema).expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut device = Store::open(dir.path().join("d.db"), StoreOptions::default()).expect("open");
    device.follow_schema(1, schema).expect("follow");
    device.write(|tx| Ok(tx.execute_batch("INSERT INTO t(id, n) VALUES ('a', 1)")?)).expect("insert");
    let out = device.outbox_batch(100).expect("outbox").expect("batch");
    gw.merge(&incoming("tab-1", out.last_seq), &out.batch).expect("merge");
    device.ack(out.first_seq, out.last_seq).expect("ack");
    // An ERP transaction adds 10 to the counter and is still open...
    let mut erp = db.client();
    let mut open = erp.transaction().expect("begin");
    open.batch_execute("SET LOCAL driftless.role = 'cloud'; UPDATE acme.t SET n = n + 10, note = 'erp' WHERE id = 'a'")
        .expect("update");
    // ...while the device adds 1 more and its batch arrives.
    device.write(|tx| Ok(tx.execute_batch("UPDATE t SET n = n + 1 WHERE id = 'a'")?)).expect("count");
    let out = device.outbox_batch(100).expect("outbox").expect("batch");
    let (done_tx, done) = mpsc::channel();
    std::thread::scope(|scope| {
        let (db, batch, seq) = (&db, out.batch.clone(), out.last_seq);
        scope.spawn(move || {
            let mut gw = db.store();
            done_tx.send(gw.merge(&incoming("tab-1", seq), &batch).expect("merge")).expect("send");
        });
        assert!(done.recv_timeout(Duration::from_millis(300)).is_err(), "the merge waits for the writer");
        open.commit().expect("commit");
        let outcome = done.recv().expect("merged");
        assert!(outcome.cloud_logged, "the writer's change was taken in first");
    });
    let rows = backend.rows("SELECT n, note FROM acme.t WHERE id = 'a'");
    assert_eq!(rows, vec![vec![Value::Integer(12), Value::Text("erp".into())]], "neither update lost");
}

#[test]
fn values_only_postgresql_holds_reach_devices_bit_exact_and_a_commit_wakes_the_gateway() {
    let Some(db) = TestDb::new() else { return };
    let schema = r#"
[[table]]
name = "m"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "r"
type = "real"
"#;
    let mut gw = db.store();
    gw.install_schema(schema).expect("schema");
    gw.prepare_tenant("acme").expect("tables");
    let (woke_tx, woke) = mpsc::channel();
    let _watch = gw
        .watch_cloud_writes(Box::new(move || {
            let _ = woke_tx.send(());
        }))
        .expect("watch")
        .expect("a watch");
    let mut c = db.client();
    c.batch_execute("INSERT INTO acme.m VALUES ('neg', '-0'::float8), ('tiny', 4.9e-324)").expect("insert");
    woke.recv_timeout(Duration::from_secs(10)).expect("the commit woke the gateway");
    assert_eq!(tenants_of(&gw.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    // The change only bumps r from -0 to +0: PostgreSQL's `=` says equal, the capture does not.
    c.batch_execute("UPDATE acme.m SET r = 0.0 WHERE id = 'neg'").expect("update");
    woke.recv_timeout(Duration::from_secs(10)).expect("woken again");
    gw.ingest_cloud_writes(NOW).expect("ingest");
    let page = gw.changes_after("acme", "tab-1", 0, 100).expect("pull");
    let bits: Vec<(Value, u64)> = page
        .batch
        .rows
        .iter()
        .map(|r| match &r.state.fields["r"].entries[0].value {
            Value::Real(x) => (r.pk[0].clone(), x.to_bits()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        bits,
        vec![
            (Value::Text("neg".into()), (-0.0f64).to_bits()),
            (Value::Text("tiny".into()), 4.9e-324f64.to_bits()),
            (Value::Text("neg".into()), 0.0f64.to_bits()),
        ]
    );
    // Nothing a gateway writes wakes it: its own writes are not captured.
    while woke.try_recv().is_ok() {}
    gw.ingest_cloud_writes(NOW).expect("ingest");
    assert!(woke.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn truncate_is_refused_and_a_tenant_postgresql_cannot_name_is_an_error_of_the_store() {
    let Some(db) = TestDb::new() else { return };
    let mut gw = db.store();
    gw.install_schema("[[table]]\nname = \"m\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n")
        .expect("schema");
    gw.prepare_tenant("acme").expect("tables");
    let err = db.client().batch_execute("TRUNCATE acme.m").expect_err("refused");
    assert!(err.to_string().contains("DELETE") || format!("{err:?}").contains("DELETE"), "{err:?}");
    // A tenant name PostgreSQL cannot hold is the operator's to fix: the batch is not
    // refused (the device keeps it), the store says why.
    let long = "x".repeat(64);
    let from = Incoming { tenant: &long, ..incoming("tab-1", 1) };
    match gw.merge(&from, &Batch::default()) {
        Err(crate::error::MergeError::Store(e)) => assert!(e.to_string().contains("63"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_schema_driftless_did_not_make_is_not_taken_over_and_nothing_is_refused_for_it() {
    let Some(db) = TestDb::new() else { return };
    let mut gw = db.store();
    gw.install_schema("[[table]]\nname = \"m\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n")
        .expect("schema");
    // An ERP's own schema and table of the same names.
    db.client().batch_execute("CREATE SCHEMA erp; CREATE TABLE erp.m (id text PRIMARY KEY)").expect("erp");
    let from = Incoming { tenant: "erp", ..incoming("tab-1", 1) };
    match gw.merge(&from, &Batch::default()) {
        Err(crate::error::MergeError::Store(e)) => {
            assert!(e.to_string().contains("not made by driftless"), "{e}");
            assert!(!e.is_transient(), "an operator's to fix, counted");
        }
        other => panic!("{other:?}"),
    }
    let triggers: i64 = db
        .client()
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'erp.m'::regclass AND NOT tgisinternal", &[])
        .expect("count")
        .get(0);
    assert_eq!(triggers, 0, "the ERP's table is left alone");
}

#[test]
fn a_key_the_real_table_cannot_index_is_merged_and_sent_not_refused() {
    let Some(db) = TestDb::new() else { return };
    let schema = "[[table]]\nname = \"m\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
                  [[table.column]]\nname = \"v\"\ntype = \"text\"\n";
    let mut gw = db.store();
    gw.install_schema(schema).expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut device = Store::open(dir.path().join("d.db"), StoreOptions::default()).expect("open");
    device.follow_schema(1, schema).expect("follow");
    let long = crate::storage::test_backends::incompressible(8_000);
    device
        .write(|tx| Ok(tx.execute("INSERT INTO m VALUES (?1, 'x'), ('short', 'y')", [&long]).map(|_| ())?))
        .expect("insert");
    let out = device.outbox_batch(100).expect("outbox").expect("batch");
    let outcome = gw.merge(&incoming("tab-1", out.last_seq), &out.batch).expect("merge");
    // A limit of this store is not the device's fault: merged, logged, only not shown.
    assert_eq!((outcome.applied, outcome.refused.len()), (2, 0), "{:?}", outcome.refused);
    let page = gw.changes_after("acme", "tab-2", 0, 100).expect("pull");
    assert!(page.batch.rows.iter().any(|r| r.pk == [Value::Text(long.clone())]));
    let shown: i64 = db.client().query_one("SELECT count(*) FROM acme.m", &[]).expect("count").get(0);
    assert_eq!(shown, 1);
    let letters = gw.dead_letters(&crate::storage::DeadLetterFilter::default()).expect("letters");
    assert!(letters.iter().any(|l| l.device == "gateway" && l.reason.contains("cannot show")), "{letters:?}");
}

#[test]
fn after_the_connection_is_lost_plain_sql_writes_take_a_new_cloud_node() {
    let Some(db) = TestDb::new() else { return };
    let schema = "[[table]]\nname = \"m\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
                  [[table.column]]\nname = \"v\"\ntype = \"text\"\n";
    let mut gw = db.store();
    gw.install_schema(schema).expect("schema");
    gw.prepare_tenant("acme").expect("tables");
    let mut sql = db.client();
    let nodes = |c: &mut postgres::Client| -> Vec<Vec<u8>> {
        c.query("SELECT node FROM driftless.gw_cloud_writers", &[]).expect("nodes").iter().map(|r| r.get(0)).collect()
    };
    sql.batch_execute("INSERT INTO acme.m VALUES ('a', '1')").expect("write");
    gw.ingest_cloud_writes(NOW).expect("ingest");
    let before = nodes(&mut sql);
    assert_eq!(before.len(), 1);
    // The server ends the gateway's connection (a restart, a failover to a copy that may be
    // behind): whatever that node issued since the copy was taken must not be issued again.
    sql.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .expect("terminate");
    sql.batch_execute("INSERT INTO acme.m VALUES ('b', '2')").expect("write");
    // The first call may find the connection gone (a transient error, tried again).
    let logged = match gw.ingest_cloud_writes(NOW) {
        Ok(logged) if !logged.is_empty() => logged,
        _ => gw.ingest_cloud_writes(NOW).expect("ingest after reconnecting"),
    };
    assert_eq!(tenants_of(&logged), vec!["acme".to_owned()]);
    let after = nodes(&mut sql);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "a new cloud node after the connection was made again");
}

#[test]
fn a_group_whose_connection_was_lost_before_it_synced_is_not_called_durable() {
    let Some(db) = TestDb::new() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = db.store();
    gw.begin_group().expect("group");
    let mut a = Counter::new(dir.path(), "a.db");
    let (seq, batch) = a.next();
    gw.merge(&incoming("a", seq), &batch).expect("merge");
    gw.commit_group().expect("synced on the same connection");
    gw.begin_group().expect("group");
    let (seq, batch) = a.next();
    gw.merge(&incoming("a", seq), &batch).expect("merge");
    // The server ends the connection before the group syncs: the commit may be lost with it.
    db.client()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .expect("terminate");
    // Noticed either now (the connection is gone) or on the new connection: never durable.
    assert!(gw.commit_group().is_err(), "a group whose connection was lost was called durable");
    // A later group commits on a new connection (the client may take a moment to see its
    // old one closed).
    let (seq, batch) = a.next();
    let committed = (0..5).any(|_| {
        gw.begin_group().is_ok() && gw.merge(&incoming("a", seq), &batch).is_ok() && gw.commit_group().is_ok()
    });
    assert!(committed, "a later group on a new connection commits");
    // Out of a group, commits wait for the disk again.
    let level: String = gw.client().expect("client").query_one("SHOW synchronous_commit", &[]).expect("show").get(0);
    assert_eq!(level, "on");
    assert_eq!(counted(&mut gw), 3);
}

/// A schema being loaded holds the schema's lock alone while it counts what stored rows name
/// (`storage::refs`): a merge of another instance waits for it, then merges under the new
/// version, so no row is counted twice or not at all.
#[test]
fn a_merge_waits_while_another_instance_loads_a_schema() {
    let Some(db) = TestDb::new() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = db.store();
    let mut counter = Counter::new(dir.path(), "a.db");
    let (seq, batch) = counter.next();
    let mut loading = db.client();
    let mut install = loading.transaction().expect("begin");
    install.execute("SELECT pg_advisory_xact_lock($1, 1)", &[&super::migrate::LOCK_SPACE]).expect("schema lock");
    let (done, merged) = mpsc::channel();
    let merging = std::thread::spawn(move || {
        gw.merge(&incoming("a", seq), &batch).expect("merge");
        done.send(()).expect("send");
    });
    assert!(merged.recv_timeout(Duration::from_millis(500)).is_err(), "the merge waits for the load");
    install.commit().expect("commit");
    merged.recv_timeout(Duration::from_secs(10)).expect("then it merges");
    merging.join().expect("thread");
}
