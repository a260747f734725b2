//! The fleet's decisions, without I/O: the order a read tries a key's copies in, what a
//! write sends to each copy, and what the copies' replies make of the call.
//!
//! The rule every write keeps: **a copy holds the key's latest value or nothing.**
//! - `set`, `delete`, `touch` go to every copy at once ([`WriteKind::Everywhere`]).
//! - `add`, `replace`, `append`, `prepend` go to every copy at once; the first copy in
//!   placement order that answers decides the outcome, and a copy whose outcome differs (it
//!   stored where the first did not, or the reverse) is deleted ([`WriteKind::Reconcile`]).
//! - `cas`, `incr`, `decr` run on the first copy that answers, in placement order (a CAS
//!   unique or a counter only means something on one copy); when they change the item, the
//!   other copies are deleted ([`WriteKind::FirstThenDelete`]). A counter therefore lives on
//!   one copy: a read that fails over from it misses.
//! - A copy that fails its part (error, timeout, marked down) is remembered for repair: no
//!   read uses it for that key until the key is deleted there. A copy already waiting for a
//!   repair of the key gets a delete instead of the command (which repairs it).

use std::time::Duration;

use super::WritePolicy;
use crate::command::{Op, Reply};
use crate::error::{Error, Result};
use crate::proto::{SetOutcome, StoreMode};
use crate::ring::MAX_REPLICAS;

/// How a write is spread over a key's copies (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    Everywhere,
    Reconcile,
    FirstThenDelete,
}

/// `None` for a read (get, gets, gat, gats: from one copy).
pub(crate) fn write_kind(op: &Op) -> Option<WriteKind> {
    Some(match op {
        Op::Get { .. } | Op::Gat { .. } => return None,
        Op::Delete | Op::Touch(_) => WriteKind::Everywhere,
        Op::Store(o) if o.cas.is_some() => WriteKind::FirstThenDelete,
        Op::Store(o) if o.mode == StoreMode::Set => WriteKind::Everywhere,
        Op::Store(_) => WriteKind::Reconcile,
        Op::Arith { .. } => WriteKind::FirstThenDelete,
    })
}

/// Whether a read goes to the preferred zone first: a plain read does; a `gets` or `gats`
/// keeps the copies' own order, the one every client agrees on, so that its unique is the
/// one a `cas` (sent to the first copy) can use.
pub(crate) fn prefers_zone(op: &Op) -> bool {
    matches!(op, Op::Get { cas: false } | Op::Gat { cas: false, .. })
}

/// How a copy stands for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Up, answering in its usual time.
    Up,
    /// Up, but slow now (a request outstanding far longer than its usual latency, or a
    /// median far above the others'): tried after the others.
    Slow,
    /// Its breaker is half-open: one call at a time may probe it. Reads try it last (as a
    /// copy marked down: with the probe free, a pinned call may reach it); a write takes the
    /// probe first, and treats it as down if another call holds it.
    Probe,
    /// Marked down (ejected, or its breaker open).
    Down,
    /// Waiting for a repair of this key: must not serve it.
    Blocked,
}

/// A few servers in an order, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Servers {
    s: [u32; MAX_REPLICAS],
    n: u8,
}

impl Servers {
    pub(crate) fn as_slice(&self) -> &[u32] {
        &self.s[..usize::from(self.n)]
    }

    pub(crate) fn push(&mut self, i: u32) {
        self.s[usize::from(self.n)] = i;
        self.n += 1;
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.n)
    }

    pub(crate) fn get(&self, k: usize) -> Option<usize> {
        self.as_slice().get(k).map(|&i| i as usize)
    }

    pub(crate) fn from_slice(servers: &[u32]) -> Servers {
        let mut out = Servers {
            s: [0; MAX_REPLICAS],
            n: 0,
        };
        for &i in servers.iter().take(MAX_REPLICAS) {
            out.push(i);
        }
        out
    }

    /// The servers, as indexes.
    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.as_slice().iter().map(|&i| i as usize)
    }

    /// Where server `i` is in the list (0 if absent).
    pub(crate) fn position(&self, i: usize) -> usize {
        self.iter().position(|s| s == i).unwrap_or(0)
    }
}

/// A copy whose median latency is above this many times the best copy's is tried after it.
/// Large on purpose: a key only one copy holds (after `cas`, `incr`, `decr`) reads as a
/// miss from the other, so placement order is kept unless a copy is clearly slower.
const SLOW_FACTOR: u32 = 4;

