//! Node identity and the gateway's epoch, as the store keeps them.
//!
//! A node id names one history of writes: dot counters are issued once per node. A store that
//! may have forgotten part of its own history (restored from a backup, copied to another
//! device) would issue counters again that other replicas already hold, and its new writes
//! would be dropped everywhere as duplicates. So the sync layer holds sealing until the
//! gateway has said how far this node's and this device's history went
//! ([`GatewayView`]); a store behind its own past takes a new node id before it seals, and
//! fetches the current state again, its own forgotten writes included.
//!
//! The gateway store has an epoch for the same reason. When it changes, the gateway's store
//! was replaced or restored and may lack changes it once acknowledged: the store queues the
//! full state of every row it holds to be sent again (merging is idempotent, counters are
//! per node, so nothing is counted twice) and fetches the current state again.

use rusqlite::{Connection, OptionalExtension};

use super::{Inner, cursor, settings};
use crate::clock::NodeId;
use crate::error::{Error, Result};
use crate::protocol::{Epoch, LogCursor, Receipts};

const EPOCH_KEY: &str = "sync.epoch";
/// The receipts of acknowledged merges the device still shows (see [`Receipts`]).
const RECEIPTS_KEY: &str = "sync.receipts";

/// What a device says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node: NodeId,
    /// The highest dot counter this node has issued.
    pub counter: u64,
    /// The highest outbox sequence number issued.
    pub outbox_seq: i64,
    /// Receipts of merges the gateway acknowledged in its current epoch, to show it.
    pub receipts: Receipts,
    /// The gateway epoch the cursor and acknowledgements belong to.
    pub epoch: Option<Epoch>,
    pub cursor: Option<LogCursor>,
}

/// What the gateway says it has merged from this device and its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayView {
    pub epoch: Epoch,
    pub node_counter: u64,
    pub device_seq: i64,
    /// The node id is bound to another device.
    pub node_elsewhere: bool,
}

/// What confirming the identity changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The node id given up, when the store was behind its own past.
    pub retired_node: Option<NodeId>,
    /// The gateway's epoch changed: rows were queued to be sent again.
    pub epoch_changed: bool,
    /// Rows queued to be sent again.
    pub resent_rows: usize,
    /// The pull cursor afterwards (`None`: start from a snapshot).
    pub cursor: Option<LogCursor>,
}

fn outbox_seq(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = '_driftless_outbox'")?
        .query_row([], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0))
}

fn stored_epoch(conn: &Connection) -> Result<Option<Epoch>> {
    match settings::get(conn, EPOCH_KEY)? {
        None => Ok(None),
        Some(hex) => hex.parse().map(Some).map_err(|()| Error::Corrupt("stored gateway epoch".into())),
    }
}

fn receipts(conn: &Connection) -> Result<Receipts> {
    match settings::get(conn, RECEIPTS_KEY)? {
        None => Ok(Receipts::default()),
        Some(text) => Receipts::from_text(&text).ok_or_else(|| Error::Corrupt("stored receipts".into())),
    }
}

pub(crate) fn identity(conn: &Connection, inner: &Inner) -> Result<Identity> {
    Ok(Identity {
        node: inner.node,
        counter: inner.counter,
        outbox_seq: outbox_seq(conn)?,
        receipts: receipts(conn)?,
        epoch: stored_epoch(conn)?,
        cursor: cursor::get(conn)?,
    })
}

/// Keeps the receipts to show (with the ack that changed them).
pub(crate) fn save_receipts(conn: &Connection, receipts: &Receipts) -> Result<()> {
    settings::set(conn, RECEIPTS_KEY, &receipts.to_text())
}

pub(crate) fn confirm(conn: &Connection, inner: &mut Inner, view: &GatewayView) -> Result<Confirmed> {
    let mut out = Confirmed { retired_node: None, epoch_changed: false, resent_rows: 0, cursor: None };
    let seq = outbox_seq(conn)?;
    let behind = view.node_counter > inner.counter || view.device_seq > seq || view.node_elsewhere;
    if behind {
        out.retired_node = Some(inner.node);
        rotate_node(conn, inner)?;
        // New entries must not reuse sequence numbers the gateway has seen from this device.
        // (sqlite_sequence has no key: update the row, or add it if the outbox never had one.)
        // A sequence number no device could have reached is not believed (it could only come
        // from a forged batch): the node id changes all the same.
        let next = if view.device_seq < i64::MAX / 2 { seq.max(view.device_seq) } else { seq };
        if conn.execute("UPDATE sqlite_sequence SET seq = ?1 WHERE name = '_driftless_outbox'", [next])? == 0 {
            conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('_driftless_outbox', ?1)", [next])?;
        }
        // What this store forgot comes back from the gateway like anyone else's writes.
        cursor::reset(conn)?;
    }
    match stored_epoch(conn)? {
        Some(known) if known != view.epoch => {
            out.epoch_changed = true;
            out.resent_rows = conn
                .prepare_cached(
                    "INSERT INTO _driftless_outbox(tbl, pk, change, created_ms)
                     SELECT tbl, pk, meta, ?1 FROM _driftless_rows ORDER BY tbl, pk",
                )?
                .execute([inner.now() as i64])?;
            cursor::reset(conn)?;
            // Receipts belong to one epoch: the new store has issued none yet, and showing an
            // old one would look like evidence that it lost it too.
            settings::delete(conn, &[RECEIPTS_KEY])?;
        }
        _ => {}
    }
    settings::set(conn, EPOCH_KEY, &view.epoch.to_string())?;
    out.cursor = cursor::get(conn)?;
    Ok(out)
}

/// Gives this store a new node id (same role); the old one stays in the node dictionary.
pub(crate) fn rotate_node(conn: &Connection, inner: &mut Inner) -> Result<()> {
    let node = NodeId::random().map_err(|e| Error::Random(e.to_string()))?;
    conn.execute("UPDATE _driftless_state SET value = ?1 WHERE key = 'node_id'", [&node.0[..]])?;
    conn.execute(
        "INSERT INTO _driftless_nodes(idx, id, role) SELECT coalesce(max(idx), -1) + 1, ?1, ?2 FROM _driftless_nodes",
        rusqlite::params![&node.0[..], inner.role],
    )?;
    inner.node = node;
    inner.counter = 0;
    inner.nodes = super::meta::Nodes::load(conn)?;
    inner.save_clocks(conn)?;
    inner.bump_meta_version(conn)
}
