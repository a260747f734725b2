//! Attacks on direct calls (a lone async caller writes its request from its future's
//! `poll` and leaves the reply unread for the lane's I/O thread): against real memcached,
//! beside blocking callers, lent clients, list changes, frozen and killed servers, and
//! futures dropped early. Every caller checks that every result is its own, and that every
//! call ends by its deadline.

use mcstore_test_support as support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::{ErrorKind, IoMode, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

fn builder(addr: &str, p: Protocol, timeout: Duration) -> mcstore::SharedClientBuilder {
    support::client_builder()
        .protocol(p)
        .server(addr)
        .io_timeout(timeout)
        .connect_timeout(timeout)
        .retry_timeout(Duration::from_millis(50))
        .server_failure_limit(1_000_000)
        .shared()
        .io_mode(IoMode::Adaptive)
}

/// Sets its flag when dropped (also when the test's driver panics: the workers end).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn multi_rt(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .unwrap()
}

/// Lone set-and-get pairs until direct calls are made (the I/O thread started and watches
/// the connection).
async fn warm_until_direct(c: &SharedClient, tag: &str) {
    let before = c.direct_calls();
    let start = Instant::now();
    let mut n = 0u64;
    while c.direct_calls() < before + 10 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{tag}: lone calls never went direct"
        );
        let (k, v) = (format!("{tag}:warm:{n}"), format!("{tag}:warm-value:{n}"));
        c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{tag}: warm set: {e}"));
        let got = c.get_async(k.as_bytes()).await.unwrap();
        assert_eq!(got.expect("warm key").value, v.as_bytes(), "{tag}");
        n += 1;
    }
}

/// After a fault: every call exact again (set-and-gets, then a strict model's steps), and
/// no slot leaked (the clients here have four).
async fn exact_again(c: &SharedClient, tag: &str) {
    exact_async(c, &format!("{tag}:after"), 100).await;
    let mut m = Model::new(&format!("{tag}:strict"), 5);
    for _ in 0..200 {
        step_async(c, &mut m).await;
    }
}

/// `n` exact set-and-get pairs from one task, each value its own.
async fn exact_async(c: &SharedClient, tag: &str, n: usize) {
    let mut buf = Vec::new();
    for i in 0..n {
        let (k, v) = (format!("{tag}:{i}"), format!("{tag}-value-{i}"));
        c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{tag}: set {i}: {e}"));
        let got = c.get_into_async(k.as_bytes(), &mut buf).await;
        assert!(got.unwrap().is_some(), "{tag}: {k} missing");
        assert_eq!(buf, v.as_bytes(), "{tag}: another value");
    }
}

// ---------------------------------------------------------------------------------------
// 1. A direct call to a frozen server while other callers wait for a slot.
// ---------------------------------------------------------------------------------------

/// One slot (`max_in_flight(1)`): a lone caller's direct call to a frozen server holds it.
/// Another task keeps trying calls of its own with short `tokio::time::timeout`s: each
/// finds no free slot and kicks the I/O thread (`kick_io` -> `wake_idle`), whose idle poll
/// then found the queue empty and polled again for a whole timeout (the bug this found: the
/// direct call hung as long as the kicks came). The direct call must fail by its deadline.
#[test]
fn a_frozen_direct_call_ends_by_its_deadline_while_others_wait_for_a_slot() {
    let mc = Memcached::start();
    let timeout = Duration::from_millis(400);
    let c = builder(&mc.addr(), Protocol::Text, timeout)
        .max_in_flight(1)
        .build()
        .unwrap();
    let rt = multi_rt(2);
    rt.block_on(warm_until_direct(&c, "slotwait"));
    mc.freeze();
    let before = c.direct_calls();
    let done = Arc::new(AtomicBool::new(false));
    let a = {
        let (c, done) = (c.clone(), Arc::clone(&done));
        rt.spawn(async move {
            let started = Instant::now();
            let r = c.get_async(b"slotwait:lone").await;
            done.store(true, Ordering::SeqCst);
            (r.map(|v| v.is_some()), started.elapsed())
        })
    };
    support::wait_for("the lone call to go direct", || c.direct_calls() > before);
    // The other task: fresh calls, each given 20 ms, until the direct call ended (or 10 s).
    let b = {
        let (c, done) = (c.clone(), Arc::clone(&done));
        rt.spawn(async move {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
                let _ =
                    tokio::time::timeout(Duration::from_millis(20), c.get_async(b"slotwait:other"))
                        .await;
            }
        })
    };
    let (r, took) = rt.block_on(a).unwrap();
    rt.block_on(b).unwrap();
    mc.resume();
    let e = r.expect_err("a frozen server answered");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        took < timeout + Duration::from_secs(4),
        "a direct call with a {timeout:?} timeout took {took:?}"
    );
    rt.block_on(exact_async(&c, "slotwait:after", 100));
}

