//! An in-process storage: the oracle in tests.

use std::collections::BTreeMap;
use std::sync::RwLock;

use bytes::Bytes;

use super::error::{Result, StorageError as Error};
use super::{
    check_paths, ext_matches, named_info, named_listing, validate_name, Content, Part,
    ResourceInfo, ResourceIter, Storage,
};

#[derive(Default, Clone)]
struct Entry {
    content: Option<Bytes>,
    meta: Option<Bytes>,
}

impl Entry {
    fn slot(&self, part: Part) -> &Option<Bytes> {
        match part {
            Part::Content => &self.content,
            Part::Meta => &self.meta,
        }
    }

    fn slot_mut(&mut self, part: Part) -> &mut Option<Bytes> {
        match part {
            Part::Content => &mut self.content,
            Part::Meta => &mut self.meta,
        }
    }
}

/// Collections held in memory, behind one lock.
///
/// ```
/// use mcstore::storage::{MemoryStorage, Storage};
/// let s = MemoryStorage::new();
/// s.create_container("posts").unwrap();
/// let info = s.info("posts", Some("hello.txt")).unwrap();
/// s.put_content(&info, "hi".into()).unwrap();
/// assert_eq!(&s.get_content(&info).unwrap()[..], b"hi");
/// ```
#[derive(Default)]
pub struct MemoryStorage {
    collections: RwLock<BTreeMap<String, BTreeMap<String, Entry>>>,
}

impl std::fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let collections = self.collections.read().map_or(0, |c| c.len());
        f.debug_struct("MemoryStorage")
            .field("collections", &collections)
            .finish()
    }
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<String, Entry>>> {
        self.collections.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, BTreeMap<String, Entry>>> {
        self.collections.write().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn not_found(collection: &str, resource: Option<&str>) -> Error {
    Error::NotFound(match resource {
        Some(r) => format!("{collection}/{r}"),
        None => format!("collection {collection}"),
    })
}

impl Storage for MemoryStorage {
    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        let name = info.resource_name()?;
        let cols = self.read();
        let entry = cols
            .get(&info.collection)
            .ok_or_else(|| not_found(&info.collection, None))?
            .get(name);
        let value = entry.and_then(|e| e.slot(part).clone());
        value.ok_or_else(|| not_found(&info.collection, Some(name)))
    }

    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()> {
        let name = info.resource_name()?;
        let data = data.into_bytes()?;
        let mut cols = self.write();
        let col = cols
            .get_mut(&info.collection)
            .ok_or_else(|| not_found(&info.collection, None))?;
        let entry = col.entry(name.to_string()).or_default();
        *entry.slot_mut(part) = Some(data);
        Ok(())
    }

    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()> {
        let name = info.resource_name()?;
        let mut cols = self.write();
        let col = cols
            .get_mut(&info.collection)
            .ok_or_else(|| not_found(&info.collection, None))?;
        let entry = col
            .get_mut(name)
            .ok_or_else(|| not_found(&info.collection, Some(name)))?;
        if entry.slot_mut(part).take().is_none() {
            return Err(not_found(&info.collection, Some(name)));
        }
        if entry.content.is_none() && entry.meta.is_none() {
            col.remove(name);
        }
        Ok(())
    }

    fn create_container(&self, collection: &str) -> Result<()> {
        validate_name(collection)?;
        self.write().entry(collection.to_string()).or_default();
        Ok(())
    }

    fn info(&self, collection: &str, resource: Option<&str>) -> Result<ResourceInfo> {
        named_info(collection, resource)
    }

    fn exists(&self, info: &ResourceInfo) -> Result<bool> {
        let cols = self.read();
        let Some(col) = cols.get(&info.collection) else {
            return Ok(false);
        };
        Ok(match &info.resource {
            None => true,
            Some(r) => col.contains_key(r),
        })
    }

    fn ls(&self, collection: &str, ext: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>> {
        self.ils(collection, ext)?.collect()
    }

    fn ils(&self, collection: &str, ext: Option<&str>) -> Result<ResourceIter<'_>> {
        validate_name(collection)?;
        let cols = self.read();
        let col = cols
            .get(collection)
            .ok_or_else(|| not_found(collection, None))?;
        // A snapshot: the lock is not held while the caller iterates.
        let names: Vec<String> = col
            .keys()
            .filter(|n| ext_matches(n, ext))
            .cloned()
            .collect();
        Ok(named_listing(collection, names))
    }

    fn persist(&self, paths: &[&str]) -> Result<()> {
        check_paths(paths) // nothing to make durable in memory
    }

    fn shutdown(&self) -> Result<()> {
        Ok(())
    }
}
