//! A deliberately hostile fake server: malformed, truncated, oversized and endless replies must
//! give clean errors, never a panic, a hang or an unbounded allocation.

use mcstore_test_support as support;

use std::io::Write;
use std::time::{Duration, Instant};

use mcstore::{Client, Error};
use support::Hostile;

const IO_TIMEOUT: Duration = Duration::from_millis(400);

fn client(h: &Hostile) -> Client {
    support::client_builder()
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

/// A get answered by a header claiming 4 GiB: refused from the header, without waiting.
fn assert_huge_length_refused(c: &mut Client) {
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
fn huge_claimed_length_is_refused_before_buffering() {
    let h = replying(b"VALUE k 0 4294967295\r\n");
    assert_huge_length_refused(&mut client(&h));
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

/// The hostile server for the binary protocol: it reads whole request packets and answers each
/// with what `respond` returns.
fn binary_hostile(
    respond: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = std::sync::Arc::new(respond);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut conn = support::HostileConn::new(conn);
            let respond = respond.clone();
            std::thread::spawn(move || loop {
                let mut header = [0u8; 24];
                if conn.read_exact(&mut header).is_err() {
                    return;
                }
                let body = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
                let mut rest = vec![0u8; body];
                if conn.read_exact(&mut rest).is_err() {
                    return;
                }
                let mut packet = header.to_vec();
                packet.extend_from_slice(&rest);
                let out = respond(&packet);
                if conn.write_all(&out).is_err() {
                    return;
                }
            });
        }
    });
    addr
}

fn binary_client(addr: std::net::SocketAddr) -> Client {
    support::client_builder()
        .protocol(mcstore::Protocol::Binary)
        .server(addr.to_string())
        .io_timeout(IO_TIMEOUT)
        .server_failure_limit(1000)
        .max_value_size(64 * 1024)
        .build()
        .unwrap()
}

/// A well-formed reply to `req` (opaque echoed), with the given status, extras and value.
fn reply(req: &[u8], status: u16, extras: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    mcstore::proto::binary::Packet {
        opcode: mcstore::proto::binary::Opcode(req[1]),
        status,
        opaque: u32::from_be_bytes(req[12..16].try_into().unwrap()),
        cas: 1,
        extras,
        key: b"",
        value,
    }
    .encode(&mut out);
    out
}

