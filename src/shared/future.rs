//! Async calls: a future per call ([`AsyncCall`]) that queues its request and waits for its
//! slot; dropped early, it withdraws the request or leaves its reply to be dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::engine::{lock, Engine, Waiter};
use super::exec::CHUNK;
use super::SharedClient;
use crate::command::{unexpected, CallSpec, Reply};
use crate::error::{During, Error, Result};

/// Async calls: futures that any executor can run. They never block the executor's thread:
/// the server's I/O thread does their I/O and wakes them.
impl SharedClient {
    pub(super) fn call_async<'a>(
        &'a self,
        call: CallSpec<'a>,
        out: &'a mut Vec<u8>,
    ) -> AsyncCall<'a> {
        AsyncCall {
            client: self,
            call,
            out: Some(out),
            target: None,
            start: None,
            state: CallState::Start,
            reroute: super::Reroute::default(),
        }
    }

    /// An async call on server `server`'s engine, whatever the key's route (a copy's part in
    /// a call with copies; the key was validated).
    pub(super) fn call_async_on<'a>(
        &'a self,
        server: usize,
        call: CallSpec<'a>,
        out: &'a mut Vec<u8>,
    ) -> AsyncCall<'a> {
        let mut c = self.call_async(call, out);
        c.target = Some(server);
        c
    }

    /// Runs `call(0..n)` as async calls, a chunk at a time: a chunk's calls are all queued
    /// on its first poll, before any of them waits, so they share rounds (with each other
    /// and concurrent callers); then each result goes to `on(index, result, value)`.
    pub(super) async fn each_async<'k>(
        &self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        mut on: impl FnMut(usize, Result<Reply>, &[u8]),
    ) {
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        for first in (0..n).step_by(CHUNK) {
            let end = (first + CHUNK).min(n);
            bufs.resize_with(end - first, Vec::new);
            let calls = (first..end)
                .zip(bufs.iter_mut())
                .map(|(j, buf)| {
                    buf.clear();
                    self.call_async(call(j), buf)
                })
                .collect();
            let results = Joined {
                calls,
                results: (first..end).map(|_| None).collect(),
            }
            .await;
            for (k, r) in results.into_iter().enumerate() {
                on(first + k, r, &bufs[k]);
            }
        }
    }
}

/// Async calls polled together: each is polled (so queued) on the first poll, and the whole
/// is ready when every call is.
struct Joined<'a> {
    calls: Vec<AsyncCall<'a>>,
    results: Vec<Option<Result<Reply>>>,
}

impl Future for Joined<'_> {
    type Output = Vec<Result<Reply>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Result<Reply>>> {
        let this = self.get_mut();
        let mut pending = false;
        for (call, result) in this.calls.iter_mut().zip(this.results.iter_mut()) {
            if result.is_none() {
                match Pin::new(call).poll(cx) {
                    Poll::Ready(r) => *result = Some(r),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            return Poll::Pending;
        }
        let results = this.results.drain(..);
        Poll::Ready(
            results
                .map(|r| r.unwrap_or_else(|| Err(unexpected())))
                .collect(),
        )
    }
}

enum CallState {
    Start,
    /// Waiting for a free slot of server `.1`'s engine (this waker is in its queue's list;
    /// the key may route elsewhere by the next poll, after a list change).
    NoSlot(Waker, usize),
    Queued {
        server: usize,
        slot: u32,
        deadline: Instant,
    },
    Finished,
}

/// One async call: queues its request, then waits for its slot. Dropped before the end, it
/// withdraws the request or leaves the reply to be read and dropped.
pub(super) struct AsyncCall<'a> {
    client: &'a SharedClient,
    call: CallSpec<'a>,
    /// Where a hit's value goes (`None` once taken back with [`take_out`](Self::take_out)).
    out: Option<&'a mut Vec<u8>>,
    /// The server, when the call is one copy's part (else the key's route decides).
    target: Option<usize>,
    start: Option<Instant>,
    state: CallState,
    /// Routed again while a server it was routed to left the list before the call reached
    /// it (see `Reroute`).
    reroute: super::Reroute,
}

