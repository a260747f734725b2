//! Live server lists (#28): a `ServerList` changed while clients serve, against real
//! memcached. Servers are added and removed under 64 callers; every reply must be its own
//! caller's and its own key's, and every read the last value written or a miss.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, Error, ErrorKind, Pool, SetOptions};
use support::Memcached;

fn builder(servers: &[&Memcached]) -> ClientBuilder {
    support::client_builder()
        .servers(servers.iter().map(|m| m.addr()))
        .distribution(Distribution::Ketama)
}

/// Which of `servers` each of `keys` goes to now.
fn placement(c: &mut Client, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| c.server_for_key(k.as_bytes()).unwrap().to_string())
        .collect()
}

#[test]
fn a_new_list_moves_only_its_keys_and_keeps_connections() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let mut c = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("live:{i}")).collect();
    for k in &keys {
        c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
            .unwrap();
    }
    let before = placement(&mut c, &keys);
    let open: Vec<u64> = ms[..3].iter().map(Memcached::clients).collect();

    let list = c.server_list().clone();
    let change = list.set(ms.iter().map(|m| m.addr())).unwrap();
    assert_eq!(change.added, [ms[3].addr()]);
    assert!(change.removed.is_empty() && change.applied());
    assert_eq!(change.generation, 1);
    assert_eq!(
        list.servers(),
        ms.iter().map(|m| m.addr()).collect::<Vec<_>>()
    );

    // Keys that stay on their server still hit; those that moved go to the new server only.
    let after = placement(&mut c, &keys);
    let mut moved = 0;
    for ((k, a), b) in keys.iter().zip(&before).zip(&after) {
        let got = c.get(k.as_bytes()).unwrap().map(|i| i.value);
        if a == b {
            assert_eq!(got.as_deref(), Some(k.as_bytes()), "{k} stayed on {a}");
        } else {
            assert_eq!(
                b,
                &ms[3].addr(),
                "{k} moved from {a} to {b}, not the new server"
            );
            assert_eq!(got, None, "{k} on the new, empty server");
            moved += 1;
        }
    }
    // Ketama: about a quarter moves to the fourth server.
    assert!((30..=130).contains(&moved), "{moved} of 300 keys moved");
    // The connections to the kept servers stayed open: none was made again.
    let now: Vec<u64> = ms[..3].iter().map(Memcached::clients).collect();
    assert_eq!(open, now, "connections to kept servers were replaced");
    for (label, counters) in c.server_counters() {
        assert_eq!(counters.reconnects, 0, "{label} reconnected");
    }

    // Back to the first three: every key is where it was.
    let change = list.set(ms[..3].iter().map(|m| m.addr())).unwrap();
    assert_eq!(change.removed, [ms[3].addr()]);
    assert_eq!(placement(&mut c, &keys), before);
    // The removed server is not asked any more, and says so clearly.
    let e = c.flush_server(&ms[3].addr(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ServerRemoved, "{e}");
    assert_eq!(c.server_counters().len(), 3);
}

#[test]
fn a_bad_list_is_refused_and_the_old_one_kept() {
    let ms: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let mut c = builder(&[&ms[0], &ms[1]]).build().unwrap();
    let list = c.server_list().clone();
    let none: [&str; 0] = [];
    assert!(matches!(list.set(none), Err(Error::NoServers)));
    let bad = list.set(["127.0.0.1:99999"]).unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::Config, "{bad}");
    let twice = list.set([ms[0].addr(), ms[0].addr()]).unwrap_err();
    assert!(twice.to_string().contains("twice"), "{twice}");
    assert_eq!(list.generation(), 0);
    assert_eq!(list.servers(), [ms[0].addr(), ms[1].addr()]);
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().map(|i| i.value), Some(b"v".to_vec()));
    // The same list again changes nothing.
    let same = list.set([ms[0].addr(), ms[1].addr()]).unwrap();
    assert!(!same.applied() && same.generation == 0);
    // A weight is a change: the continuum is rebuilt.
    let w = list
        .set([format!("{}:3", ms[0].addr()), ms[1].addr()])
        .unwrap();
    assert_eq!(w.reweighted, [ms[0].addr()]);
    assert_eq!(
        list.servers(),
        [format!("{}:3", ms[0].addr()), ms[1].addr()]
    );
}

