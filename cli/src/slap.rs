//! `mcstore slap`: a concurrent load generator (as libmemcached's memaslap). Many callers
//! (threads, or tokio tasks) share one client; each call's latency goes to a histogram; the
//! run ends with one machine-readable RESULT line that `scripts/bench-compare` reads.
//!
//! A run ends after `-n` calls, after `-t` (a duration), or on SIGINT (Ctrl-C), which ends
//! it early and still prints the summary (then `mcstore` exits 130). `--rate` paces the callers open-loop: each call
//! has an intended start time; one that starts late because an earlier call ran long counts
//! its latency from that intended time (a stall shows in every call it delayed, as wrk2
//! measures: no coordinated omission), and one that waited for its time counts from its start
//! (the timer's own lateness is not the server's). `--report-every` prints the calls, their
//! rate and errors each period, on stderr. `--verify` gives every key a value of its own and
//! checks each value read against its key's.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mcstore::{ClientBuilder, Pool, SetOptions, SharedClient};

/// What `mcstore slap` was asked to do.
pub struct SlapSpec {
    pub workload: String,
    pub callers: usize,
    /// Calls in total; `None`: 1,000,000, or no limit with a duration.
    pub ops: Option<usize>,
    /// Ends the run after this long.
    pub duration: Option<Duration>,
    /// Calls per second in total, open-loop (see the module docs).
    pub rate: Option<f64>,
    /// Prints progress every period.
    pub report_every: Option<Duration>,
    /// Per-key values, each read checked against its key's.
    pub verify: bool,
    pub keys: usize,
    pub value_bytes: usize,
    pub mode: Mode,
    pub runtime: Runtime,
    pub client: Which,
    pub io_mode: IoModeArg,
    /// Connections per server (shared client).
    pub conns: usize,
    /// Rounds in flight per connection (shared client).
    pub depth: usize,
}

/// How callers run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One OS thread per caller, blocking calls.
    Threads,
    /// One tokio task per caller, async calls.
    Async,
}

/// The tokio runtime of `--mode async`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// One thread runs every task.
    Current,
    /// tokio's work-stealing runtime (one worker per core).
    Multi,
}

/// Who does the shared client's I/O for blocking callers (see `mcstore::IoMode`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoModeArg {
    /// A caller on an idle server calls directly; otherwise the server's I/O thread.
    Adaptive,
    /// Flat combining among the callers.
    Combining,
    /// Every call through the server's I/O thread.
    IoThread,
}

/// The client under load.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// One `SharedClient` for every caller.
    Shared,
    /// A `Pool` of one `Client` per caller (threads only), to compare.
    Pool,
    /// One plain `Client` (one caller only): the single-caller baseline.
    Plain,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Get,
    Set,
    Mix,
    /// get, set, delete, touch and incr in equal parts (the mixed-batch benchmark).
    MixAll,
}

/// One call of a workload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Get,
    Set,
    Delete,
    Touch,
    /// An incr of the key's counter (`ctr:<i>`, preloaded with 0).
    Incr,
}

/// (user, system) CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable `struct rusage` for getrusage to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    assert_eq!(rc, 0, "getrusage failed");
    let t = |tv: &libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(&r.ru_utime) + t(&r.ru_stime)
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, up to a minute, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// The key caller `c` uses for its `n`-th call: spread over the key space, different per
/// caller.
fn key_index(c: usize, n: usize, keys: usize) -> usize {
    (c.wrapping_mul(7919) + n.wrapping_mul(31)) % keys
}

/// What one caller did.
struct Tally {
    hist: Histogram<u64>,
    errors: usize,
    /// Gets that found nothing (a restarted or new server is empty; a moved key misses).
    misses: usize,
    calls: usize,
}

/// Why a call did not do what it should: a get that found nothing (counted apart: a cache
/// may miss), or a failure (an error, or a wrong value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missed {
    Miss,
    Failed,
}

/// A call's outcome.
type Outcome = Result<(), Missed>;

/// Any error is a failed call.
fn failed<T>(_: T) -> Missed {
    Missed::Failed
}

/// Set by SIGINT: every caller stops at its next call.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Parses a duration as memaslap writes them: `30s`, `2m`, `1h`, `500ms` (a bare number
/// is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 2m, 1h, 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// When a caller's calls start and when it stops.
#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    /// At most this many calls.
    limit: usize,
    deadline: Option<Instant>,
    /// With a rate: the time between this caller's intended starts.
    every: Option<Duration>,
}

