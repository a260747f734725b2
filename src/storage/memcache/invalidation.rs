//! Writes and their invalidations: the master write, then the delete of the cache entry,
//! with the intent and failure records of the master's [`InvalidationLog`] around it; and the
//! replays of the deletes that failed, on the storage's own thread.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::storage::{InvalidationLog, LogEntry, MasterWrite, Part, ResourceInfo, Result};

use super::counters::bump;
use super::pending::{Pending, Replay};
use super::{CacheClients, Shared};
use crate::engine::KeyServers;
use crate::fleet::plan::Servers;

/// Failed invalidations remembered key by key; past this, the server that failed (or, when it
/// is not known, the whole cache) is distrusted until it is flushed.
const MAX_PENDING: usize = 10_000;

/// Minimum time between replays of failed invalidations.
const REPLAY_EVERY: Duration = Duration::from_millis(100);

/// Failed invalidations replayed by one call at most (one pipelined request per server), so
/// that a long backlog adds a bounded cost to the read or write that replays it.
const REPLAY_BATCH: usize = 1000;

/// The thread that replays failed invalidations, off every caller's path: every
/// [`REPLAY_EVERY`], a batch of at most [`REPLAY_BATCH`] keys, with a client checked out only
/// when something is pending.
pub(super) struct Replayer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replayer {
    /// Starts the thread; it replays for `shared` until dropped.
    pub(super) fn start(shared: &Arc<Shared>) -> std::io::Result<Replayer> {
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mcstore-replay".into())
            .spawn(move || {
                // Ends when the storage drops the sender.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REPLAY_EVERY)
                {
                    shared.replay();
                }
            })?;
        Ok(Replayer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // a replay under way ends within its I/O timeouts
        }
    }
}

impl Shared {
    /// A master write, then the invalidation of its cache entry, whatever the master returned
    /// (a write can land and still report an error: an fsync after the rename, a remote
    /// commit whose answer timed out; a remove that found nothing still invalidates, the
    /// cache might hold it). With a master that keeps an [`InvalidationLog`], a record goes
    /// there first (durable before the master write) and is removed once the entry is
    /// deleted: a process killed between its master write and its delete leaves it for any
    /// other process to replay, and readers meanwhile read the master.
    pub(super) fn write_through(
        &self,
        info: &ResourceInfo,
        part: Part,
        write: MasterWrite<'_>,
    ) -> Result<()> {
        let master = &*self.settings.master;
        let mi = self.master_info(master, info)?;
        let key = self.key(info, part);
        let apply = |write| match write {
            MasterWrite::Put(data) => master.put(&mi, part, data),
            MasterWrite::Remove => master.remove(&mi, part),
        };
        let (intent, r) = match (&key, master.invalidation_log()) {
            // One transaction: the write and its intent commit together, or neither does.
            (Some(k), Some(log)) if master.writes_intents_atomically() => {
                match master.write_intending(&mi, part, write, k) {
                    Ok(record) => (Some((log, record)), Ok(())),
                    Err(e) => (None, Err(e)),
                }
            }
            // The intent must be durable before the master changes: without it, a process
            // killed after the write would leave other processes trusting the old entry. So
            // a log that cannot take it fails the write, and nothing changes.
            (Some(k), Some(log)) => {
                let record = log.intend(k).inspect_err(|e| self.cache_failed(e))?;
                (Some((log, record)), apply(write))
            }
            _ => (None, apply(write)),
        };
        if let Some(key) = key {
            let done = self.invalidate(std::slice::from_ref(&key));
            if let Some((log, intent)) = intent {
                // Not deleted everywhere it matters: a record any process may replay now
                // (the intent is not replayed while this process lives).
                let recorded = done
                    || log
                        .record(&key)
                        .inspect_err(|e| self.cache_failed(e))
                        .is_ok();
                // Without that record, the intent stays: every process distrusts the entry
                // (it reads the master) until this process is gone and another replays it.
                if recorded {
                    let entry = LogEntry {
                        key,
                        records: vec![intent],
                    };
                    if let Err(e) = log.replayed(&entry) {
                        self.cache_failed(&e);
                    }
                }
            }
        }
        r
    }

