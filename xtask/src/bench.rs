//! `cargo xtask bench`: llama-bench with and without the backend, alternating in one run (stock, ours per
//! policy, stock, ours… for r repetitions), over a model × quant × policy matrix, through the ACCEL face
//! (`-ngl 0` on both sides) or, with `--face hybrid`, the hybrid face (stock `-ngl 99` vs ours
//! `GGML_COREML_HYBRID=CPU … -ngl 99 --device CoreML-CPU`). Reports prefill latency,
//! TTFT, decode speed, peak RSS, energy and thermal samples where the platform exposes them, and ratios;
//! writes `bench-out/<UTC time>/{results.json,report.md,prefill_speedup.png}`, and for the default matrix
//! `docs/benchmarks.md`. Also prints the projected pp4096 speed-ups per chip (a projection, not a
//! measurement) from the policy's cost model.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::face::{self, Face};
use crate::models::{self, Model, ModelSet};
use crate::{backend, host, log, paths, util, venv};

/// The policy name under which our runs set no `GGML_COREML_POLICY` (the library's own default).
const DEFAULT_POLICY: &str = "default";

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// `default` (under 10 minutes on 2 Linux cores) or `full` (every model, type and policy; hours).
    #[arg(long, default_value = "default")]
    matrix: String,
    /// Comma-separated models (overrides the matrix).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Comma-separated weight types (overrides the matrix).
    #[arg(long, value_delimiter = ',')]
    quants: Vec<String>,
    /// Comma-separated policies for our runs: latency, energy, always, off, or `default` (no
    /// GGML_COREML_POLICY: whatever the library defaults to) (overrides the matrix).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Comma-separated prompt lengths in tokens (overrides the matrix).
    #[arg(long, value_delimiter = ',')]
    prompt: Vec<usize>,
    /// Repetitions (each one: stock, then ours per policy).
    #[arg(long, short)]
    reps: Option<usize>,
    /// Tokens generated for the decode speed.
    #[arg(long = "gen")]
    n_gen: Option<usize>,
    /// Output directory (default: bench-out/<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The face our runs go through: `accel` (both sides `-ngl 0`) or `hybrid` (stock `-ngl 99`, ours
    /// `GGML_COREML_HYBRID=CPU`, `-ngl 99 --device CoreML-CPU`; its own default matrix).
    #[arg(long, value_enum, default_value_t = Face::Accel)]
    face: Face,
    /// Stock runs with llama-bench's `--repack 0`: weights in the CPU's plain buffer type (no CPU_REPACK),
    /// as the hybrid face's layers are.
    #[arg(long)]
    stock_no_repack: bool,
    /// Measure nothing: render report.md (and, for a default matrix, docs/benchmarks.md) again from the
    /// results.json of an earlier run's directory.
    #[arg(long, value_name = "DIR")]
    rerender: Option<PathBuf>,
}

/// What a matrix runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Matrix {
    pub name: String,
    pub models: Vec<String>,
    pub quants: Vec<String>,
    pub policies: Vec<String>,
    pub prompts: Vec<usize>,
    pub reps: usize,
    pub n_gen: usize,
    /// The face our runs went through (results written before faces existed: ACCEL).
    #[serde(default)]
    pub face: Face,
    /// Stock ran with `--repack 0`.
    #[serde(default)]
    pub stock_no_repack: bool,
}

impl Matrix {
    /// Two real-shaped models in Q8_0, the default and the testing policy, two prompt lengths, twice
    /// (about 1 minute on 2 idle cores, under 7 minutes when they are shared by a load of 8).
    pub fn default_matrix() -> Matrix {
        Matrix {
            name: "default".into(),
            models: vec!["gemma-3-270m".into(), "qwen3-tiny".into()],
            quants: vec!["Q8_0".into()],
            policies: vec!["latency".into(), "always".into()],
            prompts: vec![512, 1024],
            reps: 2,
            n_gen: 16,
            face: Face::Accel,
            stock_no_repack: false,
        }
    }

    /// The hybrid face's default: the library's default policy (and `always`) against stock with every
    /// layer "offloaded" (`-ngl 99`, CPU only), pp512 and tg128, twice.
    pub fn hybrid_matrix() -> Matrix {
        Matrix {
            name: "default".into(),
            models: vec!["gemma-3-270m".into(), "qwen3-tiny".into()],
            quants: vec!["Q8_0".into()],
            policies: vec![DEFAULT_POLICY.into(), "always".into()],
            prompts: vec![512],
            reps: 2,
            n_gen: 128,
            face: Face::Hybrid,
            stock_no_repack: false,
        }
    }

    /// Every model × type × policy, prompts up to 4K, three repetitions.
    pub fn full_matrix() -> Matrix {
        Matrix {
            name: "full".into(),
            models: Model::ALL.iter().map(|m| m.name().to_string()).collect(),
            quants: models::FULL_QUANTS.iter().map(|q| q.to_string()).collect(),
            policies: vec!["latency".into(), "energy".into(), "always".into()],
            prompts: vec![512, 1024, 2048, 4096],
            reps: 3,
            n_gen: 64,
            face: Face::Accel,
            stock_no_repack: false,
        }
    }
}

