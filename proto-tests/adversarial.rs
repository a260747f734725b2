//! Never another caller's reply (#32), under attack: every front (`Client`, `Pool`,
//! pipelines, `SharedClient` blocking and async) on every protocol, concurrently, over three
//! real memcached: one healthy, one jittery (SIGSTOP/SIGCONT in a loop), one restarted now
//! and then. The calls mix noreply and quiet commands (with misses, which memcached answers
//! even when quiet), caught panics in callbacks, very short deadlines and cancelled futures.
//!
//! Every value names its key and a version, and is full of bytes that look like protocol
//! (`END\r\n`, `VALUE k 0 5\r\n`, `VA 2 f0\r\n`, `MN\r\n`, binary magic). Every read checks
//! that a value is its own key's, at a version that key was given; every counter reply is
//! in its own counter's range. One wrong value fails the test; errors (timeouts, refused
//! connections) are expected and counted.
//!
//! Short in CI (`ADVERSARIAL_SECONDS`, default 4 per protocol); e.g. 600 for a long run.
//! Over TLS with `MCSTORE_TEST_TLS=1`, as the rest of the suite.

use mcstore_test_support as support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::{Client, ErrorKind, Pool, Protocol, SetOptions, SharedClient, StoreMode};
use support::{panicking_callback, Memcached, Rng};

/// Keys every caller reads (never written after the start).
const SHARED_KEYS: usize = 50;
/// Keys (and one counter) of each caller's own.
const OWN_KEYS: u64 = 8;

/// What the callers saw, added up.
#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    checked: AtomicU64,
    wrong: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    panics: AtomicU64,
}

impl Counts {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, e: &mcstore::Error) {
        if e.kind() == ErrorKind::Timeout {
            Self::add(&self.timeouts);
        } else {
            Self::add(&self.errors);
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The value of `key` at `version`: its key and version first, then protocol look-alikes,
/// padded to a length that depends on both.
fn value_of(key: &str, version: u64) -> Vec<u8> {
    let mut v = format!("{key}|{version}|").into_bytes();
    v.extend_from_slice(
        b"END\r\nVALUE k 0 5\r\nhello\r\nVA 2 f0 O1\r\nhi\r\nMN\r\nHD O7\r\nEN\r\n",
    );
    v.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x04, 0x00, 0x00, 0x00, b'\r', b'\n']);
    let pad = (version as usize * 31 + key.len() * 7) % 700;
    v.extend(std::iter::repeat_n(b'x', pad));
    v
}

/// Checks that `value` is `key`'s, at a version no later than `max_version` (an older one
/// may win after a timed-out write: its connection was closed, not its request undone).
fn check_value(counts: &Counts, key: &str, value: &[u8], max_version: u64) {
    Counts::add(&counts.checked);
    let ok = (|| {
        let text = std::str::from_utf8(value.get(..value.iter().position(|&b| b == b'\r')?)?);
        let mut parts = text.ok()?.split('|');
        let (k, v) = (parts.next()?, parts.next()?.parse::<u64>().ok()?);
        (k == key && v <= max_version && value == value_of(k, v).as_slice()).then_some(())
    })();
    if ok.is_none() {
        Counts::add(&counts.wrong);
        eprintln!(
            "WRONG VALUE for {key} (max version {max_version}): {:?}",
            String::from_utf8_lossy(&value[..value.len().min(60)])
        );
    }
}

/// A counter reply: each caller's counter starts at `caller * 10^12` and only grows.
fn check_counter(counts: &Counts, caller: u64, n: u64) {
    Counts::add(&counts.checked);
    if n / 1_000_000_000_000 != caller {
        Counts::add(&counts.wrong);
        eprintln!("WRONG COUNTER for caller {caller}: {n}");
    }
}

/// One caller's own keys, and the highest version it has written to each.
struct Own {
    caller: u64,
    versions: [u64; OWN_KEYS as usize],
}

