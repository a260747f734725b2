//! A round: everything queued for a server, served in batches (one multi-get of the
//! distinct keys, store and delete batches, the rest one by one), each reply handed back to
//! the slot of the request it answers.

//!
//! Sans I/O: a round reaches its server through a [`Transport`] and hands results to
//! [`Slots`]. The engine's are its pinned [`Client`] and its slot table; the tests' are an
//! in-memory server fed hand-written replies, and a record of what each slot got.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::engine::{Engine, Op, Reply, Req};
use crate::client::{Client, ItemInfo, ItemRef};
use crate::conn::batch::{BatchPolicy, MAX_ROUND_KEYS};
use crate::engine::batch::{ChainItems, Keys, Part, Plan, Sent};
use crate::engine::reply::refused;
use crate::error::{During, Error, Result};
use crate::proto::wire::{Cmd, GetOpts, Kind, Outcome};
use crate::proto::{Key, ParseError, SetOutcome};

#[cfg(test)]
mod tests;

/// Where a round's results go.
pub(super) trait Slots {
    /// Delivers `r` to `slot` (with `v`, a hit's value); a slot whose owner is gone is pushed
    /// to `freed` instead.
    fn complete(&self, slot: u32, r: Result<Reply>, v: Option<&[u8]>, freed: &mut Vec<u32>);
    /// Wakes the owners whose requests completed since the last call.
    fn wake_round(&self);
    /// The server's label, for errors.
    fn label(&self) -> &str;
    /// A call's time limit, for the errors of requests that expired while queued.
    fn timeout(&self) -> Duration;
}

