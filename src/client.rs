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
mod health;
mod meta_api;
mod multi;
#[cfg(any(test, fuzzing))]
pub(crate) use multi::for_fuzzing as multi_for_fuzzing;
#[cfg(any(test, fuzzing))]
pub(crate) use pipeline::for_fuzzing as pipeline_for_fuzzing;
mod pipeline;
mod pool;
mod session;

/// The old home of the shared client's lending door, for code that still names it there.
pub(crate) mod shared {
    pub(crate) use crate::shared::Lent;
}

pub use crate::proto::{Key, KeyError, Protocol, SetOutcome, StoreMode};
pub use crate::shared::{IoMode, SharedClient, SharedClientBuilder};
pub use builder::ClientBuilder;
pub use health::ServerCounters;
pub use meta_api::{Lease, MetaGetOptions, MetaItemInfo, MetaSetOptions, MetaSetResult};
pub(crate) use multi::Keys;
pub use pipeline::{Pipeline, PipelineReport};
pub use pool::{Pool, PooledClient};

use crate::command::{get_opts, Op as CommandOp, Reply};
use crate::conn::driver::{Driver, Op, Until, COPY_VALUE_MAX};
use crate::error::{Error, Result, ServerErrorKind};
use crate::observe::CallOp;
use crate::proto::meta::{self, MAX_BINARY_KEY_LEN};
use crate::proto::text;
use crate::proto::wire::{
    with_wire, Capability, Cmd, Expect, GetOpts, Kind, Outcome, Refusal, StoreOpts, Wire,
};
use crate::proto::{Limits, ParseError, Status, MAX_KEY_LEN};
use crate::ring::Continuum;
use health::Health;

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
        $client.$direct($($arg),*)
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
}

/// One server process: its index in the client's list, its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerInstance {
    server: usize,
    pid: u64,
    started: u64,
}

impl ServerInstance {
    /// Its index in the client's server list.
    pub(crate) fn server(&self) -> usize {
        self.server
    }
}

/// Where a key goes: `server` now, `home` with every server up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) server: usize,
    pub(crate) home: usize,
}

impl Route {
    /// Whether the key goes to its own server (no ejection moved it).
    pub(crate) fn is_home(&self) -> bool {
        self.server == self.home
    }
}

/// What a call works with: the connections and their health, the key distribution, and the
/// settings the client was built with. Calls that borrow [`Scratch`] (a namespaced key, a
/// multi-key plan) hand the core to their callbacks, so nothing is taken out and put back.
pub(crate) struct Core {
    driver: Driver,
    limits: Limits,
    ring: Continuum,
    /// Shared, so a multi-key call can hold them while it runs without copying the strings.
    labels: std::sync::Arc<[String]>,
    health: Health,
    /// Shared, like the labels: a multi-key call holds it while the caller's callback runs.
    namespace: std::sync::Arc<[u8]>,
    hash_with_namespace: bool,
    protocol: Protocol,
    sasl: Option<(String, String)>,
    /// ASCII authentication (text and meta), as `user password`.
    ascii_auth: Option<(String, String)>,
    /// Per server: the connection count at which SASL last succeeded.
    authenticated: Vec<u64>,
    /// Per server: which process the connection (by count) reaches, once asked.
    instances: Vec<Option<(u64, ServerInstance)>>,
    /// Set by [`Client::pinned`]: every keyed call goes to this server.
    pinned: Option<usize>,
    /// Next binary opaque.
    opaque: u32,
}

/// Per-call working space, reused by the next call so that a warm call allocates nothing.
#[derive(Default)]
struct Scratch {
    /// A namespaced (or base64) wire key.
    keybuf: Vec<u8>,
    /// The last multi-key call's plan and batch list.
    plan: multi::Plan,
    batches: Vec<crate::conn::driver::Batch<'static>>,
}

