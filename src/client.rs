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

mod binary_proto;
mod builder;
mod health;
mod meta_proto;
mod multi;
mod pipeline;
mod pool;

pub use builder::{ClientBuilder, Protocol};
pub use health::ServerCounters;
pub use meta_proto::{
    Lease, MetaGetOptions, MetaItemInfo, MetaSetOptions, MetaSetResult, SetOutcome,
};
pub use pipeline::{Pipeline, PipelineReport};
pub use pool::{Pool, PooledClient};

use crate::conn::driver::{Driver, Op, Until, COPY_VALUE_MAX};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::binary::{self, Opcode};
use crate::proto::meta::{self, MAX_BINARY_KEY_LEN};
use crate::proto::text::{self, Response, Retrieval, Storage, DATA_TRAILER};
use crate::proto::{Key, KeyError, Limits, ParseError, Status, MAX_KEY_LEN};
use crate::ring::Continuum;
use health::Health;

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

impl SetOptions {
    /// Sets the expiration (see the field).
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the flags.
    pub fn flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }
}

/// The storage commands, for [`Client::store`] and the noreply/pipelined forms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreMode {
    /// Store unconditionally.
    #[default]
    Set,
    /// Store only if absent.
    Add,
    /// Store only if present.
    Replace,
    /// Append to the existing value (ttl and flags are ignored by the server).
    Append,
    /// Prepend to the existing value (ttl and flags are ignored by the server).
    Prepend,
}

