//! Settings from the environment. Bad values never panic: the default is used and a warning returned.

use crate::Mode;
use crate::device::ChipGen;

pub const ENV_POLICY: &str = "GGML_COREML_POLICY";
pub const ENV_ENERGY_FACTOR: &str = "GGML_COREML_ENERGY_FACTOR";
pub const ENV_MIN_M: &str = "GGML_COREML_MIN_M";
pub const ENV_UBATCH: &str = "GGML_COREML_UBATCH";
pub const ENV_MAX_FAULTS: &str = "GGML_COREML_MAX_FAULTS";
pub const ENV_CHIP: &str = "GGML_COREML_CHIP";

/// Energy factor on a Mac: a user waits on prefill, so only a modest slowdown is traded for energy.
pub const ENERGY_FACTOR_MAC: f64 = 1.5;
/// On a phone: GPU runtimes keep 38–48 % of their burst speed after 10 min, the ANE 67 % (perf #21),
/// so an op up to ≈ 1.4–1.8× slower at burst is not slower sustained; 2.0 adds the energy margin.
pub const ENERGY_FACTOR_MOBILE: f64 = 2.0;
pub const ENERGY_FACTOR_RANGE: (f64, f64) = (1.0, 10.0);
/// llama.cpp's default `n_ubatch`.
pub const DEFAULT_UBATCH: usize = 512;
pub const DEFAULT_MAX_FAULTS: u32 = 3;
/// Largest accepted `GGML_COREML_MIN_M` / `GGML_COREML_UBATCH`.
pub const MAX_TOKENS: usize = 1 << 20;

/// Policy settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// `None`: the device class default ([`ENERGY_FACTOR_MAC`] / [`ENERGY_FACTOR_MOBILE`]).
    pub energy_factor: Option<f64>,
    /// Fewer tokens than this stay on the host in `latency` and `energy` (the cost model must also agree).
    pub min_m: usize,
    /// The largest M the backend expects; used at weight placement.
    pub ubatch: usize,
    /// Executor faults after which a shape is disabled for the process.
    pub max_faults: u32,
    /// Overrides the detected chip (a chip the tables do not know yet, or experiments).
    pub chip: Option<ChipGen>,
    /// `GGML_COREML_MIN_M` was set explicitly: then mode `always` also keeps smaller M on the host (to
    /// test prefill-only offload, e.g. decode graphs going unsplit through the hybrid face).
    pub always_min_m: Option<usize>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Latency,
            energy_factor: None,
            min_m: crate::cost::DRAW_THINGS_MIN_M,
            ubatch: DEFAULT_UBATCH,
            max_faults: DEFAULT_MAX_FAULTS,
            chip: None,
            always_min_m: None,
        }
    }
}