/// Facts about the machine a run was made on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub date: String,
    pub nproc: usize,
    pub cpu: String,
    pub os: String,
    /// `/proc/loadavg` (1, 5, 15 min) at start.
    pub load: String,
    pub host: String,
    pub git: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .or_else(|| cmd_out("sysctl", &["-n", "machdep.cpu.brand_string"]))
            .unwrap_or_else(|| "unknown".into());
        let load = load_average();
        let os = cmd_out("uname", &["-srm"]).unwrap_or_else(|| std::env::consts::OS.to_string());
        let git = cmd_out(
            "git",
            &[
                "-C",
                &paths::workspace_root().to_string_lossy(),
                "describe",
                "--always",
                "--dirty",
            ],
        )
        .unwrap_or_else(|| "n/a".into());
        Machine {
            date: utc_iso(),
            nproc: util::default_jobs(),
            cpu,
            os,
            load,
            host: format!(
                "llama.cpp via llama-cpp-python {}",
                host::LLAMA_CPP_PYTHON_VERSION
            ),
            git,
        }
    }
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`, or `sysctl vm.loadavg` on macOS).
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .or_else(|| {
            cmd_out("sysctl", &["-n", "vm.loadavg"]).map(|s| {
                s.trim_matches(|c| c == '{' || c == '}' || c == ' ')
                    .to_string()
            })
        })
        .unwrap_or_else(|| "n/a".into())
}

fn cmd_out(prog: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// One llama-bench test (a prompt length or the generation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TestResult {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub avg_ns: f64,
    pub avg_ts: f64,
    pub samples: usize,
}

/// One llama-bench process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub model: String,
    pub quant: String,
    /// `stock` or the policy of our run.
    pub policy: String,
    pub rep: usize,
    pub backends: String,
    pub tests: Vec<TestResult>,
    pub wall_s: f64,
    pub peak_rss_mib: Option<f64>,
    /// Whole-process package energy (RAPL) and tokens processed.
    pub energy_j: Option<f64>,
    pub tokens: usize,
    pub thermal_before: Option<String>,
    pub thermal_after: Option<String>,
    /// MUL_MATs our backend offloaded (its stats file), for our runs.
    pub offloaded_ops: Option<u64>,
    /// The policy the library reports having used (its stats file), for our runs.
    #[serde(default)]
    pub policy_in_effect: Option<String>,
    /// Hybrid face: graphs the hybrid device computed (its `hybrid summary` log lines).
    #[serde(default)]
    pub hybrid_graphs: Option<u64>,
    /// Our accounted bytes (the stats' `memory` section), for our runs: prepared forms resident and
    /// raw weight pages handed back to the OS, MiB.
    #[serde(default)]
    pub prepared_mib: Option<f64>,
    #[serde(default)]
    pub released_mib: Option<f64>,
}

impl RunRecord {
    fn prompt_ms(&self, n: usize) -> Option<f64> {
        self.tests
            .iter()
            .find(|t| t.n_prompt == n && t.n_gen == 0)
            .map(|t| t.avg_ns / 1e6)
    }
    fn decode(&self) -> Option<&TestResult> {
        self.tests.iter().find(|t| t.n_prompt == 0 && t.n_gen > 0)
    }
    /// Milliseconds per generated token.
    fn decode_ms(&self) -> Option<f64> {
        self.decode()
            .map(|t| t.avg_ns / 1e6 / t.n_gen.max(1) as f64)
    }
    fn energy_per_token(&self) -> Option<f64> {
        self.energy_j
            .filter(|_| self.tokens > 0)
            .map(|j| j / self.tokens as f64)
    }
}

/// Medians over repetitions for one model × quant × policy × prompt length, with ratios to stock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub quant: String,
    pub policy: String,
    pub prompt: usize,
    pub stock_prefill_ms: f64,
    pub ours_prefill_ms: f64,
    /// stock time / our time, median of per-repetition ratios (> 1: we are faster).
    pub prefill_speedup: f64,
    pub stock_ttft_ms: Option<f64>,
    pub ours_ttft_ms: Option<f64>,
    pub stock_decode_tps: Option<f64>,
    pub ours_decode_tps: Option<f64>,
    pub decode_ratio: Option<f64>,
    /// Best stock prefill time / best of ours over all repetitions: noise on a shared machine only
    /// ever slows a run down, so the fastest run of each side is the least disturbed one.
    #[serde(default)]
    pub prefill_best_ratio: Option<f64>,
    /// Best of our decode speeds / best stock decode speed.
    #[serde(default)]
    pub decode_best_ratio: Option<f64>,
    pub stock_rss_mib: Option<f64>,
    pub ours_rss_mib: Option<f64>,
    /// Prepared forms our run held (MiB) and the raw pages it released: the accounted bytes next to
    /// the peak RSS (issue #13's bound: ours − stock ≤ 1.05 × prepared + 32 MiB).
    #[serde(default)]
    pub ours_prepared_mib: Option<f64>,
    #[serde(default)]
    pub ours_released_mib: Option<f64>,
    pub stock_j_per_token: Option<f64>,
    pub ours_j_per_token: Option<f64>,
    pub offloaded_ops: Option<u64>,
    /// The policy the library reported (shows what `default` meant).
    #[serde(default)]
    pub policy_in_effect: Option<String>,
}

/// A projected pp4096 speed-up (cost model, not a measurement).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProjectionRow {
    pub model: String,
    pub chip: String,
    pub matmul_speedup: f64,
    pub prefill_speedup: f64,
    pub offloaded: usize,
    pub total: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    pub machine: Machine,
    pub matrix: Matrix,
    pub energy_source: String,
    pub thermal_source: String,
    pub rss_source: String,
    pub runs: Vec<RunRecord>,
    pub rows: Vec<Row>,
    pub projection: Vec<ProjectionRow>,
    /// Why the projection table is empty, if it is.
    pub projection_error: Option<String>,
    pub seconds: f64,
    /// Load averages when the last run ended (the machine may be shared: start and end bracket the run).
    #[serde(default)]
    pub load_end: Option<String>,
}

pub fn main(args: BenchArgs) -> Result<Option<PathBuf>> {
    if let Some(dir) = &args.rerender {
        let json = dir.join("results.json");
        let results: Results = serde_json::from_slice(
            &fs::read(&json).with_context(|| format!("cannot read {}", json.display()))?,
        )
        .with_context(|| format!("{} is not a bench results file", json.display()))?;
        write_outputs(&results, dir)?;
        return Ok(Some(dir.clone()));
    }
    let t0 = Instant::now();
    let command = std::iter::once("cargo xtask bench".to_string())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let machine = Machine::probe();
    let mut matrix = match (args.matrix.as_str(), args.face) {
        ("default", Face::Accel) => Matrix::default_matrix(),
        ("default", Face::Hybrid) => Matrix::hybrid_matrix(),
        ("full", face) => Matrix {
            face,
            ..Matrix::full_matrix()
        },
        (other, _) => bail!("unknown matrix `{other}` (default, full)"),
    };
    let overridden = !(args.models.is_empty()
        && args.quants.is_empty()
        && args.policies.is_empty()
        && args.prompt.is_empty())
        || args.reps.is_some()
        || args.n_gen.is_some()
        || args.stock_no_repack;
    matrix.stock_no_repack = args.stock_no_repack;
    if !args.models.is_empty() {
        matrix.models = args.models.clone();
    }
    if !args.quants.is_empty() {
        matrix.quants = args.quants.iter().map(|q| q.to_ascii_uppercase()).collect();
    }
    if !args.policies.is_empty() {
        matrix.policies = args
            .policies
            .iter()
            .map(|p| p.to_ascii_lowercase())
            .collect();
    }
    if !args.prompt.is_empty() {
        matrix.prompts = args.prompt.clone();
    }
    matrix.reps = args.reps.unwrap_or(matrix.reps);
    matrix.n_gen = args.n_gen.unwrap_or(matrix.n_gen);
    if overridden {
        matrix.name = format!("{} (modified)", matrix.name);
    }
    for p in &matrix.policies {
        ensure!(
            matches!(
                p.as_str(),
                "latency" | "energy" | "always" | "off" | DEFAULT_POLICY
            ),
            "unknown policy `{p}` (latency, energy, always, off, {DEFAULT_POLICY})"
        );
    }
    ensure!(
        matrix.reps >= 1 && !matrix.prompts.is_empty() && matrix.prompts.iter().all(|&p| p > 0),
        "need at least one repetition and positive prompt lengths"
    );
    let model_list: Vec<Model> = matrix
        .models
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_>>()?;

    let bin = host::ensure_host(None).context("host build")?;
    let models_dir = models::ensure_models(&ModelSet {
        models: model_list.clone(),
        quants: matrix.quants.clone(),
    })
    .context("models")?;
    let lib = backend::build_backend(true).context("backend build")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| paths::workspace_root().join("bench-out").join(utc_stamp()));
    fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.display()))?;

    let meter = Meters::probe();
    let per_config = 1 + matrix.policies.len();
    let total = model_list.len() * matrix.quants.len() * matrix.reps * per_config;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut runs = Vec::new();
    for &m in &model_list {
        for q in &matrix.quants {
            let model = models::model_path(&models_dir, m, q);
            ensure!(
                model.is_file(),
                "{} missing (cargo xtask models --quants {q})",
                model.display()
            );
            for rep in 0..matrix.reps {
                // Alternate: stock, then ours per policy, so drift (load, heat) hits both sides alike.
                for policy in
                    std::iter::once("stock").chain(matrix.policies.iter().map(String::as_str))
                {
                    bar.set_message(format!("{} {q} {policy} rep {}", m.name(), rep + 1));
                    let ours = (policy != "stock").then_some(policy);
                    let rec =
                        bench_once(&bin, &lib, &model, m, q, ours, rep, &matrix, &meter, &out)?;
                    bar.inc(1);
                    runs.push(rec);
                }
            }
        }
    }
    bar.finish_and_clear();
    let rows = summarise(&runs, &matrix);
    let (projection, projection_error) = match projections() {
        Ok(p) => (p, None),
        Err(e) => {
            log!("bench: projection: {e:#}");
            (Vec::new(), Some(format!("{e:#}")))
        }
    };
    let results = Results {
        command: command.clone(),
        machine,
        matrix: matrix.clone(),
        energy_source: meter.energy_source(),
        thermal_source: meter.thermal_source(),
        rss_source: meter.rss_source(),
        runs,
        rows,
        projection,
        projection_error,
        seconds: t0.elapsed().as_secs_f64(),
        load_end: Some(load_average()),
    };
    fs::write(
        out.join("results.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    write_outputs(&results, &out)?;
    Ok(Some(out))
}

/// report.md and the plot in `out` (which holds results.json), and docs/benchmarks.md for a default matrix.
fn write_outputs(results: &Results, out: &Path) -> Result<()> {
    let matrix = &results.matrix;
    let json = out.join("results.json");
    let plot = plot(&json, &out.join("prefill_speedup.png"));
    let md = render(
        results,
        plot.as_deref().ok().map(|_| "prefill_speedup.png"),
        plot.as_ref().err().map(|e| format!("{e:#}")),
    );
    fs::write(out.join("report.md"), &md)?;
    if matrix.name == "default" {
        let doc = paths::workspace_root().join("docs").join("benchmarks.md");
        let old = fs::read_to_string(&doc).unwrap_or_default();
        let new = match matrix.face {
            // The ACCEL default run rewrites the file and keeps the hybrid face's section.
            // The serving section (`cargo xtask serve-bench`) is kept too.
            // So is the hybrid face over CUDA (from the GPU machine's report, docs/architecture.md).
            Face::Accel => keep_cuda(
                &crate::serve::splice_serve(
                    &splice_hybrid(
                        &render_doc(results, out),
                        hybrid_section(&old).unwrap_or(""),
                    ),
                    crate::serve::serve_section(&old).unwrap_or(""),
                ),
                &old,
            ),
            Face::Hybrid => splice_hybrid(&old, &render_hybrid_section(results, out)),
        };
        fs::write(&doc, new).with_context(|| format!("cannot write {}", doc.display()))?;
        log!("bench: wrote {}", doc.display());
    }
    log!(
        "bench: {} runs in {:.0} s; report {}",
        results.runs.len(),
        results.seconds,
        out.join("report.md").display()
    );
    for r in &results.rows {
        log!(
            "bench: {} {} {} pp{}: prefill {:.2}x (best-of {}), decode {} (best-of {})",
            r.model,
            r.quant,
            r.policy,
            r.prompt,
            r.prefill_speedup,
            ratio(r.prefill_best_ratio),
            ratio(r.decode_ratio),
            ratio(r.decode_best_ratio)
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_once(
    bin: &Path,
    lib: &Path,
    model: &Path,
    m: Model,
    q: &str,
    policy: Option<&str>,
    rep: usize,
    mx: &Matrix,
    meter: &Meters,
    out: &Path,
) -> Result<RunRecord> {
    let tag = format!("{}-{q}-{}-r{rep}", m.name(), policy.unwrap_or("stock"));
    let stats = out.join("logs").join(format!("{tag}.stats.json"));
    let tool = bin.join("llama-bench");
    let mut c = match meter.time {
        true => timed(&tool).unwrap_or_else(|| Command::new(&tool)),
        false => Command::new(&tool),
    };
    let prompts: Vec<String> = mx.prompts.iter().map(|p| p.to_string()).collect();
    c.arg("-m").arg(model).args([
        "-p",
        &prompts.join(","),
        "-n",
        &mx.n_gen.to_string(),
        "-r",
        "1",
        "-t",
        "2",
        "-o",
        "json",
    ]);
    face::clean_env(&mut c);
    if mx.face == Face::Hybrid {
        // llama-bench drops every log line unless verbose; the hybrid device's summary is one (both sides
        // get the flag, so they run the same tool path).
        c.arg("-v");
    }
    match policy {
        None => {
            // Stock: the same layer placement as the face's (CPU only, so every layer is on the CPU).
            c.args(["-ngl", mx.face.stock_ngl()]);
            if mx.stock_no_repack {
                c.args(["--repack", "0"]);
            }
        }
        Some(p) => {
            mx.face.ours(&mut c);
            c.env("GGML_BACKEND_PATH", lib)
                .env("GGML_COREML_STATS_FILE", &stats);
            if p != DEFAULT_POLICY {
                c.env("GGML_COREML_POLICY", p);
            }
            if mx.face == Face::Hybrid {
                // The hybrid device's summary at backend free shows it really computed the graphs.
                c.env("GGML_COREML_LOG", "info");
            }
        }
    }
    let line = util::display_cmd(&c);
    let thermal_before = meter.thermal();
    let e0 = meter.energy_uj();
    let t = Instant::now();
    let o = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    let wall_s = t.elapsed().as_secs_f64();
    let e1 = meter.energy_uj();
    let thermal_after = meter.thermal();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let log_path = out.join("logs").join(format!("{tag}.log"));
    fs::write(
        &log_path,
        format!("$ {line}\n{stdout}\n--- stderr\n{stderr}"),
    )?;
    ensure!(
        o.status.success(),
        "`{line}` failed ({}); log {}",
        o.status,
        log_path.display()
    );
    let (tests, backends) = parse_bench_json(&stdout).with_context(|| {
        format!(
            "llama-bench output not understood; log {}",
            log_path.display()
        )
    })?;
    if policy.is_some() && !backends.contains("CoreML") {
        bail!(
            "llama-bench did not load the backend (backends: {backends}); log {}",
            log_path.display()
        );
    }
    let tokens = tests
        .iter()
        .map(|t| (t.n_prompt + t.n_gen) * t.samples)
        .sum();
    let (offloaded_ops, policy_in_effect) = match policy.and_then(|_| face::read_stats(&stats)) {
        Some((ops, p)) => (Some(ops), Some(p)),
        None => (None, None),
    };
    let memory = policy.and_then(|_| face::read_memory(&stats));
    let (prepared_mib, released_mib) = (
        memory.as_ref().and_then(|m| m.prepared_mib),
        memory.as_ref().and_then(|m| m.raw_released_mib),
    );
    let hybrid_graphs = (policy.is_some() && mx.face == Face::Hybrid)
        .then(|| hybrid_graphs(&stderr))
        .flatten();
    if policy.is_some() && mx.face == Face::Hybrid && hybrid_graphs.unwrap_or(0) == 0 {
        bail!(
            "the hybrid device {} computed no graph (no `hybrid summary` line); log {}",
            face::HYBRID_DEVICE,
            log_path.display()
        );
    }
    Ok(RunRecord {
        model: m.name().into(),
        quant: q.into(),
        policy: policy.unwrap_or("stock").into(),
        rep,
        backends,
        tests,
        wall_s,
        peak_rss_mib: parse_peak_rss(&stderr),
        energy_j: match (e0, e1) {
            (Some(a), Some(b)) => Some(meter.energy_delta(a, b) / 1e6),
            _ => None,
        },
        tokens,
        thermal_before,
        thermal_after,
        offloaded_ops,
        policy_in_effect,
        hybrid_graphs,
        prepared_mib,
        released_mib,
    })
}

/// Graphs the hybrid device computed, summed over the `hybrid summary: U graphs unsplit to …, S split (…)`
/// lines its backends log when freed (`GGML_COREML_LOG=info`); None without such a line.
pub fn hybrid_graphs(stderr: &str) -> Option<u64> {
    let mut total = None;
    for l in stderr.lines() {
        let Some(rest) = l.split("hybrid summary:").nth(1) else {
            continue;
        };
        let num_before = |key: &str| -> Option<u64> {
            rest.split(key)
                .next()?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        };
        let unsplit = num_before(" graphs unsplit")?;
        let split = rest
            .split_once(", ")
            .and_then(|(_, r)| r.split(" split (").next()?.trim().parse::<u64>().ok())?;
        total = Some(total.unwrap_or(0) + unsplit + split);
    }
    total
}

/// Tests of a `llama-bench -o json` run, and its `backends` column.
pub fn parse_bench_json(stdout: &str) -> Result<(Vec<TestResult>, String)> {
    let start = stdout.find('[').context("no JSON array")?;
    let end = stdout.rfind(']').context("no JSON array end")?;
    let v: Vec<serde_json::Value> = serde_json::from_str(&stdout[start..=end])?;
    let mut tests = Vec::new();
    let mut backends = String::new();
    for t in &v {
        let u = |k: &str| t.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as usize;
        let f = |k: &str| t.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        if backends.is_empty() {
            backends = t
                .get("backends")
                .and_then(|b| b.as_str())
                .unwrap_or("")
                .to_string();
        }
        let samples = t
            .get("samples_ns")
            .and_then(|s| s.as_array())
            .map_or(1, |a| a.len().max(1));
        tests.push(TestResult {
            n_prompt: u("n_prompt"),
            n_gen: u("n_gen"),
            avg_ns: f("avg_ns"),
            avg_ts: f("avg_ts"),
            samples,
        });
    }
    ensure!(!tests.is_empty(), "llama-bench reported no tests");
    Ok((tests, backends))
}

/// `program` under `/usr/bin/time` (GNU `-v`, macOS `-l`: peak RSS on stderr, read by
/// [`parse_peak_rss`]); `None` where it is not installed.
pub fn timed(program: &Path) -> Option<Command> {
    Path::new(TIME).is_file().then(|| {
        let mut c = Command::new(TIME);
        c.arg(TIME_FLAG).arg(program);
        c
    })
}

pub const TIME: &str = "/usr/bin/time";
/// The flag that makes `/usr/bin/time` print the peak RSS: BSD/macOS `-l`, GNU `-v`.
pub const TIME_FLAG: &str = if cfg!(target_os = "macos") {
    "-l"
} else {
    "-v"
};

/// Peak RSS in MiB from `/usr/bin/time` on stderr: GNU `-v` (KiB) or macOS `-l` (bytes).
pub fn parse_peak_rss(stderr: &str) -> Option<f64> {
    for l in stderr.lines() {
        if let Some(v) = l.trim().strip_prefix("Maximum resident set size (kbytes):") {
            return v.trim().parse::<f64>().ok().map(|kb| kb / 1024.0);
        }
    }
    time_l_mib(stderr, "maximum resident set size")
}

/// macOS `/usr/bin/time -l`'s "peak memory footprint" in MiB: what jetsam counts (compressed and
/// GPU-shared memory included, clean file pages not); recent macOS only, else `None`.
pub fn parse_peak_footprint(stderr: &str) -> Option<f64> {
    time_l_mib(stderr, "peak memory footprint")
}

/// A `time -l` line `<bytes>  <label>`, in MiB.
fn time_l_mib(stderr: &str, label: &str) -> Option<f64> {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_suffix(label)?.trim().parse::<f64>().ok())
        .map(|b| b / 1048576.0)
}

/// The platform's meters: `/usr/bin/time` for peak RSS, RAPL for energy, thermal zones.
struct Meters {
    /// `/usr/bin/time` is installed ([`timed`]).
    time: bool,
    /// Top-level RAPL package domains: (energy_uj path, max_energy_range_uj).
    rapl: Vec<(PathBuf, u64)>,
    thermal: Vec<PathBuf>,
}

impl Meters {
    fn probe() -> Meters {
        let time = Path::new(TIME).is_file();
        let mut rapl = Vec::new();
        if let Ok(rd) = fs::read_dir("/sys/class/powercap") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // `intel-rapl:0` is a package; `intel-rapl:0:1` a sub-domain already counted in it.
                if name.starts_with("intel-rapl:") && name.matches(':').count() == 1 {
                    let p = e.path().join("energy_uj");
                    let max = fs::read_to_string(e.path().join("max_energy_range_uj"))
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(u64::MAX);
                    if fs::read_to_string(&p).is_ok_and(|s| s.trim().parse::<u64>().is_ok()) {
                        rapl.push((p, max));
                    }
                }
            }
        }
        let mut thermal: Vec<PathBuf> = fs::read_dir("/sys/class/thermal")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().join("temp"))
                    .filter(|p| fs::read_to_string(p).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        thermal.sort();
        Meters {
            time,
            rapl,
            thermal,
        }
    }

    fn energy_uj(&self) -> Option<Vec<u64>> {
        if self.rapl.is_empty() {
            return None;
        }
        self.rapl
            .iter()
            .map(|(p, _)| fs::read_to_string(p).ok()?.trim().parse().ok())
            .collect()
    }

    /// Microjoules between two readings, counters wrapping at their range.
    fn energy_delta(&self, a: Vec<u64>, b: Vec<u64>) -> f64 {
        a.iter()
            .zip(&b)
            .zip(&self.rapl)
            .map(|((&x, &y), (_, max))| {
                if y >= x {
                    (y - x) as f64
                } else {
                    (max - x + y) as f64
                }
            })
            .sum()
    }

    /// Highest zone temperature (°C) on Linux; `pmset -g therm` on macOS (no sudo needed).
    fn thermal(&self) -> Option<String> {
        if !self.thermal.is_empty() {
            let max = self
                .thermal
                .iter()
                .filter_map(|p| fs::read_to_string(p).ok()?.trim().parse::<f64>().ok())
                .fold(f64::NAN, f64::max);
            return max.is_finite().then(|| format!("{:.1} °C", max / 1000.0));
        }
        if cfg!(target_os = "macos") {
            return cmd_out("pmset", &["-g", "therm"]).map(|s| {
                s.lines()
                    .filter(|l| l.contains('=') || l.contains("level"))
                    .collect::<Vec<_>>()
                    .join("; ")
            });
        }
        None
    }

    fn energy_source(&self) -> String {
        if !self.rapl.is_empty() {
            format!(
                "RAPL package energy ({} domain(s)), whole llama-bench process, divided by the tokens it processed",
                self.rapl.len()
            )
        } else if cfg!(target_os = "macos") {
            "n/a: macOS exposes energy only through `sudo powermetrics` (see below)".into()
        } else {
            "n/a: no readable /sys/class/powercap/intel-rapl:*/energy_uj on this machine".into()
        }
    }

    fn thermal_source(&self) -> String {
        if !self.thermal.is_empty() {
            format!(
                "max of {} /sys/class/thermal zone(s), before and after each run",
                self.thermal.len()
            )
        } else if cfg!(target_os = "macos") {
            "`pmset -g therm` before and after each run".into()
        } else {
            "n/a: no /sys/class/thermal zones on this machine".into()
        }
    }

    fn rss_source(&self) -> String {
        if self.time {
            format!(
                "`{TIME} {TIME_FLAG}` around each llama-bench process (peak of the whole process)"
            )
        } else {
            "n/a: /usr/bin/time not installed".into()
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

/// Rows with ratios per repetition (our run against the stock run of the same repetition), then medians.
pub fn summarise(runs: &[RunRecord], mx: &Matrix) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut configs: Vec<(String, String)> = Vec::new();
    for r in runs {
        let key = (r.model.clone(), r.quant.clone());
        if !configs.contains(&key) {
            configs.push(key);
        }
    }
    for (model, quant) in configs {
        let of = |policy: &str| -> BTreeMap<usize, &RunRecord> {
            runs.iter()
                .filter(|r| r.model == model && r.quant == quant && r.policy == policy)
                .map(|r| (r.rep, r))
                .collect()
        };
        let stock = of("stock");
        for policy in &mx.policies {
            let ours = of(policy);
            for &p in &mx.prompts {
                let pairs: Vec<(&RunRecord, &RunRecord)> = ours
                    .iter()
                    .filter_map(|(rep, o)| Some((*stock.get(rep)?, *o)))
                    .collect();
                if pairs.is_empty() {
                    continue;
                }
                let col = |f: &dyn Fn(&RunRecord) -> Option<f64>, side: usize| {
                    median(
                        pairs
                            .iter()
                            .filter_map(|(s, o)| f(if side == 0 { s } else { o }))
                            .collect(),
                    )
                };
                let ttft = |r: &RunRecord| Some(r.prompt_ms(p)? + r.decode_ms()?);
                let tps = |r: &RunRecord| r.decode().map(|t| t.avg_ts);
                let speed = median(
                    pairs
                        .iter()
                        .filter_map(|(s, o)| Some(s.prompt_ms(p)? / o.prompt_ms(p)?))
                        .collect(),
                );
                let dratio = median(
                    pairs
                        .iter()
                        .filter_map(|(s, o)| Some(tps(o)? / tps(s)?))
                        .collect(),
                );
                let best =
                    |f: &dyn Fn(&RunRecord) -> Option<f64>, side: usize, fastest_is_max: bool| {
                        let v = pairs
                            .iter()
                            .filter_map(|(s, o)| f(if side == 0 { s } else { o }))
                            .filter(|x| x.is_finite());
                        if fastest_is_max {
                            v.reduce(f64::max)
                        } else {
                            v.reduce(f64::min)
                        }
                    };
                let prefill_best_ratio = best(&|r| r.prompt_ms(p), 0, false)
                    .zip(best(&|r| r.prompt_ms(p), 1, false))
                    .map(|(s, o)| s / o);
                let decode_best_ratio = best(&tps, 1, true)
                    .zip(best(&tps, 0, true))
                    .map(|(o, s)| o / s);
                let (Some(sp), Some(op), Some(speed)) = (
                    col(&|r| r.prompt_ms(p), 0),
                    col(&|r| r.prompt_ms(p), 1),
                    speed,
                ) else {
                    continue;
                };
                rows.push(Row {
                    model: model.clone(),
                    quant: quant.clone(),
                    policy: policy.clone(),
                    prompt: p,
                    stock_prefill_ms: sp,
                    ours_prefill_ms: op,
                    prefill_speedup: speed,
                    stock_ttft_ms: col(&ttft, 0),
                    ours_ttft_ms: col(&ttft, 1),
                    stock_decode_tps: col(&tps, 0),
                    ours_decode_tps: col(&tps, 1),
                    decode_ratio: dratio,
                    prefill_best_ratio,
                    decode_best_ratio,
                    stock_rss_mib: col(&|r| r.peak_rss_mib, 0),
                    ours_rss_mib: col(&|r| r.peak_rss_mib, 1),
                    ours_prepared_mib: col(&|r| r.prepared_mib, 1),
                    ours_released_mib: col(&|r| r.released_mib, 1),
                    stock_j_per_token: col(&|r| r.energy_per_token(), 0),
                    ours_j_per_token: col(&|r| r.energy_per_token(), 1),
                    offloaded_ops: pairs.iter().filter_map(|(_, o)| o.offloaded_ops).max(),
                    policy_in_effect: pairs.iter().find_map(|(_, o)| o.policy_in_effect.clone()),
                });
            }
        }
    }
    rows
}

/// The chips the projection table shows (names as the policy crate prints them).
const PROJECTED_CHIPS: [&str; 5] = ["M3", "M4", "M5", "A17 Pro", "A18"];
const PROJECTED_TOKENS: usize = 4096;

/// Projected pp4096 speed-ups from the policy crate's `projection` example (`project_speedup` over its
/// reference models). Run as a separate cargo command so xtask does not depend on the program crates: a
/// half-edited policy or program crate costs this table, not `cargo xtask`.
fn projections() -> Result<Vec<ProjectionRow>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(paths::workspace_root()).args([
        "run",
        "-q",
        "-p",
        "ggml-coreml-policy",
        "--example",
        "projection",
        "--",
        &PROJECTED_TOKENS.to_string(),
    ]);
    let line = util::display_cmd(&c);
    let o = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    ensure!(
        o.status.success(),
        "`{line}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    let rows = parse_projection(&String::from_utf8_lossy(&o.stdout));
    ensure!(!rows.is_empty(), "`{line}` printed no projection table");
    Ok(rows)
}

