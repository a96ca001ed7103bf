//! What the gateway keeps: the merged state of every row, the log of merged changes that
//! devices catch up from, the device registry, and dead letters.
//!
//! [`GatewayStore`] is the seam a PostgreSQL backend implements next to [`SqliteStore`].

mod sqlite;

pub use self::sqlite::SqliteStore;

use driftless_core::Batch;

use crate::error::Result;

/// What merging one device batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Rows whose merged state changed.
    pub applied: usize,
    /// Rows whose changes were all merged before (a redelivery or a retry).
    pub duplicates: usize,
    /// The log position of the new changes, if any were logged.
    pub logged_at: Option<u64>,
}

/// Changes for one device, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ChangesPage {
    pub batch: Batch,
    /// The log position this page reaches; the device pulls after it next.
    pub cursor: u64,
    /// Whether the log holds more after `cursor`.
    pub more: bool,
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

/// A batch the gateway refused, kept with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub tenant: String,
    pub device: String,
    pub received_ms: i64,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// Gateway storage. Every method is one transaction.
pub trait GatewayStore: Send {
    /// Merges a device's batch, logs what changed and records the device's high-water mark,
    /// all in one transaction. Merging the same batch again changes nothing.
    fn merge(
        &mut self,
        tenant: &str,
        device: &str,
        first_seq: i64,
        last_seq: i64,
        batch: &Batch,
    ) -> Result<MergeOutcome>;

    /// Logged changes after `cursor` not made by `device`, up to about `max_rows` rows.
    fn changes_after(&mut self, tenant: &str, device: &str, cursor: u64, max_rows: usize) -> Result<ChangesPage>;

    /// The newest log position of a tenant (0 if nothing is logged).
    fn log_head(&mut self, tenant: &str) -> Result<u64>;

    /// A page of current row states after `resume` (empty to start).
    fn snapshot_page(&mut self, tenant: &str, resume: &[u8], max_rows: usize) -> Result<SnapshotPage>;

    /// Notes that `device` was heard from, and the cursor it pulled from if known.
    fn touch_device(&mut self, tenant: &str, device: &str, cursor: Option<u64>) -> Result<()>;

    fn devices(&mut self, tenant: &str) -> Result<Vec<DeviceInfo>>;

    /// Every tenant with a registered device.
    fn tenants(&mut self) -> Result<Vec<String>>;

    /// Keeps a refused message with its reason; returns its id.
    fn dead_letter(&mut self, tenant: &str, device: &str, reason: &str, payload: &[u8]) -> Result<i64>;

    fn dead_letters(&mut self, tenant: &str) -> Result<Vec<DeadLetter>>;
}
