//! The classic text protocol (`../shared/reference/protocol.txt`).
//!
//! Requests are encoded (inside the crate) into a caller-owned buffer. A storage command's data
//! block is *not* copied: the encoder writes the command line only, and the value follows with
//! [`DATA_TRAILER`] (the driver sends large values with one vectored write).
//!
//! Replies are parsed one unit at a time by [`parse_reply`]: a `VALUE` block, an `END`, a `STAT`
//! line, a status line. A retrieval reply is a sequence of [`Response::Value`] units closed by
//! [`Response::End`]; a `stats` reply is [`Response::Stat`] units closed by `End`.
//!
//! ```
//! use mcstore::proto::{Limits, Status, text::{parse_reply, Response}};
//! let input = b"VALUE k 5 3\r\nabc\r\nEND\r\n";
//! let Status::Complete((used, reply)) = parse_reply(input, &Limits::default()).unwrap() else {
//!     panic!("complete input")
//! };
//! assert_eq!(reply, Response::Value { key: b"k", flags: 5, cas: None, data: b"abc" });
//! assert_eq!(parse_reply(&input[used..], &Limits::default()).unwrap(), Status::Complete((5, Response::End)));
//! ```

use super::{
    digits, parse_u64, put_u64, short_eq, split_word, take_line, Key, Limits, ParseError, Status,
};

pub use super::{DATA_TRAILER, MAX_LINE};

/// The retrieval commands (protocol.txt, "Retrieval command" and "Get And Touch").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retrieval {
    /// `get <key>*`
    Get,
    /// `gets <key>*`: values come with their CAS unique.
    Gets,
    /// `gat <exptime> <key>*`: get and touch.
    Gat(u32),
    /// `gats <exptime> <key>*`: get and touch, with CAS unique.
    Gats(u32),
}

/// The storage commands (protocol.txt, "Storage commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Store unconditionally.
    Set,
    /// Store only if the key is absent.
    Add,
    /// Store only if the key is present.
    Replace,
    /// Append to an existing value (flags and exptime are ignored by the server).
    Append,
    /// Prepend to an existing value (flags and exptime are ignored by the server).
    Prepend,
    /// Store only if the item's CAS unique still equals this one.
    Cas(u64),
}

impl Storage {
    fn name(self) -> &'static [u8] {
        match self {
            Storage::Set => b"set ",
            Storage::Add => b"add ",
            Storage::Replace => b"replace ",
            Storage::Append => b"append ",
            Storage::Prepend => b"prepend ",
            Storage::Cas(_) => b"cas ",
        }
    }
}

fn end_line(out: &mut Vec<u8>, noreply: bool) {
    if noreply {
        out.extend_from_slice(b" noreply");
    }
    out.extend_from_slice(b"\r\n");
}

/// Starts a retrieval command line; follow with [`push_key`] for each key, then
/// [`finish_line`].
#[inline]
pub(crate) fn begin_retrieval(out: &mut Vec<u8>, cmd: Retrieval) {
    match cmd {
        Retrieval::Get => out.extend_from_slice(b"get"),
        Retrieval::Gets => out.extend_from_slice(b"gets"),
        Retrieval::Gat(exptime) => {
            out.extend_from_slice(b"gat ");
            put_u64(out, exptime.into());
        }
        Retrieval::Gats(exptime) => {
            out.extend_from_slice(b"gats ");
            put_u64(out, exptime.into());
        }
    }
}

/// Appends one key to a retrieval command line started by [`begin_retrieval`].
#[inline]
pub(crate) fn push_key(out: &mut Vec<u8>, key: Key<'_>) {
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
}

/// Ends a command line built piecewise.
#[inline]
pub(crate) fn finish_line(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\r\n");
}

/// Encodes a single-key retrieval command (`Retrieval::Gat(30)` of `k`: `gat 30 k\r\n`).
pub(crate) fn encode_get(out: &mut Vec<u8>, cmd: Retrieval, key: Key<'_>) {
    begin_retrieval(out, cmd);
    push_key(out, key);
    finish_line(out);
}

/// Encodes the command line of a storage command for a value of `len` bytes (`Storage::Cas(77)`
/// of `k`, flags 3, exptime 60, 5 bytes, noreply: `cas k 3 60 5 77 noreply\r\n`). The caller
/// sends the value and then [`DATA_TRAILER`].
pub(crate) fn encode_store(
    out: &mut Vec<u8>,
    cmd: Storage,
    key: Key<'_>,
    flags: u32,
    exptime: u32,
    len: usize,
    noreply: bool,
) {
    out.extend_from_slice(cmd.name());
    out.extend_from_slice(key.as_bytes());
    out.push(b' ');
    put_u64(out, flags.into());
    out.push(b' ');
    put_u64(out, exptime.into());
    out.push(b' ');
    put_u64(out, len as u64);
    if let Storage::Cas(unique) = cmd {
        out.push(b' ');
        put_u64(out, unique);
    }
    end_line(out, noreply);
}

/// Encodes `delete <key> [noreply]`.
pub(crate) fn encode_delete(out: &mut Vec<u8>, key: Key<'_>, noreply: bool) {
    out.extend_from_slice(b"delete ");
    out.extend_from_slice(key.as_bytes());
    end_line(out, noreply);
}

