//! Copies that missed a write. A copy of a key that failed a write (or was down for it) may
//! still hold an older value: it is remembered here, skipped by reads of that key, and
//! repaired (the key deleted there) before it serves the key again. A server that missed
//! more writes than are kept per server is marked to be flushed whole instead.
//!
//! A healthy fleet never takes the lock: one atomic load says nothing is pending.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Keys kept per server before the server is marked to be flushed instead.
pub(crate) const MAX_PER_SERVER: usize = 65_536;

/// What a repair does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Work {
    /// Delete this key on the server.
    Delete(usize, Box<[u8]>),
    /// Flush the whole server (it missed too many writes to list).
    Flush(usize),
}

struct State {
    keys: Vec<HashSet<Box<[u8]>>>,
    flush: Vec<bool>,
}

pub(crate) struct Repairs {
    /// Keys pending plus servers to flush: 0 means nothing to look up.
    pending: AtomicUsize,
    state: Mutex<State>,
    recorded: AtomicU64,
    done: AtomicU64,
}

impl Repairs {
    pub(crate) fn new(servers: usize) -> Repairs {
        Repairs {
            pending: AtomicUsize::new(0),
            state: Mutex::new(State {
                keys: vec![HashSet::new(); servers],
                flush: vec![false; servers],
            }),
            recorded: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    /// Makes room for servers up to index `n - 1` (a live list added servers).
    pub(crate) fn grow(&self, n: usize) {
        let mut st = self.lock();
        if st.keys.len() < n {
            st.keys.resize(n, HashSet::new());
            st.flush.resize(n, false);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anything at all is pending (one atomic load).
    #[inline]
    pub(crate) fn any(&self) -> bool {
        self.pending.load(Ordering::Acquire) != 0
    }

    /// Remembers that server `i` missed a write of `key`.
    pub(crate) fn record(&self, i: usize, key: &[u8]) {
        let mut st = self.lock();
        if st.flush[i] {
            return;
        }
        if st.keys[i].len() >= MAX_PER_SERVER {
            let dropped = st.keys[i].len();
            st.keys[i] = HashSet::new();
            st.flush[i] = true;
            self.pending.fetch_add(1, Ordering::AcqRel);
            self.pending.fetch_sub(dropped, Ordering::AcqRel);
        } else if st.keys[i].insert(key.into()) {
            self.pending.fetch_add(1, Ordering::AcqRel);
        } else {
            return;
        }
        drop(st);
        self.recorded.fetch_add(1, Ordering::Relaxed);
        crate::observe::storage("mcstore_repairs_recorded_total", 1);
    }

    /// Whether server `i` must not serve `key` until it is repaired.
    #[inline]
    pub(crate) fn blocks(&self, i: usize, key: &[u8]) -> bool {
        self.any() && self.blocks_slow(i, key)
    }

    #[cold]
    fn blocks_slow(&self, i: usize, key: &[u8]) -> bool {
        let st = self.lock();
        st.flush[i] || st.keys[i].contains(key)
    }

    /// Server `i` now holds the latest value of `key` (or none): a write there succeeded.
    /// A server waiting for a flush stays blocked.
    #[inline]
    pub(crate) fn clear(&self, i: usize, key: &[u8]) {
        if self.any() {
            self.clear_slow(i, key);
        }
    }

    #[cold]
    fn clear_slow(&self, i: usize, key: &[u8]) {
        let mut st = self.lock();
        if st.keys[i].remove(key) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            drop(st);
            self.done.fetch_add(1, Ordering::Relaxed);
            crate::observe::storage("mcstore_repairs_done_total", 1);
        }
    }

    /// A delete of `key` was sent to server `i` (a repair or a reconciliation): done, it
    /// holds nothing now; failed, it is remembered for repair.
    pub(crate) fn deleted(&self, i: usize, key: &[u8], ok: bool) {
        if ok {
            self.clear(i, key);
        } else {
            self.record(i, key);
        }
    }

    /// A repair done: `work` succeeded.
    pub(crate) fn done(&self, work: &Work) {
        match work {
            Work::Delete(i, key) => self.clear(*i, key),
            Work::Flush(i) => {
                let mut st = self.lock();
                if std::mem::take(&mut st.flush[*i]) {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    drop(st);
                    self.done.fetch_add(1, Ordering::Relaxed);
                    crate::observe::storage("mcstore_repairs_done_total", 1);
                }
            }
        }
    }

    /// Up to `max` repairs to try, skipping servers for which `skip(i)` (down ones).
    pub(crate) fn work(&self, max: usize, skip: impl Fn(usize) -> bool) -> Vec<Work> {
        if !self.any() {
            return Vec::new();
        }
        let st = self.lock();
        let mut out = Vec::new();
        for (i, keys) in st.keys.iter().enumerate() {
            // `skip` may take a server's probe: asked only of servers with work to do.
            if (keys.is_empty() && !st.flush[i]) || skip(i) {
                continue;
            }
            if st.flush[i] {
                out.push(Work::Flush(i));
                continue;
            }
            out.extend(
                keys.iter()
                    .take(max - out.len().min(max))
                    .map(|k| Work::Delete(i, k.clone())),
            );
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// (recorded, done) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.recorded.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_block_clear() {
        let r = Repairs::new(3);
        assert!(!r.any() && !r.blocks(1, b"k"));
        r.record(1, b"k");
        r.record(1, b"k");
        assert!(r.blocks(1, b"k") && !r.blocks(0, b"k") && !r.blocks(1, b"j"));
        assert_eq!(
            r.work(10, |_| false),
            vec![Work::Delete(1, b"k"[..].into())]
        );
        assert!(r.work(10, |i| i == 1).is_empty());
        r.clear(1, b"k");
        assert!(!r.any());
        assert_eq!(r.counts(), (1, 1));
    }

    #[test]
    fn too_many_means_flush() {
        let r = Repairs::new(2);
        for k in 0..=MAX_PER_SERVER {
            r.record(0, k.to_string().as_bytes());
        }
        assert!(r.blocks(0, b"anything"));
        assert_eq!(r.work(10, |_| false), vec![Work::Flush(0)]);
        r.done(&Work::Flush(0));
        assert!(!r.any() && !r.blocks(0, b"anything"));
    }
}
