//! Values as services store them (#30), against a real memcached (and PostgreSQL for the last
//! table):
//!
//! 1. **Codecs on a document corpus**: JSON and Atom (XML) entries of 1, 10, 50 and 200 KB,
//!    generated from a fixed vocabulary (so their redundancy is a prose document's, not a
//!    repeated string's). For none, lz4, zstd 1, zstd 3 and zstd 3 with a dictionary trained on
//!    other entries: the compression ratio, and encode and decode CPU per value.
//! 2. **Through `Client`**: set and get latency (p50, p99) of those documents with each
//!    compression (typed calls, `Compressed<Raw>`), bytes stored.
//! 3. **Through `MemcacheStorage`**: warm reads and puts of the documents of 10 KB and more
//!    (a `MemoryStorage` master, so that the cache's part shows), without compression, with
//!    lz4 and with zstd 1; the bytes each keeps in memcached.
//! 4. **4 MiB values**: read from chunks through `MemcacheStorage` (`chunked_values`) against
//!    the same values read from a PostgreSQL master (`PgStorage` alone, and the storage
//!    without chunks, which reads the master every time).
//!
//! Medians of `ROUNDS` runs. Run: `cargo bench --bench values --features serde,compression,postgres`
//! (prints Markdown tables; BENCHMARKS.md has the figures).

use mcstore_test_support as support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::codec::{Codec, Compressed, Compression, Compressor, Raw, ZstdDictionary};
use mcstore::storage::{MemcacheStorage, MemoryStorage, PgStorage, Storage};
use mcstore::SetOptions;
use support::Memcached;

const ROUNDS: usize = 5;

/// Words for the documents: prose-like redundancy.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "cache",
    "memcached",
    "server",
    "storage",
    "latency",
    "request",
    "resource",
    "document",
    "entry",
    "system",
    "network",
    "client",
    "value",
    "update",
    "release",
    "version",
    "performance",
    "database",
    "replica",
    "cluster",
    "region",
    "service",
    "deploy",
    "config",
    "metric",
    "throughput",
    "connection",
    "protocol",
    "binary",
    "text",
    "meta",
    "lease",
    "invalidate",
    "stale",
    "fresh",
    "write",
    "read",
    "million",
    "thousand",
    "percent",
    "engineer",
    "team",
    "morning",
    "evening",
    "report",
    "quarter",
    "growth",
    "market",
    "customer",
    "product",
    "design",
    "review",
    "feature",
    "issue",
    "bug",
    "fix",
    "test",
    "build",
    "pipeline",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn word(&mut self) -> &'static str {
        WORDS[(self.next() % WORDS.len() as u64) as usize]
    }
    fn sentence(&mut self) -> String {
        let n = 6 + self.next() % 14;
        let mut s: String = (0..n).map(|_| self.word()).collect::<Vec<_>>().join(" ");
        s.push('.');
        s
    }
    fn paragraph(&mut self, bytes: usize) -> String {
        let mut p = String::new();
        while p.len() < bytes {
            p.push_str(&self.sentence());
            p.push(' ');
        }
        p
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Json,
    Atom,
}

/// One entry of about `size` bytes.
fn document(kind: Kind, size: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let title = r.sentence();
    let author = format!("{} {}", r.word(), r.word());
    let id = r.next();
    let summary = r.paragraph(200);
    let overhead = 600;
    let content = r.paragraph(size.saturating_sub(overhead).max(100));
    let tags: Vec<&str> = (0..4).map(|_| r.word()).collect();
    match kind {
        Kind::Json => format!(
            "{{\"id\":\"urn:uuid:{id:016x}\",\"title\":{title:?},\"author\":{{\"name\":{author:?},\"email\":\"{}@example.org\"}},\"updated\":\"2026-12-0{}T10:{:02}:00Z\",\"tags\":{tags:?},\"links\":[{{\"rel\":\"alternate\",\"href\":\"https://example.org/entries/{id}\"}}],\"summary\":{summary:?},\"content\":{content:?}}}",
            author.replace(' ', "."),
            1 + r.next() % 9,
            r.next() % 60,
        )
        .into_bytes(),
        Kind::Atom => format!(
            "<entry xmlns=\"http://www.w3.org/2005/Atom\"><id>urn:uuid:{id:016x}</id><title type=\"text\">{title}</title><author><name>{author}</name></author><updated>2026-12-0{}T10:{:02}:00Z</updated>{}<link rel=\"alternate\" href=\"https://example.org/entries/{id}\"/><summary>{summary}</summary><content type=\"html\">&lt;p&gt;{content}&lt;/p&gt;</content></entry>",
            1 + r.next() % 9,
            r.next() % 60,
            tags.iter().map(|t| format!("<category term=\"{t}\"/>")).collect::<String>(),
        )
        .into_bytes(),
    }
}

