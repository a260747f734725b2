//! Compression of values above a size, marked by flag bits, with bounded decompression.

#[cfg(feature = "zstd")]
use std::sync::{Arc, Mutex};

use super::{flags, Codec};
use crate::error::{Error, Result};

/// Decompressed values larger than this are refused unless [`Compressor::max_decoded`]
/// says otherwise.
const DEFAULT_MAX_DECODED: usize = 64 * 1024 * 1024;

/// Values shorter than this are stored as they are unless [`Compressor::min_size`] says
/// otherwise: below about a kilobyte the bytes saved rarely pay for the CPU.
const DEFAULT_MIN_SIZE: usize = 1024;

/// Contexts kept for reuse per [`Compressor`] (a zstd context is a few hundred KiB to set
/// up; pooling them keeps a call from allocating one).
#[cfg(feature = "zstd")]
const POOLED_CONTEXTS: usize = 8;

/// Which algorithm [`Compressor`] writes with. Whatever it writes with, it reads every
/// algorithm this build has (the flags say which one a value used).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Never compress (but still read compressed values).
    #[default]
    None,
    /// lz4 (`lz4_flex`, pure Rust): the fastest, about 2-4x on documents.
    #[cfg(feature = "lz4")]
    Lz4,
    /// zstd at `level` (1 to 19; 1 and 3 are the usual choices).
    #[cfg(feature = "zstd")]
    Zstd {
        /// The compression level.
        level: i32,
    },
    /// zstd at `level` with a dictionary trained on values like the ones stored: small
    /// documents of one kind compress several times better than without.
    #[cfg(feature = "zstd")]
    ZstdDict {
        /// The compression level.
        level: i32,
        /// The dictionary; readers need the same one.
        dict: Arc<ZstdDictionary>,
    },
    /// zlib at `level` (0 to 9): the Python clients' format, for sharing values with them.
    #[cfg(feature = "zlib")]
    Zlib {
        /// The compression level.
        level: u32,
    },
}

/// A zstd dictionary, trained on sample values or loaded from bytes a training wrote.
#[cfg(feature = "zstd")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdDictionary {
    bytes: Vec<u8>,
}

#[cfg(feature = "zstd")]
impl ZstdDictionary {
    /// A dictionary from its bytes (as [`as_bytes`](Self::as_bytes) gave them).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        ZstdDictionary { bytes }
    }

    /// Trains a dictionary of at most `max_size` bytes on `samples` (a few hundred values of
    /// the kind to be stored).
    ///
    /// # Errors
    /// [`Error::Codec`] if zstd cannot train on them (too few or too small samples).
    pub fn train<S: AsRef<[u8]>>(samples: &[S], max_size: usize) -> Result<Self> {
        let samples: Vec<&[u8]> = samples.iter().map(|s| s.as_ref()).collect();
        let bytes = zstd::dict::from_samples(&samples, max_size)
            .map_err(|e| Error::Codec(format!("zstd dictionary training failed: {e}")))?;
        Ok(ZstdDictionary { bytes })
    }

    /// The dictionary's bytes, to save and load with [`from_bytes`](Self::from_bytes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Compresses values at or above a size with one [`Compression`], and decompresses values of
/// every algorithm this build has, bounded by [`max_decoded`](Self::max_decoded).
///
/// ```
/// # #[cfg(feature = "lz4")] {
/// use mcstore::codec::{Compression, Compressor};
/// let c = Compressor::new(Compression::Lz4).min_size(16);
/// let doc = b"<entry><title>x</title></entry>".repeat(20);
/// let mut packed = Vec::new();
/// let flags = c.compress(&doc, &mut packed)?;
/// assert!(packed.len() < doc.len() && flags != 0);
/// let mut back = Vec::new();
/// assert!(c.decompress(&packed, flags, &mut back)?);
/// assert_eq!(back, doc);
/// # }
/// # Ok::<(), mcstore::Error>(())
/// ```
#[derive(Clone)]
pub struct Compressor {
    algo: Compression,
    min_size: usize,
    max_decoded: usize,
    #[cfg(feature = "zstd")]
    pool: Arc<ZstdPool>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("algo", &self.algo)
            .field("min_size", &self.min_size)
            .field("max_decoded", &self.max_decoded)
            .finish()
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Compressor::new(Compression::None)
    }
}

