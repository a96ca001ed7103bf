//! Scoped bootstrap: a tenant of 1,000,000 work orders in 100 regions (SQLite gateway store),
//! and a new device whose scope (`region = :region`) holds 10,000 of them. Through Mosquitto,
//! gateway in its own process, the real agent with its default page sizes: timed from the
//! agent's start until its table holds all 10,000 rows and its cursor is set. SCOPED_RUNS
//! (default 3) new devices, each of another region, one after the other; the median run is
//! reported, and the first (`first_rows_per_s`) on its own: the gateway's page cache is cold
//! for it only, as regions share the pages of the rows table.
//!
//! `bytes` is what the gateway sends for that snapshot: the same pages replayed through the
//! handler against the same store (what the gateway process ran), summed. `batch_bytes` is
//! the same rows as one zstd batch, the floor; `bytes_ratio` compares the two.
//! SCOPED_ROWS (default 1,000,000) and SCOPED_REGIONS (default 100) size the tenant.

use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig, SyncMode};
use driftless_core::codec::{EncodeOptions, Limits, encode_batch};
use driftless_core::protocol::{Downlink, Uplink, uplink_topic};
use driftless_core::write_local_upsert;
use driftless_core::{
    Batch, Dot, FieldWrite, Hlc, LocalWrite, NodeId, RowChange, RowState, Store, StoreOptions, Value,
};
use driftless_gateway::handler::{HandlerConfig, Outgoing, handle_uplink};
use driftless_gateway::storage::{Incoming, Params};
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, report};

const TENANT: &str = "scoped";
const SCHEMA: &str = r#"
[[table]]
name = "work_orders"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"
[[table.column]]
name = "title"
type = "text"
[[table.column]]
name = "site"
type = "text"
"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Row `i`: region `i % regions`, with a title and a site like a work order's.
fn row(node: NodeId, i: usize, regions: usize) -> RowChange {
    let text = |s: String| Value::Text(s);
    let at = Hlc::new(1_800_000_000_000 + i as u64, 0);
    let fields = vec![
        FieldWrite { column: "region".into(), value: text(format!("r{:03}", i % regions)), hlc: at },
        FieldWrite { column: "title".into(), value: text(format!("inspect pump {} at bay {}", i, i % 37)), hlc: at },
        FieldWrite { column: "site".into(), value: text(format!("site-{:05}", i / 250)), hlc: at },
    ];
    let mut state = RowState::default();
    write_local_upsert(
        &mut state,
        Dot { node, counter: i as u64 + 1 },
        at,
        LocalWrite { fields, counter_deltas: vec![] },
    );
    RowChange { table: "work_orders".into(), pk: vec![text(format!("wo-{i:08}"))], state }
}

/// Fills the gateway's store as the back office's loads would have, before it starts.
fn fill(store: &mut SqliteStore, rows: usize, regions: usize, region: &str) -> anyhow::Result<Batch> {
    store.install_schema(SCHEMA)?;
    let node = NodeId([7; 16]);
    let mut scope = Batch::default();
    let started = Instant::now();
    for (n, chunk) in (0..rows).collect::<Vec<_>>().chunks(5_000).enumerate() {
        let batch = Batch { roles: Default::default(), rows: chunk.iter().map(|&i| row(node, i, regions)).collect() };
        scope.rows.extend(
            batch
                .rows
                .iter()
                .filter(|r| r.state.fields["region"].entries[0].value == Value::Text(region.into()))
                .cloned(),
        );
        let from = Incoming {
            tenant: TENANT,
            device: "loader",
            first_seq: n as i64 + 1,
            last_seq: n as i64 + 1,
            now_ms: 1_800_000_000_000 + rows as u64,
            max_drift_ms: u64::MAX / 4,
            role: None,
            recovering: false,
            legacy: false,
            scope: None,
        };
        let merged = store.merge(&from, &batch).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(merged.applied == chunk.len(), "loaded {} of {}", merged.applied, chunk.len());
    }
    println!("loaded {rows} rows in {regions} regions in {:.1} s", started.elapsed().as_secs_f64());
    Ok(scope)
}

/// The snapshot pages the gateway serves the device, replayed through the handler: their
/// bytes on the wire.
fn replay(store: &mut SqliteStore, device: &str, agent: &AgentConfig) -> anyhow::Result<(usize, usize)> {
    let cfg = HandlerConfig::default();
    let (mut bytes, mut rows) = (0, 0);
    let epoch = store.epoch(TENANT)?;
    let head = store.log_head(TENANT)?;
    let mut resume = Vec::new();
    loop {
        let msg = Uplink::PullSnapshot {
            device: device.into(),
            epoch,
            resume: resume.clone(),
            log_cursor: head,
            max_rows: agent.pull_rows,
            max_bytes: agent.max_message_bytes as u32,
            name_from: true,
            echo: Some(0),
        };
        let out = handle_uplink(store, &cfg, &uplink_topic(TENANT, device), &msg.encode(), 1_800_000_000_000)?;
        // Every message of the answer counts (the first page comes after the snapshot's size).
        let mut page = None;
        for o in out {
            let Outgoing::Reply { payload, .. } = o else { continue };
            bytes += payload.len();
            if let Downlink::Snapshot { resume, done, batch, .. } = Downlink::decode(&payload, &Limits::default())? {
                page = Some((resume, done, batch));
            }
        }
        let Some((next, done, batch)) = page else { anyhow::bail!("no snapshot page") };
        rows += driftless_core::codec::decode_batch(&batch, &Limits::default(), &Default::default())?.rows.len();
        if done {
            return Ok((bytes, rows));
        }
        resume = next;
    }
}

