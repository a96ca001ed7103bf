//! Merges whatever decodes from arbitrary bytes. Two batches are cut from the input; every
//! pair of row states for the same key must join the same way in either order, joining again
//! must change nothing, and two stores applying both (in either order) must not panic and
//! must end with the same row states. Errors are fine; panics and disagreements are bugs.
#![no_main]

use std::sync::Mutex;

use driftless_core::codec::{Dictionaries, Limits, decode_batch};
use driftless_core::{Batch, ColumnPolicy, Store, StoreOptions, TableSpec, join_row};
use libfuzzer_sys::fuzz_target;

struct Stores {
    _dir: tempfile::TempDir,
    pair: [Store; 2],
}

static STORES: Mutex<Option<Stores>> = Mutex::new(None);

fn open(dir: &std::path::Path, name: &str) -> Store {
    let mut s = Store::open(dir.join(name), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch(include_str!("../merge_apply.sql"))?)).expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track t");
    s.track("u", TableSpec::new()).expect("track u");
    s
}

/// Every row state the store holds, by key.
fn states_of(store: &mut Store) -> Vec<(String, Vec<u8>, String)> {
    let Ok((snapshot, _)) = store.snapshot(None, 1 << 20) else { return Vec::new() };
    let mut out: Vec<_> = snapshot
        .rows
        .into_iter()
        .map(|r| (r.table, driftless_core::codec::encode_key(&r.pk), format!("{:?}", r.state)))
        .collect();
    out.sort();
    out
}

fn check_laws(x: &Batch, y: &Batch) {
    for a in &x.rows {
        for b in y.rows.iter().filter(|b| b.table == a.table && b.pk == a.pk) {
            let (mut ab, mut ba) = (a.state.clone(), b.state.clone());
            join_row(&mut ab, &b.state);
            join_row(&mut ba, &a.state);
            assert_eq!(ab, ba, "join is not commutative");
            let before = ab.clone();
            assert!(!join_row(&mut ab, &b.state) && ab == before, "join is not idempotent");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_decompressed: 1 << 18, ..Limits::default() };
    let cut = data.first().map_or(0, |c| *c as usize).min(data.len().saturating_sub(1));
    let (left, right) = data.get(1..).map_or((&[][..], &[][..]), |rest| rest.split_at(cut.min(rest.len())));
    let (Ok(x), Ok(y)) =
        (decode_batch(left, &limits, &Dictionaries::default()), decode_batch(right, &limits, &Dictionaries::default()))
    else {
        return;
    };
    check_laws(&x, &y);
    let mut guard = STORES.lock().unwrap_or_else(|p| p.into_inner());
    let stores = guard.get_or_insert_with(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let pair = [open(dir.path(), "a.db"), open(dir.path(), "b.db")];
        Stores { _dir: dir, pair }
    });
    let [s1, s2] = &mut stores.pair;
    for (store, order) in [(s1, [&x, &y]), (s2, [&y, &x])] {
        for batch in order {
            let _ = store.apply(batch);
        }
    }
    let [s1, s2] = &mut stores.pair;
    // Both stores have seen the same batches (every input so far), in different orders.
    assert_eq!(states_of(s1), states_of(s2), "stores that applied the same batches differ");
});
