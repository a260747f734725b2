//! Key distribution: which server a key goes to, as libmemcached decides it.
//!
//! [`HashFn`] is libmemcached's key hash (one-at-a-time by default). A [`Continuum`] maps a
//! hash to a server under one of three [`Distribution`]s. Building a continuum allocates;
//! [`Continuum::pick`] is a hash and a binary search and allocates nothing. Reference:
//! `../shared/reference/ketama-and-hashing.md`.

pub(crate) mod handover;
mod hash;
mod ketama;

use std::sync::Arc;

pub use hash::HashFn;

/// How keys are spread over servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Distribution {
    /// `hash % server_count` (libmemcached's default). Adding or removing a server moves most
    /// keys; an ejected server's keys are not moved (libmemcached only rebuilds consistent
    /// distributions), so they fail fast while it is out.
    #[default]
    Modula,
    /// Consistent hashing (`MEMCACHED_BEHAVIOR_KETAMA` / `DISTRIBUTION_CONSISTENT_KETAMA`): 100
    /// points per server, hashed with the key hash. If any server has a weight above 1, the
    /// continuum is the weighted MD5 one (as libmemcached does), keys keep the key hash.
    Ketama,
    /// `MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED`: MD5-weighted continuum (160 points per server on
    /// average); the key hash defaults to MD5 unless set explicitly.
    KetamaWeighted,
}

impl Distribution {
    /// `modula`, `ketama` or `ketama_weighted`.
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Modula => "modula",
            Distribution::Ketama => "ketama",
            Distribution::KetamaWeighted => "ketama_weighted",
        }
    }

    /// Parses [`name`](Self::name) (`consistent` is accepted for `ketama`).
    pub fn from_name(name: &str) -> Option<Distribution> {
        match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "modula" => Some(Distribution::Modula),
            "ketama" | "consistent" => Some(Distribution::Ketama),
            "ketama_weighted" | "weighted" => Some(Distribution::KetamaWeighted),
            _ => None,
        }
    }
}

/// A server as the continuum sees it: the host string exactly as configured (never a resolved
/// address), the port (0 for a Unix socket, whose host is its path) and the weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RingServer {
    /// Hostname or address as written in the configuration.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Weight (0 counts as 1).
    pub weight: u32,
}

/// The key-to-server map of a client.
///
/// ```
/// use mcstore::ring::{Continuum, Distribution, HashFn, RingServer};
/// let servers: Vec<RingServer> = ["10.0.1.1", "10.0.1.2"]
///     .iter()
///     .map(|h| RingServer { host: h.to_string(), port: 11211, weight: 1 })
///     .chain([RingServer { host: "10.0.1.3".into(), port: 11212, weight: 1 }])
///     .collect();
/// let ring = Continuum::new(Distribution::Ketama, HashFn::OneAtATime, &servers);
/// // The reference's table 5.4, verified against libmemcached itself.
/// assert_eq!(ring.pick(b"foo"), Some(0));
/// assert_eq!(ring.pick(b"hello"), Some(2));
/// assert_eq!(ring.pick(b"user:1000"), Some(1));
/// ```
#[derive(Debug, Clone)]
pub struct Continuum {
    dist: Distribution,
    key_hash: HashFn,
    /// Per server index: with a live list ([`ServerList`](crate::ServerList)), every server
    /// the list ever named, each keeping its index; those it no longer names are not members.
    servers: Vec<RingServer>,
    live: Vec<bool>,
    /// The members' indexes in list order: modula and list placement count in it.
    order: Vec<u32>,
    /// Per server index: its place in `order`, or [`NOT_MEMBER`].
    place: Vec<u32>,
    /// Sorted (point, server index); empty for modula.
    points: Vec<(u32, u32)>,
    /// The same with every server live: where keys go back when ejected servers rejoin.
    home_points: Arc<[(u32, u32)]>,
}

