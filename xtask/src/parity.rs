//! `cargo xtask parity`: does offloading change what the model says? Our backend (policy `always`, one
//! program variant at a time) against stock llama.cpp on the same host, on real models:
//!
//! - per layer: NMSE of every offloaded MUL_MAT vs the CPU backend on the real activations
//!   (`GGML_COREML_PARITY`), aggregated per tensor kind;
//! - end to end: `llama-perplexity` on `tests/data/parity-text.txt` — perplexity delta, KL divergence of our
//!   logits vs stock, same top-1 token — and greedy continuations (`llama-completion --temp 0`);
//! - the bar, measured per model with the same tool and text: KLD(Q8_0 vs F16). Our offload must change
//!   the model less than Q8_0 quantisation itself does.
//!
//! Cells are kept in a store in the dev cache, so a partial run (`--models`, `--quants`, `--variants`)
//! refreshes its cells and `docs/parity.md` is regenerated from every cell measured so far.
//!
//! `--face hybrid` runs our side through the hybrid face (`GGML_COREML_HYBRID=CPU`, `--device CoreML-CPU
//! -ngl 99`) instead of the ACCEL face; the stock side, the bar and the tolerance are the same, and its cells
//! are stored and reported apart from the ACCEL ones.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::bench::{self, Machine};
use crate::face::{self, Face};
use crate::models::{self, Model, ModelSet};
use crate::util;
use crate::{backend, host, log, paths};

/// Context per perplexity chunk: small, so a few KB of text gives many chunks on 2 cores.
const CTX: usize = 128;
/// Chunks scored per run (each scores CTX/2 - 1 = 63 tokens): 8 → 504 positions.
const CHUNKS: usize = 8;
const QUICK_CHUNKS: usize = 4;
/// Tokens generated per greedy continuation.
const N_PREDICT: usize = 32;
/// The model of `--quick` (a real model with its own F16 for the bar).
const QUICK_MODEL: Model = Model::Gemma3_270m;
/// Variants measured when `--variants` is not given.
const VARIANTS: &[&str] = &["i8i8", "w8f16", "f16"];
/// The test-backend-ops threshold, shown next to the per-layer NMSE for scale.
const OPS_NMSE: f64 = 5e-4;

/// Arguments of `cargo xtask parity`.
#[derive(clap::Args, Debug, Clone)]
pub struct ParityArgs {
    /// Comma-separated models (default: all): gemma-3-270m, smollm2-135m, qwen3-tiny, qwen3-tiny-moe.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Comma-separated weight types (default: Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K,F16).
    #[arg(long, value_delimiter = ',')]
    quants: Vec<String>,
    /// Comma-separated program variants (default: i8i8,w8f16,f16; `exact` = f32 on the host, a floor).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// The face our side goes through: `accel` (device `CoreML`, `-ngl 0`) or `hybrid`
    /// (`GGML_COREML_HYBRID=CPU`, `--device CoreML-CPU -ngl 99`). The stock side is the same for both.
    #[arg(long, value_enum, default_value_t = Face::Accel)]
    face: Face,
    /// CI mode: gemma-3-270m (or the one model of `--models`) Q8_0 with the library's default variant,
    /// 4 chunks, through `--face`; fails outside tolerance.
    #[arg(long)]
    quick: bool,
    /// Perplexity chunks of 128 tokens per run.
    #[arg(long, default_value_t = CHUNKS)]
    chunks: usize,
    /// Greedy prompts used (from tests/data/parity-prompts.txt); 0 skips the continuations.
    #[arg(long)]
    prompts: Option<usize>,
    /// Forget the stored cells first (docs/parity.md then holds only this run).
    #[arg(long)]
    fresh: bool,
    /// Output directory (default: bench-out/parity-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure nothing: rebuild docs/parity.md from the stored cells.
    #[arg(long, conflicts_with_all = ["quick", "fresh"])]
    report_only: bool,
}

/// Tools and files one parity run uses.
struct Ctx {
    bin: PathBuf,
    lib: PathBuf,
    models: PathBuf,
    out: PathBuf,
    chunks: usize,
    prompts: Vec<String>,
    /// The face our runs go through.
    face: Face,
    /// Stock continuations by tag: the reference and the per-quant runs share them.
    stock_text: std::cell::RefCell<BTreeMap<String, String>>,
    /// Environment added to our runs after the defaults (`cargo xtask run`: policy, chip profile).
    ours_env: Vec<(String, String)>,
    /// Record per-layer parity in our perplexity runs (the parity tables need it; the run report not).
    layers: bool,
}

/// What one `llama-perplexity --kl-divergence` run reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KldStats {
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_unc: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_base: f64,
    /// Mean ln(PPL(ours)/PPL(base)) and its uncertainty (paired, from the tool).
    #[serde(deserialize_with = "f64_or_nan")]
    pub ln_ratio: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ln_ratio_unc: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub kld: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub kld_unc: f64,
    pub kld_p99: Option<f64>,
    pub kld_max: Option<f64>,
    /// Percent of positions where the top-1 token is the same.
    #[serde(deserialize_with = "f64_or_nan")]
    pub same_top: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub same_top_unc: f64,
}

/// JSON has no NaN: serde_json writes it as null; read null back as NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Per-layer NMSE aggregated over the tensors of one kind (e.g. every `blk.*.ffn_up`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KindNmse {
    pub kind: String,
    pub tensors: usize,
    pub calls: u64,
    /// Call-weighted mean of the per-tensor mean NMSE.
    #[serde(deserialize_with = "f64_or_nan")]
    pub nmse_mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub nmse_max: f64,
}

/// One greedy continuation pair.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Greedy {
    pub prompt: String,
    pub stock: String,
    pub ours: String,
    /// Leading words identical, of `words` words in the stock continuation.
    pub same_words: usize,
    pub words: usize,
}

/// The bar of one model: stock Q8_0 against stock F16.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reference {
    pub model: String,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_f16: f64,
    pub stats: KldStats,
    pub greedy: Vec<Greedy>,
    pub chunks: usize,
    pub measured: String,
}

/// One model × quant × variant, through one face.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub model: String,
    pub quant: String,
    pub variant: String,
    /// The face our side went through (cells stored before faces existed are ACCEL cells).
    #[serde(default)]
    pub face: Face,
    /// MUL_MATs the executor ran in the perplexity run (the library's `GGML_COREML_STATS_FILE`).
    #[serde(default)]
    pub offloaded_ops: Option<u64>,
    /// The variant the library reported using (parity file), if it wrote one.
    pub variant_used: Option<String>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_stock: f64,
    pub stats: KldStats,
    /// The exact floor of this model × quant (see [`judge`]).
    #[serde(default)]
    pub floor: Option<KldStats>,
    pub layers: Vec<KindNmse>,
    pub offloaded_tensors: usize,
    pub greedy: Vec<Greedy>,
    pub chunks: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub seconds: f64,
    pub measured: String,
    pub command: String,
}

/// Verdict of a cell against its model's reference.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub kld_ok: bool,
    pub ppl_ok: bool,
    pub top_ok: bool,
}

impl Verdict {
    pub fn pass(&self) -> bool {
        self.kld_ok && self.ppl_ok && self.top_ok
    }
}

/// The tolerance (docs/parity.md explains it). `reference` is stock Q8_0 against stock F16 (the bar);
/// `floor` is exact f32 arithmetic against stock (the stock CPU's own deviation, from its Q8_0/Q8_K
/// activation quantisation), which no offload can undercut; small independent errors add, so it is added
/// to the bar:
/// - KLD(stock ‖ ours) < KLD(F16 ‖ Q8_0) + KLD(stock ‖ exact);
/// - |ln PPL(ours)/PPL(stock)| ≤ |ln PPL(Q8_0)/PPL(F16)| + |ln PPL(exact)/PPL(stock)| + 2σ(ours);
/// - top-1 disagreement (100 − same-top %) ≤ Q8_0's + exact's + 2σ(ours).
pub fn judge(cell: &KldStats, reference: &KldStats, floor: Option<&KldStats>) -> Verdict {
    let (fk, fl, fd) = floor.map_or((0.0, 0.0, 0.0), |f| {
        (f.kld, f.ln_ratio.abs(), 100.0 - f.same_top)
    });
    Verdict {
        kld_ok: cell.kld < reference.kld + fk,
        ppl_ok: cell.ln_ratio.abs() <= reference.ln_ratio.abs() + fl + 2.0 * cell.ln_ratio_unc,
        top_ok: 100.0 - cell.same_top
            <= (100.0 - reference.same_top) + fd + 2.0 * cell.same_top_unc,
    }
}

/// The bar a cell's KLD must stay under.
pub fn kld_bar(reference: &KldStats, floor: Option<&KldStats>) -> f64 {
    reference.kld + floor.map_or(0.0, |f| f.kld)
}

