//! Writes made directly to the real tables (the sqlite3 shell, a report tool, an integration):
//! captured by triggers in the writer's own transaction, then merged by the gateway as writes
//! of the tenant's cloud node, under the cloud role, resolved by the same policies as any
//! device's write, and logged for every device.
//!
//! Each real table `"T.X"` has a journal `"T.X._driftless_writes"` of the keys written. The gateway's own writes to the real tables
//! are not captured: it holds a row in `gw_writing` for the length of its transaction, which
//! no other connection ever sees, and the triggers stand down while it is there.
//!
//! A device batch merges only after the pending cloud writes of its tenant (in the same
//! transaction), so the merge never overwrites a cloud write before it was taken in.
//!
//! Like a device's capture, the journal records when each write was made and, for an update,
//! which columns it changed: only those become writes, stamped with that time. A write no
//! replica could take (a value its column cannot hold, a row grown past the limits) is kept as
//! a dead letter with its reason and the row is put back as it showed; the tenant's other
//! writes go on.

use std::collections::BTreeMap;

use driftless_core::codec::{Limits, encode_key, encode_payload};
use driftless_core::schema::quote;
use driftless_core::{
    Batch, ColumnPolicy, Dot, FieldWrite, Hlc, LocalWrite, NodeId, RowChange, SchemaTable, Value, row_values,
    write_local_delete, write_local_upsert,
};
use rusqlite::{Connection, OptionalExtension};

use super::merge::{load_row, one_row_payload};
use super::tables::{self, table_name};
use crate::error::{Error, Result};
use crate::storage::ServedSchema;

/// The role cloud writes are made under (authority policies may rank it).
pub(crate) const CLOUD_ROLE: &str = "cloud";

/// Non-key columns a journal's change mask covers.
const MASK_BITS: usize = 62;

fn journal_name(tenant: &str, table: &str) -> String {
    format!("{}._driftless_writes", table_name(tenant, table))
}

/// The non-key columns of a real table in the order they were added to it. Columns are only
/// ever added, at the end, so a change mask's bit keeps naming the same column across schema
/// versions, whatever order a later version declares them in.
fn mask_columns(conn: &Connection, real: &str, table: &SchemaTable) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info({}) ORDER BY cid", sql_text(real)))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names.into_iter().filter(|n| !table.is_key(n)).collect())
}

