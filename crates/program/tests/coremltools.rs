//! Every variant over a set of shapes, emitted as packages and loaded by coremltools' MIL loader
//! (`tools/validate_mlpackage.py`, one Python process for all of them).
//!
//! Needs `GGML_COREML_PYTHON` (a python with coremltools and numpy). Unset: prints `skipped: …`
//! and passes, unless `GGML_COREML_REQUIRE_EXTERNAL=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use ggml_coreml_program::mil::{ConstData, ProgramBuilder};
use ggml_coreml_program::{
    ANE_MAX_DIM, DType, ProgramDesc, SplitPlan, TensorSpec, Variant, write_mlpackage, write_package,
};
use half::f16;
use sha2::{Digest, Sha256};

fn python() -> Option<String> {
    match std::env::var("GGML_COREML_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var("GGML_COREML_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
                panic!("GGML_COREML_PYTHON is not set and GGML_COREML_REQUIRE_EXTERNAL=1");
            }
            eprintln!("skipped: GGML_COREML_PYTHON is not set (a python with coremltools)");
            None
        }
    }
}

fn d(variant: Variant, m: usize, k: usize, n: usize, group: usize, offsets: bool) -> ProgramDesc {
    ProgramDesc {
        variant,
        m,
        k,
        n,
        group,
        offsets,
    }
}

fn descs() -> Vec<ProgramDesc> {
    use Variant::*;
    let max = ANE_MAX_DIM;
    let mut v = vec![
        d(I8I8, 64, 256, 256, 0, false),
        d(I8I8, 512, 640, 2048, 0, false),
        d(I8I8, 384, 4096, 14336, 0, false),
        d(I8I8, 4096, max, max, 0, false),
        d(I8I8, 64, 32, 1, 0, false),
        d(W8F16, 64, 256, 96, 32, false),
        // N = 1, K = G: the form without reshapes.
        d(W8F16, 64, 32, 1, 32, true),
        d(W8F16, 512, 4096, 4096, 32, true),
        d(W8F16, 1536, 2048, 640, 16, false),
        d(W8F16, 128, max, max, 16, true),
        d(F16, 64, 64, 64, 0, false),
        d(F16, 3072, max, 4096, 0, false),
        d(I8I8O, 64, 256, 96, 32, false),
        d(I8I8O, 512, 640, 2048, 32, false),
        d(I8I8O, 512, 2048, 640, 32, false),
        d(I8I8O, 64, 32, 1, 4, false),
        d(I8I8O, 512, 640, max, 32, false),
    ];
    // Split parts: K over the limit (i8i8, w8f16 with offsets) and N over the limit (vocab heads).
    for plan in [
        SplitPlan::new(I8I8, 700, 20480, 1024, 0, false, 256).unwrap(),
        SplitPlan::new(W8F16, 300, 32768, 512, 32, true, 256).unwrap(),
        SplitPlan::new(W8F16, 128, 640, 262144, 16, false, 128).unwrap(),
        SplitPlan::new(F16, 5000, 1024, 49152, 0, false, 1).unwrap(),
    ] {
        v.extend(plan.programs());
    }
    v.sort();
    v.dedup();
    v
}

