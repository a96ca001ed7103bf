//! The 12-column inspection record the benchmarks share, and helpers to report results.
#![allow(dead_code, unreachable_pub)]

use std::time::Instant;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    asset_tag TEXT NOT NULL,
    inspector TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    temperature REAL,
    pressure REAL,
    notes TEXT,
    passed INTEGER NOT NULL,
    inspected_at TEXT NOT NULL,
    photo_count INTEGER NOT NULL
)";

pub const INSERT: &str = "INSERT INTO inspections VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// A small deterministic generator (xorshift64*), so runs are comparable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
}

/// One realistic inspection record's values, in column order.
pub fn record(rng: &mut Rng, id: &str) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value::*;
    let n = rng.next();
    vec![
        Text(id.to_owned()),
        Text(format!("site-{:03}", n % 400)),
        Text(format!("AT-{:06}", (n >> 8) % 1_000_000)),
        Text(["a.okafor", "j.lindqvist", "m.ruiz", "s.tanaka"][(n >> 30) as usize % 4].to_owned()),
        Text("scheduled".to_owned()),
        Integer(((n >> 34) % 5) as i64),
        Real(20.0 + ((n >> 20) % 400) as f64 / 10.0),
        Real(1.0 + ((n >> 40) % 900) as f64 / 100.0),
        Text("visual check of housing, seals and mounting; no leaks observed".to_owned()),
        Integer(((n >> 50) & 1) as i64),
        Text(format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + (n >> 5) % 28, (n >> 11) % 24, (n >> 17) % 60)),
        Integer(((n >> 44) % 12) as i64),
    ]
}

pub fn column_names() -> [&'static str; 12] {
    [
        "id",
        "site_id",
        "asset_tag",
        "inspector",
        "status",
        "priority",
        "temperature",
        "pressure",
        "notes",
        "passed",
        "inspected_at",
        "photo_count",
    ]
}

/// Seconds taken by `f`.
pub fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints the machine line the bench script promises: one JSON object, last.
pub fn report(fields: &[(&str, f64)]) {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {}", round(*v))).collect();
    println!("{{{}}}", body.join(", "));
}

fn round(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}") }
}
