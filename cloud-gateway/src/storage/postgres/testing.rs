//! A PostgreSQL database of its own for one test, on the server `DRIFTLESS_TEST_PG_URL` names:
//! made for the test, dropped after. Without that variable PostgreSQL tests are skipped,
//! unless `DRIFTLESS_REQUIRE_PG` is set (`.ci/run` sets both), which makes them fail instead.
//! For tests and benchmarks only.

use postgres::{Config, NoTls};

use super::PgStore;

#[derive(Debug)]
pub struct TestDb {
    admin: String,
    name: String,
    config: Config,
}

impl TestDb {
    /// A new empty database, or `None` (with a notice) when no server is configured.
    pub fn new() -> Option<TestDb> {
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
        Some(TestDb { admin, name, config })
    }

    /// A store instance on it (each call is another instance sharing it).
    pub fn store(&self) -> PgStore {
        PgStore::open_config(self.config.clone()).expect("open PostgreSQL store")
    }

    /// A plain SQL client of it.
    pub fn client(&self) -> postgres::Client {
        self.config.connect(NoTls).expect("connect")
    }

    /// Its URL, for `driftless-gateway --store`.
    pub fn url(&self) -> String {
        let (scheme_user, rest) = self.admin.rsplit_once('/').unwrap_or((&self.admin, ""));
        let query = rest.split_once('?').map_or(String::new(), |(_, q)| format!("?{q}"));
        format!("{scheme_user}/{}{query}", self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}
