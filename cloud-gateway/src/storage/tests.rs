//! The gateway-store suite: every test runs on the SQLite store and on the PostgreSQL store.

use std::path::Path;

use driftless_core::{Batch, ColumnPolicy, LogCursor, Store, StoreOptions, TableSpec, Value};

use super::test_backends::{Backend, on_every_store};
use super::{DeadLetterFilter, GatewayStore, Incoming, MergeOutcome, tenants_of};
use crate::error::MergeError;

const NOW: u64 = 1_800_000_000_000;
const DRIFT: u64 = 300_000;

on_every_store!(
    merging_the_same_batch_again_changes_nothing,
    snapshot_pages_cover_every_row_once,
    rows_no_device_could_apply_are_refused_and_never_logged,
    timestamps_from_a_clock_far_ahead_are_bounded_flagged_and_sent_back_to_the_writer,
    a_node_is_bound_to_the_first_device_that_says_it_writes_as_it,
    epochs_are_per_tenant_shared_by_instances_and_change_once_per_restore,
    one_bad_row_is_refused_and_the_rest_of_its_batch_merged,
    large_dead_letters_are_kept_by_reference_and_can_be_filtered_and_purged,
    attempts_are_counted_taken_back_and_cleared,
    pulls_are_recorded_for_the_registry,
    merged_values_reach_the_real_table_bit_exact,
    a_plain_sql_write_is_merged_as_the_role_it_names_and_logged_for_devices,
    a_plain_sql_value_the_schema_refuses_is_dead_lettered_and_the_row_put_back,
    a_key_longer_than_an_index_entry_is_merged_and_snapshotted,
    a_column_added_with_plain_sql_and_declared_later_is_taken_in_not_overwritten,
    each_logged_entry_names_the_tenants_entry_before_it,
    a_pull_in_scope_shows_rows_held_sends_entering_rows_whole_and_evicts_rows_gone,
    entries_are_filed_under_the_scopes_they_concern_and_read_back_by_chain,
);

pub(super) fn device_batch(dir: &Path, name: &str, opts: StoreOptions) -> Batch {
    let mut s = Store::open(dir.join(name), opts).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?))
        .expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
    s.write(|tx| Ok(tx.execute_batch("INSERT INTO t VALUES ('a', 5), ('b', 1)")?)).expect("insert");
    s.outbox_batch(100).expect("outbox").expect("batch").batch
}

pub(super) fn merge(gw: &mut dyn GatewayStore, device: &str, batch: &Batch) -> Result<MergeOutcome, MergeError> {
    merge_as(gw, "acme", device, batch)
}

fn merge_as(gw: &mut dyn GatewayStore, tenant: &str, device: &str, batch: &Batch) -> Result<MergeOutcome, MergeError> {
    gw.merge(&Incoming { tenant, device, ..incoming() }, batch)
}

fn merging_the_same_batch_again_changes_nothing(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let mut gw = b.open();
    let first = merge(&mut *gw, "tab-1", &batch).expect("merge");
    assert_eq!((first.applied, first.duplicates), (2, 0));
    let head = first.logged.expect("logged");
    for _ in 0..4 {
        let again = merge(&mut *gw, "tab-1", &batch).expect("merge");
        assert_eq!((again.applied, again.duplicates, again.logged), (0, 2, None));
        // The copy's receipt is the entry whose state already held it.
        assert_eq!((again.receipt, again.previous), (first.logged, first.logged));
    }
    assert_eq!(gw.log_head("acme").expect("head"), head);
    // The device that sent the changes is not sent them back; another device is.
    assert!(gw.changes_after("acme", "tab-1", 0, 100).expect("page").batch.rows.is_empty());
    let page = gw.changes_after("acme", "tab-2", 0, 100).expect("page");
    assert_eq!((page.batch.rows.len(), page.cursor, page.more), (2, head, false));
    assert_eq!(Some(head.tag), gw.log_tag("acme", head.position).expect("tag"));
    // Tenants are separate.
    assert_eq!(gw.log_head("other").expect("head").position, 0);
    assert_eq!(gw.log_tag("other", head.position).expect("tag"), None);
}

