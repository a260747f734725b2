//! Server discovery sources: a configuration endpoint speaking exactly the published
//! ElastiCache format (a small fake: memcached does not implement `config get cluster`), a
//! file, DNS, and real memcached behind the discovered lists.

use mcstore_test_support as support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mcstore::{Client, Discovery, Error, ServerSource, SetOptions};
use support::Memcached;

/// What the endpoint answers next.
#[derive(Clone)]
enum Answer {
    Config(u64, Vec<String>),
    Raw(Vec<u8>),
    Silent,
}

/// A configuration endpoint on a loopback port: answers each `config get cluster` with
/// the current `Answer`.
struct Endpoint {
    addr: String,
    answer: Arc<Mutex<Answer>>,
}

impl Endpoint {
    fn start(first: Answer) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = Arc::new(Mutex::new(first));
        let a = answer.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let a = a.clone();
                thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut b = [0u8; 256];
                    while !req.ends_with(b"\r\n") {
                        match conn.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    assert_eq!(req, b"config get cluster\r\n");
                    let bytes = match a.lock().unwrap().clone() {
                        Answer::Config(v, nodes) => {
                            let entries: Vec<String> = nodes
                                .iter()
                                .map(|n| {
                                    let (ip, port) = n.rsplit_once(':').unwrap();
                                    format!("node-{port}.cache.example|{ip}|{port}")
                                })
                                .collect();
                            let block = format!("{v}\n{}\n", entries.join(" "));
                            format!("CONFIG cluster 0 {}\r\n{block}\r\nEND\r\n", block.len())
                                .into_bytes()
                        }
                        Answer::Raw(b) => b,
                        // Holds the connection open, answering nothing.
                        Answer::Silent => {
                            let _ = conn.read(&mut b);
                            return;
                        }
                    };
                    let _ = conn.write_all(&bytes);
                });
            }
        });
        Endpoint { addr, answer }
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
}

fn sorted(l: &[String]) -> Vec<String> {
    let mut v = l.to_vec();
    v.sort();
    v
}

/// The endpoint's list is applied when its version moves; the same answer again is no
/// change; a malformed answer and a silent endpoint fail (bounded by the timeout) and keep
/// the last list; real memcached behind the list serves.
#[test]
fn a_config_endpoint_is_followed() {
    let ms = [Memcached::start(), Memcached::start(), Memcached::start()];
    let addrs: Vec<String> = ms.iter().map(Memcached::addr).collect();
    let ep = Endpoint::start(Answer::Config(1, addrs[..2].to_vec()));
    let source: ServerSource = format!("config:{}", ep.addr).parse().unwrap();
    let mut d = Discovery::new(source).timeout(Duration::from_millis(300));

    let first = d.poll().unwrap().expect("the first list");
    assert_eq!(sorted(&first), sorted(&addrs[..2]));
    assert!(d.poll().unwrap().is_none(), "same version, same list");

    // Servers the endpoint lists are real: a client built on them works.
    let mut c = Client::builder().servers(first.iter()).build().unwrap();
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v");

    ep.set(Answer::Config(2, addrs.clone()));
    let second = d.poll().unwrap().expect("version 2");
    assert_eq!(sorted(&second), sorted(&addrs));
    // An older version (an endpoint lagging behind) is not applied.
    ep.set(Answer::Config(1, addrs[..1].to_vec()));
    assert!(d.poll().unwrap().is_none());

    for bad in [
        b"CONFIG cluster 0 5\r\n3\nx|\n\r\nEND\r\n".to_vec(),
        b"CONFIG cluster 0 999999999\r\n".to_vec(),
        b"VERSION 1.6.18\r\n".to_vec(),
        b"CONFIG cluster 0 2\r\n3\n\r\nEND\r\n".to_vec(),
    ] {
        ep.set(Answer::Raw(bad.clone()));
        let e = d.poll().expect_err(&String::from_utf8_lossy(&bad));
        assert!(matches!(e, Error::Parse { .. } | Error::Io { .. }), "{e:?}");
        assert_eq!(
            sorted(&d.current().unwrap()),
            sorted(&addrs),
            "last list kept"
        );
    }
    ep.set(Answer::Silent);
    let t = Instant::now();
    let e = d.poll().expect_err("a silent endpoint");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded: {:?}",
        t.elapsed()
    );
    assert_eq!(
        sorted(&d.current().unwrap()),
        sorted(&addrs),
        "last list kept"
    );
    assert_eq!(d.failures(), 5);
    assert_eq!(d.changes(), 2);

    // Back to a good answer: applied.
    ep.set(Answer::Config(3, addrs[1..].to_vec()));
    assert_eq!(sorted(&d.poll().unwrap().unwrap()), sorted(&addrs[1..]));
}

