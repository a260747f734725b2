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
//!   every 100 ms, pipelined batches of at most 1,000 keys), never on a caller's path; past the bound, the failed server is bypassed until a
//!   flush of the server that failed succeeds (only that server is flushed). So a server
//!   that was frozen during a write cannot serve the old content afterwards.
//! - **Topology changes**: with `remove_failed_servers`, a key written while its server was
//!   ejected (its keys moved) makes that server distrusted until a flush of it succeeds, so it
//!   never serves an old entry when it rejoins.
//! - Content larger than the cache's item size is marked *too large* in the cache and served
//!   from the master, without error.
//! - `ls`, `ils`, `persist`, `create_container` and `exists` go to the master.
//!
//! For memcached alone, without a master, see [`MemcacheOnlyStorage`](super::MemcacheOnlyStorage).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::error::Result;
use super::{
    validate_name, Content, InvalidationLog, LogEntry, MasterWrite, Part, ResourceInfo,
    ResourceIter, Storage,
};
use crate::client::Key;
use crate::client::{
    CasResult, Client, Lease, MetaGetOptions, Pool, PooledClient, ServerInstance, SetOptions,
    SharedClient,
};

/// Client flags of this storage's cache entries (`MC` and a kind), so that readers on any
/// protocol tell them apart: content, a filling marker, a "read the master" marker. Anything
/// else, a meta lease placeholder (flags 0) included, is not content.
pub(super) const FLAG_VALUE: u32 = 0x4d43_0000;
const FLAG_FILLING: u32 = 0x4d43_0001;
const FLAG_TOO_LARGE: u32 = 0x4d43_0002;

/// Default expiration of cached entries: the bound on staleness when every other safeguard
/// failed (see [`MemcacheStorageBuilder::ttl`]).
pub const DEFAULT_TTL: u32 = 3600;

/// How long a filling marker (or a meta lease placeholder) lives if its reader dies before
/// filling (default of [`MemcacheStorageBuilder::filler_ttl`]).
const FILLING_TTL: u32 = 5;
/// Keys remembered as stuck (a filler that never filled) before the oldest are dropped.
const MAX_STUCK: usize = 10_000;
/// Failed invalidations remembered before the whole cache is distrusted.
const MAX_PENDING: usize = 10_000;
/// Minimum time between replays of failed invalidations.
const REPLAY_EVERY: Duration = Duration::from_millis(100);
/// Failed invalidations replayed by one call at most (one pipelined request per server), so
/// that a long backlog adds a bounded cost to the read or write that replays it.
const REPLAY_BATCH: usize = 1000;
/// Poll interval while waiting for another reader's fill.
const FILL_POLL: Duration = Duration::from_millis(2);

/// Makes the cache key of a resource (or collection) from its names. The storage appends
/// `:c` for content and `:m` for metadata, so the result must leave room for 2 bytes.
///
/// A custom generator must be injective (distinct names, distinct keys: otherwise two
/// resources share cache entries) and should make valid memcached keys (at most 248 bytes, no
/// spaces or control characters). Names it makes no valid key of are not cached: with
/// [`MemcacheStorage`] those calls go to the master, with
/// [`MemcacheOnlyStorage`](super::MemcacheOnlyStorage) they fail.
///
/// ```
/// use mcstore::storage::KeyGenerator;
/// let k = KeyGenerator::default().key("posts", Some("hello world.txt"));
/// assert!(k.starts_with("mcs:posts:") && k.len() == 4 + 5 + 1 + 64);
/// // The collection's length first, so that ("a:b", "c") and ("a", "b:c") differ.
/// let custom = KeyGenerator::new(|c, r| format!("app:{}:{c}:{}", c.len(), r.unwrap_or("")));
/// assert_eq!(custom.key("a:b", Some("c")), "app:3:a:b:c");
/// assert_eq!(custom.key("a", Some("b:c")), "app:1:a:b:c");
/// ```
#[derive(Clone)]
pub struct KeyGenerator(Arc<KeyFn>);

impl std::fmt::Debug for KeyGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyGenerator(..)")
    }
}

type KeyFn = dyn Fn(&str, Option<&str>) -> String + Send + Sync;

impl KeyGenerator {
    /// A custom generator.
    pub fn new(f: impl Fn(&str, Option<&str>) -> String + Send + Sync + 'static) -> Self {
        KeyGenerator(Arc::new(f))
    }

    /// The key for `collection` / `resource`.
    pub fn key(&self, collection: &str, resource: Option<&str>) -> String {
        (self.0)(collection, resource)
    }
}

impl Default for KeyGenerator {
    /// `mcs:<collection, sanitised, at most 40 bytes>:<hex SHA-256 of the names>`: always a
    /// valid memcached key, whatever the names contain, and distinct for distinct names.
    fn default() -> Self {
        KeyGenerator::new(|collection, resource| {
            let mut h = Sha256::new();
            h.update(collection.as_bytes());
            h.update([0]);
            if let Some(r) = resource {
                h.update(r.as_bytes());
                h.update([1]);
            }
            let mut key = String::from("mcs:");
            key.extend(collection.chars().take(40).map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            }));
            key.push(':');
            for b in h.finalize() {
                let _ = write!(key, "{b:02x}");
            }
            key
        })
    }
}

