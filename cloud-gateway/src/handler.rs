//! What the gateway does with one uplink message: pure logic over a [`GatewayStore`],
//! returning the messages to publish. No sockets here, so it is tested without a broker.
//!
//! Whose fault a failure is decides the answer. A message at fault (undecodable, over a
//! limit, claiming another device, writing what no replica could accept) is kept as a dead
//! letter and, if it was a batch, refused with a `Nack` naming that exact batch. A failure of
//! the gateway's own (storage, a stored row it cannot read back) is returned as an error: the
//! message gets no answer at all, and the device sends it again later.

use driftless_core::codec::{
    DecodeError, Dictionaries, EncodeOptions, Limits, declared_payload_len, decode_batch, encode_batch,
};
use driftless_core::protocol::{Downlink, RefusedRow, Uplink, downlink_topic, parse_uplink_topic};
use driftless_core::scope::DeviceScope;
use driftless_core::{Batch, Epoch, LogCursor};

use crate::error::{Error, MergeError, Result};
use crate::storage::chains::Chain;
use crate::storage::scoped;
use crate::storage::{GatewayStore, Incoming, MergeOutcome, Registration, ScopeStanding, ServedSchema};

/// What to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A message for one device.
    Reply { topic: String, payload: Vec<u8> },
    /// A logged change, published once on its scope's topic for the broker to fan out.
    Feed { topic: String, payload: Vec<u8> },
    /// Tell a tenant's devices that new changes were logged, up to `head` (the service
    /// coalesces these): devices of older versions pull when told, devices that heard the
    /// scope's changes up to `head` do nothing.
    Poke { tenant: String, head: LogCursor },
}

mod feeds;
pub use feeds::{FEED_MAX_BYTES, FEED_MAX_ROWS, announce, feed};

/// Bounds and rules the gateway applies to what devices send and ask for.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub decode: Limits,
    /// Largest uplink message handled; larger ones are dead-lettered by reference.
    pub max_uplink_bytes: usize,
    /// Most rows sent in one downlink message.
    pub max_rows_per_message: usize,
    /// Most bytes in one downlink message: pages are halved until they fit (one log entry or
    /// one row is always sent, whatever its size).
    pub max_message_bytes: usize,
    /// How far ahead of the gateway's clock a write's timestamp may be; later ones are
    /// bounded to the gateway's clock and flagged.
    pub max_clock_drift_ms: u64,
    /// Serve only registered devices, in every tenant. Otherwise a tenant without a registry
    /// is open to any device (for development), and its first registration closes it.
    pub require_registration: bool,
    /// How long after the store lost changes (a restored backup) devices' batches may carry
    /// other devices' writes the store cannot check (see `storage::vouching`).
    pub recovery_window_ms: u64,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        // The same decode bounds as devices, so a batch a device may build is one the gateway
        // accepts.
        HandlerConfig {
            decode: Limits::default(),
            max_uplink_bytes: 64 << 20,
            max_rows_per_message: 2_000,
            max_message_bytes: 4 << 20,
            max_clock_drift_ms: 5 * 60_000,
            require_registration: false,
            recovery_window_ms: 24 * 3_600_000,
        }
    }
}

/// Why a message was not handled.
enum Fault {
    /// The message's own fault: dead-letter it, and send `nack` if there is one.
    Message { reason: String, nack: Option<Box<Downlink>> },
    /// The gateway's fault: no answer; the device sends it again.
    Ours(Error),
}

impl From<Error> for Fault {
    fn from(e: Error) -> Self {
        Fault::Ours(e)
    }
}

impl From<rusqlite::Error> for Fault {
    fn from(e: rusqlite::Error) -> Self {
        Fault::Ours(e.into())
    }
}

fn to(tenant: &str, device: &str, msg: Downlink) -> Outgoing {
    Outgoing::Reply { topic: downlink_topic(tenant, device), payload: msg.encode() }
}

