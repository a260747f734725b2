//! Attacks on zones (`ClientBuilder::zone`, `prefer_zone`, `write_only_zone`,
//! `set_zone_write_only`) and `read_miss_failover`, against real memcached.

use mcstore_test_support as support;

use std::time::Duration;

use mcstore::client::{Item, MetaGetOptions};
use mcstore::{CasResult, Client, ClientBuilder, Hedge, Protocol, SetOptions, SharedClient};
use support::Memcached;

const O: SetOptions = SetOptions { ttl: 0, flags: 0 };

fn addr(m: &Memcached) -> String {
    m.addr()
}

/// One server per zone: zone `names[k]` is `ms[k]` (a key's copy in zone k is server k).
fn zoned(ms: &[Memcached], names: &[&str], p: Protocol) -> ClientBuilder {
    let mut b = support::client_builder()
        .protocol(p)
        .io_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500));
    for (m, n) in ms.iter().zip(names) {
        b = b.zone(*n, [addr(m)]);
    }
    b
}

fn val(r: mcstore::Result<Option<Item>>) -> Option<String> {
    r.unwrap().map(|i| String::from_utf8(i.value).unwrap())
}

/// A write-only zone serves no read: `meta_get` (and `meta_debug`) included, even when the
/// readable zone's copy is down. A plain `get` then fails or misses; `meta_get` must too.
#[test]
fn meta_get_never_reads_a_write_only_zone_client() {
    meta_get_write_only(false);
}

#[test]
fn meta_get_never_reads_a_write_only_zone_shared() {
    meta_get_write_only(true);
}

fn meta_get_write_only(shared: bool) {
    {
        let mut ms = vec![Memcached::start(), Memcached::start()];
        let b = zoned(&ms, &["a", "b"], Protocol::Meta).write_only_zone("b");
        let key = b"wo:key";
        let mut c = b.clone().build().unwrap();
        let s = b.clone().shared().build().unwrap();
        c.set(key, b"good", O).unwrap();
        // Zone b warming: it holds something else (a warming zone's content is not to be
        // trusted; that is why it is write-only).
        ms[1]
            .client()
            .set(key, b"junk-from-write-only-zone", O)
            .unwrap();
        // The readable zone goes away.
        ms[0].kill();
        let who = if shared { "SharedClient" } else { "Client" };
        let get = if shared { s.get(key) } else { c.get(key) };
        assert!(
            !matches!(&get, Ok(Some(i)) if i.value == b"junk-from-write-only-zone"),
            "{who}: get read the write-only zone: {get:?}"
        );
        let mut buf = Vec::new();
        let r = if shared {
            s.meta_get(key, MetaGetOptions::default(), &mut buf)
        } else {
            c.meta_get(key, MetaGetOptions::default(), &mut buf)
        };
        assert!(
            !(matches!(r, Ok(Some(_))) && buf == b"junk-from-write-only-zone"),
            "{who}: meta_get read the write-only zone b: {:?}",
            String::from_utf8_lossy(&buf)
        );
        let d = if shared {
            s.meta_debug(key)
        } else {
            c.meta_debug(key)
        };
        assert!(
            !matches!(d, Ok(Some(_))),
            "{who}: meta_debug read the write-only zone b: {d:?}"
        );
    }
}

/// A counter lives on the first copy (zones in configuration order, write-only ones last).
/// Zone `a` warms up (write-only), the counter is made and bumped (on b), then `a` is made
/// readable: the counter must still count.
#[test]
fn a_counter_survives_a_zone_made_readable() {
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = zoned(&ms, &["a", "b"], Protocol::Text).write_only_zone("a");
    let mut c = b.build().unwrap();
    let key = b"ctr";
    c.set(key, b"10", O).unwrap();
    assert_eq!(c.incr(key, 1).unwrap(), Some(11));
    c.set_zone_write_only("a", false).unwrap();
    let r = c.incr(key, 1).unwrap();
    let on_b = ms[1].client().get(key).unwrap().map(|i| i.value);
    assert_eq!(
        r,
        Some(12),
        "incr after zone a became readable (zone b still holds {:?})",
        on_b.map(|v| String::from_utf8_lossy(&v).into_owned())
    );
}

