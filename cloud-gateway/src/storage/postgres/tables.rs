//! Each tenant's real tables in PostgreSQL: a schema per tenant (`"TENANT"."TABLE"`), typed
//! columns, the declared key, the values every device shows; conflicts in
//! `"TENANT"._driftless_conflicts`. Written in the same transaction as the causal state and
//! the log.
//!
//! Writes other clients make (psql, an ERP) are captured by triggers in the writer's own
//! transaction into a journal per table (`"TENANT"."_driftless_writes_N"`): the key, the role
//! the writer named (`SET LOCAL driftless.role = 'erp'`; none: the cloud role), which columns
//! changed and when. A statement first takes the tenant's advisory lock shared, so the
//! gateway, which takes it exclusively, never merges over a write it has not taken in; and
//! a NOTIFY on `driftless_writes` (payload: the tenant) wakes every gateway when it commits.
//! The gateway's own transactions set `driftless.gateway`, and the triggers stand down.

use std::collections::{BTreeMap, HashMap};

use driftless_core::codec::{Limits, decode_payload, encode_key};
use driftless_core::schema::quote;
use driftless_core::{ColumnType, NodeId, RowChange, SchemaTable, SyncSchema, Value, row_values};
use postgres::Transaction;
use postgres::types::ToSql;

use super::migrate::LOCK_SPACE;
use super::values::{self, Read, literal, params, refs};
use crate::error::{Error, Result};
use crate::storage::ServedSchema;
use crate::storage::cloud_intake::{Adopted, MASK_BITS};
use crate::storage::shown::{conflict_rows, upsert};

/// The channel gateways listen on.
pub(super) const CHANNEL: &str = "driftless_writes";

/// Why a tenant cannot have a PostgreSQL schema, if it cannot.
pub(super) fn unfit_tenant(tenant: &str) -> Option<String> {
    if tenant.is_empty() || tenant.len() > 63 {
        return Some(format!("tenant {tenant:?}: a PostgreSQL schema name is 1 to 63 bytes"));
    }
    if tenant.contains('\0') || tenant == "driftless" || tenant == "information_schema" || tenant.starts_with("pg_") {
        return Some(format!("tenant {tenant:?} cannot name a PostgreSQL schema (reserved)"));
    }
    None
}

/// `"TENANT"."TABLE"`.
pub(super) fn real(tenant: &str, table: &str) -> String {
    format!("{}.{}", quote(tenant), quote(table))
}

fn journal(tenant: &str, id: i64) -> String {
    format!("{}.{}", quote(tenant), quote(&format!("_driftless_writes_{id}")))
}

/// Takes the tenant's lock for the rest of the transaction and marks the transaction as the
/// gateway's own (its writes to real tables are not captured). It also shares the schema's
/// lock, which loading a schema takes alone: a schema version that counts what stored rows
/// name (`storage::refs`) sees every merge before it, and every merge after it sees it.
pub(super) fn begin_gateway_tx(tx: &mut Transaction<'_>, tenant: &str) -> Result<()> {
    tx.execute(
        "SELECT set_config('driftless.gateway', 'on', true), pg_advisory_xact_lock($1, hashtext($2)),
                pg_advisory_xact_lock_shared($1, 1)",
        &[&LOCK_SPACE, &tenant],
    )?;
    Ok(())
}

/// [`begin_gateway_tx`] if the tenant's lock is free now; `false` if a writer holds it.
pub(super) fn try_begin_gateway_tx(tx: &mut Transaction<'_>, tenant: &str) -> Result<bool> {
    let row = tx.query_one(
        "SELECT set_config('driftless.gateway', 'on', true), pg_try_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_SPACE, &tenant],
    )?;
    let locked: bool = row.get(1);
    if locked {
        tx.execute("SELECT pg_advisory_xact_lock_shared($1, 1)", &[&LOCK_SPACE])?;
    }
    Ok(locked)
}

/// Fails (to be tried again) if the current sync schema is not `served`: another instance
/// loaded a newer one since it was read. Called under the tenant's lock.
pub(super) fn check_schema_current(tx: &mut Transaction<'_>, served: Option<&ServedSchema>) -> Result<()> {
    let current: Option<i64> = tx.query_one("SELECT max(version) FROM driftless.gw_sync_schema", &[])?.get(0);
    if current.map(|v| v as u64) != served.map(|s| s.version) {
        return Err(Error::Retry("the sync schema changed while this merge began; reading it again".into()));
    }
    Ok(())
}

