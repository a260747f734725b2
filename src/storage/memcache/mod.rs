//! `MemcacheStorage`: a memcached cluster in front of any other storage.
//!
//! # How it stays correct
//!
//! - **Reads**: cache first. On a miss one reader becomes the *filler*: it reads the master
//!   and stores the value with a CAS taken before its master read. Readers that find a fill
//!   in progress wait (bounded, [`MemcacheStorageBuilder::fill_wait`]) for the value instead
//!   of all reading the master; after the wait they read the master without filling.
//!   - Over the meta protocol this is memcached's own lease (`mg <key> N<ttl>`): the server
//!     creates a placeholder and answers `W` to exactly one reader and `Z` to the others
//!     (protocol.txt, "Meta Get"; notes §7). A stale item (`X`) is never served.
//!   - Over text and binary, the reader puts a short-lived *filling* marker with `add` and
//!     reads its CAS unique with `gets`.
//! - **Writes and removes**: the master first, then the cache entry is invalidated, whatever
//!   the master returned (a write may land and still report an error), and never overwritten
//!   (two writers racing could leave the older value in the cache). It is deleted on every
//!   protocol (not marked stale with meta's `md I`, which text and binary readers of a shared
//!   cache would not see). A filler that read the master before the write fails its CAS and
//!   cannot put the old value back.
//! - **Entries are told apart by their client flags**, on every protocol: content is stored
//!   with `0x4d430000`, a filling marker with `0x4d430001`, a "read the master" marker (content
//!   too large, or refused by the server) with `0x4d430002`. Any other item under a storage's
//!   key, such as a meta lease placeholder (flags 0), is treated as absent and not overwritten.
//!   Clients on different protocols can therefore share one cache.
//! - **Cache failures**: every call still succeeds from the master; the error is counted. A
//!   delete that failed is remembered (up to a bound, in this process, and durably in the
//!   master's [`InvalidationLog`] when it keeps one, where every process sharing the master
//!   sees it and any of them replays it) and the key is not read from the cache until a
//!   replayed delete succeeds. Replays run on each storage's own thread (`mcstore-replay`:
//!   every 100 ms, pipelined batches of at most 1,000 keys), never on a caller's path; past
//!   the bound, the failed server is bypassed until a flush of the server that failed
//!   succeeds (only that server is flushed). So a server that was frozen during a write
//!   cannot serve the old content afterwards.
//! - **Copies** (cache clients built with [`replicas(n)`](crate::ClientBuilder::replicas),
//!   `n > 1`): a read tries the key's copies in the client's read order (copies that are up
//!   first, slow ones later, those the fleet's repair bookkeeping blocks left out), skipping
//!   a copy the storage distrusts (overflowed, or to be flushed); a cache error on one copy
//!   tries the next before the master. The fill protocol (marker or lease, CAS guarded by
//!   the server's instance) runs on the copy the lookup used, pinned there: a fill lands only
//!   on a server that is still one of the key's copies. A write deletes the key on every
//!   copy (each delete pinned to its copy); a copy whose delete fails is remembered as above,
//!   and the key is read from the master until a replay has deleted it on every copy (one
//!   pipelined delete per server). So no copy serves what a write replaced, whichever copy a
//!   later read lands on. With one copy (the default) the storage routes each key to its
//!   own server, as without copies.
//! - **Topology changes**: with `remove_failed_servers`, a key written while its server was
//!   ejected (its keys moved) makes that server distrusted until a flush of it succeeds, so it
//!   never serves an old entry when it rejoins.
//! - **Live server lists** ([`MemcacheStorageBuilder::follow_list`]`(skew)`; without it the
//!   list refuses changes): the processes sharing the master and the cache take each change
//!   of the list at their own moment, at most `skew` apart. Four rules keep every read fresh:
//!   1. *Reads stay where the key was for `skew`*: a process that has not taken the change
//!      reads, fills and invalidates the key on its old server; a process that has reads it
//!      there too (if that server is still in the list) until every process has the change.
//!      Then every process invalidates on the new server, so reads can move there.
//!   2. *Invalidations reach the old server for `2 * skew`*, even a removed one (it lingers):
//!      a process that took the change up to `skew` later still reads there for `skew`.
//!   3. *Every invalidation also deletes the key on its next server* on the continuum: when a
//!      server leaves, its keys go to exactly those servers, which every process kept clean,
//!      also processes started after the key had moved (they know no history).
//!   4. *A server that takes keys it was not next in line for is flushed first*: a new server,
//!      one coming back with the items it had, one taking the keys of a server replaced in
//!      the same change or of two that left at once, a weight change. It is distrusted (its
//!      keys are read from the master) from before the list is published until a flush of it
//!      succeeds, and that flush waits `skew` after the change: until then a process on the
//!      old list may write without deleting there. Every process flushes it (a later flush
//!      costs only misses).
//!   5. *A storage reads only the master for `skew` after it is built*: it may start in the
//!      middle of a change that other processes have not taken yet.
//!   6. *The lists are recorded in the master* (collection `mcstore-server-lists`, one small
//!      resource per list a storage takes, pruned past the entries' TTL), *and the flushes
//!      of rule 4* (`mcstore-server-flushes`): a storage started after changes learns where
//!      its keys were before (its writes delete them there too, as `ring::handover` does for
//!      a process's own changes); within `2 * skew` of the last change, the list before it
//!      (its invalidations reach that list's servers, removed ones too); the flushes still
//!      owed (a storage that stopped before its flush); and when the last change was (its
//!      next change waits `2 * skew` after it, as the others' do).
//!
//!   Changes are at least `2 * skew` apart, so the windows of one change close before the
//!   next. The bound `skew` is an assumption the deployment keeps (a file or DNS polled
//!   every second: a second plus margin; hosts' clocks within a fraction of it, for rule 6):
//!   a process that takes a change later than that may read an entry that a process that
//!   took it earlier superseded, until the entry's TTL. A master that cannot record the
//!   lists is counted as a cache error; the storage then knows only its own changes. What
//!   it costs is measured in BENCHMARKS.md.
//! - Content larger than the cache's item size is marked *too large* in the cache and served
//!   from the master, without error.
//! - `ls`, `ils`, `persist`, `create_container` and `exists` go to the master.
//!
//! For memcached alone, without a master, see [`MemcacheOnlyStorage`](super::MemcacheOnlyStorage).
//!
//! # Layout
//!
//! `fill` reads through the cache (leases, filling markers, CAS-guarded fills); `invalidation`
//! writes through it (intents, deletes, replays), over `pending`, this process's record of the
//! deletes that failed; `clients` is what calls go through, and where a key's servers are
//! asked for (one route, or the copies: `KeyServers`, the one place the two differ). `keys` (cache keys, entry flags)
//! and `counters` are shared with [`MemcacheOnlyStorage`] (`only`), so that both storages read
//! one cache the same way.

