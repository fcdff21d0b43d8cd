//! Keys, invalidation, integrity, eviction, export/import and the memory-only mode.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use ggml_coreml_cache::entry::{EntryKind, encode_entry};
use ggml_coreml_cache::{Built, Cache, CacheConfig, EntryKey, EnvKey, Lookup, Placement};

fn put_program(cache: &Cache, k: usize) -> EntryKey {
    let key = EntryKey::program(&desc(k, 64));
    cache
        .put_blob(&key, "ane", &content_for(&key, 300))
        .unwrap();
    key
}

#[test]
fn os_build_chip_and_backend_version_changes_invalidate() {
    let t = tempfile::tempdir().unwrap();
    let base = env();
    let key = put_program(&open(t.path(), base.clone()), 4096);
    assert!(
        open(t.path(), base.clone()).get(&key).is_some(),
        "same env key hits"
    );

    let os = EnvKey {
        os_build: "24B83".into(),
        ..base.clone()
    };
    let chip = EnvKey {
        chip: "M4".into(),
        ..base.clone()
    };
    let ver = EnvKey {
        backend_version: "9.9.9".into(),
        ..base.clone()
    };
    for other in [os, chip, ver] {
        let c = open(t.path(), other.clone());
        assert!(c.get(&key).is_none(), "{other} must miss");
        // And the stale entry is left alone (another OS install on the same disk may still use it).
    }
    assert!(open(t.path(), base).get(&key).is_some());
}

#[test]
fn program_format_version_change_invalidates() {
    // FORMAT_VERSION is a constant of the build; an entry written by a build with another format version
    // has another directory and another key. Simulate both: that build's file under its own directory,
    // and a file with its key placed at our path.
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let key = put_program(&cache, 2048);
    let ours = cache.full_key(&key);
    let stem = cache.rel_stem(&key);
    let path = t.path().join(format!("{}.entry", stem.display()));
    let fmt_now = format!("fmt={}", ggml_coreml_program::FORMAT_VERSION);
    let old_key = ours.replace(&fmt_now, "fmt=0");
    assert_ne!(old_key, ours);
    let old_entry =
        encode_entry(EntryKind::Blob, &old_key, "ane", &content_for(&key, 300)).unwrap();

    let env_dir = env().dir_name();
    let old_dir_path = t.path().join(
        path.strip_prefix(t.path())
            .unwrap()
            .to_string_lossy()
            .replace(&env_dir, "f0-old"),
    );
    fs::create_dir_all(old_dir_path.parent().unwrap()).unwrap();
    fs::write(&old_dir_path, &old_entry).unwrap();
    fs::write(&path, &old_entry).unwrap();
    assert!(
        cache.get(&key).is_none(),
        "an entry of another format version must miss"
    );
    assert!(
        !path.exists(),
        "the mismatching file at our path is discarded"
    );
    let (e, how) = cache
        .get_or_build(&key, |_| {
            Ok::<_, ()>(Built::Blob {
                note: "ane".into(),
                bytes: content_for(&key, 300),
            })
        })
        .unwrap();
    assert_eq!(how, Lookup::Built { stored: true });
    assert_eq!(e.placement(), Some(Placement::Ane));
    assert!(cache.get(&key).is_some());
}

#[test]
fn model_and_quant_swaps_reuse_programs_not_artifacts() {
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let prog = put_program(&cache, 1024);
    let art = EntryKey::artifact("model-a", "Q4_K", "blk.0.attn_q.weight");
    cache
        .put_blob(&art, "", b"repacked weights of model a")
        .unwrap();
    assert!(cache.get(&art).is_some());

    // The same shapes under another model or another quant: programs hit, artifacts miss.
    for other in [
        EntryKey::artifact("model-b", "Q4_K", "blk.0.attn_q.weight"),
        EntryKey::artifact("model-a", "Q8_0", "blk.0.attn_q.weight"),
    ] {
        assert!(cache.get(&other).is_none(), "{other} must miss");
    }
    assert!(cache.get(&prog).is_some(), "the program is shared");
    let s = cache.stats();
    assert_eq!((s.hits, s.misses), (2, 2));
}