// ---------------------------------------------------------------------------------------
// A checked caller: each caller owns its keys and a model of them; every result must be
// what its own calls made. Under faults a failed call makes its key unknown: then a read
// must still be one of the caller's own values for that key (or a miss).
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Set(usize, Vec<u8>),
    Get(usize),
    Add(usize, Vec<u8>),
    Delete(usize),
    Incr(u64),
    Append(usize, Vec<u8>),
    /// A `gets`, then a `cas` with the unique it returned.
    GetsCas(usize, Vec<u8>),
}

#[derive(Debug)]
enum Out {
    Unit,
    Item(Option<(Vec<u8>, u32)>),
    Bool(bool),
    Num(Option<u64>),
    /// The `gets`' item, then the `cas`' result (if it was made).
    GetsCas(Option<Vec<u8>>, Option<mcstore::CasResult>),
}

/// Key 0 is a counter (a number, or unknown); keys 1.. hold the caller's values.
const KEYS: usize = 4;

struct Model {
    tag: String,
    rng: support::Rng,
    seq: u64,
    /// Each key's value (`None`: absent), or unknown after a failed call.
    vals: Vec<Result<Option<Vec<u8>>, ()>>,
    counter: Result<u64, ()>,
    /// Every value the caller ever wrote, per key (what an unknown key may hold).
    history: Vec<std::collections::HashSet<Vec<u8>>>,
    oks: u64,
    errors: u64,
    /// Under faults: a call that failed may still run later (on a server that resumes,
    /// after the calls made on the next connection), so only what a read may be is
    /// checked: a value of this caller's for that key (or a miss), with its own flags.
    loose: bool,
}

impl Model {
    fn new(tag: &str, seed: u64) -> Model {
        Model {
            tag: tag.to_string(),
            rng: support::Rng(seed | 1),
            seq: 0,
            // Unknown at first: the first op on each key sets it.
            vals: vec![Err(()); KEYS],
            counter: Err(()),
            history: vec![Default::default(); KEYS],
            oks: 0,
            errors: 0,
            loose: false,
        }
    }

    fn key(&self, k: usize) -> String {
        format!("{}:k{k}", self.tag)
    }

    fn fresh(&mut self, k: usize) -> Vec<u8> {
        self.seq += 1;
        let v = format!("{}:k{k}:v{}", self.tag, self.seq).into_bytes();
        self.history[k].insert(v.clone());
        v
    }

    /// The next op: a set on an unknown key (to know it again), else a random one.
    fn next_op(&mut self) -> Op {
        let k = 1 + self.rng.below(KEYS as u64 - 1) as usize;
        if self.rng.below(8) == 0 {
            return match self.counter {
                Err(()) if !self.loose => Op::Set(0, b"0".to_vec()),
                _ => Op::Incr(1 + self.rng.below(5)),
            };
        }
        if self.vals[k].is_err() && !self.loose {
            let v = self.fresh(k);
            return Op::Set(k, v);
        }
        match self.rng.below(7) {
            0 => {
                let v = self.fresh(k);
                Op::Set(k, v)
            }
            1 | 2 => Op::Get(k),
            3 => Op::Add(k, self.fresh(k)),
            4 => Op::Delete(k),
            5 => {
                self.seq += 1;
                Op::Append(k, format!("+{}", self.seq).into_bytes())
            }
            _ => Op::GetsCas(k, self.fresh(k)),
        }
    }

