//! Error measures used by the tests, the reference numerics and the error tables.

/// Normalised mean squared error `Σ(a − r)² / Σ r²` (test-backend-ops' definition), in f64.
///
/// Returns NaN when the lengths differ, 0 for two all-zero vectors and +inf when only the
/// reference is all zero.
pub fn nmse(reference: &[f32], actual: &[f32]) -> f64 {
    if reference.len() != actual.len() {
        return f64::NAN;
    }
    let (mut err, mut norm) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(actual) {
        let d = a as f64 - r as f64;
        err += d * d;
        norm += r as f64 * r as f64;
    }
    if norm == 0.0 {
        return if err == 0.0 { 0.0 } else { f64::INFINITY };
    }
    err / norm
}

/// Spread of the block scales inside each row of a block form: for each row, the ratio of the
/// largest to the median non-zero |scale|. Rows with a large ratio lose the most precision in the
/// row-wise int8 form (its one scale must cover the largest block). Empty when rows have no groups.
pub fn scale_spread(form: &crate::BlockForm) -> Vec<f32> {
    let g = form.groups_per_row();
    if g == 0 {
        return Vec::new();
    }
    form.scales
        .chunks(g)
        .map(|s| {
            let mut a: Vec<f32> = s.iter().map(|v| v.abs()).filter(|v| *v > 0.0).collect();
            if a.is_empty() {
                return 0.0;
            }
            a.sort_by(f32::total_cmp);
            a[a.len() - 1] / a[a.len() / 2]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmse_edges() {
        assert_eq!(nmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((nmse(&[1.0, 0.0], &[1.5, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(nmse(&[0.0], &[0.0]), 0.0);
        assert_eq!(nmse(&[0.0], &[1.0]), f64::INFINITY);
        assert!(nmse(&[0.0], &[]).is_nan());
    }
}
