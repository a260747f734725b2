//! One client for many callers: [`SharedClient`] serves any number of threads (blocking calls)
//! and async tasks (futures, under any executor) over one connection per server, and batches
//! what they ask for concurrently.
//!
//! See [`SharedClient`] for how calls travel, deadlines and backpressure.
//!
//! Rooms: this file is the facade (builder, the keyed calls from `crate::command`'s table,
//! server-wide calls); `engine` holds a server's queue, slots and waits (and the lock
//! order); `round` turns what is queued into batches and hands the replies back to slots
//! (sans I/O, tested in memory); `exec` is a blocking call's path (direct, or queued and
//! awaited); `future` the async calls; `multi` the multi-key calls, blocking and async;
//! `lend` the storage's lending door.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::client::{
    CasResult, Client, ClientBuilder, Item, ItemInfo, MetaGetOptions, MetaItemInfo, MetaSetOptions,
    MetaSetResult, ServerCounters, ServerStats, SetOptions,
};
use crate::engine::slots::Slots;
use crate::error::{Error, Result};
use crate::fleet::live::{ListFollower, Topology};
use crate::proto::wire::Capability;
use crate::proto::{Protocol, StoreMode};

mod copies;
mod engine;
mod exec;
mod future;
mod lend;
mod multi;
mod offload;
mod round;
pub(crate) use round::key_hash;
mod timer;

use crate::command::{run_with, CallSpec, Command, Op, Reply};
use engine::{lock, Engine};
pub(crate) use lend::Lent;

/// Request slots per server unless set with [`SharedClientBuilder::max_in_flight`].
const DEFAULT_IN_FLIGHT: usize = 1024;

/// Rounds in flight per connection unless set with [`SharedClientBuilder::pipeline_depth`].
pub const DEFAULT_PIPELINE_DEPTH: usize = 4;

/// Whether a call whose server left the list before the call reached it (nothing was sent)
/// is routed again with the new list: while the list keeps changing, until the call's
/// deadline (its timeout after the first reroute). Not a count: with a list changing every
/// few ms on a loaded machine, a call that waits for its engine can find the next server
/// gone too, several times (seen: 8 in a row, 7 calls in 227,434 over 688 removals).
#[derive(Default)]
pub(crate) struct Reroute {
    deadline: Option<Instant>,
    tries: u32,
}

impl Reroute {
    /// `true` if the call is routed again; `timeout` is the shared client's.
    pub(crate) fn again(&mut self, timeout: Duration) -> bool {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + timeout);
        self.tries += 1;
        if self.tries > 8 {
            // Let the thread changing the list (and the engines) run.
            std::thread::yield_now();
        }
        now < deadline
    }
}

/// Who does a [`SharedClient`]'s I/O. Blocking callers as each variant says. Async calls
/// never block their executor: they are read by the server's I/O thread; under `Adaptive`,
/// a lone async caller that finds its server's connection idle writes its request from its
/// future's `poll` itself (a *direct call*, [`SharedClient::direct_calls`]) and the I/O
/// thread, waiting on the socket, reads the reply. Measured against each other in
/// BENCHMARKS.md ("Many callers").
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
    connections: usize,
    depth: usize,
}

