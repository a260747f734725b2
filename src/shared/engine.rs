//! A server's engine: its connections (each a pinned [`Client`], a lane), the queue of
//! requests, the request slots, and how callers wait for them.
//!
//! # Pipelined rounds
//!
//! A lane's I/O thread serves the queue in rounds ([`Engine::pipeline`]): it writes a round
//! and, while fewer than the pipeline depth are unread, writes each round that queued
//! meanwhile behind it before reading. It reads the replies in order, each round's by its
//! own chain reader; a caller that queues while it reads with room for another round wakes
//! it through the lane's `mio` waker (`reading`, [`Engine::kick_io`]). The lane's `state`
//! stays held until every round written is read: nobody else touches a connection with
//! replies in flight.
//!
//! Why no call gets another call's reply: a round's chain reader takes exactly its own reply
//! units (each part up to its end marker, each item matched by its opaque range, or in order
//! and by key on text), so the next round's reader starts at the first byte of that round's
//! replies; a unit that answers nothing in the part being read is a framing error, after
//! which the connection is closed and every round unread on it fails (never re-synchronised).
//! A round is read only on the connection it was written on (`Sent::conn`): after a
//! reconnect, the rounds written on the old one fail unread. A connection closed for a doubt
//! with rounds unread is first drained to the server's EOF (`Driver::drain_close`, up to the
//! round's deadline), so those calls, failed as "may or may not have run", do not run after
//! the calls made next. Rounds behind a timeout are not drained (the server is not
//! answering): like any call that timed out, they may still run when it resumes.
//!
//! # Direct calls
//!
//! A lone async caller (no other call in flight, nothing queued) that finds a lane free,
//! with nothing unread on it, writes its request from its future's `poll` as a round of
//! one ([`Engine::direct`]) and lets go of the lane with the reply unread (`pending`). The
//! lane's I/O thread, idle in a poll of its own that watches that connection's socket
//! ([`Idle`]), wakes on the reply, reads it and completes the slot: one thread crossing per
//! call instead of two. This bends the rule above (a lane let go with a reply in flight)
//! in one way only: whoever takes a lane reads what is unread on it first
//! ([`Engine::settle`], [`Engine::round`]), so the next exchange still starts on a clean
//! stream. A direct call is written only on the connection the I/O thread watches
//! (`Idle::watched`, changed only under the lane), and that thread wakes at least once per
//! timeout, so a frozen server fails it by its deadline. While the thread holds its lane it
//! holds task wakes back (`HELD_WAKES`): a task woken on the same core would run at once
//! and find the lane taken.
//!
//! # Lock order
//!
//! The locks: per server and connection `state` (a lane: the engine's client on one
//! connection and a round's working space; see [`Engine::lanes`]),
//! `queue`, `round` (the generation threads wait on with `round_done`) and one `data` mutex
//! per slot; per shared client `router` and `admin` (in `Inner`). The condvars pair with
//! them: `io` and `space` with `queue`, `round_done` with `round`.
//!
//! A lock may be taken while holding only locks to its left:
//!
//! ```text
//! state  ->  queue  ->  slot data
//!   |
//!   +-> round        (router, admin: leaves, see below)
//! ```
//!
//! Where two are held at once (every such place):
//! - `state -> queue`: [`Engine::round`] takes the queue to swap its requests out, and again
//!   to free the slots of abandoned requests, while the round holds `state`.
//! - `state -> slot`: a round completes slots ([`Engine::complete`]) while holding `state`;
//!   so does a caller serving a round in [`SharedClient::await_slot`](super::SharedClient).
//! - `state -> round`: a round bumps the generation ([`Engine::wake_round`]) under `state`.
//! - `queue -> slot`: [`Engine::push`] (a request queued in a free slot),
//!   [`Engine::abandon`] (withdraw or mark abandoned), [`Engine::hand_off`] (ask the head's
//!   owner to lead).
//! - `state -> queue -> slot`: a direct call ([`Engine::direct`]) takes a free slot and
//!   fills it while holding its lane (taken with `try_lock`, holding nothing else).
//! - `state -> router`: a lent engine client ([`Lent`](super::Lent)) holds `state` while the
//!   storage works; if it routes with the shared client meanwhile, it takes `router`.
//! - `admin -> router`: the storage's replays hold the lent admin client and ask the router
//!   where each key's copies are.
//!
//! Why there is no cycle: nothing takes `state` while holding another of these locks (nor
//! another lane's `state`: whoever visits every lane holds one at a time). The
//! I/O thread lets go of `queue` before it takes `state`; a direct call or a combiner takes
//! `state` with `try_lock` only, holding nothing else, and calls [`Engine::hand_off`] (which
//! takes `queue`) after letting go of `state`. Nothing takes `queue` while holding a slot:
//! [`Engine::release_slot`] lets go of the slot first, and [`Engine::wait`] and the futures
//! drop the slot before [`Engine::abandon`]. `round` and the slot locks are leaves: nothing
//! is taken under them ([`Engine::wait`] reads `round` and lets go before it looks at the
//! slot). `router` is a leaf, and `admin` one but for `router`: under them only a `Client`'s
//! own code runs, which takes none of these locks.
//!
//! Not locks, but run under them: a task's waker is woken under `queue` when a slot frees
//! ([`Engine::free`]) and under `state` when a reply completes its slot (after the slot's
//! lock is let go). A waker must not block on this client, as wakers never should.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::task::Waker;
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::round::Work;
use crate::client::Client;
pub(super) use crate::command::{CallSpec, Op, Reply};
use crate::engine::batch::Sent;
use crate::error::{Error, Result};
use crate::observe::EngineMetrics;
use crate::proto::ParseError;
use std::collections::VecDeque;

