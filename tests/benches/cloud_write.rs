//! Cloud writes: 1,000 single-field UPDATEs made with plain SQL on the gateway's real table
//! (through a connection of this process, as a back-office tool would), each timed until it
//! is visible in an online device's table. The gateway runs in its own process with a
//! declared schema; on PostgreSQL it is woken by NOTIFY, on SQLite by watching its database
//! file; Mosquitto in between. Both stores in one run, and on each the same 1,000 updates
//! made on a device: the device-to-device latency the cloud write compares with.

use std::path::Path;
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::{Store, StoreOptions};
use driftless_gateway::storage::testing::TestDb;
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

/// Times `WRITES` updates made by `write` (given the value to set) until `reader` shows each;
/// milliseconds. `base` keeps each run's values apart.
async fn timed(
    base: i64,
    mut write: impl FnMut(i64) -> anyhow::Result<()>,
    reader: &rusqlite::Connection,
) -> anyhow::Result<Vec<f64>> {
    let seen = |want: i64| -> bool {
        reader.query_row("SELECT reading FROM gauges WHERE id = 'g1'", [], |r| r.get::<_, i64>(0)).ok() == Some(want)
    };
    let mut samples = Vec::with_capacity(WRITES);
    for i in 0..WRITES as i64 {
        let value = base + i;
        let t0 = Instant::now();
        write(value)?;
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

fn main() -> anyhow::Result<()> {
    // The PostgreSQL client blocks: its database is made and dropped outside the runtime.
    let db = TestDb::new().ok_or_else(|| anyhow::anyhow!("set DRIFTLESS_TEST_PG_URL (scripts/bench does)"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let sqlite = runtime.block_on(run(None))?;
    let pg = runtime.block_on(run(Some(&db)))?;
    println!(
        "{WRITES} updates with plain SQL on PostgreSQL (one connection, autocommit), until visible on a device: \
         p50 {:.2} ms, p99 {:.2} ms",
        percentile(&pg.cloud, 50.0),
        percentile(&pg.cloud, 99.0)
    );
    println!(
        "the same on the SQLite store's table: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&sqlite.cloud, 50.0),
        percentile(&sqlite.cloud, 99.0)
    );
    println!(
        "the same on a device, until visible on another (PostgreSQL gateway): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&pg.device, 50.0),
        percentile(&pg.device, 99.0)
    );
    drop(runtime);
    report(&[
        ("p50_ms", percentile(&pg.cloud, 50.0)),
        ("p99_ms", percentile(&pg.cloud, 99.0)),
        ("sqlite_p50_ms", percentile(&sqlite.cloud, 50.0)),
        ("sqlite_p99_ms", percentile(&sqlite.cloud, 99.0)),
        ("device_p50_ms", percentile(&pg.device, 50.0)),
        ("device_p99_ms", percentile(&pg.device, 99.0)),
    ]);
    Ok(())
}

/// What one run measured, milliseconds, sorted.
struct Timings {
    cloud: Vec<f64>,
    device: Vec<f64>,
}

/// One gateway (on PostgreSQL if `pg`, else on SQLite) and two devices: updates made on a
/// device, then with plain SQL on the cloud table, each until device b shows it.
async fn run(pg: Option<&TestDb>) -> anyhow::Result<Timings> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let tenant = format!("cloudwrite-{}-{}", std::process::id(), if pg.is_some() { "pg" } else { "sqlite" });
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA)?;
    let gw_db = dir.path().join("gw.db");
    let store = pg.map(TestDb::url);
    let mut flags = vec!["--schema", schema.to_str().expect("utf-8 path")];
    if let Some(store) = &store {
        flags.extend(["--store", store.as_str()]);
    }
    let _gateway = GatewayProcess::start_with(&gw_db, &url, &tenant, &flags);
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
    while reader_b.query_row("SELECT count(*) FROM gauges", [], |r| r.get::<_, i64>(0))? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the first row never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let device =
        timed(1_000_000, |v| Ok(writer_a.execute("UPDATE gauges SET reading = ?1", [v]).map(|_| ())?), &reader_b)
            .await?;
    let cloud = match pg {
        Some(db) => {
            // A plain client of the database, as a back-office tool would be, on a thread of
            // its own (its calls block).
            let url = db.url();
            let sql = format!("UPDATE \"{tenant}\".gauges SET reading = $1 WHERE id = 'g1'");
            let (to_writer, values) = std::sync::mpsc::channel::<i64>();
            let (done, written) = std::sync::mpsc::channel::<Result<u64, String>>();
            let writer = std::thread::spawn(move || {
                let mut client = match postgres::Client::connect(&url, postgres::NoTls) {
                    Ok(c) => c,
                    Err(e) => return drop(done.send(Err(e.to_string()))),
                };
                for v in values {
                    let _ = done.send(client.execute(&sql, &[&v]).map_err(|e| e.to_string()));
                }
            });
            let write = |v: i64| -> anyhow::Result<()> {
                to_writer.send(v)?;
                written.recv()?.map_err(|e| anyhow::anyhow!(e))?;
                Ok(())
            };
            let samples = timed(2_000_000, write, &reader_b).await;
            drop(to_writer);
            let _ = writer.join();
            samples?
        }
        None => {
            let cloud = connect(&gw_db)?;
            let sql = format!("UPDATE \"{tenant}.gauges\" SET reading = ?1 WHERE id = 'g1'");
            timed(2_000_000, |v| Ok(cloud.execute(&sql, [v]).map(|_| ())?), &reader_b).await?
        }
    };
    agent_a.stop().await;
    agent_b.stop().await;
    Ok(Timings { cloud, device })
}
