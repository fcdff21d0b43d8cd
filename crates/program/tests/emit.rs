//! Emitter and interpreter together: determinism, round trips, numerics against direct computation.

use std::collections::BTreeMap;
use std::path::Path;

use ggml_coreml_program::mil::{ConstData, ProgramBuilder};
use ggml_coreml_program::proto::specification::{Model, model};
use ggml_coreml_program::{
    DType, Interpreter, ProgramDesc, ProgramError, TensorRef, TensorSpec, Variant, build_program,
    emit_model, input_specs, output_spec, read_package, write_mlpackage, write_package,
};
use half::f16;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn desc(
    variant: Variant,
    m: usize,
    k: usize,
    n: usize,
    group: usize,
    offsets: bool,
) -> ProgramDesc {
    ProgramDesc {
        variant,
        m,
        k,
        n,
        group,
        offsets,
    }
}

fn all_small() -> Vec<ProgramDesc> {
    vec![
        desc(Variant::I8I8, 64, 96, 40, 0, false),
        desc(Variant::W8F16, 64, 128, 24, 32, false),
        desc(Variant::W8F16, 64, 128, 24, 32, true),
        desc(Variant::W8F16, 128, 64, 8, 16, false),
        // N = 1 and K = G: no reshape (every one would keep its input's shape).
        desc(Variant::W8F16, 64, 32, 1, 32, true),
        desc(Variant::W8F16, 64, 16, 1, 16, false),
        desc(Variant::F16, 64, 80, 33, 0, false),
        desc(Variant::I8I8O, 64, 96, 40, 8, false),
        desc(Variant::I8I8O, 128, 640, 17, 32, false),
    ]
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.insert(rel + "/", vec![]);
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn emission_is_deterministic() {
    for d in all_small() {
        assert_eq!(emit_model(&d).unwrap(), emit_model(&d).unwrap(), "{d}");
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in all_small() {
        let pa = write_mlpackage(&d, a.path()).unwrap();
        let pb = write_mlpackage(&d, b.path()).unwrap();
        assert_eq!(pa.file_name(), pb.file_name());
        assert_eq!(
            pa.file_name().unwrap().to_str().unwrap(),
            format!("{}.mlpackage", d.key())
        );
        // Rewriting in place replaces the package and leaves no temporaries behind.
        write_mlpackage(&d, a.path()).unwrap();
    }
    assert_eq!(tree(a.path()), tree(b.path()));
    let t = tree(a.path());
    assert!(
        t.keys().all(|k| !k.starts_with('.')),
        "no temporaries: {:?}",
        t.keys()
    );
    assert!(t.contains_key("i8i8-m64-k96-n40.mlpackage/Manifest.json"));
    assert!(t.contains_key("i8i8-m64-k96-n40.mlpackage/Data/com.apple.CoreML/model.mlmodel"));
    assert!(t.contains_key("i8i8-m64-k96-n40.mlpackage/Data/com.apple.CoreML/weights/"));
    assert!(
        !t.keys().any(|k| k.ends_with("weight.bin")),
        "our variants have only inline consts"
    );
}

#[test]
fn model_description_matches_specs() {
    for d in all_small() {
        let model = Model::decode(emit_model(&d).unwrap().as_slice()).unwrap();
        assert_eq!(model.specification_version, 10);
        let desc = model.description.as_ref().unwrap();
        let names: Vec<&str> = desc.input.iter().map(|f| f.name.as_str()).collect();
        let want: Vec<&str> = input_specs(&d).iter().map(|s| s.name).collect();
        assert_eq!(names, want);
        assert_eq!(desc.output[0].name, "y");
        let Some(model::Type::MlProgram(p)) = &model.r#type else {
            panic!("ML Program")
        };
        assert_eq!(p.functions["main"].opset, "CoreML9");
        let it = Interpreter::new(&emit_model(&d).unwrap()).unwrap();
        let got: Vec<TensorSpec> = it
            .inputs()
            .into_iter()
            .map(|(n, dt, s)| TensorSpec {
                name: input_specs(&d)
                    .into_iter()
                    .find(|x| x.name == n)
                    .unwrap()
                    .name,
                dtype: dt,
                shape: s.to_vec(),
            })
            .collect();
        assert_eq!(got, input_specs(&d));
        assert_eq!(it.output(), ("y", output_spec(&d).shape.as_slice()));
        // No fp32 anywhere in the program: every type in the bytes is int8/fp16/int32/bool/string.
        let text = format!("{model:?}");
        assert!(!text.contains("data_type: 11,"), "fp32 found in {d}");
    }
}

#[test]
fn invalid_descriptions_are_errors() {
    for d in [
        desc(Variant::I8I8, 65, 64, 64, 0, false),
        desc(Variant::I8I8, 64, 0, 64, 0, false),
        desc(Variant::I8I8, 64, 16385, 64, 0, false),
        desc(Variant::W8F16, 64, 100, 64, 32, false),
        desc(Variant::F16, 64, 64, 64, 32, false),
    ] {
        assert!(
            matches!(emit_model(&d), Err(ProgramError::InvalidDesc(_))),
            "{d:?}"
        );
    }
}

struct Inputs {
    i8: BTreeMap<&'static str, Vec<i8>>,
    f16: BTreeMap<&'static str, Vec<f16>>,
}

impl Inputs {
    fn random(d: &ProgramDesc, rng: &mut StdRng) -> Inputs {
        let mut i = Inputs {
            i8: BTreeMap::new(),
            f16: BTreeMap::new(),
        };
        for s in input_specs(d) {
            let len = s.elements();
            match (s.dtype, s.name) {
                (DType::Int8, _) if d.variant == Variant::W8F16 => {
                    // Block values: signed for Q8_0-like, unsigned up to 63 for K-quants with offsets.
                    let lo = if d.offsets { 0 } else { -128 };
                    let hi = if d.offsets { 63 } else { 127 };
                    i.i8.insert(
                        s.name,
                        (0..len).map(|_| rng.random_range(lo..=hi)).collect(),
                    );
                }
                (DType::Int8, _) => {
                    i.i8.insert(
                        s.name,
                        (0..len).map(|_| rng.random_range(-128..=127)).collect(),
                    );
                }
                (DType::Float16, "scales") => {
                    i.f16.insert(
                        s.name,
                        (0..len)
                            .map(|_| f16::from_f32(rng.random_range(0.001..0.02)))
                            .collect(),
                    );
                }
                (DType::Float16, "offsets") => {
                    i.f16.insert(
                        s.name,
                        (0..len)
                            .map(|_| f16::from_f32(rng.random_range(-0.3..0.0)))
                            .collect(),
                    );
                }
                (DType::Float16, _) => {
                    i.f16.insert(
                        s.name,
                        (0..len)
                            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                            .collect(),
                    );
                }
                _ => unreachable!(),
            }
        }
        i
    }

    fn refs(&self) -> Vec<(&str, TensorRef<'_>)> {
        let mut v: Vec<(&str, TensorRef<'_>)> = self
            .i8
            .iter()
            .map(|(k, v)| (*k, TensorRef::Int8(v)))
            .collect();
        v.extend(self.f16.iter().map(|(k, v)| (*k, TensorRef::Float16(v))));
        v
    }
}

/// f64 ground truth and a tolerance per output from fp16 rounding of intermediates and output.
fn reference(d: &ProgramDesc, inp: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (n, k, m) = (d.n, d.k, d.m);
    let eps = 2f64.powi(-11);
    if d.variant == Variant::I8I8O {
        // y = (Σ w·x·s²) · t + Σ wo·s · xo: the int8 product rounded to fp16, scaled by t (rounded),
        // the outlier product rounded, and the sum rounded.
        let s = f64::from(d.i8_scale().to_f32());
        let c = d.group;
        let (mut y, mut tol) = (vec![0.0; n * m], vec![0.0; n * m]);
        for r in 0..n {
            for col in 0..m {
                let p: f64 = (0..k)
                    .map(|t| {
                        f64::from(inp.i8["w"][r * k + t]) * f64::from(inp.i8["x"][t * m + col])
                    })
                    .sum::<f64>()
                    * s
                    * s;
                let tt = f64::from(inp.f16["t"][col].to_f32());
                let (mut o, mut a) = (0.0, 0.0);
                for j in 0..c {
                    let v = f64::from(inp.i8["wo"][r * c + j])
                        * s
                        * f64::from(inp.f16["xo"][j * m + col].to_f32());
                    o += v;
                    a += v.abs();
                }
                y[r * m + col] = p * tt + o;
                tol[r * m + col] = eps
                    * (3.0 * (p * tt).abs() + 2.0 * o.abs() + (p * tt + o).abs())
                    // the fp16 rounding of each dequantized outlier weight, and f32 sums.
                    + eps * a
                    + (c as f64) * 2f64.powi(-24) * a
                    + 1e-7;
            }
        }
        return (y, tol);
    }
    let w: Vec<f64> = match d.variant {
        Variant::I8I8 => {
            let s = f64::from(d.i8_scale().to_f32());
            inp.i8["w"].iter().map(|&q| f64::from(q) * s).collect()
        }
        Variant::W8F16 => {
            let g = d.group;
            (0..n * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    let s = f64::from(inp.f16["scales"][r * (k / g) + c / g].to_f32());
                    let o = if d.offsets {
                        f64::from(inp.f16["offsets"][r * (k / g) + c / g].to_f32())
                    } else {
                        0.0
                    };
                    f64::from(inp.i8["w"][i]) * s + o
                })
                .collect()
        }
        Variant::F16 => inp.f16["w"].iter().map(|v| f64::from(v.to_f32())).collect(),
        Variant::I8I8O => unreachable!("handled above"),
    };
    let x: Vec<f64> = match d.variant {
        Variant::I8I8 => {
            let s = f64::from(d.i8_scale().to_f32());
            inp.i8["x"].iter().map(|&q| f64::from(q) * s).collect()
        }
        _ => inp.f16["x"].iter().map(|v| f64::from(v.to_f32())).collect(),
    };
    let mut y = vec![0.0; n * m];
    let mut tol = vec![0.0; n * m];
    for r in 0..n {
        for c in 0..m {
            let (mut s, mut a) = (0.0, 0.0);
            for t in 0..k {
                s += w[r * k + t] * x[t * m + c];
                a += (w[r * k + t] * x[t * m + c]).abs();
            }
            y[r * m + c] = s;
            // Output rounding, f32 accumulation, and (w8f16) up to two fp16 roundings per weight.
            let per_weight = if d.variant == Variant::W8F16 {
                3.0 * eps
            } else {
                0.0
            };
            tol[r * m + c] =
                eps * s.abs() + (k as f64) * 2f64.powi(-24) * a + per_weight * a + 1e-7;
        }
    }
    (y, tol)
}

#[test]
fn interpreter_matches_direct_computation() {
    let mut rng = StdRng::seed_from_u64(42);
    for d in all_small() {
        let it = Interpreter::new(&emit_model(&d).unwrap()).unwrap();
        let inp = Inputs::random(&d, &mut rng);
        let y = it.run(&inp.refs(), 1).unwrap();
        let y3 = it.run(&inp.refs(), 3).unwrap();
        assert_eq!(y, y3, "{d}: thread count changes nothing");
        let (want, tol) = reference(&d, &inp);
        for i in 0..y.len() {
            let got = f64::from(y[i].to_f32());
            assert!(
                (got - want[i]).abs() <= tol[i],
                "{d} at {i}: got {got}, want {} ± {}",
                want[i],
                tol[i]
            );
        }
    }
}

#[test]
fn i8i8_is_the_exact_integer_product_rounded_once() {
    let d = desc(Variant::I8I8, 64, 256, 16, 0, false);
    let it = Interpreter::new(&emit_model(&d).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let inp = Inputs::random(&d, &mut rng);
    let y = it.run(&inp.refs(), 2).unwrap();
    let s = f64::from(d.i8_scale().to_f32());
    let (w, x) = (&inp.i8["w"], &inp.i8["x"]);
    for r in 0..d.n {
        for c in 0..d.m {
            let dot: i64 = (0..d.k)
                .map(|t| i64::from(w[r * d.k + t]) * i64::from(x[t * d.m + c]))
                .sum();
            assert_eq!(y[r * d.m + c], f16::from_f64(dot as f64 * s * s));
        }
    }
}

#[test]
fn packages_round_trip_through_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let d = desc(Variant::W8F16, 64, 64, 8, 32, true);
    let pkg = write_mlpackage(&d, dir.path()).unwrap();
    let (bytes, weights) = read_package(&pkg).unwrap();
    assert!(weights.is_none());
    assert_eq!(bytes, emit_model(&d).unwrap());
    let it = Interpreter::with_weights(&bytes, None).unwrap();
    let inp = Inputs::random(&d, &mut StdRng::seed_from_u64(1));
    assert_eq!(it.run(&inp.refs(), 1).unwrap().len(), 8 * 64);
}

/// A weights-baked program (consts in blob storage), the form validation and future variants use.
fn baked(
    n: usize,
    k: usize,
    m: usize,
    seed: u64,
) -> (ggml_coreml_program::mil::BuiltProgram, Vec<i8>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, k, m],
        })
        .unwrap();
    let wq = b
        .constant("wq", &[1, 1, n, k], ConstData::Int8(w.clone()))
        .unwrap();
    let s = b.scalar_f16("s", f16::from_f32(0.5)).unwrap();
    let wh = b
        .op(
            "dequantize",
            "wh",
            &[("input", &wq), ("scale", &s)],
            DType::Float16,
            &[1, 1, n, k],
        )
        .unwrap();
    let y = b
        .op(
            "matmul",
            "y",
            &[("x", &wh), ("y", &x)],
            DType::Float16,
            &[1, 1, n, m],
        )
        .unwrap();
    (b.finish(&y).unwrap(), w)
}

