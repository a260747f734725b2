//! One client for many callers: [`SharedClient`] serves any number of threads (blocking calls)
//! and async tasks (futures, under any executor) over one connection per server, and batches
//! what they ask for concurrently.
//!
//! See [`SharedClient`] for how calls travel, deadlines and backpressure.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::multi::Keys;
use super::{CasResult, Client, ClientBuilder, Item, ItemInfo, ItemRef, ServerStats, SetOptions};
use crate::error::{During, Error, Result, ServerErrorKind};
use crate::proto::wire::{Capability, Cmd, Kind, Outcome, StoreOpts};
use crate::proto::{Key, ParseError, Protocol, SetOutcome, StoreMode, MAX_KEY_LEN};

/// Request slots per server unless set with [`SharedClientBuilder::max_in_flight`].
const DEFAULT_IN_FLIGHT: usize = 1024;

/// The most distinct keys in one coalesced multi-get: a huge batch would hold every other
/// caller behind it.
const MAX_BATCH_KEYS: usize = 256;

/// The most request bytes (keys and values) in one store batch; a larger value goes alone.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Over TLS, store batches stay within one TLS record (memcached 1.6 stalls on longer
/// pipelined requests of replied commands; see `Client::tls_chunk`).
const TLS_BATCH_BYTES: usize = 16 * 1024;

/// Who does a [`SharedClient`]'s I/O for blocking callers (async calls always go through the
/// server's I/O thread). Measured against each other in BENCHMARKS.md ("Many callers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// A caller that finds its server idle (nothing queued, nobody doing I/O) makes its call
    /// itself, as a plain [`Client`] would; otherwise it queues and the server's I/O thread
    /// serves it. The default: a lone caller pays no hand-off, concurrent callers are batched
    /// by one thread that never has a call of its own to return to.
    #[default]
    Adaptive,
    /// Flat combining: the caller that gets the connection serves everyone queued, then hands
    /// over to the next queued caller (no I/O thread for blocking calls).
    Combining,
    /// Every call, even a lone one, goes through the server's I/O thread.
    IoThread,
}

/// Builds a [`SharedClient`] from a [`ClientBuilder`] (servers, protocol, timeouts, SASL, TLS,
/// namespace, failure policy all come from it).
#[derive(Debug, Clone)]
pub struct SharedClientBuilder {
    builder: ClientBuilder,
    max_in_flight: usize,
    driving: IoMode,
}

impl SharedClientBuilder {
    /// Request slots per server (default 1024): at most this many requests are queued or on
    /// the wire for one server; more callers wait for a slot up to their deadline.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, u32::MAX as usize / 2);
        self
    }

    /// Who does the I/O for blocking callers (default [`IoMode::Adaptive`]).
    pub fn io_mode(mut self, mode: IoMode) -> Self {
        self.driving = mode;
        self
    }

    /// Builds the client. Nothing connects until the first call.
    ///
    /// # Errors
    /// The builder's configuration errors ([`ClientBuilder::build`]).
    pub fn build(self) -> Result<SharedClient> {
        let timeout = self.builder.io_timeout;
        let router = self.builder.clone().build()?;
        let health = router.core.health.shared().clone();
        let builder = self.builder.share_health(health);
        let n = router.core.labels.len();
        let mut engines = Vec::with_capacity(n);
        for server in 0..n {
            let client = builder.clone().build()?;
            engines.push(Arc::new(Engine::new(
                server,
                client,
                self.max_in_flight,
                timeout,
            )));
        }
        let admin = builder.build()?;
        let core = &router.core;
        let inner = Inner {
            timeout,
            max_value: core.limits.max_value,
            namespace: Arc::clone(&core.namespace),
            binary_keys: core.protocol.supports(Capability::BinaryKeys),
            protocol: core.protocol,
            labels: Arc::clone(&core.labels),
            driving: self.driving,
            single: n == 1,
            router: Mutex::new(router),
            admin: Mutex::new(admin),
            engines: engines.into_boxed_slice(),
        };
        Ok(SharedClient {
            inner: Arc::new(inner),
        })
    }
}

impl ClientBuilder {
    /// A [`SharedClient`] with these settings (see [`SharedClientBuilder`] for its own).
    pub fn shared(self) -> SharedClientBuilder {
        SharedClientBuilder {
            builder: self,
            max_in_flight: DEFAULT_IN_FLIGHT,
            driving: IoMode::Adaptive,
        }
    }
}

