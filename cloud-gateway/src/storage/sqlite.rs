//! The single-file SQLite gateway store.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::{Batch, NodeId, RowChange, join_row};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{ChangesPage, DeadLetter, DeviceInfo, GatewayStore, MergeOutcome, SnapshotPage};
use crate::error::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gw_rows (
    tenant TEXT NOT NULL,
    tbl    TEXT NOT NULL,
    pk     BLOB NOT NULL,
    state  BLOB NOT NULL,   -- a one-row batch payload: the row's merged state
    PRIMARY KEY (tenant, tbl, pk)
) WITHOUT ROWID;
-- Merged changes in merge order; devices pull after a cursor into it.
CREATE TABLE IF NOT EXISTS gw_log (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    origin TEXT NOT NULL,
    rows   INTEGER NOT NULL,
    change BLOB NOT NULL    -- a batch payload of the rows whose state changed
);
CREATE INDEX IF NOT EXISTS gw_log_by_tenant ON gw_log (tenant, seq);
CREATE TABLE IF NOT EXISTS gw_devices (
    tenant          TEXT NOT NULL,
    device          TEXT NOT NULL,
    first_seen_ms   INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL,
    uplink_hwm      INTEGER NOT NULL DEFAULT 0,
    downlink_cursor INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gw_dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    device      TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL
);
";

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Gateway state in one SQLite file (WAL, one writer).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    limits: Limits,
}

impl SqliteStore {
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an ack tells the device to delete its copy, so a merge must survive power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore { conn, limits: Limits::default() })
    }

    fn one_row_payload(batch_roles: &BTreeMap<NodeId, String>, row: RowChange) -> Vec<u8> {
        let roles = row.state.nodes().into_iter().filter_map(|n| batch_roles.get(&n).map(|r| (n, r.clone()))).collect();
        encode_payload(&Batch { roles, rows: vec![row] })
    }

    fn decode(&self, bytes: &[u8]) -> Result<Batch> {
        decode_payload(bytes, &self.limits).map_err(|e| Error::Corrupt(e.to_string()))
    }
}

/// Snapshot resume tokens: table name length, table name, encoded key.
fn resume_token(table: &str, key: &[u8]) -> Vec<u8> {
    let mut t = (table.len() as u32).to_le_bytes().to_vec();
    t.extend_from_slice(table.as_bytes());
    t.extend_from_slice(key);
    t
}

fn parse_resume(token: &[u8]) -> Option<(String, Vec<u8>)> {
    let len = u32::from_le_bytes(token.get(..4)?.try_into().ok()?) as usize;
    let table = std::str::from_utf8(token.get(4..4 + len)?).ok()?.to_owned();
    Some((table, token[4 + len..].to_vec()))
}

