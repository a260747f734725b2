//! `PgStorage` (#17's benchmarks), against a throwaway PostgreSQL and a real memcached:
//!
//! 1. Read latency (p50, p99) and throughput with 1 and 64 concurrent readers: PostgreSQL
//!    alone, through `MemcacheStorage` warm (hits), and cold (each read a miss that reads
//!    PostgreSQL and fills).
//! 2. Master reads per cold key when 64 readers ask for it at once (goal: 1).
//! 3. Write throughput: `MemcacheStorage` (content and outbox row in one transaction, then
//!    the cache delete and the row's removal) against `PgStorage` puts alone.
//!
//! Medians of `ROUNDS` runs. Run: `cargo bench --bench pg_storage` (needs PostgreSQL:
//! scripts/ensure-deps installs it; prints a Markdown table).

use mcstore_test_support as support;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mcstore::storage::{MemcacheStorage, PgStorage, ResourceInfo, Storage};
use mcstore::{Client, Pool};
use support::postgres::Postgres;
use support::Memcached;

const ROUNDS: usize = 5;
const RESOURCES: usize = 2_000;
const READS_PER_THREAD: usize = 2_000;

fn body(i: usize) -> String {
    format!("<entry id='{i}'>{}</entry>", "x".repeat(900))
}

struct Run {
    p50: f64,
    p99: f64,
    ops_per_s: f64,
}

