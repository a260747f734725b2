//! Attacks on the values layer (codecs, compression, chunked values) and on the storage's
//! compressed and chunked entries, against real memcached.
//!
//! A few tests need a bounded address space (a hostile index must not make a reader allocate
//! what it claims): they run this binary again as a child under `ulimit -v`, in the test
//! `child_process_entry` (which does nothing unless `VALUES_ATTACK_CHILD` is set).

#[path = "common/values.rs"]
mod values;
use values::{version_of, versioned};

use mcstore_test_support as support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::codec::chunked::{ChunkIndex, CHUNK_HEADER};
use mcstore::codec::{flags, Compressed, Compression, Compressor, Json, Raw};
use mcstore::storage::{CacheClients, FsStorage, MemcacheStorage, MemcacheStorageBuilder, Storage};
use mcstore::{Client, ErrorKind, Pool, Protocol, SetOptions, SharedClient};
use support::{Memcached, TempDir};

const CHILD: &str = "VALUES_ATTACK_CHILD";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn builder(addrs: &[String], p: Protocol) -> mcstore::ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(addrs.to_vec())
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
}

fn client(m: &Memcached, p: Protocol) -> Client {
    builder(&[m.addr()], p).build().unwrap()
}

fn storage_builder(cache: impl Into<CacheClients>, root: &Path) -> MemcacheStorageBuilder {
    let master: Arc<dyn Storage> = Arc::new(FsStorage::open(root).unwrap());
    MemcacheStorage::builder(cache.into(), master)
}

fn cache_builder(mc: &Memcached, p: Protocol) -> mcstore::ClientBuilder {
    support::client_builder()
        .server(mc.addr())
        .protocol(p)
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .max_value_size(4 << 20)
}

fn pool_with(mc: &Memcached, p: Protocol) -> Pool {
    Pool::new(cache_builder(mc, p), 8).unwrap()
}

fn shared_with(mc: &Memcached, p: Protocol) -> SharedClient {
    cache_builder(mc, p).shared().build().unwrap()
}

/// Runs this binary's test `test` as a child with at most `limit_kb` KiB of address space;
/// its exit status (None: killed after 30 s or by a signal), how long it ran, its output.
fn run_child(
    test: &str,
    mode: &str,
    env: &[(&str, String)],
    limit_kb: u64,
) -> (Option<i32>, Duration, String) {
    let dir = TempDir::new("values-attack-child");
    let out_path = dir.path.join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let err = out.try_clone().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -v {limit_kb} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let tail: String = text
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    (status, took, tail)
}

const CHILD_TEST: &str = "child_process_entry";
/// The children's address space: plenty for a 3 MiB chunked read, not for what a hostile
/// index claims (1 GiB).
const CHILD_LIMIT_KB: u64 = 900 * 1024;

/// The child side of [`run_child`]: nothing in a normal run.
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let addr = std::env::var("VA_ADDR").unwrap();
    let start = Instant::now();
    match mode.as_str() {
        "client" => {
            let key = std::env::var("VA_KEY").unwrap();
            let mut c = builder(&[addr], Protocol::Text)
                .max_value_size(4 << 20)
                .build()
                .unwrap();
            let mut out = Vec::new();
            let r = c.get_chunked(key.as_bytes(), &mut out);
            println!(
                "get_chunked: {:?} after {:?}",
                r.as_ref().map(|o| o.is_some()),
                start.elapsed()
            );
            if let Ok(Some(_)) = r {
                if let Ok(len) = std::env::var("VA_LEN") {
                    version_of(&out, len.parse().unwrap());
                } else {
                    panic!("a hostile index gave a value of {} bytes", out.len());
                }
            }
        }
        "storage" => {
            let root = std::env::var("VA_ROOT").unwrap();
            let len: usize = std::env::var("VA_LEN").unwrap().parse().unwrap();
            let mc_client = builder(&[addr], Protocol::Text).max_value_size(4 << 20);
            let s = storage_builder(Pool::new(mc_client, 2).unwrap(), Path::new(&root))
                .max_item_size(100 * 1024)
                .chunked_values(64 << 20)
                .build();
            let info = s.info("docs", Some("big.bin")).unwrap();
            let v = s.get_content(&info).unwrap();
            version_of(&v, len);
            println!(
                "storage read ok after {:?}: {:?}",
                start.elapsed(),
                s.counters()
            );
        }
        m => panic!("unknown child mode {m}"),
    }
}

// ---------------------------------------------------------------------------------------
// Hostile chunk indexes: memory and time bounded by what arrives, not by what is claimed
// ---------------------------------------------------------------------------------------

