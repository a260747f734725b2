//! The text protocol behind [`Wire`].

use super::{
    unit, BatchHit, BatchShape, Cmd, Decoded, Expect, Hit, HitRead, Kind, Outcome, Refusal,
    SetOutcome, StoreMode, Wire,
};
use crate::proto::text::{self, Response, Retrieval, Storage};
use crate::proto::{Limits, ParseError, Status};

/// memcached reads a command line into a bounded buffer; long multi-gets are split into lines
/// of this many keys, all written before any reply is read.
const KEYS_PER_LINE: usize = 100;

pub(crate) struct Text;

fn retrieval(cas: bool, touch: Option<u32>) -> Retrieval {
    match (cas, touch) {
        (false, None) => Retrieval::Get,
        (true, None) => Retrieval::Gets,
        (false, Some(t)) => Retrieval::Gat(t),
        (true, Some(t)) => Retrieval::Gats(t),
    }
}

fn storage(mode: StoreMode, cas: Option<u64>) -> Storage {
    match (mode, cas) {
        (_, Some(u)) => Storage::Cas(u),
        (StoreMode::Set, None) => Storage::Set,
        (StoreMode::Add, None) => Storage::Add,
        (StoreMode::Replace, None) => Storage::Replace,
        (StoreMode::Append, None) => Storage::Append,
        (StoreMode::Prepend, None) => Storage::Prepend,
    }
}

/// An error line as an [`Outcome`].
pub(super) fn error_line(refusal: Refusal, message: &[u8], closes: bool) -> Outcome<'_> {
    Outcome::Error {
        refusal,
        message,
        closes,
        opaque: None,
    }
}

impl Wire for Text {
    const TRAILER: &'static [u8] = text::DATA_TRAILER;
    const MATCHES_BY_NEXT_KEY: bool = true;

    #[inline(always)]
    fn encode(out: &mut Vec<u8>, cmd: &Cmd<'_>, _opaque: u32, quiet: bool) {
        match *cmd {
            Cmd::Get(key, o) => text::encode_get(out, retrieval(o.cas, o.touch), key),
            Cmd::Store(key, o, len) => {
                text::encode_store(out, storage(o.mode, o.cas), key, o.flags, o.ttl, len, quiet)
            }
            Cmd::Delete(key) => text::encode_delete(out, key, quiet),
            Cmd::Arith { key, decr, delta } => text::encode_arith(out, decr, key, delta, quiet),
            Cmd::Touch(key, ttl) => text::encode_touch(out, key, ttl, quiet),
            Cmd::FlushAll(delay) => text::encode_flush_all(out, delay, quiet),
            Cmd::Verbosity(level) => text::encode_verbosity(out, level, quiet),
            Cmd::Version | Cmd::Sync => text::encode_version(out),
            Cmd::Stats(arg) => text::encode_stats(out, arg),
            Cmd::MetaDump => text::encode_metadump(out),
            Cmd::Quit => text::encode_quit(out),
            // Fronts check the capability first: never built for this protocol.
            Cmd::Invalidate(..) | Cmd::Debug(_) | Cmd::Auth { .. } => {}
        }
    }

    #[inline(always)]
    fn encode_item(out: &mut Vec<u8>, cmd: &Cmd<'_>, _index: u32, pos: usize) {
        match *cmd {
            // Keys share a line, up to KEYS_PER_LINE of them.
            Cmd::Get(key, o) => {
                if pos % KEYS_PER_LINE == 0 {
                    text::begin_retrieval(out, retrieval(o.cas, o.touch));
                }
                text::push_key(out, key);
                if pos % KEYS_PER_LINE == KEYS_PER_LINE - 1 {
                    text::finish_line(out);
                }
            }
            // noreply would hide which items failed: every item answers.
            _ => Self::encode(out, cmd, 0, false),
        }
    }

    fn end_batch(out: &mut Vec<u8>, kind: Kind, n: usize) -> BatchShape {
        match kind {
            Kind::Get => {
                if n % KEYS_PER_LINE != 0 {
                    text::finish_line(out);
                }
                BatchShape {
                    ends: n.div_ceil(KEYS_PER_LINE),
                    every_item_replies: false,
                }
            }
            _ => BatchShape {
                ends: 0,
                every_item_replies: true,
            },
        }
    }

    #[inline(always)]
    fn batch_hit<'a>(buf: &'a [u8], next: Option<(&[u8], &[u8])>, limits: &Limits) -> HitRead<'a> {
        // Replies come in request order: the hit is checked against the next key directly.
        let (ns, key) = next?;
        let hit = |(n, r): (usize, Response<'a>)| match r {
            Response::Value {
                flags, cas, data, ..
            } => {
                let hit = BatchHit {
                    data,
                    flags,
                    cas,
                    opaque: None,
                    key: None,
                };
                Ok(Status::Complete((n, hit)))
            }
            _ => Err(ParseError::Unexpected), // parse_value_of returns values only
        };
        Some(match text::parse_value_of(buf, ns, key, limits)? {
            Ok(Status::Complete(c)) => hit(c),
            Ok(Status::Partial) => Ok(Status::Partial),
            Err(e) => Err(e),
        })
    }

    #[inline(always)]
    fn decode<'a>(buf: &'a [u8], expect: &Expect, limits: &Limits) -> Decoded<'a> {
        match text::parse_reply(buf, limits)? {
            Status::Complete((n, r)) => from_response(n, r, expect.kind),
            Status::Partial => Ok(Status::Partial),
        }
    }
}

/// A text reply in neutral terms.
#[inline(always)]
pub(super) fn from_response<'a>(n: usize, r: Response<'a>, kind: Kind) -> Decoded<'a> {
    let outcome = match r {
        Response::Value {
            key,
            flags,
            cas,
            data,
        } => {
            let hit = Hit {
                key: Some(key),
                flags,
                cas,
                data,
                ..Hit::default()
            };
            return unit(n, Outcome::Hit(hit), false);
        }
        Response::Stat { name, value } => return unit(n, Outcome::Stat(name, value), false),
        Response::Error(m) => error_line(Refusal::UnknownCommand, m, false),
        Response::ClientError(m) => error_line(Refusal::Client, m, false),
        Response::ServerError(m) => error_line(Refusal::Server, m, true),
        // noreply commands answer only with errors; `version` closes the stream.
        Response::Version(_) if kind == Kind::Quiet => Outcome::End,
        _ if kind == Kind::Quiet => return Err(ParseError::Unexpected),
        Response::End | Response::Reset => Outcome::End,
        Response::Stored => Outcome::Store(SetOutcome::Stored, None, None),
        Response::NotStored => Outcome::Store(SetOutcome::NotStored, None, None),
        Response::Exists => Outcome::Store(SetOutcome::Exists, None, None),
        Response::NotFound if kind == Kind::Store => {
            Outcome::Store(SetOutcome::NotFound, None, None)
        }
        Response::NotFound => Outcome::NotFound(None),
        Response::Deleted => Outcome::Deleted(None),
        Response::Touched => Outcome::Touched(None),
        Response::Ok => Outcome::Ok,
        Response::Number(v) => Outcome::Number(v, None),
        Response::Version(v) => Outcome::Version(v),
    };
    unit(n, outcome, true)
}
