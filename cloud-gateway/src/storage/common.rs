//! What every gateway store does the same way: log entry tags, timestamps, snapshot resume
//! tokens, how much of a dead letter is kept, and what an erasing delete scrubs from the log.

use driftless_core::codec::encode_key;
use driftless_core::codec::{Limits, decode_payload};
use driftless_core::erase::drop_superseded;
use driftless_core::{Batch, RowState, SyncSchema};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::storage::{Incoming, Params, Registration, ScopeStanding, ServedSchema};
use driftless_core::intake::ScopeRules;
use driftless_core::scope::{Move, encode_moves};

/// Dead letters larger than this keep only their first [`DEAD_LETTER_PREFIX`] bytes.
pub(crate) const DEAD_LETTER_INLINE: usize = 64 << 10;
pub(crate) const DEAD_LETTER_PREFIX: usize = 4 << 10;
/// Dead letters kept per device (the oldest go): a device sending only what is refused
/// cannot fill the store. What they held stays with the device, set aside there too.
pub(crate) const DEAD_LETTERS_PER_DEVICE: i64 = 1_000;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A source of log entry tags: random per process, so a log rolled back and written again
/// by another run gets other tags at the same positions.
#[derive(Debug)]
pub(crate) struct Tags(u64);

impl Tags {
    pub(crate) fn new() -> Result<Tags> {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| Error::Random(e.to_string()))?;
        Ok(Tags(u64::from_le_bytes(seed) | 1))
    }

    /// The next tag (xorshift64*, never 0: 0 means "unknown" in a cursor).
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).max(1)
    }
}

/// Snapshot resume tokens: table name length, table name, encoded key.
pub(crate) fn resume_token(table: &str, key: &[u8]) -> Vec<u8> {
    let mut t = (table.len() as u32).to_le_bytes().to_vec();
    t.extend_from_slice(table.as_bytes());
    t.extend_from_slice(key);
    t
}

/// Where a snapshot page starts: after the table and key a resume token names, or before
/// every row for the empty token. `None`: the token names no position (forged, or of
/// another store).
pub(crate) fn parse_resume(token: &[u8]) -> Option<(String, Vec<u8>)> {
    if token.is_empty() {
        return Some((String::new(), Vec::new()));
    }
    parse_resume_ref(token).map(|(table, key)| (table.to_owned(), key.to_vec()))
}

pub(crate) fn parse_resume_ref(token: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_le_bytes(token.get(..4)?.try_into().ok()?) as usize;
    let table = std::str::from_utf8(token.get(4..4usize.checked_add(len)?)?).ok()?;
    Some((table, &token[4 + len..]))
}

/// What is kept of a refused payload (all of it, or its first bytes when it is large) and
/// the hex SHA-256 of all of it.
pub(crate) fn dead_letter_kept(payload: &[u8]) -> (&[u8], String) {
    let sha256: String = Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect();
    let kept = if payload.len() > DEAD_LETTER_INLINE { &payload[..DEAD_LETTER_PREFIX] } else { payload };
    (kept, sha256)
}

/// The tables `new` declares that `old` did not (with `new`'s roles).
pub(crate) fn added_tables(old: &SyncSchema, new: &SyncSchema) -> SyncSchema {
    let tables = new.tables.iter().filter(|t| old.table(&t.name).is_none()).cloned().collect();
    SyncSchema { roles: new.roles.clone(), tables }
}