#[test]
fn blob_backed_consts_are_written_and_interpreted() {
    let (n, k, m) = (4, 32, 64);
    let (built, w) = baked(n, k, m, 3);
    let weights = built
        .weights
        .clone()
        .expect("a 128-element const goes to weight.bin");
    assert_eq!(built.blobs.len(), 1);
    assert_eq!(built.blobs[0].offset, 64);
    let dir = tempfile::tempdir().unwrap();
    let pkg = write_package(&built, dir.path(), "baked").unwrap();
    let (bytes, wb) = read_package(&pkg).unwrap();
    assert_eq!(wb.as_deref(), Some(weights.as_slice()));
    let x: Vec<f16> = (0..k * m)
        .map(|i| f16::from_f32(((i % 7) as f32 - 3.0) / 8.0))
        .collect();
    let it = Interpreter::with_weights(&bytes, wb.as_deref()).unwrap();
    let y = it.run(&[("x", TensorRef::Float16(&x))], 1).unwrap();
    for r in 0..n {
        for c in 0..m {
            let want: f32 = (0..k)
                .map(|t| f32::from(w[r * k + t]) * 0.5 * x[t * m + c].to_f32())
                .sum();
            assert!((y[r * m + c].to_f32() - want).abs() <= want.abs() / 1024.0 + 1e-3);
        }
    }
    assert!(
        matches!(Interpreter::new(&bytes), Err(ProgramError::Malformed(_))),
        "weights are required"
    );
}