impl Pace {
    /// `None`: stop before call `n`. Otherwise the time the call's latency counts from: its
    /// intended start with a rate (the caller waits for it if early), else now.
    fn intended(&self, n: usize) -> Option<Option<Instant>> {
        if n >= self.limit || STOP.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return None;
        }
        Some(self.every.map(|e| self.start + e.mul_f64(n as f64)))
    }
}

/// The call a caller makes for its `n`-th operation: a set every tenth call in `mix`; in
/// `mixall` get, set, delete, touch, incr in turn (as `benches/slap_c.c -w mixall`).
fn call_of(w: Workload, n: usize) -> Call {
    match w {
        Workload::Get => Call::Get,
        Workload::Set => Call::Set,
        Workload::Mix if n % 10 == 9 => Call::Set,
        Workload::Mix => Call::Get,
        Workload::MixAll => [Call::Get, Call::Set, Call::Delete, Call::Touch, Call::Incr][n % 5],
    }
}

/// The TTL a `mixall` touch sets (long: the run never sees it expire).
const TOUCH_TTL: u32 = 3600;

/// Runs the load; `Ok(true)` when SIGINT ended it early (after the summary was printed).
/// `follow`: a discovery source (and its interval) the clients' list follows during the run.
pub fn run(
    builder: ClientBuilder,
    spec: &SlapSpec,
    proto: &str,
    mut follow: Option<(mcstore::Discovery, Duration)>,
) -> Result<bool, String> {
    let workload = match spec.workload.as_str() {
        "get" => Workload::Get,
        "set" => Workload::Set,
        "mix" => Workload::Mix,
        "mixall" => Workload::MixAll,
        w => {
            return Err(format!(
                "unknown workload {w:?}; one of get, set, mix, mixall"
            ))
        }
    };
    if spec.callers == 0 || spec.keys == 0 {
        return Err("--callers and -k must be at least 1".into());
    }
    if spec.client != Which::Shared && spec.mode == Mode::Async {
        return Err("--client pool and plain run threads only (no async calls)".into());
    }
    // The list followed during the run, and its generation at the end.
    let mut following = None;
    let mut list_of: Option<mcstore::ServerList> = None;
    let mut follow_list = |list: &mcstore::ServerList| -> Result<(), String> {
        if let Some((d, every)) = follow.take() {
            following = Some(d.follow(list.clone(), every).map_err(|e| e.to_string())?);
        }
        list_of = Some(list.clone());
        Ok(())
    };
    if spec.client == Which::Plain && spec.callers != 1 {
        return Err("--client plain is one Client for one caller (--callers 1)".into());
    }
    if spec.verify && spec.value_bytes < 8 {
        return Err("--verify needs values of 8 bytes or more (-v), to tell keys apart".into());
    }
    if spec.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of calls per second".into());
    }
    let ops = spec.ops.unwrap_or(if spec.duration.is_some() {
        usize::MAX
    } else {
        1_000_000
    });
    STOP.store(false, Ordering::SeqCst);
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let err = |e: mcstore::Error| e.to_string();
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..spec.keys)
            .map(|i| format!("key:{i}").into_bytes())
            .collect(),
    );
    // With --verify each key has a value of its own (its index, repeated), so a reply that
    // reached the wrong caller shows; otherwise one value for all.
    let values: Arc<Vec<Vec<u8>>> = Arc::new(if spec.verify {
        (0..spec.keys)
            .map(|i| {
                format!("{i:08}")
                    .bytes()
                    .cycle()
                    .take(spec.value_bytes)
                    .collect()
            })
            .collect()
    } else {
        vec![vec![b'v'; spec.value_bytes]]
    });
    let value_of = |i: usize| &values[if spec.verify { i } else { 0 }];

    // Preload, untimed: every key the gets read.
    let mut loader = builder.clone().build().map_err(err)?;
    for (c, chunk) in keys.chunks(1000).enumerate() {
        let mut p = loader.pipeline();
        for (j, k) in chunk.iter().enumerate() {
            p.set(k, value_of(c * 1000 + j), SetOptions::default())
                .map_err(err)?;
        }
        let r = p.finish().map_err(err)?;
        if r.errors > 0 {
            return Err(format!("preload: {:?}", r.first_error));
        }
    }
    // The counters `mixall` increments.
    let counters: Arc<Vec<Vec<u8>>> = Arc::new(if workload == Workload::MixAll {
        (0..spec.keys)
            .map(|i| format!("ctr:{i}").into_bytes())
            .collect()
    } else {
        Vec::new()
    });
    for chunk in counters.chunks(1000) {
        let mut p = loader.pipeline();
        for k in chunk {
            p.set(k, b"0", SetOptions::default()).map_err(err)?;
        }
        let r = p.finish().map_err(err)?;
        if r.errors > 0 {
            return Err(format!("preload: {:?}", r.first_error));
        }
    }
    drop(loader);

    let progress = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    // A bar for a known number of calls on a terminal; periodic lines when asked for.
    let bar = (std::io::stdout().is_terminal() && spec.report_every.is_none() && ops != usize::MAX)
        .then(|| {
            let b = indicatif::ProgressBar::new(ops as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} ops {per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
    let ticker = bar.as_ref().map(|b| {
        let (b, progress, finished) = (b.clone(), Arc::clone(&progress), Arc::clone(&finished));
        std::thread::spawn(move || {
            while !finished.load(Ordering::Relaxed) {
                b.set_position(progress.load(Ordering::Relaxed) as u64);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let reporter = spec.report_every.map(|every| {
        let (progress, failures, finished) = (
            Arc::clone(&progress),
            Arc::clone(&failures),
            Arc::clone(&finished),
        );
        std::thread::spawn(move || {
            let start = Instant::now();
            let (mut calls, mut errors) = (0, 0);
            let mut next = start + every;
            while !finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10).min(every));
                if Instant::now() < next {
                    continue;
                }
                let (c, e) = (
                    progress.load(Ordering::Relaxed),
                    failures.load(Ordering::Relaxed),
                );
                // On stderr: stdout carries the table and the RESULT line scripts read.
                eprintln!(
                    "[{:>7.1}s] calls {:>10} ({:.0}/s) errors {}",
                    start.elapsed().as_secs_f64(),
                    c,
                    (c - calls) as f64 / every.as_secs_f64(),
                    e - errors
                );
                (calls, errors) = (c, e);
                next += every;
            }
        })
    });

    let share = |c: usize| {
        if ops == usize::MAX {
            usize::MAX
        } else {
            ops / spec.callers + usize::from(c < ops % spec.callers)
        }
    };
    // `start`: when the callers are released (after threads or tasks exist).
    let pace = |c: usize, start: Instant| Pace {
        start,
        limit: share(c),
        deadline: spec.duration.map(|d| start + d),
        every: spec
            .rate
            .map(|r| Duration::from_secs_f64(spec.callers as f64 / r)),
    };
    let ctx = Ctx {
        keys,
        counters,
        values: Arc::clone(&values),
        verify: spec.verify,
        workload,
        progress: Arc::clone(&progress),
        failures: Arc::clone(&failures),
    };
    // What the fleet layer did (replicas): read after the run.
    let mut fleet_of: Option<Box<dyn FnOnce() -> Option<mcstore::FleetCounters>>> = None;
    let (tallies, wall, cpu) = match (spec.client, spec.mode) {
        (Which::Pool, _) => {
            let pool = Pool::new(builder, spec.callers).map_err(err)?;
            follow_list(pool.server_list())?;
            let p = pool.clone();
            fleet_of = Some(Box::new(move || p.get().ok().map(|c| c.fleet_counters())));
            run_threads(spec.callers, &ctx, pace, move |_| {
                let pool = pool.clone();
                move |key: Target<'_>, call: Call, value: &[u8], buf: &mut Vec<u8>| {
                    let mut c = pool.get().map_err(failed)?;
                    call_client(&mut c, key, call, value, buf)
                }
            })
        }
        (Which::Plain, _) => {
            let client = builder.build().map_err(err)?;
            follow_list(client.server_list())?;
            let client = std::sync::Mutex::new(Some(client));
            run_threads(1, &ctx, pace, move |_| {
                let mut c = client.lock().unwrap().take().expect("one caller");
                move |key: Target<'_>, call: Call, value: &[u8], buf: &mut Vec<u8>| {
                    call_client(&mut c, key, call, value, buf)
                }
            })
        }
        (Which::Shared, mode) => {
            let client = builder
                .shared()
                .io_mode(match spec.io_mode {
                    IoModeArg::Adaptive => mcstore::IoMode::Adaptive,
                    IoModeArg::Combining => mcstore::IoMode::Combining,
                    IoModeArg::IoThread => mcstore::IoMode::IoThread,
                })
                .connections_per_server(spec.conns)
                .pipeline_depth(spec.depth)
                .build()
                .map_err(err)?;
            follow_list(&client.server_list())?;
            let c = client.clone();
            fleet_of = Some(Box::new(move || Some(c.fleet_counters())));
            // Warm-up: connections open, buffers grown.
            let mut buf = Vec::new();
            for k in ctx.keys.iter().take(100) {
                client.get_into(k, &mut buf).map_err(err)?;
            }
            match mode {
                Mode::Threads => run_threads(spec.callers, &ctx, pace, move |_| {
                    let client = client.clone();
                    move |key: Target<'_>, call: Call, value: &[u8], buf: &mut Vec<u8>| {
                        call_shared(&client, key, call, value, buf)
                    }
                }),
                Mode::Async => run_async(spec, &ctx, pace, client)?,
            }
        }
    };
    finished.store(true, Ordering::Relaxed);
    for t in [ticker, reporter].into_iter().flatten() {
        let _ = t.join();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // SAFETY: restores the default disposition (no handler of ours runs after this).
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let interrupted = STOP.load(Ordering::SeqCst);

    let mut all = histogram();
    let (mut errors, mut misses, mut done) = (0, 0, 0);
    for t in &tallies {
        all.add(&t.hist).expect("same bounds");
        errors += t.errors;
        misses += t.misses;
        done += t.calls;
    }
    let fleet = fleet_of.and_then(|f| f()).unwrap_or_default();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let max_us = all.max() as f64 / 1000.0;
    if interrupted {
        println!("interrupted (SIGINT): the calls made so far");
    }
    println!(
        "callers {}, {done} ops, {errors} errors, {misses} misses",
        spec.callers
    );
    if let Some(r) = spec.rate {
        println!(
            "rate: {r:.0}/s asked, {:.0}/s made; a call delayed by an earlier one counts from its intended start",
            done as f64 / wall.as_secs_f64()
        );
    }
    println!("latency per call (us):");
    println!("  p50    {:>10.1}", us(0.5));
    println!("  p90    {:>10.1}", us(0.9));
    println!("  p99    {:>10.1}", us(0.99));
    println!("  p99.9  {:>10.1}", us(0.999));
    println!("  max    {max_us:>10.1}");
    if fleet != mcstore::FleetCounters::default() {
        println!(
            "copies: {} failovers, {} hedges sent ({} won, {} refused by the budget: {:.2}% extra requests), {} repairs recorded, {} done",
            fleet.failovers,
            fleet.hedges_sent,
            fleet.hedges_won,
            fleet.hedges_refused,
            fleet.hedges_sent as f64 * 100.0 / done.max(1) as f64,
            fleet.repairs_recorded,
            fleet.repairs_done
        );
    }
    let client = match spec.client {
        Which::Shared => "mcstore",
        Which::Pool => "mcstore-pool",
        Which::Plain => "mcstore-client",
    };
    let w = match workload {
        Workload::Get => "get_concurrent",
        Workload::Set => "set_concurrent",
        Workload::Mix => "mix_concurrent",
        Workload::MixAll => "mixall_concurrent",
    };
    let wall_s = wall.as_secs_f64();
    let per_op = done.max(1) as f64;
    drop(following);
    let list_changes = list_of.map_or(0, |l| l.generation());
    // Scripts read this line: fields are only ever added (at the end), never renamed or
    // removed. `failed` counts the calls that returned an error (or a wrong value), the same
    // count as `errors` today; `misses` the gets that found nothing (not failures: a
    // restarted server is empty, a moved key misses); `p999_us` is p99.9.
    println!(
        "RESULT client={client} proto={proto} workload={w} callers={} ops={done} wall_s={wall_s:.6} \
         ops_per_s={:.1} cpu_us_per_op={:.4} p50_us={:.1} p99_us={:.1} errors={errors} \
         rate={:.0} verify={} interrupted={} p999_us={:.1} max_us={max_us:.1} failed={errors} \
         failovers={} hedges={} hedges_won={} hedges_refused={} misses={misses} \
         list_changes={list_changes} conns={} depth={}",
        spec.callers,
        done as f64 / wall_s,
        cpu * 1e6 / per_op,
        us(0.5),
        us(0.99),
        spec.rate.unwrap_or(0.0),
        u8::from(spec.verify),
        u8::from(interrupted),
        us(0.999),
        fleet.failovers,
        fleet.hedges_sent,
        fleet.hedges_won,
        fleet.hedges_refused,
        spec.conns,
        spec.depth,
    );
    if errors > 0 {
        return Err(format!("{errors} calls failed"));
    }
    Ok(interrupted)
}

/// What every caller shares.
struct Ctx {
    keys: Arc<Vec<Vec<u8>>>,
    /// `mixall`'s counters, one per key (empty otherwise).
    counters: Arc<Vec<Vec<u8>>>,
    /// One value for every key, or one per key (`verify`).
    values: Arc<Vec<Vec<u8>>>,
    verify: bool,
    workload: Workload,
    progress: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
}

impl Ctx {
    /// Key `i`'s value.
    fn value(&self, i: usize) -> &[u8] {
        &self.values[if self.verify { i } else { 0 }]
    }

    /// Key `i` and its counter (`mixall`).
    fn target(&self, i: usize) -> Target<'_> {
        Target {
            key: &self.keys[i],
            counter: self.counters.get(i).map_or(&[], |c| &c[..]),
        }
    }
}

/// What a call works on: the key, and its counter for an incr.
#[derive(Clone, Copy)]
struct Target<'a> {
    key: &'a [u8],
    counter: &'a [u8],
}

