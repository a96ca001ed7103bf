//! Cloud drain: the `drain` workload (a device offline for 100,000 field changes in 10,000
//! rows reconnects; time until every change is merged and acknowledged) through Mosquitto,
//! three times in one run on copies of the same outbox: one gateway on the SQLite store, one
//! gateway on the PostgreSQL store, and two gateways sharing the uplinks on one PostgreSQL
//! database. Gateways run in their own processes.

use std::path::Path;
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{Store, StoreOptions};
use driftless_gateway::storage::testing::TestDb;
use driftless_tests::bench::{GatewayProcess, bench_broker_url, offline_device, report};

const ROWS: usize = 10_000;
const FIELDS: usize = 10;

/// Connects the device and times its drain; changes per second.
async fn drain(db: &Path, url: &str, tenant: &str) -> anyhow::Result<f64> {
    let config = AgentConfig::new(db, url, tenant, "offline-device")?;
    let start = Instant::now();
    let agent = Agent::start(config, StoreOptions::default()).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if agent.status().await?.pending_changes == 0 {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(900), "drain did not finish");
    }
    let secs = start.elapsed().as_secs_f64();
    agent.stop().await;
    Ok((ROWS * FIELDS) as f64 / secs)
}

fn main() -> anyhow::Result<()> {
    // The PostgreSQL client blocks: its database is made and dropped outside the runtime.
    let db = TestDb::new().ok_or_else(|| anyhow::anyhow!("set DRIFTLESS_TEST_PG_URL (scripts/bench does)"))?;
    if std::env::var_os("CLOUD_DRAIN_DIRECT").is_some() {
        return direct(&db);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(&db.url()))
}

/// The same outbox merged into each store in this process, without broker or agent.
fn direct(db: &TestDb) -> anyhow::Result<()> {
    use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
    use driftless_gateway::GatewayStore;
    let dir = tempfile::tempdir()?;
    let device = dir.path().join("device.db");
    offline_device(&device, ROWS, FIELDS)?;
    let mut store = Store::open(&device, StoreOptions::default())?;
    store.seal()?;
    let mut batches = Vec::new();
    let mut after = 0;
    while let Some(ob) = store.outbox_batch_after(after, 500)? {
        after = ob.last_seq;
        batches.push((ob.first_seq, ob.last_seq, encode_batch(&ob.batch, EncodeOptions::default())));
    }
    let stores: Vec<(&str, Box<dyn GatewayStore>)> = vec![
        ("sqlite", Box::new(driftless_gateway::SqliteStore::open(dir.path().join("gw.db"))?)),
        ("pg", Box::new(db.store())),
    ];
    for (name, mut gw) in stores {
        let start = Instant::now();
        for (first_seq, last_seq, bytes) in &batches {
            let batch = decode_batch(bytes, &Limits::default(), &Dictionaries::default())?;
            let from = driftless_gateway::storage::Incoming {
                tenant: "direct",
                device: "offline-device",
                first_seq: *first_seq,
                last_seq: *last_seq,
                now_ms: 1_800_000_000_000,
                max_drift_ms: 300_000,
                role: None,
                recovering: false,
                legacy: false,
                scope: None,
            };
            let t = Instant::now();
            gw.merge(&from, &batch).map_err(|e| anyhow::anyhow!("merge: {e}"))?;
            eprintln!("{name}: batch of {} rows merged in {:?}", batch.rows.len(), t.elapsed());
        }
        println!("{name}: merged directly in {:.3}s", start.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn run(store: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let run = std::process::id();
    let original = dir.path().join("device.db");
    offline_device(&original, ROWS, FIELDS)?;
    let copy = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let to = dir.path().join(name);
        rusqlite::Connection::open(&original)?.execute("VACUUM INTO ?1", [to.to_str().expect("utf-8 path")])?;
        Ok(to)
    };

    let sqlite = {
        let tenant = format!("cloud-drain-sqlite-{run}");
        let _gw = GatewayProcess::start(&dir.path().join("gw.db"), &url, &tenant);
        drain(&copy("sqlite.db")?, &url, &tenant).await?
    };
    println!("one gateway, SQLite store: {sqlite:.0} changes/s");

    let pg = {
        let tenant = format!("cloud-drain-pg-{run}");
        let _gw = GatewayProcess::start_with(&dir.path().join("unused.db"), &url, &tenant, &["--store", store]);
        drain(&copy("pg.db")?, &url, &tenant).await?
    };
    println!("one gateway, PostgreSQL store: {pg:.0} changes/s");

    let pg2 = {
        let tenant = format!("cloud-drain-pg2-{run}");
        let unused = dir.path().join("unused.db");
        let _one = GatewayProcess::start_as(&format!("one-{tenant}"), &unused, &url, &tenant, &["--store", store]);
        let _two = GatewayProcess::start_as(&format!("two-{tenant}"), &unused, &url, &tenant, &["--store", store]);
        drain(&copy("pg2.db")?, &url, &tenant).await?
    };
    println!("two gateways, one PostgreSQL database: {pg2:.0} changes/s");
    report(&[
        ("sqlite_changes_per_s", sqlite.round()),
        ("pg_changes_per_s", pg.round()),
        ("pg2_changes_per_s", pg2.round()),
        ("pg_vs_sqlite", (pg / sqlite * 100.0).round() / 100.0),
        ("pg2_vs_pg", (pg2 / pg * 100.0).round() / 100.0),
    ]);
    Ok(())
}
