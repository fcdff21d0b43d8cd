//! Many processes on one cache, and writers killed with SIGKILL mid-write.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use ggml_coreml_cache::{Built, Cache, EntryKey, Lookup};

const KEYS: usize = 24;
const WARMERS: usize = 8;

fn warm_key(i: usize) -> EntryKey {
    EntryKey::program(&desc(256 * (i + 1), 512))
}

/// Even keys are blobs, odd keys directory entries; content is derived from the key.
fn build(i: usize, key: &EntryKey, dir: &Path) -> std::io::Result<Built> {
    std::thread::sleep(Duration::from_millis(5));
    if i.is_multiple_of(2) {
        Ok(Built::Blob {
            note: "ane".into(),
            bytes: content_for(key, 5000 + i),
        })
    } else {
        fs::create_dir_all(dir.join("p.mlmodelc/weights"))?;
        fs::write(dir.join("p.mlmodelc/model.mil"), content_for(key, 3000 + i))?;
        fs::write(
            dir.join("p.mlmodelc/weights/weight.bin"),
            content_for(key, 100),
        )?;
        Ok(Built::Dir { note: "ane".into() })
    }
}

fn check(i: usize, key: &EntryKey, e: &ggml_coreml_cache::Entry) -> bool {
    if i.is_multiple_of(2) {
        e.blob() == Some(&content_for(key, 5000 + i)[..])
    } else {
        let d = e.dir().expect("dir entry");
        fs::read(d.join("p.mlmodelc/model.mil")).ok() == Some(content_for(key, 3000 + i))
            && fs::read(d.join("p.mlmodelc/weights/weight.bin")).ok() == Some(content_for(key, 100))
    }
}

/// Child body: warm every key in a process-specific order, checking every entry it gets.
#[test]
fn child_warm() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("warm") {
        return;
    }
    let dir = PathBuf::from(std::env::var("CACHE_DIR").unwrap());
    let cache = open(&dir, env());
    let start: usize = std::env::var("START").unwrap().parse().unwrap();
    let (mut builds, mut hits, mut bad) = (0, 0, 0);
    for j in 0..KEYS {
        let i = (start * 5 + j * 7) % KEYS;
        let key = warm_key(i);
        let (e, how) = cache.get_or_build(&key, |d| build(i, &key, d)).unwrap();
        match how {
            Lookup::Hit => hits += 1,
            Lookup::Built { stored } => {
                assert!(stored);
                builds += 1
            }
        }
        if !check(i, &key, &e) {
            bad += 1;
        }
        // Re-read through the plain path too.
        if !cache.get(&key).is_some_and(|e| check(i, &key, &e)) {
            bad += 1;
        }
        if j % 5 == 0 {
            let _ = cache.maintain();
        }
    }
    println!(
        "RESULT builds={builds} hits={hits} bad={bad} corrupt={}",
        cache.stats().corrupt
    );
}

#[test]
fn eight_processes_warming_one_cache() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cache");
    let children: Vec<_> = (0..WARMERS)
        .map(|s| {
            spawn_child(
                "child_warm",
                "warm",
                &[
                    ("CACHE_DIR", dir.display().to_string()),
                    ("START", s.to_string()),
                ],
                false,
            )
        })
        .collect();
    let (mut builds, mut hits) = (0, 0);
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("RESULT").map(|x| x.1))
            .expect("child result");
        let num = |k: &str| -> usize {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(num("bad="), 0, "a child read a wrong entry: {line}");
        assert_eq!(num("corrupt="), 0, "a child saw a corrupt entry: {line}");
        builds += num("builds=");
        hits += num("hits=");
    }
    assert_eq!(
        builds, KEYS,
        "each key is built exactly once across processes"
    );
    assert_eq!(builds + hits, KEYS * WARMERS);
    let cache = open(&dir, env());
    let list = cache.list(true);
    assert_eq!(list.len(), KEYS);
    assert!(list.iter().all(|i| i.valid == Some(true)));
    for i in 0..KEYS {
        let key = warm_key(i);
        assert!(check(i, &key, &cache.get(&key).unwrap()));
    }
    cache.maintain().unwrap();
    assert!(
        files_under(&dir.join("tmp")).is_empty(),
        "temp files left: {:?}",
        files_under(&dir.join("tmp"))
    );
}