impl Slots for Engine {
    fn complete(&self, slot: u32, r: Result<Reply>, v: Option<&[u8]>, freed: &mut Vec<u32>) {
        Engine::complete(self, slot, r, v, freed);
    }
    fn wake_round(&self) {
        Engine::wake_round(self);
    }
    fn label(&self) -> &str {
        &self.label
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Where a batch's hits go: `(index, item)`.
pub(super) type OnHit<'f> = &'f mut dyn FnMut(usize, ItemRef<'_>);

/// Where a write batch's replies go: `(index, outcome)`; `Err` if it cannot answer that item.
pub(super) type OnItem<'f> = &'f mut dyn FnMut(usize, Outcome<'_>) -> Result<(), ParseError>;

/// How a round's batches reach its server and come back: one request per batch, its replies
/// matched to the batch's items.
pub(super) trait Transport {
    /// How large a store or delete batch may grow.
    fn policy(&self) -> BatchPolicy;
    /// One multi-get over `keys`: each hit to `on_hit`; a key without a hit is a miss once
    /// this returns `Ok`.
    fn get(&mut self, cas: bool, keys: &ArenaKeys<'_>, on_hit: OnHit<'_>) -> Result<()>;
    /// One batch of stores or deletes (`kind`): each reply that answers an item to
    /// `on_item`; an item no reply answered succeeded once this returns `Ok`.
    fn write(&mut self, kind: Kind, w: &Writes<'_>, on_item: OnItem<'_>) -> Result<()>;
    /// One call on its own (a hit's value into `out`): the commands a round does not batch
    /// (get-and-touch), and an item over the batch cap.
    fn single(&mut self, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> Result<Reply>;
    /// A round's batches of several kinds as one exchange (see `Core::chain`), each part's
    /// result set; `false` if this transport runs them one after the other instead.
    fn chain(&mut self, parts: &mut [Part<'_>], items: &mut ChainItems<'_>) -> bool;
}

/// The engine's transport: its client, pinned to the engine's server.
impl Transport for Client {
    fn policy(&self) -> BatchPolicy {
        BatchPolicy::round(self.is_tls(), self.namespace_arc().len())
    }
    fn get(&mut self, cas: bool, keys: &ArenaKeys<'_>, on_hit: OnHit<'_>) -> Result<()> {
        let (core, scratch) = self.engine();
        core.get_batch(scratch, cas, keys, on_hit)
    }
    fn write(&mut self, kind: Kind, w: &Writes<'_>, on_item: OnItem<'_>) -> Result<()> {
        let value = |j| w.value(j);
        let (core, scratch) = self.engine();
        core.write_batch(
            scratch,
            kind,
            &w.keys,
            value,
            |j, key| w.cmd(j, key),
            on_item,
        )
    }
    fn single(&mut self, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> Result<Reply> {
        self.perform(op, key, value, out)
    }
    fn chain(&mut self, parts: &mut [Part<'_>], items: &mut ChainItems<'_>) -> bool {
        // Over TLS a round's batches stay one per write: memcached stalls on quiet commands
        // whose last record also holds what follows them (see `Work::alone`).
        if self.is_tls() {
            return false;
        }
        let (core, scratch) = self.engine();
        core.chain(scratch, parts, items);
        true
    }
}

/// A store or delete batch: its keys, and each item's request.
pub(super) struct Writes<'w> {
    pub(super) keys: ArenaKeys<'w>,
    reqs: &'w [Req],
    batch: &'w [usize],
}

impl<'w> Writes<'w> {
    /// Item `j`'s value (a store's).
    pub(super) fn value(&self, j: usize) -> Option<&'w [u8]> {
        let req = &self.reqs[self.batch[j]];
        match req.op {
            Op::Store(_) => Some(&self.keys.arena[req.value.clone()]),
            _ => None,
        }
    }

    /// Item `j`'s command, with its wire key.
    pub(super) fn cmd<'k>(&self, j: usize, key: Key<'k>) -> Cmd<'k> {
        let req = &self.reqs[self.batch[j]];
        match req.op {
            Op::Store(o) => Cmd::Store(key, o, req.value.len()),
            Op::Touch(ttl) => Cmd::Touch(key, ttl),
            Op::Arith { decr, delta } => Cmd::Arith { key, decr, delta },
            _ => Cmd::Delete(key),
        }
    }
}

/// A combiner's working space, reused round after round.
#[derive(Default)]
pub(super) struct Work {
    pub(super) reqs: Vec<Req>,
    pub(super) arena: Vec<u8>,
    /// Requests of the current batch (indices into `reqs`).
    pub(super) batch: Vec<usize>,
    /// Distinct keys of a multi-get (ranges into `arena`) and, per request of the batch, the
    /// index of its key there; the requests of each distinct key, chained.
    pub(super) keys: Vec<Range<usize>>,
    pub(super) first: Vec<u32>,
    pub(super) next: Vec<u32>,
    /// Distinct keys by hash.
    pub(super) seen: std::collections::HashMap<u64, u32>,
    /// Per item of a store or delete batch: the answer read, if any.
    pub(super) answers: Vec<Option<Result<Reply>>>,
    /// Per distinct key of a multi-get: whether it was a hit.
    pub(super) hits: Vec<bool>,
    /// A value read by a call made on its own.
    pub(super) value: Vec<u8>,
    /// A transport failure in this round (see `serve`).
    pub(super) poison: Option<Error>,
    pub(super) freed: Vec<u32>,
    /// A chained round's write batches, one per kind of [`WRITE_KINDS`], and the answers
    /// read for each one's items.
    pub(super) writes: [WriteBatch; 4],
    pub(super) written: [Vec<Option<Result<Reply>>>; 4],
    /// The chain's gets ask for CAS uniques.
    with_cas: bool,
    /// A chain's plans, one per part: kept while a pipelined round's replies are unread.
    plans: Vec<Plan>,
}

/// The kinds of write a round batches, in the order it sends them.
const WRITE_KINDS: [Kind; 4] = [Kind::Store, Kind::Delete, Kind::Touch, Kind::Arith];

/// One kind's write batch of a chained round: its requests (indices into `reqs`) and their
/// keys.
#[derive(Default)]
pub(super) struct WriteBatch {
    batch: Vec<usize>,
    keys: Vec<Range<usize>>,
}

/// Whether a write batch of `kind` carries `op`.
fn wanted(kind: Kind, op: &Op) -> bool {
    match kind {
        Kind::Store => matches!(op, Op::Store(_)),
        Kind::Touch => matches!(op, Op::Touch(_)),
        Kind::Arith => matches!(op, Op::Arith { .. }),
        _ => matches!(op, Op::Delete),
    }
}

/// The answer `outcome` gives to a write batch's request `op`: `Err` if it cannot answer
/// such a request (a framing error).
fn answer_of(label: &str, op: Op, outcome: Outcome<'_>) -> Result<Result<Reply>, ParseError> {
    Ok(Ok(match (op, outcome) {
        // Without a CAS, "exists" and "not found" cannot answer a store.
        (Op::Store(o), Outcome::Store(s, ..))
            if o.cas.is_some() || matches!(s, SetOutcome::Stored | SetOutcome::NotStored) =>
        {
            Reply::Store(s)
        }
        (Op::Delete, Outcome::Deleted(_)) => Reply::Existed(true),
        (Op::Delete | Op::Touch(_), Outcome::NotFound(_)) => Reply::Existed(false),
        (Op::Touch(_), Outcome::Touched(_)) => Reply::Existed(true),
        (Op::Arith { .. }, Outcome::Number(n, _)) => Reply::Number(Some(n)),
        (Op::Arith { .. }, Outcome::NotFound(_)) => Reply::Number(None),
        // Its own error line (text touches and incrs: see `BatchReader`).
        (
            Op::Touch(_) | Op::Arith { .. },
            Outcome::Error {
                refusal, message, ..
            },
        ) => return Ok(Err(refused(label, refusal, message))),
        _ => return Err(ParseError::Unexpected),
    }))
}

/// The result of write request `op` that no reply answered, its batch having ended with
/// `result`: quiet protocols answer only what did not succeed.
fn unanswered(label: &str, op: Op, result: &Result<()>) -> Result<Reply> {
    match (result, op) {
        (Err(e), _) => Err(e.clone()),
        (Ok(()), Op::Store(_)) => Ok(Reply::Store(SetOutcome::Stored)),
        (Ok(()), Op::Delete) => Ok(Reply::Existed(true)),
        // Every touch and incr answers: a batch that ended without this one's answer is
        // refused by the reader before this; never a guess.
        (Ok(()), _) => Err(Error::Parse {
            server: label.to_string(),
            error: ParseError::Unexpected,
        }),
    }
}

/// The keys of a batch, as ranges into the round's arena.
pub(super) struct ArenaKeys<'a> {
    pub(super) arena: &'a [u8],
    pub(super) keys: &'a [Range<usize>],
}

impl Keys for ArenaKeys<'_> {
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn key(&self, j: usize) -> &[u8] {
        &self.arena[self.keys[j].clone()]
    }
}

pub(super) const NONE: u32 = u32::MAX;

/// FNV-1a: distinct keys of a batch are found by hash, then compared.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Work {
    pub(super) fn serve(&mut self, engine: &impl Slots, c: &mut impl Transport) {
        self.poison = None;
        self.serve_all(engine, c);
        // After a transport failure the rest of the round fails with it, at once: a dead or
        // frozen server costs one I/O timeout per round, not one per batch.
        if let Some(e) = self.poison.take() {
            for req in self.reqs.iter_mut() {
                if req.slot != NONE {
                    engine.complete(req.slot, Err(e.clone()), None, &mut self.freed);
                    req.slot = NONE;
                }
            }
        }
    }

    /// Notes a batch's failure: a transport failure poisons the rest of the round.
    fn failed(&mut self, e: &Error) {
        use crate::error::ErrorKind as K;
        if matches!(e.kind(), K::Timeout | K::Io | K::Tls | K::ServerDown) {
            self.poison.get_or_insert_with(|| e.clone());
        }
    }

    fn serve_all(&mut self, engine: &impl Slots, c: &mut impl Transport) {
        // Requests whose owner's deadline passed while queued are failed, not sent.
        self.expire(engine);
        if !self.chained(engine, c) {
            self.one_kind_at_a_time(engine, c);
        }
        for r in 0..self.reqs.len() {
            let req = &self.reqs[r];
            if self.poison.is_some() {
                return;
            }
            if req.slot == NONE || batched(&req.op) {
                continue;
            }
            let (slot, op) = (req.slot, req.op);
            let key = &self.arena[req.key.clone()];
            let result = c.single(op, key, &[], &mut self.value);
            if let Err(e) = &result {
                self.failed(e);
            }
            let value = matches!(result, Ok(Reply::Hit(_))).then_some(&self.value[..]);
            engine.complete(slot, result, value, &mut self.freed);
            engine.wake_round();
            self.reqs[r].slot = NONE;
        }
    }

    /// The round's gets, stores, deletes, touches and incrs, a batch at a time (one round
    /// trip each).
    fn one_kind_at_a_time(&mut self, engine: &impl Slots, c: &mut impl Transport) {
        // Gets, coalesced, in batches of distinct keys.
        let mut r = 0;
        while r < self.reqs.len() {
            self.batch.clear();
            let mut with_cas = false;
            while r < self.reqs.len() && self.batch.len() < MAX_ROUND_KEYS {
                if let (Op::Get { cas }, true) = (self.reqs[r].op, self.reqs[r].slot != NONE) {
                    with_cas |= cas;
                    self.batch.push(r);
                }
                r += 1;
            }
            if !self.batch.is_empty() {
                self.get_batch(engine, c, with_cas);
            }
            if self.poison.is_some() {
                return;
            }
        }
        // Stores, deletes, touches, then incrs and decrs, batched; the rest (get-and-touch)
        // one by one.
        let policy = c.policy();
        for kind in WRITE_KINDS {
            self.write_batches(engine, c, kind, policy);
        }
    }

    /// One multi-get for the requests in `batch`: each distinct key once.
    fn get_batch(&mut self, engine: &impl Slots, c: &mut impl Transport, with_cas: bool) {
        self.distinct_keys();
        let Work {
            reqs,
            arena,
            batch,
            keys,
            first,
            next,
            freed,
            hits,
            ..
        } = self;
        let list = ArenaKeys { arena, keys };
        hits.clear();
        hits.resize(keys.len(), false);
        let result = c.get(with_cas, &list, &mut |u, item| {
            hits[u] = true;
            hit_each(engine, reqs, batch, first, next, freed, u, item);
        });
        self.gets_done(engine, result);
    }

    /// The distinct keys of the gets in `batch` (into `keys`), each request chained behind
    /// the first of its key (`first`, `next`).
    fn distinct_keys(&mut self) {
        self.keys.clear();
        self.first.clear();
        self.next.clear();
        self.seen.clear();
        for (b, &r) in self.batch.iter().enumerate() {
            let range = self.reqs[r].key.clone();
            let key = &self.arena[range.clone()];
            let h = key_hash(key);
            self.next.push(NONE);
            match self.seen.get(&h) {
                Some(&u) if self.arena[self.keys[u as usize].clone()] == *key => {
                    // Chain this request behind the key's first one.
                    let mut at = self.first[u as usize] as usize;
                    while self.next[at] != NONE {
                        at = self.next[at] as usize;
                    }
                    self.next[at] = b as u32;
                }
                seen => {
                    let u = self.keys.len() as u32;
                    if seen.is_none() {
                        self.seen.insert(h, u);
                    }
                    self.keys.push(range);
                    self.first.push(b as u32);
                }
            }
        }
    }

    /// After a multi-get ended with `result`: every distinct key without a hit is a miss
    /// (or the error), and the batch's requests are done.
    fn gets_done(&mut self, engine: &impl Slots, result: Result<()>) {
        let Work {
            reqs,
            batch,
            keys,
            first,
            next,
            freed,
            hits,
            ..
        } = self;
        for u in 0..keys.len() {
            if hits[u] {
                continue;
            }
            let mut b = first[u];
            while b != NONE {
                let req = &reqs[batch[b as usize]];
                let r = match &result {
                    Ok(()) => Ok(Reply::Miss),
                    Err(e) => Err(e.clone()),
                };
                engine.complete(req.slot, r, None, freed);
                b = next[b as usize];
            }
        }
        for &r in batch.iter() {
            reqs[r].slot = NONE;
        }
        engine.wake_round();
        if let Err(e) = &result {
            self.failed(e);
        }
    }

    /// The round's gets and writes as one exchange (`Transport::chain`) when each kind fits
    /// one batch and there are two kinds or more; `false` leaves them to
    /// [`one_kind_at_a_time`](Self::one_kind_at_a_time) (also when the transport does not
    /// chain), which is the same round trip for a round of one kind.
    fn chained(&mut self, engine: &impl Slots, c: &mut impl Transport) -> bool {
        if !self.classify(c.policy(), 2) {
            return false;
        }
        let (ran, results) = self.with_chain(engine, |_, parts, items| c.chain(parts, items));
        if ran {
            self.chain_done(engine, results);
        }
        ran
    }

    /// Sorts the round's requests into a chain's parts (gets, then each kind of write):
    /// true if they fit one chain of at least `min_kinds` kinds. Pipelined rounds
    /// ([`send`](Self::send)) also need every request batched (no get-and-touch).
    pub(super) fn classify(&mut self, policy: BatchPolicy, min_kinds: usize) -> bool {
        self.batch.clear();
        let mut with_cas = false;
        for (r, req) in self.reqs.iter().enumerate() {
            if let (Op::Get { cas }, true) = (req.op, req.slot != NONE) {
                with_cas |= cas;
                self.batch.push(r);
            }
        }
        if self.batch.len() > MAX_ROUND_KEYS {
            return false;
        }
        let mut kinds = usize::from(!self.batch.is_empty());
        for (w, kind) in self.writes.iter_mut().zip(WRITE_KINDS) {
            w.batch.clear();
            w.keys.clear();
            let mut bytes = 0;
            for (r, req) in self.reqs.iter().enumerate() {
                if req.slot != NONE && wanted(kind, &req.op) {
                    bytes += policy.item_bytes(req.key.len(), req.value.len());
                    w.batch.push(r);
                    w.keys.push(req.key.clone());
                }
            }
            // One batch per kind, under the cap (else one at a time: see `write_batches`).
            if bytes > policy.max_bytes {
                return false;
            }
            kinds += usize::from(!w.batch.is_empty());
        }
        if kinds < min_kinds {
            return false;
        }
        self.with_cas = with_cas;
        self.distinct_keys();
        self.hits.clear();
        self.hits.resize(self.keys.len(), false);
        for (answers, w) in self.written.iter_mut().zip(self.writes.iter()) {
            answers.clear();
            answers.resize_with(w.batch.len(), || None);
        }
        true
    }

    /// Runs `f` on the chain [`classify`](Self::classify) sorted the round into: its plans,
    /// its parts (gets, then [`WRITE_KINDS`]) and where their items come from and their
    /// replies go. Returns `f`'s result and each part's.
    fn with_chain<R>(
        &mut self,
        engine: &impl Slots,
        f: impl FnOnce(&mut Vec<Plan>, &mut [Part<'_>], &mut ChainItems<'_>) -> R,
    ) -> (R, [Result<()>; 5]) {
        let Work {
            reqs,
            arena,
            batch,
            keys,
            first,
            next,
            freed,
            hits,
            writes,
            written,
            plans,
            with_cas,
            ..
        } = self;
        let label = engine.label();
        let get_keys = ArenaKeys { arena, keys };
        let [k0, k1, k2, k3] = [0, 1, 2, 3].map(|n| ArenaKeys {
            arena,
            keys: &writes[n].keys,
        });
        let part = |kind: Kind, keys| Part {
            kind,
            keys,
            result: Ok(()),
        };
        let mut parts = [
            part(Kind::Get, &get_keys),
            part(WRITE_KINDS[0], &k0),
            part(WRITE_KINDS[1], &k1),
            part(WRITE_KINDS[2], &k2),
            part(WRITE_KINDS[3], &k3),
        ];
        let opts = GetOpts {
            cas: *with_cas,
            ..GetOpts::default()
        };
        // Part k > 0 is write batch k - 1; its item j is request `writes[k - 1].batch[j]`.
        let req_of = |k: usize, j: usize| &reqs[writes[k - 1].batch[j]];
        let value = |k: usize, j: usize| {
            let req = (k > 0).then(|| req_of(k, j))?;
            matches!(req.op, Op::Store(_)).then(|| &arena[req.value.clone()])
        };
        let cmd = commands(|k, j, key| {
            if k == 0 {
                return Cmd::Get(key, opts);
            }
            let req = req_of(k, j);
            match req.op {
                Op::Store(o) => Cmd::Store(key, o, req.value.len()),
                Op::Touch(ttl) => Cmd::Touch(key, ttl),
                Op::Arith { decr, delta } => Cmd::Arith { key, decr, delta },
                _ => Cmd::Delete(key),
            }
        });
        let (batch, first, next) = (&*batch, &*first, &*next);
        let mut on_hit = |_: usize, u: usize, item: ItemRef<'_>| {
            hits[u] = true;
            hit_each(engine, reqs, batch, first, next, freed, u, item);
        };
        let mut on_item = |k: usize, j: usize, o: Outcome<'_>| {
            if k == 0 {
                return Err(ParseError::Unexpected);
            }
            written[k - 1][j] = Some(answer_of(label, req_of(k, j).op, o)?);
            Ok(())
        };
        let mut items = ChainItems {
            value: &value,
            cmd: &cmd,
            on_hit: &mut on_hit,
            on_item: &mut on_item,
        };
        let r = f(plans, &mut parts, &mut items);
        (r, parts.map(|p| p.result))
    }

