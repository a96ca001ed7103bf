//! End to end: a real gateway and real agents over a real MQTT broker (embedded, and the one
//! at DRIFTLESS_TEST_MQTT_URL when set). Each scenario asserts exact table contents.

use std::time::Duration;

use driftless_core::codec::{EncodeOptions, encode_batch};
use driftless_core::protocol::{Uplink, uplink_topic};
use driftless_core::{Store, StoreOptions, Value};
use driftless_gateway::storage::{DeadLetterFilter, Incoming};
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::*;
use rumqttc::{AsyncClient, MqttOptions, QoS};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_on_both_sides_converge() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("offline");
        let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
        exec(&a, "INSERT INTO inspections VALUES ('i1', 'north', 'open', '', 10)");
        exec(&b, "INSERT INTO inspections VALUES ('i2', 'south', 'open', '', 4)");
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let agent_a = start_agent(&a, &broker, &tenant, "tab-a").await;
        let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
        eventually("both rows on both devices", WAIT, || rows(&a, ALL).len() == 2 && rows(&b, ALL).len() == 2).await;

        // b goes offline; both edit the same row.
        agent_b.stop().await;
        exec(&a, "UPDATE inspections SET status = 'done', stock = stock - 3 WHERE id = 'i1'");
        exec(&b, "UPDATE inspections SET notes = 'leak at flange', stock = stock - 2 WHERE id = 'i1'");
        let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
        let expected = vec![
            vec![text("i1"), text("north"), text("done"), text("leak at flange"), Value::Integer(5)],
            vec![text("i2"), text("south"), text("open"), text(""), Value::Integer(4)],
        ];
        eventually("merged row on a", WAIT, || rows(&a, ALL) == expected).await;
        eventually("merged row on b", WAIT, || rows(&b, ALL) == expected).await;
        eventually("outboxes drained", WAIT, || {
            [&a, &b]
                .iter()
                .all(|d| Store::open(d, StoreOptions::default()).and_then(|s| s.pending_changes()).ok() == Some(0))
        })
        .await;
        agent_a.stop().await;
        agent_b.stop().await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_bootstraps_from_a_snapshot_then_syncs_incrementally() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("bootstrap");
        let a = device_db(dir.path(), "a");
        for i in 0..40 {
            exec(&a, &format!("INSERT INTO inspections VALUES ('i{i:02}', 'site', 'open', '', {i})"));
        }
        exec(&a, "DELETE FROM inspections WHERE id = 'i07'; UPDATE inspections SET status = 'closed' WHERE id < 'i10'");
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let agent_a = start_agent(&a, &broker, &tenant, "tab-a").await;
        eventually("a drained", WAIT, || {
            Store::open(&a, StoreOptions::default()).and_then(|s| s.pending_changes()).ok() == Some(0)
        })
        .await;
        let fresh = device_db(dir.path(), "fresh");
        let agent_f = start_agent(&fresh, &broker, &tenant, "tab-new").await;
        eventually("fresh device has the current state", WAIT, || rows(&fresh, ALL) == rows(&a, ALL)).await;
        assert_eq!(rows(&fresh, ALL).len(), 39);
        exec(&a, "UPDATE inspections SET stock = stock + 100 WHERE id = 'i20'");
        exec(&fresh, "UPDATE inspections SET stock = stock + 1 WHERE id = 'i20'");
        let want = vec![vec![Value::Integer(121)]];
        let stock = "SELECT stock FROM inspections WHERE id = 'i20'";
        eventually("incremental sync after bootstrap", WAIT, || rows(&a, stock) == want && rows(&fresh, stock) == want)
            .await;
        agent_a.stop().await;
        agent_f.stop().await;
        gw.stop().await;
    }
}