/// What the cache did, for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageCounters {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that missed the cache.
    pub misses: u64,
    /// Cache calls that failed (absorbed: the master served or took the call).
    pub cache_errors: u64,
    /// Reads that went to the master.
    pub master_reads: u64,
    /// Values stored in the cache by readers after a miss.
    pub fills: u64,
    /// Reads that found another reader filling and waited for it.
    pub fill_waits: u64,
    /// Calls that skipped the cache: an invalidation of their key was pending, or the key
    /// generator made no valid cache key of their names.
    pub bypassed: u64,
    /// Failed invalidations a replay has since deleted (this process's, and the master's
    /// log's, which may hold other processes' records).
    pub replayed: u64,
    /// Pipelined delete batches replays sent (each of at most 1,000 keys).
    pub replay_batches: u64,
}

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
}

/// Counts one event, in the storage's counters and as metric `name`.
pub(super) fn bump(c: &AtomicU64, name: &'static str) {
    crate::observe::storage(name, 1);
    c.fetch_add(1, Ordering::Relaxed);
}

/// Failed invalidations awaiting a replay. Every failure gets a new generation, so a replay
/// clears only the records it replayed: a failure recorded for the same key while the replay
/// was under way stays (no ABA). Past `max` records, the server whose invalidation failed is
/// *overflowed*: its cache is distrusted until a flush of that server succeeds (and only that
/// server is flushed: healthy servers are never wiped because another one is down). A failure
/// that names no server overflows them all.
#[derive(Default)]
struct Pending {
    /// Each key's latest failure: its generation and the server that failed.
    keys: HashMap<String, (u64, Option<String>)>,
    /// Overflowed servers (`None`: all) and the generation of their latest failure since.
    overflow: HashMap<Option<String>, u64>,
    next_gen: u64,
    last_replay: Option<Instant>,
}

/// What a replay is to do: flush overflowed servers, or replay records.
enum Replay {
    /// Records: key, generation, the server that failed.
    Keys(Vec<(String, u64, Option<String>)>),
    Flush(Vec<(Option<String>, u64)>),
}

impl Pending {
    fn record(&mut self, key: String, server: Option<&str>, max: usize) {
        self.next_gen += 1;
        let gen = self.next_gen;
        if let Some(all) = self.overflow.get_mut(&None) {
            *all = gen;
            return;
        }
        let server = server.map(str::to_string);
        if self.overflow.contains_key(&server) || self.keys.len() >= max {
            // Its flush will cover its keys.
            match &server {
                Some(_) => self.keys.retain(|_, (_, s)| *s != server),
                None => self.keys.clear(),
            }
            self.overflow.insert(server, gen);
        } else {
            self.keys.insert(key, (gen, server));
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.overflow.is_empty()
    }

    /// Whether `key` (on server `server`, if known) must not be read from the cache.
    fn distrusts(&self, key: &str, server: impl FnOnce() -> Option<String>) -> bool {
        if self.keys.contains_key(key) || self.overflow.contains_key(&None) {
            return true;
        }
        // Only when a server overflowed: finding the key's server costs a hash.
        !self.overflow.is_empty() && server().is_none_or(|s| self.overflow.contains_key(&Some(s)))
    }

    /// The next replay: the overflowed servers' flushes, or up to `batch` keys.
    fn take(&self, batch: usize) -> Replay {
        if !self.overflow.is_empty() {
            return Replay::Flush(self.overflow.iter().map(|(s, g)| (s.clone(), *g)).collect());
        }
        Replay::Keys(
            self.keys
                .iter()
                .take(batch)
                .map(|(k, (g, s))| (k.clone(), *g, s.clone()))
                .collect(),
        )
    }

    /// The invalidation of `key` recorded at `gen` was replayed.
    fn replayed(&mut self, key: &str, gen: u64) {
        if self.keys.get(key).is_some_and(|(g, _)| *g == gen) {
            self.keys.remove(key);
        }
    }

    /// `server` may hold entries that were not invalidated (it was out of the ring while they
    /// were written, or a key of a failed invalidation has moved off it): it is distrusted
    /// until a flush of it succeeds.
    fn distrust_server(&mut self, server: String) {
        self.next_gen += 1;
        self.overflow.insert(Some(server), self.next_gen);
    }

    /// A flush of `server` (`None`: all) taken at generation `gen` succeeded.
    fn flushed(&mut self, server: &Option<String>, gen: u64) {
        if self.overflow.get(server) == Some(&gen) {
            self.overflow.remove(server);
        }
    }

    fn len(&self) -> usize {
        self.keys.len() + self.overflow.len()
    }
}

/// The memcached clients a [`MemcacheStorage`] calls through: a [`Pool`] (each call checks a
/// client out), or a [`SharedClient`] (warm reads of concurrent callers share multi-gets;
/// a miss's fill protocol borrows the key's server connection for its few calls). Built
/// with `.into()` from either, or from a single [`Client`].
#[derive(Debug, Clone)]
pub enum CacheClients {
    /// Clients checked out per call.
    Pool(Pool),
    /// One shared, batching client.
    Shared(SharedClient),
}

impl From<Pool> for CacheClients {
    fn from(p: Pool) -> CacheClients {
        CacheClients::Pool(p)
    }
}

impl From<Client> for CacheClients {
    fn from(c: Client) -> CacheClients {
        CacheClients::Pool(c.into())
    }
}

impl From<SharedClient> for CacheClients {
    fn from(c: SharedClient) -> CacheClients {
        CacheClients::Shared(c)
    }
}

/// A client for a few calls in a row: checked out of the pool, or lent by the shared client.
// Lives on the stack for one storage call; boxing the pooled client would allocate per call.
#[allow(clippy::large_enum_variant)]
enum Checkout<'a> {
    Pooled(PooledClient<'a>),
    Lent(crate::client::shared::Lent<'a>),
}

impl std::ops::Deref for Checkout<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c) => c,
        }
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c) => c,
        }
    }
}