    /// Completes every request of a chain whose parts ended with `results`.
    fn chain_done(&mut self, engine: &impl Slots, results: [Result<()>; 5]) {
        let label = engine.label();
        let [gets, writes_done @ ..] = results;
        self.gets_done(engine, gets);
        for (n, result) in writes_done.into_iter().enumerate() {
            let Work {
                reqs,
                writes,
                written,
                freed,
                ..
            } = self;
            for (j, answer) in written[n].iter_mut().enumerate() {
                let req = &reqs[writes[n].batch[j]];
                let r = answer
                    .take()
                    .unwrap_or_else(|| unanswered(label, req.op, &result));
                engine.complete(req.slot, r, None, freed);
            }
            for &r in writes[n].batch.iter() {
                reqs[r].slot = NONE;
            }
            engine.wake_round();
            if let Err(e) = &result {
                self.failed(e);
            }
        }
    }

    /// Whether the round can be pipelined: one chain of every request (after the expired
    /// ones failed, see [`expire`](Self::expire)), none sent on its own.
    pub(super) fn pipelinable(&mut self, policy: BatchPolicy) -> bool {
        let alone = self.reqs.iter().any(|r| r.slot != NONE && !batched(&r.op));
        !alone && self.classify(policy, 1)
    }

    /// Pipelined rounds: writes this round (sorted by [`pipelinable`](Self::pipelinable))
    /// as one chain behind the chains unread on connection `behind`, if any. `None` once
    /// the round is over (it failed to go out): its requests are completed then; otherwise
    /// [`recv`](Self::recv) reads its replies.
    pub(super) fn send(
        &mut self,
        engine: &impl Slots,
        c: &mut Client,
        behind: Option<u64>,
    ) -> Option<Sent> {
        self.poison = None;
        let (sent, results) = self.with_chain(engine, |plans, parts, items| {
            let (core, scratch) = c.engine();
            core.chain_send(scratch, plans, parts, items.value, items.cmd, behind)
        });
        if sent.is_none() {
            self.chain_done(engine, results);
        }
        sent
    }

