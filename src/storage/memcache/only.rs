//! `MemcacheOnlyStorage`: memcached as the only store, without a master.
//!
//! Content lives only in memcached (and may be evicted: this is a cache that looks like a
//! storage, for data that can be lost). Collection membership is kept under one key per
//! collection, updated with `gets`/`cas` retries so concurrent puts lose no member.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::counters::{bump, fmt_settings, StorageCounters};
use super::keys::{cache_key, cached_info, resource_infos, KeyGenerator, FLAG_VALUE};
use crate::client::Key;
use crate::client::{CasResult, Client, Pool, SetOptions};
use crate::storage::memory::not_found;
use crate::storage::{
    check_paths, ext_matches, validate_name, Content, Part, ResourceInfo, ResourceIter, Result,
    Storage, StorageError,
};

/// A storage kept only in memcached (see the module documentation).
///
/// ```no_run
/// use mcstore::{Client, Pool};
/// use mcstore::storage::{MemcacheOnlyStorage, Storage};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::new(Client::builder().server("127.0.0.1:11211"), 8)?;
/// let store = MemcacheOnlyStorage::new(pool).ttl(3600);
/// store.create_container("sessions")?;
/// let info = store.info("sessions", Some("abc"))?;
/// store.put_content(&info, "hello".into())?;
/// assert_eq!(&store.get_content(&info)?[..], b"hello");
/// # Ok(()) }
/// ```
pub struct MemcacheOnlyStorage {
    pool: Pool,
    keys: KeyGenerator,
    ttl: u32,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for MemcacheOnlyStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_settings(f, "MemcacheOnlyStorage", &self.pool, self.ttl)
    }
}

