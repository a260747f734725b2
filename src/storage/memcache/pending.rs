//! This process's record of failed invalidations, until a replay deletes them.

use std::collections::HashMap;
use std::time::Instant;

/// Failed invalidations awaiting a replay. Every failure gets a new generation, so a replay
/// clears only the records it replayed: a failure recorded for the same key while the replay
/// was under way stays (no ABA). Past `max` records, the server whose invalidation failed is
/// *overflowed*: its cache is distrusted until a flush of that server succeeds (and only that
/// server is flushed: healthy servers are never wiped because another one is down). A failure
/// that names no server overflows them all.
#[derive(Default)]
pub(super) struct Pending {
    /// Each key's latest failure: its generation and the server that failed.
    keys: HashMap<String, (u64, Option<String>)>,
    /// Overflowed servers (`None`: all) and the generation of their latest failure since.
    overflow: HashMap<Option<String>, u64>,
    /// Distrusted servers whose flush must not start before the given time (a server that
    /// took keys in a list change: see `storage::memcache`, "Live server lists").
    flush_after: HashMap<String, Instant>,
    next_gen: u64,
    /// When a caller last replayed (without a replay thread).
    pub(super) last_replay: Option<Instant>,
}

/// What a replay is to do: flush overflowed servers, or replay records.
pub(super) enum Replay {
    /// Records: key, generation, the server that failed.
    Keys(Vec<(String, u64, Option<String>)>),
    Flush(Vec<(Option<String>, u64)>),
}

