//! Review attack on the copies' batches (Client writes and multi-key calls with copies in one
//! batch per server, SharedClient multi-key calls many keys at once): duplicate keys, empty
//! lists, an invalid key in the middle, conditional writes per copy on meta and binary,
//! hostile copies, a frozen copy under both write policies, namespaces and binary keys.

use mcstore_test_support as support;

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, Protocol, SetOptions, WritePolicy};
use support::{Hostile, Memcached};

const O: SetOptions = SetOptions { ttl: 0, flags: 0 };
const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Meta, Protocol::Binary];

/// Every key on both servers (two servers, two copies).
fn both(addrs: &[String], p: Protocol) -> ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(addrs.to_vec())
        .distribution(Distribution::Ketama)
        .replicas(2)
        .io_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
}

fn pair() -> ([Memcached; 2], Vec<String>) {
    let ms = [Memcached::start(), Memcached::start()];
    let addrs = ms.iter().map(Memcached::addr).collect();
    (ms, addrs)
}

/// Server `i`'s value of `key`, asked directly.
fn held(direct: &mut [Client], i: usize, key: &[u8]) -> Option<Vec<u8>> {
    direct[i].get(key).unwrap().map(|it| it.value)
}

fn directs(ms: &[Memcached]) -> Vec<Client> {
    ms.iter().map(|m| m.client_with(Protocol::Meta)).collect()
}

/// Key and value pairs a multi-get found.
type Found = Vec<(Vec<u8>, Vec<u8>)>;

fn get_all(c: &mut Client, keys: &[&[u8]]) -> (mcstore::Result<()>, Found) {
    let mut got = Vec::new();
    let r = c.get_multi(keys, |k, it| got.push((k.to_vec(), it.value.to_vec())));
    (r, got)
}

// ---------------------------------------------------------------------------------------
// Duplicate keys, empty lists, an invalid key in the middle
// ---------------------------------------------------------------------------------------

#[test]
fn duplicate_keys_in_multi_calls_with_copies() {
    let (ms, addrs) = pair();
    let mut direct = directs(&ms);
    for p in PROTOCOLS {
        let mut c = both(&addrs, p).build().unwrap();
        let d = format!("dup-{p:?}");
        let e = format!("dup-e-{p:?}");
        let items = vec![
            (d.clone(), "1".to_string()),
            (e.clone(), "x".to_string()),
            (d.clone(), "2".to_string()),
        ];
        let n = c.set_multi(&items, O).unwrap();
        assert_eq!(n, 3, "{p:?}: every item stored");
        for i in 0..2 {
            assert_eq!(
                held(&mut direct, i, d.as_bytes()).as_deref(),
                Some(&b"2"[..]),
                "{p:?}: server {i} holds the last value of a duplicate key"
            );
        }
        let missing = format!("dup-missing-{p:?}");
        let keys: Vec<&[u8]> = vec![
            d.as_bytes(),
            d.as_bytes(),
            missing.as_bytes(),
            e.as_bytes(),
            d.as_bytes(),
        ];
        let (r, got) = get_all(&mut c, &keys);
        r.unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (d.clone().into_bytes(), b"2".to_vec()),
            (d.clone().into_bytes(), b"2".to_vec()),
            (e.clone().into_bytes(), b"x".to_vec()),
            (d.clone().into_bytes(), b"2".to_vec()),
        ];
        let mut got_sorted = got.clone();
        got_sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(
            got_sorted, want_sorted,
            "{p:?}: duplicate keys each found once"
        );
        // With read_miss_failover, duplicate missing keys too.
        let mut cm = both(&addrs, p).read_miss_failover(true).build().unwrap();
        let (r, got) = get_all(
            &mut cm,
            &[missing.as_bytes(), missing.as_bytes(), e.as_bytes()],
        );
        r.unwrap();
        assert_eq!(got, vec![(e.clone().into_bytes(), b"x".to_vec())], "{p:?}");

        let n = c
            .delete_multi(&[d.as_bytes(), d.as_bytes(), missing.as_bytes()])
            .unwrap();
        assert_eq!(n, 1, "{p:?}: a duplicate key deleted once");
        for i in 0..2 {
            assert_eq!(
                held(&mut direct, i, d.as_bytes()),
                None,
                "{p:?}: server {i}"
            );
            assert!(
                held(&mut direct, i, e.as_bytes()).is_some(),
                "{p:?}: server {i}"
            );
        }
    }
}

