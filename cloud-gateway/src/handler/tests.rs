use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::{ColumnPolicy, NodeId, Store, StoreOptions, TableSpec};

use super::*;
use crate::storage::{DeadLetterFilter, MergeOutcome, ServedSchema, SqliteStore, tenants_of};

const NOW: u64 = 1_800_000_000_000;

fn reply(out: &[Outgoing]) -> Downlink {
    match out {
        [Outgoing::Reply { payload, .. }, ..] => Downlink::decode(payload, &Limits::default()).expect("downlink"),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn handle(store: &mut dyn GatewayStore, msg: &Uplink) -> Result<Vec<Outgoing>> {
    handle_uplink(store, &HandlerConfig::default(), &format!("driftless/t/{}/up", msg.device()), &msg.encode(), NOW)
}

fn letters(store: &mut dyn GatewayStore) -> Vec<crate::storage::DeadLetter> {
    store.dead_letters(&DeadLetterFilter::default()).expect("dead letters")
}

pub(crate) fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("gw.db")).expect("open")
}

pub(crate) fn device_batch(dir: &tempfile::TempDir, sql: &str) -> Vec<u8> {
    let mut s = Store::open(dir.path().join("d.db"), StoreOptions::default()).expect("open");
    s.write(|tx| {
        Ok(tx.execute_batch("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?)
    })
    .expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
    s.write(|tx| Ok(tx.execute_batch(sql)?)).expect("write");
    let out = s.outbox_batch(100).expect("outbox").expect("batch");
    s.ack(out.first_seq, out.last_seq).expect("ack");
    encode_batch(&out.batch, EncodeOptions::default())
}

#[test]
fn a_batch_claiming_another_device_is_refused_by_its_id_and_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let msg = Uplink::Batch {
        device: "b".into(),
        id: 42,
        first_seq: 1,
        last_seq: 2,
        epoch: None,
        receipts: vec![],
        batch: vec![],
    };
    let out =
        handle_uplink(&mut store, &HandlerConfig::default(), "driftless/t/a/up", &msg.encode(), NOW).expect("handled");
    assert!(matches!(reply(&out), Downlink::Nack { id: 42, first_seq: 1, last_seq: 2, .. }));
    let letters = letters(&mut store);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].device, "a");
}

#[test]
fn garbage_is_dead_lettered_without_a_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let out = handle_uplink(&mut store, &HandlerConfig::default(), "driftless/t/a/up", b"\xff\x00garbage", NOW)
        .expect("handled");
    assert!(out.is_empty());
    assert_eq!(letters(&mut store).len(), 1);
    // Not an uplink topic at all: ignored.
    assert!(handle_uplink(&mut store, &HandlerConfig::default(), "elsewhere", b"x", NOW).expect("handled").is_empty());
}

#[test]
fn a_forged_snapshot_token_is_dead_lettered_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let epoch = store.epoch("t").expect("epoch");
    let msg = Uplink::PullSnapshot {
        device: "a".into(),
        epoch,
        resume: vec![0xff; 9],
        log_cursor: LogCursor::default(),
        max_rows: 10,
        max_bytes: 1 << 20,
        name_from: true,
        echo: Some(0),
    };
    assert!(handle(&mut store, &msg).expect("handled").is_empty());
    assert!(letters(&mut store)[0].reason.contains("resume token"));
}

