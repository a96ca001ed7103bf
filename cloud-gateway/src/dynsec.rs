//! Device credentials and topic access in Mosquitto's dynamic-security plugin, set over MQTT
//! by the plugin's admin client (commands on `$CONTROL/dynamic-security/v1`).
//!
//! Each device gets a broker client `TENANT/DEVICE` (its MQTT client id pinned to the one the
//! agent uses) and a role of its own that may publish only on its uplink and subscribe only to
//! its downlink, its scopes' topics and its tenant's poke and schema topics. The gateway gets a role that may read
//! every uplink and write every downlink. What the broker enforces, the gateway checks again
//! (see `handler.rs` and `storage::vouching`): a broker misconfigured or bypassed cannot make
//! one device write as another.

use std::time::Duration;

use driftless_core::protocol::{BrokerAddr, DEFAULT_SCOPE, parse_scope_topic, scope_topic};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

use crate::broker::access::DeviceTopics;
pub use crate::broker::access::device_username;
pub use crate::broker::credentials::new_password;
use crate::error::{Error, Result};

const COMMANDS: &str = "$CONTROL/dynamic-security/v1";
const RESPONSES: &str = "$CONTROL/dynamic-security/v1/response";
/// The role every gateway instance's broker client has.
pub const GATEWAY_ROLE: &str = "driftless-gateway";

/// The MQTT client id a device's agent connects with (pinned in the broker).
pub fn device_client_id(tenant: &str, device: &str) -> String {
    driftless_core::protocol::client_id(tenant, device)
}

fn device_role(tenant: &str, device: &str) -> String {
    format!("driftless-device-{tenant}/{device}")
}

fn acl(kind: &str, topic: &str) -> Value {
    json!({ "acltype": kind, "topic": topic, "allow": true })
}

/// A connection to the broker as the dynamic-security admin.
pub struct Dynsec {
    client: AsyncClient,
    events: EventLoop,
}

impl std::fmt::Debug for Dynsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dynsec")
    }
}

impl Dynsec {
    /// Connects as the admin `broker` names (its URL carries the admin's credentials).
    pub async fn connect(broker: &BrokerAddr) -> Result<Dynsec> {
        let id = format!("driftless-admin-{}", &new_password()?[..8]);
        let opts = driftless_core::transport::mqtt_options(id, broker)
            .map_err(|e| Error::Config(format!("broker {broker}: {e}")))?;
        let (client, events) = AsyncClient::new(opts, 16);
        let mut admin = Dynsec { client, events };
        admin.client.subscribe(RESPONSES, QoS::AtLeastOnce).await?;
        admin.wait_for(|p| matches!(p, Packet::SubAck(_))).await?;
        Ok(admin)
    }

    /// Sends `commands` and returns each one's error (`None`: done), in order.
    async fn run(&mut self, commands: Vec<Value>) -> Result<Vec<Option<String>>> {
        let answers = self.answers(commands).await?;
        Ok(answers.iter().map(|r| r["error"].as_str().map(str::to_owned)).collect())
    }

    /// Sends `commands` and returns each one's answer, in order. Every admin client gets
    /// every answer: ours carry a token of our own.
    async fn answers(&mut self, mut commands: Vec<Value>) -> Result<Vec<Value>> {
        // The plugin does not answer an empty list.
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let n = commands.len();
        let token = new_password()?;
        for c in &mut commands {
            c["correlationData"] = json!(token);
        }
        let payload =
            serde_json::to_vec(&json!({ "commands": commands })).map_err(|e| Error::BrokerAdmin(e.to_string()))?;
        self.client.publish(COMMANDS, QoS::AtLeastOnce, false, payload).await?;
        let ours = |p: &Packet| match p {
            Packet::Publish(p) if p.topic == RESPONSES => serde_json::from_slice::<Value>(&p.payload)
                .is_ok_and(|v| v["responses"][0]["correlationData"] == json!(token)),
            _ => false,
        };
        let Packet::Publish(answer) = self.wait_for(ours).await? else {
            return Err(Error::BrokerAdmin("no answer from the dynamic-security plugin".into()));
        };
        let answer: Value = serde_json::from_slice(&answer.payload)
            .map_err(|e| Error::BrokerAdmin(format!("dynamic-security answer: {e}")))?;
        let responses = answer["responses"].as_array().cloned().unwrap_or_default();
        if responses.len() != n {
            return Err(Error::BrokerAdmin(format!(
                "dynamic-security answered {} of {n} commands: {answer}",
                responses.len()
            )));
        }
        Ok(responses)
    }

    /// Runs `commands`, failing on any error but the ones `tolerated` accepts.
    async fn run_all(&mut self, commands: Vec<Value>, tolerated: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = commands.iter().map(|c| c["command"].as_str().unwrap_or("?").to_owned()).collect();
        for (name, error) in names.iter().zip(self.run(commands).await?) {
            if let Some(e) = error.filter(|e| !tolerated(e)) {
                return Err(Error::BrokerAdmin(format!("dynamic-security {name}: {e}")));
            }
        }
        Ok(())
    }

    /// Gives `device` of `tenant` a broker client with `password` and access to its own
    /// topics only. A device added again gets the new password (its old one stops working).
    pub async fn add_device(&mut self, tenant: &str, device: &str, password: &str) -> Result<()> {
        self.remove_device(tenant, device).await?;
        let role = device_role(tenant, device);
        let topics = DeviceTopics::new(tenant, device);
        let mut acls = vec![acl("publishClientSend", &topics.publish)];
        acls.extend(topics.subscribe.iter().map(|t| acl("subscribeLiteral", t)));
        // Explicit, so a broker whose default denies delivery still delivers these.
        acls.extend(topics.subscribe.iter().map(|t| acl("publishClientReceive", t)));
        let commands = vec![
            json!({ "command": "createRole", "rolename": role, "acls": acls }),
            json!({
                "command": "createClient",
                "username": device_username(tenant, device),
                "password": password,
                "clientid": device_client_id(tenant, device),
                "roles": [{ "rolename": role }],
            }),
        ];
        self.run_all(commands, |_| false).await
    }