impl GatewayStore for SqliteStore {
    fn merge(
        &mut self,
        tenant: &str,
        device: &str,
        first_seq: i64,
        last_seq: i64,
        batch: &Batch,
    ) -> Result<MergeOutcome> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcome = MergeOutcome::default();
        let mut changed = Batch::default();
        for row in &batch.rows {
            let key = encode_key(&row.pk);
            // Read inside the write transaction, so another writer cannot interleave.
            let stored: Option<Vec<u8>> = tx
                .prepare_cached("SELECT state FROM gw_rows WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?
                .query_row(rusqlite::params![tenant, row.table, key], |r| r.get(0))
                .optional()?;
            // The row's state and the roles of the nodes in it, as stored with it.
            let (mut current, mut roles) = match stored {
                Some(bytes) => {
                    let mut b = decode_payload(&bytes, &self.limits).map_err(|e| Error::Corrupt(e.to_string()))?;
                    let stored = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
                    (stored, b.roles)
                }
                None => (
                    RowChange { table: row.table.clone(), pk: row.pk.clone(), state: Default::default() },
                    BTreeMap::new(),
                ),
            };
            if !join_row(&mut current.state, &row.state) {
                outcome.duplicates += 1;
                continue;
            }
            outcome.applied += 1;
            roles.extend(batch.roles.iter().map(|(n, r)| (*n, r.clone())));
            tx.prepare_cached("INSERT OR REPLACE INTO gw_rows(tenant, tbl, pk, state) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![tenant, row.table, key, Self::one_row_payload(&roles, current)])?;
            changed.rows.push(row.clone());
        }
        if !changed.rows.is_empty() {
            changed.roles = batch.roles.clone();
            tx.prepare_cached("INSERT INTO gw_log(tenant, origin, rows, change) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![tenant, device, changed.rows.len() as i64, encode_payload(&changed)])?;
            outcome.logged_at = Some(tx.last_insert_rowid() as u64);
        }
        let now = now_ms();
        tx.prepare_cached(
            "INSERT INTO gw_devices(tenant, device, first_seen_ms, last_seen_ms, uplink_hwm) VALUES (?1, ?2, ?3, ?3, ?4)
             ON CONFLICT(tenant, device) DO UPDATE SET last_seen_ms = ?3, uplink_hwm = max(uplink_hwm, ?4)",
        )?
        .execute(rusqlite::params![tenant, device, now, last_seq.max(first_seq)])?;
        tx.commit()?;
        Ok(outcome)
    }

    fn changes_after(&mut self, tenant: &str, device: &str, cursor: u64, max_rows: usize) -> Result<ChangesPage> {
        let mut page = ChangesPage { cursor, ..ChangesPage::default() };
        const ENTRIES: usize = 256;
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, origin, change FROM gw_log WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let entries = stmt
            .query_map(rusqlite::params![tenant, cursor as i64, ENTRIES as i64 + 1], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        page.more = entries.len() > ENTRIES;
        for (seq, origin, change) in entries.into_iter().take(ENTRIES) {
            if page.batch.rows.len() >= max_rows {
                page.more = true;
                break;
            }
            page.cursor = seq as u64;
            // A device's own changes are not sent back to it; the cursor still moves past them.
            if origin == device {
                continue;
            }
            let b = self.decode(&change)?;
            page.batch.roles.extend(b.roles);
            page.batch.rows.extend(b.rows);
        }
        Ok(page)
    }

    fn log_head(&mut self, tenant: &str) -> Result<u64> {
        let head: Option<i64> =
            self.conn.query_row("SELECT max(seq) FROM gw_log WHERE tenant = ?1", [tenant], |r| r.get(0))?;
        Ok(head.unwrap_or(0) as u64)
    }

    fn snapshot_page(&mut self, tenant: &str, resume: &[u8], max_rows: usize) -> Result<SnapshotPage> {
        let (table, key) = if resume.is_empty() {
            (String::new(), Vec::new())
        } else {
            parse_resume(resume).ok_or_else(|| Error::Corrupt("bad snapshot resume token".into()))?
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT tbl, pk, state FROM gw_rows WHERE tenant = ?1 AND (tbl, pk) > (?2, ?3) ORDER BY tbl, pk LIMIT ?4",
        )?;
        let rows = stmt
            .query_map(rusqlite::params![tenant, table, key, max_rows as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        let mut page = SnapshotPage { done: rows.len() < max_rows, ..SnapshotPage::default() };
        for (tbl, pk, state) in rows {
            let b = self.decode(&state)?;
            page.batch.roles.extend(b.roles);
            page.batch.rows.extend(b.rows);
            page.resume = resume_token(&tbl, &pk);
        }
        if page.done {
            page.resume.clear();
        }
        Ok(page)
    }

    fn touch_device(&mut self, tenant: &str, device: &str, cursor: Option<u64>) -> Result<()> {
        let now = now_ms();
        self.conn
            .prepare_cached(
                "INSERT INTO gw_devices(tenant, device, first_seen_ms, last_seen_ms, downlink_cursor)
                 VALUES (?1, ?2, ?3, ?3, coalesce(?4, 0))
                 ON CONFLICT(tenant, device) DO UPDATE SET last_seen_ms = ?3,
                     downlink_cursor = coalesce(?4, downlink_cursor)",
            )?
            .execute(rusqlite::params![tenant, device, now, cursor.map(|c| c as i64)])?;
        Ok(())
    }

    fn devices(&mut self, tenant: &str) -> Result<Vec<DeviceInfo>> {
        let head = self.log_head(tenant)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT device, first_seen_ms, last_seen_ms, uplink_hwm, downlink_cursor FROM gw_devices
             WHERE tenant = ?1 ORDER BY device",
        )?;
        let rows = stmt.query_map([tenant], |r| {
            let cursor = r.get::<_, i64>(4)? as u64;
            Ok(DeviceInfo {
                tenant: tenant.to_owned(),
                device: r.get(0)?,
                first_seen_ms: r.get(1)?,
                last_seen_ms: r.get(2)?,
                uplink_hwm: r.get(3)?,
                downlink_cursor: cursor,
                lag: head.saturating_sub(cursor),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn tenants(&mut self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT tenant FROM gw_devices UNION SELECT tenant FROM gw_dead_letters ORDER BY tenant")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn dead_letter(&mut self, tenant: &str, device: &str, reason: &str, payload: &[u8]) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO gw_dead_letters(tenant, device, received_ms, reason, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(rusqlite::params![tenant, device, now_ms(), reason, payload])?;
        Ok(self.conn.last_insert_rowid())
    }

    fn dead_letters(&mut self, tenant: &str) -> Result<Vec<DeadLetter>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, device, received_ms, reason, payload FROM gw_dead_letters WHERE tenant = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([tenant], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                tenant: tenant.to_owned(),
                device: r.get(1)?,
                received_ms: r.get(2)?,
                reason: r.get(3)?,
                payload: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftless_core::{Store, StoreOptions, TableSpec};

    fn device_batch(dir: &Path) -> Batch {
        let mut s = Store::open(dir.join("d.db"), StoreOptions::default()).expect("open");
        s.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")?))
            .expect("schema");
        s.track("t", TableSpec::new().column("n", driftless_core::ColumnPolicy::Counter)).expect("track");
        s.write(|tx| Ok(tx.execute_batch("INSERT INTO t VALUES ('a', 5), ('b', 1)")?)).expect("insert");
        s.outbox_batch(100).expect("outbox").expect("batch").batch
    }

    #[test]
    fn merging_the_same_batch_again_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch = device_batch(dir.path());
        let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        let first = gw.merge("acme", "tab-1", 1, 2, &batch).expect("merge");
        assert_eq!((first.applied, first.duplicates), (2, 0));
        assert_eq!(first.logged_at, Some(1));
        for _ in 0..4 {
            let again = gw.merge("acme", "tab-1", 1, 2, &batch).expect("merge");
            assert_eq!((again.applied, again.duplicates, again.logged_at), (0, 2, None));
        }
        assert_eq!(gw.log_head("acme").expect("head"), 1);
        // The device that sent the changes is not sent them back; another device is.
        assert!(gw.changes_after("acme", "tab-1", 0, 100).expect("page").batch.rows.is_empty());
        let page = gw.changes_after("acme", "tab-2", 0, 100).expect("page");
        assert_eq!((page.batch.rows.len(), page.cursor, page.more), (2, 1, false));
        // Tenants are separate.
        assert_eq!(gw.log_head("other").expect("head"), 0);
    }

    #[test]
    fn snapshot_pages_cover_every_row_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch = device_batch(dir.path());
        let mut gw = SqliteStore::open(dir.path().join("gw.db")).expect("open");
        gw.merge("acme", "tab-1", 1, 2, &batch).expect("merge");
        let first = gw.snapshot_page("acme", &[], 1).expect("page");
        assert_eq!((first.batch.rows.len(), first.done), (1, false));
        let second = gw.snapshot_page("acme", &first.resume, 1).expect("page");
        let third = gw.snapshot_page("acme", &second.resume, 1).expect("page");
        assert_eq!(second.batch.rows.len(), 1);
        assert!(third.done && third.batch.rows.is_empty());
        assert_ne!(first.batch.rows[0].pk, second.batch.rows[0].pk);
    }
}
