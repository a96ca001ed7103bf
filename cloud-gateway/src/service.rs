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

use driftless_core::protocol::{BrokerAddr, Uplink, poke_topic, schema_topic, uplink_filter};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};

use crate::acks::{Acks, Ticket};
use crate::error::{Error, Result};
use crate::fair::FairQueue;
use crate::handler::{HandlerConfig, Outgoing, handle_uplink};
use crate::quota::{QuotaConfig, Quotas};

mod guard;
use crate::storage::GatewayStore;
use guard::{Guard, MAX_QUEUED};

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

/// Runs the gateway until `shutdown` completes; one uplink in progress finishes first. An
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

/// Takes in writes other programs made to the real tables, and pokes their tenants' devices.
/// A failure of the store leaves them in the journal, for the next wake-up or merge.
async fn take_in_cloud_writes<S: GatewayStore + 'static>(
    store: &Arc<Mutex<S>>,
    client: &AsyncClient,
    pokes: &mut Pokes,
) -> Result<()> {
    let store = store.clone();
    let ingested = tokio::task::spawn_blocking(move || {
        let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
        guard.ingest_cloud_writes(now_ms())
    })
    .await
    .map_err(|e| Error::WorkerGone(e.to_string()))?;
    match ingested {
        Ok(tenants) => {
            for tenant in tenants {
                tracing::debug!(%tenant, "took in writes made to the cloud tables");
                pokes.request(client, tenant).await?;
            }
        }
        Err(e) => tracing::error!("taking in writes made to the cloud tables failed: {e}"),
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

/// The content a message is recognised by across deliveries and resends: a batch's identity
/// without its per-publish id (a device resends the same entries under a new id).
fn content_key(topic: &str, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    match Uplink::decode(payload, &driftless_core::codec::Limits::default()) {
        Ok(Uplink::Batch { first_seq, last_seq, batch, .. }) => {
            h.update(b"batch");
            h.update(first_seq.to_le_bytes());
            h.update(last_seq.to_le_bytes());
            h.update(&batch);
        }
        _ => h.update(payload),
    }
    h.finalize().into()
}

/// What happened to one delivery.
enum Handled {
    Done(Vec<Outgoing>),
    /// Set aside after failing too often.
    SetAside,
    /// The gateway failed; nothing is answered.
    Failed(String),
}

/// Handles one delivery on a blocking thread: attempt bookkeeping, retries of transient
/// storage errors, and panics caught.
fn handle_blocking<S: GatewayStore>(
    store: &mut S,
    cfg: &HandlerConfig,
    publish: &Publish,
    in_group: bool,
) -> Result<Handled> {
    let key = content_key(&publish.topic, &publish.payload);
    let previous = store.attempts(&key)?;
    let guarded = publish.dup || previous.is_some();
    if let Some((count, last_ms)) = previous
        && count >= MAX_ATTEMPTS
        && (now_ms() as i64).saturating_sub(last_ms) < QUARANTINE.as_millis() as i64
    {
        return Ok(Handled::SetAside);
    }
    let mut count = 0;
    if guarded {
        // Counted before trying, so a crash is counted too.
        count = store.note_attempt(&key)?;
        if count == MAX_ATTEMPTS {
            let (tenant, device) = driftless_core::protocol::parse_uplink_topic(&publish.topic).unwrap_or(("", ""));
            let reason = format!("the gateway failed on this message {count} times; kept for replay, not refused");
            store.dead_letter(tenant, device, &reason, &publish.payload)?;
        }
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle_uplink(&mut *store, cfg, &publish.topic, &publish.payload, now_ms())
        }));
        match outcome {
            Ok(Ok(out)) => {
                if guarded {
                    store.clear_attempts(&key)?;
                }
                return Ok(Handled::Done(out));
            }
            // Not inside a group: it holds the store's write lock, and the device resends.
            Ok(Err(e)) if attempt < 4 && e.is_transient() && !in_group => {
                tracing::warn!(attempt, "storage error, retrying in {delay:?}: {e}");
                std::thread::sleep(delay);
                delay *= 4;
            }
            // Storage that keeps failing (busy, full, I/O) is the gateway's fault, not the
            // message's: it is not counted towards setting the message aside, so once storage
            // is repaired it merges at the next redelivery rather than after a quarantine.
            // (Unless this attempt was the one that set it aside: its dead letter is written.)
            Ok(Err(e)) if e.is_transient() => {
                if guarded && count < MAX_ATTEMPTS {
                    store.unnote_attempt(&key)?;
                }
                return Ok(Handled::Failed(e.to_string()));
            }
            Ok(Err(e)) => {
                if !guarded {
                    store.note_attempt(&key)?;
                }
                return Ok(Handled::Failed(e.to_string()));
            }
            Err(panic) => {
                if !guarded {
                    store.note_attempt(&key)?;
                }
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Ok(Handled::Failed(format!("panic: {what}")));
            }
        }
    }
    Ok(Handled::Failed("unreachable".into()))
}