const SIZES: [usize; 4] = [1 << 10, 10 << 10, 50 << 10, 200 << 10];
const DOCS_PER_CLASS: usize = 20;

fn corpus(kind: Kind, size: usize) -> Vec<Vec<u8>> {
    (0..DOCS_PER_CLASS as u64)
        .map(|i| document(kind, size, 1000 + i + size as u64))
        .collect()
}

fn algos(dict: &Arc<ZstdDictionary>) -> Vec<(&'static str, Compressor)> {
    let c = |a| Compressor::new(a).min_size(0);
    vec![
        ("none", Compressor::default()),
        ("lz4", c(Compression::Lz4)),
        ("zstd 1", c(Compression::Zstd { level: 1 })),
        ("zstd 3", c(Compression::Zstd { level: 3 })),
        (
            "zstd 3 + dict",
            c(Compression::ZstdDict {
                level: 3,
                dict: dict.clone(),
            }),
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

/// p50 and p99 (µs) of `n` timed calls of `f`.
fn timed(n: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    let mut t: Vec<Duration> = (0..n)
        .map(|i| {
            let t0 = Instant::now();
            f(i);
            t0.elapsed()
        })
        .collect();
    t.sort();
    (pct(&t, 0.5), pct(&t, 0.99))
}

/// Medians over rounds of `(p50, p99)`.
fn rounds(mut f: impl FnMut() -> (f64, f64)) -> (f64, f64) {
    let r: Vec<(f64, f64)> = (0..ROUNDS).map(|_| f()).collect();
    (
        median(r.iter().map(|x| x.0).collect()),
        median(r.iter().map(|x| x.1).collect()),
    )
}

fn codec_table(dict: &Arc<ZstdDictionary>) {
    println!("\n### 1. Codecs on the corpus (ratio = original / stored; CPU per value, median of {ROUNDS} rounds)\n");
    println!("| documents | codec | ratio | encode us | decode us | encode MB/s | decode MB/s |");
    println!("|---|---|---|---|---|---|---|");
    for kind in [Kind::Json, Kind::Atom] {
        for size in SIZES {
            let docs = corpus(kind, size);
            let total: usize = docs.iter().map(Vec::len).sum();
            for (name, c) in algos(dict) {
                let codec = Compressed::new(Raw, c);
                let mut stored = 0;
                let mut packed: Vec<(Vec<u8>, u32)> = Vec::new();
                for d in &docs {
                    let mut out = Vec::new();
                    let f = codec.encode(d, &mut out).unwrap();
                    stored += out.len();
                    packed.push((out, f));
                }
                // Enough repetitions for about 20 ms per round.
                let reps = (2_000_000 / total).clamp(1, 200);
                let enc = median(
                    (0..ROUNDS)
                        .map(|_| {
                            let t0 = Instant::now();
                            for _ in 0..reps {
                                for d in &docs {
                                    let mut out = Vec::new();
                                    black_box(codec.encode(d, &mut out).unwrap());
                                }
                            }
                            t0.elapsed().as_secs_f64() / (reps * docs.len()) as f64
                        })
                        .collect(),
                );
                let dec = median(
                    (0..ROUNDS)
                        .map(|_| {
                            let t0 = Instant::now();
                            for _ in 0..reps {
                                for (p, f) in &packed {
                                    black_box(codec.decode(p, *f).unwrap());
                                }
                            }
                            t0.elapsed().as_secs_f64() / (reps * docs.len()) as f64
                        })
                        .collect(),
                );
                let per = total as f64 / docs.len() as f64;
                println!(
                    "| {} {} KB | {name} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} |",
                    if kind == Kind::Json { "JSON" } else { "Atom" },
                    size >> 10,
                    total as f64 / stored as f64,
                    enc * 1e6,
                    dec * 1e6,
                    per / enc / 1e6,
                    per / dec / 1e6,
                );
            }
        }
    }
}

fn client_table(mc: &Memcached, dict: &Arc<ZstdDictionary>) {
    println!("\n### 2. Through `Client` (typed calls, `Compressed<Raw>`; one server on loopback; median of {ROUNDS} rounds of 2,000 calls)\n");
    println!(
        "| documents | codec | set p50 us | set p99 us | get p50 us | get p99 us | bytes stored |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut c = support::client_builder().server(mc.addr()).build().unwrap();
    for size in SIZES {
        let docs: Vec<Vec<u8>> = corpus(Kind::Json, size)
            .into_iter()
            .chain(corpus(Kind::Atom, size))
            .collect();
        for (name, comp) in algos(dict) {
            if name == "zstd 3" {
                continue;
            }
            let codec = Compressed::new(Raw, comp);
            let keys: Vec<String> = (0..docs.len()).map(|i| format!("v:{size}:{i}")).collect();
            let set = rounds(|| {
                timed(2000, |i| {
                    let k = i % docs.len();
                    c.set_as(&codec, keys[k].as_bytes(), &docs[k], SetOptions::default())
                        .unwrap()
                })
            });
            let get = rounds(|| {
                timed(2000, |i| {
                    let k = i % docs.len();
                    black_box(c.get_as(&codec, keys[k].as_bytes()).unwrap().unwrap());
                })
            });
            let stored: usize = keys
                .iter()
                .map(|k| c.get(k.as_bytes()).unwrap().unwrap().value.len())
                .sum();
            println!(
                "| {} KB | {name} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                size >> 10,
                set.0,
                set.1,
                get.0,
                get.1,
                stored
            );
        }
    }
}

/// Bytes memcached holds (its `bytes` statistic).
fn cache_bytes(mc: &Memcached) -> u64 {
    mc.client().stats(None).unwrap()[0]
        .get("bytes")
        .unwrap()
        .parse()
        .unwrap()
}

fn storage_table() {
    println!("\n### 3. Through `MemcacheStorage` (documents of 10 KB and more, JSON and Atom; a `MemoryStorage` master; median of {ROUNDS} rounds of 2,000 calls)\n");
    println!("| documents | compression | warm read p50 us | p99 us | p50 vs none | put p50 us | put p99 us | bytes in memcached | fewer bytes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for size in &SIZES[1..] {
        let docs: Vec<Vec<u8>> = corpus(Kind::Json, *size)
            .into_iter()
            .chain(corpus(Kind::Atom, *size))
            .collect();
        let mut base: Option<(f64, u64)> = None;
        for (name, algo) in [
            ("none", None),
            ("lz4", Some(Compression::Lz4)),
            ("zstd 1", Some(Compression::Zstd { level: 1 })),
        ] {
            let mc = Memcached::start();
            let pool = mcstore::Pool::new(support::client_builder().server(mc.addr()), 4).unwrap();
            let mut b = MemcacheStorage::builder(pool, Arc::new(MemoryStorage::new()));
            if let Some(a) = algo {
                b = b.compression(Compressor::new(a));
            }
            let s = b.build();
            s.create_container("docs").unwrap();
            let infos: Vec<_> = (0..docs.len())
                .map(|i| s.info("docs", Some(&format!("d{i}"))).unwrap())
                .collect();
            for (info, d) in infos.iter().zip(&docs) {
                s.put_content(info, d.into()).unwrap();
                s.get_content(info).unwrap();
            }
            let bytes = cache_bytes(&mc);
            let warm = rounds(|| {
                timed(2000, |i| {
                    black_box(s.get_content(&infos[i % infos.len()]).unwrap());
                })
            });
            let put = rounds(|| {
                timed(2000, |i| {
                    let k = i % infos.len();
                    s.put_content(&infos[k], (&docs[k]).into()).unwrap()
                })
            });
            let (vs, fewer) = match base {
                None => {
                    base = Some((warm.0, bytes));
                    ("1.00x".to_string(), "1.00x".to_string())
                }
                Some((p50, b)) => (
                    format!("{:.2}x", warm.0 / p50),
                    format!("{:.2}x", b as f64 / bytes as f64),
                ),
            };
            println!(
                "| {} KB | {name} | {:.1} | {:.1} | {vs} | {:.1} | {:.1} | {bytes} | {fewer} |",
                size >> 10,
                warm.0,
                warm.1,
                put.0,
                put.1
            );
        }
    }
}

fn chunked_table() {
    println!("\n### 4. 4 MiB values (random bytes: no compression; memcached `-I 1m`; median of {ROUNDS} rounds of 50 reads)\n");
    println!("| read | p50 ms | p99 ms | p50 vs PostgreSQL |");
    println!("|---|---|---|---|");
    let pg = support::postgres::Postgres::start();
    let mc = Memcached::with_args(&["-I", "1m", "-m", "256"]);
    let master: Arc<dyn Storage> = Arc::new(PgStorage::builder(pg.url()).open().unwrap());
    let pool = || {
        mcstore::Pool::new(
            support::client_builder()
                .server(mc.addr())
                .max_value_size(1 << 20),
            4,
        )
        .unwrap()
    };
    let chunked = MemcacheStorage::builder(pool(), master.clone())
        .chunked_values(64 << 20)
        .build();
    // Its own memcached: its "read the master" markers would keep the other from filling.
    let mc2 = Memcached::with_args(&["-I", "1m", "-m", "256"]);
    let plain = MemcacheStorage::new(
        mcstore::Pool::new(support::client_builder().server(mc2.addr()), 4).unwrap(),
        master.clone(),
    );
    chunked.create_container("big").unwrap();
    let mut r = Rng(7);
    let values: Vec<Vec<u8>> = (0..4)
        .map(|_| (0..4 << 20).map(|_| r.next() as u8).collect())
        .collect();
    let infos: Vec<_> = (0..values.len())
        .map(|i| chunked.info("big", Some(&format!("b{i}"))).unwrap())
        .collect();
    for (info, v) in infos.iter().zip(&values) {
        chunked.put_content(info, v.into()).unwrap();
    }
    // Filled once each (a read right after a put may skip the cache while PostgreSQL's
    // invalidation is in flight).
    for _ in 0..200 {
        for (info, v) in infos.iter().zip(&values) {
            assert!(chunked.get_content(info).unwrap()[..] == v[..]);
        }
        if chunked.counters().chunked_fills >= values.len() as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = 50;
    let pg_read = rounds(|| {
        timed(n, |i| {
            black_box(master.get_content(&infos[i % infos.len()]).unwrap());
        })
    });
    let through = rounds(|| {
        timed(n, |i| {
            black_box(plain.get_content(&infos[i % infos.len()]).unwrap());
        })
    });
    let chunks = rounds(|| {
        timed(n, |i| {
            black_box(chunked.get_content(&infos[i % infos.len()]).unwrap());
        })
    });
    let c = chunked.counters();
    assert!(c.chunked_hits >= (ROUNDS * n) as u64, "{c:?}");
    let mut c = support::client_builder().server(mc.addr()).build().unwrap();
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        c.set_chunked(format!("raw{i}").as_bytes(), v, SetOptions::default())
            .unwrap();
    }
    let client = rounds(|| {
        timed(n, |i| {
            c.get_chunked(format!("raw{}", i % values.len()).as_bytes(), &mut out)
                .unwrap()
                .unwrap();
        })
    });
    for (name, (p50, p99)) in [
        ("PostgreSQL master (`PgStorage::get_content`)", pg_read),
        (
            "`MemcacheStorage` without chunks (reads the master)",
            through,
        ),
        (
            "`MemcacheStorage` with `chunked_values` (warm: 5 chunks)",
            chunks,
        ),
        ("`Client::get_chunked` (index, then one multi-get)", client),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2}x faster |",
            p50 / 1000.0,
            p99 / 1000.0,
            pg_read.0 / p50
        );
    }
}

fn main() {
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let want = |t: &str| only.as_deref().is_none_or(|o| o == t);
    let samples: Vec<Vec<u8>> = (0..500)
        .flat_map(|i| [document(Kind::Json, 1024, i), document(Kind::Atom, 1024, i)])
        .collect();
    let dict = Arc::new(ZstdDictionary::train(&samples, 32 * 1024).unwrap());
    if want("codecs") {
        codec_table(&dict);
    }
    if want("client") {
        let mc = Memcached::start();
        client_table(&mc, &dict);
    }
    if want("storage") {
        storage_table();
    }
    if want("chunked") {
        chunked_table();
    }
}
