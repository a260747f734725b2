//! Metrics and traces (features `metrics` and `tracing`), against real memcached: a recording
//! recorder sees calls, hits, misses, errors of a killed server, its ejection, connects and
//! storage fills, with the right labels; a capturing subscriber sees a span per call with its
//! fields and events for connects, ejections and replays; no key bytes appear in either. Run by
//! `scripts/test` with `--features metrics,tracing`.

use mcstore_test_support as support;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use mcstore::ring::Distribution;
use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
use mcstore::{Client, Pool, SetOptions};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::Memcached;

/// A metric: name, labels, and its counter value or number of histogram samples.
type Metric = (String, Vec<(String, String)>, u64);

/// Every metric recorded so far.
fn snapshot(s: &Snapshotter) -> Vec<Metric> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            let n = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Gauge(g) => g.into_inner() as u64,
                DebugValue::Histogram(h) => h.len() as u64,
            };
            (key.name().to_string(), labels, n)
        })
        .collect()
}

/// The value of `name` with exactly these labels (0 if absent).
fn value(all: &[Metric], name: &str, labels: &[(&str, &str)]) -> u64 {
    all.iter()
        .filter(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

/// One test: the recorder and the subscriber are global (the storage replays on its own
/// thread), so both are installed once, before any client is built.
#[test]
fn metrics_and_traces_against_real_servers() {
    let recorder = DebuggingRecorder::new();
    let snapshots = recorder.snapshotter();
    recorder.install().unwrap(); // before any client is built: handles bind to it
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .unwrap();
    metrics_count_calls_hits_misses_errors_ejections_and_fills(&snapshots);
    shared_client_metrics_count_rounds_and_queued_requests(&snapshots);
    traces_have_a_span_per_call_and_events_and_no_keys(&capture);
}

/// A ketama client over two servers that ejects a server at its first failure (for a
/// minute) and moves its keys to the other.
fn ejecting_client(la: &str, lb: &str) -> Client {
    Client::builder()
        .servers([la, lb])
        .distribution(Distribution::Ketama)
        .server_failure_limit(1)
        .retry_timeout(Duration::from_secs(60))
        .remove_failed_servers(true)
        .io_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

fn metrics_count_calls_hits_misses_errors_ejections_and_fills(snapshots: &Snapshotter) {
    let a = Memcached::start();
    let mut b = Memcached::start();
    let (la, lb) = (a.addr(), b.addr());
    let mut c = ejecting_client(&la, &lb);
    // A secret-looking key on each server.
    let keys: Vec<String> = (0..100).map(|i| format!("secret-key-{i}")).collect();
    let on = |c: &mut Client, server: &str| {
        keys.iter()
            .find(|k| c.server_for_key(k.as_bytes()).unwrap() == server)
            .unwrap()
            .clone()
    };
    let (ka, kb) = (on(&mut c, &la), on(&mut c, &lb));
    c.set(ka.as_bytes(), b"v", SetOptions::default()).unwrap();
    assert!(c.get(ka.as_bytes()).unwrap().is_some());
    assert!(c.get(b"secret-missing").unwrap().is_none());
    c.store_noreply(
        mcstore::StoreMode::Set,
        b"secret-noreply",
        b"v",
        SetOptions::default(),
    )
    .unwrap();
    let mut n = 0;
    c.get_multi(&keys, |_, _| n += 1).unwrap();
    assert_eq!(n, 1);
    let all = snapshot(snapshots);
    let server_a = [("server", la.as_str())];
    assert_eq!(
        value(
            &all,
            "mcstore_calls_total",
            &[("server", &la), ("op", "store")]
        ),
        1
    );
    assert_eq!(
        value(
            &all,
            "mcstore_call_seconds",
            &[("server", &la), ("op", "store")]
        ),
        1
    );
    for server in [&la, &lb] {
        let get_multi = [("server", server.as_str()), ("op", "get_multi")];
        assert_eq!(
            value(&all, "mcstore_calls_total", &get_multi),
            1,
            "{server}"
        );
    }
    let noreply: u64 = [&la, &lb]
        .iter()
        .map(|s| {
            value(
                &all,
                "mcstore_calls_total",
                &[("server", s), ("op", "noreply")],
            )
        })
        .sum();
    assert_eq!(noreply, 1);
    let hits = value(&all, "mcstore_hits_total", &server_a);
    let misses: u64 = ["mcstore_misses_total"]
        .iter()
        .map(|m| value(&all, m, &server_a) + value(&all, m, &[("server", lb.as_str())]))
        .sum();
    assert_eq!(hits, 2, "one get and one multi-get hit on {la}");
    assert_eq!(misses, 1 + 99, "one missing key, 99 of the multi-get");
    assert_eq!(value(&all, "mcstore_connects_total", &server_a), 1);
    assert_eq!(value(&all, "mcstore_reconnects_total", &server_a), 0);
    // The set's request (command line and 1-byte value) and the replies.
    assert!(value(&all, "mcstore_bytes_written_total", &server_a) > 20);
    assert!(value(&all, "mcstore_bytes_read_total", &server_a) > 10);

    // A killed server: an I/O error, then it is ejected.
    b.kill();
    assert!(c.set(kb.as_bytes(), b"v", SetOptions::default()).is_err());
    let all = snapshot(snapshots);
    let server_b = [("server", lb.as_str())];
    assert_eq!(
        value(
            &all,
            "mcstore_errors_total",
            &[("server", &lb), ("kind", "io")]
        ),
        1
    );
    assert_eq!(value(&all, "mcstore_ejections_total", &server_b), 1);
    assert_eq!(
        value(&all, "mcstore_breaker_state", &server_b),
        1,
        "ejected: open"
    );

    // Copies: a read whose first copy died fails over to the other, counted on the server
    // that answered.
    let mut dying = Memcached::start();
    let ld = dying.addr();
    let mut copies = Client::builder()
        .servers([la.as_str(), ld.as_str()])
        .distribution(Distribution::Ketama)
        .replicas(2)
        .io_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let first_on_dying = (0..)
        .map(|i| format!("copy-{i}"))
        .find(|k| {
            let r = copies
                .continuum()
                .replicas(k.as_bytes(), 2, Default::default());
            r.as_slice()[0] == 1
        })
        .unwrap();
    let k = first_on_dying.as_bytes();
    copies.set(k, b"v", SetOptions::default()).unwrap();
    dying.kill();
    assert_eq!(copies.get(k).unwrap().unwrap().value, b"v");
    let all = snapshot(snapshots);
    assert_eq!(
        value(&all, "mcstore_failovers_total", &[("server", &la)]),
        1
    );
    assert_eq!(copies.fleet_counters().failovers, 1);
    assert_eq!(
        value(
            &all,
            "mcstore_errors_total",
            &[("server", &la), ("kind", "io")]
        ),
        0
    );

    // The storage's fills, hits and misses.
    let store = MemcacheStorage::new(
        Pool::new(Client::builder().server(la.clone()), 2).unwrap(),
        Arc::new(MemoryStorage::new()),
    );
    store.create_container("c").unwrap();
    let info = store.info("c", Some("secret-resource")).unwrap();
    store.put_content(&info, "x".into()).unwrap();
    store.get_content(&info).unwrap(); // miss, fill
    store.get_content(&info).unwrap(); // hit
    let all = snapshot(snapshots);
    assert_eq!(value(&all, "mcstore_storage_fills_total", &[]), 1);
    assert_eq!(value(&all, "mcstore_storage_misses_total", &[]), 1);
    assert_eq!(value(&all, "mcstore_storage_hits_total", &[]), 1);
    assert_eq!(value(&all, "mcstore_storage_master_reads_total", &[]), 1);

    // Keys never appear in a metric.
    for (name, labels, _) in &all {
        for (k, v) in labels {
            assert!(
                !v.contains("secret") && !k.contains("secret") && !name.contains("secret"),
                "a key in {name} {labels:?}"
            );
        }
    }
}

/// Every span (with its fields, including those recorded later) and event, one line each.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

/// Fields as ` name=value`.
struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut line = format!("span {}", attrs.metadata().name());
        attrs.record(&mut Fields(&mut line));
        ctx.span(id).unwrap().extensions_mut().insert(line);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(&mut Fields(ext.get_mut::<String>().unwrap()));
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let line = span.extensions().get::<String>().unwrap().clone();
        self.0.lock().unwrap().push(line);
    }
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = format!("event {}", event.metadata().level());
        event.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }
}

