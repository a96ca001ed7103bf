//! The device side of the sync protocol as a state machine: inputs in (connection events,
//! gateway messages, timer ticks, results of store work), actions out (messages to publish,
//! store work to do, rows to announce). It opens no socket, touches no database and reads no
//! clock: the caller passes the time with every input. The agent's async shell drives it
//! over MQTT; the deterministic simulation in the tests crate drives it over a fake network.
//!
//! The rules it keeps:
//! - Nothing is sealed, shipped or applied on a connection until the gateway has answered the
//!   handshake (`Hello` -> `Welcome`) and the store has taken in what the gateway knows of
//!   this device: a store restored from a backup takes a new node id first; a new gateway
//!   epoch makes it send everything again and start over from a snapshot.
//! - An answer is acted on only if it names a batch in flight exactly (id and range), and
//!   only under the epoch the handshake confirmed; anything from another epoch starts a new
//!   handshake instead.
//! - A batch is sent again only when the link has been idle (everything published has been
//!   written out) for a whole timeout since that batch left, so a slow link that is still
//!   sending is never flooded with copies; repeats back off.
//!
//! At most one store operation is outstanding: it is the last action of a step, and its
//! result is the next input. Other inputs that arrive meanwhile wait for it. What to do next
//! (read the cursor and pull, read the outbox and ship, send a batch again) is decided in one
//! place, [`Machine::drive`], after every input.

use std::collections::VecDeque;

use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, declared_payload_len, decode_batch, encode_batch};
use driftless_core::protocol::{Downlink, Receipt, Receipts, RefusedRow, Uplink};
use driftless_core::{ApplyReport, Batch, ChangedRow, Confirmed, Epoch, GatewayView, Identity, LogCursor, OutboxBatch};

/// How the machine behaves.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub device_id: String,
    /// Batches sent and not yet acknowledged, at most.
    pub max_inflight: usize,
    /// Rows per uplink batch, at most.
    pub batch_rows: usize,
    /// Bytes per message, at most: uplink batches are split to fit, and pulls ask for pages
    /// this size. Halved when the link cannot move a message in time, grown back after.
    pub max_message_bytes: usize,
    /// Rows asked for per pull.
    pub pull_rows: u32,
    /// How long to wait for an answer once the link is idle before asking again.
    pub ack_timeout_ms: u64,
    /// Whether any tracked table accepts remote writes (otherwise nothing is pulled).
    pub receives: bool,
    /// Ship every this many ms (`None`: as soon as local changes are noticed).
    pub interval_ms: Option<u64>,
    /// Seed for batch ids; a new one per process, so an answer meant for an earlier process
    /// never matches a batch of this one.
    pub id_seed: u64,
}

/// Smallest message size the machine shrinks to on a slow link.
const MIN_MESSAGE_BYTES: usize = 64 << 10;

/// What the machine reacts to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Input {
    Connected,
    /// The connection dropped; `flush_timeout` if a message could not be written out in time.
    Disconnected {
        flush_timeout: bool,
    },
    /// One published message was written out to the network.
    Flushed,
    Downlink(Downlink),
    /// The gateway announced new changes.
    Poke,
    /// The database was written.
    LocalChange,
    SyncNow,
    /// Time passed (the shell ticks at least every [`Machine::tick_every_ms`]).
    Tick,
    /// The result of the store operation asked for last.
    Store(StoreResult),
}

/// What the machine asks for.
#[derive(Debug)]
#[non_exhaustive]
pub enum Action {
    Publish(Uplink),
    Store(StoreOp),
    /// Rows remote writes changed, for listeners.
    Changed(Vec<ChangedRow>),
    Progress(Progress),
}

/// Progress of long work, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    Start { label: &'static str, total: u64 },
    Advance(u64),
    Finish,
}