    /// Lets a device subscribe to the topic of its scope `now` (`None`: none besides the
    /// default scope's) and to no other scope's: every other rule its role holds for a scope
    /// topic of its tenant goes, whatever put it there (an earlier scope, an update that
    /// failed half-way). Checked afterwards: a role changed meanwhile by another admin is an
    /// error, not a guess. Mosquitto disconnects the clients of a role it changes: the device
    /// connects again, and its gateway tells it its scope.
    pub async fn follow_scope(&mut self, tenant: &str, device: &str, now: Option<&str>) -> Result<()> {
        let role = device_role(tenant, device);
        let keep = [Some(scope_topic(tenant, DEFAULT_SCOPE)), now.map(|s| scope_topic(tenant, s))];
        let mut commands = Vec::new();
        for (kind, topic) in self.scope_rules(tenant, &role).await? {
            if !keep.iter().flatten().any(|k| *k == topic) {
                commands.push(json!({ "command": "removeRoleACL", "rolename": role, "acltype": kind, "topic": topic }));
            }
        }
        if let Some(topic) = &keep[1] {
            for kind in ["subscribeLiteral", "publishClientReceive"] {
                commands.push(json!({
                    "command": "addRoleACL", "rolename": role, "acltype": kind, "topic": topic, "allow": true
                }));
            }
        }
        // A rule already there is what was asked; anything else (no such role) is not.
        self.run_all(commands, |e| e.contains("already exists")).await?;
        let left: Vec<String> = self.scope_rules(tenant, &role).await?.into_iter().map(|(_, topic)| topic).collect();
        if left.iter().any(|t| !keep.iter().flatten().any(|k| k == t)) {
            return Err(Error::BrokerAdmin(format!(
                "role {role} holds scope topics {left:?} after the update (changed meanwhile?): run it again"
            )));
        }
        Ok(())
    }

    /// The rules of `role` for scope topics of `tenant`: (ACL type, topic).
    async fn scope_rules(&mut self, tenant: &str, role: &str) -> Result<Vec<(String, String)>> {
        let got = self.answers(vec![json!({ "command": "getRole", "rolename": role })]).await?;
        let held = got.first().cloned().unwrap_or_default();
        if let Some(e) = held["error"].as_str() {
            return Err(Error::BrokerAdmin(format!("dynamic-security getRole {role}: {e}")));
        }
        let Some(rules) = held["data"]["role"]["acls"].as_array() else {
            return Err(Error::BrokerAdmin(format!("dynamic-security getRole {role}: no rules in {held}")));
        };
        Ok(rules
            .iter()
            .filter_map(|r| Some((r["acltype"].as_str()?.to_owned(), r["topic"].as_str()?.to_owned())))
            .filter(|(_, topic)| parse_scope_topic(topic).is_some_and(|(t, _)| t == tenant))
            .collect())
    }

    /// Revokes a device's broker client (disconnecting it) and its role.
    pub async fn remove_device(&mut self, tenant: &str, device: &str) -> Result<()> {
        let username = device_username(tenant, device);
        let commands = vec![
            json!({ "command": "disableClient", "username": username }),
            json!({ "command": "deleteClient", "username": username }),
            json!({ "command": "deleteRole", "rolename": device_role(tenant, device) }),
        ];
        self.run_all(commands, |e| e.contains("not found")).await
    }

    /// Disconnects a device and keeps it out until [`Dynsec::enable_device`].
    pub async fn disable_device(&mut self, tenant: &str, device: &str) -> Result<()> {
        let username = device_username(tenant, device);
        self.run_all(vec![json!({ "command": "disableClient", "username": username })], |_| false).await
    }

    /// Lets a disabled device connect again.
    pub async fn enable_device(&mut self, tenant: &str, device: &str) -> Result<()> {
        let username = device_username(tenant, device);
        self.run_all(vec![json!({ "command": "enableClient", "username": username })], |_| false).await
    }

    /// Gives a gateway instance a broker client `name` with `password`: it reads every
    /// uplink (through a shared subscription) and writes every downlink, poke and schema.
    pub async fn add_gateway(&mut self, name: &str, password: &str) -> Result<()> {
        let acls = vec![
            acl("subscribePattern", "driftless/#"),
            acl("subscribePattern", "$share/#"),
            acl("publishClientSend", "driftless/#"),
            acl("publishClientReceive", "driftless/#"),
        ];
        let commands = vec![json!({ "command": "createRole", "rolename": GATEWAY_ROLE, "acls": acls })];
        self.run_all(commands, |e| e.contains("already exists")).await?;
        let commands = vec![
            json!({ "command": "deleteClient", "username": name }),
            json!({
                "command": "createClient",
                "username": name,
                "password": password,
                "roles": [{ "rolename": GATEWAY_ROLE }],
            }),
        ];
        self.run_all(commands, |e| e.contains("not found")).await
    }

    async fn wait_for(&mut self, wanted: impl Fn(&Packet) -> bool) -> Result<Packet> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.poll())
                .await
                .map_err(|_| Error::BrokerAdmin("the broker did not answer the admin in 10 s".into()))?
                .map_err(|e| Error::BrokerAdmin(format!("admin connection: {e}")))?;
            if let Event::Incoming(packet) = event
                && wanted(&packet)
            {
                return Ok(packet);
            }
        }
    }
}
