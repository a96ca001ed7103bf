//! The operator's report: devices and their lag, the store's epoch, clock skew, and dead
//! letters (the newest listed, all of them counted by reason).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::Result;
use crate::storage::{DeadLetterFilter, GatewayStore};

/// The report as text: every tenant (or `filter.tenant`), and the dead letters `filter`
/// selects, of which the newest `filter.limit` are listed one by one.
pub fn render(store: &mut dyn GatewayStore, filter: &DeadLetterFilter) -> Result<String> {
    let mut out = String::new();
    for tenant in store.tenants()? {
        if filter.tenant.as_ref().is_some_and(|t| *t != tenant) {
            continue;
        }
        let _ = writeln!(out, "tenant {tenant} (epoch {})", store.epoch(&tenant)?);
        let _ = writeln!(out, "  device                           last seen (ms)  uplink hwm  cursor      lag");
        for d in store.devices(&tenant)? {
            let _ = writeln!(
                out,
                "  {:<32} {:>14}  {:>10}  {:>6}  {:>7}",
                d.device, d.last_seen_ms, d.uplink_hwm, d.downlink_cursor, d.lag
            );
        }
        for s in store.clock_skew(&tenant)? {
            let _ = writeln!(
                out,
                "  clock ahead: node {} wrote at {} ms, {} writes bounded (last at {} ms)",
                s.node,
                s.max_hlc.millis(),
                s.bounded,
                s.last_ms
            );
        }
        let matching = DeadLetterFilter { tenant: Some(tenant.clone()), limit: 0, ..filter.clone() };
        let letters = store.dead_letters(&matching)?;
        if letters.is_empty() {
            continue;
        }
        let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
        for l in &letters {
            // Reasons name numbers that differ per letter; group on the text before them.
            let kind: String = l.reason.chars().take_while(|c| !c.is_ascii_digit()).collect();
            *by_reason.entry(kind.trim().to_owned()).or_default() += 1;
        }
        let _ = writeln!(out, "  dead letters: {}", letters.len());
        for (reason, n) in &by_reason {
            let _ = writeln!(out, "    {n:>6}  {reason}");
        }
        for l in letters.iter().take(filter.limit) {
            let _ = writeln!(
                out,
                "  dead letter {} from {} at {} ms, {} bytes (sha256 {}): {}",
                l.id,
                l.device,
                l.received_ms,
                l.size,
                l.sha256.get(..12).unwrap_or(""),
                l.reason
            );
        }
        if letters.len() > filter.limit {
            let _ = writeln!(
                out,
                "  ... {} more (--limit, --device, --reason, --since-hours)",
                letters.len() - filter.limit
            );
        }
    }
    Ok(out)
}
