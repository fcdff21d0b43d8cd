//! Numeric checks of a program's results: deterministic inputs, the ideal product, agreement measures.
//!
//! Used by the CoreML executor's self-check (one per program on first load) and by the shared executor
//! test cases (`tests/common`). Pure and portable.
//!
//! Tolerances:
//! - [`SELF_CHECK_MAX_NMSE`] (1e-2) separates a broken program (wrong layout, transposed operand, wrong
//!   scale: NMSE ≈ 1 or more) from any plausible precision loss. It is not a precision bar.
//! - [`DEVICE_MAX_NMSE`] (5e-4, the test-backend-ops bar for MUL_MAT) is the precision bar of the
//!   shared executor cases and the on-device suite.

use std::fmt;

use half::f16;

use crate::{ProgramDesc, ProgramInputs, Variant};

/// Self-check: NMSE above this refuses the program.
pub const SELF_CHECK_MAX_NMSE: f64 = 1e-2;
/// Precision bar of the shared cases and the on-device suite (test-backend-ops' MUL_MAT bar).
pub const DEVICE_MAX_NMSE: f64 = 5e-4;
/// Programs up to this many multiply-adds are self-checked against the full reference run; larger ones
/// on [`SAMPLED_ENTRIES`] output entries computed ideally in f64 (the reference would take seconds).
pub const FULL_CHECK_MAX_MACS: usize = 1 << 28;
/// Output entries compared by a sampled check.
pub const SAMPLED_ENTRIES: usize = 512;

/// SplitMix64: small, fast, deterministic; good enough for test inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform integer in `-127..=127` (symmetric int8, as ggml's quantisers produce).
    pub fn i8_sym(&mut self) -> i8 {
        (self.below(255) as i32 - 127) as i8
    }

    /// Uniform in `[lo, hi)`.
    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
}

/// Inputs of one program call, owned, with the ideal result for comparisons.
#[derive(Clone, Debug)]
pub struct OwnedInputs {
    pub desc: ProgramDesc,
    pub w_i8: Vec<i8>,
    pub x_i8: Vec<i8>,
    pub w_f16: Vec<f16>,
    pub scales: Vec<f16>,
    pub offsets: Option<Vec<f16>>,
    pub x_f16: Vec<f16>,
    /// i8i8o: outlier weight columns `[N, c]`, outlier activations `[c, Mp]`, per-token factor `[Mp]`.
    pub wo_i8: Vec<i8>,
    pub xo_f16: Vec<f16>,
    pub t_f16: Vec<f16>,
}

impl OwnedInputs {
    /// Random inputs of the program's full shape. Magnitudes keep every intermediate well inside fp16:
    /// int8 operands use the full symmetric range (the i8i8 program scales both by 1/√K), block scales
    /// lie in [2⁻¹⁰, 2⁻⁶], offsets in ±2⁻⁴, fp16 operands in [-1, 1).
    pub fn random(desc: &ProgramDesc, seed: u64) -> OwnedInputs {
        let mut rng = Rng::new(seed ^ 0x6767_6d6c_636f_7265);
        let (n, k, m) = (desc.n, desc.k, desc.m);
        let mut o = OwnedInputs {
            desc: *desc,
            w_i8: Vec::new(),
            x_i8: Vec::new(),
            w_f16: Vec::new(),
            scales: Vec::new(),
            offsets: None,
            x_f16: Vec::new(),
            wo_i8: Vec::new(),
            xo_f16: Vec::new(),
            t_f16: Vec::new(),
        };
        fn f16s(len: usize, lo: f32, hi: f32, rng: &mut Rng) -> Vec<f16> {
            (0..len)
                .map(|_| f16::from_f32(rng.f32_in(lo, hi)))
                .collect()
        }
        match desc.variant {
            Variant::I8I8 => {
                o.w_i8 = (0..n * k).map(|_| rng.i8_sym()).collect();
                o.x_i8 = (0..k * m).map(|_| rng.i8_sym()).collect();
            }
            Variant::W8F16 => {
                let blocks = n * (k / desc.group.max(1));
                o.w_i8 = (0..n * k).map(|_| rng.i8_sym()).collect();
                o.scales = f16s(blocks, 1.0 / 1024.0, 1.0 / 64.0, &mut rng);
                if desc.offsets {
                    o.offsets = Some(f16s(blocks, -1.0 / 16.0, 1.0 / 16.0, &mut rng));
                }
                o.x_f16 = f16s(k * m, -1.0, 1.0, &mut rng);
            }
            Variant::F16 => {
                o.w_f16 = f16s(n * k, -1.0, 1.0, &mut rng);
                o.x_f16 = f16s(k * m, -1.0, 1.0, &mut rng);
            }
            Variant::I8I8O => {
                // As the host makes them: |xo| <= 127 / sqrt(K), t in (0, 1].
                let c = desc.group;
                let s = desc.i8_scale().to_f32() * 127.0;
                o.w_i8 = (0..n * k).map(|_| rng.i8_sym()).collect();
                o.x_i8 = (0..k * m).map(|_| rng.i8_sym()).collect();
                o.wo_i8 = (0..n * c).map(|_| rng.i8_sym()).collect();
                o.xo_f16 = f16s(c * m, -s, s, &mut rng);
                o.t_f16 = f16s(m, 1.0 / 64.0, 1.0, &mut rng);
            }
        }
        o
    }

