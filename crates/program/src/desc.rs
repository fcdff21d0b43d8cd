//! Program descriptions, M buckets and K/N splits.
//!
//! Layout follows the Draw Things design: channels first, tokens innermost.
//! `w [N, K]`, `x [K, Mp]`, output `y [N, Mp]` (fp16). The host feeds Xᵀ and reads Yᵀ.

use std::fmt;

/// Bumped whenever emitted program bytes or their meaning change; part of every cache key.
/// 2: w8f16 with N = 1 and K = G has no shape-preserving reshapes (what coremltools emits).
pub const FORMAT_VERSION: u32 = 2;

/// Largest extent the ANE takes on an H/W axis (E5RT limit text `D[1-16384] H[1-16384] W[1-16384]`).
pub const ANE_MAX_DIM: usize = 16384;

/// M buckets. Tokens are the innermost axis, so Mp must keep rows 64-byte aligned (64 int8 = 64 B).
/// Few buckets keep the number of compiled programs per (K, N) small (at most 11); the gaps cap the
/// padding waste at 50 % above 128 tokens, where the ANE can win at all. M above the largest bucket is
/// run as several calls of the largest bucket.
pub const M_BUCKETS: &[usize] = &[64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096];

/// Program variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// int8 weight [N,K] and int8 activation [K,Mp] as inputs, each dequantised by fp16(1/sqrt(K)),
    /// one matmul, fp16 output. Row scales and token scales are applied by the host (spec 10 / CoreML9).
    I8I8,
    /// int8 weight values + fp16 per-block scales (+ offsets) as inputs, dequantised in the program with
    /// the exact ggml block scales; fp16 activations; fp16 matmul (spec 10 / CoreML9: int8 input).
    W8F16,
    /// fp16 weight [N,K] and fp16 activation [K,Mp]; for F16 ggml weights (spec 7+ / fp16 I/O).
    F16,
    /// Outlier split (issue #14, `i8i8o`): i8i8's int8 × int8 matmul over the activation channels
    /// the host did not pick as outliers, plus a small matmul over the `c = group` outlier channels
    /// the host gathered: int8 weight columns `wo [N, c]` × fp16 activations `xo [c, Mp]`. The int8
    /// product is scaled per token by the fp16 input `t [1, Mp]` before the two are added, so both
    /// share one per-token unit (the host's rescale). All shapes are static.
    I8I8O,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::I8I8, Variant::W8F16, Variant::F16, Variant::I8I8O];

    pub fn name(self) -> &'static str {
        match self {
            Variant::I8I8 => "i8i8",
            Variant::W8F16 => "w8f16",
            Variant::F16 => "f16",
            Variant::I8I8O => "i8i8o",
        }
    }

    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One compiled program: a variant at one (Mp, K, N).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProgramDesc {
    pub variant: Variant,
    /// Padded token count (one of [`M_BUCKETS`]).
    pub m: usize,
    /// Inner dimension of this program (a K part when K is split).
    pub k: usize,
    /// Output features of this program (an N part when N is split).
    pub n: usize,
    /// W8F16: block length along K of the scales (32, or 16 for Q6_K). I8I8O: the number of outlier
    /// channels `c` (1..=K). 0 otherwise.
    pub group: usize,
    /// W8F16 only: per-block offsets are an input (Q4_K, Q5_K).
    pub offsets: bool,
}

impl ProgramDesc {
    /// Stable, file-name-safe identity, e.g. `i8i8-m512-k4096-n14336` or `w8f16-g32o-m512-k4096-n4096`.
    pub fn key(&self) -> String {
        match self.variant {
            Variant::W8F16 => format!(
                "{}-g{}{}-m{}-k{}-n{}",
                self.variant,
                self.group,
                if self.offsets { "o" } else { "" },
                self.m,
                self.k,
                self.n
            ),
            Variant::I8I8O => format!(
                "{}-c{}-m{}-k{}-n{}",
                self.variant, self.group, self.m, self.k, self.n
            ),
            _ => format!("{}-m{}-k{}-n{}", self.variant, self.m, self.k, self.n),
        }
    }

    /// Whether the program's main matmul is int8 × int8 (i8i8, i8i8o).
    pub fn int8(&self) -> bool {
        matches!(self.variant, Variant::I8I8 | Variant::I8I8O)
    }

    /// The fixed dequantisation scalar of the i8i8 and i8i8o variants, fp16(1/sqrt(K)).
    pub fn i8_scale(&self) -> half::f16 {
        half::f16::from_f32(1.0 / (self.k as f32).sqrt())
    }

