//! `cargo xtask device-report`: everything the first person with a Mac should run, in one go, written
//! to one markdown + JSON report to send back (docs/apple.md §1).
//!
//! Steps: the device suite, the llama.cpp host, models and backend, `cargo xtask run`, a llama-bench
//! comparison (stock CPU vs the ACCEL face at `-ngl 0`; stock Metal vs the hybrid `CoreML-Metal`; Metal
//! alone vs the CPU), and `parity --quick`. A failing step is recorded and the report goes on.
//!
//! Off macOS it prints the plan and exits non-zero: nothing here means anything without the Neural
//! Engine.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::models::{Model, model_path};
use crate::{log, paths};

/// The model and type of the bench comparison.
const BENCH_MODEL: Model = Model::Gemma3_270m;
const BENCH_QUANT: &str = "Q8_0";
const BENCH_PROMPT: &str = "512";
const BENCH_GEN: &str = "32";
const BENCH_REPS: &str = "3";

#[derive(clap::Args, Debug)]
pub struct DeviceReportArgs {
    /// Print the plan and run nothing (any OS).
    #[arg(long)]
    dry_run: bool,
    /// Output directory (default: device-report/<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One command of the plan.
#[derive(Clone, Debug, Serialize)]
struct Step {
    name: String,
    /// What the step shows.
    why: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// llama-bench runs: which bench row this is (`None` for other steps).
    bench: Option<String>,
}

impl Step {
    fn cargo(name: &str, why: &str, args: &[&str]) -> Step {
        Step {
            name: name.into(),
            why: why.into(),
            program: std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            bench: None,
        }
    }

