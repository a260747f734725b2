//! A blocking call's path: made directly on an idle engine, or queued in a slot and
//! awaited (serving rounds when asked to combine); multi-key calls queue their keys in
//! chunks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::engine::{lock, CallSpec, Engine, Op, Reply, Waited, Waiter};
use super::round::NONE;
use super::{IoMode, SharedClient};
use crate::error::{During, Error, Result};
use crate::proto::{Key, MAX_KEY_LEN};

impl SharedClient {
    /// Validates `key` and picks its engine.
    pub(super) fn route(&self, key: &[u8]) -> Result<&Arc<Engine>> {
        let (eng, checked) = self.route_unchecked(key)?;
        if !checked {
            self.check_key(key)?;
        }
        Ok(eng)
    }

    /// The key's engine, and whether the key was validated on the way (routing validates;
    /// with one server there is nothing to route, and a direct call validates as a `Client`
    /// call does, so only a queued one needs [`check_key`](Self::check_key)).
    pub(super) fn route_unchecked(&self, key: &[u8]) -> Result<(&Arc<Engine>, bool)> {
        let inner = &*self.inner;
        if inner.single.load(std::sync::atomic::Ordering::Acquire) {
            return Ok((&inner.engines[0], false));
        }
        let server = lock(&inner.router).route_call(key)?.server;
        Ok((&inner.engines[server], true))
    }

    /// Validates a key before it is queued: a bad key in a batch would fail everyone's.
    pub(super) fn check_key(&self, key: &[u8]) -> Result<()> {
        let inner = &*self.inner;
        let ns = &inner.namespace;
        if Key::new(key).is_err() || ns.len() + key.len() > MAX_KEY_LEN {
            // The rare keys (too long, or binary keys over meta): checked as a Client does.
            crate::engine::check_key(ns, key, inner.binary_keys)?;
        }
        Ok(())
    }

    pub(super) fn check(&self, call: &CallSpec<'_>) -> Result<()> {
        if let Op::Store(_) = call.op {
            if call.value.len() > self.inner.max_value {
                return Err(Error::ValueTooLarge {
                    len: call.value.len(),
                    max: self.inner.max_value,
                });
            }
        }
        Ok(())
    }

    /// A blocking call: made directly on an idle engine, else queued and waited for.
    pub(super) fn exec(&self, call: CallSpec<'_>, out: &mut Vec<u8>) -> Result<Reply> {
        if self.replicated() {
            return self.exec_copies(call, out);
        }
        self.check(&call)?;
        let mut reroute = super::Reroute::default();
        loop {
            let (eng, checked) = self.route_unchecked(call.key)?;
            match self.exec_on(eng, call, checked, out) {
                // Routed to a server that a new list removed before the call reached it:
                // nothing was sent. Routed again with the new list (see `Reroute`).
                Err(Error::ServerRemoved { .. }) if reroute.again(self.inner.timeout) => {}
                r => return r,
            }
        }
    }

    /// [`exec`](Self::exec) on a given server's engine; `checked`: the key was validated.
    pub(super) fn exec_on(
        &self,
        eng: &Arc<Engine>,
        call: CallSpec<'_>,
        checked: bool,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        let direct = match self.inner.driving {
            IoMode::Adaptive => !eng.io_busy.load(Ordering::Relaxed),
            IoMode::Combining => true,
            IoMode::IoThread => false,
        };
        if direct {
            if let Some(mut st) = eng.try_state() {
                if eng.queued.load(Ordering::SeqCst) == 0 {
                    let server = eng.server;
                    let r = st
                        .client
                        .pinned(server, |c| c.perform(call.op, call.key, call.value, out));
                    drop(st);
                    eng.unwant_direct();
                    eng.hand_off();
                    return r;
                }
            }
        }
        if !checked {
            self.check_key(call.key)?;
        }
        let start = Instant::now();
        let deadline = start + self.inner.timeout;
        let slot = self.submit_blocking(eng, &call, start, deadline)?;
        self.await_slot(eng, slot, start, deadline, out)
    }

    /// Queues `call` on `eng`, waiting for a free slot up to `deadline`.
    pub(super) fn submit_blocking(
        &self,
        eng: &Arc<Engine>,
        call: &CallSpec<'_>,
        start: Instant,
        deadline: Instant,
    ) -> Result<u32> {
        self.submit(eng, call, start, deadline, true)
            .map(|slot| slot.expect("waited for a slot"))
    }

