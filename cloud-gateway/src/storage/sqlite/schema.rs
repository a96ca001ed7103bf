//! The gateway database's tables, created and migrated by version (`PRAGMA user_version`).

use rusqlite::Connection;

use crate::error::Result;

/// The schema version this build writes.
const VERSION: i64 = 16;

/// Brings the tables up to [`VERSION`], inside the caller's transaction.
pub(super) fn upgrade(conn: &Connection) -> Result<()> {
    let mut found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found == 0 {
        // Version 1 predates the version number: its tables exist but user_version is 0.
        let v1: bool =
            conn.query_row("SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'gw_rows')", [], |r| r.get(0))?;
        if v1 {
            found = 1;
        }
    }
    for version in found..VERSION {
        upgrade_from(conn, version)?;
    }
    conn.execute_batch(&format!("PRAGMA user_version = {VERSION};"))?;
    Ok(())
}

fn upgrade_from(conn: &Connection, version: i64) -> Result<()> {
    if version == 0 {
        conn.execute_batch(
            "
            CREATE TABLE gw_rows (
                tenant TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                state  BLOB NOT NULL,   -- a one-row batch payload: the row's merged state
                PRIMARY KEY (tenant, tbl, pk)
            ) WITHOUT ROWID;
            -- Merged changes in merge order; devices pull after a cursor into it.
            CREATE TABLE gw_log (
                seq    INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant TEXT NOT NULL,
                origin TEXT NOT NULL,
                rows   INTEGER NOT NULL,
                change BLOB NOT NULL    -- a batch payload of the rows whose state changed
            );
            CREATE INDEX gw_log_by_tenant ON gw_log (tenant, seq);
            CREATE TABLE gw_devices (
                tenant          TEXT NOT NULL,
                device          TEXT NOT NULL,
                first_seen_ms   INTEGER NOT NULL,
                last_seen_ms    INTEGER NOT NULL,
                uplink_hwm      INTEGER NOT NULL DEFAULT 0,
                downlink_cursor INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (tenant, device)
            ) WITHOUT ROWID;
            CREATE TABLE gw_dead_letters (
                id          INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant      TEXT NOT NULL,
                device      TEXT NOT NULL,
                received_ms INTEGER NOT NULL,
                reason      TEXT NOT NULL,
                payload     BLOB NOT NULL
            );
            ",
        )?;
    }
    if version == 1 {
        conn.execute_batch(
            "
            -- Every epoch each tenant has had, and why it changed; the newest is current.
            CREATE TABLE gw_epochs (
                id       INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant   TEXT NOT NULL,
                epoch    BLOB NOT NULL,
                since_ms INTEGER NOT NULL,
                reason   TEXT NOT NULL
            );
            CREATE INDEX gw_epochs_by_tenant ON gw_epochs (tenant, id);
            -- A random tag per log entry: a device's cursor names one, so a log rolled back and
            -- written again (a restored backup) is told apart from the one it read.
            ALTER TABLE gw_log ADD COLUMN tag INTEGER NOT NULL DEFAULT 0;
            -- Node ids: the device each is bound to, and the highest dot counter merged.
            CREATE TABLE gw_nodes (
                tenant      TEXT NOT NULL,
                node        BLOB NOT NULL,
                device      TEXT,
                max_counter INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (tenant, node)
            ) WITHOUT ROWID;
            -- The key arity of each table, learned from the first change to it: a change with
            -- another arity could never be applied by any device.
            CREATE TABLE gw_tables (
                tenant  TEXT NOT NULL,
                tbl     TEXT NOT NULL,
                key_len INTEGER NOT NULL,
                PRIMARY KEY (tenant, tbl)
            ) WITHOUT ROWID;
            -- Nodes seen writing with clocks beyond the allowed drift.
            CREATE TABLE gw_clock_skew (
                tenant  TEXT NOT NULL,
                node    BLOB NOT NULL,
                max_hlc INTEGER NOT NULL,
                bounded INTEGER NOT NULL,
                last_ms INTEGER NOT NULL,
                PRIMARY KEY (tenant, node)
            ) WITHOUT ROWID;
            -- Attempts at messages that made the gateway fail, by content hash: a message that
            -- fails every time is set aside instead of being retried forever.
            CREATE TABLE gw_attempts (
                key      BLOB PRIMARY KEY,
                count    INTEGER NOT NULL,
                first_ms INTEGER NOT NULL,
                last_ms  INTEGER NOT NULL
            ) WITHOUT ROWID;
            -- Dead letters keep large payloads by reference: size, hash and first bytes.
            ALTER TABLE gw_dead_letters ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE gw_dead_letters ADD COLUMN sha256 TEXT NOT NULL DEFAULT '';
            CREATE INDEX gw_dead_letters_by_time ON gw_dead_letters (received_ms);
            ",
        )?;
    }
    if version == 2 {
        conn.execute_batch(
            "
            -- The receipt last given to each device: the `previous` of its next ack.
            ALTER TABLE gw_devices ADD COLUMN receipt_pos INTEGER;
            ALTER TABLE gw_devices ADD COLUMN receipt_tag INTEGER;
            ",
        )?;
    }
    if version == 3 {
        conn.execute_batch(
            "
            -- Every version of the declared sync schema loaded, as its TOML text; the newest
            -- is current. Versions only grow.
            CREATE TABLE gw_sync_schema (
                version   INTEGER PRIMARY KEY,
                text      TEXT NOT NULL,
                loaded_ms INTEGER NOT NULL
            );
            ",
        )?;
    }
    if version == 4 {
        conn.execute_batch(
            "
            -- The schema version each tenant's real tables (\"TENANT.TABLE\") follow.
            CREATE TABLE gw_tenant_tables (
                tenant  TEXT PRIMARY KEY,
                version INTEGER NOT NULL
            ) WITHOUT ROWID;
            ",
        )?;
    }
    if version == 5 {
        conn.execute_batch(
            "
            -- Writes made directly to the real tables: tenants with some waiting, each
            -- tenant's cloud node, and the marker of the gateway's own transactions (a row
            -- only while one runs, so its writes are not captured).
            CREATE TABLE gw_cloud_pending (tenant TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE gw_cloud_nodes (
                tenant  TEXT PRIMARY KEY,
                node    BLOB NOT NULL,
                counter INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE gw_writing (x INTEGER);
            -- Real tables are made again, now with their capture triggers.
            DELETE FROM gw_tenant_tables;
            ",
        )?;
    }
    if version == 6 {
        conn.execute_batch(
            "
            -- A cloud node per role a writer names (\"TENANT.TABLE@ROLE\"), 'cloud' otherwise.
            CREATE TABLE gw_cloud_writers (
                tenant  TEXT NOT NULL,
                role    TEXT NOT NULL,
                node    BLOB NOT NULL,
                counter INTEGER NOT NULL,
                PRIMARY KEY (tenant, role)
            ) WITHOUT ROWID;
            INSERT INTO gw_cloud_writers SELECT tenant, 'cloud', node, counter FROM gw_cloud_nodes;
            DROP TABLE gw_cloud_nodes;
            -- Made again: journals record the role, and each declared role gets its views.
            DELETE FROM gw_tenant_tables;
            ",
        )?;
    }
    if version == 7 {
        conn.execute_batch(
            "
            -- Capture triggers and role views made again (see storage/sqlite/cloud_writes.rs).
            DROP TABLE gw_writing;
            CREATE TABLE gw_writing (x INTEGER PRIMARY KEY);
            DELETE FROM gw_tenant_tables;
            -- Waiting writes are found in the journals themselves.
            DROP TABLE gw_cloud_pending;
            ",
        )?;
    }
    if version == 8 {
        conn.execute_batch(
            "
            -- The role each node writes as, bound with the node (see storage/vouching.rs).
            ALTER TABLE gw_nodes ADD COLUMN role TEXT;
            -- The cloud's nodes are bound to the cloud (device ''): no device writes as them.
            INSERT INTO gw_nodes(tenant, node, device, role, max_counter)
                SELECT tenant, node, '', role, counter FROM gw_cloud_writers WHERE true
                ON CONFLICT(tenant, node) DO UPDATE SET device = '', role = excluded.role;
            -- Devices an operator registered, with their roles. A tenant with a row here is
            -- closed: only its registered devices are served (removed ones keep a row).
            CREATE TABLE gw_registry (
                tenant     TEXT NOT NULL,
                device     TEXT NOT NULL,
                role       TEXT NOT NULL,
                added_ms   INTEGER NOT NULL,
                removed_ms INTEGER,
                PRIMARY KEY (tenant, device)
            ) WITHOUT ROWID;
            ",
        )?;
    }
    if version == 9 {
        conn.execute_batch(
            "
            -- When each device was first heard from in each epoch: after a restore, the
            -- window in which its batches may carry writes the store cannot check starts
            -- then (see storage/vouching.rs).
            CREATE TABLE IF NOT EXISTS gw_epoch_devices (
                tenant   TEXT NOT NULL,
                device   TEXT NOT NULL,
                epoch    BLOB NOT NULL,
                since_ms INTEGER NOT NULL,
                PRIMARY KEY (tenant, device, epoch)
            ) WITHOUT ROWID;
            -- Dead letters are capped per device.
            CREATE INDEX IF NOT EXISTS gw_dead_letters_by_device ON gw_dead_letters (tenant, device, id);
            -- Epochs devices spoke for that this store never issued (a store it replaced did):
            -- one such epoch starts one new epoch, however many devices show it.
            CREATE TABLE gw_foreign_epochs (
                tenant  TEXT NOT NULL,
                epoch   BLOB NOT NULL,
                seen_ms INTEGER NOT NULL,
                PRIMARY KEY (tenant, epoch)
            ) WITHOUT ROWID;
            ",
        )?;
    }
    if version == 10 {
        conn.execute_batch(
            "
            -- Which log entries hold which row: an erasing delete scrubs them (erasure.rs).
            CREATE TABLE gw_log_keys (
                tenant TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                seq    INTEGER NOT NULL,
                PRIMARY KEY (tenant, tbl, pk, seq)
            ) WITHOUT ROWID;
            ",
        )?;
        super::erasure::index_existing(conn)?;
    }
    if version == 11 {
        // A hash of each registered device's broker password, for the embedded broker to
        // check (see broker/credentials.rs); NULL when none was issued.
        conn.execute_batch("ALTER TABLE gw_registry ADD COLUMN secret TEXT;")?;
    }
    if version == 12 {
        conn.execute_batch(
            "
            -- Where each logged row of a scoped table moved (scope.rs: encode_moves); NULL
            -- when the entry holds none.
            ALTER TABLE gw_log ADD COLUMN moves BLOB;
            -- Each device's scope parameters (a JSON object of strings), set by an operator,
            -- and a version that grows with every change of them.
            ALTER TABLE gw_registry ADD COLUMN params TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE gw_registry ADD COLUMN scope_version INTEGER NOT NULL DEFAULT 0;
            -- The scope version the gateway last told each device.
            ALTER TABLE gw_devices ADD COLUMN scope_told INTEGER;
            ",
        )?;
    }
    if version == 13 {
        conn.execute_batch(
            "
            -- Each row of a scoped table by its scope key, for snapshots of one scope.
            CREATE TABLE IF NOT EXISTS gw_scope_rows (
                tenant TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                skey   BLOB NOT NULL,
                PRIMARY KEY (tenant, tbl, pk)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS gw_scope_rows_by_key ON gw_scope_rows (tenant, tbl, skey, pk);
            ",
        )?;
    }
    if version == 14 {
        conn.execute_batch(
            "
            -- The scopes each entry holding rows of scoped tables concerns (storage/chains.rs):
            -- ('', x'') for its rows of tables without scope, and each scope key its scoped
            -- rows had before or after it. Entries without moves concern every scope, found by
            -- their own index. Entries logged before this version concern every scope.
            CREATE TABLE IF NOT EXISTS gw_log_scopes (
                tenant TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                skey   BLOB NOT NULL,
                seq    INTEGER NOT NULL,
                PRIMARY KEY (tenant, tbl, skey, seq)
            ) WITHOUT ROWID;
            INSERT OR IGNORE INTO gw_log_scopes(tenant, tbl, skey, seq)
                SELECT tenant, '', x'', seq FROM gw_log WHERE moves IS NOT NULL;
            CREATE INDEX IF NOT EXISTS gw_log_unscoped ON gw_log (tenant, seq) WHERE moves IS NULL;
            -- The scope the gateway last told each device to follow.
            ALTER TABLE gw_devices ADD COLUMN feed_told TEXT;
            ",
        )?;
    }
    if version == 15 {
        conn.execute_batch(
            "
            -- Rows held by reference (storage/refs.rs): what each row of a referencing table
            -- names of each table held through it (the encoded key), and its own scope key; and for each named row, how many
            -- rows of each scope name it.
            CREATE TABLE IF NOT EXISTS gw_ref_names (
                tenant TEXT NOT NULL,
                held   TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                ref    BLOB NOT NULL,
                skey   BLOB NOT NULL,
                PRIMARY KEY (tenant, held, tbl, pk)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS gw_ref_counts (
                tenant TEXT NOT NULL,
                tbl    TEXT NOT NULL,
                pk     BLOB NOT NULL,
                skey   BLOB NOT NULL,
                n      INTEGER NOT NULL,
                PRIMARY KEY (tenant, tbl, pk, skey)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS gw_ref_counts_by_key ON gw_ref_counts (tenant, tbl, skey, pk);
            ",
        )?;
    }
    Ok(())
}
