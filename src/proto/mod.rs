//! Pure protocol code: bytes in, bytes out.
//!
//! Nothing here touches a socket, reads a clock or allocates per frame. Encoders (internal: the
//! client's command layer, `wire`, is their one user) append to a caller-owned `Vec<u8>` (which only grows the first times it is used) and cannot fail: every
//! input was validated when its type was built ([`Key::new`]). Parsers take whatever bytes have
//! arrived and return [`Status::Partial`] ("call again with more") or
//! [`Status::Complete`]`((consumed, response))`, where the response borrows from the input.
//! Incomplete input is not an error.
//!
//! The same parse functions are what the fuzz targets call.

pub mod binary;
pub mod cluster;
pub mod meta;
pub mod text;
pub(crate) mod wire;

pub use wire::{Protocol, SetOutcome, StoreMode};

use std::fmt;

/// The longest key memcached accepts (protocol.txt, "Keys").
pub const MAX_KEY_LEN: usize = 250;

/// The result of feeding bytes to a parser: complete, or in need of more input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole reply was parsed.
    Complete(T),
    /// The input ends before the reply does: call again with more bytes.
    Partial,
}

impl<T> Status<T> {
    /// True if the reply was complete.
    pub fn is_complete(&self) -> bool {
        matches!(self, Status::Complete(_))
    }

    /// Maps a complete result, keeping `Partial`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Status<U> {
        match self {
            Status::Complete(t) => Status::Complete(f(t)),
            Status::Partial => Status::Partial,
        }
    }

    /// Converts to an `Option`, `None` for `Partial`.
    pub fn complete(self) -> Option<T> {
        match self {
            Status::Complete(t) => Some(t),
            Status::Partial => None,
        }
    }
}

/// Why a server reply could not be parsed. Small and `Copy`: the caller adds context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A reply line is longer than any valid reply line can be.
    #[error("reply line longer than {0} bytes")]
    LineTooLong(usize),
    /// A line ended with a bare `\n` instead of `\r\n`.
    #[error("reply line not terminated by \\r\\n")]
    BadLineEnding,
    /// The first word of the line is not a reply this protocol knows.
    #[error("unknown reply")]
    UnknownReply,
    /// A reply line has the wrong number or shape of fields.
    #[error("malformed reply line")]
    BadFormat,
    /// A number sent by the server is not a decimal that fits its field.
    #[error("invalid number in reply")]
    BadNumber,
    /// The server claims a value longer than the configured maximum.
    #[error("server claims a {0}-byte value, above the configured maximum")]
    ValueTooLarge(u64),
    /// A data block is not followed by `\r\n` where its length says it ends.
    #[error("data block not terminated by \\r\\n")]
    BadDataTerminator,
    /// A reply that is valid on its own arrived where it cannot answer the request sent.
    #[error("reply does not match the request")]
    Unexpected,
    /// A binary response does not start with the response magic byte 0x81.
    #[error("binary response with a bad magic byte")]
    BadMagic,
}

/// Limits the parser enforces before reserving anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest value (data block) accepted from the server.
    pub max_value: usize,
}

impl Default for Limits {
    /// memcached's default item size limit, 1 MiB.
    fn default() -> Self {
        Limits {
            max_value: 1024 * 1024,
        }
    }
}

/// Why a key was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Keys must have at least one byte.
    #[error("invalid key: empty")]
    Empty,
    /// Keys may be at most 250 bytes long.
    #[error("invalid key: {0} bytes long, the maximum is 250")]
    TooLong(usize),
    /// A binary key (one with whitespace or control bytes), which the meta protocol sends
    /// base64-encoded, may be at most 186 bytes: its 248-byte encoding must fit in 250.
    #[error("invalid key: a binary key (sent base64-encoded) may be at most 186 bytes, this one has {0}")]
    BinaryTooLong(usize),
    /// Keys may not contain whitespace or control bytes (<= 0x20 or 0x7f): such a byte would
    /// end the key on the wire and let the rest be read as another command.
    #[error("invalid key: byte 0x{byte:02x} at offset {offset} (whitespace and control bytes are not allowed)")]
    BadByte {
        /// The offending byte.
        byte: u8,
        /// Where it is in the key.
        offset: usize,
    },
}

/// A key valid for the text protocol: 1 to 250 bytes, none of them whitespace or control.
///
/// Borrowed, so building one allocates nothing.
///
/// ```
/// use mcstore::{Key, KeyError};
/// assert!(Key::new(b"user:42").is_ok());
/// assert_eq!(Key::new(b""), Err(KeyError::Empty));
/// assert_eq!(Key::new(b"a b"), Err(KeyError::BadByte { byte: b' ', offset: 1 }));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    bytes: &'a [u8],
    /// The bytes are the base64 form of a binary key (meta protocol `b` flag).
    base64: bool,
}

