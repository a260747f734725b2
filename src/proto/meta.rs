//! The meta protocol (`../shared/reference/protocol.txt`, "Meta Commands", stable since
//! memcached 1.6.10; what Debian's 1.6.18 accepts is in `meta-protocol-notes.md`).
//!
//! Requests: `<cm> <key> [<datalen>] <flag>*\r\n` (plus the data block for `ms`). Each flag is
//! one letter, optionally followed by its token. Encoders write the command line into a
//! caller-owned buffer; as with the text protocol, the caller sends an `ms` data block
//! followed by [`DATA_TRAILER`].
//!
//! Replies: `<RC> [<datalen>] <flag>*\r\n` (plus a data block after `VA`). [`parse_reply`]
//! parses one at a time into a [`Reply`], every returned flag into [`ReturnFlags`]. Flags are
//! read as a set, in any order (the server adds `W`, `X`, `Z`, `b` where it likes; notes §2),
//! and miss lines may carry flags too (`EN Oabc`, notes §3).
//!
//! # Quiet mode (`q`): what memcached 1.6.18 really sends
//!
//! `q` suppresses the *usual* reply only. Observed on Debian's 1.6.18 (each command followed
//! by `mn`; `O` is echoed on every reply that is sent):
//!
//! | command with `q` | no reply when | still answers |
//! |---|---|---|
//! | `mg k v` | hit: `VA` is sent; miss | hit: `VA <len> O..` with the value |
//! | `mg k` with `T` (touch), no `v` | miss | hit: `HD O..` |
//! | `md k` (also with `I`) | deleted | missing key: `NF O..` |
//! | `ma k` (also with `v`) | applied (the value is not sent) | missing key: `NF O..` |
//! | `ms k` (set, append, prepend) | stored | `NS O..` (add of an existing key, replace/append/prepend of a missing one), `EX O..` (CAS mismatch), `NF O..` (CAS on a missing key) |
//! | any | - | `SERVER_ERROR object too large for cache` (the data is swallowed), `CLIENT_ERROR ...` (bad data chunk; then `ERROR` for the rest of the line): error lines never carry the opaque |
//! | `mn` | - | `MN` |
//!
//! `me` takes no opaque (`me k O5` answers as `me k`): its hit names the key, its miss is
//! `EN` with no flags. The text protocol's `noreply` suppresses `NOT_STORED`, `NOT_FOUND`,
//! `EXISTS` and, on 1.6.18, even the `SERVER_ERROR` for a value over the item size; a
//! malformed data block still answers `ERROR`. Binary quiet opcodes answer every failure
//! (not found, not stored, exists) with a packet carrying the request's opaque.
//!
//! What the client makes of it: every meta request carries an opaque and a reply must echo
//! it; a run of quiet commands is closed by `mn` and read up to its `MN` (batches,
//! [`Pipeline::finish`](crate::Pipeline::finish)); after fire-and-forget ones
//! ([`Pipeline::send`](crate::Pipeline::send), `store_noreply`, `delete_noreply`) the next
//! call on that connection sends `mn` ahead of its own request and sets aside the replies
//! before `MN` (counted in `ServerCounters::late_replies`). After an error line, which names
//! no request, the connection is closed.
//!
//! Keys that are not valid text keys are sent base64-encoded with the `b` flag
//! (the client does this for meta; see [`MAX_BINARY_KEY_LEN`]); the server decodes them, so the
//! item's key is the raw bytes (notes §6).
//!
//! The reply to `mg foo v f O7`:
//!
//! ```
//! use mcstore::proto::{Limits, Status, meta::{self, Code, Reply}};
//! let Status::Complete((used, Reply::Meta(m))) =
//!     meta::parse_reply(b"VA 2 f5 O7\r\nhi\r\n", &Limits::default()).unwrap() else { panic!() };
//! assert_eq!((used, m.code, m.data, m.flags.client_flags, m.flags.opaque_u32()),
//!            (16, Code::Value, Some(&b"hi"[..]), Some(5), Some(7)));
//! ```

use super::{
    digits, parse_u64, put_u64, split_word, take_line, Key, Limits, ParseError, Status, StoreMode,
    MAX_LINE,
};

pub use super::DATA_TRAILER;

/// The longest binary key: its base64 form (4 bytes per 3) must fit in 250 bytes (notes §6).
pub const MAX_BINARY_KEY_LEN: usize = 186;

