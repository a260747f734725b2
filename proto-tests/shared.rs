//! The shared client against real memcached: many threads and tasks at once, every reply
//! reaching its own caller, cancellation, frozen and restarted servers, a hostile server.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mcstore::{CasResult, ErrorKind, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

fn shared(servers: &[&Memcached], p: Protocol) -> SharedClient {
    shared_over(servers, p, 1)
}

/// With `conns` connections per server (`connections_per_server`: rounds in flight on each).
fn shared_over(servers: &[&Memcached], p: Protocol, conns: usize) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .servers(servers.iter().map(|m| m.addr()))
        .io_timeout(Duration::from_secs(2))
        .shared()
        .connections_per_server(conns)
        .build()
        .unwrap()
}

/// Each caller works on keys of its own and on keys every caller shares (read-only), and
/// checks every reply: a reply for another caller's request would show another value.
fn mixed_calls(c: &SharedClient, caller: usize, calls: usize, shared_keys: usize) -> usize {
    let mut buf = Vec::new();
    let mut checked = 0;
    for n in 0..calls {
        let key = format!("caller:{caller}:{}", n % 17);
        let value = format!("value-{caller}-{n}");
        match n % 5 {
            0 | 1 => {
                c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
                    .unwrap();
                let info = c.get_into(key.as_bytes(), &mut buf).unwrap();
                assert!(info.is_some(), "{key} missing right after its set");
                assert_eq!(buf, value.as_bytes(), "caller {caller} got another value");
            }
            2 => {
                let k = format!("common:{}", n % shared_keys);
                let item = c.get(k.as_bytes()).unwrap().expect("shared key present");
                assert_eq!(item.value, k.as_bytes(), "shared key answered another key");
            }
            3 => {
                let k = format!("counter:{caller}");
                let v = c.incr(k.as_bytes(), 1).unwrap();
                assert!(v.is_some(), "counter {k} missing");
            }
            _ => {
                let item = c.gets(key.as_bytes()).unwrap();
                if let Some(item) = item {
                    let new = format!("cas-{caller}-{n}");
                    // Only this caller writes its keys: the CAS must hold.
                    let r = c
                        .cas(
                            key.as_bytes(),
                            new.as_bytes(),
                            item.cas.unwrap(),
                            SetOptions::default(),
                        )
                        .unwrap();
                    assert_eq!(r, CasResult::Stored);
                    assert!(c.delete(key.as_bytes()).unwrap());
                    assert_eq!(c.get(key.as_bytes()).unwrap(), None);
                }
            }
        }
        checked += 1;
    }
    checked
}

fn prepare(c: &SharedClient, callers: usize, shared_keys: usize) {
    for k in 0..shared_keys {
        let k = format!("common:{k}");
        c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
            .unwrap();
    }
    for t in 0..callers {
        c.set(
            format!("counter:{t}").as_bytes(),
            b"0",
            SetOptions::default(),
        )
        .unwrap();
    }
}

#[test]
fn sixty_four_threads_each_get_their_own_replies() {
    threads_each_get_their_own_replies(1);
}

/// Rounds in flight on three connections at once: the same checks.
#[test]
fn sixty_four_threads_over_three_connections_each_get_their_own_replies() {
    threads_each_get_their_own_replies(3);
}

fn threads_each_get_their_own_replies(conns: usize) {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        // The previous protocol's client closed its connections (its threads end on drop).
        support::wait_for("no client connected", || mc.clients() == 0);
        let c = shared_over(&[&mc], p, conns);
        prepare(&c, 64, 20);
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..64 {
                let (c, done) = (c.clone(), &done);
                s.spawn(move || done.fetch_add(mixed_calls(&c, t, 2000, 20), Ordering::Relaxed));
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 64 * 2000, "{p:?}");
        // Each call counted once, whichever connection served it: every get of a shared
        // key and every get right after a set hit (16 x 2 + ... of each caller's 2,000).
        let hits: u64 = c.server_counters().iter().map(|(_, s)| s.hits).sum();
        assert!(hits >= 64 * 2000 * 3 / 5, "{p:?}: {hits} hits counted");
        let used = mc.clients();
        assert!(
            used <= conns as u64 && (conns == 1 || used >= 2),
            "{p:?}: {used} connections used of {conns}"
        );
        drop(c);
    }
}

