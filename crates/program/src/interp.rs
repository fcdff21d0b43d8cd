//! Reference interpreter: runs the very program the ANE would get, with ANE-like numerics.
//!
//! Built from the serialized Model protobuf (and `weight.bin` when consts live there). Construction
//! walks the main function's block once, resolves every const parameter, infers every type and shape
//! and checks them against the types the program declares; `run` then only moves data.
//!
//! Numerics: every op result is rounded to fp16. `matmul` accumulates in f32 and rounds its output to
//! fp16 (the ANE's accumulator width is a device question). When both matmul operands are
//! `dequantize(int8, scalar scale)` results, the product runs as an exact integer GEMM (i32 sums)
//! scaled by `scale_x · scale_y` and rounded once to fp16 (correctly rounded on every platform): what
//! an int8 × int8 engine computes, and fast enough to run every offloaded matmul of real models in
//! tests. The unfused route would round each dequantized operand to fp16 first (at most 2⁻¹¹
//! relative per element).
//!
//! Fast paths that compute the same bits as the ops they replace: the w8f16 weight chain
//! (`dequantize` · scales + offsets, reshapes) is fused into its matmul ([`BlockMatmulStep`]); a
//! final matmul writes into the caller's buffer; activations are read in the program's `[K, M]`
//! layout without transposing them back; all-zero padding columns are computed once (see `gemm`).

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use prost::Message;

use crate::blob::{BlobDType, BlobReader};
use crate::error::ProgramError;
use crate::gemm;
use crate::proto::specification::mil_spec::{
    self as mil, argument::binding::Binding, dimension, tensor_value, value, value_type,
};
use crate::proto::specification::{Model, model};
use crate::spec::DType;

/// One input of a run, borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    Int8(&'a [i8]),
    Float16(&'a [f16]),
}

impl TensorRef<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::Int8(_) => DType::Int8,
            TensorRef::Float16(_) => DType::Float16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorRef::Int8(v) => v.len(),
            TensorRef::Float16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Ty {
    dtype: DType,
    shape: Vec<usize>,
}

impl Ty {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

impl std::fmt::Display for Ty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

/// Data of a value: borrowed from the caller or shared (consts, op results).
#[derive(Clone, Debug)]
enum Buf<'a, T> {
    Borrowed(&'a [T]),
    Shared(Arc<Vec<T>>),
}

impl<T> std::ops::Deref for Buf<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Borrowed(s) => s,
            Buf::Shared(v) => v,
        }
    }
}

impl<T> From<Vec<T>> for Buf<'_, T> {
    fn from(v: Vec<T>) -> Self {
        Buf::Shared(Arc::new(v))
    }
}

/// A const, resolved at construction.
#[derive(Clone, Debug)]
enum Const {
    Int8(Arc<Vec<i8>>),
    Float16(Arc<Vec<f16>>),
    Int32(Arc<Vec<i32>>),
    Bool(Arc<Vec<bool>>),
    Str(String),
}

