//! A shared client's keyed calls with copies ([`ClientBuilder::replicas`]): the fleet's plan
//! ([`crate::fleet::plan`]) run on the copies' engines at once.
//!
//! - A read ([`CopyRead`]) asks the first copy in the read order; when that copy fails it
//!   goes on to the next within the call (a failover), and with a hedge, a read not
//!   answered in time is also sent to the next copy: the first answer wins, the other
//!   request is left to its round (read and dropped: the framing stays intact).
//! - A write is sent to every copy at once and waits as the write policy says; a copy that
//!   fails is remembered and repaired by a background thread before it serves the key.
//!
//! Both are futures; a blocking caller runs them on its own thread ([`block_on`]), parked
//! between polls: one code path for both kinds of callers.
//!
//! [`ClientBuilder::replicas`]: crate::ClientBuilder::replicas

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::engine::lock;
use super::future::AsyncCall;
use super::{Inner, SharedClient};
use crate::command::{CallSpec, Op, Reply};
use crate::error::{Error, Result};
use crate::fleet::plan::{
    changed, fails_over, first_wave, prefers_zone, settle, Action, Part, Servers, Standing,
    WriteKind,
};
use crate::fleet::repair::Work;
use crate::fleet::{FleetShared, WritePolicy};
use crate::ring::MAX_REPLICAS;

/// A server whose round has run this many times its median latency is slow for reads...
const SLOW_FACTOR: u32 = 4;
/// ... and at least this long.
const SLOW_MIN: Duration = Duration::from_millis(2);
/// The most calls of one multi-key call with copies under way at once: enough to fill
/// each server's batches, few enough that every wake-up polls them all cheaply.
const WINDOW: usize = 128;
/// The repair thread's pause when every repair left is on a server that is down.
const REPAIR_PAUSE: Duration = Duration::from_millis(20);

/// A blocking caller's waker: unparks its thread.
struct ThreadWake(Thread);

impl Wake for ThreadWake {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// Made once per thread: a blocking call clones it (no allocation per call).
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWake(std::thread::current())));
}

thread_local! {
    /// A hedge's buffer, kept between reads so that a warm hedge allocates nothing.
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's spare buffer (an async read may give it back on another thread).
fn take_spare() -> Vec<u8> {
    SPARE.with(std::cell::Cell::take)
}

/// Keeps `spare` for the next read on this thread, unless it holds a bigger one.
fn give_spare(spare: Vec<u8>) {
    SPARE.with(|s| {
        let kept = s.take();
        s.set(if kept.capacity() >= spare.capacity() {
            kept
        } else {
            spare
        });
    });
}

/// A future that may want to be polled again at a time of its own.
pub(super) trait Timed: Future {
    fn wake_at(&self) -> Option<Instant>;
}

/// Runs `f` on this thread, parked between polls (until its own time, if it has one).
pub(super) fn block_on<F: Timed>(f: F, longest: Duration) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = THREAD_WAKER.with(Waker::clone);
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(r) = f.as_mut().poll(&mut cx) {
            return r;
        }
        let now = Instant::now();
        let until = f.as_ref().get_ref().wake_at().unwrap_or(now + longest);
        std::thread::park_timeout(until.saturating_duration_since(now));
    }
}

/// One copy's attempt at a read.
struct Try<'a> {
    call: AsyncCall<'a>,
    server: usize,
    started: Instant,
    hedge: bool,
    /// Its buffer is the caller's (else the spare).
    callers: bool,
}

/// A read with copies (see the module docs).
pub(super) struct CopyRead<'a> {
    client: &'a SharedClient,
    call: CallSpec<'a>,
    order: Servers,
    /// The copies of `order` being probed (half-open).
    probing: Servers,
    /// The next copy in `order` to ask.
    next: usize,
    tries: [Option<Try<'a>>; 2],
    /// The caller's buffer, while no try holds it.
    out: Option<&'a mut Vec<u8>>,
    spare: Option<&'a mut Vec<u8>>,
    /// When to hedge (`None`: no hedge, or decided).
    hedge_at: Option<Instant>,
    last_error: Option<Error>,
    failed: bool,
    /// A copy missed (with `miss_failover`: the next is asked).
    missed: bool,
    /// The budget refused this read a hedge (it is hedged only if its copy looks stuck).
    refused: bool,
    /// Register wake-ups with the client's timer thread (async callers).
    timers: bool,
    timer_set: Option<Instant>,
    done: bool,
}