/// A counter or a key found missing is not a failure: `mixall` deletes keys as it goes.
fn found<T>(r: mcstore::Result<T>) -> Outcome {
    r.map(drop).map_err(failed)
}

/// Call `call` of a workload on `c`: a `Client` or a `SharedClient` (the same methods, on
/// `&mut self` and `&self`).
macro_rules! one_call {
    ($c:expr, $t:expr, $call:expr, $value:expr, $buf:expr) => {
        match $call {
            Call::Get => check_hit($c.get_into($t.key, $buf), $buf, $value),
            Call::Set => $c
                .set($t.key, $value, SetOptions::default())
                .map_err(failed),
            Call::Delete => found($c.delete($t.key)),
            Call::Touch => found($c.touch($t.key, TOUCH_TTL)),
            Call::Incr => found($c.incr($t.counter, 1)),
        }
    };
}

fn call_shared(
    c: &SharedClient,
    t: Target<'_>,
    call: Call,
    value: &[u8],
    buf: &mut Vec<u8>,
) -> Outcome {
    one_call!(c, t, call, value, buf)
}

fn call_client(
    c: &mut mcstore::Client,
    t: Target<'_>,
    call: Call,
    value: &[u8],
    buf: &mut Vec<u8>,
) -> Outcome {
    one_call!(c, t, call, value, buf)
}