    /// Deletes the cache entries of a resource after a master write, on every server that
    /// may hold them (its own server; with copies, every copy); failures are remembered.
    /// Returns whether every entry was deleted everywhere it matters.
    fn invalidate(&self, keys: &[String]) -> bool {
        self.replay_inline();
        let mut all = true;
        for k in keys {
            let Some((mut held, servers)) = self.key_servers(k, false) else {
                self.remember(k.clone(), None);
                all = false;
                continue;
            };
            let servers = match servers {
                Ok(s) => s,
                Err(e) => {
                    self.cache_failed(&e);
                    self.remember(k.clone(), e.server());
                    all = false;
                    continue;
                }
            };
            // The key's own server is out of the ring (its keys moved meanwhile): it may
            // still hold the old entry, so it is distrusted, and flushed before it serves
            // reads again. Not done where it matters to clients still routing the key home:
            // a record stays in the log for one of them to replay. (Copies never move.)
            if let Some(home) = servers.moved_from() {
                let home = match (&self.settings.cache, &held) {
                    (CacheClients::Shared(s), _) => s.labels()[home].clone(),
                    (_, Some(c)) => c.label_list()[home].clone(),
                    (CacheClients::Pool(_), None) => unreachable!("a pool routes with a client"),
                };
                self.lock_pending().distrust_server(home);
                all = false;
            }
            // Deleted, on every protocol: an item marked stale over meta (`md I`) would still
            // be served to text and binary readers of the same cache. Pinned: each delete
            // goes where the route above says, even if a server is ejected or rejoins
            // meanwhile. A copy whose delete fails is remembered; the key is then read from
            // the master until a replay has deleted it on every copy.
            for server in servers.servers().iter() {
                let Some(c) = self.client_on(&mut held, server) else {
                    self.remember(k.clone(), None);
                    all = false;
                    continue;
                };
                if let Err(e) = c.pinned(server, |c| c.delete(k.as_bytes())) {
                    self.cache_failed(&e);
                    self.remember(k.clone(), e.server());
                    all = false;
                }
            }
        }
        all
    }

    /// Remembers a failed invalidation in this process (its write records it in the master's
    /// invalidation log, once, where every process sees it: see `write_through`).
    fn remember(&self, key: String, server: Option<&str>) {
        let mut p = self.lock_pending();
        p.record(key, server, MAX_PENDING);
        crate::observe::pending(p.len());
    }

    /// Which of `servers` (`labels`: the servers' names) may serve `key` from the cache, in
    /// order; `None` if none may, and the read goes to the master. With one copy per key: its
    /// server, unless the key is routed away from it (a stand-in never holds an entry) or
    /// [`distrusted`](Self::distrusted) there. With copies: none while the key's
    /// invalidation is pending (here or in the master's log: some copy may still hold the old
    /// entry, and a read could find it there); otherwise every copy but those the storage
    /// distrusts as a whole (overflowed, or waiting for a flush).
    pub(super) fn readable(
        &self,
        key: &str,
        labels: &[String],
        servers: KeyServers,
    ) -> Option<Servers> {
        if self.starting() {
            return None;
        }
        let copies = match servers {
            // (A read is given a `Route`; `Spread` is an invalidation's.)
            KeyServers::Route(r) | KeyServers::Spread { route: r, .. } => {
                return (r.is_home() && !self.distrusted(key, &labels[r.server]))
                    .then(|| servers.servers());
            }
            KeyServers::Copies(copies) => copies,
        };
        let mut trusted = Servers::from_slice(&[]);
        {
            let p = self.lock_pending();
            for i in copies.iter() {
                if !p.distrusts(key, || Some(labels[i].clone())) {
                    trusted.push(i as u32);
                }
            }
        }
        if trusted.len() == 0 || self.logged(key) {
            return None;
        }
        Some(trusted)
    }

    /// True if the master's log has `key`'s invalidation pending (or cannot tell).
    fn logged(&self, key: &str) -> bool {
        match self.settings.master.invalidation_log() {
            // A log that cannot be read cannot vouch for the entry.
            Some(log) => log.contains(key).unwrap_or(true),
            None => false,
        }
    }

    /// True if `key` must not be read from the cache on `server` (an invalidation is
    /// pending, here or in the master's log, or the server is distrusted).
    pub(super) fn distrusted(&self, key: &str, server: &str) -> bool {
        if self
            .lock_pending()
            .distrusts(key, || Some(server.to_string()))
        {
            return true;
        }
        self.logged(key)
    }

    pub(super) fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Without a replay thread: replays from a caller's call, at most every
    /// [`REPLAY_EVERY`].
    pub(super) fn replay_inline(&self) {
        if !self.inline_replay {
            return;
        }
        {
            let mut p = self.lock_pending();
            let now = Instant::now();
            if p.last_replay.is_some_and(|t| now - t < REPLAY_EVERY) {
                return;
            }
            p.last_replay = Some(now);
        }
        self.replay();
    }

