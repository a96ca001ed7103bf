//! The sync messages and their byte encoding: one tag byte, then fields.
//!
//! Tags 1 to 4 are the first version of the exchange (no handshake, acks matched by range
//! only); a gateway still answers them, so devices can be upgraded after their gateway.

use super::{Epoch, LogCursor, MAX_RECEIPTS};
use crate::clock::NodeId;
use crate::codec::buf::{Reader, Writer};
use crate::codec::{DecodeError, Limits};

/// Device -> gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Uplink {
    /// Sent on every connect before anything else: who the device is and how far its own
    /// history goes, so that either side can tell when the other was restored from a backup.
    Hello {
        device: String,
        /// The node id the device writes as now.
        node: NodeId,
        /// The highest dot counter that node has issued.
        counter: u64,
        /// The highest outbox sequence number the device has issued.
        outbox_seq: i64,
        /// Receipts of merges of its changes the gateway acknowledged, in the epoch below
        /// (see [`super::Receipts`]): a store that does not hold one of those log entries
        /// lost acknowledged changes.
        receipts: Vec<LogCursor>,
        /// The gateway epoch its cursor and receipt come from, if any.
        epoch: Option<Epoch>,
    },
    /// Local changes: outbox entries `first_seq..=last_seq` as an encoded batch envelope. `id`
    /// is new for every publish; the answer names it, so only this publish is settled by it.
    /// `epoch` and `receipts` say which gateway store acknowledged what so far: a store that
    /// has no record of one of those receipts was restored, which even a device that only uploads
    /// reveals with its next batch.
    Batch {
        device: String,
        id: u64,
        first_seq: i64,
        last_seq: i64,
        epoch: Option<Epoch>,
        receipts: Vec<LogCursor>,
        batch: Vec<u8>,
    },
    /// Asks for changes logged after `cursor` (from the gateway epoch `epoch`); no cursor asks
    /// for a snapshot first. Answers hold at most `max_rows` rows and about `max_bytes` bytes.
    /// `receipts` as in `Batch`: an idle device that only pulls reveals a restored store too.
    Pull {
        device: String,
        epoch: Option<Epoch>,
        cursor: Option<LogCursor>,
        receipts: Vec<LogCursor>,
        max_rows: u32,
        max_bytes: u32,
        /// A number every answer repeats (tag 9; devices of earlier versions send tag 6
        /// without it): an id new for every request, so that a late answer to an earlier
        /// one (from a gateway instance that read it under the device's old scope, say) is
        /// not taken for it.
        echo: Option<u64>,
    },
    /// Asks for the snapshot page after `resume` (opaque, from the previous page). With
    /// `name_from` (tag 8; devices of earlier versions send tag 7 without it) the answer names
    /// the `resume` it was read from, so a device may ask for a page before it has applied the
    /// one before. With `echo` (tag 10, which names `from` too) the answer repeats it, as
    /// for `Pull`.
    PullSnapshot {
        device: String,
        epoch: Epoch,
        resume: Vec<u8>,
        log_cursor: LogCursor,
        max_rows: u32,
        max_bytes: u32,
        name_from: bool,
        echo: Option<u64>,
    },
    /// Version 1: a batch acknowledged by its range alone.
    LegacyBatch { device: String, first_seq: i64, last_seq: i64, batch: Vec<u8> },
    /// Version 1: a pull with a bare log position (0 asks for a snapshot).
    LegacyPull { device: String, cursor: u64, max_rows: u32 },
    /// Version 1: the next snapshot page.
    LegacyPullSnapshot { device: String, resume: Vec<u8>, log_cursor: u64, max_rows: u32 },
}

