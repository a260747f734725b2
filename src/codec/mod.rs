//! Values as services store them: typed values, compression, and values over the item limit.
//!
//! A layer above the byte calls, which stay exactly as they are (no codec runs on
//! [`Client::get_into`](crate::Client::get_into) or [`Client::set`](crate::Client::set)):
//!
//! - [`Codec`]: a value to bytes and flags and back. [`Raw`] (bytes), [`Text`] (UTF-8) and,
//!   with feature `serde`, [`Postcard`] (compact binary) and [`Json`].
//! - [`Compressed`]: any codec, compressed above a size by a [`Compressor`] (features `lz4`,
//!   `zstd`, `zlib`), marked by flag bits.
//! - Chunked values (`set_chunked`, `get_chunked` on [`Client`](crate::Client) and
//!   [`SharedClient`](crate::SharedClient)): a value over the server's item size is stored as
//!   chunks under keys of their own and an index written last; see [`chunked`].
//!
//! Typed calls: [`Client::get_as`](crate::Client::get_as) and
//! [`Client::set_as`](crate::Client::set_as), and the same on
//! [`SharedClient`](crate::SharedClient), blocking and async.
//!
//! # Flag layout
//!
//! The codecs own the low 16 bits of an item's flags; the high 16 bits are the
//! application's and pass through (a typed call refuses application flags that touch the low
//! bits, so they cannot be mistaken for a format).
//!
//! | bits | mask | meaning | convention |
//! |---|---|---|---|
//! | 0 | `0x1` | pickled (never written here; refused when read) | python-memcached, pylibmc, pymemcache |
//! | 1, 2 | `0x2`, `0x4` | a Python `int` / `long` as decimal text; read by [`Text`] and [`Raw`] | same |
//! | 3 | `0x8` | [`flags::ZLIB`]: compressed with zlib | same: they all use bit 3 for zlib |
//! | 4 | `0x10` | [`flags::TEXT`]: UTF-8 text | pymemcache (`FLAG_TEXT`) |
//! | 8-11 | `0xf00` | format: `0x100` [`flags::POSTCARD`], `0x200` [`flags::JSON`] | mcstore |
//! | 12-14 | `0x7000` | compression: `0x1000` [`flags::LZ4`], `0x2000` [`flags::ZSTD`], `0x3000` [`flags::ZSTD_DICT`] | mcstore |
//! | 15 | `0x8000` | [`flags::CHUNKED`]: the item is the index of a chunked value | mcstore |
//! | 16-31 | `0xffff_0000` | the application's | |
//!
//! So a value that [`Compressed`]`<`[`Raw`]`>` or [`Compressed`]`<`[`Text`]`>` writes with zlib
//! (flags `0x8`, or `0x18` for text) is what pymemcache's `CompressedSerde` (and
//! python-memcached, pylibmc) write for `bytes` (and `str`), and the other way round:
//! `proto-tests/interop_python.rs` writes with one and reads with the other, both ways.
//! php-memcached lays its flags out differently (its type in bits 0-3, compression from bit
//! 4) and is not read here.
//!
//! # Bounded and strict
//!
//! A value whose flags say compressed but whose bytes do not decompress, a value that would
//! expand past [`Compressor::max_decoded`] (64 MiB by default), a format this build does not
//! have, or bytes that do not decode to the type asked for: each is
//! [`Error::Codec`], never a panic or a partial value. A compressed value
//! read through a codec that does not decompress is refused too, never handed back as if it
//! were the value. The decoders are fuzzed (`fuzz/fuzz_targets/codec_decode.rs`).

pub mod chunked;
mod compress;
#[cfg(feature = "serde")]
mod serde_codecs;
mod typed;

#[cfg(feature = "zstd")]
pub use compress::ZstdDictionary;
pub use compress::{Compressed, Compression, Compressor};
#[cfg(feature = "serde")]
pub use serde_codecs::{Json, Postcard};
pub(crate) use typed::Front;

use crate::error::{Error, Result};

/// The flag bits of the layout above.
pub mod flags {
    /// Pickled by a Python client: never written here, refused when read.
    pub const PICKLE: u32 = 0x1;
    /// A Python `int`, as decimal text.
    pub const INT: u32 = 0x2;
    /// A Python 2 `long`, as decimal text.
    pub const LONG: u32 = 0x4;
    /// Compressed with zlib (the Python clients' convention).
    pub const ZLIB: u32 = 0x8;
    /// UTF-8 text (pymemcache's `FLAG_TEXT`).
    pub const TEXT: u32 = 0x10;
    /// The format bits.
    pub const FORMAT_MASK: u32 = 0xf00;
    /// Serialized with postcard.
    pub const POSTCARD: u32 = 0x100;
    /// Serialized as JSON.
    pub const JSON: u32 = 0x200;
    /// mcstore's compression bits.
    pub const COMPRESSION_MASK: u32 = 0x7000;
    /// Compressed with lz4 (a block, after its 4-byte little-endian length).
    pub const LZ4: u32 = 0x1000;
    /// Compressed with zstd (one frame).
    pub const ZSTD: u32 = 0x2000;
    /// Compressed with zstd and a dictionary (one frame naming the dictionary's id).
    pub const ZSTD_DICT: u32 = 0x3000;
    /// The item is the index of a chunked value.
    pub const CHUNKED: u32 = 0x8000;
    /// Every bit the codecs own; the rest are the application's.
    pub const CODEC_MASK: u32 = 0xffff;
    /// Every compression bit, mcstore's and zlib's.
    pub const ANY_COMPRESSION: u32 = COMPRESSION_MASK | ZLIB;
}