/// Encodes `incr` (or `decr` when `decr` is true) `<key> <delta> [noreply]`.
pub(crate) fn encode_arith(out: &mut Vec<u8>, decr: bool, key: Key<'_>, delta: u64, noreply: bool) {
    out.extend_from_slice(if decr { b"decr " } else { b"incr " });
    out.extend_from_slice(key.as_bytes());
    out.push(b' ');
    put_u64(out, delta);
    end_line(out, noreply);
}

/// Encodes `touch <key> <exptime> [noreply]`.
pub(crate) fn encode_touch(out: &mut Vec<u8>, key: Key<'_>, exptime: u32, noreply: bool) {
    out.extend_from_slice(b"touch ");
    out.extend_from_slice(key.as_bytes());
    out.push(b' ');
    put_u64(out, exptime.into());
    end_line(out, noreply);
}

/// Encodes `flush_all [delay] [noreply]`.
pub(crate) fn encode_flush_all(out: &mut Vec<u8>, delay: Option<u32>, noreply: bool) {
    out.extend_from_slice(b"flush_all");
    if let Some(delay) = delay {
        out.push(b' ');
        put_u64(out, delay.into());
    }
    end_line(out, noreply);
}

/// Encodes `version`.
pub(crate) fn encode_version(out: &mut Vec<u8>) {
    out.extend_from_slice(b"version\r\n");
}

/// Encodes `verbosity <level> [noreply]`.
pub(crate) fn encode_verbosity(out: &mut Vec<u8>, level: u32, noreply: bool) {
    out.extend_from_slice(b"verbosity ");
    put_u64(out, level.into());
    end_line(out, noreply);
}

/// Checks a `stats` argument: printable words separated by single spaces, so that it cannot
/// end the line or carry a second command.
pub(crate) fn valid_stats_arg(arg: &[u8]) -> bool {
    !arg.is_empty()
        && arg.len() <= MAX_LINE
        && arg.iter().all(|&b| b > b' ' && b != 0x7f || b == b' ')
        && !arg.starts_with(b" ")
        && !arg.ends_with(b" ")
        && !arg.windows(2).any(|w| w == b"  ")
}

/// Encodes `stats` or `stats <arg>` (e.g. `items`, `slabs`, `settings`, `sizes`, `conns`,
/// `reset`, `detail dump`). `arg` must pass [`valid_stats_arg`]; the client checks it.
pub(crate) fn encode_stats(out: &mut Vec<u8>, arg: Option<&[u8]>) {
    out.extend_from_slice(b"stats");
    if let Some(arg) = arg {
        debug_assert!(valid_stats_arg(arg));
        out.push(b' ');
        out.extend_from_slice(arg);
    }
    out.extend_from_slice(b"\r\n");
}

/// Encodes `lru_crawler metadump all`: one `key=<url-encoded key> exp=.. la=.. ...` line per
/// item, then `END` (memcached 1.5+; protocol.txt, "lru_crawler metadump").
pub(crate) fn encode_metadump(out: &mut Vec<u8>) {
    out.extend_from_slice(b"lru_crawler metadump all\r\n");
}

/// Encodes `quit`: the server closes the connection without a reply.
pub(crate) fn encode_quit(out: &mut Vec<u8>) {
    out.extend_from_slice(b"quit\r\n");
}

