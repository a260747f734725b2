//! A [`Client`]'s keyed calls with several copies per key ([`ClientBuilder::replicas`]):
//! the fleet's plan ([`crate::fleet::plan`]) run one copy at a time, since a `Client` makes
//! one call at a time. Reads fail over within the call; writes reach every copy in turn.
//!
//! [`ClientBuilder::replicas`]: crate::ClientBuilder::replicas

use std::time::Instant;

use super::Client;
use crate::client::ItemInfo;
use crate::command::{Op, Reply};
use crate::engine::fan_out::FanCmd;
use crate::engine::hedge::RaceRead;
use crate::engine::Core;
use crate::error::{Error, Result};
use crate::fleet::plan::{
    changed, fails_over, first_wave, prefers_zone, settle, write_kind, Action, Part, Servers,
    Standing, WriteKind,
};
use crate::fleet::repair::Work;
use crate::fleet::Hedge;
use crate::fleet::{FleetCounters, ZoneInfo};
use crate::proto::wire::{Cmd, GetOpts, Outcome};
use crate::proto::ParseError;
use crate::ring::MAX_REPLICAS;

/// Repairs a call tries before its own work, at most.
const REPAIRS_PER_CALL: usize = 8;

impl Client {
    /// What the fleet layer did: failovers, hedges, repairs (with
    /// [`replicas`](crate::ClientBuilder::replicas); all zero otherwise). Shared by the
    /// clients of one [`Pool`](crate::Pool).
    pub fn fleet_counters(&self) -> FleetCounters {
        self.core.fleet_shared().counters()
    }

    /// The zones ([`ClientBuilder::zone`](crate::ClientBuilder::zone)), in the order they
    /// were added; empty without zones.
    pub fn zones(&self) -> Vec<ZoneInfo> {
        self.core.fleet_shared().zones()
    }

    /// Makes zone `name` write-only (`true`: written to, never read from, while it warms
    /// up) or readable again (`false`), for this client and every client sharing its fleet
    /// (a pool's, a shared client's).
    ///
    /// # Errors
    /// [`Error::Config`] if there is no such zone.
    pub fn set_zone_write_only(&self, name: &str, write_only: bool) -> Result<()> {
        self.core
            .fleet_shared()
            .set_zone_write_only(name, write_only)
    }

    /// The servers holding `key`'s copies (indexes into [`servers`](Self::servers)), in
    /// placement order: its own server first, the one `cas`, `incr` and `decr` use. One
    /// server without [`replicas`](crate::ClientBuilder::replicas) or zones; whether they are
    /// up does not change them.
    ///
    /// # Errors
    /// An invalid key.
    pub fn servers_of_key(&mut self, key: &[u8]) -> Result<Vec<usize>> {
        let copies = self.core.copies_of(&mut self.scratch, key)?;
        Ok(copies.as_slice().iter().map(|&i| i as usize).collect())
    }

    /// One copy's part: `op` on server `i` alone (no further fleet logic: the call is pinned).
    fn on_copy(
        &mut self,
        i: usize,
        op: Op,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        self.pinned(i, |c| c.perform(op, key, value, out))
    }

    /// A keyed call with copies: a read from one copy (failing over), or a write as its kind
    /// says. Cold: a client without copies never comes here.
    #[cold]
    #[inline(never)]
    pub(crate) fn perform_replicated(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        // Refused before any copy's probe is taken (a refused call reports nothing).
        if let Op::Store(_) = op {
            self.core.check_value(value)?;
        }
        self.repair_some();
        match write_kind(&op) {
            None => self.read_copies(op, key, out),
            Some(kind) => self.write_copies(kind, op, key, value, out),
        }
    }

    /// Tries a few pending repairs on servers that are up (a copy that missed a write is
    /// skipped for that key until then).
    pub(super) fn repair_some(&mut self) {
        let fleet = self.core.fleet_shared();
        if !fleet.repairs.any() {
            return;
        }
        let core = &self.core;
        let work = fleet
            .repairs
            .work(REPAIRS_PER_CALL, |i| core.check_up(i).is_err());
        for w in work {
            let ok = match &w {
                Work::Delete(i, k) => self
                    .on_copy(*i, Op::Delete, k, &[], &mut Vec::new())
                    .is_ok(),
                // Pinned: the look-up above took the server's probe, if it is half-open.
                Work::Flush(i) => self
                    .pinned(*i, |c| {
                        c.core
                            .on_server(*i, &Cmd::FlushAll(None), &mut |o| match o {
                                Outcome::Ok => Ok(Some(())),
                                _ => Err(ParseError::Unexpected),
                            })
                    })
                    .is_ok(),
            };
            if ok {
                self.core.fleet_shared().repairs.done(&w);
            }
        }
    }

