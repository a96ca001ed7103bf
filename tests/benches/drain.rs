//! Drain: a device that was offline for 100,000 field changes reconnects; time until every
//! change is merged by the gateway and acknowledged. Through Mosquitto, gateway in its own
//! process.
//!
//! In the same run, the same outbox is merged into a gateway store directly (decoded and
//! merged in this process: the gateway's own work without broker, agent or round trips):
//! `drain_vs_raw` is the drain time over that time.

use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::{Store, StoreOptions};
use driftless_gateway::storage::Incoming;
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, offline_device, report};

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
    // Written while offline: ROWS rows of FIELDS fields each.
    offline_device(&db, ROWS, FIELDS)?;
    // The same offline outbox, for the direct merge.
    let copy = dir.path().join("device-copy.db");
    rusqlite::Connection::open(&db)?.execute("VACUUM INTO ?1", [copy.to_str().expect("utf-8 path")])?;
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
    let direct = merge_directly(&copy, &dir.path().join("gw-direct.db"), None)?;
    println!("the same outbox decoded and merged into a gateway store directly in {direct:.3}s");
    // And into a store with the table declared, which also writes it as a real table.
    let mut schema = String::from(
        "[[table]]\nname = \"readings\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n",
    );
    for c in &cols {
        schema.push_str(&format!("[[table.column]]\nname = \"{c}\"\ntype = \"text\"\n"));
    }
    let declared = merge_directly(&copy, &dir.path().join("gw-declared.db"), Some(&schema))?;
    println!("the same, under a declared schema (real tables written too), in {declared:.3}s");
    report(&[
        ("field_changes", field_changes as f64),
        ("seconds", secs),
        ("changes_per_s", (field_changes as f64 / secs).round()),
        ("wire_bytes_total", live.bytes_sent as f64),
        ("direct_merge_seconds", direct),
        ("drain_vs_raw", (secs / direct * 100.0).round() / 100.0),
        ("direct_merge_declared_seconds", declared),
        ("declared_vs_plain", (declared / direct * 100.0).round() / 100.0),
    ]);
    Ok(())
}

/// Seals the outbox of `device`, then times decoding its batches (500 rows, as the agent
/// sends them) and merging them into a new gateway store at `gateway`, with `schema` loaded.
fn merge_directly(device: &std::path::Path, gateway: &std::path::Path, schema: Option<&str>) -> anyhow::Result<f64> {
    let mut store = Store::open(device, StoreOptions::default())?;
    store.seal()?;
    let mut batches = Vec::new();
    let mut after = 0;
    while let Some(ob) = store.outbox_batch_after(after, 500)? {
        after = ob.last_seq;
        batches.push((ob.first_seq, ob.last_seq, encode_batch(&ob.batch, EncodeOptions::default())));
    }
    let mut gw = SqliteStore::open(gateway)?;
    if let Some(text) = schema {
        gw.install_schema(text)?;
    }
    let now_ms = std::time::UNIX_EPOCH.elapsed()?.as_millis() as u64;
    let start = Instant::now();
    for (first_seq, last_seq, bytes) in &batches {
        let batch = decode_batch(bytes, &Limits::default(), &Dictionaries::default())?;
        let from = Incoming {
            tenant: "direct",
            device: "offline-device",
            first_seq: *first_seq,
            last_seq: *last_seq,
            now_ms,
            max_drift_ms: 300_000,
            role: None,
            recovering: false,
            legacy: false,
            scope: None,
        };
        gw.merge(&from, &batch).map_err(|e| anyhow::anyhow!("merge: {e}"))?;
    }
    Ok(start.elapsed().as_secs_f64())
}
