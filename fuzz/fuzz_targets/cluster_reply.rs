#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcstore::fuzzing::cluster_reply(data));
