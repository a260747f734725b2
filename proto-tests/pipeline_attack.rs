//! Attacks on the shared client's pipelined rounds (`pipeline_depth`): several rounds written
//! on one connection before their replies are read, against real memcached, a proxy that
//! mangles the replies of pipelined rounds, and servers that freeze, die or close. Every
//! caller checks that every result is its own.

use mcstore_test_support as support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcstore::{ErrorKind, IoMode, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

/// Sets `stop` when dropped (also when the test's driver panics: the workers end).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn build(
    addr: &str,
    p: Protocol,
    depth: usize,
    mode: IoMode,
    timeout: Duration,
    lanes: usize,
) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .server(addr)
        .io_timeout(timeout)
        .connect_timeout(timeout)
        .retry_timeout(Duration::from_millis(50))
        .server_failure_limit(1_000_000)
        .shared()
        .pipeline_depth(depth)
        .io_mode(mode)
        .connections_per_server(lanes)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. Exact results at every depth, threads and both runtimes at once.
// ---------------------------------------------------------------------------------------

/// One blocking caller's exact workload (every outcome known in advance), keys under `tag`.
fn exact_thread(c: &SharedClient, tag: &str, t: usize, rounds: usize) {
    let o = SetOptions::default;
    let k = |name: &str| format!("{tag}:{name}:{t}");
    let (val, ctr, del, here, gone, word) = (k("v"), k("c"), k("d"), k("h"), k("g"), k("w"));
    let base = t as u64 * 1_000_000;
    c.set(ctr.as_bytes(), base.to_string().as_bytes(), o())
        .unwrap();
    c.set(here.as_bytes(), b"here", o()).unwrap();
    c.set(word.as_bytes(), b"abc", o()).unwrap();
    let _ = c.delete(gone.as_bytes()).unwrap();
    let mut counter = base;
    let mut buf = Vec::new();
    for n in 0..rounds {
        let value = format!("value-{t}-{n}-{}", "x".repeat(n % 40));
        match n % 6 {
            0 => {
                c.set(val.as_bytes(), value.as_bytes(), o()).unwrap();
                let got = c.get_into(val.as_bytes(), &mut buf).unwrap();
                assert!(got.is_some(), "{tag} {t}: own set not visible");
                assert_eq!(
                    String::from_utf8_lossy(&buf),
                    value,
                    "{tag} caller {t} got another value"
                );
            }
            1 => {
                let d = (t as u64 % 7) + 1;
                counter += d;
                assert_eq!(
                    c.incr(ctr.as_bytes(), d).unwrap(),
                    Some(counter),
                    "{tag} {t} incr"
                );
                counter -= 1;
                assert_eq!(
                    c.decr(ctr.as_bytes(), 1).unwrap(),
                    Some(counter),
                    "{tag} {t} decr"
                );
            }
            2 => {
                c.set(del.as_bytes(), b"x", o()).unwrap();
                assert!(c.delete(del.as_bytes()).unwrap(), "{tag} {t} delete hit");
                assert!(!c.delete(del.as_bytes()).unwrap(), "{tag} {t} delete miss");
                assert!(c.get(del.as_bytes()).unwrap().is_none(), "{tag} {t}");
            }
            3 => {
                assert!(c.touch(here.as_bytes(), 3600).unwrap(), "{tag} {t} touch");
                assert!(!c.touch(gone.as_bytes(), 3600).unwrap(), "{tag} {t} touch");
            }
            4 => {
                let e = c.incr(word.as_bytes(), 1).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Server, "{tag} {t}: {e}");
                assert_eq!(c.incr(gone.as_bytes(), 1).unwrap(), None, "{tag} {t}");
            }
            _ => {
                // A get-and-touch: a round that cannot be pipelined, after draining.
                let item = c.gat(here.as_bytes(), 3600).unwrap().expect("here");
                assert_eq!(item.value, b"here", "{tag} {t} gat");
                assert!(c.gat(gone.as_bytes(), 3600).unwrap().is_none(), "{tag} {t}");
                let item = c.get(word.as_bytes()).unwrap().expect("word");
                assert_eq!(item.value, b"abc", "{tag} {t} word");
            }
        }
    }
    let item = c.get(ctr.as_bytes()).unwrap().expect("counter");
    assert_eq!(
        item.value,
        counter.to_string().as_bytes(),
        "{tag} {t} final"
    );
}

/// One task's exact workload: several kinds in flight at once from one task.
async fn exact_task(c: SharedClient, tag: String, t: usize, rounds: usize) {
    let o = SetOptions::default;
    let k = |name: &str| format!("{tag}:a{name}:{t}");
    let (val, ctr, here, gone) = (k("v"), k("c"), k("h"), k("g"));
    // Not 0: a decr that runs before its incr would stop at 0.
    let base = (t as u64 + 1) * 1_000_000;
    c.set_async(ctr.as_bytes(), base.to_string().as_bytes(), o())
        .await
        .unwrap();
    c.set_async(here.as_bytes(), b"h", o()).await.unwrap();
    let _ = c.delete_async(gone.as_bytes()).await.unwrap();
    let mut counter = base;
    for n in 0..rounds {
        let v = format!("{t}-{n}");
        let (a, b, d, e, f, g) = tokio::join!(
            c.set_async(val.as_bytes(), v.as_bytes(), o()),
            c.incr_async(ctr.as_bytes(), 2),
            c.touch_async(here.as_bytes(), 3600),
            c.delete_async(gone.as_bytes()),
            c.get_async(here.as_bytes()),
            c.decr_async(ctr.as_bytes(), 1),
        );
        a.unwrap();
        // The incr and the decr may run in either order: both results are known once
        // the pair is done.
        let (x, y) = (b.unwrap().expect("counter"), g.unwrap().expect("counter"));
        counter += 1;
        assert!(
            (x == counter + 1 && y == counter) || (y == counter - 2 && x == counter),
            "{tag} {t}: incr {x}, decr {y}, counter {counter}"
        );
        assert!(d.unwrap(), "{tag} {t} touch");
        assert!(!e.unwrap(), "{tag} {t}: delete of a missing key");
        assert_eq!(f.unwrap().expect("h").value, b"h", "{tag} {t}");
        if n % 5 == 0 {
            let got = c.gat_async(val.as_bytes(), 3600).await.unwrap();
            assert_eq!(got.expect("own").value, v.as_bytes(), "{tag} {t} gat");
        }
        let got = c.get_async(val.as_bytes()).await.unwrap().expect("own");
        assert_eq!(got.value, v.as_bytes(), "{tag} {t} own value");
    }
}

