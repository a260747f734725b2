//! Fuzz bodies, shared by the cargo-fuzz targets in `fuzz/` (built with `--cfg fuzzing`, which
//! cargo-fuzz sets) and by this module's `replay` tests, which run every input of the committed
//! corpora in `cargo test`. Each body panics on a broken invariant. Not public API: the module
//! exists only under `cfg(fuzzing)` and in the crate's own tests.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

#[cfg(all(feature = "serde", feature = "lz4", feature = "zstd", feature = "zlib"))]
mod codec;
#[cfg(all(feature = "serde", feature = "lz4", feature = "zstd", feature = "zlib"))]
pub use codec::{codec_decode, codec_seeds};

use crate::conn::exchange_for_fuzzing::{Exchange, Failure, ReadBuf};
use crate::engine::batch::for_fuzzing::{OneChain, OneServer};
use crate::engine::pipeline::for_fuzzing::read_quiet;
use crate::engine::reply::{arith_value, existed, SingleReader, Strays};
use crate::proto::text::{self, parse_reply, Response};
use crate::proto::wire::{Cmd, Expect, GetOpts, Kind, Outcome, StoreOpts, Wire};
use crate::proto::{Key, Limits, SetOutcome, Status};

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

/// Arbitrary bytes as a discovery endpoint's reply ([`parse_cluster`]): no panic; a
/// complete reply takes no more than the input, every node it lists has a port and an
/// address, and each prefix of it is `Partial`.
///
/// [`parse_cluster`]: crate::proto::cluster::parse_cluster
pub fn cluster_reply(data: &[u8]) {
    use crate::proto::cluster::{parse_cluster, ClusterReply};
    let limits = Limits { max_value: 4096 };
    if let Ok(Status::Complete((n, reply))) = parse_cluster(data, &limits) {
        assert!(n <= data.len());
        if let ClusterReply::Config(c) = reply {
            for node in c.nodes() {
                assert!(node.port > 0 && !node.host.is_empty());
                assert!(node.address().ends_with(&format!(":{}", node.port)));
            }
            for cut in [0, n / 2, n.saturating_sub(1)] {
                let r = parse_cluster(&data[..cut], &limits);
                assert!(matches!(r, Ok(Status::Partial)), "prefix {cut}: {r:?}");
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
    text::encode_store(
        &mut out,
        text::Storage::Cas(cas),
        k,
        flags,
        flags,
        value.len(),
        flags & 1 == 1,
    );
    text::encode_get(&mut out, text::Retrieval::Gats(flags), k);
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
    use crate::proto::binary::{parse_reply, HEADER_LEN};
    for max_value in [16usize, 1 << 20] {
        let limits = Limits { max_value };
        let mut rest = data;
        while !rest.is_empty() {
            match parse_reply(rest, &limits) {
                Ok(Status::Complete((n, p))) => {
                    assert!(n >= HEADER_LEN && n <= rest.len());
                    for part in [p.extras, p.key, p.value] {
                        assert!(within(&rest[..n], part));
                    }
                    assert_eq!(HEADER_LEN + p.extras.len() + p.key.len() + p.value.len(), n);
                    assert!(p.value.len() <= max_value + 4 + 250 + 16);
                    let mut more = rest[..n].to_vec();
                    more.extend_from_slice(&[0x81; 30]);
                    assert_eq!(parse_reply(&more, &limits), Ok(Status::Complete((n, p))));
                    rest = &rest[n..];
                }
                Ok(Status::Partial) => break,
                Err(_) => break,
            }
        }
    }
}

/// How a [`conn_stream`] run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The reply was complete and answered the request.
    Done,
    /// The reply was complete: an error reply the client reports.
    Refused,
    /// The connection failed (parse error, out of step, closed, deadline): the client closes it.
    Failed,
}

/// Request mix of a [`conn_stream`] input, from its second byte.
struct StreamCmd {
    batch: bool,
    kind: Kind,
    keys: usize,
}

impl StreamCmd {
    fn of(b: u8) -> StreamCmd {
        let keys = usize::from(b >> 3) % 16 + 1;
        let (batch, kind) = match b % 8 {
            0 => (false, Kind::Get),
            1 => (false, Kind::Store),
            2 => (false, Kind::Delete),
            3 => (false, Kind::Arith),
            4 => (false, Kind::Touch),
            5 => (true, Kind::Get),
            6 => (true, Kind::Store),
            // Batches whose every item answers, as a shared client's round sends them.
            _ => (
                true,
                [Kind::Delete, Kind::Touch, Kind::Arith][usize::from(b >> 3) % 3],
            ),
        };
        StreamCmd {
            batch,
            kind,
            keys: if batch { keys } else { 1 },
        }
    }

    fn cmd<'k>(&self, key: Key<'k>) -> Cmd<'k> {
        match self.kind {
            Kind::Get => Cmd::Get(key, GetOpts::default()),
            Kind::Store => Cmd::Store(key, StoreOpts::default(), STREAM_VALUE.len()),
            Kind::Delete => Cmd::delete(key),
            Kind::Arith => Cmd::Arith {
                key,
                decr: false,
                delta: 1,
            },
            _ => Cmd::Touch(key, 60),
        }
    }
}