/// What a [`MemcacheStorage`] is built from.
struct Settings {
    cache: CacheClients,
    master: Arc<dyn Storage>,
    keys: KeyGenerator,
    ttl: u32,
    max_item_size: usize,
    fill_wait: Duration,
    filler_ttl: u32,
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

/// What the storages over memcached and the builder show: the pool and the TTL.
pub(super) fn fmt_settings(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    pool: &dyn std::fmt::Debug,
    ttl: u32,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("pool", pool)
        .field("ttl", &ttl)
        .finish_non_exhaustive()
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

        /// Largest content cached (default 1 MiB less 1 KiB of item overhead, for memcached's
        /// default `-I 1m`); larger content is served from the master.
        max_item_size(bytes: usize) => settings.max_item_size;

        /// How long a reader waits for another reader's fill before reading the master itself
        /// (default 200 ms).
        fill_wait(wait: Duration) => settings.fill_wait;

        /// How long a filling marker or lease lives if its reader dies before filling (default
        /// 5 s): the longest a key can stay unfillable. Meanwhile only the first reader waits
        /// ([`fill_wait`](Self::fill_wait)) for it; the others go to the master at once.
        filler_ttl(secs: u32) => settings.filler_ttl;
    }

    /// Builds the storage.
    pub fn build(self) -> MemcacheStorage {
        let mut shared = Arc::new(Shared {
            settings: self.settings,
            counters: Counters::default(),
            pending: Mutex::new(Pending::default()),
            stuck: Mutex::new(HashMap::new()),
            inline_replay: false,
        });
        let replayer = Replayer::start(&shared).ok();
        if replayer.is_none() {
            Arc::get_mut(&mut shared)
                .expect("not shared yet")
                .inline_replay = true;
        }
        MemcacheStorage {
            shared,
            _replayer: replayer,
        }
    }
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
}

/// What the storage's callers and its replay thread share.
struct Shared {
    settings: Settings,
    counters: Counters,
    pending: Mutex<Pending>,
    /// Keys whose filler did not fill within `fill_wait`, until its marker expires: readers
    /// go to the master without waiting again.
    stuck: Mutex<HashMap<String, Instant>>,
    /// No replay thread could be started: callers replay (at most every [`REPLAY_EVERY`]).
    inline_replay: bool,
}

/// The thread that replays failed invalidations, off every caller's path: every
/// [`REPLAY_EVERY`], a batch of at most [`REPLAY_BATCH`] keys, with a client checked out only
/// when something is pending.
struct Replayer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replayer {
    fn start(shared: &Arc<Shared>) -> std::io::Result<Replayer> {
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mcstore-replay".into())
            .spawn(move || {
                // Ends when the storage drops the sender.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REPLAY_EVERY)
                {
                    shared.replay();
                }
            })?;
        Ok(Replayer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // a replay under way ends within its I/O timeouts
        }
    }
}

/// The cache key of one half of a resource: the generator's key for its names, and `:c` or
/// `:m`. Made from the names, never from `info.key` (a caller could pass another storage's
/// info, or change it). An error if it is not a valid memcached key.
pub(super) fn cache_key(keys: &KeyGenerator, info: &ResourceInfo, part: Part) -> Result<String> {
    let suffix = match part {
        Part::Content => ":c",
        Part::Meta => ":m",
    };
    let key = format!(
        "{}{suffix}",
        keys.key(&info.collection, info.resource.as_deref())
    );
    Key::new(key.as_bytes())?;
    Ok(key)
}

/// The result of looking a key up in the cache.
enum Lookup {
    Hit(Bytes),
    /// Not cached; if we own the fill, the CAS unique of our filling marker.
    Miss(Option<u64>),
    /// Do not fill (too large, or another reader did not finish in time).
    Master,
    /// Another reader is filling it: look again shortly (without holding a client).
    Wait,
}

impl std::fmt::Debug for MemcacheStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = &self.shared.settings;
        fmt_settings(f, "MemcacheStorage", &settings.cache, settings.ttl)
    }
}

impl MemcacheStorage {
    /// A proxy in front of `master`, using the cache through `cache`: a [`Pool`], a
    /// [`SharedClient`] or a single [`Client`] (see [`CacheClients`]). For memcached alone,
    /// see [`MemcacheOnlyStorage`](super::MemcacheOnlyStorage).
    pub fn new(cache: impl Into<CacheClients>, master: Arc<dyn Storage>) -> MemcacheStorage {
        MemcacheStorage::builder(cache, master).build()
    }