/// The example's `| model | chip | … | matmul speed-up | offloaded | whole prefill speed-up |` table,
/// columns found by their headers.
pub fn parse_projection(text: &str) -> Vec<ProjectionRow> {
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let mut lines = text
        .lines()
        .skip_while(|l| !(l.starts_with("| model | chip |")));
    let Some(header) = lines.next().map(cells) else {
        return Vec::new();
    };
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(im), Some(ic), Some(ims), Some(io), Some(ip)) = (
        col("model"),
        col("chip"),
        col("matmul speed-up"),
        col("offloaded"),
        col("whole prefill speed-up"),
    ) else {
        return Vec::new();
    };
    let x = |s: &str| s.trim_end_matches('x').parse::<f64>().ok();
    lines
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|---"))
        .filter_map(|l| {
            let c = cells(l);
            let (off, total) = c.get(io)?.split_once('/')?;
            Some(ProjectionRow {
                model: c.get(im)?.clone(),
                chip: c.get(ic)?.clone(),
                matmul_speedup: x(c.get(ims)?)?,
                prefill_speedup: x(c.get(ip)?)?,
                offloaded: off.trim().parse().ok()?,
                total: total.trim().parse().ok()?,
            })
        })
        .collect()
}

/// Runs tools/plot_bench.py with the venv's python; returns the PNG path.
fn plot(json: &Path, png: &Path) -> Result<PathBuf> {
    let python = match std::env::var_os("GGML_COREML_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => venv::ensure_venv().context("python venv (for matplotlib)")?,
    };
    let script = paths::workspace_root().join("tools/plot_bench.py");
    let o = Command::new(&python)
        .arg(&script)
        .arg(json)
        .arg(png)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !o.status.success() || !png.is_file() {
        bail!(
            "plot_bench.py failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(png.to_path_buf())
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.filter(|v| v.is_finite())
        .map_or("n/a".into(), |v| format!("{v:.prec$}"))
}

fn ratio(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("n/a".into(), |v| format!("{v:.2}x"))
}

/// The report of one run (report.md).
fn render(r: &Results, plot: Option<&str>, plot_err: Option<String>) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmark: stock llama.cpp vs ggml-coreml\n");
    run_facts(&mut o, r);
    render_tables(&mut o, r, "##");
    match (plot, plot_err) {
        (Some(p), _) => {
            let _ = writeln!(o, "\n![prefill speed-up vs prompt length]({p})");
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "\n(no plot: {e})");
        }
        _ => {}
    }
    let _ = writeln!(o, "\n## How the numbers are made\n");
    how_made(&mut o, r);
    render_projection(&mut o, &r.projection, r.projection_error.as_deref());
    render_device_only(&mut o);
    o
}

