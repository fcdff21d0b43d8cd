//! Program, artifact and measurement cache: on disk (shared by processes) and in memory (per process).
//!
//! - [`Cache`]: the disk store behind one [`CacheConfig`]. It never fails to open: a directory that is
//!   refused (symlink, world-writable, foreign-owned), cannot be created or is not writable leaves a
//!   memory-only cache and exactly one warning through the [`LogFn`].
//! - [`EntryKey`] + [`EnvKey`]: what an entry depends on. Programs are keyed by program format version,
//!   OS build, chip, backend version and the shape ([`ProgramDesc::key`]); per-model artifacts also by a
//!   model id and quant type; measurements by a name.
//! - [`ReadyMap`]: the in-process `shape -> ready program` map, generic over what the executor keeps.
//! - [`gguf`]: a small, panic-free GGUF tensor-table reader (shapes for `cache warm`, model ids).
//!
//! Layout, entry format, invalidation and concurrency: `docs/shape-cache.md`.

pub mod entry;
pub mod gguf;
pub mod key;
pub mod memory;
pub mod security;

mod disk;
mod hooks;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

pub use ggml_coreml_program::ProgramDesc;
pub use key::{Class, EntryKey, EnvKey};
pub use memory::{ReadyMap, ReadyPrograms};

use disk::{Disk, Found};

/// Default size cap in MiB (`GGML_COREML_CACHE_MAX_MB` overrides).
pub const DEFAULT_MAX_MB: u64 = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

/// Where the cache reports. The ggml-coreml library routes this to ggml's log callback.
pub type LogFn = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// Logs warnings to stderr; the default.
pub fn stderr_log() -> LogFn {
    Arc::new(|level, msg| {
        if level >= LogLevel::Warn {
            eprintln!("ggml-coreml: warning: {msg}");
        }
    })
}

#[derive(Clone)]
pub struct CacheConfig {
    /// Disk directory; `None` means memory only.
    pub dir: Option<PathBuf>,
    /// Size cap of the disk store in bytes; least recently used entries are evicted above it.
    pub max_bytes: u64,
    pub env: EnvKey,
    pub log: LogFn,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

impl CacheConfig {
    /// A config for `dir` with the default cap and stderr logging.
    pub fn new(dir: Option<PathBuf>, env: EnvKey) -> CacheConfig {
        CacheConfig {
            dir,
            max_bytes: DEFAULT_MAX_MB << 20,
            env,
            log: stderr_log(),
        }
    }

    /// Directory from `GGML_COREML_CACHE_DIR` (`off` or empty: memory only) or the platform default; cap
    /// from `GGML_COREML_CACHE_MAX_MB`.
    pub fn from_env(env: EnvKey) -> CacheConfig {
        let dir = match std::env::var_os("GGML_COREML_CACHE_DIR") {
            Some(v) if v.is_empty() || v == "off" || v == "none" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => default_dir(),
        };
        let max_mb = std::env::var("GGML_COREML_CACHE_MAX_MB")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_MB);
        CacheConfig {
            max_bytes: max_mb.saturating_mul(1 << 20),
            ..CacheConfig::new(dir, env)
        }
    }

    pub fn with_log(mut self, log: LogFn) -> CacheConfig {
        self.log = log;
        self
    }

    pub fn with_max_bytes(mut self, max_bytes: u64) -> CacheConfig {
        self.max_bytes = max_bytes;
        self
    }
}

/// The platform's cache directory for us: macOS and iOS `$HOME/Library/Caches/ggml-coreml` (on iOS HOME is
/// the app container, so this is the app's Caches directory); elsewhere `$XDG_CACHE_HOME/ggml-coreml` or
/// `$HOME/.cache/ggml-coreml`.
pub fn default_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    if cfg!(target_vendor = "apple") {
        return home.map(|h| h.join("Library/Caches/ggml-coreml"));
    }
    // The XDG spec ignores relative values.
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|x| x.is_absolute())
    {
        return Some(x.join("ggml-coreml"));
    }
    home.map(|h| h.join(".cache/ggml-coreml"))
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no disk cache")]
    NoDisk,
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a program may run, stored as the note of its program entry so a refused program is not
/// compiled again every run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Ane,
    Declined(String),
}

