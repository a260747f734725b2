//! `mcstore map`: which server each key goes to, in a form other clients' tools can be
//! compared with.

use std::io::{self, BufRead, Write};

use mcstore::ring::Continuum;

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
    for line in input.split(b'\n') {
        let mut key = line?;
        if key.last() == Some(&b'\r') {
            key.pop();
        }
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