mod clients;
mod counters;
mod entry;
mod fill;
mod history;
mod invalidation;
mod keys;
mod only;
mod pending;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::error::Result;
use super::{validate_name, Content, MasterWrite, Part, ResourceInfo, ResourceIter, Storage};
use crate::fleet::live::{ListFollower, Topology};
use counters::{bump, fmt_settings};
use invalidation::Replayer;
use keys::{cache_key, resource_infos};
use pending::Pending;

pub use clients::CacheClients;
pub use counters::StorageCounters;
pub use keys::KeyGenerator;
pub use only::MemcacheOnlyStorage;

/// Default expiration of cached entries: the bound on staleness when every other safeguard
/// failed (see [`MemcacheStorageBuilder::ttl`]).
pub const DEFAULT_TTL: u32 = 3600;

/// Lists waiting to be recorded in the master's history, at most (a master that refuses
/// them for long loses the oldest).
const MAX_TO_RECORD: usize = 64;

/// How long a filling marker (or a meta lease placeholder) lives if its reader dies before
/// filling (default of [`MemcacheStorageBuilder::filler_ttl`]).
const FILLING_TTL: u32 = 5;

/// What a [`MemcacheStorage`] is built from.
struct Settings {
    cache: CacheClients,
    master: Arc<dyn Storage>,
    keys: KeyGenerator,
    ttl: u32,
    /// `None`: the servers' item size (`stats settings`), as a chunked `set` takes it.
    max_item_size: Option<usize>,
    fill_wait: Duration,
    filler_ttl: u32,
    /// Compresses content (`None`: stored as it is; compressed entries are still read).
    compressor: Option<crate::codec::Compressor>,
    /// Content over `max_item_size` up to this many bytes is cached as chunks (0: never).
    chunked_max: usize,
    /// Follows changes of the cache's server list, processes taking them at most this far
    /// apart (`None`: the list may not change).
    follow_list: Option<Duration>,
}