/// The longest opaque token memcached accepts (notes §4, observed on 1.6.18).
pub const MAX_OPAQUE_LEN: usize = 32;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends the standard (RFC 4648, `+/`, padded) base64 form of `raw`, which is what
/// memcached's `base64.c` decodes.
pub(crate) fn encode_base64(out: &mut Vec<u8>, raw: &[u8]) {
    let mut chunks = raw.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[
            B64[(n >> 18) as usize & 63],
            B64[(n >> 12) as usize & 63],
            B64[(n >> 6) as usize & 63],
            B64[n as usize & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[B64[(n >> 18) as usize], B64[(n >> 12) as usize & 63]]);
            out.extend_from_slice(b"==");
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[
                B64[(n >> 18) as usize],
                B64[(n >> 12) as usize & 63],
                B64[(n >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {}
    }
}

#[cfg(any(test, fuzzing))]
fn b64_value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

#[cfg(any(test, fuzzing))]
/// Decodes a padded base64 token (as the server returns keys with `k` + `b`), appending the
/// bytes to `out`. `None` (and `out` unchanged) if the token is not valid padded base64.
pub(crate) fn decode_base64(out: &mut Vec<u8>, token: &[u8]) -> Option<()> {
    if token.len() % 4 != 0 {
        return None;
    }
    let start = out.len();
    let quads = token.len() / 4;
    for (q, c) in token.chunks_exact(4).enumerate() {
        let last = q + 1 == quads;
        let pad = match (c[2], c[3]) {
            (b'=', b'=') if last => 2,
            (_, b'=') if last => 1,
            _ => 0,
        };
        let mut n = 0u32;
        for &ch in &c[..4 - pad] {
            match b64_value(ch) {
                Some(v) => n = n << 6 | v,
                None => {
                    out.truncate(start);
                    return None;
                }
            }
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(())
}

fn flag(out: &mut Vec<u8>, f: u8) {
    out.extend_from_slice(&[b' ', f]);
}

fn flag_num(out: &mut Vec<u8>, f: u8, n: u64) {
    flag(out, f);
    put_u64(out, n);
}

fn opt_num(out: &mut Vec<u8>, f: u8, n: Option<impl Into<u64>>) {
    if let Some(n) = n {
        flag_num(out, f, n.into());
    }
}

fn begin(out: &mut Vec<u8>, cmd: &[u8], key: Key<'_>) {
    out.extend_from_slice(cmd);
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
}

/// Ends a command: the `b` flag for a base64 key, the opaque, quiet mode, `\r\n`.
fn end(out: &mut Vec<u8>, key: Key<'_>, opaque: Option<u32>, quiet: bool) {
    if key.is_base64() {
        flag(out, b'b');
    }
    opt_num(out, b'O', opaque);
    if quiet {
        flag(out, b'q');
    }
    out.extend_from_slice(b"\r\n");
}

/// The flags of a meta get (`mg`, protocol.txt "Meta Get"). `Default` asks for nothing: the
/// reply is then `HD` on a hit, `EN` on a miss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetFlags {
    /// `v`: return the value.
    pub value: bool,
    /// `k`: return the key.
    pub key: bool,
    /// `c`: return the CAS unique.
    pub cas: bool,
    /// `f`: return the client flags.
    pub client_flags: bool,
    /// `s`: return the value's size.
    pub size: bool,
    /// `t`: return the remaining TTL (-1: never expires).
    pub ttl: bool,
    /// `h`: return whether the item had been hit before.
    pub hit: bool,
    /// `l`: return the seconds since the last access.
    pub last_access: bool,
    /// `u`: do not bump the item in the LRU or change its access time.
    pub no_bump: bool,
    /// `q`: no reply on a miss.
    pub quiet: bool,
    /// `T<ttl>`: update the TTL (touch, gat).
    pub touch: Option<u32>,
    /// `N<ttl>`: on a miss, create a placeholder with this TTL and win its lease (`W`).
    pub vivify: Option<u32>,
    /// `R<ttl>`: win the recache lease if the remaining TTL is below this.
    pub recache: Option<u32>,
    /// `O<opaque>`: echoed in the reply.
    pub opaque: Option<u32>,
}

/// Encodes `mg <key> <flags>*`.
pub(crate) fn encode_get(out: &mut Vec<u8>, key: Key<'_>, f: &GetFlags) {
    begin(out, b"mg", key);
    for (on, c) in [
        (f.value, b'v'),
        (f.key, b'k'),
        (f.cas, b'c'),
        (f.client_flags, b'f'),
        (f.size, b's'),
        (f.ttl, b't'),
        (f.hit, b'h'),
        (f.last_access, b'l'),
        (f.no_bump, b'u'),
    ] {
        if on {
            flag(out, c);
        }
    }
    opt_num(out, b'T', f.touch);
    opt_num(out, b'N', f.vivify);
    opt_num(out, b'R', f.recache);
    end(out, key, f.opaque, f.quiet);
}

/// The flags of a meta set (`ms`, protocol.txt "Meta Set").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetFlags {
    /// `M<mode>` (set, the default, is not sent).
    pub mode: StoreMode,
    /// `T<ttl>` (0, never expires, is not sent).
    pub ttl: u32,
    /// `F<flags>` (0 is not sent).
    pub client_flags: u32,
    /// `C<cas>`: store only if the item's CAS is this (`EX` otherwise, `NF` if missing).
    pub cas: Option<u64>,
    /// `I`: with `C`, an older CAS still stores, but marks the item stale.
    pub invalidate: bool,
    /// `c`: return the item's new CAS.
    pub return_cas: bool,
    /// `k`: return the key.
    pub return_key: bool,
    /// `q`: no reply on success (`HD`).
    pub quiet: bool,
    /// `O<opaque>`.
    pub opaque: Option<u32>,
}

/// Encodes the `ms <key> <datalen> <flags>*` line; the caller sends the `len` bytes of data and
/// [`DATA_TRAILER`] after it. Validate `len` first: 1.6.18 does not skip the data block of a
/// rejected command line and would read it as commands (notes §4, "ms").
pub(crate) fn encode_store(out: &mut Vec<u8>, key: Key<'_>, len: usize, f: &SetFlags) {
    begin(out, b"ms", key);
    out.push(b' ');
    put_u64(out, len as u64);
    if f.ttl != 0 {
        flag_num(out, b'T', f.ttl.into());
    }
    if f.client_flags != 0 {
        flag_num(out, b'F', f.client_flags.into());
    }
    opt_num(out, b'C', f.cas);
    let mode = match f.mode {
        StoreMode::Set => None,
        StoreMode::Add => Some(b'E'),
        StoreMode::Replace => Some(b'R'),
        StoreMode::Append => Some(b'A'),
        StoreMode::Prepend => Some(b'P'),
    };
    if let Some(m) = mode {
        out.extend_from_slice(&[b' ', b'M', m]);
    }
    for (on, c) in [
        (f.invalidate, b'I'),
        (f.return_cas, b'c'),
        (f.return_key, b'k'),
    ] {
        if on {
            flag(out, c);
        }
    }
    end(out, key, f.opaque, f.quiet);
}

/// The flags of a meta delete (`md`, protocol.txt "Meta Delete").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteFlags {
    /// `I`: mark the item stale (and bump its CAS) instead of removing it.
    pub invalidate: bool,
    /// `T<ttl>`: with `I`, the TTL the stale item keeps.
    pub ttl: Option<u32>,
    /// `C<cas>`: delete only if the CAS matches.
    pub cas: Option<u64>,
    /// `k`: return the key.
    pub return_key: bool,
    /// `q`: no reply on success.
    pub quiet: bool,
    /// `O<opaque>`.
    pub opaque: Option<u32>,
}

/// Encodes `md <key> <flags>*`.
pub(crate) fn encode_delete(out: &mut Vec<u8>, key: Key<'_>, f: &DeleteFlags) {
    begin(out, b"md", key);
    if f.invalidate {
        flag(out, b'I');
    }
    opt_num(out, b'T', f.ttl);
    opt_num(out, b'C', f.cas);
    if f.return_key {
        flag(out, b'k');
    }
    end(out, key, f.opaque, f.quiet);
}

/// The flags of a meta arithmetic command (`ma`, protocol.txt "Meta Arithmetic").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArithFlags {
    /// `MD`: decrement (stops at 0) instead of increment (wraps at 2^64).
    pub decr: bool,
    /// `D<delta>` (1 if absent; 1 is not sent).
    pub delta: u64,
    /// `N<ttl>`: create the item on a miss, starting from [`initial`](Self::initial).
    pub vivify: Option<u32>,
    /// `J<initial>` (with `N`).
    pub initial: Option<u64>,
    /// `T<ttl>`: update the TTL on success.
    pub ttl: Option<u32>,
    /// `C<cas>`: apply only if the CAS matches.
    pub cas: Option<u64>,
    /// `v`: return the new value.
    pub value: bool,
    /// `t`: return the remaining TTL.
    pub return_ttl: bool,
    /// `c`: return the CAS.
    pub return_cas: bool,
    /// `q`: no reply on success (`HD`).
    pub quiet: bool,
    /// `O<opaque>`.
    pub opaque: Option<u32>,
}

/// Encodes `ma <key> <flags>*`.
pub(crate) fn encode_arith(out: &mut Vec<u8>, key: Key<'_>, f: &ArithFlags) {
    begin(out, b"ma", key);
    if f.decr {
        out.extend_from_slice(b" MD");
    }
    if f.delta != 1 {
        flag_num(out, b'D', f.delta);
    }
    opt_num(out, b'N', f.vivify);
    opt_num(out, b'J', f.initial);
    opt_num(out, b'T', f.ttl);
    opt_num(out, b'C', f.cas);
    for (on, c) in [(f.value, b'v'), (f.return_ttl, b't'), (f.return_cas, b'c')] {
        if on {
            flag(out, c);
        }
    }
    end(out, key, f.opaque, f.quiet);
}

/// Encodes `mn`: the server answers `MN`, in order, so it closes a quiet batch.
pub(crate) fn encode_noop(out: &mut Vec<u8>) {
    out.extend_from_slice(b"mn\r\n");
}

/// Encodes `me <key> [b]` (meta debug: a human-readable dump of the item).
pub(crate) fn encode_debug(out: &mut Vec<u8>, key: Key<'_>) {
    begin(out, b"me", key);
    end(out, key, None, false);
}

/// A meta reply's two-letter code (notes §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `VA <len>`: success, with a data block.
    Value,
    /// `HD`: success, no data.
    Done,
    /// `EN`: miss.
    Miss,
    /// `NF`: not found (md, ma, ms with `C`).
    NotFound,
    /// `NS`: not stored (an ms mode's condition failed).
    NotStored,
    /// `EX`: CAS mismatch.
    Exists,
    /// `MN`: the reply to `mn`.
    Noop,
}

