//! What only the meta protocol can do, against a real memcached: binary keys, leases,
//! invalidation, TTL and access metadata, CAS-guarded fills.

use mcstore_test_support as support;

use mcstore::{
    Client, Error, KeyError, Lease, MetaGetOptions, MetaSetOptions, Protocol, SetOptions,
    SetOutcome, StoreMode,
};
use support::Memcached;

fn meta(mc: &Memcached) -> Client {
    mc.client_with(Protocol::Meta)
}

/// Keys with every byte value 0..=255 in them, 1 to 186 bytes long.
fn binary_keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b, b'k', b]).collect();
    for len in [1usize, 2, 3, 4, 5, 62, 63, 64, 185, 186] {
        keys.push((0..len).map(|i| (i * 37 + len) as u8).collect());
    }
    keys.push(vec![0u8; 186]);
    keys.push(vec![0xffu8; 186]);
    keys.push(b"with space".to_vec());
    keys.push(b"crlf\r\nmg x v".to_vec());
    keys
}

#[test]
fn binary_keys_round_trip() {
    let mc = Memcached::start();
    let mut c = meta(&mc);
    let keys = binary_keys();
    for (n, k) in keys.iter().enumerate() {
        c.set(k, format!("v{n}").as_bytes(), SetOptions::default())
            .unwrap();
    }
    // Each key is its own item: read back one by one, then all at once.
    for (n, k) in keys.iter().enumerate() {
        let got = c
            .get(k)
            .unwrap()
            .unwrap_or_else(|| panic!("key {n} missing"));
        assert_eq!(got.value, format!("v{n}").as_bytes(), "key {n}");
    }
    let mut seen = vec![false; keys.len()];
    c.get_multi(&keys, |k, item| {
        let n = keys.iter().position(|x| x == k).unwrap();
        assert_eq!(item.value, format!("v{n}").as_bytes());
        seen[n] = true;
    })
    .unwrap();
    assert!(
        seen.iter().all(|&s| s),
        "every binary key came back in the multi-get"
    );
    assert_eq!(
        mc.client().stats(None).unwrap()[0].get("curr_items"),
        Some(keys.len().to_string().as_str())
    );
    // A binary key is not the same item as the text key spelling its base64 form.
    assert_eq!(c.get(b"YSBi").unwrap(), None, "'a b' is sent as YSBi + b");
    c.set(b"a b", b"binary", SetOptions::default()).unwrap();
    c.set(b"YSBi", b"text", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"a b").unwrap().unwrap().value, b"binary");
    assert_eq!(c.get(b"YSBi").unwrap().unwrap().value, b"text");
    // The other commands take binary keys too.
    let k = &keys[0];
    assert!(c.append(k, b"+").unwrap());
    assert_eq!(c.get(k).unwrap().unwrap().value, b"v0+");
    c.set(k, b"41", SetOptions::default()).unwrap();
    assert_eq!(c.incr(k, 1).unwrap(), Some(42));
    assert!(c.touch(k, 100).unwrap());
    let cas = c.gets(k).unwrap().unwrap().cas.unwrap();
    assert_eq!(
        c.cas(k, b"x", cas, SetOptions::default()).unwrap(),
        mcstore::CasResult::Stored
    );
    assert!(c.delete(k).unwrap());
    assert_eq!(c.get(k).unwrap(), None);
    assert_eq!(c.delete_multi(&keys).unwrap(), keys.len() - 1);
    let items: Vec<(Vec<u8>, &[u8])> = keys.iter().map(|k| (k.clone(), &b"m"[..])).collect();
    assert_eq!(
        c.set_multi(&items, SetOptions::default()).unwrap(),
        keys.len()
    );
    let mut p = c.pipeline();
    for k in &keys {
        p.set(k, b"p", SetOptions::default()).unwrap();
    }
    assert_eq!(p.finish().unwrap().errors, 0);
    for k in &keys {
        assert_eq!(c.get(k).unwrap().unwrap().value, b"p");
    }
}

