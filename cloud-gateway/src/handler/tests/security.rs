//! What a device may claim, checked by the gateway whatever the broker let through: writes
//! only as its own nodes, contexts only up to what was merged, its registered role, and
//! nothing at all from a device a closed tenant does not know. Each on both stores; after
//! each forgery the honest devices' next writes still apply.

use driftless_core::Batch;

use super::*;
use crate::storage::test_backends::{Backend, on_every_store};

on_every_store!(
    a_device_cannot_write_as_another_devices_node,
    a_context_claiming_more_than_was_merged_is_refused,
    roles_come_from_the_registry_and_a_forged_one_is_ignored,
    a_store_that_replaced_another_takes_back_what_devices_hold,
    a_closed_tenant_ignores_devices_it_does_not_know,
    after_a_restore_writes_sent_back_for_others_are_taken,
    a_table_only_some_roles_write_takes_only_their_devices_writes,
);

fn device(b: &Backend, name: &str, role: &str) -> Store {
    let opts = StoreOptions { role: role.into(), ..StoreOptions::default() };
    let mut s = Store::open(b.scratch().join(format!("{name}.db")), opts).expect("open");
    s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?))
        .expect("schema");
    s.track("t", TableSpec::new().column("n", ColumnPolicy::Counter)).expect("track");
    s
}

/// What `sql` wrote on `store` (taken out of its outbox).
fn pending(store: &mut Store, sql: &str) -> Batch {
    store.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
    let out = store.outbox_batch(1_000).expect("outbox").expect("batch");
    store.ack(out.first_seq, out.last_seq).expect("ack");
    out.batch
}

pub(super) fn ship(gw: &mut dyn GatewayStore, id: &str, batch: &Batch) -> Vec<Outgoing> {
    ship_with(gw, &HandlerConfig::default(), id, batch)
}

fn ship_with(gw: &mut dyn GatewayStore, cfg: &HandlerConfig, id: &str, batch: &Batch) -> Vec<Outgoing> {
    let msg = Uplink::Batch {
        device: id.into(),
        id: 7,
        first_seq: 1,
        last_seq: 1,
        epoch: None,
        receipts: vec![],
        batch: encode_batch(batch, EncodeOptions::default()),
    };
    handle_uplink(gw, cfg, &format!("driftless/t/{id}/up"), &msg.encode(), NOW).expect("handled")
}

