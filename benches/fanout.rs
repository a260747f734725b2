//! Multi-get fan-out: 1,000 keys over 1 server vs 3 servers (ketama), and vs asking the three
//! servers one after the other. With parallel fan-out the 3-server call costs about one round
//! trip, like the 1-server call; done sequentially it would cost three.
//!
//! Run: `cargo bench --bench fanout` (starts its own memcached servers on loopback).

use mcstore_test_support as support;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mcstore::ring::Distribution;
use mcstore::{Client, SetOptions};
use support::Memcached;

fn fanout(c: &mut Criterion) {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let keys: Vec<String> = (0..1000).map(|i| format!("bench:key:{i}")).collect();
    let value = [b'x'; 100];
    let items: Vec<(&str, &[u8])> = keys.iter().map(|k| (k.as_str(), &value[..])).collect();

    let mut one = Client::builder().server(servers[0].addr()).build().unwrap();
    one.set_multi(&items, SetOptions::default()).unwrap();
    let mut three = Client::builder()
        .servers(servers.iter().map(Memcached::addr))
        .distribution(Distribution::Ketama)
        .build()
        .unwrap();
    three.set_multi(&items, SetOptions::default()).unwrap();
    // The same keys split by owner, for the sequential comparison.
    let mut singles: Vec<Client> = servers.iter().map(Memcached::client).collect();
    let mut by_server: Vec<Vec<&str>> = vec![Vec::new(); 3];
    for k in &keys {
        let owner = three.server_for_key(k.as_bytes()).unwrap().to_owned();
        let i = servers.iter().position(|m| m.addr() == owner).unwrap();
        by_server[i].push(k);
    }

    let mut g = c.benchmark_group("get_multi_1000_keys");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("1_server", |b| {
        b.iter(|| {
            let mut n = 0;
            one.get_multi(&keys, |_, _| n += 1).unwrap();
            assert_eq!(n, 1000);
        })
    });
    g.bench_function("3_servers_parallel", |b| {
        b.iter(|| {
            let mut n = 0;
            three.get_multi(&keys, |_, _| n += 1).unwrap();
            assert_eq!(n, 1000);
        })
    });
    g.bench_function("3_servers_sequential", |b| {
        b.iter(|| {
            let mut n = 0;
            for (client, ks) in singles.iter_mut().zip(&by_server) {
                client.get_multi(ks, |_, _| n += 1).unwrap();
            }
            assert_eq!(n, 1000);
        })
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
