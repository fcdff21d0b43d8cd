//! The on-disk store: atomic writes, locks, verification, temp cleanup and LRU eviction.
//!
//! ```text
//! <root>/
//!   .lock                       global lock: shared while a staging area is created, exclusive for
//!                               maintenance (temp cleanup, eviction, clear)
//!   locks/<hash>.lock           one per key: held while building, committing or discarding that key
//!   tmp/<unique>.lock           held (flock) by the writer of tmp/<unique>/ for as long as it writes
//!   tmp/<unique>/               staging: `entry` (blob) or `data/` + `MANIFEST` (directory entry)
//!   programs/<env>/<key>.entry  blob entry
//!   programs/<env>/<key>.d/     directory entry: MANIFEST + data/
//!   artifacts/<env>/<model>/<quant>/<name>.entry|.d
//!   measurements/<env>/<name>.entry
//! ```
//! Entries are written whole in `tmp/`, fsynced, then renamed into place: a reader sees no entry or a
//! complete one. A writer killed at any point leaves only `tmp/` items whose lock is free; maintenance
//! removes them.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use fs4::fs_std::FileExt;
use sha2::{Digest, Sha256};

use crate::entry::{
    self, EntryKind, ManifestItem, OwnedEntry, ReadError, encode_manifest, entry_prefix,
    parse_manifest, read_entry,
};
use crate::hooks;
use crate::key::Class;
use crate::security::{self, DirRefused};

pub(crate) const BLOB_EXT: &str = "entry";
pub(crate) const DIR_EXT: &str = "d";
pub(crate) const MANIFEST: &str = "MANIFEST";
pub(crate) const DATA: &str = "data";

pub(crate) struct Disk {
    pub root: PathBuf,
    tmp: PathBuf,
    locks: PathBuf,
    global: PathBuf,
}

/// Holds the per-key lock; released on drop (closing the file releases the flock).
pub(crate) struct KeyLock {
    _file: File,
}

/// A staging area in `tmp/`, removed on drop unless committed.
pub(crate) struct Staging {
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    committed: bool,
}

