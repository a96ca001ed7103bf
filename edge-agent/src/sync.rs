//! The sync loop: ships the outbox oldest-first with a bounded number of batches in flight,
//! removes entries only on the gateway's ack, moves refused ones aside, and pulls what the
//! device missed from the cursor it keeps (starting from a snapshot when it has none).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use driftless_core::ChangedRow;
use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::protocol::{Downlink, Uplink, uplink_topic};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, SyncMode};
use crate::error::Result;
use crate::progress::Progress;
use crate::worker::StoreHandle;

/// Keys of the agent's state kept in the store (they commit with the data they describe).
pub(crate) const CURSOR_KEY: &str = "cursor";
pub(crate) const LAST_SYNC_KEY: &str = "last_sync_ms";
/// "1" while a running agent is connected, for `driftless-agent status` from another process.
pub(crate) const CONNECTED_KEY: &str = "connected";

/// What the sync loop reacts to.
#[derive(Debug)]
pub(crate) enum SyncEvent {
    Connected,
    Disconnected(String),
    Downlink(Downlink),
    Poke,
    LocalChange,
    SyncNow,
}

/// Live state the handle can read.
#[derive(Debug, Clone, Default)]
pub struct LiveStatus {
    pub connected: bool,
    pub last_error: Option<String>,
    pub inflight_batches: usize,
    /// Bytes of uplink messages published since start.
    pub bytes_sent: u64,
    /// Batches the gateway has acknowledged since start.
    pub acked_batches: u64,
}

struct Inflight {
    first: i64,
    last: i64,
    sent_at: Instant,
}

