//! Snapshots: pages asked for ahead and applied only where the last one left off, and a
//! snapshot's progress (what the gateway counted, what each page adds, noted with the page
//! and shown in the live status until the last page).

use driftless_core::SnapshotProgress;

use super::*;

#[test]
fn a_snapshots_progress_counts_the_pages_against_what_the_gateway_counted() {
    let mut m = snapshotting_machine();
    let out = m.handle_all(
        [
            Input::Downlink(Downlink::SnapshotSize { epoch: E1, rows: 2, bytes: 500 }),
            snapshot_page(None, &[1], false, &one_row()),
        ],
        1,
    );
    assert!(out.iter().any(|a| matches!(a, Action::Progress(Progress::Start { label: "snapshot", total: 2 }))));
    let Some(StoreOp::ApplyPage { at, .. }) = store_op(&out) else { panic!("{out:?}") };
    let noted = at.progress;
    assert_eq!((noted.rows_done, noted.rows_total, noted.bytes_total), (1, 2, 500), "noted with the page");
    assert!(noted.bytes_done > 0);
    m.handle(Input::Store(taken()), 1);
    assert_eq!(m.live().snapshot, Some(noted));
    m.handle(Input::Store(StoreResult::Done), 1);
    m.handle(snapshot_page(Some(&[1]), &[], true, &one_row()), 2);
    m.handle(Input::Store(taken()), 2);
    assert_eq!(m.live().snapshot, None::<SnapshotProgress>, "done");
}

#[test]
fn a_snapshot_asks_for_each_page_ahead_and_moves_the_cursor_only_with_its_last_page() {
    let mut m = snapshotting_machine();
    let head = SNAPSHOT_HEAD;
    let out = m.handle(snapshot_page(None, &[1], false, &Batch::default()), 1);
    // Applied where the snapshot starts, with where it goes on, for a snapshot interrupted
    // to resume there; the next page is asked for at once, to be read while this one applies.
    assert!(
        matches!(store_op(&out), Some(StoreOp::ApplyPage { from, at, done: false, resets: 0, .. })
            if from.is_empty() && at.resume == [1] && at.log_cursor == head),
        "{out:?}"
    );
    assert!(
        matches!(publishes(&out)[..], [Uplink::PullSnapshot { resume, log_cursor, name_from: true, .. }]
            if *resume == [1] && *log_cursor == head),
        "{out:?}"
    );
    // The next page, the last, comes while the first is applied: it waits.
    let out = m.handle(snapshot_page(Some(&[1]), &[], true, &Batch::default()), 1);
    assert!(store_op(&out).is_none() && publishes(&out).is_empty(), "{out:?}");
    let out = m.handle(Input::Store(taken()), 1);
    // Until the cursor moves, a receipt says where the pages applied so far came from.
    assert!(matches!(store_op(&out), Some(StoreOp::KeepReceipts(r)) if r.shown().contains(&head)), "{out:?}");
    assert!(publishes(&out).is_empty(), "asked for already: {out:?}");
    let out = m.handle(Input::Store(StoreResult::Done), 1);
    assert!(
        matches!(store_op(&out), Some(StoreOp::ApplyPage { from, done: true, at, .. }) if *from == [1] && at.log_cursor == head),
        "{out:?}"
    );
    assert!(publishes(&out).is_empty(), "nothing after the last page: {out:?}");
    // The changes logged meanwhile come next, from the cursor as the store has it then.
    let out = m.handle(Input::Store(taken()), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)));
}

/// A page that failed to apply is never skipped: the page asked for ahead of it is dropped,
/// and the snapshot goes on from where the store is.
#[test]
fn a_snapshot_goes_on_from_the_store_after_a_page_it_did_not_take() {
    let mut m = snapshotting_machine();
    m.handle(snapshot_page(None, &[1], false, &Batch::default()), 1);
    m.handle(Input::Store(StoreResult::Failed("disk full".into())), 1);
    let out = m.handle(snapshot_page(Some(&[1]), &[2], false, &Batch::default()), 1);
    assert!(store_op(&out).is_none() && publishes(&out).is_empty(), "dropped: {out:?}");

    // The store did not take a page (it was elsewhere): the snapshot goes on from the store.
    let mut m = snapshotting_machine();
    m.handle(snapshot_page(None, &[1], false, &Batch::default()), 1);
    let out = m.handle(Input::Store(applied()), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let progress = driftless_core::SnapshotProgress::default();
    let snapshot = Some(driftless_core::SnapshotAt { resume: vec![7], log_cursor: SNAPSHOT_HEAD, progress });
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 0, snapshot }), 2);
    assert!(matches!(publishes(&out)[..], [Uplink::PullSnapshot { resume, .. }] if *resume == [7]), "{out:?}");
    // The answer to the request made ahead of the page not taken: dropped.
    let out = m.handle(snapshot_page(Some(&[1]), &[2], false, &Batch::default()), 2);
    assert!(store_op(&out).is_none() && publishes(&out).is_empty(), "dropped: {out:?}");
    let out = m.handle(snapshot_page(Some(&[7]), &[8], false, &Batch::default()), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { from, .. }) if *from == [7]), "{out:?}");
}

