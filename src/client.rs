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

use std::time::Duration;

use crate::conn::driver::{Driver, DriverConfig, Op, Until, COPY_VALUE_MAX};
use crate::conn::ServerAddr;
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::text::{self, Response, Retrieval, Storage, DATA_TRAILER, MAX_LINE};
use crate::proto::{Key, Limits, ParseError, Status};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Store unconditionally.
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
    /// `(name, value)` pairs.
    pub stats: Vec<(String, String)>,
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

/// Builds a [`Client`].
///
/// ```
/// use std::time::Duration;
/// use mcstore::Client;
/// let client = Client::builder()
///     .server("127.0.0.1:11211")
///     .connect_timeout(Duration::from_millis(200))
///     .io_timeout(Duration::from_millis(100))
///     .max_value_size(4 << 20)
///     .build()
///     .unwrap(); // connects lazily, on the first call
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    servers: Vec<String>,
    connect_timeout: Duration,
    io_timeout: Duration,
    max_value_size: usize,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            servers: Vec::new(),
            connect_timeout: Duration::from_millis(1000),
            io_timeout: Duration::from_millis(1000),
            max_value_size: 1024 * 1024,
        }
    }
}

impl ClientBuilder {
    /// Adds a server: `host:port`, `host` (port 11211), `[v6]:port`, or a Unix socket path
    /// (`/path` or `unix:/path`).
    pub fn server(mut self, addr: impl Into<String>) -> Self {
        self.servers.push(addr.into());
        self
    }

    /// Adds several servers (see [`server`](Self::server)).
    pub fn servers<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// How long opening a connection may take (default 1 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long one call may wait for the network once connected (default 1 s). A call that
    /// runs out fails with [`Error::Timeout`], never with a silent miss.
    pub fn io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    /// The largest value the client will send or accept (default 1 MiB, memcached's default
    /// item size). A reply claiming more is rejected before anything is buffered.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Validates the configuration and builds the client. Nothing is connected yet.
    pub fn build(self) -> Result<Client> {
        let servers = self
            .servers
            .iter()
            .map(|s| s.parse::<ServerAddr>())
            .collect::<Result<Vec<_>>>()?;
        match servers.len() {
            0 => return Err(Error::NoServers),
            1 => {}
            n => {
                return Err(Error::Config(format!(
                    "{n} servers given: key distribution over several servers is not \
                     implemented yet; configure one server"
                )))
            }
        }
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return Err(Error::Config("timeouts must be above zero".into()));
        }
        let max_value = self.max_value_size.min(isize::MAX as usize / 2);
        let driver = Driver::new(
            &servers,
            DriverConfig {
                connect_timeout: self.connect_timeout,
                io_timeout: self.io_timeout,
                max_unit: max_value + MAX_LINE + 4,
            },
        )?;
        Ok(Client {
            driver,
            limits: Limits { max_value },
        })
    }
}

/// A memcached client (text protocol).
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
}

/// What a reply closure decided about one reply unit.
enum Step<T> {
    More,
    Done(T),
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

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The server a key goes to. One server for now; the list shape leaves room for more.
    fn pick(&self, _key: Key<'_>) -> usize {
        0
    }

