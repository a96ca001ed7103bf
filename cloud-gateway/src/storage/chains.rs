//! Which log entries concern which devices, when a tenant's schema declares scopes.
//!
//! A device holds its scope: every row of the tables without scope, and the rows of each
//! scoped table whose scope key is its own. An entry concerns it if the entry holds a row of
//! a table without scope, or a row of a scoped table that had the device's key before or
//! after the change (it stayed, entered or left). The entries that concern a scope, in log
//! order, are its chain: the gateway publishes each entry once on the topic of every scope
//! it concerns, naming the chain's entry before it, and a device that follows its scope's
//! topic applies an entry only if its cursor is at that predecessor. A chain's entries are
//! sparse positions of the tenant's log, so a gap is seen from the predecessor named,
//! whatever other scopes did meanwhile, and a pull of the chain fetches exactly what the
//! device missed.
//!
//! Devices whose parameters give them the same keys share a scope, and so a topic and a
//! chain. The chain is read from the log's scope index (`gw_log_scopes`), which files each
//! entry holding rows of scoped tables under the keys it concerns (and `('', '')` for its
//! rows of tables without scope); an entry without scoped rows concerns every scope.
//! Because a chain is what the index says, not what was published, an entry published to
//! no device of a scope (one that had no device yet) still shows as a gap to the first
//! device that follows it.

use std::collections::BTreeSet;

use driftless_core::codec::encode_key;
use driftless_core::scope::{DeviceScope, Move};
use driftless_core::{Batch, SyncSchema};
use sha2::{Digest, Sha256};

use crate::storage::{GatewayStore, Params};

/// The index key of rows of tables without scope.
const UNSCOPED: (&str, &[u8]) = ("", &[]);

/// One scope's chain: the index keys it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// `('', '')` first, then `(table, encoded scope key)` for each scoped table the scope
    /// holds rows of, in table order.
    pub(crate) keys: Vec<(String, Vec<u8>)>,
}

impl Chain {
    pub fn of(scope: &DeviceScope) -> Chain {
        let mut keys = vec![(UNSCOPED.0.to_owned(), UNSCOPED.1.to_vec())];
        for table in scope.tables() {
            if let Some(key) = scope.key(table) {
                keys.push((table.to_owned(), encode_key(key)));
            }
        }
        Chain { keys }
    }

    /// The scope's name in its topic: a digest of its keys, so that a topic says nothing of
    /// the rows it carries and no two scopes share one.
    pub fn id(&self) -> String {
        let mut digest = Sha256::new();
        for (table, key) in &self.keys {
            digest.update((table.len() as u64).to_le_bytes());
            digest.update(table.as_bytes());
            digest.update((key.len() as u64).to_le_bytes());
            digest.update(key);
        }
        let hex: String = digest.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("s{hex}")
    }

    /// Whether an entry holding `change`, whose rows moved as `moves`, is in this chain:
    /// exactly when the index files it under one of the chain's keys, or not at all.
    pub fn concerns(&self, change: &Batch, moves: &[Option<Move>]) -> bool {
        if !moves.iter().any(Option::is_some) {
            return true;
        }
        marks(change, moves).iter().any(|(table, key)| self.keys.iter().any(|(t, k)| t == table && k == key))
    }
}

/// The newest schema as a registry reads it for the broker's guard, parsed once per version
/// (every device logging in, or checked every sweep, asks).
#[derive(Debug, Default)]
pub(crate) struct SchemaByVersion(std::sync::Mutex<Option<(u64, Option<std::sync::Arc<SyncSchema>>)>>);

impl SchemaByVersion {
    /// The schema at `version` if it declares scopes, `text` read and parsed only when the
    /// version is not the one parsed last.
    pub(crate) fn scoped(
        &self,
        version: Option<u64>,
        text: impl FnOnce(u64) -> crate::error::Result<String>,
    ) -> crate::error::Result<Option<std::sync::Arc<SyncSchema>>> {
        let Some(version) = version else { return Ok(None) };
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, schema)) = held.as_ref()
            && *v == version
        {
            return Ok(schema.clone());
        }
        let schema = scoped_schema(&text(version)?)?.map(std::sync::Arc::new);
        *held = Some((version, schema.clone()));
        Ok(schema)
    }
}

/// `text` as a schema, if it declares scopes.
pub(crate) fn scoped_schema(text: &str) -> crate::error::Result<Option<SyncSchema>> {
    let schema = SyncSchema::parse(text)
        .map_err(|e| crate::error::Error::Corrupt(format!("the stored sync schema does not parse: {e}")))?;
    Ok(schema.tables.iter().any(|t| t.scope.is_some()).then_some(schema))
}

