//! A [`Client`]'s multi-key calls with copies ([`ClientBuilder::replicas`], zones): every
//! key's copies in one batch per server, as one call without copies sends its keys. The
//! fleet's rules are those of the single-key calls ([`crate::fleet::plan`]), kept per key:
//!
//! - a multi-get asks each key's first copy in its read order, all in one round; the keys
//!   whose copy failed (or, with `read_miss_failover`, missed) are asked of their next copy
//!   in a further round, and so on (at most one round per copy);
//! - a multi-set or multi-delete sends every key to every copy up at once (a copy waiting
//!   for a repair of a key gets a delete of it), then settles each key as its single-key
//!   call would: the write policy decides the result, and a copy that failed is remembered
//!   for repair.
//!
//! [`ClientBuilder::replicas`]: crate::ClientBuilder::replicas

use super::{Client, ItemRef};
use crate::command::{Op, Reply};
use crate::engine::batch::{Keys, Picked};
use crate::error::{Error, Result};
use crate::fleet::plan::{
    fails_over, first_wave, settle, Action, Part, Servers, Standing, WriteKind,
};
use crate::proto::wire::{Capability, Cmd, Kind, Outcome};
use crate::proto::{Key, SetOutcome};

impl Client {
    /// Validates every key before anything is sent (and before any probe is taken).
    fn check_keys(&self, keys: &(impl Keys + ?Sized)) -> Result<()> {
        let binary_keys = self.core.protocol().supports(Capability::BinaryKeys);
        for j in 0..keys.len() {
            crate::engine::check_key(self.core.namespace(), keys.key(j), binary_keys)?;
        }
        Ok(())
    }

