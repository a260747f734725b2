//! `MemcacheStorage` under load (#16's two benchmarks), against a real memcached:
//!
//! 1. **Warm hits behind cold misses**: the latency of cache hits on one thread, alone, and
//!    while 32 threads read uncached resources from a master that takes 100 ms per read (a
//!    slow database). Hits must not queue behind the master reads.
//! 2. **A replay backlog**: the latency of cache hits while the storage replays 10,000
//!    invalidations left in an `FsStorage` master's log, against the same reads with nothing
//!    to replay.
//!
//! 3. **Warm reads by many threads**: 64 threads reading cached resources, through a `Pool` of
//!    8 clients, a `Pool` of 64, and one `SharedClient` (whose concurrent gets share
//!    multi-gets): reads/s and CPU per read.
//!
//! Each figure is the median of `ROUNDS` runs. Run: `cargo bench --bench storage` (starts
//! its own memcached on loopback; prints a Markdown table).

use mcstore_test_support as support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mcstore::storage::{
    Content, FsStorage, KeyGenerator, MemcacheStorage, MemoryStorage, Part, ResourceInfo,
    ResourceIter, Result, Storage,
};
use mcstore::{Client, Pool};
use support::{Memcached, TempDir};

const ROUNDS: usize = 5;
const HITS: usize = 20_000;
const COLD_READERS: usize = 32;
const MASTER_READ: Duration = Duration::from_millis(100);
const BACKLOG: usize = 10_000;

/// A master whose content reads in collection `cold` take [`MASTER_READ`] and return
/// made-up content (every name exists there, so each cold read is a fresh miss).
struct SlowMaster(MemoryStorage);

impl Storage for SlowMaster {
    fn create_container(&self, c: &str) -> Result<()> {
        self.0.create_container(c)
    }
    fn info(&self, c: &str, r: Option<&str>) -> Result<ResourceInfo> {
        self.0.info(c, r)
    }
    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        if info.collection == "cold" {
            thread::sleep(MASTER_READ);
            return Ok(Bytes::from_static(b"cold content"));
        }
        self.0.get(info, part)
    }
    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()> {
        self.0.put(info, part, data)
    }
    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()> {
        self.0.remove(info, part)
    }
    fn exists(&self, info: &ResourceInfo) -> Result<bool> {
        self.0.exists(info)
    }
    fn ls(&self, c: &str, e: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>> {
        self.0.ls(c, e)
    }
    fn ils(&self, c: &str, e: Option<&str>) -> Result<ResourceIter<'_>> {
        self.0.ils(c, e)
    }
    fn persist(&self, p: &[&str]) -> Result<()> {
        self.0.persist(p)
    }
    fn shutdown(&self) -> Result<()> {
        self.0.shutdown()
    }
}

fn pool(mc: &Memcached) -> Pool {
    Pool::new(Client::builder().server(mc.addr()), 8).unwrap()
}

/// Latency percentiles of one run, in microseconds.
#[derive(Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn lat(mut samples: Vec<Duration>) -> Lat {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q) as usize).min(samples.len() - 1);
        samples[i].as_secs_f64() * 1e6
    };
    Lat {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    }
}

/// Each field's median over the runs.
fn median(runs: &[Lat]) -> Lat {
    let m = |f: fn(&Lat) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Lat {
        p50: m(|l| l.p50),
        p99: m(|l| l.p99),
        p999: m(|l| l.p999),
        max: m(|l| l.max),
    }
}

/// Times `n` reads of `info`, each of which must hit.
fn hits(s: &MemcacheStorage, info: &ResourceInfo, n: usize) -> Vec<Duration> {
    let before = s.counters().hits;
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            let v = s.get_content(info).unwrap();
            let d = t.elapsed();
            assert_eq!(&v[..], b"warm");
            d
        })
        .collect();
    assert_eq!(s.counters().hits - before, n as u64, "every read a hit");
    samples
}

/// Fills the cache and opens the pool's connections.
fn warm_up(s: &MemcacheStorage, info: &ResourceInfo) {
    for _ in 0..100 {
        s.get_content(info).unwrap();
    }
}

