//! Merge group: what the gateway's store thread spends on one single-row batch, without a
//! broker. The `ingest` workload (one-row batches from many devices, built before the run)
//! goes straight to the handler in groups, each group one transaction committed once, as the
//! service runs them; what `ingest` adds to this is MQTT and the answers.
//!
//! MERGE_GROUP_MESSAGES (default 100,000), MERGE_GROUP_DEVICES (10,000) and
//! MERGE_GROUP_SIZE (200, about what the service's 20 ms group budget holds at 10,000/s)
//! size the run.

use std::time::Instant;

use driftless_core::protocol::uplink_topic;
use driftless_gateway::handler::{HandlerConfig, handle_uplink};
use driftless_gateway::{GatewayStore, SqliteStore};
use driftless_tests::bench::{Writer, report};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let messages = env_usize("MERGE_GROUP_MESSAGES", 100_000);
    let devices = env_usize("MERGE_GROUP_DEVICES", 10_000).max(1);
    let group = env_usize("MERGE_GROUP_SIZE", 200).max(1);
    let dir = tempfile::tempdir()?;
    let mut store = SqliteStore::open(dir.path().join("gw.db"))?;
    let cfg = HandlerConfig::default();
    let tenant = "bench";
    let mut writers: Vec<Writer> = (0..devices).map(|d| Writer::new(format!("d{d:05}"), d as u32 + 1)).collect();
    let uplinks: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|n| {
            let d = n % devices;
            (uplink_topic(tenant, &format!("d{d:05}")), writers[d].next_batch().1)
        })
        .collect();
    let began = Instant::now();
    let mut answers = 0usize;
    for chunk in uplinks.chunks(group) {
        store.begin_group()?;
        for (topic, payload) in chunk {
            answers += usize::from(!handle_uplink(&mut store, &cfg, topic, payload, now_ms())?.is_empty());
        }
        store.commit_group()?;
    }
    let secs = began.elapsed().as_secs_f64();
    anyhow::ensure!(answers == messages, "{} of {messages} messages went unanswered", messages - answers);
    // Every batch merged and logged, none refused (a refusal is answered too).
    let logged = store.log_head(tenant)?.position;
    anyhow::ensure!(logged == messages as u64, "{messages} messages, {logged} logged");
    println!(
        "{messages} one-row batches of {devices} devices merged in groups of {group} in {secs:.2}s; log head {logged}"
    );
    report(&[
        ("messages_per_s", messages as f64 / secs),
        ("us_per_message", secs * 1e6 / messages as f64),
        ("group", group as f64),
    ]);
    Ok(())
}

fn now_ms() -> u64 {
    std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64)
}
