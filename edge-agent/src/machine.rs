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
//!
//! Its vocabulary (inputs, actions, store work) is in `interface`; taking in store results and
//! the gateway's answers is in `answers`.

use std::collections::VecDeque;

use driftless_core::codec::{EncodeOptions, Limits, declared_payload_len, encode_batch};
use driftless_core::protocol::{Receipts, Uplink};
use driftless_core::{Batch, Epoch, LogCursor, OutboxBatch, SnapshotAt, SnapshotProgress};

mod answers;
mod feed;
mod interface;

pub use self::interface::{Action, CursorMove, Input, LiveStatus, MachineConfig, Progress, StoreOp, StoreResult};

/// Smallest message size the machine shrinks to on a slow link.
const MIN_MESSAGE_BYTES: usize = 64 << 10;

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
    Schema,
    Rescope {
        version: u64,
        tables: Vec<String>,
        /// The snapshot's pull that was out when the scope was told: still awaited unless
        /// the store resets for the new scope.
        kept: Option<Pulling>,
    },
    Changes {
        more: bool,
    },
    /// A scope's change applied if the cursor was at its predecessor; `to` is its position.
    Feed {
        to: u64,
    },
    SnapshotPage {
        at: SnapshotAt,
        done: bool,
        rows: u64,
    },
}

