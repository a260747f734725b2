//! The `mcstore` binary against a real memcached.

use mcstore_test_support as support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::{Memcached, TempDir};

fn mcstore(servers: &str, args: &[&str], stdin: &[u8]) -> Output {
    mcstore_bare(&[&["--servers", servers], args].concat(), stdin)
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn memcached_commands() {
    let mc = Memcached::start();
    let s = &mc.addr();
    ok(&mcstore(s, &["set", "k", "hello"], b""));
    assert_eq!(ok(&mcstore(s, &["get", "k"], b"")), "hello");
    ok(&mcstore(s, &["set", "bin"], b"\x00\xffraw\r\n"));
    assert_eq!(mcstore(s, &["get", "bin"], b"").stdout, b"\x00\xffraw\r\n");
    fails_with(&mcstore(s, &["add", "k", "x"], b""), "not stored");
    ok(&mcstore(
        s,
        &["add", "new", "x", "--ttl", "100", "--flags", "3"],
        b"",
    ));
    ok(&mcstore(s, &["set", "n", "41"], b""));
    assert_eq!(ok(&mcstore(s, &["incr", "n"], b"")), "42\n");
    assert_eq!(ok(&mcstore(s, &["decr", "n", "2"], b"")), "40\n");
    fails_with(&mcstore(s, &["incr", "missing"], b""), "not found");
    ok(&mcstore(s, &["touch", "k", "100"], b""));
    ok(&mcstore(s, &["delete", "k"], b""));
    let o = mcstore(s, &["get", "k"], b"");
    assert!(!o.status.success() && o.stdout.is_empty());
    assert!(ok(&mcstore(s, &["version"], b"")).starts_with(&format!("{s}\t1.")));
    assert!(ok(&mcstore(s, &["stats"], b"")).contains("\tcurr_items: "));
    assert!(ok(&mcstore(s, &["stats", "settings"], b"")).contains("\tmaxbytes: 67108864"));
    ok(&mcstore(s, &["flush"], b""));
    fails_with(&mcstore(s, &["get", "new"], b""), "not found: new");
    fails_with(&mcstore(s, &["set", "bad key", "v"], b""), "invalid key");
    // The binary protocol through the CLI.
    ok(&mcstore(
        s,
        &["--protocol", "binary", "set", "b", "binval"],
        b"",
    ));
    assert_eq!(
        ok(&mcstore(s, &["--protocol", "binary", "get", "b"], b"")),
        "binval"
    );
    // A dead server: one clear error line.
    let dead = format!("127.0.0.1:{}", support::free_port());
    fails_with(&mcstore(&dead, &["get", "k"], b""), "I/O error");
}

#[test]
fn ring_maps_raw_keys() {
    let servers = "10.0.1.1:11211,10.0.1.2:11211,10.0.1.3:11212";
    let o = mcstore(
        servers,
        &["ring", "--distribution", "ketama"],
        b"foo\nbar\nhello\nuser:1000\n\xff\xfe\n",
    );
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    // The reference's table 5.4 (libmemcached's own placements).
    assert_eq!(
        &lines[..4],
        [
            "foo\t10.0.1.1:11211",
            "bar\t10.0.1.1:11211",
            "hello\t10.0.1.3:11212",
            "user:1000\t10.0.1.2:11211"
        ]
    );
    assert_eq!(lines.len(), 5);
    let o = mcstore(servers, &["ring"], b"foo\nbar\n");
    assert_eq!(ok(&o), "foo\t10.0.1.1:11211\nbar\t10.0.1.2:11211\n");
    let o = mcstore(
        servers,
        &["ring", "--distribution", "ketama_weighted", "--hash", "md5"],
        b"foo\nbar\n",
    );
    assert_eq!(ok(&o), "foo\t10.0.1.1:11211\nbar\t10.0.1.3:11212\n");
    // Usage errors are clap's (exit status 2, with a hint line).
    let o = mcstore(servers, &["ring", "--hash", "sha1"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown hash"));
}

/// `ring --compare OLD NEW`: the share of keys a change of server list moves, beside the
/// ideal 1/N; keys from stdin or generated. Ketama moves about 1/N, modula nearly all.
#[test]
fn ring_compare_counts_the_keys_a_change_moves() {
    let field = |out: &str, name: &str| -> f64 {
        let v = out
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap();
        v.trim_start_matches('=').parse().unwrap()
    };
    let (old, new) = (
        "10.0.1.1:11211,10.0.1.2:11211,10.0.1.3:11211",
        "10.0.1.1:11211,10.0.1.2:11211,10.0.1.3:11211,10.0.1.4:11211",
    );
    let args = |d: &'static str| {
        [
            "--distribution",
            d,
            "ring",
            "--compare",
            old,
            new,
            "--generate",
            "20000",
        ]
    };
    // The global --servers is not part of either list.
    let ketama = ok(&mcstore("10.9.9.9:1", &args("ketama"), b""));
    assert_eq!(field(&ketama, "keys"), 20000.0, "{ketama}");
    assert!(
        (0.15..0.35).contains(&field(&ketama, "fraction")),
        "{ketama}"
    );
    assert_eq!(field(&ketama, "ideal"), 0.25, "{ketama}");
    let modula = ok(&mcstore("10.9.9.9:1", &args("modula"), b""));
    assert!(field(&modula, "fraction") > 0.5, "{modula}");
    // Keys from stdin: the same list on both sides moves nothing.
    let same = ok(&mcstore(
        "10.9.9.9:1",
        &["ring", "--compare", old, old],
        b"foo\nbar\r\nbaz\n",
    ));
    assert!(same.starts_with("keys=3 moved=0 "), "{same}");
    // An empty list is an error, said once.
    let o = mcstore("10.9.9.9:1", &["ring", "--compare", old, ""], b"foo\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no servers"),
        "{o:?}"
    );
}

#[test]
fn store_commands_and_traversal() {
    let mc = Memcached::start();
    let s = &mc.addr();
    let outer = TempDir::new("mcstore-cli");
    let root = outer.path.join("data");
    let root = root.to_str().unwrap();
    ok(&mcstore(
        s,
        &["store", "--root", root, "put", "posts", "hello.txt"],
        b"hello world",
    ));
    ok(&mcstore(
        s,
        &[
            "store",
            "--root",
            root,
            "put",
            "posts",
            "hello.txt",
            "--meta",
        ],
        b"<entry/>",
    ));
    assert_eq!(
        ok(&mcstore(
            s,
            &["store", "--root", root, "get", "posts", "hello.txt"],
            b""
        )),
        "hello world"
    );
    assert_eq!(
        ok(&mcstore(
            s,
            &[
                "store",
                "--root",
                root,
                "get",
                "posts",
                "hello.txt",
                "--meta"
            ],
            b""
        )),
        "<entry/>"
    );
    assert_eq!(
        ok(&mcstore(s, &["store", "--root", root, "ls", "posts"], b"")),
        "hello.txt\n"
    );
    assert_eq!(
        ok(&mcstore(
            s,
            &["store", "--root", root, "ls", "posts", "--ext", "xml"],
            b""
        )),
        ""
    );
    ok(&mcstore(
        s,
        &["store", "--root", root, "exists", "posts", "hello.txt"],
        b"",
    ));
    assert!(ok(&mcstore(
        s,
        &["store", "--root", root, "info", "posts", "hello.txt"],
        b""
    ))
    .contains("cache key\tmcs:posts:"));
    ok(&mcstore(
        s,
        &["store", "--root", root, "rm", "posts", "hello.txt"],
        b"",
    ));
    ok(&mcstore(
        s,
        &[
            "store",
            "--root",
            root,
            "rm",
            "posts",
            "hello.txt",
            "--meta",
        ],
        b"",
    ));
    assert!(!mcstore(
        s,
        &["store", "--root", root, "exists", "posts", "hello.txt"],
        b""
    )
    .status
    .success());
    fails_with(
        &mcstore(
            s,
            &["store", "--root", root, "get", "posts", "hello.txt"],
            b"",
        ),
        "not found",
    );
    // Traversal: a clear error, nothing created outside the root.
    for (c, n) in [
        ("c", "../../x"),
        ("..", "x"),
        ("c", "/etc/passwd"),
        ("../c", "x"),
        ("c", "a/../../b"),
    ] {
        fails_with(
            &mcstore(s, &["store", "--root", root, "put", c, n], b"evil"),
            "invalid name",
        );
    }
    let outside: Vec<_> = std::fs::read_dir(&outer.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["data"]);
    // With the cache down, the store still works from the master.
    let dead = format!("127.0.0.1:{}", support::free_port());
    ok(&mcstore(
        &dead,
        &["store", "--root", root, "put", "posts", "offline.txt"],
        b"still works",
    ));
    assert_eq!(
        ok(&mcstore(
            &dead,
            &["store", "--root", root, "get", "posts", "offline.txt"],
            b""
        )),
        "still works"
    );
}

#[test]
fn demo_runs_against_a_given_server() {
    let mc = Memcached::start();
    let out = ok(&mcstore(&mc.addr(), &["demo", "--resources", "50"], b""));
    assert!(out.contains("hits 150 / misses 50"), "{out}");
    assert!(out.contains("all content verified"), "{out}");
    assert!(
        out.contains("reads missed the cache and filled it (50 fills)"),
        "{out}"
    );
    // With the cache down, the demo still works from the master and says what happened
    // (22ee596 printed "every read missed the cache and filled it" beside "fills 0").
    let dead = format!("127.0.0.1:{}", support::free_port());
    let out = ok(&mcstore(
        &dead,
        &["--timeout-ms", "100", "demo", "--resources", "20"],
        b"",
    ));
    assert!(out.contains("nothing could be cached"), "{out}");
    assert!(out.contains("all content verified"), "{out}");
}

/// `mcstore slap`: preloads, runs the callers, prints a latency table and ends with exactly one
/// RESULT line in the documented format; no progress bar when stdout is not a terminal.
#[test]
fn slap_prints_a_latency_table_and_one_result_line() {
    let mc = Memcached::start();
    let s = &mc.addr();
    for args in [
        &["slap", "--callers", "4", "-n", "2000", "-k", "100"][..],
        &[
            "slap",
            "--callers",
            "8",
            "-n",
            "2000",
            "-k",
            "100",
            "--mode",
            "async",
        ][..],
        &[
            "slap",
            "--callers",
            "8",
            "-n",
            "2000",
            "-k",
            "100",
            "-w",
            "mix",
            "--mode",
            "async",
            "--runtime",
            "multi",
        ][..],
        &[
            "--protocol",
            "meta",
            "slap",
            "--callers",
            "8",
            "-n",
            "2000",
            "-k",
            "100",
            "-w",
            "set",
        ][..],
        &[
            "--protocol",
            "binary",
            "slap",
            "--callers",
            "1",
            "-n",
            "500",
            "-k",
            "100",
            "--client",
            "plain",
        ][..],
        &[
            "slap",
            "--callers",
            "4",
            "-n",
            "1000",
            "-k",
            "100",
            "--io-mode",
            "combining",
        ][..],
    ] {
        let out = ok(&mcstore(s, args, b""));
        let lines: Vec<&str> = out.lines().collect();
        let last = *lines.last().unwrap();
        assert!(last.starts_with("RESULT client=mcstore"), "{args:?}: {out}");
        assert_eq!(out.matches("RESULT").count(), 1, "{out}");
        let fields: Vec<&str> = last
            .split_whitespace()
            .skip(1)
            .map(|f| f.split('=').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "client",
                "proto",
                "workload",
                "callers",
                "ops",
                "wall_s",
                "ops_per_s",
                "cpu_us_per_op",
                "p50_us",
                "p99_us",
                // Added by #31 (fields are only ever added, after these).
                "errors",
                "rate",
                "verify",
                "interrupted",
                // Added for #27's fault benchmark (scripts/faults).
                "p999_us",
                "max_us",
                "failed",
                // #27: what copies did (0 without --replicas).
                "failovers",
                "hedges",
                "hedges_won",
                "hedges_refused",
                // #28: gets that found nothing, apart from failed calls.
                "misses",
                "list_changes",
                // #29: connections per server (--conns), rounds in flight on each (--depth).
                "conns",
                "depth"
            ],
            "{last}"
        );
        for q in ["p50", "p90", "p99", "p99.9"] {
            assert!(
                lines.iter().any(|l| l.trim_start().starts_with(q)),
                "{q} missing: {out}"
            );
        }
        assert!(
            !out.contains('\r') && !out.contains(" eta "),
            "a progress bar on a pipe: {out}"
        );
    }
    // The keys were preloaded: key:0 .. key:99.
    assert_eq!(ok(&mcstore(s, &["get", "key:99"], b"")).len(), 100);
    fails_with(
        &mcstore(s, &["slap", "-w", "scan"], b""),
        "unknown workload",
    );
    fails_with(
        &mcstore(s, &["slap", "--client", "pool", "--mode", "async"], b""),
        "threads only",
    );
}

