//! What the gateway keeps: the merged state of every row, the log of merged changes that
//! devices catch up from, the device and node registry, the store's epoch, and dead letters.
//!
//! [`GatewayStore`] is the seam; [`SqliteStore`] (one file, the embedded default) and
//! [`PgStore`] (PostgreSQL, shared by several instances) implement it and pass one test suite.

pub mod chains;
mod cloud_intake;
mod common;
pub mod kept;
mod postgres;
pub(crate) mod refs;
pub(crate) mod scoped;
mod shown;
mod sqlite;
#[cfg(test)]
pub(crate) mod test_backends;
#[cfg(test)]
mod tests;
mod vouching;

pub use self::postgres::{PgRegistry, PgStore, testing};
pub use self::sqlite::{SqliteRegistry, SqliteStore};

use driftless_core::protocol::Downlink;
use driftless_core::scope::{DeviceScope, Move};
use driftless_core::{Batch, Epoch, Hlc, LogCursor, NodeId, SyncSchema, Value};

use crate::error::{MergeError, Result};

/// Where a batch comes from, and when it is merged.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
    /// The outbox entries it carries.
    pub first_seq: i64,
    pub last_seq: i64,
    /// The gateway's clock.
    pub now_ms: u64,
    /// How far ahead of `now_ms` a write's timestamp may be before it is bounded.
    pub max_drift_ms: u64,
    /// The device's role in the registry; `None` in a tenant without one.
    pub role: Option<&'a str>,
    /// The store lost changes recently and devices are sending back what they hold, other
    /// devices' writes included: what a batch claims of other nodes cannot be checked.
    pub recovering: bool,
    /// A version-1 batch: its device has no handshake that binds its node.
    pub legacy: bool,
    /// The device's scope: its rows outside it are refused. `None` in a schema without
    /// scopes.
    pub scope: Option<&'a driftless_core::scope::DeviceScope>,
}

/// A device as an operator registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub tenant: String,
    pub device: String,
    pub role: String,
    pub added_ms: i64,
    /// When it was removed (its credentials revoked), if it was.
    pub removed_ms: Option<i64>,
    /// Its scope parameters (see `driftless_core::scope`).
    pub params: Params,
}

/// A device's scope parameters, by name.
pub type Params = std::collections::BTreeMap<String, String>;

/// What the registry says of a device's scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeStanding {
    pub params: Params,
    /// Grows with every change of `params`.
    pub version: u64,
    /// The version the gateway last told the device (`None`: never).
    pub told: Option<u64>,
    /// The scope the gateway last told it to follow (`None`: never).
    pub told_feed: Option<String>,
}

/// Whether a device is served, and as what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The tenant has no registry: every device is served, and each node keeps the first
    /// role it declares.
    Open,
    /// A registered device, with its role.
    Registered { role: String },
    /// The tenant has a registry and this device is not (or no longer) in it.
    Unknown,
}

/// What the store says of a device before handling its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub registration: Registration,
    /// If the tenant's current epoch replaced one (the store lost changes): when this
    /// device's window for sending back what it holds starts (when it was first heard from
    /// in the new epoch).
    pub recovery_from_ms: Option<i64>,
    /// Whether the device was heard from in the tenant's current epoch already.
    pub heard: bool,
    pub scope: ScopeStanding,
}

/// A sync schema version as the gateway serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedSchema {
    pub version: u64,
    /// As loaded: devices parse the same text.
    pub text: String,
    pub schema: SyncSchema,
}

impl ServedSchema {
    /// A stored version, parsed.
    pub fn parse(version: u64, text: String) -> Result<ServedSchema> {
        let schema = SyncSchema::parse(&text).map_err(|e| crate::Error::Corrupt(format!("stored sync schema: {e}")))?;
        Ok(ServedSchema { version, text, schema })
    }

    /// The message that carries it.
    pub fn message(&self) -> Downlink {
        Downlink::Schema { version: self.version, text: self.text.clone() }
    }
}

