//! Taking in what comes back: results of store work, and the gateway's answers.

use driftless_core::codec::{Dictionaries, Limits, decode_batch};
use driftless_core::protocol::{Downlink, Receipt, Uplink};
use driftless_core::{Batch, Epoch, GatewayView};

use super::*;

/// The longest a gateway's request to slow down is followed: a longer quiet could only come
/// from a misconfigured quota, and a device must not go silent for hours on one message.
const MAX_QUIET_MS: u64 = 60_000;

impl Machine {
    pub(super) fn on_store(&mut self, result: StoreResult, out: &mut Vec<Action>) {
        let Some(awaiting) = self.awaiting.take() else {
            tracing::warn!("a store result nobody asked for: {result:?}");
            return;
        };
        if let StoreResult::Failed(reason) = &result {
            tracing::error!("sync store work failed: {reason}");
            self.live.last_error = Some(reason.clone());
            // The work is tried again: a read at the next tick or answer, an unanswered batch
            // or pull after its timeout.
            if matches!(awaiting, Awaiting::Changes { .. } | Awaiting::SnapshotPage { .. }) {
                self.pulling = None;
            }
            // The changes taken from the held ones are not held any more: a pull fetches them.
            if matches!(awaiting, Awaiting::Feed { .. }) {
                self.poked();
            }
            // The gateway tells a scope once per change (and at every handshake): kept, and
            // tried again at the next tick.
            if let Awaiting::Rescope { version, tables, .. } = awaiting {
                self.rescope = Some((version, tables, self.now.saturating_add(self.cfg.ack_timeout_ms)));
            }
            return;
        }
        match (awaiting, result) {
            (Awaiting::Begin, StoreResult::Begun { identity, pending }) => {
                if self.phase == Phase::Down {
                    return;
                }
                let hello = Uplink::Hello {
                    device: self.cfg.device_id.clone(),
                    node: identity.node,
                    counter: identity.counter,
                    outbox_seq: identity.outbox_seq,
                    receipts: identity.receipts.shown(),
                    epoch: identity.epoch,
                };
                self.receipts = identity.receipts;
                self.hello = Some(hello.clone());
                self.publish(out, hello);
                self.phase = Phase::Handshake(Some(self.now));
                if pending > 0 {
                    self.uploading = true;
                    out.push(Action::Progress(Progress::Start { label: "uploading", total: pending }));
                }
            }
            (Awaiting::End, _) => {}
            (Awaiting::Confirm, StoreResult::Confirmed(c)) => {
                if c.retired_node.is_some() {
                    self.live.node_changes += 1;
                    tracing::warn!(
                        retired = ?c.retired_node,
                        "this store is behind its own past (restored or copied); it writes under a new node id"
                    );
                }
                if c.epoch_changed {
                    self.receipts = Receipts::default();
                    self.live.epoch_changes += 1;
                    tracing::warn!(rows = c.resent_rows, "the gateway's store changed; sending every row again");
                }
                if let Phase::Handshake(_) = self.phase
                    && let Some(epoch) = self.welcomed.take()
                {
                    self.phase = Phase::Confirmed(epoch);
                    self.confirmed_once = true;
                    self.live.confirmed = true;
                    self.want_pull = true;
                    self.want_ship = true;
                }
            }
            (Awaiting::Rescope { kept, .. }, StoreResult::Rescoped { dropped, reset }) => {
                if let Some(dropped) = dropped {
                    tracing::info!(dropped, "the device's scope changed; fetching its rows");
                }
                if let Some(scope) = self.follow_next.take() {
                    self.follow(scope, out);
                }
                // A snapshot's pull out before a scope told for the first time (a new device's
                // first pull; the store held nothing fetched, so it did not reset) is answered
                // for the scope as it stands: awaited, not asked again.
                match kept {
                    Some(pull) if !reset && self.pulling.is_none() => self.pulling = Some(pull),
                    _ => self.want_pull = true,
                }
            }
            (Awaiting::Schema, StoreResult::SchemaFollowed { version, changed, receives }) => {
                self.live.schema_version = version;
                if changed {
                    tracing::info!(version, "following the sync schema");
                    // New tables hold the app's rows as writes, and fetch what others wrote.
                    self.cfg.receives = receives;
                    self.want_ship = true;
                    self.want_pull = true;
                }
            }
            (Awaiting::Cursor, StoreResult::Cursor { cursor, resets, snapshot }) => {
                let Some(epoch) = self.confirmed() else { return };
                self.pull_resets = resets;
                self.known_cursor = cursor;
                self.last_pull = self.now;
                self.pull_again = false;
                // Without a cursor, the answer is the snapshot's first page.
                let snapshot_from = cursor.is_none().then(Vec::new);
                // A snapshot that was interrupted goes on where it stopped.
                if let (None, Some(at)) = (cursor, snapshot) {
                    tracing::info!(log_cursor = at.log_cursor.position, "going on with the snapshot where it stopped");
                    let p = at.progress;
                    out.push(Action::Progress(Progress::Start { label: "snapshot", total: p.rows_total }));
                    out.push(Action::Progress(Progress::Advance(p.rows_done)));
                    self.live.snapshot = Some(p);
                    return self.pull_snapshot(out, epoch, at.resume, at.log_cursor);
                }
                let mut msg = Uplink::Pull {
                    device: self.cfg.device_id.clone(),
                    epoch: Some(epoch),
                    cursor,
                    receipts: self.receipts.shown(),
                    max_rows: self.cfg.pull_rows,
                    max_bytes: self.msg_limit.min(u32::MAX as usize) as u32,
                    echo: None,
                };
                let id = self.stamp_pull(&mut msg);
                self.pulling = Some(Pulling { since: self.now, snapshot_from, echo: Some(id) });
                self.publish(out, msg);
            }
            (Awaiting::Outbox { rows }, StoreResult::Outbox(read)) => {
                let Some(ob) = read else {
                    if self.uploading && self.inflight.is_empty() {
                        self.uploading = false;
                        out.push(Action::Progress(Progress::Finish));
                    }
                    return;
                };
                if self.send_batch(out, &ob, 0) {
                    self.want_ship = true;
                } else {
                    let rows = (ob.batch.rows.len() / 2).max(1).min(rows);
                    let op = StoreOp::ReadOutbox { after: self.sent_upto, max_rows: rows };
                    self.store(out, op, Awaiting::Outbox { rows });
                }
            }
            (Awaiting::Range { resends }, StoreResult::Outbox(read)) => {
                // None: acknowledged meanwhile, nothing to send again.
                if let Some(ob) = read {
                    // A batch sent again is sent whole, whatever its size: its range is its
                    // identity.
                    let batch = encode_batch(&ob.batch, EncodeOptions::default());
                    self.publish_batch(out, &ob, batch, resends);
                }
            }
            (Awaiting::Ack, StoreResult::Acked(removed)) => {
                self.live.acked_batches += 1;
                if self.uploading {
                    out.push(Action::Progress(Progress::Advance(removed as u64)));
                }
                // Messages of this size got through: let them grow back toward the maximum.
                self.msg_limit = (self.msg_limit + self.msg_limit / 4).min(self.cfg.max_message_bytes);
                self.want_ship = true;
            }
            (Awaiting::Reject, _) => self.want_ship = true,
            (Awaiting::Receipts, _) => {}
            (Awaiting::Feed { to }, StoreResult::Applied(report)) => self.fed(to, report, out),
            (Awaiting::Changes { more }, StoreResult::Applied(report)) => {
                self.pulling = None;
                self.pull_tries = 0;
                self.known_cursor = report.cursor;
                if report.moved {
                    self.last_fresh = self.now;
                }
                if !report.changed.is_empty() {
                    out.push(Action::Changed(report.changed));
                }
                if more || self.pull_again {
                    self.want_pull = true;
                }
            }
            (Awaiting::SnapshotPage { at, done, rows }, StoreResult::Applied(report)) => {
                if !report.moved {
                    // The store is not where this page follows on (a page before it failed to
                    // apply, or the cursor was set or reset meanwhile): it applied nothing,
                    // and the snapshot goes on from where the store is.
                    tracing::info!("a snapshot page did not follow the last one applied; going on from the store");
                    self.pulling = None;
                    self.want_pull = true;
                    return;
                }
                if !report.changed.is_empty() {
                    out.push(Action::Changed(report.changed));
                }
                out.push(Action::Progress(if done { Progress::Finish } else { Progress::Advance(rows) }));
                self.live.snapshot = (!done).then_some(at.progress);
                if done {
                    self.pulling = None;
                    self.pull_tries = 0;
                    // Changes logged while the snapshot was read come next.
                    self.want_pull = true;
                    return;
                }
                // The next page was asked for when this one came. The pages applied so far
                // came from the log up to `log_cursor`, and the cursor moves there only with
                // the last page: until then the receipts vouch for them (a restart
                // mid-snapshot would otherwise forget where they came from).
                let log_cursor = at.log_cursor;
                if log_cursor.position > 0 && self.receipts.admit(Receipt { at: log_cursor, previous: None }) {
                    self.store(out, StoreOp::KeepReceipts(self.receipts.clone()), Awaiting::Receipts);
                }
            }
            (awaiting, result) => {
                tracing::error!("store result {result:?} does not answer {awaiting:?}");
            }
        }
    }

