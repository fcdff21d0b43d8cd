//! Process-wide state shared by every face and backend instance: the executor, the policy, the
//! statistics and the configuration read from the environment.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::Executor;
use ggml_coreml_executor::driver::{self, Mode, PreparedWeight};
use ggml_coreml_executor::platform;
use ggml_coreml_policy::Policy;
use ggml_coreml_program::Variant;

use crate::log;
use crate::stats::Stats;
use crate::weights::WeightRegistry;

/// When weights are repacked into their program form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repack {
    /// In the buffer's `set_tensor`, as llama.cpp loads the model (first inference is not slowed).
    Load,
    /// At first use, from the bytes ggml gave us.
    Lazy,
}

/// Per-weight parity record (`GGML_COREML_PARITY`): our output vs the CPU backend's on real activations.
#[derive(Clone, Debug, Default)]
pub struct ParityEntry {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub wtype: &'static str,
    pub variant: &'static str,
    pub calls: u64,
    pub nmse_sum: f64,
    pub nmse_max: f64,
}

/// File-based controls for hosts that cannot call our C functions (e.g. Bare JS).
struct FileControls {
    /// `GGML_COREML_CONTROL`: a file with lines `policy=<mode>`, re-read when its mtime changes.
    control: Option<std::path::PathBuf>,
    /// `GGML_COREML_STATS_FILE`: rewritten with the statistics JSON at most every 500 ms and at free.
    stats: Option<std::path::PathBuf>,
    state: Mutex<FileState>,
}

#[derive(Default)]
struct FileState {
    control_checked: Option<Instant>,
    control_mtime: Option<std::time::SystemTime>,
    stats_written: Option<Instant>,
    /// Writes made within 500 ms of the last timed one.
    burst: u32,
}

pub struct Engine {
    pub executor: Arc<dyn Executor>,
    pub policy: Policy,
    pub stats: Stats,
    pub repack: Repack,
    /// `GGML_COREML_VARIANT`: a program variant (or `exact`) for every weight type.
    pub mode_override: Option<Mode>,
    files: FileControls,
    /// `GGML_COREML_PARITY=<file.json>`: per-weight NMSE vs the CPU backend, written at free.
    pub parity_path: Option<std::path::PathBuf>,
    pub parity: Mutex<BTreeMap<String, ParityEntry>>,
    /// `GGML_COREML_FAULT_INJECT=N`: every Nth executor call fails (tests of the fallback path).
    fault_every: u64,
    /// `GGML_COREML_FAULT_INJECT=panic:N`: the injected fault is a panic (tests of the per-node guard).
    fault_panics: bool,
    calls: AtomicU64,
    /// Most bytes of prepared weights kept resident (`GGML_COREML_WEIGHT_BUDGET_MB`,
    /// `ggml_backend_coreml_set_weight_budget`); past it, prepared forms are made per call and dropped.
    /// `u64::MAX`: unbounded (Macs, Linux); on iOS the default follows the memory the OS says the app may
    /// still use.
    pub weight_budget: AtomicU64,
    /// The executor is real accelerator hardware: per-call weight slices are prepared on a second
    /// thread while it runs the previous one (the reference executor's GEMM already uses every core).
    pub accelerated: bool,
    /// Bounded mode prepares per-call weights ahead on a second thread: the next row slice of the
    /// running weight, and the first slice of the next matmul's weight (`GGML_COREML_PREFETCH`: `0` off,
    /// `1` on; default on when `accelerated`).
    pub prefetch: bool,
    /// Per-device disk cache for the policy's measurements (accelerated executors only: reference
    /// timings say nothing about a device).
    measurements: Option<ggml_coreml_cache::Cache>,
}

const MEASUREMENTS: &str = "policy-measurements";

static ENGINE: OnceLock<Engine> = OnceLock::new();

pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(Engine::from_env)
}