/// `--user`/`--password` mean ASCII authentication over text and meta (memcached -Y).
#[test]
fn user_and_password_authenticate_text_and_meta() {
    let mc = Memcached::start_ascii_auth("alice", "s3cret");
    for protocol in ["text", "meta"] {
        let auth = [
            "--protocol",
            protocol,
            "--user",
            "alice",
            "--password",
            "s3cret",
        ];
        ok(&mcstore(
            &mc.addr(),
            &[&auth[..], &["set", "k", "v"]].concat(),
            b"",
        ));
        assert_eq!(
            ok(&mcstore(
                &mc.addr(),
                &[&auth[..], &["get", "k"]].concat(),
                b""
            )),
            "v"
        );
        let wrong = [
            "--protocol",
            protocol,
            "--user",
            "alice",
            "--password",
            "nope",
        ];
        fails_with(
            &mcstore(&mc.addr(), &[&wrong[..], &["get", "k"]].concat(), b""),
            "wrong user or password",
        );
        fails_with(
            &mcstore(&mc.addr(), &["--protocol", protocol, "get", "k"], b""),
            "requires ASCII authentication",
        );
    }
}

/// #31: one rule for commands that go to every server. With one server of two dead,
/// `version`, `stats` and `flush` print the live server's output, name the dead one on
/// stderr, and exit 1 (on 22ee596: `stats` exited 0 with the error on stdout, `version`
/// printed nothing, `flush` said nothing of the live server).
#[test]
fn a_dead_server_is_named_and_the_live_ones_still_answer() {
    let mc = Memcached::start();
    let dead = format!("127.0.0.1:{}", support::free_port());
    let servers = format!("{},{dead}", mc.addr());
    let version = mcstore(&servers, &["version"], b"");
    let stats = mcstore(&servers, &["stats"], b"");
    let flush = mcstore(&servers, &["flush"], b"");
    for (name, o) in [("version", &version), ("stats", &stats), ("flush", &flush)] {
        assert_eq!(o.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(
            err.contains(&dead) && !err.contains(&mc.addr()),
            "{name}: {err}"
        );
    }
    let out = String::from_utf8_lossy(&version.stdout);
    assert!(out.starts_with(&format!("{}\t1.", mc.addr())), "{out}");
    let out = String::from_utf8_lossy(&stats.stdout);
    assert!(
        out.starts_with(&format!("Server: {}\n", mc.addr())),
        "{out}"
    );
    assert!(out.contains("\tpid: ") && !out.contains(&dead), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&flush.stdout),
        format!("{}\tflushed\n", mc.addr())
    );
}

