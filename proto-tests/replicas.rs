//! Keys on several servers (`ClientBuilder::replicas`, #27) against real memcached: placement
//! as the system libmemcached places its replicas, every keyed command on every front
//! (Client, SharedClient blocking and async) with what each server holds checked directly,
//! a frozen copy under both write policies, hedged reads beside a jittery server with every
//! reply reaching its own caller, and one copy behaving as before.

use mcstore_test_support as support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mcstore::client::{Item, ItemInfo, MetaGetOptions};
use mcstore::ring::{Continuum, Distribution, ReplicaPlacement};
use mcstore::{
    CasResult, Client, ClientBuilder, ErrorKind, FleetCounters, Hedge, Protocol, SetOptions,
    SharedClient, WritePolicy,
};
use support::Memcached;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

fn three() -> [Memcached; 3] {
    [Memcached::start(), Memcached::start(), Memcached::start()]
}

fn addrs(ms: &[Memcached]) -> Vec<String> {
    ms.iter().map(Memcached::addr).collect()
}

/// Ketama over `ms`, two copies per key (natural placement).
fn replicated(ms: &[Memcached], p: Protocol) -> ClientBuilder {
    support::client_builder()
        .protocol(p)
        .servers(addrs(ms))
        .distribution(Distribution::Ketama)
        .replicas(2)
        .io_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
}

/// Where a client keeps a key's copies, worked out independently of it.
trait Places {
    fn places(&self, key: &str) -> Vec<usize>;
}

/// Two copies on one continuum (natural placement).
impl Places for Continuum {
    fn places(&self, key: &str) -> Vec<usize> {
        let r = self.replicas(key.as_bytes(), 2, ReplicaPlacement::Natural);
        r.as_slice().iter().map(|&i| i as usize).collect()
    }
}

/// One copy per zone: each zone's own continuum (as a client of that zone alone), shifted
/// to the zone's first server; zones in the order they were added.
struct Zoned(Vec<(usize, Continuum)>);

impl Places for Zoned {
    fn places(&self, key: &str) -> Vec<usize> {
        self.0
            .iter()
            .map(|(first, ring)| first + ring.pick(key.as_bytes()).unwrap())
            .collect()
    }
}

/// A key's two copies, in placement order.
fn copies(ring: &dyn Places, key: &str) -> [usize; 2] {
    let s = ring.places(key);
    assert_eq!(s.len(), 2, "{key}: two copies");
    [s[0], s[1]]
}

/// Each server asked directly (meta protocol: values, TTLs and CAS uniques).
struct View {
    direct: Vec<Client>,
}

impl View {
    fn new(ms: &[Memcached]) -> View {
        View {
            direct: ms.iter().map(|m| m.client_with(Protocol::Meta)).collect(),
        }
    }

    /// What server `i` holds for `key`: (value, ttl left, cas unique).
    fn item(&mut self, i: usize, key: &str) -> Option<(String, Option<u32>, u64)> {
        let mut buf = Vec::new();
        let opts = MetaGetOptions {
            no_bump: true,
            ..Default::default()
        };
        let info = self.direct[i]
            .meta_get(key.as_bytes(), opts, &mut buf)
            .unwrap_or_else(|e| panic!("direct meta_get {key} on server {i}: {e}"))?;
        Some((String::from_utf8(buf).unwrap(), info.ttl, info.cas))
    }

    fn value(&mut self, i: usize, key: &str) -> Option<String> {
        self.item(i, key).map(|(v, _, _)| v)
    }

    /// Every server's value of `key`.
    fn held(&mut self, key: &str) -> Vec<Option<String>> {
        (0..self.direct.len()).map(|i| self.value(i, key)).collect()
    }

