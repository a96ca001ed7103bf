//! Fixtures shared by the store tests.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::{Batch, Store, StoreOptions, TableSpec, Value};

pub const INSPECTIONS: &str = "CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY,
    site TEXT,
    status TEXT,
    notes TEXT,
    stock INTEGER NOT NULL DEFAULT 0
)";

/// A wall clock tests can move by hand.
#[derive(Clone, Default)]
pub struct ManualClock(pub Arc<AtomicU64>);

impl ManualClock {
    pub fn at(ms: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn options(&self, role: &str) -> StoreOptions {
        let c = self.0.clone();
        StoreOptions {
            role: role.to_owned(),
            clock: Arc::new(move || c.load(Ordering::SeqCst)),
            ..StoreOptions::default()
        }
    }
}

/// Opens a store with the inspections table tracked under `spec`.
pub fn open(dir: &Path, name: &str, opts: StoreOptions, spec: TableSpec) -> Store {
    let mut store = Store::open(dir.join(name), opts).expect("open store");
    store.write(|tx| Ok(tx.execute_batch(INSPECTIONS)?)).expect("create table");
    store.track("inspections", spec).expect("track");
    store
}

/// Takes everything in `from`'s outbox through the wire codec, acknowledging it.
pub fn drain(from: &mut Store) -> Vec<Batch> {
    let mut out = Vec::new();
    while let Some(ob) = from.outbox_batch(100).expect("outbox") {
        let bytes = encode_batch(&ob.batch, EncodeOptions::default());
        out.push(decode_batch(&bytes, &Limits::default(), &Dictionaries::default()).expect("decode"));
        from.ack(ob.first_seq, ob.last_seq).expect("ack");
    }
    out
}

/// Ships `from`'s outbox to each of `to`.
pub fn sync(from: &mut Store, to: &mut [&mut Store]) {
    for batch in drain(from) {
        for t in to.iter_mut() {
            t.apply(&batch).expect("apply");
        }
    }
}

/// Both directions, so each side has seen everything.
pub fn exchange(a: &mut Store, b: &mut Store) {
    let from_a = drain(a);
    let from_b = drain(b);
    for batch in &from_a {
        b.apply(batch).expect("apply");
    }
    for batch in &from_b {
        a.apply(batch).expect("apply");
    }
}

pub fn exec(store: &mut Store, sql: &str) {
    store.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
}

/// All rows of a query, as values.
pub fn rows(store: &Store, sql: &str) -> Vec<Vec<Value>> {
    store
        .read(|c| {
            let mut stmt = c.prepare(sql)?;
            let n = stmt.column_count();
            let rows =
                stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>())?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .expect(sql)
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}
