//! Three real memcached servers: distribution, fan-out, ejection, rejoin, namespaces.

use mcstore_test_support as support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, Error, Protocol, SetOptions};
use support::{wait_for, Memcached};

fn three() -> Vec<Memcached> {
    (0..3).map(|_| Memcached::start()).collect()
}

fn builder(servers: &[Memcached], p: Protocol) -> ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(servers.iter().map(Memcached::addr))
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user:{i}:profile")).collect()
}

fn curr_items(mc: &Memcached) -> usize {
    let mut c = mc.client();
    c.stats(None).unwrap()[0]
        .get("curr_items")
        .unwrap()
        .parse()
        .unwrap()
}

fn keys_land_where_the_continuum_says(p: Protocol) {
    for (dist, weights) in [
        (Distribution::Modula, [1, 1, 1]),
        (Distribution::Ketama, [1, 1, 1]),
        (Distribution::KetamaWeighted, [1, 3, 2]),
    ] {
        let servers = three();
        let specs: Vec<String> = servers
            .iter()
            .zip(weights)
            .map(|(m, w)| format!("{}:{w}", m.addr()))
            .collect();
        let mut c = support::client_builder()
            .protocol(p)
            .servers(&specs)
            .distribution(dist)
            .build()
            .unwrap();
        let keys = keys(3000);
        let items: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        assert_eq!(c.set_multi(&items, SetOptions::default()).unwrap(), 3000);
        let mut expected: HashMap<String, usize> = HashMap::new();
        for k in &keys {
            *expected
                .entry(c.server_for_key(k.as_bytes()).unwrap().to_owned())
                .or_default() += 1;
        }
        let mut seen = Vec::new();
        for m in &servers {
            let want = expected.get(&m.addr()).copied().unwrap_or(0);
            assert_eq!(curr_items(m), want, "{dist:?}: {}", m.addr());
            seen.push(want);
        }
        println!("{dist:?} weights {weights:?}: keys per server {seen:?}");
        assert!(seen.iter().all(|&n| n > 100), "{dist:?} spread {seen:?}");
        // Each key is readable from the server it was sent to, directly.
        let mut direct: Vec<Client> = servers.iter().map(Memcached::client).collect();
        for k in keys.iter().take(300) {
            let owner = c.server_for_key(k.as_bytes()).unwrap().to_owned();
            let idx = servers.iter().position(|m| m.addr() == owner).unwrap();
            assert!(direct[idx].get(k.as_bytes()).unwrap().is_some());
        }
    }
}

fn multi_get_over_three_servers_and_counters(p: Protocol) {
    let servers = three();
    let mut c = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .build()
        .unwrap();
    let keys = keys(1000);
    let items: Vec<(&str, String)> = keys
        .iter()
        .step_by(2)
        .map(|k| (k.as_str(), format!("value of {k}")))
        .collect();
    assert_eq!(c.set_multi(&items, SetOptions::default()).unwrap(), 500);
    let mut got = HashMap::new();
    c.get_multi(&keys, |k, item| {
        got.insert(String::from_utf8(k.to_vec()).unwrap(), item.value.to_vec());
    })
    .unwrap();
    assert_eq!(got.len(), 500);
    for (k, v) in &items {
        assert_eq!(got[*k], v.as_bytes());
    }
    let counters = c.server_counters();
    let hits: u64 = counters.iter().map(|(_, c)| c.hits).sum();
    let misses: u64 = counters.iter().map(|(_, c)| c.misses).sum();
    assert_eq!((hits, misses), (500, 500));
    // One request per server for each call; over TLS the multi-store goes in record-sized
    // chunks (see Client::set_multi), so it may take more.
    assert!(counters
        .iter()
        .all(|(_, c)| c.errors == 0 && (c.requests == 2 || support::tls_mode() && c.requests > 2)));
    assert_eq!(c.delete_multi(&keys).unwrap(), 500);
    let mut n = 0;
    c.get_multi(&keys, |_, _| n += 1).unwrap();
    assert_eq!(n, 0);
    // Pipelined noreply writes spread over all three servers. Not over TLS with the binary
    // protocol: memcached 1.6.18 then intermittently stops reading the connection (the
    // quiet sets' closing no-op stays unread in its socket, Recv-Q > 0, until the client's
    // timeout, 5 s as well as 300 ms; about 1 run in 30 under load). A server bug, reported
    // in the closing note of #15; text and meta pipelines over TLS are not affected.
    if support::tls_mode() && p == Protocol::Binary {
        return;
    }
    let mut p = c.pipeline();
    for k in &keys {
        p.set(k.as_bytes(), b"p", SetOptions::default()).unwrap();
    }
    assert_eq!(p.finish().unwrap().commands, 1000);
    let total: usize = servers.iter().map(curr_items).sum();
    assert_eq!(total, 1000);
}

