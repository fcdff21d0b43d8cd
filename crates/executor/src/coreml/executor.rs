//! `CoreMlExecutor`: programs compiled by CoreML, cached on disk, placement-checked, self-checked,
//! run through IOSurface-backed arrays.

use std::convert::Infallible;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ggml_coreml_cache::{
    Built, Cache, CacheConfig, Entry, EntryKey, EnvKey, LogFn, LogLevel, Lookup, Placement,
    ReadyPrograms, stderr_log,
};
use ggml_coreml_program::{TensorSpec, input_specs, output_spec, write_mlpackage};
use half::f16;
use objc2::rc::{Retained, autoreleasepool};
use objc2_core_ml::MLMultiArray;

use super::check::{
    Agreement, FULL_CHECK_MAX_MACS, OwnedInputs, SAMPLED_ENTRIES, SELF_CHECK_MAX_NMSE,
    compare_ideal, compare_outputs, speed_verdict,
};
use super::io::{Surface, f16_bytes, f16_bytes_mut, i8_bytes};
use super::runtime::{self, CompileError, Model, Output, Units};
use super::surfaces::{IoSet, Resident, ResidentKey, Store, is_weight_input};
use crate::background::CircuitBreaker;
use crate::platform::{self, PlatformFacts};
use crate::reference::ReferenceExecutor;
use crate::{
    Capabilities, ExecError, Executor, ProgramDesc, ProgramInputs, SurfaceBytes, Variant,
    WeightPart,
};

/// The compiled model inside a program's cache entry.
const MODEL_DIR: &str = "model.mlmodelc";
/// Seed of the self-check inputs (fixed: the same program is checked the same way everywhere).
const SELF_CHECK_SEED: u64 = 0x5e1f_c4ec;

/// Knobs, from the environment by default (see `docs/apple.md`).
#[derive(Clone)]
pub struct Settings {
    /// `GGML_COREML_COMPILE_TIMEOUT_S` (default 300): limit for each CoreML compile, load and compute plan.
    pub timeout: Duration,
    /// `GGML_COREML_SELF_CHECK` (default on; `0` turns it off): one numeric check per program and process.
    pub self_check: bool,
    /// `GGML_COREML_REQUIRE_ANE` (default on; `0` runs programs CoreML would not place on the Neural
    /// Engine — for experiments on a device only).
    pub require_ane: bool,
    /// `GGML_COREML_SPEED_CHECK` (default on; `0` turns it off): after load, one timed prediction against
    /// the same compiled model loaded CPU-only; a program that is not faster on the Neural Engine is
    /// refused and the verdict cached.
    pub speed_check: bool,
    /// `GGML_COREML_PROBE` (default on; `0` skips the startup probe).
    pub probe: bool,
    /// `GGML_COREML_SURFACE_BUDGET_MB`: most bytes of resident weight surfaces plus idle I/O sets kept
    /// between calls, least recently used dropped first. Default unbounded on macOS; on iOS a quarter of
    /// what `os_proc_available_memory` says the app may still allocate (as the weight budget).
    pub surface_budget: u64,
    /// Cache directory; `None` means `GGML_COREML_CACHE_DIR` or the platform default.
    pub cache_dir: Option<PathBuf>,
    pub log: LogFn,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: Duration::from_secs(300),
            self_check: true,
            require_ane: true,
            speed_check: true,
            probe: true,
            surface_budget: u64::MAX,
            cache_dir: None,
            log: stderr_log(),
        }
    }
}

impl Settings {
    pub fn from_env() -> Settings {
        let flag = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| !matches!(v.trim(), "0" | "off" | "false"))
        };
        let d = Settings::default();
        Settings {
            timeout: std::env::var("GGML_COREML_COMPILE_TIMEOUT_S")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&s| s > 0)
                .map_or(d.timeout, Duration::from_secs),
            self_check: flag("GGML_COREML_SELF_CHECK").unwrap_or(d.self_check),
            require_ane: flag("GGML_COREML_REQUIRE_ANE").unwrap_or(d.require_ane),
            speed_check: flag("GGML_COREML_SPEED_CHECK").unwrap_or(d.speed_check),
            probe: flag("GGML_COREML_PROBE").unwrap_or(d.probe),
            surface_budget: default_surface_budget(),
            ..d
        }
    }
}

