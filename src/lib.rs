//! mcstore: a from-scratch memcached client and, on top of it, a cache-through storage layer.
//!
//! # Fronts
//!
//! - [`Client`]: one caller's blocking client (`&mut self`), built by [`ClientBuilder`]:
//!   every command on the text, binary and meta protocols, many servers placed as
//!   libmemcached places them, multi-key calls fanned out, pipelines, no heap allocation per
//!   call once warm.
//! - [`Pool`]: a bounded set of `Client`s for many threads (a checkout per call).
//! - [`SharedClient`]: one client for many threads and async tasks at once: concurrent calls
//!   share connections and are batched into rounds; blocking calls and `_async` futures (any
//!   executor; the library starts no runtime).
//! - [`storage`]: collections of resources behind the [`storage::Storage`] trait:
//!   [`storage::FsStorage`] (files), `PgStorage` (PostgreSQL), [`storage::MemoryStorage`], and
//!   [`storage::MemcacheStorage`], a cache-through proxy that never serves stale content.
//! - [`cookbook`]: recipes (CAS loops, namespaces, TTLs as `Duration`, a tokio service, the
//!   storage in an async service).
//!
//! # Features
//!
//! | feature | what it adds | pulls in |
//! |---|---|---|
//! | `tls` | TLS to the servers (`TlsConfig`) | `rustls` (ring) |
//! | `postgres` | `storage::PgStorage` | `tokio-postgres`, `tokio` (a small runtime per connection) |
//! | `metrics` | counters and histograms through the `metrics` facade | `metrics` |
//! | `tracing` | a span per call, events for connects, ejections, replays | `tracing` |
//! | `serde` | typed values: [`codec::Postcard`], [`codec::Json`] | `serde`, `postcard`, `serde_json` |
//! | `lz4`, `zstd`, `zlib` (all three: `compression`) | compressed values ([`codec::Compressor`]) | `lz4_flex`; `zstd` (builds C); `flate2` (pure Rust) |
//!
//! No feature is on by default: the library alone is pure code (no runtime, no C compiler, no
//! database). The `mcstore` command-line tool is its own crate, `mcstore-cli` (`cli/`).
//!
//! # Layout
//!
//! Data flows down on a request and up on a reply, once; nothing below knows about anything
//! above.
//!
//! - [`storage`]: the storage layer, built on the clients: the [`storage::Storage`] trait,
//!   the masters, and [`storage::MemcacheStorage`] (fills with leases or markers, a durable
//!   invalidation log, the never-stale argument in its docs).
//! - [`codec`]: typed values, compression and values over the item limit, a layer above the
//!   byte calls (which never run a codec).
//! - [`client`]: [`Client`] (one caller, `&mut self`, blocking), its value types
//!   ([`Item`], [`SetOptions`], [`CasResult`] ...), [`ClientBuilder`] and [`Pool`].
//! - `shared` (internal; its types are re-exported): [`SharedClient`], one engine per server
//!   serving many threads' and tasks' calls in rounds, blocking calls and `_async` twins.
//! - `command` (internal): every keyed command described once (what it sends, its typed
//!   result); `Client`'s and `SharedClient`'s methods are generated from that one table.
//! - `engine` (internal): what every front runs on: routing a key to its server, opening a
//!   server's session (connect, authenticate), one exchange, multi-key batches, pipelines,
//!   and each server's health (libmemcached's eject and rejoin).
//! - [`ring`]: placing keys on servers exactly as libmemcached does (modula, ketama,
//!   weighted ketama; every libhashkit hash).
//! - `conn` (internal): the sans-IO exchange (a request's replies matched and framed,
//!   tested at every split point), the `mio` driver (one `Poll` per client, reused buffers,
//!   connect and I/O deadlines, reconnect after any error whose framing is in doubt), one
//!   batching policy, and TLS as a byte transform.
//! - [`proto`]: pure protocol code. Encoders append to a caller-owned buffer; parsers take
//!   the bytes that have arrived and answer `Partial` or `Complete(consumed, response)`,
//!   borrowing from the input. No sockets, no clock, no allocation per frame.
//!
//! # Example
//!
//! ```no_run
//! use mcstore::{Client, SetOptions};
//! # fn main() -> Result<(), mcstore::Error> {
//! let mut client = Client::builder().server("127.0.0.1:11211").build()?;
//! client.set(b"greeting", b"hello", SetOptions::default().ttl(60))?;
//! let item = client.get(b"greeting")?.expect("just stored");
//! assert_eq!(item.value, b"hello");
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![warn(unreachable_pub)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_debug_implementations)]

/// Builder setters that store their argument in a field and return `self`, each with its
/// own documentation: `name(arg: Type) => field.path;`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $t:ty) => $($field:ident).+;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, $arg: $t) -> Self {
            self.$($field).+ = $arg;
            self
        }
    )*};
}

mod addr;
pub mod client;
pub mod codec;
mod command;
mod conn;
mod engine;
mod error;
mod fleet;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod observe;
pub mod proto;
pub mod ring;
mod shared;
pub mod storage;

#[doc = include_str!("../docs/cookbook.md")]
#[cfg_attr(feature = "postgres", doc = include_str!("../docs/cookbook-postgres.md"))]
pub mod cookbook {}

pub use addr::{ServerAddr, ServerSpec, DEFAULT_PORT};
pub use client::{
    CasResult, Client, ClientBuilder, IoMode, Item, ItemInfo, ItemRef, Lease, MetaGetOptions,
    MetaItemInfo, MetaSetOptions, MetaSetResult, Pipeline, PipelineReport, Pool, PooledClient,
    ServerCounters, ServerStats, SetOptions, SharedClient, SharedClientBuilder,
    DEFAULT_PIPELINE_DEPTH,
};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use conn::tls::{TlsConfig, TlsConfigBuilder};
#[cfg(feature = "tls")]
pub use error::TlsFailure;
pub use error::{During, Error, ErrorKind, Result, ServerErrorKind};
pub use fleet::discovery::{Discovery, Following, ServerSource};
pub use fleet::live::{ListChange, ServerList};
pub use fleet::{FleetCounters, Hedge, WritePolicy, ZoneInfo};
pub use proto::{Key, KeyError};
pub use proto::{Protocol, SetOutcome, StoreMode};

/// The README's examples, compiled as doc tests so they stay true (with `tls` and `postgres`,
/// which some of them use; `scripts/test` turns both on).
#[doc = include_str!("../README.md")]
#[cfg(all(doctest, feature = "tls", feature = "postgres"))]
pub struct ReadmeDoctests;
