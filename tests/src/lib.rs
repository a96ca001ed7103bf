//! Fixtures for the end-to-end tests and benchmarks: brokers, a gateway, devices.

pub mod bench;
pub mod pki;
pub mod procs;
pub mod slow_link;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driftless_agent::{Agent, AgentConfig};
use driftless_core::protocol::BrokerAddr;
use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec, Value};
use driftless_gateway::{GatewayConfig, GatewayStore as _, SqliteStore};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY, site TEXT, status TEXT, notes TEXT, stock INTEGER NOT NULL DEFAULT 0)";

pub fn spec() -> TableSpec {
    TableSpec::new().column("stock", ColumnPolicy::Counter).column("notes", ColumnPolicy::Manual)
}

/// A free loopback port (bound, then released for the broker to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Brokers to run a scenario against: an embedded one, plus `DRIFTLESS_TEST_MQTT_URL` if set.
pub fn brokers() -> Vec<BrokerAddr> {
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    driftless_gateway::broker::start_embedded_broker(listen).expect("embedded broker");
    let mut out = vec![BrokerAddr::plain("127.0.0.1", port)];
    if let Ok(url) = std::env::var("DRIFTLESS_TEST_MQTT_URL") {
        out.push(url.parse().expect("DRIFTLESS_TEST_MQTT_URL must be mqtt://HOST:PORT"));
    }
    out
}

/// A Mosquitto of our own on a free port, so the test can stop and start it. Also the broker
/// for scenarios that restart the gateway: the embedded rumqttd does not survive a persistent
/// shared-subscription session reconnecting with messages in flight.
#[derive(Debug)]
pub struct OwnMosquitto {
    pub port: u16,
    /// The configuration file, for a broker that needs one (TLS, authentication).
    config: Option<PathBuf>,
    child: Option<std::process::Child>,
}

/// Whether the program `name` can be run. A test that needs one that is missing is skipped
/// with a notice, so `cargo test` works with only the Rust toolchain; `.ci/run` installs the
/// tools and sets `DRIFTLESS_REQUIRE_TOOLS=1`, which turns a missing one into a failure.
pub fn have_tool(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(std::env::var_os("DRIFTLESS_REQUIRE_TOOLS").is_none(), "{name} is not installed");
        eprintln!("skipped: {name} is not installed (apt-get install {name}; .ci/run does this)");
    }
    found
}

impl OwnMosquitto {
    /// Starts one, or `None` (the test is skipped) if Mosquitto is not installed.
    pub fn start(port: u16) -> Option<OwnMosquitto> {
        if !have_tool("mosquitto") {
            return None;
        }
        let mut m = OwnMosquitto { port, config: None, child: None };
        m.restart();
        Some(m)
    }

    /// Starts one listening on 127.0.0.1 with `settings` (Mosquitto configuration lines for
    /// that listener and the broker), the file kept in `dir`; `None` if not installed.
    pub fn start_configured(port: u16, dir: &Path, settings: &str) -> Option<OwnMosquitto> {
        if !have_tool("mosquitto") {
            return None;
        }
        let config = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&config, format!("listener {port} 127.0.0.1\n{settings}\n")).expect("write config");
        let mut m = OwnMosquitto { port, config: Some(config), child: None };
        m.restart();
        Some(m)
    }

    pub fn restart(&mut self) {
        let args = match &self.config {
            Some(file) => vec!["-c".to_owned(), file.display().to_string()],
            None => vec!["-p".to_owned(), self.port.to_string()],
        };
        let child = std::process::Command::new("mosquitto")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto; .ci/run does this)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not start on port {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

impl OwnMosquitto {
    pub fn addr(&self) -> BrokerAddr {
        BrokerAddr::plain("127.0.0.1", self.port)
    }
}

/// A tenant name unique to this test run, so tests sharing a broker do not see each other.
pub fn tenant(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), free_port())
}

/// A running gateway serving one tenant.
#[derive(Debug)]
pub struct Gateway {
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<driftless_gateway::Result<()>>>,
}

impl Gateway {
    /// Starts a gateway and waits until it is subscribed to uplinks.
    pub async fn start(broker: &BrokerAddr, tenant: &str, db: PathBuf) -> Gateway {
        Self::start_with_schema(broker, tenant, db, None).await
    }

    /// Starts a gateway that loads `schema` (TOML) first, as `--schema` does.
    pub async fn start_with_schema(broker: &BrokerAddr, tenant: &str, db: PathBuf, schema: Option<&str>) -> Gateway {
        let mut store = SqliteStore::open(&db).expect("gateway store");
        if let Some(text) = schema {
            store.install_schema(text).expect("schema loads");
        }
        let mut config = GatewayConfig::new(broker.clone());
        config.watch = Some(db.clone());
        config.client_id = format!("gw-{tenant}");
        config.share_group = format!("gw-{tenant}");
        config.tenant = tenant.to_owned();
        let ready = config.ready.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(driftless_gateway::run(config, store, async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(20), ready.notified()).await.expect("gateway subscribed");
        Gateway { db, stop: Some(stop), task: Some(task) }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("gateway task").expect("gateway ran cleanly");
        }
    }
}

