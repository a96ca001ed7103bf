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
use driftless_core::{LogCursor, RowChange, RowState, SchemaTable, SyncSchema, Value};

use crate::error::{Error, Result};
use crate::storage::chains::Chain;
use crate::storage::common::{parse_resume, parse_resume_ref, resume_token};
use crate::storage::refs;
use crate::storage::{ChangesPage, GatewayStore, Logged, SnapshotPage};

/// Log entries read for one page, at most.
const ENTRIES: usize = 256;

/// A row of a scoped table seen in a page.
struct Seen {
    table: String,
    pk: Vec<Value>,
    /// The keys of the scopes holding it before the page's first change to it, and after
    /// the last.
    before: Vec<ScopeKey>,
    after: Vec<ScopeKey>,
    /// Its changes from other writers than the device, in order.
    changes: Vec<RowChange>,
    /// Whether a change in the page took it out of the scope: the chain does not hold what
    /// happened to it elsewhere until it came back, so it goes whole.
    away: bool,
    /// Whether it entered or left scopes in the page without a change of its own (a row held
    /// by reference): one that entered goes whole, to its writer too.
    pulled: bool,
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
    // A device holding a scope reads its scope's chain only: its cursor stays on the chain,
    // where the entries published for its scope name their predecessors.
    let chain = scope.any().then(|| Chain::of(scope));
    let (entries, more) = store.log_after(tenant, cursor, ENTRIES, chain.as_ref())?;
    page.more = more;
    show(store, tenant, Some(device), entries, max_rows, scope, &mut page)?;
    Ok(page)
}

/// What the devices holding `scope` get of one entry, published on the scope's topic: as
/// [`changes_page`] shows it, the writer's own rows included (the writer skips them, but
/// not the evictions).
pub(crate) fn part<S: GatewayStore + ?Sized>(
    store: &mut S,
    tenant: &str,
    entry: Logged,
    scope: &DeviceScope,
) -> Result<ChangesPage> {
    let mut page = ChangesPage::default();
    show(store, tenant, None, vec![entry], usize::MAX, scope, &mut page)?;
    Ok(page)
}

/// Adds to `page` what a device holding `scope` gets of `entries` (not the rows of its own,
/// if it is `device`), up to about `max_rows` rows, moving the page's cursor past the
/// entries shown.
fn show<S: GatewayStore + ?Sized>(
    store: &mut S,
    tenant: &str,
    device: Option<&str>,
    entries: Vec<Logged>,
    max_rows: usize,
    scope: &DeviceScope,
    page: &mut ChangesPage,
) -> Result<()> {
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
        let own = device == Some(entry.origin.as_str());
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
                seen.push(Seen {
                    table: row.table.clone(),
                    pk: row.pk.clone(),
                    before,
                    after: Vec::new(),
                    changes: vec![],
                    away: false,
                    pulled: false,
                });
                seen.len() - 1
            });
            // Counted whether the device gets it as logged, whole or as an eviction.
            rows += 1;
            let s = &mut seen[at];
            s.away |= !scope.holds_any(&row.table, &after);
            s.pulled |= refs::moved_only(&row);
            s.after = after;
            // A row that only entered or left scopes has nothing to show as logged.
            if !own && !refs::moved_only(&row) {
                s.changes.push(row);
            }
        }
    }
    for s in seen {
        let held = scope.holds_any(&s.table, &s.before);
        let holds = scope.holds_any(&s.table, &s.after);
        match (held, holds) {
            (true, true) if !s.away => page.batch.rows.extend(s.changes),
            // A row it made itself in its scope it holds already (a change of scope keeps the
            // rows with changes not yet acknowledged); one that was away may have changed
            // meanwhile by anyone.
            (held, true) if s.away || !s.changes.is_empty() || (s.pulled && !held) => {
                // As it is now: sent only if it is still in the scope (one that left again
                // after the page's end is not shown; the next page evicts nothing it holds).
                // A row held by reference goes as it is: if it left since, the entry that
                // took it out follows and evicts it.
                let by_reference = scope.by_reference(&s.table);
                if let Some(current) = store.row_state(tenant, &s.table, &s.pk)?
                    && (by_reference
                        || current.rows.iter().all(|r| scope.holds_state(&s.table, &r.state, &current.roles)))
                {
                    page.batch.roles.extend(current.roles);
                    page.batch.rows.extend(current.rows);
                }
            }
            (true, false) => page.evict.rows.push(RowChange { table: s.table, pk: s.pk, state: RowState::default() }),
            _ => {}
        }
    }
    Ok(())
}