impl Staging {
    pub fn data(&self) -> PathBuf {
        self.dir.join(DATA)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// What a read found.
pub(crate) enum Found {
    Blob(OwnedEntry),
    /// Directory entry: note and the path of its `data/` tree.
    Dir {
        note: String,
        data: PathBuf,
    },
}

/// An entry seen by a walk of the store.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub path: PathBuf,
    pub class: Class,
    pub is_dir: bool,
    pub bytes: u64,
    pub used: SystemTime,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

fn mkdirs(p: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

fn sync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Disk {
    /// Accepts `root` after the security checks and a write probe.
    pub fn open(root: &Path) -> Result<Disk, DirRefused> {
        security::ensure_dir(root)?;
        let disk = Disk {
            root: root.to_path_buf(),
            tmp: root.join("tmp"),
            locks: root.join("locks"),
            global: root.join(".lock"),
        };
        security::ensure_subdir(&disk.tmp)?;
        security::ensure_subdir(&disk.locks)?;
        for c in Class::ALL {
            security::ensure_subdir(&root.join(c.dir()))?;
        }
        // Writes can fail even where permission bits allow them (read-only mount): probe once.
        let probe = disk.tmp.join(format!("probe-{}", unique()));
        File::create(&probe)
            .and_then(|f| f.sync_all())
            .map_err(DirRefused::NotWritable)?;
        let _ = fs::remove_file(&probe);
        Ok(disk)
    }

    fn open_lock_file(p: &Path) -> io::Result<File> {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
    }

    /// Blocks until this process holds the lock of `full_key` (across processes and threads).
    pub fn key_lock(&self, full_key: &str) -> io::Result<KeyLock> {
        let name = &entry::hex(&entry::sha256(full_key.as_bytes()))[..24];
        let f = Self::open_lock_file(&self.locks.join(format!("{name}.lock")))?;
        FileExt::lock_exclusive(&f)?;
        Ok(KeyLock { _file: f })
    }

    /// Creates a staging area under the global shared lock, so maintenance never sees it unlocked.
    pub fn stage(&self) -> io::Result<Staging> {
        let global = Self::open_lock_file(&self.global)?;
        FileExt::lock_shared(&global)?;
        let u = unique();
        let lock_path = self.tmp.join(format!("{u}.lock"));
        let lock = Self::open_lock_file(&lock_path)?;
        if !FileExt::try_lock_exclusive(&lock)? {
            return Err(io::Error::other(
                "fresh staging lock is held by someone else",
            ));
        }
        let dir = self.tmp.join(&u);
        let staging = Staging {
            dir,
            lock_path,
            _lock: lock,
            committed: false,
        };
        fs::DirBuilder::new().mode(0o700).create(&staging.dir)?;
        drop(global);
        Ok(staging)
    }

    fn blob_path(&self, stem: &Path) -> PathBuf {
        self.root.join(with_ext(stem, BLOB_EXT))
    }

    fn dir_path(&self, stem: &Path) -> PathBuf {
        self.root.join(with_ext(stem, DIR_EXT))
    }

    /// Reads the entry at `stem`. `Ok(None)`: absent. `Err`: present but not valid (the caller discards it).
    pub fn read(&self, stem: &Path, full_key: &str) -> Result<Option<Found>, String> {
        let blob = self.blob_path(stem);
        match File::open(&blob) {
            Ok(f) => {
                let len = f.metadata().map_err(|e| e.to_string())?.len();
                return match read_entry(io::BufReader::new(f), len) {
                    Ok(e) if e.kind == EntryKind::Blob && e.key == full_key => {
                        touch(&blob);
                        Ok(Some(Found::Blob(e)))
                    }
                    Ok(e) if e.kind != EntryKind::Blob => {
                        Err("directory manifest stored as a blob".into())
                    }
                    Ok(e) => Err(format!("holds key {:?}", e.key)),
                    Err(e) => Err(e.to_string()),
                };
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.to_string()),
        }
        let dir = self.dir_path(stem);
        match fs::symlink_metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let note = verify_dir(&dir, full_key)?;
        touch(&dir.join(MANIFEST));
        Ok(Some(Found::Dir {
            note,
            data: dir.join(DATA),
        }))
    }

    /// Writes a blob entry atomically. The caller holds the key lock.
    pub fn write_blob(
        &self,
        _lock: &KeyLock,
        stem: &Path,
        full_key: &str,
        note: &str,
        payload: &[u8],
    ) -> io::Result<PathBuf> {
        let prefix = entry_prefix(EntryKind::Blob, full_key, note, payload)
            .map_err(|e| invalid(e.to_string()))?;
        let staging = self.stage()?;
        let tmp = staging.dir.join("entry");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&prefix)?;
            let half = payload.len() / 2;
            f.write_all(&payload[..half])?;
            f.flush()?;
            hooks::pause("mid-write");
            f.write_all(&payload[half..])?;
            f.sync_all()?;
        }
        hooks::pause("before-rename");
        let dest = self.blob_path(stem);
        let parent = dest.parent().expect("entry paths have a parent");
        mkdirs(parent)?;
        self.remove_path(&self.dir_path(stem));
        fs::rename(&tmp, &dest)?;
        sync_dir(parent)?;
        Ok(dest)
    }

    /// Turns a filled staging area into a directory entry. Returns the `data/` path of the entry in place
    /// (an already present valid entry wins over ours). The caller holds the key lock.
    pub fn commit_dir(
        &self,
        _lock: &KeyLock,
        staging: &mut Staging,
        stem: &Path,
        full_key: &str,
        note: &str,
    ) -> io::Result<PathBuf> {
        let data = staging.data();
        if !data.is_dir() {
            mkdirs(&data)?;
        }
        let items = scan_tree(&data, true)?;
        let manifest = encode_manifest(&items);
        let prefix = entry_prefix(EntryKind::DirManifest, full_key, note, &manifest)
            .map_err(|e| invalid(e.to_string()))?;
        {
            let mut f = File::create(staging.dir.join(MANIFEST))?;
            f.write_all(&prefix)?;
            hooks::pause("mid-write");
            f.write_all(&manifest)?;
            f.sync_all()?;
        }
        sync_dir(&staging.dir)?;
        hooks::pause("before-rename");
        let dest = self.dir_path(stem);
        let parent = dest.parent().expect("entry paths have a parent");
        mkdirs(parent)?;
        let blob = self.blob_path(stem);
        if blob.exists() {
            self.remove_path(&blob);
        }
        if fs::symlink_metadata(&dest).is_ok() {
            if verify_dir(&dest, full_key).is_ok() {
                return Ok(dest.join(DATA));
            }
            self.remove_path(&dest);
        }
        fs::rename(&staging.dir, &dest)?;
        staging.committed = true;
        sync_dir(parent)?;
        Ok(dest.join(DATA))
    }

    /// Removes whatever is stored at `stem` (both forms). The caller holds the key lock.
    pub fn remove(&self, _lock: &KeyLock, stem: &Path) {
        self.remove_path(&self.blob_path(stem));
        self.remove_path(&self.dir_path(stem));
    }

    /// Removes a file, or a directory by renaming it into `tmp/` first so no reader sees half of it.
    fn remove_path(&self, p: &Path) {
        match fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => {
                let trash = self.tmp.join(format!("trash-{}", unique()));
                if fs::rename(p, &trash).is_ok() {
                    let _ = fs::remove_dir_all(&trash);
                } else {
                    let _ = fs::remove_dir_all(p);
                }
            }
            Ok(_) => {
                let _ = fs::remove_file(p);
            }
            Err(_) => {}
        }
    }

