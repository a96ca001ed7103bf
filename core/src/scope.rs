//! Scopes: which rows of a table each device holds.
//!
//! A table's scope is a predicate over its columns and the device's parameters, declared in
//! the sync schema (`scope = "region = :region AND kind = 'repair'"`, `scope = "assignee =
//! :device"`). The parameters come from the gateway's device registry, set by an operator;
//! a device's own word never widens what it holds. A table without a scope is held whole by
//! every device.
//!
//! A row's *scope key* is the tuple of values its parameter terms compare (`["north"]` for a
//! work order of region north), or none when no device can hold it (a literal term fails, a
//! compared value is NULL). A device holds a row exactly when the row's key equals the
//! device's key for that table. Keys are what the gateway logs with each change, before and
//! after it, so that it can tell which devices a row entered and which it left.

use std::collections::BTreeMap;

use crate::codec::buf::{Reader, Writer};
use crate::codec::values::{read_value, write_value};
use crate::codec::{DecodeError, Limits};
use crate::policy::ColumnPolicy;
use crate::schema::{ColumnType, SchemaTable, SyncSchema};
use crate::state::RowState;
use crate::value::Value;
use crate::view::{Roles, is_visible, resolve};

/// The parameter that names the device itself.
pub const DEVICE_PARAM: &str = "device";

/// A table's declared scope: terms that must all hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub terms: Vec<Term>,
    /// As declared.
    pub text: String,
}

/// `column = operand`.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub column: String,
    pub operand: Operand,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `:name`, a parameter from the device registry.
    Param(String),
    /// `:device`, the device's id.
    Device,
    /// A constant: `'text'`, an integer or a real.
    Literal(Value),
}

/// A row's scope key: the values its parameter terms compare, in term order.
pub type ScopeKey = Vec<Value>;

impl Scope {
    /// Parses a scope of `table`: `column = operand` terms joined by `AND`, over columns
    /// that are neither keys nor counters.
    pub fn parse(text: &str, table: &SchemaTable) -> Result<Scope, String> {
        let mut terms = Vec::new();
        for part in split_and(text) {
            let (column, operand) =
                part.split_once('=').ok_or_else(|| format!("scope term {part:?} is not `column = value`"))?;
            let (column, operand) = (column.trim(), operand.trim());
            let c =
                table.column(column).ok_or_else(|| format!("scope names column {column:?}, which is not declared"))?;
            if table.is_key(column) || c.policy == ColumnPolicy::Counter {
                return Err(format!("scope column {column:?} cannot be a key or a counter"));
            }
            let operand = match operand.strip_prefix(':') {
                Some(DEVICE_PARAM) => Operand::Device,
                Some(name) if !name.is_empty() && name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') => {
                    Operand::Param(name.to_owned())
                }
                Some(name) => return Err(format!("scope parameter {name:?} is not a plain name")),
                None => Operand::Literal(
                    literal(operand, c.ty).ok_or_else(|| format!("scope value {operand} is not a {} literal", c.ty))?,
                ),
            };
            terms.push(Term { column: column.to_owned(), operand });
        }
        if terms.is_empty() {
            return Err("a scope needs at least one term".into());
        }
        Ok(Scope { terms, text: text.to_owned() })
    }

    /// The parameters it names (`device` excluded).
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().filter_map(|t| match &t.operand {
            Operand::Param(p) => Some(p.as_str()),
            _ => None,
        })
    }

    /// The key of a row in this state: `None` if no device holds it.
    pub fn key_of(&self, state: &RowState, table: &SchemaTable, roles: &dyn Roles) -> Option<ScopeKey> {
        let mut key = Vec::new();
        for term in &self.terms {
            let policy = table.column(&term.column).map_or(ColumnPolicy::Lww, |c| c.policy.clone());
            let value = state.fields.get(&term.column).and_then(|r| resolve(r, &policy, roles)).map(|e| &e.value);
            let value = match value {
                None | Some(Value::Null) => return None,
                Some(v) => v,
            };
            match &term.operand {
                Operand::Literal(l) if l != value => return None,
                Operand::Literal(_) => {}
                Operand::Param(_) | Operand::Device => key.push(value.clone()),
            }
        }
        Some(key)
    }

    /// The key of the rows a device holds: `None` (it holds none) if a parameter is missing
    /// or is not a value of its column's type.
    pub fn device_key(&self, device: &str, params: &BTreeMap<String, String>, table: &SchemaTable) -> Option<ScopeKey> {
        let mut key = Vec::new();
        for term in &self.terms {
            let ty = table.column(&term.column).map_or(ColumnType::Text, |c| c.ty);
            match &term.operand {
                Operand::Literal(_) => {}
                Operand::Device => key.push(typed(device, ty)?),
                Operand::Param(p) => key.push(typed(params.get(p)?, ty)?),
            }
        }
        Some(key)
    }
}