/// What merging one device batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Rows whose merged state changed.
    pub applied: usize,
    /// Rows whose changes were all merged before (a redelivery or a retry).
    pub duplicates: usize,
    /// Writes whose timestamps were bounded (their writer's clock ran too far ahead).
    pub bounded: usize,
    /// Rows not merged because no replica could accept them: their position in the batch
    /// and why. The rest of the batch is merged.
    pub refused: Vec<(usize, String)>,
    /// The log entry of the new changes, if any were logged.
    pub logged: Option<LogCursor>,
    /// The receipt the device keeps: the entry logged, or if the batch changed nothing (its
    /// changes were merged before, by an earlier copy of it or through another device), the
    /// tenant's newest entry, which the state that already held them came from. `None` only
    /// while the log is empty.
    pub receipt: Option<LogCursor>,
    /// The receipt given to this device before this one, in this store.
    pub previous: Option<LogCursor>,
    /// Writes made directly to the real tables were taken in first and logged.
    pub cloud_logged: bool,
    /// The entries logged, oldest first (the cloud's writes taken in first, then the
    /// batch's), to be published once they are durable.
    pub entries: Vec<LogEntry>,
}

/// The tenants of entries, in order, each once.
pub fn tenants_of(entries: &[(String, LogEntry)]) -> Vec<String> {
    let mut tenants: Vec<String> = Vec::new();
    for (tenant, _) in entries {
        if !tenants.contains(tenant) {
            tenants.push(tenant.clone());
        }
    }
    tenants
}

/// An entry appended to a tenant's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub cursor: LogCursor,
    /// The tenant's entry before it (0/0: none): a device holds this one in order only if
    /// its cursor was there.
    pub previous: LogCursor,
    /// The device the change came from, which holds it already ("": none, every device
    /// takes it).
    pub origin: String,
    pub change: Batch,
    /// `change` encoded (`codec::encode_payload`), as logged: published without encoding it
    /// again.
    pub payload: Vec<u8>,
    /// Where each row of `change` moved, scope-wise (empty: no row of a scoped table).
    pub moves: Vec<Option<Move>>,
}

impl LogEntry {
    /// Whether it holds rows of scoped tables: each scope it concerns gets its own part.
    pub fn scoped(&self) -> bool {
        self.moves.iter().any(Option::is_some)
    }
}

/// What a merge appends to a tenant's log: the rows whose state changed, where each row of
/// a scoped table moved, and the device not to send it back to ("": every device).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ToLog<'a> {
    pub origin: &'a str,
    pub change: &'a Batch,
    pub moves: &'a [Option<Move>],
    /// The served schema, whose tables held by reference follow the rows naming them.
    pub schema: Option<&'a SyncSchema>,
}

/// A log entry as read back.
#[derive(Debug, Clone)]
pub struct Logged {
    pub cursor: LogCursor,
    pub origin: String,
    pub change: Batch,
    /// Where each row of `change` moved, scope-wise (empty: no row of a scoped table).
    pub moves: Vec<Option<Move>>,
}

/// Changes for one device, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ChangesPage {
    pub batch: Batch,
    /// The log position this page reaches; the device pulls after it next.
    pub cursor: LogCursor,
    /// Whether the log holds more after `cursor`.
    pub more: bool,
    /// Rows that left the device's scope, to be removed from its tables (keys only).
    pub evict: Batch,
}

/// One page of the current state of a tenant's rows.
#[derive(Debug, Clone, Default)]
pub struct SnapshotPage {
    pub batch: Batch,
    /// Where the next page starts; empty when `done`.
    pub resume: Vec<u8>,
    pub done: bool,
}

/// A device as the registry sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub tenant: String,
    pub device: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Highest outbox sequence number of this device merged so far.
    pub uplink_hwm: i64,
    /// The log position the device last pulled from.
    pub downlink_cursor: u64,
    /// How far that cursor is behind the tenant's log head.
    pub lag: u64,
}

/// What the gateway has merged from a device and the node it writes as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The highest dot counter of the node merged so far (0 if none).
    pub node_counter: u64,
    /// The highest outbox sequence number of the device merged so far.
    pub device_seq: i64,
    /// The device the node is bound to: the first that said it writes as it.
    pub node_owner: String,
}