    /// Every entry in the store (all env keys, all classes).
    pub fn walk(&self) -> Vec<Item> {
        let mut out = Vec::new();
        for class in Class::ALL {
            walk_into(&self.root.join(class.dir()), class, 0, &mut out);
        }
        out
    }

    /// Temp cleanup and LRU eviction down to 90 % of `cap` when the store is above `cap`. Skipped (returns
    /// `None`) when another process holds the global lock; paths in `keep` are never evicted.
    pub fn try_maintain(&self, cap: u64, keep: &[PathBuf]) -> io::Result<Option<(usize, u64)>> {
        let global = Self::open_lock_file(&self.global)?;
        if !FileExt::try_lock_exclusive(&global)? {
            return Ok(None);
        }
        self.clean_tmp();
        let mut items = self.walk();
        let mut total: u64 = items.iter().map(|i| i.bytes).sum();
        let mut removed = 0;
        if total > cap {
            items.sort_by_key(|i| i.used);
            let target = cap / 10 * 9;
            for it in items {
                if total <= target {
                    break;
                }
                if keep
                    .iter()
                    .any(|k| k == &it.path || k.starts_with(&it.path))
                {
                    continue;
                }
                self.remove_path(&it.path);
                total = total.saturating_sub(it.bytes);
                removed += 1;
            }
        }
        Ok(Some((removed, total)))
    }

    /// Removes staging areas whose writer is gone. Called with the global lock held exclusively, so every
    /// live writer's `tmp/<u>.lock` is locked.
    fn clean_tmp(&self) {
        let Ok(rd) = fs::read_dir(&self.tmp) else {
            return;
        };
        let names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        for name in &names {
            if let Some(u) = name.strip_suffix(".lock") {
                let lp = self.tmp.join(name);
                let Ok(f) = File::options().read(true).write(true).open(&lp) else {
                    continue;
                };
                if FileExt::try_lock_exclusive(&f).unwrap_or(false) {
                    self.remove_path(&self.tmp.join(u));
                    let _ = fs::remove_file(&lp);
                }
            } else if !names.contains(&format!("{name}.lock")) {
                // Trash, probes, or a staging area whose lock file is already gone.
                self.remove_path(&self.tmp.join(name));
            }
        }
    }

