//! Heap allocations per call on the hot path, counted by a global allocator in this test
//! binary only (harness = false: one thread, nothing else allocating while armed).
#![deny(clippy::undocumented_unsafe_blocks)]

use mcstore_test_support as support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mcstore::SetOptions;
use support::Memcached;

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments; the
// counter adds no allocation and no other effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `GlobalAlloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `GlobalAlloc`'s contract, passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `GlobalAlloc`'s contract, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc`'s contract, passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CALLS: usize = 1000;

/// Runs `f` CALLS times after a warm-up, returning the allocations counted while armed.
/// This process's threads.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

fn count(mut f: impl FnMut()) -> usize {
    for _ in 0..50 {
        f();
    }
    ALLOCS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..CALLS {
        f();
    }
    ARMED.store(false, Ordering::SeqCst);
    ALLOCS.load(Ordering::SeqCst)
}

/// `measure` (allocations in one pass of calls) until a pass stays within `bound`, at most
/// ten passes: the first such pass, else the smallest. Where a load's shape depends on timing
/// (how many calls a round takes, how many slots hedges hold, how deep a pipeline goes), a
/// pass that sets a new high grows a buffer once more: that pass is still warm-up, and what is
/// asserted is that the client settles into passes within the bound.
fn settled(mut measure: impl FnMut() -> usize, bound: usize) -> usize {
    let mut least = usize::MAX;
    for pass in 1..=10 {
        let n = measure();
        if n <= bound {
            return n;
        }
        println!("alloc: pass {pass} allocated {n} (more than {bound}): measured again");
        least = least.min(n);
    }
    least
}

/// Allocations during CALLS pipelined sets, after enough sets to grow the write buffer to
/// its flush size.
fn pipelined_sets(c: &mut mcstore::Client, value: &[u8]) -> usize {
    let mut p = c.pipeline();
    let opts = SetOptions::default();
    for _ in 0..2000 {
        p.set(b"p", value, opts).unwrap();
    }
    ALLOCS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..CALLS {
        p.set(b"p", value, opts).unwrap();
    }
    ARMED.store(false, Ordering::SeqCst);
    let n = ALLOCS.load(Ordering::SeqCst);
    assert_eq!(p.finish().unwrap().errors, 0);
    n
}

/// The single-server checks, on one client (one protocol); names get `label` in front.
fn one_server(
    c: &mut mcstore::Client,
    label: &str,
    value: &[u8],
    hundred: &[String],
    results: &mut Vec<(String, usize)>,
) {
    let mut buf = Vec::with_capacity(4096);
    c.set(b"hit", value, SetOptions::default()).unwrap();
    c.set(b"n", b"0", SetOptions::default()).unwrap();
    let mut run = |op: &str, n: usize| results.push((format!("{label}{op}"), n));
    run(
        "get_into (hit)",
        count(|| assert!(c.get_into(b"hit", &mut buf).unwrap().is_some())),
    );
    run(
        "get_into (miss)",
        count(|| assert!(c.get_into(b"miss", &mut buf).unwrap().is_none())),
    );
    run(
        "set",
        count(|| c.set(b"k", value, SetOptions::default()).unwrap()),
    );
    run(
        "delete",
        count(|| {
            c.delete(b"k").unwrap();
        }),
    );
    run(
        "incr",
        count(|| assert!(c.incr(b"n", 1).unwrap().is_some())),
    );
    run("touch", count(|| assert!(c.touch(b"hit", 0).unwrap())));
    // Multi-key calls reuse the previous call's plan; pipelined sets reuse the write buffer
    // (warmed past one flush first, since it grows up to the flush size).
    let items: Vec<(&str, &[u8])> = hundred.iter().map(|k| (k.as_str(), value)).collect();
    c.set_multi(&items, SetOptions::default()).unwrap();
    run(
        "get_multi (100 keys)",
        count(|| {
            let mut n = 0;
            c.get_multi(hundred, |_, _| n += 1).unwrap();
            assert_eq!(n, 100);
        }),
    );
    run(
        "set_multi (100 items)",
        count(|| assert_eq!(c.set_multi(&items, SetOptions::default()).unwrap(), 100)),
    );
    run("pipelined set, per set", pipelined_sets(c, value));
}