    /// Asserts that `key`'s first copy holds `first`, its second `second`, and every other
    /// server nothing.
    fn expect(&mut self, ring: &dyn Places, key: &str, first: Option<&str>, second: Option<&str>) {
        let [a, b] = copies(ring, key);
        let want: Vec<Option<String>> = (0..self.direct.len())
            .map(|i| {
                if i == a {
                    first.map(str::to_string)
                } else if i == b {
                    second.map(str::to_string)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            self.held(key),
            want,
            "{key}: copies {a} (first) and {b} (second), per server"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Placement against the real libmemcached
// ---------------------------------------------------------------------------------------

fn replica_helper() -> &'static PathBuf {
    static HELPER: OnceLock<PathBuf> = OnceLock::new();
    HELPER.get_or_init(|| {
        support::libmemcached_helper(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            "replica_helper",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/proto-tests/compat/replica_helper.c"
            ),
        )
    })
}

/// Stores `keys` through libmemcached with one replica, binary protocol, value `lm:KEY`.
fn libmemcached_sets(dist: &str, servers: &[String], keys: &[String]) {
    let mut cmd = Command::new(replica_helper());
    cmd.arg(dist);
    for s in servers {
        cmd.arg(format!("{s}:1"));
    }
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let mut input = keys.join("\n");
    input.push('\n');
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let status = child.wait().unwrap();
    writer.join().unwrap();
    assert!(status.success(), "replica_helper {dist} failed");
}

#[test]
fn placement_matches_libmemcached_number_of_replicas() {
    if support::tls_mode() {
        eprintln!("libmemcached's helper speaks no TLS: placement checked in plain runs only");
        return;
    }
    for dist in [Distribution::Modula, Distribution::Ketama] {
        let mut ms = three();
        let servers = addrs(&ms);
        let keys: Vec<String> = (0..300)
            .map(|i| format!("lm:{}:{i}:{}", dist.name(), i * 7919 % 1000))
            .collect();
        libmemcached_sets(dist.name(), &servers, &keys);
        let client = Client::builder()
            .servers(&servers)
            .distribution(dist)
            .replicas(2)
            .build()
            .unwrap();
        let ring = client.continuum();
        let mut direct: Vec<Client> = ms.iter().map(Memcached::client).collect();
        let mut mismatches = Vec::new();
        let mut natural_differs = 0;
        for key in &keys {
            let want = format!("lm:{key}");
            let mut holders = Vec::new();
            for (i, d) in direct.iter_mut().enumerate() {
                if let Some(item) = d.get(key.as_bytes()).unwrap() {
                    assert_eq!(item.value, want.as_bytes(), "{key} on server {i}");
                    holders.push(i as u32);
                }
            }
            let list = ring.replicas(key.as_bytes(), 2, ReplicaPlacement::List);
            let mut expected = list.as_slice().to_vec();
            expected.sort_unstable();
            if holders != expected {
                mismatches.push(format!("{key}: on {holders:?}, List says {expected:?}"));
            }
            // The key's own server is libmemcached's pick too.
            assert_eq!(
                list.as_slice()[0] as usize,
                ring.pick(key.as_bytes()).unwrap()
            );
            let natural = ring.replicas(key.as_bytes(), 2, ReplicaPlacement::Natural);
            if natural != list {
                natural_differs += 1;
            }
        }
        println!(
            "replicas placement {}: {} keys, {} mismatches, natural != list for {natural_differs}",
            dist.name(),
            keys.len(),
            mismatches.len()
        );
        assert!(
            mismatches.is_empty(),
            "{}: {} keys not where libmemcached put them, e.g. {:?}",
            dist.name(),
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
        match dist {
            // Under modula the natural placement is the list's.
            Distribution::Modula => {
                assert_eq!(natural_differs, 0);
                for i in 0..10_000 {
                    let k = format!("modula-key-{i}");
                    assert_eq!(
                        ring.replicas(k.as_bytes(), 2, ReplicaPlacement::Natural),
                        ring.replicas(k.as_bytes(), 2, ReplicaPlacement::List),
                        "{k}"
                    );
                }
            }
            // Under ketama they differ (else this test could not tell them apart).
            _ => assert!(natural_differs > 0, "natural == list for every key"),
        }
        // mcstore with List placement reads libmemcached's replicas when a key's own server
        // is gone.
        let mut reader = Client::builder()
            .servers(&servers)
            .distribution(dist)
            .replicas(2)
            .replica_placement(ReplicaPlacement::List)
            .io_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        ms[0].kill();
        for key in &keys {
            let item = reader.get(key.as_bytes()).unwrap();
            assert_eq!(
                item.map(|i| i.value),
                Some(format!("lm:{key}").into_bytes()),
                "{key} with server 0 gone"
            );
        }
        let c = reader.fleet_counters();
        println!(
            "replicas placement {}: reads with server 0 gone: {c:?}",
            dist.name()
        );
        assert!(
            c.failovers > 0,
            "no read failed over from the killed server"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The three fronts, one interface
// ---------------------------------------------------------------------------------------

struct Plain(Client);
struct Blocking(SharedClient);
struct Async {
    c: SharedClient,
    rt: tokio::runtime::Runtime,
}

impl Async {
    fn new(c: SharedClient) -> Async {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        Async { c, rt }
    }
}

macro_rules! fronts {
    ($($m:ident / $am:ident ($($a:ident: $t:ty),*) -> $o:ty;)*) => {
        /// A keyed call as one of the fronts makes it.
        trait Front {
            fn name(&self) -> &'static str;
            fn counters(&self) -> FleetCounters;
            fn set_zone_write_only(&mut self, zone: &str, on: bool) -> mcstore::Result<()>;
            $(fn $m(&mut self, $($a: $t),*) -> mcstore::Result<$o>;)*
        }
        impl Front for Plain {
            fn name(&self) -> &'static str { "Client" }
            fn counters(&self) -> FleetCounters { self.0.fleet_counters() }
            fn set_zone_write_only(&mut self, zone: &str, on: bool) -> mcstore::Result<()> { self.0.set_zone_write_only(zone, on) }
            $(fn $m(&mut self, $($a: $t),*) -> mcstore::Result<$o> { self.0.$m($($a),*) })*
        }
        impl Front for Blocking {
            fn name(&self) -> &'static str { "SharedClient" }
            fn counters(&self) -> FleetCounters { self.0.fleet_counters() }
            fn set_zone_write_only(&mut self, zone: &str, on: bool) -> mcstore::Result<()> { self.0.set_zone_write_only(zone, on) }
            $(fn $m(&mut self, $($a: $t),*) -> mcstore::Result<$o> { self.0.$m($($a),*) })*
        }
        impl Front for Async {
            fn name(&self) -> &'static str { "SharedClient async" }
            fn counters(&self) -> FleetCounters { self.c.fleet_counters() }
            fn set_zone_write_only(&mut self, zone: &str, on: bool) -> mcstore::Result<()> { self.c.set_zone_write_only(zone, on) }
            $(fn $m(&mut self, $($a: $t),*) -> mcstore::Result<$o> {
                self.rt.block_on(self.c.$am($($a),*))
            })*
        }
    };
}

fronts! {
    get / get_async(k: &[u8]) -> Option<Item>;
    gets / gets_async(k: &[u8]) -> Option<Item>;
    gat / gat_async(k: &[u8], ttl: u32) -> Option<Item>;
    gats / gats_async(k: &[u8], ttl: u32) -> Option<Item>;
    get_into / get_into_async(k: &[u8], buf: &mut Vec<u8>) -> Option<ItemInfo>;
    set / set_async(k: &[u8], v: &[u8], o: SetOptions) -> ();
    add / add_async(k: &[u8], v: &[u8], o: SetOptions) -> bool;
    replace / replace_async(k: &[u8], v: &[u8], o: SetOptions) -> bool;
    append / append_async(k: &[u8], v: &[u8]) -> bool;
    prepend / prepend_async(k: &[u8], v: &[u8]) -> bool;
    cas / cas_async(k: &[u8], v: &[u8], cas: u64, o: SetOptions) -> CasResult;
    delete / delete_async(k: &[u8]) -> bool;
    incr / incr_async(k: &[u8], d: u64) -> Option<u64>;
    decr / decr_async(k: &[u8], d: u64) -> Option<u64>;
    touch / touch_async(k: &[u8], ttl: u32) -> bool;
}

fn value_of(r: mcstore::Result<Option<Item>>, what: &str) -> Option<String> {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
        .map(|i| String::from_utf8(i.value).unwrap())
}

// ---------------------------------------------------------------------------------------
// 2. Every keyed command, every front, every protocol
// ---------------------------------------------------------------------------------------

const O: SetOptions = SetOptions { ttl: 0, flags: 0 };

/// A read of a key only its first copy holds (after a cas, an incr or a reconciled add):
/// its value, or a miss when the other copy was asked first (reads try a copy much slower
/// than the other last: on a loaded machine the first copy can be).
fn one_copy_read(f: &mut dyn Front, key: &str, want: &str) {
    let got = value_of(f.get(key.as_bytes()), f.name());
    assert!(
        got.is_none() || got.as_deref() == Some(want),
        "{}: {key}: want {want} or a miss, got {got:?}",
        f.name()
    );
    if got.is_none() {
        println!(
            "replicas: {} read {key} from the copy without it (a miss)",
            f.name()
        );
    }
}

/// Runs every keyed command on `f` and checks the reply and what each server holds after it.
fn every_command(f: &mut dyn Front, view: &mut View, ring: &dyn Places, tag: &str) {
    let who = f.name();
    let k = |n: &str| format!("{tag}:{n}");
    let b = |s: &str| s.as_bytes().to_vec();

    // set, then every read.
    let k1 = k("k1");
    f.set(k1.as_bytes(), b"v1", O.flags(42)).unwrap();
    view.expect(ring, &k1, Some("v1"), Some("v1"));
    let item = f.get(k1.as_bytes()).unwrap().expect("get after set");
    assert_eq!(
        (item.value, item.flags, item.cas),
        (b("v1"), 42, None),
        "{who} get"
    );
    let item = f.gets(k1.as_bytes()).unwrap().expect("gets after set");
    assert_eq!((item.value, item.flags), (b("v1"), 42), "{who} gets");
    assert!(item.cas.is_some(), "{who}: gets has a unique");
    let item = f.gat(k1.as_bytes(), 0).unwrap().expect("gat after set");
    assert_eq!(
        (item.value, item.flags, item.cas),
        (b("v1"), 42, None),
        "{who} gat"
    );
    let item = f.gats(k1.as_bytes(), 0).unwrap().expect("gats after set");
    assert_eq!((item.value, item.flags), (b("v1"), 42), "{who} gats");
    assert!(item.cas.is_some(), "{who}: gats has a unique");
    let mut buf = b"junk".to_vec();
    let info = f
        .get_into(k1.as_bytes(), &mut buf)
        .unwrap()
        .expect("get_into");
    assert_eq!(
        (buf.as_slice(), info.flags),
        (&b"v1"[..], 42),
        "{who} get_into"
    );
    view.expect(ring, &k1, Some("v1"), Some("v1"));
    f.set(k1.as_bytes(), b"v2", O).unwrap();
    view.expect(ring, &k1, Some("v2"), Some("v2"));
    assert_eq!(value_of(f.get(k1.as_bytes()), who), Some("v2".into()));
    let missing = k("missing");
    assert_eq!(value_of(f.get(missing.as_bytes()), who), None);
    assert_eq!(f.get_into(missing.as_bytes(), &mut buf).unwrap(), None);

    // add: refused where the first copy has the key; a copy that disagrees is deleted.
    assert!(
        !f.add(k1.as_bytes(), b"a", O).unwrap(),
        "{who}: add over v2"
    );
    view.expect(ring, &k1, Some("v2"), Some("v2"));
    let k2 = k("k2");
    assert!(
        f.add(k2.as_bytes(), b"a", O).unwrap(),
        "{who}: add of a new key"
    );
    view.expect(ring, &k2, Some("a"), Some("a"));
    let k3 = k("k3");
    let [first3, _] = copies(ring, &k3);
    view.direct[first3].set(k3.as_bytes(), b"d", O).unwrap();
    assert!(
        !f.add(k3.as_bytes(), b"a", O).unwrap(),
        "{who}: first copy decides"
    );
    view.expect(ring, &k3, Some("d"), None);
    one_copy_read(f, &k3, "d");
    let k4 = k("k4");
    let [_, second4] = copies(ring, &k4);
    view.direct[second4].set(k4.as_bytes(), b"d", O).unwrap();
    assert!(
        f.add(k4.as_bytes(), b"a", O).unwrap(),
        "{who}: first copy decides"
    );
    view.expect(ring, &k4, Some("a"), None);
    one_copy_read(f, &k4, "a");

    // replace.
    assert!(f.replace(k1.as_bytes(), b"r", O).unwrap(), "{who}: replace");
    view.expect(ring, &k1, Some("r"), Some("r"));
    let k5 = k("k5");
    assert!(
        !f.replace(k5.as_bytes(), b"r", O).unwrap(),
        "{who}: replace missing"
    );
    view.expect(ring, &k5, None, None);
    let k6 = k("k6");
    let [first6, _] = copies(ring, &k6);
    view.direct[first6].set(k6.as_bytes(), b"d", O).unwrap();
    assert!(
        f.replace(k6.as_bytes(), b"r", O).unwrap(),
        "{who}: replace, first has it"
    );
    view.expect(ring, &k6, Some("r"), None);
    let k7 = k("k7");
    let [_, second7] = copies(ring, &k7);
    view.direct[second7].set(k7.as_bytes(), b"d", O).unwrap();
    assert!(
        !f.replace(k7.as_bytes(), b"r", O).unwrap(),
        "{who}: replace, first lacks it"
    );
    view.expect(ring, &k7, None, None);
    assert_eq!(value_of(f.get(k7.as_bytes()), who), None);

    // append, prepend.
    assert!(f.append(k1.as_bytes(), b"+a").unwrap(), "{who}: append");
    view.expect(ring, &k1, Some("r+a"), Some("r+a"));
    assert!(f.prepend(k1.as_bytes(), b"p+").unwrap(), "{who}: prepend");
    view.expect(ring, &k1, Some("p+r+a"), Some("p+r+a"));
    assert_eq!(value_of(f.get(k1.as_bytes()), who), Some("p+r+a".into()));
    assert!(
        !f.append(k5.as_bytes(), b"x").unwrap(),
        "{who}: append missing"
    );
    assert!(
        !f.prepend(k5.as_bytes(), b"x").unwrap(),
        "{who}: prepend missing"
    );
    view.expect(ring, &k5, None, None);
    let k8 = k("k8");
    let [_, second8] = copies(ring, &k8);
    view.direct[second8].set(k8.as_bytes(), b"d", O).unwrap();
    assert!(
        !f.append(k8.as_bytes(), b"x").unwrap(),
        "{who}: append, first lacks it"
    );
    view.expect(ring, &k8, None, None);

    // cas: on the first copy; the other copy deleted when it stored.
    let [c0, c1] = copies(ring, &k1);
    let item = f.gets(k1.as_bytes()).unwrap().expect("gets");
    let unique = item.cas.unwrap();
    let first_unique = view.item(c0, &k1).unwrap().2;
    let second_unique = view.item(c1, &k1).unwrap().2;
    assert!(
        unique == first_unique || unique == second_unique,
        "{who}: gets' unique {unique} is neither copy's ({first_unique}, {second_unique})"
    );
    let r = f.cas(k1.as_bytes(), b"c", unique, O).unwrap();
    if unique == first_unique {
        assert_eq!(
            r,
            CasResult::Stored,
            "{who}: cas with the first copy's unique"
        );
        view.expect(ring, &k1, Some("c"), None);
        one_copy_read(f, &k1, "c");
    } else {
        // The read was answered by the second copy (it was faster): safe, refused.
        assert_eq!(
            r,
            CasResult::Exists,
            "{who}: cas with the second copy's unique"
        );
        view.expect(ring, &k1, Some("p+r+a"), Some("p+r+a"));
    }
    f.set(k1.as_bytes(), b"s", O).unwrap();
    let stale = f.gets(k1.as_bytes()).unwrap().unwrap().cas.unwrap();
    f.set(k1.as_bytes(), b"s2", O).unwrap();
    assert_eq!(
        f.cas(k1.as_bytes(), b"c2", stale, O).unwrap(),
        CasResult::Exists,
        "{who}: stale cas"
    );
    view.expect(ring, &k1, Some("s2"), Some("s2"));
    assert_eq!(
        f.cas(k5.as_bytes(), b"x", 12_345, O).unwrap(),
        CasResult::NotFound,
        "{who}: cas of a missing key"
    );
    view.expect(ring, &k5, None, None);

    // incr, decr: on the first copy; the other deleted.
    let k9 = k("k9");
    f.set(k9.as_bytes(), b"10", O).unwrap();
    view.expect(ring, &k9, Some("10"), Some("10"));
    assert_eq!(f.incr(k9.as_bytes(), 5).unwrap(), Some(15), "{who}: incr");
    view.expect(ring, &k9, Some("15"), None);
    one_copy_read(f, &k9, "15");
    assert_eq!(f.decr(k9.as_bytes(), 3).unwrap(), Some(12), "{who}: decr");
    view.expect(ring, &k9, Some("12"), None);
    assert_eq!(
        f.incr(k5.as_bytes(), 1).unwrap(),
        None,
        "{who}: incr missing"
    );
    assert_eq!(
        f.decr(k5.as_bytes(), 1).unwrap(),
        None,
        "{who}: decr missing"
    );
    view.expect(ring, &k5, None, None);
    // The first copy lacks it: it answers (not found) and nothing changes.
    let k10 = k("k10");
    let [_, second10] = copies(ring, &k10);
    view.direct[second10].set(k10.as_bytes(), b"10", O).unwrap();
    assert_eq!(
        f.incr(k10.as_bytes(), 1).unwrap(),
        None,
        "{who}: incr, first lacks it"
    );
    view.expect(ring, &k10, None, Some("10"));

    // touch: every copy.
    f.set(k1.as_bytes(), b"t", O).unwrap();
    assert!(f.touch(k1.as_bytes(), 1000).unwrap(), "{who}: touch");
    view.expect(ring, &k1, Some("t"), Some("t"));
    for i in copies(ring, &k1) {
        let ttl = view.item(i, &k1).unwrap().1;
        assert!(
            ttl.is_some_and(|t| (990..=1000).contains(&t)),
            "{who}: touch reached copy {i}: ttl {ttl:?}"
        );
    }
    assert!(
        !f.touch(k5.as_bytes(), 1000).unwrap(),
        "{who}: touch missing"
    );
    view.expect(ring, &k5, None, None);

    // gat: a read, from one copy (which alone gets the new TTL).
    let k11 = k("k11");
    f.set(k11.as_bytes(), b"g", O).unwrap();
    assert_eq!(value_of(f.gat(k11.as_bytes(), 1000), who), Some("g".into()));
    let ttls: Vec<Option<u32>> = copies(ring, &k11)
        .iter()
        .map(|&i| view.item(i, &k11).unwrap().1)
        .collect();
    // A read that races both copies (`tag` ends with `racing`) touches both.
    let racing = tag.ends_with("racing");
    let touched = ttls.iter().filter(|t| t.is_some()).count();
    assert!(
        touched == 1 || (racing && touched == 2),
        "{who}: gat touched one copy: {ttls:?}"
    );
    view.expect(ring, &k11, Some("g"), Some("g"));

    // delete: every copy.
    assert!(f.delete(k1.as_bytes()).unwrap(), "{who}: delete");
    view.expect(ring, &k1, None, None);
    assert!(!f.delete(k1.as_bytes()).unwrap(), "{who}: delete again");
    assert_eq!(value_of(f.get(k1.as_bytes()), who), None);
    // Found on one copy only: found.
    assert!(
        f.delete(k10.as_bytes()).unwrap(),
        "{who}: delete, second copy only"
    );
    view.expect(ring, &k10, None, None);

    let c = f.counters();
    let hedges = if racing { 0 } else { c.hedges_sent };
    assert_eq!(
        (c.failovers, c.repairs_recorded, hedges),
        (0, 0, 0),
        "{who}: a healthy fleet needs nothing: {c:?}"
    );
    if racing {
        // Whether one read races is timing: a reply read before the hedge's timer is
        // checked goes out alone (1 run in 3 to 6 raced none of the reads above). Of a few
        // thousand reads, some race.
        for _ in 0..5_000 {
            if f.counters().hedges_sent > 0 {
                break;
            }
            assert_eq!(value_of(f.get(k1.as_bytes()), who), None);
        }
        let c = f.counters();
        assert!(c.hedges_sent > 0, "{who}: every read races: {c:?}");
    }
}

fn commands_behave_as_documented(p: Protocol) {
    let ms = three();
    let mut view = View::new(&ms);
    let b = replicated(&ms, p);
    let plain = b.clone().build().unwrap();
    let ring = plain.continuum().clone();
    // A Client that hedges every read at once: each read races both copies.
    let racing = b
        .clone()
        .hedge(Hedge::after(Duration::from_micros(1)).budget(1.0))
        .build()
        .unwrap();
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Plain(plain)),
        Box::new(Blocking(b.clone().shared().build().unwrap())),
        Box::new(Async::new(b.shared().build().unwrap())),
        Box::new(Plain(racing)),
    ];
    for (n, f) in fronts.iter_mut().enumerate() {
        let tag = format!("{p:?}:{n}{}", if n == 3 { ":racing" } else { "" });
        every_command(f.as_mut(), &mut view, &ring, &tag);
    }
}

/// Two zones of two servers, a copy in each: zone `a` (servers 0, 1), zone `b` (2, 3).
fn two_zones(ms: &[Memcached], p: Protocol) -> (ClientBuilder, Zoned) {
    let a = addrs(&ms[..2]);
    let b = addrs(&ms[2..]);
    let ring_of = |servers: &[String]| {
        support::client_builder()
            .servers(servers)
            .distribution(Distribution::Ketama)
            .build()
            .unwrap()
            .continuum()
            .clone()
    };
    let layout = Zoned(vec![(0, ring_of(&a)), (2, ring_of(&b))]);
    let builder = support::client_builder()
        .protocol(p)
        .zone("a", a)
        .zone("b", b)
        .distribution(Distribution::Ketama)
        .io_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5));
    (builder, layout)
}

fn four() -> Vec<Memcached> {
    (0..4).map(|_| Memcached::start()).collect()
}

/// Every keyed command with two zones (a copy of each key in each, each zone's continuum
/// its own), on every front: the same behaviour as two copies on one continuum.
fn commands_with_two_zones(p: Protocol) {
    let ms = four();
    let mut view = View::new(&ms);
    let (b, layout) = two_zones(&ms, p);
    let mut plain = b.clone().build().unwrap();
    for k in 0..200 {
        let key = format!("zoned:{k}");
        assert_eq!(
            plain.servers_of_key(key.as_bytes()).unwrap(),
            layout.places(&key),
            "{key}: a copy in each zone, each zone's own continuum"
        );
    }
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Plain(plain)),
        Box::new(Blocking(b.clone().shared().build().unwrap())),
        Box::new(Async::new(b.shared().build().unwrap())),
    ];
    for (n, f) in fronts.iter_mut().enumerate() {
        every_command(f.as_mut(), &mut view, &layout, &format!("zones:{p:?}:{n}"));
    }
}

support::for_each_protocol!(
    commands_behave_as_documented,
    multi_key_calls_reach_every_copy,
    commands_with_two_zones
);

/// Reads go to the preferred zone (`get`), `gets` and counters to the zones in the order
/// they were added; a write-only zone gets every write and serves no read; a zone that is
/// down is failed over from. On every front.
#[test]
fn zones_prefer_fail_over_and_warm() {
    let mut ms = four();
    let mut view = View::new(&ms);
    let (b, layout) = two_zones(&ms, Protocol::Text);
    let local_b = b.clone().prefer_zone("b");
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Plain(local_b.clone().build().unwrap())),
        Box::new(Blocking(local_b.clone().shared().build().unwrap())),
        Box::new(Async::new(local_b.shared().build().unwrap())),
    ];
    let mut other = b.clone().build().unwrap(); // prefers zone a (the first)
    for (n, f) in fronts.iter_mut().enumerate() {
        let who = f.name();
        let key = format!("pref:{n}");
        let [in_a, in_b] = copies(&layout, &key);
        f.set(key.as_bytes(), b"both", O).unwrap();
        view.expect(&layout, &key, Some("both"), Some("both"));
        // Tell the copies apart, behind the clients' backs.
        view.direct[in_a].set(key.as_bytes(), b"A", O).unwrap();
        view.direct[in_b].set(key.as_bytes(), b"B", O).unwrap();
        assert_eq!(
            value_of(f.get(key.as_bytes()), who),
            Some("B".into()),
            "{who}: get, zone b preferred"
        );
        assert_eq!(
            value_of(other.get(key.as_bytes()), "other"),
            Some("A".into()),
            "get, zone a preferred"
        );
        let g = f.gets(key.as_bytes()).unwrap().unwrap();
        assert_eq!(
            g.value, b"A",
            "{who}: gets goes to the first zone, where cas goes"
        );
        assert_eq!(
            f.cas(key.as_bytes(), b"C", g.cas.unwrap(), O).unwrap(),
            CasResult::Stored,
            "{who}"
        );
        view.expect(&layout, &key, Some("C"), None);

        // Zone b warms up: written to, never read.
        let ctr = format!("ctr:{n}");
        f.set_zone_write_only("b", true).unwrap();
        f.set(key.as_bytes(), b"W", O).unwrap();
        view.expect(&layout, &key, Some("W"), Some("W"));
        view.direct[in_b].set(key.as_bytes(), b"B", O).unwrap();
        assert_eq!(
            value_of(f.get(key.as_bytes()), who),
            Some("W".into()),
            "{who}: b is write-only"
        );
        // Zone a write-only instead: counters stay on a (the first zone added, whatever is
        // write-only: every client agrees), and survive a toggle back.
        f.set_zone_write_only("b", false).unwrap();
        f.set_zone_write_only("a", true).unwrap();
        f.set(ctr.as_bytes(), b"10", O).unwrap();
        assert_eq!(f.incr(ctr.as_bytes(), 1).unwrap(), Some(11), "{who}");
        let [ca, cb] = copies(&layout, &ctr);
        assert_eq!(
            (view.value(ca, &ctr), view.value(cb, &ctr)),
            (Some("11".into()), None),
            "{who}: incr on a, b deleted"
        );
        f.set_zone_write_only("a", false).unwrap();
        assert_eq!(f.incr(ctr.as_bytes(), 1).unwrap(), Some(12), "{who}");
        f.set_zone_write_only("a", true).unwrap();
        assert!(f.set_zone_write_only("nowhere", true).is_err());
        f.set_zone_write_only("a", false).unwrap();
    }
    assert_eq!(other.zones().len(), 2);
    assert!(
        other.zones().iter().all(|z| !z.write_only),
        "{:?}",
        other.zones()
    );

    // Zone b's servers gone: reads of every front fail over to zone a.
    let keys: Vec<String> = (0..20).map(|i| format!("down:{i}")).collect();
    for k in &keys {
        other.set(k.as_bytes(), b"v", O).unwrap();
    }
    ms[2].kill();
    ms[3].kill();
    for f in fronts.iter_mut() {
        let before = f.counters().failovers;
        for k in &keys {
            assert_eq!(
                value_of(f.get(k.as_bytes()), f.name()),
                Some("v".into()),
                "{}: {k}",
                f.name()
            );
        }
        assert!(
            f.counters().failovers > before,
            "{}: reads failed over",
            f.name()
        );
    }
}

