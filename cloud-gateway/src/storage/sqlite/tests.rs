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
         ALTER TABLE gw_devices DROP COLUMN scope_told; DROP INDEX gw_log_unscoped; DROP TABLE gw_log_scopes; ALTER TABLE gw_devices DROP COLUMN feed_told; ALTER TABLE gw_log DROP COLUMN moves; DROP TABLE gw_scope_rows;
         DROP TABLE gw_ref_names; DROP TABLE gw_ref_counts;
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

#[test]
fn entries_logged_before_the_scope_index_concern_every_scope() {
    use driftless_core::LogCursor;
    use driftless_core::scope::DeviceScope;

    use crate::storage::chains::Chain;
    use crate::storage::tests::{SCOPED_AND_PARTS, ship_in_scope};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    let mut gw = SqliteStore::open(&path).expect("open");
    gw.install_schema(SCOPED_AND_PARTS).expect("install");
    let schema = driftless_core::SyncSchema::parse(SCOPED_AND_PARTS).expect("schema");
    let of = |region: &str| DeviceScope::of(&schema, "d", &[("region".to_owned(), region.to_owned())].into());
    let mut dev = driftless_core::Store::open(dir.path().join("n.db"), StoreOptions::default()).expect("open");
    dev.follow_schema(1, SCOPED_AND_PARTS).expect("follow");
    let old = ship_in_scope(&mut gw, &mut dev, "tab-n", &of("north"), "INSERT INTO w VALUES ('w1', 'north')");
    drop(gw);
    // As version 14 left it: scoped entries, no index of the scopes they concern.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch("DROP INDEX gw_log_unscoped; DROP TABLE gw_log_scopes; ALTER TABLE gw_devices DROP COLUMN feed_told; DROP TABLE gw_ref_names; DROP TABLE gw_ref_counts; PRAGMA user_version = 14;")
        .expect("downgrade");
    drop(conn);
    let mut gw = SqliteStore::open(&path).expect("reopen");
    let east = Chain::of(&of("east"));
    assert_eq!(gw.chain_before("acme", &east, old.position + 1).expect("before"), old, "of every chain");
    let new = ship_in_scope(&mut gw, &mut dev, "tab-n", &of("north"), "INSERT INTO w VALUES ('w2', 'north')");
    assert_eq!(gw.chain_before("acme", &east, new.position + 1).expect("before"), old, "new ones by their scopes");
    assert_ne!(new, LogCursor::default());
}

#[test]
fn the_registry_tells_the_broker_each_devices_scope_under_the_newest_schema() {
    use crate::broker::Registry;
    use crate::storage::chains::scope_of;
    use crate::storage::tests::SCOPED_AND_PARTS;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    let mut gw = SqliteStore::open(&path).expect("open");
    let registry = SqliteRegistry::open(&path).expect("registry");
    let tab = vec![("acme".to_owned(), "tab".to_owned())];
    assert_eq!(registry.scopes(&tab).expect("scopes"), vec![None], "no schema, no scope");
    gw.install_schema(SCOPED_AND_PARTS).expect("install");
    gw.register_device("acme", "tab", "field", None, 1).expect("register");
    gw.set_params("acme", "tab", &[("region".to_owned(), "north".to_owned())].into()).expect("params");
    let north = registry.scopes(&tab).expect("scopes");
    assert_eq!(north, vec![scope_of(&mut gw, "acme", "tab").expect("scope")]);
    assert!(north[0].is_some());
    gw.set_params("acme", "tab", &[("region".to_owned(), "south".to_owned())].into()).expect("params");
    let south = registry.scopes(&tab).expect("scopes");
    assert_ne!(south, north);
    // A new version that scopes another table renames every scope.
    let visits = "\n[[table]]\nname = \"visits\"\nkey = [\"id\"]\nscope = \"region = :region\"\n\
                  [[table.column]]\nname = \"id\"\ntype = \"text\"\n\
                  [[table.column]]\nname = \"region\"\ntype = \"text\"\n";
    gw.install_schema(&format!("{SCOPED_AND_PARTS}{visits}")).expect("a new version");
    let renamed = registry.scopes(&tab).expect("scopes");
    assert_ne!(renamed, south);
    assert_eq!(renamed, vec![scope_of(&mut gw, "acme", "tab").expect("scope")]);
    let unknown = vec![("acme".to_owned(), "nobody".to_owned())];
    assert_eq!(registry.scopes(&unknown).expect("scopes"), vec![None], "not registered");
}