impl Pending {
    /// Records a failed invalidation of `key` on `server` (`None`: unknown); past `max`
    /// records, overflows that server.
    pub(super) fn record(&mut self, key: String, server: Option<&str>, max: usize) {
        self.next_gen += 1;
        let gen = self.next_gen;
        if let Some(all) = self.overflow.get_mut(&None) {
            *all = gen;
            return;
        }
        let server = server.map(str::to_string);
        if self.overflow.contains_key(&server) || self.keys.len() >= max {
            // Its flush will cover its keys.
            match &server {
                Some(_) => self.keys.retain(|_, (_, s)| *s != server),
                None => self.keys.clear(),
            }
            self.overflow.insert(server, gen);
        } else {
            // A key that failed on two servers (two copies, or its own server and a
            // stand-in) names none: no one server's flush covers it, only its replay does.
            let server = match self.keys.get(&key) {
                Some((_, had)) if *had != server => None,
                _ => server,
            };
            self.keys.insert(key, (gen, server));
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.overflow.is_empty()
    }

    /// Whether `key` (on server `server`, if known) must not be read from the cache.
    pub(super) fn distrusts(&self, key: &str, server: impl FnOnce() -> Option<String>) -> bool {
        if self.keys.contains_key(key) || self.overflow.contains_key(&None) {
            return true;
        }
        // Only when a server overflowed: finding the key's server costs a hash.
        !self.overflow.is_empty() && server().is_none_or(|s| self.overflow.contains_key(&Some(s)))
    }

    /// The next replay: the overflowed servers' flushes (those whose time has come), or up
    /// to `batch` keys.
    pub(super) fn take(&self, batch: usize) -> Replay {
        let now = Instant::now();
        let due = |s: &Option<String>| {
            s.as_ref()
                .and_then(|s| self.flush_after.get(s))
                .is_none_or(|t| *t <= now)
        };
        if self.overflow.keys().any(due) {
            return Replay::Flush(
                (self.overflow.iter())
                    .filter(|(s, _)| due(s))
                    .map(|(s, g)| (s.clone(), *g))
                    .collect(),
            );
        }
        Replay::Keys(
            self.keys
                .iter()
                .take(batch)
                .map(|(k, (g, s))| (k.clone(), *g, s.clone()))
                .collect(),
        )
    }

    /// The invalidation of `key` recorded at `gen` was replayed.
    pub(super) fn replayed(&mut self, key: &str, gen: u64) {
        if self.keys.get(key).is_some_and(|(g, _)| *g == gen) {
            self.keys.remove(key);
        }
    }

    /// `server` may hold entries that were not invalidated (it was out of the ring while they
    /// were written, or a key of a failed invalidation has moved off it): it is distrusted
    /// until a flush of it succeeds.
    pub(super) fn distrust_server(&mut self, server: String) {
        self.next_gen += 1;
        self.overflow.insert(Some(server), self.next_gen);
    }

    /// [`distrust_server`](Self::distrust_server), flushed no sooner than `after` (and
    /// not before a flush already waiting for a later time).
    pub(super) fn distrust_server_until(&mut self, server: String, after: Instant) {
        let t = self.flush_after.entry(server.clone()).or_insert(after);
        *t = (*t).max(after);
        self.distrust_server(server);
    }

    /// `server` left the list: it is not flushed (a server that comes back to the list is
    /// distrusted again until flushed), and no replay waits for its flush.
    pub(super) fn forget_server(&mut self, server: &str) {
        self.overflow.retain(|s, _| s.as_deref() != Some(server));
        self.flush_after.remove(server);
    }

    /// A flush of `server` (`None`: all) taken at generation `gen` succeeded.
    pub(super) fn flushed(&mut self, server: &Option<String>, gen: u64) {
        if self.overflow.get(server) == Some(&gen) {
            self.overflow.remove(server);
            if let Some(s) = server {
                self.flush_after.remove(s);
            }
        }
    }

    /// Records and overflowed servers.
    pub(super) fn len(&self) -> usize {
        self.keys.len() + self.overflow.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{Pending, Replay};

    /// #16, scenario 4: a failure recorded for a key while its replay is under way survives
    /// the replay (before, the replay cleared the key by name and erased it).
    #[test]
    fn a_replay_never_erases_a_newer_failure() {
        let mut p = Pending::default();
        p.record("k".into(), Some("a"), 10);
        let Replay::Keys(taken) = p.take(10) else {
            panic!("no overflow")
        };
        p.record("k".into(), Some("a"), 10); // a writer fails again while the replay runs
        for (k, gen, _) in taken {
            p.replayed(&k, gen);
        }
        assert!(
            p.distrusts("k", || None),
            "the newer failure must be replayed too"
        );
        let Replay::Keys(taken) = p.take(10) else {
            panic!("no overflow")
        };
        for (k, gen, _) in taken {
            p.replayed(&k, gen);
        }
        assert!(p.is_empty());
    }

    /// A key whose invalidation failed on two copies stays distrusted when one of them
    /// overflows (that server's flush does not clean the other copy).
    #[test]
    fn a_key_failed_on_two_copies_survives_one_overflow() {
        let mut p = Pending::default();
        p.record("k".into(), Some("a"), 3);
        p.record("k".into(), Some("b"), 3);
        p.record("b1".into(), Some("b"), 3);
        p.record("b2".into(), Some("b"), 3);
        p.record("b3".into(), Some("b"), 3); // past the bound: b overflows
        assert!(p.distrusts("k", || Some("a".into())), "k failed on a too");
        let Replay::Flush(_) = p.take(10) else {
            panic!("overflowed")
        };
    }

    /// The same for an overflow: a failure during the flush keeps the server distrusted.
    #[test]
    fn a_flush_never_erases_a_newer_overflow() {
        let mut p = Pending::default();
        for k in ["a", "b", "c"] {
            p.record(k.into(), Some("s1"), 2);
        }
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("overflowed")
        };
        p.record("d".into(), Some("s1"), 2);
        for (server, gen) in &flushes {
            p.flushed(server, *gen);
        }
        assert!(p.distrusts("x", || Some("s1".into())));
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("still overflowed")
        };
        for (server, gen) in &flushes {
            p.flushed(server, *gen);
        }
        assert!(p.is_empty() && !p.distrusts("d", || Some("s1".into())));
    }

    /// #16, scenario 6: an overflow on one server distrusts and flushes that server only; a
    /// failure that names no server overflows all of them.
    #[test]
    fn an_overflow_is_per_server() {
        let mut p = Pending::default();
        p.record("a1".into(), Some("a"), 2);
        p.record("b1".into(), Some("b"), 2);
        p.record("b2".into(), Some("b"), 2); // past the bound: b overflows
        assert!(p.distrusts("x", || Some("b".into())));
        assert!(!p.distrusts("x", || Some("a".into())));
        assert!(p.distrusts("a1", || Some("a".into())), "a's record stays");
        let Replay::Flush(flushes) = p.take(10) else {
            panic!("overflowed")
        };
        assert_eq!(flushes.len(), 1);
        assert_eq!(flushes[0].0.as_deref(), Some("b"));
        p.record("k1".into(), None, 2);
        assert!(
            !p.distrusts("x", || Some("a".into())),
            "a record, below the bound"
        );
        p.record("k2".into(), None, 2); // past the bound, no server named: all overflow
        assert!(p.distrusts("x", || Some("a".into())));
    }
}
