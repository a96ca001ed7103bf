//! Rows held by reference: a customer goes to the devices holding a work order that names it.
//!
//! Which scopes hold such a row depends on other rows, so the gateway keeps it as it logs
//! each change: every row of a referencing table records what it pulls in (the key it names,
//! and its own scope key), and each referenced row counts, per scope key, the rows naming it.
//! A change to a referencing row that names another row, moves to another scope or is
//! deleted changes those counts; a row whose count for a scope rises from 0 entered that
//! scope, one whose count falls to 0 left it. The logged entry then holds, for each row of a
//! table held by reference that it changed or that entered or left a scope, where it moved:
//! the keys of the scopes holding it before and after. A row that only entered or left is in
//! the entry with no change of its own (an empty state), so a pull or a publish sends it
//! whole to the scopes it entered and evicts it from those it left, as for any move.

use std::collections::{BTreeMap, BTreeSet};

use driftless_core::codec::{Limits, decode_key, encode_key};
use driftless_core::scope::{Move, ScopeKey, Via, references};
use driftless_core::{Batch, NodeId, RowChange, RowState, SchemaTable, SyncSchema, Value};

use crate::error::{Error, Result};

/// What one row of a referencing table pulls in: the encoded key it names and its own
/// encoded scope key.
pub(crate) type Named = (Vec<u8>, Vec<u8>);

/// The store's side of the bookkeeping, in the transaction that logs the entry.
pub(crate) trait RefBook {
    /// A row's whole stored state, as merged, and the roles of its nodes.
    fn state(&mut self, table: &str, pk: &[Value]) -> Result<(RowState, BTreeMap<NodeId, String>)>;
    /// What a row of a referencing table pulled in of table `held`, as last recorded (a
    /// work order may name a customer and a site).
    fn named(&mut self, held: &str, table: &str, pk: &[u8]) -> Result<Option<Named>>;
    fn set_named(&mut self, held: &str, table: &str, pk: &[u8], named: Option<&Named>) -> Result<()>;
    /// The encoded keys of the scopes holding a row of a table held by reference.
    fn holders(&mut self, table: &str, pk: &[u8]) -> Result<BTreeSet<Vec<u8>>>;
    /// Adds `delta` to the count of rows of scope `skey` naming the row `pk` of `table`
    /// (a count that falls to 0 goes).
    fn count(&mut self, table: &str, pk: &[u8], skey: &[u8], delta: i64) -> Result<()>;
}