/// The name of the scope a device with `params` holds under `schema`.
pub(crate) fn scope_name(schema: &SyncSchema, device: &str, params: &Params) -> String {
    Chain::of(&DeviceScope::of(schema, device, params)).id()
}

/// The name of the scope `device` of `tenant` holds, as its store now says (`None`: the
/// served schema declares no scope, or the device is not registered).
pub fn scope_of(store: &mut dyn GatewayStore, tenant: &str, device: &str) -> crate::error::Result<Option<String>> {
    let Some(served) = store.served_schema()? else { return Ok(None) };
    if !served.schema.tables.iter().any(|t| t.scope.is_some()) {
        return Ok(None);
    }
    let registered = store.registry(Some(tenant))?.into_iter().find(|r| r.device == device && r.removed_ms.is_none());
    Ok(registered.map(|r| scope_name(&served.schema, device, &r.params)))
}

/// The index keys an entry holding `change` is filed under, given where its rows moved (only
/// for entries with rows of scoped tables; the others concern every chain).
pub(crate) fn marks(change: &Batch, moves: &[Option<Move>]) -> BTreeSet<(String, Vec<u8>)> {
    let mut out = BTreeSet::new();
    for (i, row) in change.rows.iter().enumerate() {
        match moves.get(i).and_then(Option::as_ref) {
            None => {
                out.insert((UNSCOPED.0.to_owned(), UNSCOPED.1.to_vec()));
            }
            Some(m) => {
                // A row that only entered or left scopes concerns just those: the scopes
                // holding it throughout see nothing of it.
                let only = crate::storage::refs::moved_only(row);
                for key in m.before.iter().chain(&m.after) {
                    if !only || m.before.contains(key) != m.after.contains(key) {
                        out.insert((row.table.clone(), encode_key(key)));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use driftless_core::{RowChange, Value};

    use super::*;

    fn schema() -> SyncSchema {
        SyncSchema::parse(crate::storage::tests::SCOPED_AND_PARTS).expect("schema")
    }

    fn scope(region: &str) -> DeviceScope {
        DeviceScope::of(&schema(), "tab", &[("region".to_owned(), region.to_owned())].into())
    }

    /// A row a change wrote (a row with no state of its own only entered or left scopes).
    fn row(table: &str) -> RowChange {
        let mut state = driftless_core::RowState::default();
        let dot = driftless_core::Dot { node: driftless_core::NodeId([1; 16]), counter: 1 };
        driftless_core::write_local_upsert(&mut state, dot, driftless_core::Hlc(1), Default::default());
        RowChange { table: table.into(), pk: vec![Value::Text("1".into())], state }
    }

    fn key(region: &str) -> Option<Vec<Value>> {
        Some(vec![Value::Text(region.into())])
    }

    #[test]
    fn an_entry_concerns_the_scopes_its_rows_were_in_or_went_to() {
        let (north, south, east) = (Chain::of(&scope("north")), Chain::of(&scope("south")), Chain::of(&scope("east")));
        assert_ne!(north.id(), south.id());
        assert_eq!(north.id(), Chain::of(&scope("north")).id(), "the same keys, the same scope");
        let wo = Batch { rows: vec![row("w")], ..Batch::default() };
        let moved = [Some(Move::one(key("north"), key("south")))];
        assert!(north.concerns(&wo, &moved) && south.concerns(&wo, &moved), "left one, entered the other");
        assert!(!east.concerns(&wo, &moved), "never in the third");
        // In no device's scope at either end (a NULL region): no chain at all.
        assert!(!north.concerns(&wo, &[Some(Move::default())]));
        // Rows of tables without scope concern everyone, alone or beside scoped rows.
        let notice = Batch { rows: vec![row("p")], ..Batch::default() };
        assert!(east.concerns(&notice, &[None]) && east.concerns(&notice, &[]));
        let both = Batch { rows: vec![row("w"), row("p")], ..Batch::default() };
        assert!(east.concerns(&both, &[Some(Move::one(key("north"), key("north"))), None]));
        assert_eq!(
            marks(&both, &[Some(Move::one(key("north"), key("north"))), None]).len(),
            2,
            "one mark per key, however many rows"
        );
        // A row held by reference that only entered or left scopes concerns just those.
        let pulled = Batch { rows: vec![RowChange { state: Default::default(), ..row("w") }], ..Batch::default() };
        let moved = [Some(Move {
            before: vec![key("north").expect("key")],
            after: vec![key("north").expect("key"), key("south").expect("key")],
        })];
        assert!(south.concerns(&pulled, &moved) && !north.concerns(&pulled, &moved));
        assert!(north.concerns(&wo, &moved), "a row it holds that changed concerns every holder");
    }
}