#[test]
fn bad_programs_and_inputs_are_errors() {
    assert!(matches!(
        Interpreter::new(b"\xff\xff\xff"),
        Err(ProgramError::Decode(_))
    ));
    assert!(
        matches!(Interpreter::new(&[]), Err(ProgramError::Unsupported(_))),
        "empty model has no program"
    );

    // Unknown op.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, 4, 64],
        })
        .unwrap();
    let y = b
        .op("softmax", "y", &[("x", &x)], DType::Float16, &[1, 1, 4, 64])
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    assert!(
        matches!(Interpreter::new(&bytes), Err(ProgramError::Unsupported(m)) if m.contains("softmax"))
    );

    // Declared shape that does not match the inferred one.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let w = b
        .input(TensorSpec {
            name: "w",
            dtype: DType::Float16,
            shape: vec![1, 1, 4, 8],
        })
        .unwrap();
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, 8, 64],
        })
        .unwrap();
    let y = b
        .op(
            "matmul",
            "y",
            &[("x", &w), ("y", &x)],
            DType::Float16,
            &[1, 1, 4, 65],
        )
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    assert!(matches!(
        Interpreter::new(&bytes),
        Err(ProgramError::Mismatch(_))
    ));

    // Inner dimensions that do not agree.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let w = b
        .input(TensorSpec {
            name: "w",
            dtype: DType::Float16,
            shape: vec![1, 1, 4, 8],
        })
        .unwrap();
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, 9, 64],
        })
        .unwrap();
    let y = b
        .op(
            "matmul",
            "y",
            &[("x", &w), ("y", &x)],
            DType::Float16,
            &[1, 1, 4, 64],
        )
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    assert!(matches!(
        Interpreter::new(&bytes),
        Err(ProgramError::Mismatch(_))
    ));

    // Reshape that loses elements.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, 4, 64],
        })
        .unwrap();
    let s = b.ints("s", &[1, 1, 4, 63]).unwrap();
    let y = b
        .op(
            "reshape",
            "y",
            &[("x", &x), ("shape", &s)],
            DType::Float16,
            &[1, 1, 4, 63],
        )
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    assert!(matches!(
        Interpreter::new(&bytes),
        Err(ProgramError::Mismatch(_))
    ));

    // Dequantize with a runtime (non-const) scale.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let q = b
        .input(TensorSpec {
            name: "q",
            dtype: DType::Int8,
            shape: vec![1, 1, 4, 64],
        })
        .unwrap();
    let s = b
        .input(TensorSpec {
            name: "s",
            dtype: DType::Float16,
            shape: vec![1],
        })
        .unwrap();
    let y = b
        .op(
            "dequantize",
            "y",
            &[("input", &q), ("scale", &s)],
            DType::Float16,
            &[1, 1, 4, 64],
        )
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    assert!(matches!(
        Interpreter::new(&bytes),
        Err(ProgramError::Unsupported(_))
    ));

    // Inputs: wrong length, wrong type, unknown name, missing, duplicated, wrong output buffer.
    let d = desc(Variant::I8I8, 64, 32, 8, 0, false);
    let it = Interpreter::new(&emit_model(&d).unwrap()).unwrap();
    let w = vec![0i8; 8 * 32];
    let x = vec![0i8; 32 * 64];
    let xf = vec![f16::ZERO; 32 * 64];
    let bad = |r: Result<Vec<f16>, ProgramError>| matches!(r, Err(ProgramError::BadInputs(_)));
    assert!(bad(it.run(
        &[("w", TensorRef::Int8(&w)), ("x", TensorRef::Int8(&x[1..]))],
        1
    )));
    assert!(bad(it.run(
        &[("w", TensorRef::Int8(&w)), ("x", TensorRef::Float16(&xf))],
        1
    )));
    assert!(bad(it.run(
        &[("w", TensorRef::Int8(&w)), ("z", TensorRef::Int8(&x))],
        1
    )));
    assert!(bad(it.run(&[("w", TensorRef::Int8(&w))], 1)));
    assert!(bad(it.run(
        &[
            ("w", TensorRef::Int8(&w)),
            ("w", TensorRef::Int8(&w)),
            ("x", TensorRef::Int8(&x))
        ],
        1
    )));
    let mut out = vec![f16::ZERO; 3];
    assert!(matches!(
        it.run_into(
            &[("w", TensorRef::Int8(&w)), ("x", TensorRef::Int8(&x))],
            1,
            &mut out
        ),
        Err(ProgramError::BadInputs(_))
    ));
    assert!(
        it.run(&[("w", TensorRef::Int8(&w)), ("x", TensorRef::Int8(&x))], 0)
            .is_ok(),
        "0 threads means 1"
    );
}

