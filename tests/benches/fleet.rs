//! Fleet: many simulated devices connected at once, each writing one change per second;
//! every write is timed until the gateway has merged and acknowledged it. Through Mosquitto,
//! gateway in its own process (its peak memory is reported).
//!
//! FLEET_DEVICES (default 1000) and FLEET_SECONDS (default 60) size the run.

use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig, SyncMode};
use driftless_core::{Direction, Store, StoreOptions, TableSpec};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, percentile, report};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let devices = env_usize("FLEET_DEVICES", 1_000);
    let seconds = env_usize("FLEET_SECONDS", 60);
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("fleet-{}", std::process::id());
    let gateway = GatewayProcess::start(&dir.path().join("gw.db"), &url, &tenant);

    let setup = Instant::now();
    let mut agents = Vec::with_capacity(devices);
    for d in 0..devices {
        let db = dir.path().join(format!("dev{d:04}.db"));
        let mut store = Store::open(&db, StoreOptions::default())?;
        store.write(|tx| {
            Ok(tx.execute_batch("CREATE TABLE telemetry (id TEXT PRIMARY KEY, sensor TEXT, value REAL, at INTEGER)")?)
        })?;
        // Sensor devices only report: an up-only table, so nothing is pulled back.
        store.track("telemetry", TableSpec::new().direction(Direction::UpOnly))?;
        drop(store);
        let mut config = AgentConfig::new(&db, &url, &tenant, &format!("sensor-{d:04}"))?;
        // Each write calls sync_now below, as the file watcher would; the interval is a backstop.
        config.mode = SyncMode::Interval(Duration::from_secs(30));
        agents.push(Agent::start(config, StoreOptions::default()).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while agents.iter().filter(|a| a.live().connected).count() < devices {
        anyhow::ensure!(Instant::now() < deadline, "not every device connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{devices} devices created and connected in {:.1}s", setup.elapsed().as_secs_f64());

    let start = Instant::now() + Duration::from_millis(500);
    let mut tasks = Vec::with_capacity(devices);
    for (d, agent) in agents.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(seconds);
            let mut missed = 0usize;
            // Spread devices evenly over each second, as independent clocks would.
            let offset = Duration::from_micros((d as u64 * 1_000_000) / devices as u64);
            let mut live = agent.watch_live();
            for s in 0..seconds {
                tokio::time::sleep_until((start + Duration::from_secs(s as u64) + offset).into()).await;
                let before = live.borrow().acked_batches;
                let t0 = Instant::now();
                let id = format!("{d}-{s}");
                let written = agent
                    .store()
                    .call(move |st| {
                        st.write(|tx| {
                            tx.execute(
                                "INSERT INTO telemetry VALUES (?1, 'temp', ?2, ?3)",
                                rusqlite::params![id, s as f64 * 0.1, s as i64],
                            )?;
                            Ok(())
                        })
                    })
                    .await;
                if written.is_err() || agent.sync_now().is_err() {
                    missed += 1;
                    continue;
                }
                let acked =
                    tokio::time::timeout(Duration::from_secs(10), live.wait_for(|l| l.acked_batches > before)).await;
                match acked {
                    Ok(Ok(_)) => samples.push(t0.elapsed().as_secs_f64() * 1000.0),
                    _ => missed += 1,
                }
            }
            agent.stop().await;
            (samples, missed)
        }));
    }
    let mut all = Vec::new();
    let mut missed = 0;
    for t in tasks {
        let (s, m) = t.await?;
        all.extend(s);
        missed += m;
    }
    let rss = gateway.peak_rss_mb();
    all.sort_by(f64::total_cmp);
    println!(
        "{} writes acknowledged ({missed} not within 10 s): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; gateway peak RSS {rss:.1} MiB",
        all.len(),
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(0.0)
    );
    report(&[
        ("devices", devices as f64),
        ("seconds", seconds as f64),
        ("writes_acked", all.len() as f64),
        ("writes_missed", missed as f64),
        ("p50_ms", percentile(&all, 50.0)),
        ("p99_ms", percentile(&all, 99.0)),
        ("gateway_rss_mb", rss),
    ]);
    Ok(())
}
