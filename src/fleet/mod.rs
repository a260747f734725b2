//! The fleet: who serves a key when it lives on several servers. Sits between the commands
//! and the engine, shared by every front.
//!
//! - [`FleetPolicy`]: how many copies a key has ([`ClientBuilder::replicas`]), where they
//!   live, what a write waits for ([`WritePolicy`]) and when a read is hedged ([`Hedge`]).
//! - [`FleetShared`]: what every client of one pool or shared client knows about the fleet:
//!   each server's recent latency ([`latency`]), the copies that missed a write and must be
//!   repaired before they serve that key ([`repair`]), the hedge budget and the counters.
//! - [`plan`]: the decisions, without I/O: the order a read tries a key's servers in, and
//!   what each kind of write sends where and returns.
//!
//! With one copy (the default) none of this runs: a call costs what it did before.
//!
//! [`ClientBuilder::replicas`]: crate::ClientBuilder::replicas

pub(crate) mod discovery;
pub(crate) mod latency;
pub(crate) mod live;
pub(crate) mod plan;
pub(crate) mod repair;
pub(crate) mod zones;

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::slots::Slots;
use crate::observe;
use crate::ring::ReplicaPlacement;
use latency::Latency;
use repair::Repairs;
use zones::Zones;

/// What a replicated write waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritePolicy {
    /// Every copy must confirm (the default): a copy that fails, times out or is marked down
    /// fails the call, after the others were written. The failed copy is remembered and
    /// deleted before it serves that key again.
    #[default]
    All,
    /// The first copy to confirm answers the call, without waiting for copies that look
    /// stuck. A [`SharedClient`](crate::SharedClient) waits for the others while they answer
    /// in about their usual time, and answers as soon as every copy left has had a request
    /// on the wire far longer than usual (4x its median latency, 2 ms at least); a copy given
    /// up on, or that fails, is remembered and repaired as with [`All`](Self::All) (deleted
    /// there: it loses the key rather than keep an old value). A [`Client`](crate::Client)
    /// sends every copy its part at once and reads every reply (within its I/O timeout);
    /// the call succeeds if one copy confirmed.
    Any,
}

/// When a read is sent to a second copy too ([`ClientBuilder::hedge`]): after a fixed delay
/// or a percentile of the first server's recent latency, within a budget of extra requests.
///
/// [`ClientBuilder::hedge`]: crate::ClientBuilder::hedge
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedge {
    pub(crate) after: HedgeAfter,
    /// Extra requests allowed, as a share of reads (0.05: 5%).
    pub(crate) budget: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum HedgeAfter {
    Fixed(Duration),
    /// A percentile (0-100) of the server's recent latency.
    Percentile(f64),
}

/// The delay before a hedge while a server has too few samples for a percentile.
pub(crate) const HEDGE_DEFAULT: Duration = Duration::from_millis(5);
/// Never hedge sooner than this: below it a hedge only doubles the load.
pub(crate) const HEDGE_FLOOR: Duration = Duration::from_micros(200);
/// Burst of hedges the budget allows on top of its share.
const BUDGET_BURST: i64 = 10;
/// Budget tokens per hedge.
const TOKEN: i64 = 1000;

impl Hedge {
    /// Hedge a read not answered after `d`.
    pub fn after(d: Duration) -> Hedge {
        Hedge {
            after: HedgeAfter::Fixed(d),
            budget: 0.05,
        }
    }

    /// Hedge a read not answered after the `p`-th percentile (0-100, e.g. 95) of its
    /// server's recent latency (5 ms until the server has enough samples; never under
    /// 200 µs).
    pub fn percentile(p: f64) -> Hedge {
        Hedge {
            after: HedgeAfter::Percentile(p.clamp(1.0, 99.99)),
            budget: 0.05,
        }
    }

    /// At most this share of extra requests (default 0.05: 5%), with a burst of 10.
    pub fn budget(mut self, share: f64) -> Hedge {
        self.budget = share.clamp(0.0, 1.0);
        self
    }
}

impl FromStr for Hedge {
    type Err = String;

    /// `pNN` (a percentile, e.g. `p95` or `p99.9`) or a delay in milliseconds (`5`, `5ms`,
    /// `0.5ms`).
    fn from_str(s: &str) -> Result<Hedge, String> {
        let bad = || format!("{s:?}: a hedge is pNN (e.g. p95) or a delay in ms (e.g. 5ms)");
        if let Some(p) = s.strip_prefix('p') {
            let p: f64 = p.parse().map_err(|_| bad())?;
            if !(0.0..100.0).contains(&p) {
                return Err(bad());
            }
            return Ok(Hedge::percentile(p));
        }
        let ms: f64 = s
            .strip_suffix("ms")
            .unwrap_or(s)
            .parse()
            .map_err(|_| bad())?;
        let d = Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| bad())?;
        Ok(Hedge::after(d))
    }
}

