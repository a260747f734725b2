//! Where a key's older entries may be, after a live list moved it (#28).
//!
//! When a list change moves a range of the circle from server A to server B, A keeps the
//! entries it had: a write now lands on B, and if the range ever comes back to A (B leaves,
//! weights change back), A would serve what that write replaced. So after a change, a write
//! also deletes its key on every server that owned the key's range in an earlier list and
//! may still hold an entry for it: the range's *previous owners*.
//!
//! This map keeps them per range of the circle, merged over every change: a change adds the
//! range's owner before it (if it lost the range) and drops the owner after it (the range is
//! its own again: writes land there) and servers that left the list (a server comes back to
//! a list empty: see [`ServerList`](crate::ServerList)). It is empty until a change moves a
//! key, so the writes of a list that never changed pay one length test.
//!
//! Consistent distributions only: a modula list does not change (nearly every key would move).

use super::{on_points, Continuum, NOT_MEMBER};

/// Per range of the hash circle, the previous owners of its keys (server indexes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Handover {
    /// Sorted by end point: an entry covers the hashes after the previous entry's end up to
    /// its own (the first entry also covers those after the last: the circle wraps).
    /// Empty when no range has a previous owner.
    ranges: Vec<(u32, Box<[u32]>)>,
}

impl Handover {
    /// Whether no key has a previous owner (the common case: one length test).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The previous owners of hash `h`.
    pub(crate) fn owners(&self, h: u32) -> &[u32] {
        if self.ranges.is_empty() {
            return &[];
        }
        let i = self.ranges.partition_point(|r| r.0 < h);
        let i = if i == self.ranges.len() { 0 } else { i };
        &self.ranges[i].1
    }

    /// The map after the list changed from `old` to `new` (consistent distributions, both
    /// over the same server indexes, `new` possibly with more).
    pub(crate) fn after(&self, old: &Continuum, new: &Continuum) -> Handover {
        let (op, np) = (&old.home_points, &new.home_points);
        if op.is_empty() || np.is_empty() {
            return Handover::default();
        }
        // Every range edge of the three maps: between two edges, each map names one set.
        let mut edges: Vec<u32> = (self.ranges.iter().map(|r| r.0))
            .chain(op.iter().map(|p| p.0))
            .chain(np.iter().map(|p| p.0))
            .collect();
        edges.sort_unstable();
        edges.dedup();
        let member = |i: u32| new.place.get(i as usize).is_some_and(|&p| p != NOT_MEMBER);
        let mut ranges: Vec<(u32, Box<[u32]>)> = Vec::new();
        let mut set: Vec<u32> = Vec::new();
        for &e in &edges {
            let (was, now) = (on_points(op, e) as u32, on_points(np, e) as u32);
            set.clear();
            set.extend(self.owners(e).iter().copied());
            if was != now && !set.contains(&was) {
                set.push(was);
            }
            set.retain(|&s| s != now && member(s));
            set.sort_unstable();
            // An edge whose range has the same owners as the next one's is not needed.
            match ranges.last_mut() {
                Some(last) if *last.1 == *set => last.0 = e,
                _ => ranges.push((e, set.as_slice().into())),
            }
        }
        // The first range also covers the wrap: merged with the last if they agree.
        if ranges.len() > 1 && ranges[0].1 == ranges[ranges.len() - 1].1 {
            ranges.pop();
            // The first range's end stays; the last's hashes now wrap to it.
        }
        if ranges.iter().all(|r| r.1.is_empty()) {
            return Handover::default();
        }
        Handover { ranges }
    }
}

