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
//!
//! A table may also name the roles that write it (`writers` in the sync schema): a new write
//! of the sender's own node to it is refused unless the node's role is one of them.

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
    /// The role each own node writes as.
    pub roles: BTreeMap<NodeId, String>,
    /// Tables only some roles may write, with those roles.
    pub writers: BTreeMap<String, Vec<String>>,
}

impl Vouch {
    /// Why `incoming`, a change to `table`, claims more than its sender may, given `stored`,
    /// the state held for the row before the join; `None` if it claims nothing it may not.
    pub fn check(&self, table: &str, incoming: &RowState, stored: &RowState) -> Option<String> {
        let foreign = |node: &NodeId| !self.own.contains(node);
        if let Some((node, counter)) = new_write(incoming, stored, foreign) {
            return Some(format!("it carries a write of node {node} (counter {counter}) that is not the sender's own"));
        }
        if let Some(writers) = self.writers.get(table) {
            // Any action of a barred node this row did not hold: a write, a delete (a dot
            // with no value), a counter increment.
            let barred = self.own.iter().filter(|n| self.roles.get(n).is_none_or(|r| !writers.contains(r)));
            for &node in barred {
                if incoming.max_counter_of(node) > stored.max_counter_of(node) {
                    let role = self.roles.get(&node).map_or("none", String::as_str);
                    return Some(format!(
                        "table {table:?} is written only by roles {writers:?}; node {node} writes as {role:?}"
                    ));
                }
            }
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

/// A write of a node `foreign` picks that `stored` does not already hold.
fn new_write(incoming: &RowState, stored: &RowState, foreign: impl Fn(&NodeId) -> bool) -> Option<(NodeId, u64)> {
    let foreign = &foreign;
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
