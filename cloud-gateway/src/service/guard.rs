//! What is let in: quotas checked as uplinks arrive (over them, dropped and the device told
//! to slow down), the cut-off at the broker of a device that ignores that, and the bound on
//! what waits to be handled. Runs in the task that drives the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use driftless_core::protocol::{BrokerAddr, Downlink, downlink_topic};
use rumqttc::{AsyncClient, Publish, QoS};

use crate::acks::{Acks, Ticket};
use crate::quota::{Admission, Quotas};

/// The quotas, the broker admin that cuts off a device that ignores them, and how many
/// messages wait to be handled.
pub(super) struct Guard {
    pub(super) quotas: Quotas,
    pub(super) admin: Option<BrokerAddr>,
    pub(super) cut_off: Duration,
    pub(super) queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Acknowledgements to the broker, sent in arrival order.
    pub(super) acks: Acks,
}

/// Messages waiting to be handled beyond which more are dropped unanswered (their devices
/// send them again): the broker bounds what it has in flight to the gateway, but not QoS 0
/// publishes, nor a flood from many device ids where no ACL stops it.
pub(super) const MAX_QUEUED: usize = 20_000;

impl Guard {
    /// Drops a message over its device's or tenant's quota, at once and without a store
    /// access or a place in the queue of messages to merge (so a flood is drained as fast as
    /// it comes): acknowledged to the broker, not answered (the device sends it again later),
    /// and the device told to slow down. Whether it was dropped. Called from the task that
    /// drives the connection, so nothing here may wait for the connection.
    pub(super) fn over_quota(&mut self, client: &AsyncClient, publish: &Publish, ticket: Ticket) -> bool {
        let Some((tenant, device)) = driftless_core::protocol::parse_uplink_topic(&publish.topic) else {
            // Not a topic any device has (an id no device may have): the handler would only
            // ignore it, so it costs nothing more here either.
            self.acks.done(client, ticket);
            return true;
        };
        let size = publish.payload.len();
        let Admission::Drop { retry_after, tell, cut_off } = self.quotas.admit(tenant, device, size, Instant::now())
        else {
            return false;
        };
        self.acks.done(client, ticket);
        if tell {
            tracing::warn!(
                tenant,
                device,
                ?retry_after,
                "a device is over its quota; its messages are dropped for now"
            );
            let slow = Downlink::SlowDown { retry_after_ms: (retry_after.as_millis() as u64).max(1) };
            let _ = client.try_publish(downlink_topic(tenant, device), QoS::AtLeastOnce, false, slow.encode());
        }
        if cut_off && let Some(admin) = self.admin.clone() {
            tokio::spawn(cut_off_for(admin, tenant.to_owned(), device.to_owned(), self.cut_off));
        }
        true
    }
}

/// Keeps a device that floods after being told to slow down off the broker for `cool_off`:
/// the flood then costs the broker nothing either. What it had not sent stays in its outbox.
async fn cut_off_for(admin: BrokerAddr, tenant: String, device: String, cool_off: Duration) {
    let disabled = async { crate::dynsec::Dynsec::connect(&admin).await?.disable_device(&tenant, &device).await };
    if let Err(e) = disabled.await {
        tracing::error!(%tenant, %device, "cutting off a flooding device at the broker: {e}");
        return;
    }
    tracing::warn!(%tenant, %device, ?cool_off, "a device floods after being told to slow down: cut off at the broker");
    tokio::time::sleep(cool_off).await;
    // Let in again whatever it takes (the broker restarting, an admin connection failing):
    // a device left disabled would be cut off for good. (A gateway stopped meanwhile leaves
    // that to `driftless-gateway device enable`.)
    let mut wait = Duration::from_secs(1);
    loop {
        let enabled = async { crate::dynsec::Dynsec::connect(&admin).await?.enable_device(&tenant, &device).await };
        match enabled.await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(%tenant, %device, "letting a cut-off device connect again failed, retrying in {wait:?}: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
    tracing::info!(%tenant, %device, "a device cut off for flooding may connect again");
}
