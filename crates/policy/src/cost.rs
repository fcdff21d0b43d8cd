//! The cost model: predicted milliseconds for one MUL_MAT on the ANE path and on the host, per chip,
//! from published figures. Every constant names its source: `perf #N` is row N of the key-numbers
//! table in performance-anchors.md §2, `perf §x` a section there, `ane §x` a section of coreml-ane.md.
//! Tags as there: [V] read in the source, [R] attributed, [D] derived (formula given), and [G] a guess
//! of ours with no public number behind it — the first thing a device measurement should replace.
//!
//! ANE path, per program call: `dispatch + max(compute, bytes the ANE moves / ANE bandwidth)`, plus
//! the host side once per MUL_MAT: the weight copy into the IOSurface (per call), activation
//! quantisation and transposes, the rescale of the output — at a host rate.
//! Host path: `max(2·M·K·N / Metal matmul rate, bytes / memory bandwidth)`.

use ggml_coreml_program::{ANE_MAX_DIM, M_BUCKETS, Variant, m_bucket};

use crate::device::ChipGen;

/// Published or derived numbers for one chip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChipSpec {
    pub chip: ChipGen,
    /// ANE fp16 matmul peak, TFLOPS.
    pub ane_fp16_tflops: f64,
    /// W8A8 (int8 × int8) over fp16 on the ANE; 1.0 where the chip has no int8-int8 path.
    pub int8_speedup: f64,
    /// ANE effective DRAM bandwidth, GB/s.
    pub ane_gbps: f64,
    /// SoC memory bandwidth (spec), GB/s.
    pub soc_gbps: f64,
    pub gpu_cores: u32,
    /// llama.cpp Metal whole-model throughput at pp512 as 2·params·tokens/s, TFLOPS (LLaMA-2-7B Q8_0
    /// basis: 2 · 6.74e9 · pp512). Divided by [`HOST_MATMUL_SHARE`] for the matmul-only rate.
    pub host_tflops: f64,
    /// Where each number comes from.
    pub sources: &'static str,
}

macro_rules! chip {
    ($chip:ident, $ane:expr, $i8:expr, $abw:expr, $soc:expr, $cores:expr, $host:expr, $src:expr) => {
        ChipSpec {
            chip: ChipGen::$chip,
            ane_fp16_tflops: $ane,
            int8_speedup: $i8,
            ane_gbps: $abw,
            soc_gbps: $soc,
            gpu_cores: $cores,
            host_tflops: $host,
            sources: $src,
        }
    };
}