impl SharedClientBuilder {
    /// Request slots per server (default 1024): at most this many requests are queued or on
    /// the wire for one server; more callers wait for a slot up to their deadline.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, u32::MAX as usize / 2);
        self
    }

    /// Connections to each server (default 1, at most 16). With more than one, a round
    /// is written on a free connection while the rounds on the others wait for their
    /// replies: up to `n` rounds in flight per server, for hosts where one connection's
    /// round trip is the limit. Each connection is opened when the load first needs it.
    ///
    /// Calls are then ordered only by their returns: a call that returned is seen by the
    /// calls made after it, but a call abandoned on the wire (timed out, or a future
    /// dropped) may still run after later calls made on another connection. (With one
    /// connection it runs before them, unless its connection was replaced.) A failed
    /// round counts towards the server's ejection on each connection it failed on.
    pub fn connections_per_server(mut self, n: usize) -> Self {
        self.connections = n.clamp(1, 16);
        self
    }

    /// Rounds in flight at once on one connection (default [`DEFAULT_PIPELINE_DEPTH`], at
    /// most 16). The server's I/O thread writes each round that queued while the replies
    /// of the rounds before it are still on their way, up to this many unread; it reads
    /// them in order, each round's replies matched to its own requests (by opaque on binary
    /// and meta, in order on text). Any doubt about the framing closes the connection and
    /// fails every round unread on it: no call ever gets another call's reply. 1 waits for
    /// each round's replies before writing the next.
    ///
    /// Rounds a caller serves itself ([`IoMode::Combining`], and a lone caller of
    /// [`IoMode::Adaptive`]) and rounds over TLS go one at a time. So does a round with a
    /// get-and-touch or a batch over its size cap, after the rounds before it.
    pub fn pipeline_depth(mut self, depth: usize) -> Self {
        self.depth = depth.clamp(1, 16);
        self
    }

    /// Who does the I/O (default [`IoMode::Adaptive`]).
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
        let fleet = *router.core_ref().fleet();
        // Engines serve one server each: the copies are the shared client's business.
        let builder = self.builder.sharing_health_of(&router).one_copy();
        let labels = Arc::clone(router.label_list());
        let engines = Engines::new(
            builder.clone(),
            self.max_in_flight,
            timeout,
            self.connections,
            self.depth,
        );
        for server in 0..labels.len() {
            engines.make(server, None)?;
        }
        let admin = builder.build()?;
        let protocol = router.protocol();
        let list = router.server_list().clone();
        let inner = Inner {
            timeout,
            max_value: router.max_value(),
            item_size: OnceLock::new(),
            namespace: Arc::clone(router.namespace_arc()),
            binary_keys: protocol.supports(Capability::BinaryKeys),
            protocol,
            single: AtomicBool::new(labels.len() == 1),
            members: arc_swap::ArcSwap::from_pointee(Arc::clone(router.servers_arc())),
            labels: arc_swap::ArcSwap::from_pointee(labels),
            driving: self.driving,
            replicated: fleet.replicated(),
            hedge: fleet.hedge,
            miss_failover: fleet.miss_failover,
            write_policy: fleet.write,
            health: Arc::clone(router.shared_health()),
            timers: Arc::default(),
            repairing: AtomicBool::new(false),
            router: Mutex::new(router),
            admin: Mutex::new(admin),
            engines,
        };
        let inner = Arc::new(inner);
        // A new server's engine is made before a call can route to it; a change made since
        // the router was built is caught up with (no change runs meanwhile).
        let follower: std::sync::Weak<dyn ListFollower> = Arc::downgrade(&inner) as _;
        list.add_follower_with(follower, |now| {
            if now.generation > 0 {
                inner.prepare(now)?;
                inner.published(now, &[]);
            }
            Ok(())
        })?;
        Ok(SharedClient { inner })
    }
}

/// The engines by server index, one for every server the list ever named: made before a
/// list naming a new server is published, so a call never routes to a server without one.
/// Chunks never move, so a call holds `&Engine` without a lock.
struct Engines {
    slots: Slots<OnceLock<Arc<Engine>>>,
    /// Engines made so far (indexes `0..made`).
    made: std::sync::atomic::AtomicUsize,
    /// How engines are made: a client following the shared client's list, pinned by the
    /// engine to its server.
    builder: Mutex<ClientBuilder>,
    max_in_flight: usize,
    timeout: Duration,
    /// Lanes (connections) per engine.
    lanes: usize,
    /// Rounds in flight per connection.
    depth: usize,
}

impl Engines {
    fn new(
        builder: ClientBuilder,
        max_in_flight: usize,
        timeout: Duration,
        lanes: usize,
        depth: usize,
    ) -> Engines {
        Engines {
            slots: Slots::new(),
            made: std::sync::atomic::AtomicUsize::new(0),
            builder: Mutex::new(builder),
            max_in_flight,
            timeout,
            lanes,
            depth,
        }
    }

