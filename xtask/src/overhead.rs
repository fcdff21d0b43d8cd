//! `cargo xtask overhead`: what loading the backend costs the host, counted in instructions.
//!
//! Wall-clock ratios on a shared 2-core VM swing by ±20 % between identical runs, which hides a 1 %
//! question. Instructions do not: valgrind's callgrind counts the instructions executed inside
//! `llama_context::decode` (the prefill or decode work; model loading and warm-up bookkeeping are
//! outside it), the same for the same binary and inputs whatever else the machine is doing. One
//! thread, so no spin-wait loop adds instructions that depend on timing.
//!
//! Per model × type × policy × test (ppN, tgN): stock vs ours, `stock / ours` as the ratio (> 1: we
//! execute fewer). With the default policy on Linux nothing is offloaded, so the ratio says what the
//! backend's presence costs per token.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::face::{self, Face};
use crate::models::{self, Model, ModelSet};
use crate::util::{run_logged, which};
use crate::{backend, host, log, paths};

/// Arguments of `cargo xtask overhead`.
#[derive(clap::Args, Debug, Clone)]
pub struct OverheadArgs {
    /// Comma-separated models (default: gemma-3-270m).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Comma-separated weight types (default: Q8_0,Q4_K_M).
    #[arg(long, value_delimiter = ',')]
    quants: Vec<String>,
    /// Comma-separated policies for our runs (default: latency, the library's default).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Prompt tokens of the prefill test (0: skip it).
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens of the decode test (0: skip it).
    #[arg(long = "gen", default_value_t = 128)]
    n_gen: usize,
    /// `accel` (the ACCEL device, `-ngl 0`) or `hybrid` (`GGML_COREML_HYBRID=CPU --device CoreML-CPU
    /// -ngl 99` against stock `-ngl 99`).
    #[arg(long, value_enum, default_value_t = Face::Accel)]
    face: Face,
    /// Output directory (default: bench-out/overhead-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    model: String,
    quant: String,
    policy: String,
    face: Face,
    test: String,
    stock_instructions: u64,
    ours_instructions: u64,
    /// stock / ours (> 1: we execute fewer instructions).
    ratio: f64,
}

pub fn main(args: OverheadArgs) -> Result<Option<PathBuf>> {
    ensure!(
        which("valgrind").is_some(),
        "valgrind is not installed (Debian package valgrind)"
    );
    let list = |v: &[String], d: &[&str]| -> Vec<String> {
        if v.is_empty() {
            d.iter().map(|s| s.to_string()).collect()
        } else {
            v.to_vec()
        }
    };
    let model_names = list(&args.models, &["gemma-3-270m"]);
    let quants: Vec<String> = list(&args.quants, &["Q8_0", "Q4_K_M"])
        .iter()
        .map(|q| q.to_ascii_uppercase())
        .collect();
    let policies = list(&args.policies, &["latency"]);
    let model_list: Vec<Model> = model_names
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_>>()?;
    let mut tests = Vec::new();
    if args.prompt > 0 {
        tests.push((format!("pp{}", args.prompt), args.prompt, 0));
    }
    if args.n_gen > 0 {
        tests.push((format!("tg{}", args.n_gen), 0, args.n_gen));
    }
    ensure!(
        !tests.is_empty(),
        "nothing to count: --prompt 0 and --gen 0"
    );

    let bin = host::ensure_host(None).context("host build")?;
    let models_dir = models::ensure_models(&ModelSet {
        models: model_list.clone(),
        quants: quants.clone(),
    })
    .context("models")?;
    let lib = backend::build_backend(true).context("backend build")?;
    let out = args.out.clone().unwrap_or_else(|| {
        paths::workspace_root()
            .join("bench-out")
            .join(format!("overhead-{}", crate::bench::utc_stamp()))
    });
    fs::create_dir_all(out.join("logs"))?;

    let mut rows = Vec::new();
    for &m in &model_list {
        for q in &quants {
            let model = models::model_path(&models_dir, m, q);
            ensure!(
                model.is_file(),
                "{} missing (cargo xtask models --quants {q})",
                model.display()
            );
            for (test, p, n) in &tests {
                let tag = format!("{}-{q}-{test}", m.name());
                let stock = count(&bin, &model, *p, *n, None, args.face, &lib, &out, &tag)?;
                for policy in &policies {
                    let ours = count(
                        &bin,
                        &model,
                        *p,
                        *n,
                        Some(policy),
                        args.face,
                        &lib,
                        &out,
                        &tag,
                    )?;
                    let row = Row {
                        model: m.name().to_string(),
                        quant: q.clone(),
                        policy: policy.clone(),
                        face: args.face,
                        test: test.clone(),
                        stock_instructions: stock,
                        ours_instructions: ours,
                        ratio: stock as f64 / ours.max(1) as f64,
                    };
                    log!(
                        "overhead: {} {q} {policy} ({}) {test}: stock {stock} / ours {ours} instructions = {:.5}x",
                        m.name(),
                        args.face.name(),
                        row.ratio
                    );
                    rows.push(row);
                }
            }
        }
    }
    fs::write(out.join("results.json"), serde_json::to_vec_pretty(&rows)?)?;
    fs::write(out.join("report.md"), render(&rows))?;
    log!("overhead: report {}", out.join("report.md").display());
    Ok(Some(out))
}

