//! Projected prefill speed-up per chip — a projection from public figures (the cost model), not a
//! measurement. Used by the benchmark work and docs/policy.md.

use ggml_coreml_program::Variant;

use crate::cost::{HOST_MATMUL_SHARE, PP4096_TIME_FACTOR};
use crate::device::{ChipGen, DeviceFacts};
use crate::settings::{DEFAULT_UBATCH, Settings};
use crate::{Decision, MatmulShape, Mode, Policy};

/// Projected weight-matmul time for a prompt, with and without the ANE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Projection {
    pub chip: ChipGen,
    /// Prompt tokens.
    pub tokens: usize,
    pub ubatch: usize,
    pub variant: Variant,
    /// Weight matmuls with the `latency` routing (ANE where predicted faster, host elsewhere), ms.
    pub ane_ms: f64,
    /// Weight matmuls all on the host (Metal), ms.
    pub host_ms: f64,
    /// `host_ms / ane_ms`.
    pub speedup: f64,
    /// Matmuls routed to the ANE, out of `total`.
    pub offloaded: usize,
    pub total: usize,
    /// Everything else in the host's prefill (attention, norms…), unchanged by the ANE, ms.
    pub host_other_ms: f64,
    /// Whole-prefill speed-up: `(host_ms + other) / (ane_ms + other)`.
    pub end_to_end: f64,
}

/// Share of host prefill time in weight matmuls at `tokens` of context: [`HOST_MATMUL_SHARE`] at
/// pp512, falling as attention grows (pp4096 takes [`PP4096_TIME_FACTOR`] × the per-token time).
pub fn matmul_share(tokens: usize) -> f64 {
    let grow = (tokens.saturating_sub(512)) as f64 / (4096.0 - 512.0);
    HOST_MATMUL_SHARE / (1.0 + (PP4096_TIME_FACTOR - 1.0) * grow)
}

/// Projection for a prompt of `m` tokens in llama.cpp's default ubatches of 512, int8 × int8 programs.
/// `dims` are the model's weight matmuls as (K, N) — e.g. [`crate::ModelDims::matmuls`].
pub fn project_speedup(chip: ChipGen, dims: &[(usize, usize)], m: usize) -> Projection {
    project_speedup_with(chip, dims, m, DEFAULT_UBATCH, Variant::I8I8)
}

pub fn project_speedup_with(
    chip: ChipGen,
    dims: &[(usize, usize)],
    m: usize,
    ubatch: usize,
    variant: Variant,
) -> Projection {
    let ubatch = ubatch.max(1);
    let policy = Policy::with_settings(
        &Settings {
            mode: Mode::Latency,
            ..Settings::default()
        },
        DeviceFacts::for_chip(chip),
    );
    let (mut ane_ms, mut host_ms, mut offloaded, mut total) = (0.0, 0.0, 0, 0);
    let mut left = m;
    while left > 0 {
        let mb = left.min(ubatch);
        left -= mb;
        for &(k, n) in dims {
            let shape = MatmulShape { m: mb, k, n };
            let p = policy.predict(&shape, variant);
            let h = p.host_ms.unwrap_or(0.0);
            host_ms += h;
            total += 1;
            match (policy.decide_for(&shape, variant), p.ane_ms) {
                (Decision::Ane, Some(a)) => {
                    ane_ms += a;
                    offloaded += 1;
                }
                _ => ane_ms += h,
            }
        }
    }
    let host_other_ms = host_ms * (1.0 / matmul_share(m) - 1.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 1.0 };
    Projection {
        chip,
        tokens: m,
        ubatch,
        variant,
        ane_ms,
        host_ms,
        speedup: ratio(host_ms, ane_ms),
        offloaded,
        total,
        host_other_ms,
        end_to_end: ratio(host_ms + host_other_ms, ane_ms + host_other_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelDims;

    #[test]
    fn share_falls_with_context() {
        assert!((matmul_share(512) - HOST_MATMUL_SHARE).abs() < 1e-12);
        assert!((matmul_share(4096) - HOST_MATMUL_SHARE / PP4096_TIME_FACTOR).abs() < 1e-12);
        assert!(matmul_share(100) == HOST_MATMUL_SHARE);
    }

    #[test]
    fn projection_is_consistent() {
        let dims = ModelDims::LLAMA3_8B.matmuls();
        let p = project_speedup(ChipGen::M4, &dims, 4096);
        assert_eq!(p.total, 8 * dims.len());
        assert!(p.speedup >= 1.0 && p.end_to_end >= 1.0 && p.end_to_end <= p.speedup);
        // Old chips and empty prompts project no change.
        let old = project_speedup(ChipGen::M2, &dims, 4096);
        assert_eq!((old.offloaded, old.speedup), (0, 1.0));
        let empty = project_speedup(ChipGen::M4, &dims, 0);
        assert_eq!((empty.total, empty.speedup), (0, 1.0));
    }
}
