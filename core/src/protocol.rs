//! Sync messages between devices and the gateway, and the MQTT topics they travel on.
//!
//! Sans-IO: these are plain values with a byte encoding; the agent and the gateway publish
//! and receive them. Batches travel inside as encoded envelopes (see [`crate::codec`]).
//!
//! Every topic carries the tenant and the device id, so a broker ACL can pin each device to
//! its own topics, and the gateway checks that a message's claimed device matches its topic.

use crate::codec::buf::{Reader, Writer};
use crate::codec::{DecodeError, Limits};

/// Topic root shared by every driftless topic.
pub const TOPIC_ROOT: &str = "driftless";

/// A device's uplink topic (device -> gateway).
pub fn uplink_topic(tenant: &str, device: &str) -> String {
    format!("{TOPIC_ROOT}/{tenant}/{device}/up")
}

/// A device's downlink topic (gateway -> device).
pub fn downlink_topic(tenant: &str, device: &str) -> String {
    format!("{TOPIC_ROOT}/{tenant}/{device}/down")
}

/// The tenant-wide topic on which the gateway announces that new changes were logged.
pub fn poke_topic(tenant: &str) -> String {
    format!("{TOPIC_ROOT}/{tenant}/poke")
}

/// The filter gateways subscribe with; `$share/GROUP/` splits uplinks among instances.
/// `tenant` is `+` for all tenants, or one tenant for a deployment serving only it.
pub fn uplink_filter(share_group: &str, tenant: &str) -> String {
    format!("$share/{share_group}/{TOPIC_ROOT}/{tenant}/+/up")
}

/// Splits an uplink topic into `(tenant, device)`.
pub fn parse_uplink_topic(topic: &str) -> Option<(&str, &str)> {
    let mut parts = topic.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(TOPIC_ROOT), Some(tenant), Some(device), Some("up"), None) if valid_id(tenant) && valid_id(device) => {
            Some((tenant, device))
        }
        _ => None,
    }
}

/// Whether `id` can name a tenant or device: non-empty, at most 128 bytes, and free of
/// characters with a meaning in MQTT topics.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(['/', '+', '#', '\0']) && !id.starts_with('$')
}

/// Device -> gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// Local changes: outbox entries `first_seq..=last_seq` as an encoded batch envelope.
    Batch { device: String, first_seq: i64, last_seq: i64, batch: Vec<u8> },
    /// Asks for changes logged after `cursor`; cursor 0 asks for a snapshot first.
    Pull { device: String, cursor: u64, max_rows: u32 },
    /// Asks for the snapshot page after `resume` (opaque, from the previous page).
    PullSnapshot { device: String, resume: Vec<u8>, log_cursor: u64, max_rows: u32 },
}

/// Gateway -> device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downlink {
    /// The batch was merged and is durable: delete those outbox entries.
    Ack { first_seq: i64, last_seq: i64 },
    /// The batch was refused and kept as a dead letter: move those entries aside.
    Nack { first_seq: i64, last_seq: i64, reason: String },
    /// Changes logged after the pulled cursor, up to `cursor`; `more` if others follow.
    Changes { cursor: u64, more: bool, batch: Vec<u8> },
    /// One page of the current state. When `done`, continue with `Pull { cursor: log_cursor }`.
    Snapshot { resume: Vec<u8>, log_cursor: u64, done: bool, batch: Vec<u8> },
}

const UP_BATCH: u8 = 1;
const UP_PULL: u8 = 2;
const UP_PULL_SNAPSHOT: u8 = 3;
const DOWN_ACK: u8 = 1;
const DOWN_NACK: u8 = 2;
const DOWN_CHANGES: u8 = 3;
const DOWN_SNAPSHOT: u8 = 4;