/// The chip table. Columns: ANE fp16 TFLOPS, int8 speed-up, ANE GB/s, SoC GB/s, GPU cores, host
/// (Metal, pp512) TFLOPS. Mirrored in docs/policy.md.
pub const CHIPS: &[ChipSpec] = &[
    chip!(
        M1,
        11.0,
        1.0,
        58.0,
        68.0,
        8,
        1.81,
        "ANE 11 rated [R perf §5]; ANE BW 55-61 [V perf §5]; host [D] M1 Max 7.24 (perf #8) x 8/32 cores"
    ),
    chip!(
        M1Pro,
        11.0,
        1.0,
        110.0,
        200.0,
        16,
        3.62,
        "ANE [R perf §5]; ANE BW [G ~ M3 Max]; host [D] perf #8 x 16/32"
    ),
    chip!(
        M1Max,
        11.0,
        1.0,
        110.0,
        400.0,
        32,
        7.24,
        "ANE [R perf §5]; ANE BW [G]; host [D] 2*6.74e9*537.37 (perf #8)"
    ),
    chip!(
        M1Ultra,
        11.0,
        1.0,
        110.0,
        800.0,
        64,
        14.5,
        "ANE [R perf §5] (one ANE assumed [G]); ANE BW [G]; host [D] perf #8 x 2"
    ),
    chip!(
        M2,
        15.8,
        1.0,
        60.0,
        100.0,
        10,
        2.21,
        "ANE 15.8 rated [R perf §5]; ANE BW ~60 [V perf §5]; host [D] M2 Ultra 16.83 (perf §3.1) x 10/76"
    ),
    chip!(
        M2Pro,
        15.8,
        1.0,
        110.0,
        200.0,
        19,
        4.21,
        "ANE [R perf §5]; ANE BW [G]; host [D] perf §3.1 x 19/76"
    ),
    chip!(
        M2Max,
        15.8,
        1.0,
        110.0,
        400.0,
        38,
        8.42,
        "ANE [R perf §5]; ANE BW [G]; host [D] perf §3.1 x 38/76"
    ),
    chip!(
        M2Ultra,
        15.8,
        1.0,
        110.0,
        800.0,
        76,
        16.83,
        "ANE [R perf §5] (one ANE [G]); ANE BW [G]; host [D] 2*6.74e9*1248.59 (perf §3.1)"
    ),
    chip!(
        M3,
        16.8,
        1.0,
        63.1,
        100.0,
        10,
        2.53,
        "ANE 16.77 peak, M3 Pro (perf #15); no int8 boost (perf §1.2); ANE BW perf #16; host [D] 2*6.74e9*187.52 (perf #4)"
    ),
    chip!(
        M3Pro,
        16.8,
        1.0,
        90.0,
        150.0,
        18,
        4.55,
        "ANE perf #15; ANE BW [G] between M3 and M3 Max; host [D] perf #4 x 18/10"
    ),
    chip!(
        M3Max,
        16.8,
        1.0,
        120.2,
        400.0,
        40,
        10.21,
        "ANE perf #15; ANE BW perf #16; host [D] 2*6.74e9*757.64 (perf #6)"
    ),
    chip!(
        M3Ultra,
        16.8,
        1.0,
        120.0,
        819.0,
        80,
        20.4,
        "ANE perf #15 (one ANE [G]); ANE BW [G] ~ M3 Max; host [D] perf #6 x 2"
    ),
    chip!(
        M4,
        18.6,
        1.88,
        64.2,
        120.0,
        10,
        3.01,
        "ANE fp16 18.6, W8A8 35.1 (perf #13); ANE BW perf #16; host [D] 2*6.74e9*223.64 (perf #1)"
    ),
    chip!(
        M4Pro,
        18.6,
        1.88,
        126.4,
        273.0,
        20,
        6.06,
        "ANE perf #13; ANE BW perf #16; host [D] 2*6.74e9*449.62 (perf #5)"
    ),
    chip!(
        M4Max,
        18.6,
        1.88,
        118.9,
        546.0,
        40,
        12.02,
        "ANE perf #13; ANE BW perf #16; host [D] 2*6.74e9*891.94 (perf #7)"
    ),
    chip!(
        M5,
        18.0,
        1.88,
        70.2,
        153.0,
        10,
        8.20,
        "ANE fp16 17.99, W8A8 33.86 via Core ML (perf #14); ANE BW perf #16; host [D] 2*6.74e9*608.05 Q4_0 with tensor API (perf #11)"
    ),
    chip!(
        M5Pro,
        18.0,
        1.88,
        126.0,
        307.0,
        20,
        16.4,
        "ANE perf #14; ANE BW [G] ~ M4 Pro; SoC BW [G]; host [D] perf #11 x 2"
    ),
    chip!(
        M5Max,
        18.0,
        1.88,
        126.0,
        614.0,
        40,
        32.8,
        "ANE perf #14; ANE BW [G]; SoC BW [G]; host [D] perf #11 x 4 (cross-check: qwen35 0.8B pp512 ~17.4k on M5 Max, perf §3.3, ~28 TFLOPS)"
    ),
    chip!(
        A14,
        11.0,
        1.0,
        19.0,
        34.0,
        4,
        0.35,
        "ANE 11 rated [R]; BW and host [G] (unsupported generation)"
    ),
    chip!(
        A15,
        15.8,
        1.0,
        19.0,
        34.0,
        5,
        0.45,
        "ANE 15.8 rated [R]; BW and host [G] (unsupported generation)"
    ),
    chip!(
        A16,
        17.0,
        1.0,
        28.0,
        51.0,
        5,
        0.55,
        "ANE 17 rated [R perf §5]; BW and host [G] (unsupported generation)"
    ),
    chip!(
        A17Pro,
        17.1,
        1.88,
        28.0,
        51.0,
        6,
        0.70,
        "ANE [D] 35 TOPS rated x 18.6/38 (M4 fp16/rated); int8 path as M4 (ane §4.1, perf #28); SoC BW [D perf §5]; ANE BW [G] 0.55 x SoC; host [G] ~ A18 Pro"
    ),
    chip!(
        A18,
        17.1,
        1.88,
        33.0,
        60.0,
        5,
        0.63,
        "ANE [D] as A17 Pro; SoC BW perf §5; ANE BW [G] 0.55 x SoC; host [D] iPhone 16e (4-core GPU) Metal 126 t/s x 2 x 2e9 (Gemma 4 E2B, params assumed) = 0.50 x 5/4 (perf §3.5; its CPU reached 161 t/s)"
    ),
    chip!(
        A18Pro,
        17.1,
        1.88,
        33.0,
        60.0,
        6,
        0.76,
        "ANE [D] as A17 Pro; SoC BW perf §5; ANE BW [G]; host [D] A18 x 6/5 cores"
    ),
    chip!(
        A19,
        17.1,
        1.88,
        37.0,
        68.0,
        5,
        1.70,
        "ANE [G] as A18 (undisclosed, perf §5); BW [G]; host [G] A18 x 2.7 (tensor API, M5/M4 ratio perf #11 vs #2)"
    ),
    chip!(
        A19Pro,
        17.1,
        1.88,
        42.0,
        77.0,
        6,
        2.05,
        "ANE [G] as A18; BW [G]; host [G] A18 Pro x 2.7 (tensor API)"
    ),
];

