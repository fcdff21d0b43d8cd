//! The host side of one offloaded matmul, shared by every executor:
//! weight forms (from the bridge), activation quantisation, transposes into the program layout,
//! M padding, K/N splits, the call, and the rescale back into ggml's `dst`.
//!
//! ggml's MUL_MAT computes `dst[m][n] = Σ_k w[n][k] · x[m][k]`; programs compute `y[N, Mp] = w[N, K] · x[K, Mp]`.

use std::sync::OnceLock;

use half::f16;

use ggml_coreml_bridge::{self as bridge, BridgeError, RowwiseInt8, WeightType};
use ggml_coreml_program::{ProgramDesc, SplitPlan, Variant};

use crate::{ExecError, Executor, ProgramInputs, WeightPart};

/// How a matmul is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Through a program of this variant on the executor.
    Program(Variant),
    /// Exact f32 on the host from ggml's dequantisation — for comparisons, never the ANE.
    ExactF32,
    /// `i8i8r`: the i8i8 program (int8 × int8) on rotated operands. Weights are rotated along K at
    /// prepare time by a randomised block Hadamard transform ([`bridge::Rotation`]) and requantised per
    /// row; activations are rotated on the host per call with the same transform, then quantised per
    /// token. The rotation is orthogonal, so the product is unchanged; it spreads outlier channels
    /// before the per-token scale is taken.
    I8I8Rotated,
    /// `i8i8o`: the i8i8o program (outlier split). Weights are the row-wise int8 form of i8i8; per
    /// call the host picks the [`outlier_channels`] activation channels with the largest max |x| over
    /// the call's tokens, quantises the others per token to int8 (scale over the non-outlier channels
    /// only) and passes the outlier activations in fp16 with the weight's int8 columns at those
    /// channels; the program adds the two products.
    I8I8Outlier,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        if s.eq_ignore_ascii_case("exact") || s.eq_ignore_ascii_case("f32") {
            return Some(Mode::ExactF32);
        }
        if s.eq_ignore_ascii_case("i8i8r") {
            return Some(Mode::I8I8Rotated);
        }
        if s.eq_ignore_ascii_case("i8i8o") {
            return Some(Mode::I8I8Outlier);
        }
        Variant::parse(s).map(Mode::Program)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Program(v) => v.name(),
            Mode::ExactF32 => "exact",
            Mode::I8I8Rotated => "i8i8r",
            Mode::I8I8Outlier => "i8i8o",
        }
    }

    /// Every name [`Mode::parse`] accepts (one per mode).
    pub const NAMES: [&'static str; 6] = ["i8i8", "i8i8r", "i8i8o", "w8f16", "f16", "exact"];

    /// The program this mode runs (`None`: no program, exact f32 on the host).
    pub fn program(self) -> Option<Variant> {
        match self {
            Mode::Program(v) => Some(v),
            Mode::I8I8Rotated => Some(Variant::I8I8),
            Mode::I8I8Outlier => Some(Variant::I8I8O),
            Mode::ExactF32 => None,
        }
    }

    /// Whether the program's matmul is int8 × int8 (the ANE's int8 rate on chips that have it).
    pub fn int8(self) -> bool {
        matches!(self.program(), Some(Variant::I8I8 | Variant::I8I8O))
    }

    /// [`Mode::for_type`] for one weight on a chip with or without the ANE's int8 × int8 path. On int8
    /// chips a quantised weight takes the route of its tensor kind ([`KindRoute`], from
    /// [`INT8_CHIP_ROUTES`]); elsewhere `w8f16`. A requested mode always wins.
    pub fn for_weight(
        wtype: WeightType,
        route: KindRoute,
        requested: Option<Mode>,
        int8_chip: bool,
    ) -> Mode {
        match (requested, wtype) {
            (None, t) if int8_chip && t != WeightType::F16 => match route {
                KindRoute::W8F16 => Mode::Program(Variant::W8F16),
                KindRoute::Rotated => Mode::I8I8Rotated,
                KindRoute::Outlier => Mode::I8I8Outlier,
            },
            _ => Mode::for_type(wtype, requested),
        }
    }

    /// The default for a weight type: the exact block form with fp16 activations (w8f16) for quantised
    /// weights, the fp16 program for F16 weights (exact inputs, no requantisation). i8i8 (the ANE's
    /// int8 x int8 path) is opt-in (`GGML_COREML_VARIANT=i8i8`) until per-group activation scales exist. An override that makes no sense for a
    /// type (w8f16 over F16) falls back to the type's default.
    pub fn for_type(wtype: WeightType, requested: Option<Mode>) -> Mode {
        match (requested, wtype) {
            (Some(Mode::Program(Variant::W8F16)), WeightType::F16) | (None, WeightType::F16) => {
                Mode::Program(Variant::F16)
            }
            (Some(m), _) => m,
            // Not i8i8: one int8 scale per token does not survive real LLM activations (outlier
            // channels); docs/parity.md measures it failing the Q8_0-vs-F16 bar on Gemma-3-270M.
            (None, _) => Mode::Program(Variant::W8F16),
        }
    }
}

/// What a tensor kind runs on chips with the int8 × int8 path (quantised weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KindRoute {
    /// `w8f16` (fp16 rate).
    W8F16,
    /// `i8i8r` (rotated W8A8).
    Rotated,
    /// `i8i8o` (outlier split).
    #[default]
    Outlier,
}

impl KindRoute {
    pub fn parse(s: &str) -> Option<KindRoute> {
        match Mode::parse(s)? {
            Mode::Program(Variant::W8F16) => Some(KindRoute::W8F16),
            Mode::I8I8Rotated => Some(KindRoute::Rotated),
            Mode::I8I8Outlier => Some(KindRoute::Outlier),
            _ => None,
        }
    }
}

/// The one routing table of int8 chips: per tensor kind, the fastest predicted variant that keeps
/// parity (docs/parity.md, "W8A8 that keeps parity"); kinds not listed take [`INT8_CHIP_DEFAULT`]
/// (`i8i8o`: attn_q, attn_output, ffn_gate). Gemma-3-270M Q8_0 on M4 with this table: KLD 0.0237
/// against a bar of 0.0310, 84.2 % of offloaded MUL_MAT FLOPs int8 × int8. The output head (tied
/// `token_embd`) and ffn_down keep the rotation: their row-wise int8 weights (head: 3.5e-4 NMSE) and
/// ffn_down's broad activations are what the outlier split cannot fix (i8i8o there: KLD 0.0436); the
/// head's rotation also costs less than w8f16's fp16 rate. attn_k, attn_v and ffn_up (the largest
/// int8 errors, 2.7 % + 13 % of the FLOPs) stay in w8f16.
pub const INT8_CHIP_ROUTES: &[(&str, KindRoute)] = &[
    ("output", KindRoute::Rotated),
    ("token_embd", KindRoute::Rotated),
    ("ffn_down", KindRoute::Rotated),
    ("attn_k", KindRoute::W8F16),
    ("attn_v", KindRoute::W8F16),
    ("ffn_up", KindRoute::W8F16),
];

/// The route of tensor kinds [`INT8_CHIP_ROUTES`] does not list.
pub const INT8_CHIP_DEFAULT: KindRoute = KindRoute::Outlier;

