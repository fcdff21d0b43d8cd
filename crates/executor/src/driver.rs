//! The host side of one offloaded matmul, shared by every executor:
//! weight forms (from the bridge), activation quantisation, transposes into the program layout,
//! M padding, K/N splits, the call, and the rescale back into ggml's `dst`.
//!
//! ggml's MUL_MAT computes `dst[m][n] = Σ_k w[n][k] · x[m][k]`; programs compute `y[N, Mp] = w[N, K] · x[K, Mp]`.

use half::f16;

use ggml_coreml_bridge::{self as bridge, BridgeError, RowwiseInt8, WeightType};
use ggml_coreml_program::{ProgramDesc, SplitPlan, Variant};

use crate::{ExecError, Executor, ProgramInputs};

/// How a matmul is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Through a program of this variant on the executor.
    Program(Variant),
    /// Exact f32 on the host from ggml's dequantisation — for comparisons, never the ANE.
    ExactF32,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        if s.eq_ignore_ascii_case("exact") || s.eq_ignore_ascii_case("f32") {
            return Some(Mode::ExactF32);
        }
        Variant::parse(s).map(Mode::Program)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Program(v) => v.name(),
            Mode::ExactF32 => "exact",
        }
    }

    /// The default for a weight type: int8 x int8 for quantised weights (the ANE's fast path), the fp16
    /// program for F16 weights (exact inputs, no requantisation). An override that makes no sense for a
    /// type (w8f16 over F16) falls back to the type's default.
    pub fn for_type(wtype: WeightType, requested: Option<Mode>) -> Mode {
        match (requested, wtype) {
            (Some(Mode::Program(Variant::W8F16)), WeightType::F16) | (None, WeightType::F16) => {
                Mode::Program(Variant::F16)
            }
            (Some(m), _) => m,
            (None, _) => Mode::Program(Variant::I8I8),
        }
    }
}

/// A weight in the form its program takes.
pub enum WeightForm {
    /// i8i8: row-wise int8 with one scale per output row.
    Rowwise(RowwiseInt8),
    /// w8f16: exact block values with fp16 block scales (and offsets).
    Block { q: Vec<i8>, scales: Vec<f16>, offsets: Option<Vec<f16>>, group: usize },
    /// f16: the exact values rounded to fp16.
    Half(Vec<f16>),
    /// ExactF32: the exact values.
    Exact(Vec<f32>),
}

/// One 2-D weight `[N, K]` ready for its mode.
pub struct PreparedWeight {
    pub wtype: WeightType,
    pub n: usize,
    pub k: usize,
    pub mode: Mode,
    pub form: WeightForm,
    /// Identity of the weight data for executors that keep device copies (0 = none).
    pub key: u64,
}

impl PreparedWeight {
    /// Repacks ggml's bytes (`n` rows of `k` elements in `wtype`'s row layout).
    pub fn prepare(
        mode: Mode,
        wtype: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
        key: u64,
    ) -> Result<PreparedWeight, BridgeError> {
        let form = match mode {
            Mode::Program(Variant::I8I8) => WeightForm::Rowwise(bridge::rowwise_int8(wtype, bytes, n, k)?),
            Mode::Program(Variant::W8F16) => {
                let b = bridge::block_form(wtype, bytes, n, k)?;
                WeightForm::Block {
                    scales: b.scales.iter().map(|&s| f16::from_f32(s)).collect(),
                    offsets: b.offsets.as_ref().map(|o| o.iter().map(|&s| f16::from_f32(s)).collect()),
                    group: b.group,
                    q: b.q,
                }
            }
            Mode::Program(Variant::F16) => WeightForm::Half(bridge::to_f16(wtype, bytes, n, k)?),
            Mode::ExactF32 => WeightForm::Exact(bridge::dequantize(wtype, bytes, n, k)?),
        };
        Ok(PreparedWeight { wtype, n, k, mode, form, key })
    }

    /// Bytes this form keeps alive (the original ggml bytes are not counted).
    pub fn bytes_held(&self) -> usize {
        match &self.form {
            WeightForm::Rowwise(r) => r.q.len() + r.scales.len() * 4,
            WeightForm::Block { q, scales, offsets, .. } => {
                q.len() + scales.len() * 2 + offsets.as_ref().map_or(0, |o| o.len() * 2)
            }
            WeightForm::Half(h) => h.len() * 2,
            WeightForm::Exact(e) => e.len() * 4,
        }
    }
}

