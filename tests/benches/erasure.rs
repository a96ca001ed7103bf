//! Erasure: what making deletes erase costs. In one run:
//! - a device: the same rows inserted, edited and deleted (written through the store, sealed
//!   and acknowledged) on a store with `secure_delete` off and one with it on (the default),
//!   alternated over rounds; and the delete batch applied on a replica holding the rows;
//! - the gateway: one device's rows merged as inserts, then as edits, then as deletes, in
//!   batches of 100, on the SQLite and the PostgreSQL store. Each delete scrubs the earlier
//!   log entries holding its row, so `*_delete_vs_edit` compares a delete's merge with an
//!   edit's (same rows, same batch shape, nothing scrubbed).

use std::time::Instant;

use driftless_core::{Batch, Store, StoreOptions, TableSpec};
use driftless_gateway::storage::Incoming;
use driftless_gateway::storage::testing::TestDb;
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::bench::report;

const ROWS: usize = 10_000;
const PER_BATCH: usize = 100;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn device(path: &std::path::Path, secure_delete: bool) -> anyhow::Result<Store> {
    let mut s = Store::open(path, StoreOptions { secure_delete, ..StoreOptions::default() })?;
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE doc (id TEXT PRIMARY KEY, title TEXT, body BLOB)")?))?;
    s.track("doc", TableSpec::new())?;
    Ok(s)
}

/// `sql` run for each batch of `PER_BATCH` rows (`?1` its first id), each sealed and taken out
/// of the outbox; the batches.
fn write(s: &mut Store, sql: &str) -> anyhow::Result<Vec<Batch>> {
    let mut batches = Vec::new();
    for first in (0..ROWS).step_by(PER_BATCH) {
        s.write(|tx| {
            tx.execute(sql, rusqlite::params![first as i64, (first + PER_BATCH) as i64])?;
            Ok(())
        })?;
        let out = s.outbox_batch(PER_BATCH)?.ok_or_else(|| anyhow::anyhow!("nothing sealed"))?;
        s.ack(out.first_seq, out.last_seq)?;
        batches.push(out.batch);
    }
    Ok(batches)
}

const INSERT: &str = "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
    INSERT INTO doc SELECT printf('%08d', i), hex(randomblob(32)), randomblob(600) FROM n";
const EDIT: &str =
    "UPDATE doc SET title = hex(randomblob(32)) WHERE id >= printf('%08d', ?1) AND id < printf('%08d', ?2)";
const DELETE: &str = "DELETE FROM doc WHERE id >= printf('%08d', ?1) AND id < printf('%08d', ?2)";

/// Seconds to edit and delete every row (insert untimed); the batches of each phase.
fn device_round(dir: &std::path::Path, secure_delete: bool) -> anyhow::Result<(f64, [Vec<Batch>; 3])> {
    let mut s = device(&dir.join(format!("d-{secure_delete}.db")), secure_delete)?;
    let inserts = write(&mut s, INSERT)?;
    let t0 = Instant::now();
    let edits = write(&mut s, EDIT)?;
    let deletes = write(&mut s, DELETE)?;
    Ok((t0.elapsed().as_secs_f64(), [inserts, edits, deletes]))
}

/// Rows per second merging each phase's batches into `gw`.
fn gateway_rates(gw: &mut dyn GatewayStore, phases: &[Vec<Batch>; 3]) -> anyhow::Result<[f64; 3]> {
    let mut rates = [0.0; 3];
    let mut seq = 0i64;
    for (phase, batches) in phases.iter().enumerate() {
        let t0 = Instant::now();
        for batch in batches {
            seq += 1;
            let from = Incoming {
                tenant: "bench",
                device: "d",
                first_seq: seq,
                last_seq: seq,
                now_ms: std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64),
                max_drift_ms: 300_000,
                role: None,
                recovering: false,
                legacy: false,
                scope: None,
            };
            gw.merge(&from, batch).map_err(|e| anyhow::anyhow!("merge: {e}"))?;
        }
        rates[phase] = ROWS as f64 / t0.elapsed().as_secs_f64();
    }
    Ok(rates)
}

fn main() -> anyhow::Result<()> {
    let pg = TestDb::new().ok_or_else(|| anyhow::anyhow!("set DRIFTLESS_TEST_PG_URL (scripts/bench does)"))?;
    let (mut off, mut on, mut apply_off, mut apply_on) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sqlite = [Vec::new(), Vec::new(), Vec::new()];
    let mut postgres = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir()?;
        let mut phases = None;
        for secure_delete in [false, true] {
            let (secs, batches) = device_round(dir.path(), secure_delete)?;
            // The replica: holding the rows, then taking the deletes.
            let mut replica = device(&dir.path().join(format!("r-{secure_delete}.db")), secure_delete)?;
            for b in batches[0].iter().chain(&batches[1]) {
                replica.apply(b)?;
            }
            let t0 = Instant::now();
            for b in &batches[2] {
                replica.apply(b)?;
            }
            let applied = t0.elapsed().as_secs_f64();
            if secure_delete {
                on.push(secs);
                apply_on.push(applied);
            } else {
                off.push(secs);
                apply_off.push(applied);
            }
            phases = Some(batches);
        }
        let phases = phases.ok_or_else(|| anyhow::anyhow!("no round"))?;
        let mut gw = SqliteStore::open(dir.path().join(format!("gw-{round}.db")))?;
        for (i, r) in gateway_rates(&mut gw, &phases)?.into_iter().enumerate() {
            sqlite[i].push(r);
        }
        let mut gw = pg.store();
        pg.client().batch_execute("TRUNCATE driftless.gw_rows, driftless.gw_log, driftless.gw_log_keys")?;
        for (i, r) in gateway_rates(&mut gw, &phases)?.into_iter().enumerate() {
            postgres[i].push(r);
        }
    }
    let (off, on) = (median(off), median(on));
    let (apply_off, apply_on) = (median(apply_off), median(apply_on));
    let s: Vec<f64> = sqlite.into_iter().map(median).collect();
    let p: Vec<f64> = postgres.into_iter().map(median).collect();
    println!("{ROWS} rows of about 700 bytes, {PER_BATCH} per transaction and batch, median of {ROUNDS} rounds");
    println!("device, edit + delete + seal + ack: secure_delete off {off:.3} s, on {on:.3} s");
    println!("device, applying the deletes:      secure_delete off {apply_off:.3} s, on {apply_on:.3} s");
    println!("gateway SQLite rows/s:     insert {:.0}, edit {:.0}, delete {:.0}", s[0], s[1], s[2]);
    println!("gateway PostgreSQL rows/s: insert {:.0}, edit {:.0}, delete {:.0}", p[0], p[1], p[2]);
    report(&[
        ("device_secure_delete_cost_ratio", on / off),
        ("device_apply_cost_ratio", apply_on / apply_off),
        ("sqlite_insert_rows_per_s", s[0]),
        ("sqlite_edit_rows_per_s", s[1]),
        ("sqlite_delete_rows_per_s", s[2]),
        ("sqlite_delete_vs_edit", s[2] / s[1]),
        ("pg_insert_rows_per_s", p[0]),
        ("pg_edit_rows_per_s", p[1]),
        ("pg_delete_rows_per_s", p[2]),
        ("pg_delete_vs_edit", p[2] / p[1]),
    ]);
    Ok(())
}