    /// Pipelined rounds: reads the replies of the chain [`send`](Self::send) wrote, and
    /// completes every request. False if the driver's waker interrupted the read first
    /// (the requests answered so far are completed; call again). `last`: no other round is
    /// unread behind it.
    pub(super) fn recv(
        &mut self,
        engine: &impl Slots,
        c: &mut Client,
        sent: &mut Sent,
        last: bool,
    ) -> bool {
        let (done, results) = self.with_chain(engine, |plans, parts, items| {
            let (core, scratch) = c.engine();
            let (on_hit, on_item) = (&mut *items.on_hit, &mut *items.on_item);
            core.chain_recv(scratch, plans, sent, last, parts, on_hit, on_item)
        });
        if done {
            self.chain_done(engine, results);
        }
        done
    }

    /// Fails the requests whose owner's deadline passed while they were queued: they are
    /// not sent.
    pub(super) fn expire(&mut self, engine: &impl Slots) {
        let now = Instant::now();
        for req in self.reqs.iter_mut() {
            if req.slot != NONE && req.deadline <= now {
                let e = Error::Timeout {
                    server: engine.label().to_string(),
                    during: During::Write,
                    elapsed: engine.timeout() + (now - req.deadline),
                };
                engine.complete(req.slot, Err(e), None, &mut self.freed);
                req.slot = NONE;
            }
        }
    }
}

