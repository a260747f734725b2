//! Attacks on #27 (replicas, failover, hedges, breaker) by an independent review, kept as
//! regression tests: each reproduced a bug (stale read from a copy that missed a completed
//! write, a probe taken and never used, a server never used again after it rejoined, a
//! hedged miss returning another read's value, a pipelined add leaving copies diverged, a
//! failed meta_set not remembered); all pass since their fixes.
use mcstore_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
use mcstore::{Client, Hedge, Protocol, SetOptions, WritePolicy};
use support::Memcached;

const O: SetOptions = SetOptions { flags: 0, ttl: 0 };

use support::{fast_failing_copies as builder, key_on};

fn held(m: &Memcached, key: &str) -> Option<String> {
    m.client()
        .get(key.as_bytes())
        .unwrap()
        .map(|i| String::from_utf8(i.value).unwrap())
}

fn val(r: mcstore::Result<Option<mcstore::client::Item>>) -> String {
    match r {
        Ok(Some(i)) => String::from_utf8(i.value).unwrap(),
        Ok(None) => "<miss>".into(),
        Err(e) => format!("<error: {e}>"),
    }
}

/// Ejects server `b` (frozen during a write to `j`, which has a copy there), then resumes it.
fn eject(c: &mut Client, m: &Memcached, j: &str) {
    m.freeze();
    let _ = c.set(j.as_bytes(), b"x", O);
    m.resume();
}

/// F1: a copy that missed a completed write serves the older value on failover, once
/// another call holds its breaker probe (Standing::Down is never checked for Blocked, and a
/// pinned call only refuses Gate::Down).
#[test]
fn f1_client_failover_reads_copy_that_missed_a_completed_write() {
    let mut ms = vec![Memcached::start(), Memcached::start()];
    let mut c = builder(&ms)
        .write_policy(WritePolicy::Any)
        .retry_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let j = key_on(&ring, 0, 1, "j");
    c.set(k.as_bytes(), b"v1", O).unwrap();
    eject(&mut c, &ms[1], &j); // B out for 1 s
    c.set(k.as_bytes(), b"v2", O).unwrap(); // completed (Any); B skipped, remembered
    println!(
        "after set v2: A={:?} B={:?}",
        held(&ms[0], &k),
        held(&ms[1], &k)
    );
    std::thread::sleep(Duration::from_millis(1100)); // B's retry time came
    println!("read 1: {}", val(c.get(k.as_bytes()))); // takes B's probe, reads A
    ms[0].kill(); // A dies
    let got = val(c.get(k.as_bytes()));
    println!("read 2 (A dead): {got}  counters {:?}", c.fleet_counters());
    assert_ne!(
        got, "v1",
        "read returned v1, which the completed set of v2 replaced"
    );
}

/// F1 with a SharedClient and a hedge: no failure at all, A only slow. `GAT`: a gat is
/// served one by one in the round (perform -> check_routed); with `GAT` false, a get (batched,
/// check_up) is refused on B and the read fails with A's timeout although B is healthy.
fn shared_hedge_case(gat: bool) -> String {
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = builder(&ms)
        .write_policy(WritePolicy::Any)
        .io_timeout(Duration::from_millis(1000))
        .retry_timeout(Duration::from_secs(1))
        .hedge(Hedge::after(Duration::from_millis(20)));
    let ring = b.clone().build().unwrap().continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let r = key_on(&ring, 1, 0, "r");
    let c = b.shared().build().unwrap();
    // Both copies hold v1 before B freezes. Not through `c`: under `Any` its set returns
    // once one copy answered, and the other copy's request, still queued on a loaded host,
    // is withdrawn and repaired (deleted), so the read below could miss, or find its only
    // copy frozen.
    for m in &ms {
        let mut direct = m.client();
        direct.set(k.as_bytes(), b"v1", O).unwrap();
        direct.set(r.as_bytes(), b"v1", O).unwrap();
    }
    ms[1].freeze();
    assert_eq!(val(c.get(r.as_bytes())), "v1"); // hedged to A; B's round times out: ejected
    support::wait_for("B ejected", || c.server_for_key(r.as_bytes()).is_err());
    ms[1].resume();
    c.set(k.as_bytes(), b"v2", O).unwrap(); // completed (Any); B skipped, remembered
    println!(
        "after set v2: A={:?} B={:?}",
        held(&ms[0], &k),
        held(&ms[1], &k)
    );
    // Read k in a loop through B's retry time: the first read after it takes B's probe
    // (before the repair thread does, most of the time) and never uses it.
    let until = Instant::now() + Duration::from_millis(1400);
    while Instant::now() < until {
        // v2, or a miss when a hedge reached B after its repair deleted the key there.
        let got = val(c.get(k.as_bytes()));
        assert!(got == "v2" || got == "<miss>", "read {got}");
    }
    ms[0].freeze(); // A slow: the read is hedged to B
    let t = Instant::now();
    let got = if gat {
        val(c.gat(k.as_bytes(), 0))
    } else {
        val(c.get(k.as_bytes()))
    };
    let took = t.elapsed();
    ms[0].resume();
    println!(
        "{} with A frozen: {got} after {took:?}; B holds {:?}; {:?}",
        if gat { "gat" } else { "get" },
        held(&ms[1], &k),
        c.fleet_counters()
    );
    got
}

