//! The gateway's command line: commands that only read refuse a missing database, and the
//! report stays readable however many dead letters there are.

use std::process::{Command, Output};

use driftless_gateway::{GatewayStore, SqliteStore};

fn gateway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftless-gateway")).args(args).output().expect("run driftless-gateway")
}

#[test]
fn reading_commands_refuse_a_missing_database_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let typo = dir.path().join("typo.db");
    let typo = typo.to_str().expect("utf-8 path");
    for args in [
        vec!["report", "--db", typo],
        vec!["--db", typo, "--report"],
        vec!["purge-dead-letters", "--db", typo, "--older-than-days", "1"],
    ] {
        let out = gateway(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"), "{args:?}");
    }
    assert!(!std::path::Path::new(typo).exists());
}

#[test]
fn the_report_lists_the_newest_dead_letters_counts_the_rest_and_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("gw.db");
    let mut store = SqliteStore::open(&db).expect("open");
    for i in 0..300 {
        let device = if i % 3 == 0 { "tab-a" } else { "tab-b" };
        store.dead_letter("acme", device, &format!("undecodable message: junk {i}"), b"junk").expect("letter");
    }
    store.dead_letter("acme", "tab-a", "batch refused: NULL key", b"x").expect("letter");
    drop(store);
    let db = db.to_str().expect("utf-8 path");
    let out = gateway(&["report", "--db", db]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() < 40, "the report is bounded:\n{text}");
    assert!(text.contains("dead letters: 301"), "{text}");
    assert!(text.contains("300  undecodable message: junk"), "{text}");
    let only = gateway(&["report", "--db", db, "--reason", "NULL key", "--limit", "5"]);
    let text = String::from_utf8_lossy(&only.stdout);
    assert!(text.contains("dead letters: 1") && text.contains("batch refused: NULL key"), "{text}");
    let purge = gateway(&["purge-dead-letters", "--db", db, "--older-than-days", "0"]);
    assert!(purge.status.success());
    assert!(String::from_utf8_lossy(&purge.stdout).contains("deleted 301"));
}
