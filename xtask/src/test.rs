//! `cargo xtask test`: every test of the project, in one command (the README's test command; `.ci/run`
//! calls it). Stages run in order; each prints a verdict; the run ends with `N passed, M failed`.
//!
//! Setup (host build, venv, models) is cached outside the repo and reused; a failing setup stops the run.

use std::env;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::models::{Model, ModelSet, ensure_models, model_path};
use crate::{backend, host, log, paths, venv};

/// Paths every stage may need.
pub struct Env {
    pub bin: PathBuf,
    pub python: PathBuf,
    pub models: PathBuf,
    pub lib: PathBuf,
}

impl Env {
    /// Host, venv, default models and the release backend library, built or reused.
    pub fn prepare() -> Result<Env> {
        let bin = host::ensure_host(None).context("host build")?;
        let python = venv::ensure_venv().context("python venv")?;
        let models = ensure_models(&ModelSet::default_set()).context("models")?;
        let lib = backend::build_backend(true).context("backend build")?;
        Ok(Env {
            bin,
            python,
            models,
            lib,
        })
    }

    /// A host tool with the backend on GGML_BACKEND_PATH.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        c.env("GGML_BACKEND_PATH", &self.lib).stdin(Stdio::null());
        c
    }

    /// Environment for tests that use external things (see the shared rule: fail, don't skip, in CI).
    pub fn apply(&self, c: &mut Command) {
        c.env("GGML_COREML_HOST_BIN", &self.bin)
            .env("GGML_COREML_PYTHON", &self.python)
            .env("GGML_COREML_MODELS", &self.models)
            .env("GGML_COREML_LIB", &self.lib)
            .env("GGML_COREML_REQUIRE_EXTERNAL", "1");
    }
}

struct Stage {
    name: &'static str,
    run: fn(&Env) -> Result<String>,
}

const STAGES: &[Stage] = &[
    Stage {
        name: "fmt",
        run: fmt,
    },
    Stage {
        name: "clippy-linux",
        run: clippy_linux,
    },
    Stage {
        name: "clippy-apple-darwin",
        run: |_| clippy_target("aarch64-apple-darwin"),
    },
    Stage {
        name: "clippy-apple-ios",
        run: |_| clippy_target("aarch64-apple-ios"),
    },
    Stage {
        name: "ios-staticlib",
        run: ios_staticlib,
    },
    Stage {
        name: "cargo-test",
        run: cargo_test,
    },
    Stage {
        name: "coreml-equivalence",
        run: crate::equivalence::stage,
    },
    Stage {
        name: "conformance",
        run: conformance,
    },
    Stage {
        name: "conformance-v3",
        run: conformance_v3,
    },
    Stage {
        name: "support-listing",
        run: support_listing,
    },
    Stage {
        name: "conformance-hybrid",
        run: conformance_hybrid,
    },
    Stage {
        name: "two-models",
        run: crate::two_models::stage,
    },
    Stage {
        name: "fault-injection",
        run: fault_injection,
    },
    Stage {
        name: "valgrind",
        run: valgrind,
    },
    Stage {
        name: "llama-bench",
        run: llama_bench_smoke,
    },
    Stage {
        name: "hybrid",
        run: hybrid,
    },
    Stage {
        name: "serve",
        run: crate::serve::stage,
    },
    Stage {
        name: "rpc",
        run: crate::rpc::stage,
    },
    Stage {
        name: "parity",
        run: |_| crate::parity::quick_check(),
    },
    Stage {
        name: "qvac",
        run: |env| crate::qvac::run_qvac_tests(&env.lib, &env.models),
    },
    Stage {
        name: "api-mismatch",
        run: api_mismatch,
    },
];