/// A cached statement keeps its plan whatever is bound to it: SQLite would otherwise compile
/// queries such as the log's head (by tenant, ordered by position) again for every tenant.
#[test]
fn cached_statements_are_not_compiled_again_for_each_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    for tenant in ["t1", "t2", "t3", "t4"] {
        gw.log_head(tenant).expect("head");
        gw.standing(tenant, "tab-1").expect("standing");
    }
    // The statement `log_head` runs, as the cache holds it.
    let head = gw.conn.prepare_cached("SELECT seq, tag FROM gw_log WHERE tenant = ?1 ORDER BY seq DESC LIMIT 1");
    assert_eq!(head.expect("cached").get_status(rusqlite::StatementStatus::RePrepare), 0);
}

/// A group keeps no savepoints until a message fails part-way in one: then that group can
/// only be abandoned whole, and the next ones keep a savepoint per message, so a message
/// failing again fails alone.
#[test]
fn a_merge_failing_part_way_spoils_a_group_without_savepoints_and_the_next_groups_keep_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    // The store fails on tab-2's log entry, after its rows were written.
    gw.conn
        .execute_batch(
            "CREATE TRIGGER fail_tab2 BEFORE INSERT ON gw_log WHEN NEW.origin = 'tab-2'
             BEGIN SELECT RAISE(FAIL, 'the disk failed'); END",
        )
        .expect("trigger");
    let one = device_batch(dir.path(), "d1.db", StoreOptions::default());
    let two = device_batch(dir.path(), "d2.db", StoreOptions::default());
    let rows = |gw: &SqliteStore| -> (i64, Option<String>) {
        let sql = "SELECT count(*), group_concat(hex(state)) FROM (SELECT state FROM gw_rows ORDER BY pk)";
        gw.conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?))).expect("rows")
    };
    gw.begin_group().expect("group");
    merge(&mut gw, "tab-1", &one).expect("merged");
    assert!(!gw.group_spoiled());
    assert!(merge(&mut gw, "tab-2", &two).is_err());
    assert!(gw.group_spoiled(), "half a merge is in the group");
    assert!(gw.commit_group().is_err(), "a spoiled group is never called durable");
    assert_eq!(rows(&gw), (0, None), "nothing of it was kept");
    // Done again, as the service does, with savepoints: tab-2 fails alone.
    gw.begin_group().expect("group");
    merge(&mut gw, "tab-1", &one).expect("merged");
    let tab1 = rows(&gw);
    assert_eq!(tab1.0, 2);
    assert!(merge(&mut gw, "tab-2", &two).is_err());
    assert!(!gw.group_spoiled());
    gw.commit_group().expect("committed");
    assert_eq!(rows(&gw), tab1, "tab-1's rows as it left them: nothing of tab-2's");
    let logged: i64 = gw.conn.query_row("SELECT count(*) FROM gw_log", [], |r| r.get(0)).expect("count");
    assert_eq!(logged, 1);
    // Abandoning rolls back all of a group.
    gw.begin_group().expect("group");
    gw.touch_device("acme", "tab-3", None).expect("touched");
    gw.abandon_group().expect("abandoned");
    let devices: i64 =
        gw.conn.query_row("SELECT count(*) FROM gw_devices WHERE device = 'tab-3'", [], |r| r.get(0)).expect("count");
    assert_eq!(devices, 0);
}

/// A snapshot's size is kept by the log position it was counted at: counted in a group that
/// is then rolled back, that position goes to other entries, and the size must not stay.
#[test]
fn what_a_rolled_back_group_worked_out_is_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
    gw.begin_group().expect("begin");
    gw.kept().expect("kept").keep_size("t", "all", 0, 7, (10, 1_000));
    assert_eq!(gw.kept().expect("kept").size("t", "all", 0, 7), Some((10, 1_000)));
    gw.abandon_group().expect("abandon");
    assert_eq!(gw.kept().expect("kept").size("t", "all", 0, 7), None);
}
