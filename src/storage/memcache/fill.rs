//! Reads through the cache: a hit is served, and on a miss one reader fills the entry from
//! the master with a CAS unique taken before its master read (a meta lease, or a filling
//! marker over text and binary), so that a write's delete in between makes the fill fail.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{CasResult, Client, Lease, MetaGetOptions, SetOptions, SharedClient};
use crate::engine::ServerInstance;
use crate::storage::{Part, ResourceInfo, Result, Storage};

use super::counters::bump;
use super::entry::{Entry, Found};
use super::keys::{FLAG_FILLING, FLAG_TOO_LARGE};
use super::{CacheClients, Shared};

/// Keys remembered as stuck (a filler that never filled) before the oldest are dropped.
const MAX_STUCK: usize = 10_000;

/// Poll interval while waiting for another reader's fill.
const FILL_POLL: Duration = Duration::from_millis(2);

/// The result of looking a key up in the cache.
enum Lookup {
    Hit(Bytes),
    /// The index of chunked content (and its compression bits): its chunks are read with
    /// no client held.
    Chunked(crate::codec::chunked::ChunkIndex, u32),
    /// Not cached; if we own the fill, the CAS unique of our filling marker.
    Miss(Option<u64>),
    /// Do not fill (too large, or another reader did not finish in time).
    Master,
    /// Another reader is filling it: look again shortly (without holding a client).
    Wait,
    /// An entry this storage cannot read: deleted by the lookup, then the master serves.
    Undecodable,
}

impl Shared {
    /// A read through the cache. A client is held only for cache calls, never during the
    /// master read or while waiting for another reader's fill, so warm hits do not queue
    /// behind cold misses for the pool's clients.
    pub(super) fn cached_get(
        &self,
        m: &dyn Storage,
        info: &ResourceInfo,
        part: Part,
    ) -> Result<Bytes> {
        let Some(key) = self.key(info, part) else {
            return self.master_get(m, info, part);
        };
        self.replay_inline();
        if let CacheClients::Shared(s) = &self.settings.cache {
            if let Some(v) = self.shared_hit(s, &key) {
                bump(&self.counters.hits, "mcstore_storage_hits_total");
                return Ok(v);
            }
        }
        let mut waiting_until = None;
        let mut instance = None;
        let lookup = loop {
            let Some((mut held, servers)) = self.key_servers(&key, true) else {
                return self.master_get(m, info, part);
            };
            let servers = match servers {
                Ok(s) => s,
                Err(e) => {
                    self.cache_failed(&e);
                    return self.master_get(m, info, part);
                }
            };
            // Not read from the cache (see `readable`): a key whose invalidation is pending,
            // and a key routed away from its own server (ejected, with
            // `remove_failed_servers`): an entry filled on the stand-in could outlive a write
            // made through a client that routes the key home, so stand-ins never hold one.
            let shared_labels;
            let labels: &[String] = match (&self.settings.cache, &held) {
                (CacheClients::Shared(s), _) => {
                    shared_labels = s.labels();
                    &shared_labels
                }
                (_, Some(c)) => c.label_list(),
                (CacheClients::Pool(_), None) => {
                    unreachable!("a pool's servers come with a client")
                }
            };
            let Some(order) = self.readable(&key, labels, servers) else {
                bump(&self.counters.bypassed, "mcstore_storage_bypassed_total");
                return self.master_get(m, info, part);
            };
            // The copies in order (one server without copies): a cache error on one tries
            // the next before the master.
            let mut looked = None;
            for server in order.iter() {
                let Some(c) = self.client_on(&mut held, server) else {
                    return self.master_get(m, info, part);
                };
                // The lookup's calls all go to that server, whatever another client of the
                // pool ejects meanwhile; which process it is decides where the fill may go
                // (`fill`).
                let r = c.pinned(server, |c| -> Result<Lookup> {
                    instance = Some(c.instance(server)?);
                    match self.lookup(c, &key)? {
                        Lookup::Undecodable => {
                            // Deleted where it was found (always safe: the next reader fills).
                            c.delete(key.as_bytes())?;
                            Ok(Lookup::Master)
                        }
                        lookup => Ok(lookup),
                    }
                });
                match r {
                    Ok(lookup) => {
                        looked = Some(lookup);
                        break;
                    }
                    Err(e) => self.cache_failed(&e),
                }
            }
            drop(held);
            match looked {
                Some(Lookup::Wait) => {
                    if waiting_until.is_none() && self.is_stuck(&key) {
                        break Lookup::Master; // its filler is known not to fill: no wait
                    }
                    let until = *waiting_until.get_or_insert_with(|| {
                        bump(
                            &self.counters.fill_waits,
                            "mcstore_storage_fill_waits_total",
                        );
                        Instant::now() + self.settings.fill_wait
                    });
                    if Instant::now() >= until {
                        self.mark_stuck(&key);
                        break Lookup::Master; // the filler did not finish in time
                    }
                    std::thread::sleep(FILL_POLL);
                }
                Some(lookup) => break lookup,
                // Every server failed (each error counted).
                None => return self.master_get(m, info, part),
            }
        };
        match lookup {
            Lookup::Hit(v) => {
                bump(&self.counters.hits, "mcstore_storage_hits_total");
                Ok(v)
            }
            Lookup::Chunked(index, bits) => match self.read_chunks(&key, index, bits) {
                Some(v) => {
                    bump(&self.counters.hits, "mcstore_storage_hits_total");
                    Ok(v)
                }
                None => {
                    bump(&self.counters.misses, "mcstore_storage_misses_total");
                    self.master_get(m, info, part)
                }
            },
            Lookup::Master | Lookup::Wait | Lookup::Undecodable => {
                bump(&self.counters.misses, "mcstore_storage_misses_total");
                self.master_get(m, info, part)
            }
            Lookup::Miss(filler) => {
                bump(&self.counters.misses, "mcstore_storage_misses_total");
                let value = self.master_get(m, info, part);
                let (Some(cas), Some(instance)) = (filler, instance) else {
                    return value;
                };
                // Our marker or lease, on the server the lookup used: fill it, or drop it if
                // the master has nothing, so nobody waits for it. The entry (and any chunks)
                // is made first, with no client held; a client is checked out again for the
                // fill.
                let server = instance.server();
                let entry = value.as_ref().ok().map(|v| self.encode_entry(&key, v));
                let mut held = None;
                let stored = match self.client_on(&mut held, server) {
                    None => false,
                    Some(c) => match &entry {
                        Some(entry) => self.fill(c, &key, cas, instance, entry),
                        None => {
                            self.drop_entry(c, &key, server);
                            false
                        }
                    },
                };
                drop(held);
                if let (false, Some(entry)) = (stored, &entry) {
                    self.delete_chunks(&entry.chunks);
                }
                value
            }
        }
    }