/// The refusal of `msg`, if it was a batch (naming exactly that batch).
fn nack(msg: &Uplink, epoch: Epoch, reason: &str) -> Option<Box<Downlink>> {
    match msg {
        Uplink::Batch { id, first_seq, last_seq, .. } => Some(Box::new(Downlink::Nack {
            epoch,
            id: *id,
            first_seq: *first_seq,
            last_seq: *last_seq,
            reason: reason.to_owned(),
        })),
        Uplink::LegacyBatch { first_seq, last_seq, .. } => Some(Box::new(Downlink::LegacyNack {
            first_seq: *first_seq,
            last_seq: *last_seq,
            reason: reason.to_owned(),
        })),
        _ => None,
    }
}

/// Handles one uplink publish received at `now_ms`. Refused input becomes a dead letter (and
/// a nack when it was a batch), never an error: only the gateway's own failures are errors,
/// and then nothing is answered.
pub fn handle_uplink(
    store: &mut dyn GatewayStore,
    cfg: &HandlerConfig,
    topic: &str,
    payload: &[u8],
    now_ms: u64,
) -> Result<Vec<Outgoing>> {
    let Some((tenant, device)) = parse_uplink_topic(topic) else {
        tracing::warn!(topic, "ignoring a message on a topic that is not an uplink");
        return Ok(Vec::new());
    };
    match process(store, cfg, tenant, device, payload, now_ms) {
        Ok(out) => Ok(out),
        Err(Fault::Ours(e)) => Err(e),
        Err(Fault::Message { reason, nack }) => {
            tracing::warn!(tenant, device, %reason, "refusing a message");
            store.dead_letter(tenant, device, &reason, payload)?;
            Ok(nack.into_iter().map(|n| to(tenant, device, *n)).collect())
        }
    }
}

