//! The public, blocking client API.
//!
//! A [`Client`] owns one connection per server and a `mio::Poll`; it is `Send` but not shared:
//! give each thread its own client. Calls block until the reply is complete or the I/O timeout
//! expires. Misses and lost CAS races are values (`None`, `false`, [`CasResult::Exists`]);
//! errors are for failures (I/O, timeout, malformed reply, an error line from the server).
//!
//! After any error that leaves the connection's framing in doubt (I/O error, timeout, malformed
//! reply, an error line answering a command with a data block, any `SERVER_ERROR`), the
//! connection is closed and the next call opens a new one: the same `Client` recovers on its
//! own once the server is reachable again.
//!
//! # Every reply reaches its own caller
//!
//! The rule: a reply is handed to a caller only when it is matched to the request that
//! caller sent; otherwise the connection is closed and every call in flight on it fails with
//! an error. Why no call can take another's reply:
//!
//! - **One exchange at a time per connection, read to its end.** A call writes its request
//!   and reads until its last reply unit (or its batch's closing sync). memcached answers a
//!   connection's requests in order, so the next call starts on a clean stream. The only
//!   ways out of an exchange midway are an error and a panic in a caller's callback: an
//!   error closes the connection, and a panic leaves it marked busy, which makes the next
//!   call replace it.
//! - **Replies name their request.** Binary and meta requests carry an opaque from one
//!   31-bit counter per client (single calls, pipelines, and batch items as `base + index`),
//!   and a reply must echo the one expected; text hits name their key, and text replies
//!   otherwise rely on the order above. `me` takes no opaque: its hit is checked by key.
//!   Opaques repeat only after 2^31 requests, and no reply can be outstanding that long.
//! - **Quiet commands are synced before anyone trusts a reply.** memcached still answers
//!   some quiet and noreply commands (misses, unmet conditions, error lines; see
//!   [`crate::proto::meta`]). A batch or [`Pipeline::finish`] closes its quiet commands with a
//!   sync and reads up to its reply. Fire-and-forget ones (`store_noreply`,
//!   `delete_noreply`, [`Pipeline::send`]) leave the connection owing a sync: the next call
//!   that reads on it sends a sync ahead of its own request and sets aside every reply before
//!   the sync's (counted in [`ServerCounters::late_replies`]).
//! - **Error lines name nothing.** On meta, an error line (which carries no opaque) closes
//!   the connection after it is reported. A late one is counted, never reported to the call
//!   that reads it (whose own reply comes after the sync's); if the server may close after
//!   it, or the stream be out of step, the connection is replaced once that call is done.
//!
//! Assumed: the server answers each connection's requests in order and echoes opaques
//! (memcached does on every protocol). Tested by `proto-tests/replies.rs` (each case that
//! failed before) and `proto-tests/adversarial.rs` (every front at once under faults), and
//! fuzzed by the `conn_stream` target.
//!
//! # Many servers
//!
//! Keys are spread over the configured servers as libmemcached spreads them (see
//! [`crate::ring`]). Multi-key calls ([`Client::get_multi`], [`Client::set_multi`],
//! [`Client::delete_multi`], pipelines) group keys by server, write every server's batch
//! first, then serve all sockets from one `poll` as replies arrive: the wall time is one round
//! trip, not one per server.
//!
//! # Failure handling
//!
//! libmemcached's model. Every call has a connect timeout and an I/O timeout. After
//! `server_failure_limit` consecutive failures (I/O error, timeout, malformed reply) a server
//! is *ejected* for `retry_timeout`: calls for its keys fail at once with
//! [`Error::ServerDown`] or, with `remove_failed_servers` on and a consistent distribution,
//! its keys go to the rest of the continuum. When the retry timeout has passed, the server is
//! back in the continuum; its next call decides: a success rejoins it for good, a failure
//! ejects it again. A dead or frozen server never delays calls for keys on other servers, and
//! delays a multi-key call by at most one I/O timeout; the multi-key call still delivers the
//! healthy servers' results and reports the failed servers in its error.

