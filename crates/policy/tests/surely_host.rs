//! `surely_host` is the lock-free shortcut of per-graph walks: whenever it says host, the full
//! decision must say host too, for every mode, chip and M.

use ggml_coreml_policy::{
    ChipGen, Decision, DeviceFacts, HostKind, MatmulShape, Mode, Policy, Settings, Variant,
};

#[test]
fn surely_host_never_contradicts_the_decision() {
    let facts = [
        DeviceFacts::reference(),
        DeviceFacts::for_chip(ChipGen::M4),
        DeviceFacts::for_chip(ChipGen::A17Pro),
    ];
    let modes = [Mode::Off, Mode::Latency, Mode::Energy, Mode::Always];
    let mut shortcut_taken = 0;
    for f in &facts {
        for &mode in &modes {
            for always_min_m in [None, Some(8)] {
                let p = Policy::with_settings(
                    &Settings {
                        mode,
                        always_min_m,
                        ..Settings::default()
                    },
                    f.clone(),
                );
                for m in [1, 2, 7, 8, 31, 64, 255, 256, 512, 4096] {
                    if !p.surely_host(m) {
                        continue;
                    }
                    shortcut_taken += 1;
                    let shape = MatmulShape {
                        m,
                        k: 4096,
                        n: 4096,
                    };
                    for v in [Variant::I8I8, Variant::W8F16] {
                        for h in [HostKind::Cpu, HostKind::Gpu] {
                            assert!(
                                matches!(p.decide_on(&shape, v, h), Decision::Host(_)),
                                "{mode:?} m={m}: surely_host but decided ANE"
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(shortcut_taken > 0);
}