fn process(
    store: &mut dyn GatewayStore,
    cfg: &HandlerConfig,
    tenant: &str,
    device: &str,
    payload: &[u8],
    now_ms: u64,
) -> Result<Vec<Outgoing>, Fault> {
    // Before anything else: a device the tenant does not serve gets no answer, and nothing
    // is kept of it (not even a dead letter, or anyone could fill the store).
    let standing = store.standing(tenant, device)?;
    let role = match standing.registration {
        Registration::Registered { role } => Some(role),
        Registration::Open if !cfg.require_registration => None,
        Registration::Open | Registration::Unknown => {
            tracing::debug!(tenant, device, "ignoring a message from a device not registered");
            return Ok(Vec::new());
        }
    };
    let mut recovery_from = standing.recovery_from_ms;
    let msg = Uplink::decode(payload, &cfg.decode)
        .map_err(|e| Fault::Message { reason: format!("undecodable message: {e}"), nack: None })?;
    let mut epoch = store.epoch(tenant)?;
    let claimed = claimed_epoch(&msg).filter(|claimed| *claimed != epoch);
    if claimed.is_some() {
        // A device speaking for an epoch this instance does not know: another instance
        // sharing the store may have renewed it. Answering from a stale cache would send the
        // device back and forth between the two.
        epoch = store.epoch_now(tenant)?;
    }
    if msg.device() != device {
        let reason = format!("message claims device {:?} but arrived on the topic of {device:?}", msg.device());
        return Err(Fault::Message { nack: nack(&msg, epoch, &reason), reason });
    }
    if payload.len() > cfg.max_uplink_bytes {
        let reason = format!("message of {} bytes exceeds the limit of {}", payload.len(), cfg.max_uplink_bytes);
        return Err(Fault::Message { nack: nack(&msg, epoch, &reason), reason });
    }
    if let Some(claimed) = claimed.filter(|c| *c != epoch)
        && !store.issued_epoch(tenant, claimed)?
    {
        // An epoch this store never issued: it replaced the one that did (an empty or older
        // store). What devices send back now may hold writes it cannot check. Noted, so the
        // same epoch shown by every other device of the tenant starts nothing more.
        let reason = format!("device {device:?} speaks for epoch {claimed}, which this store never issued");
        tracing::error!(tenant, %reason, "this store replaced another; starting a new epoch");
        epoch = store.new_epoch(tenant, epoch, &reason)?;
        store.note_foreign_epoch(tenant, claimed)?;
        recovery_from = Some(now_ms as i64);
    }
    if !standing.heard && standing.recovery_from_ms.is_some() {
        // The device's recovery window starts with its first message in the new epoch.
        store.heard_in_epoch(tenant, device)?;
    }
    let recovering = recovery_from.is_some_and(|at| now_ms < (at as u64).saturating_add(cfg.recovery_window_ms));
    let scoped = Scoped::of(store, device, &standing.scope)?;
    let mine = scoped.as_ref().map(|s| &s.mine);
    let unscoped = DeviceScope::default();
    let scope = mine.unwrap_or(&unscoped);
    let at = At {
        tenant,
        device,
        scope,
        schema: scoped.as_ref().map(|s| &*s.schema),
        feed: scoped.as_ref().map_or(driftless_core::protocol::DEFAULT_SCOPE, |s| s.feed.as_str()),
    };
    let rows = |asked: u32| (asked as usize).clamp(1, cfg.max_rows_per_message);
    let bytes = |asked: u32| (asked as usize).clamp(1, cfg.max_message_bytes);
    let reply = |msg: Downlink| vec![to(tenant, device, msg)];
    let incoming = |first_seq, last_seq, legacy| Incoming {
        tenant,
        device,
        first_seq,
        last_seq,
        now_ms,
        max_drift_ms: cfg.max_clock_drift_ms,
        role: role.as_deref(),
        recovering,
        legacy,
        scope: mine,
    };
    match msg {
        Uplink::Hello { node, ref receipts, epoch: claimed, .. } => {
            let view = store.hello(tenant, device, node)?;
            let mut epoch = epoch;
            // Evidence only from a device speaking for this epoch with its own node (a copied
            // database or a renamed device id shows another's receipts).
            if claimed == Some(epoch) && view.node_owner == device {
                epoch = check_receipts(store, tenant, device, epoch, receipts)?;
            }
            store.touch_device(tenant, device, None)?;
            let mut out = reply(Downlink::Welcome {
                epoch,
                node_counter: view.node_counter,
                device_seq: view.device_seq,
                node_elsewhere: view.node_owner != device,
            });
            // Every handshake, so a device that was offline when a version was announced
            // follows it before it syncs.
            if let Some(served) = store.served_schema()? {
                out.push(to(tenant, device, served.message()));
            }
            if let Some(s) = &scoped {
                out.extend(s.tell(store, tenant, device, epoch)?);
            }
            Ok(out)
        }
        Uplink::Batch { id, first_seq, last_seq, epoch: claimed, ref receipts, ref batch, .. } => {
            let mut epoch = epoch;
            if claimed == Some(epoch) {
                // A device that only uploads tells with its next batch that the store lost it.
                epoch = check_receipts(store, tenant, device, epoch, receipts)?;
            }
            let from = incoming(first_seq, last_seq, false);
            let nack = |reason: String| Downlink::Nack { epoch, id, first_seq, last_seq, reason };
            let (outcome, refused) = merge(store, cfg, &from, batch, nack)?;
            let (receipt, previous) = (outcome.receipt, outcome.previous);
            let mut out = reply(Downlink::Ack { epoch, id, first_seq, last_seq, refused, receipt, previous });
            out.extend(feed(store, epoch, tenant, &outcome.entries));
            Ok(out)
        }
        Uplink::Pull { epoch: claimed, cursor, ref receipts, max_rows, max_bytes, echo, .. } => {
            if claimed != Some(epoch) {
                return Ok(reply(stale(epoch, cursor)));
            }
            let renewed = check_receipts(store, tenant, device, epoch, receipts)?;
            if renewed != epoch {
                return Ok(reply(stale(renewed, cursor)));
            }
            let Some(cursor) = cursor else {
                // A device with no cursor starts from a snapshot of current state, and goes
                // on from the log's head: in a scope, from its chain's last entry (later
                // entries are none of its business), where its scope's next change follows.
                let mut head = store.log_head(tenant)?;
                if let Some(s) = &scoped {
                    let last = store.chain_before(tenant, &s.chain, head.position.saturating_add(1))?;
                    if last.position > 0 {
                        head = last;
                    }
                }
                store.touch_device(tenant, device, None)?;
                let ask = PageAsk { resume: &[], name_from: false, echo };
                return snapshot(store, &at, epoch, ask, head, rows(max_rows), bytes(max_bytes));
            };
            // A scope that changed since the device was told: it starts over in its new one.
            if let Some(s) = scoped.as_ref().filter(|s| s.standing.told != Some(s.standing.version)) {
                return Ok(s.tell(store, tenant, device, epoch)?);
            }
            let renewed = check_cursor(store, tenant, device, epoch, cursor)?;
            if renewed != epoch {
                return Ok(reply(stale(renewed, Some(cursor))));
            }
            store.touch_device(tenant, device, Some(cursor.position))?;
            let page = changes(store, &at, cursor.position, rows(max_rows), bytes(max_bytes))?;
            let (from, cursor, more, batch) = (cursor.position, page.cursor, page.more, page.batch);
            let mut out = reply(match page.evict {
                None => Downlink::Changes { epoch, from, cursor, more, echo, batch },
                Some(evict) => Downlink::ScopedChanges { epoch, from, cursor, more, echo, evict, batch },
            });
            // The scope's name changed under it (a schema that scopes another table; one that
            // scopes none any more is refused), or a gateway of an earlier version told it
            // none: it follows the right topic now.
            if let Some(s) = scoped.as_ref().filter(|s| s.standing.told_feed.as_deref() != Some(s.feed.as_str())) {
                store.scope_told(tenant, device, s.standing.version, &s.feed)?;
                out.push(to(tenant, device, Downlink::Follow { epoch, scope: s.feed.clone() }));
            }
            Ok(out)
        }
        Uplink::PullSnapshot { epoch: claimed, resume, log_cursor, max_rows, max_bytes, name_from, echo, .. } => {
            if claimed != epoch {
                return Ok(reply(stale(epoch, Some(log_cursor))));
            }
            // Pages already applied came from the log up to `log_cursor`: a store without it
            // lost what they showed.
            let renewed = check_cursor(store, tenant, device, epoch, log_cursor)?;
            if renewed != epoch {
                return Ok(reply(stale(renewed, Some(log_cursor))));
            }
            store.touch_device(tenant, device, None)?;
            let ask = PageAsk { resume: &resume, name_from, echo };
            snapshot(store, &at, epoch, ask, log_cursor, rows(max_rows), bytes(max_bytes))
        }
        Uplink::LegacyBatch { first_seq, last_seq, ref batch, .. } => {
            let from = incoming(first_seq, last_seq, true);
            let nack = |reason: String| Downlink::LegacyNack { first_seq, last_seq, reason };
            let (outcome, refused) = merge(store, cfg, &from, batch, nack)?;
            if !refused.is_empty() {
                // Version 1 cannot say which rows: the whole batch is refused.
                let reason = refused.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>().join("; ");
                return Err(Fault::Message {
                    nack: Some(Box::new(Downlink::LegacyNack { first_seq, last_seq, reason: reason.clone() })),
                    reason,
                });
            }
            let mut out = reply(Downlink::LegacyAck { first_seq, last_seq });
            out.extend(feed(store, epoch, tenant, &outcome.entries));
            Ok(out)
        }
        Uplink::LegacyPull { cursor, max_rows, .. } => {
            let head = store.log_head(tenant)?;
            if cursor == 0 || cursor > head.position {
                store.touch_device(tenant, device, None)?;
                let (page, batch) = snapshot_page(store, &at, &[], rows(max_rows), cfg.max_message_bytes)?;
                return Ok(reply(Downlink::LegacySnapshot {
                    resume: page.resume,
                    log_cursor: head.position,
                    done: page.done,
                    batch,
                }));
            }
            store.touch_device(tenant, device, Some(cursor))?;
            // Version 1 has no evictions: such a device is shown only rows of its scopes.
            let page = changes(store, &at, cursor, rows(max_rows), cfg.max_message_bytes)?;
            Ok(reply(Downlink::LegacyChanges { cursor: page.cursor.position, more: page.more, batch: page.batch }))
        }
        Uplink::LegacyPullSnapshot { resume, log_cursor, max_rows, .. } => {
            store.touch_device(tenant, device, None)?;
            let (page, batch) = snapshot_page(store, &at, &resume, rows(max_rows), cfg.max_message_bytes)?;
            Ok(reply(Downlink::LegacySnapshot { resume: page.resume, log_cursor, done: page.done, batch }))
        }
        _ => Err(Fault::Message { reason: "a message this gateway does not handle".into(), nack: None }),
    }
}

