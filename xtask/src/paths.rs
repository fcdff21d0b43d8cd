//! Where xtask keeps things: the shared dev cache outside the repo, and the workspace itself.

use std::env;
use std::path::{Path, PathBuf};

/// Root of the shared developer cache:
/// `${GGML_COREML_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ggml-coreml-dev}`.
pub fn dev_cache_root() -> PathBuf {
    if let Some(dir) = non_empty_env("GGML_COREML_DEV_CACHE") {
        return PathBuf::from(dir);
    }
    let cache = non_empty_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty_env("HOME").map(|home| Path::new(&home).join(".cache")))
        // No HOME at all (odd CI sandboxes): fall back to the temp dir rather than the cwd.
        .unwrap_or_else(env::temp_dir);
    cache.join("ggml-coreml-dev")
}

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Downloaded registry artifacts (sdists, wheels), kept so rebuilds need no network.
pub fn downloads_dir() -> PathBuf {
    dev_cache_root().join("downloads")
}

/// `<root>/host/llama-cpp-python-<version>`: holds `src/` (the llama.cpp tree) and `build/`.
pub fn host_dir() -> PathBuf {
    dev_cache_root().join("host").join(format!(
        "llama-cpp-python-{}",
        crate::host::LLAMA_CPP_PYTHON_VERSION
    ))
}

/// The llama.cpp source tree vendored by the llama-cpp-python sdist.
pub fn host_src_dir() -> PathBuf {
    host_dir().join("src")
}

/// The CMake build directory of the host.
pub fn host_build_dir() -> PathBuf {
    host_dir().join("build")
}

/// Host binaries and shared libraries (`llama-bench`, `test-backend-ops`, `libggml-base.so`, …).
pub fn host_bin_dir() -> PathBuf {
    host_build_dir().join("bin")
}

/// The Python virtual environment (coremltools, gguf, numpy, matplotlib).
pub fn venv_dir() -> PathBuf {
    dev_cache_root().join("venv")
}

/// The venv's interpreter.
pub fn venv_python() -> PathBuf {
    if cfg!(windows) {
        venv_dir().join("Scripts").join("python.exe")
    } else {
        venv_dir().join("bin").join("python")
    }
}

/// Prepared GGUF models, named `<model>-<QUANT>.gguf`, with `models.json`.
pub fn models_dir() -> PathBuf {
    dev_cache_root().join("models")
}

fn non_empty_env(key: &str) -> Option<String> {
    env::var(key).ok().filter(|v| !v.is_empty())
}
