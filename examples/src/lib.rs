//! Shared plumbing for the runnable scenarios: an embedded broker, a gateway and devices in
//! one process, so each scenario is one command on a fresh machine.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use driftless_agent::{Agent, AgentConfig};
use driftless_core::protocol::BrokerAddr;
use driftless_core::{Store, StoreOptions};
use driftless_gateway::{GatewayConfig, GatewayStore as _, PgStore, SqliteStore};
use tokio::sync::oneshot;

/// Starts an embedded MQTT broker on a free loopback port and a gateway on it, serving the
/// sync schema `schema` (TOML, as `driftless-gateway --schema` loads it), its store in
/// `dir/gateway.db`.
pub async fn start_cloud(dir: &Path, schema: &str) -> anyhow::Result<(BrokerAddr, oneshot::Sender<()>)> {
    let mut store = SqliteStore::open(dir.join("gateway.db"))?;
    store.install_schema(schema)?;
    serve(store, Some(dir.join("gateway.db"))).await
}

/// [`start_cloud`] with the gateway's store in the PostgreSQL database at `url`.
pub async fn start_cloud_on_postgres(url: &str, schema: &str) -> anyhow::Result<(BrokerAddr, oneshot::Sender<()>)> {
    let (url, schema) = (url.to_owned(), schema.to_owned());
    // The PostgreSQL client blocks: opened off the async threads.
    let store = tokio::task::spawn_blocking(move || -> anyhow::Result<PgStore> {
        let mut store = PgStore::open(&url)?;
        store.install_schema(&schema)?;
        Ok(store)
    })
    .await??;
    serve(store, None).await
}

async fn serve<S: driftless_gateway::GatewayStore + 'static>(
    store: S,
    watch: Option<PathBuf>,
) -> anyhow::Result<(BrokerAddr, oneshot::Sender<()>)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    driftless_gateway::broker::start_embedded_broker(format!("127.0.0.1:{port}").parse()?)?;
    let broker = BrokerAddr::plain("127.0.0.1", port);
    let mut config = GatewayConfig::new(broker.clone());
    config.watch = watch;
    let ready = config.ready.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = driftless_gateway::run(config, store, shutdown).await {
            eprintln!("gateway stopped: {e}");
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready.notified()).await.context("gateway did not come up")?;
    Ok((broker, stop))
}

/// A device: its database file and, while online, its running agent.
#[derive(Debug)]
pub struct Device {
    pub name: String,
    pub db: PathBuf,
    pub role: String,
    agent: Option<Agent>,
}

impl Device {
    /// Creates an empty device database writing as `role`: its tables come from the
    /// gateway's sync schema when it first goes online.
    pub fn create(dir: &Path, name: &str, role: &str) -> anyhow::Result<Device> {
        let db = dir.join(format!("{name}.db"));
        drop(Store::open(&db, StoreOptions { role: role.into(), ..StoreOptions::default() })?);
        Ok(Device { name: name.into(), db, role: role.into(), agent: None })
    }

    /// Starts syncing; returns once the device follows the gateway's sync schema (its tables
    /// exist and are tracked).
    pub async fn go_online(&mut self, broker: &BrokerAddr) -> anyhow::Result<()> {
        let url = format!("mqtt://{}:{}", broker.host, broker.port);
        let config = AgentConfig::new(&self.db, &url, "demo", &self.name)?;
        let agent = Agent::start(config, StoreOptions { role: self.role.clone(), ..StoreOptions::default() }).await?;
        let start = Instant::now();
        while agent.store().call(|s| s.schema()).await??.is_none() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "{} got no sync schema", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.agent = Some(agent);
        Ok(())
    }

    pub async fn go_offline(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
    }

    /// Writes through a plain SQLite connection, as the field app would.
    pub fn sql(&self, sql: &str) -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(&self.db)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(sql).with_context(|| format!("{}: {sql}", self.name))
    }

    /// Rows of a query, each formatted as one line.
    pub fn lines(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        lines(&self.db, sql)
    }

    /// Runs `f` on the device's store: through the running agent (the one writer) when
    /// online, else on a store opened for the purpose.
    pub async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> driftless_core::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        match &self.agent {
            Some(agent) => Ok(agent.store().call(f).await??),
            None => {
                let mut store =
                    Store::open(&self.db, StoreOptions { role: self.role.clone(), ..StoreOptions::default() })?;
                Ok(f(&mut store)?)
            }
        }
    }
}

/// A value as a person would write it.
pub fn show_value(v: &driftless_core::Value) -> String {
    match v {
        driftless_core::Value::Null => "NULL".into(),
        driftless_core::Value::Integer(i) => i.to_string(),
        driftless_core::Value::Real(f) => f.to_string(),
        driftless_core::Value::Text(t) => format!("{t:?}"),
        driftless_core::Value::Blob(b) => format!("<{} bytes>", b.len()),
        driftless_core::Value::RawText(t) => format!("{:?}", String::from_utf8_lossy(t)),
        other => format!("{other:?}"),
    }
}

/// Prints a store's conflict log, one line per conflict.
pub fn print_conflicts(conflicts: &[driftless_core::Conflict]) {
    let show = |v: &driftless_core::Version| match (&v.column, &v.value) {
        (_, None) => "DELETE".to_owned(),
        (Some(col), Some(val)) => format!("{col}={}", show_value(val)),
        (None, Some(_)) => "INSERT".to_owned(),
    };
    for c in conflicts {
        let r = &c.record;
        let key: Vec<String> = c.pk.iter().map(show_value).collect();
        let what = r.column().map_or("row (delete vs update)".to_owned(), |col| format!("column {col}"));
        let losers: Vec<String> = r.losers.iter().map(show).collect();
        let verdict = if r.needs_resolution() { "NEEDS REVIEW" } else { "resolved by policy" };
        println!(
            "  {} {} {what}: shown {}; also written: {} [{verdict}]",
            c.table,
            key.join(","),
            show(&r.winner),
            losers.join(", ")
        );
    }
}

/// Waits until every device shows the same result for `sql` and `done` holds for it.
pub async fn wait_converged(devices: &[Device], sql: &str, done: impl Fn(&[String]) -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let first = devices[0].lines(sql)?;
        let mut same = done(&first);
        for d in &devices[1..] {
            same &= d.lines(sql)? == first;
        }
        if same {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "devices did not converge within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows of a query on the database at `db` (a device's, or the gateway's), each formatted as
/// one line.
pub fn lines(db: &Path, sql: &str) -> anyhow::Result<Vec<String>> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mut stmt = conn.prepare(sql)?;
    let n = stmt.column_count();
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let rows = stmt.query_map([], |r| {
        let mut parts = Vec::new();
        for (i, name) in names.iter().enumerate().take(n) {
            let v: rusqlite::types::Value = r.get(i)?;
            let shown = match v {
                rusqlite::types::Value::Null => "NULL".to_owned(),
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Real(f) => f.to_string(),
                rusqlite::types::Value::Text(t) => format!("{t:?}"),
                rusqlite::types::Value::Blob(b) => format!("<{} bytes>", b.len()),
            };
            parts.push(format!("{name}={shown}"));
        }
        Ok(parts.join("  "))
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}
