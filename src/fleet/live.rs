//! A server list that changes while clients use it (#28).
//!
//! Every client follows a [`ServerList`]: one built with fixed servers follows its own list,
//! which nothing changes. A [`set`](ServerList::set) builds the new continuum on the
//! caller's thread (never a client's), stores it with `arc-swap` (read-copy-update) and moves
//! the list's generation, which every client sees on its next call in the same atomic load
//! that already tells it of ejections: the healthy path pays nothing.
//!
//! A server keeps its index (its *slot*) for the list's life, even after it leaves: an index
//! a call holds across a change never names another server, connections to kept servers
//! stay open, and per-server state (ejections, latency, repairs) stays where it is.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::addr::{ServerAddr, ServerSpec};
use crate::engine::health::SharedHealth;
use crate::engine::slots::MAX_SLOTS;
use crate::error::{Error, Result};
use crate::ring::handover::Handover;
use crate::ring::{Continuum, Distribution, HashFn, RingServer};

/// One generation of a list: what a client routes with.
pub(crate) struct Topology {
    pub(crate) generation: u64,
    /// Per slot: every server the list ever named.
    pub(crate) addrs: Vec<ServerAddr>,
    pub(crate) labels: Arc<[String]>,
    /// Over the slots; the list's servers are its members, in list order.
    pub(crate) ring: Continuum,
    /// Where keys moved by earlier changes may still have entries: a write deletes them.
    pub(crate) handover: Arc<Handover>,
    /// Per slot: the generation in which the server last joined the list (0: from the
    /// start). A client that skipped it reconnects: the server may have been restarted.
    pub(crate) joined: Arc<[u64]>,
    /// The labels of the members, in list order.
    pub(crate) member_labels: Arc<[String]>,
    /// With a storage following the list ([`ServerList::follow_for_storage`]): the list
    /// before this one, for the windows in which processes may still disagree on it.
    pub(crate) prior: Option<Arc<Prior>>,
}

/// The list before a change, kept while processes sharing a cache may still serve it: each
/// adopts a change at its own moment, at most `skew` apart (see `storage::memcache`).
#[derive(Debug)]
pub(crate) struct Prior {
    pub(crate) ring: Continuum,
    /// When the change was published in this process.
    pub(crate) at: Instant,
    pub(crate) skew: Duration,
}

impl Prior {
    /// Within `skew` of the change: a storage still reads keys where the list before put
    /// them (a process that has not taken the change fills and invalidates them there).
    pub(crate) fn reading(&self) -> bool {
        self.at.elapsed() < self.skew
    }

    /// Within twice `skew`: a storage's invalidations still reach the servers of the list
    /// before (a process that took the change up to `skew` later still reads there for
    /// `skew`), removed ones too.
    pub(crate) fn lingering(&self) -> bool {
        self.at.elapsed() < 2 * self.skew
    }
}

/// How a list takes changes: damping and a rate limit ([`ClientBuilder::list_damping`],
/// [`ClientBuilder::list_min_interval`]).
///
/// [`ClientBuilder::list_damping`]: crate::ClientBuilder::list_damping
/// [`ClientBuilder::list_min_interval`]: crate::ClientBuilder::list_min_interval
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Churn {
    pub(crate) damping: Duration,
    pub(crate) min_interval: Duration,
}

/// What a [`ServerList::set`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListChange {
    /// The list's generation after the call (0 for the list a client was built with).
    pub generation: u64,
    /// Servers added to the list, as configured.
    pub added: Vec<String>,
    /// Servers removed from the list.
    pub removed: Vec<String>,
    /// Servers whose weight changed.
    pub reweighted: Vec<String>,
    /// A change is held back, by the damping window (a removal) or the rate limit: a later
    /// [`set`](ServerList::set) or [`refresh`](ServerList::refresh) applies it once its
    /// time has come.
    pub pending: bool,
}

impl ListChange {
    /// Whether the call swapped in a new list.
    pub fn applied(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.reweighted.is_empty())
    }
}

