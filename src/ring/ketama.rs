//! Continuum points exactly as libmemcached's `update_continuum` builds them
//! (`../shared/reference/ketama-and-hashing.md`, section 3).

use super::hash::{md5_digest, HashFn};
use super::RingServer;

/// Points per server on the non-weighted continuum (`MEMCACHED_POINTS_PER_SERVER`).
const POINTS_PER_SERVER: u32 = 100;
/// Average points per server on the weighted continuum (`MEMCACHED_POINTS_PER_SERVER_KETAMA`).
const POINTS_PER_SERVER_KETAMA: u32 = 160;

/// The string hashed for point `i` of a server: the port is left out when it is 11211
/// (section 3.1).
fn point_string(s: &RingServer, i: u32) -> String {
    if s.port == crate::addr::DEFAULT_PORT {
        format!("{}-{i}", s.host)
    } else {
        format!("{}:{}-{i}", s.host, s.port)
    }
}

/// How many points a server gets on the weighted continuum, computed in single precision as
/// libmemcached does (section 3.2): `floorf(pct * 160 / 4 * n + 1e-10) * 4`. The `1e-10` is a
/// C double literal, so that one addition happens in double precision.
pub(crate) fn weighted_point_count(weight: u32, total: u32, live: usize) -> u32 {
    let pct = weight as f32 / total as f32;
    let x = pct * POINTS_PER_SERVER_KETAMA as f32 / 4.0 * live as f32;
    let x = (f64::from(x) + 0.000_000_000_1) as f32;
    (x.floor() as u32) * 4
}

/// Builds the sorted `(point, server index)` list for the live servers.
pub(crate) fn build(
    servers: &[RingServer],
    live: &[bool],
    weighted: bool,
    key_hash: HashFn,
) -> Vec<(u32, u32)> {
    let live_count = live.iter().filter(|&&l| l).count();
    // A weight of 0 counts as 1, as libmemcached stores it.
    let total: u32 = servers
        .iter()
        .zip(live)
        .filter(|(_, &l)| l)
        .map(|(s, _)| s.weight.max(1))
        .sum();
    let mut points = Vec::new();
    for (idx, s) in servers.iter().enumerate() {
        if !live[idx] {
            continue;
        }
        if weighted {
            let count = weighted_point_count(s.weight.max(1), total, live_count);
            for i in 0..count / 4 {
                let d = md5_digest(point_string(s, i).as_bytes());
                for j in 0..4 {
                    let p =
                        u32::from_le_bytes([d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]]);
                    points.push((p, idx as u32));
                }
            }
        } else {
            for i in 0..POINTS_PER_SERVER {
                points.push((key_hash.hash(point_string(s, i).as_bytes()), idx as u32));
            }
        }
    }
    points.sort_unstable();
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(host: &str, port: u16, weight: u32) -> RingServer {
        RingServer {
            host: host.into(),
            port,
            weight,
        }
    }

    #[test]
    fn point_strings_and_values() {
        let a = srv("10.0.1.1", 11211, 1);
        let c = srv("10.0.1.3", 11212, 1);
        assert_eq!(point_string(&a, 0), "10.0.1.1-0");
        assert_eq!(point_string(&c, 0), "10.0.1.3:11212-0");
        // Section 5.2.
        assert_eq!(HashFn::OneAtATime.hash(b"10.0.1.1-0"), 67800135);
        assert_eq!(HashFn::OneAtATime.hash(b"10.0.1.1-99"), 3877966915);
        assert_eq!(HashFn::OneAtATime.hash(b"10.0.1.3:11212-0"), 2424817824);
        let d = md5_digest(b"10.0.1.1-1");
        let pts: Vec<u32> = d
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(pts, [2656459490, 1132345447, 3306680326, 3022260113]);
    }

    #[test]
    fn weighted_counts() {
        // Section 5.3.
        let counts = |ws: &[u32]| -> Vec<u32> {
            let total = ws.iter().sum();
            ws.iter()
                .map(|&w| weighted_point_count(w, total, ws.len()))
                .collect()
        };
        assert_eq!(counts(&[1, 1, 1]), [160, 160, 160]);
        assert_eq!(counts(&[1, 3, 2]), [80, 240, 160]);
        assert_eq!(
            counts(&[600, 300, 200, 350, 1000, 800, 950, 100]),
            [176, 88, 56, 104, 296, 236, 280, 28]
        );
    }
}
