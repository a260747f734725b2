//! Values over the item limit, as chunks: pure planning and assembly (no I/O).
//!
//! A chunked value is stored as `count` chunks under keys of their own, then an **index**
//! under the value's key, written last:
//!
//! - the index (flags [`flags::CHUNKED`](super::flags::CHUNKED)) holds a random 64-bit
//!   generation, the value's length and CRC-32, the chunk size and count, and the value's
//!   own flags ([`ChunkIndex`], 40 bytes);
//! - chunk `i`'s key is `mcstore-chunk:<hash of the key>:<generation>:<i>`, so the chunks of
//!   two writes of one key never share a key; each chunk starts with the generation, its
//!   number and the count, checked when read.
//!
//! A reader gets the index, then every chunk in one multi-get. Because the index is written
//! after its chunks and names their generation, a reader sees the old value or the new one,
//! never a mix: a writer that dies between chunks and index leaves the old index in place
//! (its orphan chunks expire with their TTL, or with none, are evicted in time: nothing
//! reads them), and a chunk of another generation is never fetched. A chunk missing
//! (evicted, expired, its server down) makes the whole value a miss; a chunk that does not
//! match its index, or a value whose CRC does not match, is [`Error::Codec`].
//!
//! The index goes in by CAS (`add` on an absent key), so each replaced index is known to
//! exactly one writer, which lets its chunks go: they expire 10 s later
//! ([`REPLACED_CHUNKS_LINGER`]), so that a reader holding the old index still reads the old
//! value rather than a miss. A chunked delete replaces the index by CAS with a one-second
//! tombstone (read as a miss) and deletes the chunks it named.

use std::hash::{BuildHasher, Hasher};

use crate::error::{Error, Result};

/// The index's length.
pub const INDEX_LEN: usize = 40;
const INDEX_MAGIC: [u8; 8] = *b"MCCHUNK1";
/// A chunk's header: generation (8), number (4), count (4), little-endian.
pub const CHUNK_HEADER: usize = 16;
/// Room kept under the server's item size for memcached's item header and the chunk's key.
pub const ITEM_OVERHEAD: usize = 1024;
/// An index claiming more than this is refused (the largest value a chunked read assembles).
pub const MAX_CHUNKED_LEN: u64 = 1 << 30;
/// An index claiming more chunks than this is refused: what a reader sets up per chunk (a
/// key, a slot) stays a few MiB, whatever an index claims.
pub const MAX_CHUNKS: u32 = 65_536;
/// An assembler reserves room for the whole value once its first chunk matched, up to this.
const PREALLOCATE_AT_MOST: u64 = 64 << 20;

/// Chunks outlive the index that names them by this much: a reader that got an index just
/// before a new value replaced it still finds the chunks it names (they are set to expire
/// then, not deleted).
pub const REPLACED_CHUNKS_LINGER: u32 = 10;

/// The TTL of a value's chunks for the value's `ttl`: a second longer (a relative TTL only:
/// above 30 days memcached reads it as a Unix time, which is left as it is).
pub fn chunk_ttl(ttl: u32) -> u32 {
    match ttl {
        t @ 1..=2_591_999 => t + 1,
        t => t,
    }
}

/// The index of a chunked value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    /// Random per write: names this write's chunks.
    pub generation: u64,
    /// The value's length.
    pub total: u64,
    /// Bytes of value per chunk (the last may hold fewer).
    pub chunk_size: u32,
    /// How many chunks.
    pub count: u32,
    /// CRC-32 of the whole value.
    pub crc: u32,
    /// The value's own flags.
    pub flags: u32,
}