    /// Removes the given classes entirely. Waits up to `wait` for other processes' maintenance.
    pub fn clear(&self, classes: &[Class], wait: Duration) -> io::Result<usize> {
        let global = Self::open_lock_file(&self.global)?;
        let start = Instant::now();
        while !FileExt::try_lock_exclusive(&global)? {
            if start.elapsed() > wait {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the cache is busy (another process)",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut n = 0;
        for c in classes {
            let d = self.root.join(c.dir());
            let mut items = Vec::new();
            walk_into(&d, *c, 0, &mut items);
            n += items.len();
            self.remove_path(&d);
            security::ensure_subdir(&d).map_err(|e| io::Error::other(e.to_string()))?;
        }
        self.clean_tmp();
        Ok(n)
    }
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Marks an entry as used now (LRU order is mtime order).
fn touch(p: &Path) {
    if let Ok(f) = File::options().append(true).open(p) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn walk_into(dir: &Path, class: Class, depth: usize, out: &mut Vec<Item>) {
    // programs/<env>/<key>, artifacts/<env>/<model>/<quant>/<name>: never deeper than that.
    if depth > 4 {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        let name = e.file_name();
        let name = name.to_string_lossy();
        if md.is_file() && name.ends_with(&format!(".{BLOB_EXT}")) {
            let used = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(Item {
                path: p,
                class,
                is_dir: false,
                bytes: md.len(),
                used,
            });
        } else if md.is_dir() && name.ends_with(&format!(".{DIR_EXT}")) {
            let used = fs::symlink_metadata(p.join(MANIFEST))
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let bytes = tree_bytes(&p);
            out.push(Item {
                path: p,
                class,
                is_dir: true,
                bytes,
                used,
            });
        } else if md.is_dir() {
            walk_into(&p, class, depth + 1, out);
        }
    }
}

fn tree_bytes(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match fs::symlink_metadata(e.path()) {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Lists `root` as manifest items (sorted), hashing every file; symlinks and special files are refused.
/// With `sync`, every file is fsynced as it is hashed (files written by a builder may not be).
pub(crate) fn scan_tree(root: &Path, sync: bool) -> io::Result<Vec<ManifestItem>> {
    let mut items = Vec::new();
    scan_into(root, "", sync, &mut items)?;
    items.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(items)
}

fn scan_into(dir: &Path, prefix: &str, sync: bool, out: &mut Vec<ManifestItem>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|_| invalid("non-UTF-8 file name"))?;
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if !entry::is_safe_rel_path(&rel) {
            return Err(invalid(format!("unsafe file name {rel:?}")));
        }
        let md = fs::symlink_metadata(e.path())?;
        if md.is_dir() {
            out.push(ManifestItem::Dir(rel.clone()));
            scan_into(&e.path(), &rel, sync, out)?;
            if sync {
                sync_dir(&e.path())?;
            }
        } else if md.is_file() {
            let (len, sha256) = hash_file(&e.path(), sync)?;
            out.push(ManifestItem::File {
                path: rel,
                len,
                sha256,
            });
        } else {
            return Err(invalid(format!("{rel}: not a regular file or directory")));
        }
    }
    if sync {
        sync_dir(dir)?;
    }
    Ok(())
}

fn hash_file(p: &Path, sync: bool) -> io::Result<(u64, [u8; 32])> {
    let mut f = File::open(p)?;
    if sync {
        f.sync_all()?;
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, h.finalize().into()))
}

/// Checks a directory entry against its manifest; returns its note.
pub(crate) fn verify_dir(dir: &Path, full_key: &str) -> Result<String, String> {
    let mp = dir.join(MANIFEST);
    let f = File::open(&mp).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let m = read_entry(io::BufReader::new(f), len)
        .map_err(|e: ReadError| format!("{MANIFEST}: {e}"))?;
    if m.kind != EntryKind::DirManifest {
        return Err("manifest has the blob kind".into());
    }
    if m.key != full_key {
        return Err(format!("holds key {:?}", m.key));
    }
    let want = parse_manifest(&m.payload).map_err(|e| e.to_string())?;
    let have = scan_tree(&dir.join(DATA), false).map_err(|e| format!("{DATA}: {e}"))?;
    if want != have {
        return Err("files differ from the manifest".into());
    }
    Ok(m.note)
}

/// Reads an entry file's header, key and note without the payload (for listings).
pub(crate) fn peek(path: &Path) -> io::Result<(EntryKind, String, String, u64)> {
    let mut f = File::open(path)?;
    let mut head = [0u8; entry::HEADER_LEN];
    f.read_exact(&mut head)?;
    let h = entry::parse_header(&head).map_err(|e| invalid(e.to_string()))?;
    let mut kn = vec![0u8; h.key_len + h.note_len];
    f.read_exact(&mut kn)?;
    let key = String::from_utf8_lossy(&kn[..h.key_len]).into_owned();
    let note = String::from_utf8_lossy(&kn[h.key_len..]).into_owned();
    Ok((h.kind, key, note, h.payload_len))
}