impl Continuum {
    /// A continuum over all `servers` (all live).
    pub fn new(dist: Distribution, key_hash: HashFn, servers: &[RingServer]) -> Continuum {
        let order: Vec<u32> = (0..servers.len() as u32).collect();
        Continuum::with_members(dist, key_hash, servers.to_vec(), order)
    }

    /// A continuum over the servers at the indexes `order` names (in that order, all
    /// live); the other indexes are not members and never picked. Keys map exactly as
    /// [`new`](Self::new) over the members alone maps them, to the members' own indexes.
    pub(crate) fn with_members(
        dist: Distribution,
        key_hash: HashFn,
        servers: Vec<RingServer>,
        order: Vec<u32>,
    ) -> Continuum {
        let mut place = vec![NOT_MEMBER; servers.len()];
        for (k, &i) in order.iter().enumerate() {
            place[i as usize] = k as u32;
        }
        let mut c = Continuum {
            dist,
            key_hash,
            live: vec![true; servers.len()],
            servers,
            order,
            place,
            points: Vec::new(),
            home_points: Arc::from(Vec::new()),
        };
        c.rebuild();
        c.home_points = Arc::from(c.points.clone());
        c
    }

    /// The members' indexes, in list order.
    pub(crate) fn members(&self) -> &[u32] {
        &self.order
    }

    /// Whether index `i` is a member (a server of the list now).
    #[inline]
    pub(crate) fn is_member(&self, i: usize) -> bool {
        self.place.get(i).is_some_and(|&p| p != NOT_MEMBER)
    }

    /// The key hash in use.
    pub fn key_hash(&self) -> HashFn {
        self.key_hash
    }

    /// The distribution in use.
    pub fn distribution(&self) -> Distribution {
        self.dist
    }

    /// The servers by index (indexes returned by [`pick`](Self::pick)): in configuration
    /// order, with a live list followed by the servers it added since.
    pub fn servers(&self) -> &[RingServer] {
        &self.servers
    }

    /// True when the continuum uses MD5-weighted points.
    pub fn is_weighted(&self) -> bool {
        match self.dist {
            Distribution::Modula => false,
            Distribution::KetamaWeighted => true,
            Distribution::Ketama => self
                .order
                .iter()
                .any(|&i| self.servers[i as usize].weight > 1),
        }
    }

    /// Marks server `i` as in or out of the continuum and rebuilds it if that changed. Only
    /// consistent distributions move keys away from a server that is out; modula keeps
    /// sending them to it (callers fail them fast), as libmemcached does.
    pub fn set_live(&mut self, i: usize, live: bool) {
        if self.live[i] != live {
            self.live[i] = live;
            self.rebuild();
        }
    }

    /// True if server `i` is in the continuum.
    pub fn is_live(&self, i: usize) -> bool {
        self.live[i]
    }

    fn rebuild(&mut self) {
        self.points = match self.dist {
            Distribution::Modula => Vec::new(),
            _ => {
                let on: Vec<bool> = (self.live.iter().zip(&self.place))
                    .map(|(&l, &p)| l && p != NOT_MEMBER)
                    .collect();
                ketama::build(&self.servers, &on, self.is_weighted(), self.key_hash)
            }
        };
    }

    /// The server index for `key`, `None` when no server is live. Allocates nothing.
    pub fn pick(&self, key: &[u8]) -> Option<usize> {
        match self.order.len() {
            0 => None,
            // libmemcached does not hash at all with one server.
            1 => Some(self.order[0] as usize),
            n => match self.dist {
                Distribution::Modula => {
                    Some(self.order[(self.key_hash.hash(key) % n as u32) as usize] as usize)
                }
                _ => self.pick_hash(self.key_hash.hash(key)),
            },
        }
    }

    /// The server `key` belongs to with every server live: where it goes back to when the
    /// servers that are out of the continuum rejoin. The same as [`pick`](Self::pick) while
    /// all are live.
    pub fn pick_home(&self, key: &[u8]) -> Option<usize> {
        match (self.order.len(), self.dist) {
            (0, _) => None,
            (1, _) => Some(self.order[0] as usize),
            (_, Distribution::Modula) => self.pick(key),
            _ => Some(on_points(&self.home_points, self.key_hash.hash(key))),
        }
    }

