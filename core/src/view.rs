//! What a row looks like to the app, and which conflicts it holds: pure functions of the
//! row state and the table's policies, so every replica with the same state agrees.

use crate::clock::{Dot, Hlc, NodeId};
use crate::policy::{ColumnPolicy, DeletePolicy, TableSpec};
use crate::state::{Entry, Life, Register, RowState};
use crate::value::Value;

/// Looks up the source role a node declared (for authority columns).
pub trait Roles {
    fn role(&self, node: NodeId) -> Option<&str>;
}

impl Roles for std::collections::HashMap<NodeId, String> {
    fn role(&self, node: NodeId) -> Option<&str> {
        self.get(&node).map(String::as_str)
    }
}

impl Roles for std::collections::BTreeMap<NodeId, String> {
    fn role(&self, node: NodeId) -> Option<&str> {
        self.get(&node).map(String::as_str)
    }
}

/// The entry a policy shows among concurrent ones, `None` for an empty register.
pub fn resolve<'a>(reg: &'a Register<Value>, policy: &ColumnPolicy, roles: &dyn Roles) -> Option<&'a Entry<Value>> {
    let lww_key = |e: &Entry<Value>| (e.hlc, e.dot.node, e.dot.counter);
    match policy {
        ColumnPolicy::Authority(ranking) => reg.entries.iter().max_by_key(|e| {
            let rank = roles
                .role(e.dot.node)
                .and_then(|r| ranking.iter().position(|x| x == r))
                .map_or(0, |i| ranking.len() - i);
            (rank, lww_key(e))
        }),
        _ => reg.entries.iter().max_by_key(|e| lww_key(e)),
    }
}

/// Whether the field write `e` to `column` was unseen by every delete in the life register.
fn survives_deletes(state: &RowState, column: &str, e: &Entry<Value>) -> bool {
    state.life.entries.iter().all(|d| match &d.value {
        Life::Dead { seen } => !seen.get(column).is_some_and(|vv| vv.covers(e.dot)),
        Life::Alive => true,
    })
}

fn post_delete_writes<'a>(state: &'a RowState) -> impl Iterator<Item = (&'a String, &'a Entry<Value>)> + 'a {
    state
        .fields
        .iter()
        .flat_map(|(c, r)| r.entries.iter().map(move |e| (c, e)))
        .filter(|(c, e)| survives_deletes(state, c, e))
}

/// Whether the row exists for the app.
pub fn is_visible(state: &RowState, spec: &TableSpec) -> bool {
    let alive = state.life.entries.iter().any(|e| e.value == Life::Alive);
    let dead = state.life.entries.iter().any(|e| e.value != Life::Alive);
    match spec.delete_policy {
        DeletePolicy::DeleteWins => alive && !dead,
        DeletePolicy::UpdateWins => alive || (dead && post_delete_writes(state).next().is_some()),
    }
}

/// The row's column values as the app should see them, or `None` if the row is deleted.
/// Columns with no write at all are left out (the app's default stands).
pub fn row_values(state: &RowState, spec: &TableSpec, roles: &dyn Roles) -> Option<Vec<(String, Value)>> {
    if !is_visible(state, spec) {
        return None;
    }
    let mut out = Vec::with_capacity(state.fields.len() + state.counters.len());
    for (column, reg) in &state.fields {
        if let Some(e) = resolve(reg, spec.policy(column), roles) {
            out.push((column.clone(), e.value.clone()));
        }
    }
    for (column, counter) in &state.counters {
        out.push((column.clone(), Value::Integer(counter.value())));
    }
    Some(out)
}

/// One write involved in a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The column written; `None` for the row's insert or delete.
    pub column: Option<String>,
    /// The value written; `None` for a delete.
    pub value: Option<Value>,
    pub dot: Dot,
    pub hlc: Hlc,
}

/// What kind of conflict a record describes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConflictKind {
    /// Concurrent writes to one column.
    Field { column: String, policy: ColumnPolicy },
    /// A delete raced writes to the same row.
    DeleteUpdate { policy: DeletePolicy },
}

/// A conflict as derived from a row's state: the version shown and the ones that lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRecord {
    pub kind: ConflictKind,
    pub winner: Version,
    pub losers: Vec<Version>,
}

impl ConflictRecord {
    /// Whether a person must still pick a value (manual policy).
    pub fn needs_resolution(&self) -> bool {
        matches!(&self.kind, ConflictKind::Field { policy: ColumnPolicy::Manual, .. })
    }

    /// The column, or `None` for a row-level conflict.
    pub fn column(&self) -> Option<&str> {
        match &self.kind {
            ConflictKind::Field { column, .. } => Some(column),
            ConflictKind::DeleteUpdate { .. } => None,
        }
    }
}

fn field_version(column: &str, e: &Entry<Value>) -> Version {
    Version { column: Some(column.to_owned()), value: Some(e.value.clone()), dot: e.dot, hlc: e.hlc }
}

fn life_version(e: &Entry<Life>) -> Version {
    let value = match e.value {
        Life::Alive => Some(Value::Integer(1)),
        Life::Dead { .. } => None,
    };
    Version { column: None, value, dot: e.dot, hlc: e.hlc }
}

/// Every conflict the row currently holds, in a deterministic order.
pub fn conflicts(state: &RowState, spec: &TableSpec, roles: &dyn Roles) -> Vec<ConflictRecord> {
    let mut out = Vec::new();
    for (column, reg) in &state.fields {
        if reg.entries.len() < 2 {
            continue;
        }
        let policy = spec.policy(column);
        let Some(win) = resolve(reg, policy, roles) else { continue };
        out.push(ConflictRecord {
            kind: ConflictKind::Field { column: column.clone(), policy: policy.clone() },
            winner: field_version(column, win),
            losers: reg.entries.iter().filter(|e| e.dot != win.dot).map(|e| field_version(column, e)).collect(),
        });
    }
    let deletes: Vec<&Entry<Life>> = state.life.entries.iter().filter(|e| e.value != Life::Alive).collect();
    if deletes.is_empty() {
        return out;
    }
    let mut updates: Vec<Version> =
        state.life.entries.iter().filter(|e| e.value == Life::Alive).map(life_version).collect();
    updates.extend(post_delete_writes(state).map(|(c, e)| field_version(c, e)));
    if updates.is_empty() {
        return out;
    }
    let mut deletes: Vec<Version> = deletes.into_iter().map(life_version).collect();
    let newest = |v: &Vec<Version>| v.iter().enumerate().max_by_key(|(_, v)| (v.hlc, v.dot)).map_or(0, |(i, _)| i);
    let (mut winners, losers) = match spec.delete_policy {
        DeletePolicy::DeleteWins => (deletes, updates),
        DeletePolicy::UpdateWins => (updates, std::mem::take(&mut deletes)),
    };
    let winner = winners.swap_remove(newest(&winners));
    let mut losers: Vec<Version> = winners.into_iter().chain(losers).collect();
    losers.sort_by(|a, b| (a.dot, &a.column).cmp(&(b.dot, &b.column)));
    out.push(ConflictRecord { kind: ConflictKind::DeleteUpdate { policy: spec.delete_policy }, winner, losers });
    out
}
