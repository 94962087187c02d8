//! `mlxd::fuzzing::gguf_tokenizer` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::fuzzing::gguf_tokenizer(data));