/// The epoch a message says it speaks for, if any.
fn claimed_epoch(msg: &Uplink) -> Option<Epoch> {
    match msg {
        Uplink::Hello { epoch, .. } | Uplink::Batch { epoch, .. } | Uplink::Pull { epoch, .. } => *epoch,
        Uplink::PullSnapshot { epoch, .. } => Some(*epoch),
        _ => None,
    }
}

/// Starts a new epoch if one of `receipts` (issued by this store for the device's merges)
/// names a log entry the store no longer holds: the store was restored from an older backup.
/// Returns the epoch to answer with.
fn check_receipts(
    store: &mut dyn GatewayStore,
    tenant: &str,
    device: &str,
    epoch: Epoch,
    receipts: &[LogCursor],
) -> Result<Epoch, Fault> {
    let mut missing = None;
    for r in receipts {
        if store.log_tag(tenant, r.position)? != Some(r.tag) {
            missing = Some(r);
            break;
        }
    }
    let Some(receipt) = missing else { return Ok(epoch) };
    let reason = format!(
        "device {device:?} of {tenant:?} holds a receipt for log entry {} the store does not have",
        receipt.position
    );
    tracing::warn!(%reason, "this store lost acknowledged changes; starting a new epoch");
    Ok(store.new_epoch(tenant, epoch, &reason)?)
}

