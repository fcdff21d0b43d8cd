//! `cargo xtask host --v3`: a second conformance host with ggml backend API version 3 (ggml 0.26), so the
//! one backend binary is tested against both layouts it claims.
//!
//! The ggml 0.26 tree comes from crates.io's `llama-cpp-sys-2` 0.1.161 (fetched by cargo, never linked
//! into anything of ours). It carries the libraries but no tests, so `test-backend-ops` is compiled from
//! the v2 host's `tests/test-backend-ops.cpp` against the v3 headers (it uses only public ggml API).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, Timer};
use crate::{host, log, paths};

pub const CRATE: &str = "llama-cpp-sys-2";
pub const VERSION: &str = "0.1.161";

const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_BACKEND_DL=ON",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
];

fn dir() -> PathBuf {
    paths::dev_cache_root()
        .join("host")
        .join(format!("{CRATE}-{VERSION}"))
}

fn recipe() -> String {
    format!(
        "{CRATE} {VERSION}\n{}\ntargets: ggml-base ggml ggml-cpu + test-backend-ops.cpp (v2 tree) -O1\n",
        CMAKE_FLAGS.join(" ")
    )
}

/// Builds (or reuses) the v3 host; returns its bin dir (libggml-base.so.0.26.0, libggml-cpu.so,
/// test-backend-ops).
pub fn ensure_host_v3() -> Result<PathBuf> {
    let root = dir();
    let bin = root.join("build/bin");
    let marker = root.join("build/.ggml-coreml-host-ok");
    let done = || {
        util::read_marker(&marker).as_deref() == Some(recipe().as_str())
            && bin.join("test-backend-ops").is_file()
    };
    if done() {
        return Ok(bin);
    }
    fs::create_dir_all(&root)?;
    let _lock = util::lock(&root.join(".lock"), "v3 host")?;
    if done() {
        return Ok(bin);
    }
    let t = Timer::start();
    let v2_bin = host::ensure_host(None)?;
    let v2_src = v2_bin
        .parent()
        .and_then(Path::parent)
        .context("v2 host layout")?
        .join("src");
    let tree = fetch_tree(&root)?;
    let build = root.join("build");
    let mut cfg = Command::new("cmake");
    cfg.arg("-S")
        .arg(&tree)
        .arg("-B")
        .arg(&build)
        .args(["-G", "Ninja"])
        .args(CMAKE_FLAGS);
    util::run(&mut cfg)?;
    let jobs = util::default_jobs().max(1);
    util::run(
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .arg(format!("-j{jobs}"))
            .args(["--target", "ggml-base", "ggml", "ggml-cpu"]),
    )?;
    let mut gxx = Command::new("g++");
    gxx.args([
        "-O1",
        "-std=c++17",
        "-DGGML_SHARED",
        "-DGGML_BACKEND_SHARED",
    ])
    .arg(format!("-I{}", tree.join("ggml/include").display()))
    .arg(v2_src.join("tests/test-backend-ops.cpp"))
    .arg(format!("-L{}", bin.display()))
    .arg(format!("-Wl,-rpath,{}", bin.display()))
    .args(["-lggml", "-lggml-base", "-o"])
    .arg(bin.join("test-backend-ops"));
    util::run(&mut gxx)?;
    util::write_atomic(&marker, recipe().as_bytes())?;
    log!("v3 host ready in {:.1} s: {}", t.secs(), bin.display());
    Ok(bin)
}

/// Fetches the crate with cargo into the registry cache and returns its vendored llama.cpp tree.
fn fetch_tree(root: &Path) -> Result<PathBuf> {
    let proj = root.join("fetch");
    fs::create_dir_all(proj.join("src"))?;
    fs::write(
        proj.join("Cargo.toml"),
        format!(
            "[package]\nname = \"v3-host-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\n{CRATE} = {{ version = \"={VERSION}\", default-features = false }}\n\n[workspace]\n"
        ),
    )?;
    fs::write(proj.join("src/lib.rs"), "")?;
    let manifest = proj.join("Cargo.toml");
    util::run(
        Command::new("cargo")
            .arg("fetch")
            .arg("--manifest-path")
            .arg(&manifest),
    )?;
    let meta = util::output(
        Command::new("cargo")
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest),
    )?;
    let v: serde_json::Value = serde_json::from_str(&meta).context("cargo metadata output")?;
    let pkg = v["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == CRATE))
        .context("llama-cpp-sys-2 not in cargo metadata")?;
    let manifest_path = pkg["manifest_path"].as_str().context("manifest_path")?;
    let tree = Path::new(manifest_path)
        .parent()
        .context("crate dir")?
        .join("llama.cpp");
    if !tree.join("ggml/src/ggml-backend-impl.h").is_file() {
        bail!("{} does not hold a ggml tree", tree.display());
    }
    Ok(tree)
}
