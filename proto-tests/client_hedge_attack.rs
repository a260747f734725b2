//! Review attack on a plain `Client`'s hedged reads (late replies left on a connection and
//! read by its next call) and on its touch with copies in one round trip: a hedge the budget
//! refuses, misses with `read_miss_failover`, every kind of call after the most late replies
//! a connection may owe, every read hedged under a mixed workload on all protocols, touch
//! with a frozen or blocked copy.

use mcstore_test_support as support;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::{
    CasResult, Client, ClientBuilder, Hedge, MetaGetOptions, MetaSetOptions, Protocol, SetOptions,
    StoreMode, WritePolicy,
};
use support::Memcached;

const O: SetOptions = SetOptions { ttl: 0, flags: 0 };
const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn three() -> [Memcached; 3] {
    [Memcached::start(), Memcached::start(), Memcached::start()]
}

fn hedged(ms: &[Memcached], p: Protocol, hedge: Hedge, io: Duration) -> ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(ms.iter().map(Memcached::addr).collect::<Vec<_>>())
        .distribution(Distribution::Ketama)
        .replicas(2)
        .hedge(hedge)
        .io_timeout(io)
        .connect_timeout(io)
}

fn value(c: &mut Client, key: &str) -> mcstore::Result<Option<String>> {
    c.get(key.as_bytes())
        .map(|o| o.map(|i| String::from_utf8(i.value).unwrap()))
}

fn v(key: &str, generation: u32) -> String {
    format!("{key}={generation}")
}

fn counters(c: &Client, i: usize) -> mcstore::ServerCounters {
    c.server_counters()[i].1.clone()
}

/// SIGCONT to a frozen memcached from a helper thread (the test then waits for it to
/// answer with `Memcached::resume`, which is idempotent).
fn cont(pid: u32) {
    // SAFETY: kill(2) on a child process the test started; no memory is involved.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

// ---------------------------------------------------------------------------------------
// A hedge the budget refuses
// ---------------------------------------------------------------------------------------

/// The budget is spent (10 hedges, no share earned), then B (first copy) freezes: the
/// read's hedge is refused, so it waits for B alone until its I/O timeout. Then it must
/// still fail over to A, which holds the key, as a read without hedging does; it must not
/// fail, nor skip A because the refused hedge "took" it.
fn a_refused_hedge_still_fails_over(p: Protocol) {
    let ms = three();
    let io = Duration::from_millis(600);
    let mut c = hedged(
        &ms,
        p,
        Hedge::after(Duration::from_millis(5)).budget(0.0),
        io,
    )
    .server_failure_limit(100)
    .build()
    .unwrap();
    let ring = c.continuum().clone();
    let k = support::key_on(&ring, B, A, "refused");
    c.set(k.as_bytes(), v(&k, 1).as_bytes(), O).unwrap();
    // Spend the burst: each frozen read costs one hedge; B's late reply is read after it
    // resumes.
    let mut rounds = 0;
    while c.fleet_counters().hedges_sent < 10 {
        rounds += 1;
        assert!(
            rounds < 40,
            "{p:?}: burst never spent: {:?}",
            c.fleet_counters()
        );
        ms[B].freeze();
        assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 1)));
        ms[B].resume();
        assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 1)));
    }
    let refused_before = c.fleet_counters().hedges_refused;
    ms[B].freeze();
    let t = Instant::now();
    let got = value(&mut c, &k);
    let took = t.elapsed();
    ms[B].resume();
    let fc = c.fleet_counters();
    assert!(
        fc.hedges_refused > refused_before,
        "{p:?}: not refused: {fc:?}"
    );
    assert_eq!(
        got.as_ref().ok().cloned().flatten(),
        Some(v(&k, 1)),
        "{p:?}: B frozen, hedge refused: the read must fail over to A after B's timeout \
         (took {took:?}), got {got:?}; {fc:?}"
    );
    assert!(took < io * 3, "{p:?}: took {took:?}");
}

#[test]
fn a_refused_hedge_still_fails_over_text() {
    a_refused_hedge_still_fails_over(Protocol::Text);
}

