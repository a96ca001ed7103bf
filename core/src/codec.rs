//! The binary batch codec: a versioned envelope around a zstd-compressed payload.
//!
//! Layout and versioning rules are in `docs/PROTOCOL.md`. Decoding takes untrusted bytes:
//! every count, length and the decompressed size are checked against [`Limits`] before
//! anything is allocated, and every failure is a [`DecodeError`].

pub(crate) mod buf;
mod intern;
mod rows;
pub(crate) mod values;

use std::collections::HashMap;
use std::io::Read;

use self::buf::{Reader, Writer};
use self::rows::{DecodeCtx, EncodeCtx};
use crate::batch::{Batch, RowChange};
use crate::clock::NodeId;
use crate::state::RowState;

pub use self::intern::Interner;
pub use self::values::{decode_key, encode_key};

/// The envelope's first four bytes.
pub const MAGIC: [u8; 4] = *b"DLFT";
/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest protocol version this build reads: always the current one and the one before,
/// so a fleet can upgrade gradually. Version 1 is the first, so nothing older exists.
pub const MIN_READ_VERSION: u8 = if PROTOCOL_VERSION > 1 { PROTOCOL_VERSION - 1 } else { 1 };

const FLAG_ZSTD: u8 = 1;
const FLAG_DICTIONARY: u8 = 2;

/// Why bytes could not be decoded. Every way a batch can be malformed has a variant here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("input ends early")]
    Truncated,
    #[error("not a driftless batch (bad magic bytes)")]
    BadMagic,
    #[error("protocol version {0} is not supported (this build reads {MIN_READ_VERSION} to {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("varint longer than 64 bits")]
    VarintOverflow,
    #[error("{what}: {found} exceeds the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: u64, found: u64 },
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("unknown tag {0}")]
    UnknownTag(u8),
    #[error("{what} reference {index} is out of range")]
    BadReference { what: &'static str, index: u64 },
    #[error("compression dictionary {0} is not known here")]
    UnknownDictionary(u32),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("{0} unexpected bytes after the end")]
    TrailingBytes(usize),
    #[error("malformed batch: {0}")]
    Invalid(&'static str),
}

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload after decompression, in bytes.
    pub max_decompressed: usize,
    pub max_rows: usize,
    pub max_nodes: usize,
    /// Distinct columns per batch, and columns per row.
    pub max_columns: usize,
    pub max_tables: usize,
    pub max_key_values: usize,
    pub max_vector_len: usize,
    /// Concurrent writes kept in one register.
    pub max_register_entries: usize,
    /// Longest text or blob value.
    pub max_value_bytes: usize,
    /// Longest table, column or role name (names are copied per reference, so they stay small).
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decompressed: 64 << 20,
            max_rows: 1_000_000,
            max_nodes: 65_536,
            max_columns: 2_000,
            max_tables: 10_000,
            max_key_values: 64,
            max_vector_len: 65_536,
            max_register_entries: 1_024,
            max_value_bytes: 16 << 20,
            max_name_bytes: 1_024,
        }
    }
}

/// A zstd dictionary trained on typical payloads, named by an id both sides agree on.
#[derive(Clone)]
pub struct Dictionary {
    pub id: u32,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dictionary(id={}, {} bytes)", self.id, self.bytes.len())
    }
}

impl Dictionary {
    /// Trains a dictionary of at most `max_size` bytes on sample payloads
    /// (from [`encode_payload`]).
    pub fn train(id: u32, samples: &[Vec<u8>], max_size: usize) -> std::io::Result<Dictionary> {
        Ok(Dictionary { id, bytes: zstd::dict::from_samples(samples, max_size)? })
    }
}

/// The dictionaries a decoder may be asked for.
#[derive(Debug, Clone, Default)]
pub struct Dictionaries(HashMap<u32, Dictionary>);

impl Dictionaries {
    pub fn insert(&mut self, dict: Dictionary) {
        self.0.insert(dict.id, dict);
    }
}

/// How to write a batch.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions<'a> {
    /// zstd level; `None` sends the payload uncompressed.
    pub level: Option<i32>,
    pub dictionary: Option<&'a Dictionary>,
}

impl Default for EncodeOptions<'_> {
    fn default() -> Self {
        EncodeOptions { level: Some(3), dictionary: None }
    }
}

