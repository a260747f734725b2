//! libmemcached's key hash functions (libhashkit), bit-exact.
//!
//! Definitions and vectors: `../shared/reference/ketama-and-hashing.md`, section 4. Several of
//! them read each byte through a C `char`, which is signed on x86-64: bytes >= 0x80 are
//! sign-extended before use (the "signed bytes" column there). We do the same on every platform,
//! so keys map as libmemcached maps them on x86-64.

use md5::{Digest, Md5};

/// A key hash function, numbered as libmemcached's `memcached_hash_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[allow(non_camel_case_types)] // libmemcached's names: Fnv1a_32 reads better than Fnv1a32
pub enum HashFn {
    /// Jenkins one-at-a-time (libmemcached's default).
    #[default]
    OneAtATime,
    /// First 4 bytes of MD5, little-endian.
    Md5,
    /// CRC-32 (zlib), bits 16..=30: always below 32768.
    Crc,
    /// 64-bit FNV-1, low 32 bits.
    Fnv1_64,
    /// libmemcached's "fnv1a_64", which is 32-bit arithmetic with truncated 64-bit constants.
    Fnv1a_64,
    /// 32-bit FNV-1.
    Fnv1_32,
    /// 32-bit FNV-1a.
    Fnv1a_32,
    /// Paul Hsieh's SuperFastHash, started from 0 (not compiled into Debian's libmemcached).
    Hsieh,
    /// MurmurHash2 with libmemcached's seed.
    Murmur,
    /// Bob Jenkins' lookup3 `hashlittle` with initval 13.
    Jenkins,
    /// MurmurHash3 x86_32 with libmemcached's seed.
    Murmur3,
}

impl HashFn {
    /// Every hash function, in `memcached_hash_t` order.
    pub const ALL: [HashFn; 11] = [
        HashFn::OneAtATime,
        HashFn::Md5,
        HashFn::Crc,
        HashFn::Fnv1_64,
        HashFn::Fnv1a_64,
        HashFn::Fnv1_32,
        HashFn::Fnv1a_32,
        HashFn::Hsieh,
        HashFn::Murmur,
        HashFn::Jenkins,
        HashFn::Murmur3,
    ];

    /// The name used in configuration (`one_at_a_time`, `md5`, `crc`, `fnv1_64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            HashFn::OneAtATime => "one_at_a_time",
            HashFn::Md5 => "md5",
            HashFn::Crc => "crc",
            HashFn::Fnv1_64 => "fnv1_64",
            HashFn::Fnv1a_64 => "fnv1a_64",
            HashFn::Fnv1_32 => "fnv1_32",
            HashFn::Fnv1a_32 => "fnv1a_32",
            HashFn::Hsieh => "hsieh",
            HashFn::Murmur => "murmur",
            HashFn::Jenkins => "jenkins",
            HashFn::Murmur3 => "murmur3",
        }
    }

    /// Looks a hash function up by [`name`](Self::name) (`default` is one-at-a-time).
    pub fn from_name(name: &str) -> Option<HashFn> {
        let name = name.to_ascii_lowercase().replace('-', "_");
        if name == "default" {
            return Some(HashFn::OneAtATime);
        }
        HashFn::ALL.into_iter().find(|h| h.name() == name)
    }

    /// Hashes `key`. Allocates nothing.
    ///
    /// ```
    /// use mcstore::ring::HashFn;
    /// assert_eq!(HashFn::OneAtATime.hash(b"foo"), 0x238678dd);
    /// assert_eq!(HashFn::Crc.hash(b"hello"), 0x3610);
    /// ```
    pub fn hash(self, key: &[u8]) -> u32 {
        match self {
            HashFn::OneAtATime => one_at_a_time(key),
            HashFn::Md5 => md5_u32(key),
            HashFn::Crc => (crc32fast::hash(key) >> 16) & 0x7fff,
            HashFn::Fnv1_64 => fnv1_64(key),
            HashFn::Fnv1a_64 => fnv1a_32(key, 0x8422_2325, 0x0000_01b3),
            HashFn::Fnv1_32 => fnv1_32(key),
            HashFn::Fnv1a_32 => fnv1a_32(key, 0x811c_9dc5, 0x0100_0193),
            HashFn::Hsieh => hsieh(key),
            HashFn::Murmur => murmur(key),
            HashFn::Jenkins => jenkins(key),
            HashFn::Murmur3 => murmur3(key),
        }
    }
}

/// A byte read through a signed C `char`, widened to 32 bits.
fn sext32(b: u8) -> u32 {
    b as i8 as i32 as u32
}

fn sext64(b: u8) -> u64 {
    b as i8 as i64 as u64
}

