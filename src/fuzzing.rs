//! Fuzz bodies, shared by the cargo-fuzz targets in `fuzz/` and by the stable test that
//! replays their corpora (`proto-tests/fuzz_replay.rs`). Each panics on a broken invariant.
#![allow(missing_docs)]

use crate::proto::text::{self, parse_reply, Response};
use crate::proto::{Key, Limits, Status};

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

fn check_borrows(input: &[u8], r: &Response<'_>) {
    let parts: &[&[u8]] = match r {
        Response::Value { key, data, .. } => &[key, data],
        Response::Version(v)
        | Response::Error(v)
        | Response::ClientError(v)
        | Response::ServerError(v) => &[v],
        Response::Stat { name, value } => &[name, value],
        _ => &[],
    };
    for p in parts {
        assert!(within(input, p), "reply borrows outside its input");
    }
}

/// A reply parser driven unit by unit by [`reply_units`].
trait ReplyParser {
    type Reply<'a>: std::fmt::Debug;
    /// Bytes appended after a complete unit; they must not change its parse.
    const MORE: &'static [u8];
    fn parse<'a>(
        buf: &'a [u8],
        limits: &Limits,
    ) -> Result<Status<(usize, Self::Reply<'a>)>, crate::proto::ParseError>;
    /// The protocol's own checks of one complete unit parsed from the start of `input`.
    fn check(input: &[u8], reply: &Self::Reply<'_>, limits: &Limits);
}

/// Arbitrary bytes as a reply stream: parse unit after unit under a small and a large value
/// limit. Checks: consumed bytes are within the input and never zero; a complete parse does
/// not change when more bytes follow; the protocol's checks hold; every prefix of a partial
/// unit is partial.
fn reply_units<P: ReplyParser>(data: &[u8]) {
    for max_value in [16usize, 1 << 20] {
        let limits = Limits { max_value };
        let mut rest = data;
        let mut units = 0;
        while !rest.is_empty() && units < 10_000 {
            match P::parse(rest, &limits) {
                Ok(Status::Complete((n, r))) => {
                    assert!(n > 0 && n <= rest.len(), "consumed {n} of {}", rest.len());
                    P::check(rest, &r, &limits);
                    let mut more = rest[..n].to_vec();
                    more.extend_from_slice(P::MORE);
                    match P::parse(&more, &limits) {
                        Ok(Status::Complete((m, r2))) => {
                            assert_eq!(m, n);
                            assert_eq!(format!("{r2:?}"), format!("{r:?}"));
                        }
                        other => panic!("complete parse changed with more input: {other:?}"),
                    }
                    rest = &rest[n..];
                    units += 1;
                }
                Ok(Status::Partial) => {
                    for cut in [0, rest.len() / 2] {
                        assert!(matches!(
                            P::parse(&rest[..cut], &limits),
                            Ok(Status::Partial)
                        ));
                    }
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

struct TextParser;

impl ReplyParser for TextParser {
    type Reply<'a> = Response<'a>;
    const MORE: &'static [u8] = b"\r\nEND\r\nVALUE x 0 1\r\n";
    fn parse<'a>(
        buf: &'a [u8],
        limits: &Limits,
    ) -> Result<Status<(usize, Response<'a>)>, crate::proto::ParseError> {
        let general = parse_reply(buf, limits);
        // The multi-get's expected-key reading must agree wherever it answers: try it with
        // the key the input spells (split into a namespace and a key).
        if let Some(fields) = buf.strip_prefix(b"VALUE ") {
            let key = fields.split(|&b| b == b' ').next().unwrap_or_default();
            if crate::proto::Key::new(key).is_ok() {
                let (ns, key) = key.split_at(key.len() / 2);
                if let Some(fast) = crate::proto::text::parse_value_of(buf, ns, key, limits) {
                    assert_eq!(fast, general, "parse_value_of disagrees with parse_reply");
                }
            }
        }
        general
    }
    fn check(input: &[u8], r: &Response<'_>, limits: &Limits) {
        check_borrows(input, r);
        if let Response::Value { data, .. } = r {
            assert!(data.len() <= limits.max_value);
        }
    }
}

/// Arbitrary bytes as a text reply stream (`reply_units`); borrowed slices lie inside the
/// input and a `VALUE` never exceeds the limit.
pub fn text_reply(data: &[u8]) {
    reply_units::<TextParser>(data);
    wire_units::<crate::proto::wire::Text>(data);
}

/// Structured round trip from raw bytes: derive a reply from the input, encode it the way the
/// server would, parse it back, compare; and encode requests for any valid key and check each
/// is exactly one line (no injection).
pub fn roundtrip(data: &[u8]) {
    if data.len() < 13 {
        return;
    }
    let (head, body) = data.split_at(13);
    let flags = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let cas = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
    let split = (head[12] as usize).min(body.len());
    let (key_raw, value) = body.split_at(split);
    let key: Vec<u8> = key_raw
        .iter()
        .map(|&b| if b <= b' ' || b == 0x7f { b'_' } else { b })
        .collect();
    let Ok(k) = Key::new(&key) else { return };
    let limits = Limits { max_value: 1 << 20 };
    let replies = [
        Response::Value {
            key: &key,
            flags,
            cas: Some(cas),
            data: value,
        },
        Response::Value {
            key: &key,
            flags,
            cas: None,
            data: value,
        },
        Response::Number(cas),
        Response::End,
        Response::Stored,
    ];
    let mut wire = Vec::new();
    for r in &replies {
        r.encode(&mut wire);
    }
    let mut at = 0;
    for r in &replies {
        match parse_reply(&wire[at..], &limits) {
            Ok(Status::Complete((n, got))) => {
                assert_eq!(&got, r);
                at += n;
            }
            other => panic!("round trip failed: {other:?}"),
        }
    }
    assert_eq!(at, wire.len());
    let mut out = Vec::new();
    text::encode_storage(
        &mut out,
        text::Storage::Cas(cas),
        k,
        flags,
        flags,
        value.len(),
        flags & 1 == 1,
    );
    text::encode_retrieval(&mut out, text::Retrieval::Gats(flags), k);
    text::encode_delete(&mut out, k, false);
    text::encode_arith(&mut out, true, k, cas, false);
    text::encode_touch(&mut out, k, flags, true);
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        5,
        "one line per command"
    );
}

/// Server specs and keys: parsing never panics, and what parses prints back consistently.
pub fn server_spec(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = s.parse::<crate::ServerSpec>() {
        let printed = match spec.addr {
            crate::ServerAddr::Unix(_) => spec.addr.to_string(),
            _ => format!("{}:{}", spec.addr, spec.weight),
        };
        let again: crate::ServerSpec = printed.parse().expect("a parsed spec prints back");
        assert_eq!(again.addr, spec.addr, "{s:?} printed as {printed:?}");
    }
    match Key::new(data) {
        Ok(k) => {
            assert!(!data.is_empty() && data.len() <= 250);
            assert!(k.as_bytes().iter().all(|&b| b > b' ' && b != 0x7f));
        }
        Err(_) => assert!(
            data.is_empty() || data.len() > 250 || data.iter().any(|&b| b <= b' ' || b == 0x7f)
        ),
    }
}

/// Arbitrary bytes through the command layer of protocol `W`, as every kind of command would
/// read them, single and batched. Checks: a unit consumes at least one byte and no more than
/// the input; a complete unit's reading does not change when more bytes follow; borrowed
/// slices lie inside the input; the value limit holds; and the multi-get fast path
/// (`batch_hit`), wherever it answers, reads the same hit as the general decoder.
fn wire_units<W: crate::proto::wire::Wire>(data: &[u8]) {
    use crate::proto::wire::{Expect, Kind, Outcome};
    let kinds = [
        Kind::Get,
        Kind::Store,
        Kind::Delete,
        Kind::Arith,
        Kind::Touch,
        Kind::Debug,
        Kind::Ok,
        Kind::Version,
        Kind::Stats,
        Kind::Quiet,
    ];
    for max_value in [16usize, 1 << 20] {
        let limits = Limits { max_value };
        for kind in kinds {
            for expect in [Expect::single(kind, 1), Expect::batch(kind)] {
                let mut rest = data;
                for _ in 0..1000 {
                    if rest.is_empty() {
                        break;
                    }
                    let (n, unit) = match W::decode(rest, &expect, &limits) {
                        Ok(Status::Complete(c)) => c,
                        Ok(Status::Partial) | Err(_) => break,
                    };
                    assert!(n > 0 && n <= rest.len(), "consumed {n} of {}", rest.len());
                    let mut more = rest[..n].to_vec();
                    more.extend_from_slice(b"\r\nEND\r\nMN\r\n\x81\x0a");
                    match W::decode(&more, &expect, &limits) {
                        Ok(Status::Complete((m, u2))) => {
                            assert_eq!(m, n);
                            assert_eq!(format!("{u2:?}"), format!("{unit:?}"));
                        }
                        other => panic!("complete decode changed with more input: {other:?}"),
                    }
                    if let Outcome::Hit(h) = unit.outcome {
                        // Binary bounds the whole body, extras and key included (`max_value`
                        // plus 270 bytes of slack); the text and meta checks are stricter.
                        assert!(within(&rest[..n], h.data) && h.data.len() <= max_value + 270);
                        if kind == Kind::Get && expect.opaque.is_none() {
                            let key = h.key.unwrap_or(b"");
                            let (ns, key) = key.split_at(key.len() / 2);
                            if let Some(fast) = W::batch_hit(rest, Some((ns, key)), &limits) {
                                let (m, b) = match fast {
                                    Ok(Status::Complete(c)) => c,
                                    other => panic!("batch_hit disagrees: {other:?}"),
                                };
                                assert_eq!(m, n, "batch_hit consumed differently");
                                assert_eq!((b.data, b.flags, b.cas), (h.data, h.flags, h.cas));
                            }
                        }
                    }
                    rest = &rest[n..];
                }
            }
        }
    }
}

/// Arbitrary bytes as a binary response stream: header validation, bounds, stability under
/// appended bytes, borrowed slices inside the input, the value limit.
pub fn binary_reply(data: &[u8]) {
    wire_units::<crate::proto::wire::Binary>(data);
    use crate::proto::binary::{parse_response, HEADER_LEN};
    for max_value in [16usize, 1 << 20] {
        let limits = Limits { max_value };
        let mut rest = data;
        while !rest.is_empty() {
            match parse_response(rest, &limits) {
                Ok(Status::Complete((n, p))) => {
                    assert!(n >= HEADER_LEN && n <= rest.len());
                    for part in [p.extras, p.key, p.value] {
                        assert!(within(&rest[..n], part));
                    }
                    assert_eq!(HEADER_LEN + p.extras.len() + p.key.len() + p.value.len(), n);
                    assert!(p.value.len() <= max_value + 4 + 250 + 16);
                    let mut more = rest[..n].to_vec();
                    more.extend_from_slice(&[0x81; 30]);
                    assert_eq!(parse_response(&more, &limits), Ok(Status::Complete((n, p))));
                    rest = &rest[n..];
                }
                Ok(Status::Partial) => break,
                Err(_) => break,
            }
        }
    }
}

/// A pipelined binary connection, sans I/O: the input picks how many Get requests are in
/// flight (opaques 0..n), a reply stream, and the sizes of the reads that deliver it. The
/// stream goes through the driver's real read buffer (`ReadBuf`: compaction, growth, its cap)
/// and the parser, and each reply is matched to the oldest outstanding request by opaque, the
/// rule the client applies. Checks: a reply is never given to a request with another opaque
/// (the connection would be dropped instead), every request ends with a result or the stream
/// ends in a clean error or a partial reply, and the buffer never grows past its cap.
pub fn reply_stream(data: &[u8]) {
    use crate::conn::buf_for_fuzzing::ReadBuf;
    use crate::proto::binary::parse_response;
    if data.len() < 2 {
        return;
    }
    let in_flight = u32::from(data[0] % 16) + 1;
    let n_sizes = (data[1] % 8) as usize + 1;
    if data.len() < 2 + n_sizes {
        return;
    }
    let sizes: Vec<usize> = data[2..2 + n_sizes]
        .iter()
        .map(|&b| b as usize % 64 + 1)
        .collect();
    let stream = &data[2 + n_sizes..];
    let limits = Limits { max_value: 256 };
    let cap = limits.max_value + 4 + 250 + 16 + 24;
    let mut buf = ReadBuf::new(32, cap);
    let mut fed = 0;
    let mut next = 0u32; // the opaque the next reply must carry
    let mut k = 0;
    'outer: loop {
        // Parse everything buffered.
        loop {
            match parse_response(buf.data(), &limits) {
                Ok(Status::Complete((n, p))) => {
                    if next >= in_flight || p.opaque != next {
                        break 'outer; // framing error: the client drops the connection
                    }
                    next += 1;
                    buf.consume(n);
                }
                Ok(Status::Partial) => break,
                Err(_) => break 'outer,
            }
        }
        if fed == stream.len() || next == in_flight {
            break;
        }
        let Some(spare) = buf.spare() else {
            // Only a reply above the parser's limit could fill the buffer; the parser refuses
            // those from the header, so this must not happen.
            panic!("read buffer full of one unit the parser accepted");
        };
        let take = sizes[k % sizes.len()]
            .min(spare.len())
            .min(stream.len() - fed);
        k += 1;
        spare[..take].copy_from_slice(&stream[fed..fed + take]);
        buf.filled(take);
        fed += take;
    }
    assert!(next <= in_flight);
}

fn check_meta_borrows(input: &[u8], r: &crate::proto::meta::Reply<'_>) {
    use crate::proto::meta::Reply;
    let parts: Vec<&[u8]> = match r {
        Reply::Meta(m) => [m.data, m.flags.key, m.flags.opaque]
            .into_iter()
            .flatten()
            .collect(),
        Reply::Debug(v) | Reply::Error(v) | Reply::ClientError(v) | Reply::ServerError(v) => {
            vec![v]
        }
    };
    for p in parts {
        assert!(within(input, p), "meta reply borrows outside its input");
    }
}

struct MetaParser;

impl ReplyParser for MetaParser {
    type Reply<'a> = crate::proto::meta::Reply<'a>;
    const MORE: &'static [u8] = b"\r\nMN\r\nVA 1 O1\r\n";
    fn parse<'a>(
        buf: &'a [u8],
        limits: &Limits,
    ) -> Result<Status<(usize, Self::Reply<'a>)>, crate::proto::ParseError> {
        use crate::proto::meta;
        let general = meta::parse_reply(buf, limits);
        // The multi-get's plain-hit reading must agree wherever it answers.
        if let Some(fast) = meta::parse_hit(buf, limits) {
            assert_eq!(
                Some(fast),
                meta::as_plain_hit(&general),
                "parse_hit disagrees with parse_reply"
            );
        }
        general
    }
    fn check(input: &[u8], r: &Self::Reply<'_>, limits: &Limits) {
        use crate::proto::meta::{self, Reply};
        check_meta_borrows(input, r);
        if let Reply::Meta(m) = r {
            assert!(m.data.map_or(0, <[u8]>::len) <= limits.max_value);
            if let (Some(k), true) = (m.flags.key, m.flags.base64_key) {
                let mut out = Vec::new();
                let _ = meta::decode_base64(&mut out, k);
            }
        }
        let mut wire = Vec::new();
        r.encode(&mut wire);
        match meta::parse_reply(&wire, limits) {
            Ok(Status::Complete((m, r3))) => {
                assert_eq!(m, wire.len());
                assert_eq!(&r3, r, "re-encoded reply parses differently");
            }
            other => panic!("re-encoded reply does not parse: {other:?}"),
        }
    }
}

/// Arbitrary bytes as a meta reply stream (`reply_units`); borrowed slices lie inside the
/// input; a `VA` never exceeds the limit; a parsed reply encodes to bytes that parse back to
/// it; a returned base64 key decodes (or is refused) without panicking.
pub fn meta_reply(data: &[u8]) {
    reply_units::<MetaParser>(data);
    wire_units::<crate::proto::wire::Meta>(data);
}

/// Replays every fuzz corpus and regression input through the same bodies the fuzz targets
/// call, on stable, without cargo-fuzz. A panicking input fails the test.
#[cfg(test)]
mod replay {
    use std::path::Path;

    fn replay(target: &str, body: fn(&[u8])) -> usize {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| body(&data));
                assert!(r.is_ok(), "{target}: {} panics", path.display());
                n += 1;
            }
        }
        println!("fuzz replay: {target}: {n} inputs");
        n
    }

    /// One test per target, each replaying its corpus and regressions.
    macro_rules! replays {
        ($($target:ident),*) => {$(
            #[test]
            fn $target() {
                assert!(replay(stringify!($target), super::$target) > 0);
            }
        )*};
    }

    replays!(
        text_reply,
        roundtrip,
        server_spec,
        binary_reply,
        reply_stream,
        meta_reply
    );
}
