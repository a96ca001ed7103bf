//! The simulated world: devices with real stores and the real sync machine, the real gateway
//! store behind the real handler, and a network that holds every message in flight until an
//! action delivers, repeats or drops it. Runs actions, brings everything to rest, and checks
//! the invariants.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use driftless_agent::machine::{Action, Input, StoreResult};
use driftless_agent::{Machine, MachineConfig, execute};
use driftless_core::codec::Limits;
use driftless_core::protocol::{Downlink, downlink_topic, uplink_topic};
use driftless_core::{RowState, Store, StoreOptions, Value};
use driftless_gateway::handler::{HandlerConfig, Outgoing, handle_uplink};
use driftless_gateway::{GatewayStore, SqliteStore};

use super::{Act, KEYS, SCHEMA, TENANT, TIMEOUT_MS, YEAR_MS, spec};

#[derive(Debug)]
enum Msg {
    Up { dev: usize, payload: Vec<u8> },
    Down { dev: usize, payload: Vec<u8> },
    Poke { dev: usize, head: driftless_core::LogCursor },
}

struct Device {
    name: String,
    path: PathBuf,
    clock: Arc<AtomicU64>,
    /// Milliseconds this device's clock runs ahead.
    skew: u64,
    store: Store,
    machine: Machine,
    online: bool,
    backup: Option<PathBuf>,
    restarts: u64,
}

pub(super) struct Sim {
    dir: tempfile::TempDir,
    now: u64,
    gateway: SqliteStore,
    gateway_backup: Option<PathBuf>,
    devices: Vec<Device>,
    net: Vec<Msg>,
    /// The increments made: (key, power of four).
    counted: Vec<(usize, u32)>,
    next_power: [u32; KEYS.len()],
    /// Increments that at some step were held by no replica (those may be gone for good).
    lost: BTreeSet<(usize, u32)>,
    log: Vec<String>,
}

fn opts(clock: &Arc<AtomicU64>, skew: u64) -> StoreOptions {
    let c = clock.clone();
    StoreOptions { clock: Arc::new(move || c.load(Ordering::SeqCst) + skew), ..StoreOptions::default() }
}

fn machine(name: &str, seed: u64) -> Machine {
    Machine::new(MachineConfig {
        device_id: name.to_owned(),
        max_inflight: 2,
        batch_rows: 3,
        max_message_bytes: 1 << 20,
        pull_rows: 4,
        ack_timeout_ms: TIMEOUT_MS,
        receives: true,
        interval_ms: None,
        id_seed: seed << 32,
    })
}

fn exec(store: &mut Store, sql: &str) {
    store.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
}

fn table(store: &Store) -> Vec<Vec<Value>> {
    store
        .read(|c| {
            let mut stmt = c.prepare("SELECT id, site, note, qty FROM items ORDER BY id")?;
            let rows =
                stmt.query_map([], |r| (0..4).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>())?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .expect("read table")
}

fn qty(rows: &[Vec<Value>], key: usize) -> i64 {
    rows.iter()
        .find(|r| r[0] == Value::Text(KEYS[key].into()))
        .map_or(0, |r| if let Value::Integer(q) = r[3] { q } else { 0 })
}

fn digit(v: i64, power: u32) -> i64 {
    (v >> (2 * power)) & 3
}

/// A message, briefly (for `SIM_TRACE=1` replays).
fn describe(m: &Msg) -> String {
    // Without the batch bytes, which say nothing to a reader.
    let short = |s: String| match s.find("batch: [") {
        Some(at) => {
            let end = s[at..].find(']').map_or(s.len(), |e| at + e + 1);
            format!("{}batch: ..{}", &s[..at], &s[end..])
        }
        None => s,
    };
    match m {
        Msg::Up { dev, payload } => {
            format!(
                "up {dev}: {}",
                short(format!("{:?}", driftless_core::protocol::Uplink::decode(payload, &Limits::default())))
            )
        }
        Msg::Down { dev, payload } => {
            format!("down {dev}: {}", short(format!("{:?}", Downlink::decode(payload, &Limits::default()))))
        }
        Msg::Poke { dev, head } => format!("poke {dev}: {head:?}"),
    }
}

/// Writes captured by the device's triggers and not sealed yet.
fn journaled(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '_driftless_pending_%'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("journals");
    tables
        .iter()
        .map(|t| conn.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get::<_, i64>(0)).expect("count"))
        .sum()
}

fn backup_file(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    let conn = rusqlite::Connection::open(from).expect("open");
    conn.execute("VACUUM INTO ?1", [to.to_str().expect("path")]).expect("backup");
}

fn restore_file(from: &Path, to: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", to.display()));
    }
    std::fs::copy(from, to).expect("restore");
}

