//! Group commit in the SQLite store: one transaction holds a group of messages, each store
//! method's work a unit in it, and the group becomes durable at one commit.
//!
//! A unit must fail alone: a message that fails part-way may leave nothing of itself in the
//! group. Units are savepoints for that, but a savepoint journals every page its message
//! touches, a fifth of what a merge cost. So a group is opened without savepoints, and a unit
//! that ends without committing there (an error, a refusal, a panic) spoils the whole group:
//! the caller abandons it, everything in it is rolled back, and it is done again with a
//! savepoint per message. After that the store keeps savepoints for the next
//! [`CAREFUL_GROUPS`] groups, so input that keeps failing costs one replay in that many
//! groups, not one in every group.

use std::cell::Cell;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Error, Result};

/// Groups opened with savepoints after one had to be abandoned.
pub(super) const CAREFUL_GROUPS: u32 = 64;

/// The store's group transaction, if one is open.
#[derive(Debug, Default)]
pub(super) struct Group {
    open: bool,
    /// Whether each unit of the open group is a savepoint.
    savepoints: bool,
    /// A unit of the open group (without savepoints) ended without committing.
    spoiled: Cell<bool>,
    /// How many groups from now on still open with savepoints.
    careful: u32,
}

impl Group {
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    pub(super) fn begin(&mut self, conn: &Connection) -> Result<()> {
        if !self.open {
            if !conn.is_autocommit() {
                // A transaction a failed rollback left open: whatever it holds was never
                // answered, and nothing may be built on it.
                tracing::warn!("a transaction was left open; rolling it back before a group starts");
                conn.execute_batch("ROLLBACK")?;
            }
            conn.execute_batch("BEGIN IMMEDIATE")?;
            self.open = true;
            self.spoiled.set(false);
            self.savepoints = self.careful > 0;
            self.careful = self.careful.saturating_sub(1);
        }
        Ok(())
    }

    /// Whether the open group holds part of a failed unit's work: it may only be abandoned.
    pub(super) fn spoiled(&self) -> bool {
        self.open && self.spoiled.get()
    }

    /// Rolls the open group back, all of it; the next groups keep savepoints.
    pub(super) fn abandon(&mut self, conn: &Connection) -> Result<()> {
        if !std::mem::take(&mut self.open) {
            return Ok(());
        }
        self.careful = CAREFUL_GROUPS;
        self.spoiled.set(false);
        if conn.is_autocommit() {
            // An error rolled it back already.
            return Ok(());
        }
        Ok(conn.execute_batch("ROLLBACK")?)
    }

    /// Commits the open group; an error if it is not durable, or cannot be known to be.
    pub(super) fn commit(&mut self, conn: &Connection) -> Result<()> {
        if !std::mem::take(&mut self.open) {
            return Ok(());
        }
        let committed = if std::mem::take(self.spoiled.get_mut()) {
            // The caller should have abandoned it: committing would keep half a message.
            self.careful = CAREFUL_GROUPS;
            Err(Error::Durability("a message failed part-way in the group; none of it is kept".into()))
        } else if conn.is_autocommit() {
            // No transaction open: an error rolled it back (SQLite does for some, such as a
            // full disk), and what ran after it committed on its own. Which is which is not
            // known, so the group is not called durable.
            Err(Error::Durability("the group's transaction ended before its commit".into()))
        } else {
            conn.execute_batch("COMMIT").map_err(Error::from)
        };
        if committed.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        committed
    }
}

/// One method's work: its own transaction (immediate: it will write, so it takes the write
/// lock at once rather than fail to upgrade later), or a unit of the open group.
pub(super) enum Unit<'c> {
    Own(rusqlite::Transaction<'c>),
    Savepoint(Savepoint<'c>),
    Bare(Bare<'c>),
}

pub(super) fn unit<'c>(conn: &'c mut Connection, group: &'c Group) -> rusqlite::Result<Unit<'c>> {
    Ok(match (group.open, group.savepoints) {
        (false, _) => Unit::Own(conn.transaction_with_behavior(TransactionBehavior::Immediate)?),
        // A group whose transaction an error ended (SQLite rolls back on some, such as a full
        // disk): a savepoint opens a transaction of its own, so this unit stays whole, and
        // the group's commit, finding its transaction gone, answers none of it.
        (true, false) if !conn.is_autocommit() => Unit::Bare(Bare { conn, spoiled: &group.spoiled, done: false }),
        (true, _) => Unit::Savepoint(Savepoint::open(conn)?),
    })
}

impl Unit<'_> {
    pub(super) fn commit(self) -> rusqlite::Result<()> {
        match self {
            Unit::Own(tx) => tx.commit(),
            Unit::Savepoint(sp) => sp.release(),
            Unit::Bare(mut bare) => {
                bare.done = true;
                Ok(())
            }
        }
    }
}

impl std::ops::Deref for Unit<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Unit::Own(tx) => tx,
            Unit::Savepoint(sp) => sp.conn,
            Unit::Bare(bare) => bare.conn,
        }
    }
}

/// A unit of a group without savepoints: ending without a commit spoils the group.
pub(super) struct Bare<'c> {
    conn: &'c Connection,
    spoiled: &'c Cell<bool>,
    done: bool,
}

impl Drop for Bare<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.spoiled.set(true);
        }
    }
}

/// A savepoint in a group's transaction, rolled back when dropped unreleased. Its statements
/// are prepared once: a group opens one per message, and parsing them every time (as
/// rusqlite's own savepoints do) was a measurable part of a merge.
pub(super) struct Savepoint<'c> {
    conn: &'c Connection,
    released: bool,
}

impl<'c> Savepoint<'c> {
    fn open(conn: &'c Connection) -> rusqlite::Result<Savepoint<'c>> {
        conn.prepare_cached("SAVEPOINT gw_unit")?.execute([])?;
        Ok(Savepoint { conn, released: false })
    }

    fn release(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("RELEASE gw_unit")?.execute([])?;
        self.released = true;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.released {
            let undo = self.conn.prepare_cached("ROLLBACK TO gw_unit").and_then(|mut s| s.execute([]));
            let release = self.conn.prepare_cached("RELEASE gw_unit").and_then(|mut s| s.execute([]));
            if let Err(e) = undo.and(release) {
                // The group's transaction would keep part of this message's work: it goes
                // whole, and the group's commit, finding none open, answers none of it.
                tracing::error!("a failed message's savepoint could not be rolled back; dropping its group: {e}");
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
    }
}
