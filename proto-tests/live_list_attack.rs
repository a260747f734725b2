//! Attacks on live server lists (#28), against real memcached on loopback.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, ErrorKind, Pool, SetOptions, StoreMode};
use support::Memcached;

fn builder(servers: &[&Memcached]) -> ClientBuilder {
    support::client_builder()
        .servers(servers.iter().map(|m| m.addr()))
        .distribution(Distribution::Ketama)
}

fn addrs(ms: &[Memcached]) -> Vec<String> {
    ms.iter().map(|m| m.addr()).collect()
}

fn get_str(c: &mut Client, k: &str) -> Option<String> {
    c.get(k.as_bytes())
        .unwrap()
        .map(|i| String::from_utf8(i.value).unwrap())
}

/// Was a bug (fixed): a client with copies can follow a list through the public `ClientBuilder::follow`;
/// the list then takes changes (only a list *built* by a client with copies is frozen), and
/// writes with copies delete nothing where a key was: a key moved away and back reads an
/// older write.
#[test]
fn a_follower_with_copies_reads_an_older_write_after_its_keys_move_back() {
    let ms: Vec<Memcached> = (0..5).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let plain = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let list = plain.server_list().clone();
    let mut copies = builder(&[&ms[0], &ms[1], &ms[2]])
        .replicas(2)
        .follow(&list)
        .build()
        .unwrap();
    let keys: Vec<String> = (0..500).map(|i| format!("copies:{i}")).collect();
    for k in &keys {
        copies
            .set(k.as_bytes(), b"old", SetOptions::default())
            .unwrap();
    }
    if let Err(e) = list.set(&all) {
        // What a list followed by a client with copies should do.
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        return;
    }
    for k in &keys {
        copies
            .set(k.as_bytes(), b"new", SetOptions::default())
            .unwrap();
    }
    list.set(&all[..3]).unwrap();
    let stale: Vec<&String> = keys
        .iter()
        .filter(|k| get_str(&mut copies, k).as_deref() == Some("old"))
        .collect();
    assert!(
        stale.is_empty(),
        "the list of a client with copies took a change (not refused), and {} of {} keys \
         read an older write after moving back, e.g. {}",
        stale.len(),
        keys.len(),
        stale[0]
    );
}

/// Was a bug (fixed): `flush_server` looks the server up before the client takes the new list: a server
/// the list just added is "not in this client" until some other call is made.
#[test]
fn flush_server_finds_a_server_the_list_just_added() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut c = builder(&[&ms[0], &ms[1]]).build().unwrap();
    c.set(b"warm", b"v", SetOptions::default()).unwrap();
    c.server_list().clone().set(addrs(&ms)).unwrap();
    let r = c.flush_server(&ms[2].addr(), None);
    assert!(r.is_ok(), "flush_server of a server just added: {r:?}");
}

/// Was a bug (fixed): with damping, a server dropped from the middle of the list is kept (as it should)
/// but moved to the end of the list, and that reorder is swapped in as a new generation
/// that reports no change; with a rate limit, it also holds back the next real change.
#[test]
fn a_damped_removal_of_a_middle_server_changes_no_generation() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let c = builder(&[&ms[0], &ms[1], &ms[2], &ms[3]])
        .list_damping(Duration::from_secs(30))
        .build()
        .unwrap();
    let list = c.server_list().clone();
    let without_second = [all[0].clone(), all[2].clone(), all[3].clone()];
    let gone = list.set(&without_second).unwrap();
    assert!(!gone.applied() && gone.pending, "{gone:?}");
    assert_eq!(
        (list.generation(), list.servers()),
        (0, all.clone()),
        "a damped removal swapped in a new list: {gone:?}"
    );
    let back = list.set(&all).unwrap();
    assert!(!back.applied(), "{back:?}");
    assert_eq!(list.generation(), 0, "{back:?}");
}

