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

// ---------------------------------------------------------------------------------------
// Every kind of call after the most late replies a connection may owe
// ---------------------------------------------------------------------------------------

/// Key `key`'s value at `generation`; every other key's value is large (over 4 KiB: sent
/// apart from the command, and its late reply spans several reads).
fn val(key: &str, generation: u32, big: bool) -> String {
    let mut s = v(key, generation);
    if big {
        s.push_str(&".".repeat(6000));
    }
    s
}

/// A call that reads B's connection next, and updates the model of what each key holds.
type Call<'a> = dyn Fn(&mut Client, &mut HashMap<String, String>) + 'a;

/// B owes 4 late replies (frozen while 4 reads whose first copy it is were hedged, then
/// resumed): whatever call reads B's connection next reads all 4 first, in order, then its
/// own; every key then reads back its latest value, and B itself holds what was written.
fn every_call_after_four_late_replies(p: Protocol) {
    let ms = three();
    let io = Duration::from_secs(5);
    let mut c = hedged(&ms, p, Hedge::after(Duration::from_millis(10)), io)
        .server_failure_limit(100)
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let ba: Vec<String> = (0..8)
        .map(|n| support::key_on(&ring, B, A, &format!("late{n}")))
        .collect();
    let bc = support::key_on(&ring, B, C, "late-bc");
    let ac = support::key_on(&ring, A, C, "late-ac");
    let counter = support::key_on(&ring, B, A, "late-counter");
    let keys: Vec<String> = ba.iter().chain([&bc, &ac]).cloned().collect();
    let mut model: HashMap<String, String> = HashMap::new();
    for (n, k) in keys.iter().enumerate() {
        let s = val(k, 1, n % 2 == 1);
        c.set(k.as_bytes(), s.as_bytes(), O).unwrap();
        model.insert(k.clone(), s);
    }
    let big = |k: &str| keys.iter().position(|x| x == k).unwrap() % 2 == 1;
    let k0 = ba[0].clone();
    let k1 = ba[1].clone();
    let k2 = ba[2].clone();
    let calls: Vec<(&str, Box<Call>)> = vec![
        (
            "get_multi",
            Box::new(|c, m| {
                let mut got = HashMap::new();
                c.get_multi(&keys, |k, it| {
                    got.insert(
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(it.value.to_vec()).unwrap(),
                    );
                })
                .unwrap();
                assert_eq!(&got, m);
            }),
        ),
        (
            "gets_multi",
            Box::new(|c, m| {
                let mut got = HashMap::new();
                c.gets_multi(&keys, |k, it| {
                    assert!(it.cas.is_some());
                    got.insert(
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(it.value.to_vec()).unwrap(),
                    );
                })
                .unwrap();
                assert_eq!(&got, m);
            }),
        ),
        (
            "set_multi",
            Box::new(|c, m| {
                let items: Vec<(String, String)> = ba
                    .iter()
                    .map(|k| (k.clone(), val(k, 2, big(k))))
                    .collect();
                assert_eq!(c.set_multi(&items, O).unwrap(), items.len());
                m.extend(items);
            }),
        ),
        (
            "delete_multi, then set",
            Box::new(|c, m| {
                assert_eq!(c.delete_multi(&[&k0, &k1]).unwrap(), 2);
                for k in [&k0, &k1] {
                    let s = val(k, 3, big(k));
                    c.set(k.as_bytes(), s.as_bytes(), O).unwrap();
                    m.insert(k.clone(), s);
                }
            }),
        ),
        (
            "a pipeline, finished",
            Box::new(|c, m| {
                let mut pl = c.pipeline();
                let mut sets = Vec::new();
                for k in &ba[..4] {
                    let s = val(k, 4, big(k));
                    pl.set(k.as_bytes(), s.as_bytes(), O).unwrap();
                    sets.push((k.clone(), s));
                }
                let report = pl.finish().unwrap();
                assert_eq!(report.errors, 0, "{report:?}");
                m.extend(sets);
            }),
        ),
        (
            "a pipeline, sent and forgotten, then a get",
            Box::new(|c, m| {
                let mut pl = c.pipeline();
                let s = val(&k2, 5, big(&k2));
                pl.set(k2.as_bytes(), s.as_bytes(), O).unwrap();
                pl.send().unwrap();
                m.insert(k2.clone(), s.clone());
                assert_eq!(value(c, &k2).unwrap(), Some(s));
            }),
        ),
        (
            "store_noreply and delete_noreply",
            Box::new(|c, m| {
                let s = val(&k0, 6, big(&k0));
                c.store_noreply(StoreMode::Set, k0.as_bytes(), s.as_bytes(), O)
                    .unwrap();
                c.delete_noreply(k1.as_bytes()).unwrap();
                let s1 = val(&k1, 6, big(&k1));
                c.set(k1.as_bytes(), s1.as_bytes(), O).unwrap();
                m.insert(k0.clone(), s);
                m.insert(k1.clone(), s1);
            }),
        ),
        (
            "stats",
            Box::new(|c, _| {
                assert_eq!(c.stats(None).unwrap().len(), 3);
            }),
        ),
        (
            "version",
            Box::new(|c, _| {
                assert_eq!(c.version().unwrap().len(), 3);
            }),
        ),
        (
            "verbosity",
            Box::new(|c, _| match c.protocol() {
                // Binary has no verbosity command here: refused before any I/O.
                Protocol::Binary => {
                    assert!(c.verbosity(0).is_err());
                    assert_eq!(c.version().unwrap().len(), 3);
                }
                _ => c.verbosity(0).unwrap(),
            }),
        ),
        (
            "incr and decr",
            Box::new(|c, _| {
                c.set(counter.as_bytes(), b"10", O).unwrap();
                assert_eq!(c.incr(counter.as_bytes(), 5).unwrap(), Some(15));
                assert_eq!(c.decr(counter.as_bytes(), 3).unwrap(), Some(12));
            }),
        ),
        (
            "gets then cas",
            Box::new(|c, m| {
                let it = c.gets(k2.as_bytes()).unwrap().expect("a hit");
                assert_eq!(String::from_utf8(it.value).unwrap(), m[&k2]);
                let s = val(&k2, 7, big(&k2));
                let r = c
                    .cas(k2.as_bytes(), s.as_bytes(), it.cas.unwrap(), O)
                    .unwrap();
                assert_eq!(r, CasResult::Stored);
                // The other copy was deleted: set again for a model every copy agrees on.
                c.set(k2.as_bytes(), s.as_bytes(), O).unwrap();
                m.insert(k2.clone(), s);
            }),
        ),
        (
            "touch (every copy in one round trip)",
            Box::new(|c, _| {
                assert!(c.touch(k0.as_bytes(), 0).unwrap());
                assert!(!c.touch(b"late-nobody", 0).unwrap());
            }),
        ),
        (
            "gat and gats",
            Box::new(|c, m| {
                let it = c.gat(k1.as_bytes(), 0).unwrap().expect("a hit");
                assert_eq!(String::from_utf8(it.value).unwrap(), m[&k1]);
                let it = c.gats(k0.as_bytes(), 0).unwrap().expect("a hit");
                assert!(it.cas.is_some());
                assert_eq!(String::from_utf8(it.value).unwrap(), m[&k0]);
            }),
        ),
        (
            "add, replace, append, prepend, delete",
            Box::new(|c, m| {
                assert!(!c.add(k0.as_bytes(), b"no", O).unwrap());
                let s = val(&k1, 8, big(&k1));
                assert!(c.replace(k1.as_bytes(), s.as_bytes(), O).unwrap());
                assert!(c.append(k1.as_bytes(), b"+a").unwrap());
                assert!(c.prepend(k1.as_bytes(), b"p+").unwrap());
                m.insert(k1.clone(), format!("p+{s}+a"));
                assert!(c.delete(bc.as_bytes()).unwrap());
                let s = val(&bc, 8, big(&bc));
                c.set(bc.as_bytes(), s.as_bytes(), O).unwrap();
                m.insert(bc.clone(), s);
            }),
        ),
        (
            "meta_get and meta_set (meta only)",
            Box::new(|c, m| {
                if c.protocol() != Protocol::Meta {
                    return assert!(c.version().is_ok());
                }
                let mut buf = Vec::new();
                let info = c
                    .meta_get(k0.as_bytes(), MetaGetOptions::default(), &mut buf)
                    .unwrap()
                    .expect("a hit");
                assert_eq!(String::from_utf8(buf).unwrap(), m[&k0]);
                let s = val(&k0, 9, big(&k0));
                let r = c
                    .meta_set(k0.as_bytes(), s.as_bytes(), MetaSetOptions::default())
                    .unwrap();
                assert_eq!(r.outcome, mcstore::SetOutcome::Stored, "{info:?}");
                // meta_set writes the first copy and deletes the others: set everywhere.
                c.set(k0.as_bytes(), s.as_bytes(), O).unwrap();
                m.insert(k0.clone(), s);
            }),
        ),
    ];
    let mut direct_b = ms[B].client_with(p);
    for (what, call) in &calls {
        let before = counters(&c, B);
        ms[B].freeze();
        for k in &ba[4..8] {
            assert_eq!(
                value(&mut c, k).unwrap().as_ref(),
                Some(&model[k]),
                "{p:?}: {k} with B frozen, before {what}"
            );
        }
        ms[B].resume();
        call(&mut c, &mut model);
        let after = counters(&c, B);
        assert!(
            after.late_replies >= before.late_replies + 4,
            "{p:?}: {what} did not read B's 4 late replies: {before:?} -> {after:?}"
        );
        assert_eq!(after.timeouts, before.timeouts, "{p:?}: {what}: {after:?}");
        assert_eq!(after.errors, before.errors, "{p:?}: {what}: {after:?}");
        for k in &keys {
            assert_eq!(
                value(&mut c, k).unwrap().as_ref(),
                Some(&model[k]),
                "{p:?} after {what}: {k}"
            );
        }
        // B itself answers in step and holds the latest value of its keys.
        for k in &ba {
            let on_b = direct_b
                .get(k.as_bytes())
                .unwrap()
                .map(|i| String::from_utf8(i.value).unwrap());
            assert_eq!(on_b.as_ref(), Some(&model[k]), "{p:?} after {what}: {k} on B");
        }
    }
}

#[test]
fn every_call_after_four_late_replies_text() {
    every_call_after_four_late_replies(Protocol::Text);
}

#[test]
fn every_call_after_four_late_replies_binary() {
    every_call_after_four_late_replies(Protocol::Binary);
}

#[test]
fn every_call_after_four_late_replies_meta() {
    every_call_after_four_late_replies(Protocol::Meta);
}
