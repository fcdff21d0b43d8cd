//! CoreML matmul programs.
//!
//! One small program per matmul shape: weights and activations are runtime inputs, never baked in, so
//! the same program serves every layer, request and model with that shape.
//!
//! - [`desc`]: what a program is (variant, M bucket, K, N) and how a matmul is split into programs.

pub mod desc;

pub use desc::{Part, ProgramDesc, SplitPlan, Variant, ANE_MAX_DIM, FORMAT_VERSION};