/// The server list of a [`Client`](crate::Client), and of every client that follows it: the
/// clients of a [`Pool`](crate::Pool) follow one list. `Clone` is cheap (shared).
///
/// [`set`](Self::set) replaces the list while the clients serve:
/// - the new continuum is built by the caller of `set` and swapped in atomically: callers of
///   the clients never wait for it, and take it on their next call;
/// - connections to servers that stay are kept; a client closes its connection to a removed
///   server when it takes the new list, after the call it was making (a client makes one
///   call at a time), so no call in flight is cut; a pool's idle clients and a shared
///   client's engines take it as soon as it is published;
/// - a call routed before the change and sent after it, to a removed server, fails with
///   [`Error::ServerRemoved`]; none goes to another server than the one it was routed to;
/// - weights may change; a server named twice is refused;
/// - after a change, a write of a key that moved also deletes it where it was (see
///   `ring::handover`), so a key moved away and back never reads an older write. This
///   holds within the clients of one list: **a server that comes back to the list must come
///   back empty** (restarted, or flushed once the clients have closed their connections to
///   it, which they do when the list without it is published), since the writes made while
///   it was out did not delete there. A [`MemcacheStorage`] built with
///   [`follow_list`] needs none of this: it flushes such servers itself, and keeps
///   processes that take a change at different moments consistent.
///
/// [`MemcacheStorage`]: crate::storage::MemcacheStorage
/// [`follow_list`]: crate::storage::MemcacheStorageBuilder::follow_list
///
/// Churn control (set on the builder): with [`list_damping`], a removed server stays in the
/// list for that long, so one that comes back within the window moves no key; with
/// [`list_min_interval`], changes are applied at most that often. A held change is applied
/// by a later `set` or [`refresh`](Self::refresh) (a [`Discovery`](crate::Discovery)
/// loop calls one every poll).
///
/// A [`SharedClient`](crate::SharedClient) follows its list too: `set` makes the engine of
/// a new server before the list is published, and closes the connection of a removed
/// server's engine after.
///
/// Not yet followed: zones ([`zone`](crate::ClientBuilder::zone)), copies
/// ([`replicas`](crate::ClientBuilder::replicas) above 1), and a
/// [`MemcacheStorage`](crate::storage::MemcacheStorage) (its never-stale guarantee does not
/// cover keys that move yet): `set` refuses those lists with [`Error::Config`].
///
/// [`list_damping`]: crate::ClientBuilder::list_damping
/// [`list_min_interval`]: crate::ClientBuilder::list_min_interval
///
/// ```no_run
/// use mcstore::Client;
/// # fn main() -> mcstore::Result<()> {
/// let mut client = Client::builder().servers(["127.0.0.1:11211", "127.0.0.1:11212"]).build()?;
/// let list = client.server_list().clone();
/// // From any thread, while `client` serves:
/// let change = list.set(["127.0.0.1:11211", "127.0.0.1:11213"])?;
/// assert_eq!(change.removed, ["127.0.0.1:11212"]);
/// client.get(b"k")?; // routed with the new list
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServerList {
    inner: Arc<ListInner>,
}

/// A front with state per server beyond its clients' (a shared client's engines), told of
/// each new list: [`prepare`](Self::prepare) before it is published (a new server's state
/// must exist before a call can route to it), [`published`](Self::published) after.
pub(crate) trait ListFollower: Send + Sync {
    /// Makes what the servers of `next` need; an error keeps the list as it was.
    fn prepare(&self, next: &Topology) -> Result<()>;
    /// `next` is the list now; `removed` the servers this change took out of it.
    fn published(&self, next: &Topology, removed: &[usize]);
}

struct ListInner {
    current: ArcSwap<Topology>,
    /// Told of each change (those dropped are forgotten).
    followers: Mutex<Vec<std::sync::Weak<dyn ListFollower>>>,
    health: Arc<SharedHealth>,
    dist: Distribution,
    hash: HashFn,
    #[cfg(feature = "tls")]
    tls: Option<crate::TlsConfig>,
    churn: Churn,
    /// How far apart the processes sharing a storage's cache may take a change, in
    /// nanoseconds (0: no storage follows the list).
    skew_nanos: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

/// The list's bookkeeping, changed only by `set` (under its lock).
struct State {
    /// Per slot: the server (with its weight in the current list).
    slots: Vec<ServerSpec>,
    /// The list as last given.
    wanted: Vec<ServerSpec>,
    /// Servers dropped from `wanted` and kept in the list until then (damping).
    leaving: Vec<(ServerAddr, Instant)>,
    /// The members now, in list order, as slots.
    members: Vec<usize>,
    last_change: Option<Instant>,
    /// The last generation given out (to followers' `prepare`), published or not: the next
    /// is one more, so a change whose `prepare` failed never gives its number to another
    /// list (a follower may have made state for it, such as a shared client's engines,
    /// which took that list).
    prepared: u64,
    /// Why the list may not change (zones, or a front that does not follow changes).
    frozen: Option<&'static str>,
}

impl std::fmt::Debug for ServerList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerList")
            .field("generation", &self.generation())
            .field("servers", &self.servers())
            .finish_non_exhaustive()
    }
}

