//! `mcstore`: a memcached command-line client (like libmemcached's memcat, memcp, memrm,
//! memstat), a key-to-server mapper, a storage front end, and the demo.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{self, Read, Write};

use std::process::ExitCode;
use std::time::{Duration, Instant};

mod args;
mod bench;
mod capable;
#[cfg(feature = "metrics")]
mod collect;
mod demo;
mod mapping;
mod slap;
mod store;
// The memcached launcher and the throwaway PostgreSQL cluster (`demo --master postgres`),
// shared with the tests and benchmarks.
use args::{Cli, Cmd, Global, Protocol, StoreArgs};
use demo::demo;
use store::store_op;

use clap::Parser;
use mcstore::ring::Distribution;
use mcstore::{Client, ClientBuilder, SetOptions, StoreMode};

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

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
    builder_for(g, servers(g, default_servers)?)
}

/// The source of `--servers-file` or `--discover`, if one was given.
fn discovery(g: &Global) -> Res<Option<mcstore::Discovery>> {
    let source = match (&g.servers_file, &g.discover) {
        (Some(path), _) => mcstore::ServerSource::File(path.clone()),
        (None, Some(spec)) if spec.starts_with("dns:") || spec.starts_with("config:") => {
            spec.parse()?
        }
        (None, Some(spec)) => {
            return Err(
                format!("--discover {spec:?}: want dns:NAME:PORT or config:HOST:PORT").into(),
            )
        }
        (None, None) => return Ok(None),
    };
    let timeout = Duration::from_millis(g.timeout_ms);
    Ok(Some(mcstore::Discovery::new(source).timeout(timeout)))
}

/// The servers: from `--servers-file`, `--discover`, or `--servers` (or `default`).
fn servers(g: &Global, default: &str) -> Res<Vec<String>> {
    let Some(mut d) = discovery(g)? else {
        return server_list(servers_of(g, default));
    };
    let list = d
        .poll()?
        .expect("a first poll that succeeds gives its list");
    Ok(list.to_vec())
}

/// A client builder for `servers`, with every other global option.
fn builder_for(g: &Global, servers: Vec<String>) -> Res<ClientBuilder> {
    let mut b = Client::builder()
        .protocol(match g.protocol {
            Protocol::Text => mcstore::Protocol::Text,
            Protocol::Binary => mcstore::Protocol::Binary,
            Protocol::Meta => mcstore::Protocol::Meta,
        })
        .distribution(g.distribution())
        .io_timeout(Duration::from_millis(g.timeout_ms))
        .connect_timeout(Duration::from_millis(g.timeout_ms))
        .max_value_size(64 << 20);
    if let Some(h) = g.hash {
        b = b.hash(h);
    }
    b = with_zones(g, b, servers)?;
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
    if !(1..=mcstore::ring::MAX_REPLICAS).contains(&g.replicas) {
        return Err(format!("--replicas must be 1 to {}", mcstore::ring::MAX_REPLICAS).into());
    }
    b = b
        .replicas(g.replicas)
        .write_policy(match g.write_policy {
            args::WritePolicyArg::All => mcstore::WritePolicy::All,
            args::WritePolicyArg::Any => mcstore::WritePolicy::Any,
        })
        .replica_placement(match g.replica_placement {
            args::PlacementArg::Natural => mcstore::ring::ReplicaPlacement::Natural,
            args::PlacementArg::List => mcstore::ring::ReplicaPlacement::List,
        });
    if g.miss_failover {
        b = b.read_miss_failover(true);
    }
    if let Some(h) = g.hedge {
        if g.replicas < 2 && g.zone.len() < 2 {
            return Err("--hedge needs --replicas 2 or more, or two zones".into());
        }
        b = b.hedge(h);
    }
    Ok(b)
}

/// Every server: those of `--servers`, or of every `--zone`.
fn every_server(g: &Global) -> Res<Vec<String>> {
    if g.zone.is_empty() {
        return servers(g, "127.0.0.1:11211");
    }
    let mut all = Vec::new();
    for z in &g.zone {
        all.extend(server_list(z.split_once('=').map_or("", |(_, l)| l))?);
    }
    Ok(all)
}