impl Sim {
    pub(super) fn new(devices: usize) -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = SqliteStore::open(dir.path().join("gw.db")).expect("gateway");
        let mut sim = Sim {
            dir,
            now: 1_000_000,
            gateway,
            gateway_backup: None,
            devices: Vec::new(),
            net: Vec::new(),
            counted: Vec::new(),
            next_power: [0; KEYS.len()],
            lost: BTreeSet::new(),
            log: Vec::new(),
        };
        for i in 0..devices {
            let name = format!("dev{i}");
            let path = sim.dir.path().join(format!("{name}.db"));
            let clock = Arc::new(AtomicU64::new(sim.now));
            // Device 1 runs a clock a year ahead.
            let skew = if i == 1 { YEAR_MS } else { 0 };
            let mut store = Store::open(&path, opts(&clock, skew)).expect("open");
            exec(&mut store, SCHEMA);
            if i == 2 {
                // Device 2's app allows one item per site: some remote rows it cannot show.
                exec(&mut store, "CREATE UNIQUE INDEX IF NOT EXISTS one_per_site ON items(site)");
            }
            store.track("items", spec()).expect("track");
            store.hold_seal();
            sim.devices.push(Device {
                machine: machine(&name, i as u64 + 1),
                name,
                path,
                clock,
                skew,
                store,
                online: false,
                backup: None,
                restarts: 0,
            });
        }
        sim
    }

    /// Feeds an input to a device's machine and carries out everything it asks.
    fn input(&mut self, d: usize, input: Input) {
        let now = self.now;
        let dev = &mut self.devices[d];
        dev.clock.store(now, Ordering::SeqCst);
        let mut queue: VecDeque<Action> = dev.machine.handle(input, now).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Publish(msg) => {
                    if dev.online {
                        self.net.push(Msg::Up { dev: d, payload: msg.encode() });
                    }
                    // Written out at once on the simulated link.
                    queue.extend(dev.machine.handle(Input::Flushed, now));
                }
                Action::Store(op) => {
                    let trace = std::env::var_os("SIM_TRACE").is_some();
                    let shown =
                        if trace { format!("{op:?}").chars().take(200).collect::<String>() } else { String::new() };
                    let result = execute(&mut dev.store, op, now + dev.skew);
                    if trace {
                        eprintln!(
                            "     {} {shown} -> {:?}",
                            dev.name,
                            format!("{result:?}").chars().take(300).collect::<String>()
                        );
                    }
                    if let StoreResult::Failed(e) = &result {
                        panic!("store work failed on {}: {e}", dev.name);
                    }
                    queue.extend(dev.machine.handle(Input::Store(result), now));
                }
                Action::Changed(_) | Action::Progress(_) => {}
                _ => {}
            }
        }
    }

    fn gateway_receive(&mut self, d: usize, payload: &[u8]) {
        let topic = uplink_topic(TENANT, &self.devices[d].name);
        let out = handle_uplink(&mut self.gateway, &HandlerConfig::default(), &topic, payload, self.now)
            .expect("the gateway never fails on its own store here");
        for o in out {
            match o {
                Outgoing::Reply { topic, payload } => {
                    let dev =
                        self.devices.iter().position(|x| downlink_topic(TENANT, &x.name) == topic).expect("device");
                    self.net.push(Msg::Down { dev, payload });
                }
                // The broker's fan-out: a copy for every device (each subscribes to the
                // tenant's one scope), delivered, delayed, reordered or lost like any other.
                Outgoing::Feed { payload, .. } => {
                    for dev in 0..self.devices.len() {
                        self.net.push(Msg::Down { dev, payload: payload.clone() });
                    }
                }
                // Pokes name the newest entry: a device that heard less pulls.
                Outgoing::Poke { head, .. } => {
                    for dev in 0..self.devices.len() {
                        self.net.push(Msg::Poke { dev, head });
                    }
                }
            }
        }
    }

    fn deliver(&mut self, at: usize, keep: bool) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("deliver {}", describe(&self.net[at]));
        }
        let msg = if keep {
            match &self.net[at] {
                Msg::Up { dev, payload } => Msg::Up { dev: *dev, payload: payload.clone() },
                Msg::Down { dev, payload } => Msg::Down { dev: *dev, payload: payload.clone() },
                Msg::Poke { dev, head } => Msg::Poke { dev: *dev, head: *head },
            }
        } else {
            self.net.swap_remove(at)
        };
        match msg {
            Msg::Up { dev, payload } => self.gateway_receive(dev, &payload),
            Msg::Down { dev, payload } if self.devices[dev].online => {
                let msg = Downlink::decode(&payload, &Limits::default()).expect("downlink");
                self.input(dev, Input::Downlink(msg));
            }
            Msg::Poke { dev, head } if self.devices[dev].online => self.input(dev, Input::Poke { head: Some(head) }),
            _ => {}
        }
    }

    fn write(&mut self, d: usize, sql: &str) {
        let now = self.now;
        let dev = &mut self.devices[d];
        dev.clock.store(now, Ordering::SeqCst);
        // A plain write, as the app makes it: a constraint of the app's may refuse it.
        let conn = rusqlite::Connection::open(&dev.path).expect("open");
        conn.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
        let _ = conn.execute_batch(sql);
        drop(conn);
        self.input(d, Input::LocalChange);
    }

    /// What the device's dying process had published: delivered now, in order, or lost.
    fn settle_uplinks(&mut self, d: usize, lost: bool) {
        let mine: Vec<usize> =
            (0..self.net.len()).filter(|&i| matches!(&self.net[i], Msg::Up { dev, .. } if *dev == d)).collect();
        let mut taken: Vec<Msg> = Vec::new();
        for i in mine.into_iter().rev() {
            taken.push(self.net.remove(i));
        }
        taken.reverse();
        if !lost {
            for msg in taken {
                if let Msg::Up { dev, payload } = msg {
                    self.gateway_receive(dev, &payload);
                }
            }
        }
    }

    fn reopen(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        dev.restarts += 1;
        let store = Store::open(&dev.path, opts(&dev.clock, dev.skew)).expect("reopen");
        dev.store = store;
        dev.store.hold_seal();
        dev.machine = machine(&dev.name, (d as u64 + 1) * 1_000 + dev.restarts);
        dev.online = false;
    }

    fn connect(&mut self, d: usize) {
        if !self.devices[d].online {
            self.devices[d].online = true;
            self.input(d, Input::Connected);
        }
    }

    fn disconnect(&mut self, d: usize) {
        if self.devices[d].online {
            self.devices[d].online = false;
            self.net.retain(|m| !matches!(m, Msg::Down { dev, .. } | Msg::Poke { dev, .. } if *dev == d));
            self.input(d, Input::Disconnected { flush_timeout: false });
        }
    }

    pub(super) fn run(&mut self, a: &Act) {
        self.log.push(format!("{a:?}"));
        let n = self.devices.len();
        match *a {
            Act::Count { dev, key } => {
                let power = self.next_power[key];
                if power >= 30 {
                    return;
                }
                self.next_power[key] += 1;
                self.counted.push((key, power));
                let k = KEYS[key];
                self.write(
                    dev % n,
                    &format!(
                        "INSERT INTO items(id, qty) VALUES ('{k}', 0) ON CONFLICT(id) DO NOTHING;
                         UPDATE items SET qty = qty + {} WHERE id = '{k}'",
                        1i64 << (2 * power)
                    ),
                );
            }
            Act::SetNote { dev, key, value } => {
                let k = KEYS[key];
                self.write(
                    dev % n,
                    &format!("INSERT INTO items(id, note) VALUES ('{k}', 'n{value}') ON CONFLICT(id) DO UPDATE SET note = excluded.note"),
                );
            }
            Act::SetSite { dev, key, value } => {
                self.write(dev % n, &format!("UPDATE items SET site = 's{value}' WHERE id = '{}'", KEYS[key]));
            }
            Act::Deliver { pick, keep } => {
                if !self.net.is_empty() {
                    let at = (pick % self.net.len() as u64) as usize;
                    self.deliver(at, keep);
                }
            }
            Act::Drop { pick } => {
                if !self.net.is_empty() {
                    let at = (pick % self.net.len() as u64) as usize;
                    self.net.swap_remove(at);
                }
            }
            Act::Tick { ms } => {
                self.now += u64::from(ms);
                for d in 0..n {
                    self.input(d, Input::Tick);
                }
            }
            Act::Disconnect { dev } => self.disconnect(dev % n),
            Act::Connect { dev } => self.connect(dev % n),
            Act::Restart { dev, lost } => {
                self.disconnect(dev % n);
                self.settle_uplinks(dev % n, lost);
                self.reopen(dev % n);
            }
            Act::Backup { dev } => {
                let d = &mut self.devices[dev % n];
                // A backup holding writes not sealed yet, restored after the original device
                // shipped them, seals them again under the new node: a documented limitation
                // (docs/ARCHITECTURE.md, "Node identity"), not explored here.
                if journaled(&d.path) > 0 {
                    return;
                }
                let to = d.path.with_extension("backup");
                backup_file(&d.path, &to);
                d.backup = Some(to);
            }
            Act::Restore { dev, lost } => {
                let d = dev % n;
                let Some(from) = self.devices[d].backup.clone() else { return };
                self.disconnect(d);
                self.settle_uplinks(d, lost);
                let path = self.devices[d].path.clone();
                // Close the store before its file is replaced, as a phone restore would.
                let placeholder =
                    Store::open(self.dir.path().join("placeholder.db"), StoreOptions::default()).expect("open");
                drop(std::mem::replace(&mut self.devices[d].store, placeholder));
                restore_file(&from, &path);
                self.reopen(d);
            }
            Act::BackupGateway => {
                let to = self.dir.path().join("gw.backup");
                backup_file(&self.dir.path().join("gw.db"), &to);
                self.gateway_backup = Some(to);
            }
            Act::RestoreGateway => {
                let Some(from) = self.gateway_backup.clone() else { return };
                let path = self.dir.path().join("gw.db");
                let placeholder = SqliteStore::open(self.dir.path().join("gw-placeholder.db")).expect("open");
                drop(std::mem::replace(&mut self.gateway, placeholder));
                restore_file(&from, &path);
                self.gateway = SqliteStore::open(&path).expect("reopen gateway");
                // Messages in flight to the old store are answered by the restored one.
            }
            Act::Retrack { dev } => {
                let store = &mut self.devices[dev % n].store;
                store.untrack("items").expect("untrack");
                store.track("items", spec()).expect("track");
                self.input(dev % n, Input::LocalChange);
            }
        }
        self.note_presence();
    }

    /// Marks increments no replica holds right now as possibly lost.
    fn note_presence(&mut self) {
        let mut held: BTreeSet<(usize, u32)> = BTreeSet::new();
        let gateway = self.gateway_counters();
        let values: Vec<Vec<i64>> = self
            .devices
            .iter()
            .map(|d| {
                let rows = table(&d.store);
                (0..KEYS.len()).map(|k| qty(&rows, k)).collect()
            })
            .chain(std::iter::once(gateway))
            .collect();
        for &(key, power) in &self.counted {
            if values.iter().any(|v| digit(v[key], power) >= 1) {
                held.insert((key, power));
            }
        }
        for &c in &self.counted {
            if !held.contains(&c) {
                self.lost.insert(c);
            }
        }
    }

    fn gateway_states(&mut self) -> BTreeMap<Vec<u8>, RowState> {
        let mut out = BTreeMap::new();
        let mut resume = Vec::new();
        loop {
            let page = self.gateway.snapshot_page(TENANT, &resume, 1_000).expect("snapshot").expect("page");
            for row in page.batch.rows {
                out.insert(driftless_core::codec::encode_key(&row.pk), row.state);
            }
            if page.done {
                return out;
            }
            resume = page.resume;
        }
    }

    fn gateway_counters(&mut self) -> Vec<i64> {
        let states = self.gateway_states();
        (0..KEYS.len())
            .map(|k| {
                let key = driftless_core::codec::encode_key(&[Value::Text(KEYS[k].into())]);
                states.get(&key).and_then(|s| s.counters.get("qty")).map_or(0, |c| c.value())
            })
            .collect()
    }

    /// Brings everyone online and delivers everything until nothing moves.
    /// Each device's table, outbox and status (for `SIM_TRACE=1` replays).
    pub(super) fn trace_devices(&self) {
        for d in &self.devices {
            let (rows, pending) = (table(&d.store), d.store.pending_changes());
            eprintln!("   {}: {rows:?} pending {pending:?} {:?}", d.name, d.machine.live());
        }
    }

    pub(super) fn quiesce(&mut self) {
        for d in 0..self.devices.len() {
            self.connect(d);
        }
        for round in 0..200 {
            // Everything in flight arrives, and everything it leads to.
            while !self.net.is_empty() {
                self.deliver(0, false);
            }
            let uploaded = self.devices.iter().all(|d| d.store.pending_changes().expect("pending") == 0);
            if uploaded && round > 3 {
                return;
            }
            // Time passes: only the devices' own timers act (resends, the backstop pull).
            self.now += TIMEOUT_MS * 20;
            for d in 0..self.devices.len() {
                self.input(d, Input::Tick);
            }
        }
        let state: Vec<String> = self
            .devices
            .iter()
            .map(|d| format!("{}: pending {:?}, {:?}", d.name, d.store.pending_changes(), d.machine.live()))
            .collect();
        panic!("the fleet did not settle:\n{}\n{}", state.join("\n"), self.log.join("\n"));
    }

    pub(super) fn check(&mut self) {
        let log = self.log.join("\n");
        let gateway = self.gateway_states();
        let expected_table = table(&self.devices[0].store);
        for d in &mut self.devices {
            let (snapshot, _) = d.store.snapshot(None, 10_000).expect("snapshot");
            let states: BTreeMap<Vec<u8>, RowState> =
                snapshot.rows.into_iter().map(|r| (driftless_core::codec::encode_key(&r.pk), r.state)).collect();
            assert_eq!(states, gateway, "{} holds other row states than the gateway\n{log}", d.name);
            // Device 2 may not show rows its own constraint refuses; the others agree exactly.
            if d.name != "dev2" {
                assert_eq!(table(&d.store), expected_table, "{} shows another table\n{log}", d.name);
            }
        }
        let counters = self.gateway_counters();
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("gateway states: {gateway:?}");
        }
        for key in 0..KEYS.len() {
            let value = counters[key];
            for power in 0..32 {
                assert!(digit(value, power) <= 1, "increment 4^{power} of {} counted twice: {value}\n{log}", KEYS[key]);
            }
            for &(k, power) in &self.counted {
                if k == key && !self.lost.contains(&(k, power)) {
                    assert_eq!(
                        digit(value, power),
                        1,
                        "increment 4^{power} of {} is missing: {value}\n{log}",
                        KEYS[key]
                    );
                }
            }
        }
    }
}