/// A shared client's queue and rounds: every request queued counted once (its wait before its
/// round), each round's size, and nothing left in flight once every call returned.
fn shared_client_metrics_count_rounds_and_queued_requests(snapshots: &Snapshotter) {
    let m = Memcached::start();
    let label = m.addr();
    let c = support::client_builder()
        .server(&label)
        .shared()
        .io_mode(mcstore::IoMode::IoThread) // every call queued: the counts are exact
        .connections_per_server(2)
        .build()
        .unwrap();
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    let (threads, each) = (16, 200);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let c = c.clone();
            s.spawn(move || {
                for _ in 0..each {
                    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v");
                }
            });
        }
    });
    let all = snapshot(snapshots);
    let server = [("server", label.as_str())];
    let calls = 1 + threads * each;
    assert_eq!(
        value(&all, "mcstore_shared_queued_seconds", &server),
        calls as u64,
        "every queued request's wait, once"
    );
    let rounds = value(&all, "mcstore_shared_batch_size", &server);
    assert!((1..=calls as u64).contains(&rounds), "{rounds} rounds");
    // The gauges fall back to 0 once the I/O thread ends its last round, which it does just
    // after that round's callers have their replies (CI saw 1 round in flight at the first
    // look): waited for, bounded; a count that never falls back fails.
    let waited = std::time::Instant::now();
    let gauges = loop {
        let all = snapshot(snapshots);
        let gauges = (
            value(&all, "mcstore_shared_rounds_in_flight", &server),
            value(&all, "mcstore_shared_in_flight", &server),
        );
        if gauges == (0, 0) || waited.elapsed() > Duration::from_secs(10) {
            break gauges;
        }
        std::thread::yield_now();
    };
    assert_eq!(
        gauges,
        (0, 0),
        "rounds and requests in flight after every call returned"
    );
    println!(
        "shared client: {calls} calls in {rounds} rounds (gauges at 0 after {:?})",
        waited.elapsed()
    );
}