/// A chunked value's index may claim up to 1 GiB (`MAX_CHUNKED_LEN`) in chunks of 1 byte:
/// 2^30 chunks. `ChunkIndex::parse` accepts it, and `get_chunked` then builds 2^30 chunk keys
/// (`ChunkIndex::chunk_keys`: tens of GiB) and a 1 GiB `have` table (`Assembler::new`)
/// before asking the server anything. The module says "Memory grows with the chunks that
/// arrive, never with what an index claims". A 40-byte item anyone can write must be a
/// quick error or a miss.
#[test]
fn hostile_index_of_a_billion_one_byte_chunks_is_refused_cheaply() {
    let m = Memcached::start();
    let mut c = client(&m, Protocol::Text);
    // Control: a real 3 MiB chunked value reads fine in the child's address space.
    let len = 3 << 20;
    c.set_chunked(b"legit", &versioned(7, len), SetOptions::default())
        .unwrap();
    let (status, took, out) = run_child(
        CHILD_TEST,
        "client",
        &[
            ("VA_ADDR", m.addr()),
            ("VA_KEY", "legit".into()),
            ("VA_LEN", len.to_string()),
        ],
        CHILD_LIMIT_KB,
    );
    assert_eq!(
        status,
        Some(0),
        "control read failed after {took:?}:\n{out}"
    );

    let hostile = ChunkIndex {
        generation: 0x1234,
        total: 1 << 30,
        chunk_size: 1,
        count: 1 << 30,
        crc: 0,
        flags: 0,
    };
    // The attack's premise was that `parse` accepted this index; it is refused now, and
    // the child checks that a reader says so without allocating what it claims.
    c.set(
        b"hostile",
        &hostile.encode(),
        SetOptions::default().flags(flags::CHUNKED),
    )
    .unwrap();
    let (status, took, out) = run_child(
        CHILD_TEST,
        "client",
        &[("VA_ADDR", m.addr()), ("VA_KEY", "hostile".into())],
        CHILD_LIMIT_KB,
    );
    assert!(
        status == Some(0) && took < Duration::from_secs(10),
        "get_chunked of a 40-byte hostile index (1 GiB in 2^30 chunks of 1 byte): exit \
         {status:?} after {took:?} (a memory limit of {CHILD_LIMIT_KB} KiB):\n{out}"
    );
}

/// An index claiming 1 GiB in ~1 MiB chunks, and only its last chunk (1 KiB, with the
/// right generation, number and count) written: `Assembler::place` resizes the output to
/// the chunk's offset, 1 GiB, zero-filled, for 1 KiB that arrived. Then the value is a miss
/// anyway. One cheap item makes every reader allocate and zero 1 GiB.
#[test]
fn hostile_index_with_only_its_last_chunk_does_not_allocate_the_claim() {
    let m = Memcached::start();
    let mut c = client(&m, Protocol::Text);
    let chunk_size = (1u32 << 20) - 1;
    let total = 1u64 << 30;
    let count = total.div_ceil(u64::from(chunk_size)) as u32;
    let hostile = ChunkIndex {
        generation: 0xfeed,
        total,
        chunk_size,
        count,
        crc: 0,
        flags: 0,
    };
    // The attack's premise was that `parse` accepted this index; it is refused now, and
    // the child checks that a reader says so without allocating what it claims.
    let last = count - 1;
    let last_len = (total - u64::from(last) * u64::from(chunk_size)) as usize;
    let mut chunk = Vec::new();
    chunk.extend_from_slice(&hostile.generation.to_le_bytes());
    chunk.extend_from_slice(&last.to_le_bytes());
    chunk.extend_from_slice(&count.to_le_bytes());
    chunk.resize(CHUNK_HEADER + last_len, 0xab);
    let mut k = Vec::new();
    hostile.chunk_key(b"hostile2", last, &mut k);
    c.set(&k, &chunk, SetOptions::default()).unwrap();
    c.set(
        b"hostile2",
        &hostile.encode(),
        SetOptions::default().flags(flags::CHUNKED),
    )
    .unwrap();
    let (status, took, out) = run_child(
        CHILD_TEST,
        "client",
        &[("VA_ADDR", m.addr()), ("VA_KEY", "hostile2".into())],
        CHILD_LIMIT_KB,
    );
    assert!(
        status == Some(0) && took < Duration::from_secs(10),
        "get_chunked of an index claiming 1 GiB with only its last {last_len}-byte chunk \
         present: exit {status:?} after {took:?} (memory limit {CHILD_LIMIT_KB} KiB):\n{out}"
    );
}

/// The same hostile index placed under a storage's chunked entry: the storage's read
/// (`read_chunks`, same `chunk_keys` and `Assembler`) must fall back to the master, not
/// die. Anyone who can write to the cache can otherwise crash every reader of the key.
#[test]
fn hostile_index_in_a_storage_entry_falls_back_to_the_master() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-hostile-storage");
    let len = 300 * 1024;
    {
        let s = storage_builder(pool_with(&m, Protocol::Text), &dir.path)
            .max_item_size(100 * 1024)
            .chunked_values(64 << 20)
            .build();
        s.create_container("docs").unwrap();
        let info = s.info("docs", Some("big.bin")).unwrap();
        s.put_content(&info, (&versioned(3, len)).into()).unwrap();
        version_of(&s.get_content(&info).unwrap(), len);
        version_of(&s.get_content(&info).unwrap(), len);
        assert!(s.counters().chunked_hits >= 1, "{:?}", s.counters());
    }
    // Find the index (an entry whose kind is the storage's chunked kind) and replace it.
    let mut raw = client(&m, Protocol::Meta);
    let mut keys = Vec::new();
    raw.dump_keys(&m.addr(), |k, _| keys.push(k.to_vec()))
        .unwrap();
    let mut replaced = 0;
    for k in keys {
        if let Some(item) = raw.get(&k).unwrap() {
            if item.flags & !flags::ANY_COMPRESSION == 0x4d43_0003 {
                let hostile = ChunkIndex {
                    generation: 0x77,
                    total: 1 << 30,
                    chunk_size: 1,
                    count: 1 << 30,
                    crc: 0,
                    flags: 0,
                };
                raw.set(
                    &k,
                    &hostile.encode(),
                    SetOptions::default().flags(item.flags).ttl(600),
                )
                .unwrap();
                replaced += 1;
            }
        }
    }
    assert_eq!(replaced, 1, "the storage's chunked entry");
    let (status, took, out) = run_child(
        CHILD_TEST,
        "storage",
        &[
            ("VA_ADDR", m.addr()),
            ("VA_ROOT", dir.path.display().to_string()),
            ("VA_LEN", len.to_string()),
        ],
        CHILD_LIMIT_KB,
    );
    assert!(
        status == Some(0) && took < Duration::from_secs(10),
        "a storage read over a hostile index: exit {status:?} after {took:?} (memory limit \
         {CHILD_LIMIT_KB} KiB):\n{out}"
    );
}

