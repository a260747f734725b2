//! `mcstore`: a memcached command-line client (like libmemcached's memcat, memcp, memrm,
//! memstat), a key-to-server mapper, a storage front end, and the demo.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{self, Read, Write};

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod bench;
mod capable;
#[cfg(feature = "metrics")]
mod collect;
mod mapping;
mod slap;
// The memcached launcher and the throwaway PostgreSQL cluster (`demo --master postgres`),
// shared with the tests and benchmarks.
use mcstore_test_support::launcher;
use mcstore_test_support::postgres as pgcluster;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use mcstore::ring::{Distribution, HashFn};
use mcstore::storage::{Content, FsStorage, MemcacheStorage, Storage};
use mcstore::{Client, ClientBuilder, Pool, SetOptions, StoreMode};

#[derive(Parser)]
#[command(
    name = "mcstore",
    version,
    about = "memcached client and cache-through storage"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct Global {
    /// Servers, separated by commas or spaces: host[:port[:weight]], [ipv6]:port[:weight] or a
    /// Unix socket path; libmemcached's `--SERVER=host:port` form too [default: 127.0.0.1:11211].
    #[arg(
        long,
        short = 's',
        env = "MEMCACHED_SERVERS",
        global = true,
        allow_hyphen_values = true
    )]
    servers: Option<String>,
    /// Wire protocol.
    #[arg(long, value_enum, default_value = "text", global = true)]
    protocol: Protocol,
    /// User to authenticate as, with --password or MEMCACHED_PASSWORD: SASL PLAIN over the
    /// binary protocol (memcached -S), ASCII authentication over text and meta (memcached -Y).
    #[arg(long, env = "MEMCACHED_USER", global = true)]
    user: Option<String>,
    /// Password for --user.
    #[arg(
        long,
        env = "MEMCACHED_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    password: Option<String>,
    /// Key distribution: modula, ketama or ketama_weighted.
    #[arg(long, default_value = "modula", value_parser = parse_distribution, global = true)]
    distribution: Distribution,
    /// Key hash (one_at_a_time, md5, crc, fnv1_64, fnv1a_64, fnv1_32, fnv1a_32, hsieh,
    /// murmur, jenkins, murmur3); default: libmemcached's choice for the distribution.
    #[arg(long, value_parser = parse_hash, global = true)]
    hash: Option<HashFn>,
    /// I/O timeout in milliseconds.
    #[arg(long, default_value_t = 1000, global = true)]
    timeout_ms: u64,
    /// Speak TLS to the servers (trusting the system's roots unless --tls-ca is given).
    #[arg(long, global = true)]
    tls: bool,
    /// Trust the CA certificates in this PEM file (implies --tls).
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, with --tls-key (implies --tls).
    #[arg(long, value_name = "FILE", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to verify in the servers' certificates (default: each server's host).
    #[arg(long, value_name = "NAME", global = true)]
    tls_server_name: Option<String>,
    /// Never resume TLS sessions: every connection does a full handshake (to measure it).
    #[arg(long, global = true)]
    tls_no_resumption: bool,
}

