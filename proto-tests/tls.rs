//! TLS against real memcached (`-Z`) with certificates made at test time: each error case
//! with its kind and time, mutual TLS, resumption, restarts, and frozen servers (the CLI over TLS: cli/tests/tls.rs).
//! (The whole command suite runs over TLS too: `MCSTORE_TEST_TLS=1`, see scripts/test.)

use mcstore_test_support as support;

use std::time::{Duration, Instant};

use mcstore::{Client, During, Error, Protocol, SetOptions, TlsConfig, TlsFailure};
use support::tls::{certs, client_config, mutual_server_args, server_args, Pair};
use support::{wait_for, Memcached};

const CONNECT: Duration = Duration::from_secs(2);
const IO: Duration = Duration::from_secs(2);
/// How late past its timeout an error may come on a shared, loaded machine.
const MARGIN: Duration = Duration::from_millis(1500);

fn tls_server(pair: &Pair) -> Memcached {
    let args = server_args(pair);
    Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn client(mc: &Memcached, tls: Option<TlsConfig>, p: Protocol) -> Client {
    let mut b = Client::builder()
        .server(mc.addr())
        .protocol(p)
        .connect_timeout(CONNECT)
        .io_timeout(IO);
    if let Some(t) = tls {
        b = b.tls(t);
    }
    b.build().unwrap()
}

/// Runs one failing call and checks it failed as `expect` says, within the timeouts; prints a
/// row of the error-case table.
fn case(name: &str, c: &mut Client, expect: impl Fn(&Error) -> bool) {
    let start = Instant::now();
    let r = c.set(b"k", b"v", SetOptions::default());
    let took = start.elapsed();
    let e = r.expect_err(name);
    eprintln!("| {name} | {e} | {took:.1?} |");
    assert!(expect(&e), "{name}: unexpected error {e:?}");
    // A library error names the library's API, never a CLI flag.
    assert!(
        !e.to_string().contains(" --"),
        "{name}: names a CLI flag: {e}"
    );
    assert!(took < CONNECT + IO + MARGIN, "{name}: took {took:?}");
}

fn tls_failure(f: TlsFailure) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::Tls { failure, .. } if *failure == f)
}

#[test]
fn every_protocol_works_over_tls_and_mutual_tls() {
    let c = certs();
    let plain_tls = tls_server(&c.server);
    let args = mutual_server_args(&c.server);
    let mutual = Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        for (mc, tls) in [
            (&plain_tls, client_config(false)),
            (&mutual, client_config(true)),
        ] {
            let mut cl = client(mc, Some(tls), p);
            let v = format!("value over {p:?}");
            cl.set(b"k", v.as_bytes(), SetOptions::default()).unwrap();
            assert_eq!(cl.get(b"k").unwrap().unwrap().value, v.as_bytes());
            // A large value crosses many TLS records both ways.
            let big: Vec<u8> = (0..900_000u32).map(|i| (i % 251) as u8).collect();
            cl.set(b"big", &big, SetOptions::default()).unwrap();
            assert_eq!(cl.get(b"big").unwrap().unwrap().value, big);
            let keys: Vec<String> = (0..500).map(|i| format!("m{i}")).collect();
            for k in &keys {
                cl.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
                    .unwrap();
            }
            let mut got = 0;
            cl.get_multi(&keys, |k, item| {
                assert_eq!(k, item.value);
                got += 1;
            })
            .unwrap();
            assert_eq!(got, 500);
        }
    }
}

