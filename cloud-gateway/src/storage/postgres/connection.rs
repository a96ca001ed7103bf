//! The store's connections to PostgreSQL: session settings, statements prepared once, a
//! client that may be dropped on any thread, and the listener's connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

use super::tables;
use crate::error::Result;

/// How long a gateway transaction waits for a tenant's lock (a plain-SQL writer holding it)
/// before giving up for now; the message is retried later.
const LOCK_WAIT: &str = "2s";

/// Statements prepared once per connection (each unprepared query costs a round trip more).
#[derive(Default)]
pub(super) struct Stmts(HashMap<&'static str, postgres::Statement>);

impl Stmts {
    pub(super) fn get(
        &mut self,
        client: &mut impl postgres::GenericClient,
        sql: &'static str,
    ) -> Result<postgres::Statement> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

/// A client that may be dropped anywhere: the PostgreSQL client closes its connection by
/// blocking, which a thread driving async tasks must not do, so there it closes on a thread
/// of its own.
pub(super) struct Blocking(pub(super) Option<Client>);

impl std::ops::Deref for Blocking {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Blocking {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        if let Some(client) = self.0.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new().name("driftless-pg-close".into()).spawn(move || drop(client));
        }
    }
}

pub(super) fn connect(config: &Config) -> Result<Client> {
    let mut config = config.clone();
    // A dead peer is noticed: a half-open connection would hold a tenant's lock.
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let mut client = config.connect(NoTls)?;
    // Positions are max + 1 under the tenant's lock: that needs each statement to see what
    // committed before it, whatever the database's default isolation.
    client.batch_execute(&format!(
        "SET lock_timeout = '{LOCK_WAIT}';
         SET default_transaction_isolation = 'read committed';
         SET idle_in_transaction_session_timeout = '60s';"
    ))?;
    Ok(client)
}

/// A connection listening for committed plain-SQL writes.
pub(super) fn listen(config: &Config) -> Result<Client> {
    let mut client = connect(config)?;
    client.batch_execute(&format!("LISTEN {}", tables::CHANNEL))?;
    Ok(client)
}

/// Stops the listener thread when dropped.
pub(super) struct StopOnDrop(pub(super) Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
