//! Tracking and untracking tables.

use rusqlite::Connection;

use super::catalog::{AppColumn, Catalog, PK_SEPARATOR, TableInfo, ident, is_untyped, key_not_null};
use super::{Inner, capture, reconcile};
use crate::codec::Interner;
use crate::error::{Error, Result};
use crate::policy::{ColumnPolicy, TableSpec};

/// One column as SQLite describes it.
#[derive(Debug)]
pub(crate) struct ColumnDesc {
    pub(crate) name: String,
    pub(crate) decl_type: String,
    /// Position in the primary key (1-based), 0 if not part of it.
    pub(crate) pk: i64,
}

pub(crate) fn describe(conn: &Connection, table: &str) -> Result<(Vec<ColumnDesc>, bool)> {
    let exists: Option<bool> = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main' AND type = 'table'",
            [table],
            |r| r.get(0),
        )
        .ok();
    let Some(without_rowid) = exists else {
        return Err(Error::NoSuchTable(table.to_owned()));
    };
    let mut stmt = conn.prepare("SELECT name, type, pk FROM pragma_table_xinfo(?1) WHERE hidden = 0 ORDER BY cid")?;
    let cols = stmt
        .query_map([table], |r| Ok(ColumnDesc { name: r.get(0)?, decl_type: r.get(1)?, pk: r.get(2)? }))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((cols, without_rowid))
}

/// Checks the table's key and the spec, returning the key columns in key order.
fn validate(table: &str, cols: &[ColumnDesc], without_rowid: bool, spec: &TableSpec) -> Result<Vec<String>> {
    let mut pk: Vec<&ColumnDesc> = cols.iter().filter(|c| c.pk > 0).collect();
    pk.sort_by_key(|c| c.pk);
    if pk.is_empty() {
        return Err(Error::NoPrimaryKey(table.to_owned()));
    }
    if pk.len() == 1 && !without_rowid && pk[0].decl_type.eq_ignore_ascii_case("INTEGER") {
        return Err(Error::RowidPrimaryKey { table: table.to_owned(), column: pk[0].name.clone() });
    }
    for (column, policy) in &spec.columns {
        let Some(desc) = cols.iter().find(|c| &c.name == column) else {
            return Err(Error::NoSuchColumn { table: table.to_owned(), column: column.clone() });
        };
        if desc.pk > 0 {
            return Err(Error::BadSpec {
                table: table.to_owned(),
                detail: format!("key column {column:?} cannot have a policy"),
            });
        }
        if let ColumnPolicy::Authority(roles) = policy
            && roles.is_empty()
        {
            return Err(Error::BadSpec {
                table: table.to_owned(),
                detail: format!("authority policy of {column:?} names no role"),
            });
        }
    }
    if pk.len() > crate::codec::Limits::default().max_key_values {
        return Err(Error::BadSpec { table: table.to_owned(), detail: "too many key columns".into() });
    }
    Ok(pk.into_iter().map(|c| c.name.clone()).collect())
}

/// What tracking a table changed, beyond the table itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracked {
    /// Remote changes to this table were skipped before (it was not tracked, did not accept
    /// them, or lacked a column), so the replica must fetch the current state again.
    pub(crate) needs_bootstrap: bool,
}

