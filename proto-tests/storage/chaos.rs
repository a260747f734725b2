//! #16's chaos test: several processes share three memcached servers and one `FsStorage`
//! master through `MemcacheStorage`. Writer processes put increasing versions of their own
//! resources; reader processes read every resource; meanwhile the parent freezes (SIGSTOP)
//! and resumes servers, restarts them (which ejects and rejoins them in the clients), and
//! SIGKILLs writers (and starts them again). The check: a read that started after `put(vN)`
//! returned sees a version >= N. It prints one line:
//! `CHAOS master=M processes=P reads=R writes=W faults=F stale=S failed=X refused=Y replicas=N`.
//!
//! With copies too (#27): `chaos_replicas` runs the file master's test with cache clients
//! built with `replicas(2)` (each key on two of the three servers: reads fail over between
//! them, writes delete both), after `chaos` (one at a time: each is a 6 s run).
//!
//! Faults of the master too (#25): with PostgreSQL, the whole cluster frozen (SIGSTOP), the
//! outbox listeners' sessions cut, and 250 ms of latency on one reader's link (it reaches
//! PostgreSQL through an in-test proxy); with the file master, its invalidation journal
//! made unusable (a file swapped in for its folder). While the master is frozen or its
//! journal unusable, calls may fail: such failures are counted as `refused`, the others
//! as `failed`. The parent marks those windows (from the fault until its effects are over:
//! a frozen master's last timeouts and the second of fast failures after them) in a file
//! the children read around each call; a call that overlapped one may be refused.
//!
//! With a server list that changes (#28): `chaos_membership` gives the children five
//! memcached servers and a servers file that names two to four of them. Each child's
//! storage follows the file (`follow_list`, re-read every 50 ms by writers and every 250 ms
//! by readers, so processes take each change at different moments), and the parent rewrites
//! it while the other faults run: it removes a server (which keeps running, with its items),
//! adds one (often one that left earlier, with the items it had), or both at once. Keys
//! move away and back, and servers come back with entries a write superseded: reads must
//! still never be stale. Its line ends with `list_changes=N`.
//!
//! A 6 s run is part of the suite (12 s for `chaos_membership`); `cargo test --release --test chaos -- --nocapture` prints
//! the lines.
//!
//! `CHAOS_SECONDS` sets the run's length (default 6; `CHAOS_SECONDS=300` for the long run);
//! `CHAOS_FAULTS` limits the faults to some of `0` (freeze a memcached), `1` (restart one),
//! `2` (kill a writer), `3` (freeze PostgreSQL), `4` (cut the listeners), `5` (slow link),
//! `6` (journal unusable), `7` (change the server list; `chaos_membership` only),
//! comma-separated (those that do not apply to a master are
//! skipped); `CHAOS_TRACE=1` prints every fault, every put that returned, the moment each
//! child takes a new list (`TAKE`), and with each stale read the reader's list and what every
//! server holds for that resource (stale reads are always printed).

use mcstore_test_support as support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mcstore::storage::{FsStorage, MemcacheStorage, Storage};
use mcstore::{Client, Discovery, Following, Pool, ServerSource};
use support::{Memcached, Rng, TempDir};

/// Resources per writer (more with a changing list, so that keys move), and writers.
const PER_WRITER: usize = 3;
const PER_WRITER_MEMBERSHIP: usize = 12;
const WRITERS: usize = 2;

/// How far apart the children may take a change of the servers file (the storage's
/// `follow_list`): their polls (250 ms at most) and a loaded machine's delays, with margin.
const SKEW: Duration = Duration::from_millis(1000);
const READERS: usize = 2;

fn seconds() -> u64 {
    std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
}

/// The client-side deadline of the children's PostgreSQL calls: well above the slow link's
/// round trip (500 ms) and a loaded machine's slowest statements, below the longest freezes.
#[cfg(feature = "postgres")]
const PG_CALL_TIMEOUT: Duration = Duration::from_millis(3000);

/// The shared master: a folder, or a PostgreSQL database when `master` is a postgres:// URL.
/// Retried while the master is unreachable (a child may start during a fault).
fn master_storage(master: &str) -> Arc<dyn Storage> {
    let start = std::time::Instant::now();
    loop {
        match open_master(master) {
            Ok(s) => return s,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("opening the master: {e}"),
        }
    }
}

