//! Latency: two online devices; 1,000 single-field writes on A, each timed from the write
//! until it is visible in B's table. Through Mosquitto, gateway in its own process.

use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{Store, StoreOptions, TableSpec};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, percentile, report};

const WRITES: usize = 1_000;

fn device(path: &std::path::Path) -> anyhow::Result<()> {
    let mut store = Store::open(path, StoreOptions::default())?;
    store.write(|tx| Ok(tx.execute_batch("CREATE TABLE gauges (id TEXT PRIMARY KEY, reading INTEGER)")?))?;
    store.track("gauges", TableSpec::new())?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("latency-{}", std::process::id());
    let _gateway = GatewayProcess::start(&dir.path().join("gw.db"), &url, &tenant);
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    device(&a)?;
    device(&b)?;
    let agent_a = Agent::start(AgentConfig::new(&a, &url, &tenant, "a")?, StoreOptions::default()).await?;
    let agent_b = Agent::start(AgentConfig::new(&b, &url, &tenant, "b")?, StoreOptions::default()).await?;
    let writer = rusqlite::Connection::open(&a)?;
    writer.busy_timeout(Duration::from_secs(10))?;
    let reader = rusqlite::Connection::open(&b)?;
    reader.busy_timeout(Duration::from_secs(10))?;
    writer.execute("INSERT INTO gauges VALUES ('g1', -1)", [])?;
    let seen = |want: i64| -> anyhow::Result<bool> {
        let got: Option<i64> = reader.query_row("SELECT reading FROM gauges WHERE id = 'g1'", [], |r| r.get(0)).ok();
        Ok(got == Some(want))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen(-1)? {
        anyhow::ensure!(Instant::now() < deadline, "devices never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(WRITES);
    for i in 0..WRITES as i64 {
        let t0 = Instant::now();
        writer.execute("UPDATE gauges SET reading = ?1 WHERE id = 'g1'", [i])?;
        while !seen(i)? {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "write {i} never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    agent_a.stop().await;
    agent_b.stop().await;
    samples.sort_by(f64::total_cmp);
    println!(
        "{WRITES} writes: min {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples[0],
        percentile(&samples, 50.0),
        percentile(&samples, 90.0),
        percentile(&samples, 99.0),
        samples[samples.len() - 1]
    );
    report(&[
        ("writes", WRITES as f64),
        ("p50_ms", percentile(&samples, 50.0)),
        ("p99_ms", percentile(&samples, 99.0)),
    ]);
    Ok(())
}
