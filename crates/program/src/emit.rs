//! The programs of each variant, as CoreML ML Program protobufs.
//!
//! All tensors are rank 4 `[1, 1, rows, cols]` (see [`crate::spec::PROGRAM_RANK`]); nothing inside a
//! program is fp32 (any fp32 value sends an op off the ANE).

use half::f16;
use prost::Message;

use crate::desc::{FORMAT_VERSION, ProgramDesc, Variant};
use crate::error::ProgramError;
use crate::mil::{BuiltProgram, ProgramBuilder};
use crate::spec::{DType, input_specs, output_spec};

/// `Model.specificationVersion` of every variant: 10 (iOS 26 / macOS 26) is the first with int8
/// model inputs. The f16 variant could run from spec 7, but one spec keeps one opset and one set of
/// op definitions to validate and reason about.
pub const SPEC_VERSION: i32 = 10;
/// Function opset matching [`SPEC_VERSION`].
pub const OPSET: &str = "CoreML9";

/// Builds the program for `desc` (validated first).
pub fn build_program(desc: &ProgramDesc) -> Result<BuiltProgram, ProgramError> {
    desc.validate().map_err(ProgramError::InvalidDesc)?;
    let mut b = ProgramBuilder::new(SPEC_VERSION, OPSET);
    b.metadata("ggml-coreml.program", &desc.key());
    b.metadata("ggml-coreml.format", &FORMAT_VERSION.to_string());
    let mut vars = std::collections::HashMap::new();
    for spec in input_specs(desc) {
        vars.insert(spec.name, b.input(spec)?);
    }
    let var = |name: &str| vars.get(name).cloned().expect("declared by input_specs");
    let out = output_spec(desc);
    let (n, k, m) = (desc.n, desc.k, desc.m);
    let wh = match desc.variant {
        Variant::I8I8 => {
            // One scale for both operands keeps each product below 127² and the sum over K below
            // 127²·K/K: fp16 range, whatever K. The host multiplies y back by K·s_w·s_x.
            let (_, wh, xh) = int8_operands(&mut b, &var("w"), &var("x"), desc)?;
            return finish_matmul(b, &wh, &xh, out.shape);
        }
        Variant::W8F16 => {
            let g = desc.group;
            let blocks = k / g;
            let one = b.scalar_f16("one", f16::ONE)?;
            let wq = b.op(
                "dequantize",
                "wq",
                &[("input", &var("w")), ("scale", &one)],
                DType::Float16,
                &[1, 1, n, k],
            )?;
            // Blocks on their own axis so each block scale broadcasts over its G values. With N = 1
            // and K = G every reshape below keeps its input's shape; coremltools' `noop_elimination`
            // drops such reshapes, and so do we (the coreml-equivalence stage compares the two).
            let reshape = !(n == 1 && blocks == 1);
            let wg = if reshape {
                let wg_shape = b.ints("wg_shape", &[1, n as i32, blocks as i32, g as i32])?;
                b.op(
                    "reshape",
                    "wg",
                    &[("x", &wq), ("shape", &wg_shape)],
                    DType::Float16,
                    &[1, n, blocks, g],
                )?
            } else {
                wq
            };
            let sg_shape = if reshape {
                Some(b.ints("sg_shape", &[1, n as i32, blocks as i32, 1])?)
            } else {
                None
            };
            // Per-block scales and offsets as [1, N, blocks, 1] (or as they come, see above).
            let per_block = |b: &mut ProgramBuilder, input: &str, name: &str| match &sg_shape {
                Some(shape) => b.op(
                    "reshape",
                    name,
                    &[("x", &var(input)), ("shape", shape)],
                    DType::Float16,
                    &[1, n, blocks, 1],
                ),
                None => Ok(var(input)),
            };
            let sg = per_block(&mut b, "scales", "sg")?;
            let mut ws = b.op(
                "mul",
                "ws",
                &[("x", &wg), ("y", &sg)],
                DType::Float16,
                &[1, n, blocks, g],
            )?;
            if desc.offsets {
                let og = per_block(&mut b, "offsets", "og")?;
                ws = b.op(
                    "add",
                    "wo",
                    &[("x", &ws), ("y", &og)],
                    DType::Float16,
                    &[1, n, blocks, g],
                )?;
            }
            if reshape {
                let w_shape = b.ints("w_shape", &[1, 1, n as i32, k as i32])?;
                b.op(
                    "reshape",
                    "wh",
                    &[("x", &ws), ("shape", &w_shape)],
                    DType::Float16,
                    &[1, 1, n, k],
                )?
            } else {
                ws
            }
        }
        Variant::F16 => var("w"),
        Variant::I8I8O => {
            // i8i8's product over the non-outlier channels (the host zeroed the outliers in x),
            // rescaled per token by t = s_int / u, plus the outlier channels' product, already in
            // the token's unit u: y = (w·x)·t + wo·xo. One scale for the int8 operands, as i8i8.
            let c = desc.group;
            let (s, wh, xh) = int8_operands(&mut b, &var("w"), &var("x"), desc)?;
            let tx = b.scalar_bool("transpose_x", false)?;
            let ty = b.scalar_bool("transpose_y", false)?;
            let p = b.op(
                "matmul",
                "p",
                &[
                    ("x", &wh),
                    ("y", &xh),
                    ("transpose_x", &tx),
                    ("transpose_y", &ty),
                ],
                DType::Float16,
                &[1, 1, n, m],
            )?;
            let pt = b.op(
                "mul",
                "pt",
                &[("x", &p), ("y", &var("t"))],
                DType::Float16,
                &[1, 1, n, m],
            )?;
            let woh = b.op(
                "dequantize",
                "woh",
                &[("input", &var("wo")), ("scale", &s)],
                DType::Float16,
                &[1, 1, n, c],
            )?;
            let o = b.op(
                "matmul",
                "o",
                &[
                    ("x", &woh),
                    ("y", &var("xo")),
                    ("transpose_x", &tx),
                    ("transpose_y", &ty),
                ],
                DType::Float16,
                &[1, 1, n, m],
            )?;
            let y = b.op(
                "add",
                "y",
                &[("x", &pt), ("y", &o)],
                DType::Float16,
                &out.shape,
            )?;
            return b.finish(&y);
        }
    };
    finish_matmul(b, &wh, &var("x"), out.shape)
}