#[test]
fn empty_lists_with_copies() {
    let (_ms, addrs) = pair();
    for p in PROTOCOLS {
        let mut c = both(&addrs, p).build().unwrap();
        let none: [&[u8]; 0] = [];
        let mut called = false;
        c.get_multi(&none, |_, _| called = true).unwrap();
        c.gets_multi(&none, |_, _| called = true).unwrap();
        assert!(!called, "{p:?}");
        let items: [(&[u8], &[u8]); 0] = [];
        assert_eq!(c.set_multi(&items, O).unwrap(), 0, "{p:?}");
        assert_eq!(c.delete_multi(&none).unwrap(), 0, "{p:?}");
        let s = both(&addrs, p).shared().build().unwrap();
        s.get_multi(&none, |_, _| called = true).unwrap();
        assert!(!called, "{p:?}");
        assert_eq!(s.set_multi(&items, O).unwrap(), 0, "{p:?}");
        assert_eq!(s.delete_multi(&none).unwrap(), 0, "{p:?}");
    }
}

#[test]
fn an_invalid_key_in_the_middle_sends_nothing() {
    let (ms, addrs) = pair();
    let mut direct = directs(&ms);
    for p in PROTOCOLS {
        let mut c = both(&addrs, p).build().unwrap();
        let ok1 = format!("inv-1-{p:?}");
        let ok2 = format!("inv-2-{p:?}");
        // Binary keys are fine over meta (base64): too long is invalid everywhere.
        let bad = "x".repeat(300);
        let items = vec![
            (ok1.as_bytes(), &b"v"[..]),
            (bad.as_bytes(), &b"v"[..]),
            (ok2.as_bytes(), &b"v"[..]),
        ];
        assert!(c.set_multi(&items, O).is_err(), "{p:?}");
        for i in 0..2 {
            assert_eq!(
                held(&mut direct, i, ok1.as_bytes()),
                None,
                "{p:?}: nothing sent"
            );
            assert_eq!(
                held(&mut direct, i, ok2.as_bytes()),
                None,
                "{p:?}: nothing sent"
            );
        }
        for d in direct.iter_mut() {
            d.set(ok1.as_bytes(), b"keep", O).unwrap();
        }
        assert!(c.delete_multi(&[ok1.as_bytes(), bad.as_bytes()]).is_err());
        for i in 0..2 {
            assert_eq!(
                held(&mut direct, i, ok1.as_bytes()).as_deref(),
                Some(&b"keep"[..]),
                "{p:?}: nothing deleted"
            );
        }
        let mut called = false;
        assert!(c
            .get_multi(&[ok1.as_bytes(), bad.as_bytes()], |_, _| called = true)
            .is_err());
        assert!(!called, "{p:?}");
        // (A SharedClient runs each key as its own call, with copies or without: the
        // valid keys are sent; only the error is checked here.)
        let s = both(&addrs, p).shared().build().unwrap();
        assert!(s.set_multi(&items, O).is_err(), "{p:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Conditional writes per copy, every protocol
// ---------------------------------------------------------------------------------------

#[test]
fn conditional_writes_per_copy_every_protocol() {
    let (ms, addrs) = pair();
    let mut direct = directs(&ms);
    for p in PROTOCOLS {
        let mut c = both(&addrs, p).build().unwrap();
        let k = |n: &str| format!("cond-{p:?}-{n}");
        let order = |c: &mut Client, key: &str| -> (usize, usize) {
            let s = c.servers_of_key(key.as_bytes()).unwrap();
            (s[0], s[1])
        };
        // add: first copy has it -> refused; the second (missing) must not keep "a".
        let a1 = k("add1");
        let (f, s) = order(&mut c, &a1);
        direct[f].set(a1.as_bytes(), b"d", O).unwrap();
        assert!(
            !c.add(a1.as_bytes(), b"a", O).unwrap(),
            "{p:?}: add, first has it"
        );
        assert_eq!(
            held(&mut direct, f, a1.as_bytes()).as_deref(),
            Some(&b"d"[..]),
            "{p:?}"
        );
        assert_eq!(
            held(&mut direct, s, a1.as_bytes()),
            None,
            "{p:?}: second reconciled"
        );
        // add: second has it -> stored (first decides); the second deleted.
        let a2 = k("add2");
        let (f, s) = order(&mut c, &a2);
        direct[s].set(a2.as_bytes(), b"d", O).unwrap();
        assert!(
            c.add(a2.as_bytes(), b"a", O).unwrap(),
            "{p:?}: add, second has it"
        );
        assert_eq!(
            held(&mut direct, f, a2.as_bytes()).as_deref(),
            Some(&b"a"[..]),
            "{p:?}"
        );
        assert_eq!(
            held(&mut direct, s, a2.as_bytes()),
            None,
            "{p:?}: second reconciled"
        );
        // add on an existing key on both: refused, both kept.
        assert!(!c.add(a2.as_bytes(), b"z", O).unwrap(), "{p:?}");
        assert_eq!(
            held(&mut direct, f, a2.as_bytes()).as_deref(),
            Some(&b"a"[..]),
            "{p:?}"
        );
        // replace/append/prepend on a key only the second copy has: refused, second deleted.
        for (n, mode) in [
            ("rep", mcstore::StoreMode::Replace),
            ("app", mcstore::StoreMode::Append),
            ("pre", mcstore::StoreMode::Prepend),
        ] {
            let key = k(n);
            let (f, s) = order(&mut c, &key);
            direct[s].set(key.as_bytes(), b"d", O).unwrap();
            assert!(
                !c.store(mode, key.as_bytes(), b"r", O).unwrap(),
                "{p:?} {n}: first lacks it"
            );
            assert_eq!(held(&mut direct, f, key.as_bytes()), None, "{p:?} {n}");
            assert_eq!(
                held(&mut direct, s, key.as_bytes()),
                None,
                "{p:?} {n}: reconciled"
            );
            // first has it only: stored there, the second stays empty.
            direct[f].set(key.as_bytes(), b"d", O).unwrap();
            assert!(c.store(mode, key.as_bytes(), b"r", O).unwrap(), "{p:?} {n}");
            assert!(held(&mut direct, f, key.as_bytes()).is_some(), "{p:?} {n}");
            assert_eq!(held(&mut direct, s, key.as_bytes()), None, "{p:?} {n}");
            // both missing: refused everywhere, nothing created.
            let key2 = k(&format!("{n}-none"));
            assert!(
                !c.store(mode, key2.as_bytes(), b"r", O).unwrap(),
                "{p:?} {n}"
            );
            assert_eq!(held(&mut direct, 0, key2.as_bytes()), None, "{p:?} {n}");
            assert_eq!(held(&mut direct, 1, key2.as_bytes()), None, "{p:?} {n}");
        }
        // delete of a key only the second copy has: found.
        let dk = k("del");
        let (_, s) = order(&mut c, &dk);
        direct[s].set(dk.as_bytes(), b"d", O).unwrap();
        assert!(
            c.delete(dk.as_bytes()).unwrap(),
            "{p:?}: delete found it on a copy"
        );
        assert_eq!(held(&mut direct, s, dk.as_bytes()), None, "{p:?}");
        assert!(!c.delete(dk.as_bytes()).unwrap(), "{p:?}: gone");
        // delete_multi counts a key found on one copy.
        direct[s].set(dk.as_bytes(), b"d", O).unwrap();
        assert_eq!(c.delete_multi(&[dk.as_bytes()]).unwrap(), 1, "{p:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Namespaces and binary keys
// ---------------------------------------------------------------------------------------

#[test]
fn namespaced_and_binary_keys_over_copies() {
    let (ms, addrs) = pair();
    for p in [Protocol::Meta, Protocol::Binary, Protocol::Text] {
        let mut c = both(&addrs, p).namespace("ns:").build().unwrap();
        let mut direct: Vec<Client> = ms
            .iter()
            .map(|m| {
                support::client_builder()
                    .protocol(p)
                    .server(m.addr())
                    .namespace("ns:")
                    .build()
                    .unwrap()
            })
            .collect();
        let mut keys: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("nk-{p:?}-{i}").into_bytes())
            .collect();
        if p == Protocol::Meta {
            keys.push(vec![0, 1, 2, b' ', 0xff, b'\r', b'\n']);
            keys.push(format!("sp ace {p:?}").into_bytes());
        }
        let items: Vec<(Vec<u8>, Vec<u8>)> = keys
            .iter()
            .map(|k| (k.clone(), [b"v-", k.as_slice()].concat()))
            .collect();
        assert_eq!(c.set_multi(&items, O).unwrap(), items.len(), "{p:?}");
        for (k, v) in &items {
            for i in 0..2 {
                assert_eq!(
                    held(&mut direct, i, k).as_ref(),
                    Some(v),
                    "{p:?}: server {i} {k:?}"
                );
            }
        }
        let mut got = HashMap::new();
        c.get_multi(&keys, |k, it| {
            assert!(got.insert(k.to_vec(), it.value.to_vec()).is_none());
        })
        .unwrap();
        assert_eq!(got.len(), keys.len(), "{p:?}");
        for (k, v) in &items {
            assert_eq!(got.get(k), Some(v), "{p:?}: {k:?}");
        }
        assert_eq!(c.delete_multi(&keys).unwrap(), keys.len(), "{p:?}");
        for k in &keys {
            for i in 0..2 {
                assert_eq!(held(&mut direct, i, k), None, "{p:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A frozen copy: WritePolicy::All and ::Any
// ---------------------------------------------------------------------------------------

fn frozen_copy(policy: WritePolicy, p: Protocol) {
    let (ms, addrs) = pair();
    let b = both(&addrs, p)
        .write_policy(policy)
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(200));
    let mut c = b.clone().build().unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("fz-{p:?}-{i}")).collect();
    let kb: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let items = |v: &str| -> Vec<(String, String)> {
        keys.iter().map(|k| (k.clone(), v.to_string())).collect()
    };
    assert_eq!(c.set_multi(&items("v1"), O).unwrap(), keys.len());
    ms[1].freeze();
    let r = c.set_multi(&items("v2"), O);
    match policy {
        WritePolicy::All => assert!(r.is_err(), "{p:?}: All reports the missed copy: {r:?}"),
        _ => assert_eq!(r.unwrap(), keys.len(), "{p:?}: Any: one copy confirmed"),
    }
    // Half the keys deleted while the copy is frozen.
    let gone: Vec<&[u8]> = kb.iter().step_by(2).copied().collect();
    let r = c.delete_multi(&gone);
    if policy == WritePolicy::Any {
        assert_eq!(r.unwrap(), gone.len(), "{p:?}");
    }
    // Single-key calls too.
    let single = keys[1].as_bytes();
    let _ = c.set(single, b"v3", O);
    ms[1].resume();
    support::wait_for("server 1 answers", || ms[1].answers());
    for round in 0..6 {
        let (r, got) = get_all(&mut c, &kb);
        // Every key either found with the latest value or (deleted) missing.
        let _ = r;
        for (k, v) in &got {
            let j = keys.iter().position(|x| x.as_bytes() == &k[..]).unwrap();
            assert!(
                j % 2 == 1,
                "{p:?} {policy:?} round {round}: deleted key {} served {:?}",
                keys[j],
                String::from_utf8_lossy(v)
            );
            let want: &[u8] = if j == 1 { b"v3" } else { b"v2" };
            assert_eq!(&v[..], want, "{p:?} {policy:?} round {round}: {}", keys[j]);
        }
        for (j, k) in keys.iter().enumerate() {
            if let Ok(Some(it)) = c.get(k.as_bytes()) {
                assert!(j % 2 == 1, "{p:?} {policy:?}: get served deleted {k}");
                let want: &[u8] = if j == 1 { b"v3" } else { b"v2" };
                assert_eq!(&it.value[..], want, "{p:?} {policy:?}: get {k}");
            }
        }
        // A fresh client sharing nothing: what the servers hold may differ, but a client
        // with the repairs must never read the old copy. (A fresh one has no repairs.)
        std::thread::yield_now();
    }
    // After repairs run: the copy that missed holds v2/v3 or nothing.
    support::wait_for("repairs done", || {
        let _ = c.get(b"tick");
        let f = c.fleet_counters();
        f.repairs_done >= f.repairs_recorded
    });
    let mut direct = directs(&ms);
    for (j, k) in keys.iter().enumerate() {
        for i in 0..2 {
            if let Some(v) = held(&mut direct, i, k.as_bytes()) {
                assert!(
                    j % 2 == 1,
                    "{p:?} {policy:?}: server {i} still holds deleted {k}"
                );
                let want: &[u8] = if j == 1 { b"v3" } else { b"v2" };
                assert_eq!(&v[..], want, "{p:?} {policy:?}: server {i} {k}");
            }
        }
    }
}

#[test]
fn frozen_copy_all_text() {
    frozen_copy(WritePolicy::All, Protocol::Text);
}
#[test]
fn frozen_copy_any_text() {
    frozen_copy(WritePolicy::Any, Protocol::Text);
}
#[test]
fn frozen_copy_any_meta() {
    frozen_copy(WritePolicy::Any, Protocol::Meta);
}
#[test]
fn frozen_copy_any_binary() {
    frozen_copy(WritePolicy::Any, Protocol::Binary);
}

// ---------------------------------------------------------------------------------------
// Hostile copies
// ---------------------------------------------------------------------------------------

/// Words of a text request line.
fn words(line: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(line)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A hostile copy first in read order answers a multi-get with a key not asked, out of
/// order, or truncated: no value reaches another key, and each key's value comes from the
/// honest copy.
fn hostile_get(mode: u8) {
    let m = Memcached::start();
    let h = Hostile::start(move |line, conn| {
        let w = words(line);
        if w.first().map(String::as_str) != Some("get") {
            let _ = conn.write_all(b"ERROR\r\n");
            return;
        }
        let keys = &w[1..];
        let mut out = Vec::new();
        match mode {
            // A key not asked.
            0 => out.extend_from_slice(b"VALUE not-asked 0 3\r\nBAD\r\nEND\r\n"),
            // Every asked key, in reverse order, with a value naming the key.
            1 => {
                for k in keys.iter().rev() {
                    let v = format!("H-{k}");
                    out.extend_from_slice(
                        format!("VALUE {k} 0 {}\r\n{v}\r\nEND", v.len()).as_bytes(),
                    );
                    out.truncate(out.len() - 3);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"END\r\n");
            }
            // The first key's value, then a truncated one.
            _ => {
                let k = &keys[0];
                let v = format!("H-{k}");
                out.extend_from_slice(format!("VALUE {k} 0 {}\r\n{v}\r\n", v.len()).as_bytes());
                if keys.len() > 1 {
                    out.extend_from_slice(format!("VALUE {} 0 100\r\nshort", keys[1]).as_bytes());
                }
                let _ = conn.write_all(&out);
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        let _ = conn.write_all(&out);
    });
    let addrs = vec![h.addr(), m.addr()];
    let mut c = both(&addrs, Protocol::Text)
        .io_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    // Keys whose first copy is the hostile one.
    let keys: Vec<String> = (0..200)
        .map(|i| format!("hk-{i}"))
        .filter(|k| c.servers_of_key(k.as_bytes()).unwrap()[0] == 0)
        .take(12)
        .collect();
    assert!(keys.len() >= 4);
    let mut honest = m.client();
    for k in &keys {
        honest
            .set(k.as_bytes(), format!("M-{k}").as_bytes(), O)
            .unwrap();
    }
    let kb: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let (r, got) = get_all(&mut c, &kb);
    for (k, v) in &got {
        let k = String::from_utf8_lossy(k);
        let v = String::from_utf8_lossy(v);
        assert!(
            v == format!("M-{k}") || v == format!("H-{k}"),
            "mode {mode}: key {k} handed value {v}"
        );
    }
    let mut seen: Vec<&Vec<u8>> = got.iter().map(|(k, _)| k).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        got.len(),
        "mode {mode}: a key found twice: {got:?}"
    );
    assert_eq!(
        got.len(),
        keys.len(),
        "mode {mode}: every key found ({r:?})"
    );
}

#[test]
fn hostile_copy_answers_a_key_not_asked() {
    hostile_get(0);
}
#[test]
fn hostile_copy_answers_out_of_order() {
    hostile_get(1);
}
#[test]
fn hostile_copy_truncates() {
    hostile_get(2);
}

/// A hostile copy answers a store batch with an error for one item mid-batch: that key (and
/// any the copy did not confirm) is not reported stored under All, and with Any the honest
/// copy's stores count; no key is ever read back with a value other than its own.
#[test]
fn hostile_copy_errors_mid_store_batch() {
    let m = Memcached::start();
    let h = Hostile::start(move |line, conn| {
        let w = words(line);
        match w.first().map(String::as_str) {
            Some("set") => {
                let reply: &[u8] = if w[1].ends_with("-3") {
                    b"SERVER_ERROR out of memory storing object\r\n"
                } else {
                    b"STORED\r\n"
                };
                let _ = conn.write_all(reply);
            }
            Some("get") => {
                let _ = conn.write_all(b"END\r\n");
            }
            Some("delete") => {
                let _ = conn.write_all(b"DELETED\r\n");
            }
            // A value line.
            _ => {}
        }
    });
    let addrs = vec![h.addr(), m.addr()];
    for policy in [WritePolicy::All, WritePolicy::Any] {
        let mut c = both(&addrs, Protocol::Text)
            .write_policy(policy)
            .io_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let items: Vec<(String, String)> = (0..6)
            .map(|i| (format!("he-{policy:?}-{i}"), format!("val-{i}")))
            .collect();
        let r = c.set_multi(&items, O);
        match policy {
            WritePolicy::All => assert!(r.is_err(), "All: a copy refused key 3: {r:?}"),
            _ => assert_eq!(r.unwrap(), items.len(), "Any"),
        }
        let kb: Vec<&[u8]> = items.iter().map(|(k, _)| k.as_bytes()).collect();
        let (_, got) = get_all(&mut c, &kb);
        for (k, v) in &got {
            let (_, want) = items.iter().find(|(x, _)| x.as_bytes() == &k[..]).unwrap();
            assert_eq!(v, want.as_bytes(), "{policy:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// SharedClient: duplicate keys many at once
// ---------------------------------------------------------------------------------------

#[test]
fn shared_duplicate_keys_end_on_the_last_value_everywhere() {
    let (ms, addrs) = pair();
    let mut direct = directs(&ms);
    for p in PROTOCOLS {
        let s = both(&addrs, p).shared().build().unwrap();
        // 300 items, each key three times: the window holds all of a key's writes.
        let items: Vec<(String, String)> = (0..300)
            .map(|i| (format!("sdup-{p:?}-{}", i % 100), format!("v{i}")))
            .collect();
        let n = s.set_multi(&items, O).unwrap();
        assert_eq!(n, items.len(), "{p:?}");
        for k in 0..100 {
            let key = format!("sdup-{p:?}-{k}");
            let want = format!("v{}", 200 + k);
            for i in 0..2 {
                assert_eq!(
                    held(&mut direct, i, key.as_bytes()).as_deref(),
                    Some(want.as_bytes()),
                    "{p:?}: server {i} {key}"
                );
            }
        }
    }
}
