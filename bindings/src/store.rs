//! `SyncStore`: the object apps hold. Each method delegates to the core store (on its own
//! writer thread) or the agent; locks are never held across those calls or callbacks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use driftless_agent::{Agent, AgentConfig, StoreHandle};
use driftless_core::{StoreOptions, TableSpec, Value};
use tokio::runtime::Runtime;

use crate::error::{ApiError, app_sql};
use crate::types::{
    ChangeListener, ConflictInfo, QueryResult, SnapshotProgress, SqlValue, SyncConfig, SyncStatus, TrackOptions,
};

/// The library's own runtime: a mobile app has none to lend.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("driftless")
            .enable_all()
            .build()
            .expect("the driftless runtime starts")
    })
}

struct Open {
    store: StoreHandle,
    agent: Option<Agent>,
}

/// A local database that syncs.
#[derive(uniffi::Object)]
pub struct SyncStore {
    state: Mutex<Option<Open>>,
}

impl std::fmt::Debug for SyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncStore")
    }
}

fn params(values: Vec<SqlValue>) -> Vec<Value> {
    values.into_iter().map(Value::from).collect()
}

impl SyncStore {
    fn open_with(path: String, opts: StoreOptions) -> Result<Arc<SyncStore>, ApiError> {
        let store = StoreHandle::create(path.into(), opts)?;
        // A phone's database may have been restored from a backup: nothing is sealed under its
        // node id until the gateway has confirmed the id is still this store's own (the sync
        // agent releases the hold). Writes meanwhile are captured and counted as pending.
        runtime().block_on(store.call(|s| s.hold_seal())).map_err(ApiError::from)?;
        Ok(Arc::new(SyncStore { state: Mutex::new(Some(Open { store, agent: None })) }))
    }

    /// The store handle, cloned out of the lock.
    fn handle(&self) -> Result<StoreHandle, ApiError> {
        let state = self.state.lock().map_err(|_| ApiError::Closed)?;
        state.as_ref().map(|o| o.store.clone()).ok_or(ApiError::Closed)
    }

    fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut driftless_core::Store) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let handle = self.handle()?;
        runtime().block_on(handle.call(f)).map_err(ApiError::from)?
    }
}

#[uniffi::export]
impl SyncStore {
    /// Opens (creating if needed) the database at `path`. `role` names this device's source
    /// role for authority policies (empty if unused).
    #[uniffi::constructor]
    pub fn open(path: String, role: String) -> Result<Arc<SyncStore>, ApiError> {
        Self::open_with(path, StoreOptions { role, ..StoreOptions::default() })
    }

    /// Opens a database encrypted with `key` (SQLCipher; a library built with the
    /// `sqlcipher` feature). A new database is encrypted from the start; a wrong key is an
    /// `Encryption` error. Keep the key in the platform's keystore (Keychain, Android Keystore).
    #[uniffi::constructor]
    pub fn open_encrypted(path: String, role: String, key: String) -> Result<Arc<SyncStore>, ApiError> {
        Self::open_with(path, StoreOptions { role, key: Some(key), ..StoreOptions::default() })
    }

    /// Runs one statement (with `?` parameters) and returns the number of rows changed.
    pub fn execute(&self, sql: String, args: Vec<SqlValue>) -> Result<u64, ApiError> {
        self.on_store(move |s| {
            let mut changed = 0;
            s.write(|tx| {
                changed = tx.execute(&sql, rusqlite::params_from_iter(params(args)))? as u64;
                Ok(())
            })
            .map_err(|e| match e {
                driftless_core::Error::Sqlite(inner) => app_sql(inner),
                other => other.into(),
            })?;
            Ok(changed)
        })
    }

    /// Runs a query and returns every row.
    pub fn query(&self, sql: String, args: Vec<SqlValue>) -> Result<QueryResult, ApiError> {
        self.on_store(move |s| {
            s.read(|conn| {
                let mut stmt = conn.prepare(&sql)?;
                let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
                let n = columns.len();
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params(args)), |r| {
                        (0..n).map(|i| r.get::<_, Value>(i).map(SqlValue::from)).collect::<rusqlite::Result<Vec<_>>>()
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(QueryResult { columns, rows })
            })
            .map_err(|e| match e {
                driftless_core::Error::Sqlite(inner) => app_sql(inner),
                other => other.into(),
            })
        })
    }

    /// Starts (or updates) tracking of `table`.
    pub fn track(&self, table: String, options: TrackOptions) -> Result<(), ApiError> {
        let mut spec = TableSpec::new().direction(options.direction.into()).delete_policy(options.delete_rule.into());
        for (column, policy) in options.policies {
            let policy = policy.parse().map_err(|e: driftless_core::ParsePolicyError| ApiError::InvalidArgument {
                reason: format!("column {column}: {e}"),
            })?;
            spec = spec.column(&column, policy);
        }
        self.on_store(move |s| Ok(s.track(&table, spec)?))
    }

    /// Stops tracking `table`; its data stays.
    pub fn untrack(&self, table: String) -> Result<(), ApiError> {
        self.on_store(move |s| Ok(s.untrack(&table)?))
    }

