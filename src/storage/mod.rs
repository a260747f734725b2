//! Storage: collections of resources, each with content (media bytes) and metadata (an entry
//! document).
//!
//! - [`FsStorage`]: the durable, embedded default master (atomic writes, safe names).
//! - `PgStorage` (feature `postgres`): a PostgreSQL master shared by many hosts, with the
//!   cache invalidation outbox written in the same transaction as each write.
//! - [`MemoryStorage`]: in-process, the oracle in tests.
//! - [`MemcacheStorage`]: a cache-through proxy putting a memcached cluster in front of any
//!   other storage.
//! - [`MemcacheOnlyStorage`]: memcached alone, for content that may be lost.
//!
//! Names: a collection or resource name is any non-empty UTF-8 string up to 200 bytes that
//! cannot be read as a path: no `/`, `\`, NUL, and not `.` or `..`. Such names are rejected
//! with [`Error::InvalidName`]; every other name is accepted and each storage maps it safely
//! (the file storage percent-encodes it).
//!
//! A resource exists when it has content or metadata. `ls` and `ils` filter by extension:
//! `ext = Some("txt")` keeps names ending in `.txt`.
//!
//! # Never stale: the argument
//!
//! **The promise** of [`MemcacheStorage`]: a read that starts after a `put` or `remove`
//! returned `Ok`, in any process sharing the master and the cache, returns that write's
//! content or a newer one; and no call waits longer than its configured deadlines. A write
//! that returned an error may or may not have landed (the master can commit and lose the
//! answer); its cache entry is invalidated either way.
//!
//! **Assumptions**, and what happens where one can fail:
//! 1. *One set of cache keys per master*: every storage of a master uses the same key
//!    generator, server list, distribution and copies per key (`replicas` and placement:
//!    a storage with fewer copies would leave the others' extra copies undeleted). A client namespace would break it, and is
//!    refused ([`StorageError::Config`]); a different generator or server list is not
//!    detected (document it in your deployment).
//! 2. *Entries live only at their key's home server* (with `replicas(n)`, at its copies,
//!    which ejections never move): a key whose home server is ejected is read from the
//!    master, never filled on a stand-in; a server whose instance changed (restarted) is
//!    taken as empty, and one a write could not reach is distrusted until a flush of it
//!    succeeds.
//! 3. *memcached's delete and CAS are atomic per key*: a CAS unique (or meta lease) taken
//!    before a delete fails after it.
//! 4. *The master is linearizable per resource*: a read that starts after a write committed
//!    sees it (`FsStorage`: a rename on a local file system; `PgStorage`: one primary, no
//!    read replicas).
//! 5. *Clocks*: only durations on one host's monotonic clock are used, never wall-clock
//!    times across hosts; two hosts' clocks may run at rates up to 5 % apart (the 60 ms
//!    margin on 1 s below).
//! 6. *Crashes*: a process may die at any instruction; what the master's invalidation log
//!    holds survives, memory does not.
//!
//! **The mechanisms**: (W) a write makes an *intent* durable in the master's
//! [`InvalidationLog`] (for `PgStorage`, in the write's own transaction), writes the
//! master, deletes the cache entry, and then clears the intent, or, if the delete failed,
//! first leaves a *failure record*; (F) a reader that misses takes a lease or a filling
//! marker with its CAS unique *before* reading the master, and stores with that CAS; (R) a
//! cache hit is served only if the log holds no record for its key and the log could be
//! read (an unreadable log distrusts the entry).
//!
//! **Paths** (each for every master unless named):
//! - *The delete succeeded* (with copies: on every copy; each fill is guarded by a marker
//!   on the copy it fills). It came after the master write. An entry filled from an older
//!   master read needed a CAS taken before the delete (F), which failed (3). A fill after
//!   the delete read the master after the write (4). So a read after the return finds no
//!   entry older than the write.
//! - *The delete failed* (a frozen or dead server, on any copy; a key moved off its home). The failure
//!   record is durable before the write returns, and readers distrust the key (R) until a
//!   replayed delete succeeds and clears it:
//!   - `FsStorage`: a record is a file in `~invalidations/`, synced before the return; every
//!     cache hit checks the key's folder there (one `stat`). No clock is involved.
//!   - `PgStorage`: readers check an in-memory mirror of the outbox, reloaded every 400 ms
//!     and on every notification, and trusted only until 1 s after its last reload *started*
//!     (the reader's monotonic clock); past that, `contains` queries the outbox. The writer
//!     returns 1.06 s after its commit (its own clock). A read starting after the return
//!     either sees a mirror whose reload started after the commit (its snapshot holds the
//!     row) or one whose reload started at least 1 s before it (5), which is not trusted.
//!     Notifications only make mirrors catch up sooner: a late or lost one (a cut LISTEN
//!     connection, a slow link) cannot make a read stale. The price is the wait, on this
//!     path only.
//!   - `MemoryStorage` keeps no log: it lives in one process, whose own list of failed
//!     invalidations (checked on every hit) covers it.
//!   - *The record cannot be written*: the intent stays (it was durable before the master
//!     write), so readers go on distrusting the key; it is replayed once its writer is gone.
//!     If the *intent* cannot be made durable, the write fails before the master changes.
//! - *The cache is unreachable.* As a failed delete; reads go to the master meanwhile.
//!   Past 10,000 failures remembered in one process, a failed server is flushed before it
//!   is trusted again.
//! - *The master is unreachable, frozen or slow.* Writes fail within the deadline
//!   (`PgStorage`: its call timeout; then calls fail at once for a second). Reads:
//!   `FsStorage` cannot check its journal, so hits are not served and reads fail; `PgStorage`
//!   serves hits while its mirror is trusted (up to 1 s after its last reload started),
//!   then `contains` fails within the call timeout and reads fail. So while the master is
//!   down, cached reads go on for about a second, then fail with an error, never with old
//!   content: a writer that can still reach the master (the reader's link alone is cut)
//!   returns only after every reader's mirror has expired.
//! - *A crash* between the intent and its clearing leaves the intent: readers distrust the
//!   key, and once the writer is gone (`FsStorage`: its pid; `PgStorage`: its session's
//!   advisory lock) any process replays it (6). A record created but never written (a
//!   crash or a full disk) is dropped once its writer is gone: an empty intent had no master
//!   write behind it, and an empty failure record has its write's intent beside it.