/// The wire form of a user key: `namespace + key`, validated for the protocol, and the raw
/// namespaced bytes (what is hashed with `hash_with_namespace`). With `binary_keys` (meta), a
/// key that is not a valid text key is sent base64-encoded with the `b` flag (notes §6), so it
/// may hold any bytes, up to 186 of them with the namespace.
fn wire_key<'b>(
    namespace: &[u8],
    user: &'b [u8],
    binary_keys: bool,
    buf: &'b mut Vec<u8>,
) -> Result<(Key<'b>, &'b [u8])> {
    // One validation of the user key: the namespace was validated when the client was built,
    // so only the combined length is left to check.
    let binary = match Key::new(user) {
        Ok(k) if namespace.is_empty() => return Ok((k, user)),
        Ok(_) => false,
        Err(KeyError::BadByte { .. }) if binary_keys => true,
        Err(e) => return Err(e.into()),
    };
    let len = namespace.len() + user.len();
    if binary && len > MAX_BINARY_KEY_LEN {
        return Err(KeyError::BinaryTooLong(len).into());
    }
    if len > MAX_KEY_LEN {
        return Err(KeyError::TooLong(len).into());
    }
    buf.clear();
    buf.extend_from_slice(namespace);
    buf.extend_from_slice(user);
    if !binary {
        return Ok((Key::trusted(buf), buf));
    }
    let raw_len = buf.len();
    let mut tmp = [0u8; MAX_BINARY_KEY_LEN];
    tmp[..raw_len].copy_from_slice(buf);
    meta::encode_base64(buf, &tmp[..raw_len]);
    let (raw, token) = buf.split_at(raw_len);
    Ok((Key::base64_token(token), raw))
}

/// A delete's or touch's reply: whether the item existed.
pub(crate) fn existed(o: Outcome<'_>) -> Result<Option<bool>, ParseError> {
    match o {
        Outcome::Deleted(_) | Outcome::Touched => Ok(Some(true)),
        Outcome::NotFound(_) | Outcome::Miss => Ok(Some(false)),
        _ => Err(ParseError::Unexpected),
    }
}

/// An incr's or decr's reply: the new value, `None` if the item does not exist.
pub(crate) fn arith_value(o: Outcome<'_>) -> Result<Option<Option<u64>>, ParseError> {
    match o {
        Outcome::Number(n) => Ok(Some(Some(n))),
        Outcome::NotFound(_) => Ok(Some(None)),
        _ => Err(ParseError::Unexpected),
    }
}

/// Folds the reply units of one command, sans I/O: `on` turns outcomes into the call's
/// result (`Some` ends the exchange, `None` asks for more); an error reply ends it with the
/// matching error, and says whether the connection must be closed.
pub(crate) struct SingleReader<'c, F, T> {
    pub(crate) expect: Expect,
    pub(crate) limits: Limits,
    pub(crate) label: &'c str,
    /// The command carried a data block.
    pub(crate) data_block: bool,
    pub(crate) on: F,
    pub(crate) out: Option<T>,
    /// An error reply: the error, and whether the connection is to be closed.
    pub(crate) refused: Option<(Error, bool)>,
}