/// Exact f32 arithmetic (`GGML_COREML_VARIANT=exact`) against stock, per model × quant: the floor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Floor {
    pub stats: KldStats,
    pub layers: Vec<KindNmse>,
    #[serde(default)]
    pub tensors: usize,
    pub measured: String,
}

/// Every cell and reference measured so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Store {
    references: BTreeMap<String, Reference>,
    /// Keyed `model/quant/variant` ([`store_key`]: prefixed `hybrid/` for the hybrid face).
    cells: BTreeMap<String, Cell>,
    /// Keyed `model/quant` (prefixed likewise: the floor is measured through the cell's face).
    #[serde(default)]
    floors: BTreeMap<String, Floor>,
    /// `model/quant` (or `model/reference`) → why its last run failed.
    #[serde(default)]
    errors: BTreeMap<String, String>,
    machine: Option<Machine>,
}

/// Store key of a model × quant (× variant) measured through `face`: ACCEL keys are the historical
/// `model/quant[/variant]` (so older stores read back unchanged); other faces are prefixed with their name.
fn store_key(face: Face, parts: &[&str]) -> String {
    let key = parts.join("/");
    match face {
        Face::Accel => key,
        f => format!("{}/{key}", f.name()),
    }
}

fn store_path() -> PathBuf {
    // `GGML_COREML_PARITY_STORE`: another store file (e.g. one per worktree on a shared cache).
    std::env::var_os("GGML_COREML_PARITY_STORE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::dev_cache_root().join("parity").join("store.json"))
}

/// The stored cells; a store that exists but does not parse is an error (never silently replaced).
fn load_store() -> Result<Store> {
    let path = store_path();
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Store::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    parse_store(&bytes).with_context(|| {
        format!(
            "{} does not parse (use --fresh to start over)",
            path.display()
        )
    })
}

/// A store's JSON. Cells without a `face` are ACCEL cells, except under a `hybrid/` key: an xtask from
/// before faces drops the field when it rewrites the store, the key keeps it.
fn parse_store(bytes: &[u8]) -> Result<Store> {
    let mut store: Store = serde_json::from_slice(bytes)?;
    let prefix = format!("{}/", Face::Hybrid.name());
    for (key, cell) in store.cells.iter_mut() {
        if key.starts_with(&prefix) {
            cell.face = Face::Hybrid;
        }
    }
    Ok(store)
}

fn save_store(s: &Store) -> Result<()> {
    util::write_atomic(&store_path(), &serde_json::to_vec_pretty(s)?)
}

/// The library's default variant for a weight type (mirror of `driver::Mode::for_type`: the exact block
/// form with fp16 activations for quantised weights, fp16 for F16 weights); checked against what the
/// library reports when it can.
pub fn default_variant(quant: &str) -> &'static str {
    if quant.eq_ignore_ascii_case("F16") {
        "f16"
    } else {
        "w8f16"
    }
}

/// Variants that mean something for a weight type: w8f16 over F16 weights is the f16 program.
fn applies(variant: &str, quant: &str) -> bool {
    !(quant.eq_ignore_ascii_case("F16") && variant.eq_ignore_ascii_case("w8f16"))
}

pub fn main(args: ParityArgs) -> Result<Option<PathBuf>> {
    if args.quick {
        let m = match args.models.as_slice() {
            [] => QUICK_MODEL,
            [one] => one.parse()?,
            _ => bail!("--quick takes at most one model"),
        };
        let line = quick_check_with(m, args.face)?;
        println!("{line}");
        return Ok(None);
    }
    if args.report_only {
        let doc = paths::workspace_root().join("docs").join("parity.md");
        fs::write(&doc, render(&load_store()?))
            .with_context(|| format!("cannot write {}", doc.display()))?;
        return Ok(Some(doc));
    }
    let t0 = Instant::now();
    let model_list: Vec<Model> = if args.models.is_empty() {
        Model::ALL.to_vec()
    } else {
        args.models
            .iter()
            .map(|m| m.parse())
            .collect::<Result<_>>()?
    };
    let quants: Vec<String> = if args.quants.is_empty() {
        models::FULL_QUANTS.iter().map(|q| q.to_string()).collect()
    } else {
        args.quants.iter().map(|q| q.to_ascii_uppercase()).collect()
    };
    let variants: Vec<String> = if args.variants.is_empty() {
        VARIANTS.iter().map(|v| v.to_string()).collect()
    } else {
        args.variants
            .iter()
            .map(|v| v.to_ascii_lowercase())
            .collect()
    };
    for v in &variants {
        ensure!(
            matches!(
                v.as_str(),
                "i8i8" | "i8i8r" | "i8i8o" | "w8f16" | "f16" | "exact"
            ),
            "unknown variant `{v}` (i8i8, i8i8r, i8i8o, w8f16, f16, exact)"
        );
    }
    ensure!(
        args.chunks >= 2,
        "--chunks must be at least 2 (llama-perplexity prints statistics from 100 positions)"
    );
    let face = args.face;
    let out = args.out.clone().unwrap_or_else(|| {
        paths::workspace_root()
            .join("bench-out")
            .join(format!("parity-{}", bench::utc_stamp()))
    });
    let mut ctx = prepare(&model_list, &quants, out, args.chunks, face)?;
    if let Some(n) = args.prompts {
        ctx.prompts.truncate(n);
    }
    let mut store = if args.fresh {
        Store::default()
    } else {
        load_store()?
    };
    store.machine = Some(Machine::probe());
    let total: usize = model_list.len()
        * quants
            .iter()
            .map(|q| variants.iter().filter(|v| applies(v, q)).count())
            .sum::<usize>();
    let mut done = 0;
    // A failing tool run costs its model × quant, not the whole run: recorded and shown in the report.
    for &m in &model_list {
        let reference = match measure_reference(&ctx, m) {
            Ok(r) => r,
            Err(e) => {
                log!("parity: {} reference failed: {e:#}", m.name());
                store
                    .errors
                    .insert(format!("{}/reference", m.name()), format!("{e:#}"));
                save_store(&store)?;
                continue;
            }
        };
        store.errors.remove(&format!("{}/reference", m.name()));
        store
            .references
            .insert(m.name().to_string(), reference.clone());
        save_store(&store)?;
        for q in &quants {
            let key = store_key(face, &[m.name(), q]);
            match measure_quant(&ctx, m, q, &variants, &reference, &mut done, total) {
                Ok((cells, floor)) => {
                    store.errors.remove(&key);
                    store.floors.insert(key.clone(), floor);
                    for c in cells {
                        store
                            .cells
                            .insert(store_key(face, &[&c.model, &c.quant, &c.variant]), c);
                    }
                }
                Err(e) => {
                    log!("parity: {key} failed: {e:#}");
                    store.errors.insert(key, format!("{e:#}"));
                }
            }
            save_store(&store)?;
        }
    }
    let md = render(&store);
    fs::write(
        ctx.out.join("results.json"),
        serde_json::to_vec_pretty(&store)?,
    )?;
    fs::write(ctx.out.join("report.md"), &md)?;
    let doc = paths::workspace_root().join("docs").join("parity.md");
    fs::write(&doc, &md).with_context(|| format!("cannot write {}", doc.display()))?;
    log!(
        "parity: {} cells in {:.0} s; {} and {}",
        total,
        t0.elapsed().as_secs_f64(),
        doc.display(),
        ctx.out.join("results.json").display()
    );
    let fails: Vec<String> = store
        .cells
        .values()
        .filter(|c| c.variant == default_variant(&c.quant))
        .filter_map(|c| {
            let r = store.references.get(&c.model)?;
            (!judge(&c.stats, &r.stats, c.floor.as_ref()).pass())
                .then(|| store_key(c.face, &[&c.model, &c.quant, &c.variant]))
        })
        .collect();
    if !fails.is_empty() {
        log!(
            "parity: DEFAULT VARIANT OUTSIDE TOLERANCE in {} cell(s): {}",
            fails.len(),
            fails.join(", ")
        );
    }
    Ok(Some(ctx.out))
}

/// The CI stage: one model (gemma-3-270m), Q8_0, the library's default variant, 4 chunks, ACCEL face;
/// errors when the cell is outside the tolerance. Returns one line for the stage verdict.
/// Also runs the route of an int8 chip (`GGML_COREML_CHIP=M4`, issue #14) against the same references:
/// within tolerance, with int8 × int8 programs for at least [`INT8_SHARE_MIN`] of the offloaded FLOPs.
pub fn quick_check() -> Result<String> {
    quick_check_on(QUICK_MODEL, Face::Accel, Some("M4"))
}

/// Least int8 × int8 share of the offloaded MUL_MAT FLOPs the int8-chip route must reach (issue #14).
const INT8_SHARE_MIN: f64 = 0.80;

/// [`quick_check`] for any model and face. Also errors when the executor ran no MUL_MAT (the run would
/// then have compared stock with stock).
pub fn quick_check_with(m: Model, face: Face) -> Result<String> {
    quick_check_on(m, face, None)
}