impl ChipSpec {
    pub fn of(chip: ChipGen) -> &'static ChipSpec {
        CHIPS.iter().find(|s| s.chip == chip).unwrap_or(&CHIPS[0])
    }
}

/// Per CoreML prediction, ms: "near 0.2 ms", 0.38 ms measured (perf #30), ≈ 0.2 ms/kernel (perf #29),
/// 0.2–0.4 ms (ane §15). Midpoint.
pub const DISPATCH_MS: f64 = 0.3;
/// Share of ANE peak a Core ML matmul program reaches at large M: Draw Things ships assuming 20 TFLOPS
/// int8 (`kANEReferenceTFlops`, perf #32) against 35.1 TOPS peak (perf #13) [D: 20 / 35.1].
pub const COREML_EFFICIENCY: f64 = 0.57;
/// Token count at which the ANE reaches half its large-M rate: 64-wide convolutions run at ≈ 0.6–0.68
/// of peak, 2048-wide at ≈ 0.9 (perf #15) [D: fit of `M / (M + 32)`].
pub const ANE_M_HALF: f64 = 32.0;
/// Compute rate kept past the K cliff: ≈ 30 % SRAM cliff (perf §4.4, maderix), where Draw Things
/// splits K (ane §5) [D].
pub const K_CLIFF_RATE: f64 = 0.7;
/// Share of Metal prefill time spent in matmuls: 85–90 % (perf §6) [D].
pub const HOST_MATMUL_SHARE: f64 = 0.87;
/// Share of SoC bandwidth a Metal mat-vec reaches: tg128 Q8_0 on M4 ≈ 97 of 120 GB/s (perf §3.1) [D].
pub const HOST_BW_FRACTION: f64 = 0.8;
/// Share of SoC bandwidth a host memcpy into an IOSurface reaches [G].
pub const HOST_COPY_FRACTION: f64 = 0.5;
/// Host-side rate for activation quantisation, transposes and the rescale, GB/s of bytes touched [G:
/// replace with `cargo bench -p ggml-coreml-bridge` on the device, or let measurements take over].
pub const HOST_SIDE_GBPS_MAC: f64 = 20.0;
pub const HOST_SIDE_GBPS_MOBILE: f64 = 8.0;
/// Token count at which Metal's mat-mat kernels reach half their pp512 rate [G]; below ≈ 8 tokens
/// llama.cpp uses mat-vec kernels, bandwidth-bound (perf §3.3 PR #10581).
pub const HOST_M_HALF: f64 = 16.0;
/// Per host kernel launch, ms [G].
pub const HOST_KERNEL_MS: f64 = 0.01;
/// Bytes per weight the host reads for quantised weights (Q8_0: 34 bytes per 32; ggml-backend-abi §11).
pub const HOST_QUANT_BYTES_PER_WEIGHT: f64 = 34.0 / 32.0;
/// Host rate of the `i8i8r` activation rotation (signs with the 1/√b folded in, in-cache fast
/// Walsh–Hadamard butterflies), in f32 elements per ns per butterfly stage, one core. Measured on the
/// 2-vCPU Xeon of docs/parity.md at ≈ 0.7–0.9 while its cores were shared about four ways
/// (`cargo test --release -p ggml-coreml-bridge --lib rotate_speed -- --ignored --nocapture`);
/// an Apple P-core is put at 2 [G: replace with that test on the device]. One core, and each MUL_MAT
/// rotates its own input (q/k/v and gate/up could share one rotation: not done yet).
pub const ROTATION_ELEMS_PER_NS_STAGE: f64 = 2.0;
/// Largest rotation block of `i8i8r` (the bridge's `DEFAULT_MAX_BLOCK`).
pub const ROTATION_MAX_BLOCK: usize = 256;

