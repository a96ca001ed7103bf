use std::path::Path;

use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec, Value};

use super::*;

const NOW: u64 = 1_800_000_000_000;
const DRIFT: u64 = 300_000;

fn device_batch(dir: &Path, name: &str, opts: StoreOptions) -> Batch {
    let mut s = Store::open(dir.join(name), opts).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?))
        .expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
    s.write(|tx| Ok(tx.execute_batch("INSERT INTO t VALUES ('a', 5), ('b', 1)")?)).expect("insert");
    s.outbox_batch(100).expect("outbox").expect("batch").batch
}

fn merge(gw: &mut SqliteStore, device: &str, batch: &Batch) -> Result<MergeOutcome, MergeError> {
    let from = Incoming { tenant: "acme", device, first_seq: 1, last_seq: 2, now_ms: NOW, max_drift_ms: DRIFT };
    gw.merge(&from, batch)
}

#[test]
fn merging_the_same_batch_again_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    let first = merge(&mut gw, "tab-1", &batch).expect("merge");
    assert_eq!((first.applied, first.duplicates), (2, 0));
    assert_eq!(first.logged.map(|l| l.position), Some(1));
    for _ in 0..4 {
        let again = merge(&mut gw, "tab-1", &batch).expect("merge");
        assert_eq!((again.applied, again.duplicates, again.logged), (0, 2, None));
        // The copy's receipt is the entry whose state already held it (the first copy's ack
        // may be the one that was lost), following the receipt given before.
        assert_eq!((again.receipt, again.previous), (first.logged, first.logged));
    }
    assert_eq!(gw.log_head("acme").expect("head").position, 1);
    // The device that sent the changes is not sent them back; another device is.
    assert!(gw.changes_after("acme", "tab-1", 0, 100).expect("page").batch.rows.is_empty());
    let page = gw.changes_after("acme", "tab-2", 0, 100).expect("page");
    assert_eq!((page.batch.rows.len(), page.cursor.position, page.more), (2, 1, false));
    assert_eq!(Some(page.cursor.tag), gw.log_tag("acme", 1).expect("tag"));
    // Tenants are separate.
    assert_eq!(gw.log_head("other").expect("head").position, 0);
    assert_eq!(gw.log_tag("other", 1).expect("tag"), None);
}

#[test]
fn snapshot_pages_cover_every_row_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    merge(&mut gw, "tab-1", &batch).expect("merge");
    let first = gw.snapshot_page("acme", &[], 1).expect("page").expect("a page");
    assert_eq!((first.batch.rows.len(), first.done), (1, false));
    let second = gw.snapshot_page("acme", &first.resume, 1).expect("page").expect("a page");
    let third = gw.snapshot_page("acme", &second.resume, 1).expect("page").expect("a page");
    assert_eq!(second.batch.rows.len(), 1);
    assert!(third.done && third.batch.rows.is_empty());
    assert_ne!(first.batch.rows[0].pk, second.batch.rows[0].pk);
}

#[test]
fn rows_no_device_could_apply_are_refused_and_never_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    merge(&mut gw, "tab-1", &batch).expect("merge");
    let mut null_key = batch.clone();
    null_key.rows[1].pk = vec![Value::Null];
    let mut two_keys = batch.clone();
    two_keys.rows[1].pk.push(Value::Integer(7));
    for (bad, why) in [(null_key, "NULL key"), (two_keys, "key columns")] {
        let outcome = merge(&mut gw, "tab-1", &bad).expect("merge");
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.refused[0].0, 1);
        assert!(outcome.refused[0].1.contains(why), "{:?}", outcome.refused);
    }
    assert_eq!(gw.log_head("acme").expect("head").position, 1, "nothing was logged");
}

#[test]
fn timestamps_from_a_clock_far_ahead_are_bounded_flagged_and_sent_back_to_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let year = 365 * 86_400_000;
    let ahead = StoreOptions { clock: std::sync::Arc::new(move || NOW + year), ..StoreOptions::default() };
    let batch = device_batch(dir.path(), "d.db", ahead);
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    let outcome = merge(&mut gw, "tab-1", &batch).expect("merge");
    assert!(outcome.bounded > 0);
    let skew = gw.clock_skew("acme").expect("skew");
    assert_eq!(skew.len(), 1);
    assert!(skew[0].max_hlc.millis() >= NOW + year - 1_000);
    // The writer itself is sent the bounded change, and every timestamp in it is bounded.
    let page = gw.changes_after("acme", "tab-1", 0, 100).expect("page");
    assert_eq!(page.batch.rows.len(), 2);
    for row in &page.batch.rows {
        let (_, hlc) = row.state.max_hlc().expect("a write");
        assert!(hlc.millis() <= NOW, "{hlc:?}");
    }
}

