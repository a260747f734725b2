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

/// The async twin of [`mixed_calls`].
async fn mixed_calls_async(
    c: SharedClient,
    caller: usize,
    calls: usize,
    shared_keys: usize,
) -> usize {
    let mut buf = Vec::new();
    let mut checked = 0;
    for n in 0..calls {
        let key = format!("caller:{caller}:{}", n % 17);
        let value = format!("value-{caller}-{n}");
        match n % 5 {
            0 | 1 => {
                c.set_async(key.as_bytes(), value.as_bytes(), SetOptions::default())
                    .await
                    .unwrap();
                let info = c.get_into_async(key.as_bytes(), &mut buf).await.unwrap();
                assert!(info.is_some(), "{key} missing right after its set");
                assert_eq!(buf, value.as_bytes(), "caller {caller} got another value");
            }
            2 => {
                let k = format!("common:{}", n % shared_keys);
                let item = c.get_async(k.as_bytes()).await.unwrap().expect("present");
                assert_eq!(item.value, k.as_bytes(), "shared key answered another key");
            }
            3 => {
                let k = format!("counter:{caller}");
                assert!(c.incr_async(k.as_bytes(), 1).await.unwrap().is_some());
            }
            _ => {
                if let Some(info) = c.gets_into_async(key.as_bytes(), &mut buf).await.unwrap() {
                    let new = format!("cas-{caller}-{n}");
                    let r = c
                        .cas_async(
                            key.as_bytes(),
                            new.as_bytes(),
                            info.cas.unwrap(),
                            SetOptions::default(),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r, CasResult::Stored);
                    assert!(c.delete_async(key.as_bytes()).await.unwrap());
                    assert_eq!(c.get_async(key.as_bytes()).await.unwrap(), None);
                }
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn sixty_four_tokio_tasks_each_get_their_own_replies() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&[&mc], p);
        prepare(&c, 64, 20);
        for rt in [
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap(),
        ] {
            let done: usize = rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|t| tokio::spawn(mixed_calls_async(c.clone(), t, 2000, 20)))
                    .collect();
                let mut done = 0;
                for t in tasks {
                    done += t.await.unwrap();
                }
                done
            });
            assert_eq!(done, 64 * 2000, "{p:?}");
        }
    }
}

#[test]
fn another_executor_runs_the_same_calls() {
    // futures-executor's thread pool: no tokio anywhere.
    let mc = Memcached::start();
    let c = shared(&[&mc], Protocol::Meta);
    prepare(&c, 16, 20);
    let pool = futures_executor::ThreadPool::builder()
        .pool_size(2)
        .create()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..16 {
        let (c, tx) = (c.clone(), tx.clone());
        pool.spawn_ok(async move {
            tx.send(mixed_calls_async(c, t, 500, 20).await).unwrap();
        });
    }
    drop(tx);
    assert_eq!(rx.iter().sum::<usize>(), 16 * 500);
    // And a plain block_on on this thread.
    let item = futures_executor::block_on(c.get_async(b"common:3"))
        .unwrap()
        .unwrap();
    assert_eq!(item.value, b"common:3");
}

/// Polls `inner` at most `polls` times, then drops it (mid-flight if it was not done).
struct PollAtMost<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for PollAtMost<F> {
    type Output = Option<F::Output>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<F::Output>> {
        if self.inner.is_none() {
            return std::task::Poll::Ready(None);
        }
        if self.polls == 0 {
            self.inner = None; // dropped here, mid-flight
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        let f = self.inner.as_mut().expect("checked");
        match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => {
                // Come back soon whether or not the reply is in.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
}

#[test]
fn futures_dropped_mid_flight_leave_every_later_call_correct() {
    let mc = Memcached::start();
    for p in PROTOCOLS {
        let c = shared(&[&mc], p);
        prepare(&c, 0, 50);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cancelled = rt.block_on(async {
            let tasks: Vec<_> = (0..32usize)
                .map(|t| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let mut dropped = 0;
                        let mut buf = Vec::new();
                        for n in 0..300usize {
                            // A pseudo-random point: before queueing, queued, on the wire.
                            let polls = (t * 31 + n * 17) % 4;
                            let key = format!("common:{}", (t + n) % 50);
                            let r = PollAtMost {
                                inner: Some(Box::pin(c.get_into_async(key.as_bytes(), &mut buf))),
                                polls,
                            }
                            .await;
                            match r {
                                None => dropped += 1,
                                Some(r) => {
                                    r.unwrap().unwrap();
                                    assert_eq!(buf, key.as_bytes());
                                }
                            }
                            if n % 7 == 0 {
                                let v = format!("own-{t}-{n}");
                                let k = format!("own:{t}");
                                let f =
                                    c.set_async(k.as_bytes(), v.as_bytes(), SetOptions::default());
                                let _ = PollAtMost {
                                    inner: Some(Box::pin(f)),
                                    polls: polls % 2,
                                }
                                .await;
                            }
                        }
                        dropped
                    })
                })
                .collect();
            let mut dropped = 0;
            for t in tasks {
                dropped += t.await.unwrap();
            }
            dropped
        });
        assert!(
            cancelled > 1000,
            "{p:?}: only {cancelled} calls were dropped mid-way"
        );
        // Then 1,000 calls, all correct, blocking and async.
        let mut buf = Vec::new();
        for n in 0..500 {
            let key = format!("common:{}", n % 50);
            c.get_into(key.as_bytes(), &mut buf).unwrap().unwrap();
            assert_eq!(buf, key.as_bytes(), "{p:?}");
        }
        rt.block_on(async {
            for n in 0..500 {
                let key = format!("common:{}", (n * 7) % 50);
                c.get_into_async(key.as_bytes(), &mut buf)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(buf, key.as_bytes(), "{p:?}");
            }
        });
    }
}
