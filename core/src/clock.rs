//! Node identities, dots, version vectors and the hybrid logical clock.

use std::fmt;

/// A replica's random 128-bit identity. The gateway is a node too.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// A fresh random node id from the operating system's generator.
    pub fn random() -> Result<NodeId, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(NodeId(bytes))
    }

    /// Builds a node id from a slice, which must be exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<NodeId> {
        Some(NodeId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits tell nodes apart in logs without drowning them.
        write!(f, "NodeId({})", &self.to_string()[..8])
    }
}

impl std::str::FromStr for NodeId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(());
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ())?;
        }
        Ok(NodeId(bytes))
    }
}

/// The identity of one write: the node that made it and that node's event counter.
/// Counters come from one per-store sequence, so a dot is never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dot {
    pub node: NodeId,
    pub counter: u64,
}

/// A hybrid logical clock timestamp: 48 bits of milliseconds since the Unix epoch and a
/// 16-bit logical counter, so it orders like a number and fits a SQLite INTEGER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    const LOGICAL_BITS: u32 = 16;

    /// Builds a timestamp from wall time in milliseconds and a logical counter.
    pub fn new(millis: u64, logical: u16) -> Hlc {
        Hlc((millis << Self::LOGICAL_BITS) | u64::from(logical))
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }
}

/// What the clock did with a remote timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Within the allowed drift: the clock moved up to it if needed.
    Adopted,
    /// Too far in the future: the clock moved only as far as `now + max_drift`.
    Clamped,
}

/// The local hybrid logical clock. Remote timestamps advance it so that causally later writes
/// carry later timestamps, but never beyond `max_drift_ms` ahead of local wall time: one device
/// with a clock set to next year must not drag every replica along.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    pub fn new(last: Hlc, max_drift_ms: u64) -> HlcClock {
        HlcClock { last, max_drift_ms }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Issues a timestamp for a local event at wall time `now_ms`, strictly after the last one.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let wall = Hlc::new(now_ms, 0);
        self.last = if wall > self.last { wall } else { Hlc(self.last.0 + 1) };
        self.last
    }

    /// Moves the clock up to `issued` (timestamps a seal gave local writes).
    pub fn witness(&mut self, issued: Hlc) {
        self.last = self.last.max(issued);
    }

    /// Folds in a timestamp seen on a remote write, bounded by the allowed drift.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Observed {
        let bound = Hlc::new(now_ms.saturating_add(self.max_drift_ms), 0);
        let (adopt, outcome) = if remote > bound { (bound, Observed::Clamped) } else { (remote, Observed::Adopted) };
        if adopt > self.last {
            self.last = adopt;
        }
        outcome
    }
}

/// A sparse version vector: for each node that wrote, the highest counter seen. Kept sorted
/// by node so that equal vectors are equal as data.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct VersionVector(Vec<(NodeId, u64)>);

impl VersionVector {
    pub fn new() -> VersionVector {
        VersionVector(Vec::new())
    }

    /// The highest counter seen from `node` (0 if none).
    pub fn get(&self, node: NodeId) -> u64 {
        match self.0.binary_search_by(|(n, _)| n.cmp(&node)) {
            Ok(i) => self.0[i].1,
            Err(_) => 0,
        }
    }

    /// Whether the write `dot` is already reflected.
    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.node) >= dot.counter
    }

    /// Raises `node`'s entry to at least `counter`.
    pub fn advance(&mut self, node: NodeId, counter: u64) {
        // No entry is the same as 0: keeping none keeps equal vectors equal.
        if counter == 0 {
            return;
        }
        match self.0.binary_search_by(|(n, _)| n.cmp(&node)) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(counter),
            Err(i) => self.0.insert(i, (node, counter)),
        }
    }

    /// Pointwise maximum with `other`.
    pub fn join(&mut self, other: &VersionVector) {
        for &(node, counter) in &other.0 {
            self.advance(node, counter);
        }
    }

    /// Whether every entry of `other` is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|&(n, c)| self.get(n) >= c)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.0.iter().copied()
    }

    /// A vector holding exactly one dot.
    pub fn from_dot(dot: Dot) -> VersionVector {
        VersionVector(vec![(dot.node, dot.counter)])
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (n, c) in iter {
            vv.advance(n, c);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId([b; 16])
    }

    #[test]
    fn hlc_ticks_are_strictly_increasing_even_when_wall_time_stalls() {
        let mut clock = HlcClock::new(Hlc::default(), 60_000);
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(999);
        assert!(a < b && b < c);
        assert_eq!(c.millis(), 1_000);
    }

    #[test]
    fn far_future_remote_clock_is_clamped_not_adopted() {
        let mut clock = HlcClock::new(Hlc::default(), 5_000);
        let year_ahead = Hlc::new(1_000 + 365 * 86_400_000, 0);
        assert_eq!(clock.observe(year_ahead, 1_000), Observed::Clamped);
        assert!(clock.last().millis() <= 6_000);
        assert_eq!(clock.observe(Hlc::new(3_000, 0), 1_000), Observed::Adopted);
        assert!(clock.tick(1_000) > Hlc::new(3_000, 0));
    }

    #[test]
    fn version_vector_join_is_pointwise_max() {
        let mut a: VersionVector = [(node(1), 3), (node(2), 1)].into_iter().collect();
        let b: VersionVector = [(node(2), 5), (node(3), 2)].into_iter().collect();
        a.join(&b);
        assert_eq!(a.get(node(1)), 3);
        assert_eq!(a.get(node(2)), 5);
        assert_eq!(a.get(node(3)), 2);
        assert!(a.dominates(&b));
        assert!(a.covers(Dot { node: node(3), counter: 2 }));
        assert!(!a.covers(Dot { node: node(3), counter: 3 }));
    }

    #[test]
    fn node_id_round_trips_through_hex() {
        let n = NodeId([0xab; 16]);
        assert_eq!(n.to_string().parse::<NodeId>(), Ok(n));
        assert!("xyz".parse::<NodeId>().is_err());
    }
}
