//! The statements that write a tracked table's app rows as merges resolve them, built once
//! per table and set of columns: a remote batch writes thousands of rows through the same
//! few, and building each statement's text again for every row cost more than running it.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use super::catalog::{TableInfo, ident};

/// A table's statements, built on first use. Kept in its [`TableInfo`], which is replaced
/// whenever the table is tracked again (its columns may differ), so it never outlives them.
#[derive(Debug, Default)]
pub(crate) struct RowSql {
    /// Upserts by the app columns they set (positions in `TableInfo::app`).
    upserts: RefCell<HashMap<Vec<u32>, Arc<str>>>,
    delete: OnceCell<Arc<str>>,
    forget: OnceCell<Arc<str>>,
    seal: OnceCell<Arc<str>>,
}

impl Clone for RowSql {
    /// A copy starts empty: the statements are built again on first use.
    fn clone(&self) -> RowSql {
        RowSql::default()
    }
}

impl RowSql {
    /// `INSERT ... ON CONFLICT (key) DO UPDATE` setting the app columns at `cols`, with the
    /// key values first (`?1`..) and the columns' values after them, in that order.
    pub(crate) fn upsert(&self, info: &TableInfo, cols: &[u32]) -> Arc<str> {
        if let Some(sql) = self.upserts.borrow().get(cols) {
            return sql.clone();
        }
        let names: Vec<String> = cols.iter().map(|&c| ident(&info.app[c as usize].name)).collect();
        let sql: Arc<str> = upsert_sql(info, &names).into();
        self.upserts.borrow_mut().insert(cols.to_vec(), sql.clone());
        sql
    }

    /// `DELETE` of the app row with the key values `?1`...
    pub(crate) fn delete(&self, info: &TableInfo) -> Arc<str> {
        self.delete
            .get_or_init(|| format!("DELETE FROM {} WHERE {}", ident(&info.name), key_match(&info.pk)).into())
            .clone()
    }

    /// `DELETE` of the capture journal's entries for the key values `?1`...
    pub(crate) fn forget(&self, info: &TableInfo) -> Arc<str> {
        self.forget
            .get_or_init(|| {
                let keys: Vec<String> = (0..info.pk.len()).map(|i| format!("k{i} = ?{}", i + 1)).collect();
                format!("DELETE FROM {} WHERE {}", ident(&info.pending_table()), keys.join(" AND ")).into()
            })
            .clone()
    }

    /// The query that reads the capture journal joined with the current rows (see
    /// [`super::capture::seal_query`]); every transaction that applies runs it.
    pub(crate) fn seal(&self, info: &TableInfo) -> Arc<str> {
        self.seal.get_or_init(|| super::capture::seal_query(info).into()).clone()
    }
}

/// `"a" = ?1 AND "b" = ?2` for the key columns.
fn key_match(pk: &[String]) -> String {
    let parts: Vec<String> = pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", ident(c), i + 1)).collect();
    parts.join(" AND ")
}

fn upsert_sql(info: &TableInfo, cols: &[String]) -> String {
    let keys: Vec<String> = info.pk.iter().map(|c| ident(c)).collect();
    let names: Vec<&str> = keys.iter().chain(cols).map(String::as_str).collect();
    let slots: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
    let action = if cols.is_empty() {
        "NOTHING".to_owned()
    } else {
        let sets: Vec<String> = cols.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        format!("UPDATE SET {}", sets.join(", "))
    };
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
        ident(&info.name),
        names.join(", "),
        slots.join(", "),
        keys.join(", ")
    )
}
