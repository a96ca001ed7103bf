//! The stores a gateway-store test runs on: the SQLite store in a temporary directory, and
//! the PostgreSQL store in a database of its own on the server `DRIFTLESS_TEST_PG_URL` names
//! (made for the test, dropped after). Without that variable PostgreSQL tests are skipped,
//! unless `DRIFTLESS_REQUIRE_PG` is set (CI sets both), which makes them fail instead.

use driftless_core::Value;
use postgres::{Config, NoTls};

use super::{GatewayStore, PgStore, SqliteStore};

/// Where a test's stores live.
pub(crate) enum Backend {
    Sqlite(tempfile::TempDir),
    Pg(Box<TestDb>),
}

impl Backend {
    pub(crate) fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    /// `None` when no server is configured (the test is skipped).
    pub(crate) fn pg() -> Option<Backend> {
        TestDb::new().map(|db| Backend::Pg(Box::new(db)))
    }

    /// Opens a store instance on this backend (another one shares the same state).
    pub(crate) fn open(&self) -> Box<dyn GatewayStore> {
        match self {
            Backend::Sqlite(dir) => Box::new(SqliteStore::open(dir.path().join("gw.db")).expect("open sqlite store")),
            Backend::Pg(db) => Box::new(db.store()),
        }
    }

    /// Where device stores of the test may live.
    pub(crate) fn scratch(&self) -> &std::path::Path {
        match self {
            Backend::Sqlite(dir) => dir.path(),
            Backend::Pg(db) => db.scratch.path(),
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
            Backend::Pg(db) => {
                let mut c = db.client();
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
            Backend::Pg(db) => {
                let rows = db.client().query(sql, &[]).expect("query");
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| r.get::<_, super::postgres::ReadValue>(i).0).collect())
                    .collect()
            }
        }
    }
}

/// A database of its own for one test, dropped when the test ends.
pub(crate) struct TestDb {
    admin: String,
    name: String,
    config: Config,
    scratch: tempfile::TempDir,
}

impl TestDb {
    pub(crate) fn new() -> Option<TestDb> {
        let Ok(admin) = std::env::var("DRIFTLESS_TEST_PG_URL") else {
            assert!(
                std::env::var_os("DRIFTLESS_REQUIRE_PG").is_none(),
                "DRIFTLESS_REQUIRE_PG is set but DRIFTLESS_TEST_PG_URL is not"
            );
            eprintln!("skipped: DRIFTLESS_TEST_PG_URL is not set");
            return None;
        };
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("random");
        let name = format!("driftless_test_{:016x}", u64::from_le_bytes(seed));
        let mut c = postgres::Client::connect(&admin, NoTls).expect("connect to DRIFTLESS_TEST_PG_URL");
        c.batch_execute(&format!("CREATE DATABASE {name}")).expect("create test database");
        let mut config: Config = admin.parse().expect("DRIFTLESS_TEST_PG_URL");
        config.dbname(&name);
        Some(TestDb { admin, name, config, scratch: tempfile::tempdir().expect("tempdir") })
    }

    pub(crate) fn store(&self) -> PgStore {
        PgStore::open_config(self.config.clone()).expect("open PostgreSQL store")
    }

    pub(crate) fn client(&self) -> postgres::Client {
        self.config.connect(NoTls).expect("connect")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
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