/// The servers that take keys in the change from `old` to `new` that were not next in line
/// for them in `old` (consistent distributions, both over the same server indexes): new
/// servers, and servers that take a range its owner and its next server both lost (several
/// servers left at once, or weights changed). A storage that deletes each written key on
/// its own server and the next one ([`Continuum::next_home_hash`]) knows every other server
/// may hold older entries of those keys (from an earlier list, or from before it left).
pub(crate) fn takers(old: &Continuum, new: &Continuum) -> Vec<u32> {
    let (op, np) = (&old.home_points, &new.home_points);
    if np.is_empty() {
        return Vec::new();
    }
    let mut takers: Vec<u32> = Vec::new();
    if op.is_empty() {
        takers.extend(new.members());
        return takers;
    }
    // Between two edges of either map, a hash's owner and next server are the same.
    let mut edges: Vec<u32> = op.iter().chain(np.iter()).map(|p| p.0).collect();
    edges.sort_unstable();
    edges.dedup();
    for &e in &edges {
        let now = on_points(np, e) as u32;
        let was = on_points(op, e) as u32;
        if now == was || takers.contains(&now) {
            continue;
        }
        if old.next_home_hash(e) != Some(now as usize) {
            takers.push(now);
        }
    }
    takers.sort_unstable();
    takers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Distribution, HashFn, RingServer};

    fn slots(n: usize) -> Vec<RingServer> {
        (0..n)
            .map(|i| RingServer {
                host: format!("10.0.3.{i}"),
                port: 11211,
                weight: 1,
            })
            .collect()
    }

    fn ring(order: &[u32], n: usize) -> Continuum {
        Continuum::with_members(
            Distribution::Ketama,
            HashFn::OneAtATime,
            slots(n),
            order.to_vec(),
        )
    }

    /// For every key: its previous owners are exactly the servers that owned it in an
    /// earlier list, are members now, and do not own it now (checked by brute force over
    /// the history).
    #[test]
    fn previous_owners_follow_the_history() {
        let history: [&[u32]; 7] = [
            &[0, 1, 2],
            &[0, 1, 2, 3],    // 3 joins: takes ranges from 0, 1, 2
            &[0, 1, 2, 3, 4], // 4 joins
            &[0, 1, 2, 4],    // 3 leaves: its ranges go back (3 is not a member)
            &[0, 1, 2],       // 4 leaves
            &[1, 2, 3],       // 0 leaves, 3 comes back (empty)
            &[1, 2, 3, 0],    // 0 comes back
        ];
        let rings: Vec<Continuum> = history.iter().map(|o| ring(o, 5)).collect();
        let mut map = Handover::default();
        for g in 1..rings.len() {
            map = map.after(&rings[g - 1], &rings[g]);
            let now = &rings[g];
            for k in 0..3000 {
                let key = format!("k{k}");
                let h = HashFn::OneAtATime.hash(key.as_bytes());
                let owner = now.pick_hash(h).unwrap() as u32;
                // Brute force: owners since the key's range was last given to a server
                // that then stayed a member...
                let mut want: Vec<u32> = Vec::new();
                for (a, r) in rings[..g].iter().enumerate() {
                    let o = r.pick_hash(h).unwrap() as u32;
                    // A server that left after `a` and came back is empty again.
                    let left_since = rings[a + 1..=g].iter().any(|x| !x.is_member(o as usize));
                    if o != owner && !left_since && !want.contains(&o) {
                        want.push(o);
                    }
                }
                want.sort_unstable();
                let mut got = map.owners(h).to_vec();
                got.sort_unstable();
                assert_eq!(got, want, "generation {g}, {key}");
            }
        }
    }

    /// One server joining or leaving gives its keys only to servers next in line for them
    /// (none is a taker but the new server); several leaving at once, or a new weight, may.
    #[test]
    fn takers_are_the_servers_not_next_in_line() {
        let r = |o: &[u32]| ring(o, 6);
        assert_eq!(takers(&r(&[0, 1, 2]), &r(&[0, 1, 2, 3])), [3]);
        assert!(takers(&r(&[0, 1, 2, 3]), &r(&[0, 1, 2])).is_empty());
        assert!(takers(&r(&[0, 1, 2, 3]), &r(&[0, 2, 3])).is_empty());
        assert_eq!(takers(&r(&[0, 1, 2]), &r(&[1, 2, 4, 5])), [4, 5]);
        // Two leaving at once: some range's owner and next server both go.
        assert!(!takers(&r(&[0, 1, 2, 3, 4, 5]), &r(&[0, 1, 2, 3])).is_empty());
        // Brute force: a taker is exactly a server that owns some key now whose owner
        // before was another server and whose next server before was not it.
        let history: [&[u32]; 5] = [&[0, 1, 2], &[0, 1, 2, 3, 4], &[0, 3], &[3, 5, 1], &[1]];
        for g in 1..history.len() {
            let (old, new) = (r(history[g - 1]), r(history[g]));
            let mut want: Vec<u32> = Vec::new();
            for k in 0..20_000 {
                let h = HashFn::OneAtATime.hash(format!("k{k}").as_bytes());
                let now = new.pick_hash(h).unwrap();
                if old.pick_hash(h).unwrap() != now && old.next_home_hash(h) != Some(now) {
                    want.push(now as u32);
                }
            }
            want.sort_unstable();
            want.dedup();
            let got = takers(&old, &new);
            // Every taker found by sampling is found; a taker whose range no sample hit is
            // still a taker (the edges are exact).
            assert!(
                want.iter().all(|w| got.contains(w)),
                "{g}: {got:?} {want:?}"
            );
        }
    }

    #[test]
    fn no_change_no_owners() {
        let r = ring(&[0, 1, 2], 3);
        assert!(Handover::default().after(&r, &r.clone()).is_empty());
    }
}
