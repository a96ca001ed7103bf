//! What a device's batch may claim, decided from what the store knows of the nodes it names:
//! run by every store inside its merge transaction, before the rows are merged.
//!
//! A node is bound to the device that first used it (its handshake, or its first batch) and
//! to one role: the device's role in the registry, or in a tenant without a registry the
//! first role the node declared. A batch writes only as its device's nodes, claims of every
//! node only what was merged from it, and cannot change a role: the roles the merge keeps and
//! logs are the bound ones, so every replica ranks the same node the same way.
//!
//! After the store lost changes (a restored backup: a new epoch that replaced another),
//! devices send back everything they hold, other devices' writes included, and the store
//! cannot tell those from forgeries. Until the recovery window closes, such claims are taken
//! (see docs/SECURITY.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use driftless_core::intake::Vouch;
use driftless_core::{Batch, NodeId, RowState, SyncSchema};

use crate::error::Result;
use crate::storage::Incoming;

/// The device id the cloud's own nodes (writers with plain SQL) are bound to. No device can
/// have it: a topic's device segment is never empty.
pub(crate) const CLOUD_OWNER: &str = "";

/// What the store holds of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeFact {
    /// The device it is bound to (`None`: not yet bound).
    pub(crate) device: Option<String>,
    /// The role it is bound to (`None`: not yet bound).
    pub(crate) role: Option<String>,
    /// The highest dot counter merged from it.
    pub(crate) counter: u64,
}

/// What vouching needs of a store, inside its merge transaction.
pub(crate) trait NodeBook {
    /// What the store holds of each of `nodes` it knows.
    fn facts(&mut self, tenant: &str, nodes: &[NodeId]) -> Result<HashMap<NodeId, NodeFact>>;
    /// Binds `node` to `device` and `role`, keeping a binding already made.
    fn bind(&mut self, tenant: &str, node: NodeId, device: &str, role: &str) -> Result<()>;
}

/// What the merge of one batch may take from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Vouched {
    /// The row checks (`None` while the tenant recovers from a restore).
    pub(crate) vouch: Option<Vouch>,
    /// The roles of the batch's nodes as bound, in place of the ones it declares.
    pub(crate) roles: BTreeMap<NodeId, String>,
}

/// Binds the batch's new nodes to its device and decides what it may claim. Nothing here
/// refuses a batch as a whole: a role it declares is replaced, never a reason to refuse.
pub(crate) fn vouch(
    book: &mut dyn NodeBook,
    from: &Incoming<'_>,
    batch: &Batch,
    schema: Option<&SyncSchema>,
) -> Result<Vouched> {
    let mut written: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for row in &batch.rows {
        for (node, counter) in row.state.write_counters() {
            let c = written.entry(node).or_default();
            *c = (*c).max(counter);
        }
        named.extend(row.state.nodes());
    }
    let named: Vec<NodeId> = named.into_iter().collect();
    let facts = book.facts(from.tenant, &named)?;
    let mut out = Vouched::default();
    let mut vouch = Vouch::default();
    for node in named {
        let fact = facts.get(&node).cloned().unwrap_or_default();
        let claimed = batch.roles.get(&node).map_or("", String::as_str);
        let own = match fact.device.as_deref() {
            Some(device) => device == from.device,
            // A node first used by this batch is this device's (a node taken since the
            // handshake), unless the store is recovering: then it may be a node the store
            // forgot, sent back by another device. A node with merged writes but no device
            // (sent back so) is bound only by its own device's handshake, or by a version-1
            // device, which has none.
            None => written.contains_key(&node) && !from.recovering && (fact.counter == 0 || from.legacy),
        };
        let bound_role = fact.role.clone().filter(|r| !r.is_empty());
        let mut counter = fact.counter;
        if own && let Some(&most) = written.get(&node) {
            // A node keeps the role it was first bound to with (every replica must rank it
            // the same way for good): the registry's at that time, or in a tenant without a
            // registry the first role it declared. What a batch declares changes nothing.
            let role = bound_role.clone().unwrap_or_else(|| from.role.unwrap_or(claimed).to_owned());
            if fact.device.is_none() || (bound_role.is_none() && !role.is_empty()) {
                book.bind(from.tenant, node, from.device, &role)?;
            }
            if !role.is_empty() {
                out.roles.insert(node, role);
            }
            counter = counter.max(most);
        } else if let Some(role) = bound_role {
            out.roles.insert(node, role);
        } else if from.recovering && !claimed.is_empty() {
            out.roles.insert(node, claimed.to_owned());
        }
        if own {
            vouch.own.insert(node);
            if let Some(role) = out.roles.get(&node) {
                vouch.roles.insert(node, role.clone());
            }
        }
        vouch.known.insert(node, counter);
    }
    vouch.writers = schema.map(SyncSchema::writers).unwrap_or_default();
    out.vouch = (!from.recovering).then_some(vouch);
    Ok(out)
}

/// Whether every node in `state` is bound to `device` (a row only it wrote so far).
pub(crate) fn all_bound_to(book: &mut dyn NodeBook, tenant: &str, device: &str, state: &RowState) -> Result<bool> {
    let nodes = state.nodes();
    let facts = book.facts(tenant, &nodes)?;
    Ok(nodes.iter().all(|n| facts.get(n).and_then(|f| f.device.as_deref()) == Some(device)))
}
