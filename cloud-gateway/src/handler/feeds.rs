//! Publishing what was logged, once for every device holding it: the broker fans each
//! publish out to the devices subscribed to its topic.
//!
//! A tenant whose schema declares no scope has one scope, `all`: each entry goes out once on
//! its topic, with the change, naming the log's entry before it, and a poke announces the
//! log's head to devices of earlier versions. A tenant with scopes has a scope for each set
//! of keys its devices hold (see `storage::chains`): each entry goes out once on the topic of
//! every scope it concerns, with that scope's part of it (rows that stayed, rows that
//! entered whole, keys of rows that left), naming the scope's entry before it. A scope's
//! devices never see another scope's rows. (Positions are the tenant's log's: the gaps
//! between a scope's say how much was logged elsewhere, not what.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use driftless_core::codec::{EncodeOptions, encode_batch, envelope};
use driftless_core::protocol::{DEFAULT_SCOPE, Downlink, scope_topic};
use driftless_core::scope::{DeviceScope, Operand};
use driftless_core::{Epoch, SyncSchema};

use super::{Outgoing, fits};
use crate::error::Result;
use crate::storage::chains::Chain;
use crate::storage::{GatewayStore, LogEntry, Logged, Params, ServedSchema, refs, scoped};

/// The largest change broadcast with its rows: a larger one is announced without them, and
/// the devices pull it in pages of the size they ask for.
pub const FEED_MAX_BYTES: usize = 128 << 10;
pub const FEED_MAX_ROWS: usize = 1_000;

/// A poke announcing the newest of `entries`, if any.
pub fn announce(tenant: &str, entries: &[LogEntry]) -> Option<Outgoing> {
    entries.last().map(|e| Outgoing::Poke { tenant: tenant.to_owned(), head: e.cursor })
}

/// The publishes announcing `entries` (in log order) to the devices holding them, and the
/// poke for devices of earlier versions (coalesced by the service; devices following a scope
/// ignore it). The service publishes them only once the entries are durable. The entries
/// are logged whatever happens here: a publish that could not be made (a read of ours that
/// failed) is left to the gap the next one shows, or to the devices' backstop pulls.
pub fn feed(store: &mut dyn GatewayStore, epoch: Epoch, tenant: &str, entries: &[LogEntry]) -> Vec<Outgoing> {
    let mut out = match publishes(store, epoch, tenant, entries) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(%tenant, "changes logged but not published (devices will pull them): {e}");
            Vec::new()
        }
    };
    out.extend(announce(tenant, entries));
    out
}

fn publishes(store: &mut dyn GatewayStore, epoch: Epoch, tenant: &str, entries: &[LogEntry]) -> Result<Vec<Outgoing>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let served = store.served_schema()?.filter(|s| s.schema.tables.iter().any(|t| t.scope.is_some()));
    match served {
        Some(served) => scoped_feed(store, epoch, tenant, &served, entries),
        None => Ok(whole(epoch, tenant, entries)),
    }
}

/// Every entry, whole, on the tenant's one scope.
fn whole(epoch: Epoch, tenant: &str, entries: &[LogEntry]) -> Vec<Outgoing> {
    let topic = scope_topic(tenant, DEFAULT_SCOPE);
    entries
        .iter()
        .map(|e| {
            let mut batch = Vec::new();
            if e.change.rows.len() <= FEED_MAX_ROWS {
                batch = envelope(&e.payload, EncodeOptions::default());
                if !fits(&batch, FEED_MAX_BYTES) {
                    batch.clear();
                }
            }
            let msg = Downlink::Feed {
                epoch,
                scope: DEFAULT_SCOPE.to_owned(),
                previous: e.previous,
                cursor: e.cursor,
                origin: e.origin.clone(),
                batch,
                evict: Vec::new(),
            };
            Outgoing::Feed { topic: topic.clone(), payload: msg.encode() }
        })
        .collect()
}

/// Each entry on the topics of the scopes it concerns, each with its part.
fn scoped_feed(
    store: &mut dyn GatewayStore,
    epoch: Epoch,
    tenant: &str,
    served: &ServedSchema,
    entries: &[LogEntry],
) -> Result<Vec<Outgoing>> {
    let kept = store.kept().and_then(|kept| kept.scopes(tenant, served.version));
    let scopes = match kept {
        Some(scopes) => scopes,
        None => {
            let scopes = Arc::new(scopes_held(store, tenant, &served.schema)?);
            if let Some(kept) = store.kept() {
                kept.keep_scopes(tenant, served.version, scopes.clone());
            }
            scopes
        }
    };
    let mut out = Vec::new();
    for e in entries {
        for (id, (chain, scope)) in scopes.iter() {
            if !chain.concerns(&e.change, &e.moves) {
                continue;
            }
            let previous = store.chain_before(tenant, chain, e.cursor.position)?;
            let logged =
                Logged { cursor: e.cursor, origin: e.origin.clone(), change: e.change.clone(), moves: e.moves.clone() };
            let part = scoped::part(store, tenant, logged, scope)?;
            let (mut batch, mut evict) = (Vec::new(), Vec::new());
            if part.batch.rows.len() + part.evict.rows.len() <= FEED_MAX_ROWS {
                batch = encode_batch(&part.batch, EncodeOptions::default());
                if !part.evict.rows.is_empty() {
                    evict = encode_batch(&part.evict, EncodeOptions::default());
                }
                // Too large to broadcast: announced without its part, which each device
                // pulls.
                if !fits(&batch, FEED_MAX_BYTES.saturating_sub(evict.len())) {
                    batch.clear();
                    evict.clear();
                }
            }
            // A writer skips the rows of its own change; one that pulled rows in by reference
            // (a work order naming a customer its writer does not hold) goes to it as anyone
            // else's, its own rows merging again as nothing new.
            let pulled_in = e.change.rows.iter().any(refs::moved_only);
            let msg = Downlink::Feed {
                epoch,
                scope: id.clone(),
                previous,
                cursor: e.cursor,
                origin: if pulled_in { String::new() } else { e.origin.clone() },
                batch,
                evict,
            };
            out.push(Outgoing::Feed { topic: scope_topic(tenant, id), payload: msg.encode() });
        }
    }
    Ok(out)
}

/// The scopes the tenant's devices hold (registered ones by their parameters, and devices
/// that synced without a registration), by name.
fn scopes_held(
    store: &mut dyn GatewayStore,
    tenant: &str,
    schema: &SyncSchema,
) -> Result<BTreeMap<String, (Chain, DeviceScope)>> {
    let mut params: BTreeMap<String, Params> = BTreeMap::new();
    for d in store.devices(tenant)? {
        params.entry(d.device).or_default();
    }
    for r in store.registry(Some(tenant))? {
        if r.removed_ms.is_none() {
            params.insert(r.device, r.params);
        } else {
            params.remove(&r.device);
        }
    }
    // Unless a scope names the device itself, devices with the same parameters hold the
    // same scope: worked out once.
    let by_device = schema
        .tables
        .iter()
        .filter_map(|t| t.scope.as_ref())
        .any(|s| s.terms.iter().any(|t| t.operand == Operand::Device));
    let distinct: BTreeSet<(String, Params)> =
        params.into_iter().map(|(device, p)| (if by_device { device } else { String::new() }, p)).collect();
    let mut scopes = BTreeMap::new();
    for (device, params) in distinct {
        let scope = DeviceScope::of(schema, &device, &params);
        let chain = Chain::of(&scope);
        scopes.entry(chain.id()).or_insert((chain, scope));
    }
    Ok(scopes)
}
