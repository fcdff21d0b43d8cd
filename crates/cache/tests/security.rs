//! Refused directories: symlinks, world-writable, foreign-owned, read-only, uncreatable. Each leaves a
//! working memory-only cache and exactly one warning.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ggml_coreml_cache::{Built, Cache, CacheConfig, EntryKey, Lookup};

/// Opens `dir`, uses the cache a little, and returns the warnings it produced.
fn warnings_using(dir: &Path) -> (Cache, Vec<String>) {
    let (log, seen) = recording_log();
    let cache = Cache::open(CacheConfig::new(Some(dir.to_path_buf()), env()).with_log(log));
    let key = EntryKey::program(&desc(256, 256));
    for _ in 0..3 {
        let (e, how) = cache
            .get_or_build(&key, |_| {
                Ok::<_, ()>(Built::Blob {
                    note: "ane".into(),
                    bytes: b"p".to_vec(),
                })
            })
            .unwrap();
        assert_eq!(e.blob(), Some(&b"p"[..]), "memory-only still builds");
        if cache.dir().is_none() {
            assert_eq!(how, Lookup::Built { stored: false });
        }
    }
    let _ = cache.put_blob(&key, "", b"x");
    let w = warnings(&seen);
    (cache, w)
}

fn assert_refused(dir: &Path, why: &str) {
    let (cache, w) = warnings_using(dir);
    assert!(cache.dir().is_none(), "{} was accepted", dir.display());
    assert_eq!(w.len(), 1, "exactly one warning, got {w:?}");
    assert!(
        w[0].contains(why),
        "warning {:?} does not say {why:?}",
        w[0]
    );
    assert!(w[0].contains(&dir.display().to_string()));
}

#[test]
fn symlinked_dir_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = t.path().join("link");
    symlink(&real, &link).unwrap();
    assert_refused(&link, "symlink");
    assert!(
        fs::read_dir(&real).unwrap().next().is_none(),
        "nothing written through the link"
    );
}

#[test]
fn world_writable_dir_is_refused_unless_sticky() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ww");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(&d, "world-writable");

    fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
    let (cache, w) = warnings_using(&d);
    assert!(
        cache.dir().is_some() && w.is_empty(),
        "sticky world-writable dir refused: {w:?}"
    );
}

#[test]
fn foreign_owned_dir_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("theirs");
    fs::create_dir(&d).unwrap();
    if !is_root() {
        eprintln!("skipped: chown to nobody needs root");
        return;
    }
    let st = Command::new("chown")
        .args(["nobody", &d.display().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_refused(&d, "owned by uid 65534");
}

#[test]
fn uncreatable_dir_is_memory_only() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    assert_refused(&file.join("cache"), "cannot be created");
    assert_refused(&file, "not a directory");
}

/// Child body: the read-only check, run as the owner of the directory (see below).
#[test]
fn child_read_only() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("read-only") {
        return;
    }
    let dir = PathBuf::from(std::env::var("CACHE_DIR").unwrap());
    let (cache, w) = warnings_using(&dir);
    println!(
        "RESULT disk={} warnings={} first={:?}",
        cache.dir().is_some(),
        w.len(),
        w.first()
    );
}

#[test]
fn read_only_dir_is_memory_only_with_one_warning() {
    let t = open_tempdir();
    let d = t.path().join("ro");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o555)).unwrap();
    if !is_root() {
        assert_refused(&d, "not writable");
        return;
    }
    // Root writes through mode bits, so run the check as an unprivileged owner of the directory.
    let have_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_setpriv {
        if std::env::var("GGML_COREML_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("setpriv (util-linux) is needed to drop root for this test");
        }
        eprintln!("skipped: running as root without setpriv");
        return;
    }
    assert!(
        Command::new("chown")
            .args(["nobody", &d.display().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The build tree may not be reachable by other users (e.g. under /root): run a copy from the temp dir.
    let exe = t.path().join("child-exe");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "child_read_only",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "read-only")
        .env("CACHE_DIR", &d)
        .env("HOME", t.path())
        .env("TMPDIR", t.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.split_once("RESULT").map(|x| x.1))
        .expect("child result");
    assert!(line.contains("disk=false"), "{line}");
    assert!(line.contains("warnings=1"), "{line}");
    assert!(line.contains("not writable"), "{line}");
}