    /// Replays failed invalidations: at most [`REPLAY_BATCH`] of this process's, and as many
    /// of the master's log (every process's). A client is checked out only if something is
    /// pending.
    fn replay(&self) {
        if let Some(skew) = self.settings.follow_list {
            self.record_lists(skew);
        }
        let replay = {
            let p = self.lock_pending();
            (!p.is_empty()).then(|| p.take(REPLAY_BATCH))
        };
        let log = self.settings.master.invalidation_log();
        let entries = match log
            .filter(|l| l.may_have_pending())
            .map(|l| l.pending(REPLAY_BATCH))
        {
            Some(Ok(entries)) => entries,
            Some(Err(e)) => {
                self.cache_failed(&e);
                Vec::new()
            }
            None => Vec::new(),
        };
        if replay.is_none() && entries.is_empty() {
            return;
        }
        let Some(mut c) = self.checkout_admin() else {
            return;
        };
        let c = &mut *c;
        if let Some(log) = log {
            self.replay_log(c, log, entries);
        }
        let Some(replay) = replay else {
            return;
        };
        match replay {
            Replay::Flush(servers) => {
                for (server, gen) in servers {
                    let r = match &server {
                        Some(s) => c.flush_server(s, None),
                        None => c.flush_all(None),
                    };
                    match r {
                        // A server that left the list is distrusted again if it comes back.
                        Ok(()) => {
                            self.lock_pending().flushed(&server, gen);
                            if let Some(s) = &server {
                                self.record_flush(s);
                            }
                        }
                        Err(crate::Error::ServerRemoved { .. }) => {
                            self.lock_pending().flushed(&server, gen)
                        }
                        Err(e) => self.cache_failed(&e),
                    }
                }
            }
            // One pipelined delete per server for the whole batch. If any server failed, the
            // batch stays pending: deleting again is harmless.
            Replay::Keys(mut keys) => {
                // A key that no longer routes to the server that failed (it was ejected and
                // its keys moved) cannot be deleted there by key: that server is flushed
                // before it is trusted again instead. (A key's copies never move.) A server
                // that left the list and is no longer reached (a change's windows are over)
                // is read by no one now, and distrusted if it comes back: nothing to do.
                let members = c.servers().to_vec();
                keys.retain(|(key, gen, failed)| {
                    let Some(failed) = failed else {
                        return true;
                    };
                    match self.key_servers_with(c, key.as_bytes(), false) {
                        Ok(s) if !s.servers().iter().any(|i| &c.label_list()[i] == failed) => {
                            let mut p = self.lock_pending();
                            if members.contains(failed) {
                                p.distrust_server(failed.clone());
                            }
                            p.replayed(key, *gen);
                            false
                        }
                        _ => true,
                    }
                });
                let names: Vec<&[u8]> = keys.iter().map(|(k, ..)| k.as_bytes()).collect();
                let deleted = self.replay_deletes(c, &names);
                let mut p = self.lock_pending();
                for ((key, gen, _), ok) in keys.iter().zip(deleted) {
                    if ok {
                        p.replayed(key, *gen);
                    }
                }
                crate::observe::pending(p.len());
            }
        }
    }

    /// Replays `entries` of the master's invalidation log: one pipelined delete, then their
    /// records are removed (those added meanwhile stay).
    fn replay_log(&self, c: &mut Client, log: &dyn InvalidationLog, entries: Vec<LogEntry>) {
        let keys: Vec<&[u8]> = entries.iter().map(|e| e.key.as_bytes()).collect();
        let deleted = self.replay_deletes(c, &keys);
        for (entry, ok) in entries.iter().zip(deleted) {
            if !ok {
                continue;
            }
            if let Err(e) = log.replayed(entry) {
                self.cache_failed(&e);
            }
        }
    }

    /// One replay batch: `keys` deleted on their own servers (with copies, on every copy),
    /// one pipelined delete per server, each pinned to the server its keys were routed to (a
    /// concurrent ejection cannot send it elsewhere). Per key, whether it was deleted on
    /// every server it matters on: a key routed away from its own server is left for a
    /// process (or a later replay) that routes it home; a key with a copy that failed stays.
    fn replay_deletes(&self, c: &mut Client, keys: &[&[u8]]) -> Vec<bool> {
        // Per key, the servers still to confirm its delete (0 once deleted everywhere);
        // `u32::MAX`: not deleted at all (routed away, or not routable).
        let mut left = vec![u32::MAX; keys.len()];
        let mut by_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, key) in keys.iter().enumerate() {
            match self.key_servers_with(c, key, false) {
                Ok(s) if s.moved_from().is_none() && s.servers().len() > 0 => {
                    left[j] = s.servers().len() as u32;
                    for server in s.servers().iter() {
                        by_server.entry(server).or_default().push(j);
                    }
                }
                Ok(_) => {}
                Err(e) => self.cache_failed(&e),
            }
        }
        for (server, js) in by_server {
            let batch: Vec<&[u8]> = js.iter().map(|&j| keys[j]).collect();
            match c.pinned(server, |c| c.delete_multi(&batch)) {
                Ok(_) => {
                    bump(
                        &self.counters.replay_batches,
                        "mcstore_storage_replay_batches_total",
                    );
                    for j in js {
                        left[j] -= 1;
                    }
                }
                Err(e) => self.cache_failed(&e),
            }
        }
        let deleted: Vec<bool> = left.iter().map(|&n| n == 0).collect();
        let n = deleted.iter().filter(|&&d| d).count();
        if n > 0 {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            crate::observe::storage("mcstore_storage_replayed_total", n);
            crate::observe::replayed(n);
            self.counters.replayed.fetch_add(n, Ordering::Relaxed);
        }
        deleted
    }
}