/// A raw MQTT client, to send what a misbehaving or retrying device would.
async fn raw_client(broker: &driftless_core::protocol::BrokerAddr, id: &str) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, &broker.host, broker.port), 64);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_delivered_five_times_applies_once() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("dup");
        let src = device_db(dir.path(), "src");
        exec(&src, "INSERT INTO inspections VALUES ('bolts', 'yard', 'ok', '', 100)");
        exec(&src, "UPDATE inspections SET stock = stock - 7");
        let mut store = Store::open(&src, StoreOptions::default()).expect("open");
        let out = store.outbox_batch(100).expect("outbox").expect("batch");
        let bytes = encode_batch(&out.batch, EncodeOptions::default());
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let client = raw_client(&broker, &format!("raw-{tenant}")).await;
        let msg = Uplink::Batch {
            device: "src".into(),
            id: 7,
            first_seq: out.first_seq,
            last_seq: out.last_seq,
            epoch: None,
            receipts: vec![],
            batch: bytes,
        };
        for _ in 0..5 {
            client.publish(uplink_topic(&tenant, "src"), QoS::AtLeastOnce, false, msg.encode()).await.expect("publish");
        }
        let b = device_db(dir.path(), "b");
        let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
        let want = vec![vec![text("bolts"), Value::Integer(93)]];
        eventually("counter arrives once", WAIT, || rows(&b, "SELECT id, stock FROM inspections") == want).await;
        // Give the remaining duplicates time to be merged, then check nothing moved.
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent_b.sync_now().expect("sync");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rows(&b, "SELECT id, stock FROM inspections"), want);
        let mut gw_store = SqliteStore::open(dir.path().join("gw.db")).expect("gw db");
        assert_eq!(gw_store.log_head(&tenant).expect("head").position, 1, "only the first delivery was logged");
        agent_b.stop().await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_misaddressed_batches_are_dead_lettered_and_sync_continues() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("poison");
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let a = device_db(dir.path(), "a");
        let b = device_db(dir.path(), "b");
        let agent_a = start_agent(&a, &broker, &tenant, "tab-a").await;
        let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
        let client = raw_client(&broker, &format!("raw-{tenant}")).await;
        // Garbage on a's topic, then a well-formed batch on a's topic claiming to be b.
        let garbage = Uplink::Batch {
            device: "tab-a".into(),
            id: 1,
            first_seq: 900,
            last_seq: 900,
            epoch: None,
            receipts: vec![],
            batch: b"not a batch".to_vec(),
        };
        client
            .publish(uplink_topic(&tenant, "tab-a"), QoS::AtLeastOnce, false, garbage.encode())
            .await
            .expect("publish");
        let forged_src = device_db(dir.path(), "forged");
        exec(&forged_src, "INSERT INTO inspections VALUES ('forged', 'x', 'x', '', 0)");
        let mut s = Store::open(&forged_src, StoreOptions::default()).expect("open");
        let out = s.outbox_batch(10).expect("outbox").expect("batch");
        let forged = Uplink::Batch {
            device: "tab-b".into(),
            id: 2,
            first_seq: out.first_seq,
            last_seq: out.last_seq,
            epoch: None,
            receipts: vec![],
            batch: encode_batch(&out.batch, EncodeOptions::default()),
        };
        client
            .publish(uplink_topic(&tenant, "tab-a"), QoS::AtLeastOnce, false, forged.encode())
            .await
            .expect("publish");
        let mut gw_store = SqliteStore::open(dir.path().join("gw.db")).expect("gw db");
        let filter = DeadLetterFilter { tenant: Some(tenant.clone()), ..Default::default() };
        eventually("two dead letters", WAIT, || gw_store.dead_letters(&filter).map(|d| d.len()).unwrap_or(0) == 2)
            .await;
        let mut letters = gw_store.dead_letters(&filter).expect("dead letters");
        letters.reverse();
        assert!(letters[0].reason.contains("batch refused"), "{}", letters[0].reason);
        assert!(letters[1].reason.contains("claims device"), "{}", letters[1].reason);
        // Real traffic still flows both ways, and the forged row never arrives.
        exec(&a, "INSERT INTO inspections VALUES ('real', 'n', 'open', '', 1)");
        let want = vec![vec![text("real")]];
        eventually("real change arrives", WAIT, || rows(&b, "SELECT id FROM inspections") == want).await;
        assert_eq!(rows(&a, "SELECT id FROM inspections"), want);
        agent_a.stop().await;
        agent_b.stop().await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_the_gateway_died_between_merge_and_ack_applies_once() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("crash");
        let a = device_db(dir.path(), "a");
        exec(
            &a,
            "INSERT INTO inspections VALUES ('bolts', 'yard', 'ok', '', 50); UPDATE inspections SET stock = stock - 8",
        );
        // The state a gateway leaves when it dies after committing a merge and before its ack
        // reaches the device: the batch is merged and logged, and still in the device outbox.
        let mut store = Store::open(&a, StoreOptions::default()).expect("open");
        let out = store.outbox_batch(100).expect("outbox").expect("batch");
        drop(store);
        let mut gw_store = SqliteStore::open(dir.path().join("gw.db")).expect("gw db");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
        let from = Incoming {
            tenant: &tenant,
            device: "tab-a",
            first_seq: out.first_seq,
            last_seq: out.last_seq,
            now_ms: now,
            max_drift_ms: 300_000,
            role: None,
            recovering: false,
            legacy: false,
            scope: None,
        };
        gw_store.merge(&from, &out.batch).expect("merge");
        drop(gw_store);
        // The gateway comes back; the device reconnects and sends the batch again.
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let agent_a = start_agent(&a, &broker, &tenant, "tab-a").await;
        eventually("the resent batch is acknowledged", WAIT, || {
            Store::open(&a, StoreOptions::default()).and_then(|s| s.pending_changes()).ok() == Some(0)
        })
        .await;
        let b = device_db(dir.path(), "b");
        let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
        let want = vec![vec![text("bolts"), Value::Integer(42)]];
        eventually("b sees the counter once", WAIT, || rows(&b, "SELECT id, stock FROM inspections") == want).await;
        let mut gw_store = SqliteStore::open(dir.path().join("gw.db")).expect("gw db");
        assert_eq!(gw_store.log_head(&tenant).expect("head").position, 1, "the resend was recognised as merged");
        agent_a.stop().await;
        agent_b.stop().await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_resumes_by_itself_after_the_broker_restarts() {
    let port = free_port();
    let Some(mut mosquitto) = OwnMosquitto::start(port) else { return };
    let broker = driftless_core::protocol::BrokerAddr::plain("127.0.0.1", port);
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("restart");
    let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
    let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
    let agent_a = start_agent(&a, &broker, &tenant, "tab-a").await;
    let agent_b = start_agent(&b, &broker, &tenant, "tab-b").await;
    exec(&a, "INSERT INTO inspections VALUES ('before', 'x', 'open', '', 1)");
    eventually("first row arrives", WAIT, || rows(&b, "SELECT id FROM inspections").len() == 1).await;

    mosquitto.kill();
    // Writes continue while the broker is down; they wait in the outbox.
    for i in 0..50 {
        exec(&a, &format!("INSERT INTO inspections VALUES ('during-{i:02}', 'x', 'open', '', {i})"));
    }
    exec(&b, "UPDATE inspections SET stock = stock + 10 WHERE id = 'before'");
    tokio::time::sleep(Duration::from_millis(500)).await;
    mosquitto.restart();

    eventually("everything arrives after the restart", WAIT, || {
        rows(&b, "SELECT count(*) FROM inspections") == vec![vec![Value::Integer(51)]]
            && rows(&a, "SELECT stock FROM inspections WHERE id = 'before'") == vec![vec![Value::Integer(11)]]
    })
    .await;
    assert_eq!(rows(&a, ALL), rows(&b, ALL));
    agent_a.stop().await;
    agent_b.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_the_sqlite3_shell_reaches_the_other_device() {
    if !have_tool("sqlite3") {
        return;
    }
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("shell");
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
        let agent_a = start_agent(&a, &broker, &tenant, "logger").await;
        let agent_b = start_agent(&b, &broker, &tenant, "office").await;
        // A program that never links driftless, with its own SQLite build.
        // Like any well-behaved writer, it waits for the lock instead of failing at once.
        let status = std::process::Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&a)
            .arg("INSERT INTO inspections VALUES ('from-shell', 'rig', 'logged', '', 3);")
            .status()
            .expect("the sqlite3 shell is installed (apt-get install sqlite3)");
        assert!(status.success());
        let want = vec![vec![text("from-shell"), text("logged"), Value::Integer(3)]];
        eventually("the shell's write arrives", WAIT, || rows(&b, "SELECT id, status, stock FROM inspections") == want)
            .await;
        agent_a.stop().await;
        agent_b.stop().await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_are_split_across_messages_and_all_arrive() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("large");
        let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
        let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
        // 12 incompressible 512 KiB photos: 6 MiB, over the 4 MiB message bound.
        exec(
            &a,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12)
             INSERT INTO inspections(id, notes) SELECT printf('photo-%02d', i), randomblob(524288) FROM n",
        );
        let agent_a = start_agent(&a, &broker, &tenant, "camera").await;
        let agent_b = start_agent(&b, &broker, &tenant, "office").await;
        let check = "SELECT count(*), sum(length(notes)) FROM inspections";
        let want = rows(&a, check);
        eventually("every photo arrives", WAIT, || rows(&b, check) == want).await;
        assert_eq!(want, vec![vec![Value::Integer(12), Value::Integer(12 * 524_288)]]);
        assert!(agent_a.live().acked_batches >= 2, "split into several messages");
        agent_a.stop().await;
        agent_b.stop().await;
        gw.stop().await;
    }
}
