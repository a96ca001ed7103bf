//! Fan-out: N bidirectional devices in one tenant (its one default scope), each writing a new
//! row every 2 s; 5 more devices observe, timing every write from the moment it was made
//! until it is in their table. Every device holds every row, so each write reaches N + 4
//! other devices. Through Mosquitto, gateway in its own process (its CPU time is reported).
//!
//! FANOUT_DEVICES (default 200), FANOUT_SECONDS (default 30) and FANOUT_EVERY_S (default 2,
//! the period of each device's writes) size the run. With FANOUT_REGIONS = R (default 0: no
//! scope), the gateway serves a schema scoping `orders` by `region = :region`, the writers
//! are registered in R regions in turn and the observers in region 0: each write reaches the
//! devices of its region only, and the observers time the writes of their region (they must
//! see no other: `foreign_rows`). `fleet_cpu_s` is the CPU the simulated
//! devices used (this process): on a machine of few cores they compete with the gateway and
//! the broker, which real devices, each on its own hardware, do not. So once the gateway has
//! started, this process lowers its own CPU priority to nice FANOUT_FLEET_NICE (default 10;
//! 0 keeps it equal): the devices still do all their work, on whatever the gateway and the
//! broker leave of the cores (`fleet_nice` in the report). `write_lag_p99_ms`: how late the
//! writes were made after their planned moments (a fleet too busy to write on time offers
//! less load than planned).
//!
//! The gateway's database is on disk, synced at every group commit as in production; the
//! devices' databases are in /dev/shm unless FANOUT_DEVICE_DIR names another place. A client
//! subscribed to all of the tenant's topics times each write's batch at the broker, its ack
//! and its feed, so a slow write shows where it waited (`ship_p99_ms`: write to batch at the
//! broker; `feed_p99_ms`: write to the gateway's feed of it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig, SyncMode};
use driftless_core::codec::Limits;
use driftless_core::protocol::{BrokerAddr, Downlink, Uplink};
use driftless_core::{Store, StoreOptions, TableSpec};
use driftless_gateway::{GatewayStore as _, SqliteStore};
use driftless_tests::bench::{GatewayProcess, bench_broker_url, cpu_seconds, lower_priority, percentile, report};

const OBSERVERS: usize = 5;
/// Where the simulated devices' databases go by default: hundreds of SQLite databases
/// checkpointing together on the gateway's disk stall its commits (its fsyncs), a contention
/// real devices, each on its own storage, do not cause.
const SHARED_MEMORY: &str = "/dev/shm";
/// How long after the last write observers keep looking for the stragglers.
const DRAIN: Duration = Duration::from_secs(20);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// When each write was made, by row id.
type Written = Arc<Mutex<HashMap<String, Instant>>>;

/// The schema of a scoped run: orders by region.
const SCOPED: &str = r#"
[[table]]
name = "orders"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "writer"
type = "text"
[[table.column]]
name = "n"
type = "integer"
[[table.column]]
name = "region"
type = "text"
"#;

/// A device's agent; its table made and tracked by hand, or, in a scoped run, made when the
/// gateway's schema arrives.
async fn device(
    dir: &std::path::Path,
    url: &str,
    tenant: &str,
    name: &str,
    scoped: bool,
) -> anyhow::Result<(Agent, PathBuf)> {
    let db = dir.join(format!("{name}.db"));
    let mut store = Store::open(&db, StoreOptions::default())?;
    if !scoped {
        store.write(|tx| {
            Ok(tx.execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, writer TEXT, n INTEGER, region TEXT)")?)
        })?;
        store.track("orders", TableSpec::new())?;
    }
    drop(store);
    let mut config = AgentConfig::new(&db, url, tenant, name)?;
    // The app says when it wrote (a file watcher each would take more inotify instances than
    // one process may have).
    config.mode = SyncMode::Notified;
    Ok((Agent::start(config, StoreOptions::default()).await?, db))
}

/// Whether the device's table exists yet.
fn has_orders(db: &std::path::Path) -> bool {
    rusqlite::Connection::open(db).is_ok_and(|c| c.prepare("SELECT 1 FROM orders").is_ok())
}