impl Placement {
    pub fn to_note(&self) -> String {
        match self {
            Placement::Ane => "ane".to_owned(),
            Placement::Declined(r) => format!("declined: {r}"),
        }
    }

    pub fn from_note(note: &str) -> Option<Placement> {
        if note == "ane" {
            Some(Placement::Ane)
        } else {
            note.strip_prefix("declined: ")
                .map(|r| Placement::Declined(r.to_owned()))
        }
    }
}

/// A temp directory that is removed when the last [`EntryDir`] pointing into it is dropped (memory-only
/// builds and builds whose commit failed).
#[derive(Debug)]
struct TempDirGuard(PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The tree of a directory entry.
#[derive(Clone, Debug)]
pub struct EntryDir {
    path: PathBuf,
    _temp: Option<Arc<TempDirGuard>>,
}

impl EntryDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the tree lives in the disk cache (false: a process-private temp dir).
    pub fn is_cached(&self) -> bool {
        self._temp.is_none()
    }
}

#[derive(Clone, Debug)]
pub enum Payload {
    Blob(Vec<u8>),
    Dir(EntryDir),
}

/// A verified entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The full key it was stored under.
    pub key: String,
    /// Free text stored with the entry; for programs the [`Placement`] verdict (or empty).
    pub note: String,
    pub payload: Payload,
}

impl Entry {
    pub fn placement(&self) -> Option<Placement> {
        Placement::from_note(&self.note)
    }

    pub fn blob(&self) -> Option<&[u8]> {
        match &self.payload {
            Payload::Blob(b) => Some(b),
            Payload::Dir(_) => None,
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        match &self.payload {
            Payload::Dir(d) => Some(d.path()),
            Payload::Blob(_) => None,
        }
    }
}

/// What a builder produced: a blob, or the tree it wrote into the directory it was given.
#[derive(Clone, Debug)]
pub enum Built {
    Blob { note: String, bytes: Vec<u8> },
    Dir { note: String },
}

/// How [`Cache::get_or_build`] got its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Found valid on disk.
    Hit,
    /// Built now; `stored` is false when there is no disk cache or the write failed.
    Built { stored: bool },
}

/// Counters for this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub builds: u64,
    pub stored: u64,
    pub corrupt: u64,
    pub evicted: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    builds: AtomicU64,
    stored: AtomicU64,
    corrupt: AtomicU64,
    evicted: AtomicU64,
}

/// One entry as listed by [`Cache::list`].
#[derive(Clone, Debug)]
pub struct ListItem {
    pub class: Class,
    pub path: PathBuf,
    pub is_dir: bool,
    pub bytes: u64,
    pub last_used: SystemTime,
    /// Full key from the header; empty when the header is unreadable.
    pub key: String,
    pub note: String,
    /// Written under this process's env key (others are stale: another OS build, chip or version).
    pub current_env: bool,
    /// Set by a verifying listing.
    pub valid: Option<bool>,
}

struct Inner {
    env: EnvKey,
    env_full: String,
    disk: Option<Disk>,
    max_bytes: u64,
    log: LogFn,
    warned: AtomicBool,
    counters: Counters,
    /// Approximate bytes on disk: measured by a walk on the first write, then grown by our writes; a
    /// walk + eviction runs when it passes the cap.
    approx_bytes: Mutex<Option<u64>>,
    temp_seq: AtomicU64,
}

/// The cache. Cheap to clone; shared by threads.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir())
            .field("env", &self.inner.env)
            .finish()
    }
}

impl Cache {
    /// Opens the cache. Never fails: without a usable directory the cache is memory-only and one warning
    /// says why.
    pub fn open(config: CacheConfig) -> Cache {
        let mut warned = false;
        let disk = match &config.dir {
            None => None,
            Some(dir) => match Disk::open(dir) {
                Ok(d) => Some(d),
                Err(why) => {
                    (config.log)(
                        LogLevel::Warn,
                        &format!(
                            "cache directory {} {why}; continuing without a disk cache (programs are rebuilt \
                             every run)",
                            dir.display()
                        ),
                    );
                    warned = true;
                    None
                }
            },
        };
        let cache = Cache {
            inner: Arc::new(Inner {
                env_full: config.env.full(),
                env: config.env,
                disk,
                max_bytes: config.max_bytes,
                log: config.log,
                warned: AtomicBool::new(warned),
                counters: Counters::default(),
                approx_bytes: Mutex::new(None),
                temp_seq: AtomicU64::new(0),
            }),
        };
        if let Some(d) = &cache.inner.disk {
            cache.log(
                LogLevel::Debug,
                &format!("cache at {} ({})", d.root.display(), cache.inner.env),
            );
        }
        cache
    }

