//! driftless-agent: the device side of driftless sync, as a library for apps and as the
//! `driftless-agent` daemon for edge boxes.
//!
//! The agent ships the store's outbox to the gateway over MQTT as soon as local changes are
//! written (by any process: the database file is watched), removes entries only when the
//! gateway acknowledges them, and applies what the device missed, pulled from a cursor it
//! keeps in the same database. The SQLite outbox is the source of truth, never the MQTT
//! client's memory, so the agent survives `kill -9` at any point.
//!
//! # Layout
//! - `config`: [`AgentConfig`], [`SyncMode`].
//! - `agent`: [`Agent`] start/stop/status, the MQTT poller.
//! - [`machine`]: the sync protocol as a sans-IO state machine (handshake, in-flight window,
//!   acks and refusals, resends, pulls, snapshots, epoch changes).
//! - `execute`: the machine's store work carried out on a [`driftless_core::Store`].
//! - `sync`: the async shell that drives the machine.
//! - `worker`: [`StoreHandle`], the thread that owns the store.
//! - `watch`: change notification by watching the database file.
//! - `progress`: the terminal progress bar.

mod agent;
mod config;
mod error;
mod execute;
pub mod machine;
mod progress;
mod sync;
mod watch;
mod worker;

pub use agent::{Agent, Status, run};
pub use config::{AgentConfig, SyncMode};
pub use error::{Error, Result};
pub use execute::execute;
pub use machine::{LiveStatus, Machine, MachineConfig};
pub use worker::StoreHandle;
