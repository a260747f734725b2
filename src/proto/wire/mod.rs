//! The command layer: every command of every protocol behind one interface.
//!
//! A front ([`Client`](crate::Client), multi-key calls, pipelines) describes what it wants as a
//! [`Cmd`], has the protocol encode it, and reads the reply as protocol-neutral [`Outcome`]s.
//! Each protocol is one module implementing [`Wire`]; [`Protocol`]'s methods here are the one
//! place that picks the module. Like the rest of `proto`, this is pure: bytes in, bytes out.

mod binary;
mod meta;
mod text;

use super::{Key, Limits, ParseError, Status};

/// The wire protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The classic text protocol.
    #[default]
    Text,
    /// The binary protocol (deprecated by memcached 1.6, still served; the only one with SASL).
    Binary,
    /// The meta protocol (memcached 1.6.10 and later): everything the others do, binary keys
    /// (sent base64-encoded, up to 186 bytes), and leases ([`Client::meta_get`]).
    ///
    /// [`Client::meta_get`]: crate::Client::meta_get
    Meta,
}

/// The storage commands.
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

/// What a storage command answered, in every protocol's terms.
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

/// What a protocol can express beyond the common commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capability {
    /// Leases, invalidation, item metadata, CAS-returning sets (meta only).
    Meta,
    /// `verbosity` (memcached does not implement the binary command).
    Verbosity,
    /// Keys with whitespace or control bytes, sent base64-encoded (meta only).
    BinaryKeys,
    /// SASL authentication (binary only).
    Sasl,
    /// The LRU crawler's `metadump` (a text command: text and meta connections).
    MetaDump,
}

/// Options of a retrieval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GetOpts {
    /// Return the CAS unique.
    pub(crate) cas: bool,
    /// Get-and-touch with this TTL.
    pub(crate) touch: Option<u32>,
    /// Meta only: TTL, last access, hit-before (and the value's CAS).
    pub(crate) details: bool,
    /// Meta only: `N<ttl>` (vivify on miss and win the lease).
    pub(crate) lease_ttl: Option<u32>,
    /// Meta only: `R<secs>` (win the recache lease below this TTL).
    pub(crate) recache_below: Option<u32>,
    /// Meta only: `u` (no LRU bump).
    pub(crate) no_bump: bool,
}

/// Options of a storage command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StoreOpts {
    pub(crate) mode: StoreMode,
    pub(crate) flags: u32,
    pub(crate) ttl: u32,
    /// Store only if the CAS unique is still this one.
    pub(crate) cas: Option<u64>,
    /// Meta only: with `cas`, an older CAS still stores but leaves the item stale.
    pub(crate) invalidate: bool,
    /// Meta only: return the new CAS.
    pub(crate) return_cas: bool,
}

