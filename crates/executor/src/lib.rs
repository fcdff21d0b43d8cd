//! Executors run [`ProgramDesc`] programs on inputs.
//!
//! One trait, one module per platform (the wgpu-hal pattern):
//! - [`reference`]: portable; interprets the very program the ANE would get, with ANE-like numerics.
//! - `coreml` (Apple only, `cfg(target_vendor = "apple")`): compiles and runs the program through CoreML.
//!
//! The host side of a matmul (activation quantisation, transposes, padding, splits, rescale) lives in
//! [`driver`], shared by every executor.

pub mod background;
pub mod coreml;
pub mod driver;
pub mod platform;
pub mod reference;
pub mod resident;

use half::f16;

pub use ggml_coreml_program::{ProgramDesc, Variant};

/// Why an executor could not run a program. Every error maps to the host fallback path.
///
/// Three families (see [`ExecError::is_refusal`], [`ExecError::is_not_ready`]):
/// - refusals (`Unsupported`, `Compile`, `Placement`): this program cannot run here, stable for the
///   process; the driver tries the f16 program of the same weight before the host;
/// - `NotReady`: the program is being built off the compute thread; the node runs on the host this time,
///   and it is not a fault;
/// - faults (`BadInputs`, `Run`): something went wrong on this call.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ExecError {
    #[error("program {0} is not supported by this executor: {1}")]
    Unsupported(String, String),
    #[error("inputs do not match program {0}: {1}")]
    BadInputs(String, String),
    #[error("program {0} failed to compile or load: {1}")]
    Compile(String, String),
    #[error("program {0} is not placed on the Neural Engine: {1}")]
    Placement(String, String),
    #[error("program {0} failed to run: {1}")]
    Run(String, String),
    /// Contains [`NOT_READY_TAG`] in its message, so callers that only keep the text can tell.
    #[error("program {0} is not ready yet: {1}")]
    NotReady(String, String),
}

/// Part of every [`ExecError::NotReady`] message.
pub const NOT_READY_TAG: &str = "is not ready yet";

/// True when an error message (an [`ExecError`] turned into text) says "not ready": the node should
/// run on the host without counting a fault.
pub fn is_not_ready_message(msg: &str) -> bool {
    msg.contains(NOT_READY_TAG)
}

impl ExecError {
    /// The program is being prepared off the compute thread: run this call on the host, no fault.
    pub fn is_not_ready(&self) -> bool {
        matches!(self, ExecError::NotReady(..))
    }

    /// The program cannot run on this executor (stable for the process): another program variant of
    /// the same weight may.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ExecError::Unsupported(..) | ExecError::Compile(..) | ExecError::Placement(..)
        )
    }
}

/// Inputs of one program call, matching the variant of its [`ProgramDesc`].
/// All arrays are row-major; `x` is `[K, Mp]` (tokens innermost), the output `[N, Mp]`.
#[derive(Clone, Copy, Debug)]
pub enum ProgramInputs<'a> {
    I8I8 {
        /// `[N, K]`
        w: &'a [i8],
        /// `[K, Mp]`
        x: &'a [i8],
    },
    W8F16 {
        /// `[N, K]` block values (unsigned quants for Q4_K/Q5_K still fit int8)
        w: &'a [i8],
        /// `[N, K/group]`
        scales: &'a [f16],
        /// `[N, K/group]`, when the program takes offsets
        offsets: Option<&'a [f16]>,
        /// `[K, Mp]`
        x: &'a [f16],
    },
    F16 {
        /// `[N, K]`
        w: &'a [f16],
        /// `[K, Mp]`
        x: &'a [f16],
    },
    /// i8i8o (outlier split): `c` = the program's outlier channel count.
    I8I8O {
        /// `[N, K]` int8 weight rows
        w: &'a [i8],
        /// `[K, Mp]` int8 activations, outlier channels zero
        x: &'a [i8],
        /// `[N, c]` the weight's int8 values at the outlier channels
        wo: &'a [i8],
        /// `[c, Mp]` the outlier activations in the token's unit
        xo: &'a [f16],
        /// `[1, Mp]` per-token factor of the int8 product
        t: &'a [f16],
    },
}