    /// Queues `call` on `eng`; with no free slot, waits for one up to `deadline` if `wait`,
    /// else returns `None` at once.
    fn submit(
        &self,
        eng: &Arc<Engine>,
        call: &CallSpec<'_>,
        start: Instant,
        deadline: Instant,
        wait: bool,
    ) -> Result<Option<u32>> {
        let mut q = lock(&eng.queue);
        loop {
            let waiter = match self.inner.driving {
                IoMode::Combining => Waiter::Thread(std::thread::current()),
                // Pipelined rounds are smaller and more: a wake for all the threads waiting
                // on `round_done` per round would wake most for nothing. Unless very many
                // calls are in flight (then rounds are large again, and one wake for all is
                // cheaper than one each).
                _ if eng.pipelined() && eng.in_use(&q) <= super::engine::INTERRUPT_MAX => {
                    Waiter::Thread(std::thread::current())
                }
                _ => Waiter::Round,
            };
            if let Some(slot) = eng.push(&mut q, call, deadline, waiter) {
                if self.inner.driving != IoMode::Combining {
                    eng.kick_io(&mut q);
                }
                return Ok(Some(slot));
            }
            if !wait {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.slot_timeout(eng, start));
            }
            q.space_waiting += 1;
            q = eng
                .space
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            q.space_waiting -= 1;
        }
    }

    pub(super) fn slot_timeout(&self, eng: &Engine, start: Instant) -> Error {
        Error::Timeout {
            server: eng.label.clone(),
            during: During::Slot,
            elapsed: start.elapsed(),
        }
    }

    /// Waits for a queued request, combining when asked to (or when the engine is free).
    pub(super) fn await_slot(
        &self,
        eng: &Arc<Engine>,
        slot: u32,
        start: Instant,
        deadline: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        // Combining: serve the queue when the engine is free. Otherwise only when asked to
        // lead (nobody else serves it: the I/O thread could not be started).
        let mut combine = self.inner.driving == IoMode::Combining;
        loop {
            if combine {
                if let Some(mut st) = eng.try_state() {
                    eng.round(&mut st, false);
                    drop(st);
                    eng.hand_off();
                }
            }
            match eng.wait(slot, deadline, out) {
                Waited::Done(r) => return r,
                Waited::Lead => {
                    combine = true;
                    continue;
                }
                Waited::TimedOut => {
                    if eng.abandon(slot) {
                        continue; // the reply came in meanwhile
                    }
                    return Err(Error::Timeout {
                        server: eng.label.clone(),
                        during: During::Read,
                        elapsed: start.elapsed(),
                    });
                }
            }
        }
    }
}

/// How many calls of one multi-key call are queued at a time.
pub(super) const CHUNK: usize = 64;

/// The slots a multi-key call queued and has not awaited yet. Normally none are left when
/// it is dropped; when a caller's callback panics, each is withdrawn (or, if its reply came
/// in, freed), so that no slot is held for ever.
pub(super) struct Unclaimed<'c> {
    client: &'c SharedClient,
    queued: [(u32, u32); CHUNK],
}

impl Drop for Unclaimed<'_> {
    fn drop(&mut self) {
        for &(server, slot) in &self.queued {
            if slot != NONE {
                let eng = &self.client.inner.engines[server as usize];
                if eng.abandon(slot) {
                    eng.release_slot(slot);
                }
            }
        }
    }
}

impl SharedClient {
    /// Queues every call of `calls` (in chunks, so that one caller never takes every slot of
    /// a server) and hands each result to `on(index, result, value)`, the value being a
    /// hit's. Queued together, the calls share batches with each other and with concurrent
    /// callers.
    pub(super) fn each_queued<'k>(
        &self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        mut on: impl FnMut(usize, Result<Reply>, &[u8]),
    ) {
        let mut value = Vec::new();
        let mut guard = Unclaimed {
            client: self,
            queued: [(NONE, NONE); CHUNK],
        };
        let queued = &mut guard.queued;
        for first in (0..n).step_by(CHUNK) {
            let start = Instant::now();
            let deadline = start + self.inner.timeout;
            let end = (first + CHUNK).min(n);
            // The calls before `claimed` were handed to `on`.
            let mut claimed = first;
            for j in first..end {
                let c = call(j);
                let r = self
                    .check(&c)
                    .and_then(|()| self.route(c.key))
                    .and_then(|eng| {
                        let slot = match self.submit(eng, &c, start, deadline, false)? {
                            Some(slot) => slot,
                            None => {
                                // No slot free: the ones this call holds, unclaimed, may be the
                                // very ones it would wait for (more keys on a server than it
                                // has slots). Claimed first, so that it waits holding none.
                                self.claim(
                                    queued,
                                    first,
                                    claimed..j,
                                    start,
                                    deadline,
                                    &call,
                                    &mut on,
                                    &mut value,
                                );
                                claimed = j;
                                self.submit_blocking(eng, &c, start, deadline)?
                            }
                        };
                        Ok((eng.server as u32, slot))
                    });
                queued[j - first] = match r {
                    Ok(q) => q,
                    Err(e) => {
                        on(j, Err(e), &[]);
                        (NONE, NONE)
                    }
                };
            }
            self.claim(
                queued,
                first,
                claimed..end,
                start,
                deadline,
                &call,
                &mut on,
                &mut value,
            );
        }
    }
}

impl SharedClient {
    /// Awaits the queued calls `range` of the chunk starting at `first` and hands each
    /// result to `on` (see [`each_queued`](Self::each_queued)).
    #[allow(clippy::too_many_arguments)]
    fn claim<'k>(
        &self,
        queued: &mut [(u32, u32); CHUNK],
        first: usize,
        range: std::ops::Range<usize>,
        start: Instant,
        deadline: Instant,
        call: &impl Fn(usize) -> CallSpec<'k>,
        on: &mut impl FnMut(usize, Result<Reply>, &[u8]),
        value: &mut Vec<u8>,
    ) {
        for j in range {
            let (server, slot) = queued[j - first];
            if slot == NONE {
                continue;
            }
            // Claimed before `on` runs: if it panics, the guard gives back the rest.
            queued[j - first] = (NONE, NONE);
            let eng = &self.inner.engines[server as usize];
            let r = match self.await_slot(eng, slot, start, deadline, value) {
                // Its server left the list before the call reached it (nothing was
                // sent): routed again with the new list (`exec` does).
                Err(Error::ServerRemoved { .. }) => self.exec(call(j), value),
                r => r,
            };
            on(j, r, value);
        }
    }
}
