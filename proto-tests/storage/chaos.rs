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
//! A 6 s run is part of the suite; `cargo test --release --test chaos -- --nocapture` prints
//! the lines.
//!
//! `CHAOS_SECONDS` sets the run's length (default 6; `CHAOS_SECONDS=300` for the long run);
//! `CHAOS_FAULTS` limits the faults to some of `0` (freeze a memcached), `1` (restart one),
//! `2` (kill a writer), `3` (freeze PostgreSQL), `4` (cut the listeners), `5` (slow link),
//! `6` (journal unusable), comma-separated (those that do not apply to a master are
//! skipped); `CHAOS_TRACE=1` prints every fault and every put that returned (stale reads
//! are always printed).

use mcstore_test_support as support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mcstore::storage::{FsStorage, MemcacheStorage, Storage};
use mcstore::{Client, Pool};
use support::{Memcached, Rng, TempDir};

/// Resources per writer, and writers.
const PER_WRITER: usize = 3;
const WRITERS: usize = 2;
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

fn storage(master: &str, servers: &str, replicas: usize) -> MemcacheStorage {
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
    MemcacheStorage::new(pool, master_storage(master))
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
    std::str::from_utf8(content)
        .ok()
        .and_then(|s| s.strip_prefix('v'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected content {content:?}"))
}

/// A writer or reader process (run by `chaos` through the environment).
#[test]
#[ignore = "run by chaos as a child process"]
fn chaos_child() {
    let (Ok(role), Ok(master), Ok(state), Ok(servers), Ok(until), Ok(replicas)) = (
        std::env::var("CHAOS_ROLE"),
        std::env::var("CHAOS_MASTER"),
        std::env::var("CHAOS_STATE"),
        std::env::var("CHAOS_SERVERS"),
        std::env::var("CHAOS_UNTIL_MS"),
        std::env::var("CHAOS_REPLICAS"),
    ) else {
        return;
    };
    let state = PathBuf::from(state);
    let until = Duration::from_millis(until.parse().unwrap());
    let epoch = std::time::UNIX_EPOCH;
    let s = storage(&master, &servers, replicas.parse().unwrap());
    let trace = std::env::var_os("CHAOS_TRACE").is_some();
    let (mut ops, mut stale, mut failed, mut refused) = (0u64, 0u64, 0u64, 0u64);
    if let Some(w) = role.strip_prefix("writer") {
        let w: usize = w.parse().unwrap();
        let mine: Vec<usize> = (w * PER_WRITER..(w + 1) * PER_WRITER).collect();
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
                let started = epoch.elapsed().unwrap().as_millis();
                let before = master_faults(&state);
                let r = s.put_content(&info, format!("v{v}").as_str().into());
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
        let n = WRITERS * PER_WRITER;
        while epoch.elapsed().unwrap() < until {
            for i in 0..n {
                let min = published(&state, i);
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
    println!("RESULT ops={ops} stale={stale} failed={failed} refused={refused}");
}

/// What the children of one run share.
struct Run<'a> {
    state: &'a Path,
    servers: &'a str,
    until_ms: u128,
    replicas: usize,
}

fn spawn(role: &str, master: &str, run: &Run<'_>) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
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
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// `(ops, stale, failed, refused)` from a child's last line; `None` if it was killed.
fn result(child: Child) -> Option<(u64, u64, u64, u64)> {
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
        field("ops"),
        field("stale"),
        field("failed"),
        field("refused"),
    ))
}

/// `chaos` and `chaos_replicas` run one at a time: together they would share the machine's
/// cores, and each run's reads and timeouts are sized for it alone.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn chaos() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 10_000, 1);
}

/// The same with two copies of each key (#27).
#[test]
fn chaos_replicas() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let master = TempDir::new("mcstore-chaos-master");
    run(&Master::Fs(master.path.clone()), 10_000, 2);
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
            Master::Fs(_) => &[0, 1, 2, 6],
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

/// Runs the processes and faults against `master`, with `replicas` copies of each key; at
/// least `min_reads` reads must happen.
fn run(master: &Master<'_>, min_reads: u64, replicas: usize) {
    let state = TempDir::new("mcstore-chaos-state");
    let mut servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let list = servers
        .iter()
        .map(Memcached::addr)
        .collect::<Vec<_>>()
        .join(",");
    let url = master.url(false);
    {
        let s = storage(&url, &list, replicas);
        s.create_container("c").unwrap();
        for i in 0..WRITERS * PER_WRITER {
            let info = s.info("c", Some(&resource(i))).unwrap();
            s.put_content(&info, "v0".into()).unwrap();
        }
    }
    let run = Duration::from_secs(seconds());
    let epoch = std::time::UNIX_EPOCH;
    let until = (epoch.elapsed().unwrap() + run).as_millis();
    let children = Run {
        state: &state.path,
        servers: &list,
        until_ms: until,
        replicas,
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
    // Faults until the children's deadline, paced (not synchronised) by short pauses.
    let kinds: Vec<u64> = std::env::var("CHAOS_FAULTS")
        .map(|k| k.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(master.kinds().to_vec());
    let kinds: Vec<u64> = kinds
        .into_iter()
        .filter(|k| master.kinds().contains(k))
        .collect();
    assert!(
        !kinds.is_empty(),
        "no fault applies to the {} master",
        master.name()
    );
    while (epoch.elapsed().unwrap().as_millis()) + 400 < until {
        thread::sleep(Duration::from_millis(50 + rng.below(150)));
        let s = rng.below(servers.len() as u64) as usize;
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
    let writes: u64 = (0..WRITERS * PER_WRITER)
        .map(|i| published(&state.path, i))
        .sum();
    let (mut reads, mut stale) = (0u64, 0u64);
    for r in readers {
        let (ops, s, f, x) = result(r).expect("a reader finishes its run");
        reads += ops;
        stale += s;
        failed += f;
        refused += x;
    }
    println!(
        "CHAOS master={} processes={spawned} reads={reads} writes={writes} faults={faults} stale={stale} failed={failed} refused={refused} replicas={replicas}",
        master.name()
    );
    assert_eq!((stale, failed), (0, 0), "stale or failed calls");
    // No lost write: the master holds every version a put returned for (or the next, when a
    // killed writer's last put landed).
    let m = master_storage(&url);
    for i in 0..WRITERS * PER_WRITER {
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
}
