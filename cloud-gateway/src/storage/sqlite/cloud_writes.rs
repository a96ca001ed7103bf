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

use std::collections::{BTreeMap, BTreeSet};

use driftless_core::codec::{Limits, encode_key};
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

fn journal_name(tenant: &str, table: &str) -> String {
    format!("{}._driftless_writes", table_name(tenant, table))
}

/// Creates the journal and capture triggers of a real table (again, if they exist).
pub(super) fn install(conn: &Connection, tenant: &str, table: &SchemaTable) -> Result<()> {
    let real = table_name(tenant, &table.name);
    let journal = quote(&journal_name(tenant, &table.name));
    let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
    // Untyped columns keep key values exactly as written.
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {journal} (seq INTEGER PRIMARY KEY, {})",
        slots.join(", ")
    ))?;
    let of = |row: &str| table.key.iter().map(|k| format!("{row}.{}", quote(k))).collect::<Vec<_>>().join(", ");
    let changed_key = table.key.iter().map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k))).collect::<Vec<_>>();
    let pending = format!("INSERT OR IGNORE INTO gw_cloud_pending(tenant) VALUES ({});", sql_text(tenant));
    let guard = "WHEN NOT EXISTS (SELECT 1 FROM gw_writing)";
    let cols = slots.join(", ");
    for (suffix, event, body) in [
        ("ins", "INSERT", format!("INSERT INTO {journal}({cols}) VALUES ({});", of("NEW"))),
        (
            "upd",
            "UPDATE",
            format!(
                "INSERT INTO {journal}({cols}) VALUES ({});
                 INSERT INTO {journal}({cols}) SELECT {} WHERE {};",
                of("NEW"),
                of("OLD"),
                changed_key.join(" OR ")
            ),
        ),
        ("del", "DELETE", format!("INSERT INTO {journal}({cols}) VALUES ({});", of("OLD"))),
    ] {
        let trigger = quote(&format!("{real}._driftless_{suffix}"));
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {trigger};
             CREATE TRIGGER {trigger} AFTER {event} ON {} {guard} BEGIN {body} {pending} END;",
            quote(&real)
        ))?;
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

/// The tenant's cloud node, and the next dot counter it may use.
fn cloud_node(conn: &Connection, tenant: &str) -> Result<(NodeId, u64)> {
    let found: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT node, counter FROM gw_cloud_nodes WHERE tenant = ?1")?
        .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match found {
        Some((node, counter)) => {
            let node = NodeId(node.try_into().map_err(|_| Error::Corrupt("stored cloud node".into()))?);
            Ok((node, counter as u64 + 1))
        }
        None => {
            let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
            conn.prepare_cached("INSERT INTO gw_cloud_nodes(tenant, node, counter) VALUES (?1, ?2, 0)")?
                .execute(rusqlite::params![tenant, &node.0[..]])?;
            Ok((node, 1))
        }
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
    let (node, mut counter) = cloud_node(conn, tenant)?;
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
        let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
        let keys: BTreeSet<Vec<u8>> = {
            let mut stmt = conn.prepare(&format!("SELECT {} FROM {journal} ORDER BY seq", slots.join(", ")))?;
            let rows = stmt.query_map([], |r| {
                (0..slots.len()).map(|i| r.get::<_, Value>(i)).collect::<rusqlite::Result<Vec<_>>>()
            })?;
            let mut keys = BTreeSet::new();
            for pk in rows {
                keys.insert(encode_key(&pk?));
            }
            keys
        };
        for key in keys {
            let pk = driftless_core::codec::decode_key(&key, limits).map_err(|e| Error::Corrupt(e.to_string()))?;
            let probe = RowChange { table: table.name.clone(), pk, state: Default::default() };
            let (mut current, mut roles) = load_row(conn, limits, tenant, &probe, &key)?;
            roles.insert(node, CLOUD_ROLE.to_owned());
            let Some(change) = cloud_change(conn, tenant, table, &mut current, &roles, Dot { node, counter }, now_ms)?
            else {
                continue;
            };
            counter += 1;
            current.state.check_limits(limits).map_err(|e| Error::Corrupt(format!("a cloud write: {e}")))?;
            tables::write_row(conn, tenant, table, &current, &roles)?;
            conn.prepare_cached("INSERT OR REPLACE INTO gw_rows(tenant, tbl, pk, state) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![tenant, table.name, key, one_row_payload(&roles, current.clone())])?;
            changes.rows.push(RowChange { table: table.name.clone(), pk: current.pk.clone(), state: change });
        }
        conn.execute_batch(&format!("DELETE FROM {journal}"))?;
    }
    conn.prepare_cached("UPDATE gw_cloud_nodes SET counter = ?2 WHERE tenant = ?1")?
        .execute(rusqlite::params![tenant, counter as i64 - 1])?;
    conn.prepare_cached("DELETE FROM gw_cloud_pending WHERE tenant = ?1")?.execute([tenant])?;
    if changes.rows.is_empty() {
        return Ok(None);
    }
    changes.roles = BTreeMap::from([(node, CLOUD_ROLE.to_owned())]);
    Ok(Some(changes))
}

/// The write the real table's row makes against the merged state it showed, if it differs:
/// every column whose value differs, counters by their difference, a delete if the row is
/// gone, an insert if it is new.
fn cloud_change(
    conn: &Connection,
    tenant: &str,
    table: &SchemaTable,
    current: &mut RowChange,
    roles: &BTreeMap<NodeId, String>,
    dot: Dot,
    now_ms: u64,
) -> Result<Option<driftless_core::RowState>> {
    let spec = table.spec();
    let shown: Option<BTreeMap<String, Value>> =
        row_values(&current.state, &spec, roles).map(|v| v.into_iter().collect());
    let written = read_row(conn, tenant, table, &current.pk)?;
    // Causally after everything the row holds, and never behind the wall clock.
    let newest = current.state.max_hlc().map_or(Hlc::default(), |(_, h)| h);
    let hlc = Hlc::new(now_ms, 0).max(Hlc(newest.0 + 1));
    let counter_of = |shown: &Option<BTreeMap<String, Value>>, c: &str| match shown.as_ref().and_then(|s| s.get(c)) {
        Some(Value::Integer(i)) => *i,
        _ => 0,
    };
    let Some(written) = written else {
        if shown.is_none() {
            return Ok(None);
        }
        return Ok(Some(write_local_delete(&mut current.state, dot, hlc, Vec::new())));
    };
    let mut write = LocalWrite::default();
    for (c, value) in table.columns.iter().filter(|c| !table.is_key(&c.name)).zip(written) {
        if c.policy == ColumnPolicy::Counter {
            let Value::Integer(now) = value else { continue };
            let delta = now.wrapping_sub(counter_of(&shown, &c.name));
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
