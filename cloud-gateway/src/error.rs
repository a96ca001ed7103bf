//! The gateway's error types, split by whose fault an error is.
//!
//! [`Error`] is always the gateway's own (storage, corrupt stored data, a bug, the broker
//! connection): the message that met it is neither acknowledged nor refused, and the device
//! keeps it and sends it again. [`MergeError::Refused`] is the message's fault: it is kept as
//! a dead letter and the device is told to move those changes aside.

/// A failure of the gateway itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] postgres::Error),
    /// A setting the operator gave cannot work (a store URL, a tenant name the store cannot hold).
    #[error("configuration: {0}")]
    Config(String),
    /// Something another instance changed at the same moment; trying again sees it.
    #[error("{0}")]
    Retry(String),
    #[error("core: {0}")]
    Core(#[from] driftless_core::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    #[error("embedded broker: {0}")]
    Broker(String),
    /// Setting credentials or access in the broker (its dynamic-security plugin) failed.
    #[error("broker admin: {0}")]
    BrokerAdmin(String),
    #[error("the storage worker stopped unexpectedly: {0}")]
    WorkerGone(String),
    #[error("the system random generator failed: {0}")]
    Random(String),
    #[error("database {0} does not exist")]
    MissingDatabase(String),
    #[error("watching the database for writes: {0}")]
    Watch(String),
    /// Commits could not be made durable, or it cannot be known that they were.
    #[error("making commits durable: {0}")]
    Durability(String),
    /// The schema file an operator loads is invalid, or cannot replace the current one.
    #[error(transparent)]
    Schema(#[from] driftless_core::SchemaError),
}

impl Error {
    /// Whether the store failed for a reason of its own that may pass (busy, locked, full,
    /// the connection lost), so the message is tried again rather than counted against it.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Sqlite(e) => {
                use rusqlite::ErrorCode::*;
                matches!(
                    e.sqlite_error_code(),
                    Some(
                        DatabaseBusy
                            | DatabaseLocked
                            | SystemIoFailure
                            | DiskFull
                            | CannotOpen
                            | OutOfMemory
                            | ReadOnly
                    )
                )
            }
            Error::Postgres(e) => {
                // Connection lost (08), serialization or deadlock (40), lock wait timeout
                // (55P03), out of resources (53), shut down (57P0x).
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08")
                            || c.starts_with("40")
                            || c.starts_with("53")
                            || c == "55P03"
                            || c.starts_with("57P0")
                    })
            }
            _ => false,
        }
    }
}

/// Why a batch was not merged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The batch writes something no replica could accept; nothing of it was merged.
    #[error("{0}")]
    Refused(String),
    /// The gateway failed; nothing was merged and the batch should be sent again later.
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<rusqlite::Error> for MergeError {
    fn from(e: rusqlite::Error) -> Self {
        MergeError::Store(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<postgres::Error> for MergeError {
    fn from(e: postgres::Error) -> Self {
        MergeError::Store(e.into())
    }
}
