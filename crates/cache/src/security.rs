//! Checks on the cache directory before anything is read from or written to it.
//!
//! Programs loaded from the cache run on the Neural Engine with our process's rights, so a directory
//! somebody else can write into is refused: a symlink (could point anywhere), a world-writable directory
//! without the sticky bit, or a directory owned by another user.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Why a cache directory is refused. The message is shown to the user once.
#[derive(Debug, thiserror::Error)]
pub enum DirRefused {
    #[error("is a symlink; refusing it (point GGML_COREML_CACHE_DIR at the real directory)")]
    Symlink,
    #[error("is not a directory")]
    NotDir,
    #[error("is world-writable without the sticky bit (mode {0:o}); refusing it")]
    WorldWritable(u32),
    #[error("is owned by uid {owner}, not by this user (uid {me}); refusing it")]
    ForeignOwner { owner: u32, me: u32 },
    #[error("cannot be created: {0}")]
    Create(io::Error),
    #[error("cannot be inspected: {0}")]
    Stat(io::Error),
    #[error("is not writable: {0}")]
    NotWritable(io::Error),
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks one existing path (not following a final symlink).
pub fn check_dir(path: &Path) -> Result<(), DirRefused> {
    let md = fs::symlink_metadata(path).map_err(DirRefused::Stat)?;
    if md.file_type().is_symlink() {
        return Err(DirRefused::Symlink);
    }
    if !md.is_dir() {
        return Err(DirRefused::NotDir);
    }
    let mode = md.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(DirRefused::WorldWritable(mode & 0o7777));
    }
    let me = euid();
    if md.uid() != me {
        return Err(DirRefused::ForeignOwner {
            owner: md.uid(),
            me,
        });
    }
    Ok(())
}

/// Creates `path` (mode 0700, parents with default modes) when missing, then checks it.
pub fn ensure_dir(path: &Path) -> Result<(), DirRefused> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(DirRefused::Create)?;
            }
            match fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                // Another process created it first: fine, it is checked below like any existing dir.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DirRefused::Create(e)),
            }
        }
        Err(e) => return Err(DirRefused::Stat(e)),
    }
    check_dir(path)
}

/// Creates a subdirectory of an accepted root if missing; it must be a real directory we own.
pub fn ensure_subdir(path: &Path) -> Result<(), DirRefused> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(DirRefused::NotWritable(e)),
    }
    check_dir(path)
}