/// A device asking for pages ahead applies each only where the last one left off: the page
/// names the position it was read from, if asked; a device of an earlier version gets the
/// page as before.
#[test]
fn an_answer_names_where_it_was_read_from_and_repeats_the_pulls_echo_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let batch = device_batch(&dir, "INSERT INTO t(id) VALUES ('a'), ('b'), ('c')");
    let msg =
        Uplink::Batch { device: "w".into(), id: 1, first_seq: 1, last_seq: 1, epoch: None, receipts: vec![], batch };
    assert!(matches!(reply(&handle(&mut store, &msg).expect("handled")), Downlink::Ack { .. }));
    let epoch = store.epoch("t").expect("epoch");
    let log_cursor = store.log_head("t").expect("head");
    let pull_page = |resume: Vec<u8>, name_from: bool, echo: Option<u64>| Uplink::PullSnapshot {
        device: "a".into(),
        epoch,
        resume,
        log_cursor,
        max_rows: 2,
        max_bytes: 1 << 20,
        name_from,
        echo,
    };
    let pull = |cursor: Option<LogCursor>, echo: Option<u64>| Uplink::Pull {
        device: "a".into(),
        epoch: Some(epoch),
        cursor,
        receipts: vec![],
        max_rows: 2,
        max_bytes: 1 << 20,
        echo,
    };
    // (The first page comes after the snapshot's size.)
    let page = |out: &[Outgoing]| {
        let mut pages = out.iter().filter_map(|o| match o {
            Outgoing::Reply { payload, .. } => match Downlink::decode(payload, &Limits::default()).expect("downlink") {
                Downlink::Snapshot { from, echo, resume, done, .. } => Some((from, echo, resume, done)),
                _ => None,
            },
            _ => None,
        });
        pages.next_back().expect("a snapshot page")
    };
    let (from, echo, first, done) = page(&handle(&mut store, &pull(None, Some(7))).expect("handled"));
    assert_eq!((from, echo, done), (Some(vec![]), Some(7), false), "the first page, answering a pull");
    let (from, echo, _, done) = page(&handle(&mut store, &pull(None, None)).expect("handled"));
    assert_eq!((from, echo, done), (None, None, false), "as devices of earlier versions have it");
    let (from, echo, _, done) = page(&handle(&mut store, &pull_page(vec![], true, None)).expect("handled"));
    assert_eq!((from, echo, done), (Some(vec![]), None, false));
    let (from, echo, last, done) =
        page(&handle(&mut store, &pull_page(first.clone(), true, Some(8))).expect("handled"));
    assert_eq!((from, echo, last, done), (Some(first.clone()), Some(8), vec![], true));
    let (from, echo, _, done) = page(&handle(&mut store, &pull_page(first, false, None)).expect("handled"));
    assert_eq!((from, echo, done), (None, None, true));
    let changes = reply(&handle(&mut store, &pull(Some(log_cursor), Some(9))).expect("handled"));
    assert!(matches!(changes, Downlink::Changes { echo: Some(9), .. }), "{changes:?}");
    let changes = reply(&handle(&mut store, &pull(Some(log_cursor), None)).expect("handled"));
    assert!(matches!(changes, Downlink::Changes { echo: None, .. }), "{changes:?}");
}

#[test]
fn a_row_no_device_could_apply_is_refused_by_position_and_never_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let good = device_batch(&dir, "INSERT INTO t VALUES ('a', 1)");
    let msg = Uplink::Batch {
        device: "a".into(),
        id: 1,
        first_seq: 1,
        last_seq: 1,
        epoch: None,
        receipts: vec![],
        batch: good,
    };
    assert!(matches!(reply(&handle(&mut store, &msg).expect("handled")), Downlink::Ack { id: 1, .. }));
    // The same table with a two-column key: no device could apply it.
    let mut s = Store::open(dir.path().join("other.db"), StoreOptions::default()).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (a TEXT, b TEXT, PRIMARY KEY (a, b))")?)).expect("schema");
    s.track("t", TableSpec::new()).expect("track");
    s.write(|tx| Ok(tx.execute_batch("INSERT INTO t VALUES ('x', 'y')")?)).expect("write");
    let bad = encode_batch(&s.outbox_batch(10).expect("outbox").expect("batch").batch, EncodeOptions::default());
    let msg = Uplink::Batch {
        device: "b".into(),
        id: 9,
        first_seq: 1,
        last_seq: 1,
        epoch: None,
        receipts: vec![],
        batch: bad,
    };
    match reply(&handle(&mut store, &msg).expect("handled")) {
        Downlink::Ack { id: 9, refused, .. } => {
            assert_eq!(refused.len(), 1);
            assert!(refused[0].reason.contains("key columns"), "{refused:?}");
        }
        other => panic!("expected an ack refusing the row, got {other:?}"),
    }
    assert_eq!(store.log_head("t").expect("head").position, 1);
    assert!(letters(&mut store)[0].reason.contains("row refused"));
}