/// The kind of a weight from its ggml name: `blk.3.ffn_down.weight` → `ffn_down`,
/// `output.weight` → `output`.
pub fn tensor_kind(name: &str) -> &str {
    let s = name.strip_suffix(".weight").unwrap_or(name);
    match s.strip_prefix("blk.") {
        Some(rest) => rest.split_once('.').map_or(rest, |(_, k)| k),
        None => s,
    }
}

/// The int8-chip route of the weight named `name`: [`INT8_CHIP_ROUTES`], or for experiments
/// `GGML_COREML_KIND_ROUTES=kind=variant,…` (variants `w8f16`, `i8i8r`, `i8i8o`; `*=variant` sets the
/// route of kinds not listed). Unparsable entries are ignored.
pub fn kind_route(name: &str) -> KindRoute {
    type Table = (Vec<(String, KindRoute)>, KindRoute);
    static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    let (kinds, default) = TABLE.get_or_init(|| match std::env::var("GGML_COREML_KIND_ROUTES") {
        Ok(v) => {
            let mut kinds = Vec::new();
            let mut default = INT8_CHIP_DEFAULT;
            for (k, r) in v.split(',').filter_map(|e| e.split_once('=')) {
                let Some(r) = KindRoute::parse(r.trim()) else {
                    continue;
                };
                match k.trim() {
                    "*" => default = r,
                    k => kinds.push((k.to_string(), r)),
                }
            }
            (kinds, default)
        }
        Err(_) => (
            INT8_CHIP_ROUTES
                .iter()
                .map(|&(k, r)| (k.to_string(), r))
                .collect(),
            INT8_CHIP_DEFAULT,
        ),
    });
    let kind = tensor_kind(name);
    kinds
        .iter()
        .find(|(k, _)| k == kind)
        .map_or(*default, |&(_, r)| r)
}

/// A weight in the form its program takes.
pub enum WeightForm {
    /// i8i8: row-wise int8 with one scale per output row.
    Rowwise(RowwiseInt8),
    /// w8f16: exact block values with fp16 block scales (and offsets).
    Block {
        q: Vec<i8>,
        scales: Vec<f16>,
        offsets: Option<Vec<f16>>,
        group: usize,
    },
    /// f16: the exact values rounded to fp16.
    Half(Vec<f16>),
    /// ExactF32: the exact values.
    Exact(Vec<f32>),
}

impl WeightForm {
    /// Room for `rows` more rows of `k` values.
    fn reserve_rows(&mut self, rows: usize, k: usize) {
        match self {
            WeightForm::Rowwise(r) => {
                r.q.reserve_exact(rows * k);
                r.scales.reserve_exact(rows);
            }
            WeightForm::Block {
                q,
                scales,
                offsets,
                group,
            } => {
                let per_row = k / (*group).max(1);
                q.reserve_exact(rows * k);
                scales.reserve_exact(rows * per_row);
                if let Some(o) = offsets {
                    o.reserve_exact(rows * per_row);
                }
            }
            WeightForm::Half(h) => h.reserve_exact(rows * k),
            WeightForm::Exact(e) => e.reserve_exact(rows * k),
        }
    }

    /// Appends the rows of `more` (the same kind of form, same `k`); false if the kinds differ.
    fn append(&mut self, more: WeightForm) -> bool {
        match (self, more) {
            (WeightForm::Rowwise(a), WeightForm::Rowwise(b)) => {
                a.q.extend_from_slice(&b.q);
                a.scales.extend_from_slice(&b.scales);
                a.n += b.n;
            }
            (
                WeightForm::Block {
                    q, scales, offsets, ..
                },
                WeightForm::Block {
                    q: q2,
                    scales: s2,
                    offsets: o2,
                    ..
                },
            ) => {
                q.extend_from_slice(&q2);
                scales.extend_from_slice(&s2);
                if let (Some(o), Some(o2)) = (offsets, o2) {
                    o.extend_from_slice(&o2);
                }
            }
            (WeightForm::Half(a), WeightForm::Half(b)) => a.extend_from_slice(&b),
            (WeightForm::Exact(a), WeightForm::Exact(b)) => a.extend_from_slice(&b),
            // One mode makes one kind of form.
            _ => return false,
        }
        true
    }
}

/// Largest rotation block of `i8i8r` (`GGML_COREML_ROTATE_BLOCK`, a power of two; default
/// [`bridge::DEFAULT_MAX_BLOCK`]). Read once per process: weights and activations must agree.
pub fn rotation_max_block() -> usize {
    static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        std::env::var("GGML_COREML_ROTATE_BLOCK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b >= 1)
            .unwrap_or(bridge::DEFAULT_MAX_BLOCK)
    })
}

/// Whether `i8i8r` also mixes across its Hadamard blocks when K is not a power of two
/// (`GGML_COREML_ROTATE_MIX=0` turns it off; on by default).
pub fn rotation_mix() -> bool {
    static B: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *B.get_or_init(|| std::env::var("GGML_COREML_ROTATE_MIX").map_or(true, |v| v != "0"))
}