/// Options for a [`MemcacheStorage`].
pub struct MemcacheStorageBuilder {
    settings: Settings,
}

impl std::fmt::Debug for MemcacheStorageBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_settings(
            f,
            "MemcacheStorageBuilder",
            &self.settings.cache,
            self.settings.ttl,
        )
    }
}

impl MemcacheStorageBuilder {
    setters! {
        /// The key generator (default: [`KeyGenerator::default`]).
        key_generator(keys: KeyGenerator) => settings.keys;

        /// Expiration of cached entries in seconds (default [`DEFAULT_TTL`], one hour). It
        /// bounds how long an entry can outlive a write whose invalidation was lost (a cache
        /// server frozen during the write, a process that died before replaying it). 0 means
        /// no expiry, and no such bound.
        ttl(ttl: u32) => settings.ttl;

        /// How long a reader waits for another reader's fill before reading the master itself
        /// (default 200 ms).
        fill_wait(wait: Duration) => settings.fill_wait;

        /// How long a filling marker or lease lives if its reader dies before filling (default
        /// 5 s): the longest a key can stay unfillable. Meanwhile only the first reader waits
        /// ([`fill_wait`](Self::fill_wait)) for it; the others go to the master at once.
        filler_ttl(secs: u32) => settings.filler_ttl;

        /// Caches content over [`max_item_size`](Self::max_item_size), up to `max_bytes`, as
        /// chunks under keys of their own and an index that is the entry (default 0: such
        /// content is always read from the master). The index is filled and invalidated as
        /// any entry is, and its chunks are written first under keys no other write uses, so
        /// a reader gets current content or a miss, never a mix (see `set_chunked` in
        /// [`crate::codec::chunked`]). A chunked hit costs one more request (a multi-get of
        /// the chunks); orphan chunks (a fill that lost its race, a process that died)
        /// expire with the TTL. Storages sharing a cache should agree on it: one without
        /// chunks marks large content "read the master" for the TTL, and the others then
        /// read it from the master too.
        chunked_values(max_bytes: usize) => settings.chunked_max;
    }

    /// Largest entry cached in one item (default: the servers' item size, from `stats
    /// settings` as a chunked `set` asks it, less 1 KiB of item overhead, and at most the
    /// cache clients' `max_value_size`); larger content is cached as chunks with
    /// [`chunked_values`](Self::chunked_values), or else served from the master.
    pub fn max_item_size(mut self, bytes: usize) -> Self {
        self.settings.max_item_size = Some(bytes);
        self
    }

    /// Compresses cached content with `compressor` (at or above its
    /// [`min_size`](crate::codec::Compressor::min_size), and up to its
    /// [`max_decoded`](crate::codec::Compressor::max_decoded): never an entry it could not
    /// read back); compressed entries carry the algorithm in their flags, so storages with
    /// other settings (or none) still read them, except zstd with a dictionary, which needs
    /// the same dictionary: a storage without it deletes such an entry when it meets it (a
    /// cache error) and fills its own.
    /// [`StorageCounters::compressed_fills`] and [`StorageCounters::bytes_saved`] show what
    /// it saved.
    pub fn compression(mut self, compressor: crate::codec::Compressor) -> Self {
        self.settings.compressor = Some(compressor);
        self
    }

    /// Follows changes of the cache clients' [`ServerList`](crate::ServerList) (without
    /// this, the list refuses changes once the storage is built), for processes sharing the
    /// master and the cache that take each change at most `skew` apart (every process's
    /// storage of one cache must be built with it, and the same `skew`). See "Live server
    /// lists" in the module documentation for what it costs; in short:
    /// - each write deletes its entry on two servers (the key's own and its next one);
    /// - for `skew` after a change, a moved key is still read where it was;
    /// - for `2 * skew`, writes also delete it there;
    /// - changes are at least `2 * skew` apart (later ones wait: see
    ///   [`ListChange::pending`](crate::ListChange::pending));
    /// - a server that joins is flushed before it serves (`skew` after the change);
    /// - the storage reads only the master for `skew` after it is built;
    /// - the lists it takes are recorded in the master (collection `mcstore-server-lists`),
    ///   for storages started later.
    ///
    /// `skew` must cover the spread of the discovery that feeds the processes (a servers
    /// file re-read every second: a second, plus margin). Clients with copies or zones keep
    /// refusing changes.
    pub fn follow_list(mut self, skew: Duration) -> Self {
        self.settings.follow_list = Some(skew.max(Duration::from_millis(1)));
        self
    }

