//! Attacks on the shared client's chained rounds (`Core::chain`): gets, stores, deletes,
//! touches and incrs of many callers in one exchange. Every caller checks that every result
//! is its own: its own values, its own counters, its own outcomes.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mcstore::{ErrorKind, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

fn shared(m: &Memcached, p: Protocol, timeout: Duration) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .server(m.addr())
        .io_timeout(timeout)
        .connect_timeout(timeout)
        .retry_timeout(Duration::from_millis(200))
        .server_failure_limit(1_000_000)
        .shared()
        .build()
        .unwrap()
}

/// One caller's exact-result workload: every op's outcome is known in advance.
fn exact_caller(c: &SharedClient, p: Protocol, t: usize, rounds: usize) {
    let o = SetOptions::default;
    let (val, ctr, del, here, gone, word, add) = (
        format!("v:{t}"),
        format!("c:{t}"),
        format!("d:{t}"),
        format!("h:{t}"),
        format!("g:{t}"),
        format!("w:{t}"),
        format!("a:{t}"),
    );
    let base = t as u64 * 1_000_000;
    c.set(ctr.as_bytes(), base.to_string().as_bytes(), o())
        .unwrap();
    c.set(here.as_bytes(), b"here", o()).unwrap();
    c.set(word.as_bytes(), b"abc", o()).unwrap();
    let _ = c.delete(gone.as_bytes());
    let mut counter = base;
    let mut buf = Vec::new();
    for n in 0..rounds {
        let value = format!("value-{t}-{n}-{}", "x".repeat(n % 50));
        match n % 9 {
            0 => {
                c.set(val.as_bytes(), value.as_bytes(), o()).unwrap();
                let got = c.get_into(val.as_bytes(), &mut buf).unwrap();
                assert!(got.is_some(), "{p:?} {t}: own set not visible");
                assert_eq!(
                    String::from_utf8_lossy(&buf),
                    value,
                    "{p:?} caller {t} got another value"
                );
            }
            1 => {
                counter += (t as u64 % 7) + 1;
                let v = c.incr(ctr.as_bytes(), (t as u64 % 7) + 1).unwrap();
                assert_eq!(v, Some(counter), "{p:?} caller {t} counter");
            }
            2 => {
                counter -= 1;
                let v = c.decr(ctr.as_bytes(), 1).unwrap();
                assert_eq!(v, Some(counter), "{p:?} caller {t} decr");
            }
            3 => {
                c.set(del.as_bytes(), b"x", o()).unwrap();
                assert!(
                    c.delete(del.as_bytes()).unwrap(),
                    "{p:?} {t} delete existing"
                );
                assert!(
                    !c.delete(del.as_bytes()).unwrap(),
                    "{p:?} {t} delete missing"
                );
                assert!(
                    c.get(del.as_bytes()).unwrap().is_none(),
                    "{p:?} {t} deleted key hit"
                );
            }
            4 => {
                assert!(
                    c.touch(here.as_bytes(), 3600).unwrap(),
                    "{p:?} {t} touch here"
                );
                assert!(
                    !c.touch(gone.as_bytes(), 3600).unwrap(),
                    "{p:?} {t} touch gone"
                );
            }
            5 => {
                let e = c.incr(word.as_bytes(), 1).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Server, "{p:?} {t}: {e}");
                assert_eq!(c.incr(gone.as_bytes(), 1).unwrap(), None, "{p:?} {t}");
            }
            6 => {
                let _ = c.delete(add.as_bytes()).unwrap();
                assert!(
                    c.add(add.as_bytes(), value.as_bytes(), o()).unwrap(),
                    "{p:?} {t} add new"
                );
                assert!(
                    !c.add(add.as_bytes(), b"no", o()).unwrap(),
                    "{p:?} {t} add existing"
                );
                let item = c.get(add.as_bytes()).unwrap().expect("added");
                assert_eq!(item.value, value.as_bytes(), "{p:?} {t} add value");
            }
            7 => {
                let item = c.gets(val.as_bytes()).unwrap();
                if let Some(item) = item {
                    let r = c
                        .cas(val.as_bytes(), value.as_bytes(), item.cas.unwrap(), o())
                        .unwrap();
                    assert_eq!(r, mcstore::CasResult::Stored, "{p:?} {t} own cas");
                    let got = c.get(val.as_bytes()).unwrap().expect("cas'd");
                    assert_eq!(got.value, value.as_bytes(), "{p:?} {t} cas value");
                }
            }
            _ => {
                assert!(
                    c.get(gone.as_bytes()).unwrap().is_none(),
                    "{p:?} {t} gone hit"
                );
                let item = c.get(word.as_bytes()).unwrap().expect("word");
                assert_eq!(item.value, b"abc", "{p:?} {t} word");
            }
        }
    }
    // The counter is exactly what this caller made it.
    let item = c.get(ctr.as_bytes()).unwrap().expect("counter");
    assert_eq!(
        item.value,
        counter.to_string().as_bytes(),
        "{p:?} {t} final counter"
    );
}