/// The order a read tries `copies` in: those up first (in placement order, a copy much
/// slower than the fastest moved behind the others), then the slow ones, then those marked
/// down (one may be back). Copies waiting for a repair of the key are left out.
pub(crate) fn read_order(
    copies: &[u32],
    standing: impl Fn(usize) -> Standing,
    median: impl Fn(usize) -> Option<Duration>,
) -> Servers {
    let mut st = [Standing::Blocked; MAX_REPLICAS];
    for (k, &i) in copies.iter().enumerate() {
        st[k] = standing(i as usize);
    }
    let best = copies
        .iter()
        .zip(&st)
        .filter(|(_, s)| **s == Standing::Up)
        .filter_map(|(&i, _)| median(i as usize))
        .min();
    if let Some(best) = best {
        for (k, &i) in copies.iter().enumerate() {
            if st[k] == Standing::Up && median(i as usize).is_some_and(|m| m > best * SLOW_FACTOR) {
                st[k] = Standing::Slow;
            }
        }
    }
    let mut out = Servers {
        s: [0; MAX_REPLICAS],
        n: 0,
    };
    for want in [
        Standing::Up,
        Standing::Slow,
        Standing::Probe,
        Standing::Down,
    ] {
        for (k, &i) in copies.iter().enumerate() {
            if st[k] == want {
                out.push(i);
            }
        }
    }
    out
}

/// What one copy is sent for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The command itself.
    Command,
    /// A delete (a repair, or a reconciliation).
    Delete,
    /// Nothing: marked down, remembered for repair.
    Skip,
    /// Not part of this wave at all.
    Leave,
}

/// What a write of `kind` sends each copy in the first wave (for
/// [`WriteKind::FirstThenDelete`], the copies it may try, in order; the deletes follow).
pub(crate) fn first_wave(kind: WriteKind, standing: Standing) -> Action {
    match (kind, standing) {
        (_, Standing::Down | Standing::Probe) => Action::Skip,
        (_, Standing::Blocked) => Action::Delete,
        (_, Standing::Up | Standing::Slow) => Action::Command,
    }
}

/// A copy's part in a write: its server, what it was sent, and how it went.
pub(crate) struct Part {
    pub(crate) server: usize,
    pub(crate) action: Action,
    pub(crate) result: Result<Reply>,
}

impl Part {
    pub(crate) fn new(server: usize, action: Action, result: Result<Reply>) -> Part {
        Part {
            server,
            action,
            result,
        }
    }

    /// A placeholder (a copy that is not there).
    pub(crate) fn none() -> Part {
        Part::new(usize::MAX, Action::Skip, Ok(Reply::Miss))
    }
}

/// The call's result from its parts (in placement order), and which copies need what
/// afterwards: `repair(server)` for a copy that may hold an older value, `delete(server)`
/// for a copy to reconcile (its outcome differs from the deciding copy's).
pub(crate) fn settle(
    kind: WriteKind,
    policy: WritePolicy,
    parts: &[Part],
    mut repair: impl FnMut(usize),
    mut delete: impl FnMut(usize),
) -> Result<Reply> {
    let mut answer: Option<Reply> = None;
    let mut first_error: Option<&Error> = None;
    for p in parts {
        match (&p.result, p.action) {
            (Ok(r), Action::Command) => match answer {
                None => answer = Some(*r),
                Some(a) => {
                    if kind == WriteKind::Reconcile && !same_outcome(&a, r) {
                        delete(p.server);
                    }
                    if let (Reply::Existed(x), Reply::Existed(y)) = (a, r) {
                        // A delete or touch found the key if any copy had it.
                        answer = Some(Reply::Existed(x || *y));
                    }
                }
            },
            (Ok(_), _) => {}
            (Err(e), _) => {
                repair(p.server);
                first_error.get_or_insert(e);
            }
        }
    }
    match (answer, first_error, policy) {
        (Some(a), None, _) | (Some(a), Some(_), WritePolicy::Any) => Ok(a),
        (_, Some(e), _) => Err(e.clone()),
        // Every copy was blocked and deleted: none held the key.
        (None, None, _) => Ok(absent(kind)),
    }
}

/// Whether two copies' replies to one conditional write changed them alike.
fn same_outcome(a: &Reply, b: &Reply) -> bool {
    let stored = |r: &Reply| matches!(r, Reply::Store(SetOutcome::Stored));
    stored(a) == stored(b)
}

/// The reply of a write that found no copy of the key.
fn absent(kind: WriteKind) -> Reply {
    match kind {
        WriteKind::Everywhere => Reply::Existed(false),
        _ => Reply::Store(SetOutcome::NotStored),
    }
}

/// Whether a [`WriteKind::FirstThenDelete`] reply changed the item (the other copies are
/// then deleted).
pub(crate) fn changed(r: &Reply) -> bool {
    matches!(r, Reply::Store(SetOutcome::Stored) | Reply::Number(Some(_)))
}

