//! `driftless-gateway`: parses flags and runs the service until SIGINT or SIGTERM, or prints
//! a report / purges dead letters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use driftless_core::protocol::BrokerAddr;
use driftless_gateway::dynsec::{self, Dynsec};
use driftless_gateway::quota::{QuotaConfig, Rate};
use driftless_gateway::storage::chains::scope_of;
use driftless_gateway::storage::{PgRegistry, SqliteRegistry};
use driftless_gateway::{GatewayConfig, PgStore, SqliteStore, broker, report, run};

#[derive(Parser, Debug)]
#[command(version, about = "driftless cloud gateway: merges device changes and fans them out")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Registers, removes and lists devices, and sets their broker credentials.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Prints the device registry, the store's epoch, clock skew and the newest dead letters.
    Report(ReportArgs),
    /// Deletes dead letters older than a number of days.
    PurgeDeadLetters {
        #[arg(long, required_unless_present = "store")]
        db: Option<PathBuf>,
        /// The PostgreSQL store instead of a file.
        #[arg(long, env = "DRIFTLESS_STORE")]
        store: Option<String>,
        #[arg(long)]
        older_than_days: u64,
    },
}

/// Where the registry lives, and the broker whose credentials and access to set.
#[derive(Args, Debug)]
struct RegistryArgs {
    /// Gateway database file (created if missing).
    #[arg(long, required_unless_present = "store")]
    db: Option<PathBuf>,
    /// The PostgreSQL store instead of a file.
    #[arg(long, env = "DRIFTLESS_STORE")]
    store: Option<String>,
    /// Mosquitto with its dynamic-security plugin, as its admin
    /// (mqtts://ADMIN:PASSWORD@HOST:PORT): devices get broker credentials and access to their
    /// own topics only. Without it only the gateway's registry changes.
    #[arg(long, env = "DRIFTLESS_BROKER_ADMIN")]
    broker_admin: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Registers a device with its role and prints its broker credentials (shown once). The
    /// first device registered in a tenant closes it to every unregistered one. Adding a
    /// device again changes its role and issues a new password.
    Add {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        /// The role its writes carry (authority policies rank roles); none by default.
        #[arg(long, default_value = "")]
        role: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Removes a device: the gateway ignores it from now on and the broker cuts it off.
    Remove {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Sets a registered device's scope parameters (`--param region=north`, repeated; none
    /// clears them): the rows of scoped tables it holds follow. The device drops the rows of
    /// its old scope and fetches its new one at its next pull.
    Params {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        /// NAME=VALUE, as the schema's scopes name them (`:region`).
        #[arg(long = "param")]
        params: Vec<String>,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Lets a device the gateway cut off at the broker for flooding connect again now.
    Enable {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        device: String,
        #[arg(long, env = "DRIFTLESS_BROKER_ADMIN")]
        broker_admin: String,
    },
    /// Lists registered devices (removed ones too).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Gives a gateway instance broker credentials that read every uplink and write every
    /// downlink (prints the password once).
    AddGateway {
        /// Its broker user name.
        #[arg(long)]
        name: String,
        #[arg(long, env = "DRIFTLESS_BROKER_ADMIN")]
        broker_admin: String,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Gateway database file (the embedded SQLite store).
    #[arg(long, default_value = "driftless-gateway.db")]
    db: PathBuf,
    /// A PostgreSQL database to keep everything in instead (postgres://USER@HOST/DB); several
    /// instances may share it.
    #[arg(long, env = "DRIFTLESS_STORE")]
    store: Option<String>,
    /// External broker, mqtt://HOST:PORT. Ignored with --embedded-broker.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Run an MQTT broker in this process (for demos and single machines).
    #[arg(long)]
    embedded_broker: bool,
    /// Where the embedded broker listens.
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
    /// The embedded broker lets in only registered devices, with the password `device add`
    /// printed, and holds each to its own topics (as --broker-admin has Mosquitto do).
    #[arg(long, requires = "embedded_broker")]
    embedded_broker_auth: bool,
    /// The embedded broker serves TLS with this certificate chain (PEM).
    #[arg(long, requires_all = ["embedded_broker", "embedded_broker_key"])]
    embedded_broker_cert: Option<PathBuf>,
    /// The private key (PEM) of --embedded-broker-cert.
    #[arg(long, requires = "embedded_broker_cert")]
    embedded_broker_key: Option<PathBuf>,
    /// Clients of the embedded broker must present a certificate of this CA (mutual TLS).
    #[arg(long, requires = "embedded_broker_cert")]
    embedded_broker_client_ca: Option<PathBuf>,
    /// MQTT client id: distinct per instance and stable across its restarts, so the broker
    /// keeps its session (and the uplinks that arrive while it restarts).
    #[arg(long)]
    client_id: Option<String>,
    /// Shared-subscription group; instances in one group split the uplinks.
    #[arg(long, default_value = "driftless-gateways")]
    share_group: String,
    /// Serve one tenant only (default: every tenant).
    #[arg(long, default_value = "+")]
    tenant: String,
    /// Keep dead letters this many days (0: forever).
    #[arg(long, default_value_t = 30)]
    dead_letter_retention_days: u64,
    /// How far ahead of this gateway's clock a write's timestamp may be before it is bounded.
    #[arg(long, default_value_t = 300_000)]
    max_clock_drift_ms: u64,
    /// The declared sync schema (TOML) to serve and enforce. A new version is checked against
    /// the current one and refused if devices could not follow it; without this flag the
    /// version loaded last is served.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Same as the `report` command with its defaults (kept for scripts).
    #[arg(long)]
    report: bool,
    /// Serve only registered devices (`device add`), in every tenant. Without it a tenant
    /// with no registered device is open to any (for development).
    #[arg(long)]
    require_registration: bool,
    /// After this store lost changes (a restored backup), how long each device may send
    /// back other devices' writes the store cannot check, from its first handshake.
    #[arg(long, default_value_t = 24)]
    recovery_window_hours: u64,
    /// Messages a second each device may send (0: no limit); over it, messages are dropped
    /// unanswered and the device is told to slow down.
    #[arg(long, default_value_t = 100.0)]
    device_messages_per_s: f64,
    /// Messages a device may send at once above its rate.
    #[arg(long, default_value_t = 1_000.0)]
    device_burst: f64,
    /// MiB a second each device may send (0: no limit); its burst is 16 times this, and
    /// never less than the largest message.
    #[arg(long, default_value_t = 8.0)]
    device_mib_per_s: f64,
    /// Messages a second all devices of one tenant may send (0: no limit); burst twice this.
    #[arg(long, default_value_t = 20_000.0)]
    tenant_messages_per_s: f64,
    /// Mosquitto's dynamic-security admin (mqtts://ADMIN:PASSWORD@HOST:PORT): a device that
    /// goes on flooding after being told to slow down is cut off at the broker for a while.
    #[arg(long, env = "DRIFTLESS_BROKER_ADMIN")]
    broker_admin: Option<String>,
    /// How long a flooding device is kept off the broker.
    #[arg(long, default_value_t = 60)]
    cut_off_seconds: u64,
}

/// The quotas the flags ask for (0: no limit).
fn quotas(args: &RunArgs, max_message: usize) -> QuotaConfig {
    let rate = |per_second: f64, burst: f64| {
        if per_second > 0.0 { Rate { per_second, burst: burst.max(1.0) } } else { Rate::UNLIMITED }
    };
    let mib = 1024.0 * 1024.0;
    let bytes = args.device_mib_per_s * mib;
    QuotaConfig {
        device_messages: rate(args.device_messages_per_s, args.device_burst),
        device_bytes: rate(bytes, (16.0 * bytes).max(2.0 * max_message as f64)),
        tenant_messages: rate(args.tenant_messages_per_s, 2.0 * args.tenant_messages_per_s),
        ..QuotaConfig::default()
    }
}

#[derive(Args, Debug)]
struct ReportArgs {
    #[arg(long, required_unless_present = "store")]
    db: Option<PathBuf>,
    /// The PostgreSQL store instead of a file.
    #[arg(long, env = "DRIFTLESS_STORE")]
    store: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only dead letters from this device.
    #[arg(long)]
    device: Option<String>,
    /// Only dead letters whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters received in the last this many hours.
    #[arg(long)]
    since_hours: Option<u64>,
    /// How many dead letters to list (newest first); the rest are counted by reason.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

/// The store a command that only looks (or purges) works on: an existing file, or PostgreSQL.
/// Called off the async threads (the PostgreSQL client blocks).
fn existing_store(
    db: Option<&PathBuf>,
    store: Option<&str>,
) -> anyhow::Result<Box<dyn driftless_gateway::GatewayStore>> {
    Ok(match (store, db) {
        (Some(url), _) => Box::new(PgStore::open(url).context("opening the PostgreSQL store")?),
        (None, Some(db)) => Box::new(SqliteStore::open_existing(db)?),
        (None, None) => anyhow::bail!("--db FILE or --store URL"),
    })
}

fn print_report(args: ReportArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut store = existing_store(args.db.as_ref(), args.store.as_deref())?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let filter = driftless_gateway::storage::DeadLetterFilter {
        tenant: args.tenant,
        device: args.device,
        reason: args.reason,
        since_ms: args.since_hours.map(|h| now_ms - (h as i64) * 3_600_000),
        limit: args.limit,
    };
    let text = report::render(&mut *store, &filter)?;
    // A closed stdout (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env().add_directive("info".parse()?))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Device(command)) => return devices(command).await,
        Some(Command::Report(args)) => return tokio::task::spawn_blocking(move || print_report(args)).await?,
        Some(Command::PurgeDeadLetters { db, store, older_than_days }) => {
            let purged = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
                let mut store = existing_store(db.as_ref(), store.as_deref())?;
                let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
                Ok(store.purge_dead_letters(now_ms - (older_than_days as i64) * 86_400_000)?)
            })
            .await??;
            println!("deleted {purged} dead letters older than {older_than_days} days");
            return Ok(());
        }
        None => {}
    }
    let args = cli.run;
    if args.report {
        let defaults = ReportArgs {
            db: Some(args.db),
            store: args.store,
            tenant: None,
            device: None,
            reason: None,
            since_hours: None,
            limit: 20,
        };
        return tokio::task::spawn_blocking(move || print_report(defaults)).await?;
    }
    match args.store.clone() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            // The PostgreSQL client blocks: opened off the async threads.
            let store = tokio::task::spawn_blocking(move || PgStore::open(&url))
                .await?
                .context("opening the PostgreSQL store")?;
            serve(args, store, None).await
        }
        Some(other) => anyhow::bail!("--store {other}: only postgres:// URLs (the default store is --db FILE)"),
        None => {
            let store = SqliteStore::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
            let watch = Some(args.db.clone());
            serve(args, store, watch).await
        }
    }
}

