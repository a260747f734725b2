//! The binary protocol (`../shared/reference/binary-protocol.md`).
//!
//! Every packet is a 24-byte big-endian header and a body of extras, key and value. Requests
//! are encoded into a caller-owned buffer (the value of a storage request is sent separately,
//! so large values are not copied). Responses are parsed by [`parse_reply`], which checks
//! every header field before trusting it: the magic, the data type, that extras and key fit in
//! the body, and that the body is not larger than the configured maximum (so a server claiming
//! 4 GiB makes no buffer grow).
//!
//! ```
//! use mcstore::proto::{Limits, Status, binary::{self, Opcode, parse_reply}};
//! // A Get hit as memcached 1.6.18 sends it (reference, section 8.2).
//! let hit = b"\x81\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x09\xca\xfe\xba\xbe\
//!             \x00\x00\x00\x00\x00\x00\x00\x07\xde\xad\xbe\xefWorld";
//! let Status::Complete((n, p)) = parse_reply(&hit[..], &Limits::default()).unwrap() else { panic!() };
//! assert_eq!((n, p.opcode, p.status, p.opaque, p.cas), (33, Opcode::GET, binary::STATUS_OK, 0xcafebabe, 7));
//! assert_eq!((p.flags(), p.value), (Some(0xdeadbeef), &b"World"[..]));
//! ```

use super::{Key, Limits, ParseError, Status};

/// Request magic byte.
pub const REQUEST: u8 = 0x80;
/// Response magic byte.
pub const RESPONSE: u8 = 0x81;
/// Header length.
pub const HEADER_LEN: usize = 24;

/// An opcode (section 2). Quiet variants suppress uninteresting replies (section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(pub u8);

#[allow(missing_docs)]
impl Opcode {
    pub const GET: Opcode = Opcode(0x00);
    pub const SET: Opcode = Opcode(0x01);
    pub const ADD: Opcode = Opcode(0x02);
    pub const REPLACE: Opcode = Opcode(0x03);
    pub const DELETE: Opcode = Opcode(0x04);
    pub const INCREMENT: Opcode = Opcode(0x05);
    pub const DECREMENT: Opcode = Opcode(0x06);
    pub const QUIT: Opcode = Opcode(0x07);
    pub const FLUSH: Opcode = Opcode(0x08);
    pub const GETQ: Opcode = Opcode(0x09);
    pub const NOOP: Opcode = Opcode(0x0a);
    pub const VERSION: Opcode = Opcode(0x0b);
    pub const GETK: Opcode = Opcode(0x0c);
    pub const GETKQ: Opcode = Opcode(0x0d);
    pub const APPEND: Opcode = Opcode(0x0e);
    pub const PREPEND: Opcode = Opcode(0x0f);
    pub const STAT: Opcode = Opcode(0x10);
    pub const SETQ: Opcode = Opcode(0x11);
    pub const ADDQ: Opcode = Opcode(0x12);
    pub const REPLACEQ: Opcode = Opcode(0x13);
    pub const DELETEQ: Opcode = Opcode(0x14);
    pub const INCREMENTQ: Opcode = Opcode(0x15);
    pub const DECREMENTQ: Opcode = Opcode(0x16);
    pub const QUITQ: Opcode = Opcode(0x17);
    pub const FLUSHQ: Opcode = Opcode(0x18);
    pub const APPENDQ: Opcode = Opcode(0x19);
    pub const PREPENDQ: Opcode = Opcode(0x1a);
    pub const TOUCH: Opcode = Opcode(0x1c);
    pub const GAT: Opcode = Opcode(0x1d);
    pub const GATQ: Opcode = Opcode(0x1e);
    pub const SASL_LIST: Opcode = Opcode(0x20);
    pub const SASL_AUTH: Opcode = Opcode(0x21);
    pub const SASL_STEP: Opcode = Opcode(0x22);
    pub const GATK: Opcode = Opcode(0x23);
    pub const GATKQ: Opcode = Opcode(0x24);

    /// The quiet variant of a storage, delete or arithmetic opcode (itself if none).
    pub fn quiet(self) -> Opcode {
        match self {
            Opcode::GET => Opcode::GETQ,
            Opcode::GETK => Opcode::GETKQ,
            Opcode::SET => Opcode::SETQ,
            Opcode::ADD => Opcode::ADDQ,
            Opcode::REPLACE => Opcode::REPLACEQ,
            Opcode::DELETE => Opcode::DELETEQ,
            Opcode::INCREMENT => Opcode::INCREMENTQ,
            Opcode::DECREMENT => Opcode::DECREMENTQ,
            Opcode::APPEND => Opcode::APPENDQ,
            Opcode::PREPEND => Opcode::PREPENDQ,
            Opcode::FLUSH => Opcode::FLUSHQ,
            Opcode::GAT => Opcode::GATQ,
            Opcode::GATK => Opcode::GATKQ,
            Opcode::QUIT => Opcode::QUITQ,
            other => other,
        }
    }
}

