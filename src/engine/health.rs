//! Server health: consecutive failures, ejection and rejoin (libmemcached's model), and
//! per-server counters.
//!
//! Who is ejected is shared by every client of a [`Pool`](crate::Pool) (one
//! [`SharedHealth`]): two pooled clients never route one key to two servers for long, and a
//! server one of them found dead is skipped by all. Each client keeps a copy of that state
//! in its continuum and refreshes it when the shared epoch moves, so a healthy call costs two
//! atomic loads and takes no lock. Counters stay per client.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::slots::Slots;
use crate::error::{Error, Result};
use crate::observe::Observer;
use crate::ring::{Continuum, Distribution};

/// Per-server counters, readable with [`Client::server_counters`](crate::Client::server_counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Requests sent to the server (a multi-key call counts once per server it involves).
    pub requests: u64,
    /// Keys found by retrieval commands.
    pub hits: u64,
    /// Keys not found by retrieval commands.
    pub misses: u64,
    /// Failed requests: I/O, timeout, malformed reply, or an error line from the server.
    pub errors: u64,
    /// Of those, timeouts.
    pub timeouts: u64,
    /// Times the server was ejected after `server_failure_limit` consecutive failures.
    pub ejections: u64,
    /// Connections opened after the first one.
    pub reconnects: u64,
    /// Replies to earlier fire-and-forget commands ([`Pipeline::send`], `store_noreply`,
    /// `delete_noreply`) that a later call read and set aside before its own: unmet
    /// conditions (not stored, not found) and error lines.
    ///
    /// [`Pipeline::send`]: crate::Pipeline::send
    pub late_replies: u64,
    /// TLS connections whose handshake resumed an earlier session (a ticket) instead of a
    /// full handshake; 0 without TLS.
    pub tls_resumptions: u64,
}

impl ServerCounters {
    /// Adds `other`'s counts (another connection's to the same server).
    pub(crate) fn add(&mut self, other: &ServerCounters) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.misses += other.misses;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.ejections += other.ejections;
        self.reconnects += other.reconnects;
        self.late_replies += other.late_replies;
        self.tls_resumptions += other.tls_resumptions;
    }
}

/// What to do about failing servers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailurePolicy {
    pub(crate) failure_limit: u32,
    pub(crate) retry_timeout: Duration,
    pub(crate) remove_failed: bool,
    /// With `remove_failed`: at most this many servers are off the continuum at once
    /// (`None`: a third of them, at least one).
    pub(crate) max_removed: Option<usize>,
}

impl FailurePolicy {
    /// How many of `n` servers may be off the continuum at once.
    pub(crate) fn removable(&self, n: usize) -> usize {
        self.max_removed.unwrap_or((n / 3).max(1))
    }
}

/// Ejections shared by every client built for one pool: consecutive failures, and who is
/// ejected until when.
pub(crate) struct SharedHealth {
    /// Moves on every ejection and rejoin: clients refresh their copy when it does.
    epoch: AtomicU64,
    /// The generation of the server list (see [`ServerList`](crate::ServerList)): clients
    /// take the new list when it moves (it moves with `epoch`, so the common case still
    /// loads one atomic).
    pub(crate) list_generation: AtomicU64,
    failures: Slots<AtomicU32>,
    /// Per server index; grown (under the lock) when a live list adds servers.
    ejected_until: Mutex<Vec<Option<Instant>>>,
    /// Per server, after its retry time: [`PROBE_OPEN`] (the next call may probe it),
    /// the time a call took the probe ([`SharedHealth::ticks`]), or [`NO_PROBE`].
    probe: Slots<AtomicU64>,
    /// The clock of `probe`.
    born: Instant,
    /// A probe older than this is given to the next call (its caller never reported).
    probe_stale: Duration,
    /// Latency, repairs and hedges of the copies (used with replicas only).
    pub(crate) fleet: crate::fleet::FleetShared,
}

