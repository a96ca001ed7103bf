//! The device registry and the node book in the SQLite store.

use std::collections::HashMap;

use driftless_core::NodeId;
use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;
use crate::storage::chains::{SchemaByVersion, scope_name};
use crate::storage::common::{params_text, parse_params, recovery_from, registration, scope_standing};
use crate::storage::vouching::{NodeBook, NodeFact};
use crate::storage::{Params, Registered, Standing};

pub(super) fn register(
    conn: &Connection,
    tenant: &str,
    device: &str,
    role: &str,
    secret: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO gw_registry(tenant, device, role, added_ms, secret) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(tenant, device) DO UPDATE
             SET role = excluded.role, added_ms = excluded.added_ms, removed_ms = NULL, secret = excluded.secret",
    )?
    .execute(rusqlite::params![tenant, device, role, now_ms, secret])?;
    Ok(())
}

pub(super) fn remove(conn: &Connection, tenant: &str, device: &str, now_ms: i64) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE gw_registry SET removed_ms = ?3 WHERE tenant = ?1 AND device = ?2 AND removed_ms IS NULL",
        )?
        .execute(rusqlite::params![tenant, device, now_ms])?;
    Ok(n > 0)
}

pub(super) fn secret(conn: &Connection, tenant: &str, device: &str) -> Result<Option<String>> {
    let found = conn
        .prepare_cached("SELECT secret FROM gw_registry WHERE tenant = ?1 AND device = ?2 AND removed_ms IS NULL")?
        .query_row([tenant, device], |r| r.get::<_, Option<String>>(0))
        .optional()?;
    Ok(found.flatten())
}

/// The scope each device of `devices` follows under the newest schema (`None`: the
/// schema declares none, or the device is not registered).
pub(super) fn scopes(
    conn: &Connection,
    parsed: &SchemaByVersion,
    devices: &[(String, String)],
) -> Result<Vec<Option<String>>> {
    let version: Option<i64> = conn.query_row("SELECT max(version) FROM gw_sync_schema", [], |r| r.get(0))?;
    let text = |v: u64| -> Result<String> {
        Ok(conn.query_row("SELECT text FROM gw_sync_schema WHERE version = ?1", [v as i64], |r| r.get(0))?)
    };
    let Some(schema) = parsed.scoped(version.map(|v| v as u64), text)? else {
        return Ok(vec![None; devices.len()]);
    };
    let mut stmt =
        conn.prepare_cached("SELECT params FROM gw_registry WHERE tenant = ?1 AND device = ?2 AND removed_ms IS NULL")?;
    devices
        .iter()
        .map(|(t, d)| {
            let params: Option<String> = stmt.query_row([t, d], |r| r.get(0)).optional()?;
            // Parameters that do not read (never written so) grant no scope, and keep no one
            // else's revocation from being checked.
            Ok(params.and_then(|p| parse_params(&p).ok()).map(|p| scope_name(&schema, d, &p)))
        })
        .collect()
}

pub(super) fn list(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Registered>> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, device, role, added_ms, removed_ms, params FROM gw_registry
         WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, device",
    )?;
    let rows = stmt.query_map([tenant], |r| {
        let registered = Registered {
            tenant: r.get(0)?,
            device: r.get(1)?,
            role: r.get(2)?,
            added_ms: r.get(3)?,
            removed_ms: r.get(4)?,
            params: Params::new(),
        };
        Ok((registered, r.get::<_, String>(5)?))
    })?;
    rows.map(|r| {
        let (mut registered, params) = r?;
        registered.params = parse_params(&params)?;
        Ok(registered)
    })
    .collect()
}