/// Response status codes (section 5).
#[allow(missing_docs)]
pub const STATUS_OK: u16 = 0x0000;
#[allow(missing_docs)]
pub const STATUS_NOT_FOUND: u16 = 0x0001;
#[allow(missing_docs)]
pub const STATUS_EXISTS: u16 = 0x0002;
#[allow(missing_docs)]
pub const STATUS_TOO_LARGE: u16 = 0x0003;
#[allow(missing_docs)]
pub const STATUS_INVALID_ARGUMENTS: u16 = 0x0004;
#[allow(missing_docs)]
pub const STATUS_NOT_STORED: u16 = 0x0005;
#[allow(missing_docs)]
pub const STATUS_NON_NUMERIC: u16 = 0x0006;
#[allow(missing_docs)]
pub const STATUS_AUTH_ERROR: u16 = 0x0020;
#[allow(missing_docs)]
pub const STATUS_AUTH_CONTINUE: u16 = 0x0021;
#[allow(missing_docs)]
pub const STATUS_UNKNOWN_COMMAND: u16 = 0x0081;
#[allow(missing_docs)]
pub const STATUS_OUT_OF_MEMORY: u16 = 0x0082;

/// A status code as a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusKind {
    /// No error.
    Ok,
    /// Key not found.
    NotFound,
    /// Key exists (CAS mismatch, add on an existing key).
    Exists,
    /// Value too large for the server.
    ValueTooLarge,
    /// Invalid arguments (the server then closes the connection).
    InvalidArguments,
    /// Item not stored.
    NotStored,
    /// Incr/decr on a non-numeric value.
    NonNumeric,
    /// Authentication failed (or flush disabled).
    AuthError,
    /// Authentication needs another step.
    AuthContinue,
    /// Unknown command.
    UnknownCommand,
    /// Out of memory.
    OutOfMemory,
    /// Any other code.
    Other(u16),
}

impl StatusKind {
    /// The type for a wire status code.
    pub fn from_code(code: u16) -> StatusKind {
        match code {
            STATUS_OK => StatusKind::Ok,
            STATUS_NOT_FOUND => StatusKind::NotFound,
            STATUS_EXISTS => StatusKind::Exists,
            STATUS_TOO_LARGE => StatusKind::ValueTooLarge,
            STATUS_INVALID_ARGUMENTS => StatusKind::InvalidArguments,
            STATUS_NOT_STORED => StatusKind::NotStored,
            STATUS_NON_NUMERIC => StatusKind::NonNumeric,
            STATUS_AUTH_ERROR => StatusKind::AuthError,
            STATUS_AUTH_CONTINUE => StatusKind::AuthContinue,
            STATUS_UNKNOWN_COMMAND => StatusKind::UnknownCommand,
            STATUS_OUT_OF_MEMORY => StatusKind::OutOfMemory,
            other => StatusKind::Other(other),
        }
    }
}

/// A response packet, borrowing its body from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The request's opcode, echoed.
    pub opcode: Opcode,
    /// The status code.
    pub status: u16,
    /// The request's opaque, echoed.
    pub opaque: u32,
    /// The item's CAS (0 when not applicable).
    pub cas: u64,
    /// Extras.
    pub extras: &'a [u8],
    /// Key (GetK/GetKQ/GATK hits, Stat names).
    pub key: &'a [u8],
    /// Value (item data, a version string, an error message).
    pub value: &'a [u8],
}

impl Packet<'_> {
    /// The 4-byte flags extra of a retrieval or touch reply.
    pub fn flags(&self) -> Option<u32> {
        self.extras.try_into().ok().map(u32::from_be_bytes)
    }

    /// The status as a type.
    pub fn status_kind(&self) -> StatusKind {
        StatusKind::from_code(self.status)
    }

    /// The big-endian u64 value of an increment/decrement reply.
    pub fn counter(&self) -> Option<u64> {
        self.value.try_into().ok().map(u64::from_be_bytes)
    }

    /// Encodes the packet as a server would send it (tests, fuzzing, the hostile server).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RESPONSE);
        out.push(self.opcode.0);
        out.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        out.push(self.extras.len() as u8);
        out.push(0);
        out.extend_from_slice(&self.status.to_be_bytes());
        let body = self.extras.len() + self.key.len() + self.value.len();
        out.extend_from_slice(&(body as u32).to_be_bytes());
        out.extend_from_slice(&self.opaque.to_be_bytes());
        out.extend_from_slice(&self.cas.to_be_bytes());
        out.extend_from_slice(self.extras);
        out.extend_from_slice(self.key);
        out.extend_from_slice(self.value);
    }
}

