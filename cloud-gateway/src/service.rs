//! The gateway service: connects to the broker, feeds uplinks to the handler, publishes its
//! replies, and acknowledges each uplink to the broker only after its merge committed.
//!
//! No message can stop the gateway. A failure of the gateway's own while handling one (a
//! storage error that outlasts the retries, a panic) is logged and counted against the
//! message's content; the message is answered with nothing, so the device keeps it and sends
//! it again later. A message that keeps failing, or that crashed the process (the broker then
//! hands it back to the persistent session with the DUP flag), is set aside after
//! [`MAX_ATTEMPTS`] and only tried again every [`QUARANTINE`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_core::LogCursor;
use driftless_core::protocol::{BrokerAddr, encode_announcement, poke_topic, schema_topic, uplink_filter};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{Notify, mpsc};

use crate::acks::{Acks, Ticket};
use crate::error::{Error, Result};
use crate::fair::FairQueue;
use crate::handler::{HandlerConfig, Outgoing};
use crate::quota::{QuotaConfig, Quotas};

mod guard;
mod uplinks;
use crate::storage::GatewayStore;
use guard::{Guard, MAX_QUEUED};
use uplinks::{GROUP_PER_DEVICE, Pace, handle_group};

/// Attempts at a message that fails every time before it is set aside.
pub const MAX_ATTEMPTS: u32 = 3;
/// How long a message that kept failing is set aside before one more attempt.
pub const QUARANTINE: Duration = Duration::from_secs(600);
/// The largest packet MQTT can carry: the gateway reads whatever a broker delivers, so no
/// message can wedge its session, and refuses what is over its own limit by reference.
const MQTT_MAX_PACKET: usize = 268_435_455;

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
    pub handler: HandlerConfig,
    /// Dead letters older than this are deleted (checked hourly); `None` keeps them.
    pub dead_letter_retention: Option<Duration>,
    /// The store's database file, watched for writes other programs make to its real tables
    /// (`None`: not watched; such writes are taken in with the next merge of their tenant).
    pub watch: Option<std::path::PathBuf>,
    /// Messages and bytes each device and each tenant may send.
    pub quotas: QuotaConfig,
    /// Mosquitto's dynamic-security admin: a device that goes on flooding after being told to
    /// slow down is disconnected and kept out for [`GatewayConfig::cut_off`]. `None`: the
    /// gateway only drops its messages.
    pub broker_admin: Option<BrokerAddr>,
    pub cut_off: Duration,
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
            handler: HandlerConfig::default(),
            dead_letter_retention: Some(Duration::from_secs(30 * 86_400)),
            watch: None,
            quotas: QuotaConfig::default(),
            broker_admin: None,
            cut_off: Duration::from_secs(60),
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

/// The broker connection's options: credentials and TLS from the broker URL (read once, so
/// a bad certificate file stops the gateway at start rather than at a reconnect).
fn base_options(config: &GatewayConfig) -> Result<MqttOptions> {
    driftless_core::transport::mqtt_options(&config.client_id, &config.broker)
        .map_err(|e| Error::Config(format!("broker {}: {e}", config.broker)))
}