#[test]
fn a_refused_hedge_still_fails_over_binary() {
    a_refused_hedge_still_fails_over(Protocol::Binary);
}

#[test]
fn a_refused_hedge_still_fails_over_meta() {
    a_refused_hedge_still_fails_over(Protocol::Meta);
}

// ---------------------------------------------------------------------------------------
// Misses with read_miss_failover
// ---------------------------------------------------------------------------------------

/// With `read_miss_failover` (a copy warming up: A restarted, empty), B holds the key and
/// is slow (frozen for a while): the hedge to A misses at once. A miss must not win the race
/// while B, which may hold the key, is still out: the read waits for B and returns its
/// value (as a `SharedClient` does), instead of a miss.
fn a_hedge_s_miss_does_not_beat_the_slow_copy(p: Protocol) {
    let ms = three();
    let io = Duration::from_secs(5);
    let mut c = hedged(&ms, p, Hedge::after(Duration::from_millis(10)), io)
        .read_miss_failover(true)
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = support::key_on(&ring, B, A, "warm");
    // Only B holds it (A is the copy warming up).
    ms[B]
        .client_with(p)
        .set(k.as_bytes(), v(&k, 1).as_bytes(), O)
        .unwrap();
    // Connections up first.
    assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 1)));
    ms[B].freeze();
    let pid = ms[B].pid();
    let waker = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        cont(pid);
    });
    let t = Instant::now();
    let got = value(&mut c, &k).unwrap();
    let took = t.elapsed();
    waker.join().unwrap();
    ms[B].resume();
    assert_eq!(
        got,
        Some(v(&k, 1)),
        "{p:?}: the hedge's miss on A won over B's hit (took {took:?}); {:?}",
        c.fleet_counters()
    );
    assert!(took < io, "{p:?}: took {took:?}");
}

#[test]
fn a_hedge_s_miss_does_not_beat_the_slow_copy_text() {
    a_hedge_s_miss_does_not_beat_the_slow_copy(Protocol::Text);
}

#[test]
fn a_hedge_s_miss_does_not_beat_the_slow_copy_binary() {
    a_hedge_s_miss_does_not_beat_the_slow_copy(Protocol::Binary);
}

#[test]
fn a_hedge_s_miss_does_not_beat_the_slow_copy_meta() {
    a_hedge_s_miss_does_not_beat_the_slow_copy(Protocol::Meta);
}

/// The other way round: B (first copy, warming up) misses while the hedge to A (which holds
/// the key) is still out. With `read_miss_failover`, B's miss must not end the read: A's
/// answer is waited for.
#[test]
fn the_first_copy_s_miss_does_not_drop_the_hedge() {
    for p in PROTOCOLS {
        let ms = three();
        let io = Duration::from_secs(5);
        let mut c = hedged(&ms, p, Hedge::after(Duration::from_millis(10)), io)
            .read_miss_failover(true)
            .build()
            .unwrap();
        let ring = c.continuum().clone();
        let k = support::key_on(&ring, B, A, "warm-first");
        ms[A]
            .client_with(p)
            .set(k.as_bytes(), v(&k, 1).as_bytes(), O)
            .unwrap();
        // Connections up first (B misses, A answers).
        assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 1)));
        // Both frozen: B is asked, then A (the hedge); B answers first (a miss), A later.
        ms[B].freeze();
        ms[A].freeze();
        let (pb, pa) = (ms[B].pid(), ms[A].pid());
        let waker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            cont(pb);
            thread::sleep(Duration::from_millis(200));
            cont(pa);
        });
        let t = Instant::now();
        let got = value(&mut c, &k).unwrap();
        let took = t.elapsed();
        waker.join().unwrap();
        ms[A].resume();
        ms[B].resume();
        assert_eq!(
            got,
            Some(v(&k, 1)),
            "{p:?}: B's miss ended the read while the hedge to A (a hit) was out \
             (took {took:?}); {:?}",
            c.fleet_counters()
        );
        assert!(took < io, "{p:?}: took {took:?}");
    }
}
