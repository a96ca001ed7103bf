//! Starting and stopping an agent, and asking it how it is doing.

use std::future::Future;
use std::time::Duration;

use driftless_core::codec::{Dictionaries, Limits, decode_batch};
use driftless_core::protocol::{
    DEFAULT_SCOPE, Downlink, decode_announcement, downlink_topic, parse_scope_topic, poke_topic, schema_topic,
    scope_topic,
};
use driftless_core::{ChangedRow, StoreOptions};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, SyncMode};
use crate::error::{Error, Result};
use crate::execute::LAST_SYNC_KEY;
use crate::machine::{Input, LiveStatus, Machine, MachineConfig};
use crate::sync::Shell;
use crate::watch::watch_database;
use crate::worker::StoreHandle;

/// A point-in-time view of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    /// Local changes not yet acknowledged by the gateway.
    pub pending_changes: u64,
    /// When the gateway last acknowledged or sent changes (ms since the Unix epoch).
    pub last_sync_ms: Option<u64>,
    pub conflicts: usize,
    /// Outbox entries the gateway refused, kept aside.
    pub rejected: u64,
    pub last_error: Option<String>,
}

/// A running agent. Dropping it does not stop it; call [`Agent::stop`].
#[derive(Debug)]
pub struct Agent {
    store: StoreHandle,
    status: watch::Receiver<LiveStatus>,
    events: mpsc::Sender<Input>,
    changes: broadcast::Sender<Vec<ChangedRow>>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

fn mqtt_options(config: &AgentConfig) -> Result<MqttOptions> {
    let id = driftless_core::protocol::client_id(&config.tenant, &config.device_id);
    let mut opts = driftless_core::transport::mqtt_options(id, &config.broker)
        .map_err(|e| Error::Transport(format!("broker {}: {e}", config.broker)))?;
    opts.set_keep_alive(Duration::from_secs(15));
    // The outbox and the cursor are the durable state; the broker session need not be.
    opts.set_clean_session(true);
    opts.set_max_packet_size(64 << 20, 64 << 20);
    if let (Some(u), Some(p)) = (&config.username, &config.password) {
        opts.set_credentials(u, p);
    }
    Ok(opts)
}

impl Agent {
    /// Opens the store and starts syncing in the background on the current tokio runtime.
    pub async fn start(config: AgentConfig, store_opts: StoreOptions) -> Result<Agent> {
        let store = StoreHandle::open(config.db.clone(), store_opts)?;
        Self::start_with_store(config, store).await
    }

