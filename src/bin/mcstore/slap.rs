//! `mcstore slap`: a concurrent load generator (as libmemcached's memaslap). Many callers
//! (threads, or tokio tasks) share one client; each call's latency goes to a histogram; the
//! run ends with one machine-readable RESULT line that `scripts/bench-compare` reads.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mcstore::{ClientBuilder, Pool, SetOptions, SharedClient};

/// What `mcstore slap` was asked to do.
pub struct SlapSpec {
    pub workload: String,
    pub callers: usize,
    pub ops: usize,
    pub keys: usize,
    pub value_bytes: usize,
    pub mode: Mode,
    pub runtime: Runtime,
    pub client: Which,
    pub io_mode: IoModeArg,
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
}

/// The call a caller makes for its `n`-th operation: a set every tenth call in `mix`.
fn is_set(w: Workload, n: usize) -> bool {
    match w {
        Workload::Get => false,
        Workload::Set => true,
        Workload::Mix => n % 10 == 9,
    }
}

pub fn run(builder: ClientBuilder, spec: &SlapSpec, proto: &str) -> Result<(), String> {
    let workload = match spec.workload.as_str() {
        "get" => Workload::Get,
        "set" => Workload::Set,
        "mix" => Workload::Mix,
        w => return Err(format!("unknown workload {w:?}; one of get, set, mix")),
    };
    if spec.callers == 0 || spec.keys == 0 {
        return Err("--callers and -k must be at least 1".into());
    }
    if spec.client != Which::Shared && spec.mode == Mode::Async {
        return Err("--client pool and plain run threads only (no async calls)".into());
    }
    if spec.client == Which::Plain && spec.callers != 1 {
        return Err("--client plain is one Client for one caller (--callers 1)".into());
    }
    let err = |e: mcstore::Error| e.to_string();
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..spec.keys)
            .map(|i| format!("key:{i}").into_bytes())
            .collect(),
    );
    let value = Arc::new(vec![b'v'; spec.value_bytes]);

    // Preload, untimed: every key the gets read.
    let mut loader = builder.clone().build().map_err(err)?;
    for chunk in keys.chunks(1000) {
        let mut p = loader.pipeline();
        for k in chunk {
            p.set(k, &value, SetOptions::default()).map_err(err)?;
        }
        let r = p.finish().map_err(err)?;
        if r.errors > 0 {
            return Err(format!("preload: {:?}", r.first_error));
        }
    }
    drop(loader);

    let progress = Arc::new(AtomicUsize::new(0));
    let bar = std::io::stdout().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(spec.ops as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} ops {per_sec} eta {eta}")
                .expect("valid template"),
        );
        b
    });
    let ticker = bar.as_ref().map(|b| {
        let (b, progress) = (b.clone(), Arc::clone(&progress));
        let total = spec.ops;
        std::thread::spawn(move || loop {
            let n = progress.load(Ordering::Relaxed);
            b.set_position(n as u64);
            if n >= total {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        })
    });

    let share = |c: usize| spec.ops / spec.callers + usize::from(c < spec.ops % spec.callers);
    let ctx = Ctx {
        keys,
        value,
        workload,
        progress: Arc::clone(&progress),
    };
    let (tallies, wall, cpu) = match (spec.client, spec.mode) {
        (Which::Pool, _) => {
            let pool = Pool::new(builder, spec.callers).map_err(err)?;
            run_threads(spec.callers, &ctx, share, move |_| {
                let pool = pool.clone();
                move |key: &[u8], set: bool, value: &[u8], buf: &mut Vec<u8>| {
                    let mut c = pool.get().map_err(drop)?;
                    call_client(&mut c, key, set, value, buf)
                }
            })
        }
        (Which::Plain, _) => {
            let client = std::sync::Mutex::new(Some(builder.build().map_err(err)?));
            run_threads(1, &ctx, share, move |_| {
                let mut c = client.lock().unwrap().take().expect("one caller");
                move |key: &[u8], set: bool, value: &[u8], buf: &mut Vec<u8>| {
                    call_client(&mut c, key, set, value, buf)
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
                .build()
                .map_err(err)?;
            // Warm-up: connections open, buffers grown.
            let mut buf = Vec::new();
            for k in ctx.keys.iter().take(100) {
                client.get_into(k, &mut buf).map_err(err)?;
            }
            match mode {
                Mode::Threads => run_threads(spec.callers, &ctx, share, move |_| {
                    let client = client.clone();
                    move |key: &[u8], set: bool, value: &[u8], buf: &mut Vec<u8>| {
                        call_shared(&client, key, set, value, buf)
                    }
                }),
                Mode::Async => run_async(spec, &ctx, share, client)?,
            }
        }
    };
    progress.store(spec.ops, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    let mut all = histogram();
    let mut errors = 0;
    for t in &tallies {
        all.add(&t.hist).expect("same bounds");
        errors += t.errors;
    }
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "callers {}, {} ops, {} errors",
        spec.callers, spec.ops, errors
    );
    println!("latency per call (us):");
    println!("  p50    {:>10.1}", us(0.5));
    println!("  p90    {:>10.1}", us(0.9));
    println!("  p99    {:>10.1}", us(0.99));
    println!("  p99.9  {:>10.1}", us(0.999));
    println!("  max    {:>10.1}", all.max() as f64 / 1000.0);
    let client = match spec.client {
        Which::Shared => "mcstore",
        Which::Pool => "mcstore-pool",
        Which::Plain => "mcstore-client",
    };
    let w = match workload {
        Workload::Get => "get_concurrent",
        Workload::Set => "set_concurrent",
        Workload::Mix => "mix_concurrent",
    };
    let wall_s = wall.as_secs_f64();
    println!(
        "RESULT client={client} proto={proto} workload={w} callers={} ops={} wall_s={wall_s:.6} \
         ops_per_s={:.1} cpu_us_per_op={:.4} p50_us={:.1} p99_us={:.1}",
        spec.callers,
        spec.ops,
        spec.ops as f64 / wall_s,
        cpu * 1e6 / spec.ops as f64,
        us(0.5),
        us(0.99),
    );
    if errors > 0 {
        return Err(format!("{errors} calls failed"));
    }
    Ok(())
}

/// What every caller shares.
struct Ctx {
    keys: Arc<Vec<Vec<u8>>>,
    value: Arc<Vec<u8>>,
    workload: Workload,
    progress: Arc<AtomicUsize>,
}

fn call_shared(
    c: &SharedClient,
    key: &[u8],
    set: bool,
    value: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    if set {
        c.set(key, value, SetOptions::default()).map_err(drop)
    } else {
        check_hit(c.get_into(key, buf), buf, value)
    }
}

fn call_client(
    c: &mut mcstore::Client,
    key: &[u8],
    set: bool,
    value: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    if set {
        c.set(key, value, SetOptions::default()).map_err(drop)
    } else {
        check_hit(c.get_into(key, buf), buf, value)
    }
}

/// A get must find the preloaded value (or one a set wrote: the same bytes).
fn check_hit(
    r: mcstore::Result<Option<mcstore::ItemInfo>>,
    buf: &[u8],
    value: &[u8],
) -> Result<(), ()> {
    match r {
        Ok(Some(_)) if buf == value => Ok(()),
        _ => Err(()),
    }
}

/// Runs `callers` threads, each making its share of calls with the call `make(c)` builds.
fn run_threads<F, C>(
    callers: usize,
    ctx: &Ctx,
    share: impl Fn(usize) -> usize + Sync,
    make: F,
) -> (Vec<Tally>, Duration, f64)
where
    F: Fn(usize) -> C,
    C: FnMut(&[u8], bool, &[u8], &mut Vec<u8>) -> Result<(), ()> + Send,
{
    let barrier = Barrier::new(callers + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|c| {
                let mut call = make(c);
                let (barrier, share) = (&barrier, &share);
                s.spawn(move || {
                    let mut t = Tally {
                        hist: histogram(),
                        errors: 0,
                    };
                    let mut buf = Vec::with_capacity(ctx.value.len() + 64);
                    let n_ops = share(c);
                    barrier.wait();
                    for n in 0..n_ops {
                        let key = &ctx.keys[key_index(c, n, ctx.keys.len())];
                        let t0 = Instant::now();
                        let r = call(key, is_set(ctx.workload, n), &ctx.value, &mut buf);
                        let ns = t0.elapsed().as_nanos() as u64;
                        t.hist.saturating_record(ns.max(1));
                        t.errors += usize::from(r.is_err());
                        if n % 64 == 63 {
                            ctx.progress.fetch_add(64, Ordering::Relaxed);
                        }
                    }
                    t
                })
            })
            .collect();
        let cpu0 = cpu_seconds();
        let start = Instant::now();
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
    share: impl Fn(usize) -> usize,
    client: SharedClient,
) -> Result<(Vec<Tally>, Duration, f64), String> {
    let rt = match spec.runtime {
        Runtime::Current => tokio::runtime::Builder::new_current_thread().build(),
        Runtime::Multi => tokio::runtime::Builder::new_multi_thread().build(),
    }
    .map_err(|e| e.to_string())?;
    let callers = spec.callers;
    let r = rt.block_on(async {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let client = client.clone();
                let keys = Arc::clone(&ctx.keys);
                let value = Arc::clone(&ctx.value);
                let progress = Arc::clone(&ctx.progress);
                let (workload, n_ops) = (ctx.workload, share(c));
                tokio::spawn(async move {
                    let mut t = Tally {
                        hist: histogram(),
                        errors: 0,
                    };
                    let mut buf = Vec::with_capacity(value.len() + 64);
                    for n in 0..n_ops {
                        let key = &keys[key_index(c, n, keys.len())];
                        let t0 = Instant::now();
                        let r = if is_set(workload, n) {
                            client
                                .set_async(key, &value, SetOptions::default())
                                .await
                                .map_err(drop)
                        } else {
                            let r = client.get_into_async(key, &mut buf).await;
                            check_hit(r, &buf, &value)
                        };
                        let ns = t0.elapsed().as_nanos() as u64;
                        t.hist.saturating_record(ns.max(1));
                        t.errors += usize::from(r.is_err());
                        if n % 64 == 63 {
                            progress.fetch_add(64, Ordering::Relaxed);
                        }
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
