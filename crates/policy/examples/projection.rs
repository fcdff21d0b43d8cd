//! Prints the projected prefill speed-ups (a projection from public figures, not a measurement) and the
//! break-even M per chip, as markdown tables for docs/policy.md.
//!
//! `cargo run -p ggml-coreml-policy --example projection [-- TOKENS]` (default 4096);
//! `-- --chips` prints the chip table instead.

use ggml_coreml_policy::cost::CHIPS;
use ggml_coreml_policy::{
    ChipGen, DeviceFacts, MatmulShape, Mode, ModelDims, Policy, Settings, Variant, project_speedup,
};

fn main() {
    let tokens = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4096usize);
    let chips = [
        ChipGen::M3,
        ChipGen::M4,
        ChipGen::M4Pro,
        ChipGen::M4Max,
        ChipGen::M5,
        ChipGen::A17Pro,
        ChipGen::A18,
    ];
    if std::env::args().any(|a| a == "--chips") {
        println!(
            "| chip | ANE fp16 TFLOPS | int8 x | ANE GB/s | SoC GB/s | GPU cores | host TFLOPS (pp512) | targeted | sources |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for c in CHIPS {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.chip,
                c.ane_fp16_tflops,
                c.int8_speedup,
                c.ane_gbps,
                c.soc_gbps,
                c.gpu_cores,
                c.host_tflops,
                if c.chip.supported() { "yes" } else { "no" },
                c.sources
            );
        }
        return;
    }
    let models = [
        ModelDims::LLAMA3_8B,
        ModelDims::QWEN3_4B,
        ModelDims::QWEN3_0_6B,
    ];
    println!("pp{tokens}, ubatch 512, i8i8, latency routing (projection from public figures)\n");
    println!(
        "| model | chip | host matmul s | ANE-path matmul s | matmul speed-up | offloaded | whole prefill speed-up |"
    );
    println!("|---|---|---|---|---|---|---|");
    for md in models {
        let dims = md.matmuls();
        for chip in chips {
            let p = project_speedup(chip, &dims, tokens);
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2}x | {}/{} | {:.2}x |",
                md.name,
                chip,
                p.host_ms / 1e3,
                p.ane_ms / 1e3,
                p.speedup,
                p.offloaded,
                p.total,
                p.end_to_end
            );
        }
    }
    println!(
        "\nbreak-even M (smallest bucket where the ANE path is predicted faster), i8i8 / f16\n"
    );
    let shapes = [
        (4096, 4096),
        (4096, 1024),
        (4096, 14336),
        (14336, 4096),
        (1024, 3072),
        (2560, 9728),
    ];
    print!("| chip |");
    for (k, n) in shapes {
        print!(" {k}x{n} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(shapes.len()));
    for chip in chips {
        let p = Policy::with_settings(
            &Settings {
                mode: Mode::Latency,
                ..Settings::default()
            },
            DeviceFacts::for_chip(chip),
        );
        print!("| {chip} |");
        for (k, n) in shapes {
            let f = |v| {
                p.break_even_m(k, n, v)
                    .map_or("-".to_string(), |m| m.to_string())
            };
            print!(" {} / {} |", f(Variant::I8I8), f(Variant::F16));
        }
        println!();
    }
    println!("\nexplain, M4, m=512 k=4096 n=14336:");
    let p = Policy::with_settings(&Settings::default(), DeviceFacts::for_chip(ChipGen::M4));
    println!(
        "{}",
        p.explain(&MatmulShape {
            m: 512,
            k: 4096,
            n: 14336
        })
    );
}