#[test]
fn mixed_chained_rounds_every_caller_gets_exact_results() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_secs(5));
        std::thread::scope(|s| {
            for t in 0..24usize {
                let c = c.clone();
                s.spawn(move || exact_caller(&c, p, t, 300));
            }
        });
    }
}

#[test]
fn mixed_chained_rounds_async_every_caller_gets_exact_results() {
    let mc = Memcached::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_secs(5));
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..48usize {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let o = SetOptions::default;
                    let (k, ctr, h, g) = (
                        format!("av:{t}"),
                        format!("ac:{t}"),
                        format!("ah:{t}"),
                        format!("ag:{t}"),
                    );
                    let base = t as u64 * 1_000_000;
                    c.set_async(ctr.as_bytes(), base.to_string().as_bytes(), o())
                        .await
                        .unwrap();
                    c.set_async(h.as_bytes(), b"h", o()).await.unwrap();
                    let _ = c.delete_async(g.as_bytes()).await;
                    let mut counter = base;
                    for n in 0..200usize {
                        let v = format!("{t}-{n}");
                        // Several kinds in flight at once from one task.
                        let (a, b, d, e, f) = tokio::join!(
                            c.set_async(k.as_bytes(), v.as_bytes(), o()),
                            c.incr_async(ctr.as_bytes(), 1),
                            c.touch_async(h.as_bytes(), 3600),
                            c.delete_async(g.as_bytes()),
                            c.get_async(h.as_bytes()),
                        );
                        a.unwrap();
                        counter += 1;
                        assert_eq!(b.unwrap(), Some(counter), "{p:?} {t} counter");
                        assert!(d.unwrap(), "{p:?} {t} touch");
                        assert!(!e.unwrap(), "{p:?} {t} delete of a missing key");
                        assert_eq!(f.unwrap().expect("h").value, b"h", "{p:?} {t}");
                        let got = c.get_async(k.as_bytes()).await.unwrap().expect("own");
                        assert_eq!(got.value, v.as_bytes(), "{p:?} {t} own value");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
}

/// Under SIGSTOP/SIGCONT cycles: a call that returns `Ok` must have run (a set reported done
/// is read back unless a later set of the same caller failed, its outcome unknown), and any
/// value or counter a caller gets is its own.
#[test]
fn frozen_server_mid_chain_never_reports_unexecuted_or_foreign_results() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_millis(400));
        let stop = AtomicBool::new(false);
        let oks = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..12usize {
                let (c, stop, oks) = (c.clone(), &stop, &oks);
                s.spawn(move || {
                    let key = format!("f:{t}");
                    let ctr = format!("fc:{t}");
                    let base = t as u64 * 1_000_000;
                    // Values that may be stored: the last confirmed and any since whose set failed.
                    let mut possible: Vec<String> = Vec::new();
                    let mut counter: Option<u64> = None;
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let v = format!("{t}-{n}");
                        match c.set(key.as_bytes(), v.as_bytes(), SetOptions::default()) {
                            Ok(()) => possible = vec![v.clone()],
                            Err(_) => possible.push(v.clone()),
                        }
                        match c.get(key.as_bytes()) {
                            Ok(Some(item)) => {
                                let got = String::from_utf8_lossy(&item.value).into_owned();
                                assert!(
                                    possible.contains(&got),
                                    "{p:?} {t}: got {got}, possible {possible:?}"
                                );
                                possible = vec![got];
                                oks.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(None) => {
                                panic!("{p:?} {t}: own key missing (possible {possible:?})")
                            }
                            Err(_) => {}
                        }
                        if counter.is_none() {
                            if c.set(
                                ctr.as_bytes(),
                                base.to_string().as_bytes(),
                                SetOptions::default(),
                            )
                            .is_ok()
                            {
                                counter = Some(base);
                            }
                            continue;
                        }
                        match c.incr(ctr.as_bytes(), 1) {
                            Ok(Some(x)) => {
                                let want = counter.unwrap() + 1;
                                assert!(
                                    x >= want && x < base + 1_000_000,
                                    "{p:?} {t}: counter {x}, expected {want}"
                                );
                                // x > want only if an earlier incr failed but ran.
                                counter = Some(x);
                            }
                            Ok(None) => panic!("{p:?} {t}: own counter missing"),
                            Err(_) => {
                                // Ran or not: resynchronise from the server.
                                counter = None;
                            }
                        }
                        let _ = c.touch(key.as_bytes(), 3600).map(|b| {
                            // A touch of an existing key: the key exists (we set it).
                            assert!(b || possible.is_empty(), "{p:?} {t}: touch false");
                        });
                    }
                });
            }
            for _ in 0..3 {
                support::wait_for("calls between freezes", || {
                    oks.load(Ordering::Relaxed) > 200
                });
                mc.freeze();
                std::thread::sleep(Duration::from_millis(700));
                mc.resume();
                oks.store(0, Ordering::Relaxed);
            }
            support::wait_for("calls after", || oks.load(Ordering::Relaxed) > 200);
            stop.store(true, Ordering::Relaxed);
        });
    }
}