impl Engine {
    fn from_env() -> Engine {
        let (executor, why) = platform::best_executor();
        // Device copies of a weight (resident surfaces) go when its prepared form is dropped.
        ggml_coreml_executor::watch_weights(&executor);
        let caps = executor.capabilities();
        let (policy, warning) = Policy::from_env(caps.accelerated);
        if let Some(w) = warning {
            log::warn(&w);
        }
        #[cfg(target_vendor = "apple")]
        {
            let f = platform::facts();
            let v = f
                .os_version
                .map(|v| ggml_coreml_policy::OsVersion::new(v.major as u32, v.minor as u32));
            policy.set_device_facts(ggml_coreml_policy::DeviceFacts::apple(
                &f.os,
                v,
                f.chip.as_deref(),
                f.neural_engine.present(),
            ));
            platform::watch_app_lifecycle();
        }
        log::debug(&format!("executor choice: {why}"));
        let repack = match std::env::var("GGML_COREML_REPACK").ok().as_deref() {
            None | Some("load") => Repack::Load,
            Some("lazy") => Repack::Lazy,
            Some(other) => {
                log::warn(&format!(
                    "GGML_COREML_REPACK={other} is not load|lazy; using load"
                ));
                Repack::Load
            }
        };
        let mode_override = match std::env::var("GGML_COREML_VARIANT").ok() {
            None => None,
            Some(v) => match Mode::parse(&v) {
                Some(m) => Some(m),
                None => {
                    log::warn(&format!(
                        "GGML_COREML_VARIANT={v} is not {}; using defaults",
                        Mode::NAMES.join("|")
                    ));
                    None
                }
            },
        };
        log::info(&format!(
            "executor {} ({}), policy {}, repack at {:?}, variant {}",
            executor.name(),
            caps.description,
            policy.mode().name(),
            repack,
            mode_override.map_or("default per type", |m| m.name())
        ));
        let path = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
        };
        // `N`: every Nth executor call fails; `panic:N`: every Nth call panics inside the node.
        let (fault_every, fault_panics) = match std::env::var("GGML_COREML_FAULT_INJECT").ok() {
            None => (0, false),
            Some(v) => match v.strip_prefix("panic:") {
                Some(n) => (n.parse().unwrap_or(0), true),
                None => (v.parse().unwrap_or(0), false),
            },
        };
        if fault_every > 0 {
            log::warn(&format!(
                "GGML_COREML_FAULT_INJECT: every {fault_every}th executor call {}",
                if fault_panics { "panics" } else { "fails" }
            ));
        }
        let measurements = caps.accelerated.then(|| {
            let log: ggml_coreml_cache::LogFn =
                Arc::new(|_, m: &str| log::warn(&format!("cache: {m}")));
            let cache = ggml_coreml_cache::Cache::open(
                ggml_coreml_cache::CacheConfig::from_env(env_key()).with_log(log),
            );
            let key = ggml_coreml_cache::EntryKey::measurement(MEASUREMENTS);
            if let Some(json) = cache
                .get(&key)
                .and_then(|e| e.blob().map(|b| String::from_utf8_lossy(b).into_owned()))
            {
                match policy.load_measurements_json(&json) {
                    Ok(n) => log::info(&format!("loaded {n} measured shapes from the cache")),
                    Err(e) => log::warn(&format!("ignoring cached measurements: {e}")),
                }
            }
            cache
        });
        Engine {
            executor,
            policy,
            stats: Stats::default(),
            repack,
            mode_override,
            files: FileControls {
                control: path("GGML_COREML_CONTROL"),
                stats: path("GGML_COREML_STATS_FILE"),
                state: Mutex::new(FileState::default()),
            },
            parity_path: path("GGML_COREML_PARITY"),
            parity: Mutex::new(BTreeMap::new()),
            fault_every,
            fault_panics,
            weight_budget: AtomicU64::new(default_weight_budget()),
            accelerated: caps.accelerated,
            prefetch: prefetch_knob(caps.accelerated),
            calls: AtomicU64::new(0),
            measurements,
        }
    }

    /// The program variant a weight type runs with (for the policy's cost model).
    pub fn variant_for(&self, wtype: WeightType, kind_route: driver::KindRoute) -> Variant {
        self.mode_for(wtype, kind_route)
            .program()
            .unwrap_or(Variant::I8I8)
    }

    /// Counts an executor call; true when fault injection says this one must fail. In panic mode the
    /// injected fault is a panic, which the router's per-node guard must turn into a host fallback.
    pub fn inject_fault(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let hit = self.fault_every > 0 && n.is_multiple_of(self.fault_every);
        if hit && self.fault_panics {
            panic!(
                "injected panic (GGML_COREML_FAULT_INJECT=panic:{})",
                self.fault_every
            );
        }
        hit
    }

    /// Applies `GGML_COREML_CONTROL` when the file changed (checked at most every 250 ms).
    pub fn poll_control(&self) {
        let Some(path) = &self.files.control else {
            return;
        };
        let mut st = self.files.state.lock().unwrap_or_else(|e| e.into_inner());
        if st
            .control_checked
            .is_some_and(|t| t.elapsed().as_millis() < 250)
        {
            return;
        }
        st.control_checked = Some(Instant::now());
        let Ok(mtime) = std::fs::metadata(path).and_then(|m| m.modified()) else {
            return;
        };
        if st.control_mtime == Some(mtime) {
            return;
        }
        st.control_mtime = Some(mtime);
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix("policy=") {
                match ggml_coreml_policy::Mode::parse(v) {
                    Some(m) => {
                        if self.policy.mode() != m {
                            log::info(&format!("control file: policy {}", m.name()));
                        }
                        self.policy.set_mode(m)
                    }
                    None => log::warn(&format!(
                        "control file {}: unknown policy {v:?}",
                        path.display()
                    )),
                }
            }
        }
    }

    pub fn stats_json(&self) -> String {
        let j = self.stats.to_json(
            self.policy.mode().name(),
            self.executor.name(),
            self.executor.surface_bytes(),
        );
        // What holds the executor back (failed startup probe, open compile breaker, programs still
        // being prepared), when anything does.
        match (self.executor.health(), j.strip_suffix('}')) {
            (Some(h), Some(body)) => {
                format!(
                    "{body},\"executor_health\":\"{}\"}}",
                    h.replace(['"', '\\'], "_")
                )
            }
            _ => j,
        }
    }

    /// Rewrites `GGML_COREML_STATS_FILE` (every 500 ms plus at most 4 writes in between, unless `force`),
    /// and the parity file.
    pub fn write_files(&self, force: bool) {
        if let Some(path) = &self.files.stats {
            let mut st = self.files.state.lock().unwrap_or_else(|e| e.into_inner());
            // At most every 500 ms, except for the first few graphs after a quiet spell: a short run
            // (a warm-up and one embedding) would otherwise end before the next timed write.
            let quiet = st
                .stats_written
                .is_none_or(|t| t.elapsed().as_millis() >= 500);
            if force || quiet || st.burst < 4 {
                if quiet {
                    st.burst = 0;
                    st.stats_written = Some(Instant::now());
                } else {
                    st.burst += 1;
                }
                drop(st);
                write_atomic(path, self.stats_json().as_bytes());
            }
        }
        if force && let Some(path) = &self.parity_path {
            write_atomic(path, self.parity_json().as_bytes());
        }
        if force && let Some(cache) = &self.measurements {
            let key = ggml_coreml_cache::EntryKey::measurement(MEASUREMENTS);
            if let Err(e) = cache.put_blob(&key, "", self.policy.measurements_json().as_bytes()) {
                log::debug(&format!("measurements not kept: {e}"));
            }
        }
    }

    pub fn record_parity(&self, name: &str, e: ParityEntry, nmse: f64) {
        let mut p = self.parity.lock().unwrap_or_else(|e| e.into_inner());
        let x = p.entry(name.to_string()).or_insert(ParityEntry {
            calls: 0,
            nmse_sum: 0.0,
            nmse_max: 0.0,
            ..e
        });
        x.calls += 1;
        x.nmse_sum += nmse;
        x.nmse_max = x.nmse_max.max(nmse);
    }

    pub fn parity_json(&self) -> String {
        let p = self.parity.lock().unwrap_or_else(|e| e.into_inner());
        let nodes: Vec<String> = p
            .iter()
            .map(|(name, e)| {
                format!(
                    "{{\"name\":\"{}\",\"m\":{},\"k\":{},\"n\":{},\"type\":\"{}\",\"variant\":\"{}\",\"calls\":{},\"nmse_mean\":{:e},\"nmse_max\":{:e}}}",
                    name.replace(['"', '\\'], "_"),
                    e.m,
                    e.k,
                    e.n,
                    e.wtype,
                    e.variant,
                    e.calls,
                    if e.calls > 0 { e.nmse_sum / e.calls as f64 } else { 0.0 },
                    e.nmse_max
                )
            })
            .collect();
        format!(
            "{{\"executor\":\"{}\",\"nodes\":[{}]}}",
            self.executor.name(),
            nodes.join(",")
        )
    }

    pub fn set_threads(&self, n: usize) {
        self.executor.set_threads(n.max(1));
    }

    /// Device state the policy reads (thermal, low power, iOS background), refreshed at most every
    /// second from the platform probes ("n/a" off Apple: nothing changes there).
    pub fn refresh_device_state(&self) {
        #[cfg(target_vendor = "apple")]
        {
            static LAST: Mutex<Option<Instant>> = Mutex::new(None);
            let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed().as_secs() < 1) {
                return;
            }
            *last = Some(Instant::now());
            if let Some(t) = platform::thermal_state() {
                use ggml_coreml_policy::Thermal as P;
                self.policy.set_thermal(match t {
                    platform::Thermal::Nominal => P::Nominal,
                    platform::Thermal::Fair => P::Fair,
                    platform::Thermal::Serious => P::Serious,
                    platform::Thermal::Critical => P::Critical,
                });
            }
            if let Some(lp) = platform::low_power_mode() {
                self.policy.set_low_power(lp);
            }
            self.policy.set_background(platform::in_background());
        }
    }

    /// The mode a weight runs with; `kind_route`: its kind keeps w8f16 on int8 chips
    /// (`driver::kind_route`).
    pub fn mode_for(&self, wtype: WeightType, kind_route: driver::KindRoute) -> Mode {
        Mode::for_weight(
            wtype,
            kind_route,
            self.mode_override,
            self.policy.int8_chip() && int8_route(),
        )
    }

    /// Whether weights route by tensor kind (int8 chip, int8 route on, no forced variant): only then
    /// is a weight's name read.
    pub fn routes_by_kind(&self) -> bool {
        self.mode_override.is_none() && self.policy.int8_chip() && int8_route()
    }

    /// Would keeping an `n`×`k` weight prepared in `mode` exceed the resident budget?
    pub fn over_budget(&self, mode: Mode, n: usize, k: usize) -> bool {
        let budget = self.weight_budget.load(Ordering::Relaxed);
        budget != u64::MAX
            && self
                .stats
                .weight_bytes_held
                .load(Ordering::Relaxed)
                .saturating_add(estimate_prepared_bytes(mode, n, k))
                > budget
    }

    /// True when a resident-weight budget is set (bounded mode).
    pub fn bounded(&self) -> bool {
        self.weight_budget.load(Ordering::Relaxed) != u64::MAX
    }

    /// Rows per slice when an `n`×`k` weight in `mode` is prepared per call (not kept): the largest
    /// power of two (≥ 32) whose prepared form fits [`SLICE_BYTES`], at most `n`. Powers of two keep
    /// the programs few (every slice but the last has the same shape).
    pub fn slice_rows(&self, mode: Mode, n: usize, k: usize) -> usize {
        let per_row = estimate_prepared_bytes(mode, 1, k).max(1) as usize;
        let rows = (slice_bytes() / per_row).max(32);
        (1usize << (usize::BITS - 1 - rows.leading_zeros())).min(n.max(1))
    }

    /// A form made for one call and kept nowhere (also each row slice of bounded mode), counted in the
    /// stats.
    pub fn prepare_slice(
        &self,
        wtype: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
        kind_route: driver::KindRoute,
    ) -> Result<PreparedWeight, String> {
        let mode = self.mode_for(wtype, kind_route);
        let t0 = Instant::now();
        let w = PreparedWeight::prepare(mode, wtype, bytes, n, k, 0)
            .map_err(|e| format!("repack of {} [{n}x{k}] failed: {e}", wtype.name()))?;
        self.stats
            .prepare_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(w)
    }

    /// A prepared form made for one call and kept nowhere: for weights whose buffer we cannot watch
    /// for writes and frees (so a cached form could go stale).
    pub fn prepared_uncached(
        &self,
        wtype: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
        kind_route: driver::KindRoute,
    ) -> Result<Arc<PreparedWeight>, String> {
        self.prepare_slice(wtype, bytes, n, k, kind_route)
            .map(Arc::new)
    }

    /// The prepared form of the 2-D weight whose rows (`bytes`, gathered) start at `addr` with row stride
    /// `stride`, from `registry` or made now.
    #[allow(clippy::too_many_arguments)]
    pub fn prepared(
        &self,
        registry: &WeightRegistry,
        addr: usize,
        stride: usize,
        wtype: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
        kind_route: driver::KindRoute,
    ) -> Result<Arc<PreparedWeight>, String> {
        let mode = self.mode_for(wtype, kind_route);
        if let Some(w) = registry.get(addr, mode, stride, n) {
            return Ok(w);
        }
        // Over the budget: made for this call only (the next call prepares it again).
        if self.over_budget(mode, n, k) {
            self.stats.prepared_per_call.fetch_add(1, Ordering::Relaxed);
            return self.prepared_uncached(wtype, bytes, n, k, kind_route);
        }
        let t0 = Instant::now();
        let row = bytes.len() / n.max(1);
        let span = stride * n.saturating_sub(1) + row;
        // Over lent memory the raw pages go as soon as their rows are converted: a large weight is
        // prepared in chunks, so its raw form and its prepared form are never both whole in memory
        // (the peak while a model loads: the mapping is fully resident by then).
        let release = crate::ffi::os::release_enabled() && registry.lent_part(addr, span).is_some();
        let chunk = if release {
            (LOAD_CHUNK_BYTES / estimate_prepared_bytes(mode, 1, k).max(1) as usize).max(1)
        } else {
            n
        };
        let mut released_bytes = 0usize;
        let w = PreparedWeight::prepare_chunked(
            mode,
            wtype,
            n,
            k,
            addr as u64,
            chunk,
            &mut |r0, rows| std::borrow::Cow::Borrowed(&bytes[r0 * row..(r0 + rows) * row]),
            &mut |r0, rows| {
                // The prepared form now stands in for these raw rows: let their pages go, as stock
                // llama.cpp does with the mapping it does not use (read again from the file if a
                // node falls back). From the weight's start, so pages across chunk ends go too.
                let end = if r0 + rows >= n {
                    span
                } else {
                    (r0 + rows) * stride
                };
                if release && let Some((a, len)) = registry.lent_part(addr, end) {
                    released_bytes = released_bytes.max(crate::ffi::os::page_out(a, len));
                }
            },
        )
        .map_err(|e| format!("repack of {} [{n}x{k}] failed: {e}", wtype.name()))?;
        let w = Arc::new(w);
        let released = registry.insert(addr, span, stride, w.clone());
        self.stats.weights_prepared.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prepare_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let held = w.bytes_held() as u64;
        self.stats
            .weight_bytes_held
            .fetch_add(held, Ordering::Relaxed);
        self.stats
            .weight_bytes_held
            .fetch_sub((released as u64).min(held), Ordering::Relaxed);
        self.stats
            .raw_bytes_released
            .fetch_add(released_bytes as u64, Ordering::Relaxed);
        Ok(w)
    }
}

