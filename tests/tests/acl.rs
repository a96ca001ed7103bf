//! Device identity at the broker: `driftless-gateway device add` gives each device credentials
//! and access to its own topics in a Mosquitto (dynamic-security plugin) the test starts; a
//! device cannot publish on another's topic, subscribe to another tenant, or pull another
//! tenant's snapshot, and a removed device is cut off.

use std::path::Path;
use std::time::Duration;

use driftless_core::protocol::{BrokerAddr, Uplink, downlink_topic, uplink_topic};
use driftless_gateway::dynsec;
use driftless_tests::procs::{agent, cli_device, gateway_as, gateway_ok};
use driftless_tests::*;
use rumqttc::{AsyncClient, Packet, QoS, SubscribeReasonCode};

const WAIT: Duration = Duration::from_secs(30);

fn sqlite_count(db: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// A raw client with a device's credentials and pinned client id.
async fn raw_client(port: u16, tenant: &str, device: &str, password: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let broker = BrokerAddr::plain("127.0.0.1", port).with_login(format!("{tenant}/{device}"), password);
    let opts =
        driftless_core::transport::mqtt_options(dynsec::device_client_id(tenant, device), &broker).expect("opts");
    AsyncClient::new(opts, 32)
}

async fn subscribe(client: &AsyncClient, events: &mut rumqttc::EventLoop, topic: &str) -> SubscribeReasonCode {
    client.subscribe(topic, QoS::AtLeastOnce).await.expect("subscribe");
    next_packet(events, |p| match p {
        Packet::SubAck(ack) => ack.return_codes.first().copied(),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_pins_each_device_to_its_own_topics_and_a_removed_device_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_broker, port, admin)) = dynsec_broker(dir.path()) else { return };
    let gw_db = dir.path().join("gw.db");
    let db = gw_db.to_str().expect("utf-8 path");
    let (fleet, other) = (tenant("acl"), tenant("acl-other"));
    let add = |tenant: &str, device: &str| {
        let args = ["device", "add", "--tenant", tenant, "--device", device, "--role", "field", "--db", db];
        printed_password(&gateway_ok(&[&args[..], &["--broker-admin", &admin]].concat()))
    };
    let (pw_a, pw_b, pw_m, _pw_c) = (add(&fleet, "a"), add(&fleet, "b"), add(&fleet, "m"), add(&other, "c"));
    let listed = gateway_ok(&["device", "list", "--db", db]);
    assert_eq!(listed.lines().count(), 5, "{listed}");

    // The gateway with its own broker login, serving every tenant.
    let gw_pw = printed_password(&gateway_ok(&["device", "add-gateway", "--name", "gw-1", "--broker-admin", &admin]));
    let gw_broker = BrokerAddr::plain("127.0.0.1", port).with_login("gw-1", gw_pw);
    let _gw = gateway_as("gw-1", &gw_broker, "+", &gw_db, &[]);
    let remove = || {
        gateway_ok(&["device", "remove", "--tenant", &fleet, "--device", "m", "--db", db, "--broker-admin", &admin]);
    };
    held_to_their_topics(port, dir.path(), &gw_db, (&fleet, &other), [&pw_a, &pw_b, &pw_m], remove).await;
}

/// The embedded broker, behind its guard, holds devices to the same rules with the
/// passwords `device add` issued, checked against the gateway's registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_pins_each_device_to_its_own_topics_and_a_removed_device_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw_db = dir.path().join("gw.db");
    let db = gw_db.to_str().expect("utf-8 path");
    let (fleet, other) = (tenant("acl-emb"), tenant("acl-emb-other"));
    let add = |tenant: &str, device: &str| {
        printed_password(&gateway_ok(&[
            "device", "add", "--tenant", tenant, "--device", device, "--role", "field", "--db", db,
        ]))
    };
    let (pw_a, pw_b, pw_m, _pw_c) = (add(&fleet, "a"), add(&fleet, "b"), add(&fleet, "m"), add(&other, "c"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let extra = ["--embedded-broker", "--embedded-broker-auth", "--listen", &listen];
    let _gw = gateway_as("gw-emb", &BrokerAddr::plain("127.0.0.1", port), "+", &gw_db, &extra);

    // Without credentials, with a wrong password, or with another device's client id: refused.
    let anonymous = try_connect(&dynsec::device_client_id(&fleet, "a"), &BrokerAddr::plain("127.0.0.1", port)).await;
    assert!(anonymous.is_err(), "a client without credentials connected");
    let as_a = BrokerAddr::plain("127.0.0.1", port).with_login(format!("{fleet}/a"), &pw_a);
    let wrong = BrokerAddr::plain("127.0.0.1", port).with_login(format!("{fleet}/a"), &pw_b);
    assert!(try_connect(&dynsec::device_client_id(&fleet, "a"), &wrong).await.is_err(), "a wrong password");
    assert!(try_connect(&dynsec::device_client_id(&fleet, "b"), &as_a).await.is_err(), "b's client id as a");
    try_connect(&dynsec::device_client_id(&fleet, "a"), &as_a).await.expect("a's own login");

    let remove = || {
        gateway_ok(&["device", "remove", "--tenant", &fleet, "--device", "m", "--db", db]);
    };
    held_to_their_topics(port, dir.path(), &gw_db, (&fleet, &other), [&pw_a, &pw_b, &pw_m], remove).await;
}

/// Devices a and b of `fleet` sync with their passwords; m tries what its credentials do not
/// allow, gets none of it, then is removed (`remove`) and cut off; a and b go on.
async fn held_to_their_topics(
    port: u16,
    dir: &Path,
    gw_db: &Path,
    (fleet, other): (&str, &str),
    [pw_a, pw_b, pw_m]: [&str; 3],
    remove: impl FnOnce(),
) {
    // Honest devices sync with their credentials.
    let login =
        |device: &str, pw: &str| BrokerAddr::plain("127.0.0.1", port).with_login(format!("{fleet}/{device}"), pw);
    let (a, b) = (cli_device(dir, "a"), cli_device(dir, "b"));
    let _agent_a = agent(&a, &login("a", pw_a), fleet, "a");
    let _agent_b = agent(&b, &login("b", pw_b), fleet, "b");
    exec(&a, "INSERT INTO inspections(id, site, stock) VALUES ('honest', 'x', 1)");
    eventually("b has a's row", WAIT, || rows(&b, "SELECT id FROM inspections").len() == 1).await;

    // m, a registered device, tries what its credentials do not allow.
    let (m, mut events) = raw_client(port, fleet, "m", pw_m).await;
    assert_eq!(
        subscribe(&m, &mut events, &downlink_topic(fleet, "m")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    for topic in
        [downlink_topic(fleet, "b"), downlink_topic(other, "c"), format!("driftless/{other}/#"), "driftless/#".into()]
    {
        assert_eq!(subscribe(&m, &mut events, &topic).await, SubscribeReasonCode::Failure, "{topic}");
    }
    // Garbage as b would be a dead letter of b's; a pull as c would make c's snapshot.
    m.publish(uplink_topic(fleet, "b"), QoS::AtLeastOnce, false, &b"forged"[..]).await.expect("publish");
    let pull = Uplink::Pull {
        device: "c".into(),
        epoch: None,
        cursor: None,
        receipts: vec![],
        max_rows: 100,
        max_bytes: 1 << 20,
        echo: Some(0),
    };
    m.publish(uplink_topic(other, "c"), QoS::AtLeastOnce, false, pull.encode()).await.expect("publish");
    // Its own message goes through: once answered, the forged ones would have been handled.
    let hello = Uplink::Hello {
        device: "m".into(),
        node: driftless_core::NodeId([5; 16]),
        counter: 0,
        outbox_seq: 0,
        receipts: vec![],
        epoch: None,
    };
    m.publish(uplink_topic(fleet, "m"), QoS::AtLeastOnce, false, hello.encode()).await.expect("publish");
    let down = downlink_topic(fleet, "m");
    next_packet(&mut events, |p| matches!(p, Packet::Publish(p) if p.topic == down).then_some(())).await;
    assert_eq!(sqlite_count(gw_db, "SELECT count(*) FROM gw_dead_letters"), 0, "nothing arrived as b");
    let q = format!("SELECT count(*) FROM gw_devices WHERE tenant = '{other}'");
    assert_eq!(sqlite_count(gw_db, &q), 0, "nothing arrived as c");

    // m is removed: the broker drops its connection and refuses it from then on.
    remove();
    let dropped = tokio::time::timeout(WAIT, async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "the removed device is still connected");
    let again = try_connect(&dynsec::device_client_id(fleet, "m"), &login("m", pw_m)).await;
    assert!(again.is_err(), "the removed device connected again");
    // The others go on.
    exec(&b, "INSERT INTO inspections(id, site, stock) VALUES ('after', 'y', 2)");
    eventually("a has b's row", WAIT, || rows(&a, "SELECT id FROM inspections").len() == 2).await;
}
