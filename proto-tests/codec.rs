//! Typed, compressed and chunked values against real memcached: every codec over the three
//! protocols and both fronts (blocking and async), chunked values over the item limit, and
//! each way a chunked or compressed value can be damaged: never a wrong value.

use mcstore_test_support as support;

use std::collections::BTreeMap;
use std::sync::Arc;

use mcstore::codec::chunked::ChunkIndex;
use mcstore::codec::{
    flags, Codec, Compressed, Compression, Compressor, Json, Postcard, Raw, Text, ZstdDictionary,
};
use mcstore::{Client, ErrorKind, Protocol, SetOptions, SharedClient};
use support::Memcached;

const PROTOCOLS: [Protocol; 3] = [Protocol::Text, Protocol::Binary, Protocol::Meta];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Entry {
    id: u64,
    title: String,
    body: String,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
}

fn entry(i: u64, body_len: usize) -> Entry {
    Entry {
        id: i,
        title: format!("Entry number {i}"),
        body: "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(body_len / 57 + 1)
            [..body_len]
            .to_string(),
        tags: vec!["atom".into(), format!("t{}", i % 7)],
        meta: [("author".to_string(), format!("user{i}"))]
            .into_iter()
            .collect(),
    }
}

fn compressions() -> Vec<Compression> {
    let samples: Vec<Vec<u8>> = (0..300)
        .map(|i| serde_json::to_vec(&entry(i, 200 + (i as usize % 50))).unwrap())
        .collect();
    vec![
        Compression::Lz4,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
        Compression::ZstdDict {
            level: 3,
            dict: Arc::new(ZstdDictionary::train(&samples, 8 * 1024).unwrap()),
        },
        Compression::Zlib { level: 6 },
    ]
}

fn client(m: &Memcached, p: Protocol) -> Client {
    support::client_builder()
        .protocol(p)
        .server(m.addr())
        .build()
        .unwrap()
}

fn shared(m: &Memcached, p: Protocol) -> SharedClient {
    support::client_builder()
        .protocol(p)
        .server(m.addr())
        .shared()
        .build()
        .unwrap()
}

#[test]
fn every_codec_round_trips_on_every_protocol_and_front() {
    let m = Memcached::start();
    let small = entry(1, 100);
    let large = entry(2, 20_000);
    for p in PROTOCOLS {
        let mut c = client(&m, p);
        let s = shared(&m, p);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (i, e) in [&small, &large].into_iter().enumerate() {
            let k = format!("{p:?}:{i}");
            // Plain codecs.
            c.set_as(
                &Postcard,
                format!("{k}:pc").as_bytes(),
                e,
                SetOptions::default(),
            )
            .unwrap();
            assert_eq!(
                c.get_as(&Postcard, format!("{k}:pc").as_bytes())
                    .unwrap()
                    .as_ref(),
                Some(e)
            );
            s.set_as(
                &Json,
                format!("{k}:js").as_bytes(),
                e,
                SetOptions::default(),
            )
            .unwrap();
            assert_eq!(
                s.get_as(&Json, format!("{k}:js").as_bytes())
                    .unwrap()
                    .as_ref(),
                Some(e)
            );
            // Each front reads what the other wrote.
            assert_eq!(
                s.get_as(&Postcard, format!("{k}:pc").as_bytes())
                    .unwrap()
                    .as_ref(),
                Some(e)
            );
            assert_eq!(
                c.get_as(&Json, format!("{k}:js").as_bytes())
                    .unwrap()
                    .as_ref(),
                Some(e)
            );
            // A value in another format is a clear error, never a misread.
            let err = c
                .get_as::<Entry, _>(&Json, format!("{k}:pc").as_bytes())
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
            // Text and bytes.
            let text = e.body.clone();
            c.set_as(
                &Text,
                format!("{k}:tx").as_bytes(),
                &text,
                SetOptions::default(),
            )
            .unwrap();
            assert_eq!(
                s.get_as(&Text, format!("{k}:tx").as_bytes()).unwrap(),
                Some(text.clone())
            );
            let bytes = text.clone().into_bytes();
            s.set_as(
                &Raw,
                format!("{k}:raw").as_bytes(),
                &bytes,
                SetOptions::default().flags(0x0007_0000),
            )
            .unwrap();
            assert_eq!(
                c.get_as(&Raw, format!("{k}:raw").as_bytes()).unwrap(),
                Some(bytes.clone())
            );
            assert_eq!(
                c.get(format!("{k}:raw").as_bytes()).unwrap().unwrap().flags,
                0x0007_0000
            );
            // Compressed, every algorithm, both fronts, blocking and async.
            for algo in compressions() {
                let codec = Compressed::new(Postcard, Compressor::new(algo.clone()).min_size(256));
                let key = format!("{k}:{algo:?}").replace(' ', "");
                let key = &key[..key.len().min(200)];
                c.set_as(&codec, key.as_bytes(), e, SetOptions::default())
                    .unwrap();
                let f = c.get(key.as_bytes()).unwrap().unwrap().flags;
                if i == 1 {
                    assert_ne!(
                        f & flags::ANY_COMPRESSION,
                        0,
                        "{algo:?} compressed the large one"
                    );
                } else {
                    assert_eq!(f & flags::ANY_COMPRESSION, 0, "{algo:?} left the small one");
                }
                assert_eq!(s.get_as(&codec, key.as_bytes()).unwrap().as_ref(), Some(e));
                let got = rt.block_on(async {
                    s.set_as_async(&codec, key.as_bytes(), e, SetOptions::default())
                        .await
                        .unwrap();
                    s.get_as_async(&codec, key.as_bytes()).await.unwrap()
                });
                assert_eq!(got.as_ref(), Some(e));
                assert_eq!(c.get_as(&codec, key.as_bytes()).unwrap().as_ref(), Some(e));
                // Read without decompressing: refused, never the compressed bytes.
                if i == 1 {
                    let err = c.get_as::<Entry, _>(&Postcard, key.as_bytes()).unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Codec);
                }
            }
        }
        assert_eq!(c.get_as::<Entry, _>(&Postcard, b"absent").unwrap(), None);
        assert_eq!(
            rt.block_on(s.get_as_async::<Entry, _>(&Json, b"absent"))
                .unwrap(),
            None
        );
        // Application flags must stay out of the codec's bits: nothing is sent.
        let err = c
            .set_as(
                &Postcard,
                b"bad-flags",
                &small,
                SetOptions::default().flags(0x8),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert_eq!(c.get(b"bad-flags").unwrap(), None);
    }
}