impl ProgramInputs<'_> {
    pub fn variant(&self) -> Variant {
        match self {
            ProgramInputs::I8I8 { .. } => Variant::I8I8,
            ProgramInputs::W8F16 { .. } => Variant::W8F16,
            ProgramInputs::F16 { .. } => Variant::F16,
            ProgramInputs::I8I8O { .. } => Variant::I8I8O,
        }
    }

    /// Checks lengths against the program; every executor calls this before touching the data.
    pub fn check(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        let bad = |why: String| Err(ExecError::BadInputs(desc.key(), why));
        if self.variant() != desc.variant {
            return bad(format!("variant {} given", self.variant()));
        }
        let (nk, km) = (desc.n * desc.k, desc.k * desc.m);
        let (wl, xl) = match self {
            ProgramInputs::I8I8 { w, x } => (w.len(), x.len()),
            ProgramInputs::W8F16 {
                w,
                scales,
                offsets,
                x,
            } => {
                let ns = desc.n * (desc.k / desc.group.max(1));
                if scales.len() != ns {
                    return bad(format!("scales len {} != {ns}", scales.len()));
                }
                match (offsets, desc.offsets) {
                    (Some(o), true) if o.len() == ns => {}
                    (None, false) => {}
                    _ => return bad("offsets do not match the program".into()),
                }
                (w.len(), x.len())
            }
            ProgramInputs::F16 { w, x } => (w.len(), x.len()),
            ProgramInputs::I8I8O { w, x, wo, xo, t } => {
                let c = desc.group;
                if wo.len() != desc.n * c || xo.len() != c * desc.m || t.len() != desc.m {
                    return bad(format!(
                        "wo len {}, xo len {}, t len {} (want {}, {}, {})",
                        wo.len(),
                        xo.len(),
                        t.len(),
                        desc.n * c,
                        c * desc.m,
                        desc.m
                    ));
                }
                (w.len(), x.len())
            }
        };
        if wl != nk || xl != km {
            return bad(format!("w len {wl} (want {nk}), x len {xl} (want {km})"));
        }
        Ok(())
    }
}

/// What an executor can do on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Variants this executor runs.
    pub variants: Vec<Variant>,
    /// True when the executor is real accelerator hardware (the policy may predict a win).
    pub accelerated: bool,
    /// Human-readable facts (OS, chip, why unavailable) for logs and `ggml_backend_get_features`.
    pub description: String,
}

/// Which weight bytes a call's weight-side inputs are, for executors that keep device copies of
/// weights between calls ([`Executor::run`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WeightPart {
    /// The prepared form's key, unique to it (`driver::PreparedWeight::key`); 0: copy per call.
    pub key: u64,
    /// Offsets of the part when the driver splits one weight into K/N parts (0, 0 when whole).
    pub k0: usize,
    pub n0: usize,
}

impl WeightPart {
    /// No device copy: the inputs are copied at this call.
    pub const NONE: WeightPart = WeightPart {
        key: 0,
        k0: 0,
        n0: 0,
    };

    pub fn is_none(&self) -> bool {
        self.key == 0
    }
}

/// Executor memory kept between calls ([`Executor::surface_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SurfaceBytes {
    /// Weight-side inputs filled once and kept for every call of that weight part.
    pub weights: u64,
    /// Idle per-call I/O buffers kept for reuse.
    pub io: u64,
    /// Weight-side inputs held (one per part and input; the reference executor holds them with no
    /// bytes, to keep the same bookkeeping as the CoreML executor).
    pub weight_inputs: u64,
    /// Weight-side inputs let go because their prepared form was dropped ([`Executor::forget`]).
    pub forgotten: u64,
    /// Weight-side inputs filled (first call of a part, or again after an eviction) and entries
    /// dropped to stay under the budget, since the start.
    pub fills: u64,
    pub evictions: u64,
    /// Programs held in memory (CoreML: loaded models, or refusals remembered; reference:
    /// interpreters). Filled by the executor, not by the store.
    pub programs: u64,
}

