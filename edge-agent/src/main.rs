//! `driftless-agent`: the device-side daemon and its setup commands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use driftless_agent::{AgentConfig, SyncMode, run};
use driftless_core::{ColumnPolicy, DeletePolicy, Direction, Store, StoreOptions, TableSpec};

#[derive(Parser, Debug)]
#[command(version, about = "driftless edge agent: syncs a SQLite database through a driftless gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates (or upgrades) the sync metadata in a database.
    Init {
        #[arg(long)]
        db: PathBuf,
        /// Source role of this device, for authority policies.
        #[arg(long, default_value = "")]
        role: String,
    },
    /// Starts (or updates) tracking of a table.
    Track {
        #[arg(long)]
        db: PathBuf,
        table: String,
        /// COLUMN=lww|manual|counter|authority:ROLE>ROLE..., repeatable.
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long, default_value = "both")]
        direction: Direction,
        #[arg(long, default_value = "delete-wins")]
        delete_policy: DeletePolicy,
    },
    /// Stops tracking a table (removes its triggers and sync metadata; the data stays).
    Untrack {
        #[arg(long)]
        db: PathBuf,
        table: String,
    },
    /// Syncs until interrupted.
    Run {
        #[arg(long)]
        db: PathBuf,
        /// mqtt://HOST:PORT
        #[arg(long)]
        broker: String,
        #[arg(long)]
        device_id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The role set by `init`; given here, it must match (a different role is a new
        /// identity: change it with `init --role`).
        #[arg(long)]
        role: Option<String>,
        /// Ship every N milliseconds instead of as soon as changes are written.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        interval_ms: Option<u64>,
        /// How long to wait for the gateway's answer, once a message is sent, before sending it
        /// again (repeats back off).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
        ack_timeout_ms: u64,
        #[arg(long)]
        username: Option<String>,
        #[arg(long, env = "DRIFTLESS_MQTT_PASSWORD")]
        password: Option<String>,
    },
    /// Prints pending changes, last sync, connection and conflicts.
    Status {
        #[arg(long)]
        db: PathBuf,
    },
}

/// Prints a line, ignoring a closed stdout (`driftless-agent status | head -1` must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn open_existing(db: &PathBuf) -> anyhow::Result<Store> {
    if !db.exists() {
        bail!("database {} does not exist (run `driftless-agent init --db {}` first)", db.display(), db.display());
    }
    Ok(Store::open(db, StoreOptions::default())?)
}

fn parse_policy(text: &str) -> anyhow::Result<(String, ColumnPolicy)> {
    let (column, policy) = text.split_once('=').context("expected COLUMN=POLICY")?;
    Ok((column.to_owned(), policy.parse()?))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return ctrl_c.await.unwrap_or(());
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env().add_directive("info".parse()?))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init { db, role } => {
            let before =
                if db.exists() { Some(Store::open(&db, StoreOptions::default())?.role().to_owned()) } else { None };
            let store = Store::open(&db, StoreOptions { role: role.clone(), ..StoreOptions::default() })?;
            match before {
                Some(old) if !role.is_empty() && old != role => say!(
                    "{}: role changed from {old:?} to {role:?}; writes from now on are made as a new node ({})",
                    db.display(),
                    store.node_id()
                ),
                _ => say!("initialized {} (node {}, role {:?})", db.display(), store.node_id(), store.role()),
            }
        }
        Command::Track { db, table, policies, direction, delete_policy } => {
            let mut store = open_existing(&db)?;
            let mut spec = TableSpec::new().direction(direction).delete_policy(delete_policy);
            for p in &policies {
                let (column, policy) = parse_policy(p)?;
                spec = spec.column(&column, policy);
            }
            store.track(&table, spec)?;
            say!("tracking {table}");
        }
        Command::Untrack { db, table } => {
            let mut store = open_existing(&db)?;
            store.untrack(&table)?;
            say!("stopped tracking {table}");
        }
        Command::Run { db, broker, device_id, tenant, role, interval_ms, ack_timeout_ms, username, password } => {
            let mut config = AgentConfig::new(&db, &broker, &tenant, &device_id)?;
            let store = open_existing(&db)?;
            let stored = store.role().to_owned();
            drop(store);
            if let Some(role) = role.filter(|r| *r != stored) {
                bail!(
                    "{} writes as role {stored:?} (set by init); a different role is a new identity for every \
                     write made from now on: run `driftless-agent init --db {} --role {role}` to change it",
                    db.display(),
                    db.display()
                );
            }
            config.mode = interval_ms.map_or(SyncMode::RealTime, |ms| SyncMode::Interval(Duration::from_millis(ms)));
            config.ack_timeout = Duration::from_millis(ack_timeout_ms);
            config.username = username;
            config.password = password;
            config.progress = true;
            tracing::info!(device = %device_id, %tenant, role = %stored, "agent starting");
            run(config, StoreOptions::default(), shutdown_signal()).await?;
        }
        Command::Status { db } => {
            let store = open_existing(&db)?;
            let connected = store.sync_state("connected")?.as_deref() == Some("1");
            let last = store.sync_state("last_sync_ms")?;
            say!("node:            {}", store.node_id());
            say!("role:            {}", store.role());
            say!("tracked tables:  {}", store.tracked().iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", "));
            say!("sync schema:     {}", store.schema()?.map_or("none".to_owned(), |(v, _)| format!("version {v}")));
            say!("pending changes: {}", store.pending_changes()?);
            say!("last sync:       {}", last.map_or("never".to_owned(), |ms| format!("{ms} ms since epoch")));
            say!("connected:       {}", if connected { "yes" } else { "no" });
            say!("conflicts:       {}", store.conflicts()?.len());
            say!("rejected:        {}", store.rejected_count()?);
            if let Some(at) = store.snapshot_position()? {
                say!("snapshot:        {}", snapshot_line(&at.progress));
            }
        }
    }
    Ok(())
}

/// A snapshot's progress as the status shows it: rows and bytes taken in, of how many, and
/// what remains (the totals as the gateway counted them when the snapshot started).
fn snapshot_line(p: &driftless_core::SnapshotProgress) -> String {
    if p.rows_total == 0 {
        return format!("under way: {} rows ({} bytes) so far", p.rows_done, p.bytes_done);
    }
    let left = |done: u64, total: u64| total.saturating_sub(done);
    format!(
        "under way: {} of {} rows ({} left), {} of {} bytes ({} left)",
        p.rows_done,
        p.rows_total,
        left(p.rows_done, p.rows_total),
        p.bytes_done,
        p.bytes_total,
        left(p.bytes_done, p.bytes_total)
    )
}