/// `read_miss_failover`: a copy that lost the key (a restarted or new server) does not
/// hide it: the read asks the next copy. Every front.
#[test]
fn a_miss_fails_over_when_asked_to() {
    let ms = three();
    let mut view = View::new(&ms);
    let b = replicated(&ms, Protocol::Text).read_miss_failover(true);
    let ring = b.clone().build().unwrap().continuum().clone();
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Plain(b.clone().build().unwrap())),
        Box::new(Blocking(b.clone().shared().build().unwrap())),
        Box::new(Async::new(b.shared().build().unwrap())),
    ];
    for (n, f) in fronts.iter_mut().enumerate() {
        let who = f.name();
        for k in 0..10 {
            let key = format!("warm:{n}:{k}");
            f.set(key.as_bytes(), b"v", O).unwrap();
            // One copy loses it, either one: whichever the read asks first, it finds it.
            let lost = copies(&ring, &key)[k % 2];
            view.direct[lost].delete(key.as_bytes()).unwrap();
            assert_eq!(
                value_of(f.get(key.as_bytes()), who),
                Some("v".into()),
                "{who}: {key}"
            );
            let g = f.gets(key.as_bytes()).unwrap();
            assert_eq!(g.map(|i| i.value), Some(b"v".to_vec()), "{who}: gets {key}");
        }
        let before = f.counters();
        let missing = format!("nowhere:{n}");
        assert_eq!(value_of(f.get(missing.as_bytes()), who), None, "{who}");
        assert_eq!(
            f.counters().failovers,
            before.failovers,
            "{who}: a miss everywhere is no failover"
        );
        // Half the keys lost their first copy, half their second: the reads that asked the
        // copy without it first failed over (10 in placement order).
        assert!(before.failovers >= 1, "{who}: {before:?}");
    }
}

