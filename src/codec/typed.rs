//! The typed and chunked calls of [`Client`] and [`SharedClient`]: thin loops over their byte
//! calls, written once for both through [`Front`].

use super::chunked::{chunk_ttl, item_capacity, Assembler, ChunkIndex, REPLACED_CHUNKS_LINGER};
use super::{flags, merge_flags, Codec};
use crate::client::{CasResult, Client, ItemInfo, ItemRef, SetOptions};
use crate::error::{Error, Result};
use crate::shared::SharedClient;

/// Item size assumed when no server answers `stats settings` (memcached's default).
const DEFAULT_ITEM_SIZE_MAX: usize = 1024 * 1024;

/// The byte calls the typed and chunked calls are made of.
pub(crate) trait Front {
    fn get_value(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>>;
    fn gets_value(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>>;
    /// Stores only if the item's CAS unique is still `cas`; whether it stored.
    fn cas_value(&mut self, key: &[u8], value: &[u8], cas: u64, opts: SetOptions) -> Result<bool>;
    fn add_value(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool>;
    fn set_value(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()>;
    fn get_many(&mut self, keys: &[Vec<u8>], found: &mut dyn FnMut(ItemRef<'_>)) -> Result<()>;
    fn set_many(&mut self, items: &[(Vec<u8>, Vec<u8>)], opts: SetOptions) -> Result<usize>;
    fn delete_many(&mut self, keys: &[Vec<u8>]) -> Result<usize>;
    fn touch_one(&mut self, key: &[u8], ttl: u32) -> Result<bool>;
    /// The largest value an item may hold on every server, less room for its key and header.
    fn capacity(&mut self) -> usize;
}

/// [`Front`]'s byte calls, which both fronts spell the same.
macro_rules! front_calls {
    () => {
        fn get_value(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
            self.get_into(key, buf)
        }
        fn gets_value(&mut self, key: &[u8], buf: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
            self.gets_into(key, buf)
        }
        fn cas_value(
            &mut self,
            key: &[u8],
            value: &[u8],
            cas: u64,
            opts: SetOptions,
        ) -> Result<bool> {
            Ok(self.cas(key, value, cas, opts)? == CasResult::Stored)
        }
        fn add_value(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<bool> {
            self.add(key, value, opts)
        }
        fn set_value(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
            self.set(key, value, opts)
        }
        fn get_many(&mut self, keys: &[Vec<u8>], found: &mut dyn FnMut(ItemRef<'_>)) -> Result<()> {
            self.get_multi(keys, |_, item| found(item))
        }
        fn set_many(&mut self, items: &[(Vec<u8>, Vec<u8>)], opts: SetOptions) -> Result<usize> {
            self.set_multi(items, opts)
        }
        fn delete_many(&mut self, keys: &[Vec<u8>]) -> Result<usize> {
            self.delete_multi(keys)
        }
        fn touch_one(&mut self, key: &[u8], ttl: u32) -> Result<bool> {
            self.touch(key, ttl)
        }
    };
}

impl Front for Client {
    front_calls!();
    fn capacity(&mut self) -> usize {
        let max_value = self.max_value();
        let size = match self.item_size {
            Some(s) => s,
            None => {
                let asked = item_size_max(self.stats(Some("settings")));
                // Kept only once a server answered: a default taken while every server was
                // down would stay wrong for good.
                self.item_size = asked;
                asked.unwrap_or(DEFAULT_ITEM_SIZE_MAX)
            }
        };
        item_capacity(size).min(max_value)
    }
}

impl Front for &SharedClient {
    front_calls!();
    fn capacity(&mut self) -> usize {
        let cell = self.item_size_cell();
        let size = match cell.get() {
            Some(&s) => s,
            None => match item_size_max(self.stats(Some("settings"))) {
                // Kept only once a server answered (see `Client`'s).
                Some(s) => *cell.get_or_init(|| s),
                None => DEFAULT_ITEM_SIZE_MAX,
            },
        };
        item_capacity(size).min(self.max_value_size())
    }
}

/// The smallest `item_size_max` the servers report (`None` if none does).
fn item_size_max(stats: Result<Vec<crate::client::ServerStats>>) -> Option<usize> {
    stats
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("item_size_max")?.parse::<usize>().ok())
        .min()
}

/// Encodes `value` for a typed store: its bytes and its flags (the codec's and `opts`').
pub(crate) fn encode<T, C: Codec<T> + ?Sized>(
    codec: &C,
    value: &T,
    opts: SetOptions,
) -> Result<(Vec<u8>, SetOptions)> {
    let mut bytes = Vec::new();
    let f = codec.encode(value, &mut bytes)?;
    Ok((bytes, opts.flags(merge_flags(f, opts.flags)?)))
}

/// Decodes what a typed read found.
pub(crate) fn decode<T, C: Codec<T> + ?Sized>(
    codec: &C,
    found: Option<ItemInfo>,
    bytes: &[u8],
) -> Result<Option<T>> {
    found.map(|i| codec.decode(bytes, i.flags)).transpose()
}

/// A chunked read (see [`super::chunked`]).
pub(crate) fn get_chunked(
    f: &mut impl Front,
    key: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ItemInfo>> {
    out.clear();
    let Some(info) = f.get_value(key, out)? else {
        return Ok(None);
    };
    if info.flags & flags::CHUNKED == 0 {
        return Ok(Some(info));
    }
    if out.is_empty() {
        return Ok(None); // a deleted value's tombstone
    }
    let index = ChunkIndex::parse(out)?;
    out.clear();
    let keys = index.chunk_keys(key);
    let mut asm = Assembler::new(index, out);
    let mut bad = None;
    let r = f.get_many(&keys, &mut |item| {
        if bad.is_none() {
            bad = asm.place(item.value).err();
        }
    });
    if let Some(e) = bad {
        asm.abandon();
        return Err(e);
    }
    if let Err(e) = r {
        asm.abandon();
        return Err(e);
    }
    // A chunk missing (evicted, expired): the value is gone, a miss.
    Ok(asm.finish()?.then_some(ItemInfo {
        flags: index.flags,
        cas: None,
    }))
}

/// A chunked store: chunks first, then the index swapped in (see [`swap_in`]).
pub(crate) fn set_chunked(
    f: &mut impl Front,
    key: &[u8],
    value: &[u8],
    opts: SetOptions,
) -> Result<()> {
    if opts.flags & flags::CHUNKED != 0 {
        return Err(Error::Codec(format!(
            "flags {:#x} use the chunked bit {:#x}",
            opts.flags,
            flags::CHUNKED
        )));
    }
    let capacity = f.capacity();
    if value.len() <= capacity {
        return swap_in(f, key, value, opts);
    }
    let index = ChunkIndex::plan(value, capacity, opts.flags)?;
    let keys = index.chunk_keys(key);
    let items: Vec<(Vec<u8>, Vec<u8>)> = (keys.iter().enumerate())
        .map(|(i, k)| (k.clone(), index.chunk(value, i as u32)))
        .collect();
    // Chunks outlive their index by a second, so that an index never finds its chunks
    // expired before itself.
    let chunk_opts = SetOptions::default().ttl(chunk_ttl(opts.ttl));
    let written = match f.set_many(&items, chunk_opts) {
        Ok(n) if n == items.len() => Ok(()),
        Ok(n) => Err(Error::Codec(format!(
            "only {n} of {} chunks were stored; the index was not written",
            items.len()
        ))),
        Err(e) => Err(e),
    }
    .and_then(|()| {
        swap_in(
            f,
            key,
            &index.encode(),
            opts.flags(opts.flags | flags::CHUNKED),
        )
    });
    if let Err(e) = written {
        // Best effort: no index names these chunks (and with TTL 0 they would not expire).
        let _ = f.delete_many(&keys);
        return Err(e);
    }
    Ok(())
}

/// Races a store of `key` may lose to other writers before it stores unconditionally.
const SWAP_ATTEMPTS: usize = 16;

/// What `key` holds now: its CAS unique and, if it is a chunked value's index, its chunks'
/// keys. `None` if it holds nothing.
fn current(f: &mut impl Front, key: &[u8]) -> Result<Option<(u64, Vec<Vec<u8>>)>> {
    let mut buf = Vec::new();
    Ok(f.gets_value(key, &mut buf)?.map(|i| {
        let chunks = match i.flags & flags::CHUNKED {
            0 => Vec::new(),
            _ => ChunkIndex::parse(&buf).map_or_else(|_| Vec::new(), |ix| ix.chunk_keys(key)),
        };
        (i.cas.unwrap_or(0), chunks)
    }))
}

/// Stores `value` under `key` in place of what it holds, by CAS (or `add` where it holds
/// nothing), so that the chunks of exactly the value it replaced are let go, however many
/// writers race: each replaced index is known to the one writer whose CAS replaced it. After
/// [`SWAP_ATTEMPTS`] lost races it stores unconditionally (the chunks of what that replaced
/// are then left to expire or be evicted).
fn swap_in(f: &mut impl Front, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
    for _ in 0..SWAP_ATTEMPTS {
        let now = current(f, key)?;
        let stored = match &now {
            Some((cas, _)) => f.cas_value(key, value, *cas, opts)?,
            None => f.add_value(key, value, opts)?,
        };
        if stored {
            if let Some((_, replaced)) = now {
                linger(f, &replaced);
            }
            return Ok(());
        }
    }
    f.set_value(key, value, opts)
}

/// The chunks of a replaced value expire shortly rather than at once: a reader that got its
/// index just before the write still finds them (the old value, not a miss). Best effort:
/// chunks left behind expire with their TTL or are evicted.
fn linger(f: &mut impl Front, chunks: &[Vec<u8>]) {
    for k in chunks {
        if f.touch_one(k, REPLACED_CHUNKS_LINGER).is_err() {
            break;
        }
    }
}

/// A deleted chunked value's index is replaced by this (flags [`flags::CHUNKED`], no bytes)
/// for a second: replacing it by CAS, rather than deleting it, tells exactly which chunks
/// to delete, whatever writer races; readers take it for a miss.
const TOMBSTONE_TTL: u32 = 1;

/// Deletes a value and, if chunked, its chunks; whether it existed.
pub(crate) fn delete_chunked(f: &mut impl Front, key: &[u8]) -> Result<bool> {
    for _ in 0..SWAP_ATTEMPTS {
        let Some((cas, chunks)) = current(f, key)? else {
            return Ok(false);
        };
        if chunks.is_empty() {
            // Not chunked (or a tombstone): a plain delete.
            return Ok(f.delete_many(&[key.to_vec()])? == 1);
        }
        let tombstone = SetOptions::default()
            .flags(flags::CHUNKED)
            .ttl(TOMBSTONE_TTL);
        if f.cas_value(key, &[], cas, tombstone)? {
            let _ = f.delete_many(&chunks);
            return Ok(true);
        }
    }
    Ok(f.delete_many(&[key.to_vec()])? == 1)
}

/// Typed and chunked calls (module [`crate::codec`]).
impl Client {
    /// Gets a value and decodes it with `codec`. `None` on a miss.
    ///
    /// ```no_run
    /// # fn main() -> mcstore::Result<()> {
    /// use mcstore::codec::{Compressed, Compression, Compressor, Text};
    /// let mut client = mcstore::Client::builder().server("127.0.0.1:11211").build()?;
    /// client.set_as(&Text, b"greeting", &"hello".to_string(), Default::default())?;
    /// assert_eq!(client.get_as(&Text, b"greeting")?.as_deref(), Some("hello"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get`](Self::get); [`Error::Codec`] if the value is not `codec`'s.
    pub fn get_as<T, C: Codec<T> + ?Sized>(&mut self, codec: &C, key: &[u8]) -> Result<Option<T>> {
        let mut buf = Vec::new();
        let found = self.get_into(key, &mut buf)?;
        decode(codec, found, &buf)
    }

    /// Encodes `value` with `codec` and stores it. `opts.flags` may use the high 16 bits
    /// (the codec owns the low 16: [`flags::CODEC_MASK`]).
    ///
    /// # Errors
    /// As [`set`](Self::set); [`Error::Codec`] if the value does not encode or the flags
    /// overlap the codec's.
    pub fn set_as<T, C: Codec<T> + ?Sized>(
        &mut self,
        codec: &C,
        key: &[u8],
        value: &T,
        opts: SetOptions,
    ) -> Result<()> {
        let (bytes, opts) = encode(codec, value, opts)?;
        self.set(key, &bytes, opts)
    }

    /// Gets a value stored by [`set_chunked`](Self::set_chunked), chunked or not, into
    /// `out`. A chunked value is read with one more request (a multi-get of its chunks);
    /// one of its chunks missing is a miss.
    ///
    /// # Errors
    /// As [`get_multi`](Self::get_multi); [`Error::Codec`] if the chunks do not match their
    /// index (see [`crate::codec::chunked`]).
    pub fn get_chunked(&mut self, key: &[u8], out: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        get_chunked(self, key, out)
    }

    /// Stores a value of any size: as it is if it fits the servers' item size
    /// (`stats settings`, asked once), else as chunks and an index written last, so that
    /// readers see the old value or the new one, never a mix. The index goes in by CAS, so
    /// the chunks of exactly the value it replaced are let go (they expire 10 s later: a
    /// reader holding the old index still reads the old value), however many writers race.
    ///
    /// # Errors
    /// As [`set_multi`](Self::set_multi); [`Error::Codec`] if a chunk was not stored (the
    /// index is then not written) or `opts.flags` has [`flags::CHUNKED`].
    pub fn set_chunked(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        set_chunked(self, key, value, opts)
    }

    /// Deletes a value and, if it is chunked, its chunks: its index is replaced by CAS with a
    /// tombstone that lives a second (which [`get_chunked`](Self::get_chunked) reads as a
    /// miss), so that a racing `set_chunked` never loses its chunks. Errors as
    /// [`delete`](Self::delete).
    pub fn delete_chunked(&mut self, key: &[u8]) -> Result<bool> {
        delete_chunked(self, key)
    }
}

/// Typed and chunked calls (module [`crate::codec`]), blocking and async.
impl SharedClient {
    /// [`Client::get_as`], on `&self`.
    ///
    /// # Errors
    /// As [`Client::get_as`].
    pub fn get_as<T, C: Codec<T> + ?Sized>(&self, codec: &C, key: &[u8]) -> Result<Option<T>> {
        let mut buf = Vec::new();
        let found = self.get_into(key, &mut buf)?;
        decode(codec, found, &buf)
    }

    /// [`Client::set_as`], on `&self`.
    ///
    /// # Errors
    /// As [`Client::set_as`].
    pub fn set_as<T, C: Codec<T> + ?Sized>(
        &self,
        codec: &C,
        key: &[u8],
        value: &T,
        opts: SetOptions,
    ) -> Result<()> {
        let (bytes, opts) = encode(codec, value, opts)?;
        self.set(key, &bytes, opts)
    }

    /// [`get_as`](Self::get_as), as a future.
    ///
    /// # Errors
    /// As [`Client::get_as`].
    pub async fn get_as_async<T, C: Codec<T> + ?Sized>(
        &self,
        codec: &C,
        key: &[u8],
    ) -> Result<Option<T>> {
        let mut buf = Vec::new();
        let found = self.get_into_async(key, &mut buf).await?;
        decode(codec, found, &buf)
    }

    /// [`set_as`](Self::set_as), as a future.
    ///
    /// # Errors
    /// As [`Client::set_as`].
    pub async fn set_as_async<T, C: Codec<T> + ?Sized>(
        &self,
        codec: &C,
        key: &[u8],
        value: &T,
        opts: SetOptions,
    ) -> Result<()> {
        let (bytes, opts) = encode(codec, value, opts)?;
        self.set_async(key, &bytes, opts).await
    }

    /// [`Client::get_chunked`], on `&self`.
    ///
    /// # Errors
    /// As [`Client::get_chunked`].
    pub fn get_chunked(&self, key: &[u8], out: &mut Vec<u8>) -> Result<Option<ItemInfo>> {
        get_chunked(&mut &*self, key, out)
    }

    /// [`Client::set_chunked`], on `&self`.
    ///
    /// # Errors
    /// As [`Client::set_chunked`].
    pub fn set_chunked(&self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<()> {
        set_chunked(&mut &*self, key, value, opts)
    }

    /// [`Client::delete_chunked`], on `&self`.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub fn delete_chunked(&self, key: &[u8]) -> Result<bool> {
        delete_chunked(&mut &*self, key)
    }
}
