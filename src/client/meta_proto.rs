//! The meta protocol behind the same API, and the calls only meta can express: leases
//! against thundering herds, invalidation, TTL and access metadata, CAS-guarded fills.
//!
//! Single-key calls send one command without `q` and read one reply (the server answers in
//! order). Multi-key calls and pipelines use `q` + `O<index>` and close each server's batch
//! with `mn` (see `multi.rs` and `pipeline.rs`).

use super::binary_proto::StoreOutcome;
use super::{server_error, Client, ItemInfo, Lines, Protocol, SetOptions, Step, StoreMode};
use crate::conn::driver::{Op, COPY_VALUE_MAX};
use crate::error::{Error, Result};
use crate::proto::meta::{self, ArithFlags, Code, DeleteFlags, GetFlags, Meta, Reply, SetFlags};
use crate::proto::text::Response;
use crate::proto::{parse_u64, Key, Limits, ParseError, Status};

pub(super) struct MetaLines;

impl Lines for MetaLines {
    type Reply<'a> = Reply<'a>;
    fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Result<Status<(usize, Reply<'a>)>, ParseError> {
        meta::parse_reply(buf, limits)
    }
    fn error(r: &Reply<'_>) -> Option<(Error, bool)> {
        meta_error(r).map(|e| (e, matches!(r, Reply::ServerError(_))))
    }
}

/// The error an error line stands for: the classic error lines (protocol.txt, "Error
/// strings"), mapped as the text protocol maps them.
pub(super) fn meta_error(r: &Reply<'_>) -> Option<Error> {
    server_error(&match *r {
        Reply::Error(m) => Response::Error(m),
        Reply::ClientError(m) => Response::ClientError(m),
        Reply::ServerError(m) => Response::ServerError(m),
        _ => return None,
    })
}

impl StoreMode {
    pub(super) fn meta(self) -> meta::Mode {
        match self {
            StoreMode::Set => meta::Mode::Set,
            StoreMode::Add => meta::Mode::Add,
            StoreMode::Replace => meta::Mode::Replace,
            StoreMode::Append => meta::Mode::Append,
            StoreMode::Prepend => meta::Mode::Prepend,
        }
    }
}

/// Who may recompute a missing or expiring item, as [`Client::meta_get`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// No lease was at stake (a plain hit).
    None,
    /// `W`: this caller won: it should recompute the value and store it with
    /// [`Client::meta_set`] and the CAS it got, so an invalidation in between wins.
    Won,
    /// `Z`: another client has won and is recomputing: use the (stale or empty) value, wait
    /// and retry, or go to the source.
    AlreadyWon,
}

/// What [`Client::meta_get`] asks for besides the value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaGetOptions {
    /// `N<ttl>`: on a miss, create an empty placeholder living `ttl` seconds and win its lease:
    /// the first caller gets [`Lease::Won`], the next ones [`Lease::AlreadyWon`].
    pub lease_ttl: Option<u32>,
    /// `R<secs>`: if the item has fewer seconds to live than this, the first caller wins the
    /// right to refresh it early ([`Lease::Won`]); everyone still gets the value.
    pub recache_below: Option<u32>,
    /// `T<ttl>`: set a new TTL (get-and-touch).
    pub touch: Option<u32>,
    /// `u`: do not bump the item in the LRU or update its last access.
    pub no_bump: bool,
}

/// What [`Client::meta_get`] found, besides the value written into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaItemInfo {
    /// The item's client flags.
    pub flags: u32,
    /// The CAS unique: pass it to [`Client::meta_set`] to fill only if nothing changed since.
    pub cas: u64,
    /// Seconds left to live; `None` if the item never expires.
    pub ttl: Option<u32>,
    /// Seconds since the item was last accessed (before this call).
    pub last_access: u64,
    /// Whether the item had been read before this call.
    pub hit_before: bool,
    /// The lease state.
    pub lease: Lease,
    /// `X`: the item was invalidated ([`Client::invalidate`]) and its value is stale.
    pub stale: bool,
}