fn mqtt_options(base: &MqttOptions, clean_session: bool) -> MqttOptions {
    let mut opts = base.clone();
    opts.set_keep_alive(Duration::from_secs(15));
    // A persistent session: uplinks that arrive while this instance restarts wait for it.
    opts.set_clean_session(clean_session);
    // Uplinks are acknowledged to the broker only after the merge commits.
    opts.set_manual_acks(true);
    opts.set_max_packet_size(MQTT_MAX_PACKET, 64 << 20);
    opts.set_inflight(200);
    opts
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs the gateway until `shutdown` completes; a group in progress finishes first. An
/// uplink is acknowledged to the broker only after it was merged (or refused), in arrival
/// order; what is not acknowledged by then (behind one still waiting) the broker delivers
/// again, and merging it again changes nothing.
pub async fn run<S: GatewayStore + 'static>(
    config: GatewayConfig,
    store: S,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let base = base_options(&config)?;
    let (client, eventloop) = AsyncClient::new(mqtt_options(&base, false), 1_000);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let filter = uplink_filter(&config.share_group, &config.tenant);
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acks = Acks::default();
    let guard = Guard {
        acks: acks.clone(),
        quotas: Quotas::new(config.quotas.clone()),
        admin: config.broker_admin.clone(),
        cut_off: config.cut_off,
        queued: queued.clone(),
    };
    let poller = tokio::spawn(poll_events(eventloop, client.clone(), base, filter, tx, guard, config.ready.clone()));
    let store = Arc::new(Mutex::new(store));
    announce_schema(&client, &store, &config).await?;
    let handler = Arc::new(config.handler.clone());
    let mut pokes = Pokes::default();
    let mut pace = Pace::default();
    // Uplinks taken one device at a time in turn (by topic: one per device).
    let mut waiting: FairQueue<(Ticket, Publish)> = FairQueue::default();
    // Writes to the real tables by other programs wake the gateway (inotify; no polling).
    let (wake, mut cloud_writes) = mpsc::channel::<()>(1);
    let _watcher = match &config.watch {
        Some(db) => Some(watch_database(db, wake.clone())?),
        None => None,
    };
    // A database that notifies commits (PostgreSQL's LISTEN) wakes the gateway itself.
    let notified = wake.clone();
    let _listener = blocking(&store, move |s| {
        s.watch_cloud_writes(Box::new(move || {
            let _ = notified.try_send(());
        }))
    })
    .await?;
    let _ = wake.try_send(());
    let mut recheck: Option<tokio::time::Instant> = None;
    let mut backstop = tokio::time::interval(Duration::from_secs(10));
    let mut poke_tick = tokio::time::interval(POKE_INTERVAL);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(3_600));
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            // Before uplinks: steady uplinks must not hold cloud writes back.
            woke = cloud_writes.recv() => {
                if woke.is_none() {
                    break Ok(());
                }
                // The intake waits for the writer's lock, so a commit still under way when the
                // file changed is seen; one more look a little later is the backstop.
                recheck = Some(tokio::time::Instant::now() + COMMIT_RECHECK);
                if let Err(e) = take_in_cloud_writes(&store, &client, &mut pokes).await {
                    break Err(e);
                }
            }
            () = async { tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)).await }, if recheck.is_some() => {
                recheck = None;
                if let Err(e) = take_in_cloud_writes(&store, &client, &mut pokes).await {
                    break Err(e);
                }
            }
            // A backstop for a wake-up the file system did not deliver.
            _ = backstop.tick() => {
                if let Err(e) = take_in_cloud_writes(&store, &client, &mut pokes).await {
                    break Err(e);
                }
            }
            publish = rx.recv(), if waiting.is_empty() => {
                let Some(publish) = publish else { break Ok(()) };
                waiting.push(&publish.1.topic.clone(), publish);
            }
            _ = poke_tick.tick(), if !pokes.pending.is_empty() => {
                if let Err(e) = pokes.flush(&client).await {
                    break Err(e);
                }
            }
            _ = housekeeping.tick() => {
                if let Some(keep) = config.dead_letter_retention {
                    purge_dead_letters(&store, keep).await;
                }
            }
            // Last, so nothing above waits behind a steady stream of uplinks.
            () = std::future::ready(()), if !waiting.is_empty() => {
                while let Ok(publish) = rx.try_recv() {
                    waiting.push(&publish.1.topic.clone(), publish);
                }
                // What waits now is one group, as much as fits the time budget: merged, synced
                // once, then answered.
                let group = waiting.take_group(pace.group_size(), GROUP_PER_DEVICE);
                queued.fetch_sub(group.len(), std::sync::atomic::Ordering::Relaxed);
                let (n, began) = (group.len(), std::time::Instant::now());
                if let Err(e) = handle_group(&client, &store, &handler, &mut pokes, &acks, group).await {
                    break Err(e);
                }
                pace.took(n, began.elapsed());
            }
        }
    };
    let _ = client.disconnect().await;
    poller.abort();
    // A store may write what it kept in memory, and close its connections, by blocking.
    let _ = tokio::task::spawn_blocking(move || {
        let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = guard.close() {
            tracing::warn!("closing the store: {e}");
        }
    })
    .await;
    result
}

/// Runs `f` on the store on a blocking thread: store calls block (file or network I/O).
async fn blocking<S: GatewayStore + 'static, T: Send + 'static>(
    store: &Arc<Mutex<S>>,
    f: impl FnOnce(&mut S) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    })
    .await
    .map_err(|e| Error::WorkerGone(e.to_string()))?
}

/// When the gateway looks for cloud writes again after a write to the database file.
const COMMIT_RECHECK: Duration = Duration::from_millis(25);

