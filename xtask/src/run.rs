//! `cargo xtask run`: the main job. Builds everything needed (host, models, backend — cached), runs a
//! real model through llama.cpp twice (stock, then with ggml-coreml loaded), and prints a short report:
//! where the MUL_MATs went, the text, and the speed of each run.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::models::{Model, model_path};
use crate::test::Env;
use crate::{log, parity};

struct Args {
    model: String,
    quant: String,
    policy: String,
    prompt: String,
    n: usize,
    /// `GGML_COREML_CHIP` for our runs (the chip profile whose routing applies, e.g. M4).
    chip: Option<String>,
    /// Skip the llama-perplexity agreement runs.
    no_agree: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        model: "gemma-3-270m".into(),
        quant: "Q8_0".into(),
        policy: "always".into(),
        prompt: "The Neural Engine in Apple silicon is".into(),
        n: 16,
        chip: None,
        no_agree: false,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{k} needs a value"))
        };
        match k.as_str() {
            "--model" | "-m" => a.model = val()?,
            "--quant" | "-q" => a.quant = val()?,
            "--policy" => a.policy = val()?,
            "--prompt" | "-p" => a.prompt = val()?,
            "-n" => a.n = val()?.parse().context("-n takes a number")?,
            "--chip" => a.chip = Some(val()?),
            "--no-agree" => a.no_agree = true,
            "-h" | "--help" => {
                println!(
                    "cargo xtask run [--model gemma-3-270m|smollm2-135m|qwen3-tiny|<path.gguf>] [--quant Q8_0]\n\
                     \x20                [--policy always|latency|energy|off] [--prompt TEXT] [-n TOKENS]\n\
                     \x20                [--chip M3|M4|A17Pro|…] [--no-agree]\n\
                     Runs llama-completion stock and with ggml-coreml loaded; reports where MUL_MATs went,\n\
                     which program variants ran, and how far ours is from stock and from the F16 model\n\
                     (llama-perplexity KL divergence, next to stock's own distance from F16).\n\
                     --chip routes as on that chip (GGML_COREML_CHIP; int8 chips: A17Pro, M4, M5)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    Ok(a)
}

/// Output of one llama-completion run.
struct RunOut {
    text: String,
    prompt_tps: Option<f64>,
    eval_tps: Option<f64>,
    summary: Option<String>,
    /// The statistics' `memory` section (ours only).
    memory: Option<crate::face::Memory>,
    /// From `/usr/bin/time` where installed.
    peak_rss_mib: Option<f64>,
    loaded: bool,
}

fn completion(env: &Env, model: &PathBuf, a: &Args, with_backend: bool) -> Result<RunOut> {
    // Peak RSS of both runs when /usr/bin/time is there.
    let tool = env.bin.join("llama-completion");
    let mut c = crate::bench::timed(&tool).unwrap_or_else(|| Command::new(&tool));
    c.arg("-m")
        .arg(model)
        .args([
            "-p",
            &a.prompt,
            "-n",
            &a.n.to_string(),
            "--temp",
            "0",
            "--seed",
            "1",
            "-ngl",
            "0",
            "-no-cnv",
        ])
        .args(["-t", "2", "--no-warmup"])
        .stdin(Stdio::null());
    let stats = std::env::temp_dir().join(format!("ggml-coreml-run-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&stats);
    if with_backend {
        c.env("GGML_BACKEND_PATH", &env.lib)
            .env("GGML_COREML_POLICY", &a.policy)
            .env("GGML_COREML_LOG", "info")
            .env("GGML_COREML_STATS_FILE", &stats);
        if let Some(chip) = &a.chip {
            c.env("GGML_COREML_CHIP", chip);
        }
    }
    let line = crate::util::display_cmd(&c);
    log!(
        "$ {}{line}",
        if with_backend {
            "GGML_BACKEND_PATH=… "
        } else {
            ""
        }
    );
    let out = c.output().with_context(|| format!("cannot start {line}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let tail: Vec<&str> = stderr
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "llama-completion failed ({}):\n{}",
            out.status,
            tail.join("\n")
        );
    }
    let tps = |key: &str| {
        stderr
            .lines()
            .find(|l| {
                l.contains(key)
                    && l.contains("tokens per second")
                    && (key.contains("prompt") || !l.contains("prompt"))
            })
            .and_then(|l| {
                let i = l.find("tokens per second")?;
                let head = &l[..i];
                let num = head.rsplit(',').next()?.split_whitespace().next()?;
                num.parse::<f64>().ok()
            })
    };
    // llama-completion's logger hides ggml's info lines; the statistics file proves the backend ran.
    let stats_json = std::fs::read_to_string(&stats).ok();
    let summary_present = stats_json.is_some();
    let memory = stats_json
        .as_deref()
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| crate::face::Memory::from_stats(&v));
    Ok(RunOut {
        text: stdout.trim().to_string(),
        prompt_tps: tps("prompt eval time"),
        eval_tps: tps("eval time"),
        summary: stats_json.map(|j| {
            let _ = std::fs::remove_file(&stats);
            summarize_stats(&j)
        }),
        memory,
        peak_rss_mib: crate::bench::parse_peak_rss(&stderr),
        loaded: stderr.contains("loaded CoreML backend") || summary_present,
    })
}

pub fn main(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    let env = Env::prepare()?;
    let model = if a.model.ends_with(".gguf") {
        PathBuf::from(&a.model)
    } else {
        let m: Model = a.model.parse()?;
        model_path(&env.models, m, &a.quant)
    };
    if !model.is_file() {
        bail!(
            "{} not found (cargo xtask models --quants {})",
            model.display(),
            a.quant
        );
    }
    let stock = completion(&env, &model, &a, false)?;
    let ours = completion(&env, &model, &a, true)?;
    if !ours.loaded {
        bail!(
            "llama.cpp did not load the backend from {}",
            env.lib.display()
        );
    }
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "n/a".into(),
    };
    let same = common_prefix_words(&stock.text, &ours.text);
    let agree = if a.no_agree || a.policy == "off" {
        None
    } else {
        let f16 = (!a.model.ends_with(".gguf"))
            .then(|| {
                let m: Model = a.model.parse().ok()?;
                let p = model_path(&env.models, m, "F16");
                (p.is_file() && p != model).then_some(p)
            })
            .flatten();
        let mut ours_env = vec![("GGML_COREML_POLICY".to_string(), a.policy.clone())];
        if let Some(chip) = &a.chip {
            ours_env.push(("GGML_COREML_CHIP".into(), chip.clone()));
        }
        log!("agreement: llama-perplexity --kl-divergence, stock / ours / F16");
        match parity::agreement(&env.bin, &env.lib, &model, f16.as_deref(), ours_env) {
            Ok(g) => Some(g),
            Err(e) => {
                log!("agreement runs failed: {e:#}");
                None
            }
        }
    };
    println!("ggml-coreml run report");
    println!("  model    {}", model.display());
    println!("  library  {}", env.lib.display());
    println!(
        "  policy   {}{} (executor: reference on Linux; CoreML on Apple devices)",
        a.policy,
        a.chip
            .as_deref()
            .map(|c| format!(", routed as on {c}"))
            .unwrap_or_default()
    );
    println!(
        "  routing  {}",
        ours.summary.as_deref().unwrap_or("(no statistics written)")
    );
    if let Some(v) = agree.as_ref().and_then(|g| g.stats.as_ref()) {
        println!("  variants {}", variants_line(v));
    }
    if let Some(g) = &agree {
        let q = &a.quant;
        let row = |k: &parity::KldStats| {
            format!(
                "KLD {:.4}, same top-1 {:.1} %, PPL {:.3}",
                k.kld, k.same_top, k.ppl
            )
        };
        println!(
            "  agree    llama-perplexity on tests/data/parity-text.txt, {} chunks of 128 tokens:",
            g.chunks
        );
        println!(
            "           ours against stock {q}: {}",
            row(&g.ours_vs_stock)
        );
        if let (Some(o), Some(s)) = (&g.ours_vs_f16, &g.stock_vs_f16) {
            println!("           ours against F16:        {}", row(o));
            println!(
                "           stock {q} against F16:  {} (stock's own quantisation, for scale)",
                row(s)
            );
            let verdict = if g.ours_vs_stock.kld < s.kld {
                "smaller than"
            } else {
                "larger than"
            };
            println!(
                "           ours is {:.2}x stock's distance from F16; our distance from stock is {verdict} stock's from F16 \
                 (the tolerance: docs/parity.md)",
                if s.kld > 0.0 { o.kld / s.kld } else { f64::NAN }
            );
        }
    }
    println!("  memory   {}", memory_line(&stock, &ours));
    println!("  prompt   {:?}", a.prompt);
    println!("  stock    {}", one_line(&stock.text));
    println!("  coreml   {}", one_line(&ours.text));
    println!(
        "  greedy   {same} leading words identical of {} (greedy text parts for good at the first different \
         token; stock {} and F16 part too: docs/parity.md)",
        stock.text.split_whitespace().count(),
        a.quant
    );
    println!(
        "  speed    prompt {} t/s stock, {} t/s coreml ({}); generation {} t/s stock, {} t/s coreml ({})",
        f(stock.prompt_tps),
        f(ours.prompt_tps),
        ratio(ours.prompt_tps, stock.prompt_tps),
        f(stock.eval_tps),
        f(ours.eval_tps),
        ratio(ours.eval_tps, stock.eval_tps)
    );
    Ok(())
}

/// Which program variants ran: `w8f16 161 ops 59.2 GFLOP, i8i8r 216 ops 314.7 GFLOP (int8 × int8 84.2 % of
/// offloaded FLOPs)`.
fn variants_line(v: &serde_json::Value) -> String {
    let items: Vec<String> = v["variants"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, x)| {
                    format!(
                        "{name}{} {} ops {:.1} GFLOP",
                        if x["int8"].as_bool() == Some(true) {
                            " (int8 × int8)"
                        } else {
                            ""
                        },
                        x["ops"],
                        x["gflop"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        return "(none offloaded)".into();
    }
    format!(
        "{}; int8 × int8 {:.1} % of offloaded FLOPs",
        items.join(", "),
        v["int8_flop_share"].as_f64().unwrap_or(0.0) * 100.0
    )
}

/// One line from the backend's statistics JSON.
fn summarize_stats(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return json.to_string();
    };
    let reasons = v["host_reasons"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "MUL_MAT offloaded to the {} executor: {} ({} ms, {} GFLOP); on the host: {}{}; executor faults {}",
        v["executor"].as_str().unwrap_or("?"),
        v["ane_ops"],
        v["ane_ms"],
        v["ane_gflop"],
        v["host_ops"],
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({reasons})")
        },
        v["faults"]
    )
}

/// Peak RSS of both runs and what the library accounts for (docs/memory.md).
fn memory_line(stock: &RunOut, ours: &RunOut) -> String {
    let mib = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.0} MiB"));
    let mut s = format!(
        "peak RSS stock {}, coreml {}",
        mib(stock.peak_rss_mib),
        mib(ours.peak_rss_mib)
    );
    if let Some(m) = &ours.memory {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.1}"));
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "; accounted: {} MiB prepared, {} MiB borrowed from the mapping ({} MiB of its pages \
                 released), {} MiB of our own buffers (compute, and weight copies without mmap), executor {} MiB ({} weight inputs kept, {} let \
                 go with their weights), {} programs in memory",
                f(m.prepared_mib),
                f(m.raw_borrowed_mib),
                f(m.raw_released_mib),
                f(m.raw_owned_mib),
                f(m.executor_surfaces_mib),
                m.executor_weight_inputs
                    .map_or("n/a".into(), |n| n.to_string()),
                m.executor_weight_inputs_forgotten
                    .map_or("n/a".into(), |n| n.to_string()),
                m.programs_in_memory.map_or("n/a".into(), |n| n.to_string()),
            ),
        );
    }
    s
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}

fn common_prefix_words(a: &str, b: &str) -> usize {
    a.split_whitespace()
        .zip(b.split_whitespace())
        .take_while(|(x, y)| x == y)
        .count()
}
