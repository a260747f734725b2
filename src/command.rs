//! The keyed commands, described once: what each sends ([`Op`], key, value) and how its reply
//! becomes the caller's result ([`Command::output`]). Every front runs them through one
//! executor of its own ([`Client::run`], `SharedClient::run`, `SharedClient::run_async`), and
//! [`keyed_commands!`] lists them once, with their documentation, for every front's methods.

use crate::client::{CasResult, Client, Item, ItemInfo, SetOptions};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::wire::{GetOpts, StoreOpts};
use crate::proto::{ParseError, SetOutcome, StoreMode};

/// What a call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Get { cas: bool },
    Gat { ttl: u32, cas: bool },
    Store(StoreOpts),
    Delete,
    Arith { decr: bool, delta: u64 },
    Touch(u32),
}

/// What a call got back (a hit's value is in the caller's or the slot's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    Hit(ItemInfo),
    Miss,
    Store(SetOutcome),
    Existed(bool),
    Number(Option<u64>),
}

/// A call as the caller gave it: what it asks, its key and its value (empty but for stores).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallSpec<'a> {
    pub(crate) op: Op,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// A keyed command: its call, and its typed result from the reply.
pub(crate) trait Command<'a>: Sized {
    /// What the caller gets.
    type Output;
    /// What is sent.
    fn call(&self) -> CallSpec<'a>;
    /// The caller's buffer for a hit's value, if it gave one (the `_into` calls): the
    /// executor writes the value there, and `output` gets an empty `value`.
    fn buffer(&mut self) -> Option<&mut Vec<u8>> {
        None
    }
    /// The caller's result from `reply`; `value` holds a hit's value unless the caller gave
    /// a buffer.
    fn output(self, reply: Reply, value: Vec<u8>) -> Result<Self::Output>;
}

/// Runs `cmd` with `exec(call, buffer)`: the one shape of every front's executor, so that
/// the buffer choice (the caller's, or a new one for an owned value) is made here once.
#[inline(always)]
pub(crate) fn run_with<'a, C: Command<'a>>(
    mut cmd: C,
    exec: impl FnOnce(CallSpec<'a>, &mut Vec<u8>) -> Result<Reply>,
) -> Result<C::Output> {
    let call = cmd.call();
    let mut owned = Vec::new();
    let reply = match cmd.buffer() {
        Some(buf) => {
            buf.clear();
            exec(call, buf)?
        }
        None => exec(call, &mut owned)?,
    };
    cmd.output(reply, owned)
}

/// A reply that cannot answer the command: a framing error (the connection's state is in
/// doubt, as for any reply that answers nothing asked).
pub(crate) fn unexpected() -> Error {
    Error::Parse {
        server: String::new(),
        error: ParseError::Unexpected,
    }
}

/// The result of a call that must be a hit or a miss.
#[inline]
pub(crate) fn as_item(r: Reply) -> Result<Option<ItemInfo>> {
    match r {
        Reply::Hit(i) => Ok(Some(i)),
        Reply::Miss => Ok(None),
        _ => Err(unexpected()),
    }
}

#[inline]
fn stored(r: Reply) -> Result<SetOutcome> {
    match r {
        Reply::Store(s) => Ok(s),
        _ => Err(unexpected()),
    }
}

#[inline]
fn existed(r: Reply) -> Result<bool> {
    match r {
        Reply::Existed(b) => Ok(b),
        _ => Err(unexpected()),
    }
}

/// A storage call's command options.
pub(crate) fn store_op(mode: StoreMode, opts: SetOptions, cas: Option<u64>) -> Op {
    Op::Store(StoreOpts {
        cas,
        ..crate::client::store_opts(mode, opts)
    })
}

/// A get or gets (`cas`): the item, its value copied into a new `Vec`.
#[derive(Clone, Copy)]
pub(crate) struct Get<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) cas: bool,
}

impl<'a> Command<'a> for Get<'a> {
    type Output = Option<Item>;
    fn call(&self) -> CallSpec<'a> {
        key_only(Op::Get { cas: self.cas }, self.key)
    }
    fn output(self, reply: Reply, value: Vec<u8>) -> Result<Option<Item>> {
        item(reply, value)
    }
}

/// A get-and-touch (gat, or gats with `cas`): a get that also sets the item's expiration.
pub(crate) struct Gat<'a>(pub(crate) Get<'a>, pub(crate) u32);

impl<'a> Command<'a> for Gat<'a> {
    type Output = Option<Item>;
    fn call(&self) -> CallSpec<'a> {
        let Gat(Get { key, cas }, ttl) = *self;
        key_only(Op::Gat { ttl, cas }, key)
    }
    fn output(self, reply: Reply, value: Vec<u8>) -> Result<Option<Item>> {
        self.0.output(reply, value)
    }
}

/// A get (or gets) into the caller's buffer: no allocation once it has grown.
pub(crate) struct GetInto<'a, 'b> {
    pub(crate) key: &'a [u8],
    pub(crate) buf: &'b mut Vec<u8>,
    pub(crate) cas: bool,
}