pub(crate) fn track(conn: &Connection, inner: &mut Inner, table: &str, spec: TableSpec) -> Result<Tracked> {
    if table.starts_with("_driftless_") || table.contains(PK_SEPARATOR) {
        return Err(Error::BadTableName(table.to_owned()));
    }
    let (cols, without_rowid) = describe(conn, table)?;
    let pk = validate(table, &cols, without_rowid, &spec)?;
    let null_keys: bool = conn.query_row(
        &format!(
            "SELECT EXISTS(SELECT 1 FROM {} WHERE {})",
            ident(table),
            pk.iter().map(|c| format!("{} IS NULL", ident(c))).collect::<Vec<_>>().join(" OR ")
        ),
        [],
        |r| r.get(0),
    )?;
    if null_keys {
        return Err(Error::BadSpec { table: table.to_owned(), detail: "some rows have a NULL primary key".into() });
    }
    let existing = inner.catalog.by_name(table);
    let before = existing.map(|t| inner.catalog.tables[t].clone());
    let (id, mut columns) = match &before {
        Some(old) => {
            if old.pk != pk {
                return Err(Error::SchemaChanged { table: table.to_owned(), detail: "the primary key changed".into() });
            }
            if let Some(gone) = old.app.iter().find(|a| !cols.iter().any(|c| c.name == a.name)) {
                return Err(Error::SchemaChanged {
                    table: table.to_owned(),
                    detail: format!("column {:?} was removed", gone.name),
                });
            }
            // Entries already journaled stay; sealing them is the sync layer's job (it first
            // makes sure this store's node id is still its own).
            capture::drop_triggers(conn, old)?;
            (old.id, old.columns.clone())
        }
        None => {
            conn.execute(
                "INSERT INTO _driftless_tables(name, pk, spec) VALUES (?1, ?2, '{}')",
                rusqlite::params![table, pk.join(&PK_SEPARATOR.to_string())],
            )?;
            (conn.last_insert_rowid(), Interner::default())
        }
    };
    let app: Vec<AppColumn> = cols
        .iter()
        .filter(|c| c.pk == 0)
        .map(|c| AppColumn {
            idx: columns.intern(&c.name),
            counter: matches!(spec.policy(&c.name), ColumnPolicy::Counter),
            untyped: is_untyped(&c.decl_type),
            name: c.name.clone(),
        })
        .collect();
    let spec_json =
        serde_json::to_string(&spec).map_err(|e| Error::BadSpec { table: table.to_owned(), detail: e.to_string() })?;
    conn.execute(
        "UPDATE _driftless_tables SET spec = ?2, tracked = 1 WHERE id = ?1",
        rusqlite::params![id, spec_json],
    )?;
    conn.execute("DELETE FROM _driftless_columns WHERE tbl = ?1", [id])?;
    let mut stmt = conn.prepare("INSERT INTO _driftless_columns(tbl, idx, name, in_app) VALUES (?1, ?2, ?3, ?4)")?;
    for (idx, name) in columns.keys().iter().enumerate() {
        let in_app = app.iter().any(|a| &a.name == name);
        stmt.execute(rusqlite::params![id, idx as i64, name, in_app])?;
    }
    let persisted_columns = columns.len();
    let key_not_null = key_not_null(conn, table)?;
    let journal = before.as_ref().is_some_and(|old| old.journal);
    let info = TableInfo {
        id,
        name: table.to_owned(),
        spec,
        pk,
        columns,
        persisted_columns,
        app,
        key_not_null,
        tracked: true,
        journal,
        sql: Default::default(),
    };
    // (Untracked meanwhile, the app's rows may have been edited but remote changes were not
    // shown: every column it had still counts as shown, edits made meanwhile are local writes.)
    let was_shown: Vec<String> =
        before.as_ref().map_or(Vec::new(), |old| old.app.iter().map(|c| c.name.clone()).collect());
    let newly_shown: Vec<String> =
        info.app.iter().filter(|c| !was_shown.contains(&c.name)).map(|c| c.name.clone()).collect();
    let needs_bootstrap = match &before {
        None => true,
        Some(old) => !old.tracked || old.spec.direction != info.spec.direction || !newly_shown.is_empty(),
    };
    inner.catalog.insert(info);
    let t = inner.catalog.by_name(table).ok_or_else(|| Error::NotTracked(table.to_owned()))?;
    let diffs = reconcile::reconcile(conn, inner, t, &newly_shown)?;
    let info = &mut inner.catalog.tables[t];
    if info.captures() {
        capture::install(conn, info)?;
        info.journal = true;
        capture::journal_rows(conn, info, &diffs)?;
    }
    inner.checked_schema = -1;
    Ok(Tracked { needs_bootstrap })
}

/// Stops capturing `table` and applying remote changes to it. Its sync metadata stays: unsent
/// changes still ship, and tracking it again reissues nothing already synced.
pub(crate) fn untrack(conn: &Connection, inner: &mut Inner, table: &str) -> Result<()> {
    let t = inner.catalog.by_name(table).ok_or_else(|| Error::NotTracked(table.to_owned()))?;
    if !inner.catalog.tables[t].tracked {
        return Err(Error::NotTracked(table.to_owned()));
    }
    let info = inner.catalog.tables[t].clone();
    capture::drop_triggers(conn, &info)?;
    // Writes journaled before untracking are the app's: they stay and are sealed and shipped
    // by the next seal, like any other.
    if info.journal && capture::journaled_rows(conn, &info)? == 0 {
        capture::drop_journal(conn, &info)?;
    }
    conn.execute("UPDATE _driftless_tables SET tracked = 0 WHERE id = ?1", [info.id])?;
    inner.catalog = Catalog::load(conn)?;
    Ok(())
}

/// Whether the app table still has every column the catalog captures (false if it is gone).
pub(crate) fn columns_still_there(conn: &Connection, info: &TableInfo) -> Result<bool> {
    match describe(conn, &info.name) {
        Ok((cols, _)) => Ok(info.app.iter().all(|a| cols.iter().any(|c| c.name == a.name))
            && info.pk.iter().all(|k| cols.iter().any(|c| &c.name == k))),
        Err(Error::NoSuchTable(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses to seal when a tracked table changed shape since it was tracked, rather than
/// silently ignoring a new column. Cheap when nothing changed: one pragma read.
pub(crate) fn check_schema(conn: &Connection, inner: &mut Inner) -> Result<()> {
    let version: i64 = conn.prepare_cached("PRAGMA schema_version")?.query_row([], |r| r.get(0))?;
    if version == inner.checked_schema {
        return Ok(());
    }
    for info in inner.catalog.tables.iter().filter(|t| t.tracked) {
        let (cols, _) = describe(conn, &info.name).map_err(|e| match e {
            Error::NoSuchTable(t) => Error::SchemaChanged { table: t, detail: "the table was dropped".into() },
            other => other,
        })?;
        let fields: Vec<&str> = cols.iter().filter(|c| c.pk == 0).map(|c| c.name.as_str()).collect();
        let tracked: Vec<&str> = info.app.iter().map(|c| c.name.as_str()).collect();
        if let Some(new) = fields.iter().find(|c| !tracked.contains(c)) {
            return Err(Error::SchemaChanged {
                table: info.name.clone(),
                detail: format!("new column {new:?} is not captured yet"),
            });
        }
        if let Some(gone) = tracked.iter().find(|c| !fields.contains(c)) {
            return Err(Error::SchemaChanged {
                table: info.name.clone(),
                detail: format!("column {gone:?} was removed"),
            });
        }
    }
    inner.checked_schema = version;
    Ok(())
}
