//! The CLI over TLS against real memcached (`-Z`), with certificates made at test time: a
//! round trip, and each error case as one line, bounded in time.

use std::process::Command;
use std::time::{Duration, Instant};

use mcstore_test_support as support;
use support::tls::{certs, server_args, Pair};
use support::Memcached;

fn tls_server(pair: &Pair) -> Memcached {
    let args = server_args(pair);
    Memcached::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn mcstore_cli(args: &[&str]) -> (bool, String, String, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mcstore"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn cli_over_tls_and_its_errors() {
    let c = certs();
    let mc = tls_server(&c.server);
    let addr = mc.addr();
    let ca = c.ca.display().to_string();
    let base = ["--servers", addr.as_str(), "--tls", "--tls-ca", ca.as_str()];
    let (ok, _, err, _) = mcstore_cli(&[&base[..], &["set", "k", "hello"]].concat());
    assert!(ok, "{err}");
    let (ok, out, err, _) = mcstore_cli(&[&base[..], &["get", "k"]].concat());
    assert!(ok, "{err}");
    assert_eq!(out, "hello");

    let plain = Memcached::with_args(&[]);
    let plain_addr = plain.addr();
    let untrusted = tls_server(&c.untrusted);
    let untrusted_addr = untrusted.addr();
    let missing = c.dir.join("nope.pem").display().to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "plain text to a TLS server",
            vec!["--servers", &addr, "get", "k"],
        ),
        (
            "TLS to a plain-text server",
            vec!["--servers", &plain_addr, "--tls-ca", &ca, "get", "k"],
        ),
        (
            "untrusted certificate",
            vec!["--servers", &untrusted_addr, "--tls-ca", &ca, "get", "k"],
        ),
        (
            "wrong name",
            vec![
                "--servers",
                &addr,
                "--tls-ca",
                &ca,
                "--tls-server-name",
                "other.example",
                "get",
                "k",
            ],
        ),
        (
            "missing CA file",
            vec!["--servers", &addr, "--tls-ca", &missing, "get", "k"],
        ),
    ];
    for (name, args) in cases {
        let (ok, _, err, took) = mcstore_cli(&args);
        eprintln!("| {name} | {} | {took:.1?} |", err.trim());
        assert!(!ok, "{name}: exit 0");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        // A configuration error, or (since #31's per-key rule) the key that failed.
        assert!(
            err.starts_with("mcstore: error: ") || err.starts_with("mcstore: k: "),
            "{name}: {err}"
        );
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
        // The library names its own API; the CLI adds the flag that fixes it.
        let flag = match name {
            "untrusted certificate" => Some("--tls-ca"),
            "wrong name" => Some("--tls-server-name"),
            _ => None,
        };
        if let Some(flag) = flag {
            assert!(err.contains(flag), "{name}: no {flag} hint: {err}");
        }
    }
}
