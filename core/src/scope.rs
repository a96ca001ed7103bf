//! Scopes: which rows of a table each device holds.
//!
//! A table's scope is a predicate over its columns and the device's parameters, declared in
//! the sync schema (`scope = "region = :region AND kind = 'repair'"`, `scope = "assignee =
//! :device"`). The parameters come from the gateway's device registry, set by an operator;
//! a device's own word never widens what it holds. A table without a scope is held whole by
//! every device.
//!
//! A table may instead be held by reference (`scope = "referenced by work_orders.customer_id"`):
//! a device holds a customer exactly when a work order it holds names it. Such a row has a
//! key per scope that holds it (the keys of the work orders naming it), kept by the gateway
//! as it logs each change of the referencing table; see [`Via`].
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

/// A table's declared scope: terms that must all hold, or a reference from a scoped table.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub terms: Vec<Term>,
    /// Set for a table held by reference (then `terms` is empty).
    pub via: Option<Via>,
    /// As declared.
    pub text: String,
}

/// `referenced by table.column`: a row of the table declaring it is held by the devices that
/// hold a row of `table` whose `column` names its key. One level only: `table` has a scope
/// of terms, so what a device holds of it is known from its parameters alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub table: String,
    pub column: String,
}

/// How a scope held by reference is declared.
const REFERENCED_BY: &str = "referenced by ";

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
        let lead = text.trim_start();
        if let Some(target) = lead
            .get(..REFERENCED_BY.len())
            .filter(|p| p.eq_ignore_ascii_case(REFERENCED_BY))
            .map(|_| lead[REFERENCED_BY.len()..].trim())
        {
            let (from, column) = target
                .split_once('.')
                .ok_or_else(|| format!("scope {text:?} must name the referencing `table.column`"))?;
            if table.key.len() != 1 {
                return Err(format!(
                    "a table held by reference needs a single-column key; {:?} has {}",
                    table.name,
                    table.key.len()
                ));
            }
            let via = Via { table: from.trim().to_owned(), column: column.trim().to_owned() };
            return Ok(Scope { terms: Vec::new(), via: Some(via), text: text.to_owned() });
        }
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
        Ok(Scope { terms, via: None, text: text.to_owned() })
    }

    /// Checks a scope held by reference against the schema it is declared in: the
    /// referencing table has a scope of terms, and its column has the type of `table`'s key.
    pub fn check_via(&self, table: &SchemaTable, schema: &[SchemaTable]) -> Result<(), String> {
        let Some(via) = &self.via else { return Ok(()) };
        let from = schema
            .iter()
            .find(|t| t.name == via.table)
            .ok_or_else(|| format!("{:?} is referenced by {:?}, which is not declared", table.name, via.table))?;
        if from.scope.as_ref().is_none_or(|s| s.via.is_some()) {
            return Err(format!(
                "{:?} is referenced by {:?}, which needs a scope of its own terms (`column = :param`)",
                table.name, from.name
            ));
        }
        let column = from.column(&via.column).ok_or_else(|| {
            format!("{:?} is referenced by {:?}.{:?}, which is not declared", table.name, from.name, via.column)
        })?;
        // A key column is not among a row's fields, where the reference is read.
        if from.is_key(&via.column) {
            return Err(format!(
                "{:?}.{:?} is a key column: a reference is a column of its own",
                from.name, via.column
            ));
        }
        let key = table.column(&table.key[0]).map(|c| c.ty);
        if column.policy == ColumnPolicy::Counter || Some(column.ty) != key {
            return Err(format!(
                "{:?}.{:?} must be a {} column like the key of {:?}",
                from.name,
                via.column,
                key.map_or_else(String::new, |t| t.to_string()),
                table.name
            ));
        }
        Ok(())
    }

    /// The parameters it names (`device` excluded).
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().filter_map(|t| match &t.operand {
            Operand::Param(p) => Some(p.as_str()),
            _ => None,
        })
    }

    /// The key of a row in this state: `None` if no device holds it (and always for a table
    /// held by reference, whose keys are not its own).
    pub fn key_of(&self, state: &RowState, table: &SchemaTable, roles: &dyn Roles) -> Option<ScopeKey> {
        if self.via.is_some() {
            return None;
        }
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
    /// A table held by reference has no terms: the caller takes its referencing table's key.
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

impl Via {
    /// The key of the row a row of the referencing table names and pulls in, and with which
    /// of its keys: nothing if it is deleted, names none, or is in no scope.
    pub fn target(&self, from: &SchemaTable, state: &RowState, roles: &dyn Roles) -> Option<(Vec<Value>, ScopeKey)> {
        if !is_visible(state, &from.spec()) {
            return None;
        }
        let key = from.scope.as_ref()?.key_of(state, from, roles)?;
        let policy = from.column(&self.column).map_or(ColumnPolicy::Lww, |c| c.policy.clone());
        let value = state.fields.get(&self.column).and_then(|r| resolve(r, &policy, roles)).map(|e| &e.value)?;
        (*value != Value::Null).then(|| (vec![value.clone()], key))
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
        let key_of = |t: &SchemaTable| t.scope.as_ref().and_then(|s| s.device_key(device, params, t));
        let keys = schema
            .tables
            .iter()
            .filter_map(|t| {
                let scope = t.scope.as_ref()?;
                // A table held by reference: the rows its referencing table's key pulls in.
                let key = match &scope.via {
                    Some(via) => schema.table(&via.table).and_then(key_of),
                    None => key_of(t),
                };
                Some((t.name.clone(), key))
            })
            .collect();
        let tables =
            schema.tables.iter().filter_map(|t| t.scope.clone().map(|s| (t.name.clone(), (s, t.clone())))).collect();
        DeviceScope { keys, tables }
    }

    /// Whether the device holds a row of `table` in this state (never, for a table held by
    /// reference: that is not in the row's state).
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

    /// Whether `table` is held by reference.
    pub fn by_reference(&self, table: &str) -> bool {
        self.tables.get(table).is_some_and(|(s, _)| s.via.is_some())
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

    /// Whether the device holds a row of `table` that scopes with `keys` hold.
    pub fn holds_any(&self, table: &str, keys: &[ScopeKey]) -> bool {
        match self.keys.get(table) {
            None => true,
            Some(mine) => mine.as_ref().is_some_and(|m| keys.contains(m)),
        }
    }

    /// The scoped tables.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// Where a change left a row of a scoped table: the keys of the scopes that held it before
/// and after. A row of a table with terms has at most one: a row that did not exist (or was
/// deleted) before has none before; a row deleted by the change keeps the key it had, so the
/// devices that held it see the delete. A row held by reference has one per scope holding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Move {
    pub before: Vec<ScopeKey>,
    pub after: Vec<ScopeKey>,
}

impl Move {
    /// A move of a row with one key at most on each side.
    pub fn one(before: Option<ScopeKey>, after: Option<ScopeKey>) -> Move {
        Move { before: before.into_iter().collect(), after: after.into_iter().collect() }
    }

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
        Move::one(self.key.clone(), after)
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
    !visible || mine.holds(table, moved.after.first())
}

/// Whether a device with scope `mine` may write a row of `table` held by reference by the
/// scopes with keys `holders`, and whether the write is blind to others' writes of it
/// (`theirs`): a row its scope pulls in, or one no scope holds yet that is new, its own so
/// far (a customer it made, which no order it sent names yet) or that it had. A row another scope holds (even one only named there,
/// not yet made) is not its to write.
pub fn may_write_held(mine: &DeviceScope, table: &str, theirs: bool, holders: &[ScopeKey]) -> bool {
    if holders.is_empty() { !theirs } else { mine.holds_any(table, holders) }
}

/// The scopes of terms of `schema`'s tables, by table, for the merge to compute moves with.
pub fn scopes_of(schema: &SyncSchema) -> BTreeMap<&str, (&Scope, &SchemaTable)> {
    schema
        .tables
        .iter()
        .filter_map(|t| t.scope.as_ref().filter(|s| s.via.is_none()).map(|s| (t.name.as_str(), (s, t))))
        .collect()
}

/// The tables held by reference: each with its reference and the referencing table.
pub fn references(schema: &SyncSchema) -> Vec<(&SchemaTable, &Via, &SchemaTable)> {
    schema
        .tables
        .iter()
        .filter_map(|t| {
            let via = t.scope.as_ref()?.via.as_ref()?;
            Some((t, via, schema.table(&via.table)?))
        })
        .collect()
}

/// Encodes the moves of a logged change's rows (`None`: a row of a table without scope). A
/// move with a key at most on each side keeps the first encoding (tag 1: each side absent
/// or one key); one with more (a row held by reference) is tag 2: each side a list of keys.
pub fn encode_moves(moves: &[Option<Move>]) -> Vec<u8> {
    let mut w = Writer::default();
    w.varint(moves.len() as u64);
    for m in moves {
        match m {
            None => w.u8(0),
            Some(m) if m.before.len() <= 1 && m.after.len() <= 1 => {
                w.u8(1);
                for side in [&m.before, &m.after] {
                    match side.first() {
                        None => w.u8(0),
                        Some(key) => {
                            w.u8(1);
                            write_key(&mut w, key);
                        }
                    }
                }
            }
            Some(m) => {
                w.u8(2);
                for side in [&m.before, &m.after] {
                    w.varint(side.len() as u64);
                    for key in side {
                        write_key(&mut w, key);
                    }
                }
            }
        }
    }
    w.buf
}

fn write_key(w: &mut Writer, key: &ScopeKey) {
    w.varint(key.len() as u64);
    for v in key {
        write_value(w, v);
    }
}

fn read_key(r: &mut Reader<'_>, limits: &Limits) -> Result<ScopeKey, DecodeError> {
    let len = r.count(limits.max_key_values, "scope key values")?;
    let mut values = Vec::with_capacity(len);
    for _ in 0..len {
        values.push(read_value(r)?);
    }
    Ok(values)
}

/// Decodes [`encode_moves`].
pub fn decode_moves(bytes: &[u8], limits: &Limits) -> Result<Vec<Option<Move>>, DecodeError> {
    let mut r = Reader::new(bytes, limits);
    let n = r.count(limits.max_rows, "moved rows")?;
    let mut moves = Vec::with_capacity(n);
    for _ in 0..n {
        let tag = r.u8()?;
        let mut sides = [Vec::new(), Vec::new()];
        for side in &mut sides {
            let n = match tag {
                0 => break,
                1 => usize::from(r.u8()? == 1),
                2 => r.count(limits.max_rows, "scopes holding a row")?,
                t => return Err(DecodeError::UnknownTag(t)),
            };
            for _ in 0..n {
                side.push(read_key(&mut r, limits)?);
            }
        }
        let [before, after] = sides;
        moves.push((tag != 0).then_some(Move { before, after }));
    }
    r.finish()?;
    Ok(moves)
}

#[cfg(test)]
mod tests;
