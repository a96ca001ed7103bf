//! Merging a device batch, and taking in plain-SQL writes, in PostgreSQL: one transaction
//! under the tenant's lock, through the same merge as every store.

use std::collections::{BTreeMap, HashMap};

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::intake::{Admit, ClockBound, IntakeRules, RowStore, Written, merge_batch};
use driftless_core::scope::ScopeKey;
use driftless_core::{Batch, LogCursor, NodeId, RowChange, RowState, SchemaTable, SyncSchema, Value};
use postgres::{Client, Transaction};

use super::refs::PgRefs;
use super::registry::Book;
use super::tables::key_hash;
use super::{Stmts, erasure, tables};
use crate::error::{Error, MergeError, Result};
use crate::storage::chains::marks;
use crate::storage::cloud_intake::{CloudTables, Intake, Journaled};
use crate::storage::common::{logged_moves, scope_rules};
use crate::storage::refs::by_reference;
use crate::storage::vouching::{CLOUD_OWNER, all_bound_to, vouch};
use crate::storage::{Incoming, LogEntry, MergeOutcome, ServedSchema, ToLog};
use driftless_core::scope::Move;

/// Merges `batch`; `tags` are the tags of the entries it may log (its own, and one for the
/// plain-SQL writes taken in first).
pub(super) fn merge(
    client: &mut Client,
    stmts: &mut Stmts,
    limits: &Limits,
    at: &Incoming<'_>,
    schema: Option<&ServedSchema>,
    tags: (u64, u64),
    batch: &Batch,
) -> Result<MergeOutcome, MergeError> {
    if at.first_seq < 1 || at.last_seq < at.first_seq || at.last_seq - at.first_seq > (1 << 40) {
        return Err(MergeError::Refused(format!("outbox range {}..={} is impossible", at.first_seq, at.last_seq)));
    }
    let tenant = at.tenant;
    let mut tx = client.transaction()?;
    tables::begin_gateway_tx(&mut tx, tenant)?;
    tables::check_schema_current(&mut tx, schema)?;
    let mut entries = Vec::new();
    if let Some(served) = schema {
        tables::materialize(&mut tx, limits, tenant, served)?;
        // Writes made to the real tables first: this merge must not overwrite one unseen.
        entries.extend(ingest_pending(&mut tx, stmts, limits, tenant, served, at.now_ms, tags.1)?);
    }
    let cloud_logged = !entries.is_empty();
    let vouched = vouch(&mut Book { tx: &mut tx, stmts }, at, batch, schema.map(|s| &s.schema))?;
    let mut rows = Rows {
        tx: &mut tx,
        stmts: &mut *stmts,
        limits,
        tenant,
        device: at.device,
        schema,
        new_tables: HashMap::new(),
        arities: HashMap::new(),
        held: HashMap::new(),
        saves: BTreeMap::new(),
    };
    let rules = IntakeRules {
        limits,
        bound: Some(ClockBound::at(at.now_ms, at.max_drift_ms)),
        vouch: vouched.vouch.as_ref(),
        roles: Some(&vouched.roles),
        scopes: scope_rules(schema, at),
        keep_changed: true,
    };
    let merged = merge_batch(&mut rows, batch, rules)?;
    rows.save_all()?;
    let mut new_tables = std::mem::take(&mut rows.new_tables);
    let mut outcome = MergeOutcome {
        applied: merged.applied,
        duplicates: merged.duplicates,
        bounded: merged.bounded,
        refused: merged.refused,
        cloud_logged,
        ..MergeOutcome::default()
    };
    let changed = Batch { roles: vouched.roles, rows: merged.changed };
    new_tables.retain(|t, _| changed.rows.iter().any(|r| &r.table == t));
    for (table, arity) in new_tables {
        tx.execute(
            "INSERT INTO driftless.gw_tables(tenant, tbl, key_len) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&tenant, &table, &(arity as i32)],
        )?;
    }
    if !merged.counters.is_empty() {
        let (nodes, counters): (Vec<Vec<u8>>, Vec<i64>) =
            merged.counters.iter().map(|(n, c)| (n.0.to_vec(), *c as i64)).unzip();
        let stmt = stmts.get(
            &mut tx,
            "INSERT INTO driftless.gw_nodes(tenant, node, max_counter)
             SELECT $1, n, c FROM unnest($2::bytea[], $3::bigint[]) AS u(n, c)
             ON CONFLICT (tenant, node) DO UPDATE
                 SET max_counter = greatest(driftless.gw_nodes.max_counter, excluded.max_counter)",
        )?;
        tx.execute(&stmt, &[&tenant, &nodes, &counters])?;
    }
    for (node, hlc) in &merged.skewed {
        tx.execute(
            "INSERT INTO driftless.gw_clock_skew(tenant, node, max_hlc, bounded, last_ms) VALUES ($1, $2, $3, 1, $4)
             ON CONFLICT (tenant, node) DO UPDATE SET max_hlc = greatest(driftless.gw_clock_skew.max_hlc, excluded.max_hlc),
                 bounded = driftless.gw_clock_skew.bounded + 1, last_ms = excluded.last_ms",
            &[&tenant, &&node.0[..], &(hlc.0 as i64), &(at.now_ms as i64)],
        )?;
    }
    if !changed.rows.is_empty() {
        // A change whose timestamps were bounded goes back to its writer too.
        let origin = if outcome.bounded > 0 { "" } else { at.device };
        let entry = log_change(
            &mut tx,
            stmts,
            limits,
            tenant,
            ToLog { origin, change: &changed, moves: &merged.moves, schema: schema.map(|s| &s.schema) },
            tags.0,
        )?;
        outcome.logged = Some(entry.cursor);
        entries.push(entry);
    }
    outcome.entries = entries;
    let stmt = stmts
        .get(&mut tx, "SELECT receipt_pos, receipt_tag FROM driftless.gw_devices WHERE tenant = $1 AND device = $2")?;
    let previous = tx.query_opt(&stmt, &[&tenant, &at.device])?;
    outcome.previous = previous
        .and_then(|r| r.get::<_, Option<i64>>(0).zip(r.get::<_, Option<i64>>(1)))
        .map(|(position, tag)| LogCursor { position: position as u64, tag: tag as u64 });
    outcome.receipt = match outcome.logged {
        Some(entry) => Some(entry),
        None => {
            let head = super::log::head(&mut tx, stmts, tenant)?;
            (head.position > 0).then_some(head)
        }
    };
    let receipt = outcome.receipt.map(|r| (r.position as i64, r.tag as i64));
    let stmt = stmts.get(
        &mut tx,
        "INSERT INTO driftless.gw_devices(tenant, device, first_seen_ms, last_seen_ms, uplink_hwm, receipt_pos, receipt_tag)
         VALUES ($1, $2, $3, $3, $4, $5, $6)
         ON CONFLICT (tenant, device) DO UPDATE SET last_seen_ms = $3,
             uplink_hwm = greatest(driftless.gw_devices.uplink_hwm, $4),
             receipt_pos = coalesce($5, driftless.gw_devices.receipt_pos),
             receipt_tag = coalesce($6, driftless.gw_devices.receipt_tag)",
    )?;
    tx.execute(
        &stmt,
        &[
            &tenant,
            &at.device,
            &(at.now_ms as i64),
            &at.last_seq.max(at.first_seq),
            &receipt.map(|r| r.0),
            &receipt.map(|r| r.1),
        ],
    )?;
    tx.commit()?;
    Ok(outcome)
}

