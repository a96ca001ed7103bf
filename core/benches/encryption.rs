//! Encryption at rest: what SQLCipher costs a device. In one run of a `sqlcipher` build, the
//! same work on a plain and on an encrypted store: app writes through the store (captured)
//! and sealed into the outbox, opening a connection (the key derivation), a full read of the
//! table, and a remote batch applied.

mod common;

use common::*;
use driftless_core::{Store, StoreOptions, TableSpec};
use rusqlite::params_from_iter;

const ROWS: usize = 20_000;
const PER_TX: usize = 100;
const ROUNDS: usize = 5;

fn store(dir: &std::path::Path, name: &str, key: Option<&str>) -> Store {
    let opts = StoreOptions { key: key.map(str::to_owned), ..StoreOptions::default() };
    let mut s = Store::open(dir.join(name), opts).expect("open");
    s.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
    s.track("inspections", TableSpec::new()).expect("track");
    s
}

/// Seconds to write `ROWS` rows in transactions of `PER_TX` and seal them; the outbox batch
/// of them all, for the apply.
fn write_and_seal(s: &mut Store, seed: u64) -> (f64, driftless_core::Batch) {
    let mut rng = Rng(seed);
    let secs = timed(|| {
        for _ in 0..ROWS / PER_TX {
            let rows: Vec<_> = (0..PER_TX)
                .map(|_| {
                    let id = rng.uuid();
                    record(&mut rng, &id)
                })
                .collect();
            s.write(|tx| {
                let mut stmt = tx.prepare_cached(INSERT)?;
                for r in &rows {
                    stmt.execute(params_from_iter(r))?;
                }
                Ok(())
            })
            .expect("write");
        }
        s.outbox_batch(1).expect("seal");
    });
    let batch = s.outbox_batch(ROWS).expect("outbox").expect("batch").batch;
    (secs, batch)
}

fn scan(s: &Store) -> f64 {
    timed(|| {
        let n: i64 = s
            .read(|c| Ok(c.query_row("SELECT count(*), sum(length(notes)) FROM inspections", [], |r| r.get(0))?))
            .expect("scan");
        assert_eq!(n as usize, ROWS);
    })
}

fn main() {
    let mut write = [Vec::new(), Vec::new()];
    let mut open = [Vec::new(), Vec::new()];
    let mut read = [Vec::new(), Vec::new()];
    let mut apply = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for (i, key) in [None, Some("a passphrase from the keystore")].into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut s = store(dir.path(), "d.db", key);
            let (secs, batch) = write_and_seal(&mut s, 7 + round as u64);
            write[i].push(secs);
            // Opening a connection derives the key (PBKDF2): timed apart from reading.
            open[i].push(timed(|| s.read(|_| Ok(())).expect("open")));
            read[i].push(scan(&s));
            let mut other = store(dir.path(), "other.db", key);
            apply[i].push(timed(|| {
                other.apply(&batch).expect("apply");
            }));
        }
    }
    let rate = |v: &[f64]| ROWS as f64 / median(v.to_vec());
    let (w0, w1) = (rate(&write[0]), rate(&write[1]));
    let (r0, r1) = (median(read[0].clone()) * 1000.0, median(read[1].clone()) * 1000.0);
    let (o0, o1) = (median(open[0].clone()) * 1000.0, median(open[1].clone()) * 1000.0);
    let (a0, a1) = (rate(&apply[0]), rate(&apply[1]));
    println!("{ROWS} rows, {PER_TX} per transaction, median of {ROUNDS} rounds (plain / encrypted)");
    println!("write + seal: {w0:.0} / {w1:.0} rows/s");
    println!("open a connection: {o0:.1} / {o1:.1} ms");
    println!("full scan:    {r0:.1} / {r1:.1} ms");
    println!("apply:        {a0:.0} / {a1:.0} rows/s");
    report(&[
        ("plain_write_rows_per_s", w0),
        ("encrypted_write_rows_per_s", w1),
        ("write_cost_ratio", w0 / w1),
        ("scan_cost_ratio", r1 / r0),
        ("plain_open_ms", o0),
        ("encrypted_open_ms", o1),
        ("apply_cost_ratio", a0 / a1),
    ]);
}