/// Slack allowed above `max_value` for extras and key in a response body.
const BODY_SLACK: usize = 4 + 250 + 16;

/// Parses one response packet from the start of `buf`.
///
/// # Errors
/// A bad magic byte, inconsistent lengths, or a body longer than `limits` allow.
#[inline]
pub fn parse_reply<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Status<(usize, Packet<'a>)>, ParseError> {
    if buf.is_empty() {
        return Ok(Status::Partial);
    }
    if buf[0] != RESPONSE {
        return Err(ParseError::BadMagic);
    }
    if buf.len() < HEADER_LEN {
        return Ok(Status::Partial);
    }
    let h = &buf[..HEADER_LEN];
    let keylen = u16::from_be_bytes([h[2], h[3]]) as usize;
    let extlen = h[4] as usize;
    if h[5] != 0 {
        return Err(ParseError::BadFormat);
    }
    let status = u16::from_be_bytes([h[6], h[7]]);
    let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    // Section 7: extras and key must fit in the body.
    if keylen + extlen > body {
        return Err(ParseError::BadFormat);
    }
    if body > limits.max_value.saturating_add(BODY_SLACK) {
        return Err(ParseError::ValueTooLarge(body as u64));
    }
    let total = HEADER_LEN + body;
    if buf.len() < total {
        return Ok(Status::Partial);
    }
    let opaque = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let cas = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
    let b = &buf[HEADER_LEN..total];
    Ok(Status::Complete((
        total,
        Packet {
            opcode: Opcode(h[1]),
            status,
            opaque,
            cas,
            extras: &b[..extlen],
            key: &b[extlen..extlen + keylen],
            value: &b[extlen + keylen..],
        },
    )))
}

/// Writes a request header for a body of `extras + key + value_len` bytes.
fn header(
    out: &mut Vec<u8>,
    op: Opcode,
    keylen: usize,
    extlen: usize,
    value_len: usize,
    opaque: u32,
    cas: u64,
) {
    // Built on the stack and appended at once: one capacity check instead of ten.
    let mut h = [0u8; HEADER_LEN];
    h[0] = REQUEST;
    h[1] = op.0;
    h[2..4].copy_from_slice(&(keylen as u16).to_be_bytes());
    h[4] = extlen as u8;
    // h[5]: data type raw; h[6..8]: vbucket 0.
    h[8..12].copy_from_slice(&((extlen + keylen + value_len) as u32).to_be_bytes());
    h[12..16].copy_from_slice(&opaque.to_be_bytes());
    h[16..24].copy_from_slice(&cas.to_be_bytes());
    out.extend_from_slice(&h);
}

/// Encodes a request with no value: header, `extras`, key.
pub(crate) fn encode_simple(
    out: &mut Vec<u8>,
    op: Opcode,
    key: Option<Key<'_>>,
    extras: &[u8],
    opaque: u32,
    cas: u64,
) {
    let k = key.map_or(&[][..], |k| k.as_bytes());
    header(out, op, k.len(), extras.len(), 0, opaque, cas);
    out.extend_from_slice(extras);
    out.extend_from_slice(k);
}

/// Encodes the header, extras and key of a Set/Add/Replace (flags and expiration extras) or
/// Append/Prepend (no extras) request for a value of `value_len` bytes; the caller sends the
/// value right after (there is no trailer in binary).
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_store(
    out: &mut Vec<u8>,
    op: Opcode,
    key: Key<'_>,
    flags: u32,
    exptime: u32,
    value_len: usize,
    opaque: u32,
    cas: u64,
) {
    let k = key.as_bytes();
    let with_extras = !matches!(
        op,
        Opcode::APPEND | Opcode::APPENDQ | Opcode::PREPEND | Opcode::PREPENDQ
    );
    let extlen = if with_extras { 8 } else { 0 };
    header(out, op, k.len(), extlen, value_len, opaque, cas);
    if with_extras {
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&exptime.to_be_bytes());
    }
    out.extend_from_slice(k);
}