/// Creates a device database with the inspections table tracked.
pub fn device_db(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.db"));
    let mut store = Store::open(&path, StoreOptions::default()).expect("open");
    store.write(|tx| Ok(tx.execute_batch(SCHEMA)?)).expect("schema");
    store.track("inspections", spec()).expect("track");
    path
}

pub async fn start_agent(db: &Path, broker: &BrokerAddr, tenant: &str, device: &str) -> Agent {
    let url = format!("mqtt://{}:{}", broker.host, broker.port);
    let mut config = AgentConfig::new(db, &url, tenant, device).expect("config");
    // TLS settings and credentials too.
    config.broker = broker.clone();
    config.ack_timeout = Duration::from_secs(3);
    Agent::start(config, StoreOptions::default()).await.expect("agent")
}

/// Runs SQL on a device database through a plain connection, as any app would.
pub fn exec(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn.execute_batch(sql).expect(sql);
}

pub fn rows(db: &Path, sql: &str) -> Vec<Vec<Value>> {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    let mut stmt = conn.prepare(sql).expect(sql);
    let n = stmt.column_count();
    stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>())
        .expect(sql)
        .collect::<rusqlite::Result<Vec<_>>>()
        .expect(sql)
}

pub const ALL: &str = "SELECT id, site, status, notes, stock FROM inspections ORDER BY id";

/// Waits until `check` holds, failing with `what` after `limit`. A correctness wait, not a
/// performance assertion: the limit is generous.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every listed device shows the same inspections table, and returns it.
pub async fn converged(dbs: &[&Path]) -> Vec<Vec<Value>> {
    eventually("devices converge", Duration::from_secs(30), || {
        let first = rows(dbs[0], ALL);
        dbs.iter().all(|d| rows(d, ALL) == first)
    })
    .await;
    rows(dbs[0], ALL)
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// What a client connecting to `broker` meets first: `Ok` once the broker accepts it, the
/// error otherwise.
pub async fn try_connect(client_id: &str, broker: &BrokerAddr) -> Result<(), String> {
    use rumqttc::{ConnectReturnCode, Event, Packet};
    let opts = driftless_core::transport::mqtt_options(client_id, broker).map_err(|e| e.to_string())?;
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == ConnectReturnCode::Success => return Ok(()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => return Err(format!("refused: {:?}", ack.code)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no answer in 10 s".into()),
        }
    }
}

/// Where this system's Mosquitto keeps the dynamic-security plugin.
fn dynsec_plugin() -> Option<PathBuf> {
    let found = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"]
        .iter()
        .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("DRIFTLESS_REQUIRE_TOOLS").is_none(), "the dynamic-security plugin is missing");
        eprintln!("skipped: Mosquitto's dynamic-security plugin is not installed");
    }
    found
}

/// A Mosquitto of the test's own with the dynamic-security plugin, in `dir`: the broker, its
/// port and its admin's URL; `None` (skipped) where the plugin is not installed.
pub fn dynsec_broker(dir: &Path) -> Option<(OwnMosquitto, u16, String)> {
    if !have_tool("mosquitto_ctrl") {
        return None;
    }
    let plugin = dynsec_plugin()?;
    let dynsec = dir.join("dynsec.json");
    let init = std::process::Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&dynsec)
        .args(["admin", "admin-secret"])
        .output()
        .expect("mosquitto_ctrl");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let settings =
        format!("allow_anonymous false\nplugin {}\nplugin_opt_config_file {}", plugin.display(), dynsec.display());
    let port = free_port();
    let broker = OwnMosquitto::start_configured(port, dir, &settings)?;
    Some((broker, port, format!("mqtt://admin:admin-secret@127.0.0.1:{port}")))
}

/// The next packet the client receives for which `pick` gives something.
pub async fn next_packet<T>(events: &mut rumqttc::EventLoop, pick: impl Fn(&rumqttc::Packet) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll()).await.expect("in time").expect("connected");
        if let rumqttc::Event::Incoming(p) = event
            && let Some(found) = pick(&p)
        {
            return found;
        }
    }
}

/// The password a `device add` or `add-gateway` printed.
pub fn printed_password(out: &str) -> String {
    let line = out.lines().find_map(|l| l.strip_prefix("broker password: ")).expect("a password");
    line.trim().to_owned()
}
