//! The types that cross the FFI. A change here is a breaking change for every app: they
//! convert to and from the core's types with `From` and carry no internal detail.

use driftless_core::{DeletePolicy, Direction, Value};

/// A SQLite value.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum SqlValue {
    Null,
    Integer { value: i64 },
    Real { value: f64 },
    Text { value: String },
    Blob { value: Vec<u8> },
}

impl From<SqlValue> for Value {
    fn from(v: SqlValue) -> Value {
        match v {
            SqlValue::Null => Value::Null,
            SqlValue::Integer { value } => Value::Integer(value),
            SqlValue::Real { value } => Value::Real(value),
            SqlValue::Text { value } => Value::Text(value),
            SqlValue::Blob { value } => Value::Blob(value),
        }
    }
}

impl From<Value> for SqlValue {
    fn from(v: Value) -> SqlValue {
        match v {
            Value::Null => SqlValue::Null,
            Value::Integer(value) => SqlValue::Integer { value },
            Value::Real(value) => SqlValue::Real { value },
            Value::Text(value) => SqlValue::Text { value },
            Value::Blob(value) => SqlValue::Blob { value },
            // Foreign strings cannot hold invalid UTF-8; the stored bytes stay as they are.
            Value::RawText(bytes) => SqlValue::Text { value: String::from_utf8_lossy(&bytes).into_owned() },
            // A kind of value this version does not know: shown as NULL rather than failing.
            _ => SqlValue::Null,
        }
    }
}

/// Rows returned by a query.
#[derive(Debug, Clone, uniffi::Record)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

/// Which way a table's changes flow.
#[derive(Debug, Clone, Copy, uniffi::Enum)]
pub enum SyncDirection {
    Both,
    UpOnly,
    DownOnly,
}

impl From<SyncDirection> for Direction {
    fn from(d: SyncDirection) -> Direction {
        match d {
            SyncDirection::Both => Direction::Both,
            SyncDirection::UpOnly => Direction::UpOnly,
            SyncDirection::DownOnly => Direction::DownOnly,
        }
    }
}

/// What wins when a delete races an update.
#[derive(Debug, Clone, Copy, uniffi::Enum)]
pub enum DeleteRule {
    DeleteWins,
    UpdateWins,
}

impl From<DeleteRule> for DeletePolicy {
    fn from(d: DeleteRule) -> DeletePolicy {
        match d {
            DeleteRule::DeleteWins => DeletePolicy::DeleteWins,
            DeleteRule::UpdateWins => DeletePolicy::UpdateWins,
        }
    }
}

/// How to track a table.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TrackOptions {
    pub direction: SyncDirection,
    pub delete_rule: DeleteRule,
    /// Column name to policy: `lww`, `manual`, `counter` or `authority:ROLE>ROLE...`.
    pub policies: std::collections::HashMap<String, String>,
}

/// Where and as whom to sync.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SyncConfig {
    /// `mqtt://HOST:PORT`
    pub broker_url: String,
    pub tenant: String,
    pub device_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// How syncing is going.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SyncStatus {
    pub syncing: bool,
    pub connected: bool,
    pub pending_changes: u64,
    /// Milliseconds since the Unix epoch.
    pub last_synced_at_ms: Option<u64>,
    pub last_error: Option<String>,
    pub conflicts: u32,
    /// The version of the gateway's sync schema this store follows (0: none).
    pub schema_version: u64,
    /// The snapshot under way (a new device, or one whose scope changed), if one is.
    pub snapshot: Option<SnapshotProgress>,
}

/// How far a snapshot got: rows and bytes (as the gateway stores them, before compression)
/// taken in so far, and in all as the gateway counted them when it started (0: not known).
/// The app can read what has arrived already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct SnapshotProgress {
    pub rows_done: u64,
    pub rows_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl From<driftless_core::SnapshotProgress> for SnapshotProgress {
    fn from(p: driftless_core::SnapshotProgress) -> SnapshotProgress {
        SnapshotProgress {
            rows_done: p.rows_done,
            rows_total: p.rows_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
        }
    }
}

/// One version in a conflict: `value` is absent for a delete.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConflictVersion {
    pub column: Option<String>,
    pub value: Option<SqlValue>,
    /// The writing node, as hex.
    pub node: String,
    /// When it was written (hybrid clock, milliseconds since the Unix epoch).
    pub written_at_ms: u64,
}

impl From<driftless_core::Version> for ConflictVersion {
    fn from(v: driftless_core::Version) -> ConflictVersion {
        ConflictVersion {
            column: v.column,
            value: v.value.map(SqlValue::from),
            node: v.dot.node.to_string(),
            written_at_ms: v.hlc.millis(),
        }
    }
}

/// A conflict held by one row.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConflictInfo {
    pub table: String,
    pub key: Vec<SqlValue>,
    /// The column, or absent for a delete racing an update.
    pub column: Option<String>,
    /// Whether someone must pick a value (manual policy); others were resolved by policy.
    pub needs_resolution: bool,
    pub shown: ConflictVersion,
    pub others: Vec<ConflictVersion>,
}

impl From<driftless_core::Conflict> for ConflictInfo {
    fn from(c: driftless_core::Conflict) -> ConflictInfo {
        ConflictInfo {
            table: c.table,
            key: c.pk.into_iter().map(SqlValue::from).collect(),
            column: c.record.column().map(str::to_owned),
            needs_resolution: c.record.needs_resolution(),
            shown: c.record.winner.into(),
            others: c.record.losers.into_iter().map(ConflictVersion::from).collect(),
        }
    }
}

/// Implemented by the app to hear about rows changed by other devices. Called on a thread of
/// the library's own, never while the library holds a lock, so it may call back into the store.
#[uniffi::export(with_foreign)]
pub trait ChangeListener: Send + Sync {
    /// `keys` holds the primary key of each changed row of `table`.
    fn on_remote_change(&self, table: String, keys: Vec<Vec<SqlValue>>);
}