    /// Builds the storage.
    pub fn build(self) -> MemcacheStorage {
        let list = self.settings.cache.server_list();
        let follow = self.settings.follow_list;
        if follow.is_none() {
            // A key that moves to another server and back could find an entry there that
            // a write superseded: only a storage built to follow changes allows them.
            list.freeze(
                "a MemcacheStorage built without follow_list does not follow list changes \
                 (a key that moves could find an entry a write superseded)",
            );
        }
        let mut shared = Arc::new(Shared {
            settings: self.settings,
            counters: Counters::default(),
            pending: Mutex::new(Pending::default()),
            stuck: Mutex::new(HashMap::new()),
            inline_replay: false,
            built: Instant::now(),
            to_record: Mutex::new(Vec::new()),
        });
        let replayer = Replayer::start(&shared).ok();
        if replayer.is_none() {
            Arc::get_mut(&mut shared)
                .expect("not shared yet")
                .inline_replay = true;
        }
        let watch = follow.map(|skew| {
            list.follow_for_storage(skew);
            shared.learn_history(&list, skew);
            let watch = Arc::new(ListWatch {
                shared: Arc::downgrade(&shared),
            });
            let follower: std::sync::Weak<dyn ListFollower> = Arc::downgrade(&watch) as _;
            list.add_follower(follower);
            watch
        });
        MemcacheStorage {
            shared,
            _replayer: replayer,
            _watch: watch,
        }
    }
}

/// What a storage that follows its cache's list does at each change: a server that takes
/// keys it was not next in line for (a new server, one coming back, one taking the keys of
/// two that left) may hold older entries of them, so it is distrusted before the list is
/// published, until a flush of it succeeds; a server that left needs no flush any more.
struct ListWatch {
    shared: std::sync::Weak<Shared>,
}

impl ListFollower for ListWatch {
    fn prepare(&self, next: &Topology) -> crate::Result<()> {
        let (Some(shared), Some(prior)) = (self.shared.upgrade(), &next.prior) else {
            return Ok(());
        };
        let takers = crate::ring::handover::takers(&prior.ring, &next.ring);
        // Flushed once every process has the change (a flush before that could be
        // followed by a fill that a process still on the old list never invalidates there).
        let after = prior.at + prior.skew;
        let mut p = shared.lock_pending();
        for i in takers {
            p.distrust_server_until(next.labels[i as usize].clone(), after);
        }
        crate::observe::pending(p.len());
        Ok(())
    }

    fn published(&self, next: &Topology, removed: &[usize]) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut p = shared.lock_pending();
        for &i in removed {
            p.forget_server(&next.labels[i]);
        }
        drop(p);
        let mut r = shared.to_record.lock().unwrap_or_else(|p| p.into_inner());
        r.push((history::now_ms(), recorded_servers(next)));
    }
}

/// The servers of `t` as the master's history records them (with their weights).
fn recorded_servers(t: &Topology) -> Vec<String> {
    (t.ring.members().iter().map(|&i| i as usize))
        .map(|i| history::line(&t.labels[i], t.ring.servers()[i].weight))
        .collect()
}