mod builder;
mod copy_batch;
mod meta_api;
mod multi;
mod pool;
mod replicated;

pub use crate::engine::health::ServerCounters;
pub use crate::engine::pipeline::{Pipeline, PipelineReport};
pub use crate::proto::{Key, KeyError, Protocol, SetOutcome, StoreMode};
pub use crate::shared::{IoMode, SharedClient, SharedClientBuilder, DEFAULT_PIPELINE_DEPTH};
pub use builder::ClientBuilder;
pub use meta_api::{Lease, MetaGetOptions, MetaItemInfo, MetaSetOptions, MetaSetResult};
pub use pool::{Pool, PooledClient};

use crate::command::{get_opts, Op as CommandOp, Reply};
use crate::engine::reply::{arith_value, existed};
use crate::engine::{Core, KeyServers, Route, Scratch, ServerInstance};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::text;
use crate::proto::wire::{Capability, Cmd, GetOpts, Outcome, StoreOpts};
use crate::proto::ParseError;
use crate::ring::Continuum;

/// [`Client`]'s keyed methods, from the one list of commands
/// ([`keyed_commands!`](crate::command::keyed_commands)): each runs its command, or calls its
/// direct path.
macro_rules! client_methods {
    ($($(#[$doc:meta])* $name:ident / $_async:ident ($($arg:ident: $t:ty),*) -> $out:ty
        = $cmd:expr $(, direct $direct:ident)?;)*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self, $($arg: $t),*) -> Result<$out> {
            client_body!(self $(, $direct)?; { use crate::command::*; $cmd }; $($arg),*)
        }
    )*};
}

/// A client method's body: its command run, or its direct path called.
macro_rules! client_body {
    ($client:ident; $cmd:expr; $($arg:ident),*) => {
        $client.run($cmd)
    };
    ($client:ident, $direct:ident; $cmd:expr; $($arg:ident),*) => {
        // With copies the command goes through the fleet layer (the executor).
        if $client.core.replicated() {
            $client.run_copies($cmd)
        } else {
            $client.$direct($($arg),*)
        }
    };
}

/// An item read from the cache, with its value copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The flags stored with it.
    pub flags: u32,
    /// The CAS unique, for `gets`/`gats` (and `None` for `get`/`gat`).
    pub cas: Option<u64>,
}

/// What [`Client::get_into`] found, besides the value it wrote into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemInfo {
    /// The flags stored with the item.
    pub flags: u32,
    /// The CAS unique, when asked for.
    pub cas: Option<u64>,
}

/// An item borrowed from the client's read buffer, as [`Client::get_multi`] passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemRef<'a> {
    /// The value's bytes (valid during the callback only).
    pub value: &'a [u8],
    /// The flags stored with it.
    pub flags: u32,
    /// The CAS unique, if asked for.
    pub cas: Option<u64>,
}

/// Time to live and flags for a storage command.
///
/// ```
/// use mcstore::SetOptions;
/// let opts = SetOptions::default().ttl(300).flags(2);
/// assert_eq!((opts.ttl, opts.flags), (300, 2));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Expiration: 0 never expires; up to 30 days (2,592,000) is seconds from now; above that,
    /// a Unix timestamp (protocol.txt, "Expiration times").
    pub ttl: u32,
    /// Opaque flags stored with the value.
    pub flags: u32,
}

/// memcached reads an expiration above this many seconds (30 days) as a Unix timestamp.
const RELATIVE_TTL_MAX: u64 = 30 * 24 * 3600;

impl SetOptions {
    setters! {
        /// Sets the expiration (see the field).
        ttl(ttl: u32) => ttl;

        /// Sets the flags.
        flags(flags: u32) => flags;
    }