/// What a zone configuration may not be.
#[test]
fn zone_configurations_refused() {
    let ok = || {
        support::client_builder()
            .zone("a", ["127.0.0.1:1"])
            .zone("b", ["127.0.0.1:2"])
    };
    assert!(ok().build().is_ok());
    let refused = [
        ok().server("127.0.0.1:3"),
        ok().zone("a", ["127.0.0.1:4"]),
        ok().zone("c", Vec::<String>::new()),
        ok().prefer_zone("c"),
        ok().write_only_zone("c"),
        ok().replicas(3),
        support::client_builder()
            .server("127.0.0.1:1")
            .prefer_zone("a"),
    ];
    for (k, b) in refused.into_iter().enumerate() {
        assert!(
            matches!(b.build(), Err(mcstore::Error::Config(_))),
            "configuration {k} must be refused"
        );
    }
    // Two zones of two copies: four in all, the most there may be.
    let c = ok().zone("c", ["127.0.0.1:5"]).replicas(1).build().unwrap();
    assert_eq!(c.zones().len(), 3);
}

// ---------------------------------------------------------------------------------------
// 3. A frozen copy
// ---------------------------------------------------------------------------------------

/// The frozen server.
const B: usize = 1;

/// Keys of one front, by what is done with them while B is frozen.
struct Roles {
    read: Vec<String>,
    write: Vec<String>,
    del: Vec<String>,
    /// No copy on B.
    away: Vec<String>,
}

