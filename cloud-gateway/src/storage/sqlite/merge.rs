//! Merging one device batch into the SQLite store, in one transaction.
//!
//! Everything that could make a row unusable for some replica is checked before it is written:
//! a NULL key part, a key whose arity differs from the table's, a state grown past the decode
//! limits. Such a row is refused (and listed, so the device moves just it aside) while the rest
//! of the batch is merged, so nothing any device would refuse ever enters the log and no good
//! row is set aside with a bad one. Timestamps from a writer whose clock runs beyond the allowed drift are
//! bounded here, at the first replica that accepts them, and the bounded change is logged for
//! every device, its writer included.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::intake::{Admit, ClockBound, IntakeRules, RowStore, Written, merge_batch};
use driftless_core::scope::ScopeKey;
use driftless_core::{Batch, NodeId, RowChange, RowState, Value};
use rusqlite::{Connection, OptionalExtension};

use super::registry::Book;
use super::{cloud_writes, erasure, tables};
use crate::error::{Error, MergeError};
use crate::storage::common::{logged_moves, scope_rules};
use crate::storage::refs::{self, Named, RefBook};
use crate::storage::vouching::{all_bound_to, vouch};
use crate::storage::{Incoming, LogEntry, MergeOutcome, ServedSchema, ToLog};

/// Why this store cannot take a row's key, if it cannot. `arity` holds the key arity of
/// tables learned so far in this batch (new tables are recorded once their first row merges).
fn check_key(
    tx: &Connection,
    tenant: &str,
    row: &RowChange,
    arity: &mut HashMap<String, usize>,
) -> Result<Option<String>, Error> {
    if row.pk.contains(&Value::Null) {
        return Ok(Some(format!("a change to {:?} has a NULL key value", row.table)));
    }
    let known = match arity.get(&row.table) {
        Some(&n) => Some(n),
        None => {
            let stored: Option<i64> = tx
                .prepare_cached("SELECT key_len FROM gw_tables WHERE tenant = ?1 AND tbl = ?2")?
                .query_row(rusqlite::params![tenant, row.table], |r| r.get(0))
                .optional()?;
            stored.map(|n| n as usize)
        }
    };
    match known {
        Some(n) if n != row.pk.len() => {
            Ok(Some(format!("table {:?} has {n} key columns; a change to it has {}", row.table, row.pk.len())))
        }
        Some(_) => Ok(None),
        None => {
            arity.insert(row.table.clone(), row.pk.len());
            Ok(None)
        }
    }
}

/// The gateway's causal state and real tables as the row store the shared merge runs against.
struct Rows<'a> {
    tx: &'a Connection,
    limits: &'a Limits,
    tenant: &'a str,
    /// The sending device.
    device: &'a str,
    schema: Option<&'a ServedSchema>,
    /// Key arities of tables first seen in this batch (without a declared schema).
    new_tables: HashMap<String, usize>,
}

