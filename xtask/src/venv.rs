//! `cargo xtask venv`: a Python virtual environment with coremltools (package validator),
//! gguf + numpy (model generation) and matplotlib (benchmark plots).

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::log;
use crate::paths;
use crate::util::{self, Timer};

/// Pinned requirements (versions that resolve together on PyPI for CPython 3.11).
pub const REQUIREMENTS: &[&str] = &[
    "coremltools==9.0",
    "gguf==0.19.0",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
];

const MARKER: &str = ".ggml-coreml-venv-ok";

fn recipe() -> String {
    format!("{}\n", REQUIREMENTS.join("\n"))
}

fn marker_ok() -> bool {
    util::read_marker(&paths::venv_dir().join(MARKER)).as_deref() == Some(recipe().as_str())
        && paths::venv_python().is_file()
}

/// Makes sure the venv exists with the pinned requirements; returns its python.
pub fn ensure_venv() -> Result<PathBuf> {
    let python = paths::venv_python();
    if marker_ok() {
        return Ok(python);
    }
    let dir = paths::venv_dir();
    // The lock lives beside the venv: `venv --clear` would wipe one inside it.
    let _lock = util::lock(&dir.with_extension("lock"), "Python venv")?;
    if marker_ok() {
        return Ok(python);
    }
    let t = Timer::start();
    let usable = python.is_file()
        && Command::new(&python)
            .args(["-c", "import sys; assert sys.version_info >= (3, 10)"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !usable {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)?;
        }
        // gemma's package and gguf use `X | Y` annotations: Python >= 3.10.
        util::run(
            Command::new(util::base_python())
                .args(["-m", "venv", "--clear"])
                .arg(&dir),
        )?;
        if !python.is_file() {
            bail!("`python3 -m venv` did not create {}", python.display());
        }
    }
    util::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(REQUIREMENTS),
    )?;
    // Fail here, not later in a test, if an import is broken.
    util::run(Command::new(&python).args([
        "-c",
        "import coremltools, gguf, numpy, matplotlib; print('venv imports ok: coremltools', coremltools.__version__, 'numpy', numpy.__version__)",
    ]))?;
    util::write_atomic(&dir.join(MARKER), recipe().as_bytes())?;
    log!("venv ready in {:.1} s: {}", t.secs(), python.display());
    Ok(python)
}
