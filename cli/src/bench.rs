//! `mcstore bench`: fixed workloads, one machine-readable result line. The same workloads and
//! line format are implemented for libmemcached and a bare C client in `benches/`, and for the
//! `memcache` crate in `examples/peer_memcache.rs`, so `scripts/bench-compare` can put them side
//! by side.

use std::time::{Duration, Instant};

use mcstore::{Client, SetOptions};

/// Workload parameters.
pub struct Spec {
    pub workload: String,
    pub ops: Option<usize>,
    pub keyspace: Option<usize>,
    pub value_bytes: Option<usize>,
}

/// The workloads and their defaults: (name, ops, keyspace, value bytes).
const WORKLOADS: &[(&str, usize, usize, usize)] = &[
    ("get", 200_000, 10_000, 100),
    ("get_miss", 200_000, 10_000, 100),
    ("set", 200_000, 10_000, 100),
    ("set_noreply", 1_000_000, 10_000, 100),
    ("mget100", 10_000, 10_000, 100),
    ("large_get", 20_000, 100, 100 * 1024),
    // Each op: close the connection (`quit`), then a get, which reconnects (with TLS: a
    // handshake, resumed unless --tls-no-resumption).
    ("reconnect", 2_000, 100, 100),
];

/// (user, system) CPU seconds of this process so far.
fn cpu_times() -> (f64, f64) {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable `struct rusage` for getrusage to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    assert_eq!(rc, 0, "getrusage failed");
    let t = |tv: &libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(&r.ru_utime), t(&r.ru_stime))
}

pub fn run(client: &mut Client, spec: &Spec, proto: &str, dist: &str) -> Result<(), String> {
    let &(name, d_ops, d_keys, d_bytes) = WORKLOADS
        .iter()
        .find(|w| w.0 == spec.workload)
        .ok_or_else(|| {
            let names: Vec<&str> = WORKLOADS.iter().map(|w| w.0).collect();
            format!(
                "unknown workload {:?}; one of {}",
                spec.workload,
                names.join(", ")
            )
        })?;
    let ops = spec.ops.unwrap_or(d_ops);
    let keyspace = spec
        .keyspace
        .unwrap_or(d_keys)
        .max(if name == "mget100" { 100 } else { 1 });
    let bytes = spec.value_bytes.unwrap_or(d_bytes);
    let prefix = if name == "get_miss" {
        "bench:miss:"
    } else {
        "bench:key:"
    };
    let keys: Vec<Vec<u8>> = (0..keyspace)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect();
    let value = vec![b'v'; bytes];
    let opts = SetOptions::default();
    let err = |e: mcstore::Error| e.to_string();

    // Setup, untimed: the keys the reads expect.
    if matches!(name, "get" | "mget100" | "large_get" | "reconnect") {
        let mut p = client.pipeline();
        for k in &keys {
            p.set(k, &value, opts).map_err(err)?;
        }
        p.finish().map_err(err)?;
    }
    if name == "get_miss" {
        client.delete_multi(&keys).map_err(err)?;
    }
    let mut buf = Vec::with_capacity(bytes + 64);
    // Warm-up: connections open, buffers grown.
    for k in keys.iter().take(100) {
        let _ = client.get_into(k, &mut buf);
    }

    let mut errors = 0usize;
    let mut returned = 0usize;
    let (u0, s0) = cpu_times();
    let start = Instant::now();
    match name {
        "get" | "large_get" => {
            for i in 0..ops {
                match client.get_into(&keys[i % keyspace], &mut buf) {
                    Ok(Some(_)) if buf.len() == bytes => {}
                    _ => errors += 1,
                }
            }
            returned = ops - errors;
        }
        "reconnect" => {
            for i in 0..ops {
                let ok = client.quit().is_ok()
                    && matches!(client.get_into(&keys[i % keyspace], &mut buf), Ok(Some(_)));
                if !ok {
                    errors += 1;
                }
            }
            returned = ops - errors;
        }
        "get_miss" => {
            for i in 0..ops {
                if !matches!(client.get_into(&keys[i % keyspace], &mut buf), Ok(None)) {
                    errors += 1;
                }
            }
            returned = ops;
        }
        "set" => {
            for i in 0..ops {
                if client.set(&keys[i % keyspace], &value, opts).is_err() {
                    errors += 1;
                }
            }
            returned = ops;
        }
        "set_noreply" => {
            let mut p = client.pipeline();
            for i in 0..ops {
                if p.set(&keys[i % keyspace], &value, opts).is_err() {
                    errors += 1;
                }
            }
            match p.finish() {
                Ok(r) => errors += r.errors,
                Err(_) => errors += 1,
            }
            returned = ops;
        }
        "mget100" => {
            let windows = keyspace - 99;
            for i in 0..ops {
                let start = (i * 100) % windows;
                let mut n = 0;
                let r = client.get_multi(&keys[start..start + 100], |_, item| {
                    if item.value.len() == bytes {
                        n += 1;
                    }
                });
                if r.is_err() || n != 100 {
                    errors += 1;
                }
                returned += n;
            }
        }
        _ => unreachable!("listed above"),
    }
    let wall = start.elapsed();
    let (u1, s1) = cpu_times();
    print_result(&Result_ {
        client: concat!("mcstore/", env!("CARGO_PKG_VERSION")),
        proto,
        workload: name,
        servers: client.servers().len(),
        dist,
        ops,
        keys: returned,
        wall,
        user: u1 - u0,
        sys: s1 - s0,
        errors,
    });
    Ok(())
}

struct Result_<'a> {
    client: &'a str,
    proto: &'a str,
    workload: &'a str,
    servers: usize,
    dist: &'a str,
    ops: usize,
    keys: usize,
    wall: Duration,
    user: f64,
    sys: f64,
    errors: usize,
}

fn print_result(r: &Result_<'_>) {
    let wall = r.wall.as_secs_f64();
    let cpu = r.user + r.sys;
    println!(
        "RESULT client={} proto={} workload={} servers={} dist={} ops={} keys={} wall_s={:.6} \
         ops_per_s={:.1} keys_per_s={:.1} user_s={:.6} sys_s={:.6} cpu_us_per_op={:.4} \
         cpu_us_per_key={:.4} errors={}",
        r.client,
        r.proto,
        r.workload,
        r.servers,
        r.dist,
        r.ops,
        r.keys,
        wall,
        r.ops as f64 / wall,
        r.keys as f64 / wall,
        r.user,
        r.sys,
        cpu * 1e6 / r.ops as f64,
        cpu * 1e6 / r.keys.max(1) as f64,
        r.errors
    );
}