    /// Borrowed view for [`crate::Executor::run`].
    pub fn inputs(&self) -> ProgramInputs<'_> {
        match self.desc.variant {
            Variant::I8I8 => ProgramInputs::I8I8 {
                w: &self.w_i8,
                x: &self.x_i8,
            },
            Variant::W8F16 => ProgramInputs::W8F16 {
                w: &self.w_i8,
                scales: &self.scales,
                offsets: self.offsets.as_deref(),
                x: &self.x_f16,
            },
            Variant::F16 => ProgramInputs::F16 {
                w: &self.w_f16,
                x: &self.x_f16,
            },
            Variant::I8I8O => ProgramInputs::I8I8O {
                w: &self.w_i8,
                x: &self.x_i8,
                wo: &self.wo_i8,
                xo: &self.xo_f16,
                t: &self.t_f16,
            },
        }
    }

    /// `y[n][m]` of the program's math in f64, without any fp16 rounding of intermediates.
    pub fn ideal(&self, n: usize, m: usize) -> f64 {
        let d = &self.desc;
        let (k, mp) = (d.k, d.m);
        // The exact int8 × int8 dot product of weight row n with token m.
        let dot = || -> i64 {
            self.w_i8[n * k..(n + 1) * k]
                .iter()
                .enumerate()
                .map(|(kk, &a)| i64::from(a) * i64::from(self.x_i8[kk * mp + m]))
                .sum()
        };
        match d.variant {
            Variant::I8I8O => {
                let s = f64::from(d.i8_scale().to_f32());
                let c = d.group;
                let outl: f64 = (0..c)
                    .map(|j| {
                        f64::from(self.wo_i8[n * c + j])
                            * s
                            * f64::from(self.xo_f16[j * mp + m].to_f32())
                    })
                    .sum();
                dot() as f64 * s * s * f64::from(self.t_f16[m].to_f32()) + outl
            }
            Variant::I8I8 => {
                let s = f64::from(d.i8_scale().to_f32());
                dot() as f64 * s * s
            }
            Variant::W8F16 => {
                let g = d.group.max(1);
                let blocks = k / g;
                let w = &self.w_i8[n * k..(n + 1) * k];
                w.iter()
                    .enumerate()
                    .map(|(kk, &q)| {
                        let b = n * blocks + kk / g;
                        let off = self
                            .offsets
                            .as_ref()
                            .map_or(0.0, |o| f64::from(o[b].to_f32()));
                        let wv = f64::from(self.scales[b].to_f32()) * f64::from(q) + off;
                        wv * f64::from(self.x_f16[kk * mp + m].to_f32())
                    })
                    .sum()
            }
            Variant::F16 => {
                let w = &self.w_f16[n * k..(n + 1) * k];
                w.iter()
                    .enumerate()
                    .map(|(kk, &a)| {
                        f64::from(a.to_f32()) * f64::from(self.x_f16[kk * mp + m].to_f32())
                    })
                    .sum()
            }
        }
    }

    /// Multiply-adds of one call.
    pub fn macs(&self) -> usize {
        self.desc
            .n
            .saturating_mul(self.desc.k)
            .saturating_mul(self.desc.m)
    }
}

/// How far one result is from another.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    /// Σ(a−r)² / Σr² over the compared entries (ggml test-backend-ops' definition).
    pub nmse: f64,
    pub max_abs_err: f64,
    pub max_abs_ref: f64,
    /// Entries where the result is NaN/∞ but the reference is finite.
    pub nonfinite: usize,
    pub compared: usize,
}

impl Agreement {
    pub fn within(&self, max_nmse: f64) -> bool {
        self.nonfinite == 0 && self.compared > 0 && self.nmse <= max_nmse
    }
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nmse {:.3e}, max |err| {:.3e} (max |ref| {:.3e}), {} non-finite, {} entries",
            self.nmse, self.max_abs_err, self.max_abs_ref, self.nonfinite, self.compared
        )
    }
}

