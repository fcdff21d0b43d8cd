//! The interpreter reads programs written by coremltools itself (not only our emitter).
//! Needs `GGML_COREML_PYTHON`; skipped without it unless `GGML_COREML_REQUIRE_EXTERNAL=1`.

use std::process::Command;

use ggml_coreml_program::{Interpreter, TensorRef, read_package};
use half::f16;

#[test]
fn interpreter_runs_a_coremltools_built_program() {
    let py = match std::env::var("GGML_COREML_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            if std::env::var("GGML_COREML_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
                panic!("GGML_COREML_PYTHON is not set and GGML_COREML_REQUIRE_EXTERNAL=1");
            }
            eprintln!("skipped: GGML_COREML_PYTHON is not set (a python with coremltools)");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("ct.mlpackage");
    // y = matmul(dequantize(w, 1/8), dequantize(x, 1/8)) + 1, with int8 inputs (spec 10).
    let script = r#"
import sys, warnings, logging
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import numpy as np, coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
@mb.program(input_specs=[mb.TensorSpec((1, 1, 4, 32), dtype=types.int8), mb.TensorSpec((1, 1, 32, 64), dtype=types.int8)],
            opset_version=ct.target.iOS26)
def prog(w, x):
    s = np.float16(0.125)
    y = mb.matmul(x=mb.dequantize(input=w, scale=s), y=mb.dequantize(input=x, scale=s))
    return mb.add(x=y, y=np.float16(1.0), name="y")
m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS26,
               compute_precision=ct.precision.FLOAT16, skip_model_load=True)
m.save(sys.argv[1])
"#;
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(&pkg)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (bytes, weights) = read_package(&pkg).unwrap();
    let it = Interpreter::with_weights(&bytes, weights.as_deref()).unwrap();
    let w: Vec<i8> = (0..4 * 32).map(|i| (i % 11) as i8 - 5).collect();
    let x: Vec<i8> = (0..32 * 64).map(|i| (i % 7) as i8 - 3).collect();
    let names: Vec<String> = it.inputs().iter().map(|(n, _, _)| n.to_string()).collect();
    let y = it
        .run(
            &[
                (&names[0], TensorRef::Int8(&w)),
                (&names[1], TensorRef::Int8(&x)),
            ],
            1,
        )
        .unwrap();
    for r in 0..4 {
        for c in 0..64 {
            let dot: i32 = (0..32)
                .map(|t| i32::from(w[r * 32 + t]) * i32::from(x[t * 64 + c]))
                .sum();
            let want = f16::from_f64(dot as f64 / 64.0).to_f32() + 1.0;
            assert_eq!(y[r * 64 + c], f16::from_f32(want), "at {r},{c}");
        }
    }
}
