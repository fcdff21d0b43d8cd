//! Matrix kernels of the interpreter: `out[n, m] = finish(dot(a[n, :], bt[m, :]))`.
//!
//! Both operands are row-major with K contiguous (`a [N, K]`, `bt [M, K]`), so every output is one
//! contiguous dot product. The int8 kernel accumulates exactly in i32; the f32 kernel accumulates in
//! eight fixed lanes reduced in a fixed order, so the AVX2 and portable paths give the same bits.
//! Rows of the output are split across threads; columns are walked in blocks that stay in cache.

use half::f16;

/// Bytes of `bt` one column block should occupy (fits a typical L2 with room for rows of `a`).
const BLOCK_BYTES: usize = 256 * 1024;

/// Splits the `n` output rows (each `m` long) into up to `threads` even-row chunks and runs `f` on
/// each as `(first_row, rows, out_chunk)`.
fn par_rows(
    out: &mut [f16],
    n: usize,
    m: usize,
    threads: usize,
    f: impl Fn(usize, usize, &mut [f16]) + Sync,
) {
    let threads = threads.clamp(1, n.div_ceil(2).max(1));
    if threads == 1 || m == 0 {
        f(0, n, out);
        return;
    }
    // Even chunk sizes keep the 2-row kernel busy.
    let rows_per = n.div_ceil(threads).next_multiple_of(2);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(rows_per * m).enumerate() {
            let f = &f;
            let rows = chunk.len() / m;
            s.spawn(move || f(i * rows_per, rows, chunk));
        }
    });
}

/// Columns per block for elements of `elem` bytes and length `k`, a multiple of 4.
fn col_block(k: usize, elem: usize) -> usize {
    (BLOCK_BYTES / (k * elem).max(1)).max(4) / 4 * 4
}

/// int8 × int8 → i32 exact, then `fp16(sum · scale)` (scale applied in f64: one rounding, to fp16).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_i8(
    a: &[i8],
    bt: &[i8],
    n: usize,
    m: usize,
    k: usize,
    scale: f64,
    out: &mut [f16],
    threads: usize,
) {
    debug_assert!(a.len() >= n * k && bt.len() >= m * k && out.len() >= n * m);
    let out = &mut out[..n * m];
    let finish = |v: i32| f16::from_f64(f64::from(v) * scale);
    let kernel = i8_kernel();
    par_rows(out, n, m, threads, |r0, rows, chunk| {
        let cb = col_block(k, 1);
        let mut c0 = 0;
        while c0 < m {
            let c1 = (c0 + cb).min(m);
            let mut r = 0;
            while r < rows {
                let a0 = &a[(r0 + r) * k..(r0 + r + 1) * k];
                if r + 1 < rows {
                    let a1 = &a[(r0 + r + 1) * k..(r0 + r + 2) * k];
                    let mut c = c0;
                    while c + 4 <= c1 {
                        let b = [0, 1, 2, 3].map(|j| &bt[(c + j) * k..(c + j + 1) * k]);
                        let acc = kernel(a0, a1, b);
                        for j in 0..4 {
                            chunk[r * m + c + j] = finish(acc[0][j]);
                            chunk[(r + 1) * m + c + j] = finish(acc[1][j]);
                        }
                        c += 4;
                    }
                    for c in c..c1 {
                        let b = &bt[c * k..(c + 1) * k];
                        chunk[r * m + c] = finish(dot_i8(a0, b));
                        chunk[(r + 1) * m + c] = finish(dot_i8(a1, b));
                    }
                    r += 2;
                } else {
                    for c in c0..c1 {
                        chunk[r * m + c] = finish(dot_i8(a0, &bt[c * k..(c + 1) * k]));
                    }
                    r += 1;
                }
            }
            c0 = c1;
        }
    });
}

/// f32 dot products (eight lanes, fixed reduction order), each rounded once to fp16.
pub(crate) fn gemm_f32(
    a: &[f32],
    bt: &[f32],
    n: usize,
    m: usize,
    k: usize,
    out: &mut [f16],
    threads: usize,
) {
    debug_assert!(a.len() >= n * k && bt.len() >= m * k && out.len() >= n * m);
    let out = &mut out[..n * m];
    let kernel = f32_kernel();
    par_rows(out, n, m, threads, |r0, rows, chunk| {
        let cb = col_block(k, 4);
        let mut c0 = 0;
        while c0 < m {
            let c1 = (c0 + cb).min(m);
            let mut r = 0;
            while r < rows {
                let a0 = &a[(r0 + r) * k..(r0 + r + 1) * k];
                let a1 = if r + 1 < rows {
                    &a[(r0 + r + 1) * k..(r0 + r + 2) * k]
                } else {
                    a0
                };
                let two = r + 1 < rows;
                let mut c = c0;
                while c + 4 <= c1 {
                    let b = [0, 1, 2, 3].map(|j| &bt[(c + j) * k..(c + j + 1) * k]);
                    let acc = kernel(a0, a1, b);
                    for j in 0..4 {
                        chunk[r * m + c + j] = f16::from_f32(acc[0][j]);
                        if two {
                            chunk[(r + 1) * m + c + j] = f16::from_f32(acc[1][j]);
                        }
                    }
                    c += 4;
                }
                for c in c..c1 {
                    let b = &bt[c * k..(c + 1) * k];
                    chunk[r * m + c] = f16::from_f32(dot_f32(a0, b));
                    if two {
                        chunk[(r + 1) * m + c] = f16::from_f32(dot_f32(a1, b));
                    }
                }
                r += if two { 2 } else { 1 };
            }
            c0 = c1;
        }
    });
}