/// Gateway -> device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Downlink {
    /// The answer to `Hello`: the gateway's epoch, and what it has merged from this device
    /// and its node. A device behind its own past (restored from a backup, or a copy of
    /// another device's database) takes a new node id before it seals another write.
    Welcome {
        epoch: Epoch,
        /// The highest dot counter of the device's node the gateway has merged.
        node_counter: u64,
        /// The highest outbox sequence number of this device the gateway has merged.
        device_seq: i64,
        /// The node id is bound to another device: the database was copied.
        node_elsewhere: bool,
    },
    /// The batch with this id was merged and is durable: delete those outbox entries. Rows
    /// listed in `refused` (by their position in the batch) were not merged, because no
    /// replica could accept them: move those entries aside instead. `receipt` names the log
    /// entry the merge wrote (if it changed nothing: the newest entry, whose state already held
    /// it; none while the log is empty), for the device to show later; `previous` is the
    /// receipt given to this device before it in this store, which `receipt` vouches for.
    Ack {
        epoch: Epoch,
        id: u64,
        first_seq: i64,
        last_seq: i64,
        refused: Vec<RefusedRow>,
        receipt: Option<LogCursor>,
        previous: Option<LogCursor>,
    },
    /// The batch with this id was refused because of what it holds, and kept as a dead
    /// letter: move those entries aside.
    Nack {
        epoch: Epoch,
        id: u64,
        first_seq: i64,
        last_seq: i64,
        reason: String,
    },
    /// Changes logged after position `from` (the pull's cursor), up to `cursor`; `more` if
    /// others follow. `echo`: the pull's (tag 19; tag 8 without it).
    Changes {
        epoch: Epoch,
        from: u64,
        cursor: LogCursor,
        more: bool,
        echo: Option<u64>,
        batch: Vec<u8>,
    },
    /// [`Downlink::Changes`] for a device holding only its scopes, with the rows that left
    /// them: `evict` is a batch of keys (empty states) to drop from its tables without
    /// syncing a delete. Applied together with the changes and the cursor move. `echo`: the
    /// pull's (tag 20; tag 13 without it).
    ScopedChanges {
        epoch: Epoch,
        from: u64,
        cursor: LogCursor,
        more: bool,
        echo: Option<u64>,
        evict: Vec<u8>,
        batch: Vec<u8>,
    },
    /// The device's scope changed (an operator set its parameters) to `version`: it drops
    /// every row of the scoped `tables` it holds and takes a snapshot of its new scope. Sent
    /// after every `Welcome` in a schema with scopes, and instead of a pull's answer when the
    /// version changed since the device was last told; a device that holds `version`
    /// already does nothing.
    Scope {
        epoch: Epoch,
        version: u64,
        tables: Vec<String>,
    },
    /// The scope whose changes the device follows ([`crate::protocol::scope_topic`]): the
    /// devices holding exactly the same rows share it. Sent after `Scope` (which devices of
    /// earlier versions read as before), and with a pull's answer when the scope's name
    /// changed since the device was told (a schema that scopes another table).
    Follow {
        epoch: Epoch,
        scope: String,
    },
    /// One page of the current state. When `done`, continue with a pull from `log_cursor`.
    /// `from`: the `resume` it was read from, when the request asked (tag 18; tag 9 without
    /// it answers a `Pull` without cursor, from the start, or an earlier device's request).
    /// `echo`: the request's (tag 21, which names `from` too: empty for the first page).
    Snapshot {
        epoch: Epoch,
        from: Option<Vec<u8>>,
        echo: Option<u64>,
        resume: Vec<u8>,
        log_cursor: LogCursor,
        done: bool,
        batch: Vec<u8>,
    },
    /// What the snapshot whose first page follows holds: `rows` rows of `bytes` bytes (before
    /// compression; for a device holding scopes, estimated from the first page). For progress
    /// only.
    SnapshotSize {
        epoch: Epoch,
        rows: u64,
        bytes: u64,
    },
    /// The declared sync schema (its TOML text) at `version`: sent after every `Welcome` and,
    /// retained, on the tenant's schema topic whenever a gateway loads a new version. Not
    /// tied to an epoch: versions only grow, and a device follows a version newer than its own.
    Schema {
        version: u64,
        text: String,
    },
    /// The device is over its quota: messages it sends for the next `retry_after_ms` are
    /// dropped unanswered (what it sent is still its own to send again). Not tied to an epoch.
    SlowDown {
        retry_after_ms: u64,
    },
    /// A change logged in a scope, published once on the scope's topic
    /// ([`crate::protocol::scope_topic`]) for every device holding it. A device whose cursor
    /// is exactly at `previous` (the scope's entry before this one, position and tag; 0/0 for
    /// none) applies it and moves its cursor to `cursor`; any other device pulls from its
    /// cursor (it missed an entry, or its cursor names an entry the log no longer holds),
    /// unless it is at or past `cursor` already.
    Feed {
        epoch: Epoch,
        scope: String,
        previous: LogCursor,
        cursor: LogCursor,
        /// The device whose write this is: it holds the change already ("" for none).
        origin: String,
        /// The change as a batch envelope; empty when it was too large to broadcast (the
        /// device pulls it instead).
        batch: Vec<u8>,
        /// Keys of rows the change took out of the scope (an encoded batch of keys, empty for
        /// none): every device holding the scope drops them, the writer too.
        evict: Vec<u8>,
    },
    /// Version 1 answers.
    LegacyAck {
        first_seq: i64,
        last_seq: i64,
    },
    LegacyNack {
        first_seq: i64,
        last_seq: i64,
        reason: String,
    },
    LegacyChanges {
        cursor: u64,
        more: bool,
        batch: Vec<u8>,
    },
    LegacySnapshot {
        resume: Vec<u8>,
        log_cursor: u64,
        done: bool,
        batch: Vec<u8>,
    },
}

