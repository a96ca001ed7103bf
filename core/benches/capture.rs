//! Capture overhead: the same writes on a tracked and an untracked table.
//!
//! Measures only what the app pays at write time (the triggers); sealing happens later, off
//! the app's path, and is reported separately.

mod common;

use common::*;
use driftless_core::{Store, StoreOptions, TableSpec};
use rusqlite::{Connection, params_from_iter};

const BATCH_ROWS: usize = 10_000;
const SINGLE_ROWS: usize = 2_000;
const ROUNDS: usize = 7;

fn connect(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL").expect("sync");
    conn
}

struct Db {
    conn: Connection,
    _store: Option<Store>,
}

fn setup(dir: &std::path::Path, name: &str, tracked: bool) -> Db {
    let path = dir.join(name);
    let store = if tracked {
        let mut s = Store::open(&path, StoreOptions::default()).expect("store");
        s.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
        s.track("inspections", TableSpec::new()).expect("track");
        Some(s)
    } else {
        None
    };
    let conn = connect(&path);
    conn.execute_batch(SCHEMA).expect("schema");
    Db { conn, _store: store }
}

/// A tracked store with the capture triggers of the previous release (issue 2) put back: the
/// update trigger had a WHEN clause that skipped key changes and no trigger recorded the
/// write's time. Same store, same seals, only the trigger bodies differ, so the ratio measured
/// in the same run shows what recording each write's time costs, however noisy the machine.
fn setup_previous(dir: &std::path::Path) -> Db {
    let db = setup(dir, "previous.db", true);
    let triggers: Vec<(String, String)> = {
        let mut stmt = db
            .conn
            .prepare(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%_ins' OR name LIKE '%_upd'",
            )
            .expect("triggers");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query").collect::<Result<_, _>>().expect("rows")
    };
    for (name, sql) in triggers {
        let mut old = sql.replace(", t) VALUES", ") VALUES").replace(", julianday());", ");");
        if name.ends_with("_upd") {
            old = old.replace(" BEGIN ", " WHEN NEW.\"id\" IS OLD.\"id\" COLLATE BINARY BEGIN ");
        }
        assert_ne!(old, sql, "the trigger text changed shape; update this bench");
        db.conn.execute_batch(&format!("DROP TRIGGER \"{name}\"; {old};")).expect("previous trigger");
    }
    db
}

fn insert_batch(conn: &Connection, rows: &[Vec<rusqlite::types::Value>]) {
    let tx = conn.unchecked_transaction().expect("tx");
    {
        let mut stmt = tx.prepare_cached(INSERT).expect("prepare");
        for r in rows {
            stmt.execute(params_from_iter(r)).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

fn update_batch(conn: &Connection, rows: &[Vec<rusqlite::types::Value>], round: usize) {
    let tx = conn.unchecked_transaction().expect("tx");
    {
        let mut stmt = tx
            .prepare_cached("UPDATE inspections SET status = ?2, photo_count = photo_count + 1 WHERE id = ?1")
            .expect("prepare");
        for r in rows {
            stmt.execute(rusqlite::params![&r[0], format!("checked-{round}")]).expect("update");
        }
    }
    tx.commit().expect("commit");
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(0x5eed);
    let mut dbs: Vec<Db> =
        [false, true].iter().map(|&tracked| setup(dir.path(), &format!("{tracked}.db"), tracked)).collect();
    dbs.push(setup_previous(dir.path()));
    let (mut ins_b, mut upd_b, mut ins_s, mut upd_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ins_prev, mut upd_prev) = (Vec::new(), Vec::new());
    let mut seal_rate = Vec::new();
    for round in 0..ROUNDS {
        let rows: Vec<_> = (0..BATCH_ROWS)
            .map(|_| {
                let id = rng.uuid();
                record(&mut rng, &id)
            })
            .collect();
        let single: Vec<_> = (0..SINGLE_ROWS)
            .map(|_| {
                let id = rng.uuid();
                record(&mut rng, &id)
            })
            .collect();
        let mut t = [[0.0f64; 4]; 3];
        // Rotate which side runs first so cache warmth and background noise even out.
        let order = [[0, 1, 2], [1, 2, 0], [2, 0, 1]][round % 3];
        for k in order {
            let db = &mut dbs[k];
            t[k][0] = timed(|| insert_batch(&db.conn, &rows));
            t[k][1] = timed(|| update_batch(&db.conn, &rows, round));
            t[k][2] = timed(|| {
                let mut stmt = db.conn.prepare_cached(INSERT).expect("prepare");
                for r in &single {
                    stmt.execute(params_from_iter(r)).expect("insert");
                }
            });
            t[k][3] = timed(|| {
                let mut stmt =
                    db.conn.prepare_cached("UPDATE inspections SET status = 'on-site' WHERE id = ?1").expect("prepare");
                for r in &single {
                    stmt.execute([&r[0]]).expect("update");
                }
            });
            // The agent seals soon after writes; that work is off the app's path, timed apart.
            if let Some(store) = db._store.as_mut() {
                let secs = timed(|| {
                    store.seal().expect("seal");
                });
                if k == 1 {
                    seal_rate.push((BATCH_ROWS + SINGLE_ROWS) as f64 / secs);
                }
            }
        }
        ins_b.push(t[1][0] / t[0][0]);
        upd_b.push(t[1][1] / t[0][1]);
        ins_prev.push(t[2][0] / t[0][0]);
        upd_prev.push(t[2][1] / t[0][1]);
        ins_s.push(t[1][2] / t[0][2]);
        upd_s.push(t[1][3] / t[0][3]);
        println!(
            "round {round} (table holds {} rows before): tracked vs untracked seconds: batch insert {:.4} / {:.4}, \
             batch update {:.4} / {:.4}, single insert {:.4} / {:.4}, single update {:.4} / {:.4}; \
             previous triggers: batch insert {:.4}, batch update {:.4}",
            round * (BATCH_ROWS + SINGLE_ROWS),
            t[1][0],
            t[0][0],
            t[1][1],
            t[0][1],
            t[1][2],
            t[0][2],
            t[1][3],
            t[0][3],
            t[2][0],
            t[2][1]
        );
    }
    report(&[
        ("insert_ratio_batch", median(ins_b)),
        ("update_ratio_batch", median(upd_b)),
        ("insert_ratio_single", median(ins_s)),
        ("update_ratio_single", median(upd_s)),
        ("insert_ratio_batch_previous_triggers", median(ins_prev)),
        ("update_ratio_batch_previous_triggers", median(upd_prev)),
        ("seal_rows_per_s", median(seal_rate).round()),
    ]);
}