    /// Checks `out` against the model and updates it; `Err` results make the key unknown.
    fn check(&mut self, op: &Op, out: Option<Out>) {
        let tag = self.tag.clone();
        let out = match out {
            Some(o) => o,
            None => {
                self.errors += 1;
                match op {
                    Op::Incr(_) => self.counter = Err(()),
                    Op::Set(0, ..) => self.counter = Err(()),
                    Op::Set(k, ..)
                    | Op::Get(k)
                    | Op::Add(k, _)
                    | Op::Delete(k)
                    | Op::Append(k, _)
                    | Op::GetsCas(k, _) => self.vals[*k] = Err(()),
                }
                return;
            }
        };
        self.oks += 1;
        if let Out::Item(Some((v, f))) = &out {
            assert_eq!(*f, flags_of(v), "{tag}: a value with another value's flags");
        }
        if self.loose {
            return self.check_loose(op, out);
        }
        match (op, out) {
            (Op::Set(0, ..), Out::Unit) => self.counter = Ok(0),
            (Op::Set(k, v), Out::Unit) => self.vals[*k] = Ok(Some(v.clone())),
            (Op::Get(k), Out::Item(got)) => {
                match &self.vals[*k] {
                    Ok(want) => assert_eq!(
                        got.as_ref().map(|(v, _)| v),
                        want.as_ref(),
                        "{tag}: get of k{k}: another caller's reply?"
                    ),
                    Err(()) => {
                        if let Some((v, _)) = &got {
                            assert!(
                                self.history[*k].iter().any(|h| v.starts_with(h)),
                                "{tag}: get of unknown k{k} gave a value never written: {:?}",
                                String::from_utf8_lossy(v)
                            );
                        }
                    }
                }
                self.vals[*k] = Ok(got.map(|(v, _)| v));
            }
            (Op::Add(k, v), Out::Bool(stored)) => {
                let want = matches!(self.vals[*k], Ok(None));
                assert_eq!(stored, want, "{tag}: add of k{k}");
                if stored {
                    self.vals[*k] = Ok(Some(v.clone()));
                }
            }
            (Op::Delete(k), Out::Bool(existed)) => {
                let want = matches!(self.vals[*k], Ok(Some(_)));
                assert_eq!(existed, want, "{tag}: delete of k{k}");
                self.vals[*k] = Ok(None);
            }
            (Op::Incr(d), Out::Num(n)) => {
                let want = self.counter.expect("incr only on a known counter") + d;
                assert_eq!(n, Some(want), "{tag}: incr by {d}");
                self.counter = Ok(want);
            }
            (Op::Append(k, v), Out::Bool(stored)) => {
                let cur = self.vals[*k].clone().expect("append on a known key");
                assert_eq!(stored, cur.is_some(), "{tag}: append to k{k}");
                if let Some(mut c) = cur {
                    c.extend_from_slice(v);
                    self.vals[*k] = Ok(Some(c));
                }
            }
            (Op::GetsCas(k, v), Out::GetsCas(got, cas)) => {
                let cur = self.vals[*k].clone().expect("gets on a known key");
                assert_eq!(got, cur, "{tag}: gets of k{k}");
                match cas {
                    None => assert!(got.is_none(), "{tag}: no cas after a hit"),
                    Some(r) => {
                        assert_eq!(r, mcstore::CasResult::Stored, "{tag}: cas of k{k}");
                        self.vals[*k] = Ok(Some(v.clone()));
                    }
                }
            }
            (op, out) => panic!("{tag}: {op:?} gave {out:?}"),
        }
    }

    fn check_loose(&mut self, op: &Op, out: Out) {
        let tag = &self.tag;
        let own = |k: usize, v: &Option<Vec<u8>>| {
            if let Some(v) = v {
                assert!(
                    self.history[k].iter().any(|h| v.starts_with(h)),
                    "{tag}: k{k} holds a value never written for it: {:?}",
                    String::from_utf8_lossy(v)
                );
            }
        };
        match (op, &out) {
            (Op::Get(k), Out::Item(got)) => own(*k, &got.as_ref().map(|(v, _)| v.clone())),
            (Op::GetsCas(k, _), Out::GetsCas(got, _)) => own(*k, got),
            (Op::Set(..) | Op::Incr(_), _) => {}
            (Op::Add(..) | Op::Delete(_) | Op::Append(..), Out::Bool(_)) => {}
            (op, out) => panic!("{tag}: {op:?} gave {out:?}"),
        }
    }
}