/// The id a pull (or a snapshot page's request) was sent with.
fn echo_of(out: &[Action]) -> u64 {
    match publishes(out)[..] {
        [Uplink::Pull { echo: Some(e), .. }] | [Uplink::PullSnapshot { echo: Some(e), .. }] => *e,
        ref other => panic!("expected one pull, got {other:?}"),
    }
}

/// A page answering the request with id `echo`, read from `from`.
fn echoed_page(from: &[u8], resume: &[u8], done: bool, echo: u64) -> Input {
    let batch = encode_batch(&one_row(), EncodeOptions::default());
    let (from, resume) = (Some(from.to_vec()), resume.to_vec());
    Input::Downlink(Downlink::Snapshot {
        epoch: E1,
        from,
        echo: Some(echo),
        resume,
        log_cursor: SNAPSHOT_HEAD,
        done,
        batch,
    })
}

/// A new device: confirmed without a cursor, its first pull out. Its id.
fn first_pull(m: &mut Machine) -> u64 {
    m.handle(Input::Connected, 0);
    m.handle(Input::Store(StoreResult::Begun { identity: identity(), pending: 0 }), 0);
    m.handle(welcome(E1), 1);
    m.handle(Input::Store(StoreResult::Confirmed(confirmed(None))), 1);
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 0, snapshot: None }), 1);
    let echo = echo_of(&out);
    m.handle(Input::Store(StoreResult::Outbox(None)), 1);
    echo
}

/// An answer read for a pull made before the store's last reset is never taken: from a
/// gateway instance that read it under the device's old scope, taken as the first page of
/// the new scope's snapshot it would hide the rows of the new scope it does not hold.
#[test]
fn an_answer_to_an_earlier_pull_moves_nothing() {
    let mut m = Machine::new(config());
    let old = first_pull(&mut m);
    let scope = Downlink::Scope { epoch: E1, version: 3, tables: vec!["work_orders".into()] };
    let out = m.handle(Input::Downlink(scope), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::Rescope { version: 3, .. })), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Rescoped { dropped: Some(4), reset: true }), 2);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 1, snapshot: None }), 2);
    let new = echo_of(&out);
    assert_ne!(new, old);

    // The answer to the pull before the reset comes late: dropped.
    let out = m.handle(echoed_page(&[], &[1], false, old), 3);
    assert!(store_op(&out).is_none() && publishes(&out).is_empty(), "dropped: {out:?}");
    let stale_changes = Downlink::Changes {
        epoch: E1,
        from: 3,
        cursor: LogCursor { position: 9, tag: 1 },
        more: false,
        echo: Some(old),
        batch: encode_batch(&one_row(), EncodeOptions::default()),
    };
    let out = m.handle(Input::Downlink(stale_changes), 3);
    assert!(store_op(&out).is_none(), "dropped: {out:?}");

    // The answer to the pull after it is taken, applied only if no reset came since; the
    // next page's request has an id of its own.
    let out = m.handle(echoed_page(&[], &[1], false, new), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { resets: 1, .. })), "{out:?}");
    let next = echo_of(&out);
    assert!(next != new && next != old);
    m.handle(Input::Store(taken()), 3);
    m.handle(Input::Store(StoreResult::Done), 3);
    let out = m.handle(echoed_page(&[1], &[2], false, new), 3);
    assert!(store_op(&out).is_none(), "a repeated answer to the request before: {out:?}");
    let out = m.handle(echoed_page(&[1], &[2], false, next), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { .. })), "{out:?}");
}

