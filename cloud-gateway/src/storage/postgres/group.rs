//! Group commit on PostgreSQL. Each method still commits its own transaction (the server's
//! locks stay short, and instances sharing the database interleave), but within a group with
//! `synchronous_commit = off`: commits return once written to the server's log, and the
//! group ends with one flush of it. A connection lost with such commits not yet flushed makes
//! the group fail: whether they reached disk cannot be known.

use postgres::Client;

use crate::error::{Error, Result};

/// Where the store stands in a group.
#[derive(Debug, Default)]
pub(super) struct Group {
    open: bool,
    /// The connection may hold commits of the group not yet flushed.
    unsynced: bool,
    /// A connection holding such commits was replaced.
    lost: bool,
}

impl Group {
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// Opens a group on `client`.
    pub(super) fn open(&mut self, client: &mut Client) -> Result<()> {
        client.batch_execute("SET synchronous_commit = off")?;
        self.open = true;
        Ok(())
    }

    /// A new connection replaced the old one (set up for the group, if one is open).
    pub(super) fn reconnected(&mut self, client: &mut Client) -> Result<()> {
        self.lost |= self.unsynced;
        if self.open {
            client.batch_execute("SET synchronous_commit = off")?;
        }
        Ok(())
    }

    /// The connection is about to be used: in a group, it may then hold unflushed commits.
    pub(super) fn used(&mut self) {
        self.unsynced |= self.open;
    }

    /// Ends the group; whether it is open was.
    pub(super) fn close(&mut self) -> bool {
        std::mem::take(&mut self.open)
    }

    /// What the group's flush (`flushed`) means for the whole group. Either way the caller
    /// now knows of every commit so far, so the next group starts with nothing unsynced.
    pub(super) fn outcome(&mut self, flushed: Result<()>) -> Result<()> {
        let lost = std::mem::take(&mut self.lost);
        self.unsynced = false;
        flushed?;
        if lost {
            return Err(Error::Durability("the connection was lost with commits not yet synced".into()));
        }
        Ok(())
    }
}

/// Flushes the server's log past every commit so far: a transaction that takes a
/// transaction id commits with a record in the log and, committed at the operator's level
/// (on, remote_write, remote_apply), waits for the log to be flushed up to it.
pub(super) fn flush_log(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL synchronous_commit TO DEFAULT; SELECT txid_current()")?;
    tx.commit()?;
    Ok(())
}
