//! The merged rows of every declared table as a real table, one per tenant and table, named
//! `"TENANT.TABLE"`: typed columns, the declared key, and the values every device shows (a
//! manual conflict's provisional winner, a counter's sum). They are written in the same
//! transaction as the causal state and the log, so plain SQL (the sqlite3 shell, a report, an
//! integration) always reads what was acknowledged. Conflicts that need someone's review are
//! listed in `"TENANT._driftless_conflicts"`.
//!
//! Tables are made per tenant when its first batch merges under a schema version, and brought
//! to a later version (new tables, added columns) the same way; either refills the table from
//! the causal state, which holds every column a device ever sent.

use std::collections::BTreeMap;

use driftless_core::codec::{Limits, decode_payload, encode_key};
use driftless_core::schema::quote;
use driftless_core::{NodeId, RowChange, SchemaTable, SyncSchema, Value, row_values};
use rusqlite::{Connection, OptionalExtension};

use super::cloud_writes;
use crate::error::{Error, Result};
use crate::storage::ServedSchema;
use crate::storage::cloud_intake::Adopted;
use crate::storage::shown::{conflict_rows, upsert};

/// The real table of `table` for `tenant`.
pub(crate) fn table_name(tenant: &str, table: &str) -> String {
    format!("{tenant}.{table}")
}

fn conflicts_name(tenant: &str) -> String {
    format!("{tenant}._driftless_conflicts")
}

/// Makes sure the tenant's tables follow `served`; cheap when they already do. Runs inside a
/// transaction that holds `cloud_writes::begin_own_writes`.
pub(super) fn materialize(conn: &Connection, limits: &Limits, tenant: &str, served: &ServedSchema) -> Result<()> {
    let have: Option<i64> = conn
        .prepare_cached("SELECT version FROM gw_tenant_tables WHERE tenant = ?1")?
        .query_row([tenant], |r| r.get(0))
        .optional()?;
    if have == Some(served.version as i64) {
        return Ok(());
    }
    let before = match have {
        Some(v) => conn
            .query_row("SELECT text FROM gw_sync_schema WHERE version = ?1", [v], |r| r.get::<_, String>(0))
            .optional()?
            .map(|text| SyncSchema::parse(&text))
            .transpose()
            .map_err(|e| Error::Corrupt(format!("stored sync schema: {e}")))?,
        None => None,
    };
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
            tbl          TEXT NOT NULL,
            key          TEXT NOT NULL,  -- the key values, as SQL literals
            col          TEXT NOT NULL,  -- '' for a delete raced by an update
            policy       TEXT NOT NULL,
            needs_review INTEGER NOT NULL,
            shown        TEXT,           -- the value shown, as an SQL literal
            others       TEXT NOT NULL,  -- the other values written, as SQL literals
            pk           BLOB NOT NULL,
            PRIMARY KEY (tbl, pk, col)
        )",
        quote(&conflicts_name(tenant))
    ))?;
    for table in &served.schema.tables {
        let name = table_name(tenant, &table.name);
        let columns: Vec<String> = conn
            .prepare(&format!("SELECT name FROM pragma_table_info({})", sql_text(&name)))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let missing: Vec<_> = table.columns.iter().filter(|c| !columns.contains(&c.name)).collect();
        if columns.is_empty() {
            conn.execute_batch(&table.sqlite_create_named(&name))?;
        } else {
            for c in &missing {
                conn.execute_batch(&table.sqlite_add_column_named(&name, c))?;
            }
        }
        cloud_writes::install(conn, tenant, table, &served.schema.roles)?;
        if let Some(adopted) = Adopted::of(table, &columns, before.as_ref().and_then(|b| b.table(&table.name))) {
            cloud_writes::adopt(conn, tenant, table, &adopted)?;
        }
        if columns.is_empty() {
            refill(conn, limits, tenant, table, None)?;
        } else if !missing.is_empty() {
            // Only the added columns: the others may hold writes not taken in yet.
            let added: Vec<&str> = missing.iter().map(|c| c.name.as_str()).collect();
            refill(conn, limits, tenant, table, Some(&added))?;
        }
    }
    conn.prepare_cached(
        "INSERT INTO gw_tenant_tables(tenant, version) VALUES (?1, ?2)
         ON CONFLICT(tenant) DO UPDATE SET version = excluded.version",
    )?
    .execute(rusqlite::params![tenant, served.version as i64])?;
    Ok(())
}