    /// Makes server `server`'s engine if it has none; its client takes `next` (a list
    /// about to be published) when given.
    fn make(&self, server: usize, next: Option<&Topology>) -> Result<()> {
        let slot = &self.slots[server];
        if slot.get().is_some() {
            return Ok(());
        }
        let mut clients = Vec::with_capacity(self.lanes);
        for _ in 0..self.lanes {
            let mut client = lock(&self.builder).clone().build()?;
            if let Some(t) = next {
                client.engine().0.adopt(t);
            }
            clients.push(client);
        }
        let engine = Arc::new(Engine::new(
            server,
            clients,
            self.max_in_flight,
            self.timeout,
            self.depth,
        ));
        if slot.set(engine).is_ok() {
            self.made
                .fetch_max(server + 1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(())
    }

    /// Every engine made so far.
    fn iter(&self) -> impl Iterator<Item = &Arc<Engine>> {
        let made = self.made.load(std::sync::atomic::Ordering::Acquire);
        (0..made).filter_map(|i| self.slots[i].get())
    }
}

impl std::ops::Index<usize> for Engines {
    type Output = Arc<Engine>;

    /// Server `i`'s engine: a call routes only to servers of a published list, whose
    /// engines were all made before it was published.
    #[inline]
    fn index(&self, i: usize) -> &Arc<Engine> {
        self.slots[i]
            .get()
            .expect("every server of a published list has an engine")
    }
}

impl ListFollower for Inner {
    fn prepare(&self, next: &Topology) -> Result<()> {
        for server in 0..next.labels.len() {
            self.engines.make(server, Some(next))?;
        }
        // Keys may move from now on: no call may skip routing.
        self.single.store(false, Ordering::Release);
        Ok(())
    }

    fn published(&self, next: &Topology, removed: &[usize]) {
        self.labels.store(Arc::new(Arc::clone(&next.labels)));
        self.members
            .store(Arc::new(Arc::clone(&next.member_labels)));
        // Idle engines connected to a server that left close that connection now (an idle
        // engine would keep it until its next call, which may never come). One in a round
        // is not waited for: it takes the list after its round.
        for lane in self.engines.iter().flat_map(|e| e.lanes.iter()) {
            if let Ok(mut st) = lane.try_lock() {
                // Not under a direct round's unread reply: its reader takes the list.
                if st.pending.is_empty() {
                    st.client.leave_removed(removed);
                }
            }
        }
        if let Ok(mut admin) = self.admin.try_lock() {
            admin.leave_removed(removed);
        }
    }
}

impl ClientBuilder {
    /// A [`SharedClient`] with these settings (see [`SharedClientBuilder`] for its own).
    pub fn shared(self) -> SharedClientBuilder {
        SharedClientBuilder {
            builder: self,
            max_in_flight: DEFAULT_IN_FLIGHT,
            driving: IoMode::Adaptive,
            connections: 1,
            depth: DEFAULT_PIPELINE_DEPTH,
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
/// caller that reaches it gives up its slot and gets [`Error::Timeout`](crate::Error::Timeout); a dropped future does
/// the same. A request still queued is withdrawn; one already sent is left to its round,
/// whose reply is parsed and dropped, so the connection's framing never breaks. Each server
/// has a fixed number of slots (`max_in_flight`); when they are all taken, callers wait for
/// one up to their deadline, then get [`Error::Timeout`](crate::Error::Timeout) saying so. Memory does not grow
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
            .field("servers", &self.servers())
            .field("protocol", &self.inner.protocol)
            .field("driving", &self.inner.driving)
            .finish_non_exhaustive()
    }
}

struct Inner {
    timeout: Duration,
    max_value: usize,
    /// The servers' smallest `item_size_max`, asked once by the first chunked store.
    item_size: OnceLock<usize>,
    namespace: Arc<[u8]>,
    binary_keys: bool,
    protocol: Protocol,
    /// The servers by index (with a live list, every server it ever named).
    labels: arc_swap::ArcSwap<Arc<[String]>>,
    /// The list's servers now, in list order.
    members: arc_swap::ArcSwap<Arc<[String]>>,
    driving: IoMode,
    /// One server, never changed: every key goes to engine 0 (its own client still checks
    /// its health).
    single: AtomicBool,
    /// Keys have copies: keyed calls go through `copies`.
    replicated: bool,
    hedge: Option<crate::fleet::Hedge>,
    /// A read that misses on a copy asks the next one.
    miss_failover: bool,
    write_policy: crate::fleet::WritePolicy,
    /// Who is ejected, and the fleet's state (latency, repairs, hedge budget).
    health: Arc<crate::engine::health::SharedHealth>,
    /// Wake-ups of async reads waiting to hedge.
    timers: Arc<timer::Timers>,
    /// The repair thread runs.
    repairing: std::sync::atomic::AtomicBool,
    /// Picks a key's server: a client that never connects, sharing the engines' view of who
    /// is ejected.
    router: Mutex<Client>,
    /// Server-wide commands (flush, stats, version) on their own connections.
    admin: Mutex<Client>,
    engines: Engines,
}

impl SharedClient {
    /// The largest value a call may store (the builder's `max_value_size`).
    pub(crate) fn max_value_size(&self) -> usize {
        self.inner.max_value
    }

    /// Where the servers' item size is kept once asked.
    pub(crate) fn item_size_cell(&self) -> &OnceLock<usize> {
        &self.inner.item_size
    }

    /// The servers of its list now, as configured, in list order (see
    /// [`server_list`](Self::server_list)).
    pub fn servers(&self) -> Arc<[String]> {
        Arc::clone(&self.inner.members.load())
    }

    /// The servers by index (every server the list ever named), as configured.
    pub(crate) fn labels(&self) -> Arc<[String]> {
        Arc::clone(&self.inner.labels.load())
    }

    /// The server list this client follows: [`ServerList::set`](crate::ServerList::set)
    /// changes its servers while it serves (engines for new servers are made by `set`).
    pub fn server_list(&self) -> crate::ServerList {
        lock(&self.inner.router).server_list().clone()
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
        self.timers.shutdown();
        // I/O threads hold their engine, not the client: tell them to end.
        for e in self.engines.iter() {
            e.shut_down(lock(&e.queue));
        }
    }
}

/// A call of one key and no value (gets of multi-key calls).
fn spec(op: Op, key: &[u8]) -> CallSpec<'_> {
    CallSpec {
        op,
        key,
        value: &[],
    }
}

/// [`SharedClient`]'s keyed methods, from the one list of commands
/// ([`keyed_commands!`](crate::command::keyed_commands)): each blocking method and its
/// `_async` twin run the same command.
macro_rules! shared_methods {
    ($($(#[$doc:meta])* $name:ident / $async_name:ident ($($arg:ident: $t:ty),*) -> $out:ty
        = $cmd:expr $(, direct $_direct:ident)?;)*) => {$(
        $(#[$doc])*
        ///
        /// On `&self`, from any number of threads; also [`Error::Timeout`](crate::Error::Timeout) when the call's
        /// deadline passes while it waits for its turn or a free slot.
        pub fn $name(&self, $($arg: $t),*) -> Result<$out> {
            use crate::command::*;
            self.run($cmd)
        }

        #[doc = concat!("[`", stringify!($name), "`](Self::", stringify!($name), "), as a future.")]
        pub async fn $async_name(&self, $($arg: $t),*) -> Result<$out> {
            use crate::command::*;
            // Written out here rather than in a generic `async fn`: the future of a generic
            // one is not provably `Send` (rustc cannot prove `Send` for every lifetime
            // of the command's borrows), and `tokio::spawn` needs it.
            let mut cmd = $cmd;
            let call = cmd.call();
            let mut owned = Vec::new();
            let reply = match cmd.buffer() {
                Some(buf) => {
                    buf.clear();
                    self.exec_async(call, buf).await?
                }
                None => self.exec_async(call, &mut owned).await?,
            };
            cmd.output(reply, owned)
        }
    )*};
}

/// Keyed calls: as [`Client`]'s, on `&self`, from any number of threads and tasks.
impl SharedClient {
    crate::command::keyed_commands!(shared_methods);

    /// The async executor of the keyed commands: through the copies when keys have them.
    async fn exec_async(&self, call: CallSpec<'_>, out: &mut Vec<u8>) -> Result<Reply> {
        if self.replicated() {
            return self.exec_copies_async(call, out).await;
        }
        self.call_async(call, out).await
    }

    /// What the fleet layer did (failovers, hedges, repairs), as [`Client::fleet_counters`].
    pub fn fleet_counters(&self) -> crate::fleet::FleetCounters {
        self.fleet().counters()
    }

    /// The zones, as [`Client::zones`].
    pub fn zones(&self) -> Vec<crate::fleet::ZoneInfo> {
        self.fleet().zones()
    }

    /// Makes a zone write-only or readable again, as [`Client::set_zone_write_only`].
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) if there is no such zone.
    pub fn set_zone_write_only(&self, name: &str, write_only: bool) -> Result<()> {
        self.fleet().set_zone_write_only(name, write_only)
    }

    /// The blocking executor of the keyed commands.
    fn run<'a, C: Command<'a>>(&self, cmd: C) -> Result<C::Output> {
        run_with(cmd, |call, out| self.exec(call, out))
    }
}

/// Blocking calls: as [`Client`]'s, on `&self`, from any number of threads.
impl SharedClient {
    /// Runs `f` on `key`'s server connection, lent for the call (meta calls, which the
    /// rounds do not batch).
    fn on_key_server<T>(
        &self,
        key: &[u8],
        mut f: impl FnMut(&mut Client) -> Result<T>,
    ) -> Result<T> {
        if self.replicated() {
            return self.on_first_copy(key, false, f, |_| false);
        }
        let mut reroute = Reroute::default();
        loop {
            let server = self.route_of_key(key)?.server;
            match self.lend_for(server).pinned(server, &mut f) {
                // Its server left the list before the call reached it (nothing was sent):
                // routed again with the new list (see `Reroute`).
                Err(Error::ServerRemoved { .. }) if reroute.again(self.inner.timeout) => {}
                r => return r,
            }
        }
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
        if self.replicated() {
            return self.on_first_copy(key, true, |c| c.invalidate(key, stale_ttl), |_| true);
        }
        self.on_key_server(key, |c| c.invalidate(key, stale_ttl))
    }

    /// A meta storage command (meta protocol). Errors as [`Client::meta_set`].
    pub fn meta_set(
        &self,
        key: &[u8],
        value: &[u8],
        opts: MetaSetOptions,
    ) -> Result<MetaSetResult> {
        if self.replicated() {
            if value.len() > self.inner.max_value {
                return Err(crate::Error::ValueTooLarge {
                    len: value.len(),
                    max: self.inner.max_value,
                });
            }
            let stored = |r: &MetaSetResult| r.outcome == crate::SetOutcome::Stored;
            return self.on_first_copy(key, true, |c| c.meta_set(key, value, opts), stored);
        }
        self.on_key_server(key, |c| c.meta_set(key, value, opts))
    }

    /// The server's debug line for an item (meta protocol). Errors as [`Client::meta_debug`].
    pub fn meta_debug(&self, key: &[u8]) -> Result<Option<String>> {
        self.on_key_server(key, |c| c.meta_debug(key))
    }

    /// The server `key` goes to right now (after ejections), as configured.
    pub fn server_for_key(&self, key: &[u8]) -> Result<String> {
        let server = lock(&self.inner.router).server_for_key(key)?.to_string();
        Ok(server)
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

    /// Async calls written from their own future's `poll` so far (a lone caller finding its
    /// server's connection idle: no hand-over to the I/O thread; see
    /// [`SharedClientBuilder::io_mode`]).
    pub fn direct_calls(&self) -> u64 {
        (self.inner.engines.iter())
            .map(|e| e.directs.load(Ordering::Relaxed))
            .sum()
    }

    /// Each server's counters (of the calls made through the shared connections).
    pub fn server_counters(&self) -> Vec<(String, ServerCounters)> {
        let list = self.server_list();
        let members = list.topology();
        (self.inner.engines.iter())
            .filter(|e| members.ring.is_member(e.server))
            .filter_map(|e| {
                // Each lane counts its own connection's calls.
                let mut sum: Option<(String, ServerCounters)> = None;
                for lane in 0..e.lanes.len() {
                    // A direct call's reply unread there is read first: `maybe_rejoin` may
                    // replace the connection.
                    let mut st = e.lock_lane(lane);
                    st.client.engine().0.maybe_rejoin();
                    let mut all = st.client.server_counters();
                    let at = all.iter().position(|(l, _)| *l == e.label)?;
                    let (label, c) = all.swap_remove(at);
                    match &mut sum {
                        Some((_, s)) => s.add(&c),
                        None => sum = Some((label, c)),
                    }
                }
                sum
            })
            .collect()
    }
}
