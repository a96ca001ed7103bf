//! Transitions of the sync machine, driven by hand: no store, no broker, no clock.

use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::protocol::{Downlink, Receipt, Receipts, Uplink};
use driftless_core::{ApplyReport, Batch, Confirmed, Epoch, GatewayView, Identity, LogCursor, NodeId, OutboxBatch};

use super::*;

const E1: Epoch = Epoch([1; 16]);
const E2: Epoch = Epoch([2; 16]);
const TIMEOUT: u64 = 1_000;

fn config() -> MachineConfig {
    MachineConfig {
        device_id: "tab".into(),
        max_inflight: 2,
        batch_rows: 10,
        max_message_bytes: 1 << 20,
        pull_rows: 100,
        ack_timeout_ms: TIMEOUT,
        receives: true,
        interval_ms: None,
        id_seed: 1_000,
    }
}

fn identity() -> Identity {
    Identity {
        node: NodeId([7; 16]),
        counter: 5,
        outbox_seq: 9,
        receipts: Receipts::new(vec![Receipt { at: LogCursor { position: 2, tag: 22 }, previous: None }]),
        epoch: Some(E1),
        cursor: Some(LogCursor { position: 3, tag: 33 }),
    }
}

fn confirmed(cursor: Option<LogCursor>) -> Confirmed {
    Confirmed { retired_node: None, epoch_changed: false, resent_rows: 0, cursor }
}

fn welcome(epoch: Epoch) -> Input {
    Input::Downlink(Downlink::Welcome { epoch, node_counter: 5, device_seq: 9, node_elsewhere: false })
}

fn outbox(first: i64, last: i64) -> StoreResult {
    StoreResult::Outbox(Some(OutboxBatch { first_seq: first, last_seq: last, batch: Batch::default() }))
}

fn applied() -> StoreResult {
    StoreResult::Applied(ApplyReport::default())
}

fn publishes(actions: &[Action]) -> Vec<&Uplink> {
    actions.iter().filter_map(|a| if let Action::Publish(m) = a { Some(m) } else { None }).collect()
}

fn store_op(actions: &[Action]) -> Option<&StoreOp> {
    match actions.last() {
        Some(Action::Store(op)) => Some(op),
        _ => None,
    }
}

/// Confirms a handshake in progress with `result`, answers the cursor read with `cursor`, and
/// returns what was published then.
fn confirm(m: &mut Machine, result: Confirmed, cursor: Option<LogCursor>, now: u64) -> Vec<Uplink> {
    let out = m.handle(Input::Store(StoreResult::Confirmed(result)), now);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor, resets: 0, snapshot: None }), now);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadOutbox { after: 0, .. })), "{out:?}");
    publishes(&out).into_iter().cloned().collect()
}

/// A machine that has connected and been confirmed under `E1`, with nothing to send.
fn confirmed_machine() -> Machine {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(welcome(E1), 1);
    confirm(&mut m, confirmed(identity().cursor), identity().cursor, 1);
    m.handle(Input::Store(StoreResult::Outbox(None)), 1);
    m
}

/// A machine confirmed under `E1` without a cursor: its pull asked for a snapshot.
fn snapshotting_machine() -> Machine {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(welcome(E1), 1);
    let sent = confirm(&mut m, confirmed(None), None, 1);
    assert!(matches!(sent[..], [Uplink::Pull { cursor: None, .. }]), "{sent:?}");
    m.handle(Input::Store(StoreResult::Outbox(None)), 1);
    m
}

/// A snapshot page read from `from` (`None`: the first, answering a pull), ending at `resume`,
/// from a gateway that does not echo requests.
fn snapshot_page(from: Option<&[u8]>, resume: &[u8], done: bool, batch: &Batch) -> Input {
    Input::Downlink(Downlink::Snapshot {
        epoch: E1,
        from: from.map(<[u8]>::to_vec),
        echo: None,
        resume: resume.to_vec(),
        log_cursor: SNAPSHOT_HEAD,
        done,
        batch: encode_batch(batch, EncodeOptions::default()),
    })
}

