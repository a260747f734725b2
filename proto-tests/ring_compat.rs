//! mcstore picks the same server as the real libmemcached for every key, in every
//! configuration: compiles a small C helper against the system libmemcached and compares.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use mcstore::ring::{Continuum, Distribution, HashFn, RingServer};

const KEYS_PER_CONFIG: usize = 100_000;

fn helper() -> &'static PathBuf {
    static HELPER: OnceLock<PathBuf> = OnceLock::new();
    HELPER.get_or_init(|| {
        mcstore_test_support::libmemcached_helper(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            "ring_helper",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/proto-tests/compat/ring_helper.c"
            ),
        )
    })
}

/// Deterministic pseudo-random keys (splitmix64), 1..=250 bytes. `binary` allows every byte
/// value (hashing does not care; libmemcached's generate_hash takes any bytes); otherwise keys
/// are printable ASCII plus UTF-8 and other high bytes, as valid text keys are.
fn keys(seed: u64, binary: bool) -> Vec<Vec<u8>> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..KEYS_PER_CONFIG)
        .map(|_| {
            let len = 1 + (next() % 250) as usize;
            (0..len)
                .map(|_| {
                    let r = next() as u8;
                    if binary {
                        r
                    } else if r < 0x80 {
                        0x21 + r % 0x5e
                    } else {
                        r
                    }
                })
                .collect()
        })
        .collect()
}

fn libmemcached_picks(
    dist: &str,
    hash: &str,
    servers: &[RingServer],
    keys: &[Vec<u8>],
) -> Vec<usize> {
    let mut cmd = Command::new(helper());
    cmd.arg(dist).arg(hash);
    for s in servers {
        cmd.arg(format!("{}:{}:{}", s.host, s.port, s.weight));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = Vec::new();
    for k in keys {
        input.extend_from_slice(&(k.len() as u16).to_le_bytes());
        input.extend_from_slice(k);
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "helper failed for {dist} {hash}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn pool(hosts: &[&str], ports: &[u16], weights: &[u32]) -> Vec<RingServer> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| RingServer {
            host: h.to_string(),
            port: ports[i % ports.len()],
            weight: weights[i % weights.len()],
        })
        .collect()
}

/// Compares one configuration; returns the number of mismatches.
fn compare(
    name: &str,
    dist: Distribution,
    hash: Option<HashFn>,
    servers: &[RingServer],
    binary: bool,
) -> usize {
    let keys = keys(name.len() as u64 * 7919 + servers.len() as u64, binary);
    // libmemcached: KETAMA_WEIGHTED switches the key hash to MD5 unless one is set after it.
    let key_hash = hash.unwrap_or(match dist {
        Distribution::KetamaWeighted => HashFn::Md5,
        _ => HashFn::OneAtATime,
    });
    let ring = Continuum::new(dist, key_hash, servers);
    let theirs = libmemcached_picks(
        dist.name(),
        hash.map_or("default", HashFn::name),
        servers,
        &keys,
    );
    assert_eq!(theirs.len(), keys.len());
    let mismatches = keys
        .iter()
        .zip(&theirs)
        .filter(|(k, &t)| ring.pick(k) != Some(t))
        .count();
    let mut spread = vec![0usize; servers.len()];
    for &t in &theirs {
        spread[t] += 1;
    }
    println!(
        "ring_compat: {name:<48} servers={:<2} keys={} mismatches={mismatches} spread={spread:?}",
        servers.len(),
        keys.len()
    );
    mismatches
}

/// (name, distribution, explicit key hash, servers, binary keys)
type Run<'a> = (String, Distribution, Option<HashFn>, &'a [RingServer], bool);

fn ips(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.1.{i}")).collect()
}

fn names(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("cache-{i}.example.internal"))
        .collect()
}

#[test]
fn same_server_as_libmemcached_for_every_configuration() {
    use Distribution::*;
    let mut total = 0;
    let mut configs = 0;
    for n in [1usize, 2, 3, 10] {
        for (host_kind, hosts) in [("ips", ips(n)), ("hostnames", names(n))] {
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            for (port_kind, ports) in [
                ("port 11211", vec![11211u16]),
                ("other ports", vec![11311, 22122, 11212]),
            ] {
                let equal = pool(&hosts, &ports, &[1]);
                let unequal = pool(&hosts, &ports, &[1, 3, 2, 5, 1, 7, 4, 2, 9, 6]);
                let runs: Vec<Run<'_>> = vec![
                    ("modula".into(), Modula, None, &equal, true),
                    ("ketama".into(), Ketama, None, &equal, true),
                    (
                        "ketama, unequal weights".into(),
                        Ketama,
                        None,
                        &unequal,
                        true,
                    ),
                    (
                        "ketama_weighted, unequal weights".into(),
                        KetamaWeighted,
                        None,
                        &unequal,
                        true,
                    ),
                    (
                        "ketama_weighted, equal weights".into(),
                        KetamaWeighted,
                        None,
                        &equal,
                        false,
                    ),
                ];
                for (what, dist, hash, servers, binary) in runs {
                    let name = format!("{what}; {host_kind}, {port_kind}");
                    total += compare(&name, dist, hash, servers, binary);
                    configs += 1;
                }
            }
        }
    }
    // Every hash function (Debian's build lacks hsieh), under modula and ketama.
    let hosts = ips(3);
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let servers = pool(&hosts, &[11211, 11212], &[1]);
    for h in HashFn::ALL.into_iter().filter(|&h| h != HashFn::Hsieh) {
        for dist in [Modula, Ketama, KetamaWeighted] {
            total += compare(
                &format!("{} with hash {}", dist.name(), h.name()),
                dist,
                Some(h),
                &servers,
                true,
            );
            configs += 1;
        }
    }
    println!("ring_compat: {configs} configurations x {KEYS_PER_CONFIG} keys: {total} mismatches");
    assert_eq!(total, 0);
}