/// Outlier channels of `i8i8o` for a row length `k`: `min(C, k / 8)`, C from
/// `GGML_COREML_OUTLIERS` (default [`DEFAULT_OUTLIERS`]); 0 (too few channels: plain i8i8) below
/// K = 8. Read once per process.
pub fn outlier_channels(k: usize) -> usize {
    static C: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let c = *C.get_or_init(|| {
        std::env::var("GGML_COREML_OUTLIERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(DEFAULT_OUTLIERS)
    });
    c.min(k / 8)
}

/// Default outlier channel budget of `i8i8o` (see docs/parity.md for the measured choice).
pub const DEFAULT_OUTLIERS: usize = 32;

/// Weights of at least this many elements are repacked on several threads.
const REPACK_PAR_ELEMENTS: usize = 1 << 22;

/// One 2-D weight `[N, K]` ready for its mode.
pub struct PreparedWeight {
    pub wtype: WeightType,
    pub n: usize,
    pub k: usize,
    pub mode: Mode,
    pub form: WeightForm,
    /// i8i8r: the rotation the weight rows went through; activations take the same one per call.
    pub rotation: Option<bridge::Rotation>,
    /// Identity of the weight data for executors that keep device copies (0 = none): the caller's
    /// nonzero key made unique to this prepared form ([`PreparedWeight::prepare`]), so two forms never
    /// share one, even at the same address.
    pub key: u64,
    /// The f16 form, made from `form` the first time the executor refuses this weight's int8-input
    /// program (i8i8, w8f16): from then on the weight runs through the f16 program, and goes to the
    /// host only if that is refused too. See [`matmul`].
    fallback: OnceLock<WeightForm>,
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
        // Repacks run once per weight while the model loads (nothing else computes yet): large ones
        // use the machine's cores.
        let threads = if n.saturating_mul(k) >= REPACK_PAR_ELEMENTS {
            std::thread::available_parallelism().map_or(1, |t| t.get())
        } else {
            1
        };
        let mut rotation = None;
        // The outlier split needs one K part (outliers are chosen over all of K): longer rows take
        // the rotated route instead.
        let mode = if mode == Mode::Program(Variant::I8I8O) {
            Mode::I8I8Outlier
        } else {
            mode
        };
        let mode = if mode == Mode::I8I8Outlier && k > ggml_coreml_program::ANE_MAX_DIM {
            Mode::I8I8Rotated
        } else {
            mode
        };
        let form = match mode {
            Mode::Program(Variant::I8I8) => {
                WeightForm::Rowwise(bridge::rowwise_int8_par(wtype, bytes, n, k, threads)?)
            }
            Mode::Program(Variant::W8F16) => {
                let b = bridge::block_form_par(wtype, bytes, n, k, threads)?;
                WeightForm::Block {
                    scales: b.scales.iter().map(|&s| f16::from_f32(s)).collect(),
                    offsets: b
                        .offsets
                        .as_ref()
                        .map(|o| o.iter().map(|&s| f16::from_f32(s)).collect()),
                    group: b.group,
                    q: b.q,
                }
            }
            Mode::Program(Variant::F16) => {
                WeightForm::Half(bridge::to_f16_par(wtype, bytes, n, k, threads)?)
            }
            Mode::ExactF32 => WeightForm::Exact(bridge::dequantize(wtype, bytes, n, k)?),
            Mode::I8I8Outlier | Mode::Program(Variant::I8I8O) => {
                WeightForm::Rowwise(bridge::rowwise_int8_par(wtype, bytes, n, k, threads)?)
            }
            Mode::I8I8Rotated => {
                let rot = bridge::Rotation::with_mix(k, rotation_max_block(), rotation_mix());
                let r = bridge::rowwise_int8_rotated_par(wtype, bytes, n, k, &rot, threads)?;
                rotation = Some(rot);
                WeightForm::Rowwise(r)
            }
        };
        Ok(PreparedWeight {
            wtype,
            n,
            k,
            mode,
            form,
            rotation,
            key: unique_key(key),
            fallback: OnceLock::new(),
        })
    }

    /// [`PreparedWeight::prepare`] in chunks of `chunk` rows: `rows_of(r0, rows)` gives a chunk's raw
    /// bytes, and `done(r0, rows)` is called once that chunk is converted (the caller may then let its
    /// raw pages go). The form equals one `prepare` of all rows value for value (every form is made
    /// row by row); only one chunk's form exists besides the result at any time.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_chunked<'b>(
        mode: Mode,
        wtype: WeightType,
        n: usize,
        k: usize,
        key: u64,
        chunk: usize,
        rows_of: &mut dyn FnMut(usize, usize) -> std::borrow::Cow<'b, [u8]>,
        done: &mut dyn FnMut(usize, usize),
    ) -> Result<PreparedWeight, BridgeError> {
        let chunk = chunk.max(1);
        if chunk >= n {
            let w = PreparedWeight::prepare(mode, wtype, &rows_of(0, n), n, k, key)?;
            done(0, n);
            return Ok(w);
        }
        let mut acc: Option<PreparedWeight> = None;
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            // Parts carry no key (nothing keeps device copies of them); the whole form gets one.
            let mut part = PreparedWeight::prepare(mode, wtype, &rows_of(r0, rows), rows, k, 0)?;
            done(r0, rows);
            match &mut acc {
                None => {
                    let mut first = part;
                    first.form.reserve_rows(n - rows, k);
                    first.n = n;
                    acc = Some(first);
                }
                Some(a) => {
                    let form = std::mem::replace(&mut part.form, WeightForm::Half(Vec::new()));
                    if !a.form.append(form) {
                        return Err(BridgeError::ByteLength {
                            what: "chunked weight form",
                            got: r0,
                            want: n,
                        });
                    }
                }
            }
        }
        // n > chunk ≥ 1: at least one chunk ran.
        let mut w = acc.ok_or(BridgeError::ByteLength {
            what: "chunked weight rows",
            got: 0,
            want: n,
        })?;
        w.key = unique_key(key);
        Ok(w)
    }

    /// True once the weight runs through its f16 fallback program.
    pub fn on_f16_fallback(&self) -> bool {
        self.fallback.get().is_some()
    }

    /// The f16 fallback form, dequantised from the int8 form once (None for f16 / exact forms).
    fn f16_fallback(&self) -> Option<&WeightForm> {
        match &self.form {
            WeightForm::Rowwise(_) | WeightForm::Block { .. } => Some(
                self.fallback
                    .get_or_init(|| WeightForm::Half(self.dequantize_f16())),
            ),
            _ => None,
        }
    }

    /// The weight's values in fp16 as its int8 program would see them: `q · scale` per row (i8i8),
    /// `q · scale (+ offset)` per group (w8f16, the program's own formula).
    fn dequantize_f16(&self) -> Vec<f16> {
        let (n, k) = (self.n, self.k);
        let mut out = Vec::with_capacity(n * k);
        match &self.form {
            WeightForm::Rowwise(r) => {
                for row in 0..n {
                    let s = r.scales[row];
                    out.extend(
                        r.q[row * k..(row + 1) * k]
                            .iter()
                            .map(|&q| f16::from_f32(q as f32 * s)),
                    );
                }
            }
            WeightForm::Block {
                q,
                scales,
                offsets,
                group,
            } => {
                let g = (*group).max(1);
                for (i, &v) in q.iter().enumerate() {
                    let gi = i / g;
                    let mut x = f16::from_f32(v as f32) * scales[gi];
                    if let Some(o) = offsets {
                        x += o[gi];
                    }
                    out.push(x);
                }
            }
            WeightForm::Half(h) => out.extend_from_slice(h),
            WeightForm::Exact(e) => out.extend(e.iter().map(|&v| f16::from_f32(v))),
        }
        out
    }

    /// Bytes this form keeps alive (the original ggml bytes are not counted).
    pub fn bytes_held(&self) -> usize {
        match &self.form {
            WeightForm::Rowwise(r) => r.q.len() + r.scales.len() * 4,
            WeightForm::Block {
                q, scales, offsets, ..
            } => q.len() + scales.len() * 2 + offsets.as_ref().map_or(0, |o| o.len() * 2),
            WeightForm::Half(h) => h.len() * 2,
            WeightForm::Exact(e) => e.len() * 4,
        }
    }
}

/// Executors that keep device copies of this form (the CoreML executor's resident surfaces) let
/// them go with it: the key is unique to this form, so no later call can name them again.
impl Drop for PreparedWeight {
    fn drop(&mut self) {
        crate::retire_weight(self.key);
    }
}

/// Reusable buffers so steady-state calls do not allocate.
#[derive(Default)]
pub struct Scratch {
    xr: Vec<f32>,
    xq: Vec<i8>,
    xs: Vec<f32>,
    sx: Vec<f32>,
    xt_i8: Vec<i8>,
    x_f16: Vec<f16>,
    xt_f16: Vec<f16>,
    w_i8: Vec<i8>,
    w_f16: Vec<f16>,
    s_f16: Vec<f16>,
    o_f16: Vec<f16>,
    y: Vec<f16>,
    /// i8i8o: channel maxima, outlier channels, per-token int8 scales, gathered weight columns,
    /// outlier activations and per-token factors.
    cmax: Vec<f32>,
    oidx: Vec<usize>,
    xa: Vec<f32>,
    wo_i8: Vec<i8>,
    xo_f16: Vec<f16>,
    t_f16: Vec<f16>,
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
    let Some(variant) = w.mode.program() else {
        exact(w, act, out, out_stride);
        return Ok(());
    };
    if let Some(h) = w.fallback.get() {
        return matmul_form(exec, w, h, Variant::F16, act, out, out_stride, scratch);
    }
    match matmul_form(exec, w, &w.form, variant, act, out, out_stride, scratch) {
        // The int8-input program is refused here (placement, compile, an OS without int8 inputs on
        // the ANE): the same weight through the f16 program before the host.
        Err(e) if e.is_refusal() && variant != Variant::F16 => match w.f16_fallback() {
            Some(h) => matmul_form(exec, w, h, Variant::F16, act, out, out_stride, scratch),
            None => Err(e),
        },
        r => r,
    }
}

