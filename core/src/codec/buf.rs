//! Byte-level building blocks: LEB128 varints, zigzag integers and a bounds-checked reader.

use super::{DecodeError, Limits};

/// An append-only output buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, b: u8) {
        self.buf.push(b);
    }

    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    pub(crate) fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// A cursor over untrusted bytes. Every read checks bounds, and every count is checked
/// against both a limit and the bytes left, so nothing allocates more than the input justifies.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    pub(crate) limits: &'a Limits,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8], limits: &'a Limits) -> Reader<'a> {
        Reader { data, pos: 0, limits }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.data.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::VarintOverflow)
    }

    pub(crate) fn zigzag(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub(crate) fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(DecodeError::LimitExceeded { what, limit: max as u64, found: len });
        }
        self.take(len as usize)
    }

    pub(crate) fn string(&mut self, max: usize, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(max, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// An item count, refused if it exceeds `max` or if even one byte per item would overrun
    /// the input (so a forged count cannot make us reserve memory).
    pub(crate) fn count(&mut self, max: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(DecodeError::LimitExceeded { what, limit: max as u64, found: n });
        }
        if n > self.remaining() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 { Ok(()) } else { Err(DecodeError::TrailingBytes(self.remaining())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_extremes() {
        let limits = Limits::default();
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut w = Writer::default();
            w.varint(v);
            let mut r = Reader::new(&w.buf, &limits);
            assert_eq!(r.varint(), Ok(v));
            r.finish().expect("fully consumed");
        }
        for v in [0, -1, 1, i64::MIN, i64::MAX] {
            let mut w = Writer::default();
            w.zigzag(v);
            assert_eq!(Reader::new(&w.buf, &limits).zigzag(), Ok(v));
        }
    }

    #[test]
    fn overlong_varint_is_refused() {
        let limits = Limits::default();
        let bytes = [0xffu8; 11];
        assert_eq!(Reader::new(&bytes, &limits).varint(), Err(DecodeError::VarintOverflow));
        let mut ten = [0xffu8; 10];
        ten[9] = 0x02;
        assert_eq!(Reader::new(&ten, &limits).varint(), Err(DecodeError::VarintOverflow));
    }

    #[test]
    fn forged_count_larger_than_input_is_refused() {
        let limits = Limits::default();
        let mut w = Writer::default();
        w.varint(1_000);
        assert_eq!(Reader::new(&w.buf, &limits).count(1_000_000, "rows"), Err(DecodeError::Truncated));
    }
}