/// Threads, current-thread tasks and multi-thread tasks at once, at depths 1, 2, 4 and 16,
/// every protocol: every result is exactly the caller's own.
#[test]
fn threads_and_tasks_at_every_depth_get_exact_results() {
    let mc = Memcached::start();
    let configs = [
        (1, IoMode::IoThread, 1),
        (2, IoMode::IoThread, 1),
        (4, IoMode::Adaptive, 1),
        (16, IoMode::IoThread, 1),
        (16, IoMode::Adaptive, 2),
    ];
    for p in PROTOCOLS {
        for (depth, mode, lanes) in configs {
            let tag = format!("{p:?}:{depth}:{mode:?}:{lanes}");
            let c = build(&mc.addr(), p, depth, mode, Duration::from_secs(5), lanes);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap();
            let ct = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            std::thread::scope(|s| {
                for t in 0..8 {
                    let (c, tag) = (&c, &tag);
                    s.spawn(move || exact_thread(c, tag, t, 90));
                }
                let (c2, tag2) = (c.clone(), tag.clone());
                s.spawn(move || {
                    ct.block_on(async {
                        let hs: Vec<_> = (0..12)
                            .map(|t| tokio::spawn(exact_task(c2.clone(), tag2.clone(), t, 40)))
                            .collect();
                        for h in hs {
                            h.await.unwrap();
                        }
                    })
                });
                let hs: Vec<_> = (0..12)
                    .map(|t| rt.spawn(exact_task(c.clone(), tag.clone(), 100 + t, 40)))
                    .collect();
                rt.block_on(async {
                    for h in hs {
                        h.await.unwrap();
                    }
                });
            });
            let errors: u64 = c.server_counters().iter().map(|(_, s)| s.errors).sum();
            // The only errors: the incrs of a non-numeric value (8 threads, 15 each).
            assert!(errors <= 8 * 15, "{tag}: {errors} errors");
        }
    }
}

// ---------------------------------------------------------------------------------------
// A proxy in front of a real memcached that mangles the replies of pipelined rounds.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mangle {
    /// Drops one end marker (binary NOOP, meta MN, text END): a part reads the next part's
    /// (or the next round's) replies as its own.
    DropEnd,
    /// Sends one reply twice.
    Duplicate,
    /// Sends one reply after the reply that followed it (across an end marker too).
    Swap,
    /// Holds one reply back until after the next end marker: it arrives in the next part
    /// or round, answering a later round's opaques first.
    Delay,
    /// Closes the connection after a number of reply bytes.
    Close,
}

struct Frame {
    len: usize,
    end: bool,
    hit: bool,
}

/// The next complete reply unit of `buf` in protocol `p`.
fn frame(p: Protocol, buf: &[u8]) -> Option<Frame> {
    if p == Protocol::Binary {
        if buf.len() < 24 {
            return None;
        }
        let body = u32::from_be_bytes(buf[8..12].try_into().unwrap()) as usize;
        if buf.len() < 24 + body {
            return None;
        }
        return Some(Frame {
            len: 24 + body,
            end: buf[1] == 0x0a,
            hit: matches!(buf[1], 0x0d | 0x0c | 0x1d | 0x00 | 0x09),
        });
    }
    let at = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..at]).unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    let size = match (p, words.first()) {
        (Protocol::Meta, Some(&"VA")) => words.get(1).and_then(|w| w.parse::<usize>().ok()),
        (Protocol::Text, Some(&"VALUE")) => words.get(3).and_then(|w| w.parse::<usize>().ok()),
        _ => None,
    };
    let len = match size {
        Some(n) if buf.len() >= at + 2 + n + 2 => at + 2 + n + 2,
        Some(_) => return None,
        None => at + 2,
    };
    Some(Frame {
        len,
        end: matches!(words.first(), Some(&"MN") | Some(&"END")),
        hit: size.is_some(),
    })
}

/// A TCP proxy to `upstream` that mangles each connection's replies once (see [`Mangle`]),
/// at a pseudo-random point, while `on` is set.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    on: Arc<AtomicBool>,
    mangled: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: String, p: Protocol, kinds: Vec<Mangle>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let on = Arc::new(AtomicBool::new(true));
        let mangled = Arc::new(AtomicUsize::new(0));
        let (stop2, on2, mangled2) = (stop.clone(), on.clone(), mangled.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue; // the client sees its connection close
                };
                n += 1;
                let mut rng = support::Rng(0x9e37_79b9_7f4a_7c15 ^ (n * 7919));
                let kind = kinds[rng.below(kinds.len() as u64) as usize];
                let at = 20 + rng.below(300) as usize;
                let close_after = 1 + rng.below(40_000) as usize;
                let on = on2.clone();
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Requests: forwarded as they come.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (c2, s2);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                if to.write_all(&buf[..k]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
                let mangled = mangled2.clone();
                std::thread::spawn(move || {
                    replies(
                        p,
                        server,
                        client,
                        Some((kind, at, close_after)),
                        &on,
                        &mangled,
                    )
                });
            }
        });
        Proxy {
            port,
            stop,
            on,
            mangled,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards `server`'s replies to `client` a frame at a time, mangling once at frame `at`.
fn replies(
    p: Protocol,
    mut server: TcpStream,
    mut client: TcpStream,
    mangle: Option<(Mangle, usize, usize)>,
    on: &AtomicBool,
    mangled: &AtomicUsize,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut frames, mut bytes) = (0usize, 0usize);
    // Mangled again every few hundred frames: a connection whose mangling went unnoticed
    // (a reply set aside as a late one) is mangled again.
    let mut next = mangle.map_or(usize::MAX, |(_, at, _)| at);
    // A held-back frame, and whether it goes out after the next end marker (else after
    // the next frame).
    let mut held: Option<(Vec<u8>, bool)> = None;
    let note = |kind: Mangle, f: &Frame, frames: usize| {
        mangled.fetch_add(1, Ordering::SeqCst);
        eprintln!(
            "proxy {p:?}: {kind:?} at frame {frames} (end marker {}, hit {})",
            f.end, f.hit
        );
    };
    let finish = |server: &TcpStream, client: &TcpStream| {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    };
    loop {
        let k = match server.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        buf.extend_from_slice(&chunk[..k]);
        let mut out = Vec::new();
        while let Some(f) = frame(p, &buf) {
            let bytes_of: Vec<u8> = buf.drain(..f.len).collect();
            frames += 1;
            // Mangled only while on (connections made before it went off too).
            if let Some((kind, _, close_after)) = mangle.filter(|_| on.load(Ordering::SeqCst)) {
                match kind {
                    Mangle::Close if bytes + bytes_of.len() >= close_after => {
                        let cut = close_after - bytes;
                        out.extend_from_slice(&bytes_of[..cut]);
                        let _ = client.write_all(&out);
                        note(kind, &f, frames);
                        return finish(&server, &client);
                    }
                    Mangle::Close => {}
                    _ if frames < next => {}
                    Mangle::DropEnd if f.end => {
                        next = frames + 200;
                        note(kind, &f, frames);
                        continue;
                    }
                    // Text has no opaques: only what a reader can tell (a value twice).
                    Mangle::Duplicate if p != Protocol::Text || f.hit => {
                        next = frames + 200;
                        note(kind, &f, frames);
                        out.extend_from_slice(&bytes_of);
                    }
                    Mangle::Swap | Mangle::Delay if !f.end && held.is_none() => {
                        next = frames + 200;
                        note(kind, &f, frames);
                        held = Some((bytes_of, kind == Mangle::Delay));
                        continue;
                    }
                    _ => {}
                }
            }
            bytes += bytes_of.len();
            out.extend_from_slice(&bytes_of);
            if let Some((h, after_end)) = held.take() {
                if !after_end || f.end {
                    out.extend_from_slice(&h);
                } else {
                    held = Some((h, after_end));
                }
            }
        }
        if client.write_all(&out).is_err() {
            break;
        }
    }
    finish(&server, &client);
}

