//! Each tenant's epochs in the PostgreSQL store, and the dead letters it keeps.

use driftless_core::Epoch;
use postgres::Transaction;

use crate::error::{Error, Result};
use crate::storage::common::{dead_letter_kept, now_ms};

/// Starts a new epoch for `tenant`; returns it and since when.
pub(super) fn start_epoch(tx: &mut Transaction<'_>, tenant: &str, reason: &str) -> Result<(Epoch, i64)> {
    let epoch = Epoch::random().map_err(|e| Error::Random(e.to_string()))?;
    let since = now_ms();
    tx.execute(
        "INSERT INTO driftless.gw_epochs(tenant, epoch, since_ms, reason) VALUES ($1, $2, $3, $4)",
        &[&tenant, &&epoch.0[..], &since, &reason],
    )?;
    Ok((epoch, since))
}

pub(super) fn current_epoch(tx: &mut Transaction<'_>, tenant: &str) -> Result<Option<(Epoch, i64)>> {
    let row = tx.query_opt(
        "SELECT epoch, since_ms FROM driftless.gw_epochs WHERE tenant = $1 ORDER BY id DESC LIMIT 1",
        &[&tenant],
    )?;
    row.map(|r| {
        let bytes: Vec<u8> = r.get(0);
        Ok((Epoch(bytes.try_into().map_err(|_| Error::Corrupt("stored epoch".into()))?), r.get(1)))
    })
    .transpose()
}

/// Keeps a refused message (or row) with its reason; large payloads by reference.
pub(super) fn keep_dead_letter(
    client: &mut impl postgres::GenericClient,
    tenant: &str,
    device: &str,
    reason: &str,
    payload: &[u8],
) -> Result<i64> {
    let (kept, sha256) = dead_letter_kept(payload);
    let row = client.query_one(
        "INSERT INTO driftless.gw_dead_letters(tenant, device, received_ms, reason, payload, size, sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        &[&tenant, &device, &now_ms(), &reason, &kept, &(payload.len() as i64), &sha256],
    )?;
    Ok(row.get(0))
}
