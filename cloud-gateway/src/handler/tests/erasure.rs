//! What a delete erases: the row's values leave the gateway's rows and log and every
//! device's store, on disk, while what convergence needs stays. Each on both stores.

use std::path::Path;

use driftless_core::{Batch, Value};

use super::*;
use crate::storage::test_backends::{Backend, on_every_store};

on_every_store!(
    a_delete_erases_the_values_from_the_gateway_and_every_device,
    a_write_the_delete_did_not_see_stays_as_its_conflict,
    entries_logged_before_the_upgrade_are_erased_too,
);

/// A device with a table of documents (delete-wins, the default).
fn device(b: &Backend, name: &str) -> Store {
    let mut s = Store::open(b.scratch().join(format!("{name}.db")), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE doc (id TEXT PRIMARY KEY, title TEXT, body BLOB)")?))
        .expect("schema");
    s.track("doc", TableSpec::new()).expect("track");
    s
}

/// Bytes no compressor shrinks, so a copy of them anywhere is a copy verbatim.
fn secret() -> Vec<u8> {
    let mut bytes = vec![0u8; 6_000];
    getrandom::fill(&mut bytes).expect("random");
    bytes
}

/// Pieces of `secret` small enough to sit whole in one page of any file holding it.
fn pieces(secret: &[u8]) -> Vec<&[u8]> {
    (0..secret.len() - 24).step_by(500).map(|i| &secret[i..i + 24]).collect()
}

fn holds(haystack: &[u8], secret: &[u8]) -> bool {
    pieces(secret).iter().any(|p| haystack.windows(p.len()).any(|w| w == *p))
}

/// The files under `dir` (databases and their logs) that hold any piece of `secret`.
fn files_holding(dir: &Path, secret: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_file() && holds(&std::fs::read(&path).expect("read"), secret) {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Every stored row state and log entry of the gateway, as bytes.
fn gateway_blobs(b: &Backend) -> Vec<Vec<u8>> {
    let prefix = if matches!(b, Backend::Pg(_)) { "driftless." } else { "" };
    let sql = format!("SELECT state FROM {prefix}gw_rows UNION ALL SELECT change FROM {prefix}gw_log");
    b.rows(&sql)
        .into_iter()
        .map(|r| match &r[0] {
            Value::Blob(bytes) => bytes.clone(),
            other => panic!("expected bytes, got {other:?}"),
        })
        .collect()
}

fn gateway_holds(b: &Backend, secret: &[u8]) -> bool {
    gateway_blobs(b).iter().any(|blob| holds(blob, secret))
}

/// What `write` wrote on `store`, shipped to the gateway as device `id` and acknowledged.
fn ship_write(
    gw: &mut dyn GatewayStore,
    store: &mut Store,
    id: &str,
    write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
) -> Batch {
    store.write(|tx| Ok(write(tx)?)).expect("write");
    let out = store.outbox_batch(1_000).expect("outbox").expect("batch");
    assert_eq!(super::security::refused(&super::security::ship(gw, id, &out.batch)), Vec::<String>::new());
    store.ack(out.first_seq, out.last_seq).expect("ack");
    out.batch
}

fn ship(gw: &mut dyn GatewayStore, store: &mut Store, id: &str, sql: &str) -> Batch {
    ship_write(gw, store, id, |tx| tx.execute_batch(sql))
}

/// Row d1 inserted on `store` with `title` and `body`, shipped.
fn ship_insert(gw: &mut dyn GatewayStore, store: &mut Store, title: &str, body: &[u8]) -> Batch {
    ship_write(gw, store, "a", |tx| {
        tx.execute("INSERT INTO doc VALUES ('d1', ?1, ?2)", rusqlite::params![title, body]).map(|_| ())
    })
}

/// Everything the gateway logged that `id` did not write, applied to `store`.
fn catch_up(gw: &mut dyn GatewayStore, store: &mut Store, id: &str) {
    let page = gw.changes_after("t", id, 0, 10_000).expect("changes");
    store.apply(&page.batch).expect("apply");
}

/// Every replica's write-ahead log copied into its database and truncated.
fn checkpoint_all(b: &Backend, devices: &mut [&mut Store]) {
    for d in devices.iter_mut() {
        assert!(d.checkpoint().expect("checkpoint"));
    }
    if let Backend::Sqlite(dir) = b {
        let conn = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).expect("checkpoint");
        assert_eq!(busy, 0);
    }
}

fn a_delete_erases_the_values_from_the_gateway_and_every_device(b: &Backend) {
    let mut gw = b.open();
    let (mut a, mut c) = (device(b, "a"), device(b, "c"));
    let body = secret();
    let title = String::from_utf8_lossy(&secret()[..2_000]).into_owned();
    let insert = ship_insert(&mut *gw, &mut a, &title, &body);
    // An edit logged on its own: its value is erased too, and so is the one it replaced.
    ship(&mut *gw, &mut a, "a", "UPDATE doc SET title = 'second title'");
    catch_up(&mut *gw, &mut c, "c");
    checkpoint_all(b, &mut [&mut a, &mut c]);
    // The control: before the delete, every replica holds the bytes where the scan looks.
    assert!(gateway_holds(b, &body) && gateway_holds(b, title.as_bytes()));
    assert_eq!(files_holding(b.scratch(), &body).len(), 2 + usize::from(matches!(b, Backend::Sqlite(_))));

    ship(&mut *gw, &mut a, "a", "DELETE FROM doc WHERE id = 'd1'");
    catch_up(&mut *gw, &mut c, "c");
    checkpoint_all(b, &mut [&mut a, &mut c]);
    assert!(!gateway_holds(b, &body), "the gateway's rows or log hold the body");
    assert!(!gateway_holds(b, title.as_bytes()), "the gateway's rows or log hold the title");
    assert!(!gateway_blobs(b).iter().any(|blob| blob.windows(12).any(|w| w == b"second title")));
    assert_eq!(files_holding(b.scratch(), &body), Vec::<String>::new());
    assert_eq!(files_holding(b.scratch(), title.as_bytes()), Vec::<String>::new());

    // What convergence needs stayed: a copy of the insert arriving late changes nothing, and
    // the row can be inserted again.
    let page = gw.changes_after("t", "late", 0, 10_000).expect("changes");
    let mut late = device(b, "late");
    late.apply(&page.batch).expect("apply");
    let count = |s: &Store| s.read(|c| Ok(c.query_row("SELECT count(*) FROM doc", [], |r| r.get::<_, i64>(0))?));
    assert_eq!(count(&late).expect("count"), 0);
    // Nor does a device pulling one change at a time ever see the row alive without values.
    let mut paged = device(b, "paged");
    let mut cursor = 0;
    loop {
        let page = gw.changes_after("t", "paged", cursor, 1).expect("changes");
        paged.apply(&page.batch).expect("apply");
        assert_eq!(count(&paged).expect("count"), 0, "after position {}", page.cursor.position);
        cursor = page.cursor.position;
        if !page.more {
            break;
        }
    }
    assert!(c.apply(&insert).expect("apply").applied == 0);
    assert_eq!(count(&c).expect("count"), 0);
    ship(&mut *gw, &mut a, "a", "INSERT INTO doc VALUES ('d1', 'again', NULL)");
    catch_up(&mut *gw, &mut c, "c");
    let title_of = |s: &Store| s.read(|c| Ok(c.query_row("SELECT title FROM doc", [], |r| r.get::<_, String>(0))?));
    assert_eq!(title_of(&c).expect("row"), "again");
}

fn a_write_the_delete_did_not_see_stays_as_its_conflict(b: &Backend) {
    let mut gw = b.open();
    let (mut a, mut c) = (device(b, "a"), device(b, "c"));
    let body = secret();
    ship_insert(&mut *gw, &mut a, "first", &body);
    catch_up(&mut *gw, &mut c, "c");
    // c edits the title before it hears of a's delete.
    ship(&mut *gw, &mut a, "a", "DELETE FROM doc");
    ship(&mut *gw, &mut c, "c", "UPDATE doc SET title = 'written meanwhile'");
    catch_up(&mut *gw, &mut a, "a");
    catch_up(&mut *gw, &mut c, "c");
    checkpoint_all(b, &mut [&mut a, &mut c]);
    assert!(!gateway_holds(b, &body));
    assert_eq!(files_holding(b.scratch(), &body), Vec::<String>::new());
    for s in [&a, &c] {
        let conflicts = s.conflicts().expect("conflicts");
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].record.losers[0].value, Some(Value::Text("written meanwhile".into())));
    }
}

