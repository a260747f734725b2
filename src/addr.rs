//! Server addresses: below both the key distribution (`ring`, which hashes them as
//! libmemcached does) and the connections (`conn`, which dials them).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// memcached's default port.
pub const DEFAULT_PORT: u16 = 11211;

/// Where a server listens: a TCP host and port, or a Unix socket path (`memcached -s PATH`).
///
/// Parsed from `host:port`, `host` (port 11211), `[v6addr]:port`, or a path starting with `/`
/// (optionally written `unix:/path`). Hostnames are kept as written: they are resolved at each
/// connect, and later used as written for key distribution.
///
/// ```
/// use mcstore::ServerAddr;
/// let a: ServerAddr = "127.0.0.1:11311".parse().unwrap();
/// assert_eq!(a, ServerAddr::Tcp { host: "127.0.0.1".into(), port: 11311 });
/// let b: ServerAddr = "localhost".parse().unwrap();
/// assert_eq!(b, ServerAddr::Tcp { host: "localhost".into(), port: 11211 });
/// let c: ServerAddr = "/run/memcached.sock".parse().unwrap();
/// assert_eq!(c, ServerAddr::Unix("/run/memcached.sock".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerAddr {
    /// A TCP server.
    Tcp {
        /// Hostname or IP address, as configured (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

impl FromStr for ServerAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("server address {s:?}: {why}"));
        // `unix:` names a socket only when a path follows: a host called "unix" stays a host
        // ("unix:11211" is host unix, port 11211), so every address prints back to itself.
        let unix = s.strip_prefix("unix:").filter(|p| p.starts_with('/'));
        if let Some(path) = unix.or(s.starts_with('/').then_some(s)) {
            return Ok(ServerAddr::Unix(PathBuf::from(path)));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("expected ':port' after ']'")),
            }
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        // Brackets only delimit an IPv6 address; inside a host they would not print back.
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains(['[', ']', '/']) {
            return Err(bad("empty or invalid host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("invalid port"))?,
            None => DEFAULT_PORT,
        };
        Ok(ServerAddr::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

/// A server in the configuration: its address and its weight (used by weighted ketama).
///
/// Parsed from `host:port:weight`, `host:port`, `host`, `[v6]:port:weight`, or a Unix socket
/// path (weight 1).
///
/// ```
/// use mcstore::{ServerAddr, ServerSpec};
/// let s: ServerSpec = "cache-a:11311:3".parse().unwrap();
/// assert_eq!(s, ServerSpec::tcp("cache-a", 11311).weight(3));
/// let t: ServerSpec = "10.0.0.1:11211".parse().unwrap();
/// assert_eq!(t.weight, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerSpec {
    /// Where the server listens.
    pub addr: ServerAddr,
    /// Its weight (0 is treated as 1, as libmemcached does).
    pub weight: u32,
}

impl ServerSpec {
    /// A TCP server with weight 1.
    pub fn tcp(host: impl Into<String>, port: u16) -> ServerSpec {
        ServerSpec {
            addr: ServerAddr::Tcp {
                host: host.into(),
                port,
            },
            weight: 1,
        }
    }

    /// A Unix socket server with weight 1.
    pub fn unix(path: impl Into<PathBuf>) -> ServerSpec {
        ServerSpec {
            addr: ServerAddr::Unix(path.into()),
            weight: 1,
        }
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> ServerSpec {
        self.weight = weight;
        self
    }
}

impl FromStr for ServerSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let unix = s.starts_with('/') || s.starts_with("unix:/");
        // host:port:weight or [v6]:port:weight: the weight is a third field.
        let fields = if s.starts_with('[') {
            s.rsplit_once(']')
                .map_or(0, |(_, r)| r.matches(':').count())
                + 1
        } else {
            s.matches(':').count() + 1
        };
        if !unix && fields == 3 {
            let (addr, weight) = s.rsplit_once(':').expect("three fields");
            let weight = weight
                .parse::<u32>()
                .map_err(|_| Error::Config(format!("server {s:?}: invalid weight")))?;
            return Ok(ServerSpec {
                addr: addr.parse()?,
                weight,
            });
        }
        Ok(ServerSpec {
            addr: s.parse()?,
            weight: 1,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ServerAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ServerAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (input, shown) in [
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("localhost", "localhost:11211"),
            ("[::1]:99", "[::1]:99"),
            ("[::1]", "[::1]:11211"),
            ("/tmp/m.sock", "unix:/tmp/m.sock"),
            ("unix:/tmp/m.sock", "unix:/tmp/m.sock"),
            // Found by the server_spec fuzz target: a host named "unix".
            ("unix", "unix:11211"),
            ("unix:11211", "unix:11211"),
        ] {
            let a: ServerAddr = input.parse().unwrap();
            assert_eq!(a.to_string(), shown);
        }
        for bad in [
            "", ":11211", "h:0", "h:x", "h:70000", "[::1", "[::1]x", "unix:rel", "a b:1",
        ] {
            assert!(bad.parse::<ServerAddr>().is_err(), "{bad}");
        }
    }
}
