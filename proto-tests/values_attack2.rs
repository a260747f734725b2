//! Attack round 2 on typed, compressed and chunked values: concurrent chunked writers, the
//! storage's never-stale promise with chunked and compressed entries over a PostgreSQL
//! master with copies and a restarted server, and values shared with python-memcached and
//! pylibmc.

#[path = "common/values.rs"]
mod values;
use values::{version_of, versioned};

use mcstore_test_support as support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::codec::chunked::ChunkIndex;
use mcstore::codec::{flags, Compressed, Compression, Compressor, Raw, Text};
use mcstore::storage::{CacheClients, MemcacheStorage, Storage};
use mcstore::{Client, Pool, Protocol, SetOptions};
use support::Memcached;

fn builder(addrs: &[String], p: Protocol) -> mcstore::ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(addrs.to_vec())
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .max_value_size(8 << 20)
}

/// Chunk keys on `m` that never expire (`exp=-1`), with their metadata.
fn immortal_chunks(m: &Memcached) -> Vec<String> {
    let mut left = Vec::new();
    m.client()
        .dump_keys(&m.addr(), |k, meta| {
            if k.starts_with(b"mcstore-chunk:") && meta.contains("exp=-1") {
                left.push(format!("{} {meta}", String::from_utf8_lossy(k)));
            }
        })
        .unwrap();
    left
}