/// A generation no other write is likely to pick: std's per-process random hash keys over the
/// time and a counter.
fn random_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    h.write_u64(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// The largest item value a server with item size `item_size_max` takes for a chunk, and so
/// the largest value stored without chunks.
pub fn item_capacity(item_size_max: usize) -> usize {
    item_size_max
        .saturating_sub(ITEM_OVERHEAD)
        .max(CHUNK_HEADER + 1)
}

impl ChunkIndex {
    /// Plans chunks of `value` for a server whose items hold at most `capacity` bytes of
    /// value ([`item_capacity`]), with a new random generation.
    ///
    /// # Errors
    /// [`Error::Codec`] if `value` is over [`MAX_CHUNKED_LEN`], or would need more than
    /// [`MAX_CHUNKS`] chunks of that capacity (readers refuse such an index).
    pub fn plan(value: &[u8], capacity: usize, flags: u32) -> Result<Self> {
        let chunk_size = capacity.saturating_sub(CHUNK_HEADER).min(u32::MAX as usize);
        let count = match chunk_size {
            0 => usize::MAX,
            size => value.len().div_ceil(size),
        };
        if value.len() as u64 > MAX_CHUNKED_LEN || count > MAX_CHUNKS as usize {
            return Err(Error::Codec(format!(
                "a value of {} bytes does not fit {MAX_CHUNKS} chunks of {chunk_size} bytes \
                 (at most {MAX_CHUNKED_LEN} bytes; the item size or max_value_size is too small)",
                value.len()
            )));
        }
        let (chunk_size, count) = (chunk_size as u32, count as u32);
        Ok(ChunkIndex {
            generation: random_generation(),
            total: value.len() as u64,
            chunk_size,
            count,
            crc: crc32fast::hash(value),
            flags,
        })
    }

    /// The index's bytes.
    pub fn encode(&self) -> [u8; INDEX_LEN] {
        let mut b = [0u8; INDEX_LEN];
        b[..8].copy_from_slice(&INDEX_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.total.to_le_bytes());
        b[24..28].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        b[36..40].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Reads an index, checking that its numbers agree with each other.
    ///
    /// # Errors
    /// [`Error::Codec`] for anything but an index [`encode`](Self::encode) wrote for a value
    /// of at most [`MAX_CHUNKED_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Codec(format!("chunked value's index: {why}"));
        if b.len() != INDEX_LEN || b[..8] != INDEX_MAGIC {
            return Err(bad("not an index"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let ix = ChunkIndex {
            generation: u64_at(8),
            total: u64_at(16),
            chunk_size: u32_at(24),
            count: u32_at(28),
            crc: u32_at(32),
            flags: u32_at(36),
        };
        if ix.total > MAX_CHUNKED_LEN {
            return Err(bad("claims more than 1 GiB"));
        }
        if ix.count > MAX_CHUNKS {
            return Err(bad("claims more than 65,536 chunks"));
        }
        if ix.chunk_size == 0 || u64::from(ix.count) != ix.total.div_ceil(u64::from(ix.chunk_size))
        {
            return Err(bad("its chunk count does not match its length"));
        }
        Ok(ix)
    }

    /// Appends chunk `i`'s key for the value under `key` to `out`.
    pub fn chunk_key(&self, key: &[u8], i: u32, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(
            out,
            "mcstore-chunk:{:016x}:{:016x}:{i}",
            crate::shared::key_hash(key),
            self.generation
        );
    }

    /// Every chunk's key.
    pub fn chunk_keys(&self, key: &[u8]) -> Vec<Vec<u8>> {
        (0..self.count)
            .map(|i| {
                let mut k = Vec::with_capacity(64);
                self.chunk_key(key, i, &mut k);
                k
            })
            .collect()
    }

    /// Chunk `i` of `value`: its header and its part of the value.
    pub fn chunk(&self, value: &[u8], i: u32) -> Vec<u8> {
        let size = self.chunk_size as usize;
        let part = &value[i as usize * size..((i as usize + 1) * size).min(value.len())];
        let mut c = Vec::with_capacity(CHUNK_HEADER + part.len());
        c.extend_from_slice(&self.generation.to_le_bytes());
        c.extend_from_slice(&i.to_le_bytes());
        c.extend_from_slice(&self.count.to_le_bytes());
        c.extend_from_slice(part);
        c
    }

    /// Chunk `i`'s length of value.
    fn part_len(&self, i: u32) -> usize {
        let start = u64::from(i) * u64::from(self.chunk_size);
        (self.total - start).min(u64::from(self.chunk_size)) as usize
    }
}

/// Puts a chunked value back together from its chunks, in any order, into a caller's buffer.
///
/// Chunks that arrive in order are appended; one that arrives early waits in a slot of its
/// own. Memory grows with the chunks that arrive, never with what an index claims.
#[derive(Debug)]
pub struct Assembler<'o> {
    index: ChunkIndex,
    out: &'o mut Vec<u8>,
    start: usize,
    /// Chunks appended so far (`0..next`).
    next: u32,
    /// Chunks that came before their turn: slot `k` holds chunk `next + k`.
    early: std::collections::VecDeque<Option<Vec<u8>>>,
}

impl<'o> Assembler<'o> {
    /// Assembles `index`'s value at the end of `out`.
    pub fn new(index: ChunkIndex, out: &'o mut Vec<u8>) -> Self {
        let start = out.len();
        Assembler {
            index,
            out,
            start,
            next: 0,
            early: std::collections::VecDeque::new(),
        }
    }

    /// Places one chunk.
    ///
    /// # Errors
    /// [`Error::Codec`] if it is not one of this index's chunks (another generation, a
    /// number out of range, a wrong length, a duplicate).
    pub fn place(&mut self, chunk: &[u8]) -> Result<()> {
        let bad = |why: String| Error::Codec(format!("chunked value: {why}"));
        let Some((head, part)) = chunk.split_first_chunk::<CHUNK_HEADER>() else {
            return Err(bad("a chunk shorter than its header".into()));
        };
        let generation = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let i = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        let ix = &self.index;
        if generation != ix.generation || count != ix.count || i >= ix.count {
            return Err(bad(format!(
                "chunk {i} of {count} (generation {generation:016x}) does not belong to the \
                 index (generation {:016x}, {} chunks)",
                ix.generation, ix.count
            )));
        }
        if part.len() != ix.part_len(i) {
            return Err(bad(format!(
                "chunk {i} holds {} bytes, not {}",
                part.len(),
                ix.part_len(i)
            )));
        }
        let slot = (i - self.next.min(i)) as usize;
        let duplicate = i < self.next || self.early.get(slot).is_some_and(Option::is_some);
        if duplicate {
            return Err(bad(format!("chunk {i} arrived twice")));
        }
        if i > self.next {
            // Slots for the chunks between: one per chunk that actually arrived early at most
            // (a slot is 24 bytes), bounded by MAX_CHUNKS.
            if self.early.len() <= slot {
                self.early.resize(slot + 1, None);
            }
            self.early[slot] = Some(part.to_vec());
            return Ok(());
        }
        if self.next == 0 {
            // The first chunk matched: room for the value at once (growing by doubling would
            // copy it twice more), up to a bound, so that a claim alone never allocates.
            let total = self.index.total.min(PREALLOCATE_AT_MOST) as usize;
            self.out
                .reserve(total.saturating_sub(self.out.len() - self.start));
        }
        self.out.extend_from_slice(part);
        self.next += 1;
        // Chunks that were waiting for this one.
        self.early.pop_front();
        while let Some(Some(_)) = self.early.front() {
            let waiting = self.early.pop_front().flatten().expect("checked");
            self.out.extend_from_slice(&waiting);
            self.next += 1;
        }
        Ok(())
    }

    /// `Ok(true)` once every chunk is placed and the value's CRC matches; `Ok(false)` (and
    /// `out` as it was) if chunks are missing.
    ///
    /// # Errors
    /// [`Error::Codec`] if the CRC does not match (`out` as it was).
    pub fn finish(self) -> Result<bool> {
        if self.next != self.index.count {
            self.out.truncate(self.start);
            return Ok(false);
        }
        if crc32fast::hash(&self.out[self.start..]) != self.index.crc {
            self.out.truncate(self.start);
            return Err(Error::Codec(
                "chunked value: its chunks do not match the index's CRC".into(),
            ));
        }
        Ok(true)
    }

    /// Gives up: `out` as it was.
    pub fn abandon(self) {
        self.out.truncate(self.start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn chunks_reassemble_in_any_order_and_the_index_round_trips() {
        let v = value(10_000);
        let ix = ChunkIndex::plan(&v, 1016 + CHUNK_HEADER, 0x0001_0000).unwrap();
        assert_eq!(ix.count, 10);
        assert_eq!(ChunkIndex::parse(&ix.encode()).unwrap(), ix);
        let mut out = b"pre".to_vec();
        let mut a = Assembler::new(ix, &mut out);
        for i in (0..ix.count).rev() {
            a.place(&ix.chunk(&v, i)).unwrap();
        }
        assert!(a.finish().unwrap());
        assert_eq!(&out[3..], &v[..]);
        let keys = ix.chunk_keys(b"k");
        assert_eq!(keys.len(), 10);
        assert!(keys.iter().all(|k| k.len() < 64 && !k.contains(&b' ')));
        assert_ne!(
            keys,
            ChunkIndex::plan(&v, 1032, 0).unwrap().chunk_keys(b"k")
        );
    }

    #[test]
    fn missing_foreign_short_and_corrupt_chunks_never_yield_a_value() {
        let v = value(5000);
        let ix = ChunkIndex::plan(&v, 1000, 0).unwrap();
        let other = ChunkIndex::plan(&v, 1000, 0).unwrap();
        // Missing.
        let mut out = Vec::new();
        let mut a = Assembler::new(ix, &mut out);
        a.place(&ix.chunk(&v, 0)).unwrap();
        assert!(!a.finish().unwrap());
        assert!(out.is_empty());
        // Another generation's chunk.
        let mut a = Assembler::new(ix, &mut out);
        assert!(a.place(&other.chunk(&v, 1)).is_err());
        // Truncated, duplicated.
        let c = ix.chunk(&v, 2);
        assert!(a.place(&c[..c.len() - 1]).is_err());
        assert!(a.place(&c[..10]).is_err());
        a.place(&c).unwrap();
        assert!(a.place(&c).is_err());
        a.abandon();
        assert!(out.is_empty());
        // Corrupt payload: the CRC catches it.
        let mut a = Assembler::new(ix, &mut out);
        for i in 0..ix.count {
            let mut c = ix.chunk(&v, i);
            if i == 3 {
                c[CHUNK_HEADER + 5] ^= 1;
            }
            a.place(&c).unwrap();
        }
        assert!(a.finish().is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn hostile_indexes_are_refused() {
        let ix = ChunkIndex::plan(&value(3000), 1000, 0).unwrap();
        let good = ix.encode();
        assert!(ChunkIndex::parse(&good[..39]).is_err());
        let mut b = good;
        b[0] = b'X';
        assert!(ChunkIndex::parse(&b).is_err());
        let mut huge = ix;
        huge.total = 1 << 40;
        huge.count = huge.total.div_ceil(u64::from(huge.chunk_size)) as u32;
        assert!(ChunkIndex::parse(&huge.encode()).is_err());
        let mut zero = ix;
        zero.chunk_size = 0;
        assert!(ChunkIndex::parse(&zero.encode()).is_err());
        let mut wrong = ix;
        wrong.count += 1;
        assert!(ChunkIndex::parse(&wrong.encode()).is_err());
        // A claimed length allocates nothing by itself.
        let mut big = ix;
        big.total = MAX_CHUNKED_LEN;
        big.chunk_size = 1;
        big.count = u32::MAX;
        assert!(ChunkIndex::parse(&big.encode()).is_err());
    }
}
