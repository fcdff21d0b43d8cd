//! `cargo xtask build`: the backend cdylib, copied to the name llama.cpp users expect
//! (`libggml-coreml.so` / `.dylib`, hyphenated like ggml's own backends).

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::log;
use crate::paths;
use crate::util::{self, Timer};

/// Builds `ggml-coreml` and returns the path of the hyphenated copy of the cdylib.
pub fn build_backend(release: bool) -> Result<PathBuf> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = paths::workspace_root();
    let t = Timer::start();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["build", "-p", "ggml-coreml"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    let target_dir = target_dir(&cargo)?;
    let profile_dir = target_dir.join(if release { "release" } else { "debug" });
    let (prefix, suffix) = (env::consts::DLL_PREFIX, env::consts::DLL_SUFFIX);
    let built = profile_dir.join(format!("{prefix}ggml_coreml{suffix}"));
    if !built.is_file() {
        bail!("cargo finished but {} is missing", built.display());
    }
    let copy = profile_dir.join(format!("{prefix}ggml-coreml{suffix}"));
    // Copy to a temp name and rename: a process that has the old library mapped keeps its inode.
    let tmp = util::tmp_path(&copy);
    fs::copy(&built, &tmp)
        .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
    fs::rename(&tmp, &copy).with_context(|| format!("cannot rename to {}", copy.display()))?;
    log!("backend built in {:.1} s", t.secs());
    Ok(copy)
}

/// The target dir cargo really uses (honours CARGO_TARGET_DIR and config files).
fn target_dir(cargo: &str) -> Result<PathBuf> {
    let out = util::output(
        Command::new(cargo)
            .current_dir(paths::workspace_root())
            .args(["metadata", "--format-version", "1", "--no-deps"]),
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&out).context("cannot parse `cargo metadata` output")?;
    meta.get("target_directory")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .context("`cargo metadata` has no target_directory")
}
