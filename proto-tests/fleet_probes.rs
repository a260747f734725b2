//! A second independent attack on #27's breaker, kept as regression tests: a probe taken
//! for a copy that is then not asked (cas/incr that changed nothing, a value refused as too
//! large) made every write fail for 2 s; many reads probed a frozen copy at once.
use mcstore_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::{MetaSetOptions, Pool, Protocol, SetOptions};
use support::Memcached;

const O: SetOptions = SetOptions { flags: 0, ttl: 0 };

use support::{fast_failing_copies as builder, key_on};

/// For 2.5 s, sets a fresh key every 20 ms: how many failed, the last failure's time, the
/// first error (every server is healthy: none should fail).
fn sets_until_ok(
    mut set: impl FnMut(&[u8]) -> mcstore::Result<()>,
) -> (u32, Duration, Option<String>) {
    let t = Instant::now();
    let (mut failures, mut last, mut first) = (0, Duration::ZERO, None);
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(2500) {
        n += 1;
        if let Err(e) = set(format!("fresh-{n}").as_bytes()) {
            first.get_or_insert(e.to_string());
            failures += 1;
            last = t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (failures, last, first)
}

/// Client, replicas(2), All: B ejected by a read (no repair pending), retry time passed;
/// then `op` runs; then sets of a key on [A, B] must succeed (B is healthy).
fn client_case(op: &str) -> (u32, Duration, Option<String>) {
    let ms = vec![Memcached::start(), Memcached::start()];
    let mut c = builder(&ms)
        .protocol(if op == "meta_set_big" {
            Protocol::Meta
        } else {
            Protocol::Text
        })
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let r = key_on(&ring, 1, 0, "r");
    let m = key_on(&ring, 0, 1, "missing");
    c.set(k.as_bytes(), b"v1", O).unwrap();
    c.set(r.as_bytes(), b"v1", O).unwrap();
    ms[1].freeze();
    assert_eq!(c.get(r.as_bytes()).unwrap().unwrap().value, b"v1"); // B times out: ejected
    ms[1].resume();
    std::thread::sleep(Duration::from_millis(400)); // B's retry time came: half-open
    let big = vec![b'x'; 2 << 20];
    let res = match op {
        "incr_missing" => format!("{:?}", c.incr(m.as_bytes(), 1)),
        "cas_mismatch" => {
            let it = c.gets(k.as_bytes()).unwrap().unwrap();
            format!(
                "{:?}",
                c.cas(k.as_bytes(), b"v9", it.cas.unwrap() + 1000, O)
            )
        }
        "set_big" => format!(
            "{:?}",
            c.set(k.as_bytes(), &big, O).map_err(|e| e.to_string())
        ),
        "meta_set_big" => format!(
            "{:?}",
            c.meta_set(r.as_bytes(), &big, MetaSetOptions::default())
                .map_err(|e| e.to_string())
        ),
        _ => unreachable!(),
    };
    let out = sets_until_ok(|key| c.set(key, b"v2", O));
    println!("{op} -> {res}; then sets of fresh keys failed {} times, the last {:?} after, first error {:?}", out.0, out.1, out.2);
    out
}

/// A1: an incr answered "not found" by the first copy takes the second copy's probe
/// (write_first asks standing_to_call of every copy up front) and never uses it.
#[test]
fn a1_client_incr_miss_leaks_probe() {
    assert_eq!(client_case("incr_missing").0, 0, "B healthy, yet sets fail");
}

/// A1b: same with a cas whose unique does not match (EXISTS: nothing changed).
#[test]
fn a1b_client_cas_mismatch_leaks_probe() {
    assert_eq!(client_case("cas_mismatch").0, 0, "B healthy, yet sets fail");
}

/// A2: a set of a value over max_value_size with copies: every copy's probe is taken, the
/// pinned store fails in check_value before it is recorded.
#[test]
fn a2_client_set_too_large_leaks_probe() {
    assert_eq!(client_case("set_big").0, 0, "B healthy, yet sets fail");
}

/// A2b: a meta_set too large on a key whose first copy is being probed.
#[test]
fn a2b_client_meta_set_too_large_leaks_probe() {
    assert_eq!(client_case("meta_set_big").0, 0, "B healthy, yet sets fail");
}

/// A3: SharedClient, incr answered "not found" by the first copy.
#[test]
fn a3_shared_incr_miss_leaks_probe() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = builder(&ms);
    let ring = b.clone().build().unwrap().continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let r = key_on(&ring, 1, 0, "r");
    let m = key_on(&ring, 0, 1, "missing");
    let c = b.shared().build().unwrap();
    c.set(k.as_bytes(), b"v1", O).unwrap();
    c.set(r.as_bytes(), b"v1", O).unwrap();
    ms[1].freeze();
    let _ = c.get(r.as_bytes());
    support::wait_for("B ejected", || c.server_for_key(r.as_bytes()).is_err());
    ms[1].resume();
    std::thread::sleep(Duration::from_millis(400));
    let res = c.incr(m.as_bytes(), 1);
    let out = sets_until_ok(|key| c.set(key, b"v2", O));
    println!("incr -> {res:?}; then sets of fresh keys failed {} times, the last {:?} after, first error {:?}", out.0, out.1, out.2);
    assert_eq!(out.0, 0, "B healthy, yet sets fail");
}

/// A4: reads with copies reach a half-open copy pinned, without its probe: with the other
/// copy dead, every concurrent reader waits out the frozen copy's timeout (the breaker lets
/// only one call probe a server).
#[test]
fn a4_pool_many_reads_probe_frozen_copy_at_once() {
    let mut ms = vec![Memcached::start(), Memcached::start()];
    let b = builder(&ms).io_timeout(Duration::from_millis(500));
    let ring = b.clone().build().unwrap().continuum().clone();
    let k = key_on(&ring, 0, 1, "k");
    let pool = Arc::new(Pool::new(b, 8).unwrap());
    pool.get().unwrap().set(k.as_bytes(), b"v1", O).unwrap();
    ms[0].kill();
    ms[1].freeze();
    let _ = pool.get().unwrap().get(k.as_bytes()); // both fail: both ejected
    std::thread::sleep(Duration::from_millis(400)); // both half-open
    let start = Arc::new(std::sync::Barrier::new(8));
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let (pool, k, start) = (pool.clone(), k.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = pool.get().unwrap();
                start.wait();
                let t = Instant::now();
                let r = c.get(k.as_bytes()).map(|_| ()).map_err(|e| e.to_string());
                (t.elapsed(), r)
            })
        })
        .collect();
    let res: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    ms[1].resume();
    let slow = res
        .iter()
        .filter(|(d, _)| *d >= Duration::from_millis(450))
        .count();
    for r in &res {
        println!("{r:?}");
    }
    println!("{slow} of 8 concurrent reads waited out the frozen copy's timeout");
    assert!(
        slow <= 1,
        "{slow} calls probed the frozen half-open server at once"
    );
}

/// A5: SharedClient meta_set over max_value_size on a key whose first copy is half-open
/// (on_first_copy takes the probe, the lent client's meta_set fails in check_value).
#[test]
fn a5_shared_meta_set_too_large_leaks_probe() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = builder(&ms).protocol(Protocol::Meta);
    let ring = b.clone().build().unwrap().continuum().clone();
    let r = key_on(&ring, 1, 0, "r");
    let c = b.shared().build().unwrap();
    c.set(r.as_bytes(), b"v1", O).unwrap();
    ms[1].freeze();
    let _ = c.get(r.as_bytes());
    support::wait_for("B ejected", || c.server_for_key(r.as_bytes()).is_err());
    ms[1].resume();
    std::thread::sleep(Duration::from_millis(400));
    let big = vec![b'x'; 2 << 20];
    let res = c
        .meta_set(r.as_bytes(), &big, MetaSetOptions::default())
        .map_err(|e| e.to_string());
    let out = sets_until_ok(|key| c.set(key, b"v2", O));
    println!("shared meta_set_big -> {res:?}; then sets of fresh keys failed {} times, the last {:?} after, first error {:?}", out.0, out.1, out.2);
    assert_eq!(out.0, 0, "B healthy, yet sets fail");
}
