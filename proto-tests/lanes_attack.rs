//! Attacks on `connections_per_server(n)`: many lanes sharing one queue, against real
//! memcached. Every reply is checked against its caller's own key and value.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mcstore::{ErrorKind, IoMode, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];
/// Sets `stop` when dropped (also when the test's driver panics: the workers end).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

const MODES: [IoMode; 3] = [IoMode::Adaptive, IoMode::Combining, IoMode::IoThread];

fn build(ms: &[&Memcached], p: Protocol, conns: usize, mode: IoMode, slots: usize) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .servers(ms.iter().map(|m| m.addr()))
        .io_timeout(Duration::from_secs(2))
        .shared()
        .connections_per_server(conns)
        .io_mode(mode)
        .max_in_flight(slots)
        .build()
        .unwrap()
}

/// One caller's checked work: sets and gets of its own keys; every reply must be its own.
fn own_calls(c: &SharedClient, caller: usize, n: usize) {
    let mut buf = Vec::new();
    for i in 0..n {
        let key = format!("lane:{caller}:{}", i % 7);
        let value = format!("v:{caller}:{i}:{}", "x".repeat(i % 50));
        c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let got = c.get_into(key.as_bytes(), &mut buf).unwrap();
        assert!(got.is_some(), "{key} missing right after its set");
        assert_eq!(buf, value.as_bytes(), "caller {caller} got another value");
        if i % 5 == 0 {
            let keys = [key.clone(), format!("lane:{caller}:none")];
            let mut hits = 0;
            c.get_multi(&keys, |k, item| {
                hits += 1;
                assert_eq!(k, key.as_bytes(), "caller {caller}: another key's hit");
                assert_eq!(
                    item.value,
                    value.as_bytes(),
                    "caller {caller}: another value"
                );
            })
            .unwrap();
            assert_eq!(hits, 1, "{keys:?}");
        }
    }
}

async fn own_calls_async(c: SharedClient, caller: usize, n: usize) {
    for i in 0..n {
        let key = format!("lane-a:{caller}:{}", i % 5);
        let value = format!("a:{caller}:{i}");
        c.set_async(key.as_bytes(), value.as_bytes(), SetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let got = c.get_async(key.as_bytes()).await.unwrap();
        assert_eq!(
            got.map(|i| i.value).as_deref(),
            Some(value.as_bytes()),
            "task {caller} got another value"
        );
    }
}

/// Threads and tasks (both runtimes) at once, every mode and protocol, over 2 and 16
/// connections to each of two servers.
#[test]
fn threads_and_tasks_over_many_lanes_get_their_own_replies() {
    let a = Memcached::start();
    let b = Memcached::start();
    for p in PROTOCOLS {
        for (conns, mode) in [(2, MODES[0]), (16, MODES[1]), (5, MODES[2]), (16, MODES[0])] {
            let c = build(&[&a, &b], p, conns, mode, 64);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap();
            let ct = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            std::thread::scope(|s| {
                for t in 0..12 {
                    let c = &c;
                    s.spawn(move || own_calls(c, t, 150));
                }
                let c2 = c.clone();
                s.spawn(move || {
                    ct.block_on(async {
                        let hs: Vec<_> = (0..16)
                            .map(|t| tokio::spawn(own_calls_async(c2.clone(), t, 60)))
                            .collect();
                        for h in hs {
                            h.await.unwrap();
                        }
                    })
                });
                let hs: Vec<_> = (0..16)
                    .map(|t| rt.spawn(own_calls_async(c.clone(), 100 + t, 60)))
                    .collect();
                rt.block_on(async {
                    for h in hs {
                        h.await.unwrap();
                    }
                });
            });
            let used = a.clients() + b.clients();
            assert!(
                used <= 2 * conns as u64,
                "{p:?} {conns}: {used} connections"
            );
            drop(c);
            support::wait_for("every lane closed", || a.clients() + b.clients() == 0);
        }
    }
}

/// One slot and sixteen lanes: callers wait for the slot, never for a deadline, and every
/// call is counted once.
#[test]
fn one_slot_many_lanes_starves_nobody_and_counts_exactly() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        for (slots, mode) in [(1, MODES[2]), (2, MODES[1]), (4, MODES[0])] {
            let c = build(&[&mc], p, 16, mode, slots);
            let calls = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for t in 0..16 {
                    let (c, calls) = (&c, &calls);
                    s.spawn(move || {
                        own_calls(c, t, 60);
                        calls.fetch_add(60 * 2 + 12, Ordering::Relaxed);
                    });
                }
            });
            let counted: u64 = c.server_counters().iter().map(|(_, s)| s.requests).sum();
            let hits: u64 = c.server_counters().iter().map(|(_, s)| s.hits).sum();
            let errors: u64 = c.server_counters().iter().map(|(_, s)| s.errors).sum();
            // Each caller: 60 sets, 60 gets, 12 multi-gets of two keys (one hit each).
            // Requests count what went on the wire (a round's gets may share one), so at
            // most one per call.
            assert!(
                counted <= 16 * (60 * 2 + 12 * 2),
                "{p:?} {slots}: {counted} requests"
            );
            assert_eq!(hits, 16 * (60 + 12), "{p:?} {slots}: hits");
            assert_eq!(errors, 0, "{p:?} {slots}");
            drop(c);
            support::wait_for("every lane closed", || mc.clients() == 0);
        }
    }
}

