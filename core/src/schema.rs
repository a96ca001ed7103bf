//! The declared sync schema: which tables sync, their typed columns and keys, each column's
//! conflict policy, which way each table flows, and the source roles that authority policies
//! rank. The gateway loads it from a TOML file, keeps every version, serves the current one to
//! devices and refuses any change that does not fit it; devices create, migrate and track
//! their tables from it. One parser and one set of rules serve both sides.
//!
//! ```toml
//! roles = ["hq", "erp", "field"]
//!
//! [[table]]
//! name = "work_orders"
//! key = ["id"]
//! direction = "both"            # both | up-only | down-only, as seen from devices
//! writers = ["field", "hq"]      # optional: only devices of these roles write it
//! delete_policy = "delete-wins" # or update-wins
//! scope = "region = :region"    # optional: each device holds only these rows (see scope.rs)
//!
//! [[table.column]]
//! name = "id"
//! type = "text"                 # integer | real | text | blob
//!
//! [[table.column]]
//! name = "parts_used"
//! type = "integer"
//! policy = "counter"            # lww (default) | manual | counter | authority:hq>erp
//! ```

use std::fmt;

use serde::Deserialize;

use crate::batch::RowChange;
use crate::codec::Limits;
use crate::policy::{ColumnPolicy, DeletePolicy, Direction, TableSpec};
use crate::scope::Scope;
use crate::value::Value;

/// What a column holds. Each maps to one SQLite storage class and one PostgreSQL type, so a
/// value keeps its exact bits in every store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ColumnType {
    /// A 64-bit signed integer.
    Integer,
    /// An IEEE 754 double.
    Real,
    /// UTF-8 text without NUL characters.
    Text,
    /// Raw bytes.
    Blob,
}

impl ColumnType {
    /// The type name SQLite declares (and a STRICT table enforces).
    pub fn sqlite_name(self) -> &'static str {
        match self {
            ColumnType::Integer => "INTEGER",
            ColumnType::Real => "REAL",
            ColumnType::Text => "TEXT",
            ColumnType::Blob => "BLOB",
        }
    }

    /// Whether `declared` (a type as an existing SQLite table declares it) stores values the
    /// way this type does, by SQLite's affinity rules.
    pub fn matches_sqlite(self, declared: &str) -> bool {
        let d = declared.to_ascii_uppercase();
        let affinity = if d.contains("INT") {
            ColumnType::Integer
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            ColumnType::Text
        } else if d.is_empty() || d.contains("BLOB") {
            ColumnType::Blob
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            ColumnType::Real
        } else {
            // NUMERIC affinity turns text that looks like a number into a number.
            return false;
        };
        affinity == self
    }

    /// Why `value` does not fit this type, if it does not (NULL is checked separately).
    fn refuses(self, value: &Value) -> Option<String> {
        let fits = match (self, value) {
            (_, Value::Null) => true,
            (ColumnType::Integer, Value::Integer(_)) => true,
            // Not integers: a REAL column stores them as reals, so a replica holding the
            // integer would disagree with every one holding the real.
            // SQL stores NaN as NULL: a replica could not show it.
            (ColumnType::Real, Value::Real(r)) if r.is_nan() => return Some("NaN".to_owned()),
            (ColumnType::Real, Value::Real(_)) => true,
            (ColumnType::Text, Value::Text(t)) => {
                return t.contains('\0').then(|| "text with a NUL character".to_owned());
            }
            (ColumnType::Text, Value::RawText(_)) => return Some("text that is not valid UTF-8".to_owned()),
            (ColumnType::Blob, Value::Blob(_)) => true,
            _ => false,
        };
        (!fits).then(|| kind(value).to_owned())
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sqlite_name().to_ascii_lowercase())
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "an integer value",
        Value::Real(_) => "a real value",
        Value::Text(_) | Value::RawText(_) => "a text value",
        Value::Blob(_) => "a blob value",
    }
}

/// One declared column.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaColumn {
    pub name: String,
    pub ty: ColumnType,
    /// Key columns and counters are never nullable.
    pub nullable: bool,
    /// The value a row gets when a write does not give one.
    pub default: Option<Value>,
    pub policy: ColumnPolicy,
}