/// A text server that answers every command, good keys correctly (a get with the key as
/// the value, an incr of `n:<t>:<x>` with `t * 100000 + x`), others with a malformed,
/// foreign or truncated reply.
fn hostile_mixed() -> support::Hostile {
    use std::io::Write;
    support::Hostile::start(|line, s| {
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or("");
        if verb.starts_with("DATA") {
            return; // a store's data block
        }
        let mut out = Vec::new();
        let close = |s: &mut support::HostileConn, out: &[u8]| {
            let _ = s.write_all(out);
            let _ = s.shutdown(std::net::Shutdown::Both);
        };
        match verb {
            "get" | "gets" => {
                for key in words {
                    if key.starts_with("wrong") {
                        out.extend_from_slice(b"VALUE good:0:0 0 8\r\ngood:0:0\r\n");
                    } else if key.starts_with("trunc") {
                        out.extend_from_slice(format!("VALUE {key} 0 100\r\nhalf").as_bytes());
                        return close(s, &out);
                    } else if key.starts_with("dupend") {
                        out.extend_from_slice(b"END\r\n");
                    } else {
                        out.extend_from_slice(
                            format!("VALUE {key} 0 {}\r\n{key}\r\n", key.len()).as_bytes(),
                        );
                    }
                }
                out.extend_from_slice(b"END\r\n");
            }
            "set" | "add" | "delete" | "touch" | "incr" | "decr" => {
                let key = words.next().unwrap_or("");
                let ok: &[u8] = match verb {
                    "set" | "add" => b"STORED\r\n",
                    "delete" => b"DELETED\r\n",
                    "touch" => b"TOUCHED\r\n",
                    _ => b"",
                };
                if key.starts_with("wrong") {
                    out.extend_from_slice(b"VALUE good:0:0 0 8\r\ngood:0:0\r\nEND\r\n");
                } else if key.starts_with("trunc") {
                    return close(s, &ok[..ok.len().min(3)]);
                } else if key.starts_with("err") {
                    out.extend_from_slice(
                        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
                    );
                } else if key.starts_with("srv") {
                    out.extend_from_slice(b"SERVER_ERROR out of memory\r\n");
                } else if ok.is_empty() {
                    // good:<t>:<x>
                    let mut parts = key.split(':').skip(1);
                    let t: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let x: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    out.extend_from_slice(format!("{}\r\n", t * 100_000 + x).as_bytes());
                } else {
                    out.extend_from_slice(ok);
                }
            }
            _ => out.extend_from_slice(b"ERROR\r\n"),
        }
        let _ = s.write_all(&out);
    })
}