/// Options for [`Client::meta_set`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaSetOptions {
    /// Set, add, replace, append or prepend.
    pub mode: StoreMode,
    /// Expiration and client flags.
    pub set: SetOptions,
    /// Store only if the item's CAS is still this one (a lease's CAS from
    /// [`Client::meta_get`]).
    pub cas: Option<u64>,
    /// With `cas`: a CAS older than the item's still stores, but leaves the item stale (`I`).
    pub invalidate: bool,
}

/// The outcome of a storage command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// Stored.
    Stored,
    /// The mode's condition failed (add of an existing key, replace/append/prepend of a
    /// missing one).
    NotStored,
    /// The CAS did not match: someone wrote or invalidated the item since.
    Exists,
    /// A CAS was given and the item does not exist (any more).
    NotFound,
}

/// The result of [`Client::meta_set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaSetResult {
    /// What happened.
    pub outcome: SetOutcome,
    /// The item's new CAS, when stored.
    pub cas: Option<u64>,
}

/// True for a meta status reply with this code.
fn is(r: &Reply<'_>, code: Code) -> bool {
    matches!(r, Reply::Meta(m) if m.code == code)
}

impl Client {
    /// A meta exchange: [`exchange_lines`](Self::exchange_lines) with the meta parser.
    fn meta_exchange<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        has_data: bool,
        on: impl FnMut(Reply<'_>) -> Step<T>,
    ) -> Result<T> {
        self.exchange_lines::<MetaLines, T>(i, op, value, has_data, on)
    }

    /// One command, one reply: `map` turns the reply into the result, `None` meaning a reply
    /// that cannot answer this command (the connection is then dropped).
    fn meta_simple<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        has_data: bool,
        mut map: impl FnMut(Meta<'_>) -> Option<T>,
    ) -> Result<T> {
        let r = self.meta_exchange(i, op, value, has_data, |r| {
            Step::Done(match r {
                Reply::Meta(m) => map(m),
                _ => None,
            })
        })?;
        r.ok_or_else(|| self.unexpected(i))
    }

    fn require_meta(&self, what: &str) -> Result<()> {
        if self.protocol == Protocol::Meta {
            return Ok(());
        }
        Err(Error::Config(format!(
            "{what} needs the meta protocol (.protocol(Protocol::Meta))"
        )))
    }