/// Reused zstd contexts: encoders for the configured level and dictionary, decoders without
/// and with the dictionary.
#[cfg(feature = "zstd")]
#[derive(Default)]
struct ZstdPool {
    enc: Mutex<Vec<zstd::bulk::Compressor<'static>>>,
    dec: Mutex<Vec<zstd::bulk::Decompressor<'static>>>,
    dec_dict: Mutex<Vec<zstd::bulk::Decompressor<'static>>>,
}

/// Takes a context from `pool`, or makes one.
#[cfg(feature = "zstd")]
fn take<T>(pool: &Mutex<Vec<T>>, make: impl FnOnce() -> std::io::Result<T>) -> Result<T> {
    let pooled = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
    match pooled {
        Some(c) => Ok(c),
        None => make().map_err(|e| Error::Codec(format!("zstd context: {e}"))),
    }
}

/// Gives a context back to `pool` (dropped if the pool is full).
#[cfg(feature = "zstd")]
fn give<T>(pool: &Mutex<Vec<T>>, c: T) {
    let mut p = pool.lock().unwrap_or_else(|p| p.into_inner());
    if p.len() < POOLED_CONTEXTS {
        p.push(c);
    }
}

impl Compressor {
    /// A compressor writing with `algo`, for values of at least 1 KiB, refusing to expand a
    /// value past 64 MiB.
    pub fn new(algo: Compression) -> Self {
        Compressor {
            algo,
            min_size: DEFAULT_MIN_SIZE,
            max_decoded: DEFAULT_MAX_DECODED,
            #[cfg(feature = "zstd")]
            pool: Arc::default(),
        }
    }

    setters! {
        /// Values shorter than this are stored as they are (default 1,024 bytes).
        min_size(bytes: usize) => min_size;

        /// A value that would decompress to more than this is refused with
        /// [`Error::Codec`] (default 64 MiB): a hostile value cannot expand without limit.
        max_decoded(bytes: usize) => max_decoded;
    }

    /// The largest value it decompresses ([`max_decoded`](Self::max_decoded)).
    pub fn max_decoded_len(&self) -> usize {
        self.max_decoded
    }

    /// The algorithm values are written with.
    pub fn algorithm(&self) -> &Compression {
        &self.algo
    }

    /// Appends `value` to `out`, compressed if it is at least [`min_size`](Self::min_size),
    /// at most [`max_decoded`](Self::max_decoded) (never a value this compressor could not
    /// read back) and compression makes it smaller; returns the compression flag bits (0 if
    /// stored as it is).
    ///
    /// # Errors
    /// [`Error::Codec`] if the compressor fails (it does not on valid input).
    pub fn compress(&self, value: &[u8], out: &mut Vec<u8>) -> Result<u32> {
        let start = out.len();
        if value.len() < self.min_size || value.len() > self.max_decoded {
            out.extend_from_slice(value);
            return Ok(0);
        }
        let bits = self.compress_into(value, out)?;
        if bits != 0 && out.len() - start < value.len() {
            return Ok(bits);
        }
        // Not worth it (or not compressing): the value as it is.
        out.truncate(start);
        out.extend_from_slice(value);
        Ok(0)
    }

    /// Appends the compressed `value`; returns its bits, 0 for [`Compression::None`].
    fn compress_into(&self, value: &[u8], out: &mut Vec<u8>) -> Result<u32> {
        let _ = (&value, &out);
        match &self.algo {
            Compression::None => Ok(0),
            #[cfg(feature = "lz4")]
            Compression::Lz4 => {
                let len = u32::try_from(value.len()).map_err(|_| {
                    Error::Codec("a value over 4 GiB cannot be lz4-compressed".into())
                })?;
                let start = out.len();
                out.extend_from_slice(&len.to_le_bytes());
                out.resize(
                    start + 4 + lz4_flex::block::get_maximum_output_size(value.len()),
                    0,
                );
                let n = lz4_flex::block::compress_into(value, &mut out[start + 4..])
                    .map_err(|e| Error::Codec(format!("lz4: {e}")))?;
                out.truncate(start + 4 + n);
                Ok(flags::LZ4)
            }
            #[cfg(feature = "zstd")]
            Compression::Zstd { level } => {
                self.zstd_encode(value, out, || zstd::bulk::Compressor::new(*level))?;
                Ok(flags::ZSTD)
            }
            #[cfg(feature = "zstd")]
            Compression::ZstdDict { level, dict } => {
                self.zstd_encode(value, out, || {
                    zstd::bulk::Compressor::with_dictionary(*level, &dict.bytes)
                })?;
                Ok(flags::ZSTD_DICT)
            }
            #[cfg(feature = "zlib")]
            Compression::Zlib { level } => {
                use std::io::Write;
                let mut e = flate2::write::ZlibEncoder::new(out, flate2::Compression::new(*level));
                e.write_all(value)
                    .and_then(|()| e.finish().map(drop))
                    .map_err(|e| Error::Codec(format!("zlib: {e}")))?;
                Ok(flags::ZLIB)
            }
        }
    }

