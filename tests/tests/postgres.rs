//! The PostgreSQL store end to end, with the real binaries through a test-started Mosquitto:
//! device writes land in plain tables, plain SQL reaches devices resolved by the schema's
//! policies, and two gateways share one database with one killed mid-drain.

use std::path::Path;
use std::time::Duration;

use driftless_core::Value;
use driftless_gateway::storage::testing::TestDb;
use driftless_tests::procs::*;
use driftless_tests::*;

const WAIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"
roles = ["erp", "field"]

[[table]]
name = "work_orders"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "title"
type = "text"
[[table.column]]
name = "owner"
type = "text"
policy = "authority:erp>field"
[[table.column]]
name = "parts"
type = "integer"
policy = "counter"
"#;

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rows of `sql` in the cloud database, as text (NULL as "NULL").
fn cloud(db: &TestDb, sql: &str) -> Vec<Vec<String>> {
    let mut c = db.client();
    c.query(sql, &[])
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| match r.columns()[i].type_().name() {
                            "int8" => r.get::<_, Option<i64>>(i).map_or("NULL".into(), |v| v.to_string()),
                            _ => r.get::<_, Option<String>>(i).unwrap_or_else(|| "NULL".into()),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn device(dir: &Path, name: &str) -> std::path::PathBuf {
    let db = dir.join(format!("{name}.db"));
    agent_ok(&["init", "--db", db.to_str().expect("utf-8"), "--role", "field"]);
    db
}

#[test]
fn device_writes_land_in_postgresql_and_sql_writes_reach_devices_resolved_by_the_schema() {
    let Some(db) = TestDb::new() else { return };
    let Some(mosquitto) = OwnMosquitto::start(free_port()) else { return };
    let broker = mosquitto.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("pg");
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).expect("schema");
    let url = db.url();
    let _gw = gateway(
        &broker,
        &tenant,
        &dir.path().join("gw.db"),
        &["--store", &url, "--schema", schema.to_str().expect("utf-8")],
    );
    let (a, b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    let mut agent_a = agent(&a, &broker, &tenant, "tab-a");
    let _agent_b = agent(&b, &broker, &tenant, "tab-b");
    let has_table =
        |d: &Path| rows(d, "SELECT count(*) FROM sqlite_master WHERE name = 'work_orders'")[0][0] == Value::Integer(1);
    wait_until("tables made from the schema", || has_table(&a) && has_table(&b));

    // A device write appears in the PostgreSQL table, read with plain SQL.
    exec(&a, "INSERT INTO work_orders(id, title, owner, parts) VALUES ('w1', 'pump', 'field', 2)");
    let t = format!("\"{tenant}\".work_orders");
    wait_until("the device write in PostgreSQL", || {
        cloud(&db, &format!("SELECT id, title, owner, parts FROM {t}")) == [["w1", "pump", "field", "2"]]
    });

    // A psql-style UPDATE as role erp reaches both devices at once (LISTEN/NOTIFY wakes the
    // gateway; nothing polls).
    db.client()
        .batch_execute(&format!(
            "BEGIN; SET LOCAL driftless.role = 'erp'; UPDATE {t} SET title = 'pump (ERP)', parts = parts + 3 WHERE id = 'w1'; COMMIT;"
        ))
        .expect("erp update");
    let q = "SELECT id, title, owner, parts FROM work_orders";
    let want = vec![vec![text("w1"), text("pump (ERP)"), text("field"), Value::Integer(5)]];
    wait_until("the SQL update on both devices", || rows(&a, q) == want && rows(&b, q) == want);

    // Concurrent writes of the authority column: device a (offline, role field) and the ERP.
    agent_a.kill();
    exec(&a, "UPDATE work_orders SET owner = 'tech-7' WHERE id = 'w1'");
    db.client()
        .batch_execute(&format!(
            "BEGIN; SET LOCAL driftless.role = 'erp'; UPDATE {t} SET owner = 'planner' WHERE id = 'w1'; COMMIT;"
        ))
        .expect("erp owner");
    let _agent_a = agent(&a, &broker, &tenant, "tab-a");
    let owner = "SELECT owner FROM work_orders WHERE id = 'w1'";
    wait_until("erp's owner everywhere (authority erp > field)", || {
        rows(&a, owner) == [[text("planner")]]
            && rows(&b, owner) == [[text("planner")]]
            && cloud(&db, &format!("SELECT owner FROM {t}")) == [["planner"]]
            && pending(&a) == 0
    });
    // The conflict is listed for review in the cloud database too.
    let conflicts = cloud(&db, &format!("SELECT col, shown FROM \"{tenant}\"._driftless_conflicts"));
    assert!(conflicts.iter().all(|c| c[0] == "owner"), "{conflicts:?}");
    // The operator's report reads the same store.
    let out = std::process::Command::new(bin("driftless-gateway"))
        .args(["report", "--store", &url, "--tenant", &tenant])
        .output()
        .expect("report");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("tab-a") && text.contains("tab-b"), "{text}");
}

#[test]
fn two_gateways_share_one_database_and_one_killed_mid_drain_loses_and_doubles_nothing() {
    let Some(db) = TestDb::new() else { return };
    let Some(mosquitto) = OwnMosquitto::start(free_port()) else { return };
    let broker = mosquitto.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("pg2");
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).expect("schema");
    let url = db.url();
    let args = ["--store", url.as_str(), "--schema", schema.to_str().expect("utf-8")];
    let mut gw1 = gateway_as("gw-one", &broker, &tenant, &dir.path().join("gw1.db"), &args);
    let gw2 = gateway_as("gw-two", &broker, &tenant, &dir.path().join("gw2.db"), &args);
    let (a, b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    // a makes its table from the schema, then writes offline: one outbox entry per row.
    let mut agent_a = agent(&a, &broker, &tenant, "tab-a");
    let _agent_b = agent(&b, &broker, &tenant, "tab-b");
    let has_table =
        |d: &Path| rows(d, "SELECT count(*) FROM sqlite_master WHERE name = 'work_orders'")[0][0] == Value::Integer(1);
    wait_until("tables made from the schema", || has_table(&a) && has_table(&b));
    agent_a.kill();
    const ROWS: i64 = 3_000;
    let conn = rusqlite::Connection::open(&a).expect("open");
    for i in 0..ROWS {
        conn.execute("INSERT INTO work_orders(id, title, parts) VALUES (?1, 'job', 1)", [format!("w{i:05}")])
            .expect("insert");
    }
    drop(conn);
    let count = format!("SELECT count(*) FROM \"{tenant}\".work_orders");
    let _agent_a = agent(&a, &broker, &tenant, "tab-a");
    wait_until("the drain under way", || cloud(&db, &count).first().is_some_and(|r| r[0] != "0"));
    gw1.kill();
    // Retired for good: its session ends, so the broker hands the other instance every uplink
    // (those it had queued for the dead one are lost with it, and the device sends them again).
    end_session(&broker, "gw-one");
    wait_until("every row in PostgreSQL through the other gateway", || cloud(&db, &count) == [[ROWS.to_string()]]);
    wait_until("device a's outbox acknowledged", || pending(&a) == 0);
    wait_until("every row on device b", || {
        rows(&b, "SELECT count(*), sum(parts) FROM work_orders") == [[Value::Integer(ROWS), Value::Integer(ROWS)]]
    });
    // Nothing doubled: each row's change was logged once, whichever instance merged it and
    // however often the broker redelivered it.
    let logged = cloud(
        &db,
        &format!("SELECT sum(rows)::bigint FROM driftless.gw_log WHERE tenant = '{tenant}' AND origin = 'tab-a'"),
    );
    assert_eq!(logged, [[ROWS.to_string()]]);
    drop(gw2);
}
