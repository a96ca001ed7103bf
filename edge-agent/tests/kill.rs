//! The daemon killed with SIGKILL in the middle of draining a backlog, then restarted:
//! nothing is lost and nothing is duplicated.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec};
use driftless_gateway::{GatewayConfig, SqliteStore};

const ROWS: i64 = 30_000;
const SCHEMA: &str =
    "CREATE TABLE readings (id TEXT PRIMARY KEY, sensor TEXT, value REAL, hits INTEGER NOT NULL DEFAULT 0)";

fn spec() -> TableSpec {
    TableSpec::new().column("hits", ColumnPolicy::Counter)
}

fn device(path: &Path) {
    let mut s = Store::open(path, StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
    s.track("readings", spec()).expect("track");
}

fn pending(path: &Path) -> u64 {
    Store::open(path, StoreOptions::default()).and_then(|s| s.pending_changes()).expect("pending")
}

fn spawn_agent(db: &Path, port: u16, tenant: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_driftless-agent"))
        .args(["run", "--db"])
        .arg(db)
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}"), "--device-id", "logger", "--tenant", tenant])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn driftless-agent")
}

fn sum(db: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("timeout");
    conn.query_row("SELECT count(*), coalesce(sum(hits), 0) FROM readings", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("sum")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_drain_and_restarted_loses_and_duplicates_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    driftless_gateway::broker::start_embedded_broker(format!("127.0.0.1:{port}").parse().expect("addr"))
        .expect("broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = format!("kill-{}", std::process::id());
    let broker = driftless_core::protocol::BrokerAddr::plain("127.0.0.1", port);
    let mut config = GatewayConfig::new(broker);
    config.tenant = tenant.clone();
    let ready = config.ready.clone();
    let store = SqliteStore::open(dir.path().join("gw.db")).expect("gw");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gw = tokio::spawn(driftless_gateway::run(config, store, async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(20), ready.notified()).await.expect("gateway ready");

    // A sensor logger wrote a backlog while offline.
    let logger = dir.path().join("logger.db");
    device(&logger);
    let conn = rusqlite::Connection::open(&logger).expect("open");
    conn.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
         INSERT INTO readings SELECT printf('r%06d', i), 'temp', i * 0.5, i % 7 FROM n"
    ))
    .expect("backlog");
    drop(conn);
    let expected = sum(&logger);
    let start = pending(&logger);
    assert!(start >= ROWS as u64);

    let mut child = spawn_agent(&logger, port, &tenant);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = pending(&logger);
        if left < start && left > 0 {
            break;
        }
        assert!(left > 0, "drained before the kill; the backlog is too small to test this");
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let left_at_kill = pending(&logger);
    assert!(left_at_kill > 0 && left_at_kill < start, "killed mid-drain: {left_at_kill} of {start} left");

    let mut child = spawn_agent(&logger, port, &tenant);
    while pending(&logger) > 0 {
        assert!(Instant::now() < deadline, "the restarted agent did not finish draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("stop");
    child.wait().expect("reaped");

    // A second device receives exactly the logger's rows and counter totals.
    let reader = dir.path().join("reader.db");
    device(&reader);
    let url = format!("mqtt://127.0.0.1:{port}");
    let agent =
        Agent::start(AgentConfig::new(&reader, &url, &tenant, "reader").expect("config"), StoreOptions::default())
            .await
            .expect("agent");
    while sum(&reader) != expected {
        assert!(Instant::now() < deadline, "reader got {:?}, expected {expected:?}", sum(&reader));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    let _ = stop.send(());
    gw.await.expect("gateway task").expect("gateway");
}