    #[cfg(feature = "zstd")]
    fn zstd_encode(
        &self,
        value: &[u8],
        out: &mut Vec<u8>,
        make: impl FnOnce() -> std::io::Result<zstd::bulk::Compressor<'static>>,
    ) -> Result<()> {
        let mut c = take(&self.pool.enc, make)?;
        let start = out.len();
        out.resize(start + zstd::zstd_safe::compress_bound(value.len()), 0);
        let r = c.compress_to_buffer(value, &mut out[start..]);
        give(&self.pool.enc, c);
        let n = r.map_err(|e| Error::Codec(format!("zstd: {e}")))?;
        out.truncate(start + n);
        Ok(())
    }

    /// If `flags` say `bytes` are compressed, appends the decompressed value to `out` and
    /// returns `true`; otherwise leaves `out` alone and returns `false`.
    ///
    /// # Errors
    /// [`Error::Codec`] if the bytes do not decompress, would expand past
    /// [`max_decoded`](Self::max_decoded), or use an algorithm (or a dictionary) this build or
    /// this compressor does not have. `out` then holds what it held before.
    pub fn decompress(&self, bytes: &[u8], f: u32, out: &mut Vec<u8>) -> Result<bool> {
        let mine = f & flags::COMPRESSION_MASK;
        let zlib = f & flags::ZLIB != 0;
        if mine == 0 && !zlib {
            return Ok(false);
        }
        let start = out.len();
        let r = match (mine, zlib) {
            (0, true) => self.zlib_decode(bytes, out),
            (_, true) => Err(Error::Codec(format!(
                "flags {f:#x} name two compressions (zlib and {mine:#x})"
            ))),
            (flags::LZ4, _) => self.lz4_decode(bytes, out),
            (flags::ZSTD, _) => self.zstd_decode(bytes, out, false),
            (flags::ZSTD_DICT, _) => self.zstd_decode(bytes, out, true),
            _ => Err(Error::Codec(format!(
                "flags {f:#x} name an unknown compression"
            ))),
        };
        if r.is_err() {
            out.truncate(start);
        }
        r.map(|()| true)
    }

    #[cfg(any(feature = "lz4", feature = "zstd", feature = "zlib"))]
    fn too_large(&self, len: u64) -> Error {
        Error::Codec(format!(
            "a compressed value claims {len} bytes, over the limit of {} (max_decoded)",
            self.max_decoded
        ))
    }

    #[cfg(not(feature = "lz4"))]
    fn lz4_decode(&self, _: &[u8], _: &mut Vec<u8>) -> Result<()> {
        Err(missing("lz4"))
    }

    #[cfg(feature = "lz4")]
    fn lz4_decode(&self, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (len, block) = match bytes.split_first_chunk::<4>() {
            Some((len, block)) => (u32::from_le_bytes(*len) as usize, block),
            None => return Err(Error::Codec("lz4 value shorter than its length".into())),
        };
        if len > self.max_decoded {
            return Err(self.too_large(len as u64));
        }
        if out.is_empty() {
            // Into a new buffer, which the decoder fills without zeroing it first.
            return match lz4_flex::block::decompress(block, len) {
                Ok(v) if v.len() == len => {
                    *out = v;
                    Ok(())
                }
                Ok(v) => Err(Error::Codec(format!(
                    "lz4 value decompressed to {} bytes, not the {len} it claims",
                    v.len()
                ))),
                Err(e) => Err(Error::Codec(format!("lz4: {e}"))),
            };
        }
        let start = out.len();
        out.resize(start + len, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(Error::Codec(format!(
                "lz4 value decompressed to {n} bytes, not the {len} it claims"
            ))),
            Err(e) => Err(Error::Codec(format!("lz4: {e}"))),
        }
    }

    #[cfg(not(feature = "zstd"))]
    fn zstd_decode(&self, _: &[u8], _: &mut Vec<u8>, _: bool) -> Result<()> {
        Err(missing("zstd"))
    }

