//! The fuzz bodies in `cargo test`: the committed corpora replayed, and the `conn_stream`
//! harness checked against a real memcached.

/// The `conn_stream` harness against a real memcached: every request it sends, on every
/// protocol, answered by the server, reads as a complete reply. With `CONN_STREAM_SEEDS=dir`
/// the inputs are written there (the fuzz corpus's seeds).
mod stream_against_memcached {
    use super::super::{conn_stream_end, StreamEnd};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use mcstore_test_support::launcher;

    fn send(c: &mut TcpStream, header: &[u8]) -> Vec<u8> {
        c.write_all(&super::super::conn_stream_request(header).unwrap())
            .unwrap();
        let mut input = header.to_vec();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        loop {
            match conn_stream_end(&input) {
                Some(StreamEnd::Done | StreamEnd::Refused) => return input,
                _ => assert!(Instant::now() < deadline, "no complete reply: {input:?}"),
            }
            let n = c
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("{e}: {:?} after {:?}", conn_stream_end(&input), input));
            assert!(n > 0, "server closed");
            input.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn real_replies_read_as_complete() {
        let (_server, addr) = launcher::start_tcp(64).unwrap();
        let seeds = std::env::var_os("CONN_STREAM_SEEDS");
        let mut admin = TcpStream::connect(&addr).unwrap();
        admin
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut checked = 0;
        // Plain requests; after quiet commands that fail (owing a sync: bit 7); pipelines
        // (protocol + 9); two pipelined rounds (protocol + 12).
        let modes = [
            ("", 0u8, 0u8),
            ("_owed", 0x80, 0),
            ("_pipeline", 0, 9),
            ("_rounds", 0, 12),
        ];
        for (mode, flip, shift) in modes {
            for protocol in 0..3u8 {
                for cmd in 0..8u8 {
                    for prime in [b"41".as_slice(), b""] {
                        // k0 holds a number (or nothing), k1 a word, k2 nothing: hits and misses.
                        let k0 = if prime.is_empty() {
                            "delete k0 noreply\r\n"
                        } else {
                            "set k0 0 0 2 noreply\r\n41\r\n"
                        };
                        let setup =
                            format!("{k0}set k1 0 0 1 noreply\r\nx\r\ndelete k2 noreply\r\nmn\r\n");
                        admin.write_all(setup.as_bytes()).unwrap();
                        let mut mn = [0u8; 4];
                        admin.read_exact(&mut mn).unwrap();
                        assert_eq!(&mn, b"MN\r\n");
                        // Three keys for the batches; writes of up to 1021 bytes; reads of 64; no deadline.
                        // A fresh connection each time: memcached reads the protocol off the
                        // first byte a connection sends.
                        let header = [protocol + shift, cmd | (2 << 3) | flip, 255, 0, 63, 0];
                        let mut c = TcpStream::connect(&addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let input = send(&mut c, &header);
                        // A pipeline of incrs meets k1's word: binary reports that error line.
                        let end = conn_stream_end(&input);
                        let want = match end {
                            Some(StreamEnd::Refused) if shift > 0 => end,
                            _ => Some(StreamEnd::Done),
                        };
                        assert_eq!(
                            end, want,
                            "protocol {protocol}, command {cmd}, k0 {prime:?} {mode}"
                        );
                        // The same replies in small reads (7, 9, 1 bytes), with a deadline that
                        // never comes before the end. (Small writes would have the recorded reply
                        // arrive before its request was sent: out of step, rightly.)
                        let mut small = vec![
                            protocol + shift,
                            cmd | (2 << 3) | flip,
                            255,
                            2,
                            6,
                            200,
                            0,
                            250,
                        ];
                        small.extend_from_slice(&input[header.len()..]);
                        assert_eq!(
                            conn_stream_end(&small),
                            want,
                            "small reads: protocol {protocol}, command {cmd}, k0 {prime:?} {mode}"
                        );
                        if let Some(dir) = &seeds {
                            let dir = std::path::Path::new(dir);
                            std::fs::create_dir_all(dir).unwrap();
                            let name = format!("p{protocol}_c{cmd}_{}{mode}", prime.len());
                            std::fs::write(dir.join(&name), &input).unwrap();
                            std::fs::write(dir.join(name + "_small"), &small).unwrap();
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 48);
    }
}

/// Replays every fuzz corpus and regression input through the same bodies the fuzz targets
/// call, on stable, without cargo-fuzz. A panicking input fails the test.
mod replay {
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

    /// One test per target, each replaying its corpus and regressions.
    macro_rules! replays {
        ($($target:ident),*) => {$(
            #[test]
            fn $target() {
                assert!(replay(stringify!($target), super::super::$target) > 0);
            }
        )*};
    }

    replays!(
        text_reply,
        roundtrip,
        server_spec,
        binary_reply,
        conn_stream,
        meta_reply,
        cluster_reply
    );

    #[cfg(all(feature = "serde", feature = "lz4", feature = "zstd", feature = "zlib"))]
    replays!(codec_decode);

    /// The codec body's seeds (each kind of value it tells apart) pass it; with
    /// `CODEC_DECODE_SEEDS=dir` they are written there (the fuzz corpus's seeds).
    #[cfg(all(feature = "serde", feature = "lz4", feature = "zstd", feature = "zlib"))]
    #[test]
    fn codec_seeds_pass_the_body() {
        let seeds = super::super::codec_seeds();
        assert!(seeds.len() >= 10);
        let dir = std::env::var_os("CODEC_DECODE_SEEDS");
        for (i, s) in seeds.iter().enumerate() {
            super::super::codec_decode(s);
            if let Some(d) = &dir {
                std::fs::write(Path::new(d).join(format!("seed-{i}")), s).unwrap();
            }
        }
    }
}