impl<F, T> SingleReader<'_, F, T>
where
    F: FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
{
    /// Reads one reply unit from the start of `buf`: the bytes it took and whether it was
    /// the last, or `Partial`. An error is a reply that cannot answer this command.
    #[inline(always)]
    pub(crate) fn read<W: Wire>(
        &mut self,
        buf: &[u8],
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let (n, unit) = match W::decode(buf, &self.expect, &self.limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        if let Outcome::Error {
            refusal,
            message,
            closes,
            ..
        } = unit.outcome
        {
            // After an error answering a data block, the block may be read as commands.
            let close = closes || self.data_block;
            self.refused = Some((refused(self.label, refusal, message), close));
            return Ok(Status::Complete((n, true)));
        }
        match (self.on)(unit.outcome, unit.last)? {
            Some(t) => {
                self.out = Some(t);
                Ok(Status::Complete((n, true)))
            }
            // Nothing more will come for this command.
            None if unit.last => Err(ParseError::Unexpected),
            None => Ok(Status::Complete((n, false))),
        }
    }
}

/// Opaques stay below 2^31.
const OPAQUE_MASK: u32 = 0x7fff_ffff;

/// The replies of quiet commands that went out earlier without a sync (a fire-and-forget
/// pipeline, `store_noreply`): the next call to read replies on that connection sends a sync
/// before its own request and reads them, up to the sync's reply, with this.
#[derive(Default)]
pub(crate) struct Strays {
    /// The connection owed a sync, and one went ahead of this call's request.
    pub(crate) owed: bool,
    /// The sync's reply has not been read yet.
    pub(crate) pending: bool,
    /// Sync replies still to read, the last being this call's own (earlier ones: syncs of
    /// fire-and-forget pipelines that nobody read).
    pub(crate) ends: u32,
    /// Replies read before it (unmet conditions, error lines).
    pub(crate) count: u64,
    /// One of them was an error line after which the server may close, or the stream be out
    /// of step: the connection is replaced once this call is done.
    pub(crate) doubt: bool,
}

impl Strays {
    /// For a call on server `i`: owing if its connection owes a sync (the caller sends one
    /// ahead of its request), with every unread sync before it to skip too.
    pub(crate) fn on(driver: &mut Driver, i: usize) -> Strays {
        let owed = driver.owes_sync(i);
        Strays {
            owed,
            pending: owed,
            ends: if owed {
                1 + driver.take_unread_syncs(i)
            } else {
                0
            },
            count: 0,
            doubt: false,
        }
    }

    /// Owing one sync (the stream fuzz body's batches).
    #[cfg(any(test, fuzzing))]
    pub(crate) fn owing() -> Strays {
        Strays {
            owed: true,
            pending: true,
            ends: 1,
            ..Strays::default()
        }
    }

    /// A sync went ahead of the request: the syncs (this one and earlier unread ones) that
    /// are still to be read go to the connection's account, for its next reader.
    pub(crate) fn abandon(&mut self, driver: &mut Driver, i: usize) {
        if self.pending {
            driver.add_unread_syncs(i, self.ends);
        }
        *self = Strays::default();
    }

    /// After the call succeeded: server `i`'s connection owes nothing now, and the late
    /// replies are counted (a connection in doubt is replaced).
    #[inline]
    pub(crate) fn settle(&self, driver: &mut Driver, health: &mut Health, i: usize) {
        if self.owed {
            driver.set_owes_sync(i, false);
            health.counters_mut(i).late_replies += self.count;
            if self.doubt {
                driver.disconnect(i);
            }
        }
    }

    /// Reads one unit at the start of `buf`: a stray reply, or the sync's reply, which ends
    /// them. They belong to no caller of this exchange: each is counted, and the call's own
    /// reply, after the sync's, is matched as usual (never failed for someone else's error).
    #[cold]
    pub(crate) fn read<W: Wire>(
        &mut self,
        buf: &[u8],
        limits: &Limits,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let (n, unit) = match W::decode(buf, &Expect::batch(Kind::Quiet), limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        match unit.outcome {
            Outcome::End => {
                self.ends -= 1;
                self.pending = self.ends > 0;
            }
            Outcome::Error { closes, .. } => {
                self.count += 1;
                self.doubt |= closes;
            }
            _ => self.count += 1,
        }
        Ok(Status::Complete((n, false)))
    }
}

/// The crate error for an error reply from server `server`.
fn refused(server: &str, refusal: Refusal, message: &[u8]) -> Error {
    let message = String::from_utf8_lossy(message).into_owned();
    let kind = match refusal {
        Refusal::Auth => {
            return Error::Auth {
                server: server.to_string(),
                message,
            }
        }
        // memcached -Y refuses every command of a connection that has not authenticated.
        Refusal::Client if message == "unauthenticated" => {
            return Error::Auth {
                server: server.to_string(),
                message: "the server requires ASCII authentication (memcached -Y), and no \
                          credentials are configured"
                    .into(),
            }
        }
        // memcached's `ERROR` says nothing more: say what it means.
        Refusal::UnknownCommand if message.is_empty() => {
            return Error::Server {
                kind: ServerErrorKind::UnknownCommand,
                message: "the server does not know this command (or its argument): it \
                          answered ERROR"
                    .into(),
            }
        }
        Refusal::UnknownCommand => ServerErrorKind::UnknownCommand,
        Refusal::Client => ServerErrorKind::Client,
        Refusal::Server => ServerErrorKind::Server,
    };
    Error::Server { kind, message }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.core.labels)
            .field("protocol", &self.core.protocol)
            .field("namespace", &self.core.namespace.escape_ascii().to_string())
            .field("max_value", &self.core.limits.max_value)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The servers, as configured, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.core.labels
    }

    /// The wire protocol this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.core.protocol
    }

    /// Whether this client can use memcached's leases and invalidation ([`meta_get`],
    /// [`invalidate`], [`meta_set`]): the meta protocol can, text and binary cannot.
    ///
    /// [`meta_get`]: Self::meta_get
    /// [`invalidate`]: Self::invalidate
    /// [`meta_set`]: Self::meta_set
    pub fn has_leases(&self) -> bool {
        self.core.protocol.supports(Capability::Meta)
    }

    /// The key distribution in use.
    pub fn continuum(&self) -> &Continuum {
        &self.core.ring
    }

    /// Each server's counters, in configuration order.
    pub fn server_counters(&self) -> Vec<(String, ServerCounters)> {
        (0..self.core.labels.len())
            .map(|i| {
                let mut c = self.core.health.counters(i);
                c.reconnects = self.core.driver.connects(i).saturating_sub(1);
                c.tls_resumptions = self.core.driver.resumed(i);
                (self.core.labels[i].clone(), c)
            })
            .collect()
    }

    /// The server `key` goes to right now (after ejections), as configured; the namespace
    /// is taken into account as the client hashes it.
    ///
    /// # Errors
    /// An invalid key, no server, or the key's server ejected.
    pub fn server_for_key(&mut self, key: &[u8]) -> Result<&str> {
        let Client { core, scratch } = self;
        let hashed = core.hashed(key, &mut scratch.keybuf)?;
        let i = core.route(hashed)?;
        Ok(&core.labels[i])
    }

    /// The server `key` belongs to with every server up: where it goes back to when ejected
    /// servers rejoin (with [`remove_failed_servers`](ClientBuilder::remove_failed_servers),
    /// [`server_for_key`](Self::server_for_key) names another server meanwhile).
    ///
    /// # Errors
    /// An invalid key, or no server.
    pub fn home_server_for_key(&mut self, key: &[u8]) -> Result<&str> {
        let Client { core, scratch } = self;
        let hashed = core.hashed(key, &mut scratch.keybuf)?;
        let i = core.ring.pick_home(hashed).ok_or(Error::NoServers)?;
        Ok(&core.labels[i])
    }

    /// Where `key` goes now, and its own server (where it goes with every server up).
    pub(crate) fn route_of_key(&mut self, key: &[u8]) -> Result<Route> {
        let Client { core, scratch } = self;
        let hashed = core.hashed(key, &mut scratch.keybuf)?;
        let server = core.route(hashed)?;
        let home = core.ring.pick_home(hashed).ok_or(Error::NoServers)?;
        Ok(Route { server, home })
    }

    /// Runs `f` with every keyed call sent to server `server`, whatever the continuum says
    /// meanwhile (calls fail if it is ejected): for calls that must all reach one server
    /// while another client of the pool may eject or rejoin servers.
    pub(crate) fn pinned<T>(&mut self, server: usize, f: impl FnOnce(&mut Client) -> T) -> T {
        let before = self.core.pinned.replace(server);
        let r = f(self);
        self.core.pinned = before;
        r
    }

    /// Which process server `server` is (connecting if needed; asked with `stats` once per
    /// connection).
    ///
    /// A CAS unique is only good on the process that gave it: a restarted memcached counts
    /// from 1 again, so an old unique can match a newer item. A `cas` sent after this on the
    /// same connection (no error in between) reaches the instance this names.
    pub(crate) fn instance(&mut self, server: usize) -> Result<ServerInstance> {
        let core = &mut self.core;
        core.check_up(server)?;
        let r = core.instance(server);
        if let Err(e) = &r {
            core.health.record_error(server, e, &mut core.ring);
        }
        r
    }

    /// Validates `key`, builds its wire form (with the namespace), routes it, runs `f` on the
    /// chosen server and records the outcome in that server's health.
    fn keyed<T>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        self.core.keyed(key, &mut self.scratch.keybuf, f)
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
            c.health.count_lookup(i, found.is_some());
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
        self.keyed(key, |c, i, key| {
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
        self.keyed(key, |c, i, key| {
            c.call(i, &cmd(key), None, |o, _| existed(o))
        })
    }

    /// Runs `incr` (or `decr`): the new value, `None` if the key does not exist.
    pub(crate) fn arith(&mut self, decr: bool, key: &[u8], delta: u64) -> Result<Option<u64>> {
        self.keyed(key, |c, i, key| {
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
        let Some(i) = self.core.labels.iter().position(|l| l == server) else {
            return Err(Error::Config(format!(
                "no server {server:?} in this client"
            )));
        };
        self.core.health.maybe_rejoin(&mut self.core.ring);
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
    /// a server error when the crawler is busy or disabled.
    pub fn dump_keys(&mut self, server: &str, mut each: impl FnMut(&[u8], &str)) -> Result<()> {
        self.core.require(Capability::MetaDump, "dump_keys")?;
        let Some(i) = self.core.labels.iter().position(|l| l == server) else {
            return Err(Error::Config(format!(
                "no server {server:?} in this client"
            )));
        };
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
            .map(|(i, v)| (self.core.labels[i].clone(), v))
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
                let server = self.core.labels[i].clone();
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
        let mut first_error = None;
        let protocol = self.core.protocol;
        for i in 0..self.core.labels.len() {
            if !self.core.driver.is_connected(i) {
                continue;
            }
            let sent = self.core.driver.begin(i).and_then(|op| {
                protocol.encode(self.core.driver.wbuf(i), &Cmd::Quit, 0, false);
                self.core
                    .driver
                    .exchange(i, &op, None, Until::Written, |_| Ok(Status::Partial))
            });
            self.core.driver.disconnect(i);
            if let Err(e) = sent {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
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

/// What [`SharedClient`] needs of a client beyond the public calls: its settings, read once
/// when the shared client is built, and the transport of a round's engine. Named methods
/// rather than field access, so the client's internals can change without touching it.
impl Client {
    /// The server labels, shared (configuration order).
    pub(crate) fn label_list(&self) -> &std::sync::Arc<[String]> {
        &self.core.labels
    }

    /// The namespace (key prefix), shared.
    pub(crate) fn namespace_arc(&self) -> &std::sync::Arc<[u8]> {
        &self.core.namespace
    }

    /// The largest value a store may send.
    pub(crate) fn max_value(&self) -> usize {
        self.core.limits.max_value
    }

    /// Whether the connections are TLS (batches then stay within one TLS record).
    pub(crate) fn is_tls(&self) -> bool {
        self.core.driver.is_tls()
    }
}

/// Validates `key` as a call would (namespace, length, binary keys over meta), without
/// keeping its wire form: for keys checked before they are queued.
pub(crate) fn check_key(namespace: &[u8], key: &[u8], binary_keys: bool) -> Result<()> {
    wire_key(namespace, key, binary_keys, &mut Vec::new()).map(drop)
}

/// Retrieval options asking for the CAS unique.
impl Core {
    /// The bytes the ring hashes for a user key: the key, or the namespaced key when the
    /// namespace is hashed with it. Validates the key.
    fn hashed<'k>(&self, key: &'k [u8], keybuf: &'k mut Vec<u8>) -> Result<&'k [u8]> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (_, raw) = wire_key(&self.namespace, key, binary_keys, keybuf)?;
        Ok(if self.hash_with_namespace { raw } else { key })
    }

    /// The server for a key: `Err` if there is none or it is ejected.
    pub(super) fn route(&mut self, hashed: &[u8]) -> Result<usize> {
        self.health.maybe_rejoin(&mut self.ring);
        match self.pinned.or_else(|| self.ring.pick(hashed)) {
            Some(i) if self.health.check(i).is_ok() => Ok(i),
            Some(i) => Err(self.check_up(i).expect_err("ejected")),
            None => Err(Error::NoServers),
        }
    }

    pub(super) fn check_up(&self, i: usize) -> Result<()> {
        self.health.check(i).map_err(|retry_in| Error::ServerDown {
            server: self.labels[i].clone(),
            retry_in,
        })
    }

    /// `Err(Unsupported)` unless this client's protocol can express `cap`.
    pub(super) fn require(&self, cap: Capability, operation: &'static str) -> Result<()> {
        if self.protocol.supports(cap) {
            return Ok(());
        }
        Err(Error::Unsupported {
            operation,
            protocol: self.protocol,
        })
    }

    pub(super) fn keyed<T>(
        &mut self,
        user: &[u8],
        kb: &mut Vec<u8>,
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (wire, raw) = wire_key(&self.namespace, user, binary_keys, kb)?;
        let hashed = if self.hash_with_namespace { raw } else { user };
        let i = self.route(hashed)?;
        let r = f(self, i, wire);
        self.health.record(i, &r, &mut self.ring);
        r
    }

    /// [`Client::instance`].
    fn instance(&mut self, i: usize) -> Result<ServerInstance> {
        self.start(i)?; // connected (and authenticated) now, if it was not
        let conn = self.driver.connects(i);
        if let Some((at, id)) = self.instances[i] {
            if at == conn {
                return Ok(id);
            }
        }
        let (mut pid, mut time, mut uptime) = (None, None, None);
        self.call(i, &Cmd::Stats(None), None, |o, _| match o {
            Outcome::Stat(name, value) => {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                match name {
                    b"pid" => pid = v,
                    b"time" => time = v,
                    b"uptime" => uptime = v,
                    _ => {}
                }
                Ok(None)
            }
            Outcome::End | Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        })?;
        let id = ServerInstance {
            server: i,
            // memcached's `time - uptime` is its start time, constant for the process. A
            // server that reports neither is one instance as far as we can tell.
            pid: pid.unwrap_or(0),
            started: time.zip(uptime).map_or(0, |(t, u)| t.saturating_sub(u)),
        };
        self.instances[i] = Some((conn, id));
        Ok(id)
    }

    pub(super) fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.limits.max_value {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.limits.max_value,
            });
        }
        Ok(())
    }

    /// Runs one command on server `i`: connect (and authenticate) if needed, encode, send
    /// (with `value` after the command), and fold the reply units with `on` until it returns
    /// the result. See [`exchange`](Self::exchange).
    pub(super) fn call<T>(
        &mut self,
        i: usize,
        cmd: &Cmd<'_>,
        value: Option<&[u8]>,
        on: impl FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let started = self.health.observe.start();
        let span = self.health.observe.span(CallOp {
            kind: cmd.kind(),
            server: Some(i),
            servers: 1,
            protocol: self.protocol,
            keys: usize::from(cmd.key().is_some()),
            value_bytes: value.map_or(0, <[u8]>::len),
        });
        let r = span.run(|| {
            let op = self.start(i)?;
            with_wire!(self.protocol, W => self.exchange::<W, T>(i, &op, cmd, value, on))
        });
        self.health.observe.call(i, cmd.kind(), false, started);
        self.health.observe.bytes(i, self.driver.bytes(i));
        r
    }

    /// Encodes `cmd` for server `i` (already started), sends it and folds each reply unit
    /// with `on`: `Some(result)` ends the exchange, `None` asks for more, and `Err` (a reply
    /// that cannot answer this command) drops the connection. An error reply ends it with
    /// the matching error; after a `SERVER_ERROR`, a status the server closes after, or an
    /// error answering a command with a data block, the connection is closed.
    pub(super) fn exchange<W: Wire, T>(
        &mut self,
        i: usize,
        op: &Op,
        cmd: &Cmd<'_>,
        value: Option<&[u8]>,
        on: impl FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let opaque = self.next_opaque();
        let mut strays = Strays::on(&mut self.driver, i);
        let w = self.driver.wbuf(i);
        if strays.owed {
            // Quiet commands went out before without a sync: a sync of our own goes first,
            // and whatever they answered is read up to its reply, never as ours.
            W::encode(w, &Cmd::Sync, 0, false);
        }
        W::encode(w, cmd, opaque, false);
        let separate = match value {
            // Large values go out straight from the caller's slice, without a copy.
            Some(v) if v.len() > COPY_VALUE_MAX => Some((v, W::TRAILER)),
            Some(v) => {
                w.extend_from_slice(v);
                w.extend_from_slice(W::TRAILER);
                None
            }
            None => None,
        };
        let mut reader = SingleReader {
            expect: Expect::single(cmd.kind(), opaque),
            limits: self.limits,
            label: &self.labels[i],
            data_block: value.is_some(),
            on,
            out: None,
            refused: None,
        };
        self.driver.exchange(i, op, separate, Until::Done, |buf| {
            if strays.pending {
                return strays.read::<W>(buf, &reader.limits);
            }
            reader.read::<W>(buf)
        })?;
        strays.settle(&mut self.driver, &mut self.health, i);
        if let Some((error, close)) = reader.refused {
            if close {
                self.driver.disconnect(i);
            }
            return Err(error);
        }
        Ok(reader
            .out
            .expect("exchange returns Ok only after the last reply"))
    }

    /// The next opaque: unique on every connection of this client among the requests that
    /// may still be answered (31 bits: binary's sync uses `u32::MAX`).
    pub(super) fn next_opaque(&mut self) -> u32 {
        self.opaque = self.opaque.wrapping_add(1) & OPAQUE_MASK;
        self.opaque
    }

    /// `n` consecutive opaques for a batch's items: the first is returned, item `j` has
    /// `first + j`.
    pub(super) fn reserve_opaques(&mut self, n: usize) -> u32 {
        let n = u32::try_from(n).unwrap_or(OPAQUE_MASK).min(OPAQUE_MASK / 2);
        if self.opaque > OPAQUE_MASK - n {
            self.opaque = 0;
        }
        let first = self.opaque + 1;
        self.opaque += n;
        first
    }

    /// Runs `cmd` on every server in turn (skipping ejected ones, which count as failed),
    /// folding replies with `on` and recording health. Returns each server's result.
    pub(super) fn each_server<T>(
        &mut self,
        cmd: &Cmd<'_>,
        mut on: impl FnMut(Outcome<'_>) -> Result<Option<T>, ParseError>,
    ) -> Vec<(usize, Result<T>)> {
        self.health.maybe_rejoin(&mut self.ring);
        (0..self.labels.len())
            .map(|i| (i, self.on_server(i, cmd, &mut on)))
            .collect()
    }

    /// Runs `cmd` on server `i` unless it is ejected, and records the outcome in its health.
    pub(super) fn on_server<T>(
        &mut self,
        i: usize,
        cmd: &Cmd<'_>,
        on: &mut impl FnMut(Outcome<'_>) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let r = self
            .check_up(i)
            .and_then(|()| self.call(i, cmd, None, |o, _| on(o)));
        if !matches!(r, Err(Error::ServerDown { .. })) {
            self.health.record(i, &r, &mut self.ring);
        }
        r
    }

    /// Combines per-server results: all values if every server succeeded, otherwise the one
    /// error, or [`Error::Partial`] listing each failed server.
    pub(super) fn all_or_errors<T>(
        &self,
        results: Vec<(usize, Result<T>)>,
    ) -> Result<Vec<(usize, T)>> {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in results {
            match r {
                Ok(t) => ok.push((i, t)),
                Err(e) => failed.push((self.labels[i].clone(), e)),
            }
        }
        combine(failed).map(|()| ok)
    }

    /// Runs a command with an `OK` reply on every server.
    pub(super) fn on_all_ok(&mut self, cmd: &Cmd<'_>) -> Result<()> {
        let results = self.each_server(cmd, |o| match o {
            Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        self.all_or_errors(results).map(drop)
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

/// The result of work spread over servers: `Ok` if none failed, else the one failed server's
/// error, or [`Error::Partial`] listing each.
fn combine(mut failed: Vec<(String, Error)>) -> Result<()> {
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.pop().expect("one").1),
        _ => Err(Error::Partial { failed }),
    }
}
