//! Micro-benchmarks of the sans-IO parts: text reply parsing, key validation, hash functions,
//! `Continuum::pick`. Run: `cargo bench --bench proto`. (Encoders are internal; whole calls,
//! encoding included, are measured by `scripts/instructions` and `scripts/bench-compare`.)

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mcstore::proto::text::parse_reply;
use mcstore::proto::{Key, Limits};
use mcstore::ring::{Continuum, Distribution, HashFn, RingServer};

fn proto(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("text");
    let hit = b"VALUE bench:key:1234 0 100 987654\r\nvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\nEND\r\n";
    g.throughput(Throughput::Bytes(hit.len() as u64));
    g.bench_function("parse_get_hit_100B", |b| {
        b.iter(|| {
            let mut rest = &hit[..];
            while let Ok(mcstore::proto::Status::Complete((n, r))) =
                parse_reply(black_box(rest), &limits)
            {
                black_box(r);
                rest = &rest[n..];
            }
        })
    });
    g.bench_function("parse_stored", |b| {
        b.iter(|| parse_reply(black_box(b"STORED\r\n"), &limits))
    });
    g.bench_function("key_validate_14B", |b| {
        b.iter(|| Key::new(black_box(b"bench:key:1234")))
    });
    g.finish();

    let mut g = c.benchmark_group("hash_14B_key");
    for h in HashFn::ALL {
        g.bench_function(h.name(), |b| {
            b.iter(|| h.hash(black_box(b"bench:key:1234")))
        });
    }
    g.finish();

    let servers: Vec<RingServer> = (0..10)
        .map(|i| RingServer {
            host: format!("10.0.0.{i}"),
            port: 11211,
            weight: 1,
        })
        .collect();
    let mut g = c.benchmark_group("continuum_pick_10_servers");
    for d in [
        Distribution::Modula,
        Distribution::Ketama,
        Distribution::KetamaWeighted,
    ] {
        let ring = Continuum::new(
            d,
            if d == Distribution::KetamaWeighted {
                HashFn::Md5
            } else {
                HashFn::OneAtATime
            },
            &servers,
        );
        g.bench_function(d.name(), |b| {
            b.iter(|| ring.pick(black_box(b"bench:key:1234")))
        });
    }
    g.finish();
}

criterion_group!(benches, proto);
criterion_main!(benches);
