//! Quotas: token buckets for messages and bytes, per device and per tenant, checked before a
//! message costs the gateway anything but reading its topic. A message over a quota is
//! dropped unanswered (the device keeps what it sent and sends it again later, so nothing is
//! lost) and the device is told to slow down, at most once a second. One device flooding
//! the gateway thus gets its quota and no more, and the others' messages do not queue
//! behind its flood. Pure logic over a clock the caller passes in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate { per_second: f64::INFINITY, burst: f64::INFINITY };
}

/// The quotas a gateway applies.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    pub device_messages: Rate,
    /// A burst of at least the largest uplink message, or that message could never pass.
    pub device_bytes: Rate,
    pub tenant_messages: Rate,
    pub tenant_bytes: Rate,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            // A device catching up pulls page after page (a snapshot page is applied in
            // about 25 ms): 100 a second, 1,000 at once, leaves it room, while a flood merges
            // at that rate at most.
            device_messages: Rate { per_second: 100.0, burst: 1_000.0 },
            device_bytes: Rate { per_second: 8.0 * MIB, burst: 128.0 * MIB },
            tenant_messages: Rate { per_second: 20_000.0, burst: 40_000.0 },
            tenant_bytes: Rate { per_second: 256.0 * MIB, burst: 1024.0 * MIB },
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket { tokens: rate.burst, at: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// How long until `n` tokens are there (zero: now). A request larger than the burst
    /// waits for a full bucket.
    fn wait(&self, rate: Rate, n: f64) -> Duration {
        let n = n.min(rate.burst);
        if self.tokens >= n {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((n - self.tokens) / rate.per_second).min(3_600.0))
    }
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    messages: Bucket,
    bytes: Bucket,
}

impl Pair {
    fn full(messages: Rate, bytes: Rate, now: Instant) -> Pair {
        Pair { messages: Bucket::full(messages, now), bytes: Bucket::full(bytes, now) }
    }

    fn wait(&mut self, messages: Rate, bytes: Rate, size: f64, now: Instant) -> Duration {
        self.messages.refill(messages, now);
        self.bytes.refill(bytes, now);
        self.messages.wait(messages, 1.0).max(self.bytes.wait(bytes, size))
    }

    fn take(&mut self, bytes: Rate, size: f64) {
        self.messages.tokens -= 1.0;
        self.bytes.tokens -= size.min(bytes.burst);
    }
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Handle it.
    Take,
    /// Drop it; `tell` says whether to send the device a `SlowDown` now, and `cut_off`
    /// that the device goes on sending as if it had not been told (and should be cut off at
    /// the broker for a while, where the gateway can).
    Drop { retry_after: Duration, tell: bool, cut_off: bool },
}

/// Messages dropped within a second of telling a device to slow down, after which it is
/// taken to ignore being told: an agent stops within its few messages in flight.
const IGNORED_AFTER: u64 = 1_000;

/// What is kept of one device.
#[derive(Debug)]
struct DeviceState {
    pair: Pair,
    told: Option<Instant>,
    /// Messages dropped since the device was last told to slow down.
    dropped: u64,
    /// Whether it was marked for a cut-off since it was last told.
    marked: bool,
}

/// The buckets of every device and tenant heard from recently.
#[derive(Debug)]
pub struct Quotas {
    cfg: QuotaConfig,
    devices: HashMap<(String, String), DeviceState>,
    tenants: HashMap<String, Pair>,
    admitted: u64,
}

/// How often a device over its quota is told.
const TELL_EVERY: Duration = Duration::from_secs(1);

impl Quotas {
    pub fn new(cfg: QuotaConfig) -> Quotas {
        Quotas { cfg, devices: HashMap::new(), tenants: HashMap::new(), admitted: 0 }
    }

    /// Whether a message of `size` bytes from `device` of `tenant` is handled now.
    pub fn admit(&mut self, tenant: &str, device: &str, size: usize, now: Instant) -> Admission {
        let c = &self.cfg;
        let size = size as f64;
        let state = self.devices.entry((tenant.to_owned(), device.to_owned())).or_insert_with(|| DeviceState {
            pair: Pair::full(c.device_messages, c.device_bytes, now),
            told: None,
            dropped: 0,
            marked: false,
        });
        let (pair, told) = (&mut state.pair, &mut state.told);
        let tenant_pair =
            self.tenants.entry(tenant.to_owned()).or_insert_with(|| Pair::full(c.tenant_messages, c.tenant_bytes, now));
        let wait = pair.wait(c.device_messages, c.device_bytes, size, now).max(tenant_pair.wait(
            c.tenant_messages,
            c.tenant_bytes,
            size,
            now,
        ));
        if wait > Duration::ZERO {
            let tell = told.is_none_or(|at| now.saturating_duration_since(at) >= TELL_EVERY);
            if tell {
                *told = Some(now);
                state.dropped = 0;
                state.marked = false;
            }
            // Counted from the telling, whatever is taken meanwhile as tokens come back: a
            // device that heard sends a few more at most.
            state.dropped += 1;
            let cut_off = state.dropped >= IGNORED_AFTER && !state.marked;
            state.marked |= cut_off;
            return Admission::Drop { retry_after: wait, tell, cut_off };
        }
        pair.take(c.device_bytes, size);
        tenant_pair.take(c.tenant_bytes, size);
        self.admitted += 1;
        if self.admitted.is_multiple_of(10_000) {
            self.forget_idle(now);
        }
        Admission::Take
    }

