//! `driftless-gateway`: parses flags and runs the service until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use driftless_core::protocol::BrokerAddr;
use driftless_gateway::{GatewayConfig, SqliteStore, broker, run};

#[derive(Parser, Debug)]
#[command(version, about = "driftless cloud gateway: merges device changes and fans them out")]
struct Args {
    /// Gateway database file.
    #[arg(long, default_value = "driftless-gateway.db")]
    db: PathBuf,
    /// External broker, mqtt://HOST:PORT. Ignored with --embedded-broker.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Run an MQTT broker in this process (for demos and single machines).
    #[arg(long)]
    embedded_broker: bool,
    /// Where the embedded broker listens.
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
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
    /// Print the device registry (last seen, uplink high-water mark, downlink cursor, lag)
    /// and the dead letters from --db, then exit.
    #[arg(long)]
    report: bool,
}

/// The registry and dead letters, for operators.
fn report(store: &mut SqliteStore) -> anyhow::Result<()> {
    use driftless_gateway::GatewayStore as _;
    use std::io::Write as _;
    let mut out = String::new();
    for tenant in store.tenants()? {
        out.push_str(&format!("tenant {tenant}\n"));
        out.push_str("  device                           last seen (ms)  uplink hwm  cursor      lag\n");
        for d in store.devices(&tenant)? {
            out.push_str(&format!(
                "  {:<32} {:>14}  {:>10}  {:>6}  {:>7}\n",
                d.device, d.last_seen_ms, d.uplink_hwm, d.downlink_cursor, d.lag
            ));
        }
        for l in store.dead_letters(&tenant)? {
            out.push_str(&format!("  dead letter {} from {} at {} ms: {}\n", l.id, l.device, l.received_ms, l.reason));
        }
    }
    // A closed stdout (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env().add_directive("info".parse()?))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut store = SqliteStore::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
    if args.report {
        return report(&mut store);
    }
    let broker_addr: BrokerAddr = if args.embedded_broker {
        broker::start_embedded_broker(args.listen)?;
        BrokerAddr { host: args.listen.ip().to_string(), port: args.listen.port() }
    } else {
        args.broker.parse().map_err(|e| anyhow::anyhow!("--broker {}: {e}", args.broker))?
    };
    let mut config = GatewayConfig::new(broker_addr);
    if let Some(id) = args.client_id {
        config.client_id = id;
    }
    config.share_group = args.share_group;
    config.tenant = args.tenant;
    tracing::info!(db = %args.db.display(), "gateway starting");
    run(config, store, shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    Ok(())
}