/// The flags a value is stored with: its sequence number (`...:v{seq}`), so that a reply's
/// flags and value can be checked to belong together.
fn flags_of(v: &[u8]) -> u32 {
    let s = std::str::from_utf8(v).unwrap_or("");
    let Some(at) = s.rfind(":v") else { return 0 };
    let digits: String = s[at + 2..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

async fn op_async(c: &SharedClient, m: &Model, op: &Op) -> mcstore::Result<Out> {
    let o = |v: &[u8]| SetOptions {
        flags: flags_of(v),
        ..SetOptions::default()
    };
    Ok(match op {
        Op::Set(k, v) => {
            c.set_async(m.key(*k).as_bytes(), v, o(v)).await?;
            Out::Unit
        }
        Op::Get(k) => Out::Item(
            c.get_async(m.key(*k).as_bytes())
                .await?
                .map(|i| (i.value, i.flags)),
        ),
        Op::Add(k, v) => Out::Bool(c.add_async(m.key(*k).as_bytes(), v, o(v)).await?),
        Op::Delete(k) => Out::Bool(c.delete_async(m.key(*k).as_bytes()).await?),
        Op::Incr(d) => Out::Num(c.incr_async(m.key(0).as_bytes(), *d).await?),
        Op::Append(k, v) => Out::Bool(c.append_async(m.key(*k).as_bytes(), v).await?),
        Op::GetsCas(k, v) => {
            let key = m.key(*k);
            match c.gets_async(key.as_bytes()).await? {
                None => Out::GetsCas(None, None),
                Some(i) => {
                    let cas = i.cas.expect("gets gives a cas unique");
                    let r = c.cas_async(key.as_bytes(), v, cas, o(v)).await?;
                    Out::GetsCas(Some(i.value), Some(r))
                }
            }
        }
    })
}

fn op_blocking(c: &SharedClient, m: &Model, op: &Op) -> mcstore::Result<Out> {
    let o = |v: &[u8]| SetOptions {
        flags: flags_of(v),
        ..SetOptions::default()
    };
    Ok(match op {
        Op::Set(k, v) => {
            c.set(m.key(*k).as_bytes(), v, o(v))?;
            Out::Unit
        }
        Op::Get(k) => Out::Item(c.get(m.key(*k).as_bytes())?.map(|i| (i.value, i.flags))),
        Op::Add(k, v) => Out::Bool(c.add(m.key(*k).as_bytes(), v, o(v))?),
        Op::Delete(k) => Out::Bool(c.delete(m.key(*k).as_bytes())?),
        Op::Incr(d) => Out::Num(c.incr(m.key(0).as_bytes(), *d)?),
        Op::Append(k, v) => Out::Bool(c.append(m.key(*k).as_bytes(), v)?),
        Op::GetsCas(k, v) => {
            let key = m.key(*k);
            match c.gets(key.as_bytes())? {
                None => Out::GetsCas(None, None),
                Some(i) => {
                    let cas = i.cas.expect("gets gives a cas unique");
                    let r = c.cas(key.as_bytes(), v, cas, o(v))?;
                    Out::GetsCas(Some(i.value), Some(r))
                }
            }
        }
    })
}

/// One checked async step.
async fn step_async(c: &SharedClient, m: &mut Model) {
    let op = m.next_op();
    let out = op_async(c, m, &op).await;
    match out {
        Ok(out) => m.check(&op, Some(out)),
        Err(e) => panic!("{}: {op:?} failed: {e}", m.tag),
    }
}

/// One checked blocking step.
fn step_blocking(c: &SharedClient, m: &mut Model) {
    let op = m.next_op();
    let out = op_blocking(c, m, &op);
    match out {
        Ok(out) => m.check(&op, Some(out)),
        Err(e) => panic!("{}: {op:?} failed: {e}", m.tag),
    }
}

/// Runs futures concurrently (all polled on each wake) until every one is done.
async fn join_all<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut futs: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for f in futs.iter_mut() {
            if let Some(fut) = f {
                if fut.as_mut().poll(cx).is_ready() {
                    *f = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await
}

/// A small random pause (in microseconds, up to `max`), on the runtime's timer.
async fn pause(rng: &mut support::Rng, max: u64) {
    let us = rng.below(max + 1);
    if us > 0 {
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Lone tasks, bursts of tasks and blocking threads, all at once.
// ---------------------------------------------------------------------------------------

/// A lone task's calls (direct while nothing else is in flight), a task that alternates
/// pauses with bursts of six concurrent calls (so the lone task's calls flip between direct
/// and queued), and two blocking threads (made on the lane when it is free, reading a
/// direct call's unread reply first): every protocol, one and two connections, pipeline
/// depths 1 and 16. Every result must be its own caller's.
#[test]
fn lone_tasks_bursts_and_blocking_threads_get_only_their_own_results() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        for (lanes, depth) in [(1, 1), (1, 16), (2, 16), (2, 1)] {
            let tag = format!("mix:{p:?}:{lanes}:{depth}");
            let c = builder(&mc.addr(), p, Duration::from_secs(5))
                .connections_per_server(lanes)
                .pipeline_depth(depth)
                .build()
                .unwrap();
            let rt = multi_rt(2);
            rt.block_on(warm_until_direct(&c, &tag));
            let before = c.direct_calls();
            let steps = 400;
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let (c, tag) = (&c, &tag);
                    s.spawn(move || {
                        let mut m = Model::new(&format!("{tag}:thread{t}"), 11 + t);
                        let mut rng = support::Rng(99 + t);
                        for _ in 0..steps / 2 {
                            step_blocking(c, &mut m);
                            let us = rng.below(400);
                            if us > 200 {
                                std::thread::sleep(Duration::from_micros(us));
                            }
                        }
                    });
                }
                let lone = {
                    let (c, tag) = (c.clone(), tag.clone());
                    rt.spawn(async move {
                        let mut m = Model::new(&format!("{tag}:lone"), 7);
                        for _ in 0..steps {
                            step_async(&c, &mut m).await;
                        }
                    })
                };
                let burst = {
                    let (c, tag) = (c.clone(), tag.clone());
                    rt.spawn(async move {
                        let mut ms: Vec<Model> = (0..6)
                            .map(|i| Model::new(&format!("{tag}:burst{i}"), 1000 + i))
                            .collect();
                        let mut rng = support::Rng(5);
                        for _ in 0..steps / 6 {
                            let c = &c;
                            join_all(ms.iter_mut().map(|m| step_async(c, m)).collect()).await;
                            pause(&mut rng, 2000).await;
                        }
                    })
                };
                rt.block_on(lone).unwrap();
                rt.block_on(burst).unwrap();
            });
            let after = c.direct_calls();
            eprintln!("{tag}: {} direct", after - before);
            assert!(after > before, "{tag}: no direct call under the mix");
            rt.block_on(exact_async(&c, &format!("{tag}:after"), 50));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Futures dropped early: after their first poll, or at random tiny timeouts.
// ---------------------------------------------------------------------------------------

/// Polls `f` once (a direct call writes its request on its first poll), then drops it;
/// its output if that one poll finished it.
async fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).ready())).await
}