    /// Forgets devices whose buckets have refilled: they would start full anyway.
    fn forget_idle(&mut self, now: Instant) {
        let c = self.cfg.clone();
        let refilled = |rate: Rate, b: &Bucket| {
            now.saturating_duration_since(b.at).as_secs_f64() * rate.per_second + b.tokens >= rate.burst
        };
        self.devices
            .retain(|_, d| !(refilled(c.device_messages, &d.pair.messages) && refilled(c.device_bytes, &d.pair.bytes)));
        self.tenants.retain(|_, p| !(refilled(c.tenant_messages, &p.messages) && refilled(c.tenant_bytes, &p.bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> QuotaConfig {
        QuotaConfig {
            device_messages: Rate { per_second: 10.0, burst: 5.0 },
            device_bytes: Rate { per_second: 1_000.0, burst: 2_000.0 },
            tenant_messages: Rate { per_second: 100.0, burst: 8.0 },
            tenant_bytes: Rate::UNLIMITED,
        }
    }

    #[test]
    fn a_device_gets_its_burst_then_its_rate_and_is_told_once_a_second() {
        let mut q = Quotas::new(small());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(q.admit("t", "flood", 10, t0), Admission::Take);
        }
        let Admission::Drop { retry_after, tell: true, cut_off: false } = q.admit("t", "flood", 10, t0) else {
            panic!("over")
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert!(matches!(q.admit("t", "flood", 10, t0), Admission::Drop { tell: false, .. }));
        // Another device of the tenant is not held back by the flood.
        assert_eq!(q.admit("t", "honest", 10, t0), Admission::Take);
        // A tenth of a second later, one more.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(q.admit("t", "flood", 10, later), Admission::Take);
        assert!(matches!(q.admit("t", "flood", 10, later), Admission::Drop { tell: false, .. }));
        assert!(matches!(q.admit("t", "flood", 10, t0 + Duration::from_millis(1_050)), Admission::Take));
    }

    #[test]
    fn a_device_flooding_faster_than_its_tokens_come_back_is_marked_all_the_same() {
        let mut q = Quotas::new(small());
        let t0 = Instant::now();
        let mut marked = 0;
        // 10 a second come back; it sends 2,000 a second for half a second.
        for i in 0..1_000u64 {
            let at = t0 + Duration::from_micros(i * 500);
            marked += usize::from(matches!(q.admit("t", "flood", 1, at), Admission::Drop { cut_off: true, .. }));
        }
        assert_eq!(marked, 0, "not yet a thousand drops");
        for i in 1_000..2_100u64 {
            let at = t0 + Duration::from_micros(i * 500);
            marked += usize::from(matches!(q.admit("t", "flood", 1, at), Admission::Drop { cut_off: true, .. }));
        }
        assert_eq!(marked, 1);
    }

    #[test]
    fn a_device_that_goes_on_flooding_after_being_told_is_marked_once() {
        let mut q = Quotas::new(small());
        let t0 = Instant::now();
        let cut: Vec<bool> =
            (0..3_000).map(|_| matches!(q.admit("t", "flood", 1, t0), Admission::Drop { cut_off: true, .. })).collect();
        assert_eq!(cut.iter().filter(|c| **c).count(), 1);
        assert!(cut[5 + IGNORED_AFTER as usize - 1], "the thousandth dropped message marks it");
    }

    #[test]
    fn bytes_count_and_a_message_over_the_burst_waits_for_a_full_bucket() {
        let mut q = Quotas::new(small());
        let t0 = Instant::now();
        assert_eq!(q.admit("t", "d", 1_500, t0), Admission::Take);
        let Admission::Drop { retry_after, .. } = q.admit("t", "d", 1_500, t0) else { panic!("over") };
        assert_eq!(retry_after, Duration::from_secs(1));
        // Larger than the burst: passes once the bucket is full, and empties it.
        assert_eq!(q.admit("t", "d", 50_000, t0 + Duration::from_secs(2)), Admission::Take);
        assert!(matches!(q.admit("t", "d", 1, t0 + Duration::from_secs(2)), Admission::Drop { .. }));
    }

    #[test]
    fn a_tenant_over_its_quota_does_not_drain_the_devices_buckets() {
        let mut q = Quotas::new(small());
        let t0 = Instant::now();
        for d in 0..8 {
            assert_eq!(q.admit("t", &format!("d{d}"), 1, t0), Admission::Take);
        }
        assert!(matches!(q.admit("t", "d9", 1, t0), Admission::Drop { .. }));
        assert_eq!(q.admit("other", "d9", 1, t0), Admission::Take, "tenants are apart");
        // d9's own bucket was not charged for the dropped message.
        for _ in 0..4 {
            assert_eq!(q.admit("t", "d9", 1, t0 + Duration::from_secs(1)), Admission::Take);
        }
    }
}
