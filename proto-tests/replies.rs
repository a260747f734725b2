//! Never another caller's reply (#32): the cases that handed out another key's value on
//! 22ee596, each on every protocol. Quiet and noreply commands whose failure replies the
//! server still sends, caught panics in callbacks, opaques shared by pipelines and single
//! calls. Every read is checked against the value its own key holds.

use mcstore_test_support as support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use mcstore::{Client, IoMode, Pool, Protocol, SetOptions, StoreMode};
use support::{panicking_callback, Memcached};

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

/// What the calls after a case returned: values of another key, and errors.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    calls: usize,
    wrong: usize,
    errors: usize,
}

impl Tally {
    fn check<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        got: mcstore::Result<T>,
        want: T,
    ) {
        self.calls += 1;
        match got {
            Ok(v) if v == want => {}
            Ok(v) => {
                self.wrong += 1;
                eprintln!("{what}: wrong reply {v:?}, want {want:?}");
            }
            Err(e) => {
                self.errors += 1;
                eprintln!("{what}: {e}");
            }
        }
    }

    /// Prints the tally (the closing note's before/after table reads these lines) and
    /// fails on any wrong value or error.
    fn assert_clean(&self, case: &str) {
        println!(
            "REPLIES {case}: calls={} wrong={} errors={}",
            self.calls, self.wrong, self.errors
        );
        assert_eq!(self.wrong, 0, "{case}: another key's reply");
        assert_eq!(self.errors, 0, "{case}: failed calls");
    }
}

/// After whatever the case left on the connection, an incr of the existing counter `c:1`
/// and gets of `k:A` and `k:B` must each return their own key's value.
fn check_next_calls(c: &mut Client, t: &mut Tally, what: &str) {
    let value = |r: mcstore::Result<Option<mcstore::Item>>| r.map(|i| i.map(|i| i.value));
    t.check(what, c.incr(b"c:1", 1), Some(1_000_000_000_501));
    t.check(what, value(c.get(b"k:A")), Some(b"value of A".to_vec()));
    t.check(what, value(c.get(b"k:B")), Some(b"value of B".to_vec()));
    t.check(what, value(c.get(b"k:A")), Some(b"value of A".to_vec()));
}

/// Sets `k:A`, `k:B` and the counter `c:1`, and makes sure `missing` is missing. A call
/// that fails here (the connection was left out of step) is retried once on the fresh one.
fn seed(c: &mut Client) {
    let once = |c: &mut Client| -> mcstore::Result<()> {
        c.set(b"k:A", b"value of A", SetOptions::default())?;
        c.set(b"k:B", b"value of B", SetOptions::default())?;
        c.set(b"c:1", b"1000000000500", SetOptions::default())?;
        c.delete(b"missing").map(drop)
    };
    if once(c).is_err() {
        once(c).unwrap();
    }
}

/// A case: its name, and what it leaves on the connection.
type Case = (&'static str, fn(&mut Client));

/// After each quiet or noreply call whose condition fails (so that memcached answers even a
/// quiet command: `md q` and `ma q` on a missing key answer `NF`, an add of an existing key
/// `NS`), the next calls get their own replies.
#[test]
fn quiet_failures_are_never_read_as_the_next_calls_reply() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let mut c = mc.client_with(p);
        let cases: [Case; 4] = [
            ("delete_noreply of a missing key", |c| {
                c.delete_noreply(b"missing").unwrap()
            }),
            ("add_noreply of an existing key", |c| {
                c.store_noreply(StoreMode::Add, b"k:A", b"x", SetOptions::default())
                    .unwrap()
            }),
            (
                "pipeline send: incr, touch, replace of a missing key",
                |c| {
                    let mut pl = c.pipeline();
                    pl.incr(b"missing", 1, false).unwrap();
                    pl.touch(b"missing", 10).unwrap();
                    pl.store(StoreMode::Replace, b"missing", b"x", SetOptions::default())
                        .unwrap();
                    pl.send().unwrap();
                },
            ),
            ("pipeline send: incr of a missing key", |c| {
                let mut pl = c.pipeline();
                pl.incr(b"missing", 1, false).unwrap();
                pl.send().unwrap();
            }),
        ];
        for (case, run) in cases {
            let mut t = Tally::default();
            for round in 0..4 {
                seed(&mut c);
                run(&mut c);
                check_next_calls(&mut c, &mut t, &format!("{p:?} {case}, round {round}"));
            }
            t.assert_clean(&format!("{p:?} client, {case}"));
        }
        // A multi-key call after them reads its own replies too.
        let mut t = Tally::default();
        for round in 0..4 {
            seed(&mut c);
            c.delete_noreply(b"missing").unwrap();
            let mut got = Vec::new();
            let r = c.get_multi(&[&b"k:B"[..], b"k:A", b"missing"], |k, item| {
                got.push((k.to_vec(), item.value.to_vec()))
            });
            got.sort();
            let want = vec![
                (b"k:A".to_vec(), b"value of A".to_vec()),
                (b"k:B".to_vec(), b"value of B".to_vec()),
            ];
            t.check(&format!("{p:?} get_multi"), r.map(|()| got), want);
            check_next_calls(&mut c, &mut t, &format!("{p:?} after get_multi, {round}"));
        }
        t.assert_clean(&format!("{p:?} client, get_multi after delete_noreply"));
        // Binary and meta report the unmet conditions they read, text's noreply none. Over
        // TLS a pipeline waits for its sync when it is sent, so nothing is left for later.
        let late = c.server_counters()[0].1.late_replies;
        match p {
            Protocol::Text => assert_eq!(late, 0),
            _ if support::tls_mode() => assert_eq!(late, 0),
            _ => assert!(late >= 4 * 4, "{p:?}: {late} late replies read"),
        }
    }
}