/// One declared table.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaTable {
    pub name: String,
    /// Key columns, in key order.
    pub key: Vec<String>,
    /// Every column, key columns included, in declaration order.
    pub columns: Vec<SchemaColumn>,
    pub direction: Direction,
    pub delete_policy: DeletePolicy,
    /// The roles whose devices may write this table; empty: every role.
    pub writers: Vec<String>,
    /// Which rows each device holds; `None`: every device holds every row.
    pub scope: Option<Scope>,
}

impl SchemaTable {
    pub fn column(&self, name: &str) -> Option<&SchemaColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn is_key(&self, name: &str) -> bool {
        self.key.iter().any(|k| k == name)
    }

    /// How a device tracks this table.
    pub fn spec(&self) -> TableSpec {
        let mut spec = TableSpec::new().direction(self.direction).delete_policy(self.delete_policy);
        for c in self.columns.iter().filter(|c| c.policy != ColumnPolicy::Lww) {
            spec = spec.column(&c.name, c.policy.clone());
        }
        spec
    }

    /// `CREATE TABLE` for SQLite: a STRICT table, so a value of the wrong type is refused
    /// when the app writes it rather than later by the gateway.
    pub fn sqlite_create(&self) -> String {
        self.sqlite_create_named(&self.name)
    }