/// `GGML_COREML_SURFACE_BUDGET_MB`, else the platform's default (see [`Settings::surface_budget`]).
fn default_surface_budget() -> u64 {
    crate::platform::memory_budget("GGML_COREML_SURFACE_BUDGET_MB")
}

/// The bytes of program input `name` in a call's inputs.
fn input_bytes<'a>(name: &str, inputs: ProgramInputs<'a>) -> Result<&'a [u8], String> {
    Ok(match (name, inputs) {
        (
            "w",
            ProgramInputs::I8I8 { w, .. }
            | ProgramInputs::W8F16 { w, .. }
            | ProgramInputs::I8I8O { w, .. },
        ) => i8_bytes(w),
        ("w", ProgramInputs::F16 { w, .. }) => f16_bytes(w),
        ("x", ProgramInputs::I8I8 { x, .. } | ProgramInputs::I8I8O { x, .. }) => i8_bytes(x),
        ("wo", ProgramInputs::I8I8O { wo, .. }) => i8_bytes(wo),
        ("xo", ProgramInputs::I8I8O { xo, .. }) => f16_bytes(xo),
        ("t", ProgramInputs::I8I8O { t, .. }) => f16_bytes(t),
        ("x", ProgramInputs::W8F16 { x, .. } | ProgramInputs::F16 { x, .. }) => f16_bytes(x),
        ("scales", ProgramInputs::W8F16 { scales, .. }) => f16_bytes(scales),
        (
            "offsets",
            ProgramInputs::W8F16 {
                offsets: Some(o), ..
            },
        ) => f16_bytes(o),
        (name, _) => return Err(format!("no data for program input {name}")),
    })
}

/// What happened to one program in this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgramStatus {
    /// Found compiled in the disk cache (false: compiled now).
    pub cache_hit: bool,
    /// Compute-plan summary when compiled now (`matmul:ane:0.93 …`), else the cached verdict.
    pub placement: String,
    /// Self-check result (`nmse …`), when run.
    pub self_check: Option<String>,
    /// Speed check result (`ane … ms vs cpu-only … ms`), when run.
    pub speed_check: Option<String>,
    /// Time to get the compiled model (compile, placement check, cache write; or the cache lookup).
    pub compile_ms: f64,
    /// Time of the CoreML load (includes the Neural Engine's own compile on first use).
    pub load_ms: f64,
    /// Why the program is refused, when it is.
    pub refused: Option<String>,
}

/// Counters for this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreMlStats {
    pub compiled: u64,
    pub cache_hits: u64,
    pub loaded: u64,
    pub refused: u64,
    pub predictions: u64,
    /// Predictions where CoreML did not write into our output backing (output copied from its array).
    pub backing_ignored: u64,
    pub failed: u64,
    /// Resident weight surfaces filled (first call of a weight part, or again after an eviction).
    pub weight_fills: u64,
    /// Resident weight surfaces or idle I/O sets dropped to stay under the surface budget.
    pub surface_evictions: u64,
    /// Memory-pressure events from the OS (process-wide) and the bytes they made the stores let go.
    pub pressure_events: u64,
    pub pressure_relieved: u64,
}

#[derive(Default)]
struct Counters {
    compiled: AtomicU64,
    cache_hits: AtomicU64,
    loaded: AtomicU64,
    refused: AtomicU64,
    predictions: AtomicU64,
    backing_ignored: AtomicU64,
    failed: AtomicU64,
    weight_fills: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone, Debug)]
enum Refusal {
    Unsupported(String),
    Compile(String),
    Placement(String),
}

impl Refusal {
    fn error(&self, desc: &ProgramDesc) -> ExecError {
        match self {
            Refusal::Unsupported(w) => ExecError::Unsupported(desc.key(), w.clone()),
            Refusal::Compile(w) => ExecError::Compile(desc.key(), w.clone()),
            Refusal::Placement(w) => ExecError::Placement(desc.key(), w.clone()),
        }
    }

    fn text(&self) -> &str {
        match self {
            Refusal::Unsupported(w) | Refusal::Compile(w) | Refusal::Placement(w) => w,
        }
    }
}

/// A loaded program. Its per-call I/O sets live in the executor's [`Store`], under the surface budget.
struct Program {
    desc: ProgramDesc,
    model: Model,
    inputs: Vec<TensorSpec>,
    output: TensorSpec,
    /// Held around each synchronous prediction: one prediction per model at a time, until the device
    /// suite shows concurrent predictions on one `MLModel` are safe (docs/apple.md §3).
    predict_lock: Mutex<()>,
    /// Keeps a process-private build directory alive as long as the model (memory-only cache); None for
    /// the probe's and the speed check's models.
    _entry: Option<Entry>,
}

