//! Ingest: a load generator sends single-row batches, built before the run, from many
//! device topics over a few MQTT connections at a fixed rate, and times every one from its
//! publish until the gateway's ack arrives. Cheap on the client side, so what is measured
//! is the broker and the gateway (release build, its own process). Through Mosquitto.
//!
//! INGEST_RATE (batches a second, default 10,000), INGEST_SECONDS (30), INGEST_DEVICES
//! (10,000), INGEST_CONNECTIONS (4) size the run; INGEST_STORE=postgres uses the PostgreSQL
//! store (a database of its own on DRIFTLESS_TEST_PG_URL) instead of SQLite.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_core::codec::Limits;
use driftless_core::protocol::{BrokerAddr, Downlink, downlink_topic, uplink_topic};
use driftless_gateway::storage::testing::TestDb;
use driftless_tests::bench::{GatewayProcess, Writer, bench_broker_url, percentile, report};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// When each batch was sent: `sent[device][id - 1]`, and the latencies of those acked.
struct Timings {
    sent: Vec<Vec<Option<Instant>>>,
    acked_ms: Vec<f64>,
    last_ack: Option<Instant>,
}

/// The device index a downlink topic names (`d00042` -> 42).
fn device_of(topic: &str) -> Option<usize> {
    topic.split('/').nth(2)?.strip_prefix('d')?.parse().ok()
}

/// Drives one connection's event loop, timing every ack that arrives.
async fn receive(mut events: rumqttc::EventLoop, timings: Arc<Mutex<Timings>>) {
    let limits = Limits::default();
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = Instant::now();
                // Only a batch taken whole counts: an ack refusing rows of it is not one.
                let (Some(d), Ok(Downlink::Ack { id, refused, .. })) =
                    (device_of(&p.topic), Downlink::decode(&p.payload, &limits))
                else {
                    continue;
                };
                if !refused.is_empty() {
                    continue;
                }
                let mut t = timings.lock().expect("lock");
                if let Some(sent) = t.sent.get_mut(d).and_then(|s| s.get_mut(id as usize - 1)).and_then(Option::take) {
                    t.acked_ms.push(now.duration_since(sent).as_secs_f64() * 1e3);
                    t.last_ack = Some(now);
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("load generator connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    // The PostgreSQL test database is made and dropped outside the runtime (its client blocks).
    let postgres = std::env::var("INGEST_STORE").is_ok_and(|s| s == "postgres");
    let pg =
        if postgres { Some(TestDb::new().ok_or_else(|| anyhow::anyhow!("set DRIFTLESS_TEST_PG_URL"))?) } else { None };
    let store_url = pg.as_ref().map(TestDb::url);
    tokio::runtime::Runtime::new()?.block_on(run(store_url))
}

async fn run(store_url: Option<String>) -> anyhow::Result<()> {
    let postgres = store_url.is_some();
    let rate = env_usize("INGEST_RATE", 10_000);
    let seconds = env_usize("INGEST_SECONDS", 30);
    let devices = env_usize("INGEST_DEVICES", 10_000);
    let conns = env_usize("INGEST_CONNECTIONS", 4);
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let broker: BrokerAddr = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let tenant = format!("ingest-{}", std::process::id());
    let mut extra = vec!["--device-messages-per-s", "0", "--tenant-messages-per-s", "0"];
    if let Some(u) = &store_url {
        extra.extend(["--store", u.as_str()]);
    }
    let gateway = GatewayProcess::start_with(&dir.path().join("gw.db"), &url, &tenant, &extra);

    // Every batch of the run, built now: per device, one a round.
    let rounds = (rate * seconds).div_ceil(devices);
    let built = Instant::now();
    let batches: Vec<Vec<(u64, Vec<u8>)>> = (0..devices)
        .map(|d| {
            let mut w = Writer::new(format!("d{d:05}"), d as u32 + 1);
            (0..rounds).map(|_| w.next_batch()).collect()
        })
        .collect();
    println!("{} batches of {} devices built in {:.1}s", devices * rounds, devices, built.elapsed().as_secs_f64());

    let timings = Arc::new(Mutex::new(Timings {
        sent: (0..devices).map(|_| vec![None; rounds]).collect(),
        acked_ms: Vec::new(),
        last_ack: None,
    }));
    let mut clients = Vec::new();
    for c in 0..conns {
        let mut opts = MqttOptions::new(format!("ingest-{}-{c}", std::process::id()), &broker.host, broker.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(1_000);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, events) = AsyncClient::new(opts, 20_000);
        tokio::spawn(receive(events, timings.clone()));
        let mine: Vec<usize> = (c..devices).step_by(conns).collect();
        for chunk in mine.chunks(100) {
            let filters = chunk
                .iter()
                .map(|d| rumqttc::SubscribeFilter::new(downlink_topic(&tenant, &format!("d{d:05}")), QoS::AtMostOnce));
            client.subscribe_many(filters).await?;
        }
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Batch n (round n / devices, device n % devices) is due at n / rate seconds.
    let total = rate * seconds;
    let cpu_before = gateway.cpu_seconds();
    let start = Instant::now() + Duration::from_millis(200);
    let batches = Arc::new(batches);
    let mut senders = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let (client, batches, timings, tenant) = (client.clone(), batches.clone(), timings.clone(), tenant.clone());
        senders.push(tokio::spawn(async move {
            let mut n = c;
            while n < total {
                let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let (round, d) = (n / devices, n % devices);
                let (id, payload) = &batches[d][round];
                timings.lock().expect("lock").sent[d][*id as usize - 1] = Some(Instant::now());
                let topic = uplink_topic(&tenant, &format!("d{d:05}"));
                client.publish(topic, QoS::AtLeastOnce, false, payload.clone()).await.expect("publish");
                n += conns;
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    let sent_for = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && timings.lock().expect("lock").acked_ms.len() < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = gateway.cpu_seconds() - cpu_before;
    let t = timings.lock().expect("lock");
    let mut ms = t.acked_ms.clone();
    ms.sort_by(f64::total_cmp);
    let acked_for = t.last_ack.map_or(sent_for, |l| l.duration_since(start).as_secs_f64());
    println!(
        "{total} batches offered in {sent_for:.1}s, {} acked within {acked_for:.1}s ({} unanswered), store: {}",
        ms.len(),
        total - ms.len(),
        if postgres { "postgres" } else { "sqlite" }
    );
    report(&[
        ("offered_per_s", total as f64 / sent_for),
        ("acked_per_s", ms.len() as f64 / acked_for),
        ("p50_ms", percentile(&ms, 50.0)),
        ("p99_ms", percentile(&ms, 99.0)),
        ("max_ms", ms.last().copied().unwrap_or(f64::NAN)),
        ("unanswered", (total - ms.len()) as f64),
        ("gateway_cpu_s", cpu),
        ("gateway_peak_rss_mb", gateway.peak_rss_mb()),
    ]);
    Ok(())
}