/// The int8 route of int8 chips (A17 Pro, M4 and later, or `GGML_COREML_CHIP`): quantised weights
/// take the int8 × int8 variant of their tensor kind (`driver::kind_route`, the table
/// `driver::INT8_CHIP_ROUTES`: `i8i8o` outlier split, `i8i8r` rotation, or `w8f16`). On by default;
/// `GGML_COREML_INT8_ROUTE=0` keeps w8f16 everywhere (docs/parity.md).
pub(crate) fn int8_route() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_INT8_ROUTE").map_or(true, |v| v != "0"))
}

/// Most bytes of prepared form in one row slice of a weight prepared per call (bounded mode); three
/// slices are alive at once at most (the one the executor runs, its next one being prepared, and the
/// first slice of the next matmul's weight, prepared ahead: `router::Prefetch`).
/// `GGML_COREML_SLICE_MB` overrides it (experiments).
pub const SLICE_BYTES: usize = 4 << 20;

/// Prepared bytes per chunk when a weight over lent memory is prepared to be kept (its raw pages go
/// chunk by chunk); large enough for the repack to use every core.
const LOAD_CHUNK_BYTES: usize = 16 << 20;

/// `GGML_COREML_PREFETCH`: `0` off, `1` on (even on the reference executor, whose GEMM already uses
/// every core: for tests), otherwise on only for accelerated executors.
fn prefetch_knob(accelerated: bool) -> bool {
    match std::env::var("GGML_COREML_PREFETCH")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") => accelerated,
        Some("0") => false,
        Some("1") => true,
        Some(other) => {
            log::warn(&format!(
                "GGML_COREML_PREFETCH={other} is not 0|1; using the default ({})",
                if accelerated { "on" } else { "off" }
            ));
            accelerated
        }
    }
}

