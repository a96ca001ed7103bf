//! Merging a device batch, and taking in plain-SQL writes, in PostgreSQL: one transaction
//! under the tenant's lock, through the same merge as every store.

use std::collections::{BTreeMap, HashMap};

use driftless_core::codec::{Limits, decode_payload, encode_key, encode_payload};
use driftless_core::intake::{Admit, ClockBound, IntakeRules, RowStore, Written, merge_batch};
use driftless_core::{Batch, LogCursor, NodeId, RowChange, RowState, SchemaTable, Value};
use postgres::{Client, Transaction};

use super::tables;
use crate::error::{Error, MergeError, Result};
use crate::storage::cloud_intake::{CloudTables, Intake, Journaled};
use crate::storage::{Incoming, MergeOutcome, ServedSchema};

/// Merges `batch`; `tags` are the tags of the entries it may log (its own, and one for the
/// plain-SQL writes taken in first).
pub(super) fn merge(
    client: &mut Client,
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
    let mut cloud_logged = false;
    if let Some(served) = schema {
        tables::materialize(&mut tx, limits, tenant, served)?;
        // Writes made to the real tables first: this merge must not overwrite one unseen.
        cloud_logged = ingest_pending(&mut tx, limits, tenant, served, at.now_ms, tags.1)?.is_some();
    }
    let mut rows = Rows { tx: &mut tx, limits, tenant, schema, new_tables: HashMap::new(), arities: HashMap::new() };
    let rules = IntakeRules { limits, bound: Some(ClockBound::at(at.now_ms, at.max_drift_ms)) };
    let merged = merge_batch(&mut rows, batch, rules)?;
    let mut new_tables = std::mem::take(&mut rows.new_tables);
    let mut outcome = MergeOutcome {
        applied: merged.applied,
        duplicates: merged.duplicates,
        bounded: merged.bounded,
        refused: merged.refused,
        cloud_logged,
        ..MergeOutcome::default()
    };
    let changed = Batch { roles: batch.roles.clone(), rows: merged.changed };
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
        tx.execute(
            "INSERT INTO driftless.gw_nodes(tenant, node, max_counter)
             SELECT $1, n, c FROM unnest($2::bytea[], $3::bigint[]) AS u(n, c)
             ON CONFLICT (tenant, node) DO UPDATE
                 SET max_counter = greatest(driftless.gw_nodes.max_counter, excluded.max_counter)",
            &[&tenant, &nodes, &counters],
        )?;
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
        outcome.logged = Some(log_change(&mut tx, tenant, origin, &changed, tags.0)?);
    }
    let previous = tx.query_opt(
        "SELECT receipt_pos, receipt_tag FROM driftless.gw_devices WHERE tenant = $1 AND device = $2",
        &[&tenant, &at.device],
    )?;
    outcome.previous = previous
        .and_then(|r| r.get::<_, Option<i64>>(0).zip(r.get::<_, Option<i64>>(1)))
        .map(|(position, tag)| LogCursor { position: position as u64, tag: tag as u64 });
    outcome.receipt = match outcome.logged {
        Some(entry) => Some(entry),
        None => {
            let head = super::log_head_of(&mut tx, tenant)?;
            (head.position > 0).then_some(head)
        }
    };
    let receipt = outcome.receipt.map(|r| (r.position as i64, r.tag as i64));
    tx.execute(
        "INSERT INTO driftless.gw_devices(tenant, device, first_seen_ms, last_seen_ms, uplink_hwm, receipt_pos, receipt_tag)
         VALUES ($1, $2, $3, $3, $4, $5, $6)
         ON CONFLICT (tenant, device) DO UPDATE SET last_seen_ms = $3,
             uplink_hwm = greatest(driftless.gw_devices.uplink_hwm, $4),
             receipt_pos = coalesce($5, driftless.gw_devices.receipt_pos),
             receipt_tag = coalesce($6, driftless.gw_devices.receipt_tag)",
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

/// Appends `change` to the tenant's log at the next position. The caller holds the tenant's
/// lock until it commits, so positions commit in order.
pub(super) fn log_change(
    tx: &mut Transaction<'_>,
    tenant: &str,
    origin: &str,
    change: &Batch,
    tag: u64,
) -> Result<LogCursor> {
    let seq: i64 = tx
        .query_one(
            "INSERT INTO driftless.gw_log(tenant, seq, origin, rows, change, tag)
             SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, $4, $5 FROM driftless.gw_log WHERE tenant = $1
             RETURNING seq",
            &[&tenant, &origin, &(change.rows.len() as i32), &encode_payload(change), &(tag as i64)],
        )?
        .get(0);
    Ok(LogCursor { position: seq as u64, tag })
}

/// A stored row's state and the roles of the nodes in it.
fn load_row(
    tx: &mut Transaction<'_>,
    limits: &Limits,
    tenant: &str,
    table: &str,
    pk: &[Value],
) -> Result<(RowChange, BTreeMap<NodeId, String>)> {
    let stored = tx.query_opt(
        "SELECT state FROM driftless.gw_rows WHERE tenant = $1 AND tbl = $2 AND pk = $3",
        &[&tenant, &table, &encode_key(pk)],
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

fn save_row(tx: &mut Transaction<'_>, tenant: &str, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
    let kept = row.state.nodes().into_iter().filter_map(|n| roles.get(&n).map(|r| (n, r.clone()))).collect();
    let payload = encode_payload(&Batch { roles: kept, rows: vec![row.clone()] });
    tx.execute(
        "INSERT INTO driftless.gw_rows(tenant, tbl, pk, state) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant, tbl, pk) DO UPDATE SET state = excluded.state",
        &[&tenant, &row.table, &encode_key(&row.pk), &payload],
    )?;
    Ok(())
}

/// The causal state and real tables as the row store the shared merge runs against.
struct Rows<'a, 't> {
    tx: &'a mut Transaction<'t>,
    limits: &'a Limits,
    tenant: &'a str,
    schema: Option<&'a ServedSchema>,
    /// Key arities of tables first seen in this batch (without a declared schema).
    new_tables: HashMap<String, usize>,
    /// Key arities of tables looked up so far.
    arities: HashMap<String, Option<usize>>,
}

impl RowStore for Rows<'_, '_> {
    type Error = Error;

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
        let (stored, roles) = load_row(self.tx, self.limits, self.tenant, &row.table, &row.pk)?;
        Ok((stored.state, roles))
    }

    fn write(&mut self, _: &RowChange, merged: RowChange, roles: &BTreeMap<NodeId, String>) -> Result<Written> {
        if let Some(table) = self.schema.and_then(|s| s.schema.table(&merged.table)) {
            // The real table's own constraints (NOT NULL of a row no write gave a value yet)
            // refuse this row only, never the batch.
            let mut sp = self.tx.savepoint("gw_row")?;
            match tables::write_row(&mut sp, self.tenant, table, &merged, roles) {
                Ok(()) => sp.commit()?,
                Err(Error::Postgres(e)) if e.code().is_some_and(|c| c.code().starts_with("23")) => {
                    sp.rollback()?;
                    return Ok(Written::Refused(format!("the cloud table {:?} refuses the row: {e}", merged.table)));
                }
                Err(e) => return Err(e),
            }
        }
        save_row(self.tx, self.tenant, &merged, roles)?;
        Ok(Written::Done)
    }
}

/// Takes in the tenant's pending plain-SQL writes and logs them; returns the entry logged.
/// Runs under the tenant's lock.
pub(super) fn ingest_pending(
    tx: &mut Transaction<'_>,
    limits: &Limits,
    tenant: &str,
    served: &ServedSchema,
    now_ms: u64,
    tag: u64,
) -> Result<Option<LogCursor>> {
    let journals = tables::journals(tx, tenant)?;
    if !tables::pending(tx, tenant, &journals)? {
        return Ok(None);
    }
    let mut intake = Intake::new(&served.schema, limits, now_ms);
    for table in &served.schema.tables {
        let Some(&id) = journals.get(&table.name) else { continue };
        let names = tables::mask_columns(tx, tenant, table)?;
        let mut keys: BTreeMap<Vec<u8>, Journaled> = BTreeMap::new();
        for (pk, role, mask, at_ms) in tables::read_journal(tx, tenant, id, table.key.len())? {
            let written = keys.entry(encode_key(&pk)).or_default();
            written.pk = pk;
            written.fold(role, mask, at_ms, names.len());
        }
        let mut rows = CloudRows { tx, limits, tenant };
        for written in keys.values() {
            intake.key(&mut rows, table, &names, written)?;
        }
        tables::clear_journal(tx, tenant, id)?;
    }
    for (role, (_, next)) in &intake.writers {
        tx.execute(
            "UPDATE driftless.gw_cloud_writers SET counter = $3 WHERE tenant = $1 AND role = $2",
            &[&tenant, role, &(*next as i64 - 1)],
        )?;
    }
    if intake.changes.rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(log_change(tx, tenant, "", &intake.changes, tag)?))
}

/// A tenant's real tables and causal state, as an intake uses them.
struct CloudRows<'a, 't> {
    tx: &'a mut Transaction<'t>,
    limits: &'a Limits,
    tenant: &'a str,
}

impl CloudTables for CloudRows<'_, '_> {
    fn load(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<(RowChange, BTreeMap<NodeId, String>)> {
        load_row(self.tx, self.limits, self.tenant, &table.name, pk)
    }

    fn read_row(&mut self, table: &SchemaTable, pk: &[Value]) -> Result<Option<Vec<Value>>> {
        tables::read_row(self.tx, self.tenant, table, pk)
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
        tables::write_row(self.tx, self.tenant, table, row, roles)
    }

    fn save(&mut self, row: &RowChange, roles: &BTreeMap<NodeId, String>) -> Result<()> {
        save_row(self.tx, self.tenant, row, roles)
    }
}
