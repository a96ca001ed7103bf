//! The device store: one SQLite database holding the app's tables and the engine's state.
//!
//! There is exactly one writer connection, owned by [`Store`]; every mutation runs in one
//! `BEGIN IMMEDIATE` transaction through [`Store::write`]. Other connections and processes may
//! write the app's tables freely: the capture triggers journal their changes.

mod apply;
mod capture;
mod catalog;
mod conflicts;
mod cursor;
mod declared;
mod evict;
mod identity;
mod meta;
mod outbox;
mod pulled;
mod reconcile;
mod refusals;
mod row_sql;
mod schema;
mod seal;
mod settings;
mod track;

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use self::catalog::Catalog;
use self::meta::Nodes;
use crate::batch::Batch;
use crate::clock::{Hlc, HlcClock, NodeId};
use crate::codec::Limits;
use crate::error::{Error, Result};
use crate::policy::TableSpec;
use crate::protocol::{LogCursor, Receipts};
use crate::value::Value;

pub use self::apply::{ApplyReport, ChangedRow};
pub use self::conflicts::Conflict;
pub use self::cursor::{SnapshotAt, SnapshotProgress};
pub use self::declared::SchemaApplied;
pub use self::identity::{Confirmed, GatewayView, Identity};
pub use self::outbox::{OutboxBatch, SnapshotCursor};
pub use self::refusals::Refused;
pub use self::seal::SealReport;

/// Milliseconds since the Unix epoch, injectable so tests control time.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub(crate) fn system_clock() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How a store is opened.
#[derive(Clone)]
pub struct StoreOptions {
    /// The source role this node writes as, for `authority` columns (e.g. "crm").
    pub role: String,
    /// How far ahead of local time a remote timestamp may pull the local clock.
    pub max_clock_drift_ms: u64,
    pub clock: WallClock,
    /// Bounds applied to stored metadata when decoding it.
    pub limits: Limits,
    /// The key the database is encrypted with (SQLCipher; the `sqlcipher` feature). `None`:
    /// not encrypted. Every connection the store opens uses it; so must the app's own.
    pub key: Option<String>,
    /// Whether the store's connection overwrites deleted content with zeros (SQLite's
    /// `secure_delete`), so that what an erasing delete removes leaves no bytes in the
    /// database file. On by default; its cost is in BENCHMARKS.md. An app writing through a
    /// connection of its own sets the pragma on it too.
    pub secure_delete: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            role: String::new(),
            max_clock_drift_ms: 5 * 60_000,
            clock: Arc::new(system_clock),
            limits: Limits::default(),
            key: None,
            secure_delete: true,
        }
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("role", &self.role)
            .field("max_clock_drift_ms", &self.max_clock_drift_ms)
            .finish()
    }
}

/// In-memory mirror of the engine's state; reloaded from the database whenever a write
/// transaction fails, so it never drifts from what was committed.
#[derive(Debug)]
pub(crate) struct Inner {
    node: NodeId,
    role: String,
    clock: HlcClock,
    /// The last dot counter this node issued.
    counter: u64,
    nodes: Nodes,
    catalog: Catalog,
    /// `PRAGMA schema_version` when the tracked tables were last checked against the catalog.
    checked_schema: i64,
    /// The `meta_version` this mirror was loaded at; another process that tracks a table or
    /// changes the node bumps it, and the next transaction reloads.
    meta_version: i64,
    /// While set, sealing leaves the journal alone: the sync layer has not yet confirmed that
    /// this store's node id is still its own (a restored backup would reissue dots).
    seal_held: bool,
    opts: StoreOptions,
}

impl Inner {
    fn now(&self) -> u64 {
        (self.opts.clock)()
    }

    fn load(conn: &Connection, opts: StoreOptions) -> Result<Inner> {
        let get = |key: &str| -> Result<Option<rusqlite::types::Value>> {
            Ok(conn.query_row("SELECT value FROM _driftless_state WHERE key = ?1", [key], |r| r.get(0)).optional()?)
        };
        let node = match get("node_id")? {
            Some(rusqlite::types::Value::Blob(b)) => {
                NodeId::from_slice(&b).ok_or_else(|| Error::Corrupt("node id".into()))?
            }
            _ => return Err(Error::Corrupt("missing node id".into())),
        };
        let int = |v: Option<rusqlite::types::Value>| match v {
            Some(rusqlite::types::Value::Integer(i)) => i as u64,
            _ => 0,
        };
        let role = match get("role")? {
            Some(rusqlite::types::Value::Text(t)) => t,
            _ => String::new(),
        };
        let clock = HlcClock::new(Hlc(int(get("hlc")?)), opts.max_clock_drift_ms);
        Ok(Inner {
            node,
            role,
            clock,
            counter: int(get("counter")?),
            nodes: Nodes::load(conn)?,
            catalog: Catalog::load(conn)?,
            checked_schema: -1,
            meta_version: meta_version(conn)?,
            seal_held: false,
            opts,
        })
    }