const SNAPSHOT_HEAD: LogCursor = LogCursor { position: 40, tag: 4 };

/// What the store answers for a page (or a pull's answer) it took.
fn taken() -> StoreResult {
    StoreResult::Applied(ApplyReport { moved: true, ..ApplyReport::default() })
}

/// An ack of `first..=last` with nothing refused and no receipt.
fn plain_ack(epoch: Epoch, id: u64, first: i64, last: i64) -> Downlink {
    Downlink::Ack { epoch, id, first_seq: first, last_seq: last, refused: vec![], receipt: None, previous: None }
}

/// Ships one batch `first..=last`; returns its id.
fn ship(m: &mut Machine, first: i64, last: i64, now: u64) -> u64 {
    let out = m.handle(Input::LocalChange, now);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadOutbox { .. })), "{out:?}");
    let out = m.handle(Input::Store(outbox(first, last)), now);
    let id = match publishes(&out)[..] {
        [Uplink::Batch { id, first_seq, last_seq, .. }] if *first_seq == first && *last_seq == last => *id,
        ref other => panic!("expected one batch, got {other:?}"),
    };
    m.handle(Input::Store(StoreResult::Outbox(None)), now);
    id
}

#[test]
fn nothing_is_sealed_shipped_or_pulled_before_the_gateway_confirms_the_identity() {
    let mut m = Machine::new(config());
    let out = m.handle(Input::Connected, 0);
    assert!(matches!(store_op(&out), Some(StoreOp::Begin { .. })));
    let out = m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 3 }), 0);
    assert!(matches!(
        publishes(&out)[..],
        [Uplink::Hello { counter: 5, outbox_seq: 9, receipts, .. }] if receipts[..] == [LogCursor { position: 2, tag: 22 }]
    ));
    for input in [Input::LocalChange, Input::Poke { head: None }, Input::SyncNow, Input::Tick] {
        let out = m.handle(input, 10);
        assert!(out.is_empty(), "acted before the handshake: {out:?}");
    }
    let out = m.handle(welcome(E1), 20);
    assert!(matches!(store_op(&out), Some(StoreOp::Confirm(GatewayView { epoch: E1, .. }))));
    let sent = confirm(&mut m, confirmed(identity().cursor), identity().cursor, 20);
    assert!(matches!(
        sent[..],
        [Uplink::Pull { epoch: Some(E1), cursor: Some(LogCursor { position: 3, tag: 33 }), .. }]
    ));
    assert!(m.live().confirmed);
}

#[test]
fn an_unanswered_hello_is_sent_again_once_the_link_is_idle() {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    assert!(m.handle(Input::Tick, TIMEOUT + 10).is_empty(), "the Hello is not written out yet");
    m.handle(Input::Flushed, TIMEOUT + 20);
    assert!(matches!(publishes(&m.handle(Input::Tick, TIMEOUT + 30))[..], [Uplink::Hello { .. }]));
}

#[test]
fn answers_count_only_for_the_batch_in_flight_with_that_id_and_range() {
    let mut m = confirmed_machine();
    let id = ship(&mut m, 10, 12, 5);
    let ack = |id, first, last| {
        Input::Downlink(Downlink::Ack {
            epoch: E1,
            id,
            first_seq: first,
            last_seq: last,
            refused: vec![],
            receipt: None,
            previous: None,
        })
    };
    let nack = |id, first, last| {
        Input::Downlink(Downlink::Nack { epoch: E1, id, first_seq: first, last_seq: last, reason: "forged".into() })
    };
    // A forged or stale answer: another id, another range, or a range never sent.
    for wrong in [ack(id + 1, 10, 12), ack(id, 10, 11), nack(id + 1, 10, 12), nack(999, 1, 100)] {
        assert!(m.handle(wrong, 6).is_empty());
    }
    assert_eq!(m.live().inflight_batches, 1);
    let out = m.handle(ack(id, 10, 12), 7);
    assert!(matches!(store_op(&out), Some(StoreOp::Ack { first: 10, last: 12, .. })));
    // The same ack again matches nothing.
    m.handle(Input::Store(StoreResult::Acked(3)), 7);
    m.handle(Input::Store(StoreResult::Outbox(None)), 7);
    assert!(m.handle(ack(id, 10, 12), 8).is_empty());
}

