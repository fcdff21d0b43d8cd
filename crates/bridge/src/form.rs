//! ggml dequantisation and the exact block form.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::blocks::{BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlBlock};
use crate::par::{for_row_ranges, row_ranges};
use crate::{BridgeError, WeightType};

/// Runs `$body` with `$B` bound to the block struct of `$t`, or `$f16` for F16.
macro_rules! with_block {
    ($t:expr, $B:ident => $body:expr, F16 => $f16:expr) => {
        match $t {
            WeightType::F16 => $f16,
            WeightType::Q4_0 => {
                type $B = BlockQ4_0;
                $body
            }
            WeightType::Q8_0 => {
                type $B = BlockQ8_0;
                $body
            }
            WeightType::Q4_K => {
                type $B = BlockQ4K;
                $body
            }
            WeightType::Q5_K => {
                type $B = BlockQ5K;
                $body
            }
            WeightType::Q6_K => {
                type $B = BlockQ6K;
                $body
            }
        }
    };
}

/// Checks an `[n, k]` tensor of type `t` against its byte length; returns the row size in bytes.
pub(crate) fn check_tensor(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Result<usize, BridgeError> {
    let row = t.row_bytes(k)?;
    let want = t.tensor_bytes(n, k)?;
    n.checked_mul(k).ok_or(BridgeError::TooLarge { n, k })?;
    if bytes.len() != want {
        return Err(BridgeError::ByteLength {
            what: "weight tensor",
            got: bytes.len(),
            want,
        });
    }
    Ok(row)
}

fn dequantize_blocks<B: GgmlBlock>(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes
        .chunks_exact(B::BYTES)
        .zip(out.chunks_exact_mut(B::LEN))
    {
        if let Some(block) = B::from_bytes(b) {
            block.dequantize(y);
        }
    }
}

fn f16_bytes_to_f32(bytes: &[u8], out: &mut [f32]) {
    // Through a small fp16 buffer so half's vector conversion (F16C / NEON) does the work.
    let mut buf = [f16::ZERO; 256];
    for (b, y) in bytes.chunks(512).zip(out.chunks_mut(256)) {
        let n = y.len().min(b.len() / 2);
        for (h, p) in buf[..n].iter_mut().zip(b.chunks_exact(2)) {
            *h = f16::from_bits(u16::from_le_bytes([p[0], p[1]]));
        }
        buf[..n].convert_to_f32_slice(&mut y[..n]);
    }
}

/// Dequantises whole rows; `bytes` and `out` must already agree (checked by the callers).
pub(crate) fn dequantize_unchecked(t: WeightType, bytes: &[u8], out: &mut [f32]) {
    with_block!(t, B => dequantize_blocks::<B>(bytes, out), F16 => f16_bytes_to_f32(bytes, out))
}

/// ggml's reference dequantisation of one row: `k = out.len()` elements from `row`
/// (`row.len() == t.row_bytes(k)`). Bit-identical to ggml's `dequantize_row_*` (`to_float`).
pub fn dequantize_row(t: WeightType, row: &[u8], out: &mut [f32]) -> Result<(), BridgeError> {
    check_tensor(t, row, 1, out.len()).map_err(|e| match e {
        BridgeError::ByteLength { got, want, .. } => BridgeError::ByteLength {
            what: "weight row",
            got,
            want,
        },
        e => e,
    })?;
    dequantize_unchecked(t, row, out);
    Ok(())
}

/// Dequantises a whole `[n, k]` tensor to f32 (row-major).
pub fn dequantize(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Result<Vec<f32>, BridgeError> {
    check_tensor(t, bytes, n, k)?;
    let mut out = vec![0f32; n * k];
    dequantize_unchecked(t, bytes, &mut out);
    Ok(out)
}

/// Exact block form of an `[N, K]` weight: integer values and per-group scales (and offsets) with
/// `value[n][k] = scales[n][k/group] * q[n][k] (+ offsets[n][k/group])` evaluated in f32 equal to
/// ggml's dequantisation bit for bit.
///
/// Layouts are row-major: `q` is `[n, k]`, `scales` and `offsets` are `[n, k/group]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockForm {
    pub n: usize,
    pub k: usize,
    pub group: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub offsets: Option<Vec<f32>>,
}

impl BlockForm {
    /// Scale groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.k.checked_div(self.group).unwrap_or(0)
    }

    /// Evaluates row `row` into `out[..k]`.
    ///
    /// # Panics
    /// If `row >= n`, `out.len() < k` or the fields are inconsistent; see
    /// [`BlockForm::try_dequantize_row`] for the checked form.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        if let Err(e) = self.try_dequantize_row(row, out) {
            panic!("BlockForm::dequantize_row: {e}");
        }
    }

    /// Checked [`BlockForm::dequantize_row`].
    pub fn try_dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), BridgeError> {
        self.check()?;
        if row >= self.n {
            return Err(BridgeError::ElementLength {
                what: "block form row index (n)",
                got: row,
                want: self.n,
            });
        }
        if out.len() < self.k {
            return Err(BridgeError::ElementLength {
                what: "block form output row",
                got: out.len(),
                want: self.k,
            });
        }
        let (k, g) = (self.k, self.groups_per_row());
        let q = &self.q[row * k..(row + 1) * k];
        let s = &self.scales[row * g..(row + 1) * g];
        let out = &mut out[..k];
        let groups = q
            .chunks_exact(self.group)
            .zip(out.chunks_exact_mut(self.group));
        match &self.offsets {
            Some(o) => {
                let o = &o[row * g..(row + 1) * g];
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
        Ok(())
    }

    /// Checks that the field lengths agree with `n`, `k` and `group`.
    pub fn check(&self) -> Result<(), BridgeError> {
        let (n, k) = (self.n, self.k);
        if self.group == 0 || k % self.group != 0 {
            return Err(BridgeError::KNotMultiple {
                ty: "block form",
                k,
                block: self.group,
            });
        }
        let nk = n.checked_mul(k).ok_or(BridgeError::TooLarge { n, k })?;
        let ng = n * (k / self.group);
        let lens = [
            ("block form q", self.q.len(), nk),
            ("block form scales", self.scales.len(), ng),
        ];
        let off = self
            .offsets
            .as_ref()
            .map(|o| ("block form offsets", o.len(), ng));
        for (what, got, want) in lens.into_iter().chain(off) {
            if got != want {
                return Err(BridgeError::ElementLength { what, got, want });
            }
        }
        Ok(())
    }

    /// Bytes of memory the form holds (q, scales, offsets).
    pub fn bytes_held(&self) -> usize {
        self.q.len() + 4 * self.scales.len() + self.offsets.as_ref().map_or(0, |o| 4 * o.len())
    }

    /// The scales rounded to fp16, as the `w8f16` program takes them. Exact for Q4_0 and Q8_0 (the
    /// scale is ggml's fp16 `d`); for the K-quants `d * sc` needs up to 17 significant bits, so this
    /// rounds (relative error <= 2^-11), and saturates to ±inf beyond 65504.
    pub fn scales_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.scales.len()];
        out.convert_from_f32_slice(&self.scales);
        out
    }

    /// The offsets rounded to fp16 (see [`BlockForm::scales_f16`]).
    pub fn offsets_f16(&self) -> Option<Vec<f16>> {
        self.offsets.as_ref().map(|o| {
            let mut out = vec![f16::ZERO; o.len()];
            out.convert_from_f32_slice(o);
            out
        })
    }
}