enum Ready {
    Loaded(Box<Program>, ProgramStatus),
    Refused(Refusal, ProgramStatus),
}

impl Program {
    fn new(desc: &ProgramDesc, model: Model, entry: Option<Entry>) -> Program {
        Program {
            desc: *desc,
            model,
            inputs: input_specs(desc),
            output: output_spec(desc),
            predict_lock: Mutex::new(()),
            _entry: entry,
        }
    }

    fn new_io(&self) -> Result<IoSet, String> {
        Ok(IoSet {
            inputs: self.inputs.iter().map(|_| None).collect(),
            output: Surface::new(&self.output)?,
        })
    }

    /// One call: copy in, predict, copy out. I/O sets come from the store's pool, so concurrent calls
    /// of the same program use distinct buffers; with a `weight` part named, the weight-side inputs
    /// are bound from resident surfaces instead of copied.
    fn run(
        &self,
        store: &Store,
        weight: WeightPart,
        inputs: ProgramInputs<'_>,
        out: &mut [f16],
        stats: &Counters,
    ) -> Result<(), String> {
        let mut io = match store.take_io(&self.desc) {
            Some(io) => io,
            None => self.new_io()?,
        };
        let r = autoreleasepool(|_| self.run_with(store, weight, &mut io, inputs, out, stats));
        store.give_back(&self.desc, io);
        r
    }

    fn run_with(
        &self,
        store: &Store,
        weight: WeightPart,
        io: &mut IoSet,
        inputs: ProgramInputs<'_>,
        out: &mut [f16],
        stats: &Counters,
    ) -> Result<(), String> {
        if io.inputs.len() != self.inputs.len() {
            return Err(format!(
                "I/O set has {} inputs, program {}",
                io.inputs.len(),
                self.inputs.len()
            ));
        }
        // Resident surfaces bound by this call: held until the prediction returns, even if evicted.
        let mut resident = Vec::new();
        let mut arrays: Vec<(&str, Retained<MLMultiArray>)> = Vec::with_capacity(self.inputs.len());
        for (spec, slot) in self.inputs.iter().zip(io.inputs.iter_mut()) {
            let bytes = input_bytes(spec.name, inputs)?;
            if !weight.is_none() && is_weight_input(spec.name) {
                let key = ResidentKey::new(weight, &self.desc, spec.name);
                let r = store.resident(key, || {
                    bump(&stats.weight_fills);
                    let s = Surface::new(spec)?;
                    s.write(bytes)?;
                    Ok(Resident::new(s))
                })?;
                arrays.push((spec.name, r.surface().array()?));
                resident.push(r);
                continue;
            }
            let s = match slot {
                Some(s) => s,
                None => slot.insert(Surface::new(spec)?),
            };
            s.write(bytes)?;
            arrays.push((spec.name, s.array()?));
        }
        let backing = io.output.array()?;
        let output = {
            let _one = self
                .predict_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            runtime::predict(&self.model, &arrays, io.output.spec.name, &backing)?
        };
        bump(&stats.predictions);
        match output {
            Output::Backed => io.output.read(f16_bytes_mut(out)),
            Output::Returned(a) => {
                bump(&stats.backing_ignored);
                runtime::read_array(&a, self.desc.n, self.desc.m, out)
            }
        }
    }
}

/// Runs programs on the Neural Engine through CoreML.
pub struct CoreMlExecutor {
    facts: PlatformFacts,
    unusable: Option<String>,
    settings: Settings,
    cache: Cache,
    ready: ReadyPrograms<Ready>,
    reference: ReferenceExecutor,
    counters: Counters,
    /// Resident weight surfaces and pooled I/O sets, under `settings.surface_budget`; relieved on
    /// memory pressure (`pressure`).
    store: Arc<Store>,
    /// Set when the startup probe's int8 program failed while its fp16 one passed: int8-input programs
    /// are refused for the process (their weights take the f16 program).
    int8_refused: Mutex<Option<String>>,
    /// The startup probe's outcome, once run (for stats and `ggml-coreml info`).
    probe_result: Mutex<Option<Result<String, String>>>,
}

