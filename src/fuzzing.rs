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

/// Arbitrary bytes as a text reply stream: parse unit after unit under a small and a large
/// value limit. Checks: consumed bytes are within the input and never zero; a complete parse
/// does not change when more bytes follow; borrowed slices lie inside the input; a `VALUE`
/// never exceeds the limit.
pub fn text_reply(data: &[u8]) {
    for max_value in [16usize, 1 << 20] {
        let limits = Limits { max_value };
        let mut rest = data;
        let mut units = 0;
        while !rest.is_empty() && units < 10_000 {
            match parse_reply(rest, &limits) {
                Ok(Status::Complete((n, r))) => {
                    assert!(n > 0 && n <= rest.len(), "consumed {n} of {}", rest.len());
                    check_borrows(rest, &r);
                    if let Response::Value { data, .. } = r {
                        assert!(data.len() <= max_value);
                    }
                    // Stable under appended bytes.
                    let mut more = rest[..n].to_vec();
                    more.extend_from_slice(b"\r\nEND\r\nVALUE x 0 1\r\n");
                    match parse_reply(&more, &limits) {
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
                    // A partial parse stays partial for every prefix.
                    for cut in [0, rest.len() / 2] {
                        assert!(matches!(
                            parse_reply(&rest[..cut], &limits),
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
