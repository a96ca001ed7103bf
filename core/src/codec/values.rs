//! SQLite values on the wire: one tag byte, then the payload.
//!
//! Canonical UUID text (the usual primary key) travels as 16 bytes plus a tag saying which
//! letter case to restore, so it decodes to exactly the same string.

use super::DecodeError;
use super::buf::{Reader, Writer};
use crate::value::Value;

const NULL: u8 = 0;
const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;
const UUID_LOWER: u8 = 5;
const UUID_UPPER: u8 = 6;
const RAW_TEXT: u8 = 7;
/// Tags fit in three bits so entry headers can share a byte with flags.
pub(crate) const TAG_BITS: u32 = 3;

/// Which letter case a canonical UUID string uses, if it is one.
fn uuid_case(s: &str) -> Option<u8> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let (mut lower, mut upper) = (false, false);
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        match c {
            b'0'..=b'9' => {}
            b'a'..=b'f' => lower = true,
            b'A'..=b'F' => upper = true,
            _ => return None,
        }
    }
    match (lower, upper) {
        (true, true) => None,
        (false, true) => Some(UUID_UPPER),
        _ => Some(UUID_LOWER),
    }
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// The tag a value will be written with.
pub(crate) fn tag(v: &Value) -> u8 {
    match v {
        Value::Null => NULL,
        Value::Integer(_) => INTEGER,
        Value::Real(_) => REAL,
        Value::Text(s) => uuid_case(s).unwrap_or(TEXT),
        Value::Blob(_) => BLOB,
        Value::RawText(_) => RAW_TEXT,
    }
}

/// Writes the payload of `v`, whose tag `tag(v)` the caller has already written.
pub(crate) fn write_payload(w: &mut Writer, v: &Value) {
    match v {
        Value::Null => {}
        Value::Integer(i) => w.zigzag(*i),
        Value::Real(r) => w.raw(&r.to_bits().to_le_bytes()),
        Value::Text(s) => match uuid_case(s) {
            Some(_) => {
                let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
                let packed: Vec<u8> = hex.chunks(2).map(|p| (hex_val(p[0]) << 4) | hex_val(p[1])).collect();
                w.raw(&packed);
            }
            None => w.bytes(s.as_bytes()),
        },
        Value::Blob(b) | Value::RawText(b) => w.bytes(b),
    }
}

pub(crate) fn write_value(w: &mut Writer, v: &Value) {
    w.u8(tag(v));
    write_payload(w, v);
}

pub(crate) fn read_payload(r: &mut Reader<'_>, tag: u8) -> Result<Value, DecodeError> {
    let max = r.limits.max_value_bytes;
    Ok(match tag {
        NULL => Value::Null,
        INTEGER => Value::Integer(r.zigzag()?),
        REAL => {
            let b = r.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Value::Real(f64::from_bits(u64::from_le_bytes(a)))
        }
        TEXT => Value::Text(r.string(max, "text value bytes")?),
        BLOB => Value::Blob(r.bytes(max, "blob value bytes")?.to_vec()),
        RAW_TEXT => {
            let bytes = r.bytes(max, "text value bytes")?;
            // Valid UTF-8 under this tag could only come from a forged batch; it would make
            // two equal values compare unequal, so it is refused.
            if std::str::from_utf8(bytes).is_ok() {
                return Err(DecodeError::Invalid("text tagged as not UTF-8 is valid UTF-8"));
            }
            Value::RawText(bytes.to_vec())
        }
        UUID_LOWER | UUID_UPPER => {
            let digits: &[u8; 16] = if tag == UUID_LOWER { b"0123456789abcdef" } else { b"0123456789ABCDEF" };
            let mut s = String::with_capacity(36);
            for (i, byte) in r.take(16)?.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    s.push('-');
                }
                s.push(digits[usize::from(byte >> 4)] as char);
                s.push(digits[usize::from(byte & 0xf)] as char);
            }
            Value::Text(s)
        }
        other => return Err(DecodeError::UnknownTag(other)),
    })
}

pub(crate) fn read_value(r: &mut Reader<'_>) -> Result<Value, DecodeError> {
    let tag = r.u8()?;
    read_payload(r, tag)
}

/// Encodes a primary key tuple as the byte key the store indexes rows by.
pub fn encode_key(values: &[Value]) -> Vec<u8> {
    let mut w = Writer::default();
    for v in values {
        write_value(&mut w, v);
    }
    w.buf
}

/// Decodes a key made by [`encode_key`].
pub fn decode_key(bytes: &[u8], limits: &super::Limits) -> Result<Vec<Value>, DecodeError> {
    let mut r = Reader::new(bytes, limits);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        if out.len() >= limits.max_key_values {
            return Err(DecodeError::LimitExceeded {
                what: "primary key values",
                limit: limits.max_key_values as u64,
                found: out.len() as u64 + 1,
            });
        }
        out.push(read_value(&mut r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Limits;

    #[test]
    fn uuid_text_is_packed_and_restored_exactly() {
        for s in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0F8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            let key = encode_key(&[Value::Text(s.into())]);
            let back = decode_key(&key, &Limits::default()).expect("decodes");
            assert_eq!(back, vec![Value::Text(s.into())]);
        }
        assert_eq!(encode_key(&[Value::Text("0f8fad5b-d9cb-469f-a165-70867728950e".into())]).len(), 17);
    }
}