impl Code {
    fn word(self) -> &'static [u8] {
        match self {
            Code::Value => b"VA",
            Code::Done => b"HD",
            Code::Miss => b"EN",
            Code::NotFound => b"NF",
            Code::NotStored => b"NS",
            Code::Exists => b"EX",
            Code::Noop => b"MN",
        }
    }
}

/// The flags a meta reply carries. Absent flags are `None`/`false`; unknown flag letters are
/// skipped, so a newer server's additions do not break the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnFlags<'a> {
    /// `c<cas>`.
    pub cas: Option<u64>,
    /// `f<flags>`.
    pub client_flags: Option<u32>,
    /// `s<size>`.
    pub size: Option<u64>,
    /// `t<ttl>`: remaining seconds, -1 if the item never expires.
    pub ttl: Option<i64>,
    /// `h0`/`h1`: whether the item had been hit before.
    pub hit: Option<bool>,
    /// `l<secs>`: seconds since the last access.
    pub last_access: Option<u64>,
    /// `k<key>` (base64 when [`base64_key`](Self::base64_key) is set).
    pub key: Option<&'a [u8]>,
    /// `O<opaque>`.
    pub opaque: Option<&'a [u8]>,
    /// `W`: this client won the lease: recompute and store.
    pub won: bool,
    /// `X`: the item is stale.
    pub stale: bool,
    /// `Z`: another client already won the lease.
    pub already_won: bool,
    /// `b`: the returned key is base64.
    pub base64_key: bool,
}

impl ReturnFlags<'_> {
    /// The opaque as a number, if it is one (the client sends decimal opaques).
    pub fn opaque_u32(&self) -> Option<u32> {
        self.opaque
            .and_then(parse_u64)
            .and_then(|n| u32::try_from(n).ok())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        opt_num(out, b'c', self.cas);
        opt_num(out, b'f', self.client_flags);
        opt_num(out, b's', self.size);
        match self.ttl {
            Some(t) if t < 0 => out.extend_from_slice(b" t-1"),
            Some(t) => flag_num(out, b't', t as u64),
            None => {}
        }
        opt_num(out, b'h', self.hit.map(u64::from));
        opt_num(out, b'l', self.last_access);
        for (tok, c) in [(self.key, b'k'), (self.opaque, b'O')] {
            if let Some(t) = tok {
                flag(out, c);
                out.extend_from_slice(t);
            }
        }
        for (on, c) in [
            (self.won, b'W'),
            (self.stale, b'X'),
            (self.already_won, b'Z'),
            (self.base64_key, b'b'),
        ] {
            if on {
                flag(out, c);
            }
        }
    }
}

/// A meta status reply: code, data block (for `VA`) and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta<'a> {
    /// The two-letter code.
    pub code: Code,
    /// The data block of a `VA` reply (binary-safe).
    pub data: Option<&'a [u8]>,
    /// The returned flags.
    pub flags: ReturnFlags<'a>,
}

