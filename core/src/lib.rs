//! driftless-core: the device store, change capture, causal metadata, conflict policies and
//! the binary delta codec of the driftless sync engine.
//!
//! The crate is sans-IO: it reads and writes SQLite but opens no sockets and needs no async
//! runtime. The edge agent and the cloud gateway move the bytes it produces.
//!
//! # Layout
//! - [`store`]: the SQLite store: tracking tables with capture triggers, sealing the change
//!   journal into the outbox, applying remote batches, conflicts.
//! - `state`: the causal state of a row (multi-value registers, life, counters).
//! - `merge`: the join of row states and local writes as changes: pure functions.
//! - `view`: what a row shows under its policies, and the conflicts it holds.
//! - `policy`: per-table direction, per-column conflict policy, delete policy.
//! - `clock`: node ids, dots, version vectors, the hybrid logical clock.
//! - [`codec`]: the versioned, zstd-compressed batch format; bounded decoding.
//! - `value`: bit-exact SQLite values.
//! - [`protocol`]: device/gateway sync messages and MQTT topics.
//! - [`intake`]: validating and merging a batch into a row store, shared by the device's
//!   store and every gateway store.
//! - [`schema`]: the declared sync schema the gateway serves and enforces and devices follow.
//!
//! # Example: two replicas converge
//! ```
//! use driftless_core::{Store, StoreOptions, TableSpec, ColumnPolicy, codec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let open = |name: &str| -> Result<Store, driftless_core::Error> {
//!     let mut s = Store::open(dir.path().join(name), StoreOptions::default())?;
//!     s.write(|tx| Ok(tx.execute_batch(
//!         "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, name TEXT, stock INTEGER NOT NULL DEFAULT 0)")?))?;
//!     s.track("items", TableSpec::new().column("stock", ColumnPolicy::Counter))?;
//!     Ok(s)
//! };
//! let (mut a, mut b) = (open("a.db")?, open("b.db")?);
//! a.write(|tx| Ok(tx.execute("INSERT INTO items VALUES ('p1', 'pump', 10)", [])?))?;
//!
//! // Ship a's outbox to b through the wire format.
//! let out = a.outbox_batch(500)?.expect("one change");
//! let bytes = codec::encode_batch(&out.batch, Default::default());
//! let batch = codec::decode_batch(&bytes, &Default::default(), &Default::default())?;
//! b.apply(&batch)?;
//! a.ack(out.first_seq, out.last_seq)?;
//!
//! let stock: i64 = b.read(|c| Ok(c.query_row("SELECT stock FROM items WHERE id = 'p1'", [], |r| r.get(0))?))?;
//! assert_eq!(stock, 10);
//! # Ok(()) }
//! ```

mod batch;
mod clock;
pub mod codec;
pub mod erase;
mod error;
pub mod intake;
mod merge;
mod policy;
pub mod protocol;
pub mod schema;
pub mod scope;
mod state;
pub mod store;
#[cfg(feature = "mqtt")]
pub mod transport;
mod value;
mod view;

pub use batch::{Batch, RowChange};
pub use clock::{Dot, Hlc, HlcClock, NodeId, Observed, VersionVector};
pub use error::{Error, Result};
pub use merge::{
    FieldWrite, LocalWrite, bound_future_timestamps, holds_earlier_times, join_counter, join_register, join_row,
    write_local_delete, write_local_upsert,
};
pub use policy::{ColumnPolicy, DeletePolicy, Direction, ParsePolicyError, TableSpec};
pub use protocol::{Epoch, LogCursor};
pub use schema::{ColumnType, SchemaColumn, SchemaError, SchemaTable, SyncSchema};
pub use state::{Counter, CounterPart, Entry, Life, Register, RowState};
pub use store::{
    ApplyReport, ChangedRow, Confirmed, Conflict, GatewayView, Identity, OutboxBatch, Refused, SchemaApplied,
    SealReport, SnapshotAt, SnapshotCursor, SnapshotProgress, Store, StoreOptions,
};
pub use value::Value;
pub use view::{ConflictKind, ConflictRecord, Roles, Version, conflicts, is_visible, resolve, row_values};
