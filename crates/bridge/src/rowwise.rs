//! Row-wise int8 ("8-bit S") and fp16 copies of a weight, both made from the exact values.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::activation::quantize_row_i8;
use crate::form::{check_tensor, dequantize_unchecked};
use crate::par::{for_row_ranges, row_ranges};
use crate::{BlockForm, BridgeError, Rotation, WeightType};

/// Row-wise symmetric int8 weight: `w[n][k] ≈ scales[n] * q[n][k]`, `scales[n] = max|w_row| / 127`,
/// `q = round_half_even(w / s)` from the exact (dequantised) values. `q` is `[n, k]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RowwiseInt8 {
    pub n: usize,
    pub k: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

impl RowwiseInt8 {
    /// Bytes of memory the form holds (q and scales).
    pub fn bytes_held(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// `scales[row] * q[row][..]` into `out[..k]`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), BridgeError> {
        if row >= self.n || self.scales.len() < self.n || self.q.len() < (row + 1) * self.k {
            return Err(BridgeError::ElementLength {
                what: "row-wise row index (n)",
                got: row,
                want: self.n,
            });
        }
        if out.len() < self.k {
            return Err(BridgeError::ElementLength {
                what: "row-wise output row",
                got: out.len(),
                want: self.k,
            });
        }
        let s = self.scales[row];
        let q = &self.q[row * self.k..(row + 1) * self.k];
        for (y, &q) in out.iter_mut().zip(q) {
            *y = s * q as f32;
        }
        Ok(())
    }
}

/// `len` zeroed scales, or an error instead of an allocation failure. With `k = 0` the row count is
/// not bounded by the input bytes, so this allocation is the one that can be absurd.
fn zeroed_scales(n: usize, k: usize) -> Result<Vec<f32>, BridgeError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| BridgeError::TooLarge { n, k })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Row-wise int8 of an `[n, k]` weight (any supported type, F16 included).
pub fn rowwise_int8(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Result<RowwiseInt8, BridgeError> {
    rowwise_int8_par(t, bytes, n, k, 1)
}

/// [`rowwise_int8`] on up to `threads` scoped threads (rows split evenly).
pub fn rowwise_int8_par(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
    threads: usize,
) -> Result<RowwiseInt8, BridgeError> {
    let row = check_tensor(t, bytes, n, k)?;
    // n * k is bounded by the input length (checked above), so this cannot be absurd.
    let mut q = vec![0i8; n * k];
    let mut scales = zeroed_scales(n, k)?;
    let mut none: [u8; 0] = [];
    for_row_ranges(
        &row_ranges(n, threads),
        (&mut q, k),
        (&mut scales, 1),
        (&mut none, 0),
        |rows, q, s, _| {
            let mut w = vec![0f32; k];
            for (i, r) in rows.enumerate() {
                dequantize_unchecked(t, &bytes[r * row..(r + 1) * row], &mut w);
                s[i] = quantize_row_i8(&w, &mut q[i * k..(i + 1) * k]);
            }
        },
    );
    Ok(RowwiseInt8 { n, k, q, scales })
}

/// Row-wise int8 of the rotated weight `W·Rᵀ` (each row `w` becomes `R w`, [`Rotation`]) for the
/// `i8i8r` variant: exact values, rotated in f32, then one symmetric int8 scale per row. `rot.k` must be `k`.
pub fn rowwise_int8_rotated_par(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
    rot: &Rotation,
    threads: usize,
) -> Result<RowwiseInt8, BridgeError> {
    let row = check_tensor(t, bytes, n, k)?;
    if rot.k != k {
        return Err(BridgeError::ElementLength {
            what: "rotation length (k)",
            got: rot.k,
            want: k,
        });
    }
    let mut q = vec![0i8; n * k];
    let mut scales = zeroed_scales(n, k)?;
    let mut none: [u8; 0] = [];
    for_row_ranges(
        &row_ranges(n, threads),
        (&mut q, k),
        (&mut scales, 1),
        (&mut none, 0),
        |rows, q, s, _| {
            let mut w = vec![0f32; k];
            for (i, r) in rows.enumerate() {
                dequantize_unchecked(t, &bytes[r * row..(r + 1) * row], &mut w);
                rot.apply(&mut w);
                s[i] = quantize_row_i8(&w, &mut q[i * k..(i + 1) * k]);
            }
        },
    );
    Ok(RowwiseInt8 { n, k, q, scales })
}

/// Row-wise int8 from an already built exact block form (same result as [`rowwise_int8`] on the
/// original bytes).
pub fn rowwise_from_block_form(form: &BlockForm) -> Result<RowwiseInt8, BridgeError> {
    form.check()?;
    let (n, k) = (form.n, form.k);
    let mut q = vec![0i8; n * k];
    let mut scales = zeroed_scales(n, k)?;
    // Only allocated when there is a row (k is unbounded when n = 0).
    let mut w = if n > 0 { vec![0f32; k] } else { Vec::new() };
    for r in 0..n {
        form.try_dequantize_row(r, &mut w)?;
        scales[r] = quantize_row_i8(&w, &mut q[r * k..(r + 1) * k]);
    }
    Ok(RowwiseInt8 { n, k, q, scales })
}

/// fp16 copy of the exact values of an `[n, k]` weight (row-major), for the `f16` variant.
/// F16 weights are copied bit for bit; quantised ones are dequantised and rounded to nearest fp16.
pub fn to_f16(t: WeightType, bytes: &[u8], n: usize, k: usize) -> Result<Vec<f16>, BridgeError> {
    to_f16_par(t, bytes, n, k, 1)
}

/// [`to_f16`] on up to `threads` scoped threads (rows split evenly).
pub fn to_f16_par(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
    threads: usize,
) -> Result<Vec<f16>, BridgeError> {
    let row = check_tensor(t, bytes, n, k)?;
    if n == 0 || k == 0 {
        return Ok(Vec::new());
    }
    let mut out = vec![f16::ZERO; n * k];
    let (mut none_b, mut none_c): ([u8; 0], [u8; 0]) = ([], []);
    for_row_ranges(
        &row_ranges(n, threads),
        (&mut out, k),
        (&mut none_b, 0),
        (&mut none_c, 0),
        |rows, out, _, _| {
            let bytes = &bytes[rows.start * row..rows.end * row];
            if t == WeightType::F16 {
                for (h, p) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([p[0], p[1]]));
                }
                return;
            }
            let mut w = vec![0f32; k];
            for (o, b) in out.chunks_exact_mut(k).zip(bytes.chunks_exact(row)) {
                dequantize_unchecked(t, b, &mut w);
                o.convert_from_f32_slice(&w);
            }
        },
    );
    Ok(out)
}
