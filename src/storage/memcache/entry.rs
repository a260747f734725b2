//! A cache entry's bytes: content as it is, compressed, or as the index of chunks (content
//! over the item size, with [`chunked_values`](super::MemcacheStorageBuilder::chunked_values)).
//!
//! Why chunks keep the never-stale rules: the index is the entry. It is filled, found and
//! invalidated exactly as content is (a fill's CAS over the reader's marker or lease; a
//! write deletes it). Its chunks are written before it, under keys that carry the index's
//! random generation, and are never written again: a chunk found under such a key is that
//! generation's, so a reader that got a current index assembles current content or finds a
//! chunk missing (a miss: the master serves, and the index is deleted so the next reader
//! fills it again). A writer that dies between chunks and index leaves only orphan chunks,
//! which expire with the entry TTL (plus a second). A chunk that does not match its index,
//! or content whose CRC does not, is counted as a cache error and served by the master.

use bytes::Bytes;

use crate::client::SetOptions;
use crate::codec::chunked::{chunk_ttl, Assembler, ChunkIndex, CHUNK_HEADER};
use crate::codec::flags::ANY_COMPRESSION;
use crate::codec::Front;

use super::counters::bump;
use super::keys::{FLAG_CHUNKED, FLAG_TOO_LARGE, FLAG_VALUE};
use super::{CacheClients, Shared};

/// What a fill stores under the key.
pub(super) struct Entry {
    pub(super) data: Vec<u8>,
    pub(super) flags: u32,
    /// The chunks written for it (to delete if the fill does not store the index).
    pub(super) chunks: Vec<Vec<u8>>,
    /// Bytes compression saved.
    saved: u64,
}

/// What an entry found in the cache holds.
pub(super) enum Found {
    /// Content (decoded).
    Content(Bytes),
    /// The index of chunked content, and the compression bits of the content.
    Chunked(ChunkIndex, u32),
    /// Not this storage's content: a marker, or an entry not written by a storage.
    Other(u32),
    /// A storage's entry this storage cannot read (compressed with a dictionary it does not
    /// have, damaged): counted as a cache error; the lookup deletes it, so that the next
    /// reader fills it again instead of every read going to the master until its TTL.
    Undecodable,
}

/// The kind of an entry, without its compression bits.
pub(super) fn kind(flags: u32) -> u32 {
    flags & !ANY_COMPRESSION
}

impl Shared {
    /// The entry that caches `value`: compressed if the storage compresses, chunked if it is
    /// over the item size and chunks are on (the chunks are written here, before the fill
    /// stores the index; no client is held meanwhile), or a "read the master" marker.
    pub(super) fn encode_entry(&self, key: &str, value: &[u8]) -> Entry {
        let s = &self.settings;
        let mut data = Vec::new();
        let bits = match &s.compressor {
            // Never an entry this storage could not read back.
            Some(c) if value.len() <= c.max_decoded_len() => match c.compress(value, &mut data) {
                Ok(bits) => bits,
                Err(_) => {
                    data.clear();
                    data.extend_from_slice(value);
                    0
                }
            },
            _ => {
                data.extend_from_slice(value);
                0
            }
        };
        let saved = value.len().saturating_sub(data.len()) as u64;
        let too_large = || Entry {
            data: Vec::new(),
            flags: FLAG_TOO_LARGE,
            chunks: Vec::new(),
            saved: 0,
        };
        let item = self.item_capacity();
        if data.len() <= item {
            return Entry {
                data,
                flags: FLAG_VALUE | bits,
                chunks: Vec::new(),
                saved,
            };
        }
        if value.len() > s.chunked_max || item <= CHUNK_HEADER {
            return too_large();
        }
        let Ok(index) = ChunkIndex::plan(&data, item, bits) else {
            return too_large();
        };
        let keys = index.chunk_keys(key.as_bytes());
        let items: Vec<(Vec<u8>, Vec<u8>)> = (keys.iter().enumerate())
            .map(|(i, k)| (k.clone(), index.chunk(&data, i as u32)))
            .collect();
        // The chunks outlive the index by a second: an index never finds them expired first.
        let opts = SetOptions::default().ttl(chunk_ttl(s.ttl));
        let stored = self.unpinned(|c| c.set_many(&items, opts));
        match stored {
            Ok(n) if n == items.len() => Entry {
                data: index.encode().to_vec(),
                flags: FLAG_CHUNKED | bits,
                chunks: keys,
                saved,
            },
            r => {
                if let Err(e) = r {
                    self.cache_failed(&e);
                }
                self.delete_chunks(&keys);
                too_large()
            }
        }
    }