/// The reasons of the rows an ack refused.
pub(super) fn refused(out: &[Outgoing]) -> Vec<String> {
    match reply(out) {
        Downlink::Ack { refused, .. } => refused.into_iter().map(|r| r.reason).collect(),
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn logged_ids(gw: &mut dyn GatewayStore) -> Vec<driftless_core::Value> {
    let page = gw.changes_after("t", "observer", 0, 1_000).expect("changes");
    page.batch.rows.iter().map(|r| r.pk[0].clone()).collect()
}

fn a_device_cannot_write_as_another_devices_node(b: &Backend) {
    let mut gw = b.open();
    let mut a = device(b, "a", "");
    let first = pending(&mut a, "INSERT INTO t VALUES ('a1', 1)");
    assert!(refused(&ship(&mut *gw, "a", &first)).is_empty());

    // b sends a's merged write back whole: harmless, taken as a duplicate.
    assert!(refused(&ship(&mut *gw, "b", &first)).is_empty());
    // b sends a write a has not sent yet, as a's node: refused and dead-lettered.
    let next = pending(&mut a, "INSERT INTO t VALUES ('a2', 2)");
    let reasons = refused(&ship(&mut *gw, "b", &next));
    assert!(reasons[0].contains("not the sender's own"), "{reasons:?}");
    assert!(letters(&mut *gw).iter().any(|l| l.device == "b" && l.reason.contains("not the sender's own")));
    assert_eq!(logged_ids(&mut *gw), vec![text("a1")]);
    // a's own copy of it still applies.
    assert!(refused(&ship(&mut *gw, "a", &next)).is_empty());
    assert_eq!(logged_ids(&mut *gw), vec![text("a1"), text("a2")]);
}

fn a_context_claiming_more_than_was_merged_is_refused(b: &Backend) {
    let mut gw = b.open();
    let (mut a, mut c) = (device(b, "a", ""), device(b, "c", ""));
    let from_a = pending(&mut a, "INSERT INTO t VALUES ('a1', 1)");
    assert!(refused(&ship(&mut *gw, "a", &from_a)).is_empty());
    let node_a = from_a.rows[0].state.life.entries[0].dot.node;

    // c claims to have seen every write a will ever make.
    let mut forged = pending(&mut c, "INSERT INTO t VALUES ('c1', 1)");
    forged.rows[0].state.life.ctx.advance(node_a, u64::MAX);
    let reasons = refused(&ship(&mut *gw, "c", &forged));
    assert!(reasons[0].contains("up to counter 18446744073709551615"), "{reasons:?}");
    // What was merged from a is unchanged, and a's next write applies everywhere.
    let hello = gw.hello("t", "a", node_a).expect("hello");
    assert_eq!(hello.node_counter, 1);
    let next = pending(&mut a, "UPDATE t SET n = n + 1 WHERE id = 'a1'");
    assert!(refused(&ship(&mut *gw, "a", &next)).is_empty());
    let page = gw.changes_after("t", "observer", 0, 1_000).expect("changes");
    assert_eq!(page.batch.rows.len(), 2, "both of a's writes logged");

    // An honest context: c has seen a's writes, merged here.
    c.apply(&page.batch).expect("apply");
    let honest = pending(&mut c, "UPDATE t SET n = n + 10 WHERE id = 'a1'");
    assert!(refused(&ship(&mut *gw, "c", &honest)).is_empty());
}

fn roles_come_from_the_registry_and_a_forged_one_is_ignored(b: &Backend) {
    let mut gw = b.open();
    gw.register_device("t", "field-1", "field", None, 1).expect("register");
    // A field device configured to claim `hq`: merged as `field`, its registered role.
    let mut forger = device(b, "forger", "hq");
    let batch = pending(&mut forger, "INSERT INTO t VALUES ('x', 1)");
    assert!(refused(&ship(&mut *gw, "field-1", &batch)).is_empty());
    let node = batch.rows[0].state.life.entries[0].dot.node;
    let page = gw.changes_after("t", "observer", 0, 1_000).expect("changes");
    assert_eq!(page.batch.roles.get(&node).map(String::as_str), Some("field"));

    // A role left undeclared is filled in from the registry.
    gw.register_device("t", "field-2", "field", None, 1).expect("register");
    let mut quiet = device(b, "quiet", "");
    let batch = pending(&mut quiet, "INSERT INTO t VALUES ('z', 1)");
    assert!(refused(&ship(&mut *gw, "field-2", &batch)).is_empty());
    let node = batch.rows[0].state.life.entries[0].dot.node;
    let roles = |gw: &mut dyn GatewayStore| gw.changes_after("t", "observer", 0, 1_000).expect("changes").batch.roles;
    assert_eq!(roles(&mut *gw).get(&node).map(String::as_str), Some("field"));
    // A node's role never changes (every replica must rank its writes the same way for
    // good): promoted in the registry, the device's next writes on that node stay `field`.
    gw.register_device("t", "field-2", "hq", None, 2).expect("promote");
    assert!(refused(&ship(&mut *gw, "field-2", &pending(&mut quiet, "INSERT INTO t VALUES ('z2', 1)"))).is_empty());
    assert_eq!(roles(&mut *gw).get(&node).map(String::as_str), Some("field"));
    // A node the promoted device takes from now on writes as `hq`.
    let mut promoted = device(b, "promoted", "hq");
    let batch = pending(&mut promoted, "INSERT INTO t VALUES ('z3', 1)");
    assert!(refused(&ship(&mut *gw, "field-2", &batch)).is_empty());
    let node = batch.rows[0].state.life.entries[0].dot.node;
    assert_eq!(roles(&mut *gw).get(&node).map(String::as_str), Some("hq"));
}

/// Table `t` (as [`device`] makes it) written only by `writers`.
fn schema_with_writers(writers: &str) -> String {
    format!(
        "roles = [\"hq\", \"field\"]\n[[table]]\nname = \"t\"\nkey = [\"id\"]\nwriters = {writers}\n\
         [[table.column]]\nname = \"id\"\ntype = \"text\"\n\
         [[table.column]]\nname = \"n\"\ntype = \"integer\"\npolicy = \"counter\"\n"
    )
}

fn a_table_only_some_roles_write_takes_only_their_devices_writes(b: &Backend) {
    let mut gw = b.open();
    gw.install_schema(&schema_with_writers("[\"hq\"]")).expect("schema");
    gw.register_device("t", "hq-1", "hq", None, 1).expect("register");
    gw.register_device("t", "field-1", "field", None, 1).expect("register");
    let (mut hq, mut field) = (device(b, "hq", "hq"), device(b, "field", "field"));
    assert!(refused(&ship(&mut *gw, "hq-1", &pending(&mut hq, "INSERT INTO t VALUES ('h', 1)"))).is_empty());
    let why = refused(&ship(&mut *gw, "field-1", &pending(&mut field, "INSERT INTO t VALUES ('f', 1)")));
    assert!(why.len() == 1 && why[0].contains("written only by roles [\"hq\"]"), "{why:?}");
    // A device claiming hq is ranked, and so checked, as its registered role.
    let mut claims = device(b, "claims", "hq");
    let why = refused(&ship(&mut *gw, "field-1", &pending(&mut claims, "INSERT INTO t VALUES ('c', 1)")));
    assert_eq!(why.len(), 1, "{why:?}");
    assert_eq!(logged_ids(&mut *gw), vec![text("h")]);
    // A later schema version lets field devices write it: their next writes are taken.
    gw.install_schema(&schema_with_writers("[\"hq\", \"field\"]")).expect("schema v2");
    assert!(refused(&ship(&mut *gw, "field-1", &pending(&mut field, "INSERT INTO t VALUES ('f2', 1)"))).is_empty());
    assert_eq!(logged_ids(&mut *gw), vec![text("h"), text("f2")]);
}

fn a_closed_tenant_ignores_devices_it_does_not_know(b: &Backend) {
    let mut gw = b.open();
    gw.register_device("t", "known", "field", None, 1).expect("register");
    let mut s = device(b, "s", "");
    let batch = pending(&mut s, "INSERT INTO t VALUES ('x', 1)");
    let hello = handshake("stranger", NodeId([9; 16]), 0, None);
    let pull = Uplink::Pull {
        device: "stranger".into(),
        epoch: None,
        cursor: None,
        receipts: vec![],
        max_rows: 100,
        max_bytes: 1 << 20,
        echo: Some(0),
    };
    assert!(handle(&mut *gw, &hello).expect("handled").is_empty());
    assert!(handle(&mut *gw, &pull).expect("handled").is_empty());
    assert!(ship(&mut *gw, "stranger", &batch).is_empty());
    // Nothing was made for it: no device record, no dead letter, no row.
    assert!(gw.devices("t").expect("devices").is_empty());
    assert!(letters(&mut *gw).is_empty());
    assert!(logged_ids(&mut *gw).is_empty());
    // A removed device is cut off the same way.
    assert!(refused(&ship(&mut *gw, "known", &batch)).is_empty());
    assert!(gw.remove_device("t", "known", 2).expect("remove"));
    assert!(ship(&mut *gw, "known", &pending(&mut s, "INSERT INTO t VALUES ('y', 1)")).is_empty());
    assert_eq!(logged_ids(&mut *gw), vec![text("x")]);
    let listed = gw.registry(Some("t")).expect("registry");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].removed_ms, Some(2));
}

