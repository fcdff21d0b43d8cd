//! ggml's quant blocks as plain structs parsed from bytes (layouts of `ggml-common.h`).
//!
//! Each block knows two things: ggml's reference dequantisation (`dequantize_row_*` in
//! `ggml-quants.c`, same operations in the same order, so the f32 results are bit-identical) and
//! its exact block form: integer values plus per-group scales (and offsets) such that
//! `scale * q (+ offset)` evaluated in f32 reproduces the dequantisation bit for bit.
//!
//! Why the exact form is exact: every per-group scale is `d * sc` with an 11-bit fp16 significand
//! and a <= 8-bit integer, so it is exact in f32, and so is `scale * q` (<= 22 significant bits).
//! ggml's `d1 * q - m1` therefore rounds once, in the subtraction, exactly like `scale * q + offset`
//! with `offset = -(dmin * m)`, with or without FMA contraction.

use half::f16;

use crate::WeightType;

/// One ggml quant block: parse, dequantise, split into exact integer form.
pub trait GgmlBlock: Sized + Copy {
    /// The weight type of this block.
    const TYPE: WeightType;
    /// Elements per block.
    const LEN: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// Elements per scale group in the exact form.
    const GROUP: usize;
    /// Groups per block.
    const GROUPS: usize = Self::LEN / Self::GROUP;

    /// Parses one block; `None` unless `bytes.len() == Self::BYTES`.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;

    /// Serialises the block back to ggml's layout (`out.len() == Self::BYTES`).
    fn write_bytes(&self, out: &mut [u8]);

    /// ggml's reference dequantisation into `y[..LEN]`.
    fn dequantize(&self, y: &mut [f32]);

    /// Exact form: `q[..LEN]`, `scales[..GROUPS]` and, for offset types, `offsets[..GROUPS]`
    /// (ignored otherwise; pass an empty slice).
    fn exact(&self, q: &mut [i8], scales: &mut [f32], offsets: &mut [f32]);
}

#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline(always)]
fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

#[inline(always)]
fn put_half(out: &mut [u8], at: usize, v: f16) {
    out[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
}

/// Evaluates an exact form into `y`: `s[g] * q (+ o[g])` per group of `group` elements. Splitting the
/// K-quant dequantisation into "unpack integers" and this loop lets both vectorise; the result is
/// the same bits as ggml's single loop (see the module comment).
#[inline(always)]
fn eval_groups(q: &[i8], group: usize, s: &[f32], o: Option<&[f32]>, y: &mut [f32]) {
    let groups = q.chunks_exact(group).zip(y.chunks_exact_mut(group));
    match o {
        Some(o) => {
            for (((q, y), &s), &o) in groups.zip(s).zip(o) {
                for (y, &q) in y.iter_mut().zip(q) {
                    *y = s * q as f32 + o;
                }
            }
        }
        None => {
            for ((q, y), &s) in groups.zip(s) {
                for (y, &q) in y.iter_mut().zip(q) {
                    *y = s * q as f32;
                }
            }
        }
    }
}

/// `get_scale_min_k4` of ggml: the 6-bit scale and min of sub-block `j` (0..8) packed in 12 bytes.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_0`: `ggml_half d; uint8_t qs[16]` — 32 values `d * (nibble - 8)`.
#[allow(non_camel_case_types)] // ggml's own names
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    /// Low nibbles are elements 0..16, high nibbles 16..32.
    pub qs: [u8; 16],
}

impl GgmlBlock for BlockQ4_0 {
    const TYPE: WeightType = WeightType::Q4_0;
    const LEN: usize = 32;
    const BYTES: usize = 18;
    const GROUP: usize = 32;