impl std::fmt::Debug for SharedHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedHealth")
            .field("ejected_until", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl SharedHealth {
    pub(crate) fn new(
        labels: &[String],
        zones: Option<crate::fleet::zones::Zones>,
    ) -> Arc<SharedHealth> {
        let n = labels.len();
        Arc::new(SharedHealth {
            epoch: AtomicU64::new(0),
            list_generation: AtomicU64::new(0),
            failures: Slots::new(),
            ejected_until: Mutex::new(vec![None; n]),
            probe: Slots::new(),
            born: Instant::now(),
            probe_stale: Duration::from_secs(2),
            fleet: crate::fleet::FleetShared::new(labels, zones),
        })
    }

    /// Makes room for the servers of `labels` (by index: a live list named new ones).
    pub(crate) fn grow(&self, labels: &[String]) {
        {
            let mut ejected = self.lock();
            if ejected.len() < labels.len() {
                ejected.resize(labels.len(), None);
            }
        }
        self.fleet.grow(labels);
    }

    /// Forgets server `i`'s failures and ejection: it was (re)added to the list, and starts
    /// as a new server does.
    pub(crate) fn reset(&self, i: usize) {
        let mut ejected = self.lock();
        if let Some(e) = ejected.get_mut(i) {
            *e = None;
        }
        self.failures[i].store(0, Ordering::Relaxed);
        self.probe[i].store(NO_PROBE, Ordering::Release);
    }

    /// Moves the list generation to `generation`, so every client takes the new list on
    /// its next call.
    pub(crate) fn list_changed(&self, generation: u64) {
        self.list_generation.store(generation, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Nanoseconds since this record was made (never [`NO_PROBE`] or [`PROBE_OPEN`]).
    fn ticks(&self) -> u64 {
        (self.born.elapsed().as_nanos() as u64).max(PROBE_OPEN + 1)
    }

    /// Takes the probe of server `i` if it is open (or its holder went quiet): this call
    /// tests the server; every other call treats it as down until this one reports.
    fn take_probe(&self, i: usize) -> bool {
        let p = &self.probe[i];
        let now = self.ticks();
        let cur = p.load(Ordering::Acquire);
        let takeable = cur == PROBE_OPEN
            || (cur != NO_PROBE && now.saturating_sub(cur) > self.probe_stale.as_nanos() as u64);
        takeable
            && p.compare_exchange(cur, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Instant>>> {
        self.ejected_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `SharedHealth::probe`: no probe (the server is up, or ejected).
const NO_PROBE: u64 = 0;
/// `SharedHealth::probe`: the server's retry time came; the next call probes it.
const PROBE_OPEN: u64 = 1;

/// How a server stands in a client's copy of the shared record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Up,
    /// Ejected until then.
    Down(Instant),
    /// Its retry time came: one call at a time probes it (a circuit breaker's half-open
    /// state); the others treat it as down.
    Probe,
}

pub(crate) struct Health {
    /// Exported metrics (nothing without the `metrics` feature).
    pub(crate) observe: Observer,
    shared: Arc<SharedHealth>,
    policy: FailurePolicy,
    counters: Vec<ServerCounters>,
    /// The list generation this client's server indexes are from.
    list_seen: u64,
    /// This client's copy of who is ejected or probed, as of shared epoch `seen`.
    up: Vec<Gate>,
    /// The earliest of those times.
    next_retry: Option<Instant>,
    seen: u64,
}

impl Health {
    pub(crate) fn new(
        shared: Arc<SharedHealth>,
        policy: FailurePolicy,
        labels: &[String],
    ) -> Health {
        // As many servers as this client's list has (the shared record may already have
        // room for a newer one's).
        let n = labels.len();
        Health {
            observe: Observer::new(labels),
            shared,
            policy,
            counters: vec![ServerCounters::default(); n],
            up: vec![Gate::Up; n],
            list_seen: 0,
            next_retry: None,
            seen: u64::MAX, // refreshed on first use: the shared state may be older
        }
    }

    pub(crate) fn shared(&self) -> &Arc<SharedHealth> {
        &self.shared
    }

    /// Lets ejected servers whose retry time has come back in, and brings this client's
    /// continuum up to date with the shared state. A server that rejoins is on probation:
    /// one more failure ejects it again; one success clears it.
    ///
    /// `true` if the server list changed: the caller takes the new one
    /// ([`adopt`](Self::adopt)) and calls this again.
    #[inline]
    #[must_use]
    pub(crate) fn maybe_rejoin(&mut self, ring: &mut Continuum) -> bool {
        // The common case, every server up and nothing changed: one load, one compare.
        if self.next_retry.is_some() || self.shared.epoch.load(Ordering::Acquire) != self.seen {
            return self.rejoin_and_refresh(ring);
        }
        false
    }

    /// The list generation this client's indexes are from.
    pub(crate) fn list_seen(&self) -> u64 {
        self.list_seen
    }

    /// Takes list generation `generation`, with `labels` per server index (as many as
    /// before or more): the new servers start up, with zeroed counters; the ejections are
    /// copied again on the next [`maybe_rejoin`](Self::maybe_rejoin).
    pub(crate) fn adopt(&mut self, generation: u64, labels: &[String]) {
        let n = labels.len();
        if n > self.up.len() {
            self.counters.resize(n, ServerCounters::default());
            self.up.resize(n, Gate::Up);
            self.observe.grow(labels);
        }
        self.list_seen = generation;
        self.seen = u64::MAX;
    }

    #[cold]
    #[inline(never)]
    fn rejoin_and_refresh(&mut self, ring: &mut Continuum) -> bool {
        if self.next_retry.is_some_and(|at| Instant::now() >= at) {
            let sh = &*self.shared;
            let mut ejected = sh.lock();
            let now = Instant::now();
            let mut changed = false;
            for (i, e) in ejected.iter_mut().enumerate() {
                if e.is_some_and(|until| until <= now) {
                    *e = None;
                    self.observe.rejoined(i);
                    // On probation: one failure ejects it again. One call probes it first.
                    let probation = self.policy.failure_limit.saturating_sub(1);
                    sh.failures[i].store(probation.max(1), Ordering::Relaxed);
                    sh.probe[i].store(PROBE_OPEN, Ordering::Release);
                    changed = true;
                }
            }
            if changed {
                sh.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.refresh(ring)
    }

    /// Whether the list moved past the generation this client has. Read only after the
    /// epoch this client records as seen: a list change stores its generation before it
    /// moves the epoch, so a client that has taken that epoch sees the generation too.
    /// Newer only: a client may have taken a list whose generation is not signalled yet.
    fn list_moved(&self) -> bool {
        self.shared.list_generation.load(Ordering::Acquire) > self.list_seen
    }

    /// Copies the shared ejections into this client if they changed since it last looked.
    /// `true` if the server list moved past this client's (it is to take the new one).
    fn refresh(&mut self, ring: &mut Continuum) -> bool {
        #[cfg(test)]
        if let Some(f) = BEFORE_REFRESH.with(|b| b.borrow_mut().take()) {
            f();
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        if epoch == self.seen {
            // Recorded with its generation (below): a newer list moves the epoch again.
            return false;
        }
        let ejected = self.shared.lock();
        // Read again under the lock: the copy is then at least this recent.
        self.seen = self.shared.epoch.load(Ordering::Acquire);
        // An epoch is recorded as seen only with the list generation it carries: a change
        // that moved it is taken (`seen` stays unseen, so every call looks again until
        // then). Without this, a change that landed while a client looked (or refreshed
        // after a failed request) was lost until the next ejection or change: the client
        // kept routing with its old list, and a storage read keys where no writer
        // invalidated them any more.
        let moved = self.list_moved();
        if moved {
            self.seen = u64::MAX;
        }
        // The shared record may already have room for servers of a newer list.
        for (i, e) in ejected.iter().enumerate().take(self.up.len()) {
            self.up[i] = match e {
                Some(until) => Gate::Down(*until),
                None if self.shared.probe[i].load(Ordering::Acquire) != NO_PROBE => Gate::Probe,
                None => Gate::Up,
            };
        }
        drop(ejected);
        self.next_retry = ejected_min(&self.up);
        if self.policy.remove_failed && ring.distribution() != Distribution::Modula {
            // At most `removable` servers leave the continuum, those out longest (the
            // earliest retry time, then the server order: every client of a pool picks the
            // same). The others stay on it, their keys failing fast: a burst of failures
            // does not move most keys at once, to servers that do not hold them.
            let mut down: Vec<(Instant, usize)> = (self.up.iter().enumerate())
                .filter_map(|(i, u)| match u {
                    Gate::Down(until) => Some((*until, i)),
                    _ => None,
                })
                .collect();
            down.sort_unstable();
            down.retain(|&(_, i)| ring.is_member(i));
            down.truncate(self.policy.removable(ring.members().len()));
            for i in 0..self.up.len() {
                ring.set_live(i, !down.iter().any(|&(_, d)| d == i));
            }
        }
        moved
    }

    /// `Err(retry_in)` if server `i` is ejected, or is being probed by another call. A
    /// call that gets `Ok` for a server whose retry time came is its probe: it must report
    /// its outcome ([`record`](Self::record)).
    #[inline]
    pub(crate) fn check(&self, i: usize) -> std::result::Result<(), Duration> {
        match self.up[i] {
            Gate::Up => Ok(()),
            Gate::Down(until) => Err(until.saturating_duration_since(Instant::now())),
            Gate::Probe => self.check_probe(i),
        }
    }

    /// As [`check`](Self::check) for a call whose caller already routed it (and took the
    /// probe, if the server is being probed): only an ejection stops it.
    #[inline]
    pub(crate) fn check_routed(&self, i: usize) -> std::result::Result<(), Duration> {
        match self.up[i] {
            Gate::Down(until) => Err(until.saturating_duration_since(Instant::now())),
            Gate::Up | Gate::Probe => Ok(()),
        }
    }

    #[cold]
    fn check_probe(&self, i: usize) -> std::result::Result<(), Duration> {
        if self.shared.take_probe(i) {
            Ok(())
        } else {
            Err(Duration::ZERO)
        }
    }

    /// Whether server `i`'s breaker is half-open (a probe may be taken), without taking it.
    pub(crate) fn is_probed(&self, i: usize) -> bool {
        self.up[i] == Gate::Probe
    }

    /// How long until server `i` may be tried again (zero if it may be now), without
    /// taking its probe.
    pub(crate) fn retry_in(&self, i: usize) -> Duration {
        match self.up[i] {
            Gate::Down(until) => until.saturating_duration_since(Instant::now()),
            Gate::Up | Gate::Probe => Duration::ZERO,
        }
    }

    pub(crate) fn counters_mut(&mut self, i: usize) -> &mut ServerCounters {
        &mut self.counters[i]
    }

    /// Counts a retrieval's hit or miss.
    pub(crate) fn count_lookup(&mut self, i: usize, hit: bool) {
        self.observe.lookups(i, u64::from(hit), u64::from(!hit));
        let c = &mut self.counters[i];
        if hit {
            c.hits += 1;
        } else {
            c.misses += 1;
        }
    }

    pub(crate) fn counters(&self, i: usize) -> ServerCounters {
        self.counters[i]
    }

    /// Records the outcome of one request to server `i`.
    #[inline]
    pub(crate) fn record<T>(&mut self, i: usize, r: &Result<T>, ring: &mut Continuum) {
        self.counters[i].requests += 1;
        match r {
            Ok(_) => {
                let failures = &self.shared.failures[i];
                if failures.load(Ordering::Relaxed) != 0 {
                    failures.store(0, Ordering::Relaxed);
                    self.probe_passed(i);
                }
            }
            Err(e) => self.record_error(i, e, ring),
        }
    }

    /// A call on server `i` succeeded: if it was the probe, the server is up for everyone.
    fn probe_passed(&mut self, i: usize) {
        let sh = &*self.shared;
        if sh.probe[i].load(Ordering::Acquire) != NO_PROBE {
            let _ejected = sh.lock();
            sh.probe[i].store(NO_PROBE, Ordering::Release);
            sh.epoch.fetch_add(1, Ordering::AcqRel);
            self.observe.closed(i);
        }
    }

    /// Records a failed request to server `i` (the request itself is counted by the caller).
    pub(crate) fn record_error(&mut self, i: usize, e: &Error, ring: &mut Continuum) {
        self.observe.error(i, e);
        let c = &mut self.counters[i];
        match e {
            Error::Io { .. } | Error::Timeout { .. } | Error::Parse { .. } => {
                c.errors += 1;
                if matches!(e, Error::Timeout { .. }) {
                    c.timeouts += 1;
                }
                let sh = &*self.shared;
                let failures = sh.failures[i].fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= self.policy.failure_limit {
                    let mut ejected = sh.lock();
                    sh.probe[i].store(NO_PROBE, Ordering::Release);
                    if ejected[i].is_none() {
                        ejected[i] = Some(Instant::now() + self.policy.retry_timeout);
                        c.ejections += 1;
                        self.observe.ejected(i);
                        sh.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                }
                // A list that moved is taken by the next call (`seen` is left unseen).
                let _ = self.refresh(ring);
            }
            // The server answered: it is healthy, the request was not.
            Error::Server { .. } => {
                c.errors += 1;
                self.shared.failures[i].store(0, Ordering::Relaxed);
                self.probe_passed(i);
            }
            _ => {}
        }
    }
}

/// The earliest retry time among ejected servers.
fn ejected_min(up: &[Gate]) -> Option<Instant> {
    up.iter()
        .filter_map(|u| match u {
            Gate::Down(t) => Some(*t),
            _ => None,
        })
        .min()
}

#[cfg(test)]
thread_local! {
    /// Run once at the start of the next `refresh` on this thread: a test's way to land a
    /// list change between a client's reads of the shared state.
    static BEFORE_REFRESH: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::HashFn;

    /// A client of two servers, its continuum, and the shared state it follows.
    fn client() -> (Arc<SharedHealth>, Health, Continuum) {
        let labels: Vec<String> = vec!["a".into(), "b".into()];
        let shared = SharedHealth::new(&labels, None);
        let policy = FailurePolicy {
            failure_limit: 2,
            retry_timeout: Duration::from_secs(1),
            remove_failed: false,
            max_removed: None,
        };
        let h = Health::new(shared.clone(), policy, &labels);
        let ring = Continuum::new(Distribution::Ketama, HashFn::OneAtATime, &[]);
        (shared, h, ring)
    }

    /// Lands a list change (generation `g`) at the start of this thread's next refresh.
    fn change_during_next_refresh(shared: &Arc<SharedHealth>, g: u64) {
        let publisher = shared.clone();
        BEFORE_REFRESH
            .with(|b| *b.borrow_mut() = Some(Box::new(move || publisher.list_changed(g))));
    }

    /// A list change that lands while a client is looking at the shared state (after
    /// another client's ejection moved the epoch) is taken: the client never records the
    /// change's epoch as seen without its generation. Before, the generation was read
    /// first, and a change landing before the epoch was read was lost until the next
    /// ejection or change: the client kept routing with its old list (`chaos_membership`
    /// read keys where no writer invalidated them any more).
    #[test]
    fn a_list_change_landing_while_a_client_looks_is_taken() {
        let (shared, mut h, mut ring) = client();
        assert!(!h.maybe_rejoin(&mut ring), "no change yet");
        assert!(!h.maybe_rejoin(&mut ring), "the epoch is seen");
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        change_during_next_refresh(&shared, 1);
        let taken = (0..3).any(|_| h.maybe_rejoin(&mut ring));
        assert!(taken, "list generation 1 was never taken");
    }

    /// The same when the change lands while the client records a failed request (which
    /// refreshes its copy of the shared state too): before, that refresh recorded the
    /// change's epoch as seen and the change was lost (`chaos_membership` again, under
    /// freezes).
    #[test]
    fn a_list_change_landing_while_a_client_records_a_failure_is_taken() {
        let (shared, mut h, mut ring) = client();
        assert!(!h.maybe_rejoin(&mut ring), "no change yet");
        change_during_next_refresh(&shared, 1);
        let timeout = Error::Timeout {
            server: "b".into(),
            during: crate::error::During::Read,
            elapsed: Duration::from_millis(100),
        };
        h.record_error(1, &timeout, &mut ring);
        let taken = (0..3).any(|_| h.maybe_rejoin(&mut ring));
        assert!(taken, "list generation 1 was never taken");
    }
}
