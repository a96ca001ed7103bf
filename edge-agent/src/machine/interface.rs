//! What the machine takes in and asks for: its inputs, its actions, the store work it
//! requests and the results it expects back, and the status it shows.

use driftless_core::protocol::{Downlink, Receipts, RefusedRow, Uplink};
use driftless_core::{
    ApplyReport, Batch, ChangedRow, Confirmed, GatewayView, Identity, LogCursor, OutboxBatch, RowChange, SnapshotAt,
    SnapshotProgress,
};

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
    /// A snapshot page with its batch decoded by the shell as it arrived, so that decoding
    /// overlaps the store's work on the page before (the machine decodes a page given as
    /// `Downlink` itself).
    Page(Downlink, Batch),
    /// The gateway announced new changes, up to `head` if it said (a gateway of an earlier
    /// version does not).
    Poke {
        head: Option<LogCursor>,
    },
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
    /// Subscribe to the changes of this scope ([`driftless_core::protocol::scope_topic`]),
    /// in place of any other scope's: the device's scope is this one now.
    Follow(String),
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
    /// Apply remote changes, moving the cursor with them if given, and drop the rows (keys
    /// only) that left the device's scope.
    Apply {
        batch: Batch,
        cursor: Option<CursorMove>,
        evict: Vec<RowChange>,
    },
    /// Apply a snapshot page read from `from`, if the snapshot goes on there, no cursor is
    /// set and it was reset `resets` times; noting where the snapshot goes on next (`at`), or,
    /// with the last page (`done`), setting the cursor at `at.log_cursor`.
    ApplyPage {
        batch: Batch,
        from: Vec<u8>,
        at: SnapshotAt,
        done: bool,
        resets: u64,
    },
    /// The device's scope is `version` now: if the store holds its rows under another, drop
    /// every row of the scoped `tables` and reset the cursor (the next pull fetches the scope).
    Rescope {
        version: u64,
        tables: Vec<String>,
    },
    /// Read the pull cursor (it lives in the store: `track` may reset it at any time).
    ReadCursor,
    /// Follow this version of the declared sync schema (its TOML text): create, migrate and
    /// track the tables it declares.
    FollowSchema {
        version: u64,
        text: String,
    },
}

/// Moves the pull cursor to `to`, and applies the page it comes with, only if the cursor is
/// still at `from` (`None`: no cursor): an answer to an older pull, or one that crossed a
/// reset, changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorMove {
    pub from: Option<u64>,
    /// The tag the cursor must have at `from` too (a scope's change names the entry it
    /// follows; a pull's page was checked by the gateway against the cursor it was asked
    /// from).
    pub from_tag: Option<u64>,
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
        /// Where a snapshot that was interrupted goes on (no cursor yet), and how far it got.
        snapshot: Option<SnapshotAt>,
    },
    /// Answer to `FollowSchema`: the version the store follows now, whether tracking
    /// changed, and whether any tracked table takes remote writes.
    SchemaFollowed {
        version: u64,
        changed: bool,
        receives: bool,
    },
    /// Answer to `Rescope`: how many rows were dropped, if the scope changed, and whether the
    /// cursor was reset (answers to pulls made before then move nothing).
    Rescoped {
        dropped: Option<usize>,
        reset: bool,
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
    /// The sync schema version the store follows (0: none yet).
    pub schema_version: u64,
    /// The snapshot under way, if one is: how far it got of what the gateway counted.
    pub snapshot: Option<SnapshotProgress>,
}