impl<'a> Command<'a> for GetInto<'a, '_> {
    type Output = Option<ItemInfo>;
    fn call(&self) -> CallSpec<'a> {
        key_only(Op::Get { cas: self.cas }, self.key)
    }
    fn buffer(&mut self) -> Option<&mut Vec<u8>> {
        Some(self.buf)
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<Option<ItemInfo>> {
        as_item(reply)
    }
}

/// A storage command (set, add, replace, append, prepend): whether it stored.
pub(crate) struct Store<'a> {
    pub(crate) mode: StoreMode,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
    pub(crate) opts: SetOptions,
}

impl<'a> Command<'a> for Store<'a> {
    type Output = bool;
    fn call(&self) -> CallSpec<'a> {
        let op = store_op(self.mode, self.opts, None);
        CallSpec {
            op,
            key: self.key,
            value: self.value,
        }
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<bool> {
        Ok(stored(reply)? == SetOutcome::Stored)
    }
}

/// A set: not stored is an error (a set's condition is always met).
pub(crate) struct Set<'a>(pub(crate) Store<'a>);

impl<'a> Command<'a> for Set<'a> {
    type Output = ();
    fn call(&self) -> CallSpec<'a> {
        self.0.call()
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<()> {
        match stored(reply)? {
            SetOutcome::Stored => Ok(()),
            _ => Err(Error::Server {
                kind: ServerErrorKind::Server,
                message: "set answered NOT_STORED".into(),
            }),
        }
    }
}

/// A compare-and-swap set.
pub(crate) struct Cas<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
    pub(crate) cas: u64,
    pub(crate) opts: SetOptions,
}

impl<'a> Command<'a> for Cas<'a> {
    type Output = CasResult;
    fn call(&self) -> CallSpec<'a> {
        let op = store_op(StoreMode::Set, self.opts, Some(self.cas));
        CallSpec {
            op,
            key: self.key,
            value: self.value,
        }
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<CasResult> {
        Ok(match stored(reply)? {
            SetOutcome::Stored => CasResult::Stored,
            SetOutcome::Exists => CasResult::Exists,
            SetOutcome::NotFound | SetOutcome::NotStored => CasResult::NotFound,
        })
    }
}

/// A delete: whether the key existed.
pub(crate) struct Delete<'a> {
    pub(crate) key: &'a [u8],
}

impl<'a> Command<'a> for Delete<'a> {
    type Output = bool;
    fn call(&self) -> CallSpec<'a> {
        key_only(Op::Delete, self.key)
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<bool> {
        existed(reply)
    }
}

/// An incr or decr: the new value, `None` if the key does not exist.
pub(crate) struct Arith<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) decr: bool,
    pub(crate) delta: u64,
}

impl<'a> Command<'a> for Arith<'a> {
    type Output = Option<u64>;
    fn call(&self) -> CallSpec<'a> {
        let (decr, delta) = (self.decr, self.delta);
        key_only(Op::Arith { decr, delta }, self.key)
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<Option<u64>> {
        match reply {
            Reply::Number(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }
}

/// A touch: whether the item exists.
pub(crate) struct Touch<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) ttl: u32,
}

impl<'a> Command<'a> for Touch<'a> {
    type Output = bool;
    fn call(&self) -> CallSpec<'a> {
        key_only(Op::Touch(self.ttl), self.key)
    }
    fn output(self, reply: Reply, _: Vec<u8>) -> Result<bool> {
        existed(reply)
    }
}

#[inline]
fn key_only(op: Op, key: &[u8]) -> CallSpec<'_> {
    CallSpec {
        op,
        key,
        value: &[],
    }
}

#[inline]
fn item(reply: Reply, value: Vec<u8>) -> Result<Option<Item>> {
    Ok(as_item(reply)?.map(|ItemInfo { flags, cas }| Item { value, flags, cas }))
}

/// Retrieval options of a get (`touch`: get-and-touch).
pub(crate) fn get_opts(cas: bool, touch: Option<u32>) -> GetOpts {
    GetOpts {
        cas,
        touch,
        ..GetOpts::default()
    }
}

impl Client {
    /// The executor of [`Client`]'s keyed commands.
    #[inline(always)]
    pub(crate) fn run<'a, C: Command<'a>>(&mut self, cmd: C) -> Result<C::Output> {
        run_with(cmd, |call, out| {
            self.perform(call.op, call.key, call.value, out)
        })
    }

    /// [`run`](Self::run) for a client whose keys have copies, out of the direct paths' way.
    #[cold]
    #[inline(never)]
    pub(crate) fn run_copies<'a, C: Command<'a>>(&mut self, cmd: C) -> Result<C::Output> {
        self.run(cmd)
    }
}