/// A new device's first pull goes out before the scope told with the handshake is taken;
/// the store, holding nothing fetched, does not reset for it: the pull's answer is awaited,
/// not asked for again (the gateway would read the snapshot's first page twice). An answer
/// to a pull of an earlier connection is not taken for it.
#[test]
fn a_scope_told_for_the_first_time_keeps_the_snapshots_pull() {
    let mut m = Machine::new(config());
    let before = first_pull(&mut m);
    m.handle(Input::Disconnected { flush_timeout: false }, 2);
    m.handle(Input::Store(StoreResult::Done), 2);
    let pull = first_pull(&mut m);
    let scope = Downlink::Scope { epoch: E1, version: 3, tables: vec!["work_orders".into()] };
    m.handle(Input::Downlink(scope), 2);
    let out = m.handle(Input::Store(StoreResult::Rescoped { dropped: Some(0), reset: false }), 2);
    assert!(store_op(&out).is_none() && publishes(&out).is_empty(), "no second pull: {out:?}");
    let size = |rows| Input::Downlink(Downlink::SnapshotSize { epoch: E1, rows, bytes: 10 * rows });
    let out = m.handle_all([size(7), echoed_page(&[], &[1], false, before)], 3);
    assert!(store_op(&out).is_none(), "the earlier connection's answer: {out:?}");
    assert_eq!(m.live().snapshot, None, "its size counts for nothing");
    let out = m.handle_all([size(5), echoed_page(&[], &[1], false, pull)], 3);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { resets: 0, .. })), "{out:?}");
    m.handle(Input::Store(taken()), 3);
    assert_eq!(m.live().snapshot.map(|p| (p.rows_total, p.rows_done)), Some((5, 1)));
}

/// A new device whose first pull timed out: the id of that pull, the time, and what the
/// pull made again (after reading the cursor, found reset `resets` times) goes out with.
fn pulled_again(resets: u64) -> (Machine, u64, u64, Vec<Action>) {
    let mut m = Machine::new(config());
    let first = first_pull(&mut m);
    m.handle_all((0..5).map(|_| Input::Flushed), 1);
    let later = 2 + config().ack_timeout_ms;
    let out = m.handle(Input::Tick, later);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets, snapshot: None }), later);
    (m, first, later, out)
}

/// A pull sent again after its timeout is the same request, with the same id: the first
/// one's late answer is taken (a gateway slower than the timeout still gets through).
#[test]
fn a_pull_sent_again_after_its_timeout_keeps_its_id() {
    let (mut m, first, later, out) = pulled_again(0);
    assert_eq!(echo_of(&out), first);
    m.handle(Input::Store(StoreResult::Outbox(None)), later);
    let out = m.handle(echoed_page(&[], &[1], false, first), later);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { .. })), "{out:?}");
}

/// The same request made after the store reset (a schema that tracks another table, say)
/// is a new one: the answer to the one before it is not taken for it.
#[test]
fn a_pull_made_again_after_a_reset_gets_a_new_id() {
    let (_, first, _, out) = pulled_again(1);
    assert_ne!(echo_of(&out), first);
}

/// An upload acked while the pull waits changes the receipts the pull sent again shows, not
/// what it asks for: it keeps its id.
#[test]
fn a_pull_sent_again_keeps_its_id_though_an_upload_was_acked_meanwhile() {
    let mut m = Machine::new(config());
    let first = first_pull(&mut m);
    let id = ship(&mut m, 1, 1, 1);
    let receipt = Some(LogCursor { position: 9, tag: 90 });
    let ack = Downlink::Ack { epoch: E1, id, first_seq: 1, last_seq: 1, refused: vec![], receipt, previous: None };
    let out = m.handle(Input::Downlink(ack), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::Ack { receipts: Some(_), .. })), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Acked(1)), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadOutbox { .. })), "{out:?}");
    m.handle(Input::Store(StoreResult::Outbox(None)), 1);
    m.handle_all((0..5).map(|_| Input::Flushed), 1);
    let later = 2 + config().ack_timeout_ms;
    let out = m.handle(Input::Tick, later);
    assert!(matches!(store_op(&out), Some(StoreOp::ReadCursor)), "{out:?}");
    let out = m.handle(Input::Store(StoreResult::Cursor { cursor: None, resets: 0, snapshot: None }), later);
    assert!(matches!(publishes(&out)[..], [Uplink::Pull { receipts, .. }] if !receipts.is_empty()), "{out:?}");
    assert_eq!(echo_of(&out), first);
}

/// A page the shell decoded as it arrived is applied as decoded, not decoded again.
#[test]
fn a_page_decoded_ahead_is_applied_as_given() {
    let mut m = snapshotting_machine();
    let Input::Downlink(page) = snapshot_page(None, &[1], false, &Batch::default()) else { unreachable!() };
    let out = m.handle(Input::Page(page, one_row()), 1);
    assert!(matches!(store_op(&out), Some(StoreOp::ApplyPage { batch, .. }) if batch.rows.len() == 1), "{out:?}");
}
