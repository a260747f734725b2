//! Attacks on `MemcacheStorage::follow_list` (commit 2029c3b): storages (one per simulated
//! process, each with its own list) over one master and one memcached cluster, taking list
//! changes within the stated skew. Every test checks the storage contract: a read never
//! returns a value an earlier write superseded.
//!
//! Each test was a finding, fixed since: a server taking a removed server's keys was
//! flushed (and trusted) before every process had the change; a process started mid-change
//! filled a new server at once; an invalidation whose key's server was down deleted nowhere;
//! a process started between two changes, or during a removal, did not know the lists
//! before it started (the lists are now recorded in the master).

use mcstore_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::ring::Distribution;
use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
use mcstore::Pool;
use support::Memcached;

#[path = "common/live_storage.rs"]
mod common;
use common::*;

// ---------------------------------------------------------------------------------------
// Finding 1: a server that takes keys whose previous owner left the list (a replaced
// server; two servers leaving at once) is flushed by a process as soon as it takes the
// change, and read by it at once (no read window: the previous owner is gone). A process
// that has not taken the change yet (within the skew) writes by the old list and deletes
// on the old owner and its next server, not on the taker: the first process reads the
// value it filled there before that write.
// ---------------------------------------------------------------------------------------

fn replaced_server(kind: Kind) {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (a, b, c, n) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_secs(2);
    let master = Arc::new(MemoryStorage::new());
    let built = Instant::now();
    let (p1, list1) = process(kind, &[a, b, c], &master, skew);
    let (p2, list2) = process(kind, &[a, b, c], &master, skew);
    settle(built, skew);
    // Keys on a that the replacement n takes.
    let infos = resources(&p1, "c", 20, |i| {
        owner(&[a, b, c], i) == a.addr() && owner(&[n, b, c], i) == n.addr()
    });
    put(&p1, &infos, "v1");
    check(&p1, &infos, "v1", "p1 before");
    check(&p2, &infos, "v1", "p2 before");
    // a is replaced by n: p1 takes it first and reads (fixed: n is flushed only once every
    // process has the change, `skew` after it; meanwhile its keys are read from the master).
    let t1 = Instant::now();
    change(&list1, &[n, b, c]);
    check(&p1, &infos, "v1", "p1 with n");
    // p2 has not taken the change yet (well within the skew): it writes by the old list.
    put(&p2, &infos, "v2");
    let in_skew = t1.elapsed() < skew;
    let bad = stale(&p1, &infos, "v2");
    println!(
        "{kind:?} replaced server: p1 after p2's write ({}ms after p1 took the change, \
         within skew: {in_skew}): {} of {} reads superseded: {:?}",
        t1.elapsed().as_millis(),
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(4)]
    );
    change(&list2, &[n, b, c]);
    expect_fresh(
        in_skew,
        &bad,
        2 * infos.len(),
        "p1 served values p2's write superseded",
    );
    // Once n is flushed, both read it (and fill it) with what the master has.
    support::wait_for("n's flush", || {
        p1.pending_invalidations() == 0 && p2.pending_invalidations() == 0
    });
    check(&p1, &infos, "v2", "p1 after n's flush");
    check(&p2, &infos, "v2", "p2 after n's flush");
}

#[test]
fn replaced_server_pool() {
    replaced_server(Kind::Pool);
}

#[test]
fn replaced_server_shared() {
    replaced_server(Kind::Shared);
}

/// The brief's "owner and its next server removed at once": the key goes to its third
/// server, a taker (flushed by p1 at once, then read and filled by p1), while p2 still
/// deletes on the two that left.
#[test]
fn owner_and_next_removed_at_once() {
    let ms: Vec<Memcached> = (0..5).map(|_| Memcached::start()).collect();
    let all: Vec<&Memcached> = ms.iter().collect();
    let skew = Duration::from_secs(2);
    let master = Arc::new(MemoryStorage::new());
    let built = Instant::now();
    let (p1, list1) = process(Kind::Pool, &all, &master, skew);
    let (p2, list2) = process(Kind::Pool, &all, &master, skew);
    settle(built, skew);
    let (x, y) = (&ms[0], &ms[1]);
    let rest: Vec<&Memcached> = ms[2..].iter().collect();
    let without_x: Vec<&Memcached> = ms[1..].iter().collect();
    // Keys owned by x whose next server is y: both leave.
    let infos = resources(&p1, "c", 20, |i| {
        owner(&all, i) == x.addr() && owner(&without_x, i) == y.addr()
    });
    put(&p1, &infos, "v1");
    check(&p1, &infos, "v1", "p1 before");
    let t1 = Instant::now();
    change(&list1, &rest);
    check(&p1, &infos, "v1", "p1 without x and y");
    put(&p2, &infos, "v2");
    let in_skew = t1.elapsed() < skew;
    let bad = stale(&p1, &infos, "v2");
    println!(
        "owner+next removed: p1 after p2's write ({}ms, within skew: {in_skew}): {} of {} \
         reads superseded: {:?}",
        t1.elapsed().as_millis(),
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(4)]
    );
    change(&list2, &rest);
    expect_fresh(
        in_skew,
        &bad,
        2 * infos.len(),
        "p1 served values p2's write superseded",
    );
}