/// Draw Things uses the ANE only from M = 256 (ane §5); the default `GGML_COREML_MIN_M`.
pub const DRAW_THINGS_MIN_M: usize = 256;
/// Metal pp4096 ≈ 0.8 × pp512 for 7–8B models (attention grows; perf §3.2) [D]: per-token time × 1.25.
pub const PP4096_TIME_FACTOR: f64 = 1.25;

/// Draw Things' measured K cliffs (ane §5): from Mp = 512, K above 3072 (Mp = 512), 2560 (Mp ≤ 1024),
/// 2688 (larger) runs slower unless split.
pub fn k_cliff(mp: usize, k: usize) -> bool {
    match mp {
        0..=511 => false,
        512 => k > 3072,
        513..=1024 => k > 2560,
        _ => k > 2688,
    }
}

/// Predicted cost of one MUL_MAT on the ANE path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AneCost {
    /// Program calls (M chunks × K parts × N parts).
    pub calls: usize,
    pub dispatch_ms: f64,
    /// Sum over calls of the matmul time at the ANE's rate.
    pub compute_ms: f64,
    /// Sum over calls of the ANE's DRAM traffic time.
    pub memory_ms: f64,
    /// Weight copies into the IOSurfaces.
    pub copy_ms: f64,
    /// Activation quantisation, transposes, rescale, K-part sums.
    pub host_side_ms: f64,
    /// Some call runs past the K cliff.
    pub k_cliff: bool,
    pub total_ms: f64,
}

/// Predicted cost of one MUL_MAT on the host (Metal).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostCost {
    pub compute_ms: f64,
    pub memory_ms: f64,
    pub total_ms: f64,
}

/// Bytes per element: (weight on the ANE, activation on the ANE, weight the host reads).
fn element_bytes(variant: Variant) -> (f64, f64, f64) {
    match variant {
        // int8 weights plus fp16 scales per 32.
        Variant::I8I8 | Variant::I8I8O => (1.0, 1.0, HOST_QUANT_BYTES_PER_WEIGHT),
        Variant::W8F16 => (1.0 + 2.0 / 32.0, 2.0, HOST_QUANT_BYTES_PER_WEIGHT),
        Variant::F16 => (2.0, 2.0, 2.0),
    }
}

/// Outlier channels of `i8i8o` for a row length `k`, as the driver picks them by default
/// (`ggml_coreml_executor::driver::outlier_channels`: `min(32, k / 8)`).
pub fn outlier_channels(k: usize) -> usize {
    OUTLIER_CHANNELS.min(k / 8)
}

/// The driver's default outlier channel budget.
pub const OUTLIER_CHANNELS: usize = 32;