    /// [`SchemaTable::sqlite_create`] under another name (the gateway qualifies it by tenant).
    pub fn sqlite_create_named(&self, name: &str) -> String {
        let mut defs: Vec<String> = self.columns.iter().map(|c| self.sqlite_column(c)).collect();
        defs.push(format!("PRIMARY KEY ({})", self.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")));
        format!("CREATE TABLE {} (\n  {}\n) STRICT", quote(name), defs.join(",\n  "))
    }

    /// `ALTER TABLE ... ADD COLUMN` for a column added by a later version.
    pub fn sqlite_add_column(&self, column: &SchemaColumn) -> String {
        self.sqlite_add_column_named(&self.name, column)
    }

    /// [`SchemaTable::sqlite_add_column`] on a table of another name.
    pub fn sqlite_add_column_named(&self, name: &str, column: &SchemaColumn) -> String {
        format!("ALTER TABLE {} ADD COLUMN {}", quote(name), self.sqlite_column(column))
    }

    fn sqlite_column(&self, c: &SchemaColumn) -> String {
        let mut def = format!("{} {}", quote(&c.name), c.ty.sqlite_name());
        if !c.nullable {
            def.push_str(" NOT NULL");
        }
        if let Some(d) = &c.default {
            def.push_str(" DEFAULT ");
            def.push_str(&sql_literal(d));
        }
        def
    }

    /// Why a device may not send `row`, if it may not: the table is down-only, or the row
    /// names a column that is not declared, or holds a value its column cannot hold.
    pub fn check_device_row(&self, row: &RowChange) -> Result<(), String> {
        if self.direction == Direction::DownOnly {
            return Err(format!("table {:?} is written only by the cloud", self.name));
        }
        self.check_row(row)
    }

    /// Why no replica may take `row`, if none may.
    pub fn check_row(&self, row: &RowChange) -> Result<(), String> {
        let table = &self.name;
        if row.pk.len() != self.key.len() {
            return Err(format!("table {table:?} has {} key columns; the change has {}", self.key.len(), row.pk.len()));
        }
        for (name, value) in self.key.iter().zip(&row.pk) {
            let column = self.column(name).ok_or_else(|| format!("key column {name:?} is not declared"))?;
            if *value == Value::Null {
                return Err(format!("key column {table:?}.{name:?} is NULL"));
            }
            if let Some(what) = column.ty.refuses(value) {
                return Err(format!("key column {table:?}.{name:?} is {}, not {what}", column.ty));
            }
        }
        for (name, register) in &row.state.fields {
            let Some(column) = self.column(name).filter(|_| !self.is_key(name)) else {
                return Err(format!("table {table:?} has no column {name:?}"));
            };
            if column.policy == ColumnPolicy::Counter {
                return Err(format!("column {table:?}.{name:?} is a counter; the change sets it"));
            }
            for entry in &register.entries {
                if entry.value == Value::Null && !column.nullable {
                    return Err(format!("column {table:?}.{name:?} is NOT NULL; the change sets it to NULL"));
                }
                if let Some(what) = column.ty.refuses(&entry.value) {
                    return Err(format!("column {table:?}.{name:?} holds {}, not {what}", column.ty));
                }
            }
        }
        for name in row.state.counters.keys() {
            match self.column(name) {
                Some(c) if c.policy == ColumnPolicy::Counter => {}
                Some(_) => return Err(format!("column {table:?}.{name:?} is not a counter; the change counts it")),
                None => return Err(format!("table {table:?} has no column {name:?}")),
            }
        }
        Ok(())
    }
}

/// A declared sync schema.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncSchema {
    /// Source roles, for authority policies to rank.
    pub roles: Vec<String>,
    pub tables: Vec<SchemaTable>,
}

/// A schema that cannot be used, or cannot replace the one before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    #[error("the schema is not valid TOML for a sync schema: {0}")]
    Syntax(String),
    #[error("table {table:?}: {detail}")]
    Table { table: String, detail: String },
    #[error("the schema is invalid: {0}")]
    Invalid(String),
    /// The first schema of a store that already holds rows, contradicting them.
    #[error("the schema does not fit the rows already synced: {}", .0.join("; "))]
    UnfitRows(Vec<String>),
    /// Changes no running fleet can follow (a column dropped, a type or key changed).
    #[error("the new schema cannot replace version {from}: {}", .changes.join("; "))]
    Incompatible { from: u64, changes: Vec<String> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    table: Vec<RawTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: String,
    key: Vec<String>,
    #[serde(default)]
    direction: Direction,
    #[serde(default)]
    delete_policy: DeletePolicy,
    writers: Option<Vec<String>>,
    scope: Option<String>,
    #[serde(default)]
    column: Vec<RawColumn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    ty: ColumnType,
    nullable: Option<bool>,
    default: Option<toml::Value>,
    policy: Option<String>,
}

impl SyncSchema {
    /// Parses and checks a schema file's text.
    pub fn parse(text: &str) -> Result<SyncSchema, SchemaError> {
        let raw: RawSchema = toml::from_str(text).map_err(|e| SchemaError::Syntax(e.to_string()))?;
        let mut tables: Vec<SchemaTable> = Vec::with_capacity(raw.table.len());
        for t in raw.table {
            let bad = |detail: String| SchemaError::Table { table: t.name.clone(), detail };
            if tables.iter().any(|o| o.name == t.name) {
                return Err(bad("declared twice".into()));
            }
            let mut columns: Vec<SchemaColumn> = Vec::with_capacity(t.column.len());
            for c in &t.column {
                if columns.iter().any(|o| o.name == c.name) {
                    return Err(bad(format!("column {:?} declared twice", c.name)));
                }
                let policy = match &c.policy {
                    None => ColumnPolicy::Lww,
                    Some(p) => p.parse().map_err(|e| bad(format!("column {:?}: {e}", c.name)))?,
                };
                let default = c
                    .default
                    .as_ref()
                    .map(|d| literal(d).ok_or_else(|| bad(format!("column {:?}: default {d} is not a value", c.name))))
                    .transpose()?;
                let is_key = t.key.contains(&c.name);
                let counter = policy == ColumnPolicy::Counter;
                let nullable = c.nullable.unwrap_or(!is_key && !counter);
                if (is_key || counter) && nullable {
                    return Err(bad(format!("column {:?}: key columns and counters cannot be nullable", c.name)));
                }
                // A counter shows the sum of everyone's increments: 0 before any. Any other
                // default would be counted again as an increment by every device holding it.
                if counter && default.as_ref().is_some_and(|d| *d != Value::Integer(0)) {
                    return Err(bad(format!("counter {:?} starts at 0; it cannot have another default", c.name)));
                }
                let default = if counter { Some(Value::Integer(0)) } else { default };
                columns.push(SchemaColumn { name: c.name.clone(), ty: c.ty, nullable, default, policy });
            }
            let mut table = SchemaTable {
                name: t.name.clone(),
                key: t.key.clone(),
                columns,
                direction: t.direction,
                delete_policy: t.delete_policy,
                writers: t.writers.clone().unwrap_or_default(),
                scope: None,
            };
            table.scope = t.scope.as_deref().map(|s| Scope::parse(s, &table)).transpose().map_err(bad)?;
            if t.writers.as_ref().is_some_and(Vec::is_empty) {
                return Err(bad("writers = [] lets no device write it: say direction = \"down-only\"".into()));
            }
            check_table(&table, &raw.roles).map_err(bad)?;
            tables.push(table);
        }
        for t in &tables {
            if let Some(scope) = &t.scope {
                scope.check_via(t, &tables).map_err(|detail| SchemaError::Table { table: t.name.clone(), detail })?;
            }
        }
        if let Some(r) = raw.roles.iter().find(|r| r.is_empty() || r.contains('>')) {
            return Err(SchemaError::Invalid(format!("role {r:?} is not a valid role name")));
        }
        Ok(SyncSchema { roles: raw.roles, tables })
    }