/// Starts a new epoch if `cursor` (read from this store's log) names a position the store
/// does not hold, or holds another entry at: the store was restored from an older backup
/// (and may have logged other changes at those positions since). Returns the epoch to answer
/// with.
fn check_cursor(
    store: &mut dyn GatewayStore,
    tenant: &str,
    device: &str,
    epoch: Epoch,
    cursor: LogCursor,
) -> Result<Epoch, Fault> {
    let head = store.log_head(tenant)?;
    let tag = store.log_tag(tenant, cursor.position)?;
    if cursor.position <= head.position && (cursor.tag == 0 || tag == Some(cursor.tag)) {
        return Ok(epoch);
    }
    let reason =
        format!("device {device:?} of {tenant:?} read log position {} the store does not hold", cursor.position);
    tracing::warn!(%reason, "this store lost logged changes; starting a new epoch");
    Ok(store.new_epoch(tenant, epoch, &reason)?)
}

/// Decodes and merges a batch; what the merge did, and the rows refused (each kept as a dead
/// letter). A batch at fault as a whole is refused with the nack `nack` builds; a
/// failure of the store, or a batch this gateway is too old to read, is ours.
fn merge(
    store: &mut dyn GatewayStore,
    cfg: &HandlerConfig,
    from: &Incoming<'_>,
    batch: &[u8],
    nack: impl Fn(String) -> Downlink,
) -> Result<(MergeOutcome, Vec<RefusedRow>), Fault> {
    let refuse = |reason: String| Fault::Message { nack: Some(Box::new(nack(reason.clone()))), reason };
    let decoded = match decode_batch(batch, &cfg.decode, &Dictionaries::default()) {
        Ok(b) => b,
        // Written by a newer version, or with a dictionary this gateway lacks: the device is
        // right and the gateway must be upgraded; the device sends it again later.
        Err(e @ (DecodeError::UnsupportedVersion(_) | DecodeError::UnknownDictionary(_))) => {
            return Err(Fault::Ours(Error::Corrupt(format!("a batch this gateway cannot read yet: {e}"))));
        }
        Err(e) => return Err(refuse(format!("batch refused: {e}"))),
    };
    match store.merge(from, &decoded) {
        Ok(mut outcome) => {
            tracing::debug!(tenant = from.tenant, device = from.device, applied = outcome.applied, "merged");
            let mut refused = Vec::with_capacity(outcome.refused.len());
            for (index, reason) in std::mem::take(&mut outcome.refused) {
                let row = Batch { roles: decoded.roles.clone(), rows: vec![decoded.rows[index].clone()] };
                let reason = format!("row refused: {reason}");
                tracing::warn!(tenant = from.tenant, device = from.device, %reason);
                store.dead_letter(from.tenant, from.device, &reason, &encode_batch(&row, EncodeOptions::default()))?;
                refused.push(RefusedRow { index: index as u32, reason });
            }
            Ok((outcome, refused))
        }
        Err(MergeError::Refused(r)) => Err(refuse(format!("batch refused: {r}"))),
        Err(MergeError::Store(e)) => Err(Fault::Ours(e)),
    }
}

