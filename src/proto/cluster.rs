//! The cluster configuration reply of a discovery endpoint (AWS ElastiCache and Google
//! Memorystore for Memcached): the answer to `config get cluster` (or, on engines before
//! 1.4.14, `get AmazonElastiCache:cluster`). Pure: bytes in, a borrowed view out.
//!
//! ```text
//! CONFIG cluster 0 <length>\r\n        (or VALUE AmazonElastiCache:cluster 0 <length>)
//! <version>\n
//! <host>|<ip>|<port> <host>|<ip>|<port> ...\n
//! \r\n
//! END\r\n
//! ```
//!
//! The block of `length` bytes holds the version line and the node list, each ended by a
//! bare `\n`. The version grows whenever a node is added or removed. A node's ip may be
//! empty (the host name is then the address).

use super::{Limits, ParseError, Status};

/// The request that asks an endpoint for its cluster configuration.
pub const CONFIG_GET_CLUSTER: &[u8] = b"config get cluster\r\n";

/// The longest header line (`CONFIG cluster 0 <digits>` or the `VALUE` form).
const MAX_HEADER: usize = 96;

/// One node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterNode<'a> {
    /// Its host name.
    pub host: &'a str,
    /// Its IP address; may be empty.
    pub ip: &'a str,
    /// Its port.
    pub port: u16,
}

impl ClusterNode<'_> {
    /// The address to connect to, `ip:port` (or `host:port` when the ip is empty; an IPv6
    /// address in brackets).
    pub fn address(&self) -> String {
        let at = if self.ip.is_empty() {
            self.host
        } else {
            self.ip
        };
        if at.contains(':') {
            format!("[{at}]:{}", self.port)
        } else {
            format!("{at}:{}", self.port)
        }
    }
}

/// A parsed cluster configuration, borrowing the node list from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterConfig<'a> {
    /// The configuration's version.
    pub version: u64,
    list: &'a str,
}

impl<'a> ClusterConfig<'a> {
    /// The nodes, in the endpoint's order (validated when parsed).
    pub fn nodes(&self) -> impl Iterator<Item = ClusterNode<'a>> + 'a {
        self.list
            .split(' ')
            .filter(|e| !e.is_empty())
            .map(|e| node(e).expect("validated by parse"))
    }
}

/// What an endpoint answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterReply<'a> {
    /// Its configuration.
    Config(ClusterConfig<'a>),
    /// An error line (`ERROR`, `CLIENT_ERROR ..`, `SERVER_ERROR ..`): the server is not a
    /// discovery endpoint (plain memcached answers `ERROR`), or refused.
    Refused(&'a [u8]),
}

/// Parses one reply to [`CONFIG_GET_CLUSTER`]: `Partial` until it is whole, then the bytes
/// it took and what it says. The claimed length is checked against `limits` before
/// anything else; every node is checked (`host|ip|port`, a host without spaces, a port of
/// 1..=65535), and a configuration without nodes is an error.
pub fn parse_cluster<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Status<(usize, ClusterReply<'a>)>, ParseError> {
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        return match buf.len() > MAX_HEADER {
            true => Err(ParseError::LineTooLong(MAX_HEADER)),
            false => Ok(Status::Partial),
        };
    };
    if eol == 0 || buf[eol - 1] != b'\r' {
        return Err(ParseError::BadLineEnding);
    }
    let line = &buf[..eol - 1];
    if line == b"ERROR" || line.starts_with(b"CLIENT_ERROR") || line.starts_with(b"SERVER_ERROR") {
        return Ok(Status::Complete((eol + 1, ClusterReply::Refused(line))));
    }
    if line.len() > MAX_HEADER {
        return Err(ParseError::LineTooLong(MAX_HEADER));
    }
    let mut words = line.split(|&b| b == b' ');
    let len = match (words.next(), words.next(), words.next(), words.next()) {
        (Some(b"CONFIG"), Some(b"cluster"), Some(_flags), Some(len))
        | (Some(b"VALUE"), Some(b"AmazonElastiCache:cluster"), Some(_flags), Some(len)) => len,
        (Some(b"CONFIG" | b"VALUE"), ..) => return Err(ParseError::BadFormat),
        _ => return Err(ParseError::UnknownReply),
    };
    if words.next().is_some() {
        return Err(ParseError::BadFormat);
    }
    let len = number(len)?;
    if len > limits.max_value as u64 {
        return Err(ParseError::ValueTooLarge(len));
    }
    let len = len as usize;
    let start = eol + 1;
    const TAIL: &[u8] = b"\r\nEND\r\n";
    let end = start + len;
    if buf.len() < end + TAIL.len() {
        // What has arrived must still fit the frame.
        let have = &buf[start.min(buf.len())..];
        if have.len() > len && !TAIL.starts_with(&have[len..]) {
            return Err(ParseError::BadDataTerminator);
        }
        return Ok(Status::Partial);
    }
    if &buf[end..end + TAIL.len()] != TAIL {
        return Err(ParseError::BadDataTerminator);
    }
    let block = std::str::from_utf8(&buf[start..end]).map_err(|_| ParseError::BadFormat)?;
    let (version, rest) = block.split_once('\n').ok_or(ParseError::BadFormat)?;
    let version = number(version.as_bytes())?;
    // The node list ends with a `\n` (tolerated missing), and nothing after it.
    let list = rest.strip_suffix('\n').unwrap_or(rest);
    if list.contains('\n') || list.contains('\r') {
        return Err(ParseError::BadFormat);
    }
    let mut any = false;
    for e in list.split(' ').filter(|e| !e.is_empty()) {
        node(e)?;
        any = true;
    }
    if !any {
        return Err(ParseError::BadFormat);
    }
    let config = ClusterConfig { version, list };
    Ok(Status::Complete((
        end + TAIL.len(),
        ClusterReply::Config(config),
    )))
}

