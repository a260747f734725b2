//! Hedged reads in a plain `Client` (and a `Pool`), against real memcached: a read whose
//! first copy does not answer in time goes to a second copy too and the first answer wins;
//! the losing read's reply is read and dropped by the next call on its connection, so no
//! caller ever gets another key's value, on all three protocols.

use mcstore_test_support as support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, Hedge, Pool, Protocol, SetOptions, StoreMode};
use support::Memcached;

const O: SetOptions = SetOptions { ttl: 0, flags: 0 };
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// Far longer than any hedge here: a read that answers well before it was hedged, not
/// failed over after a timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn three() -> [Memcached; 3] {
    [Memcached::start(), Memcached::start(), Memcached::start()]
}

fn hedged(ms: &[Memcached], p: Protocol, after: Duration) -> ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(ms.iter().map(Memcached::addr).collect::<Vec<_>>())
        .distribution(Distribution::Ketama)
        .replicas(2)
        .hedge(Hedge::after(after))
        .io_timeout(IO_TIMEOUT)
        .connect_timeout(IO_TIMEOUT)
}

fn value(c: &mut Client, key: &str) -> Option<String> {
    c.get(key.as_bytes())
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .map(|i| String::from_utf8(i.value).unwrap())
}

fn v(key: &str, generation: u32) -> String {
    format!("{key}={generation}")
}

/// A call that reads B's connection next.
type Call<'a> = dyn Fn(&mut Client) + 'a;

fn late_replies(c: &Client, server: usize) -> u64 {
    c.server_counters()[server].1.late_replies
}

/// B frozen: reads whose first copy is B are answered by the hedge, long before the I/O
/// timeout. After B resumes, its connection's late reply (another key's value) is read and
/// dropped by the next call there, whatever that call is (a get, a gets, a store batch, a
/// multi-get, a noreply pipeline), and every call gets its own key's value.
fn late_replies_never_reach_a_caller(p: Protocol) {
    let ms = three();
    let mut c = hedged(&ms, p, Duration::from_millis(20)).build().unwrap();
    let ring = c.continuum().clone();
    let on_ba: Vec<String> = (0..4)
        .map(|n| support::key_on(&ring, B, A, &format!("ba{n}")))
        .collect();
    let on_bc = support::key_on(&ring, B, C, "bc");
    let on_ac = support::key_on(&ring, A, C, "ac");
    let all: Vec<&String> = on_ba.iter().chain([&on_bc, &on_ac]).collect();
    for k in &all {
        c.set(k.as_bytes(), v(k, 1).as_bytes(), O).unwrap();
    }

    ms[B].freeze();
    for k in [&on_ba[0], &on_bc, &on_ba[1]] {
        let t = Instant::now();
        assert_eq!(value(&mut c, k), Some(v(k, 1)), "{p:?}: {k} with B frozen");
        let took = t.elapsed();
        assert!(
            took < IO_TIMEOUT / 2,
            "{p:?}: {k} took {took:?}: answered by a timeout, not a hedge"
        );
    }
    // A key B does not hold is not slowed down by it.
    assert_eq!(value(&mut c, &on_ac), Some(v(&on_ac, 1)));
    let fc = c.fleet_counters();
    assert!(fc.hedges_sent >= 3, "{p:?}: {fc:?}");
    assert!(fc.hedges_won >= 3, "{p:?}: {fc:?}");
    ms[B].resume();
    support::wait_for("B answers", || ms[B].answers());

    // Whatever reads B's connection next reads the late reply first, and then its own.
    let mut direct_b = ms[B].client_with(p);
    let calls: [(&str, Box<Call>); 4] = [
        (
            "a store to every copy",
            Box::new(|c: &mut Client| {
                let k = &on_ba[2];
                c.set(k.as_bytes(), v(k, 2).as_bytes(), O).unwrap();
            }),
        ),
        (
            "a multi-get",
            Box::new(|c: &mut Client| {
                let mut got = HashMap::new();
                c.get_multi(&all, |k, item| {
                    got.insert(
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(item.value.to_vec()).unwrap(),
                    );
                })
                .unwrap();
                for (k, val) in &got {
                    assert!(val.starts_with(&format!("{k}=")), "{k} got {val}");
                }
                assert_eq!(got.len(), all.len(), "{got:?}");
            }),
        ),
        (
            "a gets (copies in placement order: B first)",
            Box::new(|c: &mut Client| {
                let k = &on_ba[3];
                let got = c.gets(k.as_bytes()).unwrap().expect("a hit");
                assert_eq!(String::from_utf8(got.value).unwrap(), v(k, 1));
            }),
        ),
        (
            "a noreply pipeline, then a delete",
            Box::new(|c: &mut Client| {
                let k = &on_ba[1];
                c.store_noreply(StoreMode::Set, k.as_bytes(), v(k, 3).as_bytes(), O)
                    .unwrap();
                assert!(c.delete(k.as_bytes()).unwrap(), "{k} was set");
            }),
        ),
    ];
    for (what, call) in &calls {
        // Leave a late reply on B's connection: freeze, read a key B holds first, resume.
        let before = late_replies(&c, B);
        ms[B].freeze();
        assert_eq!(
            value(&mut c, &on_bc),
            Some(v(&on_bc, 1)),
            "{p:?} before {what}"
        );
        ms[B].resume();
        support::wait_for("B answers", || ms[B].answers());
        call(&mut c);
        // The late reply was read (and dropped) by that call, not by a later one.
        assert!(
            late_replies(&c, B) > before,
            "{p:?}: {what} did not read B's late reply: {:?}",
            c.server_counters()[B]
        );
        for k in &all {
            if let Some(val) = value(&mut c, k) {
                assert!(
                    val.starts_with(&format!("{k}=")),
                    "{p:?} after {what}: {k} got {val}"
                );
            }
        }
    }
    // B holds what the store wrote: it was reached, with its framing intact.
    let k = &on_ba[2];
    let on_b = direct_b.get(k.as_bytes()).unwrap().map(|i| i.value);
    assert_eq!(on_b, Some(v(k, 2).into_bytes()), "{p:?}: {k} on B");
    println!(
        "client hedge {p:?}: {:?}; B: {:?}",
        c.fleet_counters(),
        c.server_counters()[B].1
    );
}

