//! The change journal: pure-SQL triggers that record which rows and fields changed.
//!
//! Triggers use only built-in SQL, so a program that never links driftless, writing with its
//! own SQLite, is captured too, in the same transaction as its write. They record the key and
//! a bit per changed column into a per-table journal. Counter deltas are taken at seal time as
//! the difference between the row's value and the sum its causal state holds: trigger
//! arithmetic would count an `INSERT OR REPLACE` twice, because SQLite fires no delete
//! trigger for the replaced row unless the writing connection enabled recursive triggers.
//! The journal is append-only (a rowid table with no index): a trigger costs one program call
//! and one append, which is what keeps capture cheap. Sealing folds every entry of a row into
//! one change and reads the values then, so repeated edits between seals ship once.
//!
//! Each entry also records when the write happened (`julianday('now')`, built into every SQLite
//! and fixed for the whole statement), so a write sealed long after it was made still carries
//! its own time: last-writer-wins must compare when writes were made, not when an agent got
//! round to sealing them.

use rusqlite::Connection;

use super::catalog::{TableInfo, ident};
use crate::error::Result;
use crate::value::Value;

/// Column names inside the journal table.
fn key_col(i: usize) -> String {
    format!("k{i}")
}

fn mask_col(w: usize) -> String {
    format!("m{w}")
}

/// The journal column holding the write's time as a Julian day number (a REAL).
pub(crate) const TIME_COL: &str = "t";

/// SQLite's wall clock in the form `julianday` returns, converted to Unix milliseconds.
pub(crate) fn julian_to_unix_ms(julian: f64) -> Option<u64> {
    let ms = ((julian - 2_440_587.5) * 86_400_000.0).round();
    (ms.is_finite() && ms >= 0.0 && ms < u64::MAX as f64).then_some(ms as u64)
}

fn trigger(info: &TableInfo, what: &str) -> String {
    ident(&format!("_driftless_{}_{what}", info.id))
}

/// `NEW."a" IS OLD."a" AND ...` over the key columns.
fn same_key(info: &TableInfo) -> String {
    // BINARY: under a NOCASE key, 'abc' -> 'ABC' is a key change all the same.
    info.pk.iter().map(|c| format!("NEW.{0} IS OLD.{0} COLLATE BINARY", ident(c))).collect::<Vec<_>>().join(" AND ")
}

fn any_key_null(info: &TableInfo) -> String {
    info.pk.iter().map(|c| format!("NEW.{} IS NULL", ident(c))).collect::<Vec<_>>().join(" OR ")
}

/// An append to the journal for the row `row` (NEW or OLD) with the given mask words, stamped
/// with the statement's time.
fn journal_append(info: &TableInfo, row: &str, masks: &[String]) -> String {
    let mut cols: Vec<String> = (0..info.pk.len()).map(key_col).collect();
    let mut vals: Vec<String> = info.pk.iter().map(|c| format!("{row}.{}", ident(c))).collect();
    for (w, m) in masks.iter().enumerate() {
        cols.push(mask_col(w));
        vals.push(m.clone());
    }
    cols.push(TIME_COL.to_owned());
    vals.push("julianday()".to_owned());
    format!("INSERT INTO {} ({}) VALUES ({});", ident(&info.pending_table()), cols.join(", "), vals.join(", "))
}

/// Aborts a write that would give a row a NULL key (such a row could never be synced).
/// Empty when every key column is declared NOT NULL, so those tables pay nothing.
fn null_key_guard(info: &TableInfo) -> String {
    if info.key_not_null {
        return String::new();
    }
    format!(
        "SELECT RAISE(ABORT, 'driftless: the primary key of a tracked table must not be NULL') WHERE {};",
        any_key_null(info)
    )
}

/// Mask words with every captured column set (an insert writes all of them).
fn full_masks(info: &TableInfo) -> Vec<String> {
    let mut words = vec![0i64; info.mask_words()];
    for c in &info.app {
        words[(c.idx / 63) as usize] |= 1 << (c.idx % 63);
    }
    words.iter().map(i64::to_string).collect()
}

