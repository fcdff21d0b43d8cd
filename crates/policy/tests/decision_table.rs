//! Shape × mode × device class → decision, walked and printed (`-- --nocapture` shows the table).

use ggml_coreml_policy::{ChipGen, DeviceFacts, MatmulShape, Mode, Policy, Settings};

const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("decode", 1, 4096, 4096),
    ("spec-verify", 16, 4096, 4096),
    ("batch", 128, 4096, 4096),
    ("prefill-256", 256, 4096, 4096),
    ("prefill", 512, 4096, 4096),
    ("prefill-ffn", 512, 4096, 14336),
    ("prefill-kv", 512, 4096, 1024),
    ("small-model", 512, 1024, 3072),
    ("long-ubatch", 2048, 4096, 4096),
];

fn devices() -> Vec<(&'static str, DeviceFacts)> {
    let mut v = vec![("reference", DeviceFacts::reference())];
    for c in [
        ChipGen::M1,
        ChipGen::M3,
        ChipGen::M4,
        ChipGen::M4Max,
        ChipGen::M5,
        ChipGen::A17Pro,
        ChipGen::A18,
    ] {
        v.push((c.name(), DeviceFacts::for_chip(c)));
    }
    v
}

/// Expected decisions for latency / energy (off is always "policy off", always is always "ane" on
/// these devices). One row per device, one entry per shape.
fn expected(device: &str) -> [[&'static str; 9]; 2] {
    const SB: &str = "small batch";
    const NP: &str = "not profitable";
    const OC: &str = "old chip";
    const A: &str = "ane";
    match device {
        "reference" => [[NP; 9], [NP; 9]],
        "M1" => [[OC; 9], [OC; 9]],
        "M3" | "M4" => [
            [SB, SB, SB, A, A, A, NP, NP, A],
            [SB, SB, SB, A, A, A, A, A, A],
        ],
        "M4 Max" => [
            [SB, SB, SB, NP, NP, NP, NP, NP, NP],
            [SB, SB, SB, NP, NP, NP, NP, NP, NP],
        ],
        "M5" => [
            [SB, SB, SB, NP, NP, NP, NP, NP, NP],
            [SB, SB, SB, NP, NP, A, NP, NP, A],
        ],
        "A17 Pro" | "A18" => [
            [SB, SB, SB, A, A, A, A, A, A],
            [SB, SB, SB, A, A, A, A, A, A],
        ],
        _ => unreachable!(),
    }
}

#[test]
fn decision_table() {
    let mut out = String::new();
    out.push_str(&format!("{:<10} {:<8}", "device", "mode"));
    for (name, m, k, n) in SHAPES {
        out.push_str(&format!(" | {name} {m}x{k}x{n}"));
    }
    out.push('\n');
    let mut mismatches = Vec::new();
    for (dname, facts) in devices() {
        let p = Policy::with_settings(&Settings::default(), facts);
        let want = expected(dname);
        for mode in Mode::ALL {
            p.set_mode(mode);
            out.push_str(&format!("{dname:<10} {:<8}", mode.name()));
            for (i, &(sname, m, k, n)) in SHAPES.iter().enumerate() {
                let got = p.decide(&MatmulShape { m, k, n }).as_str();
                let exp = match mode {
                    Mode::Latency => want[0][i],
                    Mode::Energy => want[1][i],
                    Mode::Off => "policy off",
                    Mode::Always => "ane",
                };
                if got != exp {
                    mismatches.push(format!(
                        "{dname} {} {sname}: got {got}, want {exp}",
                        mode.name()
                    ));
                }
                out.push_str(&format!(" | {got}"));
            }
            out.push('\n');
        }
    }
    println!("{out}");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
