//! `mlxd::fuzzing::chat_template` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::chat_template(data));