/// M chunks as the program crate splits them, as (bucket, count): full largest buckets, then the
/// bucket of the rest. Counted, not listed, so an absurd M costs nothing to evaluate.
pub fn m_chunks(m: usize) -> [(usize, usize); 2] {
    let largest = *M_BUCKETS.last().unwrap_or(&4096);
    let rest = m % largest;
    [
        (largest, m / largest),
        (m_bucket(rest).unwrap_or(largest), usize::from(rest > 0)),
    ]
}

/// Padded token count of `m` (sum of its chunks' buckets).
pub fn padded_m(m: usize) -> usize {
    m_chunks(m).iter().fold(0usize, |acc, &(mp, c)| {
        acc.saturating_add(mp.saturating_mul(c))
    })
}

fn parts(len: usize) -> (usize, usize) {
    let count = len.div_ceil(ANE_MAX_DIM).max(1);
    (count, len.div_ceil(count))
}

/// The cost model of one chip. Fields are public so a device run can replace the guesses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    pub spec: ChipSpec,
    pub dispatch_ms: f64,
    pub host_side_gbps: f64,
}

impl CostModel {
    pub fn for_chip(chip: ChipGen) -> CostModel {
        CostModel {
            spec: *ChipSpec::of(chip),
            dispatch_ms: DISPATCH_MS,
            host_side_gbps: if chip.is_a_series() {
                HOST_SIDE_GBPS_MOBILE
            } else {
                HOST_SIDE_GBPS_MAC
            },
        }
    }

    /// ANE rate for one call of `mp` tokens and inner dimension `k`, TFLOPS.
    pub fn ane_tflops(&self, variant: Variant, mp: usize, k: usize) -> f64 {
        let int8 = if matches!(variant, Variant::I8I8 | Variant::I8I8O) {
            self.spec.int8_speedup
        } else {
            1.0
        };
        let mpf = mp as f64;
        let cliff = if k_cliff(mp, k) { K_CLIFF_RATE } else { 1.0 };
        self.spec.ane_fp16_tflops * int8 * COREML_EFFICIENCY * mpf / (mpf + ANE_M_HALF) * cliff
    }

    pub fn ane(&self, m: usize, k: usize, n: usize, variant: Variant) -> AneCost {
        if variant == Variant::I8I8O {
            return self.ane_outlier(m, k, n, outlier_channels(k));
        }
        let (wb, xb, _) = element_bytes(variant);
        let (kp, kl) = parts(k);
        let (np, nl) = parts(n);
        let (klf, nlf) = (kl as f64, nl as f64);
        let copy_gbps = (self.spec.soc_gbps * HOST_COPY_FRACTION).max(1e-3);
        let ane_gbps = self.spec.ane_gbps.max(1e-3);
        let mut c = AneCost {
            calls: 0,
            dispatch_ms: 0.0,
            compute_ms: 0.0,
            memory_ms: 0.0,
            copy_ms: 0.0,
            host_side_ms: 0.0,
            k_cliff: false,
            total_ms: 0.0,
        };
        let mut calls_ms = 0.0;
        for (mp, count) in m_chunks(m) {
            if count == 0 {
                continue;
            }
            let mpf = mp as f64;
            let per_call_compute = 2.0 * mpf * klf * nlf / (self.ane_tflops(variant, mp, kl) * 1e9);
            // In-program dequantisation of w8f16 materialises fp16 weights: 2 more bytes per weight [G].
            let dequant = if variant == Variant::W8F16 {
                2.0 * nlf * klf
            } else {
                0.0
            };
            let bytes = nlf * klf * wb + klf * mpf * xb + nlf * mpf * 2.0 + dequant;
            let per_call_mem = bytes / (ane_gbps * 1e6);
            let calls = kp.saturating_mul(np).saturating_mul(count);
            let cf = calls as f64;
            c.calls = c.calls.saturating_add(calls);
            c.k_cliff |= k_cliff(mp, kl);
            c.compute_ms += cf * per_call_compute;
            c.memory_ms += cf * per_call_mem;
            calls_ms += cf * (self.dispatch_ms + per_call_compute.max(per_call_mem));
            // Read + write of the weight into its IOSurface, per call.
            c.copy_ms += cf * 2.0 * nlf * klf * wb / (copy_gbps * 1e6);
        }
        c.dispatch_ms = c.calls as f64 * self.dispatch_ms;
        let (mf, kf, nf, mpt) = (m as f64, k as f64, n as f64, padded_m(m) as f64);
        // f32 activations in → [K, Mp] program input; fp16 [N, Mp] out → f32 [M, N]; K parts summed.
        let side = mf * kf * 4.0
            + kf * mpt * xb
            + nf * mpt * 2.0
            + mf * nf * 4.0
            + (kp - 1) as f64 * mf * nf * 8.0;
        c.host_side_ms = side / (self.host_side_gbps.max(1e-3) * 1e6);
        c.total_ms = calls_ms + c.copy_ms + c.host_side_ms;
        c
    }

