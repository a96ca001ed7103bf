//! Crafted batches from a real MQTT client, through the real `driftless-gateway` and
//! `driftless-agent` binaries over a real broker: a registered device ("tab-m") that claims a
//! role it was not given, writes as another device's node, claims another node's counters up
//! to u64::MAX, writes a table only the cloud writes, and one only hq devices write. Each is
//! refused (or its claim replaced), and each time the honest devices' next write still
//! arrives.

use std::path::Path;
use std::time::Duration;

use driftless_core::codec::{EncodeOptions, Limits, encode_batch};
use driftless_core::protocol::{BrokerAddr, Downlink, Uplink, downlink_topic, uplink_topic};
use driftless_core::{Batch, Store, StoreOptions, Value};
use driftless_tests::procs::*;
use driftless_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"roles = ["hq", "field"]

[[table]]
name = "jobs"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "status"
type = "text"
policy = "authority:hq>field"

[[table]]
name = "prices"
key = ["id"]
direction = "down-only"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "status"
type = "text"

[[table]]
name = "rates"
key = ["id"]
writers = ["hq"]
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "status"
type = "text"
"#;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// What `sql` wrote on `store`, as the batch its outbox holds (left there: never acked).
fn written(store: &mut Store, sql: &str) -> Batch {
    store.write(|tx| Ok(tx.execute_batch(sql)?)).expect(sql);
    let out = store.outbox_batch(1_000).expect("outbox").expect("batch");
    store.ack(out.first_seq, out.last_seq).expect("ack");
    out.batch
}

/// A client speaking as device `tab-m` on its own topics.
struct Forger {
    client: AsyncClient,
    downlinks: mpsc::UnboundedReceiver<Vec<u8>>,
    tenant: String,
    next: u64,
}

impl Forger {
    async fn connect(broker: &BrokerAddr, tenant: &str) -> Forger {
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new(format!("forger-{tenant}"), &broker.host, broker.port), 64);
        let (tx, downlinks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let _ = tx.send(p.payload.to_vec());
                }
            }
        });
        client.subscribe(downlink_topic(tenant, "tab-m"), QoS::AtLeastOnce).await.expect("subscribe");
        tokio::time::sleep(Duration::from_millis(300)).await;
        Forger { client, downlinks, tenant: tenant.to_owned(), next: 1 }
    }

    /// Sends `batch` as tab-m's next outbox entry; the reasons of the rows the ack refused.
    async fn send(&mut self, batch: &Batch) -> Vec<String> {
        let (id, seq) = (self.next, self.next as i64);
        self.next += 1;
        let msg = Uplink::Batch {
            device: "tab-m".into(),
            id,
            first_seq: seq,
            last_seq: seq,
            epoch: None,
            receipts: vec![],
            batch: encode_batch(batch, EncodeOptions::default()),
        };
        let topic = uplink_topic(&self.tenant, "tab-m");
        self.client.publish(topic, QoS::AtLeastOnce, false, msg.encode()).await.expect("publish");
        let answer = tokio::time::timeout(WAIT, async {
            loop {
                let bytes = self.downlinks.recv().await.expect("downlinks");
                match Downlink::decode(&bytes, &Limits::default()) {
                    Ok(Downlink::Ack { id: acked, refused, .. }) if acked == id => {
                        return refused.into_iter().map(|r| r.reason).collect::<Vec<_>>();
                    }
                    Ok(Downlink::Nack { id: nacked, reason, .. }) if nacked == id => return vec![reason],
                    _ => {}
                }
            }
        });
        answer.await.expect("an answer to the crafted batch")
    }
}