type I8Kernel = fn(&[i8], &[i8], [&[i8]; 4]) -> [[i32; 4]; 2];
type F32Kernel = fn(&[f32], &[f32], [&[f32]; 4]) -> [[f32; 4]; 2];

fn i8_kernel() -> I8Kernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return x86::i8_2x4;
    }
    i8_2x4_portable
}

fn f32_kernel() -> F32Kernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return x86::f32_2x4;
    }
    f32_2x4_portable
}

/// Exact int8 dot product (i32 cannot overflow: 128² · 16384 < 2³¹).
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

fn i8_2x4_portable(a0: &[i8], a1: &[i8], b: [&[i8]; 4]) -> [[i32; 4]; 2] {
    [b.map(|bj| dot_i8(a0, bj)), b.map(|bj| dot_i8(a1, bj))]
}

/// Sum of eight lanes in the order both kernels use.
#[inline(always)]
fn reduce8(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// f32 dot product: lane i accumulates elements i, i+8, …; the tail after the last full group of
/// eight is added to the reduced sum in order.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let full = a.len() / 8 * 8;
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += ca[i] * cb[i];
        }
    }
    let mut s = reduce8(lanes);
    for i in full..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn f32_2x4_portable(a0: &[f32], a1: &[f32], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
    [b.map(|bj| dot_f32(a0, bj)), b.map(|bj| dot_f32(a1, bj))]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{dot_i8, reduce8};

    /// Safe entry: only handed out by `i8_kernel` after AVX2 was detected.
    pub(super) fn i8_2x4(a0: &[i8], a1: &[i8], b: [&[i8]; 4]) -> [[i32; 4]; 2] {
        // SAFETY: selected only when `is_x86_feature_detected!("avx2")` returned true.
        unsafe { i8_2x4_avx2(a0, a1, b) }
    }

    pub(super) fn f32_2x4(a0: &[f32], a1: &[f32], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
        // SAFETY: selected only when `is_x86_feature_detected!("avx2")` returned true.
        unsafe { f32_2x4_avx2(a0, a1, b) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let mut l = [0i32; 8];
        // SAFETY: `l` is 32 writable bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), v) };
        l.iter().sum()
    }

    #[target_feature(enable = "avx2")]
    unsafe fn i8_2x4_avx2(a0: &[i8], a1: &[i8], b: [&[i8]; 4]) -> [[i32; 4]; 2] {
        let k = a0.len();
        debug_assert!(a1.len() == k && b.iter().all(|x| x.len() == k));
        let full = k / 16 * 16;
        let mut acc0 = [_mm256_setzero_si256(); 4];
        let mut acc1 = [_mm256_setzero_si256(); 4];
        // Zipped chunk iterators: no index arithmetic or bounds checks in the hot loop.
        let chunks = a0[..full]
            .chunks_exact(16)
            .zip(a1[..full].chunks_exact(16))
            .zip(b[0][..full].chunks_exact(16))
            .zip(b[1][..full].chunks_exact(16))
            .zip(b[2][..full].chunks_exact(16))
            .zip(b[3][..full].chunks_exact(16));
        for (((((c0, c1), x0), x1), x2), x3) in chunks {
            // SAFETY: every chunk is exactly 16 bytes; loadu has no alignment requirement.
            unsafe {
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(c0.as_ptr().cast()));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(c1.as_ptr().cast()));
                for (j, xs) in [x0, x1, x2, x3].into_iter().enumerate() {
                    let x = _mm256_cvtepi8_epi16(_mm_loadu_si128(xs.as_ptr().cast()));
                    // Pairs of i16 products summed into i32: |2·128·128| fits, no saturation.
                    acc0[j] = _mm256_add_epi32(acc0[j], _mm256_madd_epi16(w0, x));
                    acc1[j] = _mm256_add_epi32(acc1[j], _mm256_madd_epi16(w1, x));
                }
            }
        }
        let mut out = [[0i32; 4]; 2];
        for j in 0..4 {
            // SAFETY: AVX2 is enabled for this function.
            let (s0, s1) = unsafe { (hsum_epi32(acc0[j]), hsum_epi32(acc1[j])) };
            out[0][j] = s0 + dot_i8(&a0[full..], &b[j][full..]);
            out[1][j] = s1 + dot_i8(&a1[full..], &b[j][full..]);
        }
        out
    }

    #[target_feature(enable = "avx2")]
    unsafe fn f32_2x4_avx2(a0: &[f32], a1: &[f32], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = a0.len();
        debug_assert!(a1.len() == k && b.iter().all(|x| x.len() == k));
        let full = k / 8 * 8;
        let mut acc0 = [_mm256_setzero_ps(); 4];
        let mut acc1 = [_mm256_setzero_ps(); 4];
        let chunks = a0[..full]
            .chunks_exact(8)
            .zip(a1[..full].chunks_exact(8))
            .zip(b[0][..full].chunks_exact(8))
            .zip(b[1][..full].chunks_exact(8))
            .zip(b[2][..full].chunks_exact(8))
            .zip(b[3][..full].chunks_exact(8));
        for (((((c0, c1), x0), x1), x2), x3) in chunks {
            // SAFETY: every chunk is exactly 8 floats; loadu has no alignment requirement.
            unsafe {
                let w0 = _mm256_loadu_ps(c0.as_ptr());
                let w1 = _mm256_loadu_ps(c1.as_ptr());
                for (j, xs) in [x0, x1, x2, x3].into_iter().enumerate() {
                    let x = _mm256_loadu_ps(xs.as_ptr());
                    // Separate mul and add (no FMA): the same roundings as the portable lanes.
                    acc0[j] = _mm256_add_ps(acc0[j], _mm256_mul_ps(w0, x));
                    acc1[j] = _mm256_add_ps(acc1[j], _mm256_mul_ps(w1, x));
                }
            }
        }
        let mut out = [[0f32; 4]; 2];
        for j in 0..4 {
            let mut l0 = [0f32; 8];
            let mut l1 = [0f32; 8];
            // SAFETY: each array is 32 writable bytes; storeu has no alignment requirement.
            unsafe {
                _mm256_storeu_ps(l0.as_mut_ptr(), acc0[j]);
                _mm256_storeu_ps(l1.as_mut_ptr(), acc1[j]);
            }
            let (mut s0, mut s1) = (reduce8(l0), reduce8(l1));
            for t in full..k {
                s0 += a0[t] * b[j][t];
                s1 += a1[t] * b[j][t];
            }
            out[0][j] = s0;
            out[1][j] = s1;
        }
        out
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in tiles so both sides stay in cache.
pub(crate) fn transpose<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const T: usize = 32;
    let mut dst = vec![T::default(); rows * cols];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn i8_matches_naive_on_odd_shapes() {
        let mut s = 7;
        for &(n, m, k) in &[(1, 1, 1), (3, 5, 17), (7, 9, 33), (2, 4, 16), (5, 130, 70)] {
            let a: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let bt: Vec<i8> = (0..m * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            for threads in [1, 3] {
                let mut out = vec![f16::ZERO; n * m];
                gemm_i8(&a, &bt, n, m, k, 1.0 / 1024.0, &mut out, threads);
                for r in 0..n {
                    for c in 0..m {
                        let want = dot_i8(&a[r * k..(r + 1) * k], &bt[c * k..(c + 1) * k]);
                        assert_eq!(
                            out[r * m + c],
                            f16::from_f64(f64::from(want) / 1024.0),
                            "{n}x{m}x{k} at {r},{c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_int8_values_do_not_saturate() {
        let k = 64;
        let a = vec![-128i8; 2 * k];
        let bt = vec![-128i8; 4 * k];
        let mut out = vec![f16::ZERO; 8];
        gemm_i8(&a, &bt, 2, 4, k, 1.0 / 1024.0, &mut out, 1);
        assert!(
            out.iter()
                .all(|&v| v == f16::from_f64(128.0 * 128.0 * 64.0 / 1024.0))
        );
    }

    #[test]
    fn f32_kernels_agree_bit_for_bit() {
        let mut s = 11;
        for &(n, m, k) in &[(2, 4, 8), (3, 7, 29), (4, 8, 100)] {
            let a: Vec<f32> = (0..n * k)
                .map(|_| lcg(&mut s) as f32 / u32::MAX as f32 - 0.5)
                .collect();
            let bt: Vec<f32> = (0..m * k)
                .map(|_| lcg(&mut s) as f32 / u32::MAX as f32 - 0.5)
                .collect();
            let mut out = vec![f16::ZERO; n * m];
            gemm_f32(&a, &bt, n, m, k, &mut out, 2);
            for r in 0..n {
                for c in 0..m {
                    let want = dot_f32(&a[r * k..(r + 1) * k], &bt[c * k..(c + 1) * k]);
                    assert_eq!(out[r * m + c], f16::from_f32(want));
                }
            }
            let b4 = [0, 1, 2, 3].map(|j| &bt[j * k..(j + 1) * k]);
            assert_eq!(
                f32_kernel()(&a[..k], &a[k..2 * k], b4),
                f32_2x4_portable(&a[..k], &a[k..2 * k], b4)
            );
        }
    }

    #[test]
    fn transpose_round_trips() {
        let v: Vec<u16> = (0..35 * 70).map(|x| x as u16).collect();
        let t = transpose(&v, 35, 70);
        assert_eq!(t[3 * 35 + 2], v[2 * 70 + 3]);
        assert_eq!(transpose(&t, 70, 35), v);
    }
}
