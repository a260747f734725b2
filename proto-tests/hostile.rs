//! A deliberately hostile fake server: malformed, truncated, oversized and endless replies must
//! give clean errors, never a panic, a hang or an unbounded allocation.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use mcstore::{Client, Error};
use support::Hostile;

const IO_TIMEOUT: Duration = Duration::from_millis(400);

fn client(h: &Hostile) -> Client {
    Client::builder()
        .server(h.addr())
        .io_timeout(IO_TIMEOUT)
        // These tests are about each call's error; ejection is tested in multi_server.rs.
        .server_failure_limit(1000)
        .max_value_size(64 * 1024)
        .build()
        .unwrap()
}

/// A server that answers every request with `reply`.
fn replying(reply: &'static [u8]) -> Hostile {
    Hostile::start(move |_req, s| {
        let _ = s.write_all(reply);
    })
}

fn assert_parse_error(r: mcstore::Result<impl std::fmt::Debug>, what: &str) {
    match r {
        Err(Error::Parse { .. }) => {}
        other => panic!("{what}: expected a parse error, got {other:?}"),
    }
}

#[test]
fn garbage_and_malformed_lines() {
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n",
        b"VALUE k 0 zz\r\nabc\r\nEND\r\n",
        b"VALUE k -1 3\r\nabc\r\nEND\r\n",
        b"VALUE k 0 3\r\nabcde\r\nEND\r\n",
        b"VALUE k 0 3 1 2\r\nabc\r\nEND\r\n",
        b"VALUE other 0 3\r\nabc\r\nEND\r\n",
        b"STORED\r\n",
        b"END\n",
        b"\x00\xff\xfe\r\n",
    ];
    for reply in cases {
        let h = replying(reply);
        let mut c = client(&h);
        assert_parse_error(c.get(b"k"), &reply.escape_ascii().to_string());
    }
}

#[test]
fn wrong_reply_kinds_for_each_command() {
    let h = replying(b"VALUE k 0 1\r\nx\r\nEND\r\n");
    let mut c = client(&h);
    assert_parse_error(c.set(b"k", b"v", Default::default()), "set");
    assert_parse_error(c.delete(b"k"), "delete");
    assert_parse_error(c.incr(b"k", 1), "incr");
    assert_parse_error(c.touch(b"k", 1), "touch");
    assert_parse_error(c.version(), "version");
    assert_parse_error(c.flush_all(None), "flush_all");
    let h = replying(b"99999999999999999999999\r\n");
    assert_parse_error(client(&h).incr(b"k", 1), "huge number");
}

#[test]
fn huge_claimed_length_is_refused_before_buffering() {
    let h = replying(b"VALUE k 0 4294967295\r\n");
    let mut c = client(&h);
    let start = Instant::now();
    match c.get(b"k") {
        Err(Error::Parse { error, .. }) => {
            assert_eq!(error, mcstore::proto::ParseError::ValueTooLarge(4294967295))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        start.elapsed() < IO_TIMEOUT,
        "refused without waiting for data"
    );
}

#[test]
fn endless_line_without_newline_is_refused() {
    let h = Hostile::start(|_req, s| {
        let chunk = [b'A'; 8192];
        for _ in 0..1024 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut c = client(&h);
    match c.get(b"k") {
        Err(Error::Parse { error, .. }) => {
            assert!(matches!(error, mcstore::proto::ParseError::LineTooLong(_)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn close_mid_value_is_an_io_error() {
    let h = Hostile::start(|_req, s| {
        let _ = s.write_all(b"VALUE k 0 100\r\nonly part of it");
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let mut c = client(&h);
    match c.get(b"k") {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof)
        }
        other => panic!("{other:?}"),
    }
    // Close before any reply at all.
    let h = Hostile::start(|_req, s| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    assert!(matches!(client(&h).get(b"k"), Err(Error::Io { .. })));
}

#[test]
fn silent_or_trickling_server_times_out() {
    // Never answers.
    let h = Hostile::start(|_req, _s| {});
    let mut c = client(&h);
    let start = Instant::now();
    assert!(matches!(c.get(b"k"), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < IO_TIMEOUT + Duration::from_millis(1500));
    // Answers one byte at a time, forever: the deadline is per call, not per read.
    let h = Hostile::start(|_req, s| {
        for _ in 0..200 {
            if s.write_all(b"V").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut c = client(&h);
    let start = Instant::now();
    assert!(matches!(c.get(b"k"), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < IO_TIMEOUT + Duration::from_millis(1500));
}

#[test]
fn unsolicited_bytes_force_a_fresh_connection() {
    // First reply is correct but followed by junk; the next call must not read the junk as
    // its own reply.
    let h = replying(b"END\r\nSTORED\r\n");
    let mut c = client(&h);
    assert_eq!(c.get(b"k").unwrap(), None);
    // Either the junk was already buffered (fresh connection, clean answer) or it is read as
    // this call's reply (rejected as not answering a get). Never a wrong answer.
    for _ in 0..5 {
        match c.get(b"k") {
            Ok(None) => {}
            Err(Error::Parse { error, .. }) => {
                assert_eq!(error, mcstore::proto::ParseError::Unexpected)
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(h.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}

#[test]
fn multi_get_is_one_pipelined_request() {
    // This server answers nothing until it has read every `get` line of the request (1,000
    // keys = 10 lines): a client doing one round trip per line would time out here.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen2 = seen.clone();
    let h = Hostile::start(move |req, s| {
        assert!(req.starts_with(b"get "));
        if seen2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 10 {
            let mut out = Vec::new();
            for _ in 0..10 {
                out.extend_from_slice(b"VALUE k0 0 1\r\nx\r\nEND\r\n");
            }
            let _ = s.write_all(&out);
        }
    });
    let mut c = client(&h);
    let keys: Vec<String> = (0..1000).map(|i| format!("k{}", i % 100)).collect();
    let mut n = 0;
    c.get_multi(&keys, |_, _| n += 1).unwrap();
    assert_eq!(n, 10);
}

#[test]
fn pipeline_counts_error_lines() {
    // Every line read gets an error, then `version` gets a version.
    let h = Hostile::start(|req, s| {
        let reply: &[u8] = if req.starts_with(b"version") {
            b"VERSION fake\r\n"
        } else if req.starts_with(b"set") {
            b"SERVER_ERROR out of memory storing object\r\n"
        } else {
            return; // data lines
        };
        let _ = s.write_all(reply);
    });
    let mut c = client(&h);
    let mut p = c.pipeline();
    for i in 0..10 {
        p.set(format!("k{i}").as_bytes(), b"v", Default::default())
            .unwrap();
    }
    let report = p.finish().unwrap();
    assert_eq!((report.commands, report.errors), (10, 10));
    assert!(report.first_error.unwrap().contains("out of memory"));
}
