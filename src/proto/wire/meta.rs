//! The meta protocol behind [`Wire`]. Every meta command carries an opaque (`O<n>`), and a
//! reply is taken only if it echoes the opaque its command was sent with: single commands
//! go without `q` and read one reply; batch and pipeline items carry `q`, and a batch ends
//! with `mn` (notes §5). Error lines (`CLIENT_ERROR`, `SERVER_ERROR`, `ERROR`) carry no
//! opaque: after one, the connection is closed. Commands the meta protocol lacks
//! (flush_all, verbosity, version, stats, quit) go as text commands, which memcached serves
//! on the same connection in order (the client never leaves a reply unread before them).

use super::text::{error_line, Text};
use super::{
    unit, BatchHit, BatchShape, Cmd, Decoded, Expect, Hit, HitRead, Kind, Outcome, Refusal,
    SetOutcome, Wire,
};
use crate::proto::meta::{self as m, ArithFlags, Code, DeleteFlags, GetFlags, Reply, SetFlags};
use crate::proto::{parse_u64, Limits, ParseError, Status};

pub(crate) struct Meta;

/// Encodes `cmd`; `opaque` is sent as `O<opaque>` when given.
#[inline(always)]
fn encode(out: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: Option<u32>, quiet: bool) {
    match *cmd {
        Cmd::Get(key, o) => {
            let f = GetFlags {
                value: true,
                client_flags: true,
                cas: o.cas || o.details,
                ttl: o.details,
                last_access: o.details,
                hit: o.details,
                no_bump: o.no_bump,
                touch: o.touch,
                vivify: o.lease_ttl,
                recache: o.recache_below,
                quiet,
                opaque,
                ..GetFlags::default()
            };
            m::encode_get(out, key, &f);
        }
        Cmd::Store(key, o, len) => {
            let f = SetFlags {
                mode: o.mode,
                ttl: o.ttl,
                client_flags: o.flags,
                cas: o.cas,
                invalidate: o.invalidate,
                return_cas: o.return_cas,
                quiet,
                opaque,
                ..SetFlags::default()
            };
            m::encode_store(out, key, len, &f);
        }
        Cmd::Delete(key) | Cmd::Invalidate(key, _) => {
            let ttl = match cmd {
                Cmd::Invalidate(_, ttl) => Some(*ttl),
                _ => None,
            };
            let f = DeleteFlags {
                invalidate: ttl.is_some(),
                ttl: ttl.flatten(),
                quiet,
                opaque,
                ..DeleteFlags::default()
            };
            m::encode_delete(out, key, &f);
        }
        Cmd::Arith { key, decr, delta } => {
            let f = ArithFlags {
                decr,
                delta,
                value: !quiet,
                quiet,
                opaque,
                ..ArithFlags::default()
            };
            m::encode_arith(out, key, &f);
        }
        // A hit answers HD even with q (notes §5).
        Cmd::Touch(key, ttl) => {
            let f = GetFlags {
                touch: Some(ttl),
                quiet,
                opaque,
                ..GetFlags::default()
            };
            m::encode_get(out, key, &f);
        }
        Cmd::Debug(key) => m::encode_debug(out, key),
        Cmd::Sync => m::encode_noop(out),
        Cmd::FlushAll(_)
        | Cmd::Verbosity(_)
        | Cmd::Version
        | Cmd::Stats(_)
        | Cmd::MetaDump
        | Cmd::Quit => Text::encode(out, cmd, 0, quiet),
        // Fronts check the capability first: never built for this protocol.
        Cmd::Auth { .. } => {}
    }
}

impl Wire for Meta {
    const TRAILER: &'static [u8] = m::DATA_TRAILER;

    #[inline(always)]
    fn encode(out: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: u32, quiet: bool) {
        encode(out, cmd, Some(opaque), quiet)
    }

    #[inline(always)]
    fn encode_item(out: &mut Vec<u8>, cmd: &Cmd<'_>, index: u32, _pos: usize) {
        encode(out, cmd, Some(index), !cmd.kind().answers_each())
    }

    fn end_batch(out: &mut Vec<u8>, kind: Kind, _n: usize) -> BatchShape {
        m::encode_noop(out);
        BatchShape::synced(kind)
    }