/// Loads the schema if one was given, then runs the gateway on `store` until a signal.
async fn serve<S: driftless_gateway::GatewayStore + 'static>(
    args: RunArgs,
    store: S,
    watch: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut store = store;
    if let Some(path) = args.schema.clone() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let (back, version) = tokio::task::spawn_blocking(move || {
            let version = store.install_schema(&text);
            (store, version)
        })
        .await?;
        store = back;
        let version = version.with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(version, schema = %path.display(), "sync schema loaded");
    }
    let mut config = GatewayConfig::new(BrokerAddr::plain("127.0.0.1", 1883));
    if let Some(id) = args.client_id.clone() {
        config.client_id = id;
    }
    config.broker = if args.embedded_broker {
        embedded_broker(&args, &config.client_id).await?
    } else {
        args.broker.parse().map_err(|e| anyhow::anyhow!("--broker {}: {e}", args.broker))?
    };
    config.quotas = quotas(&args, config.handler.max_uplink_bytes);
    config.watch = watch;
    config.share_group = args.share_group;
    config.tenant = args.tenant;
    config.handler.max_clock_drift_ms = args.max_clock_drift_ms;
    config.handler.require_registration = args.require_registration;
    if let Some(url) = &args.broker_admin {
        config.broker_admin = Some(url.parse().map_err(|e| anyhow::anyhow!("--broker-admin: {e}"))?);
    }
    config.cut_off = Duration::from_secs(args.cut_off_seconds);
    config.handler.recovery_window_ms = args.recovery_window_hours.saturating_mul(3_600_000);

    config.dead_letter_retention =
        (args.dead_letter_retention_days > 0).then(|| Duration::from_secs(args.dead_letter_retention_days * 86_400));
    tracing::info!(store = %args.store.as_deref().map_or_else(|| args.db.display().to_string(), redact), "gateway starting");
    run(config, store, shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Starts the embedded broker: open, or behind its guard with TLS or device credentials.
/// Returns where this process's gateway reaches it.
async fn embedded_broker(args: &RunArgs, gateway_client_id: &str) -> anyhow::Result<BrokerAddr> {
    let tls = match (&args.embedded_broker_cert, &args.embedded_broker_key) {
        (Some(cert), Some(key)) => Some(broker::server_tls(cert, key, args.embedded_broker_client_ca.as_deref())?),
        _ => None,
    };
    if tls.is_none() && !args.embedded_broker_auth {
        broker::start_embedded_broker(args.listen)?;
        return Ok(BrokerAddr::plain(args.listen.ip().to_string(), args.listen.port()));
    }
    let registry: Option<std::sync::Arc<dyn broker::Registry>> = match (args.embedded_broker_auth, &args.store) {
        (false, _) => None,
        (true, Some(url)) => {
            let url = url.clone();
            let reader = tokio::task::spawn_blocking(move || PgRegistry::open(&url)).await?;
            Some(std::sync::Arc::new(reader.context("the registry for the embedded broker")?))
        }
        (true, None) => Some(std::sync::Arc::new(SqliteRegistry::open(&args.db)?)),
    };
    let front = broker::Front { tls, registry, reserved: vec![gateway_client_id.to_owned()] };
    let listen = args.listen;
    Ok(tokio::task::spawn_blocking(move || broker::start_guarded_broker(listen, front)).await??)
}

fn now_ms() -> anyhow::Result<i64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

/// The store the registry is kept in, created if missing. Called off the async threads.
fn registry_store(at: &RegistryArgs) -> anyhow::Result<Box<dyn driftless_gateway::GatewayStore>> {
    Ok(match (&at.store, &at.db) {
        (Some(url), _) => Box::new(PgStore::open(url).context("opening the PostgreSQL store")?),
        (None, Some(db)) => Box::new(SqliteStore::open(db).with_context(|| format!("opening {}", db.display()))?),
        (None, None) => anyhow::bail!("--db FILE or --store URL"),
    })
}

/// Runs `f` on the registry's store, off the async threads.
async fn on_store<T: Send + 'static>(
    at: &RegistryArgs,
    f: impl FnOnce(&mut dyn driftless_gateway::GatewayStore) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (db, store) = (at.db.clone(), at.store.clone());
    tokio::task::spawn_blocking(move || {
        let mut store = registry_store(&RegistryArgs { db, store, broker_admin: None })?;
        f(&mut *store)
    })
    .await?
}