/// Encodes the uncompressed payload of a batch (what dictionaries are trained on).
pub fn encode_payload(batch: &Batch) -> Vec<u8> {
    let mut nodes = Interner::default();
    let mut columns = Interner::default();
    let mut tables: Interner<String> = Interner::default();
    // Nodes with roles go first so the role list lines up with the node list's prefix.
    for node in batch.roles.keys() {
        nodes.intern(node);
    }
    let hlc_base = batch.rows.iter().filter_map(|r| r.state.max_hlc()).map(|(_, h)| h.0).min().unwrap_or(0);
    let mut body = Writer::default();
    body.varint(batch.rows.len() as u64);
    {
        let mut cx = EncodeCtx { nodes: &mut nodes, columns: &mut columns, hlc_base };
        for row in &batch.rows {
            body.varint(tables.intern(&row.table));
            body.varint(row.pk.len() as u64);
            for v in &row.pk {
                values::write_value(&mut body, v);
            }
            rows::write_row_state(&mut body, &mut cx, &row.state);
        }
    }
    let mut w = Writer::default();
    w.varint(nodes.len() as u64);
    for node in nodes.keys() {
        w.raw(&node.0);
        w.bytes(batch.roles.get(node).map_or(&b""[..], |r| r.as_bytes()));
    }
    for dict in [&columns, &tables] {
        w.varint(dict.len() as u64);
        for name in dict.keys() {
            w.bytes(name.as_bytes());
        }
    }
    w.varint(hlc_base);
    w.raw(&body.buf);
    w.buf
}

/// Encodes a batch into an envelope ready to send.
pub fn encode_batch(batch: &Batch, opts: EncodeOptions<'_>) -> Vec<u8> {
    envelope(&encode_payload(batch), opts)
}

/// Payloads shorter than this go uncompressed unless a dictionary is given: zstd's own frame
/// makes them longer (a one-row change of 60 bytes took 71 compressed, 67 not), and
/// compressing each cost a gateway a few percent of a merge.
pub const MIN_COMPRESSED: usize = 128;

/// Wraps an encoded payload (see [`encode_payload`]) in an envelope ready to send. Without a
/// dictionary it goes compressed only when that makes it shorter.
pub fn envelope(payload: &[u8], opts: EncodeOptions<'_>) -> Vec<u8> {
    let compressed = match (opts.level, opts.dictionary) {
        (None, _) => None,
        (Some(level), Some(d)) => zstd::bulk::Compressor::with_dictionary(level, &d.bytes)
            .and_then(|mut c| c.compress(payload))
            .ok()
            .map(|c| (FLAG_ZSTD | FLAG_DICTIONARY, c)),
        (Some(_), None) if payload.len() < MIN_COMPRESSED => None,
        (Some(level), None) => compress(payload, level).ok().map(|c| (FLAG_ZSTD, c)),
    };
    // zstd fails only on allocation or a corrupt dictionary; an uncompressed envelope is
    // still a valid one. (A dictionary, made for small payloads, is always used.)
    let compressed = compressed.filter(|(f, c)| f & FLAG_DICTIONARY != 0 || c.len() < payload.len());
    let (flags, body) = compressed.as_ref().map_or((0, payload), |(f, c)| (*f, &c[..]));
    let mut w = Writer::default();
    w.raw(&MAGIC);
    w.u8(PROTOCOL_VERSION);
    w.u8(flags);
    if let Some(d) = opts.dictionary.filter(|_| flags & FLAG_DICTIONARY != 0) {
        w.varint(u64::from(d.id));
    }
    w.varint(payload.len() as u64);
    w.raw(body);
    w.buf
}

/// The payload size an envelope declares (its size once decompressed), read from its header.
pub fn declared_payload_len(bytes: &[u8]) -> Result<u64, DecodeError> {
    let limits = Limits::default();
    let mut r = Reader::new(bytes, &limits);
    if r.take(4)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    r.u8()?;
    if r.u8()? & FLAG_DICTIONARY != 0 {
        r.varint()?;
    }
    r.varint()
}

/// Decodes an envelope from untrusted bytes.
pub fn decode_batch(bytes: &[u8], limits: &Limits, dictionaries: &Dictionaries) -> Result<Batch, DecodeError> {
    let mut r = Reader::new(bytes, limits);
    if r.take(4)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8()?;
    if !(MIN_READ_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let flags = r.u8()?;
    if flags & !(FLAG_ZSTD | FLAG_DICTIONARY) != 0 || flags == FLAG_DICTIONARY {
        return Err(DecodeError::Invalid("unknown envelope flags"));
    }
    let dictionary = if flags & FLAG_DICTIONARY != 0 {
        let id = u32::try_from(r.varint()?).map_err(|_| DecodeError::Invalid("dictionary id out of range"))?;
        Some(dictionaries.0.get(&id).ok_or(DecodeError::UnknownDictionary(id))?)
    } else {
        None
    };
    let raw_len = r.varint()?;
    if raw_len > limits.max_decompressed as u64 {
        return Err(DecodeError::LimitExceeded {
            what: "decompressed size",
            limit: limits.max_decompressed as u64,
            found: raw_len,
        });
    }
    let body = r.take(r.remaining())?;
    if flags & FLAG_ZSTD == 0 {
        if body.len() as u64 != raw_len {
            return Err(DecodeError::Invalid("declared size does not match the payload"));
        }
        return decode_payload(body, limits);
    }
    let payload = decompress(body, raw_len as usize, dictionary)?;
    decode_payload(&payload, limits)
}

thread_local! {
    /// A compression context per thread, kept: making one allocates about a megabyte, more
    /// than compressing a small batch costs.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// A decompression context per thread, kept for the same reason.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(payload: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, compressor) = cell.as_mut().expect("set above");
        compressor.compress(payload)
    })
}

