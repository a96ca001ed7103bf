//! Chaos with real processes: three `driftless-agent` daemons and a `driftless-gateway` over a
//! Mosquitto of the test's own, while plain SQLite connections write at random and agents, the
//! gateway and the broker are killed (SIGKILL) and restarted at random moments. At the end
//! every device and the gateway hold the same rows, and every counter equals the sum of the
//! increments made to it.
//!
//! Seeded: the seed is printed; `DRIFTLESS_CHAOS_SEED=N` replays a run, and
//! `DRIFTLESS_CHAOS_SECS` sets how long the chaos lasts (default 60).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driftless_core::Value;
use driftless_core::codec::{Limits, decode_payload};
use driftless_tests::procs::*;
use driftless_tests::*;

/// xorshift64*: small, seeded, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn write(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(30)).expect("busy timeout");
    conn.execute_batch(sql).expect(sql);
}

/// The stock of every row the gateway holds, summed from its merged states.
fn gateway_stock(db: &Path, tenant: &str) -> BTreeMap<String, i64> {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(30)).expect("busy timeout");
    let mut stmt = conn.prepare("SELECT state FROM gw_rows WHERE tenant = ?1").expect("query");
    let states = stmt.query_map([tenant], |r| r.get::<_, Vec<u8>>(0)).expect("rows");
    let mut out = BTreeMap::new();
    for state in states {
        let batch = decode_payload(&state.expect("row"), &Limits::default()).expect("stored row");
        for row in batch.rows {
            let Value::Text(id) = &row.pk[0] else { continue };
            out.insert(id.clone(), row.state.counters.get("stock").map_or(0, |c| c.value()));
        }
    }
    out
}

fn stock(db: &Path) -> BTreeMap<String, i64> {
    rows(db, "SELECT id, stock FROM inspections ORDER BY id")
        .into_iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Text(id), Value::Integer(s)) => (id.clone(), *s),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_restarts_lose_and_double_nothing() {
    let seed = std::env::var("DRIFTLESS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::UNIX_EPOCH.elapsed().map_or(1, |d| d.as_nanos() as u64) | 1);
    let secs: u64 = std::env::var("DRIFTLESS_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    println!("chaos seed {seed} ({secs} s); replay with DRIFTLESS_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);

    let Some(mut broker) = OwnMosquitto::start(free_port()) else { return };
    let addr = broker.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = tenant("chaos");
    let gw_db = dir.path().join("gw.db");
    let mut gw = gateway(&addr, &tenant, &gw_db, &[]);
    let names = ["tab-a", "tab-b", "tab-c"];
    let dbs: Vec<PathBuf> = names.iter().map(|n| cli_device(dir.path(), n)).collect();
    let mut agents: Vec<Option<Proc>> =
        names.iter().zip(&dbs).map(|(n, db)| Some(agent(db, &addr, &tenant, n))).collect();

    // What the counters must end at: every increment made, once.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..4 {
        write(&dbs[0], &format!("INSERT INTO inspections(id, stock) VALUES ('shared-{i}', 0)"));
        expected.insert(format!("shared-{i}"), 0);
    }
    let mut next_row = 0;
    let mut down_until: Vec<Option<Instant>> = vec![None; names.len()];
    let mut gw_down_until: Option<Instant> = None;
    let (mut kills, mut gw_kills, mut broker_restarts, mut writes) = (0, 0, 0, 0);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let now = Instant::now();
        for (i, until) in down_until.iter_mut().enumerate() {
            if until.is_some_and(|t| now >= t) {
                agents[i] = Some(agent(&dbs[i], &addr, &tenant, names[i]));
                *until = None;
            }
        }
        if gw_down_until.is_some_and(|t| now >= t) {
            gw = gateway(&addr, &tenant, &gw_db, &[]);
            gw_down_until = None;
        }
        match rng.below(100) {
            0..=59 => {
                let d = rng.below(dbs.len() as u64) as usize;
                writes += 1;
                if rng.below(4) == 0 {
                    let id = format!("row-{next_row}");
                    next_row += 1;
                    let n = rng.below(10) as i64;
                    write(
                        &dbs[d],
                        &format!("INSERT INTO inspections(id, site, stock) VALUES ('{id}', '{}', {n})", names[d]),
                    );
                    expected.insert(id, n);
                } else {
                    // Only rows this device already shows: a row it has not received yet would
                    // make the UPDATE change nothing.
                    let shown = stock(&dbs[d]);
                    let candidates: Vec<&String> = expected.keys().filter(|k| shown.contains_key(*k)).collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    let id = candidates[rng.below(candidates.len() as u64) as usize].clone();
                    let delta = rng.below(7) as i64 - 3;
                    write(
                        &dbs[d],
                        &format!(
                            "UPDATE inspections SET stock = stock + {delta}, notes = 'n{writes}' WHERE id = '{id}'"
                        ),
                    );
                    *expected.get_mut(&id).expect("row") += delta;
                }
            }
            60..=69 => {
                let d = rng.below(dbs.len() as u64) as usize;
                if let Some(mut a) = agents[d].take() {
                    a.kill();
                    kills += 1;
                    down_until[d] = Some(now + Duration::from_millis(rng.below(1_500)));
                }
            }
            70..=73 if gw_down_until.is_none() => {
                gw.kill();
                gw_kills += 1;
                gw_down_until = Some(now + Duration::from_millis(rng.below(2_000)));
            }
            74..=75 => {
                broker.kill();
                tokio::time::sleep(Duration::from_millis(rng.below(1_000))).await;
                broker.restart();
                broker_restarts += 1;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.below(150))).await;
    }
    println!(
        "chaos: {writes} writes, {kills} agent kills, {gw_kills} gateway kills, {broker_restarts} broker restarts"
    );

    // Everything back up; then everyone must agree, and with the increments made.
    for (i, slot) in agents.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(agent(&dbs[i], &addr, &tenant, names[i]));
        }
    }
    if gw_down_until.is_some() {
        gw = gateway(&addr, &tenant, &gw_db, &[]);
    }
    let limit = Duration::from_secs(120);
    eventually("every device shows every increment once", limit, || dbs.iter().all(|d| stock(d) == expected)).await;
    eventually("every outbox is drained", limit, || dbs.iter().all(|d| pending(d) == 0)).await;
    eventually("the gateway holds the same", limit, || gateway_stock(&gw_db, &tenant) == expected).await;
    let all = "SELECT id, site, status, notes, stock FROM inspections ORDER BY id";
    eventually("every device shows the same rows", limit, || dbs.iter().all(|d| rows(d, all) == rows(&dbs[0], all)))
        .await;
    drop(gw);
}