    /// Expires the item `d` from now, as a [`Duration`](std::time::Duration), whatever its
    /// length: up to 30 days it is sent as seconds (rounded up: a sub-second duration is one
    /// second, never 0, which would mean "never"); beyond, as the Unix time it ends at, which
    /// is how memcached reads longer expirations (this host's clock then matters). A
    /// duration past what memcached can express (2106) is capped there.
    ///
    /// ```
    /// use mcstore::SetOptions;
    /// use std::time::Duration;
    /// assert_eq!(SetOptions::default().expire_after(Duration::from_secs(90)).ttl, 90);
    /// assert_eq!(SetOptions::default().expire_after(Duration::from_millis(10)).ttl, 1);
    /// let far = SetOptions::default().expire_after(Duration::from_secs(60 * 24 * 3600));
    /// assert!(far.ttl > 1_700_000_000); // an absolute time
    /// ```
    pub fn expire_after(mut self, d: std::time::Duration) -> Self {
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        self.ttl = if secs <= RELATIVE_TTL_MAX {
            secs.max(1) as u32
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs());
            now.saturating_add(secs).min(u64::from(u32::MAX)) as u32
        };
        self
    }
}

/// The outcome of a [`Client::cas`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasResult {
    /// The value was stored.
    Stored,
    /// Someone wrote the item since the CAS unique was read: nothing was stored.
    Exists,
    /// The item does not exist (any more).
    NotFound,
}

/// One server's statistics, in the order the server sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStats {
    /// The server as configured.
    pub server: String,
    /// `(name, value)` pairs (empty if the server failed).
    pub stats: Vec<(String, String)>,
    /// Why this server's statistics are missing, if it failed.
    pub error: Option<String>,
}

impl ServerStats {
    /// The value of statistic `name`, if the server sent it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.stats
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A memcached client (text, binary or meta protocol; see [`Protocol`]).
///
/// # Methods by group
///
/// - **Reading one key:** [`get`](Self::get), [`gets`](Self::gets) (with the CAS unique),
///   [`gat`](Self::gat) / [`gats`](Self::gats) (get and touch), [`get_into`](Self::get_into) /
///   [`gets_into`](Self::gets_into) (into your buffer: the allocation-free hot path).
/// - **Writing one key:** [`set`](Self::set), [`add`](Self::add), [`replace`](Self::replace),
///   [`append`](Self::append), [`prepend`](Self::prepend), [`cas`](Self::cas),
///   [`store`](Self::store) (any mode), [`delete`](Self::delete).
/// - **Counters and expiry:** [`incr`](Self::incr), [`decr`](Self::decr),
///   [`touch`](Self::touch).
/// - **Many keys, one round trip per server:** [`get_multi`](Self::get_multi),
///   [`gets_multi`](Self::gets_multi), [`set_multi`](Self::set_multi),
///   [`delete_multi`](Self::delete_multi).
/// - **Fire and forget:** [`pipeline`](Self::pipeline), [`store_noreply`](Self::store_noreply),
///   [`delete_noreply`](Self::delete_noreply).
/// - **Meta protocol only:** [`meta_get`](Self::meta_get) (leases, remaining TTL, last
///   access), [`meta_set`](Self::meta_set), [`invalidate`](Self::invalidate),
///   [`meta_debug`](Self::meta_debug); [`has_leases`](Self::has_leases) says whether they work.
/// - **Servers:** [`flush_all`](Self::flush_all), [`flush_server`](Self::flush_server),
///   [`version`](Self::version), [`stats`](Self::stats), [`verbosity`](Self::verbosity),
///   [`dump_keys`](Self::dump_keys), [`quit`](Self::quit).
/// - **Where keys go, and how servers fare:** [`servers`](Self::servers),
///   [`protocol`](Self::protocol), [`continuum`](Self::continuum),
///   [`server_for_key`](Self::server_for_key),
///   [`home_server_for_key`](Self::home_server_for_key),
///   [`server_counters`](Self::server_counters).
///
/// The keyed calls are described once, for every front: [`SharedClient`] has the same
/// methods on `&self`, each with an `_async` twin.
///
/// ```no_run
/// use mcstore::{Client, SetOptions, CasResult};
/// # fn main() -> mcstore::Result<()> {
/// let mut c = Client::builder().server("127.0.0.1:11211").build()?;
/// c.set(b"counter", b"10", SetOptions::default())?;
/// assert_eq!(c.incr(b"counter", 5)?, Some(15));
/// let item = c.gets(b"counter")?.unwrap();
/// assert_eq!(c.cas(b"counter", b"0", item.cas.unwrap(), SetOptions::default())?, CasResult::Stored);
/// let mut buf = Vec::with_capacity(1024);
/// if let Some(info) = c.get_into(b"counter", &mut buf)? {   // no allocation once warm
///     println!("{} bytes, flags {}", buf.len(), info.flags);
/// }
/// # Ok(()) }
/// ```
pub struct Client {
    core: Core,
    scratch: Scratch,
    /// A write with copies' parts and batches, kept between calls (nothing allocated
    /// once warm).
    copy_scratch: copy_batch::CopyScratch,
    /// The servers' smallest `item_size_max`, asked once by the first chunked store.
    pub(crate) item_size: Option<usize>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", self.core.labels())
            .field("protocol", &self.core.protocol())
            .field(
                "namespace",
                &self.core.namespace().escape_ascii().to_string(),
            )
            .field("max_value", &self.core.limits().max_value)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The servers of its list now, as configured, in list order (see
    /// [`server_list`](Self::server_list)).
    pub fn servers(&self) -> &[String] {
        self.core.member_labels()
    }

    /// The wire protocol this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.core.protocol()
    }

