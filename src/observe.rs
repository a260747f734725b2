//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`)
//! and traces through [`tracing`](https://docs.rs/tracing) (cargo feature `tracing`).
//!
//! Tracing: a `mcstore.call` span per call (fields `op`, `server`, `protocol`, `keys`,
//! `value_bytes` (sent), `outcome`; a multi-key call has one span, `server` empty, `servers` the number it
//! involved) and events (target `mcstore`) for connects and reconnects, ejections, rejoins and
//! storage replays. Keys are never recorded: only their number.
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
//! | `mcstore_bytes_read_total`, `mcstore_bytes_written_total` | counter | server |
//! | `mcstore_ejections_total`, `mcstore_rejoins_total` | counter | server |
//! | `mcstore_breaker_state` | gauge | server: 0 up, 1 ejected, 2 probed by one call |
//! | `mcstore_failovers_total` | counter | server (that answered after another copy failed) |
//! | `mcstore_hedges_total`, `mcstore_hedges_refused_total` | counter | server (the slow one) |
//! | `mcstore_hedges_won_total` | counter | server (that answered the hedge) |
//! | `mcstore_repairs_recorded_total`, `mcstore_repairs_done_total` | counter | (none) |
//! | `mcstore_storage_*_total` | counter | (none): `MemcacheStorage`'s [`StorageCounters`](crate::storage::StorageCounters) |
//! | `mcstore_storage_pending_invalidations` | gauge | (none) |
//! | `mcstore_shared_in_flight` | gauge | server: a shared client's requests queued or on the wire |
//! | `mcstore_shared_rounds_in_flight` | gauge | server: its rounds on the wire (one per connection at most) |
//! | `mcstore_shared_batch_size` | histogram | server: requests per round |
//! | `mcstore_shared_queued_seconds` | histogram | server: from a call's start to its round's write |
//!
//! `op` is the command: `get`, `store`, `delete`, `arith`, `touch`, `debug`, `admin` (flush,
//! verbosity, SASL), `version`, `stats`, `noreply` (a pipelined or noreply command: counted, no
//! latency of its own); a multi-key call adds `_multi` (one call per server it involves).

use crate::proto::wire::Kind;

/// The `op` label of a command kind.
#[cfg_attr(not(any(feature = "metrics", feature = "tracing")), allow(dead_code))]
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

#[cfg_attr(not(any(feature = "metrics", feature = "tracing")), allow(dead_code))]
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

/// The `op` name of a command kind.
#[cfg_attr(not(feature = "tracing"), allow(dead_code))]
pub(crate) fn op_name(kind: Kind, multi: bool) -> &'static str {
    OP_NAMES[op_index(kind, multi)]
}

#[cfg(feature = "metrics")]
use metrics::{counter, gauge, histogram, Counter, Histogram, SharedString};