    #[inline(always)]
    fn batch_hit<'a>(buf: &'a [u8], _next: Option<(&[u8], &[u8])>, limits: &Limits) -> HitRead<'a> {
        // Most batch replies are plain hits: read without the general parser's flag table.
        let hit = |(n, h): (usize, m::Hit<'a>)| {
            let hit = BatchHit {
                data: h.data,
                flags: h.client_flags.unwrap_or(0),
                cas: h.cas,
                // A hit without an opaque names no item: refused by the caller.
                opaque: Some(h.opaque.unwrap_or(u32::MAX)),
                key: None,
            };
            (n, hit)
        };
        Some(m::parse_hit(buf, limits)?.map(|s| s.map(hit)))
    }

    #[inline(always)]
    fn decode<'a>(buf: &'a [u8], expect: &Expect, limits: &Limits) -> Decoded<'a> {
        let kind = expect.kind;
        if matches!(kind, Kind::Ok | Kind::Version | Kind::Stats) {
            return Text::decode(buf, expect, limits);
        }
        if matches!(kind, Kind::Store | Kind::Delete | Kind::Touch) {
            // A success in the common shape (`HD [c<cas>] O<opaque>`), without the flag table.
            if let Some((n, f)) = m::parse_done(buf) {
                if expect.opaque.is_some() && f.opaque != expect.opaque {
                    return Err(ParseError::Unexpected);
                }
                let outcome = match kind {
                    Kind::Store => Outcome::Store(SetOutcome::Stored, f.cas, f.opaque),
                    Kind::Delete => Outcome::Deleted(f.opaque),
                    _ => Outcome::Touched(f.opaque),
                };
                return unit(n, outcome, true);
            }
        }
        if kind == Kind::Get {
            // A hit in the common shape (`VA <len> f<flags> [c<cas>] O<opaque>`): read
            // without the general parser's flag table, as batches do; anything else (a miss,
            // metadata, lease flags) falls through to it.
            if let Some(r) = m::parse_hit(buf, limits) {
                let (n, h) = match r? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                };
                if expect.opaque.is_some() && h.opaque != expect.opaque {
                    return Err(ParseError::Unexpected);
                }
                let hit = Hit {
                    key: None,
                    opaque: h.opaque,
                    flags: h.client_flags.unwrap_or(0),
                    cas: h.cas,
                    data: h.data,
                    ..Hit::default()
                };
                return unit(n, Outcome::Hit(hit), true);
            }
        }
        let (n, r) = match m::parse_reply(buf, limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        let r = match r {
            Reply::Meta(r) => r,
            Reply::Debug(line) => return unit(n, Outcome::Debug(line), true),
            // An error line names no request: what follows it may answer someone else's, so
            // the connection is closed after it.
            Reply::Error(msg) => {
                return unit(n, error_line(Refusal::UnknownCommand, msg, true), true)
            }
            Reply::ClientError(msg) => {
                return unit(n, error_line(Refusal::Client, msg, true), true)
            }
            Reply::ServerError(msg) => {
                return unit(n, error_line(Refusal::Server, msg, true), true)
            }
        };
        let f = r.flags;
        let opaque = f.opaque_u32();
        // A single command's reply echoes its opaque (`mn` carries none, and is refused below):
        // anything else answers another request and is never handed to this caller.
        // (`me` takes none: its hit names the key, which the caller checks.)
        if expect.opaque.is_some()
            && kind != Kind::Debug
            && r.code != Code::Noop
            && opaque != expect.opaque
        {
            return Err(ParseError::Unexpected);
        }
        let outcome = match (r.code, r.data) {
            (Code::Value, Some(d)) if kind == Kind::Arith => {
                Outcome::Number(parse_u64(d).ok_or(ParseError::Unexpected)?, opaque)
            }
            (Code::Value, Some(data)) => Outcome::Hit(Hit {
                key: None,
                opaque,
                flags: f.client_flags.unwrap_or(0),
                cas: f.cas,
                data,
                ttl: f.ttl,
                last_access: f.last_access,
                hit_before: f.hit,
                won: f.won,
                already_won: f.already_won,
                stale: f.stale,
            }),
            (Code::Value, None) => return Err(ParseError::Unexpected),
            (Code::Done, _) => match kind {
                Kind::Store => Outcome::Store(SetOutcome::Stored, f.cas, opaque),
                Kind::Delete => Outcome::Deleted(opaque),
                _ => Outcome::Touched(opaque),
            },
            // A touch's miss (`mg k T`) names its item, as a delete's does: a batch of
            // touches matches it by opaque.
            (Code::Miss, _) if kind == Kind::Touch => Outcome::NotFound(opaque),
            (Code::Miss, _) => Outcome::Miss,
            (Code::NotFound, _) if kind == Kind::Store => {
                Outcome::Store(SetOutcome::NotFound, None, opaque)
            }
            (Code::NotFound, _) => Outcome::NotFound(opaque),
            (Code::NotStored, _) => Outcome::Store(SetOutcome::NotStored, None, opaque),
            (Code::Exists, _) => Outcome::Store(SetOutcome::Exists, None, opaque),
            // `mn` is sent only to close a batch or pipeline.
            (Code::Noop, _) if expect.opaque.is_none() => Outcome::End,
            (Code::Noop, _) => return Err(ParseError::Unexpected),
        };
        unit(n, outcome, true)
    }
}