    /// A cache without disk store.
    pub fn memory_only(env: EnvKey) -> Cache {
        Cache::open(CacheConfig::new(None, env))
    }

    /// The disk directory, when there is a disk cache.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.disk.as_ref().map(|d| d.root.as_path())
    }

    pub fn env(&self) -> &EnvKey {
        &self.inner.env
    }

    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            builds: c.builds.load(Ordering::Relaxed),
            stored: c.stored.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
        }
    }

    fn log(&self, level: LogLevel, msg: &str) {
        (self.inner.log)(level, msg);
    }

    /// Disk trouble after open is reported once per cache as a warning, then at debug level.
    fn disk_trouble(&self, msg: &str) {
        let first = !self.inner.warned.swap(true, Ordering::Relaxed);
        self.log(
            if first {
                LogLevel::Warn
            } else {
                LogLevel::Debug
            },
            &format!("cache: {msg}"),
        );
    }

    /// The full key of `key` under this cache's env key (as stored in the entry header).
    pub fn full_key(&self, key: &EntryKey) -> String {
        key.full(&self.inner.env)
    }

    /// The entry's path relative to the cache root, without the `.entry`/`.d` suffix.
    pub fn rel_stem(&self, key: &EntryKey) -> PathBuf {
        key.rel_stem(&self.inner.env)
    }

    /// A verified entry, or `None` (absent, no disk cache, or corrupt: a corrupt entry is deleted so the
    /// caller rebuilds it).
    pub fn get(&self, key: &EntryKey) -> Option<Entry> {
        let r = self.get_inner(key);
        let c = &self.inner.counters;
        if r.is_some() { &c.hits } else { &c.misses }.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn get_inner(&self, key: &EntryKey) -> Option<Entry> {
        let disk = self.inner.disk.as_ref()?;
        let full = self.full_key(key);
        let stem = self.rel_stem(key);
        match disk.read(&stem, &full) {
            Ok(found) => found.map(|f| found_entry(full, f)),
            Err(why) => {
                // Re-check under the key lock: a writer may have replaced it meanwhile.
                let lock = match disk.key_lock(&full) {
                    Ok(l) => l,
                    Err(e) => {
                        self.disk_trouble(&format!("lock for {key}: {e}"));
                        return None;
                    }
                };
                match disk.read(&stem, &full) {
                    Ok(found) => found.map(|f| found_entry(full, f)),
                    Err(_) => {
                        self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                        self.log(
                            LogLevel::Info,
                            &format!("cache: discarded invalid entry for {key}: {why}"),
                        );
                        disk.remove(&lock, &stem);
                        None
                    }
                }
            }
        }
    }

    /// True when a valid entry exists (verifies it).
    pub fn contains(&self, key: &EntryKey) -> bool {
        self.get_inner(key).is_some()
    }

    /// Stores a blob entry (atomically; replaces any entry under the key).
    pub fn put_blob(&self, key: &EntryKey, note: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let full = self.full_key(key);
        let lock = disk.key_lock(&full).map_err(io_err(&disk.root))?;
        let path = disk
            .write_blob(&lock, &self.rel_stem(key), &full, note, bytes)
            .map_err(io_err(&disk.root))?;
        drop(lock);
        self.after_write(&path, bytes.len() as u64);
        Ok(())
    }

    /// Stores a copy of the tree at `src` as a directory entry; returns the entry (its tree in the cache).
    pub fn put_dir(&self, key: &EntryKey, note: &str, src: &Path) -> Result<Entry, CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let full = self.full_key(key);
        let mut staging = disk.stage().map_err(io_err(&disk.root))?;
        copy_tree(src, &staging.data()).map_err(io_err(src))?;
        let lock = disk.key_lock(&full).map_err(io_err(&disk.root))?;
        let data = disk
            .commit_dir(&lock, &mut staging, &self.rel_stem(key), &full, note)
            .map_err(io_err(&disk.root))?;
        drop(lock);
        let bytes = tree_size(&data);
        self.after_write(&data, bytes);
        Ok(Entry {
            key: full,
            note: note.to_owned(),
            payload: Payload::Dir(EntryDir {
                path: data,
                _temp: None,
            }),
        })
    }

    /// Removes the entry under `key`, if any.
    pub fn remove(&self, key: &EntryKey) -> Result<(), CacheError> {
        let Some(disk) = self.inner.disk.as_ref() else {
            return Ok(());
        };
        let full = self.full_key(key);
        let lock = disk.key_lock(&full).map_err(io_err(&disk.root))?;
        disk.remove(&lock, &self.rel_stem(key));
        Ok(())
    }

    /// The entry under `key`, building it when absent. Across processes one builder runs per key at a time
    /// (the others wait for its entry). `build` gets an empty directory to fill for a directory entry (or
    /// returns a blob). Cache trouble never fails the call: the built entry is returned unstored (its
    /// tree then lives in a temp dir removed when the last [`EntryDir`] is dropped).
    pub fn get_or_build<E>(
        &self,
        key: &EntryKey,
        build: impl FnOnce(&Path) -> Result<Built, E>,
    ) -> Result<(Entry, Lookup), E> {
        let c = &self.inner.counters;
        if let Some(e) = self.get_inner(key) {
            c.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((e, Lookup::Hit));
        }
        c.misses.fetch_add(1, Ordering::Relaxed);
        let full = self.full_key(key);
        let Some(disk) = self.inner.disk.as_ref() else {
            return self.build_unstored(key, full, build);
        };
        let lock = match disk.key_lock(&full) {
            Ok(l) => l,
            Err(e) => {
                self.disk_trouble(&format!("lock for {key}: {e}"));
                return self.build_unstored(key, full, build);
            }
        };
        // Another process may have built it while we waited for the lock.
        let stem = self.rel_stem(key);
        if let Ok(Some(f)) = disk.read(&stem, &full) {
            return Ok((found_entry(full, f), Lookup::Hit));
        }
        let staging = match disk.stage() {
            Ok(s) => s,
            Err(e) => {
                self.disk_trouble(&format!("staging {key}: {e}"));
                drop(lock);
                return self.build_unstored(key, full, build);
            }
        };
        let mut staging = staging;
        fs::create_dir(staging.data()).ok();
        let built = build(&staging.data())?;
        c.builds.fetch_add(1, Ordering::Relaxed);
        let (note, written) = match built {
            Built::Blob { note, bytes } => {
                match disk.write_blob(&lock, &stem, &full, &note, &bytes) {
                    Ok(p) => {
                        let n = bytes.len() as u64;
                        (note, Ok(((p, n), Payload::Blob(bytes))))
                    }
                    Err(e) => (note, Err((e, Payload::Blob(bytes)))),
                }
            }
            Built::Dir { note } => {
                let r = disk.commit_dir(&lock, &mut staging, &stem, &full, &note);
                let r = r.map(|data| {
                    let n = tree_size(&data);
                    (
                        (data.clone(), n),
                        Payload::Dir(EntryDir {
                            path: data,
                            _temp: None,
                        }),
                    )
                });
                match r {
                    Ok(w) => (note, Ok(w)),
                    Err(e) => {
                        // Keep the tree for the caller in a private temp dir; the staging area goes away.
                        self.disk_trouble(&format!("writing {key}: {e}"));
                        let private = self.private_temp().unwrap_or_default();
                        let _ = copy_tree(&staging.data(), &private);
                        let dir = EntryDir {
                            _temp: Some(Arc::new(TempDirGuard(private.clone()))),
                            path: private,
                        };
                        let entry = Entry {
                            key: full,
                            note,
                            payload: Payload::Dir(dir),
                        };
                        return Ok((entry, Lookup::Built { stored: false }));
                    }
                }
            }
        };
        drop(lock);
        drop(staging);
        match written {
            Ok(((path, n), payload)) => {
                self.after_write(&path, n);
                Ok((
                    Entry {
                        key: full,
                        note,
                        payload,
                    },
                    Lookup::Built { stored: true },
                ))
            }
            Err((e, payload)) => {
                self.disk_trouble(&format!("writing {key}: {e}"));
                Ok((
                    Entry {
                        key: full,
                        note,
                        payload,
                    },
                    Lookup::Built { stored: false },
                ))
            }
        }
    }

    fn private_temp(&self) -> Option<PathBuf> {
        let n = self.inner.temp_seq.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ggml-coreml-build-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).ok().map(|_| p)
    }

    fn build_unstored<E>(
        &self,
        _key: &EntryKey,
        full: String,
        build: impl FnOnce(&Path) -> Result<Built, E>,
    ) -> Result<(Entry, Lookup), E> {
        let temp = self.private_temp();
        let guard = temp.clone().map(|p| Arc::new(TempDirGuard(p)));
        let dir = temp.unwrap_or_else(std::env::temp_dir);
        let built = build(&dir)?;
        self.inner.counters.builds.fetch_add(1, Ordering::Relaxed);
        let (note, payload) = match built {
            Built::Blob { note, bytes } => (note, Payload::Blob(bytes)),
            Built::Dir { note } => (
                note,
                Payload::Dir(EntryDir {
                    path: dir,
                    _temp: guard,
                }),
            ),
        };
        Ok((
            Entry {
                key: full,
                note,
                payload,
            },
            Lookup::Built { stored: false },
        ))
    }

    fn after_write(&self, path: &Path, bytes: u64) {
        self.inner.counters.stored.fetch_add(1, Ordering::Relaxed);
        let Some(disk) = self.inner.disk.as_ref() else {
            return;
        };
        let mut approx = self
            .inner
            .approx_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total = match *approx {
            Some(t) => t + bytes,
            None => disk.walk().iter().map(|i| i.bytes).sum(),
        };
        *approx = Some(total);
        if total <= self.inner.max_bytes {
            return;
        }
        let keep = [entry_root(path)];
        match disk.try_maintain(self.inner.max_bytes, &keep) {
            Ok(Some((removed, now))) => {
                *approx = Some(now);
                self.inner
                    .counters
                    .evicted
                    .fetch_add(removed as u64, Ordering::Relaxed);
                if removed > 0 {
                    self.log(
                        LogLevel::Info,
                        &format!("cache: evicted {removed} least recently used entries"),
                    );
                }
            }
            Ok(None) => {}
            Err(e) => self.disk_trouble(&format!("eviction: {e}")),
        }
    }

    /// Temp cleanup and eviction now (skipped when another process is maintaining). Returns entries
    /// removed and bytes left.
    pub fn maintain(&self) -> Result<Option<(usize, u64)>, CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let r = disk
            .try_maintain(self.inner.max_bytes, &[])
            .map_err(io_err(&disk.root))?;
        if let Some((removed, now)) = r {
            *self
                .inner
                .approx_bytes
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(now);
            self.inner
                .counters
                .evicted
                .fetch_add(removed as u64, Ordering::Relaxed);
        }
        Ok(r)
    }

    /// Every entry on disk, of every env key. With `verify`, each is checked (read only; nothing deleted).
    pub fn list(&self, verify: bool) -> Vec<ListItem> {
        let Some(disk) = self.inner.disk.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<ListItem> = disk
            .walk()
            .into_iter()
            .map(|it| {
                let header = if it.is_dir {
                    it.path.join(disk::MANIFEST)
                } else {
                    it.path.clone()
                };
                let (key, note) = disk::peek(&header)
                    .map(|(_, k, n, _)| (k, n))
                    .unwrap_or_default();
                let current_env = key.split('|').nth(1) == Some(self.inner.env_full.as_str());
                let valid = verify.then(|| verify_item(&it, &key));
                ListItem {
                    class: it.class,
                    path: it.path,
                    is_dir: it.is_dir,
                    bytes: it.bytes,
                    last_used: it.used,
                    key,
                    note,
                    current_env,
                    valid,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.class, &a.key).cmp(&(b.class, &b.key)));
        out
    }

    /// Removes every entry of the given classes (all env keys). Returns how many.
    pub fn clear(&self, classes: &[Class]) -> Result<usize, CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let n = disk
            .clear(classes, Duration::from_secs(30))
            .map_err(io_err(&disk.root))?;
        *self
            .inner
            .approx_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Ok(n)
    }

    /// Measurements recorded under `name` (e.g. `ms/coreml`: shape key -> milliseconds). Empty when none.
    pub fn measurements(&self, name: &str) -> BTreeMap<String, f64> {
        self.get(&EntryKey::measurement(name))
            .and_then(|e| e.blob().and_then(|b| serde_json::from_slice(b).ok()))
            .unwrap_or_default()
    }

    /// Merges `values` into the measurements under `name` (read-modify-write under the key lock).
    pub fn record_measurements(
        &self,
        name: &str,
        values: &BTreeMap<String, f64>,
    ) -> Result<(), CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let key = EntryKey::measurement(name);
        let full = self.full_key(&key);
        let stem = self.rel_stem(&key);
        let lock = disk.key_lock(&full).map_err(io_err(&disk.root))?;
        let mut all: BTreeMap<String, f64> = match disk.read(&stem, &full) {
            Ok(Some(Found::Blob(e))) => serde_json::from_slice(&e.payload).unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        all.extend(
            values
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(k, v)| (k.clone(), *v)),
        );
        let bytes =
            serde_json::to_vec_pretty(&all).map_err(|e| CacheError::Invalid(e.to_string()))?;
        let path = disk
            .write_blob(&lock, &stem, &full, "json", &bytes)
            .map_err(io_err(&disk.root))?;
        drop(lock);
        self.after_write(&path, bytes.len() as u64);
        Ok(())
    }

    /// Copies every valid program entry of the current env key into `dest` (same relative layout) and
    /// writes `dest/manifest.json`: the set a release publishes so users start warm.
    pub fn export(&self, dest: &Path) -> Result<ExportSummary, CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        let mut files = Vec::new();
        let mut bytes = 0;
        for it in self.list(false) {
            if it.class != Class::Program || !it.current_env || !verify_item_disk(&it) {
                continue;
            }
            let rel = it
                .path
                .strip_prefix(&disk.root)
                .map_err(|e| CacheError::Invalid(e.to_string()))?;
            let to = dest.join(rel);
            if let Some(p) = to.parent() {
                fs::create_dir_all(p).map_err(io_err(p))?;
            }
            if it.is_dir {
                let _ = fs::remove_dir_all(&to);
                copy_tree(&it.path, &to).map_err(io_err(&to))?;
            } else {
                fs::copy(&it.path, &to).map_err(io_err(&to))?;
            }
            bytes += it.bytes;
            files.push(serde_json::json!({
                "key": it.key,
                "path": rel.to_string_lossy(),
                "kind": if it.is_dir { "dir" } else { "blob" },
                "bytes": it.bytes,
                "note": it.note,
            }));
        }
        let manifest = serde_json::json!({
            "format": "ggml-coreml-cache-export/1",
            "env": {
                "program_format": ggml_coreml_program::FORMAT_VERSION,
                "os_build": self.inner.env.os_build,
                "chip": self.inner.env.chip,
                "backend_version": self.inner.env.backend_version,
                "dir": self.inner.env.dir_name(),
            },
            "entries": files,
        });
        let mp = dest.join("manifest.json");
        let text =
            serde_json::to_vec_pretty(&manifest).map_err(|e| CacheError::Invalid(e.to_string()))?;
        fs::write(&mp, text).map_err(io_err(&mp))?;
        Ok(ExportSummary {
            entries: files.len(),
            bytes,
        })
    }

    /// Imports an exported set: every entry listed in `src/manifest.json` that verifies is copied into the
    /// cache (atomically, like any write). Entries of another env key are imported too but stay misses
    /// until that env key is used.
    pub fn import(&self, src: &Path) -> Result<ImportSummary, CacheError> {
        let disk = self.inner.disk.as_ref().ok_or(CacheError::NoDisk)?;
        let mp = src.join("manifest.json");
        let text = fs::read(&mp).map_err(io_err(&mp))?;
        let m: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| CacheError::Invalid(format!("{}: {e}", mp.display())))?;
        let entries = m
            .get("entries")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        let mut summary = ImportSummary::default();
        for e in entries {
            let (Some(rel), Some(key)) = (
                e.get("path").and_then(|p| p.as_str()),
                e.get("key").and_then(|k| k.as_str()),
            ) else {
                summary.rejected += 1;
                continue;
            };
            match import_one(disk, src, rel, key) {
                Ok(()) => summary.imported += 1,
                Err(why) => {
                    self.log(
                        LogLevel::Info,
                        &format!("cache import: skipped {rel}: {why}"),
                    );
                    summary.rejected += 1;
                }
            }
        }
        *self
            .inner
            .approx_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Ok(summary)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub entries: usize,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub imported: usize,
    pub rejected: usize,
}

