//! Helpers shared by the cache acceptance tests: child processes, logs, fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use ggml_coreml_cache::{Cache, CacheConfig, EntryKey, EnvKey, LogFn, LogLevel, ProgramDesc};
use ggml_coreml_program::Variant;

/// Set in child processes: the role they play.
pub const CHILD_ENV: &str = "GGML_COREML_CACHE_TEST_CHILD";

pub fn env() -> EnvKey {
    EnvKey::new("24A335", "M3")
}

pub type Seen = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// A log that records every message.
pub fn recording_log() -> (LogFn, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |l, m: &str| s.lock().unwrap().push((l, m.to_owned()))),
        seen,
    )
}

pub fn warnings(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| *l == LogLevel::Warn)
        .map(|(_, m)| m.clone())
        .collect()
}

pub fn open(dir: &Path, env: EnvKey) -> Cache {
    let (log, _) = recording_log();
    Cache::open(CacheConfig::new(Some(dir.to_path_buf()), env).with_log(log))
}

pub fn desc(k: usize, n: usize) -> ProgramDesc {
    ProgramDesc {
        variant: Variant::I8I8,
        m: 512,
        k,
        n,
        group: 0,
        offsets: false,
    }
}

/// Deterministic content for a key, so readers can check what they got.
pub fn content_for(key: &EntryKey, len: usize) -> Vec<u8> {
    let seed = format!("{key:?}");
    let mut x: u64 = seed.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Spawns this test binary running only `test_name`, with `CHILD_ENV=role` and extra env vars.
pub fn spawn_child(
    test_name: &str,
    role: &str,
    vars: &[(&str, String)],
    stderr_piped: bool,
) -> Child {
    let exe = std::env::current_exe().expect("test exe");
    let mut cmd = Command::new(exe);
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped());
    cmd.stderr(if stderr_piped {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    cmd.spawn().expect("spawn child")
}

/// A temp directory traversable by other users (for the tests that drop privileges).
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

pub fn is_root() -> bool {
    ggml_coreml_cache::security::euid() == 0
}

/// All files under `p` (recursive).
pub fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
