//! The bookkeeping of rows held by reference (`storage::refs`) in PostgreSQL, in the
//! transaction that logs the entry. Rows are found by the hash of their key, like the rows
//! themselves; the key a referencing row names is kept whole, to log the row it pulls in.

use std::collections::{BTreeMap, BTreeSet};

use driftless_core::codec::Limits;
use driftless_core::{NodeId, RowState, Value};
use postgres::Transaction;

use super::Stmts;
use super::tables::key_hash;
use crate::error::{Error, Result};
use crate::storage::refs::{Named, RefBook};

pub(super) struct PgRefs<'a, 't> {
    pub tx: &'a mut Transaction<'t>,
    pub stmts: &'a mut Stmts,
    pub limits: &'a Limits,
    pub tenant: &'a str,
}

impl RefBook for PgRefs<'_, '_> {
    fn state(&mut self, table: &str, pk: &[Value]) -> Result<(RowState, BTreeMap<NodeId, String>)> {
        let (stored, roles) = super::merge::load_row(self.tx, self.limits, self.tenant, table, pk)?;
        Ok((stored.state, roles))
    }

    fn named(&mut self, held: &str, table: &str, pk: &[u8]) -> Result<Option<Named>> {
        let stmt = self.stmts.get(
            self.tx,
            "SELECT ref, skey FROM driftless.gw_ref_names WHERE tenant = $1 AND held = $2 AND tbl = $3 AND pkh = $4",
        )?;
        Ok(self.tx.query_opt(&stmt, &[&self.tenant, &held, &table, &key_hash(pk)])?.map(|r| (r.get(0), r.get(1))))
    }

    fn set_named(&mut self, held: &str, table: &str, pk: &[u8], named: Option<&Named>) -> Result<()> {
        match named {
            Some((key, skey)) => {
                let stmt = self.stmts.get(
                    self.tx,
                    "INSERT INTO driftless.gw_ref_names(tenant, held, tbl, pkh, ref, skey) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (tenant, held, tbl, pkh) DO UPDATE SET ref = excluded.ref, skey = excluded.skey",
                )?;
                self.tx.execute(&stmt, &[&self.tenant, &held, &table, &key_hash(pk), key, skey])?
            }
            None => {
                let stmt = self.stmts.get(
                    self.tx,
                    "DELETE FROM driftless.gw_ref_names WHERE tenant = $1 AND held = $2 AND tbl = $3 AND pkh = $4",
                )?;
                self.tx.execute(&stmt, &[&self.tenant, &held, &table, &key_hash(pk)])?
            }
        };
        Ok(())
    }

    fn holders(&mut self, table: &str, pk: &[u8]) -> Result<BTreeSet<Vec<u8>>> {
        let stmt = self
            .stmts
            .get(self.tx, "SELECT skey FROM driftless.gw_ref_counts WHERE tenant = $1 AND tbl = $2 AND pkh = $3")?;
        Ok(self.tx.query(&stmt, &[&self.tenant, &table, &key_hash(pk)])?.iter().map(|r| r.get(0)).collect())
    }

    fn count(&mut self, table: &str, pk: &[u8], skey: &[u8], delta: i64) -> Result<()> {
        let stmt = self.stmts.get(
            self.tx,
            "INSERT INTO driftless.gw_ref_counts(tenant, tbl, pkh, skey, n) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, tbl, pkh, skey) DO UPDATE SET n = driftless.gw_ref_counts.n + excluded.n",
        )?;
        self.tx.execute(&stmt, &[&self.tenant, &table, &key_hash(pk), &skey, &delta])?;
        let stmt = self.stmts.get(
            self.tx,
            "DELETE FROM driftless.gw_ref_counts WHERE tenant = $1 AND tbl = $2 AND pkh = $3 AND skey = $4 AND n <= 0",
        )?;
        self.tx.execute(&stmt, &[&self.tenant, &table, &key_hash(pk), &skey])?;
        Ok(())
    }
}

/// Counts what the stored rows of referencing tables name, for the references `new` declares
/// first (see `storage::refs::new_references`), in the transaction that installs it.
pub(super) fn count_references(
    tx: &mut Transaction<'_>,
    stmts: &mut Stmts,
    limits: &Limits,
    old: Option<&driftless_core::SyncSchema>,
    new: &driftless_core::SyncSchema,
) -> Result<()> {
    for reference in crate::storage::refs::new_references(old, new) {
        let table = &reference.2.name;
        let tenants: Vec<String> = tx
            .query("SELECT DISTINCT tenant FROM driftless.gw_rows WHERE tbl = $1", &[table])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for tenant in &tenants {
            // A page at a time: a table of millions of rows is never held in memory at once.
            let mut after: Vec<u8> = Vec::new();
            loop {
                let rows = tx.query(
                    "SELECT pkh, state FROM driftless.gw_rows WHERE tenant = $1 AND tbl = $2 AND pkh > $3
                     ORDER BY pkh LIMIT 1000",
                    &[tenant, table, &after],
                )?;
                let Some(last) = rows.last() else { break };
                after = last.get(0);
                for row in &rows {
                    let stored = driftless_core::codec::decode_payload(row.get(1), limits)
                        .map_err(|e| Error::Corrupt(format!("stored row of {table:?}: {e}")))?;
                    let mut refs = PgRefs { tx, stmts, limits, tenant };
                    crate::storage::refs::count_stored(&mut refs, reference, &stored)?;
                }
            }
        }
    }
    Ok(())
}