    pub fn table(&self, name: &str) -> Option<&SchemaTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The tables only some roles may write, with those roles.
    pub fn writers(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.tables.iter().filter(|t| !t.writers.is_empty()).map(|t| (t.name.clone(), t.writers.clone())).collect()
    }

    /// Why a device may not send `row`, if it may not (see [`SchemaTable::check_device_row`]).
    pub fn check_device_row(&self, row: &RowChange) -> Result<(), String> {
        match self.table(&row.table) {
            Some(t) => t.check_device_row(row),
            None => Err(format!("table {:?} is not in the sync schema", row.table)),
        }
    }

    /// Checks that this schema can replace `old` (version `from`) while devices still run
    /// `old`: tables and columns may be added, policies, directions and roles may change;
    /// nothing may be dropped, retyped or re-keyed, a counter stays a counter, and a new
    /// column must be nullable or have a default (rows written without it need a value).
    pub fn check_replaces(&self, old: &SyncSchema, from: u64) -> Result<(), SchemaError> {
        let mut changes = Vec::new();
        for o in &old.tables {
            let Some(n) = self.table(&o.name) else {
                changes.push(format!("table {:?} was dropped", o.name));
                continue;
            };
            if n.key != o.key {
                changes.push(format!("the key of {:?} changed from {:?} to {:?}", o.name, o.key, n.key));
            }
            // Devices hold the rows of the scope they synced under; a new scope would leave
            // them holding rows outside it, or missing rows inside it.
            if n.scope.as_ref().map(|s| (&s.terms, &s.via)) != o.scope.as_ref().map(|s| (&s.terms, &s.via)) {
                changes.push(format!("the scope of {:?} changed (a scope is declared with its table)", o.name));
            }
            for oc in &o.columns {
                let Some(nc) = n.column(&oc.name) else {
                    changes.push(format!("column {:?}.{:?} was dropped", o.name, oc.name));
                    continue;
                };
                if nc.ty != oc.ty {
                    changes.push(format!("column {:?}.{:?} changed type from {} to {}", o.name, oc.name, oc.ty, nc.ty));
                }
                if nc.nullable != oc.nullable {
                    changes.push(format!("column {:?}.{:?} changed whether it may be NULL", o.name, oc.name));
                }
                if (nc.policy == ColumnPolicy::Counter) != (oc.policy == ColumnPolicy::Counter) {
                    changes.push(format!("column {:?}.{:?} changed to or from a counter", o.name, oc.name));
                }
                // Tables made under the old default keep it (no database changes a column's
                // default in place everywhere), so every store would show another value.
                if nc.default != oc.default {
                    changes.push(format!("column {:?}.{:?} changed its default", o.name, oc.name));
                }
            }
            for nc in n.columns.iter().filter(|c| o.column(&c.name).is_none()) {
                if !nc.nullable && nc.default.is_none() {
                    changes.push(format!("new column {:?}.{:?} is NOT NULL without a default", o.name, nc.name));
                }
            }
        }
        if changes.is_empty() { Ok(()) } else { Err(SchemaError::Incompatible { from, changes }) }
    }
}

fn check_table(t: &SchemaTable, roles: &[String]) -> Result<(), String> {
    if !plain_identifier(&t.name) {
        return Err("a table name is a letter or _ then letters, digits or _ (at most 63)".into());
    }
    if t.name.starts_with("_driftless") || t.name.starts_with("gw_") {
        return Err("this table name is reserved".into());
    }
    if t.key.is_empty() {
        return Err("a key is required: rows are told apart by it on every replica".into());
    }
    if let Some(r) = t.writers.iter().find(|r| !roles.contains(r)) {
        return Err(format!("writers name role {r:?}, which the schema's roles do not declare"));
    }
    if !t.writers.is_empty() && t.direction == Direction::DownOnly {
        return Err("a down-only table has no device writers".into());
    }
    let limits = Limits::default();
    if t.key.len() > limits.max_key_values {
        return Err(format!("at most {} key columns", limits.max_key_values));
    }
    if t.columns.len() > limits.max_columns {
        return Err(format!("at most {} columns", limits.max_columns));
    }
    for (i, k) in t.key.iter().enumerate() {
        if t.key[..i].contains(k) {
            return Err(format!("key column {k:?} is listed twice"));
        }
        let c = t.column(k).ok_or_else(|| format!("key column {k:?} is not declared"))?;
        if c.policy != ColumnPolicy::Lww {
            return Err(format!("key column {k:?} cannot have a policy"));
        }
        if c.ty == ColumnType::Real {
            // Databases compare -0.0 equal to 0.0 (and may fold NaNs): two keys every replica
            // keeps apart would be one row in a table.
            return Err(format!("key column {k:?} cannot be real: use integer or text"));
        }
    }
    if t.key.len() == 1 && t.column(&t.key[0]).is_some_and(|c| c.ty == ColumnType::Integer) {
        // Every device would hand out 1, 2, 3... and rows from different devices collide.
        return Err(format!("key column {:?} is a lone integer; use text (UUID, ULID) or a composite key", t.key[0]));
    }
    for c in &t.columns {
        if !plain_identifier(&c.name) {
            return Err(format!("column name {:?}: a letter or _ then letters, digits or _ (at most 63)", c.name));
        }
        if c.policy == ColumnPolicy::Counter && c.ty != ColumnType::Integer {
            return Err(format!("counter {:?} must be an integer", c.name));
        }
        if let ColumnPolicy::Authority(ranked) = &c.policy
            && let Some(r) = ranked.iter().find(|r| !roles.contains(r))
        {
            return Err(format!("column {:?} ranks role {r:?}, which the schema's roles do not declare", c.name));
        }
        if let Some(d) = &c.default
            && let Some(what) = c.ty.refuses(d)
        {
            return Err(format!("column {:?} is {} and its default is {what}", c.name, c.ty));
        }
    }
    Ok(())
}

/// Whether `name` can name a table or column in every store without surprises: the gateway
/// qualifies tables by tenant with a dot, and PostgreSQL limits names to 63 bytes.
fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A TOML default as a value (integers, floats, strings and booleans as 0/1).
fn literal(v: &toml::Value) -> Option<Value> {
    match v {
        toml::Value::Integer(i) => Some(Value::Integer(*i)),
        // A NaN or infinite default has no SQL literal.
        toml::Value::Float(f) if f.is_finite() => Some(Value::Real(*f)),
        toml::Value::String(s) => Some(Value::Text(s.clone())),
        toml::Value::Boolean(b) => Some(Value::Integer(i64::from(*b))),
        _ => None,
    }
}

/// A value as an SQL literal, for a DEFAULT clause.
pub fn sql_literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        // Debug formatting keeps a float's exact value and always shows it as a float.
        Value::Real(r) => format!("{r:?}"),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        Value::Blob(b) => format!("X'{}'", b.iter().map(|x| format!("{x:02X}")).collect::<String>()),
        Value::RawText(b) => format!("CAST(X'{}' AS TEXT)", b.iter().map(|x| format!("{x:02X}")).collect::<String>()),
    }
}

/// An identifier quoted for SQL.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests;