/// The cache env key of the CoreML executor on a machine: OS build and chip (an OS update or another
/// chip makes every compiled program a miss). The CLI uses it to look at the same cache entries.
pub fn env_key(facts: &PlatformFacts) -> EnvKey {
    EnvKey::new(
        facts
            .os_build
            .clone()
            .unwrap_or_else(|| "unknown-build".into()),
        facts.chip.clone().unwrap_or_else(|| "unknown-chip".into()),
    )
}

/// The executor with settings from the environment.
pub fn try_new() -> Result<CoreMlExecutor, String> {
    try_new_with(Settings::from_env())
}

/// The executor with explicit settings. It is created even on a machine that cannot run programs:
/// then `capabilities()` says why, `accelerated` is false and every `prepare` is refused.
pub fn try_new_with(settings: Settings) -> Result<CoreMlExecutor, String> {
    let facts = platform::facts();
    platform::watch_app_lifecycle();
    let unusable = facts.unusable_reason();
    let env = env_key(&facts);
    let config = match &settings.cache_dir {
        Some(dir) => CacheConfig::new(Some(dir.clone()), env),
        None => CacheConfig::from_env(env),
    };
    let cache = Cache::open(config.with_log(settings.log.clone()));
    if let Some(dir) = cache.dir() {
        // Leftovers of a process that died while compiling (each entry's `.work` is removed on every
        // path this process takes, but not by a crash).
        sweep_work_dirs(dir);
    }
    let store = Arc::new(Store::new(settings.surface_budget));
    super::pressure::watch(&store);
    let reference = ReferenceExecutor::new();
    reference.set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(CoreMlExecutor {
        facts,
        unusable,
        settings,
        cache,
        ready: ReadyPrograms::new(),
        reference,
        counters: Counters::default(),
        store,
        int8_refused: Mutex::new(None),
        probe_result: Mutex::new(None),
    })
}

/// Removes `.work` directories (temporary `.mlpackage` / `.mlmodelc`) left under the cache by a crash.
fn sweep_work_dirs(root: &Path) {
    fn walk(dir: &Path, depth: usize) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == ".work" {
                let _ = fs::remove_dir_all(&p);
            } else if depth > 0 {
                walk(&p, depth - 1);
            }
        }
    }
    walk(root, 4);
}

impl CoreMlExecutor {
    pub fn facts(&self) -> &PlatformFacts {
        &self.facts
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn stats(&self) -> CoreMlStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoreMlStats {
            compiled: l(&c.compiled),
            cache_hits: l(&c.cache_hits),
            loaded: l(&c.loaded),
            refused: l(&c.refused),
            predictions: l(&c.predictions),
            backing_ignored: l(&c.backing_ignored),
            failed: l(&c.failed),
            weight_fills: l(&c.weight_fills),
            surface_evictions: self.store.evictions(),
            pressure_events: super::pressure::EVENTS.load(Ordering::Relaxed),
            pressure_relieved: super::pressure::RELIEVED.load(Ordering::Relaxed),
        }
    }

    /// What happened to `desc` in this process, once prepared.
    pub fn status(&self, desc: &ProgramDesc) -> Option<ProgramStatus> {
        self.ready.get(desc).map(|r| match &*r {
            Ready::Loaded(_, s) | Ready::Refused(_, s) => s.clone(),
        })
    }

    fn log(&self, level: LogLevel, msg: &str) {
        (self.settings.log)(level, msg);
    }

