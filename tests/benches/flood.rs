//! Flood: one device sends valid batches as fast as it can while 50 honest devices write one
//! row a second each; every honest batch is timed from its publish until its ack. Three
//! phases in one run, through Mosquitto with the gateway in its own process: no flood; the
//! flood against the default quotas; the flood against a gateway without quotas (for
//! comparison). Keys `honest_p99_ms`, `honest_p99_ms_without_flood`, `flood_accepted_per_s`.
//!
//! With `DRIFTLESS_BENCH_BROKER_ADMIN` (scripts/bench sets it: its Mosquitto runs the
//! dynamic-security plugin), every device connects with credentials of its own, and the
//! gateway may cut a device that ignores being told to slow down off the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use driftless_core::protocol::{BrokerAddr, Downlink, downlink_topic, uplink_topic};
use driftless_gateway::dynsec::{self, Dynsec};
use driftless_tests::bench::{GatewayProcess, Writer, bench_broker_url, percentile, report};
use rumqttc::{AsyncClient, Event, Packet, QoS};

const HONEST: usize = 50;
const PHASE: Duration = Duration::from_secs(20);

/// A device's connection: its client, what arrives on its downlink, and the task driving it
/// (ended when this is dropped, so a later connection with the same client id is not
/// fought over).
struct Connection {
    client: AsyncClient,
    downlinks: tokio::sync::mpsc::UnboundedReceiver<Downlink>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where devices connect, and each device's broker password (`tenant/device` -> password)
/// when the broker wants credentials.
#[derive(Clone)]
struct Fleet {
    broker: BrokerAddr,
    passwords: Arc<std::collections::HashMap<String, String>>,
}

impl Fleet {
    /// Registers the bench's devices of `tenant` with the broker, if it wants credentials.
    async fn register(&mut self, admin: Option<&mut Dynsec>, tenant: &str) -> anyhow::Result<()> {
        let Some(admin) = admin else { return Ok(()) };
        let mut passwords = (*self.passwords).clone();
        let devices = (0..HONEST).map(|n| format!("honest-{n}")).chain(["flooder".to_owned()]);
        for device in devices {
            let password = dynsec::new_password()?;
            admin.add_device(tenant, &device, &password).await?;
            passwords.insert(dynsec::device_username(tenant, &device), password);
        }
        self.passwords = Arc::new(passwords);
        Ok(())
    }

    fn login(&self, tenant: &str, device: &str) -> BrokerAddr {
        let user = dynsec::device_username(tenant, device);
        match self.passwords.get(&user) {
            Some(password) => self.broker.clone().with_login(user, password.clone()),
            None => self.broker.clone(),
        }
    }
}

/// Connects a device (with the client id its credentials are pinned to) and subscribes it
/// to its downlink.
async fn connect(fleet: &Fleet, tenant: &str, device: &str) -> anyhow::Result<Connection> {
    let broker = fleet.login(tenant, device);
    let mut opts = driftless_core::transport::mqtt_options(dynsec::device_client_id(tenant, device), &broker)?;
    opts.set_max_packet_size(64 << 20, 64 << 20);
    opts.set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 1_000);
    client.subscribe(downlink_topic(tenant, device), QoS::AtLeastOnce).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(msg) = Downlink::decode(&p.payload, &driftless_core::codec::Limits::default())
                        && tx.send(msg).is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok(Connection { client, downlinks: rx, task })
}

