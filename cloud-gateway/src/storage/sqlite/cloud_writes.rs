//! Writes made directly to the real tables (the sqlite3 shell, a report tool, an integration):
//! captured by triggers in the writer's own transaction, then merged by the gateway as writes
//! of the tenant's cloud node, under the cloud role, resolved by the same policies as any
//! device's write, and logged for every device.
//!
//! Each real table `"T.X"` has a journal `"T.X._driftless_writes"` of the keys written, and
//! the tenant is marked in `gw_cloud_pending`. The gateway's own writes to the real tables
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

/// Creates the journal and capture triggers of a real table, and its view per declared role
/// (again, if they exist: columns may have been added).
pub(super) fn install(conn: &Connection, tenant: &str, table: &SchemaTable, roles: &[String]) -> Result<()> {
    let real = table_name(tenant, &table.name);
    let base = quote(&real);
    let journal_plain = journal_name(tenant, &table.name);
    let journal = quote(&journal_plain);
    let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
    // Untyped columns keep key values exactly as written. `role` is NULL for the cloud role;
    // `mask` has bit i set if non-key column i changed (NULL: all of them); `at_ms` is when.
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
    // Bit i for non-key column i; a table of more columns than a mask holds records its
    // updates as writes of every column (compared with what the row showed, so still exact).
    let plain: Vec<&str> = table.columns.iter().filter(|c| !table.is_key(&c.name)).map(|c| c.name.as_str()).collect();
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
    let pending = format!("INSERT OR IGNORE INTO gw_cloud_pending(tenant) VALUES ({});", sql_text(tenant));
    let cols = slots.join(", ");
    // What each kind of write records: insert, update, the old key of an update that changed
    // it, delete.
    let record = |role: &str| -> [String; 4] {
        let into = format!("INSERT INTO {journal}({cols}, role, mask, at_ms)");
        [
            format!("{into} VALUES ({}, {role}, NULL, {now});", of("NEW")),
            format!("{into} VALUES ({}, {role}, CASE WHEN {changed_key} THEN NULL ELSE {mask} END, {now});", of("NEW")),
            format!("{into} VALUES ({}, {role}, NULL, {now});", of("OLD")),
            format!("{into} VALUES ({}, {role}, NULL, {now});", of("OLD")),
        ]
    };
    let guard = "NOT EXISTS (SELECT 1 FROM gw_writing)";
    let [on_insert, on_update, on_rekey, on_delete] = record("NULL");
    let key_list = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
    for (suffix, event, when, body) in [
        ("ins", "INSERT".to_owned(), guard.to_owned(), on_insert),
        ("upd", "UPDATE".to_owned(), guard.to_owned(), on_update),
        // Only an update that changes the key also records the old key.
        ("rekey", format!("UPDATE OF {key_list}"), format!("({changed_key}) AND {guard}"), on_rekey),
        ("del", "DELETE".to_owned(), guard.to_owned(), on_delete),
    ] {
        let trigger = quote(&format!("{real}._driftless_{suffix}"));
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {trigger};
             CREATE TRIGGER {trigger} AFTER {event} ON {base} WHEN {when} BEGIN {body} {pending} END;"
        ))?;
    }
    // A writer names its role by writing through "TENANT.TABLE@ROLE": the view's triggers
    // write the table with capture held off (a marker row that lives only inside the
    // statement) and record the keys under that role.
    let names: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let inserted: Vec<String> = table
        .columns
        .iter()
        .map(|c| match &c.default {
            // A view passes NULL for a column the INSERT left out: the default applies then.
            Some(d) => format!("coalesce(NEW.{}, {})", quote(&c.name), driftless_core::schema::sql_literal(d)),
            None => format!("NEW.{}", quote(&c.name)),
        })
        .collect();
    let sets: Vec<String> = names.iter().map(|n| format!("{n} = NEW.{n}")).collect();
    let at_old: Vec<String> = table.key.iter().map(|k| format!("{0} = OLD.{0}", quote(k))).collect();
    let hold = "INSERT INTO gw_writing(x) VALUES (2);";
    let release = "DELETE FROM gw_writing WHERE x = 2;";
    for role in roles {
        let view = quote(&format!("{real}@{role}"));
        // (An INSTEAD OF trigger cannot be limited to key changes: the update records the old
        // key itself when it changed.)
        let [on_insert, on_update, _, on_delete] = record(&sql_text(role));
        let on_update = format!(
            "{on_update} INSERT INTO {journal}({cols}, role, mask, at_ms) SELECT {}, {}, NULL, {now} WHERE {changed_key};",
            of("OLD"),
            sql_text(role)
        );
        let writes = [
            format!("INSERT INTO {base}({}) VALUES ({});", names.join(", "), inserted.join(", ")),
            format!("UPDATE {base} SET {} WHERE {};", sets.join(", "), at_old.join(" AND ")),
            format!("DELETE FROM {base} WHERE {};", at_old.join(" AND ")),
        ];
        conn.execute_batch(&format!("DROP VIEW IF EXISTS {view}; CREATE VIEW {view} AS SELECT * FROM {base};"))?;
        for (((suffix, event), write), recorded) in [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")]
            .into_iter()
            .zip(writes)
            .zip([on_insert, on_update, on_delete])
        {
            let trigger = quote(&format!("{real}@{role}._driftless_{suffix}"));
            conn.execute_batch(&format!(
                "CREATE TRIGGER {trigger} INSTEAD OF {event} ON {view} BEGIN {hold} {write} {release} {recorded} {pending} END;"
            ))?;
        }
    }
    Ok(())
}

