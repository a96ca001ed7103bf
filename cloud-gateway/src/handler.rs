//! What the gateway does with one uplink message: pure logic over a [`GatewayStore`],
//! returning the messages to publish. No sockets here, so it is tested without a broker.

use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::protocol::{Downlink, Uplink, downlink_topic, parse_uplink_topic};

use crate::error::Result;
use crate::storage::GatewayStore;

/// What to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A message for one device.
    Reply { topic: String, payload: Vec<u8> },
    /// Tell a tenant's devices that new changes were logged (the service coalesces these).
    Poke { tenant: String },
}

/// Bounds the gateway applies to what devices send and ask for.
#[derive(Debug, Clone)]
pub struct HandlerLimits {
    pub decode: Limits,
    /// Most rows sent in one downlink message.
    pub max_rows_per_message: usize,
    /// Most bytes in one downlink message: pages are halved until they fit (one log entry or
    /// one row is always sent, whatever its size).
    pub max_message_bytes: usize,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        // The same decode bounds as devices, so a batch a device may build is one the gateway
        // accepts.
        HandlerLimits { decode: Limits::default(), max_rows_per_message: 2_000, max_message_bytes: 4 << 20 }
    }
}

fn to(tenant: &str, device: &str, msg: Downlink) -> Outgoing {
    Outgoing::Reply { topic: downlink_topic(tenant, device), payload: msg.encode() }
}

/// Handles one uplink publish. Refused input becomes a dead letter (and a nack when it was a
/// batch), never an error: only storage failures are errors, and then nothing is acked, so the
/// broker redelivers.
pub fn handle_uplink(
    store: &mut dyn GatewayStore,
    limits: &HandlerLimits,
    topic: &str,
    payload: &[u8],
) -> Result<Vec<Outgoing>> {
    match process(store, limits, topic, payload) {
        // Anything but a storage failure was caused by this message (a forged resume token,
        // a row state grown past the limits): keep it as a dead letter and carry on, so one
        // message can never stop the gateway.
        Err(e) if !matches!(e, crate::error::Error::Sqlite(_)) => {
            let Some((tenant, device)) = parse_uplink_topic(topic) else { return Ok(Vec::new()) };
            let reason = format!("message refused: {e}");
            tracing::warn!(tenant, device, %reason);
            store.dead_letter(tenant, device, &reason, payload)?;
            Ok(match Uplink::decode(payload, &limits.decode) {
                Ok(Uplink::Batch { first_seq, last_seq, .. }) => {
                    vec![to(tenant, device, Downlink::Nack { first_seq, last_seq, reason })]
                }
                _ => Vec::new(),
            })
        }
        other => other,
    }
}

fn process(store: &mut dyn GatewayStore, limits: &HandlerLimits, topic: &str, payload: &[u8]) -> Result<Vec<Outgoing>> {
    let Some((tenant, device)) = parse_uplink_topic(topic) else {
        tracing::warn!(topic, "ignoring a message on a topic that is not an uplink");
        return Ok(Vec::new());
    };
    let msg = match Uplink::decode(payload, &limits.decode) {
        Ok(m) => m,
        Err(e) => {
            store.dead_letter(tenant, device, &format!("undecodable message: {e}"), payload)?;
            return Ok(Vec::new());
        }
    };
    if msg.device() != device {
        let reason = format!("message claims device {:?} but arrived on the topic of {device:?}", msg.device());
        tracing::warn!(tenant, device, %reason, "refusing a message");
        store.dead_letter(tenant, device, &reason, payload)?;
        return Ok(match msg {
            Uplink::Batch { first_seq, last_seq, .. } => {
                vec![to(tenant, device, Downlink::Nack { first_seq, last_seq, reason })]
            }
            _ => Vec::new(),
        });
    }
    let max_rows = |asked: u32| (asked as usize).clamp(1, limits.max_rows_per_message);
    match msg {
        Uplink::Batch { first_seq, last_seq, batch, .. } => {
            let decoded = match decode_batch(&batch, &limits.decode, &Dictionaries::default()) {
                Ok(b) => b,
                Err(e) => {
                    let reason = format!("batch refused: {e}");
                    store.dead_letter(tenant, device, &reason, &batch)?;
                    return Ok(vec![to(tenant, device, Downlink::Nack { first_seq, last_seq, reason })]);
                }
            };
            let outcome = store.merge(tenant, device, first_seq, last_seq, &decoded)?;
            tracing::debug!(
                tenant,
                device,
                first_seq,
                last_seq,
                applied = outcome.applied,
                duplicates = outcome.duplicates,
                "merged"
            );
            let mut out = vec![to(tenant, device, Downlink::Ack { first_seq, last_seq })];
            if outcome.logged_at.is_some() {
                out.push(Outgoing::Poke { tenant: tenant.to_owned() });
            }
            Ok(out)
        }
        Uplink::Pull { cursor: 0, max_rows: asked, .. } => {
            // A device with no cursor starts from a snapshot of current state, not the history.
            let log_cursor = store.log_head(tenant)?;
            store.touch_device(tenant, device, None)?;
            snapshot(store, limits, tenant, device, &[], log_cursor, max_rows(asked))
        }
        Uplink::Pull { cursor, max_rows: asked, .. } => {
            let head = store.log_head(tenant)?;
            if cursor > head {
                // A cursor beyond the log (the gateway's store was restored from an older
                // backup, or the device synced with another deployment): start the device over
                // from a snapshot rather than leave it waiting for positions that will mean
                // other changes.
                tracing::warn!(tenant, device, cursor, "cursor beyond the log; sending a snapshot");
                return snapshot(store, limits, tenant, device, &[], head, max_rows(asked));
            }
            store.touch_device(tenant, device, Some(cursor))?;
            let mut rows = max_rows(asked);
            loop {
                let page = store.changes_after(tenant, device, cursor, rows)?;
                let batch = encode_batch(&page.batch, EncodeOptions::default());
                if batch.len() <= limits.max_message_bytes || rows == 1 {
                    return Ok(vec![to(
                        tenant,
                        device,
                        Downlink::Changes { cursor: page.cursor, more: page.more, batch },
                    )]);
                }
                rows /= 2;
            }
        }
        Uplink::PullSnapshot { resume, log_cursor, max_rows: asked, .. } => {
            store.touch_device(tenant, device, None)?;
            snapshot(store, limits, tenant, device, &resume, log_cursor, max_rows(asked))
        }
    }
}