fn exact_blocks<B: GgmlBlock>(bytes: &[u8], q: &mut [i8], scales: &mut [f32], offsets: &mut [f32]) {
    let groups = B::GROUPS;
    let mut offsets = offsets.chunks_exact_mut(groups);
    for ((b, q), s) in bytes
        .chunks_exact(B::BYTES)
        .zip(q.chunks_exact_mut(B::LEN))
        .zip(scales.chunks_exact_mut(groups))
    {
        if let Some(block) = B::from_bytes(b) {
            block.exact(q, s, offsets.next().unwrap_or(&mut []));
        }
    }
}

/// Exact block form of an `[n, k]` weight in ggml row layout (`bytes.len() == n * t.row_bytes(k)`).
/// F16 has no integer form and is refused.
pub fn block_form(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Result<BlockForm, BridgeError> {
    block_form_par(t, bytes, n, k, 1)
}

/// [`block_form`] on up to `threads` scoped threads (rows split evenly).
pub fn block_form_par(
    t: WeightType,
    bytes: &[u8],
    n: usize,
    k: usize,
    threads: usize,
) -> Result<BlockForm, BridgeError> {
    if t == WeightType::F16 {
        return Err(BridgeError::NoIntForm(t.name()));
    }
    let row = check_tensor(t, bytes, n, k)?;
    let g = k / t.group();
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0f32; n * g];
    let mut offsets = vec![0f32; if t.has_offsets() { n * g } else { 0 }];
    let og = if t.has_offsets() { g } else { 0 };
    let ranges = row_ranges(n, threads);
    for_row_ranges(
        &ranges,
        (&mut q, k),
        (&mut scales, g),
        (&mut offsets, og),
        |rows, q, s, o| {
            let bytes = &bytes[rows.start * row..rows.end * row];
            with_block!(t, B => exact_blocks::<B>(bytes, q, s, o), F16 => ())
        },
    );
    Ok(BlockForm {
        n,
        k,
        group: t.group(),
        q,
        scales,
        offsets: t.has_offsets().then_some(offsets),
    })
}
