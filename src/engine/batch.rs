//! Multi-key batches: keys grouped by server, every server's batch written first, all sockets
//! served from one poll. The protocol encodes the batch and decodes its replies; what is left
//! here is the same for all three: which item a reply answers, and when a server is done.

use std::sync::Arc;

use super::reply::{refused, Strays};
use super::{combine, wire_key, Core, Scratch};
use crate::client::ItemRef;
use crate::conn::batch::BatchPolicy;
use crate::conn::driver::{Batch, Op, Until};
use crate::error::{Error, Result};
use crate::observe::{CallOp, Started};
use crate::proto::wire::{
    with_wire, BatchHit, Capability, Cmd, Expect, GetOpts, Kind, Outcome, Refusal, Wire,
};
use crate::proto::{short_eq, Key, Limits, ParseError, SetOutcome, Status, MAX_KEY_LEN};

/// Marks a key whose server is ejected (or that has no server).
const NO_SERVER: u32 = u32::MAX;

/// One server's share of a multi-key call.
#[derive(Default)]
struct Share {
    /// Keys routed to this server.
    keys: usize,
    /// Items encoded so far.
    encoded: usize,
    /// End markers that close this server's reply, and how many arrived.
    ends: usize,
    ends_seen: usize,
    /// Every item answers (else only misses and failures do), and how many did.
    every_item_replies: bool,
    replies: usize,
    /// Position in the caller's key list of the next key a reply may be for.
    cursor: usize,
    /// The first of this server's keys from `cursor` on (multi-gets).
    next: usize,
    /// Hits (gets).
    hits: usize,
    /// Items whose condition was not met (not stored, not found).
    unmet: usize,
    /// Set when the server failed.
    error: Option<Error>,
    /// When the connection owed a sync (quiet commands went out before without one), one
    /// went ahead of this batch, and the replies up to it are not this batch's.
    strays: Strays,
}

impl Share {
    fn finished(&self) -> bool {
        self.ends_seen == self.ends && (!self.every_item_replies || self.replies == self.keys)
    }
}

/// A multi-key call being planned: each key's server and each server's share.
pub(crate) struct Plan {
    server_of: Vec<u32>,
    shares: Vec<Share>,
    /// The command of every item (a retrieval counts each healthy server's hits and misses).
    kind: Kind,
    /// No namespace and every key a valid text key: each goes on the wire as given.
    plain: bool,
    /// The opaque of item 0 (binary, meta): item `j` is sent with `base + j`, so that
    /// opaques are unique on a connection across calls.
    base: u32,
}

impl Plan {
    /// Hands a hit from server `i` to `on_hit` with the index of the item it answers.
    #[inline(always)]
    fn hit(
        &mut self,
        i: usize,
        hit: BatchHit<'_>,
        ns: &[u8],
        keys: &(impl Keys + ?Sized),
        on_hit: &mut impl FnMut(usize, ItemRef<'_>) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        let j = self.item(i, By::of(hit.opaque, hit.key), ns, keys)?;
        self.shares[i].hits += 1;
        let item = ItemRef {
            value: hit.data,
            flags: hit.flags,
            cas: hit.cas,
        };
        on_hit(j, item)
    }

    /// Takes a store's or delete's reply from server `i`: `unmet` says whether the outcome
    /// answers such an item and whether its condition was not met.
    fn answer(
        &mut self,
        i: usize,
        outcome: Outcome<'_>,
        ns: &[u8],
        keys: &(impl Keys + ?Sized),
        unmet: &impl Fn(&Outcome<'_>) -> Option<bool>,
    ) -> Result<(), ParseError> {
        let missed = unmet(&outcome).ok_or(ParseError::Unexpected)?;
        let opaque = match outcome {
            Outcome::Store(_, _, op) | Outcome::Deleted(op) | Outcome::NotFound(op) => op,
            _ => None,
        };
        if let Some(o) = opaque {
            self.item(i, By::Opaque(o, None), ns, keys)?;
        } else if !self.shares[i].every_item_replies {
            // A quiet batch answers only for items it names.
            return Err(ParseError::Unexpected);
        }
        self.shares[i].unmet += usize::from(missed);
        Ok(())
    }

    /// The item a store's or delete's reply from server `i` answers: named by its opaque, or
    /// (when every item answers, in request order) this server's next item.
    fn answered(
        &mut self,
        i: usize,
        outcome: &Outcome<'_>,
        ns: &[u8],
        keys: &(impl Keys + ?Sized),
    ) -> Result<usize, ParseError> {
        let opaque = match *outcome {
            Outcome::Store(_, _, op)
            | Outcome::Deleted(op)
            | Outcome::NotFound(op)
            | Outcome::Touched(op)
            | Outcome::Number(_, op)
            | Outcome::Error { opaque: op, .. } => op,
            _ => None,
        };
        if let Some(o) = opaque {
            return self.item(i, By::Opaque(o, None), ns, keys);
        }
        if !self.shares[i].every_item_replies {
            return Err(ParseError::Unexpected);
        }
        let share = &mut self.shares[i];
        let j = (share.cursor..keys.len())
            .find(|&j| self.server_of[j] == i as u32)
            .ok_or(ParseError::Unexpected)?;
        share.cursor = j + 1;
        Ok(j)
    }

    /// The caller's index of the item a reply from server `i` answers. It must be one of
    /// this server's keys after the one the previous reply answered (servers answer in
    /// request order); anything else is a framing error, never handed to a caller.
    #[inline(always)]
    fn item(
        &mut self,
        i: usize,
        by: By<'_>,
        ns: &[u8],
        keys: &(impl Keys + ?Sized),
    ) -> Result<usize, ParseError> {
        let share = &mut self.shares[i];
        // One bounds check: `server_of` has an entry per key.
        let server_of = &self.server_of;
        let mine = |j: usize| server_of.get(j) == Some(&(i as u32));
        let user = |key| strip(key, ns);
        let j = match by {
            // The decoder matched the hit to the next key, which run_batch found among this
            // server's keys.
            By::Next if share.next < keys.len() => share.next,
            By::Next => return Err(ParseError::Unexpected),
            By::Opaque(o, key) => {
                let j = o.wrapping_sub(self.base) as usize;
                if j < share.cursor || !mine(j) {
                    return Err(ParseError::Unexpected);
                }
                // When every item answers, none may be skipped: the server answers in
                // request order, so a reply past the next item is out of step.
                if share.every_item_replies && (share.cursor..j).any(mine) {
                    return Err(ParseError::Unexpected);
                }
                if let Some(key) = key {
                    if !short_eq(user(key)?, keys.key(j)) {
                        return Err(ParseError::Unexpected);
                    }
                }
                j
            }
            By::Key(key) => {
                let user = user(key)?;
                (share.cursor..keys.len())
                    .find(|&j| mine(j) && short_eq(keys.key(j), user))
                    .ok_or(ParseError::Unexpected)?
            }
        };
        share.cursor = j + 1;
        Ok(j)
    }
}

/// A reply's wire key without the namespace.
#[inline]
fn strip<'k>(key: &'k [u8], ns: &[u8]) -> Result<&'k [u8], ParseError> {
    key.strip_prefix(ns).ok_or(ParseError::Unexpected)
}

/// How a reply names the item it answers.
enum By<'a> {
    /// The decoder checked it against the share's next key.
    Next,
    /// By opaque (binary, meta), with the key if the reply echoes it.
    Opaque(u32, Option<&'a [u8]>),
    /// By key (text).
    Key(&'a [u8]),
}

impl<'a> By<'a> {
    #[inline]
    fn of(opaque: Option<u32>, key: Option<&'a [u8]>) -> By<'a> {
        match (opaque, key) {
            (Some(o), key) => By::Opaque(o, key),
            (None, Some(key)) => By::Key(key),
            (None, None) => By::Next,
        }
    }
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            server_of: Vec::new(),
            shares: Vec::new(),
            kind: Kind::Get,
            plain: false,
            base: 0,
        }
    }
}