/// Marks the current transaction as the gateway's own: its writes to real tables are not
/// captured. Call [`end_own_writes`] before committing.
pub(super) fn begin_own_writes(conn: &Connection) -> Result<()> {
    conn.prepare_cached("INSERT INTO gw_writing(x) VALUES (1)")?.execute([])?;
    Ok(())
}

pub(super) fn end_own_writes(conn: &Connection) -> Result<()> {
    conn.prepare_cached("DELETE FROM gw_writing")?.execute([])?;
    Ok(())
}

/// Whether `tenant` has cloud writes waiting.
pub(super) fn pending(conn: &Connection, tenant: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM gw_cloud_pending WHERE tenant = ?1")?
        .query_row([tenant], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Tenants with cloud writes waiting.
pub(super) fn pending_tenants(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT tenant FROM gw_cloud_pending")?;
    let tenants = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(tenants)
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
    /// The role of its last write (`None`: the cloud role).
    role: Option<String>,
    /// A write of the whole row came last or before the updates since (an insert, a delete,
    /// a new key): every column is the last role's... unless an update named it since.
    whole: bool,
    /// For each non-key column, the role of the last update that changed it.
    cols: Vec<Option<Option<String>>>,
    /// When it was last written (Unix ms).
    at_ms: u64,
}

impl Written {
    fn fold(&mut self, role: Option<String>, mask: Option<i64>, at_ms: Option<i64>, width: usize) {
        self.cols.resize(width, None);
        match mask {
            None => {
                self.whole = true;
                self.cols.iter_mut().for_each(|c| *c = Some(role.clone()));
            }
            Some(mask) => {
                for (i, c) in self.cols.iter_mut().enumerate().take(MASK_BITS) {
                    if mask & (1 << i) != 0 {
                        *c = Some(role.clone());
                    }
                }
            }
        }
        self.role = role;
        self.at_ms = self.at_ms.max(at_ms.unwrap_or(0).max(0) as u64);
    }

    /// The roles that changed columns, each with the columns it changed last (every column
    /// for a whole-row write), in a stable order.
    fn by_role(&self) -> BTreeMap<String, Vec<usize>> {
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.cols.iter().enumerate() {
            if let Some(role) = c {
                out.entry(role.clone().unwrap_or_else(|| CLOUD_ROLE.to_owned())).or_default().push(i);
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
        let width = table.columns.len() - n;
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
                let (pk, role, cols, at_ms) = row?;
                keys.entry(encode_key(&pk)).or_default().fold(role, cols, at_ms, width);
            }
            keys
        };
        for (key, written) in keys {
            let pk = driftless_core::codec::decode_key(&key, limits).map_err(|e| Error::Corrupt(e.to_string()))?;
            let probe = RowChange { table: table.name.clone(), pk, state: Default::default() };
            let (before, mut roles) = load_row(conn, limits, tenant, &probe, &key)?;
            let mut current = before.clone();
            let at_ms = written.at_ms.min(now_ms);
            // A row that appears or goes is one write, the last writer's; an update is one
            // write per role, of the columns it changed last.
            let whole = written.whole
                && (read_row(conn, tenant, table, &current.pk)?.is_none() || !shows(&current, table, &roles));
            let parts: Vec<(String, Option<Vec<usize>>)> = if whole {
                vec![(written.role.clone().unwrap_or_else(|| CLOUD_ROLE.to_owned()), None)]
            } else {
                written.by_role().into_iter().map(|(role, cols)| (role, Some(cols))).collect()
            };
            let mut made = Vec::new();
            let mut refused = None;
            for (role, cols) in parts {
                let (node, counter) = match writers.get(&role) {
                    Some(w) => *w,
                    None => cloud_node(conn, tenant, &role)?,
                };
                roles.insert(node, role.clone());
                let part = Part { dot: Dot { node, counter }, at_ms, only: cols.as_deref() };
                let Some(change) = cloud_change(conn, tenant, table, &mut current, &roles, part)? else {
                    continue;
                };
                writers.insert(role.clone(), (node, counter + 1));
                let change = RowChange { table: table.name.clone(), pk: current.pk.clone(), state: change };
                // What no replica could take is not merged: kept with its reason, and the
                // row shows again what it showed.
                if let Some(reason) =
                    table.check_row(&change).err().or_else(|| current.state.check_limits(limits).err())
                {
                    refused = Some((role, node, change, reason));
                    break;
                }
                made.push((node, role, change));
            }
            if let Some((role, node, change, reason)) = refused {
                let reason = format!("a write to {:?} made with SQL as {role:?} was refused: {reason}", table.name);
                tracing::warn!(%tenant, %reason);
                let writer = format!("sql as {role}");
                let payload = encode_payload(&Batch { roles: BTreeMap::from([(node, role)]), rows: vec![change] });
                super::keep_dead_letter(conn, tenant, &writer, &reason, &payload)?;
                tables::write_row(conn, tenant, table, &before, &roles)?;
                continue;
            }
            if made.is_empty() {
                continue;
            }
            tables::write_row(conn, tenant, table, &current, &roles)?;
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
    conn.prepare_cached("DELETE FROM gw_cloud_pending WHERE tenant = ?1")?.execute([tenant])?;
    if changes.rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(changes))
}

/// One writer's part of what the journal says of a row: its dot, when, and the non-key
/// columns (by position) it changed last (`None`: all of them).
#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    dot: Dot,
    at_ms: u64,
    only: Option<&'a [usize]>,
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
    for (i, (c, value)) in plain.into_iter().zip(values).enumerate() {
        let changed = only.is_none_or(|cols| cols.contains(&i));
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