#[test]
fn a_refusal_of_a_batch_in_flight_moves_exactly_that_batch_aside() {
    let mut m = confirmed_machine();
    let id = ship(&mut m, 10, 12, 5);
    let out = m.handle(
        Input::Downlink(Downlink::Nack { epoch: E1, id, first_seq: 10, last_seq: 12, reason: "bad".into() }),
        6,
    );
    assert!(matches!(store_op(&out), Some(StoreOp::Reject { first: 10, last: 12, .. })));
}

#[test]
fn a_batch_is_sent_again_only_after_the_link_was_idle_for_a_whole_timeout() {
    let mut m = confirmed_machine();
    // The Hello and the first pull were written out; the batch is not yet.
    m.handle(Input::Flushed, 0);
    m.handle(Input::Flushed, 0);
    ship(&mut m, 10, 12, 0);
    let resends = |out: &[Action]| matches!(store_op(out), Some(StoreOp::ReadRange { .. }));
    // A tick, with the backstop's reads answered (no cursor, nothing new in the outbox) until
    // something else is asked; pulls it sends are written out at once.
    let tick = |m: &mut Machine, now| {
        let mut out = m.handle(Input::Tick, now);
        loop {
            for _ in publishes(&out) {
                m.handle(Input::Flushed, now);
            }
            let next = match store_op(&out) {
                Some(StoreOp::ReadCursor) => StoreResult::Cursor { cursor: None, resets: 0, snapshot: None },
                Some(StoreOp::ReadOutbox { .. }) => StoreResult::Outbox(None),
                _ => return out,
            };
            out = m.handle(Input::Store(next), now);
        }
    };
    // Still being written out on a slow link: never sent again meanwhile.
    assert!(!resends(&tick(&mut m, 10 * TIMEOUT)));
    m.handle(Input::Flushed, 10 * TIMEOUT);
    // It took 10 timeouts to write out: the link still holds its tail, so it gets a timeout
    // and as long again before it counts as lost.
    assert!(!resends(&tick(&mut m, 11 * TIMEOUT + 10)));
    assert!(!resends(&tick(&mut m, 21 * TIMEOUT - 10)));
    let out = tick(&mut m, 21 * TIMEOUT + 10);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadRange { first: 10, last: 12 })), "{out:?}");
    let out = m.handle(Input::Store(outbox(10, 12)), 21 * TIMEOUT + 10);
    let [Uplink::Batch { id, .. }] = publishes(&out)[..] else { panic!("expected the batch again: {out:?}") };
    let resent = *id;
    m.handle(Input::Store(StoreResult::Outbox(None)), 21 * TIMEOUT + 10);
    m.handle(Input::Flushed, 21 * TIMEOUT + 20);
    // The second wait is twice as long.
    assert!(!resends(&tick(&mut m, 22 * TIMEOUT + 500)));
    // The first copy's answer arriving late no longer matches; the second's does.
    assert!(m.handle(Input::Downlink(plain_ack(E1, resent - 1, 10, 12)), 22 * TIMEOUT + 600).is_empty());
    let out = m.handle(Input::Downlink(plain_ack(E1, resent, 10, 12)), 22 * TIMEOUT + 700);
    assert!(matches!(store_op(&out), Some(StoreOp::Ack { .. })));
}

#[test]
fn the_in_flight_window_is_bounded() {
    let mut m = confirmed_machine();
    m.handle(Input::LocalChange, 1);
    let out = m.handle(Input::Store(outbox(1, 1)), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadOutbox { after: 1, .. })));
    let out = m.handle(Input::Store(outbox(2, 2)), 1);
    assert_eq!(publishes(&out).len(), 1);
    assert!(store_op(&out).is_none(), "two in flight: no third read");
    assert!(m.handle(Input::LocalChange, 2).is_empty());
}