/// A read-only connection to watch the device's table with: opened once, as opening one
/// every few milliseconds (its schema parsed each time) would take CPU from what is measured.
fn watch(db: &std::path::Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn held(watch: &rusqlite::Connection) -> i64 {
    watch
        .prepare_cached("SELECT count(*) FROM work_orders")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .unwrap_or(0)
}

/// One new device of `region` bootstrapped through the gateway: seconds until its table holds
/// its `want` rows and its cursor is set, and the gateway's CPU seconds meanwhile.
async fn bootstrap(
    gateway: &GatewayProcess,
    config: &AgentConfig,
    db: &std::path::Path,
    want: i64,
) -> anyhow::Result<(f64, f64)> {
    drop(Store::open(db, StoreOptions::default())?);
    let started = Instant::now();
    let cpu_before = gateway.cpu_seconds();
    let agent = Agent::start(config.clone(), StoreOptions::default()).await?;
    let watcher = watch(db)?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let done = held(&watcher) >= want && {
            let store = Store::open(db, StoreOptions::default())?;
            store.cursor()?.0.is_some()
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let got = held(&watcher);
    let gateway_cpu = gateway.cpu_seconds() - cpu_before;
    agent.stop().await;
    anyhow::ensure!(got == want, "the device holds {got} rows of its {want}");
    Ok((seconds, gateway_cpu))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (rows, regions) = (env_usize("SCOPED_ROWS", 1_000_000), env_usize("SCOPED_REGIONS", 100));
    // Each run is a new device of another region (no snapshot size the gateway kept for one
    // helps the next, but the rows table's pages it read are cached); the median run is
    // reported, as this machine is shared and noisy, and the first, cold, on its own.
    let runs = env_usize("SCOPED_RUNS", 3).max(1);
    let dir = tempfile::tempdir()?;
    let gw_db = dir.path().join("gw.db");
    let schema_file = dir.path().join("schema.toml");
    std::fs::write(&schema_file, SCHEMA)?;
    let mut store = SqliteStore::open(&gw_db)?;
    // The first new device's region: r042 of the default 100, then the next ones.
    let region_of = |k: usize| (42 + k) % regions;
    let scope = fill(&mut store, rows, regions, &format!("r{:03}", region_of(0)))?;
    for k in 0..runs {
        let device = format!("tab-new-{k}");
        store.register_device(TENANT, &device, "", None, 1)?;
        let params: Params = [("region".to_owned(), format!("r{:03}", region_of(k)))].into();
        store.set_params(TENANT, &device, &params)?;
    }
    drop(store);
    // Row i is of region i % regions.
    let want_of = |k: usize| (rows / regions + usize::from(region_of(k) < rows % regions)) as i64;
    anyhow::ensure!(want_of(0) == scope.rows.len() as i64, "the first region's rows miscounted");

    let url = bench_broker_url();
    let gateway = GatewayProcess::start_with(&gw_db, &url, TENANT, &["--schema", schema_file.to_str().expect("utf-8")]);
    let mut timed = Vec::new();
    for k in 0..runs {
        let device = format!("tab-new-{k}");
        let db = dir.path().join(format!("{device}.db"));
        let mut config = AgentConfig::new(&db, &url, TENANT, &device)?;
        config.mode = SyncMode::Notified;
        let (seconds, cpu) = bootstrap(&gateway, &config, &db, want_of(k)).await?;
        println!("run {k}: {} rows in {seconds:.3} s ({:.0} rows/s)", want_of(k), want_of(k) as f64 / seconds);
        timed.push((seconds, cpu, want_of(k)));
    }
    drop(gateway);
    let first_rows_per_s = timed[0].2 as f64 / timed[0].0;
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, gateway_cpu, want) = timed[timed.len() / 2];

    let mut store = SqliteStore::open(&gw_db)?;
    let config = AgentConfig::new(dir.path().join("tab-new-0.db"), &url, TENANT, "tab-new-0")?;
    let (bytes, served) = replay(&mut store, "tab-new-0", &config)?;
    anyhow::ensure!(served == scope.rows.len(), "the replay served {served} rows of {}", scope.rows.len());
    let batch_bytes = encode_batch(&scope, EncodeOptions::default()).len();
    println!(
        "median of {runs}: {want} of {rows} rows reached a new device in {seconds:.2} s ({:.0} rows/s); {bytes} bytes \
         on the wire, {batch_bytes} as one zstd batch; gateway CPU {gateway_cpu:.2} s",
        want as f64 / seconds
    );
    report(&[
        ("rows", want as f64),
        ("tenant_rows", rows as f64),
        ("runs", runs as f64),
        ("rows_per_s", want as f64 / seconds),
        ("first_rows_per_s", first_rows_per_s),
        ("seconds_to_complete", seconds),
        ("bytes", bytes as f64),
        ("batch_bytes", batch_bytes as f64),
        ("bytes_ratio", bytes as f64 / batch_bytes as f64),
        ("gateway_cpu_s", gateway_cpu),
    ]);
    Ok(())
}