/// Two applications preferring different zones: a `gets` by one and a `cas` by the other
/// agree (canonical order), and a counter is bumped on the same copy by both.
#[test]
fn gets_cas_and_counters_agree_across_preferred_zones() {
    let ms = vec![Memcached::start(), Memcached::start(), Memcached::start()];
    let b = zoned(&ms, &["a", "b", "c"], Protocol::Text);
    let mut pa = b.clone().prefer_zone("a").build().unwrap();
    let mut pb = b.clone().prefer_zone("b").build().unwrap();
    let sc = b.clone().prefer_zone("c").shared().build().unwrap();
    for k in 0..20 {
        let key = format!("agree:{k}");
        let key = key.as_bytes();
        pa.set(key, b"v0", O).unwrap();
        // Different content per zone, behind the clients' backs.
        for (i, m) in ms.iter().enumerate() {
            m.client().set(key, format!("z{i}").as_bytes(), O).unwrap();
        }
        let g1 = pb.gets(key).unwrap().unwrap();
        let g2 = sc.gets(key).unwrap().unwrap();
        assert_eq!(g1.value, b"z0", "gets reads the first zone");
        assert_eq!((g1.value.clone(), g1.cas), (g2.value, g2.cas));
        assert_eq!(
            pa.cas(key, b"new", g1.cas.unwrap(), O).unwrap(),
            CasResult::Stored
        );
        // Every zone now reads "new" or nothing (deleted); never the old zone content.
        for c in [&mut pa, &mut pb] {
            let v = val(c.get(key));
            assert!(v.is_none() || v.as_deref() == Some("new"), "{v:?}");
        }
        let v = val(sc.get(key));
        assert!(v.is_none() || v.as_deref() == Some("new"), "{v:?}");
        // Counters: every client bumps the one copy.
        let ck = format!("agree:ctr:{k}");
        let ck = ck.as_bytes();
        pb.set(ck, b"0", O).unwrap();
        assert_eq!(pa.incr(ck, 1).unwrap(), Some(1));
        assert_eq!(pb.incr(ck, 1).unwrap(), Some(2));
        assert_eq!(sc.incr(ck, 1).unwrap(), Some(3));
        assert_eq!(pb.decr(ck, 1).unwrap(), Some(2));
    }
}

/// Miss failover and hedges never read a write-only zone: every readable copy misses, the
/// write-only copy holds the key, and the read misses. Toggled back, it is read again.
#[test]
fn miss_failover_and_hedges_skip_write_only_zones() {
    let ms = vec![Memcached::start(), Memcached::start(), Memcached::start()];
    let b = zoned(&ms, &["a", "b", "c"], Protocol::Text)
        .read_miss_failover(true)
        .hedge(Hedge::after(Duration::from_micros(1)))
        .write_only_zone("c");
    let mut c = b.clone().build().unwrap();
    let s = b.clone().shared().build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for k in 0..30 {
        let key = format!("wo-miss:{k}");
        let key = key.as_bytes();
        c.set(key, b"v", O).unwrap();
        ms[0].client().delete(key).unwrap();
        ms[1].client().delete(key).unwrap();
        assert_eq!(val(c.get(key)), None, "Client: read the write-only copy");
        assert_eq!(
            val(s.get(key)),
            None,
            "SharedClient: read the write-only copy"
        );
        assert_eq!(
            val(rt.block_on(s.get_async(key))),
            None,
            "async: read the write-only copy"
        );
        assert_eq!(val(s.gets(key)), None, "SharedClient gets");
        assert_eq!(val(c.gets(key)), None, "Client gets");
    }
    // Zone c readable again: the missing copies fail over to it.
    s.set_zone_write_only("c", false).unwrap();
    c.set_zone_write_only("c", false).unwrap();
    for k in 0..30 {
        let key = format!("wo-miss:{k}");
        let key = key.as_bytes();
        assert_eq!(val(c.get(key)).as_deref(), Some("v"), "Client after toggle");
        assert_eq!(
            val(s.get(key)).as_deref(),
            Some("v"),
            "SharedClient after toggle"
        );
    }
}