/// How the rows stored so far contradict `schema` (at most a few of each kind).
pub(crate) fn unfit_rows(
    limits: &Limits,
    schema: &SyncSchema,
    mut stored: impl FnMut(&str) -> Result<(Vec<i64>, Vec<Vec<u8>>)>,
) -> Result<Vec<String>> {
    let mut unfit: Vec<String> = Vec::new();
    let mut note = |problem: String| {
        if !unfit.contains(&problem) && unfit.len() < 20 {
            unfit.push(problem);
        }
    };
    for table in &schema.tables {
        let (arities, states) = stored(&table.name)?;
        for n in arities.into_iter().filter(|n| *n as usize != table.key.len()) {
            note(format!("rows of {:?} have {n} key columns; the schema declares {}", table.name, table.key.len()));
        }
        // Their entries were logged without where they belong: no device could be told.
        if table.scope.is_some() && !states.is_empty() {
            note(format!("{:?} holds rows already; a scope is declared with a new table", table.name));
        }
        for bytes in states {
            let b = decode_payload(&bytes, limits).map_err(|e| Error::Corrupt(format!("stored row: {e}")))?;
            for row in &b.rows {
                if let Err(reason) = table.check_row(row) {
                    note(format!("a stored row does not fit: {reason}"));
                }
                if driftless_core::is_visible(&row.state, &table.spec()) {
                    let required = table.columns.iter().filter(|c| {
                        !c.nullable
                            && c.default.is_none()
                            && !table.is_key(&c.name)
                            && c.policy != driftless_core::ColumnPolicy::Counter
                    });
                    for c in required.filter(|c| !row.state.fields.contains_key(&c.name)) {
                        note(format!(
                            "rows of {:?} lack {:?}, which is NOT NULL without a default",
                            table.name, c.name
                        ));
                    }
                }
                for name in row.state.fields.keys() {
                    match table.column(name) {
                        None => {
                            note(format!("rows of {:?} hold column {name:?}, which it does not declare", table.name))
                        }
                        Some(c) if c.policy == driftless_core::ColumnPolicy::Counter => {
                            note(format!("{:?}.{name:?} holds values; the schema declares a counter", table.name))
                        }
                        Some(_) => {}
                    }
                }
                for name in row.state.counters.keys() {
                    if table.column(name).is_none_or(|c| c.policy != driftless_core::ColumnPolicy::Counter) {
                        note(format!(
                            "{:?}.{name:?} is synced as a counter; the schema does not declare one",
                            table.name
                        ));
                    }
                }
            }
        }
    }
    Ok(unfit)
}

/// Whether a device is served, from its registered role and whether its tenant has a registry.
pub(crate) fn registration(role: Option<String>, closed: bool) -> Registration {
    match (role, closed) {
        (Some(role), _) => Registration::Registered { role },
        (None, true) => Registration::Unknown,
        (None, false) => Registration::Open,
    }
}

/// The scope rules of a device's merge: the schema's scopes, and the device's own (what it
/// may write). `None` when no table is scoped.
pub(crate) fn scope_rules<'a>(schema: Option<&'a ServedSchema>, at: &Incoming<'a>) -> Option<ScopeRules<'a>> {
    let schema = &schema?.schema;
    schema.tables.iter().any(|t| t.scope.is_some()).then_some(ScopeRules { schema, writer: at.scope })
}

/// A logged change's moves as the log keeps them: `None` if it holds no row of a scoped
/// table.
pub(crate) fn logged_moves(moves: &[Option<Move>]) -> Option<Vec<u8>> {
    moves.iter().any(Option::is_some).then(|| encode_moves(moves))
}

/// Scope parameters as the registry keeps them: a JSON object of strings.
pub(crate) fn params_text(params: &Params) -> String {
    serde_json::to_string(params).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn parse_params(text: &str) -> Result<Params> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("a device's scope parameters: {e}")))
}

/// A registered device's scope (`params` and version, `None` if it is not registered) and
/// the version it was told.
pub(crate) fn scope_standing(
    registered: Option<(String, i64)>,
    (told, told_feed): (Option<i64>, Option<String>),
) -> Result<ScopeStanding> {
    let (params, version) = match registered {
        Some((text, version)) => (parse_params(&text)?, version as u64),
        None => (Params::new(), 0),
    };
    Ok(ScopeStanding { params, version, told: told.map(|t| t as u64), told_feed })
}

/// When a device's recovery window starts: if the tenant's epoch replaced another, when the
/// device was first heard from in it (now, if it was not yet), and never before the renewal.
pub(crate) fn recovery_from(renewed_ms: Option<i64>, heard_ms: Option<i64>) -> Option<i64> {
    renewed_ms.map(|renewed| heard_ms.unwrap_or_else(now_ms).max(renewed))
}

/// A row of a tenant: its table and encoded key.
pub(crate) type RowKey = (String, Vec<u8>);

/// Drops from each row of `batch` what its merged state (as `merged` gives it, if it is one
/// being erased) superseded; returns whether anything was dropped.
pub(crate) fn scrub_batch<'m>(batch: &mut Batch, merged: impl Fn(&RowKey) -> Option<&'m RowState>) -> bool {
    let mut dropped = false;
    for row in &mut batch.rows {
        if let Some(state) = merged(&(row.table.clone(), encode_key(&row.pk))) {
            dropped |= drop_superseded(&mut row.state, state);
        }
    }
    dropped
}

/// A log entry being scrubbed, decoded; `None` (logged) if it cannot be: one unreadable entry
/// must not stop a delete, nor every later merge of the tenant.
pub(crate) fn readable(bytes: &[u8], limits: &Limits, tenant: &str, seq: i64) -> Option<Batch> {
    decode_payload(bytes, limits)
        .map_err(|e| tracing::error!(seq, tenant, error = %e, "a log entry could not be scrubbed"))
        .ok()
}