fn snapshot_pages_cover_every_row_once(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let mut gw = b.open();
    merge(&mut *gw, "tab-1", &batch).expect("merge");
    let first = gw.snapshot_page("acme", &[], 1).expect("page").expect("a page");
    assert_eq!((first.batch.rows.len(), first.done), (1, false));
    let second = gw.snapshot_page("acme", &first.resume, 1).expect("page").expect("a page");
    let third = gw.snapshot_page("acme", &second.resume, 1).expect("page").expect("a page");
    assert_eq!(second.batch.rows.len(), 1);
    assert!(third.done && third.batch.rows.is_empty());
    assert_ne!(first.batch.rows[0].pk, second.batch.rows[0].pk);
    assert!(gw.snapshot_page("acme", &[1, 0], 1).expect("page").is_none(), "not a token of this store");
}

fn rows_no_device_could_apply_are_refused_and_never_logged(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let mut gw = b.open();
    let head = merge(&mut *gw, "tab-1", &batch).expect("merge").logged;
    let mut null_key = batch.clone();
    null_key.rows[1].pk = vec![Value::Null];
    let mut two_keys = batch.clone();
    two_keys.rows[1].pk.push(Value::Integer(7));
    for (bad, why) in [(null_key, "NULL key"), (two_keys, "key columns")] {
        let outcome = merge(&mut *gw, "tab-1", &bad).expect("merge");
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.refused[0].0, 1);
        assert!(outcome.refused[0].1.contains(why), "{:?}", outcome.refused);
    }
    assert_eq!(Some(gw.log_head("acme").expect("head")), head, "nothing was logged");
}

fn timestamps_from_a_clock_far_ahead_are_bounded_flagged_and_sent_back_to_the_writer(b: &Backend) {
    let year = 365 * 86_400_000;
    let ahead = StoreOptions { clock: std::sync::Arc::new(move || NOW + year), ..StoreOptions::default() };
    let batch = device_batch(b.scratch(), "d.db", ahead);
    let mut gw = b.open();
    let outcome = merge(&mut *gw, "tab-1", &batch).expect("merge");
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

fn a_node_is_bound_to_the_first_device_that_says_it_writes_as_it(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let node = batch.rows[0].state.life.entries[0].dot.node;
    let mut gw = b.open();
    let view = gw.hello("acme", "tab-1", node).expect("hello");
    assert_eq!((view.node_counter, view.device_seq, view.node_owner.as_str()), (0, 0, "tab-1"));
    merge(&mut *gw, "tab-1", &batch).expect("merge");
    let view = gw.hello("acme", "tab-1", node).expect("hello");
    assert_eq!((view.node_counter, view.device_seq), (2, 2));
    // A copy of tab-1's database on another device says the same node.
    assert_eq!(gw.hello("acme", "tab-9", node).expect("hello").node_owner, "tab-1");
}

fn epochs_are_per_tenant_shared_by_instances_and_change_once_per_restore(b: &Backend) {
    let first = b.open().epoch("acme").expect("epoch");
    let mut gw = b.open();
    assert_eq!(gw.epoch("acme").expect("epoch"), first);
    assert_ne!(gw.epoch("other").expect("epoch"), first);
    // A second instance sharing the store, still believing in the first epoch.
    let mut other = b.open();
    assert_eq!(other.epoch("acme").expect("epoch"), first);
    let next = gw.new_epoch("acme", first, "test").expect("new epoch");
    assert_ne!(next, first);
    assert_eq!(gw.new_epoch("acme", first, "test again").expect("new epoch"), next);
    assert_eq!(other.epoch("acme").expect("cached"), first, "the other instance's cache is stale");
    assert_eq!(other.epoch_now("acme").expect("reread"), next);
    assert_eq!(other.new_epoch("acme", first, "seen by another instance").expect("new epoch"), next);
    let third = other.new_epoch("acme", next, "restored again").expect("new epoch");
    assert!(third != next && third != first);
    assert_eq!(b.open().epoch("acme").expect("epoch"), third);
}

fn one_bad_row_is_refused_and_the_rest_of_its_batch_merged(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let mut gw = b.open();
    let mut mixed = batch.clone();
    mixed.rows[0].pk = vec![Value::Null];
    let outcome = merge(&mut *gw, "tab-1", &mixed).expect("merge");
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
        role: None,
        recovering: false,
        legacy: false,
        scope: None,
    };
    assert!(matches!(gw.merge(&from, &batch), Err(MergeError::Refused(_))), "an impossible range");
}