    pub(super) fn on_downlink(&mut self, msg: Downlink, out: &mut Vec<Action>) {
        // A schema is no epoch's: it comes after every Welcome and whenever a gateway loads a
        // new version, and the store follows only a version newer than its own.
        if let Downlink::Schema { version, text } = msg {
            if version > self.live.schema_version {
                self.store(out, StoreOp::FollowSchema { version, text }, Awaiting::Schema);
            }
            return;
        }
        if let Downlink::SlowDown { retry_after_ms } = msg {
            // What was dropped is resent once its answer is overdue, after the quiet time.
            tracing::warn!(retry_after_ms, "the gateway asks this device to slow down (over its quota)");
            self.quiet_until = self.now.saturating_add(retry_after_ms.min(MAX_QUIET_MS));
            return;
        }
        if let Downlink::Welcome { epoch, node_counter, device_seq, node_elsewhere } = msg {
            match self.phase {
                Phase::Handshake(Some(_)) => {
                    self.welcomed = Some(epoch);
                    let view = GatewayView { epoch, node_counter, device_seq, node_elsewhere };
                    self.store(out, StoreOp::Confirm(view), Awaiting::Confirm);
                }
                Phase::Confirmed(current) if current != epoch => self.rehandshake(out),
                // A repeated Hello's second answer.
                _ => {}
            }
            return;
        }
        let msg = match feed::Feed::from_downlink(msg) {
            Ok(feed) => return self.on_feed(feed),
            Err(other) => *other,
        };
        let Some(epoch) = self.confirmed() else { return };
        match msg.epoch() {
            Some(e) if e == epoch => {}
            Some(_) => return self.rehandshake(out),
            // Version 1 answers are never asked for by this machine.
            None => return,
        }
        match msg {
            Downlink::Ack { id, first_seq, last_seq, refused, receipt, previous, .. } => {
                let Some(at) = self.in_flight(id, first_seq, last_seq) else {
                    tracing::debug!(id, first_seq, last_seq, "an ack for no batch in flight; keeping its receipt only");
                    // Its batch was sent again meanwhile, but the receipt is still evidence of a
                    // merge: if it came from a store since replaced, it is the only evidence.
                    if let Some(at) = receipt
                        && self.receipts.admit(Receipt { at, previous })
                    {
                        self.store(out, StoreOp::KeepReceipts(self.receipts.clone()), Awaiting::Receipts);
                    }
                    return;
                };
                for r in &refused {
                    tracing::warn!(first_seq, last_seq, index = r.index, reason = %r.reason, "the gateway refused a row; moving it aside");
                }
                let batch = self.inflight.remove(at);
                let mut changed = self.checked(batch.shown.as_ref(), epoch);
                if let Some(at) = receipt {
                    changed |= self.receipts.admit(Receipt { at, previous });
                }
                let receipts = changed.then(|| self.receipts.clone());
                self.store(out, StoreOp::Ack { first: first_seq, last: last_seq, refused, receipts }, Awaiting::Ack);
            }
            Downlink::Nack { id, first_seq, last_seq, reason, .. } => {
                let Some(at) = self.in_flight(id, first_seq, last_seq) else {
                    tracing::warn!(id, first_seq, last_seq, %reason, "a refusal for no batch in flight; ignored");
                    return;
                };
                tracing::warn!(first_seq, last_seq, %reason, "the gateway refused a batch; moving it aside");
                // (A refusal vouches for no receipt: some are sent before receipts are looked
                // at, for a message too large or on the wrong topic.)
                self.inflight.remove(at);
                self.store(out, StoreOp::Reject { first: first_seq, last: last_seq, reason }, Awaiting::Reject);
            }
            Downlink::Changes { from, cursor, more, echo, batch, .. } => {
                if !self.answers_pull(echo) {
                    return;
                }
                let Some(batch) = self.decode(&batch) else { return };
                let cursor =
                    Some(CursorMove { from: Some(from), from_tag: None, resets: self.pull_resets, to: cursor });
                self.store(out, StoreOp::Apply { batch, cursor, evict: Vec::new() }, Awaiting::Changes { more });
            }
            Downlink::ScopedChanges { from, cursor, more, echo, evict, batch, .. } => {
                if !self.answers_pull(echo) {
                    return;
                }
                let (Some(batch), Some(evict)) = (self.decode(&batch), self.decode(&evict)) else { return };
                let cursor =
                    Some(CursorMove { from: Some(from), from_tag: None, resets: self.pull_resets, to: cursor });
                let op = StoreOp::Apply { batch, cursor, evict: evict.rows };
                self.store(out, op, Awaiting::Changes { more });
            }
            Downlink::Scope { version, tables, .. } => {
                // In place of a pull's answer when the scope changed: the pull is over. A
                // snapshot's pull is never answered so (the scope comes in place of changes
                // only): kept, in case the store does not reset. The newest scope told
                // replaces one that failed to be taken.
                let kept = self.pulling.take().filter(|p| p.snapshot_from.is_some());
                // The same request made again is one for the scope told now.
                self.pull_sent = None;
                self.rescope = None;
                // The scope to follow comes after it, anew.
                self.follow_next = None;
                let op = StoreOp::Rescope { version, tables: tables.clone() };
                self.store(out, op, Awaiting::Rescope { version, tables, kept });
            }
            Downlink::Follow { scope, .. } => {
                // After the `Scope` it comes with, once the store holds that scope's rows:
                // till then, the new scope's changes would land on the old one's rows.
                if self.rescope.is_some() {
                    self.follow_next = Some(scope);
                } else {
                    self.follow(scope, out);
                }
            }
            // Counted from once the first page it comes before is taken: an answer dropped
            // (to an earlier pull) leaves the progress as it was.
            Downlink::SnapshotSize { rows, bytes, .. } => self.snapshot_size = Some((rows, bytes)),
            Downlink::Snapshot { from, echo, resume, log_cursor, done, batch, .. } => {
                // The size told just before this page is for it alone.
                let size = self.snapshot_size.take();
                if !self.answers_pull(echo) {
                    return;
                }
                // A page without `from` answers a pull without cursor: the first.
                let from = from.unwrap_or_default();
                if self.pulling.as_ref().and_then(|p| p.snapshot_from.as_ref()) != Some(&from) {
                    tracing::debug!(
                        "a snapshot page that does not follow the last one taken (an earlier request's); dropped"
                    );
                    return;
                }
                // Counted as the gateway counts what it stores: payload bytes, before
                // compression.
                let bytes = declared_payload_len(&batch).unwrap_or(batch.len() as u64);
                let Some(batch) = self.decoded.take().or_else(|| self.decode(&batch)) else { return };
                let rows = batch.rows.len() as u64;
                if from.is_empty() {
                    let (rows_total, bytes_total) = size.unwrap_or_default();
                    self.live.snapshot =
                        Some(SnapshotProgress { rows_total, bytes_total, ..SnapshotProgress::default() });
                    out.push(Action::Progress(Progress::Start { label: "snapshot", total: rows_total }));
                }
                let mut progress = self.live.snapshot.unwrap_or_default();
                progress.rows_done += rows;
                progress.bytes_done += bytes;
                // Asks for the next page now, so that the gateway reads it while this one is
                // applied. Each page applies only where the one before left off (the cursor,
                // with the last page, only if none was set or reset meanwhile); each page
                // before the last notes where the snapshot goes on, so that one interrupted
                // (a disconnect, a restart, a page that failed to apply) resumes there.
                match self.confirmed() {
                    Some(epoch) if !done => self.pull_snapshot(out, epoch, resume.clone(), log_cursor),
                    _ => self.pulling = Some(Pulling { since: self.now, snapshot_from: None, echo: None }),
                }
                let at = SnapshotAt { resume, log_cursor, progress };
                let op = StoreOp::ApplyPage { batch, from, at: at.clone(), done, resets: self.pull_resets };
                self.store(out, op, Awaiting::SnapshotPage { at, done, rows });
            }
            _ => {}
        }
    }