    fn ready(&self, desc: &ProgramDesc) -> Result<Arc<Ready>, ExecError> {
        if let Some(why) = &self.unusable {
            return Err(ExecError::Unsupported(desc.key(), why.clone()));
        }
        desc.validate()
            .map_err(|e| ExecError::Unsupported(desc.key(), e))?;
        if desc.variant != Variant::F16
            && let Some(why) = &*self
                .int8_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(ExecError::Unsupported(
                desc.key(),
                format!("int8 inputs failed the startup probe: {why}"),
            ));
        }
        // Refusals are kept too, so a refused program costs one lookup per call, not a compile.
        let r = self
            .ready
            .get_or_try_insert(desc, || Ok::<_, Infallible>(Arc::new(self.build(desc))));
        match r {
            Ok(r) => Ok(r),
            Err(never) => match never {},
        }
    }

    fn build(&self, desc: &ProgramDesc) -> Ready {
        let mut status = ProgramStatus::default();
        let r = self.load_program(desc, &mut status);
        match r {
            Ok(p) => {
                bump(&self.counters.loaded);
                Ready::Loaded(Box::new(p), status)
            }
            Err(refusal) => {
                bump(&self.counters.refused);
                self.log(
                    LogLevel::Info,
                    &format!("coreml: {desc} refused: {}", refusal.text()),
                );
                status.refused = Some(refusal.text().to_owned());
                Ready::Refused(refusal, status)
            }
        }
    }

    fn load_program(
        &self,
        desc: &ProgramDesc,
        status: &mut ProgramStatus,
    ) -> Result<Program, Refusal> {
        let key = EntryKey::program(desc);
        let t = Instant::now();
        let mut plan_summary = None;
        let (entry, lookup) = self
            .cache
            .get_or_build(&key, |dir| self.compile_into(desc, dir, &mut plan_summary))
            .map_err(Refusal::Compile)?;
        status.compile_ms = t.elapsed().as_secs_f64() * 1e3;
        status.cache_hit = lookup == Lookup::Hit;
        bump(if status.cache_hit {
            &self.counters.cache_hits
        } else {
            &self.counters.compiled
        });
        let placement = entry.placement();
        status.placement = plan_summary.unwrap_or_else(|| {
            placement
                .as_ref()
                .map_or_else(|| "unknown".into(), Placement::to_note)
        });
        if let Some(Placement::Declined(why)) = &placement {
            let refusal = if let Some(w) = why.strip_prefix("compile: ") {
                Refusal::Compile(w.to_owned())
            } else if why.starts_with("self-check: ") {
                Refusal::Unsupported(why.clone())
            } else if why.starts_with("speed: ") && !self.settings.require_ane {
                // Experiments without the Neural Engine requirement run slow programs too.
                Refusal::Placement(why.clone())
            } else if why.starts_with("speed: ") {
                Refusal::Unsupported(why.clone())
            } else {
                Refusal::Placement(why.clone())
            };
            if self.settings.require_ane || !matches!(refusal, Refusal::Placement(_)) {
                return Err(refusal);
            }
        }
        let Some(mlmodelc) = entry
            .dir()
            .map(|d| d.join(MODEL_DIR))
            .filter(|p| p.is_dir())
        else {
            // A verified entry without a model would fail again: drop it so the next run rebuilds.
            let _ = self.cache.remove(&key);
            return Err(Refusal::Compile(
                "cache entry holds no compiled model".into(),
            ));
        };
        let t = Instant::now();
        let model = runtime::load(&mlmodelc, self.settings.timeout)
            .map_err(|e| Refusal::Compile(format!("load: {e}")))?;
        status.load_ms = t.elapsed().as_secs_f64() * 1e3;
        let program = Program::new(desc, model, Some(entry.clone()));
        if self.settings.self_check {
            match self.self_check(&program) {
                Ok(a) => status.self_check = Some(a.to_string()),
                Err(SelfCheck::Mismatch(why)) => {
                    let why = format!("self-check: {why}");
                    self.remember_refusal(&key, &entry, &why);
                    return Err(Refusal::Unsupported(why));
                }
                Err(SelfCheck::Failed(why)) => {
                    return Err(Refusal::Unsupported(format!(
                        "self-check did not run: {why}"
                    )));
                }
            }
        }
        if self.settings.speed_check {
            match self.speed_check(&program, &mlmodelc) {
                Ok(s) => status.speed_check = Some(s),
                Err(SelfCheck::Mismatch(why)) => {
                    let why = format!("speed: {why}");
                    self.remember_refusal(&key, &entry, &why);
                    if self.settings.require_ane {
                        return Err(Refusal::Placement(why));
                    }
                    status.speed_check = Some(why);
                }
                Err(SelfCheck::Failed(why)) => {
                    // Not a verdict: the program runs, the check is tried again next process.
                    status.speed_check = Some(format!("did not run: {why}"));
                }
            }
        }
        self.log(
            LogLevel::Debug,
            &format!(
                "coreml: {desc} ready ({}, {:.0} ms to compile/find, {:.0} ms to load, placement {}, self-check {}, speed {})",
                if status.cache_hit { "cached" } else { "compiled" },
                status.compile_ms,
                status.load_ms,
                status.placement,
                status.self_check.as_deref().unwrap_or("off"),
                status.speed_check.as_deref().unwrap_or("off")
            ),
        );
        Ok(program)
    }

    /// Builds a cache entry in `dir`: emit, compile, move the `.mlmodelc` in, placement verdict as note.
    /// A program CoreML rejects is stored as declined (remembered); a timeout or I/O trouble is an error
    /// (nothing stored, tried again next process).
    fn compile_into(
        &self,
        desc: &ProgramDesc,
        dir: &Path,
        summary: &mut Option<String>,
    ) -> Result<Built, String> {
        let work = dir.join(".work");
        let r = self.compile_steps(desc, dir, &work, summary);
        let _ = fs::remove_dir_all(&work);
        r
    }

    fn compile_steps(
        &self,
        desc: &ProgramDesc,
        dir: &Path,
        work: &Path,
        summary: &mut Option<String>,
    ) -> Result<Built, String> {
        let pkg = write_mlpackage(desc, work).map_err(|e| format!("emit: {e}"))?;
        let compiled = match runtime::compile(&pkg, self.settings.timeout) {
            Ok(p) => p,
            Err(CompileError::Rejected(why)) => {
                return Ok(Built::Dir {
                    note: Placement::Declined(format!("compile: {why}")).to_note(),
                });
            }
            Err(CompileError::Transient(why)) => return Err(format!("compile: {why}")),
            Err(CompileError::Timeout(why)) => {
                if CircuitBreaker::global().trip(&format!("{desc}: {why}")) {
                    self.log(
                        LogLevel::Warn,
                        &format!(
                            "coreml: {desc}: {why}; compile circuit breaker open: no new compiles in this process until the cache is warmed (ggml-coreml cache warm)"
                        ),
                    );
                }
                return Err(why);
            }
        };
        let target = dir.join(MODEL_DIR);
        let moved = move_tree(&compiled, &target);
        // CoreML's temporary .mlmodelc goes on every path (a rename leaves nothing to remove).
        let _ = fs::remove_dir_all(&compiled);
        moved.map_err(|e| format!("moving {} into the cache: {e}", compiled.display()))?;
        let report = runtime::plan(&target, self.settings.timeout)
            .map_err(|e| format!("compute plan: {e}"))?;
        *summary = Some(report.to_string());
        let note = match report.verdict() {
            Ok(()) => Placement::Ane,
            Err(why) => Placement::Declined(format!("placement: {why}")),
        };
        self.log(
            LogLevel::Info,
            &format!("coreml: compiled {desc}: {report} -> {}", note.to_note()),
        );
        self.log(
            LogLevel::Debug,
            &format!("coreml: compute plan of {desc}:\n{}", report.table()),
        );
        Ok(Built::Dir {
            note: note.to_note(),
        })
    }

    /// Stores a refusal found after the build (self-check) so later processes skip the program.
    fn remember_refusal(&self, key: &EntryKey, entry: &Entry, why: &str) {
        let Some(dir) = entry.dir().filter(|_| self.cache.dir().is_some()) else {
            return;
        };
        if let Err(e) = self
            .cache
            .put_dir(key, &Placement::Declined(why.to_owned()).to_note(), dir)
        {
            self.log(
                LogLevel::Debug,
                &format!("coreml: could not record refusal of {key}: {e}"),
            );
        }
    }

    fn self_check(&self, program: &Program) -> Result<Agreement, SelfCheck> {
        let desc = &program.desc;
        let inputs = OwnedInputs::random(desc, SELF_CHECK_SEED);
        let mut got = vec![f16::ZERO; desc.n * desc.m];
        program
            .run(
                &self.store,
                WeightPart::NONE,
                inputs.inputs(),
                &mut got,
                &self.counters,
            )
            .map_err(SelfCheck::Failed)?;
        let (a, against) = if inputs.macs() <= FULL_CHECK_MAX_MACS {
            let mut want = vec![f16::ZERO; desc.n * desc.m];
            self.reference
                .run(desc, inputs.inputs(), WeightPart::NONE, &mut want)
                .map_err(|e| SelfCheck::Failed(format!("reference executor: {e}")))?;
            (compare_outputs(&want, &got), "reference executor")
        } else {
            (
                compare_ideal(&inputs, &got, Some(SAMPLED_ENTRIES), SELF_CHECK_SEED),
                "sampled f64 product",
            )
        };
        if a.within(SELF_CHECK_MAX_NMSE) {
            Ok(a)
        } else {
            Err(SelfCheck::Mismatch(format!(
                "{a} against the {against} (limit nmse {SELF_CHECK_MAX_NMSE:e})"
            )))
        }
    }
}