#[test]
fn truncated_and_bit_flipped_blobs_are_discarded_and_rebuilt() {
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let key = put_program(&cache, 512);
    let path = t
        .path()
        .join(format!("{}.entry", cache.rel_stem(&key).display()));
    let good = fs::read(&path).unwrap();

    let damage: Vec<(&str, Vec<u8>)> = vec![
        ("truncated payload", good[..good.len() - 1].to_vec()),
        ("truncated header", good[..40].to_vec()),
        ("empty", Vec::new()),
        ("payload bit flip", {
            let mut b = good.clone();
            let i = b.len() - 10;
            b[i] ^= 0x04;
            b
        }),
        ("key bit flip", {
            let mut b = good.clone();
            b[66] ^= 0x01;
            b
        }),
        ("header length", {
            let mut b = good.clone();
            b[24] ^= 0x01;
            b
        }),
        ("appended", {
            let mut b = good.clone();
            b.push(0);
            b
        }),
    ];
    for (what, bytes) in damage {
        fs::write(&path, &bytes).unwrap();
        assert!(cache.get(&key).is_none(), "{what}: accepted");
        assert!(!path.exists(), "{what}: not discarded");
        let mut built = false;
        let (e, how) = cache
            .get_or_build(&key, |_| {
                built = true;
                Ok::<_, ()>(Built::Blob {
                    note: "ane".into(),
                    bytes: content_for(&key, 300),
                })
            })
            .unwrap();
        assert!(
            built && how == Lookup::Built { stored: true },
            "{what}: not rebuilt"
        );
        assert_eq!(e.blob().unwrap(), &content_for(&key, 300)[..]);
        assert_eq!(
            fs::read(&path).unwrap(),
            good,
            "{what}: rebuilt entry differs"
        );
    }
    assert_eq!(cache.stats().corrupt, 7);
}

fn build_tree(dir: &Path) -> Result<Built, std::io::Error> {
    fs::create_dir_all(dir.join("prog.mlpackage/Data/com.apple.CoreML/weights"))?;
    fs::write(
        dir.join("prog.mlpackage/Manifest.json"),
        b"{\"fileFormatVersion\": \"1.0.0\"}",
    )?;
    fs::write(
        dir.join("prog.mlpackage/Data/com.apple.CoreML/model.mlmodel"),
        vec![7u8; 900],
    )?;
    fs::create_dir_all(dir.join("prog.mlpackage/empty"))?;
    Ok(Built::Dir { note: "ane".into() })
}

#[test]
fn directory_entries_verify_every_file() {
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let key = EntryKey::program(&desc(256, 256));
    let (e, how) = cache.get_or_build(&key, build_tree).unwrap();
    assert_eq!(how, Lookup::Built { stored: true });
    let data = e.dir().unwrap().to_path_buf();
    assert!(
        data.join("prog.mlpackage/empty").is_dir(),
        "empty dirs survive"
    );
    let (e2, how2) = cache
        .get_or_build(&key, |_| -> Result<Built, std::io::Error> {
            panic!("rebuilt")
        })
        .unwrap();
    assert_eq!(how2, Lookup::Hit);
    assert_eq!(e2.dir().unwrap(), data);

    let model = data.join("prog.mlpackage/Data/com.apple.CoreML/model.mlmodel");
    let manifest = data.parent().unwrap().join("MANIFEST");
    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let damages: Vec<Damage> = vec![
        (
            "file byte flipped",
            Box::new(|| fs::write(&model, vec![8u8; 900]).unwrap()),
        ),
        (
            "file truncated",
            Box::new(|| fs::write(&model, vec![7u8; 899]).unwrap()),
        ),
        (
            "file removed",
            Box::new(|| fs::remove_file(&model).unwrap()),
        ),
        (
            "file added",
            Box::new(|| fs::write(data.join("extra"), b"x").unwrap()),
        ),
        (
            "manifest truncated",
            Box::new(|| {
                let b = fs::read(&manifest).unwrap();
                fs::write(&manifest, &b[..b.len() - 3]).unwrap()
            }),
        ),
        (
            "manifest removed",
            Box::new(|| fs::remove_file(&manifest).unwrap()),
        ),
    ];
    for (what, damage) in damages {
        damage();
        assert!(cache.get(&key).is_none(), "{what}: accepted");
        assert!(!data.exists(), "{what}: not discarded");
        let (_, how) = cache.get_or_build(&key, build_tree).unwrap();
        assert_eq!(how, Lookup::Built { stored: true }, "{what}");
        assert!(cache.get(&key).is_some());
    }
}

#[test]
fn declined_programs_are_remembered() {
    let t = tempfile::tempdir().unwrap();
    let key = EntryKey::program(&desc(8192, 128));
    {
        let cache = open(t.path(), env());
        let verdict = Placement::Declined("matmul preferred on GPU".into());
        cache.put_blob(&key, &verdict.to_note(), &[]).unwrap();
    }
    let e = open(t.path(), env()).get(&key).unwrap();
    assert_eq!(
        e.placement(),
        Some(Placement::Declined("matmul preferred on GPU".into()))
    );
}