impl RowStore for Rows<'_> {
    type Error = Error;

    fn admit(&mut self, row: &RowChange) -> Result<Admit, Error> {
        // A declared schema says everything about a row's shape; without one, the first
        // change to a table sets its key arity.
        let refused = match self.schema {
            Some(served) => served.schema.check_device_row(row).err(),
            None => check_key(self.tx, self.tenant, row, &mut self.new_tables)?,
        };
        Ok(refused.map_or(Admit::Merge, Admit::Refuse))
    }

    fn load(&mut self, row: &RowChange) -> Result<(RowState, BTreeMap<NodeId, String>), Error> {
        let (stored, roles) = load_row(self.tx, self.limits, self.tenant, row, &encode_key(&row.pk))?;
        Ok((stored.state, roles))
    }

    fn written_by_sender(&mut self, state: &RowState) -> Result<bool, Error> {
        all_bound_to(&mut Book(self.tx), self.tenant, self.device, state)
    }

    fn holders(&mut self, table: &str, pk: &[Value]) -> Result<Vec<ScopeKey>, Error> {
        let mut book = RefRows { conn: self.tx, limits: self.limits, tenant: self.tenant };
        refs::holder_keys(&mut book, self.limits, table, pk)
    }

    fn write(&mut self, _: &RowChange, merged: RowChange, roles: &BTreeMap<NodeId, String>) -> Result<Written, Error> {
        let tx = self.tx;
        if let Some(table) = self.schema.and_then(|s| s.schema.table(&merged.table)) {
            // The real table's own constraints (NOT NULL of a row no write gave a value yet)
            // refuse this row only, never the batch.
            tx.execute_batch("SAVEPOINT gw_row")?;
            match tables::write_row(tx, self.tenant, table, &merged, roles) {
                Ok(()) => tx.execute_batch("RELEASE gw_row")?,
                Err(Error::Sqlite(e)) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
                    tx.execute_batch("ROLLBACK TO gw_row; RELEASE gw_row")?;
                    return Ok(Written::Refused(format!("the cloud table {:?} refuses the row: {e}", merged.table)));
                }
                Err(e) => return Err(e),
            }
        }
        let (key, table) = (encode_key(&merged.pk), merged.table.clone());
        tx.prepare_cached("INSERT OR REPLACE INTO gw_rows(tenant, tbl, pk, state) VALUES (?1, ?2, ?3, ?4)")?
            .execute(rusqlite::params![self.tenant, table, key, one_row_payload(roles, merged)])?;
        Ok(Written::Done)
    }
}

