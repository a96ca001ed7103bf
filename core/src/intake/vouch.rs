//! What a sender may claim: the gateway's check of a device's batch, whatever the broker let
//! through. A device trusts what its gateway sends and merges without one.
//!
//! A batch carries two kinds of claim a device could forge. Writes: an entry with another
//! node's dot is a write made as that node (with that node's role, and a counter every
//! replica then treats as seen). Contexts: a version vector claiming a node's counter up to
//! `c` makes every replica treat that node's writes up to `c` as already seen, so a claim of
//! `u64::MAX` silences the node for good. So the gateway lets a device write only as the
//! nodes bound to it, and claim of any node only what has been merged from it (or what this
//! batch itself writes as its own nodes). A foreign write the gateway already holds is
//! harmless (the join ignores it) and is let through: a device sends rows back whole.

use std::collections::{BTreeMap, BTreeSet};

use crate::clock::NodeId;
use crate::state::RowState;

/// The nodes a sender writes as and what replicas may know of every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vouch {
    /// Nodes whose writes are the sender's own.
    pub own: BTreeSet<NodeId>,
    /// The highest counter of each node merged so far, or written as an own node in this
    /// batch: what a context may claim.
    pub known: BTreeMap<NodeId, u64>,
}

impl Vouch {
    /// Why `incoming` claims more than its sender may, given `stored`, the state held for
    /// the row before the join; `None` if it claims nothing it may not.
    pub fn check(&self, incoming: &RowState, stored: &RowState) -> Option<String> {
        if let Some((node, counter)) = foreign_write(incoming, stored, &self.own) {
            return Some(format!("it carries a write of node {node} (counter {counter}) that is not the sender's own"));
        }
        // Claims of the sender's own nodes are not checked: they could only silence its own
        // writes, and after a node change they name writes still on their way.
        for node in incoming.nodes().into_iter().filter(|n| !self.own.contains(n)) {
            let claimed = incoming.max_counter_of(node);
            let may = self.known.get(&node).copied().unwrap_or(0).max(stored.max_counter_of(node));
            if claimed > may {
                return Some(format!(
                    "it claims writes of node {node} up to counter {claimed}; only {may} were merged from it"
                ));
            }
        }
        None
    }
}

/// A write of a node not in `own` that `stored` does not already hold.
fn foreign_write(incoming: &RowState, stored: &RowState, own: &BTreeSet<NodeId>) -> Option<(NodeId, u64)> {
    let foreign = |node: &NodeId| !own.contains(node);
    let life = incoming
        .life
        .entries
        .iter()
        .filter(|e| foreign(&e.dot.node) && stored.life.ctx.get(e.dot.node) < e.dot.counter)
        .map(|e| (e.dot.node, e.dot.counter));
    let fields = incoming.fields.iter().flat_map(|(column, reg)| {
        let held = stored.fields.get(column);
        reg.entries
            .iter()
            .filter(move |e| foreign(&e.dot.node) && held.map_or(0, |r| r.ctx.get(e.dot.node)) < e.dot.counter)
            .map(|e| (e.dot.node, e.dot.counter))
    });
    let counters = incoming.counters.iter().flat_map(|(column, counter)| {
        let held = stored.counters.get(column);
        counter
            .0
            .iter()
            .filter(move |(node, part)| {
                foreign(node) && held.and_then(|c| c.0.get(*node)).map_or(0, |p| p.seq) < part.seq
            })
            .map(|(node, part)| (*node, part.seq))
    });
    let mut found = life.chain(fields).chain(counters);
    found.next()
}