/// A row of a batch the gateway did not merge, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// Its position in the batch.
    pub index: u32,
    pub reason: String,
}

pub(super) mod tag {
    pub(super) const LEGACY_BATCH: u8 = 1;
    pub(super) const LEGACY_PULL: u8 = 2;
    pub(super) const LEGACY_PULL_SNAPSHOT: u8 = 3;
    pub(super) const HELLO: u8 = 4;
    pub(super) const BATCH: u8 = 5;
    pub(super) const PULL: u8 = 6;
    pub(super) const PULL_SNAPSHOT: u8 = 7;
    pub(super) const PULL_SNAPSHOT_FROM: u8 = 8;
    pub(super) const PULL_ECHO: u8 = 9;
    pub(super) const PULL_SNAPSHOT_ECHO: u8 = 10;

    pub(super) const LEGACY_ACK: u8 = 1;
    pub(super) const LEGACY_NACK: u8 = 2;
    pub(super) const LEGACY_CHANGES: u8 = 3;
    pub(super) const LEGACY_SNAPSHOT: u8 = 4;
    pub(super) const WELCOME: u8 = 5;
    pub(super) const ACK: u8 = 6;
    pub(super) const NACK: u8 = 7;
    pub(super) const CHANGES: u8 = 8;
    pub(super) const SNAPSHOT: u8 = 9;
    pub(super) const SCHEMA: u8 = 10;
    pub(super) const SLOW_DOWN: u8 = 11;
    pub(super) const FEED: u8 = 12;
    pub(super) const SCOPED_CHANGES: u8 = 13;
    pub(super) const SCOPE: u8 = 14;
    pub(super) const SCOPED_FEED: u8 = 15;
    pub(super) const FOLLOW: u8 = 16;
    pub(super) const SNAPSHOT_SIZE: u8 = 17;
    pub(super) const SNAPSHOT_FROM: u8 = 18;
    pub(super) const CHANGES_ECHO: u8 = 19;
    pub(super) const SCOPED_CHANGES_ECHO: u8 = 20;
    pub(super) const SNAPSHOT_ECHO: u8 = 21;
}

/// Longest tenant, device or scope name accepted (as `protocol::valid_id`).
pub(super) const MAX_ID: usize = 128;

/// Longest resume token and refusal reason accepted.
pub(super) const MAX_TOKEN: usize = 4096;

/// Longest schema text accepted.
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;

