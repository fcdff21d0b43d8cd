//! Repack and activation-quantisation throughput, next to memcpy of the same bytes.
//!
//! `cargo bench -p ggml-coreml-bridge` (optional: `-- N K REPS`, default 2048 4096 5).
//! GB/s are input bytes (the ggml tensor, or the f32 activations) per second, best of REPS runs,
//! including the allocation of the output (as at load). memcpy is `copy_from_slice` of the same
//! byte count into a warm buffer; `to_vec` adds a fresh allocation like the repacks have.

use std::hint::black_box;
use std::time::Instant;

use ggml_coreml_bridge::{
    WeightType, block_form_par, dequantize, quantize_rows_i8_par, rowwise_int8_par, to_f16_par,
};
use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Random quants with realistic fp16 scales (so no time is spent on denormals or NaNs).
fn weight(r: &mut StdRng, t: WeightType, n: usize, k: usize) -> Vec<u8> {
    let mut b = vec![0u8; t.tensor_bytes(n, k).unwrap()];
    r.fill(&mut b[..]);
    let halves: &[usize] = match t {
        WeightType::F16 => {
            for p in b.chunks_exact_mut(2) {
                let v = f16::from_f32(r.random_range(-0.1f32..0.1));
                p.copy_from_slice(&v.to_bits().to_le_bytes());
            }
            &[]
        }
        WeightType::Q4_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_K | WeightType::Q5_K => &[0, 2],
        WeightType::Q6_K => &[208],
    };
    for blk in b.chunks_exact_mut(t.block_bytes()) {
        for &at in halves {
            let v = f16::from_f32(r.random_range(1e-4f32..1e-2));
            blk[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    b
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(2048);
    let k = args.get(1).copied().unwrap_or(4096);
    let reps = args.get(2).copied().unwrap_or(5).max(1);
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let gbs = |bytes: usize, s: f64| bytes as f64 / s / 1e9;
    let mut r = StdRng::seed_from_u64(1);

    println!(
        "weights [N={n}, K={k}], best of {reps}; GB/s of ggml input bytes; {threads} hardware threads"
    );
    println!(
        "{:<6} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "type",
        "MB in",
        "memcpy",
        "to_vec",
        "f32 deq",
        "",
        "block",
        "block",
        "rowwise",
        "rowwise",
        "f16",
        "f16",
        "held/ggml:",
        "block",
        "rowwise",
    );
    println!(
        "{:<6} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "",
        "",
        "",
        "",
        "1 thr",
        "",
        "1 thr",
        format!("{threads} thr"),
        "1 thr",
        format!("{threads} thr"),
        "1 thr",
        format!("{threads} thr"),
        "f16",
        "",
        "",
    );
    for t in WeightType::ALL {
        let w = weight(&mut r, t, n, k);
        let mut dst = vec![0u8; w.len()];
        let memcpy = best(reps, || dst.copy_from_slice(&w));
        let to_vec = best(reps, || w.to_vec());
        let deq = best(reps, || dequantize(t, &w, n, k).unwrap());
        let (b1, bp) = if t == WeightType::F16 {
            (f64::NAN, f64::NAN)
        } else {
            (
                best(reps, || block_form_par(t, &w, n, k, 1).unwrap()),
                best(reps, || block_form_par(t, &w, n, k, threads).unwrap()),
            )
        };
        let r1 = best(reps, || rowwise_int8_par(t, &w, n, k, 1).unwrap());
        let rp = best(reps, || rowwise_int8_par(t, &w, n, k, threads).unwrap());
        let h1 = best(reps, || to_f16_par(t, &w, n, k, 1).unwrap());
        let hp = best(reps, || to_f16_par(t, &w, n, k, threads).unwrap());
        let held_block = if t == WeightType::F16 {
            f64::NAN
        } else {
            block_form_par(t, &w, n, k, 1).unwrap().bytes_held() as f64 / w.len() as f64
        };
        let held_row =
            rowwise_int8_par(t, &w, n, k, 1).unwrap().bytes_held() as f64 / w.len() as f64;
        let held_f16 = (2 * n * k) as f64 / w.len() as f64;
        let b = w.len();
        println!(
            "{:<6} {:>9.1} | {:>8.2} {:>8.2} | {:>8.2} {:>8} | {:>8.2} {:>8.2} | {:>8.2} {:>8.2} | {:>7.2} {:>7.2} | {:>7.2} {:>7.2} {:>7.2}",
            t.name(),
            b as f64 / 1e6,
            gbs(b, memcpy),
            gbs(b, to_vec),
            gbs(b, deq),
            "",
            gbs(b, b1),
            gbs(b, bp),
            gbs(b, r1),
            gbs(b, rp),
            gbs(b, h1),
            gbs(b, hp),
            held_f16,
            held_block,
            held_row,
        );
    }

    println!();
    println!("activations: per-token int8 (quantize_rows_i8), GB/s of f32 input bytes");
    println!(
        "{:>6} {:>6} {:>9} | {:>8} {:>8} | {:>8} {:>8}",
        "M",
        "K",
        "MB in",
        "memcpy",
        "to_vec",
        "1 thr",
        format!("{threads} thr")
    );
    for (m, kk) in [(1, k), (64, k), (512, k)] {
        let x: Vec<f32> = (0..m * kk).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let mut q = vec![0i8; m * kk];
        let mut s = vec![0f32; m];
        let mut dst = vec![0f32; x.len()];
        let reps_a = if m == 1 { reps * 200 } else { reps * 4 };
        let memcpy = best(reps_a, || dst.copy_from_slice(&x));
        let to_vec = best(reps_a, || x.to_vec());
        let a1 = best(reps_a, || {
            quantize_rows_i8_par(&x, m, kk, kk, &mut q, &mut s, 1).unwrap()
        });
        let ap = best(reps_a, || {
            quantize_rows_i8_par(&x, m, kk, kk, &mut q, &mut s, threads).unwrap()
        });
        let b = 4 * x.len();
        println!(
            "{m:>6} {kk:>6} {:>9.2} | {:>8.2} {:>8.2} | {:>8.2} {:>8.2}",
            b as f64 / 1e6,
            gbs(b, memcpy),
            gbs(b, to_vec),
            gbs(b, a1),
            gbs(b, ap)
        );
    }
}