/// The answer to a device that speaks for another epoch: nothing, under the current one. The
/// device sees the new epoch and starts over with a handshake.
fn stale(epoch: Epoch, cursor: Option<LogCursor>) -> Downlink {
    let cursor = cursor.unwrap_or_default();
    Downlink::Changes {
        epoch,
        from: cursor.position,
        cursor,
        more: false,
        // Read by its epoch alone, never applied.
        echo: None,
        batch: encode_batch(&Batch::default(), EncodeOptions::default()),
    }
}

/// Whether an encoded page fits `max_bytes`, and its payload, once decompressed, stays well
/// within what a device's decoder accepts (compressible rows can be small on the wire and
/// huge in memory).
fn fits(envelope: &[u8], max_bytes: usize) -> bool {
    let raw = declared_payload_len(envelope).unwrap_or(u64::MAX);
    envelope.len() <= max_bytes && raw <= (Limits::default().max_decompressed / 2) as u64
}

/// A page of changes as sent: the batch encoded, and the evicted keys for a device holding
/// scopes.
struct Page {
    cursor: LogCursor,
    more: bool,
    batch: Vec<u8>,
    evict: Option<Vec<u8>>,
}

/// Logged changes after `cursor` for the device `at` names, halved until the message fits
/// `max_bytes`.
fn changes(store: &mut dyn GatewayStore, at: &At<'_>, cursor: u64, mut rows: usize, max_bytes: usize) -> Result<Page> {
    loop {
        let page = store.changes_in_scope(at.tenant, at.device, cursor, rows, at.scope)?;
        let batch = encode_batch(&page.batch, EncodeOptions::default());
        let evict = at.scope.any().then(|| encode_batch(&page.evict, EncodeOptions::default()));
        if fits(&batch, max_bytes.saturating_sub(evict.as_ref().map_or(0, Vec::len))) || rows == 1 {
            return Ok(Page { cursor: page.cursor, more: page.more, batch, evict });
        }
        rows /= 2;
    }
}

/// Who a page is for.
struct At<'a> {
    tenant: &'a str,
    device: &'a str,
    scope: &'a DeviceScope,
    /// The served schema, when it has scopes.
    schema: Option<&'a ServedSchema>,
    /// The name of the device's scope.
    feed: &'a str,
}

fn snapshot_page(
    store: &mut dyn GatewayStore,
    at: &At<'_>,
    resume: &[u8],
    mut rows: usize,
    max_bytes: usize,
) -> Result<(crate::storage::SnapshotPage, Vec<u8>), Fault> {
    loop {
        let page = match at.schema {
            Some(served) => scoped::snapshot_page(store, at.tenant, resume, rows, &served.schema, at.scope)?,
            None => store.snapshot_page(at.tenant, resume, rows)?,
        };
        let page = page.ok_or_else(|| Fault::Message {
            reason: "the snapshot resume token does not name a position in this store".into(),
            nack: None,
        })?;
        let batch = encode_batch(&page.batch, EncodeOptions::default());
        if fits(&batch, max_bytes) || rows == 1 {
            return Ok((page, batch));
        }
        rows /= 2;
    }
}

/// A device's request for a snapshot page: where to read it from, and what the answer
/// repeats of the request.
struct PageAsk<'a> {
    resume: &'a [u8],
    name_from: bool,
    echo: Option<u64>,
}