impl Roles {
    /// Keys with a copy on B (half of each role with B first), and a few without.
    fn new(ring: &Continuum, prefix: &str) -> Roles {
        let (mut b_first, mut b_second, mut away) = (Vec::new(), Vec::new(), Vec::new());
        let mut n = 0;
        while b_first.len() < 6 || b_second.len() < 6 || away.len() < 3 {
            let key = format!("{prefix}:{n}");
            n += 1;
            match copies(ring, &key) {
                [B, _] if b_first.len() < 6 => b_first.push(key),
                [_, B] if b_second.len() < 6 => b_second.push(key),
                [x, y] if x != B && y != B && away.len() < 3 => away.push(key),
                _ => {}
            }
        }
        let mut roles = Roles {
            read: Vec::new(),
            write: Vec::new(),
            del: Vec::new(),
            away,
        };
        for (n, key) in b_first.into_iter().chain(b_second).enumerate() {
            match n % 3 {
                0 => roles.read.push(key),
                1 => roles.write.push(key),
                _ => roles.del.push(key),
            }
        }
        roles
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        self.read
            .iter()
            .chain(&self.write)
            .chain(&self.del)
            .chain(&self.away)
    }
}

fn v1(key: &str) -> String {
    format!("v1:{key}")
}

fn v2(key: &str) -> String {
    format!("v2:{key}")
}

