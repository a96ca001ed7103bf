//! What the store knows about tracked tables, loaded once and kept in memory.

use std::collections::HashMap;

use rusqlite::Connection;

use crate::codec::Interner;
use crate::error::{Error, Result};
use crate::policy::{ColumnPolicy, Direction, TableSpec};

/// Separates key column names in `_driftless_tables.pk`; cannot appear in a sane identifier.
pub(crate) const PK_SEPARATOR: char = '\u{1f}';

/// A column of the app's table that triggers capture.
#[derive(Debug, Clone)]
pub(crate) struct AppColumn {
    pub(crate) name: String,
    /// The column's index in the table's column dictionary, and its bit in the change mask.
    pub(crate) idx: u64,
    pub(crate) counter: bool,
    /// Declared type has no affinity, so 1 and 1.0 are different values worth capturing.
    pub(crate) untyped: bool,
}

/// A tracked table.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) spec: TableSpec,
    pub(crate) pk: Vec<String>,
    /// Every column name ever seen for this table, by stable index.
    pub(crate) columns: Interner<String>,
    /// How many of `columns` are already written to `_driftless_columns`.
    pub(crate) persisted_columns: usize,
    /// Columns of the app table, in the table's order, excluding the key.
    pub(crate) app: Vec<AppColumn>,
    /// Every key column is declared NOT NULL (or the table is WITHOUT ROWID), so the capture
    /// triggers need no NULL-key guard.
    pub(crate) key_not_null: bool,
    /// False after `untrack`: the row states, unsent changes and column dictionary stay, so
    /// that unsent changes still ship and tracking again reissues nothing already synced.
    pub(crate) tracked: bool,
    /// The capture journal exists: always for a table that captures, and for a table no
    /// longer captured until the writes journaled before that are sealed.
    pub(crate) journal: bool,
    /// The statements that write its app rows, built on first use.
    pub(crate) sql: super::row_sql::RowSql,
}

impl TableInfo {
    /// Whether local writes to this table are captured and shipped.
    pub(crate) fn captures(&self) -> bool {
        self.tracked && self.spec.direction != Direction::DownOnly
    }

    /// Whether remote writes to this table are applied.
    pub(crate) fn accepts(&self) -> bool {
        self.tracked && self.spec.direction != Direction::UpOnly
    }

    /// How many 63-bit mask words the change journal needs.
    pub(crate) fn mask_words(&self) -> usize {
        let max = self.app.iter().map(|c| c.idx).max().unwrap_or(0);
        (max as usize) / 63 + 1
    }

    pub(crate) fn counter_columns(&self) -> impl Iterator<Item = &AppColumn> {
        self.app.iter().filter(|c| c.counter)
    }

    pub(crate) fn pending_table(&self) -> String {
        format!("_driftless_pending_{}", self.id)
    }
}

/// Every tracked table, by name.
#[derive(Debug, Default, Clone)]
pub(crate) struct Catalog {
    pub(crate) tables: Vec<TableInfo>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<i64, usize>,
}

impl Catalog {
    pub(crate) fn load(conn: &Connection) -> Result<Catalog> {
        let mut catalog = Catalog::default();
        let mut stmt = conn.prepare("SELECT id, name, pk, spec, tracked FROM _driftless_tables ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?;
        for row in rows {
            let (id, name, pk, spec, tracked) = row?;
            let spec: TableSpec =
                serde_json::from_str(&spec).map_err(|e| Error::Corrupt(format!("spec of {name}: {e}")))?;
            let mut columns = Interner::default();
            let mut in_app = Vec::new();
            let mut cols =
                conn.prepare_cached("SELECT idx, name, in_app FROM _driftless_columns WHERE tbl = ?1 ORDER BY idx")?;
            for col in
                cols.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?)))?
            {
                let (idx, col, app) = col?;
                if columns.intern(&col) != idx as u64 {
                    return Err(Error::Corrupt(format!("column indexes of {name} are not dense")));
                }
                if app {
                    in_app.push(col);
                }
            }
            let types = column_types(conn, &name)?;
            let pk: Vec<String> = pk.split(PK_SEPARATOR).map(str::to_owned).collect();
            let key_not_null = key_not_null(conn, &name)?;
            let app = in_app
                .into_iter()
                .map(|c| {
                    let idx = columns.intern(&c);
                    let untyped = types.get(&c).is_none_or(|t| is_untyped(t));
                    AppColumn { counter: matches!(spec.policy(&c), ColumnPolicy::Counter), name: c, idx, untyped }
                })
                .collect();
            let persisted_columns = columns.len();
            let journal: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [format!("_driftless_pending_{id}")],
                |r| r.get(0),
            )?;
            catalog.insert(TableInfo {
                id,
                name,
                spec,
                pk,
                columns,
                persisted_columns,
                app,
                key_not_null,
                tracked,
                journal,
                sql: Default::default(),
            });
        }
        Ok(catalog)
    }

    pub(crate) fn insert(&mut self, info: TableInfo) {
        if let Some(&i) = self.by_name.get(&info.name) {
            self.tables[i] = info;
            return;
        }
        self.by_name.insert(info.name.clone(), self.tables.len());
        self.by_id.insert(info.id, self.tables.len());
        self.tables.push(info);
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn by_id(&self, id: i64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }
}

/// Declared types of a table's columns (empty string for none).
fn column_types(conn: &Connection, table: &str) -> Result<HashMap<String, String>> {
    let mut stmt = conn.prepare("SELECT name, type FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether a declared type gives BLOB affinity (1 and 1.0 stay distinct values), by SQLite's
/// affinity rules (INT, then CHAR/CLOB/TEXT, then BLOB or no type), or is STRICT's ANY.
pub(crate) fn is_untyped(decl_type: &str) -> bool {
    let t = decl_type.to_ascii_uppercase();
    if t == "ANY" {
        return true;
    }
    if t.contains("INT") || t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        return false;
    }
    t.is_empty() || t.contains("BLOB")
}

/// Whether no key column of `table` can hold NULL (false for a table that no longer exists).
pub(crate) fn key_not_null(conn: &Connection, table: &str) -> Result<bool> {
    use rusqlite::OptionalExtension;
    let without_rowid: Option<bool> = conn
        .query_row("SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main'", [table], |r| r.get(0))
        .optional()?;
    let Some(without_rowid) = without_rowid else { return Ok(false) };
    let nullable_keys: i64 =
        conn.query_row("SELECT count(*) FROM pragma_table_info(?1) WHERE pk > 0 AND \"notnull\" = 0", [table], |r| {
            r.get(0)
        })?;
    Ok(without_rowid || nullable_keys == 0)
}

/// Writes dictionary entries added since the last save.
pub(crate) fn persist_columns(conn: &Connection, info: &mut TableInfo) -> Result<()> {
    if info.columns.len() == info.persisted_columns {
        return Ok(());
    }
    let mut stmt =
        conn.prepare_cached("INSERT INTO _driftless_columns(tbl, idx, name, in_app) VALUES (?1, ?2, ?3, 0)")?;
    for (idx, name) in info.columns.keys().iter().enumerate().skip(info.persisted_columns) {
        stmt.execute(rusqlite::params![info.id, idx as i64, name])?;
    }
    info.persisted_columns = info.columns.len();
    Ok(())
}

/// Quotes an SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
