//! A small world for scope scenarios: devices with real stores and the real sync machine,
//! the real gateway store (SQLite, or PostgreSQL when `DRIFTLESS_TEST_PG_URL` is set) behind
//! the real handler, and a network that delivers everything in order. Devices go offline and
//! come back; the operator changes their parameters; the back office writes the cloud tables
//! with plain SQL.

// Shared by the scope suites, each of which uses part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use driftless_agent::machine::{Action, Input, StoreResult};
use driftless_agent::{Machine, MachineConfig, execute};
use driftless_core::codec::Limits;
use driftless_core::protocol::{DEFAULT_SCOPE, Downlink, Uplink, downlink_topic, scope_topic, uplink_topic};
use driftless_core::{Store, StoreOptions, Value};
use driftless_gateway::handler::{self, HandlerConfig, Outgoing, handle_uplink};
use driftless_gateway::storage::{Params, testing::TestDb};
use driftless_gateway::{GatewayStore, SqliteStore};

const TENANT: &str = "acme";
const TIMEOUT_MS: u64 = 1_000;

/// Where the gateway keeps its state.
enum Cloud {
    Sqlite(PathBuf),
    Pg(Box<TestDb>),
}

struct Device {
    name: String,
    path: PathBuf,
    store: Store,
    machine: Machine,
    online: bool,
    /// The scope topic it subscribed to (besides the default scope's), as its agent does.
    follows: Option<String>,
    /// Scope changes the broker handed it, and how many of the next ones it loses.
    feeds: usize,
    lose: usize,
    /// Pulls it sent.
    pulls: usize,
}

pub(crate) struct World {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    now: Arc<AtomicU64>,
    cloud: Cloud,
    gateway: Box<dyn GatewayStore>,
    devices: Vec<Device>,
    net: VecDeque<(usize, Downlink)>,
    up: VecDeque<(usize, Vec<u8>)>,
}

/// Runs `test` on a world serving `schema` with the SQLite gateway store, and again with
/// PostgreSQL's when a server is set up.
pub(crate) fn both(schema: &str, test: impl Fn(World)) {
    test(World::new(schema, false).expect("sqlite world"));
    if let Some(world) = World::new(schema, true) {
        test(world);
    }
}