/// A memcached client shared by many threads and tasks: `Clone` (cheap) `+ Send + Sync`,
/// with blocking calls on `&self` and `*_async` calls returning futures that run under any
/// executor. Concurrent calls to one server leave in one write and concurrent gets are
/// coalesced into one multi-get.
///
/// # How calls travel
///
/// Each server has an *engine*: a [`Client`] pinned to that server (its connection, buffers,
/// protocol code and failure handling: the command layer is not written twice), a queue of
/// requests and a table of request slots.
///
/// - **A lone caller** that finds its server's engine free and nothing queued makes its call
///   on the engine itself, as a plain [`Client`] would: no hand-off, no thread switch.
/// - **Concurrent callers** queue their requests in slots and park (threads) or return
///   `Pending` (futures). Whoever serves the engine takes everything queued as one *round*:
///   all queued gets become one multi-get (text: `get k1 k2 …`; binary and meta: quiet gets
///   closed by one no-op), identical keys once; queued stores and deletes become one batch
///   each; the rest go one by one. Each reply fills its slot and wakes its owner. A batch is
///   whatever queued while the previous round trip was in flight: no timer, no delay window.
/// - **Who serves a round** ([`IoMode`]): by default the server's I/O thread, started on
///   first need; with [`IoMode::Combining`], the blocking caller that gets the engine serves
///   everyone queued (flat combining) and then hands over to the next queued caller. Async
///   calls always go through the I/O thread, since they cannot do I/O on an executor's
///   thread; futures are woken by it through their [`Waker`]: no runtime is needed or
///   assumed. Measured: the I/O thread wakes each caller once per call; combining adds the
///   hand-over wakes, and is slower from 8 threads on (BENCHMARKS.md, "Many callers").
///
/// # Deadlines, cancellation, backpressure
///
/// Every call has its own deadline (the builder's I/O timeout from its start). A blocking
/// caller that reaches it gives up its slot and gets [`Error::Timeout`]; a dropped future does
/// the same. A request still queued is withdrawn; one already sent is left to its round,
/// whose reply is parsed and dropped, so the connection's framing never breaks. Each server
/// has a fixed number of slots (`max_in_flight`); when they are all taken, callers wait for
/// one up to their deadline, then get [`Error::Timeout`] saying so. Memory does not grow
/// with the number of callers beyond one waker per waiting task.
///
/// A frozen server holds only its own engine: calls for other servers' keys go on. A round on
/// it fails after one I/O timeout, as a [`Client`] call would, counts towards ejection, and
/// fails the rest of its round at once; requests whose deadline passed while queued are failed
/// without being sent. A blocking caller returns at its deadline; a future is woken when the
/// round ahead of it ends, so it may see its timeout up to one I/O timeout late (measured:
/// 10,000 futures on a frozen server with a 300 ms timeout, the slowest failed after 0.86 s).
///
/// ```no_run
/// # fn main() -> mcstore::Result<()> {
/// let client = mcstore::Client::builder().server("127.0.0.1:11211").shared().build()?;
/// std::thread::scope(|s| {
///     for t in 0..8 {
///         let client = client.clone();
///         s.spawn(move || {
///             let key = format!("k{t}");
///             client.set(key.as_bytes(), b"v", Default::default()).unwrap();
///             let mut buf = Vec::new();
///             client.get_into(key.as_bytes(), &mut buf).unwrap(); // no allocation once warm
///         });
///     }
/// });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedClient")
            .field("servers", &self.inner.labels)
            .field("protocol", &self.inner.protocol)
            .field("driving", &self.inner.driving)
            .finish_non_exhaustive()
    }
}

struct Inner {
    timeout: Duration,
    max_value: usize,
    namespace: Arc<[u8]>,
    binary_keys: bool,
    protocol: Protocol,
    labels: Arc<[String]>,
    driving: IoMode,
    /// One server: every key goes to engine 0 (its own client still checks its health).
    single: bool,
    /// Picks a key's server: a client that never connects, sharing the engines' view of who
    /// is ejected.
    router: Mutex<Client>,
    /// Server-wide commands (flush, stats, version) on their own connections.
    admin: Mutex<Client>,
    engines: Box<[Arc<Engine>]>,
}

impl SharedClient {
    /// The namespace (key prefix) it was built with.
    pub(crate) fn namespace(&self) -> Arc<[u8]> {
        self.inner.namespace.clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // I/O threads hold their engine, not the client: tell them to end.
        for e in self.engines.iter() {
            let mut q = lock(&e.queue);
            q.shutdown = true;
            drop(q);
            e.io.notify_all();
        }
    }
}

/// One server's connection and what is queued for it.
struct Engine {
    server: usize,
    label: String,
    timeout: Duration,
    /// Held by whoever combines: the connection and the working space of a round.
    state: Mutex<State>,
    queue: Mutex<Queue>,
    /// Wakes the I/O thread (with `queue`).
    io: Condvar,
    /// Requests in the queue (read without its lock by a lone caller's fast path).
    queued: AtomicUsize,
    /// The I/O thread is serving rounds (not asleep on `io`). An adaptive caller then queues
    /// even if it finds the queue empty: a direct call between two rounds would hold the
    /// connection for a round trip of one request while the others wait behind it.
    io_busy: AtomicBool,
    /// Bumped after a batch completed requests of [`Waiter::Round`] threads, which wait on
    /// `round_done`: one `notify_all` (one syscall) wakes a batch's threads, where waking each
    /// would cost one apiece.
    round: Mutex<u64>,
    round_done: Condvar,
    /// A completed request's owner waits on `round_done`.
    round_waiting: AtomicBool,
    /// Wakes blocking callers waiting for a free slot (with `queue`).
    space: Condvar,
    slots: Box<[Slot]>,
}

/// What a call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get { cas: bool },
    Gat { ttl: u32, cas: bool },
    Store(StoreOpts),
    Delete,
    Arith { decr: bool, delta: u64 },
    Touch(u32),
}

/// What a call got back (a hit's value is in the slot's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Hit(ItemInfo),
    Miss,
    Store(SetOutcome),
    Existed(bool),
    Number(Option<u64>),
}

/// A queued request: its key and value live in the queue's arena.
#[derive(Debug, Clone)]
struct Req {
    op: Op,
    key: Range<usize>,
    value: Range<usize>,
    slot: u32,
    deadline: Instant,
}

#[derive(Default)]
struct Queue {
    reqs: Vec<Req>,
    arena: Vec<u8>,
    free: Vec<u32>,
    /// Async callers waiting for a free slot.
    space_wakers: Vec<Waker>,
    /// Blocking callers waiting on `space`.
    space_waiting: usize,
    /// The I/O thread exists, and is waiting on `io`.
    io_running: bool,
    io_idle: bool,
    shutdown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    /// Queued or on the wire, owner waiting.
    Pending,
    /// The reply is in; the owner has not taken it yet.
    Done,
    /// The owner gave up while the request was on the wire: the reply frees the slot.
    Abandoned,
}

enum Waiter {
    None,
    /// A parked thread, woken by itself (combining: it may be asked to lead).
    Thread(Thread),
    /// A thread waiting on its engine's round condition: one wake per batch for all of them.
    Round,
    Task(Waker),
}

struct SlotData {
    phase: Phase,
    /// The owner is asked to combine (it was queued first when a combiner let go).
    lead: bool,
    result: Option<Result<Reply>>,
    value: Vec<u8>,
    waiter: Waiter,
}

struct Slot {
    data: Mutex<SlotData>,
}

