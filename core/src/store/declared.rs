//! Following the declared sync schema: creating the tables it declares, adding the columns a
//! later version adds, and tracking each table with the spec it declares. A local table that
//! contradicts the schema (another key, a column of another type, a column the schema does not
//! have) is an error naming the difference: it would otherwise diverge without a word.

use rusqlite::Connection;

use super::{Inner, cursor, settings, track};
use crate::error::{Error, Result};
use crate::policy::ColumnPolicy;
use crate::schema::{SchemaTable, SyncSchema};

/// What following a schema version did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaApplied {
    /// The version this store follows now.
    pub version: u64,
    /// Tables created.
    pub created: Vec<String>,
    /// Columns added to existing tables, as `(table, column)`.
    pub added: Vec<(String, String)>,
    /// Tables whose tracking started or changed.
    pub tracked: Vec<String>,
    /// Tables tracked before that the schema does not name: no longer synced.
    pub untracked: Vec<String>,
}

const VERSION_KEY: &str = "sync_schema_version";
const TEXT_KEY: &str = "sync_schema_text";

/// The schema version this store follows, and its text.
pub(crate) fn current(conn: &Connection) -> Result<Option<(u64, String)>> {
    let Some(version) = settings::get(conn, VERSION_KEY)? else { return Ok(None) };
    let version = version.parse().map_err(|_| Error::Corrupt(format!("stored schema version {version:?}")))?;
    Ok(Some((version, settings::get(conn, TEXT_KEY)?.unwrap_or_default())))
}

/// Brings the store's tables to `schema` (version `version`, from `text`). A version not newer
/// than the one followed changes nothing: versions only grow, and a late copy of an older one
/// must not undo a newer one.
pub(crate) fn apply(
    conn: &Connection,
    inner: &mut Inner,
    schema: &SyncSchema,
    version: u64,
    text: &str,
) -> Result<SchemaApplied> {
    let mut done = SchemaApplied { version, ..SchemaApplied::default() };
    if let Some((followed, _)) = current(conn)?
        && followed >= version
    {
        done.version = followed;
        return Ok(done);
    }
    let mut bootstrap = false;
    for table in &schema.tables {
        let added = match track::describe(conn, &table.name) {
            Err(Error::NoSuchTable(_)) => {
                conn.execute_batch(&table.sqlite_create())?;
                done.created.push(table.name.clone());
                Vec::new()
            }
            Err(e) => return Err(e),
            Ok((local, _)) => migrate(conn, table, &local)?,
        };
        let spec = table.spec();
        let before = inner.catalog.by_name(&table.name).map(|t| &inner.catalog.tables[t]);
        // A column synced so far as a counter keeps per-node totals, any other keeps values:
        // switching would count every value again as an increment, or drop the totals.
        if let Some(old) = before {
            for c in &table.columns {
                let was = matches!(old.spec.policy(&c.name), ColumnPolicy::Counter);
                if was != (c.policy == ColumnPolicy::Counter) && old.app.iter().any(|a| a.name == c.name) {
                    return Err(Error::SchemaMismatch {
                        table: table.name.clone(),
                        detail: format!(
                            "column {:?} is synced {} here; the schema makes it {}",
                            c.name,
                            if was { "as a counter" } else { "by value" },
                            if was { "a plain column" } else { "a counter" }
                        ),
                    });
                }
            }
        }
        let unchanged = before.is_some_and(|t| t.tracked && t.spec == spec);
        done.added.extend(added.iter().map(|c| (table.name.clone(), c.clone())));
        if unchanged && added.is_empty() {
            continue;
        }
        bootstrap |= track::track(conn, inner, &table.name, spec)?.needs_bootstrap;
        done.tracked.push(table.name.clone());
    }
    // Tables the schema does not name are the app's own: the gateway refuses their rows.
    let undeclared: Vec<String> = inner
        .catalog
        .tables
        .iter()
        .filter(|t| t.tracked && schema.table(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    for name in undeclared {
        track::untrack(conn, inner, &name)?;
        done.untracked.push(name);
    }
    if bootstrap {
        cursor::reset(conn)?;
    }
    settings::set(conn, VERSION_KEY, &version.to_string())?;
    settings::set(conn, TEXT_KEY, &text)?;
    Ok(done)
}

/// Checks an existing table against its declaration and adds the columns it lacks; returns
/// their names.
fn migrate(conn: &Connection, table: &SchemaTable, local: &[track::ColumnDesc]) -> Result<Vec<String>> {
    let mismatch = |detail: String| Error::SchemaMismatch { table: table.name.clone(), detail };
    let mut key: Vec<&track::ColumnDesc> = local.iter().filter(|c| c.pk > 0).collect();
    key.sort_by_key(|c| c.pk);
    let key: Vec<&str> = key.iter().map(|c| c.name.as_str()).collect();
    if key != table.key.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(mismatch(format!("its primary key is {key:?}; the schema declares {:?}", table.key)));
    }
    for c in local {
        let Some(declared) = table.column(&c.name) else {
            return Err(mismatch(format!("column {:?} is not in the sync schema", c.name)));
        };
        if !declared.ty.matches_sqlite(&c.decl_type) {
            return Err(mismatch(format!(
                "column {:?} is declared {:?} here; the schema says {}",
                c.name, c.decl_type, declared.ty
            )));
        }
    }
    let mut added = Vec::new();
    for c in table.columns.iter().filter(|c| !local.iter().any(|l| l.name == c.name)) {
        if !c.nullable && c.default.is_none() {
            return Err(mismatch(format!("column {:?} is missing, and NOT NULL without a default", c.name)));
        }
        conn.execute_batch(&table.sqlite_add_column(c))?;
        added.push(c.name.clone());
    }
    Ok(added)
}
