//! CoreML matmul programs.
//!
//! One small program per matmul shape: weights and activations are runtime inputs, never baked in, so
//! the same program serves every layer, request and model with that shape.
//!
//! - [`desc`]: what a program is (variant, M bucket, K, N) and how a matmul is split into programs.
//! - [`spec`]: the inputs and output of each program (names, types, shapes).
//! - [`emit`]: the ML Program protobuf of each variant; [`package`]: `.mlpackage` directories.
//! - [`mil`]: the MIL builder under the emitter; [`blob`]: MIL blob storage (`weight.bin`).
//! - [`interp`]: the reference interpreter that runs emitted programs with ANE-like numerics.
//! - [`pool`]: where the interpreter's GEMM threads come from (spawned, or a host's workers).
//! - [`proto`]: the CoreML protobuf types (a field-compatible subset of Apple's schema).

pub mod blob;
pub mod desc;
pub mod emit;
pub mod error;
mod gemm;
pub mod interp;
pub mod mil;
pub mod package;
pub mod pool;
pub mod proto;
pub mod spec;

pub use desc::{
    ANE_MAX_DIM, FORMAT_VERSION, M_BUCKETS, Part, ProgramDesc, SplitPlan, Variant, m_bucket,
};
pub use emit::{OPSET, SPEC_VERSION, build_program, emit_model};
pub use error::ProgramError;
pub use interp::{Interpreter, TensorRef};
pub use package::{read_package, write_mlpackage, write_package};
pub use spec::{DType, PROGRAM_RANK, TensorSpec, input_specs, output_spec};
