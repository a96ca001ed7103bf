//! Support for the benchmarks: a gateway in its own process (so its memory can be measured)
//! against an external broker.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::protocol::Uplink;
use driftless_core::{Batch, Dot, FieldWrite, Hlc, LocalWrite, NodeId, RowChange, RowState, Value, write_local_upsert};

/// The broker benchmarks run through (Mosquitto on this machine by default).
pub fn bench_broker_url() -> String {
    std::env::var("DRIFTLESS_BENCH_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

/// A `driftless-gateway` process.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
}

impl GatewayProcess {
    /// Starts the binary named by `DRIFTLESS_GATEWAY_BIN` (scripts/bench builds and sets it)
    /// and waits until it has subscribed to uplinks.
    /// It serves only `tenant`, in a share group of its own, so runs never split traffic
    /// with the lingering sessions of earlier ones.
    pub fn start(db: &Path, broker_url: &str, tenant: &str) -> GatewayProcess {
        Self::start_with(db, broker_url, tenant, &[])
    }

    /// [`GatewayProcess::start`] with more flags (`--schema FILE`).
    pub fn start_with(db: &Path, broker_url: &str, tenant: &str, extra: &[&str]) -> GatewayProcess {
        Self::start_as(&format!("bench-gw-{tenant}"), db, broker_url, tenant, extra)
    }

    /// [`GatewayProcess::start_with`] under its own MQTT client id: several instances in one
    /// share group split the uplinks.
    pub fn start_as(client_id: &str, db: &Path, broker_url: &str, tenant: &str, extra: &[&str]) -> GatewayProcess {
        let bin = std::env::var("DRIFTLESS_GATEWAY_BIN")
            .expect("DRIFTLESS_GATEWAY_BIN must name a driftless-gateway binary (scripts/bench sets it)");
        let mut child = Command::new(bin)
            .arg("--db")
            .arg(db)
            .args(["--broker", broker_url, "--client-id", client_id])
            .args(["--share-group", &format!("bench-{tenant}"), "--tenant", tenant])
            .args(extra)
            .env("RUST_LOG", "warn,driftless_gateway=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // Keep draining the gateway's log so it never blocks on a full pipe.
        // DRIFTLESS_BENCH_GATEWAY_LOG names a file to keep the gateway's log in.
        let mut keep = std::env::var_os("DRIFTLESS_BENCH_GATEWAY_LOG")
            .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = keep.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("subscribed to device uplinks") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30)).expect("gateway subscribed");
        GatewayProcess { child }
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User and system CPU time the gateway process has used, in seconds (`/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.child.id().to_string())
    }

    /// Peak resident memory of the gateway process, in MiB.
    pub fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU time of process `pid` (or `self`), in seconds (`/proc/PID/stat`).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Lowers the CPU priority of every thread of this process to `nice` (threads it starts
/// later inherit it from the thread starting them); processes it already started keep theirs.
/// For benchmarks that simulate a fleet in this process on the machine the gateway and the
/// broker run on: hundreds of simulated devices would otherwise take the cores the gateway
/// and the broker need, which real devices, each on hardware of its own, never do. Raising
/// one's own nice value needs no privilege.
pub fn lower_priority(nice: u32) -> anyhow::Result<()> {
    let mut threads: Vec<String> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        threads.push(entry?.file_name().to_string_lossy().into_owned());
    }
    let out = Command::new("renice").args(["-n", &nice.to_string(), "-p"]).args(&threads).output()?;
    anyhow::ensure!(out.status.success(), "renice failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints the one JSON object the bench script promises, last.
pub fn report(fields: &[(&str, f64)]) {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {}", (v * 1000.0).round() / 1000.0)).collect();
    println!("{{{}}}", body.join(", "));
}

/// The drain workload: a device store with a table `readings` of `rows` rows of `fields` text
/// fields, all written while offline, so its whole content waits in the outbox.
pub fn offline_device(db: &Path, rows: usize, fields: usize) -> anyhow::Result<()> {
    use driftless_core::{Store, StoreOptions, TableSpec};
    let mut store = Store::open(db, StoreOptions::default())?;
    let cols: Vec<String> = (0..fields).map(|i| format!("f{i} TEXT")).collect();
    store.write(|tx| {
        Ok(tx.execute_batch(&format!("CREATE TABLE readings (id TEXT PRIMARY KEY, {})", cols.join(", ")))?)
    })?;
    store.track("readings", TableSpec::new())?;
    store.write(|tx| {
        let slots: Vec<String> = (0..fields).map(|i| format!("?{}", i + 2)).collect();
        let mut stmt = tx.prepare(&format!("INSERT INTO readings VALUES (?1, {})", slots.join(", ")))?;
        for r in 0..rows {
            let mut vals = vec![format!("{:08x}-0000-4000-8000-{:012x}", r, r * 7919)];
            vals.extend((0..fields).map(|f| format!("reading {r} field {f}: {}", r * 31 + f)));
            stmt.execute(rusqlite::params_from_iter(vals))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// A device's batches, each one new row of table `t`, written as its node: what a device
/// sends, built without a store (cheap, so a load generator measures the gateway).
#[derive(Debug)]
pub struct Writer {
    device: String,
    node: NodeId,
    counter: u64,
}

impl Writer {
    pub fn new(device: String, n: u32) -> Writer {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_le_bytes());
        id[4..8].copy_from_slice(&std::process::id().to_le_bytes());
        Writer { device, node: NodeId(id), counter: 0 }
    }

    pub fn next_batch(&mut self) -> (u64, Vec<u8>) {
        self.counter += 1;
        let now = Hlc::new(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64), 0);
        let write = LocalWrite {
            fields: vec![FieldWrite { column: "v".into(), value: Value::Integer(self.counter as i64), hlc: now }],
            ..LocalWrite::default()
        };
        let state =
            write_local_upsert(&mut RowState::default(), Dot { node: self.node, counter: self.counter }, now, write);
        let key = Value::Text(format!("{}-{}", self.device, self.counter));
        let batch = Batch { rows: vec![RowChange { table: "t".into(), pk: vec![key], state }], ..Batch::default() };
        let seq = self.counter as i64;
        let msg = Uplink::Batch {
            device: self.device.clone(),
            id: self.counter,
            first_seq: seq,
            last_seq: seq,
            epoch: None,
            receipts: vec![],
            batch: encode_batch(&batch, EncodeOptions::default()),
        };
        (self.counter, msg.encode())
    }
}
