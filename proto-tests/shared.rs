//! The shared client against real memcached: many threads and tasks at once, every reply
//! reaching its own caller, cancellation, frozen and restarted servers, a hostile server.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcstore::{CasResult, ErrorKind, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

fn shared(servers: &[&Memcached], p: Protocol) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .servers(servers.iter().map(|m| m.addr()))
        .io_timeout(Duration::from_secs(2))
        .shared()
        .build()
        .unwrap()
}

/// Each caller works on keys of its own and on keys every caller shares (read-only), and
/// checks every reply: a reply for another caller's request would show another value.
fn mixed_calls(c: &SharedClient, caller: usize, calls: usize, shared_keys: usize) -> usize {
    let mut buf = Vec::new();
    let mut checked = 0;
    for n in 0..calls {
        let key = format!("caller:{caller}:{}", n % 17);
        let value = format!("value-{caller}-{n}");
        match n % 5 {
            0 | 1 => {
                c.set(key.as_bytes(), value.as_bytes(), SetOptions::default())
                    .unwrap();
                let info = c.get_into(key.as_bytes(), &mut buf).unwrap();
                assert!(info.is_some(), "{key} missing right after its set");
                assert_eq!(buf, value.as_bytes(), "caller {caller} got another value");
            }
            2 => {
                let k = format!("common:{}", n % shared_keys);
                let item = c.get(k.as_bytes()).unwrap().expect("shared key present");
                assert_eq!(item.value, k.as_bytes(), "shared key answered another key");
            }
            3 => {
                let k = format!("counter:{caller}");
                let v = c.incr(k.as_bytes(), 1).unwrap();
                assert!(v.is_some(), "counter {k} missing");
            }
            _ => {
                let item = c.gets(key.as_bytes()).unwrap();
                if let Some(item) = item {
                    let new = format!("cas-{caller}-{n}");
                    // Only this caller writes its keys: the CAS must hold.
                    let r = c
                        .cas(
                            key.as_bytes(),
                            new.as_bytes(),
                            item.cas.unwrap(),
                            SetOptions::default(),
                        )
                        .unwrap();
                    assert_eq!(r, CasResult::Stored);
                    assert!(c.delete(key.as_bytes()).unwrap());
                    assert_eq!(c.get(key.as_bytes()).unwrap(), None);
                }
            }
        }
        checked += 1;
    }
    checked
}

fn prepare(c: &SharedClient, callers: usize, shared_keys: usize) {
    for k in 0..shared_keys {
        let k = format!("common:{k}");
        c.set(k.as_bytes(), k.as_bytes(), SetOptions::default())
            .unwrap();
    }
    for t in 0..callers {
        c.set(
            format!("counter:{t}").as_bytes(),
            b"0",
            SetOptions::default(),
        )
        .unwrap();
    }
}

#[test]
fn sixty_four_threads_each_get_their_own_replies() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&[&mc], p);
        prepare(&c, 64, 20);
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..64 {
                let (c, done) = (c.clone(), &done);
                s.spawn(move || done.fetch_add(mixed_calls(&c, t, 2000, 20), Ordering::Relaxed));
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 64 * 2000, "{p:?}");
    }
}
