//! What the storage attack tests share: storages, one per simulated process, each with its
//! own list, over one master and one memcached cluster; resources placed on chosen
//! servers; reads checked against the last value written.

use mcstore_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::storage::{MemcacheStorage, MemoryStorage, ResourceInfo, Storage};
use mcstore::{Client, ClientBuilder, Pool, ServerList};
use support::Memcached;

pub fn builder(servers: &[&Memcached]) -> ClientBuilder {
    support::client_builder()
        .servers(servers.iter().map(|m| m.addr()))
        .distribution(Distribution::Ketama)
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Pool,
    Shared,
}

/// One "process": a storage following its own list.
pub fn process(
    kind: Kind,
    servers: &[&Memcached],
    master: &Arc<MemoryStorage>,
    skew: Duration,
) -> (MemcacheStorage, ServerList) {
    let m = master.clone() as Arc<dyn Storage>;
    match kind {
        Kind::Pool => {
            let pool = Pool::new(builder(servers), 2).unwrap();
            let list = pool.server_list().clone();
            let s = MemcacheStorage::builder(pool, m).follow_list(skew).build();
            (s, list)
        }
        Kind::Shared => {
            let c = builder(servers).shared().build().unwrap();
            let list = c.server_list();
            let s = MemcacheStorage::builder(c, m).follow_list(skew).build();
            (s, list)
        }
    }
}

/// Waits until storages built at `built` are past their start (for `skew` after it is
/// built, a storage that follows a list reads only the master).
pub fn settle(built: Instant, skew: Duration) {
    support::wait_for("the storages' start", || built.elapsed() > skew);
}

pub fn addrs(servers: &[&Memcached]) -> Vec<String> {
    servers.iter().map(|m| m.addr()).collect()
}

/// Applies `servers` once the list takes a change again (changes are `2 * skew` apart).
pub fn change(list: &ServerList, servers: &[&Memcached]) {
    let addrs = addrs(servers);
    let before = list.generation();
    support::wait_for("the list to take the change", || {
        list.set(&addrs).unwrap();
        list.generation() > before
    });
}

/// Where the ketama list `servers` puts the cache key of `info`'s content.
pub fn owner(servers: &[&Memcached], info: &ResourceInfo) -> String {
    let mut c: Client = builder(servers).build().unwrap();
    let key = format!("{}:c", info.key);
    c.server_for_key(key.as_bytes()).unwrap().to_string()
}

pub fn resources(
    s: &MemcacheStorage,
    coll: &str,
    n: usize,
    mut pick: impl FnMut(&ResourceInfo) -> bool,
) -> Vec<ResourceInfo> {
    s.create_container(coll).unwrap();
    let found: Vec<ResourceInfo> = (0..20_000)
        .map(|i| s.info(coll, Some(&format!("r{i}"))).unwrap())
        .filter(|info| pick(info))
        .take(n)
        .collect();
    assert_eq!(found.len(), n, "not enough resources with that placement");
    found
}

pub fn put(s: &MemcacheStorage, infos: &[ResourceInfo], v: &str) {
    for info in infos {
        s.put_content(info, v.into()).unwrap();
    }
}

/// Reads every resource (twice: a miss fills, then a hit); the values that are not `want`.
pub fn stale(s: &MemcacheStorage, infos: &[ResourceInfo], want: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for round in 0..2 {
        for info in infos {
            let got = s.get_content(info).unwrap();
            let got = String::from_utf8_lossy(&got).to_string();
            if got != want {
                bad.push(format!(
                    "{:?}#{round}={got}",
                    info.resource.as_deref().unwrap()
                ));
            }
        }
    }
    bad
}

pub fn check(s: &MemcacheStorage, infos: &[ResourceInfo], want: &str, when: &str) {
    let bad = stale(s, infos, want);
    println!(
        "{when}: {} of {} reads not {want:?}: {:?}",
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(6)]
    );
    assert!(
        bad.is_empty(),
        "{when}: served {} superseded values",
        bad.len()
    );
}

/// Asserts that the scenario kept its skew (`in_skew`) and that no read was superseded
/// (`bad` of `reads`), with `what` happened otherwise.
pub fn expect_fresh(in_skew: bool, bad: &[String], reads: usize, what: &str) {
    assert!(in_skew, "the test ran too slowly for its skew");
    assert!(bad.is_empty(), "{what} ({} of {reads} reads)", bad.len());
}
