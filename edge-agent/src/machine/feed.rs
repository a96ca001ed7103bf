//! Changes of the device's scopes, as the gateway publishes them once for every device on
//! the scope's topic. Each names its predecessor in the scope: a device whose cursor is there
//! applies it and moves on without asking for anything; one that finds its cursor behind
//! missed one and pulls from its cursor, which fetches the gap and whatever followed. A
//! change that cannot be applied in order is never applied out of order: pulls stay the one
//! way to catch up, so a feed only ever saves work.

use driftless_core::protocol::{DEFAULT_SCOPE, Downlink};
use driftless_core::{Batch, Epoch, LogCursor};

use super::*;

/// Changes waiting to be applied, at most; past that the device pulls instead.
const MAX_HELD: usize = 256;

/// How long after a scope's change arrived pokes that do not say how far the log reaches (from
/// gateways of earlier versions) are ignored.
const POKES_IGNORED_FOR_MS: u64 = 3_000;

/// A scope change waiting to be applied.
#[derive(Debug)]
pub(super) struct Feed {
    epoch: Epoch,
    scope: String,
    previous: LogCursor,
    cursor: LogCursor,
    origin: String,
    batch: Vec<u8>,
    evict: Vec<u8>,
}

impl Feed {
    /// The message as a scope change, or back as it was.
    pub(super) fn from_downlink(msg: Downlink) -> Result<Feed, Box<Downlink>> {
        match msg {
            Downlink::Feed { epoch, scope, previous, cursor, origin, batch, evict } => {
                Ok(Feed { epoch, scope, previous, cursor, origin, batch, evict })
            }
            other => Err(Box::new(other)),
        }
    }
}

impl Machine {
    /// Told that changes were logged: pull, now or after the pull that is out.
    pub(super) fn poked(&mut self) {
        if self.pulling.is_some() {
            self.pull_again = true;
        } else {
            self.want_pull = true;
        }
    }

    /// A poke: pulled on if it announces an entry past every change heard (one was lost on
    /// the way, or the broker withholds the scope's topic), or, from a gateway that does not
    /// say how far, while no scope change is heard.
    pub(super) fn on_poke(&mut self, head: Option<LogCursor>) {
        // The head of the tenant's log says nothing of a scope's own chain: a device following
        // one finds what it missed by the gap the next change shows, or its backstop pull.
        if self.following != DEFAULT_SCOPE {
            return;
        }
        let behind = match head {
            Some(head) => head.position > self.known_position().max(self.heard),
            None => self.last_feed.is_none_or(|at| self.now.saturating_sub(at) >= POKES_IGNORED_FOR_MS),
        };
        if behind {
            self.poked();
        }
    }

    /// Follows `scope`'s changes (subscribed again after every handshake: a new connection
    /// holds no subscription); changes held of the scope it leaves are dropped.
    pub(super) fn follow(&mut self, scope: String, out: &mut Vec<Action>) {
        if scope != self.following {
            self.held.clear();
        }
        self.following.clone_from(&scope);
        out.push(Action::Follow(scope));
    }

    pub(super) fn on_feed(&mut self, feed: Feed) {
        // A change of a scope the device no longer follows (its subscription outlived its
        // scope by a moment) is none of its business.
        if !self.cfg.receives || feed.scope != self.following {
            return;
        }
        self.last_feed = Some(self.now);
        // Before the handshake is confirmed nothing is applied; the pull that follows it
        // fetches this change too.
        let Some(epoch) = self.confirmed() else { return };
        if feed.epoch == epoch {
            self.heard = self.heard.max(feed.cursor.position);
        }
        if feed.epoch == epoch && feed.cursor.position <= self.known_position() {
            return;
        }
        // Another epoch's change, or one published without its rows (too large, or rows of
        // scoped tables, which each device pulls its part of: even of its own change, which
        // may have taken a row out of its scope): the pull's answer is authoritative (it
        // starts a new handshake if the epoch changed).
        if feed.epoch != epoch || feed.batch.is_empty() {
            return self.poked();
        }
        // Applied by `drive` once nothing else is outstanding, after the pull that is out (its
        // answer moves the cursor; this change may follow it), together with the changes
        // that follow it.
        if self.held.len() < MAX_HELD {
            self.held.push_back(feed);
        } else {
            self.poked();
        }
    }

    fn known_position(&self) -> u64 {
        self.known_cursor.map_or(0, |c| c.position)
    }

    /// Applies a held change (the one that follows the cursor if it is held, else the oldest,
    /// whose apply finds the gap), with the held changes that follow it in the chain, in one
    /// transaction; false if none is held.
    pub(super) fn apply_held(&mut self, out: &mut Vec<Action>) -> bool {
        let Some(epoch) = self.confirmed() else { return false };
        let known = self.known_position();
        self.held.retain(|f| f.cursor.position > known && f.epoch == epoch);
        let at = self.held.iter().position(|f| Some(f.previous) == self.known_cursor).unwrap_or(0);
        let Some(first) = self.held.remove(at) else { return false };
        let from = first.previous;
        let mut to = None;
        let mut batch = Batch::default();
        let mut evict = Vec::new();
        let mut next = Some(first);
        while let Some(feed) = next.take() {
            // Rows the change took out of the scope leave every device holding it, the
            // writer's too.
            if !feed.evict.is_empty() {
                let Some(keys) = self.decode(&feed.evict) else {
                    self.poked();
                    break;
                };
                evict.extend(keys.rows);
            }
            // The device's own write comes back too: only the cursor moves past it.
            if feed.origin != self.cfg.device_id {
                let Some(b) = self.decode(&feed.batch) else {
                    // The cursor stops before it; a pull fetches it.
                    self.poked();
                    break;
                };
                batch.roles.extend(b.roles);
                batch.rows.extend(b.rows);
            }
            to = Some(feed.cursor);
            // The store evicts before it merges: a change that evicts goes first in its
            // transaction or not at all, or it would evict a row before the changes that came
            // ahead of it were merged, and they would bring the row back.
            if batch.rows.len() < self.cfg.pull_rows as usize
                && let Some(i) = self.held.iter().position(|n| n.previous == feed.cursor && n.evict.is_empty())
            {
                next = self.held.remove(i);
            }
        }
        let Some(to) = to else { return false };
        let cursor =
            Some(CursorMove { from: Some(from.position), from_tag: Some(from.tag), resets: self.pull_resets, to });
        self.store(out, StoreOp::Apply { batch, cursor, evict }, Awaiting::Feed { to: to.position });
        true
    }

    /// The store's answer to a change applied in order (or not: the cursor was elsewhere).
    pub(super) fn fed(&mut self, to: u64, report: driftless_core::ApplyReport, out: &mut Vec<Action>) {
        self.known_cursor = report.cursor;
        if !report.changed.is_empty() {
            out.push(Action::Changed(report.changed));
        }
        if report.moved {
            self.last_fresh = self.now;
        } else if report.cursor.is_none_or(|c| c.position < to) {
            // The cursor is not where the change follows: one was missed (or the cursor names
            // an entry the gateway's log no longer holds, which the pull's check finds). What
            // is held stays; the pull's answer makes most of it old news.
            tracing::debug!(to, cursor = ?report.cursor, "a scope change out of order; pulling the gap");
            self.poked();
        }
    }
}