pub(super) fn standing(conn: &Connection, tenant: &str, device: &str) -> Result<Standing> {
    // One statement: it is read for every message a device sends.
    type Row =
        (Option<String>, Option<String>, Option<i64>, bool, Option<i64>, Option<i64>, Option<i64>, Option<String>);
    let (role, params, version, closed, renewed_ms, heard_ms, told, feed_told): Row = conn
        .prepare_cached(
            // No common table for the current epoch: SQLite would build a temporary table
            // for it at every run, most of this statement's cost.
            "SELECT r.role, r.params, r.scope_version,
                    EXISTS (SELECT 1 FROM gw_registry WHERE tenant = ?1),
                    -- The current epoch's start, if it is not the tenant's first.
                    (SELECT e.since_ms FROM gw_epochs e
                        WHERE e.tenant = ?1 AND e.id > (SELECT min(id) FROM gw_epochs WHERE tenant = ?1)
                        ORDER BY e.id DESC LIMIT 1),
                    (SELECT d.since_ms FROM gw_epoch_devices d
                        WHERE d.tenant = ?1 AND d.device = ?2
                          AND d.epoch = (SELECT epoch FROM gw_epochs WHERE tenant = ?1 ORDER BY id DESC LIMIT 1)),
                    g.scope_told, g.feed_told
             FROM (SELECT 1)
             LEFT JOIN gw_registry r ON r.tenant = ?1 AND r.device = ?2 AND r.removed_ms IS NULL
             LEFT JOIN gw_devices g ON g.tenant = ?1 AND g.device = ?2",
        )?
        .query_row([tenant, device], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
        })?;
    let scope = params.zip(version);
    Ok(Standing {
        registration: registration(role, closed),
        recovery_from_ms: recovery_from(renewed_ms, heard_ms),
        heard: heard_ms.is_some(),
        scope: scope_standing(scope, (told, feed_told))?,
    })
}

pub(super) fn set_params(conn: &Connection, tenant: &str, device: &str, params: &Params) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE gw_registry SET params = ?3, scope_version = scope_version + (params IS NOT ?3)
             WHERE tenant = ?1 AND device = ?2 AND removed_ms IS NULL",
        )?
        .execute(rusqlite::params![tenant, device, params_text(params)])?;
    Ok(n > 0)
}

pub(super) fn scope_told(conn: &Connection, tenant: &str, device: &str, version: u64, feed: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO gw_devices(tenant, device, first_seen_ms, last_seen_ms, scope_told, feed_told)
         VALUES (?1, ?2, ?4, ?4, ?3, ?5)
         ON CONFLICT(tenant, device) DO UPDATE SET scope_told = excluded.scope_told, feed_told = excluded.feed_told",
    )?
    .execute(rusqlite::params![tenant, device, version as i64, crate::storage::common::now_ms(), feed])?;
    Ok(())
}

/// The node book over a merge's transaction.
pub(super) struct Book<'a>(pub(super) &'a Connection);

impl NodeBook for Book<'_> {
    fn facts(&mut self, tenant: &str, nodes: &[NodeId]) -> Result<HashMap<NodeId, NodeFact>> {
        let mut stmt =
            self.0.prepare_cached("SELECT device, role, max_counter FROM gw_nodes WHERE tenant = ?1 AND node = ?2")?;
        let mut facts = HashMap::new();
        for node in nodes {
            let fact = stmt
                .query_row(rusqlite::params![tenant, &node.0[..]], |r| {
                    Ok(NodeFact { device: r.get(0)?, role: r.get(1)?, counter: r.get::<_, i64>(2)? as u64 })
                })
                .optional()?;
            if let Some(fact) = fact {
                facts.insert(*node, fact);
            }
        }
        Ok(facts)
    }

    fn bind(&mut self, tenant: &str, node: NodeId, device: &str, role: &str) -> Result<()> {
        self.0
            .prepare_cached(
                "INSERT INTO gw_nodes(tenant, node, device, role) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(tenant, node) DO UPDATE
                     SET device = coalesce(device, excluded.device),
                         role = CASE WHEN role IS NULL OR role = '' THEN excluded.role ELSE role END",
            )?
            .execute(rusqlite::params![tenant, &node.0[..], device, role])?;
        Ok(())
    }
}