/// A pool of one client, three callers in turn: each call after another caller's noreply
/// gets its own reply.
#[test]
fn pooled_callers_after_noreply_get_their_own_replies() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let pool = Pool::from(mc.client_with(p));
        let mut t = Tally::default();
        for round in 0..4 {
            seed(&mut pool.get().unwrap());
            pool.get().unwrap().delete_noreply(b"missing").unwrap();
            let what = format!("{p:?} round {round}");
            check_next_calls(&mut pool.get().unwrap(), &mut t, &what);
        }
        t.assert_clean(&format!("{p:?} pool of one, three callers"));
    }
}

/// The pipeline's unmet conditions are counted where the protocol reports them.
#[test]
fn pipelines_count_unmet_conditions() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let mut c = mc.client_with(p);
        seed(&mut c);
        let mut pl = c.pipeline();
        pl.store(StoreMode::Add, b"k:A", b"x", SetOptions::default())
            .unwrap();
        pl.delete(b"missing").unwrap();
        pl.incr(b"missing", 1, false).unwrap();
        pl.set(b"fresh", b"v", SetOptions::default()).unwrap();
        let r = pl.finish().unwrap();
        assert_eq!((r.commands, r.errors), (4, 0), "{p:?}");
        let want = if p == Protocol::Text { 0 } else { 3 };
        assert_eq!(r.unmet, want, "{p:?}: {r:?}");
        let mut t = Tally::default();
        check_next_calls(&mut c, &mut t, &format!("{p:?} after finish"));
        t.assert_clean(&format!("{p:?} client, calls after a pipeline's finish"));
    }
}

/// A panic in a `get_multi` callback (caught) leaves the other servers' replies unread: the
/// next calls must not take them for theirs.
#[test]
fn a_panicking_multi_get_callback_leaves_no_reply_behind() {
    let servers = [Memcached::start(), Memcached::start(), Memcached::start()];
    let keys: Vec<String> = (0..60).map(|i| format!("k:{i}")).collect();
    for p in [Protocol::Meta, Protocol::Binary, Protocol::Text] {
        let mut c = support::client_builder()
            .protocol(p)
            .servers(servers.iter().map(Memcached::addr))
            .build()
            .unwrap();
        for k in &keys {
            c.set(
                k.as_bytes(),
                format!("value of {k}").as_bytes(),
                SetOptions::default(),
            )
            .unwrap();
        }
        let mut t = Tally::default();
        for round in 0..30 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                c.get_multi(&keys, |_, _| panicking_callback())
            }));
            assert!(r.is_err(), "the panic reaches the caller");
            for k in keys.iter().skip(round % 7).step_by(7).take(60) {
                let got = c.get(k.as_bytes()).map(|i| i.map(|i| i.value));
                t.check(
                    &format!("{p:?} {k}"),
                    got,
                    Some(format!("value of {k}").into_bytes()),
                );
            }
        }
        t.assert_clean(&format!("{p:?} client, gets after caught get_multi panics"));
        // The same through a pool that keeps the client.
        let pool = Pool::from(c);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut c = pool.get().unwrap();
            c.get_multi(&keys, |_, _| panicking_callback())
        }));
        assert!(r.is_err());
        let mut t = Tally::default();
        let mut c = pool.get().unwrap();
        for k in &keys {
            let got = c.get(k.as_bytes()).map(|i| i.map(|i| i.value));
            t.check(
                &format!("{p:?} {k}"),
                got,
                Some(format!("value of {k}").into_bytes()),
            );
        }
        t.assert_clean(&format!(
            "{p:?} pool keeping the client, after a caught panic"
        ));
    }
}