/// Command, date, machine, host, matrix and executor of a run, as a list.
fn run_facts(o: &mut String, r: &Results) {
    use std::fmt::Write as _;
    let m = &r.machine;
    let mx = &r.matrix;
    let _ = writeln!(o, "- Command: `{}`", r.command);
    let _ = writeln!(
        o,
        "- Date: {}; {:.0} s in all; repo {}",
        m.date, r.seconds, m.git
    );
    let _ = writeln!(
        o,
        "- Machine: {} ({}), `nproc` {}, load average at start {}, at end {}",
        m.cpu,
        m.os,
        m.nproc,
        m.load,
        r.load_end.as_deref().unwrap_or("n/a")
    );
    let _ = writeln!(
        o,
        "- Host: {}, CPU backend, 2 threads; stock `-ngl {}`{}; ours through {}",
        m.host,
        mx.face.stock_ngl(),
        if mx.stock_no_repack {
            " `--repack 0`"
        } else {
            ""
        },
        mx.face.describe()
    );
    let _ = writeln!(
        o,
        "- Matrix `{}`: models {}; types {}; policies {}; prompts {}; {} repetition(s); decode {} tokens",
        mx.name,
        mx.models.join(", "),
        mx.quants.join(", "),
        mx.policies.join(", "),
        mx.prompts
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        mx.reps,
        mx.n_gen
    );
    let _ = writeln!(
        o,
        "- Executor: the portable reference executor (Linux has no ANE): these ratios measure the integration's overhead and the reference executor, not the Neural Engine.\n"
    );
}