    /// Reloads the mirror from the database, keeping what lives only in memory.
    fn reload(&mut self, conn: &Connection) -> Result<()> {
        let held = self.seal_held;
        *self = Inner::load(conn, self.opts.clone())?;
        self.seal_held = held;
        Ok(())
    }

    /// Tells other connections' stores to reload their mirror (inside the current transaction).
    fn bump_meta_version(&mut self, conn: &Connection) -> Result<()> {
        self.meta_version += 1;
        settings::set(conn, "meta_version", &self.meta_version)
    }

    /// Saves the clock and the dot counter (inside the current transaction).
    fn save_clocks(&self, conn: &Connection) -> Result<()> {
        settings::set(conn, "hlc", &(self.clock.last().0 as i64))?;
        settings::set(conn, "counter", &(self.counter as i64))
    }
}

fn meta_version(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM _driftless_state WHERE key = 'meta_version'")?
        .query_row([], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0))
}

/// A device's sync store.
pub struct Store {
    conn: Connection,
    /// A read-only connection, opened on first use and kept: reads see a committed snapshot
    /// and never wait for the writer.
    reader: RefCell<Option<Connection>>,
    path: PathBuf,
    inner: Inner,
    /// Set when the in-memory mirror could not be reloaded after a rollback: it may then hold
    /// dictionary entries the database lost, so every later write is refused.
    poisoned: bool,
    /// Sync state noted to be written with the next transaction ([`Store::note_sync_state`]).
    noted: Vec<(String, String)>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("node", &self.inner.node).finish()
    }
}