#[test]
fn a_hostile_text_server_in_mixed_rounds_never_hands_a_caller_another_result() {
    hostile_mixed_rounds(hostile_mixed(), Protocol::Text);
}

#[test]
fn a_hostile_meta_server_in_mixed_rounds_never_hands_a_caller_another_result() {
    hostile_mixed_rounds(hostile_meta(), Protocol::Meta);
}

/// The meta twin of [`hostile_mixed`]: good keys answered correctly (by their opaque), the
/// others with an error line, a truncated reply or a closed connection.
fn hostile_meta() -> support::Hostile {
    use std::io::Write;
    support::Hostile::start(|line, s| {
        let line = String::from_utf8_lossy(line);
        let words: Vec<&str> = line.split_whitespace().collect();
        let verb = words.first().copied().unwrap_or("");
        if verb.starts_with("DATA") {
            return;
        }
        if verb == "mn" {
            let _ = s.write_all(b"MN\r\n");
            return;
        }
        let key = words.get(1).copied().unwrap_or("");
        let flags = &words[2.min(words.len())..];
        let quiet = flags.contains(&"q");
        let op = flags
            .iter()
            .find(|f| f.starts_with('O'))
            .map(|f| format!(" {f}"))
            .unwrap_or_default();
        let has = |c: char| flags.iter().any(|f| f.starts_with(c));
        let close = |s: &mut support::HostileConn, out: &[u8]| {
            let _ = s.write_all(out);
            let _ = s.shutdown(std::net::Shutdown::Both);
        };
        let mut out = Vec::new();
        if key.starts_with("trunc") {
            return close(s, format!("VA 100{op}\r\nhal").as_bytes());
        } else if key.starts_with("err") {
            out.extend_from_slice(
                b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
            );
        } else if key.starts_with("srv") {
            out.extend_from_slice(b"SERVER_ERROR out of memory\r\n");
        } else if key.starts_with("wrong") {
            // Another kind's reply: a hit for a write, a stored for a read.
            if verb == "mg" && !has('T') {
                out.extend_from_slice(format!("HD{op}\r\n").as_bytes());
            } else {
                out.extend_from_slice(format!("VA 8{op}\r\ngood:0:0\r\n").as_bytes());
            }
        } else {
            match verb {
                "mg" if has('T') => out.extend_from_slice(format!("HD{op}\r\n").as_bytes()),
                "mg" => {
                    let f = if has('f') { " f0" } else { "" };
                    out.extend_from_slice(
                        format!("VA {}{f}{op}\r\n{key}\r\n", key.len()).as_bytes(),
                    )
                }
                "ms" | "md" => {
                    if !quiet {
                        out.extend_from_slice(format!("HD{op}\r\n").as_bytes());
                    }
                }
                "ma" => {
                    let mut parts = key.split(':').skip(1);
                    let t: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let x: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let v = (t * 100_000 + x).to_string();
                    if has('v') {
                        out.extend_from_slice(format!("VA {}{op}\r\n{v}\r\n", v.len()).as_bytes());
                    } else {
                        out.extend_from_slice(format!("HD{op}\r\n").as_bytes());
                    }
                }
                _ => out.extend_from_slice(b"ERROR\r\n"),
            }
        }
        let _ = s.write_all(&out);
    })
}

