//! Acknowledging uplinks to the broker in the order they arrived, whatever order they are
//! finished in (taken in turns, or dropped over a quota as they arrive). Some brokers (the
//! embedded rumqttd) disconnect a client that acknowledges out of order.
//!
//! Each delivery gets a ticket of its own as it arrives; finishing names the ticket, never
//! the packet id, which a broker reuses (and renumbers after a reconnect): a copy delivered
//! on an earlier connection can never acknowledge a message of the current one. Nothing is
//! sent while disconnected, and what was pending is forgotten at each connect (the broker
//! delivers it again).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, Publish, QoS};

/// A delivery's place in the order of acknowledgements (`None`: QoS 0, nothing to send).
pub(crate) type Ticket = Option<u64>;

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Deliveries not yet acknowledged, oldest first: ticket, delivery, whether done.
    pending: VecDeque<(u64, Publish, bool)>,
    connected: bool,
}

/// The acknowledgements owed to the broker on the current connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acks(Arc<Mutex<State>>);

impl Acks {
    /// Notes a delivery as it arrives; its ticket.
    pub(crate) fn arrived(&self, publish: &Publish) -> Ticket {
        if publish.qos == QoS::AtMostOnce {
            return None;
        }
        let mut state = self.lock();
        state.next += 1;
        let ticket = state.next;
        state.pending.push_back((ticket, publish.clone(), false));
        Some(ticket)
    }

    /// Marks a delivery done and acknowledges every done one at the head, in order. Never
    /// waits: what the client's queue cannot take now goes with the next call.
    pub(crate) fn done(&self, client: &AsyncClient, ticket: Ticket) {
        let Some(ticket) = ticket else { return };
        let mut state = self.lock();
        // Tickets in `pending` are consecutive (issued in order, removed from the front or
        // all at once): a ticket's place is its distance from the first, found at once
        // however many wait.
        let first = state.pending.front().map_or(0, |(t, _, _)| *t);
        if let Some(entry) = ticket.checked_sub(first).and_then(|i| state.pending.get_mut(i as usize))
            && entry.0 == ticket
        {
            entry.2 = true;
        }
        Self::flush_locked(client, &mut state);
    }

    /// Acknowledges every done delivery at the head, in order.
    pub(crate) fn flush(&self, client: &AsyncClient) {
        Self::flush_locked(client, &mut self.lock());
    }

    fn flush_locked(client: &AsyncClient, state: &mut State) {
        if !state.connected {
            return;
        }
        while let Some((_, publish, true)) = state.pending.front() {
            if client.try_ack(publish).is_err() {
                return;
            }
            state.pending.pop_front();
        }
    }

    /// The connection is up: what was pending belongs to an earlier one.
    pub(crate) fn connected(&self) {
        let mut state = self.lock();
        state.pending.clear();
        state.connected = true;
    }

    /// The connection failed: nothing more is sent until the next one is up.
    pub(crate) fn disconnected(&self) {
        let mut state = self.lock();
        state.pending.clear();
        state.connected = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