/// One unit of a server reply. Borrows from the parsed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response<'a> {
    /// `VALUE <key> <flags> <bytes> [<cas unique>]` and its data block.
    Value {
        /// The item's key.
        key: &'a [u8],
        /// The item's flags (32 bits since memcached 1.2.1).
        flags: u32,
        /// The CAS unique, present for `gets` and `gats`.
        cas: Option<u64>,
        /// The data block; binary-safe, it may contain `\r\n`.
        data: &'a [u8],
    },
    /// `END`: closes a retrieval or stats reply.
    End,
    /// `STORED`
    Stored,
    /// `NOT_STORED`: an add/replace/append/prepend condition was not met.
    NotStored,
    /// `EXISTS`: a cas lost against a newer write.
    Exists,
    /// `NOT_FOUND`
    NotFound,
    /// `DELETED`
    Deleted,
    /// `TOUCHED`
    Touched,
    /// `OK` (flush_all, verbosity, stats detail on/off).
    Ok,
    /// `RESET` (stats reset).
    Reset,
    /// The new value after incr/decr.
    Number(u64),
    /// `VERSION <version>`
    Version(&'a [u8]),
    /// `STAT <name> <value>`. The lines of `stats cachedump` (`ITEM <key> <rest>`) and
    /// `stats detail dump` (`PREFIX <prefix> <rest>`) come the same way: second word as the
    /// name, the rest as the value.
    Stat {
        /// The statistic's name.
        name: &'a [u8],
        /// Its value, as sent (may contain spaces).
        value: &'a [u8],
    },
    /// `ERROR [<msg>]`: the server did not know the command.
    Error(&'a [u8]),
    /// `CLIENT_ERROR <msg>`
    ClientError(&'a [u8]),
    /// `SERVER_ERROR <msg>`
    ServerError(&'a [u8]),
}

impl Response<'_> {
    /// Encodes the reply the way memcached sends it. Used by tests, the hostile fake server and
    /// the fuzz targets to produce valid input.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let simple: &[u8] = match *self {
            Response::Value {
                key,
                flags,
                cas,
                data,
            } => {
                out.extend_from_slice(b"VALUE ");
                out.extend_from_slice(key);
                out.push(b' ');
                put_u64(out, flags.into());
                out.push(b' ');
                put_u64(out, data.len() as u64);
                if let Some(cas) = cas {
                    out.push(b' ');
                    put_u64(out, cas);
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
                return;
            }
            Response::Number(n) => {
                put_u64(out, n);
                out.extend_from_slice(b"\r\n");
                return;
            }
            Response::Version(v) => return line2(out, b"VERSION", v),
            Response::Stat { name, value } => {
                out.extend_from_slice(b"STAT ");
                return line2(out, name, value);
            }
            Response::Error(b"") => b"ERROR",
            Response::Error(m) => return line2(out, b"ERROR", m),
            Response::ClientError(m) => return line2(out, b"CLIENT_ERROR", m),
            Response::ServerError(m) => return line2(out, b"SERVER_ERROR", m),
            Response::End => b"END",
            Response::Stored => b"STORED",
            Response::NotStored => b"NOT_STORED",
            Response::Exists => b"EXISTS",
            Response::NotFound => b"NOT_FOUND",
            Response::Deleted => b"DELETED",
            Response::Touched => b"TOUCHED",
            Response::Ok => b"OK",
            Response::Reset => b"RESET",
        };
        out.extend_from_slice(simple);
        out.extend_from_slice(b"\r\n");
    }
}

fn line2(out: &mut Vec<u8>, word: &[u8], rest: &[u8]) {
    out.extend_from_slice(word);
    out.push(b' ');
    out.extend_from_slice(rest);
    out.extend_from_slice(b"\r\n");
}

/// Parses one reply unit from the start of `buf`.
///
/// Returns `Partial` when `buf` ends before the unit does, and `Complete((consumed, reply))`
/// otherwise. A `VALUE` header claiming more than `limits.max_value` bytes is an error as soon
/// as its line has arrived, before the caller buffers any of the data. The data block is
/// located by its length, never by searching for `\r\n` (protocol.txt, "Protocol": the data may
/// contain it).
pub fn parse_reply<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Status<(usize, Response<'a>)>, ParseError> {
    let (line, line_len) = match take_line(buf) {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(Status::Partial),
        // memcached ends metadump lines with a bare `\n` (and only them): checked here, off
        // the path of every other reply.
        Err(ParseError::BadLineEnding) if buf.starts_with(b"key=") => {
            let nl = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
            let value = &buf[4..nl];
            if value.is_empty() || value.contains(&b'\r') {
                return Err(ParseError::BadFormat);
            }
            let reply = Response::Stat {
                name: b"key",
                value,
            };
            return Ok(Status::Complete((nl + 1, reply)));
        }
        Err(e) => return Err(e),
    };
    if let Some(fields) = line.strip_prefix(b"VALUE ") {
        // The per-item hot path of every get: the common shape in one forward pass.
        if let Some(header) = value_header(fields) {
            return value_data(buf, header, line_len, limits);
        }
    }
    let (word, rest) = split_word(line);
    let exact = |r: Response<'a>| {
        if rest.is_empty() && !line.ends_with(b" ") {
            Ok(r)
        } else {
            Err(ParseError::BadFormat)
        }
    };
    let reply = match word {
        b"VALUE" => return parse_value(buf, rest, line_len, limits),
        b"END" => exact(Response::End)?,
        b"STORED" => exact(Response::Stored)?,
        b"NOT_STORED" => exact(Response::NotStored)?,
        b"EXISTS" => exact(Response::Exists)?,
        b"NOT_FOUND" => exact(Response::NotFound)?,
        b"DELETED" => exact(Response::Deleted)?,
        b"TOUCHED" => exact(Response::Touched)?,
        b"OK" => exact(Response::Ok)?,
        b"RESET" => exact(Response::Reset)?,
        b"ERROR" => Response::Error(rest),
        b"CLIENT_ERROR" => Response::ClientError(rest),
        b"SERVER_ERROR" => Response::ServerError(rest),
        b"VERSION" => Response::Version(rest),
        b"STAT" | b"ITEM" | b"PREFIX" => {
            let (name, value) = split_word(rest);
            if name.is_empty() {
                return Err(ParseError::BadFormat);
            }
            Response::Stat { name, value }
        }
        // The crawler is busy with another request: the server's refusal, said its way.
        b"BUSY" => Response::ServerError(line),
        w if w.first().is_some_and(u8::is_ascii_digit) => {
            // incr/decr reply. The server may pad a shrunken number with spaces
            // (protocol.txt, "Increment/Decrement"), so trailing spaces are tolerated.
            if rest.iter().any(|&b| b != b' ') {
                return Err(ParseError::BadFormat);
            }
            Response::Number(parse_u64(w).ok_or(ParseError::BadNumber)?)
        }
        _ => return Err(ParseError::UnknownReply),
    };
    Ok(Status::Complete((line_len, reply)))
}