/// Plain memcached is not a discovery endpoint: it answers `ERROR`, and the error says so.
#[test]
fn memcached_is_not_a_discovery_endpoint() {
    let m = Memcached::start();
    let mut d = Discovery::new(format!("config:{}", m.addr()).parse().unwrap());
    match d.poll() {
        Err(Error::Config(msg)) => assert!(msg.contains("not a discovery endpoint"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // A closed port: an I/O error, at once.
    let port = support::free_port();
    let mut d = Discovery::new(format!("config:127.0.0.1:{port}").parse().unwrap());
    assert!(matches!(d.poll(), Err(Error::Io { .. })));
}

/// A file is read again when it changes; a missing or empty file keeps the last list.
#[test]
fn a_servers_file_is_followed() {
    let dir = support::TempDir::new("discovery");
    let path = dir.path.join("servers");
    std::fs::write(&path, "127.0.0.1:1 # first\n127.0.0.1:2,127.0.0.1:3\n").unwrap();
    let mut d = Discovery::new(ServerSource::File(path.clone()));
    assert_eq!(d.poll().unwrap().unwrap().len(), 3);
    assert!(d.poll().unwrap().is_none());
    // Rewritten (another length: a change even within the file system's time resolution).
    std::fs::write(&path, "127.0.0.1:1\n").unwrap();
    assert_eq!(&*d.poll().unwrap().unwrap(), ["127.0.0.1:1".to_string()]);
    std::fs::write(&path, "# nothing\n").unwrap();
    assert!(d.poll().is_err(), "an empty list is refused");
    std::fs::remove_file(&path).unwrap();
    assert!(d.poll().is_err());
    assert_eq!(&*d.current().unwrap(), ["127.0.0.1:1".to_string()]);
}

/// DNS: every address of a name, sorted (here `localhost`, from /etc/hosts).
#[test]
fn dns_lists_every_address() {
    let _hosts = HOSTS.lock().unwrap_or_else(|p| p.into_inner());
    let mut d = Discovery::new("dns:localhost:11211".parse().unwrap());
    let list = d.poll().unwrap().unwrap();
    assert!(list.contains(&"127.0.0.1:11211".to_string()), "{list:?}");
    assert_eq!(sorted(&list), list.to_vec());
    // (A name that does not resolve is not tried: it would ask a DNS server off this
    // host.)
}

/// Held by the tests that read or write /etc/hosts: a rewrite is not atomic.
static HOSTS: Mutex<()> = Mutex::new(());

/// `/etc/hosts` with lines of its own added, put back as it was on drop.
struct HostsFile {
    original: String,
}

impl HostsFile {
    const PATH: &'static str = "/etc/hosts";

    fn new() -> HostsFile {
        HostsFile {
            original: std::fs::read_to_string(Self::PATH).unwrap(),
        }
    }

    /// The original file plus `lines`, written in place (a container's /etc/hosts may be a
    /// mount: it cannot be replaced).
    fn set(&self, lines: &[String]) {
        let mut text = self.original.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(Self::PATH, text).unwrap();
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.original);
    }
}

/// DNS whose addresses change (#28): a name in /etc/hosts (the system resolver reads it
/// first; the name is under `.test`, reserved, and always found there, so no DNS server is
/// asked), followed by `Discovery::follow` into a client's list. Needs root to edit
/// /etc/hosts (CI runs as root); restores it on the way out.
#[test]
fn dns_addresses_that_change_are_followed() {
    if !support::launcher::running_as_root() {
        eprintln!("dns_addresses_that_change_are_followed: needs root to edit /etc/hosts");
        return;
    }
    let _hosts = HOSTS.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!("mcstore-dns-{}.test", std::process::id());
    let hosts = HostsFile::new();
    let line = |ip: &str| format!("{ip} {name}");
    hosts.set(&[line("127.0.0.2"), line("127.0.0.3")]);
    let mut c = Client::builder()
        .server("127.0.0.1:11311")
        .distribution(mcstore::ring::Distribution::Ketama)
        .build()
        .unwrap();
    let list = c.server_list().clone();
    let source: ServerSource = format!("dns:{name}:11311").parse().unwrap();
    let following = Discovery::new(source)
        .follow(list.clone(), Duration::from_millis(20))
        .unwrap();
    let want =
        |ips: &[&str]| -> Vec<String> { ips.iter().map(|ip| format!("{ip}:11311")).collect() };
    support::wait_for("the name's two addresses", || {
        sorted(&list.servers()) == want(&["127.0.0.2", "127.0.0.3"])
    });
    // One address replaced by another: the list follows; the client takes it on its next
    // call (nothing connects: no server listens there).
    hosts.set(&[line("127.0.0.2"), line("127.0.0.4")]);
    support::wait_for("the new address", || {
        sorted(&list.servers()) == want(&["127.0.0.2", "127.0.0.4"])
    });
    c.server_for_key(b"k").unwrap();
    assert_eq!(sorted(c.servers()), want(&["127.0.0.2", "127.0.0.4"]));
    // A third address joins.
    hosts.set(&[line("127.0.0.2"), line("127.0.0.4"), line("127.0.0.5")]);
    support::wait_for("the third address", || list.servers().len() == 3);
    let d = following.stop().unwrap();
    assert!(d.changes() >= 3, "{} changes", d.changes());
    assert_eq!(d.failures(), 0);
    drop(hosts);
    assert!(!std::fs::read_to_string("/etc/hosts")
        .unwrap()
        .contains(&name));
}