/// Locks, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    fn new(server: usize, client: Client, slots: usize, timeout: Duration) -> Engine {
        let label = client.core.labels[server].clone();
        let queue = Queue {
            free: (0..slots as u32).rev().collect(),
            ..Queue::default()
        };
        Engine {
            server,
            label,
            timeout,
            state: Mutex::new(State {
                client,
                work: Work::default(),
            }),
            queue: Mutex::new(queue),
            io: Condvar::new(),
            queued: AtomicUsize::new(0),
            io_busy: AtomicBool::new(false),
            round: Mutex::new(0),
            round_done: Condvar::new(),
            round_waiting: AtomicBool::new(false),
            space: Condvar::new(),
            slots: (0..slots)
                .map(|_| Slot {
                    data: Mutex::new(SlotData {
                        phase: Phase::Free,
                        lead: false,
                        result: None,
                        value: Vec::new(),
                        waiter: Waiter::None,
                    }),
                })
                .collect(),
        }
    }

    fn try_state(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Queues a request in a free slot for an owner waiting as `waiter`, or `None` if no
    /// slot is free.
    fn push(
        &self,
        q: &mut Queue,
        call: &CallSpec<'_>,
        deadline: Instant,
        waiter: Waiter,
    ) -> Option<u32> {
        let slot = q.free.pop()?;
        {
            let mut d = lock(&self.slots[slot as usize].data);
            d.phase = Phase::Pending;
            d.lead = false;
            d.result = None;
            d.waiter = waiter;
        }
        let (op, key, value) = (call.op, call.key, call.value);
        let k = q.arena.len();
        q.arena.extend_from_slice(key);
        let v = q.arena.len();
        q.arena.extend_from_slice(value);
        self.queued.fetch_add(1, Ordering::SeqCst);
        q.reqs.push(Req {
            op,
            key: k..v,
            value: v..q.arena.len(),
            slot,
            deadline,
        });
        Some(slot)
    }

    /// Makes sure the I/O thread exists and looks at the queue.
    fn kick_io(self: &Arc<Self>, q: &mut Queue) {
        if !q.io_running {
            q.io_running = true;
            let engine = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("mcstore-io-{}", self.server))
                .spawn(move || engine.io_thread());
            if spawned.is_err() {
                q.io_running = false;
            }
        } else if q.io_idle {
            self.io.notify_one();
        }
    }

    /// Gives a slot back.
    fn free(&self, q: &mut Queue, slot: u32) {
        q.free.push(slot);
        if let Some(w) = q.space_wakers.pop() {
            w.wake();
        } else if q.space_waiting > 0 {
            self.space.notify_one();
        }
    }

    /// The owner of `slot` stops waiting: withdraws the request if still queued, or leaves
    /// the slot to be freed by its reply. True if the reply came in meanwhile (the owner
    /// takes it as usual).
    fn abandon(&self, slot: u32) -> bool {
        let mut q = lock(&self.queue);
        let mut d = lock(&self.slots[slot as usize].data);
        match d.phase {
            Phase::Done => return true,
            Phase::Pending => {}
            Phase::Free | Phase::Abandoned => return false,
        }
        d.waiter = Waiter::None;
        if let Some(at) = q.reqs.iter().position(|r| r.slot == slot) {
            q.reqs.remove(at);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            d.phase = Phase::Free;
            drop(d);
            self.free(&mut q, slot);
        } else {
            d.phase = Phase::Abandoned;
        }
        false
    }

    /// The owner took the result: the slot is free again.
    fn release_slot(&self, slot: u32) {
        {
            let mut d = lock(&self.slots[slot as usize].data);
            d.phase = Phase::Free;
            d.waiter = Waiter::None;
        }
        let mut q = lock(&self.queue);
        self.free(&mut q, slot);
    }

    /// After a combiner let go of the client: someone must serve what is queued.
    fn hand_off(self: &Arc<Self>) {
        // Read after the engine was let go: a request queued before that is counted here
        // (its owner counted it, then failed to get the engine), one queued after finds the
        // engine free.
        if self.queued.load(Ordering::SeqCst) == 0 {
            return;
        }
        let q = lock(&self.queue);
        let Some(head) = q.reqs.first() else { return };
        if q.io_running {
            if q.io_idle {
                self.io.notify_one();
            }
            return;
        }
        let slot = head.slot;
        let mut d = lock(&self.slots[slot as usize].data);
        d.lead = true;
        let round = matches!(d.waiter, Waiter::Round);
        if let Waiter::Thread(t) = &d.waiter {
            t.unpark();
        }
        drop(d);
        drop(q);
        if round {
            self.round_waiting.store(true, Ordering::SeqCst);
            self.wake_round();
        }
    }

    /// Wakes the threads waiting on `round_done` if a request of theirs completed.
    fn wake_round(&self) {
        if self.round_waiting.swap(false, Ordering::SeqCst) {
            *lock(&self.round) += 1;
            self.round_done.notify_all();
        }
    }

    /// Delivers a result to `slot` (and the value, for a hit): wakes its owner, or frees it
    /// if the owner is gone.
    fn complete(
        &self,
        slot: u32,
        result: Result<Reply>,
        value: Option<&[u8]>,
        freed: &mut Vec<u32>,
    ) {
        let mut d = lock(&self.slots[slot as usize].data);
        match d.phase {
            Phase::Pending => {}
            Phase::Abandoned => {
                d.phase = Phase::Free;
                freed.push(slot);
                return;
            }
            Phase::Done | Phase::Free => return,
        }
        if let Some(v) = value {
            d.value.clear();
            d.value.extend_from_slice(v);
        }
        d.result = Some(result);
        d.phase = Phase::Done;
        let waiter = std::mem::replace(&mut d.waiter, Waiter::None);
        drop(d);
        match waiter {
            Waiter::Thread(t) => t.unpark(),
            Waiter::Round => self.round_waiting.store(true, Ordering::SeqCst),
            // A task's waker is the caller's code: if it panics, the panic (already reported
            // by the hook) stays here, and the round goes on serving everyone else.
            Waiter::Task(w) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
            }
            Waiter::None => {}
        }
    }

    /// Runs one round: takes everything queued and serves it. Returns false if nothing was
    /// queued.
    fn round(&self, st: &mut State) -> bool {
        let State { client, work } = st;
        {
            let mut q = lock(&self.queue);
            if q.reqs.is_empty() {
                return false;
            }
            std::mem::swap(&mut q.reqs, &mut work.reqs);
            self.queued.fetch_sub(work.reqs.len(), Ordering::SeqCst);
            std::mem::swap(&mut q.arena, &mut work.arena);
        }
        work.freed.clear();
        let server = self.server;
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.pinned(server, |c| work.serve(self, c))
        }));
        if let Err(panic) = served {
            // A panic mid-round (a waker's, say): the round's requests are dropped, never
            // served again. Some were completed and their slots may be someone else's now;
            // the rest time out at their deadline. (The connection was replaced: it was
            // marked busy.)
            work.reqs.clear();
            work.arena.clear();
            std::panic::resume_unwind(panic);
        }
        self.wake_round();
        work.reqs.clear();
        work.arena.clear();
        if !work.freed.is_empty() {
            let mut q = lock(&self.queue);
            for &s in &work.freed {
                self.free(&mut q, s);
            }
        }
        true
    }

    /// The I/O thread: serves the queue whenever something is in it.
    fn io_thread(self: Arc<Self>) {
        loop {
            {
                let mut q = lock(&self.queue);
                if q.reqs.is_empty() && !q.shutdown {
                    // The callers just woken may be about to queue their next calls (on a
                    // busy core they run only when this thread lets go): give them the CPU
                    // once before sleeping, which would cost a wait and a wake.
                    drop(q);
                    std::thread::yield_now();
                    q = lock(&self.queue);
                }
                while q.reqs.is_empty() {
                    if q.shutdown {
                        return;
                    }
                    q.io_idle = true;
                    self.io_busy.store(false, Ordering::Relaxed);
                    q = self.io.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.io_idle = false;
                self.io_busy.store(true, Ordering::Relaxed);
            }
            let mut st = lock(&self.state);
            // A panic in a round (reported by the panic hook) must not end the thread that
            // serves this server's queue: every later call would time out.
            let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while self.round(&mut st) {}
            }));
            drop(rounds);
        }
    }
}