    /// Host time of preparing an `n`×`k` weight for one call (bounded mode: the weight is not kept
    /// resident), ms: its ggml bytes read and its program form written at the host-side rate [D]. The
    /// cost of a weight made per call in slices; a resident weight pays it once, at load.
    pub fn prepare_ms(&self, k: usize, n: usize, variant: Variant) -> f64 {
        let (wb, _, hb) = element_bytes(variant);
        let elems = k as f64 * n as f64;
        elems * (wb + hb) / (self.host_side_gbps.max(1e-3) * 1e6)
    }

    /// Host time of rotating `m` tokens of `k` activations (`i8i8r`), ms: one pass over the f32
    /// activations (read, write) at the host-side rate, plus log2(block) butterfly stages.
    pub fn rotation_ms(&self, m: usize, k: usize) -> f64 {
        if m == 0 || k == 0 {
            return 0.0;
        }
        let block = (1usize << k.trailing_zeros()).min(ROTATION_MAX_BLOCK);
        let stages = block.trailing_zeros() as f64;
        let elems = m as f64 * k as f64;
        let pass = elems * 8.0 / (self.host_side_gbps.max(1e-3) * 1e6);
        pass + elems * stages / (ROTATION_ELEMS_PER_NS_STAGE * 1e6)
    }

    /// [`CostModel::ane`] of the `i8i8r` candidate: the i8i8 program (int8 rate where the chip has
    /// it) plus the host's activation rotation.
    pub fn ane_rotated(&self, m: usize, k: usize, n: usize) -> AneCost {
        let mut c = self.ane(m, k, n, Variant::I8I8);
        let r = self.rotation_ms(m, k);
        c.host_side_ms += r;
        c.total_ms += r;
        c
    }

    /// [`CostModel::ane`] of the `i8i8o` candidate (outlier split) with `c` outlier channels: the
    /// int8 × int8 product over all K (int8 rate where the chip has it; the outlier channels are zeros
    /// in it), plus per call the small product `[N, c] × [c, Mp]` at the fp16 rate, its inputs and
    /// one more `[N, Mp]` fp16 pass for the per-token factor and the sum [G], plus on the host the
    /// selection (one pass over the f32 activations), the outlier activations, and the gather of
    /// the weight's `c` columns (at most one cache line per column and row) and its copy.
    pub fn ane_outlier(&self, m: usize, k: usize, n: usize, c: usize) -> AneCost {
        let mut a = self.ane(m, k, n, Variant::I8I8);
        if c == 0 || m == 0 {
            return a;
        }
        let (np, nl) = parts(n);
        let (cf, nlf) = (c as f64, nl as f64);
        let ane_gbps = self.spec.ane_gbps.max(1e-3);
        let copy_gbps = (self.spec.soc_gbps * HOST_COPY_FRACTION).max(1e-3);
        let mut extra = 0.0;
        for (mp, count) in m_chunks(m) {
            if count == 0 {
                continue;
            }
            let mpf = mp as f64;
            let calls = (np * count) as f64;
            let compute = 2.0 * mpf * cf * nlf / (self.ane_tflops(Variant::F16, mp, c) * 1e9);
            let bytes = nlf * cf + cf * mpf * 2.0 + mpf * 2.0 + 2.0 * nlf * mpf * 2.0;
            let mem = bytes / (ane_gbps * 1e6);
            a.compute_ms += calls * compute;
            a.memory_ms += calls * mem;
            extra += calls * (compute + mem);
            let copy = calls * 2.0 * nlf * cf / (copy_gbps * 1e6);
            a.copy_ms += copy;
            extra += copy;
        }
        let (mf, kf, nf) = (m as f64, k as f64, n as f64);
        let mpt = padded_m(m) as f64;
        let side =
            mf * kf * 4.0 + mf * cf * 4.0 + cf * mpt * 2.0 + nf * (cf * 64.0).min(kf) + nf * cf;
        let side_ms = side / (self.host_side_gbps.max(1e-3) * 1e6);
        a.host_side_ms += side_ms;
        a.total_ms += extra + side_ms;
        a
    }