    /// Deletes `key` on `server` (pinned: a marker lives on the server its lookup used, and
    /// a delete through the fleet layer would go to every copy).
    fn drop_entry(&self, c: &mut Client, key: &str, server: usize) {
        if let Err(e) = c.pinned(server, |c| c.delete(key.as_bytes())) {
            self.cache_failed(&e);
        }
    }

    /// The warm read of a shared client: a plain get on the key's server (its copies in
    /// read order), batched with concurrent callers' (text and binary; with leases every
    /// read is a lease lookup, and a plain get could not tell a stale item). `Some` for a
    /// value, `None` when the full lookup must run (a miss, a marker, an error on every
    /// copy is left to it too).
    fn shared_hit(&self, s: &SharedClient, key: &str) -> Option<Bytes> {
        if s.has_leases() {
            return None;
        }
        let servers = s.storage_servers(key.as_bytes(), true).ok()?;
        let order = self.readable(key, &s.labels(), servers)?;
        let mut buf = Vec::new();
        for (k, server) in order.iter().enumerate() {
            match s.get_on(server, key.as_bytes(), &mut buf) {
                Ok(Some(info)) => {
                    return match self.decode_entry(info.flags, buf) {
                        Found::Content(v) => Some(v),
                        Found::Chunked(index, bits) => self.read_chunks(key, index, bits),
                        Found::Other(_) | Found::Undecodable => None,
                    }
                }
                Ok(None) => return None,
                // Counted when the next copy is tried; the last server's error is left to
                // the full lookup, which meets it again.
                Err(e) if k + 1 < order.len() => self.cache_failed(&e),
                Err(_) => {}
            }
        }
        None
    }

    /// Looks `key` up; on a miss, tries to become its filler.
    fn lookup(&self, c: &mut Client, key: &str) -> Result<Lookup> {
        if c.has_leases() {
            return self.lookup_lease(c, key);
        }
        let k = key.as_bytes();
        for _ in 0..2 {
            match c.gets(k)? {
                Some(item) => return self.found(item.flags, item.value),
                None => {
                    let marker = SetOptions::default()
                        .flags(FLAG_FILLING)
                        .ttl(self.settings.filler_ttl);
                    if c.add(k, b"", marker)? {
                        // Ours: learn its CAS unique (a writer may have replaced it already).
                        return match c.gets(k)? {
                            Some(item) if item.flags == FLAG_FILLING => Ok(Lookup::Miss(item.cas)),
                            Some(item) => self.found(item.flags, item.value),
                            None => Ok(Lookup::Miss(None)),
                        };
                    }
                    // Someone else added it first: look again.
                }
            }
        }
        Ok(Lookup::Miss(None))
    }

