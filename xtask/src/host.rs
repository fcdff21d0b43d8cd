//! `cargo xtask host`: a real llama.cpp host built from the tree vendored by PyPI's
//! `llama-cpp-python` sdist (ggml API v2), laid out as
//! `<root>/host/llama-cpp-python-<ver>/{src,build}` with binaries in `build/bin`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::log;
use crate::paths;
use crate::util::{self, Timer};

/// The pinned sdist; its `vendor/llama.cpp` is llama.cpp 0c1e57098 (ggml 0.25.3).
pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";

/// Configure flags (build-and-test-environment.md §1.2). ccache is picked up by ggml itself.
pub const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    // llama-server and ggml-rpc-server (upstream's rpc-server) are tools users run (the `serve` and `rpc` stages).
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_RPC=ON",
];

/// Build targets; each is an executable of the same name in `build/bin`.
pub const TARGETS: &[&str] = &[
    "llama-bench",
    "llama-simple",
    "llama-completion",
    "llama-quantize",
    "llama-perplexity",
    "test-backend-ops",
    "test-llama-archs",
    "llama-eval-callback",
    "llama-embedding",
    "llama-server",
    "ggml-rpc-server",
];

const MARKER: &str = ".ggml-coreml-host-ok";

/// The recipe the marker records; any change here makes `ensure_host` rebuild.
pub fn recipe() -> String {
    format!(
        "llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}\ngenerator: Ninja\ncmake: {}\ntargets: {}\n",
        CMAKE_FLAGS.join(" "),
        TARGETS.join(" ")
    )
}

fn marker_path() -> PathBuf {
    paths::host_build_dir().join(MARKER)
}

fn lock_path() -> PathBuf {
    paths::host_dir().with_extension("lock")
}

fn missing_binaries(bin: &Path) -> Vec<&'static str> {
    TARGETS
        .iter()
        .copied()
        .filter(|t| !bin.join(t).is_file())
        .collect()
}

fn marker_ok() -> bool {
    util::read_marker(&marker_path()).as_deref() == Some(recipe().as_str())
}

/// Makes sure the host is built and returns its `bin` dir. Reuses a build whose marker
/// matches the recipe; otherwise fetches/configures/builds only what is missing.
pub fn ensure_host(jobs: Option<usize>) -> Result<PathBuf> {
    let bin = paths::host_bin_dir();
    if marker_ok() && missing_binaries(&bin).is_empty() {
        return Ok(bin);
    }
    let _lock = util::lock(&lock_path(), "llama.cpp host")?;
    // Someone else may have finished while we waited.
    if marker_ok() && missing_binaries(&bin).is_empty() {
        return Ok(bin);
    }
    let total = Timer::start();
    ensure_build_tools()?;
    let src = ensure_src()?;
    let build = paths::host_build_dir();
    configure(&src, &build)?;
    let jobs = jobs.unwrap_or_else(util::default_jobs).max(1);
    let t = Timer::start();
    let mut cmd = Command::new("cmake");
    cmd.arg("--build")
        .arg(&build)
        .arg(format!("-j{jobs}"))
        .arg("--target")
        .args(TARGETS);
    util::run(&mut cmd)?;
    log!("host build step took {:.1} s", t.secs());
    let missing = missing_binaries(&bin);
    if !missing.is_empty() {
        bail!(
            "the build finished but {} lacks: {}",
            bin.display(),
            missing.join(", ")
        );
    }
    util::write_atomic(&marker_path(), recipe().as_bytes())?;
    log!("host ready in {:.1} s: {}", total.secs(), bin.display());
    Ok(bin)
}

/// cmake, ninja and a C++ compiler; installed through apt when we are root.
fn ensure_build_tools() -> Result<()> {
    let missing: Vec<&str> = ["cmake", "ninja", "g++"]
        .into_iter()
        .filter(|t| util::which(t).is_none())
        .collect();
    if missing.is_empty() {
        if util::which("ccache").is_none() {
            log!("ccache not found: the host builds without a compiler cache");
        }
        return Ok(());
    }
    let install = "apt-get update && apt-get install -y cmake ninja-build ccache g++";
    if !util::is_root() || util::which("apt-get").is_none() {
        bail!(
            "missing build tools ({}); install them with: sudo sh -c '{install}'",
            missing.join(", ")
        );
    }
    log!("installing build tools ({})", missing.join(", "));
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "cmake", "ninja-build", "ccache", "g++"]),
    )?;
    Ok(())
}