/// A server frozen and resumed, then killed and restarted, under load on four lanes: every
/// call returns within its deadline (plus a round), an Ok is the caller's own, and calls
/// succeed again afterwards.
#[test]
fn frozen_and_restarted_server_under_lanes_bounds_every_call() {
    let mut mc = Memcached::start();
    let other = Memcached::start();
    for p in PROTOCOLS {
        for mode in MODES {
            let c = support::client_builder()
                .protocol(p)
                .servers([mc.addr(), other.addr()])
                .io_timeout(Duration::from_millis(400))
                .retry_timeout(Duration::from_millis(50))
                .shared()
                .connections_per_server(4)
                .io_mode(mode)
                .build()
                .unwrap();
            let stop = AtomicBool::new(false);
            let oks = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for t in 0..8 {
                    let (c, stop, oks) = (&c, &stop, &oks);
                    s.spawn(move || {
                        let mut buf = Vec::new();
                        let mut i = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            i += 1;
                            let key = format!("fz:{t}:{}", i % 11);
                            let value = format!("{t}:{i}");
                            let start = Instant::now();
                            let set =
                                c.set(key.as_bytes(), value.as_bytes(), SetOptions::default());
                            let got = c.get_into(key.as_bytes(), &mut buf);
                            let took = start.elapsed();
                            assert!(took < Duration::from_secs(3), "{key}: {took:?}");
                            if set.is_ok() {
                                if let Ok(Some(_)) = got {
                                    assert_eq!(buf, value.as_bytes(), "{key}: another value");
                                    oks.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                }
                let (c, stop, oks) = (&c, &stop, &oks);
                let mc = &mut mc;
                s.spawn(move || {
                    let _stop = StopOnDrop(stop);
                    let seen = |n: usize| {
                        let from = oks.load(Ordering::Relaxed);
                        support::wait_for("calls succeeding", || {
                            oks.load(Ordering::Relaxed) >= from + n
                        });
                    };
                    seen(50);
                    mc.freeze();
                    // Rounds on the wire to the frozen server time out.
                    support::wait_for("a timeout counted", || {
                        c.server_counters().iter().any(|(_, s)| s.timeouts > 0)
                    });
                    mc.resume();
                    seen(50);
                    mc.restart();
                    seen(200);
                    stop.store(true, Ordering::Relaxed);
                });
            });
            drop(c);
            support::wait_for("every lane closed", || mc.clients() + other.clients() == 0);
        }
    }
}

/// Dropping the client while every lane is mid-round on a frozen server: its threads end
/// (the connections close) once the rounds time out.
#[test]
fn dropped_client_with_lanes_mid_round_ends_its_threads() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_millis(500))
            .shared()
            .connections_per_server(4)
            .io_mode(IoMode::IoThread)
            .build()
            .unwrap();
        c.set(b"d", b"d", SetOptions::default()).unwrap();
        mc.freeze();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let hs: Vec<_> = (0..32)
            .map(|_| {
                let c = c.clone();
                rt.spawn(async move { c.get_async(b"d").await })
            })
            .collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let c = c.clone();
                s.spawn(move || {
                    let e = c.get(b"d").unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
                });
            }
        });
        drop(c);
        rt.block_on(async {
            for h in hs {
                let r = h.await.unwrap();
                assert!(r.is_err(), "a get on a frozen server succeeded: {r:?}");
            }
        });
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        mc.resume();
        support::wait_for("the dropped client's lanes closed", || mc.clients() == 0);
    }
}

