//! The async shell around the sync [`Machine`]: it turns events and timer ticks into inputs,
//! publishes what the machine asks, runs its store work on the store thread and feeds the
//! result straight back. All decisions are the machine's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use driftless_core::ChangedRow;
use driftless_core::protocol::{scope_topic, uplink_topic};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::execute::execute;
use crate::machine::{Action, Input, LiveStatus, Machine, StoreOp, StoreResult};
use crate::progress::ProgressBar;
use crate::worker::StoreHandle;

/// Inputs handed to the machine together, at most.
const MAX_INPUTS_AT_ONCE: usize = 256;

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Everything the shell needs besides the machine.
pub(crate) struct Shell {
    pub(crate) client: AsyncClient,
    pub(crate) topic: String,
    tenant: String,
    /// The topic of the scope the device follows, once the gateway named one.
    following: Option<String>,
    pub(crate) store: StoreHandle,
    pub(crate) status: watch::Sender<LiveStatus>,
    pub(crate) changes: broadcast::Sender<Vec<ChangedRow>>,
    pub(crate) progress: ProgressBar,
}

impl Shell {
    pub(crate) fn new(
        client: AsyncClient,
        tenant: &str,
        device: &str,
        store: StoreHandle,
        status: watch::Sender<LiveStatus>,
        changes: broadcast::Sender<Vec<ChangedRow>>,
        progress: bool,
    ) -> Shell {
        Shell {
            client,
            topic: uplink_topic(tenant, device),
            tenant: tenant.to_owned(),
            following: None,
            store,
            status,
            changes,
            progress: ProgressBar::new(progress),
        }
    }

    /// Runs until cancelled or the event source closes.
    pub(crate) async fn run(
        mut self,
        mut machine: Machine,
        mut events: mpsc::Receiver<Input>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let start = Instant::now();
        let now = move || start.elapsed().as_millis() as u64;
        let mut tick = tokio::time::interval(Duration::from_millis(machine.tick_every_ms()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let input = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.step(&mut machine, vec![Input::Disconnected { flush_timeout: false }], &now).await?;
                    return Ok(());
                }
                e = events.recv() => match e { Some(e) => e, None => return Ok(()) },
                _ = tick.tick() => Input::Tick,
            };
            // What else arrived meanwhile goes in with it: changes of the device's scopes
            // that queued up while the store was busy are applied together.
            let mut inputs = vec![input];
            while inputs.len() < MAX_INPUTS_AT_ONCE
                && let Ok(more) = events.try_recv()
            {
                inputs.push(more);
            }
            self.step(&mut machine, inputs, &now).await?;
        }
    }

    /// Feeds inputs and carries out every action they lead to, store results included.
    async fn step(&mut self, machine: &mut Machine, inputs: Vec<Input>, now: &impl Fn() -> u64) -> Result<()> {
        let mut queue: VecDeque<Action> = machine.handle_all(inputs, now()).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Publish(msg) => {
                    // Never awaited from the task that drives the MQTT event loop: this is the
                    // sync task, and the poller drains the client's request queue.
                    self.client.publish(self.topic.clone(), QoS::AtLeastOnce, false, msg.encode()).await?;
                }
                Action::Store(op) => {
                    let result = self.run_store(op).await;
                    queue.extend(machine.handle(Input::Store(result), now()));
                }
                Action::Changed(rows) => {
                    // No listener is fine: nobody asked.
                    let _ = self.changes.send(rows);
                }
                Action::Progress(p) => self.progress.apply(p),
                Action::Follow(scope) => {
                    // Subscribed again after every handshake (a new connection holds no
                    // subscription); the scope left behind is unsubscribed.
                    let topic = scope_topic(&self.tenant, &scope);
                    if let Some(left) = self.following.take().filter(|t| *t != topic) {
                        self.client.unsubscribe(left).await?;
                    }
                    self.client.subscribe(topic.clone(), QoS::AtMostOnce).await?;
                    self.following = Some(topic);
                }
            }
        }
        let live = machine.live().clone();
        self.status.send_if_modified(|s| {
            let changed = *s != live;
            *s = live;
            changed
        });
        Ok(())
    }

    async fn run_store(&self, op: StoreOp) -> StoreResult {
        match self.store.call(move |s| execute(s, op, wall_ms())).await {
            Ok(result) => result,
            Err(e) => StoreResult::Failed(e.to_string()),
        }
    }
}