    /// Starts syncing a store the caller already has open (so the process keeps one writer).
    pub async fn start_with_store(config: AgentConfig, store: StoreHandle) -> Result<Agent> {
        // A device whose tables are all up-only has nothing to receive: it neither listens
        // for announcements nor pulls.
        let (receives, tracks_any) = store
            .call(|s| {
                let tracked = s.tracked();
                (
                    tracked.iter().any(|(_, spec)| spec.direction != driftless_core::Direction::UpOnly),
                    !tracked.is_empty(),
                )
            })
            .await?;
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config)?, 64);
        eventloop.set_network_options(network_options());
        let (events_tx, events_rx) = mpsc::channel(1_024);
        let (status_tx, status_rx) = watch::channel(LiveStatus::default());
        let cancel = CancellationToken::new();
        let (change_tx, mut change_rx) = mpsc::channel(1);
        let watcher = match config.mode {
            crate::config::SyncMode::RealTime => Some(watch_database(&config.db, change_tx)?),
            crate::config::SyncMode::Interval(_) | crate::config::SyncMode::Notified => None,
        };
        let mut tasks = Vec::new();
        let forward = events_tx.clone();
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = c.cancelled() => return,
                    got = change_rx.recv() => {
                        // Hints are dropped when the queue is full rather than waited on: the
                        // loop's backstop timer ships anyway, and waiting here could stall it.
                        if got.is_none() || matches!(forward.try_send(Input::LocalChange), Err(mpsc::error::TrySendError::Closed(_))) {
                            return;
                        }
                    }
                }
            }
        }));
        let poller =
            // A store that tracks nothing yet waits for the gateway's schema, which may declare
            // tables to receive: it listens for announcements from the start.
            poll_events(eventloop, client.clone(), config.clone(), receives || !tracks_any, events_tx.clone(), cancel.clone());
        tasks.push(tokio::spawn(poller));
        let (changes, _) = broadcast::channel(256);
        let machine = Machine::new(machine_config(&config, receives)?);
        let shell = Shell::new(
            client.clone(),
            &config.tenant,
            &config.device_id,
            store.clone(),
            status_tx,
            changes.clone(),
            config.progress,
        );
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = shell.run(machine, events_rx, c).await {
                tracing::error!("sync loop stopped: {e}");
            }
            let _ = client.disconnect().await;
        }));
        Ok(Agent { store, status: status_rx, events: events_tx, changes, cancel, tasks, _watcher: watcher })
    }

    /// Ships pending changes and pulls missed ones now rather than at the next trigger.
    /// Never blocks: if the loop's queue is full, a wake-up is already pending.
    pub fn sync_now(&self) -> Result<()> {
        match self.events.try_send(Input::SyncNow) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Stopped),
        }
    }

    /// Tells the agent the app wrote to the database (what the file watcher does in
    /// [`SyncMode::RealTime`]): the changes are shipped at once. Never blocks.
    pub fn local_change(&self) -> Result<()> {
        match self.events.try_send(Input::LocalChange) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Stopped),
        }
    }

    pub async fn status(&self) -> Result<Status> {
        let live = self.status.borrow().clone();
        let (pending, last, conflicts, rejected) = self
            .store
            .call(|s| -> driftless_core::Result<_> {
                Ok((s.pending_changes()?, s.sync_state(LAST_SYNC_KEY)?, s.conflicts()?.len(), s.rejected_count()?))
            })
            .await??;
        Ok(Status {
            connected: live.connected,
            pending_changes: pending,
            last_sync_ms: last.and_then(|v| v.parse().ok()),
            conflicts,
            rejected,
            last_error: live.last_error,
        })
    }

    /// Connection state and counters, without touching the database.
    pub fn live(&self) -> LiveStatus {
        self.status.borrow().clone()
    }

    /// Rows changed by remote writes, as they are applied. A receiver that falls more than 256
    /// notices behind skips ahead (`RecvError::Lagged`).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Vec<ChangedRow>> {
        self.changes.subscribe()
    }

    /// A receiver that is notified whenever the live status changes (an ack, a disconnect).
    pub fn watch_live(&self) -> watch::Receiver<LiveStatus> {
        self.status.clone()
    }

    /// The store, for reads and writes from the app's side of the agent.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Stops syncing; returns when every task has ended. Nothing durable is lost: the outbox
    /// and cursor live in the database.
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn machine_config(config: &AgentConfig, receives: bool) -> Result<MachineConfig> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| Error::Core(driftless_core::Error::Random(e.to_string())))?;
    Ok(MachineConfig {
        device_id: config.device_id.clone(),
        max_inflight: config.max_inflight,
        batch_rows: config.batch_rows,
        max_message_bytes: config.max_message_bytes,
        pull_rows: config.pull_rows,
        ack_timeout_ms: config.ack_timeout.as_millis() as u64,
        receives,
        interval_ms: match config.mode {
            SyncMode::RealTime | SyncMode::Notified => None,
            SyncMode::Interval(d) => Some(d.as_millis() as u64),
        },
        id_seed: u64::from_le_bytes(seed),
    })
}

/// Sync messages are small and answered at once: waiting to coalesce them (Nagle) would add
/// tens of milliseconds per round trip. Writing one message may take a while on a slow link,
/// so the write timeout is generous; a link too slow even for that makes the machine send
/// smaller messages. The send buffer is kept small, so that "written out" means on its way:
/// with the kernel's default (megabytes) a whole backlog is "written" at once, and a slow
/// link still carrying it looks like one that lost it.
const SEND_BUFFER_BYTES: u32 = 128 << 10;

fn network_options() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_tcp_send_buffer_size(SEND_BUFFER_BYTES);
    net.set_connection_timeout(30);
    net
}

/// Runs an agent until `shutdown` completes (the daemon's entry point).
pub async fn run(config: AgentConfig, store_opts: StoreOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    let agent = Agent::start(config, store_opts).await?;
    shutdown.await;
    agent.stop().await;
    Ok(())
}

/// Room in the sync loop's queue scope changes leave for everything else.
const FEED_RESERVE: usize = 128;

