//! Merge throughput: a device applies remote batches totalling 100,000 field changes.
//!
//! The remote device creates 5,000 inspection records (11 fields each besides the key:
//! 55,000 field changes) and then edits 9 fields of each (45,000), shipped as batches of 500
//! rows. The receiving store decodes every batch from bytes and applies it.
//!
//! In the same run, the same decoded rows are written to a plain SQLite table as an app would
//! write their values (update, or insert if new; no causal metadata, no merge): `merge_vs_raw` is merge time over that time,
//! a ratio that holds across machines whose absolute rates differ threefold.

mod common;

use common::*;
use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::{Batch, Store, StoreOptions, TableSpec, Value};

const RECORDS: usize = 5_000;
const REPEATS: usize = 3;

fn store(path: &std::path::Path) -> Store {
    let mut s = Store::open(path, StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
    s.track("inspections", TableSpec::new()).expect("track");
    s
}

/// The remote device's work, as encoded batches.
fn remote_batches(dir: &std::path::Path) -> (Vec<Vec<u8>>, usize) {
    let mut src = store(&dir.join("remote.db"));
    let mut rng = Rng(42);
    let ids: Vec<String> = (0..RECORDS).map(|_| rng.uuid()).collect();
    let mut out = Vec::new();
    let mut changes = 0;
    let mut ship = |src: &mut Store, out: &mut Vec<Vec<u8>>| {
        while let Some(ob) = src.outbox_batch(500).expect("outbox") {
            changes += ob.batch.field_changes();
            out.push(encode_batch(&ob.batch, EncodeOptions::default()));
            src.ack(ob.first_seq, ob.last_seq).expect("ack");
        }
    };
    src.write(|tx| {
        let mut stmt = tx.prepare(INSERT)?;
        for id in &ids {
            stmt.execute(rusqlite::params_from_iter(record(&mut rng, id)))?;
        }
        Ok(())
    })
    .expect("insert");
    ship(&mut src, &mut out);
    src.write(|tx| {
        let mut stmt = tx.prepare(
            "UPDATE inspections SET site_id = ?2, asset_tag = ?3, inspector = ?4, status = 'done', priority = priority + 1,
             temperature = temperature + 0.5, pressure = pressure * 1.01, notes = ?5, passed = 1 - passed WHERE id = ?1",
        )?;
        for (i, id) in ids.iter().enumerate() {
            stmt.execute(rusqlite::params![id, format!("site-{}", i % 97), format!("AT-{i:06}"), "k.osei", format!("re-inspected {i}")])?;
        }
        Ok(())
    })
    .expect("update");
    ship(&mut src, &mut out);
    (out, changes)
}

/// Writes a batch's rows as a plain app would write the same values: an update of the
/// columns each row carries, or an insert if the row is new.
fn upsert_raw(conn: &mut rusqlite::Connection, batch: &Batch) {
    let tx = conn.transaction().expect("transaction");
    for row in &batch.rows {
        let (cols, vals): (Vec<&str>, Vec<&Value>) =
            row.state.fields.iter().filter_map(|(c, r)| r.entries.first().map(|e| (c.as_str(), &e.value))).unzip();
        let params = || std::iter::once(&row.pk[0]).chain(vals.iter().copied());
        let update = format!(
            "UPDATE inspections SET {} WHERE id = ?1",
            cols.iter().enumerate().map(|(i, c)| format!("{c} = ?{}", i + 2)).collect::<Vec<_>>().join(", ")
        );
        let changed =
            tx.prepare_cached(&update).expect("prepare").execute(rusqlite::params_from_iter(params())).expect("update");
        if changed == 0 {
            let insert = format!(
                "INSERT INTO inspections(id, {}) VALUES (?1, {})",
                cols.join(", "),
                (0..cols.len()).map(|i| format!("?{}", i + 2)).collect::<Vec<_>>().join(", ")
            );
            tx.prepare_cached(&insert).expect("prepare").execute(rusqlite::params_from_iter(params())).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (batches, changes) = remote_batches(dir.path());
    let wire: usize = batches.iter().map(Vec::len).sum();
    println!("{} batches, {changes} field changes, {wire} bytes on the wire", batches.len());
    let (mut total, mut apply_only, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..REPEATS {
        let mut target = store(&dir.path().join(format!("target{rep}.db")));
        let mut applying = 0.0;
        let secs = timed(|| {
            for bytes in &batches {
                let batch = decode_batch(bytes, &Limits::default(), &Dictionaries::default()).expect("decode");
                applying += timed(|| {
                    target.apply(&batch).expect("apply");
                });
            }
        });
        let n: i64 = target
            .read(|c| Ok(c.query_row("SELECT count(*) FROM inspections WHERE status = 'done'", [], |r| r.get(0))?))
            .expect("count");
        assert_eq!(n as usize, RECORDS, "every record merged");
        // The same rows, decoded the same way, upserted into a plain table.
        let mut raw = rusqlite::Connection::open(dir.path().join(format!("raw{rep}.db"))).expect("open");
        raw.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL").expect("pragmas");
        raw.execute_batch(SCHEMA).expect("schema");
        let raw_secs = timed(|| {
            for bytes in &batches {
                let batch = decode_batch(bytes, &Limits::default(), &Dictionaries::default()).expect("decode");
                upsert_raw(&mut raw, &batch);
            }
        });
        let n: i64 =
            raw.query_row("SELECT count(*) FROM inspections WHERE status = 'done'", [], |r| r.get(0)).expect("count");
        assert_eq!(n as usize, RECORDS, "every record written");
        println!("repeat {rep}: {secs:.3}s decode+apply, {applying:.3}s apply; {raw_secs:.3}s decode+plain upsert");
        total.push(changes as f64 / secs);
        apply_only.push(changes as f64 / applying);
        ratios.push(secs / raw_secs);
    }
    report(&[
        ("field_changes", changes as f64),
        ("field_changes_per_s", median(total).round()),
        ("apply_only_field_changes_per_s", median(apply_only).round()),
        ("merge_vs_raw", (median(ratios) * 100.0).round() / 100.0),
    ]);
}
