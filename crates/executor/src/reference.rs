//! Reference executor: emits each program exactly as the CoreML executor would get it and runs it
//! with the reference interpreter (ANE-like numerics: fp16 op results, f32 accumulation, exact
//! integer GEMM for int8 × int8). Portable, so the whole pipeline is testable without Apple hardware.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ggml_coreml_program::{Interpreter, ProgramError, TensorRef, emit_model};
use half::f16;

use crate::{Capabilities, ExecError, Executor, ProgramDesc, ProgramInputs, Variant};

/// Interprets emitted programs on the CPU.
#[derive(Debug)]
pub struct ReferenceExecutor {
    programs: Mutex<HashMap<ProgramDesc, Arc<Interpreter>>>,
    threads: AtomicUsize,
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
        }
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
        if let Some(i) = self.lock().get(desc) {
            return Ok(i.clone());
        }
        desc.validate()
            .map_err(|e| ExecError::Unsupported(desc.key(), e))?;
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

    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        _weight_key: u64,
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
        };
        interp
            .run_into(&named, self.threads(), out)
            .map_err(|e| match e {
                ProgramError::BadInputs(m) => ExecError::BadInputs(desc.key(), m),
                e => ExecError::Run(desc.key(), e.to_string()),
            })
    }
}