    /// Whether an answer is to the pull out now: its echo is that pull's id (from a gateway
    /// that does not echo, any answer may be; the store's checks decide). An answer to an
    /// earlier pull (one timed out, or made before a reconnect or the store's last reset) is
    /// dropped: read for the device as it was then (under its old scope, say), it would hide
    /// what it does not hold.
    fn answers_pull(&self, echo: Option<u64>) -> bool {
        let Some(echo) = echo else { return true };
        let current = self.pulling.as_ref().and_then(|p| p.echo) == Some(echo);
        if !current {
            tracing::debug!(echo, "an answer to an earlier pull; dropped");
        }
        current
    }

    /// Asks for the snapshot page at `resume`, the next to take.
    fn pull_snapshot(&mut self, out: &mut Vec<Action>, epoch: Epoch, resume: Vec<u8>, log_cursor: LogCursor) {
        let snapshot_from = Some(resume.clone());
        let mut msg = Uplink::PullSnapshot {
            device: self.cfg.device_id.clone(),
            epoch,
            resume,
            log_cursor,
            max_rows: self.cfg.pull_rows,
            max_bytes: self.msg_limit.min(u32::MAX as usize) as u32,
            name_from: true,
            echo: None,
        };
        let id = self.stamp_pull(&mut msg);
        self.pulling = Some(Pulling { since: self.now, snapshot_from, echo: Some(id) });
        self.publish(out, msg);
    }

    /// The gateway answered, in `epoch`, a batch that showed receipts: it holds them all.
    /// Whether the receipts to keep changed.
    fn checked(&mut self, shown: Option<&Shown>, epoch: Epoch) -> bool {
        match shown {
            Some(s) if s.epoch == epoch => self.receipts.checked(&s.receipts),
            _ => false,
        }
    }

    fn in_flight(&self, id: u64, first: i64, last: i64) -> Option<usize> {
        self.inflight.iter().position(|b| b.id == id && b.first == first && b.last == last)
    }

    pub(super) fn decode(&mut self, bytes: &[u8]) -> Option<Batch> {
        match decode_batch(bytes, &Limits::default(), &Dictionaries::default()) {
            Ok(b) => Some(b),
            Err(e) => {
                // The gateway checks everything it logs with these same limits, so this is a
                // fault of the gateway's (or of the link); the pull is retried after a timeout.
                tracing::error!("an undecodable page from the gateway: {e}");
                self.live.last_error = Some(format!("undecodable page from the gateway: {e}"));
                None
            }
        }
    }
}