trait ReadyExt<T> {
    fn ready(self) -> Option<T>;
}

impl<T> ReadyExt<T> for std::task::Poll<T> {
    fn ready(self) -> Option<T> {
        match self {
            std::task::Poll::Ready(t) => Some(t),
            std::task::Poll::Pending => None,
        }
    }
}

/// One checked async step that may be cut short: dropped after its first poll, or given a
/// random timeout of up to 300 µs, or run to the end (then it must succeed). A call cut
/// short makes its key unknown; one that finished must be exact.
async fn step_maybe_dropped(c: &SharedClient, m: &mut Model, rng: &mut support::Rng) {
    let op = m.next_op();
    let out = match rng.below(4) {
        0 => poll_once(op_async(c, m, &op)).await,
        1 => {
            let d = Duration::from_micros(rng.below(300));
            tokio::time::timeout(d, op_async(c, m, &op)).await.ok()
        }
        _ => Some(op_async(c, m, &op).await),
    };
    match out {
        None => m.check(&op, None),
        Some(Ok(out)) => m.check(&op, Some(out)),
        Some(Err(e)) => panic!("{}: {op:?} failed: {e}", m.tag),
    }
}

/// Three tasks on a two-worker runtime whose calls are often cut short (dropped after the
/// first poll, with the request written and the reply unread, or at tiny timeouts), with
/// pauses between them so that many are lone (direct), beside a blocking thread; one
/// connection (a call dropped on the wire runs before the calls made after it), four
/// request slots (a leaked slot would soon time out every call). Every finished call is
/// exact, and afterwards every caller's calls are exact again.
#[test]
fn futures_cut_short_at_random_leave_every_other_result_exact_and_no_slot_leaked() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        for depth in [1, 16] {
            let tag = format!("cut:{p:?}:{depth}");
            let c = builder(&mc.addr(), p, Duration::from_secs(5))
                .pipeline_depth(depth)
                .max_in_flight(4)
                .build()
                .unwrap();
            let rt = multi_rt(2);
            rt.block_on(warm_until_direct(&c, &tag));
            let before = c.direct_calls();
            let steps = 300;
            std::thread::scope(|s| {
                let (cb, tagb) = (&c, &tag);
                s.spawn(move || {
                    let mut m = Model::new(&format!("{tagb}:thread"), 3);
                    let mut rng = support::Rng(31);
                    for _ in 0..steps / 2 {
                        step_blocking(cb, &mut m);
                        let us = rng.below(600);
                        if us > 300 {
                            std::thread::sleep(Duration::from_micros(us));
                        }
                    }
                });
                let tasks: Vec<_> = (0..3u64)
                    .map(|t| {
                        let (c, tag) = (c.clone(), tag.clone());
                        rt.spawn(async move {
                            let mut m = Model::new(&format!("{tag}:task{t}"), 50 + t);
                            let mut rng = support::Rng(77 + t);
                            for _ in 0..steps {
                                step_maybe_dropped(&c, &mut m, &mut rng).await;
                                pause(&mut rng, 1500).await;
                            }
                            // Then only whole calls: exact again (unknown keys are set).
                            for _ in 0..60 {
                                step_async(&c, &mut m).await;
                            }
                            (m.oks, m.errors)
                        })
                    })
                    .collect();
                for t in tasks {
                    let (oks, cut) = rt.block_on(t).unwrap();
                    assert!(oks > 100 && cut > 20, "{tag}: {oks} whole, {cut} cut short");
                }
            });
            let after = c.direct_calls();
            eprintln!("{tag}: {} direct", after - before);
            assert!(after > before + 50, "{tag}: few direct calls");
            rt.block_on(exact_async(&c, &format!("{tag}:after"), 50));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Faults: a server frozen and resumed at random (SIGSTOP / SIGCONT), killed and
//    restarted, connections cut mid-reply.
// ---------------------------------------------------------------------------------------

/// The longest any one step may take (a gets-and-cas is two calls), far above the timeout.
fn step_bound(timeout: Duration) -> Duration {
    timeout * 4 + Duration::from_secs(4)
}

/// One loosely checked async step (errors allowed), bounded in time.
async fn step_loose_async(c: &SharedClient, m: &mut Model, timeout: Duration) {
    let op = m.next_op();
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), op_async(c, m, &op))
        .await
        .unwrap_or_else(|_| panic!("{}: {op:?} hung for a minute", m.tag));
    let took = started.elapsed();
    assert!(
        took < step_bound(timeout),
        "{}: {op:?} took {took:?} with a {timeout:?} timeout",
        m.tag
    );
    m.check(&op, out.ok());
}