fn frozen_copy(policy: WritePolicy, p: Protocol) {
    let ms = three();
    let b_addr = ms[B].addr();
    let mut view = View::new(&ms);
    let base = replicated(&ms, p)
        .write_policy(policy)
        .io_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .server_failure_limit(1)
        .retry_timeout(Duration::from_secs(2));
    let plain = base.clone().build().unwrap();
    let ring = plain.continuum().clone();
    let hedged = base.hedge(Hedge::after(Duration::from_millis(20)));
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Plain(plain)),
        Box::new(Blocking(hedged.clone().shared().build().unwrap())),
        Box::new(Async::new(hedged.shared().build().unwrap())),
    ];
    let roles: Vec<Roles> = (0..fronts.len())
        .map(|n| Roles::new(&ring, &format!("{policy:?}:{p:?}:{n}")))
        .collect();
    for (f, r) in fronts.iter_mut().zip(&roles) {
        for key in r.all() {
            f.set(key.as_bytes(), v1(key).as_bytes(), O).unwrap();
            let [a, b] = copies(&ring, key);
            assert_eq!(view.value(a, key), Some(v1(key)));
            assert_eq!(view.value(b, key), Some(v1(key)));
        }
    }

    ms[B].freeze();
    let frozen_at = Instant::now();
    let mut slowest_write = [Duration::ZERO; 3];
    for (n, (f, r)) in fronts.iter_mut().zip(&roles).enumerate() {
        let who = f.name();
        for _ in 0..3 {
            for key in r.read.iter().chain(&r.away) {
                let got = value_of(
                    f.get(key.as_bytes()),
                    &format!("{who} read {key}, B frozen"),
                );
                assert_eq!(got, Some(v1(key)), "{who}: {key} with B frozen");
            }
        }
        for key in &r.away {
            f.set(key.as_bytes(), v2(key).as_bytes(), O)
                .unwrap_or_else(|e| panic!("{who}: {key} has no copy on B: {e}"));
        }
        for key in &r.write {
            let t = Instant::now();
            let res = f.set(key.as_bytes(), v2(key).as_bytes(), O);
            slowest_write[n] = slowest_write[n].max(t.elapsed());
            check_write(policy, res, who, key, &b_addr);
        }
        for key in &r.del {
            let res = f.delete(key.as_bytes());
            match policy {
                WritePolicy::All => check_write(policy, res.map(|_| ()), who, key, &b_addr),
                WritePolicy::Any => assert!(res.unwrap(), "{who}: delete {key} under Any"),
            }
        }
        // The other copies were written either way; reads never see B's older value.
        for _ in 0..3 {
            for key in r.write.iter().chain(&r.away) {
                let got = value_of(f.get(key.as_bytes()), &format!("{who} read {key}"));
                assert_eq!(
                    got,
                    Some(v2(key)),
                    "{who}: {key} written while B was frozen"
                );
            }
            for key in &r.del {
                let got = value_of(f.get(key.as_bytes()), &format!("{who} read {key}"));
                assert_eq!(got, None, "{who}: {key} deleted while B was frozen");
            }
        }
        for key in r.write.iter().chain(&r.del) {
            let other = copies(&ring, key).into_iter().find(|&i| i != B).unwrap();
            let want = r.write.contains(key).then(|| v2(key));
            assert_eq!(
                view.value(other, key),
                want,
                "{who}: {key} on its other copy"
            );
        }
    }
    let frozen_for = frozen_at.elapsed();
    ms[B].resume();

    // After the resume: B never serves what it missed.
    let mut misses = [0usize; 3];
    for (n, (f, r)) in fronts.iter_mut().zip(&roles).enumerate() {
        let who = f.name();
        for _ in 0..20 {
            for key in &r.del {
                let got = value_of(f.get(key.as_bytes()), &format!("{who} read {key}"));
                assert_eq!(
                    got, None,
                    "{who}: {key}, deleted while B was frozen, after resume"
                );
            }
            for key in &r.write {
                let got = value_of(f.get(key.as_bytes()), &format!("{who} read {key}"));
                // Once B is repaired (the key deleted there), a read that asks B misses.
                if got.is_none() {
                    misses[n] += 1;
                } else {
                    assert_eq!(got, Some(v2(key)), "{who}: {key} after resume");
                }
            }
        }
    }
    // The repairs: a Client does them in its next calls, a SharedClient on its own.
    for (n, (f, r)) in fronts.iter_mut().zip(&roles).enumerate() {
        let who = f.name();
        let c = f.counters();
        assert!(c.repairs_recorded > 0, "{who}: no repair recorded: {c:?}");
        let is_client = who == "Client";
        // A client in use: one call per look (a Client repairs at the start of its calls, a
        // SharedClient's thread on its own).
        let probe = r.away[0].clone();
        support::wait_for(&format!("{who}'s repairs on B"), || {
            assert_eq!(value_of(f.get(probe.as_bytes()), who), Some(v2(&probe)));
            let c = f.counters();
            c.repairs_done >= c.repairs_recorded && r.del.iter().all(|k| view.value(B, k).is_none())
        });
        for key in &r.write {
            let on_b = view.value(B, key);
            assert!(
                on_b.is_none() || on_b == Some(v2(key)),
                "{who}: B holds {on_b:?} for {key} after its repair"
            );
        }
        for key in &r.del {
            let got = value_of(f.get(key.as_bytes()), who);
            assert_eq!(got, None, "{who}: {key} after the repair");
        }
        let c = f.counters();
        println!(
            "replicas frozen {policy:?} {p:?} {who}: B frozen {frozen_for:?}; slowest write \
             {:?}; reads of keys written while B was frozen that missed after resume: {}/{}; \
             {c:?}",
            slowest_write[n],
            misses[n],
            20 * r.write.len()
        );
        assert!(
            c.failovers + c.hedges_won > 0,
            "{who}: reads of B's keys answered without failover or hedge? {c:?}"
        );
        if is_client {
            assert!(c.failovers > 0, "{who}: a Client fails over: {c:?}");
        }
    }
}

/// A write to a key with a copy on frozen B: a clear error naming B under All, success
/// under Any.
fn check_write(policy: WritePolicy, res: mcstore::Result<()>, who: &str, key: &str, b: &str) {
    match (policy, res) {
        (WritePolicy::All, Err(e)) => {
            assert!(
                matches!(e.kind(), ErrorKind::Timeout | ErrorKind::ServerDown),
                "{who}: {key}: {e}"
            );
            assert!(
                e.to_string().contains(b),
                "{who}: {key}: the error names B: {e}"
            );
        }
        (WritePolicy::All, Ok(())) => panic!("{who}: {key} written under All with B frozen"),
        (_, r) => r.unwrap_or_else(|e| panic!("{who}: {key} under Any with B frozen: {e}")),
    }
}

#[test]
fn frozen_copy_write_all() {
    for p in [Protocol::Text, Protocol::Meta] {
        frozen_copy(WritePolicy::All, p);
    }
}

#[test]
fn frozen_copy_write_any() {
    for p in [Protocol::Binary, Protocol::Meta] {
        frozen_copy(WritePolicy::Any, p);
    }
}

// ---------------------------------------------------------------------------------------
// 4. Many callers, hedged reads, a jittery server
// ---------------------------------------------------------------------------------------

/// Stops server `pid` 5 ms of every 50 until dropped; it is always continued at the end,
/// on a panic too.
struct Jitter {
    on: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    pid: u32,
}

/// Sends `sig` to `pid` (directly: no `kill` process to start on a loaded machine).
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid this test started and a plain signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl Jitter {
    fn start(m: &Memcached) -> Jitter {
        let pid = m.pid();
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let thread = thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                signal(pid, libc::SIGSTOP);
                thread::sleep(Duration::from_millis(5));
                signal(pid, libc::SIGCONT);
                thread::sleep(Duration::from_millis(45));
            }
        });
        Jitter {
            on,
            thread: Some(thread),
            pid,
        }
    }
}

impl Drop for Jitter {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        signal(self.pid, libc::SIGCONT);
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    writes: AtomicU64,
    wrong: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert(what);
    }

    fn wrong(&self, what: String) {
        self.wrong.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert(what);
    }
}

const KEYS_PER_CALLER: usize = 8;

fn jkey(caller: usize, k: usize) -> String {
    format!("jitter:{caller}:{k}")
}

fn jvalue(caller: usize, k: usize, generation: u64) -> String {
    format!("value-{caller}-{k}-{generation}")
}

/// One caller: mostly reads of its own keys, now and then a new value (then read back).
fn blocking_caller(c: &SharedClient, caller: usize, until: Instant, t: &Tally) {
    let mut generation = [0u64; KEYS_PER_CALLER];
    let mut buf = Vec::new();
    let mut n = 0usize;
    while Instant::now() < until {
        n += 1;
        let k = (n * 7 + caller) % KEYS_PER_CALLER;
        let key = jkey(caller, k);
        if n % 10 == 0 {
            generation[k] += 1;
            let v = jvalue(caller, k, generation[k]);
            t.writes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = c.set(key.as_bytes(), v.as_bytes(), O) {
                t.fail(format!("set {key}: {e}"));
            }
        }
        let want = jvalue(caller, k, generation[k]);
        t.reads.fetch_add(1, Ordering::Relaxed);
        let got = if n % 2 == 0 {
            c.get_into(key.as_bytes(), &mut buf)
                .map(|i| i.map(|_| buf.clone()))
        } else {
            c.get(key.as_bytes()).map(|i| i.map(|i| i.value))
        };
        match got {
            Ok(Some(v)) if v == want.as_bytes() => {}
            Ok(other) => t.wrong(format!(
                "{key}: want {want}, got {:?}",
                other.map(|v| String::from_utf8_lossy(&v).into_owned())
            )),
            Err(e) => t.fail(format!("get {key}: {e}")),
        }
    }
}

async fn async_caller(c: SharedClient, caller: usize, until: Instant, t: Arc<Tally>) {
    let mut generation = [0u64; KEYS_PER_CALLER];
    let mut buf = Vec::new();
    let mut n = 0usize;
    while Instant::now() < until {
        n += 1;
        let k = (n * 5 + caller) % KEYS_PER_CALLER;
        let key = jkey(caller, k);
        if n % 10 == 0 {
            generation[k] += 1;
            let v = jvalue(caller, k, generation[k]);
            t.writes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = c.set_async(key.as_bytes(), v.as_bytes(), O).await {
                t.fail(format!("set {key}: {e}"));
            }
        }
        let want = jvalue(caller, k, generation[k]);
        t.reads.fetch_add(1, Ordering::Relaxed);
        let got = if n % 2 == 0 {
            c.get_into_async(key.as_bytes(), &mut buf)
                .await
                .map(|i| i.map(|_| buf.clone()))
        } else {
            c.get_async(key.as_bytes())
                .await
                .map(|i| i.map(|i| i.value))
        };
        match got {
            Ok(Some(v)) if v == want.as_bytes() => {}
            Ok(other) => t.wrong(format!(
                "{key}: want {want}, got {:?}",
                other.map(|v| String::from_utf8_lossy(&v).into_owned())
            )),
            Err(e) => t.fail(format!("get {key}: {e}")),
        }
    }
}