/// When a call started (nothing without the `metrics` feature: no clock read).
#[derive(Clone, Copy)]
pub(crate) struct Started(#[cfg(feature = "metrics")] std::time::Instant);

#[cfg(feature = "metrics")]
struct ServerMetrics {
    calls: Vec<Counter>,
    latency: Vec<Histogram>,
    hits: Counter,
    misses: Counter,
    errors: [Counter; 5],
    connects: Counter,
    reconnects: Counter,
    ejections: Counter,
    rejoins: Counter,
    /// The server's circuit breaker: 0 closed (up), 1 open (ejected), 2 half-open (one call
    /// probes it).
    breaker: metrics::Gauge,
    bytes_read: Counter,
    bytes_written: Counter,
    /// The driver's byte counts already reported.
    bytes_seen: (u64, u64),
}

/// One client's metric handles and trace labels, per server (empty without the features).
pub(crate) struct Observer {
    #[cfg(feature = "metrics")]
    metrics: Vec<ServerMetrics>,
    #[cfg(feature = "tracing")]
    labels: Vec<String>,
    /// Connections seen so far per server (the driver's count).
    #[cfg(any(feature = "metrics", feature = "tracing"))]
    seen: Vec<u64>,
}

impl Observer {
    pub(crate) fn new(labels: &[String]) -> Observer {
        let _ = labels;
        Observer {
            #[cfg(feature = "metrics")]
            metrics: labels.iter().map(|l| server_metrics(l)).collect(),
            #[cfg(feature = "tracing")]
            labels: labels.to_vec(),
            #[cfg(any(feature = "metrics", feature = "tracing"))]
            seen: vec![0; labels.len()],
        }
    }

    /// Adds the servers of `labels` past the ones it has (a live list added them).
    pub(crate) fn grow(&mut self, labels: &[String]) {
        let _ = labels;
        #[cfg(feature = "metrics")]
        for l in labels.iter().skip(self.metrics.len()) {
            self.metrics.push(server_metrics(l));
        }
        #[cfg(feature = "tracing")]
        self.labels
            .extend(labels.iter().skip(self.labels.len()).cloned());
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        self.seen.resize(labels.len(), 0);
    }

    #[inline(always)]
    pub(crate) fn start(&self) -> Started {
        Started(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    /// A call (or a multi-key call's share) to server `i` ended.
    #[inline(always)]
    pub(crate) fn call(&self, i: usize, kind: Kind, multi: bool, started: Started) {
        let _ = (i, kind, multi, started);
        #[cfg(feature = "metrics")]
        {
            let s = &self.metrics[i];
            let o = op_index(kind, multi);
            s.calls[o].increment(1);
            s.latency[o].record(started.0.elapsed().as_secs_f64());
        }
    }

    /// The driver's byte counts for server `i` (reports what moved since last time).
    #[inline(always)]
    pub(crate) fn bytes(&mut self, i: usize, (read, written): (u64, u64)) {
        let _ = (i, read, written);
        #[cfg(feature = "metrics")]
        {
            let s = &mut self.metrics[i];
            s.bytes_read.increment(read.saturating_sub(s.bytes_seen.0));
            s.bytes_written
                .increment(written.saturating_sub(s.bytes_seen.1));
            s.bytes_seen = (read, written);
        }
    }

    /// A pipelined (noreply) command was queued for server `i`: a call without a latency of
    /// its own (`op` `noreply`).
    #[inline(always)]
    pub(crate) fn queued(&self, i: usize) {
        let _ = i;
        #[cfg(feature = "metrics")]
        self.metrics[i].calls[op_index(Kind::Quiet, false)].increment(1);
    }

    #[inline(always)]
    pub(crate) fn lookups(&self, i: usize, hits: u64, misses: u64) {
        let _ = (i, hits, misses);
        #[cfg(feature = "metrics")]
        {
            let s = &self.metrics[i];
            if hits > 0 {
                s.hits.increment(hits);
            }
            if misses > 0 {
                s.misses.increment(misses);
            }
        }
    }

    #[inline(always)]
    pub(crate) fn error(&self, i: usize, e: &crate::error::Error) {
        let _ = (i, e);
        #[cfg(feature = "metrics")]
        {
            use crate::error::Error;
            let k = match e {
                Error::Io { .. } => 0,
                Error::Timeout { .. } => 1,
                Error::Parse { .. } => 2,
                Error::Server { .. } => 3,
                #[cfg(feature = "tls")]
                Error::Tls { .. } => 4,
                _ => return,
            };
            self.metrics[i].errors[k].increment(1);
        }
    }

    #[inline(always)]
    pub(crate) fn ejected(&self, i: usize) {
        let _ = i;
        #[cfg(feature = "metrics")]
        {
            self.metrics[i].ejections.increment(1);
            self.metrics[i].breaker.set(1.0);
        }
        #[cfg(feature = "tracing")]
        tracing::warn!(target: "mcstore", server = %self.labels[i], "server ejected");
    }

    #[inline(always)]
    pub(crate) fn rejoined(&self, i: usize) {
        let _ = i;
        #[cfg(feature = "metrics")]
        {
            self.metrics[i].rejoins.increment(1);
            self.metrics[i].breaker.set(2.0);
        }
        #[cfg(feature = "tracing")]
        tracing::info!(target: "mcstore", server = %self.labels[i], "server rejoined");
    }

    /// Server `i`'s probe succeeded: its breaker is closed again.
    #[inline(always)]
    pub(crate) fn closed(&self, i: usize) {
        let _ = i;
        #[cfg(feature = "metrics")]
        self.metrics[i].breaker.set(0.0);
        #[cfg(feature = "tracing")]
        tracing::info!(target: "mcstore", server = %self.labels[i], "probe succeeded: server up");
    }

    /// The driver's connection count for server `i` (counts and reports the new ones).
    #[inline(always)]
    pub(crate) fn connections(&mut self, i: usize, count: u64) {
        let _ = (i, count);
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        if count > self.seen[i] {
            self.connected(i, count);
        }
    }

    #[cfg(any(feature = "metrics", feature = "tracing"))]
    #[cold]
    fn connected(&mut self, i: usize, count: u64) {
        for n in self.seen[i] + 1..=count {
            #[cfg(feature = "metrics")]
            {
                self.metrics[i].connects.increment(1);
                if n > 1 {
                    self.metrics[i].reconnects.increment(1);
                }
            }
            #[cfg(feature = "tracing")]
            if n > 1 {
                tracing::info!(target: "mcstore", server = %self.labels[i], connection = n, "reconnected");
            } else {
                tracing::debug!(target: "mcstore", server = %self.labels[i], "connected");
            }
            let _ = n;
        }
        self.seen[i] = count;
    }

    /// The span of a call to server `i` (`None`: a multi-key call over `servers` servers).
    #[inline(always)]
    pub(crate) fn span(&self, op: CallOp) -> CallSpan {
        let _ = op;
        CallSpan(
            #[cfg(feature = "tracing")]
            tracing::debug_span!(
                target: "mcstore",
                "mcstore.call",
                op = op_name(op.kind, op.server.is_none()),
                server = op.server.map_or("", |i| self.labels[i].as_str()),
                servers = op.servers,
                protocol = ?op.protocol,
                keys = op.keys,
                value_bytes = op.value_bytes,
                outcome = tracing::field::Empty,
            ),
        )
    }
}

/// What a call's span describes.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "tracing"), allow(dead_code))]
pub(crate) struct CallOp {
    pub(crate) kind: Kind,
    /// The server of a single-server call; `None` for a multi-key call.
    pub(crate) server: Option<usize>,
    pub(crate) servers: usize,
    pub(crate) protocol: crate::proto::Protocol,
    pub(crate) keys: usize,
    /// Value bytes sent (stores).
    pub(crate) value_bytes: usize,
}

/// A call's span (nothing without the `tracing` feature).
pub(crate) struct CallSpan(#[cfg(feature = "tracing")] tracing::Span);

impl CallSpan {
    /// Runs `f` inside the span, then records its outcome (`ok` or the error's kind).
    #[inline(always)]
    pub(crate) fn run<T>(
        &self,
        f: impl FnOnce() -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        #[cfg(feature = "tracing")]
        {
            let _entered = self.0.enter();
            let r = f();
            if !self.0.is_disabled() {
                let outcome = match &r {
                    Ok(_) => "ok",
                    Err(e) => outcome_name(e),
                };
                self.0.record("outcome", outcome);
            }
            r
        }
        #[cfg(not(feature = "tracing"))]
        f()
    }
}

#[cfg(feature = "tracing")]
fn outcome_name(e: &crate::error::Error) -> &'static str {
    use crate::error::Error;
    match e {
        Error::Io { .. } => "io",
        Error::Timeout { .. } => "timeout",
        Error::Parse { .. } => "parse",
        Error::Server { .. } => "server",
        Error::ServerDown { .. } => "server_down",
        Error::Partial { .. } => "partial",
        #[cfg(feature = "tls")]
        Error::Tls { .. } => "tls",
        _ => "error",
    }
}

#[cfg(feature = "metrics")]
fn server_metrics(label: &str) -> ServerMetrics {
    let s = SharedString::from(std::sync::Arc::<str>::from(label));
    let one = |name: &'static str| counter!(name, "server" => s.clone());
    let error = |kind: &'static str| counter!("mcstore_errors_total", "server" => s.clone(), "kind" => kind);
    ServerMetrics {
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
        errors: [
            error("io"),
            error("timeout"),
            error("parse"),
            error("server"),
            error("tls"),
        ],
        connects: one("mcstore_connects_total"),
        reconnects: one("mcstore_reconnects_total"),
        ejections: one("mcstore_ejections_total"),
        rejoins: one("mcstore_rejoins_total"),
        breaker: gauge!("mcstore_breaker_state", "server" => s.clone()),
        bytes_read: one("mcstore_bytes_read_total"),
        bytes_written: one("mcstore_bytes_written_total"),
        bytes_seen: (0, 0),
    }
}

/// A shared client's engine's handles for one server: its queue and rounds (nothing without
/// the `metrics` feature).
pub(crate) struct EngineMetrics {
    #[cfg(feature = "metrics")]
    in_flight: metrics::Gauge,
    #[cfg(feature = "metrics")]
    rounds: metrics::Gauge,
    #[cfg(feature = "metrics")]
    batch: Histogram,
    #[cfg(feature = "metrics")]
    queued: Histogram,
}

impl EngineMetrics {
    pub(crate) fn new(label: &str) -> EngineMetrics {
        let _ = label;
        #[cfg(feature = "metrics")]
        let s = SharedString::from(std::sync::Arc::<str>::from(label));
        EngineMetrics {
            #[cfg(feature = "metrics")]
            in_flight: gauge!("mcstore_shared_in_flight", "server" => s.clone()),
            #[cfg(feature = "metrics")]
            rounds: gauge!("mcstore_shared_rounds_in_flight", "server" => s.clone()),
            #[cfg(feature = "metrics")]
            batch: histogram!("mcstore_shared_batch_size", "server" => s.clone()),
            #[cfg(feature = "metrics")]
            queued: histogram!("mcstore_shared_queued_seconds", "server" => s),
        }
    }

    /// Requests queued or on the wire now.
    #[inline(always)]
    pub(crate) fn in_flight(&self, n: usize) {
        let _ = n;
        #[cfg(feature = "metrics")]
        self.in_flight.set(n as f64);
    }

    /// A round of `requests` goes on the wire (`delta` 1) or came back (-1).
    #[inline(always)]
    pub(crate) fn round(&self, delta: i8, requests: usize) {
        let _ = (delta, requests);
        #[cfg(feature = "metrics")]
        {
            if delta > 0 {
                self.rounds.increment(1.0);
                self.batch.record(requests as f64);
            } else {
                self.rounds.decrement(1.0);
            }
        }
    }

    /// Whether [`queued`](Self::queued) records anything (it needs a clock read).
    pub(crate) const ON: bool = cfg!(feature = "metrics");

    /// A request waited `waited` from its call's start until its round was written.
    #[inline(always)]
    pub(crate) fn queued(&self, waited: std::time::Duration) {
        let _ = waited;
        #[cfg(feature = "metrics")]
        self.queued.record(waited.as_secs_f64());
    }
}

/// A `MemcacheStorage` event (`name` is the whole metric name).
#[inline(always)]
pub(crate) fn storage(name: &'static str, n: u64) {
    let _ = (name, n);
    #[cfg(feature = "metrics")]
    counter!(name).increment(n);
}

/// The storage's failed invalidations awaiting replay.
#[inline(always)]
pub(crate) fn pending(n: usize) {
    let _ = n;
    #[cfg(feature = "metrics")]
    gauge!("mcstore_storage_pending_invalidations").set(n as f64);
}

/// A storage replay deleted `keys` failed invalidations.
#[inline(always)]
pub(crate) fn replayed(keys: u64) {
    let _ = keys;
    #[cfg(feature = "tracing")]
    tracing::info!(target: "mcstore", keys, "replayed failed invalidations");
}

/// A fleet event on server `server` (`name` is the whole metric name): a failover away from
/// it, a hedge because it was slow, a hedge that won on it, a repair recorded for it.
#[inline(always)]
pub(crate) fn fleet(name: &'static str, server: &str) {
    let _ = (name, server);
    #[cfg(feature = "metrics")]
    counter!(name, "server" => server.to_string()).increment(1);
}

/// A discovery source's list changed (`servers` in it now).
#[cold]
pub(crate) fn discovery_changed(source: &str, servers: usize) {
    let _ = (source, servers);
    #[cfg(feature = "tracing")]
    tracing::info!(target: "mcstore", source, servers, "server list changed");
    #[cfg(feature = "metrics")]
    counter!("mcstore_discovery_changes_total", "source" => source.to_string()).increment(1);
}

/// A discovery source failed; the last good list stays.
#[cold]
pub(crate) fn discovery_failed(source: &str, error: &crate::Error) {
    let _ = (source, error);
    #[cfg(feature = "tracing")]
    tracing::warn!(target: "mcstore", source, error = %error, "server discovery failed; keeping the last list");
    #[cfg(feature = "metrics")]
    counter!("mcstore_discovery_failures_total", "source" => source.to_string()).increment(1);
}

/// A live server list took a new generation (`added` and `removed` servers).
#[cold]
pub(crate) fn list_changed(generation: u64, added: &[String], removed: &[String]) {
    let _ = (generation, added, removed);
    #[cfg(feature = "tracing")]
    tracing::info!(target: "mcstore", generation, added = ?added, removed = ?removed, "server list swapped");
    #[cfg(feature = "metrics")]
    counter!("mcstore_list_changes_total").increment(1);
}
