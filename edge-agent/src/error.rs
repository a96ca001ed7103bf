//! The agent's error type.

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Core(#[from] driftless_core::Error),
    #[error("database {0} does not exist (run `driftless-agent init` first)")]
    MissingDatabase(String),
    #[error("bad broker URL {url:?}: {reason}")]
    BadBrokerUrl { url: String, reason: String },
    #[error("bad device or tenant id {0:?}: use 1-128 characters without / + # or a leading $")]
    BadId(String),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    /// The broker connection cannot be set up as configured (a certificate file, a CA).
    #[error("{0}")]
    Transport(String),
    #[error("watching the database for changes: {0}")]
    Watch(#[from] notify::Error),
    #[error("the agent has stopped")]
    Stopped,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