/// A page of the current state of the rows a device holding `scope` holds, table by table
/// in name order: a scoped table's rows found by the scope index (a scope of ten thousand
/// rows in a table of millions reads ten thousand), every row of the others. `None` if the
/// resume token names no position.
pub(crate) fn snapshot_page<S: GatewayStore + ?Sized>(
    store: &mut S,
    tenant: &str,
    resume: &[u8],
    max_rows: usize,
    schema: &SyncSchema,
    scope: &DeviceScope,
) -> Result<Option<SnapshotPage>> {
    let Some((from_table, from_key)) = parse_resume(resume) else { return Ok(None) };
    let mut tables: Vec<&SchemaTable> = schema.tables.iter().filter(|t| t.name >= from_table).collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut page = SnapshotPage::default();
    for table in tables {
        let after: &[u8] = if table.name == from_table { &from_key } else { &[] };
        loop {
            let want = max_rows.saturating_sub(page.batch.rows.len());
            if want == 0 {
                return Ok(Some(page));
            }
            let rows = match (&table.scope, scope.key(&table.name)) {
                (None, _) => store.table_rows(tenant, &table.name, after_or(&page, &table.name, after), want)?,
                (Some(_), Some(key)) => {
                    let skey = encode_key(key);
                    store.scope_rows(tenant, &table.name, &skey, after_or(&page, &table.name, after), want)?
                }
                // The device holds none of it.
                (Some(_), None) => Vec::new(),
            };
            let last = rows.len() < want;
            for (pk, b) in rows {
                page.batch.roles.extend(b.roles);
                page.batch.rows.extend(b.rows);
                page.resume = resume_token(&table.name, &pk);
            }
            if last {
                break;
            }
        }
    }
    page.done = true;
    page.resume.clear();
    Ok(Some(page))
}

/// How many rows a snapshot for a device holding `scope` holds: its scoped tables' rows
/// counted in the scope indexes, without reading them (that would take as long as reading
/// the snapshot's first ten pages, holding the first one back).
pub(crate) fn snapshot_rows<S: GatewayStore + ?Sized>(
    store: &mut S,
    tenant: &str,
    schema: &SyncSchema,
    scope: &DeviceScope,
) -> Result<u64> {
    let mut rows = 0;
    for table in &schema.tables {
        rows += match (&table.scope, scope.key(&table.name)) {
            (None, _) => store.rows_size(tenant, Some(&table.name))?.0,
            (Some(_), Some(key)) => store.scope_count(tenant, &table.name, &encode_key(key))?,
            (Some(_), None) => 0,
        };
    }
    Ok(rows)
}

/// Where to read `table` from: after the page's last row if it is of that table, else after
/// `after`.
fn after_or<'a>(page: &'a SnapshotPage, table: &str, after: &'a [u8]) -> &'a [u8] {
    match parse_resume_ref(&page.resume) {
        Some((t, key)) if t == table => key,
        _ => after,
    }
}

/// A logged entry's moves as stored (`None`: it holds no row of a scoped table).
pub(crate) fn read_moves(bytes: Option<&[u8]>, limits: &Limits) -> Result<Vec<Option<Move>>> {
    bytes
        .map(|b| decode_moves(b, limits).map_err(|e| Error::Corrupt(format!("a logged entry's scope moves: {e}"))))
        .transpose()
        .map(Option::unwrap_or_default)
}
