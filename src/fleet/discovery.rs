//! Where a fleet's server list comes from, asked again and again: a fixed list, a file, the
//! addresses of a DNS name (a Kubernetes headless service), or a discovery endpoint (AWS
//! ElastiCache, Google Memorystore: `config get cluster`). [`Discovery`] asks its source
//! on each [`poll`](Discovery::poll), reports a list only when it really changed, and keeps
//! the last good list when the source fails: a failing source never empties a fleet.
//!
//! DNS goes through the standard library's resolver (`getaddrinfo`): it honours
//! `/etc/hosts` and the resolver's search domains, which is what a headless service needs
//! (`name.namespace.svc`), and adds no dependency. It has no SRV records (the port is given)
//! and no TTLs (the poll interval is the refresh).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::fleet::live::ServerList;
use crate::proto::cluster::{parse_cluster, ClusterReply, CONFIG_GET_CLUSTER};
use crate::proto::{Limits, Status};

/// The largest discovery reply read (a node list of thousands of nodes fits).
const MAX_REPLY: usize = 1 << 20;

/// Where a server list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSource {
    /// A fixed list.
    Static(Vec<String>),
    /// A file: servers separated by commas, spaces or lines; `#` starts a comment. Read
    /// again when its modification time or length changes.
    File(PathBuf),
    /// Every address `name` resolves to, each on `port`.
    Dns {
        /// The name (for Kubernetes, a headless service's).
        name: String,
        /// The port of every server.
        port: u16,
    },
    /// A discovery endpoint, `host:port`, asked `config get cluster`.
    ConfigEndpoint(String),
}

impl FromStr for ServerSource {
    type Err = Error;