/// What the broker carried, as a client subscribed to all of the tenant's topics saw it.
enum Seen {
    Batch(String),
    Pull,
    Ack(String),
    Feed { origin: String },
}

/// What the sniffer saw, in the order it arrived.
type Sniffed = Arc<Mutex<Vec<(Instant, Seen)>>>;

/// Every message of the tenant, timed on arrival by a client on its own thread (the devices'
/// runtime being busy does not delay its clock): where each slow write spent its time.
fn sniff(url: &str, tenant: &str) -> anyhow::Result<Sniffed> {
    let broker: BrokerAddr = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (log, filter) = (seen.clone(), format!("driftless/{tenant}/#"));
    let mut opts = rumqttc::MqttOptions::new(format!("sniff-{}", std::process::id()), &broker.host, broker.port);
    opts.set_max_packet_size(1 << 22, 1 << 22);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10_000);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let _client = client.subscribe(filter, rumqttc::QoS::AtMostOnce).await.map(|()| client);
            let limits = Limits::default();
            loop {
                let p = match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    // Not a spin on a broken connection; the run then fails on an empty trace.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let now = Instant::now();
                let device = p.topic.split('/').nth(2).unwrap_or_default().to_owned();
                let what = if p.topic.ends_with("/up") {
                    match Uplink::decode(&p.payload, &limits) {
                        Ok(Uplink::Batch { .. }) => Seen::Batch(device),
                        Ok(Uplink::Pull { .. }) => Seen::Pull,
                        _ => continue,
                    }
                } else {
                    match Downlink::decode(&p.payload, &limits) {
                        Ok(Downlink::Ack { .. }) => Seen::Ack(device),
                        Ok(Downlink::Feed { origin, .. }) => Seen::Feed { origin },
                        _ => continue,
                    }
                };
                log.lock().expect("lock").push((now, what));
            }
        });
    });
    Ok(seen)
}

/// For a write made at `at` by `device`: when the broker saw its batch, the gateway's ack and
/// the gateway's feed of it, in ms after the write (the first of each after it).
fn stages(seen: &[(Instant, Seen)], device: &str, at: Instant) -> [Option<f64>; 3] {
    let ms = |t: Instant| t.duration_since(at).as_secs_f64() * 1e3;
    let after = seen.iter().filter(|(t, _)| *t >= at);
    let batch = after.clone().find(|(_, s)| matches!(s, Seen::Batch(d) if d == device)).map(|(t, _)| *t);
    let from = |pick: &dyn Fn(&Seen) -> bool| {
        batch.and_then(|b| seen.iter().find(|(t, s)| *t >= b && pick(s)).map(|(t, _)| ms(*t)))
    };
    [
        batch.map(ms),
        from(&|s| matches!(s, Seen::Ack(d) if d == device)),
        from(&|s| matches!(s, Seen::Feed { origin } if origin == device)),
    ]
}