#[test]
fn a_node_is_bound_to_the_first_device_that_says_it_writes_as_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let node = batch.rows[0].state.life.entries[0].dot.node;
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    let view = gw.hello("acme", "tab-1", node).expect("hello");
    assert_eq!((view.node_counter, view.device_seq, view.node_owner.as_str()), (0, 0, "tab-1"));
    merge(&mut gw, "tab-1", &batch).expect("merge");
    let view = gw.hello("acme", "tab-1", node).expect("hello");
    assert_eq!((view.node_counter, view.device_seq), (2, 2));
    // A copy of tab-1's database on another device says the same node.
    assert_eq!(gw.hello("acme", "tab-9", node).expect("hello").node_owner, "tab-1");
}

#[test]
fn epochs_are_per_tenant_survive_reopening_and_change_once_per_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = SqliteStore::open(dir.path().join("gw.db")).expect("open").epoch("acme").expect("epoch");
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    assert_eq!(gw.epoch("acme").expect("epoch"), first);
    assert_ne!(gw.epoch("other").expect("epoch"), first);
    // A second instance sharing the file, still believing in the first epoch.
    let mut other = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    assert_eq!(other.epoch("acme").expect("epoch"), first);
    let next = gw.new_epoch("acme", first, "test").expect("new epoch");
    assert_ne!(next, first);
    // Others noticing the same loss under the epoch it replaced start nothing new.
    assert_eq!(gw.new_epoch("acme", first, "test again").expect("new epoch"), next);
    assert_eq!(other.epoch("acme").expect("cached"), first, "the other instance's cache is stale");
    assert_eq!(other.epoch_now("acme").expect("reread"), next);
    assert_eq!(other.new_epoch("acme", first, "seen by another instance").expect("new epoch"), next);
    assert_eq!(other.epoch("acme").expect("epoch"), next);
    // A loss noticed under the new epoch is a new restore.
    let third = other.new_epoch("acme", next, "restored again").expect("new epoch");
    assert!(third != next && third != first);
    assert_eq!(SqliteStore::open(dir.path().join("gw.db")).expect("open").epoch("acme").expect("epoch"), third);
    assert!(matches!(SqliteStore::open_existing(dir.path().join("typo.db")), Err(Error::MissingDatabase(_))));
    assert!(!dir.path().join("typo.db").exists());
}

#[test]
fn one_bad_row_is_refused_and_the_rest_of_its_batch_merged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = device_batch(dir.path(), "d.db", StoreOptions::default());
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    let mut mixed = batch.clone();
    mixed.rows[0].pk = vec![Value::Null];
    let outcome = merge(&mut gw, "tab-1", &mixed).expect("merge");
    assert_eq!(outcome.applied, 1);
    assert_eq!(outcome.refused.len(), 1);
    assert_eq!(outcome.refused[0].0, 0);
    let from = Incoming {
        tenant: "acme",
        device: "tab-1",
        first_seq: 5,
        last_seq: i64::MAX,
        now_ms: NOW,
        max_drift_ms: DRIFT,
    };
    assert!(matches!(gw.merge(&from, &batch), Err(MergeError::Refused(_))), "an impossible range");
}

#[test]
fn large_dead_letters_are_kept_by_reference_and_can_be_filtered_and_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    gw.dead_letter("acme", "tab-1", "too large", &vec![7u8; 1 << 20]).expect("letter");
    gw.dead_letter("acme", "tab-2", "undecodable", b"xyz").expect("letter");
    let all = gw.dead_letters(&DeadLetterFilter::default()).expect("letters");
    assert_eq!(all.len(), 2);
    let big = &all[1];
    assert_eq!((big.size, big.payload.len(), big.sha256.len()), (1 << 20, 4096, 64));
    let only =
        gw.dead_letters(&DeadLetterFilter { device: Some("tab-2".into()), ..Default::default() }).expect("letters");
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].payload, b"xyz");
    let by_reason =
        gw.dead_letters(&DeadLetterFilter { reason: Some("large".into()), ..Default::default() }).expect("letters");
    assert_eq!(by_reason.len(), 1);
    assert_eq!(gw.purge_dead_letters(i64::MAX).expect("purge"), 2);
}

#[test]
fn a_store_made_by_the_previous_version_is_upgraded_and_merges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    drop(SqliteStore::open(&path).expect("open"));
    // What version 2 left: no receipt columns.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "ALTER TABLE gw_devices DROP COLUMN receipt_pos; ALTER TABLE gw_devices DROP COLUMN receipt_tag;
         DROP TABLE gw_sync_schema; DROP TABLE gw_tenant_tables;
         DROP TABLE gw_cloud_writers; DROP TABLE gw_writing; PRAGMA user_version = 2;",
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