/// Instructions executed inside `llama_context::decode` by one llama-bench test (1 thread, 1 repetition).
#[allow(clippy::too_many_arguments)]
fn count(
    bin: &Path,
    model: &Path,
    prompt: usize,
    n_gen: usize,
    policy: Option<&str>,
    face: Face,
    lib: &Path,
    out: &Path,
    tag: &str,
) -> Result<u64> {
    let side = policy.unwrap_or("stock");
    let cg = out.join(format!("callgrind.{tag}-{side}.out"));
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg("--toggle-collect=llama_context::decode*")
        .arg(format!("--callgrind-out-file={}", cg.display()))
        .arg(bin.join("llama-bench"))
        .arg("-m")
        .arg(model)
        .args(["-p", &prompt.to_string(), "-n", &n_gen.to_string()])
        .args(["-r", "1", "-t", "1", "-o", "md"]);
    // Our environment must not leak into the stock side (nor the caller's into ours).
    face::clean_env(&mut c);
    match policy {
        Some(policy) => {
            face.ours(&mut c);
            c.env("GGML_BACKEND_PATH", lib)
                .env("GGML_COREML_POLICY", policy);
        }
        None => {
            c.args(["-ngl", face.stock_ngl()]);
        }
    }
    run_logged(&mut c, &out.join("logs").join(format!("{tag}-{side}.log")))?;
    let text = fs::read_to_string(&cg).with_context(|| format!("cannot read {}", cg.display()))?;
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .with_context(|| format!("no totals line in {}", cg.display()))?;
    if total == 0 {
        bail!(
            "callgrind counted nothing inside llama_context::decode ({}): has the host renamed it?",
            cg.display()
        );
    }
    // The profile itself is large and not needed once counted.
    let _ = fs::remove_file(&cg);
    Ok(total)
}

fn render(rows: &[Row]) -> String {
    let mut o = String::from(
        "# Overhead in instructions: stock llama.cpp vs ggml-coreml\n\n\
         Instructions executed inside `llama_context::decode` (valgrind callgrind; 1 thread, 1 repetition), \
         `cargo xtask overhead`. Ratio = stock / ours (> 1: we execute fewer).\n\n\
         | model | type | policy | face | test | stock instructions | ours instructions | ratio |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.5}x |\n",
            r.model,
            r.quant,
            r.policy,
            r.face.name(),
            r.test,
            r.stock_instructions,
            r.ours_instructions,
            r.ratio
        ));
    }
    o
}
