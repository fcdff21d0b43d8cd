//! iOS background routing: the background never sends work *to* a GPU host (Metal), because iOS
//! aborts GPU work from the background; with a CPU host it sends ops to the CPU as before.

use ggml_coreml_policy::{
    ChipGen, Decision, DeviceFacts, DeviceState, HostKind, MatmulShape, Mode, Policy, Reason,
    Settings, Variant,
};

const PREFILL: MatmulShape = MatmulShape {
    m: 512,
    k: 4096,
    n: 14336,
};
const DECODE: MatmulShape = MatmulShape {
    m: 1,
    k: 4096,
    n: 4096,
};

fn on(chip: ChipGen, mode: Mode) -> Policy {
    Policy::with_settings(
        &Settings {
            mode,
            ..Settings::default()
        },
        DeviceFacts::for_chip(chip),
    )
}

fn background(p: &Policy, on: bool) {
    p.set_device_state(DeviceState {
        background: on,
        ..Default::default()
    });
}

#[test]
fn background_never_routes_to_a_gpu_host() {
    let shapes = [PREFILL, DECODE];
    for chip in [ChipGen::A17Pro, ChipGen::A18, ChipGen::M4] {
        for mode in [Mode::Latency, Mode::Energy, Mode::Always, Mode::Off] {
            let p = on(chip, mode);
            for v in Variant::ALL {
                for s in &shapes {
                    background(&p, false);
                    let fg = p.decide_on(s, v, HostKind::Gpu);
                    background(&p, true);
                    let bg = p.decide_on(s, v, HostKind::Gpu);
                    // Whatever the foreground decision was, the background does not change it: an op
                    // on the ANE stays there instead of moving to Metal.
                    assert_eq!(fg, bg, "{chip:?} {mode:?} {v} {s:?}");
                    assert_ne!(bg, Decision::Host(Reason::Background));
                }
            }
        }
    }
}

#[test]
fn background_sends_ops_to_a_cpu_host() {
    let p = on(ChipGen::M4, Mode::Latency);
    background(&p, false);
    assert_eq!(
        p.decide_on(&PREFILL, Variant::W8F16, HostKind::Cpu),
        Decision::Ane
    );
    background(&p, true);
    assert_eq!(
        p.decide_on(&PREFILL, Variant::W8F16, HostKind::Cpu),
        Decision::Host(Reason::Background)
    );
    // decide_for is the CPU-host decision.
    assert_eq!(
        p.decide_for(&PREFILL, Variant::W8F16),
        Decision::Host(Reason::Background)
    );
    assert_eq!(
        p.decide_on(&PREFILL, Variant::W8F16, HostKind::Gpu),
        Decision::Ane
    );
    // Weight placement ignores the transient state either way.
    assert!(p.would_offload_weight_for(4096, 14336, Variant::W8F16));
}