#[test]
fn interpreter_runs_other_ops_it_knows() {
    // cast, transpose, matmul with a transpose flag and batch broadcast: y = (cast(q)ᵀ · x)ᵀ.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let q = b
        .input(TensorSpec {
            name: "q",
            dtype: DType::Int8,
            shape: vec![1, 3, 2],
        })
        .unwrap();
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![2, 3, 4],
        })
        .unwrap();
    let to = b.string("to", "fp16").unwrap();
    let qh = b
        .op(
            "cast",
            "qh",
            &[("x", &q), ("dtype", &to)],
            DType::Float16,
            &[1, 3, 2],
        )
        .unwrap();
    let tx = b.scalar_bool("tx", true).unwrap();
    let mm = b
        .op(
            "matmul",
            "mm",
            &[("x", &qh), ("y", &x), ("transpose_x", &tx)],
            DType::Float16,
            &[2, 2, 4],
        )
        .unwrap();
    let perm = b.ints("perm", &[0, 2, 1]).unwrap();
    let y = b
        .op(
            "transpose",
            "y",
            &[("x", &mm), ("perm", &perm)],
            DType::Float16,
            &[2, 4, 2],
        )
        .unwrap();
    let bytes = b.finish(&y).unwrap().model.encode_to_vec();
    let it = Interpreter::new(&bytes).unwrap();
    let qv: Vec<i8> = vec![1, 2, 3, 4, 5, 6]; // [3,2]
    let xv: Vec<f16> = (0..24).map(|i| f16::from_f32(i as f32)).collect(); // [2,3,4]
    let out = it
        .run(
            &[("q", TensorRef::Int8(&qv)), ("x", TensorRef::Float16(&xv))],
            1,
        )
        .unwrap();
    for bch in 0..2 {
        for n in 0..2 {
            for m in 0..4 {
                let want: f32 = (0..3)
                    .map(|k| f32::from(qv[k * 2 + n]) * (bch * 12 + k * 4 + m) as f32)
                    .sum();
                assert_eq!(
                    out[bch * 8 + m * 2 + n].to_f32(),
                    want,
                    "batch {bch} n {n} m {m}"
                );
            }
        }
    }
}