impl Own {
    fn new(caller: u64) -> Own {
        Own {
            caller,
            versions: [0; OWN_KEYS as usize],
        }
    }

    fn key(&self, j: u64) -> String {
        format!("own:{}:{j}", self.caller)
    }

    fn counter(&self) -> String {
        format!("counter:{}", self.caller)
    }

    /// A key that never exists.
    fn missing(&self) -> String {
        format!("missing:{}", self.caller)
    }

    /// A key that exists (never read back): a quiet add of it is refused.
    fn existing(&self) -> String {
        format!("existing:{}", self.caller)
    }
}

fn shared_key(j: u64) -> String {
    format!("shared:{j}")
}

/// What every blocking front offers the mix below.
trait Front {
    fn set(&self, key: &[u8], value: &[u8]) -> mcstore::Result<()>;
    fn get(&self, key: &[u8]) -> mcstore::Result<Option<Vec<u8>>>;
    fn get_multi(
        &self,
        keys: &[String],
        found: &mut dyn FnMut(&[u8], &[u8]),
    ) -> mcstore::Result<()>;
    fn incr(&self, key: &[u8]) -> mcstore::Result<Option<u64>>;
    fn delete(&self, key: &[u8]) -> mcstore::Result<bool>;
    fn add(&self, key: &[u8], value: &[u8]) -> mcstore::Result<bool>;
    /// Fire-and-forget quiet commands that fail (misses, an add of an existing key), when
    /// the front has them.
    fn noreply_misses(&self, own: &Own) -> mcstore::Result<()>;
}

/// A plain client, behind a mutex so the trait can take `&self`.
struct Plain(std::sync::Mutex<Client>);