#[test]
fn a_hello_reports_what_the_gateway_holds_of_the_device_and_its_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let epoch = store.epoch("t").expect("epoch");
    let batch = device_batch(&dir, "INSERT INTO t VALUES ('a', 1)");
    let decoded = driftless_core::codec::decode_batch(&batch, &Limits::default(), &Default::default()).expect("decode");
    let node = decoded.rows[0].state.life.entries[0].dot.node;
    let hello = |device: &str, receipts, epoch| Uplink::Hello {
        device: device.into(),
        node,
        counter: 0,
        outbox_seq: 0,
        receipts,
        epoch,
    };
    let out = handle(&mut store, &hello("a", vec![], None)).expect("handled");
    assert_eq!(reply(&out), Downlink::Welcome { epoch, node_counter: 0, device_seq: 0, node_elsewhere: false });
    let merged = handle(
        &mut store,
        &Uplink::Batch { device: "a".into(), id: 1, first_seq: 1, last_seq: 1, epoch: None, receipts: vec![], batch },
    )
    .expect("merge");
    let Downlink::Ack { receipt: Some(receipt), .. } = reply(&merged) else { panic!("an ack with a receipt") };
    let out = handle(&mut store, &hello("a", vec![receipt], Some(epoch))).expect("handled");
    assert_eq!(reply(&out), Downlink::Welcome { epoch, node_counter: 1, device_seq: 1, node_elsewhere: false });
    // A copy of a's database on device c.
    let out = handle(&mut store, &hello("c", vec![], None)).expect("handled");
    assert!(matches!(reply(&out), Downlink::Welcome { node_elsewhere: true, .. }));
}

#[test]
fn a_receipt_the_store_has_no_record_of_starts_a_new_epoch_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let epoch = store.epoch("t").expect("epoch");
    // A receipt for a log entry this store never wrote (it was restored from a backup).
    let lost = LogCursor { position: 7, tag: 77 };
    let hello = |epoch, receipts| Uplink::Hello {
        device: "a".into(),
        node: NodeId([5; 16]),
        counter: 9,
        outbox_seq: 40,
        receipts,
        epoch: Some(epoch),
    };
    let Downlink::Welcome { epoch: next, .. } = reply(&handle(&mut store, &hello(epoch, vec![lost])).expect("handled"))
    else {
        panic!("expected a welcome")
    };
    assert_ne!(next, epoch, "the store lost a's acknowledged merge");
    // Another device still speaking for the old epoch is no new evidence.
    let other = reply(&handle(&mut store, &hello(epoch, vec![lost])).expect("handled"));
    assert!(matches!(other, Downlink::Welcome { epoch: e, .. } if e == next));
    // The device then speaks for the new epoch, with no receipt under it yet.
    let again = reply(&handle(&mut store, &hello(next, vec![])).expect("handled"));
    assert!(matches!(again, Downlink::Welcome { epoch: e, .. } if e == next));
    // A batch shows its receipts too: a device that only uploads notices as well, even when
    // only one of the receipts it shows is missing.
    let batch = device_batch(&dir, "INSERT INTO t VALUES ('x', 1)");
    let other_tenant =
        Uplink::Batch { device: "b".into(), id: 1, first_seq: 1, last_seq: 1, epoch: None, receipts: vec![], batch };
    let out = handle_uplink(&mut store, &HandlerConfig::default(), "driftless/u/b/up", &other_tenant.encode(), NOW)
        .expect("handled");
    let Downlink::Ack { epoch: u_epoch, receipt: Some(held), .. } = reply(&out) else { panic!("an ack") };
    let stale = Uplink::Batch {
        device: "b".into(),
        id: 2,
        first_seq: 2,
        last_seq: 2,
        epoch: Some(u_epoch),
        receipts: vec![held, lost],
        batch: device_batch(&dir, "INSERT INTO t VALUES ('y', 1)"),
    };
    let out = handle_uplink(&mut store, &HandlerConfig::default(), "driftless/u/b/up", &stale.encode(), NOW)
        .expect("handled");
    assert!(matches!(reply(&out), Downlink::Ack { epoch: e, .. } if e != u_epoch), "tenant u starts a new epoch");
    assert_eq!(store.epoch("t").expect("epoch"), next, "epochs are per tenant");
}

#[test]
fn a_pull_from_a_log_position_the_store_does_not_hold_starts_a_new_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let epoch = store.epoch("t").expect("epoch");
    let batch = device_batch(&dir, "INSERT INTO t VALUES ('a', 1)");
    handle(
        &mut store,
        &Uplink::Batch { device: "a".into(), id: 1, first_seq: 1, last_seq: 1, epoch: None, receipts: vec![], batch },
    )
    .expect("merge");
    let head = store.log_head("t").expect("head");
    let pull = |epoch, cursor| Uplink::Pull {
        device: "b".into(),
        epoch: Some(epoch),
        cursor: Some(cursor),
        receipts: vec![],
        max_rows: 10,
        max_bytes: 1 << 20,
        echo: None,
    };
    // Same position, same tag: an ordinary pull.
    let first = reply(&handle(&mut store, &pull(epoch, head)).expect("handled"));
    assert!(matches!(first, Downlink::Changes { epoch: e, .. } if e == epoch));
    // Same position, another tag: the log was rolled back and written again.
    let other = LogCursor { tag: head.tag ^ 1, ..head };
    let Downlink::Changes { epoch: next, .. } = reply(&handle(&mut store, &pull(epoch, other)).expect("handled"))
    else {
        panic!("expected changes")
    };
    assert_ne!(next, epoch);
    // A device still on the old epoch is told the new one, and nothing changes further.
    let Downlink::Changes { epoch: told, .. } = reply(&handle(&mut store, &pull(epoch, head)).expect("handled")) else {
        panic!("expected changes")
    };
    assert_eq!(told, next);
}