#[test]
fn f1_shared_hedged_gat_reads_copy_that_missed_a_completed_write() {
    let got = shared_hedge_case(true);
    assert_ne!(
        got, "v1",
        "hedged gat returned v1, replaced by a completed set"
    );
}

#[test]
fn f2_shared_hedged_get_fails_though_other_copy_healthy() {
    let got = shared_hedge_case(false);
    // B was repaired (the key deleted there) after it missed v2: a hedge to B misses; what
    // it must never do is fail (B is healthy) or return v1.
    assert!(
        got == "v2" || got == "<miss>",
        "A frozen, B healthy: the read should hedge to B, got {got}"
    );
}

/// F2: a read takes the probe of a copy it never asks; writes under All then fail with
/// ServerDown for ~2 s although every server is healthy.
#[test]
fn f2_read_leaks_probe_writes_fail() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let mut c = builder(&ms).build().unwrap(); // All
    let ring = c.continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let r = key_on(&ring, 1, 0, "r");
    c.set(k.as_bytes(), b"v1", O).unwrap();
    c.set(r.as_bytes(), b"v1", O).unwrap();
    ms[1].freeze();
    assert_eq!(val(c.get(r.as_bytes())), "v1"); // B first: times out, fails over; B ejected
    ms[1].resume();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(val(c.get(k.as_bytes())), "v1"); // A answers; B's probe taken, unused
    let t = Instant::now();
    let mut failures = 0;
    let mut first_err = None;
    while c.set(k.as_bytes(), b"v2", O).is_err_and(|e| {
        first_err.get_or_insert(e.to_string());
        true
    }) {
        failures += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "sets failed for {:?} ({failures} calls), first error: {first_err:?}",
        t.elapsed()
    );
    assert_eq!(failures, 0, "B healthy and rejoined, yet sets fail");
}

/// F3: with replicas(1), MemcacheStorage never uses a server again after it rejoined: the
/// route takes the probe, then `instance()` asks for it again and is refused (ServerDown).
#[test]
fn f3_storage_never_uses_rejoined_server() {
    let m = Memcached::start();
    let c = support::client_builder()
        .server(m.addr())
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let master: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = MemcacheStorage::new(c, master);
    s.create_container("c").unwrap();
    let info = s.info("c", Some("r")).unwrap();
    s.put_content(&info, "hello".into()).unwrap();
    s.get_content(&info).unwrap();
    s.get_content(&info).unwrap();
    println!("before: {:?}", s.counters());
    m.freeze();
    s.get_content(&info).unwrap(); // cache times out: ejected
    m.resume();
    std::thread::sleep(Duration::from_millis(300));
    let before = s.counters();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        s.get_content(&info).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = s.counters();
    println!("5 s of reads after the rejoin: before {before:?}\n after {after:?}");
    assert!(
        after.hits > before.hits,
        "no cache hit in 5 s after the server came back"
    );
}