/// Takes in writes other programs made to the real tables, and publishes them to their
/// tenants' devices. A failure of the store leaves them in the journal, for the next wake-up
/// or merge.
async fn take_in_cloud_writes<S: GatewayStore + 'static>(
    store: &Arc<Mutex<S>>,
    client: &AsyncClient,
    pokes: &mut Pokes,
) -> Result<()> {
    let store = store.clone();
    let began = std::time::Instant::now();
    let ingested = tokio::task::spawn_blocking(move || {
        let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (tenant, entry) in guard.ingest_cloud_writes(now_ms())? {
            tracing::debug!(%tenant, "took in writes made to the cloud tables");
            // The entry is logged: not published (no epoch to publish it under, a read that
            // failed), its devices find it by the gap it leaves, the poke, or their next pull.
            let entries = std::slice::from_ref(&entry);
            match guard.epoch(&tenant).map(|epoch| crate::handler::feed(&mut *guard, epoch, &tenant, entries)) {
                Ok(publishes) => out.extend(publishes),
                Err(e) => {
                    tracing::warn!(%tenant, "not published (devices will pull it): {e}");
                    out.push(Outgoing::Poke { tenant, head: entry.cursor });
                }
            }
        }
        Ok::<_, Error>(out)
    })
    .await
    .map_err(|e| Error::WorkerGone(e.to_string()))?;
    match ingested {
        Ok(out) => {
            for msg in out {
                send(client, pokes, msg).await?;
            }
        }
        Err(e) => tracing::error!("taking in writes made to the cloud tables failed: {e}"),
    }
    if began.elapsed() >= uplinks::SLOW_GROUP {
        tracing::warn!(ms = began.elapsed().as_millis() as u64, "a slow look for writes made to the cloud tables");
    }
    Ok(())
}

/// Publishes one of the handler's messages: a reply at least once; a scope's change at most
/// once (devices keep no broker session to hold it, a device that misses one finds the gap
/// and pulls, and acknowledging every copy would double the broker's work per device); a
/// poke coalesced.
async fn send(client: &AsyncClient, pokes: &mut Pokes, msg: Outgoing) -> Result<()> {
    match msg {
        Outgoing::Reply { topic, payload } => client.publish(topic, QoS::AtLeastOnce, false, payload).await?,
        Outgoing::Feed { topic, payload } => client.publish(topic, QoS::AtMostOnce, false, payload).await?,
        Outgoing::Poke { tenant, head } => pokes.request(client, tenant, head).await?,
    }
    Ok(())
}

/// Watches `db` (and its WAL) and sends a unit on `tx` after writes; sends coalesce while one
/// is pending. The watcher stops when dropped.
fn watch_database(db: &std::path::Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let name = db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An error (a lost event, an overflowing queue) may hide a write: look anyway.
        let Ok(event) = event else {
            let _ = tx.try_send(());
            return;
        };
        if !matches!(event.kind, notify::EventKind::Modify(_) | notify::EventKind::Create(_) | notify::EventKind::Other)
        {
            return;
        }
        if event.paths.iter().any(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&name))) {
            // A full channel already holds a wake-up; that one will see this write too.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| Error::Watch(e.to_string()))?;
    let dir = db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    watcher.watch(dir, notify::RecursiveMode::NonRecursive).map_err(|e| Error::Watch(e.to_string()))?;
    Ok(watcher)
}

/// Keeps the schema this gateway serves as the retained message of each tenant's schema
/// topic, so running devices follow a new version as soon as it is loaded, and a device that
/// subscribes later gets it at once.
async fn announce_schema<S: GatewayStore + 'static>(
    client: &AsyncClient,
    store: &Arc<Mutex<S>>,
    config: &GatewayConfig,
) -> Result<()> {
    let only = (config.tenant != "+").then(|| config.tenant.clone());
    let found = blocking(store, move |store| {
        let Some(served) = store.served_schema()? else { return Ok(None) };
        let tenants = match only {
            Some(tenant) => vec![tenant],
            None => store.tenants()?,
        };
        // Their cloud tables exist from now on, for SQL clients too.
        for tenant in &tenants {
            store.prepare_tenant(tenant)?;
        }
        Ok(Some((served, tenants)))
    })
    .await?;
    let Some((served, tenants)) = found else { return Ok(()) };
    let payload = served.message().encode();
    for tenant in tenants {
        client.publish(schema_topic(&tenant), QoS::AtLeastOnce, true, payload.clone()).await?;
    }
    tracing::info!(version = served.version, "serving sync schema");
    Ok(())
}