/// One server's connections and what is queued for them.
pub(super) struct Engine {
    pub(super) server: usize,
    pub(super) label: String,
    pub(super) timeout: Duration,
    /// The lanes, one per connection to the server
    /// ([`SharedClientBuilder::connections_per_server`](super::SharedClientBuilder)), each
    /// held by whoever combines on it: its client (connection) and a round's working space.
    /// They share the queue: a lane whose round is on the wire leaves what queues meanwhile
    /// to the next lane, so up to one round per lane is in flight. Lane 0 is the one
    /// lending and the counters start from.
    pub(super) lanes: Box<[Mutex<State>]>,
    pub(super) queue: Mutex<Queue>,
    /// Wakes the I/O thread (with `queue`).
    pub(super) io: Condvar,
    /// Requests in the queue (read without its lock by a lone caller's fast path).
    pub(super) queued: AtomicUsize,
    /// The I/O thread is serving rounds (not asleep on `io`). An adaptive caller then queues
    /// even if it finds the queue empty: a direct call between two rounds would hold the
    /// connection for a round trip of one request while the others wait behind it.
    pub(super) io_busy: AtomicBool,
    /// Bumped after a batch completed requests of [`Waiter::Round`] threads, which wait on
    /// `round_done`: one `notify_all` (one syscall) wakes a batch's threads, where waking each
    /// would cost one apiece.
    pub(super) round: Mutex<u64>,
    pub(super) round_done: Condvar,
    /// A completed request's owner waits on `round_done`.
    pub(super) round_waiting: AtomicBool,
    /// Wakes blocking callers waiting for a free slot (with `queue`).
    pub(super) space: Condvar,
    pub(super) slots: Box<[Slot]>,
    /// Per lane, when its round on the wire started ([`since_epoch`] nanoseconds; 0:
    /// none): a read with copies treats a server whose round has run far longer than usual
    /// as slow.
    pub(super) busy_since: Box<[AtomicU64]>,
    /// Per lane, its I/O thread is reading pipelined replies with room for another round:
    /// a request queued meanwhile wakes it with the lane's waker (see `pipeline`).
    reading: Box<[AtomicBool]>,
    /// Callers waiting for lane 0 to be lent ([`SharedClient::lend_for`](super::SharedClient)):
    /// its I/O thread then stops writing rounds and lets go of the lane once the rounds it
    /// wrote are read, so a busy pipeline cannot keep the lane from them.
    pub(super) lenders: AtomicUsize,
    /// Per lane, what interrupts its pipelined reads (none without pipelining, or if it
    /// could not be made: rounds then wait for the read in progress).
    wakers: Box<[Option<Arc<mio::Waker>>]>,
    /// Per lane, what its I/O thread waits on when idle (set when the thread starts, if its
    /// poll could be made; else it waits on `io`): see [`Idle`].
    idle: Box<[OnceLock<Idle>]>,
    /// Direct rounds written so far (see [`direct`](Self::direct)).
    pub(super) directs: AtomicU64,
    /// Its queue's and rounds' metrics (feature `metrics`).
    metrics: EngineMetrics,
}

/// A pipelined connection with nothing in flight splits a queue of at least this many
/// requests into two rounds (see `Engine::take`).
const SPLIT_MIN: usize = 4;

/// ... and of at most this many: past it, rounds are large enough to keep the server busy, and
/// each round costs its waiters a wake (threads waiting on `round_done` are all woken).
const SPLIT_MAX: usize = 32;

/// Another round is written behind those unread (and a read interrupted for it) only while
/// fewer requests than this are in flight on the connection: past it, the server is busy
/// anyway, and more rounds would only add wakes and syscalls.
pub(super) const INTERRUPT_MAX: usize = 64;

/// An idle I/O thread's wait, shared with the callers. The thread waits in a poll of its
/// own on two things: `waker` (a call queued) and its lane's socket, readable. The socket is
/// there for [direct rounds](Engine::direct): a lone async caller that finds the lane free
/// writes its request from `poll` itself and leaves the lane, round unread; the reply
/// wakes this thread, which reads it. A call crosses threads once (the reply's wake)
/// instead of twice, and nobody wakes the I/O thread to write.
pub(super) struct Idle {
    waker: mio::Waker,
    /// The connection whose socket the thread's poll watches (0: none): a direct round is
    /// written only on it, so that its reply wakes the thread.
    watched: AtomicU64,
    /// The thread is waiting (or about to) in its poll: a queued call wakes it with
    /// `waker`. Written under `queue`.
    polling: AtomicBool,
    /// Async callers would write direct rounds: the thread's poll watches the socket (set
    /// by them, cleared by a blocking call made directly).
    want: AtomicBool,
}

/// The largest request (key and value) a [direct round](Engine::direct) writes: far below
/// what a socket takes without waiting, even with a frozen server's buffers filling.
const DIRECT_MAX: usize = 4096;

/// The idle poll's tokens.
const IDLE_WAKE: mio::Token = mio::Token(0);
const IDLE_SOCKET: mio::Token = mio::Token(1);