#[test]
fn flapping_within_the_damping_window_moves_no_key() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let all: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let mut c = builder(&[&ms[0], &ms[1], &ms[2], &ms[3]])
        .list_damping(Duration::from_secs(30))
        .build()
        .unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("flap:{i}")).collect();
    let before = placement(&mut c, &keys);
    let list = c.server_list().clone();
    // The fourth server disappears from discovery, then comes back: nothing moves.
    let gone = list.set(&all[..3]).unwrap();
    assert!(!gone.applied() && gone.pending, "{gone:?}");
    assert_eq!(placement(&mut c, &keys), before);
    let back = list.set(&all).unwrap();
    assert!(!back.applied() && !back.pending, "{back:?}");
    assert_eq!(list.generation(), 0);
    assert_eq!(placement(&mut c, &keys), before);

    // Without damping, the same flap moves its keys twice.
    let mut d = builder(&[&ms[0], &ms[1], &ms[2], &ms[3]]).build().unwrap();
    let dl = d.server_list().clone();
    assert!(dl.set(&all[..3]).unwrap().applied());
    assert_ne!(placement(&mut d, &keys), before);
    assert!(dl.set(&all).unwrap().applied());
    assert_eq!(dl.generation(), 2);
}

#[test]
fn changes_are_rate_limited_and_applied_later() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let c = builder(&[&ms[0], &ms[1]])
        .list_min_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let list = c.server_list().clone();
    assert!(list.set(&all).unwrap().applied());
    // A second change within the interval is held...
    let held = list.set(&all[..2]).unwrap();
    assert!(!held.applied() && held.pending);
    assert_eq!(list.servers(), all);
    // ...and applied by a refresh once the interval has passed.
    support::wait_for("the held change", || {
        list.refresh().unwrap().applied() || list.generation() == 2
    });
    assert_eq!(list.servers(), &all[..2]);
}

#[test]
fn a_pool_follows_one_list() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let pool = Pool::new(builder(&[&ms[0], &ms[1]]), 4).unwrap();
    let list = pool.server_list().clone();
    list.set(ms.iter().map(|m| m.addr())).unwrap();
    // Every client of the pool, idle or not, routes with the new list.
    let mut held: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
    for c in &mut held {
        for i in 0..50 {
            let k = format!("pool:{i}");
            c.set(k.as_bytes(), b"v", SetOptions::default()).unwrap();
        }
        assert_eq!(c.server_counters().len(), 3);
    }
    drop(held);
}

/// A removed server's connections close without waiting for another call: a pool's idle
/// clients and a shared client's engines take the new list when it is published (so "its
/// clients have left it" is something an operator can wait for before emptying it).
#[test]
fn idle_clients_close_their_connections_to_a_removed_server() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let pool = Pool::new(builder(&[&ms[0], &ms[1], &ms[2]]), 4).unwrap();
    let shared = builder(&[&ms[0], &ms[1], &ms[2]]).shared().build().unwrap();
    // Every client of the pool, and the shared client, talks to every server once.
    let mut held: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
    for c in &mut held {
        c.version().unwrap();
    }
    drop(held);
    for i in 0..200 {
        shared
            .set(format!("idle:{i}").as_bytes(), b"v", SetOptions::default())
            .unwrap();
    }
    shared.stats(None).unwrap(); // the admin client's connections too
                                 // memcached counts a connection once it accepted it, which a busy host may delay.
    support::wait_for("every client to connect", || ms[2].clients() >= 6);
    let two = [ms[0].addr(), ms[1].addr()];
    pool.server_list().set(&two).unwrap();
    shared.server_list().set(&two).unwrap();
    // Nobody calls: the connections close all the same.
    support::wait_for("the idle clients to leave the removed server", || {
        ms[2].clients() == 0
    });
}

