//! The bench workloads through the crates.io `memcache` crate (the Rust peer), printing the
//! same RESULT line as `mcstore bench`. Used by `scripts/bench-compare`.
//!
//! usage: cargo run --release --example peer_memcache -- -s host:port[,..] -w WORKLOAD [-b]
//!        [-n OPS] [-k KEYS] [-v BYTES] [--tls-ca FILE]
//!
//! `--tls-ca` speaks TLS (the crate's `tls` feature, OpenSSL): built by benches/peer-tls, which
//! compiles this file with that feature so the main crate's builds need no OpenSSL.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::time::Instant;

/// (user, system) CPU seconds of this process so far.
fn cpu() -> (f64, f64) {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable `struct rusage` for getrusage to fill.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) }, 0);
    let t = |tv: &libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(&r.ru_utime), t(&r.ru_stime))
}

/// The peer's entry point (also called by benches/peer-tls).
pub fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    const USAGE: &str = "usage: peer_memcache -w get|get_miss|set|set_noreply|mget100|large_get \
                         [-s host:port,...] [-b] [-n OPS] [-k KEYS] [-v BYTES] [--tls-ca PEM]";
    let usage = |why: String| -> ! {
        eprintln!("peer_memcache: {why}\n{USAGE}");
        std::process::exit(2)
    };
    let mut servers = "127.0.0.1:11211".to_string();
    let (mut workload, mut binary) = (String::new(), false);
    let (mut ops, mut keyspace, mut bytes) = (None, None, None);
    let mut tls_ca: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let next = || {
            args.get(i + 1)
                .cloned()
                .unwrap_or_else(|| usage(format!("{} needs a value", args[i])))
        };
        let number = |s: String| {
            s.parse::<usize>()
                .unwrap_or_else(|_| usage(format!("{s:?} is not a number")))
        };
        match args[i].as_str() {
            "-s" => servers = next(),
            "-w" => workload = next(),
            "-b" => {
                binary = true;
                i -= 1;
            }
            "-n" => ops = Some(number(next())),
            "-k" => keyspace = Some(number(next())),
            "-v" => bytes = Some(number(next())),
            "--tls-ca" => tls_ca = Some(next()),
            other => usage(format!("unknown argument {other}")),
        }
        i += 2;
    }
    let (d_ops, d_keys, d_bytes) = match workload.as_str() {
        "get" | "get_miss" | "set" => (200_000, 10_000, 100),
        "set_noreply" => (1_000_000, 10_000, 100),
        "mget100" => (10_000, 10_000, 100),
        "large_get" => (20_000, 100, 100 * 1024),
        "" => usage("no workload (-w)".into()),
        w => usage(format!("unknown workload {w:?}")),
    };
    let ops = ops.unwrap_or(d_ops);
    let keyspace = keyspace.unwrap_or(d_keys).max(100);
    let bytes = bytes.unwrap_or(d_bytes);
    let proto = if binary { "binary" } else { "ascii" };
    let urls: Vec<String> = servers
        .split(',')
        .map(|s| match &tls_ca {
            None => format!("memcache://{s}?tcp_nodelay=true&protocol={proto}&timeout=5"),
            Some(ca) => format!(
                "memcache+tls://{s}?tcp_nodelay=true&protocol={proto}&timeout=5&verify_mode=peer&ca_path={ca}"
            ),
        })
        .collect();
    let client = memcache::connect(urls.clone()).expect("connect");
    let prefix = if workload == "get_miss" {
        "bench:miss:"
    } else {
        "bench:key:"
    };
    let keys: Vec<String> = (0..keyspace).map(|i| format!("{prefix}{i}")).collect();
    let value = vec![b'v'; bytes];
    if matches!(workload.as_str(), "get" | "mget100" | "large_get") {
        for k in &keys {
            client.set(k, &value[..], 0).expect("setup set");
        }
    }
    if workload == "get_miss" {
        for k in &keys {
            let _ = client.delete(k);
        }
    }
    let (mut errors, mut returned) = (0usize, 0usize);
    let (u0, s0) = cpu();
    let start = Instant::now();
    match workload.as_str() {
        "get" | "large_get" => {
            for i in 0..ops {
                match client.get::<Vec<u8>>(&keys[i % keyspace]) {
                    Ok(Some(v)) if v.len() == bytes => returned += 1,
                    _ => errors += 1,
                }
            }
        }
        "get_miss" => {
            for i in 0..ops {
                if !matches!(client.get::<Vec<u8>>(&keys[i % keyspace]), Ok(None)) {
                    errors += 1;
                }
            }
            returned = ops;
        }
        "set" | "set_noreply" => {
            // The crate has no noreply mode: set_noreply runs as plain sets (noted in the table).
            for i in 0..ops {
                if client.set(&keys[i % keyspace], &value[..], 0).is_err() {
                    errors += 1;
                }
            }
            returned = ops;
        }
        "mget100" => {
            let windows = keyspace - 99;
            for i in 0..ops {
                let s = (i * 100) % windows;
                let batch: Vec<&str> = keys[s..s + 100].iter().map(String::as_str).collect();
                match client.gets::<Vec<u8>>(&batch) {
                    Ok(m) => {
                        let n = m.values().filter(|v| v.len() == bytes).count();
                        if n != 100 {
                            errors += 1;
                        }
                        returned += n;
                    }
                    Err(_) => errors += 1,
                }
            }
        }
        _ => unreachable!(),
    }
    let wall = start.elapsed().as_secs_f64();
    let (u1, s1) = cpu();
    let cpu_s = (u1 - u0) + (s1 - s0);
    let n = urls.len();
    println!(
        "RESULT client=memcache-crate/0.21 proto={} workload={workload} servers={n} dist={} ops={ops} \
         keys={returned} wall_s={wall:.6} ops_per_s={:.1} keys_per_s={:.1} user_s={:.6} \
         sys_s={:.6} cpu_us_per_op={:.4} cpu_us_per_key={:.4} errors={errors}",
        if binary { "binary" } else { "text" },
        if n == 1 { "single" } else { "crate_default" },
        ops as f64 / wall,
        returned as f64 / wall,
        u1 - u0,
        s1 - s0,
        cpu_s * 1e6 / ops as f64,
        cpu_s * 1e6 / returned.max(1) as f64,
    );
}