#[test]
fn an_answer_from_another_epoch_starts_a_new_handshake() {
    let mut m = confirmed_machine();
    let id = ship(&mut m, 10, 12, 5);
    let out = m.handle(Input::Downlink(plain_ack(E2, id, 10, 12)), 6);
    assert!(matches!(store_op(&out), Some(StoreOp::Begin { .. })), "{out:?}");
    assert!(!m.live().confirmed);
    assert_eq!(m.live().inflight_batches, 0, "everything is sent again after the new handshake");
    let out = m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 7);
    assert!(matches!(publishes(&out)[..], [Uplink::Hello { .. }]));
    m.handle(welcome(E2), 8);
    let changed = Confirmed { epoch_changed: true, resent_rows: 40, ..confirmed(None) };
    let sent = confirm(&mut m, changed, None, 8);
    assert!(matches!(sent[..], [Uplink::Pull { epoch: Some(E2), cursor: None, .. }]));
    assert_eq!(m.live().epoch_changes, 1);
}

#[test]
fn a_store_behind_its_own_past_is_counted_and_starts_from_a_snapshot() {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(
        Input::Downlink(Downlink::Welcome { epoch: E1, node_counter: 50, device_seq: 90, node_elsewhere: false }),
        1,
    );
    let rotated = Confirmed { retired_node: Some(NodeId([7; 16])), ..confirmed(None) };
    let sent = confirm(&mut m, rotated, None, 1);
    assert!(matches!(sent[..], [Uplink::Pull { cursor: None, .. }]));
    assert_eq!(m.live().node_changes, 1);
}

#[test]
fn a_page_moves_the_cursor_only_from_where_it_was_pulled() {
    let mut m = confirmed_machine();
    let to = LogCursor { position: 9, tag: 1 };
    let changes = Downlink::Changes {
        epoch: E1,
        from: 3,
        cursor: to,
        more: false,
        echo: None,
        batch: encode_batch(&Batch::default(), EncodeOptions::default()),
    };
    let out = m.handle(Input::Downlink(changes), 1);
    let expected = CursorMove { from: Some(3), from_tag: None, resets: 0, to };
    assert!(matches!(store_op(&out), Some(StoreOp::Apply { cursor: Some(c), .. }) if *c == expected));
}

#[test]
fn a_message_too_slow_to_write_out_makes_later_ones_smaller() {
    let mut m = confirmed_machine();
    m.handle(Input::Disconnected { flush_timeout: true }, 1);
    m.handle(Input::Store(StoreResult::Done), 1);
    m.handle(Input::Connected, 2);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 2);
    m.handle(welcome(E1), 3);
    let sent = confirm(&mut m, confirmed(identity().cursor), identity().cursor, 3);
    assert!(matches!(sent[..], [Uplink::Pull { max_bytes, .. }] if max_bytes == (1 << 19)));
}

#[test]
fn failed_store_work_is_reported_and_tried_again() {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Failed("disk I/O error".into())), 0);
    assert_eq!(m.live().last_error.as_deref(), Some("disk I/O error"));
    assert!(matches!(store_op(&m.handle(Input::Tick, 100)), Some(StoreOp::Begin { .. })));
}