/// Allocations while `threads` threads each make CALLS calls with `call` on one shared
/// client (after a warm-up each, unarmed): queued calls, slots, parking and waking.
fn shared_threads(
    c: &mcstore::SharedClient,
    threads: usize,
    call: impl Fn(&mcstore::SharedClient, usize, &mut Vec<u8>) + Sync,
) -> usize {
    let (warm, go, done) = (
        std::sync::Barrier::new(threads + 1),
        std::sync::Barrier::new(threads + 1),
        std::sync::Barrier::new(threads + 1),
    );
    std::thread::scope(|s| {
        for t in 0..threads {
            let (call, warm, go, done) = (&call, &warm, &go, &done);
            s.spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                for _ in 0..200 {
                    call(c, t, &mut buf);
                }
                warm.wait();
                go.wait();
                for _ in 0..CALLS {
                    call(c, t, &mut buf);
                }
                done.wait();
            });
        }
        warm.wait();
        ALLOCS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        go.wait();
        done.wait();
        ARMED.store(false, Ordering::SeqCst);
    });
    ALLOCS.load(Ordering::SeqCst)
}

/// Allocations while `N` futures each make CALLS async gets on one shared client, polled
/// together by `futures_executor::block_on` (after a warm-up round, unarmed): slots, wakers
/// and the I/O thread's rounds.
fn shared_async<const N: usize>(c: &mcstore::SharedClient, key: &[u8]) -> usize {
    let run = |calls: usize| {
        let mut bufs: [Vec<u8>; N] = std::array::from_fn(|_| Vec::with_capacity(4096));
        let mut tasks = bufs.each_mut().map(|buf| {
            Box::pin(async move {
                for _ in 0..calls {
                    assert!(c.get_into_async(key, buf).await.unwrap().is_some());
                }
            })
        });
        let mut done = [false; N];
        futures_executor::block_on(std::future::poll_fn(|cx| {
            for (t, d) in tasks.iter_mut().zip(done.iter_mut()) {
                if !*d {
                    *d = t.as_mut().poll(cx).is_ready();
                }
            }
            if done.iter().all(|d| *d) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        }));
    };
    run(200);
    // The futures are boxed once each before arming: the calls they make are what is counted.
    let mut bufs: [Vec<u8>; N] = std::array::from_fn(|_| Vec::with_capacity(4096));
    let mut tasks = bufs.each_mut().map(|buf| {
        Box::pin(async move {
            for _ in 0..CALLS {
                assert!(c.get_into_async(key, buf).await.unwrap().is_some());
            }
        })
    });
    let mut done = [false; N];
    ALLOCS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    futures_executor::block_on(std::future::poll_fn(|cx| {
        for (t, d) in tasks.iter_mut().zip(done.iter_mut()) {
            if !*d {
                *d = t.as_mut().poll(cx).is_ready();
            }
        }
        if done.iter().all(|d| *d) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }));
    ARMED.store(false, Ordering::SeqCst);
    ALLOCS.load(Ordering::SeqCst)
}

/// A shared client's calls from 8 threads (gets and sets) and from 16 futures, per call.
fn shared_concurrent(sc: &mcstore::SharedClient, label: &str, results: &mut Vec<(String, usize)>) {
    let n = settled(
        || {
            shared_threads(sc, 8, |c, t, buf| {
                if t % 4 == 3 {
                    c.set(b"k", b"v", SetOptions::default()).unwrap();
                } else {
                    assert!(c.get_into(b"hit", buf).unwrap().is_some());
                }
            })
        },
        0,
    );
    run_owned(
        results,
        &format!("shared {label}get_into/set (8 threads, per call)"),
        n / 8,
    );
    let n = settled(|| shared_async::<16>(sc, b"hit"), 0);
    run_owned(
        results,
        &format!("shared {label}get_into_async (16 futures, per call)"),
        n / 16,
    );
}

fn run_owned(results: &mut Vec<(String, usize)>, name: &str, n: usize) {
    results.push((name.to_string(), n));
}