impl Settings {
    /// From the process environment.
    pub fn from_env() -> (Settings, Vec<String>) {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any lookup (tests inject one). Unset or empty values keep the default silently; bad ones
    /// keep the default and add a warning.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> (Settings, Vec<String>) {
        let mut s = Settings::default();
        let mut warnings = Vec::new();
        let var = |name: &str| {
            get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        if let Some(v) = var(ENV_POLICY) {
            match Mode::parse(&v) {
                Some(m) => s.mode = m,
                None => warnings.push(format!(
                    "{ENV_POLICY}={v} is not one of latency, energy, off, always; using latency"
                )),
            }
        }
        if let Some(v) = var(ENV_ENERGY_FACTOR) {
            let (lo, hi) = ENERGY_FACTOR_RANGE;
            match v.parse::<f64>() {
                Ok(f) if f.is_finite() && (lo..=hi).contains(&f) => s.energy_factor = Some(f),
                _ => warnings.push(format!(
                    "{ENV_ENERGY_FACTOR}={v} is not a number in [{lo}, {hi}]; using the device default \
                     ({ENERGY_FACTOR_MAC} on a Mac, {ENERGY_FACTOR_MOBILE} on iPhone/iPad)"
                )),
            }
        }
        let count = |name: &str, default: usize, warnings: &mut Vec<String>| -> usize {
            match var(name) {
                None => default,
                Some(v) => {
                    match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_TOKENS).contains(&n) => n,
                        _ => {
                            warnings.push(format!("{name}={v} is not a token count in [1, {MAX_TOKENS}]; using {default}"));
                            default
                        }
                    }
                }
            }
        };
        let before = warnings.len();
        s.min_m = count(ENV_MIN_M, s.min_m, &mut warnings);
        if var(ENV_MIN_M).is_some() && warnings.len() == before {
            s.always_min_m = Some(s.min_m);
        }
        s.ubatch = count(ENV_UBATCH, s.ubatch, &mut warnings);
        if let Some(v) = var(ENV_MAX_FAULTS) {
            match v.parse::<u32>() {
                Ok(n) if (1..=1_000_000).contains(&n) => s.max_faults = n,
                _ => warnings.push(format!(
                    "{ENV_MAX_FAULTS}={v} is not a count in [1, 1000000]; using {DEFAULT_MAX_FAULTS}"
                )),
            }
        }
        if let Some(v) = var(ENV_CHIP) {
            match ChipGen::parse(&v) {
                Some(c) => s.chip = Some(c),
                None => warnings.push(format!(
                    "{ENV_CHIP}={v} is not a known chip (e.g. \"M4 Pro\", \"A18\", \"iPhone16,1\"); using the detected one"
                )),
            }
        }
        (s, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> (Settings, Vec<String>) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_when_unset_or_empty() {
        assert_eq!(parse(&[]), (Settings::default(), vec![]));
        assert_eq!(
            parse(&[(ENV_POLICY, ""), (ENV_MIN_M, "  ")]),
            (Settings::default(), vec![])
        );
    }

    #[test]
    fn good_values() {
        let (s, w) = parse(&[
            (ENV_POLICY, " Energy "),
            (ENV_ENERGY_FACTOR, "2.5"),
            (ENV_MIN_M, "16"),
            (ENV_UBATCH, "2048"),
            (ENV_MAX_FAULTS, "5"),
            (ENV_CHIP, "Apple M4 Pro"),
        ]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            s,
            Settings {
                mode: Mode::Energy,
                energy_factor: Some(2.5),
                min_m: 16,
                ubatch: 2048,
                max_faults: 5,
                chip: Some(ChipGen::M4Pro),
                always_min_m: Some(16),
            }
        );
    }

    #[test]
    fn bad_values_warn_and_default() {
        let cases: &[(&str, &str)] = &[
            (ENV_POLICY, "fastest"),
            (ENV_ENERGY_FACTOR, "abc"),
            (ENV_ENERGY_FACTOR, "0.5"),
            (ENV_ENERGY_FACTOR, "NaN"),
            (ENV_ENERGY_FACTOR, "inf"),
            (ENV_ENERGY_FACTOR, "1e300"),
            (ENV_MIN_M, "-1"),
            (ENV_MIN_M, "0"),
            (ENV_MIN_M, "12.5"),
            (ENV_MIN_M, "99999999999999999999999"),
            (ENV_UBATCH, "lots"),
            (ENV_MAX_FAULTS, "0"),
            (ENV_MAX_FAULTS, "-3"),
            (ENV_CHIP, "Pentium"),
        ];
        for &(k, v) in cases {
            let (s, w) = parse(&[(k, v)]);
            assert_eq!(s, Settings::default(), "{k}={v}");
            assert_eq!(w.len(), 1, "{k}={v}: {w:?}");
            assert!(w[0].starts_with(k), "{}", w[0]);
        }
        // Several bad values: one warning each, good ones still apply.
        let (s, w) = parse(&[(ENV_POLICY, "x"), (ENV_MIN_M, "y"), (ENV_UBATCH, "1024")]);
        assert_eq!(w.len(), 2);
        assert_eq!(s.ubatch, 1024);
    }
}