/// What the combiner holds.
struct State {
    client: Client,
    work: Work,
}

/// A call as the caller gave it.
#[derive(Debug, Clone, Copy)]
struct CallSpec<'a> {
    op: Op,
    key: &'a [u8],
    value: &'a [u8],
}

/// A combiner's working space, reused round after round.
#[derive(Default)]
struct Work {
    reqs: Vec<Req>,
    arena: Vec<u8>,
    /// Requests of the current batch (indices into `reqs`).
    batch: Vec<usize>,
    /// Distinct keys of a multi-get (ranges into `arena`) and, per request of the batch, the
    /// index of its key there; the requests of each distinct key, chained.
    keys: Vec<Range<usize>>,
    first: Vec<u32>,
    next: Vec<u32>,
    /// Distinct keys by hash.
    seen: std::collections::HashMap<u64, u32>,
    /// Per item of a store or delete batch: the answer read, if any.
    answers: Vec<Option<Result<Reply>>>,
    /// Per distinct key of a multi-get: whether it was a hit.
    hits: Vec<bool>,
    /// A value read by a call made on its own.
    value: Vec<u8>,
    /// A transport failure in this round (see `serve`).
    poison: Option<Error>,
    freed: Vec<u32>,
}

/// The keys of a batch, as ranges into the round's arena.
struct ArenaKeys<'a> {
    arena: &'a [u8],
    keys: &'a [Range<usize>],
}

impl Keys for ArenaKeys<'_> {
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn key(&self, j: usize) -> &[u8] {
        &self.arena[self.keys[j].clone()]
    }
}

const NONE: u32 = u32::MAX;