impl CoreMlExecutor {
    /// Times the program against the same compiled model loaded CPU-only (best of a few predictions
    /// each, after a warm-up); `Mismatch` when the Neural Engine is not faster.
    fn speed_check(&self, program: &Program, mlmodelc: &Path) -> Result<String, SelfCheck> {
        let desc = &program.desc;
        let cpu = autoreleasepool(|_| {
            runtime::load_with(mlmodelc, Units::CpuOnly, self.settings.timeout)
        })
        .map_err(|e| SelfCheck::Failed(format!("cpu-only load: {e}")))?;
        let cpu = Program::new(desc, cpu, None);
        let inputs = OwnedInputs::random(desc, SELF_CHECK_SEED);
        let mut out = vec![f16::ZERO; desc.n * desc.m];
        let mut time = |p: &Program| -> Result<f64, SelfCheck> {
            // The first run is the warm-up, left out of the best.
            let mut best = f64::INFINITY;
            for i in 0..=SPEED_CHECK_RUNS {
                let t = Instant::now();
                p.run(
                    &self.store,
                    WeightPart::NONE,
                    inputs.inputs(),
                    &mut out,
                    &self.counters,
                )
                .map_err(SelfCheck::Failed)?;
                if i > 0 {
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(best)
        };
        let ane_ms = time(program)?;
        let cpu_ms = time(&cpu)?;
        speed_verdict(ane_ms, cpu_ms).map_err(SelfCheck::Mismatch)
    }

    /// Where the startup probe's programs are built (removed after).
    fn probe_dir(&self, desc: &ProgramDesc) -> PathBuf {
        std::env::temp_dir().join(format!(
            "ggml-coreml-probe-{}-{}",
            std::process::id(),
            desc.key()
        ))
    }

    /// One probe program: emit, compile, load, then the self-check (surfaces → arrays → a prediction →
    /// compared with the reference executor). No placement or speed verdict: a tiny program may well
    /// run on the CPU; the probe asks whether the I/O path works at all.
    fn probe_one(&self, desc: &ProgramDesc) -> Result<(), String> {
        let dir = self.probe_dir(desc);
        let _ = fs::remove_dir_all(&dir);
        let r = autoreleasepool(|_| {
            let pkg = write_mlpackage(desc, &dir.join("src")).map_err(|e| format!("emit: {e}"))?;
            let compiled = match runtime::compile(&pkg, self.settings.timeout) {
                Ok(p) => p,
                Err(
                    CompileError::Rejected(w)
                    | CompileError::Transient(w)
                    | CompileError::Timeout(w),
                ) => return Err(format!("compile: {w}")),
            };
            let target = dir.join(MODEL_DIR);
            let moved = move_tree(&compiled, &target);
            let _ = fs::remove_dir_all(&compiled);
            moved.map_err(|e| format!("moving the compiled model: {e}"))?;
            let model = runtime::load(&target, self.settings.timeout)?;
            let program = Program::new(desc, model, None);
            match self.self_check(&program) {
                Ok(_) => Ok(()),
                Err(SelfCheck::Mismatch(w) | SelfCheck::Failed(w)) => Err(w),
            }
        });
        let _ = fs::remove_dir_all(&dir);
        r
    }

    /// The startup probe's outcome (`None` before it ran).
    pub fn probe_result(&self) -> Option<Result<String, String>> {
        self.probe_result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why int8-input programs are refused for this process, when they are.
    pub fn int8_refused(&self) -> Option<String> {
        self.int8_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Timed predictions per model in the speed check (after one warm-up).
const SPEED_CHECK_RUNS: usize = 3;

/// The startup probe's programs: the smallest fp16 program (fp16 surfaces) and the smallest w8f16
/// program (an int8 surface next to fp16 ones).
fn probe_descs() -> (ProgramDesc, ProgramDesc) {
    let m = ggml_coreml_program::M_BUCKETS[0];
    let f16 = ProgramDesc {
        variant: Variant::F16,
        m,
        k: 64,
        n: 64,
        group: 0,
        offsets: false,
    };
    let w8 = ProgramDesc {
        variant: Variant::W8F16,
        group: 32,
        ..f16
    };
    (f16, w8)
}

enum SelfCheck {
    /// The program ran and its result is wrong: refuse it for good.
    Mismatch(String),
    /// The check could not run (a prediction error): refuse it in this process only.
    Failed(String),
}

/// Moves a tree, falling back to copy + delete across file systems.
fn move_tree(from: &Path, to: &Path) -> io::Result<()> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    copy_tree(from, to)?;
    let _ = fs::remove_dir_all(from);
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if t.is_file() {
            fs::copy(e.path(), &dest)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a regular file or directory", e.path().display()),
            ));
        }
    }
    Ok(())
}

impl Executor for CoreMlExecutor {
    fn name(&self) -> &'static str {
        "coreml"
    }

