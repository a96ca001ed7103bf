//! Cloud capture: what the triggers on the gateway's real tables cost a writer. The same
//! 10,000-row INSERT transaction and the same 10,000-row UPDATE transaction, through one plain
//! connection, on a tenant's real table (captured) and on a table of identical shape in the
//! same database without triggers (not captured), alternated over rounds; the ratios compare
//! medians. On the PostgreSQL store (`insert_ratio`, `update_ratio`) and the SQLite store
//! (`sqlite_*`) in one run. The gateway takes each round's writes in (`ingest_rows_per_s`).

use std::time::Instant;

use driftless_core::codec::{EncodeOptions, decode_batch, encode_batch};
use driftless_core::{Store, StoreOptions, SyncSchema};
use driftless_gateway::storage::testing::TestDb;
use driftless_gateway::storage::{Incoming, tenants_of};
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::bench::{percentile, report};

const ROWS: usize = 10_000;
const ROUNDS: usize = 5;
const FIELDS: usize = 10;

fn schema() -> String {
    let mut s = String::from(
        "[[table]]\nname = \"readings\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n",
    );
    for f in 0..FIELDS {
        s.push_str(&format!("[[table.column]]\nname = \"f{f}\"\ntype = \"text\"\n"));
    }
    s
}

/// One timed transaction, in milliseconds.
fn timed(conn: &mut rusqlite::Connection, sql: &str, rows: impl Fn(usize) -> Vec<String>) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(sql)?;
        for r in 0..ROWS {
            stmt.execute(rusqlite::params_from_iter(rows(r)))?;
        }
    }
    tx.commit()?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Medians of one store's rounds, in milliseconds, and the gateway's intake rate.
struct Measures {
    captured_insert: f64,
    plain_insert: f64,
    captured_update: f64,
    plain_update: f64,
    ingest_rows_per_s: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 50.0)
}

fn main() -> anyhow::Result<()> {
    let db = TestDb::new().ok_or_else(|| anyhow::anyhow!("set DRIFTLESS_TEST_PG_URL (scripts/bench does)"))?;
    let lite = sqlite_phase()?;
    let pg = pg_phase(&db)?;
    println!("{ROWS}-row transactions of {FIELDS} text fields, median of {ROUNDS} rounds, one plain connection:");
    for (name, m) in [("PostgreSQL", &pg), ("SQLite", &lite)] {
        println!(
            "  {name}: insert captured {:.1} ms, not captured {:.1} ms; update of one field captured {:.1} ms, \
             not captured {:.1} ms; the gateway took each round's rows in at {:.0} rows/s",
            m.captured_insert, m.plain_insert, m.captured_update, m.plain_update, m.ingest_rows_per_s
        );
    }
    report(&[
        ("insert_ratio", pg.captured_insert / pg.plain_insert),
        ("update_ratio", pg.captured_update / pg.plain_update),
        ("ingest_rows_per_s", pg.ingest_rows_per_s),
        ("captured_insert_ms", pg.captured_insert),
        ("plain_insert_ms", pg.plain_insert),
        ("captured_update_ms", pg.captured_update),
        ("plain_update_ms", pg.plain_update),
        ("sqlite_insert_ratio", lite.captured_insert / lite.plain_insert),
        ("sqlite_update_ratio", lite.captured_update / lite.plain_update),
        ("sqlite_ingest_rows_per_s", lite.ingest_rows_per_s),
    ]);
    Ok(())
}

/// One device row merged, so the tenant's real tables exist; returns when, for the intake.
fn first_merge(gw: &mut dyn GatewayStore, dir: &std::path::Path, text: &str) -> anyhow::Result<u64> {
    let mut device = Store::open(dir.join("d.db"), StoreOptions::default())?;
    device.follow_schema(1, text)?;
    device.write(|tx| Ok(tx.execute_batch("INSERT INTO readings(id) VALUES ('first')")?))?;
    let out = device.outbox_batch(10)?.expect("one row");
    let batch =
        decode_batch(&encode_batch(&out.batch, EncodeOptions::default()), &Default::default(), &Default::default())?;
    let now_ms = std::time::UNIX_EPOCH.elapsed()?.as_millis() as u64;
    let from = Incoming {
        tenant: "bench",
        device: "d",
        first_seq: out.first_seq,
        last_seq: out.last_seq,
        now_ms,
        max_drift_ms: 300_000,
        role: None,
        recovering: false,
        legacy: false,
        scope: None,
    };
    gw.merge(&from, &batch).map_err(|e| anyhow::anyhow!("merge: {e}"))?;
    Ok(now_ms)
}

