//! The binary protocol behind [`Wire`]: one packet per command, matched by opaque; batches
//! of quiet opcodes closed by a No-op.

use super::{
    unit, BatchHit, BatchShape, Cmd, Decoded, Expect, Hit, HitRead, Kind, Outcome, Refusal,
    SetOutcome, StoreMode, Wire,
};
use crate::proto::binary::{self as bin, Opcode, Packet, StatusKind};
use crate::proto::{Limits, ParseError, Status};

/// The opaque of the No-op closing a batch or pipeline (item indexes never reach it).
const SYNC_OPAQUE: u32 = u32::MAX;

pub(crate) struct Binary;

fn store_opcode(mode: StoreMode) -> Opcode {
    match mode {
        StoreMode::Set => Opcode::SET,
        StoreMode::Add => Opcode::ADD,
        StoreMode::Replace => Opcode::REPLACE,
        StoreMode::Append => Opcode::APPEND,
        StoreMode::Prepend => Opcode::PREPEND,
    }
}

fn quiet_if(op: Opcode, quiet: bool) -> Opcode {
    if quiet {
        op.quiet()
    } else {
        op
    }
}

impl Wire for Binary {
    const TRAILER: &'static [u8] = b"";

    #[inline(always)]
    fn encode(out: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: u32, quiet: bool) {
        match *cmd {
            Cmd::Get(key, o) => {
                // Quiet gets are batch items: the key comes back, to be checked.
                let op = match (o.touch.is_some(), quiet) {
                    (false, false) => Opcode::GET,
                    (false, true) => Opcode::GETKQ,
                    (true, false) => Opcode::GAT,
                    (true, true) => Opcode::GATKQ,
                };
                match o.touch {
                    Some(t) => bin::encode_with_exptime(out, op, Some(key), t, opaque),
                    None => bin::encode_simple(out, op, Some(key), &[], opaque, 0),
                }
            }
            Cmd::Store(key, o, len) => {
                let op = quiet_if(store_opcode(o.mode), quiet);
                let cas = o.cas.unwrap_or(0);
                bin::encode_store(out, op, key, o.flags, o.ttl, len, opaque, cas);
            }
            Cmd::Delete(key) => {
                let op = quiet_if(Opcode::DELETE, quiet);
                bin::encode_simple(out, op, Some(key), &[], opaque, 0);
            }
            Cmd::Arith { key, decr, delta } => {
                let op = if decr {
                    Opcode::DECREMENT
                } else {
                    Opcode::INCREMENT
                };
                // Expiration 0xffffffff: fail on a missing key instead of creating it
                // (section 4.5), which is what the text protocol does.
                bin::encode_arith(out, quiet_if(op, quiet), key, delta, 0, u32::MAX, opaque);
            }
            // Touch has no quiet form: its success reply is read and ignored.
            Cmd::Touch(key, ttl) => {
                bin::encode_with_exptime(out, Opcode::TOUCH, Some(key), ttl, opaque)
            }
            Cmd::FlushAll(Some(d)) => bin::encode_with_exptime(out, Opcode::FLUSH, None, d, opaque),
            Cmd::FlushAll(None) => bin::encode_simple(out, Opcode::FLUSH, None, &[], opaque, 0),
            Cmd::Version => bin::encode_simple(out, Opcode::VERSION, None, &[], opaque, 0),
            Cmd::Stats(group) => {
                bin::encode_raw(out, Opcode::STAT, group.unwrap_or(b""), b"", opaque)
            }
            Cmd::Auth { mechanism, data } => {
                bin::encode_raw(out, Opcode::SASL_AUTH, mechanism, data, opaque)
            }
            Cmd::Quit => bin::encode_simple(out, Opcode::QUITQ, None, &[], opaque, 0),
            Cmd::Sync => bin::encode_simple(out, Opcode::NOOP, None, &[], SYNC_OPAQUE, 0),
            // Fronts check the capability first: never built for this protocol.
            Cmd::Verbosity(_) | Cmd::Invalidate(..) | Cmd::Debug(_) | Cmd::MetaDump => {}
        }
    }

    fn end_batch(out: &mut Vec<u8>, kind: Kind, _n: usize) -> BatchShape {
        Self::encode(out, &Cmd::Sync, SYNC_OPAQUE, false);
        BatchShape::synced(kind)
    }