pub(crate) struct SyncLoop {
    pub(crate) config: AgentConfig,
    pub(crate) client: AsyncClient,
    pub(crate) store: StoreHandle,
    pub(crate) status: watch::Sender<LiveStatus>,
    /// Rows changed by remote writes, for app listeners.
    pub(crate) changes: broadcast::Sender<Vec<ChangedRow>>,
    connected: bool,
    inflight: VecDeque<Inflight>,
    /// When the gateway last acknowledged or refused a batch.
    last_progress: Instant,
    /// Highest outbox sequence number published since the last (re)connect.
    sent_upto: i64,
    cursor: Option<u64>,
    /// When a pull was last sent, while its answer is awaited.
    pulling: Option<Instant>,
    /// A poke arrived while a pull was out: pull again when it is answered, so a change
    /// logged just after the gateway answered is not left for the next tick.
    pull_again: bool,
    /// False when every tracked table is up-only: nothing to pull.
    receives: bool,
    limits: Limits,
    progress: Progress,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SyncLoop {
    pub(crate) fn new(
        config: AgentConfig,
        client: AsyncClient,
        store: StoreHandle,
        status: watch::Sender<LiveStatus>,
        changes: broadcast::Sender<Vec<ChangedRow>>,
        receives: bool,
    ) -> Self {
        let progress = Progress::new(config.progress);
        SyncLoop {
            config,
            client,
            store,
            status,
            changes,
            connected: false,
            inflight: VecDeque::new(),
            last_progress: Instant::now(),
            sent_upto: 0,
            cursor: None,
            pulling: None,
            pull_again: false,
            receives,
            limits: Limits::default(),
            progress,
        }
    }

    pub(crate) async fn run(mut self, mut events: mpsc::Receiver<SyncEvent>, cancel: CancellationToken) -> Result<()> {
        self.cursor = self.store.sync_state(CURSOR_KEY).await?.and_then(|c| c.parse().ok());
        // In real-time mode the timer is only a backstop (lost pokes, missing acks): writes
        // and announcements wake the loop, so an idle agent does next to nothing.
        let tick_every = match self.config.mode {
            SyncMode::RealTime => (self.config.ack_timeout / 2).max(Duration::from_millis(100)),
            // A zero period would make the timer panic; treat it as the smallest sane one.
            SyncMode::Interval(d) => d.max(Duration::from_millis(1)),
        };
        let mut tick = tokio::time::interval(tick_every);
        loop {
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.store.set_sync_state(CONNECTED_KEY, "0".into()).await?;
                    return Ok(());
                }
                e = events.recv() => match e { Some(e) => e, None => return Ok(()) },
                _ = tick.tick() => SyncEvent::SyncNow,
            };
            if let Err(e) = self.on_event(event).await {
                // A store error is serious but transient ones (busy) pass; report and go on.
                tracing::error!("sync: {e}");
                self.status.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
    }

    async fn on_event(&mut self, event: SyncEvent) -> Result<()> {
        match event {
            SyncEvent::Connected => {
                self.connected = true;
                self.status.send_modify(|s| {
                    s.connected = true;
                    s.last_error = None;
                });
                // Anything in flight before the disconnect may be lost: start over from the
                // oldest unacknowledged entry (the gateway merges repeats harmlessly).
                self.inflight.clear();
                self.sent_upto = 0;
                self.store.set_sync_state(CONNECTED_KEY, "1".into()).await?;
                let pending = self.store.call(|s| s.pending_changes()).await??;
                self.progress.start("uploading", pending);
                self.pull().await?;
                self.ship().await?;
            }
            SyncEvent::Disconnected(reason) => {
                if self.connected {
                    self.store.set_sync_state(CONNECTED_KEY, "0".into()).await?;
                }
                self.connected = false;
                self.pulling = None;
                self.status.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(reason);
                });
            }
            SyncEvent::Downlink(msg) => self.on_downlink(msg).await?,
            SyncEvent::Poke => {
                if self.pulling.is_none() {
                    self.pull().await?;
                } else {
                    self.pull_again = true;
                }
            }
            SyncEvent::LocalChange => {
                if self.config.mode == SyncMode::RealTime {
                    self.ship().await?;
                }
            }
            SyncEvent::SyncNow => {
                let timeout = self.config.ack_timeout;
                // Resend only when nothing at all came back for a whole timeout: on a slow link
                // acks keep arriving and the window keeps moving.
                if self.inflight.front().is_some_and(|f| f.sent_at.elapsed() > timeout)
                    && self.last_progress.elapsed() > timeout
                {
                    tracing::warn!("no ack within {timeout:?}; sending unacknowledged batches again");
                    self.inflight.clear();
                    self.sent_upto = 0;
                }
                if self.pulling.is_some_and(|t| t.elapsed() > timeout) {
                    self.pulling = None;
                }
                if self.pulling.is_none() {
                    self.pull().await?;
                }
                self.ship().await?;
            }
        }
        self.status.send_modify(|s| s.inflight_batches = self.inflight.len());
        Ok(())
    }

    fn announce(&self, changed: Vec<ChangedRow>) {
        if !changed.is_empty() {
            // No listener is fine: nobody asked.
            let _ = self.changes.send(changed);
        }
    }

    async fn publish(&self, msg: Uplink) -> Result<()> {
        let topic = uplink_topic(&self.config.tenant, &self.config.device_id);
        let payload = msg.encode();
        let len = payload.len() as u64;
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await?;
        self.status.send_modify(|s| s.bytes_sent += len);
        Ok(())
    }

    /// Publishes outbox batches until the in-flight bound is reached or the outbox is empty.
    async fn ship(&mut self) -> Result<()> {
        while self.connected && self.inflight.len() < self.config.max_inflight {
            // Rows can be large (photos, documents): halve the batch until its envelope fits
            // the message bound. A single row over it is sent alone; the gateway decides.
            let mut rows = self.config.batch_rows.max(1);
            let (out, batch) = loop {
                let Some(out) = self.store.outbox_after(self.sent_upto, rows).await? else { return Ok(()) };
                let batch = encode_batch(&out.batch, EncodeOptions::default());
                if batch.len() <= self.config.max_message_bytes || out.batch.rows.len() <= 1 {
                    break (out, batch);
                }
                rows = (out.batch.rows.len() / 2).max(1);
            };
            let msg = Uplink::Batch {
                device: self.config.device_id.clone(),
                first_seq: out.first_seq,
                last_seq: out.last_seq,
                batch,
            };
            self.publish(msg).await?;
            self.sent_upto = out.last_seq;
            self.inflight.push_back(Inflight { first: out.first_seq, last: out.last_seq, sent_at: Instant::now() });
        }
        Ok(())
    }

    async fn pull(&mut self) -> Result<()> {
        if !self.connected || !self.receives {
            return Ok(());
        }
        self.pull_again = false;
        let msg = Uplink::Pull {
            device: self.config.device_id.clone(),
            cursor: self.cursor.unwrap_or(0),
            max_rows: self.config.pull_rows,
        };
        self.pulling = Some(Instant::now());
        self.publish(msg).await
    }

    fn settle(&mut self, first: i64, last: i64) {
        self.inflight.retain(|f| !(f.first == first && f.last == last));
    }

    async fn on_downlink(&mut self, msg: Downlink) -> Result<()> {
        match msg {
            Downlink::Ack { first_seq, last_seq } => {
                self.last_progress = Instant::now();
                let removed = self.store.ack(first_seq, last_seq).await?;
                self.settle(first_seq, last_seq);
                self.status.send_modify(|s| s.acked_batches += 1);
                self.progress.advance(removed as u64);
                self.store.set_sync_state(LAST_SYNC_KEY, now_ms().to_string()).await?;
                self.ship().await?;
                if self.inflight.is_empty() {
                    self.progress.finish();
                }
            }
            Downlink::Nack { first_seq, last_seq, reason } => {
                tracing::warn!(first_seq, last_seq, %reason, "gateway refused a batch; moving it aside");
                self.last_progress = Instant::now();
                self.store.reject(first_seq, last_seq, reason).await?;
                self.settle(first_seq, last_seq);
                self.ship().await?;
            }
            Downlink::Changes { cursor, more, batch } => {
                let batch = decode_batch(&batch, &self.limits, &Dictionaries::default())?;
                if !batch.rows.is_empty() || Some(cursor) != self.cursor {
                    let report = self.store.apply(batch, Some(cursor)).await?;
                    self.announce(report.changed);
                    self.store.set_sync_state(LAST_SYNC_KEY, now_ms().to_string()).await?;
                }
                self.cursor = Some(cursor);
                self.pulling = None;
                if more || self.pull_again {
                    self.pull().await?;
                }
            }
            Downlink::Snapshot { resume, log_cursor, done, batch } => {
                let batch = decode_batch(&batch, &self.limits, &Dictionaries::default())?;
                let rows = batch.rows.len() as u64;
                if done {
                    // The cursor moves only with the last page: a restart mid-snapshot starts
                    // the snapshot again, which merges harmlessly.
                    let report = self.store.apply(batch, Some(log_cursor)).await?;
                    self.announce(report.changed);
                    self.cursor = Some(log_cursor);
                    self.pulling = None;
                    self.progress.finish();
                    if log_cursor > 0 {
                        self.pull().await?;
                    }
                } else {
                    let report = self.store.apply(batch, None).await?;
                    self.announce(report.changed);
                    self.progress.advance(rows);
                    self.pulling = Some(Instant::now());
                    let msg = Uplink::PullSnapshot {
                        device: self.config.device_id.clone(),
                        resume,
                        log_cursor,
                        max_rows: self.config.pull_rows,
                    };
                    self.publish(msg).await?;
                }
            }
        }
        Ok(())
    }
}

impl From<driftless_core::codec::DecodeError> for crate::error::Error {
    fn from(e: driftless_core::codec::DecodeError) -> Self {
        crate::error::Error::Core(e.into())
    }
}
