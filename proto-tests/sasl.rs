//! SASL PLAIN against a real `memcached -S` (binary protocol only).

mod support;

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