/// Each observed write's stages: the delays until its batch reached the broker and until its
/// feed left the gateway (sorted), and a table of the ten slowest writes.
fn trace(
    seen: &[(Instant, Seen)],
    written: &HashMap<String, Instant>,
    observed: &[(String, f64)],
) -> (Vec<f64>, Vec<f64>, String) {
    let mut slowest: HashMap<&str, f64> = HashMap::new();
    for (id, ms) in observed {
        let worst = slowest.entry(id).or_default();
        *worst = worst.max(*ms);
    }
    let (mut ship, mut feed, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (id, at) in written {
        // Row ids are `w{writer}-{round}`; the writer's device is `w{writer:04}`.
        let Some(device) = id.split('-').next().and_then(|w| w.strip_prefix('w')?.parse::<usize>().ok()) else {
            continue;
        };
        let [batch, ack, fed] = stages(seen, &format!("w{device:04}"), *at);
        ship.extend(batch);
        feed.extend(fed);
        rows.push((slowest.get(id.as_str()).copied().unwrap_or(f64::INFINITY), id, batch, ack, fed));
    }
    ship.sort_by(f64::total_cmp);
    feed.sort_by(f64::total_cmp);
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let show = |v: Option<f64>| v.map_or("-".to_owned(), |ms| format!("{ms:.1}"));
    let table = rows
        .iter()
        .take(10)
        .map(|(worst, id, b, a, f)| format!("  {id}: {}, {}, {}; {worst:.1}", show(*b), show(*a), show(*f)))
        .collect::<Vec<_>>()
        .join("\n");
    (ship, feed, table)
}

/// Polls an observer's table for rows it has not seen yet; returns the delay of each write
/// it saw (row id and ms), by the time it saw it.
fn observe(db: PathBuf, written: Written, expected: usize, until: Instant) -> anyhow::Result<Vec<(String, f64)>> {
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
                delays.push((id, now.duration_since(*at).as_secs_f64() * 1000.0));
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
    // The simulated devices' databases: not on the gateway's disk unless asked
    // (FANOUT_DEVICE_DIR), since real devices each have storage of their own.
    let devices_dir = match std::env::var_os("FANOUT_DEVICE_DIR") {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None if std::path::Path::new(SHARED_MEMORY).is_dir() => tempfile::tempdir_in(SHARED_MEMORY)?,
        None => tempfile::tempdir()?,
    };
    let url = bench_broker_url();
    let regions = env_usize("FANOUT_REGIONS", 0);
    let scoped = regions > 0;
    let region = move |d: usize| if scoped { format!("r{}", d % regions) } else { String::new() };
    let tenant = format!("fanout-{}", std::process::id());
    let gw_db = dir.path().join("gw.db");
    let gateway = if scoped {
        // Every device registered with its region before the gateway starts.
        let mut store = SqliteStore::open(&gw_db)?;
        let names = (0..devices).map(|d| (format!("w{d:04}"), region(d)));
        for (name, region) in names.chain((0..OBSERVERS).map(|o| (format!("observer{o}"), "r0".to_owned()))) {
            store.register_device(&tenant, &name, "", None, 1)?;
            store.set_params(&tenant, &name, &[("region".to_owned(), region)].into())?;
        }
        drop(store);
        let schema = dir.path().join("schema.toml");
        std::fs::write(&schema, SCOPED)?;
        GatewayProcess::start_with(&gw_db, &url, &tenant, &["--schema", schema.to_str().unwrap_or_default()])
    } else {
        GatewayProcess::start(&gw_db, &url, &tenant)
    };
    // The simulated fleet yields the cores to the gateway and the broker (started before, so
    // they keep their priority) as real devices, each on its own hardware, would.
    let nice = env_usize("FANOUT_FLEET_NICE", 10) as u32;
    if nice > 0 {
        lower_priority(nice)?;
    }

    let setup = Instant::now();
    let mut writers = Vec::with_capacity(devices);
    let mut dbs = Vec::new();
    for d in 0..devices {
        let (agent, db) = device(devices_dir.path(), &url, &tenant, &format!("w{d:04}"), scoped).await?;
        writers.push(agent);
        dbs.push(db);
    }
    let mut observers = Vec::with_capacity(OBSERVERS);
    for o in 0..OBSERVERS {
        let observer = device(devices_dir.path(), &url, &tenant, &format!("observer{o}"), scoped).await?;
        dbs.push(observer.1.clone());
        observers.push(observer);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while writers.iter().chain(observers.iter().map(|(a, _)| a)).filter(|a| a.live().confirmed).count()
        < devices + OBSERVERS
    {
        anyhow::ensure!(Instant::now() < deadline, "not every device connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // In a scoped run the tables come with the schema, just after the handshake.
    while !dbs.iter().all(|db| has_orders(db)) {
        anyhow::ensure!(Instant::now() < deadline, "not every device took the schema");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{} devices created and connected in {:.1}s", devices + OBSERVERS, setup.elapsed().as_secs_f64());

    let sniffed = sniff(&url, &tenant)?;
    let written: Written = Arc::new(Mutex::new(HashMap::new()));
    // What the observers (region 0) are to see.
    let expected = (0..devices).filter(|&d| region(d) == region(0)).count() * rounds;
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
    // How late each write was made after its planned moment: a fleet too busy to write on
    // time offers less load than planned, which the delays alone would not show.
    let lags: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    for (d, agent) in writers.into_iter().enumerate() {
        let (written, lags) = (written.clone(), lags.clone());
        tasks.push(tokio::spawn(async move {
            // Writers spread evenly over each period, as independent clocks would be.
            let offset = every.mul_f64(d as f64 / devices as f64);
            for round in 0..rounds {
                let planned = start + every * round as u32 + offset;
                tokio::time::sleep_until(planned.into()).await;
                lags.lock().expect("lock").push(planned.elapsed().as_secs_f64() * 1e3);
                let id = format!("w{d}-{round}");
                if region(d) == region(0) {
                    written.lock().expect("lock").insert(id.clone(), Instant::now());
                }
                let (who, region) = (format!("w{d}"), region(d));
                let wrote = agent
                    .store()
                    .call(move |st| {
                        st.write(|tx| {
                            tx.execute(
                                "INSERT INTO orders(id, writer, n, region) VALUES (?1, ?2, ?3, ?4)",
                                rusqlite::params![id, who, round as i64, region],
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
    let mut seen_by = Vec::new();
    for w in watching {
        seen_by.extend(w.join().map_err(|_| anyhow::anyhow!("an observer panicked"))??);
    }
    let mut delays: Vec<f64> = seen_by.iter().map(|(_, ms)| *ms).collect();
    let mut lags = std::mem::take(&mut *lags.lock().expect("lock"));
    lags.sort_by(f64::total_cmp);
    let cpu = gateway.cpu_seconds() - cpu_before;
    let fleet_cpu = cpu_seconds("self") - fleet_before;
    // Rows of other regions on the observers (none may reach them).
    let mut foreign_rows = 0;
    for (_, db) in &observers {
        let conn = rusqlite::Connection::open(db)?;
        let sql = "SELECT count(*) FROM orders WHERE coalesce(region, '') <> ?1";
        foreign_rows += conn.query_row(sql, [region(0)], |r| r.get::<_, i64>(0))?;
    }
    for agent in agents.into_iter().chain(observers.into_iter().map(|(a, _)| a)) {
        agent.stop().await;
    }
    delays.sort_by(f64::total_cmp);
    // Stage times from a trace that missed the run would read as zero, not as unknown.
    anyhow::ensure!(!sniffed.lock().expect("lock").is_empty(), "the sniffer saw no message of the run");
    let (ship, merged, slowest) = trace(&sniffed.lock().expect("lock"), &written.lock().expect("lock"), &seen_by);
    println!(
        "write to batch at the broker: p50 {:.1} ms, p99 {:.1} ms; write to feed: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&ship, 50.0),
        percentile(&ship, 99.0),
        percentile(&merged, 50.0),
        percentile(&merged, 99.0)
    );
    let pulls = sniffed.lock().expect("lock").iter().filter(|(_, s)| matches!(s, Seen::Pull)).count();
    println!("pulls during the run: {pulls}");
    println!("slowest writes (ms after the write: batch at the broker, ack, feed; slowest observer):\n{slowest}");
    let seen_fraction = delays.len() as f64 / (expected * OBSERVERS) as f64;
    println!(
        "{devices} writers in {} region(s) x {rounds} writes, {OBSERVERS} observers: seen {:.4} of them; p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; gateway CPU {cpu:.1} s, devices' CPU {fleet_cpu:.1} s",
        regions.max(1),
        seen_fraction,
        percentile(&delays, 50.0),
        percentile(&delays, 90.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(0.0)
    );
    report(&[
        ("devices", devices as f64),
        ("regions", regions as f64),
        ("writes", expected as f64),
        ("p50_ms", percentile(&delays, 50.0)),
        ("p99_ms", percentile(&delays, 99.0)),
        ("gateway_cpu_s", cpu),
        ("fleet_cpu_s", fleet_cpu),
        ("seen_fraction", seen_fraction),
        ("ship_p99_ms", percentile(&ship, 99.0)),
        ("feed_p99_ms", percentile(&merged, 99.0)),
        ("pulls", pulls as f64),
        ("foreign_rows", foreign_rows as f64),
        ("fleet_nice", f64::from(nice)),
        ("write_lag_p99_ms", percentile(&lags, 99.0)),
    ]);
    Ok(())
}
