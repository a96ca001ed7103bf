//! The core's error type.

use crate::codec::DecodeError;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("could not decode: {0}")]
    Decode(#[from] DecodeError),
    #[error("table {0:?} does not exist")]
    NoSuchTable(String),
    #[error("table {0:?} is not tracked")]
    NotTracked(String),
    #[error("table {0:?} has no explicit PRIMARY KEY; driftless identifies rows across devices by their key")]
    NoPrimaryKey(String),
    #[error(
        "table {table:?} uses `{column} INTEGER PRIMARY KEY`, an alias of SQLite's rowid: every device \
         would hand out 1, 2, 3... and rows from different devices would collide. Use a TEXT or BLOB \
         key (UUID, ULID) or a composite key"
    )]
    RowidPrimaryKey { table: String, column: String },
    #[error("table {table:?} changed shape since it was tracked ({detail}); call track() again to capture new columns")]
    SchemaChanged { table: String, detail: String },
    #[error("table {table:?} does not match the sync schema: {detail}")]
    SchemaMismatch { table: String, detail: String },
    #[error("the sync schema could not be read: {0}")]
    Schema(#[from] crate::schema::SchemaError),
    #[error("table name {0:?} is not supported (names starting with _driftless_ are reserved)")]
    BadTableName(String),
    #[error("column {column:?} is not a column of {table:?}")]
    NoSuchColumn { table: String, column: String },
    #[error("invalid table spec for {table:?}: {detail}")]
    BadSpec { table: String, detail: String },
    #[error("no conflict on {table:?} column {column:?} for that key")]
    NoSuchConflict { table: String, column: String },
    #[error("the system random generator failed: {0}")]
    Random(String),
    /// The database is encrypted with another key, or is encrypted and no key was given (or
    /// is not a database at all).
    #[error("{0} cannot be read: wrong or missing encryption key, or not a database")]
    WrongKey(String),
    /// A key was given to a build without encryption (build with the `sqlcipher` feature).
    #[error("an encryption key was given, but this build has no encryption (the sqlcipher feature)")]
    EncryptionUnavailable,
    #[error("stored metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error(
        "local changes are held until the sync layer confirms this store's node id with the gateway; \
         nothing was applied"
    )]
    SealHeld,
    #[error(
        "the app's own constraint on {table:?} rolled back the whole transaction while a remote change was applied"
    )]
    AppRolledBack { table: String, key: Vec<u8> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