/// What an I/O thread owns of its idle wait (see [`Idle`]).
struct IdlePoll {
    poll: mio::Poll,
    events: mio::Events,
    /// The socket registered in `poll`, if any.
    registered: Option<std::os::fd::RawFd>,
}

/// Nanoseconds since the first call of this process: a clock an atomic can hold.
pub(super) fn since_epoch(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    (at.saturating_duration_since(epoch).as_nanos() as u64).max(1)
}

/// A queued request: its key and value live in the queue's arena.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) op: Op,
    pub(super) key: Range<usize>,
    pub(super) value: Range<usize>,
    pub(super) slot: u32,
    pub(super) deadline: Instant,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) reqs: Vec<Req>,
    pub(super) arena: Vec<u8>,
    pub(super) free: Vec<u32>,
    /// Async callers waiting for a free slot.
    pub(super) space_wakers: Vec<Waker>,
    /// Blocking callers waiting on `space`.
    pub(super) space_waiting: usize,
    /// I/O threads started (one per lane at most, lanes `0..io_threads`), and how many of
    /// them wait on `io`.
    pub(super) io_threads: usize,
    pub(super) io_idle: usize,
    pub(super) shutdown: bool,
}

pub(super) enum Waiter {
    None,
    /// A parked thread, woken by itself (combining: it may be asked to lead).
    Thread(Thread),
    /// A thread waiting on its engine's round condition: one wake per batch for all of them.
    Round,
    Task(Waker),
}

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Free,
    /// Queued or on the wire, owner waiting.
    Pending,
    /// The reply is in; the owner has not taken it yet.
    Done,
    /// The owner gave up while the request was on the wire: the reply frees the slot.
    Abandoned,
}

pub(super) struct SlotData {
    pub(super) phase: Phase,
    /// The owner is asked to combine (it was queued first when a combiner let go).
    pub(super) lead: bool,
    pub(super) result: Option<Result<Reply>>,
    pub(super) value: Vec<u8>,
    pub(super) waiter: Waiter,
}

pub(super) struct Slot {
    pub(super) data: Mutex<SlotData>,
}

thread_local! {
    /// The task wakes an I/O thread holds back while it holds its lane: a task woken on
    /// the same core may run at once, and would find the lane taken (a direct round then
    /// queues instead, and contends for the locks the thread still holds). Released before
    /// the thread blocks on a read and once it lets go of the lane.
    static HELD_WAKES: std::cell::RefCell<Option<Vec<Waker>>> =
        const { std::cell::RefCell::new(None) };
}

/// Wakes a task, now or (on an I/O thread) once its lane is let go.
fn wake_task(w: Waker) {
    let now = HELD_WAKES.with(|h| match &mut *h.borrow_mut() {
        Some(held) => {
            held.push(w);
            None
        }
        None => Some(w),
    });
    if let Some(w) = now {
        // A task's waker is the caller's code: if it panics, the panic (already reported
        // by the hook) stays here, and the round goes on serving everyone else.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
    }
}

/// Wakes the tasks held back (see `HELD_WAKES`), keeping the list's room.
fn release_wakes() {
    let mut held = HELD_WAKES.with(|h| h.borrow_mut().as_mut().map(std::mem::take));
    let Some(list) = held.as_mut() else { return };
    for w in list.drain(..) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
    }
    HELD_WAKES.with(|h| {
        if let Some(slot) = &mut *h.borrow_mut() {
            if slot.capacity() < list.capacity() {
                std::mem::swap(slot, list);
            }
        }
    });
}