fn large_dead_letters_are_kept_by_reference_and_can_be_filtered_and_purged(b: &Backend) {
    let mut gw = b.open();
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
    assert_eq!(gw.dead_letters(&DeadLetterFilter { limit: 1, ..Default::default() }).expect("letters").len(), 1);
    assert_eq!(gw.tenants().expect("tenants"), vec!["acme".to_owned()]);
    assert_eq!(gw.purge_dead_letters(i64::MAX).expect("purge"), 2);
    // A device sending only what is refused keeps its newest letters, and others keep theirs.
    gw.dead_letter("acme", "tab-2", "kept", b"other").expect("letter");
    let cap = super::common::DEAD_LETTERS_PER_DEVICE;
    for i in 0..cap + 50 {
        gw.dead_letter("acme", "noisy", &format!("refused {i}"), b"x").expect("letter");
    }
    let noisy = DeadLetterFilter { device: Some("noisy".into()), ..Default::default() };
    let kept = gw.dead_letters(&noisy).expect("letters");
    assert_eq!(kept.len() as i64, cap);
    assert_eq!(kept[0].reason, format!("refused {}", cap + 49), "the newest first");
    assert_eq!(gw.dead_letters(&DeadLetterFilter::default()).expect("letters").len() as i64, cap + 1);
}

fn attempts_are_counted_taken_back_and_cleared(b: &Backend) {
    let mut gw = b.open();
    let key = [9u8; 32];
    assert_eq!(gw.attempts(&key).expect("attempts"), None);
    assert_eq!(gw.note_attempt(&key).expect("note"), 1);
    assert_eq!(gw.note_attempt(&key).expect("note"), 2);
    gw.unnote_attempt(&key).expect("unnote");
    assert_eq!(b.open().attempts(&key).expect("attempts").map(|a| a.0), Some(1), "kept for every instance");
    gw.clear_attempts(&key).expect("clear");
    assert_eq!(gw.attempts(&key).expect("attempts"), None);
}

fn pulls_are_recorded_for_the_registry(b: &Backend) {
    let batch = device_batch(b.scratch(), "d.db", StoreOptions::default());
    let mut gw = b.open();
    let head = merge(&mut *gw, "tab-1", &batch).expect("merge").logged.expect("logged");
    gw.touch_device("acme", "tab-2", Some(head.position)).expect("touch");
    gw.touch_device("acme", "tab-2", None).expect("touch again, no cursor");
    let devices = gw.devices("acme").expect("devices");
    assert_eq!(devices.iter().map(|d| d.device.as_str()).collect::<Vec<_>>(), ["tab-1", "tab-2"]);
    assert_eq!((devices[1].downlink_cursor, devices[1].lag), (head.position, 0));
    assert_eq!((devices[0].uplink_hwm, devices[0].lag), (2, head.position));
}

const SCHEMA: &str = r#"
roles = ["erp", "field"]

[[table]]
name = "t"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "i"
type = "integer"
[[table.column]]
name = "r"
type = "real"
[[table.column]]
name = "s"
type = "text"
[[table.column]]
name = "b"
type = "blob"
[[table.column]]
name = "owner"
type = "text"
policy = "authority:erp>field"
"#;

