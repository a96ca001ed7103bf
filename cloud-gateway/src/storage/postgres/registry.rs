//! The device registry and the node book in the PostgreSQL store.

use std::collections::HashMap;

use driftless_core::NodeId;
use postgres::{Client, Transaction};

use postgres::Config;

use super::Stmts;
use super::connection::{Blocking, connect};
use crate::error::{Error, Result};
use crate::storage::chains::{SchemaByVersion, scope_name};
use crate::storage::common::{params_text, parse_params, recovery_from, registration, scope_standing};
use crate::storage::vouching::{NodeBook, NodeFact};
use crate::storage::{Params, Registered, Standing};

pub(super) fn register(
    client: &mut Client,
    tenant: &str,
    device: &str,
    role: &str,
    secret: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    client.execute(
        "INSERT INTO driftless.gw_registry(tenant, device, role, added_ms, secret) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant, device) DO UPDATE
             SET role = excluded.role, added_ms = excluded.added_ms, removed_ms = NULL, secret = excluded.secret",
        &[&tenant, &device, &role, &now_ms, &secret],
    )?;
    Ok(())
}

pub(super) fn remove(client: &mut Client, tenant: &str, device: &str, now_ms: i64) -> Result<bool> {
    let n = client.execute(
        "UPDATE driftless.gw_registry SET removed_ms = $3 WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL",
        &[&tenant, &device, &now_ms],
    )?;
    Ok(n > 0)
}

pub(super) fn secret(client: &mut Client, tenant: &str, device: &str) -> Result<Option<String>> {
    let row = client.query_opt(
        "SELECT secret FROM driftless.gw_registry WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL",
        &[&tenant, &device],
    )?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
}

/// The scope each device of `devices` follows under the newest schema (`None`: the
/// schema declares none, or the device is not registered).
pub(super) fn scopes(
    client: &mut Client,
    parsed: &SchemaByVersion,
    devices: &[(String, String)],
) -> Result<Vec<Option<String>>> {
    let version: Option<i64> = client.query_one("SELECT max(version) FROM driftless.gw_sync_schema", &[])?.get(0);
    let mut text = |v: u64| -> Result<String> {
        let row = client.query_one("SELECT text FROM driftless.gw_sync_schema WHERE version = $1", &[&(v as i64)])?;
        Ok(row.get(0))
    };
    let Some(schema) = parsed.scoped(version.map(|v| v as u64), &mut text)? else {
        return Ok(vec![None; devices.len()]);
    };
    devices
        .iter()
        .map(|(t, d)| {
            let params = client.query_opt(
                "SELECT params FROM driftless.gw_registry WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL",
                &[t, d],
            )?;
            // Parameters that do not read (never written so) grant no scope, and keep no one
            // else's revocation from being checked.
            Ok(params.and_then(|r| parse_params(r.get(0)).ok()).map(|p| scope_name(&schema, d, &p)))
        })
        .collect()
}

pub(super) fn list(client: &mut Client, tenant: Option<&str>) -> Result<Vec<Registered>> {
    let rows = client.query(
        "SELECT tenant, device, role, added_ms, removed_ms, params FROM driftless.gw_registry
         WHERE $1::text IS NULL OR tenant = $1 ORDER BY tenant, device",
        &[&tenant],
    )?;
    rows.iter()
        .map(|r| {
            Ok(Registered {
                tenant: r.get(0),
                device: r.get(1),
                role: r.get(2),
                added_ms: r.get(3),
                removed_ms: r.get(4),
                params: parse_params(r.get(5))?,
            })
        })
        .collect()
}

pub(super) fn standing(client: &mut Client, stmts: &mut Stmts, tenant: &str, device: &str) -> Result<Standing> {
    let stmt = stmts.get(
        client,
        "WITH current AS (SELECT epoch, since_ms FROM driftless.gw_epochs WHERE tenant = $1 ORDER BY id DESC LIMIT 1)
         SELECT (SELECT role FROM driftless.gw_registry WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL),
                EXISTS (SELECT 1 FROM driftless.gw_registry WHERE tenant = $1),
                (SELECT since_ms FROM current WHERE (SELECT count(*) FROM driftless.gw_epochs WHERE tenant = $1) > 1),
                (SELECT d.since_ms FROM driftless.gw_epoch_devices d, current c
                    WHERE d.tenant = $1 AND d.device = $2 AND d.epoch = c.epoch),
                (SELECT params FROM driftless.gw_registry WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL),
                (SELECT scope_version FROM driftless.gw_registry
                    WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL),
                (SELECT scope_told FROM driftless.gw_devices WHERE tenant = $1 AND device = $2),
                (SELECT feed_told FROM driftless.gw_devices WHERE tenant = $1 AND device = $2)",
    )?;
    let row = client.query_one(&stmt, &[&tenant, &device])?;
    let heard_ms: Option<i64> = row.get(3);
    let params: Option<String> = row.get(4);
    let version: Option<i64> = row.get(5);
    Ok(Standing {
        registration: registration(row.get(0), row.get(1)),
        recovery_from_ms: recovery_from(row.get(2), heard_ms),
        heard: heard_ms.is_some(),
        scope: scope_standing(params.zip(version), (row.get(6), row.get(7)))?,
    })
}

