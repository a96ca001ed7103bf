//! What a device may do at the broker, the same rules whichever broker enforces them
//! (Mosquitto's dynamic-security roles in `dynsec.rs`, the embedded broker's guard in
//! `guard.rs`): publish only on its own uplink, subscribe only to its own downlink, its
//! scope's topic (the default scope's, and the one its parameters give it) and its tenant's poke and schema topics, connect only with its own client id.

use driftless_core::protocol::{
    DEFAULT_SCOPE, client_id, downlink_topic, poke_topic, schema_topic, scope_topic, uplink_topic, valid_id,
};

/// The broker user name of a device.
pub fn device_username(tenant: &str, device: &str) -> String {
    format!("{tenant}/{device}")
}

/// The tenant and device a broker user name names.
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let (tenant, device) = username.split_once('/')?;
    (valid_id(tenant) && valid_id(device)).then_some((tenant, device))
}

/// A device's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    pub client_id: String,
    /// The one topic it may publish on.
    pub publish: String,
    /// The topics it may subscribe to (exactly these, no wildcards).
    pub subscribe: Vec<String>,
}

impl DeviceTopics {
    pub fn new(tenant: &str, device: &str) -> DeviceTopics {
        DeviceTopics {
            client_id: client_id(tenant, device),
            publish: uplink_topic(tenant, device),
            subscribe: vec![
                downlink_topic(tenant, device),
                scope_topic(tenant, DEFAULT_SCOPE),
                poke_topic(tenant),
                schema_topic(tenant),
            ],
        }
    }

    /// And the topic of `scope`, the one its gateway tells it to follow.
    pub fn with_scope(mut self, tenant: &str, scope: &str) -> DeviceTopics {
        let topic = scope_topic(tenant, scope);
        if !self.subscribe.contains(&topic) {
            self.subscribe.push(topic);
        }
        self
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        topic == self.publish
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|t| t == filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_reaches_its_own_topics_only() {
        let a = DeviceTopics::new("acme", "tab-a");
        assert!(a.may_publish("driftless/acme/tab-a/up"));
        for topic in ["driftless/acme/tab-b/up", "driftless/acme/tab-a/down", "driftless/acme/+/up", "driftless/#"] {
            assert!(!a.may_publish(topic), "{topic}");
        }
        for filter in [
            "driftless/acme/tab-a/down",
            "driftless/acme/scopes/all/changes",
            "driftless/acme/poke",
            "driftless/acme/schema",
        ] {
            assert!(a.may_subscribe(filter), "{filter}");
        }
        for filter in [
            "driftless/acme/tab-b/down",
            "driftless/acme/+/down",
            "driftless/other/poke",
            "driftless/other/scopes/all/changes",
            "driftless/acme/scopes/+/changes",
            "#",
            "$share/g/#",
        ] {
            assert!(!a.may_subscribe(filter), "{filter}");
        }
        let scoped = DeviceTopics::new("acme", "tab-a").with_scope("acme", "s00ff");
        assert!(scoped.may_subscribe("driftless/acme/scopes/s00ff/changes"));
        assert!(!scoped.may_subscribe("driftless/acme/scopes/s11ee/changes"), "only its own scope");
        assert_eq!(parse_username("acme/tab-a"), Some(("acme", "tab-a")));
        for bad in ["acme", "acme/", "/tab", "acme/tab/x", "acme/+", "$SYS/x"] {
            assert_eq!(parse_username(bad), None, "{bad}");
        }
    }
}