    #[inline]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::BYTES).then(|| BlockQ4_0 {
            d: half_at(b, 0),
            qs: array_at(b, 2),
        })
    }

    fn write_bytes(&self, out: &mut [u8]) {
        put_half(out, 0, self.d);
        out[2..18].copy_from_slice(&self.qs);
    }

    #[inline]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let (lo, hi) = y[..32].split_at_mut(16);
        for j in 0..16 {
            let x0 = (self.qs[j] & 0x0F) as i32 - 8;
            let x1 = (self.qs[j] >> 4) as i32 - 8;
            lo[j] = x0 as f32 * d;
            hi[j] = x1 as f32 * d;
        }
    }

    #[inline]
    fn exact(&self, q: &mut [i8], scales: &mut [f32], _offsets: &mut [f32]) {
        let (lo, hi) = q[..32].split_at_mut(16);
        for j in 0..16 {
            lo[j] = (self.qs[j] & 0x0F) as i8 - 8;
            hi[j] = (self.qs[j] >> 4) as i8 - 8;
        }
        scales[0] = self.d.to_f32();
    }
}

/// `block_q8_0`: `ggml_half d; int8_t qs[32]` — 32 values `d * qs`.
#[allow(non_camel_case_types)] // ggml's own names
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

impl GgmlBlock for BlockQ8_0 {
    const TYPE: WeightType = WeightType::Q8_0;
    const LEN: usize = 32;
    const BYTES: usize = 34;
    const GROUP: usize = 32;

    #[inline]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::BYTES).then(|| BlockQ8_0 {
            d: half_at(b, 0),
            qs: std::array::from_fn(|i| b[2 + i] as i8),
        })
    }

    fn write_bytes(&self, out: &mut [u8]) {
        put_half(out, 0, self.d);
        for (o, &v) in out[2..34].iter_mut().zip(&self.qs) {
            *o = v as u8;
        }
    }

    #[inline]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &v) in y[..32].iter_mut().zip(&self.qs) {
            *y = v as f32 * d;
        }
    }

    #[inline]
    fn exact(&self, q: &mut [i8], scales: &mut [f32], _offsets: &mut [f32]) {
        q[..32].copy_from_slice(&self.qs);
        scales[0] = self.d.to_f32();
    }
}

/// `block_q4_K`: `ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]` — 8 sub-blocks of 32,
/// value `d*sc * nibble - dmin*m`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    /// 8 six-bit scales and 8 six-bit mins, packed (see [`scale_min_k4`]).
    pub scales: [u8; 12],
    /// Per 64-chunk `c`: 32 bytes whose low nibbles are elements `64c..64c+32`, high nibbles the next 32.
    pub qs: [u8; 128],
}

impl GgmlBlock for BlockQ4K {
    const TYPE: WeightType = WeightType::Q4_K;
    const LEN: usize = 256;
    const BYTES: usize = 144;
    const GROUP: usize = 32;

    #[inline]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::BYTES).then(|| BlockQ4K {
            d: half_at(b, 0),
            dmin: half_at(b, 2),
            scales: array_at(b, 4),
            qs: array_at(b, 16),
        })
    }

    fn write_bytes(&self, out: &mut [u8]) {
        put_half(out, 0, self.d);
        put_half(out, 2, self.dmin);
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }

    #[inline]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let qs = &self.qs[32 * c..32 * c + 32];
            let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (qs[l] & 0xF) as f32 - m1;
                hi[l] = d2 * (qs[l] >> 4) as f32 - m2;
            }
        }
    }

    #[inline]
    fn exact(&self, q: &mut [i8], scales: &mut [f32], offsets: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            scales[j] = d * sc as f32;
            offsets[j] = -(min * m as f32);
        }
        for c in 0..4 {
            let qs = &self.qs[32 * c..32 * c + 32];
            let (lo, hi) = q[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = (qs[l] & 0xF) as i8;
                hi[l] = (qs[l] >> 4) as i8;
            }
        }
    }
}

/// `block_q5_K`: `ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]` — as Q4_K with a
/// fifth bit from `qh`: quant = nibble + 16 * bit, 0..=31.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    /// Bit `2c` of `qh[l]` is the high bit of element `64c + l`, bit `2c+1` that of `64c + 32 + l`.
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