impl Plain {
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Front for Plain {
    fn set(&self, key: &[u8], value: &[u8]) -> mcstore::Result<()> {
        self.with(|c| c.set(key, value, SetOptions::default()))
    }
    fn get(&self, key: &[u8]) -> mcstore::Result<Option<Vec<u8>>> {
        self.with(|c| c.get(key).map(|i| i.map(|i| i.value)))
    }
    fn get_multi(
        &self,
        keys: &[String],
        found: &mut dyn FnMut(&[u8], &[u8]),
    ) -> mcstore::Result<()> {
        self.with(|c| c.get_multi(keys, |k, item| found(k, item.value)))
    }
    fn incr(&self, key: &[u8]) -> mcstore::Result<Option<u64>> {
        self.with(|c| c.incr(key, 1))
    }
    fn delete(&self, key: &[u8]) -> mcstore::Result<bool> {
        self.with(|c| c.delete(key))
    }
    fn add(&self, key: &[u8], value: &[u8]) -> mcstore::Result<bool> {
        self.with(|c| c.add(key, value, SetOptions::default()))
    }
    fn noreply_misses(&self, own: &Own) -> mcstore::Result<()> {
        self.with(|c| {
            noreply_misses(c, own)?;
            let missing = own.missing();
            let mut p = c.pipeline();
            p.incr(missing.as_bytes(), 1, false)?;
            p.touch(missing.as_bytes(), 10)?;
            p.store(
                StoreMode::Replace,
                missing.as_bytes(),
                b"x",
                SetOptions::default(),
            )?;
            p.delete(missing.as_bytes())?;
            if own.caller % 2 == 0 {
                p.send()
            } else {
                p.finish().map(drop)
            }
        })
    }
}

/// A quiet delete of a missing key and a quiet add of an existing one: memcached answers
/// both (binary and meta), and nobody reads those replies at once.
fn noreply_misses(c: &mut Client, own: &Own) -> mcstore::Result<()> {
    c.delete_noreply(own.missing().as_bytes())?;
    let existing = own.existing();
    c.set(existing.as_bytes(), b"present", SetOptions::default())?;
    c.store_noreply(
        StoreMode::Add,
        existing.as_bytes(),
        b"x",
        SetOptions::default(),
    )
}

impl Front for Pool {
    fn set(&self, key: &[u8], value: &[u8]) -> mcstore::Result<()> {
        self.get()?.set(key, value, SetOptions::default())
    }
    fn get(&self, key: &[u8]) -> mcstore::Result<Option<Vec<u8>>> {
        Pool::get(self)?.get(key).map(|i| i.map(|i| i.value))
    }
    fn get_multi(
        &self,
        keys: &[String],
        found: &mut dyn FnMut(&[u8], &[u8]),
    ) -> mcstore::Result<()> {
        Pool::get(self)?.get_multi(keys, |k, item| found(k, item.value))
    }
    fn incr(&self, key: &[u8]) -> mcstore::Result<Option<u64>> {
        Pool::get(self)?.incr(key, 1)
    }
    fn delete(&self, key: &[u8]) -> mcstore::Result<bool> {
        Pool::get(self)?.delete(key)
    }
    fn add(&self, key: &[u8], value: &[u8]) -> mcstore::Result<bool> {
        Pool::get(self)?.add(key, value, SetOptions::default())
    }
    fn noreply_misses(&self, own: &Own) -> mcstore::Result<()> {
        noreply_misses(&mut *Pool::get(self)?, own)
    }
}

impl Front for SharedClient {
    fn set(&self, key: &[u8], value: &[u8]) -> mcstore::Result<()> {
        SharedClient::set(self, key, value, SetOptions::default())
    }
    fn get(&self, key: &[u8]) -> mcstore::Result<Option<Vec<u8>>> {
        SharedClient::get(self, key).map(|i| i.map(|i| i.value))
    }
    fn get_multi(
        &self,
        keys: &[String],
        found: &mut dyn FnMut(&[u8], &[u8]),
    ) -> mcstore::Result<()> {
        SharedClient::get_multi(self, keys, |k, item| found(k, item.value))
    }
    fn incr(&self, key: &[u8]) -> mcstore::Result<Option<u64>> {
        SharedClient::incr(self, key, 1)
    }
    fn delete(&self, key: &[u8]) -> mcstore::Result<bool> {
        SharedClient::delete(self, key)
    }
    fn add(&self, key: &[u8], value: &[u8]) -> mcstore::Result<bool> {
        SharedClient::add(self, key, value, SetOptions::default())
    }
    fn noreply_misses(&self, own: &Own) -> mcstore::Result<()> {
        // No noreply calls here; deletes of a missing key are batched as quiet commands.
        let missing = own.missing();
        SharedClient::delete_multi(self, &[missing.as_bytes(), missing.as_bytes()]).map(drop)
    }
}

/// One blocking caller's mix on `front` until `stop`.
fn blocking_caller(front: &dyn Front, caller: u64, counts: &Counts, stop: &AtomicBool) {
    let mut own = Own::new(caller);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (caller + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let counter = own.counter();
    let _ = front.set(
        counter.as_bytes(),
        (caller * 1_000_000_000_000).to_string().as_bytes(),
    );
    while !stop.load(Ordering::Relaxed) {
        Counts::add(&counts.calls);
        let j = rng.below(OWN_KEYS);
        let key = own.key(j);
        let r = match rng.below(10) {
            0 | 1 => {
                own.versions[j as usize] += 1;
                let v = own.versions[j as usize];
                front.set(key.as_bytes(), &value_of(&key, v))
            }
            2 | 3 => front.get(key.as_bytes()).map(|got| {
                if let Some(got) = got {
                    check_value(counts, &key, &got, own.versions[j as usize]);
                }
            }),
            4 => {
                let s = shared_key(rng.below(SHARED_KEYS as u64));
                front.get(s.as_bytes()).map(|got| {
                    if let Some(got) = got {
                        check_value(counts, &s, &got, 0);
                    }
                })
            }
            5 => {
                // Own keys and shared ones, over every server.
                let mut keys: Vec<String> = (0..OWN_KEYS).map(|j| own.key(j)).collect();
                keys.extend((0..6).map(|_| shared_key(rng.below(SHARED_KEYS as u64))));
                let versions = own.versions;
                front.get_multi(&keys, &mut |k, v| {
                    let k = std::str::from_utf8(k).unwrap().to_string();
                    let max = match k.rsplit_once(':') {
                        Some((p, j)) if p == format!("own:{caller}") => {
                            versions[j.parse::<usize>().unwrap()]
                        }
                        _ => 0,
                    };
                    check_value(counts, &k, v, max);
                })
            }
            6 => front.incr(counter.as_bytes()).map(|n| {
                if let Some(n) = n {
                    check_counter(counts, caller, n);
                } else {
                    // Lost in a restart: start it again.
                    let start = (caller * 1_000_000_000_000).to_string();
                    let _ = front.add(counter.as_bytes(), start.as_bytes());
                }
            }),
            7 => front.noreply_misses(&own),
            8 => {
                // A panic in a callback, caught: the next calls must not read what it left.
                let keys: Vec<String> = (0..SHARED_KEYS as u64).map(shared_key).collect();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    front.get_multi(&keys, &mut |_, _| panicking_callback())
                }));
                match r {
                    Err(_) => Counts::add(&counts.panics),
                    Ok(r) => r.unwrap_or_else(|e| counts.error(&e)),
                }
                Ok(())
            }
            _ => front.delete(key.as_bytes()).map(drop),
        };
        if let Err(e) = r {
            counts.error(&e);
        }
    }
}

