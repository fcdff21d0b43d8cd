//! Predicted ANE-path time per candidate variant and tensor kind (a projection from public figures
//! through the cost model, not a measurement), for the frontier tables of docs/parity.md and
//! docs/quantization.md, and the w8f16-vs-new-default projection of docs/benchmarks.md.
//!
//! `cargo run -p ggml-coreml-policy --example frontier [-- TOKENS]` (default 512 for the per-kind
//! table; the projection always uses pp4096).
//!
//! Candidates: `w8f16` (fp16 rate), `i8i8` (int8 rate where the chip has it), `i8i8r` (i8i8 plus the
//! host's activation rotation), `i8i8o` (outlier split: int8 rate over all K, the c outlier channels'
//! product at the fp16 rate, host selection and gather; c = `cost::outlier_channels(K)`).
//! The projection compares w8f16 with the int8-chip default (`i8i8o` for every kind, as the routing
//! table of `driver::INT8_CHIP_ROUTES` picks for the kinds of these models) and with i8i8r.

use ggml_coreml_policy::cost::CostModel;
use ggml_coreml_policy::{ChipGen, ModelDims, Variant};

/// Gemma-3-270M's weight matmuls per layer as (kind, K, N), and its tied output head.
const GEMMA_270M: &[(&str, usize, usize)] = &[
    ("attn_q", 640, 1024),
    ("attn_k", 640, 256),
    ("attn_v", 640, 256),
    ("attn_output", 1024, 640),
    ("ffn_gate", 640, 2048),
    ("ffn_up", 640, 2048),
    ("ffn_down", 2048, 640),
];
const GEMMA_LAYERS: usize = 18;
const GEMMA_HEAD: (usize, usize) = (640, 262144);

fn ms(c: &CostModel, cand: &str, m: usize, k: usize, n: usize) -> f64 {
    match cand {
        "w8f16" => c.ane(m, k, n, Variant::W8F16).total_ms,
        "i8i8" => c.ane(m, k, n, Variant::I8I8).total_ms,
        "i8i8r" => c.ane_rotated(m, k, n).total_ms,
        "i8i8o" => c.ane(m, k, n, Variant::I8I8O).total_ms,
        _ => unreachable!(),
    }
}

fn main() {
    let tokens = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512usize);
    let chips = [ChipGen::M3, ChipGen::M4, ChipGen::A17Pro];
    let cands = ["w8f16", "i8i8", "i8i8r", "i8i8o"];

    println!(
        "Gemma-3-270M, one ubatch of {tokens} tokens, ANE-path ms per kind (all layers; head = tied output for every token, as llama-perplexity computes it)\n"
    );
    print!("| kind | K × N | GFLOP |");
    for chip in chips {
        for cand in cands {
            print!(" {chip} {cand} |");
        }
    }
    println!();
    println!("|---|---|---|{}", "---|".repeat(chips.len() * cands.len()));
    let mut kinds: Vec<(&str, usize, usize, usize)> = GEMMA_270M
        .iter()
        .map(|&(n, k, nn)| (n, k, nn, GEMMA_LAYERS))
        .collect();
    kinds.push(("output", GEMMA_HEAD.0, GEMMA_HEAD.1, 1));
    let mut totals = vec![0.0; chips.len() * cands.len()];
    for (name, k, n, reps) in &kinds {
        let gflop = 2.0 * (tokens * k * n * reps) as f64 / 1e9;
        print!("| {name} | {k} × {n} | {gflop:.1} |");
        let mut i = 0;
        for chip in chips {
            let c = CostModel::for_chip(chip);
            for cand in cands {
                let t = ms(&c, cand, tokens, *k, *n) * *reps as f64;
                totals[i] += t;
                i += 1;
                print!(" {t:.2} |");
            }
        }
        println!();
    }
    print!("| **all** | | |");
    for t in &totals {
        print!(" **{t:.2}** |");
    }
    println!("\n");

    // Projection: pp4096 in ubatches of 512, per shape the faster of host and ANE path (latency
    // routing), w8f16 against i8i8r, for the reference models.
    let models = [
        ModelDims::LLAMA3_8B,
        ModelDims::QWEN3_4B,
        ModelDims::QWEN3_0_6B,
    ];
    println!(
        "pp4096, ubatch 512, per shape the faster of Metal and the ANE path; weight-matmul speed-up over Metal, w8f16 / i8i8r / i8i8o\n"
    );
    print!("| model |");
    for chip in chips {
        print!(" {chip} w8f16 | {chip} i8i8r | {chip} i8i8o |");
    }
    println!();
    println!("|---|{}", "---|".repeat(chips.len() * 3));
    for md in models {
        print!("| {} |", md.name);
        for chip in chips {
            let c = CostModel::for_chip(chip);
            let (mut host, mut a, mut b, mut o) = (0.0, 0.0, 0.0, 0.0);
            for _ in 0..(4096 / 512) {
                for (k, n) in md.matmuls() {
                    let h = c.host(512, k, n, Variant::W8F16).total_ms;
                    host += h;
                    a += h.min(c.ane(512, k, n, Variant::W8F16).total_ms);
                    b += h.min(c.ane_rotated(512, k, n).total_ms);
                    o += h.min(c.ane(512, k, n, Variant::I8I8O).total_ms);
                }
            }
            print!(" {:.2}x | {:.2}x | {:.2}x |", host / a, host / b, host / o);
        }
        println!();
    }
}