/// F4: a hedge that wins with a miss copies the thread's spare buffer (the last hedged
/// value, possibly another key's / caller's) into the caller's buffer: get_into returns
/// None with `buf` not empty.
#[test]
fn f4_hedged_miss_fills_buffer_with_previous_value() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = builder(&ms)
        .io_timeout(Duration::from_secs(3))
        .server_failure_limit(3)
        .hedge(Hedge::after(Duration::from_millis(20)));
    let ring = b.clone().build().unwrap().continuum().clone();
    let k1 = key_on(&ring, 0, 1, "secret");
    let k2 = key_on(&ring, 0, 1, "absent");
    let c = b.shared().build().unwrap();
    c.set(k1.as_bytes(), b"SECRET-of-k1", O).unwrap();
    ms[0].freeze();
    let mut buf = Vec::new();
    let got = c.get_into(k1.as_bytes(), &mut buf).unwrap();
    assert!(got.is_some());
    ms[0].resume();
    std::thread::sleep(Duration::from_millis(300));
    ms[0].freeze();
    let mut buf2 = Vec::new();
    let got = c.get_into(k2.as_bytes(), &mut buf2).unwrap();
    ms[0].resume();
    println!(
        "get_into({k2}) -> {got:?}, buf = {:?}; {:?}",
        String::from_utf8_lossy(&buf2),
        c.fleet_counters()
    );
    assert!(got.is_none());
    assert!(buf2.is_empty(), "a miss leaves buf empty (documented)");
}

/// F5: a pipelined `add` is not reconciled: the copies end up holding different values.
#[test]
fn f5_pipeline_add_diverges_copies() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let mut c = builder(&ms)
        .io_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    c.set(k.as_bytes(), b"5", O).unwrap();
    assert_eq!(c.incr(k.as_bytes(), 1).unwrap(), Some(6)); // A: 6, B: deleted
    let mut p = c.pipeline();
    p.store(mcstore::StoreMode::Add, k.as_bytes(), b"zzz", O)
        .unwrap();
    println!("{:?}", p.finish().unwrap());
    let (a, b) = (held(&ms[0], &k), held(&ms[1], &k));
    println!("A={a:?} B={b:?}");
    assert!(
        a.is_none() || b.is_none() || a == b,
        "copies disagree: A={a:?} B={b:?}"
    );
}

/// F6: many tokio tasks and threads, hedged reads beside a jittering copy, futures dropped
/// mid-flight (timeouts shorter than the hedge): every hit's value must be its own key's.
#[test]
fn f6_stress_dropped_futures_and_hedges() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let ms = vec![Memcached::start(), Memcached::start(), Memcached::start()];
    let c = builder(&ms)
        .io_timeout(Duration::from_secs(2))
        .server_failure_limit(50)
        .hedge(Hedge::after(Duration::from_micros(300)).budget(1.0))
        .shared()
        .build()
        .unwrap();
    let keys: Vec<String> = (0..200).map(|n| format!("stress-{n}")).collect();
    for k in &keys {
        c.set(k.as_bytes(), format!("{k}=v").as_bytes(), O).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pid = ms[1].pid();
    let jit = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(3));
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                std::thread::sleep(Duration::from_millis(7));
            }
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        })
    };
    let bad = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(8);
    let mut handles = Vec::new();
    for t in 0..16usize {
        let (c, keys, bad, ok) = (c.clone(), keys.clone(), bad.clone(), ok.clone());
        handles.push(rt.spawn(async move {
            let mut buf = Vec::new();
            let mut n = t;
            while Instant::now() < until {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = &keys[(n >> 33) % keys.len()];
                let want = format!("{k}=v");
                if n % 3 == 0 {
                    // dropped mid-flight
                    let _ = tokio::time::timeout(
                        Duration::from_micros((200 + (n >> 40) % 2000) as u64),
                        c.get_into_async(k.as_bytes(), &mut buf),
                    )
                    .await;
                    continue;
                }
                match c.get_into_async(k.as_bytes(), &mut buf).await {
                    Ok(Some(_)) if buf == want.as_bytes() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) if buf.is_empty() => {}
                    r => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{k}: {r:?} buf={:?}", String::from_utf8_lossy(&buf));
                    }
                }
            }
        }));
    }
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let (c, keys, bad, ok) = (c.clone(), keys.clone(), bad.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut n = t + 100;
                while Instant::now() < until {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = &keys[(n >> 33) % keys.len()];
                    let want = format!("{k}=v");
                    match c.get_into(k.as_bytes(), &mut buf) {
                        Ok(Some(_)) if buf == want.as_bytes() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) if buf.is_empty() => {}
                        r => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            eprintln!("T {k}: {r:?} buf={:?}", String::from_utf8_lossy(&buf));
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        rt.block_on(h).unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    jit.join().unwrap();
    println!(
        "ok {} bad {} {:?}",
        ok.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed),
        c.fleet_counters()
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0);
}