fn kill_key() -> EntryKey {
    EntryKey::program(&desc(4096, 4096))
}

/// Child body: one write that pauses at the point named by GGML_COREML_CACHE_TEST_PAUSE.
#[test]
fn child_write() {
    let role = std::env::var(CHILD_ENV).unwrap_or_default();
    if !role.starts_with("write-") {
        return;
    }
    let dir = PathBuf::from(std::env::var("CACHE_DIR").unwrap());
    let cache = open(&dir, env());
    let key = kill_key();
    if role == "write-blob" {
        cache
            .put_blob(&key, "new", &content_for(&key, 1 << 20))
            .unwrap();
    } else {
        let _ = cache
            .get_or_build(&key, |d| {
                fs::create_dir_all(d.join("p.mlmodelc"))?;
                fs::write(d.join("p.mlmodelc/model.mil"), content_for(&key, 1 << 20))?;
                Ok::<_, std::io::Error>(Built::Dir { note: "new".into() })
            })
            .unwrap();
    }
    println!("child finished writing (should have been killed)");
}

/// Runs a writer child, kills it with SIGKILL once it reports the pause point.
fn kill_during(dir: &Path, role: &str, point: &str) {
    let mut child = spawn_child(
        "child_write",
        role,
        &[
            ("CACHE_DIR", dir.display().to_string()),
            ("GGML_COREML_CACHE_TEST_PAUSE", format!("{point}:60000")),
        ],
        true,
    );
    let stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reached = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("GGML_COREML_CACHE_TEST_PAUSED") {
            assert!(line.contains(point), "{line}");
            reached = true;
            break;
        }
        assert!(Instant::now() < deadline, "child never paused");
    }
    assert!(reached, "child exited before pausing");
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn kill_9_during_a_write_leaves_nothing_valid() {
    for (role, point) in [
        ("write-blob", "mid-write"),
        ("write-blob", "before-rename"),
        ("write-dir", "mid-write"),
        ("write-dir", "before-rename"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        // Open once so the directory exists with its layout.
        drop(open(&dir, env()));
        kill_during(&dir, role, point);

        let cache = open(&dir, env());
        let key = kill_key();
        assert!(
            cache.get(&key).is_none(),
            "{role}/{point}: a killed write reads as valid"
        );
        assert!(
            cache.list(false).is_empty(),
            "{role}/{point}: an entry appeared"
        );
        assert!(
            !files_under(&dir.join("tmp")).is_empty(),
            "{role}/{point}: expected leftovers in tmp/"
        );
        // The killed writer's locks are gone with it: maintenance cleans its temp files, a rebuild works.
        assert!(cache.maintain().unwrap().is_some());
        assert!(
            files_under(&dir.join("tmp")).is_empty(),
            "{role}/{point}: tmp/ not cleaned"
        );
        let (_, how) = cache
            .get_or_build(&key, |_| {
                Ok::<_, ()>(Built::Blob {
                    note: "ane".into(),
                    bytes: b"rebuilt".to_vec(),
                })
            })
            .unwrap();
        assert_eq!(how, Lookup::Built { stored: true });
        assert_eq!(cache.get(&key).unwrap().blob(), Some(&b"rebuilt"[..]));
    }
}

#[test]
fn kill_9_while_replacing_keeps_the_old_entry() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cache");
    let key = kill_key();
    open(&dir, env())
        .put_blob(&key, "old", b"old payload")
        .unwrap();
    kill_during(&dir, "write-blob", "before-rename");
    let cache: Cache = open(&dir, env());
    let e = cache.get(&key).expect("old entry still valid");
    assert_eq!(
        (e.note.as_str(), e.blob()),
        ("old", Some(&b"old payload"[..]))
    );
}