/// The same rounds on PostgreSQL: `bench.readings` (captured) and `public.plain_readings`
/// (the same columns and key, no triggers).
fn pg_phase(db: &TestDb) -> anyhow::Result<Measures> {
    let dir = tempfile::tempdir()?;
    let text = schema();
    let mut gw = db.store();
    gw.install_schema(&text)?;
    let now_ms = first_merge(&mut gw, dir.path(), &text)?;
    let mut client = db.client();
    client.batch_execute("CREATE TABLE public.plain_readings (LIKE bench.readings INCLUDING ALL)")?;
    let names = ["bench.readings", "public.plain_readings"];
    let (mut insert, mut update) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut ingest = Vec::new();
    let cols: Vec<String> = (0..FIELDS).map(|f| format!("f{f}")).collect();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &t in &order {
            let sql = format!(
                "INSERT INTO {} (id, {}) VALUES ($1, {})",
                names[t],
                cols.join(", "),
                (0..FIELDS).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ")
            );
            insert[t].push(pg_timed(&mut client, &sql, |r| {
                let mut v = vec![format!("r{round}-{r:06}")];
                v.extend((0..FIELDS).map(|f| format!("reading {r} field {f}")));
                v
            })?);
            let sql = format!("UPDATE {} SET f3 = $2 WHERE id = $1", names[t]);
            update[t].push(pg_timed(&mut client, &sql, |r| vec![format!("r{round}-{r:06}"), format!("updated {r}")])?);
        }
        let t0 = Instant::now();
        let tenants = tenants_of(&gw.ingest_cloud_writes(now_ms)?);
        anyhow::ensure!(tenants == vec!["bench".to_owned()], "the round's writes were taken in");
        ingest.push(ROWS as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(Measures {
        captured_insert: median(&mut insert[0]),
        plain_insert: median(&mut insert[1]),
        captured_update: median(&mut update[0]),
        plain_update: median(&mut update[1]),
        ingest_rows_per_s: median(&mut ingest),
    })
}

/// One timed PostgreSQL transaction of `ROWS` executions of one prepared statement, in ms.
fn pg_timed(client: &mut postgres::Client, sql: &str, rows: impl Fn(usize) -> Vec<String>) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut tx = client.transaction()?;
    let stmt = tx.prepare(sql)?;
    for r in 0..ROWS {
        let values = rows(r);
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn postgres::types::ToSql + Sync)).collect();
        tx.execute(&stmt, &params)?;
    }
    tx.commit()?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

fn sqlite_phase() -> anyhow::Result<Measures> {
    let dir = tempfile::tempdir()?;
    let text = schema();
    let mut gw = SqliteStore::open(dir.path().join("gw.db"))?;
    gw.install_schema(&text)?;
    // One device write makes the tenant's real tables.
    let now_ms = first_merge(&mut gw, dir.path(), &text)?;
    let table = SyncSchema::parse(&text)?.tables.remove(0);
    let mut client = rusqlite::Connection::open(dir.path().join("gw.db"))?;
    client.execute_batch(&table.sqlite_create_named("plain_readings"))?;

    let names = ["\"bench.readings\"", "plain_readings"];
    let (mut insert, mut update) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut ingest_rows_per_s = Vec::new();
    let cols: Vec<String> = (0..FIELDS).map(|f| format!("f{f}")).collect();
    for round in 0..ROUNDS {
        // Alternate which table goes first, so neither always meets a warmer cache.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &t in &order {
            let sql = format!(
                "INSERT INTO {} (id, {}) VALUES (?1, {})",
                names[t],
                cols.join(", "),
                (0..FIELDS).map(|i| format!("?{}", i + 2)).collect::<Vec<_>>().join(", ")
            );
            insert[t].push(timed(&mut client, &sql, |r| {
                let mut v = vec![format!("r{round}-{r:06}")];
                v.extend((0..FIELDS).map(|f| format!("reading {r} field {f}")));
                v
            })?);
            let sql = format!("UPDATE {} SET f3 = ?2 WHERE id = ?1", names[t]);
            update[t].push(timed(&mut client, &sql, |r| vec![format!("r{round}-{r:06}"), format!("updated {r}")])?);
        }
        let t0 = Instant::now();
        let tenants = tenants_of(&gw.ingest_cloud_writes(now_ms)?);
        anyhow::ensure!(tenants == vec!["bench".to_owned()], "the round's writes were taken in");
        ingest_rows_per_s.push(ROWS as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(Measures {
        captured_insert: median(&mut insert[0]),
        plain_insert: median(&mut insert[1]),
        captured_update: median(&mut update[0]),
        plain_update: median(&mut update[1]),
        ingest_rows_per_s: median(&mut ingest_rows_per_s),
    })
}