fn hostile_mixed_rounds(h: support::Hostile, p: Protocol) {
    let c = support::client_builder()
        .protocol(p)
        .server(h.addr())
        .io_timeout(Duration::from_secs(2))
        .server_failure_limit(1_000_000)
        .retry_timeout(Duration::from_millis(50))
        .shared()
        .build()
        .unwrap();
    let good_ok = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..16usize {
            let (c, good_ok) = (c.clone(), &good_ok);
            s.spawn(move || {
                let mut buf = Vec::new();
                for n in 0..150usize {
                    let bad = n % 7 == t % 7;
                    let prefix = if bad {
                        ["wrong", "trunc", "err", "srv", "dupend"][(n / 7) % 5]
                    } else {
                        "good"
                    };
                    let key = format!("{prefix}:{t}:{n}");
                    let data = format!("DATA{t}:{n}");
                    let k = key.as_bytes();
                    let allowed = |e: &mcstore::Error| {
                        assert!(
                            matches!(
                                e.kind(),
                                ErrorKind::Parse
                                    | ErrorKind::Io
                                    | ErrorKind::Timeout
                                    | ErrorKind::Server
                            ),
                            "{key}: {e:?}"
                        )
                    };
                    match n % 5 {
                        0 => match c.get_into(k, &mut buf) {
                            Ok(found) => {
                                if prefix == "dupend" {
                                    // An early END: this key and those after it miss.
                                    continue;
                                }
                                // A miss is possible (a neighbour's early END); a hit is
                                // this key's own value.
                                if found.is_some() {
                                    // (The server answers gets of err/srv/dupend keys well.)
                                    assert!(
                                        !matches!(prefix, "wrong" | "trunc"),
                                        "{key}: a malformed reply was taken"
                                    );
                                    assert_eq!(buf, k, "{key} got another caller's value");
                                    good_ok.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => allowed(&e),
                        },
                        1 => match c.incr(k, 1) {
                            Ok(v) => {
                                assert!(!bad || prefix == "dupend", "{key}: bad incr took {v:?}");
                                assert_eq!(
                                    v,
                                    Some(t as u64 * 100_000 + n as u64),
                                    "{key}: another caller's counter"
                                );
                                good_ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                allowed(&e);
                                if prefix == "err" {
                                    // Its own error: a Server error, never a neighbour's.
                                }
                            }
                        },
                        2 => match c.set(k, data.as_bytes(), SetOptions::default()) {
                            Ok(()) => assert!(!bad || prefix == "dupend", "{key}: bad set ok"),
                            Err(e) => allowed(&e),
                        },
                        3 => match c.touch(k, 10) {
                            Ok(b) => {
                                assert!(!bad || prefix == "dupend", "{key}: bad touch ok {b}");
                                assert!(b, "{key}");
                            }
                            Err(e) => allowed(&e),
                        },
                        _ => match c.delete(k) {
                            Ok(b) => {
                                assert!(!bad || prefix == "dupend", "{key}: bad delete ok {b}");
                                assert!(b, "{key}");
                            }
                            Err(e) => allowed(&e),
                        },
                    }
                }
            });
        }
    });
    eprintln!(
        "hostile mixed {p:?}: {} good calls served",
        good_ok.load(Ordering::Relaxed)
    );
    assert!(good_ok.load(Ordering::Relaxed) > 0);
    let mut buf = Vec::new();
    assert!(c.get_into(b"good:after", &mut buf).unwrap().is_some());
    assert_eq!(buf, b"good:after");
}