    /// Whether this client can use memcached's leases and invalidation ([`meta_get`],
    /// [`invalidate`], [`meta_set`]): the meta protocol can, text and binary cannot.
    ///
    /// [`meta_get`]: Self::meta_get
    /// [`invalidate`]: Self::invalidate
    /// [`meta_set`]: Self::meta_set
    pub fn has_leases(&self) -> bool {
        self.core.protocol().supports(Capability::Meta)
    }

    /// The key distribution in use.
    pub fn continuum(&self) -> &Continuum {
        self.core.ring()
    }

    /// Each server's counters, in configuration order.
    pub fn server_counters(&self) -> Vec<(String, ServerCounters)> {
        self.core.server_counters()
    }

    /// The server `key` goes to right now (after ejections), as configured; the namespace
    /// is taken into account as the client hashes it.
    ///
    /// # Errors
    /// An invalid key, no server, or the key's server ejected.
    pub fn server_for_key(&mut self, key: &[u8]) -> Result<&str> {
        let i = self.core.server_now(&mut self.scratch, key)?;
        Ok(&self.core.labels()[i])
    }

    /// The server `key` belongs to with every server up: where it goes back to when ejected
    /// servers rejoin (with [`remove_failed_servers`](ClientBuilder::remove_failed_servers),
    /// [`server_for_key`](Self::server_for_key) names another server meanwhile).
    ///
    /// # Errors
    /// An invalid key, or no server.
    pub fn home_server_for_key(&mut self, key: &[u8]) -> Result<&str> {
        let i = self.core.home_of_key(&mut self.scratch, key)?;
        Ok(&self.core.labels()[i])
    }

    /// Where `key` goes now, and its own server (where it goes with every server up), for a
    /// caller that then pins its calls there (a server being probed counts as up: pinned
    /// calls pass its breaker).
    pub(crate) fn route_of_key(&mut self, key: &[u8]) -> Result<Route> {
        self.core.route_key_peek(&mut self.scratch, key)
    }

    /// The servers the storage reads (`read`) or invalidates `key` on: its route without
    /// copies, its copies with them (see `KeyServers`). The storage pins its calls there.
    pub(crate) fn storage_servers(&mut self, key: &[u8], read: bool) -> Result<KeyServers> {
        self.core.storage_servers(&mut self.scratch, key, read)
    }

    /// [`route_of_key`](Self::route_of_key) for one call about to be made there: it takes
    /// the probe of a server being probed, or is refused if another call holds it.
    pub(crate) fn route_call(&mut self, key: &[u8]) -> Result<Route> {
        self.core.route_key(&mut self.scratch, key)
    }