// ---------------------------------------------------------------------------------------
// TTLs, item sizes, limits
// ---------------------------------------------------------------------------------------

/// A storage whose entries live 30 days (`ttl(2_592_000)`, the longest relative TTL
/// memcached takes) writes its chunks with TTL + 1 (entry.rs, `encode_entry`:
/// `t.saturating_add(1)`) = 2,592,001, which memcached reads as a Unix timestamp in 1970:
/// every chunk expires as it is stored. The index is filled, every read finds its chunks
/// gone, deletes it and reads the master: chunked caching never hits. (`set_chunked` on the
/// client avoids this: it adds the second only below 2,592,000.)
#[test]
fn storage_with_a_thirty_day_ttl_gets_chunked_hits() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-ttl");
    let s = storage_builder(pool_with(&m, Protocol::Text), &dir.path)
        .ttl(30 * 24 * 3600)
        .max_item_size(4096)
        .chunked_values(16 << 20)
        .build();
    s.create_container("docs").unwrap();
    let info = s.info("docs", Some("big.bin")).unwrap();
    let len = 40_000;
    s.put_content(&info, (&versioned(1, len)).into()).unwrap();
    for _ in 0..4 {
        version_of(&s.get_content(&info).unwrap(), len);
    }
    let c = s.counters();
    assert!(
        c.chunked_fills >= 1 && c.chunked_hits >= 2 && c.master_reads <= 2,
        "ttl 30 days: chunked content is never a hit: {c:?}"
    );
}

/// Control for the above: a TTL of one day caches chunked content.
#[test]
fn storage_with_a_one_day_ttl_gets_chunked_hits() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-ttl1");
    let s = storage_builder(pool_with(&m, Protocol::Meta), &dir.path)
        .ttl(24 * 3600)
        .max_item_size(4096)
        .chunked_values(16 << 20)
        .build();
    s.create_container("docs").unwrap();
    let info = s.info("docs", Some("big.bin")).unwrap();
    let len = 40_000;
    s.put_content(&info, (&versioned(1, len)).into()).unwrap();
    for _ in 0..4 {
        version_of(&s.get_content(&info).unwrap(), len);
    }
    let c = s.counters();
    assert!(
        c.chunked_fills >= 1 && c.chunked_hits >= 2 && c.master_reads <= 2,
        "{c:?}"
    );
}

/// `set_chunked` with a client whose `max_value_size` is below a chunk's header (16 bytes):
/// `Front::capacity` is `item_capacity(size).min(max_value)`, and `ChunkIndex::plan`
/// computes `capacity - CHUNK_HEADER` (an overflow panic) or divides by a chunk size of 0.
/// Must be an error, not a panic.
#[test]
fn set_chunked_with_a_tiny_max_value_size_is_an_error_not_a_panic() {
    let m = Memcached::start();
    for max in [16usize, 10] {
        let mut c = builder(&[m.addr()], Protocol::Text)
            .max_value_size(max)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.set_chunked(b"tiny", &[7u8; 100], SetOptions::default())
        }));
        match r {
            Ok(Ok(())) => {
                let mut out = Vec::new();
                assert!(c.get_chunked(b"tiny", &mut out).unwrap().is_some());
                assert_eq!(out, [7u8; 100]);
            }
            Ok(Err(e)) => println!("max_value_size {max}: {e}"),
            Err(p) => panic!(
                "set_chunked panicked with max_value_size({max}): {:?}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or(p.downcast_ref::<&str>().copied())
            ),
        }
    }
}