/// The real store, with a storage failure injected into every merge, or every sync.
pub(crate) struct Faulty(pub(crate) SqliteStore, pub(crate) Fault);

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Merges,
    Commits,
    Nothing,
}

fn disk_full() -> Error {
    Error::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("database or disk is full".into()),
    ))
}

impl GatewayStore for Faulty {
    fn epoch(&mut self, tenant: &str) -> Result<Epoch> {
        self.0.epoch(tenant)
    }
    fn epoch_now(&mut self, tenant: &str) -> Result<Epoch> {
        self.0.epoch_now(tenant)
    }

    fn new_epoch(&mut self, tenant: &str, replacing: Epoch, reason: &str) -> Result<Epoch> {
        self.0.new_epoch(tenant, replacing, reason)
    }
    fn issued_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<bool> {
        self.0.issued_epoch(tenant, epoch)
    }
    fn note_foreign_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<()> {
        self.0.note_foreign_epoch(tenant, epoch)
    }
    fn heard_in_epoch(&mut self, tenant: &str, device: &str) -> Result<()> {
        self.0.heard_in_epoch(tenant, device)
    }
    fn hello(&mut self, tenant: &str, device: &str, node: NodeId) -> Result<crate::storage::DeviceView> {
        self.0.hello(tenant, device, node)
    }
    fn merge(&mut self, from: &crate::storage::Incoming<'_>, batch: &Batch) -> Result<MergeOutcome, MergeError> {
        match self.1 {
            Fault::Merges => Err(MergeError::Store(disk_full())),
            _ => self.0.merge(from, batch),
        }
    }
    fn log_after(
        &mut self,
        t: &str,
        c: u64,
        l: usize,
        chain: Option<&crate::storage::chains::Chain>,
    ) -> Result<(Vec<crate::storage::Logged>, bool)> {
        self.0.log_after(t, c, l, chain)
    }
    fn chain_before(&mut self, t: &str, chain: &crate::storage::chains::Chain, before: u64) -> Result<LogCursor> {
        self.0.chain_before(t, chain, before)
    }
    fn rows_size(&mut self, t: &str, table: Option<&str>) -> Result<(u64, u64)> {
        self.0.rows_size(t, table)
    }
    fn scope_count(&mut self, t: &str, table: &str, skey: &[u8]) -> Result<u64> {
        self.0.scope_count(t, table, skey)
    }
    fn row_state(&mut self, t: &str, table: &str, pk: &[driftless_core::Value]) -> Result<Option<Batch>> {
        self.0.row_state(t, table, pk)
    }
    fn table_rows(&mut self, t: &str, table: &str, a: &[u8], l: usize) -> Result<Vec<(Vec<u8>, Batch)>> {
        self.0.table_rows(t, table, a, l)
    }
    fn scope_rows(&mut self, t: &str, table: &str, k: &[u8], a: &[u8], l: usize) -> Result<Vec<(Vec<u8>, Batch)>> {
        self.0.scope_rows(t, table, k, a, l)
    }
    fn log_head(&mut self, t: &str) -> Result<LogCursor> {
        self.0.log_head(t)
    }
    fn log_tag(&mut self, t: &str, p: u64) -> Result<Option<u64>> {
        self.0.log_tag(t, p)
    }
    fn snapshot_page(&mut self, t: &str, r: &[u8], m: usize) -> Result<Option<crate::storage::SnapshotPage>> {
        self.0.snapshot_page(t, r, m)
    }
    fn touch_device(&mut self, t: &str, d: &str, c: Option<u64>) -> Result<()> {
        self.0.touch_device(t, d, c)
    }
    fn devices(&mut self, t: &str) -> Result<Vec<crate::storage::DeviceInfo>> {
        self.0.devices(t)
    }
    fn tenants(&mut self) -> Result<Vec<String>> {
        self.0.tenants()
    }
    fn dead_letter(&mut self, t: &str, d: &str, r: &str, p: &[u8]) -> Result<i64> {
        self.0.dead_letter(t, d, r, p)
    }
    fn dead_letters(&mut self, f: &DeadLetterFilter) -> Result<Vec<crate::storage::DeadLetter>> {
        self.0.dead_letters(f)
    }
    fn purge_dead_letters(&mut self, b: i64) -> Result<usize> {
        self.0.purge_dead_letters(b)
    }
    fn note_attempt(&mut self, k: &[u8; 32]) -> Result<u32> {
        self.0.note_attempt(k)
    }
    fn attempts(&mut self, k: &[u8; 32]) -> Result<Option<(u32, i64)>> {
        self.0.attempts(k)
    }
    fn unnote_attempt(&mut self, k: &[u8; 32]) -> Result<()> {
        self.0.unnote_attempt(k)
    }
    fn clear_attempts(&mut self, k: &[u8; 32]) -> Result<()> {
        self.0.clear_attempts(k)
    }
    fn clock_skew(&mut self, t: &str) -> Result<Vec<crate::storage::SkewedNode>> {
        self.0.clock_skew(t)
    }
    fn served_schema(&mut self) -> Result<Option<std::sync::Arc<ServedSchema>>> {
        self.0.served_schema()
    }
    fn install_schema(&mut self, text: &str) -> Result<u64> {
        self.0.install_schema(text)
    }
    fn prepare_tenant(&mut self, tenant: &str) -> Result<()> {
        self.0.prepare_tenant(tenant)
    }
    fn ingest_cloud_writes(&mut self, now_ms: u64) -> Result<Vec<(String, crate::storage::LogEntry)>> {
        self.0.ingest_cloud_writes(now_ms)
    }
    fn register_device(&mut self, t: &str, d: &str, r: &str, s: Option<&str>, now: i64) -> Result<()> {
        self.0.register_device(t, d, r, s, now)
    }
    fn remove_device(&mut self, t: &str, d: &str, now: i64) -> Result<bool> {
        self.0.remove_device(t, d, now)
    }
    fn begin_group(&mut self) -> Result<()> {
        self.0.begin_group()
    }
    fn group_spoiled(&self) -> bool {
        self.0.group_spoiled()
    }
    fn abandon_group(&mut self) -> Result<()> {
        self.0.abandon_group()
    }
    fn commit_group(&mut self) -> Result<()> {
        match self.1 {
            Fault::Commits => {
                // The commit reports a failure: whether the group stayed is not known.
                let _ = self.0.commit_group();
                Err(disk_full())
            }
            _ => self.0.commit_group(),
        }
    }
    fn registry(&mut self, t: Option<&str>) -> Result<Vec<crate::storage::Registered>> {
        self.0.registry(t)
    }
    fn set_params(&mut self, t: &str, d: &str, p: &crate::storage::Params) -> Result<bool> {
        self.0.set_params(t, d, p)
    }
    fn scope_told(&mut self, t: &str, d: &str, v: u64, feed: &str) -> Result<()> {
        self.0.scope_told(t, d, v, feed)
    }
    fn standing(&mut self, t: &str, d: &str) -> Result<crate::storage::Standing> {
        self.0.standing(t, d)
    }
}