fn snapshot(
    store: &mut dyn GatewayStore,
    limits: &HandlerLimits,
    tenant: &str,
    device: &str,
    resume: &[u8],
    log_cursor: u64,
    max_rows: usize,
) -> Result<Vec<Outgoing>> {
    let mut rows = max_rows;
    loop {
        let page = store.snapshot_page(tenant, resume, rows)?;
        let batch = encode_batch(&page.batch, EncodeOptions::default());
        if batch.len() <= limits.max_message_bytes || rows == 1 {
            return Ok(vec![to(
                tenant,
                device,
                Downlink::Snapshot { resume: page.resume, log_cursor, done: page.done, batch },
            )]);
        }
        rows /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SqliteStore;

    fn reply(out: &[Outgoing]) -> Downlink {
        match out {
            [Outgoing::Reply { payload, .. }, ..] => Downlink::decode(payload, &Limits::default()).expect("downlink"),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_claiming_another_device_is_nacked_and_dead_lettered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        let msg = Uplink::Batch { device: "b".into(), first_seq: 1, last_seq: 2, batch: vec![] };
        let out =
            handle_uplink(&mut store, &HandlerLimits::default(), "driftless/t/a/up", &msg.encode()).expect("handled");
        assert!(matches!(reply(&out), Downlink::Nack { first_seq: 1, last_seq: 2, .. }));
        let letters = store.dead_letters("t").expect("dead letters");
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].device, "a");
    }

    #[test]
    fn garbage_is_dead_lettered_without_a_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        let out = handle_uplink(&mut store, &HandlerLimits::default(), "driftless/t/a/up", b"\xff\x00garbage")
            .expect("handled");
        assert!(out.is_empty());
        assert_eq!(store.dead_letters("t").expect("dead letters").len(), 1);
        // Not an uplink topic at all: ignored.
        assert!(handle_uplink(&mut store, &HandlerLimits::default(), "elsewhere", b"x").expect("handled").is_empty());
    }

    #[test]
    fn a_forged_snapshot_token_is_dead_lettered_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        let msg = Uplink::PullSnapshot { device: "a".into(), resume: vec![0xff; 9], log_cursor: 0, max_rows: 10 };
        let out =
            handle_uplink(&mut store, &HandlerLimits::default(), "driftless/t/a/up", &msg.encode()).expect("handled");
        assert!(out.is_empty());
        assert!(store.dead_letters("t").expect("dead letters")[0].reason.contains("refused"));
    }

    #[test]
    fn a_cursor_beyond_the_log_starts_the_device_over_from_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        let msg = Uplink::Pull { device: "a".into(), cursor: 99, max_rows: 10 };
        let out =
            handle_uplink(&mut store, &HandlerLimits::default(), "driftless/t/a/up", &msg.encode()).expect("handled");
        assert!(matches!(reply(&out), Downlink::Snapshot { log_cursor: 0, done: true, .. }));
    }
}