/// One loosely checked blocking step (errors allowed), bounded in time.
fn step_loose_blocking(c: &SharedClient, m: &mut Model, timeout: Duration) {
    let op = m.next_op();
    let started = Instant::now();
    let out = op_blocking(c, m, &op);
    let took = started.elapsed();
    assert!(
        took < step_bound(timeout),
        "{}: {op:?} took {took:?} with a {timeout:?} timeout",
        m.tag
    );
    m.check(&op, out.ok());
}

/// Lone async callers and a blocking thread, loosely checked, while another thread freezes
/// and resumes the server at random: every call ends in time and every read is its own
/// caller's; once the server runs again, every caller is exact.
/// Loose callers beside a fault, until `stop`: a blocking thread in scope `s` and two
/// tasks on `rt`, each with its own model. `seeds`: the thread's model and pause seeds and
/// its longest pause (us), the tasks' model and pause seeds, and their longest pause (us:
/// base plus step per task). The tasks' handles give their (ok, failed) counts.
fn loose_callers<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    rt: &tokio::runtime::Runtime,
    c: &'e SharedClient,
    tag: &'e String,
    stop_arc: &Arc<AtomicBool>,
    timeout: Duration,
    seeds: [u64; 7],
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    let [thread_seed, thread_rng, sleep_us, task_seed, task_rng, pause_base, pause_step] = seeds;
    let stop = Arc::clone(stop_arc);
    s.spawn(move || {
        let mut m = Model::new(&format!("{tag}:thread"), thread_seed);
        m.loose = true;
        let mut rng = support::Rng(thread_rng);
        while !stop.load(Ordering::SeqCst) {
            step_loose_blocking(c, &mut m, timeout);
            std::thread::sleep(Duration::from_micros(rng.below(sleep_us)));
        }
    });
    (0..2u64)
        .map(|t| {
            let (c, tag, stop) = (c.clone(), tag.clone(), Arc::clone(stop_arc));
            rt.spawn(async move {
                let mut m = Model::new(&format!("{tag}:task{t}"), task_seed + t);
                m.loose = true;
                let mut rng = support::Rng(task_rng + t);
                while !stop.load(Ordering::SeqCst) {
                    step_loose_async(&c, &mut m, timeout).await;
                    pause(&mut rng, pause_base + pause_step * t).await;
                }
                (m.oks, m.errors)
            })
        })
        .collect()
}

fn jitter_under(p: Protocol, lanes: usize, depth: usize) {
    let mc = Memcached::start();
    let timeout = Duration::from_millis(250);
    let tag = format!("jit:{p:?}:{lanes}:{depth}");
    let c = builder(&mc.addr(), p, timeout)
        .connections_per_server(lanes)
        .pipeline_depth(depth)
        .max_in_flight(4)
        .build()
        .unwrap();
    let rt = multi_rt(2);
    rt.block_on(warm_until_direct(&c, &tag));
    let before = c.direct_calls();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_arc = Arc::clone(&stop);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(Arc::clone(&stop_arc));
        let (c, tag, stop) = (&c, &tag, &*stop);
        let jitter = s.spawn(|| {
            let mut rng = support::Rng(4242);
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(2000) {
                mc.freeze();
                std::thread::sleep(Duration::from_millis(rng.below(500)));
                mc.resume();
                std::thread::sleep(Duration::from_millis(rng.below(60)));
            }
            stop.store(true, Ordering::SeqCst);
        });
        let tasks = loose_callers(
            s,
            &rt,
            c,
            tag,
            &stop_arc,
            timeout,
            [17, 23, 3000, 61, 91, 1000, 2000],
        );
        jitter.join().unwrap();
        for t in tasks {
            let (oks, errors) = rt.block_on(t).unwrap();
            eprintln!("{tag}: {oks} ok, {errors} failed");
        }
    });
    let after = c.direct_calls();
    eprintln!("{tag}: {} direct", after - before);
    assert!(after > before, "{tag}: no direct call");
    // Running again: exact, and no slot leaked (four slots).
    rt.block_on(async {
        exact_again(&c, &tag).await;
    });
}