/// The journal number of each of the tenant's tables that has one.
pub(super) fn journals(tx: &mut Transaction<'_>, tenant: &str) -> Result<BTreeMap<String, i64>> {
    let rows = tx.query("SELECT tbl, id FROM driftless.gw_journals WHERE tenant = $1", &[&tenant])?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Makes sure the tenant's tables follow `served`; cheap when they already do. Runs in a
/// transaction that [`begin_gateway_tx`] began.
pub(super) fn materialize(
    tx: &mut Transaction<'_>,
    limits: &Limits,
    tenant: &str,
    served: &ServedSchema,
) -> Result<()> {
    let have: Option<i64> =
        tx.query_opt("SELECT version FROM driftless.gw_tenant_tables WHERE tenant = $1", &[&tenant])?.map(|r| r.get(0));
    let before = match have {
        Some(v) => tx
            .query_opt("SELECT text FROM driftless.gw_sync_schema WHERE version = $1", &[&v])?
            .map(|r| SyncSchema::parse(r.get(0)))
            .transpose()
            .map_err(|e| Error::Corrupt(format!("stored sync schema: {e}")))?,
        None => None,
    };
    match have {
        Some(v) if v == served.version as i64 => return Ok(()),
        // Never take a tenant's tables back to an older version.
        Some(v) if v > served.version as i64 => {
            return Err(Error::Retry("another instance serves a newer sync schema; reading it again".into()));
        }
        Some(_) => {}
        None => {
            if let Some(reason) = unfit_tenant(tenant) {
                return Err(Error::Config(reason));
            }
            // A schema of that name made by someone else (an ERP's own, `public`) is not
            // taken over: its tables would be captured and synced.
            let taken: bool =
                tx.query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&tenant])?.get(0);
            if taken {
                return Err(Error::Config(format!(
                    "tenant {tenant:?}: a PostgreSQL schema of that name exists and was not made by driftless"
                )));
            }
        }
    }
    let schema = quote(tenant);
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}._driftless_conflicts (
            tbl          text NOT NULL,
            key          text NOT NULL,
            col          text NOT NULL,
            policy       text NOT NULL,
            needs_review boolean NOT NULL,
            shown        text,
            others       text NOT NULL,
            pkh          bytea NOT NULL, -- SHA-256 of the encoded key
            PRIMARY KEY (tbl, pkh, col)
         );"
    ))?;
    for table in &served.schema.tables {
        let columns: Vec<String> = tx
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&tenant, &table.name],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<_> = table.columns.iter().filter(|c| !columns.contains(&c.name)).collect();
        let name = real(tenant, &table.name);
        if columns.is_empty() {
            let mut defs: Vec<String> = table.columns.iter().map(column_def).collect();
            defs.push(format!("PRIMARY KEY ({})", table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")));
            tx.batch_execute(&format!("CREATE TABLE {name} (\n  {}\n)", defs.join(",\n  ")))?;
        } else {
            for c in &missing {
                tx.batch_execute(&format!("ALTER TABLE {name} ADD COLUMN {}", column_def(c)))?;
            }
        }
        let journal = install_capture(tx, tenant, table)?;
        if let Some(adopted) = Adopted::of(table, &columns, before.as_ref().and_then(|b| b.table(&table.name))) {
            let names = mask_columns(tx, tenant, table)?;
            tx.batch_execute(&adopted.journal_sql(&journal, &name, table, &names, crate::storage::common::now_ms()))?;
        }
        if columns.is_empty() || !missing.is_empty() {
            refill(tx, limits, tenant, table, (!columns.is_empty()).then_some(&missing[..]))?;
        }
    }
    tx.execute(
        "INSERT INTO driftless.gw_tenant_tables(tenant, version) VALUES ($1, $2)
         ON CONFLICT (tenant) DO UPDATE SET version = excluded.version",
        &[&tenant, &(served.version as i64)],
    )?;
    Ok(())
}

