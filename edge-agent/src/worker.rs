//! The store worker: one thread owns the [`Store`] (the single SQLite writer) and serves
//! requests from the async side, so blocking SQLite work never runs on the runtime.

use std::path::PathBuf;
use std::thread;

use driftless_core::{Store, StoreOptions};
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
}