fn one_at_a_time(key: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &b in key {
        h = h.wrapping_add(sext32(b));
        h = h.wrapping_add(h << 10);
        h ^= h >> 6;
    }
    h = h.wrapping_add(h << 3);
    h ^= h >> 11;
    h.wrapping_add(h << 15)
}

/// The MD5 digest of `data` (16 bytes, on the stack).
pub(crate) fn md5_digest(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

fn md5_u32(key: &[u8]) -> u32 {
    let d = md5_digest(key);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

fn fnv1_64(key: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= sext64(b);
    }
    h as u32
}

/// 32-bit FNV-1a from `basis` with `prime`: libhashkit's "fnv1a_32", and its "fnv1a_64" (the
/// 64-bit constants truncated to 32 bits, 32-bit arithmetic: its quirk, kept for placement).
fn fnv1a_32(key: &[u8], basis: u32, prime: u32) -> u32 {
    key.iter()
        .fold(basis, |h, &b| (h ^ sext32(b)).wrapping_mul(prime))
}

/// 32-bit FNV-1 ("fnv1_32").
fn fnv1_32(key: &[u8]) -> u32 {
    key.iter().fold(0x811c_9dc5, |h: u32, &b| {
        h.wrapping_mul(0x0100_0193) ^ sext32(b)
    })
}

fn le16(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8
}

fn hsieh(key: &[u8]) -> u32 {
    let mut h: u32 = 0;
    if key.is_empty() {
        return 0;
    }
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        h = h.wrapping_add(le16(&c[0..2]));
        let t = (le16(&c[2..4]) << 11) ^ h;
        h = (h << 16) ^ t;
        h = h.wrapping_add(h >> 11);
    }
    let tail = chunks.remainder();
    match tail.len() {
        3 => {
            h = h.wrapping_add(le16(&tail[0..2]));
            h ^= h << 16;
            h ^= sext32(tail[2]) << 18;
            h = h.wrapping_add(h >> 11);
        }
        2 => {
            h = h.wrapping_add(le16(tail));
            h ^= h << 11;
            h = h.wrapping_add(h >> 17);
        }
        1 => {
            h = h.wrapping_add(u32::from(tail[0]));
            h ^= h << 10;
            h = h.wrapping_add(h >> 1);
        }
        _ => {}
    }
    h ^= h << 3;
    h = h.wrapping_add(h >> 5);
    h ^= h << 4;
    h = h.wrapping_add(h >> 17);
    h ^= h << 25;
    h.wrapping_add(h >> 6)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A 1..=3 byte tail read as a little-endian integer.
fn tail_le(tail: &[u8]) -> u32 {
    tail.iter()
        .enumerate()
        .fold(0, |acc, (i, &b)| acc | u32::from(b) << (8 * i))
}

fn murmur(key: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = key.len() as u32;
    let seed = 0xdead_beef_u32.wrapping_mul(len);
    let mut h = seed ^ len;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = le32(c);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        h ^= tail_le(tail);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

fn murmur3(key: &[u8]) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let len = key.len() as u32;
    let mut h = 0xdead_beef_u32.wrapping_mul(len);
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = le32(c);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let k = tail_le(tail)
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h ^= k;
    }
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn jenkins(key: &[u8]) -> u32 {
    let init = 0xdead_beef_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(13);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(le32(&rest[0..4]));
        b = b.wrapping_add(le32(&rest[4..8]));
        c = c.wrapping_add(le32(&rest[8..12]));
        (a, b, c) = jenkins_mix(a, b, c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return c;
    }
    let mut block = [0u8; 12];
    block[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(le32(&block[0..4]));
    b = b.wrapping_add(le32(&block[4..8]));
    c = c.wrapping_add(le32(&block[8..12]));
    jenkins_final(a, b, c)
}

/// One line of lookup3's `mix()`: `x -= y; x ^= rot(y, k); y += z`.
#[inline(always)]
fn mix_step(x: &mut u32, y: &mut u32, z: u32, k: u32) {
    *x = x.wrapping_sub(*y) ^ y.rotate_left(k);
    *y = y.wrapping_add(z);
}

/// One line of lookup3's `final()`: `x ^= y; x -= rot(y, k)`.
#[inline(always)]
fn final_step(x: &mut u32, y: u32, k: u32) {
    *x = (*x ^ y).wrapping_sub(y.rotate_left(k));
}

fn jenkins_mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    mix_step(&mut a, &mut c, b, 4);
    mix_step(&mut b, &mut a, c, 6);
    mix_step(&mut c, &mut b, a, 8);
    mix_step(&mut a, &mut c, b, 16);
    mix_step(&mut b, &mut a, c, 19);
    mix_step(&mut c, &mut b, a, 4);
    (a, b, c)
}

fn jenkins_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    final_step(&mut c, b, 14);
    final_step(&mut a, c, 11);
    final_step(&mut b, a, 25);
    final_step(&mut c, b, 16);
    final_step(&mut a, c, 4);
    final_step(&mut b, a, 14);
    final_step(&mut c, b, 24);
    c
}