#[test]
fn a_storage_failure_is_ours_answered_with_nothing_never_a_nack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Faulty(open(&dir), Fault::Merges);
    let batch = device_batch(&dir, "INSERT INTO t VALUES ('a', 1)");
    let msg =
        Uplink::Batch { device: "a".into(), id: 1, first_seq: 1, last_seq: 1, epoch: None, receipts: vec![], batch };
    assert!(matches!(handle(&mut store, &msg), Err(Error::Sqlite(_))));
    assert!(letters(&mut store.0).is_empty(), "the device's data is not the gateway's to refuse");
}

#[test]
fn an_oversized_batch_is_refused_by_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    let cfg = HandlerConfig { max_uplink_bytes: 1 << 16, ..HandlerConfig::default() };
    let msg = Uplink::Batch {
        device: "a".into(),
        id: 3,
        first_seq: 1,
        last_seq: 1,
        epoch: None,
        receipts: vec![],
        batch: vec![0; 1 << 20],
    };
    let out = handle_uplink(&mut store, &cfg, "driftless/t/a/up", &msg.encode(), NOW).expect("handled");
    assert!(matches!(reply(&out), Downlink::Nack { id: 3, .. }));
    let letter = &letters(&mut store)[0];
    assert!(letter.size > 1 << 20 && letter.payload.len() < 1 << 16);
}

/// The declared schema, the cloud tables and writes made to them with plain SQL.
mod cloud;
mod cloud_writes;
mod erasure;
mod security;