fn column_def(c: &driftless_core::SchemaColumn) -> String {
    let mut def = format!("{} {}", quote(&c.name), values::type_name(c.ty));
    if !c.nullable {
        def.push_str(" NOT NULL");
    }
    if let Some(d) = &c.default {
        def.push_str(" DEFAULT ");
        def.push_str(&literal(d));
    }
    def
}

/// The non-key columns of a real table in the order they were added to it: a change mask's
/// bit keeps naming the same column across schema versions.
pub(super) fn mask_columns(tx: &mut Transaction<'_>, tenant: &str, table: &SchemaTable) -> Result<Vec<String>> {
    let rows = tx.query(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2
         ORDER BY ordinal_position",
        &[&tenant, &table.name],
    )?;
    Ok(rows.into_iter().map(|r| r.get::<_, String>(0)).filter(|n| !table.is_key(n)).collect())
}

/// Creates (again) the journal and capture triggers of a real table; returns the journal.
fn install_capture(tx: &mut Transaction<'_>, tenant: &str, table: &SchemaTable) -> Result<String> {
    let id: i64 = tx
        .query_one(
            "INSERT INTO driftless.gw_journals(tenant, tbl) VALUES ($1, $2)
             ON CONFLICT (tenant, tbl) DO UPDATE SET tbl = excluded.tbl RETURNING id",
            &[&tenant, &table.name],
        )?
        .get(0);
    let journal = journal(tenant, id);
    let base = real(tenant, &table.name);
    let key_defs: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("k{i} {}", values::type_name(table.column(k).map_or(ColumnType::Text, |c| c.ty))))
        .collect();
    let slots: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {journal} (seq bigserial PRIMARY KEY, {}, role text, mask bigint, at_ms bigint NOT NULL)",
        key_defs.join(", ")
    ))?;
    let of = |row: &str| table.key.iter().map(|k| format!("{row}.{}", quote(k))).collect::<Vec<_>>().join(", ");
    // Bit-exact comparisons: -0.0 and 0.0 are equal to `=` but not the same value.
    let differs = |c: &str| match table.column(c).map(|c| c.ty) {
        Some(ColumnType::Real) => format!("float8send(OLD.{0}) IS DISTINCT FROM float8send(NEW.{0})", quote(c)),
        _ => format!("OLD.{0} IS DISTINCT FROM NEW.{0}", quote(c)),
    };
    let changed_key = table.key.iter().map(|k| differs(k)).collect::<Vec<_>>().join(" OR ");
    let plain = mask_columns(tx, tenant, table)?;
    let mask = if plain.is_empty() {
        "0".to_owned()
    } else if plain.len() > MASK_BITS {
        "NULL".to_owned()
    } else {
        plain
            .iter()
            .enumerate()
            .map(|(i, c)| format!("(CASE WHEN {} THEN {} ELSE 0 END)", differs(c), 1i64 << i))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let into = format!("INSERT INTO {journal}({}, role, mask, at_ms)", slots.join(", "));
    let function = format!("{}.{}", quote(tenant), quote(&format!("_driftless_capture_{id}")));
    let guard = format!("{}.{}", quote(tenant), quote("_driftless_guard"));
    let notify = format!("{}.{}", quote(tenant), quote("_driftless_notify"));
    let refuse = format!("{}.{}", quote(tenant), quote("_driftless_no_truncate"));
    let tenant_text = format!("'{}'", tenant.replace('\'', "''"));
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF coalesce(current_setting('driftless.gateway', true), '') <> 'on' THEN
             PERFORM pg_advisory_xact_lock_shared({LOCK_SPACE}, hashtext({tenant_text}));
           END IF;
           RETURN NULL;
         END $f$;
         CREATE OR REPLACE FUNCTION {refuse}() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF NOT {own} THEN
             RAISE EXCEPTION 'driftless: TRUNCATE is not captured; delete rows with DELETE so devices see it';
           END IF;
           RETURN NULL;
         END $f$;
         CREATE OR REPLACE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF NOT {own} THEN
             PERFORM pg_notify('{CHANNEL}', {tenant_text});
           END IF;
           RETURN NULL;
         END $f$;
         CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $f$
         DECLARE
           r text := nullif(current_setting('driftless.role', true), '');
           now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
         BEGIN
           IF {own} THEN RETURN NULL; END IF;
           IF TG_OP = 'INSERT' THEN
             {into} VALUES ({new}, r, NULL, now_ms);
           ELSIF TG_OP = 'UPDATE' THEN
             IF {changed_key} THEN
               {into} VALUES ({old}, r, NULL, now_ms);
               {into} VALUES ({new}, r, NULL, now_ms);
             ELSE
               {into} VALUES ({new}, r, {mask}, now_ms);
             END IF;
           ELSE
             {into} VALUES ({old}, r, NULL, now_ms);
           END IF;
           RETURN NULL;
         END $f$;
         DROP TRIGGER IF EXISTS _driftless_guard ON {base};
         CREATE TRIGGER _driftless_guard BEFORE INSERT OR UPDATE OR DELETE ON {base}
           FOR EACH STATEMENT EXECUTE FUNCTION {guard}();
         DROP TRIGGER IF EXISTS _driftless_truncate ON {base};
         CREATE TRIGGER _driftless_truncate BEFORE TRUNCATE ON {base}
           FOR EACH STATEMENT EXECUTE FUNCTION {refuse}();
         DROP TRIGGER IF EXISTS _driftless_capture ON {base};
         CREATE TRIGGER _driftless_capture AFTER INSERT OR UPDATE OR DELETE ON {base}
           FOR EACH ROW EXECUTE FUNCTION {function}();
         DROP TRIGGER IF EXISTS _driftless_notify ON {base};
         CREATE TRIGGER _driftless_notify AFTER INSERT OR UPDATE OR DELETE ON {base}
           FOR EACH STATEMENT EXECUTE FUNCTION {notify}();",
        new = of("NEW"),
        old = of("OLD"),
        // The gateway's own statement; a user's trigger reacting to it (depth 2) is captured.
        own = "(coalesce(current_setting('driftless.gateway', true), '') = 'on' AND pg_trigger_depth() = 1)",
    ))?;
    Ok(journal)
}