fn parse_value<'a>(
    buf: &'a [u8],
    fields: &'a [u8],
    line_len: usize,
    limits: &Limits,
) -> Result<Status<(usize, Response<'a>)>, ParseError> {
    // `<key> <flags> <bytes> [<cas unique>]`, single spaces (SWAR splits: this is the
    // per-item hot path of a multi-get).
    let (key, rest) = split_word(fields);
    let (flags, rest) = split_word(rest);
    let (len, rest) = split_word(rest);
    let (cas, extra) = split_word(rest);
    let spaces = fields.len() - key.len() - flags.len() - len.len() - cas.len() - extra.len();
    if key.is_empty() || flags.is_empty() || len.is_empty() || !extra.is_empty() {
        return Err(ParseError::BadFormat);
    }
    // Every separator present must have a field after it ("VALUE k 0 3 " has a dangling one).
    let cas = match (cas.is_empty(), spaces) {
        (true, 2) => None,
        (false, 3) => Some(cas),
        _ => return Err(ParseError::BadFormat),
    };
    let flags = parse_u64(flags)
        .and_then(|f| u32::try_from(f).ok())
        .ok_or(ParseError::BadNumber)?;
    let len = parse_u64(len).ok_or(ParseError::BadNumber)?;
    let cas = match cas {
        Some(c) => Some(parse_u64(c).ok_or(ParseError::BadNumber)?),
        None => None,
    };
    value_data(
        buf,
        ValueHeader {
            key,
            flags,
            len,
            cas,
        },
        line_len,
        limits,
    )
}

/// Parses the next reply unit if it is the `VALUE` block of the expected key (`prefix` +
/// `key`, a valid key) in its common shape; `None` otherwise (another key, a miss's `END`, a
/// line not all here yet, any unusual spelling), and the caller then calls [`parse_reply`].
///
/// A multi-get's replies come in request order, so the next hit is usually for the next key
/// asked: comparing against it finds the key's end without scanning for it, and the line's
/// end without a separate search. Whenever this returns `Some`, [`parse_reply`] returns the
/// same (a valid key holds no space or line break, the rest is digits, spaces and `\r\n`).
///
/// ```text
/// use mcstore::proto::{Limits, Status, text::{parse_value_of, Response}};
/// let input = b"VALUE ns:k 5 3\r\nabc\r\nEND\r\n";
/// let r = parse_value_of(input, b"ns:", b"k", &Limits::default()).unwrap().unwrap();
/// assert_eq!(r, Status::Complete((21, Response::Value { key: b"ns:k", flags: 5, cas: None, data: b"abc" })));
/// assert!(parse_value_of(input, b"ns:", b"other", &Limits::default()).is_none());
/// ```
pub(crate) fn parse_value_of<'a>(
    buf: &'a [u8],
    prefix: &[u8],
    key: &[u8],
    limits: &Limits,
) -> Option<Result<Status<(usize, Response<'a>)>, ParseError>> {
    let end = 6 + prefix.len() + key.len();
    // At least 8 bytes: "VALUE " and a key byte and its space.
    let head = buf.get(..(end + 1).max(8))?;
    let verb = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if verb & 0xffff_ffff_ffff != u64::from_le_bytes(*b"VALUE \0\0")
        || head[end] != b' '
        || !(prefix.is_empty() || short_eq(&head[6..6 + prefix.len()], prefix))
        || !short_eq(&head[6 + prefix.len()..end], key)
    {
        return None;
    }
    let (flags, p) = digits(buf, end + 1)?;
    if buf.get(p) != Some(&b' ') {
        return None;
    }
    let (len, p) = digits(buf, p + 1)?;
    let (cas, p) = match buf.get(p)? {
        b' ' => {
            let (c, p) = digits(buf, p + 1)?;
            (Some(c), p)
        }
        _ => (None, p),
    };
    if buf.get(p..p + 2)? != b"\r\n" {
        return None;
    }
    let header = ValueHeader {
        key: &buf[6..end],
        flags: u32::try_from(flags).ok()?,
        len,
        cas,
    };
    Some(value_data(buf, header, p + 2, limits))
}

/// The fields of a `VALUE` line.
struct ValueHeader<'a> {
    key: &'a [u8],
    flags: u32,
    len: u64,
    cas: Option<u64>,
}

/// The fields of a well-formed `VALUE` line (`<key> <flags> <bytes>[ <cas>]`, single spaces,
/// numbers of at most 19 digits), read in one pass; `None` for anything else, which
/// [`parse_value`] then examines to name the error (or accept a 20-digit number). Both read
/// the key the same way: everything up to the first space.
fn value_header(fields: &[u8]) -> Option<ValueHeader<'_>> {
    let k = super::find_byte(fields, b' ')?;
    if k == 0 {
        return None;
    }
    let (flags, p) = digits(fields, k + 1)?;
    if fields.get(p) != Some(&b' ') {
        return None;
    }
    let (len, p) = digits(fields, p + 1)?;
    let cas = match fields.get(p) {
        None => None,
        Some(b' ') => match digits(fields, p + 1)? {
            (c, end) if end == fields.len() => Some(c),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ValueHeader {
        key: &fields[..k],
        flags: u32::try_from(flags).ok()?,
        len,
        cas,
    })
}