/// The snapshot page at `ask.resume` (after `SnapshotSize` for the first), naming where it
/// was read from and repeating the request's echo if the device asked.
fn snapshot(
    store: &mut dyn GatewayStore,
    at: &At<'_>,
    epoch: Epoch,
    ask: PageAsk<'_>,
    log_cursor: LogCursor,
    rows: usize,
    max_bytes: usize,
) -> Result<Vec<Outgoing>, Fault> {
    let PageAsk { resume, name_from, echo } = ask;
    let mut out = Vec::new();
    let (page, batch) = snapshot_page(store, at, resume, rows, max_bytes)?;
    // What the whole snapshot holds, before its first page, for the device's progress.
    if resume.is_empty() {
        let first = FirstPage { rows: page.batch.rows.len() as u64, bytes: declared_payload_len(&batch).unwrap_or(0) };
        let (rows, bytes) = snapshot_size(store, at, first)?;
        out.push(to(at.tenant, at.device, Downlink::SnapshotSize { epoch, rows, bytes }));
    }
    let from = (name_from || echo.is_some()).then(|| resume.to_vec());
    let msg = Downlink::Snapshot { epoch, from, echo, resume: page.resume, log_cursor, done: page.done, batch };
    out.push(to(at.tenant, at.device, msg));
    Ok(out)
}

/// A snapshot's first page: its rows, and their bytes before compression.
struct FirstPage {
    rows: u64,
    bytes: u64,
}

/// What a snapshot for the device holds: counted again only once something was logged (after
/// a restore every device starts a snapshot). A device's scope is counted in the scope
/// indexes, and its bytes estimated from the first page (the rows' mean payload size times
/// their count): reading each row for its size would hold the first page back; a device
/// without scopes gets both counted exactly (the tenant's rows are read whole anyway).
fn snapshot_size(store: &mut dyn GatewayStore, at: &At<'_>, first: FirstPage) -> Result<(u64, u64)> {
    let version = at.schema.map_or(0, |s| s.version);
    let head = store.log_head(at.tenant)?.position;
    if let Some(size) = store.kept().and_then(|kept| kept.size(at.tenant, at.feed, version, head)) {
        return Ok(size);
    }
    let size = match at.schema {
        Some(served) => {
            let rows = scoped::snapshot_rows(store, at.tenant, &served.schema, at.scope)?;
            let bytes = (first.bytes as u128 * rows as u128).checked_div(first.rows as u128).unwrap_or(0);
            (rows, bytes.max(first.bytes as u128).min(u64::MAX as u128) as u64)
        }
        None => store.rows_size(at.tenant, None)?,
    };
    if let Some(kept) = store.kept() {
        kept.keep_size(at.tenant, at.feed, version, head, size);
    }
    Ok(size)
}

/// A device in a schema with scopes.
struct Scoped {
    schema: std::sync::Arc<ServedSchema>,
    mine: DeviceScope,
    standing: ScopeStanding,
    /// Its scope's chain, and its name (whose topic it follows).
    chain: Chain,
    feed: String,
}

impl Scoped {
    /// `None` when the served schema has no scope.
    fn of(store: &mut dyn GatewayStore, device: &str, standing: &ScopeStanding) -> Result<Option<Scoped>> {
        let Some(schema) = store.served_schema()? else { return Ok(None) };
        if !schema.schema.tables.iter().any(|t| t.scope.is_some()) {
            return Ok(None);
        }
        let mine = DeviceScope::of(&schema.schema, device, &standing.params);
        let chain = Chain::of(&mine);
        let feed = chain.id();
        Ok(Some(Scoped { schema, mine, standing: standing.clone(), chain, feed }))
    }

    /// Tells the device its scope version and the scope to follow, and notes that it was
    /// told. (Two messages: `Scope` reads as it did for devices of earlier versions.)
    fn tell(&self, store: &mut dyn GatewayStore, tenant: &str, device: &str, epoch: Epoch) -> Result<Vec<Outgoing>> {
        store.scope_told(tenant, device, self.standing.version, &self.feed)?;
        let tables = self.mine.tables().map(str::to_owned).collect();
        Ok(vec![
            to(tenant, device, Downlink::Scope { epoch, version: self.standing.version, tables }),
            to(tenant, device, Downlink::Follow { epoch, scope: self.feed.clone() }),
        ])
    }
}

#[cfg(test)]
pub(crate) mod tests;
