//! The PostgreSQL gateway store (`--store postgres://...`): the same state as the SQLite
//! store, in a database that several gateway instances share and any SQL client reads and
//! writes. See docs/adr/0005-postgresql-store.md for the choices.
//!
//! Every transaction that changes a tenant takes the tenant's advisory lock exclusively
//! first: merges of one tenant (from any instance) and its plain-SQL writers (who take it
//! shared, from a trigger) take turns, and log positions, assigned under it, commit in order.
//! Tenants do not wait for each other.

mod connection;
mod epochs;
mod erasure;
mod group;
mod log;
mod merge;
mod migrate;
mod refs;
mod registry;
pub use registry::PgRegistry;
mod tables;
#[doc(hidden)]
pub mod testing;
mod values;

#[cfg(test)]
pub(crate) use values::Read as ReadValue;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftless_core::codec::Limits;
use driftless_core::{Batch, Epoch, Hlc, LogCursor, NodeId, SyncSchema, Value};
use postgres::{Client, Config};

use self::connection::{Blocking, Stmts, StopOnDrop, connect, listen};
use self::epochs::{current_epoch, keep_dead_letter, start_epoch};
use super::chains::Chain;
use super::common::{DEAD_LETTERS_PER_DEVICE, Tags, added_tables, now_ms, unfit_rows};
use super::kept::Kept;
use super::{
    DeadLetter, DeadLetterFilter, DeviceInfo, DeviceView, GatewayStore, Incoming, LogEntry, Logged, MergeOutcome,
    Params, Registered, ServedSchema, SkewedNode, SnapshotPage, Standing,
};
use crate::error::{Error, MergeError, Result};