fn traces_have_a_span_per_call_and_events_and_no_keys(capture: &Capture) {
    let mut a = Memcached::start();
    let b = Memcached::start();
    let (la, lb) = (a.addr(), b.addr());
    {
        let mut c = ejecting_client(&la, &lb);
        let keys: Vec<String> = (0..50).map(|i| format!("secret-key-{i}")).collect();
        let ka = keys
            .iter()
            .find(|k| c.server_for_key(k.as_bytes()).unwrap() == la)
            .unwrap()
            .clone();
        c.set(ka.as_bytes(), b"12345", SetOptions::default())
            .unwrap();
        assert!(c.get(ka.as_bytes()).unwrap().is_some());
        c.get_multi(&keys, |_, _| {}).unwrap();
        a.kill();
        assert!(c.get(ka.as_bytes()).is_err());
        // A storage whose write fails to invalidate, then replays once the server is back.
        a.restart();
        let store = MemcacheStorage::new(
            Pool::new(Client::builder().server(la.clone()), 1).unwrap(),
            Arc::new(MemoryStorage::new()),
        );
        store.create_container("c").unwrap();
        let info = store.info("c", Some("secret-resource")).unwrap();
        a.kill();
        store.put_content(&info, "x".into()).unwrap();
        a.restart();
        support::wait_for("the replay", || store.pending_invalidations() == 0);
    }
    let lines = capture.0.lock().unwrap().clone();
    let has = |parts: &[&str]| lines.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    let server_a = format!("server={la}");
    assert!(
        has(&[
            "span mcstore.call",
            "op=store",
            &server_a,
            "keys=1",
            "value_bytes=5",
            "outcome=ok"
        ]),
        "{lines:#?}"
    );
    assert!(has(&[
        "span mcstore.call",
        "op=get",
        &server_a,
        "protocol=Text",
        "outcome=ok"
    ]));
    assert!(has(&[
        "span mcstore.call",
        "op=get_multi",
        "servers=2",
        "keys=50",
        "outcome=ok"
    ]));
    assert!(
        has(&["span mcstore.call", "op=get", &server_a, "outcome=io"]),
        "{lines:#?}"
    );
    assert!(has(&["event", "server ejected", &server_a]), "{lines:#?}");
    assert!(has(&["event", "connected", &server_a]));
    assert!(
        has(&["event", "replayed failed invalidations", "keys=1"]),
        "{lines:#?}"
    );
    for l in &lines {
        assert!(!l.contains("secret"), "a key in a trace: {l}");
    }
}
