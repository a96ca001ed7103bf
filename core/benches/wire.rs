//! Wire size: a one-field update of the 12-column record, amortized over a batch of 500,
//! against the same update sent as a full-row JSON object.

mod common;

use common::*;
use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::{Store, StoreOptions, TableSpec};

const BATCH: usize = 500;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path().join("device.db"), StoreOptions::default()).expect("open");
    store.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
    store.track("inspections", TableSpec::new()).expect("track");
    let mut rng = Rng(9);
    let ids: Vec<String> = (0..BATCH).map(|_| rng.uuid()).collect();
    store
        .write(|tx| {
            let mut stmt = tx.prepare(INSERT)?;
            for id in &ids {
                stmt.execute(rusqlite::params_from_iter(record(&mut rng, id)))?;
            }
            Ok(())
        })
        .expect("insert");
    while let Some(ob) = store.outbox_batch(BATCH).expect("outbox") {
        store.ack(ob.first_seq, ob.last_seq).expect("ack");
    }
    store
        .write(|tx| {
            let mut stmt = tx.prepare("UPDATE inspections SET status = ?2 WHERE id = ?1")?;
            for (i, id) in ids.iter().enumerate() {
                stmt.execute(rusqlite::params![id, ["passed", "failed", "needs-parts"][i % 3]])?;
            }
            Ok(())
        })
        .expect("update");
    let ob = store.outbox_batch(BATCH).expect("outbox").expect("batch");
    assert_eq!(ob.batch.rows.len(), BATCH);
    assert!(ob.batch.rows.iter().all(|r| r.state.fields.len() == 1), "one changed field per row");
    let ours = encode_batch(&ob.batch, EncodeOptions::default()).len();
    let raw = encode_batch(&ob.batch, EncodeOptions { level: None, dictionary: None }).len();

    // The same updates as full-row JSON objects, as a typical REST sync would send them.
    let names = column_names();
    let json_rows: Vec<String> = store
        .read(|c| {
            let mut stmt = c.prepare("SELECT * FROM inspections")?;
            let rows = stmt.query_map([], |r| {
                let mut obj = serde_json::Map::new();
                for (i, name) in names.iter().enumerate() {
                    let v = match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                        rusqlite::types::ValueRef::Integer(n) => n.into(),
                        rusqlite::types::ValueRef::Real(f) => f.into(),
                        rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                        rusqlite::types::ValueRef::Blob(_) => serde_json::Value::Null,
                    };
                    obj.insert((*name).to_owned(), v);
                }
                Ok(serde_json::Value::Object(obj).to_string())
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .expect("rows");
    let json: usize = json_rows.iter().map(String::len).sum();
    let json_array = format!("[{}]", json_rows.join(","));
    let json_zstd = zstd::bulk::compress(json_array.as_bytes(), 3).expect("zstd").len();
    println!(
        "batch of {BATCH}: {ours} bytes compressed ({raw} uncompressed); JSON {json} bytes ({json_zstd} zstd-compressed)"
    );
    let per = ours as f64 / BATCH as f64;
    let json_per = json as f64 / BATCH as f64;
    report(&[
        ("bytes_per_change", per),
        ("uncompressed_bytes_per_change", raw as f64 / BATCH as f64),
        ("json_bytes_per_change", json_per),
        ("json_zstd_bytes_per_change", json_zstd as f64 / BATCH as f64),
        ("ratio", per / json_per),
    ]);
}