/// [`quick_check_with`], plus the route of `int8_chip` (`GGML_COREML_CHIP`) when given.
fn quick_check_on(m: Model, face: Face, int8_chip: Option<&str>) -> Result<String> {
    let out = paths::workspace_root().join("bench-out").join(format!(
        "parity-quick-{}-{}-{}",
        m.name(),
        face.name(),
        bench::utc_stamp()
    ));
    let mut ctx = prepare(&[m], &["Q8_0".to_string()], out, QUICK_CHUNKS, face)?;
    let q8 = ctx.model(m, "Q8_0")?;
    let f16 = ctx.model(m, "F16")?;
    let base_f16 = ctx.out.join("base-F16.kld");
    let base_q8 = ctx.out.join("base-Q8_0.kld");
    let _ = ctx.ppl_base(&f16, &base_f16, "quick-stock-F16")?;
    let reference = ctx.ppl_kld(&q8, &base_f16, None, "quick-stock-Q8_0-vs-F16")?;
    let ppl_stock = ctx.ppl_base(&q8, &base_q8, "quick-stock-Q8_0")?;
    let floor = ctx.ppl_kld(&q8, &base_q8, Some("exact"), "quick-floor-exact")?;
    // No GGML_COREML_VARIANT: the library's default, whatever it is today.
    let ours = ctx.ppl_kld(&q8, &base_q8, Some(""), "quick-ours-default")?;
    let ops = ctx.offloaded("quick-ours-default")?;
    let layers = read_parity(&ctx.out.join("quick-ours-default.parity.json"));
    let used = layers
        .as_ref()
        .and_then(|(_, v)| v.clone())
        .unwrap_or_else(|| format!("{} (library default)", default_variant("Q8_0")));
    let int8 = match int8_chip {
        Some(chip) => {
            ctx.ours_env = vec![("GGML_COREML_CHIP".into(), chip.into())];
            let tag = "quick-ours-int8-chip";
            let k = ctx.ppl_kld(&q8, &base_q8, Some(""), tag)?;
            let stats: serde_json::Value =
                serde_json::from_slice(&fs::read(ctx.out.join(format!("{tag}.stats.json")))?)
                    .with_context(|| format!("{tag}: statistics do not parse"))?;
            let share = stats["int8_flop_share"].as_f64().unwrap_or(0.0);
            Some((chip, k, share))
        }
        None => None,
    };
    let _ = fs::remove_file(&base_f16);
    let _ = fs::remove_file(&base_q8);
    let mut v = judge(&ours, &reference, Some(&floor));
    let mut line = format!(
        "{} Q8_0 variant {used}, {} face: KLD {} (bar {} = Q8_0 vs F16 {} + exact floor {}), ln PPL ratio {:+.4} ± {:.4} \
         (bar ±{:.4}), same top-1 {:.1}% (Q8_0 vs F16 {:.1}%, exact {:.1}%), PPL stock {:.3} ours {:.3}, MUL_MATs offloaded {ops}",
        m.name(),
        face.name(),
        kfmt(ours.kld),
        kfmt(kld_bar(&reference, Some(&floor))),
        kfmt(reference.kld),
        kfmt(floor.kld),
        ours.ln_ratio,
        ours.ln_ratio_unc,
        reference.ln_ratio.abs() + floor.ln_ratio.abs(),
        ours.same_top,
        reference.same_top,
        floor.same_top,
        ppl_stock,
        ours.ppl
    );
    let mut int8_short = false;
    if let Some((chip, k, share)) = &int8 {
        let w = judge(k, &reference, Some(&floor));
        line.push_str(&format!(
            "; routed as on {chip}: KLD {}, ln PPL ratio {:+.4} ± {:.4}, same top-1 {:.1}%, int8 × int8 {:.1}% of offloaded FLOPs (at least {:.0}%)",
            kfmt(k.kld),
            k.ln_ratio,
            k.ln_ratio_unc,
            k.same_top,
            share * 100.0,
            INT8_SHARE_MIN * 100.0
        ));
        v.kld_ok &= w.kld_ok;
        v.ppl_ok &= w.ppl_ok;
        v.top_ok &= w.top_ok;
        int8_short = *share < INT8_SHARE_MIN;
    }
    if int8_short {
        bail!(
            "int8-chip route under its int8 share: {line}; logs in {}",
            ctx.out.display()
        );
    }
    if !v.pass() {
        let failed: Vec<&str> = [
            (!v.kld_ok).then_some("KLD"),
            (!v.ppl_ok).then_some("PPL"),
            (!v.top_ok).then_some("top-1"),
        ]
        .into_iter()
        .flatten()
        .collect();
        bail!(
            "parity outside tolerance ({}): {line}; logs in {}",
            failed.join(", "),
            ctx.out.display()
        );
    }
    Ok(line)
}

/// How far our run is from stock and from the F16 model, next to stock's own distance from F16: what
/// `cargo xtask run` reports (greedy text alone reads as a defect where stock's own quantisation drifts
/// as much).
pub struct Agreement {
    pub chunks: usize,
    pub ours_vs_stock: KldStats,
    /// None when no F16 of the model is at hand.
    pub ours_vs_f16: Option<KldStats>,
    pub stock_vs_f16: Option<KldStats>,
    /// The library's statistics of the ours-vs-stock run (variants, int8 share).
    pub stats: Option<serde_json::Value>,
}