fn entries_logged_before_the_upgrade_are_erased_too(b: &Backend) {
    let mut gw = b.open();
    let mut a = device(b, "a");
    let body = secret();
    ship_insert(&mut *gw, &mut a, "old", &body);
    drop(gw);
    // As a store of the version before the index would hold it.
    match b {
        Backend::Sqlite(_) => b.exec(
            "DROP TABLE gw_log_keys; ALTER TABLE gw_registry DROP COLUMN secret;
                 DROP INDEX gw_log_unscoped; DROP TABLE gw_log_scopes; ALTER TABLE gw_devices DROP COLUMN feed_told; ALTER TABLE gw_log DROP COLUMN moves; ALTER TABLE gw_registry DROP COLUMN params;
                 ALTER TABLE gw_registry DROP COLUMN scope_version; ALTER TABLE gw_devices DROP COLUMN scope_told;
                 DROP TABLE gw_scope_rows; DROP TABLE gw_ref_names; DROP TABLE gw_ref_counts;
                 PRAGMA user_version = 10",
            None,
        ),
        Backend::Pg(_) => b.exec(
            "DROP TABLE driftless.gw_log_keys; ALTER TABLE driftless.gw_registry DROP COLUMN secret;
             ALTER TABLE driftless.gw_log DROP COLUMN moves; ALTER TABLE driftless.gw_registry DROP COLUMN params;
             ALTER TABLE driftless.gw_registry DROP COLUMN scope_version;
             ALTER TABLE driftless.gw_devices DROP COLUMN scope_told; DROP TABLE driftless.gw_scope_rows;
             DROP TABLE driftless.gw_log_scopes; ALTER TABLE driftless.gw_devices DROP COLUMN feed_told;
             DROP TABLE driftless.gw_ref_names; DROP TABLE driftless.gw_ref_counts;
             DELETE FROM driftless.gw_migrations WHERE version >= 4",
            None,
        ),
    }
    let mut gw = b.open();
    ship(&mut *gw, &mut a, "a", "DELETE FROM doc");
    assert!(!gateway_holds(b, &body));
}
