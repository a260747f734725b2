//! The command line: global options, commands and their arguments (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mcstore::ring::{Distribution, HashFn};

use crate::{slap, Res};

#[derive(Parser)]
#[command(
    name = "mcstore",
    version,
    about = "memcached client and cache-through storage"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Args, Clone)]
pub(crate) struct Global {
    /// Servers, separated by commas or spaces: host[:port[:weight]], [ipv6]:port[:weight] or a
    /// Unix socket path; libmemcached's `--SERVER=host:port` form too [default: 127.0.0.1:11211].
    #[arg(
        long,
        short = 's',
        env = "MEMCACHED_SERVERS",
        global = true,
        allow_hyphen_values = true
    )]
    pub(crate) servers: Option<String>,
    /// Read the servers from FILE instead (separated by commas, spaces or lines; `#` starts
    /// a comment).
    #[arg(long, value_name = "FILE", global = true, conflicts_with_all = ["servers", "discover"])]
    pub(crate) servers_file: Option<std::path::PathBuf>,
    /// Discover the servers instead: dns:NAME:PORT (every address of NAME, e.g. a Kubernetes
    /// headless service) or config:HOST:PORT (an ElastiCache or Memorystore configuration
    /// endpoint, asked `config get cluster`).
    #[arg(long, value_name = "SOURCE", global = true, conflicts_with = "servers")]
    pub(crate) discover: Option<String>,
    /// Wire protocol.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub(crate) protocol: Protocol,
    /// User to authenticate as, with --password or MEMCACHED_PASSWORD: SASL PLAIN over the
    /// binary protocol (memcached -S), ASCII authentication over text and meta (memcached -Y).
    #[arg(long, env = "MEMCACHED_USER", global = true)]
    pub(crate) user: Option<String>,
    /// Password for --user.
    #[arg(
        long,
        env = "MEMCACHED_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub(crate) password: Option<String>,
    /// Key distribution: modula, ketama or ketama_weighted [default: modula; ketama for
    /// `slap` with --servers-file or --discover, which follows a list that may change].
    #[arg(long, value_parser = parse_distribution, global = true)]
    pub(crate) distribution: Option<Distribution>,
    /// How often `slap` reads --servers-file or asks --discover again, following the list
    /// while it runs (other commands read it once), in milliseconds.
    #[arg(long, default_value_t = 1000, global = true)]
    pub(crate) discover_every_ms: u64,
    /// Key hash (one_at_a_time, md5, crc, fnv1_64, fnv1a_64, fnv1_32, fnv1a_32, hsieh,
    /// murmur, jenkins, murmur3); default: libmemcached's choice for the distribution.
    #[arg(long, value_parser = parse_hash, global = true)]
    pub(crate) hash: Option<HashFn>,
    /// I/O timeout in milliseconds.
    #[arg(long, default_value_t = 1000, global = true)]
    pub(crate) timeout_ms: u64,
    /// Speak TLS to the servers (trusting the system's roots unless --tls-ca is given).
    #[arg(long, global = true)]
    pub(crate) tls: bool,
    /// Trust the CA certificates in this PEM file (implies --tls).
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, with --tls-key (implies --tls).
    #[arg(long, value_name = "FILE", global = true, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// The name to verify in the servers' certificates (default: each server's host).
    #[arg(long, value_name = "NAME", global = true)]
    pub(crate) tls_server_name: Option<String>,
    /// Never resume TLS sessions: every connection does a full handshake (to measure it).
    #[arg(long, global = true)]
    pub(crate) tls_no_resumption: bool,
    /// Keep every key on N servers (1-4): writes go to every copy, reads fail over to the
    /// next copy within the call.
    #[arg(long, default_value_t = 1, value_name = "N", global = true)]
    pub(crate) replicas: usize,
    /// With --replicas: send a read to a second copy too when the first has not answered
    /// after this long: pNN (a percentile of that server's recent latency, e.g. p95) or
    /// milliseconds (e.g. 5ms). At most 5% more requests.
    #[arg(long, value_name = "pNN|MS", value_parser = parse_hedge, global = true)]
    pub(crate) hedge: Option<mcstore::Hedge>,
    /// With --replicas: what a write waits for: every copy (all) or the first (any).
    #[arg(long, value_enum, default_value = "all", global = true)]
    pub(crate) write_policy: WritePolicyArg,
    /// With --replicas: where copies live: natural (the next servers on the continuum, or in
    /// the list under modula) or list (the next servers in the list, as libmemcached).
    #[arg(long, value_enum, default_value = "natural", global = true)]
    pub(crate) replica_placement: PlacementArg,
    /// With --replicas or zones: a read that misses on a copy asks the next copy too (for a
    /// copy warming up).
    #[arg(long, global = true)]
    pub(crate) miss_failover: bool,
    /// A zone: NAME=SERVERS (servers as for --servers), repeatable. Each zone has its own
    /// continuum and a copy of every key (--replicas copies); writes go to every zone,
    /// reads to --prefer-zone first. With zones, every server is given in one.
    #[arg(long, value_name = "NAME=SERVERS", global = true)]
    pub(crate) zone: Vec<String>,
    /// With --zone: the zone reads go to first [default: the first zone].
    #[arg(long, value_name = "NAME", global = true)]
    pub(crate) prefer_zone: Option<String>,
    /// With --zone: a zone written to and never read from (warming up), repeatable.
    #[arg(long, value_name = "NAME", global = true)]
    pub(crate) write_only_zone: Vec<String>,
}