/// One async caller: the same checks, and futures cancelled at random short deadlines.
async fn async_caller(
    c: Arc<SharedClient>,
    caller: u64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut own = Own::new(caller);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (caller + 1).wrapping_mul(0x94d0_49bb_1331_11eb));
    let counter = own.counter();
    let start = (caller * 1_000_000_000_000).to_string();
    let _ = c
        .set_async(counter.as_bytes(), start.as_bytes(), SetOptions::default())
        .await;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        Counts::add(&counts.calls);
        let j = rng.below(OWN_KEYS);
        let key = own.key(j);
        // Now and then a deadline so short that the future is dropped mid-flight.
        let limit = if rng.below(4) == 0 {
            Duration::from_micros(50 + rng.below(500))
        } else {
            Duration::from_secs(5)
        };
        let op = rng.below(4);
        if op == 0 {
            own.versions[j as usize] += 1;
        }
        let max = own.versions[j as usize];
        let value = value_of(&key, max);
        let r = tokio::time::timeout(limit, async {
            match op {
                0 => {
                    c.set_async(key.as_bytes(), &value, SetOptions::default())
                        .await
                }
                1 => c.get_into_async(key.as_bytes(), &mut buf).await.map(|got| {
                    if got.is_some() {
                        check_value(&counts, &key, &buf, max);
                    }
                }),
                2 => {
                    let s = shared_key(rng.below(SHARED_KEYS as u64));
                    c.get_into_async(s.as_bytes(), &mut buf).await.map(|got| {
                        if got.is_some() {
                            check_value(&counts, &s, &buf, 0);
                        }
                    })
                }
                _ => c.incr_async(counter.as_bytes(), 1).await.map(|n| {
                    if let Some(n) = n {
                        check_counter(&counts, caller, n);
                    }
                }),
            }
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => counts.error(&e),
            Err(_) => Counts::add(&counts.cancelled),
        }
    }
}

