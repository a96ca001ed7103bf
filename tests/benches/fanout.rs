//! Fan-out: N bidirectional devices in one tenant (its one default scope), each writing a new
//! row every 2 s; 5 more devices observe, timing every write from the moment it was made
//! until it is in their table. Every device holds every row, so each write reaches N + 4
//! other devices. Through Mosquitto, gateway in its own process (its CPU time is reported).
//!
//! FANOUT_DEVICES (default 200), FANOUT_SECONDS (default 30) and FANOUT_EVERY_S (default 2,
//! the period of each device's writes) size the run. `fleet_cpu_s` is the CPU the simulated
//! devices used (this process): on a machine of few cores they compete with the gateway and
//! the broker, which real devices, each on its own hardware, do not.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig, SyncMode};
use driftless_core::{Store, StoreOptions, TableSpec};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, cpu_seconds, percentile, report};

const OBSERVERS: usize = 5;
/// How long after the last write observers keep looking for the stragglers.
const DRAIN: Duration = Duration::from_secs(20);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// When each write was made, by row id.
type Written = Arc<Mutex<HashMap<String, Instant>>>;

async fn device(dir: &std::path::Path, url: &str, tenant: &str, name: &str) -> anyhow::Result<(Agent, PathBuf)> {
    let db = dir.join(format!("{name}.db"));
    let mut store = Store::open(&db, StoreOptions::default())?;
    store.write(|tx| Ok(tx.execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, writer TEXT, n INTEGER)")?))?;
    store.track("orders", TableSpec::new())?;
    drop(store);
    let mut config = AgentConfig::new(&db, url, tenant, name)?;
    // The app says when it wrote (a file watcher each would take more inotify instances than
    // one process may have).
    config.mode = SyncMode::Notified;
    Ok((Agent::start(config, StoreOptions::default()).await?, db))
}

/// Polls an observer's table for rows it has not seen yet; returns the delay of each write
/// it saw, by the time it saw it.
fn observe(db: PathBuf, written: Written, expected: usize, until: Instant) -> anyhow::Result<Vec<f64>> {
    let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare("SELECT rowid, id FROM orders WHERE rowid > ?1 ORDER BY rowid")?;
    let (mut last, mut delays) = (0i64, Vec::with_capacity(expected));
    while delays.len() < expected && Instant::now() < until {
        let rows: Vec<(i64, String)> =
            stmt.query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        let now = Instant::now();
        let written = written.lock().expect("lock");
        for (rowid, id) in rows {
            last = last.max(rowid);
            if let Some(at) = written.get(&id) {
                delays.push(now.duration_since(*at).as_secs_f64() * 1000.0);
            }
        }
        drop(written);
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(delays)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let devices = env_usize("FANOUT_DEVICES", 200);
    let seconds = env_usize("FANOUT_SECONDS", 30);
    let every = Duration::from_secs(env_usize("FANOUT_EVERY_S", 2) as u64);
    let rounds = (seconds as u64 / every.as_secs().max(1)).max(1) as usize;
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("fanout-{}", std::process::id());
    let gateway = GatewayProcess::start(&dir.path().join("gw.db"), &url, &tenant);

    let setup = Instant::now();
    let mut writers = Vec::with_capacity(devices);
    for d in 0..devices {
        writers.push(device(dir.path(), &url, &tenant, &format!("w{d:04}")).await?.0);
    }
    let mut observers = Vec::with_capacity(OBSERVERS);
    for o in 0..OBSERVERS {
        observers.push(device(dir.path(), &url, &tenant, &format!("observer{o}")).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while writers.iter().chain(observers.iter().map(|(a, _)| a)).filter(|a| a.live().confirmed).count()
        < devices + OBSERVERS
    {
        anyhow::ensure!(Instant::now() < deadline, "not every device connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{} devices created and connected in {:.1}s", devices + OBSERVERS, setup.elapsed().as_secs_f64());

    let written: Written = Arc::new(Mutex::new(HashMap::new()));
    let expected = devices * rounds;
    let start = Instant::now() + Duration::from_millis(500);
    let until = start + every * rounds as u32 + DRAIN;
    let watching: Vec<_> = observers
        .iter()
        .map(|(_, db)| {
            let (db, written) = (db.clone(), written.clone());
            std::thread::spawn(move || observe(db, written, expected, until))
        })
        .collect();
    let cpu_before = gateway.cpu_seconds();
    let fleet_before = cpu_seconds("self");
    let mut tasks = Vec::with_capacity(devices);
    for (d, agent) in writers.into_iter().enumerate() {
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            // Writers spread evenly over each period, as independent clocks would be.
            let offset = every.mul_f64(d as f64 / devices as f64);
            for round in 0..rounds {
                tokio::time::sleep_until((start + every * round as u32 + offset).into()).await;
                let id = format!("w{d}-{round}");
                written.lock().expect("lock").insert(id.clone(), Instant::now());
                let who = format!("w{d}");
                let wrote = agent
                    .store()
                    .call(move |st| {
                        st.write(|tx| {
                            tx.execute(
                                "INSERT INTO orders VALUES (?1, ?2, ?3)",
                                rusqlite::params![id, who, round as i64],
                            )?;
                            Ok(())
                        })
                    })
                    .await;
                wrote??;
                agent.local_change()?;
            }
            anyhow::Ok(agent)
        }));
    }
    let mut agents = Vec::with_capacity(devices);
    for t in tasks {
        agents.push(t.await??);
    }
    let mut delays = Vec::new();
    for w in watching {
        delays.extend(w.join().map_err(|_| anyhow::anyhow!("an observer panicked"))??);
    }
    let cpu = gateway.cpu_seconds() - cpu_before;
    let fleet_cpu = cpu_seconds("self") - fleet_before;
    for agent in agents.into_iter().chain(observers.into_iter().map(|(a, _)| a)) {
        agent.stop().await;
    }
    delays.sort_by(f64::total_cmp);
    let seen_fraction = delays.len() as f64 / (expected * OBSERVERS) as f64;
    println!(
        "{devices} writers x {rounds} writes, {OBSERVERS} observers: seen {:.4} of them; p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; gateway CPU {cpu:.1} s, devices' CPU {fleet_cpu:.1} s",
        seen_fraction,
        percentile(&delays, 50.0),
        percentile(&delays, 90.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(0.0)
    );
    report(&[
        ("devices", devices as f64),
        ("writes", expected as f64),
        ("p50_ms", percentile(&delays, 50.0)),
        ("p99_ms", percentile(&delays, 99.0)),
        ("gateway_cpu_s", cpu),
        ("fleet_cpu_s", fleet_cpu),
        ("seen_fraction", seen_fraction),
    ]);
    Ok(())
}