    /// Like [`new`](Self::new), with options.
    pub fn builder(
        cache: impl Into<CacheClients>,
        master: Arc<dyn Storage>,
    ) -> MemcacheStorageBuilder {
        MemcacheStorageBuilder {
            settings: Settings {
                cache: cache.into(),
                master,
                keys: KeyGenerator::default(),
                ttl: DEFAULT_TTL,
                max_item_size: 1024 * 1024 - 1024,
                fill_wait: Duration::from_millis(200),
                filler_ttl: FILLING_TTL,
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
        }
    }

    /// Invalidations that failed and await a successful replay.
    pub fn pending_invalidations(&self) -> usize {
        self.shared.lock_pending().len()
    }
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_failed(&self, _e: &dyn std::error::Error) {
        bump(
            &self.counters.cache_errors,
            "mcstore_storage_cache_errors_total",
        );
    }

    /// Remembers a failed invalidation in this process (its write records it in the master's
    /// invalidation log, once, where every process sees it: see `write_through`).
    fn remember(&self, key: String, server: Option<&str>) {
        let mut p = self.lock_pending();
        p.record(key, server, MAX_PENDING);
        crate::observe::pending(p.len());
    }

    /// True if `key` must not be read from the cache (an invalidation is pending, here or in
    /// the master's log).
    fn distrusted(&self, key: &str, server: &str) -> bool {
        if self
            .lock_pending()
            .distrusts(key, || Some(server.to_string()))
        {
            return true;
        }
        match self.settings.master.invalidation_log() {
            // A log that cannot be read cannot vouch for the entry.
            Some(log) => log.contains(key).unwrap_or(true),
            None => false,
        }
    }

    /// Without a replay thread: replays from a caller's call, at most every
    /// [`REPLAY_EVERY`].
    fn replay_inline(&self) {
        if !self.inline_replay {
            return;
        }
        {
            let mut p = self.lock_pending();
            let now = Instant::now();
            if p.last_replay.is_some_and(|t| now - t < REPLAY_EVERY) {
                return;
            }
            p.last_replay = Some(now);
        }
        self.replay();
    }

    /// Replays failed invalidations: at most [`REPLAY_BATCH`] of this process's, and as many
    /// of the master's log (every process's). A client is checked out only if something is
    /// pending.
    fn replay(&self) {
        let replay = {
            let p = self.lock_pending();
            (!p.is_empty()).then(|| p.take(REPLAY_BATCH))
        };
        let log = self.settings.master.invalidation_log();
        let entries = match log
            .filter(|l| l.may_have_pending())
            .map(|l| l.pending(REPLAY_BATCH))
        {
            Some(Ok(entries)) => entries,
            Some(Err(e)) => {
                self.cache_failed(&e);
                Vec::new()
            }
            None => Vec::new(),
        };
        if replay.is_none() && entries.is_empty() {
            return;
        }
        let Some(mut c) = self.checkout(None) else {
            return;
        };
        let c = &mut *c;
        if let Some(log) = log {
            self.replay_log(c, log, entries);
        }
        let Some(replay) = replay else {
            return;
        };
        match replay {
            Replay::Flush(servers) => {
                for (server, gen) in servers {
                    let r = match &server {
                        Some(s) => c.flush_server(s, None),
                        None => c.flush_all(None),
                    };
                    match r {
                        Ok(()) => self.lock_pending().flushed(&server, gen),
                        Err(e) => self.cache_failed(&e),
                    }
                }
            }
            // One pipelined delete per server for the whole batch. If any server failed, the
            // batch stays pending: deleting again is harmless.
            Replay::Keys(mut keys) => {
                // A key that no longer routes to the server that failed (it was ejected and
                // its keys moved) cannot be deleted there by key: that server is flushed
                // before it is trusted again instead.
                keys.retain(|(key, gen, failed)| {
                    let Some(failed) = failed else {
                        return true;
                    };
                    match c.route_of_key(key.as_bytes()) {
                        Ok(r) if &c.servers()[r.server] != failed => {
                            let mut p = self.lock_pending();
                            p.distrust_server(failed.clone());
                            p.replayed(key, *gen);
                            false
                        }
                        _ => true,
                    }
                });
                let names: Vec<&[u8]> = keys.iter().map(|(k, ..)| k.as_bytes()).collect();
                let deleted = self.replay_deletes(c, &names);
                let mut p = self.lock_pending();
                for ((key, gen, _), ok) in keys.iter().zip(deleted) {
                    if ok {
                        p.replayed(key, *gen);
                    }
                }
                crate::observe::pending(p.len());
            }
        }
    }

    /// Replays `entries` of the master's invalidation log: one pipelined delete, then their
    /// records are removed (those added meanwhile stay).
    fn replay_log(&self, c: &mut Client, log: &dyn InvalidationLog, entries: Vec<LogEntry>) {
        let keys: Vec<&[u8]> = entries.iter().map(|e| e.key.as_bytes()).collect();
        let deleted = self.replay_deletes(c, &keys);
        for (entry, ok) in entries.iter().zip(deleted) {
            if !ok {
                continue;
            }
            if let Err(e) = log.replayed(entry) {
                self.cache_failed(&e);
            }
        }
    }

    /// One replay batch: `keys` deleted on their own servers, one pipelined delete per
    /// server, each pinned to the server its keys were routed to (a concurrent ejection
    /// cannot send it elsewhere). Per key, whether it was deleted on its own server: a key
    /// routed away from it is left for a process (or a later replay) that routes it home.
    fn replay_deletes(&self, c: &mut Client, keys: &[&[u8]]) -> Vec<bool> {
        let mut deleted = vec![false; keys.len()];
        let mut by_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, key) in keys.iter().enumerate() {
            match c.route_of_key(key) {
                Ok(r) if r.is_home() => by_server.entry(r.server).or_default().push(j),
                Ok(_) => {}
                Err(e) => self.cache_failed(&e),
            }
        }
        for (server, js) in by_server {
            let batch: Vec<&[u8]> = js.iter().map(|&j| keys[j]).collect();
            match c.pinned(server, |c| c.delete_multi(&batch)) {
                Ok(_) => {
                    bump(
                        &self.counters.replay_batches,
                        "mcstore_storage_replay_batches_total",
                    );
                    let n = u64::try_from(js.len()).unwrap_or(u64::MAX);
                    crate::observe::storage("mcstore_storage_replayed_total", n);
                    crate::observe::replayed(n);
                    self.counters.replayed.fetch_add(n, Ordering::Relaxed);
                    for j in js {
                        deleted[j] = true;
                    }
                }
                Err(e) => self.cache_failed(&e),
            }
        }
        deleted
    }