impl Timed for CopyRead<'_> {
    fn wake_at(&self) -> Option<Instant> {
        self.hedge_at
    }
}

impl<'a> CopyRead<'a> {
    fn fleet(&self) -> &'a FleetShared {
        self.client.fleet()
    }

    /// Starts the next copy's try in `tries[k]` with buffer `buf`; false if none is left.
    fn start(&mut self, k: usize, buf: &'a mut Vec<u8>, callers: bool, hedge: bool) -> bool {
        // A copy being probed is asked only by the read that takes its probe.
        let server = loop {
            let Some(server) = self.order.get(self.next) else {
                if callers {
                    self.out = Some(buf);
                } else {
                    self.spare = Some(buf);
                }
                return false;
            };
            self.next += 1;
            let probed = self.probing.as_slice().contains(&(server as u32));
            if !probed
                || self.client.to_call(server, self.call.key, Standing::Probe) == Standing::Up
            {
                break server;
            }
            self.last_error
                .get_or_insert_with(|| self.client.down(server));
        };
        self.tries[k] = Some(Try {
            call: self.client.call_async_on(server, self.call, buf),
            server,
            started: Instant::now(),
            hedge,
            callers,
        });
        true
    }

    /// Whether try `k`'s miss sends the read on (`miss_failover`): another copy is left to
    /// ask, or the other try is still out.
    fn ask_on_miss(&self, k: usize) -> bool {
        self.client.inner.miss_failover
            && (self.next < self.order.len() || self.tries[1 - k].is_some())
    }

    /// A try answered: the call's result.
    fn won(&mut self, k: usize, reply: Reply) -> Reply {
        let mut t = self.tries[k].take().expect("a try answered");
        let fleet = self.fleet();
        fleet.latency[t.server].record(t.started.elapsed());
        if t.hedge {
            fleet.hedge_won(t.server);
        }
        if self.failed || (self.missed && reply != Reply::Miss) {
            fleet.failover(t.server);
        }
        if !t.callers {
            // The spare holds the value: copied into the caller's buffer, which keeps its
            // capacity (a warm call allocates nothing).
            let other = self.tries[1 - k]
                .as_mut()
                .filter(|o| o.callers)
                .and_then(|o| o.call.take_out());
            let callers = other.or_else(|| self.out.take());
            if let (Some(out), Some(spare)) = (callers, t.call.take_out()) {
                out.clear();
                // Only a hit wrote the spare: on a miss it still holds an earlier value.
                if matches!(reply, Reply::Hit(_)) {
                    out.extend_from_slice(spare);
                }
            }
        }
        // The other try, if any, is dropped: withdrawn, or its reply read and dropped.
        self.tries = [None, None];
        reply
    }
}

impl CopyRead<'_> {
    /// The hedge's time has come: sends the read to the next copy too, if one is left and
    /// the budget allows, or at once, budget or not, if the copy asked looks stuck (a round
    /// on the wire far longer than it usually takes: it is failing, not slow). Refused, it
    /// looks again a little later. True if a hedge went out.
    fn hedge(&mut self) -> bool {
        self.hedge_at = None;
        let free = self.tries.iter().position(Option::is_none);
        let busy = self.tries.iter().flatten().map(|t| t.server).next();
        let (Some(k), Some(busy)) = (free, busy) else {
            return false;
        };
        if self.next >= self.order.len() {
            return false;
        }
        let stuck = self.client.looks_stuck(busy, Instant::now());
        let allowed = if stuck {
            self.fleet().spend_free(busy);
            true
        } else if self.refused {
            false
        } else {
            let ok = self.fleet().spend(busy);
            self.refused = !ok;
            ok
        };
        if !allowed {
            self.hedge_at = Some(Instant::now() + SLOW_MIN);
            return false;
        }
        let buf = match (self.spare.take(), self.out.take()) {
            (Some(s), out) => {
                self.out = out;
                Some((s, false))
            }
            (None, out) => out.map(|o| (o, true)),
        };
        match buf {
            Some((buf, callers)) => self.start(k, buf, callers, true),
            None => false,
        }
    }
}

