//! Scheduling policy: which MUL_MATs go to the ANE, and why the others stay on the host.
//!
//! Pure logic over shapes and device facts; table-tested. The backend asks [`Policy::decide`] once per
//! MUL_MAT and [`Policy::would_offload_weight`] at weight placement.

use std::sync::atomic::{AtomicU8, Ordering};

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
        Mode::ALL.into_iter().find(|m| m.name().eq_ignore_ascii_case(s))
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

/// Why an op stays on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    ModeOff,
    NotProfitable,
    ExecutorUnavailable,
    ShapeDisabled,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ModeOff => "policy off",
            Reason::NotProfitable => "not profitable",
            Reason::ExecutorUnavailable => "executor unavailable",
            Reason::ShapeDisabled => "shape disabled after faults",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Ane,
    Host(Reason),
}

/// The policy shared by every backend instance of the process.
pub struct Policy {
    mode: AtomicU8,
    /// True when the executor is real accelerator hardware that may win.
    accelerated: bool,
}

impl Policy {
    pub fn new(mode: Mode, accelerated: bool) -> Policy {
        Policy { mode: AtomicU8::new(mode.to_u8()), accelerated }
    }

    /// Mode from `GGML_COREML_POLICY` (default `latency`); an unknown value keeps the default.
    pub fn from_env(accelerated: bool) -> (Policy, Option<String>) {
        let (mode, warning) = match std::env::var("GGML_COREML_POLICY") {
            Ok(v) => match Mode::parse(&v) {
                Some(m) => (m, None),
                None => (
                    Mode::Latency,
                    Some(format!("GGML_COREML_POLICY={v} is not one of latency, energy, off, always; using latency")),
                ),
            },
            Err(_) => (Mode::Latency, None),
        };
        (Policy::new(mode, accelerated), warning)
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    pub fn set_mode(&self, m: Mode) {
        self.mode.store(m.to_u8(), Ordering::Relaxed);
    }

    pub fn decide(&self, shape: &MatmulShape) -> Decision {
        match self.mode() {
            Mode::Off => Decision::Host(Reason::ModeOff),
            Mode::Always => Decision::Ane,
            Mode::Latency | Mode::Energy => {
                if !self.accelerated {
                    Decision::Host(Reason::NotProfitable)
                } else if shape.m >= 256 {
                    Decision::Ane
                } else {
                    Decision::Host(Reason::NotProfitable)
                }
            }
        }
    }

    /// At weight placement: could any MUL_MAT over this weight ever go to the ANE under the current mode?
    /// If not, llama.cpp should keep the weight in its own CPU buffers (CPU_REPACK included).
    pub fn would_offload_weight(&self, _k: usize, _n: usize) -> bool {
        match self.mode() {
            Mode::Off => false,
            Mode::Always => true,
            Mode::Latency | Mode::Energy => self.accelerated,
        }
    }
}
