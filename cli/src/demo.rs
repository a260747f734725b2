//! `mcstore demo`, the main job: a local memcached in front of a file storage (or a throwaway
//! PostgreSQL), resources stored and read back cold and warm, hit ratio and latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mcstore::storage::{FsStorage, MemcacheStorage, Storage};
use mcstore::{Client, Pool};
use mcstore_test_support::launcher;
use mcstore_test_support::postgres as pgcluster;

use crate::args::Global;
use crate::store::is_pg_url;
use crate::{builder, Res};

/// A memcached for the demo on a free loopback port, answering before it is used.
pub(crate) fn start_memcached() -> Option<(launcher::Local, String)> {
    let (local, addr) = launcher::start_tcp(64).ok()?;
    let mut c = Client::builder()
        .server(&addr)
        .io_timeout(Duration::from_millis(200))
        .build()
        .ok()?;
    let start = Instant::now();
    while c.version().is_err() {
        if start.elapsed() > launcher::READY_WITHIN {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((local, addr))
}

pub(crate) fn demo(g: &Global, n: usize, master_arg: &str) -> Res<()> {
    let mut _local = None;
    let servers = match &g.servers {
        Some(s) => s.clone(),
        None => match start_memcached() {
            Some((child, addr)) => {
                println!("started a local memcached on {addr}");
                _local = Some(child);
                addr
            }
            None => {
                println!(
                    "memcached is not installed (Debian: apt-get install -y memcached, or set \
                     MEMCACHED_BIN); running master-only"
                );
                String::new()
            }
        },
    };
    let dir = std::env::temp_dir().join(format!("mcstore-demo-{}", std::process::id()));
    let mut _pg = None;
    let (master, master_name): (Arc<dyn Storage>, String) = match master_arg {
        "fs" => (
            Arc::new(FsStorage::open(&dir)?),
            format!("file storage in {}", dir.display()),
        ),
        "postgres" => {
            let pg = pgcluster::Postgres::start();
            let url = pg.url();
            println!("started a local PostgreSQL on 127.0.0.1:{}", pg.port);
            _pg = Some(pg);
            let s = mcstore::storage::PgStorage::builder(&url).open()?;
            (Arc::new(s), format!("PostgreSQL at {url}"))
        }
        url if is_pg_url(url) => (
            Arc::new(mcstore::storage::PgStorage::builder(url).open()?),
            format!("PostgreSQL at {url}"),
        ),
        other => {
            return Err(format!("--master {other:?}: fs, postgres or a postgres:// URL").into())
        }
    };
    let cache = if servers.is_empty() {
        None
    } else {
        let g2 = Global {
            servers: Some(servers.clone()),
            ..g.clone()
        };
        let pool = Pool::new(builder(&g2, "")?, 4)?;
        Some(MemcacheStorage::new(pool, master.clone()))
    };
    let store: &dyn Storage = match &cache {
        Some(c) => c,
        None => master.as_ref(),
    };
    println!("master: {master_name}");
    println!(
        "cache:  {}",
        if servers.is_empty() { "none" } else { &servers }
    );

    store.create_container("articles")?;
    let mut contents = Vec::with_capacity(n);
    let write_start = Instant::now();
    for i in 0..n {
        let name = format!("article-{i:04}.html");
        let body = format!(
            "<h1>Article {i}</h1>{}",
            "lorem ipsum ".repeat(100 + (i * 37) % 1500)
        );
        let info = store.info("articles", Some(&name))?;
        store.put_content(&info, body.as_str().into())?;
        store.put_meta_data(
            &info,
            format!("<entry><title>Article {i}</title></entry>")
                .as_str()
                .into(),
        )?;
        contents.push((info, body));
    }
    println!(
        "stored {n} resources (content + metadata) in {:.0?}",
        write_start.elapsed()
    );

    let mut cached = Histogram::<u64>::new(3)?;
    let mut uncached = Histogram::<u64>::new(3)?;
    let mut direct = Histogram::<u64>::new(3)?;
    let passes = 4;
    for pass in 0..passes {
        for (info, body) in &contents {
            let before = cache.as_ref().map(|c| c.counters().hits);
            let t = Instant::now();
            let got = store.get_content(info)?;
            let us = t.elapsed().as_micros() as u64;
            if got != body.as_bytes() {
                return Err(format!("read back the wrong content for {:?}", info.resource).into());
            }
            let hit = matches!((before, cache.as_ref().map(|c| c.counters().hits)), (Some(a), Some(b)) if b > a);
            if hit {
                cached.record(us.max(1))?;
            } else {
                uncached.record(us.max(1))?;
            }
        }
        if pass == 0 {
            // Say what happened, not what should have: with the cache down, nothing filled.
            match cache.as_ref().map(|c| c.counters()) {
                Some(k) if k.fills > 0 => println!(
                    "pass 1 (cold): reads missed the cache and filled it ({} fills)",
                    k.fills
                ),
                Some(k) => println!(
                    "pass 1 (cold): nothing could be cached ({} cache errors): reads went to \
                     the master",
                    k.cache_errors
                ),
                None => {}
            }
        }
    }
    // The master on its own, for comparison.
    for (info, _) in &contents {
        let mi = master.info(&info.collection, info.resource.as_deref())?;
        let t = Instant::now();
        master.get_content(&mi)?;
        direct.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    let reads = (n * passes) as u64;
    println!("read {reads} times ({passes} passes over {n} resources), all content verified");
    if let Some(c) = &cache {
        let k = c.counters();
        println!(
            "cache: hits {} / misses {} (hit ratio {:.1}%), master reads {} (saved {}), fills {}, cache errors {}",
            k.hits,
            k.misses,
            100.0 * k.hits as f64 / reads as f64,
            k.master_reads,
            reads - k.master_reads,
            k.fills,
            k.cache_errors
        );
    }
    let show = |name: &str, h: &Histogram<u64>| {
        if h.is_empty() {
            println!("{name:<28} (none)");
        } else {
            println!(
                "{name:<28} n={:<6} p50={:>6} us  p99={:>6} us",
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            );
        }
    };
    show("reads served by the cache", &cached);
    show("reads served by the master", &uncached);
    if master_arg == "fs" {
        show("master alone (file reads)", &direct);
        println!(
            "(a local file read from the page cache beats any network round trip; the cache pays \
             off when the master is remote or slow)"
        );
    } else {
        show("master alone (PostgreSQL)", &direct);
        if !cached.is_empty() && !direct.is_empty() {
            println!(
                "cache vs PostgreSQL, p50: {:.2}x the latency",
                cached.value_at_quantile(0.5) as f64 / direct.value_at_quantile(0.5) as f64
            );
        }
    }
    if cache.is_some() {
        println!(
            "servers used: {}",
            servers.split(',').collect::<Vec<_>>().join(", ")
        );
    }
    if master_arg == "fs" {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
