//! One client for many callers: [`SharedClient`] serves any number of threads (blocking calls)
//! and async tasks (futures, under any executor) over one connection per server, and batches
//! what they ask for concurrently.
//!
//! See [`SharedClient`] for how calls travel, deadlines and backpressure.
//!
//! Rooms: this file is the facade (builder, the public blocking calls); `engine` holds a
//! server's queue, slots and waits (and the lock order); `round` turns what is queued into
//! batches and hands the replies back to slots; `exec` is a blocking call's path (direct,
//! or queued and awaited); `future` the async calls; `lend` the storage's lending door.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{
    CasResult, Client, ClientBuilder, Item, ItemInfo, ItemRef, MetaGetOptions, MetaItemInfo,
    MetaSetOptions, MetaSetResult, ServerCounters, ServerStats, SetOptions,
};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::wire::{Capability, StoreOpts};
use crate::proto::{ParseError, Protocol, SetOutcome, StoreMode};

mod engine;
mod exec;
mod future;
mod lend;
mod round;

use engine::{lock, CallSpec, Engine, Op, Reply};
pub(crate) use lend::Lent;

/// Request slots per server unless set with [`SharedClientBuilder::max_in_flight`].
const DEFAULT_IN_FLIGHT: usize = 1024;

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
        let timeout = self.builder.configured_io_timeout();
        let router = self.builder.clone().build()?;
        let builder = self.builder.sharing_health_of(&router);
        let n = router.label_list().len();
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
        let protocol = router.protocol();
        let inner = Inner {
            timeout,
            max_value: router.max_value(),
            namespace: Arc::clone(router.namespace_arc()),
            binary_keys: protocol.supports(Capability::BinaryKeys),
            protocol,
            labels: Arc::clone(router.label_list()),
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
///   thread; futures are woken by it through their [`Waker`](std::task::Waker): no runtime is needed or
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
    /// The servers, as configured, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.inner.labels
    }

    /// The wire protocol this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.inner.protocol
    }

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
        ..crate::client::store_opts(mode, opts)
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
        opts: MetaGetOptions,
        buf: &mut Vec<u8>,
    ) -> Result<Option<MetaItemInfo>> {
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
        opts: MetaSetOptions,
    ) -> Result<MetaSetResult> {
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
    pub fn server_counters(&self) -> Vec<(String, ServerCounters)> {
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