/// One command, as a front describes it. Keys are wire keys (namespace applied, base64 for a
/// binary key over meta).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cmd<'a> {
    Get(Key<'a>, GetOpts),
    /// A storage command for a value of `len` bytes (sent after the encoded header).
    Store(Key<'a>, StoreOpts, usize),
    Delete(Key<'a>),
    /// Meta only: mark the item stale instead of deleting it; the stale item lives this many
    /// seconds, if given.
    Invalidate(Key<'a>, Option<u32>),
    Arith {
        key: Key<'a>,
        decr: bool,
        delta: u64,
    },
    Touch(Key<'a>, u32),
    /// Meta only: the server's debug line for an item.
    Debug(Key<'a>),
    FlushAll(Option<u32>),
    Verbosity(u32),
    Version,
    Stats(Option<&'a [u8]>),
    /// Text and meta: `lru_crawler metadump all` (its lines come as stats named `key`).
    MetaDump,
    /// Binary only: SASL authentication with `mechanism` and its data.
    Auth {
        mechanism: &'a [u8],
        data: &'a [u8],
    },
    Quit,
    /// Ends a batch or pipeline: its reply ([`Outcome::End`]) comes after every earlier one.
    Sync,
}

/// What a command's replies are read as: the command kind (which some protocols need to tell
/// what a reply means) and, for a single command, the opaque its reply must echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expect {
    pub(crate) kind: Kind,
    /// Binary: the opaque of a single command's reply; `None` in batches, where the front
    /// matches opaques to items.
    pub(crate) opaque: Option<u32>,
}

impl Expect {
    pub(crate) fn single(kind: Kind, opaque: u32) -> Expect {
        Expect {
            kind,
            opaque: Some(opaque),
        }
    }

    pub(crate) fn batch(kind: Kind) -> Expect {
        Expect { kind, opaque: None }
    }
}

impl Kind {
    /// In a batch, every item of this kind answers, on every protocol: a touch (binary has
    /// no quiet touch, and a quiet meta touch answers its hits and hides its misses) and an
    /// incr or decr (a quiet one hides the new value).
    #[inline(always)]
    pub(crate) fn answers_each(self) -> bool {
        matches!(self, Kind::Touch | Kind::Arith)
    }
}

/// Command kinds, as [`Expect`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Get,
    Store,
    Delete,
    Arith,
    Touch,
    Debug,
    /// flush_all, verbosity, SASL: an `OK`.
    Ok,
    Version,
    Stats,
    /// A stream of quiet (noreply) commands closed by [`Cmd::Sync`].
    Quiet,
}

impl Cmd<'_> {
    /// `Cmd::Delete`, as a function generic over the key's lifetime (the variant is not).
    pub(crate) fn delete(key: Key<'_>) -> Cmd<'_> {
        Cmd::Delete(key)
    }

    /// The command's key, if it has one.
    pub(crate) fn key(&self) -> Option<Key<'_>> {
        match *self {
            Cmd::Get(k, _)
            | Cmd::Store(k, ..)
            | Cmd::Delete(k)
            | Cmd::Invalidate(k, _)
            | Cmd::Arith { key: k, .. }
            | Cmd::Touch(k, _)
            | Cmd::Debug(k) => Some(k),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        match self {
            Cmd::Get(..) => Kind::Get,
            Cmd::Store(..) => Kind::Store,
            Cmd::Delete(_) | Cmd::Invalidate(..) => Kind::Delete,
            Cmd::Arith { .. } => Kind::Arith,
            Cmd::Touch(..) => Kind::Touch,
            Cmd::Debug(_) => Kind::Debug,
            Cmd::FlushAll(_) | Cmd::Verbosity(_) | Cmd::Auth { .. } => Kind::Ok,
            Cmd::Version => Kind::Version,
            Cmd::Stats(_) | Cmd::MetaDump => Kind::Stats,
            Cmd::Quit | Cmd::Sync => Kind::Quiet,
        }
    }
}

/// An item in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Hit<'a> {
    /// The wire key, when the reply echoes it.
    pub(crate) key: Option<&'a [u8]>,
    /// The opaque, when the reply echoes one (binary always; meta when sent).
    pub(crate) opaque: Option<u32>,
    pub(crate) flags: u32,
    pub(crate) cas: Option<u64>,
    pub(crate) data: &'a [u8],
    /// Meta's item metadata, when asked for.
    pub(crate) ttl: Option<i64>,
    pub(crate) last_access: Option<u64>,
    pub(crate) hit_before: Option<bool>,
    pub(crate) won: bool,
    pub(crate) already_won: bool,
    pub(crate) stale: bool,
}

/// Why the server refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `ERROR`, binary unknown command.
    UnknownCommand,
    /// `CLIENT_ERROR`, binary statuses blaming the request.
    Client,
    /// `SERVER_ERROR`, binary out of memory, too large, unknown statuses.
    Server,
    /// Binary authentication statuses.
    Auth,
}

/// One reply unit, in every protocol's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome<'a> {
    Hit(Hit<'a>),
    /// A retrieval found nothing (meta `EN`, binary not found).
    Miss,
    /// The end of a retrieval, stats or batch reply (text `END`, binary No-op and empty stat,
    /// meta `MN`, the text `VERSION` closing a pipeline).
    End,
    Store(SetOutcome, Option<u64>, Option<u32>),
    Deleted(Option<u32>),
    /// A touch found the item (and its opaque: binary, meta).
    Touched(Option<u32>),
    /// A missing item, for commands other than retrievals (and its opaque, in batches).
    NotFound(Option<u32>),
    /// An incr's or decr's new value (and its opaque: binary, meta).
    Number(u64, Option<u32>),
    Ok,
    Version(&'a [u8]),
    Stat(&'a [u8], &'a [u8]),
    Debug(&'a [u8]),
    /// An error reply. `closes`: the server closes after it, or the stream is out of step.
    Error {
        refusal: Refusal,
        message: &'a [u8],
        closes: bool,
        /// The item it answers, when the reply names one (binary).
        opaque: Option<u32>,
    },
}

/// A reply unit and whether it completes a single command's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unit<'a> {
    pub(crate) outcome: Outcome<'a>,
    pub(crate) last: bool,
}

/// How a batch's replies end (see [`Wire::end_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchShape {
    /// How many [`Outcome::End`] units close it.
    pub(crate) ends: usize,
    /// Every item answers (text stores and deletes); otherwise only misses and failures do.
    pub(crate) every_item_replies: bool,
}

/// The result of decoding.
pub(crate) type Decoded<'a> = Result<Status<(usize, Unit<'a>)>, ParseError>;

impl BatchShape {
    /// A batch of `kind` closed by the reply to [`Cmd::Sync`] (binary, meta): every item
    /// answers before it if the kind does ([`Kind::answers_each`]), else only misses and
    /// failures.
    pub(crate) fn synced(kind: Kind) -> BatchShape {
        BatchShape {
            ends: 1,
            every_item_replies: kind.answers_each(),
        }
    }
}

/// What [`Wire::batch_hit`] read: `None` when the next unit is not a hit in the common shape.
pub(crate) type HitRead<'a> = Option<Result<Status<(usize, BatchHit<'a>)>, ParseError>>;

