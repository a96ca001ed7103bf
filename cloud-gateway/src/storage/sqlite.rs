//! The single-file SQLite gateway store.

mod cloud_writes;
mod erasure;
mod group;
mod log;
mod merge;
mod registry;
mod rows;
mod schema;
mod tables;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use driftless_core::codec::Limits;
use driftless_core::{Batch, Epoch, Hlc, LogCursor, NodeId, SyncSchema, Value};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use group::{Group, Unit, unit};

use super::chains::{Chain, SchemaByVersion};
use super::common::{DEAD_LETTERS_PER_DEVICE, Tags, added_tables, dead_letter_kept, now_ms};
use super::kept::Kept;
use super::{
    DeadLetter, DeadLetterFilter, DeviceInfo, DeviceView, GatewayStore, Incoming, LogEntry, Logged, MergeOutcome,
    Params, Registered, ServedSchema, SkewedNode, SnapshotPage, Standing, ToLog,
};
use crate::error::{Error, MergeError, Result};

/// Gateway state in one SQLite file (WAL, one writer).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// The group's transaction (group commit), if one is open.
    group: Group,
    /// The sync schema version last read, parsed.
    schema: Option<Arc<ServedSchema>>,
    /// The schema served as read in the open group: no other writer can change it before the
    /// group commits, so it is read once a group rather than once a message.
    group_schema: Option<Option<Arc<ServedSchema>>>,
    limits: Limits,
    /// Each tenant's current epoch and since when, as read or written by this instance.
    epochs: HashMap<String, (Epoch, i64)>,
    tags: Tags,
    kept: Kept,
}

impl SqliteStore {
    /// Opens the store at `path`, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        let store = Self::open_with(path, OpenFlags::default())?;
        // The file may be a restored backup whose cloud nodes already issued dots it has no
        // record of: writes with plain SQL take new nodes, so no dot is issued twice.
        store.conn.execute("DELETE FROM gw_cloud_writers", [])?;
        Ok(store)
    }

    /// Opens an existing store; a missing file is an error rather than a new empty store
    /// (for commands that only look).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<SqliteStore> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::MissingDatabase(path.display().to_string()));
        }
        Self::open_with(path, OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE))
    }

    fn open_with(path: impl AsRef<Path>, flags: OpenFlags) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open_with_flags(&path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // A merge runs dozens of distinct statements: the default cache (16) would prepare
        // most of them again every time.
        conn.set_prepared_statement_cache_capacity(256);
        // Plans that do not depend on the values bound: otherwise SQLite compiles a cached
        // statement again whenever a value it may plan by changes, and a query by tenant
        // ordered by its key (the log's head, the current epoch) was compiled again for
        // every tenant and device, a third of the gateway's time under load. Its queries
        // are all made for their indexes.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an ack tells the device to delete its copy, so a merge must survive power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // What an erasing delete removes must leave the disk: deleted content is zeroed, and
        // the log's stale page images are cut off when it restarts after a checkpoint.
        conn.pragma_update(None, "secure_delete", true)?;
        conn.pragma_update(None, "journal_size_limit", 0)?;
        // Each message of a group commit runs in a savepoint of the group's transaction; the
        // pages it would restore live in memory rather than in a temporary file written for
        // every message (a group holds at most a thousand messages of bounded size).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        schema::upgrade(&tx)?;
        tx.commit()?;
        Ok(SqliteStore {
            conn,
            path,
            group: Group::default(),
            schema: None,
            group_schema: None,
            limits: Limits::default(),
            epochs: HashMap::new(),
            tags: Tags::new()?,
            kept: Kept::default(),
        })
    }

    /// The schema served now, read from the file (asked for every message outside groups: a
    /// cached statement).
    fn read_served_schema(&mut self) -> Result<Option<Arc<ServedSchema>>> {
        let version: Option<i64> =
            self.conn.prepare_cached("SELECT max(version) FROM gw_sync_schema")?.query_row([], |r| r.get(0))?;
        let Some(version) = version.map(|v| v as u64) else { return Ok(None) };
        if let Some(cached) = self.schema.as_ref().filter(|s| s.version == version) {
            return Ok(Some(cached.clone()));
        }
        let text: String =
            self.conn
                .query_row("SELECT text FROM gw_sync_schema WHERE version = ?1", [version as i64], |r| r.get(0))?;
        let served = Arc::new(ServedSchema::parse(version, text)?);
        self.schema = Some(served.clone());
        Ok(Some(served))
    }

    /// What was read or made in a group that did not commit may be gone with it.
    fn forget_group_reads(&mut self) {
        self.epochs.clear();
        self.schema = None;
        self.group_schema = None;
        self.kept.forget();
    }

    /// The database file: the real tables in it are for anyone to read with plain SQL.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Starts a new epoch for `tenant`; returns it and since when.