/// Drives the MQTT connection and turns packets into sync inputs. Reconnects with capped
/// exponential backoff and jitter. Never publishes: a publish awaited here would wait on the
/// very loop it blocks.
async fn poll_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    config: AgentConfig,
    receives: bool,
    events: mpsc::Sender<Input>,
    cancel: CancellationToken,
) {
    let limits = Limits::default();
    let down = downlink_topic(&config.tenant, &config.device_id);
    let poke = poke_topic(&config.tenant);
    let feed = scope_topic(&config.tenant, DEFAULT_SCOPE);
    let schema = schema_topic(&config.tenant);
    let mut backoff = Duration::from_millis(100);
    // A scope change dropped (no room, or undecodable): the machine is told to pull at the
    // next chance (a poke could be ignored while changes are heard).
    let mut dropped_feed = false;
    loop {
        // One request, in room the changes did not take.
        if dropped_feed && events.capacity() > FEED_RESERVE / 2 {
            dropped_feed = matches!(events.try_send(Input::SyncNow), Err(mpsc::error::TrySendError::Full(_)));
        }
        let polled = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            p = eventloop.poll() => p,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                let (client, down, feed, events) = (client.clone(), down.clone(), feed.clone(), events.clone());
                let (schema, poke) = (schema.clone(), poke.clone());
                tokio::spawn(async move {
                    let subscribed = async {
                        client.subscribe(&down, QoS::AtLeastOnce).await?;
                        // The gateway keeps the current schema there, retained.
                        client.subscribe(&schema, QoS::AtLeastOnce).await?;
                        if receives {
                            // Every change of the device's scope, published once by the
                            // gateway and fanned out by the broker.
                            client.subscribe(&feed, QoS::AtMostOnce).await?;
                            // Pulled on only while no scope change is heard: a broker whose
                            // rules predate scope topics withholds them (refusing the
                            // subscription, or silently).
                            client.subscribe(&poke, QoS::AtMostOnce).await?;
                        }
                        Ok::<(), rumqttc::ClientError>(())
                    };
                    match subscribed.await {
                        Ok(()) => {
                            let _ = events.send(Input::Connected).await;
                        }
                        Err(e) => tracing::error!("subscribe failed: {e}"),
                    }
                });
                continue;
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => Input::Flushed,
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == poke => {
                Input::Poke { head: decode_announcement(&p.payload) }
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if parse_scope_topic(&p.topic).is_some_and(|(t, _)| t == config.tenant) =>
            {
                match Downlink::decode(&p.payload, &limits) {
                    Ok(msg @ Downlink::Feed { .. }) => {
                        // Feeds are not answers to the machine's requests, so they come at the
                        // fleet's pace: they may take the queue only down to a reserve kept for
                        // the answers and connection events this loop must never wait to hand
                        // over (it would stop reading the socket, or deadlock with a sync loop
                        // publishing). One that finds no room is dropped, and a pull fetches it.
                        if events.capacity() <= FEED_RESERVE || events.try_send(Input::Downlink(msg)).is_err() {
                            dropped_feed = true;
                        }
                        continue;
                    }
                    Ok(_) => {
                        tracing::warn!("ignoring a message on the scope's topic that is no scope change");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("an undecodable scope message; pulling instead: {e}");
                        dropped_feed = true;
                        continue;
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == down || p.topic == schema => {
                match Downlink::decode(&p.payload, &limits) {
                    Ok(msg) => decoded_ahead(msg),
                    Err(e) => {
                        tracing::warn!("ignoring an undecodable downlink message: {e}");
                        continue;
                    }
                }
            }
            Ok(_) => continue,
            Err(e) => {
                let flush_timeout = matches!(e, ConnectionError::FlushTimeout);
                // Never wait on the sync loop here: it may be waiting on this task to drain
                // the client's request queue.
                let _ = events.try_send(Input::Disconnected { flush_timeout });
                let jitter = Duration::from_millis(u64::from(std::process::id() % 97) + jitter_ms());
                tracing::debug!("broker connection: {e}; retrying in {:?}", backoff + jitter);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        // Pokes are hints: drop one rather than wait. Everything else answers the machine's
        // own requests (a handful at a time), so waiting for room is bounded.
        let sent = match event {
            Input::Poke { .. } => !matches!(events.try_send(event), Err(mpsc::error::TrySendError::Closed(_))),
            other => events.send(other).await.is_ok(),
        };
        if !sent {
            return;
        }
    }
}

/// A few milliseconds of jitter from the clock's low bits, so a fleet does not reconnect in
/// lockstep after an outage.
fn jitter_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::from(d.subsec_nanos() % 250))
}

/// A snapshot page goes to the machine with its batch decoded here, while the store may still
/// be applying the page before; one that does not decode goes as it came, for the machine to
/// report.
fn decoded_ahead(msg: Downlink) -> Input {
    let decoded = match &msg {
        Downlink::Snapshot { batch, .. } => decode_batch(batch, &Limits::default(), &Dictionaries::default()).ok(),
        _ => None,
    };
    match decoded {
        Some(batch) => Input::Page(msg, batch),
        None => Input::Downlink(msg),
    }
}

#[cfg(test)]
mod tests {
    use driftless_core::codec::{EncodeOptions, encode_batch};
    use driftless_core::{Batch, Epoch, LogCursor};

    use super::*;

    fn page(batch: Vec<u8>) -> Downlink {
        let epoch = Epoch([1; 16]);
        let log_cursor = LogCursor::default();
        Downlink::Snapshot { epoch, from: None, echo: None, resume: vec![], log_cursor, done: true, batch }
    }

    #[test]
    fn snapshot_pages_are_decoded_as_they_arrive_and_others_are_left_to_the_machine() {
        let batch = encode_batch(&Batch::default(), EncodeOptions::default());
        assert!(matches!(decoded_ahead(page(batch)), Input::Page(..)));
        // An undecodable page goes on as it came: the machine reports it.
        assert!(matches!(decoded_ahead(page(vec![1, 2, 3])), Input::Downlink(_)));
        assert!(matches!(decoded_ahead(Downlink::SlowDown { retry_after_ms: 1 }), Input::Downlink(_)));
    }
}
