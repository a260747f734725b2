//! Values shared with a client someone else wrote: pymemcache (from PyPI, installed by
//! `scripts/ensure-deps`) with its `CompressedSerde` (zlib, flag 8; text flag 16; ints flag
//! 2). Each side writes, the other reads, both ways, compressed and not.

use mcstore_test_support as support;

use std::process::Command;

use mcstore::codec::{flags, Compressed, Compression, Compressor, Raw, Text};
use mcstore::{Protocol, SetOptions};
use support::{Memcached, TempDir};

/// The Python side: reads what Rust wrote (printing each value's length, flags-free type and
/// a digest), then writes its own.
const SCRIPT: &str = r#"
import hashlib, sys
from pymemcache.client.base import Client
from pymemcache.serde import CompressedSerde
host, port = sys.argv[1].rsplit(":", 1)
c = Client((host, int(port)), serde=CompressedSerde(min_compress_len=400))
for key in ["rs:bytes", "rs:text", "rs:small", "rs:plain"]:
    v = c.get(key)
    raw = v.encode() if isinstance(v, str) else v
    print(key, type(v).__name__, len(raw), hashlib.sha256(raw).hexdigest())
doc = ("<entry><title>python</title><content>" + "é" * 50 + "</content></entry>\n") * 200
c.set("py:text", doc)
c.set("py:bytes", doc.encode() * 2)
c.set("py:small", "short")
c.set("py:int", 42)
print("wrote", hashlib.sha256(doc.encode()).hexdigest())
"#;

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn values_cross_between_mcstore_and_pymemcache_both_ways() {
    let m = Memcached::start();
    let zlib = Compressor::new(Compression::Zlib { level: 6 }).min_size(400);
    let bytes_codec = Compressed::new(Raw, zlib.clone());
    let text_codec = Compressed::new(Text, zlib);
    for p in [Protocol::Text, Protocol::Binary, Protocol::Meta] {
        let mut c = support::client_builder()
            .protocol(p)
            .server(m.addr())
            .build()
            .unwrap();
        c.flush_all(None).unwrap();
        // Rust writes: compressed bytes, compressed text, small text (not compressed), and a
        // value written by a plain set (flags 0).
        let doc_bytes = "<feed><entry>mcstore</entry></feed>\n"
            .repeat(300)
            .into_bytes();
        let doc_text = "ünïcode and more text, ".repeat(200);
        c.set_as(&bytes_codec, b"rs:bytes", &doc_bytes, SetOptions::default())
            .unwrap();
        c.set_as(&text_codec, b"rs:text", &doc_text, SetOptions::default())
            .unwrap();
        c.set_as(
            &text_codec,
            b"rs:small",
            &"hi".to_string(),
            SetOptions::default(),
        )
        .unwrap();
        c.set(b"rs:plain", b"plain bytes", SetOptions::default())
            .unwrap();
        assert_eq!(c.get(b"rs:bytes").unwrap().unwrap().flags, flags::ZLIB);
        assert_eq!(
            c.get(b"rs:text").unwrap().unwrap().flags,
            flags::ZLIB | flags::TEXT
        );
        assert_eq!(c.get(b"rs:small").unwrap().unwrap().flags, flags::TEXT);

        let dir = TempDir::new("interop-py");
        let script = dir.path.join("interop.py");
        std::fs::write(&script, SCRIPT).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(m.addr())
            .output()
            .expect("python3 (scripts/ensure-deps installs it with pymemcache)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed (pymemcache installed? scripts/ensure-deps installs it):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{p:?}: python read:\n{stdout}");
        let lines: Vec<&str> = stdout.lines().collect();
        let expect =
            |key: &str, ty: &str, v: &[u8]| format!("{key} {ty} {} {}", v.len(), sha256_hex(v));
        assert_eq!(lines[0], expect("rs:bytes", "bytes", &doc_bytes));
        assert_eq!(lines[1], expect("rs:text", "str", doc_text.as_bytes()));
        assert_eq!(lines[2], expect("rs:small", "str", b"hi"));
        assert_eq!(lines[3], expect("rs:plain", "bytes", b"plain bytes"));

        // Python wrote: Rust reads, through the same codecs.
        let doc = "<entry><title>python</title><content>".to_string()
            + &"é".repeat(50)
            + "</content></entry>\n";
        let doc = doc.repeat(200);
        assert_eq!(lines[4], format!("wrote {}", sha256_hex(doc.as_bytes())));
        assert_eq!(
            c.get(b"py:text").unwrap().unwrap().flags,
            flags::ZLIB | flags::TEXT
        );
        assert_eq!(
            c.get_as(&text_codec, b"py:text").unwrap(),
            Some(doc.clone())
        );
        let mut twice = doc.clone().into_bytes();
        twice.extend_from_slice(doc.as_bytes());
        assert_eq!(c.get_as(&bytes_codec, b"py:bytes").unwrap(), Some(twice));
        assert_eq!(
            c.get_as(&text_codec, b"py:small").unwrap().as_deref(),
            Some("short")
        );
        assert_eq!(
            c.get_as(&text_codec, b"py:int").unwrap().as_deref(),
            Some("42")
        );
        // Read without the compressor: refused, never the zlib bytes.
        assert!(c.get_as(&Text, b"py:text").is_err());
    }
}