/// Creates the journal and capture triggers of a real table, and its view per declared role
/// (again, if they exist: columns may have been added, roles changed).
pub(super) fn install(conn: &Connection, tenant: &str, table: &SchemaTable, roles: &[String]) -> Result<()> {
    let real = table_name(tenant, &table.name);
    let base = quote(&real);
    let journal_plain = journal_name(tenant, &table.name);
    let journal = quote(&journal_plain);
    let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
    // Untyped columns keep key values exactly as written. `role` is NULL for the cloud role;
    // `mask` has bit i set if column i of `mask_columns` changed (NULL: all of them); `at_ms`
    // is when.
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {journal} (seq INTEGER PRIMARY KEY, {}, role TEXT, mask INTEGER, at_ms INTEGER)",
        slots.join(", ")
    ))?;
    for (column, decl) in [("role", "TEXT"), ("mask", "INTEGER"), ("at_ms", "INTEGER")] {
        let present: bool = conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info({}) WHERE name = ?1", sql_text(&journal_plain)),
            [column],
            |r| r.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {journal} ADD COLUMN {column} {decl}"))?;
        }
    }
    let of = |row: &str| table.key.iter().map(|k| format!("{row}.{}", quote(k))).collect::<Vec<_>>().join(", ");
    let changed_key =
        table.key.iter().map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k))).collect::<Vec<_>>().join(" OR ");
    // A table of more columns than a mask holds records its updates as writes of every
    // column (compared with what the row showed, so still exact).
    let plain = mask_columns(conn, &real, table)?;
    let mask = if plain.is_empty() {
        "0".to_owned()
    } else if plain.len() > MASK_BITS {
        "NULL".to_owned()
    } else {
        plain
            .iter()
            .enumerate()
            .map(|(i, c)| format!("(CASE WHEN OLD.{0} IS NOT NEW.{0} THEN {1} ELSE 0 END)", quote(c), 1i64 << i))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let now = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
    let into = format!("INSERT INTO {journal}({}, role, mask, at_ms)", slots.join(", "));
    let guard = "NOT EXISTS (SELECT 1 FROM gw_writing)";
    // What a write records: the new row (whole, or the columns an update changed), the old
    // key of an update that changed it, a deleted row; under `role` (NULL: cloud).
    let on_insert = |role: &str| format!("{into} VALUES ({}, {role}, NULL, {now});", of("NEW"));
    let on_update = |role: &str| {
        format!("{into} VALUES ({}, {role}, CASE WHEN {changed_key} THEN NULL ELSE {mask} END, {now});", of("NEW"))
    };
    let on_old = |role: &str| format!("{into} VALUES ({}, {role}, NULL, {now});", of("OLD"));
    let key_list = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
    for (suffix, event, when, body) in [
        ("ins", "INSERT".to_owned(), guard.to_owned(), on_insert("NULL")),
        ("upd", "UPDATE".to_owned(), guard.to_owned(), on_update("NULL")),
        // Only an update that changes the key also records the old key.
        ("rekey", format!("UPDATE OF {key_list}"), format!("({changed_key}) AND {guard}"), on_old("NULL")),
        ("del", "DELETE".to_owned(), guard.to_owned(), on_old("NULL")),
    ] {
        let trigger = quote(&format!("{real}._driftless_{suffix}"));
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {trigger};
             CREATE TRIGGER {trigger} AFTER {event} ON {base} WHEN {when} BEGIN {body} END;"
        ))?;
    }
    // A writer names its role by writing through "TENANT.TABLE@ROLE": the view's triggers
    // write the table (whose own triggers record the write as the cloud's) and then record
    // it again under the role; the later record decides whose each column is. Nothing is
    // held off, so a statement that fails half way can hide no other write.
    let names: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let inserted: Vec<String> = table
        .columns
        .iter()
        .map(|c| match &c.default {
            // A view passes NULL for a column the INSERT left out: the default applies then
            // (an explicit NULL in a column with a default too).
            Some(d) => format!("coalesce(NEW.{}, {})", quote(&c.name), driftless_core::schema::sql_literal(d)),
            None => format!("NEW.{}", quote(&c.name)),
        })
        .collect();
    let sets: Vec<String> = names.iter().map(|n| format!("{n} = NEW.{n}")).collect();
    let at_old: Vec<String> = table.key.iter().map(|k| format!("{0} = OLD.{0}", quote(k))).collect();
    // Views of roles no longer declared go.
    let prefix = format!("{real}@");
    let stale: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'view' AND substr(name, 1, length(?1)) = ?1")?
        .query_map([&prefix], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    for view in stale.iter().filter(|v| !roles.iter().any(|r| **v == format!("{prefix}{r}"))) {
        conn.execute_batch(&format!("DROP VIEW IF EXISTS {}", quote(view)))?;
    }
    for r in roles {
        let view = quote(&format!("{real}@{r}"));
        let role = sql_text(r);
        let writes = [
            format!("INSERT INTO {base}({}) VALUES ({}); {}", names.join(", "), inserted.join(", "), on_insert(&role)),
            format!(
                "UPDATE {base} SET {} WHERE {}; {} {into} SELECT {}, {role}, NULL, {now} WHERE {changed_key};",
                sets.join(", "),
                at_old.join(" AND "),
                on_update(&role),
                of("OLD")
            ),
            format!("DELETE FROM {base} WHERE {}; {}", at_old.join(" AND "), on_old(&role)),
        ];
        conn.execute_batch(&format!("DROP VIEW IF EXISTS {view}; CREATE VIEW {view} AS SELECT * FROM {base};"))?;
        for ((suffix, event), write) in
            [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")].into_iter().zip(writes)
        {
            let trigger = quote(&format!("{real}@{r}._driftless_{suffix}"));
            conn.execute_batch(&format!("CREATE TRIGGER {trigger} INSTEAD OF {event} ON {view} BEGIN {write} END;"))?;
        }
    }
    Ok(())
}

/// Marks the current transaction as the gateway's own: its writes to real tables are not
/// captured. Call [`end_own_writes`] before committing.
pub(super) fn begin_own_writes(conn: &Connection) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO gw_writing(x) VALUES (1)")?.execute([])?;
    Ok(())
}