/// Splits on `AND` (any case) outside quotes.
fn split_and(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            quoted = !quoted;
        } else if !quoted
            && bytes.len() - i >= 5
            && bytes[i].is_ascii_whitespace()
            && bytes[i + 1..i + 4].eq_ignore_ascii_case(b"and")
            && bytes[i + 4].is_ascii_whitespace()
        {
            parts.push(text[start..i].trim());
            start = i + 5;
            i += 5;
            continue;
        }
        i += 1;
    }
    parts.push(text[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// A literal of a column's type: `'text'` (`''` for a quote), an integer or a real.
fn literal(text: &str, ty: ColumnType) -> Option<Value> {
    if let Some(inner) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        let unquoted = inner.replace("''", "'");
        if unquoted.matches('\'').count() * 2 != inner.matches('\'').count() {
            return None;
        }
        return (ty == ColumnType::Text).then_some(Value::Text(unquoted));
    }
    typed(text, ty).filter(|_| ty != ColumnType::Text && ty != ColumnType::Blob)
}

/// A parameter's text as a value of a column's type.
fn typed(text: &str, ty: ColumnType) -> Option<Value> {
    match ty {
        ColumnType::Integer => text.parse().ok().map(Value::Integer),
        ColumnType::Real => text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Value::Real),
        ColumnType::Text => Some(Value::Text(text.to_owned())),
        ColumnType::Blob => Some(Value::Blob(text.as_bytes().to_vec())),
    }
}

/// The rows one device holds: its key for each scoped table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceScope {
    keys: BTreeMap<String, Option<ScopeKey>>,
    tables: BTreeMap<String, (Scope, SchemaTable)>,
}

impl DeviceScope {
    /// A device's scope under `schema`, from its registry parameters.
    pub fn of(schema: &SyncSchema, device: &str, params: &BTreeMap<String, String>) -> DeviceScope {
        let keys = schema
            .tables
            .iter()
            .filter_map(|t| t.scope.as_ref().map(|s| (t.name.clone(), s.device_key(device, params, t))))
            .collect();
        let tables =
            schema.tables.iter().filter_map(|t| t.scope.clone().map(|s| (t.name.clone(), (s, t.clone())))).collect();
        DeviceScope { keys, tables }
    }

    /// Whether the device holds a row of `table` in this state.
    pub fn holds_state(&self, table: &str, state: &RowState, roles: &dyn Roles) -> bool {
        match self.tables.get(table) {
            None => !self.keys.contains_key(table),
            Some((scope, t)) => self.holds(table, scope.key_of(state, t, roles).as_ref()),
        }
    }

    /// Whether any table is scoped.
    pub fn any(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The device's key for a scoped table (`None`: not scoped, or it holds none of it).
    pub fn key(&self, table: &str) -> Option<&ScopeKey> {
        self.keys.get(table).and_then(Option::as_ref)
    }

    pub fn is_scoped(&self, table: &str) -> bool {
        self.keys.contains_key(table)
    }

    /// Whether the device holds a row of `table` with scope key `key` (a table without a
    /// scope: every row).
    pub fn holds(&self, table: &str, key: Option<&ScopeKey>) -> bool {
        match self.keys.get(table) {
            None => true,
            Some(mine) => mine.is_some() && mine.as_ref() == key,
        }
    }

    /// The scoped tables.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// Where a change left a row of a scoped table: its key before and after. A row that did not
/// exist (or was deleted) before has no key before; a row deleted by the change keeps the
/// key it had, so the devices that held it see the delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Move {
    pub before: Option<ScopeKey>,
    pub after: Option<ScopeKey>,
}

impl Move {
    /// The move from `before` to `after` (whole row states) of a row of `table`.
    pub fn of(scope: &Scope, table: &SchemaTable, before: &RowState, after: &RowState, roles: &dyn Roles) -> Move {
        Held::of(scope, table, before, roles).moved_to(scope, table, after, roles)
    }
}

/// Where a row is before a change: whether any replica wrote it yet, and its key (a deleted
/// row's too, from the values it kept; none once a delete erased them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub exists: bool,
    pub visible: bool,
    pub key: Option<ScopeKey>,
}