impl<'a> Key<'a> {
    /// Validates `bytes` as a key (protocol.txt, "Keys": at most 250 characters, no control
    /// characters or whitespace).
    ///
    /// # Errors
    /// [`KeyError`] says which rule the bytes break.
    // Always: every call validates its key, and a call through the fleet layer added a
    // caller that tipped the heuristic (+26 instructions per `set`).
    #[inline(always)]
    pub fn new(bytes: &'a [u8]) -> Result<Key<'a>, KeyError> {
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(bytes.len()));
        }
        if let Some(offset) = find_control(bytes) {
            return Err(KeyError::BadByte {
                byte: bytes[offset],
                offset,
            });
        }
        Ok(Key {
            bytes,
            base64: false,
        })
    }

    /// A key already validated by [`Key::new`] (e.g. earlier in the same multi-key call).
    pub(crate) fn trusted(bytes: &'a [u8]) -> Key<'a> {
        debug_assert!(Key::new(bytes).is_ok());
        Key {
            bytes,
            base64: false,
        }
    }

    /// A base64 token standing for a binary key (built by [`meta::binary_key`]).
    pub(crate) fn base64_token(token: &'a [u8]) -> Key<'a> {
        debug_assert!(Key::new(token).is_ok());
        Key {
            bytes: token,
            base64: true,
        }
    }

    /// The key's bytes as they go on the wire (the base64 token for a binary key).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// True if this is the base64 form of a binary key, which only the meta protocol can
    /// send (with its `b` flag).
    pub fn is_base64(&self) -> bool {
        self.base64
    }
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Valid keys are printable ASCII or high bytes; show them escaped either way.
        let b64 = if self.base64 { " base64" } else { "" };
        write!(f, "Key(\"{}\"{b64})", self.bytes.escape_ascii())
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Bit 7 of each byte of the result is set for the first byte of `x` that is zero (and maybe
/// for later ones: the lowest set bit is exact). Eight bytes per step instead of one.
#[inline]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(LO) & !x & HI
}

/// The first byte of `b` that may not appear in a key (<= 0x20 or 0x7f).
#[inline(always)]
fn find_control(b: &[u8]) -> Option<usize> {
    // Bytes below 0x21 (the subtraction borrows; high bytes are excluded by `!x`), or 0x7f.
    let bad = |x: u64| x.wrapping_sub(LO * 0x21) & !x & HI | zero_bytes(x ^ (LO * 0x7f)) != 0;
    let slow = |from: usize| {
        b[from..]
            .iter()
            .position(|&v| v <= b' ' || v == 0x7f)
            .map(|p| from + p)
    };
    let mut chunks = b.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        if bad(u64::from_le_bytes(c.try_into().expect("8 bytes"))) {
            return slow(i * 8);
        }
    }
    let tail = chunks.remainder().len();
    if tail == 0 {
        return None;
    }
    if b.len() >= 8 {
        // The last 8 bytes overlap checked ones: one word instead of a byte loop.
        let last = u64::from_le_bytes(b[b.len() - 8..].try_into().expect("8 bytes"));
        return if bad(last) {
            slow(b.len() - tail)
        } else {
            None
        };
    }
    slow(0)
}

// Line framing, shared by the text and meta protocols.

/// Longest reply line accepted (without its `\r\n`). The longest valid one is a `VALUE` line:
/// `VALUE ` + 250-byte key + flags + length + cas, about 320 bytes; `STAT` lines of
/// `stats settings` are shorter still. Anything longer is garbage, rejected before it is buffered.
pub const MAX_LINE: usize = 2048;

/// What follows a data block on the wire (text and meta).
pub const DATA_TRAILER: &[u8] = b"\r\n";

/// Finds the first line of `buf`: `Ok(Some((line_without_crlf, bytes_with_crlf)))`, `Ok(None)`
/// if no full line has arrived yet.
pub(crate) fn take_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ParseError> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    match find_byte(window, b'\n') {
        Some(nl) => {
            if nl == 0 || buf[nl - 1] != b'\r' {
                return Err(ParseError::BadLineEnding);
            }
            Ok(Some((&buf[..nl - 1], nl + 1)))
        }
        None if window.len() > MAX_LINE + 1 => Err(ParseError::LineTooLong(MAX_LINE)),
        None => Ok(None),
    }
}

/// Splits `line` at its first space: `(word, rest)`; `rest` is empty when there is no space.
pub(crate) fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    match find_byte(line, b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

/// The position of the first `needle` in `haystack`, eight bytes per step.
#[inline]
pub(crate) fn find_byte(haystack: &[u8], needle: u8) -> Option<usize> {
    let pattern = LO * u64::from(needle);
    let mut chunks = haystack.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes")) ^ pattern;
        let m = zero_bytes(x);
        if m != 0 {
            return Some(i * 8 + (m.trailing_zeros() / 8) as usize);
        }
    }
    let base = haystack.len() - chunks.remainder().len();
    chunks
        .remainder()
        .iter()
        .position(|&v| v == needle)
        .map(|p| base + p)
}

