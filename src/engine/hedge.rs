//! A read raced on two copies (a hedge, for a [`Client`](crate::Client) with copies): the
//! read goes to one copy; if that copy has not answered after a delay, it goes to a second
//! copy too, and the first answer wins. The losing read is not cancelled (memcached cannot):
//! its reply is left to its connection, which reads and drops it before its next call's
//! own (see [`Strays`]), so the framing stays intact and no caller ever gets it. A
//! connection owes at most [`LATE_MAX`](crate::conn::driver::LATE_MAX) such replies: a hedge
//! is not sent to one that owes that many, a first copy left one more is closed, and a read
//! left unanswered for an I/O timeout closes the connection and counts as a timeout, which
//! feeds the copy's breaker. A connection carrying unconfirmed quiet writes is never part of a
//! race either (see `race_get_w`).

use std::time::{Duration, Instant};

use super::reply::{SingleReader, Strays};
use super::{wire_key, Core};
use crate::conn::driver::{Batch, Late, Op};
use crate::error::{During, Error, Result};
use crate::proto::wire::{with_wire, Capability, Cmd, Expect, GetOpts, Outcome, Wire};
use crate::proto::{Key, ParseError};

/// What a copy's read found: the item's flags and CAS (its value went to that copy's
/// buffer), or nothing (a miss).
pub(crate) type Found = Option<(u32, Option<u64>)>;

/// How a raced read ended.
#[derive(Default)]
pub(crate) struct Raced {
    /// The copy that answered first (a server), what it found, and whether it was the
    /// hedge (its value is then in the second buffer).
    pub(crate) won: Option<(usize, Found, bool)>,
    /// The copies that failed, with their errors (each counted in its health).
    pub(crate) failed: [Option<(usize, Error)>; 2],
    /// How long each copy asked had been waited for (a lower bound for one that did not
    /// answer): for the latency tracker.
    pub(crate) waited: [Option<(usize, Duration)>; 2],
    /// A copy missed while the other was still out, which was then waited for (with
    /// `miss_failover`: a miss does not win over a copy that may hold the key).
    pub(crate) missed: bool,
}

/// A raced read: what it reads, the copy asked first (whose probe, if it is half-open, the
/// caller took), and how long that copy has before the read goes to a second one.
#[derive(Clone, Copy)]
pub(crate) struct RaceRead {
    pub(crate) opts: GetOpts,
    pub(crate) first: usize,
    pub(crate) delay: Duration,
}

/// One copy's part of the race.
struct Leg {
    server: usize,
    opaque: u32,
    strays: Strays,
    started: Instant,
}

/// A time so far away that a race waits for its reads' own deadlines.
const LATER: Duration = Duration::from_secs(24 * 3600);