impl Future for CopyRead<'_> {
    type Output = Result<Reply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Reply>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Err(crate::command::unexpected()));
        }
        loop {
            let mut progressed = false;
            for k in 0..2 {
                let Some(t) = this.tries[k].as_mut() else {
                    continue;
                };
                let r = match Pin::new(&mut t.call).poll(cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => continue,
                };
                match r {
                    Ok(Reply::Miss) if this.ask_on_miss(k) => {
                        let mut t = this.tries[k].take().expect("polled");
                        this.fleet().latency[t.server].record(t.started.elapsed());
                        this.missed = true;
                        if let Some(buf) = t.call.take_out() {
                            progressed |= this.start(k, buf, t.callers, false);
                        }
                    }
                    Ok(reply) => {
                        this.done = true;
                        return Poll::Ready(Ok(this.won(k, reply)));
                    }
                    Err(e) if fails_over(&e) => {
                        let mut t = this.tries[k].take().expect("polled");
                        this.failed = true;
                        this.last_error = Some(e);
                        if let Some(buf) = t.call.take_out() {
                            if this.start(k, buf, t.callers, false) {
                                progressed = true;
                            }
                        }
                    }
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Err(e));
                    }
                }
            }
            if this.hedge_at.is_some_and(|at| Instant::now() >= at) {
                progressed |= this.hedge();
            }
            // Async callers are woken for the hedge (or its next look) by the timer thread.
            if let Some(at) = this.hedge_at.filter(|_| this.timers) {
                if this.timer_set != Some(at) {
                    this.timer_set = Some(at);
                    this.client.inner.timers.wake_at(at, cx.waker());
                }
            }
            if this.tries.iter().all(Option::is_none) {
                this.done = true;
                // No copy left: a miss if a copy missed (the others failed); else the last
                // failure, or a miss when every copy was waiting for a repair of this key
                // (none may serve it).
                let error = this.last_error.take().filter(|_| !this.missed);
                return Poll::Ready(error.map_or(Ok(Reply::Miss), Err));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}

/// The part of a copy a write did not wait for ([`WritePolicy::Any`]).
fn not_waited(server: &str) -> Error {
    Error::Timeout {
        server: server.to_string(),
        during: crate::error::During::Write,
        elapsed: Duration::ZERO,
    }
}

/// Up to [`MAX_REPLICAS`] async calls run together.
struct JoinAll<'a> {
    client: &'a SharedClient,
    calls: [Option<AsyncCall<'a>>; MAX_REPLICAS],
    servers: [usize; MAX_REPLICAS],
    results: [Option<Result<Reply>>; MAX_REPLICAS],
    /// After the first call that succeeds, wait for the others only while one of them does
    /// not look stuck: a stuck copy is then dropped (withdrawn if still queued, or left to
    /// its round) and remembered for repair.
    first_ok: bool,
    /// When to look at the others again.
    grace_until: Option<Instant>,
}

/// How often [`JoinAll`] looks whether the copies it still waits for look stuck.
const GRACE_MIN: Duration = Duration::from_millis(2);