    /// Metal matmul rate at `m` tokens, TFLOPS.
    pub fn host_tflops(&self, m: usize) -> f64 {
        let sat = |m: f64| m / (m + HOST_M_HALF);
        let rel = (sat(m as f64) / sat(512.0)).min(1.0);
        self.spec.host_tflops / HOST_MATMUL_SHARE * rel
    }

    pub fn host(&self, m: usize, k: usize, n: usize, variant: Variant) -> HostCost {
        let (_, _, hb) = element_bytes(variant);
        let (mf, kf, nf) = (m as f64, k as f64, n as f64);
        let compute_ms = 2.0 * mf * kf * nf / (self.host_tflops(m).max(1e-6) * 1e9);
        let bytes = nf * kf * hb + mf * kf * 4.0 + mf * nf * 4.0;
        let memory_ms = bytes / ((self.spec.soc_gbps * HOST_BW_FRACTION).max(1e-3) * 1e6);
        HostCost {
            compute_ms,
            memory_ms,
            total_ms: HOST_KERNEL_MS + compute_ms.max(memory_ms),
        }
    }
}

/// Weight matmuls of a decoder-only transformer as `(k, n)` pairs, per layer in order
/// q, k, v, o, gate, up, down, repeated `n_layer` times. The LM head is left out: in prefill llama.cpp
/// computes logits for the last token only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDims {
    pub name: &'static str,
    pub n_layer: usize,
    pub d_model: usize,
    /// Query width (heads × head dim).
    pub q_dim: usize,
    /// Key/value width (KV heads × head dim).
    pub kv_dim: usize,
    pub d_ff: usize,
}

impl ModelDims {
    pub const LLAMA3_8B: ModelDims = ModelDims {
        name: "Llama-3-8B",
        n_layer: 32,
        d_model: 4096,
        q_dim: 4096,
        kv_dim: 1024,
        d_ff: 14336,
    };
    pub const LLAMA2_7B: ModelDims = ModelDims {
        name: "LLaMA-2-7B",
        n_layer: 32,
        d_model: 4096,
        q_dim: 4096,
        kv_dim: 4096,
        d_ff: 11008,
    };
    pub const QWEN3_4B: ModelDims = ModelDims {
        name: "Qwen3-4B",
        n_layer: 36,
        d_model: 2560,
        q_dim: 4096,
        kv_dim: 1024,
        d_ff: 9728,
    };
    pub const QWEN3_0_6B: ModelDims = ModelDims {
        name: "Qwen3-0.6B",
        n_layer: 28,
        d_model: 1024,
        q_dim: 2048,
        kv_dim: 1024,
        d_ff: 3072,
    };