/// `conn` unlocked with `key` (SQLCipher), and checked to be readable: a wrong or missing key
/// is [`Error::WrongKey`], a key without encryption in this build
/// [`Error::EncryptionUnavailable`].
fn keyed(conn: Connection, path: &Path, key: Option<&str>) -> Result<Connection> {
    if let Some(key) = key {
        // Plain SQLite ignores `PRAGMA key`: a build without SQLCipher must not pretend.
        let cipher: Option<String> = conn.query_row("PRAGMA cipher_version", [], |r| r.get(0)).optional()?;
        if cipher.is_none() {
            return Err(Error::EncryptionUnavailable);
        }
        conn.pragma_update(None, "key", key)?;
    }
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)) {
        Ok(_) => Ok(conn),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::NotADatabase => {
            Err(Error::WrongKey(path.display().to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` in WAL mode and brings the engine's
    /// tables up to date. A new database gets a fresh random node id.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let mut conn = keyed(Connection::open(&path)?, &path, opts.key.as_deref())?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "secure_delete", opts.secure_delete)?;
        if opts.secure_delete {
            // Stale page images in the log are cut off when it restarts after a checkpoint.
            conn.pragma_update(None, "journal_size_limit", 0)?;
        }
        conn.set_prepared_statement_cache_capacity(256);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        schema::upgrade(&tx)?;
        let has_node: bool =
            tx.query_row("SELECT EXISTS(SELECT 1 FROM _driftless_state WHERE key = 'node_id')", [], |r| r.get(0))?;
        if !has_node {
            let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
            tx.execute("INSERT INTO _driftless_state(key, value) VALUES ('node_id', ?1)", [&node.0[..]])?;
            tx.execute(
                "INSERT INTO _driftless_nodes(idx, id, role) VALUES (0, ?1, ?2)",
                rusqlite::params![&node.0[..], opts.role],
            )?;
        }
        let role: Option<String> =
            tx.query_row("SELECT value FROM _driftless_state WHERE key = 'role'", [], |r| r.get(0)).optional()?;
        match role {
            None => {
                tx.execute("INSERT INTO _driftless_state(key, value) VALUES ('role', ?1)", [&opts.role])?;
            }
            // An empty role in the options keeps the stored one (tools that only look).
            Some(stored) if opts.role.is_empty() || stored == opts.role => {}
            // A new role is a new identity: writes already made keep the role they were made
            // under on every replica, whenever each learns of it.
            Some(_) => {
                let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
                tx.execute("UPDATE _driftless_state SET value = ?1 WHERE key = 'node_id'", [&node.0[..]])?;
                tx.execute(
                    "INSERT INTO _driftless_nodes(idx, id, role) SELECT coalesce(max(idx), -1) + 1, ?1, ?2 FROM _driftless_nodes",
                    rusqlite::params![&node.0[..], opts.role],
                )?;
                tx.execute("UPDATE _driftless_state SET value = ?1 WHERE key = 'role'", [&opts.role])?;
            }
        }
        schema::upgrade_journals(&tx)?;
        tx.commit()?;
        let inner = Inner::load(&conn, opts)?;
        Ok(Store { conn, reader: RefCell::new(None), path, inner, poisoned: false, noted: Vec::new() })
    }

    /// This replica's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// The source role this store writes as (for `authority` columns).
    pub fn role(&self) -> &str {
        &self.inner.role
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction on the store's connection; app writes made through
    /// it are captured like any other. Rolls back if `f` fails.
    pub fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.transact(|tx, _| f(tx))
    }

    /// Copies the write-ahead log into the database file and truncates the log. Until then
    /// the log holds the pages as they were before recent writes, erased values included;
    /// SQLite checkpoints on its own as the log grows, but leaves the file's old frames in
    /// place. Waits for readers of older snapshots (up to the busy timeout); returns whether
    /// the whole log was copied.
    pub fn checkpoint(&mut self) -> Result<bool> {
        let busy: i64 = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        Ok(busy == 0)
    }

    /// Runs `f` on a separate read-only connection (a consistent WAL snapshot).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        // Taken out for the call, so a nested read opens a connection of its own.
        let cached = self.reader.borrow_mut().take();
        let conn = match cached {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                let c = keyed(c, &self.path, self.inner.opts.key.as_deref())?;
                c.busy_timeout(Duration::from_secs(10))?;
                c
            }
        };
        let result = f(&conn);
        // Keep the connection only if `f` left no statement open on it.
        if conn.is_autocommit() {
            *self.reader.borrow_mut() = Some(conn);
        }
        result
    }

    fn transact<T>(&mut self, f: impl FnOnce(&Transaction<'_>, &mut Inner) -> Result<T>) -> Result<T> {
        if self.poisoned {
            return Err(Error::Corrupt("the store could not recover from an earlier failure; open it again".into()));
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process (the command line tracking a table) may have changed what the
        // mirror holds; the write lock is held now, so what is read stays true.
        let mut result = match meta_version(&tx) {
            Ok(v) if v != self.inner.meta_version => self.inner.reload(&tx),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        // Noted sync state commits with this transaction, or is dropped with it.
        let noted = std::mem::take(&mut self.noted);
        for (key, value) in &noted {
            result = result.and_then(|()| settings::set(&tx, key, value));
        }
        match result.and_then(|()| f(&tx, &mut self.inner)).and_then(|v| tx.commit().map(|()| v).map_err(Error::from)) {
            Ok(v) => Ok(v),
            Err(e) => {
                // Noted state waits for the next transaction that commits.
                self.noted = noted;
                // The transaction rolled back; bring the in-memory mirror back in line with it.
                if self.inner.reload(&self.conn).is_err() {
                    self.poisoned = true;
                }
                Err(e)
            }
        }
    }

    /// Starts tracking `table` (or updates the spec of, and captures new columns of, a table
    /// already tracked). Rows never synced are captured as inserts; rows synced before (the
    /// table was tracked, untracked, and is tracked again) only with what changed meanwhile.
    /// When remote changes to the table may have been skipped, the pull cursor is reset so
    /// the sync layer fetches the current state again.
    pub fn track(&mut self, table: &str, spec: TableSpec) -> Result<()> {
        self.transact(|tx, inner| {
            let tracked = track::track(tx, inner, table, spec)?;
            if tracked.needs_bootstrap {
                cursor::reset(tx)?;
            }
            inner.bump_meta_version(tx)
        })
    }

    /// Follows version `version` of the declared sync schema (its TOML `text`, as the gateway
    /// serves it): creates the tables it declares, adds the columns a later version added, and
    /// tracks every table with its declared spec, all in one transaction. An older or equal
    /// version than the one followed changes nothing. A local table that contradicts the
    /// schema is [`Error::SchemaMismatch`], and nothing changes.
    pub fn follow_schema(&mut self, version: u64, text: &str) -> Result<SchemaApplied> {
        let schema = crate::schema::SyncSchema::parse(text)?;
        self.transact(|tx, inner| {
            let done = declared::apply(tx, inner, &schema, version, text)?;
            if !done.tracked.is_empty() || !done.untracked.is_empty() {
                inner.bump_meta_version(tx)?;
            }
            Ok(done)
        })
    }

    /// The sync schema version this store follows, and its text (`None` before the first).
    pub fn schema(&self) -> Result<Option<(u64, String)>> {
        declared::current(&self.conn)
    }

    /// Stops tracking `table`: removes its triggers and journal. Its sync metadata and the
    /// changes not yet acknowledged stay, so they still ship and tracking it again reissues
    /// nothing; remote changes to it are skipped meanwhile.
    pub fn untrack(&mut self, table: &str) -> Result<()> {
        self.transact(|tx, inner| {
            // Not sealed here: only the sync layer seals, once the gateway has confirmed this
            // store's node id (a store restored from a backup would reissue dots otherwise).
            track::untrack(tx, inner, table)?;
            inner.bump_meta_version(tx)
        })
    }

    /// Names and specs of the tracked tables.
    pub fn tracked(&self) -> Vec<(String, TableSpec)> {
        self.inner.catalog.tables.iter().filter(|t| t.tracked).map(|t| (t.name.clone(), t.spec.clone())).collect()
    }

    /// Turns journaled local changes into outbox entries with causal metadata.
    pub fn seal(&mut self) -> Result<SealReport> {
        self.transact(|tx, inner| seal::seal(tx, inner))
    }

    /// Seals, then returns up to `max_rows` of the oldest unacknowledged changes as a batch.
    pub fn outbox_batch(&mut self, max_rows: usize) -> Result<Option<OutboxBatch>> {
        self.transact(|tx, inner| {
            seal::seal(tx, inner)?;
            outbox::read(tx, inner, 0, i64::MAX, max_rows)
        })
    }

    /// Like [`Store::outbox_batch`] but starting after sequence `after` (to keep several
    /// batches in flight) and without sealing.
    pub fn outbox_batch_after(&mut self, after: i64, max_rows: usize) -> Result<Option<OutboxBatch>> {
        self.transact(|tx, inner| outbox::read(tx, inner, after, i64::MAX, max_rows))
    }

    /// The unacknowledged entries with sequence numbers in `first..=last`, to send a batch
    /// again exactly as it was.
    pub fn outbox_range(&mut self, first: i64, last: i64) -> Result<Option<OutboxBatch>> {
        self.transact(|tx, inner| outbox::read(tx, inner, first.saturating_sub(1), last, usize::MAX >> 1))
    }

    /// Deletes acknowledged outbox entries with sequence numbers in `first..=last`.
    pub fn ack(&mut self, first: i64, last: i64) -> Result<usize> {
        self.transact(|tx, _| outbox::ack(tx, first, last))
    }

    /// Like [`Store::ack`], but the entries at the given positions within the range (the
    /// rows of the batch the gateway refused, with its reasons) are moved aside to
    /// `_driftless_rejected` instead of deleted, and `receipts`, if given, become the
    /// receipts to show (see [`Identity::receipts`]).
    pub fn ack_refusing(
        &mut self,
        first: i64,
        last: i64,
        refused: &[(u32, String)],
        receipts: Option<&Receipts>,
    ) -> Result<usize> {
        self.transact(|tx, inner| {
            if let Some(receipts) = receipts {
                identity::save_receipts(tx, receipts)?;
            }
            outbox::ack_refusing(tx, first, last, refused, inner.now())
        })
    }

    /// Replaces the receipts to show (see [`Identity::receipts`]).
    pub fn keep_receipts(&mut self, receipts: &Receipts) -> Result<()> {
        self.transact(|tx, _| identity::save_receipts(tx, receipts))
    }

    /// Holds sealing: local writes stay in the journal (still captured, still counted as
    /// pending) until [`Store::confirm_identity`], and remote batches are refused. The sync
    /// layer holds it from start-up and on every disconnect until the gateway has confirmed
    /// that this store's node id is still its own.
    pub fn hold_seal(&mut self) {
        self.inner.seal_held = true;
    }

    /// Whether sealing is held.
    pub fn seal_held(&self) -> bool {
        self.inner.seal_held
    }

    /// What this store tells the gateway about itself when it connects.
    pub fn identity(&self) -> Result<Identity> {
        identity::identity(&self.conn, &self.inner)
    }

    /// Takes in what the gateway has merged from this device: a store behind its own past
    /// takes a new node id; a new gateway epoch queues every row to be sent again. Either
    /// resets the pull cursor. Releases a held seal.
    pub fn confirm_identity(&mut self, view: &GatewayView) -> Result<Confirmed> {
        let confirmed = self.transact(|tx, inner| identity::confirm(tx, inner, view))?;
        self.inner.seal_held = false;
        Ok(confirmed)
    }

    /// Moves outbox entries `first..=last` aside (to `_driftless_rejected`, kept with
    /// `reason`) after the gateway refused them, so later changes keep flowing.
    pub fn reject(&mut self, first: i64, last: i64, reason: &str) -> Result<usize> {
        self.transact(|tx, inner| outbox::reject(tx, first, last, reason, inner.now()))
    }

    /// Remote changes the app's own table constraints refused: `(table, key, reason)`. Their
    /// state is merged; the app row catches up with the next change to it.
    pub fn unapplied(&self) -> Result<Vec<(String, Vec<Value>, String)>> {
        refusals::unapplied(&self.conn, &self.inner)
    }

    /// Changes that were not merged at all (a remote row this store cannot take, a local
    /// write too large to sync), oldest first.
    pub fn refused(&self) -> Result<Vec<Refused>> {
        refusals::list(&self.conn, &self.inner.opts.limits)
    }

    /// Number of outbox entries moved aside after a refusal.
    pub fn rejected_count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM _driftless_rejected", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The scope version this store holds its rows under (`None`: never told one).
    pub fn scope_version(&self) -> Result<Option<u64>> {
        evict::scope_version(&self.conn)
    }

    /// The device's scope changed to `version`: drops every row of the scoped `tables` (the
    /// local changes waiting in the outbox still ship) and resets the pull cursor, so the
    /// next pull fetches the new scope whole. Returns the rows dropped.
    pub fn rescope(&mut self, version: u64, tables: &[String]) -> Result<usize> {
        if self.inner.seal_held {
            // Local writes must be sealed first, and sealing waits for the gateway.
            return Err(Error::SealHeld);
        }
        self.transact(|tx, inner| {
            // Local writes first: sealed, they are the app's changes and ship; the journals
            // then hold only what the drops capture.
            seal::seal(tx, inner)?;
            evict::rescope(tx, inner, version, tables)
        })
    }

    /// Where this replica has caught up to in the gateway's log (`None` before the first
    /// snapshot, or after something made the current state worth fetching again), and how
    /// many times the cursor was reset so far.
    pub fn cursor(&self) -> Result<(Option<LogCursor>, u64)> {
        Ok((cursor::get(&self.conn)?, cursor::resets(&self.conn)?))
    }

    /// Number of local changes not yet acknowledged (sealed or still journaled).
    pub fn pending_changes(&self) -> Result<u64> {
        outbox::pending(&self.conn, &self.inner)
    }

    /// A page of the full state of every tracked row, for bootstrapping another replica.
    pub fn snapshot(
        &mut self,
        cursor: Option<&SnapshotCursor>,
        max_rows: usize,
    ) -> Result<(Batch, Option<SnapshotCursor>)> {
        outbox::snapshot(&self.conn, &self.inner, cursor, max_rows)
    }

    /// Every conflict currently held, oldest table first.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        conflicts::list(&self.conn, &self.inner)
    }

    /// Resolves a conflict on `column` of the row with key `pk` by writing `value`; the write
    /// dominates every concurrent version, so all replicas converge on it.
    pub fn resolve_conflict(&mut self, table: &str, pk: &[Value], column: &str, value: Value) -> Result<()> {
        self.transact(|tx, inner| conflicts::resolve(tx, inner, table, pk, column, value))
    }

    /// Nodes seen writing with clocks beyond the allowed drift, with the largest timestamp seen.
    pub fn clock_skew(&self) -> Result<Vec<(NodeId, Hlc)>> {
        let mut stmt = self.conn.prepare("SELECT node, hlc FROM _driftless_clock_skew ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (node, hlc) = row?;
            let node = NodeId::from_slice(&node).ok_or_else(|| Error::Corrupt("skew node id".into()))?;
            out.push((node, Hlc(hlc as u64)));
        }
        Ok(out)
    }
}