/// A get must find the preloaded value (or one a set wrote: the same bytes), or miss.
fn check_hit(r: mcstore::Result<Option<mcstore::ItemInfo>>, buf: &[u8], value: &[u8]) -> Outcome {
    match r {
        Ok(Some(_)) if buf == value => Ok(()),
        Ok(None) => Err(Missed::Miss),
        _ => Err(Missed::Failed),
    }
}

fn tally() -> Tally {
    Tally {
        hist: histogram(),
        errors: 0,
        misses: 0,
        calls: 0,
    }
}

impl Tally {
    /// Records call `n`, timed from `t0`: its latency, its failure, the shared progress.
    fn note(&mut self, ctx: &Ctx, n: usize, t0: Instant, r: Outcome) {
        let ns = t0.elapsed().as_nanos() as u64;
        self.hist.saturating_record(ns.max(1));
        self.calls += 1;
        match r {
            Ok(()) => {}
            Err(Missed::Miss) => self.misses += 1,
            Err(Missed::Failed) => {
                self.errors += 1;
                ctx.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if n % 64 == 63 {
            ctx.progress.fetch_add(64, Ordering::Relaxed);
        }
    }
}

/// Runs `callers` threads, each making its calls (paced by `pace(c)`) with the call
/// `make(c)` builds.
fn run_threads<F, C>(
    callers: usize,
    ctx: &Ctx,
    pace: impl Fn(usize, Instant) -> Pace + Sync,
    make: F,
) -> (Vec<Tally>, Duration, f64)
where
    F: Fn(usize) -> C,
    C: FnMut(Target<'_>, Call, &[u8], &mut Vec<u8>) -> Outcome + Send,
{
    let barrier = Barrier::new(callers + 1);
    let released = std::sync::OnceLock::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|c| {
                let mut call = make(c);
                let (barrier, pace, released) = (&barrier, &pace, &released);
                s.spawn(move || {
                    let mut t = tally();
                    let mut buf = Vec::with_capacity(ctx.value(0).len() + 64);
                    barrier.wait();
                    let pace = pace(c, *released.get().expect("set before the barrier"));
                    let mut n = 0;
                    while let Some(intended) = pace.intended(n) {
                        let t0 = match intended {
                            // Early: wait, and time from the start (the sleep's own lateness
                            // is the generator's, not the server's).
                            Some(at) if at > Instant::now() => {
                                std::thread::sleep(at - Instant::now());
                                Instant::now()
                            }
                            // Late (an earlier call ran past this one's start): from the
                            // intended start, so the backlog shows.
                            Some(at) => at,
                            None => Instant::now(),
                        };
                        let i = key_index(c, n, ctx.keys.len());
                        let r = call(
                            ctx.target(i),
                            call_of(ctx.workload, n),
                            ctx.value(i),
                            &mut buf,
                        );
                        t.note(ctx, n, t0, r);
                        n += 1;
                    }
                    t
                })
            })
            .collect();
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let _ = released.set(start);
        barrier.wait();
        let tallies: Vec<Tally> = handles
            .into_iter()
            .map(|h| h.join().expect("caller thread"))
            .collect();
        (tallies, start.elapsed(), cpu_seconds() - cpu0)
    })
}