/// The async twin of [`mixed_calls`].
async fn mixed_calls_async(
    c: SharedClient,
    caller: usize,
    calls: usize,
    shared_keys: usize,
) -> usize {
    let mut buf = Vec::new();
    let mut checked = 0;
    for n in 0..calls {
        let key = format!("caller:{caller}:{}", n % 17);
        let value = format!("value-{caller}-{n}");
        match n % 5 {
            0 | 1 => {
                c.set_async(key.as_bytes(), value.as_bytes(), SetOptions::default())
                    .await
                    .unwrap();
                let info = c.get_into_async(key.as_bytes(), &mut buf).await.unwrap();
                assert!(info.is_some(), "{key} missing right after its set");
                assert_eq!(buf, value.as_bytes(), "caller {caller} got another value");
            }
            2 => {
                let k = format!("common:{}", n % shared_keys);
                let item = c.get_async(k.as_bytes()).await.unwrap().expect("present");
                assert_eq!(item.value, k.as_bytes(), "shared key answered another key");
            }
            3 => {
                let k = format!("counter:{caller}");
                assert!(c.incr_async(k.as_bytes(), 1).await.unwrap().is_some());
            }
            _ => {
                if let Some(info) = c.gets_into_async(key.as_bytes(), &mut buf).await.unwrap() {
                    let new = format!("cas-{caller}-{n}");
                    let r = c
                        .cas_async(
                            key.as_bytes(),
                            new.as_bytes(),
                            info.cas.unwrap(),
                            SetOptions::default(),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r, CasResult::Stored);
                    assert!(c.delete_async(key.as_bytes()).await.unwrap());
                    assert_eq!(c.get_async(key.as_bytes()).await.unwrap(), None);
                }
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn sixty_four_tokio_tasks_each_get_their_own_replies() {
    tasks_each_get_their_own_replies(1);
}

#[test]
fn sixty_four_tokio_tasks_over_three_connections_each_get_their_own_replies() {
    tasks_each_get_their_own_replies(3);
}

fn tasks_each_get_their_own_replies(conns: usize) {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared_over(&[&mc], p, conns);
        prepare(&c, 64, 20);
        for rt in [
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap(),
        ] {
            let done: usize = rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|t| tokio::spawn(mixed_calls_async(c.clone(), t, 2000, 20)))
                    .collect();
                let mut done = 0;
                for t in tasks {
                    done += t.await.unwrap();
                }
                done
            });
            assert_eq!(done, 64 * 2000, "{p:?}");
        }
    }
}

#[test]
fn another_executor_runs_the_same_calls() {
    // futures-executor's thread pool: no tokio anywhere.
    let mc = Memcached::start();
    let c = shared(&[&mc], Protocol::Meta);
    prepare(&c, 16, 20);
    let pool = futures_executor::ThreadPool::builder()
        .pool_size(2)
        .create()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..16 {
        let (c, tx) = (c.clone(), tx.clone());
        pool.spawn_ok(async move {
            tx.send(mixed_calls_async(c, t, 500, 20).await).unwrap();
        });
    }
    drop(tx);
    assert_eq!(rx.iter().sum::<usize>(), 16 * 500);
    // And a plain block_on on this thread.
    let item = futures_executor::block_on(c.get_async(b"common:3"))
        .unwrap()
        .unwrap();
    assert_eq!(item.value, b"common:3");
}

