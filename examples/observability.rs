//! Metrics of a client and a storage, exported for Prometheus: starts a local memcached,
//! installs a Prometheus recorder (before building clients: they register their metrics when
//! built), makes some calls (hits, misses, a multi-get, storage reads) and prints the
//! exposition text a scrape would get.
//!
//! Run: `cargo run --example observability --features metrics` (needs `memcached` on PATH).

#[path = "../proto-tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
use mcstore::{Client, Pool, SetOptions};
use metrics_exporter_prometheus::PrometheusBuilder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let mc = support::Memcached::start();

    let mut client = Client::builder().server(mc.addr()).build()?;
    client.set(b"greeting", b"hello", SetOptions::default())?;
    for _ in 0..10 {
        client.get(b"greeting")?; // hits
    }
    client.get(b"absent")?; // a miss
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    client.get_multi(&keys, |_, _| {})?;

    let store = MemcacheStorage::new(
        Pool::new(Client::builder().server(mc.addr()), 2)?,
        Arc::new(MemoryStorage::new()),
    );
    store.create_container("posts")?;
    let info = store.info("posts", Some("hello.txt"))?;
    store.put_content(&info, "hello".into())?;
    for _ in 0..5 {
        store.get_content(&info)?; // one miss and fill, then hits
    }

    print!("{}", prometheus.render());
    Ok(())
}