/// A shared client's multi-get whose callback panics gives back the slots of the calls it
/// had queued: with 64 slots, later calls still get one.
#[test]
fn a_panicking_shared_callback_releases_its_slots() {
    let mc = Memcached::start();
    let keys: Vec<String> = (0..100).map(|i| format!("k:{i}")).collect();
    for p in PROTOCOLS {
        for mode in [IoMode::IoThread, IoMode::Adaptive, IoMode::Combining] {
            let c = support::client_builder()
                .protocol(p)
                .server(mc.addr())
                .io_timeout(Duration::from_secs(2))
                .shared()
                .max_in_flight(64)
                .io_mode(mode)
                .build()
                .unwrap();
            for k in &keys {
                c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
                    .unwrap();
            }
            for _ in 0..10 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    c.get_multi(&keys, |_, _| panicking_callback())
                }));
                assert!(r.is_err());
            }
            let mut hits = 0;
            c.get_multi(&keys, |k, item| {
                assert_eq!(k, item.value);
                hits += 1;
            })
            .unwrap_or_else(|e| panic!("{p:?} {mode:?}: {e}"));
            assert_eq!(hits, keys.len(), "{p:?} {mode:?}");
        }
    }
}

/// A pipeline started on a connection that still owes the replies of another caller's
/// fire-and-forget commands counts only its own: the earlier ones are late replies.
#[test]
fn a_pipeline_counts_only_its_own_replies() {
    let mc = Memcached::start();
    for p in [Protocol::Binary, Protocol::Meta] {
        let pool = Pool::from(mc.client_with(p));
        seed(&mut pool.get().unwrap());
        // Caller A: a quiet delete of a missing key and a quiet add of an existing one.
        {
            let mut a = pool.get().unwrap();
            a.delete_noreply(b"missing").unwrap();
            a.store_noreply(StoreMode::Add, b"k:A", b"x", SetOptions::default())
                .unwrap();
        }
        // Caller B: a pipeline with nothing unmet.
        let mut b = pool.get().unwrap();
        let mut pl = b.pipeline();
        pl.set(b"k:C", b"value of C", SetOptions::default())
            .unwrap();
        let r = pl.finish().unwrap();
        assert_eq!((r.commands, r.errors, r.unmet), (1, 0, 0), "{p:?}: {r:?}");
        // Set aside as late replies; over TLS a sent pipeline waits for its sync, so A's
        // replies were read by A's own pipelines and none are left for B.
        let late = b.server_counters()[0].1.late_replies;
        let want = if support::tls_mode() { 0 } else { 2 };
        assert_eq!(late, want, "{p:?}: A's replies were set aside");
        let mut t = Tally::default();
        check_next_calls(&mut b, &mut t, &format!("{p:?} after B's pipeline"));
        t.assert_clean(&format!("{p:?} pipeline after another caller's noreply"));
    }
}

/// A waker that panics when the shared client's I/O thread completes its future: the thread
/// keeps serving, the interrupted round is never served again, and every later call gets its
/// own reply.
#[test]
fn a_panicking_waker_does_not_stop_the_io_thread() {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};
    struct Panicky;
    impl Wake for Panicky {
        fn wake(self: Arc<Self>) {
            panicking_callback()
        }
    }
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_secs(2))
            .shared()
            .io_mode(IoMode::IoThread)
            .build()
            .unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("w:{i}")).collect();
        for k in &keys {
            c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
                .unwrap();
        }
        let waker = Waker::from(Arc::new(Panicky));
        let mut cx = Context::from_waker(&waker);
        let mut t = Tally::default();
        for round in 0..10 {
            let key = keys[round].as_bytes();
            let mut fut = Box::pin(c.get_async(key));
            let _ = fut.as_mut().poll(&mut cx);
            for k in &keys {
                let got = c.get(k.as_bytes()).map(|i| i.map(|i| i.value));
                t.check(&format!("{p:?} {k}"), got, Some(k.clone().into_bytes()));
            }
        }
        t.assert_clean(&format!("{p:?} shared client after panicking wakers"));
    }
}