mod fs;
mod memcache;
mod memory;
#[cfg(feature = "postgres")]
mod pg;

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;

pub use fs::FsStorage;
pub use memcache::{
    CacheClients, KeyGenerator, MemcacheOnlyStorage, MemcacheStorage, MemcacheStorageBuilder,
    StorageCounters, DEFAULT_TTL,
};
pub use memory::MemoryStorage;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use pg::{PgStorage, PgStorageBuilder};

mod error;

use error::StorageError as Error;
pub use error::{Result, StorageError};

/// Where a resource (or, with `resource: None`, a collection) lives, as returned by
/// [`Storage::info`]. `key` is specific to the storage that made it: a relative path for the
/// file storage, a memcached key for the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceInfo {
    /// The collection's name.
    pub collection: String,
    /// The resource's name; `None` for the collection itself.
    pub resource: Option<String>,
    /// The storage-specific key.
    pub key: String,
}

impl ResourceInfo {
    fn resource_name(&self) -> Result<&str> {
        self.resource.as_deref().ok_or_else(|| Error::InvalidName {
            name: self.collection.clone(),
            reason: "this call needs a resource, not a collection",
        })
    }
}

/// Content to store: bytes in memory, or a reader that yields the full content.
pub enum Content<'a> {
    /// The whole content.
    Bytes(&'a [u8]),
    /// A reader, read to its end.
    Reader(&'a mut (dyn Read + Send)),
}

impl std::fmt::Debug for Content<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Bytes(b) => write!(f, "Content::Bytes({} bytes)", b.len()),
            Content::Reader(_) => f.write_str("Content::Reader(..)"),
        }
    }
}

impl<'a> From<&'a [u8]> for Content<'a> {
    fn from(b: &'a [u8]) -> Self {
        Content::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Content<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Content::Bytes(b)
    }
}

impl<'a> From<&'a str> for Content<'a> {
    fn from(s: &'a str) -> Self {
        Content::Bytes(s.as_bytes())
    }
}

impl Content<'_> {
    /// Reads everything into memory.
    ///
    /// # Errors
    /// [`StorageError::Io`] if the reader fails.
    pub fn into_bytes(self) -> Result<Bytes> {
        match self {
            Content::Bytes(b) => Ok(Bytes::copy_from_slice(b)),
            Content::Reader(r) => {
                let mut v = Vec::new();
                r.read_to_end(&mut v)
                    .map_err(|e| Error::io("reading content to store", e))?;
                Ok(Bytes::from(v))
            }
        }
    }
}

