//! Fallback conditions, faults, measurements, concurrency, environment parsing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ggml_coreml_policy::{
    ChipGen, Decision, DeviceFacts, DeviceState, MatmulShape, Mode, OsVersion, Policy, Reason,
    Settings, Thermal, Variant,
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

fn host(r: Reason) -> Decision {
    Decision::Host(r)
}

#[test]
fn existing_api_keeps_working() {
    let p = Policy::new(Mode::Latency, false);
    assert_eq!(p.mode(), Mode::Latency);
    assert_eq!(p.decide(&PREFILL), host(Reason::NotProfitable));
    assert!(!p.would_offload_weight(4096, 4096));
    p.set_mode(Mode::Always);
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    assert!(p.would_offload_weight(4096, 4096));
    p.set_mode(Mode::Off);
    assert_eq!(p.decide(&PREFILL), host(Reason::ModeOff));
    assert!(!p.would_offload_weight(4096, 4096));
    // accelerated without platform facts: newest known chip assumed, prefill decided by the model.
    let p = Policy::new(Mode::Always, true);
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    assert!(p.device_facts().chip_guessed);
    for r in Reason::ALL {
        assert!(!r.as_str().is_empty() && r.as_str().len() <= 32);
    }
}

#[test]
fn os_too_old() {
    for (os, v) in [
        ("macos", OsVersion::new(15, 5)),
        ("macos", OsVersion::new(14, 0)),
        ("ios", OsVersion::new(18, 2)),
    ] {
        let facts = DeviceFacts::apple(os, Some(v), Some("Apple M4"), true);
        let p = Policy::with_settings(&Settings::default(), facts);
        for mode in [Mode::Latency, Mode::Energy, Mode::Always] {
            p.set_mode(mode);
            assert_eq!(
                p.decide(&PREFILL),
                host(Reason::OsTooOld),
                "{os} {v} {mode:?}"
            );
        }
        assert!(!p.would_offload_weight(4096, 4096));
        let e = p.explain(&PREFILL);
        assert!(
            e.contains("-> os too old (OS") && e.contains(&format!("OS {v} <")),
            "{e}"
        );
    }
    // 26 (and the compatibility number 16 for 26) is fine.
    let p = Policy::with_settings(
        &Settings::default(),
        DeviceFacts::apple("macos", Some(OsVersion::new(16, 0)), Some("Apple M4"), true),
    );
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
}

#[test]
fn no_neural_engine() {
    let facts = DeviceFacts::apple(
        "macos",
        Some(OsVersion::new(26, 0)),
        Some("Apple M4"),
        false,
    );
    let p = Policy::with_settings(
        &Settings {
            mode: Mode::Always,
            ..Settings::default()
        },
        facts,
    );
    assert_eq!(p.decide(&PREFILL), host(Reason::ExecutorUnavailable));
    assert!(!p.would_offload_weight(4096, 14336));
}

#[test]
fn old_chips_are_a_graceful_no_op() {
    for chip in [
        ChipGen::M1,
        ChipGen::M2Max,
        ChipGen::A14,
        ChipGen::A15,
        ChipGen::A16,
    ] {
        for mode in [Mode::Latency, Mode::Energy] {
            let p = on(chip, mode);
            assert_eq!(p.decide(&PREFILL), host(Reason::OldChip), "{chip}");
            assert!(!p.would_offload_weight(4096, 14336));
            assert!(p.explain(&PREFILL).contains("old chip"));
        }
        // `always` still runs them (testing on old hardware).
        assert_eq!(on(chip, Mode::Always).decide(&PREFILL), Decision::Ane);
    }
}

