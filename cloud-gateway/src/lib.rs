//! driftless-gateway: the cloud side of driftless sync.
//!
//! Devices publish batches of local changes on their uplink topic; the gateway merges each
//! one into its store with the core merge, logs what changed and records the device's
//! high-water mark in one transaction, and only then acknowledges. Devices pull what they
//! missed from a cursor they keep; a new device starts from a snapshot.
//!
//! # Layout
//! - [`storage`]: the [`GatewayStore`] trait and its SQLite implementation.
//! - [`handler`]: one uplink message in, messages to publish out (no sockets).
//! - [`service`]: the MQTT loop around the handler; attempts, retries and set-aside messages.
//! - [`report`]: the operator's report.
//! - [`broker`]: the embedded broker for demos and single-machine setups.

mod acks;
pub mod broker;
pub mod dynsec;
mod error;
mod fair;
pub mod handler;
pub mod quota;
pub mod report;
pub mod service;
pub mod storage;

pub use error::{Error, MergeError, Result};
pub use handler::HandlerConfig;
pub use service::{GatewayConfig, run};
pub use storage::{GatewayStore, PgStore, ServedSchema, SqliteStore};
