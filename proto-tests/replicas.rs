//! Keys on several servers (`ClientBuilder::replicas`, #27) against real memcached: placement
//! as the system libmemcached places its replicas.

use mcstore_test_support as support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use mcstore::ring::{Distribution, ReplicaPlacement};
use mcstore::Client;
use support::Memcached;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

fn three() -> [Memcached; 3] {
    [Memcached::start(), Memcached::start(), Memcached::start()]
}

fn addrs(ms: &[Memcached]) -> Vec<String> {
    ms.iter().map(Memcached::addr).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Placement against the real libmemcached
// ---------------------------------------------------------------------------------------

fn replica_helper() -> &'static PathBuf {
    static HELPER: OnceLock<PathBuf> = OnceLock::new();
    HELPER.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("replica_helper");
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proto-tests/compat/replica_helper.c"
        );
        let status = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(src)
            .arg("-lmemcached")
            .status()
            .expect("run cc: install a C compiler (apt-get install -y gcc)");
        assert!(
            status.success(),
            "building the libmemcached helper failed: install libmemcached \
             (Debian: apt-get install -y libmemcached-dev)"
        );
        out
    })
}

/// Stores `keys` through libmemcached with one replica, binary protocol, value `lm:KEY`.
fn libmemcached_sets(dist: &str, servers: &[String], keys: &[String]) {
    let mut cmd = Command::new(replica_helper());
    cmd.arg(dist);
    for s in servers {
        cmd.arg(format!("{s}:1"));
    }
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let mut input = keys.join("\n");
    input.push('\n');
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let status = child.wait().unwrap();
    writer.join().unwrap();
    assert!(status.success(), "replica_helper {dist} failed");
}

#[test]
fn placement_matches_libmemcached_number_of_replicas() {
    if support::tls_mode() {
        eprintln!("libmemcached's helper speaks no TLS: placement checked in plain runs only");
        return;
    }
    for dist in [Distribution::Modula, Distribution::Ketama] {
        let mut ms = three();
        let servers = addrs(&ms);
        let keys: Vec<String> = (0..300)
            .map(|i| format!("lm:{}:{i}:{}", dist.name(), i * 7919 % 1000))
            .collect();
        libmemcached_sets(dist.name(), &servers, &keys);
        let client = Client::builder()
            .servers(&servers)
            .distribution(dist)
            .replicas(2)
            .build()
            .unwrap();
        let ring = client.continuum();
        let mut direct: Vec<Client> = ms.iter().map(Memcached::client).collect();
        let mut mismatches = Vec::new();
        let mut natural_differs = 0;
        for key in &keys {
            let want = format!("lm:{key}");
            let mut holders = Vec::new();
            for (i, d) in direct.iter_mut().enumerate() {
                if let Some(item) = d.get(key.as_bytes()).unwrap() {
                    assert_eq!(item.value, want.as_bytes(), "{key} on server {i}");
                    holders.push(i as u32);
                }
            }
            let list = ring.replicas(key.as_bytes(), 2, ReplicaPlacement::List);
            let mut expected = list.as_slice().to_vec();
            expected.sort_unstable();
            if holders != expected {
                mismatches.push(format!("{key}: on {holders:?}, List says {expected:?}"));
            }
            // The key's own server is libmemcached's pick too.
            assert_eq!(
                list.as_slice()[0] as usize,
                ring.pick(key.as_bytes()).unwrap()
            );
            let natural = ring.replicas(key.as_bytes(), 2, ReplicaPlacement::Natural);
            if natural != list {
                natural_differs += 1;
            }
        }
        println!(
            "replicas placement {}: {} keys, {} mismatches, natural != list for {natural_differs}",
            dist.name(),
            keys.len(),
            mismatches.len()
        );
        assert!(
            mismatches.is_empty(),
            "{}: {} keys not where libmemcached put them, e.g. {:?}",
            dist.name(),
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
        match dist {
            // Under modula the natural placement is the list's.
            Distribution::Modula => {
                assert_eq!(natural_differs, 0);
                for i in 0..10_000 {
                    let k = format!("modula-key-{i}");
                    assert_eq!(
                        ring.replicas(k.as_bytes(), 2, ReplicaPlacement::Natural),
                        ring.replicas(k.as_bytes(), 2, ReplicaPlacement::List),
                        "{k}"
                    );
                }
            }
            // Under ketama they differ (else this test could not tell them apart).
            _ => assert!(natural_differs > 0, "natural == list for every key"),
        }
        // mcstore with List placement reads libmemcached's replicas when a key's own server
        // is gone.
        let mut reader = Client::builder()
            .servers(&servers)
            .distribution(dist)
            .replicas(2)
            .replica_placement(ReplicaPlacement::List)
            .io_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        ms[0].kill();
        for key in &keys {
            let item = reader.get(key.as_bytes()).unwrap();
            assert_eq!(
                item.map(|i| i.value),
                Some(format!("lm:{key}").into_bytes()),
                "{key} with server 0 gone"
            );
        }
        let c = reader.fleet_counters();
        println!(
            "replicas placement {}: reads with server 0 gone: {c:?}",
            dist.name()
        );
        assert!(
            c.failovers > 0,
            "no read failed over from the killed server"
        );
    }
}