/// [`matmul`] with an explicit weight form and program variant (the weight's own, or its f16 fallback).
#[allow(clippy::too_many_arguments)]
fn matmul_form(
    exec: &dyn Executor,
    w: &PreparedWeight,
    form: &WeightForm,
    variant: Variant,
    act: &Activations<'_>,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Scratch,
) -> Result<(), ExecError> {
    let (m, k, n) = (act.m, w.k, w.n);
    let bad = |why: String| ExecError::BadInputs(format!("matmul m={m} k={k} n={n}"), why);
    let (mut group, offsets) = match form {
        WeightForm::Block { group, offsets, .. } => (*group, offsets.is_some()),
        _ => (0, false),
    };
    // K parts keep whole ggml blocks (the same rule `ggml-coreml cache warm` uses to predict programs).
    let mut align = w.wtype.block_len().max(group).max(1);
    let mut variant = variant;
    if variant == Variant::I8I8O {
        group = outlier_channels(k);
        align = k;
        if group == 0 {
            // Too few channels to split: the plain int8 program.
            variant = Variant::I8I8;
            align = w.wtype.block_len().max(1);
        }
    }
    let plan = SplitPlan::new(variant, m, k, n, group, offsets, align).map_err(bad)?;

    if variant == Variant::I8I8O {
        scratch.xq.resize(m * k, 0);
        scratch.xs.resize(m, 0.0);
        scratch.xa.resize(m, 0.0);
        bridge::select_outlier_channels(
            act.x,
            m,
            k,
            act.x_stride,
            group,
            &mut scratch.cmax,
            &mut scratch.oidx,
        )
        .map_err(|e| bad(e.to_string()))?;
        // xs holds the per-token unit (the host's rescale), xa the int8 part's own scale.
        bridge::quantize_rows_i8_split(
            act.x,
            m,
            k,
            act.x_stride,
            &scratch.oidx,
            &mut scratch.xq,
            &mut scratch.xa,
            &mut scratch.xs,
        )
        .map_err(|e| bad(e.to_string()))?;
    } else if variant == Variant::I8I8 {
        scratch.xq.resize(m * k, 0);
        scratch.xs.resize(m, 0.0);
        let (x, stride) = match &w.rotation {
            // i8i8r: x ← R x per token (the weight rows hold R w), then per-token int8.
            Some(rot) => {
                rot.rotate_rows_into(act.x, m, act.x_stride, &mut scratch.xr)
                    .map_err(|e| bad(e.to_string()))?;
                (&scratch.xr[..], k)
            }
            None => (act.x, act.x_stride),
        };
        bridge::try_quantize_rows_i8(x, m, k, stride, &mut scratch.xq, &mut scratch.xs)
            .map_err(|e| bad(e.to_string()))?;
    }

    // With one K part every output is written exactly once: store instead of zero-fill + add.
    let accumulate = plan.parts.iter().any(|p| p.k0 != 0 || p.desc.k != k);
    if accumulate {
        for r in 0..m {
            out[r * out_stride..r * out_stride + n].fill(0.0);
        }
    }
    for part in &plan.parts {
        let d = part.desc;
        run_part(
            exec, w, form, act, scratch, part.m0, part.m_len, part.k0, part.n0, &d,
        )?;
        // y[N, Mp] (fp16) into out[m][n], rescaled for i8i8.
        let rescale = match form {
            WeightForm::Rowwise(r) => {
                let s = d.i8_scale().to_f32();
                let inv = 1.0 / (s * s);
                scratch.sx.clear();
                scratch.sx.extend(
                    scratch.xs[part.m0..part.m0 + part.m_len]
                        .iter()
                        .map(|&x| x * inv),
                );
                Some((&scratch.sx[..], &r.scales[part.n0..part.n0 + d.n]))
            }
            _ => None,
        };
        store_y(
            &scratch.y,
            d.m,
            d.n,
            part.m_len,
            &mut out[part.m0 * out_stride + part.n0..],
            out_stride,
            accumulate,
            rescale,
        );
    }
    Ok(())
}

/// Rows and columns of the tiles `store_y` goes through (16 KiB of f32: stays in L1).
const TILE_N: usize = 64;
const TILE_M: usize = 64;

/// Writes (or adds) `y[N, Mp]` columns `0..m_len` into `out[mi][ni]` (row stride `out_stride`).
/// For i8i8, `rescale = (sx, sw)` with one factor per token and per row: `out = y · sx[mi] · sw[ni]`,
/// multiplied in that order. Tiles are converted and scaled along y's rows (contiguous, vectorised),
/// then transposed into `out`.
#[allow(clippy::too_many_arguments)]
fn store_y(
    y: &[f16],
    mp: usize,
    np: usize,
    m_len: usize,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    rescale: Option<(&[f32], &[f32])>,
) {
    use half::slice::HalfFloatSliceExt;
    if m_len < 8 {
        // Decode-sized: one strided pass, no tiles.
        for mi in 0..m_len {
            let o = &mut out[mi * out_stride..mi * out_stride + np];
            for (ni, o) in o.iter_mut().enumerate() {
                let mut v = y[ni * mp + mi].to_f32();
                if let Some((sx, sw)) = rescale {
                    v = v * sx[mi] * sw[ni];
                }
                *o = if accumulate { *o + v } else { 0.0 + v };
            }
        }
        return;
    }
    let mut tile = vec![[0f32; TILE_M]; TILE_N];
    for n0 in (0..np).step_by(TILE_N) {
        let tn = TILE_N.min(np - n0);
        for m0 in (0..m_len).step_by(TILE_M) {
            let tm = TILE_M.min(m_len - m0);
            for (j, t) in tile.iter_mut().enumerate().take(tn) {
                let t = &mut t[..tm];
                y[(n0 + j) * mp + m0..(n0 + j) * mp + m0 + tm].convert_to_f32_slice(t);
                if let Some((sx, sw)) = rescale {
                    let w = sw[n0 + j];
                    for (v, &x) in t.iter_mut().zip(&sx[m0..m0 + tm]) {
                        *v = *v * x * w;
                    }
                }
            }
            let tile = &tile[..tn];
            for mi in 0..tm {
                let o = &mut out[(m0 + mi) * out_stride + n0..(m0 + mi) * out_stride + n0 + tn];
                if accumulate {
                    for (o, t) in o.iter_mut().zip(tile) {
                        *o += t[mi];
                    }
                } else {
                    // `0 + v`, as accumulating into zeros would (turns -0 into +0).
                    for (o, t) in o.iter_mut().zip(tile) {
                        *o = 0.0 + t[mi];
                    }
                }
            }
        }
    }
}