/// The fronts that do not follow a changing list yet refuse a change with a clear error and
/// keep serving with the list they have: a storage over a pool, a client with copies, a
/// modula list.
#[test]
fn fronts_that_do_not_follow_changes_refuse_them() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let three: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let refused = |list: &mcstore::ServerList, what: &str| {
        let e = list.set(&three).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{what}: {e}");
        assert!(e.to_string().contains("does not follow"), "{what}: {e}");
        assert_eq!(list.generation(), 0, "{what}");
    };
    let pool = Pool::new(builder(&[&ms[0], &ms[1]]), 2).unwrap();
    let list = pool.server_list().clone();
    let storage = mcstore::storage::MemcacheStorage::new(
        pool,
        Arc::new(mcstore::storage::MemoryStorage::new()),
    );
    refused(&list, "a MemcacheStorage's pool");
    drop(storage);
    let mut c = builder(&[&ms[0], &ms[1]]).replicas(2).build().unwrap();
    refused(&c.server_list().clone(), "a client with copies");
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    // A modula list cannot change: nearly every key would move.
    let m = support::client_builder()
        .servers(&three[..2])
        .build()
        .unwrap();
    let e = m.server_list().set(&three).unwrap_err();
    assert!(e.to_string().contains("modula"), "{e}");
}

/// A key that moves to a new server and back never reads what a write made meanwhile
/// replaced: every kind of write deletes it where it was (single calls, batches, pipelines,
/// noreply).
#[test]
fn a_key_moved_away_and_back_never_reads_an_older_write() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let three: Vec<String> = ms[..3].iter().map(|m| m.addr()).collect();
    let four: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let mut c = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let list = c.server_list().clone();
    // Keys that the fourth server takes: found with a look at the new continuum.
    let all: Vec<String> = (0..400).map(|i| format!("moves:{i}")).collect();
    for k in &all {
        c.set(k.as_bytes(), b"old", SetOptions::default()).unwrap();
        c.set(format!("{k}:n").as_bytes(), b"5", SetOptions::default())
            .unwrap();
    }
    list.set(&four).unwrap();
    let moved: Vec<&String> = all
        .iter()
        .filter(|k| c.server_for_key(k.as_bytes()).unwrap() == ms[3].addr())
        .collect();
    assert!(moved.len() >= 40, "{} keys moved", moved.len());
    let ways = 6;
    for (n, k) in moved.iter().enumerate() {
        let key = k.as_bytes();
        match n % ways {
            0 => c.set(key, b"new", SetOptions::default()).unwrap(),
            1 => {
                c.set_multi(&[(key, &b"new"[..])], SetOptions::default())
                    .unwrap();
            }
            2 => c
                .store_noreply(mcstore::StoreMode::Set, key, b"new", SetOptions::default())
                .unwrap(),
            3 => {
                c.delete(key).unwrap();
            }
            4 => {
                c.delete_multi(&[key]).unwrap();
            }
            _ => {
                // The counter beside it: incr on the new server (a miss there) still
                // deletes the old one.
                let _ = c.incr(format!("{k}:n").as_bytes(), 1).unwrap();
                c.delete(key).unwrap();
            }
        }
    }
    // The noreply writes are confirmed by the next call on their connections.
    c.version().unwrap();
    list.set(&three).unwrap();
    for (n, k) in moved.iter().enumerate() {
        let got = c.get(k.as_bytes()).unwrap().map(|i| i.value);
        assert_ne!(
            got.as_deref(),
            Some(&b"old"[..]),
            "{k} (way {}) read an older write",
            n % ways
        );
        if n % ways == 5 {
            let counter = c.get(format!("{k}:n").as_bytes()).unwrap().map(|i| i.value);
            assert_ne!(
                counter.as_deref(),
                Some(&b"5"[..]),
                "{k}:n read an older write"
            );
        }
    }
    // Keys that never moved were not touched.
    let stayed = all.iter().find(|k| !moved.contains(k)).unwrap();
    assert_eq!(
        c.get(stayed.as_bytes()).unwrap().map(|i| i.value),
        Some(b"old".to_vec())
    );
}