#[test]
fn corrupt_compressed_values_in_the_cache_are_clear_errors() {
    let m = Memcached::start();
    let mut c = client(&m, Protocol::Meta);
    let doc = entry(3, 50_000);
    for algo in compressions() {
        let codec = Compressed::new(Postcard, Compressor::new(algo.clone()).max_decoded(1 << 20));
        c.set_as(&codec, b"doc", &doc, SetOptions::default())
            .unwrap();
        let item = c.get(b"doc").unwrap().unwrap();
        // Truncated, bit-flipped, and a bomb over the reader's limit.
        let mut cut = item.value.clone();
        cut.truncate(cut.len() / 2);
        c.set(b"doc-cut", &cut, SetOptions::default().flags(item.flags))
            .unwrap();
        let e = c.get_as::<Entry, _>(&codec, b"doc-cut").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Codec, "{algo:?}: {e}");
        let mut flipped = item.value.clone();
        let n = flipped.len();
        for b in flipped[n / 3..n / 3 + 16].iter_mut() {
            *b = !*b;
        }
        c.set(
            b"doc-flip",
            &flipped,
            SetOptions::default().flags(item.flags),
        )
        .unwrap();
        // No checksum in lz4 blocks: the damage may decode, but never as the entry.
        match c.get_as::<Entry, _>(&codec, b"doc-flip") {
            Ok(v) => assert_ne!(v.as_ref(), Some(&doc), "{algo:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Codec, "{algo:?}: {e}"),
        }
        let bomb_codec = Compressed::new(Raw, Compressor::new(algo.clone()).min_size(0));
        c.set_as(
            &bomb_codec,
            b"bomb",
            &vec![0u8; 900_000],
            SetOptions::default(),
        )
        .unwrap();
        let small_limit = Compressed::new(Raw, Compressor::new(algo.clone()).max_decoded(100_000));
        let e = c.get_as(&small_limit, b"bomb").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Codec, "{algo:?}: {e}");
    }
    // A value flagged with a compression this compressor has no dictionary for.
    let plain = Compressed::new(Raw, Compressor::new(Compression::Lz4));
    c.set(
        b"dict",
        b"\x28\xb5\x2f\xfd",
        SetOptions::default().flags(flags::ZSTD_DICT),
    )
    .unwrap();
    assert_eq!(
        c.get_as(&plain, b"dict").unwrap_err().kind(),
        ErrorKind::Codec
    );
}

/// Of `keys`, how many the servers hold, and how many of those expire within 11 s (asked
/// with meta's `me`, on every server: a chunk lives on its own key's server).
fn expiring(servers: &[Memcached], keys: &[Vec<u8>]) -> (usize, usize) {
    let (mut held, mut soon) = (0, 0);
    for m in servers {
        let mut c = m.client_with(Protocol::Meta);
        for k in keys {
            let Some(line) = c.meta_debug(k).unwrap() else {
                continue;
            };
            held += 1;
            let exp: i64 = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("exp="))
                .unwrap()
                .parse()
                .unwrap();
            // -1 is "never"; memcached 1.6.18's `me` prints the time left negated, later
            // versions as it is.
            if exp != -1 && exp.abs() <= 11 {
                soon += 1;
            }
        }
    }
    (held, soon)
}

