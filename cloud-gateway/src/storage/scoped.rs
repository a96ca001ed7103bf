//! What a pull serves a device that holds only its scopes.
//!
//! Each logged row of a scoped table carries where it moved (its scope key before and after
//! the change). Over the entries a page covers, a row the device held at the start and
//! still holds at the end gets its changes as logged; a row that entered its scope gets its
//! whole current state (the device may never have seen it, and merging a state it partly
//! holds changes nothing twice); a row that left is evicted (the device drops it without
//! syncing a delete); a row outside its scope at both ends is not shown, whatever happened
//! to it in between. A device offline across any number of moves thus ends up holding
//! exactly its rows.

use std::collections::HashMap;

use driftless_core::codec::{Limits, encode_key};
use driftless_core::scope::{DeviceScope, Move, ScopeKey, decode_moves};
use driftless_core::{LogCursor, RowChange, RowState, SyncSchema, Value};

use crate::error::{Error, Result};
use crate::storage::{ChangesPage, GatewayStore};

/// Log entries read for one page, at most.
const ENTRIES: usize = 256;

/// A row of a scoped table seen in a page.
struct Seen {
    table: String,
    pk: Vec<Value>,
    /// Its key before the page's first change to it, and after the last.
    before: Option<ScopeKey>,
    after: Option<ScopeKey>,
    /// Its changes from other writers than the device, in order.
    changes: Vec<RowChange>,
}

pub(crate) fn changes_page<S: GatewayStore + ?Sized>(
    store: &mut S,
    tenant: &str,
    device: &str,
    cursor: u64,
    max_rows: usize,
    scope: &DeviceScope,
) -> Result<ChangesPage> {
    let tag = store.log_tag(tenant, cursor)?.unwrap_or(0);
    let mut page = ChangesPage { cursor: LogCursor { position: cursor, tag }, ..ChangesPage::default() };
    let (entries, more) = store.log_after(tenant, cursor, ENTRIES)?;
    page.more = more;
    let mut seen: Vec<Seen> = Vec::new();
    let mut index: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    let mut rows = 0;
    for entry in entries {
        if rows >= max_rows {
            page.more = true;
            break;
        }
        page.cursor = entry.cursor;
        // A device's own changes are not sent back to it; the cursor still moves past them,
        // and a row its own change took out of its scope is still evicted.
        let own = entry.origin == device;
        if !own {
            page.batch.roles.extend(entry.change.roles);
        }
        for (i, row) in entry.change.rows.into_iter().enumerate() {
            let moved = entry.moves.get(i).cloned().flatten();
            let Some(Move { before, after }) = moved.filter(|_| scope.is_scoped(&row.table)) else {
                if !own {
                    page.batch.rows.push(row);
                    rows += 1;
                }
                continue;
            };
            let at = *index.entry((row.table.clone(), encode_key(&row.pk))).or_insert_with(|| {
                seen.push(Seen { table: row.table.clone(), pk: row.pk.clone(), before, after: None, changes: vec![] });
                seen.len() - 1
            });
            let s = &mut seen[at];
            s.after = after;
            if !own {
                s.changes.push(row);
                rows += 1;
            }
        }
    }
    for s in seen {
        let held = scope.holds(&s.table, s.before.as_ref());
        let holds = scope.holds(&s.table, s.after.as_ref());
        match (held, holds) {
            (true, true) => page.batch.rows.extend(s.changes),
            // Even a row it made itself: a device whose scope changed dropped its rows, those
            // it had not sent yet included (they come back this way once merged).
            (false, true) => {
                if let Some(current) = store.row_state(tenant, &s.table, &s.pk)? {
                    page.batch.roles.extend(current.roles);
                    page.batch.rows.extend(current.rows);
                }
            }
            (true, false) => page.evict.rows.push(RowChange { table: s.table, pk: s.pk, state: RowState::default() }),
            _ => {}
        }
    }
    Ok(page)
}

/// Drops from a snapshot page the rows outside `scope`. A deleted row whose values are gone
/// is kept: it reveals nothing but its key, and a device that held it must see the delete.
pub(crate) fn snapshot_in_scope(batch: &mut driftless_core::Batch, schema: &SyncSchema, scope: &DeviceScope) {
    if !scope.any() {
        return;
    }
    let roles = batch.roles.clone();
    batch.rows.retain(|row| {
        let Some((s, table)) = schema.table(&row.table).and_then(|t| t.scope.as_ref().map(|s| (s, t))) else {
            return true;
        };
        let key = s.key_of(&row.state, table, &roles);
        let visible = driftless_core::is_visible(&row.state, &table.spec());
        scope.holds(&row.table, key.as_ref()) || (!visible && key.is_none())
    });
}

/// A logged entry's moves as stored (`None`: it holds no row of a scoped table).
pub(crate) fn read_moves(bytes: Option<&[u8]>, limits: &Limits) -> Result<Vec<Option<Move>>> {
    bytes
        .map(|b| decode_moves(b, limits).map_err(|e| Error::Corrupt(format!("a logged entry's scope moves: {e}"))))
        .transpose()
        .map(Option::unwrap_or_default)
}