/// The servers' item size is asked once (`stats settings`) and kept, also when no server
/// answered: a server frozen at the first chunked store makes the client keep memcached's
/// default (1 MiB) for good (typed.rs, `Front::capacity` for `Client` and `&SharedClient`:
/// `item_size_max` falls back to `DEFAULT_ITEM_SIZE_MAX` and the result is cached). Against
/// a server started with `-I 512k`, every value between ~511 KiB and ~1 MiB is then sent
/// whole and refused, forever.
#[test]
fn item_size_is_not_learned_from_a_server_that_did_not_answer() {
    let m = Memcached::with_args(&["-I", "512k"]);
    let value = versioned(5, 800 * 1024);
    // Control: a client that asks while the server answers stores it as chunks.
    let mut ok = builder(&[m.addr()], Protocol::Text).build().unwrap();
    ok.set_chunked(b"control", &value, SetOptions::default())
        .unwrap();
    let mut out = Vec::new();
    assert!(ok.get_chunked(b"control", &mut out).unwrap().is_some());
    version_of(&out, value.len());

    let mut c = builder(&[m.addr()], Protocol::Text).build().unwrap();
    let s = builder(&[m.addr()], Protocol::Text)
        .shared()
        .build()
        .unwrap();
    m.freeze();
    assert!(c
        .set_chunked(b"k1", b"small", SetOptions::default())
        .is_err());
    assert!(s
        .set_chunked(b"k2", b"small", SetOptions::default())
        .is_err());
    m.resume();
    support::wait_for("the server answers again", || {
        c.get(b"control").is_ok() && s.get(b"control").is_ok()
    });
    let rc = c.set_chunked(b"k1", &value, SetOptions::default());
    let rs = s.set_chunked(b"k2", &value, SetOptions::default());
    assert!(
        rc.is_ok() && rs.is_ok(),
        "after the server came back (-I 512k): Client {rc:?}, SharedClient {rs:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Chunked values under concurrent writers, deletes, frozen and restarted servers
// ---------------------------------------------------------------------------------------

/// A value's length by its version: some small (stored plainly), most chunked.
fn len_of(version: u64) -> usize {
    if version % 5 == 0 {
        200
    } else {
        50_000 + (version % 3) as usize * 7_000
    }
}

fn check_versioned(v: &[u8]) -> u64 {
    let version = u64::from_le_bytes(v[..8].try_into().unwrap());
    assert_eq!(v.len(), len_of(version), "version {version}: wrong length");
    version_of(v, v.len())
}

/// `set_chunked` says "readers see the old value or the new one, never a mix". A key that
/// always holds a value (only ever overwritten, never deleted) must never read as a miss:
/// but the writer deletes the previous value's chunks right after writing the new index,
/// so a reader that got the old index a moment before finds its chunks gone and gets
/// `Ok(None)` (typed.rs, `set_chunked`: `delete_many(&keys)` of the old chunks; and
/// `get_chunked`: a chunk missing is a miss). Neither old nor new.
#[test]
fn get_chunked_never_misses_a_key_that_is_only_overwritten() {
    let m = Memcached::start();
    for shared in [false, true] {
        let key = format!("always-{shared}");
        let mut w = builder(&[m.addr()], Protocol::Meta)
            .max_value_size(16 * 1024)
            .build()
            .unwrap();
        w.set_chunked(
            key.as_bytes(),
            &versioned(1, len_of(1)),
            SetOptions::default(),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let key = key.clone();
            thread::spawn(move || {
                let mut v = 2u64;
                while !stop.load(Ordering::Relaxed) {
                    w.set_chunked(
                        key.as_bytes(),
                        &versioned(v, len_of(v)),
                        SetOptions::default(),
                    )
                    .unwrap();
                    v += 1;
                }
                v
            })
        };
        let (mut reads, mut misses) = (0u64, 0u64);
        let sc = builder(&[m.addr()], Protocol::Meta)
            .max_value_size(16 * 1024)
            .shared()
            .build()
            .unwrap();
        let mut c = builder(&[m.addr()], Protocol::Meta)
            .max_value_size(16 * 1024)
            .build()
            .unwrap();
        let until = Instant::now() + Duration::from_millis(1500);
        let mut out = Vec::new();
        while Instant::now() < until {
            let r = if shared {
                sc.get_chunked(key.as_bytes(), &mut out)
            } else {
                c.get_chunked(key.as_bytes(), &mut out)
            };
            reads += 1;
            match r.unwrap() {
                Some(_) => {
                    check_versioned(&out);
                }
                None => misses += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        println!("shared={shared}: {reads} reads, {misses} misses, {written} writes");
        assert_eq!(
            misses, 0,
            "shared={shared}: {misses} of {reads} reads of a key that always held a value \
             were misses ({written} overwrites)"
        );
    }
}

/// Writers on both fronts, a deleter and readers on one key, over the three protocols:
/// every value read is whole and one that was written (never a mix of two writes, never
/// the wrong length).
#[test]
fn concurrent_set_get_delete_chunked_never_yield_a_wrong_value() {
    let m = Memcached::start();
    let protocols = [Protocol::Text, Protocol::Binary, Protocol::Meta];
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let addr = m.addr();
    let sc = Arc::new(
        builder(std::slice::from_ref(&addr), Protocol::Meta)
            .max_value_size(16 * 1024)
            .shared()
            .build()
            .unwrap(),
    );
    for (t, p) in protocols.into_iter().enumerate() {
        let (stop, addr) = (stop.clone(), addr.clone());
        threads.push(thread::spawn(move || {
            let mut c = builder(&[addr], p)
                .max_value_size(16 * 1024)
                .build()
                .unwrap();
            let mut v = (t as u64 + 1) << 32;
            while !stop.load(Ordering::Relaxed) {
                c.set_chunked(
                    b"contested",
                    &versioned(v, len_of(v)),
                    SetOptions::default(),
                )
                .unwrap();
                v += 1;
            }
        }));
    }
    {
        let (stop, sc) = (stop.clone(), sc.clone());
        threads.push(thread::spawn(move || {
            let mut v = 9u64 << 32;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if n % 4 == 0 {
                    sc.delete_chunked(b"contested").unwrap();
                } else {
                    sc.set_chunked(
                        b"contested",
                        &versioned(v, len_of(v)),
                        SetOptions::default(),
                    )
                    .unwrap();
                    v += 1;
                }
            }
        }));
    }
    for (t, p) in protocols.into_iter().enumerate() {
        let (stop, addr, sc) = (stop.clone(), addr.clone(), sc.clone());
        let (reads, hits) = (reads.clone(), hits.clone());
        threads.push(thread::spawn(move || {
            let mut c = builder(&[addr], p)
                .max_value_size(16 * 1024)
                .build()
                .unwrap();
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = if t == 0 {
                    sc.get_chunked(b"contested", &mut out)
                } else {
                    c.get_chunked(b"contested", &mut out)
                };
                reads.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(Some(_)) => {
                        check_versioned(&out);
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("{p:?}: {e}"),
                }
            }
        }));
    }
    thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (r, h) = (reads.load(Ordering::Relaxed), hits.load(Ordering::Relaxed));
    println!("{r} reads, {h} whole values");
    assert!(h > 20, "{h} of {r}");
}

/// Chunks spread over three servers; one is frozen (SIGSTOP) and resumed, another
/// restarted, while a writer and readers on both fronts go on: every call returns within
/// its deadline (never hangs), every value read is whole, and once the servers are back a
/// write is read back.
#[test]
fn chunked_values_over_a_frozen_and_a_restarted_server_are_bounded_and_whole() {
    let mut ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let addrs: Vec<String> = ms.iter().map(Memcached::addr).collect();
    let mk = || builder(&addrs, Protocol::Text).max_value_size(16 * 1024);
    let sc = Arc::new(mk().shared().build().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(AtomicU64::new(0));
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut threads = Vec::new();
    {
        let (stop, slowest, mut c) = (stop.clone(), slowest.clone(), mk().build().unwrap());
        threads.push(thread::spawn(move || {
            let mut v = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = c.set_chunked(b"spread", &versioned(v, len_of(v)), SetOptions::default());
                slowest.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                v += 1;
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    for t in 0..2 {
        let (stop, slowest, counts, sc) =
            (stop.clone(), slowest.clone(), counts.clone(), sc.clone());
        let mut c = mk().build().unwrap();
        threads.push(thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = if t == 0 {
                    sc.get_chunked(b"spread", &mut out)
                } else {
                    c.get_chunked(b"spread", &mut out)
                };
                slowest.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                match r {
                    Ok(Some(_)) => {
                        check_versioned(&out);
                        counts[0].fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counts[2].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    thread::sleep(Duration::from_millis(300));
    ms[1].freeze();
    thread::sleep(Duration::from_millis(1200));
    ms[1].resume();
    thread::sleep(Duration::from_millis(300));
    ms[2].restart();
    thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let slow = slowest.load(Ordering::Relaxed);
    println!(
        "hits {} misses {} errors {}; slowest call {slow} ms",
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed)
    );
    assert!(slow < 3000, "a call took {slow} ms with 300 ms deadlines");
    let mut c = mk().build().unwrap();
    let last = versioned(1 << 40, len_of(1 << 40));
    support::wait_for("a write over the recovered servers", || {
        c.set_chunked(b"spread", &last, SetOptions::default())
            .is_ok()
    });
    let mut out = Vec::new();
    assert!(c.get_chunked(b"spread", &mut out).unwrap().is_some());
    assert_eq!(check_versioned(&out), 1 << 40);
    // The shared client's connection to the restarted server may be the old one, closed by
    // the restart: its first call fails (end of stream) and the next reconnects.
    support::wait_for("the shared client to reach the restarted server", || {
        sc.get_chunked(b"spread", &mut out)
            .is_ok_and(|hit| hit.is_some())
    });
    assert_eq!(check_versioned(&out), 1 << 40);
}

// ---------------------------------------------------------------------------------------
// Hostile compressed values in the cache
// ---------------------------------------------------------------------------------------

fn packed(algo: Compression, value: &[u8]) -> (Vec<u8>, u32) {
    let c = Compressor::new(algo).min_size(0).max_decoded(usize::MAX);
    let mut out = Vec::new();
    let f = c.compress(value, &mut out).unwrap();
    assert_ne!(f, 0);
    (out, f)
}

/// Values whose flags say compressed and whose bytes lie, stored in memcached by someone
/// else: every read through `Compressed<Raw>` on each protocol and front (blocking and
/// async) is an `Error::Codec`, quickly, or (two zstd frames) the whole of what was
/// compressed; never a panic, never a part.
#[test]
fn hostile_compressed_values_are_codec_errors_on_every_front() {
    let m = Memcached::start();
    let zeros = vec![0u8; 80 << 20];
    let doc = b"<entry><title>x</title></entry>".repeat(200);
    let (lz4, lz4f) = packed(Compression::Lz4, &doc);
    let (zstd_a, zf) = packed(Compression::Zstd { level: 3 }, &doc);
    let (zstd_b, _) = packed(Compression::Zstd { level: 3 }, &b"tail!".repeat(300));
    let (zstd_bomb, _) = packed(Compression::Zstd { level: 1 }, &zeros);
    let (zlib_bomb, zlf) = packed(Compression::Zlib { level: 9 }, &zeros);
    let (zlib, _) = packed(Compression::Zlib { level: 6 }, &doc);
    drop(zeros);
    let mut cases: Vec<(&str, Vec<u8>, u32)> = Vec::new();
    let mut lie = lz4.clone();
    lie[..4].copy_from_slice(&(60u32 << 20).to_le_bytes());
    cases.push(("lz4 claims 60 MiB", lie, lz4f));
    let mut short = lz4.clone();
    short[..4].copy_from_slice(&((doc.len() - 1) as u32).to_le_bytes());
    cases.push(("lz4 claims a byte less", short, lz4f));
    cases.push((
        "lz4 claims 4 GiB",
        [&[0xff; 4][..], &lz4[4..]].concat(),
        lz4f,
    ));
    cases.push(("lz4 shorter than its length", vec![1, 0], lz4f));
    cases.push(("zstd frame of 80 MiB", zstd_bomb, zf));
    cases.push((
        "zstd frame and garbage",
        [&zstd_a[..], b"garbage!garbage!"].concat(),
        zf,
    ));
    cases.push(("zstd truncated", zstd_a[..zstd_a.len() - 3].to_vec(), zf));
    cases.push((
        "zstd with the dictionary flag",
        zstd_a.clone(),
        flags::ZSTD_DICT,
    ));
    cases.push(("zlib bomb of 80 MiB", zlib_bomb, zlf));
    cases.push(("zlib and trailing bytes", [&zlib[..], b"xx"].concat(), zlf));
    cases.push(("zlib and zstd bits", zlib.clone(), zlf | flags::ZSTD));
    cases.push(("unknown compression 0x7000", doc.clone(), 0x7000));
    cases.push(("lz4 bytes flagged zstd", lz4.clone(), zf));
    let two_frames = [&zstd_a[..], &zstd_b[..]].concat();
    let both: Vec<u8> = [&doc[..], &b"tail!".repeat(300)[..]].concat();

    let codec = Compressed::new(Raw, Compressor::new(Compression::None));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        let mut c = builder(&[m.addr()], p)
            .max_value_size(4 << 20)
            .build()
            .unwrap();
        let sc = builder(&[m.addr()], p)
            .max_value_size(4 << 20)
            .shared()
            .build()
            .unwrap();
        for (name, bytes, f) in &cases {
            c.set(b"hostile", bytes, SetOptions::default().flags(*f))
                .unwrap();
            let t = Instant::now();
            let r1 = c.get_as(&codec, b"hostile");
            let r2 = sc.get_as(&codec, b"hostile");
            let r3 = rt.block_on(sc.get_as_async(&codec, b"hostile"));
            let took = t.elapsed();
            for (front, r) in [("client", r1), ("shared", r2), ("async", r3)] {
                match r {
                    Err(e) => assert_eq!(e.kind(), ErrorKind::Codec, "{p:?} {front} {name}: {e}"),
                    Ok(v) => panic!("{p:?} {front} {name}: decoded to {:?}", v.map(|v| v.len())),
                }
            }
            assert!(took < Duration::from_secs(3), "{p:?} {name}: {took:?}");
        }
        c.set(b"two", &two_frames, SetOptions::default().flags(zf))
            .unwrap();
        match c.get_as(&codec, b"two") {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Codec),
            Ok(v) => assert_eq!(v.unwrap(), both, "two zstd frames: not a part of them"),
        }
        // A CHUNKED flag on bytes that are no index.
        c.set(
            b"fake-index",
            b"MCCHUNK1 but not really",
            SetOptions::default().flags(flags::CHUNKED),
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            c.get_chunked(b"fake-index", &mut out).unwrap_err().kind(),
            ErrorKind::Codec
        );
        assert_eq!(
            sc.get_chunked(b"fake-index", &mut out).unwrap_err().kind(),
            ErrorKind::Codec
        );
        // Through Json: a compressed JSON value whose inner flags are wrong.
        let json = Compressed::new(Json, Compressor::new(Compression::None));
        c.set(
            b"json",
            &zlib,
            SetOptions::default().flags(zlf | flags::POSTCARD),
        )
        .unwrap();
        let r: mcstore::Result<Option<serde_json::Value>> = c.get_as(&json, b"json");
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Codec);
    }
}

// ---------------------------------------------------------------------------------------
// The storage: chunked and compressed entries
// ---------------------------------------------------------------------------------------

/// Never stale with chunks: a writer puts new versions of content over the item size while
/// readers read through two storages sharing the cache and master with different settings
/// (one compresses with lz4 and chunks at 4 KiB, the other chunks at 6 KiB and does not
/// compress): a read that starts after a put returned sees that version or a newer one.
#[test]
fn chunked_storage_reads_are_never_older_than_a_returned_put() {
    for (p, shared) in [
        (Protocol::Text, false),
        (Protocol::Meta, true),
        (Protocol::Binary, true),
    ] {
        let m = Memcached::start();
        let dir = TempDir::new("values-attack-stale");
        let cache = || -> CacheClients {
            match shared {
                true => shared_with(&m, p).into(),
                false => pool_with(&m, p).into(),
            }
        };
        let a = Arc::new(
            storage_builder(cache(), &dir.path)
                .max_item_size(4096)
                .chunked_values(16 << 20)
                .compression(Compressor::new(Compression::Lz4).min_size(100))
                .build(),
        );
        let b = Arc::new(
            storage_builder(cache(), &dir.path)
                .max_item_size(6000)
                .chunked_values(16 << 20)
                .build(),
        );
        a.create_container("docs").unwrap();
        let info = a.info("docs", Some("x.bin")).unwrap();
        // Half compressible (lz4 shrinks it, still over 4 KiB), half not.
        let content = |v: u64| -> Vec<u8> {
            let mut c = versioned(v, 12_000);
            c.extend(std::iter::repeat_n((v % 251) as u8, 12_000));
            c
        };
        let check = |bytes: &[u8]| -> u64 {
            let v = version_of(&bytes[..12_000], 12_000);
            assert!(bytes[12_000..].iter().all(|&x| x == (v % 251) as u8));
            assert_eq!(bytes.len(), 24_000);
            v
        };
        a.put_content(&info, (&content(1)).into()).unwrap();
        let committed = Arc::new(AtomicU64::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for r in 0..3 {
            let s: Arc<dyn Storage> = if r % 2 == 0 { a.clone() } else { b.clone() };
            let (committed, stop, info) = (committed.clone(), stop.clone(), info.clone());
            readers.push(thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let before = committed.load(Ordering::SeqCst);
                    let got = s.get_content(&info).unwrap();
                    let v = check(&got);
                    assert!(
                        v >= before,
                        "{p:?} shared={shared} reader {r}: read version {v} after the put of \
                         {before} returned"
                    );
                    n += 1;
                }
                n
            }));
        }
        let until = Instant::now() + Duration::from_millis(1500);
        let mut v = 1;
        while Instant::now() < until {
            v += 1;
            let w: &dyn Storage = if v % 3 == 0 { &*b } else { &*a };
            w.put_content(&info, (&content(v)).into()).unwrap();
            committed.store(v, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(3));
        }
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
        let (ca, cb) = (a.counters(), b.counters());
        println!("{p:?} shared={shared}: {v} puts, {reads} reads; a {ca:?}; b {cb:?}");
        assert!(ca.chunked_hits + cb.chunked_hits > 0);
    }
}

/// `compression` says "compressed entries carry the algorithm in their flags, so storages
/// with other settings (or none) still read them". A storage without the writer's zstd
/// dictionary cannot: every read of the entry counts a cache error and goes to the master,
/// and since the entry is "not this storage's" it is never replaced (fill.rs `found` /
/// `lookup_lease`: `Found::Other(_) => Lookup::Master`), so until the TTL that storage never
/// gets a hit on the key.
#[test]
fn storage_without_the_dictionary_still_gets_hits() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-dict");
    let samples: Vec<Vec<u8>> = (0..300)
        .map(|i| format!("{{\"id\":{i},\"name\":\"user{i}\",\"tags\":[\"a\",\"b\"],\"bio\":\"lorem ipsum {i}\"}}").into_bytes())
        .collect();
    let dict = Arc::new(mcstore::codec::ZstdDictionary::train(&samples, 4096).unwrap());
    let a = storage_builder(pool_with(&m, Protocol::Text), &dir.path)
        .compression(Compressor::new(Compression::ZstdDict { level: 3, dict }).min_size(100))
        .build();
    let b = storage_builder(pool_with(&m, Protocol::Text), &dir.path)
        .compression(Compressor::new(Compression::Zstd { level: 3 }).min_size(100))
        .build();
    a.create_container("docs").unwrap();
    let info = a.info("docs", Some("user.json")).unwrap();
    let doc: Vec<u8> = samples[..40].concat();
    a.put_content(&info, (&doc).into()).unwrap();
    assert_eq!(&a.get_content(&info).unwrap()[..], &doc[..]);
    assert!(a.counters().compressed_fills >= 1, "{:?}", a.counters());
    for _ in 0..5 {
        assert_eq!(&b.get_content(&info).unwrap()[..], &doc[..]);
    }
    let c = b.counters();
    // The entry it cannot read is counted once and deleted; its own fill serves the rest.
    assert!(
        c.hits >= 3 && c.cache_errors <= 1,
        "a storage without the dictionary on an entry a storage with it filled: {c:?}"
    );
}

/// A storage whose compressor's `max_decoded` is below content it caches: it fills entries
/// (compressed; chunked when still over the item size) that it can never read back. Each
/// read then counts a cache error and reads the master, and for a chunked entry first
/// fetches every chunk, for ever: `encode_entry` (entry.rs) compresses without checking
/// that the content is within `max_decoded`, and `read_chunks` does not forget an index
/// whose content does not decompress.
#[test]
fn storage_does_not_fill_entries_it_cannot_read_back() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-maxdec");
    let s = storage_builder(pool_with(&m, Protocol::Meta), &dir.path)
        .max_item_size(4096)
        .chunked_values(16 << 20)
        .compression(
            Compressor::new(Compression::Lz4)
                .min_size(100)
                .max_decoded(64 * 1024),
        )
        .build();
    s.create_container("docs").unwrap();
    let small = s.info("docs", Some("small.xml")).unwrap();
    let big = s.info("docs", Some("big.xml")).unwrap();
    // 100 KB that lz4 packs under 4 KiB (a plain compressed entry), and 400 KB that it packs
    // to more than 4 KiB (a compressed, chunked entry).
    let doc = b"<entry><title>t</title></entry>\n".repeat(3200);
    let mut x = 1u64;
    let noisy: Vec<u8> = (0..400_000)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 2 == 0 {
                b'a'
            } else {
                b'a' + (x % 16) as u8
            }
        })
        .collect();
    s.put_content(&small, (&doc).into()).unwrap();
    s.put_content(&big, (&noisy).into()).unwrap();
    for _ in 0..4 {
        assert_eq!(&s.get_content(&small).unwrap()[..], &doc[..]);
        assert_eq!(&s.get_content(&big).unwrap()[..], &noisy[..]);
    }
    let c = s.counters();
    println!("{c:?}");
    assert!(
        c.cache_errors == 0 && c.master_reads <= 4,
        "content over max_decoded: filled, never read back: {c:?}"
    );
}

/// A storage over a pool of ONE client, chunked content, several threads: the chunk calls
/// check a client out of the pool (`unpinned`), so a path that held the pool's client
/// meanwhile would wait on itself. Every read completes, whole, with hits and no cache
/// errors.
#[test]
fn chunked_storage_over_a_pool_of_one_client_does_not_wait_on_itself() {
    let m = Memcached::start();
    let dir = TempDir::new("values-attack-pool1");
    let s = Arc::new(
        storage_builder(
            Pool::new(cache_builder(&m, Protocol::Text), 1).unwrap(),
            &dir.path,
        )
        .max_item_size(4096)
        .chunked_values(16 << 20)
        .compression(Compressor::new(Compression::Zstd { level: 1 }).min_size(100))
        .build(),
    );
    s.create_container("docs").unwrap();
    let infos: Vec<_> = (0..4)
        .map(|i| s.info("docs", Some(&format!("d{i}.bin"))).unwrap())
        .collect();
    for (i, info) in infos.iter().enumerate() {
        s.put_content(info, (&versioned(i as u64, 30_000)).into())
            .unwrap();
    }
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (s, infos) = (s.clone(), infos.clone());
            thread::spawn(move || {
                for n in 0..40 {
                    let i = (t + n) % infos.len();
                    let v = s.get_content(&infos[i]).unwrap();
                    assert_eq!(version_of(&v, 30_000), i as u64);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let c = s.counters();
    println!("{:?} in {:?}", c, start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(c.chunked_hits > 100 && c.cache_errors == 0, "{c:?}");
}

/// A `set_chunked` that fails part-way (one of two servers frozen) returns an error and
/// does not write the index, but leaves the chunks it did store on the other server; with
/// TTL 0 they never expire ("its orphan chunks expire", says the chunked module): every
/// failed write leaks its chunks until evicted. They should be deleted (best effort), as
/// the storage does (`delete_chunks` when a fill is not stored). Counted on the server that
/// answered only.
#[test]
fn failed_set_chunked_does_not_leave_chunks_that_never_expire() {
    let ms: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let addrs: Vec<String> = ms.iter().map(Memcached::addr).collect();
    let mut c = builder(&addrs, Protocol::Text)
        .max_value_size(16 * 1024)
        .build()
        .unwrap();
    let value = versioned(1, 200_000);
    c.set_chunked(b"leaky", &value, SetOptions::default())
        .unwrap();
    let chunk_keys = |mc: &Memcached| -> Vec<(Vec<u8>, String)> {
        let mut raw = mc.client();
        let mut keys = Vec::new();
        raw.dump_keys(&mc.addr(), |k, meta| {
            if k.starts_with(b"mcstore-chunk:") {
                keys.push((k.to_vec(), meta.to_string()));
            }
        })
        .unwrap();
        keys
    };
    ms[1].freeze();
    let r = c.set_chunked(b"leaky", &versioned(2, 200_000), SetOptions::default());
    ms[1].resume();
    assert!(r.is_err(), "a chunk went to the frozen server");
    // Let the resumed server process what was queued.
    thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    support::wait_for("the servers answer", || {
        c.get_chunked(b"leaky", &mut out).is_ok()
    });
    assert!(c.get_chunked(b"leaky", &mut out).unwrap().is_some());
    assert_eq!(
        version_of(&out, 200_000),
        1,
        "the failed write's index was not written"
    );
    // The index's generation; every chunk key of another generation is an orphan. (A
    // metadump can miss items: dump a few times, then check each orphan with a get.)
    let mut raw = builder(&addrs, Protocol::Text).build().unwrap();
    let index = ChunkIndex::parse(&raw.get(b"leaky").unwrap().unwrap().value).unwrap();
    let current = format!(":{:016x}:", index.generation);
    let mut orphans = std::collections::BTreeSet::new();
    // Only on the server that answered (what the frozen one took in after it resumed, the
    // writer could not have deleted).
    for _ in 0..3 {
        for m in &ms[..1] {
            for (k, meta) in chunk_keys(m) {
                if !String::from_utf8_lossy(&k).contains(&current) {
                    orphans.insert((k, meta));
                }
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    let live: Vec<_> = orphans
        .into_iter()
        .filter(|(k, _)| raw.get(k).unwrap().is_some())
        .collect();
    for (k, meta) in &live {
        println!("orphan {} {meta}", String::from_utf8_lossy(k));
    }
    assert!(
        live.is_empty(),
        "a failed set_chunked left {} chunks no index names, without expiry",
        live.len()
    );
}
