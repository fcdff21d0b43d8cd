//! Randomised Hadamard rotation along K, for W8A8 with outlier channels (the `i8i8r` variant).
//!
//! `R = blockdiag(H_b · D)`: per block of `b` consecutive K positions (b a power of two dividing K),
//! the signs `D = diag(±1)` (a fixed pseudo-random sequence over K, seed [`SIGN_SEED`]) and then the
//! normalised Walsh–Hadamard matrix `H_b / √b`. R is orthogonal, so `x · w = (R x) · (R w)` for every
//! pair of K-vectors: rotating each weight row at prepare time and each token's activations per call
//! leaves the product unchanged in exact arithmetic, while spreading a few large channels over their
//! whole block before per-token int8 quantisation.
//!
//! The transform is the in-place fast Walsh–Hadamard butterfly (`b · log2 b` additions per block).

use crate::BridgeError;

/// Seed of the ±1 sign sequence. Fixed: weights rotated at prepare time and activations rotated at
/// run time must use the same signs, also across processes (program caches, prepared-weight caches).
pub const SIGN_SEED: u64 = 0x6767_6d6c_2d72_6f74; // "ggml-rot"

/// Default cap on the block length: large enough to spread an outlier over 256 channels
/// (its share of a token's max drops by up to √256 = 16), small enough to stay in L1 per block.
pub const DEFAULT_MAX_BLOCK: usize = 256;

/// The block length used for inner dimension `k`: the largest power of two dividing `k`, at most
/// `max_block` (itself rounded down to a power of two, at least 1).
pub fn rotation_block(k: usize, max_block: usize) -> usize {
    if k == 0 {
        return 1;
    }
    let pow2_div = 1usize << k.trailing_zeros();
    let cap = if max_block == 0 {
        1
    } else {
        1usize << (usize::BITS - 1 - max_block.leading_zeros())
    };
    pow2_div.min(cap)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sign of K position `i` (±1.0): bit 0 of splitmix64(seed + i).
#[inline]
pub fn sign_at(i: usize) -> f32 {
    if splitmix64(SIGN_SEED.wrapping_add(i as u64)) & 1 == 0 {
        1.0
    } else {
        -1.0
    }
}

/// Most blocks a second stage mixes (`k / block`): beyond this the g × g product costs more than it
/// is worth and K is large enough for the blocks alone.
pub const MAX_MIX_GROUPS: usize = 16;

/// One rotation `R` for inner dimension `k`: the signs over K and the block length, and optionally a
/// second stage across the blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    pub k: usize,
    pub block: usize,
    /// ±1/√block per K position (the signs with the normalisation folded in).
    signs: Vec<f32>,
    /// Second stage: a fixed orthogonal `g × g` matrix (row-major, g = k / block) applied across the
    /// blocks at each offset (elements `j, j + block, …`), so that every output mixes all of K even
    /// when K is not a power of two (640 = 5 · 128). `None`: blocks only.
    mix: Option<Vec<f32>>,
}