// ---------------------------------------------------------------------------------------
// Finding 2: "every write deletes on the key's next server" keeps the next server clean
// only while it stays the next one. When the next server leaves, the server after it
// becomes the key's next server without being flushed (one removal makes no taker), and it
// may hold an entry of the key from when it owned it. A process started after that
// ownership (no handover history) never deleted there; when the owner then leaves, the key
// returns to that server, which serves the superseded value.
// ---------------------------------------------------------------------------------------

fn next_server_changes(kind: Kind) {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (b, x, a, c) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_millis(150);
    let master = Arc::new(MemoryStorage::new());
    let built = Instant::now();
    let (p0, list0) = process(kind, &[b, x], &master, skew);
    settle(built, skew);
    // Keys on b; with a and c joined, owned by a with c next (b third).
    let infos = resources(&p0, "c", 20, |i| {
        owner(&[b, x], i) == b.addr()
            && owner(&[b, x, a, c], i) == a.addr()
            && owner(&[b, x, c], i) == c.addr()
    });
    put(&p0, &infos, "v1");
    check(&p0, &infos, "v1", "p0 on b and x"); // b holds v1
                                               // a and c join (both takers: flushed). The windows pass.
    change(&list0, &[b, x, a, c]);
    let joined = Instant::now();
    support::wait_for("the windows", || joined.elapsed() > 2 * skew);
    support::wait_for("the takers' flush", || p0.pending_invalidations() == 0);
    // A process started now writes v2: it deletes on a (owner) and c (next), not on b.
    let (p3, list3) = process(kind, &[b, x, a, c], &master, skew);
    settle(Instant::now(), skew);
    put(&p3, &infos, "v2");
    check(&p3, &infos, "v2", "p3 after its write");
    // c leaves (one removal: no taker; b becomes the next server), then a leaves (b owns
    // the keys again: it was next in line, so it is not flushed).
    change(&list0, &[b, x, a]);
    change(&list3, &[b, x, a]);
    let left = Instant::now();
    support::wait_for("the windows", || left.elapsed() > 2 * skew);
    check(&p3, &infos, "v2", "p3 after c left");
    change(&list0, &[b, x]);
    change(&list3, &[b, x]);
    let bad3 = stale(&p3, &infos, "v2");
    let bad0 = stale(&p0, &infos, "v2");
    let back = Instant::now();
    support::wait_for("the windows", || back.elapsed() > 2 * skew);
    let later = stale(&p3, &infos, "v2");
    println!(
        "{kind:?} next server changes: after a left: p3 {} of {} reads superseded {:?}; \
         p0 {}; p3 after the windows {}",
        bad3.len(),
        2 * infos.len(),
        &bad3[..bad3.len().min(4)],
        bad0.len(),
        later.len()
    );
    assert!(
        bad3.is_empty() && bad0.is_empty() && later.is_empty(),
        "b served v1, superseded by p3's write: p3 {}, p0 {}, p3 later {} reads",
        bad3.len(),
        bad0.len(),
        later.len()
    );
}

#[test]
fn next_server_changes_pool() {
    next_server_changes(Kind::Pool);
}

#[test]
fn next_server_changes_shared() {
    next_server_changes(Kind::Shared);
}

// ---------------------------------------------------------------------------------------
// Finding 3: a process that starts during a change's window (its discovery already shows
// the new list, another process's does not yet: within the skew) has no prior list. It
// reads and fills a new server at once (no read window, no distrust), and its writes do
// not delete where the lagging process still reads (a removed owner).
// ---------------------------------------------------------------------------------------

/// p2 (old list) and p3 (started on the new list with n added, while p2 has not taken it).
#[test]
fn a_process_started_during_an_addition_fills_what_the_lagging_process_does_not_delete() {
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let (a, b, c, n) = (&ms[0], &ms[1], &ms[2], &ms[3]);
    let skew = Duration::from_secs(2);
    let master = Arc::new(MemoryStorage::new());
    let built = Instant::now();
    let (p2, list2) = process(Kind::Pool, &[a, b, c], &master, skew);
    settle(built, skew);
    let infos = resources(&p2, "c", 20, |i| owner(&[a, b, c, n], i) == n.addr());
    put(&p2, &infos, "v1");
    check(&p2, &infos, "v1", "p2 before");
    // The change is published (some process took it at t1); p3 starts with the new list.
    let t1 = Instant::now();
    let (p3, _list3) = process(Kind::Pool, &[a, b, c, n], &master, skew);
    check(&p3, &infos, "v1", "p3 at its start"); // fills n
    put(&p2, &infos, "v2"); // by the old list: a and its next server
    let in_skew = t1.elapsed() < skew;
    let bad = stale(&p3, &infos, "v2");
    println!(
        "started during an addition: p3 after p2's write ({}ms, within skew: {in_skew}): \
         {} of {} reads superseded: {:?}",
        t1.elapsed().as_millis(),
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(4)]
    );
    change(&list2, &[a, b, c, n]);
    expect_fresh(
        in_skew,
        &bad,
        2 * infos.len(),
        "p3 served values p2's write superseded",
    );
}