/// The value a store in a [`conn_stream`] input carries.
const STREAM_VALUE: &[u8] = b"value";
/// The opaque of a single command in a [`conn_stream`] input.
const STREAM_OPAQUE: u32 = 1;

/// The opaques of the quiet commands a [`conn_stream`] input sends before its request or as
/// its pipeline (item `j` has `QUIET_OPAQUE + j`).
const QUIET_OPAQUE: u32 = 7000;

/// The header of a [`conn_stream`] input: protocol, request mix, write size, read sizes,
/// deadline; and where the reply bytes start.
struct StreamInput<'d> {
    protocol: u8,
    /// A pipeline: the request's items go as quiet commands, closed by a sync whose reply
    /// ends it (`data[0] / 3 % 4 == 3`).
    pipeline: bool,
    /// Pipelined rounds: two chains (a shared client's rounds) written back to back, their
    /// replies read from one stream (`data[0] / 12` odd, not a pipeline): see
    /// [`stream_rounds`].
    rounds: bool,
    /// The connection owed a sync: two quiet commands that fail (a delete of a missing key,
    /// an add of an existing one) went first, then a sync ahead of the request, and the
    /// replies up to the sync's are strays (bit 7 of `data[1]`).
    owed: bool,
    cmd: StreamCmd,
    write_size: usize,
    read_sizes: &'d [u8],
    /// The step at which the deadline passes (0: never).
    deadline_step: u8,
    replies: &'d [u8],
}