#[test]
fn hedged_reads_beside_a_jittery_server_reach_their_callers() {
    const THREADS: usize = 16;
    const TASKS: usize = 16;
    let ms = three();
    let c = replicated(&ms, Protocol::Meta)
        .hedge(Hedge::percentile(95.0))
        .shared()
        .build()
        .unwrap();
    for caller in 0..THREADS + TASKS {
        for k in 0..KEYS_PER_CALLER {
            let key = jkey(caller, k);
            c.set(key.as_bytes(), jvalue(caller, k, 0).as_bytes(), O)
                .unwrap();
        }
    }
    let tally = Arc::new(Tally::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let started = Instant::now();
    let jitter = Jitter::start(&ms[1]);
    let until = Instant::now() + Duration::from_secs(3);
    let tasks: Vec<_> = (THREADS..THREADS + TASKS)
        .map(|caller| rt.spawn(async_caller(c.clone(), caller, until, tally.clone())))
        .collect();
    let threads: Vec<_> = (0..THREADS)
        .map(|caller| {
            let (c, t) = (c.clone(), tally.clone());
            thread::spawn(move || blocking_caller(&c, caller, until, &t))
        })
        .collect();
    let mut panics = 0;
    for t in threads {
        panics += usize::from(t.join().is_err());
    }
    rt.block_on(async {
        for t in tasks {
            panics += usize::from(t.await.is_err());
        }
    });
    drop(jitter);
    let fc = c.fleet_counters();
    let reads = tally.reads.load(Ordering::Relaxed);
    println!(
        "replicas jitter: {:?}, reads={reads} writes={} wrong={} failed={} panics={panics}; {fc:?}",
        started.elapsed(),
        tally.writes.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let first = tally.first_failure.lock().unwrap().clone();
    assert_eq!(panics, 0, "a caller panicked");
    assert_eq!(
        tally.wrong.load(Ordering::Relaxed),
        0,
        "a reply reached the wrong caller or an old value was served: {first:?}"
    );
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "failed calls: {first:?}"
    );
    assert!(reads > 100, "too few reads to judge: {reads}");
    assert!(fc.hedges_won <= fc.hedges_sent, "{fc:?}");
    assert!(
        fc.hedges_sent * 5 < reads,
        "hedges {} are not well below the reads {reads} (budget 5% + 10 + stuck copies)",
        fc.hedges_sent
    );
}

// ---------------------------------------------------------------------------------------
// 5. One copy: as before
// ---------------------------------------------------------------------------------------

#[test]
fn one_copy_behaves_as_before() {
    let ms = three();
    let mut view = View::new(&ms);
    let b = support::client_builder()
        .servers(addrs(&ms))
        .distribution(Distribution::Ketama)
        .replicas(1)
        .hedge(Hedge::after(Duration::from_micros(1)));
    let mut plain = b.clone().build().unwrap();
    let ring = plain.continuum().clone();
    let shared = b.shared().build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for n in 0..60 {
        let key = format!("one:{n}");
        let v = format!("v{n}");
        match n % 3 {
            0 => plain.set(key.as_bytes(), v.as_bytes(), O).unwrap(),
            1 => shared.set(key.as_bytes(), v.as_bytes(), O).unwrap(),
            _ => rt
                .block_on(shared.set_async(key.as_bytes(), v.as_bytes(), O))
                .unwrap(),
        }
        let home = ring.pick(key.as_bytes()).unwrap();
        let held = view.held(&key);
        for (i, h) in held.iter().enumerate() {
            assert_eq!(
                h.as_deref(),
                (i == home).then_some(v.as_str()),
                "{key} on {i}"
            );
        }
        assert_eq!(value_of(plain.get(key.as_bytes()), "get"), Some(v.clone()));
        assert_eq!(value_of(shared.get(key.as_bytes()), "get"), Some(v.clone()));
        let got = rt.block_on(shared.get_async(key.as_bytes()));
        assert_eq!(value_of(got, "get_async"), Some(v.clone()));
        assert!(!plain.add(key.as_bytes(), b"x", O).unwrap());
        assert!(shared.touch(key.as_bytes(), 100).unwrap());
        assert!(plain.delete(key.as_bytes()).unwrap());
        let ctr = format!("one:ctr:{n}");
        shared.set(ctr.as_bytes(), b"1", O).unwrap();
        assert_eq!(plain.incr(ctr.as_bytes(), 2).unwrap(), Some(3));
        assert_eq!(shared.decr(ctr.as_bytes(), 1).unwrap(), Some(2));
        let got = rt.block_on(shared.incr_async(ctr.as_bytes(), 1));
        assert_eq!(got.unwrap(), Some(3));
    }
    assert_eq!(plain.fleet_counters(), FleetCounters::default());
    assert_eq!(shared.fleet_counters(), FleetCounters::default());
}

// ---------------------------------------------------------------------------------------
// Repairs: an idle SharedClient, and pipelines
// ---------------------------------------------------------------------------------------

/// A SharedClient's repair thread deletes what a copy missed while it was frozen, with no
/// call made after the copy is back (another client, or another process sharing the
/// servers, would otherwise read the deleted value there).
#[test]
fn idle_shared_client_repairs_a_copy_that_missed_deletes() {
    let ms = three();
    let mut view = View::new(&ms);
    let b = replicated(&ms, Protocol::Text)
        .write_policy(WritePolicy::Any)
        .io_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .server_failure_limit(1)
        .retry_timeout(Duration::from_secs(2));
    let ring = b.clone().build().unwrap().continuum().clone();
    let c = b.shared().build().unwrap();
    let roles = Roles::new(&ring, "idle");
    for key in roles.all() {
        c.set(key.as_bytes(), v1(key).as_bytes(), O).unwrap();
    }
    ms[B].freeze();
    for key in &roles.del {
        assert!(c.delete(key.as_bytes()).unwrap(), "{key}: delete under Any");
    }
    // Calls while B is marked down.
    for key in &roles.away {
        assert_eq!(value_of(c.get(key.as_bytes()), key), Some(v1(key)));
    }
    let before = c.fleet_counters();
    assert!(before.repairs_recorded > 0, "{before:?}");
    ms[B].resume();
    // No call from here on: the repair thread alone (B's retry time is 2 s away at most).
    let resumed = Instant::now();
    // B's copies can be gone before the repairs are: deletes written to B before it froze
    // run when it resumes. The repair thread still works through every repair it recorded.
    support::wait_for(
        "the repair thread to delete B's copies and finish its repairs, no call made",
        || {
            let fc = c.fleet_counters();
            roles.del.iter().all(|k| view.value(B, k).is_none())
                && fc.repairs_done == fc.repairs_recorded
        },
    );
    let after = c.fleet_counters();
    println!(
        "replicas idle repair: {:?} after resume; {after:?}",
        resumed.elapsed()
    );
    assert_eq!(after.repairs_done, after.repairs_recorded, "{after:?}");
}

/// A pipeline's writes that a frozen copy never received (its buffer could not be flushed)
/// are remembered like any missed write: that copy never serves the older value.
#[test]
fn pipeline_writes_a_frozen_copy_missed_are_never_served() {
    let ms = three();
    let mut view = View::new(&ms);
    let mut c = replicated(&ms, Protocol::Binary)
        .io_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ring = c.continuum().clone();
    // About 20 MB for B: more than the loopback socket buffers hold for a stopped reader.
    let keys: Vec<String> = (0..)
        .map(|n| format!("pipe:{n}"))
        .filter(|k| copies(&ring, k).contains(&B))
        .take(2500)
        .collect();
    let pad = "x".repeat(8000);
    let value = |tag: &str, k: &str| format!("{tag}:{k}:{pad}");
    let mut p = c.pipeline();
    for k in &keys {
        p.set(k.as_bytes(), value("v1", k).as_bytes(), O).unwrap();
    }
    p.finish().unwrap();
    ms[B].freeze();
    let mut p = c.pipeline();
    let mut queue_errors = 0;
    for k in &keys {
        queue_errors += usize::from(p.set(k.as_bytes(), value("v2", k).as_bytes(), O).is_err());
    }
    let finished = p.finish();
    ms[B].resume();
    assert!(
        finished.is_err(),
        "B took every write while stopped: the test did not fill its buffers"
    );
    // Every copy that missed a write is repaired (a Client repairs in its calls).
    let probe = keys[0].clone();
    support::wait_for("the pipeline's repairs", || {
        c.get(probe.as_bytes()).unwrap();
        let fc = c.fleet_counters();
        fc.repairs_done >= fc.repairs_recorded
    });
    let (mut stale_reads, mut stale_on_b) = (Vec::new(), Vec::new());
    for k in &keys {
        let old = value("v1", k);
        if value_of(c.get(k.as_bytes()), k).as_deref() == Some(old.as_str()) {
            stale_reads.push(k.clone());
        }
        if view.value(B, k).as_deref() == Some(old.as_str()) {
            stale_on_b.push(k.clone());
        }
    }
    println!(
        "replicas pipeline: queue errors {queue_errors}, finish {:?}; stale reads {}, B still \
         holds the older value of {} keys; {:?}",
        finished.map(|_| ()),
        stale_reads.len(),
        stale_on_b.len(),
        c.fleet_counters()
    );
    assert!(
        stale_reads.is_empty(),
        "reads served the value from before the pipeline: {stale_reads:?}"
    );
    assert!(
        stale_on_b.is_empty(),
        "B holds the older value of {stale_on_b:?} and nothing will repair it"
    );
}

/// Multi-key calls with copies keep every copy at the latest value or nothing (one batch
/// per server, each key settled as its single-key call): a `set_multi` over an older `set`, then a `delete_multi`, leave no
/// copy with an older value, on `Client` and `SharedClient`.
fn multi_key_calls_reach_every_copy(p: Protocol) {
    let ms = three();
    let mut view = View::new(&ms);
    let b = replicated(&ms, p);
    let ring = b.clone().build().unwrap().continuum().clone();
    let mut c = b.clone().build().unwrap();
    let s = b.shared().build().unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("multi-{i}")).collect();
    for (front, tag) in [(0, "client"), (1, "shared")] {
        for k in &keys {
            c.set(k.as_bytes(), b"old", O).unwrap();
        }
        let items: Vec<(String, String)> = keys
            .iter()
            .map(|k| (k.clone(), format!("new-{tag}")))
            .collect();
        let stored = match front {
            0 => c.set_multi(&items, O).unwrap(),
            _ => s.set_multi(&items, O).unwrap(),
        };
        assert_eq!(stored, keys.len(), "{tag}");
        for k in &keys {
            for i in copies(&ring, k) {
                assert_eq!(
                    view.value(i, k).as_deref(),
                    Some(format!("new-{tag}").as_str()),
                    "{tag} {k} on {i}"
                );
            }
        }
        let mut seen = 0;
        match front {
            0 => c
                .get_multi(&keys, |_, item| {
                    assert_eq!(item.value, format!("new-{tag}").as_bytes());
                    seen += 1;
                })
                .unwrap(),
            _ => s
                .get_multi(&keys, |_, item| {
                    assert_eq!(item.value, format!("new-{tag}").as_bytes());
                    seen += 1;
                })
                .unwrap(),
        }
        assert_eq!(seen, keys.len(), "{tag}");
        let deleted = match front {
            0 => c.delete_multi(&keys).unwrap(),
            _ => s.delete_multi(&keys).unwrap(),
        };
        assert_eq!(deleted, keys.len(), "{tag}");
        for k in &keys {
            for i in 0..3 {
                assert_eq!(view.value(i, k), None, "{tag} {k} left on {i}");
            }
        }
    }
}