/// `f`, typed as a chain's command builder (a closure's own inference would tie the
/// command's lifetime to one key's).
fn commands<F: Fn(usize, usize, Key<'_>) -> Cmd<'_>>(f: F) -> F {
    f
}

/// Delivers a hit of distinct key `u` to every request chained on it.
#[allow(clippy::too_many_arguments)]
fn hit_each(
    engine: &impl Slots,
    reqs: &[Req],
    batch: &[usize],
    first: &[u32],
    next: &[u32],
    freed: &mut Vec<u32>,
    u: usize,
    item: ItemRef<'_>,
) {
    let mut b = first[u];
    while b != NONE {
        let req = &reqs[batch[b as usize]];
        let cas = match req.op {
            Op::Get { cas: true } => item.cas,
            _ => None,
        };
        let info = ItemInfo {
            flags: item.flags,
            cas,
        };
        engine.complete(req.slot, Ok(Reply::Hit(info)), Some(item.value), freed);
        b = next[b as usize];
    }
}

/// Whether a round sends `op` in a batch (else on its own).
pub(super) fn batched(op: &Op) -> bool {
    !matches!(op, Op::Gat { .. })
}

impl Work {
    /// The batch's one request, as a call of its own (see `write_batches`).
    fn alone(&mut self, engine: &impl Slots, c: &mut impl Transport) {
        let r = self.batch[0];
        let Work {
            reqs, arena, value, ..
        } = self;
        let req = &reqs[r];
        let result = c.single(
            req.op,
            &arena[req.key.clone()],
            &arena[req.value.clone()],
            value,
        );
        if let Err(e) = &result {
            self.failed(e);
        }
        let slot = std::mem::replace(&mut self.reqs[r].slot, NONE);
        engine.complete(slot, result, None, &mut self.freed);
        engine.wake_round();
    }

    /// The queued requests of `kind` (stores, deletes, touches, incrs and decrs), in batches
    /// of at most `policy.max_bytes` request bytes.
    fn write_batches(
        &mut self,
        engine: &impl Slots,
        c: &mut impl Transport,
        kind: Kind,
        policy: BatchPolicy,
    ) {
        let mut r = 0;
        while r < self.reqs.len() && self.poison.is_none() {
            self.batch.clear();
            self.keys.clear();
            let mut bytes = 0;
            while r < self.reqs.len() {
                let req = &self.reqs[r];
                if req.slot != NONE && wanted(kind, &req.op) {
                    let len = policy.item_bytes(req.key.len(), req.value.len());
                    if policy.is_full(self.batch.len(), bytes, len) {
                        break;
                    }
                    bytes += len;
                    self.batch.push(r);
                    self.keys.push(req.key.clone());
                }
                r += 1;
            }
            if self.batch.is_empty() {
                continue;
            }
            if self.batch.len() == 1 && bytes > policy.max_bytes {
                // An item over the batch cap travels alone, as a command that replies: over
                // TLS, memcached stalls on a quiet store whose last record also holds the
                // closing no-op (it waits on the socket for bytes it already decrypted).
                self.alone(engine, c);
                continue;
            }
            self.answers.clear();
            self.answers.resize_with(self.batch.len(), || None);
            let Work {
                reqs,
                arena,
                batch,
                keys,
                answers,
                freed,
                ..
            } = self;
            let writes = Writes {
                keys: ArenaKeys { arena, keys },
                reqs,
                batch,
            };
            let req_of = |j: usize| &reqs[batch[j]];
            let label = engine.label();
            let result = c.write(kind, &writes, &mut |j, outcome| {
                answers[j] = Some(answer_of(label, req_of(j).op, outcome)?);
                Ok(())
            });
            for (j, answer) in answers.iter_mut().enumerate() {
                let req = &reqs[batch[j]];
                let r = answer
                    .take()
                    .unwrap_or_else(|| unanswered(label, req.op, &result));
                engine.complete(req.slot, r, None, freed);
            }
            for &r in batch.iter() {
                reqs[r].slot = NONE;
            }
            engine.wake_round();
            if let Err(e) = &result {
                self.failed(e);
            }
        }
    }
}