/// A row's policy; `default` also names the policy the library reported using.
fn policy_label(x: &Row) -> String {
    match (&x.policy_in_effect, x.policy.as_str()) {
        (Some(p), DEFAULT_POLICY) => format!("{DEFAULT_POLICY} ({p})"),
        _ => x.policy.clone(),
    }
}

/// The prefill/TTFT and decode tables, the noise control and the thermal samples; `h` is the heading level.
fn render_tables(o: &mut String, r: &Results, h: &str) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "{h} Prefill and TTFT\n");
    let _ = writeln!(
        o,
        "| model | type | policy | prompt | stock ms | ours ms | prefill speed-up | best-of ratio | stock TTFT ms | ours TTFT ms | MUL_MATs offloaded |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2}x | {} | {} | {} | {} |",
            x.model,
            x.quant,
            policy_label(x),
            x.prompt,
            x.stock_prefill_ms,
            x.ours_prefill_ms,
            x.prefill_speedup,
            ratio(x.prefill_best_ratio),
            opt(x.stock_ttft_ms, 0),
            opt(x.ours_ttft_ms, 0),
            x.offloaded_ops.map_or("n/a".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(o, "\n{h} Decode, memory, energy\n");
    let _ = writeln!(
        o,
        "| model | type | policy | stock tok/s | ours tok/s | decode ratio | best-of ratio | stock peak RSS MiB | ours peak RSS MiB | ours prepared MiB | ours raw released MiB | stock J/token | ours J/token |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut seen = Vec::new();
    for x in &r.rows {
        let key = (x.model.clone(), x.quant.clone(), x.policy.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.model,
            x.quant,
            policy_label(x),
            opt(x.stock_decode_tps, 1),
            opt(x.ours_decode_tps, 1),
            ratio(x.decode_ratio),
            ratio(x.decode_best_ratio),
            opt(x.stock_rss_mib, 0),
            opt(x.ours_rss_mib, 0),
            opt(x.ours_prepared_mib, 1),
            opt(x.ours_released_mib, 1),
            opt(x.stock_j_per_token, 3),
            opt(x.ours_j_per_token, 3)
        );
    }
    if let Some(line) = noise_line(&r.rows, &r.matrix) {
        let _ = writeln!(o, "\n{line}");
    }
    if let Some(line) = repack_note(&r.rows, &r.matrix) {
        let _ = writeln!(o, "\n{line}");
    }
    let thermal: Vec<String> = r
        .runs
        .iter()
        .filter_map(|x| {
            Some(format!(
                "{} {} {} r{}: {} → {}",
                x.model,
                x.quant,
                x.policy,
                x.rep,
                x.thermal_before.as_deref()?,
                x.thermal_after.as_deref().unwrap_or("n/a")
            ))
        })
        .collect();
    let _ = writeln!(
        o,
        "\nThermal samples: {}",
        if thermal.is_empty() {
            "n/a".to_string()
        } else {
            thermal.join("; ")
        }
    );
}

/// The method bullets of a run.
fn how_made(o: &mut String, r: &Results) {
    use std::fmt::Write as _;
    let mx = &r.matrix;
    let tool = format!(
        "llama-bench -m <gguf> -p <prompts> -n {} -r 1 -t 2 -o json",
        mx.n_gen
    );
    let sides = match mx.face {
        Face::Accel => format!(
            "`{tool} -ngl 0` (warm-up on); \"ours\" adds `GGML_BACKEND_PATH=<libggml-coreml>` and \
             `GGML_COREML_POLICY=<policy>` (the ACCEL face: llama.cpp offers it the weights of the CPU-resident layers)"
        ),
        Face::Hybrid => format!(
            "stock `{tool} -ngl 99{}` (warm-up on; no GPU on this host, so every layer stays on the CPU device); \"ours\" \
             adds `GGML_BACKEND_PATH=<libggml-coreml> GGML_COREML_HYBRID={}` and `--device {}`, so llama.cpp gives every \
             layer to the hybrid device, whose router hands graphs to the inner CPU backend and splits out the MUL_MATs the \
             policy offloads; `GGML_COREML_POLICY=<policy>` (`{DEFAULT_POLICY}`: not set, the library's default)",
            if mx.stock_no_repack {
                " --repack 0"
            } else {
                ""
            },
            face::HYBRID_INNER,
            face::HYBRID_DEVICE
        ),
    };
    let _ = writeln!(
        o,
        "- One llama-bench process per model × type × side: {sides}. Runs alternate stock, ours per policy, stock… for \
         each repetition; ratios are taken within a repetition, then the median. The best-of ratio compares each side's fastest run (noise only ever slows a run down).\n\
         - Prefill = llama-bench's `ppN` time. **TTFT ≈ ppN time + one decode step** (the `tg{}` time / {}): the \
         first token needs the whole prompt and one sampling step. It slightly under-states a real TTFT (the decode step \
         after a long prompt attends to more context than llama-bench's `tg` test, which starts at position 0).\n\
         - Decode = llama-bench's `tg{}` tokens/s. Peak RSS: {}. Energy: {}. Thermal: {}.\n\
         - MUL_MATs offloaded: the backend's statistics (`GGML_COREML_STATS_FILE`) for the whole process (all tests \
         and warm-ups); `latency` declines everything the cost model does not predict faster, which on Linux (reference \
         executor, not accelerated) is everything.",
        mx.n_gen, mx.n_gen, mx.n_gen, r.rss_source, r.energy_source, r.thermal_source
    );
    if mx.face == Face::Hybrid {
        let _ = writeln!(
            o,
            "- Each of our runs is checked to have gone through the hybrid device: its backends log \
             (`GGML_COREML_LOG=info`, visible with llama-bench's `-v`, which both sides get) how many graphs they \
             computed, and a run with none is an error."
        );
    }
}

/// Rows whose runs offloaded nothing (e.g. `latency` on Linux) run the same code as stock: their spread is
/// the run-to-run noise of this machine, the yardstick for every other ratio.
///
/// Not so for the hybrid face where stock's weights are repacked and ours are not ([`repack_differs`]).
fn noise_line(rows: &[Row], mx: &Matrix) -> Option<String> {
    let ctl: Vec<f64> = rows
        .iter()
        .filter(|x| x.offloaded_ops == Some(0) && !repack_differs(mx, &x.quant))
        .map(|x| x.prefill_speedup)
        .filter(|v| v.is_finite())
        .collect();
    if ctl.is_empty() {
        return None;
    }
    let (lo, hi) = ctl
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    Some(format!(
        "**Noise control**: {} row(s) offloaded no MUL_MAT, so they ran the same computation as stock; their prefill \
         ratios span {lo:.2}x–{hi:.2}x. Ratios inside that band are not distinguishable from noise on this machine.",
        ctl.len()
    ))
}

/// Whether ggml-cpu repacks (CPU_REPACK buffer type) weights of this llama.cpp file type on this machine
/// (ggml-cpu's `ggml_repack_get_optimal_repack_type`: Q4_0, Q4_K and IQ4_NL with AVX2; on Arm with dot-product
/// instructions also Q5_K, Q6_K and Q8_0).
fn cpu_repacks(quant: &str) -> bool {
    let q = quant.to_ascii_uppercase();
    let x86 = ["Q4_0", "Q4_K_M", "Q4_K_S", "IQ4_NL"];
    if cfg!(target_arch = "x86_64") {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            return false;
        }
        x86.contains(&q.as_str())
    } else if cfg!(target_arch = "aarch64") {
        x86.contains(&q.as_str()) || ["Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0"].contains(&q.as_str())
    } else {
        false
    }
}

/// Stock and ours keep this type's weights in different CPU layouts: with the hybrid face, llama.cpp offers
/// extra buffer types (CPU_REPACK) only to the CPU device, so the hybrid device's layers sit in the CPU's
/// plain buffer type while stock's are repacked (unless `--stock-no-repack`).
fn repack_differs(mx: &Matrix, quant: &str) -> bool {
    mx.face == Face::Hybrid && !mx.stock_no_repack && cpu_repacks(quant)
}

/// Names the rows whose stock side had repacked weights and ours had not.
fn repack_note(rows: &[Row], mx: &Matrix) -> Option<String> {
    let mut types: Vec<&str> = rows
        .iter()
        .filter(|x| repack_differs(mx, &x.quant))
        .map(|x| x.quant.as_str())
        .collect();
    types.dedup();
    if types.is_empty() {
        return None;
    }
    Some(format!(
        "**CPU_REPACK**: for {} stock keeps the weights in ggml-cpu's CPU_REPACK buffer type (rows interleaved for its \
         faster GEMM kernels), while the hybrid device's layers sit in the CPU device's plain buffer type (llama.cpp \
         offers extra buffer types only to the CPU device). These ratios include that difference even where nothing is \
         offloaded, so they are not noise controls; `--stock-no-repack` compares against stock without repacking.",
        types.join(", ")
    ))
}

fn render_projection(o: &mut String, rows: &[ProjectionRow], error: Option<&str>) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\n## Projection (not a measurement): pp{PROJECTED_TOKENS} on Apple chips\n"
    );
    let _ = writeln!(
        o,
        "**A projection** from public figures through the policy's cost model (`ggml_coreml_policy::projection::project_speedup` via \
         `cargo run -p ggml-coreml-policy --example projection -- 4096`, its reference models; \
         `latency` routing, int8 × int8 programs, ubatch 512; constants and sources in docs/policy.md). Matmul speed-up = \
         host weight-matmul time / ANE-path time; prefill speed-up adds the unchanged rest of the prefill (attention, norms). \
         Nothing here was run on the chips named. The projection assumes int8 × int8 programs; docs/parity.md measures \
         whether that variant keeps the model's outputs within tolerance (the fp16-activation variants, w8f16 and f16, \
         do not get the ANE's int8 rate and project lower: see the break-even table in docs/policy.md).\n"
    );
    let chips: Vec<String> = PROJECTED_CHIPS.iter().map(|c| c.to_string()).collect();
    if rows.is_empty() {
        let _ = writeln!(o, "n/a in this run: {}", error.unwrap_or("no rows"));
        return;
    }
    let _ = writeln!(
        o,
        "| model | {} |",
        chips
            .iter()
            .map(|c| format!("{c} matmul / prefill"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(o, "|---|{}", "---|".repeat(chips.len()));
    let mut models: Vec<&str> = Vec::new();
    for r in rows {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    for m in models {
        let cells: Vec<String> = chips
            .iter()
            .map(|c| {
                rows.iter()
                    .find(|r| r.model == m && &r.chip == c)
                    .map_or("n/a".into(), |r| {
                        format!(
                            "{:.2}x / {:.2}x ({}/{})",
                            r.matmul_speedup, r.prefill_speedup, r.offloaded, r.total
                        )
                    })
            })
            .collect();
        let _ = writeln!(o, "| {m} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        o,
        "\n(offloaded/total = weight matmuls routed to the ANE over all ubatches.)"
    );
}

fn render_device_only(o: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "\n## What only a device can measure\n");
    let _ = writeln!(
        o,
        "- The real prefill speed-up: the ANE's throughput for these programs, dispatch and IOSurface overheads, and \
         whether CoreML keeps every op on the ANE (run `cargo xtask bench` on a Mac: the same command uses the CoreML \
         executor there).\n\
         - Energy per token: macOS reports it only through `sudo powermetrics --samplers cpu_power,gpu_power,ane_power -i 200` \
         (run alongside, integrate the ANE/CPU/GPU power over the run, divide by tokens); iOS through Xcode's energy \
         gauges / Instruments. This harness never invents a number: without a readable meter the column says n/a.\n\
         - Thermal behaviour under sustained prefill (`pmset -g therm` is sampled on macOS; the ANE's own throttling is \
         not exposed).\n\
         - Peak memory of the compiled programs and IOSurfaces, and first-load compile time (the shape cache makes later \
         loads fast)."
    );
}

/// docs/benchmarks.md: the last default run's report plus where it came from.
fn render_doc(r: &Results, out: &Path) -> String {
    let mut md = render(r, None, None);
    let rel = out.strip_prefix(paths::workspace_root()).unwrap_or(out);
    md = md.replacen(
        "# Benchmark: stock llama.cpp vs ggml-coreml\n",
        &format!(
            "# Benchmarks\n\n_Generated by `cargo xtask bench` (default matrix; this file is overwritten by each default run, \
             do not edit by hand). The run's raw results and plot: `{}/` (results.json, report.md, prefill_speedup.png). \
             `cargo xtask bench --matrix full` covers every model (gemma-3-270m, smollm2-135m, qwen3-tiny, qwen3-tiny-moe) × \
             Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K, F16 × policies latency, energy, always × prompts 512, 1K, 2K, 4K × 3 \
             repetitions, decode 64 tokens (hours on 2 cores). The section *Hybrid face* comes from \
             `cargo xtask bench --face hybrid` and is kept by this run._\n",
            rel.display()
        ),
        1,
    );
    md
}

/// Bounds of the hybrid face's section in docs/benchmarks.md (written by `--face hybrid` default runs,
/// kept by the ACCEL default runs that rewrite the rest of the file).
const HYBRID_BEGIN: &str = "<!-- hybrid face: generated by `cargo xtask bench --face hybrid` -->";
const HYBRID_END: &str = "<!-- end of the hybrid face section -->";
/// The heading the hybrid face's section is placed before (after the ACCEL run's method).
const SECTION_AFTER_HYBRID: &str = "## Projection (not a measurement)";

/// Bounds of the section with the hybrid face over CUDA (the GPU machine's `run.sh` report, made by
/// `cargo xtask cuda-bundle`; written by hand from that report, kept by every generated rewrite).
const CUDA_BEGIN: &str =
    "<!-- hybrid face over CUDA: from the GPU machine's report (cargo xtask cuda-bundle) -->";
const CUDA_END: &str = "<!-- end of the CUDA section -->";

/// `new` with `old`'s CUDA section, placed after the hybrid face's section (before the serving section
/// or the projection).
fn keep_cuda(new: &str, old: &str) -> String {
    splice_section(
        new,
        CUDA_BEGIN,
        CUDA_END,
        doc_section(old, CUDA_BEGIN, CUDA_END).unwrap_or(""),
        &[crate::serve::SERVE_BEGIN, SECTION_AFTER_HYBRID],
    )
}

/// The hybrid face's section of a docs/benchmarks.md, markers included.
fn hybrid_section(doc: &str) -> Option<&str> {
    doc_section(doc, HYBRID_BEGIN, HYBRID_END)
}

/// `doc` with its hybrid face section replaced by `section` (placed before the CUDA section, the serving
/// section or the projection, or at the end; an empty `section` removes it).
fn splice_hybrid(doc: &str, section: &str) -> String {
    splice_section(
        doc,
        HYBRID_BEGIN,
        HYBRID_END,
        section,
        &[CUDA_BEGIN, crate::serve::SERVE_BEGIN, SECTION_AFTER_HYBRID],
    )
}

/// The part of `doc` from `begin` to `end`, markers included (a section a generated rewrite keeps).
pub fn doc_section<'a>(doc: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let a = doc.find(begin)?;
    let b = doc[a..].find(end)? + a + end.len();
    Some(&doc[a..b])
}

/// `doc` with its section between `begin` and `end` replaced by `section`, placed before the first of
/// `before` that `doc` has, or at the end; an empty `section` removes it.
pub fn splice_section(doc: &str, begin: &str, end: &str, section: &str, before: &[&str]) -> String {
    let section = section.trim_end();
    let mut base = match doc_section(doc, begin, end) {
        Some(old) => doc
            .replacen(&format!("{old}\n\n"), "", 1)
            .replacen(old, "", 1),
        None => doc.to_string(),
    };
    if section.is_empty() {
        return base;
    }
    match before.iter().find_map(|anchor| base.find(anchor)) {
        Some(i) => base.insert_str(i, &format!("{section}\n\n")),
        None => {
            if !base.is_empty() && !base.ends_with("\n\n") {
                base.push('\n');
            }
            base.push_str(section);
            base.push('\n');
        }
    }
    base
}

/// docs/benchmarks.md's section for a default `--face hybrid` run.
fn render_hybrid_section(r: &Results, out: &Path) -> String {
    use std::fmt::Write as _;
    let rel = out.strip_prefix(paths::workspace_root()).unwrap_or(out);
    let mut o = String::new();
    let _ = writeln!(o, "{HYBRID_BEGIN}");
    let _ = writeln!(o, "## Hybrid face (`{}`)\n", face::HYBRID_DEVICE);
    let _ = writeln!(
        o,
        "_Generated by `cargo xtask bench --face hybrid` (its default matrix; this section is replaced by each such run \
         and kept by the default run above). Raw results: `{}/`._\n\n\
         What a user who selects the hybrid device (`--device CoreML-<inner> -ngl 99`, docs/architecture.md) gets with the \
         library's default policy, against stock with the same `-ngl 99`. On Linux the inner device is the CPU, and the \
         default policy (`latency`) offloads nothing (the reference executor is never predicted faster), so the `{DEFAULT_POLICY}` \
         rows measure what the hybrid face itself costs: every graph goes through its router and on to the inner \
         backend unsplit. The `always` rows send every MUL_MAT over weights through the reference executor.\n\n\
         - This section: `cargo xtask bench --face hybrid` (gemma-3-270m and qwen3-tiny Q8_0, policies `{DEFAULT_POLICY}` \
         and `always`, pp512 and tg128, alternating stock/ours twice; minutes on 2 idle cores).\n\
         - Types whose stock weights ggml-cpu repacks (on x86-64 with AVX2: Q4_0, Q4_K, IQ4_NL): \
         `cargo xtask bench --face hybrid --quants Q4_K_M --policies {DEFAULT_POLICY}`, and the same with \
         `--stock-no-repack` (stock with llama-bench's `--repack 0`) to separate the repack effect from the face's own \
         cost (docs/architecture.md, *Two faces, one router*).\n\
         - Every model × type: `cargo xtask bench --face hybrid --matrix full`.\n",
        rel.display()
    );
    run_facts(&mut o, r);
    render_tables(&mut o, r, "###");
    let _ = writeln!(o, "\n### How these numbers are made\n");
    how_made(&mut o, r);
    let _ = write!(o, "{HYBRID_END}");
    o
}

/// `20261125-210944` (UTC), for directory names.
pub fn utc_stamp() -> String {
    let (y, mo, d, h, mi, s) = utc_now();
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// `2026-11-25T21:09:44Z`.
pub fn utc_iso() -> String {
    let (y, mo, d, h, mi, s) = utc_now();
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

fn utc_now() -> (i64, u32, u32, u32, u32, u32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    civil(secs)
}

/// Unix seconds to a UTC civil date and time (days-from-civil inverted, proleptic Gregorian).
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_764_104_984), (2025, 11, 25, 21, 9, 44));
    }

    #[test]
    fn parses_llama_bench_json() {
        let out = r#"noise
[
  {"backends": "CPU,CoreML", "n_prompt": 512, "n_gen": 0, "avg_ns": 316652208, "avg_ts": 1616.9, "samples_ns": [ 316652208 ]},
  {"backends": "CPU,CoreML", "n_prompt": 0, "n_gen": 16, "avg_ns": 160000000, "avg_ts": 100.0, "samples_ns": [ 1, 2 ]}
]
"#;
        let (t, b) = parse_bench_json(out).expect("parsed");
        assert_eq!(b, "CPU,CoreML");
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].n_prompt, t[0].samples), (512, 1));
        assert_eq!((t[1].n_gen, t[1].samples), (16, 2));
        assert!(parse_bench_json("no json").is_err());
    }

    #[test]
    fn parses_projection_table() {
        let text = "pp4096, ubatch 512\n\n| model | chip | host matmul s | ANE-path matmul s | matmul speed-up | offloaded | whole prefill speed-up |\n\
                    |---|---|---|---|---|---|---|\n\
                    | Qwen3-4B | M4 | 1.00 | 0.65 | 1.54x | 1440/2016 | 1.32x |\n\
                    | Qwen3-4B | A17 Pro | 1.00 | 0.29 | 3.45x | 2016/2016 | 1.98x |\n\nbreak-even\n| chip | x |\n";
        let rows = parse_projection(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[1].chip.as_str(), rows[1].offloaded, rows[1].total),
            ("A17 Pro", 2016, 2016)
        );
        assert!(
            (rows[0].matmul_speedup - 1.54).abs() < 1e-12
                && (rows[0].prefill_speedup - 1.32).abs() < 1e-12
        );
        assert!(parse_projection("no table").is_empty());
    }

    #[test]
    fn parses_peak_rss() {
        assert_eq!(
            parse_peak_rss("\tMaximum resident set size (kbytes): 148988\n"),
            Some(148988.0 / 1024.0)
        );
        assert_eq!(
            parse_peak_rss("  157286400  maximum resident set size\n"),
            Some(150.0)
        );
        assert_eq!(parse_peak_rss("nothing"), None);
    }

    /// `/usr/bin/time -l` on macOS 15 after a llama-bench run (stderr tail).
    const TIME_L: &str = "\
        3.41 real         6.02 user         0.88 sys
           123456789  maximum resident set size
                   0  average shared memory size
                   0  average unshared data size
                   0  average unshared stack size
               30142  page reclaims
                  12  page faults
                   0  swaps
                   0  block input operations
                   0  block output operations
                   0  messages sent
                   0  messages received
                   0  signals received
                  57  voluntary context switches
                1873  involuntary context switches
         25473018349  instructions retired
          9817266601  cycles elapsed
            98765432  peak memory footprint
