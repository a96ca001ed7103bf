//! Reading and writing a row's causal state, and keeping the conflict index in step.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension};

use super::Inner;
use super::catalog::{TableInfo, persist_columns};
use crate::clock::NodeId;
use crate::codec::{Interner, Limits, decode_row_state, encode_row_state};
use crate::error::{Error, Result};
use crate::state::RowState;
use crate::view;

/// The nodes dictionary and the roles they declared, mirrored in `_driftless_nodes`.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    pub(crate) interner: Interner<NodeId>,
    persisted: usize,
    pub(crate) roles: HashMap<NodeId, String>,
}

impl Nodes {
    pub(crate) fn load(conn: &Connection) -> Result<Nodes> {
        let mut nodes = Nodes::default();
        let mut stmt = conn.prepare("SELECT idx, id, role FROM _driftless_nodes ORDER BY idx")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))?;
        for row in rows {
            let (idx, id, role) = row?;
            let node = NodeId::from_slice(&id).ok_or_else(|| Error::Corrupt("node id is not 16 bytes".into()))?;
            if nodes.interner.intern(&node) != idx as u64 {
                return Err(Error::Corrupt("node indexes are not dense".into()));
            }
            if !role.is_empty() {
                nodes.roles.insert(node, role);
            }
        }
        nodes.persisted = nodes.interner.len();
        Ok(nodes)
    }

    /// Writes nodes interned since the last save.
    pub(crate) fn persist(&mut self, conn: &Connection) -> Result<()> {
        if self.interner.len() == self.persisted {
            return Ok(());
        }
        let mut stmt = conn.prepare_cached("INSERT INTO _driftless_nodes(idx, id, role) VALUES (?1, ?2, ?3)")?;
        for (idx, node) in self.interner.keys().iter().enumerate().skip(self.persisted) {
            let role = self.roles.get(node).map_or("", String::as_str);
            stmt.execute(rusqlite::params![idx as i64, &node.0[..], role])?;
        }
        self.persisted = self.interner.len();
        Ok(())
    }

    /// Records a node's declared role (learned from a batch). A node's role never changes (a
    /// store that changes role takes a new node id), so the first one learned is kept: the
    /// authority policy then depends only on the writes, not on when a role was learned.
    pub(crate) fn set_role(&mut self, conn: &Connection, node: NodeId, role: &str) -> Result<()> {
        if self.roles.contains_key(&node) || role.is_empty() {
            return Ok(());
        }
        self.roles.insert(node, role.to_owned());
        let idx = self.interner.intern(&node);
        self.persist(conn)?;
        conn.prepare_cached("UPDATE _driftless_nodes SET role = ?2 WHERE idx = ?1")?
            .execute(rusqlite::params![idx as i64, role])?;
        Ok(())
    }
}

/// Loads the state of one row (empty if never seen).
pub(crate) fn load(
    conn: &Connection,
    nodes: &Nodes,
    info: &TableInfo,
    key: &[u8],
    limits: &Limits,
) -> Result<Option<RowState>> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT meta FROM _driftless_rows WHERE tbl = ?1 AND pk = ?2")?
        .query_row(rusqlite::params![info.id, key], |r| r.get(0))
        .optional()?;
    match bytes {
        None => Ok(None),
        Some(b) => decode_row_state(&b, &nodes.interner, &info.columns, limits)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("row metadata of {}: {e}", info.name))),
    }
}

/// Encodes a row state with the store's dictionaries, saving any entries it added.
pub(crate) fn encode(conn: &Connection, inner: &mut Inner, t: usize, state: &RowState) -> Result<Vec<u8>> {
    let info = &mut inner.catalog.tables[t];
    let bytes = encode_row_state(state, &mut inner.nodes.interner, &mut info.columns);
    inner.nodes.persist(conn)?;
    persist_columns(conn, info)?;
    Ok(bytes)
}

/// Saves a row's state and refreshes its entry in the conflict index.
pub(crate) fn save(
    conn: &Connection,
    inner: &mut Inner,
    t: usize,
    key: &[u8],
    state: &RowState,
    had_conflicts: bool,
) -> Result<()> {
    let bytes = encode(conn, inner, t, state)?;
    let info = &inner.catalog.tables[t];
    conn.prepare_cached("INSERT OR REPLACE INTO _driftless_rows(tbl, pk, meta) VALUES (?1, ?2, ?3)")?
        .execute(rusqlite::params![info.id, key, bytes])?;
    let has_conflicts = has_conflicts(inner, t, state);
    if has_conflicts && !had_conflicts {
        conn.prepare_cached("INSERT OR IGNORE INTO _driftless_conflicted(tbl, pk) VALUES (?1, ?2)")?
            .execute(rusqlite::params![info.id, key])?;
    } else if had_conflicts && !has_conflicts {
        conn.prepare_cached("DELETE FROM _driftless_conflicted WHERE tbl = ?1 AND pk = ?2")?
            .execute(rusqlite::params![info.id, key])?;
    }
    Ok(())
}

/// Whether a state holds any conflict under the table's policies.
pub(crate) fn has_conflicts(inner: &Inner, t: usize, state: &RowState) -> bool {
    let info = &inner.catalog.tables[t];
    let multi = state.fields.values().any(|r| r.entries.len() > 1);
    let dead = state.life.entries.iter().any(|e| e.value != crate::state::Life::Alive);
    (multi || dead) && !view::conflicts(state, &info.spec, &inner.nodes.roles).is_empty()
}