    /// `get_multi` / `gets_multi` with copies (see the module docs).
    pub(super) fn retrieve_copies(
        &mut self,
        with_cas: bool,
        keys: &(impl Keys + ?Sized),
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.check_keys(keys)?;
        self.repair_some();
        let n = keys.len();
        let prefer = !with_cas;
        let mut orders: Vec<Servers> = Vec::with_capacity(n);
        for j in 0..n {
            orders.push(
                self.core
                    .read_order(&mut self.scratch, keys.key(j), prefer)?,
            );
        }
        let miss_failover = self.core.fleet().miss_failover;
        // Per key: the next copy to ask, its last failure, whether a copy missed.
        let mut next = vec![0usize; n];
        let mut last: Vec<Option<Error>> = vec![None; n];
        let mut missed = vec![false; n];
        let mut todo: Vec<u32> = (0..n as u32).collect();
        let (mut index, mut placed, mut hit) = (Vec::new(), Vec::new(), Vec::new());
        let mut first_error = None;
        while !todo.is_empty() {
            index.clear();
            placed.clear();
            for &k in &todo {
                let k = k as usize;
                let key = keys.key(k);
                // The next copy that may be asked: a copy being probed only by a call that
                // takes its probe, one marked down not at all.
                let mut asked = false;
                while let Some(i) = orders[k].get(next[k]) {
                    next[k] += 1;
                    match self.core.standing_to_call(i, key) {
                        Standing::Up | Standing::Slow => {
                            index.push(k as u32);
                            placed.push(i as u32);
                            asked = true;
                            break;
                        }
                        _ => last[k] = Some(self.core.down_error(i)),
                    }
                }
                // No copy left: a miss if one missed (or every copy was waiting for a
                // repair of the key), else the last failure.
                if !asked && !missed[k] {
                    if let Some(e) = last[k].take() {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if index.is_empty() {
                break;
            }
            hit.clear();
            hit.resize(index.len(), false);
            let picked = Picked {
                keys,
                index: &index,
            };
            let (core, scratch) = self.engine();
            // Failures are read per server below.
            let _ = core.get_batch_on(scratch, with_cas, &picked, Some(&placed), |j, mut item| {
                hit[j] = true;
                item.cas = item.cas.filter(|_| with_cas);
                found(keys.key(index[j] as usize), item);
            });
            todo.clear();
            let fleet = self.core.fleet_shared();
            for (j, (&k, &i)) in index.iter().zip(&placed).enumerate() {
                let (k, i) = (k as usize, i as usize);
                if hit[j] {
                    if last[k].is_some() || missed[k] {
                        fleet.failover(i);
                    }
                    continue;
                }
                match self.core.batch_error(&self.scratch, i) {
                    Some(e) if fails_over(e) => {
                        last[k] = Some(e.clone());
                        todo.push(k as u32);
                    }
                    Some(e) => {
                        first_error.get_or_insert_with(|| e.clone());
                    }
                    None if miss_failover => {
                        missed[k] = true;
                        last[k] = None;
                        todo.push(k as u32);
                    }
                    None => {}
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `set_multi` (`kind` [`Kind::Store`]) or `delete_multi` ([`Kind::Delete`]) with
    /// copies (see the module docs): how many keys' replies `counts` approves.
    pub(super) fn write_copies_multi<'v>(
        &mut self,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        value: impl Fn(usize) -> Option<&'v [u8]>,
        cmd: impl Fn(usize, Key<'_>) -> Cmd<'_>,
        counts: fn(&Reply) -> bool,
    ) -> Result<usize> {
        self.check_keys(keys)?;
        self.repair_some();
        let n = keys.len();
        // Each key's parts (its copies, in placement order), and the batch items.
        let mut parts: Vec<Part> = Vec::with_capacity(n * 2);
        let mut ranges = Vec::with_capacity(n);
        let mut waves = Waves::default();
        for k in 0..n {
            let start = parts.len();
            self.stage(
                WriteKind::Everywhere,
                kind,
                k,
                keys.key(k),
                &mut parts,
                &mut waves,
            )?;
            ranges.push(start..parts.len());
        }
        self.run_waves(kind, keys, &waves, &value, &cmd, &mut parts);
        let fleet = self.core.fleet_shared();
        let policy = self.core.fleet().write;
        let (mut count, mut first_error) = (0, None);
        for (k, range) in ranges.into_iter().enumerate() {
            let key = keys.key(k);
            let parts = &parts[range];
            let r = settle(
                WriteKind::Everywhere,
                policy,
                parts,
                |i| fleet.repairs.record(i, key),
                |_| {},
            );
            for p in parts {
                if p.action == Action::Delete && p.result.is_ok() {
                    // Deleted: it holds nothing now, no longer waiting for a repair.
                    fleet.repairs.clear(p.server, key);
                }
            }
            match r {
                Ok(reply) => count += usize::from(counts(&reply)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(count), Err)
    }

    /// A write to every copy of one key at once (`set`, `add`, `replace`, `append`,
    /// `prepend`, `delete`): one batch over its copies (a second, of deletes, for copies
    /// waiting for a repair of a stored key), then settled as the fleet's plan says.
    pub(super) fn write_at_once(
        &mut self,
        kind: WriteKind,
        op: Op,
        key: &[u8],
        value: &[u8],
    ) -> Result<Reply> {
        let (batch, store) = match op {
            Op::Store(o) => (Kind::Store, Some(o)),
            _ => (Kind::Delete, None),
        };
        // Taken for the call, given back after: a warm write allocates nothing.
        let mut cs = std::mem::take(&mut self.copy_scratch);
        cs.parts.clear();
        cs.waves.clear();
        let r = self.write_staged(kind, batch, store, key, value, &mut cs);
        self.copy_scratch = cs;
        r
    }

    fn write_staged(
        &mut self,
        kind: WriteKind,
        batch: Kind,
        store: Option<crate::proto::wire::StoreOpts>,
        key: &[u8],
        value: &[u8],
        cs: &mut CopyScratch,
    ) -> Result<Reply> {
        let CopyScratch { parts, waves, .. } = cs;
        self.stage(kind, batch, 0, key, parts, waves)?;
        let keys = [key];
        let cmd = cmd_of(|_, k| match store {
            Some(o) => Cmd::Store(k, o, value.len()),
            None => Cmd::delete(k),
        });
        self.run_waves(
            batch,
            &keys[..],
            waves,
            &|_| store.map(|_| value),
            &cmd,
            parts,
        );
        let fleet = self.core.fleet_shared();
        let mut reconcile = Servers::from_slice(&[]);
        let r = settle(
            kind,
            self.core.fleet().write,
            parts,
            |i| fleet.repairs.record(i, key),
            |i| reconcile.push(i as u32),
        );
        for p in parts.iter() {
            if p.action == Action::Delete && p.result.is_ok() {
                fleet.repairs.clear(p.server, key);
            }
        }
        let mut out = Vec::new();
        for i in reconcile.iter() {
            self.delete_copy(i, key, &mut out);
        }
        r
    }

    /// Plans key `k`'s part on each of its copies (placement order) for a write of `kind`
    /// sent as batches of `batch`: its parts, and the items of the waves.
    fn stage(
        &mut self,
        kind: WriteKind,
        batch: Kind,
        k: usize,
        key: &[u8],
        parts: &mut Vec<Part>,
        waves: &mut Waves,
    ) -> Result<()> {
        let copies = self.core.copies_of(&mut self.scratch, key)?;
        for &i in copies.as_slice() {
            let action = first_wave(kind, self.core.standing_to_call(i as usize, key));
            let wave = match (action, batch) {
                (Action::Skip, _) | (Action::Leave, _) => {
                    let down = self.core.down_error(i as usize);
                    parts.push(Part::new(i as usize, Action::Skip, Err(down)));
                    continue;
                }
                // A delete is a delete, whether it repairs the copy or not.
                (Action::Command, _) | (Action::Delete, Kind::Delete) => &mut waves.commands,
                (Action::Delete, _) => &mut waves.deletes,
            };
            wave.push(k, i, parts.len());
            parts.push(Part::new(i as usize, action, Ok(done(batch))));
        }
        Ok(())
    }

    /// Runs the commands' batch, then the deletes' if any.
    fn run_waves<'v>(
        &mut self,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        waves: &Waves,
        value: &impl Fn(usize) -> Option<&'v [u8]>,
        cmd: &impl Fn(usize, Key<'_>) -> Cmd<'_>,
        parts: &mut [Part],
    ) {
        self.run_wave(kind, keys, &waves.commands, value, cmd, parts);
        if !waves.deletes.index.is_empty() {
            self.run_wave(
                Kind::Delete,
                keys,
                &waves.deletes,
                &|_| None,
                &delete,
                parts,
            );
        }
    }

    /// Runs one batch of `kind` over `wave`'s items and writes each item's result into its
    /// part: the reply, or its server's failure.
    fn run_wave<'v>(
        &mut self,
        kind: Kind,
        keys: &(impl Keys + ?Sized),
        wave: &Wave,
        value: &impl Fn(usize) -> Option<&'v [u8]>,
        cmd: &impl Fn(usize, Key<'_>) -> Cmd<'_>,
        parts: &mut [Part],
    ) {
        if wave.index.is_empty() {
            return;
        }
        let picked = Picked {
            keys,
            index: &wave.index,
        };
        let at = |j: usize| wave.index[j] as usize;
        let (core, scratch) = self.engine();
        // Failures are read per server below.
        let _ = core.write_batch_on(
            scratch,
            kind,
            &picked,
            Some(&wave.placed),
            |j| value(at(j)),
            |j, key| cmd(at(j), key),
            |j, outcome| {
                parts[wave.part[j]].result = Ok(reply_of(kind, &outcome));
                Ok(())
            },
        );
        for (j, &i) in wave.placed.iter().enumerate() {
            if let Some(e) = self.core.batch_error(&self.scratch, i as usize) {
                parts[wave.part[j]].result = Err(e.clone());
            }
        }
    }
}

/// What a [`Client`]'s write with copies works in, kept between calls.
#[derive(Default)]
pub(super) struct CopyScratch {
    parts: Vec<Part>,
    waves: Waves,
    /// A hedged read's second buffer (the hedge's value).
    pub(super) spare: Vec<u8>,
}

/// A write's batches: its commands, and deletes for copies waiting for a repair of a key
/// that is stored.
#[derive(Default)]
struct Waves {
    commands: Wave,
    deletes: Wave,
}

impl Waves {
    fn clear(&mut self) {
        for w in [&mut self.commands, &mut self.deletes] {
            w.index.clear();
            w.placed.clear();
            w.part.clear();
        }
    }
}

/// The items of one batch over copies: key index, server, and the part it answers.
#[derive(Default)]
struct Wave {
    index: Vec<u32>,
    placed: Vec<u32>,
    part: Vec<usize>,
}

impl Wave {
    fn push(&mut self, key: usize, server: u32, part: usize) {
        self.index.push(key as u32);
        self.placed.push(server);
        self.part.push(part);
    }
}

/// Gives a closure the signature a batch's commands have (for any key's lifetime).
fn cmd_of<F: Fn(usize, Key<'_>) -> Cmd<'_>>(f: F) -> F {
    f
}

/// A delete of the key (a copy waiting for a repair of it, in a multi-set).
fn delete(_: usize, key: Key<'_>) -> Cmd<'_> {
    Cmd::delete(key)
}

/// The reply of an item no reply answered (quiet protocols answer only what failed).
fn done(kind: Kind) -> Reply {
    match kind {
        Kind::Delete => Reply::Existed(true),
        _ => Reply::Store(SetOutcome::Stored),
    }
}

/// An item's reply in a batch of `kind`.
fn reply_of(kind: Kind, outcome: &Outcome<'_>) -> Reply {
    match (kind, outcome) {
        (_, Outcome::Store(o, ..)) => Reply::Store(*o),
        (Kind::Delete, Outcome::NotFound(_)) => Reply::Existed(false),
        (_, Outcome::NotFound(_)) => Reply::Store(SetOutcome::NotStored),
        (_, Outcome::Deleted(_)) => Reply::Existed(true),
        _ => done(kind),
    }
}