";

    #[test]
    fn parses_time_l_output() {
        let rss = parse_peak_rss(TIME_L).unwrap();
        assert!((rss - 123456789.0 / 1048576.0).abs() < 1e-9);
        let fp = parse_peak_footprint(TIME_L).unwrap();
        assert!((fp - 98765432.0 / 1048576.0).abs() < 1e-9);
        // Older macOS prints no footprint line; GNU time neither.
        assert_eq!(
            parse_peak_footprint("  157286400  maximum resident set size\n"),
            None
        );
        assert_eq!(
            parse_peak_footprint("\tMaximum resident set size (kbytes): 148988\n"),
            None
        );
        // A mangled number is n/a, not a wrong value.
        assert_eq!(
            parse_peak_footprint("  12x4  peak memory footprint\n"),
            None
        );
    }

    #[test]
    fn counts_hybrid_graphs() {
        let log = "llama_context: ...\n\
                   ggml-coreml: hybrid summary: 12 graphs unsplit to CPU, 3 split (0 split elsewhere than around offloaded MUL_MATs); MUL_MAT offloaded 5 (1.0 ms)\n\
                   ggml-coreml: hybrid summary: 2 graphs unsplit to CPU, 0 split (0 split elsewhere than around offloaded MUL_MATs); x\n";
        assert_eq!(hybrid_graphs(log), Some(17));
        assert_eq!(hybrid_graphs("no summary"), None);
    }

    #[test]
    fn hybrid_section_is_kept_and_replaced() {
        let accel = "# Benchmarks\n\n## Prefill\n\nrows\n\n## Projection (not a measurement): pp4096\n\nx\n";
        let sec = |n: &str| format!("{HYBRID_BEGIN}\n## Hybrid face\n\n{n}\n{HYBRID_END}");
        let one = splice_hybrid(accel, &sec("first"));
        assert!(one.find("first").expect("inserted") < one.find("## Projection").expect("kept"));
        let two = splice_hybrid(&one, &sec("second"));
        assert!(two.contains("second") && !two.contains("first"));
        assert_eq!(two.matches(HYBRID_BEGIN).count(), 1);
        // An ACCEL default run rewrites the rest and keeps the section.
        let kept = splice_hybrid(accel, hybrid_section(&two).expect("section"));
        assert_eq!(kept, two);
        assert_eq!(splice_hybrid(&two, ""), accel);
        // No anchor: appended.
        assert!(splice_hybrid("# B\n", &sec("x")).ends_with(&format!("{HYBRID_END}\n")));
        // The CUDA section survives a rewrite, right after the hybrid face's section.
        let cuda = format!("{CUDA_BEGIN}\n## Over CUDA\n\nnumbers\n{CUDA_END}");
        let with_cuda = two.replacen(HYBRID_END, &format!("{HYBRID_END}\n\n{cuda}"), 1);
        let rewritten = keep_cuda(&two, &with_cuda);
        assert_eq!(rewritten.matches(CUDA_BEGIN).count(), 1);
        assert!(rewritten.find(HYBRID_END).unwrap() < rewritten.find(CUDA_BEGIN).unwrap());
        assert!(rewritten.find(CUDA_END).unwrap() < rewritten.find("## Projection").unwrap());
        assert_eq!(keep_cuda(&two, &two), two);
    }

    fn run(policy: &str, rep: usize, pp_ms: f64, tg_ts: f64) -> RunRecord {
        RunRecord {
            model: "m".into(),
            quant: "Q8_0".into(),
            policy: policy.into(),
            rep,
            backends: String::new(),
            tests: vec![
                TestResult {
                    n_prompt: 512,
                    n_gen: 0,
                    avg_ns: pp_ms * 1e6,
                    avg_ts: 0.0,
                    samples: 1,
                },
                TestResult {
                    n_prompt: 0,
                    n_gen: 16,
                    avg_ns: 16.0 / tg_ts * 1e9,
                    avg_ts: tg_ts,
                    samples: 1,
                },
            ],
            wall_s: 1.0,
            peak_rss_mib: Some(100.0),
            energy_j: None,
            tokens: 528,
            thermal_before: None,
            thermal_after: None,
            offloaded_ops: Some(7),
            policy_in_effect: Some("always".into()),
            hybrid_graphs: None,
            prepared_mib: None,
            released_mib: None,
        }
    }

    #[test]
    fn ratios_within_repetitions() {
        let mx = Matrix {
            policies: vec!["always".into()],
            prompts: vec![512],
            reps: 2,
            ..Matrix::default_matrix()
        };
        // Rep 0: ours twice as fast; rep 1: ours 4x as fast → median 3x.
        let runs = vec![
            run("stock", 0, 200.0, 10.0),
            run("always", 0, 100.0, 5.0),
            run("stock", 1, 400.0, 10.0),
            run("always", 1, 100.0, 5.0),
        ];
        let rows = summarise(&runs, &mx);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert!((r.prefill_speedup - 3.0).abs() < 1e-9);
        assert_eq!(r.decode_ratio, Some(0.5));
        assert_eq!(r.offloaded_ops, Some(7));
        // TTFT = prefill + one decode step (100 ms at 10 tok/s).
        assert!((r.stock_ttft_ms.expect("ttft") - 400.0).abs() < 1e-6);
        assert_eq!(r.stock_j_per_token, None);
        assert!(noise_line(&rows, &mx).is_none());
        let mut ctl = rows.clone();
        ctl[0].offloaded_ops = Some(0);
        assert!(
            noise_line(&ctl, &mx)
                .expect("control")
                .contains("3.00x–3.00x")
        );
    }
}