/// Polls `inner` at most `polls` times, then drops it (mid-flight if it was not done).
struct PollAtMost<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for PollAtMost<F> {
    type Output = Option<F::Output>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<F::Output>> {
        if self.inner.is_none() {
            return std::task::Poll::Ready(None);
        }
        if self.polls == 0 {
            self.inner = None; // dropped here, mid-flight
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        let f = self.inner.as_mut().expect("checked");
        match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => {
                // Come back soon whether or not the reply is in.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
}

#[test]
fn futures_dropped_mid_flight_leave_every_later_call_correct() {
    futures_dropped_mid_flight(1);
}

#[test]
fn futures_dropped_mid_flight_over_three_connections_leave_every_later_call_correct() {
    futures_dropped_mid_flight(3);
}

fn futures_dropped_mid_flight(conns: usize) {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared_over(&[&mc], p, conns);
        prepare(&c, 0, 50);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cancelled = rt.block_on(async {
            let tasks: Vec<_> = (0..32usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let mut dropped = 0;
                        let mut buf = Vec::new();
                        for n in 0..300usize {
                            // A pseudo-random point: before queueing, queued, on the wire.
                            let polls = (t * 31 + n * 17) % 4;
                            let key = format!("common:{}", (t + n) % 50);
                            let r = PollAtMost {
                                inner: Some(Box::pin(c.get_into_async(key.as_bytes(), &mut buf))),
                                polls,
                            }
                            .await;
                            match r {
                                None => dropped += 1,
                                Some(r) => {
                                    r.unwrap().unwrap();
                                    assert_eq!(buf, key.as_bytes());
                                }
                            }
                            if n % 7 == 0 {
                                let v = format!("own-{t}-{n}");
                                let k = format!("own:{t}");
                                let f =
                                    c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default());
                                let _ = PollAtMost {
                                    inner: Some(Box::pin(f)),
                                    polls: polls % 2,
                                }
                                .await;
                            }
                        }
                        dropped
                    })
                })
                .collect();
            let mut dropped = 0;
            for t in tasks {
                dropped += t.await.unwrap();
            }
            dropped
        });
        assert!(
            cancelled > 1000,
            "{p:?}: only {cancelled} calls were dropped mid-way"
        );
        // Then 1,000 calls, all correct, blocking and async.
        let mut buf = Vec::new();
        for n in 0..500 {
            let key = format!("common:{}", n % 50);
            c.get_into(key.as_bytes(), &mut buf).unwrap().unwrap();
            assert_eq!(buf, key.as_bytes(), "{p:?}");
        }
        rt.block_on(async {
            for n in 0..500 {
                let key = format!("common:{}", (n * 7) % 50);
                c.get_into_async(key.as_bytes(), &mut buf)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(buf, key.as_bytes(), "{p:?}");
            }
        });
    }
}

const IO_TIMEOUT: Duration = Duration::from_millis(300);

/// The bound on a failing call: its deadline, plus at most one round on the dead server
/// ahead of it, plus a generous margin for a loaded machine.
fn failure_bound() -> Duration {
    2 * IO_TIMEOUT + Duration::from_secs(2)
}

fn fault_builder(servers: &[Memcached]) -> mcstore::ClientBuilder {
    support::client_builder()
        .servers(servers.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama)
        .io_timeout(IO_TIMEOUT)
        .connect_timeout(IO_TIMEOUT)
        .retry_timeout(Duration::from_millis(500))
}

#[derive(Default)]
struct Seen {
    healthy_ok: AtomicUsize,
    frozen_failed: AtomicUsize,
    frozen_ok_after: AtomicUsize,
}

#[test]
fn a_frozen_server_fails_only_its_keys_within_their_deadline() {
    frozen_server_fails_only_its_keys(1);
}

#[test]
fn a_frozen_server_over_three_connections_fails_only_its_keys_within_their_deadline() {
    frozen_server_fails_only_its_keys(3);
}