/// A write to one part of a resource, as handed to [`Storage::write_intending`].
#[derive(Debug)]
pub enum MasterWrite<'a> {
    /// Store this content.
    Put(Content<'a>),
    /// Remove the part.
    Remove,
}

/// Which half of a resource a call reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The media bytes.
    Content,
    /// The metadata (entry document).
    Meta,
}

impl Part {
    /// The other half.
    pub fn other(self) -> Part {
        match self {
            Part::Content => Part::Meta,
            Part::Meta => Part::Content,
        }
    }
}

/// A streaming listing, as [`Storage::ils`] returns it.
pub type ResourceIter<'a> = Box<dyn Iterator<Item = Result<(String, ResourceInfo)>> + 'a>;

/// Collections of resources with content and metadata. One storage is shared by many threads.
pub trait Storage: Send + Sync {
    /// Creates a collection (no error if it exists).
    fn create_container(&self, collection: &str) -> Result<()>;
    /// Where a resource, or with `None` the collection, lives. Validates the names; does not
    /// check existence.
    fn info(&self, collection: &str, resource: Option<&str>) -> Result<ResourceInfo>;
    /// One half of a resource; [`Error::NotFound`] if it has none.
    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes>;
    /// Stores one half of a resource (the collection must exist).
    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()>;
    /// Removes one half of a resource; [`Error::NotFound`] if there was none.
    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()>;
    /// The resource's content; [`Error::NotFound`] if it has none.
    fn get_content(&self, info: &ResourceInfo) -> Result<Bytes> {
        self.get(info, Part::Content)
    }
    /// The resource's metadata; [`Error::NotFound`] if it has none.
    fn get_meta_data(&self, info: &ResourceInfo) -> Result<Bytes> {
        self.get(info, Part::Meta)
    }
    /// Stores the content (the collection must exist).
    fn put_content(&self, info: &ResourceInfo, content: Content<'_>) -> Result<()> {
        self.put(info, Part::Content, content)
    }
    /// Stores the metadata (the collection must exist).
    fn put_meta_data(&self, info: &ResourceInfo, data: Content<'_>) -> Result<()> {
        self.put(info, Part::Meta, data)
    }
    /// Removes the content; [`Error::NotFound`] if there was none.
    fn remove_content(&self, info: &ResourceInfo) -> Result<()> {
        self.remove(info, Part::Content)
    }
    /// Removes the metadata; [`Error::NotFound`] if there was none.
    fn remove_meta_data(&self, info: &ResourceInfo) -> Result<()> {
        self.remove(info, Part::Meta)
    }
    /// True if the resource has content or metadata (for a collection: if it exists).
    fn exists(&self, info: &ResourceInfo) -> Result<bool>;
    /// The resources of a collection, by name, optionally only those ending in `.ext`.
    fn ls(&self, collection: &str, ext: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>>;
    /// Like [`ls`](Self::ls), streaming (for large collections), in no particular order.
    fn ils(&self, collection: &str, ext: Option<&str>) -> Result<ResourceIter<'_>>;
    /// Makes sure the named resources (`"collection/resource"`, or whole collections as
    /// `"collection"`; all if empty) are durable.
    fn persist(&self, paths: &[&str]) -> Result<()>;
    /// Releases what the storage holds; later calls may fail.
    fn shutdown(&self) -> Result<()>;
    /// Whether [`write_intending`](Self::write_intending) is supported: the storage records
    /// a cache invalidation intent in the same transaction as the write (an outbox).
    fn writes_intents_atomically(&self) -> bool {
        false
    }

    /// Applies `write` to `part` of `info` and records, in the same transaction, that the
    /// cache entry `key` is changing (as [`InvalidationLog::intend`] would); returns the
    /// record's name. Only called when
    /// [`writes_intents_atomically`](Self::writes_intents_atomically) says so; the default
    /// refuses.
    ///
    /// # Errors
    /// As [`put`](Self::put) and [`remove`](Self::remove); nothing is written then.
    fn write_intending(
        &self,
        info: &ResourceInfo,
        part: Part,
        write: MasterWrite<'_>,
        key: &str,
    ) -> Result<String> {
        let _ = (info, part, write, key);
        Err(Error::io(
            "writing with an intent",
            std::io::Error::other("not supported by this storage"),
        ))
    }

    /// Where this storage keeps failed cache invalidations durably, for every process that
    /// uses it (see [`InvalidationLog`]); `None` (the default) if it keeps none.
    fn invalidation_log(&self) -> Option<&dyn InvalidationLog> {
        None
    }
}

/// Failed cache invalidations, kept by a master storage where every process that uses it sees
/// them: a cache in front of the master does not serve an entry with a record here, and any
/// process replays the records (deletes the entries) and removes them. A record added while
/// an entry is being replayed stays.
pub trait InvalidationLog: Send + Sync {
    /// Records that the cache entry `key` may be stale; returns the record's name (for
    /// [`replayed`](Self::replayed)). Durable when this returns.
    fn record(&self, key: &str) -> Result<String>;
    /// Records, before a master write, that the cache entry `key` is about to change; returns
    /// the record's name. Such a record makes readers distrust the entry like any other, but
    /// is not replayed while the process that wrote it lives (its write is in flight: a
    /// replay now could run before the master write); after a crash it is. Durable when this
    /// returns.
    fn intend(&self, key: &str) -> Result<String>;
    /// Whether `key` has a record not replayed yet.
    fn contains(&self, key: &str) -> Result<bool>;
    /// Up to `limit` keys with records to replay, each with those records (in-flight intents
    /// of live processes left out).
    fn pending(&self, limit: usize) -> Result<Vec<LogEntry>>;
    /// `entry` was replayed: removes the records it covered (not those added since).
    fn replayed(&self, entry: &LogEntry) -> Result<()>;
    /// False when the log knows, without reading it, that nothing is pending (a mirror of
    /// it kept up to date); replayers then skip [`pending`](Self::pending). Default: true.
    fn may_have_pending(&self) -> bool {
        true
    }
}

/// A key with failed invalidations, as [`InvalidationLog::pending`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The cache key.
    pub key: String,
    /// The records it covers, in the log's own terms.
    pub records: Vec<String>,
}

