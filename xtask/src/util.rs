//! Small helpers: logging to stderr, running tools, markers, locks, hashing.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fs4::fs_std::FileExt;
use sha2::{Digest, Sha256};

/// Progress goes to stderr so stdout stays clean for the final path.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}

/// Renders a command line for messages.
pub fn display_cmd(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let s = a.to_string_lossy();
        if s.contains(' ') || s.is_empty() {
            format!("'{s}'")
        } else {
            s.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs a tool with its stdout and stderr both sent to our stderr; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display_cmd(cmd);
    log!("$ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a tool with stdout+stderr captured into `log_path`; on failure shows the log's tail.
/// Returns the captured text.
pub fn run_logged(cmd: &mut Command, log_path: &Path) -> Result<String> {
    let line = display_cmd(cmd);
    log!("$ {line}  (log: {})", log_path.display());
    if let Some(parent) = log_path.parent() {
        fs::create_dir_all(parent)?;
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    fs::write(log_path, format!("$ {line}\n{text}"))
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        for l in tail.iter().rev() {
            eprintln!("  | {l}");
        }
        bail!(
            "`{line}` failed ({}); full log: {}",
            out.status,
            log_path.display()
        );
    }
    Ok(text)
}

/// Runs a tool and returns its stdout (trimmed); stderr passes through.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display_cmd(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Finds an executable on PATH.
pub fn which(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = name.as_ref();
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// Contents of a marker file, if it exists.
pub fn read_marker(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// Writes a file atomically (temp file + rename), so a crash never leaves a half marker.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = tmp_path(path);
    fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}

/// `dir/.name.tmp` next to `path`: same filesystem, so rename is atomic.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// An exclusive advisory lock held until dropped; serialises concurrent xtask runs
/// (e.g. two test jobs both asking for the host).
pub struct DirLock {
    _file: File,
}

pub fn lock(path: &Path, what: &str) -> Result<DirLock> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock {}", path.display()))?;
    if !file
        .try_lock_exclusive()
        .with_context(|| format!("cannot lock {}", path.display()))?
    {
        log!(
            "another xtask is preparing the {what}; waiting for {}",
            path.display()
        );
        file.lock_exclusive()
            .with_context(|| format!("cannot lock {}", path.display()))?;
    }
    Ok(DirLock { _file: file })
}

/// Whether someone holds the lock right now (for status output); never blocks.
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().write(true).open(path) else {
        return false;
    };
    matches!(file.try_lock_exclusive(), Ok(false))
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hex sha256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Concatenates `parts` into `out` and returns the sha256 of the result.
pub fn concat_files(parts: &[PathBuf], out: &Path) -> Result<String> {
    let mut dst = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in parts {
        let mut src =
            File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
        }
    }
    dst.sync_all()?;
    Ok(hex(&hasher.finalize()))
}

/// Hard-links `src` to `dst` (same filesystem, no extra space), copying if linking fails.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let tmp = tmp_path(dst);
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(src, &tmp).is_err() {
        fs::copy(src, &tmp)
            .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    }
    fs::rename(&tmp, dst).with_context(|| format!("cannot rename to {}", dst.display()))?;
    Ok(())
}

/// Wall-clock timer for the step reports.
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Self {
        Timer(Instant::now())
    }
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Number of parallel jobs to use by default.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Whether we run as root (may install system packages).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The interpreter used to bootstrap (venv creation, sdist download):
/// `GGML_COREML_BASE_PYTHON` or `python3`.
pub fn base_python() -> String {
    std::env::var("GGML_COREML_BASE_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}