/// 4 MiB, in a pattern that tells which writer wrote it and where each byte sits.
fn big(writer: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| writer.wrapping_mul(31) ^ (i / 1000) as u8 ^ (i as u8))
        .collect()
}

#[test]
fn chunked_values_round_trip_over_the_item_limit_on_every_protocol_and_front() {
    let servers: Vec<Memcached> = (0..3)
        .map(|_| Memcached::with_args(&["-I", "1m"]))
        .collect();
    let addrs: Vec<String> = servers.iter().map(Memcached::addr).collect();
    for p in PROTOCOLS {
        let mut c = support::client_builder()
            .protocol(p)
            .servers(&addrs)
            .build()
            .unwrap();
        let s = support::client_builder()
            .protocol(p)
            .servers(&addrs)
            .shared()
            .build()
            .unwrap();
        let v1 = big(1, 4 << 20);
        let v2 = big(2, 3 << 20);
        let key = format!("big:{p:?}");
        let k = key.as_bytes();
        // Too large for a plain set.
        assert!(c.set(k, &v1, SetOptions::default()).is_err());
        c.set_chunked(k, &v1, SetOptions::default().flags(0x0003_0000))
            .unwrap();
        let item = c.get(k).unwrap().unwrap();
        assert_eq!(item.flags & flags::CHUNKED, flags::CHUNKED);
        let index = ChunkIndex::parse(&item.value).unwrap();
        assert_eq!((index.total, index.count), (v1.len() as u64, 5));
        let mut out = Vec::new();
        let info = s.get_chunked(k, &mut out).unwrap().unwrap();
        assert_eq!(info.flags, 0x0003_0000);
        assert!(out == v1);
        // A plain get of the index through a codec is refused, not misread.
        assert_eq!(c.get_as(&Raw, k).unwrap_err().kind(), ErrorKind::Codec);
        // Overwritten by another chunked value: the old chunks expire within seconds (a reader
        // that got the old index just before still finds them).
        s.set_chunked(k, &v2, SetOptions::default()).unwrap();
        assert!(c.get_chunked(k, &mut out).unwrap().is_some() && out == v2);
        let old = index.chunk_keys(k);
        assert_eq!(expiring(&servers, &old), (old.len(), old.len()));
        let mut left = 0;
        // Overwritten by a small value, then deleted.
        let index2 = ChunkIndex::parse(&c.get(k).unwrap().unwrap().value).unwrap();
        c.set_chunked(k, b"small", SetOptions::default()).unwrap();
        assert_eq!(
            s.get_chunked(k, &mut out).unwrap().map(|i| i.flags),
            Some(0)
        );
        assert_eq!(out, b"small");
        let old2 = index2.chunk_keys(k);
        assert_eq!(expiring(&servers, &old2), (old2.len(), old2.len()));
        c.set_chunked(k, &v1, SetOptions::default()).unwrap();
        let index3 = ChunkIndex::parse(&c.get(k).unwrap().unwrap().value).unwrap();
        assert!(s.delete_chunked(k).unwrap());
        assert_eq!(c.get_chunked(k, &mut out).unwrap(), None);
        c.get_multi(&index3.chunk_keys(k), |_, _| left += 1)
            .unwrap();
        assert_eq!(left, 0);
        // The flag is the library's: refused in the caller's flags.
        let e = c.set_chunked(k, &v1, SetOptions::default().flags(flags::CHUNKED));
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Codec);
    }
}