/// Agreement of `actual` with `reference`, pairwise.
pub fn agreement(pairs: impl IntoIterator<Item = (f64, f64)>) -> Agreement {
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    let mut a = Agreement::default();
    for (r, x) in pairs {
        a.compared += 1;
        if !r.is_finite() {
            continue;
        }
        if !x.is_finite() {
            a.nonfinite += 1;
            continue;
        }
        let e = x - r;
        err2 += e * e;
        ref2 += r * r;
        a.max_abs_err = a.max_abs_err.max(e.abs());
        a.max_abs_ref = a.max_abs_ref.max(r.abs());
    }
    a.nmse = if ref2 > 0.0 { err2 / ref2 } else { err2 };
    a
}

/// Agreement of two fp16 outputs of the same shape (e.g. an executor against the reference executor).
pub fn compare_outputs(reference: &[f16], actual: &[f16]) -> Agreement {
    if reference.len() != actual.len() {
        return Agreement {
            nonfinite: actual.len().max(1),
            ..Agreement::default()
        };
    }
    agreement(
        reference
            .iter()
            .zip(actual)
            .map(|(r, a)| (f64::from(r.to_f32()), f64::from(a.to_f32()))),
    )
}

/// Agreement of an output `[N, Mp]` with the ideal f64 product: every entry, or `samples` entries drawn
/// with `seed` (the four corners always included).
pub fn compare_ideal(
    inputs: &OwnedInputs,
    actual: &[f16],
    samples: Option<usize>,
    seed: u64,
) -> Agreement {
    let (n, m) = (inputs.desc.n, inputs.desc.m);
    if actual.len() != n * m {
        return Agreement {
            nonfinite: actual.len().max(1),
            ..Agreement::default()
        };
    }
    let at = |ni: usize, mi: usize| {
        (
            inputs.ideal(ni, mi),
            f64::from(actual[ni * m + mi].to_f32()),
        )
    };
    match samples {
        None => agreement(
            (0..n)
                .flat_map(|ni| (0..m).map(move |mi| (ni, mi)))
                .map(|(ni, mi)| at(ni, mi)),
        ),
        Some(s) => {
            let mut rng = Rng::new(seed);
            let corners = [(0, 0), (0, m - 1), (n - 1, 0), (n - 1, m - 1)];
            let picks: Vec<(usize, usize)> = corners
                .into_iter()
                .chain((0..s).map(|_| (rng.below(n), rng.below(m))))
                .collect();
            agreement(picks.into_iter().map(|(ni, mi)| at(ni, mi)))
        }
    }
}

