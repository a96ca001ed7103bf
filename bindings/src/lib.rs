//! driftless-ffi: driftless for iOS, Android and Python through uniffi.
//!
//! A thin layer: every exported method delegates to the core store or the agent in a line or
//! two. The library owns a small tokio runtime, since a mobile app cannot lend one.
//!
//! # Layout
//! - `store`: [`SyncStore`], the object apps hold.
//! - `types`: the records, enums and the [`ChangeListener`] foreign trait that cross the FFI.
//! - `error`: [`ApiError`] and the one place internal errors map to it.

mod error;
mod store;
mod types;

pub use error::ApiError;
pub use store::SyncStore;
pub use types::{
    ChangeListener, ConflictInfo, ConflictVersion, DeleteRule, QueryResult, SqlValue, SyncConfig, SyncDirection,
    SyncStatus, TrackOptions,
};

uniffi::setup_scaffolding!();
