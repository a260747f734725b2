//! `mcstore ring`: which server each key goes to, in a form other clients' tools can be
//! compared with; and how many keys a change of server list moves.

use std::fmt;
use std::io::{self, BufRead, Write};

use mcstore::ring::Continuum;
use mcstore::Client;

/// The keys of `input`, one per line (raw bytes, `\n` or `\r\n` ended).
pub(crate) fn lines(input: impl BufRead) -> impl Iterator<Item = io::Result<Vec<u8>>> {
    input.split(b'\n').map(|line| {
        let mut key = line?;
        if key.last() == Some(&b'\r') {
            key.pop();
        }
        Ok(key)
    })
}

/// What a change of server list does to a set of keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Moved {
    pub(crate) keys: u64,
    pub(crate) moved: u64,
    /// The share one added or removed server should move with an ideal distribution: 1/N of
    /// the larger list.
    pub(crate) ideal: f64,
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fraction = if self.keys == 0 {
            0.0
        } else {
            self.moved as f64 / self.keys as f64
        };
        write!(
            f,
            "keys={} moved={} fraction={fraction:.4} ideal={:.4} ratio={:.2}",
            self.keys,
            self.moved,
            self.ideal,
            fraction / self.ideal
        )
    }
}

/// Counts the keys that `old` and `new` place on different servers (compared by their
/// configured names, so a server kept in both lists is the same server wherever it stands).
pub(crate) fn compare(
    old: &Client,
    new: &Client,
    keys: impl Iterator<Item = io::Result<Vec<u8>>>,
) -> io::Result<Moved> {
    let label = |c: &'_ Client, key: &[u8]| {
        c.continuum()
            .pick(key)
            .map(|i| c.servers()[i].clone())
            .unwrap_or_default()
    };
    let mut m = Moved {
        keys: 0,
        moved: 0,
        ideal: 1.0 / old.servers().len().max(new.servers().len()).max(1) as f64,
    };
    for key in keys {
        let key = key?;
        m.keys += 1;
        m.moved += u64::from(label(old, &key) != label(new, &key));
    }
    Ok(m)
}

/// Reads keys (one per line, raw bytes, `\n` or `\r\n` ended) and writes `key<TAB>server` for
/// each, where `server` is `labels[pick(key)]`: the mapping in a form other clients' tools can
/// be compared with. Returns the number of keys mapped.
pub(crate) fn write_mapping(
    ring: &Continuum,
    labels: &[String],
    input: impl BufRead,
    mut out: impl Write,
) -> io::Result<usize> {
    let mut n = 0;
    for key in lines(input) {
        let key = key?;
        let server = ring.pick(&key).map(|i| labels[i].as_str()).unwrap_or("-");
        out.write_all(&key)?;
        out.write_all(b"\t")?;
        out.write_all(server.as_bytes())?;
        out.write_all(b"\n")?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcstore::ring::{Distribution, HashFn, RingServer};

    fn pool_a() -> Vec<RingServer> {
        [
            ("10.0.1.1", 11211),
            ("10.0.1.2", 11211),
            ("10.0.1.3", 11212),
        ]
        .map(|(host, port)| RingServer {
            host: host.into(),
            port,
            weight: 1,
        })
        .to_vec()
    }

    #[test]
    fn mapping_output() {
        let ring = Continuum::new(Distribution::Modula, HashFn::OneAtATime, &pool_a());
        let labels: Vec<String> = ["a:1", "b:1", "c:1"].map(String::from).to_vec();
        let mut out = Vec::new();
        let n = write_mapping(&ring, &labels, &b"foo\r\nbar\n\xff\n"[..], &mut out).unwrap();
        assert_eq!(n, 3);
        let want_last = format!("\u{fffd}\t{}", labels[ring.pick(b"\xff").unwrap()]);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("foo\ta:1\nbar\tb:1\n"), "{text}");
        assert!(text.trim_end().ends_with(&want_last), "{text}");
    }
}
