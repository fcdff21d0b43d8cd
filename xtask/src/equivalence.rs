//! Stage `coreml-equivalence`: our emitted programs against what Apple's own tooling emits for the same
//! functions (issue #16 item 6).
//!
//! Every program variant (`i8i8`, which `i8i8r` runs too; `w8f16` with G 32 and 16, with and without
//! offsets; `f16`; `i8i8o` with c = min(32, K/8) outlier channels) is written at a set of shapes with
//! the emitter the executors use (`ggml_coreml_program::write_mlpackage`).
//! `tools/coreml_equivalence.py` then builds each function with coremltools' MIL builder from
//! docs/programs.md's listings, converts it with `ct.convert` at our spec version, and compares the two
//! `Model` protos op by op. A difference fails unless it is a row of docs/programs.md's "Known
//! differences from coremltools" table, which the script reads.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use ggml_coreml_program::{ProgramDesc, Variant, write_mlpackage};

use crate::test::Env;
use crate::{log, paths};

/// (M bucket, K, N) for every variant: the smallest program, K and N that are not multiples of 64
/// (K = 96 is 3 blocks of 32 and 6 of 16), Gemma-3-270M's FFN shape, a vocabulary-sized N that is
/// not a multiple of 64, and the ANE's 16384 limit on both axes at the largest bucket.
pub const SHAPES: &[(usize, usize, usize)] = &[
    (64, 32, 1),
    (64, 96, 7),
    (384, 640, 2048),
    (128, 4096, 1000),
    (4096, 16384, 16384),
];

/// Shapes only the variants without block scales take: K not a multiple of any block length.
pub const UNBLOCKED_SHAPES: &[(usize, usize, usize)] = &[(64, 100, 3)];

/// `w8f16` block configurations: (G, offsets).
pub const W8F16_CONFIGS: &[(usize, bool)] = &[(32, false), (32, true), (16, false), (16, true)];

/// `i8i8o`'s outlier channel budget C, the driver's default (`driver::DEFAULT_OUTLIERS` in
/// ggml-coreml-executor, `GGML_COREML_OUTLIERS`): c = min(C, K/8), as `driver::outlier_channels`.
pub const I8I8O_OUTLIERS: usize = 32;

/// Every program the stage compares, in a fixed order.
pub fn descs() -> Vec<ProgramDesc> {
    let mut v = Vec::new();
    let mut push = |variant, (m, k, n): (usize, usize, usize), group, offsets| {
        v.push(ProgramDesc {
            variant,
            m,
            k,
            n,
            group,
            offsets,
        })
    };
    for variant in Variant::ALL {
        match variant {
            Variant::W8F16 => {
                for &(g, o) in W8F16_CONFIGS {
                    for &s in SHAPES {
                        push(variant, s, g, o);
                    }
                }
            }
            Variant::I8I8 | Variant::F16 => {
                for &s in SHAPES.iter().chain(UNBLOCKED_SHAPES) {
                    push(variant, s, 0, false);
                }
            }
            // The outlier split takes one K part (K ≤ 16384, every shape here) and the driver's
            // c = min(32, K/8) outlier channels, K ≥ 8; no block scales, so the unblocked shape too.
            Variant::I8I8O => {
                for &s in SHAPES.iter().chain(UNBLOCKED_SHAPES) {
                    let k = s.1;
                    if k >= 8 {
                        push(variant, s, I8I8O_OUTLIERS.min(k / 8), false);
                    }
                }
            }
        }
    }
    v
}

/// The script next to the workspace's other tools.
fn script() -> PathBuf {
    paths::workspace_root().join("tools/coreml_equivalence.py")
}

/// The stage: emit, compare, and return the script's summary line. `GGML_COREML_EQUIVALENCE_DIR=<dir>`
/// writes the packages there and keeps them (to look at a difference by hand).
pub fn stage(env: &Env) -> Result<String> {
    if !env.python.is_file() {
        bail!(
            "no Python venv at {} (run `cargo xtask venv`: coremltools compares the programs)",
            env.python.display()
        );
    }
    if let Some(dir) = std::env::var_os("GGML_COREML_EQUIVALENCE_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        return compare_in(env, &dir);
    }
    let dir = std::env::temp_dir().join(format!("ggml-coreml-equivalence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = compare_in(env, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare_in(env: &Env, dir: &std::path::Path) -> Result<String> {
    let descs = descs();
    let mut pkgs = Vec::with_capacity(descs.len());
    for d in &descs {
        pkgs.push(write_mlpackage(d, dir).with_context(|| format!("emit {}", d.key()))?);
    }
    log!(
        "coreml-equivalence: {} programs emitted; comparing with coremltools' MIL builder + ct.convert",
        pkgs.len()
    );
    let mut c = Command::new(&env.python);
    c.arg(script())
        .arg("--doc")
        .arg(paths::workspace_root().join("docs/programs.md"))
        .args(&pkgs)
        .stdin(Stdio::null());
    log!(
        "$ {} {} --doc docs/programs.md <{} packages in {}>",
        env.python.display(),
        script().display(),
        pkgs.len(),
        dir.display()
    );
    let out = c
        .output()
        .with_context(|| format!("cannot start {}", env.python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .map(|l| l.trim_start_matches("summary:").trim().to_string());
    match (out.status.success(), summary) {
        (true, Some(s)) => Ok(s),
        (_, Some(s)) => bail!("{s}"),
        (_, None) => bail!(
            "tools/coreml_equivalence.py gave no summary ({}):\n{}",
            out.status,
            stderr.trim_end()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_valid_and_distinct() {
        let d = descs();
        for x in &d {
            x.validate().unwrap();
        }
        let mut keys: Vec<String> = d.iter().map(|x| x.key()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), d.len());
        assert!(d.iter().any(|x| x.k % 64 != 0 && x.n % 64 != 0));
        for v in Variant::ALL {
            assert!(d.iter().any(|x| x.variant == v), "{v} is not compared");
        }
    }
}