pub(super) fn end_own_writes(conn: &Connection) -> Result<()> {
    conn.prepare_cached("DELETE FROM gw_writing")?.execute([])?;
    Ok(())
}

/// The journals of the tenant's real tables, as they exist.
fn journals(conn: &Connection, tenant: &str, served: &ServedSchema) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for table in &served.schema.tables {
        let name = journal_name(tenant, &table.name);
        let exists: bool = conn
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)")?
            .query_row([&name], |r| r.get(0))?;
        if exists {
            found.push(name);
        }
    }
    Ok(found)
}

/// Whether `tenant` has cloud writes waiting: one of its journals holds a row. (Checked in
/// the journals themselves, so a captured write costs the writer no more than its journal
/// row.)
pub(super) fn pending(conn: &Connection, tenant: &str, served: &ServedSchema) -> Result<bool> {
    for journal in journals(conn, tenant, served)? {
        let any: bool = conn
            .prepare_cached(&format!("SELECT EXISTS(SELECT 1 FROM {})", quote(&journal)))?
            .query_row([], |r| r.get(0))?;
        if any {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Tenants with cloud writes waiting.
pub(super) fn pending_tenants(conn: &Connection, served: &ServedSchema) -> Result<Vec<String>> {
    let tenants: Vec<String> = conn
        .prepare_cached("SELECT tenant FROM gw_tenant_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for tenant in tenants {
        if pending(conn, &tenant, served)? {
            out.push(tenant);
        }
    }
    Ok(out)
}

/// The node writing for `role` in the tenant's cloud database, and the next dot counter it
/// may use.
fn cloud_node(conn: &Connection, tenant: &str, role: &str) -> Result<(NodeId, u64)> {
    let found: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT node, counter FROM gw_cloud_writers WHERE tenant = ?1 AND role = ?2")?
        .query_row([tenant, role], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match found {
        Some((node, counter)) => {
            let node = NodeId(node.try_into().map_err(|_| Error::Corrupt("stored cloud node".into()))?);
            Ok((node, counter as u64 + 1))
        }
        None => {
            let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
            conn.prepare_cached("INSERT INTO gw_cloud_writers(tenant, role, node, counter) VALUES (?1, ?2, ?3, 0)")?
                .execute(rusqlite::params![tenant, role, &node.0[..]])?;
            Ok((node, 1))
        }
    }
}

/// What the journal says of one key since the last intake.
#[derive(Debug, Default)]
struct Written {
    /// The key's values, as written.
    pk: Vec<Value>,
    /// The role of its last write (`None`: the cloud role).
    role: Option<String>,
    /// A write of the whole row (an insert, a delete, a new key) is among them.
    whole: bool,
    /// For each column of `mask_columns`, the role and time of the last write that changed it.
    cols: Vec<Option<(Option<String>, u64)>>,
    /// When it was last written (Unix ms).
    at_ms: u64,
}

impl Written {
    fn fold(&mut self, role: Option<String>, mask: Option<i64>, at_ms: Option<i64>, width: usize) {
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

/// Takes in the tenant's pending cloud writes, inside the caller's transaction (which holds
/// [`begin_own_writes`]). Returns the changes to log, if any.
pub(super) fn ingest(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    served: &ServedSchema,
    now_ms: u64,
) -> Result<Option<Batch>> {
    // Each role's node and its next counter, as used in this intake.
    let mut writers: BTreeMap<String, (NodeId, u64)> = BTreeMap::new();
    let mut changes = Batch::default();
    for table in &served.schema.tables {
        let journal = quote(&journal_name(tenant, &table.name));
        let exists: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = ?1)",
            [journal_name(tenant, &table.name)],
            |r| r.get(0),
        )?;
        if !exists {
            continue;
        }
        let n = table.key.len();
        let names = mask_columns(conn, &table_name(tenant, &table.name), table)?;
        let slots: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        let keys: BTreeMap<Vec<u8>, Written> = {
            let sql = format!("SELECT {}, role, mask, at_ms FROM {journal} ORDER BY seq", slots.join(", "));
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], |r| {
                let pk = (0..n).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((
                    pk,
                    r.get::<_, Option<String>>(n)?,
                    r.get::<_, Option<i64>>(n + 1)?,
                    r.get::<_, Option<i64>>(n + 2)?,
                ))
            })?;
            let mut keys: BTreeMap<Vec<u8>, Written> = BTreeMap::new();
            for row in rows {
                let (pk, role, mask, at_ms) = row?;
                let written = keys.entry(encode_key(&pk)).or_default();
                written.pk = pk;
                written.fold(role, mask, at_ms, names.len());
            }
            keys
        };
        for (key, written) in keys {
            let probe = RowChange { table: table.name.clone(), pk: written.pk.clone(), state: Default::default() };
            let (before, mut roles) = load_row(conn, limits, tenant, &probe, &key)?;
            let mut current = before.clone();
            // A row that appears or goes is one write, the last writer's; an update is one
            // write per role, of the columns it changed last, stamped when it changed them.
            let whole = written.whole
                && (read_row(conn, tenant, table, &current.pk)?.is_none() || !shows(&current, table, &roles));
            let parts: Vec<(String, Option<Vec<String>>, u64)> = if whole {
                vec![(written.role.clone().unwrap_or_else(|| CLOUD_ROLE.to_owned()), None, written.at_ms)]
            } else {
                written.by_role(&names).into_iter().map(|(role, (cols, at))| (role, Some(cols), at)).collect()
            };
            let mut made = Vec::new();
            for (role, cols, at_ms) in parts {
                let (node, counter) = match writers.get(&role) {
                    Some(w) => *w,
                    None => cloud_node(conn, tenant, &role)?,
                };
                roles.insert(node, role.clone());
                let kept = current.clone();
                let part = Part { dot: Dot { node, counter }, at_ms: at_ms.min(now_ms), only: cols.as_deref() };
                let Some(change) = cloud_change(conn, tenant, table, &mut current, &roles, part)? else {
                    continue;
                };
                writers.insert(role.clone(), (node, counter + 1));
                let change = RowChange { table: table.name.clone(), pk: current.pk.clone(), state: change };
                // What no replica could take is not merged: kept with its reason; the row
                // shows what it showed for those columns, and other roles' parts go on.
                let refused = table
                    .check_row(&change)
                    .err()
                    .or_else(|| key_too_long(&change.pk, limits))
                    .or_else(|| current.state.check_limits(limits).err());
                if let Some(reason) = refused {
                    let reason = format!("a write to {:?} made with SQL as {role:?} was refused: {reason}", table.name);
                    tracing::warn!(%tenant, %reason);
                    let writer = format!("sql as {role}");
                    let payload = encode_payload(&Batch { roles: BTreeMap::from([(node, role)]), rows: vec![change] });
                    super::keep_dead_letter(conn, tenant, &writer, &reason, &payload)?;
                    current = kept;
                    continue;
                }
                made.push((node, role, change));
            }
            // The table shows the merged row: what was taken in, and what was refused put back.
            tables::write_row(conn, tenant, table, &current, &roles)?;
            if made.is_empty() {
                continue;
            }
            conn.prepare_cached("INSERT OR REPLACE INTO gw_rows(tenant, tbl, pk, state) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![tenant, table.name, key, one_row_payload(&roles, current.clone())])?;
            for (node, role, change) in made {
                changes.roles.insert(node, role);
                changes.rows.push(change);
            }
        }
        conn.execute_batch(&format!("DELETE FROM {journal}"))?;
    }
    for (role, (_, next)) in &writers {
        conn.prepare_cached("UPDATE gw_cloud_writers SET counter = ?3 WHERE tenant = ?1 AND role = ?2")?
            .execute(rusqlite::params![tenant, role, *next as i64 - 1])?;
    }
    if changes.rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(changes))
}

/// One writer's part of what the journal says of a row: its dot, when, and the non-key
/// columns it changed last (`None`: all of them).
#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    dot: Dot,
    at_ms: u64,
    only: Option<&'a [String]>,
}

/// The write the real table's row makes against the merged state it showed, if any, as a
/// device's seal makes it: each changed column whose value differs from what the row showed
/// (only the columns the writer changed), counters by their difference, a delete if the row
/// is gone (its counters back to 0), an insert if it is new. Stamped when it was written,
/// never behind anything the row already holds.
fn cloud_change(
    conn: &Connection,
    tenant: &str,
    table: &SchemaTable,
    current: &mut RowChange,
    roles: &BTreeMap<NodeId, String>,
    part: Part<'_>,
) -> Result<Option<driftless_core::RowState>> {
    let Part { dot, at_ms, only } = part;
    let spec = table.spec();
    let shown: Option<BTreeMap<String, Value>> =
        row_values(&current.state, &spec, roles).map(|v| v.into_iter().collect());
    let values = read_row(conn, tenant, table, &current.pk)?;
    let newest = current.state.max_hlc().map_or(Hlc::default(), |(_, h)| h);
    let hlc = Hlc::new(at_ms, 0).max(Hlc(newest.0 + 1));
    let total = |c: &str| current.state.counters.get(c).map_or(0, driftless_core::Counter::value);
    let counters = table.columns.iter().filter(|c| c.policy == ColumnPolicy::Counter);
    let Some(values) = values else {
        if shown.is_none() {
            return Ok(None);
        }
        let deltas: Vec<(String, i64)> =
            counters.filter(|c| total(&c.name) != 0).map(|c| (c.name.clone(), total(&c.name).wrapping_neg())).collect();
        return Ok(Some(write_local_delete(&mut current.state, dot, hlc, deltas)));
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
        return Ok(None);
    }
    Ok(Some(write_local_upsert(&mut current.state, dot, hlc, write)))
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

/// Whether the row shows in its table (it exists and is not deleted).
fn shows(row: &RowChange, table: &SchemaTable, roles: &BTreeMap<NodeId, String>) -> bool {
    row_values(&row.state, &table.spec(), roles).is_some()
}

/// A counter column's value as an integer (what a STRICT INTEGER column holds).
fn counter_value(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        _ => 0,
    }
}

/// The non-key columns of the real table's row, in declaration order, if the row exists.
fn read_row(conn: &Connection, tenant: &str, table: &SchemaTable, pk: &[Value]) -> Result<Option<Vec<Value>>> {
    let cols: Vec<String> = table.columns.iter().filter(|c| !table.is_key(&c.name)).map(|c| quote(&c.name)).collect();
    let matches: Vec<String> =
        table.key.iter().enumerate().map(|(i, k)| format!("{} = ?{}", quote(k), i + 1)).collect();
    let select = if cols.is_empty() { "1".to_owned() } else { cols.join(", ") };
    let sql =
        format!("SELECT {select} FROM {} WHERE {}", quote(&table_name(tenant, &table.name)), matches.join(" AND "));
    let n = cols.len();
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(pk.iter()), |r| {
            (0..n).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()
        })
        .optional()?)
}

fn sql_text(t: &str) -> String {
    format!("'{}'", t.replace('\'', "''"))
}