impl MemcacheOnlyStorage {
    /// A storage in the memcached cluster behind `pool` (a [`Pool`], or a single [`Client`]
    /// via `.into()`).
    pub fn new(pool: impl Into<Pool>) -> MemcacheOnlyStorage {
        MemcacheOnlyStorage {
            pool: pool.into(),
            keys: KeyGenerator::default(),
            ttl: 0,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    setters! {
        /// The key generator (default: [`KeyGenerator::default`]).
        key_generator(keys: KeyGenerator) => keys;

        /// Expiration of stored content in seconds (default 0: until evicted).
        ttl(ttl: u32) => ttl;
    }

    /// Reads that found their content (`hits`) and that did not (`misses`); the other
    /// counters stay 0 (there is no master).
    pub fn counters(&self) -> StorageCounters {
        StorageCounters {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..StorageCounters::default()
        }
    }

    fn members_key(&self, collection: &str) -> Result<String> {
        let key = format!("{}:members", self.keys.key(collection, None));
        Key::new(key.as_bytes())?;
        Ok(key)
    }

    fn client(&self) -> Result<crate::client::PooledClient<'_>> {
        Ok(self.pool.get()?)
    }

    fn get_part(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        let key = cache_key(&self.keys, info, part)?;
        let mut c = self.client()?;
        match c.get(key.as_bytes())? {
            Some(item) if item.flags == FLAG_VALUE => {
                bump(&self.hits, "mcstore_storage_hits_total");
                Ok(Bytes::from(item.value))
            }
            _ => {
                bump(&self.misses, "mcstore_storage_misses_total");
                Err(not_found(&info.collection, info.resource.as_deref()))
            }
        }
    }

    fn put_part(&self, info: &ResourceInfo, data: Content<'_>, key: &str) -> Result<()> {
        let name = info.resource_name()?.to_string();
        let data = data.into_bytes()?;
        let mut c = self.client()?;
        let members = self.members_key(&info.collection)?;
        if c.get(members.as_bytes())?.is_none() {
            return Err(not_found(&info.collection, None));
        }
        let value = SetOptions::default().flags(FLAG_VALUE).ttl(self.ttl);
        c.set(key.as_bytes(), &data, value)?;
        self.update_members(&mut c, &info.collection, |names| names.insert(name.clone()))
    }

    fn remove_part(&self, info: &ResourceInfo, part: Part, key: &str) -> Result<()> {
        let name = info.resource_name()?.to_string();
        let mut c = self.client()?;
        if !c.delete(key.as_bytes())? {
            return Err(not_found(&info.collection, Some(&name)));
        }
        let other_key = cache_key(&self.keys, info, part.other())?;
        if c.get(other_key.as_bytes())?.is_none() {
            self.update_members(&mut c, &info.collection, |names| names.remove(&name))?;
        }
        Ok(())
    }

    /// Reads the member set with `gets`, changes it, and writes it back with `cas`, retrying
    /// when another writer got in between.
    fn update_members(
        &self,
        c: &mut Client,
        collection: &str,
        change: impl Fn(&mut std::collections::BTreeSet<String>) -> bool,
    ) -> Result<()> {
        let key = self.members_key(collection)?;
        for attempt in 0..1000u32 {
            let Some(item) = c.gets(key.as_bytes())? else {
                return Err(not_found(collection, None));
            };
            let mut names = decode_members(&item.value);
            if !change(&mut names) {
                return Ok(());
            }
            let value = encode_members(&names);
            match c.cas(
                key.as_bytes(),
                &value,
                item.cas.unwrap_or(0),
                SetOptions::default(),
            )? {
                CasResult::Stored => return Ok(()),
                CasResult::NotFound => return Err(not_found(collection, None)),
                CasResult::Exists => {
                    // Contended: back off a little, growing.
                    std::thread::sleep(Duration::from_micros(50 * u64::from(attempt.min(40))));
                }
            }
        }
        Err(StorageError::io(
            format!("updating the members of {collection}"),
            std::io::Error::other("too much contention"),
        ))
    }

    fn members(&self, collection: &str) -> Result<Vec<String>> {
        let key = self.members_key(collection)?;
        let mut c = self.client()?;
        match c.get(key.as_bytes())? {
            Some(item) => Ok(decode_members(&item.value).into_iter().collect()),
            None => Err(not_found(collection, None)),
        }
    }
}

/// Member names, NUL-separated (names cannot contain NUL).
fn encode_members(names: &std::collections::BTreeSet<String>) -> Vec<u8> {
    let mut v = Vec::new();
    for n in names {
        v.extend_from_slice(n.as_bytes());
        v.push(0);
    }
    v
}

fn decode_members(v: &[u8]) -> std::collections::BTreeSet<String> {
    v.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl Storage for MemcacheOnlyStorage {
    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        self.get_part(info, part)
    }

    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()> {
        let key = cache_key(&self.keys, info, part)?;
        self.put_part(info, data, &key)
    }

    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()> {
        let key = cache_key(&self.keys, info, part)?;
        self.remove_part(info, part, &key)
    }

    fn create_container(&self, collection: &str) -> Result<()> {
        validate_name(collection)?;
        let key = self.members_key(collection)?;
        self.client()?
            .add(key.as_bytes(), b"", SetOptions::default())?;
        Ok(())
    }

    fn info(&self, collection: &str, resource: Option<&str>) -> Result<ResourceInfo> {
        cached_info(&self.keys, collection, resource)
    }

    fn exists(&self, info: &ResourceInfo) -> Result<bool> {
        if info.resource.is_none() {
            return Ok(self.members(&info.collection).is_ok());
        }
        let mut c = self.client()?;
        for part in [Part::Content, Part::Meta] {
            let key = cache_key(&self.keys, info, part)?;
            if c.get(key.as_bytes())?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn ls(&self, collection: &str, ext: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>> {
        self.ils(collection, ext)?.collect()
    }

    fn ils(&self, collection: &str, ext: Option<&str>) -> Result<ResourceIter<'_>> {
        validate_name(collection)?;
        let names: Vec<String> = self
            .members(collection)?
            .into_iter()
            .filter(|n| ext_matches(n, ext))
            .collect();
        Ok(resource_infos(
            &self.keys,
            collection,
            names.into_iter().map(Ok),
        ))
    }

    fn persist(&self, paths: &[&str]) -> Result<()> {
        check_paths(paths) // nothing to make durable in memcached
    }

    fn shutdown(&self) -> Result<()> {
        Ok(())
    }
}