/// Appends `change` to the tenant's log at the next position (its previous entry is the one
/// before). The caller holds the tenant's lock until it commits, so positions commit in order.
pub(super) fn log_change(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    logged: ToLog<'_>,
    tag: u64,
) -> Result<LogEntry> {
    let ToLog { origin, change, moves, schema } = logged;
    let scrubbed = erasure::scrub(tx, stmts, limits, tenant, change)?;
    let mut change = scrubbed.unwrap_or_else(|| change.clone());
    let mut moves = moves.to_vec();
    if let Some(schema) = schema {
        let mut book = PgRefs { tx, stmts, limits, tenant };
        crate::storage::refs::follow(&mut book, schema, limits, &mut change, &mut moves)?;
    }
    let moves = &moves[..];
    // The entry and its row index in one round trip.
    let stmt = stmts.get(
        tx,
        "WITH p AS (
             SELECT seq, tag FROM driftless.gw_log WHERE tenant = $1 ORDER BY seq DESC LIMIT 1),
         l AS (
             INSERT INTO driftless.gw_log(tenant, seq, origin, rows, change, tag, moves)
             SELECT $1, coalesce((SELECT seq FROM p), 0) + 1, $2, $3, $4, $5, $8
             RETURNING seq),
         k AS (
             INSERT INTO driftless.gw_log_keys(tenant, tbl, pkh, seq)
             SELECT $1, u.t, u.h, l.seq FROM l, unnest($6::text[], $7::bytea[]) AS u(t, h)
             ON CONFLICT DO NOTHING)
         SELECT l.seq, coalesce((SELECT seq FROM p), 0), coalesce((SELECT tag FROM p), 0) FROM l",
    )?;
    let (tables, hashes) = erasure::keys(&change);
    let moved = logged_moves(moves);
    let payload = encode_payload(&change);
    let row = tx.query_one(
        &stmt,
        &[&tenant, &origin, &(change.rows.len() as i32), &payload, &(tag as i64), &tables, &hashes, &moved],
    )?;
    let (seq, previous, previous_tag): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if moved.is_some() {
        index_scopes(tx, stmts, (tenant, schema), seq, &change, moves)?;
    }
    let cursor = LogCursor { position: seq as u64, tag };
    let previous = LogCursor { position: previous as u64, tag: previous_tag as u64 };
    let moves = if moved.is_some() { moves.to_vec() } else { Vec::new() };
    Ok(LogEntry { cursor, previous, origin: origin.to_owned(), change, payload, moves })
}