    /// `dns:NAME:PORT`, `config:HOST:PORT`, `file:PATH`, or a list of servers.
    fn from_str(s: &str) -> Result<ServerSource> {
        let bad = |why: &str| Error::Config(format!("server source {s:?}: {why}"));
        if let Some(rest) = s.strip_prefix("dns:") {
            let (name, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("want dns:NAME:PORT"))?;
            let port = port.parse().map_err(|_| bad("bad port"))?;
            if name.is_empty() {
                return Err(bad("empty name"));
            }
            return Ok(ServerSource::Dns {
                name: name.to_string(),
                port,
            });
        }
        if let Some(rest) = s.strip_prefix("config:") {
            if rest
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(bad("want config:HOST:PORT"));
            }
            return Ok(ServerSource::ConfigEndpoint(rest.to_string()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(ServerSource::File(PathBuf::from(path)));
        }
        let list = split_list(s);
        if list.is_empty() {
            return Err(bad("no server"));
        }
        Ok(ServerSource::Static(list))
    }
}

/// Servers separated by commas or whitespace; `#` to the end of a line is a comment.
fn split_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// A [`ServerSource`] asked again and again: each [`poll`](Discovery::poll) asks it and
/// reports a list only when it really changed; when the source fails, the last good list
/// stays (a failing source never empties a fleet). DNS goes through the system resolver
/// (`getaddrinfo`: `/etc/hosts`, search domains, a headless service's addresses; no SRV
/// records, no TTLs: the poll interval is the refresh).
#[derive(Debug)]
pub struct Discovery {
    source: ServerSource,
    timeout: Duration,
    last: Option<Arc<[String]>>,
    /// The endpoint's configuration version last applied.
    version: Option<u64>,
    /// The file's modification time and length last read.
    stamp: Option<(SystemTime, u64)>,
    failures: u64,
    changes: u64,
}

/// A [`Discovery`] following its source for a [`ServerList`] (see
/// [`Discovery::follow`]); stops on drop.
#[derive(Debug)]
pub struct Following {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Discovery>>,
}

impl Following {
    /// Stops following and returns the discovery, with its counters.
    pub fn stop(mut self) -> Option<Discovery> {
        self.stop.take();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Discovery {
    /// Asks `source`, with timeouts of 1 s per network step.
    pub fn new(source: ServerSource) -> Discovery {
        Discovery {
            source,
            timeout: Duration::from_secs(1),
            last: None,
            version: None,
            stamp: None,
            failures: 0,
            changes: 0,
        }
    }

    /// The timeout of each network step (connect, write, read) of a DNS or endpoint
    /// source.
    pub fn timeout(mut self, t: Duration) -> Discovery {
        self.timeout = t;
        self
    }

    /// Asks the source once. `Ok(Some(list))` when the list changed (or on the first
    /// success), `Ok(None)` when it did not. On failure, or an empty list, the error is
    /// returned, counted and logged, and the last good list stays current.
    ///
    /// # Errors
    /// The source could not be read or resolved, did not answer in time, answered
    /// something malformed, or listed no server.
    pub fn poll(&mut self) -> Result<Option<Arc<[String]>>> {
        let r = self.ask();
        match r {
            Ok(Some(list)) if list.is_empty() => {
                Err(self.failed(Error::Config("the source lists no server".into())))
            }
            Ok(Some(list)) => {
                let mut sorted = list.clone();
                sorted.sort();
                let same = self.last.as_ref().is_some_and(|l| {
                    let mut old = l.to_vec();
                    old.sort();
                    old == sorted
                });
                if same {
                    return Ok(None);
                }
                self.changes += 1;
                crate::observe::discovery_changed(&self.describe(), list.len());
                let list: Arc<[String]> = list.into();
                self.last = Some(list.clone());
                Ok(Some(list))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Follows the source on a thread of its own (`mcstore-discovery`): every `every`, a
    /// [`poll`](Self::poll), and a new list given to `list` ([`ServerList::set`]); between
    /// changes, a change `list` held back (damping, rate limit) is applied when its time
    /// comes ([`ServerList::refresh`]). A failed poll, or a list `list` refuses, keeps the
    /// clients on the list they have (counted in [`failures`](Self::failures), logged).
    /// Stops when the returned [`Following`] is stopped or dropped.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn follow(mut self, list: ServerList, every: Duration) -> Result<Following> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mcstore-discovery".into())
            .spawn(move || {
                loop {
                    match self.poll() {
                        Ok(Some(servers)) => {
                            if let Err(e) = list.set(servers.iter()) {
                                self.failed(e);
                            }
                        }
                        Ok(None) => {
                            let _ = list.refresh();
                        }
                        // Counted and logged by `poll`; the clients keep their list.
                        Err(_) => {}
                    }
                    match stopped.recv_timeout(every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return self,
                    }
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the discovery thread: {e}")))?;
        Ok(Following {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The last good list, if any.
    pub fn current(&self) -> Option<Arc<[String]>> {
        self.last.clone()
    }

    /// Polls that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Lists applied so far (changes, the first included).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    fn failed(&mut self, e: Error) -> Error {
        self.failures += 1;
        crate::observe::discovery_failed(&self.describe(), &e);
        e
    }

    fn describe(&self) -> String {
        match &self.source {
            ServerSource::Static(_) => "static list".into(),
            ServerSource::File(p) => format!("file {}", p.display()),
            ServerSource::Dns { name, port } => format!("dns {name}:{port}"),
            ServerSource::ConfigEndpoint(e) => format!("endpoint {e}"),
        }
    }

    /// The source's list, or `None` when it is known unchanged without reading it (a file
    /// not modified, an endpoint's version not moved).
    fn ask(&mut self) -> Result<Option<Vec<String>>> {
        match &self.source {
            ServerSource::Static(l) => Ok(Some(l.clone())),
            ServerSource::File(path) => {
                let io = |e: std::io::Error| Error::Io {
                    server: path.display().to_string(),
                    source: e.into(),
                };
                let meta = std::fs::metadata(path).map_err(io)?;
                let stamp = (meta.modified().map_err(io)?, meta.len());
                if self.stamp == Some(stamp) && self.last.is_some() {
                    return Ok(None);
                }
                let text = std::fs::read_to_string(path).map_err(io)?;
                self.stamp = Some(stamp);
                Ok(Some(split_list(&text)))
            }
            ServerSource::Dns { name, port } => {
                let addrs = (name.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Error::Io {
                        server: format!("{name}:{port}"),
                        source: e.into(),
                    })?;
                let mut list: Vec<String> = addrs.map(|a| a.to_string()).collect();
                // The resolver's order varies: every process must see the same list.
                list.sort();
                list.dedup();
                Ok(Some(list))
            }
            ServerSource::ConfigEndpoint(endpoint) => {
                let (version, list) = ask_endpoint(endpoint, self.timeout)?;
                // An older version than the one applied is an endpoint lagging behind.
                if self.version.is_some_and(|v| version < v) && self.last.is_some() {
                    return Ok(None);
                }
                self.version = Some(version);
                Ok(Some(list))
            }
        }
    }
}

/// Asks `endpoint` for its cluster configuration: its version and node addresses.
fn ask_endpoint(endpoint: &str, timeout: Duration) -> Result<(u64, Vec<String>)> {
    let io = |e: std::io::Error| Error::Io {
        server: endpoint.to_string(),
        source: e.into(),
    };
    let deadline = Instant::now() + timeout * 3;
    let mut last = None;
    let mut stream = None;
    for addr in endpoint.to_socket_addrs().map_err(io)? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream =
        stream.ok_or_else(|| io(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into())))?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(CONFIG_GET_CLUSTER).map_err(io)?;
    let limits = Limits {
        max_value: MAX_REPLY,
    };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let parsed = parse_cluster(&buf, &limits).map_err(|error| Error::Parse {
            server: endpoint.to_string(),
            error,
        })?;
        match parsed {
            Status::Complete((_, ClusterReply::Config(c))) => {
                return Ok((c.version, c.nodes().map(|n| n.address()).collect()));
            }
            Status::Complete((_, ClusterReply::Refused(line))) => {
                return Err(Error::Config(format!(
                    "{endpoint} is not a discovery endpoint: it answered {:?} to `config get \
                     cluster`",
                    String::from_utf8_lossy(line)
                )));
            }
            Status::Partial => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                server: endpoint.to_string(),
                during: crate::error::During::Read,
                elapsed: timeout * 3,
            });
        }
        stream
            .set_read_timeout(Some(left.min(timeout)))
            .map_err(io)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        if buf.len() + n > MAX_REPLY + 256 {
            return Err(Error::Parse {
                server: endpoint.to_string(),
                error: crate::proto::ParseError::ValueTooLarge(buf.len() as u64),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            "dns:memcached.cache.svc:11211"
                .parse::<ServerSource>()
                .unwrap(),
            ServerSource::Dns {
                name: "memcached.cache.svc".into(),
                port: 11211
            }
        );
        assert_eq!(
            "config:cfg.example:11211".parse::<ServerSource>().unwrap(),
            ServerSource::ConfigEndpoint("cfg.example:11211".into())
        );
        assert_eq!(
            "a:1, b:2".parse::<ServerSource>().unwrap(),
            ServerSource::Static(vec!["a:1".into(), "b:2".into()])
        );
        for bad in [
            "dns:",
            "dns:name",
            "dns:name:x",
            "config:host",
            "config::1",
            " , ",
        ] {
            assert!(bad.parse::<ServerSource>().is_err(), "{bad:?}");
        }
        assert_eq!(
            split_list("a:1 # first\n\n b:2,c:3\n#d:4\n"),
            ["a:1", "b:2", "c:3"]
        );
    }

    #[test]
    fn a_static_list_changes_once() {
        let mut d = Discovery::new(ServerSource::Static(vec!["b:1".into(), "a:1".into()]));
        assert_eq!(d.poll().unwrap().unwrap().len(), 2);
        assert!(d.poll().unwrap().is_none());
        assert_eq!(d.changes(), 1);
        let mut empty = Discovery::new(ServerSource::Static(Vec::new()));
        assert!(empty.poll().is_err());
        assert_eq!((empty.failures(), empty.current()), (1, None));
    }
}