    /// Checks the invariants every emitter and executor relies on.
    pub fn validate(&self) -> Result<(), String> {
        if !M_BUCKETS.contains(&self.m) {
            return Err(format!("m={} is not an M bucket", self.m));
        }
        if self.k == 0 || self.n == 0 || self.k > ANE_MAX_DIM || self.n > ANE_MAX_DIM {
            return Err(format!(
                "k={} n={} outside 1..={ANE_MAX_DIM}",
                self.k, self.n
            ));
        }
        match self.variant {
            Variant::W8F16 => {
                if self.group == 0 || !self.k.is_multiple_of(self.group) {
                    return Err(format!(
                        "w8f16 group {} does not divide k={}",
                        self.group, self.k
                    ));
                }
            }
            Variant::I8I8O => {
                if self.group == 0 || self.group > self.k || self.offsets {
                    return Err(format!(
                        "i8i8o needs 1..={} outlier channels and no offsets (c={})",
                        self.k, self.group
                    ));
                }
            }
            _ => {
                if self.group != 0 || self.offsets {
                    return Err(format!("{} takes no block scales", self.variant));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for ProgramDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// The smallest bucket holding `m` tokens, or `None` when `m` exceeds the largest bucket.
pub fn m_bucket(m: usize) -> Option<usize> {
    M_BUCKETS.iter().copied().find(|&b| b >= m.max(1))
}

/// One program call inside a split matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// First token of this call and its real (unpadded) token count.
    pub m0: usize,
    pub m_len: usize,
    pub k0: usize,
    pub n0: usize,
    pub desc: ProgramDesc,
}

/// How one matmul (M, K, N) becomes program calls: M in bucket-sized chunks, K and N in parts no larger
/// than `max_dim`. K parts are summed by the host; N parts and M chunks are disjoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    pub parts: Vec<Part>,
}

impl SplitPlan {
    /// `align` is the K granularity a part must keep (the weight block length, 256 is always safe).
    pub fn new(
        variant: Variant,
        m: usize,
        k: usize,
        n: usize,
        group: usize,
        offsets: bool,
        align: usize,
    ) -> Result<SplitPlan, String> {
        Self::with_max_dim(variant, m, k, n, group, offsets, align, ANE_MAX_DIM)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn with_max_dim(
        variant: Variant,
        m: usize,
        k: usize,
        n: usize,
        group: usize,
        offsets: bool,
        align: usize,
        max_dim: usize,
    ) -> Result<SplitPlan, String> {
        if m == 0 || k == 0 || n == 0 {
            return Err(format!("empty matmul m={m} k={k} n={n}"));
        }
        let align = align.max(1);
        if !k.is_multiple_of(align) {
            return Err(format!("k={k} is not a multiple of {align}"));
        }
        let k_parts = split_even(k, max_dim, align)?;
        let n_parts = split_even(n, max_dim, 1)?;
        let largest = *M_BUCKETS.last().expect("buckets");
        let mut parts = Vec::new();
        let mut m0 = 0;
        while m0 < m {
            let m_len = (m - m0).min(largest);
            let mb = m_bucket(m_len).expect("m_len <= largest bucket");
            for &(k0, kl) in &k_parts {
                for &(n0, nl) in &n_parts {
                    let desc = ProgramDesc {
                        variant,
                        m: mb,
                        k: kl,
                        n: nl,
                        group,
                        offsets,
                    };
                    desc.validate()?;
                    parts.push(Part {
                        m0,
                        m_len,
                        k0,
                        n0,
                        desc,
                    });
                }
            }
            m0 += m_len;
        }
        Ok(SplitPlan { parts })
    }

    /// Distinct programs this plan needs.
    pub fn programs(&self) -> Vec<ProgramDesc> {
        let mut v: Vec<ProgramDesc> = self.parts.iter().map(|p| p.desc).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Splits `len` into the fewest near-equal parts of at most `max`, each a multiple of `align`.
fn split_even(len: usize, max: usize, align: usize) -> Result<Vec<(usize, usize)>, String> {
    if max < align {
        return Err(format!("max part {max} below alignment {align}"));
    }
    let units = len / align;
    let max_units = max / align;
    let n_parts = units.div_ceil(max_units);
    let base = units / n_parts;
    let extra = units % n_parts;
    let mut out = Vec::with_capacity(n_parts);
    let mut start = 0;
    for i in 0..n_parts {
        let u = base + usize::from(i < extra);
        out.push((start * align, u * align));
        start += u;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(m_bucket(1), Some(64));
        assert_eq!(m_bucket(64), Some(64));
        assert_eq!(m_bucket(65), Some(128));
        assert_eq!(m_bucket(512), Some(512));
        assert_eq!(m_bucket(513), Some(768));
        assert_eq!(m_bucket(4097), None);
    }

    #[test]
    fn plan_splits_large_dims() {
        let p = SplitPlan::new(Variant::I8I8, 5000, 20480, 262144, 0, false, 256).unwrap();
        // K 20480 -> 2 parts of 10240; N 262144 -> 16 parts; M 5000 -> 4096 + 904.
        assert_eq!(p.parts.len(), 2 * 2 * 16);
        assert!(
            p.parts
                .iter()
                .all(|x| x.desc.k == 10240 && x.desc.n == 16384)
        );
        assert_eq!(p.programs().len(), 2);
        let covered_n: usize = p
            .parts
            .iter()
            .filter(|x| x.m0 == 0 && x.k0 == 0)
            .map(|x| x.desc.n)
            .sum();
        assert_eq!(covered_n, 262144);
    }

    #[test]
    fn plan_small() {
        let p = SplitPlan::new(Variant::W8F16, 7, 256, 96, 32, true, 32).unwrap();
        assert_eq!(
            p.parts,
            vec![Part {
                m0: 0,
                m_len: 7,
                k0: 0,
                n0: 0,
                desc: ProgramDesc {
                    variant: Variant::W8F16,
                    m: 64,
                    k: 256,
                    n: 96,
                    group: 32,
                    offsets: true
                }
            }]
        );
        assert_eq!(p.parts[0].desc.key(), "w8f16-g32o-m64-k256-n96");
    }

    #[test]
    fn uneven_split_keeps_alignment() {
        let parts = split_even(256 * 100, 16384, 256).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(
            parts
                .iter()
                .all(|&(s, l)| s % 256 == 0 && l % 256 == 0 && l <= 16384)
        );
        assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), 25600);
    }
}
