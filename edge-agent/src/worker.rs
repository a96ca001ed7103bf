//! The store worker: one thread owns the [`Store`] (the single SQLite writer) and serves
//! requests from the async side, so blocking SQLite work never runs on the runtime.

use std::path::PathBuf;
use std::thread;

use driftless_core::{ApplyReport, Batch, OutboxBatch, Store, StoreOptions};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// A cloneable handle to the store worker.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl StoreHandle {
    /// Opens an existing store on a new thread.
    pub fn open(path: PathBuf, opts: StoreOptions) -> Result<StoreHandle> {
        if !path.exists() {
            return Err(Error::MissingDatabase(path.display().to_string()));
        }
        Self::create(path, opts)
    }

    /// Opens the store at `path`, creating the database if needed, on a new thread.
    pub fn create(path: PathBuf, opts: StoreOptions) -> Result<StoreHandle> {
        let store = Store::open(&path, opts)?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        thread::Builder::new()
            .name("driftless-store".into())
            .spawn(move || {
                let mut store = store;
                while let Some(job) = rx.blocking_recv() {
                    job(&mut store);
                }
            })
            .map_err(|_| Error::Stopped)?;
        Ok(StoreHandle { jobs })
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Store) -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |store| {
                let _ = tx.send(f(store));
            }))
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Seals journaled changes and reads outbox entries after sequence `after`.
    pub async fn outbox_after(&self, after: i64, max_rows: usize) -> Result<Option<OutboxBatch>> {
        Ok(self
            .call(move |s| {
                s.seal()?;
                s.outbox_batch_after(after, max_rows)
            })
            .await??)
    }

    pub async fn ack(&self, first: i64, last: i64) -> Result<usize> {
        Ok(self.call(move |s| s.ack(first, last)).await??)
    }

    pub async fn reject(&self, first: i64, last: i64, reason: String) -> Result<usize> {
        Ok(self.call(move |s| s.reject(first, last, &reason)).await??)
    }

    /// Applies remote changes and, if given, moves the pull cursor with them in the same
    /// transaction.
    pub async fn apply(&self, batch: Batch, cursor: Option<u64>) -> Result<ApplyReport> {
        Ok(self
            .call(move |s| match cursor {
                Some(c) => s.apply_with_cursor(&batch, driftless_core::LogCursor { position: c, tag: 0 }),
                None => s.apply(&batch),
            })
            .await??)
    }

    pub async fn sync_state(&self, key: &'static str) -> Result<Option<String>> {
        Ok(self.call(move |s| s.sync_state(key)).await??)
    }

    pub async fn set_sync_state(&self, key: &'static str, value: String) -> Result<()> {
        Ok(self.call(move |s| s.set_sync_state(key, &value)).await??)
    }
}