// ---------------------------------------------------------------------------------------
// A checked caller for faulty servers: whatever it gets must be its own.
// ---------------------------------------------------------------------------------------

/// What a caller under faults saw.
#[derive(Default)]
struct Seen {
    /// Quiet replies may be moved by a hostile proxy past their part's end marker (a quiet
    /// protocol then reads success for a failure, a miss for a hit): what only a reordering
    /// server can cause is tolerated, but never a foreign value or counter.
    lax: AtomicBool,
    oks: AtomicUsize,
    errors: AtomicUsize,
    /// The distinct kinds of the errors seen.
    kinds: Mutex<Vec<ErrorKind>>,
    slowest: Mutex<Duration>,
}

impl Seen {
    fn result(&self, e: Option<&mcstore::Error>) {
        match e {
            None => {
                self.oks.fetch_add(1, Ordering::Relaxed);
            }
            Some(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut k = self.kinds.lock().unwrap();
                if !k.contains(&e.kind()) {
                    k.push(e.kind());
                }
            }
        }
    }

    fn took(&self, d: Duration) {
        let mut s = self.slowest.lock().unwrap();
        if d > *s {
            *s = d;
        }
    }
}

/// One blocking caller's loop until `stop`: a set reported done is read back (unless a later
/// set of the same caller failed, its outcome unknown), a counter only grows within its own
/// range, a key never set stays missing, a word stays a word. Every call returns within
/// `bound`.
fn checked_caller(
    c: &SharedClient,
    tag: &str,
    t: usize,
    stop: &AtomicBool,
    seen: &Seen,
    bound: Duration,
) {
    let o = SetOptions::default;
    let k = |name: &str| format!("{tag}:{name}:{t}");
    let (key, ctr, gone, word) = (k("k"), k("c"), k("g"), k("w"));
    let base = t as u64 * 1_000_000;
    let mut possible: Vec<String> = Vec::new();
    let mut counter: Option<u64> = None;
    let mut word_set = false;
    let mut n = 0usize;
    let timed = |what: &str, start: Instant| {
        let took = start.elapsed();
        seen.took(took);
        assert!(took < bound, "{tag} {t}: {what} took {took:?}");
    };
    let count = |e: Option<&mcstore::Error>| seen.result(e);
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let v = format!("own-{t}-{n}");
        let start = Instant::now();
        let r = c.set(key.as_bytes(), v.as_bytes(), o());
        timed("set", start);
        count(r.as_ref().err());
        match r {
            Ok(()) => possible = vec![v.clone()],
            Err(_) => possible.push(v.clone()),
        }
        let start = Instant::now();
        let r = c.get(key.as_bytes());
        timed("get", start);
        count(r.as_ref().err());
        match r {
            Ok(Some(item)) => {
                let got = String::from_utf8_lossy(&item.value).into_owned();
                assert!(
                    possible.contains(&got),
                    "{tag} {t}: got {got}, possible {possible:?}"
                );
                possible = vec![got];
            }
            Ok(None) => assert!(
                possible.len() > 1 || seen.lax.load(Ordering::Relaxed),
                "{tag} {t}: own key missing after a set reported done ({possible:?})"
            ),
            Err(_) => {}
        }
        let start = Instant::now();
        match counter {
            None => {
                let r = c.set(ctr.as_bytes(), base.to_string().as_bytes(), o());
                timed("set counter", start);
                count(r.as_ref().err());
                if r.is_ok() {
                    counter = Some(base);
                }
            }
            Some(want) => {
                let r = c.incr(ctr.as_bytes(), 1);
                timed("incr", start);
                count(r.as_ref().err());
                match r {
                    Ok(Some(x)) => {
                        assert!(
                            x > want && x < base + 1_000_000,
                            "{tag} {t}: counter {x} after {want}"
                        );
                        counter = Some(x);
                    }
                    Ok(None) if seen.lax.load(Ordering::Relaxed) => counter = None,
                    Ok(None) => panic!("{tag} {t}: own counter missing"),
                    Err(_) => counter = None,
                }
            }
        }
        let start = Instant::now();
        let r = c.delete(gone.as_bytes());
        timed("delete", start);
        count(r.as_ref().err());
        if let Ok(b) = r {
            assert!(
                !b || seen.lax.load(Ordering::Relaxed),
                "{tag} {t}: deleted a key never set"
            );
        }
        let start = Instant::now();
        if !word_set {
            let r = c.set(word.as_bytes(), b"abc", o());
            timed("set word", start);
            word_set = r.is_ok();
        } else {
            let r = c.get(word.as_bytes());
            timed("get word", start);
            count(r.as_ref().err());
            match r {
                Ok(Some(item)) => {
                    assert_eq!(item.value, b"abc", "{tag} {t}: another value for its word")
                }
                Ok(None) => assert!(seen.lax.load(Ordering::Relaxed), "{tag} {t}: word missing"),
                Err(_) => {}
            }
        }
    }
}