    /// The master's own info for the same names.
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

    fn master_info(&self, m: &dyn Storage, info: &ResourceInfo) -> Result<ResourceInfo> {
        m.info(&info.collection, info.resource.as_deref())
    }

    fn master_get(&self, m: &dyn Storage, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        bump(
            &self.counters.master_reads,
            "mcstore_storage_master_reads_total",
        );
        let mi = self.master_info(m, info)?;
        m.get(&mi, part)
    }

    /// A client for calls about `key` (the shared client lends that key's server
    /// connection), or for maintenance over every server (`None`).
    fn checkout(&self, key: Option<&str>) -> Option<Checkout<'_>> {
        let r = match (&self.settings.cache, key) {
            (CacheClients::Pool(p), _) => p.get().map(Checkout::Pooled),
            // A key that cannot be routed: the caller's own routing reports why (the admin
            // client routes as the engines do).
            (CacheClients::Shared(s), Some(k)) => {
                Ok(Checkout::Lent(match s.route_of_key(k.as_bytes()) {
                    Ok(r) => s.lend_for(r.server),
                    Err(_) => s.lend_admin(),
                }))
            }
            (CacheClients::Shared(s), None) => Ok(Checkout::Lent(s.lend_admin())),
        };
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                self.cache_failed(&e);
                None
            }
        }
    }

    /// The warm read of a shared client: a plain get on the key's own server, batched with
    /// concurrent callers' (text and binary; with leases every read is a lease lookup, and a
    /// plain get could not tell a stale item). `Some` for a value, `None` when the full
    /// lookup must run (a miss, a marker, an error is left to it too).
    fn shared_hit(&self, s: &SharedClient, key: &str) -> Option<Bytes> {
        if s.has_leases() {
            return None;
        }
        let route = s.route_of_key(key.as_bytes()).ok()?;
        if !route.is_home() || self.distrusted(key, &s.servers()[route.server]) {
            return None;
        }
        let mut buf = Vec::new();
        match s.get_on(route.server, key.as_bytes(), &mut buf) {
            Ok(Some(info)) if info.flags == FLAG_VALUE => Some(Bytes::from(buf)),
            _ => None,
        }
    }

    /// Looks `key` up; on a miss, tries to become its filler.
    fn lookup(&self, c: &mut Client, key: &str) -> Result<Lookup> {
        if c.has_leases() {
            return self.lookup_lease(c, key);
        }
        let k = key.as_bytes();
        for _ in 0..2 {
            match c.gets(k)? {
                Some(item) => return self.found(item.flags, item.value),
                None => {
                    let marker = SetOptions::default()
                        .flags(FLAG_FILLING)
                        .ttl(self.settings.filler_ttl);
                    if c.add(k, b"", marker)? {
                        // Ours: learn its CAS unique (a writer may have replaced it already).
                        return match c.gets(k)? {
                            Some(item) if item.flags == FLAG_FILLING => Ok(Lookup::Miss(item.cas)),
                            Some(item) => self.found(item.flags, item.value),
                            None => Ok(Lookup::Miss(None)),
                        };
                    }
                    // Someone else added it first: look again.
                }
            }
        }
        Ok(Lookup::Miss(None))
    }

    /// [`lookup`](Self::lookup) with memcached's leases: `N` makes the server vivify a
    /// placeholder on a miss and give its lease (`W`) to one reader; the others (`Z`) wait
    /// for the value. A stale item (`X`, invalidated by a write) is waited on the same way,
    /// never served.
    fn lookup_lease(&self, c: &mut Client, key: &str) -> Result<Lookup> {
        let opts = MetaGetOptions {
            lease_ttl: Some(self.settings.filler_ttl),
            ..MetaGetOptions::default()
        };
        let mut value = Vec::new();
        Ok(match c.meta_get(key.as_bytes(), opts, &mut value)? {
            // N always answers; a plain miss would be a server without leases.
            None => Lookup::Miss(None),
            Some(i) if i.lease == Lease::Won => Lookup::Miss(Some(i.cas)),
            Some(i) if i.lease == Lease::AlreadyWon || i.stale => Lookup::Wait,
            Some(i) if i.flags == FLAG_VALUE => Lookup::Hit(Bytes::from(value)),
            Some(_) => Lookup::Master,
        })
    }

    fn found(&self, flags: u32, value: Vec<u8>) -> Result<Lookup> {
        match flags {
            FLAG_VALUE => Ok(Lookup::Hit(Bytes::from(value))),
            FLAG_TOO_LARGE => Ok(Lookup::Master),
            // Another reader is filling.
            FLAG_FILLING => Ok(Lookup::Wait),
            // Not written by us: treat as absent, and do not overwrite it.
            _ => Ok(Lookup::Master),
        }
    }

    /// Stores `value` in place of our filling marker, unless a writer got there first.
    ///
    /// Only on the server process that gave the marker's CAS unique (`instance`): a server
    /// restarted meanwhile counts uniques from 1 again, and our old unique could match
    /// another reader's newer marker, which would store our older value over it for good.
    /// On another instance the key is deleted instead (whatever it holds is at worst a
    /// marker: its filler's `cas` then fails, and the next reader fills).
    fn fill(&self, c: &mut Client, key: &str, cas: u64, instance: ServerInstance, value: &[u8]) {
        let (data, flags): (&[u8], u32) = if value.len() <= self.settings.max_item_size {
            (value, FLAG_VALUE)
        } else {
            (b"", FLAG_TOO_LARGE)
        };
        let opts = SetOptions::default().flags(flags).ttl(self.settings.ttl);
        match self.cas_on(c, key, cas, instance, data, opts) {
            Some(Ok(CasResult::Stored)) if flags == FLAG_VALUE => {
                bump(&self.counters.fills, "mcstore_storage_fills_total")
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                // The server refused the value (say it is above the server's item size) or
                // failed: never leave our marker for others to wait on. Mark the key as
                // served by the master for a while, or at least remove the marker.
                self.cache_failed(&e);
                let master = SetOptions::default()
                    .flags(FLAG_TOO_LARGE)
                    .ttl(self.settings.filler_ttl);
                if !matches!(
                    self.cas_on(c, key, cas, instance, b"", master),
                    Some(Ok(CasResult::Stored))
                ) {
                    let _ = c.delete(key.as_bytes());
                }
            }
            None => {
                if let Err(e) = c.delete(key.as_bytes()) {
                    self.cache_failed(&e);
                }
            }
        }
    }

    /// `cas` on `key`'s server if it is still the `instance` that gave the unique; `None`
    /// (nothing sent) if it may not be.
    fn cas_on(
        &self,
        c: &mut Client,
        key: &str,
        cas: u64,
        instance: ServerInstance,
        data: &[u8],
        opts: SetOptions,
    ) -> Option<crate::Result<CasResult>> {
        let server = instance.server();
        match c.route_of_key(key.as_bytes()) {
            Ok(r) if r.is_home() && r.server == server => {}
            _ => return None,
        }
        c.pinned(server, |c| match c.instance(server) {
            Ok(now) if now == instance => Some(c.cas(key.as_bytes(), data, cas, opts)),
            _ => None,
        })
    }

    /// Whether `key`'s filler was seen not to fill (its marker has not expired yet).
    fn is_stuck(&self, key: &str) -> bool {
        let stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        stuck.get(key).is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers that `key`'s filler did not fill in time.
    fn mark_stuck(&self, key: &str) {
        let mut stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if stuck.len() >= MAX_STUCK {
            stuck.retain(|_, until| *until > now);
            if stuck.len() >= MAX_STUCK {
                stuck.clear();
            }
        }
        let ttl = Duration::from_secs(u64::from(self.settings.filler_ttl));
        stuck.insert(key.to_string(), now + ttl);
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

    /// A read through the cache. A client is held only for cache calls, never during the
    /// master read or while waiting for another reader's fill, so warm hits do not queue
    /// behind cold misses for the pool's clients.
    fn cached_get(&self, m: &dyn Storage, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        let Some(key) = self.key(info, part) else {
            return self.master_get(m, info, part);
        };
        self.replay_inline();
        if let CacheClients::Shared(s) = &self.settings.cache {
            if let Some(v) = self.shared_hit(s, &key) {
                bump(&self.counters.hits, "mcstore_storage_hits_total");
                return Ok(v);
            }
        }
        let mut waiting_until = None;
        let mut instance = None;
        let lookup = loop {
            let Some(mut c) = self.checkout(Some(&key)) else {
                return self.master_get(m, info, part);
            };
            let route = match c.route_of_key(key.as_bytes()) {
                Ok(r) => r,
                Err(e) => {
                    self.cache_failed(&e);
                    return self.master_get(m, info, part);
                }
            };
            // Not read from the cache: a key whose invalidation is pending, and a key routed
            // away from its own server (ejected, with `remove_failed_servers`): an entry
            // filled on the stand-in could outlive a write made through a client that routes
            // the key home, so stand-ins never hold one.
            if !route.is_home() || self.distrusted(&key, &c.servers()[route.server]) {
                bump(&self.counters.bypassed, "mcstore_storage_bypassed_total");
                return self.master_get(m, info, part);
            }
            // The lookup's calls all go to that server, whatever another client of the pool
            // ejects meanwhile; which process it is decides where the fill may go (`fill`).
            let lookup = c.pinned(route.server, |c| {
                instance = Some(c.instance(route.server)?);
                self.lookup(c, &key)
            });
            match lookup {
                Ok(Lookup::Wait) => {
                    drop(c);
                    if waiting_until.is_none() && self.is_stuck(&key) {
                        break Lookup::Master; // its filler is known not to fill: no wait
                    }
                    let until = *waiting_until.get_or_insert_with(|| {
                        bump(
                            &self.counters.fill_waits,
                            "mcstore_storage_fill_waits_total",
                        );
                        Instant::now() + self.settings.fill_wait
                    });
                    if Instant::now() >= until {
                        self.mark_stuck(&key);
                        break Lookup::Master; // the filler did not finish in time
                    }
                    std::thread::sleep(FILL_POLL);
                }
                Ok(lookup) => break lookup,
                Err(e) => {
                    self.cache_failed(&e);
                    return self.master_get(m, info, part);
                }
            }
        };
        match lookup {
            Lookup::Hit(v) => {
                bump(&self.counters.hits, "mcstore_storage_hits_total");
                Ok(v)
            }
            Lookup::Master | Lookup::Wait => {
                bump(&self.counters.misses, "mcstore_storage_misses_total");
                self.master_get(m, info, part)
            }
            Lookup::Miss(filler) => {
                bump(&self.counters.misses, "mcstore_storage_misses_total");
                let value = self.master_get(m, info, part);
                let Some(cas) = filler else {
                    return value;
                };
                // Our marker or lease: fill it, or drop it if the master has nothing, so
                // nobody waits for it. A client is checked out again for this.
                let Some(mut c) = self.checkout(Some(&key)) else {
                    return value;
                };
                match (&value, instance) {
                    (Ok(v), Some(instance)) => self.fill(&mut c, &key, cas, instance, v),
                    _ => {
                        if let Err(e) = c.delete(key.as_bytes()) {
                            self.cache_failed(&e);
                        }
                    }
                }
                value
            }
        }
    }

    /// A master write, then the invalidation of its cache entry, whatever the master returned
    /// (a write can land and still report an error: an fsync after the rename, a remote
    /// commit whose answer timed out; a remove that found nothing still invalidates, the
    /// cache might hold it). With a master that keeps an [`InvalidationLog`], a record goes
    /// there first (durable before the master write) and is removed once the entry is
    /// deleted: a process killed between its master write and its delete leaves it for any
    /// other process to replay, and readers meanwhile read the master.
    fn write_through(&self, info: &ResourceInfo, part: Part, write: MasterWrite<'_>) -> Result<()> {
        let master = &*self.settings.master;
        let mi = self.master_info(master, info)?;
        let key = self.key(info, part);
        let apply = |write| match write {
            MasterWrite::Put(data) => master.put(&mi, part, data),
            MasterWrite::Remove => master.remove(&mi, part),
        };
        let (intent, r) = match (&key, master.invalidation_log()) {
            // One transaction: the write and its intent commit together, or neither does.
            (Some(k), Some(log)) if master.writes_intents_atomically() => {
                match master.write_intending(&mi, part, write, k) {
                    Ok(record) => (Some((log, record)), Ok(())),
                    Err(e) => (None, Err(e)),
                }
            }
            // The intent must be durable before the master changes: without it, a process
            // killed after the write would leave other processes trusting the old entry. So
            // a log that cannot take it fails the write, and nothing changes.
            (Some(k), Some(log)) => {
                let record = log.intend(k).inspect_err(|e| self.cache_failed(e))?;
                (Some((log, record)), apply(write))
            }
            _ => (None, apply(write)),
        };
        if let Some(key) = key {
            let done = self.invalidate(std::slice::from_ref(&key));
            if let Some((log, intent)) = intent {
                // Not deleted everywhere it matters: a record any process may replay now
                // (the intent is not replayed while this process lives).
                let recorded = done
                    || log
                        .record(&key)
                        .inspect_err(|e| self.cache_failed(e))
                        .is_ok();
                // Without that record, the intent stays: every process distrusts the entry
                // (it reads the master) until this process is gone and another replays it.
                if recorded {
                    let entry = LogEntry {
                        key,
                        records: vec![intent],
                    };
                    if let Err(e) = log.replayed(&entry) {
                        self.cache_failed(&e);
                    }
                }
            }
        }
        r
    }

    /// Deletes the cache entries of a resource after a master write; failures are remembered.
    /// Returns whether every entry was deleted on its own server.
    fn invalidate(&self, keys: &[String]) -> bool {
        self.replay_inline();
        let mut all = true;
        for k in keys {
            let Some(mut c) = self.checkout(Some(k)) else {
                self.remember(k.clone(), None);
                all = false;
                continue;
            };
            let route = match c.route_of_key(k.as_bytes()) {
                Ok(r) => r,
                Err(e) => {
                    self.cache_failed(&e);
                    self.remember(k.clone(), e.server());
                    all = false;
                    continue;
                }
            };
            // The key's own server is out of the ring (its keys moved meanwhile): it may
            // still hold the old entry, so it is distrusted, and flushed before it serves
            // reads again. Not done where it matters to clients still routing the key home:
            // a record stays in the log for one of them to replay.
            if !route.is_home() {
                let home = c.servers()[route.home].to_string();
                self.lock_pending().distrust_server(home);
                all = false;
            }
            // Deleted, on every protocol: an item marked stale over meta (`md I`) would still
            // be served to text and binary readers of the same cache. Pinned: the delete goes
            // where the route above says, even if a server is ejected or rejoins meanwhile.
            if let Err(e) = c.pinned(route.server, |c| c.delete(k.as_bytes())) {
                self.cache_failed(&e);
                self.remember(k.clone(), e.server());
                all = false;
            }
        }
        all
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
        self.shared.settings.master.info(collection, resource)?; // its own rules (encoded length)
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

/// A resource's info in memcached alone: validated names, and a key that leaves room for the
/// part suffixes (without a master, a name without a valid cache key cannot be stored).
pub(super) fn cached_info(
    keys: &KeyGenerator,
    collection: &str,
    resource: Option<&str>,
) -> Result<ResourceInfo> {
    validate_name(collection)?;
    if let Some(r) = resource {
        validate_name(r)?;
    }
    let info = ResourceInfo {
        collection: collection.to_string(),
        resource: resource.map(str::to_string),
        key: keys.key(collection, resource),
    };
    cache_key(keys, &info, Part::Content)?;
    Ok(info)
}

/// The listing of `collection` from its resource names, with this storage's keys.
pub(super) fn resource_infos<'a>(
    keys: &'a KeyGenerator,
    collection: &str,
    names: impl Iterator<Item = Result<String>> + 'a,
) -> ResourceIter<'a> {
    let collection = collection.to_string();
    Box::new(names.map(move |n| {
        let n = n?;
        let key = keys.key(&collection, Some(&n));
        Ok((
            n.clone(),
            ResourceInfo {
                collection: collection.clone(),
                resource: Some(n),
                key,
            },
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::{Pending, Replay};

    /// #16, scenario 4: a failure recorded for a key while its replay is under way survives
    /// the replay (before, the replay cleared the key by name and erased it).
    #[test]
    fn a_replay_never_erases_a_newer_failure() {
        let mut p = Pending::default();
        p.record("k".into(), Some("a"), 10);
        let Replay::Keys(taken) = p.take(10) else {
            panic!("no overflow")
        };
        p.record("k".into(), Some("a"), 10); // a writer fails again while the replay runs
        for (k, gen, _) in taken {
            p.replayed(&k, gen);
        }
        assert!(
            p.distrusts("k", || None),
            "the newer failure must be replayed too"
        );
        let Replay::Keys(taken) = p.take(10) else {
            panic!("no overflow")
        };
        for (k, gen, _) in taken {
            p.replayed(&k, gen);
        }
        assert!(p.is_empty());
    }

    /// The same for an overflow: a failure during the flush keeps the server distrusted.
    #[test]
    fn a_flush_never_erases_a_newer_overflow() {
        let mut p = Pending::default();
        for k in ["a", "b", "c"] {
            p.record(k.into(), Some("s1"), 2);
        }
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("overflowed")
        };
        p.record("d".into(), Some("s1"), 2);
        for (server, gen) in &flushes {
            p.flushed(server, *gen);
        }
        assert!(p.distrusts("x", || Some("s1".into())));
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("still overflowed")
        };
        for (server, gen) in &flushes {
            p.flushed(server, *gen);
        }
        assert!(p.is_empty() && !p.distrusts("d", || Some("s1".into())));
    }

    /// #16, scenario 6: an overflow on one server distrusts and flushes that server only; a
    /// failure that names no server overflows all of them.
    #[test]
    fn an_overflow_is_per_server() {
        let mut p = Pending::default();
        p.record("a1".into(), Some("a"), 2);
        p.record("b1".into(), Some("b"), 2);
        p.record("b2".into(), Some("b"), 2); // past the bound: b overflows
        assert!(p.distrusts("x", || Some("b".into())));
        assert!(!p.distrusts("x", || Some("a".into())));
        assert!(p.distrusts("a1", || Some("a".into())), "a's record stays");
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("overflowed")
        };
        assert_eq!(flushes.len(), 1);
        assert_eq!(flushes[0].0.as_deref(), Some("b"));
        p.record("k1".into(), None, 2);
        assert!(
            !p.distrusts("x", || Some("a".into())),
            "a record, below the bound"
        );
        p.record("k2".into(), None, 2); // past the bound, no server named: all overflow
        assert!(p.distrusts("x", || Some("a".into())));
    }
}
