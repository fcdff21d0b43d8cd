//! `cargo xtask cuda-bundle`: everything the hybrid face's CUDA run needs, packed into `.device/` in the
//! repository root (ignored by git), plus the one command to run there.
//!
//! CUDA is the closest stand-in for Metal on these machines: non-host buffers, asynchronous compute.
//! The bundle holds the llama.cpp tree the host is built from (pruned: no docs, no model files but the
//! Qwen2 vocabulary, no other GPU backends), our x86-64 release library, the Qwen3 generator and the
//! `gguf` wheel, and `run.sh`, which builds llama.cpp with `GGML_CUDA=ON`, generates two random Qwen3
//! models and writes a report to `$OUT`: policy `off` bit-identical to stock CUDA, policy `always` KLD,
//! the hybrid conformance run on `CoreML-CUDA0`, copies per offloaded node, and default-policy speed.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::{backend, host, log, paths, util, venv};

/// Top-level parts of the llama.cpp tree the CUDA build does not need.
const PRUNE: &[&str] = &[
    "docs",
    "media",
    "benches",
    "conversion",
    "scripts",
    "gguf-py",
    "models",
    ".github",
];
/// Backends other than CPU and CUDA.
const PRUNE_GGML: &[&str] = &[
    "ggml-cann",
    "ggml-et",
    "ggml-hexagon",
    "ggml-metal",
    "ggml-musa",
    "ggml-opencl",
    "ggml-openvino",
    "ggml-sycl",
    "ggml-virtgpu",
    "ggml-vulkan",
    "ggml-webgpu",
    "ggml-zdnn",
    "ggml-zendnn",
];

const RUN_SH: &str = include_str!("cuda_run.sh");

pub fn main(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty() || args == ["--help"],
        "cargo xtask cuda-bundle takes no arguments"
    );
    if args == ["--help"] {
        println!(
            "cargo xtask cuda-bundle\n  Packs .device/ (llama.cpp tree, libggml-coreml.so, generator, run.sh) and prints\n  the command for the lent GPU machine; see docs/architecture.md (hybrid face over CUDA)."
        );
        return Ok(());
    }
    let out = paths::workspace_root().join(".device");
    exclude_from_git(".device")?;
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    host::ensure_host(None)?;
    let src = paths::host_src_dir();
    let stage = std::env::temp_dir().join(format!("ggml-coreml-cuda-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let tree = stage.join("llama.cpp");
    util::run(Command::new("cp").arg("-a").arg(&src).arg(&tree))?;
    for p in PRUNE {
        let _ = fs::remove_dir_all(tree.join(p));
    }
    for p in PRUNE_GGML {
        let _ = fs::remove_dir_all(tree.join("ggml").join("src").join(p));
    }
    fs::create_dir_all(tree.join("models"))?;
    fs::copy(
        src.join("models").join("ggml-vocab-qwen2.gguf"),
        tree.join("models").join("ggml-vocab-qwen2.gguf"),
    )?;
    util::run(
        Command::new("tar")
            .arg("czf")
            .arg(out.join("llama.cpp.tgz"))
            .arg("-C")
            .arg(&stage)
            .arg("llama.cpp"),
    )?;
    let _ = fs::remove_dir_all(&stage);

    let lib = backend::build_backend(true)?;
    fs::copy(&lib, out.join("libggml-coreml.so"))?;
    let tools = paths::workspace_root().join("tools");
    for f in ["gen_qwen3_tiny.py", "two_models.c"] {
        fs::copy(tools.join(f), out.join(f))?;
    }
    fs::copy(
        paths::workspace_root()
            .join("tests")
            .join("data")
            .join("parity-text.txt"),
        out.join("text.txt"),
    )?;
    gguf_wheel(&out)?;
    fs::write(out.join("run.sh"), RUN_SH)?;

    let size = dir_size(&out)?;
    ensure!(
        size < 60 << 20,
        "the bundle is {:.1} MiB; the device run carries at most 64 MiB",
        size as f64 / (1 << 20) as f64
    );
    log!(
        "bundle ready: {} ({:.1} MiB)",
        out.display(),
        size as f64 / (1 << 20) as f64
    );
    println!(
        "On the lent GPU machine (the device tool's `run`), in one call:\n  \
         command: bash .device/run.sh\n  carry:   [\".device\"]\n  kind:    nvidia-h200 \
         (timeout_s 600)\nThe report comes back as $OUT/report.md and $OUT/report.json."
    );
    Ok(())
}

/// The `gguf` wheel the generator imports (pure Python; numpy is already on the GPU machine).
fn gguf_wheel(out: &Path) -> Result<()> {
    let pin = venv::REQUIREMENTS
        .iter()
        .find(|r| r.starts_with("gguf=="))
        .context("no gguf pin in the venv requirements")?;
    let dir = out.join("whl");
    fs::create_dir_all(&dir)?;
    util::run(
        Command::new(util::base_python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
            ])
            .arg(&dir)
            .arg(pin),
    )
}

fn exclude_from_git(entry: &str) -> Result<()> {
    let ex = paths::workspace_root()
        .join(".git")
        .join("info")
        .join("exclude");
    let text = fs::read_to_string(&ex).unwrap_or_default();
    let line = format!("/{entry}/");
    if !text.lines().any(|l| l == line) {
        if let Some(dir) = ex.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&ex, format!("{text}{line}\n"))?;
    }
    Ok(())
}

fn dir_size(p: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