/// Decompresses at most `expected` bytes, refusing streams that produce more or fewer: a
/// few bytes that expand to gigabytes stop at the limit instead of filling memory.
fn decompress(body: &[u8], expected: usize, dictionary: Option<&Dictionary>) -> Result<Vec<u8>, DecodeError> {
    let err = |e: std::io::Error| DecodeError::Decompress(e.to_string());
    if dictionary.is_none() && expected <= 1 << 20 {
        // In one pass into a buffer of the expected size (small: the size is the sender's
        // claim): the output is the window, so a frame cannot make it allocate more, and one
        // that holds more fails.
        let out = DECOMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(zstd::bulk::Decompressor::new()?);
            }
            cell.as_mut().expect("set above").decompress(body, expected)
        });
        let out = out.map_err(err)?;
        if out.len() != expected {
            return Err(DecodeError::Decompress(format!("expected {expected} bytes, stream holds {}", out.len())));
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(expected.min(1 << 20));
    let dict: &[u8] = dictionary.map_or(&[], |d| &d.bytes);
    let mut decoder = zstd::stream::read::Decoder::with_dictionary(body, dict).map_err(err)?;
    // A frame may ask for a window far larger than its output; cap it at what the output needs.
    let window_log = (usize::BITS - expected.max(1 << 10).leading_zeros()).clamp(10, 31);
    decoder.window_log_max(window_log).map_err(err)?;
    decoder.take(expected as u64 + 1).read_to_end(&mut out).map_err(err)?;
    if out.len() != expected {
        return Err(DecodeError::Decompress(format!("expected {expected} bytes, stream holds {} or more", out.len())));
    }
    Ok(out)
}

/// Decodes an uncompressed payload.
pub fn decode_payload(payload: &[u8], limits: &Limits) -> Result<Batch, DecodeError> {
    let mut r = Reader::new(payload, limits);
    let mut batch = Batch::default();
    let n = r.count(limits.max_nodes, "nodes")?;
    let mut nodes = Interner::default();
    for _ in 0..n {
        let node = NodeId::from_slice(r.take(16)?).ok_or(DecodeError::Truncated)?;
        let role = r.string(limits.max_name_bytes, "role name bytes")?;
        if nodes.intern(&node) as usize != nodes.len() - 1 {
            return Err(DecodeError::Invalid("node listed twice"));
        }
        if !role.is_empty() {
            batch.roles.insert(node, role);
        }
    }
    let read_names = |r: &mut Reader<'_>, max, what| -> Result<Interner<String>, DecodeError> {
        let n = r.count(max, what)?;
        let mut names = Interner::default();
        for _ in 0..n {
            names.intern(&r.string(limits.max_name_bytes, "name bytes")?);
        }
        Ok(names)
    };
    let columns = read_names(&mut r, limits.max_columns, "columns")?;
    let tables = read_names(&mut r, limits.max_tables, "tables")?;
    let hlc_base = r.varint()?;
    let cx = DecodeCtx { nodes: &nodes, columns: &columns, hlc_base };
    let rows = r.count(limits.max_rows, "rows")?;
    for _ in 0..rows {
        let table = tables.get(r.varint()?, "table")?.clone();
        let nk = r.count(limits.max_key_values, "primary key values")?;
        let pk = (0..nk).map(|_| values::read_value(&mut r)).collect::<Result<Vec<_>, _>>()?;
        if pk.is_empty() {
            return Err(DecodeError::Invalid("row without a primary key"));
        }
        let state = rows::read_row_state(&mut r, &cx)?;
        batch.rows.push(RowChange { table, pk, state });
    }
    r.finish()?;
    Ok(batch)
}

/// Encodes one row state with dictionaries owned by the caller (the store's metadata form).
pub fn encode_row_state(state: &RowState, nodes: &mut Interner<NodeId>, columns: &mut Interner<String>) -> Vec<u8> {
    let mut w = Writer::default();
    rows::write_row_state(&mut w, &mut EncodeCtx { nodes, columns, hlc_base: 0 }, state);
    w.buf
}

/// Decodes a row state written by [`encode_row_state`] with the same dictionaries.
pub fn decode_row_state(
    bytes: &[u8],
    nodes: &Interner<NodeId>,
    columns: &Interner<String>,
    limits: &Limits,
) -> Result<RowState, DecodeError> {
    let mut r = Reader::new(bytes, limits);
    let state = rows::read_row_state(&mut r, &DecodeCtx { nodes, columns, hlc_base: 0 })?;
    r.finish()?;
    Ok(state)
}

#[cfg(test)]
mod tests;
