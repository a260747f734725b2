//! The calls only the meta protocol can express: leases against thundering herds,
//! invalidation, TTL and access metadata, CAS-guarded fills.

use super::{Client, SetOptions, StoreMode};
use crate::error::Result;
use crate::proto::wire::{Capability, Cmd, GetOpts, Outcome, StoreOpts};
use crate::proto::{ParseError, SetOutcome};

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

/// The result of [`Client::meta_set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaSetResult {
    /// What happened.
    pub outcome: SetOutcome,
    /// The item's new CAS, when stored.
    pub cas: Option<u64>,
}

impl Client {
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
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) unless the client speaks
    /// meta; otherwise as [`get`](Self::get).
    pub fn meta_get(
        &mut self,
        key: &[u8],
        opts: MetaGetOptions,
        buf: &mut Vec<u8>,
    ) -> Result<Option<MetaItemInfo>> {
        self.core.require(Capability::Meta, "meta_get")?;
        if self.core.replicated() {
            // A touch only moves that copy's expiry: the value is the same everywhere.
            return self.on_first_copy(key, false, |c| c.meta_get(key, opts, buf), |_| false);
        }
        buf.clear();
        let get = GetOpts {
            cas: true,
            touch: opts.touch,
            details: true,
            lease_ttl: opts.lease_ttl,
            recache_below: opts.recache_below,
            no_bump: opts.no_bump,
        };
        self.keyed(key, |c, i, key| {
            let found = c.call(i, &Cmd::Get(key, get), None, |o, _| match o {
                Outcome::Hit(h) => {
                    buf.extend_from_slice(h.data);
                    Ok(Some(Some(MetaItemInfo {
                        flags: h.flags,
                        cas: h.cas.unwrap_or(0),
                        ttl: h.ttl.and_then(|t| u32::try_from(t).ok()),
                        last_access: h.last_access.unwrap_or(0),
                        hit_before: h.hit_before.unwrap_or(false),
                        lease: if h.won {
                            Lease::Won
                        } else if h.already_won {
                            Lease::AlreadyWon
                        } else {
                            Lease::None
                        },
                        stale: h.stale,
                    })))
                }
                Outcome::Miss => Ok(Some(None)),
                _ => Err(ParseError::Unexpected),
            })?;
            c.count_lookup(i, found.is_some());
            Ok(found)
        })
    }

    /// Marks an item stale instead of deleting it (`md <key> I`): its CAS changes, so a
    /// filler holding an older lease cannot store over it, and the next [`meta_get`] wins the
    /// lease to refresh it while others may serve the stale value. `stale_ttl` shortens the
    /// TTL the stale item keeps. `false` if the item did not exist.
    ///
    /// [`meta_get`]: Self::meta_get
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) unless the client speaks
    /// meta; otherwise as [`get`](Self::get).
    pub fn invalidate(&mut self, key: &[u8], stale_ttl: Option<u32>) -> Result<bool> {
        self.core.require(Capability::Meta, "invalidate")?;
        if self.core.replicated() {
            return self.on_first_copy(key, true, |c| c.invalidate(key, stale_ttl), |_| true);
        }
        self.keyed_bool(key, |key| Cmd::Invalidate(key, stale_ttl))
    }

    /// A storage command with everything meta offers: any mode, an optional CAS guard (for
    /// example a lease's CAS from [`meta_get`](Self::meta_get): "store only if my lease is
    /// still valid"), and the new CAS back.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) unless the client speaks
    /// meta; otherwise as [`get`](Self::get).
    pub fn meta_set(
        &mut self,
        key: &[u8],
        value: &[u8],
        opts: MetaSetOptions,
    ) -> Result<MetaSetResult> {
        self.core.require(Capability::Meta, "meta_set")?;
        if self.core.replicated() {
            self.core.check_value(value)?;
            let stored = |r: &MetaSetResult| r.outcome == SetOutcome::Stored;
            return self.on_first_copy(key, true, |c| c.meta_set(key, value, opts), stored);
        }
        let store = StoreOpts {
            mode: opts.mode,
            flags: opts.set.flags,
            ttl: opts.set.ttl,
            cas: opts.cas,
            invalidate: opts.invalidate,
            return_cas: true,
        };
        let (outcome, cas) = self.store_cmd(key, value, store)?;
        Ok(MetaSetResult {
            outcome,
            cas: cas.filter(|_| outcome == SetOutcome::Stored),
        })
    }

    /// The server's debug line for an item (`me`): `key exp=.. la=.. cas=.. fetch=.. cls=..
    /// size=..`, for humans. `None` if the item does not exist.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) unless the client speaks
    /// meta; otherwise as [`get`](Self::get).
    pub fn meta_debug(&mut self, key: &[u8]) -> Result<Option<String>> {
        self.core.require(Capability::Meta, "meta_debug")?;
        if self.core.replicated() {
            return self.on_first_copy(key, false, |c| c.meta_debug(key), |_| false);
        }
        self.keyed(key, |c, i, key| {
            // `me` takes no opaque: its hit is checked by the key it names.
            let wire = key.as_bytes();
            c.call(i, &Cmd::Debug(key), None, |o, _| match o {
                Outcome::Debug(line) if line.split(|&b| b == b' ').next() == Some(wire) => {
                    Ok(Some(Some(String::from_utf8_lossy(line).into_owned())))
                }
                Outcome::Miss => Ok(Some(None)),
                _ => Err(ParseError::Unexpected),
            })
        })
    }
}