impl Core {
    /// Validates every key and picks its server, into `plan`. Ejected servers fail their
    /// share at once.
    fn plan<'k>(
        &mut self,
        plan: &mut Plan,
        kb: &mut Vec<u8>,
        n: usize,
        key_at: impl Fn(usize) -> &'k [u8],
        placed: Option<&[u32]>,
    ) -> Result<()> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        self.sync();
        plan.server_of.clear();
        plan.server_of.reserve(n);
        plan.shares.clear();
        plan.shares.resize_with(self.labels.len(), Share::default);
        plan.plain = self.namespace.is_empty();
        // One pass: validate each key and pick its server. No connection is touched until
        // every key has passed.
        let mut no_servers = false;
        for j in 0..n {
            let user = key_at(j);
            // The common case without building the wire key; the rest (namespace too long,
            // binary keys over meta, errors) as every call does.
            if Key::new(user).is_err() || self.namespace.len() + user.len() > MAX_KEY_LEN {
                wire_key(&self.namespace, user, binary_keys, kb)?;
                plan.plain = false; // a binary key over meta: base64 on the wire
            }
            let server = match placed {
                // The caller placed each item (a key's copies).
                Some(p) => p.get(j).map(|&i| i as usize),
                None => {
                    let hashed: &[u8] = if self.hash_with_namespace && !self.namespace.is_empty() {
                        kb.clear();
                        kb.extend_from_slice(&self.namespace);
                        kb.extend_from_slice(user);
                        kb
                    } else {
                        user
                    };
                    self.pinned.or_else(|| self.ring.pick(hashed))
                }
            };
            match server {
                Some(i) => {
                    plan.shares[i].keys += 1;
                    plan.server_of.push(i as u32);
                }
                // Keep validating: a bad key is reported before a missing server.
                None => no_servers = true,
            }
        }
        if no_servers {
            return Err(Error::NoServers);
        }
        // Each server with keys: is it up? Then connect and start its request.
        let mut failed = false;
        for i in 0..plan.shares.len() {
            if plan.shares[i].keys > 0 {
                // Items placed by the caller were routed by it: it took the probes.
                let up = match placed {
                    Some(_) => self.check_routed_up(i),
                    None => self.check_up(i),
                };
                if let Err(e) = up.and_then(|()| self.start(i).map(drop)) {
                    plan.shares[i].error = Some(e);
                    failed = true;
                } else if Strays::any(&self.driver, i) {
                    // Quiet commands went out before without a sync: one goes first, and
                    // what they answered is read up to its reply; a late reply is read
                    // before (see `Strays`).
                    plan.shares[i].strays = Strays::on(&mut self.driver, i);
                    if plan.shares[i].strays.owed {
                        self.protocol
                            .encode(self.driver.wbuf(i), &Cmd::Sync, 0, false);
                    }
                }
            }
        }
        plan.base = self.reserve_opaques(n);
        if failed {
            for s in plan.server_of.iter_mut() {
                if plan.shares[*s as usize].error.is_some() {
                    *s = NO_SERVER;
                }
            }
        }
        Ok(())
    }

    /// Encodes item `j` (user key `user`, then `value` if any) into its server's batch.
    #[inline(always)]
    fn encode_item<W: Wire>(
        &mut self,
        plan: &mut Plan,
        kb: &mut Vec<u8>,
        j: usize,
        user: &[u8],
        value: Option<&[u8]>,
        cmd: impl FnOnce(Key<'_>) -> Cmd<'_>,
    ) {
        let i = plan.server_of[j];
        if i == NO_SERVER {
            return;
        }
        let share = &mut plan.shares[i as usize];
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let key = if plan.plain {
            // No namespace, and plan() found every key a valid text key.
            Key::trusted(user)
        } else {
            wire_key(&self.namespace, user, binary_keys, kb)
                .expect("validated by plan()")
                .0
        };
        let w = self.driver.wbuf(i as usize);
        let opaque = plan.base.wrapping_add(j as u32);
        W::encode_item(w, &cmd(key), opaque, share.encoded);
        if let Some(v) = value {
            w.extend_from_slice(v);
            w.extend_from_slice(W::TRAILER);
        }
        share.encoded += 1;
    }

    /// Encodes every planned item (`cmd` builds item `j`'s command from its wire key, and
    /// `value(j)` follows it), closes every server's batch, then runs the plan,
    /// handing each hit to `on_hit(item index, item)` and each other reply unit that answers
    /// an item to `on_other`. End
    /// markers, error replies and completion are handled here for all protocols.
    fn batch<'v, W: Wire>(
        &mut self,
        scratch: &mut Scratch,
        keys: &(impl Keys + ?Sized),
        value: impl Fn(usize) -> Option<&'v [u8]>,
        cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        on_hit: impl FnMut(usize, ItemRef<'_>) -> Result<(), ParseError>,
        on_other: impl FnMut(&mut Plan, usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> Result<()> {
        for j in 0..keys.len() {
            let (plan, kb) = (&mut scratch.plan, &mut scratch.keybuf);
            self.encode_item::<W>(plan, kb, j, keys.key(j), value(j), |key| cmd(j, key));
        }
        self.run_batch::<W>(scratch, keys, on_hit, on_other)
    }

    fn run_batch<W: Wire>(
        &mut self,
        scratch: &mut Scratch,
        keys: &(impl Keys + ?Sized),
        on_hit: impl FnMut(usize, ItemRef<'_>) -> Result<(), ParseError>,
        on_other: impl FnMut(&mut Plan, usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> Result<()> {
        let plan = &mut scratch.plan;
        let kind = plan.kind;
        for (i, share) in plan.shares.iter_mut().enumerate() {
            if share.keys > 0 && share.error.is_none() {
                let shape = W::end_batch(self.driver.wbuf(i), kind, share.keys);
                share.ends = shape.ends;
                share.every_item_replies = shape.every_item_replies;
            }
        }
        // Shared, not taken out: a panicking callback leaves the client as it was.
        let ns = Arc::clone(&self.namespace);
        let labels = Arc::clone(&self.labels);
        let mut reader = BatchReader {
            keys,
            ns: &ns,
            labels: &labels,
            limits: self.limits,
            expect: Expect::batch(kind),
            closed: Vec::new(),
            on_hit,
            on_other,
        };
        let batches = &mut scratch.batches;
        let result = self.run_plan(plan, batches, |plan, i, buf| reader.read::<W>(plan, i, buf));
        for &i in &reader.closed {
            self.driver.disconnect(i);
        }
        result
    }

    /// Runs the planned request on every server that has one, then records health and
    /// combines errors: the one failed server's error, or [`Error::Partial`].
    fn run_plan(
        &mut self,
        plan: &mut Plan,
        batches: &mut Vec<Batch<'static>>,
        on_reply: impl FnMut(&mut Plan, usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    ) -> Result<()> {
        let span = self.health.observe.span(CallOp {
            kind: plan.kind,
            server: None,
            servers: plan.shares.iter().filter(|s| s.keys > 0).count(),
            protocol: self.protocol,
            keys: plan.server_of.len(),
            value_bytes: 0,
        });
        span.run(|| self.run_plan_traced(plan, batches, on_reply))
    }

    fn run_plan_traced(
        &mut self,
        plan: &mut Plan,
        batches: &mut Vec<Batch<'static>>,
        mut on_reply: impl FnMut(&mut Plan, usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    ) -> Result<()> {
        let started = self.health.observe.start();
        let op = self.driver.new_op();
        batches.extend(
            plan.shares
                .iter()
                .enumerate()
                .filter(|(_, s)| s.keys > 0 && s.error.is_none())
                .map(|(i, _)| Batch::new(i, None, &op)),
        );
        self.driver
            .exchange_many(batches, &op, Until::Done, |i, buf| on_reply(plan, i, buf));
        for b in batches.drain(..) {
            let share = &mut plan.shares[b.server];
            if let Some(e) = b.error {
                share.error = Some(e);
            }
        }
        self.settle_plan(plan, started)
    }

    /// After a planned batch's exchange: records each server's health and counters, and
    /// combines the errors (the one failed server's, or [`Error::Partial`]).
    fn settle_plan(&mut self, plan: &mut Plan, started: crate::observe::Started) -> Result<()> {
        let mut failed = Vec::new();
        for (i, share) in plan.shares.iter_mut().enumerate() {
            if share.keys == 0 {
                continue;
            }
            // The error stays in the share: a caller that placed items looks it up
            // (`batch_error`).
            match &share.error {
                Some(e @ Error::ServerDown { .. }) => {
                    failed.push((self.labels[i].clone(), e.clone()))
                }
                Some(e) => {
                    self.health.counters_mut(i).requests += 1;
                    self.health.record_error(i, e, &mut self.ring);
                    failed.push((self.labels[i].clone(), e.clone()));
                }
                None => {
                    share.strays.settle(&mut self.driver, &mut self.health, i);
                    self.health.record(i, &Ok(()), &mut self.ring);
                    self.health.observe.call(i, plan.kind, true, started);
                    self.health.observe.bytes(i, self.driver.bytes(i));
                    if plan.kind == Kind::Get {
                        let (hits, misses) = (share.hits as u64, (share.keys - share.hits) as u64);
                        self.health.observe.lookups(i, hits, misses);
                        let c = self.health.counters_mut(i);
                        c.hits += hits;
                        c.misses += misses;
                    }
                }
            }
        }
        combine(failed)
    }
}

/// A chain written by [`Core::chain_send`] whose replies are not read yet.
pub(crate) struct Sent {
    op: Op,
    /// The connection it went out on ([`Driver::connects`](crate::conn::driver::Driver)).
    conn: u64,
    started: Started,
    /// Where a read interrupted by the driver's waker stopped: the part being read, if any
    /// (`None` before the first read).
    resume: Option<Option<usize>>,
}

impl Sent {
    /// The connection it went out on: later chains go behind it only there.
    pub(crate) fn conn(&self) -> u64 {
        self.conn
    }
}

/// One batch of a chain (see [`Core::chain`]): its kind and keys.
pub(crate) struct Part<'p> {
    pub(crate) kind: Kind,
    pub(crate) keys: &'p dyn Keys,
    /// Set by the chain: `Ok` once every item was answered (or, quiet, succeeded).
    pub(crate) result: Result<()>,
}

/// A chain's items and where their replies go, by part `k` and item `j`.
pub(crate) struct ChainItems<'c> {
    /// Item `j` of part `k`'s value (stores).
    pub(crate) value: &'c dyn Fn(usize, usize) -> Option<&'c [u8]>,
    /// Item `j` of part `k`'s command, with its wire key.
    pub(crate) cmd: &'c dyn Fn(usize, usize, Key<'_>) -> Cmd<'_>,
    /// A hit (gets): `(k, j, item)`.
    pub(crate) on_hit: &'c mut dyn FnMut(usize, usize, ItemRef<'_>),
    /// Another reply that answers item `j` of part `k` (stores, deletes, touches, incrs).
    pub(crate) on_item: &'c mut dyn FnMut(usize, usize, Outcome<'_>) -> Result<(), ParseError>,
}

/// A chain: several batches for the one server a core is pinned to, written at once and
/// read in order: one round trip for them all (a shared client's round).
impl Core {
    /// Runs `parts` as one exchange with the server this core is pinned to: every part's
    /// items and closing marker in one write, then each part's replies, in order. Each
    /// part's result is set as its own batch's would be; a part the exchange did not reach
    /// the end of (the connection failed, or an error reply left the stream in doubt) fails
    /// with that error, and its items nobody answered are not taken for successes.
    pub(crate) fn chain(
        &mut self,
        scratch: &mut Scratch,
        parts: &mut [Part<'_>],
        items: &mut ChainItems<'_>,
    ) {
        let Some(i) = self.pinned_for(parts) else {
            return;
        };
        let mut plans = std::mem::take(&mut scratch.chain);
        let live = with_wire!(self.protocol, W => self.chain_encode::<W>(
            i, &mut plans, &mut scratch.keybuf, parts, items.value, items.cmd, false
        ));
        if live {
            let started = self.health.observe.start();
            let op = self.driver.new_op();
            let (on_hit, on_item) = (&mut *items.on_hit, &mut *items.on_item);
            with_wire!(self.protocol, W => self.chain_read::<W>(
                i, &mut plans, &mut scratch.batches, parts, on_hit, on_item, &op, started,
                &mut None, None
            ));
        }
        scratch.chain = plans;
        self.hand_over_chain(scratch, parts);
    }

    /// Pipelined rounds, first half: plans `parts` (into `plans`) and writes them to the
    /// server this core is pinned to, reading nothing; [`chain_recv`](Self::chain_recv)
    /// reads their replies later, after those of the chains sent before. `behind` is the
    /// connection the chains sent before are unread on ([`Sent::conn`]; the caller checked
    /// [`may_pipeline`](Self::may_pipeline)): this one goes on it as is, never replaced or
    /// reconnected. `None` when nothing is left to read: every part's result is set.
    pub(crate) fn chain_send<'v>(
        &mut self,
        scratch: &mut Scratch,
        plans: &mut Vec<Plan>,
        parts: &mut [Part<'_>],
        value: &dyn Fn(usize, usize) -> Option<&'v [u8]>,
        cmd: &dyn Fn(usize, usize, Key<'_>) -> Cmd<'_>,
        behind: Option<u64>,
    ) -> Option<Sent> {
        let i = self.pinned_for(parts)?;
        let live = with_wire!(self.protocol, W => self.chain_encode::<W>(
            i, plans, &mut scratch.keybuf, parts, value, cmd, behind.is_some()
        ));
        if live {
            let started = self.health.observe.start();
            let op = self.driver.new_op();
            match self.driver.send_all(i, &op) {
                Ok(()) => {
                    let conn = self.driver.connects(i);
                    return Some(Sent {
                        op,
                        conn,
                        started,
                        resume: None,
                    });
                }
                Err(e) => {
                    let n = parts.len();
                    for plan in plans[..n].iter_mut() {
                        if plan.shares[i].keys > 0 && plan.shares[i].error.is_none() {
                            plan.shares[i].error = Some(e.clone());
                        }
                    }
                    self.settle_chain(&mut plans[..n], parts, i, Some(started));
                }
            }
        }
        self.hand_over_chain(scratch, parts);
        None
    }

    /// Pipelined rounds, second half: reads the replies of a chain [`chain_send`]
    /// (Self::chain_send) wrote, as [`chain`](Self::chain) reads its own, on the poll path:
    /// false if the driver's waker interrupted it first (nothing settled; call again with
    /// the same `sent`). `last`: no other round is unread behind it. If the connection it
    /// went out on is gone (an earlier round's failure closed it), its parts fail unread:
    /// that failure was counted in the server's health already.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn chain_recv(
        &mut self,
        scratch: &mut Scratch,
        plans: &mut [Plan],
        sent: &mut Sent,
        last: bool,
        parts: &mut [Part<'_>],
        on_hit: &mut dyn FnMut(usize, usize, ItemRef<'_>),
        on_item: &mut dyn FnMut(usize, usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> bool {
        let Some(i) = self.pinned_for(parts) else {
            return true;
        };
        if self.driver.connection_id(i) == Some(sent.conn) {
            let (op, started) = (sent.op, sent.started);
            let done = with_wire!(self.protocol, W => self.chain_read::<W>(
                i, plans, &mut scratch.batches, parts, on_hit, on_item, &op, started,
                &mut sent.resume, Some(last)
            ));
            if !done {
                return false;
            }
            if !last && self.driver.connection_id(i) != Some(sent.conn) {
                // This round's failure closed the connection: the rounds behind it fail
                // with the same error when it was the transport's (a frozen server's
                // timeout stays a timeout); after an error reply, with their own.
                use crate::error::ErrorKind as K;
                let e = (parts.iter())
                    .find_map(|p| p.result.clone().err())
                    .filter(|e| matches!(e.kind(), K::Timeout | K::Io));
                self.pipeline_lost = e.map(|e| (sent.conn, e));
            }
        } else {
            let e = match &self.pipeline_lost {
                Some((conn, e)) if *conn == sent.conn => e.clone(),
                _ => self.unread_error(
                    i,
                    "a pipelined round before this one failed, or an error reply in it left \
                     the stream in doubt",
                ),
            };
            for (plan, part) in plans.iter().zip(parts.iter_mut()) {
                if plan.shares[i].keys > 0 && part.result.is_ok() {
                    part.result = Err(e.clone());
                }
            }
        }
        self.hand_over_chain(scratch, parts);
        true
    }

    /// This driver's waker (see [`Driver::waker`](crate::conn::driver::Driver)): it
    /// interrupts a pipelined read so that another round can be written.
    pub(crate) fn waker(&mut self) -> Result<Arc<mio::Waker>> {
        self.driver.waker()
    }

    /// Whether a chain may be sent behind the chains unread on connection `conn` (see
    /// [`chain_send`](Self::chain_send)): it is still open, and nothing else (a list change's
    /// hand-over, a server leaving the list, replies owed to earlier calls, TLS) asks for
    /// one exchange at a time.
    pub(crate) fn may_pipeline(&self, conn: u64) -> bool {
        let Some(i) = self.pinned else {
            return false;
        };
        self.driver.connection_id(i) == Some(conn)
            && self.handover.is_empty()
            && self.check_member(i).is_ok()
            && !self.driver.owes_any(i)
            && !self.driver.is_tls()
    }

    /// The connection a round could be sent on directly by a caller (see the shared
    /// client's `Engine::direct`): its id and socket, if it is open and
    /// [`may_pipeline`](Self::may_pipeline) holds for it (nothing asks for one exchange at a
    /// time). Needs a pinned server.
    pub(crate) fn direct_conn(&self) -> Option<(u64, std::os::fd::RawFd)> {
        let i = self.pinned?;
        let conn = self.driver.connection_id(i)?;
        let fd = self.driver.socket_fd(i)?;
        self.may_pipeline(conn).then_some((conn, fd))
    }

    /// Server `i`'s connection: its id and socket, if open and plain (see
    /// [`Driver::socket_fd`](crate::conn::driver::Driver::socket_fd)).
    pub(crate) fn socket_of(&self, i: usize) -> Option<(u64, std::os::fd::RawFd)> {
        Some((self.driver.connection_id(i)?, self.driver.socket_fd(i)?))
    }

    /// Another poll saw server `i`'s socket readable (see [`Driver::assume_readable`](crate::conn::driver::Driver::assume_readable)).
    pub(crate) fn assume_readable(&mut self, i: usize) {
        self.driver.assume_readable(i);
    }

    /// Closes server `i`'s connection: rounds written on it will never be read (a panic
    /// mid-pipeline).
    pub(crate) fn drop_connection(&mut self, i: usize) {
        self.driver.disconnect(i);
    }

    /// The server this core is pinned to; without one, every part fails.
    fn pinned_for(&self, parts: &mut [Part<'_>]) -> Option<usize> {
        if self.pinned.is_none() {
            for p in parts.iter_mut() {
                p.result = Err(Error::NoServers);
            }
        }
        self.pinned
    }

    /// Keys a list change moved are deleted where they were too (as `write_batch`).
    fn hand_over_chain(&mut self, scratch: &mut Scratch, parts: &mut [Part<'_>]) {
        if !self.handover.is_empty() {
            for p in parts.iter_mut().filter(|p| p.kind != Kind::Get) {
                let handed = self.hand_over_all(scratch, p.keys);
                if p.result.is_ok() {
                    p.result = handed;
                }
            }
        }
    }

    /// Plans every part on server `i` (into `plans`) and encodes the ones with items into
    /// its write buffer. False when nothing is to go out: every part's result is set then.
    /// `behind`: chains are unread on the connection, which is left as it is (see
    /// [`chain_send`](Self::chain_send)).
    #[allow(clippy::too_many_arguments)]
    fn chain_encode<'v, W: Wire>(
        &mut self,
        i: usize,
        chain: &mut Vec<Plan>,
        keybuf: &mut Vec<u8>,
        parts: &mut [Part<'_>],
        value: &dyn Fn(usize, usize) -> Option<&'v [u8]>,
        cmd: &dyn Fn(usize, usize, Key<'_>) -> Cmd<'_>,
        behind: bool,
    ) -> bool {
        if chain.len() < parts.len() {
            chain.resize_with(parts.len(), Plan::default);
        }
        // Planned before anything is encoded: planning the first part with items connects
        // the server (which clears its write buffer) and puts a sync ahead if one is owed;
        // the others follow it. An empty part is done at once.
        let Some(lead) = parts.iter().position(|p| p.keys.len() > 0) else {
            for p in parts.iter_mut() {
                p.result = Ok(());
            }
            return false;
        };
        if behind {
            // What the write buffer holds went out already (the chains before this one).
            self.driver.wbuf(i).clear();
        }
        for k in std::iter::once(lead).chain((0..parts.len()).filter(|&k| k != lead)) {
            let part = &mut parts[k];
            let keys = part.keys;
            part.result = if keys.len() == 0 {
                let plan = &mut chain[k];
                plan.server_of.clear();
                plan.shares.clear();
                plan.shares.resize_with(self.labels.len(), Share::default);
                Ok(())
            } else if k == lead && !behind {
                self.plan(&mut chain[k], keybuf, keys.len(), |j| keys.key(j), None)
            } else {
                // After the lead (every part before it is empty), or behind other chains:
                // the connection is up already.
                let error = if behind {
                    None
                } else {
                    chain[lead].shares[i].error.clone()
                };
                self.plan_after(error, i, &mut chain[k], keybuf, keys.len(), |j| keys.key(j))
            };
            let plan = &mut chain[k];
            plan.kind = part.kind;
            if let (true, false, Err(e)) = (k == lead, behind, &part.result) {
                // Nothing goes out: every part fails as its lead did.
                let e = e.clone();
                for p in parts.iter_mut() {
                    p.result = Err(e.clone());
                }
                return false;
            }
            if part.result.is_err() {
                // Nothing of this part goes out: it answers nothing.
                plan.shares.iter_mut().for_each(|s| s.keys = 0);
            }
        }
        let mut live = 0;
        for (k, part) in parts.iter_mut().enumerate() {
            let plan = &mut chain[k];
            let share = &plan.shares[i];
            if share.keys == 0 || share.error.is_some() {
                continue;
            }
            for j in 0..part.keys.len() {
                self.encode_item::<W>(plan, keybuf, j, part.keys.key(j), value(k, j), |key| {
                    cmd(k, j, key)
                });
            }
            let shape = W::end_batch(self.driver.wbuf(i), part.kind, plan.shares[i].keys);
            let share = &mut plan.shares[i];
            share.ends = shape.ends;
            share.every_item_replies = shape.every_item_replies;
            live += 1;
        }
        if live == 0 {
            self.settle_chain(&mut chain[..parts.len()], parts, i, None);
            return false;
        }
        true
    }

    /// Runs the exchange of a chain encoded on server `i` (written with it, unless the write
    /// buffer is empty: sent before) and settles each part. `pipelined` (a round sent by
    /// [`chain_send`](Self::chain_send)): read on the poll path, which the driver's waker
    /// interrupts; `Some(last)`, where `last` says no other round is unread behind it.
    /// `resume` is where an interrupted read stopped (the part being read, if any; `None`
    /// at first); false if interrupted before the last reply (nothing settled: call again).
    #[allow(clippy::too_many_arguments)]
    fn chain_read<W: Wire>(
        &mut self,
        i: usize,
        chain: &mut [Plan],
        batches: &mut Vec<Batch<'static>>,
        parts: &mut [Part<'_>],
        on_hit: &mut dyn FnMut(usize, usize, ItemRef<'_>),
        on_item: &mut dyn FnMut(usize, usize, Outcome<'_>) -> Result<(), ParseError>,
        op: &Op,
        started: Started,
        resume: &mut Option<Option<usize>>,
        pipelined: Option<bool>,
    ) -> bool {
        let ns = Arc::clone(&self.namespace);
        let labels = Arc::clone(&self.labels);
        let mut reader =
            ChainReader::new(i, &ns, &labels, self.limits, chain, parts.len(), *resume);
        let mut on_reply = |buf: &[u8]| reader.read::<W>(chain, parts, buf, on_hit, on_item);
        let failure = match pipelined {
            Some(last) => match self.driver.read_until_woken(i, op, last, &mut on_reply) {
                Ok(true) => None,
                Ok(false) => {
                    // Interrupted: the reader's place is kept in the plans and `resume`.
                    *resume = Some(reader.cur);
                    return false;
                }
                Err(e) => Some(e),
            },
            None => {
                batches.push(Batch::new(i, None, op));
                self.driver
                    .exchange_many(batches, op, Until::Done, |_, buf| on_reply(buf));
                let failure = batches.pop().and_then(|b| b.error);
                batches.clear();
                failure
            }
        };
        let (cur, doubt) = (reader.cur, reader.doubt);
        if doubt {
            match pipelined {
                // Rounds written behind this one are still to run on the server: they
                // fail here, and must not run after the calls made next.
                Some(false) => self.driver.drain_close(i, op.deadline()),
                _ => self.driver.disconnect(i),
            }
        }
        // The part the exchange did not finish fails with its error (or the error reply's),
        // and so do the parts after it, unread; the server's health counts it once.
        let mut stop = parts.len();
        if let Some(k) = cur {
            let e = failure
                .or_else(|| chain[k].shares[i].error.clone())
                .unwrap_or_else(|| self.parse_error(i));
            chain[k].shares[i].error = Some(e);
            stop = k + 1;
        }
        self.settle_chain(&mut chain[..stop], &mut parts[..stop], i, Some(started));
        if let Some(k) = cur {
            // The parts after it were not read: after an error reply that left the stream in
            // doubt, they fail as unread (the reply was another item's), else with the
            // connection's failure.
            let e = match doubt {
                true => self.unread_error(
                    i,
                    "an error reply before this call's left the stream in doubt",
                ),
                false => chain[k].shares[i].error.clone().expect("set above"),
            };
            for part in &mut parts[stop..] {
                if part.result.is_ok() {
                    part.result = Err(e.clone());
                }
            }
        }
        true
    }

    /// The error of calls written on server `i`'s connection and never read, because it was
    /// closed first (`why`): they may or may not have run.
    fn unread_error(&self, i: usize, why: &str) -> Error {
        Error::Io {
            server: self.labels[i].clone(),
            source: Arc::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("connection closed before this call's reply was read ({why}); it may or may not have run"),
            )),
        }
    }

    /// A reply that answers nothing asked, from server `i`.
    fn parse_error(&self, i: usize) -> Error {
        Error::Parse {
            server: self.labels[i].clone(),
            error: ParseError::Unexpected,
        }
    }

    /// Each part's result, health and counters, and the hand-over of the writes' moved keys.
    fn settle_chain(
        &mut self,
        chain: &mut [Plan],
        parts: &mut [Part<'_>],
        i: usize,
        started: Option<crate::observe::Started>,
    ) {
        // One failure of the server counts once in its health, however many parts it
        // failed (the parts after the lead share its planning error: a refused connect).
        let mut counted = false;
        for (plan, part) in chain.iter_mut().zip(parts.iter_mut()) {
            if part.result.is_err() {
                continue;
            }
            if plan.shares[i].keys == 0 && plan.shares[i].error.is_none() {
                continue;
            }
            if let (true, Some(e)) = (counted, &plan.shares[i].error) {
                part.result = Err(e.clone());
                continue;
            }
            let started = started.unwrap_or_else(|| self.health.observe.start());
            part.result = self.settle_plan(plan, started);
            counted |= plan.shares[i].error.is_some();
        }
    }

    /// Plans a chain's later part: the same server as the lead (connected and started by it;
    /// `error` if it failed), keys validated as [`plan`](Self::plan) does, opaques of its
    /// own.
    fn plan_after<'k>(
        &mut self,
        error: Option<Error>,
        i: usize,
        plan: &mut Plan,
        kb: &mut Vec<u8>,
        n: usize,
        key_at: impl Fn(usize) -> &'k [u8],
    ) -> Result<()> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        plan.server_of.clear();
        plan.shares.clear();
        plan.shares.resize_with(self.labels.len(), Share::default);
        plan.plain = self.namespace.is_empty();
        for j in 0..n {
            let user = key_at(j);
            if Key::new(user).is_err() || self.namespace.len() + user.len() > MAX_KEY_LEN {
                wire_key(&self.namespace, user, binary_keys, kb)?;
                plan.plain = false;
            }
        }
        let server = if error.is_some() { NO_SERVER } else { i as u32 };
        plan.server_of.resize(n, server);
        plan.shares[i].keys = n;
        plan.shares[i].error = error;
        plan.base = self.reserve_opaques(n);
        Ok(())
    }
}

/// The batches [`Client`](crate::Client) and the shared client run.
impl Core {
    /// One retrieval batch over `keys` (a multi-get, or a shared client's coalesced gets):
    /// hits go to `on_hit(index, item)` as they arrive; a key without a hit is a miss once
    /// this returns `Ok`.
    pub(crate) fn get_batch(
        &mut self,
        scratch: &mut Scratch,
        with_cas: bool,
        keys: &(impl Keys + ?Sized),
        on_hit: impl FnMut(usize, ItemRef<'_>),
    ) -> Result<()> {
        self.get_batch_on(scratch, with_cas, keys, None, on_hit)
    }

    /// [`get_batch`](Self::get_batch), with item `j` sent to server `placed[j]` when
    /// `placed` is given (a key's copies); a server that failed is then named by
    /// [`batch_error`](Self::batch_error).
    pub(crate) fn get_batch_on(
        &mut self,
        scratch: &mut Scratch,
        with_cas: bool,
        keys: &(impl Keys + ?Sized),
        placed: Option<&[u32]>,
        mut on_hit: impl FnMut(usize, ItemRef<'_>),
    ) -> Result<()> {
        if keys.len() == 0 {
            return Ok(());
        }
        let core = self;
        core.plan_keys(scratch, keys, Kind::Get, placed)?;
        let opts = GetOpts {
            cas: with_cas,
            ..GetOpts::default()
        };
        let on_hit = |j: usize, item: ItemRef<'_>| {
            on_hit(j, item);
            Ok(())
        };
        with_wire!(core.protocol, W => {
            core.batch::<W>(
                scratch,
                keys,
                |_| None,
                |_, key| Cmd::Get(key, opts),
                on_hit,
                |_, _, _| Err(ParseError::Unexpected),
            )
        })
    }

    /// One batch of stores or deletes (`kind`) for the shared client: each reply that
    /// answers an item goes to `on_item(index, outcome)`; an item no reply answered (quiet
    /// protocols answer only failures) succeeded once this returns `Ok`.
    pub(crate) fn write_batch<'v>(
        &mut self,
        scratch: &mut Scratch,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        value: impl Fn(usize) -> Option<&'v [u8]>,
        cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        on_item: impl FnMut(usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> Result<()> {
        let result = self.write_batch_on(scratch, kind, keys, None, value, cmd, on_item);
        // Keys a list change moved are deleted where they were too.
        if self.handover.is_empty() {
            return result;
        }
        result.and(self.hand_over_all(scratch, keys))
    }

    /// [`write_batch`](Self::write_batch), with item `j` sent to server `placed[j]` when
    /// `placed` is given (as [`get_batch_on`](Self::get_batch_on)).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_batch_on<'v>(
        &mut self,
        scratch: &mut Scratch,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        placed: Option<&[u32]>,
        value: impl Fn(usize) -> Option<&'v [u8]>,
        cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        mut on_item: impl FnMut(usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> Result<()> {
        if keys.len() == 0 {
            return Ok(());
        }
        let core = self;
        core.plan_keys(scratch, keys, kind, placed)?;
        let ns = Arc::clone(&core.namespace);
        let on_reply = |plan: &mut Plan, i: usize, outcome: Outcome<'_>| {
            let j = plan.answered(i, &outcome, &ns, keys)?;
            on_item(j, outcome)
        };
        with_wire!(core.protocol, W => {
            core.batch::<W>(scratch, keys, value, cmd, no_hits, on_reply)
        })
    }

    /// Plans and runs a batch of stores or deletes and counts the items done: every
    /// item but those whose condition was not met (`unmet` says which outcomes those are).
    pub(crate) fn count_batch<'v>(
        &mut self,
        scratch: &mut Scratch,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        value: impl Fn(usize) -> Option<&'v [u8]>,
        cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        unmet: fn(&Outcome<'_>) -> Option<bool>,
    ) -> Result<usize> {
        let core = self;
        core.plan_keys(scratch, keys, kind, None)?;
        let ns = Arc::clone(&core.namespace);
        let on_reply = |plan: &mut Plan, i: usize, outcome: Outcome<'_>| {
            plan.answer(i, outcome, &ns, keys, &unmet)
        };
        let result = with_wire!(core.protocol, W => {
            core.batch::<W>(scratch, keys, value, cmd, no_hits, on_reply)
        });
        let done = scratch.plan.shares.iter().map(|s| s.keys - s.unmet).sum();
        // Keys a list change moved are deleted where they were too (see `keyed_write`).
        let handed = if core.handover.is_empty() {
            Ok(())
        } else {
            core.hand_over_all(scratch, keys)
        };
        result.and(handed).map(|()| done)
    }

    /// [`hand_over`](Core::hand_over) for each of `keys`, in one pipelined batch of
    /// deletes (each to the key's previous owners): a batch's moved keys cost one more round
    /// trip in all, not one each.
    #[cold]
    pub(crate) fn hand_over_all(
        &mut self,
        scratch: &mut Scratch,
        keys: &(impl Keys + ?Sized),
    ) -> Result<()> {
        // Working space kept in the scratch: nothing allocated once warm.
        let (mut index, mut placed) = std::mem::take(&mut scratch.handover);
        index.clear();
        placed.clear();
        for j in 0..keys.len() {
            let Some((handover, h)) = self.previous_owners(keys.key(j), &mut scratch.keybuf)?
            else {
                break; // no key moved (the map is the same for every key)
            };
            let now = self.ring.pick_hash(h).map(|i| i as u32);
            for &o in handover.owners(h) {
                if Some(o) != now {
                    index.push(j as u32);
                    placed.push(o);
                }
            }
        }
        let r = if index.is_empty() {
            Ok(())
        } else {
            let picked = Picked {
                keys,
                index: &index,
            };
            self.write_batch_on(
                scratch,
                Kind::Delete,
                &picked,
                Some(&placed),
                |_| None,
                |_, k| Cmd::delete(k),
                |_, _| Ok(()),
            )
        };
        scratch.handover = (index, placed);
        r
    }

    /// Groups `keys` by server in `scratch`'s plan, for a batch of `kind`.
    fn plan_keys(
        &mut self,
        scratch: &mut Scratch,
        keys: &(impl Keys + ?Sized),
        kind: Kind,
        placed: Option<&[u32]>,
    ) -> Result<()> {
        self.plan(
            &mut scratch.plan,
            &mut scratch.keybuf,
            keys.len(),
            |j| keys.key(j),
            placed,
        )?;
        scratch.plan.kind = kind;
        Ok(())
    }

    /// After a batch, the error of server `i` if it failed (its items were not done).
    pub(crate) fn batch_error<'s>(&self, scratch: &'s Scratch, i: usize) -> Option<&'s Error> {
        scratch.plan.shares.get(i).and_then(|s| s.error.as_ref())
    }

    /// The chunking policy of a multi-key store or delete on these connections (`None`:
    /// no limit; see [`BatchPolicy`]).
    pub(crate) fn multi_key_policy(&self) -> Option<BatchPolicy> {
        BatchPolicy::multi_key(self.driver.is_tls(), self.namespace.len())
    }
}

/// A store or delete batch has no hits to take: a hit there answers nothing asked.
fn no_hits(_: usize, _: ItemRef<'_>) -> Result<(), ParseError> {
    Err(ParseError::Unexpected)
}

/// A multi-set's reply: `Some(unmet)` for a store outcome.
pub(crate) fn store_unmet(o: &Outcome<'_>) -> Option<bool> {
    match o {
        Outcome::Store(SetOutcome::Stored, ..) => Some(false),
        Outcome::Store(SetOutcome::NotStored | SetOutcome::Exists, ..) => Some(true),
        _ => None,
    }
}

/// A multi-delete's reply: `Some(unmet)` for a delete outcome.
pub(crate) fn delete_unmet(o: &Outcome<'_>) -> Option<bool> {
    match o {
        Outcome::Deleted(_) => Some(false),
        Outcome::NotFound(_) => Some(true),
        _ => None,
    }
}

/// Reads a chain's replies from server `i`, part after part, sans I/O: the part being read
/// is kept between calls, so a read interrupted anywhere (see `Driver::read_until_woken`)
/// resumes where it stopped, even in a part an error reply already failed (its replies go
/// on up to its end marker).
pub(crate) struct ChainReader<'a> {
    i: usize,
    ns: &'a [u8],
    labels: &'a [String],
    limits: Limits,
    /// The part being read; `None` once the last part's reply is complete.
    pub(crate) cur: Option<usize>,
    /// An error reply that names no request left the rest of the stream in doubt.
    pub(crate) doubt: bool,
}

impl<'a> ChainReader<'a> {
    /// A reader of the parts planned in `chain` (`parts` of them), from the first with
    /// items on server `i`, or from where an interrupted read stopped (`resume`).
    pub(crate) fn new(
        i: usize,
        ns: &'a [u8],
        labels: &'a [String],
        limits: Limits,
        chain: &[Plan],
        parts: usize,
        resume: Option<Option<usize>>,
    ) -> ChainReader<'a> {
        let cur = resume.unwrap_or_else(|| next_live(chain, i, parts, 0));
        ChainReader {
            i,
            ns,
            labels,
            limits,
            cur,
            doubt: false,
        }
    }

    /// Reads one reply unit from the start of `buf` for the part being read: a hit goes to
    /// `on_hit(part, item, ..)`, another reply that answers an item to `on_item(part, item,
    /// ..)`. `Complete((consumed, last))`, `last` once every part's reply is complete (or an
    /// error reply left the stream in doubt); an error is a reply that answers nothing asked.
    pub(crate) fn read<W: Wire>(
        &mut self,
        chain: &mut [Plan],
        parts: &[Part<'_>],
        buf: &[u8],
        on_hit: &mut dyn FnMut(usize, usize, ItemRef<'_>),
        on_item: &mut dyn FnMut(usize, usize, Outcome<'_>) -> Result<(), ParseError>,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let Some(k) = self.cur else {
            return Err(ParseError::Unexpected);
        };
        let part = &parts[k];
        let keys = part.keys;
        let get = part.kind == Kind::Get;
        let ns = self.ns;
        let mut reader = BatchReader {
            keys,
            ns,
            labels: self.labels,
            limits: self.limits,
            expect: Expect::batch(part.kind),
            closed: Vec::new(),
            on_hit: |j: usize, item: ItemRef<'_>| {
                if !get {
                    return no_hits(j, item);
                }
                on_hit(k, j, item);
                Ok(())
            },
            on_other: |plan: &mut Plan, s: usize, o: Outcome<'_>| {
                let j = plan.answered(s, &o, ns, keys)?;
                on_item(k, j, o)
            },
        };
        let r = reader.read::<W>(&mut chain[k], self.i, buf)?;
        let Status::Complete((n, done)) = r else {
            return Ok(r);
        };
        if !reader.closed.is_empty() {
            self.doubt = true;
            return Ok(Status::Complete((n, true)));
        }
        if done {
            self.cur = next_live(chain, self.i, parts.len(), k + 1);
        }
        Ok(Status::Complete((n, self.cur.is_none())))
    }
}

/// The first part from `from` on with items on server `i` that has not failed.
fn next_live(chain: &[Plan], i: usize, parts: usize, from: usize) -> Option<usize> {
    (from..parts).find(|&k| chain[k].shares[i].keys > 0 && chain[k].shares[i].error.is_none())
}

/// Reads the replies to a planned batch one unit at a time, sans I/O: which item each
/// answers, when a server's reply is complete, which servers failed and must be closed. The
/// driver's loops hand it whatever has arrived; the stream fuzz target drives it in memory.
struct BatchReader<'c, K: ?Sized, H, O> {
    keys: &'c K,
    ns: &'c [u8],
    labels: &'c [String],
    limits: Limits,
    expect: Expect,
    /// Servers whose reply is in doubt after an error: their connections are to be closed.
    closed: Vec<usize>,
    on_hit: H,
    on_other: O,
}

impl<K, H, O> BatchReader<'_, K, H, O>
where
    K: Keys + ?Sized,
    H: FnMut(usize, ItemRef<'_>) -> Result<(), ParseError>,
    O: FnMut(&mut Plan, usize, Outcome<'_>) -> Result<(), ParseError>,
{
    /// Reads one reply unit of server `i` from the start of `buf`: the bytes it took and
    /// whether the server's reply is now complete, or `Partial`. An error is a reply that
    /// answers nothing asked (the connection is then dropped).
    #[inline(always)]
    fn read<W: Wire>(
        &mut self,
        plan: &mut Plan,
        i: usize,
        buf: &[u8],
    ) -> Result<Status<(usize, bool)>, ParseError> {
        if plan.shares[i].strays.pending {
            return plan.shares[i].strays.read::<W>(buf, &self.limits);
        }
        if self.expect.kind == Kind::Get {
            // A multi-get's next hit is most often this server's next key, in the
            // common shape: read without the general decoder.
            let mut next = None;
            if W::MATCHES_BY_NEXT_KEY {
                let share = &mut plan.shares[i];
                let from = share.cursor;
                let j = (from..self.keys.len()).find(|&j| plan.server_of[j] == i as u32);
                share.next = j.unwrap_or(usize::MAX);
                next = j.map(|j| (self.ns, self.keys.key(j)));
            }
            if let Some(r) = W::batch_hit(buf, next, &self.limits) {
                let (n, hit) = match r? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                };
                plan.shares[i].replies += 1;
                plan.hit(i, hit, self.ns, self.keys, &mut self.on_hit)?;
                return Ok(Status::Complete((n, plan.shares[i].finished())));
            }
        }
        let (n, unit) = match W::decode(buf, &self.expect, &self.limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        let share = &mut plan.shares[i];
        match unit.outcome {
            Outcome::End => share.ends_seen += 1,
            Outcome::Error {
                refusal, closes, ..
            } if share.every_item_replies
                && self.expect.kind.answers_each()
                && (!closes || matches!(refusal, Refusal::Client | Refusal::UnknownCommand)) =>
            {
                // A touch's or incr's error (`CLIENT_ERROR cannot increment ...`, binary's
                // non-numeric status): one reply unit, and these commands carry no data
                // block that could be read as commands after it, so the stream stays in
                // step. Every item of such a batch answers, in request order: it answers its
                // item (by opaque, else the next one), and only that one fails. (Elsewhere a
                // meta or text error line, which names no request, closes the connection.)
                share.replies += 1;
                (self.on_other)(plan, i, unit.outcome)?;
            }
            Outcome::Error {
                refusal,
                message,
                closes,
                opaque,
            } => {
                share.error = Some(refused(&self.labels[i], refusal, message));
                if closes || opaque.is_none() {
                    // Not tied to an item: the rest of this server's reply is in doubt.
                    self.closed.push(i);
                    return Ok(Status::Complete((n, true)));
                }
            }
            Outcome::Hit(h) => {
                share.replies += 1;
                let hit = BatchHit {
                    data: h.data,
                    flags: h.flags,
                    cas: h.cas,
                    // Only the fast path may name the next key implicitly: a hit with
                    // neither an opaque nor a key names no item here, and on a protocol
                    // with opaques (binary, meta) a hit without one names none either.
                    opaque: h
                        .opaque
                        .or((h.key.is_none() || !W::MATCHES_BY_NEXT_KEY).then_some(u32::MAX)),
                    key: h.key,
                };
                plan.hit(i, hit, self.ns, self.keys, &mut self.on_hit)?;
            }
            outcome => {
                share.replies += 1;
                (self.on_other)(plan, i, outcome)?;
            }
        }
        Ok(Status::Complete((n, plan.shares[i].finished())))
    }
}

/// The keys of a multi-key call, by index: a key list or the keys of `(key, value)` items.
pub(crate) trait Keys {
    /// How many keys.
    fn len(&self) -> usize;
    /// Key `j`.
    fn key(&self, j: usize) -> &[u8];
}

impl<K: AsRef<[u8]>> Keys for [K] {
    fn len(&self) -> usize {
        <[K]>::len(self)
    }
    fn key(&self, j: usize) -> &[u8] {
        self[j].as_ref()
    }
}

/// Some keys of a list, by index (a key's copies each an item of a batch).
pub(crate) struct Picked<'a, K: ?Sized> {
    pub(crate) keys: &'a K,
    pub(crate) index: &'a [u32],
}

impl<K: Keys + ?Sized> Keys for Picked<'_, K> {
    fn len(&self) -> usize {
        self.index.len()
    }
    fn key(&self, j: usize) -> &[u8] {
        self.keys.key(self.index[j] as usize)
    }
}

/// The keys of `(key, value)` items.
pub(crate) struct ItemKeys<'a, K, V>(pub(crate) &'a [(K, V)]);

impl<K: AsRef<[u8]>, V> Keys for ItemKeys<'_, K, V> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn key(&self, j: usize) -> &[u8] {
        self.0[j].0.as_ref()
    }
}

/// A batch on one server, planned without a client, for the stream fuzz body: it encodes
/// the batch and reads replies with the client's own [`BatchReader`] and item matching.
#[cfg(any(test, fuzzing))]
pub(crate) mod for_fuzzing {
    use super::*;

    /// A one-server batch of `kind` over the given keys.
    pub(crate) struct OneServer {
        plan: Plan,
        labels: [String; 1],
        closed: bool,
    }

    impl OneServer {
        pub(crate) fn new(kind: Kind, keys: usize) -> OneServer {
            let mut plan = Plan {
                kind,
                plain: true,
                ..Plan::default()
            };
            plan.server_of = vec![0; keys];
            plan.shares.push(Share {
                keys,
                ..Share::default()
            });
            OneServer {
                plan,
                labels: ["fuzz".to_string()],
                closed: false,
            }
        }

        /// A sync went ahead of the batch (the connection owed one): the replies up to its
        /// reply are strays, read and set aside as the client does.
        pub(crate) fn owe_sync(&mut self) {
            self.plan.shares[0].strays = Strays::owing();
        }

        /// Encodes every item (`cmd` builds it, `value` follows it) and closes the batch.
        pub(crate) fn encode<W: Wire>(
            &mut self,
            out: &mut Vec<u8>,
            keys: &[Vec<u8>],
            value: Option<&[u8]>,
            cmd: impl Fn(Key<'_>) -> Cmd<'_>,
        ) {
            self.encode_items::<W>(out, keys, |_| value, |_, key| cmd(key));
        }

        /// Encodes item `j` as `cmd(j, key)` followed by `value(j)`, for every item, and
        /// closes the batch, as a client's batch does.
        pub(crate) fn encode_items<'v, W: Wire>(
            &mut self,
            out: &mut Vec<u8>,
            keys: &(impl Keys + ?Sized),
            value: impl Fn(usize) -> Option<&'v [u8]>,
            cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        ) {
            let share = &mut self.plan.shares[0];
            for j in 0..keys.len() {
                let key = Key::new(keys.key(j)).expect("batch keys are valid");
                W::encode_item(out, &cmd(j, key), j as u32, share.encoded);
                if let Some(v) = value(j) {
                    out.extend_from_slice(v);
                    out.extend_from_slice(W::TRAILER);
                }
                share.encoded += 1;
            }
            let shape = W::end_batch(out, self.plan.kind, keys.len());
            share.ends = shape.ends;
            share.every_item_replies = shape.every_item_replies;
        }

        /// Reads one reply unit as the client does: each hit's item index goes to `on_hit`.
        pub(crate) fn read<W: Wire>(
            &mut self,
            keys: &[Vec<u8>],
            buf: &[u8],
            on_hit: &mut impl FnMut(usize),
        ) -> Result<Status<(usize, bool)>, ParseError> {
            let unmet = match self.plan.kind {
                Kind::Store => store_unmet,
                _ => delete_unmet,
            };
            self.read_items::<W>(keys, buf, &mut |j, _| on_hit(j), &mut |plan, o| {
                plan.answer(0, o, &[], keys, &unmet)
            })
        }

        /// Reads one reply unit as a shared client's batch does ([`Client::batch_get`],
        /// [`Client::batch_write`]): a hit goes to `on_hit(index, item)`, and another
        /// outcome that answers an item to `on_item(index, outcome)`.
        pub(crate) fn read_answers<W: Wire>(
            &mut self,
            keys: &(impl Keys + ?Sized),
            buf: &[u8],
            on_hit: &mut impl FnMut(usize, ItemRef<'_>),
            on_item: &mut impl FnMut(usize, Outcome<'_>) -> Result<(), ParseError>,
        ) -> Result<Status<(usize, bool)>, ParseError> {
            self.read_items::<W>(keys, buf, on_hit, &mut |plan, o| {
                let j = plan.answered(0, &o, &[], keys)?;
                on_item(j, o)
            })
        }

        fn read_items<W: Wire>(
            &mut self,
            keys: &(impl Keys + ?Sized),
            buf: &[u8],
            on_hit: &mut impl FnMut(usize, ItemRef<'_>),
            on_other: &mut impl FnMut(&mut Plan, Outcome<'_>) -> Result<(), ParseError>,
        ) -> Result<Status<(usize, bool)>, ParseError> {
            let kind = self.plan.kind;
            let mut reader = BatchReader {
                keys,
                ns: &[],
                labels: &self.labels,
                limits: Limits { max_value: 256 },
                expect: Expect::batch(self.plan.kind),
                closed: Vec::new(),
                on_hit: |j: usize, item: ItemRef<'_>| -> Result<(), ParseError> {
                    if kind != Kind::Get {
                        return no_hits(j, item);
                    }
                    on_hit(j, item);
                    Ok(())
                },
                on_other: |plan: &mut Plan, _: usize, o: Outcome<'_>| on_other(plan, o),
            };
            let r = reader.read::<W>(&mut self.plan, 0, buf);
            self.closed |= !reader.closed.is_empty();
            r
        }

        /// The reply is complete: every end marker and (if every item answers) every reply.
        pub(crate) fn finished(&self) -> bool {
            self.plan.shares[0].finished()
        }

        /// An error reply answered the batch (the server's share failed).
        pub(crate) fn refused(&self) -> bool {
            self.plan.shares[0].error.is_some()
        }

        /// An error reply left the rest of the server's reply in doubt: the client closes it.
        pub(crate) fn closed(&self) -> bool {
            self.closed
        }
    }

    /// A chain of one-server batches planned without a client (a pipelined round, see
    /// [`Core::chain_send`]), for the tests and the stream fuzz body: each part's item `j`
    /// goes with opaque `base + j`, and the replies are read with the client's own
    /// [`ChainReader`], which keeps its place between calls as an interrupted read does.
    pub(crate) struct OneChain {
        plans: Vec<Plan>,
        labels: [String; 1],
        resume: Option<Option<usize>>,
        doubt: bool,
    }

    impl OneChain {
        /// Parts of `(kind, items, base)`.
        pub(crate) fn new(parts: &[(Kind, usize, u32)]) -> OneChain {
            let plans = (parts.iter())
                .map(|&(kind, keys, base)| Plan {
                    server_of: vec![0; keys],
                    shares: vec![Share {
                        keys,
                        ..Share::default()
                    }],
                    kind,
                    plain: true,
                    base,
                })
                .collect();
            OneChain {
                plans,
                labels: ["fuzz".to_string()],
                resume: None,
                doubt: false,
            }
        }

        /// Encodes every part with items as the client does: item `j` of part `k` is
        /// `cmd(k, j, key)` followed by `value(k, j)`; each part closed.
        pub(crate) fn encode<'v, W: Wire>(
            &mut self,
            out: &mut Vec<u8>,
            parts: &[Part<'_>],
            value: &dyn Fn(usize, usize) -> Option<&'v [u8]>,
            cmd: &dyn Fn(usize, usize, Key<'_>) -> Cmd<'_>,
        ) {
            for (k, part) in parts.iter().enumerate() {
                let plan = &mut self.plans[k];
                if part.keys.len() == 0 {
                    continue;
                }
                for j in 0..part.keys.len() {
                    let key = Key::new(part.keys.key(j)).expect("chain keys are valid");
                    let opaque = plan.base.wrapping_add(j as u32);
                    W::encode_item(out, &cmd(k, j, key), opaque, plan.shares[0].encoded);
                    if let Some(v) = value(k, j) {
                        out.extend_from_slice(v);
                        out.extend_from_slice(W::TRAILER);
                    }
                    plan.shares[0].encoded += 1;
                }
                let shape = W::end_batch(out, part.kind, part.keys.len());
                plan.shares[0].ends = shape.ends;
                plan.shares[0].every_item_replies = shape.every_item_replies;
            }
        }

        /// Reads one reply unit as a pipelined round does (see [`ChainReader::read`]),
        /// going on from where the last call stopped.
        pub(crate) fn read<W: Wire>(
            &mut self,
            parts: &[Part<'_>],
            buf: &[u8],
            on_hit: &mut dyn FnMut(usize, usize, ItemRef<'_>),
            on_item: &mut dyn FnMut(usize, usize, Outcome<'_>) -> Result<(), ParseError>,
        ) -> Result<Status<(usize, bool)>, ParseError> {
            // As `OneServer`'s and the stream fuzz body's read buffer.
            let limits = Limits { max_value: 256 };
            let mut reader = ChainReader::new(
                0,
                &[],
                &self.labels,
                limits,
                &self.plans,
                parts.len(),
                self.resume,
            );
            let r = reader.read::<W>(&mut self.plans, parts, buf, on_hit, on_item);
            self.resume = Some(reader.cur);
            self.doubt |= reader.doubt;
            r
        }

        /// Part `k`'s reply is complete: every end marker and (if every item answers)
        /// every reply.
        pub(crate) fn finished(&self, k: usize) -> bool {
            self.plans[k].shares[0].finished()
        }

        /// How many parts it has.
        pub(crate) fn parts(&self) -> usize {
            self.plans.len()
        }

        /// Part `k` failed: an error reply answered one of its items.
        pub(crate) fn failed(&self, k: usize) -> bool {
            self.plans[k].shares[0].error.is_some()
        }

        /// An error reply left the stream in doubt: the client closes the connection.
        pub(crate) fn doubt(&self) -> bool {
            self.doubt
        }
    }
}