#[test]
fn error_cases_are_named_and_bounded() {
    let c = certs();
    eprintln!("| case | error | time |\n|---|---|---|");

    let mc = tls_server(&c.untrusted);
    case(
        "untrusted certificate",
        &mut client(&mc, Some(client_config(false)), Protocol::Text),
        tls_failure(TlsFailure::UntrustedCertificate),
    );

    let mc = tls_server(&c.localhost_only);
    case(
        "wrong host name (127.0.0.1, certificate for localhost only)",
        &mut client(&mc, Some(client_config(false)), Protocol::Text),
        tls_failure(TlsFailure::WrongName),
    );
    let mc = tls_server(&c.server);
    let other = client_config(false)
        .with_server_name("other.example")
        .unwrap();
    case(
        "wrong host name (other.example asked for)",
        &mut client(&mc, Some(other), Protocol::Text),
        tls_failure(TlsFailure::WrongName),
    );

    let mc = tls_server(&c.expired);
    case(
        "expired certificate",
        &mut client(&mc, Some(client_config(false)), Protocol::Text),
        tls_failure(TlsFailure::Expired),
    );

    let plain = Memcached::with_args(&[]);
    assert!(plain.answers_plain());
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        case(
            &format!("TLS to a plain-text server ({p:?})"),
            &mut client(&plain, Some(client_config(false)), p),
            tls_failure(TlsFailure::NotTls),
        );
    }

    let mc = tls_server(&c.server);
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        case(
            &format!("plain text to a TLS server ({p:?})"),
            &mut client(&mc, None, p),
            |e| matches!(e, Error::Io { .. }) && e.to_string().contains("require TLS"),
        );
    }

    let args = mutual_server_args(&c.server);
    let mutual = Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    case(
        "mutual TLS required, no client certificate",
        &mut client(&mutual, Some(client_config(false)), Protocol::Text),
        tls_failure(TlsFailure::ClientCertRequired),
    );

    // Files: at build time, naming the file.
    let missing = c.dir.join("missing.pem");
    let garbage = c.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (name, b) in [
        ("missing CA file", TlsConfig::builder().ca_file(&missing)),
        (
            "CA file without a certificate",
            TlsConfig::builder().ca_file(&garbage),
        ),
        (
            "missing client key",
            TlsConfig::builder()
                .ca_file(&c.ca)
                .client_cert(&c.client.cert, &missing),
        ),
        (
            "client key that is not a key",
            TlsConfig::builder()
                .ca_file(&c.ca)
                .client_cert(&c.client.cert, &garbage),
        ),
    ] {
        let start = Instant::now();
        let e = b.build().expect_err(name);
        eprintln!("| {name} | {e} | {:.1?} |", start.elapsed());
        assert!(matches!(e, Error::Config(_)), "{name}: {e:?}");
        let file = if name.contains("without") || name.contains("not a key") {
            &garbage
        } else {
            &missing
        };
        assert!(
            e.to_string().contains(&file.display().to_string()),
            "{name}: the error names no file: {e}"
        );
    }
    assert!(matches!(
        TlsConfig::builder()
            .ca_file(&c.ca)
            .server_name("not a name!")
            .build(),
        Err(Error::Config(_))
    ));
}

#[test]
fn reconnects_resume_the_session_and_restarts_handshake_again() {
    let c = certs();
    let mut mc = tls_server(&c.server);
    let mut cl = client(&mc, Some(client_config(false)), Protocol::Text);
    cl.set(b"k", b"v1", SetOptions::default()).unwrap();
    let resumptions = |cl: &Client| cl.server_counters()[0].1.tls_resumptions;
    assert_eq!(resumptions(&cl), 0, "first handshake is a full one");
    // `quit` closes the connection; the next call reconnects and resumes (TLS 1.3 tickets).
    cl.quit().unwrap();
    assert_eq!(cl.get(b"k").unwrap().unwrap().value, b"v1");
    assert_eq!(resumptions(&cl), 1, "a reconnect resumes");
    assert_eq!(cl.server_counters()[0].1.reconnects, 1);

    // A restarted server (new process, new ticket keys): the next calls reconnect with a
    // full handshake and work.
    mc.restart();
    wait_for("the client to reconnect after a restart", || {
        cl.set(b"k", b"v2", SetOptions::default()).is_ok()
    });
    assert_eq!(cl.get(b"k").unwrap().unwrap().value, b"v2");
    assert!(cl.server_counters()[0].1.reconnects >= 2);
    assert_eq!(
        resumptions(&cl),
        1,
        "a new process's tickets: a full handshake"
    );
}

