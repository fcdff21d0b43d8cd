//! Matrix kernels of the interpreter: `out[n, m] = finish(Σ_k a[n, k] · b[k, m])`.
//!
//! `a` is row-major `[N, K]`; `b` is either the program's `[K, M]` (tokens innermost) or `[M, K]`.
//! The output is row-major `[N, M]` fp16.
//!
//! - int8 × int8 accumulates exactly in i32 and rounds `sum · scale` once to fp16 (see
//!   [`f16_round_once`]). With AVX-512 VNNI the product runs on packed panels of `b`; elsewhere on
//!   contiguous dot products. Both give the same bits.
//! - fp16 × fp16 multiplies in f32 (exact: fp16 products fit f32) and accumulates in eight fixed lanes
//!   reduced in a fixed order, so the AVX-512, AVX2 and portable paths give the same bits; each
//!   output is rounded once to fp16. The left operand may be the w8f16 block dequantisation
//!   ([`ARows::Block`]), made row block by row block on every path (never a whole `[N, K]` copy).
//!
//! Trailing all-zero columns of `b` (the M padding of a bucket) are not multiplied: identical columns
//! give identical outputs, so their value is computed once and copied. Rows of the output are split
//! across threads when the work is large enough to pay for the spawn, in chunks taken on demand.

use half::f16;

/// Bytes of `b` one column block should occupy (fits a typical L2 with room for rows of `a`).
const BLOCK_BYTES: usize = 256 * 1024;

/// Multiply-adds below which a matmul runs on the calling thread only (a spawn costs tens of µs).
const MIN_WORK_PER_THREAD: usize = 1 << 23;

/// How the right operand `b` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BLayout {
    /// `[K, M]` row-major: the program's `x`, tokens innermost.
    KM,
    /// `[M, K]` row-major.
    MK,
}

/// Threads worth using for `macs` multiply-adds.
fn useful_threads(threads: usize, macs: usize) -> usize {
    threads.clamp(1, (macs / MIN_WORK_PER_THREAD).max(1))
}

/// Chunks of output rows per thread: threads take chunks as they finish the previous one, so a
/// thread the OS runs late (2 shared cores, ggml's own workers spinning) ends up with fewer.
const CHUNKS_PER_THREAD: usize = 4;

/// Runs `f(first_row, rows, out_rows)` over the `n` output rows (each `m` long) on up to `threads`
/// threads (the calling one included), in chunks whose row counts are multiples of `align` (but the
/// last), handed out on demand.
fn par_rows(
    out: &mut [f16],
    n: usize,
    m: usize,
    threads: usize,
    align: usize,
    f: impl Fn(usize, usize, &mut [f16]) + Sync,
) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let align = align.max(1);
    let threads = threads.clamp(1, n.div_ceil(align).max(1));
    if threads == 1 || m == 0 {
        f(0, n, out);
        return;
    }
    let rows_per = n
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .next_multiple_of(align);
    let chunks: Vec<Mutex<Option<&mut [f16]>>> = out[..n * m]
        .chunks_mut(rows_per * m)
        .map(|c| Mutex::new(Some(c)))
        .collect();
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = chunks.get(i) else { break };
            // Each index is taken once, so the chunk is there; a poisoned lock still holds it.
            if let Some(c) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                f(i * rows_per, c.len() / m, c);
            }
        }
    };
    if let Some(pool) = crate::pool::current() {
        pool.run(&|_| work());
        // Whatever the pool's workers did not take (a pool may run fewer of them), this thread does.
        work();
        return;
    }
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
}

/// Columns per block for elements of `elem` bytes and length `k`, a multiple of 4.
fn col_block(k: usize, elem: usize) -> usize {
    (BLOCK_BYTES / (k * elem).max(1)).max(4) / 4 * 4
}