impl SurfaceBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.io
    }
}

/// Runs programs. Implementations are shared across threads and backends.
pub trait Executor: Send + Sync {
    /// Short name: `reference` or `coreml`.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Host threads the executor may use for its own work (the reference executor's GEMM); ggml's
    /// `ggml_backend_set_n_threads` ends here. Executors that do not use host threads ignore it.
    fn set_threads(&self, _n: usize) {}

    /// Makes `desc` ready to run (compile or load from the cache), blocking until it is. Idempotent;
    /// cheap when ready. `cache warm` and the device suite call it; the compute path does not have to.
    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError>;

    /// Would [`Executor::prepare`] have to compile `desc` (not in any cache)? The compile circuit
    /// breaker ([`background::CircuitBreaker`]) holds those back. Executors without compiles say false.
    fn needs_compile(&self, _desc: &ProgramDesc) -> bool {
        false
    }

    /// The once-per-process startup probe (CoreML: an int8 and an fp16 surface made into arrays and
    /// run through a prediction). `Err` makes the executor unusable for the process, with the reason.
    fn probe(&self) -> Result<(), String> {
        Ok(())
    }

    /// One line on what holds the executor back, for the statistics and logs: a failed startup probe,
    /// an open compile circuit breaker, programs still being prepared. `None` when nothing does.
    fn health(&self) -> Option<String> {
        None
    }

    /// Bytes the executor keeps in its own device-side buffers between calls (CoreML: resident weight
    /// surfaces and pooled I/O surfaces), for the statistics' `memory` section. Zero by default.
    fn surface_bytes(&self) -> SurfaceBytes {
        SurfaceBytes::default()
    }

    /// Lets go of every device copy kept for the prepared form `key` (all its parts and programs):
    /// the form was dropped (buffer freed or rewritten, model unloaded), so no call will name it again.
    /// Reached through [`retire_weight`]; a no-op for executors that keep nothing.
    fn forget(&self, _key: u64) {}

    /// Runs one program call. `out` is `[N, Mp]` fp16. `weight` identifies the weight data for
    /// executors that keep device copies of weights between calls ([`WeightPart::NONE`]: do not keep).
    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        weight: WeightPart,
        out: &mut [f16],
    ) -> Result<(), ExecError>;
}

/// Executors told when a prepared form is dropped ([`watch_weights`], [`retire_weight`]).
static WATCHERS: std::sync::Mutex<Vec<std::sync::Weak<dyn Executor>>> =
    std::sync::Mutex::new(Vec::new());

/// Has `exec` told ([`Executor::forget`]) whenever a prepared weight with a nonzero key is dropped.
/// Held weakly: a dropped executor leaves the list at the next retirement.
pub fn watch_weights(exec: &std::sync::Arc<dyn Executor>) {
    let mut w = WATCHERS.lock().unwrap_or_else(|e| e.into_inner());
    w.retain(|x| x.strong_count() > 0);
    if !w
        .iter()
        .any(|x| std::ptr::addr_eq(x.as_ptr(), std::sync::Arc::as_ptr(exec)))
    {
        w.push(std::sync::Arc::downgrade(exec));
    }
}

/// Tells every watching executor that the prepared form `key` is gone (called when a
/// `driver::PreparedWeight` is dropped). The list's lock is not held while they forget.
pub fn retire_weight(key: u64) {
    if key == 0 {
        return;
    }
    let live: Vec<std::sync::Arc<dyn Executor>> = {
        let mut w = WATCHERS.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|x| x.strong_count() > 0);
        w.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    for e in live {
        e.forget(key);
    }
}