/// A message the gateway refused, kept with its reason. Large payloads are kept by
/// reference: their size, SHA-256 and first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub tenant: String,
    pub device: String,
    pub received_ms: i64,
    pub reason: String,
    /// The payload, or its first bytes when it was larger than the kept prefix.
    pub payload: Vec<u8>,
    /// The payload's full size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the whole payload.
    pub sha256: String,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub tenant: Option<String>,
    pub device: Option<String>,
    /// Only those whose reason contains this text.
    pub reason: Option<String>,
    /// Only those received at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// At most this many, newest first (0: no limit).
    pub limit: usize,
}

/// A node seen writing with a clock beyond the allowed drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkewedNode {
    pub node: NodeId,
    /// The largest timestamp it sent.
    pub max_hlc: Hlc,
    /// Writes of it bounded so far.
    pub bounded: u64,
    pub last_ms: i64,
}

/// Keeps watching for plain-SQL writes while it lives.
pub type Watch = Box<dyn std::any::Any + Send>;

/// Gateway storage. Every method is one transaction.
pub trait GatewayStore: Send {
    /// The tenant's current epoch (made when its first device shows up).
    fn epoch(&mut self, tenant: &str) -> Result<Epoch>;

    /// The tenant's current epoch as stored now: another gateway instance sharing the store
    /// may have renewed it since [`GatewayStore::epoch`] was last read.
    fn epoch_now(&mut self, tenant: &str) -> Result<Epoch>;

    /// Gives the tenant a new epoch in place of `replacing`: the store has lost changes it
    /// once acknowledged, and every device of the tenant must send again what it holds.
    /// `reason` is kept with it. If the tenant's epoch is no longer `replacing` (another
    /// device, or another gateway instance, noticed the same loss first), nothing new starts:
    /// one restore is one new epoch. Returns the current epoch either way.
    fn new_epoch(&mut self, tenant: &str, replacing: Epoch, reason: &str) -> Result<Epoch>;

    /// Whether this store ever issued `epoch` to `tenant` (current or earlier), or noted it
    /// as issued by a store it replaced.
    fn issued_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<bool>;

    /// Notes an epoch a store this one replaced issued to `tenant` (a device spoke for it).
    fn note_foreign_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<()>;

    /// Notes that `device` was heard from in the tenant's current epoch (its recovery window
    /// starts then, if the epoch replaced another), unless it was already.
    fn heard_in_epoch(&mut self, tenant: &str, device: &str) -> Result<()>;

    /// Notes that `device` of `tenant` says it writes as `node`, binding the node to it if the
    /// node is new, and returns what has been merged from both.
    fn hello(&mut self, tenant: &str, device: &str, node: NodeId) -> Result<DeviceView>;