/// A round of several kinds whose server refuses the connection: the failed connect is one
/// failure of the server (as a round one kind at a time counts it: its first batch fails and
/// poisons the rest), not one per part. With a failure limit of 3, one failed exchange and
/// one refused round must not eject the server.
#[test]
fn a_refused_connect_in_a_chained_round_counts_once_toward_ejection() {
    let h = support::Hostile::start(|_line, s| {
        std::thread::sleep(Duration::from_millis(800));
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let c = support::client_builder()
        .protocol(Protocol::Meta)
        .server(h.addr())
        .io_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1))
        .server_failure_limit(3)
        .retry_timeout(Duration::from_secs(60))
        .shared()
        .build()
        .unwrap();
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        // Holds the engine: its call fails after 800 ms (the server closes).
        let c0 = c.clone();
        let first = s.spawn(move || c0.get(b"first").map(|_| ()));
        std::thread::sleep(Duration::from_millis(200));
        // No more connections: the next round's connect is refused.
        drop(h);
        let mut callers = Vec::new();
        for kind in 0..5usize {
            let (c, errors) = (c.clone(), &errors);
            callers.push(s.spawn(move || {
                let k = format!("k{kind}");
                let k = k.as_bytes();
                let r = match kind {
                    0 => c.get(k).map(drop),
                    1 => c.set(k, b"v", SetOptions::default()),
                    2 => c.delete(k).map(drop),
                    3 => c.touch(k, 10).map(drop),
                    _ => c.incr(k, 1).map(drop),
                };
                errors.lock().unwrap().push(r.map_err(|e| e.kind()));
            }));
        }
        eprintln!("first: {:?}", first.join().unwrap().map_err(|e| e.kind()));
        for t in callers {
            t.join().unwrap();
        }
    });
    eprintln!("callers: {:?}", errors.lock().unwrap());
    let counters = c.server_counters();
    eprintln!("counters: {counters:?}");
    let (_, sc) = &counters[0];
    assert!(
        sc.errors <= 2,
        "one failed exchange and one refused round counted as {} failures",
        sc.errors
    );
    assert_eq!(
        sc.ejections, 0,
        "ejected after two failures with a limit of 3"
    );
}

/// Large values in every part of the round: one write of up to a megabyte (four write
/// parts, each under the round cap) while the gets' replies stream back. Every caller reads
/// its own value back.
#[test]
fn large_values_in_chained_rounds_reach_their_own_callers() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_secs(10));
        std::thread::scope(|s| {
            for t in 0..12usize {
                let c = c.clone();
                s.spawn(move || {
                    let key = format!("big:{t}");
                    let ctr = format!("bigc:{t}");
                    c.set(ctr.as_bytes(), b"0", SetOptions::default()).unwrap();
                    let mut count = 0;
                    for n in 0..40usize {
                        let len = 20_000 + (t * 997 + n * 131) % 40_000;
                        let value: Vec<u8> =
                            (0..len).map(|x| b'a' + ((x + t + n) % 26) as u8).collect();
                        c.set(key.as_bytes(), &value, SetOptions::default())
                            .unwrap();
                        let got = c.get(key.as_bytes()).unwrap().expect("own big value");
                        assert!(
                            got.value == value,
                            "{p:?} {t} {n}: another value ({} bytes)",
                            got.value.len()
                        );
                        count += 1;
                        assert_eq!(c.incr(ctr.as_bytes(), 1).unwrap(), Some(count), "{p:?} {t}");
                        assert!(c.touch(key.as_bytes(), 600).unwrap(), "{p:?} {t}");
                    }
                });
            }
        });
    }
}

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
        if self.inner.is_none() || self.polls == 0 {
            self.inner = None; // dropped here, mid-flight
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        let f = self.inner.as_mut().expect("checked");
        match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
}