#[test]
fn unprofitable_shapes() {
    let p = on(ChipGen::M4, Mode::Latency);
    assert_eq!(p.decide(&DECODE), host(Reason::SmallBatch));
    // Lowering min_m (speculative verification) still needs the cost model's consent.
    p.set_min_m(1);
    assert_eq!(p.decide(&DECODE), host(Reason::NotProfitable));
    assert_eq!(
        p.decide(&MatmulShape {
            m: 16,
            k: 4096,
            n: 4096
        }),
        host(Reason::NotProfitable)
    );
    assert_eq!(
        p.decide(&MatmulShape {
            m: 512,
            k: 1024,
            n: 3072
        }),
        host(Reason::NotProfitable)
    );
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    // The same shape on a chip whose GPU is as fast as its ANE.
    assert_eq!(
        on(ChipGen::M4Max, Mode::Latency).decide(&PREFILL),
        host(Reason::NotProfitable)
    );
    // Zero dimensions are declined, never a panic.
    assert_eq!(
        p.decide(&MatmulShape {
            m: 0,
            k: 4096,
            n: 4096
        }),
        host(Reason::BadShape)
    );
    assert_eq!(
        p.decide(&MatmulShape {
            m: 512,
            k: 0,
            n: 4096
        }),
        host(Reason::BadShape)
    );
    let _ = p.explain(&MatmulShape { m: 0, k: 0, n: 0 });
    // Huge dimensions: no overflow, no panic.
    let huge = MatmulShape {
        m: usize::MAX / 4,
        k: usize::MAX / 4,
        n: usize::MAX / 4,
    };
    let _ = p.decide(&huge);
    let _ = p.explain(&MatmulShape {
        m: 1 << 20,
        k: 1 << 20,
        n: 1 << 20,
    });
}

#[test]
fn device_state_conditions() {
    let lat = on(ChipGen::M4, Mode::Latency);
    let en = on(ChipGen::M4, Mode::Energy);
    let alw = on(ChipGen::M4, Mode::Always);
    let cases = [
        // (state, latency, energy)
        (DeviceState::default(), Decision::Ane, Decision::Ane),
        (
            DeviceState {
                thermal: Thermal::Fair,
                ..Default::default()
            },
            Decision::Ane,
            Decision::Ane,
        ),
        (
            DeviceState {
                thermal: Thermal::Serious,
                ..Default::default()
            },
            host(Reason::Thermal),
            Decision::Ane,
        ),
        (
            DeviceState {
                thermal: Thermal::Critical,
                ..Default::default()
            },
            host(Reason::Thermal),
            host(Reason::Thermal),
        ),
        (
            DeviceState {
                low_power: true,
                ..Default::default()
            },
            host(Reason::LowPower),
            Decision::Ane,
        ),
        (
            DeviceState {
                background: true,
                ..Default::default()
            },
            host(Reason::Background),
            host(Reason::Background),
        ),
    ];
    for (st, want_lat, want_en) in cases {
        for p in [&lat, &en, &alw] {
            p.set_device_state(st);
            assert_eq!(p.device_state(), st);
        }
        assert_eq!(lat.decide(&PREFILL), want_lat, "{st:?}");
        assert_eq!(en.decide(&PREFILL), want_en, "{st:?}");
        assert_eq!(alw.decide(&PREFILL), Decision::Ane, "{st:?}");
        // Placement ignores the transient state.
        assert!(lat.would_offload_weight(4096, 14336), "{st:?}");
    }
    // Field setters compose.
    lat.set_device_state(DeviceState::default());
    lat.set_thermal(Thermal::Serious);
    lat.set_background(true);
    lat.set_low_power(true);
    assert_eq!(
        lat.device_state(),
        DeviceState {
            thermal: Thermal::Serious,
            low_power: true,
            background: true
        }
    );
    lat.set_background(false);
    lat.set_thermal(Thermal::Nominal);
    assert_eq!(lat.decide(&PREFILL), host(Reason::LowPower));
}

#[test]
fn three_faults_disable_a_shape_only() {
    let p = on(ChipGen::M4, Mode::Always);
    let other_m = MatmulShape { m: 2048, ..PREFILL };
    let other_n = MatmulShape { n: 4096, ..PREFILL };
    assert!(!p.record_fault(&PREFILL));
    assert!(!p.record_fault(&MatmulShape { m: 500, ..PREFILL })); // same bucket, same programs
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    assert!(p.record_fault(&PREFILL), "the third fault disables");
    assert!(!p.record_fault(&PREFILL), "reported once");
    assert_eq!(p.fault_count(&PREFILL), 4);
    for mode in [Mode::Always, Mode::Latency, Mode::Energy] {
        p.set_mode(mode);
        assert_eq!(p.decide(&PREFILL), host(Reason::ShapeDisabled));
        assert_eq!(
            p.decide(&MatmulShape { m: 400, ..PREFILL }),
            host(Reason::ShapeDisabled)
        );
        assert_eq!(p.decide(&other_m), Decision::Ane);
        assert_eq!(p.decide(&other_n), Decision::Ane);
    }
    assert_eq!(p.disabled_shapes(), vec![(512, 4096, 14336)]);
    assert!(p.explain(&PREFILL).contains("4 faults"));
    // would_offload_weight still sees the other buckets.
    assert!(p.would_offload_weight(4096, 14336));
    // A configurable threshold.
    let q = Policy::with_settings(
        &Settings {
            mode: Mode::Always,
            max_faults: 1,
            ..Settings::default()
        },
        DeviceFacts::reference(),
    );
    assert!(q.record_fault(&DECODE));
    assert_eq!(q.decide(&DECODE), host(Reason::ShapeDisabled));
}