#[test]
fn a_server_frozen_and_resumed_at_random_bounds_every_call_and_keeps_reads_own() {
    for p in PROTOCOLS {
        jitter_under(p, 1, 16);
    }
    jitter_under(Protocol::Meta, 2, 1);
}

/// A proxy to a real memcached that, now and then (one reply chunk in `cut_one_in`, 0:
/// never), forwards only part of a chunk of replies and closes both sides: connections cut
/// mid-reply.
struct CutProxy {
    port: u16,
    cut_one_in: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(target: String) -> CutProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_one_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (cut, stop2) = (Arc::clone(&cut_one_in), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seed = 1u64;
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = c_in.read(&mut buf) {
                        if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Both);
                    let _ = c_in.shutdown(Shutdown::Both);
                });
                seed += 1;
                let cut = Arc::clone(&cut);
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut rng = support::Rng(seed * 7919);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s_in.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let one_in = cut.load(Ordering::SeqCst);
                        if one_in > 0 && rng.below(one_in) == 0 {
                            let part = rng.below(n as u64) as usize;
                            let _ = c_out.write_all(&buf[..part]);
                            break;
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Both);
                    let _ = s_in.shutdown(Shutdown::Both);
                });
            }
        });
        CutProxy {
            port,
            cut_one_in,
            stop,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Lone async callers (direct) and a blocking thread through a proxy that cuts connections
/// mid-reply (one reply chunk in 15), then kills and restarts the server: every call ends
/// in time, every read is its caller's own; with the cuts stopped, everything is exact.
#[test]
fn connections_cut_mid_reply_and_a_restarted_server_under_direct_calls() {
    for p in PROTOCOLS {
        let mut mc = Memcached::start();
        let proxy = CutProxy::start(mc.addr());
        let timeout = Duration::from_millis(400);
        let tag = format!("cutp:{p:?}");
        let c = builder(&proxy.addr(), p, timeout)
            .max_in_flight(4)
            .build()
            .unwrap();
        let rt = multi_rt(2);
        rt.block_on(warm_until_direct(&c, &tag));
        let before = c.direct_calls();
        proxy.cut_one_in.store(15, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_arc = Arc::clone(&stop);
        std::thread::scope(|s| {
            let _stop = StopOnDrop(Arc::clone(&stop_arc));
            let (c, tag, stop) = (&c, &tag, &*stop);
            let tasks = loose_callers(
                s,
                &rt,
                c,
                tag,
                &stop_arc,
                timeout,
                [19, 29, 2000, 71, 13, 800, 2000],
            );
            // Cuts for a while, then the server dies and comes back (behind the proxy).
            let start = Instant::now();
            support::wait_for("calls under cuts", || {
                start.elapsed() > Duration::from_millis(1500)
            });
            mc.kill();
            let killed = Instant::now();
            support::wait_for("calls to a killed server", || {
                killed.elapsed() > Duration::from_millis(300)
            });
            mc.restart();
            let restarted = Instant::now();
            support::wait_for("calls after the restart", || {
                restarted.elapsed() > Duration::from_millis(500)
            });
            stop.store(true, Ordering::SeqCst);
            for t in tasks {
                let (oks, errors) = rt.block_on(t).unwrap();
                eprintln!("{tag}: {oks} ok, {errors} failed");
            }
        });
        let after = c.direct_calls();
        eprintln!("{tag}: {} direct", after - before);
        assert!(after > before, "{tag}: no direct call");
        proxy.cut_one_in.store(0, Ordering::SeqCst);
        rt.block_on(async {
            // The connection the last cut left may fail one call more: then all exact.
            let _ = c.get_async(b"cutp:probe").await;
            let _ = c.get_async(b"cutp:probe").await;
            exact_again(&c, &tag).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// 5. Unix sockets and TLS.
// ---------------------------------------------------------------------------------------

/// A lone checked task beside a blocking thread and bursts (as test 2, smaller).
fn mixed_exact(c: &SharedClient, tag: &str) {
    let rt = multi_rt(2);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut m = Model::new(&format!("{tag}:thread"), 41);
            let mut rng = support::Rng(43);
            for _ in 0..150 {
                step_blocking(c, &mut m);
                std::thread::sleep(Duration::from_micros(rng.below(600)));
            }
        });
        let lone = {
            let (c, tag) = (c.clone(), tag.to_string());
            rt.spawn(async move {
                let mut m = Model::new(&format!("{tag}:lone"), 47);
                let mut rng = support::Rng(53);
                for n in 0..300 {
                    step_async(&c, &mut m).await;
                    if n % 3 == 0 {
                        pause(&mut rng, 500).await;
                    }
                }
            })
        };
        let burst = {
            let (c, tag) = (c.clone(), tag.to_string());
            rt.spawn(async move {
                let mut ms: Vec<Model> = (0..4)
                    .map(|i| Model::new(&format!("{tag}:burst{i}"), 300 + i))
                    .collect();
                let mut rng = support::Rng(59);
                for _ in 0..40 {
                    let c = &c;
                    join_all(ms.iter_mut().map(|m| step_async(c, m)).collect()).await;
                    pause(&mut rng, 3000).await;
                }
            })
        };
        rt.block_on(lone).unwrap();
        rt.block_on(burst).unwrap();
    });
}

/// Over a Unix socket direct calls are made, and every result is its caller's.
#[test]
fn direct_calls_over_a_unix_socket_are_exact() {
    let mc = Memcached::start_unix();
    for p in PROTOCOLS {
        let tag = format!("unix:{p:?}");
        let c = builder(&mc.addr(), p, Duration::from_secs(5))
            .max_in_flight(8)
            .build()
            .unwrap();
        multi_rt(1).block_on(warm_until_direct(&c, &tag));
        let before = c.direct_calls();
        mixed_exact(&c, &tag);
        assert!(c.direct_calls() > before, "{tag}: no direct call");
    }
}

/// Over TLS a socket's readiness is not the replies' (records are buffered): no call goes
/// direct, and every result is its caller's.
#[cfg(feature = "tls")]
#[test]
fn over_tls_no_call_goes_direct_and_every_result_is_exact() {
    let certs = support::tls::certs();
    let args = support::tls::server_args(&certs.server);
    let mc = Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for p in PROTOCOLS {
        let tag = format!("tls:{p:?}");
        let c = mcstore::Client::builder()
            .protocol(p)
            .server(mc.addr())
            .io_timeout(Duration::from_secs(5))
            .tls(support::tls::client_config(false))
            .shared()
            .io_mode(IoMode::Adaptive)
            .max_in_flight(8)
            .build()
            .unwrap();
        multi_rt(1).block_on(exact_async(&c, &format!("{tag}:alone"), 100));
        mixed_exact(&c, &tag);
        assert_eq!(c.direct_calls(), 0, "{tag}: direct calls over TLS");
    }
}

// ---------------------------------------------------------------------------------------
// 6. Live server list changes under direct calls.
// ---------------------------------------------------------------------------------------

/// Two servers; the list flips between both, either one alone, and both again, while lone
/// async callers (direct) and a blocking thread run: a server leaves while a direct call's
/// reply is unread on its lane. Every call ends in time and every read is its caller's; once
/// the list settles, everything is exact.
#[test]
fn servers_leaving_and_joining_under_direct_calls_keep_reads_own_and_bounded() {
    let (a, b) = (Memcached::start(), Memcached::start());
    let both = [a.addr(), b.addr()];
    for p in PROTOCOLS {
        let tag = format!("list:{p:?}");
        let timeout = Duration::from_millis(500);
        let c = support::client_builder()
            .protocol(p)
            .servers(both.to_vec())
            .distribution(mcstore::ring::Distribution::Ketama)
            .io_timeout(timeout)
            .connect_timeout(timeout)
            .shared()
            .max_in_flight(4)
            .build()
            .unwrap();
        let rt = multi_rt(2);
        rt.block_on(warm_until_direct(&c, &tag));
        let before = c.direct_calls();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_arc = Arc::clone(&stop);
        std::thread::scope(|s| {
            let _stop = StopOnDrop(Arc::clone(&stop_arc));
            let (c, tag, stop) = (&c, &tag, &*stop);
            let tasks = loose_callers(
                s,
                &rt,
                c,
                tag,
                &stop_arc,
                timeout,
                [83, 89, 3000, 97, 101, 300, 1500],
            );
            let lists: [&[String]; 4] = [&both[..1], &both[..], &both[1..], &both[..]];
            let mut rng = support::Rng(103);
            for n in 0..120 {
                c.server_list().set(lists[n % 4].iter()).unwrap();
                std::thread::sleep(Duration::from_micros(rng.below(20_000)));
            }
            stop.store(true, Ordering::SeqCst);
            for t in tasks {
                let (oks, errors) = rt.block_on(t).unwrap();
                eprintln!("{tag}: {oks} ok, {errors} failed");
                assert!(oks > 50, "{tag}: {oks} calls succeeded");
            }
        });
        let after = c.direct_calls();
        eprintln!("{tag}: {} direct", after - before);
        assert!(after > before, "{tag}: no direct call");
        c.server_list().set(both.iter()).unwrap();
        rt.block_on(async {
            exact_again(&c, &tag).await;
        });
    }
}
