//! The daemon's command line: setup commands work and mistakes get clear errors.

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftless-agent")).args(args).output().expect("run driftless-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn setup_commands_work_and_mistakes_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("site.db");
    let db = db.to_str().expect("utf-8 path");

    let missing = agent(&["status", "--db", db]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("does not exist"), "{}", stderr(&missing));

    assert!(agent(&["init", "--db", db, "--role", "field"]).status.success());
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.execute_batch("CREATE TABLE jobs (id TEXT PRIMARY KEY, notes TEXT, stock INTEGER NOT NULL DEFAULT 0)")
        .expect("schema");
    drop(conn);

    let no_table = agent(&["track", "--db", db, "nope"]);
    assert!(!no_table.status.success());
    assert!(stderr(&no_table).contains("does not exist"), "{}", stderr(&no_table));

    let bad_policy = agent(&["track", "--db", db, "jobs", "--policy", "notes=newest"]);
    assert!(!bad_policy.status.success());
    assert!(stderr(&bad_policy).contains("unknown policy"), "{}", stderr(&bad_policy));

    let ok = agent(&["track", "--db", db, "jobs", "--policy", "notes=manual", "--policy", "stock=counter"]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    let untracked = agent(&["untrack", "--db", db, "other"]);
    assert!(!untracked.status.success());
    assert!(stderr(&untracked).contains("not tracked"), "{}", stderr(&untracked));

    let bad_url = agent(&["run", "--db", db, "--broker", "http://x", "--device-id", "d1"]);
    assert!(!bad_url.status.success());
    assert!(stderr(&bad_url).contains("bad broker URL"), "{}", stderr(&bad_url));

    let bad_id = agent(&["run", "--db", db, "--broker", "mqtt://127.0.0.1:1", "--device-id", "a/b"]);
    assert!(!bad_id.status.success());
    assert!(stderr(&bad_id).contains("bad device or tenant id"), "{}", stderr(&bad_id));

    let status = agent(&["status", "--db", db]);
    assert!(status.status.success());
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(out.contains("tracked tables:  jobs") && out.contains("pending changes: 0"), "{out}");
    assert!(!out.contains("snapshot:"), "none under way: {out}");

    // A snapshot under way shows how far it got, and what is left.
    let mut store = driftless_core::Store::open(db, driftless_core::StoreOptions::default()).expect("open");
    let (_, resets) = store.cursor().expect("cursor");
    let progress =
        driftless_core::SnapshotProgress { rows_done: 2_000, rows_total: 10_000, bytes_done: 1, bytes_total: 5 };
    let log_cursor = driftless_core::LogCursor { position: 7, tag: 1 };
    let at = driftless_core::SnapshotAt { resume: vec![1], log_cursor, progress };
    store.apply_snapshot_page(&driftless_core::Batch::default(), &[], &at, false, resets).expect("page");
    drop(store);
    let out = String::from_utf8_lossy(&agent(&["status", "--db", db]).stdout).into_owned();
    assert!(out.contains("snapshot:        under way: 2000 of 10000 rows (8000 left), 1 of 5 bytes (4 left)"), "{out}");
}
