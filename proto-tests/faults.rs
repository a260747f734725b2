//! Dead and frozen servers, and recovery, against a real memcached.

use mcstore_test_support as support;

use std::time::{Duration, Instant};

use mcstore::{Client, Error, Protocol, SetOptions};
use support::Memcached;

const IO_TIMEOUT: Duration = Duration::from_millis(300);
/// Generous: these machines are small and shared.
const MARGIN: Duration = Duration::from_millis(1500);

fn client(mc: &Memcached, p: Protocol) -> Client {
    support::client_builder()
        .protocol(p)
        .server(mc.addr())
        .io_timeout(IO_TIMEOUT)
        // These tests are about each call's error; ejection is tested in multi_server.rs.
        .server_failure_limit(1000)
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

fn frozen_server_times_out_then_recovers(p: Protocol) {
    let mc = Memcached::start();
    let mut c = client(&mc, p);
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    mc.freeze();
    for op in ["get", "set", "get_multi", "reconnect+get"] {
        let start = Instant::now();
        let r = match op {
            "get" | "reconnect+get" => c.get(b"k").map(drop),
            "set" => c.set(b"k", b"v2", SetOptions::default()),
            _ => c.get_multi(&[b"k", b"j"], |_, _| {}),
        };
        let took = start.elapsed();
        eprintln!("frozen server: {op} failed after {took:?} (io timeout {IO_TIMEOUT:?})");
        match r {
            Err(Error::Timeout { .. }) => {}
            other => panic!("{op}: expected a timeout, got {other:?}"),
        }
        assert!(took >= IO_TIMEOUT, "{op} gave up early: {took:?}");
        assert!(took < IO_TIMEOUT + MARGIN, "{op} took {took:?}");
    }
    mc.resume();
    // The same client works again: the timed-out connection was dropped, not reused. The
    // timed-out set was in the frozen server's socket buffer and may or may not have landed.
    let v = c.get(b"k").unwrap().unwrap().value;
    assert!(v == b"v" || v == b"v2", "{v:?}");
    c.set(b"k", b"v3", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v3");
}

fn killed_server_gives_io_errors_then_the_same_client_reconnects(p: Protocol) {
    let mut mc = Memcached::start();
    let mut c = client(&mc, p);
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    mc.kill();
    // First call finds the old connection closed; later ones find the port refusing.
    for _ in 0..3 {
        let start = Instant::now();
        match c.get(b"k") {
            Err(Error::Io { .. }) => {}
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(start.elapsed() < IO_TIMEOUT + MARGIN);
    }
    assert!(matches!(
        c.set(b"k", b"v", SetOptions::default()),
        Err(Error::Io { .. })
    ));
    mc.restart();
    c.set(b"k", b"back", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"back");
}

fn server_restart_between_calls_is_survived_with_one_error_at_most(p: Protocol) {
    let mut mc = Memcached::start();
    let mut c = client(&mc, p);
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    mc.restart();
    // The old connection is dead; the call that finds out fails, the next one reconnects.
    let first = c.get(b"k");
    assert!(
        matches!(first, Ok(None) | Err(Error::Io { .. })),
        "{first:?}"
    );
    assert_eq!(c.get(b"k").unwrap(), None, "a restarted memcached is empty");
}

fn unreachable_server_fails_fast(p: Protocol) {
    // A port nothing listens on: connection refused, not a hang.
    let port = support::free_port();
    let mut c = support::client_builder()
        .protocol(p)
        .server(format!("127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let start = Instant::now();
    assert!(matches!(c.get(b"k"), Err(Error::Io { .. })));
    assert!(start.elapsed() < Duration::from_millis(500) + MARGIN);
}

/// The breaker: a frozen server costs one timeout per retry interval, not one per caller.
/// Once its retry time comes, one call probes it; every other caller fails fast
/// (`ServerDown`) until that probe reports, and the probe's timeout ejects it again.
fn frozen_server_is_probed_by_one_call_at_a_time(p: Protocol) {
    const CALLERS: usize = 8;
    let retry = Duration::from_millis(200);
    let mc = Memcached::start();
    let b = support::client_builder()
        .protocol(p)
        .server(mc.addr())
        .io_timeout(Duration::from_millis(150))
        .server_failure_limit(2)
        .retry_timeout(retry);
    let pool = mcstore::Pool::new(b, CALLERS).unwrap();
    pool.get()
        .unwrap()
        .set(b"k", b"v", SetOptions::default())
        .unwrap();
    mc.freeze();
    let run = Duration::from_millis(1500);
    let start = Instant::now();
    let timeouts: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let pool = pool.clone();
                s.spawn(move || {
                    let mut c = pool.get().unwrap();
                    let mut timeouts = 0;
                    while start.elapsed() < run {
                        match c.get(b"k") {
                            Err(Error::Timeout { .. }) => timeouts += 1,
                            Err(Error::ServerDown { .. }) => std::thread::yield_now(),
                            other => panic!("a frozen server answered {other:?}"),
                        }
                    }
                    timeouts
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let elapsed = start.elapsed();
    mc.resume();
    // Every caller may time out once before the first ejection; after that, one probe per
    // retry interval at most (each interval lasts at least `retry`).
    let intervals = (elapsed.as_millis() / retry.as_millis()) as usize + 1;
    eprintln!("{CALLERS} callers, {elapsed:?} frozen: {timeouts} timeouts ({intervals} intervals)");
    assert!(
        timeouts <= CALLERS + intervals,
        "{timeouts} timeouts for {intervals} retry intervals: more than one probe at a time"
    );
    let mut c = pool.get().unwrap();
    support::wait_for("the resumed server to serve again", || {
        c.get(b"k").is_ok_and(|v| v.is_some())
    });
}

support::for_each_protocol!(
    frozen_server_is_probed_by_one_call_at_a_time,
    frozen_server_times_out_then_recovers,
    killed_server_gives_io_errors_then_the_same_client_reconnects,
    server_restart_between_calls_is_survived_with_one_error_at_most,
    unreachable_server_fails_fast
);