fn warm_behind_cold(mc: &Memcached, round: usize) -> (Lat, Lat, u64) {
    let master = Arc::new(SlowMaster(MemoryStorage::new()));
    let s = Arc::new(MemcacheStorage::new(pool(mc), master));
    s.create_container("hot").unwrap();
    s.create_container("cold").unwrap();
    let warm = s.info("hot", Some("w")).unwrap();
    s.put_content(&warm, "warm".into()).unwrap();
    warm_up(&s, &warm);
    let alone = lat(hits(&s, &warm, HITS));
    let stop = Arc::new(AtomicBool::new(false));
    let cold: Vec<_> = (0..COLD_READERS)
        .map(|t| {
            let (s, stop) = (s.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let info = s.info("cold", Some(&format!("r{round}-{t}-{n}"))).unwrap();
                    assert_eq!(&s.get_content(&info).unwrap()[..], b"cold content");
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Every cold reader is inside a master read before the hits are timed.
    while s.counters().master_reads < COLD_READERS as u64 {
        thread::yield_now();
    }
    let behind = lat(hits(&s, &warm, HITS));
    stop.store(true, Ordering::Relaxed);
    let cold_reads: u64 = cold.into_iter().map(|t| t.join().unwrap()).sum();
    (alone, behind, cold_reads)
}

fn backlog(mc: &Memcached) -> (Lat, Lat, Duration) {
    let root = TempDir::new("mcstore-bench-backlog");
    let master = Arc::new(FsStorage::open(&root.path).unwrap());
    master.create_container("hot").unwrap();
    let quiet = {
        let s = MemcacheStorage::new(pool(mc), master.clone());
        let warm = s.info("hot", Some("w")).unwrap();
        s.put_content(&warm, "warm".into()).unwrap();
        warm_up(&s, &warm);
        lat(hits(&s, &warm, HITS))
    };
    // 10,000 failed invalidations of other resources, as a crashed process would leave them;
    // then a storage that finds them when it starts.
    let log = master.invalidation_log().unwrap();
    let keys = KeyGenerator::default();
    for i in 0..BACKLOG {
        log.record(&format!("{}:c", keys.key("hot", Some(&format!("gone{i}")))))
            .unwrap();
    }
    let t = Instant::now();
    let s = MemcacheStorage::new(pool(mc), master.clone());
    let warm = s.info("hot", Some("w")).unwrap();
    warm_up(&s, &warm);
    let mut samples = Vec::new();
    while s.counters().replayed < BACKLOG as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backlog was not replayed: {:?}",
            s.counters()
        );
        samples.extend(hits(&s, &warm, 100));
    }
    // The last batch's records are removed after it is counted.
    while !log.pending(1).unwrap().is_empty() {
        samples.extend(hits(&s, &warm, 100));
    }
    let drained = t.elapsed();
    assert!(samples.len() >= 1000, "too few reads during the replay");
    (quiet, lat(samples), drained)
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable `struct rusage` for getrusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |tv: &libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(&r.ru_utime) + t(&r.ru_stime)
}

const READERS: usize = 64;

/// Warm reads by [`READERS`] threads through `cache`: (reads/s, CPU us per read).
fn many_readers(cache: mcstore::storage::CacheClients, reads: usize) -> (f64, f64) {
    let s = MemcacheStorage::new(cache, Arc::new(MemoryStorage::new()));
    s.create_container("warm").unwrap();
    let infos: Vec<ResourceInfo> = (0..100)
        .map(|i| s.info("warm", Some(&format!("r{i}"))).unwrap())
        .collect();
    for i in &infos {
        s.put_content(i, "warm content".into()).unwrap();
        s.get_content(i).unwrap(); // cached
    }
    let per = reads / READERS;
    let barrier = std::sync::Barrier::new(READERS + 1);
    let (wall, cpu) = thread::scope(|scope| {
        for t in 0..READERS {
            let (s, infos, barrier) = (&s, &infos, &barrier);
            scope.spawn(move || {
                barrier.wait();
                for n in 0..per {
                    let v = s.get_content(&infos[(t * 7 + n) % infos.len()]).unwrap();
                    assert_eq!(&v[..], b"warm content");
                }
            });
        }
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        barrier.wait();
        // Joined when the scope ends.
        (t0, cpu0)
    });
    let (elapsed, used) = (wall.elapsed(), cpu_seconds() - cpu);
    let n = (per * READERS) as f64;
    (n / elapsed.as_secs_f64(), used * 1e6 / n)
}

/// Writes and warm hits of 100 resources through a storage over three servers (an in-memory
/// master: the cache's share of a write shows), built to follow list changes or not (#28):
/// `(puts, hits)` latencies.
fn follow_cost(ms: &[Memcached], follow: bool, n: usize) -> (Lat, Lat) {
    let b = Client::builder()
        .servers(ms.iter().map(Memcached::addr))
        .distribution(mcstore::ring::Distribution::Ketama);
    let master: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let builder = MemcacheStorage::builder(Pool::new(b, 8).unwrap(), master);
    let s = match follow {
        true => builder.follow_list(Duration::from_secs(1)).build(),
        false => builder.build(),
    };
    s.create_container("c").unwrap();
    let infos: Vec<ResourceInfo> = (0..100)
        .map(|i| s.info("c", Some(&format!("r{i}"))).unwrap())
        .collect();
    let mut puts = Vec::with_capacity(n);
    for k in 0..n {
        let t = Instant::now();
        s.put_content(&infos[k % infos.len()], "warm".into())
            .unwrap();
        puts.push(t.elapsed());
    }
    for info in &infos {
        warm_up(&s, info);
    }
    let mut gets = Vec::with_capacity(n);
    for k in 0..n {
        let t = Instant::now();
        s.get_content(&infos[k % infos.len()]).unwrap();
        gets.push(t.elapsed());
    }
    (lat(puts), lat(gets))
}

fn row(name: &str, l: &Lat, vs: Option<&Lat>) {
    let ratio = vs.map_or(String::new(), |b| format!("{:.2}x", l.p99 / b.p99));
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {ratio} |",
        l.p50, l.p99, l.p999, l.max
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a quick check.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { ROUNDS };
    let mc = Memcached::start();
    let (mut alone, mut behind, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b, c) = warm_behind_cold(&mc, round);
        alone.push(a);
        behind.push(b);
        cold.push(c);
    }
    let (mut quiet, mut during, mut drains) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (q, d, drained) = backlog(&mc);
        quiet.push(q);
        during.push(d);
        drains.push(drained);
    }
    let reads = if quick { 6_400 } else { 200_000 };
    let mut readers: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("Pool of 8 clients", Vec::new()),
        ("Pool of 64 clients", Vec::new()),
        ("SharedClient", Vec::new()),
    ];
    for _ in 0..rounds {
        for (name, runs) in readers.iter_mut() {
            let b = Client::builder().server(mc.addr());
            let cache: mcstore::storage::CacheClients = match *name {
                "Pool of 8 clients" => Pool::new(b, 8).unwrap().into(),
                "Pool of 64 clients" => Pool::new(b, 64).unwrap().into(),
                _ => b.shared().build().unwrap().into(),
            };
            runs.push(many_readers(cache, reads));
        }
    }
    let three: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let n = if quick { 500 } else { HITS };
    let mut follows: [Vec<(Lat, Lat)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (k, runs) in follows.iter_mut().enumerate() {
            runs.push(follow_cost(&three, k == 1, n));
        }
    }
    drains.sort();
    cold.sort_unstable();
    let (alone, behind, quiet, during) = (
        median(&alone),
        median(&behind),
        median(&quiet),
        median(&during),
    );
    println!(
        "MemcacheStorage warm hits (us, median of {rounds} runs of {HITS} hits; 8 pooled clients)"
    );
    println!();
    println!("| reads | p50 | p99 | p99.9 | max | p99 vs alone |");
    println!("|---|---|---|---|---|---|");
    row("warm hits, alone", &alone, None);
    row(
        &format!("warm hits, {COLD_READERS} cold misses reading a 100 ms master"),
        &behind,
        Some(&alone),
    );
    row("warm hits, nothing to replay", &quiet, None);
    row(
        &format!("warm hits, while {BACKLOG} invalidations are replayed"),
        &during,
        Some(&quiet),
    );
    println!();
    println!(
        "cold reads completed during the hits (median): {}; backlog drained in {:?} (median)",
        cold[cold.len() / 2],
        drains[drains.len() / 2]
    );
    println!(
        "max added to a single read by the replay: {:.1} us (max during - max without)",
        (during.max - quiet.max).max(0.0)
    );
    println!();
    println!("Warm reads by {READERS} threads (median of {rounds} runs of {reads} reads)");
    println!();
    println!("| cache clients | reads/s | CPU us/read | reads/s vs Pool of 8 |");
    println!("|---|---|---|---|");
    let med = |v: &mut Vec<(f64, f64)>| {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let base = med(&mut readers[0].1).0;
    for (name, runs) in readers.iter_mut() {
        let (rate, cpu) = med(runs);
        println!("| {name} | {rate:.0} | {cpu:.2} | {:.2}x |", rate / base);
    }
    println!();
    println!(
        "A storage that follows list changes (follow_list, #28) against one that does not: \
         three servers, 100 resources, an in-memory master (us, median of {rounds} runs of {n})"
    );
    println!();
    println!("| calls | p50 | p99 | p99.9 | max | p99 vs not following |");
    println!("|---|---|---|---|---|---|");
    let puts: Vec<[Lat; 2]> = (0..2)
        .map(|k| {
            let r = &follows[k];
            let p: Vec<Lat> = r.iter().map(|x| x.0).collect();
            let g: Vec<Lat> = r.iter().map(|x| x.1).collect();
            [median(&p), median(&g)]
        })
        .collect();
    row("puts, not following", &puts[0][0], None);
    row("puts, follow_list", &puts[1][0], Some(&puts[0][0]));
    row("warm hits, not following", &puts[0][1], None);
    row("warm hits, follow_list", &puts[1][1], Some(&puts[0][1]));
    println!(
        "p50 ratio: puts {:.2}x, warm hits {:.2}x",
        puts[1][0].p50 / puts[0][0].p50,
        puts[1][1].p50 / puts[0][1].p50
    );
}
