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
    let broker_addr: BrokerAddr = if args.embedded_broker {
        broker::start_embedded_broker(args.listen)?;
        BrokerAddr { host: args.listen.ip().to_string(), port: args.listen.port() }
    } else {
        args.broker.parse().map_err(|e| anyhow::anyhow!("--broker {}: {e}", args.broker))?
    };
    let store = SqliteStore::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
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