/// A lane, if free.
fn try_lane(l: &Mutex<State>) -> Option<MutexGuard<'_, State>> {
    match l.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Locks, ignoring poisoning: every critical section here leaves its data consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// An engine on `clients`, one per lane (at least one).
    pub(super) fn new(
        server: usize,
        clients: Vec<Client>,
        slots: usize,
        timeout: Duration,
        depth: usize,
    ) -> Engine {
        let label = clients[0].label_list()[server].clone();
        let metrics = EngineMetrics::new(&label);
        let busy_since = clients.iter().map(|_| AtomicU64::new(0)).collect();
        let reading = clients.iter().map(|_| AtomicBool::new(false)).collect();
        let lanes = clients.len();
        let mut clients = clients;
        let wakers = (clients.iter_mut())
            .map(|c| (depth > 1).then(|| c.engine().0.waker().ok()).flatten())
            .collect();
        let queue = Queue {
            free: (0..slots as u32).rev().collect(),
            ..Queue::default()
        };
        Engine {
            server,
            label,
            timeout,
            lanes: (clients.into_iter().enumerate())
                .map(|(lane, client)| {
                    Mutex::new(State {
                        client,
                        works: (0..depth).map(|_| Work::default()).collect(),
                        pending: VecDeque::with_capacity(depth),
                        lane,
                    })
                })
                .collect(),
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
            busy_since,
            reading,
            wakers,
            idle: (0..lanes).map(|_| OnceLock::new()).collect(),
            directs: AtomicU64::new(0),
            lenders: AtomicUsize::new(0),
            metrics,
        }
    }

    /// How long the oldest round on the wire has run, if one is.
    pub(super) fn busy_for(&self, now: Instant) -> Option<Duration> {
        let at = (self.busy_since.iter())
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|&at| at != 0)
            .min()?;
        Some(Duration::from_nanos(since_epoch(now).saturating_sub(at)))
    }

    /// Request slots in use (queued or on the wire).
    pub(super) fn in_use(&self, q: &Queue) -> usize {
        self.slots.len() - q.free.len()
    }

    /// Whether its rounds are pipelined (a depth over 1).
    pub(super) fn pipelined(&self) -> bool {
        !self.wakers.is_empty() && self.wakers[0].is_some()
    }

    /// A free lane, if one is (the lowest), with nothing unread on its connection (a
    /// direct round left there is read first: see [`settle`](Self::settle)).
    pub(super) fn try_state(&self) -> Option<MutexGuard<'_, State>> {
        let mut st = self.lanes.iter().find_map(try_lane)?;
        self.settle(&mut st);
        Some(st)
    }

    /// Lane `lane`, waited for, with nothing unread on its connection.
    pub(super) fn lock_lane(&self, lane: usize) -> MutexGuard<'_, State> {
        let mut st = lock(&self.lanes[lane]);
        self.settle(&mut st);
        st
    }

    /// Reads the rounds written and unread on a lane's connection (a [direct
    /// round](Self::direct)'s, left for the I/O thread), completing their requests: whoever
    /// takes a lane must not find replies owed to others on its connection.
    pub(super) fn settle(&self, st: &mut State) {
        if st.pending.is_empty() {
            return;
        }
        let State {
            client,
            works,
            pending,
            lane,
        } = st;
        client.pinned(self.server, |c| self.read_all(c, works, pending));
        self.busy_since[*lane].store(0, Ordering::Relaxed);
    }

    /// Whether an I/O thread is serving rounds (not asleep on `io`).
    fn set_io_busy(&self, q: &Queue) {
        self.io_busy
            .store(q.io_threads > q.io_idle, Ordering::Relaxed);
    }

    /// Queues a request in a free slot for an owner waiting as `waiter`, or `None` if no
    /// slot is free.
    pub(super) fn push(
        &self,
        q: &mut Queue,
        call: &CallSpec<'_>,
        deadline: Instant,
        waiter: Waiter,
    ) -> Option<u32> {
        let slot = q.free.pop()?;
        self.metrics.in_flight(self.slots.len() - q.free.len());
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

    /// Makes sure an I/O thread looks at the queue: an idle one, else a new lane's (while
    /// every lane started is busy and one is left), else the busy ones take it after their
    /// rounds.
    pub(super) fn kick_io(self: &Arc<Self>, q: &mut Queue) {
        if q.io_idle > 0 {
            self.wake_idle(q);
        } else if let Some(lane) = (self.reading.iter())
            .position(|r| r.load(Ordering::SeqCst) && r.swap(false, Ordering::SeqCst))
        {
            // A lane reading pipelined replies with room for another round: interrupted
            // to write this one (one wake per read).
            if let Some(w) = &self.wakers[lane] {
                let _ = w.wake();
            }
        } else if q.io_threads < self.lanes.len() {
            let lane = q.io_threads;
            q.io_threads += 1;
            let engine = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("mcstore-io-{}", self.server))
                .spawn(move || engine.io_thread(lane));
            if spawned.is_err() {
                q.io_threads -= 1;
            }
        }
    }

    /// Wakes one idle I/O thread (`q.io_idle` > 0): one in its idle poll, else one waiting
    /// on `io`.
    fn wake_idle(&self, q: &Queue) {
        let _ = q;
        let polling =
            (self.idle.iter().filter_map(OnceLock::get)).find(|i| i.polling.load(Ordering::SeqCst));
        match polling {
            Some(idle) => {
                idle.polling.store(false, Ordering::SeqCst);
                let _ = idle.waker.wake();
            }
            None => self.io.notify_one(),
        }
    }

    /// Tells every I/O thread to end (the client is gone); `q` is the queue, locked.
    pub(super) fn shut_down(&self, mut q: MutexGuard<'_, Queue>) {
        q.shutdown = true;
        drop(q);
        for idle in self.idle.iter().filter_map(OnceLock::get) {
            let _ = idle.waker.wake();
        }
        self.io.notify_all();
    }

    /// A caller waiting for a free slot gives up (`w` was its waker): its wake may have
    /// been spent on it, so it is passed on.
    pub(super) fn forget_space_waker(&self, w: &Waker) {
        let mut q = lock(&self.queue);
        q.space_wakers.retain(|x| !x.will_wake(w));
        if !q.free.is_empty() {
            if let Some(next) = q.space_wakers.pop() {
                next.wake();
            }
        }
    }

    /// Gives a slot back.
    pub(super) fn free(&self, q: &mut Queue, slot: u32) {
        q.free.push(slot);
        self.metrics.in_flight(self.slots.len() - q.free.len());
        if let Some(w) = q.space_wakers.pop() {
            w.wake();
        } else if q.space_waiting > 0 {
            self.space.notify_one();
        }
    }

    /// The owner of `slot` stops waiting: withdraws the request if still queued, or leaves
    /// the slot to be freed by its reply. True if the reply came in meanwhile (the owner
    /// takes it as usual).
    pub(super) fn abandon(&self, slot: u32) -> bool {
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
    pub(super) fn release_slot(&self, slot: u32) {
        {
            let mut d = lock(&self.slots[slot as usize].data);
            d.phase = Phase::Free;
            d.waiter = Waiter::None;
        }
        let mut q = lock(&self.queue);
        self.free(&mut q, slot);
    }

    /// After a combiner let go of the client: someone must serve what is queued.
    pub(super) fn hand_off(self: &Arc<Self>) {
        // Read after the engine was let go: a request queued before that is counted here
        // (its owner counted it, then failed to get the engine), one queued after finds the
        // engine free.
        if self.queued.load(Ordering::SeqCst) == 0 {
            return;
        }
        let q = lock(&self.queue);
        let Some(head) = q.reqs.first() else { return };
        if q.io_threads > 0 {
            if q.io_idle > 0 {
                self.wake_idle(&q);
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
    pub(super) fn wake_round(&self) {
        if self.round_waiting.swap(false, Ordering::SeqCst) {
            *lock(&self.round) += 1;
            self.round_done.notify_all();
        }
    }

    /// Delivers a result to `slot` (and the value, for a hit): wakes its owner, or frees it
    /// if the owner is gone.
    pub(super) fn complete(
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
            Waiter::Task(w) => wake_task(w),
            Waiter::None => {}
        }
    }

    /// Reads every round written and unread on `c`'s connection, oldest first, completing
    /// their requests.
    fn read_all(
        &self,
        c: &mut Client,
        works: &mut [Work],
        pending: &mut VecDeque<(usize, Sent, u64)>,
    ) {
        while let Some((p, mut sent, _)) = pending.pop_front() {
            // Not across a read (an I/O thread's held wakes).
            release_wakes();
            while !works[p].recv(self, c, &mut sent, pending.is_empty()) {}
            self.finish(&mut works[p]);
        }
    }

    /// Runs one round: takes everything queued and serves it. Returns false if nothing was
    /// queued. `pipelined` (the I/O thread, with a pipeline depth over 1): rounds then
    /// follow each other on the connection without waiting for the replies of those
    /// before them, until the queue is empty and every reply read (see
    /// [`pipeline`](Self::pipeline)).
    pub(super) fn round(&self, st: &mut State, pipelined: bool) -> bool {
        let pipelined = pipelined && st.works.len() > 1;
        if !pipelined {
            // A direct round unread is read before this round goes out on its own.
            self.settle(st);
        }
        let State {
            client,
            works,
            pending,
            lane,
        } = st;
        let busy = &self.busy_since[*lane];
        let server = self.server;
        // The lowest work no unread round holds (the first, but behind a direct round).
        let w = (0..works.len())
            .find(|&w| pending.iter().all(|(p, ..)| *p != w))
            .expect("a work is free: rounds are read before the pipeline is deep");
        // A round that connects is not split: a refused connect would count twice. Nor one
        // behind a direct round: something is in flight.
        let split = pipelined && pending.is_empty() && client.engine().0.is_connected(server);
        let took = self.take(&mut works[w], split);
        if !took && pending.is_empty() {
            return false;
        }
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.pinned(server, |c| {
                if pipelined {
                    self.pipeline(c, works, pending, *lane, took.then_some(w));
                } else {
                    busy.store(since_epoch(Instant::now()), Ordering::Relaxed);
                    release_wakes();
                    works[0].serve(self, c);
                    busy.store(0, Ordering::Relaxed);
                    self.finish(&mut works[0]);
                }
            })
        }));
        if let Err(panic) = served {
            // A panic mid-round (a waker's, say): the rounds' requests are dropped, never
            // served again. Some were completed and their slots may be someone else's now;
            // the rest time out at their deadline. The connection is closed: rounds may be
            // unread on it.
            busy.store(0, Ordering::Relaxed);
            pending.clear();
            for w in works.iter_mut() {
                w.reqs.clear();
                w.arena.clear();
            }
            client.engine().0.drop_connection(server);
            std::panic::resume_unwind(panic);
        }
        true
    }

    /// Takes everything queued into `work`; false if nothing was. `split`: nothing is in
    /// flight on a pipelined connection, and a large queue goes out as two rounds, the
    /// first half now (the rest is taken next, written behind it): the server works on the
    /// second while the first's callers run and queue their next calls, where one round
    /// would leave them all waiting for the same replies.
    fn take(&self, work: &mut Work, split: bool) -> bool {
        {
            let mut guard = lock(&self.queue);
            let q = &mut *guard;
            if q.reqs.is_empty() {
                return false;
            }
            let n = match q.reqs.len() {
                n if split && (SPLIT_MIN..=SPLIT_MAX).contains(&n) => n.div_ceil(2),
                n => n,
            };
            if q.reqs.len() > 1 {
                // Concurrent callers: no lone caller wants direct calls (and a watched
                // socket would wake the idle I/O thread for every round's replies).
                self.unwant_direct();
            }
            if n < q.reqs.len() {
                work.reqs.clear();
                work.arena.clear();
                for r in q.reqs.drain(..n) {
                    let k = work.arena.len();
                    work.arena.extend_from_slice(&q.arena[r.key]);
                    let v = work.arena.len();
                    work.arena.extend_from_slice(&q.arena[r.value]);
                    work.reqs.push(Req {
                        key: k..v,
                        value: v..work.arena.len(),
                        ..r
                    });
                }
                self.queued.fetch_sub(n, Ordering::SeqCst);
            } else {
                std::mem::swap(&mut q.reqs, &mut work.reqs);
                self.queued.fetch_sub(work.reqs.len(), Ordering::SeqCst);
                std::mem::swap(&mut q.arena, &mut work.arena);
            }
        }
        work.freed.clear();
        self.metrics.round(1, work.reqs.len());
        if EngineMetrics::ON {
            // A request's deadline is its call's start plus the timeout.
            let now = Instant::now();
            for r in &work.reqs {
                let start = r.deadline.checked_sub(self.timeout).unwrap_or(now);
                self.metrics.queued(now.saturating_duration_since(start));
            }
        }
        true
    }

    /// After every request of `work`'s round completed: wakes their owners, frees the slots
    /// of those gone, and empties it.
    fn finish(&self, work: &mut Work) {
        self.metrics.round(-1, 0);
        self.wake_round();
        work.reqs.clear();
        work.arena.clear();
        if !work.freed.is_empty() {
            let mut q = lock(&self.queue);
            for &s in &work.freed {
                self.free(&mut q, s);
            }
        }
    }

    /// Pipelined rounds on one connection: the round in `works[0]` is written, then, while
    /// fewer than `works.len()` rounds are unread, each round that queued meanwhile is
    /// written behind it before the oldest round's replies are read. The replies come back
    /// in order: each round's chain reads its own (matched by opaque, or in order on text),
    /// starting where the round before it ended, and any doubt about framing closes the
    /// connection, failing every round unread on it. A round that cannot be one chain
    /// (a get-and-touch, a batch over its cap, TLS, a list change's hand-over) waits for
    /// the rounds before it and is served on its own. `first`: the work holding the round
    /// taken (none if only a direct round, already in `pending`, is to be read).
    fn pipeline(
        &self,
        c: &mut Client,
        works: &mut [Work],
        pending: &mut VecDeque<(usize, Sent, u64)>,
        lane: usize,
        first: Option<usize>,
    ) {
        let depth = works.len();
        let busy = &self.busy_since[lane];
        let policy = super::round::Transport::policy(c);
        let mut next = first;
        loop {
            if let Some(w) = next.take() {
                works[w].expire(self);
                let behind = pending.back().map(|(_, sent, _)| sent.conn());
                let ok = works[w].pipelinable(policy)
                    && behind.is_none_or(|conn| c.engine().0.may_pipeline(conn));
                if ok {
                    match works[w].send(self, c, behind) {
                        Some(sent) => {
                            let at = since_epoch(Instant::now());
                            if pending.is_empty() {
                                busy.store(at, Ordering::Relaxed);
                            }
                            pending.push_back((w, sent, at));
                        }
                        None => self.finish(&mut works[w]),
                    }
                } else {
                    self.read_all(c, works, pending);
                    busy.store(since_epoch(Instant::now()), Ordering::Relaxed);
                    release_wakes();
                    works[w].serve(self, c);
                    busy.store(0, Ordering::Relaxed);
                    self.finish(&mut works[w]);
                }
            }
            // While a lender waits for lane 0, no round is added: the rounds written are
            // read, and the lane is let go.
            let lending = lane == 0 && self.lenders.load(Ordering::SeqCst) > 0;
            let in_flight: usize = pending.iter().map(|(p, ..)| works[*p].reqs.len()).sum();
            let room = pending.len() < depth && in_flight < INTERRUPT_MAX && !lending;
            if room {
                // The lowest work no round unread holds: the others stay cold (and warm up
                // only when rounds go that deep), so a steady load allocates nothing.
                let w = (0..depth)
                    .find(|&w| pending.iter().all(|(p, ..)| *p != w))
                    .expect("fewer rounds unread than works");
                if self.take(&mut works[w], pending.is_empty()) {
                    next = Some(w);
                    continue;
                }
            }
            let last = pending.len() == 1;
            let Some((p, sent, _)) = pending.front_mut() else {
                return;
            };
            let p = *p;
            // While there is room for another round, a call queued during the read wakes it
            // (`kick_io`), and that round is written before the read goes on. Set before the
            // queue is looked at again (`take` above looked before): a call queued after
            // that look sees the flag.
            let reading = &self.reading[lane];
            if room {
                reading.store(true, Ordering::SeqCst);
                if self.queued.load(Ordering::SeqCst) > 0 {
                    reading.store(false, Ordering::SeqCst);
                    continue;
                }
            }
            release_wakes();
            let done = works[p].recv(self, c, sent, last);
            reading.store(false, Ordering::SeqCst);
            if !done {
                continue;
            }
            pending.pop_front();
            self.finish(&mut works[p]);
            let oldest = pending.front().map_or(0, |(_, _, at)| *at);
            busy.store(oldest, Ordering::Relaxed);
        }
    }

    /// Keeps the idle poll watching the lane's connection while async callers want direct
    /// rounds (`want`), and not otherwise: each reply read by another (a blocking direct
    /// call's) would wake the thread for nothing. Under the lane: `watched` changes only
    /// with it held, and a direct round is written only where it is watched.
    fn watch(&self, own: &mut IdlePoll, idle: &Idle, st: &mut State) {
        use mio::unix::SourceFd;
        let want = idle.want.load(Ordering::Relaxed);
        let conn = (st.client.engine().0)
            .socket_of(self.server)
            .filter(|_| want && st.pending.is_empty());
        let now = conn.map_or(0, |(id, _)| id);
        if now == idle.watched.load(Ordering::Relaxed) {
            return;
        }
        idle.watched.store(0, Ordering::SeqCst);
        if let Some(fd) = own.registered.take() {
            // Fails if the socket was closed since (which unregistered it).
            let _ = own.poll.registry().deregister(&mut SourceFd(&fd));
        }
        if let Some((id, fd)) = conn {
            let registry = own.poll.registry();
            let interest = mio::Interest::READABLE;
            if registry
                .register(&mut SourceFd(&fd), IDLE_SOCKET, interest)
                .is_ok()
            {
                own.registered = Some(fd);
                idle.watched.store(id, Ordering::SeqCst);
            }
        }
    }

    /// A direct round: a lone async caller, finding nothing queued and a lane free whose I/O
    /// thread watches its connection (see [`Idle`]), writes its request itself (from its
    /// future's `poll`) as a round of one, and leaves it unread in the lane's `pending`:
    /// the reply wakes the I/O thread, which reads it and completes the slot (waking
    /// `waker`). Whoever takes the lane before that reads it first ([`settle`](Self::settle),
    /// [`round`](Self::round)). The slot, or `None` if the call must be queued instead.
    pub(super) fn direct(
        &self,
        call: &CallSpec<'_>,
        deadline: Instant,
        waker: &Waker,
    ) -> Option<u32> {
        // Small requests only: a write that fills the socket would wait in `poll`.
        let small = call.key.len() + call.value.len() <= DIRECT_MAX;
        if !small || self.queued.load(Ordering::SeqCst) != 0 || !super::round::batched(&call.op) {
            return None;
        }
        // A lone caller only: no other call in flight, or done and not yet taken (a round's
        // other callers, about to make their next calls). Concurrent callers are better
        // served in rounds: direct calls would split them into rounds of one.
        if lock(&self.queue).free.len() != self.slots.len() {
            return None;
        }
        for (lane, m) in self.lanes.iter().enumerate() {
            let Some(idle) = self.idle[lane].get() else {
                continue;
            };
            if !idle.want.load(Ordering::Relaxed) {
                // Asks the thread to watch the connection (after the round this call
                // queues): the next calls may go direct.
                idle.want.store(true, Ordering::Relaxed);
                continue;
            }
            let watched = idle.watched.load(Ordering::SeqCst);
            if watched == 0 || (lane == 0 && self.lenders.load(Ordering::SeqCst) > 0) {
                continue;
            }
            let Some(mut st) = try_lane(m) else { continue };
            if !st.pending.is_empty() {
                continue;
            }
            let State {
                client,
                works,
                pending,
                lane,
            } = &mut *st;
            let sent = client.pinned(self.server, |c| {
                if c.engine().0.direct_conn().map(|(id, _)| id) != Some(watched) {
                    return None;
                }
                // The last work: queued rounds take the lowest free one, and must find the
                // one they always use (warm) free while a direct round is unread.
                let w = works.len() - 1;
                let work = &mut works[w];
                let slot = {
                    let mut q = lock(&self.queue);
                    let slot = q.free.pop()?;
                    self.metrics.in_flight(self.slots.len() - q.free.len());
                    slot
                };
                {
                    let mut d = lock(&self.slots[slot as usize].data);
                    d.phase = Phase::Pending;
                    d.lead = false;
                    d.result = None;
                    d.waiter = Waiter::Task(waker.clone());
                }
                work.reqs.clear();
                work.arena.clear();
                work.arena.extend_from_slice(call.key);
                work.arena.extend_from_slice(call.value);
                work.reqs.push(Req {
                    op: call.op,
                    key: 0..call.key.len(),
                    value: call.key.len()..work.arena.len(),
                    slot,
                    deadline,
                });
                work.freed.clear();
                self.metrics.round(1, 1);
                let policy = super::round::Transport::policy(c);
                if !work.pipelinable(policy) {
                    // Not one chain after all (checked above, but the policy decides):
                    // served by the I/O thread, as a queued call is.
                    let mut q = lock(&self.queue);
                    self.metrics.round(-1, 0);
                    let k = q.arena.len();
                    q.arena.extend_from_slice(call.key);
                    let v = q.arena.len();
                    q.arena.extend_from_slice(call.value);
                    let req = work.reqs.pop().expect("one request");
                    let end = q.arena.len();
                    q.reqs.push(Req {
                        key: k..v,
                        value: v..end,
                        ..req
                    });
                    self.queued.fetch_add(1, Ordering::SeqCst);
                    work.arena.clear();
                    if q.io_idle > 0 {
                        self.wake_idle(&q);
                    }
                    return Some((slot, None));
                }
                match work.send(self, c, None) {
                    Some(sent) => Some((slot, Some((w, sent)))),
                    None => {
                        // It failed to go out: its slot is complete already.
                        self.finish(work);
                        Some((slot, None))
                    }
                }
            });
            let (slot, sent) = sent?;
            self.directs.fetch_add(1, Ordering::Relaxed);
            if let Some((w, sent)) = sent {
                let at = since_epoch(Instant::now());
                self.busy_since[*lane].store(at, Ordering::Relaxed);
                pending.push_back((w, sent, at));
            }
            return Some(slot);
        }
        None
    }

    /// A blocking call was made directly on a lane: idle I/O threads stop watching their
    /// connections (each reply of such calls would wake them for nothing).
    pub(super) fn unwant_direct(&self) {
        for idle in self.idle.iter().filter_map(OnceLock::get) {
            if idle.want.load(Ordering::Relaxed) {
                idle.want.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Lane `lane`'s I/O thread: serves the queue whenever something is in it.
    pub(super) fn io_thread(self: Arc<Self>, lane: usize) {
        // Its idle wait: a poll of its own (or, if none can be made, `io`).
        // Room for a large round's wakes at once: a steady load allocates nothing.
        HELD_WAKES.with(|h| *h.borrow_mut() = Some(Vec::with_capacity(256)));
        let mut own = mio::Poll::new().ok().and_then(|poll| {
            let waker = mio::Waker::new(poll.registry(), IDLE_WAKE).ok()?;
            let idle = Idle {
                waker,
                watched: AtomicU64::new(0),
                polling: AtomicBool::new(false),
                want: AtomicBool::new(false),
            };
            self.idle[lane].set(idle).ok()?;
            Some(IdlePoll {
                poll,
                events: mio::Events::with_capacity(4),
                registered: None,
            })
        });
        // Woken by the idle poll's socket: a direct round's reply, read last time round.
        let mut for_socket = false;
        loop {
            {
                let mut q = lock(&self.queue);
                // Not after a direct round: its caller writes its next one itself.
                if q.reqs.is_empty() && !q.shutdown && !for_socket {
                    // The callers just woken may be about to queue their next calls (on a
                    // busy core they run only when this thread lets go): give them the CPU
                    // once before sleeping, which would cost a wait and a wake.
                    drop(q);
                    std::thread::yield_now();
                    q = lock(&self.queue);
                }
                for_socket = false;
                while q.reqs.is_empty() {
                    if q.shutdown {
                        return;
                    }
                    q.io_idle += 1;
                    self.set_io_busy(&q);
                    // Waits in its poll only while it watches a socket for direct calls;
                    // otherwise on `io`, as cheap to wake.
                    let idle = self.idle[lane].get();
                    let (Some(own), Some(idle)) =
                        (own.as_mut().filter(|o| o.registered.is_some()), idle)
                    else {
                        q = self.io.wait(q).unwrap_or_else(|e| e.into_inner());
                        q.io_idle -= 1;
                        continue;
                    };
                    idle.polling.store(true, Ordering::SeqCst);
                    drop(q);
                    // Wakes at least once per timeout: a direct round written since must
                    // fail by its deadline if no reply comes.
                    // An error (EINTR) is a wake like any other.
                    let _ = own.poll.poll(&mut own.events, Some(self.timeout));
                    q = lock(&self.queue);
                    idle.polling.store(false, Ordering::SeqCst);
                    q.io_idle -= 1;
                    // Whatever woke it (a reply, the timeout, or a kick with nothing
                    // queued: a caller waiting for a slot), the lane is looked at: a
                    // direct call's reply unread there is read, or fails by its deadline.
                    // Polling again for a whole timeout after each kick would let kicks
                    // keep it from ever failing a frozen server's direct call.
                    for_socket = (own.events.iter()).any(|e| e.token() == IDLE_SOCKET);
                    break;
                }
                self.set_io_busy(&q);
            }
            let mut st = lock(&self.lanes[lane]);
            if own.as_ref().is_some_and(|o| o.registered.is_some()) {
                // The idle poll may have seen the socket readable: the driver tries a read
                // before asking its own poll.
                st.client.engine().0.assume_readable(self.server);
            }
            // A panic in a round (reported by the panic hook) must not end the thread that
            // serves this server's queue: every later call would time out.
            let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while self.round(&mut st, true) {
                    if lane == 0 && self.lenders.load(Ordering::SeqCst) > 0 {
                        break;
                    }
                }
            }));
            drop(rounds);
            if let (Some(own), Some(idle)) = (&mut own, self.idle[lane].get()) {
                self.watch(own, idle, &mut st);
            }
            drop(st);
            release_wakes();
            // A lender waits for this lane: let it take the lane before it is locked again
            // (a mutex is not fair).
            while lane == 0 && self.lenders.load(Ordering::SeqCst) > 0 {
                std::thread::yield_now();
            }
        }
    }
}

/// What the combiner holds: a lane.
pub(super) struct State {
    pub(super) client: Client,
    /// A round's working space for each round that may be in flight at once on the lane's
    /// connection ([`SharedClientBuilder::pipeline_depth`](super::SharedClientBuilder)); a
    /// round served one at a time uses the first.
    pub(super) works: Box<[Work]>,
    /// The pipelined rounds written and unread, oldest first: the work holding each, what
    /// reads it, and when it was written ([`since_epoch`]).
    pub(super) pending: VecDeque<(usize, Sent, u64)>,
    /// Its index in [`Engine::lanes`].
    pub(super) lane: usize,
}

/// How a wait on a slot ended.
pub(super) enum Waited {
    Done(Result<Reply>),
    /// Asked to combine.
    Lead,
    TimedOut,
}

impl Engine {
    /// Parks until `slot` is done (its value copied to `out`), its owner is asked to combine,
    /// or `deadline` passes.
    pub(super) fn wait(&self, slot: u32, deadline: Instant, out: &mut Vec<u8>) -> Waited {
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
    pub(super) fn take_done(&self, d: &mut SlotData, out: &mut Vec<u8>) -> Option<Result<Reply>> {
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