/// Store work (see [`crate::execute`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreOp {
    /// A connection is up: note it and say who this store is; `hold` sealing until the
    /// gateway confirms the identity (until the first confirmation of this process: the
    /// database cannot be restored under a running process).
    Begin {
        hold: bool,
    },
    /// The connection is gone: note it.
    End,
    /// Seal journaled writes now (offline, once the identity was confirmed), so that a backup
    /// taken meanwhile holds them as sealed changes rather than as writes to seal again.
    Seal,
    Confirm(GatewayView),
    /// Seal, then read up to `max_rows` entries after `after`.
    ReadOutbox {
        after: i64,
        max_rows: usize,
    },
    /// Read exactly the entries `first..=last` again.
    ReadRange {
        first: i64,
        last: i64,
    },
    /// Delete acknowledged entries; move aside the ones at these positions of the batch; keep
    /// these receipts to show, if they changed.
    Ack {
        first: i64,
        last: i64,
        refused: Vec<RefusedRow>,
        receipts: Option<Receipts>,
    },
    Reject {
        first: i64,
        last: i64,
        reason: String,
    },
    /// Keep these receipts to show.
    KeepReceipts(Receipts),
    /// Apply remote changes, moving the cursor with them if given.
    Apply {
        batch: Batch,
        cursor: Option<CursorMove>,
    },
    /// Read the pull cursor (it lives in the store: `track` may reset it at any time).
    ReadCursor,
}

/// Moves the pull cursor to `to`, but only if it is still at `from` (`None`: no cursor): an
/// answer to an older pull, or one that crossed a reset, applies its changes (harmlessly)
/// without moving the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorMove {
    pub from: Option<u64>,
    /// The cursor's reset count when the pull was made.
    pub resets: u64,
    pub to: LogCursor,
}

/// The outcome of a [`StoreOp`].
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreResult {
    /// Answer to `Begin`: the identity and the changes waiting to be sent.
    Begun {
        identity: Identity,
        pending: u64,
    },
    Done,
    Confirmed(Confirmed),
    Outbox(Option<OutboxBatch>),
    Acked(usize),
    Applied(ApplyReport),
    Cursor {
        cursor: Option<LogCursor>,
        resets: u64,
    },
    /// The store failed; the work is tried again later.
    Failed(String),
}

/// What the shell can show without asking the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStatus {
    pub connected: bool,
    /// The gateway confirmed this store's identity on the current connection.
    pub confirmed: bool,
    pub last_error: Option<String>,
    pub inflight_batches: usize,
    /// Bytes of uplink messages published since start.
    pub bytes_sent: u64,
    /// Batches the gateway has acknowledged since start.
    pub acked_batches: u64,
    /// Times the gateway's epoch changed and this store sent everything again.
    pub epoch_changes: u64,
    /// Times this store found itself behind its own past and took a new node id.
    pub node_changes: u64,
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    first: i64,
    last: i64,
    /// The ordinal of its publish on this connection.
    ordinal: u64,
    /// When it was handed to the connection, and when it was written out to the network.
    published_at: u64,
    flushed_at: Option<u64>,
    /// Times it was sent before on this connection.
    resends: u32,
    /// The receipts it showed.
    shown: Option<Shown>,
}

/// Receipts a batch showed the gateway, under the epoch they belong to. An ack of it in that
/// epoch means the gateway found them all (it would have started a new epoch otherwise). Pulls and Hellos show receipts too, but their answers do not name the message
/// they answer, so only a batch's answer vouches for what was shown.
#[derive(Debug, Clone)]
struct Shown {
    epoch: Epoch,
    receipts: Vec<LogCursor>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Down,
    /// Connected; `Some(at)` once a Hello was sent.
    Handshake(Option<u64>),
    Confirmed(Epoch),
}

/// What a pending store operation is for.
#[derive(Debug)]
enum Awaiting {
    Begin,
    End,
    Confirm,
    /// A read for a new batch of at most `rows` rows.
    Outbox {
        rows: usize,
    },
    /// A read to send a batch again (`resends` so far).
    Range {
        resends: u32,
    },
    Ack,
    Reject,
    Receipts,
    Cursor,
    Changes {
        more: bool,
    },
    SnapshotPage {
        resume: Vec<u8>,
        log_cursor: LogCursor,
        done: bool,
        rows: u64,
    },
}