/// The data block after a `VALUE` line of `line_len` bytes: the size limit is checked before
/// anything is buffered, and the block must end with `\r\n`.
#[inline(always)]
fn value_data<'a>(
    buf: &'a [u8],
    h: ValueHeader<'a>,
    line_len: usize,
    limits: &Limits,
) -> Result<Status<(usize, Response<'a>)>, ParseError> {
    let ValueHeader {
        key,
        flags,
        len,
        cas,
    } = h;
    if len > limits.max_value as u64 {
        return Err(ParseError::ValueTooLarge(len));
    }
    // len <= max_value (a usize), so this cannot overflow for any sane limit; check anyway.
    let data_end = line_len
        .checked_add(len as usize)
        .ok_or(ParseError::ValueTooLarge(len))?;
    let total = data_end
        .checked_add(2)
        .ok_or(ParseError::ValueTooLarge(len))?;
    if buf.len() < total {
        return Ok(Status::Partial);
    }
    if &buf[data_end..total] != DATA_TRAILER {
        return Err(ParseError::BadDataTerminator);
    }
    Ok(Status::Complete((
        total,
        Response::Value {
            key,
            flags,
            cas,
            data: &buf[line_len..data_end],
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim() -> Limits {
        Limits { max_value: 4096 }
    }

    fn one(input: &[u8]) -> Result<Status<(usize, Response<'_>)>, ParseError> {
        parse_reply(input, &lim())
    }

    /// memcached ends metadump lines with a bare `\n`; only they are read so, and a line
    /// cut short waits for its end.
    #[test]
    fn metadump_lines() {
        let input = b"key=a%25b exp=-1 la=1 cas=1 fetch=no cls=1 size=63\nEND\r\n";
        let Ok(Status::Complete((n, r))) = one(input) else {
            panic!("{:?}", one(input));
        };
        assert_eq!(
            r,
            Response::Stat {
                name: b"key",
                value: b"a%25b exp=-1 la=1 cas=1 fetch=no cls=1 size=63"
            }
        );
        assert_eq!(one(&input[n..]), Ok(Status::Complete((5, Response::End))));
        assert_eq!(one(b"key=a exp=-1"), Ok(Status::Partial));
        assert_eq!(one(b"key=\n"), Err(ParseError::BadFormat));
        assert_eq!(one(b"key=a\rb\n"), Err(ParseError::BadFormat));
        // Any other reply still needs its `\r\n`.
        assert_eq!(one(b"END\n"), Err(ParseError::BadLineEnding));
    }

    #[test]
    fn every_reply_table() {
        use Response as R;
        let table: &[(&[u8], R<'_>)] = &[
            (b"END\r\n", R::End),
            (b"STORED\r\n", R::Stored),
            (b"NOT_STORED\r\n", R::NotStored),
            (b"EXISTS\r\n", R::Exists),
            (b"NOT_FOUND\r\n", R::NotFound),
            (b"DELETED\r\n", R::Deleted),
            (b"TOUCHED\r\n", R::Touched),
            (b"OK\r\n", R::Ok),
            (b"RESET\r\n", R::Reset),
            (b"ERROR\r\n", R::Error(b"")),
            (b"ERROR too long\r\n", R::Error(b"too long")),
            (
                b"CLIENT_ERROR bad data chunk\r\n",
                R::ClientError(b"bad data chunk"),
            ),
            (
                b"SERVER_ERROR object too large for cache\r\n",
                R::ServerError(b"object too large for cache"),
            ),
            (b"VERSION 1.6.18\r\n", R::Version(b"1.6.18")),
            (b"42\r\n", R::Number(42)),
            (b"0\r\n", R::Number(0)),
            (b"18446744073709551615\r\n", R::Number(u64::MAX)),
            (b"9  \r\n", R::Number(9)),
            (
                b"STAT pid 1234\r\n",
                R::Stat {
                    name: b"pid",
                    value: b"1234",
                },
            ),
            (
                b"STAT evictions on\r\n",
                R::Stat {
                    name: b"evictions",
                    value: b"on",
                },
            ),
            (
                b"STAT rusage_user 0.123 extra\r\n",
                R::Stat {
                    name: b"rusage_user",
                    value: b"0.123 extra",
                },
            ),
            (
                b"ITEM foo [5 b; 0 s]\r\n",
                R::Stat {
                    name: b"foo",
                    value: b"[5 b; 0 s]",
                },
            ),
            (
                b"VALUE k 0 3\r\nabc\r\n",
                R::Value {
                    key: b"k",
                    flags: 0,
                    cas: None,
                    data: b"abc",
                },
            ),
            (
                b"VALUE k 4294967295 0 18446744073709551615\r\n\r\n",
                R::Value {
                    key: b"k",
                    flags: u32::MAX,
                    cas: Some(u64::MAX),
                    data: b"",
                },
            ),
            (
                b"VALUE k 1 7 7\r\n\r\nEND\r\n\r\n",
                R::Value {
                    key: b"k",
                    flags: 1,
                    cas: Some(7),
                    data: b"\r\nEND\r\n",
                },
            ),
        ];
        for (input, want) in table {
            assert_eq!(
                one(input),
                Ok(Status::Complete((input.len(), *want))),
                "{}",
                input.escape_ascii()
            );
            // Round trip: the server-side encoder gives back the same bytes.
            let mut enc = Vec::new();
            want.encode(&mut enc);
            // Padded numbers and ITEM lines have no distinct encoding of their own.
            if !input.starts_with(b"9 ") && !input.starts_with(b"ITEM") {
                assert_eq!(&enc[..], &input[..], "{}", input.escape_ascii());
            }
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        use ParseError as E;
        let table: &[(&[u8], E)] = &[
            (b"BOGUS\r\n", E::UnknownReply),
            (b"\r\n", E::UnknownReply),
            (b"stored\r\n", E::UnknownReply),
            (b"END\n", E::BadLineEnding),
            (b"\n", E::BadLineEnding),
            (b"END \r\n", E::BadFormat),
            (b"STORED x\r\n", E::BadFormat),
            (b"VALUE k 0\r\n", E::BadFormat),
            (b"VALUE k 0 1 2 3\r\n", E::BadFormat),
            (b"VALUE  0 1\r\n", E::BadFormat),
            (b"VALUE k -1 1\r\n", E::BadNumber),
            (b"VALUE k 4294967296 1\r\n", E::BadNumber),
            (b"VALUE k 0 1x\r\n", E::BadNumber),
            (b"VALUE k 0 1 x\r\n", E::BadNumber),
            (b"VALUE k 0 99999999999999999999999\r\n", E::BadNumber),
            (b"VALUE k 0 4097\r\n", E::ValueTooLarge(4097)),
            (b"VALUE k 0 4294967295\r\n", E::ValueTooLarge(4294967295)),
            (b"VALUE k 0 3\r\nabcXY", E::BadDataTerminator),
            (b"VALUE k 0 3\r\nabcd\r\n", E::BadDataTerminator),
            (b"18446744073709551616\r\n", E::BadNumber),
            (b"12a\r\n", E::BadNumber),
            (b"12 a\r\n", E::BadFormat),
            (b"STAT\r\n", E::BadFormat),
        ];
        for (input, want) in table {
            assert_eq!(one(input), Err(*want), "{}", input.escape_ascii());
        }
    }

    #[test]
    fn long_garbage_is_rejected_without_a_newline() {
        let junk = vec![b'x'; MAX_LINE + 2];
        assert_eq!(one(&junk), Err(ParseError::LineTooLong(MAX_LINE)));
        // Just under the cap it is still "need more".
        assert_eq!(one(&junk[..MAX_LINE + 1]), Ok(Status::Partial));
    }

    #[test]
    fn every_strict_prefix_is_partial() {
        let replies: &[&[u8]] = &[
            b"END\r\n",
            b"VALUE key 3 10 99\r\n0123\r\n6789\r\n",
            b"STAT pid 1\r\n",
            b"SERVER_ERROR out of memory\r\n",
            b"12345\r\n",
            b"VERSION 1.6.18\r\n",
            b"VALUE k 0 0\r\n\r\n",
        ];
        for r in replies {
            for cut in 0..r.len() {
                assert_eq!(
                    one(&r[..cut]),
                    Ok(Status::Partial),
                    "{:?}",
                    &r[..cut].escape_ascii()
                );
            }
            assert!(one(r).unwrap().is_complete());
        }
    }

    /// Parses a whole stream, feeding it in two pieces split at `cut` the way a driver would
    /// (keep unconsumed bytes, append more, parse again).
    fn parse_stream(input: &[u8], cut: usize) -> Result<Vec<String>, ParseError> {
        let mut out = Vec::new();
        let mut buf = input[..cut].to_vec();
        let mut rest = &input[cut..];
        loop {
            match parse_reply(&buf, &lim())? {
                Status::Complete((n, r)) => {
                    out.push(format!("{r:?}"));
                    buf.drain(..n);
                }
                Status::Partial if rest.is_empty() => {
                    assert!(buf.is_empty(), "trailing bytes");
                    return Ok(out);
                }
                Status::Partial => {
                    buf.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
    }

    #[test]
    fn splitting_anywhere_gives_the_same_result() {
        let stream: &[u8] =
            b"VALUE a 1 3 5\r\nx\r\n\r\nVALUE bb 2 0 6\r\n\r\nSTAT x y z\r\nEND\r\nSTORED\r\n77\r\n";
        let whole = parse_stream(stream, stream.len()).unwrap();
        assert_eq!(whole.len(), 6);
        for cut in 0..=stream.len() {
            assert_eq!(parse_stream(stream, cut).unwrap(), whole, "cut at {cut}");
        }
    }

    #[test]
    fn encoders() {
        let k = Key::new(b"key").unwrap();
        let mut o = Vec::new();
        let mut check = |f: &dyn Fn(&mut Vec<u8>), want: &[u8]| {
            o.clear();
            f(&mut o);
            assert_eq!(
                o.escape_ascii().to_string(),
                want.escape_ascii().to_string()
            );
        };
        check(&|o| encode_get(o, Retrieval::Get, k), b"get key\r\n");
        check(&|o| encode_get(o, Retrieval::Gets, k), b"gets key\r\n");
        check(&|o| encode_get(o, Retrieval::Gats(0), k), b"gats 0 key\r\n");
        check(
            &|o| {
                begin_retrieval(o, Retrieval::Get);
                push_key(o, k);
                push_key(o, Key::new(b"k2").unwrap());
                finish_line(o);
            },
            b"get key k2\r\n",
        );
        check(
            &|o| encode_store(o, Storage::Set, k, 0, 0, 0, false),
            b"set key 0 0 0\r\n",
        );
        check(
            &|o| encode_store(o, Storage::Add, k, u32::MAX, 1, 10, false),
            b"add key 4294967295 1 10\r\n",
        );
        check(
            &|o| encode_store(o, Storage::Replace, k, 1, 2, 3, true),
            b"replace key 1 2 3 noreply\r\n",
        );
        check(
            &|o| encode_store(o, Storage::Append, k, 0, 0, 1, false),
            b"append key 0 0 1\r\n",
        );
        check(
            &|o| encode_store(o, Storage::Prepend, k, 0, 0, 1, false),
            b"prepend key 0 0 1\r\n",
        );
        check(&|o| encode_delete(o, k, false), b"delete key\r\n");
        check(&|o| encode_delete(o, k, true), b"delete key noreply\r\n");
        check(
            &|o| encode_arith(o, false, k, u64::MAX, false),
            b"incr key 18446744073709551615\r\n",
        );
        check(
            &|o| encode_arith(o, true, k, 1, true),
            b"decr key 1 noreply\r\n",
        );
        check(&|o| encode_touch(o, k, 100, false), b"touch key 100\r\n");
        check(&|o| encode_flush_all(o, None, false), b"flush_all\r\n");
        check(
            &|o| encode_flush_all(o, Some(5), true),
            b"flush_all 5 noreply\r\n",
        );
        check(&|o| encode_version(o), b"version\r\n");
        check(&|o| encode_verbosity(o, 1, false), b"verbosity 1\r\n");
        check(&|o| encode_stats(o, None), b"stats\r\n");
        check(&|o| encode_stats(o, Some(b"slabs")), b"stats slabs\r\n");
        check(
            &|o| encode_stats(o, Some(b"detail dump")),
            b"stats detail dump\r\n",
        );
        check(&|o| encode_quit(o), b"quit\r\n");
    }

    #[test]
    fn stats_args() {
        assert!(valid_stats_arg(b"items"));
        assert!(valid_stats_arg(b"cachedump 1 10"));
        for bad in [
            &b""[..],
            b" items",
            b"items ",
            b"a  b",
            b"items\r\nflush_all",
            b"a\tb",
        ] {
            assert!(!valid_stats_arg(bad), "{}", bad.escape_ascii());
        }
    }

    fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop_oneof![0x21u8..0x7f, 0x80u8..=0xff], 1..=250)
    }

    fn reply_strategy() -> impl Strategy<Value = OwnedReply> {
        let word = prop::collection::vec(0x21u8..0x7f, 1..20);
        let text = prop::collection::vec(0x20u8..0x7f, 0..60);
        prop_oneof![
            (
                key_strategy(),
                any::<u32>(),
                proptest::option::of(any::<u64>()),
                prop::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(k, f, c, d)| OwnedReply::Value(k, f, c, d)),
            any::<u64>().prop_map(|n| OwnedReply::Fixed(Response::Number(n))),
            (word.clone(), text.clone()).prop_map(|(n, v)| OwnedReply::Stat(n, v)),
            word.clone().prop_map(OwnedReply::Version),
            text.clone().prop_map(OwnedReply::ClientError),
            text.prop_map(OwnedReply::ServerError),
            prop::sample::select(vec![
                Response::End,
                Response::Stored,
                Response::NotStored,
                Response::Exists,
                Response::NotFound,
                Response::Deleted,
                Response::Touched,
                Response::Ok,
                Response::Reset,
            ])
            .prop_map(OwnedReply::Fixed),
        ]
    }

    #[derive(Debug, Clone)]
    enum OwnedReply {
        Value(Vec<u8>, u32, Option<u64>, Vec<u8>),
        Stat(Vec<u8>, Vec<u8>),
        Version(Vec<u8>),
        ClientError(Vec<u8>),
        ServerError(Vec<u8>),
        /// A reply without borrowed parts.
        Fixed(Response<'static>),
    }

    impl OwnedReply {
        fn borrow(&self) -> Response<'_> {
            match self {
                OwnedReply::Value(k, f, c, d) => Response::Value {
                    key: k,
                    flags: *f,
                    cas: *c,
                    data: d,
                },
                OwnedReply::Stat(n, v) => Response::Stat { name: n, value: v },
                OwnedReply::Version(v) => Response::Version(v),
                OwnedReply::ClientError(m) => Response::ClientError(m),
                OwnedReply::ServerError(m) => Response::ServerError(m),
                OwnedReply::Fixed(r) => *r,
            }
        }
    }

    proptest! {
        // Most generated lines are malformed: enough cases for a few hundred accepted ones.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The one-pass reading of a `VALUE` line agrees with the field-splitting one on
        /// every line it accepts (and declines the rest, which the latter then judges).
        #[test]
        fn value_fast_path_agrees(
            key in prop::collection::vec(prop::sample::select(b"kkkx\r0 ".to_vec()), 0..5),
            numbers in prop::collection::vec(
                prop_oneof![
                    4 => prop::collection::vec(prop::sample::select(b"0123456789012345678901234567890123456789 x".to_vec()), 0..6),
                    1 => prop::collection::vec(prop::sample::select(b"09".to_vec()), 18..22),
                ],
                2..5),
            data_len in 0usize..8,
        ) {
            // Space-joined parts: mostly well-formed lines, with every way to go wrong nearby.
            let mut fields = key;
            for n in &numbers {
                fields.push(b' ');
                fields.extend_from_slice(n);
            }
            let mut wire = b"VALUE ".to_vec();
            wire.extend_from_slice(&fields);
            wire.extend_from_slice(b"\r\n");
            let line_len = wire.len();
            wire.extend(std::iter::repeat_n(b'd', data_len));
            wire.extend_from_slice(b"\r\n");
            let slow = parse_value(&wire, &fields, line_len, &lim());
            if value_header(&fields).is_some() {
                prop_assert_eq!(parse_reply(&wire, &lim()), slow);
            } else {
                prop_assert!(slow.is_err() || fields.iter().filter(|&&b| b.is_ascii_digit()).count() >= 20);
            }
        }
    }

    proptest! {
        /// Whenever the expected-key reading answers, it answers as `parse_reply` does; and
        /// it answers for every complete, well-formed hit of that key.
        #[test]
        fn value_of_agrees(
            prefix in "[a-z:]{0,3}",
            key in "[a-zA-Z0-9:_]{1,12}",
            wire_key in prop_oneof!["[a-zA-Z0-9:_]{1,12}", Just(String::new())],
            flags in any::<u32>(),
            len in 0usize..6,
            cas in prop::option::of(any::<u64>()),
            tail in prop::collection::vec(prop::sample::select(b"0 \r\nx".to_vec()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            // The key on the wire: the expected one, or another.
            let on_wire = if wire_key.is_empty() { format!("{prefix}{key}") } else { wire_key };
            let mut wire = format!("VALUE {on_wire} {flags} {len}").into_bytes();
            if let Some(c) = cas {
                wire.extend_from_slice(format!(" {c}").as_bytes());
            }
            wire.extend_from_slice(&tail);
            wire.extend_from_slice(b"\r\n");
            wire.extend(std::iter::repeat_n(b'd', len));
            wire.extend_from_slice(b"\r\nEND\r\n");
            let wire = &wire[..cut.index(wire.len() + 1)];
            let fast = parse_value_of(wire, prefix.as_bytes(), key.as_bytes(), &lim());
            if let Some(r) = fast {
                prop_assert_eq!(r, parse_reply(wire, &lim()));
            } else if tail.is_empty()
                && on_wire == format!("{prefix}{key}")
                && cas.is_none_or(|c| c < 10u64.pow(19))
            {
                // Declined only while the header line is incomplete (or for a 20-digit cas).
                prop_assert_eq!(parse_reply(wire, &lim()), Ok(Status::Partial));
            }
        }

        #[test]
        fn round_trip(replies in prop::collection::vec(reply_strategy(), 1..8), cut in any::<prop::sample::Index>()) {
            let mut wire = Vec::new();
            for r in &replies {
                r.borrow().encode(&mut wire);
            }
            // Parse the whole stream back, in order.
            let mut at = 0;
            for r in &replies {
                match parse_reply(&wire[at..], &lim()).unwrap() {
                    Status::Complete((n, got)) => {
                        prop_assert_eq!(got, r.borrow());
                        at += n;
                    }
                    Status::Partial => prop_assert!(false, "partial on complete input"),
                }
            }
            prop_assert_eq!(at, wire.len());
            // A split anywhere parses to the same units.
            let cut = cut.index(wire.len() + 1);
            let split = parse_stream(&wire, cut).unwrap();
            let whole = parse_stream(&wire, wire.len()).unwrap();
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Status::Complete((n, _))) = parse_reply(&input, &lim()) {
                prop_assert!(n > 0 && n <= input.len());
            }
        }

        #[test]
        fn storage_line_is_one_line(key in key_strategy(), flags in any::<u32>(), exp in any::<u32>(), len in 0usize..1<<20, cas in any::<u64>(), noreply in any::<bool>()) {
            let mut out = Vec::new();
            encode_store(&mut out, Storage::Cas(cas), Key::new(&key).unwrap(), flags, exp, len, noreply);
            prop_assert!(out.ends_with(b"\r\n"));
            prop_assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
            let line = std::str::from_utf8(&out[..out.len() - 2]).ok();
            if let Some(line) = line {
                let words: Vec<&str> = line.split(' ').collect();
                prop_assert_eq!(words[2], flags.to_string());
                prop_assert_eq!(words[4], len.to_string());
                prop_assert_eq!(words[5], cas.to_string());
            }
        }
    }
}