/// Files each scoped row of a logged change under its scope key (`gw_scope_rows`), or takes
/// it out when no device holds it any more; and the entry under the scopes it concerns.
fn index_scopes(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    (tenant, schema): (&str, Option<&SyncSchema>),
    seq: i64,
    change: &Batch,
    moves: &[Option<Move>],
) -> Result<()> {
    // The last move of each row (a change may hold a row once per role that wrote it). Rows
    // held by reference are counted by `refs`, one key per scope holding them.
    let mut last: BTreeMap<(&str, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
    for (row, moved) in change.rows.iter().zip(moves) {
        if let Some(moved) = moved.as_ref().filter(|_| !by_reference(schema, &row.table)) {
            last.insert((&row.table, key_hash(&encode_key(&row.pk))), moved.after.first().map(|k| encode_key(k)));
        }
    }
    let (mut put_tables, mut put_keys, mut put_skeys) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gone_tables, mut gone_keys) = (Vec::new(), Vec::new());
    for ((table, pkh), key) in last {
        match key {
            Some(key) => {
                put_tables.push(table);
                put_keys.push(pkh);
                put_skeys.push(key);
            }
            None => {
                gone_tables.push(table);
                gone_keys.push(pkh);
            }
        }
    }
    let stmt = stmts.get(
        tx,
        "INSERT INTO driftless.gw_scope_rows(tenant, tbl, pkh, skey)
         SELECT $1, t, h, k FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS u(t, h, k)
         ON CONFLICT (tenant, tbl, pkh) DO UPDATE SET skey = excluded.skey",
    )?;
    tx.execute(&stmt, &[&tenant, &put_tables, &put_keys, &put_skeys])?;
    let stmt = stmts.get(
        tx,
        "DELETE FROM driftless.gw_scope_rows s USING unnest($2::text[], $3::bytea[]) AS u(t, h)
         WHERE s.tenant = $1 AND s.tbl = u.t AND s.pkh = u.h",
    )?;
    tx.execute(&stmt, &[&tenant, &gone_tables, &gone_keys])?;
    // And the entry under the scopes it concerns (see `storage::chains`).
    let (tables, skeys): (Vec<String>, Vec<Vec<u8>>) = marks(change, moves).into_iter().unzip();
    let stmt = stmts.get(
        tx,
        "INSERT INTO driftless.gw_log_scopes(tenant, tbl, skey, seq)
         SELECT $1, t, k, $4 FROM unnest($2::text[], $3::bytea[]) AS u(t, k) ON CONFLICT DO NOTHING",
    )?;
    tx.execute(&stmt, &[&tenant, &tables, &skeys, &seq])?;
    Ok(())
}

