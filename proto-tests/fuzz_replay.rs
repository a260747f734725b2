//! Replays every fuzz corpus and regression input through the same functions the fuzz targets
//! call (`mcstore::fuzzing`), on stable, without cargo-fuzz. A panicking input fails the test.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
    }
    println!("fuzz replay: {target}: {n} inputs");
    n
}

#[test]
fn text_reply() {
    assert!(replay("text_reply", mcstore::fuzzing::text_reply) > 0);
}

#[test]
fn roundtrip() {
    assert!(replay("roundtrip", mcstore::fuzzing::roundtrip) > 0);
}

#[test]
fn server_spec() {
    assert!(replay("server_spec", mcstore::fuzzing::server_spec) > 0);
}

#[test]
fn binary_reply() {
    assert!(replay("binary_reply", mcstore::fuzzing::binary_reply) > 0);
}

#[test]
fn reply_stream() {
    assert!(replay("reply_stream", mcstore::fuzzing::reply_stream) > 0);
}

#[test]
fn meta_reply() {
    assert!(replay("meta_reply", mcstore::fuzzing::meta_reply) > 0);
}