/// A buffer whose slice starts on a 64-byte boundary, so whole-vector loads never split cache lines.
// Only the x86_64 kernels pack into it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl<T: Copy> Aligned<T> {
    pub(crate) fn new(len: usize, fill: T) -> Aligned<T> {
        let extra = 64 / size_of::<T>().max(1);
        let buf = vec![fill; len + extra];
        let off = buf.as_ptr().align_offset(64).min(extra);
        Aligned { buf, off, len }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `fp16(d)` with a single rounding (round to nearest, ties to even), also where `half` would round
/// twice (its F16C route converts f64 to f32 first).
///
/// The f32 step rounds to odd (truncate, then set the last bit when inexact): f32 keeps more than
/// two bits beyond fp16's precision over the whole fp16 range, so the final rounding to fp16 gives
/// the correctly rounded result.
#[inline]
pub(crate) fn f16_round_once(d: f64) -> f16 {
    let t = d as f32;
    let back = f64::from(t);
    if back == d || d.is_nan() {
        return f16::from_f32(t);
    }
    let mut bits = t.to_bits();
    if back.abs() > d.abs() {
        // `t` was rounded away from zero (finite or to infinity): one step back toward zero.
        bits -= 1;
    }
    f16::from_f32(f32::from_bits(bits | 1))
}

/// One past the last column of `b` holding an element with nonzero `bits`.
fn live_cols<T: Copy>(
    b: &[T],
    layout: BLayout,
    m: usize,
    k: usize,
    bits: impl Fn(T) -> u32 + Copy,
) -> usize {
    if m == 0 || k == 0 {
        return 0;
    }
    match layout {
        BLayout::KM => {
            let mut live = 0;
            for row in b[..k * m].chunks_exact(m) {
                if live == m {
                    break;
                }
                if let Some(p) = last_nonzero(&row[live..], bits) {
                    live += p + 1;
                }
            }
            live
        }
        BLayout::MK => (0..m)
            .rev()
            .find(|&c| last_nonzero(&b[c * k..(c + 1) * k], bits).is_some())
            .map_or(0, |c| c + 1),
    }
}

/// Index of the last element with nonzero `bits`; all-zero stretches are skipped 32 at a time
/// (the OR over a chunk vectorises, a search element by element does not).
fn last_nonzero<T: Copy>(v: &[T], bits: impl Fn(T) -> u32) -> Option<usize> {
    let mut end = v.len();
    while end > 0 {
        let start = end.saturating_sub(32);
        let chunk = &v[start..end];
        if chunk.iter().fold(0, |a, &x| a | bits(x)) != 0 {
            return chunk.iter().rposition(|&x| bits(x) != 0).map(|p| start + p);
        }
        end = start;
    }
    None
}

/// Columns `0..cols` of `b` as `[cols, K]` rows, converted by `f`.
fn cols_as_rows<T: Copy, U: Copy + Default>(
    b: &[T],
    layout: BLayout,
    m: usize,
    k: usize,
    cols: usize,
    f: impl Fn(T) -> U,
) -> Vec<U> {
    let mut bt = vec![U::default(); cols * k];
    match layout {
        BLayout::MK => {
            for (d, &s) in bt.iter_mut().zip(&b[..cols * k]) {
                *d = f(s);
            }
        }
        BLayout::KM => {
            // Tiles so both sides stay in cache.
            const T: usize = 32;
            for k0 in (0..k).step_by(T) {
                for c0 in (0..cols).step_by(T) {
                    for kk in k0..(k0 + T).min(k) {
                        let row = &b[kk * m..kk * m + cols];
                        for c in c0..(c0 + T).min(cols) {
                            bt[c * k + kk] = f(row[c]);
                        }
                    }
                }
            }
        }
    }
    bt
}

/// int8 × int8 → i32 exact, then `fp16(sum · scale)` rounded once ([`f16_round_once`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_i8(
    a: &[i8],
    b: &[i8],
    layout: BLayout,
    n: usize,
    m: usize,
    k: usize,
    scale: f64,
    out: &mut [f16],
    threads: usize,
) {
    debug_assert!(a.len() >= n * k && b.len() >= m * k && out.len() >= n * m);
    let out = &mut out[..n * m];
    if n == 0 || m == 0 {
        return;
    }
    let cols = live_cols(b, layout, m, k, |v| u32::from(v as u8));
    // Every dead column is all zeros: its sums are 0.
    let zero = f16_round_once(0.0 * scale);
    let threads = useful_threads(threads, n * k * cols.max(8));
    #[cfg(target_arch = "x86_64")]
    if cols > 0 && k <= vnni::MAX_K && scale.is_finite() && vnni::available() {
        vnni::gemm(a, b, layout, n, m, k, cols, scale, zero, out, threads);
        return;
    }
    let bt = cols_as_rows(b, layout, m, k, cols, |v| v);
    let kernel = i8_kernel();
    let finish = |v: i32| f16_round_once(f64::from(v) * scale);
    par_rows(out, n, m, threads, 2, |r0, rows, chunk| {
        for r in 0..rows {
            chunk[r * m + cols..(r + 1) * m].fill(zero);
        }
        let cb = col_block(k, 1);
        let mut c0 = 0;
        while c0 < cols {
            let c1 = (c0 + cb).min(cols);
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

/// The left operand of the fp16 GEMM, produced row by row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ARows<'a> {
    /// `[N, K]` fp16 values.
    F16(&'a [f16]),
    /// The w8f16 weight: `fp16(fp16(q · scale) + offset)` per element, with one scale (and offset) per
    /// block of `group` values along K — exactly the roundings of the program's `mul` and `add` ops
    /// (each computed in f32 and rounded to fp16); `q · scale` is exact in f32.
    Block {
        q: &'a [i8],
        scales: &'a [f16],
        offsets: Option<&'a [f16]>,
        group: usize,
    },
}

impl ARows<'_> {
    /// True when the data covers `n` rows of `k`.
    pub(crate) fn covers(&self, n: usize, k: usize) -> bool {
        match *self {
            ARows::F16(a) => a.len() >= n * k,
            ARows::Block {
                q,
                scales,
                offsets,
                group,
            } => {
                group > 0
                    && k.is_multiple_of(group)
                    && q.len() >= n * k
                    && scales.len() >= n * (k / group)
                    && offsets.is_none_or(|o| o.len() >= n * (k / group))
            }
        }
    }

    /// Row `r` as f32 into `out[..k]`.
    fn fill(&self, r: usize, k: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let out = &mut out[..k];
        match *self {
            ARows::F16(a) => a[r * k..(r + 1) * k].convert_to_f32_slice(out),
            ARows::Block {
                q,
                scales,
                offsets,
                group,
            } => {
                let blocks = k / group;
                let q = &q[r * k..(r + 1) * k];
                for (b, (o, q)) in out
                    .chunks_exact_mut(group)
                    .zip(q.chunks_exact(group))
                    .enumerate()
                {
                    let s = scales[r * blocks + b].to_f32();
                    let off = offsets.map(|v| v[r * blocks + b].to_f32());
                    for (o, &q) in o.iter_mut().zip(q) {
                        let w = f16::from_f32(f32::from(q) * s).to_f32();
                        *o = match off {
                            Some(off) => f16::from_f32(w + off).to_f32(),
                            None => w,
                        };
                    }
                }
            }
        }
    }
}

/// fp16 × fp16 with f32 products and sums (see [`gemm_f32`]); `a` gives the `[N, K]` rows, `b` is
/// laid out as `layout` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    a: ARows<'_>,
    b: &[f16],
    layout: BLayout,
    n: usize,
    m: usize,
    k: usize,
    out: &mut [f16],
    threads: usize,
) {
    assert!(a.covers(n, k) && b.len() >= m * k && out.len() >= n * m);
    let out = &mut out[..n * m];
    if n == 0 || m == 0 {
        return;
    }
    // Dead columns are bitwise zero and identical: compute the first of them, copy it to the rest.
    let cols = (live_cols(b, layout, m, k, |v: f16| u32::from(v.to_bits())) + 1).min(m);
    let threads = useful_threads(threads, n * k * cols);
    #[cfg(target_arch = "x86_64")]
    if k > 0 && avx512::available() {
        avx512::gemm(a, b, layout, n, m, k, cols, out, threads);
    } else {
        gemm_rows_dots(a, b, layout, n, m, k, cols, out, threads);
    }
    #[cfg(not(target_arch = "x86_64"))]
    gemm_rows_dots(a, b, layout, n, m, k, cols, out, threads);
    if cols < m {
        for row in out.chunks_exact_mut(m) {
            let v = row[cols - 1];
            row[cols..].fill(v);
        }
    }
}

/// Bytes of `a` rows [`gemm_rows_dots`] converts to f32 at once (reused across every column).
const ROW_BLOCK_BYTES: usize = 128 * 1024;

/// [`gemm_rows`] through contiguous dot products (the kernels of [`f32_rows`]). Each thread converts its rows
/// of `a` to f32 a block at a time (vector conversions where the CPU has AVX2 and F16C, the same bits
/// as [`ARows::fill`]) and runs every column on the block: no `[N, K]` f32 copy of the weight per call
/// (for a decode step's output layer that copy cost more than the product).
#[allow(clippy::too_many_arguments)]
fn gemm_rows_dots(
    a: ARows<'_>,
    b: &[f16],
    layout: BLayout,
    n: usize,
    m: usize,
    k: usize,
    cols: usize,
    out: &mut [f16],
    threads: usize,
) {
    let bt = cols_as_rows(b, layout, m, k, cols, f16::to_f32);
    let kernel = f32_kernel();
    let fill = row_filler();
    let block = (ROW_BLOCK_BYTES / (k * 4).max(1)).clamp(2, 64) / 2 * 2;
    par_rows(out, n, m, threads, 2, |r0, rows, chunk| {
        let mut abuf = vec![0f32; block.min(rows) * k];
        for sb in (0..rows).step_by(block) {
            let sbr = block.min(rows - sb);
            if k > 0 {
                for (i, row) in abuf.chunks_exact_mut(k).take(sbr).enumerate() {
                    fill(a, r0 + sb + i, k, row);
                }
            }
            f32_rows(
                kernel,
                &abuf[..sbr * k],
                &bt,
                sbr,
                cols,
                m,
                k,
                &mut chunk[sb * m..(sb + sbr) * m],
            );
        }
    });
}

/// Row `r` of `a` as f32 into `out[..k]`.
type RowFill = fn(ARows<'_>, usize, usize, &mut [f32]);

/// [`ARows::fill`], with vector conversions where the CPU has them (same bits).
fn row_filler() -> RowFill {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        return x86::fill;
    }
    |a, r, k, out| a.fill(r, k, out)
}

/// f32 dot products (eight lanes, fixed reduction order), each rounded once to fp16, for the first
/// `cols` columns of each output row of length `m` (`bt` is `[cols, K]`): the reference the tests
/// hold the row-block paths to.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    a: &[f32],
    bt: &[f32],
    n: usize,
    cols: usize,
    m: usize,
    k: usize,
    out: &mut [f16],
    threads: usize,
) {
    debug_assert!(a.len() >= n * k && bt.len() >= cols * k && out.len() >= n * m);
    let out = &mut out[..n * m];
    let kernel = f32_kernel();
    par_rows(out, n, m, threads, 2, |r0, rows, chunk| {
        f32_rows(
            kernel,
            &a[r0 * k..(r0 + rows) * k],
            bt,
            rows,
            cols,
            m,
            k,
            chunk,
        );
    });
}

/// f32 dot products (eight lanes, fixed reduction order), each rounded once to fp16, for the first
/// `cols` columns of `rows` rows of `a` (`[rows, K]`) into `chunk` (`[rows, m]`, rows of length `m`;
/// `bt` is `[cols, K]`), on this thread.
#[allow(clippy::too_many_arguments)]
fn f32_rows(
    kernel: F32Kernel,
    a: &[f32],
    bt: &[f32],
    rows: usize,
    cols: usize,
    m: usize,
    k: usize,
    chunk: &mut [f16],
) {
    let cb = col_block(k, 4);
    let mut c0 = 0;
    while c0 < cols {
        let c1 = (c0 + cb).min(cols);
        let mut r = 0;
        while r < rows {
            let a0 = &a[r * k..(r + 1) * k];
            let a1 = if r + 1 < rows {
                &a[(r + 1) * k..(r + 2) * k]
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

    use half::slice::HalfFloatSliceExt;

    use super::{ARows, dot_i8, reduce8};

    /// Safe entry: only handed out by `row_filler` after AVX2 and F16C were detected.
    pub(super) fn fill(a: ARows<'_>, r: usize, k: usize, out: &mut [f32]) {
        // SAFETY: selected only when AVX2 and F16C were detected.
        unsafe { fill_f16c(a, r, k, out) }
    }

    /// One fp16 to f32 inline (`half` would detect F16C on every call).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn h2f(h: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
    }

    /// [`ARows::fill`] eight values at a time: F16C converts with round to nearest even, as `half`
    /// does (itself through F16C where the CPU has it), so the bits are the same.
    #[target_feature(enable = "avx2,f16c")]
    fn fill_f16c(a: ARows<'_>, r: usize, k: usize, out: &mut [f32]) {
        // Round to nearest even (VCVTPS2PH takes a 3-bit rounding immediate).
        const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;
        match a {
            ARows::F16(x) => {
                let (src, out) = (&x[r * k..(r + 1) * k], &mut out[..k]);
                let full = k / 8 * 8;
                for (s, d) in src[..full].chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                    // SAFETY: 8 fp16 readable and 8 f32 writable (chunk lengths); unaligned is fine.
                    unsafe {
                        let h = _mm_loadu_si128(s.as_ptr().cast());
                        _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                    }
                }
                src[full..].convert_to_f32_slice(&mut out[full..]);
            }
            ARows::Block {
                q,
                scales,
                offsets,
                group,
            } if group.is_multiple_of(8) => {
                let blocks = k / group;
                let (q, out) = (&q[r * k..(r + 1) * k], &mut out[..k]);
                let sc = &scales[r * blocks..(r + 1) * blocks];
                let of = offsets.map(|o| &o[r * blocks..(r + 1) * blocks]);
                for (b, (qg, og)) in q
                    .chunks_exact(group)
                    .zip(out.chunks_exact_mut(group))
                    .enumerate()
                {
                    let s = _mm256_set1_ps(h2f(sc[b]));
                    let o = of.map(|o| _mm256_set1_ps(h2f(o[b])));
                    for (qs, d) in qg.chunks_exact(8).zip(og.chunks_exact_mut(8)) {
                        // SAFETY: 8 int8 readable (chunk length); loadl reads exactly 8 bytes.
                        let qv = unsafe { _mm_loadl_epi64(qs.as_ptr().cast()) };
                        let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qv));
                        // `q · scale` is exact in f32; one rounding to fp16, as the program's `mul`.
                        let w = _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(_mm256_mul_ps(qf, s)));
                        let w = match o {
                            Some(o) => _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(_mm256_add_ps(w, o))),
                            None => w,
                        };
                        // SAFETY: 8 f32 writable (chunk length).
                        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), w) };
                    }
                }
            }
            _ => a.fill(r, k, out),
        }
    }

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
    fn hsum_epi32(v: __m256i) -> i32 {
        let mut l = [0i32; 8];
        // SAFETY: `l` is 32 writable bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), v) };
        l.iter().sum()
    }

    #[target_feature(enable = "avx2")]
    fn i8_2x4_avx2(a0: &[i8], a1: &[i8], b: [&[i8]; 4]) -> [[i32; 4]; 2] {
        let k = a0.len();
        assert!(a1.len() == k && b.iter().all(|x| x.len() == k));
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
            out[0][j] = hsum_epi32(acc0[j]) + dot_i8(&a0[full..], &b[j][full..]);
            out[1][j] = hsum_epi32(acc1[j]) + dot_i8(&a1[full..], &b[j][full..]);
        }
        out
    }

    #[target_feature(enable = "avx2")]
    fn f32_2x4_avx2(a0: &[f32], a1: &[f32], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = a0.len();
        assert!(a1.len() == k && b.iter().all(|x| x.len() == k));
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

/// int8 × int8 with AVX-512 VNNI (`vpdpbusd`: unsigned × signed bytes, four products summed into
/// each i32 lane, wrapping).
///
/// `b` is shifted to unsigned (`b + 128`, an xor of the sign bit) so `Σ a·(b + 128) = Σ a·b + 128·Σ a`;
/// the row sums of `a` are subtracted afterwards. Every partial sum fits i32 for `K <= MAX_K`, and the
/// arithmetic wraps, so the result is the exact integer product. Two kernels:
/// - panels: 16 columns of `b` × 4 values of K per 64 bytes; rows of `a` broadcast 4 bytes at a time
///   into a 6 × 64 tile of accumulators;
/// - dots (at most [`DOT_COLS`] live columns, e.g. decode): 64 values of K per step along rows of `a`.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Aligned, BLayout, f16_round_once, par_rows};

    /// Largest K for which `|Σ a·(b + 128)| <= 128·255·K` stays below 2³¹ (no reliance on wrapping).
    pub(super) const MAX_K: usize = 65536;
    /// Rows and column vectors (of 16) of one panel tile.
    const R: usize = 6;
    const C: usize = 4;
    /// Live columns up to which the dot kernel is used.
    const DOT_COLS: usize = 4;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Columns `0..cols` of `b` as unsigned panels: panel `v` holds columns `16v..16v+16`, K in groups
    /// of four, 64 bytes per group (`[column][k % 4]`); K is padded to `k4` and columns to 16 with
    /// 0x80 (value 0 after the shift; padded K meets zeros in `a` anyway).
    fn pack_panels(
        b: &[i8],
        layout: BLayout,
        m: usize,
        k: usize,
        cols: usize,
    ) -> (Aligned<u8>, usize) {
        let k4 = k.next_multiple_of(4);
        let vecs = cols.div_ceil(16);
        let ps = k4 * 16;
        let mut buf = Aligned::new(vecs * ps, 0x80u8);
        let p = buf.as_mut_slice();
        match layout {
            BLayout::KM => {
                let full_groups = k / 4;
                let full_vecs = if m >= vecs * 16 { vecs } else { cols / 16 };
                for g in 0..full_groups {
                    for v in 0..full_vecs {
                        let rows = [0, 1, 2, 3].map(|j| {
                            let s = (4 * g + j) * m + 16 * v;
                            &b[s..s + 16]
                        });
                        let dst = &mut p[v * ps + g * 64..v * ps + g * 64 + 64];
                        interleave4x16(rows, dst);
                    }
                }
                // Whatever the 4 × 16 blocks did not cover.
                for kk in 0..k {
                    let (g, j) = (kk / 4, kk % 4);
                    let c_from = if kk < full_groups * 4 {
                        full_vecs * 16
                    } else {
                        0
                    };
                    for c in c_from..cols {
                        p[(c / 16) * ps + g * 64 + (c % 16) * 4 + j] = b[kk * m + c] as u8 ^ 0x80;
                    }
                }
            }
            BLayout::MK => {
                for c in 0..cols {
                    let base = (c / 16) * ps + (c % 16) * 4;
                    for (kk, &v) in b[c * k..(c + 1) * k].iter().enumerate() {
                        p[base + (kk / 4) * 64 + kk % 4] = v as u8 ^ 0x80;
                    }
                }
            }
        }
        (buf, k4)
    }

    /// Four rows of 16 bytes → 16 columns of 4 bytes, sign bit flipped (SSE2, baseline on x86_64).
    fn interleave4x16(rows: [&[i8]; 4], dst: &mut [u8]) {
        assert!(rows.iter().all(|r| r.len() == 16) && dst.len() == 64);
        // SAFETY: each row is 16 readable bytes and `dst` 64 writable bytes (asserted); loadu/storeu
        // take unaligned pointers; SSE2 is part of the x86_64 baseline.
        unsafe {
            let flip = _mm_set1_epi8(i8::MIN);
            let [r0, r1, r2, r3] =
                rows.map(|r| _mm_xor_si128(_mm_loadu_si128(r.as_ptr().cast()), flip));
            let (t0, t1) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (t2, t3) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let d = dst.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(d, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(t1, t3));
        }
    }

    /// Runs the product; `cols >= 1` live columns, `zero` is the value of every dead column.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        a: &[i8],
        b: &[i8],
        layout: BLayout,
        n: usize,
        m: usize,
        k: usize,
        cols: usize,
        scale: f64,
        zero: f16,
        out: &mut [f16],
        threads: usize,
    ) {
        assert!(a.len() >= n * k && b.len() >= m * k && out.len() >= n * m && cols <= m);
        if cols <= DOT_COLS {
            // Live columns as contiguous unsigned rows [cols, K].
            let bt = super::cols_as_rows(b, layout, m, k, cols, |v: i8| v as u8 ^ 0x80);
            par_rows(out, n, m, threads, 4, |r0, rows, chunk| {
                for r in 0..rows {
                    chunk[r * m + cols..(r + 1) * m].fill(zero);
                }
                let a = &a[r0 * k..(r0 + rows) * k];
                // SAFETY: `available()` was checked by the caller before entering this module.
                unsafe { dots(a, &bt, rows, cols, m, k, scale, chunk) };
            });
            return;
        }
        let (panels, k4) = pack_panels(b, layout, m, k, cols);
        // Rows of `a` padded to k4 with zeros when K is not a multiple of 4.
        let padded: Option<Vec<i8>> = (k4 != k).then(|| {
            let mut p = vec![0i8; n * k4];
            for (d, s) in p.chunks_exact_mut(k4).zip(a.chunks_exact(k)) {
                d[..k].copy_from_slice(s);
            }
            p
        });
        let a = padded.as_deref().unwrap_or(&a[..n * k]);
        par_rows(out, n, m, threads, R, |r0, rows, chunk| {
            for r in 0..rows {
                chunk[r * m + cols..(r + 1) * m].fill(zero);
            }
            let a = &a[r0 * k4..(r0 + rows) * k4];
            // SAFETY: `available()` was checked by the caller before entering this module.
            unsafe { panel_rows(a, panels.as_slice(), rows, cols, m, k4, scale, chunk) };
        });
    }

    /// `out[r][c] = Σ a[r]·(bt[c] − 128)` for `rows` rows of `a` and `cols` unsigned rows of `bt`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn dots(
        a: &[i8],
        bt: &[u8],
        rows: usize,
        cols: usize,
        m: usize,
        k: usize,
        scale: f64,
        out: &mut [f16],
    ) {
        assert!(a.len() >= rows * k && bt.len() >= cols * k && out.len() >= rows * m);
        assert!((1..=DOT_COLS).contains(&cols));
        const DR: usize = 4;
        let ones = _mm512_set1_epi8(1);
        let tail = k % 64;
        let tail_mask: __mmask64 = if tail == 0 { 0 } else { (1u64 << tail) - 1 };
        let mut r = 0;
        while r < rows {
            let nr = DR.min(rows - r);
            let mut acc = [[_mm512_setzero_si512(); DOT_COLS]; DR];
            let mut sums = [_mm512_setzero_si512(); DR];
            let mut k0 = 0;
            while k0 < k {
                let mask = if k0 + 64 <= k { !0 } else { tail_mask };
                let mut bv = [_mm512_setzero_si512(); DOT_COLS];
                for (c, v) in bv.iter_mut().enumerate().take(cols) {
                    // SAFETY: bytes k0.. under `mask` lie inside row c of `bt` (asserted sizes);
                    // masked-off bytes are not read.
                    *v = unsafe {
                        _mm512_maskz_loadu_epi8(mask, bt.as_ptr().add(c * k + k0).cast())
                    };
                }
                for i in 0..nr {
                    // SAFETY: as above, inside row r + i of `a`.
                    let av = unsafe {
                        _mm512_maskz_loadu_epi8(mask, a.as_ptr().add((r + i) * k + k0).cast())
                    };
                    sums[i] = _mm512_dpbusd_epi32(sums[i], ones, av);
                    for c in 0..cols {
                        acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], bv[c], av);
                    }
                }
                k0 += 64;
            }
            for i in 0..nr {
                let corr = _mm512_reduce_add_epi32(sums[i]).wrapping_mul(128);
                for c in 0..cols {
                    let v = _mm512_reduce_add_epi32(acc[i][c]).wrapping_sub(corr);
                    out[(r + i) * m + c] = f16_round_once(f64::from(v) * scale);
                }
            }
            r += nr;
        }
    }

    /// The panel product for `rows` rows of `a` (stride `k4`) into the first `cols` columns of `out`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn panel_rows(
        a: &[i8],
        panels: &[u8],
        rows: usize,
        cols: usize,
        m: usize,
        k4: usize,
        scale: f64,
        out: &mut [f16],
    ) {
        let vecs = cols.div_ceil(16);
        let ps = k4 * 16;
        assert!(a.len() >= rows * k4 && panels.len() >= vecs * ps && out.len() >= rows * m);
        assert!(cols <= m);
        // Row sums of a, for the +128 correction.
        let sums: Vec<i32> = a[..rows * k4]
            .chunks_exact(k4.max(1))
            .map(|r| r.iter().map(|&v| i32::from(v)).sum::<i32>())
            .collect();
        // Column blocks of b that stay in L2 while every row block passes over them.
        let block = (super::BLOCK_BYTES / ps.max(1)).max(C) / C * C;
        let mut v0 = 0;
        while v0 < vecs {
            let v1 = (v0 + block).min(vecs);
            let mut r = 0;
            while r < rows {
                let nr = R.min(rows - r);
                let mut v = v0;
                while v < v1 {
                    let nc = C.min(v1 - v);
                    let t = Tile {
                        a: &a[r * k4..],
                        k4,
                        b: &panels[v * ps..],
                        ps,
                        sums: &sums[r..r + nr],
                        col0: v * 16,
                        cols,
                        m,
                        scale,
                    };
                    let o = &mut out[r * m..];
                    match (nr, nc) {
                        (6, 4) => t.run::<6, 4>(o),
                        (6, 3) => t.run::<6, 3>(o),
                        (6, 2) => t.run::<6, 2>(o),
                        (6, 1) => t.run::<6, 1>(o),
                        (5, _) => t.run_cols::<5>(nc, o),
                        (4, _) => t.run_cols::<4>(nc, o),
                        (3, _) => t.run_cols::<3>(nc, o),
                        (2, _) => t.run_cols::<2>(nc, o),
                        _ => t.run_cols::<1>(nc, o),
                    }
                    v += nc;
                }
                r += nr;
            }
            v0 = v1;
        }
    }

    /// One tile's operands: rows of `a` from its start, panels of `b` from the tile's first vector.
    struct Tile<'a> {
        a: &'a [i8],
        k4: usize,
        b: &'a [u8],
        ps: usize,
        sums: &'a [i32],
        col0: usize,
        cols: usize,
        m: usize,
        scale: f64,
    }

    impl Tile<'_> {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        fn run_cols<const NR: usize>(&self, nc: usize, out: &mut [f16]) {
            match nc {
                4 => self.run::<NR, 4>(out),
                3 => self.run::<NR, 3>(out),
                2 => self.run::<NR, 2>(out),
                _ => self.run::<NR, 1>(out),
            }
        }

        /// `NR` rows × `NC` column vectors; finishes into `out` (row stride `m`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        fn run<const NR: usize, const NC: usize>(&self, out: &mut [f16]) {
            let (k4, ps, groups) = (self.k4, self.ps, self.k4 / 4);
            assert!(self.a.len() >= (NR - 1) * k4 + k4 && self.b.len() >= (NC - 1) * ps + ps);
            assert!(self.sums.len() >= NR && out.len() >= (NR - 1) * self.m + self.cols);
            let (ap, bp) = (self.a.as_ptr(), self.b.as_ptr());
            let mut acc = [[_mm512_setzero_si512(); NC]; NR];
            for g in 0..groups {
                let mut bv = [_mm512_setzero_si512(); NC];
                for (c, v) in bv.iter_mut().enumerate() {
                    // SAFETY: panel c has `groups` groups of 64 bytes (asserted length).
                    *v = unsafe { _mm512_loadu_si512(bp.add(c * ps + g * 64).cast()) };
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row r of `a` has k4 = 4 · groups bytes (asserted length).
                    let w = unsafe { ap.add(r * k4 + g * 4).cast::<i32>().read_unaligned() };
                    let av = _mm512_set1_epi32(w);
                    for c in 0..NC {
                        acc[c] = _mm512_dpbusd_epi32(acc[c], bv[c], av);
                    }
                }
            }
            let scale = _mm512_set1_pd(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                let corr = _mm512_set1_epi32(self.sums[r].wrapping_mul(128));
                for (c, &v) in acc.iter().enumerate() {
                    let col = self.col0 + c * 16;
                    if col >= self.cols {
                        break;
                    }
                    let h = finish16(_mm512_sub_epi32(v, corr), scale);
                    let live = (self.cols - col).min(16);
                    let dst = &mut out[r * self.m + col..r * self.m + col + live];
                    // SAFETY: `dst` has `live` writable fp16 values and the mask covers exactly those.
                    unsafe {
                        _mm256_mask_storeu_epi16(
                            dst.as_mut_ptr().cast(),
                            (((1u32 << live) - 1) & 0xFFFF) as __mmask16,
                            h,
                        )
                    };
                }
            }
        }
    }

    /// `fp16(v · scale)` for 16 lanes, rounded once: the exact f64 product, rounded to odd in f32
    /// (truncate, set the last bit when inexact), then to nearest-even fp16 — the bits of
    /// [`f16_round_once`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn finish16(v: __m512i, scale: __m512d) -> __m256i {
        let odd = |d: __m512d| -> __m256i {
            let t = _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(d);
            let inexact = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(_mm512_cvtps_pd(t), d);
            let t = _mm256_castps_si256(t);
            _mm256_mask_or_epi32(t, inexact, t, _mm256_set1_epi32(1))
        };
        let lo = odd(_mm512_mul_pd(
            _mm512_cvtepi32_pd(_mm512_castsi512_si256(v)),
            scale,
        ));
        let hi = odd(_mm512_mul_pd(
            _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(v)),
            scale,
        ));
        let f = _mm512_castsi512_ps(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi));
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn finish16_matches_scalar() {
            if !super::available() {
                eprintln!("skipped: no AVX-512 VNNI");
                return;
            }
            let mut s = 3u64;
            for scale in [1.0 / 640.0, 2f64.powi(-20), 3.0e-5, 1.0, -0.25] {
                let mut vals = [0i32; 16];
                for _ in 0..2000 {
                    for v in vals.iter_mut() {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        *v = (s >> 32) as i32 >> ((s >> 8) % 31);
                    }
                    // SAFETY: features checked above; `vals` is 64 readable bytes.
                    let h = unsafe {
                        let v = _mm512_loadu_si512(vals.as_ptr().cast());
                        finish16(v, _mm512_set1_pd(scale))
                    };
                    let mut got = [0u16; 16];
                    // SAFETY: `got` is 32 writable bytes.
                    unsafe { _mm256_storeu_si256(got.as_mut_ptr().cast(), h) };
                    for (g, &v) in got.iter().zip(&vals) {
                        assert_eq!(
                            *g,
                            f16_round_once(f64::from(v) * scale).to_bits(),
                            "{v}·{scale}"
                        );
                    }
                }
            }
        }
    }
}

