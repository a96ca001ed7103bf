//! The byte layout of a [`RowState`], shared by batches on the wire and the store's metadata.
//!
//! Node ids and column names are written as indexes into dictionaries the caller keeps (per
//! batch on the wire, per store on disk). Most changes carry one write touching several
//! registers, so a row names a default dot and timestamp once and each entry or context
//! equal to it costs a flag bit.

use std::collections::BTreeMap;

use super::DecodeError;
use super::buf::{Reader, Writer};
use super::intern::Interner;
use super::values::{self, TAG_BITS};
use crate::clock::{Dot, Hlc, NodeId, VersionVector};
use crate::state::{Counter, CounterPart, Entry, Life, Register, RowState};

const ROW_HAS_DEFAULT: u8 = 1;
const CTX_IS_DEFAULT: u8 = 1;
const CTX_IS_PREVIOUS: u8 = 2;
const ENTRY_IS_DEFAULT: u8 = 1;
const LIFE_ALIVE: u8 = 0;
const LIFE_DEAD: u8 = 1;

/// Dictionaries an encoder fills.
#[derive(Debug)]
pub(crate) struct EncodeCtx<'a> {
    pub(crate) nodes: &'a mut Interner<NodeId>,
    pub(crate) columns: &'a mut Interner<String>,
    pub(crate) hlc_base: u64,
}

/// Dictionaries a decoder reads from.
#[derive(Debug)]
pub(crate) struct DecodeCtx<'a> {
    pub(crate) nodes: &'a Interner<NodeId>,
    pub(crate) columns: &'a Interner<String>,
    pub(crate) hlc_base: u64,
}

fn default_dot(state: &RowState) -> Option<(Dot, Hlc)> {
    let life = state.life.entries.iter().map(|e| (e.dot, e.hlc));
    let fields = state.fields.values().flat_map(|r| r.entries.iter().map(|e| (e.dot, e.hlc)));
    life.chain(fields).max_by_key(|(d, _)| d.counter)
}

struct RowEncoder<'w, 'c, 'a> {
    w: &'w mut Writer,
    cx: &'c mut EncodeCtx<'a>,
    default: Option<(Dot, Hlc)>,
    previous_ctx: Option<VersionVector>,
}

impl RowEncoder<'_, '_, '_> {
    fn node(&mut self, n: NodeId) {
        let i = self.cx.nodes.intern(&n);
        self.w.varint(i);
    }

    fn column(&mut self, c: &str) {
        let i = self.cx.columns.intern(&c.to_owned());
        self.w.varint(i);
    }

    fn dot_hlc(&mut self, dot: Dot, hlc: Hlc) {
        self.node(dot.node);
        self.w.varint(dot.counter);
        self.w.zigzag(hlc.0.wrapping_sub(self.cx.hlc_base) as i64);
    }

    fn vv(&mut self, vv: &VersionVector) {
        self.w.varint(vv.len() as u64);
        for (n, c) in vv.iter() {
            self.node(n);
            self.w.varint(c);
        }
    }

    fn ctx(&mut self, ctx: &VersionVector) {
        let is_default = self.default.is_some_and(|(d, _)| ctx.len() == 1 && ctx.get(d.node) == d.counter);
        let is_previous = self.previous_ctx.as_ref() == Some(ctx);
        if is_default {
            self.w.u8(CTX_IS_DEFAULT);
        } else if is_previous {
            self.w.u8(CTX_IS_PREVIOUS);
        } else {
            self.w.u8(0);
            self.vv(ctx);
        }
        self.previous_ctx = Some(ctx.clone());
    }

    /// Writes the entry header byte (`tag` in the high bits) and, if needed, its dot.
    fn entry_head(&mut self, tag: u8, dot: Dot, hlc: Hlc) {
        let is_default = self.default == Some((dot, hlc));
        self.w.u8((tag << 1) | (u8::from(is_default) * ENTRY_IS_DEFAULT));
        if !is_default {
            self.dot_hlc(dot, hlc);
        }
    }

    fn row(&mut self, state: &RowState) {
        match self.default {
            Some((dot, hlc)) => {
                self.w.u8(ROW_HAS_DEFAULT);
                self.dot_hlc(dot, hlc);
            }
            None => self.w.u8(0),
        }
        self.ctx(&state.life.ctx);
        self.w.varint(state.life.entries.len() as u64);
        for e in &state.life.entries {
            match &e.value {
                Life::Alive => self.entry_head(LIFE_ALIVE, e.dot, e.hlc),
                Life::Dead { seen } => {
                    self.entry_head(LIFE_DEAD, e.dot, e.hlc);
                    self.w.varint(seen.len() as u64);
                    for (column, vv) in seen {
                        self.column(column);
                        self.vv(vv);
                    }
                }
            }
        }
        self.w.varint(state.fields.len() as u64);
        for (column, reg) in &state.fields {
            self.column(column);
            self.ctx(&reg.ctx);
            self.w.varint(reg.entries.len() as u64);
            for e in &reg.entries {
                self.entry_head(values::tag(&e.value), e.dot, e.hlc);
                values::write_payload(self.w, &e.value);
            }
        }
        self.w.varint(state.counters.len() as u64);
        for (column, counter) in &state.counters {
            self.column(column);
            self.w.varint(counter.0.len() as u64);
            for (node, part) in &counter.0 {
                self.node(*node);
                self.w.varint(part.seq);
                self.w.zigzag(part.total);
            }
        }
    }
}

