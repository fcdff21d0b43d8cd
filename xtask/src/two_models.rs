//! Stage `two-models`: several models loaded one after the other in one process (a server swapping
//! models, an app with two models), through the hybrid face and the ACCEL face under policy `always`.
//!
//! The models are qwen3-tiny Q8_0 and the same architecture generated with another seed: every weight
//! has the same shape, so the second model's buffers are allocated at the first one's freed addresses,
//! which is where prepared weights of the first model were once served for the second. Each model's
//! logits in the sequence A, B, A must be bit-identical to the same model loaded alone in a fresh
//! process, and close to stock's (NMSE < 1e-3; stale weights give NMSE near 1). Model A once more in
//! bounded mode (every weight per call, in row slices, the next matmul's weight prepared ahead) must
//! be bit-identical to it too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::models::{Model, generator_args, generator_script, qwen2_vocab};
use crate::test::Env;
use crate::{log, paths, util};

/// The helper program (tools/two_models.c), built against the host's headers and libraries; cached
/// by the hash of its source.
fn helper(env: &Env) -> Result<PathBuf> {
    let src = paths::workspace_root().join("tools").join("two_models.c");
    let sha = util::sha256_file(&src)?;
    let dir = paths::dev_cache_root().join("tools");
    let exe = dir.join(format!("two_models-{}", &sha[..12]));
    if exe.is_file() {
        return Ok(exe);
    }
    std::fs::create_dir_all(&dir)?;
    let inc = paths::host_src_dir();
    let tmp = util::tmp_path(&exe);
    util::run(
        Command::new("cc")
            .arg("-O1")
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .arg("-I")
            .arg(inc.join("include"))
            .arg("-I")
            .arg(inc.join("ggml").join("include"))
            .arg("-L")
            .arg(&env.bin)
            .args(["-lllama", "-lggml", "-lggml-base"])
            .arg(format!("-Wl,-rpath,{}", env.bin.display())),
    )?;
    std::fs::rename(&tmp, &exe)?;
    Ok(exe)
}

/// qwen3-tiny with seed 1, quantised to Q8_0 (made once, next to the other models).
fn second_model(env: &Env) -> Result<PathBuf> {
    let dir = env.models.join("extra");
    let out = dir.join("qwen3-tiny-seed1-Q8_0.gguf");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir)?;
    let f16 = dir.join("qwen3-tiny-seed1-F16.gguf");
    let args: Vec<&str> = generator_args(Model::Qwen3Tiny)
        .into_iter()
        .map(|a| if a == "0" { "1" } else { a })
        .collect();
    // Only the seed differs ("--seed 0" is the only "0" among the generator's arguments).
    ensure!(
        args.windows(2).any(|w| w == ["--seed", "1"]),
        "generator arguments changed: {args:?}"
    );
    util::run(
        Command::new(&env.python)
            .arg(generator_script())
            .arg("--vocab")
            .arg(qwen2_vocab())
            .arg("--out")
            .arg(&f16)
            .args(&args),
    )?;
    let tmp = util::tmp_path(&out);
    util::run(
        Command::new(env.bin.join("llama-quantize"))
            .arg(&f16)
            .arg(&tmp)
            .args(["Q8_0", "2"])
            .stdout(Stdio::null()),
    )?;
    std::fs::rename(&tmp, &out)?;
    let _ = std::fs::remove_file(&f16);
    Ok(out)
}

struct Run {
    tokens: Vec<String>,
    logits: Vec<Vec<f32>>,
    offloaded: u64,
    /// Weights prepared into a buffer's registry (kept while the buffer lives).
    prepared: u64,
    /// The executor's weight-side inputs kept (per weight part) and let go with their prepared form,
    /// at the last statistics write (the last context's free, its model still loaded).
    weight_inputs: u64,
    forgotten: u64,
    /// Bounded mode: weights prepared per call in row slices, and first slices prepared ahead.
    sliced: u64,
    prefetched: u64,
}

/// Bounded mode with every weight per call, in 1 MiB slices, the next matmul's weight prepared ahead
/// even on the reference executor: must give the same logits bit for bit.
const BOUNDED: &[(&str, &str)] = &[
    ("GGML_COREML_WEIGHT_BUDGET_MB", "0"),
    ("GGML_COREML_SLICE_MB", "1"),
    ("GGML_COREML_PREFETCH", "1"),
];