pub(super) fn set_params(client: &mut Client, tenant: &str, device: &str, params: &Params) -> Result<bool> {
    let n = client.execute(
        "UPDATE driftless.gw_registry
            SET params = $3, scope_version = scope_version + (params IS DISTINCT FROM $3)::int
          WHERE tenant = $1 AND device = $2 AND removed_ms IS NULL",
        &[&tenant, &device, &params_text(params)],
    )?;
    Ok(n > 0)
}

pub(super) fn scope_told(client: &mut Client, tenant: &str, device: &str, version: u64, feed: &str) -> Result<()> {
    // (The device's row may not be written yet: last-seen times are written in batches.)
    client.execute(
        "INSERT INTO driftless.gw_devices(tenant, device, first_seen_ms, last_seen_ms, scope_told, feed_told)
         VALUES ($1, $2, $4, $4, $3, $5)
         ON CONFLICT (tenant, device) DO UPDATE SET scope_told = excluded.scope_told, feed_told = excluded.feed_told",
        &[&tenant, &device, &(version as i64), &crate::storage::common::now_ms(), &feed],
    )?;
    Ok(())
}

/// The node book over a merge's transaction.
pub(super) struct Book<'a, 't> {
    pub(super) tx: &'a mut Transaction<'t>,
    pub(super) stmts: &'a mut Stmts,
}

impl NodeBook for Book<'_, '_> {
    fn facts(&mut self, tenant: &str, nodes: &[NodeId]) -> Result<HashMap<NodeId, NodeFact>> {
        let ids: Vec<&[u8]> = nodes.iter().map(|n| &n.0[..]).collect();
        let stmt = self.stmts.get(
            self.tx,
            "SELECT node, device, role, max_counter FROM driftless.gw_nodes WHERE tenant = $1 AND node = ANY($2)",
        )?;
        let mut facts = HashMap::new();
        for r in self.tx.query(&stmt, &[&tenant, &ids])? {
            let Some(node) = NodeId::from_slice(r.get(0)) else { continue };
            facts.insert(node, NodeFact { device: r.get(1), role: r.get(2), counter: r.get::<_, i64>(3) as u64 });
        }
        Ok(facts)
    }

    fn bind(&mut self, tenant: &str, node: NodeId, device: &str, role: &str) -> Result<()> {
        let stmt = self.stmts.get(
            self.tx,
            "INSERT INTO driftless.gw_nodes(tenant, node, device, role) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, node) DO UPDATE
                 SET device = coalesce(driftless.gw_nodes.device, excluded.device),
                     role = CASE WHEN coalesce(driftless.gw_nodes.role, '') = '' THEN excluded.role
                                 ELSE driftless.gw_nodes.role END",
        )?;
        self.tx.execute(&stmt, &[&tenant, &&node.0[..], &device, &role])?;
        Ok(())
    }
}

/// The device registry read through a connection of its own, for the embedded broker's
/// guard: opening a whole store would migrate it and take an instance's place. Connects
/// again after an error.
pub struct PgRegistry {
    config: Config,
    client: std::sync::Mutex<Option<Blocking>>,
    parsed: SchemaByVersion,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgRegistry")
    }
}

impl PgRegistry {
    /// Connects to the store at `url` (made by [`PgStore::open`]). Blocks.
    pub fn open(url: &str) -> Result<PgRegistry> {
        let config: Config = url.parse().map_err(|e: postgres::Error| Error::Config(format!("{url}: {e}")))?;
        let client = Blocking(Some(connect(&config)?));
        Ok(PgRegistry { config, client: std::sync::Mutex::new(Some(client)), parsed: SchemaByVersion::default() })
    }
}

impl crate::broker::Registry for PgRegistry {
    fn secrets(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let mut held = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            *held = Some(Blocking(Some(connect(&self.config)?)));
        }
        let client = held.as_mut().expect("connected above");
        let found: Result<Vec<Option<String>>> = devices.iter().map(|(t, d)| secret(client, t, d)).collect();
        if found.is_err() {
            *held = None;
        }
        found
    }

    fn scopes(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let mut held = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            *held = Some(Blocking(Some(connect(&self.config)?)));
        }
        let found = scopes(held.as_mut().expect("connected above"), &self.parsed, devices);
        if found.is_err() {
            *held = None;
        }
        found
    }
}
