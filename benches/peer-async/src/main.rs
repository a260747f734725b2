//! async-memcached 0.9 as its users run it: one client (one connection) per tokio task.
//! usage: peer-async -s host:port [--callers N] [-n OPS] [-k KEYS] [-v BYTES] [--runtime current|multi]
//! Prints the same RESULT line as `mcstore slap` (workload get_concurrent).

use std::time::Instant;

use async_memcached::{AsciiProtocol, Client};

fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable `struct rusage` for getrusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |tv: &libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(&r.ru_utime) + t(&r.ru_stime)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut server, mut callers, mut ops, mut keys, mut bytes, mut multi) =
        ("127.0.0.1:11211".to_string(), 64usize, 500_000usize, 10_000usize, 100usize, false);
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("a value");
        match a.as_str() {
            "-s" => server = v(),
            "--callers" => callers = v().parse().unwrap(),
            "-n" => ops = v().parse().unwrap(),
            "-k" => keys = v().parse().unwrap(),
            "-v" => bytes = v().parse().unwrap(),
            "--runtime" => multi = v() == "multi",
            _ => panic!("unknown argument {a}"),
        }
    }
    let rt = if multi {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .unwrap();
    let dsn = format!("tcp://{server}");
    rt.block_on(async move {
        let value = vec![b'v'; bytes];
        let mut loader = Client::new(&dsn).await.expect("connect");
        for i in 0..keys {
            loader.set(format!("key:{i}"), &value[..], None, None).await.expect("preload");
        }
        let mut clients = Vec::new();
        for _ in 0..callers {
            let mut c = Client::new(&dsn).await.expect("connect");
            c.get("key:0").await.expect("warm-up");
            clients.push(c);
        }
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, mut client)| {
                let n_ops = ops / callers + usize::from(c < ops % callers);
                let len = bytes;
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(n_ops);
                    let mut errors = 0usize;
                    for n in 0..n_ops {
                        let key = format!("key:{}", (c.wrapping_mul(7919) + n.wrapping_mul(31)) % keys);
                        let t0 = Instant::now();
                        match client.get(&key).await {
                            Ok(Some(v)) if v.data.as_ref().map(Vec::len) == Some(len) => {}
                            _ => errors += 1,
                        }
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    (lat, errors)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(ops);
        let mut errors = 0;
        for t in tasks {
            let (lat, e) = t.await.unwrap();
            all.extend(lat);
            errors += e;
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        all.sort_unstable();
        let q = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        if errors > 0 {
            eprintln!("{errors} calls failed");
            std::process::exit(1);
        }
        println!(
            "RESULT client=async-memcached proto=text workload=get_concurrent callers={callers} ops={ops} \
             wall_s={wall:.6} ops_per_s={:.1} cpu_us_per_op={:.4} p50_us={:.1} p99_us={:.1}",
            ops as f64 / wall,
            cpu * 1e6 / ops as f64,
            q(0.5),
            q(0.99)
        );
    });
}
