//! The stores a gateway-store test runs on: the SQLite store in a temporary directory, and
//! the PostgreSQL store in a database of its own ([`TestDb`]).

use driftless_core::Value;

pub(crate) use super::testing::TestDb;
use super::{GatewayStore, SqliteStore};

/// Where a test's stores live.
pub(crate) enum Backend {
    Sqlite(tempfile::TempDir),
    /// The database, and a directory for the test's device stores.
    Pg(Box<(TestDb, tempfile::TempDir)>),
}

impl Backend {
    pub(crate) fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    /// `None` when no server is configured (the test is skipped).
    pub(crate) fn pg() -> Option<Backend> {
        TestDb::new().map(|db| Backend::Pg(Box::new((db, tempfile::tempdir().expect("tempdir")))))
    }

    /// Opens a store instance on this backend (another one shares the same state).
    pub(crate) fn open(&self) -> Box<dyn GatewayStore> {
        match self {
            Backend::Sqlite(dir) => Box::new(SqliteStore::open(dir.path().join("gw.db")).expect("open sqlite store")),
            Backend::Pg(pg) => Box::new(pg.0.store()),
        }
    }

    /// Where device stores of the test may live.
    pub(crate) fn scratch(&self) -> &std::path::Path {
        match self {
            Backend::Sqlite(dir) => dir.path(),
            Backend::Pg(pg) => pg.1.path(),
        }
    }

    /// The real table of `table` for `tenant`, as SQL names it.
    pub(crate) fn table(&self, tenant: &str, table: &str) -> String {
        match self {
            Backend::Sqlite(_) => format!("\"{tenant}.{table}\""),
            Backend::Pg(_) => format!("\"{tenant}\".\"{table}\""),
        }
    }

    /// Runs statements as a plain SQL client would, in one transaction; with `role`, as that
    /// role (PostgreSQL: `SET LOCAL driftless.role`; SQLite: through the role's view, which
    /// the caller names in the SQL).
    pub(crate) fn exec(&self, sql: &str, role: Option<&str>) {
        match self {
            Backend::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
                conn.busy_timeout(std::time::Duration::from_secs(10)).expect("busy timeout");
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql}; COMMIT;")).expect("sql");
            }
            Backend::Pg(pg) => {
                let mut c = pg.0.client();
                let set = role.map_or(String::new(), |r| format!("SET LOCAL driftless.role = '{r}';"));
                c.batch_execute(&format!("BEGIN; {set} {sql}; COMMIT;")).expect("sql");
            }
        }
    }

    /// The rows a query returns, as values.
    pub(crate) fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        match self {
            Backend::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
                let mut stmt = conn.prepare(sql).expect("prepare");
                let n = stmt.column_count();
                stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>())
                    .expect("query")
                    .collect::<rusqlite::Result<_>>()
                    .expect("rows")
            }
            Backend::Pg(pg) => {
                let rows = pg.0.client().query(sql, &[]).expect("query");
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| r.get::<_, super::postgres::ReadValue>(i).0).collect())
                    .collect()
            }
        }
    }
}

/// `n` characters of text that does not compress (an index entry holds a value compressed,
/// so only such text shows an index's size limit).
pub(crate) fn incompressible(n: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// Declares each listed test (a `fn(&Backend)` in scope) once per backend.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $( #[test] fn $name() { super::$name(&crate::storage::test_backends::Backend::sqlite()) } )*
        }
        mod postgres_store {
            $( #[test] fn $name() {
                if let Some(b) = crate::storage::test_backends::Backend::pg() { super::$name(&b) }
            } )*
        }
    };
}
pub(crate) use on_every_store;
