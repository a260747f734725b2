//! Wake-ups at a given time for async calls that have one (a hedge): one thread per shared
//! client, started on first need, asleep while nothing is due. Its resolution is
//! [`GRANULE`]: a wake-up may come that much late, so that a busy client does not wake the
//! thread for every call. A blocking caller needs none of this: it parks until its own time.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::engine::lock;

/// How late a wake-up may be.
pub(super) const GRANULE: Duration = Duration::from_micros(500);

struct Entry {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Earliest first (a max-heap of reversed times).
    fn cmp(&self, o: &Self) -> CmpOrdering {
        o.at.cmp(&self.at)
    }
}

#[derive(Default)]
struct State {
    due: BinaryHeap<Entry>,
    running: bool,
    /// The thread is waiting on the condvar ...
    waiting: bool,
    /// ... until then (`None`: until woken).
    sleeping_until: Option<Instant>,
    shutdown: bool,
}

#[derive(Default)]
pub(super) struct Timers {
    state: Mutex<State>,
    cv: Condvar,
}

impl Timers {
    /// Wakes `waker` at `at` (or up to [`GRANULE`] later). Entries are never withdrawn: a
    /// call that ended meanwhile gets a wake it ignores.
    pub(super) fn wake_at(self: &Arc<Self>, at: Instant, waker: &Waker) {
        let mut st = lock(&self.state);
        if st.shutdown {
            waker.wake_by_ref();
            return;
        }
        st.due.push(Entry {
            at,
            waker: waker.clone(),
        });
        if !st.running {
            st.running = true;
            let timers = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("mcstore-timer".into())
                .spawn(move || timers.run());
            if spawned.is_err() {
                // No thread: wake now, the caller polls again (and hedges at once).
                st.running = false;
                st.due.clear();
                waker.wake_by_ref();
            }
            return;
        }
        let earlier = st.waiting && st.sleeping_until.is_none_or(|until| at + GRANULE < until);
        if earlier {
            self.cv.notify_one();
        }
    }

    /// Ends the thread (the client is gone).
    pub(super) fn shutdown(&self) {
        let mut st = lock(&self.state);
        st.shutdown = true;
        let due = std::mem::take(&mut st.due);
        drop(st);
        self.cv.notify_one();
        for e in due {
            e.waker.wake();
        }
    }

    fn run(&self) {
        let mut ready = Vec::new();
        let mut st = lock(&self.state);
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            // Never early: a call woken before its time would not ask again.
            while st.due.peek().is_some_and(|e| e.at <= now) {
                ready.push(st.due.pop().expect("peeked").waker);
            }
            if !ready.is_empty() {
                drop(st);
                for w in ready.drain(..) {
                    w.wake();
                }
                st = lock(&self.state);
                continue;
            }
            st.sleeping_until = st.due.peek().map(|e| e.at.max(now + GRANULE));
            st.waiting = true;
            st = match st.sleeping_until {
                Some(until) => {
                    self.cv
                        .wait_timeout(st, until.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
            st.waiting = false;
            st.sleeping_until = None;
        }
    }
}
