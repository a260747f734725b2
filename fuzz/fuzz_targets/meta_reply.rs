#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcstore::fuzzing::meta_reply(data));