/// Multi-key calls beside a frozen copy, on every front: a multi-get finds every key (the
/// keys of the frozen server asked of their other copy in a further round), a multi-set
/// stores every key on the copies up and reports the frozen copy's failure, and once the
/// copy is back no read returns the value it missed.
#[test]
fn multi_key_calls_beside_a_frozen_copy() {
    let ms = three();
    let b = replicated(&ms, Protocol::Text)
        .io_timeout(Duration::from_millis(400))
        .connect_timeout(Duration::from_millis(400))
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(300));
    let ring = b.clone().build().unwrap().continuum().clone();
    let keys: Vec<String> = (0..60).map(|i| format!("fm-{i}")).collect();
    let on_b: Vec<&String> = keys
        .iter()
        .filter(|k| copies(&ring, k).contains(&B))
        .collect();
    assert!(!on_b.is_empty());
    let c = Mutex::new(b.clone().build().unwrap());
    let s = b.shared().build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let items = |v: &str| -> Vec<(String, String)> {
        keys.iter().map(|k| (k.clone(), v.to_string())).collect()
    };
    let set_multi = |front: usize, items: &[(String, String)]| match front {
        0 => c.lock().unwrap().set_multi(items, O),
        1 => s.set_multi(items, O),
        _ => rt.block_on(s.set_multi_async(items, O)),
    };
    let get_all = |front: usize| -> (mcstore::Result<()>, Vec<(String, String)>) {
        let mut got = Vec::new();
        let found = |k: &[u8], item: mcstore::client::ItemRef<'_>| {
            got.push((
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(item.value.to_vec()).unwrap(),
            ))
        };
        let r = match front {
            0 => c.lock().unwrap().get_multi(&keys, found),
            1 => s.get_multi(&keys, found),
            _ => rt.block_on(s.get_multi_async(&keys, found)),
        };
        (r, got)
    };
    for (front, tag) in ["Client", "SharedClient", "SharedClient async"]
        .iter()
        .enumerate()
    {
        let v1 = format!("v1-{front}");
        let v2 = format!("v2-{front}");
        // Every copy up again in this client's view (an earlier front's freeze ejected B
        // for a while): the write probes it.
        support::wait_for("a multi-set on every copy", || {
            set_multi(front, &items(&v1)).is_ok_and(|n| n == keys.len())
        });
        ms[B].freeze();
        let (r, got) = get_all(front);
        r.unwrap_or_else(|e| panic!("{tag}: get_multi beside a frozen copy: {e}"));
        assert_eq!(got.len(), keys.len(), "{tag}: every key found");
        assert!(got.iter().all(|(_, v)| *v == v1), "{tag}");
        // The copies up store it; the frozen one fails the keys it holds.
        let r = set_multi(front, &items(&v2));
        assert!(r.is_err(), "{tag}: a copy missed the write: {r:?}");
        ms[B].resume();
        support::wait_for("B answers", || ms[B].answers());
        // B holds v1 for its keys until they are repaired: never read from it meanwhile.
        for round in 0..5 {
            let (r, got) = get_all(front);
            r.unwrap_or_else(|e| panic!("{tag} round {round}: {e}"));
            let old: Vec<_> = got.iter().filter(|(_, v)| *v != v2).collect();
            assert!(
                old.is_empty(),
                "{tag} round {round}: read a value B missed: {old:?}"
            );
            assert_eq!(got.len(), keys.len(), "{tag} round {round}");
        }
    }
    let c = c.into_inner().unwrap();
    assert!(c.fleet_counters().repairs_recorded > 0);
    assert!(s.fleet_counters().repairs_recorded > 0);
    assert!(c.fleet_counters().failovers > 0 && s.fleet_counters().failovers > 0);
}