#[test]
fn measurement_overrides_prediction() {
    // Predicted faster on M4; measured slower → host.
    let p = on(ChipGen::M4, Mode::Latency);
    let pred = p.predict(&PREFILL, Variant::I8I8);
    let (a, h) = (pred.ane_ms.unwrap(), pred.host_ms.unwrap());
    assert!(a < h && !pred.ane_measured);
    p.record(&PREFILL, Variant::I8I8, 3000.0, None); // warm-up (compile): ignored
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    p.record(&PREFILL, Variant::I8I8, 2.0 * h, None);
    assert_eq!(p.decide(&PREFILL), host(Reason::NotProfitable));
    assert!(p.predict(&PREFILL, Variant::I8I8).ane_measured);
    assert!(p.explain(&PREFILL).contains("measured"));
    // Another variant of the same shape keeps its prediction.
    assert!(!p.predict(&PREFILL, Variant::F16).ane_measured);

    // Predicted slower on M4 Max; measured faster (ANE and host both measured) → ANE.
    let q = on(ChipGen::M4Max, Mode::Latency);
    assert_eq!(q.decide(&PREFILL), host(Reason::NotProfitable));
    for _ in 0..2 {
        q.record(&PREFILL, Variant::I8I8, 2.0, Some(5.0));
    }
    assert_eq!(q.decide(&PREFILL), Decision::Ane);
    // Host time scales with M inside the bucket: 5 ms at 512 tokens → 4 ms at 409.6.
    let pr = q.predict(&MatmulShape { m: 410, ..PREFILL }, Variant::I8I8);
    assert!(
        (pr.host_ms.unwrap() - 4.0).abs() < 0.01 && pr.host_measured,
        "{pr:?}"
    );

    // Export, import into a fresh policy on the same device: same decisions; a foreign device refuses.
    let json = q.measurements_json();
    let fresh = on(ChipGen::M4Max, Mode::Latency);
    assert_eq!(fresh.load_measurements_json(&json), Ok(1));
    assert_eq!(fresh.decide(&PREFILL), Decision::Ane);
    let other = on(ChipGen::M4, Mode::Latency);
    assert!(
        other
            .load_measurements_json(&json)
            .unwrap_err()
            .contains("device")
    );
    assert!(other.load_measurements_json("{\"format\":1").is_err());

    // The reference device class never becomes profitable, whatever is measured.
    let r = Policy::new(Mode::Latency, false);
    for _ in 0..3 {
        r.record(&PREFILL, Variant::I8I8, 0.001, Some(1000.0));
    }
    assert_eq!(r.decide(&PREFILL), host(Reason::NotProfitable));
    // Garbage timings are ignored.
    q.record(&PREFILL, Variant::I8I8, f64::NAN, Some(-1.0));
    q.record(
        &MatmulShape { m: 0, ..PREFILL },
        Variant::I8I8,
        1.0,
        Some(1.0),
    );
    assert_eq!(q.decide(&PREFILL), Decision::Ane);
}

#[test]
fn energy_factor() {
    let p = on(ChipGen::M4Max, Mode::Energy);
    let pred = p.predict(&PREFILL, Variant::I8I8);
    let ratio = pred.ane_ms.unwrap() / pred.host_ms.unwrap();
    assert!(ratio > 1.0, "{ratio}");
    assert_eq!(p.energy_factor(), 1.5);
    assert_eq!(on(ChipGen::A18, Mode::Energy).energy_factor(), 2.0);
    p.set_energy_factor(Some(ratio * 0.99)).unwrap();
    assert_eq!(p.decide(&PREFILL), host(Reason::NotProfitable));
    assert!(p.explain(&PREFILL).contains("factor"));
    p.set_energy_factor(Some(ratio * 1.01)).unwrap();
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
    p.set_mode(Mode::Latency);
    assert_eq!(p.decide(&PREFILL), host(Reason::NotProfitable));
    assert!(p.set_energy_factor(Some(f64::NAN)).is_err());
    assert!(p.set_energy_factor(Some(0.5)).is_err());
    p.set_energy_factor(None).unwrap();
    assert_eq!(p.energy_factor(), 1.5);
}