/// The async twin of [`checked_caller`], with several calls in flight at once.
async fn checked_task(
    c: SharedClient,
    tag: String,
    t: usize,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    bound: Duration,
) {
    let o = SetOptions::default;
    let k = |name: &str| format!("{tag}:{name}:{t}");
    let (key, ctr, gone) = (k("ak"), k("ac"), k("ag"));
    let base = t as u64 * 1_000_000;
    let mut counter: Option<u64> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let v = format!("own-{t}-{n}");
        let start = Instant::now();
        if counter.is_none() {
            if c.set_async(ctr.as_bytes(), base.to_string().as_bytes(), o())
                .await
                .is_ok()
            {
                counter = Some(base);
            }
            continue;
        }
        let (a, b, d, e) = tokio::join!(
            c.set_async(key.as_bytes(), v.as_bytes(), o()),
            c.incr_async(ctr.as_bytes(), 1),
            c.get_async(key.as_bytes()),
            c.delete_async(gone.as_bytes()),
        );
        let took = start.elapsed();
        seen.took(took);
        assert!(took < bound, "{tag} {t}: a join took {took:?}");
        seen.result(a.as_ref().err());
        seen.result(b.as_ref().err());
        seen.result(d.as_ref().err());
        seen.result(e.as_ref().err());
        match b {
            Ok(Some(x)) => {
                let want = counter.unwrap();
                assert!(
                    x > want && x < base + 1_000_000,
                    "{tag} {t}: counter {x} after {want}"
                );
                counter = Some(x);
            }
            Ok(None) if seen.lax.load(Ordering::Relaxed) => counter = None,
            Ok(None) => panic!("{tag} {t}: own counter missing"),
            Err(_) => counter = None,
        }
        if let Ok(Some(item)) = d {
            let got = String::from_utf8_lossy(&item.value).into_owned();
            assert!(
                got.starts_with(&format!("own-{t}-")),
                "{tag} {t}: got {got}"
            );
        }
        if let Ok(b) = e {
            assert!(
                !b || seen.lax.load(Ordering::Relaxed),
                "{tag} {t}: deleted a key never set"
            );
        }
    }
}

/// Runs `threads` checked callers and `tasks` checked tasks (on a multi-thread runtime)
/// until `driver` returns.
fn under_load(
    c: &SharedClient,
    tag: &str,
    threads: usize,
    tasks: usize,
    bound: Duration,
    seen: &Arc<Seen>,
    driver: impl FnOnce(&Seen),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hs: Vec<_> = (0..tasks)
        .map(|t| {
            rt.spawn(checked_task(
                c.clone(),
                tag.to_string(),
                1000 + t,
                stop.clone(),
                seen.clone(),
                bound,
            ))
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, seen) = (&*stop, &**seen);
            s.spawn(move || checked_caller(c, tag, t, stop, seen, bound));
        }
        let _stop = StopOnDrop(&stop);
        driver(seen);
    });
    rt.block_on(async {
        for h in hs {
            h.await.unwrap();
        }
    });
}

/// Waits until `n` more calls succeeded.
fn more_oks(seen: &Seen, n: usize) {
    let from = seen.oks.load(Ordering::Relaxed);
    support::wait_for("calls succeeding", || {
        seen.oks.load(Ordering::Relaxed) >= from + n
    });
}