    pub(super) fn meta_retrieve(
        &mut self,
        i: usize,
        with_cas: bool,
        touch: Option<u32>,
        key: Key<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<ItemInfo>> {
        let op = self.start(i)?;
        let f = GetFlags {
            value: true,
            client_flags: true,
            cas: with_cas,
            touch,
            ..GetFlags::default()
        };
        meta::encode_get(self.driver.wbuf(i), key, &f);
        self.meta_simple(i, &op, None, false, |m| match (m.code, m.data) {
            (Code::Value, Some(d)) => {
                sink(d);
                Some(Some(ItemInfo {
                    flags: m.flags.client_flags.unwrap_or(0),
                    cas: if with_cas { m.flags.cas } else { None },
                }))
            }
            (Code::Miss, _) => Some(None),
            _ => None,
        })
    }

    /// Writes `value` after an `ms` line already in the buffer: copied when small, sent from
    /// the caller's slice (vectored) when large.
    fn meta_value<'v>(&mut self, i: usize, value: &'v [u8]) -> Option<&'v [u8]> {
        if value.len() <= COPY_VALUE_MAX {
            let w = self.driver.wbuf(i);
            w.extend_from_slice(value);
            w.extend_from_slice(meta::DATA_TRAILER);
            None
        } else {
            Some(value)
        }
    }

    fn meta_set_in(
        &mut self,
        i: usize,
        key: Key<'_>,
        value: &[u8],
        f: &SetFlags,
    ) -> Result<(SetOutcome, Option<u64>)> {
        let op = self.start(i)?;
        meta::encode_set(self.driver.wbuf(i), key, value.len(), f);
        let separate = self.meta_value(i, value);
        self.meta_simple(i, &op, separate, true, |m| {
            let outcome = match m.code {
                Code::Done => SetOutcome::Stored,
                Code::NotStored => SetOutcome::NotStored,
                Code::Exists => SetOutcome::Exists,
                Code::NotFound => SetOutcome::NotFound,
                _ => return None,
            };
            Some((outcome, m.flags.cas))
        })
    }

    pub(super) fn meta_store(
        &mut self,
        i: usize,
        mode: StoreMode,
        cas: Option<u64>,
        key: Key<'_>,
        value: &[u8],
        opts: SetOptions,
    ) -> Result<StoreOutcome> {
        let f = SetFlags {
            mode: mode.meta(),
            ttl: opts.ttl,
            client_flags: opts.flags,
            cas,
            ..SetFlags::default()
        };
        Ok(match self.meta_set_in(i, key, value, &f)?.0 {
            SetOutcome::Stored => StoreOutcome::Stored,
            SetOutcome::NotStored => StoreOutcome::NotStored,
            SetOutcome::Exists => StoreOutcome::Exists,
            SetOutcome::NotFound => StoreOutcome::NotFound,
        })
    }

    pub(super) fn meta_delete(&mut self, i: usize, key: Key<'_>, f: &DeleteFlags) -> Result<bool> {
        let op = self.start(i)?;
        meta::encode_delete(self.driver.wbuf(i), key, f);
        self.meta_simple(i, &op, None, false, |m| match m.code {
            Code::Done => Some(true),
            Code::NotFound => Some(false),
            _ => None,
        })
    }

    pub(super) fn meta_arith(
        &mut self,
        i: usize,
        decr: bool,
        key: Key<'_>,
        delta: u64,
    ) -> Result<Option<u64>> {
        let op = self.start(i)?;
        let f = ArithFlags {
            decr,
            delta,
            value: true,
            ..ArithFlags::default()
        };
        meta::encode_arith(self.driver.wbuf(i), key, &f);
        self.meta_simple(i, &op, None, false, |m| match (m.code, m.data) {
            (Code::Value, Some(d)) => parse_u64(d).map(Some),
            (Code::NotFound, _) => Some(None),
            _ => None,
        })
    }

    pub(super) fn meta_touch(&mut self, i: usize, key: Key<'_>, ttl: u32) -> Result<bool> {
        let op = self.start(i)?;
        let f = GetFlags {
            touch: Some(ttl),
            ..GetFlags::default()
        };
        meta::encode_get(self.driver.wbuf(i), key, &f);
        self.meta_simple(i, &op, None, false, |m| match m.code {
            Code::Done => Some(true),
            Code::Miss => Some(false),
            _ => None,
        })
    }

    /// Meta get with everything meta can say about the item: the value goes into `buf`
    /// (cleared first); the info carries its CAS, TTL, last access, and the lease state.
    /// `None` on a miss, unless `opts.lease_ttl` is set: then a miss creates an empty
    /// placeholder and returns it, with [`Lease::Won`] for the first caller.
    ///
    /// The stampede-proof read (protocol.txt, "Meta Get", flags N, R, and notes §7):
    ///
    /// ```no_run
    /// use mcstore::{Client, Lease, MetaGetOptions, MetaSetOptions, Protocol, SetOutcome};
    /// # fn compute() -> Vec<u8> { b"v".to_vec() }
    /// # fn main() -> mcstore::Result<()> {
    /// let mut c = Client::builder().server("127.0.0.1:11211").protocol(Protocol::Meta).build()?;
    /// let mut buf = Vec::new();
    /// let opts = MetaGetOptions { lease_ttl: Some(30), ..Default::default() };
    /// let info = c.meta_get(b"report", opts, &mut buf)?.expect("N always answers");
    /// if info.lease == Lease::Won {
    ///     let value = compute();
    ///     let fill = MetaSetOptions { cas: Some(info.cas), ..Default::default() };
    ///     // Exists: the item was invalidated meanwhile; our value is already old, drop it.
    ///     let _ = c.meta_set(b"report", &value, fill)?.outcome == SetOutcome::Stored;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn meta_get(
        &mut self,
        key: &[u8],
        opts: MetaGetOptions,
        buf: &mut Vec<u8>,
    ) -> Result<Option<MetaItemInfo>> {
        self.require_meta("meta_get")?;
        buf.clear();
        self.keyed(key, |c, i, key| {
            let op = c.start(i)?;
            let f = GetFlags {
                value: true,
                client_flags: true,
                cas: true,
                ttl: true,
                last_access: true,
                hit: true,
                no_bump: opts.no_bump,
                touch: opts.touch,
                vivify: opts.lease_ttl,
                recache: opts.recache_below,
                ..GetFlags::default()
            };
            meta::encode_get(c.driver.wbuf(i), key, &f);
            let found = c.meta_simple(i, &op, None, false, |m| match (m.code, m.data) {
                (Code::Value, Some(d)) => {
                    buf.extend_from_slice(d);
                    let f = m.flags;
                    Some(Some(MetaItemInfo {
                        flags: f.client_flags.unwrap_or(0),
                        cas: f.cas.unwrap_or(0),
                        ttl: f.ttl.and_then(|t| u32::try_from(t).ok()),
                        last_access: f.last_access.unwrap_or(0),
                        hit_before: f.hit.unwrap_or(false),
                        lease: if f.won {
                            Lease::Won
                        } else if f.already_won {
                            Lease::AlreadyWon
                        } else {
                            Lease::None
                        },
                        stale: f.stale,
                    }))
                }
                (Code::Miss, _) => Some(None),
                _ => None,
            })?;
            let counters = c.health.counters_mut(i);
            match found {
                Some(_) => counters.hits += 1,
                None => counters.misses += 1,
            }
            Ok(found)
        })
    }

    /// Marks an item stale instead of deleting it (`md <key> I`): its CAS changes, so a
    /// filler holding an older lease cannot store over it, and the next [`meta_get`] wins the
    /// lease to refresh it while others may serve the stale value. `stale_ttl` shortens the
    /// TTL the stale item keeps. `false` if the item did not exist.
    ///
    /// [`meta_get`]: Self::meta_get
    pub fn invalidate(&mut self, key: &[u8], stale_ttl: Option<u32>) -> Result<bool> {
        self.require_meta("invalidate")?;
        let f = DeleteFlags {
            invalidate: true,
            ttl: stale_ttl,
            ..DeleteFlags::default()
        };
        self.keyed(key, |c, i, key| c.meta_delete(i, key, &f))
    }

    /// A storage command with everything meta offers: any mode, an optional CAS guard (for
    /// example a lease's CAS from [`meta_get`](Self::meta_get): "store only if my lease is
    /// still valid"), and the new CAS back.
    pub fn meta_set(
        &mut self,
        key: &[u8],
        value: &[u8],
        opts: MetaSetOptions,
    ) -> Result<MetaSetResult> {
        self.require_meta("meta_set")?;
        self.check_value(value)?;
        let f = SetFlags {
            mode: opts.mode.meta(),
            ttl: opts.set.ttl,
            client_flags: opts.set.flags,
            cas: opts.cas,
            invalidate: opts.invalidate,
            return_cas: true,
            ..SetFlags::default()
        };
        self.keyed(key, |c, i, key| {
            let (outcome, cas) = c.meta_set_in(i, key, value, &f)?;
            Ok(MetaSetResult {
                outcome,
                cas: cas.filter(|_| outcome == SetOutcome::Stored),
            })
        })
    }

    /// The server's debug line for an item (`me`): `key exp=.. la=.. cas=.. fetch=.. cls=..
    /// size=..`, for humans. `None` if the item does not exist.
    pub fn meta_debug(&mut self, key: &[u8]) -> Result<Option<String>> {
        self.require_meta("meta_debug")?;
        self.keyed(key, |c, i, key| {
            let op = c.start(i)?;
            meta::encode_debug(c.driver.wbuf(i), key);
            let r = c.meta_exchange(i, &op, None, false, |r| {
                Step::Done(match r {
                    Reply::Debug(line) => Some(Some(String::from_utf8_lossy(line).into_owned())),
                    r if is(&r, Code::Miss) => Some(None),
                    _ => None,
                })
            })?;
            r.ok_or_else(|| c.unexpected(i))
        })
    }
}