/// How a client spreads and reads copies, as built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FleetPolicy {
    pub(crate) replicas: usize,
    pub(crate) placement: ReplicaPlacement,
    pub(crate) write: WritePolicy,
    pub(crate) hedge: Option<Hedge>,
    /// Servers are in zones (`replicas` copies in each).
    pub(crate) zoned: bool,
    /// A read that misses on a copy asks the next one too.
    pub(crate) miss_failover: bool,
    /// Keys have more than one copy (`replicas > 1` or zones), set when the client is
    /// built: the hot path tests one flag.
    pub(crate) spread: bool,
}

impl Default for FleetPolicy {
    fn default() -> Self {
        FleetPolicy {
            replicas: 1,
            placement: ReplicaPlacement::Natural,
            write: WritePolicy::All,
            hedge: None,
            zoned: false,
            miss_failover: false,
            spread: false,
        }
    }
}

impl FleetPolicy {
    /// Whether keys have more than one copy (the fleet layer runs at all).
    #[inline]
    pub(crate) fn replicated(&self) -> bool {
        self.spread
    }
}

/// What the fleet layer did, for a client and every client sharing its fleet (a pool's, a
/// shared client's engines): [`Client::fleet_counters`](crate::Client::fleet_counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounters {
    /// Reads that got their answer from another copy after one failed or was down.
    pub failovers: u64,
    /// Reads sent to a second copy because the first was slow.
    pub hedges_sent: u64,
    /// Of those, the hedge answered first.
    pub hedges_won: u64,
    /// Hedges not sent because the budget was spent.
    pub hedges_refused: u64,
    /// Copies that missed a write and were remembered for repair.
    pub repairs_recorded: u64,
    /// Of those, copies repaired (the key deleted there, or the server flushed).
    pub repairs_done: u64,
}

/// A zone as a client sees it ([`Client::zones`](crate::Client::zones)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneInfo {
    /// Its name.
    pub name: String,
    /// Its servers, as configured.
    pub servers: Vec<String>,
    /// Written to and never read from (warming up).
    pub write_only: bool,
}

/// The fleet state shared by the clients of one pool or shared client.
pub(crate) struct FleetShared {
    /// The servers by index (metric labels); a live list adds to them.
    labels: arc_swap::ArcSwap<Vec<String>>,
    pub(crate) latency: Slots<Latency>,
    pub(crate) repairs: Repairs,
    /// The zones, if the servers are in zones.
    pub(crate) zones: Option<Zones>,
    /// Hedge tokens ([`TOKEN`] per hedge).
    budget: AtomicI64,
    failovers: AtomicU64,
    hedges_sent: AtomicU64,
    hedges_won: AtomicU64,
    hedges_refused: AtomicU64,
}

impl FleetShared {
    pub(crate) fn new(labels: &[String], zones: Option<Zones>) -> FleetShared {
        let servers = labels.len();
        FleetShared {
            labels: arc_swap::ArcSwap::from_pointee(labels.to_vec()),
            latency: Slots::new(),
            repairs: Repairs::new(servers),
            zones,
            budget: AtomicI64::new(BUDGET_BURST * TOKEN),
            failovers: AtomicU64::new(0),
            hedges_sent: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
            hedges_refused: AtomicU64::new(0),
        }
    }

    /// Makes room for the servers of `labels` (a live list added servers).
    pub(crate) fn grow(&self, labels: &[String]) {
        self.repairs.grow(labels.len());
        self.labels.store(std::sync::Arc::new(labels.to_vec()));
    }

    /// A read earns its share of a hedge.
    #[inline]
    pub(crate) fn earn(&self, hedge: &Hedge) {
        let share = (hedge.budget * TOKEN as f64) as i64;
        if self.budget.load(Ordering::Relaxed) < (BUDGET_BURST * TOKEN) {
            self.budget.fetch_add(share, Ordering::Relaxed);
        }
    }