#[derive(Debug)]
struct Pulling {
    since: u64,
    /// Where the next snapshot page must have been read from to be taken (the empty token:
    /// the first page); `None`: no snapshot page is awaited. Pages are asked for ahead, so an
    /// answer to an earlier request may still come: it is dropped.
    snapshot_from: Option<Vec<u8>>,
    /// The id of the request out, which its answer repeats (`None`: none is out).
    echo: Option<u64>,
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
    /// A scope change the store failed to take, and when to try it again (an ack timeout
    /// later, once confirmed).
    rescope: Option<(u64, Vec<String>, u64)>,
    /// The gateway asked this device to send nothing before this time (ms): it is over its
    /// quota and would drop what it got.
    quiet_until: u64,
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
    /// What the gateway said the snapshot whose first page comes next holds (rows, bytes).
    snapshot_size: Option<(u64, u64)>,
    /// The batch of the snapshot page being handled, if the shell decoded it.
    decoded: Option<Batch>,
    /// The last pull sent (encoded without its id, with the reset count it was made under)
    /// and its id: the same request sent again (after a timeout) keeps the id, so that the
    /// first one's late answer is taken.
    pull_sent: Option<(Vec<u8>, u64)>,
    /// When a device that never pulls last showed the gateway its receipt.
    last_check: u64,
    /// Scope changes that arrived while a pull was out, applied in order after it.
    held: VecDeque<feed::Feed>,
    /// The cursor as the store last reported it (held changes at or before it are dropped).
    known_cursor: Option<LogCursor>,
    /// The scope whose changes the device follows (as the gateway last told it), and one it
    /// was told to follow once its store takes the scope's rows.
    following: String,
    follow_next: Option<String>,
    /// When a scope change last arrived, and the newest position heard in one.
    last_feed: Option<u64>,
    heard: u64,
    /// When a pull was last sent: one goes out at least every few timeouts whatever arrives,
    /// showing the receipts (a restored gateway learns from them what it lost).
    last_pull: u64,
    /// When the cursor last moved (a pull's page or a scope's change in order): the backstop
    /// pull is only for a device that heard nothing for a while.
    last_fresh: u64,
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
            rescope: None,
            quiet_until: 0,
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
            snapshot_size: None,
            decoded: None,
            pull_sent: None,
            last_check: 0,
            held: VecDeque::new(),
            known_cursor: None,
            following: driftless_core::protocol::DEFAULT_SCOPE.to_owned(),
            follow_next: None,
            last_feed: None,
            heard: 0,
            last_pull: 0,
            last_fresh: 0,
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
        self.handle_all(std::iter::once(input), now_ms)
    }

    /// Handles inputs that arrived together, then decides what to do next once: scope
    /// changes among them are applied together, in one transaction.
    pub fn handle_all(&mut self, inputs: impl IntoIterator<Item = Input>, now_ms: u64) -> Vec<Action> {
        self.now = now_ms;
        let mut out = Vec::new();
        for input in inputs {
            match input {
                Input::Store(result) => self.on_store(result, &mut out),
                other if self.awaiting.is_some() => self.deferred.push_back(other),
                other => self.on_input(other, &mut out),
            }
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
            Input::Page(msg, batch) => {
                self.decoded = Some(batch);
                self.on_downlink(msg, out);
                self.decoded = None;
            }
            Input::Poke { head } => self.on_poke(head),
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
        // Answers to pulls of an earlier connection are not taken: the device may have been
        // told another scope since.
        self.pull_sent = None;
        self.held.clear();
        self.known_cursor = None;
        self.heard = 0;
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
    /// then a batch to send again, then a new batch, then the scope's changes held.
    fn drive(&mut self, out: &mut Vec<Action>) {
        if self.awaiting.is_some() {
            return;
        }
        if self.phase == Phase::Down && self.want_seal {
            self.want_seal = false;
            self.store(out, StoreOp::Seal, Awaiting::End);
            return;
        }
        if self.confirmed().is_none() || self.now < self.quiet_until {
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
            return;
        }
        // Others' changes after this device's own are on their way: a write made here reaches
        // everyone sooner, and the changes held meanwhile go in together.
        if self.pulling.is_none() {
            self.apply_held(out);
        }
    }

    fn on_tick(&mut self, out: &mut Vec<Action>) {
        let timeout = self.cfg.ack_timeout_ms;
        if self.confirmed().is_some()
            && let Some((version, tables, at)) = self.rescope.take()
        {
            if self.now >= at {
                let op = StoreOp::Rescope { version, tables: tables.clone() };
                self.store(out, op, Awaiting::Rescope { version, tables, kept: None });
                return;
            }
            self.rescope = Some((version, tables, at));
        }
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
        }
        // A device whose scopes' changes keep arriving in order is current already, but it
        // still pulls every few timeouts: the pull shows its receipts and cursor, which is how
        // a gateway restored from a backup learns what it lost. (Not tied to shipping: writes
        // to tables it does not track must not hold its pulls back.)
        let stale = self.now.saturating_sub(self.last_fresh.max(self.last_pull)) >= every;
        let unchecked = self.now.saturating_sub(self.last_pull) >= every.max(timeout).saturating_mul(6);
        if self.pulling.is_none() && (stale || unchecked) {
            self.want_pull = true;
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

    /// Gives `request`, a pull, its id and returns it: that of the same request sent last, if
    /// it was (on this connection, under the same count of cursor resets, with no scope told
    /// since), else a new one. The same request asks for the same rows: the receipts it
    /// shows and the page size it asks for may differ (an upload acked meanwhile).
    fn stamp_pull(&mut self, request: &mut Uplink) -> u64 {
        let mut same = request.clone();
        match &mut same {
            Uplink::Pull { receipts, max_bytes, echo, .. } => {
                receipts.clear();
                *max_bytes = 0;
                *echo = None;
            }
            Uplink::PullSnapshot { max_bytes, echo, .. } => {
                *max_bytes = 0;
                *echo = None;
            }
            _ => {}
        }
        let mut key = same.encode();
        key.extend_from_slice(&self.pull_resets.to_le_bytes());
        let id = match &self.pull_sent {
            Some((last, id)) if *last == key => *id,
            _ => {
                let id = self.take_id();
                self.pull_sent = Some((key, id));
                id
            }
        };
        if let Uplink::Pull { echo, .. } | Uplink::PullSnapshot { echo, .. } = request {
            *echo = Some(id);
        }
        id
    }

    /// A new id for a batch or a pull: its answer names it.
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn publish_batch(&mut self, out: &mut Vec<Action>, ob: &OutboxBatch, batch: Vec<u8>, resends: u32) {
        let id = self.take_id();
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
}

#[cfg(test)]
mod tests;
