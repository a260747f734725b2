//! #16's chaos test: several processes share three memcached servers and one `FsStorage`
//! master through `MemcacheStorage`. Writer processes put increasing versions of their own
//! resources; reader processes read every resource; meanwhile the parent freezes (SIGSTOP)
//! and resumes servers, restarts them (which ejects and rejoins them in the clients), and
//! SIGKILLs writers (and starts them again). The check: a read that started after `put(vN)`
//! returned sees a version >= N. It prints one line:
//! `CHAOS processes=P reads=R writes=W faults=F stale=S failed=X`.
//!
//! A 6 s run is part of the suite; `cargo test --release --test chaos -- --nocapture` prints
//! the line.
//!
//! `CHAOS_SECONDS` sets the run's length (default 6; `CHAOS_SECONDS=300` for the long run);
//! `CHAOS_FAULTS` limits the faults to some of `0` (freeze), `1` (restart), `2` (kill a
//! writer), comma-separated; `CHAOS_TRACE=1` prints every fault and every put that returned
//! (stale reads are always printed).

mod support;

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

/// The shared master: a folder, or a PostgreSQL database when `master` is a postgres:// URL.
fn master_storage(master: &str) -> Arc<dyn Storage> {
    #[cfg(feature = "postgres")]
    if master.starts_with("postgres://") {
        return Arc::new(
            mcstore::storage::PgStorage::builder(master)
                .pool_size(3)
                .open()
                .unwrap(),
        );
    }
    Arc::new(FsStorage::open(master).unwrap())
}

fn storage(master: &str, servers: &str) -> MemcacheStorage {
    let builder = Client::builder()
        .servers(servers.split(','))
        .distribution(mcstore::ring::Distribution::Ketama)
        .remove_failed_servers(true)
        .server_failure_limit(2)
        .retry_timeout(Duration::from_millis(300))
        .io_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100));
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
    let (Ok(role), Ok(master), Ok(state), Ok(servers), Ok(until)) = (
        std::env::var("CHAOS_ROLE"),
        std::env::var("CHAOS_MASTER"),
        std::env::var("CHAOS_STATE"),
        std::env::var("CHAOS_SERVERS"),
        std::env::var("CHAOS_UNTIL_MS"),
    ) else {
        return;
    };
    let state = PathBuf::from(state);
    let until = Duration::from_millis(until.parse().unwrap());
    let epoch = std::time::UNIX_EPOCH;
    let s = storage(&master, &servers);
    let trace = std::env::var_os("CHAOS_TRACE").is_some();
    let (mut ops, mut stale, mut failed) = (0u64, 0u64, 0u64);
    if let Some(w) = role.strip_prefix("writer") {
        let w: usize = w.parse().unwrap();
        let mine: Vec<usize> = (w * PER_WRITER..(w + 1) * PER_WRITER).collect();
        // Continue from what the master has (a killed writer's last put may have landed).
        let fs = master_storage(&master);
        let mut next: Vec<u64> = mine
            .iter()
            .map(|&i| {
                let info = fs.info("c", Some(&resource(i))).unwrap();
                fs.get_content(&info).map_or(0, |c| version(&c)) + 1
            })
            .collect();
        while epoch.elapsed().unwrap() < until {
            for (k, &i) in mine.iter().enumerate() {
                let info = s.info("c", Some(&resource(i))).unwrap();
                let v = next[k];
                let started = epoch.elapsed().unwrap().as_millis();
                match s.put_content(&info, format!("v{v}").as_str().into()) {
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
                    Err(_) => failed += 1,
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
                match s.get_content(&info) {
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
                    Err(_) => failed += 1,
                }
                ops += 1;
            }
        }
    }
    println!("RESULT ops={ops} stale={stale} failed={failed}");
}

fn spawn(role: &str, master: &str, state: &Path, servers: &str, until_ms: u128) -> Child {
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
        .env("CHAOS_STATE", state)
        .env("CHAOS_SERVERS", servers)
        .env("CHAOS_UNTIL_MS", until_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// `(ops, stale, failed)` from a child's last line; `None` if it was killed.
fn result(child: Child) -> Option<(u64, u64, u64)> {
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
    Some((field("ops"), field("stale"), field("failed")))
}

#[test]
fn chaos() {
    let master = TempDir::new("mcstore-chaos-master");
    run(master.path.to_str().unwrap(), 10_000);
}

/// The same with a PostgreSQL master (#17): the outbox replaces the journal folder.
#[cfg(feature = "postgres")]
#[test]
fn chaos_postgres() {
    let pg = support::postgres::Postgres::start();
    // Fewer reads: those a write makes miss go to PostgreSQL over a socket, not to a file.
    run(&pg.url(), 1_000);
}

/// Runs the processes and faults against `master`; at least `min_reads` reads must happen.
fn run(master: &str, min_reads: u64) {
    let state = TempDir::new("mcstore-chaos-state");
    let mut servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let list = servers
        .iter()
        .map(Memcached::addr)
        .collect::<Vec<_>>()
        .join(",");
    {
        let s = storage(master, &list);
        s.create_container("c").unwrap();
        for i in 0..WRITERS * PER_WRITER {
            let info = s.info("c", Some(&resource(i))).unwrap();
            s.put_content(&info, "v0".into()).unwrap();
        }
    }
    let run = Duration::from_secs(seconds());
    let epoch = std::time::UNIX_EPOCH;
    let until = (epoch.elapsed().unwrap() + run).as_millis();
    let writer = |w: usize| spawn(&format!("writer{w}"), master, &state.path, &list, until);
    let mut writers: Vec<Child> = (0..WRITERS).map(writer).collect();
    let readers: Vec<Child> = (0..READERS)
        .map(|_| spawn("reader", master, &state.path, &list, until))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut faults = 0u64;
    let mut spawned = WRITERS + READERS;
    let mut failed = 0u64;
    // Faults until the children's deadline, paced (not synchronised) by short pauses.
    let kinds: Vec<u64> = std::env::var("CHAOS_FAULTS")
        .map(|k| k.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![0, 1, 2]);
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
        match kind {
            0 => {
                servers[s].freeze();
                thread::sleep(Duration::from_millis(50 + rng.below(250)));
                servers[s].resume();
            }
            1 => servers[s].restart(),
            _ => {
                let w = rng.below(WRITERS as u64) as usize;
                let _ = writers[w].kill(); // SIGKILL, wherever it is in its write
                if let Some((_, _, f)) = result(std::mem::replace(&mut writers[w], writer(w))) {
                    failed += f;
                }
                spawned += 1;
            }
        }
        faults += 1;
    }
    for w in writers {
        if let Some((_, _, f)) = result(w) {
            failed += f;
        }
    }
    // Killed writers cannot report: the writes are the versions the resources reached
    // (each put that returned published its version).
    let writes: u64 = (0..WRITERS * PER_WRITER)
        .map(|i| published(&state.path, i))
        .sum();
    let (mut reads, mut stale) = (0u64, 0u64);
    for r in readers {
        let (ops, s, f) = result(r).expect("a reader finishes its run");
        reads += ops;
        stale += s;
        failed += f;
    }
    println!(
        "CHAOS processes={spawned} reads={reads} writes={writes} faults={faults} stale={stale} failed={failed}"
    );
    assert_eq!((stale, failed), (0, 0), "stale or failed calls");
    // No lost write: the master holds every version a put returned for (or the next, when a
    // killed writer's last put landed).
    let m = master_storage(master);
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