/// A package with consts in `weight.bin`, and the sidecar the validator checks the blobs against.
fn baked_package(dir: &Path) -> PathBuf {
    let (n, k, m) = (64, 256, 64);
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, k, m],
        })
        .unwrap();
    let w: Vec<i8> = (0..n * k)
        .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
        .collect();
    let wq = b.constant("wq", &[1, 1, n, k], ConstData::Int8(w)).unwrap();
    let scales: Vec<f16> = (0..n)
        .map(|i| f16::from_f32(0.01 + i as f32 / 1000.0))
        .collect();
    let s = b
        .constant("row_scales", &[1, 1, n, 1], ConstData::Float16(scales))
        .unwrap();
    let one = b.scalar_f16("one", f16::ONE).unwrap();
    let wf = b
        .op(
            "dequantize",
            "wf",
            &[("input", &wq), ("scale", &one)],
            DType::Float16,
            &[1, 1, n, k],
        )
        .unwrap();
    let wh = b
        .op(
            "mul",
            "wh",
            &[("x", &wf), ("y", &s)],
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
    let built = b.finish(&y).unwrap();
    let pkg = write_package(&built, dir, "baked-weights").unwrap();
    let file = built.weights.as_ref().expect("blobs");
    let reader = ggml_coreml_program::blob::BlobReader::new(file).unwrap();
    let entries: Vec<serde_json::Value> = built
        .blobs
        .iter()
        .map(|e| {
            let (_, data) = reader.read(e.offset).unwrap();
            serde_json::json!({
                "offset": e.offset,
                "dtype": e.dtype.name(),
                "sha256": format!("{:x}", Sha256::digest(data)),
            })
        })
        .collect();
    assert_eq!(entries.len(), 2);
    let sidecar = PathBuf::from(format!("{}.blobs.json", pkg.display()));
    std::fs::write(sidecar, serde_json::to_vec_pretty(&entries).unwrap()).unwrap();
    pkg
}

#[test]
fn coremltools_loads_every_emitted_package() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut pkgs: Vec<PathBuf> = descs()
        .iter()
        .map(|x| write_mlpackage(x, dir.path()).unwrap())
        .collect();
    pkgs.push(baked_package(dir.path()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/validate_mlpackage.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(&pkgs)
        .output()
        .expect("run the validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if !out.status.success() {
        panic!(
            "validator failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ok: Vec<&str> = stdout.lines().filter(|l| l.starts_with("OK ")).collect();
    assert_eq!(ok.len(), pkgs.len(), "one OK line per package");
    for l in &ok {
        assert!(l.contains("spec=10"), "{l}");
        // i8i8o: the int8 product and the outlier channels' product.
        let matmuls = if l.contains("/i8i8o-") {
            "matmul:2"
        } else {
            "matmul:1"
        };
        assert!(l.contains(matmuls), "{l}");
    }
    assert!(
        ok.iter()
            .any(|l| l.contains("i8i8-") && l.contains("dequantize:2"))
    );
    assert!(
        ok.iter()
            .any(|l| l.contains("g32o-") && l.contains("add:1") && l.contains("reshape:4"))
    );
    assert!(
        ok.iter()
            .any(|l| l.contains("baked-weights") && l.contains("blobs=2 verified"))
    );
}

#[test]
fn the_validator_rejects_broken_packages() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Declared matmul output shape disagrees with type inference.
    let mut b = ProgramBuilder::new(10, "CoreML9");
    let w = b
        .input(TensorSpec {
            name: "w",
            dtype: DType::Float16,
            shape: vec![1, 1, 8, 32],
        })
        .unwrap();
    let x = b
        .input(TensorSpec {
            name: "x",
            dtype: DType::Float16,
            shape: vec![1, 1, 32, 64],
        })
        .unwrap();
    let y = b
        .op(
            "matmul",
            "y",
            &[("x", &w), ("y", &x)],
            DType::Float16,
            &[1, 1, 8, 65],
        )
        .unwrap();
    let bad_shape = write_package(&b.finish(&y).unwrap(), dir.path(), "bad-shape").unwrap();
    // A blob whose bytes differ from what the sidecar says was written.
    let pkg = baked_package(dir.path());
    let sidecar = PathBuf::from(format!("{}.blobs.json", pkg.display()));
    let text = std::fs::read_to_string(&sidecar).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[0]["sha256"] = serde_json::json!("00");
    std::fs::write(&sidecar, v.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/validate_mlpackage.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&bad_shape)
        .arg(&pkg)
        .output()
        .expect("run the validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(!out.status.success());
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("FAIL ")).count(),
        2,
        "{stdout}"
    );
}