    /// [`lookup`](Self::lookup) with memcached's leases: `N` makes the server vivify a
    /// placeholder on a miss and give its lease (`W`) to one reader; the others (`Z`) wait
    /// for the value. A stale item (`X`, invalidated by a write) is waited on the same way,
    /// never served.
    fn lookup_lease(&self, c: &mut Client, key: &str) -> Result<Lookup> {
        let opts = MetaGetOptions {
            lease_ttl: Some(self.settings.filler_ttl),
            ..MetaGetOptions::default()
        };
        let mut value = Vec::new();
        Ok(match c.meta_get(key.as_bytes(), opts, &mut value)? {
            // N always answers; a plain miss would be a server without leases.
            None => Lookup::Miss(None),
            Some(i) if i.lease == Lease::Won => Lookup::Miss(Some(i.cas)),
            Some(i) if i.lease == Lease::AlreadyWon || i.stale => Lookup::Wait,
            Some(i) => match self.decode_entry(i.flags, value) {
                Found::Content(v) => Lookup::Hit(v),
                Found::Chunked(index, bits) => Lookup::Chunked(index, bits),
                Found::Undecodable => Lookup::Undecodable,
                Found::Other(_) => Lookup::Master,
            },
        })
    }

    fn found(&self, flags: u32, value: Vec<u8>) -> Result<Lookup> {
        Ok(match self.decode_entry(flags, value) {
            Found::Content(v) => Lookup::Hit(v),
            Found::Chunked(index, bits) => Lookup::Chunked(index, bits),
            Found::Undecodable => Lookup::Undecodable,
            // Another reader is filling.
            Found::Other(FLAG_FILLING) => Lookup::Wait,
            // "Read the master", or not written by us (treat as absent, do not overwrite it),
            // or content that does not decode (counted).
            Found::Other(_) => Lookup::Master,
        })
    }

    /// Stores `value` in place of our filling marker, unless a writer got there first.
    ///
    /// Only on the server process that gave the marker's CAS unique (`instance`): a server
    /// restarted meanwhile counts uniques from 1 again, and our old unique could match
    /// another reader's newer marker, which would store our older value over it for good.
    /// On another instance the key is deleted instead (whatever it holds is at worst a
    /// marker: its filler's `cas` then fails, and the next reader fills).
    ///
    /// Whether the entry was stored (if not, its chunks are the caller's to delete, once it
    /// holds no client).
    fn fill(
        &self,
        c: &mut Client,
        key: &str,
        cas: u64,
        instance: ServerInstance,
        entry: &Entry,
    ) -> bool {
        let opts = SetOptions::default()
            .flags(entry.flags)
            .ttl(self.settings.ttl);
        match self.cas_on(c, key, cas, instance, &entry.data, opts) {
            Some(Ok(CasResult::Stored)) if entry.flags == FLAG_TOO_LARGE => return true,
            Some(Ok(CasResult::Stored)) => {
                self.count_fill(entry);
                return true;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                // The server refused the value (say it is above the server's item size) or
                // failed: never leave our marker for others to wait on. Mark the key as
                // served by the master for a while, or at least remove the marker.
                self.cache_failed(&e);
                let master = SetOptions::default()
                    .flags(FLAG_TOO_LARGE)
                    .ttl(self.settings.filler_ttl);
                if !matches!(
                    self.cas_on(c, key, cas, instance, b"", master),
                    Some(Ok(CasResult::Stored))
                ) {
                    let _ = c.pinned(instance.server(), |c| c.delete(key.as_bytes()));
                }
            }
            None => self.drop_entry(c, key, instance.server()),
        }
        false
    }

    /// `cas` on the server that gave the unique if it is still that `instance` and still
    /// holds the key's entry (the key routes to it, or it is one of the key's copies);
    /// `None` (nothing sent) if it may not be.
    fn cas_on(
        &self,
        c: &mut Client,
        key: &str,
        cas: u64,
        instance: ServerInstance,
        data: &[u8],
        opts: SetOptions,
    ) -> Option<crate::Result<CasResult>> {
        let server = instance.server();
        match self.key_servers_with(c, key.as_bytes(), false) {
            Ok(s) if s.holds(server) => {}
            _ => return None,
        }
        c.pinned(server, |c| match c.instance(server) {
            Ok(now) if now == instance => Some(c.cas(key.as_bytes(), data, cas, opts)),
            _ => None,
        })
    }

    /// Whether `key`'s filler was seen not to fill (its marker has not expired yet).
    fn is_stuck(&self, key: &str) -> bool {
        let stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        stuck.get(key).is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers that `key`'s filler did not fill in time.
    fn mark_stuck(&self, key: &str) {
        let mut stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if stuck.len() >= MAX_STUCK {
            stuck.retain(|_, until| *until > now);
            if stuck.len() >= MAX_STUCK {
                stuck.clear();
            }
        }
        let ttl = Duration::from_secs(u64::from(self.settings.filler_ttl));
        stuck.insert(key.to_string(), now + ttl);
    }

    fn master_get(&self, m: &dyn Storage, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        bump(
            &self.counters.master_reads,
            "mcstore_storage_master_reads_total",
        );
        let mi = self.master_info(m, info)?;
        m.get(&mi, part)
    }
}