/// `a == b`, for the short slices keys are: word compares (the last one overlapping) where
/// a call to `memcmp` would cost more than the compare itself.
pub(crate) fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n < 8 {
        return a == b;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let mut at = 0;
    while at + 8 < n {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    word(a, n - 8) == word(b, n - 8)
}

/// The decimal number of 1 to 19 digits at `from` (19 digits cannot overflow a u64), and
/// where it ends.
#[inline(always)]
pub(crate) fn digits(b: &[u8], from: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    let mut p = from;
    while let Some(&d) = b.get(p) {
        if !d.is_ascii_digit() {
            break;
        }
        if p - from == 19 {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
        p += 1;
    }
    (p > from).then_some((n, p))
}

/// `10^k` for `k` in `0..20` (`10^0` unused).
const POW10: [u64; 20] = {
    let mut t = [1u64; 20];
    let mut k = 1;
    while k < 20 {
        t[k] = t[k - 1] * 10;
        k += 1;
    }
    t
};

/// Two decimal digits per entry, `00` to `99`.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// Appends the decimal form of `n` to `out` without going through `fmt`. Every request
/// carries a few numbers (lengths, flags, opaques), so this is written for speed: two
/// digits per division, and a copy of constant size (inlined, where a copy of the digits'
/// length is a `memcpy` call) that is then cut to length.
#[inline]
pub(crate) fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut len = 1;
    while len < 20 && n >= POW10[len] {
        len += 1;
    }
    let mut tmp = [0u8; 20];
    let mut i = len;
    while n >= 100 {
        let d = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        tmp[i..i + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    }
    if n >= 10 {
        let d = n as usize * 2;
        tmp[..2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    } else {
        tmp[0] = b'0' + n as u8;
    }
    let start = out.len();
    out.extend_from_slice(&tmp);
    out.truncate(start + len);
}

/// Parses an unsigned decimal with no sign, no spaces and at most `max` as its value.
/// Digit count is capped by the type, and the arithmetic is checked.
pub(crate) fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_eq_is_eq() {
        let base: Vec<u8> = (0..40u8).collect();
        for n in 0..base.len() {
            let a = &base[..n];
            assert!(short_eq(a, a));
            assert!(!short_eq(a, &base[..n + 1]));
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!short_eq(a, &b), "differs at {at} of {n}");
            }
        }
    }

    #[test]
    fn key_rules() {
        assert!(Key::new(&[b'k'; 250]).is_ok());
        assert_eq!(Key::new(&[b'k'; 251]), Err(KeyError::TooLong(251)));
        assert_eq!(Key::new(b""), Err(KeyError::Empty));
        for bad in [0u8, b'\t', b'\r', b'\n', b' ', 0x7f, 0x1f] {
            let k = [b'a', bad, b'b'];
            assert_eq!(
                Key::new(&k),
                Err(KeyError::BadByte {
                    byte: bad,
                    offset: 1
                })
            );
        }
        // Bytes above 0x7f are not control bytes; memcached accepts them.
        assert!(Key::new("ключ".as_bytes()).is_ok());
        let msg = KeyError::BadByte {
            byte: b' ',
            offset: 3,
        }
        .to_string();
        assert!(msg.contains("0x20") && msg.contains("offset 3"), "{msg}");
    }

    proptest::proptest! {
        #[test]
        fn fast_scans_match_the_plain_ones(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), needle in proptest::prelude::any::<u8>()) {
            proptest::prop_assert_eq!(find_byte(&v, needle), v.iter().position(|&b| b == needle));
            proptest::prop_assert_eq!(find_control(&v), v.iter().position(|&b| b <= b' ' || b == 0x7f));
        }
    }

    #[test]
    fn decimal_round_trip() {
        for n in [
            0u64,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut v = Vec::new();
            put_u64(&mut v, n);
            assert_eq!(v, n.to_string().as_bytes());
            assert_eq!(parse_u64(&v), Some(n));
        }
        // Every length, at its edges, after bytes already in the buffer.
        for k in 0..20 {
            let p = 10u64.pow(k);
            for n in [
                p - 1,
                p,
                p + 1,
                p.saturating_mul(10) - 1,
                p.saturating_mul(7) - 3,
            ] {
                let mut v = b"x ".to_vec();
                put_u64(&mut v, n);
                assert_eq!(v, format!("x {n}").as_bytes());
            }
        }
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"000000000000000000001"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b"1 "), None);
    }
}
