//! Reference executor: emits each program exactly as the CoreML executor would get it and runs it
//! with the reference interpreter (ANE-like numerics: fp16 op results, f32 accumulation, exact
//! integer GEMM for int8 × int8). Portable, so the whole pipeline is testable without Apple hardware.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ggml_coreml_program::{Interpreter, ProgramError, TensorRef, emit_model};
use half::f16;

use crate::resident::{Held, ResidentKey, Store, is_weight_input};
use crate::{
    Capabilities, ExecError, Executor, ProgramDesc, ProgramInputs, SurfaceBytes, Variant,
    WeightPart,
};

/// Interprets emitted programs on the CPU.
#[derive(Debug)]
pub struct ReferenceExecutor {
    programs: Mutex<HashMap<ProgramDesc, Arc<Interpreter>>>,
    threads: AtomicUsize,
    /// Test hook: refuse programs with int8 inputs (i8i8, w8f16) the way CoreML refuses a placement,
    /// as an OS that does not take int8 inputs on the ANE would.
    refuse_int8: AtomicBool,
    /// Test hook: each program's first build takes this long (a slow compiler).
    compile_delay_ms: AtomicU64,
    /// The CoreML executor's resident-weight bookkeeping with zero-byte entries: the same keys,
    /// parts and forgetting, so Linux tests the path (`memory.executor_weight_inputs` in the stats).
    resident: Store<Marker, Marker>,
}

/// A resident input the reference executor does not copy (it reads the call's own slices).
struct Marker;

impl Held for Marker {
    fn bytes(&self) -> u64 {
        0
    }
}

impl Default for ReferenceExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl ReferenceExecutor {
    /// One thread per run until [`Self::set_threads`] says otherwise.
    pub fn new() -> ReferenceExecutor {
        ReferenceExecutor {
            programs: Mutex::new(HashMap::new()),
            threads: AtomicUsize::new(1),
            refuse_int8: AtomicBool::new(false),
            compile_delay_ms: AtomicU64::new(0),
            resident: Store::new(u64::MAX),
        }
    }

    /// The test hooks from the environment (the backend's reference executor only):
    /// `GGML_COREML_REFERENCE_REFUSE=int8` refuses int8-input programs, and
    /// `GGML_COREML_REFERENCE_COMPILE_MS=<ms>` makes each first build that slow.
    pub fn from_env() -> ReferenceExecutor {
        let e = ReferenceExecutor::new();
        if std::env::var("GGML_COREML_REFERENCE_REFUSE").is_ok_and(|v| v.trim() == "int8") {
            e.set_refuse_int8(true);
        }
        if let Some(ms) = std::env::var("GGML_COREML_REFERENCE_COMPILE_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            e.set_compile_delay(Duration::from_millis(ms));
        }
        e
    }

    /// Test hook: refuse i8i8 and w8f16 programs (placement refusal).
    pub fn set_refuse_int8(&self, on: bool) {
        self.refuse_int8.store(on, Ordering::Relaxed);
    }

    /// Test hook: every first build of a program sleeps this long.
    pub fn set_compile_delay(&self, d: Duration) {
        self.compile_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Has `desc` been built?
    pub fn is_prepared(&self, desc: &ProgramDesc) -> bool {
        self.lock().contains_key(desc)
    }

    /// Threads each matmul is split across (0 counts as 1).
    pub fn set_threads(&self, n: usize) {
        self.threads.store(n.max(1), Ordering::Relaxed);
    }

    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }

    /// Programs prepared so far.
    pub fn prepared(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProgramDesc, Arc<Interpreter>>> {
        // A panic while holding the lock cannot leave the map half-updated (one insert), so reuse it.
        self.programs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn interpreter(&self, desc: &ProgramDesc) -> Result<Arc<Interpreter>, ExecError> {
        if self.refuse_int8.load(Ordering::Relaxed) && desc.variant != Variant::F16 {
            return Err(ExecError::Placement(
                desc.key(),
                "int8 inputs refused (reference test hook)".into(),
            ));
        }
        if let Some(i) = self.lock().get(desc) {
            return Ok(i.clone());
        }
        desc.validate()
            .map_err(|e| ExecError::Unsupported(desc.key(), e))?;
        let delay = self.compile_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        // Built outside the lock: emission is deterministic, so a racing twin builds the same program.
        let bytes = emit_model(desc).map_err(|e| ExecError::Compile(desc.key(), e.to_string()))?;
        let interp =
            Interpreter::new(&bytes).map_err(|e| ExecError::Compile(desc.key(), e.to_string()))?;
        Ok(self
            .lock()
            .entry(*desc)
            .or_insert_with(|| Arc::new(interp))
            .clone())
    }
}

impl Executor for ReferenceExecutor {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn set_threads(&self, n: usize) {
        ReferenceExecutor::set_threads(self, n);
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            variants: Variant::ALL.to_vec(),
            accelerated: false,
            description: "reference executor (portable, ANE-like numerics)".into(),
        }
    }

    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        self.interpreter(desc).map(|_| ())
    }

    fn needs_compile(&self, desc: &ProgramDesc) -> bool {
        !self.is_prepared(desc)
    }

    fn surface_bytes(&self) -> SurfaceBytes {
        let programs = self.prepared() as u64;
        SurfaceBytes {
            programs,
            ..self.resident.bytes()
        }
    }

    fn forget(&self, key: u64) {
        self.resident.forget(key);
    }

    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        weight: WeightPart,
        out: &mut [f16],
    ) -> Result<(), ExecError> {
        inputs.check(desc)?;
        if out.len() != desc.n * desc.m {
            return Err(ExecError::BadInputs(
                desc.key(),
                format!("output len {} (want {})", out.len(), desc.n * desc.m),
            ));
        }
        let interp = self.interpreter(desc)?;
        let named: Vec<(&str, TensorRef<'_>)> = match inputs {
            ProgramInputs::I8I8 { w, x } => {
                vec![("w", TensorRef::Int8(w)), ("x", TensorRef::Int8(x))]
            }
            ProgramInputs::W8F16 {
                w,
                scales,
                offsets,
                x,
            } => {
                let mut v = vec![
                    ("w", TensorRef::Int8(w)),
                    ("scales", TensorRef::Float16(scales)),
                ];
                if let Some(o) = offsets {
                    v.push(("offsets", TensorRef::Float16(o)));
                }
                v.push(("x", TensorRef::Float16(x)));
                v
            }
            ProgramInputs::F16 { w, x } => {
                vec![("w", TensorRef::Float16(w)), ("x", TensorRef::Float16(x))]
            }
            ProgramInputs::I8I8O { w, x, wo, xo, t } => vec![
                ("w", TensorRef::Int8(w)),
                ("x", TensorRef::Int8(x)),
                ("wo", TensorRef::Int8(wo)),
                ("xo", TensorRef::Float16(xo)),
                ("t", TensorRef::Float16(t)),
            ],
        };
        if !weight.is_none() {
            for &(input, _) in named.iter().filter(|(n, _)| is_weight_input(n)) {
                let key = ResidentKey::new(weight, desc, input);
                let _ = self.resident.resident(key, || Ok(Marker));
            }
        }
        interp
            .run_into(&named, self.threads(), out)
            .map_err(|e| match e {
                ProgramError::BadInputs(m) => ExecError::BadInputs(desc.key(), m),
                e => ExecError::Run(desc.key(), e.to_string()),
            })
    }
}