/// A fixed orthogonal `g × g` matrix: Gram–Schmidt (f64, twice for accuracy) on uniform entries drawn
/// from splitmix64 with [`SIGN_SEED`]; deterministic on every platform (only +, ×, /, √).
fn mixing_matrix(g: usize) -> Vec<f32> {
    let mut a: Vec<Vec<f64>> = (0..g)
        .map(|r| {
            (0..g)
                .map(|c| {
                    let z =
                        splitmix64(SIGN_SEED ^ 0x006d_6978_u64.wrapping_add((r * g + c) as u64));
                    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
                })
                .collect()
        })
        .collect();
    for i in 0..g {
        for _ in 0..2 {
            for j in 0..i {
                let d: f64 = a[i].iter().zip(&a[j]).map(|(x, y)| x * y).sum();
                let aj = a[j].clone();
                for (x, y) in a[i].iter_mut().zip(&aj) {
                    *x -= d * y;
                }
            }
        }
        let n = a[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        for x in a[i].iter_mut() {
            *x /= n;
        }
    }
    a.into_iter().flatten().map(|v| v as f32).collect()
}

impl Rotation {
    /// The rotation for `k` with blocks of [`rotation_block`]`(k, max_block)`, blocks only.
    pub fn new(k: usize, max_block: usize) -> Rotation {
        Rotation::with_mix(k, max_block, false)
    }

    /// As [`Rotation::new`]; with `mix`, a second stage mixes the `k / block` blocks when there are
    /// 2 ..= [`MAX_MIX_GROUPS`] of them.
    pub fn with_mix(k: usize, max_block: usize, mix: bool) -> Rotation {
        let block = rotation_block(k, max_block);
        let g = if k == 0 { 0 } else { k / block };
        Rotation {
            k,
            block,
            signs: {
                let norm = 1.0 / (block as f32).sqrt();
                (0..k).map(|i| sign_at(i) * norm).collect()
            },
            mix: (mix && (2..=MAX_MIX_GROUPS).contains(&g)).then(|| mixing_matrix(g)),
        }
    }

    /// Whether the second stage is on.
    pub fn mixes(&self) -> bool {
        self.mix.is_some()
    }

    /// Rotates one K-vector in place: `x ← R x`.
    ///
    /// # Panics
    /// If `x.len() != k`.
    pub fn apply(&self, x: &mut [f32]) {
        assert_eq!(x.len(), self.k, "rotation of a vector of the wrong length");
        // The 1/√b normalisation is linear: folded into the signs (one pass instead of two).
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
        let b = self.block;
        if b > 1 {
            for blk in x.chunks_exact_mut(b) {
                fwht(blk);
            }
        }
        if let Some(m) = &self.mix {
            // y[t] = Σ_u m[t][u] · x[u] over whole blocks (contiguous runs of b: vectorised axpys).
            let g = self.k / b;
            let mut y = [0f32; 256 * MAX_MIX_GROUPS];
            let mut tmp: Vec<f32>;
            let y: &mut [f32] = if self.k <= y.len() {
                &mut y[..self.k]
            } else {
                tmp = vec![0f32; self.k];
                &mut tmp
            };
            y.fill(0.0);
            for t in 0..g {
                let yt = &mut y[t * b..(t + 1) * b];
                for u in 0..g {
                    let c = m[t * g + u];
                    for (o, &v) in yt.iter_mut().zip(&x[u * b..(u + 1) * b]) {
                        *o += c * v;
                    }
                }
            }
            x.copy_from_slice(y);
        }
    }

    /// Copies `m` rows of `k` values (row stride `stride`) from `x` into `out` (`[m, k]`) rotated.
    pub fn rotate_rows_into(
        &self,
        x: &[f32],
        m: usize,
        stride: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BridgeError> {
        let k = self.k;
        if m > 0 && (stride < k || x.len() < (m - 1) * stride + k) {
            return Err(BridgeError::ElementLength {
                what: "rotated activations",
                got: x.len(),
                want: (m.max(1) - 1) * stride + k,
            });
        }
        out.resize(m * k, 0.0);
        for r in 0..m {
            let o = &mut out[r * k..(r + 1) * k];
            o.copy_from_slice(&x[r * stride..r * stride + k]);
            self.apply(o);
        }
        Ok(())
    }

    /// Rotates every row of a row-major `[n, k]` matrix in place.
    pub fn rotate_matrix(&self, w: &mut [f32]) {
        if self.k == 0 {
            return;
        }
        for row in w.chunks_exact_mut(self.k) {
            self.apply(row);
        }
    }
}

/// In-place unnormalised fast Walsh–Hadamard transform of a power-of-two-length slice (Sylvester order).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 8 {
        // The first three stages within each run of 8, unrolled (the strided loop below does not
        // vectorise for h < 8).
        for c in x.chunks_exact_mut(8) {
            let a: [f32; 8] = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
            let b = [
                a[0] + a[1],
                a[0] - a[1],
                a[2] + a[3],
                a[2] - a[3],
                a[4] + a[5],
                a[4] - a[5],
                a[6] + a[7],
                a[6] - a[7],
            ];
            let d = [
                b[0] + b[2],
                b[1] + b[3],
                b[0] - b[2],
                b[1] - b[3],
                b[4] + b[6],
                b[5] + b[7],
                b[4] - b[6],
                b[5] - b[7],
            ];
            c[0] = d[0] + d[4];
            c[1] = d[1] + d[5];
            c[2] = d[2] + d[6];
            c[3] = d[3] + d[7];
            c[4] = d[0] - d[4];
            c[5] = d[1] - d[5];
            c[6] = d[2] - d[6];
            c[7] = d[3] - d[7];
        }
        h = 8;
    }
    while h < n {
        for base in (0..n).step_by(2 * h) {
            let (lo, hi) = x[base..base + 2 * h].split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwht_matches_the_definition() {
        for n in [1usize, 2, 4, 8, 16, 64, 256] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
            let mut y = x.clone();
            fwht(&mut y);
            for (r, &yr) in y.iter().enumerate() {
                let want: f32 = (0..n)
                    .map(|c| {
                        if (r & c).count_ones() % 2 == 0 {
                            x[c]
                        } else {
                            -x[c]
                        }
                    })
                    .sum();
                assert_eq!(yr, want, "n={n} r={r}");
            }
        }
    }

    #[test]
    fn blocks() {
        assert_eq!(rotation_block(640, 256), 128);
        assert_eq!(rotation_block(576, 256), 64);
        assert_eq!(rotation_block(2048, 256), 256);
        assert_eq!(rotation_block(2048, 4096), 2048);
        assert_eq!(rotation_block(1536, 300), 256);
        assert_eq!(rotation_block(7, 256), 1);
        assert_eq!(rotation_block(0, 256), 1);
        assert_eq!(rotation_block(64, 0), 1);
    }

    #[test]
    fn orthogonal_and_preserves_dot_products() {
        for &(k, cap) in &[
            (640usize, 256usize),
            (576, 256),
            (2048, 256),
            (96, 8),
            (7, 256),
        ] {
            let r = Rotation::new(k, cap);
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
                .collect();
            let w: Vec<f32> = (0..k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 7.0)
                .collect();
            let dot = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
            };
            let (mut xr, mut wr) = (x.clone(), w.clone());
            r.apply(&mut xr);
            r.apply(&mut wr);
            let (d0, d1) = (dot(&x, &w), dot(&xr, &wr));
            assert!(
                (d0 - d1).abs() <= 1e-4 * d0.abs().max(1.0),
                "k={k}: {d0} vs {d1}"
            );
            let (n0, n1) = (dot(&x, &x), dot(&xr, &xr));
            assert!((n0 - n1).abs() <= 1e-4 * n0, "k={k}: norm {n0} vs {n1}");
        }
    }

    #[test]
    fn mixing_is_orthogonal_and_spreads_across_blocks() {
        for g in 2..=MAX_MIX_GROUPS {
            let m = mixing_matrix(g);
            for i in 0..g {
                for j in 0..g {
                    let d: f32 = (0..g).map(|c| m[i * g + c] * m[j * g + c]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-5, "g={g} {i},{j}: {d}");
                }
            }
        }
        let k = 640;
        let r = Rotation::with_mix(k, 256, true);
        assert!(r.mixes() && r.block == 128);
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        let w: Vec<f32> = (0..k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 7.0)
            .collect();
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let (mut xr, mut wr) = (x.clone(), w.clone());
        r.apply(&mut xr);
        r.apply(&mut wr);
        assert!((dot(&x, &w) - dot(&xr, &wr)).abs() < 1e-3 * dot(&x, &w).abs().max(1.0));
        let mut e = vec![0f32; k];
        e[3] = 100.0;
        r.apply(&mut e);
        let amax = e.iter().fold(0f32, |a, v| a.max(v.abs()));
        let blocks_only = 100.0 / (128f32).sqrt();
        assert!(amax < blocks_only, "{amax} vs {blocks_only}");
        assert!(!Rotation::with_mix(4096 * 32, 256, true).mixes());
        assert!(!Rotation::with_mix(256, 256, true).mixes());
    }

    #[test]
    fn spreads_an_outlier() {
        let k = 1024;
        let r = Rotation::new(k, 256);
        let mut x = vec![0.01f32; k];
        x[17] = 100.0;
        r.apply(&mut x);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        // 100 spread over a block of 256: 100/16 = 6.25 (plus the small values).
        assert!(amax < 6.5, "{amax}");
    }

    #[test]
    fn rows_into_matches_apply() {
        let (m, k, stride) = (3, 64, 70);
        let r = Rotation::new(k, 256);
        let x: Vec<f32> = (0..m * stride).map(|i| (i % 11) as f32 - 5.0).collect();
        let mut out = Vec::new();
        r.rotate_rows_into(&x, m, stride, &mut out).unwrap();
        for i in 0..m {
            let mut row = x[i * stride..i * stride + k].to_vec();
            r.apply(&mut row);
            assert_eq!(&out[i * k..(i + 1) * k], &row[..]);
        }
        assert!(r.rotate_rows_into(&x[..10], m, stride, &mut out).is_err());
    }

    /// Host speed of the activation rotation: `cargo test --release -p ggml-coreml-bridge --lib
    /// rotate_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn rotate_speed() {
        for &(m, k, mix) in &[
            (512, 640, false),
            (512, 640, true),
            (512, 2048, false),
            (512, 4096, false),
        ] {
            let r = Rotation::with_mix(k, DEFAULT_MAX_BLOCK, mix);
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
            let mut out = Vec::new();
            r.rotate_rows_into(&x, m, k, &mut out).unwrap();
            let reps = 20;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                r.rotate_rows_into(&x, m, k, &mut out).unwrap();
            }
            let ns = t.elapsed().as_nanos() as f64 / reps as f64;
            let stages = r.block.trailing_zeros() as f64;
            eprintln!(
                "m={m} k={k} block={} mix={}: {:.3} ms, {:.2} elements/ns, {:.2} element-stages/ns",
                r.block,
                r.mixes(),
                ns / 1e6,
                (m * k) as f64 / ns,
                (m * k) as f64 * stages / ns
            );
        }
    }
}