impl StoreMode {
    fn wire(self) -> Storage {
        match self {
            StoreMode::Set => Storage::Set,
            StoreMode::Add => Storage::Add,
            StoreMode::Replace => Storage::Replace,
            StoreMode::Append => Storage::Append,
            StoreMode::Prepend => Storage::Prepend,
        }
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
    driver: Driver,
    limits: Limits,
    ring: Continuum,
    /// Shared, so a multi-key call can hold them while it runs without copying the strings.
    labels: std::sync::Arc<[String]>,
    health: Health,
    namespace: Vec<u8>,
    hash_with_namespace: bool,
    /// Scratch space for a namespaced key, reused.
    keybuf: Vec<u8>,
    protocol: Protocol,
    sasl: Option<(String, String)>,
    /// Per server: the connection count at which SASL last succeeded.
    authenticated: Vec<u64>,
    /// Next binary opaque.
    opaque: u32,
    /// The vectors of the last multi-key call, reused by the next.
    spare: multi::Spare,
}

/// What a reply closure decided about one reply unit.
enum Step<T> {
    More,
    Done(T),
}

/// A line-based protocol (text or meta): its reply parser and its error lines.
trait Lines {
    type Reply<'a>;
    fn parse<'a>(
        buf: &'a [u8],
        limits: &Limits,
    ) -> Result<Status<(usize, Self::Reply<'a>)>, ParseError>;
    /// The error an error line stands for, and whether it is a `SERVER_ERROR`.
    fn error(reply: &Self::Reply<'_>) -> Option<(Error, bool)>;
}

struct TextLines;

impl Lines for TextLines {
    type Reply<'a> = Response<'a>;
    fn parse<'a>(
        buf: &'a [u8],
        limits: &Limits,
    ) -> Result<Status<(usize, Response<'a>)>, ParseError> {
        text::parse_reply(buf, limits)
    }
    fn error(r: &Response<'_>) -> Option<(Error, bool)> {
        server_error(r).map(|e| (e, matches!(r, Response::ServerError(_))))
    }
}

fn server_error(resp: &Response<'_>) -> Option<Error> {
    let (kind, msg) = match *resp {
        Response::Error(m) => (ServerErrorKind::UnknownCommand, m),
        Response::ClientError(m) => (ServerErrorKind::Client, m),
        Response::ServerError(m) => (ServerErrorKind::Server, m),
        _ => return None,
    };
    Some(Error::Server {
        kind,
        message: String::from_utf8_lossy(msg).into_owned(),
    })
}

/// The wire form of a user key: `namespace + key`, validated for the protocol, and the raw
/// namespaced bytes (what is hashed with `hash_with_namespace`). Over meta, a key that is not
/// a valid text key is sent base64-encoded with the `b` flag (notes §6), so it may hold any
/// bytes, up to 186 of them with the namespace.
fn wire_key<'b>(
    namespace: &[u8],
    user: &'b [u8],
    meta: bool,
    buf: &'b mut Vec<u8>,
) -> Result<(Key<'b>, &'b [u8])> {
    // One validation of the user key: the namespace was validated when the client was built,
    // so only the combined length is left to check.
    let binary = match Key::new(user) {
        Ok(k) if namespace.is_empty() => return Ok((k, user)),
        Ok(_) => false,
        Err(KeyError::BadByte { .. }) if meta => true,
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
    // Over meta, a key with whitespace or control bytes goes base64 with the `b` flag.
    let raw_len = buf.len();
    let mut tmp = [0u8; MAX_BINARY_KEY_LEN];
    tmp[..raw_len].copy_from_slice(buf);
    meta::encode_base64(buf, &tmp[..raw_len]);
    let (raw, token) = buf.split_at(raw_len);
    Ok((Key::base64_token(token), raw))
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The servers, as configured, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.labels
    }

    /// The wire protocol this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The key distribution in use.
    pub fn continuum(&self) -> &Continuum {
        &self.ring
    }

    /// Each server's counters, in configuration order.
    pub fn server_counters(&self) -> Vec<(String, ServerCounters)> {
        (0..self.labels.len())
            .map(|i| {
                let mut c = self.health.counters(i);
                c.reconnects = self.driver.connects(i).saturating_sub(1);
                (self.labels[i].clone(), c)
            })
            .collect()
    }

    /// The server `key` goes to right now (after ejections), as configured; the namespace
    /// is taken into account as the client hashes it.
    pub fn server_for_key(&mut self, key: &[u8]) -> Result<&str> {
        let mut kb = std::mem::take(&mut self.keybuf);
        let meta = self.protocol == Protocol::Meta;
        let r = wire_key(&self.namespace, key, meta, &mut kb).and_then(|(_, raw)| {
            let hashed = if self.hash_with_namespace { raw } else { key };
            self.route(hashed)
        });
        self.keybuf = kb;
        Ok(&self.labels[r?])
    }

    /// The server for a key: `Err` if there is none or it is ejected.
    fn route(&mut self, hashed: &[u8]) -> Result<usize> {
        self.health.maybe_rejoin(&mut self.ring);
        match self.ring.pick(hashed) {
            Some(i) if self.health.check(i).is_ok() => Ok(i),
            Some(i) => Err(self.check_up(i).expect_err("ejected")),
            None => Err(Error::NoServers),
        }
    }

    fn check_up(&self, i: usize) -> Result<()> {
        self.health.check(i).map_err(|retry_in| Error::ServerDown {
            server: self.labels[i].clone(),
            retry_in,
        })
    }

    /// Validates `key`, builds its wire form (with the namespace), routes it, runs `f` on the
    /// chosen server and records the outcome in that server's health.
    fn keyed<T>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&mut Self, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut kb = std::mem::take(&mut self.keybuf);
        let r = self.keyed_in(key, &mut kb, f);
        self.keybuf = kb;
        r
    }

    fn keyed_in<T>(
        &mut self,
        user: &[u8],
        kb: &mut Vec<u8>,
        f: impl FnOnce(&mut Self, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        let meta = self.protocol == Protocol::Meta;
        let (wire, raw) = wire_key(&self.namespace, user, meta, kb)?;
        let hashed = if self.hash_with_namespace { raw } else { user };
        let i = self.route(hashed)?;
        let r = f(self, i, wire);
        self.health.record(i, &r, &mut self.ring);
        r
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.limits.max_value {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.limits.max_value,
            });
        }
        Ok(())
    }

    /// Sends the request already encoded in server `i`'s write buffer (plus `value`) and feeds
    /// each text reply unit to `on` until it returns `Done` (see [`exchange_lines`]).
    ///
    /// [`exchange_lines`]: Self::exchange_lines
    fn exchange<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        has_data: bool,
        on: impl FnMut(Response<'_>) -> Step<T>,
    ) -> Result<T> {
        self.exchange_lines::<TextLines, T>(i, op, value, has_data, on)
    }

    /// Sends the request already encoded in server `i`'s write buffer (plus `value` and the
    /// data trailer) and feeds each reply unit of protocol `L` to `on` until it returns `Done`.
    /// `has_data` marks commands with a data block: an error line answering one of those
    /// closes the connection, as does any `SERVER_ERROR` (the server may close after one;
    /// protocol.txt, "Error strings").
    fn exchange_lines<L: Lines, T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        has_data: bool,
        mut on: impl FnMut(L::Reply<'_>) -> Step<T>,
    ) -> Result<T> {
        let limits = self.limits;
        let mut out = None;
        let mut failed = None;
        self.driver.exchange(
            i,
            op,
            value.map(|v| (v, DATA_TRAILER)),
            Until::Done,
            |buf| {
                let (n, resp) = match L::parse(buf, &limits)? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                };
                if let Some((e, server_side)) = L::error(&resp) {
                    failed = Some((e, has_data || server_side));
                    return Ok(Status::Complete((n, true)));
                }
                match on(resp) {
                    Step::More => Ok(Status::Complete((n, false))),
                    Step::Done(t) => {
                        out = Some(t);
                        Ok(Status::Complete((n, true)))
                    }
                }
            },
        )?;
        if let Some((e, close)) = failed {
            if close {
                self.driver.disconnect(i);
            }
            return Err(e);
        }
        Ok(out.expect("exchange returns Ok only after the last reply"))
    }

    fn unexpected(&mut self, i: usize) -> Error {
        self.driver.disconnect(i);
        Error::Parse {
            server: self.labels[i].clone(),
            error: ParseError::Unexpected,
        }
    }

    /// Runs a command with a one-line reply, mapping it with `map` (`None` = unexpected reply).
    fn simple<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        map: impl Fn(&Response<'_>) -> Option<T>,
    ) -> Result<T> {
        let r = self.exchange(i, op, value, value.is_some(), |resp| Step::Done(map(&resp)))?;
        r.ok_or_else(|| self.unexpected(i))
    }

    /// Reads one item with `get`, `gets`, `gat` or `gats`, handing its value to `sink`.
    fn retrieve(
        &mut self,
        cmd: Retrieval,
        key: &[u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<Option<ItemInfo>> {
        self.keyed(key, |c, i, key| {
            // Binary and meta say "with CAS" and "touch" as separate options.
            let (with_cas, touch) = match cmd {
                Retrieval::Get => (false, None),
                Retrieval::Gets => (true, None),
                Retrieval::Gat(t) => (false, Some(t)),
                Retrieval::Gats(t) => (true, Some(t)),
            };
            let found = if c.protocol == Protocol::Binary {
                c.bin_retrieve(i, with_cas, touch, key, &mut sink)?
            } else if c.protocol == Protocol::Meta {
                c.meta_retrieve(i, with_cas, touch, key, &mut sink)?
            } else {
                c.text_retrieve(i, cmd, key, &mut sink)?
            };
            let counters = c.health.counters_mut(i);
            if found.is_some() {
                counters.hits += 1;
            } else {
                counters.misses += 1;
            }
            Ok(found)
        })
    }

    fn text_retrieve(
        &mut self,
        i: usize,
        cmd: Retrieval,
        key: Key<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<ItemInfo>> {
        let op = self.start(i)?;
        text::encode_retrieval(self.driver.wbuf(i), cmd, key);
        let mut found = None;
        let ok = self.exchange(i, &op, None, false, |resp| match resp {
            Response::Value {
                key: k,
                flags,
                cas,
                data,
            } if k == key.as_bytes() && found.is_none() => {
                sink(data);
                found = Some(ItemInfo { flags, cas });
                Step::More
            }
            Response::End => Step::Done(true),
            _ => Step::Done(false),
        })?;
        if !ok {
            return Err(self.unexpected(i));
        }
        Ok(found)
    }

    /// Gets a value, copying it into a new `Vec`. `None` on a miss.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Item>> {
        self.get_item(Retrieval::Get, key)
    }

    /// Gets a value with its CAS unique (for [`cas`](Self::cas)).
    pub fn gets(&mut self, key: &[u8]) -> Result<Option<Item>> {
        self.get_item(Retrieval::Gets, key)
    }

    /// Gets a value and sets its expiration to `ttl` (get-and-touch).
    pub fn gat(&mut self, key: &[u8], ttl: u32) -> Result<Option<Item>> {
        self.get_item(Retrieval::Gat(ttl), key)
    }

    /// Like [`gat`](Self::gat), and returns the CAS unique.
    pub fn gats(&mut self, key: &[u8], ttl: u32) -> Result<Option<Item>> {
        self.get_item(Retrieval::Gats(ttl), key)
    }

    fn get_item(&mut self, cmd: Retrieval, key: &[u8]) -> Result<Option<Item>> {
        let mut value = Vec::new();
        let info = self.retrieve(cmd, key, |d| value.extend_from_slice(d))?;
        Ok(info.map(|ItemInfo { flags, cas }| Item { value, flags, cas }))
    }

    /// Gets a value into `buf` (cleared first), the hot path: once `buf` and the client's
    /// buffers have grown to fit, this allocates nothing. `None` on a miss (then `buf` is empty).
    pub fn get_into(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        self.retrieve(Retrieval::Get, key, |d| buf.extend_from_slice(d))
    }

    /// Like [`get_into`](Self::get_into), with the CAS unique.
    pub fn gets_into(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        buf.clear();
        self.retrieve(Retrieval::Gets, key, |d| buf.extend_from_slice(d))
    }

    /// Runs a storage command and returns the server's verdict.
    fn store_raw(
        &mut self,
        cmd: Storage,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<Response<'static>> {
        self.check_value(value)?;
        self.keyed(key, |c, i, key| {
            if c.protocol == Protocol::Meta {
                let (mode, cas) = match cmd {
                    Storage::Set => (StoreMode::Set, None),
                    Storage::Add => (StoreMode::Add, None),
                    Storage::Replace => (StoreMode::Replace, None),
                    Storage::Append => (StoreMode::Append, None),
                    Storage::Prepend => (StoreMode::Prepend, None),
                    Storage::Cas(u) => (StoreMode::Set, Some(u)),
                };
                let outcome = c.meta_store(i, mode, cas, key, value, opts)?;
                return Ok(outcome.response(cmd));
            }
            if c.protocol == Protocol::Binary {
                let (code, unique) = match cmd {
                    Storage::Set => (Opcode::SET, 0),
                    Storage::Add => (Opcode::ADD, 0),
                    Storage::Replace => (Opcode::REPLACE, 0),
                    Storage::Append => (Opcode::APPEND, 0),
                    Storage::Prepend => (Opcode::PREPEND, 0),
                    Storage::Cas(u) => (Opcode::SET, u),
                };
                return Ok(c
                    .bin_store(i, code, key, value, opts, unique)?
                    .response(cmd));
            }
            let op = c.start(i)?;
            let wbuf = c.driver.wbuf(i);
            text::encode_storage(wbuf, cmd, key, opts.flags, opts.ttl, value.len(), false);
            let separate = if value.len() <= COPY_VALUE_MAX {
                wbuf.extend_from_slice(value);
                wbuf.extend_from_slice(DATA_TRAILER);
                None
            } else {
                Some(value)
            };
            let r = c.exchange(i, &op, separate, true, |resp| {
                Step::Done(match resp {
                    Response::Stored => Some(Response::Stored),
                    Response::NotStored => Some(Response::NotStored),
                    Response::Exists => Some(Response::Exists),
                    Response::NotFound => Some(Response::NotFound),
                    _ => None,
                })
            })?;
            match (cmd, r) {
                (Storage::Cas(_), Some(r)) => Ok(r),
                (_, Some(r @ (Response::Stored | Response::NotStored))) => Ok(r),
                _ => Err(c.unexpected(i)),
            }
        })
    }

    /// Runs `set`, `add`, `replace`, `append` or `prepend`. `Ok(true)` if stored, `Ok(false)`
    /// if the command's condition was not met (`NOT_STORED`).
    pub fn store(
        &mut self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<bool> {
        Ok(self.store_raw(mode.wire(), key, value, opts)? == Response::Stored)
    }

    /// Stores a value unconditionally.
    pub fn set(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        if self.store(StoreMode::Set, key, value, opts)? {
            Ok(())
        } else {
            Err(Error::Server {
                kind: ServerErrorKind::Server,
                message: "set answered NOT_STORED".into(),
            })
        }
    }

    /// Stores only if the key is absent; `false` if it exists.
    pub fn add(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool> {
        self.store(StoreMode::Add, key, value, opts)
    }

    /// Stores only if the key exists; `false` if it does not.
    pub fn replace(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool> {
        self.store(StoreMode::Replace, key, value, opts)
    }

    /// Appends to an existing value; `false` if the key does not exist.
    pub fn append(&mut self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.store(StoreMode::Append, key, value, SetOptions::default())
    }

    /// Prepends to an existing value; `false` if the key does not exist.
    pub fn prepend(&mut self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.store(StoreMode::Prepend, key, value, SetOptions::default())
    }

    /// Stores only if the item's CAS unique is still `cas` (from [`gets`](Self::gets)).
    pub fn cas(
        &mut self,
        key: &[u8],
        value: &[u8],
        cas: u64,
        opts: SetOptions,
    ) -> Result<CasResult> {
        Ok(match self.store_raw(Storage::Cas(cas), key, value, opts)? {
            Response::Stored => CasResult::Stored,
            Response::Exists => CasResult::Exists,
            _ => CasResult::NotFound,
        })
    }

    /// Deletes a key; `false` if it did not exist.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool> {
        self.keyed(key, |c, i, key| {
            if c.protocol == Protocol::Binary {
                return c.bin_keyed_bool(i, Opcode::DELETE, key, None);
            }
            if c.protocol == Protocol::Meta {
                return c.meta_delete(i, key, &Default::default());
            }
            let op = c.start(i)?;
            text::encode_delete(c.driver.wbuf(i), key, false);
            c.simple(i, &op, None, |r| match r {
                Response::Deleted => Some(true),
                Response::NotFound => Some(false),
                _ => None,
            })
        })
    }

    fn arith(&mut self, decr: bool, key: &[u8], delta: u64) -> Result<Option<u64>> {
        self.keyed(key, |c, i, key| {
            if c.protocol == Protocol::Binary {
                return c.bin_arith(i, decr, key, delta);
            }
            if c.protocol == Protocol::Meta {
                return c.meta_arith(i, decr, key, delta);
            }
            let op = c.start(i)?;
            text::encode_arith(c.driver.wbuf(i), decr, key, delta, false);
            c.simple(i, &op, None, |r| match *r {
                Response::Number(n) => Some(Some(n)),
                Response::NotFound => Some(None),
                _ => None,
            })
        })
    }

    /// Adds `delta` to a decimal value, wrapping at 2^64 as memcached does. `None` if the key
    /// does not exist; a `CLIENT_ERROR` server error if the value is not a number.
    pub fn incr(&mut self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        self.arith(false, key, delta)
    }

    /// Subtracts `delta` from a decimal value, stopping at 0 as memcached does.
    pub fn decr(&mut self, key: &[u8], delta: u64) -> Result<Option<u64>> {
        self.arith(true, key, delta)
    }

    /// Sets a new expiration on an item; `false` if it does not exist.
    pub fn touch(&mut self, key: &[u8], ttl: u32) -> Result<bool> {
        self.keyed(key, |c, i, key| {
            if c.protocol == Protocol::Binary {
                return c.bin_keyed_bool(i, Opcode::TOUCH, key, Some(ttl));
            }
            if c.protocol == Protocol::Meta {
                return c.meta_touch(i, key, ttl);
            }
            let op = c.start(i)?;
            text::encode_touch(c.driver.wbuf(i), key, ttl, false);
            c.simple(i, &op, None, |r| match r {
                Response::Touched => Some(true),
                Response::NotFound => Some(false),
                _ => None,
            })
        })
    }

    /// Runs `f` on every server in turn (skipping ejected ones, which count as failed),
    /// recording health. Returns each server's result.
    fn each_server<T>(
        &mut self,
        mut f: impl FnMut(&mut Self, usize) -> Result<T>,
    ) -> Vec<(usize, Result<T>)> {
        self.health.maybe_rejoin(&mut self.ring);
        (0..self.labels.len())
            .map(|i| {
                let r = self.check_up(i).and_then(|()| f(self, i));
                if !matches!(r, Err(Error::ServerDown { .. })) {
                    self.health.record(i, &r, &mut self.ring);
                }
                (i, r)
            })
            .collect()
    }

    /// Combines per-server results: all values if every server succeeded, otherwise the one
    /// error, or [`Error::Partial`] listing each failed server.
    fn all_or_errors<T>(&self, results: Vec<(usize, Result<T>)>) -> Result<Vec<(usize, T)>> {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in results {
            match r {
                Ok(t) => ok.push((i, t)),
                Err(e) => failed.push((self.labels[i].clone(), e)),
            }
        }
        match failed.len() {
            0 => Ok(ok),
            1 => Err(failed.pop().expect("one").1),
            _ => Err(Error::Partial { failed }),
        }
    }

    /// Runs a command with an `OK` reply on every server.
    fn on_all_ok(&mut self, encode: impl Fn(&mut Vec<u8>)) -> Result<()> {
        let results = self.each_server(|c, i| {
            let op = c.start(i)?;
            encode(c.driver.wbuf(i));
            c.simple(i, &op, None, |r| matches!(r, Response::Ok).then_some(()))
        });
        self.all_or_errors(results).map(drop)
    }

    /// Invalidates every item on every server, now or after `delay` seconds.
    pub fn flush_all(&mut self, delay: Option<u32>) -> Result<()> {
        if self.protocol == Protocol::Binary {
            let results = self.each_server(|c, i| c.bin_flush(i, delay));
            return self.all_or_errors(results).map(drop);
        }
        self.on_all_ok(|w| text::encode_flush_all(w, delay, false))
    }

    /// Sets every server's logging verbosity. Text protocol only: memcached does not implement
    /// the binary Verbosity command, and sending it desynchronises the connection.
    pub fn verbosity(&mut self, level: u32) -> Result<()> {
        if self.protocol == Protocol::Binary {
            return Err(Error::Config(
                "verbosity is not available over the binary protocol (memcached does not \
                 implement it)"
                    .into(),
            ));
        }
        self.on_all_ok(|w| text::encode_verbosity(w, level, false))
    }

    /// Each server's version string: `(server, version)`.
    pub fn version(&mut self) -> Result<Vec<(String, String)>> {
        let results = self.each_server(|c, i| {
            if c.protocol == Protocol::Binary {
                return c.bin_version(i);
            }
            let op = c.start(i)?;
            text::encode_version(c.driver.wbuf(i));
            c.simple(i, &op, None, |r| match r {
                Response::Version(v) => Some(String::from_utf8_lossy(v).into_owned()),
                _ => None,
            })
        });
        Ok(self
            .all_or_errors(results)?
            .into_iter()
            .map(|(i, v)| (self.labels[i].clone(), v))
            .collect())
    }

    /// Each server's statistics: `stats` with no argument, or `stats <arg>` (`items`, `slabs`,
    /// `settings`, `sizes`, `conns`, `detail dump`, `cachedump <id> <n>`, ...). Arguments that
    /// answer with a single status line (`reset`, `detail on`) give an empty list. A server
    /// that fails has its [`ServerStats::error`] set; the call fails only if all of them do.
    pub fn stats(&mut self, arg: Option<&str>) -> Result<Vec<ServerStats>> {
        if let Some(a) = arg {
            if !text::valid_stats_arg(a.as_bytes()) {
                return Err(Error::Config(format!("invalid stats argument {a:?}")));
            }
        }
        let results = self.each_server(|c, i| {
            if c.protocol == Protocol::Binary {
                return c.bin_stats(i, arg);
            }
            let op = c.start(i)?;
            text::encode_stats(c.driver.wbuf(i), arg.map(str::as_bytes));
            let mut stats = Vec::new();
            let ok = c.exchange(i, &op, None, false, |resp| match resp {
                Response::Stat { name, value } => {
                    stats.push((
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                    Step::More
                }
                Response::End | Response::Reset | Response::Ok => Step::Done(true),
                _ => Step::Done(false),
            })?;
            if !ok {
                return Err(c.unexpected(i));
            }
            Ok(stats)
        });
        if results.iter().all(|(_, r)| r.is_err()) {
            return self.all_or_errors(results).map(|_| Vec::new());
        }
        Ok(results
            .into_iter()
            .map(|(i, r)| {
                let server = self.labels[i].clone();
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
    pub fn quit(&mut self) -> Result<()> {
        let mut first_error = None;
        for i in 0..self.labels.len() {
            if !self.driver.is_connected(i) {
                continue;
            }
            let binary = self.protocol == Protocol::Binary;
            let sent = self.driver.begin(i).and_then(|op| {
                if binary {
                    binary::encode_simple(self.driver.wbuf(i), Opcode::QUITQ, None, &[], 0, 0);
                } else {
                    text::encode_quit(self.driver.wbuf(i));
                }
                self.driver
                    .exchange(i, &op, None, Until::Written, |_| Ok(Status::Partial))
            });
            self.driver.disconnect(i);
            if let Err(e) = sent {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs a storage command with `noreply`: returns once the request is written. The server
    /// sends nothing back on success; an error it does send is seen by the next call on this
    /// connection (which then reconnects). Use a [`Pipeline`] to learn about errors.
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

    /// `delete` with `noreply` (see [`store_noreply`](Self::store_noreply)).
    pub fn delete_noreply(&mut self, key: &[u8]) -> Result<()> {
        let mut p = self.pipeline();
        p.delete(key)?;
        p.send()
    }
}
