//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`).
//!
//! Client metrics carry a `server` label (the server as configured) and, for calls, an `op`
//! label; handles are registered when a client is built, so a call only bumps atomics (the
//! recorder must be installed before clients are built). Without the feature everything here
//! is empty and inlined away: no clock read, no counter, nothing in a client.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `mcstore_calls_total` | counter | server, op |
//! | `mcstore_call_seconds` | histogram | server, op |
//! | `mcstore_hits_total`, `mcstore_misses_total` | counter | server |
//! | `mcstore_errors_total` | counter | server, kind (`io`, `timeout`, `parse`, `server`) |
//! | `mcstore_connects_total`, `mcstore_reconnects_total` | counter | server |
//! | `mcstore_ejections_total`, `mcstore_rejoins_total` | counter | server |
//! | `mcstore_storage_*_total` | counter | (none): `MemcacheStorage`'s [`StorageCounters`](crate::storage::StorageCounters) |
//! | `mcstore_storage_pending_invalidations` | gauge | (none) |
//!
//! `op` is the command: `get`, `store`, `delete`, `arith`, `touch`, `debug`, `admin` (flush,
//! verbosity, SASL), `version`, `stats`, `noreply`; a multi-key call adds `_multi` (one call
//! per server it involves).

use crate::proto::wire::Kind;

/// The `op` label of a command kind.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn op_index(kind: Kind, multi: bool) -> usize {
    let k = match kind {
        Kind::Get => 0,
        Kind::Store => 1,
        Kind::Delete => 2,
        Kind::Arith => 3,
        Kind::Touch => 4,
        Kind::Debug => 5,
        Kind::Ok => 6,
        Kind::Version => 7,
        Kind::Stats => 8,
        Kind::Quiet => 9,
    };
    k + if multi { OPS } else { 0 }
}

const OPS: usize = 10;

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const OP_NAMES: [&str; 2 * OPS] = [
    "get",
    "store",
    "delete",
    "arith",
    "touch",
    "debug",
    "admin",
    "version",
    "stats",
    "noreply",
    "get_multi",
    "store_multi",
    "delete_multi",
    "arith_multi",
    "touch_multi",
    "debug_multi",
    "admin_multi",
    "version_multi",
    "stats_multi",
    "noreply_multi",
];

#[cfg(feature = "metrics")]
mod on {
    use std::sync::Arc;
    use std::time::Instant;

    use metrics::{counter, gauge, histogram, Counter, Histogram, SharedString};

    use super::{op_index, Kind, OP_NAMES};
    use crate::error::Error;

    /// When a call started.
    #[derive(Clone, Copy)]
    pub(crate) struct Started(Instant);

    struct Server {
        calls: Vec<Counter>,
        latency: Vec<Histogram>,
        hits: Counter,
        misses: Counter,
        errors: [Counter; 4],
        connects: Counter,
        reconnects: Counter,
        ejections: Counter,
        rejoins: Counter,
        /// Connections seen so far (the driver's count).
        seen: u64,
    }

    /// One client's metric handles, per server.
    pub(crate) struct Metrics {
        servers: Vec<Server>,
    }

    impl Metrics {
        pub(crate) fn new(labels: &[String]) -> Metrics {
            let servers = labels
                .iter()
                .map(|l| {
                    let s: SharedString = SharedString::from(Arc::<str>::from(l.as_str()));
                    let one = |name: &'static str| counter!(name, "server" => s.clone());
                    let error = |kind: &'static str| {
                        counter!("mcstore_errors_total", "server" => s.clone(), "kind" => kind)
                    };
                    Server {
                        calls: OP_NAMES
                            .iter()
                            .map(|&op| counter!("mcstore_calls_total", "server" => s.clone(), "op" => op))
                            .collect(),
                        latency: OP_NAMES
                            .iter()
                            .map(|&op| histogram!("mcstore_call_seconds", "server" => s.clone(), "op" => op))
                            .collect(),
                        hits: one("mcstore_hits_total"),
                        misses: one("mcstore_misses_total"),
                        errors: [error("io"), error("timeout"), error("parse"), error("server")],
                        connects: one("mcstore_connects_total"),
                        reconnects: one("mcstore_reconnects_total"),
                        ejections: one("mcstore_ejections_total"),
                        rejoins: one("mcstore_rejoins_total"),
                        seen: 0,
                    }
                })
                .collect();
            Metrics { servers }
        }