/// A nonzero weight key made unique to one prepared form: callers pass where the weight lives (an
/// address), which a later weight may reuse with other bytes, and executors that keep device copies
/// by key (the CoreML executor's resident surfaces) must never bind one weight's copy to another.
fn unique_key(key: u64) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    if key == 0 {
        return 0;
    }
    let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (key ^ generation.wrapping_mul(0xD6E8_FEB8_6659_FD93)).max(1)
}

#[allow(clippy::too_many_arguments)]
fn run_part(
    exec: &dyn Executor,
    w: &PreparedWeight,
    form: &WeightForm,
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
    let key = WeightPart {
        key: w.key,
        k0: if w.key == 0 { 0 } else { k0 },
        n0: if w.key == 0 { 0 } else { n0 },
    };
    let whole_k = kp == k;
    match form {
        WeightForm::Rowwise(r) => {
            // x [K, Mp] int8, zero padding past m_len.
            transpose_i8_into(&s.xq[m0 * k + k0..], k, m_len, kp, mp, &mut s.xt_i8);
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
            if d.variant == Variant::I8I8O {
                // One K part (see matmul_form): the outlier columns of this part's rows, the
                // outlier activations in the token's unit u (times the program's scale, so
                // |xo| <= 127·s like the int8 operands), and t = s_int / u per token.
                let c = d.group;
                let sc = d.i8_scale().to_f32();
                s.wo_i8.clear();
                for ni in 0..np {
                    let row = &r.q[(n0 + ni) * k..(n0 + ni + 1) * k];
                    s.wo_i8.extend(s.oidx.iter().map(|&o| row[o]));
                }
                s.xo_f16.clear();
                s.xo_f16.resize(c * mp, f16::ZERO);
                s.t_f16.clear();
                s.t_f16.resize(mp, f16::ZERO);
                for mi in 0..m_len {
                    let u = s.xs[m0 + mi];
                    if u > 0.0 {
                        let f = sc / u;
                        let xr = &act.x[(m0 + mi) * act.x_stride..];
                        for (j, &o) in s.oidx.iter().enumerate() {
                            s.xo_f16[j * mp + mi] = f16::from_f32(xr[o] * f);
                        }
                        s.t_f16[mi] = f16::from_f32(s.xa[m0 + mi] / u);
                    }
                }
                return exec.run(
                    d,
                    ProgramInputs::I8I8O {
                        w: wpart,
                        x: &s.xt_i8,
                        wo: &s.wo_i8,
                        xo: &s.xo_f16,
                        t: &s.t_f16,
                    },
                    key,
                    &mut s.y,
                );
            }
            exec.run(
                d,
                ProgramInputs::I8I8 {
                    w: wpart,
                    x: &s.xt_i8,
                },
                key,
                &mut s.y,
            )
        }
        WeightForm::Block {
            q,
            scales,
            offsets,
            group,
        } => {
            fill_x_f16(act, &mut s.x_f16, &mut s.xt_f16, m0, m_len, k0, kp, mp);
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
            let inputs = ProgramInputs::W8F16 {
                w: wpart,
                scales: spart,
                offsets: opart,
                x: &s.xt_f16,
            };
            exec.run(d, inputs, key, &mut s.y)
        }
        WeightForm::Half(h) => {
            fill_x_f16(act, &mut s.x_f16, &mut s.xt_f16, m0, m_len, k0, kp, mp);
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
            exec.run(
                d,
                ProgramInputs::F16 {
                    w: wpart,
                    x: &s.xt_f16,
                },
                key,
                &mut s.y,
            )
        }
        WeightForm::Exact(_) => Err(ExecError::Unsupported(
            d.key(),
            "exact weights take no program".into(),
        )),
    }
}

/// x [K, Mp] fp16 from f32 rows, zero padding past `m_len`.
#[allow(clippy::too_many_arguments)]
fn fill_x_f16(
    act: &Activations<'_>,
    rows: &mut Vec<f16>,
    xt: &mut Vec<f16>,
    m0: usize,
    m_len: usize,
    k0: usize,
    kp: usize,
    mp: usize,
) {
    use half::slice::HalfFloatSliceExt;
    // Rows converted contiguously first (vectorised), then transposed in tiles.
    rows.resize(m_len * kp, f16::ZERO);
    for mi in 0..m_len {
        let base = (m0 + mi) * act.x_stride + k0;
        rows[mi * kp..(mi + 1) * kp].convert_from_f32_slice(&act.x[base..base + kp]);
    }
    transpose_into(rows, kp, m_len, kp, mp, xt, f16::ZERO);
}

/// `dst [kp, mp]` = the first `kp` values of `m_len` rows of `src` (row stride `stride`) transposed,
/// columns past `m_len` set to `zero`. In tiles so reads and writes stay in cache.
fn transpose_into<T: Copy>(
    src: &[T],
    stride: usize,
    m_len: usize,
    kp: usize,
    mp: usize,
    dst: &mut Vec<T>,
    zero: T,
) {
    const TK: usize = 64;
    const TMI: usize = 16;
    prepare_padded(dst, kp, m_len, mp, zero);
    for mb in (0..m_len).step_by(TMI) {
        let tm = TMI.min(m_len - mb);
        for kb in (0..kp).step_by(TK) {
            let tk = TK.min(kp - kb);
            for kk in kb..kb + tk {
                let d = &mut dst[kk * mp + mb..kk * mp + mb + tm];
                for (mi, v) in d.iter_mut().enumerate() {
                    *v = src[(mb + mi) * stride + kk];
                }
            }
        }
    }
}

/// Sizes `dst` to `[kp, mp]` and zeroes the padding columns `m_len..mp` (the rest is overwritten).
fn prepare_padded<T: Copy>(dst: &mut Vec<T>, kp: usize, m_len: usize, mp: usize, zero: T) {
    dst.resize(kp * mp, zero);
    if m_len < mp {
        for row in dst.chunks_exact_mut(mp) {
            row[m_len..].fill(zero);
        }
    }
}

/// [`transpose_into`] for int8, 8 × 8 bytes at a time: eight rows as u64 words, transposed by three
/// rounds of block swaps (4, 2, then 1 byte wide), stored as eight u64 words.
fn transpose_i8_into(
    src: &[i8],
    stride: usize,
    m_len: usize,
    kp: usize,
    mp: usize,
    dst: &mut Vec<i8>,
) {
    prepare_padded(dst, kp, m_len, mp, 0);
    let (m8, k8) = (m_len / 8 * 8, kp / 8 * 8);
    let word = |s: &[i8]| u64::from_le_bytes(std::array::from_fn(|i| s[i] as u8));
    for mb in (0..m8).step_by(8) {
        for kb in (0..k8).step_by(8) {
            let mut w: [u64; 8] =
                std::array::from_fn(|r| word(&src[(mb + r) * stride + kb..][..8]));
            for (s, mask) in [
                (4, 0x0000_0000_FFFF_FFFFu64),
                (2, 0x0000_FFFF_0000_FFFF),
                (1, 0x00FF_00FF_00FF_00FF),
            ] {
                for r in (0..8).filter(|r| r & s == 0) {
                    let t = ((w[r] >> (8 * s)) ^ w[r + s]) & mask;
                    w[r + s] ^= t;
                    w[r] ^= t << (8 * s);
                }
            }
            for (c, v) in w.iter().enumerate() {
                let d = &mut dst[(kb + c) * mp + mb..][..8];
                for (d, b) in d.iter_mut().zip(v.to_le_bytes()) {
                    *d = b as i8;
                }
            }
        }
    }
    // Edges: the last m_len % 8 tokens, and the last kp % 8 values of every token.
    for mi in 0..m_len {
        let from = if mi < m8 { k8 } else { 0 };
        for kk in from..kp {
            dst[kk * mp + mi] = src[mi * stride + kk];
        }
    }
}