/// Whether a copy's error lets the call go on to another copy: the copy failed (I/O,
/// timeout, malformed reply, marked down); not when the call itself is wrong.
pub(crate) fn fails_over(e: &Error) -> bool {
    matches!(
        e,
        Error::Io { .. } | Error::Timeout { .. } | Error::Parse { .. } | Error::ServerDown { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::StoreOpts;

    fn store(mode: StoreMode, cas: Option<u64>) -> Op {
        Op::Store(StoreOpts {
            mode,
            flags: 0,
            ttl: 0,
            cas,
            invalidate: false,
            return_cas: false,
        })
    }

    #[test]
    fn kinds() {
        assert_eq!(write_kind(&Op::Get { cas: true }), None);
        assert_eq!(write_kind(&Op::Delete), Some(WriteKind::Everywhere));
        assert_eq!(
            write_kind(&store(StoreMode::Set, None)),
            Some(WriteKind::Everywhere)
        );
        assert_eq!(
            write_kind(&store(StoreMode::Add, None)),
            Some(WriteKind::Reconcile)
        );
        assert_eq!(
            write_kind(&store(StoreMode::Set, Some(3))),
            Some(WriteKind::FirstThenDelete)
        );
        assert_eq!(
            write_kind(&Op::Arith {
                decr: false,
                delta: 1
            }),
            Some(WriteKind::FirstThenDelete)
        );
    }

    #[test]
    fn reads_prefer_healthy_and_fast_copies() {
        let st = |i: usize| match i {
            0 => Standing::Down,
            3 => Standing::Blocked,
            5 => Standing::Slow,
            _ => Standing::Up,
        };
        let fast = |_: usize| Some(Duration::from_micros(100));
        assert_eq!(read_order(&[0, 1, 2], st, fast).as_slice(), &[1, 2, 0]);
        assert_eq!(read_order(&[3, 5, 1], st, fast).as_slice(), &[1, 5]);
        let slow1 = |i: usize| Some(Duration::from_micros(if i == 1 { 900 } else { 100 }));
        assert_eq!(read_order(&[1, 2, 4], st, slow1).as_slice(), &[2, 4, 1]);
        // Without samples, placement order.
        assert_eq!(read_order(&[4, 2], st, |_| None).as_slice(), &[4, 2]);
    }

    fn part(server: usize, action: Action, result: Result<Reply>) -> Part {
        Part {
            server,
            action,
            result,
        }
    }

    fn down() -> Error {
        Error::ServerDown {
            server: "b".into(),
            retry_in: Duration::from_secs(1),
        }
    }

    #[test]
    fn settle_writes() {
        let stored = || Ok(Reply::Store(SetOutcome::Stored));
        let not = || Ok(Reply::Store(SetOutcome::NotStored));
        let mut rep = Vec::new();
        let mut del = Vec::new();
        // All: one copy down fails the call and is remembered.
        let parts = [
            part(0, Action::Command, stored()),
            part(1, Action::Skip, Err(down())),
        ];
        let r = settle(
            WriteKind::Everywhere,
            WritePolicy::All,
            &parts,
            |i| rep.push(i),
            |i| del.push(i),
        );
        assert!(matches!(r, Err(Error::ServerDown { .. })));
        assert_eq!(rep, [1]);
        // Any: the stored copy answers.
        let r = settle(
            WriteKind::Everywhere,
            WritePolicy::Any,
            &parts,
            |_| {},
            |_| {},
        );
        assert_eq!(r.unwrap(), Reply::Store(SetOutcome::Stored));
        // Reconcile: an add that stored on a copy where the first did not is deleted there.
        let parts = [
            part(2, Action::Command, not()),
            part(0, Action::Command, stored()),
        ];
        let r = settle(
            WriteKind::Reconcile,
            WritePolicy::All,
            &parts,
            |i| rep.push(i),
            |i| del.push(i),
        );
        assert_eq!(r.unwrap(), Reply::Store(SetOutcome::NotStored));
        assert_eq!(del, [0]);
        // Delete: existed if any copy had it.
        let parts = [
            part(0, Action::Command, Ok(Reply::Existed(false))),
            part(1, Action::Command, Ok(Reply::Existed(true))),
        ];
        let r = settle(
            WriteKind::Everywhere,
            WritePolicy::All,
            &parts,
            |_| {},
            |_| {},
        );
        assert_eq!(r.unwrap(), Reply::Existed(true));
        // Every copy blocked and deleted: nothing was there.
        let parts = [part(0, Action::Delete, Ok(Reply::Existed(true)))];
        let r = settle(
            WriteKind::Reconcile,
            WritePolicy::All,
            &parts,
            |_| {},
            |_| {},
        );
        assert_eq!(r.unwrap(), Reply::Store(SetOutcome::NotStored));
    }
}