/// Writes every stored row of `table` into its real table (a new table), or just the values
/// of the columns `only` (columns just added).
fn refill(conn: &Connection, limits: &Limits, tenant: &str, table: &SchemaTable, only: Option<&[&str]>) -> Result<()> {
    let mut stmt = conn.prepare("SELECT state FROM gw_rows WHERE tenant = ?1 AND tbl = ?2")?;
    let mut rows = stmt.query(rusqlite::params![tenant, table.name])?;
    while let Some(r) = rows.next()? {
        let bytes: Vec<u8> = r.get(0)?;
        let mut b = decode_payload(&bytes, limits).map_err(|e| Error::Corrupt(format!("stored row: {e}")))?;
        let row = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
        let Some(only) = only else {
            write_row(conn, tenant, table, &row, &b.roles)?;
            continue;
        };
        let Some(values) = row_values(&row.state, &table.spec(), &b.roles) else { continue };
        for (column, value) in values.iter().filter(|(c, _)| only.contains(&c.as_str())) {
            let matches: Vec<String> =
                table.key.iter().enumerate().map(|(i, k)| format!("{} = ?{}", quote(k), i + 2)).collect();
            let sql = format!(
                "UPDATE {} SET {} = ?1 WHERE {}",
                quote(&table_name(tenant, &table.name)),
                quote(column),
                matches.join(" AND ")
            );
            let params: Vec<&Value> = std::iter::once(value).chain(row.pk.iter()).collect();
            conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(params))?;
        }
    }
    Ok(())
}

/// Shows `row`'s merged state in its real table (deleting it there if it is deleted), and
/// its conflicts in the conflicts table.
pub(super) fn write_row(
    conn: &Connection,
    tenant: &str,
    table: &SchemaTable,
    row: &RowChange,
    roles: &BTreeMap<NodeId, String>,
) -> Result<()> {
    let name = quote(&table_name(tenant, &table.name));
    let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
    let spec = table.spec();
    match row_values(&row.state, &spec, roles) {
        None => {
            let matches: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("{k} = ?{}", i + 1)).collect();
            conn.prepare_cached(&format!("DELETE FROM {name} WHERE {}", matches.join(" AND ")))?
                .execute(rusqlite::params_from_iter(row.pk.iter()))?;
        }
        Some(values) => {
            let (sql, params) = upsert(&name, table, row, values, |i| format!("?{i}"));
            conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(params))?;
        }
    }
    write_conflicts(conn, tenant, table, row, roles)
}

fn write_conflicts(
    conn: &Connection,
    tenant: &str,
    table: &SchemaTable,
    row: &RowChange,
    roles: &BTreeMap<NodeId, String>,
) -> Result<()> {
    let name = quote(&conflicts_name(tenant));
    let pk = encode_key(&row.pk);
    conn.prepare_cached(&format!("DELETE FROM {name} WHERE tbl = ?1 AND pk = ?2"))?
        .execute(rusqlite::params![table.name, pk])?;
    let found = conflict_rows(table, row, roles);
    if found.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO {name}(tbl, key, col, policy, needs_review, shown, others, pk)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?;
    for c in found {
        insert.execute(rusqlite::params![table.name, c.key, c.col, c.policy, c.needs_review, c.shown, c.others, pk])?;
    }
    Ok(())
}

fn sql_text(t: &str) -> String {
    format!("'{}'", t.replace('\'', "''"))
}
