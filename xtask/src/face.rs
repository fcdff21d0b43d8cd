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

/// The `memory` section of a `GGML_COREML_STATS_FILE` (crates/ggml-coreml/src/stats.rs): the library's
/// accounted bytes. Every field is optional so an older library, or a counter it does not write, reads as
/// "n/a" rather than failing a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub raw_owned_mib: Option<f64>,
    pub raw_borrowed_mib: Option<f64>,
    pub raw_released_mib: Option<f64>,
    pub prepared_mib: Option<f64>,
    pub prepared_per_call: Option<u64>,
    pub sliced_calls: Option<u64>,
    pub slice_peak_mib: Option<f64>,
    pub executor_surfaces_mib: Option<f64>,
    pub executor_weight_surfaces_mib: Option<f64>,
    pub executor_io_surfaces_mib: Option<f64>,
    /// Executor counters: weight-side inputs kept and let go with their prepared form, fills and
    /// budget evictions (`Executor::surface_bytes`).
    pub executor_weight_inputs: Option<u64>,
    pub executor_weight_inputs_forgotten: Option<u64>,
    pub weight_fills: Option<u64>,
    pub surface_evictions: Option<u64>,
    pub programs_in_memory: Option<u64>,
    /// Numeric keys of the section this reader does not name yet, kept for report.json.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub other: std::collections::BTreeMap<String, f64>,
}

impl Memory {
    /// From the whole statistics JSON; `None` without a `memory` object.
    pub fn from_stats(v: &serde_json::Value) -> Option<Memory> {
        let m = v.get("memory")?.as_object()?;
        let f = |k: &str| m.get(k).and_then(|x| x.as_f64());
        let u = |k: &str| m.get(k).and_then(|x| x.as_u64());
        const NAMED: [&str; 15] = [
            "raw_owned_mib",
            "raw_borrowed_mib",
            "raw_released_mib",
            "prepared_mib",
            "prepared_per_call",
            "sliced_calls",
            "slice_peak_mib",
            "executor_surfaces_mib",
            "executor_weight_surfaces_mib",
            "executor_io_surfaces_mib",
            "executor_weight_inputs",
            "executor_weight_inputs_forgotten",
            "executor_weight_fills",
            "executor_surface_evictions",
            "programs_in_memory",
        ];
        Some(Memory {
            raw_owned_mib: f("raw_owned_mib"),
            raw_borrowed_mib: f("raw_borrowed_mib"),
            raw_released_mib: f("raw_released_mib"),
            prepared_mib: f("prepared_mib"),
            prepared_per_call: u("prepared_per_call"),
            sliced_calls: u("sliced_calls"),
            slice_peak_mib: f("slice_peak_mib"),
            executor_surfaces_mib: f("executor_surfaces_mib"),
            executor_weight_surfaces_mib: f("executor_weight_surfaces_mib"),
            executor_io_surfaces_mib: f("executor_io_surfaces_mib"),
            executor_weight_inputs: u("executor_weight_inputs"),
            executor_weight_inputs_forgotten: u("executor_weight_inputs_forgotten"),
            weight_fills: u("executor_weight_fills"),
            surface_evictions: u("executor_surface_evictions"),
            programs_in_memory: u("programs_in_memory"),
            other: m
                .iter()
                .filter(|(k, _)| !NAMED.contains(&k.as_str()))
                .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                .collect(),
        })
    }
}

/// The `memory` section of a statistics file; `None` if the file is missing, not JSON or has no section.
pub fn read_memory(path: &std::path::Path) -> Option<Memory> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Memory::from_stats(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file as the library writes it (stats.rs `to_json`, trimmed to what matters here).
    const STATS: &str = r#"{"policy":"always","executor":"coreml","ane_ops":1512,"ane_ms":812.402,
        "memory":{"raw_owned_mib":0.0,"raw_borrowed_mib":161.2,"raw_released_mib":158.9,"prepared_mib":301.5,
        "prepared_per_call":0,"sliced_calls":0,"slice_peak_mib":0.00,"executor_surfaces_mib":322.7,
        "executor_weight_surfaces_mib":301.5,"executor_io_surfaces_mib":21.2},"split_nodes":0}"#;

    #[test]
    fn reads_the_memory_section() {
        let v: serde_json::Value = serde_json::from_str(STATS).unwrap();
        let m = Memory::from_stats(&v).unwrap();
        assert_eq!(m.prepared_mib, Some(301.5));
        assert_eq!(m.raw_released_mib, Some(158.9));
        assert_eq!(m.raw_borrowed_mib, Some(161.2));
        assert_eq!(m.executor_surfaces_mib, Some(322.7));
        assert_eq!(m.executor_weight_surfaces_mib, Some(301.5));
        assert_eq!(m.executor_io_surfaces_mib, Some(21.2));
        assert_eq!((m.prepared_per_call, m.sliced_calls), (Some(0), Some(0)));
        // Not written by an older library: n/a, not an error.
        assert_eq!((m.weight_fills, m.surface_evictions), (None, None));
        assert!(m.other.is_empty());
    }

    #[test]
    fn reads_counters_and_unknown_keys_where_present() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"memory":{"prepared_mib":64.0,"executor_weight_fills":40,"future_mib":1.5,
                "executor_surface_evictions":7,"executor_weight_inputs":12}}"#,
        )
        .unwrap();
        let m = Memory::from_stats(&v).unwrap();
        assert_eq!((m.weight_fills, m.surface_evictions), (Some(40), Some(7)));
        assert_eq!(m.executor_weight_inputs, Some(12));
        assert_eq!(m.other.get("future_mib"), Some(&1.5));
        assert_eq!(m.executor_surfaces_mib, None);
    }

    #[test]
    fn missing_or_broken_statistics_are_none() {
        let v: serde_json::Value = serde_json::from_str(r#"{"ane_ops":3}"#).unwrap();
        assert_eq!(Memory::from_stats(&v), None);
        let dir = std::env::temp_dir().join(format!("xtask-face-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_memory(&dir.join("absent.json")), None);
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\"memory\":{").unwrap();
        assert_eq!(read_memory(&broken), None);
        let good = dir.join("good.json");
        std::fs::write(&good, STATS).unwrap();
        assert_eq!(read_memory(&good).unwrap().prepared_mib, Some(301.5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
