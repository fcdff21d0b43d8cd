//! The `ggml-coreml` binary end to end on a generated GGUF (and on a real model when
//! `GGML_COREML_MODELS` is set).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ggml_coreml_cache::gguf::{GgmlType, write_fixture};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ggml-coreml"));
    c.env_remove("GGML_COREML_CACHE_DIR")
        .env_remove("GGML_COREML_CACHE_MAX_MB");
    c
}

fn run(cache: &Path, args: &[&str]) -> Output {
    let out = bin()
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ ggml-coreml {}\n{}{}",
        args.join(" "),
        text(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tiny_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    write_fixture(
        &mut f,
        &[("general.architecture", "llama")],
        &[
            ("token_embd.weight", &[256, 1000], GgmlType::Q8_0),
            ("output.weight", &[256, 1000], GgmlType::Q6_K),
            ("blk.0.attn_q.weight", &[256, 256], GgmlType::Q4_K),
            ("blk.0.attn_k.weight", &[256, 128], GgmlType::Q8_0),
            ("blk.0.ffn_down.weight", &[512, 256], GgmlType::Q4_0),
            ("blk.0.attn_norm.weight", &[256], GgmlType::F32),
        ],
    )
    .unwrap();
    p
}

#[test]
fn warm_twice_is_all_hits() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let cache = t.path().join("cache");
    let m = model.to_str().unwrap();

    let first = run(&cache, &["cache", "warm", m]);
    assert!(first.status.success());
    assert!(
        text(&first).contains("4 programs, 0 cache hits, 4 built"),
        "{}",
        text(&first)
    );
    let second = run(&cache, &["cache", "warm", m]);
    assert!(second.status.success());
    assert!(text(&second).contains("4 programs, 4 cache hits, 0 built — all cache hits"));

    // More buckets and variants reuse what is there.
    let all = run(
        &cache,
        &["cache", "warm", m, "--variant", "all", "--m", "512,100"],
    );
    assert!(
        text(&all).contains("16 programs, 4 cache hits, 12 built"),
        "{}",
        text(&all)
    );

    let ls = run(&cache, &["cache", "ls", "--verify"]);
    assert!(ls.status.success());
    assert!(text(&ls).contains("16 entries"));
    assert!(text(&ls).contains("0 invalid"));
    assert!(text(&ls).contains("w8f16-g32o-m128-k256-n256"));

    let exp = t.path().join("export");
    assert!(
        run(&cache, &["cache", "export", exp.to_str().unwrap()])
            .status
            .success()
    );
    assert!(exp.join("manifest.json").is_file());
    let other = t.path().join("other-cache");
    let imp = run(&other, &["cache", "import", exp.to_str().unwrap()]);
    assert!(text(&imp).contains("imported 16 entries, rejected 0"));
    let warm_other = run(&other, &["cache", "warm", m]);
    assert!(
        text(&warm_other).contains("all cache hits"),
        "an imported cache starts warm"
    );

    let clear = run(&cache, &["cache", "clear", "--programs"]);
    assert!(text(&clear).contains("removed 16 entries"));
    let again = run(&cache, &["cache", "warm", m]);
    assert!(text(&again).contains("4 built"));
}

#[test]
fn bad_models_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let model = tiny_model(t.path());
    let bytes = std::fs::read(&model).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not gguf", b"hello world, not a model".to_vec()),
        ("truncated", bytes[..bytes.len() / 3].to_vec()),
        ("huge count", {
            let mut b = bytes.clone();
            b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
    ];
    for (what, b) in cases {
        let p = t.path().join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&p, b).unwrap();
        let out = run(&cache, &["cache", "warm", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ggml-coreml: error: reading"), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    let missing = run(&cache, &["cache", "warm", "/nonexistent/model.gguf"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn info_and_version() {
    let t = tempfile::tempdir().unwrap();
    let v = bin().arg("--version").output().unwrap();
    assert!(text(&v).starts_with("ggml-coreml "));
    let info = run(&t.path().join("c"), &["info"]);
    assert!(info.status.success());
    let s = text(&info);
    assert!(s.contains("env key") && s.contains("cache directory") && s.contains("executor"));
}

/// `cache warm` on a real model from `GGML_COREML_MODELS`, twice.
#[test]
fn warm_real_model() {
    let Some(dir) = std::env::var_os("GGML_COREML_MODELS") else {
        if std::env::var("GGML_COREML_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("GGML_COREML_MODELS is not set");
        }
        eprintln!("skipped: GGML_COREML_MODELS is not set");
        return;
    };
    let dir = PathBuf::from(dir);
    let pick = [
        "gemma-3-270m-Q8_0.gguf",
        "smollm2-135m-Q8_0.gguf",
        "qwen3-tiny-Q8_0.gguf",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
    .or_else(|| {
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
    });
    let Some(model) = pick else {
        eprintln!("skipped: no .gguf in {}", dir.display());
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let m = model.to_str().unwrap();
    let first = run(&cache, &["cache", "warm", m]);
    assert!(first.status.success());
    let second = run(&cache, &["cache", "warm", m]);
    assert!(second.status.success());
    assert!(
        text(&second).contains("all cache hits"),
        "{}",
        text(&second)
    );
}