/// Was a bug (fixed): the same servers in another order are swapped in as a new generation (every client
/// takes a new list) while `ListChange` says nothing changed, and with a rate limit the
/// reorder holds back the next real change (a discovery source whose order varies).
#[test]
fn a_reordered_list_is_not_a_change_and_does_not_hold_back_the_next() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let c = builder(&[&ms[0], &ms[1]])
        .list_min_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let list = c.server_list().clone();
    let swapped = list.set([&all[1], &all[0]]).unwrap();
    assert!(!swapped.applied(), "{swapped:?}");
    assert_eq!(
        list.generation(),
        0,
        "a reorder moved the generation while reporting no change: {swapped:?}"
    );
    let added = list.set([&all[1], &all[0], &all[2]]).unwrap();
    assert!(
        added.applied(),
        "the first real change was held back: {added:?}"
    );
}

/// Was a bug (fixed): `Client::servers()` still names servers the list removed (and is only updated by
/// the next call).
#[test]
fn client_servers_are_the_list_servers() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let mut c = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let list = c.server_list().clone();
    list.set([&all[0], &all[2]]).unwrap();
    c.get(b"sync").unwrap();
    assert_eq!(c.server_counters().len(), 2);
    assert_eq!(
        c.servers().to_vec(),
        list.servers(),
        "Client::servers() after a removal"
    );
}

/// A client idle while a server left and came back (restarted while out of the list): the
/// client never took the list without it, so it may still hold a connection to the old
/// process. Its next call there must not fail.
#[test]
fn an_idle_client_does_not_fail_on_a_server_that_left_and_came_back_restarted() {
    let mut ms: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let mut idle = builder(&[&ms[0], &ms[1]]).build().unwrap();
    let list = idle.server_list().clone();
    let mut busy = builder(&[&ms[0], &ms[1]]).follow(&list).build().unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("idle:{i}")).collect();
    let on_second: Vec<&String> = keys
        .iter()
        .filter(|k| idle.server_for_key(k.as_bytes()).unwrap() == all[1])
        .collect();
    assert!(!on_second.is_empty());
    // Connected to the second server.
    idle.set(on_second[0].as_bytes(), b"v", SetOptions::default())
        .unwrap();
    list.set(&all[..1]).unwrap();
    busy.get(b"x").unwrap();
    ms[1].restart();
    list.set(&all).unwrap();
    let r = idle.set(on_second[0].as_bytes(), b"w", SetOptions::default());
    assert!(
        r.is_ok(),
        "first call of an idle client on a server that left and came back: {r:?}"
    );
    assert_eq!(get_str(&mut idle, on_second[0]).as_deref(), Some("w"));
}

/// Was a bug (fixed): (race): a client built (`follow`) while `set` grows the list can get a health record
/// wider than its continuum; with `remove_failed_servers` its first call panics indexing
/// the continuum.
#[test]
fn clients_built_while_the_list_grows_do_not_panic() {
    let m = Memcached::start();
    let first = builder(&[&m]).remove_failed_servers(true).build().unwrap();
    let list = first.server_list().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let grower = {
        let (list, stop, base) = (list.clone(), stop.clone(), m.addr());
        thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                // Nothing listens there: nothing connects until a call routes there.
                let fake = format!("127.0.0.2:{}", 1024 + n);
                list.set([base.as_str(), fake.as_str()]).unwrap();
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut built = 0u64;
    let mut panicked = None;
    while Instant::now() < deadline && !grower.is_finished() {
        let list = list.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let mut c = builder(&[])
                .remove_failed_servers(true)
                .follow(&list)
                .build()
                .unwrap();
            let _ = c.server_for_key(b"k");
        }));
        built += 1;
        if let Err(p) = r {
            panicked = Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            );
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sets = grower.join().unwrap();
    assert!(
        panicked.is_none(),
        "a client built while the list grew panicked on its first call (after {built} \
         clients, {sets} changes): {panicked:?}"
    );
}

