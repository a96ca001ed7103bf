//! A device following its scope's topic: told which scope after the scope's version, it
//! follows it once its store holds that scope's rows, hears no other, and applies a change
//! that evicts rows only first in its transaction.

use super::*;

/// A change of scope `scope` with rows `batch` and evicted keys `evict`.
fn scoped_feed(scope: &str, previous: u64, to: u64, batch: &Batch, evict: &Batch) -> Input {
    Input::Downlink(Downlink::Feed {
        epoch: E1,
        scope: scope.into(),
        previous: LogCursor { position: previous, tag: previous * 10 },
        cursor: LogCursor { position: to, tag: to * 10 },
        origin: "other".into(),
        batch: encode_batch(batch, EncodeOptions::default()),
        evict: if evict.rows.is_empty() { Vec::new() } else { encode_batch(evict, EncodeOptions::default()) },
    })
}

fn follows(out: &[Action]) -> Vec<&str> {
    out.iter()
        .filter_map(|a| match a {
            Action::Follow(scope) => Some(scope.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_change_that_evicts_a_row_is_never_applied_after_changes_it_follows() {
    let mut m = current_machine();
    let row = one_row();
    // A change to the row, then the change that took it out of the scope, held together.
    let out = m.handle_all(
        [scoped_feed("all", 3, 5, &row, &Batch::default()), scoped_feed("all", 5, 8, &Batch::default(), &row)],
        3,
    );
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, evict, cursor: Some(c) }) if batch.rows.len() == 1 && evict.is_empty() && c.to.position == 5),
        "the eviction waits for its own transaction: {out:?}"
    );
    let out = m.handle(applied_at(true, 5), 3);
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, evict, cursor: Some(c) }) if batch.rows.is_empty() && evict.len() == 1 && c.from == Some(5)),
        "{out:?}"
    );
    // Evictions first and rows after them may share one: the rows are not the ones evicted.
    let mut m = current_machine();
    let out = m.handle_all(
        [scoped_feed("all", 3, 5, &Batch::default(), &row), scoped_feed("all", 5, 8, &row, &Batch::default())],
        3,
    );
    assert!(
        matches!(store_op(&out), Some(StoreOp::Apply { batch, evict, cursor: Some(c) }) if batch.rows.len() == 1 && evict.len() == 1 && c.to.position == 8),
        "{out:?}"
    );
}

#[test]
fn a_device_follows_the_scope_it_is_told_once_its_store_holds_it() {
    let mut m = confirmed_machine();
    let scope = Downlink::Scope { epoch: E1, version: 3, tables: vec!["work_orders".into()] };
    let follow = Downlink::Follow { epoch: E1, scope: "s9".into() };
    let out = m.handle_all([Input::Downlink(scope), Input::Downlink(follow.clone())], 2);
    assert!(matches!(store_op(&out), Some(StoreOp::Rescope { version: 3, .. })), "{out:?}");
    assert!(follows(&out).is_empty(), "not before the store took the scope: {out:?}");
    let out = m.handle(Input::Store(StoreResult::Rescoped { dropped: Some(4), reset: true }), 2);
    assert_eq!(follows(&out), ["s9"]);
    // Told alone (with a pull's answer), by a machine current on its cursor: followed at once;
    // its scope's changes are heard, another's are not, and pokes are not pulled on.
    let mut m = current_machine();
    assert_eq!(follows(&m.handle(Input::Downlink(follow.clone()), 3)), ["s9"]);
    let out = m.handle(scoped_feed("all", 3, 5, &one_row(), &Batch::default()), 3);
    assert!(store_op(&out).is_none(), "the default scope's change is not its own: {out:?}");
    let out = m.handle(scoped_feed("s9", 3, 5, &one_row(), &Batch::default()), 3);
    assert!(matches!(store_op(&out), Some(StoreOp::Apply { .. })), "{out:?}");
    m.handle(applied_at(true, 5), 3);
    let out = m.handle(Input::Poke { head: Some(LogCursor { position: 99, tag: 990 }) }, 3);
    assert!(!is_pull_start(&out), "the tenant's head says nothing of its scope: {out:?}");
    // Told again (a new connection): subscribed again.
    let out = m.handle(Input::Downlink(follow), 4);
    assert_eq!(follows(&out), ["s9"]);
}

#[test]
fn a_scope_the_store_failed_to_take_is_followed_only_once_it_took_it() {
    let mut m = confirmed_machine();
    let scope = Downlink::Scope { epoch: E1, version: 3, tables: vec!["work_orders".into()] };
    let follow = Downlink::Follow { epoch: E1, scope: "s9".into() };
    m.handle_all([Input::Downlink(scope), Input::Downlink(follow)], 2);
    let out = m.handle(Input::Store(StoreResult::Failed("disk full".into())), 2);
    assert!(follows(&out).is_empty(), "{out:?}");
    let out = m.handle(Input::Tick, 3 + config().ack_timeout_ms);
    assert!(matches!(store_op(&out), Some(StoreOp::Rescope { version: 3, .. })), "{out:?}");
    let out =
        m.handle(Input::Store(StoreResult::Rescoped { dropped: Some(1), reset: true }), 3 + config().ack_timeout_ms);
    assert_eq!(follows(&out), ["s9"]);
}