/// One reply unit of the meta protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `VA`, `HD`, `EN`, `NF`, `NS`, `EX` or `MN`, with its flags.
    Meta(Meta<'a>),
    /// `ME <key> <k=v>*`: the rest of the line, for humans.
    Debug(&'a [u8]),
    /// `ERROR [<msg>]`.
    Error(&'a [u8]),
    /// `CLIENT_ERROR <msg>`.
    ClientError(&'a [u8]),
    /// `SERVER_ERROR <msg>`.
    ServerError(&'a [u8]),
}

impl Reply<'_> {
    /// Encodes the reply as memcached sends it (for tests, the hostile fake and fuzzing).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (word, rest): (&[u8], &[u8]) = match *self {
            Reply::Meta(m) => {
                out.extend_from_slice(m.code.word());
                if let Some(d) = m.data {
                    out.push(b' ');
                    put_u64(out, d.len() as u64);
                }
                m.flags.encode(out);
                out.extend_from_slice(b"\r\n");
                if let Some(d) = m.data {
                    out.extend_from_slice(d);
                    out.extend_from_slice(DATA_TRAILER);
                }
                return;
            }
            Reply::Debug(r) => (b"ME", r),
            Reply::Error(r) => (b"ERROR", r),
            Reply::ClientError(r) => (b"CLIENT_ERROR", r),
            Reply::ServerError(r) => (b"SERVER_ERROR", r),
        };
        out.extend_from_slice(word);
        if !rest.is_empty() {
            out.push(b' ');
            out.extend_from_slice(rest);
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn num<T: TryFrom<u64>>(tok: &[u8]) -> Result<T, ParseError> {
    parse_u64(tok)
        .and_then(|n| T::try_from(n).ok())
        .ok_or(ParseError::BadNumber)
}

/// Parses the flags after a reply code: single-space-separated tokens, each a letter and its
/// value (protocol.txt, "Meta Commands").
fn parse_flags(mut rest: &[u8]) -> Result<ReturnFlags<'_>, ParseError> {
    let mut f = ReturnFlags::default();
    while !rest.is_empty() {
        let (tok, more) = split_word(rest);
        let Some((&letter, value)) = tok.split_first() else {
            return Err(ParseError::BadFormat); // two spaces in a row, or a trailing space
        };
        let bare = |set: &mut bool| {
            if value.is_empty() {
                *set = true;
                Ok(())
            } else {
                Err(ParseError::BadFormat)
            }
        };
        match letter {
            b'c' => f.cas = Some(num(value)?),
            b'f' => f.client_flags = Some(num(value)?),
            b's' => f.size = Some(num(value)?),
            b't' if value == b"-1" => f.ttl = Some(-1),
            b't' => f.ttl = Some(num(value)?),
            b'h' => {
                f.hit = Some(match value {
                    b"0" => false,
                    b"1" => true,
                    _ => return Err(ParseError::BadNumber),
                })
            }
            b'l' => f.last_access = Some(num(value)?),
            b'k' if !value.is_empty() => f.key = Some(value),
            b'O' if value.len() <= MAX_OPAQUE_LEN => f.opaque = Some(value),
            b'O' => return Err(ParseError::BadFormat),
            b'W' => bare(&mut f.won)?,
            b'X' => bare(&mut f.stale)?,
            b'Z' => bare(&mut f.already_won)?,
            b'b' => bare(&mut f.base64_key)?,
            l if l.is_ascii_alphabetic() && l != b'k' => {} // a flag from a newer server
            _ => return Err(ParseError::BadFormat),
        }
        if more.is_empty() && rest.len() > tok.len() {
            return Err(ParseError::BadFormat); // the line ended with a space
        }
        rest = more;
    }
    Ok(f)
}

/// A `VA` reply carrying only the flags a multi-get asks for, read by [`parse_hit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit<'a> {
    /// The data block.
    pub data: &'a [u8],
    /// `f<flags>`.
    pub client_flags: Option<u32>,
    /// `c<cas>`.
    pub cas: Option<u64>,
    /// `O<opaque>`, a decimal number.
    pub opaque: Option<u32>,
}

/// Parses the next reply unit if it is a `VA` whose flags are only numeric `c`, `f` and `O`
/// (what a multi-get asks for: `mg <key> v f [c] q O<n>`); `None` for anything else (other
/// codes or flags, a line not all here yet, any unusual spelling), and the caller then calls
/// [`parse_reply`]. Whenever this returns `Some`, [`parse_reply`] returns the same reply (with
/// every other flag unset). It skips the general reply's line search, code match and flag
/// table: the per-item hot path of a meta multi-get.
///
/// ```text
/// use mcstore::proto::{Limits, Status, meta::{parse_hit, Hit}};
/// let r = parse_hit(b"VA 2 f5 O17\r\nhi\r\n", &Limits::default()).unwrap().unwrap();
/// assert_eq!(r, Status::Complete((17, Hit { data: b"hi", client_flags: Some(5), cas: None, opaque: Some(17) })));
/// assert!(parse_hit(b"VA 2 f5 W\r\nhi\r\n", &Limits::default()).is_none());
/// ```
#[inline]
pub(crate) fn parse_hit<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Option<Result<Status<(usize, Hit<'a>)>, ParseError>> {
    if buf.get(..3)? != b"VA " {
        return None;
    }
    let (len, p) = digits(buf, 3)?;
    let (
        line_len,
        NumericFlags {
            client_flags,
            cas,
            opaque,
        },
    ) = numeric_flags(buf, p)?;
    if len > limits.max_value as u64 {
        return Some(Err(ParseError::ValueTooLarge(len)));
    }
    let data_end = line_len.checked_add(len as usize)?;
    let total = data_end.checked_add(DATA_TRAILER.len())?;
    if buf.len() < total {
        return Some(Ok(Status::Partial));
    }
    if &buf[data_end..total] != DATA_TRAILER {
        return Some(Err(ParseError::BadDataTerminator));
    }
    let hit = Hit {
        data: &buf[line_len..data_end],
        client_flags,
        cas,
        opaque,
    };
    Some(Ok(Status::Complete((total, hit))))
}

/// The flags the client asks for on common replies, all numeric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NumericFlags {
    /// `f<flags>`.
    pub client_flags: Option<u32>,
    /// `c<cas>`.
    pub cas: Option<u64>,
    /// `O<opaque>`, a decimal number.
    pub opaque: Option<u32>,
}

/// Reads ` f<n>`, ` c<n>` and ` O<n>` flags from `p` up to the line end: the line's length
/// with its `\r\n`, and the flags. `None` for any other flag or spelling, or a line not all
/// here yet (the general parser then reads it, and names any error).
#[inline(always)]
fn numeric_flags(buf: &[u8], mut p: usize) -> Option<(usize, NumericFlags)> {
    let mut f = NumericFlags::default();
    loop {
        match *buf.get(p)? {
            b'\r' => break,
            b' ' => {}
            _ => return None,
        }
        let letter = *buf.get(p + 1)?;
        let (n, end) = digits(buf, p + 2)?;
        match letter {
            b'f' => f.client_flags = Some(u32::try_from(n).ok()?),
            b'c' => f.cas = Some(n),
            b'O' => f.opaque = Some(u32::try_from(n).ok()?),
            _ => return None,
        }
        p = end;
        if p > MAX_LINE {
            return None;
        }
    }
    if *buf.get(p + 1)? != b'\n' {
        return None;
    }
    Some((p + 2, f))
}

/// Parses the next reply unit if it is an `HD` whose flags are only numeric `c`, `f` and
/// `O` (a store's, delete's or touch's success with what the client asks for): the bytes it
/// takes and the flags; `None` for anything else, which [`parse_reply`] then reads (and
/// reads the same way). The single-command hot path of stores and deletes.
#[inline]
pub(crate) fn parse_done(buf: &[u8]) -> Option<(usize, NumericFlags)> {
    if buf.get(..2)? != b"HD" {
        return None;
    }
    numeric_flags(buf, 2)
}

#[cfg(any(test, fuzzing))]
impl<'a> Meta<'a> {
    /// This reply as a [`Hit`] if it is a `VA` (flags other than `c`, `f`, `O` ignored; an
    /// opaque that is not a decimal u32 reads as none).
    pub(crate) fn hit(&self) -> Option<Hit<'a>> {
        Some(Hit {
            data: self.data.filter(|_| self.code == Code::Value)?,
            client_flags: self.flags.client_flags,
            cas: self.flags.cas,
            opaque: self.flags.opaque_u32(),
        })
    }
}