fn after_a_restore_writes_sent_back_for_others_are_taken(b: &Backend) {
    let mut gw = b.open();
    let mut a = device(b, "a", "");
    let lost = pending(&mut a, "INSERT INTO t VALUES ('a1', 1)");
    // The store lost a's write (restored from a backup): b, which holds it, sends it back.
    let epoch = gw.epoch("t").expect("epoch");
    gw.new_epoch("t", epoch, "restored").expect("new epoch");
    let recovering = HandlerConfig { recovery_window_ms: u64::MAX / 2, ..HandlerConfig::default() };
    assert!(refused(&ship_with(&mut *gw, &recovering, "b", &lost)).is_empty());
    assert_eq!(logged_ids(&mut *gw), vec![text("a1")]);
    // Outside the recovery window the same is refused: a's node has merged writes but no
    // device yet, and only a's own handshake binds it.
    let later = pending(&mut a, "INSERT INTO t VALUES ('a2', 1)");
    let closed = HandlerConfig { recovery_window_ms: 0, ..HandlerConfig::default() };
    let reasons = refused(&ship_with(&mut *gw, &closed, "b", &later));
    assert!(reasons[0].contains("not the sender's own"), "{reasons:?}");
}

fn a_store_that_replaced_another_takes_back_what_devices_hold(b: &Backend) {
    let mut gw = b.open();
    let (mut a, mut c) = (device(b, "a", ""), device(b, "c", ""));
    // What the lost store had merged from a; c holds it too.
    let lost = pending(&mut a, "INSERT INTO t VALUES ('a1', 1)");
    let node_a = lost.rows[0].state.life.entries[0].dot.node;
    c.apply(&lost).expect("apply");
    let mine = pending(&mut c, "UPDATE t SET n = n + 5 WHERE id = 'a1'");
    // c speaks for an epoch of the store this one replaced (empty): a new epoch starts.
    let old_epoch = driftless_core::Epoch([7; 16]);
    let hello = handshake("c", NodeId([3; 16]), 0, Some(old_epoch));
    let Downlink::Welcome { epoch, .. } = reply(&handle(&mut *gw, &hello).expect("handled")) else { panic!("welcome") };
    assert_eq!(gw.epoch_now("t").expect("epoch"), epoch);
    assert!(gw.issued_epoch("t", epoch).expect("issued"));
    // Every other device showing the same old epoch starts nothing more.
    let hello_d = handshake("d", NodeId([4; 16]), 0, Some(old_epoch));
    let Downlink::Welcome { epoch: told, .. } = reply(&handle(&mut *gw, &hello_d).expect("handled")) else { panic!() };
    assert_eq!(told, epoch, "one replaced store, one new epoch");
    // c sends back the row with a's write and its own: taken, a's node not bound to c.
    let mut both = lost.clone();
    both.rows[0].state = {
        let mut s = lost.rows[0].state.clone();
        driftless_core::join_row(&mut s, &mine.rows[0].state);
        s
    };
    let long = HandlerConfig { recovery_window_ms: u64::MAX / 2, ..HandlerConfig::default() };
    assert!(refused(&ship_with(&mut *gw, &long, "c", &both)).is_empty());
    // Once the window closed, a's own handshake binds its node, and its writes apply.
    let hello_a = handshake("a", node_a, 1, None);
    let Downlink::Welcome { node_elsewhere, .. } = reply(&handle(&mut *gw, &hello_a).expect("handled")) else {
        panic!()
    };
    assert!(!node_elsewhere, "a's node was not taken by the device that sent it back");
    let closed = HandlerConfig { recovery_window_ms: 0, ..HandlerConfig::default() };
    let next = pending(&mut a, "UPDATE t SET n = n + 1 WHERE id = 'a1'");
    assert!(refused(&ship_with(&mut *gw, &closed, "a", &next)).is_empty());
}

/// A handshake of `device` writing as `node`, which issued `counter` dots.
fn handshake(device: &str, node: NodeId, counter: u64, epoch: Option<driftless_core::Epoch>) -> Uplink {
    Uplink::Hello { device: device.into(), node, counter, outbox_seq: counter as i64, receipts: vec![], epoch }
}

fn text(s: &str) -> driftless_core::Value {
    driftless_core::Value::Text(s.into())
}