/// `threads` readers, each reading `per_thread` resources (`pick` chooses which); every read
/// timed.
fn read_run(
    s: &(dyn Storage + Sync),
    infos: &[ResourceInfo],
    threads: usize,
    per_thread: usize,
    pick: impl Fn(usize, usize) -> usize + Sync,
) -> Run {
    let barrier = Barrier::new(threads);
    let start = Instant::now();
    let mut all: Vec<Duration> = thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, pick, infos) = (&barrier, &pick, infos);
                scope.spawn(move || {
                    barrier.wait();
                    (0..per_thread)
                        .map(|i| {
                            let info = &infos[pick(t, i) % infos.len()];
                            let t0 = Instant::now();
                            s.get_content(info).unwrap();
                            t0.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = start.elapsed();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    Run {
        p50: at(0.5),
        p99: at(0.99),
        ops_per_s: all.len() as f64 / wall.as_secs_f64(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cache(mc: &Memcached, master: Arc<dyn Storage>) -> MemcacheStorage {
    MemcacheStorage::new(
        Pool::new(Client::builder().server(mc.addr()), 64).unwrap(),
        master,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench --no-run` / test listing
    }
    let pg = Postgres::start();
    let mc = Memcached::start();
    let open = || PgStorage::builder(pg.url()).pool_size(64).open().unwrap();
    let direct = Arc::new(open());
    direct.create_container("bench").unwrap();
    let infos: Vec<ResourceInfo> = (0..RESOURCES)
        .map(|i| {
            let info = direct.info("bench", Some(&format!("r{i}"))).unwrap();
            direct.put_content(&info, body(i).as_str().into()).unwrap();
            info
        })
        .collect();

    println!(
        "PostgreSQL (throwaway cluster, fsync off) and memcached on loopback; {RESOURCES} resources \
         of ~920 bytes; medians of {ROUNDS} runs.\n"
    );
    println!("| reads | readers | p50 us | p99 us | reads/s | p50 vs PostgreSQL |");
    println!("|---|---|---|---|---|---|");
    for threads in [1usize, 64] {
        let per = if threads == 1 {
            READS_PER_THREAD * 4
        } else {
            READS_PER_THREAD / 8
        };
        let spread = |t: usize, i: usize| t * 7919 + i * 31;
        let mut rows: Vec<(&str, Vec<Run>)> = vec![
            ("PostgreSQL alone", vec![]),
            ("cache warm", vec![]),
            ("cache cold", vec![]),
        ];
        for round in 0..ROUNDS {
            rows[0]
                .1
                .push(read_run(direct.as_ref(), &infos, threads, per, spread));
            let warm = cache(&mc, direct.clone());
            for info in &infos {
                warm.get_content(info).unwrap();
            }
            rows[1]
                .1
                .push(read_run(&warm, &infos, threads, per, spread));
            // Cold: a fresh namespace of cache keys per round, each resource read once.
            let cold = MemcacheStorage::builder(
                Pool::new(Client::builder().server(mc.addr()), 64).unwrap(),
                direct.clone(),
            )
            .key_generator(prefixed(format!("r{round}t{threads}:")))
            .build();
            let n = (infos.len() / threads).max(1);
            rows[2]
                .1
                .push(read_run(&cold, &infos, threads, n.min(per), |t, i| {
                    t * n + i
                }));
        }
        let base = median(rows[0].1.iter().map(|r| r.p50).collect());
        for (name, runs) in &rows {
            let p50 = median(runs.iter().map(|r| r.p50).collect());
            let p99 = median(runs.iter().map(|r| r.p99).collect());
            let ops = median(runs.iter().map(|r| r.ops_per_s).collect());
            println!(
                "| {name} | {threads} | {p50:.0} | {p99:.0} | {ops:.0} | {:.2}x |",
                p50 / base
            );
        }
    }

    // 64 readers ask for the same cold key at once: how many master reads per key.
    let mut per_key = Vec::new();
    for round in 0..ROUNDS {
        let s = MemcacheStorage::builder(
            Pool::new(Client::builder().server(mc.addr()), 64).unwrap(),
            direct.clone(),
        )
        .key_generator(prefixed(format!("herd{round}:")))
        .build();
        let keys = 20;
        let before = s.counters().master_reads;
        for info in &infos[..keys] {
            let barrier = Barrier::new(64);
            thread::scope(|scope| {
                for _ in 0..64 {
                    let (s, barrier) = (&s, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        s.get_content(info).unwrap();
                    });
                }
            });
        }
        per_key.push((s.counters().master_reads - before) as f64 / keys as f64);
    }
    println!(
        "\nmaster reads per cold key, 64 readers at once: {:.2} (median of {ROUNDS} rounds of 20 keys; goal 1)",
        median(per_key)
    );

    // Writes: through the cache (outbox row in the same transaction, delete, row removed)
    // against PostgreSQL alone.
    println!("\n| writes | writers | writes/s | vs PostgreSQL alone |");
    println!("|---|---|---|---|");
    for writers in [1usize, 8] {
        let per = 1_000 / writers;
        let run = |s: &(dyn Storage + Sync)| -> f64 {
            let start = Instant::now();
            thread::scope(|scope| {
                for w in 0..writers {
                    let infos = &infos;
                    scope.spawn(move || {
                        for i in 0..per {
                            let info = &infos[(w * per + i) % infos.len()];
                            s.put_content(info, body(i).as_str().into()).unwrap();
                        }
                    });
                }
            });
            (writers * per) as f64 / start.elapsed().as_secs_f64()
        };
        let through = cache(&mc, direct.clone());
        let mut alone = Vec::new();
        let mut outbox = Vec::new();
        for _ in 0..ROUNDS {
            alone.push(run(direct.as_ref()));
            outbox.push(run(&through));
        }
        let (a, o) = (median(alone), median(outbox));
        println!("| PostgreSQL alone | {writers} | {a:.0} | 1.00x |");
        println!(
            "| through the cache, with the outbox | {writers} | {o:.0} | {:.2}x |",
            o / a
        );
    }
}

/// The default cache keys behind `prefix`: a fresh set of keys (a cold cache) per run.
fn prefixed(prefix: String) -> mcstore::storage::KeyGenerator {
    let default = mcstore::storage::KeyGenerator::default();
    mcstore::storage::KeyGenerator::new(move |c, r| format!("{prefix}{}", default.key(c, r)))
}