/// Mask words computed from which columns differ between OLD and NEW.
fn changed_masks(info: &TableInfo) -> Vec<String> {
    let mut words: Vec<Vec<String>> = vec![Vec::new(); info.mask_words()];
    for c in &info.app {
        let col = ident(&c.name);
        // Columns without type affinity keep 1 and 1.0 apart; `IS NOT` alone treats them equal.
        // They also keep -0.0 (a REAL column stores it as 0), which no built-in SQL function
        // tells from 0.0: a REAL zero is marked as possibly changed, and the seal compares the
        // actual bits with what the row showed before.
        // BINARY, not the column's collation: 'bob' -> 'Bob' under NOCASE is still a change.
        let differs = if c.untyped {
            format!(
                "OLD.{col} IS NOT NEW.{col} COLLATE BINARY OR typeof(OLD.{col}) IS NOT typeof(NEW.{col}) \
                 OR (NEW.{col} = 0 AND typeof(NEW.{col}) = 'real')"
            )
        } else {
            format!("OLD.{col} IS NOT NEW.{col} COLLATE BINARY")
        };
        words[(c.idx / 63) as usize].push(format!("(CASE WHEN {differs} THEN {} ELSE 0 END)", 1i64 << (c.idx % 63)));
    }
    words.into_iter().map(|w| if w.is_empty() { "0".to_owned() } else { w.join(" | ") }).collect()
}