/// A client built on generation 0 and idle over hundreds of changes (hundreds of distinct
/// servers) is used again: every per-server call works on the current servers only.
#[test]
fn a_client_idle_over_hundreds_of_changes_serves_the_current_list() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let mut c = builder(&[&ms[0], &ms[1]]).build().unwrap();
    c.set(b"before", b"v", SetOptions::default()).unwrap();
    let list = c.server_list().clone();
    for n in 0..300u32 {
        let mut l = vec![all[0].clone()];
        l.push(format!("127.0.0.2:{}:{}", 2000 + n, 1 + n % 3));
        l.push(format!("127.0.0.2:{}", 3000 + n));
        list.set(&l).unwrap();
    }
    list.set([&all[2], &all[0]]).unwrap();
    assert_eq!(list.generation(), 301);
    // Before any call: the removed server says so; then everything names the list.
    let e = c.flush_server(&all[1], None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ServerRemoved, "{e}");
    assert_eq!(c.server_counters().len(), 2);
    assert_eq!(c.version().unwrap().len(), 2);
    let stats = c.stats(None).unwrap();
    let mut named: Vec<String> = stats.iter().map(|s| s.server.clone()).collect();
    named.sort();
    let mut want = vec![all[0].clone(), all[2].clone()];
    want.sort();
    assert_eq!(named, want);
    for i in 0..100 {
        let k = format!("after:{i}");
        c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
            .unwrap();
        assert_eq!(get_str(&mut c, &k).as_deref(), Some(k.as_str()));
    }
    c.flush_server(&all[2], None).unwrap();
    c.flush_all(None).unwrap();
    // A pool built now, over the grown list, works too.
    let pool = Pool::new(builder(&[]).follow(&list), 2).unwrap();
    let mut p = pool.get().unwrap();
    p.set(b"pool", b"v", SetOptions::default()).unwrap();
    assert_eq!(p.server_counters().len(), 2);
}

/// Sets from several threads at once: each is applied whole, and the generation counts them.
#[test]
fn concurrent_sets_are_serialised() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let pool = Pool::new(builder(&[&ms[0], &ms[1]]), 4).unwrap();
    let list = pool.server_list().clone();
    let applied = Arc::new(AtomicU64::new(0));
    let setters: Vec<_> = (0..4)
        .map(|t| {
            let (list, all, applied) = (list.clone(), all.clone(), applied.clone());
            thread::spawn(move || {
                for n in 0..200usize {
                    let w = 1 + (n + t) % 3;
                    let l = vec![
                        format!("{}:{w}", all[(n + t) % 4]),
                        all[(n + t + 1) % 4].clone(),
                        all[(n + t + 2) % 4].clone(),
                    ];
                    if list.set(&l).unwrap().applied() {
                        applied.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Callers meanwhile: every reply is its own (flushing is not needed: values name key).
    let callers: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut c = pool.get().unwrap();
                for n in 0..400 {
                    let k = format!("c{t}:{}", n % 20);
                    c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
                        .unwrap();
                    if let Some(v) = c.get(k.as_bytes()).unwrap() {
                        assert_eq!(v.value, k.as_bytes());
                    }
                }
            })
        })
        .collect();
    for s in setters {
        s.join().unwrap();
    }
    for c in callers {
        c.join().unwrap();
    }
    assert_eq!(list.generation(), applied.load(Ordering::Relaxed));
    let mut c = pool.get().unwrap();
    assert_eq!(c.server_counters().len(), 3);
    c.version().unwrap();
}

/// Shared clients follow a list (another front's, too) and zones refuse changes; all keep
/// serving.
#[test]
fn shared_clients_follow_and_zones_refuse_changes_and_keep_serving() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let shared = builder(&[&ms[0], &ms[1]]).shared().build().unwrap();
    let router = builder(&[&ms[0], &ms[1]]).build().unwrap();
    // A pool following the list the shared client was built over...
    let pool = Pool::new(builder(&[]).follow(router.server_list()), 2).unwrap();
    let s2 = builder(&[])
        .follow(pool.server_list())
        .shared()
        .build()
        .unwrap();
    // ...all follow it: a change is taken by every one of them.
    assert!(pool.server_list().set(&all).unwrap().applied());
    assert_eq!(s2.servers().len(), 3);
    assert_eq!(shared.servers().len(), 2, "another list");
    shared.set(b"k", b"v", SetOptions::default()).unwrap();
    s2.set(b"k2", b"v", SetOptions::default()).unwrap();
    let mut p = pool.get().unwrap();
    assert_eq!(p.get(b"k2").unwrap().map(|i| i.value), Some(b"v".to_vec()));
    let mut z = support::client_builder()
        .distribution(Distribution::Ketama)
        .zone("a", [all[0].clone()])
        .zone("b", [all[1].clone()])
        .build()
        .unwrap();
    let e = z.server_list().set(&all).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    z.set(b"z", b"v", SetOptions::default()).unwrap();
    assert_eq!(get_str(&mut z, "z").as_deref(), Some("v"));
}