#[test]
fn late_replies_never_reach_a_caller_text() {
    late_replies_never_reach_a_caller(Protocol::Text);
}

#[test]
fn late_replies_never_reach_a_caller_binary() {
    late_replies_never_reach_a_caller(Protocol::Binary);
}

#[test]
fn late_replies_never_reach_a_caller_meta() {
    late_replies_never_reach_a_caller(Protocol::Meta);
}

/// A copy that stays frozen leaves its reads unanswered: each answered by the other copy's
/// hedge, well before any timeout. Soon its reads stop paying the hedge delay: the slow
/// copy is asked last (its recent latency is far above the other's), and a write that
/// times out on it marks it down.
#[test]
fn a_copy_that_stays_frozen_stops_costing_reads() {
    let ms = three();
    let io = Duration::from_millis(400);
    let mut c = hedged(&ms, Protocol::Meta, Duration::from_millis(5))
        .io_timeout(io)
        .connect_timeout(io)
        .server_failure_limit(1)
        .retry_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let keys: Vec<String> = (0..8)
        .map(|n| support::key_on(&ring, B, A, &format!("stuck{n}")))
        .collect();
    for k in &keys {
        c.set(k.as_bytes(), v(k, 1).as_bytes(), O).unwrap();
    }
    ms[B].freeze();
    let mut reads = 0;
    let read_all = |c: &mut Client, reads: &mut usize| {
        for k in &keys {
            let t = Instant::now();
            assert_eq!(value(c, k), Some(v(k, 1)));
            assert!(t.elapsed() < io, "{k}: answered by a timeout, not a hedge");
            *reads += 1;
        }
    };
    support::wait_for("a pass over B's keys without a hedge", || {
        let before = c.fleet_counters().hedges_sent;
        read_all(&mut c, &mut reads);
        c.fleet_counters().hedges_sent == before
    });
    let hedged_reads = c.fleet_counters().hedges_sent;
    // A write waits for B, times out, and marks it down; reads are unaffected.
    let k = &keys[0];
    assert!(
        c.set(k.as_bytes(), v(k, 2).as_bytes(), O).is_err(),
        "B is frozen"
    );
    assert!(c.server_counters()[B].1.ejections > 0);
    for k in &keys[1..] {
        assert_eq!(value(&mut c, k), Some(v(k, 1)));
    }
    ms[B].resume();
    println!(
        "client hedge, B stays frozen: {hedged_reads} hedges in {reads} reads; {:?}; B: {:?}",
        c.fleet_counters(),
        c.server_counters()[B].1
    );
}

/// A pool's clients hedge too: 8 threads read and write their own keys while B is jittery
/// (stopped 5 ms every 50 ms); every read gets its own key's latest value, and no call
/// fails.
#[test]
fn a_pool_hedges_beside_a_jittery_server() {
    let ms = three();
    let pool = Pool::new(hedged(&ms, Protocol::Binary, Duration::from_millis(2)), 8).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let jitter = {
        let (stop, pid) = (stop.clone(), ms[B].pid() as i32);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: kill(2) on a child process we started; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                thread::sleep(Duration::from_millis(5));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                thread::sleep(Duration::from_millis(45));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        })
    };
    let reads = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(2);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (pool, reads) = (pool.clone(), reads.clone());
            thread::spawn(move || {
                let mut generation = [0u32; 16];
                let mut n = 0usize;
                while Instant::now() < until {
                    let k = n % 16;
                    let key = format!("pool{t}:{k}");
                    let mut c = pool.get().unwrap();
                    if n % 4 == 0 {
                        generation[k] += 1;
                        c.set(key.as_bytes(), v(&key, generation[k]).as_bytes(), O)
                            .unwrap_or_else(|e| panic!("set {key}: {e}"));
                    } else {
                        let got = c
                            .get(key.as_bytes())
                            .unwrap_or_else(|e| panic!("get {key}: {e}"))
                            .map(|i| String::from_utf8(i.value).unwrap());
                        let want = (generation[k] > 0).then(|| v(&key, generation[k]));
                        assert_eq!(got, want, "thread {t}: {key}");
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let mut panics = 0;
    for t in threads {
        panics += usize::from(t.join().is_err());
    }
    stop.store(true, Ordering::Relaxed);
    jitter.join().unwrap();
    let fc = pool.get().unwrap().fleet_counters();
    let reads = reads.load(Ordering::Relaxed);
    println!("pool hedge, B jittery: reads={reads}; {fc:?}");
    assert_eq!(panics, 0, "a caller failed or read a wrong value");
    assert!(reads > 100, "too few reads: {reads}");
    assert!(fc.hedges_won <= fc.hedges_sent, "{fc:?}");
}