async fn dynsec(url: &str) -> anyhow::Result<Dynsec> {
    let admin: BrokerAddr = url.parse().map_err(|e| anyhow::anyhow!("--broker-admin: {e}"))?;
    Dynsec::connect(&admin).await.context("connecting to the broker as its dynamic-security admin")
}

async fn devices(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add { tenant, device, role, at } => {
            for id in [&tenant, &device] {
                anyhow::ensure!(
                    driftless_core::protocol::valid_id(id),
                    "{id:?}: use 1-128 characters without / + # or a leading $"
                );
            }
            // The broker first: a registered device the broker would not let in helps no one.
            let password = dynsec::new_password()?;
            if let Some(url) = &at.broker_admin {
                dynsec(url).await?.add_device(&tenant, &device, &password).await?;
            }
            // The registry keeps a hash for the embedded broker (--embedded-broker-auth).
            let secret = broker::credentials::hash(&password)?;
            let (t, d, r) = (tenant.clone(), device.clone(), role.clone());
            let scope = on_store(&at, move |s| {
                s.register_device(&t, &d, &r, Some(&secret), now_ms()?)?;
                Ok(scope_of(s, &t, &d)?)
            })
            .await?;
            println!("registered device {device:?} in tenant {tenant:?} with role {role:?}");
            println!("broker username: {}", dynsec::device_username(&tenant, &device));
            println!("broker password: {password}");
            println!("(shown once: only a hash is kept; add the device again for a new one)");
            if at.broker_admin.is_none() {
                println!(
                    "no --broker-admin: the embedded broker (--embedded-broker-auth) checks this password; \
                     an external broker needs the credentials and topic access set yourself"
                );
            }
            // Added again, its role was made anew: its scope's topic too, if it has one (after
            // the password is shown: it works whatever happens here).
            if let (Some(url), Some(scope)) = (&at.broker_admin, scope) {
                let granted =
                    async { anyhow::Ok(dynsec(url).await?.follow_scope(&tenant, &device, Some(&scope)).await?) };
                granted.await.context(
                    "granting the device its scope's topic: run `device params` with its current --param values \
                     (`device list` shows them)",
                )?;
            }
        }
        DeviceCommand::Remove { tenant, device, at } => {
            // The registry first: from then on the gateway ignores the device whatever the broker does.
            let (t, d) = (tenant.clone(), device.clone());
            let was = on_store(&at, move |s| Ok(s.remove_device(&t, &d, now_ms()?)?)).await?;
            if let Some(url) = &at.broker_admin {
                dynsec(url).await?.remove_device(&tenant, &device).await?;
            }
            match was {
                true => println!("removed device {device:?} of tenant {tenant:?}"),
                false => println!("device {device:?} of tenant {tenant:?} was not registered"),
            }
        }
        DeviceCommand::Params { tenant, device, params, at } => {
            let mut set = driftless_gateway::storage::Params::new();
            for p in &params {
                let (name, value) =
                    p.split_once('=').ok_or_else(|| anyhow::anyhow!("--param {p:?}: use NAME=VALUE"))?;
                set.insert(name.trim().to_owned(), value.to_owned());
            }
            let (t, d, shown) = (tenant.clone(), device.clone(), format!("{set:?}"));
            // The broker around the registry: first it takes away every scope topic, last it
            // grants the new one, so a step that fails leaves the device less access, never
            // its old scope's rows.
            let mut admin = match &at.broker_admin {
                Some(url) => Some(dynsec(url).await?),
                None => None,
            };
            if let Some(admin) = admin.as_mut() {
                admin.follow_scope(&tenant, &device, None).await?;
            }
            let (set, now) = on_store(&at, move |s| {
                let set = s.set_params(&t, &d, &set)?;
                Ok((set, scope_of(s, &t, &d)?))
            })
            .await?;
            anyhow::ensure!(set, "device {device:?} of tenant {tenant:?} is not registered (device add)");
            // The device is told its new scope by the gateway, and subscribes to its topic
            // once the broker lets it.
            if let Some(admin) = admin.as_mut() {
                admin.follow_scope(&tenant, &device, now.as_deref()).await?;
            }
            println!("device {device:?} of tenant {tenant:?} has scope parameters {shown}");
        }
        DeviceCommand::List { tenant, at } => {
            let listed = on_store(&at, move |s| Ok(s.registry(tenant.as_deref())?)).await?;
            println!("{:<20} {:<24} {:<12} {:<14} {:<14} params", "tenant", "device", "role", "added_ms", "removed_ms");
            for d in listed {
                let removed = d.removed_ms.map_or_else(|| "-".to_owned(), |ms| ms.to_string());
                let params: Vec<String> = d.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<20} {:<24} {:<12} {:<14} {removed:<14} {}",
                    d.tenant,
                    d.device,
                    d.role,
                    d.added_ms,
                    params.join(" ")
                );
            }
        }
        DeviceCommand::Enable { tenant, device, broker_admin } => {
            dynsec(&broker_admin).await?.enable_device(&tenant, &device).await?;
            println!("device {device:?} of tenant {tenant:?} may connect again");
        }
        DeviceCommand::AddGateway { name, broker_admin } => {
            let password = dynsec::new_password()?;
            dynsec(&broker_admin).await?.add_gateway(&name, &password).await?;
            println!("broker username: {name}");
            println!("broker password: {password}");
        }
    }
    Ok(())
}

/// A store URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