/// The continuum's view of a server: the host exactly as configured, 0 as the port of a
/// Unix socket (its path is the host).
pub(crate) fn ring_server(spec: &ServerSpec) -> RingServer {
    match &spec.addr {
        ServerAddr::Tcp { host, port } => RingServer {
            host: host.clone(),
            port: *port,
            weight: spec.weight,
        },
        ServerAddr::Unix(path) => RingServer {
            host: path.display().to_string(),
            port: 0,
            weight: spec.weight,
        },
    }
}

/// What a [`ServerList`] is built from (the builder's settings, checked).
pub(crate) struct ListSettings {
    pub(crate) specs: Vec<ServerSpec>,
    pub(crate) dist: Distribution,
    pub(crate) hash: HashFn,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::TlsConfig>,
    pub(crate) churn: Churn,
    pub(crate) health: Arc<SharedHealth>,
    pub(crate) zoned: bool,
    /// Keys have copies.
    pub(crate) replicated: bool,
}

impl ServerList {
    /// The list of a new client (generation 0): its servers in order, slots 0..n.
    pub(crate) fn new(s: ListSettings) -> ServerList {
        let n = s.specs.len();
        let ring = Continuum::new(
            s.dist,
            s.hash,
            &s.specs.iter().map(ring_server).collect::<Vec<_>>(),
        );
        let topology = Topology {
            generation: 0,
            addrs: s.specs.iter().map(|x| x.addr.clone()).collect(),
            labels: s.specs.iter().map(|x| x.addr.to_string()).collect(),
            ring,
            handover: Arc::default(),
            joined: vec![0; n].into(),
            member_labels: s.specs.iter().map(|x| x.addr.to_string()).collect(),
            prior: None,
        };
        ServerList {
            inner: Arc::new(ListInner {
                current: ArcSwap::from_pointee(topology),
                followers: Mutex::new(Vec::new()),
                health: s.health,
                dist: s.dist,
                hash: s.hash,
                #[cfg(feature = "tls")]
                tls: s.tls,
                churn: s.churn,
                skew_nanos: std::sync::atomic::AtomicU64::new(0),
                state: Mutex::new(State {
                    slots: s.specs.clone(),
                    wanted: s.specs,
                    leaving: Vec::new(),
                    members: (0..n).collect(),
                    last_change: None,
                    prepared: 0,
                    frozen: if s.zoned {
                        Some("a client with zones does not follow list changes yet")
                    } else if s.replicated {
                        Some(
                            "a client with copies (replicas > 1) does not follow list changes \
                             yet",
                        )
                    } else {
                        None
                    },
                }),
            }),
        }
    }

    /// The current generation (lock-free).
    pub(crate) fn topology(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.inner.current.load()
    }

    /// The health every client of this list shares.
    pub(crate) fn health(&self) -> &Arc<SharedHealth> {
        &self.inner.health
    }

    /// Tells `follower` of every change from now on (until it is dropped).
    pub(crate) fn add_follower(&self, follower: std::sync::Weak<dyn ListFollower>) {
        let _ = self.add_follower_with(follower, |_| Ok(()));
    }

    /// [`add_follower`](Self::add_follower), after `catch_up` with the list as it is: no
    /// change runs in between, so the follower misses none.
    pub(crate) fn add_follower_with(
        &self,
        follower: std::sync::Weak<dyn ListFollower>,
        catch_up: impl FnOnce(&Topology) -> Result<()>,
    ) -> Result<()> {
        let _no_change = self.lock();
        catch_up(&self.topology())?;
        let mut f = (self.inner.followers.lock()).unwrap_or_else(|p| p.into_inner());
        f.retain(|w| w.strong_count() > 0);
        f.push(follower);
        Ok(())
    }