fn main() {
    let mc = Memcached::start();
    let value = vec![b'v'; 100];
    let mut buf = Vec::with_capacity(4096);
    let hundred: Vec<String> = (0..100).map(|i| format!("m-{i}")).collect();

    let mut results: Vec<(String, usize)> = Vec::new();
    let mut run = |name: &str, n: usize| results.push((name.to_string(), n));

    run(
        "negative control (Vec::with_capacity(16))",
        count(|| {
            black_box(Vec::<u8>::with_capacity(16));
        }),
    );

    // Three servers, ketama: routing adds no allocation either.
    let three: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut multi = mcstore::Client::builder()
        .servers(three.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .namespace("ns:")
        .build()
        .unwrap();
    let ring = multi.continuum().clone();
    let keys: Vec<String> = (0..64).map(|i| format!("key-{i}")).collect();
    for k in &keys {
        multi
            .set(k.as_bytes(), &value, SetOptions::default())
            .unwrap();
    }
    let mut next = 0;
    run(
        "Continuum::pick (ketama, 3 servers)",
        count(|| {
            next = (next + 1) % keys.len();
            black_box(ring.pick(keys[next].as_bytes()));
        }),
    );
    run(
        "get_into (hit, 3 servers, ketama, namespace)",
        count(|| {
            next = (next + 1) % keys.len();
            assert!(multi
                .get_into(keys[next].as_bytes(), &mut buf)
                .unwrap()
                .is_some());
        }),
    );
    run(
        "set (3 servers, ketama, namespace)",
        count(|| {
            next = (next + 1) % keys.len();
            multi
                .set(keys[next].as_bytes(), &value, SetOptions::default())
                .unwrap();
        }),
    );

    let ns_keys = &keys[..];
    run(
        "get_multi (64 keys, 3 servers, ketama, namespace)",
        count(|| {
            let mut n = 0;
            multi.get_multi(ns_keys, |_, _| n += 1).unwrap();
            assert_eq!(n, 64);
        }),
    );
    run(
        "delete_multi (64 missing keys, 3 servers, ketama, namespace)",
        count(|| assert_eq!(multi.delete_multi(&hundred).unwrap(), 0)),
    );
    // After a live list change (#28): a write of a key that moved also deletes it where it
    // was (one more round trip), and nothing is allocated for it either.
    let mut moved = mcstore::Client::builder()
        .servers(three[..2].iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .build()
        .unwrap();
    let change = moved
        .server_list()
        .set(three.iter().map(Memcached::addr))
        .unwrap();
    assert!(change.applied());
    for k in &keys {
        moved
            .set(k.as_bytes(), &value, SetOptions::default())
            .unwrap();
        moved.get_into(k.as_bytes(), &mut buf).unwrap();
    }
    run(
        "set after a list change (some keys moved: deleted where they were)",
        count(|| {
            next = (next + 1) % keys.len();
            moved
                .set(keys[next].as_bytes(), &value, SetOptions::default())
                .unwrap();
        }),
    );

    // Copies (#27): a read from one copy (with its fleet bookkeeping) and a write to both.
    let mut copies = mcstore::Client::builder()
        .servers(three.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .replicas(2)
        .build()
        .unwrap();
    for k in &keys {
        copies
            .set(k.as_bytes(), &value, SetOptions::default())
            .unwrap();
    }
    run(
        "get_into (replicas 2, 3 servers)",
        count(|| {
            next = (next + 1) % keys.len();
            assert!(copies
                .get_into(keys[next].as_bytes(), &mut buf)
                .unwrap()
                .is_some());
        }),
    );
    run(
        "set (replicas 2, 3 servers)",
        count(|| {
            next = (next + 1) % keys.len();
            copies
                .set(keys[next].as_bytes(), &value, SetOptions::default())
                .unwrap();
        }),
    );
    // Every read raced on both copies (a hedge at once, budget unlimited): the second
    // copy's buffer and the late replies left on connections cost nothing once warm.
    let mut racing = mcstore::Client::builder()
        .servers(three.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .replicas(2)
        .hedge(mcstore::Hedge::after(std::time::Duration::from_nanos(1)).budget(1.0))
        .build()
        .unwrap();
    for k in &keys {
        assert!(racing.get_into(k.as_bytes(), &mut buf).unwrap().is_some());
    }
    // (name, allocations, calls)
    let mut amortized: Vec<(String, usize, usize)> = Vec::new();
    // Amortized: how many late replies wait on one connection depends on timing, and the
    // queue holding them grows when a rare burst sets a new high (seen once in CI-like runs:
    // 1 allocation in 1,000 calls), up to its bound (`late_has_room`).
    amortized.push((
        "get_into (replicas 2, every read hedged)".into(),
        settled(
            || {
                count(|| {
                    next = (next + 1) % keys.len();
                    assert!(racing
                        .get_into(keys[next].as_bytes(), &mut buf)
                        .unwrap()
                        .is_some());
                })
            },
            CALLS / 100,
        ),
        CALLS,
    ));
    let fc = racing.fleet_counters();
    assert!(fc.hedges_sent > 0, "no read was hedged: {fc:?}");
    let hedged = mcstore::Client::builder()
        .servers(three.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .replicas(2)
        .hedge(mcstore::Hedge::percentile(95.0))
        .shared()
        .build()
        .unwrap();
    // Hedges spread a caller's reads over more request slots than a call without copies
    // (a hedged-away request holds its slot until its late reply): each slot's value
    // buffer grows once. Warmed up here; then nothing is allocated.
    let mut warm = || {
        next = (next + 1) % keys.len();
        assert!(hedged
            .get_into(keys[next].as_bytes(), &mut buf)
            .unwrap()
            .is_some());
    };
    for _ in 0..5 {
        count(&mut warm);
    }
    amortized.push((
        "shared get_into (replicas 2, hedge p95, lone caller)".into(),
        settled(
            || {
                count(|| {
                    next = (next + 1) % keys.len();
                    assert!(hedged
                        .get_into(keys[next].as_bytes(), &mut buf)
                        .unwrap()
                        .is_some());
                })
            },
            CALLS / 100,
        ),
        CALLS,
    ));
    // Settled: a set goes to each copy as a direct call, or queued while a late hedged read
    // still holds a slot there (so by timing), and a round of a kind new to the working space
    // it lands in grows it once.
    run(
        "shared set (replicas 2, lone caller)",
        settled(
            || {
                count(|| {
                    next = (next + 1) % keys.len();
                    hedged
                        .set(keys[next].as_bytes(), &value, SetOptions::default())
                        .unwrap();
                })
            },
            0,
        ),
    );
    for _ in 0..3 {
        shared_async::<16>(&hedged, keys[0].as_bytes());
    }
    amortized.push((
        "shared get_into_async (replicas 2, hedge p95, 16 futures)".into(),
        settled(
            || shared_async::<16>(&hedged, keys[0].as_bytes()),
            16 * CALLS / 100,
        ),
        16 * CALLS,
    ));

    // Every protocol, one server: the same operations.
    for (p, label) in [
        (mcstore::Protocol::Text, ""),
        (mcstore::Protocol::Binary, "binary "),
        (mcstore::Protocol::Meta, "meta "),
    ] {
        one_server(
            &mut mc.client_with(p),
            label,
            &value,
            &hundred,
            &mut results,
        );
    }
    // Meta only: a binary key (base64-encoded on the way out) and a lease-style get.
    let mut m = mc.client_with(mcstore::Protocol::Meta);
    m.set(b"bin\x00key", &value, SetOptions::default()).unwrap();
    run_owned(
        &mut results,
        "meta get_into (hit, binary key)",
        count(|| assert!(m.get_into(b"bin\x00key", &mut buf).unwrap().is_some())),
    );
    let lease = mcstore::MetaGetOptions {
        lease_ttl: Some(30),
        ..Default::default()
    };
    run_owned(
        &mut results,
        "meta meta_get (hit, with lease)",
        count(|| assert!(m.meta_get(b"hit", lease, &mut buf).unwrap().is_some())),
    );

    // The shared client: a lone caller (its call made directly), then concurrent callers
    // (queued, coalesced, parked and woken), blocking and async, every protocol.
    let threads_before = threads();
    for (p, label) in [
        (mcstore::Protocol::Text, ""),
        (mcstore::Protocol::Binary, "binary "),
        (mcstore::Protocol::Meta, "meta "),
    ] {
        // The counter counts every thread's allocations: the threads of the previous
        // protocol's client (dropped) have ended first. (Was a CI failure: 1 allocation in
        // 1,000 meta calls, on a loaded host, while the binary client's I/O thread exited.)
        support::wait_for("the previous shared client's threads to end", || {
            threads() <= threads_before
        });
        let sc = mcstore::Client::builder()
            .server(mc.addr())
            .protocol(p)
            .shared()
            .build()
            .unwrap();
        sc.set(b"hit", &value, SetOptions::default()).unwrap();
        run_owned(
            &mut results,
            &format!("shared {label}get_into (lone caller)"),
            count(|| assert!(sc.get_into(b"hit", &mut buf).unwrap().is_some())),
        );
        run_owned(
            &mut results,
            &format!("shared {label}set (lone caller)"),
            count(|| sc.set(b"k", &value, SetOptions::default()).unwrap()),
        );
        shared_concurrent(&sc, label, &mut results);
    }

    // Two connections per server: rounds on both at once (the second lane's thread and
    // connection start in the warm-up).
    support::wait_for("the previous shared client's threads to end", || {
        threads() <= threads_before
    });
    let two = mcstore::Client::builder()
        .server(mc.addr())
        .shared()
        .connections_per_server(2)
        .build()
        .unwrap();
    two.set(b"hit", &value, SetOptions::default()).unwrap();
    shared_concurrent(&two, "2-connection ", &mut results);
    drop(two);

    // TLS: the same operations over a TLS session (reported and bounded below).
    #[cfg(feature = "tls")]
    let tls_results = {
        let args = support::tls::server_args(&support::tls::certs().server);
        let tls_mc = Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut r = Vec::new();
        for (p, label) in [
            (mcstore::Protocol::Text, "tls "),
            (mcstore::Protocol::Binary, "tls binary "),
            (mcstore::Protocol::Meta, "tls meta "),
        ] {
            let mut c = mcstore::Client::builder()
                .server(tls_mc.addr())
                .protocol(p)
                .tls(support::tls::client_config(false))
                .build()
                .unwrap();
            one_server(&mut c, label, &value, &hundred, &mut r);
        }
        r
    };
    #[cfg(feature = "tls")]
    for (name, n) in &tls_results {
        let per_call = *n as f64 / CALLS as f64;
        println!("alloc: {name}: {n} allocations in {CALLS} calls ({per_call:.3} per call)");
    }

    let mut failed = 0;
    for (name, n) in &results {
        let per_call = *n as f64 / CALLS as f64;
        println!("alloc: {name}: {n} allocations in {CALLS} calls ({per_call:.3} per call)");
    }
    if results[0].1 < CALLS {
        println!("FAILED: the negative control was not counted");
        failed += 1;
    }
    for (name, n) in &results[1..] {
        if *n != 0 {
            println!("FAILED: {name} allocated ({n})");
            failed += 1;
        }
    }
    // Hedged reads allocate now and then: measured 0-3 in 1,000 calls after warm-up. The
    // likely source (not pinned down): a hedged-away request keeps its slot until its late
    // reply, so a hedging caller sometimes takes a slot never used before, whose value
    // buffer grows once. Bounded here at 1 in 100, to catch a cost per call.
    for (name, n, calls) in &amortized {
        let bound = calls / 100;
        println!("alloc: {name}: {n} allocations in {calls} calls (at most {bound})");
        if *n > bound {
            println!("FAILED: {name}: {n} allocations, more than {bound}");
            failed += 1;
        }
    }
    // rustls 0.23 allocates one buffer per TLS record: each record it encrypts (one per
    // request write) and each record it decrypts (one per reply of a single-key call; a
    // multi-key reply spans a few). Both are freed within the call, so nothing grows; the
    // goal of 0 is out of reach without kernel TLS or a rustls with in-place records.
    #[cfg(feature = "tls")]
    for (name, n) in &tls_results {
        let bound = if name.contains("multi") {
            10 * CALLS
        } else if name.contains("pipelined") {
            CALLS / 20
        } else {
            2 * CALLS
        };
        if *n > bound {
            println!("FAILED: {name}: {n} allocations, more than one per TLS record ({bound})");
            failed += 1;
        }
    }
    #[cfg(feature = "tls")]
    let results = [&results[..], &tls_results[..]].concat();
    let passed = results.len() - failed;
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        // `exit` runs no destructor: the servers are stopped first (they would outlive us).
        drop(three);
        drop(mc);
        std::process::exit(1);
    }
}
