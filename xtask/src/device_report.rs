//! `cargo xtask device-report`: everything the first person with a Mac should run, in one go, written
//! to one markdown + JSON report to send back (docs/apple.md §1).
//!
//! Steps: the device suite, the llama.cpp host, models and backend, `cargo xtask run`, a llama-bench
//! comparison (stock CPU vs the ACCEL face at `-ngl 0`; stock Metal vs the hybrid `CoreML-Metal`; Metal
//! alone vs the CPU; the ACCEL face once more under 64 MiB weight and surface budgets), and
//! `parity --quick`. A failing step is recorded and the report goes on.
//!
//! Every llama-bench step runs under `/usr/bin/time -l` (peak RSS, and peak memory footprint on recent
//! macOS), and each of ours writes the library's statistics (`GGML_COREML_STATS_FILE`) into the report
//! directory; the report's Memory table sets our accounted bytes next to both peaks.
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

use crate::face::{self, Memory};
use crate::models::{Model, model_path};
use crate::{bench, log, paths};

/// The model and type of the bench comparison.
const BENCH_MODEL: Model = Model::Gemma3_270m;
const BENCH_QUANT: &str = "Q8_0";
const BENCH_PROMPT: &str = "512";
const BENCH_GEN: &str = "32";
const BENCH_REPS: &str = "3";
/// The bounded row: one repetition (it re-prepares weights per call, so it is the slow one) under
/// these budgets, MiB.
const BOUNDED_REPS: &str = "1";
const BOUNDED_BUDGET_MB: &str = "64";

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
    /// Run under `/usr/bin/time -l` (every bench row, stock and ours alike).
    timed: bool,
    /// Ours: the library's statistics file (also in `env` as `GGML_COREML_STATS_FILE`).
    stats_file: Option<PathBuf>,
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
            timed: false,
            stats_file: None,
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
        if self.timed {
            let _ = write!(s, "{} -l ", crate::bench::TIME);
        }
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
    /// Timed steps: `time -l`'s peaks, MiB (`None`: not printed).
    peak_rss_mib: Option<f64>,
    peak_footprint_mib: Option<f64>,
    /// Ours: MUL_MATs offloaded and the statistics' `memory` section (`None`: no readable file).
    offloaded_ops: Option<u64>,
    memory: Option<Memory>,
}

#[derive(Debug, Serialize)]
struct Report {
    created: String,
    machine: String,
    steps: Vec<StepResult>,
    comparisons: Vec<Comparison>,
    memory: Vec<MemoryRow>,
}