/// The list changes while lanes are mid-round: the calls keep getting their own replies,
/// and the removed server's lanes close.
#[test]
fn list_changes_while_lanes_are_busy() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .servers([ms[0].addr(), ms[1].addr()])
            .distribution(mcstore::ring::Distribution::Ketama)
            .io_timeout(Duration::from_secs(2))
            .shared()
            .connections_per_server(3)
            .build()
            .unwrap();
        let list = c.server_list();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (c, stop) = (&c, &stop);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let key = format!("ll:{t}:{i}");
                        let value = format!("{t}:{i}");
                        c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
                            .unwrap_or_else(|e| panic!("{key}: {e}"));
                        // The key may move between the set and the get: a miss is fine,
                        // another value is not.
                        if c.get_into(key.as_bytes(), &mut buf)
                            .unwrap_or_else(|e| panic!("{key}: {e}"))
                            .is_some()
                        {
                            assert_eq!(buf, value.as_bytes(), "{key}: another value");
                        }
                    }
                });
            }
            let _stop = StopOnDrop(&stop);
            for round in 0..12 {
                let set: Vec<String> = match round % 3 {
                    0 => vec![ms[0].addr(), ms[1].addr(), ms[2].addr()],
                    1 => vec![ms[0].addr(), ms[2].addr()],
                    _ => vec![ms[0].addr(), ms[1].addr()],
                };
                list.set(set).unwrap();
                let a = c
                    .server_counters()
                    .iter()
                    .map(|(_, s)| s.requests)
                    .sum::<u64>();
                support::wait_for("calls on the new list", || {
                    c.server_counters()
                        .iter()
                        .map(|(_, s)| s.requests)
                        .sum::<u64>()
                        > a + 50
                });
            }
            stop.store(true, Ordering::Relaxed);
        });
        drop(c);
        support::wait_for("every lane closed", || {
            ms.iter().map(Memcached::clients).sum::<u64>() == 0
        });
    }
}

/// A multi-key call with more keys on a server than it has slots: it must not wait for a
/// slot that only it could free (it held the slots of its earlier keys, unclaimed, while
/// waiting for another). Failed with every call timing out (`During::Slot`) after 2 s.
#[test]
fn multi_key_call_with_more_keys_than_slots_completes() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        for (conns, mode) in [(1, MODES[2]), (3, MODES[0]), (2, MODES[1])] {
            let c = build(&[&mc], p, conns, mode, 1);
            let keys: Vec<String> = (0..5).map(|i| format!("mk:{i}")).collect();
            let items: Vec<(&String, &String)> = keys.iter().map(|k| (k, k)).collect();
            let start = Instant::now();
            assert_eq!(
                c.set_multi(&items, SetOptions::default()).unwrap(),
                5,
                "{p:?}"
            );
            let mut hits = 0;
            c.get_multi(&keys, |k, item| {
                assert_eq!(k, item.value, "{p:?}: another key's value");
                hits += 1;
            })
            .unwrap_or_else(|e| panic!("{p:?} {conns} {mode:?}: {e}"));
            assert_eq!(hits, 5, "{p:?}");
            assert_eq!(c.delete_multi(&keys).unwrap(), 5, "{p:?}");
            // The same as futures.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let stored = c.set_multi_async(&items, SetOptions::default()).await;
                assert_eq!(stored.unwrap(), 5, "{p:?}");
                let mut hits = 0;
                c.get_multi_async(&keys, |k, item| {
                    assert_eq!(k, item.value, "{p:?}: another key's value");
                    hits += 1;
                })
                .await
                .unwrap_or_else(|e| panic!("{p:?} {conns} {mode:?}: {e}"));
                assert_eq!(hits, 5, "{p:?}");
            });
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{:?}",
                start.elapsed()
            );
        }
    }
}

