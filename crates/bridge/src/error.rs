//! Errors of the bridge: every bad input ends here, never in a panic.

/// Why a weight or activation buffer could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// A ggml type id outside the supported set.
    #[error(
        "unsupported ggml type id {0} (supported: f16=1, q4_0=2, q8_0=8, q4_K=12, q5_K=13, q6_K=14)"
    )]
    UnsupportedType(u32),

    /// The row length is not a whole number of blocks.
    #[error("{ty}: k = {k} is not a multiple of the block length {block}")]
    KNotMultiple {
        ty: &'static str,
        k: usize,
        block: usize,
    },

    /// A byte buffer whose length does not match the shape (truncated or with trailing bytes).
    #[error(
        "{what}: {} data, got {got} bytes, want {want}",
        if got < want { "truncated" } else { "oversized" }
    )]
    ByteLength {
        what: &'static str,
        got: usize,
        want: usize,
    },

    /// An element buffer (input or output) whose length does not match the shape.
    #[error("{what}: got {got} elements, want {want}")]
    ElementLength {
        what: &'static str,
        got: usize,
        want: usize,
    },

    /// The type has no integer block form (F16): use `to_f16` or `rowwise_int8` instead.
    #[error("{0} has no integer block form (use to_f16 or rowwise_int8)")]
    NoIntForm(&'static str),

    /// A row stride shorter than the row.
    #[error("row stride {stride} is smaller than k = {k}")]
    Stride { stride: usize, k: usize },

    /// A shape whose element or byte count overflows `usize`.
    #[error("shape [{n}, {k}] overflows the address space")]
    TooLarge { n: usize, k: usize },
}
