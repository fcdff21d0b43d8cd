//! `cache warm <model.gguf>`: prepare every program a model's matmuls need, so the first run is fast.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use ggml_coreml_cache::gguf::Gguf;
use ggml_coreml_executor::{ProgramDesc, Variant};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cache_cmd::WarmArgs;
use crate::prepare::{self, Prepared};
use crate::shapes::{self, VariantChoice};
use crate::{Cli, env};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub hits: usize,
    pub built: usize,
    pub unstored: usize,
    pub declined: usize,
    pub failed: usize,
}

pub fn run(cli: &Cli, args: &WarmArgs) -> anyhow::Result<ExitCode> {
    let ms = if args.m.is_empty() {
        vec![512]
    } else {
        args.m.clone()
    };
    if let Some(bad) = ms.iter().find(|&&m| m == 0) {
        anyhow::bail!("--m {bad}: token counts start at 1");
    }
    let g = read_model(&args.model)?;
    let weights = shapes::matmul_weights(&g);
    println!(
        "model {} ({}, {} tensors, {} matmul weights, model id {})",
        args.model.display(),
        g.architecture().unwrap_or("unknown architecture"),
        g.tensors.len(),
        weights.len(),
        g.model_id()
    );
    let plan = shapes::plan(&weights, args.variant, &ms);
    print!("{plan}");
    let ms_text: Vec<String> = ms.iter().map(|m| m.to_string()).collect();
    println!(
        "{} programs for M = {} (variant {})",
        plan.programs.len(),
        ms_text.join(","),
        variant_name(args.variant)
    );

    let cache = env::open(cli);
    match cache.dir() {
        Some(d) => println!("cache {} ({})", d.display(), cache.env()),
        None => println!("no disk cache: programs are built but not kept"),
    }
    let preparer = prepare::for_platform(cache.clone(), cli);
    println!("preparing with: {}", preparer.describe());

    let start = Instant::now();
    let bar = ProgressBar::new(plan.programs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}, eta {eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut t = Tally::default();
    let mut failures = Vec::new();
    for desc in &plan.programs {
        bar.set_message(desc.key());
        match preparer.prepare(desc) {
            Ok(Prepared::Hit) => t.hits += 1,
            Ok(Prepared::Built) => t.built += 1,
            Ok(Prepared::BuiltUnstored) => t.unstored += 1,
            Ok(Prepared::Declined(why)) => {
                t.declined += 1;
                bar.println(format!("declined {desc}: {why}"));
                // The backend runs a weight whose int8-input program is refused through the f16
                // program (dequantised at prepare time): warm that one too.
                if desc.variant != Variant::F16 {
                    let f16 = ProgramDesc {
                        variant: Variant::F16,
                        group: 0,
                        offsets: false,
                        ..*desc
                    };
                    bar.set_message(format!("{} (fallback)", f16.key()));
                    match preparer.prepare(&f16) {
                        Ok(Prepared::Hit) => t.hits += 1,
                        Ok(Prepared::Built | Prepared::BuiltUnstored) => t.built += 1,
                        Ok(Prepared::Declined(why)) => {
                            t.declined += 1;
                            bar.println(format!("declined fallback {f16}: {why}"));
                        }
                        Err(e) => {
                            t.failed += 1;
                            failures.push(format!("{f16}: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                t.failed += 1;
                failures.push(format!("{desc}: {e}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if failures.is_empty() {
        // The cache is warm: compiles may start again in this process (the breaker opens after a
        // compile timeout; see ggml_coreml_executor::background).
        ggml_coreml_executor::background::CircuitBreaker::global().reset();
    }
    for f in &failures {
        eprintln!("failed {f}");
    }
    println!(
        "{} ({:.2} s)",
        summary(plan.programs.len(), &t),
        start.elapsed().as_secs_f64()
    );
    Ok(if t.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn read_model(path: &Path) -> anyhow::Result<Gguf> {
    Gguf::open(path).with_context(|| format!("reading {}", path.display()))
}

fn variant_name(v: VariantChoice) -> &'static str {
    match v {
        VariantChoice::Auto => "auto: w8f16 for quantised weights, f16 for F16",
        VariantChoice::I8i8 => "i8i8",
        VariantChoice::W8f16 => "w8f16",
        VariantChoice::F16 => "f16",
        VariantChoice::All => "all",
    }
}

/// `N programs, H cache hits, B built` plus what else happened; says so when everything was a hit.
pub fn summary(n: usize, t: &Tally) -> String {
    let mut s = format!(
        "{n} programs, {} cache hits, {} built",
        t.hits,
        t.built + t.unstored
    );
    if t.unstored > 0 {
        s.push_str(&format!(" ({} not kept: no disk cache)", t.unstored));
    }
    if t.declined > 0 {
        s.push_str(&format!(", {} declined", t.declined));
    }
    if t.failed > 0 {
        s.push_str(&format!(", {} failed", t.failed));
    }
    if n > 0 && t.hits == n {
        s.push_str(" — all cache hits");
    }
    s
}