#[test]
fn a_late_receipt_from_a_replaced_store_is_shown_until_a_later_one_vouches_for_it() {
    let mut m = confirmed_machine();
    let ack = |id, first, receipt, previous| {
        Input::Downlink(Downlink::Ack {
            epoch: E1,
            id,
            first_seq: first,
            last_seq: first,
            refused: vec![],
            receipt: Some(receipt),
            previous,
        })
    };
    let c = |position, tag| LogCursor { position, tag };
    let shown = |out: &[Action]| match publishes(out)[..] {
        [Uplink::Batch { receipts, .. }] => receipts.clone(),
        ref other => panic!("expected one batch, got {other:?}"),
    };
    let a = ship(&mut m, 20, 20, 1);
    let b = ship(&mut m, 21, 21, 1);
    // The restored store merged batch b at 3; the replaced one's ack for a, also at 3, comes
    // after it. Neither vouches for the other: both are kept, and shown.
    let out = m.handle(ack(b, 21, c(3, 31), Some(c(2, 22))), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::Ack { receipts: Some(r), .. }) if r.shown() == [c(3, 31)]));
    m.handle(Input::Store(StoreResult::Acked(1)), 2);
    m.handle(Input::Store(StoreResult::Outbox(None)), 2);
    let out = m.handle(ack(a, 20, c(3, 30), Some(c(2, 22))), 3);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Ack { receipts: Some(r), .. }) if r.shown() == [c(3, 30), c(3, 31)]),
        "{out:?}"
    );
    m.handle(Input::Store(StoreResult::Acked(1)), 3);
    let out = m.handle(Input::Store(outbox(22, 22)), 3);
    assert_eq!(shown(&out), [c(3, 30), c(3, 31)]);
    let d = match publishes(&out)[..] {
        [Uplink::Batch { id, .. }] => *id,
        _ => unreachable!(),
    };
    m.handle(Input::Store(StoreResult::Outbox(None)), 3);
    // (A gateway that found both would be impossible; one that answers in the same epoch for
    // a later merge that names 3:31 as its predecessor vouches for 3:31 only.)
    let out = m.handle(ack(d, 22, c(5, 50), Some(c(3, 31))), 4);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Ack { receipts: Some(r), .. }) if r.shown() == [c(5, 50)]),
        "an answer to a batch that showed them in its epoch means the gateway holds them: {out:?}"
    );
}

#[test]
fn a_batch_answered_in_another_epoch_vouches_for_nothing() {
    let mut m = confirmed_machine();
    let a = ship(&mut m, 20, 20, 1);
    let out = m.handle(
        Input::Downlink(Downlink::Nack { epoch: E2, id: a, first_seq: 20, last_seq: 20, reason: "x".into() }),
        2,
    );
    // The gateway speaks for another epoch: a new handshake, and the receipts stay as they were.
    assert!(matches!(store_op(&out), Some(StoreOp::Begin { .. })), "{out:?}");
    assert_eq!(m.receipts.shown(), [LogCursor { position: 2, tag: 22 }]);
}

#[test]
fn a_newer_schema_is_followed_once_and_a_device_that_received_nothing_starts_pulling() {
    let mut m = Machine::new(MachineConfig { receives: false, ..config() });
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(welcome(E1), 1);
    // The schema arrives while the identity is being confirmed: it waits its turn.
    let out = m.handle(Input::Downlink(Downlink::Schema { version: 2, text: "t".into() }), 1);
    assert!(store_op(&out).is_none(), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Confirmed(confirmed(None))), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::FollowSchema { version: 2, .. })), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::SchemaFollowed { version: 2, changed: true, receives: true }), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "the declared tables are pulled: {out:?}");
    assert_eq!(m.live().schema_version, 2);
    m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 0, snapshot: None }), 3);
    // The same version again, or an older one, asks nothing of the store.
    for version in [2, 1] {
        let out = m.handle(Input::Downlink(Downlink::Schema { version, text: "t".into() }), 4);
        assert!(!out.iter().any(|a| matches!(a, Action::Store(StoreOp::FollowSchema { .. }))), "{out:?}");
    }
}