fn slice_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("GGML_COREML_SLICE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&mb| mb > 0)
            .map_or(SLICE_BYTES, |mb| mb << 20)
    })
}

/// About the bytes [`PreparedWeight::bytes_held`] will report for an `n`×`k` weight in `mode`.
fn estimate_prepared_bytes(mode: Mode, n: usize, k: usize) -> u64 {
    let nk = (n * k) as u64;
    match mode {
        Mode::Program(Variant::F16) => 2 * nk,
        Mode::Program(Variant::I8I8 | Variant::I8I8O) | Mode::I8I8Rotated | Mode::I8I8Outlier => {
            nk + 4 * n as u64
        }
        // int8 values plus an fp16 scale (and offset) per block of 32.
        Mode::Program(_) => nk + nk / 8,
        Mode::ExactF32 => 4 * nk,
    }
}

/// `GGML_COREML_WEIGHT_BUDGET_MB`, else the platform's default: on iOS, a quarter of what
/// `os_proc_available_memory` says the app may still allocate; unbounded elsewhere.
fn default_weight_budget() -> u64 {
    platform::memory_budget("GGML_COREML_WEIGHT_BUDGET_MB")
}

/// Temp file + rename, so a reader never sees half a file. Errors are logged once per call, not fatal.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        log::warn(&format!("cannot write {}: {e}", path.display()));
    }
}

/// The cache key of this machine: OS build and chip on Apple (the same key the CoreML executor uses),
/// the reference key elsewhere.
fn env_key() -> ggml_coreml_cache::EnvKey {
    #[cfg(target_vendor = "apple")]
    {
        ggml_coreml_executor::coreml::env_key(&platform::facts())
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        ggml_coreml_cache::EnvKey::reference()
    }
}
