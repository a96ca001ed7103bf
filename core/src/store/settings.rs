//! Rows of `_driftless_state`: the store's own settings and the sync layer's state, by key.

use rusqlite::{Connection, OptionalExtension, ToSql};

use crate::error::Result;

/// The value under `key`, as text.
pub(crate) fn get(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT CAST(value AS TEXT) FROM _driftless_state WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, String>(0))
        .optional()?)
}

pub(crate) fn set(conn: &Connection, key: &str, value: &dyn ToSql) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO _driftless_state(key, value) VALUES (?1, ?2)")?
        .execute(rusqlite::params![key, value])?;
    Ok(())
}

pub(crate) fn delete(conn: &Connection, keys: &[&str]) -> Result<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM _driftless_state WHERE key = ?1")?;
    for key in keys {
        stmt.execute([key])?;
    }
    Ok(())
}