impl Core {
    /// Reads `key` (a get or gat, as `read.opts` says) from server `read.first`. If no
    /// answer came after `read.delay`, `hedge_to` is asked for a second server (`None`: no hedge, the read waits for `first` alone) and the read goes
    /// there too. The first answer wins; `outs[0]` receives the first copy's value,
    /// `outs[1]` the hedge's. `Err` only for an invalid key.
    pub(crate) fn race_get(
        &mut self,
        user_key: &[u8],
        kb: &mut Vec<u8>,
        read: RaceRead,
        hedge_to: &mut dyn FnMut(&mut Core, bool) -> Option<usize>,
        outs: [&mut Vec<u8>; 2],
    ) -> Result<Raced> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (wire, _) = wire_key(&self.namespace, user_key, binary_keys, kb)?;
        Ok(with_wire!(self.protocol, W => self.race_get_w::<W>(wire, read, hedge_to, outs)))
    }

    /// Starts a copy's read: connects, queues a sync and reads the connection's strays first
    /// if it has any, then the read itself.
    fn start_leg<W: Wire>(&mut self, i: usize, cmd: &Cmd<'_>) -> Result<(Op, Leg)> {
        let op = self.start(i)?;
        let strays = Strays::on(&mut self.driver, i);
        let opaque = self.next_opaque();
        let w = self.driver.wbuf(i);
        if strays.owed {
            W::encode(w, &Cmd::Sync, 0, false);
        }
        W::encode(w, cmd, opaque, false);
        let leg = Leg {
            server: i,
            opaque,
            strays,
            started: Instant::now(),
        };
        Ok((op, leg))
    }

    fn race_get_w<W: Wire>(
        &mut self,
        key: Key<'_>,
        read: RaceRead,
        hedge_to: &mut dyn FnMut(&mut Core, bool) -> Option<usize>,
        outs: [&mut Vec<u8>; 2],
    ) -> Raced {
        let RaceRead { opts, first, delay } = read;
        let cmd = Cmd::Get(key, opts);
        let kind = cmd.kind();
        let labels = self.labels.clone();
        let mut raced = Raced::default();
        let observed = self.health.observe.start();
        let (op0, leg0) = match self.start_leg::<W>(first, &cmd) {
            Ok(l) => l,
            Err(e) => {
                self.health.record_error(first, &e, &mut self.ring);
                raced.failed[0] = Some((first, e));
                return raced;
            }
        };
        let mut legs = [Some(leg0), None];
        let mut batches = [Batch::new(first, None, &op0), Batch::new(first, None, &op0)];
        self.driver.race_start(&mut batches[0]);
        // One reader per copy, each writing its value to its own buffer: a unit the loser
        // parsed never reaches the winner's.
        let [out0, out1] = outs;
        let mut readers = (
            reader(
                Expect::single(kind, legs[0].as_ref().map_or(0, |l| l.opaque)),
                self,
                &labels[first],
                key,
                opts,
                out0,
            ),
            reader(
                Expect::single(kind, 0),
                self,
                &labels[first],
                key,
                opts,
                out1,
            ),
        );
        let miss_failover = self.fleet().miss_failover;
        let mut n = 1;
        let mut soft = Instant::now() + delay;
        loop {
            let servers = [batches[0].server, batches[1].server];
            let (l0, l1) = legs.split_at_mut(1);
            let (s0, s1) = (&mut l0[0], &mut l1[0]);
            let won = self.driver.race(&mut batches[..n], soft, |s, buf| {
                let (leg, second) = if s == servers[0] {
                    (s0.as_mut(), false)
                } else {
                    (s1.as_mut(), true)
                };
                let leg = leg.expect("a started leg");
                if leg.strays.pending {
                    return leg.strays.read::<W>(buf, &readers.0.limits);
                }
                match second {
                    false => readers.0.read::<W>(buf),
                    true => readers.1.read::<W>(buf),
                }
            });
            // Settle what ended: the winner, or failures.
            for k in 0..n {
                let Some(leg) = &legs[k] else { continue };
                let i = leg.server;
                let done = won == Some(k);
                if !done && batches[k].error.is_none() {
                    continue;
                }
                let leg = legs[k].take().expect("a leg");
                raced.waited[k] = Some((i, leg.started.elapsed()));
                let r = match batches[k].error.take() {
                    Some(e) => Err(e),
                    None => {
                        leg.strays.settle(&mut self.driver, &mut self.health, i);
                        let refused = match k {
                            0 => readers.0.refused.take(),
                            _ => readers.1.refused.take(),
                        };
                        match refused {
                            Some((e, close)) => {
                                if close {
                                    self.driver.disconnect(i);
                                }
                                Err(e)
                            }
                            None => Ok(match k {
                                0 => readers.0.out.take(),
                                _ => readers.1.out.take(),
                            }
                            .expect("a done read has its result")),
                        }
                    }
                };
                self.health.record(i, &r, &mut self.ring);
                self.health.observe.call(i, kind, false, observed);
                self.health.observe.bytes(i, self.driver.bytes(i));
                // With miss_failover, a miss waits for the other copy if it is still out.
                let other_out = legs[1 - k].is_some();
                match r {
                    Ok(None) if miss_failover && other_out => {
                        self.health.count_lookup(i, false);
                        raced.missed = true;
                    }
                    Ok(found) => {
                        self.health.count_lookup(i, found.is_some());
                        raced.won = Some((i, found, k == 1));
                    }
                    Err(e) => raced.failed[k] = Some((i, e)),
                }
            }
            if raced.won.is_some() || legs.iter().all(Option::is_none) {
                break;
            }
            // The soft time passed, or a copy failed with the other still running.
            // A first copy whose connection carries unconfirmed quiet writes (a noreply
            // pipeline) is not hedged: were it to lose, it could not be left its replies in
            // order, and closing a connection with unread input resets it, which can drop
            // writes the server has not read yet (a paused server would then keep an old
            // value). It is waited for alone, as without hedging.
            let owed = legs[0].as_ref().is_some_and(|l| l.strays.owed);
            if n == 1 && raced.failed[0].is_none() && !owed {
                // The first copy has not even answered its previous read (left late on
                // its connection): it looks stuck.
                let stuck = legs[0].as_ref().is_some_and(|l| l.strays.late.is_some());
                if let Some(b) = hedge_to(self, stuck) {
                    match self.start_leg::<W>(b, &cmd) {
                        Ok((op1, leg1)) => {
                            readers.1.expect = Expect::single(kind, leg1.opaque);
                            readers.1.label = &labels[b];
                            legs[1] = Some(leg1);
                            batches[1] = Batch::new(b, None, &op1);
                            self.driver.race_start(&mut batches[1]);
                            n = 2;
                        }
                        Err(e) => {
                            self.health.record_error(b, &e, &mut self.ring);
                            raced.failed[1] = Some((b, e));
                        }
                    }
                }
            }
            soft = Instant::now() + LATER;
        }
        // The loser (still running) leaves its reply to its connection, after those it
        // already owed.
        let io_timeout = self.driver.io_timeout();
        for k in 0..n {
            let Some(mut leg) = legs[k].take() else {
                continue;
            };
            let i = leg.server;
            if batches[k].is_unsent() {
                // The hedge never went out: the connection keeps what it owed.
                leg.strays.abandon(&mut self.driver, i);
                self.driver.abandon(&batches[k], None);
                continue;
            }
            raced.waited[k] = Some((i, leg.started.elapsed()));
            let late = match (leg.strays.pending, leg.strays.late) {
                (false, _) => {
                    leg.strays.settle(&mut self.driver, &mut self.health, i);
                    Some(Late::new(kind, leg.opaque, leg.started))
                }
                // Replies of quiet commands unread too (never, see above): closed.
                (true, _) if leg.strays.owed => None,
                (true, Some(mut late)) => {
                    let timed_out = late.since.elapsed() >= io_timeout;
                    let kept = !timed_out && late.push(kind, leg.opaque);
                    if timed_out {
                        // A read left unanswered for an I/O timeout: a timeout, as it
                        // would have been without the hedge. (Too many reads left merely
                        // close the connection: a paused copy is not a failed one.)
                        let e = Error::Timeout {
                            server: labels[i].clone(),
                            during: During::Read,
                            elapsed: late.since.elapsed(),
                        };
                        self.health.record_error(i, &e, &mut self.ring);
                    }
                    kept.then_some(late)
                }
                (true, None) => None,
            };
            self.driver.abandon(&batches[k], late);
        }
        raced
    }
}

/// A copy's reader for a raced get: its value to `out`, the item's flags and CAS as its
/// result (see `Client::retrieve`, which reads a get the same way).
fn reader<'c>(
    expect: Expect,
    core: &Core,
    label: &'c str,
    key: Key<'c>,
    opts: GetOpts,
    out: &'c mut Vec<u8>,
) -> SingleReader<'c, impl FnMut(Outcome<'_>, bool) -> Result<Option<Found>, ParseError> + 'c, Found>
{
    let mut found: Found = None;
    let mut seen = false;
    let key = key.as_bytes();
    SingleReader {
        expect,
        limits: core.limits,
        label,
        data_block: false,
        on: move |o: Outcome<'_>, last: bool| match o {
            // A text reply names its key: it must be ours, and come once.
            Outcome::Hit(h) if !seen && h.key.is_none_or(|k| k == key) => {
                seen = true;
                out.clear();
                out.extend_from_slice(h.data);
                found = Some((h.flags, h.cas.filter(|_| opts.cas)));
                Ok(last.then_some(found))
            }
            Outcome::End | Outcome::Miss => Ok(Some(found)),
            _ => Err(ParseError::Unexpected),
        },
        out: None,
        refused: None,
    }
}