    /// Runs `f` with every keyed call sent to server `server`, whatever the continuum says
    /// meanwhile (calls fail if it is ejected): for calls that must all reach one server
    /// while another client of the pool may eject or rejoin servers.
    pub(crate) fn pinned<T>(&mut self, server: usize, f: impl FnOnce(&mut Client) -> T) -> T {
        let before = self.core.pin(Some(server));
        let r = f(self);
        self.core.pin(before);
        // A list published meanwhile is taken now (one atomic load otherwise): a shared
        // client's engine leaves a removed server after its round, not at its next one.
        self.core.maybe_rejoin();
        r
    }

    /// Which process server `server` is (connecting if needed; asked with `stats` once per
    /// connection).
    ///
    /// A CAS unique is only good on the process that gave it: a restarted memcached counts
    /// from 1 again, so an old unique can match a newer item. A `cas` sent after this on the
    /// same connection (no error in between) reaches the instance this names.
    pub(crate) fn instance(&mut self, server: usize) -> Result<ServerInstance> {
        self.core.instance(server)
    }

    /// Validates `key`, builds its wire form (with the namespace), routes it, runs `f` on the
    /// chosen server and records the outcome in that server's health.
    fn keyed<T>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        self.core.keyed(key, self.scratch.keybuf(), f)
    }

