//! Metrics of a client and a storage, exported for Prometheus: starts a local memcached,
//! installs a Prometheus recorder (before building clients: they register their metrics when
//! built), makes some calls (hits, misses, a multi-get, storage reads) and prints the
//! exposition text a scrape would get.
//!
//! Run: start a memcached (`memcached -U 0 -p 11211 &`, as root add `-u root`), then
//! `cargo run --example observability --features metrics`. `MEMCACHED_SERVERS=host:port`
//! names another server. Self-contained: copy it into a project with `mcstore` (feature
//! `metrics`) and `metrics-exporter-prometheus`.

use std::sync::Arc;

use mcstore::storage::{MemcacheStorage, MemoryStorage, Storage};
use mcstore::{Client, Pool, SetOptions};
use metrics_exporter_prometheus::PrometheusBuilder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let addr = std::env::var("MEMCACHED_SERVERS").unwrap_or_else(|_| "127.0.0.1:11211".into());

    let mut client = Client::builder().server(&addr).build()?;
    client.set(b"greeting", b"hello", SetOptions::default())?;
    for _ in 0..10 {
        client.get(b"greeting")?; // hits
    }
    client.get(b"absent")?; // a miss
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    client.get_multi(&keys, |_, _| {})?;

    let store = MemcacheStorage::new(
        Pool::new(Client::builder().server(&addr), 2)?,
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
