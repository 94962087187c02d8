//! `mlxd::fuzzing::safetensors_header` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::safetensors_header(data));