fn frozen_server_fails_only_its_keys(conns: usize) {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    for p in PROTOCOLS {
        let b = fault_builder(&servers).protocol(p);
        let c = (b.clone().shared().connections_per_server(conns))
            .build()
            .unwrap();
        let mut plain = b.build().unwrap();
        let keys: Vec<String> = (0..300).map(|i| format!("{p:?}:key:{i}")).collect();
        for k in &keys {
            c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
                .unwrap();
        }
        let frozen = servers[1].addr();
        let on_frozen: Vec<bool> = keys
            .iter()
            .map(|k| plain.home_server_for_key(k.as_bytes()).unwrap() == frozen)
            .collect();
        assert!(on_frozen.iter().filter(|f| **f).count() > 30);
        // 0: all up; 1: server 1 frozen; 2: resumed.
        let phase = std::sync::atomic::AtomicU8::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let seen = Seen::default();
        std::thread::scope(|s| {
            for t in 0..16usize {
                let (c, keys, on_frozen, phase, stop, seen) =
                    (c.clone(), &keys, &on_frozen, &phase, &stop, &seen);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let j = (t * 131 + n * 7) % keys.len();
                        let before = phase.load(Ordering::SeqCst);
                        let t0 = Instant::now();
                        let r = c.get_into(keys[j].as_bytes(), &mut buf);
                        let took = t0.elapsed();
                        let after = phase.load(Ordering::SeqCst);
                        if let Ok(found) = &r {
                            // Whatever the phase, a value is always the right one.
                            assert!(found.is_some(), "{} missing", keys[j]);
                            assert_eq!(buf, keys[j].as_bytes(), "another key's value");
                        }
                        if !on_frozen[j] {
                            assert!(r.is_ok(), "{p:?}: a healthy server's key failed: {r:?}");
                            seen.healthy_ok.fetch_add(1, Ordering::Relaxed);
                        } else if before == 1 && after == 1 {
                            let e = r.expect_err("a frozen server's key succeeded");
                            assert!(
                                matches!(e.kind(), ErrorKind::Timeout | ErrorKind::ServerDown),
                                "{e:?}"
                            );
                            assert!(took < failure_bound(), "failed after {took:?}");
                            seen.frozen_failed.fetch_add(1, Ordering::Relaxed);
                        } else if before == 2 && r.is_ok() {
                            seen.frozen_ok_after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            let healthy = || seen.healthy_ok.load(Ordering::Relaxed);
            support::wait_for("calls before the freeze", || healthy() > 500);
            servers[1].freeze();
            phase.store(1, Ordering::SeqCst);
            let at = healthy();
            support::wait_for("healthy calls and failures while frozen", || {
                healthy() > at + 2000 && seen.frozen_failed.load(Ordering::Relaxed) > 20
            });
            phase.store(2, Ordering::SeqCst);
            servers[1].resume();
            support::wait_for("the resumed server's keys served again", || {
                seen.frozen_ok_after.load(Ordering::Relaxed) > 50
            });
            stop.store(true, Ordering::Relaxed);
        });
    }
}

#[test]
fn a_server_restarted_under_load_is_reconnected() {
    restarted_under_load(1);
}

#[test]
fn a_server_restarted_under_load_over_three_connections_is_reconnected() {
    restarted_under_load(3);
}

fn restarted_under_load(conns: usize) {
    let mut servers = vec![Memcached::start()];
    let b = fault_builder(&servers).shared();
    let c = b.connections_per_server(conns).build().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ok = AtomicUsize::new(0);
    let restarted = std::sync::atomic::AtomicBool::new(false);
    let ok_after = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..8usize {
            let (c, stop, ok, restarted, ok_after) = (c.clone(), &stop, &ok, &restarted, &ok_after);
            s.spawn(move || {
                let mut buf = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("r:{t}:{}", n % 10);
                    let value = format!("{t}-{n}");
                    let after = restarted.load(Ordering::SeqCst);
                    if c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
                        .is_err()
                    {
                        continue;
                    }
                    // Only this caller writes this key: a hit is its own last value.
                    if let Ok(Some(_)) = c.get_into(key.as_bytes(), &mut buf) {
                        assert_eq!(buf, value.as_bytes());
                        ok.fetch_add(1, Ordering::Relaxed);
                        if after {
                            ok_after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        support::wait_for("calls before the restart", || {
            ok.load(Ordering::Relaxed) > 500
        });
        servers[0].restart();
        restarted.store(true, Ordering::SeqCst);
        support::wait_for("calls after the restart", || {
            ok_after.load(Ordering::Relaxed) > 500
        });
        stop.store(true, Ordering::Relaxed);
    });
}

/// A fake text server that answers each `get` line key by key: a good key with its own name
/// as the value; `wrong*` with another key's item; `trunc*` with half a value, then closes;
/// `huge*` with a claimed length of 4 GiB.
fn hostile_server() -> support::Hostile {
    use std::io::Write;
    support::Hostile::start(|line, s| {
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        if words.next() != Some("get") {
            let _ = s.write_all(b"ERROR\r\n");
            return;
        }
        let mut out = Vec::new();
        for key in words {
            if key.starts_with("wrong") {
                out.extend_from_slice(b"VALUE good:0:0 0 8\r\ngood:0:0\r\n");
            } else if key.starts_with("trunc") {
                out.extend_from_slice(format!("VALUE {key} 0 100\r\nhalf").as_bytes());
                let _ = s.write_all(&out);
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            } else if key.starts_with("huge") {
                out.extend_from_slice(format!("VALUE {key} 0 4294967295\r\n").as_bytes());
            } else {
                out.extend_from_slice(
                    format!("VALUE {key} 0 {}\r\n{key}\r\n", key.len()).as_bytes(),
                );
            }
        }
        out.extend_from_slice(b"END\r\n");
        let _ = s.write_all(&out);
    })
}

#[test]
fn a_hostile_server_under_concurrency_never_hands_a_caller_another_value() {
    hostile_under_concurrency(1);
}

/// The same with rounds on three connections at once.
#[test]
fn a_hostile_server_over_three_connections_never_hands_a_caller_another_value() {
    hostile_under_concurrency(3);
}

fn hostile_under_concurrency(conns: usize) {
    let h = hostile_server();
    let c = support::client_builder()
        .server(h.addr())
        .io_timeout(Duration::from_secs(2))
        .server_failure_limit(1_000_000)
        .shared()
        .connections_per_server(conns)
        .build()
        .unwrap();
    let (good_ok, bad_failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..16usize {
            let (c, good_ok, bad_failed) = (c.clone(), &good_ok, &bad_failed);
            s.spawn(move || {
                let mut buf = Vec::new();
                for n in 0..200usize {
                    let bad = n % 10 == t % 10;
                    let key = if bad {
                        ["wrong", "trunc", "huge"][n % 3].to_string() + &format!(":{t}:{n}")
                    } else {
                        format!("good:{t}:{n}")
                    };
                    match c.get_into(key.as_bytes(), &mut buf) {
                        Ok(found) => {
                            assert!(!bad, "{key}: a malformed reply was taken: {found:?}");
                            assert!(found.is_some());
                            assert_eq!(buf, key.as_bytes(), "{key} got another caller's value");
                            good_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        // Good keys sharing a batch with a bad one fail with it.
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.kind(),
                                    ErrorKind::Parse | ErrorKind::Io | ErrorKind::Timeout
                                ),
                                "{key}: {e:?}"
                            );
                            if bad {
                                bad_failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        bad_failed.load(Ordering::Relaxed),
        16 * 20,
        "every bad reply failed its caller"
    );
    // Good keys batched with a bad one fail with it (how many depends on how calls met in
    // batches); some are always served, and a lone good call afterwards is.
    eprintln!(
        "hostile server: {} of {} good calls served, {} bad calls failed",
        good_ok.load(Ordering::Relaxed),
        16 * 180,
        bad_failed.load(Ordering::Relaxed)
    );
    assert!(good_ok.load(Ordering::Relaxed) > 0, "good keys were served");
    let mut buf = Vec::new();
    assert!(c.get_into(b"good:after", &mut buf).unwrap().is_some());
    assert_eq!(buf, b"good:after");
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn ten_thousand_callers_against_a_frozen_server_stay_bounded() {
    let mc = Memcached::start();
    let c = support::client_builder()
        .server(mc.addr())
        .io_timeout(IO_TIMEOUT)
        .connect_timeout(IO_TIMEOUT)
        .server_failure_limit(1_000_000)
        .shared()
        .build()
        .unwrap();
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    mc.freeze();
    let before = peak_rss_kib();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (timeouts, slowest) = rt.block_on(async {
        let tasks: Vec<_> = (0..10_000usize)
            .map(|t| {
                let c = c.clone();
                tokio::spawn(async move {
                    let key = format!("key:{}", t % 500);
                    let t0 = Instant::now();
                    let r = c.get_async(key.as_bytes()).await;
                    (r, t0.elapsed())
                })
            })
            .collect();
        let (mut timeouts, mut slowest) = (0, Duration::ZERO);
        for t in tasks {
            let (r, took) = t.await.unwrap();
            let e = r.expect_err("a frozen server answered");
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
            timeouts += 1;
            slowest = slowest.max(took);
        }
        (timeouts, slowest)
    });
    let after = peak_rss_kib();
    eprintln!(
        "10,000 async callers, frozen server: {timeouts} timeouts, slowest {slowest:?}; \
         peak RSS {before} KiB before, {after} KiB after (+{} KiB)",
        after - before
    );
    assert_eq!(timeouts, 10_000);
    assert!(slowest < failure_bound(), "a caller waited {slowest:?}");
    // A few KiB per waiting caller at most (tokio's tasks and the key strings included).
    assert!(
        after - before < 64 * 1024,
        "peak RSS grew by {} KiB",
        after - before
    );
    mc.resume();
    wait_until_served(&c);
}

fn wait_until_served(c: &SharedClient) {
    support::wait_for("the server to answer again", || {
        matches!(c.get(b"k"), Ok(Some(_)))
    });
}

#[test]
fn multi_key_and_meta_calls_over_three_servers() {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .servers(servers.iter().map(Memcached::addr))
            .distribution(mcstore::ring::Distribution::Ketama)
            .shared()
            .build()
            .unwrap();
        let items: Vec<(String, String)> = (0..300)
            .map(|i| (format!("{p:?}:m:{i}"), format!("value {i}")))
            .collect();
        assert_eq!(c.set_multi(&items, SetOptions::default()).unwrap(), 300);
        let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
        let mut seen = 0;
        c.get_multi(&keys, |k, item| {
            let i: usize = std::str::from_utf8(k)
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(item.value, items[i].1.as_bytes());
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, 300, "{p:?}");
        let mut with_cas = 0;
        c.gets_multi(&keys[..10], |_, item| {
            with_cas += usize::from(item.cas.is_some())
        })
        .unwrap();
        assert_eq!(with_cas, 10);
        assert_eq!(c.delete_multi(&keys[..100]).unwrap(), 100);
        assert_eq!(c.delete_multi(&keys[..100]).unwrap(), 0);
        // Every server got some of the keys.
        let owners: std::collections::HashSet<String> = keys
            .iter()
            .map(|k| c.server_for_key(k.as_bytes()).unwrap())
            .collect();
        assert_eq!(owners.len(), 3);
        let mut buf = Vec::new();
        if p == Protocol::Meta {
            let lease = mcstore::MetaGetOptions {
                lease_ttl: Some(30),
                ..Default::default()
            };
            let won = c.meta_get(b"leased", lease, &mut buf).unwrap().unwrap();
            assert_eq!(won.lease, mcstore::Lease::Won);
            let again = c.meta_get(b"leased", lease, &mut buf).unwrap().unwrap();
            assert_eq!(again.lease, mcstore::Lease::AlreadyWon);
            assert!(c.invalidate(keys[200].as_bytes(), Some(30)).unwrap());
            assert!(c.meta_debug(keys[201].as_bytes()).unwrap().is_some());
        } else {
            let e = c
                .meta_get(b"leased", Default::default(), &mut buf)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
        }
        // Keys are checked before anything is queued; values against the maximum.
        assert_eq!(c.get(b"").unwrap_err().kind(), ErrorKind::InvalidKey);
        if p != Protocol::Meta {
            assert_eq!(c.get(b"bad key").unwrap_err().kind(), ErrorKind::InvalidKey);
        }
        assert_eq!(
            c.get(&[b'k'; 300]).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        let big = vec![0u8; 2 << 20];
        assert_eq!(
            c.set(b"big", &big, SetOptions::default())
                .unwrap_err()
                .kind(),
            ErrorKind::ValueTooLarge
        );
        c.flush_all(None).unwrap();
        assert_eq!(c.get(keys[150].as_bytes()).unwrap(), None);
        assert_eq!(c.version().unwrap().len(), 3);
        assert_eq!(c.stats(None).unwrap().len(), 3);
    }
}

#[test]
fn a_bad_key_under_concurrency_fails_alone() {
    // One server: a lone call is made directly (the Client checks its key), a queued one is
    // checked before it joins a batch, where it would fail everyone's.
    let mc = Memcached::start();
    let c = shared(&[&mc], Protocol::Text);
    c.set(b"good", b"value", SetOptions::default()).unwrap();
    std::thread::scope(|s| {
        for t in 0..16 {
            let c = c.clone();
            s.spawn(move || {
                let mut buf = Vec::new();
                for n in 0..500 {
                    if (n + t) % 5 == 0 {
                        let bad: &[u8] = if n % 2 == 0 { b"" } else { b"a key" };
                        let e = c.get_into(bad, &mut buf).unwrap_err();
                        assert_eq!(e.kind(), ErrorKind::InvalidKey);
                    } else {
                        assert!(c.get_into(b"good", &mut buf).unwrap().is_some());
                        assert_eq!(buf, b"value");
                    }
                }
            });
        }
    });
}

/// The async twins of the calls rounds do not carry (meta calls, calls to every server) do
/// what their blocking calls do, and leave the executor's thread free while they wait.
#[test]
fn meta_and_every_server_calls_have_async_twins() {
    use mcstore::{MetaGetOptions, MetaSetOptions};
    let mc = [Memcached::start(), Memcached::start()];
    let c = shared(&[&mc[0], &mc[1]], Protocol::Meta);
    futures_executor::block_on(async {
        let set = c
            .meta_set_async(b"twin", b"v1", MetaSetOptions::default())
            .await
            .unwrap();
        assert_eq!(set.outcome, mcstore::SetOutcome::Stored, "{set:?}");
        let mut buf = Vec::new();
        let info = c
            .meta_get_async(b"twin", MetaGetOptions::default(), &mut buf)
            .await
            .unwrap();
        assert!(info.is_some());
        assert_eq!(buf, b"v1");
        assert!(c.meta_debug_async(b"twin").await.unwrap().is_some());
        assert!(c.invalidate_async(b"twin", Some(30)).await.unwrap());
        assert_eq!(c.version_async().await.unwrap().len(), 2);
        let stats = c.stats_async(None).await.unwrap();
        assert!(stats
            .iter()
            .all(|s| s.error.is_none() && s.get("pid").is_some()));
        c.verbosity_async(1).await.unwrap();
        let server = c.server_for_key(b"twin").unwrap();
        c.flush_server_async(&server, None).await.unwrap();
        assert!(c.get(b"twin").unwrap().is_none(), "flushed on its server");
        c.set(b"other", b"v", SetOptions::default()).unwrap();
        c.flush_all_async(None).await.unwrap();
        assert!(c.get(b"other").unwrap().is_none(), "flushed everywhere");
    });
}

/// Touches, incrs and decrs, which rounds batch, from many threads on three protocols: each
/// counter is one caller's, so every value it gets back is exactly the one it expects; a
/// touch of a missing key is `false`; the incr of a value that is not a number fails that
/// call alone, never a neighbour's in the same batch.
#[test]
fn touches_and_counters_in_batches_reach_their_own_callers() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&[&mc], p);
        mc.client().flush_all(None).unwrap();
        let callers = 16;
        for t in 0..callers {
            c.set(format!("up:{t}").as_bytes(), b"0", SetOptions::default())
                .unwrap();
            c.set(
                format!("down:{t}").as_bytes(),
                b"1000000",
                SetOptions::default(),
            )
            .unwrap();
            c.set(format!("here:{t}").as_bytes(), b"v", SetOptions::default())
                .unwrap();
            c.set(
                format!("word:{t}").as_bytes(),
                b"abc",
                SetOptions::default(),
            )
            .unwrap();
        }
        std::thread::scope(|s| {
            for t in 0..callers {
                let c = c.clone();
                s.spawn(move || {
                    let (up, down) = (format!("up:{t}"), format!("down:{t}"));
                    let (here, gone) = (format!("here:{t}"), format!("gone:{t}"));
                    let word = format!("word:{t}");
                    let delta = t as u64 + 1;
                    let (mut ups, mut downs) = (0, 1_000_000);
                    for n in 0..400 {
                        match n % 5 {
                            0 => {
                                ups += delta;
                                let v = c.incr(up.as_bytes(), delta).unwrap();
                                assert_eq!(v, Some(ups), "{p:?} caller {t}");
                            }
                            1 => {
                                downs -= 1;
                                let v = c.decr(down.as_bytes(), 1).unwrap();
                                assert_eq!(v, Some(downs), "{p:?} caller {t}");
                            }
                            2 => assert!(c.touch(here.as_bytes(), 3600).unwrap(), "{p:?}"),
                            3 => assert!(!c.touch(gone.as_bytes(), 3600).unwrap(), "{p:?}"),
                            _ => {
                                let e = c.incr(word.as_bytes(), 1).unwrap_err();
                                assert_eq!(e.kind(), ErrorKind::Server, "{p:?}: {e}");
                                assert!(
                                    e.to_string().to_lowercase().contains("non-numeric"),
                                    "{p:?}: {e}"
                                );
                                assert_eq!(c.incr(gone.as_bytes(), 1).unwrap(), None, "{p:?}");
                            }
                        }
                    }
                });
            }
        });
    }
}