/// Writes every stored row of `table` into its real table (a new table), or the values of
/// the columns `only` (columns just added).
fn refill(
    tx: &mut Transaction<'_>,
    limits: &Limits,
    tenant: &str,
    table: &SchemaTable,
    only: Option<&[&driftless_core::SchemaColumn]>,
) -> Result<()> {
    let stored =
        tx.query("SELECT state FROM driftless.gw_rows WHERE tenant = $1 AND tbl = $2", &[&tenant, &table.name])?;
    for r in stored {
        let bytes: Vec<u8> = r.get(0);
        let mut b = decode_payload(&bytes, limits).map_err(|e| Error::Corrupt(format!("stored row: {e}")))?;
        let row = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
        let Some(only) = only else {
            write_row(tx, tenant, table, &row, &b.roles)?;
            continue;
        };
        let Some(values) = row_values(&row.state, &table.spec(), &b.roles) else { continue };
        for (column, value) in values.iter().filter(|(c, _)| only.iter().any(|o| &o.name == c)) {
            let matches: Vec<String> =
                table.key.iter().enumerate().map(|(i, k)| format!("{} = ${}", quote(k), i + 2)).collect();
            let sql = format!(
                "UPDATE {} SET {} = $1 WHERE {}",
                real(tenant, &table.name),
                quote(column),
                matches.join(" AND ")
            );
            let all: Vec<Value> = std::iter::once(value.clone()).chain(row.pk.iter().cloned()).collect();
            let p = params(&all);
            tx.execute(&sql, &refs(&p))?;
        }
    }
    Ok(())
}

