//! The causal state of one row: what every replica keeps and what batches carry.
//!
//! A row is a map of registers. Each ordinary column is a multi-value register: the writes
//! not yet superseded (normally one; several while concurrent writes coexist) plus a version
//! vector of every write to that column the replica has seen. The row's existence is a
//! register of its own ("life"), and counter columns keep one running total per node.
//! A batch entry is the same structure holding only the registers a write touched, so
//! applying a change and merging two replicas are the same join.

use std::collections::BTreeMap;

use crate::clock::{Dot, Hlc, NodeId, VersionVector};
use crate::value::Value;

/// One write still standing in a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    pub value: T,
    pub dot: Dot,
    pub hlc: Hlc,
}

/// A multi-value register with its causal context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register<T> {
    /// Every write to this register that has been seen, superseded or not.
    pub ctx: VersionVector,
    /// The writes not superseded by a later write, sorted by dot.
    pub entries: Vec<Entry<T>>,
}

impl<T> Default for Register<T> {
    fn default() -> Self {
        Register { ctx: VersionVector::new(), entries: Vec::new() }
    }
}

impl<T> Register<T> {
    /// A register holding one local write that supersedes everything seen so far.
    pub fn overwrite(&mut self, value: T, dot: Dot, hlc: Hlc) {
        self.ctx.advance(dot.node, dot.counter);
        self.entries = vec![Entry { value, dot, hlc }];
    }

    pub fn is_empty(&self) -> bool {
        self.ctx.is_empty() && self.entries.is_empty()
    }
}

/// A value of the life register.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Life {
    /// The row was inserted (or re-inserted).
    Alive,
    /// The row was deleted by a node that had seen, per column, the writes in `seen`.
    /// Column writes not covered by `seen` happened concurrently with (or after) the delete.
    Dead { seen: BTreeMap<String, VersionVector> },
}

/// One node's contribution to a counter column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterPart {
    /// The dot counter of the node's latest write to this column; the higher one wins a join.
    pub seq: u64,
    /// The node's running total of increments minus decrements.
    pub total: i64,
}

/// A PN-counter: each node's running total, summed for the visible value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counter(pub BTreeMap<NodeId, CounterPart>);

impl Counter {
    /// The exact sum of every node's total (wrapping like SQLite would not; documented).
    pub fn value(&self) -> i64 {
        self.0.values().fold(0i64, |acc, p| acc.wrapping_add(p.total))
    }
}

/// The full causal state of one row, or the part of it that one change carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowState {
    pub life: Register<Life>,
    pub fields: BTreeMap<String, Register<Value>>,
    pub counters: BTreeMap<String, Counter>,
}

impl RowState {
    /// The highest timestamp of any write in this state (for clock observation).
    /// The highest dot counter of `node` this state mentions (in entries, contexts, the
    /// columns a delete saw, or counter parts); 0 if none.
    pub fn max_counter_of(&self, node: NodeId) -> u64 {
        fn register<T>(r: &Register<T>, node: NodeId) -> u64 {
            let entries = r.entries.iter().filter(|e| e.dot.node == node).map(|e| e.dot.counter);
            entries.max().unwrap_or(0).max(r.ctx.get(node))
        }
        let seen = self.life.entries.iter().flat_map(|e| match &e.value {
            Life::Dead { seen } => seen.values().map(|vv| vv.get(node)).max(),
            Life::Alive => None,
        });
        let fields = self.fields.values().map(|r| register(r, node));
        let counters = self.counters.values().filter_map(|c| c.0.get(&node).map(|p| p.seq));
        seen.chain(fields).chain(counters).fold(register(&self.life, node), u64::max)
    }

    pub fn max_hlc(&self) -> Option<(NodeId, Hlc)> {
        let life = self.life.entries.iter().map(|e| (e.dot.node, e.hlc));
        let fields = self.fields.values().flat_map(|r| r.entries.iter().map(|e| (e.dot.node, e.hlc)));
        life.chain(fields).max_by_key(|(_, h)| *h)
    }

    /// Whether this state stays within what every replica accepts when decoding it. Checked
    /// before a state is stored, so that no row can grow into one no replica can load again.
    pub fn check_limits(&self, limits: &crate::codec::Limits) -> Result<(), String> {
        fn over(what: &str, found: usize, limit: usize) -> Result<(), String> {
            if found > limit { Err(format!("{what}: {found} exceeds the limit of {limit}")) } else { Ok(()) }
        }
        // Names built only for a row that is over (this runs for every row sealed or merged).
        let over_in = |what: &str, column: &str, found: usize, limit: usize| -> Result<(), String> {
            if found > limit { over(&format!("{what} of {column:?}"), found, limit) } else { Ok(()) }
        };
        over("columns in a row", self.fields.len(), limits.max_columns)?;
        over("counter columns in a row", self.counters.len(), limits.max_columns)?;
        over("concurrent row versions", self.life.entries.len(), limits.max_register_entries)?;
        over("version vector entries", self.life.ctx.len(), limits.max_vector_len)?;
        for e in &self.life.entries {
            if let Life::Dead { seen } = &e.value {
                over("columns seen by a delete", seen.len(), limits.max_columns)?;
                for vv in seen.values() {
                    over("version vector entries", vv.len(), limits.max_vector_len)?;
                }
            }
        }
        for (column, reg) in &self.fields {
            over_in("concurrent values", column, reg.entries.len(), limits.max_register_entries)?;
            over("version vector entries", reg.ctx.len(), limits.max_vector_len)?;
            for e in &reg.entries {
                over_in("bytes in a value", column, e.value.payload_len(), limits.max_value_bytes)?;
            }
        }
        for counter in self.counters.values() {
            over("counter parts", counter.0.len(), limits.max_vector_len)?;
        }
        // The whole row must fit one message with room to spare: a snapshot page, a log entry
        // or the gateway's copy of the row holds it in one payload.
        let total: usize = self.fields.values().flat_map(|r| r.entries.iter()).map(|e| e.value.payload_len()).sum();
        over("bytes of values in a row", total, limits.max_decompressed / 2)?;
        Ok(())
    }

    /// For each node that wrote something in this state, the highest dot counter of its
    /// writes here (contexts only say what a writer had seen, so they are not counted).
    pub fn write_counters(&self) -> BTreeMap<NodeId, u64> {
        let mut out = BTreeMap::new();
        let mut note = |node: NodeId, counter: u64| {
            let c = out.entry(node).or_insert(0);
            *c = (*c).max(counter);
        };
        for e in &self.life.entries {
            note(e.dot.node, e.dot.counter);
        }
        for r in self.fields.values() {
            for e in &r.entries {
                note(e.dot.node, e.dot.counter);
            }
        }
        for c in self.counters.values() {
            for (node, part) in &c.0 {
                note(*node, part.seq);
            }
        }
        out
    }

    /// Every node this state mentions, in order, without repeats.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes = Vec::new();
        let add_vv = |vv: &VersionVector, nodes: &mut Vec<NodeId>| {
            nodes.extend(vv.iter().map(|(n, _)| n));
        };
        add_vv(&self.life.ctx, &mut nodes);
        for e in &self.life.entries {
            nodes.push(e.dot.node);
            if let Life::Dead { seen } = &e.value {
                for vv in seen.values() {
                    add_vv(vv, &mut nodes);
                }
            }
        }
        for r in self.fields.values() {
            add_vv(&r.ctx, &mut nodes);
            nodes.extend(r.entries.iter().map(|e| e.dot.node));
        }
        for c in self.counters.values() {
            nodes.extend(c.0.keys().copied());
        }
        nodes.sort();
        nodes.dedup();
        nodes
    }
}