#[cfg(test)]
mod tests {
    use super::HashFn;

    /// Section 5.1 of the reference: values from libmemcached 1.1.4 itself (hsieh from
    /// upstream's fixtures).
    #[test]
    fn reference_vectors() {
        let keys: [&[u8]; 8] = [
            b"",
            b"a",
            b"foo",
            b"hello",
            b"memcached",
            b"The quick brown fox jumps over the lazy dog",
            &[0x61, 0x62, 0x63, 0xff],
            &[0xc3, 0xa9, 0x74, 0xc3, 0xa9],
        ];
        let table: [(HashFn, [u32; 8]); 11] = [
            (
                HashFn::OneAtATime,
                [
                    0x00000000, 0xca2e9442, 0x238678dd, 0xc8fd181b, 0xd9d121f8, 0x519e91f5,
                    0x54616f4c, 0x7fcb4b35,
                ],
            ),
            (
                HashFn::Md5,
                [
                    0xd98c1dd4, 0xb975c10c, 0xdb18bdac, 0x2a40415d, 0x50e729ed, 0x9d7d109e,
                    0x694f26c0, 0x1e6aafde,
                ],
            ),
            (
                HashFn::Crc,
                [
                    0x00000000, 0x000068b7, 0x00000c73, 0x00003610, 0x00002e7f, 0x0000414f,
                    0x00000a5f, 0x000044d1,
                ],
            ),
            (
                HashFn::Fnv1_64,
                [
                    0x84222325, 0x8601b7be, 0x6ba13533, 0xbdbdd4c7, 0x32bb23a2, 0x7de37ace,
                    0x047bb00e, 0xee202e17,
                ],
            ),
            (
                HashFn::Fnv1a_64,
                [
                    0x84222325, 0x8601ec8c, 0xfed9d577, 0x80aabd0b, 0x3da992e8, 0xe7e47110,
                    0x11f8a9dc, 0xea769c57,
                ],
            ),
            (
                HashFn::Fnv1_32,
                [
                    0x811c9dc5, 0x050c5d7e, 0x408f5e13, 0xb6fa7167, 0x00cef422, 0xe9c86c6e,
                    0x46218cee, 0xbebb7c97,
                ],
            ),
            (
                HashFn::Fnv1a_32,
                [
                    0x811c9dc5, 0xe40c292c, 0xa9f37ed7, 0x4f9f2cab, 0xfb92ab48, 0x048fff90,
                    0x94cc221c, 0x0beea017,
                ],
            ),
            (
                HashFn::Hsieh,
                [
                    0x00000000, 0x93642e87, 0x76d4d427, 0x13842ac5, 0xaf9950e2, 0x1c19ee97,
                    0xfaabc597, 0xcc955977,
                ],
            ),
            (
                HashFn::Murmur,
                [
                    0x00000000, 0x4b41757c, 0xc4e0338f, 0x521b0bff, 0x6cf01e38, 0x30c79125,
                    0xcc0de7e9, 0xda710acb,
                ],
            ),
            (
                HashFn::Jenkins,
                [
                    0xdeadbefc, 0xe0a38690, 0x99f84f99, 0x2e0cc8f3, 0x1026edaa, 0x12b8163c,
                    0x3757b44e, 0x89466c13,
                ],
            ),
            (
                HashFn::Murmur3,
                [
                    0x00000000, 0x8872dbc8, 0xa5f500b2, 0x3fa68fd9, 0x0759d752, 0x9b2e7c8a,
                    0xfecb2d8c, 0x5becfbdb,
                ],
            ),
        ];
        for (f, want) in table {
            for (key, w) in keys.iter().zip(want) {
                assert_eq!(
                    f.hash(key),
                    w,
                    "{} of {:?}",
                    f.name(),
                    key.escape_ascii().to_string()
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for f in HashFn::ALL {
            assert_eq!(HashFn::from_name(f.name()), Some(f));
        }
        assert_eq!(HashFn::from_name("default"), Some(HashFn::OneAtATime));
        assert_eq!(HashFn::from_name("FNV1A-32"), Some(HashFn::Fnv1a_32));
        assert_eq!(HashFn::from_name("sha1"), None);
    }
}