fn found_entry(key: String, f: Found) -> Entry {
    match f {
        Found::Blob(e) => Entry {
            key,
            note: e.note,
            payload: Payload::Blob(e.payload),
        },
        Found::Dir { note, data } => Entry {
            key,
            note,
            payload: Payload::Dir(EntryDir {
                path: data,
                _temp: None,
            }),
        },
    }
}

/// `<entry>.d` for a path inside a directory entry's tree, the path itself for a blob.
fn entry_root(p: &Path) -> PathBuf {
    if p.file_name().is_some_and(|n| n == disk::DATA) {
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        p.to_path_buf()
    }
}

fn verify_item(it: &disk::Item, key: &str) -> bool {
    if it.is_dir {
        disk::verify_dir(&it.path, key).is_ok()
    } else {
        fs::read(&it.path).ok().is_some_and(|b| {
            entry::parse_entry_for(&b, key).is_ok_and(|e| e.kind == entry::EntryKind::Blob)
        })
    }
}

fn verify_item_disk(it: &ListItem) -> bool {
    let item = disk::Item {
        path: it.path.clone(),
        class: it.class,
        is_dir: it.is_dir,
        bytes: it.bytes,
        used: it.last_used,
    };
    verify_item(&item, &it.key)
}

fn import_one(disk: &Disk, src: &Path, rel: &str, key: &str) -> Result<(), String> {
    if !entry::is_safe_rel_path(rel) {
        return Err("unsafe path".into());
    }
    let class = Class::ALL
        .into_iter()
        .find(|c| rel.starts_with(&format!("{}/", c.dir())))
        .ok_or("not under a class directory")?;
    let from = src.join(rel);
    let (stem, is_dir) = if let Some(s) = rel.strip_suffix(".d") {
        (s, true)
    } else if let Some(s) = rel.strip_suffix(".entry") {
        (s, false)
    } else {
        return Err("unknown entry suffix".into());
    };
    let _ = class;
    let stem = Path::new(stem);
    let lock = disk.key_lock(key).map_err(|e| e.to_string())?;
    if is_dir {
        disk::verify_dir(&from, key)?;
        let manifest = fs::read(from.join(disk::MANIFEST)).map_err(|e| e.to_string())?;
        let m = entry::parse_entry(&manifest).map_err(|e| e.to_string())?;
        let mut staging = disk.stage().map_err(|e| e.to_string())?;
        copy_tree(&from.join(disk::DATA), &staging.data()).map_err(|e| e.to_string())?;
        disk.commit_dir(&lock, &mut staging, stem, key, m.note)
            .map_err(|e| e.to_string())?;
    } else {
        let bytes = fs::read(&from).map_err(|e| e.to_string())?;
        let e = entry::parse_entry_for(&bytes, key).map_err(|e| e.to_string())?;
        if e.kind != entry::EntryKind::Blob {
            return Err("not a blob entry".into());
        }
        disk.write_blob(&lock, stem, key, e.note, e.payload)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Copies a tree of regular files and directories (symlinks and special files are refused).
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let md = fs::symlink_metadata(e.path())?;
        let to = dst.join(e.file_name());
        if md.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else if md.is_file() {
            fs::copy(e.path(), &to)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a regular file or directory", e.path().display()),
            ));
        }
    }
    Ok(())
}

fn tree_size(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match fs::symlink_metadata(e.path()) {
            Ok(m) if m.is_dir() => tree_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