fn seconds() -> u64 {
    std::env::var("ADVERSARIAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

fn run_protocol(p: Protocol, servers: &[String], secs: u64) -> Counts {
    // Callers of each protocol's run have keys of their own (the servers keep the last run's).
    let first = 100 * (p as u64 + 1);
    let builder = |timeout_ms: u64| {
        support::client_builder()
            .protocol(p)
            .servers(servers.iter())
            .io_timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(500))
            .server_failure_limit(1000)
    };
    // Seed the shared keys (on the servers that answer now).
    let mut seed = builder(2000).build().unwrap();
    for j in 0..SHARED_KEYS as u64 {
        let k = shared_key(j);
        let _ = seed.set(k.as_bytes(), &value_of(&k, 0), SetOptions::default());
    }
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Callers 1..: plain clients with a long and a very short deadline, a pool, a shared
    // client's blocking callers; the async callers after them.
    let fronts: Vec<(u64, Arc<dyn Front + Send + Sync>)> = vec![
        (
            first + 1,
            Arc::new(Plain(builder(1000).build().unwrap().into())),
        ),
        (
            first + 2,
            Arc::new(Plain(builder(2).build().unwrap().into())),
        ),
        (first + 3, Arc::new(Pool::new(builder(300), 2).unwrap())),
        (first + 4, Arc::new(Pool::new(builder(300), 2).unwrap())),
    ];
    let shared = Arc::new(builder(300).shared().max_in_flight(64).build().unwrap());
    let mut threads = Vec::new();
    for (caller, front) in fronts {
        let (counts, stop) = (counts.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            blocking_caller(&*front, caller, &counts, &stop)
        }));
    }
    for caller in first + 5..first + 7 {
        let (counts, stop, shared) = (counts.clone(), stop.clone(), shared.clone());
        threads.push(thread::spawn(move || {
            blocking_caller(&*shared, caller, &counts, &stop)
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let tasks: Vec<_> = (first + 7..first + 15)
        .map(|caller| {
            let (counts, stop, shared) = (counts.clone(), stop.clone(), shared.clone());
            rt.spawn(async_caller(shared, caller, counts, stop))
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a caller failed");
    }
    rt.block_on(async {
        for t in tasks {
            t.await.expect("an async caller failed");
        }
    });
    Arc::into_inner(counts).expect("every caller is done")
}

#[test]
fn no_caller_ever_gets_another_callers_reply() {
    let secs = seconds();
    let healthy = Memcached::start();
    let jittery = Memcached::start();
    let mut restarted = Memcached::start();
    let servers = [healthy.addr(), jittery.addr(), restarted.addr()];
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        let faults_on = Arc::new(AtomicBool::new(true));
        let restarts = Arc::new(AtomicU64::new(0));
        let counts = thread::scope(|s| {
            let on = faults_on.clone();
            let jittery = &jittery;
            // Jitter: stopped 5 ms of every 50.
            s.spawn(move || {
                while on.load(Ordering::Relaxed) {
                    jittery.freeze();
                    thread::sleep(Duration::from_millis(5));
                    jittery.resume();
                    thread::sleep(Duration::from_millis(45));
                }
            });
            let on = faults_on.clone();
            let restarted = &mut restarted;
            let n = restarts.clone();
            s.spawn(move || {
                // A restart every 1.5 s.
                let mut next = Instant::now() + Duration::from_millis(1500);
                while on.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        restarted.restart();
                        n.fetch_add(1, Ordering::Relaxed);
                        next = Instant::now() + Duration::from_millis(1500);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            });
            let counts = run_protocol(p, &servers, secs);
            faults_on.store(false, Ordering::Relaxed);
            counts
        });
        let g = Counts::get;
        println!(
            "ADVERSARIAL protocol={p:?} tls={} seconds={secs} calls={} checked={} wrong={} \
             timeouts={} errors={} cancelled={} panics={} restarts={}",
            support::tls_mode(),
            g(&counts.calls),
            g(&counts.checked),
            g(&counts.wrong),
            g(&counts.timeouts),
            g(&counts.errors),
            g(&counts.cancelled),
            g(&counts.panics),
            restarts.load(Ordering::Relaxed),
        );
        assert_eq!(
            g(&counts.wrong),
            0,
            "{p:?}: a caller got another caller's reply"
        );
        // The checks ran: a run where every call failed would prove nothing.
        assert!(
            g(&counts.checked) >= 100,
            "{p:?}: only {} values checked",
            g(&counts.checked)
        );
        assert!(
            g(&counts.panics) > 0 && g(&counts.cancelled) > 0,
            "{p:?}: faults not mixed in"
        );
    }
}