#[test]
fn a_device_asked_to_slow_down_sends_nothing_until_the_time_is_up() {
    let mut m = confirmed_machine();
    assert!(m.handle(Input::Downlink(Downlink::SlowDown { retry_after_ms: 500 }), 10).is_empty());
    // A write meanwhile is not read, let alone sent.
    assert!(m.handle(Input::LocalChange, 20).is_empty());
    assert!(store_op(&m.handle(Input::Tick, 400)).is_none());
    // Once the time is up, the next tick ships it.
    let out = m.handle(Input::Tick, 511);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor | StoreOp::ReadOutbox { .. })), "{out:?}");
    // A request for hours is followed for a minute at most.
    m.handle(Input::Downlink(Downlink::SlowDown { retry_after_ms: u64::MAX }), 600);
    assert!(store_op(&m.handle(Input::Tick, 59_000)).is_none());
}

/// A change of the tenant's scope, as the gateway publishes it for every device.
fn feed(epoch: Epoch, previous: u64, to: u64, origin: &str, batch: &Batch) -> Input {
    Input::Downlink(Downlink::Feed {
        epoch,
        scope: "all".into(),
        previous: LogCursor { position: previous, tag: previous * 10 },
        cursor: LogCursor { position: to, tag: to * 10 },
        origin: origin.into(),
        batch: encode_batch(batch, EncodeOptions::default()),
        evict: Vec::new(),
    })
}

fn applied_at(moved: bool, position: u64) -> Input {
    let cursor = Some(LogCursor { position, tag: position * 10 });
    Input::Store(StoreResult::Applied(ApplyReport { moved, cursor, ..ApplyReport::default() }))
}

/// The answer to a pull from 3 (from a gateway that does not echo requests): nothing new.
fn nothing_after_3() -> Input {
    let empty = encode_batch(&Batch::default(), EncodeOptions::default());
    let at3 = LogCursor { position: 3, tag: 30 };
    Input::Downlink(Downlink::Changes { epoch: E1, from: 3, cursor: at3, more: false, echo: None, batch: empty })
}

/// A confirmed machine whose first pull was answered: its cursor is at 3, nothing is out.
fn current_machine() -> Machine {
    let mut m = confirmed_machine();
    m.handle(nothing_after_3(), 2);
    let out = m.handle(applied_at(true, 3), 2);
    assert!(out.is_empty(), "{out:?}");
    m
}

/// A batch of one row.
fn one_row() -> Batch {
    let mut b = Batch::default();
    b.rows.push(driftless_core::RowChange {
        table: "t".into(),
        pk: vec![driftless_core::Value::Integer(1)],
        state: Default::default(),
    });
    b
}

fn is_pull_start(out: &[Action]) -> bool {
    matches!(store_op(out), Some(StoreOp::ReadCursor))
}

#[test]
fn scope_changes_in_order_are_applied_without_asking_the_gateway() {
    let mut m = current_machine();
    let theirs = one_row();
    let out = m.handle(feed(E1, 3, 5, "other", &theirs), 3);
    let expected = CursorMove { from: Some(3), from_tag: Some(30), resets: 0, to: LogCursor { position: 5, tag: 50 } };
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, cursor: Some(c), .. }) if *c == expected && batch.rows.len() == 1),
        "{out:?}"
    );
    assert!(publishes(&out).is_empty());
    let out = m.handle(applied_at(true, 5), 3);
    assert!(out.is_empty(), "{out:?}");
    // Its own write comes back too: only the cursor moves past it.
    let out = m.handle(feed(E1, 5, 8, "tab", &theirs), 4);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, cursor: Some(c), .. }) if batch.rows.is_empty() && c.from == Some(5)),
        "{out:?}"
    );
    m.handle(applied_at(true, 8), 4);
    // One already applied (a copy the broker sent again) is not even looked at.
    let out = m.handle(feed(E1, 5, 8, "other", &theirs), 5);
    assert!(out.is_empty(), "{out:?}");
    // A device current through its scope's changes does not pull on the backstop timer.
    let out = m.handle(Input::Tick, 2 + TIMEOUT);
    assert!(!is_pull_start(&out), "{out:?}");
    m.handle(Input::Store(StoreResult::Outbox(None)), 2 + TIMEOUT);
    let out = m.handle(Input::Tick, 5 + 2 * TIMEOUT);
    assert!(is_pull_start(&out), "nothing heard for a whole period: the backstop pull: {out:?}");
}

