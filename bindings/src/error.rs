//! The public error: a few clear kinds with a reason meant for people, mapped from the
//! internal errors in one place. Internal SQL and stored data never reach it.

use driftless_agent::Error as AgentError;
use driftless_core::Error as CoreError;

/// What went wrong, as the app sees it.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The app's SQL failed (syntax, constraint, missing table); `reason` is SQLite's message.
    #[error("SQL error: {reason}")]
    Sql { reason: String },
    /// A bad argument: table without a usable key, unknown policy, bad broker URL or id.
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// Sync could not start or stop.
    #[error("sync error: {reason}")]
    Sync { reason: String },
    /// The database file could not be used (permissions, disk full, corruption).
    #[error("storage error: {reason}")]
    Storage { reason: String },
    /// The database is encrypted with another key (or with one and none was given), or a key
    /// was given to a library built without encryption.
    #[error("encryption: {reason}")]
    Encryption { reason: String },
}

/// Errors from SQL the app itself wrote: SQLite's message describes the app's statement.
pub(crate) fn app_sql(e: rusqlite::Error) -> ApiError {
    ApiError::Sql { reason: e.to_string() }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        match e {
            CoreError::NoSuchTable(_)
            | CoreError::NotTracked(_)
            | CoreError::NoPrimaryKey(_)
            | CoreError::RowidPrimaryKey { .. }
            | CoreError::BadTableName(_)
            | CoreError::NoSuchColumn { .. }
            | CoreError::BadSpec { .. }
            | CoreError::NoSuchConflict { .. }
            | CoreError::SchemaChanged { .. }
            | CoreError::SchemaMismatch { .. }
            | CoreError::Schema(_) => ApiError::InvalidArgument { reason: e.to_string() },
            CoreError::WrongKey(_) | CoreError::EncryptionUnavailable => ApiError::Encryption { reason: e.to_string() },
            // Engine-internal statements: report the kind, not the statement.
            CoreError::Sqlite(inner) => ApiError::Storage { reason: sqlite_kind(&inner) },
            other => ApiError::Storage { reason: other.to_string() },
        }
    }
}

fn sqlite_kind(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(code) => format!("{code:?}"),
        None => "database error".into(),
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        match e {
            AgentError::Core(c) => c.into(),
            AgentError::BadBrokerUrl { .. } | AgentError::BadId(_) | AgentError::MissingDatabase(_) => {
                ApiError::InvalidArgument { reason: e.to_string() }
            }
            AgentError::Stopped => ApiError::Closed,
            other => ApiError::Sync { reason: other.to_string() },
        }
    }
}