/// The three KL divergences of [`Agreement`] on tests/data/parity-text.txt (`QUICK_CHUNKS` chunks of
/// `CTX` tokens), our side through the ACCEL face with `ours_env` (policy, chip profile) added.
pub fn agreement(
    bin: &Path,
    lib: &Path,
    model: &Path,
    f16: Option<&Path>,
    ours_env: Vec<(String, String)>,
) -> Result<Agreement> {
    let out = std::env::temp_dir().join(format!("ggml-coreml-agree-{}", std::process::id()));
    fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let ctx = Ctx {
        bin: bin.to_path_buf(),
        lib: lib.to_path_buf(),
        models: PathBuf::new(),
        out: out.clone(),
        chunks: QUICK_CHUNKS,
        prompts: Vec::new(),
        face: Face::Accel,
        stock_text: Default::default(),
        ours_env,
        layers: false,
    };
    let run = || -> Result<Agreement> {
        let base = out.join("stock.kld");
        ctx.ppl_base(model, &base, "stock")?;
        let ours_vs_stock = ctx.ppl_kld(model, &base, Some(""), "ours-vs-stock")?;
        let stats = fs::read(out.join("ours-vs-stock.stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let _ = fs::remove_file(&base);
        let (mut ours_vs_f16, mut stock_vs_f16) = (None, None);
        if let Some(f16) = f16 {
            let base = out.join("f16.kld");
            ctx.ppl_base(f16, &base, "f16")?;
            stock_vs_f16 = Some(ctx.ppl_kld(model, &base, None, "stock-vs-f16")?);
            ours_vs_f16 = Some(ctx.ppl_kld(model, &base, Some(""), "ours-vs-f16")?);
            let _ = fs::remove_file(&base);
        }
        Ok(Agreement {
            chunks: ctx.chunks,
            ours_vs_stock,
            ours_vs_f16,
            stock_vs_f16,
            stats,
        })
    };
    let r = run();
    if r.is_ok() {
        let _ = fs::remove_dir_all(&out);
    }
    r.with_context(|| format!("logs in {}", out.join("logs").display()))
}

fn prepare(
    model_list: &[Model],
    quants: &[String],
    out: PathBuf,
    chunks: usize,
    face: Face,
) -> Result<Ctx> {
    let bin = host::ensure_host(None).context("host build")?;
    let mut need: Vec<String> = quants.to_vec();
    // The bar needs Q8_0 and F16 of every model.
    for q in ["Q8_0", "F16"] {
        if !need.iter().any(|x| x == q) {
            need.push(q.to_string());
        }
    }
    let models = models::ensure_models(&ModelSet {
        models: model_list.to_vec(),
        quants: need,
    })
    .context("models")?;
    let lib = backend::build_backend(true).context("backend build")?;
    fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let prompts_file = paths::workspace_root().join("tests/data/parity-prompts.txt");
    let prompts = fs::read_to_string(&prompts_file)
        .with_context(|| format!("cannot read {}", prompts_file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    Ok(Ctx {
        bin,
        lib,
        models,
        out,
        chunks,
        prompts,
        face,
        stock_text: Default::default(),
        ours_env: Vec::new(),
        layers: true,
    })
}

fn measure_reference(ctx: &Ctx, m: Model) -> Result<Reference> {
    let f16 = ctx.model(m, "F16")?;
    let q8 = ctx.model(m, "Q8_0")?;
    let base = ctx.out.join(format!("{}-F16.kld", m.name()));
    log!("parity: {} reference (stock Q8_0 vs stock F16)", m.name());
    let ppl_f16 = ctx.ppl_base(&f16, &base, &format!("{}-stock-F16", m.name()))?;
    let stats = ctx.ppl_kld(&q8, &base, None, &format!("{}-stock-Q8_0-vs-F16", m.name()))?;
    let _ = fs::remove_file(&base);
    let mut greedy = Vec::new();
    for (i, p) in ctx.prompts.iter().enumerate() {
        let a = ctx.completion(&f16, p, None, &format!("{}-F16-stock-p{i}", m.name()))?;
        let b = ctx.completion(&q8, p, None, &format!("{}-Q8_0-stock-p{i}", m.name()))?;
        greedy.push(pair(p, a, b));
    }
    Ok(Reference {
        model: m.name().into(),
        ppl_f16,
        stats,
        greedy,
        chunks: ctx.chunks,
        measured: bench::utc_iso(),
    })
}

fn measure_quant(
    ctx: &Ctx,
    m: Model,
    q: &str,
    variants: &[String],
    reference: &Reference,
    done: &mut usize,
    total: usize,
) -> Result<(Vec<Cell>, Floor)> {
    let path = ctx.model(m, q)?;
    let base = ctx.out.join(format!("{}-{q}.kld", m.name()));
    let ppl_stock = ctx.ppl_base(&path, &base, &format!("{}-stock-{q}", m.name()))?;
    let ftag = ctx.ours_tag(format!("{}-{q}-floor-exact", m.name()));
    let fstats = ctx.ppl_kld(&path, &base, Some("exact"), &ftag)?;
    let fnodes =
        read_parity(&ctx.out.join(format!("{ftag}.parity.json"))).map_or_else(Vec::new, |(n, _)| n);
    let floor = Floor {
        stats: fstats,
        layers: aggregate(&fnodes),
        tensors: fnodes.len(),
        measured: bench::utc_iso(),
    };
    let stock: Vec<String> = ctx
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| ctx.completion(&path, p, None, &format!("{}-{q}-stock-p{i}", m.name())))
        .collect::<Result<_>>()?;
    let mut cells = Vec::new();
    for v in variants.iter().filter(|v| applies(v, q)) {
        *done += 1;
        let t = Instant::now();
        let tag = ctx.ours_tag(format!("{}-{q}-{v}", m.name()));
        log!(
            "parity: [{}/{}] {} {q} {v} ({} face)",
            *done,
            total,
            m.name(),
            ctx.face.name()
        );
        let stats = ctx.ppl_kld(&path, &base, Some(v), &tag)?;
        let offloaded_ops = ctx.offloaded(&tag)?;
        let (layers, used, tensors) = match read_parity(&ctx.out.join(format!("{tag}.parity.json")))
        {
            Some((nodes, used)) => {
                let n = nodes.len();
                (aggregate(&nodes), used, n)
            }
            None => (Vec::new(), None, 0),
        };
        let mut greedy = Vec::new();
        for (i, p) in ctx.prompts.iter().enumerate() {
            let ours = ctx.completion(&path, p, Some(v), &format!("{tag}-p{i}"))?;
            greedy.push(pair(p, stock[i].clone(), ours));
        }
        let cell = Cell {
            model: m.name().into(),
            quant: q.into(),
            variant: v.clone(),
            face: ctx.face,
            offloaded_ops: Some(offloaded_ops),
            variant_used: used,
            ppl_stock,
            stats,
            floor: Some(floor.stats.clone()),
            layers,
            offloaded_tensors: tensors,
            greedy,
            chunks: ctx.chunks,
            seconds: t.elapsed().as_secs_f64(),
            measured: bench::utc_iso(),
            command: format!(
                "cargo xtask parity --models {} --quants {q} --variants {v}{}",
                m.name(),
                match ctx.face {
                    Face::Accel => String::new(),
                    f => format!(" --face {}", f.name()),
                }
            ),
        };
        let verdict = judge(&cell.stats, &reference.stats, Some(&floor.stats));
        log!(
            "parity: {} {q} {v} ({} face): KLD {:.3e} (bar {:.3e}), ln PPL {:+.4} ± {:.4}, top-1 {:.1}%, {} MUL_MATs offloaded → {}",
            m.name(),
            ctx.face.name(),
            cell.stats.kld,
            kld_bar(&reference.stats, Some(&floor.stats)),
            cell.stats.ln_ratio,
            cell.stats.ln_ratio_unc,
            cell.stats.same_top,
            offloaded_ops,
            if verdict.pass() { "pass" } else { "FAIL" }
        );
        cells.push(cell);
    }
    let _ = fs::remove_file(&base);
    Ok((cells, floor))
}

fn pair(prompt: &str, stock: String, ours: String) -> Greedy {
    let (same_words, words) = same_prefix_words(&stock, &ours);
    Greedy {
        prompt: prompt.into(),
        stock,
        ours,
        same_words,
        words,
    }
}

/// Leading whitespace-separated words identical in both, and the word count of `a`.
pub fn same_prefix_words(a: &str, b: &str) -> (usize, usize) {
    let same = a
        .split_whitespace()
        .zip(b.split_whitespace())
        .take_while(|(x, y)| x == y)
        .count();
    (same, a.split_whitespace().count())
}

impl Ctx {
    /// Tag of one of our runs: ACCEL tags are unchanged, other faces add their name (same out dir).
    fn ours_tag(&self, tag: String) -> String {
        match self.face {
            Face::Accel => tag,
            f => format!("{tag}-{}", f.name()),
        }
    }

    /// MUL_MATs the executor ran in our perplexity run `tag`; an error when there were none (the run
    /// would have compared stock with stock) or the library wrote no statistics.
    fn offloaded(&self, tag: &str) -> Result<u64> {
        let path = self.out.join(format!("{tag}.stats.json"));
        let (ops, policy) = face::read_stats(&path)
            .with_context(|| format!("no statistics from the library in {}", path.display()))?;
        ensure!(
            ops > 0,
            "{tag}: the executor ran no MUL_MAT (policy {policy}, {} face); see {}",
            self.face.name(),
            path.display()
        );
        Ok(ops)
    }

    fn model(&self, m: Model, q: &str) -> Result<PathBuf> {
        let p = models::model_path(&self.models, m, q);
        ensure!(
            p.is_file(),
            "{} missing (cargo xtask models --full)",
            p.display()
        );
        Ok(p)
    }

    /// A host tool; `variant` Some = with our backend (`Some("")`: the library's default variant).
    /// Perplexity runs record per-layer parity and statistics; completions skip that (it would double
    /// every decode step on the host).
    fn tool(&self, name: &str, variant: Option<&str>, tag: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        face::clean_env(&mut c);
        c.args(["-t", "2"]);
        if variant.is_none() {
            // Stock: CPU layers, whatever the face of our side.
            c.args(["-ngl", "0"]);
        }
        if let Some(v) = variant {
            self.face.ours(&mut c);
            c.env("GGML_BACKEND_PATH", &self.lib)
                .env("GGML_COREML_POLICY", "always");
            if name == "llama-perplexity" {
                if self.layers {
                    c.env(
                        "GGML_COREML_PARITY",
                        self.out.join(format!("{tag}.parity.json")),
                    );
                }
                c.env(
                    "GGML_COREML_STATS_FILE",
                    self.out.join(format!("{tag}.stats.json")),
                );
            }
            if !v.is_empty() {
                c.env("GGML_COREML_VARIANT", v);
            }
            for (k, val) in &self.ours_env {
                c.env(k, val);
            }
        }
        c
    }

    /// Stock run that writes the logits for later KL divergence; returns its perplexity.
    fn ppl_base(&self, model: &Path, base: &Path, tag: &str) -> Result<f64> {
        let text = paths::workspace_root().join("tests/data/parity-text.txt");
        let mut c = self.tool("llama-perplexity", None, tag);
        c.arg("-m").arg(model).arg("-f").arg(&text).args([
            "-c",
            &CTX.to_string(),
            "--chunks",
            &self.chunks.to_string(),
        ]);
        c.arg("--kl-divergence-base").arg(base);
        let out = util::run_logged(&mut c, &self.out.join("logs").join(format!("{tag}.log")))?;
        parse_final_ppl(&out).with_context(|| format!("no `Final estimate` in {tag}'s log"))
    }

    /// Run against a logits file; `variant` None = stock, Some("") = ours with the default variant.
    fn ppl_kld(
        &self,
        model: &Path,
        base: &Path,
        variant: Option<&str>,
        tag: &str,
    ) -> Result<KldStats> {
        let mut c = self.tool("llama-perplexity", variant, tag);
        c.arg("-m")
            .arg(model)
            .args(["-c", &CTX.to_string(), "--chunks", &self.chunks.to_string()]);
        c.arg("--kl-divergence-base")
            .arg(base)
            .arg("--kl-divergence");
        let out = util::run_logged(&mut c, &self.out.join("logs").join(format!("{tag}.log")))?;
        parse_kld(&out).with_context(|| format!("no KL divergence statistics in {tag}'s log"))
    }

    /// Greedy continuation; returns the generated text without the prompt.
    fn completion(
        &self,
        model: &Path,
        prompt: &str,
        variant: Option<&str>,
        tag: &str,
    ) -> Result<String> {
        if variant.is_none()
            && let Some(t) = self.stock_text.borrow().get(tag)
        {
            return Ok(t.clone());
        }
        let text = self.run_completion(model, prompt, variant, tag)?;
        if variant.is_none() {
            self.stock_text
                .borrow_mut()
                .insert(tag.to_string(), text.clone());
        }
        Ok(text)
    }

    fn run_completion(
        &self,
        model: &Path,
        prompt: &str,
        variant: Option<&str>,
        tag: &str,
    ) -> Result<String> {
        let mut c = self.tool("llama-completion", variant, tag);
        c.arg("-m").arg(model).args([
            "-p",
            prompt,
            "-n",
            &N_PREDICT.to_string(),
            "--temp",
            "0",
            "--seed",
            "1",
        ]);
        c.args(["-no-cnv", "--no-warmup", "-c", "256"]);
        let log_path = self.out.join("logs").join(format!("{tag}.log"));
        let line = util::display_cmd(&c);
        let o = c
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot start {line}"))?;
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        fs::write(
            &log_path,
            format!(
                "$ {line}\n{stdout}\n--- stderr\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
        )?;
        ensure!(
            o.status.success(),
            "`{line}` failed ({}); log {}",
            o.status,
            log_path.display()
        );
        let text = stdout.trim_start();
        Ok(text.strip_prefix(prompt).unwrap_or(text).trim().to_string())
    }
}

/// `Final estimate: PPL = 2.5509 +/- 0.22972`.
pub fn parse_final_ppl(log: &str) -> Option<f64> {
    let l = log
        .lines()
        .rev()
        .find(|l| l.contains("Final estimate: PPL ="))?;
    l.split("PPL =")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `====== Perplexity statistics ======` and KL divergence blocks of a `--kl-divergence` run.
pub fn parse_kld(log: &str) -> Option<KldStats> {
    let pm = |key: &str| -> Option<(f64, f64)> {
        let l = log.lines().find(|l| l.trim_start().starts_with(key))?;
        let rest = l.split_once(':')?.1;
        let mut it = rest.split('±');
        let v = it
            .next()?
            .trim()
            .trim_end_matches('%')
            .trim()
            .parse()
            .ok()?;
        let u = it
            .next()
            .and_then(|u| u.trim().trim_end_matches('%').trim().parse().ok())
            .unwrap_or(0.0);
        Some((v, u))
    };
    let (ppl, ppl_unc) = pm("Mean PPL(Q)")?;
    let (ppl_base, _) = pm("Mean PPL(base)")?;
    let (ln_ratio, ln_ratio_unc) = pm("Mean ln(PPL(Q)/PPL(base))")?;
    let (kld, kld_unc) = pm("Mean    KLD")?;
    let (same_top, same_top_unc) = pm("Same top p")?;
    Some(KldStats {
        ppl,
        ppl_unc,
        ppl_base,
        ln_ratio,
        ln_ratio_unc,
        kld,
        kld_unc,
        kld_p99: pm("99.0%   KLD").map(|x| x.0),
        kld_max: pm("Maximum KLD").map(|x| x.0),
        same_top,
        same_top_unc,
    })
}

/// One node of the backend's parity file.
#[derive(Clone, Debug, Deserialize)]
pub struct ParityNode {
    pub name: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub calls: u64,
    #[serde(default)]
    pub nmse_mean: Option<f64>,
    #[serde(default)]
    pub nmse_max: Option<f64>,
}

#[derive(Deserialize)]
struct ParityFile {
    nodes: Vec<ParityNode>,
}

/// Nodes of a `GGML_COREML_PARITY` file and the variant they report (None when the file is absent:
/// a library without the feature).
fn read_parity(path: &Path) -> Option<(Vec<ParityNode>, Option<String>)> {
    let text = fs::read_to_string(path).ok()?;
    let nodes = parse_parity(&text).ok()?;
    let used = nodes.iter().find_map(|n| n.variant.clone());
    Some((nodes, used))
}

/// Parses the parity JSON; non-finite numbers (`inf`, `NaN`, which the backend prints with `{:e}`) become
/// null / huge so one odd node does not hide the others.
pub fn parse_parity(text: &str) -> Result<Vec<ParityNode>> {
    let fixed = text
        .replace(":NaN", ":null")
        .replace(":-inf", ":-1e308")
        .replace(":inf", ":1e308");
    let f: ParityFile =
        serde_json::from_str(&fixed).context("parity file is not the expected JSON")?;
    Ok(f.nodes)
}

/// `blk.12.ffn_up` → `ffn_up`; names without a block stay as they are (`output`).
pub fn tensor_kind(name: &str) -> String {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    // A MUL_MAT over the token embedding is the tied LM head (gemma, smollm2).
    if base == "token_embd" {
        return "output".into();
    }
    match base.strip_prefix("blk.") {
        Some(rest) => rest.split_once('.').map_or(rest, |(_, k)| k).to_string(),
        None => base.to_string(),
    }
}

pub fn aggregate(nodes: &[ParityNode]) -> Vec<KindNmse> {
    let mut kinds: BTreeMap<String, (KindNmse, f64)> = BTreeMap::new();
    for n in nodes {
        let kind = tensor_kind(&n.name);
        let (k, wsum) = kinds.entry(kind.clone()).or_insert_with(|| {
            (
                KindNmse {
                    kind,
                    ..Default::default()
                },
                0.0,
            )
        });
        k.tensors += 1;
        k.calls += n.calls;
        *wsum += n.nmse_mean.unwrap_or(f64::NAN) * n.calls.max(1) as f64;
        k.nmse_max = k.nmse_max.max(n.nmse_max.unwrap_or(f64::NAN));
    }
    kinds
        .into_values()
        .map(|(mut k, wsum)| {
            k.nmse_mean = wsum / k.calls.max(k.tensors as u64) as f64;
            k
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// docs/parity.md

/// Tensor kinds in the per-layer table, in model order; anything else goes to "other".
const KINDS: &[&str] = &[
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "output",
];

fn e(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1e}")
    } else {
        "n/a".into()
    }
}

fn render(s: &Store) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let order = |c: &Cell| {
        let fi = c.face;
        let mi = Model::ALL
            .iter()
            .position(|m| m.name() == c.model)
            .unwrap_or(99);
        let qi = models::FULL_QUANTS
            .iter()
            .position(|q| *q == c.quant)
            .unwrap_or(99);
        let vi = ["i8i8", "i8i8r", "i8i8o", "w8f16", "f16", "exact"]
            .iter()
            .position(|v| *v == c.variant)
            .unwrap_or(99);
        (fi, mi, qi, vi)
    };
    let mut cells: Vec<&Cell> = s.cells.values().collect();
    cells.sort_by_key(|c| order(c));
    let verdict = |c: &Cell| cell_verdict(s, c);

    let _ = writeln!(
        o,
        "# Parity on real models: ggml-coreml vs stock llama.cpp\n"
    );
    let _ = writeln!(
        o,
        "_Generated by `cargo xtask parity` (this file is overwritten by every run; do not edit by hand). The numbers \
         come from the run's `results.json`; each cell names the command that regenerates it._\n"
    );
    if let Some(m) = &s.machine {
        let _ = writeln!(
            o,
            "Last run: {} on {} ({} cores, {}), load average at start {}; host {}; executor: reference (Linux) — the programs the ANE would run, with ANE-like numerics.\n",
            m.date, m.cpu, m.nproc, m.os, m.load, m.host
        );
    }

    // Verdict per variant.
    let _ = writeln!(o, "## Verdict\n");
    let mut per_variant: BTreeMap<(Face, &str), (usize, usize, usize)> = BTreeMap::new();
    for c in &cells {
        if let Some(v) = verdict(c) {
            let e = per_variant.entry((c.face, c.variant.as_str())).or_default();
            e.0 += v.pass() as usize;
            e.1 += 1;
            e.2 += (c.variant == default_variant(&c.quant)) as usize;
        }
    }
    let _ = writeln!(
        o,
        "| face | variant | cells within tolerance | default for |"
    );
    let _ = writeln!(o, "|---|---|---|---|");
    for f in [Face::Accel, Face::Hybrid] {
        for v in ["i8i8", "i8i8r", "i8i8o", "w8f16", "f16", "exact"] {
            if let Some((p, n, d)) = per_variant.get(&(f, v)) {
                let def = match (v, *d > 0) {
                    ("i8i8r", _) => "quantised weights on int8 chips (A17 Pro, M4 and later)",
                    ("w8f16", true) => "quantised weights on other chips",
                    ("f16", true) => "F16 weights (today's default)",
                    _ => "—",
                };
                let _ = writeln!(
                    o,
                    "| {} | {v} | {p} / {n}{} | {def} |",
                    face_label(f),
                    if p < n { " ✗" } else { "" }
                );
            }
        }
    }
    let bad_default: Vec<String> = cells
        .iter()
        .filter(|c| c.variant == default_variant(&c.quant) && verdict(c).is_some_and(|v| !v.pass()))
        .map(|c| {
            format!(
                "{} {} {} ({} face)",
                c.model,
                c.quant,
                c.variant,
                c.face.name()
            )
        })
        .collect();
    let defaults = cells
        .iter()
        .filter(|c| c.variant == default_variant(&c.quant))
        .count();
    if bad_default.is_empty() && defaults > 0 {
        let _ = writeln!(
            o,
            "\nEvery default-variant cell ({defaults}, both faces: {} for quantised weights, {} for F16 weights) is within the tolerance.",
            default_variant("Q8_0"),
            default_variant("F16")
        );
    }
    if !bad_default.is_empty() {
        let _ = writeln!(
            o,
            "\n**The current default variant fails the bar in {} cell(s): {}.** A variant that fails must not be the \
             default; see the table below for the variants that pass.\n",
            bad_default.len(),
            bad_default.join("; ")
        );
    }

    let _ = writeln!(o, "\n## Method\n");
    let _ = writeln!(
        o,
        "- Host: llama.cpp from PyPI `llama-cpp-python` 0.3.36 (`cargo xtask host`), CPU backend, 2 threads, `-ngl 0`. \
         \"Stock\" runs have no `GGML_BACKEND_PATH`; \"ours\" load `libggml-coreml` with `GGML_COREML_POLICY=always` \
         (every MUL_MAT the backend supports goes through a program) and `GGML_COREML_VARIANT=<variant>`, through \
         {} or, in the section *Hybrid face*, through {}.\n\
         - MUL_MATs offloaded: the library's statistics (`GGML_COREML_STATS_FILE`) of our perplexity run; a run in which \
         the executor ran none is an error, not a cell.\n\
         - Models: `cargo xtask models --full` (docs/models.md). gemma-3-270m's F16 and other types are requantised \
         from its published Q4_K_M, smollm2-135m's from its Q4_1 (so \"F16\" there is an up-cast of a quantised model); \
         qwen3-tiny(-moe) have random F16 weights (their perplexity is meaningless, the KLD comparison is not).\n\
         - Text: `tests/data/parity-text.txt` (public domain, see tests/data/README.md). `llama-perplexity -c {CTX} \
         --chunks N` scores the second half of each chunk ({} positions per chunk).\n\
         - End to end: stock `llama-perplexity --kl-divergence-base` saves the stock logits of that model × quant; \
         ours runs `--kl-divergence` against them: PPL(ours)/PPL(stock), mean KLD(stock ‖ ours), same top-1 token %. \
         The tool's ± are its own uncertainties (paired for the PPL ratio).\n\
         - Per layer: with `GGML_COREML_PARITY=<file>` the backend also computes every offloaded MUL_MAT on the CPU \
         backend and records NMSE(ours, CPU) per weight on the real activations of the same run; aggregated per tensor \
         kind (call-weighted mean / max). The CPU itself quantises activations to Q8 for quantised weights, so the \
         `exact` variant (f32 on the host) shows that floor.\n\
         - Greedy: `llama-completion --temp 0 -n {N_PREDICT}` on the prompts of `tests/data/parity-prompts.txt`, stock vs \
         ours; identical leading words.",
        Face::Accel.describe(),
        Face::Hybrid.describe(),
        CTX / 2 - 1
    );

    let _ = writeln!(o, "\n## Tolerance, and why\n");
    let _ = writeln!(
        o,
        "Offloading must change the model's outputs **less than Q8_0 quantisation itself does**: Q8_0 is the format \
         people treat as lossless, so an error below it is below what users already accept. The reference is measured per \
         model with the same tool and text: stock Q8_0 against stock F16 (**the bar**).\n\n\
         Stock is not exact arithmetic: ggml-cpu quantises the activations of quantised weights to Q8_0 (per 32) or Q8_K \
         (per 256, K-quants) before its dot products. So each model × quant also gets **the floor**: the backend with \
         `GGML_COREML_VARIANT=exact` (f32 on the host from ggml's exact dequantisation, f32 activations) against stock. \
         No offload can be closer to stock than exact arithmetic is; for small independent errors the expected KLD adds \
         (KLD ≈ ½ δᵀFδ), so our own error is what we measure minus the floor, and the floor is added to the bar. A cell \
         passes when all hold:\n\n\
         1. **KLD**: KLD(stock ‖ ours) < KLD(F16 ‖ Q8_0) + KLD(stock ‖ exact).\n\
         2. **Perplexity**: |ln(PPL(ours)/PPL(stock))| ≤ |ln(PPL(Q8_0)/PPL(F16))| + |ln(PPL(exact)/PPL(stock))| + 2σ, σ the \
         uncertainty llama-perplexity reports for our (paired) ratio: a change no larger than Q8_0's own, up to \
         measurement noise (Q8_0's change can be near zero by chance; the 2σ keeps a noise-level difference from failing).\n\
         3. **Token agreement**: top-1 disagreement with stock (100 − same-top-1 %) ≤ Q8_0's disagreement with F16 + \
         exact's disagreement with stock + 2σ (σ the binomial uncertainty the tool reports).\n\n\
         Where exact arithmetic itself is within the plain bar (most Q8_0/Q4_0 cells), the floor changes little; it \
         matters for the K-quants, where Q8_K activations make stock drift from exact by more than Q8_0 weights do.\n\n\
         Greedy continuations are reported next to the same numbers for Q8_0 vs F16 but are not part of the verdict: \
         with {} short prompts one early near-tie flips a whole continuation, while same-top-1 over hundreds of \
         positions measures the same agreement with statistics. Per-layer NMSE is diagnostic (where an error comes \
         from); test-backend-ops' bar ({OPS_NMSE:.0e}) is shown for scale.",
        s.references
            .values()
            .map(|r| r.greedy.len())
            .max()
            .unwrap_or(0)
    );

    let _ = writeln!(o, "\n## The bar: stock Q8_0 vs stock F16, per model\n");
    let _ = writeln!(
        o,
        "| model | PPL F16 | PPL Q8_0 | ln(PPL ratio) | KLD (the bar) | same top-1 | greedy identical words | chunks | measured |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for m in Model::ALL {
        if let Some(r) = s.references.get(m.name()) {
            let _ = writeln!(
                o,
                "| {} | {:.3} | {:.3} | {:+.4} ± {:.4} | {} ± {} | {:.1} ± {:.1} % | {} | {} | {} |",
                r.model,
                r.ppl_f16,
                r.stats.ppl,
                r.stats.ln_ratio,
                r.stats.ln_ratio_unc,
                kfmt(r.stats.kld),
                kfmt(r.stats.kld_unc),
                r.stats.same_top,
                r.stats.same_top_unc,
                greedy_summary(&r.greedy),
                r.chunks,
                r.measured
            );
        }
    }

    let accel: Vec<&Cell> = cells
        .iter()
        .copied()
        .filter(|c| c.face == Face::Accel)
        .collect();
    let hybrid: Vec<&Cell> = cells
        .iter()
        .copied()
        .filter(|c| c.face == Face::Hybrid)
        .collect();
    if !accel.is_empty() {
        let _ = writeln!(
            o,
            "\n## End to end: model × quant × variant (ACCEL face `CoreML`, `-ngl 0`)\n"
        );
        let _ = writeln!(
            o,
            "Default variant in **bold**. ✓ = within the tolerance, ✗ = outside (the failing criteria named).\n"
        );
        e2e_table(&mut o, s, &accel);
        let _ = writeln!(
            o,
            "\n## Per layer: NMSE of offloaded MUL_MATs vs the CPU backend (mean / max per tensor kind)\n"
        );
        let _ = writeln!(
            o,
            "Measured in the same runs as the table above (`GGML_COREML_PARITY`). n/a: the kind was not offloaded (e.g. MoE experts are MUL_MAT_ID, which stays on the host) or the library did not write the file.\n"
        );
        layer_table(&mut o, s, &accel);
    }

    if !hybrid.is_empty() {
        let _ = writeln!(o, "\n## Hybrid face (`{}`)\n", face::HYBRID_DEVICE);
        let _ = writeln!(
            o,
            "The same measurement with our side going through {} instead of the ACCEL face, policy `always`: \
             llama.cpp gives every layer to the hybrid device and its router sends each MUL_MAT \
             over model weights to the executor and the rest of the graph (attention, KV-cache matmuls, norms) to the \
             inner CPU backend. Default variant in **bold**. The stock side, the bar (stock Q8_0 vs stock F16) and the tolerance are the ones above; \
             the floor (`exact`) is measured through the hybrid face as well. \"MUL_MATs offloaded\" is the library's own \
             count for our perplexity run: it shows the matmuls really went through the executor. Weights of types the \
             library does not take stay on the inner backend, as with the ACCEL face (gemma-3-270m's published Q4_K_M has \
             attn_q, attn_k, ffn_gate, ffn_up and half of attn_v in Q5_0: n/a in the per-layer table, and fewer MUL_MATs \
             offloaded).\n",
            Face::Hybrid.describe()
        );
        e2e_table(&mut o, s, &hybrid);
        let paired: Vec<(&Cell, &Cell)> = hybrid
            .iter()
            .filter_map(|h| {
                let a = accel.iter().find(|a| {
                    (&a.model, &a.quant, &a.variant) == (&h.model, &h.quant, &h.variant)
                })?;
                Some((*a, *h))
            })
            .collect();
        if !paired.is_empty() {
            let same = paired
                .iter()
                .filter(|(a, h)| {
                    (a.stats.ppl, a.stats.kld, a.stats.ln_ratio, a.stats.same_top)
                        == (h.stats.ppl, h.stats.kld, h.stats.ln_ratio, h.stats.same_top)
                })
                .count();
            let _ = writeln!(
                o,
                "\n{same} of the {} hybrid cells that have an ACCEL cell of the same model × quant × variant report the \
                 same perplexity, KLD, PPL ratio and top-1 agreement as it, to the tool's printed precision (both faces \
                 run the same programs on the same activations, and the rest of the graph on the CPU backend).",
                paired.len()
            );
        }
        let _ = writeln!(
            o,
            "\nPer layer (hybrid face, same runs; the host of the comparison is the inner CPU backend):\n"
        );
        layer_table(&mut o, s, &hybrid);
    }

    let _ = writeln!(o, "\n## Greedy continuations\n");
    for m in Model::ALL {
        let Some(r) = s.references.get(m.name()) else {
            continue;
        };
        let _ = writeln!(o, "<details><summary>{}</summary>\n", m.name());
        for (i, g) in r.greedy.iter().enumerate() {
            let _ = writeln!(
                o,
                "- prompt {i} `{}`\n  - F16: {}\n  - Q8_0: {} ({} / {} words identical)",
                g.prompt,
                one_line(&g.stock),
                one_line(&g.ours),
                g.same_words,
                g.words
            );
        }
        for c in cells.iter().filter(|c| c.model == m.name()) {
            for (i, g) in c.greedy.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "- {} {}{} prompt {i}: stock: {} — ours: {} ({} / {})",
                    c.quant,
                    c.variant,
                    match c.face {
                        Face::Accel => "",
                        Face::Hybrid => " (hybrid face)",
                    },
                    one_line(&g.stock),
                    one_line(&g.ours),
                    g.same_words,
                    g.words
                );
            }
        }
        let _ = writeln!(o, "\n</details>\n");
    }

    if !s.errors.is_empty() {
        let _ = writeln!(o, "## Runs that failed\n");
        for (k, e) in &s.errors {
            let _ = writeln!(o, "- {k}: {}", one_line(e));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "## Regenerate\n");
    let _ = writeln!(
        o,
        "- Everything: `cargo xtask parity` (all models × Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K, F16 × i8i8, w8f16, f16; \
         {CHUNKS} chunks, the prompts of tests/data/parity-prompts.txt; about 1 h on 2 cores (57 min measured), longer when \
         the cores are shared; dominated by the greedy runs through the reference executor).\n\
         - One cell: the command in its row. Cells are kept in `$GGML_COREML_DEV_CACHE/parity/store.json` and this file \
         is rebuilt from all of them after every run (`--fresh` starts over).\n\
         - Hybrid face: `cargo xtask parity --face hybrid --models gemma-3-270m,qwen3-tiny --quants Q8_0,Q4_K_M \
         --variants w8f16` (the cells of the section *Hybrid face*; any model, quant or variant works the same).\n\
         - CI: `cargo xtask parity --quick` (gemma-3-270m Q8_0, the library's default variant, {QUICK_CHUNKS} chunks, no \
         greedy); the `cargo xtask test` stage calls the same check and fails outside the tolerance. The `hybrid` stage \
         runs `cargo xtask parity --quick --face hybrid --models qwen3-tiny`."
    );
    o
}

/// A cell against its model's reference (None: no reference stored).
fn cell_verdict(s: &Store, c: &Cell) -> Option<Verdict> {
    s.references
        .get(&c.model)
        .map(|r| judge(&c.stats, &r.stats, c.floor.as_ref()))
}

/// How the reports name a face.
fn face_label(f: Face) -> String {
    match f {
        Face::Accel => "ACCEL (`CoreML`)".into(),
        Face::Hybrid => format!("hybrid (`{}`)", face::HYBRID_DEVICE),
    }
}

/// One row per cell: end-to-end numbers, the verdict and the command that regenerates it.
fn e2e_table(o: &mut String, s: &Store, cells: &[&Cell]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "| model | quant | variant | PPL stock | PPL ours | ln(PPL ratio) | KLD | floor (exact) | bar + floor | same top-1 | greedy identical words | MUL_MATs offloaded | verdict | regenerate |"
    );
    let _ = writeln!(
        o,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in cells {
        let r = s.references.get(&c.model);
        let v = cell_verdict(s, c);
        let vtxt = match &v {
            Some(v) if v.pass() => "✓".to_string(),
            Some(v) => format!(
                "✗ {}",
                [
                    (!v.kld_ok).then_some("KLD"),
                    (!v.ppl_ok).then_some("PPL"),
                    (!v.top_ok).then_some("top-1")
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
            ),
            None => "no reference".into(),
        };
        let vname = if c.variant == default_variant(&c.quant) {
            format!("**{}**", c.variant)
        } else {
            c.variant.clone()
        };
        let _ = writeln!(
            o,
            "| {} | {} | {vname} | {:.3} | {:.3} | {:+.4} ± {:.4} | {} | {} | {} | {:.1} % | {} | {} | {vtxt} | `{}` |",
            c.model,
            c.quant,
            c.ppl_stock,
            c.stats.ppl,
            c.stats.ln_ratio,
            c.stats.ln_ratio_unc,
            kfmt(c.stats.kld),
            c.floor.as_ref().map_or("n/a".to_string(), |f| kfmt(f.kld)),
            r.map_or("n/a".to_string(), |r| kfmt(kld_bar(
                &r.stats,
                c.floor.as_ref()
            ))),
            c.stats.same_top,
            greedy_summary(&c.greedy),
            c.offloaded_ops.map_or("n/a".to_string(), |n| n.to_string()),
            c.command
        );
    }
}

/// Per-layer NMSE: each model × quant's floor row, then its variants.
fn layer_table(o: &mut String, s: &Store, cells: &[&Cell]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "| model | quant | variant | tensors | {} | other |",
        KINDS.join(" | ")
    );
    let _ = writeln!(o, "|---|---|---|---|{}---|", "---|".repeat(KINDS.len()));
    // Each model × quant: its floor (exact vs CPU: the CPU's own activation quantisation), then the variants.
    let mut layer_rows: Vec<(String, String, String, usize, &Vec<KindNmse>)> = Vec::new();
    for c in cells {
        let key = store_key(c.face, &[&c.model, &c.quant]);
        if !layer_rows.iter().any(|r| r.0 == c.model && r.1 == c.quant)
            && let Some(f) = s.floors.get(&key)
        {
            layer_rows.push((
                c.model.clone(),
                c.quant.clone(),
                "exact (floor)".into(),
                f.tensors,
                &f.layers,
            ));
        }
        layer_rows.push((
            c.model.clone(),
            c.quant.clone(),
            c.variant.clone(),
            c.offloaded_tensors,
            &c.layers,
        ));
    }
    for (model, quant, variant, tensors, layers) in &layer_rows {
        let get = |k: &str| {
            layers
                .iter()
                .find(|x| x.kind == k)
                .map_or("n/a".to_string(), |x| {
                    format!("{} / {}", e(x.nmse_mean), e(x.nmse_max))
                })
        };
        let other: Vec<String> = layers
            .iter()
            .filter(|x| !KINDS.contains(&x.kind.as_str()))
            .map(|x| format!("{} {} / {}", x.kind, e(x.nmse_mean), e(x.nmse_max)))
            .collect();
        let _ = writeln!(
            o,
            "| {model} | {quant} | {variant} | {tensors} | {} | {} |",
            KINDS.iter().map(|k| get(k)).collect::<Vec<_>>().join(" | "),
            if other.is_empty() {
                "—".to_string()
            } else {
                other.join("; ")
            }
        );
    }
}

/// A KLD with 3 significant digits (the random-weight models sit at 1e-5).
fn kfmt(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

fn greedy_summary(g: &[Greedy]) -> String {
    if g.is_empty() {
        return "n/a".into();
    }
    let same: usize = g.iter().map(|x| x.same_words).sum();
    let words: usize = g.iter().map(|x| x.words).sum();
    let full = g
        .iter()
        .filter(|x| x.same_words == x.words && x.words > 0)
        .count();
    format!("{same}/{words} ({full}/{} whole)", g.len())
}

fn one_line(s: &str) -> String {
    let s: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KLD_LOG: &str = "\
====== Perplexity statistics ======
Mean PPL(Q)                   :   3.043359 ±   0.290913
Mean PPL(base)                :   2.550945 ±   0.229721
Cor(ln(PPL(Q)), ln(PPL(base))):  92.49%
Mean ln(PPL(Q)/PPL(base))     :   0.176498 ±   0.036370
Mean PPL(Q)/PPL(base)         :   1.193032 ±   0.043391

====== KL divergence statistics ======
Mean    KLD:   0.216268 ±   0.020252
Maximum KLD:   2.309284
99.0%   KLD:   1.627544
Median  KLD:   0.088174
RMS Δp    : 43.817 ± 1.984 %
Same top p: 83.730 ± 2.330 %
";

    #[test]
    fn parses_kld_block() {
        let s = parse_kld(KLD_LOG).expect("parsed");
        assert_eq!(s.ppl, 3.043359);
        assert_eq!(s.ppl_base, 2.550945);
        assert_eq!((s.ln_ratio, s.ln_ratio_unc), (0.176498, 0.036370));
        assert_eq!((s.kld, s.kld_unc), (0.216268, 0.020252));
        assert_eq!(s.kld_p99, Some(1.627544));
        assert_eq!(s.kld_max, Some(2.309284));
        assert_eq!((s.same_top, s.same_top_unc), (83.730, 2.330));
        assert!(parse_kld("no statistics here").is_none());
    }

    #[test]
    fn nan_survives_the_store() {
        let k = KldStats {
            ln_ratio_unc: f64::NAN,
            kld: 0.5,
            ..Default::default()
        };
        let text = serde_json::to_string(&k).expect("serialised");
        assert!(text.contains("null"));
        let back: KldStats = serde_json::from_str(&text).expect("null reads back");
        assert!(back.ln_ratio_unc.is_nan() && back.kld == 0.5);
    }

    #[test]
    fn stores_without_faces_read_as_accel() {
        let cell = Cell {
            model: "gemma-3-270m".into(),
            quant: "Q8_0".into(),
            variant: "w8f16".into(),
            face: Face::Hybrid,
            offloaded_ops: Some(12),
            variant_used: None,
            ppl_stock: 10.0,
            stats: KldStats::default(),
            floor: None,
            layers: Vec::new(),
            offloaded_tensors: 0,
            greedy: Vec::new(),
            chunks: 8,
            seconds: 1.0,
            measured: "now".into(),
            command: "cargo xtask parity".into(),
        };
        let mut v = serde_json::to_value(&cell).expect("serialised");
        assert_eq!(v["face"], "hybrid");
        let back: Cell = serde_json::from_value(v.clone()).expect("reads back");
        assert_eq!((back.face, back.offloaded_ops), (Face::Hybrid, Some(12)));
        // A cell written before faces existed: no `face`, no `offloaded_ops`.
        let obj = v.as_object_mut().expect("object");
        obj.remove("face");
        obj.remove("offloaded_ops");
        let old: Cell = serde_json::from_value(v).expect("old cell reads");
        assert_eq!((old.face, old.offloaded_ops), (Face::Accel, None));
        assert_eq!(
            store_key(Face::Accel, &["gemma-3-270m", "Q8_0", "w8f16"]),
            "gemma-3-270m/Q8_0/w8f16"
        );
        assert_eq!(
            store_key(Face::Hybrid, &["gemma-3-270m", "Q8_0"]),
            "hybrid/gemma-3-270m/Q8_0"
        );
        // The rendered report keeps the faces apart.
        let mut store = Store::default();
        store.cells.insert(
            store_key(Face::Hybrid, &[&cell.model, &cell.quant, &cell.variant]),
            cell,
        );
        // A store rewritten by an xtask from before faces lost the field; the key restores it.
        let mut text = serde_json::to_value(&store).expect("serialised");
        for c in text["cells"].as_object_mut().expect("cells").values_mut() {
            c.as_object_mut().expect("cell").remove("face");
        }
        let back = parse_store(&serde_json::to_vec(&text).expect("bytes")).expect("parsed");
        assert!(back.cells.values().all(|c| c.face == Face::Hybrid));
        let md = render(&store);
        assert!(md.contains("## Hybrid face (`CoreML-CPU`)"));
        assert!(md.contains("--face hybrid"));
    }

    #[test]
    fn parses_final_ppl() {
        let log = "[1]1.7420,[2]2.5472,\n0.24.866 I Final estimate: PPL = 2.5509 +/- 0.22972\n";
        assert_eq!(parse_final_ppl(log), Some(2.5509));
        assert_eq!(parse_final_ppl("nothing"), None);
    }

    #[test]
    fn judges_against_reference() {
        let reference = KldStats {
            kld: 0.020,
            ln_ratio: 0.035,
            same_top: 94.4,
            ..Default::default()
        };
        let good = KldStats {
            kld: 0.013,
            ln_ratio: -0.0255,
            ln_ratio_unc: 0.009,
            same_top: 95.6,
            same_top_unc: 1.3,
            ..Default::default()
        };
        assert!(judge(&good, &reference, None).pass());
        let bad = KldStats {
            kld: 0.216,
            ln_ratio: 0.176,
            ln_ratio_unc: 0.036,
            same_top: 83.7,
            same_top_unc: 2.3,
            ..Default::default()
        };
        let v = judge(&bad, &reference, None);
        assert!(!v.kld_ok && !v.ppl_ok && !v.top_ok);
        // Noise-level PPL change passes even when Q8_0's own change is ~0.
        let flat = KldStats {
            kld: 0.02,
            ln_ratio: 0.0,
            same_top: 90.0,
            ..Default::default()
        };
        let noisy = KldStats {
            kld: 0.01,
            ln_ratio: 0.01,
            ln_ratio_unc: 0.006,
            same_top: 90.0,
            same_top_unc: 1.0,
            ..Default::default()
        };
        assert!(judge(&noisy, &flat, None).pass());
        // The exact floor widens the bar: stock's own activation quantisation is not our error.
        let at_floor = KldStats {
            kld: 0.032,
            ln_ratio: -0.01,
            ln_ratio_unc: 0.012,
            same_top: 92.5,
            same_top_unc: 1.2,
            ..Default::default()
        };
        let floor = KldStats {
            kld: 0.0322,
            ln_ratio: -0.0125,
            same_top: 92.5,
            ..Default::default()
        };
        assert!(!judge(&at_floor, &reference, None).kld_ok);
        assert!(judge(&at_floor, &reference, Some(&floor)).pass());
        assert!((kld_bar(&reference, Some(&floor)) - 0.0522).abs() < 1e-12);
        // i8i8-like errors stay outside even with the floor.
        assert!(!judge(&bad, &reference, Some(&floor)).pass());
    }

    #[test]
    fn parity_file_and_kinds() {
        let text = r#"{"executor":"reference","nodes":[
            {"name":"blk.0.attn_q","m":512,"k":640,"n":1024,"type":"Q8_0","variant":"i8i8","calls":2,"nmse_mean":1e-4,"nmse_max":2e-4},
            {"name":"blk.1.attn_q","m":512,"k":640,"n":1024,"type":"Q8_0","variant":"i8i8","calls":2,"nmse_mean":3e-4,"nmse_max":5e-4},
            {"name":"output","m":1,"k":640,"n":1000,"type":"Q8_0","variant":"i8i8","calls":1,"nmse_mean":NaN,"nmse_max":inf}]}"#;
        let nodes = parse_parity(text).expect("parsed");
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].variant.as_deref(), Some("i8i8"));
        let kinds = aggregate(&nodes);
        let q = kinds.iter().find(|k| k.kind == "attn_q").expect("attn_q");
        assert_eq!((q.tensors, q.calls), (2, 4));
        assert!((q.nmse_mean - 2e-4).abs() < 1e-12 && q.nmse_max == 5e-4);
        assert!(kinds.iter().any(|k| k.kind == "output"));
        assert!(parse_parity("{not json").is_err());
    }

    #[test]
    fn kinds_and_words() {
        assert_eq!(tensor_kind("blk.12.ffn_up"), "ffn_up");
        assert_eq!(tensor_kind("blk.3.ffn_gate_exps.weight"), "ffn_gate_exps");
        assert_eq!(tensor_kind("output"), "output");
        assert_eq!(tensor_kind("token_embd"), "output");
        assert_eq!(same_prefix_words("a b c d", "a b x d"), (2, 4));
        assert_eq!(same_prefix_words("", "a"), (0, 0));
        assert_eq!(default_variant("F16"), "f16");
        assert_eq!(default_variant("Q4_K_M"), "w8f16");
        assert!(!applies("w8f16", "F16") && applies("w8f16", "Q8_0"));
    }
}