/// Shows `row`'s merged state in its real table (deleting it there if it is deleted), and
/// its conflicts in the conflicts table.
pub(super) fn write_row(
    tx: &mut Transaction<'_>,
    tenant: &str,
    table: &SchemaTable,
    row: &RowChange,
    roles: &BTreeMap<NodeId, String>,
) -> Result<()> {
    let name = real(tenant, &table.name);
    let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
    match row_values(&row.state, &table.spec(), roles) {
        None => {
            let matches: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("{k} = ${}", i + 1)).collect();
            let p = params(&row.pk);
            tx.execute(&format!("DELETE FROM {name} WHERE {}", matches.join(" AND ")), &refs(&p))?;
        }
        Some(shown) => {
            let (sql, all) = upsert(&name, table, row, shown, |i| format!("${i}"));
            let p = params(&all);
            tx.execute(&sql, &refs(&p))?;
        }
    }
    let conflicts = format!("{}._driftless_conflicts", quote(tenant));
    let pkh = key_hash(&encode_key(&row.pk));
    tx.execute(&format!("DELETE FROM {conflicts} WHERE tbl = $1 AND pkh = $2"), &[&table.name, &pkh])?;
    for c in conflict_rows(table, row, roles) {
        tx.execute(
            &format!(
                "INSERT INTO {conflicts}(tbl, key, col, policy, needs_review, shown, others, pkh)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            &[&table.name, &c.key, &c.col, &c.policy, &c.needs_review, &c.shown, &c.others, &pkh],
        )?;
    }
    Ok(())
}

/// The non-key columns of the real table's row, in declaration order, if it exists.
pub(super) fn read_row(
    tx: &mut Transaction<'_>,
    tenant: &str,
    table: &SchemaTable,
    pk: &[Value],
) -> Result<Option<Vec<Value>>> {
    let cols: Vec<String> = table.columns.iter().filter(|c| !table.is_key(&c.name)).map(|c| quote(&c.name)).collect();
    let matches: Vec<String> =
        table.key.iter().enumerate().map(|(i, k)| format!("{} = ${}", quote(k), i + 1)).collect();
    let select = if cols.is_empty() { "1".to_owned() } else { cols.join(", ") };
    let sql = format!("SELECT {select} FROM {} WHERE {}", real(tenant, &table.name), matches.join(" AND "));
    let p = params(pk);
    let Some(row) = tx.query_opt(&sql, &refs(&p))? else { return Ok(None) };
    if cols.is_empty() {
        return Ok(Some(Vec::new()));
    }
    Ok(Some((0..cols.len()).map(|i| row.try_get::<_, Read>(i).map(|r| r.0)).collect::<Result<_, _>>()?))
}

