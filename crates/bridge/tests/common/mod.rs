//! Random ggml blocks for the property tests: random bytes with the fp16 scales drawn from a mix
//! that includes 0, -0, negative, subnormal, large and (optionally) non-finite values, and the
//! quant bytes from a mix of random and extreme bit patterns.

#![allow(dead_code)]

use ggml_coreml_bridge::WeightType;
use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// An fp16 scale: zero, negative, subnormal, tiny, large, typical, or (if allowed) inf/NaN.
pub fn draw_half(r: &mut StdRng, non_finite: bool) -> u16 {
    let sign = if r.random_bool(0.5) { 0x8000 } else { 0 };
    let kinds = if non_finite { 8 } else { 7 };
    match r.random_range(0..kinds) {
        0 => sign,                                      // ±0
        1 => sign | r.random_range(1..0x0400),          // subnormal
        2 => sign | r.random_range(0x0400..0x1800),     // tiny normal
        3 => sign | r.random_range(0x7000..0x7C00),     // large, up to 65504
        4 => sign | 0x7BFF,                             // max
        5 | 6 => sign | r.random_range(0x1800..0x3C00), // typical 1e-4..1
        _ => {
            if r.random_bool(0.5) {
                sign | 0x7C00 // inf
            } else {
                sign | 0x7C00 | r.random_range(1..0x0400) // NaN (quiet or signalling)
            }
        }
    }
}

/// Fills quant bytes with one of several patterns.
pub fn fill_quants(r: &mut StdRng, out: &mut [u8]) {
    match r.random_range(0..10) {
        0 => out.fill(0x00),
        1 => out.fill(0xFF),
        2 => out.fill(if r.random_bool(0.5) { 0x0F } else { 0xF0 }),
        3 => out.fill(if r.random_bool(0.5) { 0x80 } else { 0x7F }),
        4 => out
            .iter_mut()
            .for_each(|b| *b = if r.random_bool(0.5) { 0 } else { 0xFF }),
        _ => r.fill(out),
    }
}

/// Byte offsets of the fp16 fields of one block.
pub fn half_fields(t: WeightType) -> &'static [usize] {
    match t {
        WeightType::F16 => &[0],
        WeightType::Q4_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_K | WeightType::Q5_K => &[0, 2],
        WeightType::Q6_K => &[208],
    }
}

/// `count` random blocks of type `t`.
pub fn random_blocks(r: &mut StdRng, t: WeightType, count: usize, non_finite: bool) -> Vec<u8> {
    let bb = t.block_bytes();
    let mut out = vec![0u8; count * bb];
    for blk in out.chunks_exact_mut(bb) {
        fill_quants(r, blk);
        for &at in half_fields(t) {
            let h = draw_half(r, non_finite);
            blk[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    out
}

/// Equal bits, or both NaN (NaN payloads are not part of the contract).
pub fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

pub mod ggml_host;

pub fn h2f(lo: u8, hi: u8) -> f32 {
    f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}