pub fn main(args: &[String]) -> Result<()> {
    let mut only: Vec<String> = Vec::new();
    let mut skip: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => only.extend(
                it.next()
                    .map(|s| s.split(',').map(String::from).collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
            "--skip" => skip.extend(
                it.next()
                    .map(|s| s.split(',').map(String::from).collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
            "--list" => {
                for s in STAGES {
                    println!("{}", s.name);
                }
                return Ok(());
            }
            "-h" | "--help" => {
                println!(
                    "cargo xtask test [--only a,b] [--skip a,b] [--list]\n\
                     Runs every stage (fmt, clippy on Linux and both Apple targets, the iOS staticlib build,\n\
                     cargo test with the host/venv/models, coremltools equivalence of the emitted programs,\n\
                     test-backend-ops conformance, llama-bench smoke, llama-server\n\
                     under concurrent load (serve), llama.cpp RPC across two servers (rpc),\n\
                     API-version mismatch). Ends with `N passed, M failed`."
                );
                return Ok(());
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    let t0 = Instant::now();
    log!("test: preparing host, venv, models and the backend (cached)");
    let env = Env::prepare()?;
    let (mut passed, mut failed) = (0, 0);
    let mut failures = Vec::new();
    for s in STAGES {
        if (!only.is_empty() && !only.iter().any(|o| o == s.name))
            || skip.iter().any(|o| o == s.name)
        {
            continue;
        }
        let t = Instant::now();
        eprintln!("\n=== stage {} ===", s.name);
        match (s.run)(&env) {
            Ok(note) => {
                passed += 1;
                eprintln!(
                    "=== stage {}: PASS ({:.0} s) {note}",
                    s.name,
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!(
                    "=== stage {}: FAIL ({:.0} s): {e:#}",
                    s.name,
                    t.elapsed().as_secs_f64()
                );
                failures.push(s.name);
            }
        }
    }
    eprintln!("\ntest: {:.0} s in all", t0.elapsed().as_secs_f64());
    if !failures.is_empty() {
        eprintln!("failed stages: {}", failures.join(", "));
    }
    println!("stages: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} stage(s) failed");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(paths::workspace_root()).stdin(Stdio::null());
    c
}

/// Runs a command, echoing its output to stderr, and returns the combined output.
fn run_capture(c: &mut Command) -> Result<String> {
    let line = crate::util::display_cmd(c);
    log!("$ {line}");
    let out = c.output().with_context(|| format!("cannot start {line}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{line}` failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(text)
}

fn run_status(c: &mut Command) -> Result<()> {
    let line = crate::util::display_cmd(c);
    log!("$ {line}");
    let st = c
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("cannot start {line}"))?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

fn fmt(_: &Env) -> Result<String> {
    run_status(cargo().args(["fmt", "--all", "--check"]))?;
    Ok(String::new())
}

fn clippy_linux(_: &Env) -> Result<String> {
    run_status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(String::new())
}

fn clippy_target(target: &str) -> Result<String> {
    ensure_rust_target(target)?;
    run_status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--target",
        target,
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(format!("(target {target})"))
}

fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(o) = installed
        && String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    run_status(Command::new("rustup").args(["target", "add", target]))
}

fn ios_staticlib(_: &Env) -> Result<String> {
    ensure_rust_target("aarch64-apple-ios")?;
    run_status(cargo().args([
        "rustc",
        "-p",
        "ggml-coreml",
        "--release",
        "--target",
        "aarch64-apple-ios",
        "--crate-type",
        "staticlib",
    ]))?;
    let dir = target_dir()?.join("aarch64-apple-ios/release");
    let lib = dir.join("libggml_coreml.a");
    let size = std::fs::metadata(&lib)
        .with_context(|| format!("{} missing", lib.display()))?
        .len();
    Ok(format!(
        "{} ({:.1} MiB)",
        lib.display(),
        size as f64 / 1048576.0
    ))
}

fn target_dir() -> Result<PathBuf> {
    if let Ok(d) = env::var("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(d));
    }
    Ok(paths::workspace_root().join("target"))
}

fn cargo_test(env: &Env) -> Result<String> {
    let mut c = cargo();
    c.args(["test", "--workspace", "--release"]);
    env.apply(&mut c);
    run_status(&mut c)?;
    Ok(String::new())
}

/// test-backend-ops MUL_MAT against the CPU backend, policy `always` (every supported op through the
/// executor). Passing means: the backend reports OK, no case failed, and every claimed case ran.
fn conformance(env: &Env) -> Result<String> {
    conformance_with(env, env.tool("test-backend-ops"))
}

/// The same suite on the ggml 0.26 (API version 3) host: one binary, both layouts.
fn conformance_v3(env: &Env) -> Result<String> {
    let bin = crate::host_v3::ensure_host_v3()?;
    let mut c = Command::new(bin.join("test-backend-ops"));
    c.env("GGML_BACKEND_PATH", &env.lib).stdin(Stdio::null());
    let line = conformance_with(env, c)?;
    Ok(format!("(ggml 0.26, API v3) {line}"))
}

fn conformance_with(_env: &Env, mut c: Command) -> Result<String> {
    c.args(["test", "-b", "CoreML", "-o", "MUL_MAT"])
        .env("GGML_COREML_POLICY", "always")
        .env("GGML_COREML_LOG", "info");
    let out = run_capture(&mut c)?;
    let report = ConformanceReport::parse(&out);
    log!("conformance: {}", report.line());
    if report.failed > 0 || !report.backend_ok || report.passed == 0 {
        bail!("conformance: {}", report.line());
    }
    Ok(report.line())
}

/// Removes terminal colour codes (test-backend-ops colours its verdicts).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts of a test-backend-ops run.
#[derive(Default, Debug)]
pub struct ConformanceReport {
    pub passed: usize,
    pub failed: usize,
    pub unsupported: usize,
    pub backend_ok: bool,
}

impl ConformanceReport {
    pub fn parse(out: &str) -> ConformanceReport {
        Self::parse_backend(out, "CoreML")
    }

    /// Counts for the backend named `backend` (e.g. `CoreML-CPU` for the hybrid face).
    pub fn parse_backend(out: &str, backend: &str) -> ConformanceReport {
        let done = format!("Backend {backend}:");
        let mut r = ConformanceReport::default();
        for l in strip_ansi(out).lines() {
            let l = l.trim();
            if l.starts_with("MUL_MAT") {
                if l.ends_with("OK") {
                    r.passed += 1;
                } else if l.contains("FAIL") {
                    r.failed += 1;
                } else if l.contains("not supported") {
                    r.unsupported += 1;
                }
            }
            if l.starts_with(&done) && l.contains("OK") {
                r.backend_ok = true;
            }
        }
        r
    }

    pub fn line(&self) -> String {
        format!(
            "{} cases passed, {} failed, {} not supported (declined); backend {}",
            self.passed,
            self.failed,
            self.unsupported,
            if self.backend_ok { "OK" } else { "not OK" }
        )
    }
}

fn support_listing(env: &Env) -> Result<String> {
    let mut c = env.tool("test-backend-ops");
    c.args(["support", "-o", "MUL_MAT", "-b", "CoreML"])
        .env("GGML_COREML_POLICY", "always");
    let out = run_capture(&mut c)?;
    if !out.contains("CoreML") {
        bail!("test-backend-ops support does not list the CoreML device");
    }
    let out = strip_ansi(&out);
    let yes = out
        .lines()
        .filter(|l| l.contains("MUL_MAT") && l.trim_end().ends_with(": SUPPORTED"))
        .count();
    if yes == 0 {
        bail!("test-backend-ops support lists no supported MUL_MAT case for CoreML");
    }
    Ok(format!("CoreML listed; {yes} MUL_MAT cases supported"))
}

/// Executor faults mid-graph: every 3rd executor call fails; each failed node must run on the host with a
/// correct result (the suite still passes), faults are counted and a shape is disabled after repeats.
/// The hybrid face (`CoreML-CPU`) with every buffer test-backend-ops allocates marked WEIGHTS
/// (`GGML_COREML_HYBRID_MARK_WEIGHTS=1`), so each case's src0 reaches the executor as a model weight
/// does, in buffers freed and reallocated between cases (often at the same address: the case that
/// once served stale prepared weights). Every MUL_MAT case must pass with offloads counted. A second
/// run forces the copy path that non-host inner buffers take (Metal private buffers, CUDA) on a
/// subset: at most 3 bulk copies per offloaded node.
fn conformance_hybrid(env: &Env) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("ggml-coreml-hybrid-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut notes = Vec::new();
    for (force_copy, split) in [(false, false), (true, false), (false, true)] {
        let stats = dir.join(format!("{force_copy}-{split}.json"));
        let _ = std::fs::remove_file(&stats);
        let mut c = env.tool("test-backend-ops");
        c.args(["test", "-b", "CoreML-CPU", "-o", "MUL_MAT"])
            .env("GGML_COREML_HYBRID", "CPU")
            .env("GGML_COREML_HYBRID_MARK_WEIGHTS", "1")
            .env("GGML_COREML_POLICY", "always")
            .env("GGML_COREML_STATS_FILE", &stats)
            .env("GGML_COREML_LOG", "info");
        if force_copy {
            c.env("GGML_COREML_HYBRID_FORCE_COPY", "1");
        }
        if split {
            // Half of each MUL_MAT's rows on the inner device, half through the executor, joined.
            c.env("GGML_COREML_SPLIT", "0.5");
        }
        if force_copy || split {
            c.args(["-p", "type_a=(q8_0|q4_K|f16),type_b=f32"]);
        }
        let out = run_capture(&mut c)?;
        let report = ConformanceReport::parse_backend(&out, "CoreML-CPU");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&stats)
                .with_context(|| format!("no stats file {}", stats.display()))?,
        )?;
        let ane = json["ane_ops"].as_u64().unwrap_or(0);
        let xfer = &json["transfers"];
        let (xnodes, xmax) = (
            xfer["nodes"].as_u64().unwrap_or(0),
            xfer["max_per_node"].as_u64().unwrap_or(0),
        );
        let splits = json["split_nodes"].as_u64().unwrap_or(0);
        let what = match (force_copy, split) {
            (true, _) => "copy path",
            (_, true) => "split mode",
            _ => "in place",
        };
        log!(
            "conformance-hybrid ({what}): {}; {ane} MUL_MATs through the executor",
            report.line()
        );
        if report.failed > 0 || !report.backend_ok || report.passed == 0 || ane == 0 {
            bail!("hybrid face ({what}): {}; {ane} offloaded", report.line());
        }
        if force_copy && (xnodes == 0 || xmax > 3) {
            bail!("copy path: {xnodes} nodes copied, at most {xmax} copies per node (limit 3)");
        }
        if split && splits == 0 {
            bail!("split mode: no MUL_MAT was split");
        }
        notes.push(if split {
            format!(
                "split mode (GGML_COREML_SPLIT=0.5): {} passed, {splits} MUL_MATs split between the inner device and the executor",
                report.passed
            )
        } else if force_copy {
            format!(
                "copy path: {} passed, {ane} offloaded, {xnodes} nodes with at most {xmax} bulk copies each",
                report.passed
            )
        } else {
            format!("{}; {ane} MUL_MATs through the executor", report.line())
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(notes.join("; "))
}

fn fault_injection(env: &Env) -> Result<String> {
    let mut c = env.tool("test-backend-ops");
    c.args([
        "test",
        "-b",
        "CoreML",
        "-o",
        "MUL_MAT",
        "-p",
        "type_a=(q8_0|q4_K|f16),type_b=f32",
    ])
    .env("GGML_COREML_POLICY", "always")
    .env("GGML_COREML_FAULT_INJECT", "3")
    .env("GGML_COREML_LOG", "info");
    let out = run_capture(&mut c)?;
    let report = ConformanceReport::parse(&out);
    let summary = out
        .lines()
        .find(|l| l.contains("ggml-coreml: summary:"))
        .unwrap_or("")
        .to_string();
    let disabled = out.lines().filter(|l| l.contains("disabled after")).count();
    if report.failed > 0
        || !report.backend_ok
        || report.passed == 0
        || !summary.contains("executor error")
        || disabled == 0
    {
        bail!(
            "with injected faults: {}; {summary}; {disabled} shapes disabled",
            report.line()
        );
    }
    // Panics inside a node (executor, driver) must send that node to the host, never fail the graph.
    let mut c = env.tool("test-backend-ops");
    c.args([
        "test",
        "-b",
        "CoreML",
        "-o",
        "MUL_MAT",
        "-p",
        "type_a=(q8_0|f16),type_b=f32",
    ])
    .env("GGML_COREML_POLICY", "always")
    .env("GGML_COREML_FAULT_INJECT", "panic:2")
    .env("GGML_COREML_LOG", "info");
    let out = run_capture(&mut c)?;
    let panics = ConformanceReport::parse(&out);
    let caught = out.lines().filter(|l| l.contains("injected panic")).count();
    if panics.failed > 0 || !panics.backend_ok || panics.passed == 0 || caught == 0 {
        bail!(
            "with injected panics: {}; {caught} panics reported",
            panics.line()
        );
    }
    Ok(format!(
        "{}; {disabled} shapes disabled after repeated faults; with a panic every 2nd call: {} passed, {caught} nodes sent to the host",
        report.line(),
        panics.passed
    ))
}

/// The conformance run under valgrind memcheck (a subset of cases for time): no invalid reads or
/// writes, no uninitialised use in our library or in what it hands ggml.
fn valgrind(env: &Env) -> Result<String> {
    if crate::util::which("valgrind").is_none() {
        bail!("valgrind is not installed (apt-get install -y valgrind)");
    }
    let mut c = Command::new("valgrind");
    c.args(["--error-exitcode=99", "-q"])
        .arg(env.bin.join("test-backend-ops"))
        .args(["test", "-b", "CoreML", "-o", "MUL_MAT", "-p"])
        .arg(VALGRIND_CASES)
        .env("GGML_BACKEND_PATH", &env.lib)
        .env("GGML_COREML_POLICY", "always")
        .stdin(Stdio::null());
    let out = run_capture(&mut c)?;
    let report = ConformanceReport::parse(&out);
    if report.failed > 0 || !report.backend_ok || report.passed == 0 {
        bail!("under valgrind: {}", report.line());
    }
    Ok(format!("memcheck clean; {}", report.line()))
}

/// Every weight format, broadcasting and a K split part, small enough for memcheck.
pub const VALGRIND_CASES: &str =
    "type_a=(q4_0|q8_0|q4_K|q5_K|q6_K|f16),type_b=f32,m=16,n=(1|16),k=256";

fn model(env: &Env, m: Model, quant: &str) -> Result<PathBuf> {
    let p = model_path(&env.models, m, quant);
    if !p.is_file() {
        bail!("model {} missing (cargo xtask models)", p.display());
    }
    Ok(p)
}

/// llama-bench on a real Q8_0 model with the library loaded: the backend shows in the `backends`
/// column and the run completes (policy `always`, `-ngl 0` so layers are CPU-resident).
fn llama_bench_smoke(env: &Env) -> Result<String> {
    let m = model(env, Model::Gemma3_270m, "Q8_0")?;
    let mut c = env.tool("llama-bench");
    c.arg("-m")
        .arg(&m)
        .args(["-p", "64", "-n", "4", "-r", "1", "-ngl", "0", "-o", "md"])
        .env("GGML_COREML_POLICY", "always");
    let out = run_capture(&mut c)?;
    let row = out
        .lines()
        .find(|l| l.contains("pp64"))
        .unwrap_or("")
        .to_string();
    if !row.contains("CoreML") {
        bail!("llama-bench's backends column does not show CoreML:\n{out}");
    }
    Ok(row.trim().to_string())
}

const HYBRID_PROMPT: &str = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and again.";

fn completion_cmd(env: &Env, model: &std::path::Path, hybrid: bool) -> Command {
    let mut c = Command::new(env.bin.join("llama-completion"));
    c.arg("-m")
        .arg(model)
        .args([
            "-p",
            HYBRID_PROMPT,
            "-n",
            "8",
            "-no-cnv",
            "--temp",
            "0",
            "-t",
            "2",
            "-lv",
            "4",
        ])
        .stdin(Stdio::null());
    if hybrid {
        c.args(["-ngl", "99", "--device", "CoreML-CPU"])
            .env("GGML_BACKEND_PATH", &env.lib)
            .env("GGML_COREML_HYBRID", "CPU")
            .env("GGML_COREML_LOG", "info");
    } else {
        c.args(["-ngl", "0"]);
    }
    c
}

fn stdout_of(c: &mut Command) -> Result<(String, String)> {
    let line = crate::util::display_cmd(c);
    log!("$ {line}");
    let out = c.output().with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The hybrid face with the CPU as the inner device (`--device CoreML-CPU -ngl 99`):
/// policy `off` gives output bit-identical to stock; with prefill-only offload (policy `always`,
/// `GGML_COREML_MIN_M=16`) decode graphs reach the inner backend unsplit and the prefill graph is
/// split only around the offloaded MUL_MATs; under `always` (every weight MUL_MAT through the executor)
/// qwen3-tiny's KL divergence from stock stays within docs/parity.md's tolerance (the quick parity check
/// through the hybrid face).
fn hybrid(env: &Env) -> Result<String> {
    let mut notes = Vec::new();
    for (m, q) in [(Model::Qwen3Tiny, "Q8_0"), (Model::Gemma3_270m, "Q8_0")] {
        let path = model(env, m, q)?;
        let (stock, _) = stdout_of(&mut completion_cmd(env, &path, false))?;
        let (off, _) =
            stdout_of(completion_cmd(env, &path, true).env("GGML_COREML_POLICY", "off"))?;
        if stock != off {
            bail!(
                "{}: hybrid with policy off differs from stock:\n stock: {stock:?}\n ours:  {off:?}",
                m.name()
            );
        }
        notes.push(format!("{} off bit-identical", m.name()));
    }
    let path = model(env, Model::Qwen3Tiny, "Q8_0")?;
    let (_, err) = stdout_of(
        completion_cmd(env, &path, true)
            .env("GGML_COREML_POLICY", "always")
            .env("GGML_COREML_MIN_M", "16"),
    )?;
    let line = err
        .lines()
        .find(|l| l.contains("hybrid summary:"))
        .context("no hybrid summary line")?;
    let num = |key: &str| -> Option<u64> {
        let i = line.find(key)?;
        line[..i]
            .split_whitespace()
            .last()?
            .trim_start_matches('(')
            .parse()
            .ok()
    };
    let (unsplit, split, over) = (
        num("graphs unsplit"),
        num("split ("),
        num("split elsewhere"),
    );
    match (unsplit, split, over) {
        (Some(u), Some(s), Some(0)) if u >= 7 && s >= 1 && line.contains("offloaded") => {
            notes.push(format!(
                "{u} decode graphs unsplit, {s} prefill graph split only around offloaded MUL_MATs"
            ));
        }
        _ => bail!("unexpected hybrid routing: {line}"),
    }
    let t = std::time::Instant::now();
    let kld = crate::parity::quick_check_with(Model::Qwen3Tiny, crate::face::Face::Hybrid)?;
    notes.push(format!("{kld} ({:.0} s)", t.elapsed().as_secs_f64()));
    Ok(notes.join("; "))
}

/// A host with another API version: the library is refused with one clear line and the host goes on.
fn api_mismatch(env: &Env) -> Result<String> {
    let mut c = env.tool("test-backend-ops");
    c.args([
        "test",
        "-o",
        "MUL_MAT",
        "-p",
        "type_a=q8_0,type_b=f32,m=16,n=1,k=256",
    ])
    .env("GGML_COREML_GGML_API_VERSION", "3");
    let out = run_capture(&mut c)?;
    let line = out
        .lines()
        .find(|l| l.contains("incompatible API version"))
        .map(str::to_string);
    match line {
        Some(l) if !out.contains("Backend CoreML") => Ok(l.trim().to_string()),
        _ => bail!("expected the host to refuse the library with an API-version line:\n{out}"),
    }
}