#[test]
fn a_scope_change_after_a_gap_makes_the_device_pull_from_its_cursor() {
    let mut m = current_machine();
    let out = m.handle(feed(E1, 6, 8, "other", &Batch::default()), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::Apply { cursor: Some(c), .. }) if c.from == Some(6)));
    // The store's cursor is at 3, not 6: nothing applied, and the gap is pulled.
    let out = m.handle(applied_at(false, 3), 3);
    assert!(is_pull_start(&out), "{out:?}");
    let out = m.handle(
        Input::Store(StoreResult::Cursor {
            cursor: Some(LogCursor { position: 3, tag: 30 }),
            resets: 0,
            snapshot: None,
        }),
        3,
    );
    assert!(matches!(publishes(&out)[..], [Uplink::Pull { cursor: Some(c), .. }] if c.position == 3), "{out:?}");
}

#[test]
fn scope_changes_during_a_pull_wait_for_its_answer() {
    let mut m = confirmed_machine();
    // The pull from 3 is out: a change arriving now is held, not applied.
    let out = m.handle(feed(E1, 3, 5, "other", &Batch::default()), 2);
    assert!(out.is_empty(), "{out:?}");
    m.handle(nothing_after_3(), 3);
    // The answer moved nothing; the held change follows it.
    let out = m.handle(applied_at(true, 3), 3);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { cursor: Some(c), .. }) if c.from == Some(3) && c.to.position == 5)
    );
}

#[test]
fn a_scope_change_of_another_epoch_or_without_rows_is_pulled() {
    let mut m = current_machine();
    let out = m.handle(feed(E2, 3, 5, "other", &Batch::default()), 3);
    assert!(is_pull_start(&out), "the pull's answer says whether the epoch changed: {out:?}");
    let mut m = current_machine();
    let too_large = Downlink::Feed {
        epoch: E1,
        scope: "all".into(),
        previous: LogCursor { position: 3, tag: 30 },
        cursor: LogCursor { position: 5, tag: 50 },
        origin: "other".into(),
        batch: Vec::new(),
        evict: Vec::new(),
    };
    let out = m.handle(Input::Downlink(too_large), 3);
    assert!(is_pull_start(&out), "{out:?}");
}

#[test]
fn scope_changes_that_arrive_together_are_applied_in_one_transaction() {
    let mut m = current_machine();
    let one = one_row();
    let inputs = [
        feed(E1, 3, 5, "other", &one),
        feed(E1, 5, 6, "tab", &one),
        feed(E1, 6, 8, "other", &one),
        // Not chained to 8 (a gap): left for after.
        feed(E1, 9, 10, "other", &one),
    ];
    let out = m.handle_all(inputs, 3);
    let expected = CursorMove { from: Some(3), from_tag: Some(30), resets: 0, to: LogCursor { position: 8, tag: 80 } };
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, cursor: Some(c), .. }) if *c == expected && batch.rows.len() == 2),
        "its own change adds no row: {out:?}"
    );
    let out = m.handle(applied_at(true, 8), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::Apply { cursor: Some(c), .. }) if c.from == Some(9)), "{out:?}");
    let out = m.handle(applied_at(false, 8), 3);
    assert!(is_pull_start(&out), "{out:?}");
}

