//! The gateway's error type.

/// Everything that can go wrong in the gateway.
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
    #[error("the storage worker stopped unexpectedly")]
    WorkerGone,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
