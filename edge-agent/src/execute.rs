//! Carrying out the sync machine's store work on a [`Store`]: the only place the machine's
//! requests touch the database. The agent runs it on the store's own thread; the
//! deterministic simulation in the tests crate calls it directly.

use driftless_core::{Direction, Store};

use crate::machine::{StoreOp, StoreResult};

/// Keys of the agent's state kept in the store (they commit with the data they describe).
pub(crate) const LAST_SYNC_KEY: &str = "last_sync_ms";
/// "1" while a running agent is connected, for `driftless-agent status` from another process.
pub(crate) const CONNECTED_KEY: &str = "connected";

/// Does `op` on `store` at wall time `now_ms`. A failure is returned as a result, for the
/// machine to try again later, never as a panic.
pub fn execute(store: &mut Store, op: StoreOp, now_ms: u64) -> StoreResult {
    let run = |store: &mut Store| -> driftless_core::Result<StoreResult> {
        Ok(match op {
            StoreOp::Begin { hold } => {
                // Nothing seals until the gateway has confirmed this store's node id.
                if hold {
                    store.hold_seal();
                }
                store.set_sync_state(CONNECTED_KEY, "1")?;
                StoreResult::Begun { identity: store.identity()?, pending: store.pending_changes()? }
            }
            StoreOp::End => {
                store.set_sync_state(CONNECTED_KEY, "0")?;
                StoreResult::Done
            }
            StoreOp::Seal => {
                store.seal()?;
                StoreResult::Done
            }
            StoreOp::Confirm(view) => StoreResult::Confirmed(store.confirm_identity(&view)?),
            StoreOp::ReadOutbox { after, max_rows } => {
                store.seal()?;
                StoreResult::Outbox(store.outbox_batch_after(after, max_rows)?)
            }
            StoreOp::ReadRange { first, last } => StoreResult::Outbox(store.outbox_range(first, last)?),
            StoreOp::KeepReceipts(receipts) => {
                store.keep_receipts(&receipts)?;
                StoreResult::Done
            }
            StoreOp::ReadCursor => {
                let (cursor, resets) = store.cursor()?;
                StoreResult::Cursor { cursor, resets, snapshot: store.snapshot_position()? }
            }
            StoreOp::Ack { first, last, refused, receipts } => {
                let refused: Vec<(u32, String)> = refused.into_iter().map(|r| (r.index, r.reason)).collect();
                store.note_sync_state(LAST_SYNC_KEY, &now_ms.to_string());
                let removed = store.ack_refusing(first, last, &refused, receipts.as_ref())?;
                StoreResult::Acked(removed)
            }
            StoreOp::Reject { first, last, reason } => {
                store.reject(first, last, &reason)?;
                StoreResult::Done
            }
            StoreOp::FollowSchema { version, text } => {
                let done = store.follow_schema(version, &text)?;
                let receives = store.tracked().iter().any(|(_, spec)| spec.direction != Direction::UpOnly);
                StoreResult::SchemaFollowed {
                    version: done.version,
                    changed: !done.tracked.is_empty() || !done.untracked.is_empty(),
                    receives,
                }
            }
            StoreOp::ApplyPage { batch, from, at, done, resets } => {
                store.note_sync_state(LAST_SYNC_KEY, &now_ms.to_string());
                let report = store.apply_snapshot_page(&batch, &from, &at, done, resets)?;
                StoreResult::Applied(report)
            }
            StoreOp::Rescope { version, tables } => {
                if store.scope_version()? == Some(version) {
                    return Ok(StoreResult::Rescoped { dropped: None, reset: false });
                }
                let resets = store.cursor()?.1;
                let dropped = store.rescope(version, &tables)?;
                StoreResult::Rescoped { dropped: Some(dropped), reset: store.cursor()?.1 != resets }
            }
            StoreOp::Apply { batch, cursor, evict } => {
                if !batch.rows.is_empty() {
                    store.note_sync_state(LAST_SYNC_KEY, &now_ms.to_string());
                }
                let report = match cursor {
                    Some(m) => store.apply_with_cursor(&batch, &evict, m.from, m.from_tag, m.resets, m.to)?,
                    None => store.apply(&batch)?,
                    // (Evictions come only with a pull's page, which always moves the cursor.)
                };
                StoreResult::Applied(report)
            }
        })
    };
    run(store).unwrap_or_else(|e| StoreResult::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use driftless_core::{Batch, LogCursor, StoreOptions, TableSpec};

    use super::*;

    fn rescope(store: &mut Store, version: u64) -> StoreResult {
        execute(store, StoreOp::Rescope { version, tables: vec!["t".into()] }, 0)
    }

    /// Whether a new scope reset the cursor decides whether the pull out meanwhile is still
    /// awaited: it must say so exactly.
    #[test]
    fn a_rescope_says_whether_it_reset_the_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path().join("d.db"), StoreOptions::default()).expect("open");
        store.write(|tx| Ok(tx.execute_batch("CREATE TABLE t(id TEXT PRIMARY KEY, v TEXT)")?)).expect("create");
        store.track("t", TableSpec::new()).expect("track");
        // Told a scope for the first time, holding nothing fetched: nothing to reset.
        assert!(matches!(rescope(&mut store, 1), StoreResult::Rescoped { dropped: Some(0), reset: false }));
        // The same scope again: nothing done.
        assert!(matches!(rescope(&mut store, 1), StoreResult::Rescoped { dropped: None, reset: false }));
        // Caught up, then told another: reset.
        let (_, resets) = store.cursor().expect("cursor");
        let at = LogCursor { position: 3, tag: 30 };
        store.apply_with_cursor(&Batch::default(), &[], None, None, resets, at).expect("caught up");
        assert!(matches!(rescope(&mut store, 2), StoreResult::Rescoped { dropped: Some(0), reset: true }));
    }
}