    #[inline(always)]
    fn batch_hit<'a>(buf: &'a [u8], _next: Option<(&[u8], &[u8])>, limits: &Limits) -> HitRead<'a> {
        let (n, p) = match bin::parse_reply(buf, limits) {
            Ok(Status::Complete(c)) => c,
            Ok(Status::Partial) => return Some(Ok(Status::Partial)),
            Err(e) => return Some(Err(e)),
        };
        if p.status != bin::STATUS_OK || !matches!(p.opcode, Opcode::GETKQ | Opcode::GATKQ) {
            return None;
        }
        Some(Ok(Status::Complete((
            n,
            BatchHit {
                data: p.value,
                flags: p.flags().unwrap_or(0),
                cas: Some(p.cas),
                opaque: Some(p.opaque),
                key: Some(p.key),
            },
        ))))
    }

    #[inline(always)]
    fn decode<'a>(buf: &'a [u8], expect: &Expect, limits: &Limits) -> Decoded<'a> {
        let (n, p) = match bin::parse_reply(buf, limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        match expect.opaque {
            // A reply for another request is a framing error, never handed to a caller.
            Some(o) if p.opaque != o => return Err(ParseError::Unexpected),
            _ => {}
        }
        if p.opcode == Opcode::NOOP {
            if p.opaque != SYNC_OPAQUE || p.status != bin::STATUS_OK {
                return Err(ParseError::Unexpected);
            }
            return unit(n, Outcome::End, true);
        }
        let outcome = match p.status {
            bin::STATUS_OK => return ok(n, &p),
            bin::STATUS_NOT_FOUND if is_get(p.opcode) => Outcome::Miss,
            bin::STATUS_NOT_FOUND | bin::STATUS_NOT_STORED | bin::STATUS_EXISTS
                if store_mode(p.opcode).is_some() =>
            {
                Outcome::Store(store_outcome(&p), None, Some(p.opaque))
            }
            bin::STATUS_NOT_FOUND if names_item(p.opcode) => Outcome::NotFound(Some(p.opaque)),
            status => {
                let (refusal, closes) = match StatusKind::from_code(status) {
                    StatusKind::AuthError | StatusKind::AuthContinue => (Refusal::Auth, true),
                    // After these the server closes, or the stream may be out of step
                    // (reference, section 7).
                    StatusKind::UnknownCommand => (Refusal::UnknownCommand, true),
                    StatusKind::InvalidArguments => (Refusal::Client, true),
                    StatusKind::ValueTooLarge | StatusKind::OutOfMemory | StatusKind::Other(_) => {
                        (Refusal::Server, false)
                    }
                    _ => (Refusal::Client, false),
                };
                Outcome::Error {
                    refusal,
                    message: p.value,
                    closes,
                    opaque: Some(p.opaque),
                }
            }
        };
        unit(n, outcome, true)
    }
}

fn is_get(op: Opcode) -> bool {
    matches!(
        op,
        Opcode::GET
            | Opcode::GETQ
            | Opcode::GETK
            | Opcode::GETKQ
            | Opcode::GAT
            | Opcode::GATQ
            | Opcode::GATK
            | Opcode::GATKQ
    )
}

/// Commands on one item, for which "not found" is an answer (for the others, such as an
/// unknown stats group, it is an error).
fn names_item(op: Opcode) -> bool {
    matches!(
        op,
        Opcode::DELETE
            | Opcode::DELETEQ
            | Opcode::INCREMENT
            | Opcode::INCREMENTQ
            | Opcode::DECREMENT
            | Opcode::DECREMENTQ
            | Opcode::TOUCH
    )
}

/// The store mode of a storage opcode (quiet or not).
fn store_mode(op: Opcode) -> Option<StoreMode> {
    Some(match op {
        Opcode::SET | Opcode::SETQ => StoreMode::Set,
        Opcode::ADD | Opcode::ADDQ => StoreMode::Add,
        Opcode::REPLACE | Opcode::REPLACEQ => StoreMode::Replace,
        Opcode::APPEND | Opcode::APPENDQ => StoreMode::Append,
        Opcode::PREPEND | Opcode::PREPENDQ => StoreMode::Prepend,
        _ => return None,
    })
}

/// An unmet storage condition. Binary answers an add of an existing key with "exists" and a
/// replace of a missing one with "not found": for every mode but a (CAS) set, those mean "not
/// stored", as the other protocols say it.
fn store_outcome(p: &Packet<'_>) -> SetOutcome {
    match (store_mode(p.opcode), p.status) {
        (Some(StoreMode::Set), bin::STATUS_EXISTS) => SetOutcome::Exists,
        (Some(StoreMode::Set), bin::STATUS_NOT_FOUND) => SetOutcome::NotFound,
        _ => SetOutcome::NotStored,
    }
}

/// A successful response, by the opcode it answers.
#[inline(always)]
fn ok<'a>(n: usize, p: &Packet<'a>) -> Decoded<'a> {
    let outcome = match p.opcode {
        op if is_get(op) => Outcome::Hit(Hit {
            key: (!p.key.is_empty()).then_some(p.key),
            opaque: Some(p.opaque),
            flags: p.flags().unwrap_or(0),
            cas: Some(p.cas),
            data: p.value,
            ..Hit::default()
        }),
        op if store_mode(op).is_some() => {
            Outcome::Store(SetOutcome::Stored, Some(p.cas), Some(p.opaque))
        }
        Opcode::DELETE | Opcode::DELETEQ => Outcome::Deleted(Some(p.opaque)),
        Opcode::INCREMENT | Opcode::INCREMENTQ | Opcode::DECREMENT | Opcode::DECREMENTQ => {
            Outcome::Number(p.counter().ok_or(ParseError::Unexpected)?, Some(p.opaque))
        }
        Opcode::TOUCH => Outcome::Touched(Some(p.opaque)),
        Opcode::FLUSH | Opcode::FLUSHQ | Opcode::SASL_AUTH => Outcome::Ok,
        Opcode::VERSION => Outcome::Version(p.value),
        // Stat: one packet per statistic, closed by an empty packet (section 4.9).
        Opcode::STAT if p.key.is_empty() && p.value.is_empty() => Outcome::End,
        Opcode::STAT => return unit(n, Outcome::Stat(p.key, p.value), false),
        _ => return Err(ParseError::Unexpected),
    };
    unit(n, outcome, true)
}