/// The non-key columns of the real table's rows with the keys `pks` (in declaration order),
/// by encoded key, for those that exist; one statement.
pub(super) fn read_rows(
    tx: &mut Transaction<'_>,
    tenant: &str,
    table: &SchemaTable,
    pks: &[&[Value]],
) -> Result<HashMap<Vec<u8>, Vec<Value>>> {
    let mut found = HashMap::new();
    if pks.is_empty() {
        return Ok(found);
    }
    // One array per key column, of the column's type.
    let mut arrays: Vec<Box<dyn ToSql + Sync>> = Vec::new();
    let mut casts = Vec::new();
    for (i, k) in table.key.iter().enumerate() {
        let ty = table.column(k).map_or(ColumnType::Text, |c| c.ty);
        let column: Option<Box<dyn ToSql + Sync>> = match ty {
            ColumnType::Integer => pks
                .iter()
                .map(|pk| match pk.get(i) {
                    Some(Value::Integer(v)) => Some(*v),
                    _ => None,
                })
                .collect::<Option<Vec<i64>>>()
                .map(|v| Box::new(v) as Box<dyn ToSql + Sync>),
            ColumnType::Text => pks
                .iter()
                .map(|pk| match pk.get(i) {
                    Some(Value::Text(v)) => Some(v.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<String>>>()
                .map(|v| Box::new(v) as Box<dyn ToSql + Sync>),
            ColumnType::Blob => pks
                .iter()
                .map(|pk| match pk.get(i) {
                    Some(Value::Blob(v)) => Some(v.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<Vec<u8>>>>()
                .map(|v| Box::new(v) as Box<dyn ToSql + Sync>),
            _ => None,
        };
        let Some(column) = column else {
            // A key value of another kind than its column (never from a journal of ours):
            // one row at a time.
            for pk in pks {
                if let Some(values) = read_row(tx, tenant, table, pk)? {
                    found.insert(encode_key(pk), values);
                }
            }
            return Ok(found);
        };
        arrays.push(column);
        casts.push(format!("${}::{}[]", i + 1, values::type_name(ty)));
    }
    let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
    let slots: Vec<String> = (0..keys.len()).map(|i| format!("c{i}")).collect();
    let on: Vec<String> = keys.iter().zip(&slots).map(|(k, s)| format!("r.{k} = u.{s}")).collect();
    let cols: Vec<String> =
        table.columns.iter().filter(|c| !table.is_key(&c.name)).map(|c| format!("r.{}", quote(&c.name))).collect();
    let select: Vec<String> = keys.iter().map(|k| format!("r.{k}")).chain(cols.iter().cloned()).collect();
    let sql = format!(
        "SELECT {} FROM {} r JOIN unnest({}) AS u({}) ON {}",
        select.join(", "),
        real(tenant, &table.name),
        casts.join(", "),
        slots.join(", "),
        on.join(" AND ")
    );
    let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a.as_ref()).collect();
    let n = keys.len();
    for r in tx.query(&sql, &params)? {
        let pk = (0..n).map(|i| r.try_get::<_, Read>(i).map(|v| v.0)).collect::<Result<Vec<_>, _>>()?;
        let values = (n..n + cols.len()).map(|i| r.try_get::<_, Read>(i).map(|v| v.0)).collect::<Result<_, _>>()?;
        found.insert(encode_key(&pk), values);
    }
    Ok(found)
}

/// Whether the real table's row (`current`: its non-key values in declaration order, `None`
/// if absent) already shows `row` as merged, so writing it would change nothing.
pub(super) fn shows(
    table: &SchemaTable,
    row: &RowChange,
    roles: &BTreeMap<NodeId, String>,
    current: Option<&Vec<Value>>,
) -> bool {
    let shown = row_values(&row.state, &table.spec(), roles);
    let (Some(shown), Some(current)) = (shown, current) else {
        return false;
    };
    let shown = crate::storage::shown::shown_columns(table, shown);
    shown.len() == current.len() && shown.iter().zip(current).all(|((_, v), now)| v == now)
}

/// The journal entries of one table, oldest first: key, role, mask, when.
pub(super) type Entry = (Vec<Value>, Option<String>, Option<i64>, Option<i64>);

/// The entries and the last position read.
pub(super) fn read_journal(
    tx: &mut Transaction<'_>,
    tenant: &str,
    id: i64,
    key_len: usize,
) -> Result<(Vec<Entry>, i64)> {
    let slots: Vec<String> = (0..key_len).map(|i| format!("k{i}")).collect();
    let sql = format!("SELECT {}, role, mask, at_ms, seq FROM {} ORDER BY seq", slots.join(", "), journal(tenant, id));
    let rows = tx.query(&sql, &[])?;
    let mut last = 0;
    let entries = rows
        .into_iter()
        .map(|r| {
            let pk = (0..key_len).map(|i| r.try_get::<_, Read>(i).map(|v| v.0)).collect::<Result<Vec<_>, _>>()?;
            last = r.try_get(key_len + 3)?;
            Ok((pk, r.try_get(key_len)?, r.try_get(key_len + 1)?, r.try_get(key_len + 2)?))
        })
        .collect::<Result<_>>()?;
    Ok((entries, last))
}

/// Forgets the entries up to `last`, all read and taken in (never one written since).
pub(super) fn clear_journal(tx: &mut Transaction<'_>, tenant: &str, id: i64, last: i64) -> Result<()> {
    tx.execute(&format!("DELETE FROM {} WHERE seq <= $1", journal(tenant, id)), &[&last])?;
    Ok(())
}

/// A row's key as the gateway's tables index it: the SHA-256 of its encoding.
pub(super) fn key_hash(key: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(key).to_vec()
}

/// Whether any of the tenant's journals holds an entry (one round trip).
pub(super) fn pending(tx: &mut Transaction<'_>, tenant: &str, journals: &BTreeMap<String, i64>) -> Result<bool> {
    if journals.is_empty() {
        return Ok(false);
    }
    let any: Vec<String> =
        journals.values().map(|id| format!("EXISTS (SELECT 1 FROM {})", journal(tenant, *id))).collect();
    Ok(tx.query_one(&format!("SELECT {}", any.join(" OR ")), &[])?.get(0))
}