/// Appends the encoding of `state` to `w`.
pub(crate) fn write_row_state(w: &mut Writer, cx: &mut EncodeCtx<'_>, state: &RowState) {
    let default = default_dot(state);
    RowEncoder { w, cx, default, previous_ctx: None }.row(state);
}

struct RowDecoder<'r, 'd, 'c> {
    r: &'r mut Reader<'d>,
    cx: &'c DecodeCtx<'c>,
    default: Option<(Dot, Hlc)>,
    previous_ctx: Option<VersionVector>,
}

impl RowDecoder<'_, '_, '_> {
    fn node(&mut self) -> Result<NodeId, DecodeError> {
        let i = self.r.varint()?;
        self.cx.nodes.get(i, "node").copied()
    }

    fn column(&mut self) -> Result<String, DecodeError> {
        let i = self.r.varint()?;
        self.cx.columns.get(i, "column").cloned()
    }

    fn dot_hlc(&mut self) -> Result<(Dot, Hlc), DecodeError> {
        let node = self.node()?;
        let counter = self.r.varint()?;
        if counter == 0 {
            // Counters start at 1: 0 means "nothing seen" in every version vector.
            return Err(DecodeError::Invalid("a dot with counter 0"));
        }
        let hlc = Hlc(self.cx.hlc_base.wrapping_add(self.r.zigzag()? as u64));
        Ok((Dot { node, counter }, hlc))
    }

    fn vv(&mut self) -> Result<VersionVector, DecodeError> {
        let n = self.r.count(self.r.limits.max_vector_len, "version vector entries")?;
        let mut vv = VersionVector::new();
        for _ in 0..n {
            let node = self.node()?;
            let counter = self.r.varint()?;
            if counter == 0 {
                return Err(DecodeError::Invalid("a version vector entry of 0"));
            }
            if vv.get(node) != 0 {
                return Err(DecodeError::Invalid("node repeated in a version vector"));
            }
            vv.advance(node, counter);
        }
        Ok(vv)
    }

    fn ctx(&mut self) -> Result<VersionVector, DecodeError> {
        let vv = match self.r.u8()? {
            0 => self.vv()?,
            CTX_IS_DEFAULT => {
                let (d, _) = self.default.ok_or(DecodeError::Invalid("default context without a default dot"))?;
                VersionVector::from_dot(d)
            }
            CTX_IS_PREVIOUS => self.previous_ctx.clone().ok_or(DecodeError::Invalid("no previous context"))?,
            _ => return Err(DecodeError::Invalid("unknown context flags")),
        };
        self.previous_ctx = Some(vv.clone());
        Ok(vv)
    }

    /// Reads an entry header: the tag and the entry's dot and timestamp.
    fn entry_head(&mut self) -> Result<(u8, Dot, Hlc), DecodeError> {
        let head = self.r.u8()?;
        if head >> (TAG_BITS + 1) != 0 {
            return Err(DecodeError::Invalid("unknown entry flags"));
        }
        let (dot, hlc) = if head & ENTRY_IS_DEFAULT != 0 {
            self.default.ok_or(DecodeError::Invalid("default entry without a default dot"))?
        } else {
            self.dot_hlc()?
        };
        Ok((head >> 1, dot, hlc))
    }

    fn entries_count(&mut self) -> Result<usize, DecodeError> {
        self.r.count(self.r.limits.max_register_entries, "register entries")
    }

    fn row(&mut self) -> Result<RowState, DecodeError> {
        self.default = match self.r.u8()? {
            0 => None,
            ROW_HAS_DEFAULT => Some(self.dot_hlc()?),
            _ => return Err(DecodeError::Invalid("unknown row flags")),
        };
        let mut state = RowState::default();
        state.life.ctx = self.ctx()?;
        for _ in 0..self.entries_count()? {
            let (tag, dot, hlc) = self.entry_head()?;
            let value = match tag {
                LIFE_ALIVE => Life::Alive,
                LIFE_DEAD => {
                    let n = self.r.count(self.r.limits.max_columns, "columns seen by a delete")?;
                    let mut seen = BTreeMap::new();
                    for _ in 0..n {
                        let column = self.column()?;
                        let vv = self.vv()?;
                        seen.insert(column, vv);
                    }
                    Life::Dead { seen }
                }
                other => return Err(DecodeError::UnknownTag(other)),
            };
            state.life.entries.push(Entry { value, dot, hlc });
        }
        check_register(&mut state.life)?;
        let n = self.r.count(self.r.limits.max_columns, "columns in a row")?;
        for _ in 0..n {
            let column = self.column()?;
            let mut reg = Register { ctx: self.ctx()?, entries: Vec::new() };
            for _ in 0..self.entries_count()? {
                let (tag, dot, hlc) = self.entry_head()?;
                let value = values::read_payload(self.r, tag)?;
                reg.entries.push(Entry { value, dot, hlc });
            }
            check_register(&mut reg)?;
            if state.fields.insert(column, reg).is_some() {
                return Err(DecodeError::Invalid("column repeated in a row"));
            }
        }
        let n = self.r.count(self.r.limits.max_columns, "counter columns in a row")?;
        for _ in 0..n {
            let column = self.column()?;
            let parts = self.r.count(self.r.limits.max_vector_len, "counter parts")?;
            let mut counter = Counter::default();
            for _ in 0..parts {
                let node = self.node()?;
                let part = CounterPart { seq: self.r.varint()?, total: self.r.zigzag()? };
                if part.seq == 0 {
                    return Err(DecodeError::Invalid("a counter part with sequence 0"));
                }
                if counter.0.insert(node, part).is_some() {
                    return Err(DecodeError::Invalid("node repeated in a counter"));
                }
            }
            if state.counters.insert(column, counter).is_some() {
                return Err(DecodeError::Invalid("counter column repeated in a row"));
            }
        }
        Ok(state)
    }
}

/// Sorts a decoded register's entries and refuses ones that could not come from a replica:
/// two entries with one dot, or an entry its own context does not cover.
fn check_register<T>(reg: &mut Register<T>) -> Result<(), DecodeError> {
    reg.entries.sort_by_key(|e| e.dot);
    if reg.entries.windows(2).any(|w| w[0].dot == w[1].dot) {
        return Err(DecodeError::Invalid("dot repeated in a register"));
    }
    if reg.entries.iter().any(|e| !reg.ctx.covers(e.dot)) {
        return Err(DecodeError::Invalid("entry not covered by its register's context"));
    }
    Ok(())
}

/// Reads one row state written by [`write_row_state`].
pub(crate) fn read_row_state(r: &mut Reader<'_>, cx: &DecodeCtx<'_>) -> Result<RowState, DecodeError> {
    RowDecoder { r, cx, default: None, previous_ctx: None }.row()
}
