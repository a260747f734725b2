//! A server's recent latency: a small histogram of atomic counters (half-octave buckets from
//! 1 µs), halved every few thousand samples so that it follows the server, with its
//! percentiles recomputed every 64 samples and read with one atomic load. Recording takes
//! no lock; concurrent recorders may lose a count now and then, which a percentile does not
//! notice.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Buckets: bucket `b` holds latencies in [edge(b), edge(b + 1)), `edge(b)` = 1 µs * 2^(b/2).
const BUCKETS: usize = 64;
/// Samples before the percentiles mean anything.
const MIN_SAMPLES: u32 = 32;
/// Percentiles are recomputed every this many samples.
const RECOMPUTE: u32 = 64;
/// The histogram is halved every this many samples (older samples weigh less).
const DECAY: u32 = 4096;

pub(crate) struct Latency {
    buckets: [AtomicU32; BUCKETS],
    samples: AtomicU32,
    /// Percentile cache: (percentile * 100) in the high 16 bits, nanoseconds in the low 48
    /// (0: not known yet).
    cached: AtomicU64,
    /// The median in nanoseconds (0: not known yet).
    median: AtomicU64,
    /// The percentile the cache is for, as percent * 100 (set by the first reader).
    wanted: AtomicU32,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            samples: AtomicU32::new(0),
            cached: AtomicU64::new(0),
            median: AtomicU64::new(0),
            wanted: AtomicU32::new(9500),
        }
    }
}

fn bucket(d: Duration) -> usize {
    let ns = d.as_nanos().clamp(1000, u128::from(u64::MAX)) as u64;
    let us2 = ns / 1000; // >= 1
    let b = 63 - us2.leading_zeros() as usize; // floor(log2)
    let half = if b > 0 {
        ((us2 >> (b - 1)) & 1) as usize
    } else {
        0
    };
    (2 * b + half).min(BUCKETS - 1)
}

/// The upper edge of bucket `b` (what a percentile in it reports: never too early a hedge).
fn upper(b: usize) -> Duration {
    let b = b + 1;
    let base = 1u64 << (b / 2);
    let us = if b % 2 == 1 { base + base / 2 } else { base };
    Duration::from_micros(us)
}

impl Latency {
    /// Records one answered request.
    pub(crate) fn record(&self, d: Duration) {
        self.buckets[bucket(d)].fetch_add(1, Ordering::Relaxed);
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n % RECOMPUTE == 0 {
            self.recompute(n);
        }
    }

    #[cold]
    fn recompute(&self, n: u32) {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|b| self.buckets[b].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if n % DECAY == 0 {
            for b in &self.buckets {
                let v = b.load(Ordering::Relaxed);
                b.fetch_sub(v / 2, Ordering::Relaxed);
            }
        }
        if total < u64::from(MIN_SAMPLES) {
            return;
        }
        let at = |p: f64| -> u64 {
            let want = ((total as f64) * p / 100.0).ceil().max(1.0) as u64;
            let mut seen = 0u64;
            for (b, &c) in counts.iter().enumerate() {
                seen += u64::from(c);
                if seen >= want {
                    return upper(b).as_nanos() as u64;
                }
            }
            upper(BUCKETS - 1).as_nanos() as u64
        };
        let wanted = self.wanted.load(Ordering::Relaxed);
        let ns = at(f64::from(wanted) / 100.0).min((1 << 48) - 1);
        self.cached
            .store((u64::from(wanted) << 48) | ns, Ordering::Relaxed);
        self.median.store(at(50.0), Ordering::Relaxed);
    }

    /// The `p`-th percentile of recent latency; `None` until there are enough samples.
    pub(crate) fn percentile(&self, p: f64) -> Option<Duration> {
        let want = (p * 100.0) as u32;
        let c = self.cached.load(Ordering::Relaxed);
        if (c >> 48) as u32 != want {
            // Another percentile than cached: from now on this one is kept.
            self.wanted.store(want, Ordering::Relaxed);
            return None;
        }
        let ns = c & ((1 << 48) - 1);
        (ns != 0).then(|| Duration::from_nanos(ns))
    }

    /// The recent median; `None` until there are enough samples.
    pub(crate) fn median(&self) -> Option<Duration> {
        let ns = self.median.load(Ordering::Relaxed);
        (ns != 0).then(|| Duration::from_nanos(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_half_octaves() {
        assert_eq!(bucket(Duration::from_nanos(10)), 0);
        assert_eq!(bucket(Duration::from_micros(1)), 0);
        assert_eq!(bucket(Duration::from_micros(2)), 2);
        assert_eq!(bucket(Duration::from_micros(3)), 3);
        assert_eq!(bucket(Duration::from_micros(4)), 4);
        assert_eq!(bucket(Duration::from_micros(6)), 5);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        for b in 1..BUCKETS - 1 {
            // Every bucket's upper edge lands in the next one (bucket 1, [1.5, 2) µs, is
            // never used: latencies are bucketed in whole microseconds).
            assert_eq!(bucket(upper(b)), b + 1, "{b}");
        }
    }

    #[test]
    fn percentiles_follow_samples() {
        let l = Latency::default();
        assert_eq!(l.percentile(95.0), None);
        for i in 0..1000u64 {
            // 95% at 100 µs, 5% at 10 ms.
            let d = if i % 20 == 0 { 10_000 } else { 100 };
            l.record(Duration::from_micros(d));
        }
        let p95 = l.percentile(95.0).unwrap();
        assert!(
            p95 >= Duration::from_micros(100) && p95 < Duration::from_micros(200),
            "{p95:?}"
        );
        let med = l.median().unwrap();
        assert!(med >= Duration::from_micros(100) && med < Duration::from_micros(200));
        // Another percentile is picked up at the next recompute.
        assert_eq!(l.percentile(99.0), None);
        for _ in 0..64 {
            l.record(Duration::from_micros(100));
        }
        let p99 = l.percentile(99.0).unwrap();
        assert!(p99 >= Duration::from_millis(10), "{p99:?}");
        // A server that slows down is followed within a few decays.
        for _ in 0..20_000 {
            l.record(Duration::from_millis(2));
        }
        assert!(l.median().unwrap() >= Duration::from_millis(2));
    }
}