    /// The server owning hash `h` on the continuum: the first point >= h, wrapping around.
    pub fn pick_hash(&self, h: u32) -> Option<usize> {
        if self.points.is_empty() {
            return match self.dist {
                Distribution::Modula if !self.order.is_empty() => {
                    Some(self.order[(h % self.order.len() as u32) as usize] as usize)
                }
                _ => None,
            };
        }
        Some(on_points(&self.points, h))
    }
}

/// `Continuum::place` of an index that is not a member.
const NOT_MEMBER: u32 = u32::MAX;

/// The most copies of a key a client keeps ([`ClientBuilder::replicas`](crate::ClientBuilder::replicas)).
pub const MAX_REPLICAS: usize = 4;

/// Where a key's further copies live, after its own server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaPlacement {
    /// The distribution's own choice: with a consistent distribution, the next distinct
    /// servers on the continuum after the key's point (removing a server spreads its keys'
    /// copies over many servers); with modula, the next servers in the list.
    #[default]
    Natural,
    /// The next servers in the configured list, wrapping around, whatever the distribution:
    /// libmemcached's placement for `MEMCACHED_BEHAVIOR_NUMBER_OF_REPLICAS` (checked against
    /// it), for a cluster shared with libmemcached clients that keep replicas.
    List,
}

/// A key's servers, its own first: at most [`MAX_REPLICAS`], all distinct. Allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    servers: [u32; MAX_REPLICAS],
    len: u8,
}

impl Replicas {
    /// The servers' indexes, the key's own server first.
    pub fn as_slice(&self) -> &[u32] {
        &self.servers[..usize::from(self.len)]
    }

    /// No server.
    pub(crate) const EMPTY: Replicas = Replicas {
        servers: [0; MAX_REPLICAS],
        len: 0,
    };

    /// Adds server `i` unless it is there already (or the list is full).
    pub(crate) fn push(&mut self, i: u32) {
        if !self.as_slice().contains(&i) && usize::from(self.len) < MAX_REPLICAS {
            self.servers[usize::from(self.len)] = i;
            self.len += 1;
        }
    }
}

impl Continuum {
    /// `key`'s `n` servers with every server live (capped at the server count and at
    /// [`MAX_REPLICAS`]): its own server ([`pick_home`](Self::pick_home)) first, then its
    /// copies' as `placement` says. Ejections never change a key's replicas; callers skip
    /// the servers that are down. Empty without servers.
    pub fn replicas(&self, key: &[u8], n: usize, placement: ReplicaPlacement) -> Replicas {
        let mut r = Replicas::EMPTY;
        let count = self.order.len();
        let n = n.clamp(1, MAX_REPLICAS).min(count);
        let Some(home) = self.pick_home(key) else {
            return r;
        };
        r.push(home as u32);
        let by_list =
            placement == ReplicaPlacement::List || self.dist == Distribution::Modula || count == 1;
        if by_list {
            let at = self.place[home] as usize;
            for k in 1..n {
                r.push(self.order[(at + k) % count]);
            }
            return r;
        }
        let points = &self.home_points;
        let h = self.key_hash.hash(key);
        let start = points.partition_point(|p| p.0 < h);
        for k in 0..points.len() {
            if usize::from(r.len) == n {
                break;
            }
            r.push(points[(start + k) % points.len()].1);
        }
        r
    }
}

impl Continuum {
    /// The next distinct server after hash `h`'s own on the continuum with every server
    /// live: where `h` goes if its own server leaves the list. `None` with one server or
    /// with modula.
    pub(crate) fn next_home_hash(&self, h: u32) -> Option<usize> {
        let points = &self.home_points;
        if points.is_empty() || self.order.len() < 2 {
            return None;
        }
        let start = points.partition_point(|p| p.0 < h);
        let own = points[start % points.len()].1;
        (1..points.len())
            .map(|k| points[(start + k) % points.len()].1)
            .find(|&s| s != own)
            .map(|s| s as usize)
    }
}

