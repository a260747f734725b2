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
    c.server_counters()[i].1
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
                let items: Vec<(String, String)> =
                    ba.iter().map(|k| (k.clone(), val(k, 2, big(k)))).collect();
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
            assert_eq!(
                on_b.as_ref(),
                Some(&model[k]),
                "{p:?} after {what}: {k} on B"
            );
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

// ---------------------------------------------------------------------------------------
// Every read hedged, a mixed workload, one copy jittery
// ---------------------------------------------------------------------------------------

/// Every read is hedged at once (no delay, a budget as large as the reads), so nearly every
/// read leaves a late reply on one connection, read by whatever call comes next there;
/// meanwhile B is stopped for 3 ms every 25 ms. A seeded mix of every call checks each read
/// against a model: never another key's value, never a stale one, and no call fails.
fn every_read_hedged_under_a_mixed_workload(p: Protocol, seed: u64) {
    let ms = three();
    let io = Duration::from_secs(5);
    let mut c = hedged(&ms, p, Hedge::after(Duration::ZERO).budget(1.0), io)
        .build()
        .unwrap();
    let keys: Vec<String> = (0..24).map(|n| format!("mix{n}")).collect();
    // What each key holds: `None` absent; `Some((value, exact))`, where `exact` is false
    // after a call that leaves the key on its first copy only (cas, incr): a read may then
    // miss on the other copy.
    let mut model: HashMap<String, Option<(String, bool)>> =
        keys.iter().map(|k| (k.clone(), None)).collect();
    let mut rng = support::Rng(seed);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jitter = {
        let (stop, pid) = (stop.clone(), ms[B].pid() as i32);
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: kill(2) on a child process we started; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                thread::sleep(Duration::from_millis(3));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                thread::sleep(Duration::from_millis(22));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        })
    };
    let check = |k: &str, got: Option<String>, m: &HashMap<String, Option<(String, bool)>>| match (
        &m[k], got,
    ) {
        (None, None) => {}
        (Some((_, false)), None) => {}
        (Some((want, _)), Some(g)) => assert_eq!(&g, want, "{p:?} seed {seed}: {k}"),
        (want, got) => panic!("{p:?} seed {seed}: {k}: want {want:?}, got {got:?}"),
    };
    let mut generation = 0u32;
    let mut buf = Vec::new();
    let mut value_of = |k: &str, rng: &mut support::Rng| {
        generation += 1;
        let mut s = v(k, generation);
        if rng.below(4) == 0 {
            s.push_str(&"#".repeat(5000));
        }
        s
    };
    let ops = 4000;
    for step in 0..ops {
        let k = keys[rng.below(keys.len() as u64) as usize].clone();
        let kb = k.as_bytes();
        let what = rng.below(20);
        let ctx = format!("{p:?} seed {seed} step {step} op {what} key {k}");
        match what {
            0..=3 => {
                let got = c
                    .get(kb)
                    .expect(&ctx)
                    .map(|i| String::from_utf8(i.value).unwrap());
                check(&k, got, &model);
            }
            4 => {
                let got = c
                    .gets(kb)
                    .expect(&ctx)
                    .map(|i| String::from_utf8(i.value).unwrap());
                check(&k, got, &model);
            }
            5 => {
                let got = c
                    .gat(kb, 0)
                    .expect(&ctx)
                    .map(|i| String::from_utf8(i.value).unwrap());
                check(&k, got, &model);
            }
            6 => {
                let got = c.get_into(kb, &mut buf).expect(&ctx);
                let got = got.map(|_| String::from_utf8(buf.clone()).unwrap());
                check(&k, got, &model);
            }
            7..=9 => {
                let s = value_of(&k, &mut rng);
                c.set(kb, s.as_bytes(), O).expect(&ctx);
                model.insert(k.clone(), Some((s, true)));
            }
            10 => {
                let existed = c.delete(kb).expect(&ctx);
                if model[&k].as_ref().is_some_and(|(_, exact)| *exact) {
                    assert!(existed, "{ctx}");
                }
                model.insert(k.clone(), None);
            }
            11 => {
                let existed = c.touch(kb, 0).expect(&ctx);
                if model[&k].as_ref().is_some_and(|(_, exact)| *exact) {
                    assert!(existed, "{ctx}");
                }
            }
            12 => {
                let some: Vec<&String> = (0..5)
                    .map(|_| &keys[rng.below(keys.len() as u64) as usize])
                    .collect();
                let mut got = HashMap::new();
                c.get_multi(&some, |k, it| {
                    got.insert(
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(it.value.to_vec()).unwrap(),
                    );
                })
                .expect(&ctx);
                for k in &some {
                    check(k, got.get(*k).cloned(), &model);
                }
            }
            13 => {
                let items: Vec<(String, String)> = (0..4)
                    .map(|_| {
                        let k = keys[rng.below(keys.len() as u64) as usize].clone();
                        let s = value_of(&k, &mut rng);
                        (k, s)
                    })
                    .collect();
                c.set_multi(&items, O).expect(&ctx);
                // Duplicates: the last one is stored last.
                for (k, s) in items {
                    model.insert(k, Some((s, true)));
                }
            }
            14 => {
                let mut pl = c.pipeline();
                let s = value_of(&k, &mut rng);
                pl.set(kb, s.as_bytes(), O).expect(&ctx);
                if rng.below(2) == 0 {
                    assert_eq!(pl.finish().expect(&ctx).errors, 0, "{ctx}");
                } else {
                    pl.send().expect(&ctx);
                }
                model.insert(k.clone(), Some((s, true)));
            }
            15 => {
                let s = value_of(&k, &mut rng);
                c.store_noreply(StoreMode::Set, kb, s.as_bytes(), O)
                    .expect(&ctx);
                model.insert(k.clone(), Some((s, true)));
            }
            16 => {
                if let Some(it) = c.gets(kb).expect(&ctx) {
                    let got = String::from_utf8(it.value.clone()).unwrap();
                    check(&k, Some(got), &model);
                    let s = value_of(&k, &mut rng);
                    // A CAS from the copy that answered (the hedge, maybe), sent to the
                    // first copy: stored, or refused safely.
                    match c.cas(kb, s.as_bytes(), it.cas.unwrap(), O).expect(&ctx) {
                        CasResult::Stored => {
                            model.insert(k.clone(), Some((s, false)));
                        }
                        CasResult::Exists | CasResult::NotFound => {}
                    }
                }
            }
            17 => {
                assert_eq!(c.version().expect(&ctx).len(), 3, "{ctx}");
            }
            18 => {
                let mut got = HashMap::new();
                c.gets_multi(&keys[..6], |k, it| {
                    got.insert(
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(it.value.to_vec()).unwrap(),
                    );
                })
                .expect(&ctx);
                for k in &keys[..6] {
                    check(k, got.get(k).cloned(), &model);
                }
            }
            _ => {
                let n = c.delete_multi(&[&k]).expect(&ctx);
                if model[&k].as_ref().is_some_and(|(_, exact)| *exact) {
                    assert_eq!(n, 1, "{ctx}");
                }
                model.insert(k.clone(), None);
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    jitter.join().unwrap();
    ms[B].resume();
    let fc = c.fleet_counters();
    let late: u64 = c
        .server_counters()
        .iter()
        .map(|(_, s)| s.late_replies)
        .sum();
    let errors: u64 = c.server_counters().iter().map(|(_, s)| s.errors).sum();
    println!("{p:?} seed {seed}: {fc:?}; late replies {late}; errors {errors}");
    assert!(fc.hedges_sent > 50, "{p:?}: few hedges: {fc:?}");
    assert!(late > 50, "{p:?}: few late replies read: {late}");
    assert_eq!(errors, 0, "{p:?}: {:?}", c.server_counters());
}

#[test]
fn every_read_hedged_under_a_mixed_workload_text() {
    every_read_hedged_under_a_mixed_workload(Protocol::Text, 0x9e37_79b9);
}

#[test]
fn every_read_hedged_under_a_mixed_workload_binary() {
    every_read_hedged_under_a_mixed_workload(Protocol::Binary, 0x1234_5678);
}

#[test]
fn every_read_hedged_under_a_mixed_workload_meta() {
    every_read_hedged_under_a_mixed_workload(Protocol::Meta, 0xdead_beef);
}

// ---------------------------------------------------------------------------------------
// Touch with copies: every copy in one round trip
// ---------------------------------------------------------------------------------------

/// B frozen: a touch of a key on B and A waits for B's timeout once (not once per copy),
/// succeeds under `WritePolicy::Any` (A touched it) and fails under `All`; either way B is
/// remembered for repair and marked down, so reads go to A at once; once B is back, the
/// repair (a delete there) runs and B answers in step.
fn touch_with_a_frozen_copy(p: Protocol, policy: WritePolicy) {
    let ms = three();
    let io = Duration::from_millis(500);
    let mut c = hedged(&ms, p, Hedge::after(Duration::from_millis(10)), io)
        .write_policy(policy)
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    let k = support::key_on(&ring, B, A, "touch");
    let other = support::key_on(&ring, A, C, "touch-ac");
    c.set(k.as_bytes(), v(&k, 1).as_bytes(), O).unwrap();
    c.set(other.as_bytes(), v(&other, 1).as_bytes(), O).unwrap();
    ms[B].freeze();
    let t = Instant::now();
    let r = c.touch(k.as_bytes(), 0);
    let took = t.elapsed();
    assert!(took < io * 2, "{p:?} {policy:?}: touch took {took:?}");
    match policy {
        WritePolicy::Any => assert!(r.unwrap(), "{p:?}: A holds {k}"),
        _ => assert!(r.is_err(), "{p:?} {policy:?}: {r:?}"),
    }
    assert_eq!(c.fleet_counters().repairs_recorded, 1, "{p:?} {policy:?}");
    assert_eq!(counters(&c, B).timeouts, 1, "{p:?} {policy:?}");
    let t = Instant::now();
    assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 1)));
    assert!(t.elapsed() < io, "{p:?} {policy:?}: read waited for B");
    ms[B].resume();
    support::wait_for("the repair of B", || {
        let _ = c.get(other.as_bytes());
        c.fleet_counters().repairs_done >= 1
    });
    // The repair deleted B's copy; a touch now reaches both copies, which agree.
    assert!(ms[B].client_with(p).get(k.as_bytes()).unwrap().is_none());
    c.set(k.as_bytes(), v(&k, 2).as_bytes(), O).unwrap();
    assert!(c.touch(k.as_bytes(), 0).unwrap());
    assert_eq!(value(&mut c, &k).unwrap(), Some(v(&k, 2)));
    let on_b = ms[B]
        .client_with(p)
        .get(k.as_bytes())
        .unwrap()
        .map(|i| i.value);
    assert_eq!(on_b, Some(v(&k, 2).into_bytes()), "{p:?} {policy:?}");
}

#[test]
fn touch_with_a_frozen_copy_every_protocol_and_policy() {
    for p in PROTOCOLS {
        for policy in [WritePolicy::Any, WritePolicy::All] {
            touch_with_a_frozen_copy(p, policy);
        }
    }
}