/// #31: `get` and `delete` need a key (a usage error, exit 2; 22ee596 exited 0 silently);
/// several keys print one value per line (or per --separator); `set k -` reads stdin.
#[test]
fn keys_values_and_stdin() {
    let mc = Memcached::start();
    for cmd in ["get", "delete"] {
        let o = mcstore(&mc.addr(), &[cmd], b"");
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("<KEYS>"),
            "{cmd}"
        );
    }
    ok(&mcstore(&mc.addr(), &["set", "a", "-"], b"one"));
    ok(&mcstore(&mc.addr(), &["set", "b", "two"], b""));
    assert_eq!(ok(&mcstore(&mc.addr(), &["get", "a"], b"")), "one");
    assert_eq!(
        ok(&mcstore(&mc.addr(), &["get", "a", "b"], b"")),
        "one\ntwo\n"
    );
    assert_eq!(
        ok(&mcstore(
            &mc.addr(),
            &["get", "--separator", ",", "a", "b"],
            b""
        )),
        "one,two,"
    );
    let o = mcstore(&mc.addr(), &["get", "a", "missing", "b"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "one\ntwo\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found: missing"));
}

/// #31: a reader that goes away (`mcstore get k | head -c10`) ends the command quietly,
/// with status 141 as a process killed by SIGPIPE (on 22ee596: "Broken pipe" and exit 1).
#[test]
fn a_broken_pipe_ends_quietly() {
    use std::io::Read;
    let mc = Memcached::start();
    ok(&mcstore(
        &mc.addr(),
        &["set", "big", "-"],
        &vec![b'x'; 512 << 10],
    ));
    for args in [&["get", "big"][..], &["ring"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mcstore"))
            .args(["--servers", &mc.addr()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // `ring` reads keys until stdin ends: plenty of them, written from a thread.
        let feeder = std::thread::spawn(move || {
            let keys: String = (0..200_000).map(|i| format!("key{i}\n")).collect();
            let _ = stdin.write_all(keys.as_bytes());
        });
        let mut head = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut head).unwrap(); // then closed
        let o = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert_eq!(o.status.code(), Some(141), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "", "{args:?}");
    }
}

/// #31's messages: each says what went wrong and what is accepted (on 22ee596: an empty
/// `ERROR` message, no server format, no default in --help, a storage folder created by a
/// read, `bench -b --protocol meta` silently running binary).
#[test]
fn messages_a_person_can_act_on() {
    let mc = Memcached::start();
    fails_with(
        &mcstore(&mc.addr(), &["stats", "bogus"], b""),
        "does not know this command",
    );
    fails_with(
        &mcstore("127.0.0.1:notaport", &["get", "k"], b""),
        "expected host[:port[:weight]]",
    );
    let help = ok(&mcstore(&mc.addr(), &["--help"], b""));
    assert!(help.contains("[default: 127.0.0.1:11211]"), "{help}");
    let dir = TempDir::new("mcstore-cli-noroot");
    let root = dir.path.join("nothing-here");
    let o = mcstore(
        &mc.addr(),
        &["store", "--root", root.to_str().unwrap(), "get", "c", "r"],
        b"",
    );
    fails_with(&o, "no storage at");
    assert!(!root.exists(), "a read created the storage folder");
    fails_with(
        &mcstore(
            &mc.addr(),
            &["--protocol", "meta", "bench", "-b", "-w", "get", "-n", "10"],
            b"",
        ),
        "-b means --protocol binary",
    );
}

/// #31's commands beside libmemcached-tools: gets/cas, replace/append/prepend, exists,
/// ping, cp of many files, `get --flags`, and libmemcached's server strings.
#[test]
fn libmemcached_tools_parity_commands() {
    let mc = Memcached::start();
    let s = mc.addr();
    ok(&mcstore(&s, &["set", "k", "mid", "--flags", "7"], b""));
    ok(&mcstore(&s, &["append", "k", ">"], b""));
    ok(&mcstore(&s, &["prepend", "k", "<"], b""));
    assert_eq!(
        ok(&mcstore(&s, &["get", "--flags", "k"], b"")),
        "7\n<mid>\n"
    );
    fails_with(
        &mcstore(&s, &["replace", "nope", "x"], b""),
        "not stored: nope (this command needs an existing key",
    );
    ok(&mcstore(&s, &["replace", "k", "new"], b""));
    let gets = ok(&mcstore(&s, &["gets", "k"], b""));
    let (cas, value) = gets.trim_end().split_once(' ').unwrap();
    assert_eq!(value, "new");
    ok(&mcstore(&s, &["cas", "k", cas, "swapped"], b""));
    fails_with(
        &mcstore(&s, &["cas", "k", cas, "again"], b""),
        "changed since CAS",
    );
    assert_eq!(ok(&mcstore(&s, &["get", "k"], b"")), "swapped");
    ok(&mcstore(&s, &["exists", "k"], b""));
    let o = mcstore(&s, &["exists", "k", "nope"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found: nope"));
    let ping = ok(&mcstore(&s, &["ping"], b""));
    assert!(
        ping.starts_with(&format!("{s}\t")) && ping.trim_end().ends_with(" us"),
        "{ping}"
    );

    let dir = TempDir::new("mcstore-cp");
    let (a, b) = (dir.path.join("a.txt"), dir.path.join("b.txt"));
    std::fs::write(&a, "AAA").unwrap();
    std::fs::write(&b, "BBB").unwrap();
    ok(&mcstore(
        &s,
        &[
            "cp",
            "--flags",
            "3",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
        b"",
    ));
    ok(&mcstore(&s, &["cp", "--key", "c.txt", "-"], b"CCC"));
    assert_eq!(
        ok(&mcstore(&s, &["get", "a.txt", "b.txt", "c.txt"], b"")),
        "AAA\nBBB\nCCC\n"
    );
    // libmemcached's forms: `--SERVER=host:port`, and spaces between servers.
    let dead = format!("127.0.0.1:{}", support::free_port());
    let o = mcstore(&format!("--SERVER={s} --SERVER={dead}"), &["version"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&format!("{s}\t")));
    fails_with(
        &mcstore(
            &format!("--SERVER={s} --BINARY-PROTOCOL"),
            &["version"],
            b"",
        ),
        "only --SERVER=host:port",
    );
}

/// Interop with libmemcached-tools (skipped, saying so, where they are not installed):
/// `memccp` writes, `mcstore get --flags` reads what `memccat -F` prints.
#[test]
fn get_flags_matches_memccat() {
    if std::process::Command::new("memccat")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("memccat not installed (apt-get install -y libmemcached-tools): skipped");
        return;
    }
    let mc = Memcached::start();
    let dir = TempDir::new("mcstore-memccp");
    let mut files = Vec::new();
    for (name, body) in [("one.txt", "first"), ("two.txt", "second")] {
        let p = dir.path.join(name);
        std::fs::write(&p, body).unwrap();
        files.push(p.to_str().unwrap().to_string());
    }
    let servers = format!("--servers={}", mc.addr());
    let st = Command::new("memccp")
        .args([servers.as_str(), "--flag=42"])
        .args(&files)
        .status()
        .unwrap();
    assert!(st.success());
    let memccat = Command::new("memccat")
        .args([servers.as_str(), "-F", "one.txt", "two.txt"])
        .output()
        .unwrap();
    assert!(memccat.status.success());
    let ours = ok(&mcstore(
        &mc.addr(),
        &["get", "-F", "one.txt", "two.txt"],
        b"",
    ));
    assert_eq!(ours, String::from_utf8_lossy(&memccat.stdout));
    assert_eq!(ours, "42\nfirst\n42\nsecond\n");
    // `dump` lists exactly the keys memccp wrote; --match and --with-values narrow and show.
    let mut keys: Vec<String> = ok(&mcstore(&mc.addr(), &["dump"], b""))
        .lines()
        .map(str::to_string)
        .collect();
    keys.sort();
    assert_eq!(keys, ["one.txt", "two.txt"]);
    assert_eq!(
        ok(&mcstore(
            &mc.addr(),
            &["dump", "--match", "t?o.*", "--with-values"],
            b""
        )),
        "two.txt\tsecond\n"
    );
}

/// #31: `capable` against memcached 1.6: every check passes (or does not apply to the
/// protocol), on text, binary and meta; against a server that answers nonsense, checks fail
/// and the exit status says so.
#[test]
fn capable_passes_on_memcached_and_fails_on_nonsense() {
    let mc = Memcached::start();
    let table = ok(&mcstore(&mc.addr(), &["capable"], b""));
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 3 * 19, "{table}");
    for row in &rows {
        assert!(row.ends_with(" pass") || row.contains(" n/a "), "{row}");
    }
    for p in ["text", "binary", "meta"] {
        assert_eq!(rows.iter().filter(|r| r.starts_with(p)).count(), 19, "{p}");
    }
    // The run's keys are gone.
    assert_eq!(ok(&mcstore(&mc.addr(), &["dump"], b"")), "");

    let nonsense = support::Hostile::start(|_, conn| {
        let _ = conn.write_all(b"SERVER_ERROR nope\r\n");
    });
    let o = mcstore(
        &format!("127.0.0.1:{}", nonsense.port),
        &["capable", "--timeout-ms", "300"],
        b"",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
}

/// #31: `slap` as people run memaslap: a duration, an open-loop rate (never above it),
/// periodic reports on stderr, per-key values checked, and SIGINT ending the run with its
/// summary (on 22ee596 an interrupted slap printed nothing, and none of the options existed).
#[test]
fn slap_duration_rate_reports_verify_and_sigint() {
    use std::io::{BufRead, BufReader};
    let mc = Memcached::start();
    let field = |out: &str, name: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .expect("a RESULT line");
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let o = mcstore(
        &mc.addr(),
        &[
            "slap",
            "--callers",
            "2",
            "-k",
            "50",
            "-t",
            "1s",
            "--verify",
            "--report-every",
            "200ms",
        ],
        b"",
    );
    let out = ok(&o);
    assert_eq!(
        (field(&out, "errors"), field(&out, "verify")),
        (0, 1),
        "{out}"
    );
    assert_eq!(field(&out, "interrupted"), 0);
    assert!(field(&out, "ops") > 0);
    let reports = String::from_utf8_lossy(&o.stderr);
    assert!(
        reports.lines().filter(|l| l.contains("] calls ")).count() >= 2,
        "{reports}"
    );

    let out = ok(&mcstore(
        &mc.addr(),
        &[
            "slap",
            "--callers",
            "2",
            "-k",
            "50",
            "-t",
            "1s",
            "--rate",
            "300",
        ],
        b"",
    ));
    let ops = field(&out, "ops");
    // Open-loop at 300/s for 1 s: never more (each caller's next call waits for its time).
    assert!(ops > 0 && ops <= 302, "{ops} calls at --rate 300 in 1 s");
    assert_eq!(field(&out, "rate"), 300);

    let mut child = Command::new(env!("CARGO_BIN_EXE_mcstore"))
        .args(["--servers", &mc.addr()])
        .args(["slap", "--callers", "2", "-k", "50", "-n", "1000000000"])
        .args(["--report-every", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Calls are being made once a report says so; then Ctrl-C.
    let mut reports = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while reports.read_line(&mut line).unwrap() > 0 && !line.contains("] calls ") {
        line.clear();
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    // The summary, then the status a shell reports for Ctrl-C.
    assert_eq!(o.status.code(), Some(130), "{out}");
    assert!(out.contains("interrupted (SIGINT)"), "{out}");
    assert_eq!(field(&out, "interrupted"), 1);
    assert_eq!(field(&out, "errors"), 0);
}

/// #31's rule for keys on several servers: with one server dead, `get` still prints every
/// key the live one holds, names each failed key (and its server) on stderr, and exits 1.
#[test]
fn get_across_servers_with_one_dead() {
    let live = Memcached::start();
    let mut dead = Memcached::start();
    let servers = format!("{},{}", live.addr(), dead.addr());
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    for k in &keys {
        ok(&mcstore(&servers, &["set", k, &format!("v-{k}")], b""));
    }
    let placed = ok(&mcstore(&servers, &["ring"], keys.join("\n").as_bytes()));
    let on_live: Vec<&str> = placed
        .lines()
        .filter(|l| l.ends_with(&live.addr()))
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert!(
        !on_live.is_empty() && on_live.len() < keys.len(),
        "{placed}"
    );
    dead.kill();
    let args: Vec<&str> = ["get", "--timeout-ms", "300"]
        .into_iter()
        .chain(keys.iter().map(String::as_str))
        .collect();
    let o = mcstore(&servers, &args, b"");
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let want: String = on_live.iter().map(|k| format!("v-{k}\n")).collect();
    assert_eq!(out, want);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), keys.len() - on_live.len(), "{err}");
    assert!(err.lines().all(|l| l.contains(&dead.addr())), "{err}");
}

/// A blank MEMCACHED_SERVERS means "not given": the default server, not "no servers".
#[test]
fn blank_servers_env_means_the_default() {
    let o = Command::new(env!("CARGO_BIN_EXE_mcstore"))
        .args(["--timeout-ms", "200", "version"])
        .env("MEMCACHED_SERVERS", " ")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    // Whether or not a memcached listens there, the default server is the one asked.
    assert!(
        format!("{out}{err}").contains("127.0.0.1:11211") && !err.contains("no servers"),
        "{err}"
    );
}

/// #27: `slap --timeout-ms` bounds a call to a frozen server (SIGSTOP), the failed calls are
/// counted in the RESULT line (`failed=`, the same count as `errors=`, with `p999_us=` and
/// `max_us=`), and the run still exits non-zero after printing it. With the default 1 s
/// timeout no call would fail during a 900 ms freeze.
#[test]
fn slap_timeout_bounds_calls_to_a_frozen_server() {
    use std::io::{BufRead, BufReader};
    let field = |line: &str, name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .parse()
            .unwrap()
    };
    for mode in ["threads", "async"] {
        let mc = Memcached::start();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mcstore"))
            .args(["--servers", &mc.addr(), "--timeout-ms", "200"])
            .args(["slap", "--callers", "4", "-k", "100", "-t", "2s"])
            .args(["--mode", mode, "--report-every", "100ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut reports = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while reports.read_line(&mut line).unwrap() > 0 && !line.contains("] calls ") {
            line.clear();
        }
        mc.freeze();
        std::thread::sleep(std::time::Duration::from_millis(900));
        mc.resume();
        let o = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{mode}: {out}");
        let result = out
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("{mode}: no RESULT line: {out}"));
        let failed = field(result, "failed");
        assert!(failed > 0.0, "{mode}: {result}");
        assert_eq!(failed, field(result, "errors"), "{mode}: {result}");
        let (p999, max) = (field(result, "p999_us"), field(result, "max_us"));
        assert!(p999 <= max, "{mode}: {result}");
        // Each call gives up after about 200 ms (a few timeouts' worth at most), never
        // waiting out the 900 ms freeze.
        assert!((150_000.0..800_000.0).contains(&max), "{mode}: {result}");
    }
}

/// `mcstore` with `args` and no `--servers`, `stdin` on its standard input.
fn mcstore_bare(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcstore"))
        .args(args)
        .env_remove("MEMCACHED_SERVERS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match child.stdin.take().unwrap().write_all(stdin) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    child.wait_with_output().unwrap()
}

/// `--servers-file` and `--discover` give the server list instead of `--servers`; a source
/// that is not one is named in a one-line error.
#[test]
fn servers_from_a_file_or_discovered() {
    let mc = Memcached::start();
    let dir = TempDir::new("cli-servers-file");
    let file = dir.path.join("servers");
    std::fs::write(&file, format!("# the fleet\n{}\n", mc.addr())).unwrap();
    let f = file.to_str().unwrap();
    ok(&mcstore_bare(
        &["--servers-file", f, "set", "k", "from-file"],
        b"",
    ));
    assert_eq!(
        ok(&mcstore_bare(&["--servers-file", f, "get", "k"], b"")),
        "from-file"
    );
    let port = mc.addr().rsplit_once(':').unwrap().1.to_string();
    // localhost from /etc/hosts: its IPv4 address is a server (an IPv6 one, if listed, is
    // another, with nothing behind it: only the list is checked, with `ring`).
    let dns = format!("dns:localhost:{port}");
    let keys: String = (0..200).map(|n| format!("key:{n}\n")).collect();
    let ring = ok(&mcstore_bare(
        &["--discover", &dns, "ring"],
        keys.as_bytes(),
    ));
    assert!(ring.contains(&format!("127.0.0.1:{port}")), "{ring}");
    fails_with(
        &mcstore_bare(
            &["--discover", &format!("config:{}", mc.addr()), "get", "k"],
            b"",
        ),
        "not a discovery endpoint",
    );
    fails_with(
        &mcstore_bare(&["--discover", "nope", "get", "k"], b""),
        "dns:NAME:PORT",
    );
    let missing = dir.path.join("missing");
    fails_with(
        &mcstore_bare(
            &["--servers-file", missing.to_str().unwrap(), "get", "k"],
            b"",
        ),
        "missing",
    );
}

/// #28: `slap --servers-file F` follows F while a writer rewrites it (servers added and
/// removed, each rewrite atomic: a new file renamed over the old one), and its RESULT line
/// says `failed=0`, with the list changes it followed (`list_changes=`).
#[test]
fn slap_follows_a_servers_file_that_changes() {
    use std::io::{BufRead, BufReader};
    let ms: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let addrs: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let dir = TempDir::new("cli-slap-follows");
    let file = dir.path.join("servers");
    let write = |servers: &[String]| {
        let tmp = dir.path.join("servers.new");
        std::fs::write(&tmp, servers.join("\n")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(&addrs[..3]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcstore"))
        .args([
            "--servers-file",
            file.to_str().unwrap(),
            "--discover-every-ms",
            "50",
        ])
        .args([
            "slap",
            "--callers",
            "16",
            "-k",
            "500",
            "-t",
            "3s",
            "--workload",
            "mix",
        ])
        .args(["--verify", "--report-every", "100ms"])
        .env_remove("MEMCACHED_SERVERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once calls are under way, the fourth server comes and goes, and the first goes and
    // comes back, every 150 ms.
    let mut reports = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while reports.read_line(&mut line).unwrap() > 0 && !line.contains("] calls ") {
        line.clear();
    }
    let lists = [&addrs[..], &addrs[1..], &addrs[..3]];
    for k in 0..12 {
        write(lists[k % lists.len()]);
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    let result = out
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .expect("a RESULT line");
    let field = |name: &str| -> u64 {
        result
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {result}"))
            .parse()
            .unwrap()
    };
    assert!(result.starts_with("RESULT client=mcstore "), "{result}");
    assert_eq!(field("failed"), 0, "{result}");
    assert!(field("list_changes") >= 6, "{result}");
    assert!(field("ops") > 1000, "{result}");
}

/// #30: `set --compress` (decompressed by a plain `get` from its flags), `set --chunked` /
/// `get --chunked` over the item size, and `store --compress --chunked`.
#[test]
fn compressed_and_chunked_values() {
    let mc = Memcached::with_args(&["-I", "1m"]);
    let s = &mc.addr();
    let doc = "<entry><title>cli</title></entry>\n".repeat(500);
    for algo in ["lz4", "zstd", "zlib"] {
        ok(&mcstore(
            s,
            &["set", "doc", "--compress", algo],
            doc.as_bytes(),
        ));
        assert_eq!(ok(&mcstore(s, &["get", "doc"], b"")), doc, "{algo}");
        let raw = mcstore(s, &["get", "doc", "--raw"], b"").stdout;
        assert!(
            raw.len() < doc.len() / 4,
            "{algo}: {} bytes stored",
            raw.len()
        );
        let flags = ok(&mcstore(s, &["get", "doc", "-F"], b""));
        assert_ne!(flags.lines().next(), Some("0"), "{algo}");
    }
    fails_with(
        &mcstore(s, &["append", "doc", "x", "--compress", "lz4"], b""),
        "--compress applies to set",
    );
    // 3 MiB over a 1 MiB item size: chunks.
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    fails_with(&mcstore(s, &["set", "big"], &big), "");
    ok(&mcstore(s, &["set", "big", "--chunked"], &big));
    assert!(mcstore(s, &["get", "big", "--chunked"], b"").stdout == big);
    // A plain get names what the item is rather than printing the index.
    let o = mcstore(s, &["get", "big"], b"");
    assert!(!o.status.success());
    // Compressed and chunked together.
    ok(&mcstore(
        s,
        &["set", "both", "--chunked", "--compress", "zstd"],
        &big,
    ));
    assert!(mcstore(s, &["get", "both", "--chunked"], b"").stdout == big);
    // The storage: compressed and chunked entries, read back through the cache.
    let outer = TempDir::new("mcstore-cli-values");
    let root = outer.path.join("data");
    let root = root.to_str().unwrap();
    let store = |args: &[&str], stdin: &[u8]| {
        let mut all = vec![
            "store",
            "--root",
            root,
            "--compress",
            "lz4",
            "--chunked",
            "16",
        ];
        all.extend_from_slice(args);
        mcstore(s, &all, stdin)
    };
    ok(&store(&["put", "docs", "big.bin"], &big));
    ok(&store(&["put", "docs", "doc.xml"], doc.as_bytes()));
    for _ in 0..2 {
        assert!(store(&["get", "docs", "big.bin"], b"").stdout == big);
        assert_eq!(ok(&store(&["get", "docs", "doc.xml"], b"")), doc);
    }
    let mut keys = String::new();
    let mut c = mc.client();
    c.dump_keys(s, |k, _| {
        keys.push_str(&String::from_utf8_lossy(k));
        keys.push('\n');
    })
    .unwrap();
    assert!(keys.contains("mcstore-chunk:"), "{keys}");
}

// ---------------------------------------------------------------------------------------
// Attack round 2 on compressed and chunked values in the CLI.
// ---------------------------------------------------------------------------------------

/// `set --compress` accepts a value that `get` then refuses: 65 MiB of zeros pack to a few
/// KiB with zstd and are stored (exit 0), but every `get` fails with "claims ... bytes, over
/// the limit of 67108864 (max_decoded)" (`read_value` in cli/src/main.rs decompresses with
/// `Compressor::default()`, whose `max_decoded` is 64 MiB, while `store` compresses with no
/// limit). A value the CLI stores it should read back, or `set` should refuse it.
#[test]
fn attack2_set_compress_stores_only_what_get_reads_back() {
    let mc = Memcached::start();
    let s = &mc.addr();
    let zeros = vec![0u8; (64 << 20) + 4096];
    let set = mcstore(s, &["set", "zeros", "--compress", "zstd"], &zeros);
    if !set.status.success() {
        fails_with(&set, "max_decoded");
        return;
    }
    let got = mcstore(s, &["get", "zeros"], b"");
    assert!(
        got.status.success() && got.stdout.len() == zeros.len(),
        "set --compress zstd stored {} bytes (exit 0), get cannot read them back: {}",
        zeros.len(),
        String::from_utf8_lossy(&got.stderr)
    );
}

/// A plain `set --flags N` (no `--compress`) whose N touches the codec bits stores a value
/// `get` cannot print any more: flags 4096 (the lz4 bit) gives "a compressed value claims
/// 1819043176 bytes", flags 8 "zlib: corrupt deflate stream", flags 32768 "a chunked value's
/// index". Before the change `get` printed any value whatever its flags, as memccat does
/// (`get_flags_matches_memccat`). Either `set` refuses such flags without `--compress` (one
/// line naming the flags), or `get` prints the value (and `-F` its flags).
#[test]
fn attack2_plain_set_with_codec_flag_bits_reads_back() {
    let mc = Memcached::start();
    let s = &mc.addr();
    for f in ["4096", "8192", "8", "32768"] {
        let set = mcstore(s, &["set", "k", "hello", "--flags", f], b"");
        if !set.status.success() {
            fails_with(&set, "flags");
            continue;
        }
        let got = mcstore(s, &["get", "k"], b"");
        assert!(
            got.status.success() && got.stdout == b"hello",
            "set k hello --flags {f} (exit 0), then get k: {}",
            String::from_utf8_lossy(&got.stderr)
        );
    }
}

/// `delete` of a value stored with `set --chunked` removes only its index: its chunks (TTL 0,
/// never expiring) stay until evicted, and nothing names them any more. The library has
/// `delete_chunked`; the CLI's `delete` does not use it (and has no `--chunked`).
#[test]
fn attack2_delete_of_a_chunked_value_leaves_no_chunks_behind() {
    let mc = Memcached::with_args(&["-I", "1m"]);
    let s = &mc.addr();
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    ok(&mcstore(s, &["set", "big", "--chunked"], &big));
    assert!(mcstore(s, &["get", "big", "--chunked"], b"").stdout == big);
    let del = mcstore(s, &["delete", "big"], b"");
    if !del.status.success() {
        // A delete that refuses an index (pointing at a --chunked form) is fine too.
        fails_with(&del, "chunked");
        ok(&mcstore(s, &["delete", "big", "--chunked"], b""));
    }
    let mut left = Vec::new();
    mc.client()
        .dump_keys(s, |k, meta| {
            left.push(format!("{} {meta}", String::from_utf8_lossy(k)));
        })
        .unwrap();
    let immortal: Vec<&String> = left
        .iter()
        .filter(|l| l.starts_with("mcstore-chunk:") && l.contains("exp=-1"))
        .collect();
    assert!(
        immortal.is_empty(),
        "after `delete big`, {} chunks that never expire: {immortal:?}",
        immortal.len()
    );
}

/// A chunked value with one chunk gone is a miss for `get --chunked`: exit 1, one line, and
/// nothing half-written to stdout; `get --chunked --raw` likewise.
#[test]
fn attack2_get_chunked_with_a_chunk_missing_is_a_clean_miss() {
    let mc = Memcached::with_args(&["-I", "1m"]);
    let s = &mc.addr();
    // Noise that lz4 cannot pack under the item size.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    ok(&mcstore(
        s,
        &["set", "big", "--chunked", "--compress", "lz4"],
        &big,
    ));
    let mut chunks = Vec::new();
    let mut c = mc.client();
    c.dump_keys(s, |k, _| {
        if k.starts_with(b"mcstore-chunk:") {
            chunks.push(k.to_vec());
        }
    })
    .unwrap();
    assert!(!chunks.is_empty());
    chunks.sort();
    assert!(c.delete(chunks.last().unwrap()).unwrap());
    for args in [
        &["get", "big", "--chunked"][..],
        &["get", "big", "--chunked", "--raw"],
    ] {
        let o = mcstore(s, args, b"");
        assert!(
            o.stdout.is_empty(),
            "{args:?}: {} bytes printed",
            o.stdout.len()
        );
        fails_with(&o, "big");
    }
}