#[test]
fn built_program_exposes_blobs_only_when_needed() {
    for d in all_small() {
        let b = build_program(&d).unwrap();
        assert!(b.weights.is_none() && b.blobs.is_empty());
    }
}

#[test]
fn w8f16_leaves_out_reshapes_that_keep_the_shape() {
    let ops = |d: &ProgramDesc| -> Vec<String> {
        ggml_coreml_program::emit::mil_text(&build_program(d).unwrap())
            .lines()
            .filter_map(|l| l.split(" = ").nth(1))
            .map(|r| r.split('(').next().unwrap_or("").to_string())
            .collect()
    };
    // N = 1, K = G: [1,1,N,K] is already [1,N,K/G,G], the scales already [1,N,K/G,1].
    assert_eq!(
        ops(&desc(Variant::W8F16, 64, 32, 1, 32, true)),
        [
            "const",
            "dequantize",
            "mul",
            "add",
            "const",
            "const",
            "matmul"
        ]
    );
    // Either one more row or one more block needs the reshapes.
    for d in [
        desc(Variant::W8F16, 64, 32, 2, 32, true),
        desc(Variant::W8F16, 64, 64, 1, 32, true),
    ] {
        assert_eq!(ops(&d).iter().filter(|o| *o == "reshape").count(), 4, "{d}");
    }
}

#[test]
fn mil_text_shows_the_program() {
    let d = desc(Variant::W8F16, 512, 4096, 4096, 32, true);
    let text = ggml_coreml_program::emit::mil_text(&build_program(&d).unwrap());
    assert!(
        text.starts_with("func main<CoreML9>(w: int8[1,1,4096,4096], scales: fp16[1,1,4096,128]")
    );
    assert!(text.contains("wg_shape: int32[4] = const([1, 4096, 128, 32])"));
    assert!(text.contains("wo: fp16[1,4096,128,32] = add(x = ws, y = og)"));
    let i = ggml_coreml_program::emit::mil_text(
        &build_program(&desc(Variant::I8I8, 64, 4096, 64, 0, false)).unwrap(),
    );
    assert!(i.contains("scale: fp16[] = const(0.015625)"));
}
