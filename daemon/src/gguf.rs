//! GGUF parsing (being written).