fn exact(w: &PreparedWeight, act: &Activations<'_>, out: &mut [f32], out_stride: usize) {
    let WeightForm::Exact(wf) = &w.form else {
        return;
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ReferenceExecutor;

    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn unit(&mut self) -> f32 {
            self.next() as f32 / u32::MAX as f32 - 0.5
        }
    }

    /// `n` rows of `k` Q8_0 values (fp16 scale + 32 int8 per block).
    fn q8_0_bytes(n: usize, k: usize, rng: &mut Lcg) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..n * k / 32 {
            let d = f16::from_f32(0.001 + (rng.next() % 1000) as f32 * 1e-5);
            b.extend_from_slice(&d.to_le_bytes());
            b.extend((0..32).map(|_| rng.next() as u8));
        }
        b
    }

    fn same_form(a: &WeightForm, b: &WeightForm) -> bool {
        match (a, b) {
            (WeightForm::Rowwise(x), WeightForm::Rowwise(y)) => {
                x.n == y.n && x.q == y.q && x.scales == y.scales
            }
            (
                WeightForm::Block {
                    q, scales, offsets, ..
                },
                WeightForm::Block {
                    q: q2,
                    scales: s2,
                    offsets: o2,
                    ..
                },
            ) => q == q2 && scales == s2 && offsets == o2,
            (WeightForm::Half(x), WeightForm::Half(y)) => x == y,
            (WeightForm::Exact(x), WeightForm::Exact(y)) => x == y,
            _ => false,
        }
    }

    #[test]
    fn chunked_prepare_equals_whole_and_slices_equal_whole_matmul() {
        let (n, k, m) = (200, 256, 9);
        let mut rng = Lcg(7);
        let bytes = q8_0_bytes(n, k, &mut rng);
        let row = WeightType::Q8_0.row_bytes(k).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
        let exec = ReferenceExecutor::new();
        for mode in [
            Mode::Program(Variant::I8I8),
            Mode::Program(Variant::W8F16),
            Mode::Program(Variant::F16),
            Mode::I8I8Rotated,
            Mode::I8I8Outlier,
            Mode::ExactF32,
        ] {
            let whole = PreparedWeight::prepare(mode, WeightType::Q8_0, &bytes, n, k, 0).unwrap();
            for chunk in [1, 64, 199, 200, 500] {
                let mut seen = Vec::new();
                let w = PreparedWeight::prepare_chunked(
                    mode,
                    WeightType::Q8_0,
                    n,
                    k,
                    0,
                    chunk,
                    &mut |r0, rows| std::borrow::Cow::Borrowed(&bytes[r0 * row..(r0 + rows) * row]),
                    &mut |r0, rows| seen.push((r0, rows)),
                )
                .unwrap();
                assert_eq!((w.n, w.k), (n, k));
                assert!(
                    same_form(&w.form, &whole.form),
                    "{} chunk {chunk}",
                    mode.name()
                );
                assert_eq!(seen.iter().map(|s| s.1).sum::<usize>(), n);
            }
            // Row slices of the weight, each run for its columns of the output: the whole product.
            let mut s = Scratch::default();
            let act = Activations {
                x: &x,
                m,
                x_stride: k,
            };
            let mut want = vec![0f32; m * n];
            matmul(&exec, &whole, &act, &mut want, n, &mut s).unwrap();
            let mut got = vec![0f32; m * n];
            for r0 in (0..n).step_by(64) {
                let rows = 64.min(n - r0);
                let part = PreparedWeight::prepare(
                    mode,
                    WeightType::Q8_0,
                    &bytes[r0 * row..(r0 + rows) * row],
                    rows,
                    k,
                    0,
                )
                .unwrap();
                matmul(&exec, &part, &act, &mut got[r0..], n, &mut s).unwrap();
            }
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}",
                mode.name()
            );
        }
    }

    /// The straightforward host side (zero-fill, one transpose per element, accumulate): what
    /// `matmul` computed before its tiles and stores.
    fn oracle(
        exec: &dyn Executor,
        w: &PreparedWeight,
        x: &[f32],
        m: usize,
        stride: usize,
    ) -> Vec<f32> {
        let (k, n) = (w.k, w.n);
        let variant = w.mode.program().unwrap();
        let (group, offsets) = match &w.form {
            WeightForm::Block { group, offsets, .. } => (*group, offsets.is_some()),
            _ => (0, false),
        };
        let align = w.wtype.block_len().max(group).max(1);
        let plan = SplitPlan::new(variant, m, k, n, group, offsets, align).unwrap();
        let (mut xq, mut xs) = (vec![0i8; m * k], vec![0f32; m]);
        let mut xr = Vec::new();
        let (xi, si) = match &w.rotation {
            Some(rot) => {
                for r in 0..m {
                    let mut row = x[r * stride..r * stride + k].to_vec();
                    rot.apply(&mut row);
                    xr.extend(row);
                }
                (&xr[..], k)
            }
            None => (x, stride),
        };
        bridge::quantize_rows_i8(xi, m, k, si, &mut xq, &mut xs);
        let mut out = vec![0f32; m * n];
        for p in &plan.parts {
            let d = p.desc;
            let (mp, kp, np) = (d.m, d.k, d.n);
            let mut y = vec![f16::ZERO; np * mp];
            let rows = |i: usize| (p.n0 + i) * k + p.k0..(p.n0 + i) * k + p.k0 + kp;
            match &w.form {
                WeightForm::Rowwise(r) => {
                    let mut xt = vec![0i8; kp * mp];
                    for mi in 0..p.m_len {
                        for kk in 0..kp {
                            xt[kk * mp + mi] = xq[(p.m0 + mi) * k + p.k0 + kk];
                        }
                    }
                    let wq: Vec<i8> = (0..np).flat_map(|i| r.q[rows(i)].to_vec()).collect();
                    exec.run(
                        &d,
                        ProgramInputs::I8I8 { w: &wq, x: &xt },
                        WeightPart::NONE,
                        &mut y,
                    )
                    .unwrap();
                }
                WeightForm::Half(h) => {
                    let mut xt = vec![f16::ZERO; kp * mp];
                    for mi in 0..p.m_len {
                        for kk in 0..kp {
                            xt[kk * mp + mi] = f16::from_f32(x[(p.m0 + mi) * stride + p.k0 + kk]);
                        }
                    }
                    let wh: Vec<f16> = (0..np).flat_map(|i| h[rows(i)].to_vec()).collect();
                    exec.run(
                        &d,
                        ProgramInputs::F16 { w: &wh, x: &xt },
                        WeightPart::NONE,
                        &mut y,
                    )
                    .unwrap();
                }
                _ => unreachable!(),
            }
            for mi in 0..p.m_len {
                for ni in 0..np {
                    let v = y[ni * mp + mi].to_f32();
                    let o = &mut out[(p.m0 + mi) * n + p.n0 + ni];
                    *o += match &w.form {
                        WeightForm::Rowwise(r) => {
                            let s = d.i8_scale().to_f32();
                            v * (xs[p.m0 + mi] * (1.0 / (s * s))) * r.scales[p.n0 + ni]
                        }
                        _ => v,
                    };
                }
            }
        }
        out
    }

    /// With outlier channels, the rotated int8 path is much closer to exact arithmetic than plain i8i8.
    #[test]
    fn rotation_tames_outlier_channels() {
        let exec = ReferenceExecutor::new();
        let mut rng = Lcg(11);
        let (m, k, n) = (16, 640, 64);
        let bytes = q8_0_bytes(n, k, &mut rng);
        let mut x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
        for r in 0..m {
            for c in [3, 100, 401, 577] {
                x[r * k + c] *= 60.0;
            }
        }
        let exact_w =
            PreparedWeight::prepare(Mode::ExactF32, WeightType::Q8_0, &bytes, n, k, 0).unwrap();
        let act = Activations {
            x: &x,
            m,
            x_stride: k,
        };
        let mut want = vec![0f32; m * n];
        let mut s = Scratch::default();
        matmul(&exec, &exact_w, &act, &mut want, n, &mut s).unwrap();
        let mut err = |mode: Mode| {
            let w = PreparedWeight::prepare(mode, WeightType::Q8_0, &bytes, n, k, 0).unwrap();
            let mut out = vec![0f32; m * n];
            matmul(&exec, &w, &act, &mut out, n, &mut s).unwrap();
            bridge::nmse(&want, &out)
        };
        let (plain, rotated) = (err(Mode::Program(Variant::I8I8)), err(Mode::I8I8Rotated));
        assert!(rotated * 4.0 < plain, "i8i8 {plain:e}, i8i8r {rotated:e}");
        // The outlier split takes the 4 channels out of the int8 part altogether.
        let split = err(Mode::I8I8Outlier);
        assert!(split * 4.0 < plain, "i8i8 {plain:e}, i8i8o {split:e}");
        // With M > 64 (two bucket chunks) and padding the split still matches.
        let m2 = 70;
        let x2: Vec<f32> = (0..m2 * k).map(|i| x[i % (m * k)]).collect();
        let act2 = Activations {
            x: &x2,
            m: m2,
            x_stride: k,
        };
        let mut want2 = vec![0f32; m2 * n];
        matmul(&exec, &exact_w, &act2, &mut want2, n, &mut s).unwrap();
        let w =
            PreparedWeight::prepare(Mode::I8I8Outlier, WeightType::Q8_0, &bytes, n, k, 0).unwrap();
        let mut out2 = vec![0f32; m2 * n];
        matmul(&exec, &w, &act2, &mut out2, n, &mut s).unwrap();
        let e2 = bridge::nmse(&want2, &out2);
        assert!(e2 * 4.0 < plain, "i8i8o m=70 {e2:e}");
    }

    /// Rows longer than one program part take the rotated route; rows too short to split run i8i8.
    #[test]
    fn outlier_split_edges() {
        let exec = ReferenceExecutor::new();
        let mut rng = Lcg(4);
        let bytes = q8_0_bytes(2, 16640, &mut rng);
        let w = PreparedWeight::prepare(Mode::I8I8Outlier, WeightType::Q8_0, &bytes, 2, 16640, 0)
            .unwrap();
        assert_eq!(w.mode, Mode::I8I8Rotated);
        let bytes = q8_0_bytes(3, 32, &mut rng);
        let w =
            PreparedWeight::prepare(Mode::I8I8Outlier, WeightType::Q8_0, &bytes, 3, 32, 0).unwrap();
        let x: Vec<f32> = (0..5 * 32).map(|_| rng.unit()).collect();
        let act = Activations {
            x: &x,
            m: 5,
            x_stride: 32,
        };
        let mut out = vec![0f32; 15];
        let mut s = Scratch::default();
        matmul(&exec, &w, &act, &mut out, 3, &mut s).unwrap();
        let exact_w =
            PreparedWeight::prepare(Mode::ExactF32, WeightType::Q8_0, &bytes, 3, 32, 0).unwrap();
        let mut want = vec![0f32; 15];
        matmul(&exec, &exact_w, &act, &mut want, 3, &mut s).unwrap();
        assert!(bridge::nmse(&want, &out) < 1e-3);
    }

    #[test]
    fn kinds_and_routing() {
        assert_eq!(tensor_kind("blk.3.ffn_down.weight"), "ffn_down");
        assert_eq!(tensor_kind("output.weight"), "output");
        assert_eq!(tensor_kind("blk.12.attn_v"), "attn_v");
        let r = |t, f, req, c| Mode::for_weight(t, f, req, c);
        assert_eq!(
            r(WeightType::Q8_0, KindRoute::Outlier, None, true),
            Mode::I8I8Outlier
        );
        assert_eq!(
            r(WeightType::Q8_0, KindRoute::Rotated, None, true),
            Mode::I8I8Rotated
        );
        assert_eq!(
            r(WeightType::Q8_0, KindRoute::W8F16, None, true),
            Mode::Program(Variant::W8F16)
        );
        assert_eq!(
            r(WeightType::Q4_K, KindRoute::Outlier, None, false),
            Mode::Program(Variant::W8F16)
        );
        assert_eq!(
            r(WeightType::F16, KindRoute::Outlier, None, true),
            Mode::Program(Variant::F16)
        );
        let i8 = Mode::Program(Variant::I8I8);
        assert_eq!(r(WeightType::Q8_0, KindRoute::W8F16, Some(i8), true), i8);
        assert_eq!(KindRoute::parse("i8i8o"), Some(KindRoute::Outlier));
        assert_eq!(KindRoute::parse("w8f16"), Some(KindRoute::W8F16));
        assert_eq!(KindRoute::parse("f16"), None);
    }

    #[test]
    fn int8_transpose_matches_the_generic_one() {
        let mut rng = Lcg(5);
        for &(m_len, kp, mp, stride) in &[
            (1, 8, 64, 8),
            (13, 37, 64, 40),
            (64, 640, 64, 640),
            (17, 9, 128, 9),
        ] {
            let src: Vec<i8> = (0..m_len * stride)
                .map(|_| rng.next() as u8 as i8)
                .collect();
            let (mut a, mut b) = (vec![5i8; 3], vec![7i8; kp * mp]);
            transpose_into(&src, stride, m_len, kp, mp, &mut a, 0);
            transpose_i8_into(&src, stride, m_len, kp, mp, &mut b);
            assert_eq!(a, b, "{m_len} {kp} {mp}");
            assert!(a.iter().enumerate().all(|(i, &v)| i % mp < m_len || v == 0));
        }
    }

    #[test]
    fn matmul_matches_the_straightforward_host_side() {
        let exec = ReferenceExecutor::new();
        exec.set_threads(2);
        let mut rng = Lcg(3);
        let mut scratch = Scratch::default();
        // (m, k, n): padding, several M chunks, a K split (k > 16384), odd n.
        for &(m, k, n) in &[
            (1, 64, 40),
            (7, 96, 33),
            (64, 128, 16),
            (130, 256, 70),
            (3, 16640, 6),
            (4100, 32, 3),
        ] {
            for mode in [
                Mode::Program(Variant::I8I8),
                Mode::I8I8Rotated,
                Mode::Program(Variant::F16),
            ] {
                let bytes = q8_0_bytes(n, k, &mut rng);
                let w = PreparedWeight::prepare(mode, WeightType::Q8_0, &bytes, n, k, 0).unwrap();
                let stride = k + 3;
                let x: Vec<f32> = (0..m * stride).map(|_| rng.unit() * 4.0).collect();
                let want = oracle(&exec, &w, &x, m, stride);
                let act = Activations {
                    x: &x,
                    m,
                    x_stride: stride,
                };
                let out_stride = n + 1;
                let mut out = vec![f32::NAN; m * out_stride];
                matmul(&exec, &w, &act, &mut out, out_stride, &mut scratch).unwrap();
                for r in 0..m {
                    for c in 0..n {
                        assert_eq!(
                            out[r * out_stride + c].to_bits(),
                            want[r * n + c].to_bits(),
                            "{} m={m} k={k} n={n} at {r},{c}",
                            mode.name()
                        );
                    }
                }
            }
        }
    }
}

