//! Batches: the unit shipped between replicas.

use std::collections::BTreeMap;

use crate::clock::NodeId;
use crate::state::RowState;
use crate::value::Value;

/// A change to (or the full state of) one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    pub table: String,
    /// Primary key values in the table's key column order.
    pub pk: Vec<Value>,
    pub state: RowState,
}

/// An ordered list of row changes plus what a receiver needs to interpret them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// The source role of each node whose writes appear in the batch, for authority columns.
    pub roles: BTreeMap<NodeId, String>,
    pub rows: Vec<RowChange>,
}

impl Batch {
    /// The number of field writes the batch carries (register entries plus counter parts).
    pub fn field_changes(&self) -> usize {
        self.rows
            .iter()
            .map(|r| {
                r.state.fields.values().map(|f| f.entries.len()).sum::<usize>()
                    + r.state.counters.values().map(|c| c.0.len()).sum::<usize>()
            })
            .sum()
    }
}
