//! Zones: several pools of servers, each with its own continuum, and a copy of every key in
//! each ([`ClientBuilder::zone`](crate::ClientBuilder::zone)). EVCache's model: writes go to
//! every zone, reads to the preferred (local) zone first and to another zone on failure; a
//! zone that is warming up can be write-only.
//!
//! The client's servers are the zones' servers, zone after zone, so a zone is a range of
//! server indexes. Each zone's continuum is the one libmemcached builds for that zone's
//! server list alone: an application configured with one zone's servers maps keys the same.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fleet::plan::Servers;
use crate::ring::{Continuum, ReplicaPlacement, Replicas};

/// One zone: its name, its servers (a range of the client's) and their continuum.
#[derive(Debug)]
pub(crate) struct Zone {
    pub(crate) name: String,
    pub(crate) servers: Range<usize>,
    ring: Continuum,
    /// Written to, never read from.
    write_only: AtomicBool,
}

/// The zones of a client (shared by the clients of a pool or a shared client).
#[derive(Debug)]
pub(crate) struct Zones {
    zones: Vec<Zone>,
    /// Reads go here first.
    preferred: Option<usize>,
}

impl Zones {
    /// Zones as configured: name, servers, continuum, write-only at first.
    pub(crate) fn new(
        zones: Vec<(String, Range<usize>, Continuum, bool)>,
        preferred: Option<usize>,
    ) -> Zones {
        Zones {
            zones: zones
                .into_iter()
                .map(|(name, servers, ring, wo)| Zone {
                    name,
                    servers,
                    ring,
                    write_only: AtomicBool::new(wo),
                })
                .collect(),
            preferred,
        }
    }

    /// The zones, in configuration order.
    pub(crate) fn list(&self) -> &[Zone] {
        &self.zones
    }

    /// The zone named `name`.
    pub(crate) fn find(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// The zone server `i` belongs to.
    fn zone_of(&self, i: usize) -> Option<&Zone> {
        self.zones.iter().find(|z| z.servers.contains(&i))
    }

    /// Whether server `i` is in a write-only zone.
    pub(crate) fn is_write_only(&self, i: usize) -> bool {
        self.zone_of(i).is_some_and(Zone::is_write_only)
    }

    /// A key's copies: `n` in each zone (its zone's continuum decides, as for a client of
    /// that zone alone), zones in configuration order. The order every client agrees on,
    /// whatever is write-only (a flag of each process, changed at run time): the first copy
    /// is where `cas`, `incr`, `decr` and meta calls go, and the one that decides a
    /// conditional write, so a counter stays where every client looks for it.
    pub(crate) fn copies(&self, hashed: &[u8], n: usize, placement: ReplicaPlacement) -> Replicas {
        let mut out = Replicas::EMPTY;
        for z in &self.zones {
            for &s in z.ring.replicas(hashed, n, placement).as_slice() {
                out.push((z.servers.start + s as usize) as u32);
            }
        }
        out
    }

    /// The copies a read may use, in the order it prefers them: without the write-only
    /// ones; with `prefer`, the preferred zone's first (otherwise the copies' own order,
    /// the one every client agrees on, for a `gets` whose unique a `cas` will use).
    pub(crate) fn readable(&self, copies: &[u32], prefer: bool) -> Servers {
        let mut out = Servers::from_slice(&[]);
        let preferred = self
            .preferred
            .filter(|_| prefer)
            .map(|z| self.zones[z].servers.clone());
        let local = |i: u32| {
            preferred
                .as_ref()
                .is_some_and(|r| r.contains(&(i as usize)))
        };
        for pass in [true, false] {
            for &i in copies {
                if local(i) == pass && !self.is_write_only(i as usize) {
                    out.push(i);
                }
            }
        }
        out
    }
}

impl Zone {
    /// Whether the zone is written to and never read from.
    pub(crate) fn is_write_only(&self) -> bool {
        self.write_only.load(Ordering::Relaxed)
    }

    /// Marks the zone write-only (warming) or readable.
    pub(crate) fn set_write_only(&self, on: bool) {
        self.write_only.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Distribution, HashFn, RingServer};

    fn ring(n: usize, tag: &str) -> Continuum {
        let servers: Vec<RingServer> = (0..n)
            .map(|i| RingServer {
                host: format!("{tag}-{i}"),
                port: 11211,
                weight: 1,
            })
            .collect();
        Continuum::new(Distribution::Ketama, HashFn::OneAtATime, &servers)
    }

    #[test]
    fn a_copy_per_zone_and_reads_prefer_the_local_one() {
        let (a, b) = (ring(3, "a"), ring(2, "b"));
        let zones = Zones::new(
            vec![
                ("a".into(), 0..3, a.clone(), false),
                ("b".into(), 3..5, b.clone(), false),
            ],
            Some(1),
        );
        for k in 0..200 {
            let key = format!("key:{k}");
            let c = zones.copies(key.as_bytes(), 1, ReplicaPlacement::Natural);
            let (ia, ib) = (
                a.pick(key.as_bytes()).unwrap(),
                b.pick(key.as_bytes()).unwrap(),
            );
            assert_eq!(c.as_slice(), &[ia as u32, 3 + ib as u32], "{key}");
            assert_eq!(
                zones.readable(c.as_slice(), true).as_slice(),
                &[3 + ib as u32, ia as u32]
            );
            assert_eq!(zones.readable(c.as_slice(), false).as_slice(), c.as_slice());
        }
        // A write-only zone: its copy keeps its place (where counters are), never read.
        let before = zones.copies(b"k", 1, ReplicaPlacement::Natural);
        zones.find("a").unwrap().set_write_only(true);
        let c = zones.copies(b"k", 1, ReplicaPlacement::Natural);
        assert_eq!(c, before);
        assert_eq!(
            zones.readable(c.as_slice(), true).as_slice(),
            &c.as_slice()[1..]
        );
    }
}
