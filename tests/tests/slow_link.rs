//! A backlog drained over a slow link: the agent must not take a link that is still carrying
//! its batch for a lost one, and flood it with copies.

use std::time::Duration;

use driftless_agent::AgentConfig;
use driftless_core::{StoreOptions, Value};
use driftless_tests::slow_link::SlowLink;
use driftless_tests::*;

const ROWS: u64 = 200;
/// Random bytes per row (written as hex, so about this much once compressed).
const ENTROPY: u64 = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_over_a_slow_link_without_flooding_it() {
    let broker = brokers().remove(0);
    // 800 KiB of incompressible payload at 128 KiB/s: about 6 s on the wire, against an ack
    // timeout of 1 s.
    let link = SlowLink::start(&broker, 128 << 10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("slowlink");
    let gw = Gateway::start(&broker, &tenant, dir.path().join("gw.db")).await;
    let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
    exec(
        &a,
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
             INSERT INTO inspections(id, notes) SELECT 'r' || i, hex(randomblob({ENTROPY})) FROM n"
        ),
    );
    let url = format!("mqtt://127.0.0.1:{}", link.port);
    let mut config = AgentConfig::new(&a, &url, &tenant, "field").expect("config");
    config.ack_timeout = Duration::from_secs(1);
    let agent_a = driftless_agent::Agent::start(config, StoreOptions::default()).await.expect("agent");
    let agent_b = start_agent(&b, &broker, &tenant, "office").await;

    let count = "SELECT count(*) FROM inspections";
    eventually("b has every row", Duration::from_secs(180), || rows(&b, count)[0][0] == Value::Integer(ROWS as i64))
        .await;
    eventually("a's backlog is acknowledged", Duration::from_secs(60), || {
        rows(&a, "SELECT count(*) FROM _driftless_outbox")[0][0] == Value::Integer(0)
    })
    .await;
    let sent = agent_a.live().bytes_sent;
    let payload = ROWS * ENTROPY;
    println!("slow link: {sent} bytes sent for {payload} bytes of payload");
    assert!(sent < 2 * payload, "the link was flooded: {sent} bytes sent for {payload} bytes of payload");
    agent_a.stop().await;
    agent_b.stop().await;
    gw.stop().await;
}