/// A cache-through proxy storage (see the module documentation for the rules it keeps).
///
/// ```no_run
/// use std::sync::Arc;
/// use mcstore::{Client, Pool};
/// use mcstore::storage::{FsStorage, MemcacheStorage, Storage};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let master = Arc::new(FsStorage::open("./data")?);
/// let pool = Pool::new(Client::builder().server("127.0.0.1:11211"), 8)?;
/// let store = MemcacheStorage::new(pool, master);
/// store.create_container("posts")?;
/// let info = store.info("posts", Some("hello.txt"))?;
/// store.put_content(&info, "hello".into())?;
/// assert_eq!(&store.get_content(&info)?[..], b"hello");   // cache miss, filled
/// assert_eq!(&store.get_content(&info)?[..], b"hello");   // cache hit
/// # Ok(()) }
/// ```
pub struct MemcacheStorage {
    shared: Arc<Shared>,
    /// Replays failed invalidations in the background; stopped on drop.
    _replayer: Option<Replayer>,
    /// Told of the cache's list changes, with [`MemcacheStorageBuilder::follow_list`]
    /// (the list holds it weakly: dropped with the storage).
    _watch: Option<Arc<ListWatch>>,
}

/// The live counts behind [`StorageCounters`], one per field.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    cache_errors: AtomicU64,
    master_reads: AtomicU64,
    fills: AtomicU64,
    fill_waits: AtomicU64,
    bypassed: AtomicU64,
    replayed: AtomicU64,
    replay_batches: AtomicU64,
    compressed_fills: AtomicU64,
    bytes_saved: AtomicU64,
    chunked_fills: AtomicU64,
    chunked_hits: AtomicU64,
}

/// What the storage's callers and its replay thread share.
struct Shared {
    settings: Settings,
    counters: Counters,
    pending: Mutex<Pending>,
    /// Keys whose filler did not fill within `fill_wait`, until its marker expires: readers
    /// go to the master without waiting again.
    stuck: Mutex<HashMap<String, Instant>>,
    /// No replay thread could be started: callers replay (at most every `REPLAY_EVERY`).
    inline_replay: bool,
    /// When the storage was built: following a list, it reads nothing from the cache for
    /// the skew after (see [`starting`](Shared::starting)).
    built: Instant,
    /// Lists taken, to record in the master's history (by the replay thread: `set` must
    /// not wait for the master), with the time they were taken.
    to_record: Mutex<Vec<(u64, Vec<String>)>>,
}

impl std::fmt::Debug for MemcacheStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = &self.shared.settings;
        fmt_settings(f, "MemcacheStorage", &settings.cache, settings.ttl)
    }
}

impl MemcacheStorage {
    /// A proxy in front of `master`, using the cache through `cache`: a
    /// [`Pool`](crate::Pool), a [`SharedClient`](crate::client::SharedClient) or a single
    /// [`Client`](crate::Client) (see [`CacheClients`]). For memcached alone,
    /// see [`MemcacheOnlyStorage`](super::MemcacheOnlyStorage).
    pub fn new(cache: impl Into<CacheClients>, master: Arc<dyn Storage>) -> MemcacheStorage {
        MemcacheStorage::builder(cache, master).build()
    }

    /// Like [`new`](Self::new), with options.
    pub fn builder(
        cache: impl Into<CacheClients>,
        master: Arc<dyn Storage>,
    ) -> MemcacheStorageBuilder {
        let cache = cache.into();
        MemcacheStorageBuilder {
            settings: Settings {
                cache,
                master,
                keys: KeyGenerator::default(),
                ttl: DEFAULT_TTL,
                max_item_size: None,
                fill_wait: Duration::from_millis(200),
                filler_ttl: FILLING_TTL,
                compressor: None,
                chunked_max: 0,
                follow_list: None,
            },
        }
    }

    /// What the cache has done so far.
    pub fn counters(&self) -> StorageCounters {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StorageCounters {
            hits: l(&c.hits),
            misses: l(&c.misses),
            cache_errors: l(&c.cache_errors),
            master_reads: l(&c.master_reads),
            fills: l(&c.fills),
            fill_waits: l(&c.fill_waits),
            bypassed: l(&c.bypassed),
            replayed: l(&c.replayed),
            replay_batches: l(&c.replay_batches),
            compressed_fills: l(&c.compressed_fills),
            bytes_saved: l(&c.bytes_saved),
            chunked_fills: l(&c.chunked_fills),
            chunked_hits: l(&c.chunked_hits),
        }
    }

    /// Invalidations that failed and await a successful replay.
    pub fn pending_invalidations(&self) -> usize {
        self.shared.lock_pending().len()
    }
}

