//! The `codec_decode` fuzz body: what a cache hands the value decoders is arbitrary bytes
//! and flags (another client's value, a damaged or hostile one).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use crate::codec::chunked::{Assembler, ChunkIndex, INDEX_LEN};
use crate::codec::{
    flags, Codec, Compressed, Compression, Compressor, Json, Postcard, Raw, Text, ZstdDictionary,
};

/// A serde type with strings, numbers, options and nested sequences.
type Records = Vec<(String, u64, Option<Vec<u8>>)>;

/// Decompressed values over this are refused in the fuzz run (small: a bomb is cheap to find).
const LIMIT: usize = 1 << 20;

fn dict() -> Arc<ZstdDictionary> {
    static DICT: OnceLock<Arc<ZstdDictionary>> = OnceLock::new();
    DICT.get_or_init(|| {
        let samples: Vec<Vec<u8>> = (0..200)
            .map(|i| {
                format!(
                    "{{\"id\":{i},\"title\":\"entry {i}\",\"tags\":[\"a\",\"b{}\"]}}",
                    i % 7
                )
                .into_bytes()
            })
            .collect();
        Arc::new(ZstdDictionary::train(&samples, 2048).expect("training on fixed samples"))
    })
    .clone()
}

/// The compressors, made once: their pooled contexts are reused run after run.
fn compressors() -> &'static [Compressor; 6] {
    static ALL: OnceLock<[Compressor; 6]> = OnceLock::new();
    ALL.get_or_init(|| {
        [
            Compressor::default(),
            Compressor::new(Compression::Lz4),
            Compressor::new(Compression::Zstd { level: 1 }),
            Compressor::new(Compression::ZstdDict {
                level: 3,
                dict: dict(),
            }),
            Compressor::new(Compression::Zlib { level: 6 }),
            Compressor::new(Compression::Lz4).min_size(0),
        ]
        .map(|c| c.max_decoded(LIMIT))
    })
}

/// Every decoder on `data` under flags taken from its first two bytes, and every algorithm's
/// round trip of it. Checks: no panic; a decompression that succeeds stays within the limit
/// and one that fails leaves the output as it was; compress then decompress gives the input
/// back; a chunked value assembles only to the bytes its index's CRC names.
pub fn codec_decode(data: &[u8]) {
    let (f, body) = match data {
        [a, b, rest @ ..] => {
            // The two bytes pick among the bits that matter (compression, format, chunked).
            let f = (u32::from(*a) << 8 | u32::from(*b)) & 0xff1f;
            (f, rest)
        }
        _ => (0, data),
    };
    for c in compressors() {
        let mut out = b"prefix".to_vec();
        match c.decompress(body, f, &mut out) {
            Ok(true) => assert!(out.len() - 6 <= LIMIT && out.starts_with(b"prefix")),
            Ok(false) => assert_eq!(out, b"prefix"),
            Err(e) => {
                assert_eq!(out, b"prefix", "a failed decompression left bytes");
                assert_eq!(e.kind(), crate::ErrorKind::Codec);
            }
        }
        // Through the codecs: never a panic, and a compressed flag never reaches them raw.
        let codec = Compressed::new(Text, c.clone());
        let _ = codec.decode(body, f);
        let _ = Compressed::new(Raw, c.clone()).decode(body, f);
    }
    // Round trip through one algorithm (picked by the input: compressing is the costly part).
    let c = &compressors()[data.len() % 6];
    let mut packed = Vec::new();
    let bits = c
        .compress(body, &mut packed)
        .expect("compressing never fails");
    let mut back = Vec::new();
    if c.decompress(&packed, bits, &mut back)
        .expect("own output decompresses")
    {
        assert_eq!(back, body);
    } else {
        assert_eq!(packed, body);
    }
    if f & flags::ANY_COMPRESSION != 0 {
        assert!(Raw.decode(body, f).is_err() && Text.decode(body, f).is_err());
    }
    let _: Option<Records> = Postcard.decode(body, f).ok();
    let _: Option<BTreeMap<String, f64>> = Json.decode(body, f).ok();
    let _: Option<(u8, String, Vec<i32>)> = Postcard.decode(body, flags::POSTCARD).ok();
    // Chunks: the first 40 bytes as an index, the rest as chunks of varying lengths.
    if body.len() >= INDEX_LEN {
        let (head, rest) = body.split_at(INDEX_LEN);
        let index = ChunkIndex::parse(head);
        if let Ok(ix) = index {
            assert_eq!(&ix.encode()[..], head, "an index reads back as its bytes");
            let mut out = b"x".to_vec();
            let mut asm = Assembler::new(ix, &mut out);
            let mut at = 0;
            while at < rest.len() {
                let n = (rest[at] as usize * 3 + 17).min(rest.len() - at);
                let _ = asm.place(&rest[at..at + n]);
                at += n;
            }
            match asm.finish() {
                Ok(true) => {
                    assert_eq!(out.len() as u64 - 1, ix.total);
                    assert_eq!(crc32fast::hash(&out[1..]), ix.crc);
                }
                Ok(false) | Err(_) => assert_eq!(out, b"x"),
            }
        }
    }
    // A value planned into chunks, shuffled by the input, comes back whole.
    if !body.is_empty() {
        let capacity = 16 + 1 + body[0] as usize % 64;
        let ix = ChunkIndex::plan(body, capacity, 0).expect("a fuzz input fits");
        let mut out = Vec::new();
        let mut asm = Assembler::new(ix, &mut out);
        let mut order: Vec<u32> = (0..ix.count).collect();
        let turn = body.len() % order.len().max(1);
        order.rotate_left(turn);
        for i in order {
            asm.place(&ix.chunk(body, i)).expect("own chunk");
        }
        assert!(asm.finish().expect("own chunks"));
        assert_eq!(out, body);
    }
}

/// Inputs of every kind the body tells apart: each algorithm's output under its flags, a
/// postcard and a JSON value, an index followed by its chunks (the fuzz corpus's seeds).
pub fn codec_seeds() -> Vec<Vec<u8>> {
    let doc = b"<entry><title>seed</title><content>lorem ipsum dolor</content></entry>".repeat(8);
    let with = |f: u32, body: &[u8]| {
        let mut v = vec![(f >> 8) as u8, f as u8];
        v.extend_from_slice(body);
        v
    };
    let mut seeds = vec![with(0, &doc), with(flags::TEXT, b"text")];
    for c in compressors() {
        let mut packed = Vec::new();
        let bits = c
            .clone()
            .min_size(0)
            .compress(&doc, &mut packed)
            .expect("compresses");
        seeds.push(with(bits, &packed));
    }
    let mut p = Vec::new();
    let f = Postcard
        .encode(&vec![("k".to_string(), 7u64, Some(vec![1u8, 2]))], &mut p)
        .expect("encodes");
    seeds.push(with(f, &p));
    let mut j = Vec::new();
    let m: BTreeMap<String, f64> = [("a".to_string(), 1.5)].into_iter().collect();
    let f = Json.encode(&m, &mut j).expect("encodes");
    seeds.push(with(f, &j));
    let ix = ChunkIndex::plan(&doc, 16 + 100, 0).expect("fits");
    let mut chunked = with(flags::CHUNKED, &ix.encode());
    for i in 0..ix.count {
        chunked.extend_from_slice(&ix.chunk(&doc, i));
    }
    seeds.push(chunked);
    seeds
}
