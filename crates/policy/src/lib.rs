//! Scheduling policy: which MUL_MATs go to the ANE, and why the others stay on the host.
//!
//! Pure logic over shapes and device facts; table-tested. The backend asks [`Policy::decide`] once per
//! MUL_MAT and [`Policy::would_offload_weight`] at weight placement. One policy is shared by every
//! thread: the mode and the device state are atomics, measurements and faults sit behind locks that
//! are only read on the decision path.
//!
//! The decision, in order (the first failing check is the reason):
//! 1. mode `off` → host; a shape disabled after repeated executor faults → host;
//! 2. no Neural Engine, or an OS too old for our programs → host (also in `always`);
//! 3. `always` → ANE;
//! 4. the reference executor (Linux) is never profitable; an old chip (M1/M2/A14–A16) → host;
//! 5. device state: background (iOS), thermal critical → host; in `latency` also thermal serious and
//!    Low Power Mode → host;
//! 6. M below `min_m` (default 256) → host;
//! 7. the cost model (or measurements, once a shape has run): `latency` offloads when the ANE is
//!    faster, `energy` while it is at most `energy_factor` times slower.

pub mod cost;
pub mod device;
pub mod measure;
pub mod projection;
pub mod settings;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use cost::{AneCost, ChipSpec, CostModel, HostCost, ModelDims};
pub use device::{ChipGen, DeviceClass, DeviceFacts, DeviceState, OsVersion, Thermal};
pub use ggml_coreml_program::Variant;
pub use projection::{Projection, project_speedup, project_speedup_with};
pub use settings::Settings;

use ggml_coreml_program::M_BUCKETS;
use measure::{Key, Measurements};

/// Policy modes, switchable at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Default: offload only where predicted or measured faster.
    Latency,
    /// Prefer the ANE while it is at most a configurable factor slower.
    Energy,
    /// Decline everything.
    Off,
    /// Testing: take every supported op.
    Always,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Latency, Mode::Energy, Mode::Off, Mode::Always];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Latency => "latency",
            Mode::Energy => "energy",
            Mode::Off => "off",
            Mode::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        let s = s.trim();
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
    }

    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Energy,
            2 => Mode::Off,
            3 => Mode::Always,
            _ => Mode::Latency,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Mode::Latency => 0,
            Mode::Energy => 1,
            Mode::Off => 2,
            Mode::Always => 3,
        }
    }
}

/// One MUL_MAT as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    /// Tokens in the ubatch.
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// What the host side of a face is: where an op the policy keeps off the ANE runs.
///
/// iOS aborts GPU work submitted from the background (and apps built on ggml crash on it), while the
/// CPU always runs and the ANE compute unit may still run. So the background rule depends on the host:
/// with a CPU host (the ACCEL face) the background sends ops to the CPU; with a GPU host (the hybrid
/// face over Metal) the background never sends an op to the host — an op the ANE would take stays on
/// the ANE, and nothing goes *to* Metal because the app went to the background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HostKind {
    /// The CPU backend (ACCEL face; hybrid face over the CPU).
    #[default]
    Cpu,
    /// A GPU backend such as Metal (hybrid face `CoreML-Metal`).
    Gpu,
}

/// Why an op stays on the host. `as_str()` values are stable: they appear in logs and stats JSON keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    ModeOff,
    NotProfitable,
    ExecutorUnavailable,
    ShapeDisabled,
    /// The OS lacks int8 program inputs (26) or MLComputePlan (macOS 14.4 / iOS 17.4).
    OsTooOld,
    /// M1/M2/A14–A16: the ANE path is a no-op there.
    OldChip,
    /// M below `min_m` (decode, small batches).
    SmallBatch,
    /// Thermal state serious (latency mode) or critical.
    Thermal,
    /// Low Power Mode (latency mode).
    LowPower,
    /// iOS app in the background.
    Background,
    /// A zero dimension.
    BadShape,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::ModeOff,
        Reason::NotProfitable,
        Reason::ExecutorUnavailable,
        Reason::ShapeDisabled,
        Reason::OsTooOld,
        Reason::OldChip,
        Reason::SmallBatch,
        Reason::Thermal,
        Reason::LowPower,
        Reason::Background,
        Reason::BadShape,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ModeOff => "policy off",
            Reason::NotProfitable => "not profitable",
            Reason::ExecutorUnavailable => "executor unavailable",
            Reason::ShapeDisabled => "shape disabled after faults",
            Reason::OsTooOld => "os too old",
            Reason::OldChip => "old chip",
            Reason::SmallBatch => "small batch",
            Reason::Thermal => "thermal",
            Reason::LowPower => "low power",
            Reason::Background => "background",
            Reason::BadShape => "bad shape",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Ane,
    Host(Reason),
}