/// The speed check's verdict: the best time of the program loaded for the Neural Engine
/// (`CPUAndNeuralEngine`) against the best time of the same compiled model loaded `CPUOnly`. The
/// program is kept only when the Neural Engine is faster; otherwise it is refused (and the refusal
/// cached like a placement verdict), because a plan that names the Neural Engine is not proof that the
/// prediction ran there.
pub fn speed_verdict(ane_ms: f64, cpu_ms: f64) -> Result<String, String> {
    let line = format!("ane {ane_ms:.3} ms vs cpu-only {cpu_ms:.3} ms");
    if !(ane_ms.is_finite() && cpu_ms.is_finite()) || ane_ms <= 0.0 || cpu_ms <= 0.0 {
        return Err(format!("{line}: not measurable"));
    }
    if ane_ms < cpu_ms {
        Ok(format!("{line} ({:.2}x)", cpu_ms / ane_ms))
    } else {
        Err(format!("{line}: not faster than the CPU alone"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_verdict_keeps_only_faster_programs() {
        assert!(speed_verdict(0.5, 2.0).unwrap().contains("4.00x"));
        let why = speed_verdict(2.0, 2.0).unwrap_err();
        assert!(why.contains("not faster"), "{why}");
        assert!(speed_verdict(3.0, 1.0).is_err());
        assert!(
            speed_verdict(f64::NAN, 1.0)
                .unwrap_err()
                .contains("not measurable")
        );
        assert!(speed_verdict(0.0, 1.0).is_err());
    }

    fn desc(
        variant: Variant,
        m: usize,
        k: usize,
        n: usize,
        group: usize,
        offsets: bool,
    ) -> ProgramDesc {
        ProgramDesc {
            variant,
            m,
            k,
            n,
            group,
            offsets,
        }
    }

    #[test]
    fn inputs_match_the_program_contract() {
        for d in [
            desc(Variant::I8I8, 64, 64, 8, 0, false),
            desc(Variant::W8F16, 64, 64, 8, 32, true),
            desc(Variant::W8F16, 64, 64, 8, 16, false),
            desc(Variant::F16, 64, 32, 8, 0, false),
            desc(Variant::I8I8O, 64, 64, 8, 4, false),
        ] {
            let o = OwnedInputs::random(&d, 1);
            o.inputs().check(&d).unwrap();
            assert_eq!(OwnedInputs::random(&d, 1).inputs().variant(), d.variant);
        }
    }

    #[test]
    fn deterministic_and_seeded() {
        let d = desc(Variant::I8I8, 64, 32, 4, 0, false);
        assert_eq!(
            OwnedInputs::random(&d, 7).w_i8,
            OwnedInputs::random(&d, 7).w_i8
        );
        assert_ne!(
            OwnedInputs::random(&d, 7).w_i8,
            OwnedInputs::random(&d, 8).w_i8
        );
        let mut r = Rng::new(3);
        assert!((0..10_000).map(|_| r.i8_sym()).all(|v| v >= -127));
        let mut r = Rng::new(3);
        assert!(
            (0..10_000)
                .map(|_| r.f32_in(-1.0, 1.0))
                .all(|v| (-1.0..1.0).contains(&v))
        );
    }

    #[test]
    fn ideal_i8i8_is_the_scaled_integer_product() {
        let d = desc(Variant::I8I8, 64, 16, 2, 0, false);
        let mut o = OwnedInputs::random(&d, 1);
        o.w_i8.fill(2);
        o.x_i8.fill(-3);
        let s = f64::from(d.i8_scale().to_f32());
        assert_eq!(o.ideal(1, 5), -6.0 * 16.0 * s * s);
    }

    /// The reference interpreter's run of an i8i8o program is the ideal product up to fp16 rounding
    /// (the int8 part exact, the outlier part and the per-token factor in fp16).
    #[test]
    fn reference_i8i8o_is_the_ideal_product() {
        use crate::Executor;
        let exec = crate::reference::ReferenceExecutor::new();
        for d in [
            desc(Variant::I8I8O, 64, 640, 24, 32, false),
            desc(Variant::I8I8O, 128, 96, 7, 1, false),
            desc(Variant::I8I8O, 64, 32, 3, 32, false),
        ] {
            let o = OwnedInputs::random(&d, 9);
            let mut y = vec![f16::ZERO; d.n * d.m];
            exec.run(&d, o.inputs(), crate::WeightPart::NONE, &mut y)
                .unwrap();
            let ideal: Vec<f16> = (0..d.n * d.m)
                .map(|i| f16::from_f64(o.ideal(i / d.m, i % d.m)))
                .collect();
            let a = compare_outputs(&ideal, &y);
            assert!(a.nmse < 1e-6, "{d}: {a:?}");
        }
    }

    #[test]
    fn ideal_w8f16_applies_block_scales_and_offsets() {
        let d = desc(Variant::W8F16, 64, 64, 1, 32, true);
        let mut o = OwnedInputs::random(&d, 1);
        o.w_i8.fill(1);
        o.scales = vec![f16::from_f32(0.5), f16::from_f32(0.25)];
        o.offsets = Some(vec![f16::from_f32(1.0), f16::ZERO]);
        o.x_f16.fill(f16::ONE);
        assert_eq!(o.ideal(0, 0), 32.0 * 1.5 + 32.0 * 0.25);
    }

    #[test]
    fn agreement_measures() {
        let r = [f16::from_f32(1.0), f16::from_f32(-2.0)];
        assert_eq!(compare_outputs(&r, &r).nmse, 0.0);
        assert!(compare_outputs(&r, &r).within(DEVICE_MAX_NMSE));
        let broken = [f16::from_f32(-1.0), f16::from_f32(2.0)];
        let a = compare_outputs(&r, &broken);
        assert!((a.nmse - 4.0).abs() < 1e-12 && !a.within(SELF_CHECK_MAX_NMSE));
        let nan = [f16::NAN, f16::from_f32(-2.0)];
        assert_eq!(compare_outputs(&r, &nan).nonfinite, 1);
        assert!(!compare_outputs(&r, &nan).within(1.0));
        assert!(!compare_outputs(&r, &r[..1]).within(1.0));
        assert!(
            !agreement(std::iter::empty()).within(1.0),
            "nothing compared is not agreement"
        );
    }

    #[test]
    fn ideal_comparison_catches_a_transposed_result() {
        let d = desc(Variant::F16, 64, 64, 64, 0, false);
        let o = OwnedInputs::random(&d, 5);
        let good: Vec<f16> = (0..64 * 64)
            .map(|i| f16::from_f64(o.ideal(i / 64, i % 64)))
            .collect();
        assert!(compare_ideal(&o, &good, None, 0).within(1e-6));
        assert!(compare_ideal(&o, &good, Some(100), 9).within(1e-6));
        let transposed: Vec<f16> = (0..64 * 64).map(|i| good[(i % 64) * 64 + i / 64]).collect();
        assert!(
            !compare_ideal(&o, &transposed, Some(SAMPLED_ENTRIES), 9).within(SELF_CHECK_MAX_NMSE)
        );
    }
}