/// How long one group of uplinks should take: each waits for its whole group, so this
/// bounds what grouping adds to a message's latency, while its one sync is shared by all.
const GROUP_BUDGET: Duration = Duration::from_millis(20);
/// The most uplinks in one group.
const GROUP_MAX: usize = 1_000;
/// The most uplinks of one device in one group: every message of a group waits for all of
/// it, so a device's backlog (a burst, a catch-up) must not make everyone's group long.
const GROUP_PER_DEVICE: usize = 8;

/// How many uplinks fit the group budget, from what recent groups took.
#[derive(Debug)]
struct Pace {
    /// Moving average of the time one uplink takes, in microseconds.
    per_message_us: f64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { per_message_us: 200.0 }
    }
}

impl Pace {
    fn group_size(&self) -> usize {
        ((GROUP_BUDGET.as_micros() as f64 / self.per_message_us) as usize).clamp(1, GROUP_MAX)
    }

    fn took(&mut self, n: usize, elapsed: Duration) {
        if n > 0 {
            let each = elapsed.as_micros() as f64 / n as f64;
            self.per_message_us = 0.8 * self.per_message_us + 0.2 * each.max(1.0);
        }
    }
}

/// Handles a group of deliveries: each merged in its own transaction, then one sync makes
/// them all durable, and only then is any answered (group commit: one disk flush for the
/// group, nothing acknowledged before it is durable).
async fn handle_group<S: GatewayStore + 'static>(
    client: &AsyncClient,
    store: &Arc<Mutex<S>>,
    cfg: &Arc<HandlerConfig>,
    pokes: &mut Pokes,
    acks: &Acks,
    group: Vec<(Ticket, Publish)>,
) -> Result<()> {
    let (store2, cfg2) = (store.clone(), cfg.clone());
    let deliveries: Vec<Publish> = group.iter().map(|(_, p)| p.clone()).collect();
    // SQLite work is blocking; no lock is held across an await.
    let handled = tokio::task::spawn_blocking(move || handle_group_blocking(&store2, &cfg2, &deliveries))
        .await
        .map_err(|e| Error::WorkerGone(e.to_string()))?;
    for ((ticket, publish), handled) in group.into_iter().zip(handled) {
        answer(client, pokes, &publish, handled).await?;
        // Acknowledged to the broker in every case: the message was merged, refused, or is
        // the device's to send again. Holding it would only stall this session.
        acks.done(client, ticket);
    }
    Ok(())
}

/// Handles a group's deliveries in the store's group transactions and commits them: what
/// could not be made durable is failed, not answered. A delivery tried before (the broker's
/// DUP flag, or an attempt on record) is handled alone, outside any group, as before groups:
/// its attempt is noted durably before it is tried, so a message that crashes the gateway is
/// counted and set aside even though a crash takes a whole group with it.
fn handle_group_blocking<S: GatewayStore>(
    store: &Mutex<S>,
    cfg: &HandlerConfig,
    deliveries: &[Publish],
) -> Vec<Result<Handled>> {
    // A panic while the lock was held leaves a poisoned lock; the store rolled back whatever
    // was open as it unwound, so it is safe to go on using.
    let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
    let store = &mut *guard;
    let mut handled: Vec<Result<Handled>> = Vec::with_capacity(deliveries.len());
    // Where the open group starts in `handled`.
    let mut open: Option<usize> = None;
    for delivery in deliveries {
        // Not knowing counts as tried before: handled alone.
        let tried = delivery.dup
            || store.attempts(&content_key(&delivery.topic, &delivery.payload)).map_or(true, |a| a.is_some());
        if tried {
            close_group(store, &mut handled, open.take());
        } else if open.is_none() {
            match store.begin_group() {
                Ok(()) => open = Some(handled.len()),
                Err(e) => tracing::warn!("no group could be started; handling alone: {e}"),
            }
        }
        handled.push(handle_blocking(store, cfg, delivery, open.is_some()));
    }
    close_group(store, &mut handled, open);
    handled
}

/// Commits the group that starts at `from` in `handled`; if that fails, none of it is
/// answered: the devices send it again, and what did merge is then acknowledged as a
/// duplicate.
fn close_group<S: GatewayStore>(store: &mut S, handled: &mut [Result<Handled>], from: Option<usize>) {
    let Some(from) = from else { return };
    if let Err(e) = store.commit_group() {
        tracing::error!("a group of merges could not be committed; none of it is answered: {e}");
        for h in &mut handled[from..] {
            if matches!(h, Ok(Handled::Done(_))) {
                *h = Ok(Handled::Failed(format!("the group's commit failed: {e}")));
            }
        }
    }
}

