//! Arbitrary f32 bit patterns (NaN, inf, subnormals) and shapes into the per-token activation
//! quantiser: errors for bad shapes, otherwise q in ±127 and scales >= 0.
#![no_main]

use ggml_coreml_bridge::{quantize_rows_i8_par, try_quantize_rows_i8};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let m = data[0] as usize % 9;
    let k = data[1] as usize % 300;
    let stride = (k + data[2] as usize % 5).saturating_sub(1);
    let threads = 1 + (data[3] & 3) as usize;
    let x: Vec<f32> = data[4..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (mut q, mut s) = (vec![0i8; m * k], vec![0f32; m]);
    let r = try_quantize_rows_i8(&x, m, k, stride, &mut q, &mut s);
    let (mut q2, mut s2) = (vec![0i8; m * k], vec![0f32; m]);
    let r2 = quantize_rows_i8_par(&x, m, k, stride, &mut q2, &mut s2, threads);
    assert_eq!(r, r2);
    if r.is_ok() {
        assert_eq!(q, q2);
        assert!(s.iter().zip(&s2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(q.iter().all(|&v| v != i8::MIN));
        assert!(s.iter().all(|&v| v >= 0.0 || v.is_nan()));
    }
});
