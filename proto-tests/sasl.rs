//! SASL PLAIN against a real `memcached -S` (binary protocol only).

use mcstore_test_support as support;

use std::time::Duration;

use mcstore::{Client, Error, Protocol, SetOptions};
use support::Memcached;

fn client(mc: &Memcached, user: &str, password: &str) -> Client {
    support::client_builder()
        .protocol(Protocol::Binary)
        .server(mc.addr())
        .sasl(user, password)
        .io_timeout(Duration::from_secs(2))
        .server_failure_limit(1000)
        .build()
        .unwrap()
}

#[test]
fn right_password_works_wrong_is_auth_error_and_reconnects_reauthenticate() {
    let mut mc = Memcached::start_sasl("mcuser", "s3cret");
    let mut c = client(&mc, "mcuser", "s3cret");
    c.set(b"k", b"v", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v");
    let mut n = 0;
    c.get_multi(&[b"k", b"x"], |_, _| n += 1).unwrap();
    assert_eq!(n, 1);

    for (user, password) in [("mcuser", "wrong"), ("nobody", "s3cret")] {
        let mut bad = client(&mc, user, password);
        match bad.get(b"k") {
            Err(Error::Auth { .. }) => {}
            other => panic!("{user}/{password}: expected an auth error, got {other:?}"),
        }
    }
    // Without SASL the server refuses everything.
    let mut anon = support::client_builder()
        .protocol(Protocol::Binary)
        .server(mc.addr())
        .build()
        .unwrap();
    assert!(matches!(anon.get(b"k"), Err(Error::Auth { .. })));

    // The server restarts: the same client reconnects and authenticates again.
    mc.restart();
    let first = c.get(b"k");
    assert!(
        matches!(first, Ok(None) | Err(Error::Io { .. })),
        "{first:?}"
    );
    c.set(b"k", b"again", SetOptions::default()).unwrap();
    assert_eq!(c.get(b"k").unwrap().unwrap().value, b"again");
    assert!(c.server_counters()[0].1.reconnects >= 1);
}

#[test]
fn sasl_needs_the_binary_protocol() {
    assert!(matches!(
        support::client_builder()
            .server("127.0.0.1:1")
            .sasl("u", "p")
            .build(),
        Err(Error::Config(_))
    ));
}

/// ASCII authentication (`memcached -Y`), text and meta (and over TLS when the suite runs
/// with `MCSTORE_TEST_TLS=1`): the right password works, and keeps working after the
/// server restarts (each new connection authenticates); a wrong one, no credentials at all,
/// and credentials for a server without `-Y` are each an `Error::Auth` saying which.
#[test]
fn ascii_auth_right_wrong_missing_and_unneeded() {
    for protocol in [Protocol::Text, Protocol::Meta] {
        let mut mc = Memcached::start_ascii_auth("alice", "s3cret");
        let build = |user: &str, password: &str| {
            support::client_builder()
                .protocol(protocol)
                .server(mc.addr())
                .ascii_auth(user, password)
                .io_timeout(Duration::from_secs(2))
                .server_failure_limit(1000)
                .build()
                .unwrap()
        };
        let mut c = build("alice", "s3cret");
        c.set(b"k", b"v", SetOptions::default()).unwrap();
        assert_eq!(c.get(b"k").unwrap().unwrap().value, b"v");
        // The shared client's connections authenticate too.
        let shared = support::client_builder()
            .protocol(protocol)
            .server(mc.addr())
            .ascii_auth("alice", "s3cret")
            .shared()
            .build()
            .unwrap();
        assert_eq!(shared.get(b"k").unwrap().unwrap().value, b"v");
        shared.set(b"k2", b"v2", SetOptions::default()).unwrap();
        assert_eq!(c.get(b"k2").unwrap().unwrap().value, b"v2");
        let mut n = 0;
        c.get_multi(&[b"k", b"x"], |_, _| n += 1).unwrap();
        assert_eq!(n, 1, "{protocol:?}");

        for (user, password) in [("alice", "wrong"), ("bob", "s3cret")] {
            match build(user, password).get(b"k") {
                Err(Error::Auth { message, .. }) => {
                    assert!(message.contains("wrong user or password"), "{message}")
                }
                other => panic!("{protocol:?} {user}/{password}: {other:?}"),
            }
        }
        let mut anon = support::client_builder()
            .protocol(protocol)
            .server(mc.addr())
            .build()
            .unwrap();
        match anon.get(b"k") {
            Err(Error::Auth { message, .. }) => {
                assert!(
                    message.contains("requires ASCII authentication"),
                    "{message}"
                )
            }
            other => panic!("{protocol:?} without credentials: {other:?}"),
        }

        mc.restart();
        support::wait_for("the restarted server to take the credentials", || {
            c.set(b"k", b"again", SetOptions::default()).is_ok()
        });
        assert_eq!(c.get(b"k").unwrap().unwrap().value, b"again");

        // Credentials for a server that does not ask: refused, and never sent.
        let open = Memcached::start();
        let mut c = support::client_builder()
            .protocol(protocol)
            .server(open.addr())
            .ascii_auth("alice", "s3cret")
            .build()
            .unwrap();
        match c.get(b"k") {
            Err(Error::Auth { message, .. }) => {
                assert!(message.contains("does not ask for it"), "{message}")
            }
            other => panic!("{protocol:?} on a server without -Y: {other:?}"),
        }
        let mut plain = support::client_builder()
            .protocol(protocol)
            .server(open.addr())
            .build()
            .unwrap();
        assert_eq!(
            plain.get(b"mcstore-auth").unwrap(),
            None,
            "credentials stored"
        );
    }
}

#[test]
fn ascii_auth_is_for_text_and_meta() {
    let e = Client::builder()
        .server("127.0.0.1:11211")
        .protocol(Protocol::Binary)
        .ascii_auth("a", "b")
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("SASL"), "{e}");
    let e = Client::builder()
        .server("127.0.0.1:11211")
        .ascii_auth("a b", "c")
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("without spaces"), "{e}");
}