async fn answer(client: &AsyncClient, pokes: &mut Pokes, publish: &Publish, handled: Result<Handled>) -> Result<()> {
    match handled {
        Ok(Handled::Done(out)) => {
            for msg in out {
                match msg {
                    Outgoing::Reply { topic, payload } => {
                        client.publish(topic, QoS::AtLeastOnce, false, payload).await?
                    }
                    Outgoing::Poke { tenant } => pokes.request(client, tenant).await?,
                }
            }
        }
        Ok(Handled::SetAside) => {
            tracing::warn!(topic = %publish.topic, "a message that kept failing is set aside; not answered");
        }
        // Our fault (the bookkeeping failing too is ours): no answer, so the device keeps its
        // changes and sends them again.
        Ok(Handled::Failed(reason)) => {
            tracing::error!(topic = %publish.topic, %reason, "the gateway failed on a message; the device will resend it");
        }
        Err(e) => {
            tracing::error!(topic = %publish.topic, "the gateway failed on a message; the device will resend it: {e}");
        }
    }
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

#[cfg(test)]
mod tests {
    use driftless_core::protocol::Uplink;

    use super::*;
    use crate::handler::tests::{Fault, Faulty, device_batch, open};

    #[test]
    fn storage_that_keeps_failing_does_not_set_the_message_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch = device_batch(&dir, "INSERT INTO t VALUES ('a', 1)");
        let msg = Uplink::Batch {
            device: "a".into(),
            id: 1,
            first_seq: 1,
            last_seq: 1,
            epoch: None,
            receipts: vec![],
            batch,
        };
        let mut publish = Publish::new("driftless/t/a/up", QoS::AtLeastOnce, msg.encode());
        let mut store = Faulty(open(&dir), Fault::Merges);
        let cfg = HandlerConfig::default();
        // Redeliveries well past the limit for a message the gateway fails on.
        for delivery in 0..MAX_ATTEMPTS + 1 {
            publish.dup = delivery > 0;
            let handled = handle_blocking(&mut store, &cfg, &publish, false).expect("handled");
            assert!(matches!(handled, Handled::Failed(_)), "delivery {delivery} was set aside");
        }
        let key = content_key(&publish.topic, &publish.payload);
        assert_eq!(store.attempts(&key).expect("attempts"), None, "the gateway's fault is not counted");
        assert!(store.0.dead_letters(&Default::default()).expect("letters").is_empty());
    }

    /// Device a's next batch (its outbox entry `seq`).
    fn batch_publish(dir: &tempfile::TempDir, seq: i64, sql: &str) -> Publish {
        let batch = device_batch(dir, sql);
        let (device, id) = ("a".to_owned(), seq as u64);
        let msg = Uplink::Batch { device, id, first_seq: seq, last_seq: seq, epoch: None, receipts: vec![], batch };
        Publish::new("driftless/t/a/up", QoS::AtLeastOnce, msg.encode())
    }

    fn acked(handled: &Result<Handled>) -> bool {
        let Ok(Handled::Done(out)) = handled else { return false };
        out.iter().any(|o| match o {
            Outgoing::Reply { payload, .. } => matches!(
                driftless_core::protocol::Downlink::decode(payload, &Default::default()),
                Ok(driftless_core::protocol::Downlink::Ack { ref refused, .. }) if refused.is_empty()
            ),
            Outgoing::Poke { .. } => false,
        })
    }

    #[test]
    fn a_group_whose_commit_fails_is_not_answered_and_is_acked_when_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let group = [
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
        ];
        let cfg = HandlerConfig::default();
        let store = Mutex::new(Faulty(open(&dir), Fault::Commits));
        let handled = handle_group_blocking(&store, &cfg, &group);
        assert!(handled.iter().all(|h| matches!(h, Ok(Handled::Failed(_)))), "answered before it was durable");
        // Commits work again: the same batches, redelivered, are acknowledged.
        store.lock().expect("lock").1 = Fault::Nothing;
        let again: Vec<Publish> = group.iter().cloned().map(|p| Publish { dup: true, ..p }).collect();
        let handled = handle_group_blocking(&store, &cfg, &again);
        assert!(handled.iter().all(acked), "not acknowledged once durable");
    }

    #[test]
    fn a_delivery_tried_before_is_handled_alone_outside_any_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = vec![
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
            batch_publish(&dir, 3, "INSERT INTO t VALUES ('c', 1)"),
            batch_publish(&dir, 4, "INSERT INTO t VALUES ('d', 1)"),
        ];
        group[1].dup = true;
        let cfg = HandlerConfig::default();
        let mut store = Faulty(open(&dir), Fault::Commits);
        // The third was tried before (an attempt on record), though not redelivered.
        store.note_attempt(&content_key(&group[2].topic, &group[2].payload)).expect("attempt");
        let store = Mutex::new(store);
        // Group commits fail: what was grouped is not answered; what was handled alone, in
        // transactions of its own, is.
        let handled = handle_group_blocking(&store, &cfg, &group);
        let answered: Vec<bool> = handled.iter().map(acked).collect();
        assert_eq!(answered, [false, true, true, false]);
    }

    #[test]
    fn a_group_commits_its_merges_together_and_a_redelivery_is_handled_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = vec![
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
            batch_publish(&dir, 3, "INSERT INTO t VALUES ('c', 1)"),
        ];
        group[1].dup = true;
        let cfg = HandlerConfig::default();
        let store = Mutex::new(Faulty(open(&dir), Fault::Nothing));
        let handled = handle_group_blocking(&store, &cfg, &group);
        assert!(handled.iter().all(acked), "every one acknowledged, none refused");
        // All of it is in the database, seen from another connection.
        let seen = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
        let n: i64 = seen.query_row("SELECT count(*) FROM gw_rows", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 3);
    }
}