/// The int8 operands `w [N, K]` and `x [K, Mp]` of i8i8 and i8i8o as fp16, both with one scale
/// (`desc.i8_scale()`, returned first for any other int8 input), so the matmul sees exact int8 values.
fn int8_operands(
    b: &mut ProgramBuilder,
    w: &str,
    x: &str,
    desc: &ProgramDesc,
) -> Result<(String, String, String), ProgramError> {
    let s = b.scalar_f16("scale", desc.i8_scale())?;
    let wh = b.op(
        "dequantize",
        "wh",
        &[("input", w), ("scale", &s)],
        DType::Float16,
        &[1, 1, desc.n, desc.k],
    )?;
    let xh = b.op(
        "dequantize",
        "xh",
        &[("input", x), ("scale", &s)],
        DType::Float16,
        &[1, 1, desc.k, desc.m],
    )?;
    Ok((s, wh, xh))
}

fn finish_matmul(
    mut b: ProgramBuilder,
    w: &str,
    x: &str,
    out_shape: Vec<usize>,
) -> Result<BuiltProgram, ProgramError> {
    let tx = b.scalar_bool("transpose_x", false)?;
    let ty = b.scalar_bool("transpose_y", false)?;
    let y = b.op(
        "matmul",
        "y",
        &[
            ("x", w),
            ("y", x),
            ("transpose_x", &tx),
            ("transpose_y", &ty),
        ],
        DType::Float16,
        &out_shape,
    )?;
    b.finish(&y)
}

/// The serialized `CoreML.Specification.Model` of the program for `desc`. Deterministic: the same
/// description gives the same bytes on every run and machine.
pub fn emit_model(desc: &ProgramDesc) -> Result<Vec<u8>, ProgramError> {
    Ok(build_program(desc)?.model.encode_to_vec())
}

