//! Against ggml itself: the host's libggml-base `to_float` vs `dequantize_row` and the exact
//! block form, bit for bit, for >= 100k random blocks per type; and the per-token int8
//! activations against f32 and against ggml's own Q8_0 activation quantiser (NMSE).
//!
//! Needs `GGML_COREML_HOST_BIN` (skips otherwise; fails when `GGML_COREML_REQUIRE_EXTERNAL=1`).

mod common;

use common::ggml_host::{GGML_Q8_0, GgmlBase};
use common::{random_blocks, rng, same};
use ggml_coreml_bridge::{WeightType, block_form, dequantize_row, nmse, quantize_rows_i8};
use rand::Rng;

fn host(test: &str) -> Option<GgmlBase> {
    match GgmlBase::open() {
        Ok(Some(h)) => Some(h),
        Ok(None) => {
            eprintln!("skipped: {test}: GGML_COREML_HOST_BIN is not set");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

const BLOCKS: usize = 100_000;

fn compare(t: WeightType, seed: u64, non_finite: bool) {
    let Some(g) = host("bit_exact_vs_ggml") else {
        return;
    };
    let mut r = rng(seed);
    let blocks = if t == WeightType::F16 {
        BLOCKS * 32
    } else {
        BLOCKS
    };
    let bytes = random_blocks(&mut r, t, blocks, non_finite);
    let k = 8 * t.block_len().max(32);
    let n = blocks * t.block_len() / k;
    let row = t.row_bytes(k).unwrap();

    let mut want = vec![0f32; n * k];
    let mut got = vec![0f32; n * k];
    for (i, (w, y)) in want
        .chunks_exact_mut(k)
        .zip(got.chunks_exact_mut(k))
        .enumerate()
    {
        let b = &bytes[i * row..(i + 1) * row];
        g.to_float(t, b, w);
        dequantize_row(t, b, y).unwrap();
    }
    // Strict: identical bits, NaN payloads included.
    let bad = want
        .iter()
        .zip(&got)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(
        bad,
        None,
        "{t}: dequantize_row != ggml to_float at {bad:?}: {:?} vs {:?}",
        bad.map(|i| want[i]),
        bad.map(|i| got[i])
    );

    if t != WeightType::F16 {
        let f = block_form(t, &bytes, n, k).unwrap();
        let mut y = vec![0f32; k];
        for (i, w) in want.chunks_exact(k).enumerate() {
            f.dequantize_row(i, &mut y);
            let bad = w.iter().zip(&y).position(|(a, b)| !same(*a, *b));
            assert_eq!(bad, None, "{t}: block form != ggml to_float, row {i}");
        }
    }
    eprintln!("{t}: {blocks} blocks bit-identical to {}", g.path.display());
}

#[test]
fn q4_0_vs_ggml() {
    compare(WeightType::Q4_0, 11, false);
    compare(WeightType::Q4_0, 21, true);
}

#[test]
fn q8_0_vs_ggml() {
    compare(WeightType::Q8_0, 12, false);
    compare(WeightType::Q8_0, 22, true);
}

#[test]
fn q4_k_vs_ggml() {
    compare(WeightType::Q4_K, 13, false);
    compare(WeightType::Q4_K, 23, true);
}

#[test]
fn q5_k_vs_ggml() {
    compare(WeightType::Q5_K, 14, false);
    compare(WeightType::Q5_K, 24, true);
}

#[test]
fn q6_k_vs_ggml() {
    compare(WeightType::Q6_K, 15, false);
    compare(WeightType::Q6_K, 25, true);
}

#[test]
fn f16_vs_ggml() {
    compare(WeightType::F16, 16, true);
}

/// Real quantiser output (ggml_quantize_chunk on uniform data) round-trips identically too.
#[test]
fn ggml_quantised_tensors_vs_ggml() {
    let Some(g) = host("ggml_quantised_tensors_vs_ggml") else {
        return;
    };
    let mut r = rng(17);
    let (n, k) = (64, 1024);
    let src: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
    for t in WeightType::ALL {
        let bytes = g.quantize(t, &src, n, k);
        let mut want = vec![0f32; n * k];
        g.to_float(t, &bytes, &mut want);
        let mine = ggml_coreml_bridge::dequantize(t, &bytes, n, k).unwrap();
        assert!(
            want.iter()
                .zip(&mine)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{t}"
        );
        if t != WeightType::F16 {
            let f = block_form(t, &bytes, n, k).unwrap();
            let mut y = vec![0f32; k];
            for (i, w) in want.chunks_exact(k).enumerate() {
                f.dequantize_row(i, &mut y);
                assert!(
                    w.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{t}"
                );
            }
        }
    }
}

/// Per-token int8 activations: round trip NMSE against f32, next to ggml-cpu's own Q8_0
/// activation quantiser (per-32 blocks) on the same data. Uniform data is what
/// test-backend-ops uses; the LLM-like data adds outlier channels.
#[test]
fn activation_quantisation_nmse() {
    let mut r = rng(18);
    let (m, k) = (64, 4096);
    let uniform: Vec<f32> = (0..m * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let mut llm: Vec<f32> = (0..m * k)
        .map(|_| {
            let (u1, u2): (f32, f32) = (r.random_range(f32::EPSILON..1.0), r.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    for row in llm.chunks_exact_mut(k) {
        for c in [7, 700, 1900, 3001] {
            row[c] *= 30.0;
        }
    }
    let g = host("activation_quantisation_nmse (ggml Q8_0 column)");
    for (name, x) in [("uniform", &uniform), ("llm-like", &llm)] {
        let mut q = vec![0i8; m * k];
        let mut s = vec![0f32; m];
        quantize_rows_i8(x, m, k, k, &mut q, &mut s);
        let back: Vec<f32> = q
            .chunks_exact(k)
            .zip(&s)
            .flat_map(|(q, &s)| q.iter().map(move |&q| q as f32 * s))
            .collect();
        let e = nmse(x, &back);
        // Half a step of max/127 on uniform data: ~(1/127)^2/12 / (1/3) ≈ 1.5e-5.
        // LLM-like: the outliers set the step (~90/127), so the bulk loses most of its bits.
        let bound = if name == "uniform" { 3e-5 } else { 2e-2 };
        assert!(
            e < bound,
            "{name}: per-token int8 NMSE {e:.3e} >= {bound:e}"
        );
        let ggml = g.as_ref().map(|g| {
            let b = g.quantize_ref(GGML_Q8_0, 32, 34, x);
            nmse(x, &g.to_float_id(GGML_Q8_0, 32, 34, &b))
        });
        eprintln!(
            "activations {name} m={m} k={k}: per-token int8 NMSE {e:.3e}; ggml Q8_0 (per-32) NMSE {}",
            ggml.map_or("n/a".into(), |v| format!("{v:.3e}"))
        );
    }
}