/// Mixed calls dropped at pseudo-random points (before queueing, queued, on the wire) in
/// chained rounds; every call that completes gets a result of its own: its counter only
/// grows and stays in its range, its key holds one of its values, its missing key stays
/// missing, its non-numeric incr fails.
#[test]
fn mixed_futures_dropped_mid_chain_leave_every_result_its_own() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dropped = rt.block_on(async {
            let tasks: Vec<_> = (0..32usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let o = SetOptions::default;
                        let (k, ctr, gone, word) = (
                            format!("dk:{t}"),
                            format!("dc:{t}"),
                            format!("dg:{t}"),
                            format!("dw:{t}"),
                        );
                        let base = t as u64 * 1_000_000;
                        c.set_async(k.as_bytes(), format!("own-{t}-0").as_bytes(), o())
                            .await
                            .unwrap();
                        c.set_async(ctr.as_bytes(), base.to_string().as_bytes(), o())
                            .await
                            .unwrap();
                        c.set_async(word.as_bytes(), b"abc", o()).await.unwrap();
                        let _ = c.delete_async(gone.as_bytes()).await;
                        let (mut last, mut dropped) = (base, 0usize);
                        for n in 0..300usize {
                            let polls = [0, 1, 2, 3, 5, 8, 20, 100, 1000][(t * 31 + n * 17) % 9];
                            let v = format!("own-{t}-{n}");
                            macro_rules! poll_at_most {
                                ($f:expr) => {
                                    PollAtMost {
                                        inner: Some(Box::pin($f)),
                                        polls,
                                    }
                                    .await
                                };
                            }
                            match n % 6 {
                                0 => {
                                    if let Some(r) =
                                        poll_at_most!(c.set_async(k.as_bytes(), v.as_bytes(), o()))
                                    {
                                        r.unwrap();
                                    } else {
                                        dropped += 1;
                                    }
                                }
                                1 => match poll_at_most!(c.incr_async(ctr.as_bytes(), 1)) {
                                    Some(r) => {
                                        let x = r.unwrap().expect("own counter");
                                        assert!(
                                            x > last && x < base + 1_000_000,
                                            "{p:?} {t}: counter {x} after {last}"
                                        );
                                        last = x;
                                    }
                                    None => dropped += 1,
                                },
                                2 => match poll_at_most!(c.get_async(k.as_bytes())) {
                                    Some(r) => {
                                        let item = r.unwrap().expect("own key");
                                        let s = String::from_utf8_lossy(&item.value).into_owned();
                                        assert!(
                                            s.starts_with(&format!("own-{t}-")),
                                            "{p:?} {t}: got {s}"
                                        );
                                    }
                                    None => dropped += 1,
                                },
                                3 => match poll_at_most!(c.touch_async(k.as_bytes(), 600)) {
                                    Some(r) => assert!(r.unwrap(), "{p:?} {t}: touch"),
                                    None => dropped += 1,
                                },
                                4 => match poll_at_most!(c.delete_async(gone.as_bytes())) {
                                    Some(r) => assert!(!r.unwrap(), "{p:?} {t}: delete gone"),
                                    None => dropped += 1,
                                },
                                _ => match poll_at_most!(c.incr_async(word.as_bytes(), 1)) {
                                    Some(r) => {
                                        let e = r.unwrap_err();
                                        assert_eq!(e.kind(), ErrorKind::Server, "{p:?} {t}: {e}");
                                    }
                                    None => dropped += 1,
                                },
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
        eprintln!("{p:?}: {dropped} calls dropped");
        assert!(dropped > 500, "{p:?}: only {dropped} dropped");
    }
}

/// A server killed and restarted under mixed chained rounds: whatever a call returns is its
/// own (values of its own, counters in its own range); the client serves again after.
#[test]
fn a_restarted_server_under_mixed_rounds_hands_out_nothing_foreign() {
    let mut mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&mc, p, Duration::from_millis(500));
        let stop = AtomicBool::new(false);
        let oks = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..12usize {
                let (c, stop, oks) = (c.clone(), &stop, &oks);
                s.spawn(move || {
                    let (k, ctr) = (format!("r:{t}"), format!("rc:{t}"));
                    let base = t as u64 * 1_000_000;
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let v = format!("own-{t}-{n}");
                        let _ = c.set(k.as_bytes(), v.as_bytes(), SetOptions::default());
                        if let Ok(Some(item)) = c.get(k.as_bytes()) {
                            let s = String::from_utf8_lossy(&item.value).into_owned();
                            assert!(s.starts_with(&format!("own-{t}-")), "{p:?} {t}: {s}");
                            oks.fetch_add(1, Ordering::Relaxed);
                        }
                        match c.incr(ctr.as_bytes(), 1) {
                            Ok(Some(x)) => {
                                assert!(x > base && x < base + 1_000_000, "{p:?} {t}: counter {x}")
                            }
                            Ok(None) => {
                                let _ = c.add(
                                    ctr.as_bytes(),
                                    base.to_string().as_bytes(),
                                    SetOptions::default(),
                                );
                            }
                            Err(_) => {}
                        }
                        let _ = c.touch(k.as_bytes(), 600);
                        let _ = c
                            .delete(format!("rg:{t}").as_bytes())
                            .map(|b| assert!(!b, "{p:?} {t}: a key never set was deleted"));
                    }
                });
            }
            for _ in 0..2 {
                support::wait_for("calls", || oks.load(Ordering::Relaxed) > 300);
                mc.restart();
                oks.store(0, Ordering::Relaxed);
            }
            support::wait_for("calls after the restarts", || {
                oks.load(Ordering::Relaxed) > 300
            });
            stop.store(true, Ordering::Relaxed);
        });
    }
}