#[test]
fn weight_placement_uses_the_ubatch() {
    let p = on(ChipGen::M4, Mode::Latency);
    assert!(p.would_offload_weight(4096, 14336));
    assert!(!p.would_offload_weight(1024, 3072)); // never wins up to 512 tokens
    p.set_ubatch(4096);
    assert!(p.would_offload_weight(1024, 3072)); // wins from 1536
    p.set_ubatch(128);
    assert!(!p.would_offload_weight(4096, 14336)); // below min_m
    p.set_min_m(64);
    assert!(p.would_offload_weight(4096, 14336)); // 128 tokens already win for the FFN
    assert_eq!(p.break_even_m(4096, 14336, Variant::I8I8), Some(128));
    assert_eq!(
        Policy::new(Mode::Latency, false).break_even_m(4096, 14336, Variant::I8I8),
        None
    );
}

#[test]
fn explain_says_why() {
    let p = on(ChipGen::M4, Mode::Latency);
    let e = p.explain(&PREFILL);
    for part in [
        "m=512 k=4096 n=14336 i8i8",
        "mac M4",
        "predicted",
        "dispatch",
        "host",
        "-> ane",
    ] {
        assert!(e.contains(part), "{part}: {e}");
    }
    assert!(p.explain(&DECODE).contains("small batch (m 1 < min 256)"));
    let r = Policy::new(Mode::Latency, false);
    assert!(
        r.explain(&PREFILL).contains("reference"),
        "{}",
        r.explain(&PREFILL)
    );
}

#[test]
fn mode_switching_under_concurrent_readers() {
    let p = Arc::new(on(ChipGen::M4, Mode::Latency));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = HashMap::new();
                let mut rounds = 0u64;
                while rounds < 2000 || !stop.load(Ordering::Relaxed) {
                    rounds += 1;
                    // M4 prefill: ane under latency/energy/always, host under off; decode: never ane
                    // except in always.
                    let d = p.decide(&PREFILL);
                    assert!(d == Decision::Ane || d == host(Reason::ModeOff), "{d:?}");
                    let d = p.decide(&DECODE);
                    assert!(
                        [
                            Decision::Ane,
                            host(Reason::ModeOff),
                            host(Reason::SmallBatch)
                        ]
                        .contains(&d),
                        "{d:?}"
                    );
                    *seen.entry(p.decide(&DECODE)).or_insert(0u64) += 1;
                    p.record(&PREFILL, Variant::I8I8, 1.0, Some(10.0));
                }
                seen
            })
        })
        .collect();
    for i in 0..20_000 {
        p.set_mode(Mode::ALL[i % 4]);
        if i % 7 == 0 {
            p.set_thermal(if i % 2 == 0 {
                Thermal::Fair
            } else {
                Thermal::Nominal
            });
        }
    }
    p.set_mode(Mode::Energy);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let seen = r.join().expect("reader panicked");
        assert!(!seen.is_empty());
    }
    assert_eq!(p.mode(), Mode::Energy);
    assert_eq!(p.decide(&PREFILL), Decision::Ane);
}