impl Shared {
    /// For a storage that follows `list`: seeds its previous owners from the lists the
    /// master recorded (other processes' changes before this one started), and records the
    /// list it starts with. A master that cannot is counted as a cache error: the storage
    /// then knows only its own changes.
    fn learn_history(&self, list: &crate::ServerList, skew: Duration) {
        let master = &*self.settings.master;
        let now = history::now_ms();
        let horizon = history::horizon(self.settings.ttl, skew);
        let since = now.saturating_sub(u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX));
        let takers = match self.load_history(master, since, now) {
            Ok(history) => list.seed_history(&history),
            Err(e) => Err(e),
        };
        match takers {
            Ok(takers) => self.owe_flushes(master, takers, since, now, skew),
            Err(e) => self.cache_failed(&e),
        }
        if let Err(e) = history::record(master, &recorded_servers(&list.topology()), now, since) {
            self.cache_failed(&e);
        }
    }

    /// The master's history of lists since `since` (ms), each with how long before `now`
    /// it was first taken. A record that does not read back as servers makes the whole
    /// history unknown (an error): a list missing from the middle would mislead.
    fn load_history(
        &self,
        master: &dyn Storage,
        since: u64,
        now: u64,
    ) -> std::result::Result<Vec<(Duration, Vec<crate::ServerSpec>)>, crate::Error> {
        let lists = history::load(master, since)
            .map_err(|e| crate::Error::Config(format!("the master's list history: {e}")))?;
        (lists.iter())
            .map(|(at, l)| {
                let specs = (l.iter().map(|s| history::parse_line(s)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        crate::Error::Config(format!(
                            "a record of the master's list history does not read back: {l:?}"
                        ))
                    })?;
                Ok((Duration::from_millis(now.saturating_sub(*at)), specs))
            })
            .collect()
    }

    /// Distrusts the servers that took keys in a recent change (`takers`: server and how
    /// long ago) unless the master records a flush of them once every process had that
    /// change (`skew` after it): the storage that owed it may have stopped first.
    fn owe_flushes(
        &self,
        master: &dyn Storage,
        takers: Vec<(Duration, String)>,
        since: u64,
        now: u64,
        skew: Duration,
    ) {
        if takers.is_empty() {
            return;
        }
        let flushes = match history::load_flushes(master, since) {
            Ok(f) => f,
            Err(e) => {
                self.cache_failed(&e);
                Vec::new()
            }
        };
        let skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
        let mut p = self.lock_pending();
        for (ago, server) in takers {
            let changed = now.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX));
            let flushed = (flushes.iter())
                .any(|(at, s)| *s == server && *at >= changed.saturating_add(skew_ms));
            if !flushed {
                let after = (Instant::now() + skew)
                    .checked_sub(ago)
                    .unwrap_or_else(Instant::now);
                p.distrust_server_until(server, after);
            }
        }
    }

    /// Records the lists taken since the last call in the master's history (those the
    /// master refuses are tried again at the next call).
    fn record_lists(&self, skew: Duration) {
        let lists = std::mem::take(&mut *self.to_record.lock().unwrap_or_else(|p| p.into_inner()));
        let mut left = Vec::new();
        for (at, servers) in lists {
            let since = at.saturating_sub(self.horizon_ms(skew));
            if let Err(e) = history::record(&*self.settings.master, &servers, at, since) {
                self.cache_failed(&e);
                left.push((at, servers));
            }
        }
        if !left.is_empty() {
            let mut r = self.to_record.lock().unwrap_or_else(|p| p.into_inner());
            left.append(&mut r);
            // Bounded: the oldest go first (past the horizon they matter no more).
            let excess = left.len().saturating_sub(MAX_TO_RECORD);
            left.drain(..excess);
            *r = left;
        }
    }

    /// How far back the history matters, in ms.
    fn horizon_ms(&self, skew: Duration) -> u64 {
        u64::try_from(history::horizon(self.settings.ttl, skew).as_millis()).unwrap_or(u64::MAX)
    }

    /// A flush of `server`, a server that took keys, succeeded: recorded in the master for
    /// storages started later.
    pub(super) fn record_flush(&self, server: &str) {
        let Some(skew) = self.settings.follow_list else {
            return;
        };
        let now = history::now_ms();
        let since = now.saturating_sub(self.horizon_ms(skew));
        if let Err(e) = history::record_flush(&*self.settings.master, server, now, since) {
            self.cache_failed(&e);
        }
    }

    /// Following a list, within the skew after the storage was built: it may have started
    /// in the middle of a change that other processes have not taken yet, and it does not
    /// know the list before. Reads go to the master (no fill) until every process has the
    /// list it started with.
    fn starting(&self) -> bool {
        self.settings
            .follow_list
            .is_some_and(|skew| self.built.elapsed() < skew)
    }

    fn cache_failed(&self, _e: &dyn std::error::Error) {
        bump(
            &self.counters.cache_errors,
            "mcstore_storage_cache_errors_total",
        );
    }

    /// Refuses what cannot be kept fresh: a client namespace. Storages in front of one
    /// master must all use the same cache keys, because a write deletes only the entry
    /// under its own key: one with another namespace would keep serving the old content
    /// (until its TTL). The key generator is where a prefix goes
    /// ([`MemcacheStorageBuilder::key_generator`]), the same for every storage of a master.
    fn check_config(&self) -> Result<()> {
        let ns = match &self.settings.cache {
            CacheClients::Pool(p) => p.namespace(),
            CacheClients::Shared(c) => c.namespace(),
        };
        if ns.is_empty() {
            return Ok(());
        }
        Err(super::StorageError::Config(format!(
            "MemcacheStorage over clients with a namespace ({:?}): a write invalidates only \
             its own namespace's entry, so a storage of the same master with another \
             namespace would serve stale content; put a prefix in the key generator \
             instead, the same for every storage of one master",
            String::from_utf8_lossy(&ns)
        )))
    }

    /// The master's own info for the same names.
    fn master_info(&self, m: &dyn Storage, info: &ResourceInfo) -> Result<ResourceInfo> {
        m.info(&info.collection, info.resource.as_deref())
    }

    /// The cache key of one half of a resource, or `None` if the key generator made no valid
    /// memcached key of its names: then nothing of it can be cached, and calls go to the
    /// master (counted as bypassed).
    fn key(&self, info: &ResourceInfo, part: Part) -> Option<String> {
        let key = cache_key(&self.settings.keys, info, part).ok();
        if key.is_none() {
            bump(&self.counters.bypassed, "mcstore_storage_bypassed_total");
        }
        key
    }
}

