//! `mlxd::fuzzing::openai_request` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::openai_request(data));