fn start_epoch(conn: &Connection, tenant: &str, reason: &str) -> Result<(Epoch, i64)> {
    let epoch = Epoch::random().map_err(|e| Error::Random(e.to_string()))?;
    let since = now_ms();
    conn.execute(
        "INSERT INTO gw_epochs(tenant, epoch, since_ms, reason) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![tenant, &epoch.0[..], since, reason],
    )?;
    Ok((epoch, since))
}

/// The tenant's current epoch and since when.
fn current_epoch(conn: &Connection, tenant: &str) -> Result<Option<(Epoch, i64)>> {
    let row: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT epoch, since_ms FROM gw_epochs WHERE tenant = ?1 ORDER BY id DESC LIMIT 1")?
        .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(b, since)| Ok((Epoch(b.try_into().map_err(|_| Error::Corrupt("stored epoch".into()))?), since)))
        .transpose()
}

/// How the rows stored so far contradict `schema`.
fn unfit_rows(conn: &Connection, limits: &Limits, schema: &SyncSchema) -> Result<Vec<String>> {
    super::common::unfit_rows(limits, schema, |table| {
        let arities: Vec<i64> = conn
            .prepare("SELECT DISTINCT key_len FROM gw_tables WHERE tbl = ?1")?
            .query_map([table], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let states: Vec<Vec<u8>> = conn
            .prepare("SELECT state FROM gw_rows WHERE tbl = ?1")?
            .query_map([table], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((arities, states))
    })
}

/// Keeps a refused message (or row) with its reason; large payloads by reference.
pub(super) fn keep_dead_letter(
    conn: &Connection,
    tenant: &str,
    device: &str,
    reason: &str,
    payload: &[u8],
) -> Result<i64> {
    let (kept, sha256) = dead_letter_kept(payload);
    conn.prepare_cached(
        "INSERT INTO gw_dead_letters(tenant, device, received_ms, reason, payload, size, sha256)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(rusqlite::params![tenant, device, now_ms(), reason, kept, payload.len() as i64, sha256])?;
    Ok(conn.last_insert_rowid())
}

impl GatewayStore for SqliteStore {
    fn epoch(&mut self, tenant: &str) -> Result<Epoch> {
        if let Some((epoch, _)) = self.epochs.get(tenant) {
            return Ok(*epoch);
        }
        let tx = unit(&mut self.conn, &self.group)?;
        let current = match current_epoch(&tx, tenant)? {
            Some(current) => current,
            None => start_epoch(&tx, tenant, "the tenant's first device")?,
        };
        tx.commit()?;
        self.epochs.insert(tenant.to_owned(), current);
        Ok(current.0)
    }

    fn epoch_now(&mut self, tenant: &str) -> Result<Epoch> {
        self.epochs.remove(tenant);
        self.epoch(tenant)
    }

    fn new_epoch(&mut self, tenant: &str, replacing: Epoch, reason: &str) -> Result<Epoch> {
        let tx = unit(&mut self.conn, &self.group)?;
        // One restore is one new epoch, however many devices (or gateway instances, each
        // with its own cached epoch) notice it.
        if let Some(current) = current_epoch(&tx, tenant)?
            && current.0 != replacing
        {
            tracing::info!(tenant, %reason, "the epoch was renewed already");
            tx.commit()?;
            self.epochs.insert(tenant.to_owned(), current);
            return Ok(current.0);
        }
        let next = start_epoch(&tx, tenant, reason)?;
        tx.commit()?;
        self.epochs.insert(tenant.to_owned(), next);
        Ok(next.0)
    }

    fn issued_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM gw_epochs WHERE tenant = ?1 AND epoch = ?2)
                     OR EXISTS (SELECT 1 FROM gw_foreign_epochs WHERE tenant = ?1 AND epoch = ?2)",
            )?
            .query_row(rusqlite::params![tenant, &epoch.0[..]], |r| r.get(0))?)
    }

    fn note_foreign_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO gw_foreign_epochs(tenant, epoch, seen_ms) VALUES (?1, ?2, ?3)")?
            .execute(rusqlite::params![tenant, &epoch.0[..], now_ms()])?;
        Ok(())
    }

    fn heard_in_epoch(&mut self, tenant: &str, device: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO gw_epoch_devices(tenant, device, epoch, since_ms)
                 SELECT ?1, ?2, epoch, ?3 FROM gw_epochs WHERE tenant = ?1 ORDER BY id DESC LIMIT 1",
            )?
            .execute(rusqlite::params![tenant, device, now_ms()])?;
        Ok(())
    }

    fn hello(&mut self, tenant: &str, device: &str, node: NodeId) -> Result<DeviceView> {
        let tx = unit(&mut self.conn, &self.group)?;
        tx.prepare_cached(
            "INSERT INTO gw_nodes(tenant, node, device) VALUES (?1, ?2, ?3)
             ON CONFLICT(tenant, node) DO UPDATE SET device = coalesce(device, excluded.device)",
        )?
        .execute(rusqlite::params![tenant, &node.0[..], device])?;
        let (owner, counter): (String, i64) = tx
            .prepare_cached("SELECT device, max_counter FROM gw_nodes WHERE tenant = ?1 AND node = ?2")?
            .query_row(rusqlite::params![tenant, &node.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))?;
        tx.prepare_cached(
            "INSERT OR IGNORE INTO gw_epoch_devices(tenant, device, epoch, since_ms)
             SELECT ?1, ?2, epoch, ?3 FROM gw_epochs WHERE tenant = ?1 ORDER BY id DESC LIMIT 1",
        )?
        .execute(rusqlite::params![tenant, device, now_ms()])?;
        let device_seq: i64 = tx
            .prepare_cached("SELECT uplink_hwm FROM gw_devices WHERE tenant = ?1 AND device = ?2")?
            .query_row(rusqlite::params![tenant, device], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        tx.commit()?;
        Ok(DeviceView { node_counter: counter as u64, device_seq, node_owner: owner })
    }

    fn merge(&mut self, from: &Incoming<'_>, batch: &Batch) -> Result<MergeOutcome, MergeError> {
        let schema = self.served_schema()?;
        let tx = unit(&mut self.conn, &self.group)?;
        merge::merge(tx, &self.limits, from, schema.as_deref(), &mut self.tags, batch)
    }

    fn log_after(
        &mut self,
        tenant: &str,
        cursor: u64,
        limit: usize,
        chain: Option<&Chain>,
    ) -> Result<(Vec<Logged>, bool)> {
        log::after(&self.conn, &self.limits, tenant, cursor, limit, chain)
    }

    fn chain_before(&mut self, tenant: &str, chain: &Chain, before: u64) -> Result<LogCursor> {
        log::chain_before(&self.conn, tenant, chain, before)
    }

    fn rows_size(&mut self, tenant: &str, table: Option<&str>) -> Result<(u64, u64)> {
        rows::size(&self.conn, tenant, table)
    }

    fn scope_count(&mut self, tenant: &str, table: &str, skey: &[u8]) -> Result<u64> {
        rows::scope_count(&self.conn, tenant, table, skey)
    }

    fn kept(&mut self) -> Option<&mut Kept> {
        Some(&mut self.kept)
    }

    fn row_state(&mut self, tenant: &str, table: &str, pk: &[Value]) -> Result<Option<Batch>> {
        rows::row_state(&self.conn, &self.limits, tenant, table, pk)
    }

    fn table_rows(&mut self, tenant: &str, table: &str, after: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Batch)>> {
        rows::table_rows(&self.conn, &self.limits, tenant, table, None, after, limit)
    }

    fn scope_rows(
        &mut self,
        tenant: &str,
        table: &str,
        skey: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Batch)>> {
        rows::table_rows(&self.conn, &self.limits, tenant, table, Some(skey), after, limit)
    }

    fn log_head(&mut self, tenant: &str) -> Result<LogCursor> {
        let head: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT seq, tag FROM gw_log WHERE tenant = ?1 ORDER BY seq DESC LIMIT 1")?
            .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(head.map_or(LogCursor::default(), |(seq, tag)| LogCursor { position: seq as u64, tag: tag as u64 }))
    }

    fn log_tag(&mut self, tenant: &str, position: u64) -> Result<Option<u64>> {
        if position == 0 {
            return Ok(Some(0));
        }
        let tag: Option<i64> = self
            .conn
            .prepare_cached("SELECT tag FROM gw_log WHERE seq = ?1 AND tenant = ?2")?
            .query_row(rusqlite::params![position as i64, tenant], |r| r.get(0))
            .optional()?;
        Ok(tag.map(|t| t as u64))
    }

    fn snapshot_page(&mut self, tenant: &str, resume: &[u8], max_rows: usize) -> Result<Option<SnapshotPage>> {
        rows::snapshot_page(&self.conn, &self.limits, tenant, resume, max_rows)
    }

    fn touch_device(&mut self, tenant: &str, device: &str, cursor: Option<u64>) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO gw_devices(tenant, device, first_seen_ms, last_seen_ms, downlink_cursor)
                 VALUES (?1, ?2, ?3, ?3, coalesce(?4, 0))
                 ON CONFLICT(tenant, device) DO UPDATE SET last_seen_ms = ?3,
                     downlink_cursor = coalesce(?4, downlink_cursor)",
            )?
            .execute(rusqlite::params![tenant, device, now_ms(), cursor.map(|c| c as i64)])?;
        Ok(())
    }

    fn devices(&mut self, tenant: &str) -> Result<Vec<DeviceInfo>> {
        let head = self.log_head(tenant)?.position;
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
        let id = keep_dead_letter(&self.conn, tenant, device, reason, payload)?;
        // A device's letters are capped (what they held stays with it, set aside there too);
        // refused plain-SQL writes, kept by keep_dead_letter alone, are not.
        self.conn
            .prepare_cached(
                "DELETE FROM gw_dead_letters WHERE tenant = ?1 AND device = ?2 AND id <= (
                     SELECT id FROM gw_dead_letters WHERE tenant = ?1 AND device = ?2
                     ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            )?
            .execute(rusqlite::params![tenant, device, DEAD_LETTERS_PER_DEVICE])?;
        Ok(id)
    }

    fn dead_letters(&mut self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, tenant, device, received_ms, reason, payload, size, sha256 FROM gw_dead_letters
             WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR device = ?2)
               AND (?3 IS NULL OR instr(reason, ?3) > 0) AND (?4 IS NULL OR received_ms >= ?4)
             ORDER BY id DESC LIMIT ?5",
        )?;
        let limit = if filter.limit == 0 { -1 } else { filter.limit as i64 };
        let rows = stmt.query_map(
            rusqlite::params![filter.tenant, filter.device, filter.reason, filter.since_ms, limit],
            |r| {
                let payload: Vec<u8> = r.get(5)?;
                let size: i64 = r.get(6)?;
                Ok(DeadLetter {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    device: r.get(2)?,
                    received_ms: r.get(3)?,
                    reason: r.get(4)?,
                    // Letters kept before sizes were recorded hold their whole payload.
                    size: if size > 0 { size as u64 } else { payload.len() as u64 },
                    payload,
                    sha256: r.get(7)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn purge_dead_letters(&mut self, before_ms: i64) -> Result<usize> {
        Ok(self.conn.prepare_cached("DELETE FROM gw_dead_letters WHERE received_ms < ?1")?.execute([before_ms])?)
    }

    fn note_attempt(&mut self, key: &[u8; 32]) -> Result<u32> {
        let now = now_ms();
        let count: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO gw_attempts(key, count, first_ms, last_ms) VALUES (?1, 1, ?2, ?2)
                 ON CONFLICT(key) DO UPDATE SET count = count + 1, last_ms = excluded.last_ms RETURNING count",
            )?
            .query_row(rusqlite::params![&key[..], now], |r| r.get(0))?;
        Ok(count as u32)
    }

    fn attempts(&mut self, key: &[u8; 32]) -> Result<Option<(u32, i64)>> {
        let found: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT count, last_ms FROM gw_attempts WHERE key = ?1")?
            .query_row([&key[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(found.map(|(c, at)| (c as u32, at)))
    }

    fn unnote_attempt(&mut self, key: &[u8; 32]) -> Result<()> {
        self.conn.prepare_cached("UPDATE gw_attempts SET count = count - 1 WHERE key = ?1")?.execute([&key[..]])?;
        self.conn.prepare_cached("DELETE FROM gw_attempts WHERE key = ?1 AND count <= 0")?.execute([&key[..]])?;
        Ok(())
    }

    fn served_schema(&mut self) -> Result<Option<Arc<ServedSchema>>> {
        if let Some(read) = self.group_schema.as_ref().filter(|_| self.group.is_open()) {
            return Ok(read.clone());
        }
        let served = self.read_served_schema()?;
        if self.group.is_open() {
            self.group_schema = Some(served.clone());
        }
        Ok(served)
    }

    fn prepare_tenant(&mut self, tenant: &str) -> Result<()> {
        let Some(served) = self.served_schema()? else { return Ok(()) };
        let tx = unit(&mut self.conn, &self.group)?;
        cloud_writes::begin_own_writes(&tx)?;
        tables::materialize(&tx, &self.limits, tenant, &served)?;
        cloud_writes::end_own_writes(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn ingest_cloud_writes(&mut self, now_ms: u64) -> Result<Vec<(String, LogEntry)>> {
        let Some(served) = self.served_schema()? else { return Ok(Vec::new()) };
        // Taking the write lock first also waits for a writer still committing: its file
        // writes (what woke the gateway) come a moment before its commit is visible.
        let tx = unit(&mut self.conn, &self.group)?;
        let mut logged = Vec::new();
        let tenants = cloud_writes::pending_tenants(&tx, &served)?;
        if tenants.is_empty() {
            // Committed, though nothing was written: in a group, a unit ended otherwise
            // would spoil it (see `group`).
            tx.commit()?;
            return Ok(logged);
        }
        cloud_writes::begin_own_writes(&tx)?;
        for tenant in tenants {
            tables::materialize(&tx, &self.limits, &tenant, &served)?;
            if let Some((change, moves)) = cloud_writes::ingest(&tx, &self.limits, &tenant, &served, now_ms)? {
                let entry = merge::log_change(
                    &tx,
                    &self.limits,
                    &tenant,
                    ToLog { origin: "", change: &change, moves: &moves, schema: Some(&served.schema) },
                    self.tags.next(),
                )?;
                logged.push((tenant, entry));
            }
        }
        cloud_writes::end_own_writes(&tx)?;
        tx.commit()?;
        Ok(logged)
    }

    fn install_schema(&mut self, text: &str) -> Result<u64> {
        let new = SyncSchema::parse(text)?;
        self.group_schema = None;
        let tx = unit(&mut self.conn, &self.group)?;
        let current: Option<(i64, String)> = tx
            .query_row("SELECT version, text FROM gw_sync_schema ORDER BY version DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let (version, added, old) = match current {
            Some((version, old)) => {
                let old = SyncSchema::parse(&old).map_err(|e| Error::Corrupt(format!("stored schema: {e}")))?;
                if old == new {
                    tx.commit()?;
                    return Ok(version as u64);
                }
                new.check_replaces(&old, version as u64)?;
                (version + 1, added_tables(&old, &new), Some(old))
            }
            None => (1, new.clone(), None),
        };
        // Rows synced before any schema must fit the version that first declares their table.
        let unfit = unfit_rows(&tx, &self.limits, &added)?;
        if !unfit.is_empty() {
            return Err(driftless_core::SchemaError::UnfitRows(unfit).into());
        }
        merge::count_references(&tx, &self.limits, old.as_ref(), &new)?;
        tx.execute(
            "INSERT INTO gw_sync_schema(version, text, loaded_ms) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, text, now_ms()],
        )?;
        tx.commit()?;
        Ok(version as u64)
    }

    fn clear_attempts(&mut self, key: &[u8; 32]) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM gw_attempts WHERE key = ?1")?.execute([&key[..]])?;
        Ok(())
    }

    fn begin_group(&mut self) -> Result<()> {
        if !self.group.is_open() {
            self.group_schema = None;
        }
        self.group.begin(&self.conn)
    }

    fn group_spoiled(&self) -> bool {
        self.group.spoiled()
    }

    fn abandon_group(&mut self) -> Result<()> {
        self.forget_group_reads();
        self.group.abandon(&self.conn)
    }

    fn commit_group(&mut self) -> Result<()> {
        self.group_schema = None;
        let committed = self.group.commit(&self.conn);
        if committed.is_err() {
            self.forget_group_reads();
        }
        committed
    }

    fn register_device(
        &mut self,
        tenant: &str,
        device: &str,
        role: &str,
        secret: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        registry::register(&self.conn, tenant, device, role, secret, now_ms)
    }

    fn remove_device(&mut self, tenant: &str, device: &str, now_ms: i64) -> Result<bool> {
        registry::remove(&self.conn, tenant, device, now_ms)
    }

    fn registry(&mut self, tenant: Option<&str>) -> Result<Vec<Registered>> {
        registry::list(&self.conn, tenant)
    }

    fn standing(&mut self, tenant: &str, device: &str) -> Result<Standing> {
        registry::standing(&self.conn, tenant, device)
    }

    fn set_params(&mut self, tenant: &str, device: &str, params: &Params) -> Result<bool> {
        registry::set_params(&self.conn, tenant, device, params)
    }

    fn scope_told(&mut self, tenant: &str, device: &str, version: u64, feed: &str) -> Result<()> {
        registry::scope_told(&self.conn, tenant, device, version, feed)
    }

    fn clock_skew(&mut self, tenant: &str) -> Result<Vec<SkewedNode>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, max_hlc, bounded, last_ms FROM gw_clock_skew WHERE tenant = ?1 ORDER BY node",
        )?;
        let rows = stmt
            .query_map([tenant], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(node, hlc, bounded, last_ms)| {
                Ok(SkewedNode {
                    node: NodeId::from_slice(&node).ok_or_else(|| Error::Corrupt("skewed node id".into()))?,
                    max_hlc: Hlc(hlc as u64),
                    bounded: bounded as u64,
                    last_ms,
                })
            })
            .collect()
    }
}

/// The device registry read through a connection of its own, for the embedded broker's
/// guard: opening a whole store would migrate it and take an instance's place.
#[derive(Debug)]
pub struct SqliteRegistry(std::sync::Mutex<Connection>, SchemaByVersion);

impl SqliteRegistry {
    /// Opens the gateway database `path` (made by [`SqliteStore::open`]) to read only.
    pub fn open(path: &Path) -> Result<SqliteRegistry> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(SqliteRegistry(std::sync::Mutex::new(conn), SchemaByVersion::default()))
    }
}

impl crate::broker::Registry for SqliteRegistry {
    fn secrets(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let conn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        devices.iter().map(|(t, d)| registry::secret(&conn, t, d)).collect()
    }

    fn scopes(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        registry::scopes(&self.0.lock().unwrap_or_else(|p| p.into_inner()), &self.1, devices)
    }
}

#[cfg(test)]
mod tests;
