//! The declared sync schema end to end: a gateway loads it, devices with empty databases
//! create and track their tables from it, and a new version loaded while they run reaches
//! them without a restart.

use std::path::Path;
use std::time::Duration;

use driftless_core::Value;
use driftless_tests::procs::*;
use driftless_tests::*;

const WAIT: Duration = Duration::from_secs(30);

const V1: &str = include_str!("../../core/tests/fixtures/work-orders-v1.toml");

fn v2() -> String {
    format!(
        "{V1}\n[[table.column]]\nname = \"site\"\ntype = \"text\"\ndefault = \"depot\"\n\n\
         [[table]]\nname = \"notes\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
         [[table.column]]\nname = \"body\"\ntype = \"text\"\n"
    )
}

fn has_table(db: &Path, table: &str) -> bool {
    rows(db, &format!("SELECT count(*) FROM sqlite_master WHERE name = '{table}'")) == vec![vec![Value::Integer(1)]]
}

fn has_column(db: &Path, table: &str, column: &str) -> bool {
    rows(db, &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"))
        == vec![vec![Value::Integer(1)]]
}

#[test]
fn devices_follow_the_gateways_schema_and_its_new_versions_while_running() {
    // The gateway is restarted with the new version: a broker that keeps its session.
    let Some(mosquitto) = OwnMosquitto::start(free_port()) else { return };
    let broker = mosquitto.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("schema");
    let (v1_file, v2_file) = (dir.path().join("v1.toml"), dir.path().join("v2.toml"));
    std::fs::write(&v1_file, V1).expect("write v1");
    std::fs::write(&v2_file, v2()).expect("write v2");
    // Devices with nothing but an initialised store: no table, nothing tracked.
    let (a, b, c) = (dir.path().join("a.db"), dir.path().join("b.db"), dir.path().join("c.db"));
    for db in [&a, &b, &c] {
        agent_ok(&["init", "--db", db.to_str().expect("utf-8"), "--role", "field"]);
    }
    // c also keeps a table of its own and tracks it by hand: not in the schema, so refused.
    exec(&c, "CREATE TABLE scratch (id TEXT PRIMARY KEY, v TEXT); INSERT INTO scratch VALUES ('s1', 'x')");
    agent_ok(&["track", "--db", c.to_str().expect("utf-8"), "scratch"]);
    let gw_db = dir.path().join("gw.db");
    let mut gw = gateway(&broker, &tenant, &gw_db, &["--schema", v1_file.to_str().expect("utf-8")]);
    let (mut agent_a, mut agent_b, mut agent_c) = (
        agent(&a, &broker, &tenant, "tab-a"),
        agent(&b, &broker, &tenant, "tab-b"),
        agent(&c, &broker, &tenant, "tab-c"),
    );
    wait_until("tables created from the schema", || [&a, &b, &c].iter().all(|d| has_table(d, "work_orders")));
    exec(&a, "INSERT INTO work_orders(id, title, parts) VALUES ('w1', 'pump', 2)");
    exec(&b, "INSERT INTO work_orders(id, title, parts) VALUES ('w2', 'valve', 1)");
    let q = "SELECT id, title, parts FROM work_orders ORDER BY id";
    let want =
        vec![vec![text("w1"), text("pump"), Value::Integer(2)], vec![text("w2"), text("valve"), Value::Integer(1)]];
    wait_until("rows on every device", || [&a, &b, &c].iter().all(|d| rows(d, q) == want));
    let status = agent_ok(&["status", "--db", c.to_str().expect("utf-8")]);
    assert!(status.contains("sync schema:     version 1"), "{status}");
    wait_until("the table outside the schema refused", || {
        agent_ok(&["status", "--db", c.to_str().expect("utf-8")]).contains("rejected:        1")
    });

    // Version 2 is loaded by a restarted gateway; the devices keep running.
    gw.kill();
    let mut gw = gateway(&broker, &tenant, &gw_db, &["--schema", v2_file.to_str().expect("utf-8")]);
    wait_until("the new column and table on every device", || {
        [&a, &b, &c].iter().all(|d| has_column(d, "work_orders", "site") && has_table(d, "notes"))
    });
    exec(&a, "UPDATE work_orders SET site = 'north', parts = parts + 1 WHERE id = 'w1'");
    exec(&b, "INSERT INTO notes VALUES ('n1', 'bring a ladder')");
    let q = "SELECT id, site, parts FROM work_orders ORDER BY id";
    let want =
        vec![vec![text("w1"), text("north"), Value::Integer(3)], vec![text("w2"), text("depot"), Value::Integer(1)]];
    wait_until("the new column syncs", || [&a, &b, &c].iter().all(|d| rows(d, q) == want));
    wait_until("the new table syncs", || rows(&c, "SELECT body FROM notes") == vec![vec![text("bring a ladder")]]);

    // The cloud copy is a real table: the back office reads it and writes it with the sqlite3
    // shell, and the write reaches the running devices with no device writing anything.
    let cloud = format!("\"{tenant}.work_orders\"");
    assert_eq!(rows(&gw_db, &format!("SELECT id, site, parts FROM {cloud} ORDER BY id")), want);
    if have_tool("sqlite3") {
        let update = format!("UPDATE {cloud} SET title = 'from the office', parts = parts + 10 WHERE id = 'w2'");
        // A well-behaved writer waits for the gateway's write lock instead of failing at once.
        let out = std::process::Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&gw_db)
            .arg(&update)
            .output()
            .expect("sqlite3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let q = "SELECT title, parts FROM work_orders WHERE id = 'w2'";
        wait_until("the office's write on every device", || {
            [&a, &b, &c].iter().all(|d| rows(d, q) == vec![vec![text("from the office"), Value::Integer(11)]])
        });
    }

    // A version that drops a column is refused at load, and the running one stays.
    gw.kill();
    std::fs::write(&v1_file, V1).expect("write v1");
    let out = std::process::Command::new(bin("driftless-gateway"))
        .args(["--db", gw_db.to_str().expect("utf-8"), "--schema", v1_file.to_str().expect("utf-8")])
        .output()
        .expect("run gateway");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("column \"work_orders\".\"site\" was dropped"), "{err}");
    for p in [&mut agent_a, &mut agent_b, &mut agent_c] {
        p.kill();
    }
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