fn node(entry: &str) -> Result<ClusterNode<'_>, ParseError> {
    let mut parts = entry.split('|');
    let (Some(host), Some(ip), Some(port), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadFormat);
    };
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if host.is_empty() || !printable(host) || !printable(ip) {
        return Err(ParseError::BadFormat);
    }
    let port = number(port.as_bytes())?;
    let port = u16::try_from(port)
        .ok()
        .filter(|&p| p > 0)
        .ok_or(ParseError::BadNumber)?;
    Ok(ClusterNode { host, ip, port })
}

/// A decimal of 1 to 19 digits.
fn number(digits: &[u8]) -> Result<u64, ParseError> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadNumber);
    }
    Ok(digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(version: u64, list: &str) -> Vec<u8> {
        let block = format!("{version}\n{list}\n");
        format!("CONFIG cluster 0 {}\r\n{block}\r\nEND\r\n", block.len()).into_bytes()
    }

    fn config(buf: &[u8]) -> (u64, Vec<String>) {
        match parse_cluster(buf, &Limits::default()).unwrap() {
            Status::Complete((n, ClusterReply::Config(c))) => {
                assert_eq!(n, buf.len());
                (c.version, c.nodes().map(|n| n.address()).collect())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_published_example_parses() {
        // The shape of AWS's documentation example, three nodes.
        let r = reply(
            12,
            "myCluster.pc4ldq.0001.use1.cache.amazonaws.com|10.82.235.120|11211 \
             myCluster.pc4ldq.0002.use1.cache.amazonaws.com|10.80.249.27|11211 \
             myCluster.pc4ldq.0003.use1.cache.amazonaws.com||11212",
        );
        let (v, nodes) = config(&r);
        assert_eq!(v, 12);
        assert_eq!(
            nodes,
            [
                "10.82.235.120:11211",
                "10.80.249.27:11211",
                "myCluster.pc4ldq.0003.use1.cache.amazonaws.com:11212"
            ]
        );
        // The older engines' form.
        let block = "3\nh|127.0.0.1|11211\n";
        let old = format!(
            "VALUE AmazonElastiCache:cluster 0 {}\r\n{block}\r\nEND\r\n",
            block.len()
        );
        assert_eq!(config(old.as_bytes()), (3, vec!["127.0.0.1:11211".into()]));
        // IPv6.
        let (_, nodes) = config(&reply(1, "h|::1|11211"));
        assert_eq!(nodes, ["[::1]:11211"]);
    }

    #[test]
    fn every_prefix_is_partial() {
        let r = reply(7, "a|127.0.0.1|1 b|127.0.0.2|2");
        for cut in 0..r.len() {
            assert_eq!(
                parse_cluster(&r[..cut], &Limits::default()),
                Ok(Status::Partial),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn malformed_replies_are_refused() {
        let limits = Limits::default();
        let bad = |b: &[u8]| parse_cluster(b, &limits).unwrap_err();
        assert_eq!(bad(b"VERSION 1.6\r\n"), ParseError::UnknownReply);
        assert_eq!(bad(b"CONFIG cluster 0\r\n"), ParseError::BadFormat);
        assert_eq!(bad(b"CONFIG cluster 0 x\r\n"), ParseError::BadNumber);
        assert_eq!(bad(b"CONFIG cluster 0 5\n"), ParseError::BadLineEnding);
        assert_eq!(
            bad(b"CONFIG cluster 0 99999999999\r\n"),
            ParseError::ValueTooLarge(99_999_999_999)
        );
        assert_eq!(bad(&[b'x'; 200]), ParseError::LineTooLong(MAX_HEADER));
        // The wrong terminator, a bad node, a bad port, no node at all, a third line.
        assert_eq!(
            bad(b"CONFIG cluster 0 4\r\n1\na\n\r\nENDX\r\n"),
            ParseError::BadDataTerminator
        );
        for list in [
            "a|b",
            "a|1.2.3.4|0",
            "a|1.2.3.4|65536",
            "|1.2.3.4|1",
            "a|1.2.3.4|x",
            "",
        ] {
            assert!(parse_cluster(&reply(1, list), &limits).is_err(), "{list:?}");
        }
        assert!(parse_cluster(&reply(1, "a|1.2.3.4|1\nb|1.2.3.4|2"), &limits).is_err());
        // An error line is an answer, not a parse failure.
        assert_eq!(
            parse_cluster(b"ERROR\r\n", &limits),
            Ok(Status::Complete((7, ClusterReply::Refused(b"ERROR"))))
        );
    }
}
