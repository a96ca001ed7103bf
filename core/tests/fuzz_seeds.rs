//! Seeds for the `merge_apply` fuzz target (core/fuzz): pairs of real batches for the same
//! rows, written in the target's input format (one byte saying where the first batch ends,
//! then both envelopes, uncompressed so the fuzzer can mutate them). Only writes files when
//! `DRIFTLESS_FUZZ_SEEDS` names a directory:
//! `DRIFTLESS_FUZZ_SEEDS=core/fuzz/corpus/merge_apply cargo test -p driftless-core --test fuzz_seeds`.

use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec};

fn store(dir: &std::path::Path, name: &str) -> Store {
    let mut s = Store::open(dir.join(name), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch(include_str!("../fuzz/merge_apply.sql"))?)).expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
    s.track("u", TableSpec::new()).expect("track");
    s
}

fn batches(s: &mut Store, sql: &str) -> Vec<Vec<u8>> {
    s.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
    let mut out = Vec::new();
    while let Some(ob) = s.outbox_batch(50).expect("outbox") {
        out.push(encode_batch(&ob.batch, EncodeOptions { level: None, dictionary: None }));
        s.ack(ob.first_seq, ob.last_seq).expect("ack");
    }
    out
}

#[test]
fn write_fuzz_seeds() {
    let Some(out) = std::env::var_os("DRIFTLESS_FUZZ_SEEDS") else { return };
    std::fs::create_dir_all(&out).expect("seed directory");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = (store(dir.path(), "a.db"), store(dir.path(), "b.db"));
    let mut all = Vec::new();
    all.extend(batches(
        &mut a,
        "INSERT INTO t VALUES ('x', 1, 'one', 3), ('y', 2.5, NULL, 0); INSERT INTO u VALUES (x'01', 7, 'v')",
    ));
    all.extend(batches(&mut b, "INSERT INTO t VALUES ('x', 9, 'concurrent', 5)"));
    all.extend(batches(&mut a, "UPDATE t SET n = n + 4, a = -0.0 WHERE id = 'x'; DELETE FROM u"));
    all.extend(batches(&mut b, "DELETE FROM t WHERE id = 'x'"));
    let mut n = 0;
    for (i, x) in all.iter().enumerate() {
        for y in &all[i..] {
            if x.len() > 255 {
                continue;
            }
            let mut input = vec![x.len() as u8];
            input.extend_from_slice(x);
            input.extend_from_slice(y);
            std::fs::write(std::path::Path::new(&out).join(format!("seed-{n}")), input).expect("write seed");
            n += 1;
        }
    }
    assert!(n > 0);
}