/// One of our bench rows next to its stock row: peaks of both processes and our accounted bytes.
#[derive(Debug, Serialize)]
struct MemoryRow {
    ours: String,
    stock: String,
    stock_rss_mib: Option<f64>,
    ours_rss_mib: Option<f64>,
    stock_footprint_mib: Option<f64>,
    ours_footprint_mib: Option<f64>,
    offloaded_ops: Option<u64>,
    /// The statistics' `memory` section (absent: no readable statistics file).
    stats: Option<Memory>,
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

/// `out`: the report directory, where ours write their statistics files.
fn plan(out: &Path) -> Vec<Step> {
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
    let bench =
        |row: &str, why: &str, ngl: &str, reps: &str, extra: &[&str], env: &[(&str, String)]| {
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
                reps,
                "-o",
                "json",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            // Ours (the library loaded): its statistics, one file per step, next to the report.
            let stats_file = env.iter().any(|(k, _)| k == "GGML_BACKEND_PATH").then(|| {
                let f = out.join(format!("{row}.stats.json"));
                env.push((
                    "GGML_COREML_STATS_FILE".into(),
                    f.to_string_lossy().into_owned(),
                ));
                f
            });
            Step {
                name: format!("bench: {row}"),
                why: why.into(),
                program: bin.to_string_lossy().into_owned(),
                args,
                env,
                bench: Some(row.into()),
                timed: true,
                stats_file,
            }
        };
    let ours = ("GGML_BACKEND_PATH", lib.to_string_lossy().into_owned());
    let log_info = ("GGML_COREML_LOG", "info".to_owned());
    let budget = |k: &'static str| (k, BOUNDED_BUDGET_MB.to_owned());
    steps.extend([
        bench("cpu", "stock llama.cpp, CPU only", "0", BENCH_REPS, &[], &[]),
        bench(
            "accel",
            "the ACCEL face: CPU layers, MUL_MATs on the ANE",
            "0",
            BENCH_REPS,
            &[],
            &[ours.clone(), log_info.clone()],
        ),
        bench(
            "accel-bounded",
            "the ACCEL face under 64 MiB weight and surface budgets: the capped footprint (1 repetition)",
            "0",
            BOUNDED_REPS,
            &[],
            &[
                ours.clone(),
                log_info.clone(),
                budget("GGML_COREML_WEIGHT_BUDGET_MB"),
                budget("GGML_COREML_SURFACE_BUDGET_MB"),
            ],
        ),
        bench("metal", "stock llama.cpp, Metal", "99", BENCH_REPS, &[], &[]),
        bench(
            "hybrid-metal",
            "the hybrid face CoreML-Metal: Metal owns the graph, MUL_MATs on the ANE",
            "99",
            BENCH_REPS,
            &["--device", "CoreML-Metal"],
            &[ours, ("GGML_COREML_HYBRID", "Metal".into()), log_info],
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
    let on_mac = cfg!(target_os = "macos");
    let dry = args.dry_run || !on_mac;
    let out = args.out.unwrap_or_else(|| {
        if dry {
            PathBuf::from("device-report/<UTC time>")
        } else {
            paths::workspace_root()
                .join("device-report")
                .join(crate::bench::utc_iso().replace(':', ""))
        }
    });
    // Steps run in the workspace root: a relative --out must name the same directory there.
    let out = if dry {
        out
    } else {
        std::path::absolute(&out).unwrap_or(out)
    };
    let steps = plan(&out);
    if dry {
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
            "and write {}/report.md + report.json (step results, llama-bench ratios, and a Memory table: \
             peak RSS / peak footprint of stock and ours, our prepared MiB, executor surfaces (weights / io), \
             raw pages released, weight fills and surface evictions where the statistics carry them).",
            out.display()
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
    let memory = memory_rows(&results);
    let report = Report {
        created: crate::bench::utc_iso(),
        machine: machine(),
        steps: results,
        comparisons,
        memory,
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
    // A stale file from an earlier run with this --out would pass for this run's statistics.
    if let Some(f) = &step.stats_file {
        let _ = fs::remove_file(f);
    }
    // macOS `time -l` prints peak RSS and (recent macOS) peak memory footprint, in bytes.
    let program = Path::new(&step.program);
    let mut c = match step.timed {
        true => crate::bench::timed(program).unwrap_or_else(|| Command::new(program)),
        false => Command::new(program),
    };
    c.args(&step.args)
        .current_dir(paths::workspace_root())
        .stdin(Stdio::null());
    if step.bench.is_some() {
        crate::face::clean_env(&mut c);
    }
    for (k, v) in &step.env {
        c.env(k, v);
    }
    let (ok, exit, text, stdout, stderr) = match c.output() {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            (
                o.status.success(),
                o.status.code(),
                format!("{out}\n{err}"),
                out,
                err,
            )
        }
        Err(e) => (
            false,
            None,
            format!("cannot start: {e}"),
            String::new(),
            String::new(),
        ),
    };
    let _ = fs::write(log_path, &text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    let bench_tps = if step.bench.is_some() {
        parse_bench(&stdout)
    } else {
        Vec::new()
    };
    // Read even after a failure: whatever was measured is reported, anything missing is n/a.
    let (peak_rss_mib, peak_footprint_mib) = if step.timed {
        (
            bench::parse_peak_rss(&stderr),
            bench::parse_peak_footprint(&stderr),
        )
    } else {
        (None, None)
    };
    let stats = step.stats_file.as_deref();
    let offloaded_ops = stats.and_then(face::read_stats).map(|(n, _)| n);
    let memory = stats.and_then(face::read_memory);
    StepResult {
        step,
        ok,
        exit,
        seconds: t.elapsed().as_secs_f64(),
        tail,
        bench_tps,
        peak_rss_mib,
        peak_footprint_mib,
        offloaded_ops,
        memory,
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
            "ACCEL face, 64 MiB budgets (-r 1) vs stock CPU",
            "cpu",
            "accel-bounded",
        ),
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

/// Our bench rows and the stock row each is compared with.
const MEMORY_PAIRS: [(&str, &str); 3] = [
    ("accel", "cpu"),
    ("accel-bounded", "cpu"),
    ("hybrid-metal", "metal"),
];

fn memory_rows(results: &[StepResult]) -> Vec<MemoryRow> {
    let row = |name: &str| {
        results
            .iter()
            .find(|r| r.step.bench.as_deref() == Some(name))
    };
    MEMORY_PAIRS
        .iter()
        .filter_map(|&(ours, stock)| {
            let o = row(ours)?;
            let s = row(stock);
            Some(MemoryRow {
                ours: ours.into(),
                stock: stock.into(),
                stock_rss_mib: s.and_then(|s| s.peak_rss_mib),
                ours_rss_mib: o.peak_rss_mib,
                stock_footprint_mib: s.and_then(|s| s.peak_footprint_mib),
                ours_footprint_mib: o.peak_footprint_mib,
                offloaded_ops: o.offloaded_ops,
                stats: o.memory.clone(),
            })
        })
        .collect()
}

/// A number or `n/a`.
fn num<T: Into<f64> + Copy>(v: Option<T>, digits: usize) -> String {
    v.map_or("n/a".into(), |x| format!("{:.*}", digits, x.into()))
}

fn memory_markdown(s: &mut String, rows: &[MemoryRow]) {
    let _ = writeln!(
        s,
        "\n## Memory (MiB; peaks from `/usr/bin/time -l`, accounted bytes from `GGML_COREML_STATS_FILE`)\n\n\
         | ours | vs | peak RSS stock / ours | ours − stock | peak footprint stock / ours | prepared | \
         executor surfaces (weights / io) | raw released | prepared per call (sliced) | weight fills | \
         surface evictions |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let m = r.stats.clone().unwrap_or_default();
        let delta = match (r.ours_rss_mib, r.stock_rss_mib) {
            (Some(o), Some(s)) => format!("{:+.1}", o - s),
            _ => "n/a".into(),
        };
        let u = |v: Option<u64>| v.map_or("n/a".into(), |x| x.to_string());
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {delta} | {} / {} | {} | {} ({} / {}) | {} | {} ({}) | {} | {} |",
            r.ours,
            r.stock,
            num(r.stock_rss_mib, 1),
            num(r.ours_rss_mib, 1),
            num(r.stock_footprint_mib, 1),
            num(r.ours_footprint_mib, 1),
            num(m.prepared_mib, 1),
            num(m.executor_surfaces_mib, 1),
            num(m.executor_weight_surfaces_mib, 1),
            num(m.executor_io_surfaces_mib, 1),
            num(m.raw_released_mib, 1),
            u(m.prepared_per_call),
            u(m.sliced_calls),
            u(m.weight_fills),
            u(m.surface_evictions),
        );
    }
    let _ = writeln!(
        s,
        "\n`accel-bounded` ran with `GGML_COREML_WEIGHT_BUDGET_MB={BOUNDED_BUDGET_MB} \
         GGML_COREML_SURFACE_BUDGET_MB={BOUNDED_BUDGET_MB}`. n/a: not measured (no `time -l` line, no \
         statistics file, or a counter this library does not write). Every field of the statistics' \
         `memory` section is in report.json (`memory[].stats`); the whole files are `<row>.stats.json` here."
    );
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
    memory_markdown(&mut s, &r.memory);
    let _ = writeln!(s, "\n## Output tails\n");
    for x in &r.steps {
        let _ = writeln!(s, "### {}\n\n```\n{}\n```\n", x.step.name, x.tail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(step: &Step, rss: Option<f64>, memory: Option<Memory>) -> StepResult {
        StepResult {
            step: step.clone(),
            ok: true,
            exit: Some(0),
            seconds: 1.0,
            tail: String::new(),
            bench_tps: Vec::new(),
            peak_rss_mib: rss,
            peak_footprint_mib: None,
            offloaded_ops: memory.as_ref().map(|_| 12),
            memory,
        }
    }

    #[test]
    fn plan_times_every_bench_and_gives_ours_a_statistics_file() {
        let out = Path::new("/tmp/report");
        let steps = plan(out);
        let bench: Vec<&Step> = steps.iter().filter(|s| s.bench.is_some()).collect();
        assert!(bench.iter().all(|s| s.timed));
        assert!(
            bench[0]
                .command_line()
                .contains("/usr/bin/time -l llama-bench")
        );
        for s in &bench {
            let ours = s.env.iter().any(|(k, _)| k == "GGML_BACKEND_PATH");
            assert_eq!(s.stats_file.is_some(), ours, "{}", s.name);
            if let Some(f) = &s.stats_file {
                assert!(f.starts_with(out));
                assert!(
                    s.env
                        .iter()
                        .any(|(k, v)| k == "GGML_COREML_STATS_FILE" && Path::new(v) == f.as_path())
                );
            }
        }
        let bounded = bench
            .iter()
            .find(|s| s.bench.as_deref() == Some("accel-bounded"))
            .unwrap();
        let line = bounded.command_line();
        assert!(line.contains("GGML_COREML_WEIGHT_BUDGET_MB=64"));
        assert!(line.contains("GGML_COREML_SURFACE_BUDGET_MB=64"));
        assert!(line.contains("-r 1 "));
        // Every ours row has its stock row in the Memory table.
        for (ours, stock) in MEMORY_PAIRS {
            assert!(bench.iter().any(|s| s.bench.as_deref() == Some(ours)));
            assert!(bench.iter().any(|s| s.bench.as_deref() == Some(stock)));
        }
    }

    #[test]
    fn memory_table_says_n_a_for_what_is_missing() {
        let steps = plan(Path::new("/tmp/report"));
        let by = |row: &str| {
            steps
                .iter()
                .find(|s| s.bench.as_deref() == Some(row))
                .unwrap()
        };
        let mem = Memory {
            prepared_mib: Some(301.5),
            executor_surfaces_mib: Some(322.7),
            executor_weight_surfaces_mib: Some(301.5),
            executor_io_surfaces_mib: Some(21.2),
            raw_released_mib: Some(158.9),
            prepared_per_call: Some(0),
            sliced_calls: Some(0),
            ..Memory::default()
        };
        let results = vec![
            result(by("cpu"), Some(400.0), None),
            result(by("accel"), Some(520.5), Some(mem)),
            // The bounded run wrote no statistics and time printed nothing: all n/a, no failure.
            result(by("accel-bounded"), None, None),
        ];
        let rows = memory_rows(&results);
        assert_eq!(rows.len(), 2, "hybrid-metal did not run: no row");
        assert_eq!(rows[0].stock_rss_mib, Some(400.0));
        let mut md = String::new();
        memory_markdown(&mut md, &rows);
        assert!(
            md.contains(
                "| accel | cpu | 400.0 / 520.5 | +120.5 | n/a / n/a | 301.5 | 322.7 (301.5 / 21.2) | 158.9 | 0 (0) | n/a | n/a |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| accel-bounded | cpu | 400.0 / n/a | n/a | n/a / n/a | n/a | n/a (n/a / n/a) | n/a | n/a (n/a) | n/a | n/a |"
            ),
            "{md}"
        );
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["stats"]["executor_io_surfaces_mib"], 21.2);
        assert!(json[1]["stats"].is_null());
    }
}