/// `servers`, or the zones of `--zone NAME=SERVERS` (then `--servers` may not be given).
fn with_zones(g: &Global, b: ClientBuilder, servers: Vec<String>) -> Res<ClientBuilder> {
    if g.zone.is_empty() {
        if g.prefer_zone.is_some() || !g.write_only_zone.is_empty() {
            return Err("--prefer-zone and --write-only-zone need --zone".into());
        }
        return Ok(b.servers(servers));
    }
    if g.servers.as_deref().is_some_and(|s| !s.trim().is_empty()) {
        return Err("--servers and --zone: with zones, give every server in a zone".into());
    }
    let mut b = b;
    for z in &g.zone {
        let Some((name, list)) = z.split_once('=') else {
            return Err(format!("--zone {z:?}: expected NAME=SERVERS").into());
        };
        b = b.zone(name, server_list(list)?);
    }
    if let Some(p) = &g.prefer_zone {
        b = b.prefer_zone(p);
    }
    for w in &g.write_only_zone {
        b = b.write_only_zone(w);
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
            chunked,
            raw,
        } => {
            let mut c = client(g)?;
            let several = keys.len() > 1 || flags;
            each_key(
                &keys,
                |k| read_value(&mut c, k, chunked, raw),
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
            let servers = servers(g, "127.0.0.1:11211")?;
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
            // A chunked value's chunks go with it (one get more per key).
            each_key(
                &keys,
                |k| Ok(c.delete_chunked(k)?.then_some(())),
                |_, ()| Ok(()),
            )?
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
        Cmd::Ring {
            compare: None,
            generate: _,
        } => {
            let c = client(g)?;
            mapping::write_mapping(c.continuum(), c.servers(), io::stdin().lock(), &mut out)?;
        }
        Cmd::Ring {
            compare: Some(lists),
            generate,
        } => {
            // Building a client opens no connection: only the continuum is used.
            let old = builder_for(g, server_list(&lists[0])?)?.build()?;
            let new = builder_for(g, server_list(&lists[1])?)?.build()?;
            let moved = match generate {
                Some(n) => {
                    let keys = (0..n).map(|i| format!("key:{i}").into_bytes());
                    mapping::compare(&old, &new, keys.map(Ok))?
                }
                None => mapping::compare(&old, &new, mapping::lines(io::stdin().lock()))?,
            };
            writeln!(out, "{moved}")?;
        }
        Cmd::Store {
            root,
            master,
            compress,
            chunked,
            op,
        } => {
            let values = store::Values {
                compress,
                chunked_mib: chunked,
            };
            store_op(g, &root, master.as_deref(), &values, op, &mut out)?
        }
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
            conns,
            depth,
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
                conns,
                depth,
            };
            let proto = match g.protocol {
                Protocol::Text => "text",
                Protocol::Binary => "binary",
                Protocol::Meta => "meta",
            };
            let follow = discovery(g)?.map(|d| (d, Duration::from_millis(g.discover_every_ms)));
            if follow.is_some() && (g.replicas > 1 || !g.zone.is_empty()) {
                return Err(
                    "slap follows --servers-file or --discover with one copy per key and \
                     no zones only: a client with copies or zones does not follow list \
                     changes yet"
                        .into(),
                );
            }
            let mut b = builder(g, "127.0.0.1:11211")?;
            if follow.is_some() && g.distribution.is_none() {
                // It follows the list, which may change: a modula list cannot.
                b = b.distribution(Distribution::Ketama);
            }
            if slap::run(b, &spec, proto, follow)? {
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
                g.distribution().name()
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
    let servers = every_server(g)?;
    let mut failed = 0;
    for server in &servers {
        let one = Global {
            servers: Some(server.to_string()),
            zone: Vec::new(),
            prefer_zone: None,
            write_only_zone: Vec::new(),
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

/// Every bit of the codec layout (`mcstore::codec`'s flag table).
const CODEC_LAYOUT: u32 = {
    use mcstore::codec::flags::*;
    PICKLE | INT | LONG | ZLIB | TEXT | FORMAT_MASK | COMPRESSION_MASK | CHUNKED
};

/// A value as `get` prints it: read whole (chunks put together with `chunked`) and, unless
/// `raw`, decompressed as its flags say.
fn read_value(
    c: &mut Client,
    key: &[u8],
    chunked: bool,
    raw: bool,
) -> mcstore::Result<Option<mcstore::Item>> {
    let item = if chunked {
        let mut value = Vec::new();
        c.get_chunked(key, &mut value)?.map(|i| mcstore::Item {
            value,
            flags: i.flags,
            cas: None,
        })
    } else {
        c.get(key)?
    };
    let Some(mut item) = item else {
        return Ok(None);
    };
    // Only flags made of the codec layout's bits are read as saying how a value is stored:
    // other tools set flags freely (memccp --flag=42 sets bit 3 among others), and such a
    // value is printed as stored, as memccat prints it.
    let codec = item.flags & mcstore::codec::flags::CODEC_MASK;
    if codec & !CODEC_LAYOUT != 0 {
        return Ok(Some(item));
    }
    if !raw && item.flags & mcstore::codec::flags::CHUNKED != 0 {
        return Err(mcstore::Error::Codec(
            "the item is a chunked value's index: read it with get --chunked (or --raw)".into(),
        ));
    }
    let mut plain = Vec::new();
    if !raw
        && mcstore::codec::Compressor::default().decompress(&item.value, item.flags, &mut plain)?
    {
        item.value = plain;
    }
    Ok(Some(item))
}

fn store(g: &Global, mode: StoreMode, a: StoreArgs) -> Res<()> {
    let mut value = match a.value {
        Some(v) if v != "-" => v.into_bytes(),
        _ => read_stdin()?,
    };
    let mut flags = a.flags;
    // `get` reads these bits (decompresses, refuses an index): a value stored with them by
    // hand would not read back.
    let codec_bits = mcstore::codec::flags::ANY_COMPRESSION | mcstore::codec::flags::CHUNKED;
    if flags & codec_bits != 0 {
        return Err(format!(
            "--flags {flags:#x} use bits {codec_bits:#x}, which say how a value is compressed or \
             chunked (use --compress or --chunked)"
        )
        .into());
    }
    if let Some(algo) = a.compress {
        if matches!(mode, StoreMode::Append | StoreMode::Prepend) {
            return Err("--compress applies to set, add and replace (appending to compressed bytes would corrupt them)".into());
        }
        let limit = algo.compressor().max_decoded_len();
        if value.len() > limit {
            return Err(format!(
                "a value of {} bytes is not compressed: readers expand at most {limit} (max_decoded)",
                value.len()
            )
            .into());
        }
        let mut packed = Vec::new();
        flags |= algo.compressor().compress(&value, &mut packed)?;
        value = packed;
    }
    let opts = SetOptions::default().ttl(a.ttl).flags(flags);
    if a.chunked {
        if mode != StoreMode::Set {
            return Err("--chunked applies to set".into());
        }
        client(g)?.set_chunked(a.key.as_bytes(), &value, opts)?;
        return Ok(());
    }
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