    #[cfg(feature = "zstd")]
    fn zstd_decode(&self, bytes: &[u8], out: &mut Vec<u8>, with_dict: bool) -> Result<()> {
        let dict = match (&self.algo, with_dict) {
            (Compression::ZstdDict { dict, .. }, true) => Some(dict.clone()),
            (_, true) => {
                return Err(Error::Codec(
                    "a zstd value compressed with a dictionary, and this compressor has none"
                        .into(),
                ))
            }
            _ => None,
        };
        let len = match zstd::zstd_safe::get_frame_content_size(bytes) {
            Ok(Some(len)) => len,
            // Every frame written here states its size; a frame without one is not ours.
            Ok(None) => return Err(Error::Codec("zstd frame without its content size".into())),
            Err(_) => return Err(Error::Codec("not a zstd frame".into())),
        };
        if len > self.max_decoded as u64 {
            return Err(self.too_large(len));
        }
        let len = len as usize;
        let pool = if dict.is_some() {
            &self.pool.dec_dict
        } else {
            &self.pool.dec
        };
        let mut d = take(pool, || match &dict {
            Some(dict) => zstd::bulk::Decompressor::with_dictionary(&dict.bytes),
            None => zstd::bulk::Decompressor::new(),
        })?;
        let start = out.len();
        // Into exactly the stated size: a frame (or frames) that would write more fails.
        let r = if start == 0 {
            // Into the buffer's spare capacity, without zeroing it first.
            out.reserve_exact(len);
            d.decompress_to_buffer(bytes, out)
        } else {
            out.resize(start + len, 0);
            d.decompress_to_buffer(bytes, &mut out[start..])
        };
        give(pool, d);
        match r {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(Error::Codec(format!(
                "zstd value decompressed to {n} bytes, not the {len} it claims"
            ))),
            Err(e) => Err(Error::Codec(format!("zstd: {e}"))),
        }
    }

    #[cfg(not(feature = "zlib"))]
    fn zlib_decode(&self, _: &[u8], _: &mut Vec<u8>) -> Result<()> {
        Err(missing("zlib"))
    }

    #[cfg(feature = "zlib")]
    fn zlib_decode(&self, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
        use std::io::Read;
        let start = out.len();
        let limit = self.max_decoded as u64;
        let mut d = flate2::read::ZlibDecoder::new(bytes);
        // zlib does not state its size: read one byte past the limit to know it was passed.
        let n = (&mut d)
            .take(limit + 1)
            .read_to_end(out)
            .map_err(|e| Error::Codec(format!("zlib: {e}")))?;
        if n as u64 > limit {
            out.truncate(start);
            return Err(self.too_large(n as u64));
        }
        if d.total_in() != bytes.len() as u64 {
            return Err(Error::Codec("zlib value has bytes after its stream".into()));
        }
        Ok(())
    }
}

/// The error for a value compressed with an algorithm this build does not have.
#[allow(dead_code)]
fn missing(feature: &str) -> Error {
    Error::Codec(format!(
        "the value is compressed with {feature}; build mcstore with feature `{feature}` to read it"
    ))
}

/// A codec whose bytes are compressed by a [`Compressor`] above its size.
///
/// ```
/// # #[cfg(feature = "zlib")] {
/// use mcstore::codec::{Codec, Compressed, Compression, Compressor, Raw};
/// // What pymemcache's CompressedSerde writes for bytes: zlib, flag 8.
/// let codec = Compressed::new(Raw, Compressor::new(Compression::Zlib { level: 6 }).min_size(0));
/// let mut out = Vec::new();
/// let flags = codec.encode(&b"abc".repeat(100), &mut out)?;
/// assert_eq!(flags, 8);
/// assert_eq!(codec.decode(&out, flags)?, b"abc".repeat(100));
/// # }
/// # Ok::<(), mcstore::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Compressed<C> {
    inner: C,
    compressor: Compressor,
}

impl<C> Compressed<C> {
    /// `inner`'s bytes, compressed by `compressor`.
    pub fn new(inner: C, compressor: Compressor) -> Self {
        Compressed { inner, compressor }
    }

    /// The compressor.
    pub fn compressor(&self) -> &Compressor {
        &self.compressor
    }
}

impl<T, C: Codec<T>> Codec<T> for Compressed<C> {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<u32> {
        let mut raw = Vec::new();
        let f = self.inner.encode(value, &mut raw)?;
        Ok(f | self.compressor.compress(&raw, out)?)
    }

