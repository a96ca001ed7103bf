//! What a tenant's real tables show, whatever the database: the statement that shows a
//! merged row, and the rows of its conflicts table (`_driftless_conflicts`), each conflict
//! with its values as readable SQL literals.

use std::collections::BTreeMap;

use driftless_core::schema::quote;
use driftless_core::{ColumnPolicy, NodeId, RowChange, SchemaTable, Value, conflicts};

/// What a visible row shows in each non-key column of its real table, in declaration order:
/// its resolved value, a counter's sum (0 if no one counted), or for a column no write gave,
/// the column's default (as on a device). Every column is written, so a plain-SQL value that
/// was refused is put back even in a column no one else wrote.
pub(crate) fn shown_columns(table: &SchemaTable, shown: Vec<(String, Value)>) -> Vec<(String, Value)> {
    let mut by_name: BTreeMap<String, Value> = shown.into_iter().collect();
    table
        .columns
        .iter()
        .filter(|c| !table.is_key(&c.name))
        .map(|c| {
            let value = by_name.remove(&c.name).unwrap_or_else(|| match c.policy {
                ColumnPolicy::Counter => Value::Integer(0),
                _ => c.default.clone().unwrap_or(Value::Null),
            });
            (c.name.clone(), value)
        })
        .collect()
}

/// The upsert that shows a visible row whose resolved values are `shown`, in the real table
/// `name`, and its parameters; `slot(i)` is the database's i-th placeholder (from 1).
pub(crate) fn upsert(
    name: &str,
    table: &SchemaTable,
    row: &RowChange,
    shown: Vec<(String, Value)>,
    slot: impl Fn(usize) -> String,
) -> (String, Vec<Value>) {
    let columns = shown_columns(table, shown);
    let cols: Vec<&String> = columns.iter().map(|(c, _)| c).collect();
    let params: Vec<Value> = row.pk.iter().cloned().chain(columns.iter().map(|(_, v)| v.clone())).collect();
    let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
    let names: Vec<String> = keys.iter().cloned().chain(cols.iter().map(|c| quote(c))).collect();
    let slots: Vec<String> = (1..=names.len()).map(slot).collect();
    let action = if cols.is_empty() {
        "NOTHING".to_owned()
    } else {
        let sets: Vec<String> = cols.iter().map(|c| format!("{0} = excluded.{0}", quote(c))).collect();
        format!("UPDATE SET {}", sets.join(", "))
    };
    let sql = format!(
        "INSERT INTO {name} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
        names.join(", "),
        slots.join(", "),
        keys.join(", ")
    );
    (sql, params)
}

/// One conflict of a row, as listed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConflictRow {
    /// The key values, as SQL literals.
    pub(crate) key: String,
    /// The column ('' for a delete raced by an update).
    pub(crate) col: String,
    pub(crate) policy: String,
    pub(crate) needs_review: bool,
    /// The value shown, as an SQL literal (`DELETE` for a delete).
    pub(crate) shown: String,
    /// The other values written.
    pub(crate) others: String,
}

/// The conflicts `row` holds.
pub(crate) fn conflict_rows(
    table: &SchemaTable,
    row: &RowChange,
    roles: &BTreeMap<NodeId, String>,
) -> Vec<ConflictRow> {
    let key = row.pk.iter().map(literal).collect::<Vec<_>>().join(", ");
    conflicts(&row.state, &table.spec(), roles)
        .into_iter()
        .map(|c| {
            let policy = match &c.kind {
                driftless_core::ConflictKind::Field { policy, .. } => policy.to_string(),
                driftless_core::ConflictKind::DeleteUpdate { policy } => format!("{policy:?}"),
                _ => String::new(),
            };
            let shown = c.winner.value.as_ref().map_or("DELETE".to_owned(), literal);
            let others: Vec<String> =
                c.losers.iter().map(|v| v.value.as_ref().map_or("DELETE".to_owned(), literal)).collect();
            ConflictRow {
                key: key.clone(),
                col: c.column().unwrap_or("").to_owned(),
                policy,
                needs_review: c.needs_resolution(),
                shown,
                others: others.join(", "),
            }
        })
        .collect()
}

/// A value as a readable SQL literal.
fn literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => format!("{r:?}"),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        Value::Blob(b) | Value::RawText(b) => {
            format!("X'{}'", b.iter().map(|x| format!("{x:02X}")).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}