impl Storage for MemcacheStorage {
    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        self.shared
            .cached_get(&*self.shared.settings.master, info, part)
    }

    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()> {
        self.shared
            .write_through(info, part, MasterWrite::Put(data))
    }

    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()> {
        self.shared.write_through(info, part, MasterWrite::Remove)
    }

    fn create_container(&self, collection: &str) -> Result<()> {
        validate_name(collection)?;
        self.shared.settings.master.create_container(collection)
    }

    fn info(&self, collection: &str, resource: Option<&str>) -> Result<ResourceInfo> {
        self.shared.check_config()?;
        validate_name(collection)?;
        if let Some(r) = resource {
            validate_name(r)?;
        }
        // The master's own rules too (encoded length).
        self.shared.settings.master.info(collection, resource)?;
        // A name the key generator makes no valid cache key of is still served (by the master).
        Ok(ResourceInfo {
            collection: collection.to_string(),
            resource: resource.map(str::to_string),
            key: self.shared.settings.keys.key(collection, resource),
        })
    }

    fn exists(&self, info: &ResourceInfo) -> Result<bool> {
        // Only the master knows: the cache may hold what the master no longer has.
        self.shared.settings.master.exists(
            &self
                .shared
                .master_info(&*self.shared.settings.master, info)?,
        )
    }

    fn ls(&self, collection: &str, ext: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>> {
        self.ils(collection, ext)?.collect()
    }

    fn ils(&self, collection: &str, ext: Option<&str>) -> Result<ResourceIter<'_>> {
        validate_name(collection)?;
        let names = self
            .shared
            .settings
            .master
            .ils(collection, ext)?
            .map(|r| r.map(|(n, _)| n));
        Ok(resource_infos(
            &self.shared.settings.keys,
            collection,
            names,
        ))
    }

    fn persist(&self, paths: &[&str]) -> Result<()> {
        self.shared.settings.master.persist(paths)
    }

    fn shutdown(&self) -> Result<()> {
        self.shared.settings.master.shutdown()
    }
}