#[test]
fn damaged_chunked_values_are_misses_or_errors_never_a_wrong_value() {
    let m = Memcached::with_args(&["-I", "1m"]);
    let mut c = client(&m, Protocol::Meta);
    let v = big(7, 3 << 20);
    let fresh = |c: &mut Client| {
        c.set_chunked(b"k", &v, SetOptions::default()).unwrap();
        ChunkIndex::parse(&c.get(b"k").unwrap().unwrap().value).unwrap()
    };
    let mut out = Vec::new();
    // A missing chunk: a miss.
    let ix = fresh(&mut c);
    c.delete(&ix.chunk_keys(b"k")[1]).unwrap();
    assert_eq!(c.get_chunked(b"k", &mut out).unwrap(), None);
    assert!(out.is_empty());
    // A truncated chunk: an error.
    let ix = fresh(&mut c);
    let key2 = &ix.chunk_keys(b"k")[2];
    let mut chunk = c.get(key2).unwrap().unwrap().value;
    chunk.truncate(chunk.len() - 1);
    c.set(key2, &chunk, SetOptions::default()).unwrap();
    assert_eq!(
        c.get_chunked(b"k", &mut out).unwrap_err().kind(),
        ErrorKind::Codec
    );
    assert!(out.is_empty());
    // A corrupt chunk (same length): the CRC catches it.
    let ix = fresh(&mut c);
    let key0 = &ix.chunk_keys(b"k")[0];
    let mut chunk = c.get(key0).unwrap().unwrap().value;
    chunk[100] ^= 0x40;
    c.set(key0, &chunk, SetOptions::default()).unwrap();
    assert_eq!(
        c.get_chunked(b"k", &mut out).unwrap_err().kind(),
        ErrorKind::Codec
    );
    // A chunk of another generation under this index's key: refused.
    let ix = fresh(&mut c);
    let other = ChunkIndex::plan(&v, ix.chunk_size as usize + 16, 0).unwrap();
    c.set(
        &ix.chunk_keys(b"k")[0],
        &other.chunk(&v, 0),
        SetOptions::default(),
    )
    .unwrap();
    assert_eq!(
        c.get_chunked(b"k", &mut out).unwrap_err().kind(),
        ErrorKind::Codec
    );
    // An index whose chunks were never written (another generation): a miss.
    let ix = fresh(&mut c);
    let mut ghost = ix;
    ghost.generation ^= 1;
    c.set(
        b"k",
        &ghost.encode(),
        SetOptions::default().flags(flags::CHUNKED),
    )
    .unwrap();
    assert_eq!(c.get_chunked(b"k", &mut out).unwrap(), None);
    // Garbage flagged as an index, and an index claiming 1 TiB: errors, nothing allocated.
    c.set(
        b"k",
        b"not an index",
        SetOptions::default().flags(flags::CHUNKED),
    )
    .unwrap();
    assert_eq!(
        c.get_chunked(b"k", &mut out).unwrap_err().kind(),
        ErrorKind::Codec
    );
    let mut huge = ix;
    huge.total = 1 << 40;
    c.set(
        b"k",
        &huge.encode(),
        SetOptions::default().flags(flags::CHUNKED),
    )
    .unwrap();
    assert_eq!(
        c.get_chunked(b"k", &mut out).unwrap_err().kind(),
        ErrorKind::Codec
    );
    // The decoders of the other codecs refuse an index.
    assert_eq!(c.get_as(&Text, b"k").unwrap_err().kind(), ErrorKind::Codec);
}

#[test]
fn concurrent_chunked_writers_and_readers_never_see_a_mix() {
    let m = Memcached::with_args(&["-I", "1m"]);
    let s = support::client_builder()
        .protocol(Protocol::Meta)
        .server(m.addr())
        .shared()
        .build()
        .unwrap();
    let len = 2_500_000;
    let values: Vec<Vec<u8>> = (0..4).map(|w| big(w, len)).collect();
    s.set_chunked(b"contested", &values[0], SetOptions::default())
        .unwrap();
    let (reads, misses) = std::thread::scope(|scope| {
        for w in 0..4u8 {
            let (s, values) = (&s, &values);
            scope.spawn(move || {
                for _ in 0..15 {
                    s.set_chunked(b"contested", &values[w as usize], SetOptions::default())
                        .unwrap();
                }
            });
        }
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, values) = (&s, &values);
                scope.spawn(move || {
                    let (mut reads, mut misses) = (0, 0);
                    let mut out = Vec::new();
                    for _ in 0..40 {
                        match s.get_chunked(b"contested", &mut out) {
                            Ok(Some(_)) => {
                                assert!(values.contains(&out), "a read returned a mix");
                                reads += 1;
                            }
                            // A writer deleted the chunks of the value this read's index
                            // named: a miss, never a mix.
                            Ok(None) => misses += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (reads, misses)
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    println!("concurrent chunked: {reads} whole reads, {misses} misses");
    assert!(reads > 0);
    let mut out = Vec::new();
    assert!(s.get_chunked(b"contested", &mut out).unwrap().is_some());
    assert!(values.contains(&out));
}

/// Codec trait objects work too (a service may pick its codec at run time).
#[test]
fn a_codec_chosen_at_run_time() {
    let m = Memcached::start();
    let mut c = client(&m, Protocol::Text);
    let codecs: Vec<Box<dyn Codec<Entry>>> = vec![
        Box::new(Postcard),
        Box::new(Json),
        Box::new(Compressed::new(
            Json,
            Compressor::new(Compression::Lz4).min_size(0),
        )),
    ];
    for (i, codec) in codecs.iter().enumerate() {
        let e = entry(i as u64, 3000);
        c.set_as(codec.as_ref(), b"dyn", &e, SetOptions::default())
            .unwrap();
        assert_eq!(c.get_as(codec.as_ref(), b"dyn").unwrap(), Some(e));
    }
}
