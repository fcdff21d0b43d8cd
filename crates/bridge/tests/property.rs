//! Property tests: for >= 100k random blocks per format, the bridge's dequantisation equals an
//! independent port of ggml's reference `dequantize_row_*` bit for bit, and the exact block form
//! evaluates to the same bits; the fp16 copy and row-wise int8 keep their stated bounds.

mod common;

use common::{h2f, random_blocks, rng, same};
use ggml_coreml_bridge::{
    BlockForm, WeightType, block_form, dequantize_row, rowwise_from_block_form, rowwise_int8,
    to_f16,
};
use half::f16;

/// Blocks per format (K-quant blocks are 256 elements, so this is 25.6M values for those).
const BLOCKS: usize = 100_000;
/// Blocks per row in the generated tensors.
const ROW_BLOCKS: usize = 4;

/// ggml's `dequantize_row_*` for one block, written directly over the bytes with ggml's
/// pointer arithmetic (independent of the crate's block structs).
fn ggml_port(t: WeightType, x: &[u8], y: &mut [f32]) {
    match t {
        WeightType::F16 => y[0] = h2f(x[0], x[1]),
        WeightType::Q4_0 => {
            let d = h2f(x[0], x[1]);
            for j in 0..16 {
                let x0 = (x[2 + j] & 0x0F) as i32 - 8;
                let x1 = (x[2 + j] >> 4) as i32 - 8;
                y[j] = x0 as f32 * d;
                y[j + 16] = x1 as f32 * d;
            }
        }
        WeightType::Q8_0 => {
            let d = h2f(x[0], x[1]);
            for j in 0..32 {
                y[j] = (x[2 + j] as i8) as f32 * d;
            }
        }
        WeightType::Q4_K | WeightType::Q5_K => {
            let five = t == WeightType::Q5_K;
            let d = h2f(x[0], x[1]);
            let min = h2f(x[2], x[3]);
            let sc = &x[4..16];
            let get = |j: usize| -> (u8, u8) {
                if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                }
            };
            let qh = &x[16..48];
            let mut q = if five { 48 } else { 16 };
            let (mut u1, mut u2) = (1u8, 2u8);
            let mut o = 0;
            for is in (0..8).step_by(2) {
                let (s1, m1) = get(is);
                let (d1, m1) = (d * s1 as f32, min * m1 as f32);
                let (s2, m2) = get(is + 1);
                let (d2, m2) = (d * s2 as f32, min * m2 as f32);
                for l in 0..32 {
                    let hb = if five && qh[l] & u1 != 0 { 16 } else { 0 };
                    y[o] = d1 * ((x[q + l] & 0xF) as i32 + hb) as f32 - m1;
                    o += 1;
                }
                for l in 0..32 {
                    let hb = if five && qh[l] & u2 != 0 { 16 } else { 0 };
                    y[o] = d2 * ((x[q + l] >> 4) as i32 + hb) as f32 - m2;
                    o += 1;
                }
                q += 32;
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        WeightType::Q6_K => {
            let d = h2f(x[208], x[209]);
            let (mut ql, mut qh, mut sc, mut yo) = (0usize, 128usize, 192usize, 0usize);
            for _ in 0..2 {
                for l in 0..32 {
                    let is = l / 16;
                    let b = |i: usize| x[i];
                    let q1 = ((b(ql + l) & 0xF) | ((b(qh + l) & 3) << 4)) as i8 as i32 - 32;
                    let q2 = ((b(ql + l + 32) & 0xF) | (((b(qh + l) >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((b(ql + l) >> 4) | (((b(qh + l) >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((b(ql + l + 32) >> 4) | (((b(qh + l) >> 6) & 3) << 4)) as i32 - 32;
                    let s = |i: usize| x[sc + i] as i8 as f32;
                    y[yo + l] = d * s(is) * q1 as f32;
                    y[yo + l + 32] = d * s(is + 2) * q2 as f32;
                    y[yo + l + 64] = d * s(is + 4) * q3 as f32;
                    y[yo + l + 96] = d * s(is + 6) * q4 as f32;
                }
                yo += 128;
                ql += 64;
                qh += 32;
                sc += 8;
            }
        }
    }
}

fn port_tensor(t: WeightType, bytes: &[u8]) -> Vec<f32> {
    let (bb, bl) = (t.block_bytes(), t.block_len());
    let mut y = vec![0f32; bytes.len() / bb * bl];
    for (x, y) in bytes.chunks_exact(bb).zip(y.chunks_exact_mut(bl)) {
        ggml_port(t, x, y);
    }
    y
}

fn form_values(f: &BlockForm) -> Vec<f32> {
    let mut y = vec![0f32; f.n * f.k];
    for (r, row) in y.chunks_exact_mut(f.k).enumerate() {
        f.dequantize_row(r, row);
    }
    y
}

fn check_format(t: WeightType, seed: u64) {
    let mut r = rng(seed);
    let blocks = if t == WeightType::F16 {
        BLOCKS * 32
    } else {
        BLOCKS
    };
    let bytes = random_blocks(&mut r, t, blocks, true);
    let k = ROW_BLOCKS * t.block_len();
    let n = blocks / ROW_BLOCKS;
    let row = t.row_bytes(k).unwrap();

    let want = port_tensor(t, &bytes);
    let mut got = vec![0f32; n * k];
    for (i, y) in got.chunks_exact_mut(k).enumerate() {
        dequantize_row(t, &bytes[i * row..(i + 1) * row], y).unwrap();
    }
    let bad = want
        .iter()
        .zip(&got)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(bad, None, "{t}: dequantize_row differs from the ggml port");

    if t != WeightType::F16 {
        let f = block_form(t, &bytes, n, k).unwrap();
        assert_eq!(f.group, t.group());
        assert_eq!(f.offsets.is_some(), t.has_offsets());
        let (lo, hi) = t.q_range().unwrap();
        assert!(
            f.q.iter().all(|&q| (lo..=hi).contains(&q)),
            "{t}: q out of range"
        );
        let vals = form_values(&f);
        let bad = want.iter().zip(&vals).position(|(a, b)| !same(*a, *b));
        assert_eq!(bad, None, "{t}: block form differs from ggml");
    }
}

#[test]
fn q4_0_matches_ggml() {
    check_format(WeightType::Q4_0, 1);
}

#[test]
fn q8_0_matches_ggml() {
    check_format(WeightType::Q8_0, 2);
}

#[test]
fn q4_k_matches_ggml() {
    check_format(WeightType::Q4_K, 3);
}

#[test]
fn q5_k_matches_ggml() {
    check_format(WeightType::Q5_K, 4);
}

#[test]
fn q6_k_matches_ggml() {
    check_format(WeightType::Q6_K, 5);
}

#[test]
fn f16_matches_ggml() {
    check_format(WeightType::F16, 6);
}

/// fp16 copy == nearest fp16 of the exact value; row-wise int8 within half a step of it.
#[test]
fn f16_copy_and_rowwise_bounds() {
    let mut r = rng(7);
    for t in WeightType::ALL {
        let k = 2 * t.block_len().max(128);
        let n = 2000 * 256 / k;
        let bytes = random_blocks(&mut r, t, n * k / t.block_len(), false);
        let exact = port_tensor(t, &bytes);

        let h = to_f16(t, &bytes, n, k).unwrap();
        for (a, b) in exact.iter().zip(&h) {
            assert_eq!(f16::from_f32(*a).to_bits(), b.to_bits(), "{t}: to_f16");
        }

        let rw = rowwise_int8(t, &bytes, n, k).unwrap();
        for (i, w) in exact.chunks_exact(k).enumerate() {
            let s = rw.scales[i];
            let q = &rw.q[i * k..(i + 1) * k];
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !amax.is_finite() {
                continue;
            }
            assert_eq!(s, amax / 127.0, "{t}: row scale");
            if amax == 0.0 {
                assert!(q.iter().all(|&q| q == 0));
                continue;
            }
            assert!(
                q.iter().any(|&q| q.abs() == 127),
                "{t}: row max must map to ±127"
            );
            for (&wv, &qv) in w.iter().zip(q) {
                assert!(qv != -128);
                let err = (wv / s - qv as f32).abs();
                assert!(
                    err <= 0.5 + 1e-3,
                    "{t}: |w/s - q| = {err} (w {wv}, s {s}, q {qv})"
                );
            }
        }
        if t != WeightType::F16 {
            let f = block_form(t, &bytes, n, k).unwrap();
            assert_eq!(
                rowwise_from_block_form(&f).unwrap(),
                rw,
                "{t}: rowwise via block form"
            );
            // fp16 scales: exact for the types whose scale is ggml's own fp16 d.
            if matches!(t, WeightType::Q4_0 | WeightType::Q8_0) {
                let back: Vec<f32> = f.scales_f16().iter().map(|h| h.to_f32()).collect();
                assert!(back.iter().zip(&f.scales).all(|(a, b)| same(*a, *b)));
            }
        }
    }
}

/// Whole-tensor conversions refuse every wrong length and shape, for every type.
#[test]
fn shapes_and_lengths_are_checked() {
    for t in WeightType::ALL {
        let k = 2 * t.block_len();
        let n = 3;
        let bytes = vec![0u8; t.tensor_bytes(n, k).unwrap()];
        for len in [0, 1, bytes.len() - 1, bytes.len() + 1] {
            let b = vec![0u8; len];
            assert!(rowwise_int8(t, &b, n, k).is_err(), "{t} len {len}");
            assert!(to_f16(t, &b, n, k).is_err());
            assert!(t == WeightType::F16 || block_form(t, &b, n, k).is_err());
        }
        if t.block_len() > 1 {
            assert!(rowwise_int8(t, &bytes, n * 2, k / 2 + 1).is_err());
            assert!(to_f16(t, &bytes, n, k + 1).is_err());
        }
        for (nn, kk) in [(usize::MAX, k), (usize::MAX / 2, k), (2, usize::MAX / 2)] {
            assert!(to_f16(t, &bytes, nn, kk / t.block_len() * t.block_len()).is_err());
        }
        assert!(rowwise_int8(t, &bytes, n, k).is_ok());
    }
}