/// p2 (old list, still reading a) and p3 (started on the new list without a): p3's write
/// does not delete on a.
#[test]
fn a_process_started_after_a_removal_does_not_delete_where_the_lagging_process_reads() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let (a, b, c) = (&ms[0], &ms[1], &ms[2]);
    let skew = Duration::from_secs(3);
    let master = Arc::new(MemoryStorage::new());
    let built = Instant::now();
    let (p2, list2) = process(Kind::Pool, &[a, b, c], &master, skew);
    settle(built, skew);
    let infos = resources(&p2, "c", 20, |i| owner(&[a, b, c], i) == a.addr());
    put(&p2, &infos, "v1");
    check(&p2, &infos, "v1", "p2 before"); // a holds v1
                                           // Some process took the change (and records it in the master's history of lists).
    let (_p1, list1) = process(Kind::Pool, &[a, b, c], &master, skew);
    let t1 = Instant::now();
    change(&list1, &[b, c]);
    let (p3, _list3) = process(Kind::Pool, &[b, c], &master, skew);
    put(&p3, &infos, "v2"); // deletes on b and c
    let in_skew = t1.elapsed() < skew;
    let bad = stale(&p2, &infos, "v2");
    println!(
        "started after a removal: p2 (old list) after p3's write ({}ms, within skew: \
         {in_skew}): {} of {} reads superseded: {:?}",
        t1.elapsed().as_millis(),
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(4)]
    );
    change(&list2, &[b, c]);
    expect_fresh(
        in_skew,
        &bad,
        2 * infos.len(),
        "p2 served values p3's write superseded",
    );
}

// ---------------------------------------------------------------------------------------
// Finding 4: an invalidation whose key's own server is marked down deletes nowhere: the
// route is asked first (`storage_spread` runs only if `route_key_peek` succeeds), so the
// servers that `Spread` adds (the previous owner, which a lagging process still reads; the
// next server) are skipped although they are up.
// ---------------------------------------------------------------------------------------

#[test]
fn an_invalidation_with_its_owner_down_skips_the_previous_owner() {
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let (a, b, c) = (&ms[0], &ms[1], &ms[2]);
    let mut n = Memcached::start();
    let n_addr = n.addr();
    let skew = Duration::from_secs(2);
    let master = Arc::new(MemoryStorage::new());
    let fast = |servers: &[&str]| {
        support::client_builder()
            .servers(servers.iter().map(|s| s.to_string()))
            .distribution(Distribution::Ketama)
            .server_failure_limit(1)
            .retry_timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_millis(300))
            .io_timeout(Duration::from_millis(300))
    };
    let abc = [a.addr(), b.addr(), c.addr()];
    let abc: Vec<&str> = abc.iter().map(String::as_str).collect();
    let built = Instant::now();
    let pool1 = Pool::new(fast(&abc), 2).unwrap();
    let list1 = pool1.server_list().clone();
    let p1 = MemcacheStorage::builder(pool1.clone(), master.clone() as Arc<dyn Storage>)
        .follow_list(skew)
        .build();
    let (p2, list2) = process(Kind::Pool, &[a, b, c], &master, skew);
    settle(built, skew);
    let infos = resources(&p1, "c", 20, |i| owner(&[a, b, c, &n], i) == n_addr);
    put(&p1, &infos, "v1");
    check(&p2, &infos, "v1", "p2 before"); // a (and the others) hold v1
                                           // n joins p1's list, and dies; p1 marks it down.
    let t1 = Instant::now();
    let mut abcn = abc.clone();
    abcn.push(&n_addr);
    let before = list1.generation();
    support::wait_for("p1's change", || {
        list1.set(&abcn).unwrap();
        list1.generation() > before
    });
    n.kill();
    {
        let mut c = pool1.get().unwrap();
        let k = format!("{}:c", infos[0].key);
        let _ = c.get(k.as_bytes()); // refused: n is marked down (failure limit 1)
    }
    put(&p1, &infos, "v2"); // the master has v2; the deletes?
    let in_skew = t1.elapsed() < skew;
    let bad = stale(&p2, &infos, "v2");
    println!(
        "owner down: p2 (old list, reads a) after p1's write ({}ms, within skew: {in_skew}): \
         {} of {} reads superseded: {:?}; p1 pending {}",
        t1.elapsed().as_millis(),
        bad.len(),
        2 * infos.len(),
        &bad[..bad.len().min(4)],
        p1.pending_invalidations()
    );
    let _ = list2;
    expect_fresh(
        in_skew,
        &bad,
        2 * infos.len(),
        "p2 served values p1's write superseded",
    );
}