fn set_used(path: &Path, t: SystemTime) {
    let f = fs::File::options().append(true).open(path).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn lru_eviction_under_the_cap() {
    let t = tempfile::tempdir().unwrap();
    let (log, _) = recording_log();
    let cap = 10_000;
    let cache = Cache::open(
        CacheConfig::new(Some(t.path().to_path_buf()), env())
            .with_log(log)
            .with_max_bytes(cap),
    );
    let base = SystemTime::now() - Duration::from_secs(3600);
    let mut keys = Vec::new();
    for i in 0..4 {
        let key = EntryKey::artifact("m", "Q8_0", format!("t{i}"));
        cache.put_blob(&key, "", &vec![i as u8; 2000]).unwrap();
        let p = t
            .path()
            .join(format!("{}.entry", cache.rel_stem(&key).display()));
        set_used(&p, base + Duration::from_secs(i * 10));
        keys.push(key);
    }
    // Use the oldest one: it becomes the most recent.
    assert!(cache.get(&keys[0]).is_some());
    // 4 x ~2.1 KB + 2 more exceed 10 KB: the least recently used (t1, then t2) go first.
    for i in 4..6 {
        let key = EntryKey::artifact("m", "Q8_0", format!("t{i}"));
        cache.put_blob(&key, "", &vec![i as u8; 2000]).unwrap();
        keys.push(key);
    }
    let present: Vec<bool> = keys.iter().map(|k| cache.contains(k)).collect();
    assert_eq!(
        present,
        vec![true, false, false, true, true, true],
        "LRU order"
    );
    let total: u64 = cache.list(false).iter().map(|i| i.bytes).sum();
    assert!(total <= cap, "{total} > {cap}");
    assert!(cache.stats().evicted >= 2);
}

#[test]
fn export_then_import_starts_warm() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path(), env());
    let blob = put_program(&src, 640);
    let dir_key = EntryKey::program(&desc(640, 2048));
    src.get_or_build(&dir_key, build_tree).unwrap();
    src.put_blob(&EntryKey::artifact("m", "Q8_0", "x"), "", b"not exported")
        .unwrap();
    put_program(&open(a.path(), EnvKey::new("other", "M1")), 640);

    let s = src.export(out.path()).unwrap();
    assert_eq!(s.entries, 2, "only programs of the current env key");
    assert!(out.path().join("manifest.json").is_file());

    let dst = open(b.path(), env());
    let r = dst.import(out.path()).unwrap();
    assert_eq!((r.imported, r.rejected), (2, 0));
    assert!(dst.get(&blob).is_some());
    assert!(dst.get(&dir_key).is_some());
    assert!(dst.list(true).iter().all(|i| i.valid == Some(true)));

    // A tampered export is rejected entry by entry.
    let c = tempfile::tempdir().unwrap();
    let blob_file = out
        .path()
        .join(format!("{}.entry", src.rel_stem(&blob).display()));
    let mut bytes = fs::read(&blob_file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&blob_file, bytes).unwrap();
    let r = open(c.path(), env()).import(out.path()).unwrap();
    assert_eq!((r.imported, r.rejected), (1, 1));
}

#[test]
fn measurements_merge() {
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let mut m = std::collections::BTreeMap::new();
    m.insert("i8i8-m512-k4096-n4096".to_owned(), 1.5);
    cache.record_measurements("ms/coreml", &m).unwrap();
    m.clear();
    m.insert("i8i8-m512-k4096-n11008".to_owned(), 3.25);
    cache.record_measurements("ms/coreml", &m).unwrap();
    let got = open(t.path(), env()).measurements("ms/coreml");
    assert_eq!(got.len(), 2);
    assert_eq!(got["i8i8-m512-k4096-n11008"], 3.25);
}

#[test]
fn memory_only_cache_builds_and_cleans_up() {
    let cache = Cache::memory_only(env());
    assert!(cache.dir().is_none());
    let key = EntryKey::program(&desc(128, 128));
    let (e, how) = cache.get_or_build(&key, build_tree).unwrap();
    assert_eq!(how, Lookup::Built { stored: false });
    let p = e.dir().unwrap().to_path_buf();
    assert!(p.join("prog.mlpackage/Manifest.json").is_file());
    drop(e);
    assert!(
        !p.exists(),
        "private build dir removed with its last handle"
    );
    assert!(cache.get(&key).is_none());
    assert!(cache.put_blob(&key, "", b"x").is_err());
}

#[test]
fn clear_by_class() {
    let t = tempfile::tempdir().unwrap();
    let cache = open(t.path(), env());
    let p = put_program(&cache, 768);
    let a = EntryKey::artifact("m", "Q8_0", "x");
    cache.put_blob(&a, "", b"a").unwrap();
    assert_eq!(
        cache.clear(&[ggml_coreml_cache::Class::Artifact]).unwrap(),
        1
    );
    assert!(cache.get(&a).is_none());
    assert!(cache.get(&p).is_some());
    assert_eq!(cache.clear(&ggml_coreml_cache::Class::ALL).unwrap(), 1);
    assert!(cache.list(false).is_empty());
}
