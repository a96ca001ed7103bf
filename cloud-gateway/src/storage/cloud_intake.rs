//! Taking in writes made directly to a store's real tables, whatever the database: what a
//! journal says of each key becomes writes of the tenant's cloud nodes (one per role a writer
//! names), stamped when they were made, merged into the causal state, logged for every device.
//!
//! Like a device's capture, each write carries only what changed: a column an update left
//! alone is not written again. A write no replica could take (a value its column cannot hold,
//! a row grown past the limits, a role the schema does not declare) is kept as a dead letter
//! with its reason and the row is put back as it showed; other writes go on.

use std::collections::BTreeMap;

use driftless_core::codec::{Limits, encode_payload};
use driftless_core::scope::{Held, Move};
use driftless_core::{
    Batch, ColumnPolicy, Dot, FieldWrite, Hlc, LocalWrite, NodeId, RowChange, RowState, SchemaTable, SyncSchema, Value,
    row_values, write_local_delete, write_local_upsert,
};

use crate::error::Result;

/// The role cloud writes are made under when the writer names none.
pub(crate) const CLOUD_ROLE: &str = "cloud";

/// Non-key columns a journal's change mask covers.
pub(crate) const MASK_BITS: usize = 62;

/// Which values of an existing real table a schema version declares for the first time: all
/// of the table (`Whole`: no earlier version declared it), or the columns named. Such values
/// were written with plain SQL but never reached the causal state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Adopted {
    Whole,
    Columns(Vec<String>),
}

impl Adopted {
    /// What `table`, existing with `columns`, adopts under the version that declares it, given
    /// the table as the version its real tables followed declared it (`None`: not declared).
    pub(crate) fn of(table: &SchemaTable, columns: &[String], before: Option<&SchemaTable>) -> Option<Adopted> {
        if columns.is_empty() {
            return None;
        }
        let Some(before) = before else { return Some(Adopted::Whole) };
        let new: Vec<String> = table
            .columns
            .iter()
            .filter(|c| !table.is_key(&c.name) && columns.contains(&c.name) && before.column(&c.name).is_none())
            .map(|c| c.name.clone())
            .collect();
        (!new.is_empty()).then_some(Adopted::Columns(new))
    }

    /// The statement that journals those values as plain-SQL writes of the cloud role, made
    /// at `now_ms`: `journal` has the key columns `k0..`, then role, mask, at_ms; `names` are
    /// the columns its masks cover, in mask order. Writes equal to what a row shows become
    /// nothing at intake.
    pub(crate) fn journal_sql(
        &self,
        journal: &str,
        real: &str,
        table: &SchemaTable,
        names: &[String],
        now_ms: i64,
    ) -> String {
        use driftless_core::schema::quote;
        let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
        let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
        let (mask, only) = match self {
            Adopted::Whole => ("NULL".to_owned(), String::new()),
            Adopted::Columns(cols) => {
                let bits: Option<i64> = cols
                    .iter()
                    .map(|c| names.iter().position(|n| n == c).filter(|i| *i < MASK_BITS).map(|i| 1i64 << i))
                    .sum();
                let set: Vec<String> = cols.iter().map(|c| format!("{} IS NOT NULL", quote(c))).collect();
                (bits.map_or("NULL".to_owned(), |b| b.to_string()), format!(" WHERE {}", set.join(" OR ")))
            }
        };
        format!(
            "INSERT INTO {journal}({}, role, mask, at_ms) SELECT {}, NULL, {mask}, {now_ms} FROM {real}{only}",
            slots.join(", "),
            keys.join(", ")
        )
    }
}

/// What a journal says of one key since the last intake.
#[derive(Debug, Default)]
pub(crate) struct Journaled {
    /// The key's values, as written.
    pub(crate) pk: Vec<Value>,
    /// The role of its last write (`None`: the cloud role).
    role: Option<String>,
    /// A write of the whole row (an insert, a delete, a new key) is among them.
    whole: bool,
    /// For each journaled column, the role and time of the last write that changed it.
    cols: Vec<Option<(Option<String>, u64)>>,
    /// When it was last written (Unix ms).
    at_ms: u64,
}

impl Journaled {
    /// Adds one journal entry: its role, which of `width` columns it changed (`None`: all),
    /// and when.
    pub(crate) fn fold(&mut self, role: Option<String>, mask: Option<i64>, at_ms: Option<i64>, width: usize) {
        let at_ms = at_ms.unwrap_or(0).max(0) as u64;
        self.cols.resize(width, None);
        for (i, c) in self.cols.iter_mut().enumerate() {
            if mask.is_none_or(|m| i < MASK_BITS && m & (1 << i) != 0) {
                *c = Some((role.clone(), at_ms));
            }
        }
        self.whole |= mask.is_none();
        self.role = role;
        self.at_ms = self.at_ms.max(at_ms);
    }