    /// Takes a hedge from the budget for a read slow on server `slow`; `false` (counted) if
    /// it is spent.
    pub(crate) fn spend(&self, slow: usize) -> bool {
        let ok = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= TOKEN).then_some(t - TOKEN)
            })
            .is_ok();
        if ok {
            self.hedges_sent.fetch_add(1, Ordering::Relaxed);
            observe::fleet("mcstore_hedges_total", &self.labels.load()[slow]);
        } else {
            self.hedges_refused.fetch_add(1, Ordering::Relaxed);
            observe::fleet("mcstore_hedges_refused_total", &self.labels.load()[slow]);
        }
        ok
    }

    /// A hedge sent outside the budget: server `slow`, asked first, looks stuck.
    pub(crate) fn spend_free(&self, slow: usize) {
        self.hedges_sent.fetch_add(1, Ordering::Relaxed);
        observe::fleet("mcstore_hedges_total", &self.labels.load()[slow]);
    }

    /// A hedge answered first, from server `on`.
    pub(crate) fn hedge_won(&self, on: usize) {
        self.hedges_won.fetch_add(1, Ordering::Relaxed);
        observe::fleet("mcstore_hedges_won_total", &self.labels.load()[on]);
    }

    /// A read answered by server `on` after another copy failed.
    pub(crate) fn failover(&self, on: usize) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        observe::fleet("mcstore_failovers_total", &self.labels.load()[on]);
    }

    /// How long a read on server `i` waits before it is hedged.
    pub(crate) fn hedge_delay(&self, hedge: &Hedge, i: usize) -> Duration {
        match hedge.after {
            HedgeAfter::Fixed(d) => d,
            HedgeAfter::Percentile(p) => self.latency[i]
                .percentile(p)
                .unwrap_or(HEDGE_DEFAULT)
                .max(HEDGE_FLOOR),
        }
    }

    /// Marks zone `name` write-only (`on`) or readable again, for every client sharing
    /// this fleet.
    pub(crate) fn set_zone_write_only(&self, name: &str, on: bool) -> crate::Result<()> {
        let zone = self
            .zones
            .as_ref()
            .and_then(|z| z.find(name))
            .ok_or_else(|| crate::Error::Config(format!("no zone named {name:?}")))?;
        zone.set_write_only(on);
        Ok(())
    }

    /// The zones: name, servers (configuration order) and whether it is write-only.
    pub(crate) fn zones(&self) -> Vec<ZoneInfo> {
        let Some(zones) = &self.zones else {
            return Vec::new();
        };
        zones
            .list()
            .iter()
            .map(|z| ZoneInfo {
                name: z.name.clone(),
                servers: self.labels.load()[z.servers.clone()].to_vec(),
                write_only: z.is_write_only(),
            })
            .collect()
    }

    pub(crate) fn counters(&self) -> FleetCounters {
        let (recorded, done) = self.repairs.counts();
        FleetCounters {
            failovers: self.failovers.load(Ordering::Relaxed),
            hedges_sent: self.hedges_sent.load(Ordering::Relaxed),
            hedges_won: self.hedges_won.load(Ordering::Relaxed),
            hedges_refused: self.hedges_refused.load(Ordering::Relaxed),
            repairs_recorded: recorded,
            repairs_done: done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedge_parses() {
        assert_eq!(
            "p95".parse::<Hedge>().unwrap().after,
            HedgeAfter::Percentile(95.0)
        );
        assert_eq!(
            "5ms".parse::<Hedge>().unwrap().after,
            HedgeAfter::Fixed(Duration::from_millis(5))
        );
        assert_eq!(
            "0.5".parse::<Hedge>().unwrap().after,
            HedgeAfter::Fixed(Duration::from_micros(500))
        );
        for bad in ["p", "p100", "x", "-1ms", "ms"] {
            assert!(bad.parse::<Hedge>().is_err(), "{bad}");
        }
    }

    #[test]
    fn budget_allows_its_share() {
        let f = FleetShared::new(&["a".into(), "b".into()], None);
        let h = Hedge::percentile(95.0);
        // The burst first.
        let burst = (0..100).filter(|_| f.spend(0)).count();
        assert_eq!(burst, BUDGET_BURST as usize);
        // Then 5% of reads.
        let mut sent = 0;
        for _ in 0..1000 {
            f.earn(&h);
            sent += usize::from(f.spend(1));
        }
        assert_eq!(sent, 50);
        let c = f.counters();
        assert_eq!(c.hedges_sent, 60);
        assert_eq!(c.hedges_refused, 90 + 950);
    }
}