/// A stored row's state and the roles of the nodes in it.
pub(super) fn load_row(
    tx: &mut Transaction<'_>,
    limits: &Limits,
    tenant: &str,
    table: &str,
    pk: &[Value],
) -> Result<(RowChange, BTreeMap<NodeId, String>)> {
    let stored = tx.query_opt(
        "SELECT state FROM driftless.gw_rows WHERE tenant = $1 AND tbl = $2 AND pkh = $3",
        &[&tenant, &table, &key_hash(&encode_key(pk))],
    )?;
    match stored {
        Some(r) => {
            let mut b = decode_payload(r.get(0), limits)
                .map_err(|e| Error::Corrupt(format!("stored row of {table:?}: {e}")))?;
            let row = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
            Ok((row, b.roles))
        }
        None => {
            Ok((RowChange { table: table.to_owned(), pk: pk.to_vec(), state: RowState::default() }, BTreeMap::new()))
        }
    }
}

/// A row's state as stored: a one-row batch with the roles of its nodes.
fn row_payload(row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Vec<u8> {
    let kept = row.state.nodes().into_iter().filter_map(|n| roles.get(&n).map(|r| (n, r.clone()))).collect();
    encode_payload(&Batch { roles: kept, rows: vec![row.clone()] })
}

/// A stored row's state and the roles of its nodes.
type Stored = (RowChange, BTreeMap<NodeId, String>);

/// Stored rows by (table, key hash).
type StoredRows = HashMap<(String, Vec<u8>), Stored>;

/// A stored row as a merge holds it (`None`: no row yet).
type Held = Option<Stored>;

/// The causal state and real tables as the row store the shared merge runs against. A
/// batch's stored rows are read in one query, and its merged states written in one.
struct Rows<'a, 't> {
    tx: &'a mut Transaction<'t>,
    stmts: &'a mut Stmts,
    limits: &'a Limits,
    tenant: &'a str,
    /// The sending device.
    device: &'a str,
    schema: Option<&'a ServedSchema>,
    /// Key arities of tables first seen in this batch (without a declared schema).
    new_tables: HashMap<String, usize>,
    /// Key arities of tables looked up so far.
    arities: HashMap<String, Option<usize>>,
    /// Stored rows of the batch by (table, key hash), as merged so far.
    held: HashMap<(String, Vec<u8>), Held>,
    /// Merged states to write, by (table, key hash).
    saves: BTreeMap<(String, Vec<u8>), Vec<u8>>,
}

impl Rows<'_, '_> {
    /// Writes the merged states in one statement.
    fn save_all(&mut self) -> Result<()> {
        save_states(self.tx, self.stmts, self.tenant, std::mem::take(&mut self.saves))
    }
}

/// Writes states, by (table, key hash), in one statement.
fn save_states(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    tenant: &str,
    saves: BTreeMap<(String, Vec<u8>), Vec<u8>>,
) -> Result<()> {
    if saves.is_empty() {
        return Ok(());
    }
    let mut tables = Vec::with_capacity(saves.len());
    let mut keys = Vec::with_capacity(saves.len());
    let mut states = Vec::with_capacity(saves.len());
    for ((table, key), state) in saves {
        tables.push(table);
        keys.push(key);
        states.push(state);
    }
    let stmt = stmts.get(
        tx,
        "INSERT INTO driftless.gw_rows(tenant, tbl, pkh, state)
         SELECT $1, t, k, s FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS u(t, k, s)
         ON CONFLICT (tenant, tbl, pkh) DO UPDATE SET state = excluded.state",
    )?;
    tx.execute(&stmt, &[&tenant, &tables, &keys, &states])?;
    Ok(())
}

/// The stored states of rows, by (table, key hash), in one statement; rows not stored are
/// absent.
pub(super) fn fetch_states(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    wanted: &[(String, Vec<u8>)],
) -> Result<StoredRows> {
    let tables: Vec<&str> = wanted.iter().map(|(t, _)| t.as_str()).collect();
    let keys: Vec<&[u8]> = wanted.iter().map(|(_, k)| k.as_slice()).collect();
    let stmt = stmts.get(
        tx,
        "SELECT r.tbl, r.pkh, r.state FROM unnest($2::text[], $3::bytea[]) AS u(t, k)
         JOIN driftless.gw_rows r ON r.tenant = $1 AND r.tbl = u.t AND r.pkh = u.k",
    )?;
    let mut found = HashMap::new();
    for r in tx.query(&stmt, &[&tenant, &tables, &keys])? {
        let (table, key): (String, Vec<u8>) = (r.get(0), r.get(1));
        let mut b =
            decode_payload(r.get(2), limits).map_err(|e| Error::Corrupt(format!("stored row of {table:?}: {e}")))?;
        let row = b.rows.pop().ok_or_else(|| Error::Corrupt("empty stored row".into()))?;
        found.insert((table, key), (row, b.roles));
    }
    Ok(found)
}

impl RowStore for Rows<'_, '_> {
    type Error = Error;

    fn written_by_sender(&mut self, state: &RowState) -> Result<bool> {
        all_bound_to(&mut Book { tx: self.tx, stmts: self.stmts }, self.tenant, self.device, state)
    }

    fn holders(&mut self, table: &str, pk: &[Value]) -> Result<Vec<ScopeKey>> {
        let mut refs = PgRefs { tx: self.tx, stmts: self.stmts, limits: self.limits, tenant: self.tenant };
        crate::storage::refs::holder_keys(&mut refs, self.limits, table, pk)
    }

    fn prefetch(&mut self, rows: &[RowChange]) -> Result<()> {
        let mut wanted = Vec::with_capacity(rows.len());
        for row in rows {
            let key = (row.table.clone(), key_hash(&encode_key(&row.pk)));
            if self.held.insert(key.clone(), None).is_none() {
                wanted.push(key);
            }
        }
        for (key, stored) in fetch_states(self.tx, self.stmts, self.limits, self.tenant, &wanted)? {
            self.held.insert(key, Some(stored));
        }
        Ok(())
    }

    fn admit(&mut self, row: &RowChange) -> Result<Admit> {
        if let Some(served) = self.schema {
            return Ok(served.schema.check_device_row(row).err().map_or(Admit::Merge, Admit::Refuse));
        }
        if row.pk.contains(&Value::Null) {
            return Ok(Admit::Refuse(format!("a change to {:?} has a NULL key value", row.table)));
        }
        let known = match self.new_tables.get(&row.table) {
            Some(n) => Some(*n),
            None => match self.arities.get(&row.table) {
                Some(n) => *n,
                None => {
                    let stored: Option<i32> = self
                        .tx
                        .query_opt(
                            "SELECT key_len FROM driftless.gw_tables WHERE tenant = $1 AND tbl = $2",
                            &[&self.tenant, &row.table],
                        )?
                        .map(|r| r.get(0));
                    let n = stored.map(|n| n as usize);
                    self.arities.insert(row.table.clone(), n);
                    n
                }
            },
        };
        Ok(match known {
            Some(n) if n != row.pk.len() => {
                Admit::Refuse(format!("table {:?} has {n} key columns; a change to it has {}", row.table, row.pk.len()))
            }
            Some(_) => Admit::Merge,
            None => {
                self.new_tables.insert(row.table.clone(), row.pk.len());
                Admit::Merge
            }
        })
    }

    fn load(&mut self, row: &RowChange) -> Result<(RowState, BTreeMap<NodeId, String>)> {
        match self.held.get(&(row.table.clone(), key_hash(&encode_key(&row.pk)))) {
            Some(Some((stored, roles))) => Ok((stored.state.clone(), roles.clone())),
            Some(None) => Ok((RowState::default(), BTreeMap::new())),
            // Not prefetched (it always is): read it.
            None => {
                let (stored, roles) = load_row(self.tx, self.limits, self.tenant, &row.table, &row.pk)?;
                Ok((stored.state, roles))
            }
        }
    }

    fn write(&mut self, _: &RowChange, merged: RowChange, roles: &BTreeMap<NodeId, String>) -> Result<Written> {
        if let Some(table) = self.schema.and_then(|s| s.schema.table(&merged.table)) {
            // The real table's own constraints (NOT NULL of a row no write gave a value yet)
            // refuse this row only, never the batch.
            let mut sp = self.tx.savepoint("gw_row")?;
            match tables::write_row(&mut sp, self.tenant, table, &merged, roles) {
                Ok(()) => sp.commit()?,
                // A constraint of the row's own (a NOT NULL no write gave a value yet).
                Err(Error::Postgres(e)) if e.code().is_some_and(|c| c.code().starts_with("23")) => {
                    sp.rollback()?;
                    return Ok(Written::Refused(format!("the cloud table {:?} refuses the row: {e}", merged.table)));
                }
                // A key longer than PostgreSQL can index (about 2.7 kB): a limit of this store,
                // not the device's fault. The row is merged and sent to devices; only the
                // readable table cannot show it, which a dead letter says.
                Err(Error::Postgres(e)) if e.code().is_some_and(|c| c.code() == "54000") => {
                    sp.rollback()?;
                    let reason = format!("the cloud table {:?} cannot show a merged row: {e}", merged.table);
                    tracing::warn!(tenant = %self.tenant, %reason);
                    super::keep_dead_letter(self.tx, self.tenant, "gateway", &reason, &row_payload(&merged, roles))?;
                }
                Err(e) => return Err(e),
            }
        }
        let key = (merged.table.clone(), key_hash(&encode_key(&merged.pk)));
        self.saves.insert(key.clone(), row_payload(&merged, roles));
        self.held.insert(key, Some((merged, roles.clone())));
        Ok(Written::Done)
    }
}

/// Takes in the tenant's pending plain-SQL writes and logs them; returns the entry logged.
/// Runs under the tenant's lock.
pub(super) fn ingest_pending(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    limits: &Limits,
    tenant: &str,
    served: &ServedSchema,
    now_ms: u64,
    tag: u64,
) -> Result<Option<LogEntry>> {
    let journals = tables::journals(tx, tenant)?;
    if !tables::pending(tx, tenant, &journals)? {
        return Ok(None);
    }
    let mut intake = Intake::new(&served.schema, limits, now_ms);
    for table in &served.schema.tables {
        let Some(&id) = journals.get(&table.name) else { continue };
        let names = tables::mask_columns(tx, tenant, table)?;
        let mut keys: BTreeMap<Vec<u8>, Journaled> = BTreeMap::new();
        let (entries, last) = tables::read_journal(tx, tenant, id, table.key.len())?;
        for (pk, role, mask, at_ms) in entries {
            let written = keys.entry(encode_key(&pk)).or_default();
            written.pk = pk;
            written.fold(role, mask, at_ms, names.len());
        }
        // Every key's stored state and real-table row read at once; states written at once.
        let wanted: Vec<(String, Vec<u8>)> = keys.keys().map(|k| (table.name.clone(), key_hash(k))).collect();
        let stored = fetch_states(tx, stmts, limits, tenant, &wanted)?;
        let pks: Vec<&[Value]> = keys.values().map(|w| w.pk.as_slice()).collect();
        let shown = tables::read_rows(tx, tenant, table, &pks)?;
        let mut rows = CloudRows { tx, tenant, stored, shown, saves: BTreeMap::new() };
        for written in keys.values() {
            intake.key(&mut rows, table, &names, written)?;
        }
        let saves = std::mem::take(&mut rows.saves);
        save_states(tx, stmts, tenant, saves)?;
        tables::clear_journal(tx, tenant, id, last)?;
    }
    for (role, (node, next)) in &intake.writers {
        tx.execute(
            "UPDATE driftless.gw_cloud_writers SET counter = $3 WHERE tenant = $1 AND role = $2",
            &[&tenant, role, &(*next as i64 - 1)],
        )?;
        // Bound to the cloud, with how far it wrote: no device may write as it, and devices
        // may claim what it wrote.
        tx.execute(
            "INSERT INTO driftless.gw_nodes(tenant, node, device, role, max_counter) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, node) DO UPDATE
                 SET max_counter = greatest(driftless.gw_nodes.max_counter, excluded.max_counter)",
            &[&tenant, &&node.0[..], &CLOUD_OWNER, role, &(*next as i64 - 1)],
        )?;
    }
    if intake.changes.rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(log_change(
        tx,
        stmts,
        limits,
        tenant,
        ToLog { origin: "", change: &intake.changes, moves: &intake.moves, schema: Some(&served.schema) },
        tag,
    )?))
}