/// Calls of every kind (single, multi-key, pipelines, noreply, counters) on a pool while the
/// list changes servers, order and weights: every reply is its caller's and key's, and no
/// read returns an older write of the caller (a server is emptied before it comes back).
#[test]
fn every_kind_of_call_under_reweights_and_reorders() {
    let base: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let spare = Memcached::start();
    let b = addrs(&base);
    let pool = Pool::new(
        builder(&base.iter().collect::<Vec<_>>()).io_timeout(Duration::from_secs(2)),
        8,
    )
    .unwrap();
    let list = pool.server_list().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..8)
        .map(|t| {
            let (pool, stop, bad, ops) = (pool.clone(), stop.clone(), bad.clone(), ops.clone());
            thread::spawn(move || {
                let mut c = pool.get().unwrap();
                let mut rng = support::Rng(t as u64 * 31 + 7);
                let mut last: Vec<Option<u64>> = vec![None; 8];
                let mut seq = 0u64;
                let key = |j: usize| format!("kind:{t}:{j}");
                let val = |j: usize, s: u64| format!("t{t}:{j}:{s}");
                let check = |j: usize, got: Option<&[u8]>, last: &[Option<u64>]| {
                    let Some(v) = got else { return };
                    let v = String::from_utf8_lossy(v).to_string();
                    let ok = match v.rsplit_once(':') {
                        Some((owner, s)) => {
                            owner == format!("t{t}:{j}")
                                && last[j].is_none_or(|l| s.parse::<u64>().ok() == Some(l))
                        }
                        None => false,
                    };
                    if !ok {
                        eprintln!("{} read {v}, last {:?}", key(j), last[j]);
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    ops.fetch_add(1, Ordering::Relaxed);
                    let j = rng.below(8) as usize;
                    let j2 = (j + 1 + rng.below(7) as usize) % 8;
                    match rng.below(6) {
                        0 => {
                            seq += 1;
                            let r = c.set(
                                key(j).as_bytes(),
                                val(j, seq).as_bytes(),
                                SetOptions::default(),
                            );
                            last[j] = r.is_ok().then_some(seq);
                        }
                        1 => {
                            seq += 1;
                            let items = [(key(j), val(j, seq)), (key(j2), val(j2, seq))];
                            let r = c.set_multi(
                                &items
                                    .iter()
                                    .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                                    .collect::<Vec<_>>(),
                                SetOptions::default(),
                            );
                            let ok = r.is_ok_and(|n| n == 2);
                            last[j] = ok.then_some(seq);
                            last[j2] = ok.then_some(seq);
                        }
                        2 => {
                            seq += 1;
                            let r = {
                                let mut p = c.pipeline();
                                p.store(
                                    StoreMode::Set,
                                    key(j).as_bytes(),
                                    val(j, seq).as_bytes(),
                                    SetOptions::default(),
                                )
                                .and_then(|p| {
                                    p.set(
                                        key(j2).as_bytes(),
                                        val(j2, seq).as_bytes(),
                                        SetOptions::default(),
                                    )
                                })
                                .map(|_| ())
                                .and_then(|()| p.finish().map(|_| ()))
                            };
                            last[j] = r.is_ok().then_some(seq);
                            last[j2] = r.is_ok().then_some(seq);
                        }
                        3 => {
                            seq += 1;
                            let r = c.store_noreply(
                                StoreMode::Set,
                                key(j).as_bytes(),
                                val(j, seq).as_bytes(),
                                SetOptions::default(),
                            );
                            last[j] = r.is_ok().then_some(seq);
                            // Confirmed by the next call on the connection.
                            if c.get(key(j).as_bytes()).is_err() {
                                last[j] = None;
                            }
                        }
                        4 => {
                            let ks = [key(j), key(j2)];
                            let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                            if c.get_multi(&ks, |k, item| {
                                got.push((k.to_vec(), item.value.to_vec()))
                            })
                            .is_ok()
                            {
                                for (k, v) in got {
                                    let jj = if k == ks[0].as_bytes() {
                                        j
                                    } else if k == ks[1].as_bytes() {
                                        j2
                                    } else {
                                        bad.fetch_add(1, Ordering::Relaxed);
                                        eprintln!(
                                            "get_multi returned foreign key {}",
                                            String::from_utf8_lossy(&k)
                                        );
                                        continue;
                                    };
                                    check(jj, Some(&v), &last);
                                }
                            }
                        }
                        _ => {
                            if rng.below(4) == 0 {
                                let r = c.delete_multi(&[key(j)]);
                                last[j] = None;
                                if r.is_ok() {
                                    // Deleted: a hit now would be an older write.
                                    last[j] = Some(u64::MAX);
                                }
                            } else if let Ok(v) = c.get(key(j).as_bytes()) {
                                check(j, v.as_ref().map(|i| &i.value[..]), &last);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut k = 0usize;
    while Instant::now() < deadline {
        k += 1;
        // Reorder and reweight the base...
        let w = |i: usize| format!("{}:{}", b[(i + k) % 3], 1 + (i + k) % 3);
        list.set([w(0), w(1), w(2)]).unwrap();
        thread::sleep(Duration::from_millis(30));
        // ...add the spare (empty), then remove it and empty it once nobody is connected.
        list.set([w(2), spare.addr(), w(0), w(1)]).unwrap();
        thread::sleep(Duration::from_millis(30));
        list.set([b[0].clone(), b[1].clone(), b[2].clone()])
            .unwrap();
        support::wait_for("the clients to leave the spare", || spare.clients() == 0);
        spare.client().flush_all(None).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    eprintln!(
        "ops={} bad={} generation={}",
        ops.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed),
        list.generation()
    );
    assert!(ops.load(Ordering::Relaxed) > 500);
    assert_eq!(bad.load(Ordering::Relaxed), 0, "foreign or older replies");
}

/// Was a bug (fixed): `dump_keys` looks the server up before the client takes the new list (as
/// `flush_server`): a server the list just added is "not in this client".
#[test]
fn dump_keys_finds_a_server_the_list_just_added() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut c = builder(&[&ms[0], &ms[1]])
        .protocol(mcstore::Protocol::Text)
        .build()
        .unwrap();
    c.set(b"warm", b"v", SetOptions::default()).unwrap();
    c.server_list().clone().set(addrs(&ms)).unwrap();
    let r = c.dump_keys(&ms[2].addr(), |_, _| {});
    assert!(r.is_ok(), "dump_keys of a server just added: {r:?}");
}

/// Histories of list changes (servers joining, leaving, coming back emptied, weights and
/// order changing) with writes of every kind in between: every read is the key's last
/// write or a miss. Several distributions, hashes and a hashed namespace.
#[test]
fn random_histories_never_read_an_older_write() {
    let ms: Vec<Memcached> = (0..5).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let configs: [(Distribution, mcstore::ring::HashFn, bool); 3] = [
        (
            Distribution::Ketama,
            mcstore::ring::HashFn::OneAtATime,
            false,
        ),
        (
            Distribution::KetamaWeighted,
            mcstore::ring::HashFn::Md5,
            true,
        ),
        (Distribution::Ketama, mcstore::ring::HashFn::Crc, false),
    ];
    for (round, (dist, hash, ns)) in configs.into_iter().enumerate() {
        for m in &ms {
            m.client().flush_all(None).unwrap();
        }
        let mut b = support::client_builder()
            .servers(&all[..3])
            .distribution(dist)
            .hash(hash);
        if ns {
            b = b.namespace("ns:");
        }
        let mut c = b.build().unwrap();
        let list = c.server_list().clone();
        let mut rng = support::Rng(round as u64 + 11);
        let keys: Vec<String> = (0..150).map(|i| format!("h{round}:{i}")).collect();
        // The last value written per key: None = deleted (or never written).
        let mut last: Vec<Option<String>> = vec![None; keys.len()];
        let mut members: Vec<usize> = vec![0, 1, 2];
        let mut seq = 0u64;
        for g in 0..25 {
            // Writes of every kind.
            for (j, k) in keys.iter().enumerate() {
                if rng.below(3) != 0 {
                    continue;
                }
                seq += 1;
                let v = format!("{seq}");
                let key = k.as_bytes();
                match rng.below(7) {
                    0 => {
                        c.set(key, v.as_bytes(), SetOptions::default()).unwrap();
                        last[j] = Some(v);
                    }
                    1 => {
                        c.set_multi(&[(key, v.as_bytes())], SetOptions::default())
                            .unwrap();
                        last[j] = Some(v);
                    }
                    2 => {
                        c.store_noreply(StoreMode::Set, key, v.as_bytes(), SetOptions::default())
                            .unwrap();
                        last[j] = Some(v);
                    }
                    3 => {
                        c.delete(key).unwrap();
                        last[j] = None;
                    }
                    4 => {
                        // add: stored only if the key is missing on its server now.
                        if c.add(key, v.as_bytes(), SetOptions::default()).unwrap() {
                            last[j] = Some(v);
                        }
                    }
                    5 => {
                        // replace / append where it is now.
                        if c.replace(key, v.as_bytes(), SetOptions::default()).unwrap() {
                            last[j] = Some(v);
                        }
                    }
                    _ => {
                        c.delete_multi(&[key]).unwrap();
                        last[j] = None;
                    }
                }
            }
            c.version().unwrap();
            // Every read: the last write or a miss.
            for (j, k) in keys.iter().enumerate() {
                let got = get_str(&mut c, k);
                if let Some(v) = &got {
                    assert_eq!(
                        Some(v),
                        last[j].as_ref(),
                        "round {round} ({dist:?} {hash:?}) generation {g}: {k} read an older \
                         write (list {:?})",
                        list.servers()
                    );
                }
            }
            // The next list: a server joins, leaves, or weights/order change.
            let before = members.clone();
            match rng.below(3) {
                0 if members.len() < 5 => {
                    let out: Vec<usize> = (0..5).filter(|i| !members.contains(i)).collect();
                    let pos = rng.below(members.len() as u64 + 1) as usize;
                    members.insert(pos, out[rng.below(out.len() as u64) as usize]);
                }
                1 if members.len() > 2 => {
                    members.remove(rng.below(members.len() as u64) as usize);
                }
                _ => {
                    let r = rng.below(members.len() as u64) as usize;
                    members.rotate_left(r);
                }
            }
            let spec: Vec<String> = members
                .iter()
                .map(|&i| format!("{}:{}", all[i], 1 + rng.below(3)))
                .collect();
            list.set(&spec).unwrap();
            // A removed server is emptied before it can come back (this client closes its
            // connection as it takes the list: make a call first).
            c.get(b"sync").unwrap();
            for i in before {
                if !members.contains(&i) {
                    ms[i].client().flush_all(None).unwrap();
                }
            }
        }
    }
}

/// Was a bug (fixed): `home_server_for_key` does not take the new list: right after a removal it still
/// names the removed server.
#[test]
fn home_server_for_key_follows_the_list() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let mut c = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("home:{i}")).collect();
    let k = keys
        .iter()
        .find(|k| c.home_server_for_key(k.as_bytes()).unwrap() == all[1])
        .unwrap()
        .clone();
    c.server_list().clone().set([&all[0], &all[2]]).unwrap();
    let home = c.home_server_for_key(k.as_bytes()).unwrap().to_string();
    assert_ne!(home, all[1], "home of {k} is a removed server");
}

/// Keys of `c` whose server is `server` now.
fn keys_on(c: &mut Client, keys: &[String], server: &str) -> Vec<String> {
    keys.iter()
        .filter(|k| c.server_for_key(k.as_bytes()).unwrap() == server)
        .cloned()
        .collect()
}

/// Was a bug (fixed): a client built after the list changed (here with `follow`) starts with no previous
/// owners (`Core::new` sets an empty handover and the client never adopts the generation
/// it was built on): its writes of a moved key delete nothing where the key was, and the
/// key read after moving back is an older write.
#[test]
fn a_client_built_after_a_change_deletes_where_keys_were() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let mut first = builder(&[&ms[0], &ms[1], &ms[2]]).build().unwrap();
    let list = first.server_list().clone();
    let keys: Vec<String> = (0..300).map(|i| format!("late:{i}")).collect();
    for k in &keys {
        first
            .set(k.as_bytes(), b"old", SetOptions::default())
            .unwrap();
    }
    list.set(&all).unwrap();
    let moved = keys_on(&mut first, &keys, &all[3]);
    assert!(moved.len() > 20, "{} moved", moved.len());
    // Built now, on generation 1.
    let mut late = builder(&[]).follow(&list).build().unwrap();
    for k in &moved {
        late.set(k.as_bytes(), b"new", SetOptions::default())
            .unwrap();
    }
    list.set(&all[..3]).unwrap();
    let stale: Vec<&String> = moved
        .iter()
        .filter(|k| get_str(&mut late, k).as_deref() == Some("old"))
        .collect();
    assert!(
        stale.is_empty(),
        "{} of {} moved keys read an older write after moving back (written by a client \
         built after the change), e.g. {}",
        stale.len(),
        moved.len(),
        stale[0]
    );
}

/// Was a bug (fixed): the same through a pool: a client the pool builds to replace a discarded one, after
/// a change, deletes nothing where keys were.
#[test]
fn a_pool_client_rebuilt_after_a_change_deletes_where_keys_were() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let all = addrs(&ms);
    let pool = Pool::new(builder(&[&ms[0], &ms[1], &ms[2]]), 1).unwrap();
    let list = pool.server_list().clone();
    let keys: Vec<String> = (0..300).map(|i| format!("pooled:{i}")).collect();
    let moved = {
        let mut c = pool.get().unwrap();
        for k in &keys {
            c.set(k.as_bytes(), b"old", SetOptions::default()).unwrap();
        }
        list.set(&all).unwrap();
        keys_on(&mut c, &keys, &all[3])
    };
    assert!(moved.len() > 20, "{} moved", moved.len());
    // A caller that saw an error drops its client: the pool builds a new one.
    pool.get().unwrap().discard();
    {
        let mut c = pool.get().unwrap();
        for k in &moved {
            c.set(k.as_bytes(), b"new", SetOptions::default()).unwrap();
        }
    }
    list.set(&all[..3]).unwrap();
    let mut c = pool.get().unwrap();
    let stale: Vec<&String> = moved
        .iter()
        .filter(|k| get_str(&mut c, k).as_deref() == Some("old"))
        .collect();
    assert!(
        stale.is_empty(),
        "{} of {} moved keys read an older write after moving back, e.g. {}",
        stale.len(),
        moved.len(),
        stale[0]
    );
}
