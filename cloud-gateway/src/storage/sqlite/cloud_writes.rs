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

use driftless_core::codec::{Limits, encode_key};
use driftless_core::schema::quote;
use driftless_core::scope::Move;
use driftless_core::{Batch, NodeId, RowChange, SchemaTable, Value};
use rusqlite::{Connection, OptionalExtension};

use super::merge::{load_row, one_row_payload};
use super::tables::{self, table_name};
use crate::error::{Error, Result};
use crate::storage::ServedSchema;
use crate::storage::cloud_intake::{Adopted, CloudTables, Intake, Journaled, MASK_BITS};
use crate::storage::vouching::CLOUD_OWNER;

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

/// Journals values of a real table that the schema declares for the first time (written with
/// plain SQL before), so the next intake takes them in.
pub(super) fn adopt(conn: &Connection, tenant: &str, table: &SchemaTable, adopted: &Adopted) -> Result<()> {
    let real = table_name(tenant, &table.name);
    let names = mask_columns(conn, &real, table)?;
    let journal = quote(&journal_name(tenant, &table.name));
    conn.execute_batch(&adopted.journal_sql(&journal, &quote(&real), table, &names, crate::storage::common::now_ms()))?;
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

/// Takes in the tenant's pending cloud writes, inside the caller's transaction (which holds
/// [`begin_own_writes`]). Returns the changes to log, if any.
pub(super) fn ingest(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    served: &ServedSchema,
    now_ms: u64,
) -> Result<Option<(Batch, Vec<Option<Move>>)>> {
    let mut intake = Intake::new(&served.schema, limits, now_ms);
    let mut rows = Rows { conn, limits, tenant };
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
        let keys: BTreeMap<Vec<u8>, Journaled> = {
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
            let mut keys: BTreeMap<Vec<u8>, Journaled> = BTreeMap::new();
            for row in rows {
                let (pk, role, mask, at_ms) = row?;
                let written = keys.entry(encode_key(&pk)).or_default();
                written.pk = pk;
                written.fold(role, mask, at_ms, names.len());
            }
            keys
        };
        for written in keys.values() {
            intake.key(&mut rows, table, &names, written)?;
        }
        conn.execute_batch(&format!("DELETE FROM {journal}"))?;
    }
    for (role, (node, next)) in &intake.writers {
        conn.prepare_cached("UPDATE gw_cloud_writers SET counter = ?3 WHERE tenant = ?1 AND role = ?2")?
            .execute(rusqlite::params![tenant, role, *next as i64 - 1])?;
        // Bound to the cloud, with how far it wrote: no device may write as it, and devices
        // may claim what it wrote.
        conn.prepare_cached(
            "INSERT INTO gw_nodes(tenant, node, device, role, max_counter) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(tenant, node) DO UPDATE SET max_counter = max(max_counter, excluded.max_counter)",
        )?
        .execute(rusqlite::params![tenant, &node.0[..], CLOUD_OWNER, role, *next as i64 - 1])?;
    }
    Ok((!intake.changes.rows.is_empty()).then_some((intake.changes, intake.moves)))
}

/// A tenant's real tables and causal state in this store, as an intake uses them.
struct Rows<'a> {
    conn: &'a Connection,
    limits: &'a Limits,
    tenant: &'a str,
}

impl CloudTables for Rows<'_> {
    fn load(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<(RowChange, BTreeMap<NodeId, String>)> {
        let probe = RowChange { table: table.name.clone(), pk: pk.to_vec(), state: Default::default() };
        load_row(self.conn, self.limits, self.tenant, &probe, &encode_key(pk))
    }

    fn read_row(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<Option<Vec<Value>>> {
        read_row(self.conn, self.tenant, table, pk)
    }

    fn cloud_node(&mut self, role: &str) -> Result<(NodeId, u64)> {
        let found: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT node, counter FROM gw_cloud_writers WHERE tenant = ?1 AND role = ?2")?
            .query_row([self.tenant, role], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match found {
            Some((node, counter)) => {
                let node = NodeId(node.try_into().map_err(|_| Error::Corrupt("stored cloud node".into()))?);
                Ok((node, counter as u64 + 1))
            }
            None => {
                let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
                self.conn
                    .prepare_cached("INSERT INTO gw_cloud_writers(tenant, role, node, counter) VALUES (?1, ?2, ?3, 0)")?
                    .execute(rusqlite::params![self.tenant, role, &node.0[..]])?;
                Ok((node, 1))
            }
        }
    }

    fn dead_letter(&mut self, writer: &str, reason: &str, payload: &[u8]) -> Result<()> {
        super::keep_dead_letter(self.conn, self.tenant, writer, reason, payload)?;
        Ok(())
    }

    fn show(&mut self, table: &SchemaTable, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
        // A constraint the table cannot meet for what the merge shows is kept as a dead
        // letter, never a failure of every later intake.
        self.conn.execute_batch("SAVEPOINT gw_show")?;
        match tables::write_row(self.conn, self.tenant, table, row, roles) {
            Ok(()) => Ok(self.conn.execute_batch("RELEASE gw_show")?),
            Err(Error::Sqlite(e)) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
                self.conn.execute_batch("ROLLBACK TO gw_show; RELEASE gw_show")?;
                let reason = format!("the cloud table {:?} refuses to show the merged row: {e}", table.name);
                tracing::warn!(tenant = %self.tenant, %reason);
                super::keep_dead_letter(
                    self.conn,
                    self.tenant,
                    "gateway",
                    &reason,
                    &one_row_payload(roles, row.clone()),
                )?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO gw_rows(tenant, tbl, pk, state) VALUES (?1, ?2, ?3, ?4)")?
            .execute(rusqlite::params![
                self.tenant,
                row.table,
                encode_key(&row.pk),
                one_row_payload(roles, row.clone())
            ])?;
        Ok(())
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