    fn followers(&self) -> Vec<Arc<dyn ListFollower>> {
        let f = self
            .inner
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    /// Refuses changes from now on, for `why` (a front that does not follow them).
    pub(crate) fn freeze(&self, why: &'static str) {
        self.lock().frozen.get_or_insert(why);
    }

    /// A storage follows the list (see `storage::memcache`): processes sharing its cache
    /// take a change at most `skew` apart. From the next change on, each list keeps the one
    /// before it for `2 * skew` ([`Prior`]), and changes are at least `2 * skew` apart.
    pub(crate) fn follow_for_storage(&self, skew: Duration) {
        let nanos = u64::try_from(skew.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.inner
            .skew_nanos
            .fetch_max(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`follow_for_storage`](Self::follow_for_storage)'s skew, if a storage follows.
    pub(crate) fn storage_skew(&self) -> Option<Duration> {
        match self
            .inner
            .skew_nanos
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// Seeds what a storage following this list needs to know of the lists the cache had
    /// before this one was built (`history`: oldest first, each with how long ago it was
    /// first taken), for a storage that starts after changes other processes saw:
    /// - the previous-owners map (see `ring::handover`), so that writes delete moved keys
    ///   where those lists put them;
    /// - if the last change is recent (within twice the storage's skew), the list before it
    ///   ([`Prior`]), so that invalidations still reach its servers, removed ones too (they
    ///   get slots, not membership), while other processes may still read there.
    ///
    /// Seeding needs a list with no history of its own (it did not change since it was
    /// built) and a consistent distribution. The last change also starts the rate limit
    /// (changes `2 * skew` apart), as if this list had taken it. Returns the servers (as
    /// labels, members now) that took keys in each change of the history and how long ago:
    /// the flushes that may still be owed. An error (a new server's state could not be
    /// made) leaves the list as it was.
    pub(crate) fn seed_history(
        &self,
        history: &[(Duration, Vec<ServerSpec>)],
    ) -> Result<Vec<(Duration, String)>> {
        let mut st = self.lock();
        let old = self.inner.current.load_full();
        if history.is_empty() || self.inner.dist == Distribution::Modula {
            return Ok(Vec::new());
        }
        let seeding = old.handover.is_empty() && old.prior.is_none();
        let now: Vec<ServerSpec> = st.members.iter().map(|&i| st.slots[i].clone()).collect();
        let same = |l: &[ServerSpec]| {
            l.len() == now.len()
                && l.iter().all(|x| {
                    (now.iter()).any(|n| n.addr == x.addr && n.weight.max(1) == x.weight.max(1))
                })
        };
        // The last change: when the current list was first taken (recorded), and the list
        // before it (now, if the current list is not recorded yet).
        let (changed_ago, before) = match history.split_last() {
            Some(((ago, last), rest)) if same(last) => (*ago, rest.last().map(|r| &r.1)),
            _ => (Duration::ZERO, history.last().map(|r| &r.1)),
        };
        if st.last_change.is_none() {
            st.last_change = Some(
                Instant::now()
                    .checked_sub(changed_ago)
                    .unwrap_or_else(Instant::now),
            );
        }
        let prior = self.storage_skew().filter(|_| seeding).and_then(|skew| {
            let before = before.filter(|_| changed_ago < 2 * skew)?;
            Some((before, skew))
        });
        // Slots: the list's, then the prior list's other servers (reached by invalidations);
        // every other server named only for the map's continuums.
        let mut slots = st.slots.clone();
        for s in prior.iter().flat_map(|(l, _)| l.iter()) {
            if !slots.iter().any(|x| x.addr == s.addr) {
                slots.push(s.clone());
            }
        }
        let mut specs = slots.clone();
        for s in history.iter().flat_map(|(_, l)| l) {
            if !specs.iter().any(|x| x.addr == s.addr) {
                specs.push(s.clone());
            }
        }
        let ring_of = |specs: &[ServerSpec], list: &[ServerSpec]| {
            let servers = (specs.iter())
                .map(|s| {
                    let weight =
                        (list.iter().find(|x| x.addr == s.addr)).map_or(s.weight, |x| x.weight);
                    ring_server(&ServerSpec {
                        weight,
                        ..s.clone()
                    })
                })
                .collect();
            let order = (list.iter())
                .filter_map(|x| specs.iter().position(|s| s.addr == x.addr))
                .map(|i| i as u32)
                .collect();
            Continuum::with_members(self.inner.dist, self.inner.hash, servers, order)
        };
        let mut rings: Vec<(Duration, Continuum)> = (history.iter())
            .map(|(ago, l)| (*ago, ring_of(&specs, l)))
            .collect();
        rings.push((Duration::ZERO, ring_of(&specs, &now)));
        let mut handover = Handover::default();
        let mut takers: Vec<(Duration, String)> = Vec::new();
        for w in rings.windows(2) {
            handover = handover.after(&w[0].1, &w[1].1);
            for i in crate::ring::handover::takers(&w[0].1, &w[1].1) {
                let i = i as usize;
                if i < st.slots.len() && st.members.contains(&i) {
                    takers.push((w[1].0, st.slots[i].addr.to_string()));
                }
            }
        }
        if !seeding || (handover.is_empty() && prior.is_none()) {
            return Ok(takers);
        }
        // The same members, with what was learnt: a new generation, so every client takes it.
        let generation = st.prepared + 1;
        let labels: Vec<String> = slots.iter().map(|s| s.addr.to_string()).collect();
        let mut joined = old.joined.to_vec();
        joined.resize(slots.len(), 0);
        let topology = Topology {
            generation,
            addrs: slots.iter().map(|s| s.addr.clone()).collect(),
            labels: labels.clone().into(),
            ring: ring_of(&slots, &now),
            handover: Arc::new(handover),
            joined: joined.into(),
            member_labels: Arc::clone(&old.member_labels),
            prior: prior.map(|(before, skew)| {
                Arc::new(Prior {
                    ring: ring_of(&slots, before),
                    at: Instant::now()
                        .checked_sub(changed_ago)
                        .unwrap_or_else(Instant::now),
                    skew,
                })
            }),
        };
        let followers = self.prepare(&mut st, &topology, slots)?;
        self.inner.health.grow(&labels);
        let topology = Arc::new(topology);
        self.inner.current.store(Arc::clone(&topology));
        self.inner.health.list_changed(generation);
        for f in &followers {
            f.published(&topology, &[]);
        }
        Ok(takers)
    }

    /// Tells the followers of `next` (whose servers are `slots`) before it is published.
    /// Its generation and its slots are taken whether or not every follower agrees: those
    /// that did may hold state for it (a shared client's engine per slot, whose clients
    /// took `next`), so a later list never reuses its number or gives its slots to other
    /// servers (such an engine would serve them with its connection to the first).
    /// Returns the followers told, to tell them of the publication.
    fn prepare(
        &self,
        st: &mut State,
        next: &Topology,
        slots: Vec<ServerSpec>,
    ) -> Result<Vec<Arc<dyn ListFollower>>> {
        st.prepared = next.generation;
        st.slots = slots;
        let followers = self.followers();
        for f in &followers {
            f.prepare(next)?;
        }
        Ok(followers)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The servers in the list now, in list order, as configured (`host:port`, with
    /// `:weight` when the weight is not 1).
    pub fn servers(&self) -> Vec<String> {
        let st = self.lock();
        (st.members.iter())
            .map(|&i| match st.slots[i].weight {
                0 | 1 => st.slots[i].addr.to_string(),
                w => format!("{}:{w}", st.slots[i].addr),
            })
            .collect()
    }

    /// The list's generation: 0 as built, higher after every change applied (one more,
    /// or two if a change in between failed as its servers' state was made).
    pub fn generation(&self) -> u64 {
        self.inner.current.load().generation
    }

    /// Replaces the list with `servers` (each as in
    /// [`ClientBuilder::server`](crate::ClientBuilder::server)), subject to the damping and
    /// rate limit the clients were built with. Returns what changed. The same list again
    /// changes nothing.
    ///
    /// # Errors
    /// [`Error::NoServers`] for an empty list (a list never empties: the clients keep the
    /// one they have); [`Error::Config`] for an invalid or repeated server, a TLS name that
    /// cannot be verified, a list over 65,536 distinct servers in its life, or a list whose
    /// clients do not follow changes (see above). The list is unchanged then.
    pub fn set<I, S>(&self, servers: I) -> Result<ListChange>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let specs = servers
            .into_iter()
            .map(|s| s.as_ref().parse::<ServerSpec>())
            .collect::<Result<Vec<_>>>()?;
        self.set_specs(specs)
    }

    /// [`set`](Self::set) with typed servers.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub fn set_specs(&self, specs: Vec<ServerSpec>) -> Result<ListChange> {
        if specs.is_empty() {
            return Err(Error::NoServers);
        }
        for (k, s) in specs.iter().enumerate() {
            if specs[..k].iter().any(|t| t.addr == s.addr) {
                return Err(Error::Config(format!(
                    "server {} is named twice in a new list",
                    s.addr
                )));
            }
            #[cfg(feature = "tls")]
            if let Some(t) = &self.inner.tls {
                t.server_name(&s.addr)?;
            }
        }
        if self.inner.dist == Distribution::Modula {
            return Err(Error::Config(
                "a modula list cannot change: nearly every key would move (build the clients \
                 with a consistent distribution, Distribution::Ketama)"
                    .into(),
            ));
        }
        let mut st = self.lock();
        if let Some(why) = st.frozen {
            return Err(Error::Config(format!(
                "this server list cannot change: {why}"
            )));
        }
        st.wanted = specs;
        self.apply(&mut st, Instant::now())
    }

    /// Applies a change held back by the damping window or the rate limit, if its time has
    /// come (what [`set`](Self::set) with the list last given does).
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub fn refresh(&self) -> Result<ListChange> {
        let mut st = self.lock();
        if st.frozen.is_some() {
            return Ok(ListChange {
                generation: self.generation(),
                ..ListChange::default()
            });
        }
        self.apply(&mut st, Instant::now())
    }

    /// Works out the list to serve now from the wanted one, and swaps it in if it changed.
    fn apply(&self, st: &mut State, now: Instant) -> Result<ListChange> {
        let mut churn = self.inner.churn;
        let skew = self.storage_skew();
        if let Some(skew) = skew {
            // One prior list at a time: the windows of a change end before the next one.
            churn.min_interval = churn.min_interval.max(2 * skew);
        }
        // Damping: a member the wanted list dropped stays until its window ends; one that
        // came back is simply kept.
        let wanted_has = |st: &State, a: &ServerAddr| st.wanted.iter().any(|w| &w.addr == a);
        for &i in &st.members.clone() {
            let addr = st.slots[i].addr.clone();
            if !wanted_has(st, &addr) && !st.leaving.iter().any(|(a, _)| *a == addr) {
                st.leaving.push((addr, now + churn.damping));
            }
        }
        let leaving = std::mem::take(&mut st.leaving);
        st.leaving = (leaving.into_iter())
            .filter(|(a, until)| !wanted_has(st, a) && *until > now)
            .collect();
        let mut next: Vec<ServerSpec> = st.wanted.clone();
        for &i in &st.members {
            let s = &st.slots[i];
            if st.leaving.iter().any(|(a, _)| *a == s.addr) {
                next.push(s.clone());
            }
        }
        let mut change = ListChange {
            generation: self.generation(),
            pending: !st.leaving.is_empty(),
            ..ListChange::default()
        };
        // The same servers with the same weights, in any order, are the same list: a
        // consistent continuum does not depend on the order.
        let same = next.len() == st.members.len()
            && next.iter().all(|n| {
                (st.members.iter().map(|&i| &st.slots[i]))
                    .any(|s| s.addr == n.addr && s.weight.max(1) == n.weight.max(1))
            });
        if same {
            return Ok(change);
        }
        if let Some(at) = st.last_change {
            if now < at + churn.min_interval {
                change.pending = true;
                return Ok(change);
            }
        }
        // Slots: a server keeps the one it had; a new one takes the next.
        let mut members = Vec::with_capacity(next.len());
        let mut slots = st.slots.clone();
        for n in &next {
            let i = match slots.iter().position(|s| s.addr == n.addr) {
                Some(i) => {
                    if !st.members.contains(&i) {
                        change.added.push(n.addr.to_string());
                    } else if slots[i].weight.max(1) != n.weight.max(1) {
                        change.reweighted.push(n.addr.to_string());
                    }
                    slots[i].weight = n.weight;
                    i
                }
                None => {
                    if slots.len() >= MAX_SLOTS {
                        return Err(Error::Config(format!(
                            "a server list names at most {MAX_SLOTS} distinct servers in its \
                             life: build a new client"
                        )));
                    }
                    change.added.push(n.addr.to_string());
                    slots.push(n.clone());
                    slots.len() - 1
                }
            };
            members.push(i);
        }
        for &i in &st.members {
            if !members.contains(&i) {
                change.removed.push(slots[i].addr.to_string());
            }
        }
        let ring = Continuum::with_members(
            self.inner.dist,
            self.inner.hash,
            slots.iter().map(ring_server).collect(),
            members.iter().map(|&i| i as u32).collect(),
        );
        let generation = st.prepared + 1;
        let labels: Vec<String> = slots.iter().map(|s| s.addr.to_string()).collect();
        let old = self.inner.current.load();
        let handover = Arc::new(old.handover.after(&old.ring, &ring));
        let mut joined = old.joined.to_vec();
        joined.resize(slots.len(), 0);
        for &i in &members {
            if !st.members.contains(&i) {
                joined[i] = generation;
            }
        }
        let old_ring = skew.map(|_| old.ring.clone());
        drop(old);
        let topology = Topology {
            generation,
            addrs: slots.iter().map(|s| s.addr.clone()).collect(),
            labels: labels.clone().into(),
            member_labels: members.iter().map(|&i| labels[i].clone()).collect(),
            prior: old_ring.zip(skew).map(|(ring, skew)| {
                Arc::new(Prior {
                    ring,
                    at: Instant::now(),
                    skew,
                })
            }),
            ring,
            handover,
            joined: joined.into(),
        };
        // Room for the new servers' shared state first, then the list, then the signal: a
        // client that sees the list finds the state of every server in it.
        let followers = self.prepare(st, &topology, slots)?;
        self.inner.health.grow(&labels);
        for &i in &members {
            if !st.members.contains(&i) {
                self.inner.health.reset(i);
            }
        }
        let topology = Arc::new(topology);
        self.inner.current.store(Arc::clone(&topology));
        self.inner.health.list_changed(generation);
        let removed: Vec<usize> = (st.members.iter().copied())
            .filter(|i| !members.contains(i))
            .collect();
        for f in &followers {
            f.published(&topology, &removed);
        }
        st.members = members;
        st.last_change = Some(now);
        change.generation = generation;
        crate::observe::list_changed(generation, &change.added, &change.removed);
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A follower that records what it was asked to prepare, and refuses it once when told.
    #[derive(Default)]
    struct Recorder {
        refuse: AtomicBool,
        prepared: Mutex<Vec<(u64, Vec<String>)>>,
    }

    impl ListFollower for Recorder {
        fn prepare(&self, next: &Topology) -> Result<()> {
            let mut p = self.prepared.lock().unwrap();
            p.push((next.generation, next.labels.to_vec()));
            match self.refuse.swap(false, Ordering::AcqRel) {
                true => Err(Error::Config("refused by the test".into())),
                false => Ok(()),
            }
        }
        fn published(&self, _next: &Topology, _removed: &[usize]) {}
    }

    /// A change that a follower refuses (another follower may have made state for it: a
    /// shared client's engine for its new server, whose clients took that list) gives
    /// neither its generation nor its new server's slot to the next change. Before, the
    /// next list reused both: engines that took the refused list saw no change to take,
    /// and the refused server's engine served the next new server's slot.
    #[test]
    fn a_refused_change_gives_neither_its_generation_nor_its_slots_to_the_next() {
        let client = crate::Client::builder()
            .servers(["127.0.0.1:1"])
            .distribution(Distribution::Ketama)
            .build()
            .unwrap();
        let list = client.server_list().clone();
        let recorder = Arc::new(Recorder::default());
        let follower: std::sync::Weak<dyn ListFollower> = Arc::downgrade(&recorder) as _;
        list.add_follower(follower);
        recorder.refuse.store(true, Ordering::Release);
        assert!(list.set(["127.0.0.1:1", "127.0.0.1:2"]).is_err());
        assert_eq!(list.generation(), 0, "a refused change is not published");
        list.set(["127.0.0.1:1", "127.0.0.1:3"]).unwrap();
        let prepared = recorder.prepared.lock().unwrap().clone();
        let (refused, labels) = &prepared[0];
        let slot = labels.iter().position(|l| l == "127.0.0.1:2").unwrap();
        let now = list.topology();
        assert!(
            now.generation > *refused,
            "generation {} published after {refused} was prepared",
            now.generation
        );
        assert_eq!(
            now.labels[slot], "127.0.0.1:2",
            "the refused server's slot was reused"
        );
        assert!(now
            .ring
            .is_member(now.labels.iter().position(|l| l == "127.0.0.1:3").unwrap()));
        assert!(!now.ring.is_member(slot));
        assert_eq!(list.servers(), ["127.0.0.1:1", "127.0.0.1:3"]);
    }
}