    fn command_line(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            let _ = write!(s, "{k}={v} ");
        }
        let prog = Path::new(&self.program)
            .file_name()
            .map_or(self.program.clone(), |f| f.to_string_lossy().into_owned());
        s.push_str(&prog);
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

#[derive(Debug, Serialize)]
struct StepResult {
    step: Step,
    ok: bool,
    exit: Option<i32>,
    seconds: f64,
    /// The last lines of stdout + stderr.
    tail: String,
    /// llama-bench: tokens per second per test (`pp512`, `tg32`).
    bench_tps: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
struct Report {
    created: String,
    machine: String,
    steps: Vec<StepResult>,
    comparisons: Vec<Comparison>,
}

#[derive(Debug, Serialize)]
struct Comparison {
    what: String,
    test: String,
    base_tps: f64,
    ours_tps: f64,
    ratio: f64,
}

fn lib_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"));
    target.join("release/libggml-coreml.dylib")
}

fn plan() -> Vec<Step> {
    let mut steps = vec![
        Step::cargo(
            "device suite",
            "compile, placement verdicts, numerics, cache, startup probe, timings on this device",
            &[
                "test",
                "-p",
                "ggml-coreml-executor",
                "--features",
                "device",
                "--release",
                "--test",
                "device",
                "--",
                "--nocapture",
                "--test-threads=1",
            ],
        ),
        Step::cargo(
            "llama.cpp host",
            "llama.cpp with Metal built from PyPI's llama-cpp-python sdist",
            &["xtask", "host"],
        ),
        Step::cargo("models", "small GGUF test models", &["xtask", "models"]),
        Step::cargo(
            "backend",
            "the backend dylib (deployment target 26.0)",
            &["xtask", "build"],
        ),
        Step::cargo(
            "xtask run",
            "a real model through llama.cpp with and without the backend; routing report",
            &["xtask", "run"],
        ),
    ];
    let bin = paths::host_bin_dir().join("llama-bench");
    let model = model_path(&paths::models_dir(), BENCH_MODEL, BENCH_QUANT);
    let lib = lib_path();
    let bench = |row: &str, why: &str, ngl: &str, extra: &[&str], env: &[(&str, String)]| {
        let mut args: Vec<String> = [
            "-m",
            &model.to_string_lossy(),
            "-ngl",
            ngl,
            "-p",
            BENCH_PROMPT,
            "-n",
            BENCH_GEN,
            "-r",
            BENCH_REPS,
            "-o",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Step {
            name: format!("bench: {row}"),
            why: why.into(),
            program: bin.to_string_lossy().into_owned(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            bench: Some(row.into()),
        }
    };
    let ours = ("GGML_BACKEND_PATH", lib.to_string_lossy().into_owned());
    let stats = |name: &str| ("GGML_COREML_LOG", name.to_owned());
    steps.extend([
        bench("cpu", "stock llama.cpp, CPU only", "0", &[], &[]),
        bench(
            "accel",
            "the ACCEL face: CPU layers, MUL_MATs on the ANE",
            "0",
            &[],
            &[ours.clone(), stats("info")],
        ),
        bench("metal", "stock llama.cpp, Metal", "99", &[], &[]),
        bench(
            "hybrid-metal",
            "the hybrid face CoreML-Metal: Metal owns the graph, MUL_MATs on the ANE",
            "99",
            &["--device", "CoreML-Metal"],
            &[ours, ("GGML_COREML_HYBRID", "Metal".into()), stats("info")],
        ),
    ]);
    steps.push(Step::cargo(
        "parity --quick",
        "numerical parity (KL divergence) of the ANE path against stock",
        &["xtask", "parity", "--quick"],
    ));
    steps
}

pub fn main(args: DeviceReportArgs) -> Result<Option<PathBuf>> {
    let steps = plan();
    let on_mac = cfg!(target_os = "macos");
    if args.dry_run || !on_mac {
        println!("cargo xtask device-report would run, in order:");
        for (i, s) in steps.iter().enumerate() {
            println!(
                "{:2}. {} — {}\n      {}",
                i + 1,
                s.name,
                s.why,
                s.command_line()
            );
        }
        println!(
            "and write device-report/<UTC time>/report.md + report.json (step results, llama-bench ratios)."
        );
        if args.dry_run {
            return Ok(None);
        }
        bail!(
            "device-report needs a Mac with Apple silicon and macOS 26 (this is {}): it measures the \
             Neural Engine, which only such a machine has. Nothing was run.",
            std::env::consts::OS
        );
    }
    let out = args.out.unwrap_or_else(|| {
        paths::workspace_root()
            .join("device-report")
            .join(crate::bench::utc_iso().replace(':', ""))
    });
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut results = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        log!(
            "device-report: step {}: {} ({})",
            i + 1,
            s.name,
            s.command_line()
        );
        let r = run_step(s, &out.join(format!("step-{:02}.log", i + 1)));
        log!(
            "device-report: {} {} in {:.0} s",
            r.step.name,
            if r.ok { "passed" } else { "FAILED" },
            r.seconds
        );
        results.push(r);
    }
    let comparisons = compare(&results);
    let report = Report {
        created: crate::bench::utc_iso(),
        machine: machine(),
        steps: results,
        comparisons,
    };
    fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    fs::write(out.join("report.md"), markdown(&report))?;
    let failed = report.steps.iter().filter(|r| !r.ok).count();
    log!(
        "device-report: {} steps, {failed} failed; send {} (and report.json)",
        report.steps.len(),
        out.join("report.md").display()
    );
    Ok(Some(out.join("report.md")))
}

fn run_step(step: Step, log_path: &Path) -> StepResult {
    let t = Instant::now();
    let mut c = Command::new(&step.program);
    c.args(&step.args)
        .current_dir(paths::workspace_root())
        .stdin(Stdio::null());
    if step.bench.is_some() {
        crate::face::clean_env(&mut c);
    }
    for (k, v) in &step.env {
        c.env(k, v);
    }
    let (ok, exit, text, stdout) = match c.output() {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            (
                o.status.success(),
                o.status.code(),
                format!("{out}\n{err}"),
                out,
            )
        }
        Err(e) => (false, None, format!("cannot start: {e}"), String::new()),
    };
    let _ = fs::write(log_path, &text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    let bench_tps = if step.bench.is_some() {
        parse_bench(&stdout)
    } else {
        Vec::new()
    };
    StepResult {
        step,
        ok,
        exit,
        seconds: t.elapsed().as_secs_f64(),
        tail,
        bench_tps,
    }
}

/// `(test, avg tokens/s)` from llama-bench's `-o json` (an array of runs with n_prompt, n_gen, avg_ts).
fn parse_bench(stdout: &str) -> Vec<(String, f64)> {
    let start = stdout.find('[').unwrap_or(0);
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&stdout[start..]) else {
        return Vec::new();
    };
    v.as_array()
        .map(|runs| {
            runs.iter()
                .filter_map(|r| {
                    let (p, g) = (r["n_prompt"].as_u64()?, r["n_gen"].as_u64()?);
                    let test = if p > 0 {
                        format!("pp{p}")
                    } else {
                        format!("tg{g}")
                    };
                    Some((test, r["avg_ts"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn compare(results: &[StepResult]) -> Vec<Comparison> {
    let tps = |row: &str, test: &str| {
        results
            .iter()
            .find(|r| r.step.bench.as_deref() == Some(row))
            .and_then(|r| r.bench_tps.iter().find(|(t, _)| t == test).map(|(_, v)| *v))
    };
    let mut out = Vec::new();
    for (what, base, ours) in [
        ("ACCEL face (-ngl 0) vs stock CPU", "cpu", "accel"),
        (
            "hybrid CoreML-Metal vs stock Metal",
            "metal",
            "hybrid-metal",
        ),
        ("stock Metal vs stock CPU", "cpu", "metal"),
    ] {
        for test in [format!("pp{BENCH_PROMPT}"), format!("tg{BENCH_GEN}")] {
            if let (Some(b), Some(o)) = (tps(base, &test), tps(ours, &test)) {
                out.push(Comparison {
                    what: what.into(),
                    test: test.clone(),
                    base_tps: b,
                    ours_tps: o,
                    ratio: if b > 0.0 { o / b } else { 0.0 },
                });
            }
        }
    }
    out
}

fn machine() -> String {
    let get = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{} {} ({}), {}",
        get(&["sw_vers", "-productName"]),
        get(&["sw_vers", "-productVersion"]),
        get(&["sw_vers", "-buildVersion"]),
        get(&["sysctl", "-n", "machdep.cpu.brand_string"])
    )
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ggml-coreml device report\n");
    let _ = writeln!(s, "- created {}\n- machine {}\n", r.created, r.machine);
    let _ = writeln!(
        s,
        "## Steps\n\n| # | step | result | time | command |\n|---|---|---|---|---|"
    );
    for (i, x) in r.steps.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} s | `{}` |",
            i + 1,
            x.step.name,
            if x.ok { "pass" } else { "**FAIL**" },
            x.seconds,
            x.step.command_line().replace('|', "\\|")
        );
    }
    let _ = writeln!(
        s,
        "\n## llama-bench ({BENCH_MODEL:?} {BENCH_QUANT}, tokens/s)\n\n| comparison | test | base | ours | ratio |\n|---|---|---|---|---|"
    );
    for c in &r.comparisons {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.2}x |",
            c.what, c.test, c.base_tps, c.ours_tps, c.ratio
        );
    }
    let _ = writeln!(s, "\n## Output tails\n");
    for x in &r.steps {
        let _ = writeln!(s, "### {}\n\n```\n{}\n```\n", x.step.name, x.tail);
    }
    s
}
