//! Cloud writes: 1,000 single-field UPDATEs made with plain SQL on the gateway's real table
//! (through a connection of this process, as a back-office tool would), each timed until it
//! is visible in an online device's table. The gateway runs in its own process with a
//! declared schema and notices the writes by watching its database file; Mosquitto in
//! between. In the same run, the same 1,000 updates made on a second device: the
//! device-to-device latency the cloud write compares with.

use std::path::Path;
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{Store, StoreOptions};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, percentile, report};

const WRITES: usize = 1_000;

const SCHEMA: &str = r#"
[[table]]
name = "gauges"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "reading"
type = "integer"
"#;

/// Times `WRITES` updates made through `write` until `reader` shows each; milliseconds.
async fn timed(write: &rusqlite::Connection, table: &str, reader: &rusqlite::Connection) -> anyhow::Result<Vec<f64>> {
    let seen = |want: i64| -> bool {
        reader.query_row("SELECT reading FROM gauges WHERE id = 'g1'", [], |r| r.get::<_, i64>(0)).ok() == Some(want)
    };
    let mut samples = Vec::with_capacity(WRITES);
    let base = 1_000_000 * (1 + i64::from(table.contains('.')));
    for i in 0..WRITES as i64 {
        let value = base + i;
        let t0 = Instant::now();
        write.execute(&format!("UPDATE {table} SET reading = ?1 WHERE id = 'g1'"), [value])?;
        while !seen(value) {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "write {i} never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

fn connect(db: &Path) -> anyhow::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("cloudwrite-{}", std::process::id());
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA)?;
    let gw_db = dir.path().join("gw.db");
    let _gateway =
        GatewayProcess::start_with(&gw_db, &url, &tenant, &["--schema", schema.to_str().expect("utf-8 path")]);
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for db in [&a, &b] {
        drop(Store::open(db, StoreOptions::default())?);
    }
    let agent_a = Agent::start(AgentConfig::new(&a, &url, &tenant, "a")?, StoreOptions::default()).await?;
    let agent_b = Agent::start(AgentConfig::new(&b, &url, &tenant, "b")?, StoreOptions::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let has_table = |db: &Path| {
        connect(db)
            .and_then(|c| {
                Ok(c.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'gauges'", [], |r| r.get::<_, i64>(0))?)
            })
            .ok()
            == Some(1)
    };
    while !(has_table(&a) && has_table(&b)) {
        anyhow::ensure!(Instant::now() < deadline, "devices never followed the schema");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (writer_a, reader_b) = (connect(&a)?, connect(&b)?);
    writer_a.execute("INSERT INTO gauges VALUES ('g1', -1)", [])?;
    let cloud = connect(&gw_db)?;
    let cloud_table = format!("\"{tenant}.gauges\"");
    while cloud.query_row(&format!("SELECT count(*) FROM {cloud_table}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0) == 0
        || reader_b.query_row("SELECT count(*) FROM gauges", [], |r| r.get::<_, i64>(0))? == 0
    {
        anyhow::ensure!(Instant::now() < deadline, "the first row never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let device = timed(&writer_a, "gauges", &reader_b).await?;
    let from_cloud = timed(&cloud, &cloud_table, &reader_b).await?;
    println!(
        "{WRITES} updates with plain SQL on the gateway's table, until visible on a device: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&from_cloud, 50.0),
        percentile(&from_cloud, 99.0)
    );
    println!(
        "the same on a device, until visible on another: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&device, 50.0),
        percentile(&device, 99.0)
    );
    agent_a.stop().await;
    agent_b.stop().await;
    report(&[
        ("p50_ms", percentile(&from_cloud, 50.0)),
        ("p99_ms", percentile(&from_cloud, 99.0)),
        ("device_p50_ms", percentile(&device, 50.0)),
        ("device_p99_ms", percentile(&device, 99.0)),
    ]);
    Ok(())
}