    pub fn matmuls(&self) -> Vec<(usize, usize)> {
        let layer = [
            (self.d_model, self.q_dim),
            (self.d_model, self.kv_dim),
            (self.d_model, self.kv_dim),
            (self.q_dim, self.d_model),
            (self.d_model, self.d_ff),
            (self.d_model, self.d_ff),
            (self.d_ff, self.d_model),
        ];
        (0..self.n_layer).flat_map(|_| layer).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rotation_adds_its_host_cost_to_the_int8_path() {
        let m4 = CostModel::for_chip(ChipGen::M4);
        let (m, k, n) = (512, 4096, 14336);
        let r = m4.rotation_ms(m, k);
        assert!(r > 0.0);
        let plain = m4.ane(m, k, n, Variant::I8I8).total_ms;
        let rot = m4.ane_rotated(m, k, n).total_ms;
        assert!((rot - plain - r).abs() < 1e-9);
        // Whether the rotated route beats w8f16 on an int8 chip rests on the host rotation rate, a
        // guess until a device measures it (docs/benchmarks.md); today's constants say it does not,
        // which is why the int8-chip route is opt-in. On a chip without the int8 path it never wins.
        assert!(rot > plain);
        let m3 = CostModel::for_chip(ChipGen::M3);
        assert!(m3.ane_rotated(m, k, n).total_ms > m3.ane(m, k, n, Variant::I8I8).total_ms);
        assert_eq!(m4.rotation_ms(0, k), 0.0);
    }

    use super::*;

    #[test]
    fn every_chip_has_a_spec() {
        for c in ChipGen::ALL {
            let s = ChipSpec::of(c);
            assert_eq!(s.chip, c);
            assert!(
                s.ane_fp16_tflops > 0.0
                    && s.host_tflops > 0.0
                    && s.ane_gbps > 0.0
                    && s.soc_gbps > 0.0
            );
            assert!(!s.sources.is_empty());
        }
        assert_eq!(CHIPS.len(), ChipGen::ALL.len());
    }

    #[test]
    fn chunks_follow_buckets() {
        assert_eq!(m_chunks(1), [(4096, 0), (64, 1)]);
        assert_eq!(m_chunks(300), [(4096, 0), (384, 1)]);
        assert_eq!(m_chunks(4096), [(4096, 1), (64, 0)]);
        assert_eq!(m_chunks(5000), [(4096, 1), (1024, 1)]);
        assert_eq!(padded_m(0), 0);
        assert_eq!(padded_m(5000), 5120);
        assert_eq!(padded_m(12288), 12288);
        assert!(padded_m(usize::MAX) >= usize::MAX - 4096);
    }

    #[test]
    fn anchors_hold() {
        // M4 W8A8 at large M lands on Draw Things' 20 TFLOPS reference (perf #32).
        let m4 = CostModel::for_chip(ChipGen::M4);
        let r = m4.ane_tflops(Variant::I8I8, 4096, 2048);
        assert!((r - 20.0).abs() < 1.0, "{r}");
        // Decode never wins: dispatch alone exceeds the host's bandwidth-bound mat-vec.
        let a = m4.ane(1, 4096, 4096, Variant::I8I8);
        let h = m4.host(1, 4096, 4096, Variant::I8I8);
        assert!(a.total_ms > 2.0 * h.total_ms, "{a:?} {h:?}");
        // Prefill on M4 wins, on M4 Max and M5 Pro it does not (perf §1, §6).
        let ratio = |c: ChipGen| {
            let m = CostModel::for_chip(c);
            m.host(512, 4096, 14336, Variant::I8I8).total_ms
                / m.ane(512, 4096, 14336, Variant::I8I8).total_ms
        };
        assert!(ratio(ChipGen::M4) > 1.3, "{}", ratio(ChipGen::M4));
        assert!(ratio(ChipGen::M4Max) < 1.0, "{}", ratio(ChipGen::M4Max));
        assert!(ratio(ChipGen::M5Pro) < 1.0, "{}", ratio(ChipGen::M5Pro));
        // Large dims split into parts of at most 16384.
        let c = m4.ane(512, 4096, 128256, Variant::I8I8);
        assert_eq!(c.calls, 8);
        assert!(m4.ane(512, 4096, 4096, Variant::I8I8).k_cliff);
        assert!(!m4.ane(256, 4096, 4096, Variant::I8I8).k_cliff);
    }

    #[test]
    fn dims() {
        let d = ModelDims::LLAMA3_8B.matmuls();
        assert_eq!(d.len(), 7 * 32);
        assert_eq!(d[6], (14336, 4096));
    }
}
