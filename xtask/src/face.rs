//! How "ours" runs in `cargo xtask parity` and `cargo xtask bench`: which of the library's device faces it
//! goes through (docs/architecture.md, "Two faces, one router"), a clean environment for every child, and
//! what the library's statistics file says it did. The stock side never loads the library.

use std::process::Command;

use serde::{Deserialize, Serialize};

/// The inner device the hybrid face wraps on this host (Linux has only the CPU device).
pub const HYBRID_INNER: &str = "CPU";
/// The device llama.cpp is told to put its layers on for the hybrid face.
pub const HYBRID_DEVICE: &str = "CoreML-CPU";

#[derive(
    clap::ValueEnum,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Face {
    /// The ACCEL device `CoreML`: layers stay on the CPU (`-ngl 0`), llama.cpp offers us their weights.
    #[default]
    Accel,
    /// The hybrid device `CoreML-CPU`: `GGML_COREML_HYBRID=CPU`, `--device CoreML-CPU -ngl 99`.
    Hybrid,
}

impl Face {
    pub fn name(self) -> &'static str {
        match self {
            Face::Accel => "accel",
            Face::Hybrid => "hybrid",
        }
    }

    /// Layer placement (and, for the hybrid face, the opt-in) for our side of a run; the caller adds
    /// `GGML_BACKEND_PATH` and the policy. `--device` is spelt the same by llama-bench and the common tools.
    pub fn ours(self, c: &mut Command) {
        match self {
            Face::Accel => {
                c.args(["-ngl", "0"]);
            }
            Face::Hybrid => {
                c.args(["-ngl", "99", "--device", HYBRID_DEVICE])
                    .env("GGML_COREML_HYBRID", HYBRID_INNER);
            }
        }
    }

    /// `-ngl` of the stock side: `0` next to the ACCEL face (as ours), `99` next to the hybrid face (as ours).
    pub fn stock_ngl(self) -> &'static str {
        match self {
            Face::Accel => "0",
            Face::Hybrid => "99",
        }
    }

    /// How a report names our side: the face and its switches.
    pub fn describe(self) -> String {
        match self {
            Face::Accel => "the ACCEL face `CoreML` (`-ngl 0`)".into(),
            Face::Hybrid => format!(
                "the hybrid face `{HYBRID_DEVICE}` (`GGML_COREML_HYBRID={HYBRID_INNER}`, `--device {HYBRID_DEVICE} -ngl 99`)"
            ),
        }
    }
}

/// Children get a known environment: no `GGML_BACKEND_PATH` or `GGML_COREML_*` from the caller's shell
/// (the shape cache and dev cache locations are kept).
pub fn clean_env(c: &mut Command) {
    c.env_remove("GGML_BACKEND_PATH");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("GGML_COREML_")
            && !k.starts_with("GGML_COREML_CACHE")
            && k != "GGML_COREML_DEV_CACHE"
        {
            c.env_remove(k.as_ref());
        }
    }
}

/// `ane_ops` (MUL_MATs that went through the executor) of a `GGML_COREML_STATS_FILE`, and the policy
/// the library reports.
pub fn read_stats(path: &std::path::Path) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((
        v.get("ane_ops")?.as_u64()?,
        v.get("policy")
            .and_then(|p| p.as_str())
            .unwrap_or("?")
            .to_string(),
    ))
}