/// Updates the reference counts for the referencing rows of `change` (whose state the store
/// already holds as merged), and records in `moves` where each row held by reference moved:
/// those in `change`, and those that entered or left a scope, added to `change` without a
/// state of their own.
pub(crate) fn follow(
    book: &mut dyn RefBook,
    schema: &SyncSchema,
    limits: &Limits,
    change: &mut Batch,
    moves: &mut Vec<Option<Move>>,
) -> Result<()> {
    let refs = references(schema);
    if refs.is_empty() {
        return Ok(());
    }
    if moves.len() != change.rows.len() {
        return Err(Error::Corrupt(format!(
            "an entry of {} rows has {} moves (a bug of the merge): rows held by reference cannot be placed",
            change.rows.len(),
            moves.len()
        )));
    }
    // Count changes by (referenced table, key, scope key).
    let mut deltas: BTreeMap<(String, Vec<u8>, Vec<u8>), i64> = BTreeMap::new();
    let mut done = BTreeSet::new();
    for row in &change.rows {
        for (held, via, from) in refs.iter().filter(|(_, via, _)| via.table == row.table) {
            let pk = encode_key(&row.pk);
            if !done.insert((held.name.clone(), row.table.clone(), pk.clone())) {
                continue;
            }
            let (state, roles) = book.state(&row.table, &row.pk)?;
            let now = via.target(from, &state, &roles).map(|(key, skey)| (encode_key(&key), encode_key(&skey)));
            let was = book.named(&held.name, &row.table, &pk)?;
            if now == was {
                continue;
            }
            for (named, delta) in [(&was, -1), (&now, 1)] {
                if let Some((key, skey)) = named {
                    *deltas.entry((held.name.clone(), key.clone(), skey.clone())).or_default() += delta;
                }
            }
            book.set_named(&held.name, &row.table, &pk, now.as_ref())?;
        }
    }
    deltas.retain(|_, d| *d != 0);
    // The rows whose holders may have changed, and those the entry changed.
    let mut touched: BTreeSet<(String, Vec<u8>)> = deltas.keys().map(|(t, k, _)| (t.clone(), k.clone())).collect();
    for row in change.rows.iter().filter(|r| refs.iter().any(|(held, _, _)| held.name == r.table)) {
        touched.insert((row.table.clone(), encode_key(&row.pk)));
    }
    let mut before = BTreeMap::new();
    for key in &touched {
        before.insert(key.clone(), book.holders(&key.0, &key.1)?);
    }
    for ((table, key, skey), delta) in &deltas {
        book.count(table, key, skey, *delta)?;
    }
    let decode = |keys: &BTreeSet<Vec<u8>>| decode_keys(keys, limits);
    for (key, was) in before {
        let now = book.holders(&key.0, &key.1)?;
        let moved = Move { before: decode(&was)?, after: decode(&now)? };
        let mut in_entry = false;
        for (row, m) in change.rows.iter().zip(moves.iter_mut()) {
            if row.table == key.0 && encode_key(&row.pk) == key.1 {
                *m = Some(moved.clone());
                in_entry = true;
            }
        }
        if !in_entry && was != now {
            let pk = decode_key(&key.1, limits).map_err(|e| Error::Corrupt(format!("a referenced key kept: {e}")))?;
            change.rows.push(RowChange { table: key.0, pk, state: RowState::default() });
            moves.push(Some(moved));
        }
    }
    Ok(())
}

/// The keys of the scopes holding a row of `table`, as the merge's intake asks them.
pub(crate) fn holder_keys(book: &mut dyn RefBook, limits: &Limits, table: &str, pk: &[Value]) -> Result<Vec<ScopeKey>> {
    decode_keys(&book.holders(table, &encode_key(pk))?, limits)
}

fn decode_keys(keys: &BTreeSet<Vec<u8>>, limits: &Limits) -> Result<Vec<ScopeKey>> {
    keys.iter().map(|k| decode_key(k, limits).map_err(|e| Error::Corrupt(format!("a scope key kept: {e}")))).collect()
}

/// The references `new` declares for tables `old` (the version it replaces, if any) did not
/// have: the stored rows of their referencing tables were never counted.
pub(crate) fn new_references<'a>(
    old: Option<&SyncSchema>,
    new: &'a SyncSchema,
) -> Vec<(&'a SchemaTable, &'a Via, &'a SchemaTable)> {
    references(new).into_iter().filter(|(held, _, _)| old.is_none_or(|o| o.table(&held.name).is_none())).collect()
}

/// Counts what one stored row of a referencing table (as a one-row batch) names of `held`,
/// when a schema version first declares it: no entry is logged, as no device holds any of
/// `held` yet.
pub(crate) fn count_stored(
    book: &mut dyn RefBook,
    (held, via, from): (&SchemaTable, &Via, &SchemaTable),
    stored: &Batch,
) -> Result<()> {
    for row in &stored.rows {
        if let Some((key, skey)) = via.target(from, &row.state, &stored.roles) {
            let named = (encode_key(&key), encode_key(&skey));
            book.set_named(&held.name, &from.name, &encode_key(&row.pk), Some(&named))?;
            book.count(&held.name, &named.0, &named.1, 1)?;
        }
    }
    Ok(())
}

/// Whether `table` is held by reference under `schema`.
pub(crate) fn by_reference(schema: Option<&SyncSchema>, table: &str) -> bool {
    schema.and_then(|s| s.table(table)).and_then(|t| t.scope.as_ref()).is_some_and(|s| s.via.is_some())
}

/// Whether a logged row only entered or left scopes, without a change of its own.
pub(crate) fn moved_only(row: &RowChange) -> bool {
    // Exactly empty: a change of a counter alone has neither a life nor a field entry.
    row.state == RowState::default()
}
