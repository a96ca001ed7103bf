//! Just enough of MQTT 3.1.1's packets for the embedded broker's guard to authenticate a
//! connection and check the topics of what it publishes and subscribes to: framing, CONNECT
//! (read and rewritten with other credentials), PUBLISH's topic, SUBSCRIBE's filters, and the
//! acknowledgements the guard answers with itself. Sans-IO: bytes in, values out.

use thiserror::Error;

/// A packet kind, the high nibble of its first byte.
pub(super) const CONNECT: u8 = 1;
pub(super) const PUBLISH: u8 = 3;
pub(super) const SUBSCRIBE: u8 = 8;

/// CONNACK return codes (MQTT 3.1.1, 3.2.2.3).
pub(super) const REFUSED_PROTOCOL: u8 = 1;
pub(super) const REFUSED_UNAVAILABLE: u8 = 3;
pub(super) const REFUSED_LOGIN: u8 = 4;
pub(super) const REFUSED_NOT_AUTHORIZED: u8 = 5;

/// What a client sent that is not MQTT 3.1.1 as the guard reads it: the client's fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub(super) enum Malformed {
    #[error("remaining length longer than four bytes")]
    Length,
    #[error("packet of {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("packet ends early")]
    Short,
    #[error("string is not UTF-8")]
    Utf8,
    #[error("not MQTT 3.1.1 (protocol {0:?} level {1})")]
    Protocol(String, u8),
    #[error("first packet is not CONNECT")]
    NotConnect,
}

/// One whole packet as it came, first byte and remaining length included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    pub(super) bytes: Vec<u8>,
    body: usize,
}

impl Frame {
    /// A packet from its first byte and body.
    pub(super) fn new(first: u8, body: &[u8]) -> Frame {
        let mut bytes = vec![first];
        encode_length(body.len(), &mut bytes);
        let start = bytes.len();
        bytes.extend_from_slice(body);
        Frame { bytes, body: start }
    }

    /// A packet read as a header (first byte and length bytes) and a body.
    pub(super) fn from_parts(mut header: Vec<u8>, body: &[u8]) -> Frame {
        let start = header.len();
        header.extend_from_slice(body);
        Frame { bytes: header, body: start }
    }

    pub(super) fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }

    pub(super) fn flags(&self) -> u8 {
        self.bytes[0] & 0x0f
    }

    pub(super) fn body(&self) -> &[u8] {
        &self.bytes[self.body..]
    }
}

/// Adds one byte of a remaining length as it is read; `Ok(Some(n))` once it is complete.
pub(super) fn length_byte(so_far: &mut (usize, u32), byte: u8) -> Result<Option<usize>, Malformed> {
    let (value, shift) = so_far;
    if *shift >= 28 {
        return Err(Malformed::Length);
    }
    *value += usize::from(byte & 0x7f) << *shift;
    *shift += 7;
    Ok((byte & 0x80 == 0).then_some(*value))
}

fn encode_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed::Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u16()?;
        self.take(n.into())
    }

    fn string(&mut self) -> Result<String, Malformed> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Malformed::Utf8)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A CONNECT packet's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Connect {
    /// Connect flags less the username and password bits.
    flags: u8,
    keep_alive: u16,
    pub(super) client_id: String,
    /// Will topic and message.
    pub(super) will: Option<(String, Vec<u8>)>,
    pub(super) username: Option<String>,
    pub(super) password: Option<Vec<u8>>,
}

impl Connect {
    /// A clean-session CONNECT without will or login.
    pub(super) fn new(client_id: &str, keep_alive: u16) -> Connect {
        Connect { flags: 0x02, keep_alive, client_id: client_id.to_owned(), will: None, username: None, password: None }
    }

    pub(super) fn parse(frame: &Frame) -> Result<Connect, Malformed> {
        if frame.kind() != CONNECT {
            return Err(Malformed::NotConnect);
        }
        let mut r = Reader(frame.body());
        let protocol = String::from_utf8_lossy(r.bytes()?).into_owned();
        let level = r.u8()?;
        if protocol != "MQTT" || level != 4 {
            return Err(Malformed::Protocol(protocol, level));
        }
        let flags = r.u8()?;
        let keep_alive = r.u16()?;
        let client_id = r.string()?;
        let will = if flags & 0x04 != 0 { Some((r.string()?, r.bytes()?.to_vec())) } else { None };
        let username = if flags & 0x80 != 0 { Some(r.string()?) } else { None };
        let password = if flags & 0x40 != 0 { Some(r.bytes()?.to_vec()) } else { None };
        Ok(Connect { flags: flags & 0x3f, keep_alive, client_id, will, username, password })
    }

    /// Whether the client asks for a clean session (the broker keeps nothing for it).
    pub(super) fn clean_session(&self) -> bool {
        self.flags & 0x02 != 0
    }

    /// The same CONNECT asking the broker to keep its session.
    #[cfg(test)]
    pub(super) fn keeping_session(mut self) -> Connect {
        self.flags &= !0x02;
        self
    }

    /// The same CONNECT with these credentials instead of the client's.
    pub(super) fn with_login(&self, username: &str, password: &str) -> Frame {
        let login = Connect {
            username: Some(username.to_owned()),
            password: Some(password.as_bytes().to_vec()),
            ..self.clone()
        };
        login.encode()
    }