impl GgmlBlock for BlockQ5K {
    const TYPE: WeightType = WeightType::Q5_K;
    const LEN: usize = 256;
    const BYTES: usize = 176;
    const GROUP: usize = 32;

    #[inline]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::BYTES).then(|| BlockQ5K {
            d: half_at(b, 0),
            dmin: half_at(b, 2),
            scales: array_at(b, 4),
            qh: array_at(b, 16),
            qs: array_at(b, 48),
        })
    }

    fn write_bytes(&self, out: &mut [u8]) {
        put_half(out, 0, self.d);
        put_half(out, 2, self.dmin);
        out[4..16].copy_from_slice(&self.scales);
        out[16..48].copy_from_slice(&self.qh);
        out[48..176].copy_from_slice(&self.qs);
    }

    #[inline]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let ql = &self.qs[32 * c..32 * c + 32];
            let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                let h1 = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
        }
    }

    #[inline]
    fn exact(&self, q: &mut [i8], scales: &mut [f32], offsets: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            scales[j] = d * sc as f32;
            offsets[j] = -(min * m as f32);
        }
        for c in 0..4 {
            let ql = &self.qs[32 * c..32 * c + 32];
            let (lo, hi) = q[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                let h1 = ((self.qh[l] >> (2 * c)) & 1) << 4;
                let h2 = ((self.qh[l] >> (2 * c + 1)) & 1) << 4;
                lo[l] = ((ql[l] & 0xF) | h1) as i8;
                hi[l] = ((ql[l] >> 4) | h2) as i8;
            }
        }
    }
}

/// `block_q6_K`: `uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d` (d last) — 16 groups of 16,
/// value `d * sc * (q6 - 32)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    /// Low 4 bits; per 128-half: bytes 0..32 carry elements l (low nibble) and l+64 (high nibble),
    /// bytes 32..64 elements l+32 and l+96.
    pub ql: [u8; 128],
    /// High 2 bits; per 128-half, byte l carries elements l, l+32, l+64, l+96 in bit pairs 0, 2, 4, 6.
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}

impl GgmlBlock for BlockQ6K {
    const TYPE: WeightType = WeightType::Q6_K;
    const LEN: usize = 256;
    const BYTES: usize = 210;
    const GROUP: usize = 16;

    #[inline]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::BYTES).then(|| BlockQ6K {
            ql: array_at(b, 0),
            qh: array_at(b, 128),
            scales: std::array::from_fn(|i| b[192 + i] as i8),
            d: half_at(b, 208),
        })
    }

    fn write_bytes(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        for (o, &v) in out[192..208].iter_mut().zip(&self.scales) {
            *o = v as u8;
        }
        put_half(out, 208, self.d);
    }

    #[inline]
    fn dequantize(&self, y: &mut [f32]) {
        // ggml: `d * sc[is] * q` left to right, i.e. (d*sc) * q, per 16.
        let (mut q, mut sc) = ([0i8; 256], [0f32; 16]);
        self.exact(&mut q, &mut sc, &mut []);
        eval_groups(&q, 16, &sc, None, &mut y[..256]);
    }

    #[inline]
    fn exact(&self, q: &mut [i8], scales: &mut [f32], _offsets: &mut [f32]) {
        let d = self.d.to_f32();
        // Group g covers elements 16g..16g+16, and ggml's scale index for element e is e / 16.
        for (s, &sc) in scales[..16].iter_mut().zip(&self.scales) {
            *s = d * sc as f32;
        }
        for h in 0..2 {
            let ql = &self.ql[64 * h..64 * h + 64];
            let qh = &self.qh[32 * h..32 * h + 32];
            let q = &mut q[128 * h..128 * h + 128];
            for l in 0..32 {
                q[l] = ((ql[l] & 0xF) | (qh[l] & 3) << 4) as i8 - 32;
                q[l + 32] = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) as i8 - 32;
                q[l + 64] = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i8 - 32;
                q[l + 96] = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i8 - 32;
            }
        }
    }
}