    /// Merges a device's batch, logs what changed and records the device's high-water mark,
    /// all in one transaction. Merging the same batch again changes nothing. Timestamps
    /// later than `now_ms + max_drift_ms` are bounded to `now_ms`. A row no replica could
    /// accept (a NULL key part, a key of another arity than the table's, a state grown past
    /// the limits) is not merged and listed in [`MergeOutcome::refused`]; a batch that is
    /// wrong as a whole is refused ([`MergeError::Refused`]).
    fn merge(&mut self, from: &Incoming<'_>, batch: &Batch) -> Result<MergeOutcome, MergeError>;

    /// Logged changes after `cursor` not made by `device`, up to about `max_rows` rows.
    fn changes_after(&mut self, tenant: &str, device: &str, cursor: u64, max_rows: usize) -> Result<ChangesPage> {
        self.changes_in_scope(tenant, device, cursor, max_rows, &DeviceScope::default())
    }

    /// [`GatewayStore::changes_after`] for a device holding `scope`: rows of scoped tables
    /// only while they are in it, whole when they enter it, and evicted when they leave.
    fn changes_in_scope(
        &mut self,
        tenant: &str,
        device: &str,
        cursor: u64,
        max_rows: usize,
        scope: &DeviceScope,
    ) -> Result<ChangesPage> {
        scoped::changes_page(self, tenant, device, cursor, max_rows, scope)
    }

    /// Up to `limit` log entries after position `cursor`, oldest first, and whether more
    /// follow; only those of `chain` if given (see [`chains`]).
    fn log_after(
        &mut self,
        tenant: &str,
        cursor: u64,
        limit: usize,
        chain: Option<&chains::Chain>,
    ) -> Result<(Vec<Logged>, bool)>;

    /// How many rows the tenant holds, and their stored bytes: of `table` if given.
    fn rows_size(&mut self, tenant: &str, table: Option<&str>) -> Result<(u64, u64)>;

    /// How many rows of `table` scope key `skey` holds (filed under it, or held by
    /// reference), from the scope indexes alone, without reading a row.
    fn scope_count(&mut self, tenant: &str, table: &str, skey: &[u8]) -> Result<u64>;

    /// What the store keeps between messages (see [`kept`]; `None`: nothing, all is read
    /// again each time).
    fn kept(&mut self) -> Option<&mut kept::Kept> {
        None
    }

    /// The last entry of `chain` before position `before` (0/0: none).
    fn chain_before(&mut self, tenant: &str, chain: &chains::Chain, before: u64) -> Result<LogCursor>;

    /// A row's merged state as a one-row batch with its nodes' roles, if the row has one.
    fn row_state(&mut self, tenant: &str, table: &str, pk: &[Value]) -> Result<Option<Batch>>;

    /// Up to `limit` rows of `table` after the store's key `after` (empty: from the first),
    /// in the store's key order: each key with the row's state as a one-row batch.
    fn table_rows(&mut self, tenant: &str, table: &str, after: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Batch)>>;

    /// [`GatewayStore::table_rows`] of the rows of a scoped table whose scope key (encoded)
    /// is `skey`, found by the scope index, not by reading the others.
    fn scope_rows(
        &mut self,
        tenant: &str,
        table: &str,
        skey: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Batch)>>;

    /// The newest log position of a tenant and its tag (position 0 if nothing is logged).
    fn log_head(&mut self, tenant: &str) -> Result<LogCursor>;

    /// The tag of the tenant's log entry at `position`, if there is one.
    fn log_tag(&mut self, tenant: &str, position: u64) -> Result<Option<u64>>;

    /// A page of current row states after `resume` (empty to start); `None` if `resume` is
    /// not a token this store made.
    fn snapshot_page(&mut self, tenant: &str, resume: &[u8], max_rows: usize) -> Result<Option<SnapshotPage>>;

    /// Notes that `device` was heard from, and the cursor it pulled from if known.
    fn touch_device(&mut self, tenant: &str, device: &str, cursor: Option<u64>) -> Result<()>;

    fn devices(&mut self, tenant: &str) -> Result<Vec<DeviceInfo>>;

    /// Every tenant with a registered device or a dead letter.
    fn tenants(&mut self) -> Result<Vec<String>>;

    /// Keeps a refused message with its reason; returns its id.
    fn dead_letter(&mut self, tenant: &str, device: &str, reason: &str, payload: &[u8]) -> Result<i64>;

    fn dead_letters(&mut self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>>;

    /// Deletes dead letters received before `before_ms`; returns how many.
    fn purge_dead_letters(&mut self, before_ms: i64) -> Result<usize>;

    /// Counts one more attempt at handling the message with this content hash; returns the
    /// count so far (including this one). Survives restarts, so a message that makes the
    /// gateway fail every time is recognised however often it is delivered.
    fn note_attempt(&mut self, key: &[u8; 32]) -> Result<u32>;

    /// Attempts counted for a message so far, and when the last one began (ms since the
    /// Unix epoch); `None` if none were counted.
    fn attempts(&mut self, key: &[u8; 32]) -> Result<Option<(u32, i64)>>;

    /// Takes back one attempt counted before trying, when the try failed for a reason that is
    /// not the message's.
    fn unnote_attempt(&mut self, key: &[u8; 32]) -> Result<()>;

    /// Forgets the attempts at a message that was handled.
    fn clear_attempts(&mut self, key: &[u8; 32]) -> Result<()>;

    /// Nodes of a tenant seen writing with clocks beyond the allowed drift.
    fn clock_skew(&mut self, tenant: &str) -> Result<Vec<SkewedNode>>;

    /// The current declared sync schema (`None` if none was ever loaded), as stored now:
    /// another instance sharing the store may have loaded a newer version. Every merge
    /// enforces the version current when it runs.
    fn served_schema(&mut self) -> Result<Option<std::sync::Arc<ServedSchema>>>;

    /// Makes `text` the current sync schema, checked against the current one (see
    /// [`SyncSchema::check_replaces`]); returns its version. The same schema as the current
    /// one (comments and layout aside) keeps the current version.
    fn install_schema(&mut self, text: &str) -> Result<u64>;

    /// Makes the tenant's real tables for the current schema now, rather than at its first
    /// merge, so SQL clients can write a tenant no device has synced yet.
    fn prepare_tenant(&mut self, tenant: &str) -> Result<()>;

    /// Takes in writes made directly to the real tables (by any SQL client) as writes of
    /// each tenant's cloud node, logging them for every device; returns the tenants whose
    /// log grew.
    fn ingest_cloud_writes(&mut self, now_ms: u64) -> Result<Vec<(String, LogEntry)>>;

    /// Registers `device` in `tenant` with `role` (again, if it was removed: with the new
    /// role) and `secret`, a hash of its broker password (see `broker::credentials`), in
    /// place of any it had. The first registration closes the tenant to unregistered devices.
    fn register_device(
        &mut self,
        tenant: &str,
        device: &str,
        role: &str,
        secret: Option<&str>,
        now_ms: i64,
    ) -> Result<()>;

    /// Removes a registered device; whether it was registered.
    fn remove_device(&mut self, tenant: &str, device: &str, now_ms: i64) -> Result<bool>;

    /// Registered devices (removed ones too), of one tenant or all.
    fn registry(&mut self, tenant: Option<&str>) -> Result<Vec<Registered>>;

    /// Whether `device` is served, and whether its tenant recovers from lost changes.
    fn standing(&mut self, tenant: &str, device: &str) -> Result<Standing>;

    /// Sets a registered device's scope parameters; whether it is registered.
    fn set_params(&mut self, tenant: &str, device: &str, params: &Params) -> Result<bool>;

    /// Notes the scope version the gateway told a device, and the scope it follows.
    fn scope_told(&mut self, tenant: &str, device: &str, version: u64, feed: &str) -> Result<()>;

    /// Writes what this instance kept in memory (last-seen times noted since the last write),
    /// before it goes away. Called from a thread that may block.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }

    /// Starts a group (group commit): what this store does from now until
    /// [`GatewayStore::commit_group`] becomes durable together, at that commit, while each
    /// method's work still succeeds or fails alone. The service merges a group of uplinks
    /// and answers none before the group commits. A store without groups keeps every
    /// method's work durable on its own.
    fn begin_group(&mut self) -> Result<()> {
        Ok(())
    }

    /// Whether a method failed part-way in the open group in a way only undoing the whole
    /// group mends (a store may keep no savepoint per method, see `sqlite::group`): the
    /// caller must then [`GatewayStore::abandon_group`] and do it again.
    fn group_spoiled(&self) -> bool {
        false
    }

    /// Undoes everything since [`GatewayStore::begin_group`].
    fn abandon_group(&mut self) -> Result<()> {
        Ok(())
    }

    /// Makes everything since [`GatewayStore::begin_group`] durable; an error if it is
    /// not, or cannot be known to be (then none of it may be answered).
    fn commit_group(&mut self) -> Result<()> {
        Ok(())
    }

    /// Starts watching for writes other clients make to the real tables, calling `wake` when
    /// one commits, if this store can be told (a database that notifies); `None` otherwise.
    fn watch_cloud_writes(&mut self, _wake: Box<dyn Fn() + Send>) -> Result<Option<Watch>> {
        Ok(None)
    }
}