impl Held {
    pub fn of(scope: &Scope, table: &SchemaTable, state: &RowState, roles: &dyn Roles) -> Held {
        Held {
            exists: !state.life.entries.is_empty(),
            visible: is_visible(state, &table.spec()),
            key: scope.key_of(state, table, roles),
        }
    }

    /// The move to `after`.
    pub fn moved_to(&self, scope: &Scope, table: &SchemaTable, after: &RowState, roles: &dyn Roles) -> Move {
        let after = if is_visible(after, &table.spec()) { scope.key_of(after, table, roles) } else { self.key.clone() };
        Move { before: self.key.clone(), after }
    }
}

/// Whether a device with scope `mine` may write a row of `table` that was `was` and is
/// `visible` after the write, having moved as `moved`: a row of its scope (it may also move
/// it out), or a new row (or a deleted row whose values are gone) that the write leaves in
/// its scope or leaves deleted (a write that lost to a delete shows nothing to anyone).
/// Writing a row of another scope, deleted or not, or making one there, is refused.
pub fn may_write(mine: &DeviceScope, table: &str, was: &Held, moved: &Move, visible: bool) -> bool {
    // A row that shows (even in no device's scope), or a deleted one that kept its values.
    if was.visible || (was.exists && was.key.is_some()) {
        return mine.holds(table, was.key.as_ref());
    }
    !visible || mine.holds(table, moved.after.as_ref())
}

/// The scopes of `schema`'s tables, by table, for the merge to compute moves with.
pub fn scopes_of(schema: &SyncSchema) -> BTreeMap<&str, (&Scope, &SchemaTable)> {
    schema.tables.iter().filter_map(|t| t.scope.as_ref().map(|s| (t.name.as_str(), (s, t)))).collect()
}

/// Encodes the moves of a logged change's rows (`None`: a row of a table without scope).
pub fn encode_moves(moves: &[Option<Move>]) -> Vec<u8> {
    let mut w = Writer::default();
    w.varint(moves.len() as u64);
    for m in moves {
        match m {
            None => w.u8(0),
            Some(m) => {
                w.u8(1);
                for key in [&m.before, &m.after] {
                    match key {
                        None => w.u8(0),
                        Some(values) => {
                            w.u8(1);
                            w.varint(values.len() as u64);
                            for v in values {
                                write_value(&mut w, v);
                            }
                        }
                    }
                }
            }
        }
    }
    w.buf
}

/// Decodes [`encode_moves`].
pub fn decode_moves(bytes: &[u8], limits: &Limits) -> Result<Vec<Option<Move>>, DecodeError> {
    let mut r = Reader::new(bytes, limits);
    let n = r.count(limits.max_rows, "moved rows")?;
    let mut moves = Vec::with_capacity(n);
    for _ in 0..n {
        if r.u8()? == 0 {
            moves.push(None);
            continue;
        }
        let mut keys = [None, None];
        for key in &mut keys {
            if r.u8()? == 1 {
                let len = r.count(limits.max_key_values, "scope key values")?;
                let mut values = Vec::with_capacity(len);
                for _ in 0..len {
                    values.push(read_value(&mut r)?);
                }
                *key = Some(values);
            }
        }
        let [before, after] = keys;
        moves.push(Some(Move { before, after }));
    }
    r.finish()?;
    Ok(moves)
}

#[cfg(test)]
mod tests;