    fn decode(&self, bytes: &[u8], f: u32) -> Result<T> {
        let mut raw = Vec::new();
        if self.compressor.decompress(bytes, f, &mut raw)? {
            self.inner.decode(&raw, f & !flags::ANY_COMPRESSION)
        } else {
            self.inner.decode(bytes, f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Raw, Text};

    fn algos() -> Vec<Compression> {
        #[allow(unused_mut)]
        let mut v = vec![Compression::None];
        #[cfg(feature = "lz4")]
        v.push(Compression::Lz4);
        #[cfg(feature = "zstd")]
        {
            v.push(Compression::Zstd { level: 1 });
            v.push(Compression::Zstd { level: 3 });
            let samples: Vec<Vec<u8>> = (0..200)
                .map(|i| {
                    format!("{{\"id\":{i},\"name\":\"user{i}\",\"tags\":[\"a\",\"b\"]}}")
                        .into_bytes()
                })
                .collect();
            let dict = ZstdDictionary::train(&samples, 4096).unwrap();
            v.push(Compression::ZstdDict {
                level: 3,
                dict: Arc::new(dict),
            });
        }
        #[cfg(feature = "zlib")]
        v.push(Compression::Zlib { level: 6 });
        v
    }

    #[test]
    fn every_algorithm_round_trips_and_small_values_stay_plain() {
        let doc: Vec<u8> = (0..5000)
            .flat_map(|i| format!("<e id=\"{i}\"/>").into_bytes())
            .collect();
        for algo in algos() {
            let c = Compressor::new(algo.clone());
            let mut packed = Vec::new();
            let f = c.compress(&doc, &mut packed).unwrap();
            if matches!(algo, Compression::None) {
                assert_eq!((f, &packed), (0, &doc));
                continue;
            }
            assert_ne!(f, 0, "{algo:?}");
            assert!(packed.len() * 3 < doc.len(), "{algo:?}: {}", packed.len());
            let mut back = b"keep".to_vec();
            assert!(c.decompress(&packed, f, &mut back).unwrap());
            assert_eq!(&back[..4], b"keep");
            assert_eq!(&back[4..], &doc[..]);
            // Small values are stored as they are.
            packed.clear();
            assert_eq!(c.compress(b"short", &mut packed).unwrap(), 0);
            assert_eq!(packed, b"short");
            // Through a codec.
            let codec = Compressed::new(Text, c.clone());
            let s = String::from_utf8(doc.clone()).unwrap();
            packed.clear();
            let f = codec.encode(&s, &mut packed).unwrap();
            assert_eq!(f & flags::TEXT, flags::TEXT);
            assert_eq!(codec.decode(&packed, f).unwrap(), s);
            // The plain codec refuses it rather than hand back compressed bytes.
            assert!(Text.decode(&packed, f).is_err());
        }
    }

    #[test]
    fn corrupt_truncated_and_oversized_values_are_clear_errors() {
        let doc = b"abcdefgh".repeat(10_000);
        for algo in algos() {
            if matches!(algo, Compression::None) {
                continue;
            }
            let c = Compressor::new(algo.clone()).max_decoded(doc.len());
            let mut packed = Vec::new();
            let f = c.compress(&doc, &mut packed).unwrap();
            let mut out = b"x".to_vec();
            for cut in [0, 1, 3, packed.len() / 2, packed.len() - 1] {
                let r = c.decompress(&packed[..cut], f, &mut out);
                assert!(r.is_err(), "{algo:?} cut at {cut}");
                assert_eq!(out, b"x", "nothing partial");
            }
            let mut bad = packed.clone();
            for b in bad.iter_mut().skip(6).step_by(7) {
                *b ^= 0x5a;
            }
            if let Ok(true) = c.decompress(&bad, f, &mut out) {
                // A corruption that still decodes must not decode to the original silently
                // as something longer than the limit; lz4 has no checksum, so only the length
                // is checked.
                assert!(out.len() <= doc.len() + 1);
            }
            out.truncate(1);
            let tight = Compressor::new(algo.clone()).max_decoded(doc.len() - 1);
            let e = tight.decompress(&packed, f, &mut out).unwrap_err();
            assert!(
                e.to_string().contains("limit") || e.to_string().contains("zstd"),
                "{e}"
            );
            assert_eq!(out, b"x");
        }
        let c = Compressor::default();
        let mut out = Vec::new();
        assert!(c
            .decompress(b"x", flags::ZLIB | flags::LZ4, &mut out)
            .is_err());
        assert!(c.decompress(b"x", 0x7000, &mut out).is_err());
        assert!(!c.decompress(b"x", flags::TEXT, &mut out).unwrap());
        let _ = Raw;
    }
}
