use driftless_core::StoreOptions;

use super::*;
use crate::storage::tests::{device_batch, merge};

#[test]
fn a_store_made_by_the_previous_version_is_upgraded_and_merges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    drop(SqliteStore::open(&path).expect("open"));
    // What version 2 left: no receipt columns.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "ALTER TABLE gw_devices DROP COLUMN receipt_pos; ALTER TABLE gw_devices DROP COLUMN receipt_tag;
         ALTER TABLE gw_devices DROP COLUMN scope_told; ALTER TABLE gw_log DROP COLUMN moves; DROP TABLE gw_scope_rows;
         DROP TABLE gw_sync_schema; DROP TABLE gw_tenant_tables;
         DROP TABLE gw_cloud_writers; DROP TABLE gw_writing; DROP TABLE gw_registry; DROP TABLE gw_epoch_devices; DROP TABLE gw_foreign_epochs; DROP TABLE gw_log_keys;
         DROP INDEX gw_dead_letters_by_device;
         ALTER TABLE gw_nodes DROP COLUMN role; PRAGMA user_version = 2;",
    )
    .expect("downgrade");
    drop(conn);
    let mut gw = SqliteStore::open(&path).expect("reopen");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let first = merge(&mut gw, "tab-1", &batch).expect("merge");
    assert_eq!(first.receipt, first.logged);
    let again = merge(&mut gw, "tab-1", &batch).expect("merge again");
    assert_eq!(again.previous, first.logged);
}

#[test]
fn opening_a_missing_store_to_look_at_it_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(SqliteStore::open_existing(dir.path().join("typo.db")), Err(Error::MissingDatabase(_))));
    assert!(!dir.path().join("typo.db").exists());
}
