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
    #[error("core: {0}")]
    Core(#[from] driftless_core::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    #[error("embedded broker: {0}")]
    Broker(String),
    #[error("the storage worker stopped unexpectedly: {0}")]
    WorkerGone(String),
    #[error("the system random generator failed: {0}")]
    Random(String),
    #[error("database {0} does not exist")]
    MissingDatabase(String),
    #[error("watching the database for writes: {0}")]
    Watch(String),
    /// The schema file an operator loads is invalid, or cannot replace the current one.
    #[error(transparent)]
    Schema(#[from] driftless_core::SchemaError),
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