fn open_master(master: &str) -> mcstore::storage::Result<Arc<dyn Storage>> {
    #[cfg(feature = "postgres")]
    if master.starts_with("postgres://") {
        return Ok(Arc::new(
            mcstore::storage::PgStorage::builder(master)
                .pool_size(3)
                .call_timeout(PG_CALL_TIMEOUT)
                .connect_timeout(PG_CALL_TIMEOUT)
                .open()?,
        ));
    }
    Ok(Arc::new(FsStorage::open(master)?))
}

/// The master-fault window counter: odd while a master fault is in effect.
fn master_faults(state: &Path) -> u64 {
    std::fs::read_to_string(state.join("master-faults"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn set_master_faults(state: &Path, n: u64) {
    let tmp = state.join("master-faults.tmp");
    std::fs::write(&tmp, n.to_string()).unwrap();
    std::fs::rename(&tmp, state.join("master-faults")).unwrap();
}

/// Whether a call that ran between counter readings `before` and `after` overlapped a
/// master fault (and so may be refused).
fn overlapped(before: u64, after: u64) -> bool {
    before != after || before % 2 == 1
}

/// A child's storage: over `servers`, or over the servers in `file`, following it (re-read
/// every `every`; the returned handle stops that when dropped).
fn storage(
    master: &str,
    servers: &str,
    replicas: usize,
    file: Option<(&Path, Duration)>,
    chunked: bool,
) -> (MemcacheStorage, Option<Following>, mcstore::ServerList) {
    let servers = match file {
        Some((f, _)) => std::fs::read_to_string(f).unwrap().trim().to_string(),
        None => servers.to_string(),
    };
    let builder = Client::builder()
        .servers(servers.split(','))
        .distribution(mcstore::ring::Distribution::Ketama)
        .remove_failed_servers(true)
        .server_failure_limit(2)
        .retry_timeout(Duration::from_millis(300))
        .io_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .replicas(replicas);
    let pool = Pool::new(builder, 2).unwrap();
    let list = pool.server_list().clone();
    let Some((file, every)) = file else {
        let mut b = MemcacheStorage::builder(pool, master_storage(master));
        if chunked {
            // Content (4 KB, hardly compressible) over 1,000 bytes: cached as 4-5 chunks.
            b = b.max_item_size(1000).chunked_values(1 << 20);
            #[cfg(feature = "lz4")]
            {
                use mcstore::codec::{Compression, Compressor};
                b = b.compression(Compressor::new(Compression::Lz4));
            }
        }
        return (b.build(), None, list);
    };
    let s = MemcacheStorage::builder(pool, master_storage(master))
        .follow_list(SKEW)
        .build();
    let following = Discovery::new(ServerSource::File(file.to_path_buf()))
        .follow(list.clone(), every)
        .unwrap();
    (s, Some(following), list)
}

fn resource(i: usize) -> String {
    format!("r{i}")
}

/// The last version whose put returned, as the writer published it (0: none yet).
fn published(state: &Path, i: usize) -> u64 {
    std::fs::read_to_string(state.join(resource(i)))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn version(content: &[u8]) -> u64 {
    let parsed = std::str::from_utf8(content).ok().and_then(|s| {
        let s = s.strip_prefix('v')?;
        // Chunked runs pad the version (`v12;` and filler that is checked too).
        match s.split_once(';') {
            Some((v, pad)) => {
                let v = v.parse().ok()?;
                (pad.as_bytes() == padding(v).as_slice()).then_some(v)
            }
            None => s.parse().ok(),
        }
    });
    parsed.unwrap_or_else(|| {
        panic!(
            "unexpected content {:?}",
            content.escape_ascii().to_string()
        )
    })
}

/// Version `v`'s content: `v12`, or in a chunked run `v12;` and 4 KB of filler that
/// depends on the version (so that a mix of two versions' chunks is caught).
fn content(v: u64, chunked: bool) -> String {
    match chunked {
        false => format!("v{v}"),
        true => format!("v{v};{}", String::from_utf8(padding(v)).unwrap()),
    }
}

/// Pseudo-random letters from `v` (lz4 cannot shrink them below the chunk size).
fn padding(v: u64) -> Vec<u8> {
    let mut x = v.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// A writer or reader process (run by `chaos` through the environment).
#[test]
#[ignore = "run by chaos as a child process"]
fn chaos_child() {
    let (Ok(role), Ok(master), Ok(state), Ok(servers), Ok(until), Ok(replicas), Ok(per)) = (
        std::env::var("CHAOS_ROLE"),
        std::env::var("CHAOS_MASTER"),
        std::env::var("CHAOS_STATE"),
        std::env::var("CHAOS_SERVERS"),
        std::env::var("CHAOS_UNTIL_MS"),
        std::env::var("CHAOS_REPLICAS"),
        std::env::var("CHAOS_PER_WRITER"),
    ) else {
        return;
    };
    let per_writer: usize = per.parse().unwrap();
    let file = std::env::var_os("CHAOS_SERVERS_FILE").map(PathBuf::from);
    // Writers take a change sooner than readers.
    let every = match role.starts_with("writer") {
        true => Duration::from_millis(50),
        false => Duration::from_millis(250),
    };
    let state = PathBuf::from(state);
    let until = Duration::from_millis(until.parse().unwrap());
    let epoch = std::time::UNIX_EPOCH;
    let chunked = std::env::var_os("CHAOS_CHUNKED").is_some();
    let (s, _following, list) = storage(
        &master,
        &servers,
        replicas.parse().unwrap(),
        file.as_deref().map(|f| (f, every)),
        chunked,
    );
    let trace = std::env::var_os("CHAOS_TRACE").is_some();
    let mut seen = 0u64;
    let (mut ops, mut stale, mut failed, mut refused) = (0u64, 0u64, 0u64, 0u64);
    if let Some(w) = role.strip_prefix("writer") {
        let w: usize = w.parse().unwrap();
        let mine: Vec<usize> = (w * per_writer..(w + 1) * per_writer).collect();
        // Continue from what the master has (a killed writer's last put may have landed).
        let fs = master_storage(&master);
        let mut next: Vec<u64> = mine
            .iter()
            .map(|&i| {
                let info = fs.info("c", Some(&resource(i))).unwrap();
                // Retried through a master fault.
                loop {
                    match fs.get_content(&info) {
                        Ok(c) => break version(&c) + 1,
                        Err(mcstore::storage::StorageError::NotFound(_)) => break 1,
                        Err(_) => thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .collect();
        while epoch.elapsed().unwrap() < until {
            for (k, &i) in mine.iter().enumerate() {
                let info = s.info("c", Some(&resource(i))).unwrap();
                let v = next[k];
                if trace {
                    trace_list(&role, &list, &mut seen);
                }
                let started = epoch.elapsed().unwrap().as_millis();
                let before = master_faults(&state);
                let r = s.put_content(&info, content(v, chunked).as_str().into());
                let after = master_faults(&state);
                match r {
                    Ok(()) => {
                        if trace {
                            eprintln!(
                                "PUT {} v{v} {started}..{} ms",
                                resource(i),
                                epoch.elapsed().unwrap().as_millis()
                            );
                        }
                        let tmp = state.join(format!("{}.tmp", resource(i)));
                        std::fs::write(&tmp, v.to_string()).unwrap();
                        std::fs::rename(&tmp, state.join(resource(i))).unwrap();
                        ops += 1;
                        // In a chunked run writers read back too, so that a writer killed
                        // may die in a fill, between its chunks and its index.
                        if chunked {
                            match s.get_content(&info) {
                                Ok(c) if version(&c) < v => {
                                    stale += 1;
                                    eprintln!(
                                        "STALE read-back {} v{} after v{v}",
                                        resource(i),
                                        version(&c)
                                    );
                                }
                                Ok(_) => {}
                                Err(_) if overlapped(before, master_faults(&state)) => refused += 1,
                                Err(e) => {
                                    eprintln!("FAILED read-back {}: {e}", resource(i));
                                    failed += 1;
                                }
                            }
                        }
                    }
                    Err(_) if overlapped(before, after) => refused += 1,
                    Err(e) => {
                        eprintln!("FAILED put {} v{v}: {e}", resource(i));
                        failed += 1;
                    }
                }
                next[k] = v + 1;
            }
        }
    } else {
        let n = WRITERS * per_writer;
        while epoch.elapsed().unwrap() < until {
            for i in 0..n {
                let min = published(&state, i);
                if trace {
                    trace_list(&role, &list, &mut seen);
                }
                let info = s.info("c", Some(&resource(i))).unwrap();
                let before = master_faults(&state);
                let r = s.get_content(&info);
                let after = master_faults(&state);
                match r {
                    Ok(c) if version(&c) < min => {
                        stale += 1;
                        // What a failing run needs to find the race.
                        eprintln!(
                            "STALE at {} ms: {} read v{} after v{min} was published",
                            epoch.elapsed().unwrap().as_millis(),
                            resource(i),
                            version(&c)
                        );
                        if trace {
                            eprintln!(
                                "  pid {} gen {} {:?}; entries: {}",
                                std::process::id(),
                                list.generation(),
                                list.servers(),
                                entries(&servers, i)
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(_) if overlapped(before, after) => refused += 1,
                    Err(e) => {
                        eprintln!("FAILED get {}: {e}", resource(i));
                        failed += 1;
                    }
                }
                ops += 1;
            }
        }
    }
    let c = s.counters();
    println!(
        "RESULT ops={ops} stale={stale} failed={failed} refused={refused} chunked_hits={} chunked_fills={}",
        c.chunked_hits, c.chunked_fills
    );
}

/// With `CHAOS_TRACE`: the moment a child takes a new server list.
fn trace_list(role: &str, list: &mcstore::ServerList, seen: &mut u64) {
    let g = list.generation();
    if g != *seen {
        *seen = g;
        eprintln!(
            "TAKE {role} pid {} gen {g} at {} ms: {:?}",
            std::process::id(),
            std::time::UNIX_EPOCH.elapsed().unwrap().as_millis(),
            list.servers()
        );
    }
}

/// With `CHAOS_TRACE`: what each server holds for resource `i`'s content entry.
fn entries(servers: &str, i: usize) -> String {
    let key = mcstore::storage::KeyGenerator::default().key("c", Some(&resource(i))) + ":c";
    let held: Vec<String> = (servers.split(','))
        .map(|addr| {
            let c = Client::builder()
                .servers([addr])
                .io_timeout(Duration::from_millis(200))
                .connect_timeout(Duration::from_millis(200))
                .build();
            match c.and_then(|mut c| c.get(key.as_bytes())) {
                Ok(Some(item)) => format!(
                    "{addr}={}/{:#x}",
                    String::from_utf8_lossy(&item.value[..item.value.len().min(12)]),
                    item.flags
                ),
                Ok(None) => format!("{addr}=-"),
                Err(e) => format!("{addr}=({e})"),
            }
        })
        .collect();
    held.join(" ")
}

/// What the children of one run share.
struct Run<'a> {
    state: &'a Path,
    servers: &'a str,
    until_ms: u128,
    replicas: usize,
    per_writer: usize,
    /// The servers file the children follow, with a changing list.
    servers_file: Option<&'a Path>,
    /// Content over the item size, compressed and cached as chunks.
    chunked: bool,
}

fn spawn(role: &str, master: &str, run: &Run<'_>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    if let Some(f) = run.servers_file {
        cmd.env("CHAOS_SERVERS_FILE", f);
    }
    if run.chunked {
        cmd.env("CHAOS_CHUNKED", "1");
    }
    cmd.args([
        "--exact",
        "chaos_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("CHAOS_ROLE", role)
    .env("CHAOS_MASTER", master)
    .env("CHAOS_STATE", run.state)
    .env("CHAOS_SERVERS", run.servers)
    .env("CHAOS_UNTIL_MS", run.until_ms.to_string())
    .env("CHAOS_REPLICAS", run.replicas.to_string())
    .env("CHAOS_PER_WRITER", run.per_writer.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap()
}

/// A child's `(ops, stale, failed, refused)`.
type Counts = (u64, u64, u64, u64);

/// `(ops, stale, failed, refused)` from a child's last line; `None` if it was killed.
fn result(child: Child) -> Option<Counts> {
    result_with_chunks(child).map(|(r, _)| r)
}

/// [`result`] and the child's `(chunked_hits, chunked_fills)`.
fn result_with_chunks(child: Child) -> Option<(Counts, (u64, u64))> {
    let out = child.wait_with_output().unwrap();
    // The harness prints the test's name on the same line first.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|at| l[at..].to_string()))?;
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap()
            .parse()
            .unwrap()
    };
    Some((
        (
            field("ops"),
            field("stale"),
            field("failed"),
            field("refused"),
        ),
        (field("chunked_hits"), field("chunked_fills")),
    ))
}

/// `chaos` and `chaos_replicas` run one at a time: together they would share the machine's
/// cores, and each run's reads and timeouts are sized for it alone.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn chaos() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 10_000, 1, false, false);
}

/// The same with a server list that changes (#28; see the module docs).
#[test]
fn chaos_membership() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 10_000, 1, true, false);
}

/// The same with content over the item size, compressed (lz4) and cached as chunks (#30):
/// writers read back what they wrote, so that the writers killed die in fills too, between
/// a fill's chunks and its index.
#[cfg(feature = "lz4")]
#[test]
fn chaos_chunked() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 2_000, 1, false, true);
}

/// The same with two copies of each key (#27).
#[test]
fn chaos_replicas() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 10_000, 2, false, false);
}

/// The same with a PostgreSQL master (#17): the outbox replaces the journal folder.
#[cfg(feature = "postgres")]
#[test]
fn chaos_postgres() {
    let pg = support::postgres::Postgres::start();
    let proxy = support::proxy::Proxy::start(pg.port);
    // Fewer reads: those a write makes miss go to PostgreSQL over a socket, not to a file.
    run(
        &Master::Pg {
            pg: &pg,
            proxy: &proxy,
        },
        1_000,
        1,
        false,
        false,
    );
}

/// The master under test, with what its faults need.
enum Master<'a> {
    Fs(PathBuf),
    #[cfg(feature = "postgres")]
    Pg {
        pg: &'a support::postgres::Postgres,
        /// Reader 0 reaches PostgreSQL through it: the slow link.
        proxy: &'a support::proxy::Proxy,
    },
    #[cfg(not(feature = "postgres"))]
    _Never(std::marker::PhantomData<&'a ()>),
}

impl Master<'_> {
    /// What the children open (`reader0`: through the proxy).
    fn url(&self, reader0: bool) -> String {
        // Only a PostgreSQL master has a proxy for reader 0.
        let _ = reader0;
        match self {
            Master::Fs(p) => p.to_str().unwrap().to_string(),
            #[cfg(feature = "postgres")]
            Master::Pg { pg, proxy } if reader0 => {
                let _ = pg;
                format!("postgres://mcstore@127.0.0.1:{}/postgres", proxy.port)
            }
            #[cfg(feature = "postgres")]
            Master::Pg { pg, .. } => pg.url(),
            #[cfg(not(feature = "postgres"))]
            Master::_Never(_) => unreachable!(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Master::Fs(_) => "fs",
            #[cfg(feature = "postgres")]
            Master::Pg { .. } => "postgres",
            #[cfg(not(feature = "postgres"))]
            Master::_Never(_) => unreachable!(),
        }
    }

    /// The fault kinds that apply (see the module docs).
    fn kinds(&self) -> &'static [u64] {
        match self {
            Master::Fs(_) => &[0, 1, 2, 6, 7],
            #[cfg(feature = "postgres")]
            Master::Pg { .. } => &[0, 1, 2, 3, 4, 5],
            #[cfg(not(feature = "postgres"))]
            Master::_Never(_) => unreachable!(),
        }
    }
}

/// Swaps two paths atomically (`renameat2(RENAME_EXCHANGE)`): the journal folder and a
/// plain file, so that no writer can recreate the folder in between.
fn exchange(a: &Path, b: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap();
    let b = std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap();
    // SAFETY: two valid NUL-terminated paths, resolved against the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
}

/// Rewrites the servers file with `members` (indexes into `servers`), atomically.
fn write_list(file: &Path, servers: &[Memcached], members: &[usize]) {
    let list: Vec<String> = members.iter().map(|&i| servers[i].addr()).collect();
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, list.join(",")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// A membership change: a member removed, a server added (mostly one that left, with the
/// items it had), or both at once; two to four members. `left`: servers that were members.
fn change_members(members: &mut Vec<usize>, left: &mut Vec<usize>, all: usize, rng: &mut Rng) {
    let remove = members.len() > 2 && (members.len() == 4 || rng.below(2) == 0);
    let both = rng.below(4) == 0;
    let out: Vec<usize> = (0..all).filter(|i| !members.contains(i)).collect();
    if !remove || both {
        let back: Vec<usize> = out.iter().copied().filter(|i| left.contains(i)).collect();
        let pick = match back.is_empty() || rng.below(4) == 0 {
            true => out[rng.below(out.len() as u64) as usize],
            false => back[rng.below(back.len() as u64) as usize],
        };
        members.push(pick);
    }
    if remove || both {
        let gone = members.remove(rng.below(members.len() as u64 - 1) as usize);
        left.push(gone);
    }
}

/// Runs the processes and faults against `master`, with `replicas` copies of each key (and
/// with `membership`, a list that changes: see the module docs); at least `min_reads` reads
/// must happen.
fn run(master: &Master<'_>, min_reads: u64, replicas: usize, membership: bool, chunked: bool) {
    let state = TempDir::new("mcstore-chaos-state");
    let count = if membership { 5 } else { 3 };
    let mut servers: Vec<Memcached> = (0..count).map(|_| Memcached::start()).collect();
    let list = servers
        .iter()
        .map(Memcached::addr)
        .collect::<Vec<_>>()
        .join(",");
    let mut members: Vec<usize> = vec![0, 1, 2];
    let mut left: Vec<usize> = Vec::new();
    let servers_file = state.path.join("servers");
    let (file, per_writer) = match membership {
        true => {
            write_list(&servers_file, &servers, &members);
            (Some(servers_file.as_path()), PER_WRITER_MEMBERSHIP)
        }
        false => (None, PER_WRITER),
    };
    let url = master.url(false);
    {
        let (s, _following, _) = storage(&url, &list, replicas, file.map(|f| (f, SKEW)), chunked);
        s.create_container("c").unwrap();
        for i in 0..WRITERS * per_writer {
            let info = s.info("c", Some(&resource(i))).unwrap();
            s.put_content(&info, content(0, chunked).as_str().into())
                .unwrap();
        }
    }
    let run = Duration::from_secs(match membership {
        // Changes are 2 * SKEW apart at least: a few in the run.
        true => seconds().max(12),
        false => seconds(),
    });
    let epoch = std::time::UNIX_EPOCH;
    let until = (epoch.elapsed().unwrap() + run).as_millis();
    let children = Run {
        state: &state.path,
        servers: &list,
        until_ms: until,
        replicas,
        per_writer,
        servers_file: file,
        chunked,
    };
    let writer = |w: usize| spawn(&format!("writer{w}"), &url, &children);
    let mut writers: Vec<Child> = (0..WRITERS).map(writer).collect();
    let readers: Vec<Child> = (0..READERS)
        .map(|r| spawn("reader", &master.url(r == 0), &children))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut faults = 0u64;
    let mut spawned = WRITERS + READERS;
    let mut failed = 0u64;
    let mut refused = 0u64;
    let mut windows = 0u64;
    let mut list_changes = 0u64;
    let mut last_change = std::time::Instant::now();
    // Faults until the children's deadline, paced (not synchronised) by short pauses.
    let kinds: Vec<u64> = std::env::var("CHAOS_FAULTS")
        .map(|k| k.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(master.kinds().to_vec());
    let kinds: Vec<u64> = kinds
        .into_iter()
        .filter(|k| master.kinds().contains(k) && (*k != 7 || membership))
        .collect();
    // The list changes when its time has come, between the other faults.
    let changes_list = kinds.contains(&7);
    let kinds: Vec<u64> = kinds.into_iter().filter(|&k| k != 7).collect();
    assert!(
        !kinds.is_empty() || changes_list,
        "no fault applies to the {} master",
        master.name()
    );
    while (epoch.elapsed().unwrap().as_millis()) + 400 < until {
        thread::sleep(Duration::from_millis(50 + rng.below(150)));
        let s = rng.below(servers.len() as u64) as usize;
        // Paced: the children's lists hold a change back for 2 * SKEW after the last one
        // (and each takes it at its own moment).
        if changes_list && last_change.elapsed() > 2 * SKEW + Duration::from_millis(300) {
            change_members(&mut members, &mut left, servers.len(), &mut rng);
            write_list(file.unwrap(), &servers, &members);
            last_change = std::time::Instant::now();
            list_changes += 1;
            faults += 1;
            if std::env::var_os("CHAOS_TRACE").is_some() {
                eprintln!("LIST {members:?}");
            }
        }
        if kinds.is_empty() {
            continue;
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        if std::env::var_os("CHAOS_TRACE").is_some() {
            let at = epoch.elapsed().unwrap().as_millis();
            eprintln!(
                "FAULT {kind} at {at} ms: server {s} ({})",
                servers[s].addr()
            );
        }
        match (kind, master) {
            (0, _) => {
                servers[s].freeze();
                thread::sleep(Duration::from_millis(50 + rng.below(250)));
                servers[s].resume();
            }
            (1, _) => servers[s].restart(),
            (2, _) => {
                let w = rng.below(WRITERS as u64) as usize;
                let _ = writers[w].kill(); // SIGKILL, wherever it is in its write
                if let Some((_, _, f, r)) = result(std::mem::replace(&mut writers[w], writer(w))) {
                    failed += f;
                    refused += r;
                }
                spawned += 1;
            }
            #[cfg(feature = "postgres")]
            (3, Master::Pg { pg, .. }) => {
                windows += 1;
                set_master_faults(&state.path, 2 * windows - 1);
                pg.freeze();
                // Often past the call timeout, so that calls time out too.
                thread::sleep(Duration::from_millis(300 + rng.below(4700)));
                pg.resume();
                // Its effects: calls that timed out after the resume, then the second of
                // fast failures after the last timeout (PgStorage::RETRY_AFTER).
                thread::sleep(
                    PG_CALL_TIMEOUT
                        + mcstore::storage::PgStorage::RETRY_AFTER
                        + Duration::from_millis(300),
                );
                set_master_faults(&state.path, 2 * windows);
            }
            #[cfg(feature = "postgres")]
            (4, Master::Pg { pg, .. }) => {
                pg.cut_listeners();
            }
            #[cfg(feature = "postgres")]
            (5, Master::Pg { proxy, .. }) => {
                proxy.set_delay(Duration::from_millis(250));
                thread::sleep(Duration::from_millis(500 + rng.below(1000)));
                proxy.set_delay(Duration::ZERO);
            }
            (6, Master::Fs(root)) => {
                // The journal's folder name in FsStorage.
                let journal = root.join("~invalidations");
                let blocker = root.join("chaos-blocker");
                std::fs::write(&blocker, b"not a folder").unwrap();
                windows += 1;
                set_master_faults(&state.path, 2 * windows - 1);
                exchange(&journal, &blocker);
                thread::sleep(Duration::from_millis(100 + rng.below(500)));
                exchange(&journal, &blocker);
                set_master_faults(&state.path, 2 * windows);
                std::fs::remove_file(&blocker).unwrap();
            }
            _ => unreachable!("fault {kind} on the {} master", master.name()),
        }
        faults += 1;
    }
    for w in writers {
        if let Some((_, _, f, r)) = result(w) {
            failed += f;
            refused += r;
        }
    }
    // Killed writers cannot report: the writes are the versions the resources reached
    // (each put that returned published its version).
    let writes: u64 = (0..WRITERS * per_writer)
        .map(|i| published(&state.path, i))
        .sum();
    let (mut reads, mut stale) = (0u64, 0u64);
    let (mut chunked_hits, mut chunked_fills) = (0u64, 0u64);
    for r in readers {
        let ((ops, s, f, x), (h, fills)) =
            result_with_chunks(r).expect("a reader finishes its run");
        chunked_hits += h;
        chunked_fills += fills;
        reads += ops;
        stale += s;
        failed += f;
        refused += x;
    }
    println!(
        "CHAOS master={} processes={spawned} reads={reads} writes={writes} faults={faults} stale={stale} failed={failed} refused={refused} replicas={replicas}{}{}",
        master.name(),
        match membership {
            true => format!(" list_changes={list_changes}"),
            false => String::new(),
        },
        match chunked {
            true => format!(" chunked=lz4 chunked_hits={chunked_hits} chunked_fills={chunked_fills}"),
            false => String::new(),
        }
    );
    assert!(
        !chunked || chunked_hits > 0,
        "no read was served from chunks"
    );
    assert_eq!((stale, failed), (0, 0), "stale or failed calls");
    // No lost write: the master holds every version a put returned for (or the next, when a
    // killed writer's last put landed).
    let m = master_storage(&url);
    for i in 0..WRITERS * per_writer {
        let info = m.info("c", Some(&resource(i))).unwrap();
        let have = version(&m.get_content(&info).unwrap());
        let want = published(&state.path, i);
        assert!(
            have == want || have == want + 1,
            "r{i}: master v{have}, published v{want}"
        );
    }
    m.shutdown().unwrap();
    assert!(faults > 0 && reads > min_reads, "too little happened");
    assert!(!membership || list_changes >= 2, "too few list changes");
}
