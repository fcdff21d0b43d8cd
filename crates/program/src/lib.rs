//! CoreML matmul programs.
pub mod desc;
pub mod proto;
pub use desc::{Part, ProgramDesc, SplitPlan, Variant, ANE_MAX_DIM, FORMAT_VERSION};
