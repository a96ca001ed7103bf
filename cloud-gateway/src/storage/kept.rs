//! What a store keeps between messages, to spare reading it again each time: the scopes each
//! tenant's devices hold, for publishing (a second), and what a scope's snapshot holds, for
//! devices' progress (while nothing was logged since, up to a minute: after a restore every
//! device starts a snapshot, and each would count). The scopes are never trusted for data:
//! being a moment late costs a device a pull (a scope it is not published to yet).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftless_core::scope::DeviceScope;

use super::chains::Chain;

/// The scopes a tenant's devices hold, by name.
pub type Scopes = BTreeMap<String, (Chain, DeviceScope)>;

/// A snapshot's rows and bytes, counted with the log's head at a position.
type Counted = (u64, (u64, u64));

/// Something worked out at a time, under a schema version.
type Dated<T> = (Instant, u64, T);

#[derive(Debug, Default)]
pub struct Kept {
    scopes: HashMap<String, Dated<Arc<Scopes>>>,
    /// By tenant and scope name: the log's head when counted, rows and bytes.
    sizes: HashMap<(String, String), Dated<Counted>>,
}

impl Kept {
    pub const SCOPES_MAX_AGE: Duration = Duration::from_secs(1);
    pub const SIZES_MAX_AGE: Duration = Duration::from_secs(60);

    /// The scopes of `tenant` worked out under schema version `schema`, if recent enough.
    pub fn scopes(&self, tenant: &str, schema: u64) -> Option<Arc<Scopes>> {
        let (at, version, scopes) = self.scopes.get(tenant)?;
        (*version == schema && at.elapsed() < Self::SCOPES_MAX_AGE).then(|| scopes.clone())
    }

    pub fn keep_scopes(&mut self, tenant: &str, schema: u64, scopes: Arc<Scopes>) {
        self.scopes.insert(tenant.to_owned(), (Instant::now(), schema, scopes));
    }

    /// The rows and bytes of scope `scope`'s snapshot in `tenant`, counted under schema
    /// version `schema` with the log's head at position `head`, if nothing was logged since
    /// and it is recent enough.
    pub fn size(&self, tenant: &str, scope: &str, schema: u64, head: u64) -> Option<(u64, u64)> {
        let (at, version, (then, size)) = self.sizes.get(&(tenant.to_owned(), scope.to_owned()))?;
        (*version == schema && *then == head && at.elapsed() < Self::SIZES_MAX_AGE).then_some(*size)
    }

    /// Forgets everything kept: what was worked out in a transaction that was rolled back
    /// may name log positions that other entries will take.
    pub fn forget(&mut self) {
        self.scopes.clear();
        self.sizes.clear();
    }

    pub fn keep_size(&mut self, tenant: &str, scope: &str, schema: u64, head: u64, size: (u64, u64)) {
        self.sizes.insert((tenant.to_owned(), scope.to_owned()), (Instant::now(), schema, (head, size)));
    }
}
