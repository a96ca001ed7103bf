//! Deterministic simulation of a fleet: real device stores and the real gateway store, driven
//! through the sans-IO device machine and the gateway handler over a simulated network that
//! drops, duplicates, reorders and delays messages, while devices restart, are restored from
//! backups, re-track their table, run a clock a year ahead or refuse rows by a constraint of
//! their own, and the gateway is restored from a backup.
//!
//! Invariants once everything is delivered: every device and the gateway hold identical row
//! states, every device shows the same table, and every counter is exact. Each increment is a
//! distinct power of four, so a counter's base-4 digits say which increments it holds: a
//! digit of 2 or more is a doubled increment, and an increment that was never lost (some
//! replica held it at every step) must be there exactly once.
//!
//! A failing case prints the proptest seed and the shrunk list of actions to replay it.

use driftless_core::{ColumnPolicy, TableSpec};
use proptest::prelude::*;

#[path = "simulation/fleet.rs"]
mod fleet;

use fleet::Sim;

const TENANT: &str = "sim";
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const YEAR_MS: u64 = 365 * 86_400_000;
const TIMEOUT_MS: u64 = 1_000;
const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, site TEXT, note TEXT, qty INTEGER NOT NULL DEFAULT 0)";

fn spec() -> TableSpec {
    TableSpec::new().column("qty", ColumnPolicy::Counter)
}

#[derive(Debug, Clone)]
enum Act {
    /// Adds the next power of four to a row's counter.
    Count {
        dev: usize,
        key: usize,
    },
    SetNote {
        dev: usize,
        key: usize,
        value: u8,
    },
    SetSite {
        dev: usize,
        key: usize,
        value: u8,
    },
    /// Delivers an in-flight message (`keep`: a copy stays in flight, to arrive again).
    Deliver {
        pick: u64,
        keep: bool,
    },
    Drop {
        pick: u64,
    },
    Tick {
        ms: u16,
    },
    Disconnect {
        dev: usize,
    },
    Connect {
        dev: usize,
    },
    /// The device's process restarts; what it had published either reached the broker (and
    /// arrives before anything the new process sends, as MQTT orders one topic) or is `lost`.
    Restart {
        dev: usize,
        lost: bool,
    },
    Backup {
        dev: usize,
    },
    /// The device's database is replaced by its backup (its process restarts too).
    Restore {
        dev: usize,
        lost: bool,
    },
    BackupGateway,
    RestoreGateway,
    Retrack {
        dev: usize,
    },
}

fn act() -> impl Strategy<Value = Act> {
    let d = 0usize..4;
    let k = 0usize..KEYS.len();
    prop_oneof![
        5 => (d.clone(), k.clone()).prop_map(|(dev, key)| Act::Count { dev, key }),
        2 => (d.clone(), k.clone(), 0u8..4).prop_map(|(dev, key, value)| Act::SetNote { dev, key, value }),
        1 => (d.clone(), k, 0u8..3).prop_map(|(dev, key, value)| Act::SetSite { dev, key, value }),
        12 => (any::<u64>(), prop::bool::weighted(0.15)).prop_map(|(pick, keep)| Act::Deliver { pick, keep }),
        1 => any::<u64>().prop_map(|pick| Act::Drop { pick }),
        3 => (0u16..3_000).prop_map(|ms| Act::Tick { ms }),
        1 => d.clone().prop_map(|dev| Act::Disconnect { dev }),
        2 => d.clone().prop_map(|dev| Act::Connect { dev }),
        1 => (d.clone(), any::<bool>()).prop_map(|(dev, lost)| Act::Restart { dev, lost }),
        1 => d.clone().prop_map(|dev| Act::Backup { dev }),
        1 => (d.clone(), any::<bool>()).prop_map(|(dev, lost)| Act::Restore { dev, lost }),
        1 => Just(Act::BackupGateway),
        1 => Just(Act::RestoreGateway),
        1 => d.prop_map(|dev| Act::Retrack { dev }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_fleet_converges_with_exact_counters_whatever_happens(actions in proptest::collection::vec(act(), 20..90)) {
        let mut sim = Sim::new(4);
        for a in &actions {
            sim.run(a);
        }
        sim.quiesce();
        sim.check();
    }
}

/// Replays the cases in `simulation-cases.txt`: each once failed.
#[test]
fn recorded_cases_stay_fixed() {
    let cases = include_str!("simulation-cases.txt");
    for case in cases.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut sim = Sim::new(4);
        for a in &parse_case(case) {
            sim.run(a);
        }
        sim.quiesce();
        sim.check();
    }
}

/// Replays one recorded case: `SIM_CASE='[Count { dev: 0, key: 0 }, ...]'`, as proptest prints
/// it (whitespace removed), with `SIM_TRACE=1` to see every delivery.
#[test]
fn replay_a_recorded_case() {
    let Ok(case) = std::env::var("SIM_CASE") else { return };
    let actions = parse_case(&case);
    let mut sim = Sim::new(4);
    for a in &actions {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("== {a:?}");
        }
        sim.run(a);
        if std::env::var_os("SIM_TRACE").is_some() {
            sim.trace_devices();
        }
    }
    sim.quiesce();
    sim.check();
}

fn parse_case(text: &str) -> Vec<Act> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let num = |body: &str, field: &str| -> u64 {
        let at = body.find(&format!("{field}:")).unwrap_or_else(|| panic!("{field} in {body}")) + field.len() + 1;
        body[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("number")
    };
    let flag = |body: &str, field: &str| body.contains(&format!("{field}:true"));
    let mut out = Vec::new();
    let mut rest = text.trim_start_matches('[').trim_end_matches(']');
    while !rest.is_empty() {
        rest = rest.trim_start_matches(',');
        let name: String = rest.chars().take_while(char::is_ascii_alphanumeric).collect();
        if name.is_empty() {
            break;
        }
        rest = &rest[name.len()..];
        let body = if rest.starts_with('{') {
            let end = rest.find('}').expect("closing brace");
            let body = &rest[1..end];
            rest = &rest[end + 1..];
            body
        } else {
            ""
        };
        let dev = || num(body, "dev") as usize;
        out.push(match name.as_str() {
            "Count" => Act::Count { dev: dev(), key: num(body, "key") as usize },
            "SetNote" => Act::SetNote { dev: dev(), key: num(body, "key") as usize, value: num(body, "value") as u8 },
            "SetSite" => Act::SetSite { dev: dev(), key: num(body, "key") as usize, value: num(body, "value") as u8 },
            "Deliver" => Act::Deliver { pick: num(body, "pick"), keep: flag(body, "keep") },
            "Drop" => Act::Drop { pick: num(body, "pick") },
            "Tick" => Act::Tick { ms: num(body, "ms") as u16 },
            "Disconnect" => Act::Disconnect { dev: dev() },
            "Connect" => Act::Connect { dev: dev() },
            "Restart" => Act::Restart { dev: dev(), lost: flag(body, "lost") },
            "Backup" => Act::Backup { dev: dev() },
            "Restore" => Act::Restore { dev: dev(), lost: flag(body, "lost") },
            "BackupGateway" => Act::BackupGateway,
            "RestoreGateway" => Act::RestoreGateway,
            "Retrack" => Act::Retrack { dev: dev() },
            other => panic!("unknown action {other}"),
        });
    }
    out
}