    /// Starts syncing in the background. `listener` hears about rows changed remotely.
    pub fn start_sync(&self, config: SyncConfig, listener: Option<Arc<dyn ChangeListener>>) -> Result<(), ApiError> {
        let store = {
            let state = self.state.lock().map_err(|_| ApiError::Closed)?;
            let open = state.as_ref().ok_or(ApiError::Closed)?;
            if open.agent.is_some() {
                return Err(ApiError::Sync { reason: "already syncing".into() });
            }
            open.store.clone()
        };
        let path = runtime().block_on(store.call(|s| s.path().to_path_buf())).map_err(ApiError::from)?;
        let mut agent_config = AgentConfig::new(path, &config.broker_url, &config.tenant, &config.device_id)?;
        agent_config.username = config.username;
        agent_config.password = config.password;
        let agent = runtime().block_on(Agent::start_with_store(agent_config, store))?;
        if let Some(listener) = listener {
            forward_changes(&agent, listener);
        }
        let mut state = self.state.lock().map_err(|_| ApiError::Closed)?;
        match state.as_mut() {
            Some(open) if open.agent.is_none() => {
                open.agent = Some(agent);
                Ok(())
            }
            _ => {
                drop(state);
                runtime().block_on(agent.stop());
                Err(ApiError::Sync { reason: "the store was closed or started syncing meanwhile".into() })
            }
        }
    }

    /// Stops syncing; local changes keep being captured and ship when sync starts again.
    pub fn stop_sync(&self) -> Result<(), ApiError> {
        let agent = {
            let mut state = self.state.lock().map_err(|_| ApiError::Closed)?;
            state.as_mut().ok_or(ApiError::Closed)?.agent.take()
        };
        if let Some(agent) = agent {
            runtime().block_on(agent.stop());
        }
        Ok(())
    }

    /// Ships pending changes and pulls missed ones now.
    pub fn sync_now(&self) -> Result<(), ApiError> {
        let state = self.state.lock().map_err(|_| ApiError::Closed)?;
        let open = state.as_ref().ok_or(ApiError::Closed)?;
        let agent = open.agent.as_ref().ok_or(ApiError::Sync { reason: "sync is not running".into() })?;
        // Only queues a wake-up; never waits, so holding the lock here is harmless.
        Ok(agent.sync_now()?)
    }

    pub fn status(&self) -> Result<SyncStatus, ApiError> {
        let (store, live) = {
            let state = self.state.lock().map_err(|_| ApiError::Closed)?;
            let open = state.as_ref().ok_or(ApiError::Closed)?;
            (open.store.clone(), open.agent.as_ref().map(Agent::live))
        };
        let (pending, last, conflicts, schema, noted) = runtime()
            .block_on(store.call(|s| -> driftless_core::Result<_> {
                let noted = s.snapshot_position()?.map(|at| at.progress);
                Ok((s.pending_changes()?, s.sync_state("last_sync_ms")?, s.conflicts()?.len(), s.schema()?, noted))
            }))
            .map_err(ApiError::from)??;
        // The running agent's count is the freshest (it includes the page being applied);
        // without one, the store's note of the last page applied.
        let snapshot = match &live {
            Some(l) => l.snapshot,
            None => noted,
        };
        Ok(SyncStatus {
            syncing: live.is_some(),
            connected: live.as_ref().is_some_and(|l| l.connected),
            pending_changes: pending,
            last_synced_at_ms: last.and_then(|v| v.parse().ok()),
            last_error: live.and_then(|l| l.last_error),
            conflicts: conflicts as u32,
            schema_version: schema.map_or(0, |(v, _)| v),
            snapshot: snapshot.map(SnapshotProgress::from),
        })
    }

    /// Every conflict currently held.
    pub fn conflicts(&self) -> Result<Vec<ConflictInfo>, ApiError> {
        self.on_store(|s| Ok(s.conflicts()?.into_iter().map(ConflictInfo::from).collect()))
    }

    /// Resolves a conflict on `column` of the row with key `key` by writing `value`, which
    /// wins over every concurrent version on every device.
    pub fn resolve_conflict(
        &self,
        table: String,
        key: Vec<SqlValue>,
        column: String,
        value: SqlValue,
    ) -> Result<(), ApiError> {
        self.on_store(move |s| Ok(s.resolve_conflict(&table, &params(key), &column, value.into())?))
    }

    /// Stops syncing and closes the database. Every later call fails with `Closed`.
    pub fn close(&self) -> Result<(), ApiError> {
        let open = self.state.lock().map_err(|_| ApiError::Closed)?.take();
        if let Some(Open { agent: Some(agent), .. }) = open {
            runtime().block_on(agent.stop());
        }
        Ok(())
    }
}

/// Delivers change notices to the app's listener on a dedicated thread: outside the runtime
/// (so the listener may call back into the store) and outside every lock.
fn forward_changes(agent: &Agent, listener: Arc<dyn ChangeListener>) {
    let mut rx = agent.subscribe_changes();
    let (tx, notices) = std::sync::mpsc::channel::<Vec<driftless_core::ChangedRow>>();
    runtime().spawn(async move {
        loop {
            match rx.recv().await {
                Ok(rows) => {
                    if tx.send(rows).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    std::thread::Builder::new()
        .name("driftless-listener".into())
        .spawn(move || {
            for rows in notices {
                let mut by_table: BTreeMap<String, Vec<Vec<SqlValue>>> = BTreeMap::new();
                for row in rows {
                    by_table.entry(row.table).or_default().push(row.pk.into_iter().map(SqlValue::from).collect());
                }
                for (table, keys) in by_table {
                    listener.on_remote_change(table, keys);
                }
            }
        })
        .ok();
}