/// The MIL text of a built program, for docs and debugging (not what CoreML reads).
pub fn mil_text(built: &BuiltProgram) -> String {
    use crate::proto::specification::mil_spec::{argument::binding::Binding, value_type};
    use crate::proto::specification::model::Type;
    let mut s = String::new();
    let Some(Type::MlProgram(p)) = &built.model.r#type else {
        return s;
    };
    let ty = |t: &Option<crate::proto::specification::mil_spec::ValueType>| -> String {
        match t.as_ref().and_then(|t| t.r#type.as_ref()) {
            Some(value_type::Type::TensorType(t)) => {
                let dt = DType::from_mil(t.data_type).map_or("?", |d| d.name());
                let dims: Vec<String> = t
                    .dimensions
                    .iter()
                    .map(|d| match &d.dimension {
                        Some(
                            crate::proto::specification::mil_spec::dimension::Dimension::Constant(
                                c,
                            ),
                        ) => c.size.to_string(),
                        _ => "?".into(),
                    })
                    .collect();
                format!("{dt}[{}]", dims.join(","))
            }
            _ => "?".into(),
        }
    };
    for (fname, f) in &p.functions {
        let ins: Vec<String> = f
            .inputs
            .iter()
            .map(|i| format!("{}: {}", i.name, ty(&i.r#type)))
            .collect();
        s += &format!("func {fname}<{}>({}) {{\n", f.opset, ins.join(", "));
        for block in f.block_specializations.values() {
            for op in &block.operations {
                let outs: Vec<String> = op
                    .outputs
                    .iter()
                    .map(|o| format!("{}: {}", o.name, ty(&o.r#type)))
                    .collect();
                let args: Vec<String> = op
                    .inputs
                    .iter()
                    .map(|(k, a)| {
                        let v: Vec<String> = a
                            .arguments
                            .iter()
                            .map(|b| match &b.binding {
                                Some(Binding::Name(n)) => n.clone(),
                                _ => "<value>".into(),
                            })
                            .collect();
                        format!("{k} = {}", v.join(","))
                    })
                    .collect();
                if op.r#type == "const" {
                    let val = op.attributes.get("val").map_or("?".into(), const_text);
                    s += &format!("  {} = const({val})\n", outs.join(", "));
                } else {
                    s += &format!(
                        "  {} = {}({})\n",
                        outs.join(", "),
                        op.r#type,
                        args.join(", ")
                    );
                }
            }
            s += &format!("}} -> ({})\n", block.outputs.join(", "));
        }
    }
    s
}

/// Short text of a const value: the values when inline, the blob offset otherwise.
fn const_text(v: &crate::proto::specification::mil_spec::Value) -> String {
    use crate::proto::specification::mil_spec::{tensor_value::Value as TV, value};
    match &v.value {
        Some(value::Value::BlobFileValue(b)) => format!("blob @{}", b.offset),
        Some(value::Value::ImmediateValue(value::ImmediateValue {
            value: Some(value::immediate_value::Value::Tensor(t)),
        })) => {
            let dt = match v.r#type.as_ref().and_then(|t| t.r#type.as_ref()) {
                Some(crate::proto::specification::mil_spec::value_type::Type::TensorType(t)) => {
                    DType::from_mil(t.data_type)
                }
                _ => None,
            };
            let items: Vec<String> = match (&t.value, dt) {
                (Some(TV::Bytes(b)), Some(DType::Float16)) => b
                    .values
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_string())
                    .collect(),
                (Some(TV::Bytes(b)), _) => {
                    b.values.iter().map(|&x| (x as i8).to_string()).collect()
                }
                (Some(TV::Ints(i)), _) => i.values.iter().map(|x| x.to_string()).collect(),
                (Some(TV::Bools(b)), _) => b.values.iter().map(|x| x.to_string()).collect(),
                (Some(TV::Strings(x)), _) => x.values.iter().map(|x| format!("{x:?}")).collect(),
                _ => vec!["?".into()],
            };
            if items.len() == 1 {
                items[0].clone()
            } else {
                format!("[{}]", items.join(", "))
            }
        }
        _ => "?".into(),
    }
}