/// a writes `sql`; b must show it (the honest path still works).
async fn honest_write_arrives(a: &Path, b: &Path, id: &str) {
    exec(a, &format!("INSERT INTO jobs(id, status) VALUES ('{id}', 'honest')"));
    let sql = format!("SELECT status FROM jobs WHERE id = '{id}'");
    eventually(&format!("b has {id}"), WAIT, || rows(b, &sql) == vec![vec![text("honest")]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_batches_are_refused_and_honest_writes_go_on() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("forgery");
        let (schema, gw_db) = (dir.path().join("schema.toml"), dir.path().join("gw.db"));
        std::fs::write(&schema, SCHEMA).expect("schema");
        for device in ["tab-a", "tab-b", "tab-m"] {
            let args = ["device", "add", "--tenant", &tenant, "--device", device, "--role", "field"];
            gateway_ok(&[&args[..], &["--db", s(&gw_db)]].concat());
        }
        let _gw = gateway(&broker, &tenant, &gw_db, &["--schema", s(&schema)]);
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        for db in [&a, &b] {
            agent_ok(&["init", "--db", s(db), "--role", "field"]);
        }
        let _agent_a = agent(&a, &broker, &tenant, "tab-a");
        let _agent_b = agent(&b, &broker, &tenant, "tab-b");
        let has_jobs =
            |db: &Path| rows(db, "SELECT count(*) FROM sqlite_master WHERE name = 'jobs'")[0][0] == Value::Integer(1);
        eventually("a and b follow the schema", WAIT, || has_jobs(&a) && has_jobs(&b)).await;
        let mut forger = Forger::connect(&broker, &tenant).await;

        // 1. A role it was not given: m declares "hq", which outranks a's "field" on status.
        let hq = StoreOptions { role: "hq".into(), ..StoreOptions::default() };
        let mut m = Store::open(dir.path().join("m.db"), hq).expect("open m");
        m.follow_schema(1, SCHEMA).expect("schema");
        let claim = written(&mut m, "INSERT INTO jobs(id, status) VALUES ('j1', 'from m as hq')");
        tokio::time::sleep(Duration::from_millis(20)).await;
        exec(&a, "INSERT INTO jobs(id, status) VALUES ('j1', 'from a')");
        let j1 = "SELECT status FROM jobs WHERE id = 'j1'";
        eventually("b has a's j1", WAIT, || rows(&b, j1) == vec![vec![text("from a")]]).await;
        assert_eq!(forger.send(&claim).await, Vec::<String>::new(), "a role is replaced, not refused");
        honest_write_arrives(&a, &b, "j2").await;
        // m's write counts as the field write it is: the later of two field writes stands.
        assert_eq!(rows(&b, j1), vec![vec![text("from a")]]);
        assert_eq!(rows(&a, j1), vec![vec![text("from a")]]);
        let cloud = format!("SELECT status FROM \"{tenant}.jobs\" WHERE id = 'j1'");
        assert_eq!(rows(&gw_db, &cloud), vec![vec![text("from a")]], "the cloud table ranks m as it claimed");

        // 2. Another device's node: a copy of a's database writes as a's node.
        backup(&a, &dir.path().join("a-copy.db"));
        let mut copy = Store::open(dir.path().join("a-copy.db"), StoreOptions::default()).expect("open copy");
        let a_node = copy.node_id();
        let forged = written(&mut copy, "INSERT INTO jobs(id, status) VALUES ('j3', 'forged as a')");
        let refused = forger.send(&forged).await;
        assert!(refused.len() == 1 && refused[0].contains("not the sender's own"), "{refused:?}");
        // a's own next write carries the very dot the forgery used: it applies.
        honest_write_arrives(&a, &b, "j4").await;
        assert!(rows(&b, "SELECT id FROM jobs WHERE id = 'j3'").is_empty());

        // 3. A context claiming all of a's future writes.
        let mut inflated = written(&mut m, "INSERT INTO jobs(id, status) VALUES ('j5', 'claims everything')");
        inflated.rows[0].state.fields.get_mut("status").expect("status").ctx.advance(a_node, u64::MAX);
        let refused = forger.send(&inflated).await;
        assert!(refused.len() == 1 && refused[0].contains("claims too much"), "{refused:?}");
        honest_write_arrives(&a, &b, "j6").await;
        assert!(rows(&b, "SELECT id FROM jobs WHERE id = 'j5'").is_empty());

        // 4. A table only the cloud writes.
        let mut down = written(&mut m, "INSERT INTO jobs(id, status) VALUES ('p1', 'free')");
        down.rows[0].table = "prices".into();
        let refused = forger.send(&down).await;
        assert!(refused.len() == 1 && refused[0].contains("written only by the cloud"), "{refused:?}");
        honest_write_arrives(&a, &b, "j7").await;
        assert!(rows(&b, "SELECT id FROM prices").is_empty());

        // 5. A table only hq devices write, from a device registered as field (its claim of
        // hq is replaced by the registry's role, so its write is a field write).
        let rate = written(&mut m, "INSERT INTO rates(id, status) VALUES ('r1', 'cheap')");
        let refused = forger.send(&rate).await;
        assert!(refused.len() == 1 && refused[0].contains("written only by roles [\"hq\"]"), "{refused:?}");
        honest_write_arrives(&a, &b, "j8").await;
        assert!(rows(&b, "SELECT id FROM rates").is_empty());
        assert!(rows(&gw_db, &format!("SELECT id FROM \"{tenant}.rates\"")).is_empty());
    }
}
