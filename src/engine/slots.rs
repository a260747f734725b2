//! Per-server state shared by every client of one server list, for a list that grows while
//! it is read: a server's slot is made the first time the list names it and keeps its index
//! for the list's life, so an index held across a list change still means the same server.
//!
//! Slots come in chunks made on first use and never moved, so a reader takes no lock and
//! a new server never copies the others' state.

use std::sync::OnceLock;

/// Servers per chunk.
const CHUNK: usize = 64;
/// Chunks at most: 65,536 distinct servers over a list's life.
const CHUNKS: usize = 1024;

/// The most distinct servers a live list may name over its life (see
/// [`ServerList`](crate::ServerList)).
pub(crate) const MAX_SLOTS: usize = CHUNK * CHUNKS;

/// A lock-free table of `T` per server slot, each made with `T::default()` on first use.
pub(crate) struct Slots<T> {
    chunks: Box<[OnceLock<Box<[T]>>]>,
}

impl<T: Default> Slots<T> {
    pub(crate) fn new() -> Slots<T> {
        Slots {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Slot `i` (below [`MAX_SLOTS`]).
    #[inline]
    pub(crate) fn get(&self, i: usize) -> &T {
        let chunk =
            self.chunks[i / CHUNK].get_or_init(|| (0..CHUNK).map(|_| T::default()).collect());
        &chunk[i % CHUNK]
    }
}

impl<T: Default> std::ops::Index<usize> for Slots<T> {
    type Output = T;

    #[inline]
    fn index(&self, i: usize) -> &T {
        self.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn slots_start_at_default_and_keep_their_state() {
        let s: Slots<AtomicU32> = Slots::new();
        s[3].store(7, Ordering::Relaxed);
        s[MAX_SLOTS - 1].store(9, Ordering::Relaxed);
        assert_eq!(s[3].load(Ordering::Relaxed), 7);
        assert_eq!(s[64].load(Ordering::Relaxed), 0);
        assert_eq!(s[MAX_SLOTS - 1].load(Ordering::Relaxed), 9);
    }
}