/// Timings of the host side around the executor on gemma-3-270m's shapes, phase by phase:
/// `cargo test --release -p ggml-coreml-executor --lib -- --ignored --nocapture driver_timings`
/// (`THREADS=n` for the executor's threads).
#[cfg(test)]
mod timings {
    use super::*;
    use crate::reference::ReferenceExecutor;
    use std::time::Instant;

    fn time(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    }

    #[test]
    #[ignore]
    fn driver_timings() {
        let exec = ReferenceExecutor::new();
        let threads = std::env::var("THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2);
        exec.set_threads(threads);
        let shapes = [
            (640, 1024),
            (640, 256),
            (1024, 640),
            (640, 2048),
            (2048, 640),
        ];
        for wtype in [WeightType::Q8_0, WeightType::Q4_K, WeightType::Q6_K] {
            let (n, k) = (8192, 1024);
            let bytes: Vec<u8> = (0..wtype.row_bytes(k).unwrap() * n)
                .map(|i| (i * 37 % 251) as u8 & if i % 17 == 0 { 0x3F } else { 0xFF })
                .collect();
            let mode = Mode::Program(Variant::I8I8);
            let ms = time(3, || {
                PreparedWeight::prepare(mode, wtype, &bytes, n, k, 0).unwrap();
            });
            eprintln!(
                "repack {} [{n}x{k}] to row-wise int8: {ms:.2} ms ({:.2} G elements/s)",
                wtype.name(),
                (n * k) as f64 / ms / 1e6
            );
        }
        for m in [512, 1] {
            let reps = if m == 1 { 200 } else { 10 };
            let mut sum = [0.0; 5];
            for &(k, n) in &shapes {
                let mut b = Vec::new();
                for i in 0..n * k / 32 {
                    b.extend_from_slice(&f16::from_f32(0.01).to_le_bytes());
                    b.extend((0..32).map(|j| ((i * 7 + j * 13) % 251) as u8));
                }
                let mode = Mode::Program(Variant::I8I8);
                let w = PreparedWeight::prepare(mode, WeightType::Q8_0, &b, n, k, 0).unwrap();
                let WeightForm::Rowwise(r) = &w.form else {
                    unreachable!()
                };
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 7.0).collect();
                let act = Activations {
                    x: &x,
                    m,
                    x_stride: k,
                };
                let mut out = vec![0f32; m * n];
                let mut s = Scratch::default();
                let d = SplitPlan::new(Variant::I8I8, m, k, n, 0, false, 32)
                    .unwrap()
                    .parts[0]
                    .desc;
                let mp = d.m;
                let (mut xq, mut xs) = (vec![0i8; m * k], vec![0f32; m]);
                let mut xt = Vec::new();
                let mut y = vec![f16::ZERO; n * mp];
                let t_all = time(reps, || {
                    matmul(&exec, &w, &act, &mut out, n, &mut s).unwrap();
                });
                let t_q = time(reps, || {
                    bridge::quantize_rows_i8(&x, m, k, k, &mut xq, &mut xs);
                });
                let t_t = time(reps, || transpose_i8_into(&xq, k, m, k, mp, &mut xt));
                let t_x = time(reps, || {
                    let inputs = ProgramInputs::I8I8 { w: &r.q, x: &xt };
                    exec.run(&d, inputs, WeightPart::NONE, &mut y).unwrap();
                });
                let sx: Vec<f32> = xs.iter().map(|v| v * 3.0).collect();
                let t_s = time(reps, || {
                    store_y(&y, mp, n, m, &mut out, n, false, Some((&sx, &r.scales)))
                });
                for (a, v) in sum.iter_mut().zip([t_all, t_q, t_t, t_x, t_s]) {
                    *a += v;
                }
                eprintln!(
                    "m={m} k={k} n={n}: {t_all:.3} ms = quantize {t_q:.3} + transpose {t_t:.3} + run {t_x:.3} + store {t_s:.3}"
                );
            }
            eprintln!(
                "m={m} all: {:.3} ms = quantize {:.3} + transpose {:.3} + run {:.3} + store {:.3}",
                sum[0], sum[1], sum[2], sum[3], sum[4]
            );
        }
        // The default variant per type, whole matmuls (decode includes an output-layer part).
        for m in [512, 1] {
            let mode = Mode::for_type(WeightType::Q8_0, None);
            let mut total = 0.0;
            let more: &[(usize, usize)] = if m == 1 { &[(640, 16384)] } else { &[] };
            for &(k, n) in shapes.iter().chain(more) {
                let mut b = Vec::new();
                for i in 0..n * k / 32 {
                    b.extend_from_slice(&f16::from_f32(0.01).to_le_bytes());
                    b.extend((0..32).map(|j| ((i * 7 + j * 13) % 251) as u8));
                }
                let w = PreparedWeight::prepare(mode, WeightType::Q8_0, &b, n, k, 0).unwrap();
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 7.0).collect();
                let act = Activations {
                    x: &x,
                    m,
                    x_stride: k,
                };
                let mut out = vec![0f32; m * n];
                let mut s = Scratch::default();
                let reps = if m == 1 { 50 } else { 5 };
                let ms = time(reps, || {
                    matmul(&exec, &w, &act, &mut out, n, &mut s).unwrap();
                });
                total += ms;
                eprintln!("{} m={m} k={k} n={n}: {ms:.3} ms", mode.name());
            }
            eprintln!("{} m={m} all: {total:.3} ms", mode.name());
        }
    }
}

#[cfg(test)]
mod outlier_f16_tests {
    use super::*;
    use crate::reference::ReferenceExecutor;

    #[test]
    fn f16_weights_with_odd_k() {
        let exec = ReferenceExecutor::new();
        for k in [1056usize, 1057] {
            let (m, n) = (1, 128);
            let w: Vec<u8> = (0..n * k)
                .flat_map(|i| f16::from_f32(((i % 13) as f32 - 6.0) / 10.0).to_le_bytes())
                .collect();
            let pw =
                PreparedWeight::prepare(Mode::I8I8Outlier, WeightType::F16, &w, n, k, 0).unwrap();
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
            let act = Activations {
                x: &x,
                m,
                x_stride: k,
            };
            let mut out = vec![0f32; m * n];
            let mut s = Scratch::default();
            matmul(&exec, &pw, &act, &mut out, n, &mut s).unwrap();
        }
    }
}