/// F7 (replicas(1)): after a rejoin, a SharedClient multi-key read routes each key through
/// the breaker: the first key takes the probe, the others fail with ServerDown.
#[test]
fn f7_shared_get_multi_after_rejoin_single_copy() {
    let m = Memcached::start();
    let m2 = Memcached::start();
    let c = support::client_builder()
        .server(m.addr())
        .server(m2.addr())
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(300))
        .io_timeout(Duration::from_millis(300))
        .shared()
        .build()
        .unwrap();
    let keys: Vec<String> = (0..200)
        .map(|n| format!("m{n}"))
        .filter(|k| c.server_for_key(k.as_bytes()).unwrap() == m.addr())
        .take(10)
        .collect();
    for k in &keys {
        c.set(k.as_bytes(), b"v", O).unwrap();
    }
    m.freeze();
    let _ = c.get(keys[0].as_bytes());
    m.resume();
    // Half-open: one call probes the server, the other keys fail fast until it reports;
    // then every key is served again (before the fix: never, the probe was never used).
    support::wait_for("every key served again after the rejoin", || {
        let mut found = 0;
        let r = c.get_multi(&keys, |_, _| found += 1);
        println!(
            "get_multi of {} keys after rejoin: found {found}, result {r:?}",
            keys.len()
        );
        found == keys.len()
    });
}

/// F8: a meta_set that fails on the first copy (timeout; the server applies it when it
/// resumes) is not remembered for repair, unlike a set: the copies diverge and reads flip
/// from the newer value back to the older one.
#[test]
fn f8_meta_set_failure_not_remembered() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let mut c = builder(&ms)
        .protocol(Protocol::Meta)
        .server_failure_limit(5)
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    c.set(k.as_bytes(), b"v1", O).unwrap();
    ms[0].freeze();
    let r = c.meta_set(k.as_bytes(), b"v2", mcstore::MetaSetOptions::default());
    ms[0].resume();
    // The resumed server applies the meta_set it had received.
    support::wait_for("A to apply the meta_set", || {
        held(&ms[0], &k).as_deref() == Some("v2")
    });
    println!(
        "meta_set: {r:?}; A={:?} B={:?}; {:?}",
        held(&ms[0], &k),
        held(&ms[1], &k),
        c.fleet_counters()
    );
    let first = val(c.get(k.as_bytes()));
    ms[0].freeze();
    let second = val(c.get(k.as_bytes()));
    ms[0].resume();
    println!("reads: {first} then (A frozen) {second}");
    assert!(
        !(first == "v2" && second == "v1"),
        "read v2, then the older v1"
    );
}

/// F9 (replicas(1)): a SharedClient whose callers only read asynchronously never uses a
/// rejoined server again: the router's route takes the probe, the round's get batch asks
/// `check_up` again and is refused; the probe goes stale and the next read repeats it.
#[test]
fn f9_shared_async_gets_never_reach_rejoined_server() {
    let m = Memcached::start();
    let m2 = Memcached::start();
    let c = support::client_builder()
        .server(m.addr())
        .server(m2.addr())
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(300))
        .io_timeout(Duration::from_millis(300))
        .shared()
        .build()
        .unwrap();
    let k = (0..200)
        .map(|n| format!("a{n}"))
        .find(|k| c.server_for_key(k.as_bytes()).unwrap() == m.addr())
        .unwrap();
    c.set(k.as_bytes(), b"v", O).unwrap();
    m.freeze();
    let _ = c.get(k.as_bytes());
    m.resume();
    std::thread::sleep(Duration::from_millis(400));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut ok, mut errs, mut last) = (0, 0, None);
    rt.block_on(async {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            match c.get_async(k.as_bytes()).await {
                Ok(Some(_)) => ok += 1,
                r => {
                    errs += 1;
                    last = Some(format!("{r:?}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    println!("5 s of get_async after the rejoin: {ok} hits, {errs} errors, last {last:?}");
    assert!(ok > 0, "the server is up, but no read reached it");
}
