//! `mcstore capable`: a server conformance check in the spirit of libmemcached's
//! `memcapable`. Every command, on every protocol, against one server, each checked against
//! what protocol.txt says the server must answer; a pass/fail table, exit 1 if any failed.
//! Keys live under a prefix of this run and are deleted at the end.

use std::io::Write;

use mcstore::{CasResult, Client, ClientBuilder, Error, MetaGetOptions, Protocol, SetOptions};

/// One check's result.
enum Verdict {
    Pass,
    Fail(String),
    /// The protocol cannot express it (binary verbosity, meta-only commands elsewhere).
    NotApplicable,
}

type Check = (
    &'static str,
    fn(&mut Client, &[u8]) -> Result<Verdict, Error>,
);

/// `Ok(Pass)` when `got == want`, else a failure saying both.
fn expect<T: PartialEq + std::fmt::Debug>(got: T, want: T) -> Result<Verdict, Error> {
    Ok(if got == want {
        Verdict::Pass
    } else {
        Verdict::Fail(format!("got {got:?}, expected {want:?}"))
    })
}

fn value(c: &mut Client, k: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    Ok(c.get(k)?.map(|i| i.value))
}

fn k(base: &[u8], suffix: &str) -> Vec<u8> {
    [base, suffix.as_bytes()].concat()
}

const CHECKS: &[Check] = &[
    ("set, get", |c, b| {
        c.set(b, b"v1", SetOptions::default().flags(7))?;
        let i = c.get(b)?;
        expect(i.map(|i| (i.value, i.flags)), Some((b"v1".to_vec(), 7)))
    }),
    ("get of a missing key", |c, b| {
        expect(value(c, &k(b, ":missing"))?, None)
    }),
    ("add", |c, b| {
        let first = c.add(&k(b, ":add"), b"a", SetOptions::default())?;
        let again = c.add(&k(b, ":add"), b"b", SetOptions::default())?;
        expect(
            (first, again, value(c, &k(b, ":add"))?),
            (true, false, Some(b"a".to_vec())),
        )
    }),
    ("replace", |c, b| {
        let missing = c.replace(&k(b, ":nope"), b"x", SetOptions::default())?;
        c.set(&k(b, ":rep"), b"a", SetOptions::default())?;
        let there = c.replace(&k(b, ":rep"), b"b", SetOptions::default())?;
        expect(
            (missing, there, value(c, &k(b, ":rep"))?),
            (false, true, Some(b"b".to_vec())),
        )
    }),
    ("append, prepend", |c, b| {
        c.set(&k(b, ":ap"), b"mid", SetOptions::default())?;
        let a = c.append(&k(b, ":ap"), b">")?;
        let p = c.prepend(&k(b, ":ap"), b"<")?;
        let missing = c.append(&k(b, ":nope"), b"x")?;
        expect(
            (a, p, missing, value(c, &k(b, ":ap"))?),
            (true, true, false, Some(b"<mid>".to_vec())),
        )
    }),
    ("gets, cas", |c, b| {
        c.set(&k(b, ":cas"), b"a", SetOptions::default())?;
        let cas = c.gets(&k(b, ":cas"))?.and_then(|i| i.cas).unwrap_or(0);
        let won = c.cas(&k(b, ":cas"), b"b", cas, SetOptions::default())?;
        let lost = c.cas(&k(b, ":cas"), b"c", cas, SetOptions::default())?;
        let gone = c.cas(&k(b, ":nope"), b"d", cas, SetOptions::default())?;
        expect(
            (won, lost, gone),
            (CasResult::Stored, CasResult::Exists, CasResult::NotFound),
        )
    }),
    ("delete", |c, b| {
        c.set(&k(b, ":del"), b"a", SetOptions::default())?;
        let first = c.delete(&k(b, ":del"))?;
        let again = c.delete(&k(b, ":del"))?;
        expect(
            (first, again, value(c, &k(b, ":del"))?),
            (true, false, None),
        )
    }),
    ("incr, decr", |c, b| {
        c.set(&k(b, ":n"), b"10", SetOptions::default())?;
        let up = c.incr(&k(b, ":n"), 5)?;
        let down = c.decr(&k(b, ":n"), 100)?; // floors at 0
        let missing = c.incr(&k(b, ":nope"), 1)?;
        expect((up, down, missing), (Some(15), Some(0), None))
    }),
    ("incr past 2^64 wraps", |c, b| {
        c.set(
            &k(b, ":wrap"),
            u64::MAX.to_string().as_bytes(),
            SetOptions::default(),
        )?;
        expect(c.incr(&k(b, ":wrap"), 2)?, Some(1))
    }),
    ("touch, gat, gats", |c, b| {
        c.set(&k(b, ":t"), b"a", SetOptions::default())?;
        let t = c.touch(&k(b, ":t"), 300)?;
        let missing = c.touch(&k(b, ":nope"), 300)?;
        let gat = c.gat(&k(b, ":t"), 300)?.map(|i| i.value);
        let gats = c.gats(&k(b, ":t"), 300)?.map(|i| i.cas.is_some());
        expect(
            (t, missing, gat, gats),
            (true, false, Some(b"a".to_vec()), Some(true)),
        )
    }),
    ("multi-get", |c, b| {
        let keys: Vec<Vec<u8>> = (0..50).map(|i| k(b, &format!(":m{i}"))).collect();
        for key in keys.iter().step_by(2) {
            c.set(key, key, SetOptions::default())?;
        }
        let mut found = 0;
        let mut right = true;
        c.get_multi(&keys, |key, item| {
            found += 1;
            right &= item.value == key;
        })?;
        expect((found, right), (25, true))
    }),
    ("noreply set and delete", |c, b| {
        c.store_noreply(
            mcstore::StoreMode::Set,
            &k(b, ":nr"),
            b"a",
            SetOptions::default(),
        )?;
        let stored = value(c, &k(b, ":nr"))?;
        c.delete_noreply(&k(b, ":nr"))?;
        expect(
            (stored, value(c, &k(b, ":nr"))?),
            (Some(b"a".to_vec()), None),
        )
    }),
    ("a 512 KiB value", |c, b| {
        let big: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
        c.set(&k(b, ":big"), &big, SetOptions::default())?;
        expect(value(c, &k(b, ":big"))? == Some(big), true)
    }),
    ("version", |c, _| {
        let v = c.version()?;
        expect(v.len() == 1 && !v[0].1.is_empty(), true)
    }),
    ("stats", |c, _| {
        let s = c.stats(None)?;
        expect(
            s.first()
                .is_some_and(|s| s.stats.iter().any(|(n, _)| n == "pid")),
            true,
        )
    }),
    ("verbosity", |c, _| {
        if c.protocol() == Protocol::Binary {
            return Ok(Verdict::NotApplicable);
        }
        c.verbosity(0)?;
        Ok(Verdict::Pass)
    }),
    ("meta lease (mg N)", |c, b| {
        if c.protocol() != Protocol::Meta {
            return Ok(Verdict::NotApplicable);
        }
        let mut buf = Vec::new();
        let opts = MetaGetOptions {
            lease_ttl: Some(30),
            ..MetaGetOptions::default()
        };
        let first = c.meta_get(&k(b, ":lease"), opts, &mut buf)?;
        let second = c.meta_get(&k(b, ":lease"), opts, &mut buf)?;
        expect(
            (first.map(|i| i.lease), second.map(|i| i.lease)),
            (Some(mcstore::Lease::Won), Some(mcstore::Lease::AlreadyWon)),
        )
    }),
    ("meta invalidate (md I)", |c, b| {
        if c.protocol() != Protocol::Meta {
            return Ok(Verdict::NotApplicable);
        }
        c.set(&k(b, ":inv"), b"a", SetOptions::default())?;
        let marked = c.invalidate(&k(b, ":inv"), Some(30))?;
        let mut buf = Vec::new();
        let stale = c
            .meta_get(&k(b, ":inv"), MetaGetOptions::default(), &mut buf)?
            .map(|i| i.stale);
        expect((marked, stale), (true, Some(true)))
    }),
    ("meta debug (me)", |c, b| {
        if c.protocol() != Protocol::Meta {
            return Ok(Verdict::NotApplicable);
        }
        c.set(&k(b, ":me"), b"a", SetOptions::default())?;
        let d = c.meta_debug(&k(b, ":me"))?;
        expect(d.is_some_and(|d| d.contains("size=")), true)
    }),
];

