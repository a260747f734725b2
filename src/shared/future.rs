//! Async calls: a future per call ([`AsyncCall`]) that queues its request and waits for its
//! slot; dropped early, it withdraws the request or leaves its reply to be dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::engine::{lock, CallSpec, Op, Reply, Waiter};
use super::SharedClient;
use super::{as_item, cas_result, existed, number, set_ok, spec, store_op, stored, unexpected};
use crate::client::{CasResult, Item, ItemInfo, SetOptions};
use crate::error::{During, Error, Result};
use crate::proto::{SetOutcome, StoreMode};

/// Async calls: futures that any executor can run. They never block the executor's thread:
/// the server's I/O thread does their I/O and wakes them.
impl SharedClient {
    fn call_async<'a>(&'a self, call: CallSpec<'a>, out: &'a mut Vec<u8>) -> AsyncCall<'a> {
        AsyncCall {
            client: self,
            call,
            out,
            start: None,
            state: CallState::Start,
        }
    }

    /// [`get`](Self::get), as a future.
    pub async fn get_async(&self, key: &[u8]) -> Result<Option<Item>> {
        let mut value = Vec::new();
        let info = as_item(
            self.call_async(spec(Op::Get { cas: false }, key, &[]), &mut value)
                .await?,
        )?;
        Ok(info.map(|ItemInfo { flags, cas }| Item { value, flags, cas }))
    }

    /// [`get_into`](Self::get_into), as a future: no allocation once warm.
    pub async fn get_into_async(&self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        as_item(
            self.call_async(spec(Op::Get { cas: false }, key, &[]), buf)
                .await?,
        )
    }

    /// [`gets_into`](Self::gets_into), as a future.
    pub async fn gets_into_async(&self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        as_item(
            self.call_async(spec(Op::Get { cas: true }, key, &[]), buf)
                .await?,
        )
    }

    /// [`set`](Self::set), as a future.
    pub async fn set_async(&self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        let op = store_op(StoreMode::Set, opts, None);
        let mut none = Vec::new();
        set_ok(stored(
            self.call_async(spec(op, key, value), &mut none).await?,
        )?)
    }

    /// [`store`](Self::store), as a future.
    pub async fn store_async(
        &self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<bool> {
        let op = store_op(mode, opts, None);
        let mut none = Vec::new();
        let s = stored(self.call_async(spec(op, key, value), &mut none).await?)?;
        Ok(s == SetOutcome::Stored)
    }

    /// [`cas`](Self::cas), as a future.
    pub async fn cas_async(
        &self,
        key: &[u8],
        value: &[u8],
        cas: u64,
        opts: SetOptions,
    ) -> Result<CasResult> {
        let op = store_op(StoreMode::Set, opts, Some(cas));
        let mut none = Vec::new();
        Ok(cas_result(stored(
            self.call_async(spec(op, key, value), &mut none).await?,
        )?))
    }

    /// [`delete`](Self::delete), as a future.
    pub async fn delete_async(&self, key: &[u8]) -> Result<bool> {
        let mut none = Vec::new();
        existed(
            self.call_async(spec(Op::Delete, key, &[]), &mut none)
                .await?,
        )
    }

    /// [`incr`](Self::incr), as a future.
    pub async fn incr_async(&self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        let op = Op::Arith { decr: false, delta };
        let mut none = Vec::new();
        number(self.call_async(spec(op, key, &[]), &mut none).await?)
    }

    /// [`decr`](Self::decr), as a future.
    pub async fn decr_async(&self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        let op = Op::Arith { decr: true, delta };
        let mut none = Vec::new();
        number(self.call_async(spec(op, key, &[]), &mut none).await?)
    }

    /// [`touch`](Self::touch), as a future.
    pub async fn touch_async(&self, key: &[u8], ttl: u32) -> Result<bool> {
        let mut none = Vec::new();
        existed(
            self.call_async(spec(Op::Touch(ttl), key, &[]), &mut none)
                .await?,
        )
    }
}

enum CallState {
    Start,
    /// Waiting for a free slot (this waker is in the queue's list).
    NoSlot(Waker),
    Queued {
        server: usize,
        slot: u32,
        deadline: Instant,
    },
    Finished,
}

/// One async call: queues its request, then waits for its slot. Dropped before the end, it
/// withdraws the request or leaves the reply to be read and dropped.
struct AsyncCall<'a> {
    client: &'a SharedClient,
    call: CallSpec<'a>,
    out: &'a mut Vec<u8>,
    start: Option<Instant>,
    state: CallState,
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
                CallState::Start | CallState::NoSlot(_) => {
                    let eng = match this
                        .client
                        .check(&this.call)
                        .and_then(|()| this.client.route(this.call.key))
                    {
                        Ok(e) => e,
                        Err(e) => {
                            this.state = CallState::Finished;
                            return Poll::Ready(Err(e));
                        }
                    };
                    let mut q = lock(&eng.queue);
                    if let CallState::NoSlot(w) = &this.state {
                        q.space_wakers.retain(|x| !x.will_wake(w));
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
                            this.state = CallState::NoSlot(cx.waker().clone());
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
                    if let Some(r) = eng.take_done(&mut d, this.out) {
                        drop(d);
                        eng.release_slot(slot);
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
            CallState::NoSlot(w) => {
                // Our wake may have been spent on us: pass it on.
                if let Ok(eng) = self.client.route(self.call.key) {
                    let mut q = lock(&eng.queue);
                    q.space_wakers.retain(|x| !x.will_wake(&w));
                    if !q.free.is_empty() {
                        if let Some(next) = q.space_wakers.pop() {
                            next.wake();
                        }
                    }
                }
            }
            CallState::Start | CallState::Finished => {}
        }
    }
}
