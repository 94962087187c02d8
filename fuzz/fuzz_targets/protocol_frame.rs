//! `mlxd::fuzzing::protocol_frame` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::protocol_frame(data));