#[derive(Debug)]
struct Pulling {
    since: u64,
}

/// The device's sync state machine.
#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    now: u64,
    phase: Phase,
    /// Messages published and written out on this connection.
    published: u64,
    flushed: u64,
    inflight: Vec<Inflight>,
    /// Highest outbox sequence number published on this connection.
    sent_upto: i64,
    next_id: u64,
    /// Batches to send again, oldest first: `(first, last, resends)`.
    resend: VecDeque<(i64, i64, u32)>,
    /// The outbox may hold entries not sent yet.
    want_ship: bool,
    /// A pull should go out as soon as none is in flight.
    want_pull: bool,
    pulling: Option<Pulling>,
    /// Unanswered pulls in a row, for backing off.
    pull_tries: u32,
    /// An announcement arrived while a pull was out: pull again when it is answered.
    pull_again: bool,
    msg_limit: usize,
    awaiting: Option<Awaiting>,
    /// Inputs that arrived while a store operation was outstanding.
    deferred: VecDeque<Input>,
    /// The Hello of this connection, sent again if unanswered.
    hello: Option<Uplink>,
    /// The epoch of the Welcome being confirmed by the store.
    welcomed: Option<Epoch>,
    last_ship: u64,
    uploading: bool,
    /// The gateway confirmed this store's identity at least once in this process.
    confirmed_once: bool,
    /// Writes were noticed while offline, to be sealed.
    want_seal: bool,
    /// Receipts of merges acknowledged under the current epoch, still to be shown.
    receipts: Receipts,
    /// The cursor's reset count when it was last read for a pull.
    pull_resets: u64,
    /// When a device that never pulls last showed the gateway its receipt.
    last_check: u64,
    live: LiveStatus,
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Machine {
        let msg_limit = cfg.max_message_bytes;
        let next_id = cfg.id_seed;
        Machine {
            cfg,
            now: 0,
            phase: Phase::Down,
            published: 0,
            flushed: 0,
            inflight: Vec::new(),
            sent_upto: 0,
            next_id,
            resend: VecDeque::new(),
            want_ship: false,
            want_pull: false,
            pulling: None,
            pull_tries: 0,
            pull_again: false,
            msg_limit,
            awaiting: None,
            deferred: VecDeque::new(),
            hello: None,
            welcomed: None,
            last_ship: 0,
            uploading: false,
            confirmed_once: false,
            want_seal: false,
            receipts: Receipts::default(),
            pull_resets: 0,
            last_check: 0,
            live: LiveStatus::default(),
        }
    }

    /// The status as of the last input.
    pub fn live(&self) -> &LiveStatus {
        &self.live
    }

    /// How often the shell should send [`Input::Tick`].
    pub fn tick_every_ms(&self) -> u64 {
        let backstop = (self.cfg.ack_timeout_ms / 4).max(50);
        self.cfg.interval_ms.map_or(backstop, |i| i.clamp(1, backstop))
    }

    /// Whether a store operation is outstanding (its result must be the next input).
    pub fn awaiting_store(&self) -> bool {
        self.awaiting.is_some()
    }

    /// Handles one input at time `now_ms`.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        self.now = now_ms;
        let mut out = Vec::new();
        match input {
            Input::Store(result) => self.on_store(result, &mut out),
            other if self.awaiting.is_some() => self.deferred.push_back(other),
            other => self.on_input(other, &mut out),
        }
        // Inputs that waited for the store go next, in order, while nothing is outstanding.
        while self.awaiting.is_none()
            && let Some(next) = self.deferred.pop_front()
        {
            self.on_input(next, &mut out);
        }
        self.drive(&mut out);
        self.live.inflight_batches = self.inflight.len();
        out
    }

    fn on_input(&mut self, input: Input, out: &mut Vec<Action>) {
        match input {
            Input::Store(_) => {}
            Input::Connected => {
                self.phase = Phase::Handshake(None);
                self.published = 0;
                self.flushed = 0;
                // Anything in flight before may be lost: start over from the oldest entry
                // (the gateway merges repeats harmlessly).
                self.forget_in_flight();
                self.hello = None;
                self.live.connected = true;
                self.live.last_error = None;
                self.begin(out);
            }
            Input::Disconnected { flush_timeout } => {
                if flush_timeout {
                    // The link could not move a message this size in time: send smaller ones.
                    self.msg_limit = (self.msg_limit / 2).max(MIN_MESSAGE_BYTES);
                }
                self.phase = Phase::Down;
                self.pulling = None;
                self.live.connected = false;
                self.live.confirmed = false;
                self.store(out, StoreOp::End, Awaiting::End);
            }
            Input::Flushed => {
                self.flushed += 1;
                for b in self.inflight.iter_mut().filter(|b| b.ordinal <= self.flushed && b.flushed_at.is_none()) {
                    b.flushed_at = Some(self.now);
                }
            }
            Input::Downlink(msg) => self.on_downlink(msg, out),
            Input::Poke => {
                if self.pulling.is_some() {
                    self.pull_again = true;
                } else {
                    self.want_pull = true;
                }
            }
            Input::LocalChange => {
                if self.cfg.interval_ms.is_none() {
                    self.want_ship = true;
                }
                self.want_seal = self.phase == Phase::Down && self.confirmed_once;
            }
            Input::SyncNow => {
                self.want_pull = true;
                self.want_ship = true;
            }
            Input::Tick => self.on_tick(out),
        }
    }

    fn store(&mut self, out: &mut Vec<Action>, op: StoreOp, awaiting: Awaiting) {
        self.awaiting = Some(awaiting);
        out.push(Action::Store(op));
    }

    fn publish(&mut self, out: &mut Vec<Action>, msg: Uplink) -> u64 {
        self.published += 1;
        self.live.bytes_sent += msg.encode().len() as u64;
        out.push(Action::Publish(msg));
        self.published
    }

    fn confirmed(&self) -> Option<Epoch> {
        match self.phase {
            Phase::Confirmed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether everything published on this connection has been written out.
    fn link_idle(&self) -> bool {
        self.flushed >= self.published
    }

    fn forget_in_flight(&mut self) {
        self.inflight.clear();
        self.resend.clear();
        self.sent_upto = 0;
        self.pulling = None;
        self.want_pull = true;
        self.want_ship = true;
    }

    /// Starts the handshake again (the gateway's epoch changed under us).
    fn rehandshake(&mut self, out: &mut Vec<Action>) {
        tracing::info!("the gateway speaks for another epoch; confirming this store's identity again");
        self.live.confirmed = false;
        self.forget_in_flight();
        self.phase = Phase::Handshake(None);
        self.begin(out);
    }

    fn begin(&mut self, out: &mut Vec<Action>) {
        let hold = !self.confirmed_once;
        self.store(out, StoreOp::Begin { hold }, Awaiting::Begin);
    }

    /// Starts the next piece of work, if nothing is outstanding: first a pull that is due,
    /// then a batch to send again, then a new batch.
    fn drive(&mut self, out: &mut Vec<Action>) {
        if self.awaiting.is_some() {
            return;
        }
        if self.phase == Phase::Down && self.want_seal {
            self.want_seal = false;
            self.store(out, StoreOp::Seal, Awaiting::End);
            return;
        }
        if self.confirmed().is_none() {
            return;
        }
        if self.want_pull && self.pulling.is_none() && self.cfg.receives {
            self.want_pull = false;
            self.store(out, StoreOp::ReadCursor, Awaiting::Cursor);
            return;
        }
        if let Some((first, last, resends)) = self.resend.pop_front() {
            self.inflight.retain(|b| b.first != first);
            self.store(out, StoreOp::ReadRange { first, last }, Awaiting::Range { resends });
            return;
        }
        if self.want_ship && self.inflight.len() < self.cfg.max_inflight {
            self.want_ship = false;
            self.last_ship = self.now;
            let rows = self.cfg.batch_rows.max(1);
            self.store(out, StoreOp::ReadOutbox { after: self.sent_upto, max_rows: rows }, Awaiting::Outbox { rows });
        }
    }

    fn on_tick(&mut self, out: &mut Vec<Action>) {
        let timeout = self.cfg.ack_timeout_ms;
        match self.phase {
            Phase::Down => return,
            Phase::Handshake(None) => {
                // A Begin that failed: try again.
                self.begin(out);
                return;
            }
            Phase::Handshake(Some(at)) => {
                if self.now.saturating_sub(at) > timeout
                    && self.link_idle()
                    && let Some(hello) = self.hello.clone()
                {
                    self.publish(out, hello);
                    self.phase = Phase::Handshake(Some(self.now));
                }
                return;
            }
            Phase::Confirmed(_) => {}
        }
        if self.link_idle() {
            for b in &self.inflight {
                // A batch that took long to write out crossed a slow link, which still holds
                // the tail of it (the socket's send buffer): it gets as long again.
                let writing = b.flushed_at.map_or(0, |at| at.saturating_sub(b.published_at));
                let wait = timeout.saturating_mul(1 << b.resends.min(4)).saturating_add(writing);
                if b.flushed_at.is_some_and(|at| self.now.saturating_sub(at) > wait)
                    && !self.resend.iter().any(|(f, _, _)| *f == b.first)
                {
                    tracing::warn!(first = b.first, last = b.last, "no answer for a batch; sending it again");
                    self.resend.push_back((b.first, b.last, b.resends + 1));
                }
            }
            if let Some(p) = &self.pulling
                && self.now.saturating_sub(p.since) > timeout.saturating_mul(1 << self.pull_tries.min(3))
            {
                self.pull_tries += 1;
                self.pulling = None;
                self.want_pull = true;
            }
        }
        // A device that never pulls still shows its receipt now and then, so that a gateway
        // store restored from a backup learns it lost this device's changes even while the
        // device has nothing new to send.
        if !self.cfg.receives
            && self.now.saturating_sub(self.last_check) >= timeout.saturating_mul(6)
            && let (Some(Uplink::Hello { device, node, counter, outbox_seq, .. }), Some(epoch)) =
                (self.hello.clone(), self.confirmed())
        {
            self.last_check = self.now;
            let check = Uplink::Hello {
                device,
                node,
                counter,
                outbox_seq,
                receipts: self.receipts.shown(),
                epoch: Some(epoch),
            };
            self.publish(out, check);
        }
        // Writes and announcements wake the machine at once; the tick is a backstop for lost
        // ones (every timeout), or the schedule in interval mode.
        let every = self.cfg.interval_ms.unwrap_or(timeout);
        if self.now.saturating_sub(self.last_ship) >= every {
            self.want_ship = true;
            if self.pulling.is_none() {
                self.want_pull = true;
            }
        }
    }

    /// Encodes and publishes an outbox read; false if it must be read again smaller.
    fn send_batch(&mut self, out: &mut Vec<Action>, ob: &OutboxBatch, resends: u32) -> bool {
        let batch = encode_batch(&ob.batch, EncodeOptions::default());
        // Rows can be large (photos, documents): halve the batch until its envelope fits the
        // message bound, and its payload, once decompressed, stays well within what a decoder
        // accepts. A single row over it is sent alone; the gateway decides.
        let raw = declared_payload_len(&batch).unwrap_or(u64::MAX);
        let too_big = batch.len() > self.msg_limit || raw > (Limits::default().max_decompressed / 2) as u64;
        if too_big && ob.batch.rows.len() > 1 {
            return false;
        }
        self.publish_batch(out, ob, batch, resends);
        true
    }

    fn publish_batch(&mut self, out: &mut Vec<Action>, ob: &OutboxBatch, batch: Vec<u8>, resends: u32) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let receipts = self.receipts.shown();
        let shown = self.confirmed().map(|epoch| Shown { epoch, receipts: receipts.clone() });
        let msg = Uplink::Batch {
            device: self.cfg.device_id.clone(),
            id,
            first_seq: ob.first_seq,
            last_seq: ob.last_seq,
            epoch: self.confirmed(),
            receipts,
            batch,
        };
        let ordinal = self.publish(out, msg);
        self.sent_upto = self.sent_upto.max(ob.last_seq);
        let (first, last) = (ob.first_seq, ob.last_seq);
        let published_at = self.now;
        self.inflight.push(Inflight { id, first, last, ordinal, published_at, flushed_at: None, resends, shown });
        self.inflight.sort_by_key(|b| b.first);
    }

    fn on_store(&mut self, result: StoreResult, out: &mut Vec<Action>) {
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
            (Awaiting::Cursor, StoreResult::Cursor { cursor, resets }) => {
                let Some(epoch) = self.confirmed() else { return };
                self.pull_resets = resets;
                self.pull_again = false;
                self.pulling = Some(Pulling { since: self.now });
                let msg = Uplink::Pull {
                    device: self.cfg.device_id.clone(),
                    epoch: Some(epoch),
                    cursor,
                    receipts: self.receipts.shown(),
                    max_rows: self.cfg.pull_rows,
                    max_bytes: self.msg_limit.min(u32::MAX as usize) as u32,
                };
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
            (Awaiting::Changes { more }, StoreResult::Applied(report)) => {
                self.pulling = None;
                self.pull_tries = 0;
                if !report.changed.is_empty() {
                    out.push(Action::Changed(report.changed));
                }
                if more || self.pull_again {
                    self.want_pull = true;
                }
            }
            (Awaiting::SnapshotPage { resume, log_cursor, done, rows }, StoreResult::Applied(report)) => {
                if !report.changed.is_empty() {
                    out.push(Action::Changed(report.changed));
                }
                out.push(Action::Progress(if done { Progress::Finish } else { Progress::Advance(rows) }));
                if done {
                    self.pulling = None;
                    self.pull_tries = 0;
                    // Changes logged while the snapshot was read come next.
                    self.want_pull = true;
                    return;
                }
                let Some(epoch) = self.confirmed() else { return };
                self.pulling = Some(Pulling { since: self.now });
                let msg = Uplink::PullSnapshot {
                    device: self.cfg.device_id.clone(),
                    epoch,
                    resume,
                    log_cursor,
                    max_rows: self.cfg.pull_rows,
                    max_bytes: self.msg_limit.min(u32::MAX as usize) as u32,
                };
                self.publish(out, msg);
                // The pages applied so far came from the log up to `log_cursor`, and the
                // cursor moves there only with the last page: until then the receipts vouch
                // for them (a restart mid-snapshot would otherwise forget where they came
                // from).
                if log_cursor.position > 0 && self.receipts.admit(Receipt { at: log_cursor, previous: None }) {
                    self.store(out, StoreOp::KeepReceipts(self.receipts.clone()), Awaiting::Receipts);
                }
            }
            (awaiting, result) => {
                tracing::error!("store result {result:?} does not answer {awaiting:?}");
            }
        }
    }

    fn on_downlink(&mut self, msg: Downlink, out: &mut Vec<Action>) {
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
            Downlink::Changes { from, cursor, more, batch, .. } => {
                let Some(batch) = self.decode(&batch) else { return };
                let cursor = Some(CursorMove { from: Some(from), resets: self.pull_resets, to: cursor });
                self.store(out, StoreOp::Apply { batch, cursor }, Awaiting::Changes { more });
            }
            Downlink::Snapshot { resume, log_cursor, done, batch, .. } => {
                let Some(batch) = self.decode(&batch) else { return };
                let rows = batch.rows.len() as u64;
                // The cursor moves only with the last page (a restart mid-snapshot starts the
                // snapshot again, which merges harmlessly), and only if no cursor was set
                // meanwhile.
                let cursor = done.then_some(CursorMove { from: None, resets: self.pull_resets, to: log_cursor });
                self.store(
                    out,
                    StoreOp::Apply { batch, cursor },
                    Awaiting::SnapshotPage { resume, log_cursor, done, rows },
                );
            }
            _ => {}
        }
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

    fn decode(&mut self, bytes: &[u8]) -> Option<Batch> {
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

#[cfg(test)]
mod tests;