impl Future for JoinAll<'_> {
    type Output = [Option<Result<Reply>>; MAX_REPLICAS];

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut pending = false;
        let mut confirmed = false;
        for (c, r) in this.calls.iter_mut().zip(this.results.iter_mut()) {
            if let Some(call) = c {
                match Pin::new(call).poll(cx) {
                    Poll::Ready(x) => {
                        *r = Some(x);
                        *c = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
            confirmed |= matches!(r, Some(Ok(_)));
        }
        if pending && this.first_ok && confirmed {
            // The others are waited for unless every one left looks stuck (a round on the
            // wire far longer than usual): a copy that is merely slow (a busy machine) keeps
            // the write, one that is frozen is given up on (and repaired later). Looked at
            // again every `GRACE_MIN`.
            let now = Instant::now();
            let stuck = (0..MAX_REPLICAS)
                .filter(|&k| this.calls[k].is_some())
                .all(|k| this.client.looks_stuck(this.servers[k], now));
            if stuck {
                pending = false;
            } else if this.grace_until.is_none_or(|at| now >= at) {
                let at = now + GRACE_MIN;
                this.grace_until = Some(at);
                this.client.inner.timers.wake_at(at, cx.waker());
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(std::mem::replace(
            &mut this.results,
            std::array::from_fn(|_| None),
        ))
    }
}

impl<F: Future + ?Sized> Timed for Pin<&mut F> {
    fn wake_at(&self) -> Option<Instant> {
        None
    }
}

impl SharedClient {
    pub(super) fn fleet(&self) -> &FleetShared {
        &self.inner.health.fleet
    }

    /// Keys have copies: keyed calls go through this module.
    #[inline]
    pub(super) fn replicated(&self) -> bool {
        self.inner.replicated
    }

    /// A key's copies in placement order and how each stands (validating the key).
    /// `to_call`: for a write or meta call, which takes the probe of a copy being probed
    /// (see `Core::standing_to_call`); a read takes none.
    fn copies(&self, key: &[u8], to_call: bool) -> Result<(Servers, [Standing; MAX_REPLICAS])> {
        let inner = &*self.inner;
        let mut router = lock(&inner.router);
        let (core, scratch) = router.engine();
        let copies = core.copies_of(scratch, key)?;
        let mut st = [Standing::Up; MAX_REPLICAS];
        let now = Instant::now();
        for (k, &i) in copies.as_slice().iter().enumerate() {
            let i = i as usize;
            st[k] = match to_call {
                true => core.standing_to_call(i, key),
                false => core.standing(i, key),
            };
            if st[k] == Standing::Up && self.looks_stuck(i, now) {
                st[k] = Standing::Slow;
            }
        }
        Ok((Servers::from_slice(copies.as_slice()), st))
    }

    /// `st` for a call about to be made on copy `i`: a copy being probed becomes `Up` if this
    /// call takes its probe, `Down` if another call holds it.
    fn to_call(&self, i: usize, key: &[u8], st: Standing) -> Standing {
        if st != Standing::Probe {
            return st;
        }
        lock(&self.inner.router).engine().0.standing_to_call(i, key)
    }

    /// Whether server `i` has had a round on the wire far longer than it usually takes.
    fn looks_stuck(&self, i: usize, now: Instant) -> bool {
        let Some(busy) = self.inner.engines[i].busy_for(now) else {
            return false;
        };
        let usual = self.fleet().latency[i].median().unwrap_or(SLOW_MIN);
        busy > (usual * SLOW_FACTOR).max(SLOW_MIN)
    }

    /// A read with copies, as a future.
    pub(super) fn copy_read<'a>(
        &'a self,
        call: CallSpec<'a>,
        out: &'a mut Vec<u8>,
        spare: &'a mut Vec<u8>,
        timers: bool,
    ) -> Result<CopyRead<'a>> {
        self.check(&call)?;
        let (copies, st) = self.copies(call.key, false)?;
        let fleet = self.fleet();
        let readable = match &fleet.zones {
            Some(z) => z.readable(copies.as_slice(), prefers_zone(&call.op)),
            None => copies,
        };
        let order = crate::fleet::plan::read_order(
            readable.as_slice(),
            |i| st[copies.position(i)],
            |i| fleet.latency[i].median(),
        );
        let hedge = self.inner.hedge.filter(|_| order.len() > 1);
        let mut probing = Servers::from_slice(&[]);
        for (i, s) in copies.iter().zip(st) {
            if s == Standing::Probe {
                probing.push(i as u32);
            }
        }
        let mut read = CopyRead {
            client: self,
            call,
            order,
            probing,
            next: 0,
            tries: [None, None],
            out: None,
            spare: Some(spare),
            hedge_at: None,
            last_error: None,
            failed: false,
            missed: false,
            refused: false,
            timers,
            timer_set: None,
            done: false,
        };
        if let Some(first) = order.get(0) {
            if let Some(h) = &hedge {
                fleet.earn(h);
                read.hedge_at = Some(Instant::now() + fleet.hedge_delay(h, first));
            }
            read.start(0, out, true, false);
        } else {
            read.out = Some(out);
        }
        Ok(read)
    }

    /// A write with copies (see [`crate::fleet::plan`] for what each kind does).
    pub(super) async fn copy_write(
        &self,
        kind: WriteKind,
        call: CallSpec<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        self.check(&call)?;
        // cas, incr, decr ask one copy at a time: a probe is taken right before its copy is
        // asked. The other writes ask every copy: each copy being probed is probed now.
        let first_then_delete = kind == WriteKind::FirstThenDelete;
        let (copies, st) = self.copies(call.key, !first_then_delete)?;
        let fleet = self.fleet();
        let key = call.key;
        if first_then_delete {
            let mut decided = None;
            let mut last = None;
            for (k, i) in copies.iter().enumerate() {
                if first_wave(kind, self.to_call(i, key, st[k])) != Action::Command {
                    continue;
                }
                match self.call_async_on(i, call, out).await {
                    Ok(reply) => {
                        decided = Some((k, reply));
                        break;
                    }
                    Err(e) if fails_over(&e) => {
                        fleet.repairs.record(i, key);
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((d, reply)) = decided else {
                self.ensure_repairer();
                return Err(last.unwrap_or(Error::NoServers));
            };
            if changed(&reply) {
                let mut del = [Action::Leave; MAX_REPLICAS];
                for (k, _) in copies.iter().enumerate() {
                    if k != d {
                        // Down: remembered for repair (a failed `Skip` part); else deleted.
                        del[k] = match self.to_call(copies.get(k).unwrap_or(0), key, st[k]) {
                            Standing::Down | Standing::Probe => Action::Skip,
                            _ => Action::Delete,
                        };
                    }
                }
                let parts = self.wave(&copies, &del, call, out, false).await;
                for p in &parts[..copies.len()] {
                    self.after_delete(p, key);
                }
            }
            self.ensure_repairer();
            return Ok(reply);
        }
        let mut actions = [Action::Leave; MAX_REPLICAS];
        for k in 0..copies.len() {
            actions[k] = first_wave(kind, st[k]);
        }
        // `Any`: a set, delete or touch answers soon after its first confirmation; a copy
        // that has not confirmed by then (it is slow or stuck) is remembered for repair
        // (deleted later: a copy holds the latest value or nothing).
        let first_ok = kind == WriteKind::Everywhere && self.inner.write_policy == WritePolicy::Any;
        let parts = self.wave(&copies, &actions, call, out, first_ok).await;
        let parts = &parts[..copies.len()];
        let mut reconcile = [Action::Leave; MAX_REPLICAS];
        let r = settle(
            kind,
            self.inner.write_policy,
            parts,
            |i| fleet.repairs.record(i, key),
            |i| reconcile[copies.position(i)] = Action::Delete,
        );
        for p in parts {
            if p.action == Action::Delete {
                self.after_delete(p, key);
            }
        }
        if reconcile.contains(&Action::Delete) {
            let parts = self.wave(&copies, &reconcile, call, out, false).await;
            for p in &parts[..copies.len()] {
                self.after_delete(p, key);
            }
        }
        self.ensure_repairer();
        r
    }

    /// A delete sent as a repair or reconciliation: the copy holds nothing now, or (failed)
    /// is remembered for repair.
    fn after_delete(&self, p: &Part, key: &[u8]) {
        let repairs = &self.fleet().repairs;
        match (&p.result, p.action) {
            (Ok(_), Action::Delete) => repairs.clear(p.server, key),
            (Err(_), Action::Delete | Action::Skip) if p.server != usize::MAX => {
                repairs.record(p.server, key)
            }
            _ => {}
        }
    }

    /// Sends each copy its action at once and waits for all: the parts, in copy order
    /// (`Skip`: a copy marked down, failed with its error without being asked).
    async fn wave(
        &self,
        copies: &Servers,
        actions: &[Action; MAX_REPLICAS],
        call: CallSpec<'_>,
        out: &mut Vec<u8>,
        first_ok: bool,
    ) -> [Part; MAX_REPLICAS] {
        let delete = CallSpec {
            op: Op::Delete,
            key: call.key,
            value: &[],
        };
        let mut bufs: [Vec<u8>; MAX_REPLICAS] = Default::default();
        bufs[0] = std::mem::take(out);
        let mut parts: [Part; MAX_REPLICAS] = std::array::from_fn(|_| Part::none());
        {
            let mut join = JoinAll {
                client: self,
                calls: std::array::from_fn(|_| None),
                servers: [0; MAX_REPLICAS],
                results: std::array::from_fn(|_| None),
                first_ok,
                grace_until: None,
            };
            for ((k, buf), i) in bufs.iter_mut().enumerate().zip(copies.iter()) {
                join.servers[k] = i;
                join.calls[k] = match actions[k] {
                    Action::Command => Some(self.call_async_on(i, call, buf)),
                    Action::Delete => Some(self.call_async_on(i, delete, buf)),
                    Action::Skip | Action::Leave => None,
                };
            }
            let results = join.await;
            for ((k, r), i) in results.into_iter().enumerate().zip(copies.iter()) {
                parts[k] = match (actions[k], r) {
                    (Action::Leave, _) => Part::none(),
                    (a, Some(r)) => Part::new(i, a, r),
                    (Action::Skip, None) => Part::new(i, Action::Skip, Err(self.down(i))),
                    // Not waited for (`first_ok`): unknown, so remembered for repair.
                    (a, None) => Part::new(i, a, Err(not_waited(&self.inner.labels.load()[i]))),
                };
            }
        }
        *out = std::mem::take(&mut bufs[0]);
        parts
    }

    /// The error of a copy marked down.
    fn down(&self, i: usize) -> Error {
        let router = lock(&self.inner.router);
        router.core_ref().down_error(i)
    }

    /// A blocking keyed call with copies.
    pub(super) fn exec_copies(&self, call: CallSpec<'_>, out: &mut Vec<u8>) -> Result<Reply> {
        let longest = self.inner.timeout;
        match crate::fleet::plan::write_kind(&call.op) {
            None => {
                let mut spare = take_spare();
                let read = self.copy_read(call, out, &mut spare, false)?;
                let r = block_on(read, longest);
                give_spare(spare);
                r
            }
            Some(kind) => {
                let write = std::pin::pin!(self.copy_write(kind, call, out));
                block_on(write, longest)
            }
        }
    }

    /// An async keyed call with copies.
    pub(super) async fn exec_copies_async(
        &self,
        call: CallSpec<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        match crate::fleet::plan::write_kind(&call.op) {
            None => {
                let mut spare = take_spare();
                let r = self.copy_read(call, out, &mut spare, true)?.await;
                give_spare(spare);
                r
            }
            Some(kind) => self.copy_write(kind, call, out).await,
        }
    }

    /// `n` keyed calls with copies (a multi-key call), at most [`WINDOW`] under way at
    /// once: their requests share each server's batches, so the keys cost a few rounds
    /// instead of one each. Each result goes to `done(index, result, value)` as it comes.
    pub(super) async fn copies_many<'a, 'k: 'a>(
        &'a self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        mut done: impl FnMut(usize, Result<Reply>, &[u8]),
    ) {
        type Call<'a> = Pin<Box<dyn Future<Output = (usize, Result<Reply>, Vec<u8>)> + Send + 'a>>;
        let start = |j: usize| -> Call<'a> {
            let spec: CallSpec<'a> = call(j);
            Box::pin(async move {
                let mut out = Vec::new();
                let r = self.exec_copies_async(spec, &mut out).await;
                (j, r, out)
            })
        };
        let mut running: Vec<Call<'a>> = Vec::with_capacity(WINDOW.min(n));
        let mut next = 0;
        std::future::poll_fn(|cx| {
            while running.len() < WINDOW && next < n {
                running.push(start(next));
                next += 1;
            }
            let mut k = 0;
            while k < running.len() {
                match running[k].as_mut().poll(cx) {
                    Poll::Ready((j, r, out)) => {
                        done(j, r, &out);
                        // The next call takes its place (and is polled in this pass).
                        if next < n {
                            running[k] = start(next);
                            next += 1;
                        } else {
                            drop(running.swap_remove(k));
                        }
                    }
                    Poll::Pending => k += 1,
                }
            }
            match running.is_empty() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
    }

    /// A meta call with copies, as [`Client`](crate::Client)'s: on the first copy up (not
    /// waiting for a repair of the key), its engine's client lent; when `changed` says the
    /// result changed the item, the other copies are deleted.
    pub(super) fn on_first_copy<T>(
        &self,
        key: &[u8],
        write: bool,
        mut f: impl FnMut(&mut crate::Client) -> Result<T>,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        let (copies, st) = self.copies(key, false)?;
        // A read never asks a write-only zone's copy.
        let asked = match (&self.fleet().zones, write) {
            (Some(z), false) => z.readable(copies.as_slice(), false),
            _ => copies,
        };
        let mut last = None;
        let mut answered = None;
        for i in asked.iter() {
            let s = st[copies.position(i)];
            let usable = match s {
                Standing::Up | Standing::Slow => true,
                // Taken only for the copy about to be asked.
                Standing::Probe => {
                    let mut router = lock(&self.inner.router);
                    router.engine().0.standing_to_call(i, key) == Standing::Up
                }
                Standing::Down | Standing::Blocked => false,
            };
            if !usable {
                continue;
            }
            let r = {
                let mut c = self.lend_for(i);
                c.pinned(i, &mut f)
            };
            match r {
                Ok(r) => {
                    answered = Some((i, r));
                    break;
                }
                // As `Client::on_first_copy`: a write is remembered for repair and not
                // retried elsewhere; a read goes on to the next copy.
                Err(e) if fails_over(&e) => {
                    if write {
                        self.fleet().repairs.record(i, key);
                        self.ensure_repairer();
                        return Err(e);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((first, r)) = answered else {
            return Err(last.unwrap_or_else(|| match asked.get(0) {
                Some(i) => self.down(i),
                None => Error::NoServers,
            }));
        };
        if changed(&r) {
            let mut buf = Vec::new();
            for i in copies.iter().filter(|&i| i != first) {
                let call = CallSpec {
                    op: Op::Delete,
                    key,
                    value: &[],
                };
                let ok = self
                    .exec_on(&self.inner.engines[i], call, false, &mut buf)
                    .is_ok();
                self.fleet().repairs.deleted(i, key, ok);
            }
            self.ensure_repairer();
        }
        Ok(r)
    }

    /// Starts the repair thread if repairs are pending and none runs.
    fn ensure_repairer(&self) {
        let inner = &*self.inner;
        if !inner.health.fleet.repairs.any() || inner.repairing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("mcstore-repair".into())
            .spawn(move || repair_loop(&weak));
        if spawned.is_err() {
            inner.repairing.store(false, Ordering::Release);
        }
    }
}

/// The repair thread: deletes the keys copies missed (or flushes a server that missed too
/// many) on servers that are up, until nothing is pending; ends with the client.
fn repair_loop(weak: &Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let client = SharedClient { inner };
        let fleet = client.fleet();
        let work = {
            let mut router = lock(&client.inner.router);
            let (core, _) = router.engine();
            // Servers whose retry time came rejoin here too: an idle client must repair.
            core.maybe_rejoin();
            fleet.repairs.work(64, |i| core.check_up(i).is_err())
        };
        if work.is_empty() {
            if !fleet.repairs.any() {
                client.inner.repairing.store(false, Ordering::Release);
                // A repair recorded after the look above saw `repairing` set: take it.
                if !fleet.repairs.any() || client.inner.repairing.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            drop(client);
            std::thread::sleep(REPAIR_PAUSE);
            continue;
        }
        let mut progress = false;
        let mut buf = Vec::new();
        for w in &work {
            let ok = match w {
                Work::Delete(i, key) => {
                    let call = CallSpec {
                        op: Op::Delete,
                        key,
                        value: &[],
                    };
                    let eng = &client.inner.engines[*i];
                    client.exec_on(eng, call, false, &mut buf).is_ok()
                }
                // Pinned: the look-up above took the server's probe, if it is half-open.
                Work::Flush(i) => {
                    let label = client.inner.labels.load()[*i].clone();
                    let mut admin = lock(&client.inner.admin);
                    admin.pinned(*i, |c| c.flush_server(&label, None)).is_ok()
                }
            };
            if ok {
                fleet.repairs.done(w);
                progress = true;
            }
        }
        drop(client);
        if !progress {
            std::thread::sleep(REPAIR_PAUSE);
        }
    }
}