    pub(super) fn encode(&self) -> Frame {
        let mut flags = self.flags;
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(4);
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        put_bytes(&mut body, self.client_id.as_bytes());
        if let Some((topic, message)) = &self.will {
            put_bytes(&mut body, topic.as_bytes());
            put_bytes(&mut body, message);
        }
        if let Some(username) = &self.username {
            put_bytes(&mut body, username.as_bytes());
        }
        if let Some(password) = &self.password {
            put_bytes(&mut body, password);
        }
        Frame::new(CONNECT << 4, &body)
    }
}

/// A PUBLISH's topic, QoS and packet id (0 at QoS 0).
pub(super) fn publish(frame: &Frame) -> Result<(String, u8, u16), Malformed> {
    let qos = (frame.flags() >> 1) & 0x03;
    let mut r = Reader(frame.body());
    let topic = r.string()?;
    let id = if qos > 0 { r.u16()? } else { 0 };
    Ok((topic, qos, id))
}

/// A SUBSCRIBE's packet id and topic filters.
pub(super) fn subscribe(frame: &Frame) -> Result<(u16, Vec<String>), Malformed> {
    let mut r = Reader(frame.body());
    let id = r.u16()?;
    let mut filters = Vec::new();
    while !r.0.is_empty() {
        filters.push(r.string()?);
        r.u8()?;
    }
    Ok((id, filters))
}

pub(super) fn connack(code: u8) -> Frame {
    Frame::new(0x20, &[0, code])
}

pub(super) fn puback(id: u16) -> Frame {
    Frame::new(0x40, &id.to_be_bytes())
}

/// A SUBACK refusing each of `n` filters.
pub(super) fn suback_refused(id: u16, n: usize) -> Frame {
    let mut body = id.to_be_bytes().to_vec();
    body.extend(std::iter::repeat_n(0x80, n));
    Frame::new(0x90, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Frame {
        let mut length = (0, 0);
        let mut i = 1;
        let n = loop {
            if let Some(n) = length_byte(&mut length, bytes[i]).expect("length") {
                break n;
            }
            i += 1;
        };
        assert_eq!(bytes.len(), i + 1 + n);
        Frame::from_parts(bytes[..=i].to_vec(), &bytes[i + 1..])
    }

    #[test]
    fn a_connect_is_read_and_written_back_with_other_credentials() {
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.extend_from_slice(&[4, 0xc0 | 0x04 | 0x02, 0, 30]);
        for part in [&b"client-1"[..], b"will/topic", b"bye", b"acme/tab", b"secret"] {
            put_bytes(&mut body, part);
        }
        let frame = read(&Frame::new(0x10, &body).bytes);
        let connect = Connect::parse(&frame).expect("parse");
        assert_eq!(connect.client_id, "client-1");
        assert_eq!(connect.will, Some(("will/topic".into(), b"bye".to_vec())));
        assert_eq!(connect.username.as_deref(), Some("acme/tab"));
        assert_eq!(connect.password.as_deref(), Some(&b"secret"[..]));
        let again = Connect::parse(&connect.with_login("inside", "token")).expect("parse rewritten");
        assert_eq!(again.username.as_deref(), Some("inside"));
        assert_eq!(again.password.as_deref(), Some(&b"token"[..]));
        assert_eq!(
            (again.client_id, again.will, again.keep_alive, again.flags),
            (connect.client_id, connect.will, 30, connect.flags)
        );
    }

    #[test]
    fn lengths_round_trip_and_a_fifth_length_byte_is_refused() {
        for n in [0, 127, 128, 16_383, 16_384, 2_097_152, 268_435_455] {
            let frame = Frame::new(0x30, &vec![0; n]);
            let mut length = (0, 0);
            let got = frame.bytes[1..].iter().find_map(|b| length_byte(&mut length, *b).expect("length"));
            assert_eq!(got, Some(n));
        }
        let mut length = (0, 0);
        let fifth = [0xff, 0xff, 0xff, 0xff, 0x01].iter().try_for_each(|b| length_byte(&mut length, *b).map(|_| ()));
        assert_eq!(fifth, Err(Malformed::Length));
    }

    #[test]
    fn truncated_or_foreign_packets_are_errors_not_panics() {
        let connect = Frame::new(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 5, 0, 0, 10, 0, 0]);
        assert!(matches!(Connect::parse(&connect), Err(Malformed::Protocol(_, 5))));
        for cut in 0..12 {
            let short = Frame::new(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xc0, 0, 10, 0, 9][..cut]);
            assert!(Connect::parse(&short).is_err());
        }
        assert_eq!(Connect::parse(&Frame::new(0x30, &[])), Err(Malformed::NotConnect));
        assert_eq!(publish(&Frame::new(0x32, &[0, 1, b'a'])), Err(Malformed::Short));
        assert_eq!(subscribe(&Frame::new(0x82, &[0, 1, 0, 1, b'a'])), Err(Malformed::Short));
        let mut sub = vec![0, 7];
        put_bytes(&mut sub, b"x/y");
        sub.push(1);
        assert_eq!(subscribe(&Frame::new(0x82, &sub)), Ok((7, vec!["x/y".to_owned()])));
        assert_eq!(publish(&Frame::new(0x32, &[0, 1, b'a', 0, 9])), Ok(("a".to_owned(), 1, 9)));
    }
}