/// A cache-through storage on a shared client with three connections per server: the
/// storage's lent connection (lane 0) and the batched calls on the other lanes at once.
/// Each writer reads back its own latest write; readers of others' names see only values
/// that were written.
#[test]
fn memcache_storage_over_lanes_reads_its_own_writes() {
    use mcstore::storage::{FsStorage, MemcacheStorage, Storage, StorageError};
    use std::sync::Arc;
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let dir = support::TempDir::new("mcstore-lanes");
        let master: Arc<dyn Storage> = Arc::new(FsStorage::open(&dir.path).unwrap());
        let shared = support::client_builder()
            .server(mc.addr())
            .protocol(p)
            .io_timeout(Duration::from_secs(2))
            .shared()
            .connections_per_server(3)
            .build()
            .unwrap();
        let s = MemcacheStorage::new(shared, master);
        s.create_container("c").unwrap();
        let content = |name: &str| match s.get_content(&s.info("c", Some(name)).unwrap()) {
            Ok(v) => Some(String::from_utf8(v.to_vec()).unwrap()),
            Err(StorageError::NotFound(_)) => None,
            Err(e) => panic!("{name}: {e}"),
        };
        std::thread::scope(|sc| {
            for t in 0..6 {
                let (s, content) = (&s, &content);
                sc.spawn(move || {
                    for i in 0..40 {
                        let name = format!("n{t}-{}", i % 4);
                        let value = format!("{name}:{i}");
                        s.put_content(&s.info("c", Some(&name)).unwrap(), value.as_str().into())
                            .unwrap();
                        assert_eq!(content(&name).as_deref(), Some(&*value), "{p:?}");
                        assert_eq!(content(&name).as_deref(), Some(&*value), "{p:?}");
                        // Another writer's name: absent, or one of its values.
                        let other = format!("n{}-{}", (t + 1) % 6, i % 4);
                        if let Some(v) = content(&other) {
                            assert!(v.starts_with(&format!("{other}:")), "{p:?}: {v}");
                        }
                    }
                });
            }
        });
    }
}

/// Meta calls take lane 0 (lent): under a steady load of futures on every lane, each still
/// returns within its deadline, and its reply is its own.
#[test]
fn lent_lane_under_load_is_bounded_by_its_deadline() {
    let mc = Memcached::start();
    for conns in [1, 4] {
        let c = support::client_builder()
            .protocol(Protocol::Meta)
            .server(mc.addr())
            .io_timeout(Duration::from_millis(500))
            .shared()
            .connections_per_server(conns)
            .io_mode(IoMode::IoThread)
            .build()
            .unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..6 {
                let (c, stop) = (&c, &stop);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    let key = format!("load:{t}");
                    c.set(key.as_bytes(), key.as_bytes(), SetOptions::default())
                        .unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        // Timeouts are the lender's to avoid; a timed-out get here is fine.
                        if let Ok(Some(_)) = c.get_into(key.as_bytes(), &mut buf) {
                            assert_eq!(buf, key.as_bytes());
                        }
                    }
                });
            }
            let _stop = StopOnDrop(&stop);
            for i in 0..60 {
                let key = format!("meta:{i}");
                c.set(key.as_bytes(), key.as_bytes(), SetOptions::default())
                    .ok();
                let start = Instant::now();
                let r = c.meta_debug(key.as_bytes());
                let took = start.elapsed();
                assert!(
                    took < Duration::from_millis(1500),
                    "{conns}: meta call took {took:?}"
                );
                if let Ok(Some(d)) = r {
                    assert!(
                        d.contains(&format!("key={key}")) || !d.contains("key="),
                        "{d}"
                    );
                }
            }
        });
    }
}