/// A value during a run.
#[derive(Clone, Debug)]
enum Val<'a> {
    Int8(Buf<'a, i8>),
    Float16(Buf<'a, f16>),
    Int32(Buf<'a, i32>),
    /// `dequantize(q, scale)` kept lazy so a matmul of two of them can run as an integer GEMM.
    Deq {
        q: Buf<'a, i8>,
        scale: f16,
    },
    /// Consts only used as parameters (bools, strings).
    Opaque,
}

impl<'a> Val<'a> {
    fn from_const(c: &Const) -> Val<'a> {
        match c {
            Const::Int8(v) => Val::Int8(Buf::Shared(v.clone())),
            Const::Float16(v) => Val::Float16(Buf::Shared(v.clone())),
            Const::Int32(v) => Val::Int32(Buf::Shared(v.clone())),
            Const::Bool(_) | Const::Str(_) => Val::Opaque,
        }
    }

    /// The fp16 data of this value (dequantizing lazily held int8 with one fp16 rounding each).
    fn f16(&self) -> Result<Buf<'a, f16>, ProgramError> {
        match self {
            Val::Float16(b) => Ok(b.clone()),
            Val::Deq { q, scale } => Ok(dequantize(q, scale.to_f32(), 0.0).into()),
            _ => Err(ProgramError::Mismatch("expected an fp16 value".into())),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Add,
    Mul,
}

#[derive(Clone, Debug)]
enum Step {
    Const {
        out: usize,
        value: Const,
    },
    Dequantize {
        out: usize,
        input: usize,
        scale: f16,
        zero_point: i8,
    },
    Cast {
        out: usize,
        input: usize,
    },
    Reshape {
        out: usize,
        input: usize,
    },
    Binary {
        out: usize,
        op: BinOp,
        x: usize,
        y: usize,
        xs: Vec<usize>,
        ys: Vec<usize>,
    },
    Matmul(Box<MatmulStep>),
    /// A matmul whose left operand is a w8f16 block dequantisation, fused (see [`fuse_block_matmuls`]).
    BlockMatmul(Box<BlockMatmulStep>),
    Transpose {
        out: usize,
        input: usize,
        perm: Vec<usize>,
    },
}

#[derive(Clone, Debug)]
struct MatmulStep {
    out: usize,
    x: usize,
    y: usize,
    tx: bool,
    ty: bool,
    n: usize,
    k: usize,
    m: usize,
    /// Element offsets of each output batch's x and y matrices.
    batches: Vec<(usize, usize)>,
}

/// `matmul(reshape(reshape(dequantize(w, 1)) · reshape(scales) [+ reshape(offsets)]), y)`: the
/// w8f16 program's weight chain and product as one step. The weight is dequantised row block by row
/// block inside the GEMM with the very roundings of the `mul` and `add` ops it replaces, so the output
/// is bit for bit the unfused one, without three `[N, K]` fp16 intermediates per run.
#[derive(Clone, Debug)]
struct BlockMatmulStep {
    out: usize,
    /// int8 `[N, K]`, scales (and offsets) fp16 `[N, K / group]`.
    w: usize,
    scales: usize,
    offsets: Option<usize>,
    group: usize,
    /// The matmul's right operand and whether it is transposed.
    y: usize,
    ty: bool,
    n: usize,
    k: usize,
    m: usize,
}

/// A program ready to run.
#[derive(Debug)]
pub struct Interpreter {
    inputs: Vec<(String, usize)>,
    types: Vec<Ty>,
    steps: Vec<Step>,
    /// Slots whose last use is step `i`, dropped after it.
    drops: Vec<Vec<usize>>,
    output: usize,
    output_name: String,
}

fn malformed<T>(msg: String) -> Result<T, ProgramError> {
    Err(ProgramError::Malformed(msg))
}

fn tensor_ty(vt: Option<&mil::ValueType>, what: &str) -> Result<Ty, ProgramError> {
    let Some(value_type::Type::TensorType(t)) = vt.and_then(|v| v.r#type.as_ref()) else {
        return Err(ProgramError::Unsupported(format!(
            "{what}: not a tensor type"
        )));
    };
    let dtype = DType::from_mil(t.data_type).ok_or_else(|| {
        let name = mil::DataType::try_from(t.data_type).map_or("unknown", |d| d.as_str_name());
        ProgramError::Unsupported(format!("{what}: data type {name}"))
    })?;
    let mut shape = Vec::with_capacity(t.dimensions.len());
    for d in &t.dimensions {
        match &d.dimension {
            Some(dimension::Dimension::Constant(c)) => shape
                .push(usize::try_from(c.size).map_err(|_| {
                    ProgramError::Malformed(format!("{what}: dimension too large"))
                })?),
            _ => {
                return Err(ProgramError::Unsupported(format!(
                    "{what}: dynamic dimension"
                )));
            }
        }
    }
    if t.rank != shape.len() as i64 {
        return malformed(format!(
            "{what}: rank {} with {} dimensions",
            t.rank,
            shape.len()
        ));
    }
    if shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_none_or(|e| e > (1 << 34))
    {
        return Err(ProgramError::Unsupported(format!(
            "{what}: {shape:?} is too large"
        )));
    }
    Ok(Ty { dtype, shape })
}

fn decode_const(
    v: &mil::Value,
    weights: Option<&BlobReader<'_>>,
    what: &str,
) -> Result<(Ty, Const), ProgramError> {
    use tensor_value::Value as TV;
    let vt = v.r#type.as_ref();
    if let Some(value_type::Type::TensorType(t)) = vt.and_then(|v| v.r#type.as_ref())
        && t.data_type == mil::DataType::String as i32
    {
        let Some(value::Value::ImmediateValue(value::ImmediateValue {
            value:
                Some(value::immediate_value::Value::Tensor(mil::TensorValue {
                    value: Some(TV::Strings(s)),
                })),
        })) = &v.value
        else {
            return malformed(format!("{what}: string const without strings"));
        };
        let Some(first) = s.values.first() else {
            return malformed(format!("{what}: empty string const"));
        };
        return Ok((
            Ty {
                dtype: DType::Bool,
                shape: vec![],
            },
            Const::Str(first.clone()),
        ));
    }
    let ty = tensor_ty(vt, what)?;
    let n = ty.elements();
    let count = |len: usize| -> Result<(), ProgramError> {
        if len == n {
            Ok(())
        } else {
            malformed(format!("{what}: {len} values for {ty}"))
        }
    };
    let c = match &v.value {
        Some(value::Value::ImmediateValue(value::ImmediateValue {
            value: Some(value::immediate_value::Value::Tensor(t)),
        })) => match (ty.dtype, &t.value) {
            (DType::Int8, Some(TV::Bytes(b))) => {
                count(b.values.len())?;
                Const::Int8(Arc::new(b.values.iter().map(|&x| x as i8).collect()))
            }
            (DType::Int8, Some(TV::Ints(i))) => {
                count(i.values.len())?;
                let v: Result<Vec<i8>, _> = i.values.iter().map(|&x| i8::try_from(x)).collect();
                Const::Int8(Arc::new(v.map_err(|_| {
                    ProgramError::Malformed(format!("{what}: int8 out of range"))
                })?))
            }
            (DType::Float16, Some(TV::Bytes(b))) => {
                count(b.values.len() / 2)?;
                if b.values.len() % 2 != 0 {
                    return malformed(format!("{what}: odd fp16 byte count"));
                }
                Const::Float16(Arc::new(
                    b.values
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ))
            }
            (DType::Int32, Some(TV::Ints(i))) => {
                count(i.values.len())?;
                Const::Int32(Arc::new(i.values.clone()))
            }
            (DType::Bool, Some(TV::Bools(b))) => {
                count(b.values.len())?;
                Const::Bool(Arc::new(b.values.clone()))
            }
            (dt, _) => {
                return Err(ProgramError::Unsupported(format!(
                    "{what}: {dt} const in this encoding"
                )));
            }
        },
        Some(value::Value::BlobFileValue(f)) => {
            let Some(r) = weights else {
                return malformed(format!(
                    "{what}: refers to {} but the program has no weights",
                    f.file_name
                ));
            };
            let (bdt, bytes) = r.read(f.offset)?;
            match (ty.dtype, bdt) {
                (DType::Int8, BlobDType::Int8) => {
                    count(bytes.len())?;
                    Const::Int8(Arc::new(bytes.iter().map(|&x| x as i8).collect()))
                }
                (DType::Float16, BlobDType::Float16) => {
                    count(bytes.len() / 2)?;
                    Const::Float16(Arc::new(
                        bytes
                            .chunks_exact(2)
                            .map(|c| f16::from_le_bytes([c[0], c[1]]))
                            .collect(),
                    ))
                }
                (DType::Int32, BlobDType::Int32) => {
                    count(bytes.len() / 4)?;
                    Const::Int32(Arc::new(
                        bytes
                            .chunks_exact(4)
                            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    ))
                }
                (dt, b) => {
                    return malformed(format!("{what}: {dt} const stored as {} blob", b.name()));
                }
            }
        }
        _ => return malformed(format!("{what}: const without a value")),
    };
    Ok((ty, c))
}

/// Numpy-style broadcast of two shapes; returns the output shape and each operand's strides over it.
fn broadcast(a: &[usize], b: &[usize]) -> Option<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    let r = a.len().max(b.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(a), pad(b));
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        out.push(match (pa[i], pb[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    let strides = |s: &[usize]| -> Vec<usize> {
        let mut st = vec![0; r];
        let mut acc = 1;
        for i in (0..r).rev() {
            st[i] = if s[i] == 1 { 0 } else { acc };
            acc *= s[i];
        }
        st
    };
    Some((out.clone(), strides(&pa), strides(&pb)))
}

/// Builder state while walking the block.
struct Walk<'w> {
    names: HashMap<String, usize>,
    types: Vec<Ty>,
    consts: HashMap<usize, Const>,
    steps: Vec<Step>,
    weights: Option<BlobReader<'w>>,
}

enum Arg {
    Var(usize),
    Value(Box<mil::Value>),
}

impl Walk<'_> {
    fn new_slot(&mut self, name: &str, ty: Ty) -> Result<usize, ProgramError> {
        let slot = self.types.len();
        if self.names.insert(name.to_string(), slot).is_some() {
            return malformed(format!("variable {name} defined twice"));
        }
        self.types.push(ty);
        Ok(slot)
    }

    fn arg(&self, op: &mil::Operation, param: &str) -> Result<Option<Arg>, ProgramError> {
        let Some(a) = op.inputs.get(param) else {
            return Ok(None);
        };
        let [binding] = a.arguments.as_slice() else {
            return Err(ProgramError::Unsupported(format!(
                "{}: parameter {param} with {} arguments",
                op.r#type,
                a.arguments.len()
            )));
        };
        match &binding.binding {
            Some(Binding::Name(n)) => match self.names.get(n) {
                Some(&s) => Ok(Some(Arg::Var(s))),
                None => malformed(format!(
                    "{}: {param} refers to undefined variable {n}",
                    op.r#type
                )),
            },
            Some(Binding::Value(v)) => Ok(Some(Arg::Value(Box::new(v.clone())))),
            None => malformed(format!("{}: empty binding for {param}", op.r#type)),
        }
    }

    fn var(&self, op: &mil::Operation, param: &str) -> Result<usize, ProgramError> {
        match self.arg(op, param)? {
            Some(Arg::Var(s)) => Ok(s),
            Some(Arg::Value(_)) => Err(ProgramError::Unsupported(format!(
                "{}: inline value for {param}",
                op.r#type
            ))),
            None => malformed(format!("{}: missing parameter {param}", op.r#type)),
        }
    }

    /// A parameter that must be known when the program is built (MIL requires these to be const).
    fn const_arg(
        &self,
        op: &mil::Operation,
        param: &str,
    ) -> Result<Option<(Ty, Const)>, ProgramError> {
        match self.arg(op, param)? {
            None => Ok(None),
            Some(Arg::Var(s)) => match self.consts.get(&s) {
                Some(c) => Ok(Some((self.types[s].clone(), c.clone()))),
                None => Err(ProgramError::Unsupported(format!(
                    "{}: {param} must be a const",
                    op.r#type
                ))),
            },
            Some(Arg::Value(v)) => Ok(Some(decode_const(
                &v,
                self.weights.as_ref(),
                &format!("{}.{param}", op.r#type),
            )?)),
        }
    }

    fn scalar_f16(&self, op: &mil::Operation, param: &str) -> Result<Option<f16>, ProgramError> {
        match self.const_arg(op, param)? {
            None => Ok(None),
            Some((ty, Const::Float16(v))) if ty.elements() == 1 => Ok(Some(v[0])),
            Some((ty, _)) => Err(ProgramError::Unsupported(format!(
                "{}: {param} of type {ty}, want a scalar fp16",
                op.r#type
            ))),
        }
    }

    fn scalar_bool(&self, op: &mil::Operation, param: &str) -> Result<Option<bool>, ProgramError> {
        match self.const_arg(op, param)? {
            None => Ok(None),
            Some((ty, Const::Bool(v))) if ty.elements() == 1 => Ok(Some(v[0])),
            Some((ty, _)) => Err(ProgramError::Unsupported(format!(
                "{}: {param} of type {ty}, want a bool",
                op.r#type
            ))),
        }
    }

    fn ints(&self, op: &mil::Operation, param: &str) -> Result<Vec<i32>, ProgramError> {
        match self.const_arg(op, param)? {
            Some((ty, Const::Int32(v))) if ty.shape.len() == 1 => Ok(v.to_vec()),
            Some((ty, _)) => Err(ProgramError::Unsupported(format!(
                "{}: {param} of type {ty}, want int32[n]",
                op.r#type
            ))),
            None => malformed(format!("{}: missing parameter {param}", op.r#type)),
        }
    }

    fn expect(
        &self,
        op: &mil::Operation,
        slot: usize,
        dtypes: &[DType],
    ) -> Result<Ty, ProgramError> {
        let ty = self.types[slot].clone();
        if !dtypes.contains(&ty.dtype) {
            return Err(ProgramError::Unsupported(format!("{} on {ty}", op.r#type)));
        }
        Ok(ty)
    }

    /// Adds one op; returns the inferred output type and the step (None for nothing to run).
    fn op(&mut self, op: &mil::Operation) -> Result<(), ProgramError> {
        let [out_decl] = op.outputs.as_slice() else {
            return Err(ProgramError::Unsupported(format!(
                "{} with {} outputs",
                op.r#type,
                op.outputs.len()
            )));
        };
        let name = out_decl.name.as_str();
        let what = format!("{} {name}", op.r#type);
        let (ty, step): (Ty, Box<dyn FnOnce(usize) -> Step>) = match op.r#type.as_str() {
            "const" => {
                if !op.inputs.is_empty() {
                    return malformed(format!("{what}: const with inputs"));
                }
                let Some(v) = op.attributes.get("val") else {
                    return malformed(format!("{what}: const without val"));
                };
                let (ty, c) = decode_const(v, self.weights.as_ref(), &what)?;
                // String consts are parameters only (e.g. cast's dtype); they have no tensor type to check.
                if !matches!(c, Const::Str(_)) {
                    check_declared(out_decl, &ty, &what)?;
                }
                let slot = self.new_slot(name, ty)?;
                self.consts.insert(slot, c.clone());
                self.steps.push(Step::Const {
                    out: slot,
                    value: c,
                });
                return Ok(());
            }
            "dequantize" => {
                let input = self.var(op, "input")?;
                let ity = self.expect(op, input, &[DType::Int8])?;
                let scale = self.scalar_f16(op, "scale")?.ok_or_else(|| {
                    ProgramError::Unsupported(format!("{what}: scale must be a scalar fp16 const"))
                })?;
                let zero_point = match self.const_arg(op, "zero_point")? {
                    None => 0,
                    Some((t, Const::Int8(v))) if t.elements() == 1 => v[0],
                    Some((t, _)) => {
                        return Err(ProgramError::Unsupported(format!("{what}: zero_point {t}")));
                    }
                };
                (
                    Ty {
                        dtype: DType::Float16,
                        shape: ity.shape,
                    },
                    Box::new(move |out| Step::Dequantize {
                        out,
                        input,
                        scale,
                        zero_point,
                    }),
                )
            }
            "cast" => {
                let input = self.var(op, "x")?;
                let ity = self.expect(op, input, &[DType::Int8, DType::Float16, DType::Int32])?;
                match self.const_arg(op, "dtype")? {
                    Some((_, Const::Str(s))) if s == "fp16" => {}
                    Some((_, Const::Str(s))) => {
                        return Err(ProgramError::Unsupported(format!("{what}: cast to {s}")));
                    }
                    _ => return malformed(format!("{what}: dtype must be a string const")),
                }
                (
                    Ty {
                        dtype: DType::Float16,
                        shape: ity.shape,
                    },
                    Box::new(move |out| Step::Cast { out, input }),
                )
            }
            "reshape" => {
                let input = self.var(op, "x")?;
                let ity = self.types[input].clone();
                let want = self.ints(op, "shape")?;
                let total = ity.elements();
                let known: usize = want
                    .iter()
                    .filter(|&&d| d > 0)
                    .map(|&d| d as usize)
                    .product();
                let mut shape = Vec::with_capacity(want.len());
                let inferred = want.iter().filter(|&&d| d == -1).count();
                for &d in &want {
                    shape.push(match d {
                        d if d > 0 => d as usize,
                        -1 if inferred == 1 && known > 0 && total.is_multiple_of(known) => {
                            total / known
                        }
                        _ => {
                            return Err(ProgramError::Unsupported(format!(
                                "{what}: shape {want:?}"
                            )));
                        }
                    });
                }
                if shape.iter().product::<usize>() != total {
                    return Err(ProgramError::Mismatch(format!(
                        "{what}: cannot reshape {ity} to {shape:?}"
                    )));
                }
                (
                    Ty {
                        dtype: ity.dtype,
                        shape,
                    },
                    Box::new(move |out| Step::Reshape { out, input }),
                )
            }
            "mul" | "add" => {
                let bop = if op.r#type == "mul" {
                    BinOp::Mul
                } else {
                    BinOp::Add
                };
                let x = self.var(op, "x")?;
                let y = self.var(op, "y")?;
                let xt = self.expect(op, x, &[DType::Float16])?;
                let yt = self.expect(op, y, &[DType::Float16])?;
                let (shape, xs, ys) = broadcast(&xt.shape, &yt.shape).ok_or_else(|| {
                    ProgramError::Mismatch(format!("{what}: {xt} and {yt} do not broadcast"))
                })?;
                (
                    Ty {
                        dtype: DType::Float16,
                        shape,
                    },
                    Box::new(move |out| Step::Binary {
                        out,
                        op: bop,
                        x,
                        y,
                        xs,
                        ys,
                    }),
                )
            }
            "matmul" => {
                let x = self.var(op, "x")?;
                let y = self.var(op, "y")?;
                let tx = self.scalar_bool(op, "transpose_x")?.unwrap_or(false);
                let ty = self.scalar_bool(op, "transpose_y")?.unwrap_or(false);
                let xt = self.expect(op, x, &[DType::Float16])?;
                let yt = self.expect(op, y, &[DType::Float16])?;
                let (xr, yr) = (xt.shape.len(), yt.shape.len());
                if xr < 2 || yr < 2 {
                    return Err(ProgramError::Unsupported(format!(
                        "{what}: operands of rank < 2"
                    )));
                }
                let (a, b) = (xt.shape[xr - 2], xt.shape[xr - 1]);
                let (n, k) = if tx { (b, a) } else { (a, b) };
                let (c, d) = (yt.shape[yr - 2], yt.shape[yr - 1]);
                let (k2, m) = if ty { (d, c) } else { (c, d) };
                if k != k2 {
                    return Err(ProgramError::Mismatch(format!(
                        "{what}: inner dimensions {k} and {k2} ({xt} × {yt})"
                    )));
                }
                let (bshape, xs, ys) = broadcast(&xt.shape[..xr - 2], &yt.shape[..yr - 2])
                    .ok_or_else(|| {
                        ProgramError::Mismatch(format!(
                            "{what}: batch dimensions of {xt} and {yt} do not broadcast"
                        ))
                    })?;
                let nb: usize = bshape.iter().product();
                let mut batches = Vec::with_capacity(nb);
                for i in 0..nb {
                    let (mut rem, mut xo, mut yo) = (i, 0, 0);
                    for d in (0..bshape.len()).rev() {
                        let idx = rem % bshape[d];
                        rem /= bshape[d];
                        xo += idx * xs[d];
                        yo += idx * ys[d];
                    }
                    batches.push((xo * a * b, yo * c * d));
                }
                let mut shape = bshape;
                shape.extend([n, m]);
                (
                    Ty {
                        dtype: DType::Float16,
                        shape,
                    },
                    Box::new(move |out| {
                        Step::Matmul(Box::new(MatmulStep {
                            out,
                            x,
                            y,
                            tx,
                            ty,
                            n,
                            k,
                            m,
                            batches,
                        }))
                    }),
                )
            }
            "transpose" => {
                let input = self.var(op, "x")?;
                let ity = self.expect(op, input, &[DType::Float16, DType::Int8])?;
                let perm = self.ints(op, "perm")?;
                let r = ity.shape.len();
                let mut seen = vec![false; r];
                let mut p = Vec::with_capacity(r);
                for &d in &perm {
                    let d = if d < 0 { d + r as i32 } else { d };
                    match usize::try_from(d) {
                        Ok(d) if d < r && !seen[d] => {
                            seen[d] = true;
                            p.push(d);
                        }
                        _ => return malformed(format!("{what}: perm {perm:?} for rank {r}")),
                    }
                }
                if p.len() != r {
                    return malformed(format!("{what}: perm {perm:?} for rank {r}"));
                }
                let shape = p.iter().map(|&d| ity.shape[d]).collect();
                (
                    Ty {
                        dtype: ity.dtype,
                        shape,
                    },
                    Box::new(move |out| Step::Transpose {
                        out,
                        input,
                        perm: p,
                    }),
                )
            }
            other => return Err(ProgramError::Unsupported(format!("op {other} ({name})"))),
        };
        check_declared(out_decl, &ty, &what)?;
        let slot = self.new_slot(name, ty)?;
        self.steps.push(step(slot));
        Ok(())
    }
}

/// Compares an op's declared output type (when it has one) with the inferred one.
fn check_declared(decl: &mil::NamedValueType, ty: &Ty, what: &str) -> Result<(), ProgramError> {
    if decl.r#type.is_some() {
        let declared = tensor_ty(decl.r#type.as_ref(), what)?;
        if &declared != ty {
            return Err(ProgramError::Mismatch(format!(
                "{what}: declared {declared}, computed {ty}"
            )));
        }
    }
    Ok(())
}

fn step_inputs(s: &Step) -> Vec<usize> {
    match s {
        Step::Const { .. } => vec![],
        Step::Dequantize { input, .. }
        | Step::Cast { input, .. }
        | Step::Reshape { input, .. }
        | Step::Transpose { input, .. } => {
            vec![*input]
        }
        Step::Binary { x, y, .. } => vec![*x, *y],
        Step::Matmul(m) => vec![m.x, m.y],
        Step::BlockMatmul(b) => {
            let mut v = vec![b.w, b.scales, b.y];
            v.extend(b.offsets);
            v
        }
    }
}

fn step_out(s: &Step) -> usize {
    match s {
        Step::Const { out, .. }
        | Step::Dequantize { out, .. }
        | Step::Cast { out, .. }
        | Step::Reshape { out, .. }
        | Step::Binary { out, .. }
        | Step::Transpose { out, .. } => *out,
        Step::Matmul(m) => m.out,
        Step::BlockMatmul(b) => b.out,
    }
}

/// Replaces each matmul over a w8f16 weight chain by a [`BlockMatmulStep`], then drops the steps
/// nothing reads any more. Only the exact chain is fused: every intermediate has one reader, shapes
/// are `[1, N, K/G, G]` against `[1, N, K/G, 1]`, the dequantisation is by 1 with zero point 0.
fn fuse_block_matmuls(steps: &mut Vec<Step>, types: &[Ty], output: usize) {
    let mut producer = vec![None; types.len()];
    let mut readers = vec![0usize; types.len()];
    for (i, st) in steps.iter().enumerate() {
        producer[step_out(st)] = Some(i);
        for slot in step_inputs(st) {
            readers[slot] += 1;
        }
    }
    // An intermediate value: produced by a step, read once, not the program's output.
    let inner = |slot: usize| readers[slot] == 1 && slot != output && producer[slot].is_some();
    let step_of = |slot: usize| producer[slot].map(|i| &steps[i]);
    let reshape_of = |slot: usize| match step_of(slot) {
        Some(Step::Reshape { input, .. }) if inner(slot) => Some(*input),
        _ => None,
    };
    let mut fused = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        let Step::Matmul(mm) = st else { continue };
        if mm.tx || mm.batches.len() != 1 || mm.batches[0] != (0, 0) {
            continue;
        }
        let Some(sum) = reshape_of(mm.x) else {
            continue;
        };
        if !inner(sum) {
            continue;
        }
        // Optional `add(product, reshape(offsets))`, either operand order.
        let (prod, offsets) = match step_of(sum) {
            Some(Step::Binary {
                op: BinOp::Add,
                x,
                y,
                ..
            }) => {
                let pick = |p: usize, o: usize| match step_of(p) {
                    Some(Step::Binary { op: BinOp::Mul, .. }) if inner(p) => {
                        reshape_of(o).map(|src| (p, Some((o, src))))
                    }
                    _ => None,
                };
                match pick(*x, *y).or_else(|| pick(*y, *x)) {
                    Some(v) => v,
                    None => continue,
                }
            }
            Some(Step::Binary { op: BinOp::Mul, .. }) => (sum, None),
            _ => continue,
        };
        let Some(Step::Binary {
            op: BinOp::Mul,
            x,
            y,
            ..
        }) = step_of(prod)
        else {
            continue;
        };
        // `mul(reshape(dequantize(w)), reshape(scales))`, either operand order.
        let weight = |wq_r: usize, s_r: usize| {
            let wq = reshape_of(wq_r)?;
            let scales = reshape_of(s_r)?;
            match step_of(wq) {
                Some(Step::Dequantize {
                    input,
                    scale,
                    zero_point: 0,
                    ..
                }) if inner(wq) && *scale == f16::ONE => Some((wq_r, *input, s_r, scales)),
                _ => None,
            }
        };
        let Some((wg, w, sg, scales)) = weight(*x, *y).or_else(|| weight(*y, *x)) else {
            continue;
        };
        let (n, k) = (mm.n, mm.k);
        let [1, wn, blocks, g] = types[wg].shape[..] else {
            continue;
        };
        let groups = [1, n, blocks, 1];
        let ok = wn == n
            && blocks * g == k
            && g > 0
            && types[w].dtype == DType::Int8
            && types[w].elements() == n * k
            && types[scales].dtype == DType::Float16
            && types[scales].elements() == n * blocks
            && types[sg].shape == groups
            && types[prod].shape == types[wg].shape
            && types[sum].shape == types[wg].shape
            && offsets.is_none_or(|(og, o)| {
                types[og].shape == groups
                    && types[o].dtype == DType::Float16
                    && types[o].elements() == n * blocks
            });
        if !ok {
            continue;
        }
        fused.push((
            i,
            BlockMatmulStep {
                out: mm.out,
                w,
                scales,
                offsets: offsets.map(|(_, o)| o),
                group: g,
                y: mm.y,
                ty: mm.ty,
                n,
                k,
                m: mm.m,
            },
        ));
    }
    for (i, b) in fused {
        steps[i] = Step::BlockMatmul(Box::new(b));
    }
    // Drop steps whose result nothing reads (the replaced chains, their shape consts).
    loop {
        let mut read = vec![false; types.len()];
        read[output] = true;
        for st in steps.iter() {
            for slot in step_inputs(st) {
                read[slot] = true;
            }
        }
        let before = steps.len();
        steps.retain(|st| read[step_out(st)]);
        if steps.len() == before {
            break;
        }
    }
}

impl Interpreter {
    /// Builds an interpreter for a serialized Model whose consts are all inline.
    pub fn new(model: &[u8]) -> Result<Interpreter, ProgramError> {
        Self::with_weights(model, None)
    }

    /// Builds an interpreter for a serialized Model and its `weight.bin` (if it has one).
    pub fn with_weights(model: &[u8], weights: Option<&[u8]>) -> Result<Interpreter, ProgramError> {
        let model = Model::decode(model).map_err(|e| ProgramError::Decode(e.to_string()))?;
        let weights = weights.map(BlobReader::new).transpose()?;
        Self::from_model(&model, weights)
    }

    fn from_model(
        model: &Model,
        weights: Option<BlobReader<'_>>,
    ) -> Result<Interpreter, ProgramError> {
        Self::from_model_fused(model, weights, true)
    }

    fn from_model_fused(
        model: &Model,
        weights: Option<BlobReader<'_>>,
        fuse: bool,
    ) -> Result<Interpreter, ProgramError> {
        let Some(model::Type::MlProgram(program)) = &model.r#type else {
            return Err(ProgramError::Unsupported(
                "model is not an ML Program".into(),
            ));
        };
        let Some(main) = program.functions.get("main") else {
            return malformed("program has no main function".into());
        };
        let block = match main.block_specializations.get(&main.opset) {
            Some(b) => b,
            None if main.block_specializations.len() == 1 => {
                main.block_specializations.values().next().expect("one")
            }
            None => return malformed(format!("no block for opset {:?}", main.opset)),
        };
        let mut walk = Walk {
            names: HashMap::new(),
            types: Vec::new(),
            consts: HashMap::new(),
            steps: Vec::new(),
            weights,
        };
        let mut inputs = Vec::new();
        for i in &main.inputs {
            let ty = tensor_ty(i.r#type.as_ref(), &format!("input {}", i.name))?;
            if !matches!(ty.dtype, DType::Int8 | DType::Float16) {
                return Err(ProgramError::Unsupported(format!(
                    "input {} of type {ty}",
                    i.name
                )));
            }
            inputs.push((i.name.clone(), walk.new_slot(&i.name, ty)?));
        }
        for op in &block.operations {
            if !op.blocks.is_empty() {
                return Err(ProgramError::Unsupported(format!(
                    "{} with nested blocks",
                    op.r#type
                )));
            }
            walk.op(op)?;
        }
        let [output_name] = block.outputs.as_slice() else {
            return Err(ProgramError::Unsupported(format!(
                "{} block outputs (want 1)",
                block.outputs.len()
            )));
        };
        let Some(&output) = walk.names.get(output_name) else {
            return malformed(format!("output {output_name} is not defined"));
        };
        if walk.types[output].dtype != DType::Float16 {
            return Err(ProgramError::Unsupported(format!(
                "output of type {}",
                walk.types[output]
            )));
        }
        if fuse {
            fuse_block_matmuls(&mut walk.steps, &walk.types, output);
        }
        let mut last = vec![None; walk.types.len()];
        for (i, s) in walk.steps.iter().enumerate() {
            for slot in step_inputs(s) {
                last[slot] = Some(i);
            }
        }
        let mut drops = vec![Vec::new(); walk.steps.len()];
        for (slot, l) in last.iter().enumerate() {
            if let Some(i) = l
                && slot != output
            {
                drops[*i].push(slot);
            }
        }
        Ok(Interpreter {
            inputs,
            types: walk.types,
            steps: walk.steps,
            drops,
            output,
            output_name: output_name.clone(),
        })
    }

    /// Names, element types and shapes of the inputs, in signature order.
    pub fn inputs(&self) -> Vec<(&str, DType, &[usize])> {
        self.inputs
            .iter()
            .map(|(n, s)| {
                (
                    n.as_str(),
                    self.types[*s].dtype,
                    self.types[*s].shape.as_slice(),
                )
            })
            .collect()
    }

    /// Name and shape of the (fp16) output.
    pub fn output(&self) -> (&str, &[usize]) {
        (&self.output_name, &self.types[self.output].shape)
    }

    /// Number of fp16 values `run` produces.
    pub fn output_len(&self) -> usize {
        self.types[self.output].elements()
    }

    /// Runs the program; every declared input must be given exactly once, by name.
    pub fn run(
        &self,
        inputs: &[(&str, TensorRef<'_>)],
        threads: usize,
    ) -> Result<Vec<f16>, ProgramError> {
        let mut out = vec![f16::ZERO; self.output_len()];
        self.run_into(inputs, threads, &mut out)?;
        Ok(out)
    }

    /// Runs the program and writes the output into `out` (exactly [`Self::output_len`] values).
    pub fn run_into(
        &self,
        inputs: &[(&str, TensorRef<'_>)],
        threads: usize,
        out: &mut [f16],
    ) -> Result<(), ProgramError> {
        if out.len() != self.output_len() {
            return Err(ProgramError::BadInputs(format!(
                "output buffer of {} values, want {}",
                out.len(),
                self.output_len()
            )));
        }
        let mut env: Vec<Option<Val<'_>>> = vec![None; self.types.len()];
        for (name, t) in inputs {
            let Some((_, slot)) = self.inputs.iter().find(|(n, _)| n == name) else {
                return Err(ProgramError::BadInputs(format!(
                    "the program has no input {name}"
                )));
            };
            let ty = &self.types[*slot];
            if t.dtype() != ty.dtype || t.len() != ty.elements() {
                return Err(ProgramError::BadInputs(format!(
                    "input {name}: {} values of {}, want {ty}",
                    t.len(),
                    t.dtype()
                )));
            }
            if env[*slot].is_some() {
                return Err(ProgramError::BadInputs(format!("input {name} given twice")));
            }
            env[*slot] = Some(match *t {
                TensorRef::Int8(v) => Val::Int8(Buf::Borrowed(v)),
                TensorRef::Float16(v) => Val::Float16(Buf::Borrowed(v)),
            });
        }
        if let Some((name, _)) = self.inputs.iter().find(|(_, s)| env[*s].is_none()) {
            return Err(ProgramError::BadInputs(format!("input {name} is missing")));
        }
        let threads = threads.max(1);
        let last = self.steps.len().saturating_sub(1);
        for (i, step) in self.steps.iter().enumerate() {
            // A final matmul producing the output writes straight into `out` (no buffer, no copy).
            if i == last && step_out(step) == self.output {
                let get = |s: usize| {
                    env[s]
                        .as_ref()
                        .ok_or_else(|| ProgramError::Malformed(format!("slot {s} is empty")))
                };
                match step {
                    Step::Matmul(mm) => {
                        return self.matmul_into(mm, get(mm.x)?, get(mm.y)?, threads, out);
                    }
                    Step::BlockMatmul(b) => return self.block_matmul_into(b, &env, threads, out),
                    _ => {}
                }
            }
            let v = self.exec(step, &env, threads)?;
            env[step_out(step)] = Some(v);
            for &d in &self.drops[i] {
                env[d] = None;
            }
        }
        let y = env[self.output]
            .take()
            .ok_or_else(|| ProgramError::Malformed("output was never computed".into()))?;
        out.copy_from_slice(&y.f16()?);
        Ok(())
    }

    fn exec<'a>(
        &self,
        step: &Step,
        env: &[Option<Val<'a>>],
        threads: usize,
    ) -> Result<Val<'a>, ProgramError> {
        let get = |s: usize| {
            env[s]
                .as_ref()
                .ok_or_else(|| ProgramError::Malformed(format!("slot {s} is empty")))
        };
        Ok(match step {
            Step::Const { value, .. } => Val::from_const(value),
            Step::Dequantize {
                input,
                scale,
                zero_point,
                ..
            } => {
                let Val::Int8(q) = get(*input)? else {
                    return Err(ProgramError::Mismatch(
                        "dequantize of a non-int8 value".into(),
                    ));
                };
                if *zero_point == 0 {
                    Val::Deq {
                        q: q.clone(),
                        scale: *scale,
                    }
                } else {
                    Val::Float16(dequantize(q, scale.to_f32(), f32::from(*zero_point)).into())
                }
            }
            Step::Cast { input, .. } => match get(*input)? {
                Val::Int8(q) => Val::Float16(
                    q.iter()
                        .map(|&v| f16::from_f32(f32::from(v)))
                        .collect::<Vec<_>>()
                        .into(),
                ),
                Val::Int32(q) => Val::Float16(
                    q.iter()
                        .map(|&v| f16::from_f64(f64::from(v)))
                        .collect::<Vec<_>>()
                        .into(),
                ),
                v => Val::Float16(v.f16()?),
            },
            Step::Reshape { input, .. } => get(*input)?.clone(),
            Step::Binary {
                out,
                op,
                x,
                y,
                xs,
                ys,
            } => {
                let (a, b) = (get(*x)?.f16()?, get(*y)?.f16()?);
                Val::Float16(binary(*op, &a, &b, &self.types[*out].shape, xs, ys).into())
            }
            Step::Matmul(mm) => self.matmul(mm, get(mm.x)?, get(mm.y)?, threads)?,
            Step::BlockMatmul(b) => {
                let mut out = vec![f16::ZERO; b.n * b.m];
                self.block_matmul_into(b, env, threads, &mut out)?;
                Val::Float16(out.into())
            }
            Step::Transpose { input, perm, .. } => {
                let shape = &self.types[*input].shape;
                match get(*input)? {
                    Val::Int8(q) => Val::Int8(permute(q, shape, perm).into()),
                    Val::Deq { q, scale } => Val::Deq {
                        q: permute(q, shape, perm).into(),
                        scale: *scale,
                    },
                    v => Val::Float16(permute(&v.f16()?, shape, perm).into()),
                }
            }
        })
    }

    fn matmul<'a>(
        &self,
        mm: &MatmulStep,
        x: &Val<'a>,
        y: &Val<'a>,
        threads: usize,
    ) -> Result<Val<'a>, ProgramError> {
        let mut out = vec![f16::ZERO; mm.batches.len() * mm.n * mm.m];
        self.matmul_into(mm, x, y, threads, &mut out)?;
        Ok(Val::Float16(out.into()))
    }

    /// The matmul into `out` (`batches · N · M` values). `y` is read in its stored layout: the
    /// program's `[K, M]` activations are not transposed back and forth.
    fn matmul_into(
        &self,
        mm: &MatmulStep,
        x: &Val<'_>,
        y: &Val<'_>,
        threads: usize,
        out: &mut [f16],
    ) -> Result<(), ProgramError> {
        let (n, k, m) = (mm.n, mm.k, mm.m);
        if out.len() != mm.batches.len() * n * m {
            return Err(ProgramError::Malformed(format!(
                "matmul output of {} values into {}",
                mm.batches.len() * n * m,
                out.len()
            )));
        }
        let layout = if mm.ty {
            gemm::BLayout::MK
        } else {
            gemm::BLayout::KM
        };
        for (bi, &(xo, yo)) in mm.batches.iter().enumerate() {
            let dst = &mut out[bi * n * m..(bi + 1) * n * m];
            if let (Val::Deq { q: qx, scale: sx }, Val::Deq { q: qy, scale: sy }) = (x, y) {
                let a = rows_of(&qx[xo..xo + n * k], n, k, mm.tx);
                let scale = f64::from(sx.to_f32()) * f64::from(sy.to_f32());
                gemm::gemm_i8(
                    &a,
                    &qy[yo..yo + k * m],
                    layout,
                    n,
                    m,
                    k,
                    scale,
                    dst,
                    threads,
                );
            } else {
                let (xf, yf) = (x.f16()?, y.f16()?);
                let a = rows_of(&xf[xo..xo + n * k], n, k, mm.tx);
                gemm::gemm_rows(
                    gemm::ARows::F16(&a),
                    &yf[yo..yo + k * m],
                    layout,
                    n,
                    m,
                    k,
                    dst,
                    threads,
                );
            }
        }
        Ok(())
    }
}

impl Interpreter {
    fn block_matmul_into(
        &self,
        b: &BlockMatmulStep,
        env: &[Option<Val<'_>>],
        threads: usize,
        out: &mut [f16],
    ) -> Result<(), ProgramError> {
        let get = |s: usize| {
            env[s]
                .as_ref()
                .ok_or_else(|| ProgramError::Malformed(format!("slot {s} is empty")))
        };
        let Val::Int8(q) = get(b.w)? else {
            return Err(ProgramError::Mismatch(
                "dequantize of a non-int8 value".into(),
            ));
        };
        let scales = get(b.scales)?.f16()?;
        let offsets = b.offsets.map(|o| get(o)?.f16()).transpose()?;
        let y = get(b.y)?.f16()?;
        let (n, k, m) = (b.n, b.k, b.m);
        if out.len() != n * m || y.len() != k * m {
            return Err(ProgramError::Malformed(format!(
                "block matmul of {n}x{k}x{m} with y of {} values into {}",
                y.len(),
                out.len()
            )));
        }
        let a = gemm::ARows::Block {
            q,
            scales: &scales,
            offsets: offsets.as_deref(),
            group: b.group,
        };
        if !a.covers(n, k) {
            return Err(ProgramError::Malformed(format!(
                "block matmul operands do not cover {n}x{k}"
            )));
        }
        let layout = if b.ty {
            gemm::BLayout::MK
        } else {
            gemm::BLayout::KM
        };
        gemm::gemm_rows(a, &y, layout, n, m, k, out, threads);
        Ok(())
    }
}

/// A `[rows, cols]` view of a matrix stored as `[rows, cols]` (`transposed == false`) or `[cols, rows]`.
fn rows_of<T: Copy + Default>(
    src: &[T],
    rows: usize,
    cols: usize,
    transposed: bool,
) -> std::borrow::Cow<'_, [T]> {
    if transposed {
        gemm::transpose(src, cols, rows).into()
    } else {
        src.into()
    }
}

/// `fp16((q - zero_point) · scale)` per element, converted in chunks.
fn dequantize(q: &[i8], scale: f32, zero_point: f32) -> Vec<f16> {
    let mut out = vec![f16::ZERO; q.len()];
    let mut buf = [0f32; 1024];
    for (src, dst) in q.chunks(1024).zip(out.chunks_mut(1024)) {
        let b = &mut buf[..src.len()];
        for (x, &v) in b.iter_mut().zip(src) {
            *x = (f32::from(v) - zero_point) * scale;
        }
        dst.convert_from_f32_slice(b);
    }
    out
}

/// Elementwise op with broadcasting; computed in f32, rounded to fp16.
fn binary(
    op: BinOp,
    a: &[f16],
    b: &[f16],
    shape: &[usize],
    xs: &[usize],
    ys: &[usize],
) -> Vec<f16> {
    let total: usize = shape.iter().product();
    let r = shape.len();
    let f = |x: f32, y: f32| if op == BinOp::Mul { x * y } else { x + y };
    if r == 0 {
        return vec![f16::from_f32(f(a[0].to_f32(), b[0].to_f32()))];
    }
    let mut out = vec![f16::ZERO; total];
    let inner = shape[r - 1];
    if inner == 0 {
        return out;
    }
    let (sx, sy) = (xs[r - 1], ys[r - 1]);
    // One row at a time through f32 buffers, so conversions run over slices (SIMD where available).
    let row = |src: &[f16], off: usize, stride: usize, buf: &mut [f32]| {
        if stride == 0 {
            buf.fill(src[off].to_f32());
        } else {
            src[off..off + inner].convert_to_f32_slice(buf);
        }
    };
    let (mut xa, mut ya) = (vec![0f32; inner], vec![0f32; inner]);
    let mut idx = vec![0usize; r - 1];
    for dst in out.chunks_exact_mut(inner) {
        let xo: usize = idx.iter().zip(xs).map(|(i, s)| i * s).sum();
        let yo: usize = idx.iter().zip(ys).map(|(i, s)| i * s).sum();
        row(a, xo, sx, &mut xa);
        row(b, yo, sy, &mut ya);
        for (x, &y) in xa.iter_mut().zip(&ya) {
            *x = f(*x, y);
        }
        dst.convert_from_f32_slice(&xa);
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// General axis permutation of a row-major tensor.
fn permute<T: Copy>(src: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let r = shape.len();
    let mut strides = vec![1usize; r];
    for d in (0..r.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let ostrides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; r];
    for _ in 0..total {
        out.push(src[idx.iter().zip(&ostrides).map(|(i, s)| i * s).sum::<usize>()]);
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < oshape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::{ProgramDesc, Variant};
    use crate::emit::emit_model;

    fn lcg(s: &mut u64) -> u32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*s >> 33) as u32
    }

    #[test]
    fn w8f16_chain_is_fused_with_the_same_bits() {
        let mut s = 17;
        for &(m, k, n, group, offsets, live) in &[
            (64, 256, 12, 32, true, 64),
            (64, 96, 7, 16, false, 5),
            (128, 64, 3, 32, true, 1),
            (64, 512, 9, 32, false, 0),
        ] {
            let desc = ProgramDesc {
                variant: Variant::W8F16,
                m,
                k,
                n,
                group,
                offsets,
            };
            let model = Model::decode(&emit_model(&desc).unwrap()[..]).unwrap();
            let fused = Interpreter::from_model_fused(&model, None, true).unwrap();
            let plain = Interpreter::from_model_fused(&model, None, false).unwrap();
            assert!(
                fused
                    .steps
                    .iter()
                    .any(|st| matches!(st, Step::BlockMatmul(_))),
                "{desc}: not fused"
            );
            assert!(fused.steps.len() < plain.steps.len());
            let w: Vec<i8> = (0..n * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let g = n * k / group;
            let sc: Vec<f16> = (0..g)
                .map(|_| f16::from_f32((lcg(&mut s) % 4000) as f32 * 1e-5 - 0.02))
                .collect();
            let of: Vec<f16> = (0..g)
                .map(|_| f16::from_f32((lcg(&mut s) % 4000) as f32 * 1e-3 - 2.0))
                .collect();
            let mut x = vec![f16::ZERO; k * m];
            for kk in 0..k {
                for c in 0..live {
                    x[kk * m + c] = f16::from_f32((lcg(&mut s) % 2000) as f32 * 1e-3 - 1.0);
                }
            }
            let mut inputs = vec![
                ("w", TensorRef::Int8(&w)),
                ("scales", TensorRef::Float16(&sc)),
            ];
            if offsets {
                inputs.push(("offsets", TensorRef::Float16(&of)));
            }
            inputs.push(("x", TensorRef::Float16(&x)));
            for threads in [1, 2] {
                let a = fused.run(&inputs, threads).unwrap();
                let b = plain.run(&inputs, threads).unwrap();
                let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{desc} threads {threads}");
            }
        }
    }
}
