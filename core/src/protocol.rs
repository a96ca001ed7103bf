//! Sync messages between devices and the gateway, and the MQTT topics they travel on.
//!
//! Sans-IO: these are plain values with a byte encoding; the agent and the gateway publish
//! and receive them. Batches travel inside as encoded envelopes (see [`crate::codec`]).
//! The exchange itself (handshake, acks, pulls) is described in `docs/PROTOCOL.md`.
//!
//! Every topic carries the tenant and the device id, so a broker ACL can pin each device to
//! its own topics, and the gateway checks that a message's claimed device matches its topic.

mod broker;
mod messages;
mod receipts;

pub use self::broker::{BrokerAddr, Tls};
pub use self::messages::{Downlink, MAX_SCHEMA_BYTES, RefusedRow, Uplink};
pub use self::receipts::{MAX_RECEIPTS, Receipt, Receipts};

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

/// The scope every device of a tenant holds when its sync schema declares no scopes: all of
/// the tenant's rows.
pub const DEFAULT_SCOPE: &str = "all";

/// The topic on which the gateway publishes each change logged in a scope ([`Downlink::Feed`]),
/// once, for the broker to fan out to the devices holding it. Five levels, so no device's
/// own topics (four levels) can ever name it.
pub fn scope_topic(tenant: &str, scope: &str) -> String {
    format!("{TOPIC_ROOT}/{tenant}/scopes/{scope}/changes")
}

/// The tenant and scope a scope's topic names.
pub fn parse_scope_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (tenant, rest) = rest.split_once('/')?;
    let scope = rest.strip_prefix("scopes/")?.strip_suffix("/changes")?;
    (!scope.contains('/')).then_some((tenant, scope))
}

/// The payload of a poke: the cursor of the newest entry the gateway logged (position as a
/// varint, tag as 8 bytes little-endian). Devices of earlier versions ignore it; a device
/// that heard the scope's changes up to there has nothing to pull.
pub fn encode_announcement(head: LogCursor) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    let mut v = head.position;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&head.tag.to_le_bytes());
    out
}

/// The newest entry a poke announces; `None` for an empty or malformed payload (a gateway of
/// an earlier version), which says only that something was logged.
pub fn decode_announcement(payload: &[u8]) -> Option<LogCursor> {
    let (mut position, mut shift, mut at) = (0u64, 0u32, 0usize);
    loop {
        let byte = *payload.get(at)?;
        at += 1;
        if shift > 63 || (shift == 63 && byte > 1) {
            return None;
        }
        position |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let tag: [u8; 8] = payload.get(at..)?.try_into().ok()?;
    Some(LogCursor { position, tag: u64::from_le_bytes(tag) })
}

/// The tenant-wide topic on which the gateway keeps the current sync schema (retained).
pub fn schema_topic(tenant: &str) -> String {
    format!("{TOPIC_ROOT}/{tenant}/schema")
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

/// The MQTT client id a device connects with: the tenant's length first, so no two devices
/// of any tenants share one ("acme-eu"/"tab" and "acme"/"eu-tab" differ), in characters
/// every broker takes.
pub fn client_id(tenant: &str, device: &str) -> String {
    format!("driftless-{}-{tenant}-{device}", tenant.len())
}

/// Whether `id` can name a tenant or device: non-empty, at most 128 bytes, and free of
/// characters with a meaning in MQTT topics.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(['/', '+', '#', '\0']) && !id.starts_with('$')
}

/// A position in a gateway's log and the tag of the entry there. The tag lets the gateway tell
/// a log that was rolled back and written again (a restored backup) from the one the position
/// was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogCursor {
    pub position: u64,
    /// 0 when unknown (a cursor saved by an older version).
    pub tag: u64,
}

/// The identity of a gateway store: random, made with the store, and made anew when the
/// store is found to have lost changes it had acknowledged (it was restored from an older
/// backup). Every downlink carries it; a device that sees it change re-sends what it holds
/// and fetches the current state again.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub [u8; 16]);

impl Epoch {
    /// A fresh random epoch.
    pub fn random() -> Result<Epoch, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Epoch(bytes))
    }
}

// Written like node ids: 32 hex digits, eight in debug output.
impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&crate::NodeId(self.0), f)
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Epoch({})", &self.to_string()[..8])
    }
}

impl std::str::FromStr for Epoch {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.parse::<crate::clock::NodeId>().map(|n| Epoch(n.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_round_trip_through_hex() {
        let e = Epoch([7; 16]);
        assert_eq!(e.to_string().parse::<Epoch>(), Ok(e));
    }

    #[test]
    fn uplink_topics_name_tenant_and_device() {
        assert_eq!(parse_uplink_topic(&uplink_topic("acme", "tab-1")), Some(("acme", "tab-1")));
        assert_eq!(parse_uplink_topic("driftless/acme/tab-1/down"), None);
        assert_eq!(parse_uplink_topic("driftless/acme/tab-1/up/x"), None);
        assert!(!valid_id("a/b") && !valid_id("") && !valid_id("$SYS"));
    }

    #[test]
    fn announcements_round_trip_and_anything_else_says_nothing() {
        for head in
            [LogCursor::default(), LogCursor { position: 300, tag: 9 }, LogCursor { position: u64::MAX, tag: u64::MAX }]
        {
            assert_eq!(decode_announcement(&encode_announcement(head)), Some(head));
        }
        for bad in [&[][..], &[0x80][..], &[5, 1, 2][..], &[0xff; 11][..]] {
            assert_eq!(decode_announcement(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn client_ids_of_devices_of_different_tenants_differ() {
        assert_ne!(client_id("acme-eu", "tab"), client_id("acme", "eu-tab"));
        assert_eq!(client_id("acme", "tab-1"), "driftless-4-acme-tab-1");
    }
}