/// `--write-policy`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum WritePolicyArg {
    All,
    Any,
}

/// `--replica-placement`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PlacementArg {
    Natural,
    List,
}

pub(crate) fn parse_hedge(s: &str) -> Result<mcstore::Hedge, String> {
    s.parse()
}

impl Global {
    /// The key distribution: as given, else modula (libmemcached's default; `slap`
    /// following a list that may change takes ketama: a modula list cannot change).
    pub(crate) fn distribution(&self) -> Distribution {
        self.distribution.unwrap_or(Distribution::Modula)
    }
    /// The TLS settings asked for, if any (files are read here: a bad one is named).
    pub(crate) fn tls(&self) -> Res<Option<mcstore::TlsConfig>> {
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
pub(crate) enum Protocol {
    Text,
    Binary,
    Meta,
}

pub(crate) fn parse_distribution(s: &str) -> Result<Distribution, String> {
    Distribution::from_name(s).ok_or_else(|| format!("unknown distribution {s:?}"))
}

pub(crate) fn parse_hash(s: &str) -> Result<HashFn, String> {
    HashFn::from_name(s).ok_or_else(|| format!("unknown hash {s:?}"))
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
        /// Read values stored with `set --chunked` (over the item size: an index and its
        /// chunks); a value stored plainly is read as it is.
        #[arg(long)]
        chunked: bool,
        /// Print values as stored: no decompression (by default a value whose flags say
        /// compressed, by mcstore or a Python client's zlib, is decompressed).
        #[arg(long)]
        raw: bool,
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
    /// Delete keys, and the chunks of a value stored with `set --chunked` (exit 1 if any did
    /// not exist).
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
    /// Read keys from stdin (one per line, raw bytes) and print `key<TAB>server`; with
    /// --compare, the share of the keys a change of server list would move instead.
    Ring {
        /// Compare two server lists (same forms as --servers; --distribution and --hash
        /// apply to both): print the keys read, how many would go to another server, and the
        /// fraction moved beside the ideal for one change (1/N of the larger list).
        #[arg(long, num_args = 2, value_names = ["OLD_SERVERS", "NEW_SERVERS"])]
        compare: Option<Vec<String>>,
        /// With --compare: instead of reading stdin, use N generated keys (`key:0` ...).
        #[arg(long, value_name = "N", requires = "compare")]
        generate: Option<u64>,
    },
    /// Resources in a cache-through storage (memcached in front of a folder).
    Store {
        /// Master storage folder.
        #[arg(long, default_value = "./mcstore-data")]
        root: PathBuf,
        /// A PostgreSQL master instead of the folder: postgres://user@host:port/db.
        #[arg(long, value_name = "URL")]
        master: Option<String>,
        /// Compress cached content (at least 1 KiB) with this algorithm.
        #[arg(long, value_enum)]
        compress: Option<Compress>,
        /// Cache content over the item size as chunks (up to this many MiB) instead of
        /// reading it from the master every time.
        #[arg(long, value_name = "MIB")]
        chunked: Option<usize>,
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
        /// get, set, mix (nine gets to one set) or mixall (get, set, delete, touch and incr
        /// in turn; incr on a counter per key, `ctr:<i>`)
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
        /// Connections per server of the shared client (rounds in flight per server).
        #[arg(long, default_value_t = 1, value_name = "N")]
        conns: usize,
        /// Rounds in flight at once on one connection of the shared client (1: one round
        /// at a time).
        #[arg(long, default_value_t = mcstore::DEFAULT_PIPELINE_DEPTH, value_name = "N")]
        depth: usize,
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
pub(crate) struct StoreArgs {
    pub(crate) key: String,
    pub(crate) value: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub(crate) ttl: u32,
    #[arg(long, default_value_t = 0)]
    pub(crate) flags: u32,
    /// Compress the value (set, add, replace); its flags say how, and `get` decompresses it.
    #[arg(long, value_enum)]
    pub(crate) compress: Option<Compress>,
    /// Store a value of any size (set only): over the servers' item size, as chunks and an
    /// index written last (read it with `get --chunked`).
    #[arg(long)]
    pub(crate) chunked: bool,
}

/// The algorithms `--compress` offers.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Compress {
    /// lz4: the fastest.
    Lz4,
    /// zstd, level 3: smaller.
    Zstd,
    /// zlib, level 6: what Python's memcached clients read (flag 8).
    Zlib,
}

impl Compress {
    /// The compressor for it: every value compressed (no minimum size) if that makes it smaller.
    pub(crate) fn compressor(self) -> mcstore::codec::Compressor {
        use mcstore::codec::{Compression, Compressor};
        let algo = match self {
            Compress::Lz4 => Compression::Lz4,
            Compress::Zstd => Compression::Zstd { level: 3 },
            Compress::Zlib => Compression::Zlib { level: 6 },
        };
        Compressor::new(algo).min_size(0)
    }
}

#[derive(Subcommand)]
pub(crate) enum StoreOp {
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
