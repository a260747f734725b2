//! What the storages over memcached show: their counters (also as `metrics`) and their
//! `Debug`. The `pub(super)` items are shared with [`MemcacheOnlyStorage`].
//!
//! [`MemcacheOnlyStorage`]: crate::storage::MemcacheOnlyStorage

use std::sync::atomic::{AtomicU64, Ordering};

/// What the cache did, for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageCounters {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that missed the cache.
    pub misses: u64,
    /// Cache calls that failed (absorbed: the master served or took the call).
    pub cache_errors: u64,
    /// Reads that went to the master.
    pub master_reads: u64,
    /// Values stored in the cache by readers after a miss.
    pub fills: u64,
    /// Reads that found another reader filling and waited for it.
    pub fill_waits: u64,
    /// Calls that skipped the cache: an invalidation of their key was pending, or the key
    /// generator made no valid cache key of their names.
    pub bypassed: u64,
    /// Failed invalidations a replay has since deleted (this process's, and the master's
    /// log's, which may hold other processes' records).
    pub replayed: u64,
    /// Pipelined delete batches replays sent (each of at most 1,000 keys).
    pub replay_batches: u64,
    /// Fills that stored compressed content (a subset of `fills`).
    pub compressed_fills: u64,
    /// Bytes compression kept out of the cache, over all compressed fills.
    pub bytes_saved: u64,
    /// Fills that stored content as chunks (a subset of `fills`).
    pub chunked_fills: u64,
    /// Hits served from chunks (a subset of `hits`).
    pub chunked_hits: u64,
}

impl StorageCounters {
    /// Hits over reads that looked in the cache (`hits / (hits + misses)`), 0 before any.
    pub fn hit_ratio(&self) -> f64 {
        let looked = self.hits + self.misses;
        if looked == 0 {
            0.0
        } else {
            self.hits as f64 / looked as f64
        }
    }
}

/// Counts one event, in the storage's counters and as metric `name`.
pub(super) fn bump(c: &AtomicU64, name: &'static str) {
    crate::observe::storage(name, 1);
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the storages over memcached and the builder show: the pool and the TTL.
pub(super) fn fmt_settings(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    pool: &dyn std::fmt::Debug,
    ttl: u32,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("pool", pool)
        .field("ttl", &ttl)
        .finish_non_exhaustive()
}
