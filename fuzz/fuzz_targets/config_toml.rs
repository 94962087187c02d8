//! `mlxd::fuzzing::config_toml` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::config_toml(data));