/// A value names its caller, key and write: `t{caller}:{key}:{seq}`.
fn value(t: usize, j: usize, seq: u64) -> String {
    format!("t{t}:{j}:{seq}")
}

#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    failed: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    foreign: AtomicU64,
}

/// 64 callers on a pool, each with its own keys, while servers are added and removed every
/// 100 ms. `abrupt`: a removed server is killed at once (restarted empty before it comes
/// back); otherwise it keeps running (a graceful removal) and is flushed before it comes
/// back. Returns the tally and the number of removals.
fn churn(abrupt: bool) -> (Tally, u64) {
    churn_with(abrupt, false)
}

/// A client of the churn test: a pool's (each caller checks one out for the run) or one
/// shared client for every caller.
#[derive(Clone)]
enum Front {
    Pool(Pool),
    Shared(mcstore::SharedClient),
}

fn churn_with(abrupt: bool, shared: bool) -> (Tally, u64) {
    let secs: u64 = std::env::var("MCSTORE_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let base: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut spares: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let base_addrs: Vec<String> = base.iter().map(|m| m.addr()).collect();
    let b = builder(&base.iter().collect::<Vec<_>>()).io_timeout(Duration::from_secs(2));
    let (front, list) = if shared {
        let c = b.shared().build().unwrap();
        let list = c.server_list();
        (Front::Shared(c), list)
    } else {
        let pool = Pool::new(b, 64).unwrap();
        let list = pool.server_list().clone();
        (Front::Pool(pool), list)
    };
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..64)
        .map(|t| {
            let (front, tally, stop) = (front.clone(), tally.clone(), stop.clone());
            thread::spawn(move || {
                let mut pooled = match &front {
                    Front::Pool(p) => Some(p.get().unwrap()),
                    Front::Shared(_) => None,
                };
                // Half the callers of a shared client make async calls (waited for here):
                // they are served by the I/O threads, and routed again there too.
                let asynchronous = t % 2 == 1;
                let set = |c: &mut Option<mcstore::PooledClient<'_>>, k: &[u8], v: &[u8]| {
                    let opts = SetOptions::default();
                    match (c, &front) {
                        (Some(c), _) => c.set(k, v, opts),
                        (None, Front::Shared(s)) if asynchronous => {
                            futures_executor::block_on(s.set_async(k, v, opts))
                        }
                        (None, Front::Shared(s)) => s.set(k, v, opts),
                        _ => unreachable!(),
                    }
                };
                let get = |c: &mut Option<mcstore::PooledClient<'_>>, k: &[u8]| match (c, &front) {
                    (Some(c), _) => c.get(k),
                    (None, Front::Shared(s)) if asynchronous => {
                        futures_executor::block_on(s.get_async(k))
                    }
                    (None, Front::Shared(s)) => s.get(k),
                    _ => unreachable!(),
                };
                let mut last: Vec<Option<u64>> = vec![None; 16];
                let mut seq = 0u64;
                let mut rng = support::Rng(t as u64 * 7919 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let j = rng.below(16) as usize;
                    let key = format!("churn:{t}:{j}");
                    tally.ops.fetch_add(1, Ordering::Relaxed);
                    if rng.below(2) == 0 {
                        seq += 1;
                        let v = value(t, j, seq);
                        match set(&mut pooled, key.as_bytes(), v.as_bytes()) {
                            Ok(()) => last[j] = Some(seq),
                            Err(e) => {
                                tally.failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("set {key}: {e}");
                                // It may or may not have landed.
                                last[j] = None;
                            }
                        }
                        continue;
                    }
                    match get(&mut pooled, key.as_bytes()) {
                        Ok(None) => {
                            tally.misses.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Some(v)) => {
                            let v = String::from_utf8(v.value).unwrap();
                            let (owner, got) = v.rsplit_once(':').unwrap();
                            if owner != format!("t{t}:{j}") {
                                tally.foreign.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{key} read {v}");
                            } else if last[j].is_some_and(|s| got.parse::<u64>().unwrap() != s) {
                                tally.stale.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{key} read {v}, last written {:?}", last[j]);
                            }
                        }
                        Err(e) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("get {key}: {e}");
                        }
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut removals = 0;
    let mut k = 0;
    while Instant::now() < deadline {
        let s = k % spares.len();
        k += 1;
        // Add a spare (empty: restarted or flushed since it was last in the list)...
        let mut with = base_addrs.clone();
        with.push(spares[s].addr());
        assert!(list.set(&with).unwrap().applied());
        thread::sleep(Duration::from_millis(100));
        // ...and remove it again.
        assert!(list.set(&base_addrs).unwrap().applied());
        removals += 1;
        if abrupt {
            spares[s].restart();
        } else {
            // A graceful removal: the clients close their connections to the server as
            // they take the new list, after the call they are making; once they all have,
            // nothing more lands on it, and it is emptied before it comes back.
            support::wait_for("the clients to leave the removed server", || {
                spares[s].clients() == 0
            });
            spares[s].client().flush_all(None).unwrap();
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    let tally = Arc::try_unwrap(tally).unwrap_or_else(|_| panic!("callers still hold the tally"));
    eprintln!(
        "CHURN abrupt={abrupt} shared={shared} ops={} failed={} misses={} stale={} foreign={} removals={removals} generation={}",
        tally.ops.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.misses.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
        tally.foreign.load(Ordering::Relaxed),
        list.generation(),
    );
    (tally, removals)
}

/// No reply reached another caller, no read returned an older write, no call failed, and
/// the list changed often enough to mean something.
fn assert_graceful((t, removals): (Tally, u64)) {
    assert!(removals >= 5, "only {removals} removals");
    assert!(t.ops.load(Ordering::Relaxed) > 1000);
    let (foreign, failed, stale) = (&t.foreign, &t.failed, &t.stale);
    assert_eq!(
        foreign.load(Ordering::Relaxed),
        0,
        "a reply reached the wrong caller"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "graceful removals failed calls"
    );
    assert_eq!(
        stale.load(Ordering::Relaxed),
        0,
        "a read returned an older write"
    );
}

#[test]
fn servers_added_and_removed_every_100ms_under_64_callers() {
    assert_graceful(churn(false));
}

#[test]
fn a_shared_client_follows_servers_added_and_removed_every_100ms() {
    assert_graceful(churn_with(false, true));
}

#[test]
fn abrupt_removals_fail_only_the_calls_in_flight() {
    let (t, removals) = churn(true);
    assert_eq!(
        t.foreign.load(Ordering::Relaxed),
        0,
        "a reply reached the wrong caller"
    );
    assert_eq!(
        t.stale.load(Ordering::Relaxed),
        0,
        "a read returned an older write"
    );
    // A call in flight to a killed server fails; at most one per caller per kill.
    let failed = t.failed.load(Ordering::Relaxed);
    assert!(
        failed <= 64 * removals,
        "{failed} failed calls over {removals} kills"
    );
}

/// A `MemcacheStorage` over a list that changes (`follow_list`): its resources, read
/// through it, must always be the last version written.
mod storage {
    use super::*;
    use mcstore::storage::{MemcacheStorage, MemoryStorage, ResourceInfo, Storage};

    pub(super) struct Resources {
        pub(super) infos: Vec<ResourceInfo>,
    }

    impl Resources {
        pub(super) fn new(s: &MemcacheStorage) -> Resources {
            s.create_container("c").unwrap();
            let infos = (0..60)
                .map(|i| s.info("c", Some(&format!("r{i}"))).unwrap())
                .collect();
            Resources { infos }
        }

        pub(super) fn put(&self, s: &MemcacheStorage, v: u32) {
            for info in &self.infos {
                s.put_content(info, format!("v{v}").as_str().into())
                    .unwrap();
            }
        }

        /// Reads every resource (twice: a miss fills, then a hit) and checks it is `v`.
        pub(super) fn check(&self, s: &MemcacheStorage, v: u32, when: &str) {
            for _ in 0..2 {
                for info in &self.infos {
                    let got = s.get_content(info).unwrap();
                    assert_eq!(
                        std::str::from_utf8(&got).unwrap(),
                        format!("v{v}"),
                        "{when}: {:?}",
                        info.resource
                    );
                }
            }
        }
    }

    /// A storage over a pool, or over a shared client (`shared`).
    pub(super) fn storage_with(
        servers: &[&Memcached],
        master: &Arc<MemoryStorage>,
        skew: Duration,
        shared: bool,
    ) -> (MemcacheStorage, mcstore::ServerList) {
        let (cache, list): (mcstore::storage::CacheClients, _) = match shared {
            true => {
                let c = builder(servers).shared().build().unwrap();
                let list = c.server_list();
                (c.into(), list)
            }
            false => {
                let pool = Pool::new(builder(servers), 2).unwrap();
                let list = pool.server_list().clone();
                (pool.into(), list)
            }
        };
        let s = MemcacheStorage::builder(cache, master.clone() as Arc<dyn Storage>)
            .follow_list(skew)
            .build();
        (s, list)
    }

    pub(super) fn storage(
        servers: &[&Memcached],
        master: &Arc<MemoryStorage>,
        skew: Duration,
    ) -> (MemcacheStorage, mcstore::ServerList) {
        storage_with(servers, master, skew, false)
    }

    /// Applies `servers` once the list takes a change again (changes are `2 * skew` apart).
    pub(super) fn change(list: &mcstore::ServerList, servers: &[&Memcached]) {
        let addrs: Vec<String> = servers.iter().map(|m| m.addr()).collect();
        let before = list.generation();
        support::wait_for("the list to take the change", || {
            list.set(&addrs).unwrap();
            list.generation() > before
        });
    }
}

/// One process: a key that moves to a new server and back, and a server that leaves, misses
/// writes, and comes back with the entries it had, never serve an entry a write superseded.
#[test]
fn a_storage_following_its_list_never_serves_a_superseded_entry() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (a, b, c, d) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_millis(200);
    let master = Arc::new(mcstore::storage::MemoryStorage::new());
    let built = Instant::now();
    let (s, list) = storage::storage(&[a, b, c], &master, skew);
    support::wait_for("the storage's start", || built.elapsed() > skew);
    let r = storage::Resources::new(&s);
    r.put(&s, 1);
    r.check(&s, 1, "three servers");
    // Moved to a new server, written there, moved back: the servers they came back to had v1.
    storage::change(&list, &[a, b, c, d]);
    r.check(&s, 1, "just after d joined");
    r.put(&s, 2);
    r.check(&s, 2, "written with d");
    let after = Instant::now();
    support::wait_for("the change's windows", || after.elapsed() > 2 * skew);
    r.check(&s, 2, "after the windows, with d");
    storage::change(&list, &[a, b, c]);
    r.check(&s, 2, "just after d left");
    support::wait_for("the change's windows", || after.elapsed() > 4 * skew);
    r.check(&s, 2, "after d left");
    // A server that leaves, misses writes (its windows over), and comes back with its items.
    r.put(&s, 3);
    r.check(&s, 3, "before a left");
    storage::change(&list, &[b, c]);
    let left = Instant::now();
    support::wait_for("the change's windows", || left.elapsed() > 2 * skew);
    r.put(&s, 4);
    r.check(&s, 4, "without a");
    storage::change(&list, &[b, c, a]);
    r.check(&s, 4, "just after a came back");
    let back = Instant::now();
    support::wait_for("the change's windows", || back.elapsed() > 2 * skew);
    r.check(&s, 4, "after a came back");
    assert_eq!(s.pending_invalidations(), 0, "a's flush is done");
}

/// Two processes (two storages with their own lists over one master and one cache) that
/// take a change at different moments, less than the skew apart: the one that has not
/// taken it writes and reads by the old list meanwhile; neither reads a superseded entry.
/// One is over a pool, the other over a shared client.
#[test]
fn storages_that_take_a_change_at_different_moments_never_read_a_superseded_entry() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (a, b, c, d) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_secs(2);
    let master = Arc::new(mcstore::storage::MemoryStorage::new());
    let built = Instant::now();
    let (p1, list1) = storage::storage(&[a, b, c], &master, skew);
    let (p2, list2) = storage::storage_with(&[a, b, c], &master, skew, true);
    // Past their start (for `skew`, a new storage reads only the master).
    support::wait_for("the storages' start", || built.elapsed() > skew);
    let r = storage::Resources::new(&p1);
    r.put(&p1, 1);
    r.check(&p1, 1, "p1 before");
    r.check(&p2, 1, "p2 before");
    // d joins p1's list first; p1 reads (d is flushed only once p2 has the change too:
    // meanwhile it reads where the keys were, or the master), p2 writes with the old list,
    // p1 reads again.
    storage::change(&list1, &[a, b, c, d]);
    r.check(&p1, 1, "p1 with d");
    r.put(&p2, 2);
    r.check(&p1, 2, "p1 with d, p2 without");
    r.check(&p2, 2, "p2 without d");
    // p2 takes the change; p1 writes, p2 reads (still where the old list put the keys).
    storage::change(&list2, &[a, b, c, d]);
    let both = Instant::now();
    r.put(&p1, 3);
    r.check(&p2, 3, "p2 just after taking d");
    r.check(&p1, 3, "p1");
    // After both windows: reads on d.
    support::wait_for("both windows", || both.elapsed() > 2 * skew);
    r.check(&p1, 3, "p1 after the windows");
    r.put(&p2, 4);
    r.check(&p1, 4, "p1 after p2 wrote");
    r.put(&p1, 5);
    r.check(&p2, 5, "p2 after p1 wrote");
    // d leaves p2's list first, then p1's.
    storage::change(&list2, &[a, b, c]);
    r.check(&p2, 5, "p2 without d");
    r.put(&p1, 6);
    r.check(&p2, 6, "p2 without d, p1 with it");
    r.put(&p2, 7);
    r.check(&p1, 7, "p1 with d, p2 without");
    storage::change(&list1, &[a, b, c]);
    r.check(&p1, 7, "p1 without d");
    r.put(&p2, 8);
    r.check(&p1, 8, "p1 after d left");
    r.check(&p2, 8, "p2 after d left");
}

/// A process started after a change (it never saw the list before) writes keys that the
/// change moved; when the change is undone, the keys go back to servers that held them
/// before: its writes deleted them there too (each write deletes on the key's next server).
#[test]
fn a_storage_started_after_a_change_invalidates_where_its_keys_go_back() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (a, b, c, d) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_millis(200);
    let master = Arc::new(mcstore::storage::MemoryStorage::new());
    let built = Instant::now();
    let (p1, list1) = storage::storage(&[a, b, c], &master, skew);
    support::wait_for("the storage's start", || built.elapsed() > skew);
    let r = storage::Resources::new(&p1);
    r.put(&p1, 1);
    r.check(&p1, 1, "p1 on three");
    storage::change(&list1, &[a, b, c, d]);
    let joined = Instant::now();
    support::wait_for("the windows", || joined.elapsed() > 2 * skew);
    support::wait_for("d's flush", || p1.pending_invalidations() == 0);
    // Started now: it knows nothing of the list before.
    let (p3, list3) = storage::storage(&[a, b, c, d], &master, skew);
    r.put(&p3, 2);
    storage::change(&list1, &[a, b, c]);
    storage::change(&list3, &[a, b, c]);
    let left = Instant::now();
    support::wait_for("the windows", || left.elapsed() > 2 * skew);
    r.check(&p3, 2, "p3 after d left");
    r.check(&p1, 2, "p1 after d left");
}