/// The sdist's `vendor/llama.cpp`, extracted to `src/` (atomically: extract aside, then rename).
fn ensure_src() -> Result<PathBuf> {
    let src = paths::host_src_dir();
    if !src.join("CMakeLists.txt").is_file() {
        let sdist = download_sdist()?;
        let t = Timer::start();
        let scratch = paths::host_dir().join(".extract");
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch)?;
        util::run(
            Command::new("tar")
                .arg("xzf")
                .arg(&sdist)
                .arg("-C")
                .arg(&scratch),
        )?;
        let vendored = scratch
            .join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"))
            .join("vendor")
            .join("llama.cpp");
        if !vendored.join("CMakeLists.txt").is_file() {
            bail!("{} has no vendor/llama.cpp/CMakeLists.txt", sdist.display());
        }
        let _ = fs::remove_dir_all(&src);
        fs::rename(&vendored, &src)
            .with_context(|| format!("cannot move the tree to {}", src.display()))?;
        let _ = fs::remove_dir_all(&scratch);
        log!(
            "extracted llama.cpp to {} in {:.1} s",
            src.display(),
            t.secs()
        );
    }
    // The sdist ships a gitlink to a folder it lacks; CMake then makes the missing git index a
    // dependency and ninja loops ("build.ninja still dirty after 100 tries").
    let gitlink = src.join(".git");
    if gitlink.is_file() {
        fs::remove_file(&gitlink)
            .with_context(|| format!("cannot remove {}", gitlink.display()))?;
    }
    Ok(src)
}

/// `pip download` of the sdist into the downloads cache (reused when present).
fn download_sdist() -> Result<PathBuf> {
    let dir = paths::downloads_dir().join(format!("llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"));
    let file = dir.join(format!(
        "llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    ));
    if file.is_file() {
        return Ok(file);
    }
    fs::create_dir_all(&dir)?;
    let t = Timer::start();
    // Only this package may be forced to source: `--no-binary :all:` hangs building pip's own
    // build backend dependencies.
    util::run(
        Command::new(util::base_python())
            .args(["-m", "pip", "download", "--no-deps"])
            .args(["--no-binary", "llama-cpp-python"])
            .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"))
            .arg("-d")
            .arg(&dir),
    )?;
    if !file.is_file() {
        bail!("pip did not produce {}", file.display());
    }
    log!("downloaded the sdist in {:.1} s", t.secs());
    Ok(file)
}

/// Runs the configure step unless the existing cache already has exactly our flags.
fn configure(src: &Path, build: &Path) -> Result<()> {
    if configured_with_recipe(src, build) {
        return Ok(());
    }
    let t = Timer::start();
    let mut cmd = Command::new("cmake");
    cmd.arg("-S")
        .arg(src)
        .arg("-B")
        .arg(build)
        .args(["-G", "Ninja"])
        .args(CMAKE_FLAGS);
    util::run(&mut cmd)?;
    log!("configured in {:.1} s", t.secs());
    Ok(())
}

fn configured_with_recipe(src: &Path, build: &Path) -> bool {
    let Ok(cache) = fs::read_to_string(build.join("CMakeCache.txt")) else {
        return false;
    };
    if !build.join("build.ninja").is_file() {
        return false;
    }
    let value = |key: &str| {
        cache.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.split(':').next() == Some(key)).then(|| v.to_string())
        })
    };
    let src_ok = value("CMAKE_HOME_DIRECTORY")
        .map(|home| Path::new(&home) == src)
        .unwrap_or(false);
    let gen_ok = value("CMAKE_GENERATOR").as_deref() == Some("Ninja");
    let flags_ok = CMAKE_FLAGS.iter().all(|flag| {
        let Some((k, v)) = flag.trim_start_matches("-D").split_once('=') else {
            return false;
        };
        value(k).as_deref() == Some(v)
    });
    src_ok && gen_ok && flags_ok
}

/// `cargo xtask host --check`: prints the state of each piece, builds nothing.
/// Returns the bin dir when the host is ready.
pub fn check() -> Result<PathBuf> {
    let src = paths::host_src_dir();
    let build = paths::host_build_dir();
    let bin = paths::host_bin_dir();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let tools: Vec<String> = ["cmake", "ninja", "g++", "ccache", "tar"]
        .iter()
        .map(|t| format!("{t}={}", yes_no(util::which(t).is_some())))
        .collect();
    println!("cache root:   {}", paths::dev_cache_root().display());
    println!("tools:        {}", tools.join(" "));
    println!(
        "source:       {} ({})",
        src.display(),
        if src.join("CMakeLists.txt").is_file() {
            "present"
        } else {
            "missing"
        }
    );
    println!(
        "configured:   {}",
        yes_no(configured_with_recipe(&src, &build))
    );
    let missing = missing_binaries(&bin);
    println!(
        "binaries:     {}",
        if missing.is_empty() {
            "all present".to_string()
        } else {
            format!("missing {}", missing.join(", "))
        }
    );
    let marker = util::read_marker(&marker_path());
    println!(
        "marker:       {}",
        match &marker {
            None => "absent",
            Some(m) if *m == recipe() => "matches the recipe",
            Some(_) => "stale (recipe changed)",
        }
    );
    if util::is_locked(&lock_path()) {
        println!(
            "busy:         another xtask holds {}",
            lock_path().display()
        );
    }
    if marker_ok() && missing.is_empty() {
        println!("status:       ready");
        Ok(bin)
    } else {
        println!("status:       not ready (run `cargo xtask host`)");
        bail!("host not ready")
    }
}