/// After the faults: `n` calls in a row succeed, each with the caller's own result.
fn all_good_after(c: &SharedClient, tag: &str, n: usize) {
    let mut buf = Vec::new();
    // The first may find a connection the faults left broken.
    support::wait_for("a call to succeed again", || {
        c.set(b"after", b"x", SetOptions::default()).is_ok()
    });
    for i in 0..n {
        let key = format!("{tag}:after:{}", i % 13);
        let value = format!("after-{i}");
        c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
            .unwrap_or_else(|e| panic!("{tag} {i}: set after the faults: {e}"));
        let got = c.get_into(key.as_bytes(), &mut buf).unwrap();
        assert!(got.is_some(), "{tag} {i}");
        assert_eq!(buf, value.as_bytes(), "{tag} {i}: another value");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Mangled replies.
// ---------------------------------------------------------------------------------------

/// A proxy drops an end marker, duplicates a reply, swaps two, or moves one into the next
/// part or round of a pipelined connection, once per connection: no caller ever gets
/// another caller's value or counter, no set reported done is lost, every call returns
/// within its deadline (plus the drain), and calls work again once the replies are sound.
#[test]
fn mangled_pipelined_replies_never_hand_out_foreign_results() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let kinds = match p {
            Protocol::Text => vec![Mangle::DropEnd, Mangle::Duplicate],
            _ => vec![
                Mangle::DropEnd,
                Mangle::Duplicate,
                Mangle::Swap,
                Mangle::Delay,
            ],
        };
        let proxy = Proxy::start(mc.addr(), p, kinds);
        let timeout = Duration::from_millis(500);
        let c = build(&proxy.addr(), p, 16, IoMode::IoThread, timeout, 1);
        let tag = format!("mangle:{p:?}");
        let seen = Arc::new(Seen::default());
        seen.lax.store(p != Protocol::Text, Ordering::Relaxed);
        under_load(&c, &tag, 6, 24, Duration::from_secs(3), &seen, |seen| {
            support::wait_for("replies mangled", || {
                proxy.mangled.load(Ordering::SeqCst) >= 8
            });
            proxy.on.store(false, Ordering::SeqCst);
            more_oks(seen, 300);
        });
        eprintln!(
            "{p:?}: {} mangled, {} ok, {} failed, slowest {:?}",
            proxy.mangled.load(Ordering::SeqCst),
            seen.oks.load(Ordering::Relaxed),
            seen.errors.load(Ordering::Relaxed),
            seen.slowest.lock().unwrap()
        );
        all_good_after(&c, &tag, 200);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Connections closed mid-pipeline, a server killed.
// ---------------------------------------------------------------------------------------

/// A proxy that closes every connection after a pseudo-random number of reply bytes (mid
/// reply, mid round): every call in flight fails or succeeds within its deadline, the next
/// calls reconnect, and nothing foreign is handed out.
#[test]
fn connections_closed_mid_pipeline_fail_in_time_and_reconnect() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let proxy = Proxy::start(mc.addr(), p, vec![Mangle::Close]);
        let c = build(
            &proxy.addr(),
            p,
            16,
            IoMode::IoThread,
            Duration::from_millis(500),
            1,
        );
        let tag = format!("close:{p:?}");
        let seen = Arc::new(Seen::default());
        under_load(&c, &tag, 6, 24, Duration::from_secs(2), &seen, |seen| {
            let start = Instant::now();
            while proxy.mangled.load(Ordering::SeqCst) < 15 {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{p:?}: {} connections closed, {} ok, {} failed, slowest {:?}",
                    proxy.mangled.load(Ordering::SeqCst),
                    seen.oks.load(Ordering::Relaxed),
                    seen.errors.load(Ordering::Relaxed),
                    seen.slowest.lock().unwrap()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            more_oks(seen, 200);
            proxy.on.store(false, Ordering::SeqCst);
            more_oks(seen, 200);
        });
        assert!(
            seen.errors.load(Ordering::Relaxed) > 0,
            "{p:?}: no failures"
        );
        all_good_after(&c, &tag, 200);
    }
}

/// A server killed under deep pipelines (and restarted): every call returns within its
/// deadline, nothing foreign, and calls succeed again on the restarted server.
#[test]
fn a_server_killed_mid_pipeline_fails_calls_in_time_and_serves_again() {
    let mut mc = Memcached::start();
    for p in PROTOCOLS {
        let c = build(
            &mc.addr(),
            p,
            16,
            IoMode::IoThread,
            Duration::from_millis(500),
            1,
        );
        let tag = format!("kill:{p:?}");
        let seen = Arc::new(Seen::default());
        // A restarted memcached is empty: misses are expected after a restart.
        seen.lax.store(true, Ordering::Relaxed);
        let mc = &mut mc;
        under_load(&c, &tag, 6, 24, Duration::from_secs(2), &seen, |seen| {
            for _ in 0..2 {
                more_oks(seen, 300);
                let failed = seen.errors.load(Ordering::Relaxed);
                mc.kill();
                support::wait_for("calls failing", || {
                    seen.errors.load(Ordering::Relaxed) > failed + 10
                });
                mc.restart();
            }
            more_oks(seen, 300);
        });
        all_good_after(&c, &tag, 200);
    }
}

// ---------------------------------------------------------------------------------------
// 4. SIGSTOP / SIGCONT.
// ---------------------------------------------------------------------------------------

/// Freezes and resumes of a real memcached under deep pipelines: every call returns within
/// its deadline, an Ok is the caller's own (a set reported done is read back), and calls
/// succeed after each resume.
#[test]
fn frozen_server_under_deep_pipelines_bounds_calls_and_stays_exact() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = build(
            &mc.addr(),
            p,
            16,
            IoMode::IoThread,
            Duration::from_millis(400),
            1,
        );
        let tag = format!("freeze:{p:?}");
        let seen = Arc::new(Seen::default());
        under_load(&c, &tag, 6, 24, Duration::from_secs(2), &seen, |seen| {
            for _ in 0..3 {
                more_oks(seen, 300);
                let failed = seen.errors.load(Ordering::Relaxed);
                mc.freeze();
                support::wait_for("calls timing out", || {
                    seen.errors.load(Ordering::Relaxed) > failed + 10
                });
                mc.resume();
            }
            more_oks(seen, 300);
        });
        // A frozen server's calls time out; the rounds behind fail with the same error.
        let kinds = seen.kinds.lock().unwrap().clone();
        assert_eq!(
            kinds,
            [ErrorKind::Timeout],
            "{p:?}: error kinds under freezes"
        );
        all_good_after(&c, &tag, 200);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Futures dropped mid-pipeline.
// ---------------------------------------------------------------------------------------

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

/// 256 tasks drop their calls at pseudo-random points (before queueing, queued, written,
/// half read) on a depth-16 connection with only 64 request slots: every call that completes
/// is its own, and afterwards 1,000 calls all succeed with their own results (no slot
/// leaked, no round left unread).
#[test]
fn futures_dropped_in_deep_pipelines_leak_nothing() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_secs(5))
            .shared()
            .pipeline_depth(16)
            .max_in_flight(64)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let dropped = rt.block_on(async {
            let tasks: Vec<_> = (0..256usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let o = SetOptions::default;
                        let (k, ctr, gone) = (
                            format!("fd:{p:?}:k:{t}"),
                            format!("fd:{p:?}:c:{t}"),
                            format!("fd:{p:?}:g:{t}"),
                        );
                        let base = t as u64 * 1_000_000;
                        c.set_async(k.as_bytes(), format!("own-{t}-0").as_bytes(), o())
                            .await
                            .unwrap();
                        c.set_async(ctr.as_bytes(), base.to_string().as_bytes(), o())
                            .await
                            .unwrap();
                        let (mut last, mut dropped) = (base, 0usize);
                        for n in 0..40usize {
                            let polls = [0, 1, 2, 3, 4, 6, 9, 30, 1000][(t * 31 + n * 17) % 9];
                            let v = format!("own-{t}-{n}");
                            macro_rules! at_most {
                                ($f:expr) => {
                                    PollAtMost {
                                        inner: Some(Box::pin($f)),
                                        polls,
                                    }
                                    .await
                                };
                            }
                            match n % 5 {
                                0 => match at_most!(c.set_async(k.as_bytes(), v.as_bytes(), o())) {
                                    Some(r) => r.unwrap(),
                                    None => dropped += 1,
                                },
                                1 => match at_most!(c.incr_async(ctr.as_bytes(), 1)) {
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
                                2 => match at_most!(c.get_async(k.as_bytes())) {
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
                                3 => match at_most!(c.touch_async(k.as_bytes(), 600)) {
                                    Some(r) => assert!(r.unwrap(), "{p:?} {t}: touch"),
                                    None => dropped += 1,
                                },
                                _ => match at_most!(c.delete_async(gone.as_bytes())) {
                                    Some(r) => assert!(!r.unwrap(), "{p:?} {t}: delete gone"),
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
        assert!(dropped > 1000, "{p:?}: only {dropped} dropped");
        // 1,000 calls, 64 at a time, all their own.
        rt.block_on(async {
            let tasks: Vec<_> = (0..64usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        for n in 0..8usize {
                            let k = format!("fd:{p:?}:after:{t}");
                            let v = format!("after-{t}-{n}");
                            c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
                                .await
                                .unwrap_or_else(|e| panic!("{p:?} {t}: {e}"));
                            let got = c.get_async(k.as_bytes()).await.unwrap();
                            assert_eq!(got.expect("own").value, v.as_bytes(), "{p:?} {t}");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let start = Instant::now();
        for n in 0..100 {
            let k = format!("fd:{p:?}:seq");
            c.set(
                k.as_bytes(),
                n.to_string().as_bytes(),
                SetOptions::default(),
            )
            .unwrap();
            assert_eq!(
                c.get(k.as_bytes()).unwrap().expect("own").value,
                n.to_string().as_bytes()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{p:?}: slow calls"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Sets refused for memory in pipelined rounds.
// ---------------------------------------------------------------------------------------

/// A server out of memory that never evicts (`-m 2 -M`): 30 KB sets fail with
/// `SERVER_ERROR out of memory` in pipelined rounds (depth 16) beside small calls. Nothing is
/// evicted, so every set reported done must be there at the end; every other result is the
/// caller's own.
#[test]
fn sets_refused_for_memory_in_pipelined_rounds_are_never_reported_stored() {
    let mc = Memcached::with_args(&["-m", "2", "-M"]);
    for p in PROTOCOLS {
        mc.client().flush_all(None).unwrap();
        let c = build(
            &mc.addr(),
            p,
            16,
            IoMode::IoThread,
            Duration::from_secs(5),
            1,
        );
        let stored = Mutex::new(Vec::new());
        let (big_failed, good) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        // Tasks storing big values, many at once: deep pipelines of refusals.
        let big_tasks: Vec<_> = (0..16usize)
            .map(|t| {
                let c = c.clone();
                rt.spawn(async move {
                    let mut stored = Vec::new();
                    let mut failed = 0;
                    for n in 0..30usize {
                        let key = format!("bigt:{p:?}:{t}:{n}");
                        let big = vec![b'a' + ((t + n) % 26) as u8; 30_000 + t];
                        match c
                            .set_async(key.as_bytes(), &big, SetOptions::default())
                            .await
                        {
                            Ok(()) => stored.push((key, big)),
                            Err(e) => {
                                // Binary refusals name their request; text and meta error
                                // lines close the connection, failing the rounds behind.
                                if p == Protocol::Binary || e.kind() != ErrorKind::Io {
                                    assert_eq!(e.kind(), ErrorKind::Server, "{p:?} {t}: {e}");
                                }
                                failed += 1;
                            }
                        }
                    }
                    (stored, failed)
                })
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..10usize {
                let (c, stored, big_failed, good) = (&c, &stored, &big_failed, &good);
                s.spawn(move || {
                    let o = SetOptions::default;
                    let (k, ctr) = (format!("tl:{p:?}:{t}"), format!("tlc:{p:?}:{t}"));
                    let base = t as u64 * 1_000_000;
                    let mut possible: Vec<String> = Vec::new();
                    let mut counter: Option<u64> = None;
                    for n in 0..120usize {
                        if t < 3 && n % 2 == 0 {
                            let key = format!("big:{p:?}:{t}:{n}");
                            let big = vec![b'a' + (n % 26) as u8; 30_000 + t];
                            match c.set(key.as_bytes(), &big, o()) {
                                Ok(()) => stored.lock().unwrap().push((key, big)),
                                Err(e) => {
                                    if p == Protocol::Binary {
                                        assert_eq!(e.kind(), ErrorKind::Server, "{p:?} {t}: {e}");
                                    }
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
                        if let Ok(b) = c.delete(format!("tlg:{p:?}:{t}").as_bytes()) {
                            assert!(!b, "{p:?} {t}: deleted a key never set");
                        }
                    }
                });
            }
        });
        let mut stored = stored.into_inner().unwrap();
        let mut failed = big_failed.load(Ordering::Relaxed);
        rt.block_on(async {
            for h in big_tasks {
                let (s, f) = h.await.unwrap();
                stored.extend(s);
                failed += f;
            }
        });
        eprintln!(
            "{p:?}: {} big sets stored, {failed} failed, {} good reads",
            stored.len(),
            good.load(Ordering::Relaxed)
        );
        assert!(failed > 0, "{p:?}: memory never ran out");
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

// ---------------------------------------------------------------------------------------
// 7. Big replies behind big requests.
// ---------------------------------------------------------------------------------------

/// Rounds of gets whose replies are megabytes, with rounds of stores near the batch cap
/// written behind them before those replies are read (depth 16): the server stops reading
/// while its replies are not read, so a round written behind them must not wait for its
/// write to finish before reading (else every call times out on a healthy server).
#[test]
fn big_replies_with_big_rounds_behind_them_do_not_stall() {
    let mc = Memcached::start();
    let big = vec![b'b'; 900 * 1024];
    {
        let mut plain = mc.client();
        for n in 0..32 {
            plain
                .set(format!("huge:{n}").as_bytes(), &big, SetOptions::default())
                .unwrap();
        }
    }
    for p in [Protocol::Binary, Protocol::Meta, Protocol::Text] {
        let c = build(
            &mc.addr(),
            p,
            16,
            IoMode::IoThread,
            Duration::from_secs(3),
            1,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let timeouts = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let mut hs = Vec::new();
            for t in 0..32usize {
                let (c, big, timeouts) = (c.clone(), big.clone(), timeouts.clone());
                hs.push(tokio::spawn(async move {
                    for n in 0..4usize {
                        match c
                            .get_async(format!("huge:{}", (t + n) % 32).as_bytes())
                            .await
                        {
                            Ok(item) => assert!(item.expect("huge").value == big, "{p:?} {t}"),
                            Err(e) => {
                                assert_eq!(e.kind(), ErrorKind::Timeout, "{p:?} {t}: {e}");
                                timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for t in 0..32usize {
                let (c, timeouts) = (c.clone(), timeouts.clone());
                hs.push(tokio::spawn(async move {
                    let v = vec![b'0' + (t % 10) as u8; 250 * 1024];
                    for n in 0..4usize {
                        let k = format!("wide:{p:?}:{t}:{n}");
                        match c.set_async(k.as_bytes(), &v, SetOptions::default()).await {
                            Ok(()) => {}
                            Err(e) => {
                                assert_eq!(e.kind(), ErrorKind::Timeout, "{p:?} {t}: {e}");
                                timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
        });
        assert_eq!(
            timeouts.load(Ordering::Relaxed),
            0,
            "{p:?}: calls timed out on a healthy server"
        );
    }
}

/// One caller's 30 KB sets refused for memory (`-m 2 -M`, full) while other callers make
/// small calls that cannot fail on a healthy server (deletes of missing keys, gets of a key
/// that is there), all pipelined through the I/O thread. Binary names the refused item (an
/// opaque): the refusal is the refused call's alone, and nothing else fails. Text and meta
/// send an error line that names no request: the connection is closed, and the calls read
/// after it in its round and in the rounds behind fail as unread ("may or may not have
/// run"); never with the other call's refusal, never with a wrong value.
#[test]
fn a_refused_set_fails_only_its_own_call_or_unread_ones_in_pipelined_rounds() {
    let mc = Memcached::with_args(&["-m", "2", "-M"]);
    {
        let mut plain = mc.client();
        plain
            .set(b"small-here", b"here", SetOptions::default())
            .unwrap();
        // Fill the memory with big values until a set is refused.
        let big = vec![b'f'; 30_000];
        let mut n = 0;
        while plain
            .set(format!("fill:{n}").as_bytes(), &big, SetOptions::default())
            .is_ok()
        {
            n += 1;
            assert!(n < 1000, "memory never ran out");
        }
    }
    let mut bad = Vec::new();
    for (p, depth) in [
        (Protocol::Text, 1),
        (Protocol::Text, 16),
        (Protocol::Meta, 1),
        (Protocol::Meta, 16),
        (Protocol::Binary, 16),
    ] {
        let c = build(
            &mc.addr(),
            p,
            depth,
            IoMode::IoThread,
            Duration::from_secs(5),
            1,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (refused, others_failed) = rt.block_on(async {
            let mut big = Vec::new();
            for t in 0..4usize {
                let c = c.clone();
                big.push(tokio::spawn(async move {
                    let v = vec![b'x'; 30_000];
                    let mut refused = 0;
                    for n in 0..40 {
                        let k = format!("refused:{p:?}:{t}:{n}");
                        if c.set_async(k.as_bytes(), &v, SetOptions::default())
                            .await
                            .is_err()
                        {
                            refused += 1;
                        }
                    }
                    refused
                }));
            }
            let mut small = Vec::new();
            for t in 0..32usize {
                let c = c.clone();
                small.push(tokio::spawn(async move {
                    let mut failed = Vec::new();
                    for _ in 0..40 {
                        let gone = format!("never:{p:?}:{t}");
                        let (d, g) = tokio::join!(
                            c.delete_async(gone.as_bytes()),
                            c.get_async(b"small-here")
                        );
                        match d {
                            Ok(b) => assert!(!b, "{p:?} {t}: deleted a key never set"),
                            Err(e) => failed.push(format!("delete: {e}")),
                        }
                        match g {
                            Ok(item) => assert_eq!(item.expect("here").value, b"here"),
                            Err(e) => failed.push(format!("get: {e}")),
                        }
                    }
                    failed
                }));
            }
            let mut refused = 0;
            for h in big {
                refused += h.await.unwrap();
            }
            let mut failed = Vec::new();
            for h in small {
                failed.extend(h.await.unwrap());
            }
            (refused, failed)
        });
        eprintln!(
            "{p:?} depth {depth}: {refused} sets refused, {} other calls failed, e.g. {:?}",
            others_failed.len(),
            others_failed.first()
        );
        assert!(refused > 0, "{p:?}: no set refused");
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for f in &others_failed {
            let what = f.split(" talking to").next().unwrap_or(f).to_string();
            match kinds.iter_mut().find(|(k, _)| *k == what) {
                Some((_, n)) => *n += 1,
                None => kinds.push((what, 1)),
            }
        }
        eprintln!("{p:?} depth {depth}: {kinds:?}");
        let foreign: Vec<&String> = (others_failed.iter())
            .filter(|f| p == Protocol::Binary || !f.contains("may or may not have run"))
            .collect();
        if !foreign.is_empty() {
            bad.push(format!(
                "{p:?} depth {depth}: {} of 2560 calls of other callers failed beside {refused} \
                 refused sets, not as unread calls, e.g. {:?}",
                foreign.len(),
                foreign.first()
            ));
        }
        if others_failed.len() == 2560 {
            bad.push(format!("{p:?} depth {depth}: every other call failed"));
        }
    }
    assert!(bad.is_empty(), "calls failed on a healthy server: {bad:#?}");
}

/// Sixteen request slots, depth 16, 64 tasks (and their futures dropped at their deadline
/// by a short `tokio::time::timeout`) while the server is frozen, resumed, and killed
/// mid-pipeline: no slot leaks, so afterwards every one of 2,000 calls succeeds promptly.
#[test]
fn frozen_and_killed_pipelines_leak_no_request_slot() {
    let mut mc = Memcached::start();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(300))
            .retry_timeout(Duration::from_millis(20))
            .server_failure_limit(1_000_000)
            .shared()
            .pipeline_depth(16)
            .max_in_flight(16)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let oks = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..64usize)
            .map(|t| {
                let (c, stop, oks) = (c.clone(), stop.clone(), oks.clone());
                rt.spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let k = format!("slot:{p:?}:{t}");
                        let v = format!("own-{t}-{n}");
                        // Some futures are dropped before their call ends.
                        let limit = Duration::from_millis(if t % 3 == 0 { 50 } else { 1000 });
                        let set = c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default());
                        let _ = tokio::time::timeout(limit, set).await;
                        if let Ok(Ok(Some(item))) =
                            tokio::time::timeout(limit, c.get_async(k.as_bytes())).await
                        {
                            let got = String::from_utf8_lossy(&item.value).into_owned();
                            assert!(got.starts_with(&format!("own-{t}-")), "{p:?} {t}: {got}");
                            oks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        {
            let _stop = StopOnDrop(&stop);
            let more = |n: usize| {
                let from = oks.load(Ordering::Relaxed);
                support::wait_for("calls", || oks.load(Ordering::Relaxed) >= from + n);
            };
            more(300);
            mc.freeze();
            std::thread::sleep(Duration::from_millis(700));
            mc.resume();
            more(300);
            mc.kill();
            std::thread::sleep(Duration::from_millis(300));
            mc.restart();
            more(300);
        }
        rt.block_on(async {
            for h in hs {
                h.await.unwrap();
            }
        });
        // Every slot is free again: 2,000 calls from 32 tasks all succeed.
        let start = Instant::now();
        rt.block_on(async {
            let hs: Vec<_> = (0..32usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        for n in 0..(2000 / 32 / 2) {
                            let k = format!("slot-after:{p:?}:{t}");
                            let v = format!("{t}-{n}");
                            c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
                                .await
                                .unwrap_or_else(|e| panic!("{p:?} {t} {n}: {e}"));
                            let got = c.get_async(k.as_bytes()).await;
                            let got = got.unwrap_or_else(|e| panic!("{p:?} {t} {n}: {e}"));
                            assert_eq!(got.expect("own").value, v.as_bytes(), "{p:?} {t}");
                        }
                    })
                })
                .collect();
            for h in hs {
                h.await.unwrap();
            }
        });
        assert!(start.elapsed() < Duration::from_secs(10), "{p:?}: slow");
    }
}

// ---------------------------------------------------------------------------------------
// 9. Direct calls: a lone async caller writes its request from its future's `poll`, and
//    leaves the lane with the reply unread for the I/O thread to read.
// ---------------------------------------------------------------------------------------

/// Polls `f` once (a direct call writes its request on its first poll), then drops it.
async fn poll_once_and_drop<F: std::future::Future>(f: F) {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        let _ = f.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

/// A lone async caller's calls go direct, while blocking callers that find a direct call's
/// reply unread on the lane read it first (for its owner) and then make their own: every
/// result is exactly its caller's, on every protocol and with two connections.
#[test]
fn direct_calls_and_blocking_callers_on_one_lane_get_exact_results() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        for lanes in [1, 2] {
            let tag = format!("direct:{p:?}:{lanes}");
            let c = build(
                &mc.addr(),
                p,
                4,
                IoMode::Adaptive,
                Duration::from_secs(5),
                lanes,
            );
            let ct = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            // Alone first: after a warm-up (the I/O thread starts, then watches the
            // connection), a lone task's calls go direct.
            ct.block_on(exact_task(c.clone(), tag.clone(), 0, 60));
            // Its joined calls are concurrent (queued, in rounds); the get after each join
            // is a lone call.
            let alone = c.direct_calls();
            assert!(alone >= 40, "{tag}: {alone} direct calls of a lone task");
            // Then beside blocking callers (made directly on the lane when it is free).
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (c, tag) = (&c, &tag);
                    s.spawn(move || exact_thread(c, tag, t, 120));
                }
                let (c2, tag2) = (c.clone(), tag.clone());
                s.spawn(move || ct.block_on(exact_task(c2, tag2, 1, 120)));
            });
            // Lone again: direct again.
            let before = c.direct_calls();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut buf = Vec::new();
                for n in 0..200 {
                    let (k, v) = (format!("{tag}:lone:{n}"), format!("v{n}"));
                    c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
                        .await
                        .unwrap();
                    assert!(c
                        .get_into_async(k.as_bytes(), &mut buf)
                        .await
                        .unwrap()
                        .is_some());
                    assert_eq!(buf, v.as_bytes(), "{tag}: another value");
                }
            });
            let after = c.direct_calls();
            assert!(
                after >= before + 300,
                "{tag}: {before} -> {after} direct calls"
            );
        }
    }
}

/// A frozen server: a direct call fails with a timeout by its deadline (the I/O thread,
/// waiting on the socket, wakes for it), and once the server resumes calls are exact again.
/// Then the server is killed and restarted under a lone caller.
#[test]
fn direct_calls_to_a_frozen_or_killed_server_are_bounded_and_recover() {
    for p in PROTOCOLS {
        let mut mc = Memcached::start();
        let timeout = Duration::from_millis(300);
        let c = build(&mc.addr(), p, 4, IoMode::Adaptive, timeout, 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let o = SetOptions::default;
            for n in 0..50 {
                let k = format!("fz:{p:?}:{n}");
                c.set_async(k.as_bytes(), b"v", o()).await.unwrap();
            }
            assert!(c.direct_calls() > 20, "{p:?}: no direct call");
            mc.freeze();
            let before = c.direct_calls();
            for n in 0..3 {
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.get_async(format!("fz:{p:?}:{n}").as_bytes()),
                )
                .await
                .expect("a call to a frozen server must end by its deadline");
                let e = r.expect_err("a frozen server answered");
                assert_eq!(e.kind(), ErrorKind::Timeout, "{p:?}: {e}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{p:?}: unbounded"
                );
            }
            assert!(
                c.direct_calls() > before,
                "{p:?}: the frozen calls were not direct"
            );
            mc.resume();
            all_good_after_async(&c, &format!("fz:{p:?}:after")).await;
            mc.kill();
            for n in 0..5 {
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.get_async(format!("fz:{p:?}:{n}").as_bytes()),
                )
                .await
                .expect("a call to a killed server must end in time");
                assert!(r.is_err(), "{p:?}: a killed server answered");
            }
            mc.restart();
        });
        // After the restart, the same client serves exactly again (lone and direct).
        let before = c.direct_calls();
        rt.block_on(all_good_after_async(&c, &format!("fz:{p:?}:restarted")));
        assert!(
            c.direct_calls() > before,
            "{p:?}: no direct call after the restart"
        );
    }
}

/// 200 calls whose futures are dropped right after their first poll (their request is
/// written, the reply unread), each followed by a call of its own that must read its own
/// reply (not the dropped call's); then every call is exact and no request slot leaked (with
/// four slots, a leak would soon time out every call).
#[test]
fn direct_calls_dropped_after_their_first_poll_leak_nothing() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = support::client_builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_secs(5))
            .shared()
            .max_in_flight(4)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            all_good_after_async(&c, &format!("dd:{p:?}:warm")).await;
            let before = c.direct_calls();
            for n in 0..200 {
                let k = format!("dd:{p:?}:{n}");
                if n % 2 == 0 {
                    poll_once_and_drop(c.set_async(
                        k.as_bytes(),
                        b"dropped",
                        SetOptions::default(),
                    ))
                    .await;
                } else {
                    poll_once_and_drop(c.get_async(k.as_bytes())).await;
                }
                // A call of its own behind it: queued (the dropped call's reply is unread
                // on the lane), so the lane is free again for the next dropped call.
                let warm = format!("dd:{p:?}:warm:{n}");
                let got = c.get_async(warm.as_bytes()).await.unwrap();
                let want = format!("dd:{p:?}:warm-value-{n}");
                assert_eq!(got.expect("a warm key").value, want.as_bytes(), "{p:?}");
            }
            assert!(
                c.direct_calls() >= before + 100,
                "{p:?}: dropped calls not direct"
            );
            all_good_after_async(&c, &format!("dd:{p:?}:after")).await;
        });
    }
}

/// 500 exact set-and-get pairs from one task, each value its own.
async fn all_good_after_async(c: &SharedClient, tag: &str) {
    let mut buf = Vec::new();
    for n in 0..500 {
        let (k, v) = (format!("{tag}:{n}"), format!("{tag}-value-{n}"));
        c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{tag}: set {n}: {e}"));
        let got = c.get_into_async(k.as_bytes(), &mut buf).await;
        assert!(got.unwrap().is_some(), "{tag}: {k} missing");
        assert_eq!(buf, v.as_bytes(), "{tag}: another value");
    }
}
