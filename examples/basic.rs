//! A tour of the client API against a running memcached. (The main demo is `mcstore demo`,
//! see the README.) Self-contained: copy it into a project that depends on `mcstore`.
//!
//! Run: start a memcached (`memcached -U 0 -p 11211 &`, as root add `-u root`), then
//! `cargo run --example basic`. `MEMCACHED_SERVERS=host:port` names another server.

use std::time::Duration;

use mcstore::{CasResult, Client, SetOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("MEMCACHED_SERVERS").unwrap_or_else(|_| "127.0.0.1:11211".into());
    let mut client = Client::builder()
        .server(&addr)
        .io_timeout(Duration::from_millis(500))
        .build()?;
    let version = client
        .version()
        .map_err(|e| format!("{e} (is a memcached running at {addr}?)"))?;
    println!("connected to {addr}: memcached {}", version[0].1);

    client.set(
        b"greeting",
        b"hello from mcstore",
        SetOptions::default().ttl(60),
    )?;
    let item = client.get(b"greeting")?.expect("just stored");
    println!("get greeting -> {:?}", String::from_utf8_lossy(&item.value));

    client.set(b"visits", b"41", SetOptions::default())?;
    println!("incr visits -> {:?}", client.incr(b"visits", 1)?);

    let item = client.gets(b"greeting")?.expect("present");
    let cas = item.cas.expect("gets returns a cas unique");
    println!(
        "cas with fresh unique -> {:?}",
        client.cas(b"greeting", b"updated", cas, SetOptions::default())?
    );
    let stale = client.cas(b"greeting", b"lost race", cas, SetOptions::default())?;
    assert_eq!(stale, CasResult::Exists);
    println!("cas with stale unique -> {stale:?}");

    let mut p = client.pipeline();
    for i in 0..10_000u32 {
        p.set(
            format!("item:{i}").as_bytes(),
            &i.to_be_bytes(),
            SetOptions::default(),
        )?;
    }
    let report = p.finish()?;
    println!(
        "pipelined {} noreply sets, {} errors",
        report.commands, report.errors
    );

    let keys: Vec<String> = (0..10_000).map(|i| format!("item:{}", i * 2)).collect();
    let mut hits = 0;
    client.get_multi(&keys, |_key, _item| hits += 1)?;
    println!("get_multi of {} keys -> {hits} hits", keys.len());

    match client.get(b"bad key") {
        Err(e) => println!("invalid key -> error: {e}"),
        Ok(_) => unreachable!("keys with spaces are rejected"),
    }
    let stats = client.stats(None)?;
    println!(
        "server stats: curr_items={} get_hits={} get_misses={}",
        stats[0].get("curr_items").unwrap_or("?"),
        stats[0].get("get_hits").unwrap_or("?"),
        stats[0].get("get_misses").unwrap_or("?"),
    );
    Ok(())
}