    fn capabilities(&self) -> Capabilities {
        match &self.unusable {
            None => Capabilities {
                variants: Variant::ALL.to_vec(),
                accelerated: true,
                description: format!("coreml executor: {}", self.facts.describe()),
            },
            Some(why) => Capabilities {
                variants: Vec::new(),
                accelerated: false,
                description: format!(
                    "coreml executor unavailable: {why} ({})",
                    self.facts.describe()
                ),
            },
        }
    }

    fn health(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(why) = &self.unusable {
            parts.push(format!("unusable: {why}"));
        }
        if let Some(Err(why)) = self.probe_result() {
            parts.push(format!("unusable: startup probe failed: {why}"));
        }
        if let Some(why) = self.int8_refused() {
            parts.push(format!(
                "int8-input programs refused ({why}); weights use the f16 program"
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn surface_bytes(&self) -> SurfaceBytes {
        SurfaceBytes {
            programs: self.ready.len() as u64,
            ..self.store.bytes()
        }
    }

    fn needs_compile(&self, desc: &ProgramDesc) -> bool {
        self.unusable.is_none()
            && self.ready.get(desc).is_none()
            && self.cache.get(&EntryKey::program(desc)).is_none()
    }

    /// The smallest fp16 program must pass (else the executor is unusable for the process); when the
    /// int8 one fails, int8-input programs are refused for the process and weights take the f16 program.
    fn probe(&self) -> Result<(), String> {
        if let Some(why) = &self.unusable {
            return Err(why.clone());
        }
        if !self.settings.probe {
            return Ok(());
        }
        let (f16, w8) = probe_descs();
        let t = Instant::now();
        let r = self
            .probe_one(&f16)
            .map_err(|e| format!("fp16 program {f16}: {e}"));
        let r = r.map(|()| match self.probe_one(&w8) {
            Ok(()) => format!("fp16 and int8 surfaces pass ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                let why = format!("int8 program {w8}: {e}");
                self.log(
                    LogLevel::Warn,
                    &format!("coreml: startup probe: {why}; int8-input programs refused, weights use the f16 program"),
                );
                *self.int8_refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
                format!("fp16 passes, int8 refused: {why}")
            }
        });
        match &r {
            Ok(s) => self.log(LogLevel::Info, &format!("coreml: startup probe: {s}")),
            Err(e) => self.log(
                LogLevel::Warn,
                &format!("coreml: startup probe failed, executor unusable for this process: {e}"),
            ),
        }
        *self
            .probe_result
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(r.clone());
        r.map(|_| ())
    }

    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        match &*self.ready(desc)? {
            Ready::Loaded(..) => Ok(()),
            Ready::Refused(r, _) => Err(r.error(desc)),
        }
    }

    fn forget(&self, key: u64) {
        self.store.forget(key);
    }

    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        weight: WeightPart,
        out: &mut [f16],
    ) -> Result<(), ExecError> {
        // A named part is the bytes of one weight part: its weight-side inputs are bound from
        // resident surfaces, filled on first use.
        inputs.check(desc)?;
        if out.len() != desc.n * desc.m {
            return Err(ExecError::BadInputs(
                desc.key(),
                format!("output len {} (want {})", out.len(), desc.n * desc.m),
            ));
        }
        let ready = self.ready(desc)?;
        let program = match &*ready {
            Ready::Loaded(p, _) => p,
            Ready::Refused(r, _) => return Err(r.error(desc)),
        };
        program
            .run(&self.store, weight, inputs, out, &self.counters)
            .map_err(|e| {
                bump(&self.counters.failed);
                ExecError::Run(desc.key(), e)
            })
    }
}
