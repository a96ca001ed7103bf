//! How an agent runs.

use std::path::PathBuf;
use std::time::Duration;

use driftless_core::protocol::{BrokerAddr, valid_id};

use crate::error::{Error, Result};

/// When local changes ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// As soon as they are written (the database file is watched).
    RealTime,
    /// As soon as the app says it wrote ([`crate::Agent::local_change`]), without watching
    /// the file: for an app that writes through the agent's store handle, and for many
    /// agents in one process (each file watcher takes one of the system's inotify instances).
    Notified,
    /// Every interval (fewer, larger batches: metered links).
    Interval(Duration),
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub db: PathBuf,
    pub broker: BrokerAddr,
    pub tenant: String,
    pub device_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub mode: SyncMode,
    /// Batches sent and not yet acknowledged, at most.
    pub max_inflight: usize,
    /// Rows per uplink batch, at most.
    pub batch_rows: usize,
    /// Bytes per uplink message, at most (batches are split to fit; a single larger row is
    /// sent alone). Keep it under the broker's and the gateway's limits.
    pub max_message_bytes: usize,
    /// Rows asked for per pull.
    pub pull_rows: u32,
    /// After this long without an ack, unacknowledged batches are sent again.
    pub ack_timeout: Duration,
    /// Print a progress bar on stderr while draining a backlog or bootstrapping.
    pub progress: bool,
}

impl AgentConfig {
    /// A configuration with defaults, validating the URL and ids.
    pub fn new(db: impl Into<PathBuf>, broker_url: &str, tenant: &str, device_id: &str) -> Result<AgentConfig> {
        let broker = broker_url.parse().map_err(|reason| Error::BadBrokerUrl { url: broker_url.to_owned(), reason })?;
        for id in [tenant, device_id] {
            if !valid_id(id) {
                return Err(Error::BadId(id.to_owned()));
            }
        }
        Ok(AgentConfig {
            db: db.into(),
            broker,
            tenant: tenant.to_owned(),
            device_id: device_id.to_owned(),
            username: None,
            password: None,
            mode: SyncMode::RealTime,
            max_inflight: 4,
            batch_rows: 500,
            max_message_bytes: 4 << 20,
            pull_rows: 1_000,
            ack_timeout: Duration::from_secs(10),
            progress: false,
        })
    }
}
