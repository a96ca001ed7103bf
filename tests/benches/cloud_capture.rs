//! Cloud capture: what the triggers on the gateway's real tables cost a writer. The same
//! 10,000-row INSERT transaction and the same 10,000-row UPDATE transaction, through one plain
//! SQLite connection, on a tenant's real table (captured) and on a table of identical shape
//! in the same database without triggers (not captured), alternated over rounds; the ratios
//! compare medians. In the same run, the gateway takes each round's writes in
//! (`ingest_rows_per_s`).

use std::time::Instant;

use driftless_core::codec::{EncodeOptions, decode_batch, encode_batch};
use driftless_core::{Store, StoreOptions, SyncSchema};
use driftless_gateway::storage::Incoming;
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

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = schema();
    let mut gw = SqliteStore::open(dir.path().join("gw.db"))?;
    gw.install_schema(&text)?;
    // One device write makes the tenant's real tables.
    let mut device = Store::open(dir.path().join("d.db"), StoreOptions::default())?;
    device.follow_schema(1, &text)?;
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
    };
    gw.merge(&from, &batch).map_err(|e| anyhow::anyhow!("merge: {e}"))?;
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
        let tenants = gw.ingest_cloud_writes(now_ms)?;
        anyhow::ensure!(tenants == vec!["bench".to_owned()], "the round's writes were taken in");
        ingest_rows_per_s.push(ROWS as f64 / t0.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 50.0)
    };
    let (ti, pi) = (median(&mut insert[0]), median(&mut insert[1]));
    let (tu, pu) = (median(&mut update[0]), median(&mut update[1]));
    let ingest = median(&mut ingest_rows_per_s);
    println!(
        "{ROWS}-row transactions of {FIELDS} text fields, median of {ROUNDS} rounds, one plain SQLite connection:"
    );
    println!("  insert: captured {ti:.1} ms, not captured {pi:.1} ms");
    println!("  update of one field: captured {tu:.1} ms, not captured {pu:.1} ms");
    println!("  the gateway took in each round's {ROWS} rows at {ingest:.0} rows/s");
    report(&[
        ("insert_ratio", ti / pi),
        ("update_ratio", tu / pu),
        ("captured_insert_ms", ti),
        ("plain_insert_ms", pi),
        ("captured_update_ms", tu),
        ("plain_update_ms", pu),
        ("ingest_rows_per_s", ingest),
    ]);
    Ok(())
}
