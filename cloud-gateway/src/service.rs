//! The gateway service: connects to the broker, feeds uplinks to the handler, publishes its
//! replies, and acknowledges each uplink to the broker only after its merge committed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_core::protocol::{BrokerAddr, poke_topic, uplink_filter};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{Notify, mpsc};

use crate::error::{Error, Result};
use crate::handler::{HandlerLimits, Outgoing, handle_uplink};
use crate::storage::GatewayStore;

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub broker: BrokerAddr,
    /// MQTT client id; instances sharing the uplink subscription need distinct ids.
    pub client_id: String,
    /// Shared-subscription group: instances in one group split the uplinks.
    pub share_group: String,
    /// The tenant served, or `+` for every tenant.
    pub tenant: String,
    /// Notified each time the uplink subscription is confirmed by the broker.
    pub ready: Arc<Notify>,
    pub limits: HandlerLimits,
}

impl GatewayConfig {
    pub fn new(broker: BrokerAddr) -> GatewayConfig {
        GatewayConfig {
            broker,
            // Stable across restarts of this host's instance, so the broker session (and the
            // uplinks queued in it) is picked up again rather than orphaned.
            client_id: format!("driftless-gateway-{}", host_name()),
            share_group: "driftless-gateways".into(),
            tenant: "+".into(),
            ready: Arc::new(Notify::new()),
            limits: HandlerLimits::default(),
        }
    }
}

/// This machine's host name, for a default client id.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .unwrap_or_else(|| "default".into())
}

fn mqtt_options(config: &GatewayConfig) -> MqttOptions {
    let mut opts = MqttOptions::new(&config.client_id, &config.broker.host, config.broker.port);
    opts.set_keep_alive(Duration::from_secs(15));
    // A persistent session: uplinks that arrive while this instance restarts wait for it.
    opts.set_clean_session(false);
    // Uplinks are acknowledged to the broker only after the merge commits.
    opts.set_manual_acks(true);
    opts.set_max_packet_size(64 << 20, 64 << 20);
    opts.set_inflight(200);
    opts
}

/// Runs the gateway until `shutdown` completes. Every uplink handled before that is merged
/// and acknowledged; one in progress finishes first.
pub async fn run<S: GatewayStore + 'static>(
    config: GatewayConfig,
    store: S,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config), 1_000);
    // Acks and replies are small and awaited by devices: send them without Nagle's delay.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let filter = uplink_filter(&config.share_group, &config.tenant);
    let poller = tokio::spawn(poll_events(eventloop, client.clone(), filter, tx, config.ready.clone()));
    let store = Arc::new(Mutex::new(store));
    let limits = Arc::new(config.limits.clone());
    let mut pokes = Pokes::default();
    let mut poke_tick = tokio::time::interval(POKE_INTERVAL);
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            publish = rx.recv() => {
                let Some(publish) = publish else { break Ok(()) };
                if let Err(e) = handle_with_retry(&client, &store, &limits, &mut pokes, publish).await {
                    break Err(e);
                }
            }
            _ = poke_tick.tick(), if !pokes.pending.is_empty() => {
                if let Err(e) = pokes.flush(&client).await {
                    break Err(e);
                }
            }
        }
    };
    let _ = client.disconnect().await;
    poller.abort();
    result
}

/// Storage errors (a locked database, a full disk being cleared) get a few tries with backoff.
/// If they persist the gateway stops with the error, without acknowledging the message, so the
/// broker redelivers it to the next instance; nothing is half-applied, as each merge is one
/// transaction.
async fn handle_with_retry<S: GatewayStore + 'static>(
    client: &AsyncClient,
    store: &Arc<Mutex<S>>,
    limits: &Arc<HandlerLimits>,
    pokes: &mut Pokes,
    publish: Publish,
) -> Result<()> {
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match handle(client, store, limits, pokes, publish.clone()).await {
            Err(Error::Sqlite(e)) if attempt < 5 => {
                tracing::warn!(attempt, "storage error, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            other => return other,
        }
    }
    Ok(())
}

async fn handle<S: GatewayStore + 'static>(
    client: &AsyncClient,
    store: &Arc<Mutex<S>>,
    limits: &Arc<HandlerLimits>,
    pokes: &mut Pokes,
    publish: Publish,
) -> Result<()> {
    let (store2, limits2, topic, payload) =
        (store.clone(), limits.clone(), publish.topic.clone(), publish.payload.clone());
    // SQLite work is blocking; no lock is held across an await.
    let out = tokio::task::spawn_blocking(move || {
        let mut guard = store2.lock().map_err(|_| Error::WorkerGone)?;
        handle_uplink(&mut *guard, &limits2, &topic, &payload)
    })
    .await
    .map_err(|_| Error::WorkerGone)??;
    for msg in out {
        match msg {
            Outgoing::Reply { topic, payload } => client.publish(topic, QoS::AtLeastOnce, false, payload).await?,
            Outgoing::Poke { tenant } => pokes.request(client, tenant).await?,
        }
    }
    client.ack(&publish).await?;
    Ok(())
}

/// Coalesces pokes: at most one per tenant per [`POKE_INTERVAL`], with a trailing one so the
/// last change is always announced. Under light load every poke goes out at once; under heavy
/// load devices are told a few dozen times a second instead of once per batch.
#[derive(Debug, Default)]
struct Pokes {
    last: HashMap<String, Instant>,
    pending: HashSet<String>,
}

const POKE_INTERVAL: Duration = Duration::from_millis(5);

impl Pokes {
    async fn request(&mut self, client: &AsyncClient, tenant: String) -> Result<()> {
        if self.last.get(&tenant).is_some_and(|t| t.elapsed() < POKE_INTERVAL) {
            self.pending.insert(tenant);
            return Ok(());
        }
        self.send(client, tenant).await
    }

    async fn send(&mut self, client: &AsyncClient, tenant: String) -> Result<()> {
        client.publish(poke_topic(&tenant), QoS::AtMostOnce, false, Vec::new()).await?;
        self.last.insert(tenant, Instant::now());
        Ok(())
    }

    async fn flush(&mut self, client: &AsyncClient) -> Result<()> {
        for tenant in std::mem::take(&mut self.pending) {
            self.send(client, tenant).await?;
        }
        Ok(())
    }
}

/// Drives the MQTT connection: forwards uplinks, resubscribes after every connect, and
/// reconnects with capped exponential backoff. Never publishes (that would deadlock).
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    tx: mpsc::UnboundedSender<Publish>,
    ready: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                tracing::info!("gateway connected to the broker");
                // Subscribing from here would await the request channel this task drains.
                let (client, filter) = (client.clone(), filter.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::error!("subscribe failed: {e}");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!("gateway subscribed to device uplinks");
                ready.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("broker connection: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
