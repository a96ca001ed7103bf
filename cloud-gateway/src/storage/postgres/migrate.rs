//! The gateway's own tables in PostgreSQL (schema `driftless`), created and migrated by
//! version. Each migration runs once, in its own transaction, under an advisory lock: several
//! instances starting together migrate once.

use postgres::Client;

use crate::error::Result;

/// The advisory lock key space of driftless (first of the two 32-bit keys).
pub(super) const LOCK_SPACE: i32 = 0x6466_6c73; // "dfls"

/// Migrations in order; version N is `MIGRATIONS[N - 1]`. Never edit one that shipped: add.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store holds, per tenant.
    "
    -- Rows by the SHA-256 of their encoded key: an index entry holds at most about 2.7 kB,
    -- and a key may be longer.
    CREATE TABLE driftless.gw_rows (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        pkh    bytea NOT NULL,
        state  bytea NOT NULL,       -- a one-row batch payload: the row's merged state
        PRIMARY KEY (tenant, tbl, pkh)
    );
    -- Merged changes; positions are per tenant and assigned under the tenant's lock, so they
    -- commit in order and a cursor never passes one that commits later.
    CREATE TABLE driftless.gw_log (
        tenant text NOT NULL,
        seq    bigint NOT NULL,
        origin text NOT NULL,
        rows   integer NOT NULL,
        change bytea NOT NULL,
        tag    bigint NOT NULL,
        PRIMARY KEY (tenant, seq)
    );
    CREATE TABLE driftless.gw_devices (
        tenant          text NOT NULL,
        device          text NOT NULL,
        first_seen_ms   bigint NOT NULL,
        last_seen_ms    bigint NOT NULL,
        uplink_hwm      bigint NOT NULL DEFAULT 0,
        downlink_cursor bigint NOT NULL DEFAULT 0,
        receipt_pos     bigint,
        receipt_tag     bigint,
        PRIMARY KEY (tenant, device)
    );
    CREATE TABLE driftless.gw_dead_letters (
        id          bigserial PRIMARY KEY,
        tenant      text NOT NULL,
        device      text NOT NULL,
        received_ms bigint NOT NULL,
        reason      text NOT NULL,
        payload     bytea NOT NULL,
        size        bigint NOT NULL,
        sha256      text NOT NULL
    );
    CREATE INDEX gw_dead_letters_by_time ON driftless.gw_dead_letters (received_ms);
    CREATE TABLE driftless.gw_epochs (
        id       bigserial PRIMARY KEY,
        tenant   text NOT NULL,
        epoch    bytea NOT NULL,
        since_ms bigint NOT NULL,
        reason   text NOT NULL
    );
    CREATE INDEX gw_epochs_by_tenant ON driftless.gw_epochs (tenant, id);
    CREATE TABLE driftless.gw_nodes (
        tenant      text NOT NULL,
        node        bytea NOT NULL,
        device      text,
        max_counter bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, node)
    );
    CREATE TABLE driftless.gw_tables (
        tenant  text NOT NULL,
        tbl     text NOT NULL,
        key_len integer NOT NULL,
        PRIMARY KEY (tenant, tbl)
    );
    CREATE TABLE driftless.gw_clock_skew (
        tenant  text NOT NULL,
        node    bytea NOT NULL,
        max_hlc bigint NOT NULL,
        bounded bigint NOT NULL,
        last_ms bigint NOT NULL,
        PRIMARY KEY (tenant, node)
    );
    CREATE TABLE driftless.gw_attempts (
        key      bytea PRIMARY KEY,
        count    integer NOT NULL,
        first_ms bigint NOT NULL,
        last_ms  bigint NOT NULL
    );
    CREATE TABLE driftless.gw_sync_schema (
        version   bigint PRIMARY KEY,
        text      text NOT NULL,
        loaded_ms bigint NOT NULL
    );
    -- The schema version each tenant's tables follow, and each table's journal number.
    CREATE TABLE driftless.gw_tenant_tables (
        tenant  text PRIMARY KEY,
        version bigint NOT NULL
    );
    CREATE TABLE driftless.gw_journals (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        id     bigserial,
        PRIMARY KEY (tenant, tbl)
    );
    CREATE TABLE driftless.gw_cloud_writers (
        tenant  text NOT NULL,
        role    text NOT NULL,
        node    bytea NOT NULL,
        counter bigint NOT NULL,
        PRIMARY KEY (tenant, role)
    );
    -- For a plain-SQL transaction that locks rows (SELECT ... FOR UPDATE) before it writes
    -- them: calling this first takes the tenant's lock in the order the gateway takes it.
    -- (1684434035 is LOCK_SPACE.)
    CREATE FUNCTION driftless.writing(tenant text) RETURNS void LANGUAGE sql
        AS $$ SELECT pg_advisory_xact_lock_shared(1684434035, hashtext(tenant)) $$;
    ",
    // 2: nodes bound to roles, the cloud's nodes to the cloud, and the device registry.
    "
    ALTER TABLE driftless.gw_nodes ADD COLUMN role text;
    INSERT INTO driftless.gw_nodes(tenant, node, device, role, max_counter)
        SELECT tenant, node, '', role, counter FROM driftless.gw_cloud_writers
        ON CONFLICT (tenant, node) DO UPDATE SET device = '', role = excluded.role;
    CREATE TABLE driftless.gw_registry (
        tenant     text NOT NULL,
        device     text NOT NULL,
        role       text NOT NULL,
        added_ms   bigint NOT NULL,
        removed_ms bigint,
        PRIMARY KEY (tenant, device)
    );
    ",
    // 3: when devices were first heard from in each epoch, epochs a replaced store issued,
    // dead letters capped per device.
    "
    CREATE TABLE IF NOT EXISTS driftless.gw_epoch_devices (
        tenant   text NOT NULL,
        device   text NOT NULL,
        epoch    bytea NOT NULL,
        since_ms bigint NOT NULL,
        PRIMARY KEY (tenant, device, epoch)
    );
    CREATE INDEX IF NOT EXISTS gw_dead_letters_by_device ON driftless.gw_dead_letters (tenant, device, id);
    CREATE TABLE driftless.gw_foreign_epochs (
        tenant  text NOT NULL,
        epoch   bytea NOT NULL,
        seen_ms bigint NOT NULL,
        PRIMARY KEY (tenant, epoch)
    );
    ",
    // 4: which log entries hold which row (by key hash), for erasing deletes to scrub; the
    // entries already logged are indexed as the migration runs (erasure.rs).
    "
    CREATE TABLE driftless.gw_log_keys (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        pkh    bytea NOT NULL,
        seq    bigint NOT NULL,
        PRIMARY KEY (tenant, tbl, pkh, seq)
    );
    ",
    // 5: a hash of each registered device's broker password, for the embedded broker.
    "
    ALTER TABLE driftless.gw_registry ADD COLUMN secret text;
    ",
    // 6: scopes. Where each logged row of a scoped table moved (scope.rs: encode_moves);
    // each device's scope parameters (a JSON object of strings) and their version; the
    // version the gateway last told each device.
    "
    ALTER TABLE driftless.gw_log ADD COLUMN moves bytea;
    ALTER TABLE driftless.gw_registry ADD COLUMN params text NOT NULL DEFAULT '{}';
    ALTER TABLE driftless.gw_registry ADD COLUMN scope_version bigint NOT NULL DEFAULT 0;
    ALTER TABLE driftless.gw_devices ADD COLUMN scope_told bigint;
    ",
    // 7: each row of a scoped table by its scope key, for snapshots of one scope.
    "
    CREATE TABLE IF NOT EXISTS driftless.gw_scope_rows (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        pkh    bytea NOT NULL,
        skey   bytea NOT NULL,
        PRIMARY KEY (tenant, tbl, pkh)
    );
    CREATE INDEX IF NOT EXISTS gw_scope_rows_by_key ON driftless.gw_scope_rows (tenant, tbl, skey, pkh);
    ",
    // 8: the scopes each entry holding rows of scoped tables concerns (storage/chains.rs):
    // ('', '') for its rows of tables without scope, and each scope key its scoped rows had
    // before or after it. Entries without moves concern every scope, found by their own
    // index. Entries logged before this version concern every scope. And the scope the
    // gateway last told each device to follow.
    "
    CREATE TABLE IF NOT EXISTS driftless.gw_log_scopes (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        skey   bytea NOT NULL,
        seq    bigint NOT NULL,
        PRIMARY KEY (tenant, tbl, skey, seq)
    );
    INSERT INTO driftless.gw_log_scopes(tenant, tbl, skey, seq)
        SELECT tenant, '', '\\x'::bytea, seq FROM driftless.gw_log WHERE moves IS NOT NULL
        ON CONFLICT DO NOTHING;
    CREATE INDEX IF NOT EXISTS gw_log_unscoped ON driftless.gw_log (tenant, seq) WHERE moves IS NULL;
    ALTER TABLE driftless.gw_devices ADD COLUMN feed_told text;
    ",
    // 9: rows held by reference (storage/refs.rs): what each row of a referencing table
    // names of each table held through it (the whole encoded key) and its own scope key; and for each named row, how many
    // rows of each scope name it.
    "
    CREATE TABLE IF NOT EXISTS driftless.gw_ref_names (
        tenant text NOT NULL,
        held   text NOT NULL,
        tbl    text NOT NULL,
        pkh    bytea NOT NULL,
        ref    bytea NOT NULL,
        skey   bytea NOT NULL,
        PRIMARY KEY (tenant, held, tbl, pkh)
    );
    CREATE TABLE IF NOT EXISTS driftless.gw_ref_counts (
        tenant text NOT NULL,
        tbl    text NOT NULL,
        pkh    bytea NOT NULL,
        skey   bytea NOT NULL,
        n      bigint NOT NULL,
        PRIMARY KEY (tenant, tbl, pkh, skey)
    );
    CREATE INDEX IF NOT EXISTS gw_ref_counts_by_key ON driftless.gw_ref_counts (tenant, tbl, skey, pkh);
    ",
];

/// The migration that adds the log's row index, after which entries already logged are
/// indexed.
const LOG_KEYS: i32 = 4;

/// Brings the `driftless` schema up to the newest version.
pub(super) fn upgrade(client: &mut Client) -> Result<()> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS driftless;
         CREATE TABLE IF NOT EXISTS driftless.gw_migrations (version integer PRIMARY KEY, applied_ms bigint NOT NULL);",
        )
        .or_else(|e| {
            // Two instances creating the schema at once: one wins, the other finds it made.
            if e.code().is_some_and(|c| *c == postgres::error::SqlState::UNIQUE_VIOLATION) { Ok(()) } else { Err(e) }
        })?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_SPACE])?;
        let done = tx.query_opt("SELECT 1 FROM driftless.gw_migrations WHERE version = $1", &[&version])?.is_some();
        if !done {
            tx.batch_execute(sql)?;
            if version == LOG_KEYS {
                super::erasure::index_existing(&mut tx)?;
            }
            tx.execute(
                "INSERT INTO driftless.gw_migrations(version, applied_ms) VALUES ($1, $2)",
                &[&version, &super::now_ms()],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}