/// Splits keys into those owned by server `victim` and the rest.
fn split(c: &mut Client, victim: &str, keys: &[String]) -> (Vec<String>, Vec<String>) {
    keys.iter()
        .cloned()
        .partition(|k| c.server_for_key(k.as_bytes()).unwrap() == victim)
}

fn killed_server_fails_fast_after_ejection_others_unaffected(p: Protocol) {
    let mut servers = three();
    let mut c = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .server_failure_limit(2)
        .retry_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let keys = keys(300);
    let items: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    c.set_multi(&items, SetOptions::default()).unwrap();
    let victim = servers[1].addr();
    let (dead_keys, live_keys) = split(&mut c, &victim, &keys);
    servers[1].kill();
    // Two failures (limit 2), then fast ServerDown errors.
    for k in &dead_keys[..2] {
        assert!(matches!(c.get(k.as_bytes()), Err(Error::Io { .. })));
    }
    let start = Instant::now();
    for k in &dead_keys[2..] {
        match c.get(k.as_bytes()) {
            Err(Error::ServerDown { server, .. }) => assert_eq!(server, victim),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "ejected server's keys fail fast"
    );
    for k in &live_keys {
        assert!(c.get(k.as_bytes()).unwrap().is_some());
    }
    // A multi-get delivers the healthy servers' hits and names the dead one.
    let mut hits = 0;
    match c.get_multi(&keys, |_, _| hits += 1) {
        Err(Error::ServerDown { server, .. }) => assert_eq!(server, victim),
        other => panic!("{other:?}"),
    }
    assert_eq!(hits, live_keys.len());
    let counters = c.server_counters();
    assert_eq!(counters[1].1.ejections, 1);
    assert_eq!(counters[1].1.errors, 2);
    // A bad key anywhere fails the whole call before any server is asked anything.
    let mut with_bad = keys.clone();
    with_bad.push("k".repeat(251));
    let before = format!("{:?}", c.server_counters());
    assert!(matches!(
        c.get_multi(&with_bad, |_, _| panic!("nothing is sent")),
        Err(Error::InvalidKey(mcstore::KeyError::TooLong(251)))
    ));
    assert_eq!(format!("{:?}", c.server_counters()), before);
}

fn killed_server_keys_move_when_remove_failed_servers_is_on(p: Protocol) {
    let mut servers = three();
    let mut c = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .server_failure_limit(1)
        .retry_timeout(Duration::from_secs(60))
        .remove_failed_servers(true)
        .build()
        .unwrap();
    let keys = keys(300);
    let victim = servers[0].addr();
    let (dead_keys, live_keys) = split(&mut c, &victim, &keys);
    let before: Vec<String> = live_keys
        .iter()
        .map(|k| c.server_for_key(k.as_bytes()).unwrap().to_owned())
        .collect();
    servers[0].kill();
    assert!(matches!(
        c.set(dead_keys[0].as_bytes(), b"x", SetOptions::default()),
        Err(Error::Io { .. })
    ));
    // Ejected: its keys now live elsewhere, and every call succeeds.
    for k in &dead_keys {
        assert_ne!(c.server_for_key(k.as_bytes()).unwrap(), victim);
        c.set(k.as_bytes(), b"moved", SetOptions::default())
            .unwrap();
        assert_eq!(c.get(k.as_bytes()).unwrap().unwrap().value, b"moved");
    }
    // Keys of live servers did not move.
    for (k, b) in live_keys.iter().zip(&before) {
        assert_eq!(c.server_for_key(k.as_bytes()).unwrap(), b);
    }
    let mut n = 0;
    c.get_multi(&dead_keys, |_, _| n += 1).unwrap();
    assert_eq!(n, dead_keys.len());
}

/// With `remove_failed_servers`, at most a third of the servers (at least one) leave the
/// continuum at once: of 4 servers, 2 killed one after the other, the first one's keys move
/// and the second one's fail fast (they stay where they live); with
/// `max_removed_servers(2)` both move.
fn removals_are_capped(p: Protocol) {
    for cap in [None, Some(2)] {
        let mut servers: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
        let mut b = builder(&servers, p)
            .distribution(Distribution::Ketama)
            .server_failure_limit(1)
            .retry_timeout(Duration::from_secs(60))
            .remove_failed_servers(true);
        if let Some(n) = cap {
            b = b.max_removed_servers(n);
        }
        let mut c = b.build().unwrap();
        let keys = keys(300);
        let (first, second) = (servers[0].addr(), servers[1].addr());
        let (first_keys, _) = split(&mut c, &first, &keys);
        let (second_keys, _) = split(&mut c, &second, &keys);
        servers[0].kill();
        assert!(c
            .set(first_keys[0].as_bytes(), b"x", SetOptions::default())
            .is_err());
        servers[1].kill();
        assert!(c
            .set(second_keys[0].as_bytes(), b"x", SetOptions::default())
            .is_err());
        // The first server's keys moved; to the second server (down, and still on the
        // continuum without the cap raised), they fail fast there.
        for k in &first_keys {
            match c.server_for_key(k.as_bytes()) {
                Ok(now) => {
                    assert_ne!(now, first, "{cap:?}: {k} moved");
                    c.set(k.as_bytes(), b"moved", SetOptions::default())
                        .unwrap();
                }
                Err(Error::ServerDown { server, .. }) => {
                    assert_eq!((server.as_str(), cap), (second.as_str(), None), "{k}");
                }
                Err(e) => panic!("{k}: {e}"),
            }
        }
        // The second server's keys stay (failing fast) under the cap, move above it.
        for k in &second_keys {
            match (cap, c.server_for_key(k.as_bytes())) {
                (None, Err(Error::ServerDown { server, .. })) => {
                    assert_eq!(server, second, "{k} stays");
                    assert!(matches!(
                        c.set(k.as_bytes(), b"x", SetOptions::default()),
                        Err(Error::ServerDown { .. })
                    ));
                }
                (Some(_), Ok(now)) => {
                    assert!(now != second && now != first, "{k} moved to {now}");
                    c.set(k.as_bytes(), b"moved", SetOptions::default())
                        .unwrap();
                }
                (cap, other) => panic!("{cap:?}: {k}: {other:?}"),
            }
        }
    }
}

fn frozen_server_delays_only_its_own_keys_by_one_timeout(p: Protocol) {
    let servers = three();
    let mut c = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .server_failure_limit(100)
        .build()
        .unwrap();
    let keys = keys(300);
    let items: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    c.set_multi(&items, SetOptions::default()).unwrap();
    let victim = servers[2].addr();
    let (frozen_keys, live_keys) = split(&mut c, &victim, &keys);
    servers[2].freeze();
    let start = Instant::now();
    assert!(matches!(
        c.get(frozen_keys[0].as_bytes()),
        Err(Error::Timeout { .. })
    ));
    let t = start.elapsed();
    println!("frozen server: single get failed after {t:?}");
    assert!(
        t >= Duration::from_millis(300) && t < Duration::from_millis(1800),
        "{t:?}"
    );
    for k in live_keys.iter().take(50) {
        assert!(c.get(k.as_bytes()).unwrap().is_some());
    }
    let start = Instant::now();
    let mut hits = 0;
    let r = c.get_multi(&keys, |_, _| hits += 1);
    let t = start.elapsed();
    println!("frozen server: get_multi over 3 servers returned after {t:?}");
    match r {
        Err(Error::Timeout { server, .. }) => assert_eq!(server, victim),
        other => panic!("{other:?}"),
    }
    assert_eq!(hits, live_keys.len(), "healthy servers' hits are delivered");
    assert!(
        t < Duration::from_millis(1800),
        "one timeout, not one per server: {t:?}"
    );
    servers[2].resume();
    assert!(c.get(frozen_keys[0].as_bytes()).unwrap().is_some());
}

fn restarted_server_rejoins_after_the_retry_timeout(p: Protocol) {
    let mut servers = three();
    let retry = Duration::from_millis(500);
    let mut c = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .server_failure_limit(1)
        .retry_timeout(retry)
        .remove_failed_servers(true)
        .build()
        .unwrap();
    let victim = servers[1].addr();
    let (victim_keys, _) = split(&mut c, &victim, &keys(300));
    let key = victim_keys[0].as_bytes();
    c.set(key, b"0", SetOptions::default()).unwrap();
    servers[1].kill();
    assert!(c.set(key, b"1", SetOptions::default()).is_err());
    // Ejected: the key is served elsewhere meanwhile.
    assert_ne!(c.server_for_key(key).unwrap(), victim);
    c.set(key, b"elsewhere", SetOptions::default()).unwrap();
    servers[1].restart();
    // After the retry timeout the server is back in the continuum and serves its keys.
    wait_for("the restarted server to rejoin", || {
        c.server_for_key(key).unwrap() == victim
    });
    c.set(key, b"home", SetOptions::default()).unwrap();
    let mut direct = servers[1].client();
    assert_eq!(direct.get(key).unwrap().unwrap().value, b"home");
    let counters = c.server_counters();
    assert_eq!(counters[1].1.ejections, 1);
    assert!(counters[1].1.reconnects >= 1);
}

/// A pool's clients share who is ejected (#16): a server one client found dead is skipped by
/// the others at once (before, each client learnt it from its own failures and, meanwhile, two
/// clients of one pool routed a key to two servers), and it rejoins for all of them.
fn a_pools_clients_share_ejections_and_rejoins(p: Protocol) {
    let mut servers = three();
    let b = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .server_failure_limit(2)
        .retry_timeout(Duration::from_millis(500))
        .remove_failed_servers(true);
    let pool = mcstore::Pool::new(b, 2).unwrap();
    let (mut one, mut two) = (pool.get().unwrap(), pool.get().unwrap());
    let victim = servers[1].addr();
    let (victim_keys, _) = split(&mut one, &victim, &keys(300));
    let key = victim_keys[0].as_bytes();
    one.set(key, b"0", SetOptions::default()).unwrap();
    servers[1].kill();
    while one.set(key, b"1", SetOptions::default()).is_err() {
        if one.server_for_key(key).unwrap() != victim {
            break;
        }
    }
    // Ejected by `one`; `two` routes the key elsewhere without a failure of its own.
    assert_ne!(two.server_for_key(key).unwrap(), victim);
    two.set(key, b"elsewhere", SetOptions::default()).unwrap();
    assert_eq!(two.server_counters()[1].1.errors, 0);
    servers[1].restart();
    wait_for("the restarted server to rejoin", || {
        two.server_for_key(key).unwrap() == victim
    });
    assert_eq!(one.server_for_key(key).unwrap(), victim);
    one.set(key, b"home", SetOptions::default()).unwrap();
    assert_eq!(two.get(key).unwrap().unwrap().value, b"home");
}

fn namespace_is_sent_and_hashed_as_configured(p: Protocol) {
    let servers = three();
    let mut plain = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .build()
        .unwrap();
    let mut ns = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .namespace("app:")
        .build()
        .unwrap();
    let mut ns_hashed = builder(&servers, p)
        .distribution(Distribution::Ketama)
        .namespace("app:")
        .hash_with_namespace(true)
        .build()
        .unwrap();
    let mut direct: Vec<Client> = servers.iter().map(Memcached::client).collect();
    let keys = keys(200);
    for k in &keys {
        let k = k.as_bytes();
        ns.set(k, b"namespaced", SetOptions::default()).unwrap();
        // Same placement as without a namespace (only the bare key is hashed)...
        let owner = ns.server_for_key(k).unwrap().to_owned();
        assert_eq!(owner, plain.server_for_key(k).unwrap());
        // ...and the wire key carries the prefix.
        let wire = [&b"app:"[..], k].concat();
        let d = &mut direct[servers.iter().position(|m| m.addr() == owner).unwrap()];
        assert_eq!(d.get(&wire).unwrap().unwrap().value, b"namespaced");
        assert_eq!(d.get(k).unwrap(), None);
        // With the prefix hashed, placement follows the prefixed key.
        assert_eq!(
            ns_hashed.server_for_key(k).unwrap(),
            plain.server_for_key(&wire).unwrap()
        );
    }
    let mut seen = Vec::new();
    ns.get_multi(&keys, |k, _| {
        seen.push(String::from_utf8(k.to_vec()).unwrap())
    })
    .unwrap();
    assert_eq!(seen.len(), keys.len(), "keys come back without the prefix");
    assert!(seen.iter().all(|k| k.starts_with("user:")));
    // The namespace counts toward the 250-byte limit.
    assert!(matches!(
        ns.get(&[b'k'; 247]),
        Err(Error::InvalidKey(mcstore::KeyError::TooLong(251)))
    ));
}

support::for_each_protocol!(
    keys_land_where_the_continuum_says,
    multi_get_over_three_servers_and_counters,
    killed_server_fails_fast_after_ejection_others_unaffected,
    killed_server_keys_move_when_remove_failed_servers_is_on,
    removals_are_capped,
    frozen_server_delays_only_its_own_keys_by_one_timeout,
    restarted_server_rejoins_after_the_retry_timeout,
    a_pools_clients_share_ejections_and_rejoins,
    namespace_is_sent_and_hashed_as_configured
);