#[test]
fn environment() {
    let vars: HashMap<&str, &str> = [
        ("GGML_COREML_POLICY", "energy"),
        ("GGML_COREML_ENERGY_FACTOR", "3"),
        ("GGML_COREML_MIN_M", "64"),
        ("GGML_COREML_CHIP", "Apple M3"),
    ]
    .into();
    let (p, w) = Policy::from_lookup(true, |k| vars.get(k).map(|v| v.to_string()));
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.mode(), Mode::Energy);
    assert_eq!(p.energy_factor(), 3.0);
    assert_eq!(p.min_m(), 64);
    assert_eq!(p.device_class().chip(), Some(ChipGen::M3));
    // The override survives the platform layer's facts.
    p.set_device_facts(DeviceFacts::apple(
        "macos",
        Some(OsVersion::new(26, 0)),
        Some("Apple M4 Max"),
        true,
    ));
    assert_eq!(p.device_class().chip(), Some(ChipGen::M3));
    // ... but not on the reference class (the override is about chips, not executors).
    let (r, _) = Policy::from_lookup(false, |k| vars.get(k).map(|v| v.to_string()));
    assert_eq!(r.device_class().chip(), None);

    let bad: HashMap<&str, &str> = [
        ("GGML_COREML_POLICY", "turbo"),
        ("GGML_COREML_ENERGY_FACTOR", "-2"),
        ("GGML_COREML_MIN_M", "zero"),
    ]
    .into();
    let (p, w) = Policy::from_lookup(false, |k| bad.get(k).map(|v| v.to_string()));
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!(p.mode(), Mode::Latency);
    assert_eq!(p.min_m(), 256);
    assert_eq!(p.energy_factor(), 1.5);
    // from_env reads the real environment; whatever it holds, it never panics.
    let (_p, _w) = Policy::from_env(false);
}

#[test]
fn always_respects_an_explicit_min_m() {
    let (p, w) = Policy::from_lookup(false, |k| match k {
        "GGML_COREML_POLICY" => Some("always".into()),
        "GGML_COREML_MIN_M" => Some("16".into()),
        _ => None,
    });
    assert!(w.is_empty(), "{w:?}");
    let small = MatmulShape {
        m: 1,
        k: 256,
        n: 256,
    };
    let big = MatmulShape {
        m: 16,
        k: 256,
        n: 256,
    };
    assert_eq!(p.decide(&small), Decision::Host(Reason::SmallBatch));
    assert_eq!(p.decide(&big), Decision::Ane);
    // Without the variable `always` takes every M.
    let (p, _) = Policy::from_lookup(false, |k| {
        (k == "GGML_COREML_POLICY").then(|| "always".into())
    });
    assert_eq!(p.decide(&small), Decision::Ane);
}

#[test]
fn per_call_preparation_is_charged_to_the_ane_path() {
    // Bounded mode: a weight that is not resident is prepared for the call; the model charges it.
    let p = on(ChipGen::M4, Mode::Latency);
    let resident = p.predict_with(&PREFILL, Variant::W8F16, false);
    let per_call = p.predict_with(&PREFILL, Variant::W8F16, true);
    let model = ggml_coreml_policy::cost::CostModel::for_chip(ChipGen::M4);
    let charge = model.prepare_ms(PREFILL.k, PREFILL.n, Variant::W8F16);
    assert!(charge > 0.0);
    assert!(
        (per_call.ane_ms.unwrap() - resident.ane_ms.unwrap() - charge).abs() < 1e-9,
        "{resident:?} {per_call:?}"
    );
    assert_eq!(per_call.host_ms, resident.host_ms);
    // The charge only ever moves calls to the host, and it does move small ones (the whole weight
    // is prepared for few tokens).
    let cpu = ggml_coreml_policy::HostKind::Cpu;
    let mut moved = 0;
    for m in 1..=512 {
        let shape = MatmulShape { m, ..PREFILL };
        let (r, c) = (
            p.decide_on(&shape, Variant::W8F16, cpu),
            p.decide_on_per_call(&shape, Variant::W8F16, cpu),
        );
        assert!(c != Decision::Ane || r == Decision::Ane, "m {m}");
        moved += usize::from(r == Decision::Ane && c == host(Reason::NotProfitable));
    }
    assert!(moved > 0);
    // A measured time already includes the preparation: nothing is added to it.
    p.record(&PREFILL, Variant::W8F16, 3000.0, None);
    p.record(&PREFILL, Variant::W8F16, 7.0, None);
    let m = p.predict_with(&PREFILL, Variant::W8F16, true);
    assert!(
        m.ane_measured && (m.ane_ms.unwrap() - 7.0).abs() < 1e-9,
        "{m:?}"
    );
    // Policy `always` still offloads.
    let a = on(ChipGen::M4, Mode::Always);
    assert_eq!(
        a.decide_on_per_call(&PREFILL, Variant::W8F16, ggml_coreml_policy::HostKind::Cpu),
        Decision::Ane
    );
}
