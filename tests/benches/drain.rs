//! Drain: a device that was offline for 100,000 field changes reconnects; time until every
//! change is merged by the gateway and acknowledged. Through Mosquitto, gateway in its own
//! process.

use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{Store, StoreOptions, TableSpec};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, report};

const ROWS: usize = 10_000;
const FIELDS: usize = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("drain-{}", std::process::id());
    let _gateway = GatewayProcess::start(&dir.path().join("gw.db"), &url, &tenant);

    let db = dir.path().join("device.db");
    let cols: Vec<String> = (0..FIELDS).map(|i| format!("f{i}")).collect();
    {
        let mut store = Store::open(&db, StoreOptions::default())?;
        let schema = format!(
            "CREATE TABLE readings (id TEXT PRIMARY KEY, {})",
            cols.iter().map(|c| format!("{c} TEXT")).collect::<Vec<_>>().join(", ")
        );
        store.write(|tx| Ok(tx.execute_batch(&schema)?))?;
        store.track("readings", TableSpec::new())?;
        // Written while offline: ROWS rows of FIELDS fields each.
        store.write(|tx| {
            let sql = format!(
                "INSERT INTO readings VALUES (?1, {})",
                (0..FIELDS).map(|i| format!("?{}", i + 2)).collect::<Vec<_>>().join(", ")
            );
            let mut stmt = tx.prepare(&sql)?;
            for r in 0..ROWS {
                let mut vals = vec![format!("{:08x}-0000-4000-8000-{:012x}", r, r * 7919)];
                vals.extend((0..FIELDS).map(|f| format!("reading {r} field {f}: {}", r * 31 + f)));
                stmt.execute(rusqlite::params_from_iter(vals))?;
            }
            Ok(())
        })?;
    }
    let field_changes = ROWS * FIELDS;
    let config = AgentConfig::new(&db, &url, &tenant, "offline-device")?;
    let start = Instant::now();
    let agent = Agent::start(config, StoreOptions::default()).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let status = agent.status().await?;
        if status.pending_changes == 0 {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "drain did not finish");
    }
    let secs = start.elapsed().as_secs_f64();
    let live = agent.live();
    agent.stop().await;
    println!(
        "{field_changes} field changes in {ROWS} rows drained in {secs:.3}s; {} batches acknowledged; {} bytes published",
        live.acked_batches, live.bytes_sent
    );
    report(&[
        ("field_changes", field_changes as f64),
        ("seconds", secs),
        ("changes_per_s", (field_changes as f64 / secs).round()),
        ("wire_bytes_total", live.bytes_sent as f64),
    ]);
    Ok(())
}
