//! The real binaries as processes: `driftless-gateway` and `driftless-agent`, started, stopped
//! and killed the way an operator (or a crash) would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use driftless_core::protocol::BrokerAddr;

/// Where binaries of another build are, to run the scenarios against it
/// (`DRIFTLESS_BIN_DIR=/path/to/target/release`), e.g. to see them fail on a build from
/// before a fix. Flags that build may not know are then left out.
fn other_build() -> Option<PathBuf> {
    std::env::var_os("DRIFTLESS_BIN_DIR").map(PathBuf::from)
}

/// The path of a workspace binary, built first if this test run did not build it.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = other_build() {
        return dir.join(name);
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-q", "-p", "driftless-gateway", "-p", "driftless-agent"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The broker's URL as a command line takes it, credentials included.
pub fn url(broker: &BrokerAddr) -> String {
    let login = broker.login.as_ref().map_or(String::new(), |(u, p)| format!("{u}:{p}@"));
    format!("mqtt://{login}{}:{}", broker.host, broker.port)
}

/// Runs `driftless-gateway` with `args` and returns its output; fails the test if it fails.
pub fn gateway_ok(args: &[&str]) -> String {
    let out = Command::new(bin("driftless-gateway")).args(args).output().expect("run driftless-gateway");
    assert!(out.status.success(), "driftless-gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `driftless-agent` with `args` to completion.
pub fn agent_cli(args: &[&str]) -> Output {
    Command::new(bin("driftless-agent")).args(args).output().expect("run driftless-agent")
}

/// Runs `driftless-agent` and fails the test if it fails.
pub fn agent_ok(args: &[&str]) -> String {
    let out = agent_cli(args);
    assert!(out.status.success(), "driftless-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running process whose stderr goes to a log file, read to tell when it is ready.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child: Some(child), log }
    }

    /// Waits until the log has a line containing `what`.
    pub fn wait_for_log(&self, what: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(f) = std::fs::File::open(&self.log)
                && BufReader::new(f).lines().map_while(Result::ok).any(|l| l.contains(what))
            {
                return;
            }
            assert!(start.elapsed() < limit, "timed out waiting for {what:?} in {}", self.log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many log lines contain `what`.
    pub fn log_count(&self, what: &str) -> usize {
        std::fs::File::open(&self.log)
            .map(|f| BufReader::new(f).lines().map_while(Result::ok).filter(|l| l.contains(what)).count())
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL: nothing gets to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `driftless-gateway` serving `tenant` and waits until it is subscribed.
pub fn gateway(broker: &BrokerAddr, tenant: &str, db: &Path, extra: &[&str]) -> Proc {
    gateway_as(&format!("gw-{tenant}"), broker, tenant, db, extra)
}

/// [`gateway`] with its own MQTT client id, for several instances sharing the uplinks (`db`
/// also names its log file).
pub fn gateway_as(client_id: &str, broker: &BrokerAddr, tenant: &str, db: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("driftless-gateway"));
    cmd.arg("--db").arg(db).args([
        "--broker",
        &url(broker),
        "--client-id",
        client_id,
        "--share-group",
        // A share name cannot hold a wildcard: "+" (every tenant) is "all".
        &format!("gw-{}", tenant.replace('+', "all")),
        "--tenant",
        tenant,
    ]);
    cmd.args(extra);
    let log = db.with_extension(format!("{}.log", std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos())));
    let p = Proc::spawn(cmd, log);
    p.wait_for_log("subscribed to device uplinks", Duration::from_secs(30));
    p
}

/// Starts `driftless-agent run` for a device (a short ack timeout, for tests).
/// Ends the broker session of a gateway instance retired for good, as docs/operations.md
/// tells an operator to: connects once with its client id and a clean session. Until then the
/// broker keeps handing the dead instance its share of the uplinks.
pub fn end_session(broker: &BrokerAddr, client_id: &str) {
    let mut opts = rumqttc::MqttOptions::new(client_id, broker.host.clone(), broker.port);
    opts.set_clean_session(true);
    if let Some((user, password)) = &broker.login {
        opts.set_credentials(user, password);
    }
    let (client, mut connection) = rumqttc::Client::new(opts, 10);
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                let _ = client.disconnect();
            }
            Ok(_) => {}
            // Disconnected (as asked), or the broker could not be reached: nothing more to do.
            Err(_) => return,
        }
    }
}

pub fn agent(db: &Path, broker: &BrokerAddr, tenant: &str, device: &str) -> Proc {
    let mut cmd = Command::new(bin("driftless-agent"));
    cmd.args(["run", "--db"]).arg(db).args(["--broker", &url(broker), "--tenant", tenant, "--device-id", device]);
    if other_build().is_none() {
        cmd.args(["--ack-timeout-ms", "2000"]);
    }
    let log = db.with_extension(format!("{}.log", std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos())));
    Proc::spawn(cmd, log)
}

/// Creates a device database the way an operator would: the app's table, then
/// `driftless-agent init` and `track`.
pub fn cli_device(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.db"));
    crate::exec(&path, crate::SCHEMA);
    let db = path.to_str().expect("utf-8 path");
    agent_ok(&["init", "--db", db, "--role", "field"]);
    agent_ok(&["track", "--db", db, "inspections", "--policy", "stock=counter"]);
    path
}

/// A consistent copy of a database file, as a backup tool would take while it is in use.
pub fn backup(db: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn.execute("VACUUM INTO ?1", [to.to_str().expect("utf-8 path")]).expect("backup");
}

/// Puts a backup back in place of a database (its WAL and shared memory go with it).
pub fn restore(from: &Path, db: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    std::fs::copy(from, db).expect("restore");
}

/// Outbox entries plus journaled rows not yet acknowledged (read without taking part in sync).
pub fn pending(db: &Path) -> u64 {
    let out = agent_ok(&["status", "--db", db.to_str().expect("utf-8 path")]);
    field(&out, "pending changes:").parse().expect("a number")
}

/// A field of `driftless-agent status` output.
pub fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name:?} in {status}"))
}