        #[inline]
        pub(crate) fn start(&self) -> Started {
            Started(Instant::now())
        }

        /// A call (or a multi-key call's share) to server `i` ended.
        #[inline]
        pub(crate) fn call(&self, i: usize, kind: Kind, multi: bool, started: Started) {
            let s = &self.servers[i];
            let o = op_index(kind, multi);
            s.calls[o].increment(1);
            s.latency[o].record(started.0.elapsed().as_secs_f64());
        }

        #[inline]
        pub(crate) fn lookups(&self, i: usize, hits: u64, misses: u64) {
            let s = &self.servers[i];
            if hits > 0 {
                s.hits.increment(hits);
            }
            if misses > 0 {
                s.misses.increment(misses);
            }
        }

        pub(crate) fn error(&self, i: usize, e: &Error) {
            let k = match e {
                Error::Io { .. } => 0,
                Error::Timeout { .. } => 1,
                Error::Parse { .. } => 2,
                Error::Server { .. } => 3,
                _ => return,
            };
            self.servers[i].errors[k].increment(1);
        }

        pub(crate) fn ejected(&self, i: usize) {
            self.servers[i].ejections.increment(1);
        }

        pub(crate) fn rejoined(&self, i: usize) {
            self.servers[i].rejoins.increment(1);
        }

        /// The driver's connection count for server `i` (counts the new ones).
        #[inline]
        pub(crate) fn connections(&mut self, i: usize, count: u64) {
            let s = &mut self.servers[i];
            if count > s.seen {
                for n in s.seen + 1..=count {
                    s.connects.increment(1);
                    if n > 1 {
                        s.reconnects.increment(1);
                    }
                }
                s.seen = count;
            }
        }
    }

    /// A `MemcacheStorage` event (`name` is the whole metric name).
    pub(crate) fn storage(name: &'static str, n: u64) {
        counter!(name).increment(n);
    }

    /// The storage's failed invalidations awaiting replay.
    pub(crate) fn pending(n: usize) {
        gauge!("mcstore_storage_pending_invalidations").set(n as f64);
    }
}

#[cfg(not(feature = "metrics"))]
mod off {
    use super::Kind;
    use crate::error::Error;

    /// Nothing: no clock is read without the `metrics` feature.
    #[derive(Clone, Copy)]
    pub(crate) struct Started;

    /// Nothing without the `metrics` feature.
    pub(crate) struct Metrics;

    impl Metrics {
        pub(crate) fn new(_labels: &[String]) -> Metrics {
            Metrics
        }
        #[inline(always)]
        pub(crate) fn start(&self) -> Started {
            Started
        }
        #[inline(always)]
        pub(crate) fn call(&self, _i: usize, _kind: Kind, _multi: bool, _started: Started) {}
        #[inline(always)]
        pub(crate) fn lookups(&self, _i: usize, _hits: u64, _misses: u64) {}
        #[inline(always)]
        pub(crate) fn error(&self, _i: usize, _e: &Error) {}
        #[inline(always)]
        pub(crate) fn ejected(&self, _i: usize) {}
        #[inline(always)]
        pub(crate) fn rejoined(&self, _i: usize) {}
        #[inline(always)]
        pub(crate) fn connections(&mut self, _i: usize, _count: u64) {}
    }

    #[inline(always)]
    pub(crate) fn storage(_name: &'static str, _n: u64) {}

    #[inline(always)]
    pub(crate) fn pending(_n: usize) {}
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;
#[cfg(feature = "metrics")]
pub(crate) use on::*;