impl<'a> AsyncCall<'a> {
    /// The call's engine: its target's, or the key's route (validating the call).
    fn engine(&self) -> Result<&'a Arc<Engine>> {
        let client = self.client;
        client.check(&self.call)?;
        match self.target {
            Some(t) => Ok(&client.inner.engines[t]),
            None => client.route(self.call.key),
        }
    }

    /// Gives back the output buffer (after the call ended, for another call to use).
    pub(super) fn take_out(&mut self) -> Option<&'a mut Vec<u8>> {
        self.out.take()
    }
}

impl Future for AsyncCall<'_> {
    type Output = Result<Reply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Reply>> {
        let this = self.get_mut();
        let inner = &*this.client.inner;
        let start = *this.start.get_or_insert_with(Instant::now);
        let deadline = start + inner.timeout;
        loop {
            match &this.state {
                CallState::Finished => return Poll::Ready(Err(unexpected())),
                CallState::Start | CallState::NoSlot(..) => {
                    let eng = match this.engine() {
                        Ok(e) => e,
                        Err(e) => {
                            this.state = CallState::Finished;
                            return Poll::Ready(Err(e));
                        }
                    };
                    let mut q = lock(&eng.queue);
                    if let CallState::NoSlot(w, server) = &this.state {
                        if *server == eng.server {
                            q.space_wakers.retain(|x| !x.will_wake(w));
                        } else {
                            // The key moved: leave the other engine's queue (passing on a
                            // wake that was spent on this call).
                            drop(q);
                            inner.engines[*server].forget_space_waker(w);
                            q = lock(&eng.queue);
                        }
                    }
                    if matches!(this.state, CallState::Start)
                        && inner.driving == super::IoMode::Adaptive
                    {
                        drop(q);
                        if let Some(slot) = eng.direct(&this.call, deadline, cx.waker()) {
                            this.state = CallState::Queued {
                                server: eng.server,
                                slot,
                                deadline,
                            };
                            continue;
                        }
                        q = lock(&eng.queue);
                    }
                    let waiter = Waiter::Task(cx.waker().clone());
                    match eng.push(&mut q, &this.call, deadline, waiter) {
                        Some(slot) => {
                            eng.kick_io(&mut q);
                            this.state = CallState::Queued {
                                server: eng.server,
                                slot,
                                deadline,
                            };
                        }
                        None if Instant::now() >= deadline => {
                            this.state = CallState::Finished;
                            return Poll::Ready(Err(this.client.slot_timeout(eng, start)));
                        }
                        None => {
                            q.space_wakers.push(cx.waker().clone());
                            // Make sure the queue is being served: its frees wake us.
                            eng.kick_io(&mut q);
                            this.state = CallState::NoSlot(cx.waker().clone(), eng.server);
                            return Poll::Pending;
                        }
                    }
                }
                &CallState::Queued {
                    server,
                    slot,
                    deadline,
                } => {
                    let eng = &inner.engines[server];
                    let mut d = lock(&eng.slots[slot as usize].data);
                    let mut scratch = Vec::new();
                    let out = this.out.as_deref_mut().unwrap_or(&mut scratch);
                    if let Some(r) = eng.take_done(&mut d, out) {
                        drop(d);
                        eng.release_slot(slot);
                        // Its server left the list before the call reached it (nothing was
                        // sent): routed again with the new list (see `Reroute`).
                        if matches!(r, Err(Error::ServerRemoved { .. }))
                            && this.target.is_none()
                            && this.reroute.again(inner.timeout)
                        {
                            this.state = CallState::Start;
                            continue;
                        }
                        this.state = CallState::Finished;
                        return Poll::Ready(r);
                    }
                    if Instant::now() >= deadline {
                        drop(d);
                        if eng.abandon(slot) {
                            continue;
                        }
                        this.state = CallState::Finished;
                        return Poll::Ready(Err(Error::Timeout {
                            server: eng.label.clone(),
                            during: During::Read,
                            elapsed: start.elapsed(),
                        }));
                    }
                    match &d.waiter {
                        Waiter::Task(w) if w.will_wake(cx.waker()) => {}
                        _ => d.waiter = Waiter::Task(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for AsyncCall<'_> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, CallState::Finished) {
            CallState::Queued { server, slot, .. } => {
                let eng = &self.client.inner.engines[server];
                if eng.abandon(slot) {
                    // Done but never taken: the slot is ours to free.
                    eng.release_slot(slot);
                }
            }
            CallState::NoSlot(w, server) => {
                self.client.inner.engines[server].forget_space_waker(&w);
            }
            CallState::Start | CallState::Finished => {}
        }
    }
}