/// Encodes Increment/Decrement (+Q). `exptime = 0xffffffff` means "fail if missing"
/// (section 4.5), which is how the text protocol behaves.
pub(crate) fn encode_arith(
    out: &mut Vec<u8>,
    op: Opcode,
    key: Key<'_>,
    delta: u64,
    initial: u64,
    exptime: u32,
    opaque: u32,
) {
    let mut extras = [0u8; 20];
    extras[..8].copy_from_slice(&delta.to_be_bytes());
    extras[8..16].copy_from_slice(&initial.to_be_bytes());
    extras[16..].copy_from_slice(&exptime.to_be_bytes());
    encode_simple(out, op, Some(key), &extras, opaque, 0);
}

/// Encodes a request with a 4-byte expiration extra (Touch, GAT*, Flush with a delay).
pub(crate) fn encode_with_exptime(
    out: &mut Vec<u8>,
    op: Opcode,
    key: Option<Key<'_>>,
    exptime: u32,
    opaque: u32,
) {
    encode_simple(out, op, key, &exptime.to_be_bytes(), opaque, 0);
}

/// Encodes a request whose key is arbitrary bytes (Stat group names, SASL mechanism names),
/// with a value.
pub(crate) fn encode_raw(out: &mut Vec<u8>, op: Opcode, key: &[u8], value: &[u8], opaque: u32) {
    header(out, op, key.len(), 0, value.len(), opaque, 0);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn lim() -> Limits {
        Limits { max_value: 1 << 20 }
    }

    /// (wire bytes, opcode, status, opaque, cas, extras, key, value)
    type Dump<'a> = (Vec<u8>, Opcode, u16, u32, u64, &'a [u8], &'a [u8], &'a [u8]);

    /// Requests and responses captured from memcached 1.6.18 (reference, section 8).
    #[test]
    fn reference_dumps() {
        let mut out = Vec::new();
        let k = Key::new(b"Hello").unwrap();
        encode_store(&mut out, Opcode::SET, k, 0xdeadbeef, 3600, 5, 0x11223344, 0);
        out.extend_from_slice(b"World");
        assert_eq!(out, hex("80 01 0005 08 00 0000 00000012 11223344 0000000000000000 deadbeef 00000e10 48656c6c6f 576f726c64"));
        out.clear();
        encode_simple(&mut out, Opcode::GET, Some(k), &[], 0xcafebabe, 0);
        assert_eq!(
            out,
            hex("80 00 0005 00 00 0000 00000005 cafebabe 0000000000000000 48656c6c6f")
        );
        out.clear();
        encode_arith(
            &mut out,
            Opcode::INCREMENT,
            Key::new(b"counter").unwrap(),
            1,
            0,
            7200,
            0,
        );
        assert_eq!(out, hex("80 05 0007 14 00 0000 0000001b 00000000 0000000000000000 0000000000000001 0000000000000000 00001c20 636f756e746572"));
        out.clear();
        encode_simple(&mut out, Opcode::VERSION, None, &[], 0, 0);
        assert_eq!(
            out,
            hex("80 0b 0000 00 00 0000 00000000 00000000 0000000000000000")
        );

        let cases: Vec<Dump<'_>> = vec![
            (hex("81 01 0000 00 00 0000 00000000 11223344 0000000000000007"), Opcode::SET, 0, 0x11223344, 7, b"", b"", b""),
            (hex("81 00 0000 04 00 0000 00000009 cafebabe 0000000000000007 deadbeef 576f726c64"), Opcode::GET, 0, 0xcafebabe, 7, &[0xde, 0xad, 0xbe, 0xef], b"", b"World"),
            (hex("81 00 0000 00 00 0001 00000009 00000000 0000000000000000 4e6f7420666f756e64"), Opcode::GET, 1, 0, 0, b"", b"", b"Not found"),
            (hex("81 0c 0005 04 00 0000 0000000e 00000000 0000000000000007 deadbeef 48656c6c6f 576f726c64"), Opcode::GETK, 0, 0, 7, &[0xde, 0xad, 0xbe, 0xef], b"Hello", b"World"),
            (hex("81 0c 0005 00 00 0001 00000005 00000000 0000000000000000 48656c6c6f"), Opcode::GETK, 1, 0, 0, b"", b"Hello", b""),
            (hex("81 0a 0000 00 00 0000 00000000 00000063 0000000000000000"), Opcode::NOOP, 0, 0x63, 0, b"", b"", b""),
            (hex("81 05 0000 00 00 0000 00000008 00000000 0000000000000008 0000000000000000"), Opcode::INCREMENT, 0, 0, 8, b"", b"", &[0; 8]),
            (hex("81 0b 0000 00 00 0000 00000006 00000000 0000000000000000 312e362e3138"), Opcode::VERSION, 0, 0, 0, b"", b"", b"1.6.18"),
        ];
        for (wire, op, status, opaque, cas, extras, key, value) in cases {
            let want = Packet {
                opcode: op,
                status,
                opaque,
                cas,
                extras,
                key,
                value,
            };
            assert_eq!(
                parse_reply(&wire, &lim()),
                Ok(Status::Complete((wire.len(), want)))
            );
            let mut enc = Vec::new();
            want.encode(&mut enc);
            assert_eq!(enc, wire);
            // Every strict prefix is Partial.
            for cut in 0..wire.len() {
                assert_eq!(
                    parse_reply(&wire[..cut], &lim()),
                    Ok(Status::Partial),
                    "cut {cut}"
                );
            }
        }
        // The pipelined multi-get of section 8.5, parsed as a stream split anywhere.
        let stream = hex("81 0d 0005 04 00 0000 0000000e 00000000 0000000000000007 deadbeef 48656c6c6f 576f726c64
                          81 0d 0007 04 00 0000 0000000c 00000002 000000000000000a 00000000 636f756e746572 30
                          81 0a 0000 00 00 0000 00000000 00000063 0000000000000000");
        for cut in 0..=stream.len() {
            let mut buf = stream[..cut].to_vec();
            let mut rest = &stream[cut..];
            let mut got = Vec::new();
            loop {
                match parse_reply(&buf, &lim()).unwrap() {
                    Status::Complete((n, p)) => {
                        got.push((p.opcode, p.opaque, p.key.to_vec()));
                        buf.drain(..n);
                    }
                    Status::Partial if rest.is_empty() => break,
                    Status::Partial => {
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                }
            }
            assert_eq!(
                got,
                vec![
                    (Opcode::GETKQ, 0, b"Hello".to_vec()),
                    (Opcode::GETKQ, 2, b"counter".to_vec()),
                    (Opcode::NOOP, 0x63, vec![])
                ]
            );
        }
    }

    #[test]
    fn malformed_headers() {
        let ok = hex("81 0a 0000 00 00 0000 00000000 00000063 0000000000000000");
        let mut bad_magic = ok.clone();
        bad_magic[0] = 0x80;
        assert_eq!(parse_reply(&bad_magic, &lim()), Err(ParseError::BadMagic));
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 OK\r\n", &lim()),
            Err(ParseError::BadMagic)
        );
        let mut datatype = ok.clone();
        datatype[5] = 1;
        assert_eq!(parse_reply(&datatype, &lim()), Err(ParseError::BadFormat));
        // keylen + extlen > bodylen.
        let short =
            hex("81 00 0005 04 00 0000 00000008 00000000 0000000000000000 0000000000000000");
        assert_eq!(parse_reply(&short, &lim()), Err(ParseError::BadFormat));
        // 4 GiB claimed, refused from the header alone.
        let huge = hex("81 00 0000 00 00 0000 ffffffff 00000000 0000000000000000");
        assert_eq!(
            parse_reply(&huge, &lim()),
            Err(ParseError::ValueTooLarge(0xffffffff))
        );
        assert_eq!(
            parse_reply(&huge[..24], &lim()),
            Err(ParseError::ValueTooLarge(0xffffffff))
        );
    }

    proptest! {
        #[test]
        fn round_trip(op in any::<u8>(), status in any::<u16>(), opaque in any::<u32>(), cas in any::<u64>(),
                      extras in prop::collection::vec(any::<u8>(), 0..20), key in prop::collection::vec(any::<u8>(), 0..250),
                      value in prop::collection::vec(any::<u8>(), 0..2000)) {
            let p = Packet { opcode: Opcode(op), status, opaque, cas, extras: &extras, key: &key, value: &value };
            let mut wire = Vec::new();
            p.encode(&mut wire);
            prop_assert_eq!(parse_reply(&wire, &lim()), Ok(Status::Complete((wire.len(), p))));
            prop_assert_eq!(parse_reply(&wire[..wire.len() - 1], &lim()), Ok(Status::Partial));
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(Status::Complete((n, _))) = parse_reply(&input, &lim()) {
                prop_assert!(n >= HEADER_LEN && n <= input.len());
            }
        }
    }
}
