//! mlxd: a daemon that keeps language models resident on MLX and serves them over WebSocket.
//!
//! # Layout
//! - [`runtime`]: what MLX this process runs on (version, backend, device, BLAS, library path).
#![warn(missing_docs)]

pub mod runtime;