impl Decision {
    pub fn is_ane(self) -> bool {
        self == Decision::Ane
    }

    /// `ane` or the host reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Ane => "ane",
            Decision::Host(r) => r.as_str(),
        }
    }
}

/// The times a decision compares: measured where a shape has run (≥ 2 samples), else predicted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// The cost model's ANE path (`None` on the reference device class).
    pub ane_model: Option<AneCost>,
    /// The cost model's host path (`None` on the reference device class).
    pub host_model: Option<HostCost>,
    /// What decisions use for the ANE path, ms (`None`: never profitable / unknown).
    pub ane_ms: Option<f64>,
    pub host_ms: Option<f64>,
    pub ane_measured: bool,
    pub host_measured: bool,
}

struct Device {
    facts: DeviceFacts,
    model: Option<CostModel>,
}

impl Device {
    fn new(facts: DeviceFacts) -> Device {
        let model = facts.class.chip().map(CostModel::for_chip);
        Device { facts, model }
    }
}

/// Key of the fault counters: the program-level shape (every variant).
type FaultKey = (usize, usize, usize);

fn fault_key(s: &MatmulShape) -> FaultKey {
    (cost::padded_m(s.m), s.k, s.n)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The policy shared by every backend instance of the process.
pub struct Policy {
    mode: AtomicU8,
    state: AtomicU8,
    /// f64 bits; 0 means the device class default.
    energy_factor: AtomicU64,
    min_m: AtomicUsize,
    /// 0: `always` takes every M; otherwise the explicit `GGML_COREML_MIN_M`.
    always_min_m: AtomicUsize,
    ubatch: AtomicUsize,
    max_faults: AtomicU32,
    chip_override: Option<ChipGen>,
    device: RwLock<Device>,
    measurements: RwLock<Measurements>,
    faults: RwLock<HashMap<FaultKey, u32>>,
}

impl Policy {
    /// `accelerated`: the executor is real accelerator hardware (from its capabilities). Without
    /// platform facts an accelerated device is taken as the newest known chip of this platform until
    /// [`Policy::set_device_facts`] says more; otherwise the device class is `Reference`.
    pub fn new(mode: Mode, accelerated: bool) -> Policy {
        Policy::with_settings(
            &Settings {
                mode,
                ..Settings::default()
            },
            default_facts(accelerated),
        )
    }

    pub fn with_settings(s: &Settings, facts: DeviceFacts) -> Policy {
        let p = Policy {
            mode: AtomicU8::new(s.mode.to_u8()),
            state: AtomicU8::new(DeviceState::default().to_bits()),
            energy_factor: AtomicU64::new(s.energy_factor.map_or(0, f64::to_bits)),
            min_m: AtomicUsize::new(s.min_m.max(1)),
            always_min_m: AtomicUsize::new(s.always_min_m.unwrap_or(0)),
            ubatch: AtomicUsize::new(s.ubatch.max(1)),
            max_faults: AtomicU32::new(s.max_faults.max(1)),
            chip_override: s.chip,
            device: RwLock::new(Device::new(DeviceFacts::reference())),
            measurements: RwLock::new(Measurements::default()),
            faults: RwLock::new(HashMap::new()),
        };
        p.set_device_facts(facts);
        p
    }

    /// Settings from `GGML_COREML_POLICY` (default `latency`), `GGML_COREML_ENERGY_FACTOR`,
    /// `GGML_COREML_MIN_M`, `GGML_COREML_UBATCH`, `GGML_COREML_MAX_FAULTS`, `GGML_COREML_CHIP`; bad
    /// values keep their default and are reported in the warning (all warnings joined by "; ").
    pub fn from_env(accelerated: bool) -> (Policy, Option<String>) {
        let (p, w) = Policy::from_lookup(accelerated, |k| std::env::var(k).ok());
        (
            p,
            if w.is_empty() {
                None
            } else {
                Some(w.join("; "))
            },
        )
    }

    /// As [`Policy::from_env`] with an injectable variable lookup.
    pub fn from_lookup(
        accelerated: bool,
        get: impl Fn(&str) -> Option<String>,
    ) -> (Policy, Vec<String>) {
        let (s, w) = Settings::from_lookup(get);
        (Policy::with_settings(&s, default_facts(accelerated)), w)
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    pub fn set_mode(&self, m: Mode) {
        self.mode.store(m.to_u8(), Ordering::Relaxed);
    }

    /// Lock-free: true when no MUL_MAT with `m` rows can go to the ANE now (mode off, or M below the
    /// mode's minimum), so [`Policy::decide_on`] would say host whatever the shape. For per-graph walks
    /// that only ask whether anything could offload (decode: every M is 1).
    pub fn surely_host(&self, m: usize) -> bool {
        match self.mode() {
            Mode::Off => true,
            Mode::Always => m < self.always_min_m.load(Ordering::Relaxed),
            _ => m < self.min_m(),
        }
    }

    /// Static facts from the platform layer (chip text, OS version, ANE presence): see
    /// [`DeviceFacts::apple`]. A `GGML_COREML_CHIP` override replaces the chip. Measurements are kept
    /// (they are only loaded for the matching device).
    pub fn set_device_facts(&self, mut facts: DeviceFacts) {
        if let (Some(chip), Some(_)) = (self.chip_override, facts.class.chip()) {
            facts.class = match facts.class {
                DeviceClass::AppleMobile { .. } => DeviceClass::AppleMobile { chip },
                _ => DeviceClass::AppleMac { chip },
            };
            facts.chip_guessed = false;
        }
        *write(&self.device) = Device::new(facts);
    }

    /// The chip whose numbers apply: the device's, or `GGML_COREML_CHIP` (also on the reference
    /// executor, where it names the chip a run stands in for).
    pub fn chip(&self) -> Option<ChipGen> {
        read(&self.device).facts.class.chip().or(self.chip_override)
    }

    /// Whether that chip has the ANE's int8 × int8 path (A17 Pro, M4 and later): where W8A8 programs
    /// earn more than the fp16 rate. Decides the default variant per weight (`driver::Mode`).
    pub fn int8_chip(&self) -> bool {
        self.chip()
            .is_some_and(|c| cost::ChipSpec::of(c).int8_speedup > 1.0)
    }

    pub fn device_facts(&self) -> DeviceFacts {
        read(&self.device).facts.clone()
    }

    pub fn device_class(&self) -> DeviceClass {
        read(&self.device).facts.class
    }

    /// The cost model in use (`None` on the reference device class).
    pub fn cost_model(&self) -> Option<CostModel> {
        read(&self.device).model
    }

    /// Replaces the cost model's constants (e.g. a host-side rate measured on the device).
    pub fn set_cost_model(&self, model: CostModel) {
        let mut d = write(&self.device);
        if d.facts.class != DeviceClass::Reference {
            d.model = Some(model);
        }
    }

    pub fn device_state(&self) -> DeviceState {
        DeviceState::from_bits(self.state.load(Ordering::Relaxed))
    }

    /// Set by the platform layer (thermal notifications, Low Power Mode, app lifecycle).
    pub fn set_device_state(&self, s: DeviceState) {
        self.state.store(s.to_bits(), Ordering::Relaxed);
    }

    fn update_state(&self, f: impl Fn(DeviceState) -> DeviceState) {
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(f(DeviceState::from_bits(b)).to_bits())
            });
    }

    pub fn set_thermal(&self, t: Thermal) {
        self.update_state(|s| DeviceState { thermal: t, ..s });
    }

    pub fn set_low_power(&self, on: bool) {
        self.update_state(|s| DeviceState { low_power: on, ..s });
    }

    pub fn set_background(&self, on: bool) {
        self.update_state(|s| DeviceState {
            background: on,
            ..s
        });
    }

    /// The energy factor in effect (set, or the device class default).
    pub fn energy_factor(&self) -> f64 {
        match self.energy_factor.load(Ordering::Relaxed) {
            0 => {
                if self.device_class().is_mobile() {
                    settings::ENERGY_FACTOR_MOBILE
                } else {
                    settings::ENERGY_FACTOR_MAC
                }
            }
            b => f64::from_bits(b),
        }
    }

    /// `None` restores the device default.
    pub fn set_energy_factor(&self, f: Option<f64>) -> Result<(), String> {
        let (lo, hi) = settings::ENERGY_FACTOR_RANGE;
        match f {
            None => self.energy_factor.store(0, Ordering::Relaxed),
            Some(f) if f.is_finite() && (lo..=hi).contains(&f) => {
                self.energy_factor.store(f.to_bits(), Ordering::Relaxed)
            }
            Some(f) => return Err(format!("energy factor {f} is not in [{lo}, {hi}]")),
        }
        Ok(())
    }

    pub fn min_m(&self) -> usize {
        self.min_m.load(Ordering::Relaxed)
    }

    pub fn set_min_m(&self, m: usize) {
        self.min_m.store(m.max(1), Ordering::Relaxed);
    }

    pub fn ubatch(&self) -> usize {
        self.ubatch.load(Ordering::Relaxed)
    }

    pub fn set_ubatch(&self, m: usize) {
        self.ubatch.store(m.max(1), Ordering::Relaxed);
    }

    pub fn max_faults(&self) -> u32 {
        self.max_faults.load(Ordering::Relaxed)
    }

    pub fn set_max_faults(&self, n: u32) {
        self.max_faults.store(n.max(1), Ordering::Relaxed);
    }

    /// The decision for the default program variant (`i8i8`, quantised weights).
    pub fn decide(&self, shape: &MatmulShape) -> Decision {
        self.decide_for(shape, Variant::I8I8)
    }

    pub fn decide_for(&self, shape: &MatmulShape, variant: Variant) -> Decision {
        self.evaluate(shape, variant, true, HostKind::Cpu, false).0
    }

    /// The decision when the host side is `host` (see [`HostKind`]: a GPU host is never chosen because
    /// the app is in the background). The hybrid face over Metal asks with [`HostKind::Gpu`].
    pub fn decide_on(&self, shape: &MatmulShape, variant: Variant, host: HostKind) -> Decision {
        self.evaluate(shape, variant, true, host, false).0
    }

    /// [`Policy::decide_on`] for a weight that is not resident (bounded mode): its preparation for
    /// this call is charged to the ANE path ([`cost::CostModel::prepare_ms`]) unless a measurement of
    /// the shape, which includes it, is at hand.
    pub fn decide_on_per_call(
        &self,
        shape: &MatmulShape,
        variant: Variant,
        host: HostKind,
    ) -> Decision {
        self.evaluate(shape, variant, true, host, true).0
    }

    /// At weight placement: could any MUL_MAT over this weight ever go to the ANE under the current mode?
    /// If not, llama.cpp should keep the weight in its own CPU buffers (CPU_REPACK included).
    ///
    /// True iff some M up to the ubatch size (every M bucket up to it, and the ubatch itself) would be
    /// routed to the ANE, ignoring the transient device state (a hot device at load time must not
    /// exclude a model from the ANE for the whole process).
    pub fn would_offload_weight(&self, k: usize, n: usize) -> bool {
        self.would_offload_weight_for(k, n, Variant::I8I8)
    }

    pub fn would_offload_weight_for(&self, k: usize, n: usize, variant: Variant) -> bool {
        let ubatch = self.ubatch();
        M_BUCKETS
            .iter()
            .copied()
            .filter(|&b| b < ubatch)
            .chain(std::iter::once(ubatch))
            .any(|m| {
                self.evaluate(
                    &MatmulShape { m, k, n },
                    variant,
                    false,
                    HostKind::Cpu,
                    false,
                )
                .0 == Decision::Ane
            })
    }

    /// Times the decision compares for this shape.
    pub fn predict(&self, shape: &MatmulShape, variant: Variant) -> Prediction {
        self.predict_with(shape, variant, false)
    }

    /// [`Policy::predict`]; `per_call_prepare`: the weight is prepared for this call (not resident),
    /// which the modelled ANE time is charged for (a measured time already includes it).
    pub fn predict_with(
        &self,
        shape: &MatmulShape,
        variant: Variant,
        per_call_prepare: bool,
    ) -> Prediction {
        let model = read(&self.device).model;
        let entry = read(&self.measurements).get(&Key::new(variant, shape.m, shape.k, shape.n));
        let ane_model = model.map(|c| c.ane(shape.m, shape.k, shape.n, variant));
        let host_model = model.map(|c| c.host(shape.m, shape.k, shape.n, variant));
        let ane_meas = entry.and_then(|e| e.ane).and_then(|e| e.usable());
        let host_meas = entry
            .and_then(|e| e.host_per_token)
            .and_then(|e| e.usable())
            .map(|t| t * shape.m as f64);
        Prediction {
            ane_model,
            host_model,
            // The reference executor is never profitable, measured or not.
            ane_ms: model.and(ane_meas.or(ane_model.map(|a| {
                a.total_ms
                    + if per_call_prepare {
                        model.map_or(0.0, |c| c.prepare_ms(shape.k, shape.n, variant))
                    } else {
                        0.0
                    }
            }))),
            host_ms: host_meas.or(host_model.map(|h| h.total_ms)),
            ane_measured: model.is_some() && ane_meas.is_some(),
            host_measured: host_meas.is_some(),
        }
    }

    /// Records one MUL_MAT that ran on the ANE path: `executor_ms` is its whole ANE path (host side
    /// included), `host_ms` the same shape on the host when known. Non-finite or non-positive values
    /// are ignored. Smoothed per (variant, M bucket, K, N); the first sample is a warm-up.
    pub fn record(
        &self,
        shape: &MatmulShape,
        variant: Variant,
        executor_ms: f64,
        host_ms: Option<f64>,
    ) {
        if shape.m == 0 {
            return;
        }
        let key = Key::new(variant, shape.m, shape.k, shape.n);
        let mut m = write(&self.measurements);
        m.record_ane(key, executor_ms);
        if let Some(h) = host_ms {
            m.record_host(key, shape.m, h);
        }
    }

    /// Records one MUL_MAT that ran on the host (for the program variant it would have used).
    pub fn record_host(&self, shape: &MatmulShape, variant: Variant, host_ms: f64) {
        if shape.m == 0 {
            return;
        }
        write(&self.measurements).record_host(
            Key::new(variant, shape.m, shape.k, shape.n),
            shape.m,
            host_ms,
        );
    }

    /// Counts an executor fault for this shape's programs; after `max_faults` the shape stays on the
    /// host for the rest of the process. Returns true when this fault disabled it.
    pub fn record_fault(&self, shape: &MatmulShape) -> bool {
        let mut f = write(&self.faults);
        let c = f.entry(fault_key(shape)).or_insert(0);
        *c = c.saturating_add(1);
        *c == self.max_faults()
    }

    pub fn fault_count(&self, shape: &MatmulShape) -> u32 {
        read(&self.faults)
            .get(&fault_key(shape))
            .copied()
            .unwrap_or(0)
    }

    /// Shapes disabled after faults, as (padded M, K, N).
    pub fn disabled_shapes(&self) -> Vec<(usize, usize, usize)> {
        let max = self.max_faults();
        let mut v: Vec<_> = read(&self.faults)
            .iter()
            .filter(|(_, c)| **c >= max)
            .map(|(k, _)| *k)
            .collect();
        v.sort();
        v
    }

    /// Measurements as a small JSON document, tagged with the device class.
    pub fn measurements_json(&self) -> String {
        read(&self.measurements).to_json(&self.device_class().name())
    }

    /// Loads a document written by [`Policy::measurements_json`] on the same device class; returns how
    /// many shapes were loaded. A bad or foreign document changes nothing.
    pub fn load_measurements_json(&self, json: &str) -> Result<usize, String> {
        let device = self.device_class().name();
        write(&self.measurements).load_json(json, &device)
    }

    /// Smallest M bucket at which the `latency` rule would offload (K, N), ignoring `min_m` and the
    /// device state; `None` if none up to the largest bucket (or on the reference device class).
    pub fn break_even_m(&self, k: usize, n: usize, variant: Variant) -> Option<usize> {
        M_BUCKETS.iter().copied().find(|&m| {
            let p = self.predict(&MatmulShape { m, k, n }, variant);
            matches!((p.ane_ms, p.host_ms), (Some(a), Some(h)) if a < h)
        })
    }

    /// The decision for the default variant, with predicted times and why — for debug logs and the bench.
    pub fn explain(&self, shape: &MatmulShape) -> String {
        self.explain_for(shape, Variant::I8I8)
    }

    pub fn explain_for(&self, shape: &MatmulShape, variant: Variant) -> String {
        let (d, p) = self.evaluate(shape, variant, true, HostKind::Cpu, false);
        let facts = self.device_facts();
        let st = self.device_state();
        let mode = self.mode();
        let mut s = format!(
            "m={} k={} n={} {variant} on {}",
            shape.m, shape.k, shape.n, facts.class
        );
        if facts.chip_guessed {
            s.push_str(" (chip not recognised: newest known assumed)");
        }
        if let Some(v) = facts.os {
            let _ = write!(s, " os {v}");
        }
        let _ = write!(s, ", mode {}", mode.name());
        if mode == Mode::Energy {
            let _ = write!(s, " (factor {:.2})", self.energy_factor());
        }
        let _ = write!(
            s,
            ", thermal {}{}{}",
            st.thermal.name(),
            if st.low_power { ", low power" } else { "" },
            if st.background { ", background" } else { "" }
        );
        let p = p.unwrap_or_else(|| self.predict(shape, variant));
        match (p.ane_model, p.ane_ms) {
            (Some(a), Some(ms)) => {
                let _ = write!(
                    s,
                    ": ane {ms:.3} ms {} [model {:.3}: {} call(s), dispatch {:.3}, compute {:.3}{}, memory {:.3}, copy {:.3}, host side {:.3}]",
                    if p.ane_measured {
                        "measured"
                    } else {
                        "predicted"
                    },
                    a.total_ms,
                    a.calls,
                    a.dispatch_ms,
                    a.compute_ms,
                    if a.k_cliff { " (past the K cliff)" } else { "" },
                    a.memory_ms,
                    a.copy_ms,
                    a.host_side_ms
                );
            }
            _ => s.push_str(": ane never predicted profitable (reference executor)"),
        }
        match (p.host_model, p.host_ms) {
            (Some(h), Some(ms)) => {
                let _ = write!(
                    s,
                    " vs host {ms:.3} ms {} [model {:.3}: compute {:.3}, memory {:.3}]",
                    if p.host_measured {
                        "measured"
                    } else {
                        "predicted"
                    },
                    h.total_ms,
                    h.compute_ms,
                    h.memory_ms
                );
            }
            (None, Some(ms)) => {
                let _ = write!(s, " vs host {ms:.3} ms measured");
            }
            _ => {}
        }
        let _ = write!(s, " -> {}", d.as_str());
        match d {
            Decision::Ane => {
                if let (Some(a), Some(h)) = (p.ane_ms, p.host_ms) {
                    let _ = write!(s, " ({:.2}x host speed)", h / a);
                } else if mode == Mode::Always {
                    s.push_str(" (mode always)");
                }
            }
            Decision::Host(r) => {
                let why = match r {
                    Reason::SmallBatch => format!("m {} < min {}", shape.m, self.min_m()),
                    Reason::ShapeDisabled => format!("{} faults", self.fault_count(shape)),
                    Reason::OsTooOld => facts.os_too_old().unwrap_or_default(),
                    Reason::OldChip => "M1/M2/A14-A16 are not targeted".into(),
                    Reason::NotProfitable => match (p.ane_ms, p.host_ms) {
                        (Some(a), Some(h)) if mode == Mode::Energy => {
                            format!(
                                "ane {:.2}x host time > factor {:.2}",
                                a / h,
                                self.energy_factor()
                            )
                        }
                        (Some(a), Some(h)) => format!("ane {:.2}x host time", a / h),
                        _ => "reference executor".into(),
                    },
                    _ => String::new(),
                };
                if !why.is_empty() {
                    let _ = write!(s, " ({why})");
                }
            }
        }
        s
    }

    /// The decision; `transient` includes the device state (thermal, power, background). Returns the
    /// prediction when the cost rule was reached. `host_kind`: see [`HostKind`].
    fn evaluate(
        &self,
        shape: &MatmulShape,
        variant: Variant,
        transient: bool,
        host_kind: HostKind,
        per_call_prepare: bool,
    ) -> (Decision, Option<Prediction>) {
        let host = |r| (Decision::Host(r), None);
        if shape.m == 0 || shape.k == 0 || shape.n == 0 {
            return host(Reason::BadShape);
        }
        let mode = self.mode();
        if mode == Mode::Off {
            return host(Reason::ModeOff);
        }
        let faults = read(&self.faults)
            .get(&fault_key(shape))
            .copied()
            .unwrap_or(0);
        if faults >= self.max_faults() {
            return host(Reason::ShapeDisabled);
        }
        let (class, ane, os_old) = {
            let d = read(&self.device);
            (d.facts.class, d.facts.ane, d.facts.os_too_old().is_some())
        };
        if class != DeviceClass::Reference {
            if !ane {
                return host(Reason::ExecutorUnavailable);
            }
            if os_old {
                return host(Reason::OsTooOld);
            }
        }
        if mode == Mode::Always {
            if shape.m < self.always_min_m.load(Ordering::Relaxed) {
                return host(Reason::SmallBatch);
            }
            return (Decision::Ane, None);
        }
        let Some(chip) = class.chip() else {
            return host(Reason::NotProfitable);
        };
        if !chip.supported() {
            return host(Reason::OldChip);
        }
        if transient {
            let st = self.device_state();
            // A GPU host is not a refuge in the background: iOS aborts its work. Only a CPU host is.
            if st.background && host_kind == HostKind::Cpu {
                return host(Reason::Background);
            }
            if st.thermal == Thermal::Critical
                || (mode == Mode::Latency && st.thermal == Thermal::Serious)
            {
                return host(Reason::Thermal);
            }
            if mode == Mode::Latency && st.low_power {
                return host(Reason::LowPower);
            }
        }
        if shape.m < self.min_m() {
            return host(Reason::SmallBatch);
        }
        let p = self.predict_with(shape, variant, per_call_prepare);
        let win = match (p.ane_ms, p.host_ms) {
            (Some(a), Some(h)) => match mode {
                Mode::Energy => a <= self.energy_factor() * h,
                _ => a < h,
            },
            _ => false,
        };
        (
            if win {
                Decision::Ane
            } else {
                Decision::Host(Reason::NotProfitable)
            },
            Some(p),
        )
    }
}

fn default_facts(accelerated: bool) -> DeviceFacts {
    if accelerated {
        DeviceFacts::apple_unknown()
    } else {
        DeviceFacts::reference()
    }
}