    /// [`keyed`](Self::keyed) for a command that changes the key (see `Core::keyed_write`).
    fn keyed_write<T>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        self.core.keyed_write(key, self.scratch.keybuf(), f)
    }

    /// Reads one item, handing its value to `sink` (the shared client's single calls too).
    pub(crate) fn retrieve(
        &mut self,
        opts: GetOpts,
        key: &[u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<Option<ItemInfo>> {
        self.keyed(key, |c, i, key| {
            let mut found = None;
            let found = c.call(i, &Cmd::Get(key, opts), None, |o, last| match o {
                // A text reply names its key: it must be ours, and come once.
                Outcome::Hit(h) if found.is_none() && h.key.is_none_or(|k| k == key.as_bytes()) => {
                    sink(h.data);
                    found = Some(ItemInfo {
                        flags: h.flags,
                        cas: h.cas.filter(|_| opts.cas),
                    });
                    Ok(last.then_some(found))
                }
                Outcome::End | Outcome::Miss => Ok(Some(found)),
                _ => Err(ParseError::Unexpected),
            })?;
            c.count_lookup(i, found.is_some());
            Ok(found)
        })
    }

    /// Runs a storage command; the outcome and, when the protocol returns it, the new CAS.
    pub(crate) fn store_cmd(
        &mut self,
        key: &[u8],
        value: &[u8],
        opts: StoreOpts,
    ) -> Result<(SetOutcome, Option<u64>)> {
        self.core.check_value(value)?;
        self.keyed_write(key, |c, i, key| {
            let cmd = Cmd::Store(key, opts, value.len());
            c.call(i, &cmd, Some(value), |o, _| match o {
                // Without a CAS, "exists" and "not found" cannot answer a store.
                Outcome::Store(s, cas, _)
                    if opts.cas.is_some()
                        || matches!(s, SetOutcome::Stored | SetOutcome::NotStored) =>
                {
                    Ok(Some((s, cas)))
                }
                _ => Err(ParseError::Unexpected),
            })
        })
    }

    /// Runs a command whose reply says "done" or "not found": `Ok(false)` for the latter.
    fn keyed_bool(&mut self, key: &[u8], cmd: impl FnOnce(Key<'_>) -> Cmd<'_>) -> Result<bool> {
        self.keyed_write(key, |c, i, key| {
            c.call(i, &cmd(key), None, |o, _| existed(o))
        })
    }

    /// Runs `incr` (or `decr`): the new value, `None` if the key does not exist.
    pub(crate) fn arith(&mut self, decr: bool, key: &[u8], delta: u64) -> Result<Option<u64>> {
        self.keyed_write(key, |c, i, key| {
            let cmd = Cmd::Arith { key, decr, delta };
            c.call(i, &cmd, None, |o, _| arith_value(o))
        })
    }

    /// Runs one keyed command (the primitive of [`Client::run`], and of a shared client's
    /// calls made on their own): a hit's value into `out`. Always inlined: a keyed method
    /// names its `op`, and the match folds away to that command's own code.
    #[inline(always)]
    pub(crate) fn perform(
        &mut self,
        op: CommandOp,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Reply> {
        let sink = |d: &[u8]| {
            out.clear();
            out.extend_from_slice(d);
        };
        if self.core.replicated() {
            return self.perform_replicated(op, key, value, out);
        }
        let hit = |info: Option<ItemInfo>| info.map_or(Reply::Miss, Reply::Hit);
        Ok(match op {
            CommandOp::Get { cas } => hit(self.retrieve(get_opts(cas, None), key, sink)?),
            CommandOp::Gat { ttl, cas } => {
                hit(self.retrieve(get_opts(cas, Some(ttl)), key, sink)?)
            }
            CommandOp::Store(o) => Reply::Store(self.store_cmd(key, value, o)?.0),
            CommandOp::Delete => Reply::Existed(self.keyed_bool(key, Cmd::delete)?),
            CommandOp::Arith { decr, delta } => Reply::Number(self.arith(decr, key, delta)?),
            CommandOp::Touch(ttl) => {
                Reply::Existed(self.keyed_bool(key, |key| Cmd::Touch(key, ttl))?)
            }
        })
    }

    /// [`get_into`](Self::get_into)'s own path (see `keyed_commands!`).
    #[inline(always)]
    fn get_into_direct(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        self.retrieve(GetOpts::default(), key, |d| buf.extend_from_slice(d))
    }

    /// [`set`](Self::set)'s own path.
    #[inline(always)]
    fn set_direct(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        let opts = store_opts(StoreMode::Set, opts);
        match self.store_cmd(key, value, opts)?.0 {
            SetOutcome::Stored => Ok(()),
            _ => Err(Error::Server {
                kind: ServerErrorKind::Server,
                message: "set answered NOT_STORED".into(),
            }),
        }
    }

    /// [`delete`](Self::delete)'s own path.
    #[inline(always)]
    fn delete_direct(&mut self, key: &[u8]) -> Result<bool> {
        self.keyed_bool(key, Cmd::delete)
    }

    crate::command::keyed_commands!(client_methods);

    /// Invalidates every item on every server, now or after `delay` seconds.
    ///
    /// # Errors
    /// The failed server's error, or [`Error::Partial`] naming each failed server.
    pub fn flush_all(&mut self, delay: Option<u32>) -> Result<()> {
        self.core.on_all_ok(&Cmd::FlushAll(delay))
    }

    /// Invalidates every item on one server (named as configured, as in
    /// [`servers`](Self::servers)), now or after `delay` seconds.
    ///
    /// # Errors
    /// [`Error::Config`] for a server this client does not have; otherwise that server's
    /// error, as for [`flush_all`](Self::flush_all).
    pub fn flush_server(&mut self, server: &str, delay: Option<u32>) -> Result<()> {
        self.core.maybe_rejoin();
        let i = self.core.server_index(server)?;
        self.core
            .on_server(i, &Cmd::FlushAll(delay), &mut |o| match o {
                Outcome::Ok => Ok(Some(())),
                _ => Err(ParseError::Unexpected),
            })
    }

    /// Lists the keys one server holds (named as configured), through memcached's LRU
    /// crawler (`lru_crawler metadump all`, memcached 1.5 and later): `each` gets every key,
    /// decoded, and its item's metadata as the server wrote it (`exp=.. la=.. cas=.. fetch=..
    /// cls=.. size=..`). The keys are as stored, namespace included. A snapshot taken while
    /// the server runs: items written meanwhile may or may not appear.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) over the binary protocol
    /// (the crawler speaks text); [`Error::Config`] for a server this client does not have;
    /// a server error when the crawler is disabled, or still busy after the I/O timeout (a
    /// `BUSY` crawler, running a crawl of its own or another client's dump, is asked again
    /// until then).
    pub fn dump_keys(&mut self, server: &str, mut each: impl FnMut(&[u8], &str)) -> Result<()> {
        self.core.require(Capability::MetaDump, "dump_keys")?;
        self.core.maybe_rejoin();
        let i = self.core.server_index(server)?;
        let until = std::time::Instant::now() + self.core.io_timeout();
        loop {
            match self.dump_once(i, &mut each) {
                // The crawler answers BUSY before any key: nothing was handed out yet.
                Err(Error::Server { message, .. })
                    if message.starts_with("BUSY") && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    /// One `lru_crawler metadump all` on server `i` (see [`dump_keys`](Self::dump_keys)).
    fn dump_once(&mut self, i: usize, each: &mut impl FnMut(&[u8], &str)) -> Result<()> {
        let mut key = Vec::new();
        self.core.on_server(i, &Cmd::MetaDump, &mut |o| match o {
            Outcome::Stat(b"key", line) => {
                let (encoded, meta) =
                    line.split_at(line.iter().position(|&b| b == b' ').unwrap_or(line.len()));
                if !url_decode(encoded, &mut key) {
                    return Err(ParseError::BadFormat);
                }
                each(
                    &key,
                    String::from_utf8_lossy(meta.trim_ascii_start()).as_ref(),
                );
                Ok(None)
            }
            Outcome::End => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        })
    }

    /// Sets every server's logging verbosity.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) over the binary protocol: memcached does not implement
    /// the binary Verbosity command, and sending it desynchronises the connection. Otherwise
    /// as [`flush_all`](Self::flush_all).
    pub fn verbosity(&mut self, level: u32) -> Result<()> {
        self.core.require(Capability::Verbosity, "verbosity")?;
        self.core.on_all_ok(&Cmd::Verbosity(level))
    }

    /// Each server's version string: `(server, version)`. Errors as
    /// [`flush_all`](Self::flush_all).
    pub fn version(&mut self) -> Result<Vec<(String, String)>> {
        let results = self.core.each_server(&Cmd::Version, |o| match o {
            Outcome::Version(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            _ => Err(ParseError::Unexpected),
        });
        Ok(self
            .core
            .all_or_errors(results)?
            .into_iter()
            .map(|(i, v)| (self.core.labels()[i].clone(), v))
            .collect())
    }

    /// Each server's statistics: `stats` with no argument, or `stats <arg>` (`items`, `slabs`,
    /// `settings`, `sizes`, `conns`, `detail dump`, `cachedump <id> <n>`, ...). Arguments that
    /// answer with a single status line (`reset`, `detail on`) give an empty list. A server
    /// that fails has its [`ServerStats::error`] set.
    ///
    /// # Errors
    /// An argument that is not a valid stats argument ([`ErrorKind::Config`](crate::ErrorKind::Config)); the servers'
    /// errors if all of them fail.
    pub fn stats(&mut self, arg: Option<&str>) -> Result<Vec<ServerStats>> {
        if let Some(a) = arg {
            if !text::valid_stats_arg(a.as_bytes()) {
                return Err(Error::Config(format!("invalid stats argument {a:?}")));
            }
        }
        let mut stats = Vec::new();
        let results = self
            .core
            .each_server(&Cmd::Stats(arg.map(str::as_bytes)), |o| match o {
                Outcome::Stat(name, value) => {
                    stats.push((
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                    Ok(None)
                }
                Outcome::End | Outcome::Ok => Ok(Some(std::mem::take(&mut stats))),
                _ => Err(ParseError::Unexpected),
            });
        if results.iter().all(|(_, r)| r.is_err()) {
            return self.core.all_or_errors(results).map(|_| Vec::new());
        }
        Ok(results
            .into_iter()
            .map(|(i, r)| {
                let server = self.core.labels()[i].clone();
                match r {
                    Ok(stats) => ServerStats {
                        server,
                        stats,
                        error: None,
                    },
                    Err(e) => ServerStats {
                        server,
                        stats: Vec::new(),
                        error: Some(e.to_string()),
                    },
                }
            })
            .collect())
    }

    /// Asks each connected server to close the connection (`quit`) and closes it. The next
    /// call reconnects.
    ///
    /// # Errors
    /// The first server whose `quit` could not be written.
    pub fn quit(&mut self) -> Result<()> {
        self.core.quit()
    }

    /// Runs a storage command with `noreply`: returns once the request is written. The server
    /// sends nothing back on success; an error it does send is seen by the next call on this
    /// connection (which then reconnects). Use a [`Pipeline`] to learn about errors.
    ///
    /// # Errors
    /// An invalid key or value; the request could not be written.
    pub fn store_noreply(
        &mut self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<()> {
        let mut p = self.pipeline();
        p.store(mode, key, value, opts)?;
        p.send()
    }

    /// `delete` with `noreply`. Errors as [`store_noreply`](Self::store_noreply).
    pub fn delete_noreply(&mut self, key: &[u8]) -> Result<()> {
        let mut p = self.pipeline();
        p.delete(key)?;
        p.send()
    }
}

impl Client {
    /// Starts a pipeline of noreply writes: they are buffered per server and sent in large
    /// writes without waiting for replies, and [`Pipeline::finish`] waits once for every server
    /// to have processed them all.
    pub fn pipeline(&mut self) -> Pipeline<'_> {
        Pipeline::new(&mut self.core, self.scratch.keybuf())
    }
}

/// What [`SharedClient`] needs of a client beyond the public calls: its settings, read once
/// when the shared client is built, and the transport of a round's engine. Named methods
/// rather than field access, so the client's internals can change without touching it.
impl Client {
    /// The engine this client runs on (to read its state).
    pub(crate) fn core_ref(&self) -> &Core {
        &self.core
    }

    /// The engine this client runs on, and its working space: for the engine's own calls
    /// (multi-key batches, a shared client's rounds).
    pub(crate) fn engine(&mut self) -> (&mut Core, &mut Scratch) {
        (&mut self.core, &mut self.scratch)
    }

    /// Takes the list now if it is connected to one of `removed` (servers a change just
    /// took out of its list): an idle client leaves them at once.
    pub(crate) fn leave_removed(&mut self, removed: &[usize]) {
        if removed.iter().any(|&i| self.core.is_connected(i)) {
            self.core.maybe_rejoin();
        }
    }

    /// The labels of the list's servers now, shared (list order).
    pub(crate) fn servers_arc(&self) -> &std::sync::Arc<[String]> {
        self.core.member_labels()
    }

    /// The server labels by index (every server the list ever named), shared.
    pub(crate) fn label_list(&self) -> &std::sync::Arc<[String]> {
        self.core.labels()
    }

    /// The namespace (key prefix), shared.
    pub(crate) fn namespace_arc(&self) -> &std::sync::Arc<[u8]> {
        self.core.namespace()
    }

    /// The server list this client follows: [`ServerList::set`](crate::ServerList::set)
    /// changes its servers while it serves (and those of every client following the same
    /// list, such as a pool's).
    pub fn server_list(&self) -> &crate::ServerList {
        self.core.server_list()
    }

    /// The record of ejections this client shares with others (a pool's clients, a shared
    /// client's engines).
    pub(crate) fn shared_health(&self) -> &std::sync::Arc<crate::engine::health::SharedHealth> {
        self.core.shared_health()
    }

    /// The largest value a store may send.
    pub(crate) fn max_value(&self) -> usize {
        self.core.limits().max_value
    }

    /// Whether the connections are TLS (batches then stay within one TLS record).
    pub(crate) fn is_tls(&self) -> bool {
        self.core.is_tls()
    }
}

/// The command options of a storage call.
pub(crate) fn store_opts(mode: StoreMode, opts: SetOptions) -> StoreOpts {
    StoreOpts {
        mode,
        flags: opts.flags,
        ttl: opts.ttl,
        ..StoreOpts::default()
    }
}

/// Decodes memcached's url-encoding of a key (`%XX` escapes) into `out`; false if malformed.
fn url_decode(s: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            match (
                s.get(i + 1).and_then(|&b| hex(b)),
                s.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => return false,
            }
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    true
}