/// Every keyed command, once: its documentation, name (and its async twin's), parameters,
/// result and command value. `$front!` expands the list into one front's methods
/// (`client_methods!`, `shared_methods!`). Documentation is written for [`Client`]; the
/// shared client's methods add how they wait.
///
/// `direct m` names a [`Client`] method that the client's method calls instead of running
/// the command: `Client`'s hot calls (`get_into`, `set`, `delete`) keep their own path,
/// since the executor measured 3-6% more instructions per call on them
/// (`scripts/instructions`). The command still describes them for the shared client.
macro_rules! keyed_commands {
    ($front:ident) => {
        $front! {
            /// Gets a value, copying it into a new `Vec`. `None` on a miss.
            ///
            /// # Errors
            /// An invalid key; the server unreachable, timing out, answering with an error or
            /// malformed bytes ([`Error::kind`](crate::Error::kind) tells which).
            get / get_async(key: &[u8]) -> Option<Item> = Get { key, cas: false };

            /// Gets a value with its CAS unique (for [`cas`](Self::cas)). Errors as
            /// [`get`](Self::get).
            gets / gets_async(key: &[u8]) -> Option<Item> = Get { key, cas: true };

            /// Gets a value and sets its expiration to `ttl` (get-and-touch). Errors as
            /// [`get`](Self::get).
            gat / gat_async(key: &[u8], ttl: u32) -> Option<Item> = Gat(Get { key, cas: false }, ttl);

            /// Like [`gat`](Self::gat), and returns the CAS unique. Errors as [`get`](Self::get).
            gats / gats_async(key: &[u8], ttl: u32) -> Option<Item> = Gat(Get { key, cas: true }, ttl);

            /// Gets a value into `buf` (cleared first), the hot path: once `buf` and the
            /// client's buffers have grown to fit, this allocates nothing. `None` on a miss (then
            /// `buf` is empty). Errors as [`get`](Self::get).
            get_into / get_into_async(key: &[u8], buf: &mut Vec<u8>) -> Option<ItemInfo>
                = GetInto { key, buf, cas: false }, direct get_into_direct;

            /// Like [`get_into`](Self::get_into), with the CAS unique. Errors as
            /// [`get`](Self::get).
            gets_into / gets_into_async(key: &[u8], buf: &mut Vec<u8>) -> Option<ItemInfo>
                = GetInto { key, buf, cas: true };

            /// Runs `set`, `add`, `replace`, `append` or `prepend`. `Ok(true)` if stored,
            /// `Ok(false)` if the command's condition was not met (`NOT_STORED`).
            ///
            /// # Errors
            /// An invalid key, a value above the configured maximum, or a server failure as for
            /// [`get`](Self::get).
            store / store_async(mode: StoreMode, key: &[u8], value: &[u8], opts: SetOptions) -> bool
                = Store { mode, key, value, opts };

            /// Stores a value unconditionally. Errors as [`store`](Self::store).
            set / set_async(key: &[u8], value: &[u8], opts: SetOptions) -> ()
                = Set(Store { mode: StoreMode::Set, key, value, opts }), direct set_direct;

            /// Stores only if the key is absent; `false` if it exists. Errors as
            /// [`store`](Self::store).
            add / add_async(key: &[u8], value: &[u8], opts: SetOptions) -> bool
                = Store { mode: StoreMode::Add, key, value, opts };

            /// Stores only if the key exists; `false` if it does not. Errors as
            /// [`store`](Self::store).
            replace / replace_async(key: &[u8], value: &[u8], opts: SetOptions) -> bool
                = Store { mode: StoreMode::Replace, key, value, opts };

            /// Appends to an existing value; `false` if the key does not exist. Errors as
            /// [`store`](Self::store).
            append / append_async(key: &[u8], value: &[u8]) -> bool
                = Store { mode: StoreMode::Append, key, value, opts: SetOptions::default() };

            /// Prepends to an existing value; `false` if the key does not exist. Errors as
            /// [`store`](Self::store).
            prepend / prepend_async(key: &[u8], value: &[u8]) -> bool
                = Store { mode: StoreMode::Prepend, key, value, opts: SetOptions::default() };

            /// Stores only if the item's CAS unique is still `cas` (from [`gets`](Self::gets)).
            /// Errors as [`store`](Self::store).
            cas / cas_async(key: &[u8], value: &[u8], cas: u64, opts: SetOptions) -> CasResult
                = Cas { key, value, cas, opts };

            /// Deletes a key; `false` if it did not exist. Errors as [`get`](Self::get).
            delete / delete_async(key: &[u8]) -> bool = Delete { key }, direct delete_direct;

            /// Adds `delta` to a decimal value, wrapping at 2^64 as memcached does. `None` if the
            /// key does not exist.
            ///
            /// # Errors
            /// As [`get`](Self::get); a `CLIENT_ERROR` server error if the value is not a number.
            incr / incr_async(key: &[u8], delta: u64) -> Option<u64> = Arith { key, decr: false, delta };

            /// Subtracts `delta` from a decimal value, stopping at 0 as memcached does. Errors as
            /// [`incr`](Self::incr).
            decr / decr_async(key: &[u8], delta: u64) -> Option<u64> = Arith { key, decr: true, delta };

            /// Sets a new expiration on an item; `false` if it does not exist. Errors as
            /// [`get`](Self::get).
            touch / touch_async(key: &[u8], ttl: u32) -> bool = Touch { key, ttl };
        }
    };
}
pub(crate) use keyed_commands;