/// The fp16 GEMM with AVX-512F, bit for bit the eight-lane dot products of [`gemm_f32`].
///
/// One zmm holds the eight lanes of two output columns (column `2p` in the low half, `2p + 1` in the
/// high half); eight values of a row of `a` are broadcast to both halves. Lane `l` of a column still
/// sums the products of K indices `l, l + 8, …` in order, and the lanes are reduced in
/// [`reduce8`](super::reduce8)'s order. Products of fp16 values are exact in f32, so the fused
/// multiply-add rounds exactly like the portable multiply, then add.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;
    use half::slice::HalfFloatSliceExt;

    use super::{ARows, Aligned, BLayout, par_rows};

    /// Rows and column pairs of one tile.
    const R: usize = 6;
    const P: usize = 4;
    /// Rows of `a` converted to f32 at once (reused across every column).
    const SB: usize = 48;
    /// Bytes of packed `b` one pass over a row block covers.
    const CHUNK_BYTES: usize = 512 * 1024;
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// The first `cols` columns of `b` as f32 pair panels: pair `p`, group `j` holds column `2p`'s
    /// values `8j..8j+8`, then column `2p + 1`'s. K values past the last full group of eight go to
    /// `tail` (`[cols, k % 8]`).
    fn pack(
        b: &[f16],
        layout: BLayout,
        m: usize,
        k: usize,
        cols: usize,
    ) -> (Aligned<f32>, Vec<f32>) {
        let (k8, tk) = (k / 8, k % 8);
        let ps = k8 * 16;
        let mut buf = Aligned::new(cols.div_ceil(2) * ps, 0f32);
        let p = buf.as_mut_slice();
        let mut tail = vec![0f32; cols * tk];
        match layout {
            BLayout::KM => {
                let mut rows = vec![0f32; 8 * cols];
                for j in 0..k8 {
                    for (l, row) in rows.chunks_exact_mut(cols).enumerate() {
                        let kk = 8 * j + l;
                        b[kk * m..kk * m + cols].convert_to_f32_slice(row);
                    }
                    for c in 0..cols {
                        let d = &mut p[(c / 2) * ps + j * 16 + (c % 2) * 8..][..8];
                        for (l, d) in d.iter_mut().enumerate() {
                            *d = rows[l * cols + c];
                        }
                    }
                }
                for kk in 8 * k8..k {
                    for c in 0..cols {
                        tail[c * tk + kk - 8 * k8] = b[kk * m + c].to_f32();
                    }
                }
            }
            BLayout::MK => {
                for c in 0..cols {
                    let col = &b[c * k..(c + 1) * k];
                    for j in 0..k8 {
                        let d = &mut p[(c / 2) * ps + j * 16 + (c % 2) * 8..][..8];
                        col[8 * j..8 * j + 8].convert_to_f32_slice(d);
                    }
                    col[8 * k8..].convert_to_f32_slice(&mut tail[c * tk..(c + 1) * tk]);
                }
            }
        }
        (buf, tail)
    }

    /// Runs the product for the first `cols` columns (`a.covers(n, k)` and `k > 0` hold).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        a: ARows<'_>,
        b: &[f16],
        layout: BLayout,
        n: usize,
        m: usize,
        k: usize,
        cols: usize,
        out: &mut [f16],
        threads: usize,
    ) {
        assert!(a.covers(n, k) && k > 0 && cols >= 1 && cols <= m && out.len() >= n * m);
        let (bp, tail) = pack(b, layout, m, k, cols);
        let ps = (k / 8) * 16;
        let pairs = cols.div_ceil(2);
        let chunk = (CHUNK_BYTES / (ps * 4).max(1)).max(P) / P * P;
        par_rows(out, n, m, threads, R, |r0, rows, out| {
            let mut abuf = Aligned::new(SB.min(rows) * k, 0f32);
            let abuf = abuf.as_mut_slice();
            for sb in (0..rows).step_by(SB) {
                let sbr = SB.min(rows - sb);
                for (i, row) in abuf.chunks_exact_mut(k).take(sbr).enumerate() {
                    // SAFETY: `available()` was checked by the caller before entering this module.
                    unsafe { fill(a, r0 + sb + i, k, row) };
                }
                for p0 in (0..pairs).step_by(chunk) {
                    let p1 = (p0 + chunk).min(pairs);
                    for r in (0..sbr).step_by(R) {
                        let nr = R.min(sbr - r);
                        for p in (p0..p1).step_by(P) {
                            let np = P.min(p1 - p);
                            let t = Tile {
                                a: &abuf[r * k..(r + nr) * k],
                                k,
                                bp: &bp.as_slice()[p * ps..(p + np) * ps],
                                ps,
                                tail: &tail,
                                col0: 2 * p,
                                cols,
                                m,
                            };
                            let o = &mut out[(sb + r) * m..];
                            // SAFETY: as above.
                            unsafe { t.run_dyn(nr, np, o) };
                        }
                    }
                }
            }
        });
    }

    /// Row `r` of `a` as f32 into `out[..k]`: [`ARows::fill`] with vector conversions (same bits).
    #[target_feature(enable = "avx512f")]
    fn fill(a: ARows<'_>, r: usize, k: usize, out: &mut [f32]) {
        match a {
            ARows::F16(x) => {
                let (src, out) = (&x[r * k..(r + 1) * k], &mut out[..k]);
                let full = k / 16 * 16;
                for (s, d) in src[..full].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                    // SAFETY: 16 fp16 readable and 16 f32 writable (chunk lengths); unaligned is fine.
                    unsafe {
                        let h = _mm256_loadu_si256(s.as_ptr().cast());
                        _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(h));
                    }
                }
                src[full..].convert_to_f32_slice(&mut out[full..]);
            }
            ARows::Block {
                q,
                scales,
                offsets,
                group,
            } if group.is_multiple_of(16) => {
                let blocks = k / group;
                let (q, out) = (&q[r * k..(r + 1) * k], &mut out[..k]);
                let sc = &scales[r * blocks..(r + 1) * blocks];
                let of = offsets.map(|o| &o[r * blocks..(r + 1) * blocks]);
                for (b, (qg, og)) in q
                    .chunks_exact(group)
                    .zip(out.chunks_exact_mut(group))
                    .enumerate()
                {
                    let s = _mm512_set1_ps(sc[b].to_f32());
                    let o = of.map(|o| _mm512_set1_ps(o[b].to_f32()));
                    for (qs, d) in qg.chunks_exact(16).zip(og.chunks_exact_mut(16)) {
                        // SAFETY: 16 int8 readable and 16 f32 writable (chunk lengths).
                        let qv = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
                        let qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qv));
                        let w = _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(_mm512_mul_ps(qf, s)));
                        let w = match o {
                            Some(o) => _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(_mm512_add_ps(w, o))),
                            None => w,
                        };
                        // SAFETY: as above.
                        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), w) };
                    }
                }
            }
            _ => a.fill(r, k, out),
        }
    }

    /// Sums of the two eight-lane halves of `v`, each in `reduce8`'s order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce_halves(v: __m512) -> (f32, f32) {
        // Lanes l and l + 4 of each half, then l and l + 2, then l and l + 1.
        let t = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        let u = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
        let w = _mm512_add_ps(u, _mm512_permute_ps::<0b10_11_00_01>(u));
        let mut l = [0f32; 16];
        // SAFETY: `l` is 64 writable bytes.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), w) };
        (l[0], l[8])
    }

    /// One tile's operands: `a` rows (stride `k`) and `b` pair panels from the tile's first pair.
    struct Tile<'a> {
        a: &'a [f32],
        k: usize,
        bp: &'a [f32],
        ps: usize,
        tail: &'a [f32],
        col0: usize,
        cols: usize,
        m: usize,
    }

    impl Tile<'_> {
        #[target_feature(enable = "avx512f")]
        fn run_dyn(&self, nr: usize, np: usize, out: &mut [f16]) {
            match nr {
                6 => self.run_cols::<6>(np, out),
                5 => self.run_cols::<5>(np, out),
                4 => self.run_cols::<4>(np, out),
                3 => self.run_cols::<3>(np, out),
                2 => self.run_cols::<2>(np, out),
                _ => self.run_cols::<1>(np, out),
            }
        }

        #[target_feature(enable = "avx512f")]
        fn run_cols<const NR: usize>(&self, np: usize, out: &mut [f16]) {
            match np {
                4 => self.run::<NR, 4>(out),
                3 => self.run::<NR, 3>(out),
                2 => self.run::<NR, 2>(out),
                _ => self.run::<NR, 1>(out),
            }
        }

        /// `NR` rows × `NP` column pairs into `out` (row stride `m`).
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn run<const NR: usize, const NP: usize>(&self, out: &mut [f16]) {
            let (k, ps) = (self.k, self.ps);
            let (k8, tk) = (k / 8, k % 8);
            assert!(self.a.len() >= NR * k && self.bp.len() >= NP * ps && ps == k8 * 16);
            assert!(out.len() >= (NR - 1) * self.m + self.cols.min(self.col0 + 2 * NP));
            assert!(self.tail.len() >= self.cols * tk);
            let (ap, bp) = (self.a.as_ptr(), self.bp.as_ptr());
            let mut acc = [[_mm512_setzero_ps(); NP]; NR];
            for j in 0..k8 {
                let mut bv = [_mm512_setzero_ps(); NP];
                for (p, v) in bv.iter_mut().enumerate() {
                    // SAFETY: pair panel p has k8 groups of 16 f32 (asserted length).
                    *v = unsafe { _mm512_loadu_ps(bp.add(p * ps + j * 16)) };
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: values 8j..8j+8 of row r lie inside `a` (asserted length).
                    let av = unsafe {
                        _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                            ap.add(r * k + j * 8).cast(),
                        )))
                    };
                    for p in 0..NP {
                        acc[p] = _mm512_fmadd_ps(av, bv[p], acc[p]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = &self.a[r * k..(r + 1) * k];
                for (p, &v) in acc.iter().enumerate() {
                    let (lo, hi) = reduce_halves(v);
                    for (h, mut s) in [lo, hi].into_iter().enumerate() {
                        let c = self.col0 + 2 * p + h;
                        if c >= self.cols {
                            break;
                        }
                        for t in 0..tk {
                            s += row[8 * k8 + t] * self.tail[c * tk + t];
                        }
                        out[r * self.m + c] = f16::from_f32(s);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fill_matches_the_portable_rows() {
            if !available() {
                eprintln!("skipped: no AVX-512");
                return;
            }
            let mut s = 1u64;
            let mut next = || {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u32
            };
            let (n, k) = (3, 96);
            let q: Vec<i8> = (0..n * k).map(|_| next() as u8 as i8).collect();
            let h: Vec<f16> = (0..n * k)
                .map(|_| f16::from_bits((next() & 0xFBFF) as u16))
                .collect();
            for group in [16, 32] {
                let blocks = n * k / group;
                let sc: Vec<f16> = (0..blocks)
                    .map(|_| f16::from_f32((next() % 2000) as f32 * 1e-4 - 0.1))
                    .collect();
                let of: Vec<f16> = (0..blocks)
                    .map(|_| f16::from_f32((next() % 2000) as f32 * 1e-3 - 1.0))
                    .collect();
                for a in [
                    ARows::F16(&h),
                    ARows::Block {
                        q: &q,
                        scales: &sc,
                        offsets: None,
                        group,
                    },
                    ARows::Block {
                        q: &q,
                        scales: &sc,
                        offsets: Some(&of),
                        group,
                    },
                ] {
                    for r in 0..n {
                        let (mut x, mut y) = (vec![0f32; k], vec![0f32; k]);
                        a.fill(r, k, &mut x);
                        // SAFETY: AVX-512F checked above.
                        unsafe { fill(a, r, k, &mut y) };
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&x), bits(&y), "{a:?} row {r}");
                    }
                }
            }
        }
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

    fn naive_i8(a: &[i8], b_km: &[i8], m: usize, k: usize, r: usize, c: usize) -> i32 {
        (0..k)
            .map(|t| i32::from(a[r * k + t]) * i32::from(b_km[t * m + c]))
            .sum()
    }

    /// Nearest fp16 to a finite `d` below 65504 in magnitude, ties to even, by comparing the exact
    /// distances to the neighbours of a candidate (close values subtract exactly in f64).
    fn nearest_f16(d: f64) -> f16 {
        // fp16 bits in value order: positive patterns as is, negative ones mirrored below zero.
        let ord = |h: f16| {
            let b = h.to_bits();
            if b & 0x8000 == 0 {
                i32::from(b)
            } else {
                -i32::from(b & 0x7FFF)
            }
        };
        let from_ord = |o: i32| {
            f16::from_bits(if o >= 0 {
                o as u16
            } else {
                0x8000 | (-o) as u16
            })
        };
        let c = ord(f16::from_f64_const(d));
        let mut best = from_ord(c);
        for h in [from_ord(c - 1), from_ord(c + 1)] {
            let (e, eb) = ((h.to_f64() - d).abs(), (best.to_f64() - d).abs());
            if e < eb || (e == eb && h.to_bits() & 1 == 0) {
                best = h;
            }
        }
        best
    }

    #[test]
    fn round_once_is_correctly_rounded() {
        let mut s = 5;
        for _ in 0..200_000 {
            let v = lcg(&mut s) as i32 >> (lcg(&mut s) % 31);
            let sc = f64::from(f16::from_bits((lcg(&mut s) & 0x3FFF) as u16).to_f32()) / 65536.0;
            let d = f64::from(v) * sc;
            if d.abs() < 65504.0 {
                assert_eq!(f16_round_once(d), nearest_f16(d), "{v} * {sc}");
            }
        }
        // Just off an fp16 midpoint, where rounding through f32 first lands on the tie.
        let mid = 1.0 + 2f64.powi(-11);
        for d in [
            mid + 2f64.powi(-40),
            mid - 2f64.powi(-40),
            -mid - 2f64.powi(-40),
            mid,
            2545.0011928081512,
        ] {
            assert_eq!(f16_round_once(d), nearest_f16(d), "{d}");
        }
        assert_eq!(
            f16_round_once(mid + 2f64.powi(-40)).to_f64(),
            1.0 + 2f64.powi(-10)
        );
        assert_eq!(f16_round_once(mid).to_f64(), 1.0);
        assert!(f16_round_once(f64::NAN).is_nan());
        assert_eq!(f16_round_once(1e300), f16::INFINITY);
        assert_eq!(f16_round_once(65520.0), f16::INFINITY);
        assert_eq!(f16_round_once(65519.99), f16::MAX);
        assert_eq!(f16_round_once(-0.0).to_bits(), 0x8000);
        assert_eq!(f16_round_once(2f64.powi(-25) * 1.0000001).to_bits(), 1);
        assert_eq!(f16_round_once(2f64.powi(-25)).to_bits(), 0);
    }

    /// A pool running `workers` scoped threads (0: none, the caller does everything).
    struct Scoped(usize);
    impl crate::pool::Pool for Scoped {
        fn run(&self, job: &(dyn Fn(usize) + Sync)) {
            std::thread::scope(|s| {
                for w in 0..self.0 {
                    s.spawn(move || job(w));
                }
            });
        }
    }

    #[test]
    fn par_rows_covers_every_row_once_with_any_pool() {
        let (n, m) = (103, 5);
        for workers in [None, Some(0), Some(1), Some(3)] {
            let pool = workers.map(|w| std::sync::Arc::new(Scoped(w)) as _);
            let mut out = vec![f16::ZERO; n * m];
            crate::pool::with_pool(pool, || {
                par_rows(&mut out, n, m, 4, 2, |r0, rows, chunk| {
                    assert_eq!(chunk.len(), rows * m);
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v += f16::from_f32((r0 * m + i) as f32);
                    }
                });
            });
            for (i, v) in out.iter().enumerate() {
                assert_eq!(*v, f16::from_f32(i as f32), "{workers:?} at {i}");
            }
        }
    }

    #[test]
    fn i8_matches_naive_on_odd_shapes() {
        let mut s = 7;
        let shapes = [
            (1, 1, 1),
            (3, 5, 17),
            (7, 9, 33),
            (2, 4, 16),
            (5, 130, 70),
            (13, 64, 64),
            (8, 70, 256),
            (19, 3, 130),
        ];
        for &(n, m, k) in &shapes {
            let a: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let b: Vec<i8> = (0..m * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let bt = transpose(&b, k, m);
            for threads in [1, 3] {
                for (layout, bb) in [(BLayout::KM, &b), (BLayout::MK, &bt)] {
                    let mut out = vec![f16::ZERO; n * m];
                    gemm_i8(&a, bb, layout, n, m, k, 1.0 / 1024.0, &mut out, threads);
                    for r in 0..n {
                        for c in 0..m {
                            let want = naive_i8(&a, &b, m, k, r, c);
                            assert_eq!(
                                out[r * m + c],
                                f16_round_once(f64::from(want) / 1024.0),
                                "{n}x{m}x{k} {layout:?} at {r},{c}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn i8_padding_columns_are_skipped_exactly() {
        let mut s = 9;
        for &(n, m, k, live) in &[
            (9, 64, 96, 1),
            (9, 64, 96, 3),
            (14, 128, 64, 37),
            (5, 64, 6, 0),
        ] {
            let a: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let mut b = vec![0i8; k * m];
            for t in 0..k {
                for c in 0..live {
                    b[t * m + c] = lcg(&mut s) as u8 as i8;
                }
            }
            for scale in [1.0 / 96.0, -0.5] {
                let mut out = vec![f16::ONE; n * m];
                gemm_i8(&a, &b, BLayout::KM, n, m, k, scale, &mut out, 2);
                for r in 0..n {
                    for c in 0..m {
                        let want = f16_round_once(f64::from(naive_i8(&a, &b, m, k, r, c)) * scale);
                        assert_eq!(
                            out[r * m + c].to_bits(),
                            want.to_bits(),
                            "{r},{c} live {live}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_int8_values_do_not_saturate() {
        for &(m, k) in &[(4, 64), (64, 16384), (2, 16384)] {
            let a = vec![-128i8; 2 * k];
            for v in [-128i8, 127] {
                let b = vec![v; m * k];
                let mut out = vec![f16::ZERO; 2 * m];
                gemm_i8(&a, &b, BLayout::KM, 2, m, k, 1.0 / 65536.0, &mut out, 1);
                let want = f16_round_once(-128.0 * f64::from(v) * k as f64 / 65536.0);
                assert!(out.iter().all(|&x| x == want), "{v} k={k}");
            }
        }
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
            gemm_f32(&a, &bt, n, m, m, k, &mut out, 2);
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
    fn f16_padding_columns_copy_the_computed_zero_column() {
        let mut s = 13;
        let (n, m, k) = (6, 64, 40);
        let mut a: Vec<f16> = (0..n * k)
            .map(|_| f16::from_f32(lcg(&mut s) as f32 / u32::MAX as f32 - 0.5))
            .collect();
        // A non-finite weight makes its zero columns NaN, as a full product would.
        a[3 * k + 5] = f16::INFINITY;
        let mut b = vec![f16::ZERO; k * m];
        for t in 0..k {
            for c in 0..3 {
                b[t * m + c] = f16::from_f32(lcg(&mut s) as f32 / u32::MAX as f32 - 0.5);
            }
        }
        let mut out = vec![f16::ZERO; n * m];
        gemm_rows(ARows::F16(&a), &b, BLayout::KM, n, m, k, &mut out, 1);
        let af: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        let bt: Vec<f32> = transpose(&b, k, m).iter().map(|v| v.to_f32()).collect();
        for r in 0..n {
            for c in 0..m {
                let want = f16::from_f32(dot_f32(&af[r * k..(r + 1) * k], &bt[c * k..(c + 1) * k]));
                let got = out[r * m + c];
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{r},{c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn f16_paths_agree_bit_for_bit() {
        let mut s = 21;
        let unit = |s: &mut u64| f16::from_f32(lcg(s) as f32 / u32::MAX as f32 * 4.0 - 2.0);
        for &(n, m, k, live) in &[
            (7, 64, 96, 64),
            (13, 70, 37, 70),
            (6, 64, 640, 3),
            (1, 3, 8, 3),
            (9, 128, 64, 0),
            (61, 64, 32, 17),
            (150, 8, 640, 2),
            (101, 1, 2048, 1),
        ] {
            let a: Vec<f16> = (0..n * k).map(|_| unit(&mut s)).collect();
            let mut b = vec![f16::ZERO; k * m];
            for t in 0..k {
                for c in 0..live {
                    b[t * m + c] = unit(&mut s);
                }
            }
            let bt = transpose(&b, k, m);
            let q: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let group = if k % 32 == 0 { 32 } else { k };
            let sc: Vec<f16> = (0..n * k / group)
                .map(|_| unit(&mut s) * f16::from_f32(0.01))
                .collect();
            let of: Vec<f16> = (0..n * k / group).map(|_| unit(&mut s)).collect();
            let rows = [
                ARows::F16(&a),
                ARows::Block {
                    q: &q,
                    scales: &sc,
                    offsets: None,
                    group,
                },
                ARows::Block {
                    q: &q,
                    scales: &sc,
                    offsets: Some(&of),
                    group,
                },
            ];
            for ar in rows {
                // The scalar reference: every row through `ARows::fill`, then the dot products.
                let cols = (live + 1).min(m);
                let btf = cols_as_rows(&b, BLayout::KM, m, k, cols, f16::to_f32);
                let mut af = vec![0f32; n * k];
                for (r, row) in af.chunks_exact_mut(k).enumerate() {
                    ar.fill(r, k, row);
                }
                let mut want = vec![f16::ZERO; n * m];
                gemm_f32(&af, &btf, n, cols, m, k, &mut want, 1);
                for row in want.chunks_exact_mut(m) {
                    let v = row[cols - 1];
                    row[cols..].fill(v);
                }
                let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
                for (layout, bb) in [(BLayout::KM, &b), (BLayout::MK, &bt)] {
                    for threads in [1, 2] {
                        let mut got = vec![f16::ZERO; n * m];
                        gemm_rows(ar, bb, layout, n, m, k, &mut got, threads);
                        assert_eq!(bits(&got), bits(&want), "{n}x{m}x{k} {layout:?}");
                        // The dot-product path itself (row blocks, vector fill), whatever `gemm_rows` chose.
                        let mut got = vec![f16::ZERO; n * m];
                        gemm_rows_dots(ar, bb, layout, n, m, k, cols, &mut got, threads);
                        for row in got.chunks_exact_mut(m) {
                            let v = row[cols - 1];
                            row[cols..].fill(v);
                        }
                        assert_eq!(bits(&got), bits(&want), "dots {n}x{m}x{k} {layout:?}");
                    }
                }
            }
        }
    }

    /// The vector row fill (AVX2 + F16C) against `ARows::fill`, bit for bit, over scales from fp16
    /// subnormals to values whose products overflow fp16 (infinities), with and without offsets.
    #[test]
    fn vector_fill_matches_the_scalar_rows() {
        let f = row_filler();
        let mut s = 77;
        let (n, k) = (40, 256);
        let q: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
        for group in [8, 32, 64] {
            let blocks = n * k / group;
            let sc: Vec<f16> = (0..blocks)
                .map(|_| {
                    f16::from_bits((lcg(&mut s) % 0x7c00) as u16 | ((lcg(&mut s) & 1) << 15) as u16)
                })
                .collect();
            let of: Vec<f16> = (0..blocks)
                .map(|_| {
                    f16::from_bits((lcg(&mut s) % 0x7c00) as u16 | ((lcg(&mut s) & 1) << 15) as u16)
                })
                .collect();
            let a16: Vec<f16> = (0..n * k)
                .map(|_| f16::from_bits(lcg(&mut s) as u16))
                .collect();
            for ar in [
                ARows::Block {
                    q: &q,
                    scales: &sc,
                    offsets: None,
                    group,
                },
                ARows::Block {
                    q: &q,
                    scales: &sc,
                    offsets: Some(&of),
                    group,
                },
                ARows::F16(&a16),
            ] {
                for r in 0..n {
                    let (mut want, mut got) = (vec![0f32; k], vec![0f32; k]);
                    ar.fill(r, k, &mut want);
                    f(ar, r, k, &mut got);
                    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                        assert!(
                            w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                            "group {group} row {r} col {i}: {w} vs {g}"
                        );
                    }
                }
            }
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
