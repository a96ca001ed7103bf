//! Taking in what the gateway sent (pull pages, scope feeds, snapshot pages), each with the
//! cursor or snapshot position it moves, in one transaction; and the sync layer's own state,
//! kept with the data.

use std::collections::HashSet;

use rusqlite::Transaction;

use super::{Inner, SnapshotAt, Store, apply, cursor, settings};
use crate::batch::{Batch, RowChange};
use crate::error::{Error, Result};
use crate::protocol::LogCursor;
use crate::store::ApplyReport;

/// Rows (table id, key) held back from the app's table because its own constraint rolls the
/// whole transaction back when they are written.
type HoldBack = HashSet<(i64, Vec<u8>)>;

impl Store {
    /// A value the sync layer keeps with the data (cursors, last sync time), so it commits
    /// and rolls back with it.
    pub fn sync_state(&self, key: &str) -> Result<Option<String>> {
        settings::get(&self.conn, &format!("sync.{key}"))
    }

    /// Sets a value read back by [`Store::sync_state`], in a transaction of its own.
    pub fn set_sync_state(&mut self, key: &str, value: &str) -> Result<()> {
        self.transact(|tx, _| settings::set(tx, &format!("sync.{key}"), &value))
    }

    /// Notes a value read back by [`Store::sync_state`], written with the store's next
    /// transaction that commits (the one that applies what it describes, or acknowledges
    /// it): a commit less for every change taken in.
    pub fn note_sync_state(&mut self, key: &str, value: &str) {
        // One value per key: a store that keeps failing must not pile up notes.
        let key = format!("sync.{key}");
        self.noted.retain(|(k, _)| *k != key);
        self.noted.push((key, value.to_owned()));
    }

    /// Merges a remote batch: seals local changes first, then joins every row, writes the
    /// resulting values into the app's tables without re-capturing them, all in one transaction.
    pub fn apply(&mut self, batch: &Batch) -> Result<ApplyReport> {
        self.apply_holding_back(batch.rows.len(), |tx, inner, hold_back| apply::apply(tx, inner, batch, hold_back, &[]))
    }

    /// Applies a batch and moves the pull cursor to `to` in the same transaction (a cursor
    /// moves only together with the changes it covers), but only if the cursor is as the pull
    /// found it: at position `from` (`None`: no cursor) with `resets` resets so far. An answer
    /// to an older pull, or one that crossed a reset (`track` asking for a fresh snapshot),
    /// changes nothing (an empty report). With `from_tag`, the cursor's tag must match too: a
    /// change published for every device names the entry it follows, and a cursor at that
    /// position with another tag was read from a log since rolled back.
    ///
    /// `evict` names rows (keys only) that left this device's scope: they are dropped, in the
    /// same transaction, without a delete being synced.
    pub fn apply_with_cursor(
        &mut self,
        batch: &Batch,
        evict: &[RowChange],
        from: Option<u64>,
        from_tag: Option<u64>,
        resets: u64,
        to: LogCursor,
    ) -> Result<ApplyReport> {
        // An answer to an older pull, or one from a store since replaced, is not applied at
        // all: what it holds is pulled again from where the cursor is, and state taken in
        // without a cursor to show for it could never be checked against a restored store.
        // Checked in the transaction that applies it, so nothing can move the cursor between.
        self.apply_holding_back(batch.rows.len() + evict.len(), |tx, inner, hold_back| {
            let at = cursor::get(tx)?;
            let as_pulled = at.map(|c| c.position) == from
                && from_tag.is_none_or(|tag| at.is_some_and(|c| c.tag == tag))
                && cursor::resets(tx)? == resets;
            if !as_pulled {
                return Ok(ApplyReport { cursor: at, ..ApplyReport::default() });
            }
            let mut report = apply::apply(tx, inner, batch, hold_back, evict)?;
            cursor::set(tx, to)?;
            report.moved = true;
            report.cursor = Some(to);
            Ok(report)
        })
    }

    /// Applies a snapshot page read from `from` (the resume token it was asked for), if it
    /// follows the pages applied so far: no cursor is set, it was reset `resets` times as when
    /// the snapshot started, and the snapshot goes on at `from` (the empty token: none under
    /// way). In the same transaction a page that is not the last notes where the snapshot
    /// goes on and how far it got (`at`), so that a snapshot interrupted goes on from there
    /// ([`Store::snapshot_position`]); the last (`done`) sets the cursor at `at.log_cursor`.
    ///
    /// A page that does not follow (an answer to an earlier request, or one asked for ahead
    /// of a page that failed to apply) changes nothing: `moved` is false in the report. A
    /// snapshot never skips a page: the rows it held would be missing until next written.
    pub fn apply_snapshot_page(
        &mut self,
        batch: &Batch,
        from: &[u8],
        at: &SnapshotAt,
        done: bool,
        resets: u64,
    ) -> Result<ApplyReport> {
        self.apply_holding_back(batch.rows.len(), |tx, inner, hold_back| {
            let cursor = cursor::get(tx)?;
            let follows = cursor.is_none()
                && cursor::resets(tx)? == resets
                && cursor::snapshot_at(tx)?.map_or(Vec::new(), |s| s.resume) == from;
            if !follows {
                return Ok(ApplyReport { cursor, ..ApplyReport::default() });
            }
            let mut report = apply::apply(tx, inner, batch, hold_back, &[])?;
            if done {
                cursor::set(tx, at.log_cursor)?;
                report.cursor = Some(at.log_cursor);
            } else {
                cursor::set_snapshot_at(tx, at, resets)?;
            }
            report.moved = true;
            Ok(report)
        })
    }

    /// Where an interrupted snapshot goes on (the next page's resume token and the log
    /// position it continues from) and how far it got; `None`: no snapshot under way, or a
    /// cursor is set.
    pub fn snapshot_position(&self) -> Result<Option<SnapshotAt>> {
        cursor::snapshot_at(&self.conn)
    }

    /// Runs `body` (which applies at most `rows` rows) in a transaction. If an app
    /// constraint rolls the whole transaction back on some row, starts over with that row
    /// held back from the app's table (merged, recorded as unapplied), so one row never
    /// blocks the batch.
    fn apply_holding_back(
        &mut self,
        rows: usize,
        body: impl Fn(&Transaction<'_>, &mut Inner, &HoldBack) -> Result<ApplyReport>,
    ) -> Result<ApplyReport> {
        let mut hold_back = HoldBack::new();
        loop {
            match self.transact(|tx, inner| body(tx, inner, &hold_back)) {
                Err(Error::AppRolledBack { table, key }) if hold_back.len() < rows => {
                    let id = self.inner.catalog.by_name(&table).map_or(-1, |t| self.inner.catalog.tables[t].id);
                    if !hold_back.insert((id, key)) {
                        return Err(Error::AppRolledBack { table, key: Vec::new() });
                    }
                }
                other => return other,
            }
        }
    }
}