#[test]
fn binary_key_limits() {
    let mc = Memcached::start();
    let mut c = meta(&mc);
    let too_long = vec![0u8; 187];
    for r in [
        c.get(&too_long).map(drop),
        c.set(&too_long, b"v", SetOptions::default()),
        c.get_multi(&[&b"ok"[..], &too_long], |_, _| {}),
    ] {
        assert!(
            matches!(r, Err(Error::InvalidKey(KeyError::BinaryTooLong(187)))),
            "{r:?}"
        );
    }
    assert!(matches!(
        c.get(b""),
        Err(Error::InvalidKey(KeyError::Empty))
    ));
    // A text key may still be 250 bytes; a binary one 186.
    c.set(&[b'k'; 250], b"t", SetOptions::default()).unwrap();
    assert!(c.get(&[b'k'; 250]).unwrap().is_some());
    // With a namespace, the namespaced key is what must fit.
    let mut ns = support::client_builder()
        .server(mc.addr())
        .protocol(Protocol::Meta)
        .namespace("ns:")
        .build()
        .unwrap();
    ns.set(&[0u8; 183], b"fits", SetOptions::default()).unwrap();
    let mut raw = b"ns:".to_vec();
    raw.extend_from_slice(&[0u8; 183]);
    assert_eq!(c.get(&raw).unwrap().unwrap().value, b"fits");
    assert!(matches!(
        ns.get(&[0u8; 184]),
        Err(Error::InvalidKey(KeyError::BinaryTooLong(187)))
    ));
}

#[test]
fn leases_let_one_caller_recompute() {
    let mc = Memcached::start();
    let mut a = meta(&mc);
    let mut b = meta(&mc);
    let lease = MetaGetOptions {
        lease_ttl: Some(30),
        ..MetaGetOptions::default()
    };
    let mut buf = Vec::new();
    // A plain miss without a lease.
    assert_eq!(
        a.meta_get(b"k", MetaGetOptions::default(), &mut buf)
            .unwrap(),
        None
    );
    // The first caller wins, the second sees it already won; both get an empty placeholder.
    let won = a.meta_get(b"k", lease, &mut buf).unwrap().unwrap();
    assert_eq!((won.lease, buf.len()), (Lease::Won, 0));
    // (1.6.18 reports `t-1` on the winning reply itself when `f c` come first; the
    // placeholder does get the lease TTL, as the next reply shows.)
    let lost = b.meta_get(b"k", lease, &mut buf).unwrap().unwrap();
    assert_eq!(
        (lost.lease, lost.cas, buf.len()),
        (Lease::AlreadyWon, won.cas, 0)
    );
    assert!(
        lost.ttl.is_some_and(|t| t > 25 && t <= 30),
        "{:?}",
        lost.ttl
    );
    // The winner fills with its lease's CAS.
    let fill = MetaSetOptions {
        cas: Some(won.cas),
        set: SetOptions::default().ttl(300).flags(9),
        ..MetaSetOptions::default()
    };
    let stored = a.meta_set(b"k", b"computed", fill).unwrap();
    assert_eq!(stored.outcome, SetOutcome::Stored);
    assert!(stored.cas.is_some_and(|c| c != won.cas));
    let hit = b.meta_get(b"k", lease, &mut buf).unwrap().unwrap();
    assert_eq!((hit.lease, hit.stale, hit.flags), (Lease::None, false, 9));
    assert_eq!(buf, b"computed");
    assert_eq!(hit.cas, stored.cas.unwrap());
    assert!(
        hit.ttl.is_some_and(|t| t > 290 && t <= 300),
        "{:?}",
        hit.ttl
    );
    assert!(!hit.hit_before && hit.last_access < 5);
    let again = b.meta_get(b"k", lease, &mut buf).unwrap().unwrap();
    assert!(again.hit_before);
}