    /// The largest entry cached in one item: the builder's `max_item_size`, or the servers'
    /// item size as a chunked `set` takes it (each client asks once a server answers).
    fn item_capacity(&self) -> usize {
        match self.settings.max_item_size {
            Some(n) => n,
            None => self
                .unpinned(|c| Ok(c.capacity()))
                .unwrap_or(crate::codec::chunked::item_capacity(1024 * 1024)),
        }
    }

    /// Runs `f` with a client routing keys itself (a pool's, or the shared client): for
    /// chunks, which live on their own keys' servers. The caller holds no client.
    fn unpinned<T>(&self, f: impl FnOnce(&mut dyn Front) -> crate::Result<T>) -> crate::Result<T> {
        match &self.settings.cache {
            CacheClients::Pool(p) => f(&mut *p.get()?),
            CacheClients::Shared(s) => f(&mut &*s),
        }
    }

    /// Counts a fill that stored `entry`.
    pub(super) fn count_fill(&self, entry: &Entry) {
        let c = &self.counters;
        bump(&c.fills, "mcstore_storage_fills_total");
        if entry.flags & ANY_COMPRESSION != 0 {
            bump(
                &c.compressed_fills,
                "mcstore_storage_compressed_fills_total",
            );
            crate::observe::storage("mcstore_storage_bytes_saved_total", entry.saved);
            c.bytes_saved
                .fetch_add(entry.saved, std::sync::atomic::Ordering::Relaxed);
        }
        if kind(entry.flags) == FLAG_CHUNKED {
            bump(&c.chunked_fills, "mcstore_storage_chunked_fills_total");
        }
    }

    /// Best effort: chunks that no index will name.
    pub(super) fn delete_chunks(&self, keys: &[Vec<u8>]) {
        if keys.is_empty() {
            return;
        }
        let r = self.unpinned(|c| c.delete_many(keys));
        if let Err(e) = r {
            self.cache_failed(&e);
        }
    }

    /// Reads an entry found with `flags`.
    pub(super) fn decode_entry(&self, flags: u32, value: Vec<u8>) -> Found {
        let bits = flags & ANY_COMPRESSION;
        match kind(flags) {
            FLAG_VALUE if bits == 0 => Found::Content(Bytes::from(value)),
            FLAG_VALUE => match self.decompress(&value, bits) {
                Some(v) => Found::Content(Bytes::from(v)),
                None => Found::Undecodable,
            },
            FLAG_CHUNKED => match ChunkIndex::parse(&value) {
                Ok(ix) => Found::Chunked(ix, bits),
                Err(e) => {
                    self.cache_failed(&e);
                    Found::Undecodable
                }
            },
            _ => Found::Other(flags),
        }
    }

    /// Decompresses content; `None` (counted as a cache error) if it does not decompress.
    fn decompress(&self, data: &[u8], bits: u32) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let default;
        let c = match &self.settings.compressor {
            Some(c) => c,
            None => {
                default = crate::codec::Compressor::default();
                &default
            }
        };
        match c.decompress(data, bits, &mut out) {
            Ok(_) => Some(out),
            Err(e) => {
                self.cache_failed(&e);
                None
            }
        }
    }

    /// The content of a chunked entry under `key`: its chunks fetched in one multi-get
    /// (no client held by the caller), put together and decompressed. `None` if a chunk is
    /// missing or does not match (then the index is deleted, so the next reader fills again).
    pub(super) fn read_chunks(&self, key: &str, index: ChunkIndex, bits: u32) -> Option<Bytes> {
        let keys = index.chunk_keys(key.as_bytes());
        let mut out = Vec::new();
        let mut asm = Assembler::new(index, &mut out);
        let mut bad = None;
        let mut place = |v: &[u8]| {
            if bad.is_none() {
                bad = asm.place(v).err();
            }
        };
        let r = self.unpinned(|c| c.get_many(&keys, &mut |item| place(item.value)));
        let whole = match (bad, r) {
            (None, Ok(())) => asm.finish(),
            (Some(e), _) | (None, Err(e)) => {
                asm.abandon();
                Err(e)
            }
        };
        match whole {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if let Err(e) = whole {
                    self.cache_failed(&e);
                }
                self.forget_index(key);
                return None;
            }
        }
        let content = if bits == 0 {
            out
        } else {
            match self.decompress(&out, bits) {
                Some(c) => c,
                None => {
                    self.forget_index(key);
                    return None;
                }
            }
        };
        bump(
            &self.counters.chunked_hits,
            "mcstore_storage_chunked_hits_total",
        );
        Some(Bytes::from(content))
    }

    /// Deletes an index whose chunks are gone, wherever the key is invalidated (a delete is
    /// always safe: at worst the next reader fills again).
    fn forget_index(&self, key: &str) {
        let r = self.unpinned(|c| c.delete_many(&[key.as_bytes().to_vec()]));
        if let Err(e) = r {
            self.cache_failed(&e);
        }
    }
}