    fn read_copies(&mut self, op: Op, key: &[u8], out: &mut Vec<u8>) -> Result<Reply> {
        let order = self
            .core
            .read_order(&mut self.scratch, key, prefers_zone(&op))?;
        if let (Some(h), Some(opts)) = (self.core.fleet().hedge, read_opts(op)) {
            if order.len() > 1 {
                return self.read_hedged(h, opts, op, key, order, out);
            }
        }
        self.read_from(op, key, order, 0, None, false, out)
    }

    /// Reads from the copies in `order` from the `from`th on, one at a time, failing over
    /// (after `last`, an earlier copy's error, or a miss if `missed`).
    #[allow(clippy::too_many_arguments)]
    fn read_from(
        &mut self,
        op: Op,
        key: &[u8],
        order: Servers,
        from: usize,
        mut last: Option<Error>,
        mut missed: bool,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        let miss_failover = self.core.fleet().miss_failover;
        for k in from..order.len() {
            let i = order.get(k).expect("in range");
            // A copy being probed (half-open) is asked only by the call that takes its
            // probe; the others fail over (or fail) at once.
            match self.core.standing_to_call(i, key) {
                Standing::Up | Standing::Slow => {}
                _ => {
                    last.get_or_insert_with(|| self.core.down_error(i));
                    continue;
                }
            }
            let started = Instant::now();
            match self.on_copy(i, op, key, &[], out) {
                Ok(Reply::Miss) if miss_failover && k + 1 < order.len() => {
                    let fleet = self.core.fleet_shared();
                    fleet.latency[i].record(started.elapsed());
                    missed = true;
                }
                Ok(r) => {
                    let fleet = self.core.fleet_shared();
                    fleet.latency[i].record(started.elapsed());
                    if last.is_some() || (missed && r != Reply::Miss) {
                        fleet.failover(i);
                    }
                    return Ok(r);
                }
                Err(e) if fails_over(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        // A copy missed (the others failed), or every copy is waiting for a repair of this
        // key: none may serve it.
        match missed {
            true => Ok(Reply::Miss),
            false => last.map_or(Ok(Reply::Miss), Err),
        }
    }

    /// A read with hedging: the first copy that may be asked gets it; if it has not
    /// answered after the hedge delay, the next copy gets it too (within the budget, or
    /// outside it if the first copy has not even answered its previous read: it looks
    /// stuck), and the
    /// first answer wins (see [`crate::engine::hedge`]). What is left of the order is then
    /// tried one copy at a time, as without hedging.
    fn read_hedged(
        &mut self,
        h: Hedge,
        opts: GetOpts,
        op: Op,
        key: &[u8],
        order: Servers,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        let mut last = None;
        let mut k = 0;
        while let Some(i) = order.get(k) {
            match self.core.standing_to_call(i, key) {
                Standing::Up | Standing::Slow => break,
                _ => {
                    last.get_or_insert_with(|| self.core.down_error(i));
                    k += 1;
                }
            }
        }
        let Some(first) = order.get(k) else {
            return last.map_or(Ok(Reply::Miss), Err);
        };
        let fleet = self.core.fleet_shared();
        fleet.earn(&h);
        let delay = fleet.hedge_delay(&h, first);
        let mut next = k + 1;
        let mut hedge_to = |core: &mut Core, stuck: bool| -> Option<usize> {
            // The next copy that is up (a copy being probed is left to its probe).
            let i = loop {
                let i = order.get(next)?;
                // Not a copy whose connection carries unconfirmed quiet writes, or as many
                // late replies as it may (see `engine::hedge`): it could not be left this
                // read's reply.
                let up = matches!(core.standing(i, key), Standing::Up | Standing::Slow);
                if up && core.may_race(i) {
                    break i;
                }
                next += 1;
            };
            let fleet = core.fleet_shared();
            if stuck {
                fleet.spend_free(first);
            } else if !fleet.spend(first) {
                // Not asked: it is still there to fail over to if the first copy fails.
                return None;
            }
            next += 1;
            Some(i)
        };
        let mut spare = std::mem::take(&mut self.copy_scratch.spare);
        // As large as the caller's buffer at once: grown on the first hedged read, not
        // on whichever later one a hedge first answers.
        spare.clear();
        spare.reserve(out.capacity());
        let raced = self.core.race_get(
            key,
            self.scratch.keybuf(),
            RaceRead { opts, first, delay },
            &mut hedge_to,
            [&mut *out, &mut spare],
        );
        let after = next;
        let raced = match raced {
            Ok(r) => r,
            Err(e) => {
                self.copy_scratch.spare = spare;
                return Err(e);
            }
        };
        let fleet = self.core.fleet_shared();
        for (i, d) in raced.waited.iter().flatten() {
            fleet.latency[*i].record(*d);
        }
        if let Some((i, found, second)) = raced.won {
            if second {
                out.clear();
                out.extend_from_slice(&spare);
            }
            self.copy_scratch.spare = spare;
            let reply = found.map_or(Reply::Miss, |(flags, cas)| {
                Reply::Hit(ItemInfo { flags, cas })
            });
            if second {
                fleet.hedge_won(i);
            } else if last.is_some() {
                fleet.failover(i);
            }
            let miss_failover = self.core.fleet().miss_failover;
            if reply == Reply::Miss && miss_failover && after < order.len() {
                return self.read_from(op, key, order, after, last, true, out);
            }
            return Ok(reply);
        }
        self.copy_scratch.spare = spare;
        for (_, e) in raced.failed.into_iter().flatten() {
            if !fails_over(&e) {
                return Err(e);
            }
            last = Some(e);
        }
        // A copy that missed (the other failed) makes this a miss, unless a later copy hits.
        self.read_from(op, key, order, after, last, raced.missed, out)
    }

    fn write_copies(
        &mut self,
        kind: WriteKind,
        op: Op,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        let copies = self.core.copies_of(&mut self.scratch, key)?;
        let copies = copies.as_slice();
        let mut standing = [Standing::Up; MAX_REPLICAS];
        if kind == WriteKind::FirstThenDelete {
            // Probes are taken one copy at a time, right before that copy is asked.
            for (k, &i) in copies.iter().enumerate() {
                standing[k] = self.core.standing(i as usize, key);
            }
            return self.write_first(op, key, value, out, copies, &standing);
        }
        // Stores and deletes: every copy in one round trip.
        if matches!(op, Op::Store(_) | Op::Delete) {
            return self.write_at_once(kind, op, key, value);
        }
        // Every copy is asked: each copy being probed is probed by this write.
        for (k, &i) in copies.iter().enumerate() {
            standing[k] = self.core.standing_to_call(i as usize, key);
        }
        let mut parts: [Part; MAX_REPLICAS] = std::array::from_fn(|_| Part::none());
        // A touch: each copy gets its command (or a delete, if it waits for a repair of
        // the key), all in one round trip.
        let mut cmds = [(0, FanCmd::Delete); MAX_REPLICAS];
        let mut asked = [0; MAX_REPLICAS];
        let mut m = 0;
        for (k, &i) in copies.iter().enumerate() {
            let action = first_wave(kind, standing[k]);
            let cmd = match (action, op) {
                (Action::Command, Op::Touch(ttl)) => FanCmd::Touch(ttl),
                (Action::Delete, _) => FanCmd::Delete,
                (Action::Command, _) => {
                    parts[k] = self.act(i as usize, action, op, key, value, out);
                    continue;
                }
                _ => {
                    parts[k] = Part::new(i as usize, action, Err(self.core.down_error(i as usize)));
                    continue;
                }
            };
            parts[k] = Part::new(i as usize, action, Ok(Reply::Miss));
            cmds[m] = (i as usize, cmd);
            asked[m] = k;
            m += 1;
        }
        if m > 0 {
            let answers = self.core.fan_out(key, self.scratch.keybuf(), &cmds[..m])?;
            for (j, answer) in answers.into_iter().take(m).enumerate() {
                let r = answer.expect("every server asked answers");
                parts[asked[j]].result = r.map(Reply::Existed);
            }
        }
        let parts = &parts[..copies.len()];
        let fleet = self.core.fleet_shared();
        let mut reconcile = [usize::MAX; MAX_REPLICAS];
        let mut n = 0;
        let r = settle(
            kind,
            self.core.fleet().write,
            parts,
            |i| fleet.repairs.record(i, key),
            |i| {
                reconcile[n] = i;
                n += 1;
            },
        );
        for &i in &reconcile[..n] {
            self.delete_copy(i, key, out);
        }
        for p in parts {
            if p.action == Action::Delete && p.result.is_ok() {
                // Deleted: it holds nothing now, no longer waiting for a repair.
                self.core.fleet_shared().repairs.clear(p.server, key);
            }
        }
        r
    }

    /// cas, incr, decr: the first copy that answers decides (in placement order); when it
    /// changed the item, the other copies are deleted. A copy that failed (it may have
    /// applied the command before timing out) or could not be deleted is remembered for
    /// repair; that cleanup never fails the call, whose effect has happened.
    fn write_first(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
        copies: &[u32],
        standing: &[Standing],
    ) -> Result<Reply> {
        let mut decided = None;
        let mut last = None;
        for (k, &i) in copies.iter().enumerate() {
            let i = i as usize;
            let st = match standing[k] {
                Standing::Probe => self.core.standing_to_call(i, key),
                s => s,
            };
            if first_wave(WriteKind::FirstThenDelete, st) != Action::Command {
                continue;
            }
            match self.on_copy(i, op, key, value, out) {
                Ok(reply) => {
                    decided = Some((k, reply));
                    break;
                }
                Err(e) if fails_over(&e) => {
                    self.core.fleet_shared().repairs.record(i, key);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((d, reply)) = decided else {
            return Err(last.unwrap_or(Error::NoServers));
        };
        if changed(&reply) {
            for (k, &i) in copies.iter().enumerate() {
                if k == d {
                    continue;
                }
                let st = match standing[k] {
                    Standing::Probe => self.core.standing_to_call(i as usize, key),
                    s => s,
                };
                if st == Standing::Down || st == Standing::Probe {
                    self.core.fleet_shared().repairs.record(i as usize, key);
                } else {
                    self.delete_copy(i as usize, key, out);
                }
            }
        }
        Ok(reply)
    }

    /// Deletes `key` on copy `i`; remembered for repair if that fails, no longer waiting for
    /// one if it succeeds.
    pub(super) fn delete_copy(&mut self, i: usize, key: &[u8], out: &mut Vec<u8>) {
        let ok = self.on_copy(i, Op::Delete, key, &[], out).is_ok();
        self.core.fleet_shared().repairs.deleted(i, key, ok);
    }

    /// Sends one copy its part of a write's first wave.
    fn act(
        &mut self,
        i: usize,
        action: Action,
        op: Op,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Part {
        let r = match action {
            Action::Command => self.on_copy(i, op, key, value, out),
            Action::Delete => self.on_copy(i, Op::Delete, key, &[], out),
            Action::Skip | Action::Leave => Err(self.core.down_error(i)),
        };
        Part::new(i, action, r)
    }

    /// A meta call with copies (leases and CAS uniques live on one server): made on the
    /// first copy that is up and not waiting for a repair of the key, in placement order;
    /// when `changed` says its result changed the item, the other copies are deleted (a copy
    /// holds the latest value or nothing).
    pub(crate) fn on_first_copy<T>(
        &mut self,
        key: &[u8],
        write: bool,
        mut f: impl FnMut(&mut Client) -> Result<T>,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        let copies = self.core.copies_of(&mut self.scratch, key)?;
        let copies = copies.as_slice();
        // A read never asks a write-only zone's copy.
        let asked = match write {
            true => Servers::from_slice(copies),
            false => self.core.readable(copies, false),
        };
        let mut last = None;
        let mut answered = None;
        for i in asked.iter() {
            if self.core.standing_to_call(i, key) != Standing::Up {
                continue;
            }
            match self.pinned(i, &mut f) {
                Ok(r) => {
                    answered = Some((i, r));
                    break;
                }
                // A write may have happened there: remembered for repair. A read goes on
                // to the next copy; a write does not (its result belongs to that copy).
                Err(e) if fails_over(&e) => {
                    if write {
                        self.core.fleet_shared().repairs.record(i, key);
                        return Err(e);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((first, r)) = answered else {
            return Err(last.unwrap_or_else(|| match asked.get(0) {
                Some(i) => self.core.down_error(i),
                None => Error::NoServers,
            }));
        };
        if changed(&r) {
            let mut out = Vec::new();
            for &i in copies.iter().filter(|&&i| i as usize != first) {
                self.delete_copy(i as usize, key, &mut out);
            }
        }
        Ok(r)
    }
}

/// A read's options, if `op` is a read (get, gets, gat, gats).
fn read_opts(op: Op) -> Option<GetOpts> {
    match op {
        Op::Get { cas } => Some(crate::command::get_opts(cas, None)),
        Op::Gat { ttl, cas } => Some(crate::command::get_opts(cas, Some(ttl))),
        _ => None,
    }
}