/// The server of the first point >= `h` of a non-empty continuum, wrapping around.
fn on_points(points: &[(u32, u32)], h: u32) -> usize {
    let i = points.partition_point(|p| p.0 < h);
    let i = if i == points.len() { 0 } else { i };
    points[i].1 as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool_a() -> Vec<RingServer> {
        vec![
            RingServer {
                host: "10.0.1.1".into(),
                port: 11211,
                weight: 1,
            },
            RingServer {
                host: "10.0.1.2".into(),
                port: 11211,
                weight: 1,
            },
            RingServer {
                host: "10.0.1.3".into(),
                port: 11212,
                weight: 1,
            },
        ]
    }

    const KEYS: [&str; 6] = [
        "foo",
        "bar",
        "hello",
        "user:1000",
        "session:abc",
        "VDEAAAAA",
    ];

    fn picks(ring: &Continuum) -> Vec<usize> {
        KEYS.iter()
            .map(|k| ring.pick(k.as_bytes()).unwrap())
            .collect()
    }

    /// Section 5.4: placements produced by libmemcached itself.
    #[test]
    fn reference_placements() {
        let a = pool_a();
        let b: Vec<RingServer> = [600, 300, 200]
            .iter()
            .enumerate()
            .map(|(i, &w)| RingServer {
                host: format!("10.0.1.{}", i + 1),
                port: 11211,
                weight: w,
            })
            .collect();
        use Distribution::{Ketama, KetamaWeighted, Modula};
        use HashFn::{Md5, OneAtATime};
        let cases = [
            (Modula, OneAtATime, &a, [0, 1, 0, 2, 0, 2]),
            (Ketama, OneAtATime, &a, [0, 0, 2, 1, 2, 2]),
            (Ketama, Md5, &a, [1, 1, 2, 1, 1, 1]),
            (KetamaWeighted, Md5, &a, [0, 2, 1, 1, 1, 1]),
            (KetamaWeighted, Md5, &b, [0, 0, 1, 1, 0, 2]),
        ];
        for (dist, hash, servers, want) in cases {
            let ring = Continuum::new(dist, hash, servers);
            assert_eq!(
                picks(&ring),
                want,
                "{dist:?} {hash:?} on {} servers",
                servers.len()
            );
        }
    }

    /// A server out of the continuum moves its keys (`pick`) but not their home.
    #[test]
    fn home_ignores_servers_out_of_the_continuum() {
        let mut ring = Continuum::new(Distribution::Ketama, HashFn::OneAtATime, &pool_a());
        let keys: Vec<String> = (0..500).map(|i| format!("key:{i}")).collect();
        let before: Vec<_> = keys.iter().map(|k| ring.pick(k.as_bytes())).collect();
        ring.set_live(1, false);
        let mut moved = 0;
        for (k, b) in keys.iter().zip(&before) {
            assert_eq!(ring.pick_home(k.as_bytes()), *b);
            if *b == Some(1) {
                assert_ne!(ring.pick(k.as_bytes()), Some(1));
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn one_server_is_always_zero_and_none_is_none() {
        let one = &pool_a()[..1];
        for d in [
            Distribution::Modula,
            Distribution::Ketama,
            Distribution::KetamaWeighted,
        ] {
            assert_eq!(
                Continuum::new(d, HashFn::Md5, one).pick(b"anything"),
                Some(0)
            );
            assert_eq!(Continuum::new(d, HashFn::Md5, &[]).pick(b"anything"), None);
        }
    }

    #[test]
    fn ejecting_moves_only_that_servers_keys_under_ketama() {
        let mut ring = Continuum::new(Distribution::Ketama, HashFn::OneAtATime, &pool_a());
        let before: Vec<usize> = (0..2000)
            .map(|i| ring.pick(format!("k{i}").as_bytes()).unwrap())
            .collect();
        ring.set_live(1, false);
        for (i, &b) in before.iter().enumerate() {
            let now = ring.pick(format!("k{i}").as_bytes()).unwrap();
            assert_ne!(now, 1);
            if b != 1 {
                assert_eq!(now, b, "a key of a live server moved");
            }
        }
        ring.set_live(1, true);
        let again: Vec<usize> = (0..2000)
            .map(|i| ring.pick(format!("k{i}").as_bytes()).unwrap())
            .collect();
        assert_eq!(again, before);
    }

    fn servers(n: usize) -> Vec<RingServer> {
        (0..n)
            .map(|i| RingServer {
                host: format!("cache-{i}.example"),
                port: 11211 + (i % 2) as u16,
                weight: 1,
            })
            .collect()
    }

    fn moved_fraction(dist: Distribution, n: usize, remove: bool) -> f64 {
        let all = servers(n + 1);
        let (small, big) = (
            Continuum::new(dist, HashFn::OneAtATime, &all[..n]),
            Continuum::new(dist, HashFn::OneAtATime, &all),
        );
        let (from, to) = if remove {
            (&big, &small)
        } else {
            (&small, &big)
        };
        let keys = 20_000;
        let moved = (0..keys)
            .filter(|i| {
                let k = format!("key-{i}");
                from.pick(k.as_bytes()) != to.pick(k.as_bytes())
            })
            .count();
        moved as f64 / keys as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Adding or removing one of N servers moves about 1/N of the keys under ketama, and
        /// most of them under modula.
        #[test]
        fn consistent_hashing_moves_about_one_nth(n in 2usize..12, remove in any::<bool>()) {
            let expect = 1.0 / (n + 1) as f64;
            let k = moved_fraction(Distribution::Ketama, n, remove);
            prop_assert!(k > expect * 0.4 && k < expect * 1.8, "ketama moved {k:.3}, expected about {expect:.3}");
            let w = moved_fraction(Distribution::KetamaWeighted, n, remove);
            prop_assert!(w > expect * 0.4 && w < expect * 1.8, "weighted moved {w:.3}, expected about {expect:.3}");
            let m = moved_fraction(Distribution::Modula, n, remove);
            prop_assert!(m > 0.5, "modula moved only {m:.3}");
        }
    }

    /// A live list's continuum (servers at lasting indexes, some no longer members, in a
    /// new order) maps every key to the same server as a fresh continuum over the members.
    #[test]
    fn members_map_as_a_fresh_list() {
        let slot = |i: u32, w: u32| RingServer {
            host: format!("10.0.2.{i}"),
            port: 11211,
            weight: w,
        };
        let slots: Vec<RingServer> = (0..8).map(|i| slot(i, 1 + i % 3)).collect();
        let order = [5u32, 1, 7, 2, 6];
        let fresh: Vec<RingServer> = order.iter().map(|&i| slots[i as usize].clone()).collect();
        for dist in [
            Distribution::Modula,
            Distribution::Ketama,
            Distribution::KetamaWeighted,
        ] {
            let live =
                Continuum::with_members(dist, HashFn::OneAtATime, slots.clone(), order.to_vec());
            let plain = Continuum::new(dist, HashFn::OneAtATime, &fresh);
            for k in 0..2000 {
                let key = format!("key:{k}");
                let want = order[plain.pick(key.as_bytes()).unwrap()] as usize;
                assert_eq!(live.pick(key.as_bytes()), Some(want), "{dist:?} {key}");
                assert_eq!(live.pick_home(key.as_bytes()), Some(want));
                for placement in [ReplicaPlacement::Natural, ReplicaPlacement::List] {
                    let a = live.replicas(key.as_bytes(), 3, placement);
                    let b = plain.replicas(key.as_bytes(), 3, placement);
                    let b: Vec<u32> = b.as_slice().iter().map(|&i| order[i as usize]).collect();
                    assert_eq!(a.as_slice(), b, "{dist:?} {placement:?} {key}");
                }
            }
            assert!(!live.is_member(0) && live.is_member(5) && !live.is_member(99));
        }
    }
}