    /// The roles that changed columns, each with the columns it changed last and when it
    /// changed the last of them.
    fn by_role(&self, names: &[String]) -> BTreeMap<String, (Vec<String>, u64)> {
        let mut out: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
        for (name, c) in names.iter().zip(&self.cols) {
            if let Some((role, at)) = c {
                let part = out.entry(role.clone().unwrap_or_else(|| CLOUD_ROLE.to_owned())).or_default();
                part.0.push(name.clone());
                part.1 = part.1.max(*at);
            }
        }
        out
    }
}

/// What an intake needs of a store, inside the store's transaction.
pub(crate) trait CloudTables {
    /// The stored state of a row (empty if none) and the roles of its nodes.
    fn load(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<(RowChange, BTreeMap<NodeId, String>)>;
    /// The real table's non-key columns of the row, in declaration order, if it exists.
    fn read_row(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<Option<Vec<Value>>>;
    /// The node writing for `role`, and the next dot counter it may use.
    fn cloud_node(&mut self, role: &str) -> Result<(NodeId, u64)>;
    /// Keeps a refused write with its reason.
    fn dead_letter(&mut self, writer: &str, reason: &str, payload: &[u8]) -> Result<()>;
    /// Shows the merged row in its real table.
    fn show(&mut self, table: &SchemaTable, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()>;
    /// Keeps the merged row's causal state.
    fn save(&mut self, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()>;
}

/// One intake of a tenant: the cloud nodes it writes as, and the changes to log.
#[derive(Debug)]
pub(crate) struct Intake<'a> {
    schema: &'a SyncSchema,
    limits: &'a Limits,
    now_ms: u64,
    /// Each role's node and its next counter, as used in this intake.
    pub(crate) writers: BTreeMap<String, (NodeId, u64)>,
    pub(crate) changes: Batch,
    /// Where each row of `changes` moved, scope-wise (`None`: a table without a scope).
    pub(crate) moves: Vec<Option<Move>>,
}

impl<'a> Intake<'a> {
    pub(crate) fn new(schema: &'a SyncSchema, limits: &'a Limits, now_ms: u64) -> Intake<'a> {
        Intake { schema, limits, now_ms, writers: BTreeMap::new(), changes: Batch::default(), moves: Vec::new() }
    }

    /// Takes in what the journal says of one key of `table`; `names` are the columns its
    /// masks cover, in mask order.
    pub(crate) fn key<S: CloudTables>(
        &mut self,
        store: &mut S,
        table: &SchemaTable,
        names: &[String],
        written: &Journaled,
    ) -> Result<()> {
        let (schema, limits, now_ms) = (self.schema, self.limits, self.now_ms);
        let (mut current, mut roles) = store.load(table, &written.pk)?;
        let values = store.read_row(table, &current.pk)?;
        // A row that appears or goes is one write, the last writer's; an update is one write
        // per role, of the columns it changed last, stamped when it changed them.
        let held = table.scope.as_ref().map(|s| Held::of(s, table, &current.state, &roles));
        let whole = written.whole && (values.is_none() || row_values(&current.state, &table.spec(), &roles).is_none());
        let parts: Vec<(String, Option<Vec<String>>, u64)> = if whole {
            vec![(written.role.clone().unwrap_or_else(|| CLOUD_ROLE.to_owned()), None, written.at_ms)]
        } else {
            written.by_role(names).into_iter().map(|(role, (cols, at))| (role, Some(cols), at)).collect()
        };
        let mut made = Vec::new();
        for (role, cols, at_ms) in parts {
            let (node, counter) = match self.writers.get(&role) {
                Some(w) => *w,
                None => store.cloud_node(&role)?,
            };
            let kept = current.clone();
            let mut with_role = roles.clone();
            with_role.insert(node, role.clone());
            let part = Part { dot: Dot { node, counter }, at_ms: at_ms.min(now_ms), only: cols.as_deref() };
            let Some(change) = cloud_change(table, &mut current, &with_role, part, values.clone()) else {
                continue;
            };
            self.writers.insert(role.clone(), (node, counter + 1));
            let change = RowChange { table: table.name.clone(), pk: current.pk.clone(), state: change };
            // What no replica could take is not merged: kept with its reason; the row shows
            // what it showed for those columns, and other roles' parts go on.
            let refused = (role != CLOUD_ROLE && !schema.roles.contains(&role))
                .then(|| format!("role {role:?} is not declared in the sync schema"))
                .or_else(|| table.check_row(&change).err())
                .or_else(|| key_too_long(&change.pk, limits))
                .or_else(|| current.state.check_limits(limits).err());
            if let Some(reason) = refused {
                let reason = format!("a write to {:?} made with SQL as {role:?} was refused: {reason}", table.name);
                tracing::warn!(%reason);
                let payload =
                    encode_payload(&Batch { roles: BTreeMap::from([(node, role.clone())]), rows: vec![change] });
                store.dead_letter(&format!("sql as {role}"), &reason, &payload)?;
                current = kept;
                continue;
            }
            roles = with_role;
            made.push((node, role, change));
        }
        // The table shows the merged row: what was taken in, and what was refused put back.
        store.show(table, &current, &roles)?;
        if made.is_empty() {
            return Ok(());
        }
        store.save(&current, &roles)?;
        let moved = table.scope.as_ref().zip(held).map(|(s, h)| h.moved_to(s, table, &current.state, &roles));
        for (node, role, change) in made {
            self.changes.roles.insert(node, role);
            self.changes.rows.push(change);
            self.moves.push(moved.clone());
        }
        Ok(())
    }
}

/// One writer's part of what the journal says of a row: its dot, when, and the non-key
/// columns it changed last (`None`: all of them).
#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    dot: Dot,
    at_ms: u64,
    only: Option<&'a [String]>,
}

/// The write the real table's row (`values`, `None` if it is gone) makes against the merged
/// state it showed, if any, as a device's seal makes it: each changed column whose value
/// differs from what the row showed (only the columns the writer changed), counters by their
/// difference, a delete if the row is gone (its counters back to 0), an insert if it is new.
/// Stamped when it was written, never behind anything the row already holds.
fn cloud_change(
    table: &SchemaTable,
    current: &mut RowChange,
    roles: &BTreeMap<NodeId, String>,
    part: Part<'_>,
    values: Option<Vec<Value>>,
) -> Option<RowState> {
    let Part { dot, at_ms, only } = part;
    let spec = table.spec();
    let shown: Option<BTreeMap<String, Value>> =
        row_values(&current.state, &spec, roles).map(|v| v.into_iter().collect());
    let newest = current.state.max_hlc().map_or(Hlc::default(), |(_, h)| h);
    let hlc = Hlc::new(at_ms, 0).max(Hlc(newest.0 + 1));
    let total = |c: &str| current.state.counters.get(c).map_or(0, driftless_core::Counter::value);
    let counters = table.columns.iter().filter(|c| c.policy == ColumnPolicy::Counter);
    let Some(values) = values else {
        shown.as_ref()?;
        let deltas: Vec<(String, i64)> =
            counters.filter(|c| total(&c.name) != 0).map(|c| (c.name.clone(), total(&c.name).wrapping_neg())).collect();
        return Some(write_local_delete(&mut current.state, dot, hlc, deltas, table.delete_policy));
    };
    let mut write = LocalWrite::default();
    let plain: Vec<_> = table.columns.iter().filter(|c| !table.is_key(&c.name)).collect();
    for (c, value) in plain.into_iter().zip(values) {
        let changed = only.is_none_or(|cols| cols.contains(&c.name));
        if !changed && shown.is_some() {
            continue;
        }
        if c.policy == ColumnPolicy::Counter {
            let delta = counter_value(&value).wrapping_sub(total(&c.name));
            if delta != 0 {
                write.counter_deltas.push((c.name.clone(), delta));
            }
        } else if shown.is_none() || shown.as_ref().and_then(|s| s.get(&c.name)) != Some(&value) {
            write.fields.push(FieldWrite { column: c.name.clone(), value, hlc });
        }
    }
    if shown.is_some() && write.fields.is_empty() && write.counter_deltas.is_empty() {
        return None;
    }
    Some(write_local_upsert(&mut current.state, dot, hlc, write))
}

/// Why a key is too long for any replica to take, if it is.
fn key_too_long(pk: &[Value], limits: &Limits) -> Option<String> {
    let long = pk.iter().any(|v| match v {
        Value::Text(t) => t.len() > limits.max_value_bytes,
        Value::Blob(b) | Value::RawText(b) => b.len() > limits.max_value_bytes,
        _ => false,
    });
    long.then(|| format!("a key value exceeds the limit of {} bytes", limits.max_value_bytes))
}

/// A counter column's value as an integer (what an integer column holds).
fn counter_value(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        _ => 0,
    }
}