/// Creates the journal table if it is missing, adds columns a journal made earlier lacks (more
/// mask words after new columns; the time column of older versions), and installs the
/// triggers. Entries already journaled stay: they are the app's writes, not yet sealed.
pub(crate) fn install(conn: &Connection, info: &TableInfo) -> Result<()> {
    let pending = ident(&info.pending_table());
    let existing: Vec<String> = {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        stmt.query_map([info.pending_table()], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    // No NOT NULL here: a constraint that can abort makes SQLite keep a statement journal for
    // every write to a table without constraints of its own (measured 12% of an update).
    // The seal reads these columns with coalesce() instead.
    let mut cols: Vec<String> = (0..info.pk.len()).map(key_col).collect();
    cols.extend((0..info.mask_words()).map(|w| format!("{} INTEGER DEFAULT 0", mask_col(w))));
    cols.push(format!("{TIME_COL} REAL"));
    if existing.is_empty() {
        conn.execute_batch(&format!("CREATE TABLE {pending} ({});", cols.join(", ")))?;
    } else {
        for col in cols {
            let name = col.split(' ').next().unwrap_or_default();
            if !existing.iter().any(|e| e == name) {
                conn.execute_batch(&format!("ALTER TABLE {pending} ADD COLUMN {col};"))?;
            }
        }
    }
    drop_triggers(conn, info)?;
    install_triggers(conn, info)
}

fn install_triggers(conn: &Connection, info: &TableInfo) -> Result<()> {
    let table = ident(&info.name);
    let key_list: Vec<String> = info.pk.iter().map(|c| ident(c)).collect();
    let no_masks: Vec<String> = Vec::new();
    let guard = null_key_guard(info);
    let on_insert = journal_append(info, "NEW", &full_masks(info));
    // The update trigger has no WHEN clause: that check cost as much per row as recording the
    // write's time does. A key change journals the new key with only the columns that
    // changed, and the seal writes every column of a row it does not show yet, so the new
    // key still arrives whole; the rekey trigger only adds the old key's removal.
    let sql = format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {table} BEGIN {guard} {on_insert} END;
         CREATE TRIGGER {upd} AFTER UPDATE ON {table} BEGIN {on_update} END;
         CREATE TRIGGER {rekey} AFTER UPDATE OF {key_list} ON {table} WHEN NOT ({same_key})
           BEGIN {guard} {on_rekey_old} END;
         CREATE TRIGGER {del} AFTER DELETE ON {table} BEGIN {on_delete} END;",
        key_list = key_list.join(", "),
        ins = trigger(info, "ins"),
        upd = trigger(info, "upd"),
        rekey = trigger(info, "rekey"),
        del = trigger(info, "del"),
        same_key = same_key(info),
        on_update = journal_append(info, "NEW", &changed_masks(info)),
        on_rekey_old = journal_append(info, "OLD", &no_masks),
        on_delete = journal_append(info, "OLD", &no_masks),
    );
    conn.execute_batch(&sql)?;
    Ok(())
}

/// Journals rows as a trigger would: each key with the columns to treat as changed. The time
/// is left empty, which the seal reads as "now".
pub(crate) fn journal_rows(conn: &Connection, info: &TableInfo, rows: &[(Vec<Value>, Vec<u64>)]) -> Result<()> {
    let mut cols: Vec<String> = (0..info.pk.len()).map(key_col).collect();
    cols.extend((0..info.mask_words()).map(mask_col));
    let slots: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let sql =
        format!("INSERT INTO {} ({}) VALUES ({})", ident(&info.pending_table()), cols.join(", "), slots.join(", "));
    let mut stmt = conn.prepare_cached(&sql)?;
    for (pk, columns) in rows {
        let mut words = vec![0i64; info.mask_words()];
        for &idx in columns {
            words[(idx / 63) as usize] |= 1 << (idx % 63);
        }
        let words: Vec<Value> = words.into_iter().map(Value::Integer).collect();
        stmt.execute(rusqlite::params_from_iter(pk.iter().chain(words.iter())))?;
    }
    Ok(())
}

/// Drops the journal table (once nothing is left in it).
pub(crate) fn drop_journal(conn: &Connection, info: &TableInfo) -> Result<()> {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {};", ident(&info.pending_table())))?;
    Ok(())
}

pub(crate) fn drop_triggers(conn: &Connection, info: &TableInfo) -> Result<()> {
    for what in ["ins", "upd", "rekey", "del"] {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {};", trigger(info, what)))?;
    }
    Ok(())
}

/// The query that reads the journal, oldest entry first, joined with the current rows: key
/// values, mask words, the write's time, a presence flag, then every captured column's value.
pub(crate) fn seal_query(info: &TableInfo) -> String {
    let mut sel: Vec<String> = (0..info.pk.len()).map(|i| format!("p.{}", key_col(i))).collect();
    sel.extend((0..info.mask_words()).map(|w| format!("coalesce(p.{}, 0)", mask_col(w))));
    sel.push(format!("p.{TIME_COL}"));
    // Present only if the row found has exactly this key: the join follows the key's collation
    // (and its index), so under NOCASE the old key 'abc' finds the renamed row 'ABC'.
    let exact: Vec<String> =
        info.pk.iter().enumerate().map(|(i, c)| format!("t.{} = p.{} COLLATE BINARY", ident(c), key_col(i))).collect();
    sel.push(format!("coalesce({}, 0)", exact.join(" AND ")));
    sel.extend(info.app.iter().map(|c| format!("t.{}", ident(&c.name))));
    let on: Vec<String> =
        info.pk.iter().enumerate().map(|(i, c)| format!("t.{} = p.{}", ident(c), key_col(i))).collect();
    format!(
        "SELECT {} FROM {} AS p LEFT JOIN {} AS t ON {} ORDER BY p.rowid",
        sel.join(", "),
        ident(&info.pending_table()),
        ident(&info.name),
        on.join(" AND ")
    )
}

/// How many distinct rows the journal holds.
pub(crate) fn journaled_rows(conn: &Connection, info: &TableInfo) -> Result<u64> {
    let keys: Vec<String> = (0..info.pk.len()).map(key_col).collect();
    let sql =
        format!("SELECT count(*) FROM (SELECT DISTINCT {} FROM {})", keys.join(", "), ident(&info.pending_table()));
    Ok(conn.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
}