/// Two writers `set_chunked` the same key with TTL 0 at once. Each reads the previous index
/// before writing (`previous_chunks`, src/codec/typed.rs) and expires only the chunks *it*
/// saw: when both read the same old index, the chunks of the write that lost (overwritten by
/// the other's index) are named by no index and, with TTL 0, never expire. After the race
/// only the current index's chunks should be immortal (replaced ones linger 10 s).
#[test]
fn concurrent_set_chunked_writers_leave_no_immortal_chunks() {
    let m = Memcached::with_args(&["-I", "1m"]);
    let len = 1_500_000; // two chunks of ~1 MiB
    let orphans_of = |c: &mut Client| -> Vec<String> {
        let index = c.get(b"hot").unwrap().unwrap();
        assert_ne!(index.flags & flags::CHUNKED, 0);
        let ix = ChunkIndex::parse(&index.value).unwrap();
        let current = format!(":{:016x}:", ix.generation);
        let mut out = Vec::new();
        c.get_chunked(b"hot", &mut out).unwrap().unwrap();
        version_of(&out, len);
        immortal_chunks(&m)
            .into_iter()
            .filter(|k| !k.contains(&current))
            .collect()
    };
    // One writer at a time: replaced chunks are set to expire, none stays.
    let mut c = m.client();
    for i in 0..3 {
        c.set_chunked(b"hot", &versioned(1000 + i, len), SetOptions::default())
            .unwrap();
    }
    assert_eq!(orphans_of(&mut c), Vec::<String>::new());
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let addr = m.addr();
            thread::spawn(move || {
                let mut c = builder(&[addr], Protocol::Text).build().unwrap();
                for i in 0..15u64 {
                    c.set_chunked(b"hot", &versioned(w * 100 + i, len), SetOptions::default())
                        .unwrap();
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    let orphans = orphans_of(&mut c);
    assert!(
        orphans.is_empty(),
        "{} chunks of overwritten values never expire (no index names them): {:?}",
        orphans.len(),
        &orphans[..orphans.len().min(4)]
    );
}

/// `delete_chunked` racing `set_chunked` on one key (TTL 0): a delete that read the index
/// before the set wrote its own deletes the old chunks and the *new* index, and the new
/// chunks stay for ever. Afterwards nothing may be immortal but the chunks of the index the
/// key holds (if any).
#[test]
fn delete_chunked_racing_set_chunked_leaves_no_immortal_chunks() {
    let m = Memcached::with_args(&["-I", "1m"]);
    let len = 1_500_000;
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let (addr, stop) = (m.addr(), stop.clone());
        thread::spawn(move || {
            let mut c = builder(&[addr], Protocol::Text).build().unwrap();
            while !stop.load(Ordering::Relaxed) {
                c.delete_chunked(b"k").unwrap();
            }
        })
    };
    let mut c = builder(&[m.addr()], Protocol::Text).build().unwrap();
    for i in 0..20 {
        c.set_chunked(b"k", &versioned(i, len), SetOptions::default())
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    deleter.join().unwrap();
    // (A chunked delete leaves a one-second tombstone: flags CHUNKED, no bytes.)
    let current = match c.get(b"k").unwrap() {
        Some(i) if i.flags & flags::CHUNKED != 0 && !i.value.is_empty() => {
            format!(":{:016x}:", ChunkIndex::parse(&i.value).unwrap().generation)
        }
        _ => "no index".to_string(),
    };
    let orphans: Vec<String> = immortal_chunks(&m)
        .into_iter()
        .filter(|k| !k.contains(&current))
        .collect();
    assert!(
        orphans.is_empty(),
        "{} chunks no index names never expire: {:?}",
        orphans.len(),
        &orphans[..orphans.len().min(4)]
    );
}

/// Never stale, over a PostgreSQL master: content over the item size, compressed with zstd
/// and chunked, cached on two servers with two copies of every key, read by a storage over
/// a text pool and one over a meta shared client (leases) while a writer puts new versions
/// and one server is restarted (its chunks and entries gone) mid-run. A read that starts
/// after a put returned sees that version or a newer one, whole; every read returns (the
/// master is up), within the clients' deadlines.
#[test]
fn chunked_compressed_reads_over_postgres_with_copies_and_a_restart_are_never_stale() {
    let pg = support::postgres::Postgres::start();
    let mut ms = [Memcached::start(), Memcached::start()];
    let addrs: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let master = || -> Arc<dyn Storage> {
        Arc::new(
            mcstore::storage::PgStorage::builder(pg.url())
                .open()
                .unwrap(),
        )
    };
    let zstd = Compressor::new(Compression::Zstd { level: 1 }).min_size(100);
    let pool: CacheClients = Pool::new(builder(&addrs, Protocol::Text).replicas(2), 4)
        .unwrap()
        .into();
    let shared: CacheClients = builder(&addrs, Protocol::Meta)
        .replicas(2)
        .shared()
        .build()
        .unwrap()
        .into();
    let a = Arc::new(
        MemcacheStorage::builder(pool, master())
            .max_item_size(8192)
            .chunked_values(16 << 20)
            .compression(zstd.clone())
            .build(),
    );
    let b = Arc::new(
        MemcacheStorage::builder(shared, master())
            .max_item_size(5000)
            .chunked_values(16 << 20)
            .compression(zstd)
            .build(),
    );
    a.create_container("docs").unwrap();
    let info = a.info("docs", Some("big.bin")).unwrap();
    // Half noise (zstd cannot pack it under the item size), half one repeated byte.
    let len = 40_000;
    let content = |v: u64| -> Vec<u8> {
        let mut c = versioned(v, len);
        c.extend(std::iter::repeat_n((v % 251) as u8, len));
        c
    };
    let check = move |bytes: &[u8]| -> u64 {
        assert_eq!(bytes.len(), 2 * len);
        let v = version_of(&bytes[..len], len);
        assert!(bytes[len..].iter().all(|&x| x == (v % 251) as u8));
        v
    };
    a.put_content(&info, (&content(1)).into()).unwrap();
    let committed = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let s: Arc<dyn Storage> = if r % 2 == 0 { a.clone() } else { b.clone() };
            let (committed, stop, info) = (committed.clone(), stop.clone(), info.clone());
            thread::spawn(move || {
                let (mut n, mut slowest) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let before = committed.load(Ordering::SeqCst);
                    let t = Instant::now();
                    let got = s.get_content(&info).unwrap();
                    slowest = slowest.max(t.elapsed());
                    let v = check(&got);
                    assert!(
                        v >= before,
                        "reader {r}: version {v} after the put of {before} returned"
                    );
                    n += 1;
                }
                (n, slowest)
            })
        })
        .collect();
    let start = Instant::now();
    let mut v = 1;
    let mut restarted = false;
    let mut put_errors = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        v += 1;
        let w: &MemcacheStorage = if v % 2 == 0 { &a } else { &b };
        match w.put_content(&info, (&content(v)).into()) {
            Ok(()) => committed.store(v, Ordering::SeqCst),
            // Not returned: readers may see it or not; never count it as committed.
            Err(_) => put_errors += 1,
        }
        if !restarted && start.elapsed() > Duration::from_millis(1000) {
            ms[1].restart();
            restarted = true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for t in readers {
        let (n, slowest) = t.join().unwrap();
        reads += n;
        assert!(slowest < Duration::from_secs(3), "a read took {slowest:?}");
    }
    let (ca, cb) = (a.counters(), b.counters());
    println!("{v} puts ({put_errors} failed), {reads} reads; a {ca:?}; b {cb:?}");
    assert!(
        ca.chunked_hits + cb.chunked_hits > 0,
        "no chunked hit at all"
    );
    assert!(check(&a.get_content(&info).unwrap()) >= committed.load(Ordering::SeqCst));
}

/// The Python side for python-memcached (`memcache`) and pylibmc: reads what Rust wrote,
/// printing type, length and a digest, then writes str, bytes (both compressed) and an int.
const PY: &str = r#"
import hashlib, sys
which, addr = sys.argv[1], sys.argv[2]
if which == "memcache":
    import memcache
    c = memcache.Client([addr])
    def put(k, v): c.set(k, v, min_compress_len=100)
else:
    import pylibmc
    c = pylibmc.Client([addr], binary=False)
    def put(k, v): c.set(k, v, min_compress_len=100)
for key in ["rs:text", "rs:bytes", "rs:small"]:
    v = c.get(key)
    raw = v.encode() if isinstance(v, str) else v
    print(key, type(v).__name__, len(raw), hashlib.sha256(raw).hexdigest())
doc = ("<entry>" + "é" * 40 + "</entry>\n") * 100
put("py:text", doc)
put("py:bytes", doc.encode() * 2)
c.set("py:int", 42)
print("wrote", hashlib.sha256(doc.encode()).hexdigest())
"#;

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Values cross between mcstore and python-memcached / pylibmc both ways, as the codec docs
/// say (zlib bit 3, text bit 4, ints bit 1 or 2): Python reads mcstore's compressed text and
/// bytes as `str` and `bytes`; mcstore reads Python's compressed `str`, `bytes` and `int`.
#[test]
fn values_cross_between_mcstore_and_python_memcached_and_pylibmc() {
    let m = Memcached::start();
    let zlib = Compressor::new(Compression::Zlib { level: 6 }).min_size(100);
    let text = Compressed::new(Text, zlib.clone());
    let bytes = Compressed::new(Raw, zlib);
    for which in ["memcache", "pylibmc"] {
        let probe = Command::new("python3")
            .args(["-c", &format!("import {which}")])
            .status();
        if !matches!(probe, Ok(s) if s.success()) {
            // scripts/ensure-deps installs both; python-memcached is pure Python and must be
            // there, pylibmc builds a C extension, which a machine may not be able to.
            assert_eq!(
                which, "pylibmc",
                "python-memcached missing: run scripts/ensure-deps"
            );
            eprintln!("pylibmc not installed (it did not build here): its part skipped");
            continue;
        }
        let mut c: Client = builder(&[m.addr()], Protocol::Text).build().unwrap();
        c.flush_all(None).unwrap();
        let doc_text = "ünïcode text, ".repeat(300);
        let doc_bytes = b"<feed>mcstore</feed>\n".repeat(300);
        let o = SetOptions::default();
        c.set_as(&text, b"rs:text", &doc_text, o).unwrap();
        c.set_as(&bytes, b"rs:bytes", &doc_bytes, o).unwrap();
        c.set_as(&text, b"rs:small", &"short".to_string(), o)
            .unwrap();
        let out = Command::new("python3")
            .args(["-c", PY, which, &m.addr()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{which}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "rs:text str {} {}",
                doc_text.len(),
                sha256_hex(doc_text.as_bytes())
            ),
            "{which}"
        );
        assert_eq!(
            lines[1],
            format!(
                "rs:bytes bytes {} {}",
                doc_bytes.len(),
                sha256_hex(&doc_bytes)
            ),
            "{which}"
        );
        assert_eq!(lines[2], format!("rs:small str 5 {}", sha256_hex(b"short")));
        let py_doc = c.get_as(&text, b"py:text").unwrap().unwrap();
        assert_eq!(lines[3], format!("wrote {}", sha256_hex(py_doc.as_bytes())));
        let raw = c.get(b"py:text").unwrap().unwrap();
        assert_eq!(raw.flags, flags::TEXT | flags::ZLIB, "{which}");
        let py_bytes = c.get_as(&bytes, b"py:bytes").unwrap().unwrap();
        assert_eq!(py_bytes, [py_doc.as_bytes(), py_doc.as_bytes()].concat());
        assert_eq!(
            c.get_as(&Text, b"py:int").unwrap().unwrap(),
            "42",
            "{which}"
        );
        assert_eq!(
            c.get_as(&text, b"py:int").unwrap().unwrap(),
            "42",
            "{which}"
        );
    }
}
