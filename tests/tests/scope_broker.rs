//! Fan-out by scope through a real Mosquitto with its dynamic-security plugin, a gateway
//! process and real agents: `device params --broker-admin` lets each device subscribe to its
//! own scope's topic and no other, and each change is published once on the topic of its
//! scope, with its rows, for the broker to hand to the devices holding it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use driftless_core::codec::{Dictionaries, Limits, decode_batch};
use driftless_core::protocol::{BrokerAddr, Downlink, scope_topic};
use driftless_gateway::storage::chains::scope_of;
use driftless_gateway::{SqliteStore, dynsec};
use driftless_tests::procs::{agent, gateway_as, gateway_ok};
use driftless_tests::*;
use rumqttc::{AsyncClient, Packet, QoS, SubscribeReasonCode};

const WAIT: Duration = Duration::from_secs(30);

const SCHEMA: &str = r#"
roles = ["field"]

[[table]]
name = "work_orders"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"
"#;

/// A device database that has never synced: its tables come with the gateway's schema.
fn blank_device(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.db"));
    drop(driftless_core::Store::open(&path, driftless_core::StoreOptions::default()).expect("open"));
    path
}

fn held(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    let Ok(mut stmt) = conn.prepare("SELECT id FROM work_orders ORDER BY id") else { return Vec::new() };
    stmt.query_map([], |r| r.get(0)).expect("query").collect::<rusqlite::Result<_>>().expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_goes_once_to_its_scopes_topic_and_only_its_devices_may_hear_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_broker, port, admin)) = dynsec_broker(dir.path()) else { return };
    let gw_db = dir.path().join("gw.db");
    let db = gw_db.to_str().expect("utf-8 path");
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).expect("schema");
    let fleet = tenant("scope-acl");
    let add = |device: &str| {
        let args = ["device", "add", "--tenant", &fleet, "--device", device, "--role", "field", "--db", db];
        printed_password(&gateway_ok(&[&args[..], &["--broker-admin", &admin]].concat()))
    };
    let (pw_n1, pw_s1, pw_watch) = (add("n1"), add("s1"), add("watch"));
    let gw_pw = printed_password(&gateway_ok(&["device", "add-gateway", "--name", "gw-1", "--broker-admin", &admin]));
    let gw_broker = BrokerAddr::plain("127.0.0.1", port).with_login("gw-1", gw_pw);
    let _gw = gateway_as("gw-1", &gw_broker, &fleet, &gw_db, &["--schema", schema.to_str().expect("utf-8")]);
    for (device, region) in [("n1", "north"), ("s1", "south"), ("watch", "north")] {
        let param = format!("region={region}");
        let args = ["device", "params", "--tenant", &fleet, "--device", device, "--param", &param, "--db", db];
        gateway_ok(&[&args[..], &["--broker-admin", &admin]].concat());
    }
    let mut store = SqliteStore::open(&gw_db).expect("gateway store");
    let mut scope = |device: &str| scope_of(&mut store, &fleet, device).expect("read").expect("a scope");
    let (north, south) = (scope("n1"), scope("s1"));
    assert_eq!(scope("watch"), north, "the same parameters, the same scope");
    assert_ne!(north, south);

    // A north device hears its scope's topic, and may not subscribe to the south's or to all.
    let opts_watch = || {
        let login = BrokerAddr::plain("127.0.0.1", port).with_login(format!("{fleet}/watch"), &pw_watch);
        driftless_core::transport::mqtt_options(dynsec::device_client_id(&fleet, "watch"), &login).expect("opts")
    };
    let (watch, mut events) = AsyncClient::new(opts_watch(), 32);
    for (topic, granted) in [
        (scope_topic(&fleet, &north), true),
        (scope_topic(&fleet, &south), false),
        (format!("driftless/{fleet}/scopes/+/changes"), false),
    ] {
        watch.subscribe(&topic, QoS::AtMostOnce).await.expect("subscribe");
        let code = next_packet(&mut events, |p| match p {
            Packet::SubAck(ack) => ack.return_codes.first().copied(),
            _ => None,
        })
        .await;
        assert_eq!(code != SubscribeReasonCode::Failure, granted, "{topic}: {code:?}");
    }

    let login =
        |device: &str, pw: &str| BrokerAddr::plain("127.0.0.1", port).with_login(format!("{fleet}/{device}"), pw);
    let (n1, s1) = (blank_device(dir.path(), "n1"), blank_device(dir.path(), "s1"));
    let _agent_n1 = agent(&n1, &login("n1", &pw_n1), &fleet, "n1");
    let _agent_s1 = agent(&s1, &login("s1", &pw_s1), &fleet, "s1");
    eventually("the devices took the schema", WAIT, || {
        [&n1, &s1].iter().all(|d| {
            rusqlite::Connection::open(d).and_then(|c| c.prepare("SELECT 1 FROM work_orders").map(|_| ())).is_ok()
        })
    })
    .await;
    exec(&s1, "INSERT INTO work_orders VALUES ('s-1', 'south')");
    exec(&n1, "INSERT INTO work_orders VALUES ('n-1', 'north')");
    // The north's change, once, with its row, on the north's topic; nothing of the south's.
    let topic = scope_topic(&fleet, &north);
    let feed = next_packet(&mut events, |p| match p {
        Packet::Publish(p) if p.topic == topic => Some(p.payload.clone()),
        Packet::Publish(p) => panic!("heard {} on a topic it may not hear", p.topic),
        _ => None,
    })
    .await;
    let Ok(Downlink::Feed { scope, origin, batch, .. }) = Downlink::decode(&feed, &Limits::default()) else {
        panic!("not a scope change")
    };
    assert_eq!((scope.as_str(), origin.as_str()), (north.as_str(), "n1"));
    let rows = decode_batch(&batch, &Limits::default(), &Dictionaries::default()).expect("its rows").rows;
    assert_eq!(rows.iter().map(|r| r.pk.clone()).collect::<Vec<_>>(), vec![vec![text("n-1")]]);
    eventually("each device holds its region", WAIT, || held(&n1) == ["n-1"] && held(&s1) == ["s-1"]).await;

    // Moved to the south: its role now grants the south's topic, and the north's no more.
    let args = ["device", "params", "--tenant", &fleet, "--device", "watch", "--param", "region=south", "--db", db];
    gateway_ok(&[&args[..], &["--broker-admin", &admin]].concat());
    drop(watch);
    drop(events);
    let (watch, mut events) = AsyncClient::new(opts_watch(), 32);
    for (topic, granted) in [(scope_topic(&fleet, &south), true), (scope_topic(&fleet, &north), false)] {
        watch.subscribe(&topic, QoS::AtMostOnce).await.expect("subscribe");
        let code = next_packet(&mut events, |p| match p {
            Packet::SubAck(ack) => ack.return_codes.first().copied(),
            _ => None,
        })
        .await;
        assert_eq!(code != SubscribeReasonCode::Failure, granted, "{topic}: {code:?}");
    }
}
