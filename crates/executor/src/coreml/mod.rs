//! The CoreML executor: runs programs on the Neural Engine through public CoreML.
//!
//! The executor itself (`CoreMlExecutor`, [`try_new`]) exists only on Apple targets
//! (`cfg(target_vendor = "apple")`). Two pure pieces are portable so Linux tests them:
//! - [`layout`]: row-pitched copies between packed program arrays and pixel-buffer memory;
//! - [`check`]: deterministic check inputs, the ideal f64 product, and the agreement measures used by
//!   the per-program self-check and the on-device suite.
//!
//! Life of a program on Apple (details in `docs/apple.md`):
//! 1. `prepare`: look the program up in the disk cache (key: program format, OS build, chip, backend
//!    version, shape). On a miss: emit the `.mlpackage`, compile it with CoreML, keep the `.mlmodelc` in
//!    the cache together with the placement verdict from `MLComputePlan` ([`placement`]: every matmul on
//!    the Neural Engine, the rest judged by cost share). A refusal is remembered in the cache, so it is
//!    not retried every run.
//! 2. First load in a process: `CPUAndNeuralEngine` configuration, then one numeric self-check against
//!    the reference executor (a mismatch refuses the program), then the speed check against the same
//!    model loaded CPU-only (not faster refuses it, remembered).
//!
//! In the backend the executor is wrapped in [`crate::background::BackgroundExecutor`]: the startup
//! probe and every prepare run on a worker thread, never on ggml's compute thread.
//! 3. `run`: activations are copied into IOSurface-backed pixel buffers (per-call I/O sets, pooled per
//!    program); the weight-side inputs of a call with a nonzero weight key are filled once into
//!    resident surfaces shared by every M bucket of that weight part (`surfaces`: one executor-wide
//!    byte budget, `GGML_COREML_SURFACE_BUDGET_MB`, LRU eviction); the output comes back through `outputBackings` (identity-checked; copied from CoreML's own array when
//!    it was not honoured).
//!
//! Every failure is an [`ExecError`](crate::ExecError): the backend then runs the op on the host.

pub mod check;
pub mod layout;
pub mod placement;

#[cfg(target_vendor = "apple")]
mod executor;
#[cfg(target_vendor = "apple")]
mod io;
#[cfg(target_vendor = "apple")]
mod pressure;
#[cfg(target_vendor = "apple")]
mod runtime;
#[cfg(target_vendor = "apple")]
mod surfaces;

#[cfg(target_vendor = "apple")]
pub use executor::{
    CoreMlExecutor, CoreMlStats, ProgramStatus, Settings, env_key, try_new, try_new_with,
};
#[cfg(target_vendor = "apple")]
pub use runtime::neural_engine_cores;
