//! Cache keys and entries: the key generator, the key of each half of a resource, and the
//! client flags that tell content from markers.
//!
//! The `pub(super)` items here are the door [`MemcacheOnlyStorage`] comes in by: both
//! storages over memcached make keys and read entries the same way, so that one cache can
//! hold both and clients on any protocol tell their entries apart.
//!
//! [`MemcacheOnlyStorage`]: crate::storage::MemcacheOnlyStorage

use std::fmt::Write as _;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::client::Key;
use crate::storage::{validate_name, Part, ResourceInfo, ResourceIter, Result};

/// Client flags of this storage's cache entries (`MC` and a kind), so that readers on any
/// protocol tell them apart: content, a filling marker, a "read the master" marker. Anything
/// else, a meta lease placeholder (flags 0) included, is not content.
pub(super) const FLAG_VALUE: u32 = 0x4d43_0000;
/// A filling marker: a reader is reading the master to fill the entry.
pub(super) const FLAG_FILLING: u32 = 0x4d43_0001;
/// A "read the master" marker: content too large, or refused by the server.
pub(super) const FLAG_TOO_LARGE: u32 = 0x4d43_0002;
/// The index of content stored as chunks (see `entry`). Content and index entries carry
/// their compression's bits ([`crate::codec::flags`]) besides their kind.
pub(super) const FLAG_CHUNKED: u32 = 0x4d43_0003;

/// Makes the cache key of a resource (or collection) from its names. The storage appends
/// `:c` for content and `:m` for metadata, so the result must leave room for 2 bytes.
///
/// A custom generator must be injective (distinct names, distinct keys: otherwise two
/// resources share cache entries) and should make valid memcached keys (at most 248 bytes, no
/// spaces or control characters). Names it makes no valid key of are not cached: with
/// [`MemcacheStorage`](super::MemcacheStorage) those calls go to the master, with
/// [`MemcacheOnlyStorage`](crate::storage::MemcacheOnlyStorage) they fail.
///
/// ```
/// use mcstore::storage::KeyGenerator;
/// let k = KeyGenerator::default().key("posts", Some("hello world.txt"));
/// assert!(k.starts_with("mcs:posts:") && k.len() == 4 + 5 + 1 + 64);
/// // The collection's length first, so that ("a:b", "c") and ("a", "b:c") differ.
/// let custom = KeyGenerator::new(|c, r| format!("app:{}:{c}:{}", c.len(), r.unwrap_or("")));
/// assert_eq!(custom.key("a:b", Some("c")), "app:3:a:b:c");
/// assert_eq!(custom.key("a", Some("b:c")), "app:1:a:b:c");
/// ```
#[derive(Clone)]
pub struct KeyGenerator(Arc<KeyFn>);

impl std::fmt::Debug for KeyGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyGenerator(..)")
    }
}

type KeyFn = dyn Fn(&str, Option<&str>) -> String + Send + Sync;

impl KeyGenerator {
    /// A custom generator.
    pub fn new(f: impl Fn(&str, Option<&str>) -> String + Send + Sync + 'static) -> Self {
        KeyGenerator(Arc::new(f))
    }

    /// The key for `collection` / `resource`.
    pub fn key(&self, collection: &str, resource: Option<&str>) -> String {
        (self.0)(collection, resource)
    }
}

impl Default for KeyGenerator {
    /// `mcs:<collection, sanitised, at most 40 bytes>:<hex SHA-256 of the names>`: always a
    /// valid memcached key, whatever the names contain, and distinct for distinct names.
    fn default() -> Self {
        KeyGenerator::new(|collection, resource| {
            let mut h = Sha256::new();
            h.update(collection.as_bytes());
            h.update([0]);
            if let Some(r) = resource {
                h.update(r.as_bytes());
                h.update([1]);
            }
            let mut key = String::from("mcs:");
            key.extend(collection.chars().take(40).map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            }));
            key.push(':');
            for b in h.finalize() {
                let _ = write!(key, "{b:02x}");
            }
            key
        })
    }
}

/// The cache key of one half of a resource: the generator's key for its names, and `:c` or
/// `:m`. Made from the names, never from `info.key` (a caller could pass another storage's
/// info, or change it). An error if it is not a valid memcached key.
pub(super) fn cache_key(keys: &KeyGenerator, info: &ResourceInfo, part: Part) -> Result<String> {
    let suffix = match part {
        Part::Content => ":c",
        Part::Meta => ":m",
    };
    let key = format!(
        "{}{suffix}",
        keys.key(&info.collection, info.resource.as_deref())
    );
    Key::new(key.as_bytes())?;
    Ok(key)
}

/// A resource's info in memcached alone: validated names, and a key that leaves room for the
/// part suffixes (without a master, a name without a valid cache key cannot be stored).
pub(super) fn cached_info(
    keys: &KeyGenerator,
    collection: &str,
    resource: Option<&str>,
) -> Result<ResourceInfo> {
    validate_name(collection)?;
    if let Some(r) = resource {
        validate_name(r)?;
    }
    let info = ResourceInfo {
        collection: collection.to_string(),
        resource: resource.map(str::to_string),
        key: keys.key(collection, resource),
    };
    cache_key(keys, &info, Part::Content)?;
    Ok(info)
}

/// The listing of `collection` from its resource names, with this storage's keys.
pub(super) fn resource_infos<'a>(
    keys: &'a KeyGenerator,
    collection: &str,
    names: impl Iterator<Item = Result<String>> + 'a,
) -> ResourceIter<'a> {
    let collection = collection.to_string();
    Box::new(names.map(move |n| {
        let n = n?;
        let key = keys.key(&collection, Some(&n));
        Ok((
            n.clone(),
            ResourceInfo {
                collection: collection.clone(),
                resource: Some(n),
                key,
            },
        ))
    }))
}