/// FNV-1a: distinct keys of a batch are found by hash, then compared.
fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Work {
    fn serve(&mut self, engine: &Engine, c: &mut Client) {
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

    fn serve_all(&mut self, engine: &Engine, c: &mut Client) {
        let now = Instant::now();
        // Requests whose owner's deadline passed while queued are failed, not sent.
        for req in self.reqs.iter_mut() {
            if req.deadline <= now {
                let e = Error::Timeout {
                    server: engine.label.clone(),
                    during: During::Write,
                    elapsed: engine.timeout + (now - req.deadline),
                };
                engine.complete(req.slot, Err(e), None, &mut self.freed);
                req.slot = NONE;
            }
        }
        // Gets, coalesced, in batches of distinct keys.
        let mut r = 0;
        while r < self.reqs.len() {
            self.batch.clear();
            let mut with_cas = false;
            while r < self.reqs.len() && self.batch.len() < MAX_BATCH_KEYS {
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
        // Stores, then deletes, batched; the rest one by one.
        let limit = if c.core.driver.is_tls() {
            TLS_BATCH_BYTES
        } else {
            MAX_BATCH_BYTES
        };
        self.write_batches(engine, c, Kind::Store, limit);
        self.write_batches(engine, c, Kind::Delete, limit);
        for r in 0..self.reqs.len() {
            let req = &self.reqs[r];
            if self.poison.is_some() {
                return;
            }
            if req.slot == NONE || matches!(req.op, Op::Get { .. } | Op::Store(_) | Op::Delete) {
                continue;
            }
            let (slot, op) = (req.slot, req.op);
            let key = &self.arena[req.key.clone()];
            let result = single(c, op, key, &[], &mut self.value);
            if let Err(e) = &result {
                self.failed(e);
            }
            let value = matches!(result, Ok(Reply::Hit(_))).then_some(&self.value[..]);
            engine.complete(slot, result, value, &mut self.freed);
            engine.wake_round();
            self.reqs[r].slot = NONE;
        }
    }

    /// One multi-get for the requests in `batch`: each distinct key once.
    fn get_batch(&mut self, engine: &Engine, c: &mut Client, with_cas: bool) {
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
        let Work {
            reqs,
            arena,
            batch,
            keys,
            first,
            next,
            freed,
            hits: hit,
            ..
        } = self;
        let list = ArenaKeys { arena, keys };
        hit.clear();
        hit.resize(keys.len(), false);
        let result = c.batch_get(with_cas, &list, |u, item| {
            hit[u] = true;
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
        });
        for u in 0..keys.len() {
            if hit[u] {
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
}

impl Work {
    /// The queued stores (or deletes), in batches of at most `limit` request bytes.
    fn write_batches(&mut self, engine: &Engine, c: &mut Client, kind: Kind, limit: usize) {
        let wanted = |op: &Op| match kind {
            Kind::Store => matches!(op, Op::Store(_)),
            _ => matches!(op, Op::Delete),
        };
        let mut r = 0;
        while r < self.reqs.len() && self.poison.is_none() {
            self.batch.clear();
            self.keys.clear();
            let mut bytes = 0;
            while r < self.reqs.len() {
                let req = &self.reqs[r];
                if req.slot != NONE && wanted(&req.op) {
                    let len = req.key.len() + req.value.len() + 48;
                    if !self.batch.is_empty() && bytes + len > limit {
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
            let list = ArenaKeys { arena, keys };
            let req_of = |j: usize| &reqs[batch[j]];
            let result = c.batch_write(
                kind,
                &list,
                |j| match req_of(j).op {
                    Op::Store(_) => Some(&arena[req_of(j).value.clone()]),
                    _ => None,
                },
                |j, key| match req_of(j).op {
                    Op::Store(o) => Cmd::Store(key, o, req_of(j).value.len()),
                    _ => Cmd::Delete(key),
                },
                |j, outcome| {
                    let reply = match (req_of(j).op, outcome) {
                        // Without a CAS, "exists" and "not found" cannot answer a store.
                        (Op::Store(o), Outcome::Store(s, ..))
                            if o.cas.is_some()
                                || matches!(s, SetOutcome::Stored | SetOutcome::NotStored) =>
                        {
                            Reply::Store(s)
                        }
                        (Op::Delete, Outcome::Deleted(_)) => Reply::Existed(true),
                        (Op::Delete, Outcome::NotFound(_)) => Reply::Existed(false),
                        _ => return Err(ParseError::Unexpected),
                    };
                    answers[j] = Some(Ok(reply));
                    Ok(())
                },
            );
            for (j, answer) in answers.iter_mut().enumerate() {
                let req = &reqs[batch[j]];
                let r = match (answer.take(), &result) {
                    (Some(a), _) => a,
                    // Quiet protocols answer only what did not succeed.
                    (None, Ok(())) => Ok(match req.op {
                        Op::Store(_) => Reply::Store(SetOutcome::Stored),
                        _ => Reply::Existed(true),
                    }),
                    (None, Err(e)) => Err(e.clone()),
                };
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

/// One call made on its own on `c` (pinned to the call's server): a lone caller's call, and
/// the commands a round does not batch (get-and-touch, incr/decr, touch).
fn single(c: &mut Client, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> Result<Reply> {
    let sink = |d: &[u8]| {
        out.clear();
        out.extend_from_slice(d);
    };
    let hit = |info: Option<ItemInfo>| info.map_or(Reply::Miss, Reply::Hit);
    Ok(match op {
        Op::Get { cas } => hit(c.retrieve(get_opts(cas, None), key, sink)?),
        Op::Gat { ttl, cas } => hit(c.retrieve(get_opts(cas, Some(ttl)), key, sink)?),
        Op::Store(o) => Reply::Store(c.store_cmd(key, value, o)?.0),
        Op::Delete => Reply::Existed(c.delete(key)?),
        Op::Arith { decr, delta } => Reply::Number(c.arith(decr, key, delta)?),
        Op::Touch(ttl) => Reply::Existed(c.touch(key, ttl)?),
    })
}

fn get_opts(cas: bool, touch: Option<u32>) -> crate::proto::wire::GetOpts {
    crate::proto::wire::GetOpts {
        cas,
        touch,
        ..Default::default()
    }
}

/// How a wait on a slot ended.
enum Waited {
    Done(Result<Reply>),
    /// Asked to combine.
    Lead,
    TimedOut,
}

impl Engine {
    /// Parks until `slot` is done (its value copied to `out`), its owner is asked to combine,
    /// or `deadline` passes.
    fn wait(&self, slot: u32, deadline: Instant, out: &mut Vec<u8>) -> Waited {
        loop {
            // Read before looking at the slot: a round that completes it after the look
            // moves the generation, and the wait below does not sleep through it.
            let seen = *lock(&self.round);
            let mut d = lock(&self.slots[slot as usize].data);
            if let Some(r) = self.take_done(&mut d, out) {
                drop(d);
                self.release_slot(slot);
                return Waited::Done(r);
            }
            if d.lead {
                d.lead = false;
                return Waited::Lead;
            }
            let parked = match d.waiter {
                Waiter::Round => false,
                Waiter::Thread(_) => true,
                _ => {
                    d.waiter = Waiter::Thread(std::thread::current());
                    true
                }
            };
            drop(d);
            let now = Instant::now();
            if now >= deadline {
                return Waited::TimedOut;
            }
            if parked {
                std::thread::park_timeout(deadline - now);
                continue;
            }
            let g = lock(&self.round);
            if *g == seen {
                drop(
                    self.round_done
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }

    /// The result of a done slot (its value copied to `out` for a hit).
    fn take_done(&self, d: &mut SlotData, out: &mut Vec<u8>) -> Option<Result<Reply>> {
        if d.phase != Phase::Done {
            return None;
        }
        let r = d.result.take().unwrap_or_else(|| {
            Err(Error::Parse {
                server: self.label.clone(),
                error: ParseError::Unexpected,
            })
        });
        if matches!(r, Ok(Reply::Hit(_))) {
            out.clear();
            out.extend_from_slice(&d.value);
        }
        Some(r)
    }
}

impl SharedClient {
    /// The servers, as configured, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.inner.labels
    }

    /// The wire protocol this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.inner.protocol
    }

    /// Validates `key` and picks its engine.
    fn route(&self, key: &[u8]) -> Result<&Arc<Engine>> {
        let (eng, checked) = self.route_unchecked(key)?;
        if !checked {
            self.check_key(key)?;
        }
        Ok(eng)
    }

    /// The key's engine, and whether the key was validated on the way (routing validates;
    /// with one server there is nothing to route, and a direct call validates as a `Client`
    /// call does, so only a queued one needs [`check_key`](Self::check_key)).
    fn route_unchecked(&self, key: &[u8]) -> Result<(&Arc<Engine>, bool)> {
        let inner = &*self.inner;
        if inner.single {
            return Ok((&inner.engines[0], false));
        }
        let server = lock(&inner.router).route_of_key(key)?.server;
        Ok((&inner.engines[server], true))
    }

    /// Validates a key before it is queued: a bad key in a batch would fail everyone's.
    fn check_key(&self, key: &[u8]) -> Result<()> {
        let inner = &*self.inner;
        let ns = &inner.namespace;
        if Key::new(key).is_err() || ns.len() + key.len() > MAX_KEY_LEN {
            // The rare keys (too long, or binary keys over meta): checked as a Client does.
            super::wire_key(ns, key, inner.binary_keys, &mut Vec::new())?;
        }
        Ok(())
    }

    fn check(&self, call: &CallSpec<'_>) -> Result<()> {
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
    fn exec(&self, call: CallSpec<'_>, out: &mut Vec<u8>) -> Result<Reply> {
        self.check(&call)?;
        let (eng, checked) = self.route_unchecked(call.key)?;
        self.exec_on(eng, call, checked, out)
    }

    /// [`exec`](Self::exec) on a given server's engine; `checked`: the key was validated.
    fn exec_on(
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
                        .pinned(server, |c| single(c, call.op, call.key, call.value, out));
                    drop(st);
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
    fn submit_blocking(
        &self,
        eng: &Arc<Engine>,
        call: &CallSpec<'_>,
        start: Instant,
        deadline: Instant,
    ) -> Result<u32> {
        let mut q = lock(&eng.queue);
        loop {
            let waiter = match self.inner.driving {
                IoMode::Combining => Waiter::Thread(std::thread::current()),
                _ => Waiter::Round,
            };
            if let Some(slot) = eng.push(&mut q, call, deadline, waiter) {
                if self.inner.driving != IoMode::Combining {
                    eng.kick_io(&mut q);
                }
                return Ok(slot);
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

    fn slot_timeout(&self, eng: &Engine, start: Instant) -> Error {
        Error::Timeout {
            server: eng.label.clone(),
            during: During::Slot,
            elapsed: start.elapsed(),
        }
    }

    /// Waits for a queued request, combining when asked to (or when the engine is free).
    fn await_slot(
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
                    eng.round(&mut st);
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
const CHUNK: usize = 64;

/// The slots a multi-key call queued and has not awaited yet. Normally none are left when
/// it is dropped; when a caller's callback panics, each is withdrawn (or, if its reply came
/// in, freed), so that no slot is held for ever.
struct Unclaimed<'c> {
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

/// The result of a call that must be a hit or a miss.
fn as_item(r: Reply) -> Result<Option<ItemInfo>> {
    match r {
        Reply::Hit(i) => Ok(Some(i)),
        Reply::Miss => Ok(None),
        _ => Err(unexpected()),
    }
}

fn unexpected() -> Error {
    Error::Parse {
        server: String::new(),
        error: ParseError::Unexpected,
    }
}

fn stored(r: Reply) -> Result<SetOutcome> {
    match r {
        Reply::Store(s) => Ok(s),
        _ => Err(unexpected()),
    }
}

fn existed(r: Reply) -> Result<bool> {
    match r {
        Reply::Existed(b) => Ok(b),
        _ => Err(unexpected()),
    }
}

fn number(r: Reply) -> Result<Option<u64>> {
    match r {
        Reply::Number(n) => Ok(n),
        _ => Err(unexpected()),
    }
}

fn cas_result(s: SetOutcome) -> CasResult {
    match s {
        SetOutcome::Stored => CasResult::Stored,
        SetOutcome::Exists => CasResult::Exists,
        SetOutcome::NotFound | SetOutcome::NotStored => CasResult::NotFound,
    }
}

fn set_ok(s: SetOutcome) -> Result<()> {
    match s {
        SetOutcome::Stored => Ok(()),
        _ => Err(Error::Server {
            kind: ServerErrorKind::Server,
            message: "set answered NOT_STORED".into(),
        }),
    }
}

fn store_op(mode: StoreMode, opts: SetOptions, cas: Option<u64>) -> Op {
    Op::Store(StoreOpts {
        cas,
        ..super::store_opts(mode, opts)
    })
}

fn spec<'a>(op: Op, key: &'a [u8], value: &'a [u8]) -> CallSpec<'a> {
    CallSpec { op, key, value }
}

/// Blocking calls: as [`Client`]'s, on `&self`, from any number of threads.
impl SharedClient {
    fn item(&self, op: Op, key: &[u8]) -> Result<Option<Item>> {
        let mut value = Vec::new();
        let info = as_item(self.exec(spec(op, key, &[]), &mut value)?)?;
        Ok(info.map(|ItemInfo { flags, cas }| Item { value, flags, cas }))
    }

    /// Gets a value. `None` on a miss. Errors as [`Client::get`], and [`Error::Timeout`]
    /// when the call's deadline passes while it waits for its turn or a free slot.
    pub fn get(&self, key: &[u8]) -> Result<Option<Item>> {
        self.item(Op::Get { cas: false }, key)
    }

    /// Gets a value with its CAS unique. Errors as [`get`](Self::get).
    pub fn gets(&self, key: &[u8]) -> Result<Option<Item>> {
        self.item(Op::Get { cas: true }, key)
    }

    /// Get-and-touch. Errors as [`get`](Self::get).
    pub fn gat(&self, key: &[u8], ttl: u32) -> Result<Option<Item>> {
        self.item(Op::Gat { ttl, cas: false }, key)
    }

    /// Get-and-touch with the CAS unique. Errors as [`get`](Self::get).
    pub fn gats(&self, key: &[u8], ttl: u32) -> Result<Option<Item>> {
        self.item(Op::Gat { ttl, cas: true }, key)
    }

    /// Gets a value into `buf` (cleared first): no allocation once `buf` and the client's
    /// buffers have grown to fit. Errors as [`get`](Self::get).
    pub fn get_into(&self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        as_item(self.exec(spec(Op::Get { cas: false }, key, &[]), buf)?)
    }

    /// [`get_into`](Self::get_into) with the CAS unique.
    pub fn gets_into(&self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        as_item(self.exec(spec(Op::Get { cas: true }, key, &[]), buf)?)
    }

    fn store_call(&self, op: Op, key: &[u8], value: &[u8]) -> Result<SetOutcome> {
        stored(self.exec(spec(op, key, value), &mut Vec::new())?)
    }

    /// Runs a storage command: `Ok(true)` if stored. Errors as [`Client::store`].
    pub fn store(
        &self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<bool> {
        let s = self.store_call(store_op(mode, opts, None), key, value)?;
        Ok(s == SetOutcome::Stored)
    }

    /// Stores a value unconditionally. Errors as [`Client::set`].
    pub fn set(&self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        set_ok(self.store_call(store_op(StoreMode::Set, opts, None), key, value)?)
    }

    /// Stores only if absent. Errors as [`Client::add`].
    pub fn add(&self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool> {
        self.store(StoreMode::Add, key, value, opts)
    }

    /// Stores only if present. Errors as [`Client::replace`].
    pub fn replace(&self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool> {
        self.store(StoreMode::Replace, key, value, opts)
    }

    /// Appends to an existing value. Errors as [`Client::append`].
    pub fn append(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.store(StoreMode::Append, key, value, SetOptions::default())
    }

    /// Prepends to an existing value. Errors as [`Client::prepend`].
    pub fn prepend(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.store(StoreMode::Prepend, key, value, SetOptions::default())
    }

    /// Stores only if the CAS unique is still `cas`. Errors as [`Client::cas`].
    pub fn cas(&self, key: &[u8], value: &[u8], cas: u64, opts: SetOptions) -> Result<CasResult> {
        let op = store_op(StoreMode::Set, opts, Some(cas));
        Ok(cas_result(self.store_call(op, key, value)?))
    }

    /// Deletes a key; `false` if it did not exist. Errors as [`get`](Self::get).
    pub fn delete(&self, key: &[u8]) -> Result<bool> {
        existed(self.exec(spec(Op::Delete, key, &[]), &mut Vec::new())?)
    }

    /// Adds `delta`; `None` if the key does not exist. Errors as [`Client::incr`].
    pub fn incr(&self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        let op = Op::Arith { decr: false, delta };
        number(self.exec(spec(op, key, &[]), &mut Vec::new())?)
    }

    /// Subtracts `delta`, stopping at 0. Errors as [`Client::incr`].
    pub fn decr(&self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        let op = Op::Arith { decr: true, delta };
        number(self.exec(spec(op, key, &[]), &mut Vec::new())?)
    }

    /// Sets a new expiration; `false` if the item does not exist. Errors as [`get`](Self::get).
    pub fn touch(&self, key: &[u8], ttl: u32) -> Result<bool> {
        existed(self.exec(spec(Op::Touch(ttl), key, &[]), &mut Vec::new())?)
    }

    /// Queues every call of `calls` (in chunks, so that one caller never takes every slot of
    /// a server) and hands each result to `on(index, result, value)`, the value being a
    /// hit's. Queued together, the calls share batches with each other and with concurrent
    /// callers.
    fn each_queued<'k>(
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
            for j in first..end {
                let c = call(j);
                let r = self
                    .check(&c)
                    .and_then(|()| self.route(c.key))
                    .and_then(|eng| {
                        let slot = self.submit_blocking(eng, &c, start, deadline)?;
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
            for j in first..end {
                let (server, slot) = queued[j - first];
                if slot == NONE {
                    continue;
                }
                // Claimed before `on` runs: if it panics, the guard gives back the rest.
                queued[j - first] = (NONE, NONE);
                let eng = &self.inner.engines[server as usize];
                let r = self.await_slot(eng, slot, start, deadline, &mut value);
                on(j, r, &value);
            }
        }
    }

    /// Gets many keys, calling `found(key, item)` for each hit; each key is queued as a get
    /// of its own, so the keys of concurrent callers share multi-gets. Errors: the first
    /// failed key's error (the hits of the others are still delivered).
    pub fn get_multi<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(false, keys, found)
    }

    /// [`get_multi`](Self::get_multi) with CAS uniques.
    pub fn gets_multi<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(true, keys, found)
    }

    fn retrieve_multi<K: AsRef<[u8]>>(
        &self,
        cas: bool,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        let mut first_error = None;
        let call = |j: usize| spec(Op::Get { cas }, keys[j].as_ref(), &[]);
        self.each_queued(keys.len(), call, |j, r, value| match r {
            Ok(Reply::Hit(info)) => {
                let item = ItemRef {
                    value,
                    flags: info.flags,
                    cas: info.cas,
                };
                found(keys[j].as_ref(), item);
            }
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        });
        first_error.map_or(Ok(()), Err)
    }

    /// Stores many items (each queued as a set of its own: concurrent callers' sets share
    /// batches); returns how many were stored. Errors: the first failed item's error (the
    /// others are still stored).
    pub fn set_multi<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
        opts: SetOptions,
    ) -> Result<usize> {
        let op = store_op(StoreMode::Set, opts, None);
        let call = |j: usize| spec(op, items[j].0.as_ref(), items[j].1.as_ref());
        self.count_multi(items.len(), call, |r| {
            matches!(r, Reply::Store(SetOutcome::Stored))
        })
    }

    /// Deletes many keys; returns how many existed. Errors as [`set_multi`](Self::set_multi).
    pub fn delete_multi<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<usize> {
        let call = |j: usize| spec(Op::Delete, keys[j].as_ref(), &[]);
        self.count_multi(keys.len(), call, |r| matches!(r, Reply::Existed(true)))
    }

    fn count_multi<'k>(
        &self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        counts: impl Fn(Reply) -> bool,
    ) -> Result<usize> {
        let (mut done, mut first_error) = (0, None);
        self.each_queued(n, call, |_, r, _| match r {
            Ok(reply) => done += usize::from(counts(reply)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        });
        first_error.map_or(Ok(done), Err)
    }

    /// Runs `f` on `key`'s server connection, lent for the call (meta calls, which the
    /// rounds do not batch).
    fn on_key_server<T>(&self, key: &[u8], f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let server = self.route_of_key(key)?.server;
        let mut c = self.lend_for(server);
        c.pinned(server, f)
    }

    /// Meta get with leases and item metadata (meta protocol). Errors as
    /// [`Client::meta_get`]. Made on the key's server connection, not batched.
    pub fn meta_get(
        &self,
        key: &[u8],
        opts: super::MetaGetOptions,
        buf: &mut Vec<u8>,
    ) -> Result<Option<super::MetaItemInfo>> {
        self.on_key_server(key, |c| c.meta_get(key, opts, buf))
    }

    /// Marks an item stale (meta protocol). Errors as [`Client::invalidate`].
    pub fn invalidate(&self, key: &[u8], stale_ttl: Option<u32>) -> Result<bool> {
        self.on_key_server(key, |c| c.invalidate(key, stale_ttl))
    }

    /// A meta storage command (meta protocol). Errors as [`Client::meta_set`].
    pub fn meta_set(
        &self,
        key: &[u8],
        value: &[u8],
        opts: super::MetaSetOptions,
    ) -> Result<super::MetaSetResult> {
        self.on_key_server(key, |c| c.meta_set(key, value, opts))
    }

    /// The server's debug line for an item (meta protocol). Errors as [`Client::meta_debug`].
    pub fn meta_debug(&self, key: &[u8]) -> Result<Option<String>> {
        self.on_key_server(key, |c| c.meta_debug(key))
    }

    /// The server `key` goes to right now (after ejections), as configured.
    pub fn server_for_key(&self, key: &[u8]) -> Result<String> {
        let server = self.route_of_key(key)?.server;
        Ok(self.inner.labels[server].clone())
    }

    fn admin<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        f(&mut lock(&self.inner.admin))
    }

    /// Invalidates every item on every server. Errors as [`Client::flush_all`].
    pub fn flush_all(&self, delay: Option<u32>) -> Result<()> {
        self.admin(|c| c.flush_all(delay))
    }

    /// Invalidates every item on one server. Errors as [`Client::flush_server`].
    pub fn flush_server(&self, server: &str, delay: Option<u32>) -> Result<()> {
        self.admin(|c| c.flush_server(server, delay))
    }

    /// Sets the servers' verbosity. Errors as [`Client::verbosity`].
    pub fn verbosity(&self, level: u32) -> Result<()> {
        self.admin(|c| c.verbosity(level))
    }

    /// Each server's version. Errors as [`Client::version`].
    pub fn version(&self) -> Result<Vec<(String, String)>> {
        self.admin(Client::version)
    }

    /// Each server's statistics. Errors as [`Client::stats`].
    pub fn stats(&self, arg: Option<&str>) -> Result<Vec<ServerStats>> {
        self.admin(|c| c.stats(arg))
    }

    /// Each server's counters (of the calls made through the shared connections).
    pub fn server_counters(&self) -> Vec<(String, super::ServerCounters)> {
        self.inner
            .engines
            .iter()
            .map(|e| {
                let st = lock(&e.state);
                st.client.server_counters().swap_remove(e.server)
            })
            .collect()
    }
}

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

/// A client lent for calls that must follow each other on one connection (the storage's
/// fill protocol: a CAS unique is only good on the connection's server process); see
/// [`SharedClient::lend_for`]. Batched calls for that server wait meanwhile, then resume.
pub(crate) struct Lent<'a>(LentClient<'a>);

enum LentClient<'a> {
    Engine(Option<MutexGuard<'a, State>>, &'a Arc<Engine>),
    Admin(MutexGuard<'a, Client>),
}

impl std::ops::Deref for Lent<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        match &self.0 {
            LentClient::Engine(g, _) => &g.as_ref().expect("held until dropped").client,
            LentClient::Admin(g) => g,
        }
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        match &mut self.0 {
            LentClient::Engine(g, _) => &mut g.as_mut().expect("held until dropped").client,
            LentClient::Admin(g) => g,
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let LentClient::Engine(g, engine) = &mut self.0 {
            drop(g.take());
            // What queued while it was lent is served now.
            engine.hand_off();
        }
    }
}

/// What the storage layer needs beyond the public calls.
impl SharedClient {
    /// Whether the protocol has leases (meta).
    pub(crate) fn has_leases(&self) -> bool {
        self.inner.protocol.supports(Capability::Meta)
    }

    /// Where `key` goes now, and its own server (see `Client::route_of_key`).
    pub(crate) fn route_of_key(&self, key: &[u8]) -> Result<super::Route> {
        lock(&self.inner.router).route_of_key(key)
    }

    /// Server `server`'s engine client, for calls that must share its connection: the
    /// connection batched calls use, held exclusively until the lent client is dropped.
    pub(crate) fn lend_for(&self, server: usize) -> Lent<'_> {
        let engine = &self.inner.engines[server];
        Lent(LentClient::Engine(Some(lock(&engine.state)), engine))
    }

    /// The client for server-wide and multi-server maintenance (replays, flushes).
    pub(crate) fn lend_admin(&self) -> Lent<'_> {
        Lent(LentClient::Admin(lock(&self.inner.admin)))
    }

    /// A get on server `server` (wherever the ring would send `key` now), batched with
    /// concurrent calls: the storage's warm reads, kept on the server its route checks
    /// approved.
    pub(crate) fn get_on(
        &self,
        server: usize,
        key: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<Option<ItemInfo>> {
        buf.clear();
        let eng = &self.inner.engines[server];
        as_item(self.exec_on(eng, spec(Op::Get { cas: false }, key, &[]), true, buf)?)
    }
}