#[cfg(any(test, fuzzing))]
/// A general reply's flags as the fast paths read them, or `None` if it has any other flag
/// (or an opaque that is not a u32), where the fast paths must not answer.
fn numeric_only(f: &ReturnFlags<'_>) -> Option<NumericFlags> {
    let others = ReturnFlags {
        cas: None,
        client_flags: None,
        opaque: None,
        ..*f
    };
    if others != ReturnFlags::default() || f.opaque.is_some() != f.opaque_u32().is_some() {
        return None;
    }
    Some(NumericFlags {
        client_flags: f.client_flags,
        cas: f.cas,
        opaque: f.opaque_u32(),
    })
}

#[cfg(any(test, fuzzing))]
/// `parse_reply`'s result in [`parse_done`]'s terms: what the two are checked against each
/// other with (tests, fuzzing).
pub(crate) fn as_plain_done(
    r: &Result<Status<(usize, Reply<'_>)>, ParseError>,
) -> Option<(usize, NumericFlags)> {
    match r {
        Ok(Status::Complete((n, Reply::Meta(m)))) if m.code == Code::Done => {
            Some((*n, numeric_only(&m.flags)?))
        }
        _ => None,
    }
}

#[cfg(any(test, fuzzing))]
/// `parse_reply`'s result in [`parse_hit`]'s terms, or `None` where `parse_hit` must not
/// answer (not a `VA`, other flags, an opaque that is not a u32): what the two are checked
/// against each other with (tests, fuzzing).
pub(crate) fn as_plain_hit<'a>(
    r: &Result<Status<(usize, Reply<'a>)>, ParseError>,
) -> Option<Result<Status<(usize, Hit<'a>)>, ParseError>> {
    Some(match r {
        Err(e) => Err(*e),
        Ok(Status::Partial) => Ok(Status::Partial),
        Ok(Status::Complete((n, Reply::Meta(m)))) => {
            numeric_only(&m.flags)?;
            Ok(Status::Complete((*n, m.hit()?)))
        }
        Ok(Status::Complete(_)) => return None,
    })
}

/// Parses one meta reply unit from the start of `buf`: `Partial` until it has all arrived,
/// then `Complete((consumed, reply))`. A `VA` claiming more than `limits.max_value` bytes is
/// refused from its header line, before any of the data is buffered; the data block is
/// located by its length (it may contain `\r\n`).
///
/// # Errors
/// A malformed line, a line longer than `MAX_LINE`, or a value above the limit.
pub fn parse_reply<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Status<(usize, Reply<'a>)>, ParseError> {
    let Some((line, line_len)) = take_line(buf)? else {
        return Ok(Status::Partial);
    };
    let (word, rest) = split_word(line);
    if rest.is_empty() && line.len() > word.len() {
        return Err(ParseError::BadFormat); // "HD " with nothing after the space
    }
    let code = match word {
        b"VA" => Code::Value,
        b"HD" => Code::Done,
        b"EN" => Code::Miss,
        b"NF" => Code::NotFound,
        b"NS" => Code::NotStored,
        b"EX" => Code::Exists,
        b"MN" if rest.is_empty() => Code::Noop,
        b"MN" => return Err(ParseError::BadFormat),
        b"ME" if !rest.is_empty() => return Ok(Status::Complete((line_len, Reply::Debug(rest)))),
        b"ERROR" => return Ok(Status::Complete((line_len, Reply::Error(rest)))),
        b"CLIENT_ERROR" => return Ok(Status::Complete((line_len, Reply::ClientError(rest)))),
        b"SERVER_ERROR" => return Ok(Status::Complete((line_len, Reply::ServerError(rest)))),
        _ => return Err(ParseError::UnknownReply),
    };
    if code != Code::Value {
        let flags = parse_flags(rest)?;
        let m = Meta {
            code,
            data: None,
            flags,
        };
        return Ok(Status::Complete((line_len, Reply::Meta(m))));
    }
    let (len, rest) = split_word(rest);
    let len = parse_u64(len).ok_or(ParseError::BadNumber)?;
    if len > limits.max_value as u64 {
        return Err(ParseError::ValueTooLarge(len));
    }
    if rest.is_empty() && line.ends_with(b" ") {
        return Err(ParseError::BadFormat);
    }
    let flags = parse_flags(rest)?;
    let data_end = line_len
        .checked_add(len as usize)
        .ok_or(ParseError::ValueTooLarge(len))?;
    let total = data_end
        .checked_add(DATA_TRAILER.len())
        .ok_or(ParseError::ValueTooLarge(len))?;
    if buf.len() < total {
        return Ok(Status::Partial);
    }
    if &buf[data_end..total] != DATA_TRAILER {
        return Err(ParseError::BadDataTerminator);
    }
    let m = Meta {
        code,
        data: Some(&buf[line_len..data_end]),
        flags,
    };
    Ok(Status::Complete((total, Reply::Meta(m))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{KeyError, MAX_KEY_LEN};

    /// Builds the wire key for `raw`: the key itself if it is a valid text key, otherwise its
    /// base64 form (written into `buf`) marked for the `b` flag. Empty keys, text keys over 250
    /// bytes and binary keys over [`MAX_BINARY_KEY_LEN`] are refused.
    ///
    /// ```text
    /// use mcstore::proto::meta::binary_key;
    /// let mut buf = Vec::new();
    /// let k = binary_key(b"a b", &mut buf).unwrap();
    /// assert!(k.is_base64());
    /// assert_eq!(k.as_bytes(), b"YSBi");
    /// ```
    fn binary_key<'b>(raw: &'b [u8], buf: &'b mut Vec<u8>) -> Result<Key<'b>, KeyError> {
        match Key::new(raw) {
            Ok(k) => Ok(k),
            Err(KeyError::BadByte { .. }) if raw.len() > MAX_BINARY_KEY_LEN => {
                Err(KeyError::BinaryTooLong(raw.len()))
            }
            Err(KeyError::BadByte { .. }) => {
                buf.clear();
                encode_base64(buf, raw);
                debug_assert!(buf.len() <= MAX_KEY_LEN);
                Ok(Key::base64_token(buf))
            }
            Err(e) => Err(e),
        }
    }
    use proptest::prelude::*;

    fn key(k: &[u8]) -> Key<'_> {
        Key::new(k).unwrap()
    }

    fn parse(b: &[u8]) -> Result<Status<(usize, Reply<'_>)>, ParseError> {
        parse_reply(b, &Limits::default())
    }

    fn meta(b: &[u8]) -> Meta<'_> {
        match parse(b) {
            Ok(Status::Complete((n, Reply::Meta(m)))) if n == b.len() => m,
            other => panic!("{:?}: {other:?}", b.escape_ascii().to_string()),
        }
    }

    #[test]
    fn encoders() {
        let mut o = Vec::new();
        let all = GetFlags {
            value: true,
            key: true,
            cas: true,
            client_flags: true,
            size: true,
            ttl: true,
            hit: true,
            last_access: true,
            no_bump: true,
            quiet: true,
            touch: Some(30),
            vivify: Some(10),
            recache: Some(5),
            opaque: Some(42),
        };
        encode_get(&mut o, key(b"foo"), &all);
        assert_eq!(o, b"mg foo v k c f s t h l u T30 N10 R5 O42 q\r\n");
        o.clear();
        encode_get(&mut o, key(b"foo"), &GetFlags::default());
        assert_eq!(o, b"mg foo\r\n");
        o.clear();
        let f = SetFlags {
            mode: StoreMode::Add,
            ttl: 60,
            client_flags: 5,
            cas: Some(9),
            invalidate: true,
            return_cas: true,
            return_key: false,
            quiet: true,
            opaque: Some(1),
        };
        encode_store(&mut o, key(b"k"), 3, &f);
        assert_eq!(o, b"ms k 3 T60 F5 C9 ME I c O1 q\r\n");
        o.clear();
        encode_store(&mut o, key(b"k"), 0, &SetFlags::default());
        assert_eq!(o, b"ms k 0\r\n");
        for (m, w) in [
            (StoreMode::Replace, "MR"),
            (StoreMode::Append, "MA"),
            (StoreMode::Prepend, "MP"),
        ] {
            o.clear();
            encode_store(
                &mut o,
                key(b"k"),
                1,
                &SetFlags {
                    mode: m,
                    ..SetFlags::default()
                },
            );
            assert_eq!(o, format!("ms k 1 {w}\r\n").as_bytes());
        }
        o.clear();
        let d = DeleteFlags {
            invalidate: true,
            ttl: Some(30),
            cas: Some(7),
            return_key: true,
            quiet: true,
            opaque: Some(3),
        };
        encode_delete(&mut o, key(b"k"), &d);
        assert_eq!(o, b"md k I T30 C7 k O3 q\r\n");
        o.clear();
        let a = ArithFlags {
            decr: true,
            delta: 5,
            vivify: Some(0),
            initial: Some(10),
            ttl: Some(60),
            cas: Some(2),
            value: true,
            return_ttl: true,
            return_cas: true,
            quiet: false,
            opaque: Some(4),
        };
        encode_arith(&mut o, key(b"n"), &a);
        assert_eq!(o, b"ma n MD D5 N0 J10 T60 C2 v t c O4\r\n");
        o.clear();
        let inc = ArithFlags {
            delta: 1,
            value: true,
            ..ArithFlags::default()
        };
        encode_arith(&mut o, key(b"n"), &inc);
        assert_eq!(o, b"ma n v\r\n");
        o.clear();
        encode_noop(&mut o);
        encode_debug(&mut o, key(b"k"));
        assert_eq!(o, b"mn\r\nme k\r\n");
    }

    #[test]
    fn binary_keys_go_base64_with_b() {
        let mut buf = Vec::new();
        let k = binary_key(b"foo", &mut buf).unwrap();
        assert!(!k.is_base64(), "a text key is sent as it is");
        let k = binary_key(b"f o\x00", &mut buf).unwrap();
        assert!(k.is_base64());
        let mut o = Vec::new();
        encode_get(
            &mut o,
            k,
            &GetFlags {
                value: true,
                ..GetFlags::default()
            },
        );
        assert_eq!(o, b"mg ZiBvAA== v b\r\n");
        let mut buf = Vec::new();
        assert!(binary_key(&[0u8; 186], &mut buf).is_ok());
        assert_eq!(buf.len(), 248);
        assert_eq!(
            binary_key(&[0u8; 187], &mut buf),
            Err(KeyError::BinaryTooLong(187))
        );
        assert_eq!(binary_key(b"", &mut buf), Err(KeyError::Empty));
        assert_eq!(
            binary_key(&[b'a'; 251], &mut buf),
            Err(KeyError::TooLong(251))
        );
    }

    #[test]
    fn base64_vectors() {
        // RFC 4648, section 10.
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut o = Vec::new();
            encode_base64(&mut o, raw.as_bytes());
            assert_eq!(o, enc.as_bytes());
            let mut d = Vec::new();
            assert_eq!(decode_base64(&mut d, enc.as_bytes()), Some(()));
            assert_eq!(d, raw.as_bytes());
        }
        for bad in [&b"Zg="[..], b"Z===", b"Zg==Zg==", b"Zm9!", b"=Zm9"] {
            let mut d = b"x".to_vec();
            assert_eq!(decode_base64(&mut d, bad), None, "{bad:?}");
            assert_eq!(d, b"x");
        }
    }

    #[test]
    fn replies_observed_on_1_6_18() {
        // meta-protocol-notes.md, §4 and §7.
        let m = meta(b"VA 2 f5 t60 c18 kZm9v b s2 h0 l0 Oxyz\r\nhi\r\n");
        assert_eq!(m.code, Code::Value);
        assert_eq!(m.data, Some(&b"hi"[..]));
        let f = m.flags;
        assert_eq!(
            (f.client_flags, f.ttl, f.cas, f.size, f.hit, f.last_access),
            (Some(5), Some(60), Some(18), Some(2), Some(false), Some(0))
        );
        assert_eq!(
            (f.key, f.base64_key, f.opaque),
            (Some(&b"Zm9v"[..]), true, Some(&b"xyz"[..]))
        );
        assert_eq!(meta(b"HD\r\n").code, Code::Done);
        assert_eq!(meta(b"EN\r\n").code, Code::Miss);
        let en = meta(b"EN Oabc knokey\r\n");
        assert_eq!(
            (en.code, en.flags.opaque, en.flags.key),
            (Code::Miss, Some(&b"abc"[..]), Some(&b"nokey"[..]))
        );
        assert_eq!(meta(b"NF O1\r\n").flags.opaque_u32(), Some(1));
        assert_eq!(meta(b"NS\r\n").code, Code::NotStored);
        assert_eq!(meta(b"EX\r\n").code, Code::Exists);
        assert_eq!(meta(b"MN\r\n").code, Code::Noop);
        let won = meta(b"VA 0 t30 c19 W\r\n\r\n");
        assert!(won.flags.won && !won.flags.already_won && won.data == Some(b""));
        let z = meta(b"VA 1 c22 t29 Z X\r\nv\r\n");
        assert!(z.flags.already_won && z.flags.stale && !z.flags.won);
        assert_eq!(meta(b"HD t-1\r\n").flags.ttl, Some(-1));
        // An unknown flag from a newer server is skipped.
        assert_eq!(meta(b"HD Q5 c1\r\n").flags.cas, Some(1));
        assert_eq!(
            parse(b"ME foo exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n").unwrap(),
            Status::Complete((
                49,
                Reply::Debug(b"foo exp=-1 la=3 cas=2 fetch=no cls=1 size=63")
            ))
        );
        assert_eq!(
            parse(b"CLIENT_ERROR bad command line format\r\n").unwrap(),
            Status::Complete((38, Reply::ClientError(b"bad command line format")))
        );
        assert_eq!(
            parse(b"ERROR\r\n").unwrap(),
            Status::Complete((7, Reply::Error(b"")))
        );
        assert_eq!(
            parse(b"SERVER_ERROR out of memory\r\n").unwrap(),
            Status::Complete((28, Reply::ServerError(b"out of memory")))
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        use ParseError::*;
        for (input, want) in [
            (&b"XX\r\n"[..], UnknownReply),
            (b"VALUE k 0 1\r\nx\r\n", UnknownReply),
            (b"HD\n", BadLineEnding),
            (b"HD \r\n", BadFormat),
            (b"HD c1 \r\n", BadFormat),
            (b"HD c1  f2\r\n", BadFormat),
            (b"HD cx\r\n", BadNumber),
            (b"HD c-1\r\n", BadNumber),
            (b"HD f4294967296\r\n", BadNumber),
            (b"HD c99999999999999999999\r\n", BadNumber),
            (b"HD t-2\r\n", BadNumber),
            (b"HD h2\r\n", BadNumber),
            (b"HD Wx\r\n", BadFormat),
            (b"HD k\r\n", BadFormat),
            (b"HD 5\r\n", BadFormat),
            (b"MN c1\r\n", BadFormat),
            (b"VA\r\n", BadNumber),
            (b"VA x\r\n", BadNumber),
            (b"VA -1\r\n", BadNumber),
            (b"VA 2 \r\nhi\r\n", BadFormat),
            (b"VA 2\r\nhiX\r\n", BadDataTerminator),
            (b"VA 4294967296\r\n", ValueTooLarge(4294967296)),
            (b"VA 18446744073709551615 c1\r\n", ValueTooLarge(u64::MAX)),
        ] {
            assert_eq!(
                parse(input),
                Err(want),
                "{:?}",
                input.escape_ascii().to_string()
            );
        }
        let long = [b'O'; 40];
        let mut line = b"HD ".to_vec();
        line.extend_from_slice(&long);
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), Err(BadFormat), "opaque over 32 bytes");
        let mut huge = b"HD ".to_vec();
        huge.resize(5000, b'c');
        assert_eq!(parse(&huge), Err(LineTooLong(super::super::MAX_LINE)));
    }

    #[test]
    fn every_prefix_is_partial() {
        let full = b"VA 5 c3 f1 O9 W\r\nab\r\nc\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(Status::Partial), "{n}");
        }
        assert!(parse(full).unwrap().is_complete());
    }

    fn arb_flags() -> impl Strategy<Value = (ReturnFlags<'static>, Vec<u8>, Vec<u8>)> {
        (
            (
                any::<Option<u64>>(),
                any::<Option<u32>>(),
                any::<Option<u64>>(),
                prop_oneof![
                    Just(None),
                    Just(Some(-1i64)),
                    (0i64..i64::MAX).prop_map(Some)
                ],
                any::<Option<bool>>(),
                any::<Option<u64>>(),
            ),
            any::<[bool; 4]>(),
            proptest::option::of("[a-zA-Z0-9+/=:_.-]{1,60}"),
            proptest::option::of("[a-zA-Z0-9]{0,32}"),
        )
            .prop_map(|((cas, cf, size, ttl, hit, la), [w, x, z, b], k, o)| {
                let f = ReturnFlags {
                    cas,
                    client_flags: cf,
                    size,
                    ttl,
                    hit,
                    last_access: la,
                    key: None,
                    opaque: None,
                    won: w,
                    stale: x,
                    already_won: z,
                    base64_key: b,
                };
                let k = k.map(String::into_bytes).unwrap_or_default();
                let o = o.map(|s| format!("O{s}").into_bytes()).unwrap_or_default();
                (f, k, o)
            })
    }

    proptest! {
        // Most generated lines are not plain hits: enough cases for many that are.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whenever the hit reading answers, `parse_reply` says the same; and it answers for
        /// every complete plain hit.
        #[test]
        fn parse_hit_agrees(
            len in prop_oneof![3 => 0usize..6, 1 => Just(5000usize)],
            tokens in prop::collection::vec(
                (prop::sample::select(b"fffcOOtWk".to_vec()),
                 prop_oneof![
                     4 => "[0-9]{1,4}",
                     1 => "[0-9]{19,21}",
                     1 => "[0-9x-]{0,3}",
                 ]),
                0..4),
            sep in prop::sample::select(vec![" ", " ", " ", "  "]),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = format!("VA {len}").into_bytes();
            for (letter, value) in &tokens {
                wire.extend_from_slice(sep.as_bytes());
                wire.push(*letter);
                wire.extend_from_slice(value.as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend(std::iter::repeat_n(b'd', len));
            wire.extend_from_slice(b"\r\nMN\r\n");
            let wire = &wire[..cut.index(wire.len() + 1)];
            let limits = Limits { max_value: 4096 };
            if let Some(fast) = parse_hit(wire, &limits) {
                prop_assert_eq!(Some(fast), as_plain_hit(&parse_reply(wire, &limits)));
            } else if let Some(Ok(Status::Complete(_))) = as_plain_hit(&parse_reply(wire, &limits)) {
                // Declined a complete plain hit: only one the fast path leaves to the general
                // parser (a number of 20 digits or more, an `f`/`O` beyond u32 or empty that
                // a later one of the same letter replaces).
                let simple = tokens.iter().all(|(l, v)| {
                    (1..=19).contains(&v.len())
                        && v.bytes().all(|b| b.is_ascii_digit())
                        && (*l == b'c' || v.parse::<u64>().is_ok_and(|n| n <= u64::from(u32::MAX)))
                });
                prop_assert!(!simple);
            }
        }

        #[test]
        fn parse_done_agrees(
            tokens in prop::collection::vec(
                (prop::sample::select(b"fcOOtWkq".to_vec()),
                 prop_oneof![4 => "[0-9]{1,4}", 1 => "[0-9]{19,21}", 1 => "[0-9x-]{0,3}"]),
                0..4),
            code in prop::sample::select(vec!["HD", "HD", "NS", "HDX", "H"]),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = code.as_bytes().to_vec();
            for (letter, value) in &tokens {
                wire.push(b' ');
                wire.push(*letter);
                wire.extend_from_slice(value.as_bytes());
            }
            wire.extend_from_slice(b"\r\nMN\r\n");
            let wire = &wire[..cut.index(wire.len() + 1)];
            if let Some(fast) = parse_done(wire) {
                prop_assert_eq!(Some(fast), as_plain_done(&parse_reply(wire, &Limits::default())));
            }
        }

        #[test]
        fn reply_round_trip(
            (flags, k, o) in arb_flags(),
            code in 0usize..7,
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let code = [Code::Value, Code::Done, Code::Miss, Code::NotFound, Code::NotStored,
                        Code::Exists, Code::Noop][code];
            let mut flags = flags;
            flags.key = (!k.is_empty()).then_some(&k[..]);
            flags.opaque = o.get(1..);
            if code == Code::Noop {
                flags = ReturnFlags::default();
            }
            let reply = Reply::Meta(Meta {
                code,
                data: (code == Code::Value).then_some(&data[..]),
                flags,
            });
            let mut wire = Vec::new();
            reply.encode(&mut wire);
            let parsed = parse(&wire).unwrap();
            prop_assert_eq!(parsed, Status::Complete((wire.len(), reply)));
            // Split anywhere: the prefix is Partial.
            for n in 0..wire.len() {
                prop_assert_eq!(parse(&wire[..n]).unwrap(), Status::Partial);
            }
        }

        #[test]
        fn base64_round_trip(raw in proptest::collection::vec(any::<u8>(), 0..=MAX_BINARY_KEY_LEN)) {
            let mut enc = Vec::new();
            encode_base64(&mut enc, &raw);
            prop_assert!(Key::new(&enc).is_ok() || raw.is_empty());
            let mut dec = Vec::new();
            prop_assert_eq!(decode_base64(&mut dec, &enc), Some(()));
            prop_assert_eq!(dec, raw);
        }
    }
}