/// A device following [`SCHEMA`], with `sql` run on it, and the batch it sends.
fn schema_device(dir: &Path, name: &str, sql: &str) -> (Store, Batch) {
    let mut s =
        Store::open(dir.join(name), StoreOptions { role: "field".into(), ..StoreOptions::default() }).expect("open");
    s.follow_schema(1, SCHEMA).expect("follow");
    s.write(|tx| Ok(tx.execute_batch(sql)?)).expect("write");
    let batch = s.outbox_batch(100).expect("outbox").expect("batch").batch;
    (s, batch)
}

fn merged_values_reach_the_real_table_bit_exact(b: &Backend) {
    let mut gw = b.open();
    assert_eq!(gw.install_schema(SCHEMA).expect("schema"), 1);
    let (_, batch) = schema_device(
        b.scratch(),
        "d.db",
        "INSERT INTO t(id, i, r, s, b) VALUES
           ('min', -9223372036854775808, -1.5e-300, 'ünïcödé ✓', x'00ff00'),
           ('max', 9223372036854775807, 1e308, '', x''),
           ('tiny', 0, 5e-324, 'x', NULL)",
    );
    let outcome = merge(&mut *gw, "tab-1", &batch).expect("merge");
    assert_eq!((outcome.applied, outcome.refused.len()), (3, 0));
    let t = b.table("acme", "t");
    let rows = b.rows(&format!("SELECT id, i, r, s, b FROM {t} ORDER BY i"));
    assert_eq!(
        rows,
        vec![
            vec![
                Value::Text("min".into()),
                Value::Integer(i64::MIN),
                Value::Real(-1.5e-300),
                Value::Text("ünïcödé ✓".into()),
                Value::Blob(vec![0, 255, 0])
            ],
            vec![
                Value::Text("tiny".into()),
                Value::Integer(0),
                Value::Real(5e-324),
                Value::Text("x".into()),
                Value::Null
            ],
            vec![
                Value::Text("max".into()),
                Value::Integer(i64::MAX),
                Value::Real(1e308),
                Value::Text(String::new()),
                Value::Blob(Vec::new())
            ],
        ]
    );
}