impl Writer {
    fn epoch(&mut self, e: &Epoch) {
        self.raw(&e.0);
    }

    fn opt_epoch(&mut self, e: &Option<Epoch>) {
        match e {
            Some(e) => {
                self.u8(1);
                self.epoch(e);
            }
            None => self.u8(0),
        }
    }

    fn cursor(&mut self, c: &LogCursor) {
        self.varint(c.position);
        self.raw(&c.tag.to_le_bytes());
    }

    fn opt_cursor(&mut self, c: &Option<LogCursor>) {
        match c {
            Some(c) => {
                self.u8(1);
                self.cursor(c);
            }
            None => self.u8(0),
        }
    }

    /// An echo, whose presence the message's tag says.
    fn opt_echo(&mut self, echo: &Option<u64>) {
        if let Some(echo) = echo {
            self.varint(*echo);
        }
    }

    fn cursors(&mut self, list: &[LogCursor]) {
        self.varint(list.len() as u64);
        for c in list {
            self.cursor(c);
        }
    }
}

impl Reader<'_> {
    fn epoch(&mut self) -> Result<Epoch, DecodeError> {
        let mut b = [0u8; 16];
        b.copy_from_slice(self.take(16)?);
        Ok(Epoch(b))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("a flag byte is neither 0 nor 1")),
        }
    }

    fn opt_epoch(&mut self) -> Result<Option<Epoch>, DecodeError> {
        if self.flag()? { self.epoch().map(Some) } else { Ok(None) }
    }

    fn cursor(&mut self) -> Result<LogCursor, DecodeError> {
        let position = self.varint()?;
        let mut tag = [0u8; 8];
        tag.copy_from_slice(self.take(8)?);
        Ok(LogCursor { position, tag: u64::from_le_bytes(tag) })
    }

    fn opt_cursor(&mut self) -> Result<Option<LogCursor>, DecodeError> {
        if self.flag()? { self.cursor().map(Some) } else { Ok(None) }
    }

    fn receipts(&mut self) -> Result<Vec<LogCursor>, DecodeError> {
        let n = self.varint()?;
        if n > MAX_RECEIPTS as u64 {
            return Err(DecodeError::Invalid("more receipts than a device keeps"));
        }
        (0..n).map(|_| self.cursor()).collect()
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Invalid(what))
    }
}