/// Runs every check on every protocol against the one server `builder` names; prints the
/// table to `out`. Returns whether all passed.
pub fn run(
    builder: &ClientBuilder,
    out: &mut dyn Write,
) -> Result<bool, Box<dyn std::error::Error>> {
    let base = format!("mcstore-capable:{}", std::process::id());
    let mut all = true;
    writeln!(out, "{:<8} {:<26} result", "protocol", "check")?;
    for protocol in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        let name = format!("{protocol:?}").to_lowercase();
        let mut c = builder.clone().protocol(protocol).build()?;
        for (check, f) in CHECKS {
            let verdict = f(&mut c, format!("{base}:{name}").as_bytes())
                .unwrap_or_else(|e| Verdict::Fail(e.to_string()));
            let text = match verdict {
                Verdict::Pass => "pass".to_string(),
                Verdict::NotApplicable => "n/a (not in this protocol)".to_string(),
                Verdict::Fail(why) => {
                    all = false;
                    format!("FAIL: {why}")
                }
            };
            writeln!(out, "{name:<8} {check:<26} {text}")?;
        }
    }
    // Clean up, best effort (it does not change the verdict): every key of this run, found
    // by the crawler.
    let mut c = builder.clone().protocol(Protocol::Text).build()?;
    let server = c.servers()[0].clone();
    let mut keys = Vec::new();
    let listed = c.dump_keys(&server, |k, _| {
        if k.starts_with(base.as_bytes()) {
            keys.push(k.to_vec());
        }
    });
    if listed.is_ok() {
        let _ = c.delete_multi(&keys);
    }
    Ok(all)
}