fn a_plain_sql_write_is_merged_as_the_role_it_names_and_logged_for_devices(b: &Backend) {
    let mut gw = b.open();
    gw.install_schema(SCHEMA).expect("schema");
    let (mut device, batch) =
        schema_device(b.scratch(), "d.db", "INSERT INTO t(id, s, owner) VALUES ('w1', 'new', 'field')");
    let logged = merge(&mut *gw, "tab-1", &batch).expect("merge").logged.expect("logged");
    device.ack(1, 1).ok();
    let t = b.table("acme", "t");
    // The ERP takes the row over and renames it, in one transaction, as role erp.
    match b {
        Backend::Sqlite(_) => b.exec("UPDATE \"acme.t@erp\" SET owner = 'erp', s = 'renamed' WHERE id = 'w1'", None),
        Backend::Pg(_) => b.exec(&format!("UPDATE {t} SET owner = 'erp', s = 'renamed' WHERE id = 'w1'"), Some("erp")),
    }
    // And a plain write without a role adds a row.
    b.exec(&format!("INSERT INTO {t}(id, i) VALUES ('w2', 7)"), None);
    assert_eq!(tenants_of(&gw.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    assert!(gw.ingest_cloud_writes(NOW).expect("ingest again").is_empty(), "taken in once");
    let page = gw.changes_after("acme", "tab-1", logged.position, 100).expect("page");
    assert_eq!(page.batch.rows.len(), 2);
    let roles: Vec<&str> = page.batch.roles.values().map(String::as_str).collect();
    assert!(roles.contains(&"erp") && roles.contains(&"cloud"), "{roles:?}");
    // The device shows both.
    device.apply(&page.batch).expect("apply");
    let shown: Vec<(Option<String>, Option<String>, Option<i64>)> = device
        .read(|c| {
            let mut stmt = c.prepare("SELECT s, owner, i FROM t ORDER BY id")?;
            Ok(stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?)
        })
        .expect("read");
    assert_eq!(shown, vec![(Some("renamed".into()), Some("erp".into()), None), (None, None, Some(7))]);
}

fn a_plain_sql_value_the_schema_refuses_is_dead_lettered_and_the_row_put_back(b: &Backend) {
    let mut gw = b.open();
    gw.install_schema(SCHEMA).expect("schema");
    let (_, batch) = schema_device(b.scratch(), "d.db", "INSERT INTO t(id, r, s) VALUES ('w1', 1.5, 'ok')");
    merge(&mut *gw, "tab-1", &batch).expect("merge");
    let t = b.table("acme", "t");
    // Values each database takes but no replica does: NaN in PostgreSQL (SQLite stores it as
    // NULL), text holding NUL in SQLite (PostgreSQL refuses it itself).
    match b {
        Backend::Sqlite(_) => {
            b.exec(&format!("UPDATE {t} SET r = 2.5, s = 'a' || char(0) || 'b' WHERE id = 'w1'"), None)
        }
        Backend::Pg(_) => b.exec(&format!("UPDATE {t} SET r = 'NaN', s = 'x' WHERE id = 'w1'"), None),
    }
    gw.ingest_cloud_writes(NOW).ok();
    let letters = gw.dead_letters(&DeadLetterFilter::default()).expect("letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].device.starts_with("sql as"), "{letters:?}");
    // Put back, in a column no one had written (`i`) too.
    let expected = vec![vec![Value::Real(1.5), Value::Text("ok".into()), Value::Null]];
    assert_eq!(b.rows(&format!("SELECT r, s, i FROM {t} WHERE id = 'w1'")), expected, "put back");
}

fn a_key_longer_than_an_index_entry_is_merged_and_snapshotted(b: &Backend) {
    let mut s = Store::open(b.scratch().join("long.db"), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)")?)).expect("table");
    s.track("t", TableSpec::new()).expect("track");
    let long = super::test_backends::incompressible(20_000);
    s.write(|tx| Ok(tx.execute("INSERT INTO t VALUES (?1, 'x'), ('short', 'y')", [&long]).map(|_| ())?))
        .expect("insert");
    let batch = s.outbox_batch(100).expect("outbox").expect("batch").batch;
    let mut gw = b.open();
    let outcome = merge(&mut *gw, "tab-1", &batch).expect("merge");
    assert_eq!((outcome.applied, outcome.refused.len()), (2, 0));
    assert_eq!(merge(&mut *gw, "tab-1", &batch).expect("again").duplicates, 2);
    let page = gw.snapshot_page("acme", &[], 10).expect("snapshot").expect("page");
    assert!(page.batch.rows.iter().any(|r| r.pk == [Value::Text(long.clone())]));
}

fn a_column_added_with_plain_sql_and_declared_later_is_taken_in_not_overwritten(b: &Backend) {
    let mut gw = b.open();
    gw.install_schema(SCHEMA).expect("schema");
    let (_, batch) = schema_device(b.scratch(), "d.db", "INSERT INTO t(id, s) VALUES ('w1', 'a'), ('w2', 'b')");
    merge(&mut *gw, "tab-1", &batch).expect("merge");
    let t = b.table("acme", "t");
    // Someone adds a column of their own to the cloud table and fills it...
    b.exec(&format!("ALTER TABLE {t} ADD COLUMN notes TEXT"), None);
    b.exec(&format!("UPDATE {t} SET notes = 'kept' WHERE id = 'w1'"), None);
    gw.ingest_cloud_writes(NOW).expect("ingest");
    // ...and a later schema version declares it: its values are taken in, not overwritten.
    let head = gw.log_head("acme").expect("head");
    assert_eq!(
        gw.install_schema(&format!("{SCHEMA}[[table.column]]\nname = \"notes\"\ntype = \"text\"\n")).expect("v2"),
        2
    );
    let (_, more) = schema_device(b.scratch(), "e.db", "INSERT INTO t(id, s) VALUES ('w3', 'c')");
    let from = Incoming {
        tenant: "acme",
        device: "tab-2",
        first_seq: 1,
        last_seq: 1,
        now_ms: NOW,
        max_drift_ms: DRIFT,
        role: None,
        recovering: false,
        legacy: false,
        scope: None,
    };
    assert!(gw.merge(&from, &more).expect("merge").cloud_logged, "the adopted values were taken in first");
    let rows = b.rows(&format!("SELECT id, notes FROM {t} ORDER BY id"));
    assert_eq!(
        rows,
        vec![
            vec![Value::Text("w1".into()), Value::Text("kept".into())],
            vec![Value::Text("w2".into()), Value::Null],
            vec![Value::Text("w3".into()), Value::Null],
        ]
    );
    let page = gw.changes_after("acme", "tab-9", head.position, 100).expect("pull");
    let w1 = page.batch.rows.iter().find(|r| r.pk == [Value::Text("w1".into())]).expect("w1 sent to devices");
    assert_eq!(w1.state.fields["notes"].entries[0].value, Value::Text("kept".into()));
}

/// What a device needs to apply a published entry in order: its predecessor in the tenant's
/// log, whatever other tenants logged in between, and the change as pulls serve it.
fn each_logged_entry_names_the_tenants_entry_before_it(b: &Backend) {
    let mut gw = b.open();
    let first = merge(&mut *gw, "tab-1", &device_batch(b.scratch(), "a.db", StoreOptions::default())).expect("merge");
    let [e1] = &first.entries[..] else { panic!("one entry: {:?}", first.entries) };
    assert_eq!((e1.previous.position, e1.cursor, e1.origin.as_str()), (0, first.logged.expect("logged"), "tab-1"));
    let page = gw.changes_after("acme", "tab-9", 0, 100).expect("page");
    assert_eq!(e1.change.rows, page.batch.rows, "the entry holds what a pull serves");
    let theirs = merge_as(&mut *gw, "other", "tab-x", &device_batch(b.scratch(), "x.db", StoreOptions::default()))
        .expect("merge");
    assert_eq!(
        theirs.entries.iter().map(|e| e.previous.position).collect::<Vec<_>>(),
        vec![0],
        "tenants' logs are separate"
    );
    let b_batch = device_batch(b.scratch(), "b.db", StoreOptions::default());
    let second = merge(&mut *gw, "tab-2", &b_batch).expect("merge");
    let [e2] = &second.entries[..] else { panic!("one entry: {:?}", second.entries) };
    assert_eq!(e2.previous, e1.cursor, "position and tag");
    assert!(e2.cursor.position > e1.cursor.position);
    // A copy merged again logs nothing, so nothing is published.
    let again = merge(&mut *gw, "tab-2", &b_batch).expect("merge");
    assert!(again.entries.is_empty());
}

const SCOPED: &str = r#"
[[table]]
name = "w"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"
"#;

fn a_pull_in_scope_shows_rows_held_sends_entering_rows_whole_and_evicts_rows_gone(b: &Backend) {
    use driftless_core::scope::DeviceScope;
    let mut gw = b.open();
    gw.install_schema(SCOPED).expect("install");
    let schema = driftless_core::SyncSchema::parse(SCOPED).expect("schema");
    let of = |region: &str| DeviceScope::of(&schema, "d", &[("region".to_owned(), region.to_owned())].into());
    let (north, south) = (of("north"), of("south"));
    let mut dev = Store::open(b.scratch().join("n.db"), StoreOptions::default()).expect("open");
    dev.follow_schema(1, SCOPED).expect("follow");
    let ship = |dev: &mut Store, gw: &mut dyn GatewayStore, sql: &str| {
        dev.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
        let out = dev.outbox_batch(100).expect("outbox").expect("batch");
        dev.ack(out.first_seq, out.last_seq).expect("ack");
        let from = Incoming { tenant: "acme", device: "tab-n", scope: Some(&north), ..incoming() };
        let merged = gw.merge(&from, &out.batch).expect("merge");
        assert!(merged.refused.is_empty() && merged.entries.iter().all(|e| e.scoped()), "{merged:?}");
    };
    ship(&mut dev, &mut *gw, "INSERT INTO w VALUES ('w1', 'north')");
    // Its own new row is not sent back to its writer, and never to a device of another scope.
    let page = gw.changes_in_scope("acme", "tab-n", 0, 100, &north).expect("pull");
    assert_eq!((page.batch.rows.len(), page.evict.rows.len()), (0, 0));
    let page = gw.changes_in_scope("acme", "tab-s", 0, 100, &south).expect("pull");
    assert_eq!((page.batch.rows.len(), page.evict.rows.len()), (0, 0));
    assert_eq!(page.cursor.position, 0, "a pull reads its scope's chain only: nothing yet");
    let page = gw.changes_in_scope("acme", "tab-n", 0, 100, &north).expect("pull");
    let at = page.cursor.position;
    assert_eq!(at, gw.log_head("acme").expect("head").position, "the north's chain holds its own row");
    // Handed to the south: evicted from the north, whole to the south.
    ship(&mut dev, &mut *gw, "UPDATE w SET region = 'south'");
    let page = gw.changes_in_scope("acme", "tab-n", at, 100, &north).expect("pull");
    assert_eq!(page.batch.rows.len(), 0);
    assert_eq!(page.evict.rows.iter().map(|r| r.pk.clone()).collect::<Vec<_>>(), vec![vec![Value::Text("w1".into())]]);
    assert!(page.evict.rows[0].state.fields.is_empty(), "keys only");
    let page = gw.changes_in_scope("acme", "tab-s", at, 100, &south).expect("pull");
    assert_eq!(page.batch.rows.len(), 1);
    assert!(page.batch.rows[0].state.fields.contains_key("region"), "its whole state");
    // Over the whole log, a device of neither end sees nothing, not even a key.
    let none = of("east");
    let page = gw.changes_in_scope("acme", "tab-e", 0, 100, &none).expect("pull");
    assert_eq!((page.batch.rows.len(), page.evict.rows.len()), (0, 0));
    // Unscoped (a schema without scopes): every change, as logged.
    assert_eq!(gw.changes_after("acme", "tab-e", 0, 100).expect("pull").batch.rows.len(), 2);
}

fn incoming() -> Incoming<'static> {
    Incoming {
        tenant: "acme",
        device: "tab-1",
        first_seq: 1,
        last_seq: 2,
        now_ms: NOW,
        max_drift_ms: DRIFT,
        role: None,
        recovering: false,
        legacy: false,
        scope: None,
    }
}

/// A scoped table and one without scope.
pub(super) const SCOPED_AND_PARTS: &str = r#"
[[table]]
name = "w"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"

[[table]]
name = "p"
key = ["sku"]
[[table.column]]
name = "sku"
type = "text"
"#;

/// Ships what `sql` writes on `dev` (a device holding `scope`) and returns its log entry.
pub(super) fn ship_in_scope(
    gw: &mut dyn GatewayStore,
    dev: &mut Store,
    device: &str,
    scope: &driftless_core::scope::DeviceScope,
    sql: &str,
) -> LogCursor {
    dev.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
    let out = dev.outbox_batch(100).expect("outbox").expect("batch");
    dev.ack(out.first_seq, out.last_seq).expect("ack");
    let from = Incoming { tenant: "acme", device, scope: Some(scope), ..incoming() };
    let merged = gw.merge(&from, &out.batch).expect("merge");
    let [entry] = &merged.entries[..] else { panic!("one entry: {merged:?}") };
    entry.cursor
}

fn entries_are_filed_under_the_scopes_they_concern_and_read_back_by_chain(b: &Backend) {
    use driftless_core::scope::DeviceScope;

    use crate::storage::chains::Chain;
    let mut gw = b.open();
    gw.install_schema(SCOPED_AND_PARTS).expect("install");
    let schema = driftless_core::SyncSchema::parse(SCOPED_AND_PARTS).expect("schema");
    let of = |region: &str| DeviceScope::of(&schema, "d", &[("region".to_owned(), region.to_owned())].into());
    let (north, south, east) = (of("north"), of("south"), of("east"));
    let mut n = Store::open(b.scratch().join("n.db"), StoreOptions::default()).expect("open");
    let mut s = Store::open(b.scratch().join("s.db"), StoreOptions::default()).expect("open");
    n.follow_schema(1, SCOPED_AND_PARTS).expect("follow");
    s.follow_schema(1, SCOPED_AND_PARTS).expect("follow");
    let e1 = ship_in_scope(&mut *gw, &mut n, "tab-n", &north, "INSERT INTO w VALUES ('w1', 'north')");
    let e2 = ship_in_scope(&mut *gw, &mut s, "tab-s", &south, "INSERT INTO w VALUES ('w2', 'south')");
    let e3 = ship_in_scope(&mut *gw, &mut s, "tab-s", &south, "INSERT INTO p VALUES ('p1')");
    let e4 = ship_in_scope(&mut *gw, &mut n, "tab-n", &north, "UPDATE w SET region = 'south' WHERE id = 'w1'");
    let (north, south, east) = (Chain::of(&north), Chain::of(&south), Chain::of(&east));
    let before = |gw: &mut dyn GatewayStore, chain: &Chain, at: LogCursor| gw.chain_before("acme", chain, at.position);
    assert_eq!(before(&mut *gw, &north, e4).expect("before"), e3, "a row of a table without scope concerns all");
    assert_eq!(before(&mut *gw, &north, e3).expect("before"), e1, "the south's row is none of the north's");
    assert_eq!(before(&mut *gw, &south, e3).expect("before"), e2);
    assert_eq!(before(&mut *gw, &east, e3).expect("before"), LogCursor::default(), "nothing before");
    let past = LogCursor { position: e4.position + 1, tag: 0 };
    assert_eq!(before(&mut *gw, &east, past).expect("before"), e3);
    let read = |gw: &mut dyn GatewayStore, chain: &Chain, after: LogCursor, limit: usize| {
        let (entries, more) = gw.log_after("acme", after.position, limit, Some(chain)).expect("read");
        (entries.iter().map(|e| e.cursor).collect::<Vec<_>>(), more)
    };
    assert_eq!(read(&mut *gw, &north, LogCursor::default(), 2), (vec![e1, e3], true));
    assert_eq!(read(&mut *gw, &north, e3, 10), (vec![e4], false), "the move left the north");
    assert_eq!(read(&mut *gw, &south, e1, 10), (vec![e2, e3, e4], false), "and entered the south");
    assert_eq!(read(&mut *gw, &east, LogCursor::default(), 10), (vec![e3], false));
    // What a snapshot holds, for a device's progress: w2 and w1 are in the south now.
    let (rows, bytes) = gw.rows_size("acme", None).expect("size");
    assert_eq!(rows, 3, "w1, w2 and p1");
    assert!(bytes > 0);
    assert_eq!(gw.rows_size("acme", Some("w")).expect("size").0, 2);
    let count = |gw: &mut dyn GatewayStore, key: &str| {
        gw.scope_count("acme", "w", &driftless_core::codec::encode_key(&[Value::Text(key.into())])).expect("count")
    };
    assert_eq!((count(&mut *gw, "south"), count(&mut *gw, "north")), (2, 0));
    let of = |region: &str| DeviceScope::of(&schema, "d", &[("region".to_owned(), region.to_owned())].into());
    let south = crate::storage::scoped::snapshot_rows(&mut *gw, "acme", &schema, &of("south")).expect("size");
    let north = crate::storage::scoped::snapshot_rows(&mut *gw, "acme", &schema, &of("north")).expect("size");
    assert_eq!((south, north), (3, 1), "the south holds w1, w2 and p1; the north p1");
}
