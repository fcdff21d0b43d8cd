//! Symmetric per-row int8 quantisation: activations per token, and the row-wise weight form.

use crate::BridgeError;
use crate::par::{for_row_ranges, row_ranges};

/// Below this absolute maximum `127 / amax` would overflow; such rows take the division path.
const TINY: f32 = 1e-30;

/// Round half to even and clamp to ±127; NaN gives 0.
///
/// Clamp first, then add 1.5 * 2^23: the sum rounds to an integer in the default nearest-even
/// mode and its low mantissa bits are that integer. Unlike `round_ties_even` + `as`, every step
/// is a plain compare/select, add or integer op, so the loop vectorises on baseline x86_64 (SSE2)
/// and aarch64.
#[inline(always)]
pub(crate) fn rne_i8(y: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let y = if y > 127.0 { 127.0 } else { y };
    let y = if y < -127.0 { -127.0 } else { y };
    let y = if y.is_nan() { 0.0 } else { y };
    ((y + MAGIC).to_bits() as i32 - 0x4B40_0000) as i8
}

/// Largest |x| of a slice (NaN ignored).
#[inline]
pub fn abs_max(x: &[f32]) -> f32 {
    // Independent lanes so the loop vectorises (a single running max is a serial dependency).
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = v.abs();
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = 0f32;
    for v in acc.iter().chain(rest) {
        let v = v.abs();
        m = if v > m { v } else { m };
    }
    m
}

/// Quantises one row symmetrically: returns `s = max|x| / 127` and writes
/// `q = round_half_even(x * 127 / max|x|)` clamped to ±127 into `q[..x.len()]`.
/// An all-zero row gives scale 0 and q 0. Non-finite input never panics (NaN gives q 0).
///
/// # Panics
/// If `q.len() < x.len()`.
#[inline]
pub fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f32 {
    let q = &mut q[..x.len()];
    let amax = abs_max(x);
    let scale = amax / 127.0;
    if amax >= TINY {
        let inv = 127.0 / amax;
        for (q, &x) in q.iter_mut().zip(x) {
            *q = rne_i8(x * inv);
        }
    } else if scale > 0.0 {
        for (q, &x) in q.iter_mut().zip(x) {
            *q = rne_i8(x / scale);
        }
    } else {
        q.fill(0);
        return 0.0;
    }
    scale
}

fn check_rows(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    q: &[i8],
    scales: &[f32],
) -> Result<(), BridgeError> {
    if m == 0 {
        return Ok(());
    }
    if stride < k {
        return Err(BridgeError::Stride { stride, k });
    }
    let too_large = BridgeError::TooLarge { n: m, k };
    let need_x = (m - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(k))
        .ok_or(too_large.clone())?;
    let need_q = m.checked_mul(k).ok_or(too_large)?;
    for (what, got, want) in [
        ("activations x", x.len(), need_x),
        ("activation q", q.len(), need_q),
        ("activation scales", scales.len(), m),
    ] {
        if got < want {
            return Err(BridgeError::ElementLength { what, got, want });
        }
    }
    Ok(())
}

/// Per-row (per-token) symmetric int8 of `m` rows of `k` f32 (row stride `stride >= k` elements):
/// writes `q[..m*k]` (row-major) and `scales[..m]`; `s = max|x_row| / 127` (zero row: scale 0, q 0),
/// `q = round_half_even(x / s)` clamped to ±127 (computed as `x * (127 / max|x_row|)`).
///
/// # Panics
/// If the slices are shorter than the shape needs or `stride < k`; [`try_quantize_rows_i8`] returns an
/// error instead.
pub fn quantize_rows_i8(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    q: &mut [i8],
    scales: &mut [f32],
) {
    if let Err(e) = try_quantize_rows_i8(x, m, k, stride, q, scales) {
        panic!("quantize_rows_i8: {e}");
    }
}

/// Checked [`quantize_rows_i8`].
pub fn try_quantize_rows_i8(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<(), BridgeError> {
    quantize_rows_i8_par(x, m, k, stride, q, scales, 1)
}

/// [`try_quantize_rows_i8`] on up to `threads` scoped threads (rows split evenly).
pub fn quantize_rows_i8_par(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    q: &mut [i8],
    scales: &mut [f32],
    threads: usize,
) -> Result<(), BridgeError> {
    check_rows(x, m, k, stride, q, scales)?;
    if m == 0 {
        return Ok(());
    }
    let ranges = row_ranges(m, threads);
    let mut none: [u8; 0] = [];
    for_row_ranges(
        &ranges,
        (&mut q[..m * k], k),
        (&mut scales[..m], 1),
        (&mut none, 0),
        |rows, q, s, _| {
            for (i, r) in rows.enumerate() {
                let xr = &x[r * stride..r * stride + k];
                s[i] = quantize_row_i8(xr, &mut q[i * k..(i + 1) * k]);
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_even_and_clamped() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (126.5, 126),
            (127.0, 127),
            (127.4, 127),
            (200.0, 127),
            (-200.0, -127),
            (f32::INFINITY, 127),
            (f32::NEG_INFINITY, -127),
        ];
        for (y, want) in cases {
            assert_eq!(rne_i8(y), want, "rne_i8({y})");
        }
        assert_eq!(rne_i8(f32::NAN), 0);
    }

    #[test]
    fn rows_scale_and_round() {
        let x = [1.0, -2.0, 0.5, 9.0, 0.0, 0.0, 0.0, 9.0, 4.0, 1.0, -4.0, 9.0];
        let (mut q, mut s) = ([0i8; 9], [0f32; 3]);
        quantize_rows_i8(&x, 3, 3, 4, &mut q, &mut s);
        assert_eq!(s, [2.0 / 127.0, 0.0, 4.0 / 127.0]);
        // 1 * 63.5 -> 64 (half even), 0.5 * 63.5 = 31.75 -> 32; the stride skips the 9s
        assert_eq!(q, [64, -127, 32, 0, 0, 0, 127, 32, -127]);
    }

    #[test]
    fn tiny_and_nonfinite_rows_do_not_panic() {
        let tiny = [1e-40f32, -2e-40, 0.0];
        let mut q = [0i8; 3];
        let s = quantize_row_i8(&tiny, &mut q);
        assert!(s > 0.0);
        assert_eq!(q[1], -127);
        let odd = [f32::NAN, 1.0, f32::INFINITY, -1.0];
        let mut q = [0i8; 4];
        quantize_row_i8(&odd, &mut q);
        let mut q = [5i8; 2];
        assert_eq!(quantize_row_i8(&[0.0, -0.0], &mut q), 0.0);
        assert_eq!(q, [0, 0]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = [0f32; 8];
        let (mut q, mut s) = ([0i8; 8], [0f32; 2]);
        assert!(matches!(
            try_quantize_rows_i8(&x, 2, 4, 3, &mut q, &mut s),
            Err(BridgeError::Stride { .. })
        ));
        assert!(matches!(
            try_quantize_rows_i8(&x, 3, 4, 4, &mut q, &mut s),
            Err(BridgeError::ElementLength { .. })
        ));
        assert!(try_quantize_rows_i8(&x, 2, 4, 4, &mut q, &mut s).is_ok());
        assert!(try_quantize_rows_i8(&x, usize::MAX, 4, 4, &mut q, &mut s).is_err());
    }
}