/// Runs the helper over `models`; `face`: None = stock (no backend), Some("accel"|"hybrid"); `vars`:
/// more environment for the backend.
fn run(
    exe: &Path,
    env: &Env,
    face: Option<&str>,
    models: &[&Path],
    tag: &str,
    vars: &[(&str, &str)],
) -> Result<Run> {
    let dir = std::env::temp_dir().join(format!("ggml-coreml-two-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prefix = dir.join(tag);
    let stats = dir.join(format!("{tag}.stats.json"));
    let mut c = Command::new(exe);
    match face {
        None | Some("accel") => c.args(["-", "0"]),
        Some(_) => c
            .args(["CoreML-CPU", "99"])
            .env("GGML_COREML_HYBRID", "CPU"),
    };
    if face.is_some() {
        c.env("GGML_BACKEND_PATH", &env.lib)
            .env("GGML_COREML_POLICY", "always")
            .env("GGML_COREML_STATS_FILE", &stats)
            .envs(vars.iter().copied());
    }
    c.arg(&prefix)
        .args(models)
        .env("TWO_MODELS_BACKEND_DIR", &env.bin)
        .stdin(Stdio::null());
    let line = util::display_cmd(&c);
    log!("$ {line}");
    let out = c.output().with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let tokens: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("model "))
        .map(|l| l.split_once(':').map_or("", |x| x.1).trim().to_string())
        .collect();
    let mut logits = Vec::new();
    for i in 0..models.len() {
        let bytes = std::fs::read(format!("{}.{i}.logits", prefix.display()))?;
        logits.push(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    let stats = std::fs::read_to_string(&stats)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    let count = |key: &str| stats.as_ref().and_then(|v| v[key].as_u64()).unwrap_or(0);
    let memory = |key: &str| {
        stats
            .as_ref()
            .and_then(|v| v["memory"][key].as_u64())
            .unwrap_or(0)
    };
    Ok(Run {
        tokens,
        logits,
        offloaded: count("ane_ops"),
        prepared: count("weights_prepared"),
        weight_inputs: memory("executor_weight_inputs"),
        forgotten: memory("executor_weight_inputs_forgotten"),
        sliced: memory("sliced_calls"),
        prefetched: memory("prefetched"),
    })
}

fn nmse(reference: &[f32], x: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (r, v) in reference.iter().zip(x) {
        num += (*r as f64 - *v as f64).powi(2);
        den += (*r as f64).powi(2);
    }
    num / den.max(1e-30)
}

pub fn stage(env: &Env) -> Result<String> {
    let exe = helper(env)?;
    let a = crate::models::model_path(&env.models, Model::Qwen3Tiny, "Q8_0");
    let b = second_model(env)?;
    let stock = run(&exe, env, None, &[&a, &b], "stock", &[])?;
    ensure!(
        nmse(&stock.logits[0], &stock.logits[1]) > 0.1,
        "the two models give the same logits: the test would not see stale weights"
    );
    let mut notes = Vec::new();
    for face in ["hybrid", "accel"] {
        let seq = run(
            &exe,
            env,
            Some(face),
            &[&a, &b, &a],
            &format!("{face}-seq"),
            &[],
        )?;
        let alone_a = run(&exe, env, Some(face), &[&a], &format!("{face}-a"), &[])?;
        let alone_b = run(&exe, env, Some(face), &[&b], &format!("{face}-b"), &[])?;
        let bounded = run(
            &exe,
            env,
            Some(face),
            &[&a],
            &format!("{face}-bounded"),
            BOUNDED,
        )?;
        ensure!(
            bounded.sliced > 0 && bounded.prefetched > 0,
            "{face}: bounded mode sliced {} weights and prepared {} ahead: the test would prove nothing",
            bounded.sliced,
            bounded.prefetched
        );
        if bounded.logits[0] != alone_a.logits[0] || bounded.tokens[0] != alone_a.tokens[0] {
            bail!(
                "{face}: bounded mode (per-call slices, prepared ahead) differs from resident weights \
                 (NMSE {:.3e}; tokens {} vs {})",
                nmse(&alone_a.logits[0], &bounded.logits[0]),
                bounded.tokens[0],
                alone_a.tokens[0]
            );
        }
        ensure!(
            seq.offloaded > 0,
            "{face}: nothing went through the executor"
        );
        // Weights prepared once into their buffer's registry, not per call: otherwise nothing
        // prepared could go stale and the test would prove nothing (the hybrid face once named its
        // buffer type like the CPU's, and llama.cpp put every weight into untracked CPU buffers).
        ensure!(
            seq.prepared > 0 && seq.prepared < seq.offloaded,
            "{face}: {} weights prepared for {} offloaded MUL_MATs: the prepared-weight registry \
             was not used",
            seq.prepared,
            seq.offloaded
        );
        for (i, alone, name) in [
            (0, &alone_a, "A"),
            (1, &alone_b, "B"),
            (2, &alone_a, "A again"),
        ] {
            if seq.logits[i] != alone.logits[0] || seq.tokens[i] != alone.tokens[0] {
                bail!(
                    "{face}: model {name} in a sequence differs from the same model alone \
                     (NMSE {:.3e}; tokens {} vs {})",
                    nmse(&alone.logits[0], &seq.logits[i]),
                    seq.tokens[i],
                    alone.tokens[0]
                );
            }
        }
        // Device copies of a weight go with its prepared form: when the last model's context is
        // freed, the executor keeps that model's weight inputs only, and has let the first two go
        // (the models have the same shapes, so each holds as many).
        ensure!(
            alone_a.weight_inputs > 0 && alone_a.forgotten == 0,
            "{face}: the executor kept {} weight inputs for one model ({} forgotten)",
            alone_a.weight_inputs,
            alone_a.forgotten
        );
        ensure!(
            seq.weight_inputs == alone_a.weight_inputs
                && seq.forgotten == 2 * alone_a.weight_inputs,
            "{face}: after A, B freed and A loaded again the executor holds {} weight inputs and \
             let {} go (one model holds {}): device copies of dropped weights are kept",
            seq.weight_inputs,
            seq.forgotten,
            alone_a.weight_inputs
        );
        let (na, nb) = (
            nmse(&stock.logits[0], &seq.logits[0]),
            nmse(&stock.logits[1], &seq.logits[1]),
        );
        ensure!(
            na < 1e-3 && nb < 1e-3,
            "{face}: logits far from stock (NMSE A {na:.3e}, B {nb:.3e})"
        );
        notes.push(format!(
            "{face}: A,B,A in one process bit-identical to each alone, {} MUL_MATs offloaded, \
             {} weights prepared, executor weight inputs {} held / {} let go with their models, \
             logits NMSE vs stock A {na:.1e} B {nb:.1e}; bounded mode ({} weights in slices, {} \
             prepared ahead) bit-identical",
            seq.offloaded,
            seq.prepared,
            seq.weight_inputs,
            seq.forgotten,
            bounded.sliced,
            bounded.prefetched
        ));
    }
    Ok(notes.join("; "))
}