/// CopyRead's buffers: the preferred copy is frozen (the caller's buffer is with its try),
/// the hedge goes to the next copy which misses, the miss fails over to the third copy,
/// which hits: the caller gets the third copy's value, whole; later calls on the same
/// thread (the spare buffer reused) and after SIGCONT (the frozen copy's late reply read
/// and dropped) get their own values.
#[test]
fn a_miss_failover_while_a_hedge_is_out_keeps_the_buffers_straight() {
    let ms = [Memcached::start(), Memcached::start(), Memcached::start()];
    let b = support::client_builder()
        .zone("a", [addr(&ms[0])])
        .zone("b", [addr(&ms[1])])
        .zone("c", [addr(&ms[2])])
        .read_miss_failover(true)
        .hedge(Hedge::after(Duration::from_millis(5)))
        .io_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(3));
    let s: SharedClient = b.shared().build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let long_c = "C".repeat(40_000);
    let keys: Vec<String> = (0..4).map(|k| format!("buf:{k}")).collect();
    for k in &keys {
        s.set(k.as_bytes(), b"x", O).unwrap();
        ms[0].client().set(k.as_bytes(), b"A-short", O).unwrap();
        ms[1].client().delete(k.as_bytes()).unwrap();
        ms[2]
            .client()
            .set(k.as_bytes(), long_c.as_bytes(), O)
            .unwrap();
    }
    // Warm the spare buffer with a big value from another key on this thread.
    s.set(b"big", "S".repeat(100_000).as_bytes(), O).unwrap();
    assert_eq!(s.get(b"big").unwrap().unwrap().value.len(), 100_000);
    ms[0].freeze();
    let before = s.fleet_counters();
    for (n, k) in keys.iter().enumerate() {
        let mut buf = b"caller-garbage".to_vec();
        let r = if n % 2 == 0 {
            s.get_into(k.as_bytes(), &mut buf)
        } else {
            rt.block_on(s.get_into_async(k.as_bytes(), &mut buf))
        };
        let info = r.unwrap();
        assert!(info.is_some(), "{k}: a miss; the third copy holds it");
        assert_eq!(
            buf.len(),
            long_c.len(),
            "{k}: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        );
        assert!(buf == long_c.as_bytes(), "{k}: wrong bytes");
    }
    let after = s.fleet_counters();
    assert!(
        after.hedges_sent > before.hedges_sent,
        "the hedge path was taken: {before:?} -> {after:?}"
    );
    ms[0].resume();
    // The frozen copy's replies arrive late: every later reply is its own caller's.
    support::wait_for(
        "zone a answers through the client",
        || matches!(s.get(keys[0].as_bytes()), Ok(Some(i)) if i.value == b"A-short"),
    );
    for round in 0..50 {
        for (i, m) in ms.iter().enumerate() {
            let k = format!("after:{round}:{i}");
            s.set(k.as_bytes(), format!("v{round}").as_bytes(), O)
                .unwrap();
            let _ = m;
        }
        for i in 0..3 {
            let k = format!("after:{round}:{i}");
            assert_eq!(
                val(s.get(k.as_bytes())).as_deref(),
                Some(format!("v{round}").as_str()),
                "{k}"
            );
        }
    }
}

/// `set_zone_write_only` toggled under concurrent writers and readers (each thread its own
/// key): every read sees the value its thread last wrote or a miss, and no call fails,
/// panics or hangs.
#[test]
fn write_only_toggles_under_load_serve_only_written_values() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let ms = vec![Memcached::start(), Memcached::start()];
    let b = zoned(&ms, &["a", "b"], Protocol::Text).prefer_zone("b");
    let s = b.clone().shared().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<[AtomicU64; 2]> = Arc::new(Default::default());
    let mut threads = Vec::new();
    for t in 0..2 {
        let (s, stop, done) = (s.clone(), stop.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("tog:{t}");
                let v = format!("{t}:{n}");
                s.set(key.as_bytes(), v.as_bytes(), O).unwrap();
                if let Some(i) = s.get(key.as_bytes()).unwrap() {
                    assert_eq!(i.value, v.as_bytes(), "{key}");
                }
                n += 1;
                done[t].store(n, Ordering::Relaxed);
            }
        }));
    }
    let mut i = 0u64;
    support::wait_for("both threads to make 300 rounds under toggles", || {
        s.set_zone_write_only(if i % 2 == 0 { "a" } else { "b" }, i % 4 < 2)
            .unwrap();
        i += 1;
        done.iter().all(|d| d.load(Ordering::Relaxed) >= 300)
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    s.set_zone_write_only("a", false).unwrap();
    s.set_zone_write_only("b", false).unwrap();
    let _ = Client::builder;
}