impl<'d> StreamInput<'d> {
    fn of(data: &'d [u8]) -> Option<StreamInput<'d>> {
        let n_sizes = usize::from(*data.get(3)? % 8) + 1;
        let deadline_step = *data.get(4 + n_sizes)?;
        let pipeline = data[0] / 3 % 4 == 3;
        let mut cmd = StreamCmd::of(data[1]);
        if pipeline {
            // Pipelines carry stores, deletes, incrs and touches (no gets).
            cmd.keys = usize::from(data[1] >> 3) % 16 + 1;
            if cmd.kind == Kind::Get {
                cmd.kind = Kind::Touch;
            }
        }
        Some(StreamInput {
            protocol: data[0] % 3,
            pipeline,
            rounds: data[0] / 12 % 2 == 1 && !pipeline,
            owed: data[1] & 0x80 != 0 && !pipeline,
            cmd,
            write_size: usize::from(data[2]) * 4 + 1,
            read_sizes: &data[4..4 + n_sizes],
            deadline_step,
            replies: &data[5 + n_sizes..],
        })
    }

    fn keys(&self) -> Vec<Vec<u8>> {
        (0..self.cmd.keys)
            .map(|j| format!("k{j}").into_bytes())
            .collect()
    }
}

/// The request a [`conn_stream`] input sends (for capturing real replies as seeds).
pub fn conn_stream_request(data: &[u8]) -> Option<Vec<u8>> {
    use crate::proto::wire::{Binary, Meta, Text};
    let input = StreamInput::of(data)?;
    let Request {
        mut head, value, ..
    } = match input.protocol {
        0 => request::<Text>(&input),
        1 => request::<Binary>(&input),
        _ => request::<Meta>(&input),
    };
    if let Some((v, trailer)) = value {
        head.extend_from_slice(v);
        head.extend_from_slice(trailer);
    }
    Some(head)
}

/// Runs [`conn_stream`] and says how it ended (`None`: the input is too short).
pub fn conn_stream_end(data: &[u8]) -> Option<StreamEnd> {
    use crate::proto::wire::{Binary, Meta, Text};
    let input = StreamInput::of(data)?;
    Some(match input.protocol {
        0 => stream_on::<Text>(&input),
        1 => stream_on::<Binary>(&input),
        _ => stream_on::<Meta>(&input),
    })
}

/// One connection, sans I/O, on all three protocols, through the code the client runs: the
/// input picks the protocol, a request (a single get, set, delete, incr or touch, or a
/// multi-get, multi-set or multi-delete of up to 16 keys), how many bytes each write takes,
/// the sizes of the reads that deliver the reply bytes, and the step at which the deadline
/// passes. The request goes through the connection's `Exchange` (partial writes,
/// `poll_transmit`), the reply bytes through the driver's read buffer, and each unit through
/// the client's own reader (single command or batch: decoding, item matching, end markers).
/// Checks: no panic; every hit reaches an item that was asked for, in request order and at
/// most once; what `poll_transmit` offers is exactly the unsent rest of the request; a
/// complete reply always yields a result or an error; the read buffer never fills with a
/// unit the parser accepted; a deadline or the end of the bytes fails the exchange cleanly.
pub fn conn_stream(data: &[u8]) {
    let _ = conn_stream_end(data);
}

/// What a [`conn_stream`] input sends: the head the connection buffers, for a single store the
/// value and trailer sent from the caller's slices, and for a batch its plan.
struct Request {
    head: Vec<u8>,
    value: Option<(&'static [u8], &'static [u8])>,
    batch: Option<OneServer>,
}

/// Appends `cmd` as a quiet (noreply) command, with its value if it is a store.
fn quiet<W: Wire>(head: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: u32) {
    W::encode(head, cmd, opaque, true);
    if let Cmd::Store(..) = cmd {
        head.extend_from_slice(STREAM_VALUE);
        head.extend_from_slice(W::TRAILER);
    }
}

fn request<W: Wire>(input: &StreamInput<'_>) -> Request {
    let mut head = Vec::new();
    let keys = input.keys();
    if input.rounds {
        for round in stream_rounds(input) {
            drop(round.encode::<W>(&mut head));
        }
        return Request {
            head,
            value: None,
            batch: None,
        };
    }
    if input.pipeline {
        for (j, k) in keys.iter().enumerate() {
            let key = Key::new(k).expect("valid");
            quiet::<W>(&mut head, &input.cmd.cmd(key), QUIET_OPAQUE + j as u32);
        }
        W::encode(&mut head, &Cmd::Sync, 0, false);
        return Request {
            head,
            value: None,
            batch: None,
        };
    }
    if input.owed {
        let missing = Key::new(b"missing").expect("valid");
        let existing = Key::new(b"k1").expect("valid");
        let add = StoreOpts {
            mode: crate::proto::StoreMode::Add,
            ..StoreOpts::default()
        };
        quiet::<W>(&mut head, &Cmd::delete(missing), QUIET_OPAQUE);
        let store = Cmd::Store(existing, add, STREAM_VALUE.len());
        quiet::<W>(&mut head, &store, QUIET_OPAQUE + 1);
        W::encode(&mut head, &Cmd::Sync, 0, false);
    }
    if input.cmd.batch {
        let mut batch = OneServer::new(input.cmd.kind, keys.len());
        if input.owed {
            batch.owe_sync();
        }
        let value = (input.cmd.kind == Kind::Store).then_some(STREAM_VALUE);
        batch.encode::<W>(&mut head, &keys, value, |k| input.cmd.cmd(k));
        Request {
            head,
            value: None,
            batch: Some(batch),
        }
    } else {
        let key = Key::new(&keys[0]).expect("valid");
        W::encode(&mut head, &input.cmd.cmd(key), STREAM_OPAQUE, false);
        let value = (input.cmd.kind == Kind::Store).then_some((STREAM_VALUE, W::TRAILER));
        Request {
            head,
            value,
            batch: None,
        }
    }
}

/// Writes the request and feeds the replies of `input` through `read`, as the driver does,
/// with the input's write and read sizes and deadline. `Ok` when the last reply was read.
fn drive(
    input: &StreamInput<'_>,
    head: &[u8],
    value: Option<(&[u8], &[u8])>,
    read: &mut impl FnMut(&[u8]) -> Result<Status<(usize, bool)>, crate::proto::ParseError>,
) -> Result<(), Failure> {
    let limits = Limits { max_value: 256 };
    let mut rbuf = ReadBuf::new(32, limits.max_value + text::MAX_LINE + 4);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(1);
    let mut ex = Exchange::new(head.len(), value, deadline);
    let whole: Vec<u8> = match value {
        Some((v, t)) => [head, v, t].concat(),
        None => head.to_vec(),
    };
    let (mut written, mut fed, mut step) = (0, 0, 0usize);
    let replies = input.replies;
    loop {
        step += 1;
        let past = input.deadline_step != 0 && step >= usize::from(input.deadline_step);
        let now = if past { deadline } else { start };
        if !ex.is_written() {
            let (parts, n) = ex.poll_transmit(head);
            let offered: Vec<u8> = parts[..n].concat();
            assert_eq!(
                offered,
                whole[written..],
                "poll_transmit offers the unsent rest"
            );
            let take = input.write_size.min(offered.len());
            ex.handle_written(take);
            written += take;
        }
        if fed < replies.len() {
            let sizes = input.read_sizes;
            let Some(spare) = rbuf.spare() else {
                panic!("read buffer full of one unit the parser accepted");
            };
            let take = (usize::from(sizes[step % sizes.len()]) % 64 + 1)
                .min(spare.len())
                .min(replies.len() - fed);
            spare[..take].copy_from_slice(&replies[fed..fed + take]);
            rbuf.filled(take);
            fed += take;
            ex.handle_input(&mut rbuf, read)?;
            if ex.is_done() {
                return Ok(());
            }
        } else if ex.is_written() {
            // No more bytes will come: the server closed its side.
            return Err(ex.handle_eof());
        }
        assert_eq!(
            ex.poll_timeout(),
            Some(deadline),
            "not done: a deadline to wake for"
        );
        ex.handle_timeout(now)?;
    }
}

fn stream_on<W: Wire>(input: &StreamInput<'_>) -> StreamEnd {
    let Request {
        head,
        value,
        mut batch,
    } = request::<W>(input);
    if input.rounds {
        return rounds_on::<W>(input, &head);
    }
    let keys = input.keys();
    if input.pipeline {
        let (mut errors, mut unmet, mut units) = (0, 0, 0);
        let limits = Limits { max_value: 256 };
        let protocol = match input.protocol {
            0 => crate::Protocol::Text,
            1 => crate::Protocol::Binary,
            _ => crate::Protocol::Meta,
        };
        let r = drive(input, &head, value, &mut |buf| {
            let r = read_quiet(buf, &limits, protocol, &mut errors, &mut unmet);
            units += usize::from(matches!(r, Ok(Status::Complete(_))));
            r
        });
        assert!(errors + unmet <= units, "counted more than was read");
        return match r {
            Err(_) => StreamEnd::Failed,
            // The sync's reply ended it, and is counted as neither.
            Ok(()) if errors + unmet >= units => panic!("a pipeline ended without its sync"),
            Ok(()) if errors > 0 => StreamEnd::Refused,
            Ok(()) => StreamEnd::Done,
        };
    }
    if let Some(mut batch) = batch.take_if(|_| input.cmd.kind.answers_each()) {
        // Every item answers once, in request order, with an outcome of its kind (or an
        // error of its own): as a round hands them to its callers.
        let mut answered = 0;
        let mut no_hit =
            |_: usize, _: crate::client::ItemRef<'_>| panic!("a hit answered a touch or an incr");
        let kind = input.cmd.kind;
        let mut on_item = |j: usize, o: Outcome<'_>| {
            assert_eq!(j, answered, "an item answered out of order or twice");
            answered += 1;
            match (kind, o) {
                (Kind::Touch, Outcome::Touched(_) | Outcome::NotFound(_))
                | (Kind::Arith, Outcome::Number(..) | Outcome::NotFound(_))
                | (_, Outcome::Error { .. }) => Ok(()),
                _ => Err(crate::proto::ParseError::Unexpected),
            }
        };
        let r = drive(input, &head, value, &mut |buf| {
            batch.read_answers::<W>(&keys[..], buf, &mut no_hit, &mut on_item)
        });
        return match r {
            Err(_) => StreamEnd::Failed,
            Ok(()) if batch.refused() => StreamEnd::Refused,
            Ok(()) if batch.closed() => panic!("a connection closed without an error reply"),
            Ok(()) => {
                assert!(
                    batch.finished(),
                    "a batch ended before its reply was complete"
                );
                assert_eq!(answered, keys.len(), "a batch ended with items unanswered");
                StreamEnd::Done
            }
        };
    }
    if let Some(mut batch) = batch {
        let mut last_hit: Option<usize> = None;
        let mut on_hit = |j: usize| {
            assert!(j < keys.len(), "a hit for an item never asked for");
            assert!(last_hit.is_none_or(|l| j > l), "hits out of request order");
            last_hit = Some(j);
        };
        let r = drive(input, &head, value, &mut |buf| {
            batch.read::<W>(&keys, buf, &mut on_hit)
        });
        return match r {
            Err(_) => StreamEnd::Failed,
            Ok(()) if batch.refused() => StreamEnd::Refused,
            Ok(()) if batch.closed() => panic!("a connection closed without an error reply"),
            Ok(()) => {
                assert!(
                    batch.finished(),
                    "a batch ended before its reply was complete"
                );
                assert!(input.cmd.kind == Kind::Get || last_hit.is_none());
                StreamEnd::Done
            }
        };
    }
    let key = keys[0].clone();
    let kind = input.cmd.kind;
    let mut seen_hit = false;
    // As the client's calls fold their outcomes: a get takes its hit once (as `retrieve`),
    // a store without a CAS only stored / not stored (as `store_cmd`).
    let on = |o: Outcome<'_>, last: bool| -> Result<Option<()>, crate::proto::ParseError> {
        let fits = match (kind, o) {
            (Kind::Get, Outcome::Hit(h)) if !seen_hit && h.key.is_none_or(|k| k == key) => {
                seen_hit = true;
                return Ok(last.then_some(()));
            }
            (Kind::Get, Outcome::End | Outcome::Miss) => true,
            (Kind::Store, Outcome::Store(SetOutcome::Stored | SetOutcome::NotStored, ..)) => true,
            (Kind::Delete | Kind::Touch, o) => return existed(o).map(|r| r.map(drop)),
            (Kind::Arith, o) => return arith_value(o).map(|r| r.map(drop)),
            _ => false,
        };
        if fits {
            Ok(Some(()))
        } else {
            Err(crate::proto::ParseError::Unexpected)
        }
    };
    let mut reader = SingleReader {
        expect: Expect::single(kind, STREAM_OPAQUE),
        limits: Limits { max_value: 256 },
        label: "fuzz",
        data_block: value.is_some(),
        on,
        out: None,
        refused: None,
    };
    let mut strays = if input.owed {
        Strays::owing()
    } else {
        Strays::default()
    };
    let limits = Limits { max_value: 256 };
    let r = drive(input, &head, value, &mut |buf| {
        if strays.pending {
            return strays.read::<W>(buf, &limits);
        }
        reader.read::<W>(buf)
    });
    match r {
        Err(_) => StreamEnd::Failed,
        Ok(()) => {
            assert!(
                !strays.pending,
                "the request's reply read before the sync's"
            );
            if reader.refused.is_some() {
                return StreamEnd::Refused;
            }
            assert!(reader.out.is_some(), "a complete reply without a result");
            StreamEnd::Done
        }
    }
}