/// A multi-get hit in its common shape, small enough to stay in registers: the per-item hot
/// path (see [`Wire::batch_hit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHit<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) flags: u32,
    pub(crate) cas: Option<u64>,
    /// The item's opaque. With neither an opaque nor a key, the decoder checked that this is
    /// the hit of the expected next key.
    pub(crate) opaque: Option<u32>,
    /// The wire key, when the reply echoes it (binary).
    pub(crate) key: Option<&'a [u8]>,
}

/// One protocol: encoders for every command and batch, a decoder into [`Outcome`]s.
pub(crate) trait Wire {
    /// Appends `cmd` (quiet: no reply on success where the protocol can say so) to `out`.
    /// A store's value follows, sent by the caller with [`Wire::TRAILER`] after it.
    fn encode(out: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: u32, quiet: bool);
    /// Appends `cmd` as item `index` of a batch, the `pos`-th for this server: quiet, but
    /// for the kinds whose every item answers ([`Kind::answers_each`]).
    #[inline(always)]
    fn encode_item(out: &mut Vec<u8>, cmd: &Cmd<'_>, index: u32, pos: usize) {
        let _ = pos;
        Self::encode(out, cmd, index, !cmd.kind().answers_each());
    }
    /// Closes a batch of `n` items of `kind` for one server.
    fn end_batch(out: &mut Vec<u8>, kind: Kind, n: usize) -> BatchShape;
    /// Decodes the next reply unit of `buf`.
    fn decode<'a>(buf: &'a [u8], expect: &Expect, limits: &Limits) -> Decoded<'a>;
    /// Reads the next reply unit of a multi-get if it is a hit in the common shape; `None`
    /// for anything else, which [`Wire::decode`] then reads.
    fn batch_hit<'a>(buf: &'a [u8], next: Option<(&[u8], &[u8])>, limits: &Limits) -> HitRead<'a>;
    /// What follows a value on the wire.
    const TRAILER: &'static [u8];
    /// [`Wire::batch_hit`] reads replies by the next expected key (it has no opaques).
    const MATCHES_BY_NEXT_KEY: bool = false;
}

/// Evaluates `$e` with `$w` naming the protocol's [`Wire`] implementation: the one place
/// that picks a protocol. Fronts use it once per call, so that their reply loops are compiled
/// for each protocol and the decoder inlines into them.
macro_rules! with_wire {
    ($p:expr, $w:ident => $e:expr) => {
        match $p {
            $crate::proto::Protocol::Text => {
                type $w = $crate::proto::wire::Text;
                $e
            }
            $crate::proto::Protocol::Binary => {
                type $w = $crate::proto::wire::Binary;
                $e
            }
            $crate::proto::Protocol::Meta => {
                type $w = $crate::proto::wire::Meta;
                $e
            }
        }
    };
}
pub(crate) use with_wire;
pub(crate) use {binary::Binary, meta::Meta, text::Text};

impl Protocol {
    /// Whether this protocol can express `cap`.
    pub(crate) fn supports(self, cap: Capability) -> bool {
        matches!(
            (self, cap),
            (Protocol::Meta, Capability::Meta | Capability::BinaryKeys)
                | (
                    Protocol::Text | Protocol::Meta,
                    Capability::Verbosity | Capability::MetaDump
                )
                | (Protocol::Binary, Capability::Sasl)
        )
    }

    /// See [`Wire::encode`].
    #[inline]
    pub(crate) fn encode(self, out: &mut Vec<u8>, cmd: &Cmd<'_>, opaque: u32, quiet: bool) {
        with_wire!(self, W => W::encode(out, cmd, opaque, quiet))
    }

    /// See [`Wire::decode`].
    #[inline]
    pub(crate) fn decode<'a>(self, buf: &'a [u8], expect: &Expect, limits: &Limits) -> Decoded<'a> {
        with_wire!(self, W => W::decode(buf, expect, limits))
    }

    /// See [`Wire::TRAILER`].
    pub(crate) fn trailer(self) -> &'static [u8] {
        with_wire!(self, W => W::TRAILER)
    }
}

/// A complete unit.
pub(crate) fn unit(n: usize, outcome: Outcome<'_>, last: bool) -> Decoded<'_> {
    Ok(Status::Complete((n, Unit { outcome, last })))
}