/// A stored row's state and the roles of the nodes in it.
pub(super) fn load_row(
    tx: &Connection,
    limits: &Limits,
    tenant: &str,
    row: &RowChange,
    key: &[u8],
) -> Result<(RowChange, BTreeMap<NodeId, String>), Error> {
    let stored: Option<Vec<u8>> = tx
        .prepare_cached("SELECT state FROM gw_rows WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?
        .query_row(rusqlite::params![tenant, row.table, key], |r| r.get(0))
        .optional()?;
    match stored {
        Some(bytes) => {
            let mut b = decode_payload(&bytes, limits)
                .map_err(|e| Error::Corrupt(format!("stored row of {:?}: {e}", row.table)))?;
            let stored = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
            Ok((stored, b.roles))
        }
        None => {
            Ok((RowChange { table: row.table.clone(), pk: row.pk.clone(), state: Default::default() }, BTreeMap::new()))
        }
    }
}

pub(super) fn one_row_payload(roles: &BTreeMap<NodeId, String>, row: RowChange) -> Vec<u8> {
    let roles = row.state.nodes().into_iter().filter_map(|n| roles.get(&n).map(|r| (n, r.clone()))).collect();
    encode_payload(&Batch { roles, rows: vec![row] })
}

/// Merges `batch`; `tag` is the tag its log entry gets, if one is written.
pub(super) fn merge(
    tx: super::Unit<'_>,
    limits: &Limits,
    at: &Incoming<'_>,
    schema: Option<&ServedSchema>,
    tags: &mut super::Tags,
    batch: &Batch,
) -> Result<MergeOutcome, MergeError> {
    // Sequence numbers no device could have issued would wedge it (it adopts the gateway's
    // record of them after a restore); a range of more entries than rows is allowed (entries
    // acknowledged earlier leave gaps).
    if at.first_seq < 1 || at.last_seq < at.first_seq || at.last_seq - at.first_seq > (1 << 40) {
        return Err(MergeError::Refused(format!("outbox range {}..={} is impossible", at.first_seq, at.last_seq)));
    }
    let tenant = at.tenant;
    let mut cloud_logged = false;
    let mut entries = Vec::new();
    if let Some(served) = schema {
        cloud_writes::begin_own_writes(&tx)?;
        tables::materialize(&tx, limits, tenant, served)?;
        // Writes made to the real tables first: this merge must not overwrite one unseen.
        if cloud_writes::pending(&tx, tenant, served)?
            && let Some((cloud, moves)) = cloud_writes::ingest(&tx, limits, tenant, served, at.now_ms)?
        {
            entries.push(log_change(
                &tx,
                limits,
                tenant,
                ToLog { origin: "", change: &cloud, moves: &moves, schema: Some(&served.schema) },
                tags.next(),
            )?);
            cloud_logged = true;
        }
    }
    let vouched = vouch(&mut Book(&tx), at, batch, schema.map(|s| &s.schema))?;
    let mut rows = Rows { tx: &tx, limits, tenant, device: at.device, schema, new_tables: HashMap::new() };
    let rules = IntakeRules {
        limits,
        bound: Some(ClockBound::at(at.now_ms, at.max_drift_ms)),
        vouch: vouched.vouch.as_ref(),
        roles: Some(&vouched.roles),
        scopes: scope_rules(schema, at),
        keep_changed: true,
    };
    let merged = merge_batch(&mut rows, batch, rules)?;
    let mut new_tables = std::mem::take(&mut rows.new_tables);
    let mut outcome = MergeOutcome {
        applied: merged.applied,
        duplicates: merged.duplicates,
        bounded: merged.bounded,
        refused: merged.refused,
        ..MergeOutcome::default()
    };
    let (counters, skewed) = (merged.counters, merged.skewed);
    let mut changed = Batch { roles: BTreeMap::new(), rows: merged.changed };
    // Tables first seen in this batch, if a row of theirs was merged.
    new_tables.retain(|t, _| changed.rows.iter().any(|r| &r.table == t));
    for (table, arity) in new_tables {
        tx.prepare_cached("INSERT OR IGNORE INTO gw_tables(tenant, tbl, key_len) VALUES (?1, ?2, ?3)")?
            .execute(rusqlite::params![tenant, table, arity as i64])?;
    }
    for (node, counter) in counters {
        tx.prepare_cached(
            "INSERT INTO gw_nodes(tenant, node, max_counter) VALUES (?1, ?2, ?3)
             ON CONFLICT(tenant, node) DO UPDATE SET max_counter = max(max_counter, excluded.max_counter)",
        )?
        .execute(rusqlite::params![tenant, &node.0[..], counter as i64])?;
    }
    for (node, hlc) in &skewed {
        tx.prepare_cached(
            "INSERT INTO gw_clock_skew(tenant, node, max_hlc, bounded, last_ms) VALUES (?1, ?2, ?3, 1, ?4)
             ON CONFLICT(tenant, node) DO UPDATE SET max_hlc = max(max_hlc, excluded.max_hlc),
                 bounded = bounded + 1, last_ms = excluded.last_ms",
        )?
        .execute(rusqlite::params![tenant, &node.0[..], hlc.0 as i64, at.now_ms as i64])?;
    }
    if !changed.rows.is_empty() {
        changed.roles = vouched.roles;
        // A change whose timestamps were bounded goes back to its writer too, which then holds
        // the bounded timestamps like everyone else.
        let origin = if outcome.bounded > 0 { "" } else { at.device };
        let entry = log_change(
            &tx,
            limits,
            tenant,
            ToLog { origin, change: &changed, moves: &merged.moves, schema: schema.map(|s| &s.schema) },
            tags.next(),
        )?;
        outcome.logged = Some(entry.cursor);
        entries.push(entry);
    }
    outcome.cloud_logged = cloud_logged;
    outcome.entries = entries;
    let previous: Option<(Option<i64>, Option<i64>)> = tx
        .prepare_cached("SELECT receipt_pos, receipt_tag FROM gw_devices WHERE tenant = ?1 AND device = ?2")?
        .query_row(rusqlite::params![tenant, at.device], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    outcome.previous = previous
        .and_then(|(p, t)| p.zip(t))
        .map(|(position, tag)| driftless_core::LogCursor { position: position as u64, tag: tag as u64 });
    outcome.receipt = match outcome.logged {
        Some(entry) => Some(entry),
        None => {
            let head: Option<(i64, i64)> = tx
                .prepare_cached("SELECT seq, tag FROM gw_log WHERE tenant = ?1 ORDER BY seq DESC LIMIT 1")?
                .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            head.map(|(seq, tag)| driftless_core::LogCursor { position: seq as u64, tag: tag as u64 })
        }
    };
    let receipt = outcome.receipt.map(|r| (r.position as i64, r.tag as i64));
    tx.prepare_cached(
        "INSERT INTO gw_devices(tenant, device, first_seen_ms, last_seen_ms, uplink_hwm, receipt_pos, receipt_tag)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6)
         ON CONFLICT(tenant, device) DO UPDATE SET last_seen_ms = ?3, uplink_hwm = max(uplink_hwm, ?4),
             receipt_pos = coalesce(?5, receipt_pos), receipt_tag = coalesce(?6, receipt_tag)",
    )?
    .execute(rusqlite::params![
        tenant,
        at.device,
        at.now_ms as i64,
        at.last_seq.max(at.first_seq),
        receipt.map(|r| r.0),
        receipt.map(|r| r.1)
    ])?;
    if schema.is_some() {
        cloud_writes::end_own_writes(&tx)?;
    }
    tx.commit()?;
    Ok(outcome)
}

/// Appends `change` to the tenant's log; `origin` is the device not to send it to (empty:
/// every device). An erasing delete in it first scrubs the row's older entries.
pub(super) fn log_change(
    conn: &Connection,
    limits: &Limits,
    tenant: &str,
    logged: ToLog<'_>,
    tag: u64,
) -> Result<LogEntry, Error> {
    let ToLog { origin, change, moves, schema } = logged;
    let scrubbed = erasure::scrub(conn, limits, tenant, change)?;
    let mut change = scrubbed.unwrap_or_else(|| change.clone());
    let mut moves = moves.to_vec();
    if let Some(schema) = schema {
        refs::follow(&mut RefRows { conn, limits, tenant }, schema, limits, &mut change, &mut moves)?;
    }
    let moves = &moves[..];
    // Positions are shared by every tenant of the file, so the tenant's previous entry is
    // looked up (the single writer holds the file's lock until it commits).
    let previous: Option<(i64, i64)> = conn
        .prepare_cached("SELECT seq, tag FROM gw_log WHERE tenant = ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let moved = logged_moves(moves);
    let payload = encode_payload(&change);
    conn.prepare_cached(
        "INSERT INTO gw_log(tenant, origin, rows, change, tag, moves) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(rusqlite::params![tenant, origin, change.rows.len() as i64, payload, tag as i64, moved])?;
    let seq = conn.last_insert_rowid();
    erasure::index(conn, tenant, seq, &change)?;
    if moved.is_some() {
        super::log::index_chains(conn, tenant, seq, &change, moves)?;
    }
    for (row, moved) in change.rows.iter().zip(moves) {
        // Rows held by reference are counted by `refs`, one key per scope holding them.
        let Some(moved) = moved.as_ref().filter(|_| !refs::by_reference(schema, &row.table)) else { continue };
        let pk = encode_key(&row.pk);
        match moved.after.first() {
            Some(key) => conn
                .prepare_cached(
                    "INSERT INTO gw_scope_rows(tenant, tbl, pk, skey) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(tenant, tbl, pk) DO UPDATE SET skey = excluded.skey",
                )?
                .execute(rusqlite::params![tenant, row.table, pk, encode_key(key)])?,
            None => conn
                .prepare_cached("DELETE FROM gw_scope_rows WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?
                .execute(rusqlite::params![tenant, row.table, pk])?,
        };
    }
    Ok(LogEntry {
        cursor: driftless_core::LogCursor { position: seq as u64, tag },
        previous: previous.map_or_else(Default::default, |(seq, tag)| driftless_core::LogCursor {
            position: seq as u64,
            tag: tag as u64,
        }),
        origin: origin.to_owned(),
        change,
        payload,
        moves: if moved.is_some() { moves.to_vec() } else { Vec::new() },
    })
}

/// Counts what the stored rows of referencing tables name, for the references `new` declares
/// first (see `refs::new_references`), in the transaction that installs it.
pub(super) fn count_references(
    conn: &Connection,
    limits: &Limits,
    old: Option<&driftless_core::SyncSchema>,
    new: &driftless_core::SyncSchema,
) -> Result<(), Error> {
    for reference in refs::new_references(old, new) {
        let mut stmt = conn.prepare("SELECT tenant, state FROM gw_rows WHERE tbl = ?1")?;
        let mut rows = stmt.query([&reference.2.name])?;
        while let Some(row) = rows.next()? {
            let (tenant, bytes): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
            let stored = decode_payload(&bytes, limits)
                .map_err(|e| Error::Corrupt(format!("stored row of {:?}: {e}", reference.2.name)))?;
            refs::count_stored(&mut RefRows { conn, limits, tenant: &tenant }, reference, &stored)?;
        }
    }
    Ok(())
}

/// The reference bookkeeping in the logging transaction.
struct RefRows<'a> {
    conn: &'a Connection,
    limits: &'a Limits,
    tenant: &'a str,
}

impl RefBook for RefRows<'_> {
    fn state(&mut self, table: &str, pk: &[Value]) -> Result<(RowState, BTreeMap<NodeId, String>), Error> {
        let row = RowChange { table: table.to_owned(), pk: pk.to_vec(), state: RowState::default() };
        let (stored, roles) = load_row(self.conn, self.limits, self.tenant, &row, &encode_key(pk))?;
        Ok((stored.state, roles))
    }

    fn named(&mut self, held: &str, table: &str, pk: &[u8]) -> Result<Option<Named>, Error> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT ref, skey FROM gw_ref_names WHERE tenant = ?1 AND held = ?2 AND tbl = ?3 AND pk = ?4",
            )?
            .query_row(rusqlite::params![self.tenant, held, table, pk], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn set_named(&mut self, held: &str, table: &str, pk: &[u8], named: Option<&Named>) -> Result<(), Error> {
        match named {
            Some((key, skey)) => self
                .conn
                .prepare_cached(
                    "INSERT INTO gw_ref_names(tenant, held, tbl, pk, ref, skey) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(tenant, held, tbl, pk) DO UPDATE SET ref = excluded.ref, skey = excluded.skey",
                )?
                .execute(rusqlite::params![self.tenant, held, table, pk, key, skey])?,
            None => self
                .conn
                .prepare_cached("DELETE FROM gw_ref_names WHERE tenant = ?1 AND held = ?2 AND tbl = ?3 AND pk = ?4")?
                .execute(rusqlite::params![self.tenant, held, table, pk])?,
        };
        Ok(())
    }

    fn holders(&mut self, table: &str, pk: &[u8]) -> Result<BTreeSet<Vec<u8>>, Error> {
        let mut stmt =
            self.conn.prepare_cached("SELECT skey FROM gw_ref_counts WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3")?;
        let keys = stmt.query_map(rusqlite::params![self.tenant, table, pk], |r| r.get(0))?;
        Ok(keys.collect::<rusqlite::Result<_>>()?)
    }

    fn count(&mut self, table: &str, pk: &[u8], skey: &[u8], delta: i64) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO gw_ref_counts(tenant, tbl, pk, skey, n) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(tenant, tbl, pk, skey) DO UPDATE SET n = n + excluded.n",
            )?
            .execute(rusqlite::params![self.tenant, table, pk, skey, delta])?;
        self.conn
            .prepare_cached(
                "DELETE FROM gw_ref_counts WHERE tenant = ?1 AND tbl = ?2 AND pk = ?3 AND skey = ?4 AND n <= 0",
            )?
            .execute(rusqlite::params![self.tenant, table, pk, skey])?;
        Ok(())
    }
}