#[test]
fn pokes_are_pulled_on_only_when_they_announce_more_than_was_heard() {
    let poke = |position: Option<u64>| Input::Poke { head: position.map(|p| LogCursor { position: p, tag: p * 10 }) };
    let mut m = current_machine();
    // No change heard (a broker withholding the scope's topic): the poke pulls.
    let out = m.handle(poke(Some(5)), 3);
    assert!(is_pull_start(&out), "{out:?}");
    let mut m = current_machine();
    m.handle(feed(E1, 3, 5, "other", &Batch::default()), 3);
    m.handle(applied_at(true, 5), 3);
    for head in [Some(5), Some(4), None] {
        let out = m.handle(poke(head), 4);
        assert!(out.is_empty(), "heard up to there: {head:?}: {out:?}");
    }
    // The change at 7 was lost on the way: the poke says so.
    let out = m.handle(poke(Some(7)), 5);
    assert!(is_pull_start(&out), "{out:?}");
    // A gateway of an earlier version says nothing: pulled on once nothing is heard for a while.
    let mut m = current_machine();
    m.handle(feed(E1, 3, 5, "other", &Batch::default()), 3);
    m.handle(applied_at(true, 5), 3);
    let out = m.handle(poke(None), 3 + 3_000);
    assert!(is_pull_start(&out), "{out:?}");
}

#[test]
fn a_scope_change_the_store_failed_to_apply_is_pulled() {
    let mut m = current_machine();
    m.handle(feed(E1, 3, 5, "other", &Batch::default()), 3);
    let out = m.handle(Input::Store(StoreResult::Failed("database is locked".into())), 3);
    assert!(is_pull_start(&out), "{out:?}");
}

#[test]
fn a_device_kept_current_by_its_scope_still_shows_its_receipts_every_few_timeouts() {
    let mut m = current_machine();
    let mut now = 2;
    let mut position = 3;
    let mut pulled_at = None;
    // A change in order every half timeout, for ten timeouts.
    while now < 10 * TIMEOUT && pulled_at.is_none() {
        now += TIMEOUT / 2;
        m.handle(feed(E1, position, position + 1, "other", &Batch::default()), now);
        position += 1;
        m.handle(applied_at(true, position), now);
        let out = m.handle(Input::Tick, now);
        if is_pull_start(&out) {
            pulled_at = Some(now);
        } else if matches!(store_op(&out), Some(StoreOp::ReadOutbox { .. })) {
            m.handle(Input::Store(StoreResult::Outbox(None)), now);
        }
    }
    let at = pulled_at.expect("a pull showing the receipts");
    assert!(at >= 6 * TIMEOUT, "not before six timeouts: {at}");
}

#[test]
fn a_snapshot_interrupted_goes_on_where_it_stopped() {
    let mut m = Machine::new(config());
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(welcome(E1), 1);
    let out = m.handle(Input::Store(StoreResult::Confirmed(confirmed(None))), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let at = LogCursor { position: 40, tag: 4 };
    let progress =
        driftless_core::SnapshotProgress { rows_done: 300, rows_total: 1_000, bytes_done: 3, bytes_total: 10 };
    let snapshot = Some(driftless_core::SnapshotAt { resume: vec![9, 9], log_cursor: at, progress });
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 2, snapshot }), 2);
    assert_eq!(m.live().snapshot, Some(progress), "how far it got, for the status");
    assert!(
        matches!(publishes(&out)[..], [Uplink::PullSnapshot { resume, log_cursor, .. }] if *resume == [9, 9] && *log_cursor == at),
        "{out:?}"
    );
}

#[test]
fn a_scope_change_the_store_failed_to_take_is_tried_again_at_the_next_tick() {
    let mut m = confirmed_machine();
    let scope = Downlink::Scope { epoch: E1, version: 3, tables: vec!["work_orders".into()] };
    let out = m.handle(Input::Downlink(scope), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::Rescope { version: 3, .. })), "{out:?}");
    m.handle(Input::Store(StoreResult::Failed("disk full".into())), 2);
    let out = m.handle(Input::Tick, 3);
    assert!(!matches!(store_op(&out), Some(StoreOp::Rescope { .. })), "not before an ack timeout: {out:?}");
    let out = m.handle(Input::Tick, 3 + config().ack_timeout_ms);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Rescope { version: 3, tables }) if tables == &["work_orders"]),
        "{out:?}"
    );
    let out =
        m.handle(Input::Store(StoreResult::Rescoped { dropped: Some(12), reset: true }), 3 + config().ack_timeout_ms);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "the new scope is fetched: {out:?}");
}

mod follow;
mod snapshot;