async fn purge_dead_letters<S: GatewayStore + 'static>(store: &Arc<Mutex<S>>, keep: Duration) {
    let store = store.clone();
    let before = now_ms() as i64 - keep.as_millis() as i64;
    let purged = tokio::task::spawn_blocking(move || {
        let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
        guard.purge_dead_letters(before)
    })
    .await;
    match purged {
        Ok(Ok(n)) if n > 0 => tracing::info!(purged = n, "dead letters past their retention deleted"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("purging dead letters: {e}"),
        Err(e) => tracing::warn!("purging dead letters: {e}"),
    }
}

/// Coalesces pokes, which only devices of versions before the scope feeds pull on: at most
/// one per tenant per [`POKE_INTERVAL`], with a trailing one so the last change is always
/// announced.
#[derive(Debug, Default)]
struct Pokes {
    last: HashMap<String, Instant>,
    pending: HashSet<String>,
    /// The newest entry announced or to announce, per tenant.
    heads: HashMap<String, LogCursor>,
}

const POKE_INTERVAL: Duration = Duration::from_secs(1);

impl Pokes {
    async fn request(&mut self, client: &AsyncClient, tenant: String, head: LogCursor) -> Result<()> {
        let known = self.heads.entry(tenant.clone()).or_default();
        if head.position > known.position {
            *known = head;
        }
        if self.last.get(&tenant).is_some_and(|t| t.elapsed() < POKE_INTERVAL) {
            self.pending.insert(tenant);
            return Ok(());
        }
        self.send(client, tenant).await
    }

    async fn send(&mut self, client: &AsyncClient, tenant: String) -> Result<()> {
        let head = self.heads.get(&tenant).copied().unwrap_or_default();
        client.publish(poke_topic(&tenant), QoS::AtMostOnce, false, encode_announcement(head)).await?;
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

/// Whether a connection error came from what the broker sent (a packet the client could not
/// take) rather than from the network.
fn is_protocol_error(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::MqttState(rumqttc::StateError::Deserialization(_)))
}

/// Drives the MQTT connection: forwards uplinks, resubscribes after every connect, and
/// reconnects with capped exponential backoff. Never publishes (that would deadlock).
///
/// If the broker keeps handing back something the client cannot take right after connecting
/// (so the persistent session would replay it forever), the gateway reconnects once with a
/// clean session: the broker drops what it queued for this instance, and devices resend
/// whatever was not acknowledged.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    base: MqttOptions,
    filter: String,
    tx: mpsc::UnboundedSender<(Ticket, Publish)>,
    mut guard: Guard,
    ready: Arc<Notify>,
) {
    let mut net = rumqttc::NetworkOptions::new();
    // Acks and replies are small and awaited by devices: send them without Nagle's delay.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let mut backoff = Duration::from_millis(100);
    let mut failures_since_delivery = 0u32;
    loop {
        let event = eventloop.poll().await;
        match &event {
            // What was pending belongs to the old connection: the broker delivers it again.
            Ok(Event::Incoming(Packet::ConnAck(_))) => guard.acks.connected(),
            Err(_) => guard.acks.disconnected(),
            Ok(_) => {}
        }
        // Acknowledgements that could not be queued earlier go now.
        guard.acks.flush(&client);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                tracing::info!("gateway connected to the broker");
                if eventloop.mqtt_options.clean_session() {
                    // The unreadable backlog is gone; keep a persistent session from the next
                    // connect on.
                    eventloop.mqtt_options = mqtt_options(&base, false);
                }
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
                failures_since_delivery = 0;
                let ticket = guard.acks.arrived(&p);
                if guard.over_quota(&client, &p, ticket) {
                    continue;
                }
                if guard.queued.load(std::sync::atomic::Ordering::Relaxed) >= MAX_QUEUED {
                    guard.acks.done(&client, ticket);
                    tracing::debug!(topic = %p.topic, "too many messages waiting; dropped unanswered");
                    continue;
                }
                guard.queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if tx.send((ticket, p)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if is_protocol_error(&e) {
                    failures_since_delivery += 1;
                }
                if failures_since_delivery >= 3 {
                    tracing::error!(
                        "the broker keeps sending what this client cannot read ({e}); dropping the session"
                    );
                    eventloop.mqtt_options = mqtt_options(&base, true);
                    failures_since_delivery = 0;
                } else {
                    tracing::warn!("broker connection: {e}; retrying in {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
