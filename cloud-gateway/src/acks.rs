//! Acknowledging uplinks to the broker in the order they arrived, whatever order they are
//! finished in (taken in turns, or dropped over a quota as they arrive). Some brokers (the
//! embedded rumqttd) disconnect a client that acknowledges out of order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, Publish, QoS};

/// Uplinks received and not yet acknowledged, oldest first, each with whether it is done.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acks(Arc<Mutex<VecDeque<(Publish, bool)>>>);

impl Acks {
    /// Notes a delivery as it arrives (nothing to acknowledge for QoS 0).
    pub(crate) fn arrived(&self, publish: &Publish) {
        if publish.qos != QoS::AtMostOnce {
            self.lock().push_back((publish.clone(), false));
        }
    }

    /// Marks a delivery done and acknowledges every done one at the head, in order. Never
    /// waits: what the client's queue cannot take now goes with the next call.
    pub(crate) fn done(&self, client: &AsyncClient, publish: &Publish) {
        let mut pending = self.lock();
        if let Some(entry) = pending.iter_mut().find(|(p, done)| !done && p.pkid == publish.pkid) {
            entry.1 = true;
        }
        Self::flush_locked(client, &mut pending);
    }

    /// Acknowledges every done delivery at the head, in order.
    pub(crate) fn flush(&self, client: &AsyncClient) {
        Self::flush_locked(client, &mut self.lock());
    }

    fn flush_locked(client: &AsyncClient, pending: &mut VecDeque<(Publish, bool)>) {
        while let Some((publish, true)) = pending.front() {
            if client.try_ack(publish).is_err() {
                return;
            }
            pending.pop_front();
        }
    }

    /// Forgets what was pending: after a reconnect the broker delivers it again.
    pub(crate) fn reset(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Publish, bool)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