#[test]
fn invalidation_defeats_an_older_lease() {
    let mc = Memcached::start();
    let mut filler = meta(&mc);
    let mut writer = meta(&mc);
    let mut buf = Vec::new();
    let lease = MetaGetOptions {
        lease_ttl: Some(30),
        ..MetaGetOptions::default()
    };
    let won = filler.meta_get(b"r", lease, &mut buf).unwrap().unwrap();
    assert_eq!(won.lease, Lease::Won);
    // A writer changes the source and invalidates: the placeholder's CAS moves on.
    assert!(writer.invalidate(b"r", Some(30)).unwrap());
    // The filler read the source before the write: its fill must not land.
    let late = filler
        .meta_set(
            b"r",
            b"old value",
            MetaSetOptions {
                cas: Some(won.cas),
                ..MetaSetOptions::default()
            },
        )
        .unwrap();
    assert_eq!(late.outcome, SetOutcome::Exists);
    // The next reader sees a stale item and wins the right to refresh it; the one after is told
    // someone already has.
    let next = filler.meta_get(b"r", lease, &mut buf).unwrap().unwrap();
    assert!(next.stale);
    assert_eq!(next.lease, Lease::Won);
    let other = writer.meta_get(b"r", lease, &mut buf).unwrap().unwrap();
    assert!(other.stale);
    assert_eq!(other.lease, Lease::AlreadyWon);
    let fresh = filler
        .meta_set(
            b"r",
            b"new value",
            MetaSetOptions {
                cas: Some(next.cas),
                ..MetaSetOptions::default()
            },
        )
        .unwrap();
    assert_eq!(fresh.outcome, SetOutcome::Stored);
    let now = writer.meta_get(b"r", lease, &mut buf).unwrap().unwrap();
    assert_eq!(
        (now.stale, now.lease, &buf[..]),
        (false, Lease::None, &b"new value"[..])
    );
    // Invalidating a missing key says so.
    assert!(!writer.invalidate(b"missing", None).unwrap());
}

#[test]
fn early_recache_and_touch_and_modes() {
    let mc = Memcached::start();
    let mut c = meta(&mc);
    let mut buf = Vec::new();
    c.set(b"k", b"v", SetOptions::default().ttl(100)).unwrap();
    let recache = MetaGetOptions {
        recache_below: Some(200),
        ..MetaGetOptions::default()
    };
    let first = c.meta_get(b"k", recache, &mut buf).unwrap().unwrap();
    assert_eq!((first.lease, &buf[..]), (Lease::Won, &b"v"[..]));
    let second = c.meta_get(b"k", recache, &mut buf).unwrap().unwrap();
    assert_eq!((second.lease, &buf[..]), (Lease::AlreadyWon, &b"v"[..]));
    // Touch through meta_get; a never-expiring item reports no TTL.
    let touched = c
        .meta_get(
            b"k",
            MetaGetOptions {
                touch: Some(0),
                ..MetaGetOptions::default()
            },
            &mut buf,
        )
        .unwrap()
        .unwrap();
    let _ = touched;
    let after = c
        .meta_get(b"k", MetaGetOptions::default(), &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(after.ttl, None);
    // Modes and CAS outcomes through meta_set.
    let set = |mode, cas| MetaSetOptions {
        mode,
        cas,
        ..MetaSetOptions::default()
    };
    assert_eq!(
        c.meta_set(b"k", b"x", set(StoreMode::Add, None))
            .unwrap()
            .outcome,
        SetOutcome::NotStored
    );
    assert_eq!(
        c.meta_set(b"new", b"x", set(StoreMode::Replace, None))
            .unwrap()
            .outcome,
        SetOutcome::NotStored
    );
    assert_eq!(
        c.meta_set(b"new", b"x", set(StoreMode::Set, Some(1)))
            .unwrap()
            .outcome,
        SetOutcome::NotFound
    );
    assert_eq!(
        c.meta_set(b"k", b"x", set(StoreMode::Set, Some(first.cas + 1000)))
            .unwrap()
            .outcome,
        SetOutcome::Exists
    );
    let r = c
        .meta_set(b"k", b"!", set(StoreMode::Append, None))
        .unwrap();
    assert_eq!(r.outcome, SetOutcome::Stored);
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v!");
    // The debug line.
    let dbg = c.meta_debug(b"k").unwrap().unwrap();
    assert!(dbg.starts_with("k exp=") && dbg.contains("size="), "{dbg}");
    assert_eq!(c.meta_debug(b"nope").unwrap(), None);
}

#[test]
fn meta_only_calls_are_refused_on_other_protocols() {
    let mc = Memcached::start();
    for p in [Protocol::Text, Protocol::Binary] {
        let mut c = mc.client_with(p);
        let mut buf = Vec::new();
        assert!(matches!(
            c.meta_get(b"k", MetaGetOptions::default(), &mut buf),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            c.invalidate(b"k", None),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            c.meta_set(b"k", b"v", MetaSetOptions::default()),
            Err(Error::Unsupported { .. })
        ));
        // Binary keys stay refused where they cannot be sent safely.
        assert!(matches!(
            c.get(b"a b"),
            Err(Error::InvalidKey(KeyError::BadByte { .. }))
        ));
    }
}
