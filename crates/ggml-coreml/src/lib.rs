//! ggml backend (being written).