/// Longest accepted name, in bytes (before any encoding).
pub const MAX_NAME_LEN: usize = 200;

/// Checks a collection or resource name (see the module docs).
///
/// # Errors
/// [`StorageError::InvalidName`] with the rule the name breaks.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 200 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are path components");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("contains a path separator");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    Ok(())
}

/// A validated [`ResourceInfo`] keyed `collection/resource` (or `collection`), for storages
/// whose key is the names themselves.
fn named_info(collection: &str, resource: Option<&str>) -> Result<ResourceInfo> {
    validate_name(collection)?;
    if let Some(r) = resource {
        validate_name(r)?;
    }
    Ok(ResourceInfo {
        collection: collection.to_string(),
        resource: resource.map(str::to_string),
        key: match resource {
            Some(r) => format!("{collection}/{r}"),
            None => collection.to_string(),
        },
    })
}

/// The `ils` of a storage keyed by names: `names` (a snapshot) with their infos.
fn named_listing(collection: &str, names: Vec<String>) -> ResourceIter<'static> {
    let collection = collection.to_string();
    Box::new(names.into_iter().map(move |n| {
        let info = ResourceInfo {
            collection: collection.clone(),
            resource: Some(n.clone()),
            key: format!("{collection}/{n}"),
        };
        Ok((n, info))
    }))
}

/// True if `name` passes the `ext` filter of `ls`/`ils`.
fn ext_matches(name: &str, ext: Option<&str>) -> bool {
    match ext {
        None => true,
        Some(ext) => {
            let ext = ext.trim_start_matches('.');
            name.len() > ext.len() + 1
                && name.ends_with(ext)
                && name.as_bytes()[name.len() - ext.len() - 1] == b'.'
        }
    }
}

/// Checks `persist` paths, for storages with nothing to make durable.
fn check_paths(paths: &[&str]) -> Result<()> {
    for p in paths {
        split_path(p)?;
    }
    Ok(())
}

/// Splits a `persist` path into collection and optional resource.
fn split_path(path: &str) -> Result<(&str, Option<&str>)> {
    let (c, r) = match path.split_once('/') {
        Some((c, r)) => (c, Some(r)),
        None => (path, None),
    };
    validate_name(c)?;
    if let Some(r) = r {
        validate_name(r)?;
    }
    Ok((c, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "A",
            "file.txt",
            "..a",
            "a..",
            "ünïcödé",
            "with space",
            "~tilde",
            "%41",
        ] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a\\b",
            "nul\0",
            &"x".repeat(201),
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ext_filter() {
        assert!(ext_matches("a.txt", Some("txt")));
        assert!(ext_matches("a.txt", Some(".txt")));
        assert!(!ext_matches("atxt", Some("txt")));
        assert!(!ext_matches(".txt", Some("txt")));
        assert!(!ext_matches("a.txt", Some("xt")));
        assert!(ext_matches("anything", None));
    }
}
