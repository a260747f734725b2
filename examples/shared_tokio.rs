//! One `SharedClient` for many tokio tasks and threads at once: 64 tasks that each make a
//! thousand calls, and a few blocking threads alongside, on the same client (and the same
//! connection). Self-contained: copy it into a project with `mcstore` and `tokio`.
//!
//! Run: start a memcached (`memcached -U 0 -p 11211 &`, as root add `-u root`), then
//! `cargo run --example shared_tokio`. `MEMCACHED_SERVERS=host:port` names another server.
//! tokio is a dev-dependency only: the library runs no runtime; its futures are woken by its
//! own I/O thread, under any executor.

use std::time::{Duration, Instant};

use mcstore::{Client, SetOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("MEMCACHED_SERVERS").unwrap_or_else(|_| "127.0.0.1:11211".into());
    let client = Client::builder()
        .server(&addr)
        .io_timeout(Duration::from_millis(500))
        .shared()
        .build()?;
    client
        .set_async(b"hello", b"world", SetOptions::default())
        .await
        .map_err(|e| format!("{e} (is a memcached running at {addr}?)"))?;

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