/// Runs every caller as a tokio task on the runtime asked for.
fn run_async(
    spec: &SlapSpec,
    ctx: &Ctx,
    pace: impl Fn(usize, Instant) -> Pace,
    client: SharedClient,
) -> Result<(Vec<Tally>, Duration, f64), String> {
    let rt = match spec.runtime {
        Runtime::Current => tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build(),
        Runtime::Multi => tokio::runtime::Builder::new_multi_thread()
            .enable_time()
            .build(),
    }
    .map_err(|e| e.to_string())?;
    let callers = spec.callers;
    let r = rt.block_on(async {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let client = client.clone();
                let ctx = Ctx {
                    keys: Arc::clone(&ctx.keys),
                    counters: Arc::clone(&ctx.counters),
                    values: Arc::clone(&ctx.values),
                    verify: ctx.verify,
                    workload: ctx.workload,
                    progress: Arc::clone(&ctx.progress),
                    failures: Arc::clone(&ctx.failures),
                };
                let pace = pace(c, start);
                tokio::spawn(async move {
                    let mut t = tally();
                    let mut buf = Vec::with_capacity(ctx.value(0).len() + 64);
                    let mut n = 0;
                    while let Some(intended) = pace.intended(n) {
                        // As for threads: early calls wait and time from their start, late
                        // ones from their intended start.
                        let t0 = match intended {
                            Some(at) if at > Instant::now() => {
                                tokio::time::sleep_until(at.into()).await;
                                Instant::now()
                            }
                            Some(at) => at,
                            None => Instant::now(),
                        };
                        let i = key_index(c, n, ctx.keys.len());
                        let (k, value) = (ctx.target(i), ctx.value(i));
                        let r = match call_of(ctx.workload, n) {
                            Call::Get => {
                                let r = client.get_into_async(k.key, &mut buf).await;
                                check_hit(r, &buf, value)
                            }
                            Call::Set => client
                                .set_async(k.key, value, SetOptions::default())
                                .await
                                .map_err(failed),
                            Call::Delete => found(client.delete_async(k.key).await),
                            Call::Touch => found(client.touch_async(k.key, TOUCH_TTL).await),
                            Call::Incr => found(client.incr_async(k.counter, 1).await),
                        };
                        t.note(&ctx, n, t0, r);
                        n += 1;
                    }
                    t
                })
            })
            .collect();
        let mut tallies = Vec::with_capacity(callers);
        for t in tasks {
            tallies.push(t.await.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>((tallies, start.elapsed(), cpu_seconds() - cpu0))
    })?;
    Ok(r)
}