/// One pipelined round of a [`conn_stream`] input: parts of a kind each, their keys, and the
/// first opaque (each part's item `j` has `base + j`).
struct StreamRound {
    parts: Vec<(Kind, Vec<Vec<u8>>)>,
    base: u32,
}

/// The two rounds of a `rounds` input: round A a get, a store and a part of the input's
/// kind (a delete, touch or incr) over its keys; round B a get and a delete of other keys.
fn stream_rounds(input: &StreamInput<'_>) -> [StreamRound; 2] {
    let keys = input.keys();
    let last = match input.cmd.kind {
        Kind::Touch | Kind::Arith => input.cmd.kind,
        _ => Kind::Delete,
    };
    let other: Vec<Vec<u8>> = (0..keys.len().div_ceil(2))
        .map(|j| format!("b{j}").into_bytes())
        .collect();
    [
        StreamRound {
            parts: vec![
                (Kind::Get, keys.clone()),
                (Kind::Store, keys.clone()),
                (last, keys),
            ],
            base: 0,
        },
        StreamRound {
            parts: vec![(Kind::Get, other.clone()), (Kind::Delete, other)],
            base: 1000,
        },
    ]
}

struct RoundKeys<'k>(&'k [Vec<u8>]);

impl crate::engine::batch::Keys for RoundKeys<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn key(&self, j: usize) -> &[u8] {
        &self.0[j]
    }
}