#[test]
fn a_frozen_tls_server_is_bounded_by_the_timeouts() {
    let c = certs();
    let mc = tls_server(&c.server);
    let short = Duration::from_millis(400);
    let build = || {
        Client::builder()
            .server(mc.addr())
            .tls(client_config(false))
            .connect_timeout(short)
            .io_timeout(short)
            .server_failure_limit(1000)
            .build()
            .unwrap()
    };
    // During the handshake: the TCP connect succeeds (the kernel accepts), the handshake
    // gets no answer.
    mc.freeze();
    let mut fresh = build();
    let start = Instant::now();
    let e = fresh.get(b"k").unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            e,
            Error::Timeout {
                during: During::Connect,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(took >= short && took < short + MARGIN, "{took:?}");
    mc.resume();
    // During a call on an established session.
    let mut cl = build();
    cl.set(b"k", b"v", SetOptions::default()).unwrap();
    mc.freeze();
    let start = Instant::now();
    let e = cl.get(b"k").unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(took >= short && took < short + MARGIN, "{took:?}");
    mc.resume();
    // The late reply was dropped with the connection; the next call is clean.
    assert_eq!(cl.get(b"k").unwrap().unwrap().value, b"v");
    assert_eq!(fresh.get(b"k").unwrap().unwrap().value, b"v");
}

#[test]
fn storage_over_tls() {
    use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
    let mc = tls_server(&certs().server);
    let pool = mcstore::Pool::new(
        Client::builder()
            .server(mc.addr())
            .tls(client_config(false)),
        2,
    )
    .unwrap();
    let master = std::sync::Arc::new(MemoryStorage::new());
    let s = MemcacheStorage::new(pool, master);
    s.create_container("c").unwrap();
    let r = s.info("c", Some("r")).unwrap();
    s.put_content(&r, "hello".into()).unwrap();
    assert_eq!(&s.get_content(&r).unwrap()[..], b"hello");
    assert_eq!(&s.get_content(&r).unwrap()[..], b"hello");
    s.put_content(&r, "v2".into()).unwrap();
    assert_eq!(&s.get_content(&r).unwrap()[..], b"v2");
    let n = s.counters();
    assert!(n.hits >= 1, "a read came from memcached: {n:?}");
    assert_eq!(n.cache_errors, 0, "{n:?}");
}

/// memcached 1.6.18 with OpenSSL stalls on a pipelined request of replied commands longer
/// than about one TLS record plus 10 KiB (it answers the first record's commands, then waits
/// on the socket while the rest sits in OpenSSL's buffer; Python's `ssl` client stalls the
/// same way). The client sends such multi-stores and multi-deletes in record-sized chunks.
#[test]
fn large_batches_over_tls_are_answered() {
    let servers: Vec<Memcached> = (0..3).map(|_| tls_server(&certs().server)).collect();
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        let mut c = Client::builder()
            .servers(servers.iter().map(Memcached::addr))
            .protocol(p)
            .tls(client_config(false))
            .io_timeout(IO)
            .build()
            .unwrap();
        let keys: Vec<String> = (0..6000)
            .map(|i| format!("key-{i}-long-enough-to-matter"))
            .collect();
        let items: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "value")).collect();
        assert_eq!(c.set_multi(&items, SetOptions::default()).unwrap(), 6000);
        let mut n = 0;
        c.get_multi(&keys, |_, _| n += 1).unwrap();
        assert_eq!(n, 6000);
        let half: Vec<&String> = keys.iter().step_by(2).collect();
        assert_eq!(c.delete_multi(&half).unwrap(), 3000);
        let mut n = 0;
        c.get_multi(&keys, |_, _| n += 1).unwrap();
        assert_eq!(n, 3000);
    }
}
