//! One `SharedClient` for many tokio tasks and threads at once: starts a local memcached on a
//! free loopback port, runs 64 tasks that each make a thousand calls, and a few blocking
//! threads alongside, on the same client (and the same connection).
//!
//! Run with `cargo run --example shared_tokio`. `MCSTORE_SERVER=host:port` uses a server that
//! is already running. tokio is a dev-dependency only: the library runs no runtime; its
//! futures are woken by its own I/O thread, under any executor.

use std::time::{Duration, Instant};

use mcstore::{Client, SetOptions};

// The memcached launcher shared with the CLI demo and the tests.
#[allow(dead_code)]
#[path = "../proto-tests/support/launcher.rs"]
mod launcher;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_server, addr) = match std::env::var("MCSTORE_SERVER") {
        Ok(addr) => (None, addr),
        Err(_) => {
            let (s, a) = launcher::start_tcp(64)?;
            (Some(s), a)
        }
    };
    let client = Client::builder()
        .server(&addr)
        .io_timeout(Duration::from_millis(500))
        .shared()
        .build()?;
    // The server needs a moment to listen: retry the first call briefly.
    let started = Instant::now();
    while let Err(e) = client
        .set_async(b"hello", b"world", SetOptions::default())
        .await
    {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(e.into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Blocking callers on threads share the client with the tasks below.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || -> mcstore::Result<usize> {
                let mut buf = Vec::new();
                for n in 0..1000 {
                    let key = format!("thread:{t}:{}", n % 10);
                    client.set(key.as_bytes(), key.as_bytes(), SetOptions::default())?;
                    client.get_into(key.as_bytes(), &mut buf)?;
                    assert_eq!(buf, key.as_bytes());
                }
                Ok(1000)
            })
        })
        .collect();

    let t0 = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(64);
                for n in 0..1000 {
                    let key = format!("task:{t}:{}", n % 10);
                    if n % 10 == 0 {
                        client
                            .set_async(key.as_bytes(), key.as_bytes(), SetOptions::default())
                            .await?;
                    }
                    // Concurrent gets are coalesced into multi-gets on the wire.
                    if client
                        .get_into_async(key.as_bytes(), &mut buf)
                        .await?
                        .is_some()
                    {
                        assert_eq!(buf, key.as_bytes());
                    }
                }
                Ok::<usize, mcstore::Error>(1000)
            })
        })
        .collect();
    let mut calls = 0;
    for t in tasks {
        calls += t.await??;
    }
    let elapsed = t0.elapsed();
    for t in threads {
        calls += t.join().expect("thread")?;
    }
    println!(
        "{calls} calls from 64 tasks and 4 threads on one connection; the tasks took {elapsed:?} \
         ({:.0} calls/s)",
        64_000.0 / elapsed.as_secs_f64()
    );
    let hello = client.get_async(b"hello").await?.expect("stored above");
    println!("hello -> {}", String::from_utf8_lossy(&hello.value));
    Ok(())
}