/// A value type's encoding: to bytes and flags, and back.
///
/// `encode` appends to `out` and returns the codec's flag bits (in
/// [`flags::CODEC_MASK`]); `decode` reads what `encode` wrote, and refuses, with
/// [`Error::Codec`], flags it does not know or bytes that do not decode.
///
/// ```
/// use mcstore::codec::{Codec, Text};
/// let mut out = Vec::new();
/// let flags = Text.encode(&"héllo".to_string(), &mut out)?;
/// assert_eq!(Text.decode(&out, flags)?, "héllo");
/// assert!(Text.decode(&[0xff, 0xfe], flags).is_err());
/// # Ok::<(), mcstore::Error>(())
/// ```
pub trait Codec<T> {
    /// Appends `value`'s bytes to `out`; returns its flag bits.
    ///
    /// # Errors
    /// [`Error::Codec`] if the value cannot be encoded.
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<u32>;

    /// Reads a value from `bytes` stored with `flags` (all 32 bits; a codec looks at its own).
    ///
    /// # Errors
    /// [`Error::Codec`] if the flags or the bytes are not this codec's.
    fn decode(&self, bytes: &[u8], flags: u32) -> Result<T>;
}

impl<T, C: Codec<T> + ?Sized> Codec<T> for &C {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<u32> {
        (**self).encode(value, out)
    }
    fn decode(&self, bytes: &[u8], flags: u32) -> Result<T> {
        (**self).decode(bytes, flags)
    }
}

/// Bytes as they are (flags 0). Reads any value that is not compressed, pickled or in a
/// serialized format (plain bytes, text, Python's decimal ints).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn encode(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<u32> {
        out.extend_from_slice(value);
        Ok(0)
    }
    fn decode(&self, bytes: &[u8], f: u32) -> Result<Vec<u8>> {
        expect_plain(f, "bytes")?;
        Ok(bytes.to_vec())
    }
}

/// UTF-8 text, flagged as pymemcache flags a `str` ([`flags::TEXT`]). Reads text written with
/// flags 0 too (memcached's own tools, libmemcached), as long as it is valid UTF-8.
#[derive(Debug, Clone, Copy, Default)]
pub struct Text;

impl Codec<String> for Text {
    fn encode(&self, value: &String, out: &mut Vec<u8>) -> Result<u32> {
        out.extend_from_slice(value.as_bytes());
        Ok(flags::TEXT)
    }
    fn decode(&self, bytes: &[u8], f: u32) -> Result<String> {
        expect_plain(f, "text")?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::Codec(format!("text is not valid UTF-8: {}", e.utf8_error())))
    }
}

/// Refuses flags that say the bytes are something other than themselves: compressed
/// (read it through [`Compressed`]), pickled, chunked or in a serialized format.
fn expect_plain(f: u32, what: &str) -> Result<()> {
    let foreign =
        f & (flags::ANY_COMPRESSION | flags::PICKLE | flags::FORMAT_MASK | flags::CHUNKED);
    if foreign == 0 {
        return Ok(());
    }
    Err(Error::Codec(format!(
        "flags {f:#x} say the value is {}, not {what}",
        describe(foreign)
    )))
}

/// What flag bits say a value is, for errors.
pub(crate) fn describe(f: u32) -> &'static str {
    if f & flags::CHUNKED != 0 {
        "a chunked value's index (read it with get_chunked)"
    } else if f & flags::ANY_COMPRESSION != 0 {
        "compressed (read it through Compressed)"
    } else if f & flags::PICKLE != 0 {
        "pickled by a Python client"
    } else {
        match f & flags::FORMAT_MASK {
            flags::POSTCARD => "postcard",
            flags::JSON => "JSON",
            _ => "in an unknown format",
        }
    }
}

/// Flags for a typed store: the codec's bits and the application's (`app`), which must stay
/// out of the codec's.
pub(crate) fn merge_flags(codec: u32, app: u32) -> Result<u32> {
    if app & flags::CODEC_MASK != 0 {
        return Err(Error::Codec(format!(
            "application flags {app:#x} overlap the codec's bits {:#x}; use the high 16 bits",
            flags::CODEC_MASK
        )));
    }
    Ok(codec | app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_text_round_trip_and_refuse_foreign_flags() {
        let mut out = Vec::new();
        assert_eq!(Raw.encode(&b"abc".to_vec(), &mut out).unwrap(), 0);
        assert_eq!(Raw.decode(&out, 0).unwrap(), b"abc");
        assert_eq!(Raw.decode(b"42", flags::INT).unwrap(), b"42");
        for f in [
            flags::ZLIB,
            flags::LZ4,
            flags::PICKLE,
            flags::POSTCARD,
            flags::CHUNKED,
        ] {
            let e = Raw.decode(b"x", f).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Codec, "{f:#x}");
            assert!(Text.decode(b"x", f).is_err());
        }
        let s = "zürich".to_string();
        out.clear();
        let f = Text.encode(&s, &mut out).unwrap();
        assert_eq!(f, flags::TEXT);
        assert_eq!(Text.decode(&out, f).unwrap(), s);
        assert_eq!(Text.decode(b"plain", 0).unwrap(), "plain");
        assert!(Text.decode(&[0xc3], f).is_err());
    }

    #[test]
    fn application_flags_stay_out_of_the_codec_bits() {
        assert_eq!(merge_flags(flags::TEXT, 0x0005_0000).unwrap(), 0x0005_0010);
        assert!(merge_flags(flags::TEXT, 0x8).is_err());
    }
}