impl Global {
    /// The TLS settings asked for, if any (files are read here: a bad one is named).
    fn tls(&self) -> Res<Option<mcstore::TlsConfig>> {
        let on = self.tls || self.tls_ca.is_some() || self.tls_cert.is_some();
        if !on {
            if self.tls_server_name.is_some() {
                return Err("--tls-server-name needs --tls".into());
            }
            return Ok(None);
        }
        let mut b = mcstore::TlsConfig::builder();
        if let Some(ca) = &self.tls_ca {
            b = b.ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            b = b.client_cert(cert, key);
        }
        if let Some(name) = &self.tls_server_name {
            b = b.server_name(name);
        }
        if self.tls_no_resumption {
            b = b.resumption(false);
        }
        Ok(Some(b.build()?))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Text,
    Binary,
    Meta,
}

fn parse_distribution(s: &str) -> Result<Distribution, String> {
    Distribution::from_name(s).ok_or_else(|| format!("unknown distribution {s:?}"))
}

fn parse_hash(s: &str) -> Result<HashFn, String> {
    HashFn::from_name(s).ok_or_else(|| format!("unknown hash {s:?}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Print values to stdout: one key's raw; several keys' each followed by --separator
    /// (exit 1 if any key is missing, after printing the others).
    Get {
        #[arg(required = true)]
        keys: Vec<String>,
        /// Printed after each value when there are several keys (default: a newline).
        #[arg(long, default_value = "\n", hide_default_value = true)]
        separator: String,
        /// Print each key's flags on a line of its own before its value (as memccat -F),
        /// every value then followed by the separator.
        #[arg(long, short = 'F')]
        flags: bool,
    },
    /// Print each key's CAS unique and value: `<cas> <value>` (exit 1 if any is missing).
    Gets {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Exit 0 if every key exists, 1 if not (naming the missing ones).
    Exists {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Each server's round-trip time for `version` (exit 1 if any failed).
    Ping,
    /// Check one server's conformance (as memcapable): every command on every protocol, a
    /// pass/fail table; exit 1 if any check failed.
    Capable,
    /// List every server's keys (memcached's LRU crawler, `lru_crawler metadump`; always
    /// over a text connection), one a line, or `key<TAB>value` with --with-values.
    Dump {
        /// Only keys matching this pattern (`*` any run of bytes, `?` one byte).
        #[arg(long = "match", value_name = "PATTERN")]
        pattern: Option<String>,
        /// Print each key's value too (read with a get; keys gone meanwhile are skipped).
        #[arg(long)]
        with_values: bool,
    },
    /// Store a value only if the key exists.
    Replace(StoreArgs),
    /// Append to an existing value.
    Append(StoreArgs),
    /// Prepend to an existing value.
    Prepend(StoreArgs),
    /// Store a value only if the item's CAS unique is still CAS (from `gets`).
    Cas {
        key: String,
        cas: u64,
        /// The value (from stdin if omitted or `-`).
        value: Option<String>,
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        #[arg(long, default_value_t = 0)]
        flags: u32,
    },
    /// Store files, each under its file name (as memccp); `-` reads one value from stdin
    /// under --key.
    Cp {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The key for `-` (stdin).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        #[arg(long, default_value_t = 0)]
        flags: u32,
    },
    /// Store a value (from stdin if VALUE is omitted or `-`).
    Set(StoreArgs),
    /// Store a value only if the key is absent.
    Add(StoreArgs),
    /// Delete keys (exit 1 if any did not exist).
    Delete {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Increment a counter and print the new value.
    Incr {
        key: String,
        #[arg(default_value_t = 1)]
        delta: u64,
    },
    /// Decrement a counter and print the new value.
    Decr {
        key: String,
        #[arg(default_value_t = 1)]
        delta: u64,
    },
    /// Set a key's expiration.
    Touch { key: String, ttl: u32 },
    /// Invalidate every item on every server.
    Flush {
        #[arg(long)]
        delay: Option<u32>,
    },
    /// Print server statistics (optionally `stats ARG`, e.g. items, slabs, settings).
    Stats { arg: Option<String> },
    /// Print each server's version.
    Version,
    /// Read keys from stdin (one per line, raw bytes) and print `key<TAB>server`.
    Ring,
    /// Resources in a cache-through storage (memcached in front of a folder).
    Store {
        /// Master storage folder.
        #[arg(long, default_value = "./mcstore-data")]
        root: PathBuf,
        /// A PostgreSQL master instead of the folder: postgres://user@host:port/db.
        #[arg(long, value_name = "URL")]
        master: Option<String>,
        #[command(subcommand)]
        op: StoreOp,
    },
    /// Run a fixed benchmark workload and print one RESULT line (see scripts/bench-compare).
    Bench {
        /// get, get_miss, set, set_noreply, mget100, large_get or reconnect.
        #[arg(short = 'w', long)]
        workload: String,
        /// Binary protocol.
        #[arg(short = 'b')]
        binary: bool,
        /// Operations (default per workload).
        #[arg(short = 'n')]
        ops: Option<usize>,
        /// Distinct keys.
        #[arg(short = 'k')]
        keyspace: Option<usize>,
        /// Value size in bytes.
        #[arg(short = 'v')]
        value_bytes: Option<usize>,
        /// Print the client's metrics at the end (a binary built with `--features metrics`).
        #[cfg(feature = "metrics")]
        #[arg(long)]
        metrics: bool,
    },
    /// Concurrent load on one shared client (as memaslap): a latency table, then one RESULT
    /// line.
    Slap {
        /// get, set or mix (nine gets to one set).
        #[arg(short = 'w', long, default_value = "get")]
        workload: String,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        callers: usize,
        /// Calls in total, over all callers [default: 1000000, or no limit with -t].
        #[arg(short = 'n')]
        ops: Option<usize>,
        /// Run this long (as memaslap writes it: 30s, 2m, 1h, 500ms).
        #[arg(short = 't', long = "time", value_parser = slap::parse_duration)]
        duration: Option<Duration>,
        /// Calls per second in total, open-loop: latency counts from each call's intended
        /// start (no coordinated omission).
        #[arg(long)]
        rate: Option<f64>,
        /// Print the calls made, their rate and errors every period (e.g. 1s), on stderr.
        #[arg(long, value_parser = slap::parse_duration)]
        report_every: Option<Duration>,
        /// Give every key a value of its own, and check each value read against its key's.
        #[arg(long)]
        verify: bool,
        /// Distinct keys (key:0 .. key:{KEYS-1}), preloaded before timing.
        #[arg(short = 'k', default_value_t = 10_000)]
        keys: usize,
        /// Value size in bytes.
        #[arg(short = 'v', default_value_t = 100)]
        value_bytes: usize,
        /// Callers as threads (blocking calls) or tokio tasks (async calls).
        #[arg(long, value_enum, default_value = "threads")]
        mode: slap::Mode,
        /// The tokio runtime for --mode async.
        #[arg(long, value_enum, default_value = "current")]
        runtime: slap::Runtime,
        /// The client: one shared client, or a pool of one client per caller (to compare).
        #[arg(long, value_enum, default_value = "shared")]
        client: slap::Which,
        /// Who does the I/O for blocking callers (the designs, to compare).
        #[arg(long, value_enum, default_value = "adaptive")]
        io_mode: slap::IoModeArg,
    },
    /// Demonstration: a local memcached in front of a file storage, cold and warm reads.
    Demo {
        /// Resources to store and read.
        #[arg(long, default_value_t = 300)]
        resources: usize,
        /// The master: `fs` (a temporary folder), `postgres` (a throwaway local PostgreSQL,
        /// started and stopped by the demo) or a postgres:// URL.
        #[arg(long, default_value = "fs")]
        master: String,
    },
}

#[derive(Args)]
struct StoreArgs {
    key: String,
    value: Option<String>,
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    #[arg(long, default_value_t = 0)]
    flags: u32,
}

#[derive(Subcommand)]
enum StoreOp {
    /// Store a resource's content (or metadata with --meta) from FILE, or stdin.
    Put {
        collection: String,
        name: String,
        file: Option<PathBuf>,
        #[arg(long)]
        meta: bool,
    },
    /// Print a resource's content (or metadata) to stdout.
    Get {
        collection: String,
        name: String,
        #[arg(long)]
        meta: bool,
    },
    /// List a collection (optionally only names ending in .EXT).
    Ls {
        collection: String,
        #[arg(long)]
        ext: Option<String>,
    },
    /// Remove a resource's content (or metadata).
    Rm {
        collection: String,
        name: String,
        #[arg(long)]
        meta: bool,
    },
    /// Exit 0 if the resource exists, 1 if not.
    Exists { collection: String, name: String },
    /// Print where a resource (or collection) lives.
    Info {
        collection: String,
        name: Option<String>,
    },
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A failure that has already been explained, or a plain "no" (missing key): exit 1.
#[derive(Debug)]
struct Quiet;

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("")
    }
}

impl std::error::Error for Quiet {}

/// A run ended by SIGINT after printing what it did: exit 130, as a shell reports a process
/// interrupted by Ctrl-C.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Quiet>() => ExitCode::FAILURE,
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        // The reader of our output went away (`mcstore get k | head -c10`): end quietly,
        // with the status a process killed by SIGPIPE has, as coreutils do.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("mcstore: error: {e}{}", hint(&*e));
            ExitCode::FAILURE
        }
    }
}

/// What the CLI user can do about a library error, in the CLI's own terms.
fn hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    match e.downcast_ref::<mcstore::Error>() {
        Some(mcstore::Error::Auth { .. }) => {
            " (give --user and --password: SASL with --protocol binary, ASCII authentication \
             with text and meta)"
        }
        Some(mcstore::Error::Tls { failure, .. }) => match failure {
            mcstore::TlsFailure::UntrustedCertificate => " (--tls-ca names the CA to trust)",
            mcstore::TlsFailure::WrongName => " (--tls-server-name sets the name to verify)",
            mcstore::TlsFailure::ClientCertRequired => {
                " (--tls-cert and --tls-key give a client certificate)"
            }
            _ => "",
        },
        Some(mcstore::Error::Config(m)) if m.contains("no trusted root certificates") => {
            " (--tls-ca names the CA to trust)"
        }
        _ => "",
    }
}

fn builder(g: &Global, default_servers: &str) -> Res<ClientBuilder> {
    let servers = servers_of(g, default_servers);
    let mut b = Client::builder()
        .protocol(match g.protocol {
            Protocol::Text => mcstore::Protocol::Text,
            Protocol::Binary => mcstore::Protocol::Binary,
            Protocol::Meta => mcstore::Protocol::Meta,
        })
        .servers(server_list(servers)?)
        .distribution(g.distribution)
        .io_timeout(Duration::from_millis(g.timeout_ms))
        .connect_timeout(Duration::from_millis(g.timeout_ms))
        .max_value_size(64 << 20);
    if let Some(h) = g.hash {
        b = b.hash(h);
    }
    if let Some(user) = &g.user {
        let password = g.password.clone().unwrap_or_default();
        b = match g.protocol {
            Protocol::Binary => b.sasl(user.clone(), password),
            Protocol::Text | Protocol::Meta => b.ascii_auth(user.clone(), password),
        };
    }
    if let Some(tls) = g.tls()? {
        b = b.tls(tls);
    }
    Ok(b)
}

/// Whether `s` matches the glob `p` (`*`: any run of bytes, `?`: one byte).
fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative, with one backtrack point (the last `*`): linear enough for keys.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some(pi);
                mark = si;
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some(st) => {
                    pi = st + 1;
                    mark += 1;
                    si = mark;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// `--servers` (or `MEMCACHED_SERVERS`), or `default` when it is not given or blank.
fn servers_of<'a>(g: &'a Global, default: &'a str) -> &'a str {
    g.servers
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(default)
}

/// The servers of `--servers`: separated by commas or whitespace, each plain or in
/// libmemcached's configuration-string form `--SERVER=host:port` (other options of that
/// language are refused, by name).
fn server_list(spec: &str) -> Res<Vec<String>> {
    let mut out = Vec::new();
    for token in spec.split(|c: char| c == ',' || c.is_whitespace()) {
        if token.is_empty() {
            continue;
        }
        let server = match token.split_once('=') {
            Some((opt, value)) if opt.eq_ignore_ascii_case("--server") => value,
            _ if token.starts_with("--") => {
                return Err(format!(
                    "{token:?} in --servers: only --SERVER=host:port is understood there (give \
                     other settings as mcstore options)"
                )
                .into())
            }
            _ => token,
        };
        out.push(server.to_string());
    }
    Ok(out)
}

fn client(g: &Global) -> Res<Client> {
    Ok(builder(g, "127.0.0.1:11211")?.build()?)
}

fn read_stdin() -> Res<Vec<u8>> {
    let mut v = Vec::new();
    io::stdin().lock().read_to_end(&mut v)?;
    Ok(v)
}

fn run(cli: Cli) -> Res<()> {
    let g = &cli.global;
    let mut out = io::stdout().lock();
    match cli.command {
        Cmd::Get {
            keys,
            separator,
            flags,
        } => {
            let mut c = client(g)?;
            let several = keys.len() > 1 || flags;
            each_key(
                &keys,
                |k| c.get(k),
                |_, item| {
                    if flags {
                        writeln!(out, "{}", item.flags)?;
                    }
                    out.write_all(&item.value)?;
                    if several {
                        out.write_all(separator.as_bytes())?;
                    }
                    Ok(())
                },
            )?
        }
        Cmd::Set(a) => store(g, StoreMode::Set, a)?,
        Cmd::Add(a) => store(g, StoreMode::Add, a)?,
        Cmd::Replace(a) => store(g, StoreMode::Replace, a)?,
        Cmd::Append(a) => store(g, StoreMode::Append, a)?,
        Cmd::Prepend(a) => store(g, StoreMode::Prepend, a)?,
        Cmd::Gets { keys } => {
            let mut c = client(g)?;
            each_key(
                &keys,
                |k| c.gets(k),
                |_, item| {
                    write!(out, "{} ", item.cas.unwrap_or(0))?;
                    out.write_all(&item.value)?;
                    out.write_all(b"\n")
                },
            )?
        }
        Cmd::Exists { keys } => {
            let mut c = client(g)?;
            // Read and dropped: a get is the one check every protocol has.
            each_key(&keys, |k| Ok(c.get(k)?.map(drop)), |_, ()| Ok(()))?
        }
        Cmd::Dump {
            pattern,
            with_values,
        } => {
            // The crawler speaks text, whatever protocol the other commands use.
            let text = Global {
                protocol: Protocol::Text,
                ..g.clone()
            };
            per_server(&text, &mut out, |c, server, out| {
                let mut keys = Vec::new();
                c.dump_keys(server, |k, _| {
                    if pattern.as_deref().is_none_or(|p| glob(p.as_bytes(), k)) {
                        keys.push(k.to_vec());
                    }
                })?;
                for k in keys {
                    if !with_values {
                        out.write_all(&k)?;
                        out.write_all(b"\n")?;
                    } else if let Some(item) = c.get(&k)? {
                        out.write_all(&k)?;
                        out.write_all(b"\t")?;
                        out.write_all(&item.value)?;
                        out.write_all(b"\n")?;
                    }
                }
                Ok(())
            })?
        }
        Cmd::Capable => {
            let servers = server_list(servers_of(g, "127.0.0.1:11211"))?;
            if servers.len() != 1 {
                return Err("capable checks one server: give exactly one with --servers".into());
            }
            if !capable::run(&builder(g, "127.0.0.1:11211")?, &mut out)? {
                out.flush()?;
                return Err(Quiet.into());
            }
        }
        Cmd::Ping => per_server(g, &mut out, |c, server, out| {
            let t = Instant::now();
            c.version()?;
            writeln!(out, "{server}\t{} us", t.elapsed().as_micros())?;
            Ok(())
        })?,
        Cmd::Cas {
            key,
            cas,
            value,
            ttl,
            flags,
        } => {
            let value = match value {
                Some(v) if v != "-" => v.into_bytes(),
                _ => read_stdin()?,
            };
            let opts = SetOptions::default().ttl(ttl).flags(flags);
            match client(g)?.cas(key.as_bytes(), &value, cas, opts)? {
                mcstore::CasResult::Stored => {}
                mcstore::CasResult::Exists => {
                    return Err(format!("not stored: {key} changed since CAS {cas}").into())
                }
                mcstore::CasResult::NotFound => return Err(format!("not found: {key}").into()),
            }
        }
        Cmd::Cp {
            files,
            key,
            ttl,
            flags,
        } => {
            let mut c = client(g)?;
            let opts = SetOptions::default().ttl(ttl).flags(flags);
            for f in files {
                let (k, value) = if f.as_os_str() == "-" {
                    let k = key.clone().ok_or("cp -: give the key with --key")?;
                    (k, read_stdin()?)
                } else {
                    let name = f
                        .file_name()
                        .and_then(|n| n.to_str())
                        .ok_or_else(|| format!("{}: no file name to use as a key", f.display()))?
                        .to_string();
                    let v = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                    (name, v)
                };
                if !c.store(StoreMode::Set, k.as_bytes(), &value, opts)? {
                    return Err(format!("not stored: {k}").into());
                }
            }
        }
        Cmd::Delete { keys } => {
            let mut c = client(g)?;
            each_key(&keys, |k| Ok(c.delete(k)?.then_some(())), |_, ()| Ok(()))?
        }
        Cmd::Incr { key, delta } => arith(g, &key, delta, false, &mut out)?,
        Cmd::Decr { key, delta } => arith(g, &key, delta, true, &mut out)?,
        Cmd::Touch { key, ttl } => {
            if !client(g)?.touch(key.as_bytes(), ttl)? {
                return Err(format!("not found: {key}").into());
            }
        }
        Cmd::Flush { delay } => per_server(g, &mut out, |c, server, out| {
            c.flush_all(delay)?;
            writeln!(out, "{server}\tflushed")?;
            Ok(())
        })?,
        Cmd::Stats { arg } => per_server(g, &mut out, |c, server, out| {
            let mut stats = c.stats(arg.as_deref())?;
            let s = stats.pop().ok_or("no reply")?;
            if let Some(e) = s.error {
                return Err(e.into());
            }
            writeln!(out, "Server: {server}")?;
            for (name, value) in &s.stats {
                writeln!(out, "\t{name}: {value}")?;
            }
            Ok(())
        })?,
        Cmd::Version => per_server(g, &mut out, |c, server, out| {
            for (_, v) in c.version()? {
                writeln!(out, "{server}\t{v}")?;
            }
            Ok(())
        })?,
        Cmd::Ring => {
            let c = client(g)?;
            mapping::write_mapping(c.continuum(), c.servers(), io::stdin().lock(), &mut out)?;
        }
        Cmd::Store { root, master, op } => store_op(g, &root, master.as_deref(), op, &mut out)?,
        Cmd::Demo { resources, master } => demo(g, resources, &master)?,
        Cmd::Slap {
            workload,
            callers,
            ops,
            duration,
            rate,
            report_every,
            verify,
            keys,
            value_bytes,
            mode,
            runtime,
            client,
            io_mode,
        } => {
            let spec = slap::SlapSpec {
                workload,
                callers,
                ops,
                duration,
                rate,
                report_every,
                verify,
                keys,
                value_bytes,
                mode,
                runtime,
                client,
                io_mode,
            };
            let proto = match g.protocol {
                Protocol::Text => "text",
                Protocol::Binary => "binary",
                Protocol::Meta => "meta",
            };
            if slap::run(builder(g, "127.0.0.1:11211")?, &spec, proto)? {
                out.flush()?;
                return Err(Interrupted.into());
            }
        }
        Cmd::Bench {
            workload,
            binary,
            ops,
            keyspace,
            value_bytes,
            #[cfg(feature = "metrics")]
            metrics,
        } => {
            // Installed before the client is built: it registers its metrics then.
            #[cfg(feature = "metrics")]
            let collected = if metrics {
                Some(collect::Collected::install()?)
            } else {
                None
            };
            if binary && g.protocol == Protocol::Meta {
                return Err(
                    "bench: -b means --protocol binary, which --protocol meta contradicts".into(),
                );
            }
            let proto = if binary { Protocol::Binary } else { g.protocol };
            let g2 = Global {
                protocol: proto,
                ..g.clone()
            };
            let mut c = client(&g2)?;
            let dist = if c.servers().len() == 1 {
                "single"
            } else {
                g.distribution.name()
            };
            let spec = bench::Spec {
                workload,
                ops,
                keyspace,
                value_bytes,
            };
            let name = match proto {
                Protocol::Binary => "binary",
                Protocol::Meta => "meta",
                Protocol::Text => "text",
            };
            bench::run(&mut c, &spec, name, dist)?;
            #[cfg(feature = "metrics")]
            if let Some(collected) = collected {
                collected.print();
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// One rule for commands on several keys (which may live on several servers): each key's
/// output, in order; a missing key or a failed server named on stderr, the other keys still
/// done; exit 1 if any key was missing or failed. Errors writing the output end the command.
fn each_key<T>(
    keys: &[String],
    mut call: impl FnMut(&[u8]) -> mcstore::Result<Option<T>>,
    mut show: impl FnMut(&str, T) -> io::Result<()>,
) -> Res<()> {
    let mut failed = false;
    for k in keys {
        match call(k.as_bytes()) {
            Ok(Some(v)) => show(k, v)?,
            Ok(None) => {
                eprintln!("mcstore: not found: {k}");
                failed = true;
            }
            Err(e) => {
                eprintln!("mcstore: {k}: {e}{}", hint(&e));
                failed = true;
            }
        }
    }
    if failed {
        return Err(Quiet.into());
    }
    Ok(())
}

/// One rule for commands that go to every server: each server's output, in order; each
/// failed server named on stderr (the others' output still printed); exit 1 if any failed.
fn per_server(
    g: &Global,
    out: &mut dyn Write,
    mut each: impl FnMut(&mut Client, &str, &mut dyn Write) -> Res<()>,
) -> Res<()> {
    let servers = server_list(servers_of(g, "127.0.0.1:11211"))?;
    let mut failed = 0;
    for server in &servers {
        let one = Global {
            servers: Some(server.to_string()),
            ..g.clone()
        };
        let mut c = client(&one)?;
        let label = c.servers()[0].clone();
        let mut buf = Vec::new();
        match each(&mut c, &label, &mut buf) {
            Ok(()) => out.write_all(&buf)?,
            Err(e) => {
                eprintln!("mcstore: {label}: {e}{}", hint(&*e));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Quiet.into());
    }
    Ok(())
}

fn store(g: &Global, mode: StoreMode, a: StoreArgs) -> Res<()> {
    let value = match a.value {
        Some(v) if v != "-" => v.into_bytes(),
        _ => read_stdin()?,
    };
    let opts = SetOptions::default().ttl(a.ttl).flags(a.flags);
    if !client(g)?.store(mode, a.key.as_bytes(), &value, opts)? {
        let why = match mode {
            StoreMode::Add => " (add stores only if the key is absent, and it exists)",
            StoreMode::Replace | StoreMode::Append | StoreMode::Prepend => {
                " (this command needs an existing key, and there is none)"
            }
            StoreMode::Set => "",
        };
        return Err(format!("not stored: {}{why}", a.key).into());
    }
    Ok(())
}

fn arith(g: &Global, key: &str, delta: u64, decr: bool, out: &mut dyn Write) -> Res<()> {
    let mut c = client(g)?;
    let r = if decr {
        c.decr(key.as_bytes(), delta)?
    } else {
        c.incr(key.as_bytes(), delta)?
    };
    match r {
        Some(n) => {
            writeln!(out, "{n}")?;
            Ok(())
        }
        None => Err(format!("not found: {key}").into()),
    }
}

/// The storage behind `store`: the cache (short timeouts: a dead cache must not slow the CLI
/// much) in front of a file storage at `root`.
fn is_pg_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

fn open_store(g: &Global, root: &std::path::Path, master: Option<&str>) -> Res<MemcacheStorage> {
    let master: Arc<dyn Storage> = match master {
        None => Arc::new(FsStorage::open(root)?),
        Some(url) if is_pg_url(url) => Arc::new(mcstore::storage::PgStorage::builder(url).open()?),
        Some(other) => return Err(format!("--master {other:?}: expected a postgres:// URL").into()),
    };
    let b = builder(g, "127.0.0.1:11211")?
        .io_timeout(Duration::from_millis(g.timeout_ms.min(200)))
        .connect_timeout(Duration::from_millis(g.timeout_ms.min(200)));
    Ok(MemcacheStorage::new(b.build()?, master))
}

fn store_op(
    g: &Global,
    root: &std::path::Path,
    master: Option<&str>,
    op: StoreOp,
    out: &mut impl Write,
) -> Res<()> {
    // Only a write creates the folder storage: a read of a storage that is not there says so.
    if master.is_none() && !matches!(op, StoreOp::Put { .. }) && !root.exists() {
        return Err(format!(
            "no storage at {} (nothing stored there yet: `store put` creates it; or give --root)",
            root.display()
        )
        .into());
    }
    let s = open_store(g, root, master)?;
    match op {
        StoreOp::Put {
            collection,
            name,
            file,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            s.create_container(&collection)?;
            let mut input: Box<dyn Read + Send> = match file {
                Some(p) if p.as_os_str() != "-" => {
                    Box::new(std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?)
                }
                _ => Box::new(io::stdin()),
            };
            let content = Content::Reader(&mut input);
            if meta {
                s.put_meta_data(&info, content)?;
            } else {
                s.put_content(&info, content)?;
            }
        }
        StoreOp::Get {
            collection,
            name,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            let data = if meta {
                s.get_meta_data(&info)?
            } else {
                s.get_content(&info)?
            };
            out.write_all(&data)?;
        }
        StoreOp::Ls { collection, ext } => {
            for (name, _) in s.ls(&collection, ext.as_deref())? {
                writeln!(out, "{name}")?;
            }
        }
        StoreOp::Rm {
            collection,
            name,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            if meta {
                s.remove_meta_data(&info)?;
            } else {
                s.remove_content(&info)?;
            }
        }
        StoreOp::Exists { collection, name } => {
            if !s.exists(&s.info(&collection, Some(&name))?)? {
                return Err(Quiet.into());
            }
        }
        StoreOp::Info { collection, name } => {
            let info = s.info(&collection, name.as_deref())?;
            let fs = FsStorage::open(root)?.info(&collection, name.as_deref())?;
            writeln!(out, "collection\t{}", info.collection)?;
            if let Some(r) = &info.resource {
                writeln!(out, "resource\t{r}")?;
            }
            writeln!(out, "cache key\t{}", info.key)?;
            writeln!(out, "path\t{}", root.join(&fs.key).display())?;
        }
    }
    Ok(())
}

/// A memcached for the demo on a free loopback port, answering before it is used.
fn start_memcached() -> Option<(launcher::Local, String)> {
    let (local, addr) = launcher::start_tcp(64).ok()?;
    let mut c = Client::builder()
        .server(&addr)
        .io_timeout(Duration::from_millis(200))
        .build()
        .ok()?;
    let start = Instant::now();
    while c.version().is_err() {
        if start.elapsed() > launcher::READY_WITHIN {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((local, addr))
}

fn demo(g: &Global, n: usize, master_arg: &str) -> Res<()> {
    let mut _local = None;
    let servers = match &g.servers {
        Some(s) => s.clone(),
        None => match start_memcached() {
            Some((child, addr)) => {
                println!("started a local memcached on {addr}");
                _local = Some(child);
                addr
            }
            None => {
                println!(
                    "memcached is not installed (Debian: apt-get install -y memcached, or set \
                     MEMCACHED_BIN); running master-only"
                );
                String::new()
            }
        },
    };
    let dir = std::env::temp_dir().join(format!("mcstore-demo-{}", std::process::id()));
    let mut _pg = None;
    let (master, master_name): (Arc<dyn Storage>, String) = match master_arg {
        "fs" => (
            Arc::new(FsStorage::open(&dir)?),
            format!("file storage in {}", dir.display()),
        ),
        "postgres" => {
            let pg = pgcluster::Postgres::start();
            let url = pg.url();
            println!("started a local PostgreSQL on 127.0.0.1:{}", pg.port);
            _pg = Some(pg);
            let s = mcstore::storage::PgStorage::builder(&url).open()?;
            (Arc::new(s), format!("PostgreSQL at {url}"))
        }
        url if is_pg_url(url) => (
            Arc::new(mcstore::storage::PgStorage::builder(url).open()?),
            format!("PostgreSQL at {url}"),
        ),
        other => {
            return Err(format!("--master {other:?}: fs, postgres or a postgres:// URL").into())
        }
    };
    let cache = if servers.is_empty() {
        None
    } else {
        let g2 = Global {
            servers: Some(servers.clone()),
            ..g.clone()
        };
        let pool = Pool::new(builder(&g2, "")?, 4)?;
        Some(MemcacheStorage::new(pool, master.clone()))
    };
    let store: &dyn Storage = match &cache {
        Some(c) => c,
        None => master.as_ref(),
    };
    println!("master: {master_name}");
    println!(
        "cache:  {}",
        if servers.is_empty() { "none" } else { &servers }
    );

    store.create_container("articles")?;
    let mut contents = Vec::with_capacity(n);
    let write_start = Instant::now();
    for i in 0..n {
        let name = format!("article-{i:04}.html");
        let body = format!(
            "<h1>Article {i}</h1>{}",
            "lorem ipsum ".repeat(100 + (i * 37) % 1500)
        );
        let info = store.info("articles", Some(&name))?;
        store.put_content(&info, body.as_str().into())?;
        store.put_meta_data(
            &info,
            format!("<entry><title>Article {i}</title></entry>")
                .as_str()
                .into(),
        )?;
        contents.push((info, body));
    }
    println!(
        "stored {n} resources (content + metadata) in {:.0?}",
        write_start.elapsed()
    );

    let mut cached = Histogram::<u64>::new(3)?;
    let mut uncached = Histogram::<u64>::new(3)?;
    let mut direct = Histogram::<u64>::new(3)?;
    let passes = 4;
    for pass in 0..passes {
        for (info, body) in &contents {
            let before = cache.as_ref().map(|c| c.counters().hits);
            let t = Instant::now();
            let got = store.get_content(info)?;
            let us = t.elapsed().as_micros() as u64;
            if got != body.as_bytes() {
                return Err(format!("read back the wrong content for {:?}", info.resource).into());
            }
            let hit = matches!((before, cache.as_ref().map(|c| c.counters().hits)), (Some(a), Some(b)) if b > a);
            if hit {
                cached.record(us.max(1))?;
            } else {
                uncached.record(us.max(1))?;
            }
        }
        if pass == 0 {
            // Say what happened, not what should have: with the cache down, nothing filled.
            match cache.as_ref().map(|c| c.counters()) {
                Some(k) if k.fills > 0 => println!(
                    "pass 1 (cold): reads missed the cache and filled it ({} fills)",
                    k.fills
                ),
                Some(k) => println!(
                    "pass 1 (cold): nothing could be cached ({} cache errors): reads went to \
                     the master",
                    k.cache_errors
                ),
                None => {}
            }
        }
    }
    // The master on its own, for comparison.
    for (info, _) in &contents {
        let mi = master.info(&info.collection, info.resource.as_deref())?;
        let t = Instant::now();
        master.get_content(&mi)?;
        direct.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    let reads = (n * passes) as u64;
    println!("read {reads} times ({passes} passes over {n} resources), all content verified");
    if let Some(c) = &cache {
        let k = c.counters();
        println!(
            "cache: hits {} / misses {} (hit ratio {:.1}%), master reads {} (saved {}), fills {}, cache errors {}",
            k.hits,
            k.misses,
            100.0 * k.hits as f64 / reads as f64,
            k.master_reads,
            reads - k.master_reads,
            k.fills,
            k.cache_errors
        );
    }
    let show = |name: &str, h: &Histogram<u64>| {
        if h.is_empty() {
            println!("{name:<28} (none)");
        } else {
            println!(
                "{name:<28} n={:<6} p50={:>6} us  p99={:>6} us",
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            );
        }
    };
    show("reads served by the cache", &cached);
    show("reads served by the master", &uncached);
    if master_arg == "fs" {
        show("master alone (file reads)", &direct);
        println!(
            "(a local file read from the page cache beats any network round trip; the cache pays \
             off when the master is remote or slow)"
        );
    } else {
        show("master alone (PostgreSQL)", &direct);
        if !cached.is_empty() && !direct.is_empty() {
            println!(
                "cache vs PostgreSQL, p50: {:.2}x the latency",
                cached.value_at_quantile(0.5) as f64 / direct.value_at_quantile(0.5) as f64
            );
        }
    }
    if cache.is_some() {
        println!(
            "servers used: {}",
            servers.split(',').collect::<Vec<_>>().join(", ")
        );
    }
    if master_arg == "fs" {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