impl Uplink {
    /// The device the message claims to come from.
    pub fn device(&self) -> &str {
        match self {
            Uplink::Hello { device, .. }
            | Uplink::Batch { device, .. }
            | Uplink::Pull { device, .. }
            | Uplink::PullSnapshot { device, .. }
            | Uplink::LegacyBatch { device, .. }
            | Uplink::LegacyPull { device, .. }
            | Uplink::LegacyPullSnapshot { device, .. } => device,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Uplink::Hello { device, node, counter, outbox_seq, receipts, epoch } => {
                w.u8(tag::HELLO);
                w.bytes(device.as_bytes());
                w.raw(&node.0);
                w.varint(*counter);
                w.zigzag(*outbox_seq);
                w.cursors(receipts);
                w.opt_epoch(epoch);
            }
            Uplink::Batch { device, id, first_seq, last_seq, epoch, receipts, batch } => {
                w.u8(tag::BATCH);
                w.bytes(device.as_bytes());
                w.varint(*id);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.opt_epoch(epoch);
                w.cursors(receipts);
                w.raw(batch);
            }
            Uplink::Pull { device, epoch, cursor, receipts, max_rows, max_bytes, echo } => {
                w.u8(if echo.is_some() { tag::PULL_ECHO } else { tag::PULL });
                w.bytes(device.as_bytes());
                w.opt_epoch(epoch);
                w.opt_cursor(cursor);
                w.cursors(receipts);
                w.varint(u64::from(*max_rows));
                w.varint(u64::from(*max_bytes));
                w.opt_echo(echo);
            }
            Uplink::PullSnapshot { device, epoch, resume, log_cursor, max_rows, max_bytes, name_from, echo } => {
                w.u8(match (echo, name_from) {
                    (Some(_), _) => tag::PULL_SNAPSHOT_ECHO,
                    (None, true) => tag::PULL_SNAPSHOT_FROM,
                    (None, false) => tag::PULL_SNAPSHOT,
                });
                w.bytes(device.as_bytes());
                w.epoch(epoch);
                w.bytes(resume);
                w.cursor(log_cursor);
                w.varint(u64::from(*max_rows));
                w.varint(u64::from(*max_bytes));
                w.opt_echo(echo);
            }
            Uplink::LegacyBatch { device, first_seq, last_seq, batch } => {
                w.u8(tag::LEGACY_BATCH);
                w.bytes(device.as_bytes());
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.raw(batch);
            }
            Uplink::LegacyPull { device, cursor, max_rows } => {
                w.u8(tag::LEGACY_PULL);
                w.bytes(device.as_bytes());
                w.varint(*cursor);
                w.varint(u64::from(*max_rows));
            }
            Uplink::LegacyPullSnapshot { device, resume, log_cursor, max_rows } => {
                w.u8(tag::LEGACY_PULL_SNAPSHOT);
                w.bytes(device.as_bytes());
                w.bytes(resume);
                w.varint(*log_cursor);
                w.varint(u64::from(*max_rows));
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Uplink, DecodeError> {
        let mut r = Reader::new(bytes, limits);
        let kind = r.u8()?;
        let device = r.string(MAX_ID, "device id bytes")?;
        let msg = match kind {
            tag::HELLO => Uplink::Hello {
                device,
                node: NodeId::from_slice(r.take(16)?).ok_or(DecodeError::Truncated)?,
                counter: r.varint()?,
                outbox_seq: r.zigzag()?,
                receipts: r.receipts()?,
                epoch: r.opt_epoch()?,
            },
            tag::BATCH => {
                let id = r.varint()?;
                let first_seq = r.zigzag()?;
                let last_seq = r.zigzag()?;
                let epoch = r.opt_epoch()?;
                let receipts = r.receipts()?;
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Uplink::Batch { device, id, first_seq, last_seq, epoch, receipts, batch });
            }
            t @ (tag::PULL | tag::PULL_ECHO) => Uplink::Pull {
                device,
                epoch: r.opt_epoch()?,
                cursor: r.opt_cursor()?,
                receipts: r.receipts()?,
                max_rows: r.u32("max_rows out of range")?,
                max_bytes: r.u32("max_bytes out of range")?,
                echo: if t == tag::PULL_ECHO { Some(r.varint()?) } else { None },
            },
            t @ (tag::PULL_SNAPSHOT | tag::PULL_SNAPSHOT_FROM | tag::PULL_SNAPSHOT_ECHO) => Uplink::PullSnapshot {
                device,
                epoch: r.epoch()?,
                resume: r.bytes(MAX_TOKEN, "snapshot resume token")?.to_vec(),
                log_cursor: r.cursor()?,
                max_rows: r.u32("max_rows out of range")?,
                max_bytes: r.u32("max_bytes out of range")?,
                name_from: t != tag::PULL_SNAPSHOT,
                echo: if t == tag::PULL_SNAPSHOT_ECHO { Some(r.varint()?) } else { None },
            },
            tag::LEGACY_BATCH => {
                let first_seq = r.zigzag()?;
                let last_seq = r.zigzag()?;
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Uplink::LegacyBatch { device, first_seq, last_seq, batch });
            }
            tag::LEGACY_PULL => {
                Uplink::LegacyPull { device, cursor: r.varint()?, max_rows: r.u32("max_rows out of range")? }
            }
            tag::LEGACY_PULL_SNAPSHOT => Uplink::LegacyPullSnapshot {
                device,
                resume: r.bytes(MAX_TOKEN, "snapshot resume token")?.to_vec(),
                log_cursor: r.varint()?,
                max_rows: r.u32("max_rows out of range")?,
            },
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

mod downlink;

#[cfg(test)]
mod tests;