    fn servers(&self) -> std::ops::Range<usize> {
        0..1
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
    /// each reply unit to `on` until it returns `Done`. `has_data` marks commands with a data
    /// block: an error line answering one of those closes the connection.
    fn exchange<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        has_data: bool,
        mut on: impl FnMut(Response<'_>) -> Step<T>,
    ) -> Result<T> {
        let limits = self.limits;
        let mut out = None;
        let mut failed = None;
        let result = self.driver.exchange(
            i,
            op,
            value.map(|v| (v, DATA_TRAILER)),
            Until::Done,
            |buf| {
                let (n, resp) = match text::parse_reply(buf, &limits)? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                };
                if let Some(e) = server_error(&resp) {
                    failed = Some((e, has_data || matches!(resp, Response::ServerError(_))));
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
        );
        result?;
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
            server: self.driver.label(i).to_owned(),
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
        let key = Key::new(key)?;
        let i = self.pick(key);
        let op = self.driver.begin(i)?;
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

    /// Gets many keys in one pipelined request, calling `found(key, item)` for each hit as it
    /// arrives (borrowing from the read buffer: no copy, no allocation per item). Misses are
    /// simply not reported. All keys are validated before anything is sent.
    ///
    /// Keys are sent in `get` lines of at most 100 keys each, all written before any reply is
    /// read (memcached caps the length of a command line).
    pub fn get_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(Retrieval::Get, keys, found)
    }

    /// [`get_multi`](Self::get_multi) with CAS uniques.
    pub fn gets_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(Retrieval::Gets, keys, found)
    }

    fn retrieve_multi<K: AsRef<[u8]>>(
        &mut self,
        cmd: Retrieval,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        const KEYS_PER_LINE: usize = 100;
        for k in keys {
            Key::new(k.as_ref())?;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let i = 0;
        let op = self.driver.begin(i)?;
        let wbuf = self.driver.wbuf(i);
        for chunk in keys.chunks(KEYS_PER_LINE) {
            text::begin_retrieval(wbuf, cmd);
            for k in chunk {
                text::push_key(wbuf, Key::new(k.as_ref())?);
            }
            text::finish_line(wbuf);
        }
        let lines = keys.len().div_ceil(KEYS_PER_LINE);
        let mut ends = 0;
        // Replies come in request order: each returned key must be a later requested key.
        let mut next = 0;
        let ok = self.exchange(i, &op, None, false, |resp| match resp {
            Response::Value {
                key,
                flags,
                cas,
                data,
            } => {
                match keys[next..].iter().position(|k| k.as_ref() == key) {
                    Some(p) => next += p + 1,
                    None => return Step::Done(false),
                }
                found(
                    key,
                    ItemRef {
                        value: data,
                        flags,
                        cas,
                    },
                );
                Step::More
            }
            Response::End => {
                ends += 1;
                next = (ends * KEYS_PER_LINE).min(keys.len());
                if ends == lines {
                    Step::Done(true)
                } else {
                    Step::More
                }
            }
            _ => Step::Done(false),
        })?;
        if !ok {
            return Err(self.unexpected(i));
        }
        Ok(())
    }

    /// Runs a storage command and returns the server's verdict.
    fn store_raw(
        &mut self,
        cmd: Storage,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<Response<'static>> {
        let key = Key::new(key)?;
        self.check_value(value)?;
        let i = self.pick(key);
        let op = self.driver.begin(i)?;
        let wbuf = self.driver.wbuf(i);
        text::encode_storage(wbuf, cmd, key, opts.flags, opts.ttl, value.len(), false);
        let separate = if value.len() <= COPY_VALUE_MAX {
            wbuf.extend_from_slice(value);
            wbuf.extend_from_slice(DATA_TRAILER);
            None
        } else {
            Some(value)
        };
        let r = self.exchange(i, &op, separate, true, |resp| {
            Step::Done(match resp {
                Response::Stored => Some(Response::Stored),
                Response::NotStored => Some(Response::NotStored),
                Response::Exists => Some(Response::Exists),
                Response::NotFound => Some(Response::NotFound),
                _ => None,
            })
        })?;
        r.ok_or_else(|| self.unexpected(i))
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
        match self.store_raw(mode.wire(), key, value, opts)? {
            Response::Stored => Ok(true),
            Response::NotStored => Ok(false),
            _ => Err(self.unexpected(0)),
        }
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
        match self.store_raw(Storage::Cas(cas), key, value, opts)? {
            Response::Stored => Ok(CasResult::Stored),
            Response::Exists => Ok(CasResult::Exists),
            Response::NotFound => Ok(CasResult::NotFound),
            _ => Err(self.unexpected(0)),
        }
    }

    /// Deletes a key; `false` if it did not exist.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool> {
        let key = Key::new(key)?;
        let i = self.pick(key);
        let op = self.driver.begin(i)?;
        text::encode_delete(self.driver.wbuf(i), key, false);
        self.simple(i, &op, None, |r| match r {
            Response::Deleted => Some(true),
            Response::NotFound => Some(false),
            _ => None,
        })
    }

    fn arith(&mut self, decr: bool, key: &[u8], delta: u64) -> Result<Option<u64>> {
        let key = Key::new(key)?;
        let i = self.pick(key);
        let op = self.driver.begin(i)?;
        text::encode_arith(self.driver.wbuf(i), decr, key, delta, false);
        self.simple(i, &op, None, |r| match *r {
            Response::Number(n) => Some(Some(n)),
            Response::NotFound => Some(None),
            _ => None,
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
        let key = Key::new(key)?;
        let i = self.pick(key);
        let op = self.driver.begin(i)?;
        text::encode_touch(self.driver.wbuf(i), key, ttl, false);
        self.simple(i, &op, None, |r| match r {
            Response::Touched => Some(true),
            Response::NotFound => Some(false),
            _ => None,
        })
    }

    /// Runs a command with an `OK` reply on every server.
    fn on_all_ok(&mut self, encode: impl Fn(&mut Vec<u8>)) -> Result<()> {
        for i in self.servers() {
            let op = self.driver.begin(i)?;
            encode(self.driver.wbuf(i));
            self.simple(i, &op, None, |r| matches!(r, Response::Ok).then_some(()))?;
        }
        Ok(())
    }

    /// Invalidates every item on every server, now or after `delay` seconds.
    pub fn flush_all(&mut self, delay: Option<u32>) -> Result<()> {
        self.on_all_ok(|w| text::encode_flush_all(w, delay, false))
    }

    /// Sets the servers' logging verbosity.
    pub fn verbosity(&mut self, level: u32) -> Result<()> {
        self.on_all_ok(|w| text::encode_verbosity(w, level, false))
    }

    /// Each server's version string: `(server, version)`.
    pub fn version(&mut self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for i in self.servers() {
            let op = self.driver.begin(i)?;
            text::encode_version(self.driver.wbuf(i));
            let v = self.simple(i, &op, None, |r| match r {
                Response::Version(v) => Some(String::from_utf8_lossy(v).into_owned()),
                _ => None,
            })?;
            out.push((self.driver.label(i).to_owned(), v));
        }
        Ok(out)
    }

    /// Each server's statistics: `stats` with no argument, or `stats <arg>` (`items`, `slabs`,
    /// `settings`, `sizes`, `conns`, `detail dump`, `cachedump <id> <n>`, ...). Arguments that
    /// answer with a single status line (`reset`, `detail on`) give an empty list.
    pub fn stats(&mut self, arg: Option<&str>) -> Result<Vec<ServerStats>> {
        if let Some(a) = arg {
            if !text::valid_stats_arg(a.as_bytes()) {
                return Err(Error::Config(format!("invalid stats argument {a:?}")));
            }
        }
        let mut out = Vec::new();
        for i in self.servers() {
            let op = self.driver.begin(i)?;
            text::encode_stats(self.driver.wbuf(i), arg.map(str::as_bytes));
            let mut stats = Vec::new();
            let ok = self.exchange(i, &op, None, false, |resp| match resp {
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
                return Err(self.unexpected(i));
            }
            out.push(ServerStats {
                server: self.driver.label(i).to_owned(),
                stats,
            });
        }
        Ok(out)
    }

    /// Asks each server to close the connection (`quit`) and closes it. The next call reconnects.
    pub fn quit(&mut self) -> Result<()> {
        for i in self.servers() {
            if !self.driver.is_connected(i) {
                continue;
            }
            let op = self.driver.begin(i)?;
            text::encode_quit(self.driver.wbuf(i));
            let sent = self
                .driver
                .exchange(i, &op, None, Until::Written, |_| Ok(Status::Partial));
            self.driver.disconnect(i);
            sent?;
        }
        Ok(())
    }

    /// Starts a pipeline of noreply writes: they are buffered and sent in large writes without
    /// waiting for replies, and [`Pipeline::finish`] waits once for the server to have processed
    /// them all.
    pub fn pipeline(&mut self) -> Pipeline<'_> {
        Pipeline {
            client: self,
            op: None,
            commands: 0,
            errors: 0,
            first_error: None,
        }
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

/// What a [`Pipeline`] reports when finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineReport {
    /// Commands sent.
    pub commands: usize,
    /// Error lines the server sent for them (noreply suppresses only success replies).
    pub errors: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// A batch of noreply commands, written in large chunks, with one wait at the end.
///
/// ```no_run
/// # fn main() -> mcstore::Result<()> {
/// # let mut client = mcstore::Client::builder().server("127.0.0.1:11211").build()?;
/// let mut p = client.pipeline();
/// for i in 0..10_000u32 {
///     p.set(format!("k{i}").as_bytes(), b"v", Default::default())?;
/// }
/// let report = p.finish()?;          // one round trip
/// assert_eq!(report.errors, 0);
/// # Ok(()) }
/// ```
pub struct Pipeline<'c> {
    client: &'c mut Client,
    op: Option<Op>,
    commands: usize,
    errors: usize,
    first_error: Option<String>,
}

/// Flush the pipeline's buffer once it holds this much.
const PIPELINE_FLUSH: usize = 64 * 1024;

impl Pipeline<'_> {
    fn wbuf(&mut self, key: Key<'_>) -> Result<&mut Vec<u8>> {
        let i = self.client.pick(key);
        if self.op.is_none() {
            self.op = Some(self.client.driver.begin(i)?);
        }
        Ok(self.client.driver.wbuf(i))
    }

    /// Queues a noreply storage command.
    pub fn store(
        &mut self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<&mut Self> {
        let key = Key::new(key)?;
        self.client.check_value(value)?;
        if value.len() > PIPELINE_FLUSH {
            // Large values go out on their own, without a copy.
            self.flush()?;
            let w = self.wbuf(key)?;
            text::encode_storage(w, mode.wire(), key, opts.flags, opts.ttl, value.len(), true);
            self.commands += 1;
            return self.flush_with(Some(value)).map(|()| self);
        }
        let w = self.wbuf(key)?;
        text::encode_storage(w, mode.wire(), key, opts.flags, opts.ttl, value.len(), true);
        w.extend_from_slice(value);
        w.extend_from_slice(DATA_TRAILER);
        self.queued()
    }

    /// Queues a noreply `set`.
    pub fn set(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<&mut Self> {
        self.store(StoreMode::Set, key, value, opts)
    }

    /// Queues a noreply `delete`.
    pub fn delete(&mut self, key: &[u8]) -> Result<&mut Self> {
        let key = Key::new(key)?;
        text::encode_delete(self.wbuf(key)?, key, true);
        self.queued()
    }

    /// Queues a noreply `incr` (or `decr`).
    pub fn incr(&mut self, key: &[u8], delta: u64, decr: bool) -> Result<&mut Self> {
        let key = Key::new(key)?;
        text::encode_arith(self.wbuf(key)?, decr, key, delta, true);
        self.queued()
    }

    /// Queues a noreply `touch`.
    pub fn touch(&mut self, key: &[u8], ttl: u32) -> Result<&mut Self> {
        let key = Key::new(key)?;
        text::encode_touch(self.wbuf(key)?, key, ttl, true);
        self.queued()
    }

    fn queued(&mut self) -> Result<&mut Self> {
        self.commands += 1;
        if self.client.driver.wbuf(0).len() >= PIPELINE_FLUSH {
            self.flush()?;
        }
        Ok(self)
    }

    fn flush(&mut self) -> Result<()> {
        self.flush_with(None)
    }

    /// Writes what is buffered (and `value`, then the data trailer), counting any error lines
    /// that arrive meanwhile.
    fn flush_with(&mut self, value: Option<&[u8]>) -> Result<()> {
        let Some(op) = self.op else { return Ok(()) };
        // Each flush gets a fresh I/O deadline: a long pipeline is many writes.
        let op = Op::renew(op);
        let (errors, first) = (&mut self.errors, &mut self.first_error);
        let limits = self.client.limits;
        self.client.driver.exchange(
            0,
            &op,
            value.map(|v| (v, DATA_TRAILER)),
            Until::Written,
            |buf| count_errors(buf, &limits, errors, first, false),
        )?;
        self.client.driver.wbuf(0).clear();
        Ok(())
    }

    /// Writes what is buffered without waiting for the server.
    pub fn send(mut self) -> Result<()> {
        self.flush()
    }

    /// Sends everything, then waits until the server has processed it all (one `version`
    /// round trip at the end), and reports the error lines it sent.
    pub fn finish(mut self) -> Result<PipelineReport> {
        if let Some(op) = self.op {
            text::encode_version(self.client.driver.wbuf(0));
            let op = Op::renew(op);
            let (errors, first) = (&mut self.errors, &mut self.first_error);
            let limits = self.client.limits;
            self.client
                .driver
                .exchange(0, &op, None, Until::Done, |buf| {
                    count_errors(buf, &limits, errors, first, true)
                })?;
        }
        Ok(PipelineReport {
            commands: self.commands,
            errors: self.errors,
            first_error: self.first_error,
        })
    }
}

/// Reply handler for noreply traffic: error lines are counted, `VERSION` ends the pipeline
/// (when `until_version`), anything else means the stream is out of step.
fn count_errors(
    buf: &[u8],
    limits: &Limits,
    errors: &mut usize,
    first: &mut Option<String>,
    until_version: bool,
) -> Result<Status<(usize, bool)>, ParseError> {
    match text::parse_reply(buf, limits)? {
        Status::Partial => Ok(Status::Partial),
        Status::Complete((n, Response::Version(_))) if until_version => {
            Ok(Status::Complete((n, true)))
        }
        Status::Complete((n, r)) => match server_error(&r) {
            Some(e) => {
                *errors += 1;
                first.get_or_insert_with(|| e.to_string());
                Ok(Status::Complete((n, false)))
            }
            None => Err(ParseError::Unexpected),
        },
    }
}