/// How often device last-seen times and pull cursors are written, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Gateway state in a PostgreSQL database.
pub struct PgStore {
    config: Config,
    client: Blocking,
    stmts: Stmts,
    schema: Option<Arc<ServedSchema>>,
    limits: Limits,
    epochs: HashMap<String, (Epoch, i64)>,
    tags: Tags,
    /// Group commit (see `group.rs`).
    group: group::Group,
    /// Pulls seen since the last write of them: (tenant, device) -> (when, cursor).
    touched: HashMap<(String, String), (i64, Option<u64>)>,
    touched_at: Instant,
    kept: Kept,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("schema", &self.schema.as_ref().map(|s| s.version)).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host/db`) and brings its
    /// `driftless` schema up to date.
    pub fn open(url: &str) -> Result<PgStore> {
        let config: Config = url.parse().map_err(|e: postgres::Error| Error::Config(format!("{url}: {e}")))?;
        Self::open_config(config)
    }

    pub fn open_config(config: Config) -> Result<PgStore> {
        let mut client = connect(&config)?;
        migrate::upgrade(&mut client)?;
        // A restored database may hold cloud nodes that issued dots it has no record of:
        // plain-SQL writes take new nodes after every start, so no dot is issued twice.
        client.execute("DELETE FROM driftless.gw_cloud_writers", &[])?;
        Ok(PgStore {
            config,
            client: Blocking(Some(client)),
            stmts: Stmts::default(),
            schema: None,
            limits: Limits::default(),
            epochs: HashMap::new(),
            tags: Tags::new()?,
            group: group::Group::default(),
            touched: HashMap::new(),
            touched_at: Instant::now(),
            kept: Kept::default(),
        })
    }

    /// The connection settings (for a listener of its own).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The client, connected again if the server closed the connection.
    fn client(&mut self) -> Result<&mut Client> {
        if self.client.is_closed() {
            self.client = Blocking(Some(connect(&self.config)?));
            self.stmts = Stmts::default();
            self.group.reconnected(&mut self.client)?;
            // The database may have failed over to a copy behind the one this instance wrote
            // to: cloud nodes start afresh, so no dot they issued is issued again.
            self.client.execute("DELETE FROM driftless.gw_cloud_writers", &[])?;
        }
        self.group.used();
        Ok(&mut self.client)
    }

    /// Writes the pulls noted since the last flush, in one transaction that does not wait
    /// for its commit to reach disk (a lost last-seen time costs nothing).
    fn flush_touches(&mut self) -> Result<()> {
        if self.touched.is_empty() {
            return Ok(());
        }
        let touched = std::mem::take(&mut self.touched);
        self.touched_at = Instant::now();
        let mut tx = self.client()?.transaction()?;
        tx.batch_execute("SET LOCAL synchronous_commit = off")?;
        let mut keys: Vec<_> = touched.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut tenants, mut devices, mut seen, mut cursors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((tenant, device), (at, cursor)) in keys {
            tenants.push(tenant);
            devices.push(device);
            seen.push(at);
            cursors.push(cursor.map(|c| c as i64));
        }
        tx.execute(
            "INSERT INTO driftless.gw_devices(tenant, device, first_seen_ms, last_seen_ms, downlink_cursor)
             SELECT t, d, s, s, coalesce(c, 0) FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(t, d, s, c)
             ON CONFLICT (tenant, device) DO UPDATE SET last_seen_ms = greatest(driftless.gw_devices.last_seen_ms, excluded.last_seen_ms),
                 downlink_cursor = CASE WHEN excluded.downlink_cursor > 0 OR driftless.gw_devices.downlink_cursor = 0
                                        THEN excluded.downlink_cursor ELSE driftless.gw_devices.downlink_cursor END",
            &[&tenants, &devices, &seen, &cursors],
        )?;
        tx.commit()?;
        Ok(())
    }
}

impl GatewayStore for PgStore {
    fn epoch(&mut self, tenant: &str) -> Result<Epoch> {
        if let Some((epoch, _)) = self.epochs.get(tenant) {
            return Ok(*epoch);
        }
        let mut tx = self.client()?.transaction()?;
        tables::begin_gateway_tx(&mut tx, tenant)?;
        let current = match current_epoch(&mut tx, tenant)? {
            Some(current) => current,
            None => start_epoch(&mut tx, tenant, "the tenant's first device")?,
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
        let mut tx = self.client()?.transaction()?;
        tables::begin_gateway_tx(&mut tx, tenant)?;
        // One restore is one new epoch, however many devices or instances notice it.
        if let Some(current) = current_epoch(&mut tx, tenant)?
            && current.0 != replacing
        {
            tx.commit()?;
            self.epochs.insert(tenant.to_owned(), current);
            return Ok(current.0);
        }
        let next = start_epoch(&mut tx, tenant, reason)?;
        // The store lost changes: its cloud nodes may have issued dots it has no record of.
        tx.execute("DELETE FROM driftless.gw_cloud_writers WHERE tenant = $1", &[&tenant])?;
        tx.commit()?;
        self.epochs.insert(tenant.to_owned(), next);
        Ok(next.0)
    }

    fn issued_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<bool> {
        let row = self.client()?.query_one(
            "SELECT EXISTS (SELECT 1 FROM driftless.gw_epochs WHERE tenant = $1 AND epoch = $2)
                 OR EXISTS (SELECT 1 FROM driftless.gw_foreign_epochs WHERE tenant = $1 AND epoch = $2)",
            &[&tenant, &&epoch.0[..]],
        )?;
        Ok(row.get(0))
    }

    fn note_foreign_epoch(&mut self, tenant: &str, epoch: Epoch) -> Result<()> {
        self.client()?.execute(
            "INSERT INTO driftless.gw_foreign_epochs(tenant, epoch, seen_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&tenant, &&epoch.0[..], &now_ms()],
        )?;
        Ok(())
    }

    fn heard_in_epoch(&mut self, tenant: &str, device: &str) -> Result<()> {
        self.client()?.execute(
            "INSERT INTO driftless.gw_epoch_devices(tenant, device, epoch, since_ms)
             SELECT $1, $2, epoch, $3 FROM driftless.gw_epochs WHERE tenant = $1 ORDER BY id DESC LIMIT 1
             ON CONFLICT DO NOTHING",
            &[&tenant, &device, &now_ms()],
        )?;
        Ok(())
    }

    fn hello(&mut self, tenant: &str, device: &str, node: NodeId) -> Result<DeviceView> {
        let mut tx = self.client()?.transaction()?;
        let row = tx.query_one(
            "INSERT INTO driftless.gw_nodes(tenant, node, device) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, node) DO UPDATE SET device = coalesce(driftless.gw_nodes.device, excluded.device)
             RETURNING device, max_counter",
            &[&tenant, &&node.0[..], &device],
        )?;
        let (owner, counter): (String, i64) = (row.get(0), row.get(1));
        tx.execute(
            "INSERT INTO driftless.gw_epoch_devices(tenant, device, epoch, since_ms)
             SELECT $1, $2, epoch, $3 FROM driftless.gw_epochs WHERE tenant = $1 ORDER BY id DESC LIMIT 1
             ON CONFLICT DO NOTHING",
            &[&tenant, &device, &now_ms()],
        )?;
        let device_seq: i64 = tx
            .query_opt(
                "SELECT uplink_hwm FROM driftless.gw_devices WHERE tenant = $1 AND device = $2",
                &[&tenant, &device],
            )?
            .map_or(0, |r| r.get(0));
        tx.commit()?;
        Ok(DeviceView { node_counter: counter as u64, device_seq, node_owner: owner })
    }

    fn merge(&mut self, from: &Incoming<'_>, batch: &Batch) -> Result<MergeOutcome, MergeError> {
        // A tenant this store cannot hold is the operator's to fix (another store, another
        // name), never a refusal of the device's data: the batch stays with the device.
        if let Some(reason) = tables::unfit_tenant(from.tenant) {
            return Err(MergeError::Store(Error::Config(reason)));
        }
        let schema = self.served_schema()?;
        self.flush_touches()?;
        let limits = self.limits.clone();
        let tag = self.tags.next();
        let cloud_tag = self.tags.next();
        self.client()?;
        merge::merge(&mut self.client, &mut self.stmts, &limits, from, schema.as_deref(), (tag, cloud_tag), batch)
    }

    fn log_after(
        &mut self,
        tenant: &str,
        cursor: u64,
        limit: usize,
        chain: Option<&Chain>,
    ) -> Result<(Vec<Logged>, bool)> {
        self.client()?;
        log::after(&mut self.client, &mut self.stmts, &self.limits, tenant, (cursor, limit), chain)
    }

    fn chain_before(&mut self, tenant: &str, chain: &Chain, before: u64) -> Result<LogCursor> {
        self.client()?;
        log::chain_before(&mut self.client, &mut self.stmts, tenant, chain, before)
    }

    fn rows_size(&mut self, tenant: &str, table: Option<&str>) -> Result<(u64, u64)> {
        self.client()?;
        log::size(&mut self.client, &mut self.stmts, tenant, table)
    }

    fn scope_count(&mut self, tenant: &str, table: &str, skey: &[u8]) -> Result<u64> {
        self.client()?;
        log::scope_count(&mut self.client, &mut self.stmts, tenant, table, skey)
    }

    fn kept(&mut self) -> Option<&mut Kept> {
        Some(&mut self.kept)
    }

    fn row_state(&mut self, tenant: &str, table: &str, pk: &[Value]) -> Result<Option<Batch>> {
        self.client()?;
        log::row_state(&mut self.client, &mut self.stmts, &self.limits, tenant, table, pk)
    }

    fn table_rows(&mut self, tenant: &str, table: &str, after: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Batch)>> {
        self.client()?;
        log::table_rows(&mut self.client, &mut self.stmts, &self.limits, tenant, table, None, after, limit)
    }

    fn scope_rows(
        &mut self,
        tenant: &str,
        table: &str,
        skey: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Batch)>> {
        self.client()?;
        log::table_rows(&mut self.client, &mut self.stmts, &self.limits, tenant, table, Some(skey), after, limit)
    }

    fn log_head(&mut self, tenant: &str) -> Result<LogCursor> {
        self.client()?;
        log::head(&mut *self.client, &mut self.stmts, tenant)
    }

    fn log_tag(&mut self, tenant: &str, position: u64) -> Result<Option<u64>> {
        if position == 0 {
            return Ok(Some(0));
        }
        let row = self.client()?.query_opt(
            "SELECT tag FROM driftless.gw_log WHERE tenant = $1 AND seq = $2",
            &[&tenant, &(position as i64)],
        )?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    fn snapshot_page(&mut self, tenant: &str, resume: &[u8], max_rows: usize) -> Result<Option<SnapshotPage>> {
        self.client()?;
        log::snapshot_page(&mut self.client, &self.limits, tenant, resume, max_rows)
    }

    fn touch_device(&mut self, tenant: &str, device: &str, cursor: Option<u64>) -> Result<()> {
        // Reads do not write: pulls are noted here and written in bulk.
        let e = self.touched.entry((tenant.to_owned(), device.to_owned())).or_insert((0, None));
        e.0 = now_ms();
        if cursor.is_some() {
            e.1 = cursor;
        }
        if self.touched_at.elapsed() >= TOUCH_EVERY {
            self.flush_touches()?;
        }
        Ok(())
    }

    fn devices(&mut self, tenant: &str) -> Result<Vec<DeviceInfo>> {
        self.flush_touches()?;
        let head = self.log_head(tenant)?.position;
        let rows = self.client()?.query(
            "SELECT device, first_seen_ms, last_seen_ms, uplink_hwm, downlink_cursor FROM driftless.gw_devices
             WHERE tenant = $1 ORDER BY device COLLATE \"C\"",
            &[&tenant],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let cursor = r.get::<_, i64>(4) as u64;
                DeviceInfo {
                    tenant: tenant.to_owned(),
                    device: r.get(0),
                    first_seen_ms: r.get(1),
                    last_seen_ms: r.get(2),
                    uplink_hwm: r.get(3),
                    downlink_cursor: cursor,
                    lag: head.saturating_sub(cursor),
                }
            })
            .collect())
    }

    fn tenants(&mut self) -> Result<Vec<String>> {
        self.flush_touches()?;
        let rows = self.client()?.query(
            "SELECT tenant FROM (SELECT tenant FROM driftless.gw_devices
                                 UNION SELECT tenant FROM driftless.gw_dead_letters) AS u
             ORDER BY tenant COLLATE \"C\"",
            &[],
        )?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    fn dead_letter(&mut self, tenant: &str, device: &str, reason: &str, payload: &[u8]) -> Result<i64> {
        let id = keep_dead_letter(self.client()?, tenant, device, reason, payload)?;
        // A device's letters are capped (what they held stays with it, set aside there too);
        // refused plain-SQL writes, kept by keep_dead_letter alone, are not.
        self.client()?.execute(
            "DELETE FROM driftless.gw_dead_letters WHERE tenant = $1 AND device = $2 AND id <= (
                 SELECT id FROM driftless.gw_dead_letters WHERE tenant = $1 AND device = $2
                 ORDER BY id DESC OFFSET $3 LIMIT 1)",
            &[&tenant, &device, &DEAD_LETTERS_PER_DEVICE],
        )?;
        Ok(id)
    }

    fn dead_letters(&mut self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        let limit = if filter.limit == 0 { i64::MAX } else { filter.limit as i64 };
        let rows = self.client()?.query(
            "SELECT id, tenant, device, received_ms, reason, payload, size, sha256 FROM driftless.gw_dead_letters
             WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR device = $2)
               AND ($3::text IS NULL OR strpos(reason, $3) > 0) AND ($4::bigint IS NULL OR received_ms >= $4)
             ORDER BY id DESC LIMIT $5",
            &[&filter.tenant, &filter.device, &filter.reason, &filter.since_ms, &limit],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                tenant: r.get(1),
                device: r.get(2),
                received_ms: r.get(3),
                reason: r.get(4),
                payload: r.get(5),
                size: r.get::<_, i64>(6) as u64,
                sha256: r.get(7),
            })
            .collect())
    }

    fn purge_dead_letters(&mut self, before_ms: i64) -> Result<usize> {
        Ok(self.client()?.execute("DELETE FROM driftless.gw_dead_letters WHERE received_ms < $1", &[&before_ms])?
            as usize)
    }

    fn note_attempt(&mut self, key: &[u8; 32]) -> Result<u32> {
        let row = self.client()?.query_one(
            "INSERT INTO driftless.gw_attempts(key, count, first_ms, last_ms) VALUES ($1, 1, $2, $2)
             ON CONFLICT (key) DO UPDATE SET count = driftless.gw_attempts.count + 1, last_ms = excluded.last_ms
             RETURNING count",
            &[&&key[..], &now_ms()],
        )?;
        Ok(row.get::<_, i32>(0) as u32)
    }

    fn attempts(&mut self, key: &[u8; 32]) -> Result<Option<(u32, i64)>> {
        let row = self
            .client()?
            .query_opt("SELECT count, last_ms FROM driftless.gw_attempts WHERE key = $1", &[&&key[..]])?;
        Ok(row.map(|r| (r.get::<_, i32>(0) as u32, r.get(1))))
    }

    fn unnote_attempt(&mut self, key: &[u8; 32]) -> Result<()> {
        let client = self.client()?;
        client.execute("UPDATE driftless.gw_attempts SET count = count - 1 WHERE key = $1", &[&&key[..]])?;
        client.execute("DELETE FROM driftless.gw_attempts WHERE key = $1 AND count <= 0", &[&&key[..]])?;
        Ok(())
    }

    fn clear_attempts(&mut self, key: &[u8; 32]) -> Result<()> {
        self.client()?.execute("DELETE FROM driftless.gw_attempts WHERE key = $1", &[&&key[..]])?;
        Ok(())
    }

    fn begin_group(&mut self) -> Result<()> {
        if !self.group.is_open() {
            self.client()?;
            self.group.open(&mut self.client)?;
        }
        Ok(())
    }

    fn commit_group(&mut self) -> Result<()> {
        if !self.group.close() {
            return Ok(());
        }
        let flushed = self.client().and_then(group::flush_log);
        // Out of the group, commits wait for the disk again (a delivery handled alone, cloud
        // writes taken in, a schema loaded are answered or announced right after them). A
        // connection that cannot be told is gone, and a new one starts with the default.
        if !self.client.is_closed() {
            let _ = self.client.batch_execute("SET synchronous_commit TO DEFAULT");
        }
        let result = self.group.outcome(flushed);
        if result.is_err() {
            // An epoch or schema read or made in the group may be gone with it.
            self.epochs.clear();
            self.schema = None;
            self.kept.forget();
        }
        result
    }

    fn register_device(
        &mut self,
        tenant: &str,
        device: &str,
        role: &str,
        secret: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        registry::register(self.client()?, tenant, device, role, secret, now_ms)
    }

    fn remove_device(&mut self, tenant: &str, device: &str, now_ms: i64) -> Result<bool> {
        registry::remove(self.client()?, tenant, device, now_ms)
    }

    fn registry(&mut self, tenant: Option<&str>) -> Result<Vec<Registered>> {
        registry::list(self.client()?, tenant)
    }

    fn standing(&mut self, tenant: &str, device: &str) -> Result<Standing> {
        self.client()?;
        registry::standing(&mut self.client, &mut self.stmts, tenant, device)
    }

    fn set_params(&mut self, tenant: &str, device: &str, params: &Params) -> Result<bool> {
        registry::set_params(self.client()?, tenant, device, params)
    }

    fn scope_told(&mut self, tenant: &str, device: &str, version: u64, feed: &str) -> Result<()> {
        registry::scope_told(self.client()?, tenant, device, version, feed)
    }

    fn clock_skew(&mut self, tenant: &str) -> Result<Vec<SkewedNode>> {
        let rows = self.client()?.query(
            "SELECT node, max_hlc, bounded, last_ms FROM driftless.gw_clock_skew WHERE tenant = $1 ORDER BY node",
            &[&tenant],
        )?;
        rows.into_iter()
            .map(|r| {
                let node: Vec<u8> = r.get(0);
                Ok(SkewedNode {
                    node: NodeId::from_slice(&node).ok_or_else(|| Error::Corrupt("skewed node id".into()))?,
                    max_hlc: Hlc(r.get::<_, i64>(1) as u64),
                    bounded: r.get::<_, i64>(2) as u64,
                    last_ms: r.get(3),
                })
            })
            .collect()
    }

    fn served_schema(&mut self) -> Result<Option<Arc<ServedSchema>>> {
        self.client()?;
        let stmt = self.stmts.get(&mut *self.client, "SELECT max(version) FROM driftless.gw_sync_schema")?;
        let version: Option<i64> = self.client.query_one(&stmt, &[])?.get(0);
        let Some(version) = version.map(|v| v as u64) else { return Ok(None) };
        if let Some(cached) = self.schema.as_ref().filter(|s| s.version == version) {
            return Ok(Some(cached.clone()));
        }
        let text: String = self
            .client()?
            .query_one("SELECT text FROM driftless.gw_sync_schema WHERE version = $1", &[&(version as i64)])?
            .get(0);
        let served = Arc::new(ServedSchema::parse(version, text)?);
        self.schema = Some(served.clone());
        Ok(Some(served))
    }

    fn install_schema(&mut self, text: &str) -> Result<u64> {
        let new = SyncSchema::parse(text)?;
        let limits = self.limits.clone();
        let mut tx = self.client()?.transaction()?;
        // Versions are numbered under one lock: two instances loading at once get two. Every
        // merge shares it (`tables::begin_gateway_tx`): none runs while stored rows are counted.
        tx.execute("SELECT pg_advisory_xact_lock($1, 1)", &[&migrate::LOCK_SPACE])?;
        let current =
            tx.query_opt("SELECT version, text FROM driftless.gw_sync_schema ORDER BY version DESC LIMIT 1", &[])?;
        let (version, added, old) = match current {
            Some(r) => {
                let (version, old): (i64, String) = (r.get(0), r.get(1));
                let old = SyncSchema::parse(&old).map_err(|e| Error::Corrupt(format!("stored schema: {e}")))?;
                if old == new {
                    return Ok(version as u64);
                }
                new.check_replaces(&old, version as u64)?;
                (version + 1, added_tables(&old, &new), Some(old))
            }
            None => (1, new.clone(), None),
        };
        // Rows synced before any schema must fit the version that first declares their table.
        {
            let unfit = unfit_rows(&limits, &added, |table| {
                let arities = tx
                    .query("SELECT DISTINCT key_len::bigint FROM driftless.gw_tables WHERE tbl = $1", &[&table])?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                let states = tx
                    .query("SELECT state FROM driftless.gw_rows WHERE tbl = $1", &[&table])?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                Ok((arities, states))
            })?;
            if !unfit.is_empty() {
                return Err(driftless_core::SchemaError::UnfitRows(unfit).into());
            }
        }
        refs::count_references(&mut tx, &mut Stmts::default(), &limits, old.as_ref(), &new)?;
        tx.execute(
            "INSERT INTO driftless.gw_sync_schema(version, text, loaded_ms) VALUES ($1, $2, $3)",
            &[&version, &text, &now_ms()],
        )?;
        tx.commit()?;
        Ok(version as u64)
    }

    fn prepare_tenant(&mut self, tenant: &str) -> Result<()> {
        let Some(served) = self.served_schema()? else { return Ok(()) };
        if let Some(reason) = tables::unfit_tenant(tenant) {
            // Its batches are refused with this reason; the other tenants are served.
            tracing::warn!(%reason, "tenant without cloud tables");
            return Ok(());
        }
        let limits = self.limits.clone();
        let mut tx = self.client()?.transaction()?;
        tables::begin_gateway_tx(&mut tx, tenant)?;
        tables::check_schema_current(&mut tx, Some(&served))?;
        tables::materialize(&mut tx, &limits, tenant, &served)?;
        tx.commit()?;
        Ok(())
    }

    fn ingest_cloud_writes(&mut self, now_ms: u64) -> Result<Vec<(String, LogEntry)>> {
        let Some(served) = self.served_schema()? else { return Ok(Vec::new()) };
        let tenants: Vec<String> = self
            .client()?
            .query("SELECT tenant FROM driftless.gw_tenant_tables ORDER BY tenant", &[])?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let mut logged = Vec::new();
        // One transaction per tenant with writes waiting, if no writer holds its lock now (its
        // commit notifies again); a tenant that fails does not hold the others back.
        for tenant in tenants {
            match self.ingest_tenant(&tenant, &served, now_ms) {
                Ok(Some(entry)) => logged.push((tenant, entry)),
                Ok(None) => {}
                Err(e) if e.is_transient() => tracing::debug!(%tenant, "SQL writes left for the next look: {e}"),
                Err(e) => tracing::warn!(%tenant, "taking in SQL writes failed: {e}"),
            }
        }
        Ok(logged)
    }

    fn close(&mut self) -> Result<()> {
        self.flush_touches()
    }

    fn watch_cloud_writes(&mut self, wake: Box<dyn Fn() + Send>) -> Result<Option<super::Watch>> {
        let mut listener = listen(&self.config)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let config = self.config.clone();
        std::thread::Builder::new()
            .name("driftless-pg-listen".into())
            .spawn(move || {
                use postgres::fallible_iterator::FallibleIterator;
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    let next = listener.notifications().timeout_iter(Duration::from_secs(1)).next();
                    match next {
                        Ok(Some(_)) => wake(),
                        Ok(None) if !listener.is_closed() => {}
                        // The connection ended (a restart, a failover): listen again, and look
                        // once, for writes committed while no one listened.
                        _ => {
                            tracing::warn!("the PostgreSQL listener's connection ended; listening again");
                            std::thread::sleep(Duration::from_secs(1));
                            if let Ok(again) = listen(&config) {
                                listener = again;
                                wake();
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Watch(e.to_string()))?;
        Ok(Some(Box::new(StopOnDrop(stop))))
    }
}

impl PgStore {
    /// Takes in one tenant's waiting SQL writes; whether any were logged.
    fn ingest_tenant(&mut self, tenant: &str, served: &ServedSchema, now_ms: u64) -> Result<Option<LogEntry>> {
        let limits = self.limits.clone();
        let tag = self.tags.next();
        self.client()?;
        // A look without the lock first: most wake-ups are for another tenant.
        let mut look = self.client.transaction()?;
        let journals = tables::journals(&mut look, tenant)?;
        if !tables::pending(&mut look, tenant, &journals)? {
            return Ok(None);
        }
        look.commit()?;
        let mut tx = self.client.transaction()?;
        if !tables::try_begin_gateway_tx(&mut tx, tenant)? {
            return Ok(None);
        }
        tables::check_schema_current(&mut tx, Some(served))?;
        tables::materialize(&mut tx, &limits, tenant, served)?;
        let logged = merge::ingest_pending(&mut tx, &mut self.stmts, &limits, tenant, served, now_ms, tag)?;
        tx.commit()?;
        Ok(logged)
    }
}

#[cfg(test)]
mod tests;