impl Uplink {
    /// The device the message claims to come from.
    pub fn device(&self) -> &str {
        match self {
            Uplink::Batch { device, .. } | Uplink::Pull { device, .. } | Uplink::PullSnapshot { device, .. } => device,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Uplink::Batch { device, first_seq, last_seq, batch } => {
                w.u8(UP_BATCH);
                w.bytes(device.as_bytes());
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.raw(batch);
            }
            Uplink::Pull { device, cursor, max_rows } => {
                w.u8(UP_PULL);
                w.bytes(device.as_bytes());
                w.varint(*cursor);
                w.varint(u64::from(*max_rows));
            }
            Uplink::PullSnapshot { device, resume, log_cursor, max_rows } => {
                w.u8(UP_PULL_SNAPSHOT);
                w.bytes(device.as_bytes());
                w.bytes(resume);
                w.varint(*log_cursor);
                w.varint(u64::from(*max_rows));
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Uplink, DecodeError> {
        let mut r = Reader::new(bytes, limits);
        let tag = r.u8()?;
        let device = r.string(128, "device id bytes")?;
        let msg = match tag {
            UP_BATCH => {
                let first_seq = r.zigzag()?;
                let last_seq = r.zigzag()?;
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Uplink::Batch { device, first_seq, last_seq, batch });
            }
            UP_PULL => Uplink::Pull { device, cursor: r.varint()?, max_rows: max_rows(&mut r)? },
            UP_PULL_SNAPSHOT => Uplink::PullSnapshot {
                device,
                resume: r.bytes(4096, "snapshot resume token")?.to_vec(),
                log_cursor: r.varint()?,
                max_rows: max_rows(&mut r)?,
            },
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn max_rows(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    u32::try_from(r.varint()?).map_err(|_| DecodeError::Invalid("max_rows out of range"))
}

impl Downlink {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Downlink::Ack { first_seq, last_seq } => {
                w.u8(DOWN_ACK);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
            }
            Downlink::Nack { first_seq, last_seq, reason } => {
                w.u8(DOWN_NACK);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.bytes(reason.as_bytes());
            }
            Downlink::Changes { cursor, more, batch } => {
                w.u8(DOWN_CHANGES);
                w.varint(*cursor);
                w.u8(u8::from(*more));
                w.raw(batch);
            }
            Downlink::Snapshot { resume, log_cursor, done, batch } => {
                w.u8(DOWN_SNAPSHOT);
                w.bytes(resume);
                w.varint(*log_cursor);
                w.u8(u8::from(*done));
                w.raw(batch);
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Downlink, DecodeError> {
        let mut r = Reader::new(bytes, limits);
        let msg = match r.u8()? {
            DOWN_ACK => Downlink::Ack { first_seq: r.zigzag()?, last_seq: r.zigzag()? },
            DOWN_NACK => Downlink::Nack {
                first_seq: r.zigzag()?,
                last_seq: r.zigzag()?,
                reason: r.string(4096, "nack reason bytes")?,
            },
            DOWN_CHANGES => {
                let cursor = r.varint()?;
                let more = r.u8()? != 0;
                return Ok(Downlink::Changes { cursor, more, batch: r.take(r.remaining())?.to_vec() });
            }
            DOWN_SNAPSHOT => {
                let resume = r.bytes(4096, "snapshot resume token")?.to_vec();
                let log_cursor = r.varint()?;
                let done = r.u8()? != 0;
                return Ok(Downlink::Snapshot { resume, log_cursor, done, batch: r.take(r.remaining())?.to_vec() });
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let limits = Limits::default();
        let ups = [
            Uplink::Batch { device: "tab-1".into(), first_seq: 3, last_seq: 9, batch: vec![1, 2, 3] },
            Uplink::Pull { device: "tab-1".into(), cursor: 77, max_rows: 500 },
            Uplink::PullSnapshot { device: "tab-1".into(), resume: vec![9, 9], log_cursor: 12, max_rows: 500 },
        ];
        for m in ups {
            assert_eq!(Uplink::decode(&m.encode(), &limits), Ok(m));
        }
        let downs = [
            Downlink::Ack { first_seq: 1, last_seq: 2 },
            Downlink::Nack { first_seq: 1, last_seq: 2, reason: "bad".into() },
            Downlink::Changes { cursor: 5, more: true, batch: vec![4] },
            Downlink::Snapshot { resume: vec![1], log_cursor: 8, done: false, batch: vec![] },
        ];
        for m in downs {
            assert_eq!(Downlink::decode(&m.encode(), &limits), Ok(m));
        }
        assert!(Uplink::decode(&[9, 0], &limits).is_err());
        assert!(Downlink::decode(&[], &limits).is_err());
    }

    #[test]
    fn uplink_topics_name_tenant_and_device() {
        assert_eq!(parse_uplink_topic(&uplink_topic("acme", "tab-1")), Some(("acme", "tab-1")));
        assert_eq!(parse_uplink_topic("driftless/acme/tab-1/down"), None);
        assert_eq!(parse_uplink_topic("driftless/acme/tab-1/up/x"), None);
        assert!(!valid_id("a/b") && !valid_id("") && !valid_id("$SYS"));
    }
}

/// Where an MQTT broker listens, parsed from `mqtt://host:port` (or `tcp://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for BrokerAddr {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| "expected mqtt://HOST:PORT (TLS is not supported yet)".to_owned())?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
            None => (rest, 1883),
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(format!("bad host {host:?}"));
        }
        Ok(BrokerAddr { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port })
    }
}

#[cfg(test)]
mod url_tests {
    use super::BrokerAddr;

    #[test]
    fn broker_urls_parse_or_explain() {
        assert_eq!("mqtt://127.0.0.1:1883".parse(), Ok(BrokerAddr { host: "127.0.0.1".into(), port: 1883 }));
        assert_eq!("tcp://broker".parse(), Ok(BrokerAddr { host: "broker".into(), port: 1883 }));
        assert!("http://x:1".parse::<BrokerAddr>().is_err());
        assert!("mqtt://x:99999".parse::<BrokerAddr>().is_err());
        assert!("mqtt://:1883".parse::<BrokerAddr>().is_err());
    }
}
