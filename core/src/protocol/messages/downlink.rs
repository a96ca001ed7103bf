//! The gateway's messages in bytes.

use super::{Downlink, Epoch, MAX_ID, MAX_SCHEMA_BYTES, MAX_TOKEN, RefusedRow, tag};
use crate::codec::buf::{Reader, Writer};
use crate::codec::{DecodeError, Limits};

impl Downlink {
    /// The gateway epoch the message speaks for (`None` for version 1 answers).
    pub fn epoch(&self) -> Option<Epoch> {
        match self {
            Downlink::Welcome { epoch, .. }
            | Downlink::Ack { epoch, .. }
            | Downlink::Nack { epoch, .. }
            | Downlink::Changes { epoch, .. }
            | Downlink::ScopedChanges { epoch, .. }
            | Downlink::Scope { epoch, .. }
            | Downlink::Follow { epoch, .. }
            | Downlink::SnapshotSize { epoch, .. }
            | Downlink::Snapshot { epoch, .. }
            | Downlink::Feed { epoch, .. } => Some(*epoch),
            Downlink::Schema { .. }
            | Downlink::SlowDown { .. }
            | Downlink::LegacyAck { .. }
            | Downlink::LegacyNack { .. }
            | Downlink::LegacyChanges { .. }
            | Downlink::LegacySnapshot { .. } => None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Downlink::Welcome { epoch, node_counter, device_seq, node_elsewhere } => {
                w.u8(tag::WELCOME);
                w.epoch(epoch);
                w.varint(*node_counter);
                w.zigzag(*device_seq);
                w.u8(u8::from(*node_elsewhere));
            }
            Downlink::Ack { epoch, id, first_seq, last_seq, refused, receipt, previous } => {
                w.u8(tag::ACK);
                w.epoch(epoch);
                w.varint(*id);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.varint(refused.len() as u64);
                for row in refused {
                    w.varint(u64::from(row.index));
                    w.bytes(row.reason.as_bytes());
                }
                w.opt_cursor(receipt);
                w.opt_cursor(previous);
            }
            Downlink::Nack { epoch, id, first_seq, last_seq, reason } => {
                w.u8(tag::NACK);
                w.epoch(epoch);
                w.varint(*id);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.bytes(reason.as_bytes());
            }
            Downlink::Changes { epoch, from, cursor, more, echo, batch } => {
                w.u8(if echo.is_some() { tag::CHANGES_ECHO } else { tag::CHANGES });
                w.epoch(epoch);
                w.opt_echo(echo);
                w.varint(*from);
                w.cursor(cursor);
                w.u8(u8::from(*more));
                w.raw(batch);
            }
            Downlink::ScopedChanges { epoch, from, cursor, more, echo, evict, batch } => {
                w.u8(if echo.is_some() { tag::SCOPED_CHANGES_ECHO } else { tag::SCOPED_CHANGES });
                w.epoch(epoch);
                w.opt_echo(echo);
                w.varint(*from);
                w.cursor(cursor);
                w.u8(u8::from(*more));
                w.bytes(evict);
                w.raw(batch);
            }
            Downlink::Scope { epoch, version, tables } => {
                w.u8(tag::SCOPE);
                w.epoch(epoch);
                w.varint(*version);
                w.varint(tables.len() as u64);
                for t in tables {
                    w.bytes(t.as_bytes());
                }
            }
            Downlink::Follow { epoch, scope } => {
                w.u8(tag::FOLLOW);
                w.epoch(epoch);
                w.bytes(scope.as_bytes());
            }
            Downlink::SnapshotSize { epoch, rows, bytes } => {
                w.u8(tag::SNAPSHOT_SIZE);
                w.epoch(epoch);
                w.varint(*rows);
                w.varint(*bytes);
            }
            Downlink::Snapshot { epoch, from, echo, resume, log_cursor, done, batch } => {
                w.u8(match (echo, from) {
                    (Some(_), _) => tag::SNAPSHOT_ECHO,
                    (None, Some(_)) => tag::SNAPSHOT_FROM,
                    (None, None) => tag::SNAPSHOT,
                });
                w.epoch(epoch);
                w.opt_echo(echo);
                // Without `from`, a page is read from the start: an echoed page names it.
                if echo.is_some() || from.is_some() {
                    w.bytes(from.as_deref().unwrap_or_default());
                }
                w.bytes(resume);
                w.cursor(log_cursor);
                w.u8(u8::from(*done));
                w.raw(batch);
            }
            Downlink::Schema { version, text } => {
                w.u8(tag::SCHEMA);
                w.varint(*version);
                w.bytes(text.as_bytes());
            }
            Downlink::SlowDown { retry_after_ms } => {
                w.u8(tag::SLOW_DOWN);
                w.varint(*retry_after_ms);
            }
            Downlink::Feed { epoch, scope, previous, cursor, origin, batch, evict } => {
                // Tag 12 has no room for evictions; a change without any stays readable by
                // devices that predate them.
                w.u8(if evict.is_empty() { tag::FEED } else { tag::SCOPED_FEED });
                w.epoch(epoch);
                w.bytes(scope.as_bytes());
                w.cursor(previous);
                w.cursor(cursor);
                w.bytes(origin.as_bytes());
                if !evict.is_empty() {
                    w.bytes(evict);
                }
                w.raw(batch);
            }
            Downlink::LegacyAck { first_seq, last_seq } => {
                w.u8(tag::LEGACY_ACK);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
            }
            Downlink::LegacyNack { first_seq, last_seq, reason } => {
                w.u8(tag::LEGACY_NACK);
                w.zigzag(*first_seq);
                w.zigzag(*last_seq);
                w.bytes(reason.as_bytes());
            }
            Downlink::LegacyChanges { cursor, more, batch } => {
                w.u8(tag::LEGACY_CHANGES);
                w.varint(*cursor);
                w.u8(u8::from(*more));
                w.raw(batch);
            }
            Downlink::LegacySnapshot { resume, log_cursor, done, batch } => {
                w.u8(tag::LEGACY_SNAPSHOT);
                w.bytes(resume);
                w.varint(*log_cursor);
                w.u8(u8::from(*done));
                w.raw(batch);
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Downlink, DecodeError> {
        let mut r = Reader::new(bytes, limits);
        let msg = match r.u8()? {
            tag::WELCOME => Downlink::Welcome {
                epoch: r.epoch()?,
                node_counter: r.varint()?,
                device_seq: r.zigzag()?,
                node_elsewhere: r.flag()?,
            },
            tag::ACK => {
                let (epoch, id, first_seq, last_seq) = (r.epoch()?, r.varint()?, r.zigzag()?, r.zigzag()?);
                let n = r.count(limits.max_rows, "refused rows")?;
                let mut refused = Vec::with_capacity(n);
                for _ in 0..n {
                    let index = r.u32("refused row index out of range")?;
                    refused.push(RefusedRow { index, reason: r.string(MAX_TOKEN, "refusal reason bytes")? });
                }
                let (receipt, previous) = (r.opt_cursor()?, r.opt_cursor()?);
                Downlink::Ack { epoch, id, first_seq, last_seq, refused, receipt, previous }
            }
            tag::NACK => Downlink::Nack {
                epoch: r.epoch()?,
                id: r.varint()?,
                first_seq: r.zigzag()?,
                last_seq: r.zigzag()?,
                reason: r.string(MAX_TOKEN, "nack reason bytes")?,
            },
            t @ (tag::CHANGES | tag::CHANGES_ECHO) => {
                let epoch = r.epoch()?;
                let echo = if t == tag::CHANGES_ECHO { Some(r.varint()?) } else { None };
                let from = r.varint()?;
                let cursor = r.cursor()?;
                let more = r.flag()?;
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Downlink::Changes { epoch, from, cursor, more, echo, batch });
            }
            t @ (tag::SCOPED_CHANGES | tag::SCOPED_CHANGES_ECHO) => {
                let epoch = r.epoch()?;
                let echo = if t == tag::SCOPED_CHANGES_ECHO { Some(r.varint()?) } else { None };
                let from = r.varint()?;
                let cursor = r.cursor()?;
                let more = r.flag()?;
                let evict = r.bytes(limits.max_decompressed, "evicted keys")?.to_vec();
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Downlink::ScopedChanges { epoch, from, cursor, more, echo, evict, batch });
            }
            tag::SCOPE => {
                let (epoch, version) = (r.epoch()?, r.varint()?);
                let n = r.count(limits.max_tables, "scoped tables")?;
                let mut tables = Vec::with_capacity(n);
                for _ in 0..n {
                    tables.push(r.string(limits.max_name_bytes, "table name bytes")?);
                }
                Downlink::Scope { epoch, version, tables }
            }
            tag::FOLLOW => Downlink::Follow { epoch: r.epoch()?, scope: r.string(MAX_ID, "scope name bytes")? },
            tag::SNAPSHOT_SIZE => Downlink::SnapshotSize { epoch: r.epoch()?, rows: r.varint()?, bytes: r.varint()? },
            t @ (tag::SNAPSHOT | tag::SNAPSHOT_FROM | tag::SNAPSHOT_ECHO) => {
                let epoch = r.epoch()?;
                let echo = if t == tag::SNAPSHOT_ECHO { Some(r.varint()?) } else { None };
                let from = match t {
                    tag::SNAPSHOT => None,
                    _ => Some(r.bytes(MAX_TOKEN, "snapshot resume token")?.to_vec()),
                };
                let resume = r.bytes(MAX_TOKEN, "snapshot resume token")?.to_vec();
                let log_cursor = r.cursor()?;
                let done = r.flag()?;
                return Ok(Downlink::Snapshot {
                    epoch,
                    from,
                    echo,
                    resume,
                    log_cursor,
                    done,
                    batch: r.take(r.remaining())?.to_vec(),
                });
            }
            tag::SCHEMA => {
                Downlink::Schema { version: r.varint()?, text: r.string(MAX_SCHEMA_BYTES, "schema text bytes")? }
            }
            tag::SLOW_DOWN => Downlink::SlowDown { retry_after_ms: r.varint()? },
            t @ (tag::FEED | tag::SCOPED_FEED) => {
                let epoch = r.epoch()?;
                let scope = r.string(MAX_ID, "scope name bytes")?;
                let previous = r.cursor()?;
                let cursor = r.cursor()?;
                let origin = r.string(MAX_ID, "origin device bytes")?;
                let evict = match t {
                    tag::SCOPED_FEED => r.bytes(limits.max_decompressed, "evicted keys")?.to_vec(),
                    _ => Vec::new(),
                };
                let batch = r.take(r.remaining())?.to_vec();
                return Ok(Downlink::Feed { epoch, scope, previous, cursor, origin, batch, evict });
            }
            tag::LEGACY_ACK => Downlink::LegacyAck { first_seq: r.zigzag()?, last_seq: r.zigzag()? },
            tag::LEGACY_NACK => Downlink::LegacyNack {
                first_seq: r.zigzag()?,
                last_seq: r.zigzag()?,
                reason: r.string(MAX_TOKEN, "nack reason bytes")?,
            },
            tag::LEGACY_CHANGES => {
                let cursor = r.varint()?;
                let more = r.flag()?;
                return Ok(Downlink::LegacyChanges { cursor, more, batch: r.take(r.remaining())?.to_vec() });
            }
            tag::LEGACY_SNAPSHOT => {
                let resume = r.bytes(MAX_TOKEN, "snapshot resume token")?.to_vec();
                let log_cursor = r.varint()?;
                let done = r.flag()?;
                return Ok(Downlink::LegacySnapshot {
                    resume,
                    log_cursor,
                    done,
                    batch: r.take(r.remaining())?.to_vec(),
                });
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}