#[test]
fn binary_malformed_headers_are_clean_errors() {
    type Case = (&'static str, fn(&[u8]) -> Vec<u8>);
    let cases: &[Case] = &[
        ("wrong magic", |req| {
            let mut r = reply(req, 0, &[0, 0, 0, 0], b"v");
            r[0] = 0x80;
            r
        }),
        ("body shorter than key + extras", |req| {
            let mut r = reply(req, 0, &[0, 0, 0, 0], b"");
            r[2..4].copy_from_slice(&10u16.to_be_bytes());
            r
        }),
        ("4 GiB claimed", |req| {
            let mut r = reply(req, 0, &[], b"");
            r[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
            r
        }),
        ("wrong opaque", |req| {
            let mut r = reply(req, 0, &[0, 0, 0, 0], b"v");
            r[12..16].copy_from_slice(&0xdead_beefu32.to_be_bytes());
            r
        }),
        ("text instead of binary", |_| {
            b"VALUE k 0 1\r\nv\r\nEND\r\n".to_vec()
        }),
    ];
    for (name, respond) in cases {
        let addr = binary_hostile(*respond);
        let mut c = binary_client(addr);
        let start = Instant::now();
        match c.get(b"k") {
            Err(Error::Parse { .. }) => {}
            other => panic!("{name}: expected a parse error, got {other:?}"),
        }
        assert!(
            start.elapsed() < IO_TIMEOUT,
            "{name}: refused without waiting"
        );
        // The wrong-opaque reply was never handed to anyone: a multi-get sees the same.
        if *name == "wrong opaque" {
            assert!(matches!(
                c.get_multi(&[b"a", b"b"], |_, _| panic!("mismatched reply delivered")),
                Err(Error::Parse { .. })
            ));
        }
    }
}

#[test]
fn binary_truncated_and_silent_servers() {
    // Closes mid-value.
    let addr = binary_hostile(|req| {
        let mut r = reply(req, 0, &[0, 0, 0, 0], &[b'v'; 100]);
        r.truncate(60);
        r
    });
    // The fake answers then the connection stays open with the value incomplete: a timeout.
    let mut c = binary_client(addr);
    assert!(matches!(c.get(b"k"), Err(Error::Timeout { .. })));
    // Never answers.
    let addr = binary_hostile(|_| Vec::new());
    let mut c = binary_client(addr);
    let start = Instant::now();
    assert!(matches!(
        c.set(b"k", b"v", Default::default()),
        Err(Error::Timeout { .. })
    ));
    assert!(start.elapsed() < IO_TIMEOUT + Duration::from_millis(1500));
    // A reply of the wrong kind for a storage command (a value where none belongs) is fine
    // to ignore only if the status says success; an unknown status is a typed server error.
    let addr = binary_hostile(|req| reply(req, 0x0099, &[], b"strange"));
    let mut c = binary_client(addr);
    match c.set(b"k", b"v", Default::default()) {
        Err(Error::Server { message, .. }) => assert_eq!(message, "strange"),
        other => panic!("{other:?}"),
    }
}

fn meta_client(h: &Hostile) -> Client {
    support::client_builder()
        .server(h.addr())
        .protocol(mcstore::Protocol::Meta)
        .io_timeout(IO_TIMEOUT)
        .server_failure_limit(1000)
        .max_value_size(64 * 1024)
        .build()
        .unwrap()
}

#[test]
fn meta_malformed_and_wrong_replies() {
    let cases: &[&[u8]] = &[
        b"VA zz\r\nabc\r\n",
        b"VA 3\r\nabcde\r\n",
        b"VA 1 f-1\r\nx\r\n",
        b"HD c1  f2\r\n",
        b"HD W1\r\n",
        b"XX\r\n",
        b"VALUE k 0 1\r\nx\r\nEND\r\n",
        b"MN\r\n",
        b"NS\r\n",
        b"EN\n",
        b"\x00\xff\xfe\r\n",
    ];
    for reply in cases {
        let h = replying(reply);
        let mut c = meta_client(&h);
        assert_parse_error(c.get(b"k"), &reply.escape_ascii().to_string());
    }
    // A value where none belongs, for each command; a non-number from ma.
    let h = replying(b"VA 1\r\nx\r\n");
    let mut c = meta_client(&h);
    assert_parse_error(c.set(b"k", b"v", Default::default()), "set");
    assert_parse_error(c.delete(b"k"), "delete");
    assert_parse_error(c.incr(b"k", 1), "incr");
    assert_parse_error(c.touch(b"k", 1), "touch");
    assert_parse_error(c.invalidate(b"k", None), "invalidate");
    // Error lines are typed server errors.
    let h = replying(b"CLIENT_ERROR bad command line format\r\n");
    match meta_client(&h).get(b"k") {
        Err(Error::Server { message, .. }) => assert_eq!(message, "bad command line format"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn meta_huge_claimed_length_is_refused_before_buffering() {
    let h = replying(b"VA 4294967295 f0\r\n");
    assert_huge_length_refused(&mut meta_client(&h));
}

/// A meta fake that answers a multi-get batch (`mg ... q O<n>` lines then `mn`) with `answer`
/// once it has seen the `mn`; in `answer`, `O#0` and `O#1` stand for the opaques the first
/// and second `mg` of the batch carried.
fn meta_batch_server(answer: &'static [u8]) -> Hostile {
    let sent = std::sync::Mutex::new(Vec::<String>::new());
    Hostile::start(move |req, s| {
        let line = String::from_utf8_lossy(req);
        let mut sent = sent.lock().unwrap();
        if line.starts_with("mg ") {
            let o = line.split_whitespace().find(|t| t.starts_with('O'));
            sent.push(o.unwrap_or("O?").to_string());
        }
        if req.starts_with(b"mn") {
            let mut a = String::from_utf8_lossy(answer).into_owned();
            for (j, o) in sent.iter().enumerate() {
                a = a.replace(&format!("O#{j}"), o);
            }
            sent.clear();
            let _ = s.write_all(a.as_bytes());
        }
    })
}

#[test]
fn meta_multi_get_replies_must_match_requests() {
    // Opaques name the key's item in the call (unique on the connection).
    let good = meta_batch_server(b"VA 1 f0 O#1\r\nb\r\nMN\r\n");
    let mut got = Vec::new();
    meta_client(&good)
        .get_multi(&[&b"a"[..], b"b"], |k, item| {
            got.push((k.to_vec(), item.value.to_vec()))
        })
        .unwrap();
    assert_eq!(got, vec![(b"b".to_vec(), b"b".to_vec())]);
    for bad in [
        &b"VA 1 f0 O7\r\nx\r\nMN\r\n"[..], // an opaque we never sent
        b"VA 1 f0\r\nx\r\nMN\r\n",         // no opaque at all
        b"VA 1 f0 O#1\r\nx\r\nVA 1 f0 O#0\r\ny\r\nMN\r\n", // out of order
        b"VA 1 f0 O#0\r\nx\r\nVA 1 f0 O#0\r\ny\r\nMN\r\n", // the same key twice
        b"HD O#0\r\nMN\r\n",               // no value for a value request
        b"VA 1 f0 O0\r\nx\r\nMN\r\n",      // an index, not an opaque we sent
    ] {
        let h = meta_batch_server(bad);
        let mut called = 0;
        let r = meta_client(&h).get_multi(&[&b"a"[..], b"b"], |_, _| called += 1);
        assert_parse_error(r, &bad.escape_ascii().to_string());
        assert!(called <= 1, "never a reply handed to the wrong key");
    }
    // The batch never ends: a timeout, not a hang.
    let h = meta_batch_server(b"VA 1 f0 O#0\r\nx\r\n");
    assert!(matches!(
        meta_client(&h).get_multi(&[&b"a"[..]], |_, _| {}),
        Err(Error::Timeout { .. })
    ));
}

#[test]
fn meta_truncated_and_silent_servers() {
    let h = Hostile::start(|_req, s| {
        let _ = s.write_all(b"VA 100 f0\r\nonly part of it");
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    match meta_client(&h).get(b"k") {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof)
        }
        other => panic!("{other:?}"),
    }
    let h = Hostile::start(|_req, _s| {});
    let start = Instant::now();
    assert!(matches!(
        meta_client(&h).set(b"k", b"v", Default::default()),
        Err(Error::Timeout { .. })
    ));
    assert!(start.elapsed() < IO_TIMEOUT + Duration::from_millis(1500));
}

#[test]
fn meta_multi_get_hit_naming_a_key_but_no_opaque_is_refused() {
    // `k` echoes the key, but a meta batch item is named by its opaque alone.
    let h = meta_batch_server(b"VA 1 f0 kb\r\nx\r\nMN\r\n");
    let mut called = 0;
    let r = meta_client(&h).get_multi(&[&b"a"[..], b"b"], |_, _| called += 1);
    assert_parse_error(r, "a hit with a key and no opaque");
    assert_eq!(called, 0);
}

/// #31: a server that reads a request and closes the connection without a word (what
/// twemproxy, which speaks only text, does to a meta command) is not guessed to want TLS
/// (on 22ee596 the error asked "does the server require TLS?"); the hint names the protocol.
#[test]
fn a_close_after_reading_is_not_taken_for_tls() {
    if support::tls_mode() {
        return; // a hint about plain connections: over TLS, the handshake's errors say it
    }
    let h = Hostile::start(|_, conn| {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    });
    let mut c = support::client_builder()
        .server(format!("127.0.0.1:{}", h.port))
        .protocol(mcstore::Protocol::Meta)
        .io_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let e = c.get(b"k").unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        text.contains("speak this protocol") && !text.contains("TLS"),
        "{text}"
    );
}