/// Reusable buffers so steady-state calls do not allocate.
#[derive(Default)]
pub struct Scratch {
    xq: Vec<i8>,
    xs: Vec<f32>,
    xt_i8: Vec<i8>,
    xt_f16: Vec<f16>,
    w_i8: Vec<i8>,
    w_f16: Vec<f16>,
    s_f16: Vec<f16>,
    o_f16: Vec<f16>,
    y: Vec<f16>,
}

/// Activations: `m` rows of `k` f32 at `x[r * x_stride ..]`. Output: `m` rows of `n` f32 at
/// `out[r * out_stride ..]` (overwritten).
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub x_stride: usize,
}

/// Runs `out = x · wᵀ` for one weight through `exec` (or exactly, in [`Mode::ExactF32`]).
pub fn matmul(
    exec: &dyn Executor,
    w: &PreparedWeight,
    act: &Activations<'_>,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Scratch,
) -> Result<(), ExecError> {
    let (m, k, n) = (act.m, w.k, w.n);
    let bad = |why: String| ExecError::BadInputs(format!("matmul m={m} k={k} n={n}"), why);
    if m == 0 {
        return Ok(());
    }
    if act.x_stride < k || act.x.len() < (m - 1) * act.x_stride + k {
        return Err(bad("activation slice too short".into()));
    }
    if out_stride < n || out.len() < (m - 1) * out_stride + n {
        return Err(bad("output slice too short".into()));
    }
    for r in 0..m {
        out[r * out_stride..r * out_stride + n].fill(0.0);
    }
    let variant = match w.mode {
        Mode::ExactF32 => {
            exact(w, act, out, out_stride);
            return Ok(());
        }
        Mode::Program(v) => v,
    };
    let (group, offsets) = match &w.form {
        WeightForm::Block { group, offsets, .. } => (*group, offsets.is_some()),
        _ => (0, false),
    };
    // K parts keep whole ggml blocks (the same rule `ggml-coreml cache warm` uses to predict programs).
    let align = w.wtype.block_len().max(group).max(1);
    let plan = SplitPlan::new(variant, m, k, n, group, offsets, align).map_err(bad)?;

    if variant == Variant::I8I8 {
        scratch.xq.resize(m * k, 0);
        scratch.xs.resize(m, 0.0);
        bridge::try_quantize_rows_i8(act.x, m, k, act.x_stride, &mut scratch.xq, &mut scratch.xs)
            .map_err(|e| bad(e.to_string()))?;
    }

    for part in &plan.parts {
        let d = part.desc;
        run_part(exec, w, act, scratch, part.m0, part.m_len, part.k0, part.n0, &d)?;
        // Accumulate y[N, Mp] (fp16) into out[m][n].
        let mp = d.m;
        match &w.form {
            WeightForm::Rowwise(r) => {
                let s = d.i8_scale().to_f32();
                let inv = 1.0 / (s * s);
                for mi in 0..part.m_len {
                    let sx = scratch.xs[part.m0 + mi] * inv;
                    let orow = &mut out[(part.m0 + mi) * out_stride..];
                    for ni in 0..d.n {
                        let y = scratch.y[ni * mp + mi].to_f32();
                        orow[part.n0 + ni] += y * sx * r.scales[part.n0 + ni];
                    }
                }
            }
            _ => {
                for mi in 0..part.m_len {
                    let orow = &mut out[(part.m0 + mi) * out_stride..];
                    for ni in 0..d.n {
                        orow[part.n0 + ni] += scratch.y[ni * mp + mi].to_f32();
                    }
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_part(
    exec: &dyn Executor,
    w: &PreparedWeight,
    act: &Activations<'_>,
    s: &mut Scratch,
    m0: usize,
    m_len: usize,
    k0: usize,
    n0: usize,
    d: &ProgramDesc,
) -> Result<(), ExecError> {
    let (mp, kp, np, k) = (d.m, d.k, d.n, w.k);
    s.y.resize(np * mp, f16::ZERO);
    // Each K/N part of a weight is its own weight for executors that keep device copies.
    let key = if w.key == 0 || (k0 == 0 && n0 == 0 && kp == k && np == w.n) {
        w.key
    } else {
        w.key ^ ((k0 as u64) << 40 | (n0 as u64) << 16 | 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    };
    let whole_k = kp == k;
    match &w.form {
        WeightForm::Rowwise(r) => {
            // x [K, Mp] int8, zero padding past m_len.
            s.xt_i8.clear();
            s.xt_i8.resize(kp * mp, 0);
            for mi in 0..m_len {
                let row = &s.xq[(m0 + mi) * k + k0..(m0 + mi) * k + k0 + kp];
                for (kk, &v) in row.iter().enumerate() {
                    s.xt_i8[kk * mp + mi] = v;
                }
            }
            let wpart: &[i8] = if whole_k {
                &r.q[n0 * k..(n0 + np) * k]
            } else {
                s.w_i8.clear();
                for ni in 0..np {
                    let base = (n0 + ni) * k + k0;
                    s.w_i8.extend_from_slice(&r.q[base..base + kp]);
                }
                &s.w_i8
            };
            exec.run(d, ProgramInputs::I8I8 { w: wpart, x: &s.xt_i8 }, key, &mut s.y)
        }
        WeightForm::Block { q, scales, offsets, group } => {
            fill_x_f16(act, &mut s.xt_f16, m0, m_len, k0, kp, mp);
            let g = *group;
            let (kg, kpg, k0g) = (k / g, kp / g, k0 / g);
            let (wpart, spart, opart): (&[i8], &[f16], Option<&[f16]>) = if whole_k {
                (
                    &q[n0 * k..(n0 + np) * k],
                    &scales[n0 * kg..(n0 + np) * kg],
                    offsets.as_ref().map(|o| &o[n0 * kg..(n0 + np) * kg]),
                )
            } else {
                s.w_i8.clear();
                s.s_f16.clear();
                s.o_f16.clear();
                for ni in 0..np {
                    let base = (n0 + ni) * k + k0;
                    s.w_i8.extend_from_slice(&q[base..base + kp]);
                    let sb = (n0 + ni) * kg + k0g;
                    s.s_f16.extend_from_slice(&scales[sb..sb + kpg]);
                    if let Some(o) = offsets {
                        s.o_f16.extend_from_slice(&o[sb..sb + kpg]);
                    }
                }
                (&s.w_i8, &s.s_f16, offsets.as_ref().map(|_| &s.o_f16[..]))
            };
            let inputs = ProgramInputs::W8F16 { w: wpart, scales: spart, offsets: opart, x: &s.xt_f16 };
            exec.run(d, inputs, key, &mut s.y)
        }
        WeightForm::Half(h) => {
            fill_x_f16(act, &mut s.xt_f16, m0, m_len, k0, kp, mp);
            let wpart: &[f16] = if whole_k {
                &h[n0 * k..(n0 + np) * k]
            } else {
                s.w_f16.clear();
                for ni in 0..np {
                    let base = (n0 + ni) * k + k0;
                    s.w_f16.extend_from_slice(&h[base..base + kp]);
                }
                &s.w_f16
            };
            exec.run(d, ProgramInputs::F16 { w: wpart, x: &s.xt_f16 }, key, &mut s.y)
        }
        WeightForm::Exact(_) => Err(ExecError::Unsupported(d.key(), "exact weights take no program".into())),
    }
}

/// x [K, Mp] fp16 from f32 rows, zero padding past `m_len`.
fn fill_x_f16(act: &Activations<'_>, xt: &mut Vec<f16>, m0: usize, m_len: usize, k0: usize, kp: usize, mp: usize) {
    xt.clear();
    xt.resize(kp * mp, f16::ZERO);
    for mi in 0..m_len {
        let base = (m0 + mi) * act.x_stride + k0;
        for (kk, &v) in act.x[base..base + kp].iter().enumerate() {
            xt[kk * mp + mi] = f16::from_f32(v);
        }
    }
}

fn exact(w: &PreparedWeight, act: &Activations<'_>, out: &mut [f32], out_stride: usize) {
    let WeightForm::Exact(wf) = &w.form else { return };
    let k = w.k;
    for r in 0..act.m {
        let x = &act.x[r * act.x_stride..r * act.x_stride + k];
        let orow = &mut out[r * out_stride..r * out_stride + w.n];
        for (ni, o) in orow.iter_mut().enumerate() {
            let wr = &wf[ni * k..(ni + 1) * k];
            *o = wr.iter().zip(x).map(|(a, b)| a * b).sum();
        }
    }
}
