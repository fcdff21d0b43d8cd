//! The outlier split of activations (`i8i8o`, issue #14): a fixed number of activation channels with
//! the largest magnitude stay in floating point; the rest is quantised per token to int8 with a scale
//! taken over the non-outlier channels only, so one large channel no longer flattens a token's scale.

use crate::BridgeError;
use crate::activation::{abs_max, rne_i8};

/// The `c` channels (of `k`) with the largest max |x| over the `m` rows of `x` (row stride `stride`),
/// ascending in `out` (ties: the lower channel). One pass over the activations plus a selection over
/// `k` maxima; `cmax` is scratch. `c >= k` selects every channel. NaN values are ignored.
pub fn select_outlier_channels(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    c: usize,
    cmax: &mut Vec<f32>,
    out: &mut Vec<usize>,
) -> Result<(), BridgeError> {
    check(x, m, k, stride)?;
    cmax.clear();
    cmax.resize(k, 0.0);
    for r in 0..m {
        for (a, &v) in cmax.iter_mut().zip(&x[r * stride..r * stride + k]) {
            let v = v.abs();
            *a = if v > *a { v } else { *a };
        }
    }
    out.clear();
    out.extend(0..k);
    let c = c.min(k);
    if c < k && c > 0 {
        out.select_nth_unstable_by(c - 1, |&a, &b| cmax[b].total_cmp(&cmax[a]).then(a.cmp(&b)));
    }
    out.truncate(c);
    out.sort_unstable();
    Ok(())
}

/// Per-token int8 of the non-outlier channels. For row `r`: `scales[r] = max|x_r,k∉O| / 127`,
/// `q[r, k] = round_half_even(x / scales[r])` clamped to ±127 for `k ∉ O` and 0 for `k ∈ O`, and
/// `units[r] = max(scales[r], max|x_r,k∈O| / 127)`: the unit in which both the int8 part and the
/// outlier part of the token fit the program's fp16 range. `outliers` must be ascending and `< k`.
#[allow(clippy::too_many_arguments)]
pub fn quantize_rows_i8_split(
    x: &[f32],
    m: usize,
    k: usize,
    stride: usize,
    outliers: &[usize],
    q: &mut [i8],
    scales: &mut [f32],
    units: &mut [f32],
) -> Result<(), BridgeError> {
    check(x, m, k, stride)?;
    if q.len() < m * k || scales.len() < m || units.len() < m {
        return Err(BridgeError::ElementLength {
            what: "split activation outputs",
            got: q.len().min(scales.len()).min(units.len()),
            want: m * k,
        });
    }
    if outliers.windows(2).any(|w| w[0] >= w[1]) || outliers.last().is_some_and(|&o| o >= k) {
        return Err(BridgeError::ElementLength {
            what: "outlier channels (ascending, below k)",
            got: outliers.len(),
            want: k,
        });
    }
    for r in 0..m {
        let xr = &x[r * stride..r * stride + k];
        let qr = &mut q[r * k..(r + 1) * k];
        let (mut amax, mut omax, mut prev) = (0f32, 0f32, 0usize);
        for &o in outliers {
            let a = abs_max(&xr[prev..o]);
            amax = if a > amax { a } else { amax };
            let v = xr[o].abs();
            omax = if v > omax { v } else { omax };
            prev = o + 1;
        }
        let a = abs_max(&xr[prev..]);
        amax = if a > amax { a } else { amax };
        let s = amax / 127.0;
        if amax > 0.0 && s > 0.0 {
            let inv = 127.0 / amax;
            if inv.is_finite() {
                for (q, &v) in qr.iter_mut().zip(xr) {
                    *q = rne_i8(v * inv);
                }
            } else {
                for (q, &v) in qr.iter_mut().zip(xr) {
                    *q = rne_i8(v / s);
                }
            }
        } else {
            qr.fill(0);
        }
        for &o in outliers {
            qr[o] = 0;
        }
        let s = if amax > 0.0 { s } else { 0.0 };
        scales[r] = s;
        let ou = omax / 127.0;
        units[r] = if ou > s { ou } else { s };
    }
    Ok(())
}

fn check(x: &[f32], m: usize, k: usize, stride: usize) -> Result<(), BridgeError> {
    if m == 0 {
        return Ok(());
    }
    if stride < k {
        return Err(BridgeError::Stride { stride, k });
    }
    let need = (m - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(k))
        .ok_or(BridgeError::TooLarge { n: m, k })?;
    if x.len() < need {
        return Err(BridgeError::ElementLength {
            what: "activations x",
            got: x.len(),
            want: need,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_channels() {
        // 2 rows of 6 (stride 7): channel maxima 1, 9, 3, 9, 0.5, 4.
        let x = [
            1.0, -9.0, 3.0, 0.0, 0.5, 1.0, 99.0, //
            0.0, 2.0, -1.0, 9.0, 0.0, -4.0, 99.0,
        ];
        let (mut cmax, mut o) = (Vec::new(), Vec::new());
        select_outlier_channels(&x, 2, 6, 7, 3, &mut cmax, &mut o).unwrap();
        assert_eq!(o, [1, 3, 5]);
        select_outlier_channels(&x, 2, 6, 7, 2, &mut cmax, &mut o).unwrap();
        assert_eq!(o, [1, 3]);
        select_outlier_channels(&x, 2, 6, 7, 10, &mut cmax, &mut o).unwrap();
        assert_eq!(o, [0, 1, 2, 3, 4, 5]);
        assert!(select_outlier_channels(&x, 2, 6, 5, 1, &mut cmax, &mut o).is_err());
    }

    #[test]
    fn scale_ignores_outliers_and_unit_covers_them() {
        let x = [1.0, -100.0, 0.5, 2.0, 0.0, 0.0, 0.0, -300.0];
        let (mut q, mut s, mut u) = ([9i8; 8], [0f32; 2], [0f32; 2]);
        quantize_rows_i8_split(&x, 2, 4, 4, &[1, 3], &mut q, &mut s, &mut u).unwrap();
        assert_eq!(s[0], 1.0 / 127.0);
        assert_eq!(u[0], 100.0 / 127.0);
        assert_eq!(q[..4], [127, 0, 64, 0]);
        // Only outliers: scale 0, all int8 zero, the unit from the outliers.
        assert_eq!((s[1], u[1]), (0.0, 300.0 / 127.0));
        assert_eq!(q[4..], [0, 0, 0, 0]);
        assert!(quantize_rows_i8_split(&x, 2, 4, 4, &[3, 1], &mut q, &mut s, &mut u).is_err());
        assert!(quantize_rows_i8_split(&x, 2, 4, 4, &[4], &mut q, &mut s, &mut u).is_err());
    }
}