/// A server out of memory that never evicts (`-m 2 -M`): sets of 30 KB values fail with
/// `SERVER_ERROR out of memory` once it is full, in chained rounds beside other callers' small
/// sets, incrs and deletes. Nothing is evicted, so every set reported done must be there at
/// the end with its value; every other result is the caller's own.
#[test]
fn sets_refused_for_memory_in_chained_rounds_are_never_reported_stored() {
    let mc = Memcached::with_args(&["-m", "2", "-M"]);
    for p in PROTOCOLS {
        mc.client().flush_all(None).unwrap();
        let c = shared(&mc, p, Duration::from_secs(5));
        let stored = std::sync::Mutex::new(Vec::new());
        let (big_failed, good) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for t in 0..12usize {
                let (c, stored, big_failed, good) = (c.clone(), &stored, &big_failed, &good);
                s.spawn(move || {
                    let o = SetOptions::default;
                    let (k, ctr) = (format!("tl:{t}"), format!("tlc:{t}"));
                    let base = t as u64 * 1_000_000;
                    let mut possible: Vec<String> = Vec::new();
                    let mut counter: Option<u64> = None;
                    for n in 0..150usize {
                        if t < 4 && n % 2 == 0 {
                            let key = format!("big:{p:?}:{t}:{n}");
                            let big = vec![b'a' + (n % 26) as u8; 30_000 + t];
                            match c.set(key.as_bytes(), &big, o()) {
                                Ok(()) => stored.lock().unwrap().push((key, big)),
                                Err(_) => {
                                    big_failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            continue;
                        }
                        let v = format!("own-{t}-{n}");
                        match c.set(k.as_bytes(), v.as_bytes(), o()) {
                            Ok(()) => possible = vec![v.clone()],
                            Err(_) => possible.push(v.clone()),
                        }
                        match c.get(k.as_bytes()) {
                            Ok(Some(item)) => {
                                let got = String::from_utf8_lossy(&item.value).into_owned();
                                assert!(
                                    possible.contains(&got),
                                    "{p:?} {t}: {got} not in {possible:?}"
                                );
                                possible = vec![got];
                                good.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(None) => assert!(
                                possible.len() > 1 || possible.is_empty(),
                                "{p:?} {t}: a set reported done is not there"
                            ),
                            Err(_) => {}
                        }
                        match counter {
                            None => {
                                if c.set(ctr.as_bytes(), base.to_string().as_bytes(), o())
                                    .is_ok()
                                {
                                    counter = Some(base);
                                }
                            }
                            Some(want) => match c.incr(ctr.as_bytes(), 1) {
                                Ok(Some(x)) => {
                                    assert!(
                                        x > want && x < base + 1_000_000,
                                        "{p:?} {t}: {x} after {want}"
                                    );
                                    counter = Some(x);
                                }
                                Ok(None) => panic!("{p:?} {t}: own counter missing"),
                                Err(_) => counter = None,
                            },
                        }
                        if let Ok(b) = c.delete(format!("tlg:{t}").as_bytes()) {
                            assert!(!b, "{p:?} {t}: deleted a key never set");
                        }
                    }
                });
            }
        });
        let stored = stored.into_inner().unwrap();
        eprintln!(
            "{p:?}: {} big sets stored, {} failed, {} good reads",
            stored.len(),
            big_failed.load(Ordering::Relaxed),
            good.load(Ordering::Relaxed)
        );
        assert!(
            big_failed.load(Ordering::Relaxed) > 0,
            "{p:?}: memory never ran out"
        );
        let mut plain = mc.client();
        for (key, value) in &stored {
            let item = plain.get(key.as_bytes()).unwrap();
            assert!(
                item.as_ref().is_some_and(|i| &i.value == value),
                "{p:?}: {key} was reported stored but is {}",
                item.map_or("missing".to_string(), |i| format!(
                    "{} bytes",
                    i.value.len()
                ))
            );
        }
    }
}