impl StreamRound {
    fn chain(&self) -> OneChain {
        let shape: Vec<_> = (self.parts.iter())
            .map(|(kind, keys)| (*kind, keys.len(), self.base))
            .collect();
        OneChain::new(&shape)
    }

    fn keys(&self) -> Vec<RoundKeys<'_>> {
        self.parts.iter().map(|(_, k)| RoundKeys(k)).collect()
    }

    fn with_parts<R>(&self, f: impl FnOnce(&[crate::engine::batch::Part<'_>]) -> R) -> R {
        let keys = self.keys();
        let parts: Vec<_> = (self.parts.iter().zip(&keys))
            .map(|((kind, _), keys)| crate::engine::batch::Part {
                kind: *kind,
                keys,
                result: Ok(()),
            })
            .collect();
        f(&parts)
    }

    /// Encodes the round as a shared client's chain, whose reader it returns.
    fn encode<W: Wire>(&self, out: &mut Vec<u8>) -> OneChain {
        let mut chain = self.chain();
        let value = |k: usize, _: usize| (self.parts[k].0 == Kind::Store).then_some(STREAM_VALUE);
        let cmd = chain_commands(|k, _, key| match self.parts[k].0 {
            Kind::Get => Cmd::Get(key, GetOpts::default()),
            Kind::Store => Cmd::Store(key, StoreOpts::default(), STREAM_VALUE.len()),
            Kind::Touch => Cmd::Touch(key, 60),
            Kind::Arith => Cmd::Arith {
                key,
                decr: false,
                delta: 1,
            },
            _ => Cmd::delete(key),
        });
        self.with_parts(|parts| chain.encode::<W>(out, parts, &value, &cmd));
        chain
    }
}

/// `f`, typed as a chain's command builder.
fn chain_commands<F: Fn(usize, usize, Key<'_>) -> Cmd<'_>>(f: F) -> F {
    f
}

/// Pipelined rounds: round A's replies, then round B's, from one stream, each reply unit read
/// by the client's chain reader resuming where it stopped. Checks: every hit and answer goes
/// to an item of its own round's part of that kind, in request order and at most once; round
/// B reads nothing before round A's reply is complete; a round that ends without a doubt has
/// every part complete.
fn rounds_on<W: Wire>(input: &StreamInput<'_>, head: &[u8]) -> StreamEnd {
    let rounds = stream_rounds(input);
    let mut chains = rounds.each_ref().map(|r| r.encode::<W>(&mut Vec::new()));
    // Per round and part, the last item answered.
    let mut last: [Vec<Option<usize>>; 2] = [vec![None; 3], vec![None; 2]];
    let mut cur = 0;
    let r = drive(input, head, None, &mut |buf| {
        let round = &rounds[cur];
        let (chain, last) = (&mut chains[cur], &mut last[cur]);
        let every = W::end_batch(&mut Vec::new(), Kind::Store, 1).every_item_replies;
        let mut seen = |k: usize, j: usize, hit: bool| {
            let (kind, keys) = &round.parts[k];
            assert_eq!(
                hit,
                *kind == Kind::Get,
                "a hit for a write, or an answer for a get"
            );
            assert!(j < keys.len(), "an item never asked for");
            let order_known = hit || kind.answers_each() || every;
            if order_known {
                assert!(
                    last[k].is_none_or(|l| j > l),
                    "answered out of order or twice"
                );
            }
            last[k] = Some(j);
        };
        let seen = std::cell::RefCell::new(&mut seen);
        let mut on_hit = |k: usize, j: usize, _: crate::client::ItemRef<'_>| {
            (seen.borrow_mut())(k, j, true);
        };
        let mut on_item = |k: usize, j: usize, _: Outcome<'_>| {
            // As the shared client's rounds: nothing but a hit answers a get.
            if round.parts[k].0 == Kind::Get {
                return Err(crate::proto::ParseError::Unexpected);
            }
            (seen.borrow_mut())(k, j, false);
            Ok(())
        };
        let r = round.with_parts(|parts| chain.read::<W>(parts, buf, &mut on_hit, &mut on_item))?;
        match r {
            Status::Complete((n, true)) if cur == 0 && !chain.doubt() => {
                cur = 1;
                Ok(Status::Complete((n, false)))
            }
            r => Ok(r),
        }
    });
    match r {
        Err(_) => StreamEnd::Failed,
        Ok(()) if chains.iter().any(OneChain::doubt) => StreamEnd::Refused,
        Ok(()) => {
            assert_eq!(cur, 1, "round B's reply ended round A's");
            for (round, chain) in rounds.iter().zip(&chains) {
                for k in 0..round.parts.len() {
                    assert!(
                        chain.finished(k) || chain.failed(k),
                        "a round ended before its reply was complete"
                    );
                }
            }
            if chains
                .iter()
                .any(|c| (0..3).any(|k| k < c.parts() && c.failed(k)))
            {
                return StreamEnd::Refused;
            }
            StreamEnd::Done
        }
    }
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
        // So must the single commands' plain success reading.
        if let Some(fast) = meta::parse_done(buf) {
            assert_eq!(
                Some(fast),
                meta::as_plain_done(&general),
                "parse_done disagrees with parse_reply"
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

#[cfg(test)]
mod tests;