/// A tenant's real tables and causal state, as an intake of one table uses them: the
/// journaled keys' stored states and real-table rows read at once, states written at once.
struct CloudRows<'a, 't> {
    tx: &'a mut Transaction<'t>,
    tenant: &'a str,
    /// Stored states by (table, key hash), as before this intake.
    stored: StoredRows,
    /// The real table's non-key values by encoded key, for the rows that exist.
    shown: HashMap<Vec<u8>, Vec<Value>>,
    /// Merged states to write, by (table, key hash).
    saves: BTreeMap<(String, Vec<u8>), Vec<u8>>,
}

impl CloudTables for CloudRows<'_, '_> {
    fn load(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<(RowChange, BTreeMap<NodeId, String>)> {
        match self.stored.get(&(table.name.clone(), key_hash(&encode_key(pk)))) {
            Some((row, roles)) => Ok((row.clone(), roles.clone())),
            None => Ok((
                RowChange { table: table.name.clone(), pk: pk.to_vec(), state: RowState::default() },
                BTreeMap::new(),
            )),
        }
    }

    fn read_row(&mut self, _table: &SchemaTable, pk: &[Value]) -> Result<Option<Vec<Value>>> {
        Ok(self.shown.get(&encode_key(pk)).cloned())
    }

    fn cloud_node(&mut self, role: &str) -> Result<(NodeId, u64)> {
        let found = self.tx.query_opt(
            "SELECT node, counter FROM driftless.gw_cloud_writers WHERE tenant = $1 AND role = $2",
            &[&self.tenant, &role],
        )?;
        match found {
            Some(r) => {
                let node: Vec<u8> = r.get(0);
                let node = NodeId(node.try_into().map_err(|_| Error::Corrupt("stored cloud node".into()))?);
                Ok((node, r.get::<_, i64>(1) as u64 + 1))
            }
            None => {
                let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
                self.tx.execute(
                    "INSERT INTO driftless.gw_cloud_writers(tenant, role, node, counter) VALUES ($1, $2, $3, 0)",
                    &[&self.tenant, &role, &&node.0[..]],
                )?;
                Ok((node, 1))
            }
        }
    }

    fn dead_letter(&mut self, writer: &str, reason: &str, payload: &[u8]) -> Result<()> {
        super::keep_dead_letter(self.tx, self.tenant, writer, reason, payload)?;
        Ok(())
    }

    fn show(&mut self, table: &SchemaTable, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
        // Most writes taken in show just what their writer wrote: nothing to write back.
        let before = self.stored.get(&(table.name.clone(), key_hash(&encode_key(&row.pk))));
        let had_conflicts = before.is_some_and(|(b, r)| !crate::storage::shown::conflict_rows(table, b, r).is_empty());
        let has_conflicts = !crate::storage::shown::conflict_rows(table, row, roles).is_empty();
        let current = self.shown.get(&encode_key(&row.pk));
        if !had_conflicts && !has_conflicts && tables::shows(table, row, roles, current) {
            return Ok(());
        }
        // A constraint someone added to the table (a CHECK, a foreign key) may refuse what the
        // merge shows: kept as a dead letter, never a failure of every later intake.
        let mut sp = self.tx.savepoint("gw_show")?;
        match tables::write_row(&mut sp, self.tenant, table, row, roles) {
            Ok(()) => Ok(sp.commit()?),
            Err(Error::Postgres(e)) if e.code().is_some_and(|c| c.code().starts_with("23") || c.code() == "54000") => {
                sp.rollback()?;
                let reason = format!("the cloud table {:?} refuses to show the merged row: {e}", table.name);
                tracing::warn!(tenant = %self.tenant, %reason);
                super::keep_dead_letter(self.tx, self.tenant, "gateway", &reason, &row_payload(row, roles))?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
        self.saves.insert((row.table.clone(), key_hash(&encode_key(&row.pk))), row_payload(row, roles));
        Ok(())
    }
}