pub(crate) fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl World {
    /// A gateway serving `schema` (SQLite); `None` for PostgreSQL when no server is set up.
    pub(crate) fn new(schema: &str, pg: bool) -> Option<World> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cloud, gateway): (Cloud, Box<dyn GatewayStore>) = if pg {
            let db = TestDb::new()?;
            let store = db.store();
            (Cloud::Pg(Box::new(db)), Box::new(store))
        } else {
            let path = dir.path().join("gw.db");
            (Cloud::Sqlite(path.clone()), Box::new(SqliteStore::open(&path).expect("gateway")))
        };
        let mut world = World {
            dir: dir.path().to_owned(),
            _dir: dir,
            now: Arc::new(AtomicU64::new(1_800_000_000_000)),
            cloud,
            gateway,
            devices: Vec::new(),
            net: VecDeque::new(),
            up: VecDeque::new(),
        };
        world.gateway.install_schema(schema).expect("install schema");
        // As a gateway serving the tenant does when it starts: its tables are made.
        world.gateway.prepare_tenant(TENANT).expect("prepare tenant");
        Some(world)
    }

    /// Registers a device with scope parameters and starts it (offline, with no tables
    /// until the gateway serves it the schema).
    pub(crate) fn device(&mut self, name: &str, params: &[(&str, &str)]) -> usize {
        self.gateway.register_device(TENANT, name, "field", None, 1).expect("register");
        self.set_params(name, params);
        let path = self.dir.join(format!("{name}.db"));
        let now = self.now.clone();
        let opts = StoreOptions { clock: Arc::new(move || now.load(Ordering::SeqCst)), ..StoreOptions::default() };
        let store = Store::open(&path, opts).expect("open device store");
        let machine = Machine::new(MachineConfig {
            device_id: name.to_owned(),
            max_inflight: 2,
            batch_rows: 50,
            max_message_bytes: 1 << 20,
            pull_rows: 3,
            ack_timeout_ms: TIMEOUT_MS,
            receives: true,
            interval_ms: None,
            id_seed: (self.devices.len() as u64 + 1) << 32,
        });
        self.devices.push(Device {
            name: name.to_owned(),
            path,
            store,
            machine,
            online: false,
            follows: None,
            feeds: 0,
            lose: 0,
            pulls: 0,
        });
        self.devices.len() - 1
    }

    /// What an operator does with `driftless-gateway device params`.
    pub(crate) fn set_params(&mut self, name: &str, params: &[(&str, &str)]) {
        let params: Params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(self.gateway.set_params(TENANT, name, &params).expect("set params"), "{name} is registered");
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn input(&mut self, d: usize, input: Input) {
        let now = self.now();
        let dev = &mut self.devices[d];
        let mut queue: VecDeque<Action> = dev.machine.handle(input, now).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Publish(msg) => {
                    if matches!(msg, Uplink::Pull { .. } | Uplink::PullSnapshot { .. }) {
                        dev.pulls += 1;
                    }
                    if dev.online {
                        self.up.push_back((d, msg.encode()));
                    }
                    queue.extend(dev.machine.handle(Input::Flushed, now));
                }
                Action::Store(op) => {
                    let result = execute(&mut dev.store, op, now);
                    if let StoreResult::Failed(e) = &result {
                        panic!("store work failed on {}: {e}", dev.name);
                    }
                    queue.extend(dev.machine.handle(Input::Store(result), now));
                }
                Action::Follow(scope) => dev.follows = Some(scope_topic(TENANT, &scope)),
                _ => {}
            }
        }
    }

    fn route(&mut self, out: Vec<Outgoing>) {
        for o in out {
            match o {
                Outgoing::Reply { topic, payload } => {
                    let d = self.devices.iter().position(|x| downlink_topic(TENANT, &x.name) == topic).expect("device");
                    self.net.push_back((d, Downlink::decode(&payload, &Limits::default()).expect("downlink")));
                }
                // The broker's fan-out: to every device subscribed to the topic (every device
                // subscribes to the default scope's, and to the one its gateway names).
                Outgoing::Feed { topic, payload } => {
                    let msg = Downlink::decode(&payload, &Limits::default()).expect("feed");
                    for d in 0..self.devices.len() {
                        let dev = &mut self.devices[d];
                        let subscribed =
                            topic == scope_topic(TENANT, DEFAULT_SCOPE) || dev.follows == Some(topic.clone());
                        if !subscribed || !dev.online {
                            continue;
                        }
                        dev.feeds += 1;
                        if dev.lose > 0 {
                            dev.lose -= 1;
                        } else {
                            self.net.push_back((d, msg.clone()));
                        }
                    }
                }
                Outgoing::Poke { .. } => {}
            }
        }
    }

    /// Delivers everything in flight, and everything it leads to.
    fn deliver(&mut self) {
        for _ in 0..100_000 {
            if !self.deliver_one() {
                return;
            }
        }
        panic!("messages keep flowing: the devices and the gateway never come to rest");
    }

    /// Delivers the next message in flight; false if there is none.
    fn deliver_one(&mut self) -> bool {
        if let Some((d, payload)) = self.up.pop_front() {
            let topic = uplink_topic(TENANT, &self.devices[d].name);
            let now = self.now();
            let cfg = HandlerConfig::default();
            let out = handle_uplink(&mut *self.gateway, &cfg, &topic, &payload, now).expect("gateway");
            self.route(out);
        } else if let Some((d, msg)) = self.net.pop_front() {
            if self.devices[d].online {
                self.input(d, Input::Downlink(msg));
            }
        } else {
            return false;
        }
        true
    }

    /// Connects a device and delivers what follows, one message at a time, until `done`
    /// holds of its store (then it is disconnected).
    pub(crate) fn connect_until(&mut self, d: usize, done: impl Fn(&Store) -> bool) {
        self.devices[d].online = true;
        self.input(d, Input::Connected);
        while !done(&self.devices[d].store) {
            assert!(self.deliver_one(), "came to rest before it held");
        }
        self.disconnect(d);
    }

    /// Brings every online device to rest: its writes shipped, what it misses pulled.
    pub(crate) fn settle(&mut self) {
        for _ in 0..40 {
            self.deliver();
            self.now.fetch_add(TIMEOUT_MS * 7, Ordering::SeqCst);
            for d in 0..self.devices.len() {
                if self.devices[d].online {
                    self.input(d, Input::Tick);
                }
            }
        }
        self.deliver();
        for d in &self.devices {
            if d.online {
                assert_eq!(d.store.pending_changes().expect("pending"), 0, "{} shipped everything", d.name);
            }
        }
    }

    pub(crate) fn connect(&mut self, d: usize) {
        self.devices[d].online = true;
        self.input(d, Input::Connected);
        self.settle();
    }

    pub(crate) fn disconnect(&mut self, d: usize) {
        self.devices[d].online = false;
        self.net.retain(|(dev, _)| *dev != d);
        self.input(d, Input::Disconnected { flush_timeout: false });
    }

    /// A write made by the device's app, shipped if it is online.
    pub(crate) fn write(&mut self, d: usize, sql: &str) {
        self.write_now(d, sql);
        if self.devices[d].online {
            self.settle();
        }
    }

    /// A write made by the device's app, and everything it leads to at once, without time
    /// passing (no backstop pull).
    pub(crate) fn write_now(&mut self, d: usize, sql: &str) {
        let conn = rusqlite::Connection::open(&self.devices[d].path).expect("open");
        conn.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
        conn.execute_batch(sql).expect(sql);
        drop(conn);
        self.input(d, Input::LocalChange);
        self.deliver();
    }

    /// Pulls the device sent so far (snapshot pages included).
    pub(crate) fn pulls(&self, d: usize) -> usize {
        self.devices[d].pulls
    }

    /// A write made with plain SQL on the cloud's table (the ERP), taken in and published as
    /// the gateway's service does.
    pub(crate) fn cloud_write(&mut self, sql: &str) {
        match &self.cloud {
            Cloud::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("open");
                conn.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
                let sql = sql
                    .replace("NOTICES", &format!("\"{TENANT}.notices\""))
                    .replace("CUSTOMERS", &format!("\"{TENANT}.customers\""))
                    .replace("TABLE", &format!("\"{TENANT}.work_orders\""));
                conn.execute_batch(&sql).expect(&sql);
            }
            Cloud::Pg(db) => {
                let sql = sql
                    .replace("NOTICES", &format!("\"{TENANT}\".notices"))
                    .replace("CUSTOMERS", &format!("\"{TENANT}\".customers"))
                    .replace("TABLE", &format!("\"{TENANT}\".work_orders"));
                db.client().batch_execute(&sql).expect(&sql)
            }
        }
        let logged = self.gateway.ingest_cloud_writes(self.now()).expect("ingest");
        assert!(!logged.is_empty(), "the cloud write was taken in");
        let epoch = self.gateway.epoch(TENANT).expect("epoch");
        let entries: Vec<_> = logged.into_iter().map(|(_, e)| e).collect();
        let out = handler::feed(&mut *self.gateway, epoch, TENANT, &entries);
        self.route(out);
        self.settle();
    }

    /// Rows of the device's table, by a query.
    pub(crate) fn rows(&self, d: usize, sql: &str) -> Vec<Vec<Value>> {
        self.devices[d]
            .store
            .read(|c| {
                let mut stmt = c.prepare(sql)?;
                let n = stmt.column_count();
                Ok(stmt
                    .query_map([], |r| (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<Vec<_>>>())?
                    .collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .expect(sql)
    }

    /// The ids of the work orders a device holds, sorted.
    pub(crate) fn held(&self, d: usize) -> Vec<String> {
        self.rows(d, "SELECT id FROM work_orders ORDER BY id")
            .into_iter()
            .map(|r| match &r[0] {
                Value::Text(t) => t.clone(),
                other => panic!("id {other:?}"),
            })
            .collect()
    }

    /// How many scope changes the broker handed the device so far.
    pub(crate) fn feeds(&self, d: usize) -> usize {
        self.devices[d].feeds
    }

    /// The device loses the next `n` scope changes the broker hands it (QoS 0).
    pub(crate) fn lose_feeds(&mut self, d: usize, n: usize) {
        self.devices[d].lose = n;
    }

    pub(crate) fn store(&self, d: usize) -> &Store {
        &self.devices[d].store
    }

    /// A device provisioned with the schema before its first connection (its app can write
    /// before it ever syncs).
    pub(crate) fn provision(&mut self, d: usize, schema: &str) {
        self.devices[d].store.follow_schema(1, schema).expect("follow schema");
    }

    /// A new version of the schema, loaded by the operator (devices follow it at their next
    /// connection).
    pub(crate) fn install_schema(&mut self, text: &str) {
        self.gateway.install_schema(text).expect("install schema");
        self.gateway.prepare_tenant(TENANT).expect("prepare tenant");
    }

    /// Whether the gateway keeps its state in SQLite (a file that can be backed up here).
    pub(crate) fn on_sqlite(&self) -> bool {
        matches!(self.cloud, Cloud::Sqlite(_))
    }

    /// A consistent copy of the gateway's SQLite file, as an operator's backup.
    pub(crate) fn backup_gateway(&self) -> PathBuf {
        let Cloud::Sqlite(path) = &self.cloud else { panic!("backups here are of the SQLite store") };
        let copy = self.dir.join("gw-backup.db");
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.execute("VACUUM INTO ?1", [copy.to_str().expect("utf-8 path")]).expect("backup");
        copy
    }

    /// The gateway's file restored from `backup` (every device offline): what it logged since
    /// is gone, and devices send back what they hold at their next connection.
    pub(crate) fn restore_gateway(&mut self, backup: &std::path::Path) {
        let Cloud::Sqlite(path) = &self.cloud else { panic!("backups here are of the SQLite store") };
        let path = path.clone();
        self.gateway = Box::new(SqliteStore::open(self.dir.join("scratch.db")).expect("scratch"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        std::fs::copy(backup, &path).expect("restore");
        self.gateway = Box::new(SqliteStore::open(&path).expect("reopen"));
    }

    pub(crate) fn gateway(&mut self) -> &mut dyn GatewayStore {
        &mut *self.gateway
    }
}
