#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcstore::fuzzing::codec_decode(data));