/// One honest device: a row a second until `stop`, each timed until its ack.
async fn honest(fleet: Fleet, tenant: String, n: usize, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<f64>> {
    let device = format!("honest-{n}");
    let mut conn = connect(&fleet, &tenant, &device).await?;
    let mut writer = Writer::new(device.clone(), n as u32 + 1);
    // Spread over the second, as independent devices would be.
    tokio::time::sleep(Duration::from_millis((n as u64 * 1_000) / HONEST as u64)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let (id, payload) = writer.next_batch();
        let t0 = Instant::now();
        conn.client.publish(uplink_topic(&tenant, &device), QoS::AtLeastOnce, false, payload).await?;
        // Waited for at most 30 s: a write not acked by then counts as 30 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, conn.downlinks.recv()).await {
                Ok(Some(Downlink::Ack { id: got, .. })) if got == id => break,
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("{device}: the connection task ended"),
                Err(_) => break,
            }
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(samples)
}

/// The flooder: batches as fast as the connection takes them; counts acks and slow-downs.
async fn flood(fleet: Fleet, tenant: String, stop: Arc<AtomicBool>) -> anyhow::Result<(u64, u64, u64)> {
    let device = "flooder".to_owned();
    let mut conn = connect(&fleet, &tenant, &device).await?;
    let mut answers = std::mem::replace(&mut conn.downlinks, tokio::sync::mpsc::unbounded_channel().1);
    let client = conn.client.clone();
    let (acked, slowed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (a, s) = (acked.clone(), slowed.clone());
    let counter = tokio::spawn(async move {
        while let Some(msg) = answers.recv().await {
            match msg {
                Downlink::Ack { .. } => a.fetch_add(1, Ordering::Relaxed),
                Downlink::SlowDown { .. } => s.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
    });
    let mut writer = Writer::new(device.clone(), 0);
    let mut sent = 0u64;
    // FLOOD_RATE caps the flood (batches a second), to find what the gateway drains.
    let cap: Option<f64> = std::env::var("FLOOD_RATE").ok().and_then(|r| r.parse().ok());
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(rate) = cap
            && sent as f64 > start.elapsed().as_secs_f64() * rate
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let (_, payload) = writer.next_batch();
        // Cut off at the broker, the client's queue fills and stays full.
        let publish = client.publish(uplink_topic(&tenant, &device), QoS::AtLeastOnce, false, payload);
        match tokio::time::timeout(Duration::from_millis(100), publish).await {
            Ok(done) => done?,
            Err(_) => continue,
        }
        sent += 1;
        // The client's queue rarely makes it wait: let its connection task run.
        if sent.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    // Answers to what was sent last may still be on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    counter.abort();
    Ok((sent, acked.load(Ordering::Relaxed), slowed.load(Ordering::Relaxed)))
}

/// A phase: the honest devices for [`PHASE`], with or without the flooder.
async fn phase(fleet: &Fleet, tenant: &str, with_flood: bool) -> anyhow::Result<(Vec<f64>, (u64, u64, u64))> {
    let stop = Arc::new(AtomicBool::new(false));
    let honest: Vec<_> =
        (0..HONEST).map(|n| tokio::spawn(honest(fleet.clone(), tenant.to_owned(), n, stop.clone()))).collect();
    // The flooder runs on a thread and runtime of its own, as a device elsewhere would: its
    // loop must not take the honest devices' threads.
    let flooder = with_flood.then(|| {
        let (fleet, tenant, stop) = (fleet.clone(), tenant.to_owned(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<(u64, u64, u64)> {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(flood(fleet, tenant, stop))
        })
    });
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for h in honest {
        samples.extend(h.await??);
    }
    samples.sort_by(f64::total_cmp);
    let flooded = match flooder {
        Some(f) => f.join().map_err(|_| anyhow::anyhow!("the flooder panicked"))??,
        None => (0, 0, 0),
    };
    Ok((samples, flooded))
}

fn line(what: &str, samples: &[f64]) {
    println!(
        "{what}: {} honest writes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        samples.last().copied().unwrap_or(0.0)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = bench_broker_url();
    let broker: BrokerAddr = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let secs = PHASE.as_secs_f64();
    let admin_url = std::env::var("DRIFTLESS_BENCH_BROKER_ADMIN").ok();
    let mut admin = match &admin_url {
        Some(u) => Some(Dynsec::connect(&u.parse().map_err(|e: String| anyhow::anyhow!(e))?).await?),
        None => None,
    };
    // The gateway's own broker login, when the broker wants one.
    let gateway_url = match admin.as_mut() {
        Some(admin) => {
            let password = dynsec::new_password()?;
            admin.add_gateway("bench-gateway", &password).await?;
            url.replacen("mqtt://", &format!("mqtt://bench-gateway:{password}@"), 1)
        }
        None => url.clone(),
    };
    let mut fleet = Fleet { broker, passwords: Arc::default() };

    let tenant = format!("flood-{}", std::process::id());
    fleet.register(admin.as_mut(), &tenant).await?;
    // FLOOD_CUT_OFF=0: quotas only (the gateway gets no broker admin to cut a device off).
    let cut = std::env::var("FLOOD_CUT_OFF").map_or(true, |v| v != "0");
    let cut_off = admin_url.iter().filter(|_| cut).flat_map(|u| ["--broker-admin".to_owned(), u.clone()]);
    let cut_off = cut_off.collect::<Vec<_>>();
    let cut_off: Vec<&str> = cut_off.iter().map(String::as_str).collect();
    let gateway = GatewayProcess::start_with(&dir.path().join("gw.db"), &gateway_url, &tenant, &cut_off);
    let (quiet, _) = phase(&fleet, &tenant, false).await?;
    line("without the flood", &quiet);
    let (loud, (sent, acked, slowed)) = phase(&fleet, &tenant, true).await?;
    line("with the flood (default quotas)", &loud);
    println!(
        "flooder: {:.0} batches/s sent, {:.1}/s accepted, {slowed} slow-downs{}",
        sent as f64 / secs,
        acked as f64 / secs,
        if admin_url.is_some() && cut { " (cut off at the broker once it ignored them)" } else { "" }
    );
    drop(gateway);

    // The same flood against a gateway without quotas, for comparison.
    let open = format!("flood-open-{}", std::process::id());
    fleet.register(admin.as_mut(), &open).await?;
    let unlimited = ["--device-messages-per-s", "0", "--tenant-messages-per-s", "0"];
    let _gateway = GatewayProcess::start_with(&dir.path().join("gw-open.db"), &gateway_url, &open, &unlimited);
    let (unguarded, (sent_open, acked_open, _)) = phase(&fleet, &open, true).await?;
    line("with the flood, no quotas", &unguarded);
    println!(
        "flooder without quotas: {:.0}/s sent, {:.1}/s accepted",
        sent_open as f64 / secs,
        acked_open as f64 / secs
    );

    let (p99, p99_quiet) = (percentile(&loud, 99.0), percentile(&quiet, 99.0));
    report(&[
        ("honest_p99_ms", p99),
        ("honest_p99_ms_without_flood", p99_quiet),
        ("flood_accepted_per_s", acked as f64 / secs),
        ("flood_sent_per_s", sent as f64 / secs),
        ("p99_ratio", p99 / p99_quiet.max(f64::EPSILON)),
        ("honest_p50_ms", percentile(&loud, 50.0)),
        ("honest_p99_ms_without_quotas", percentile(&unguarded, 99.0)),
    ]);
    Ok(())
}
