//! Executor test cases shared by every executor: the reference executor runs them on every platform
//! (`tests/shared_reference.rs`), the CoreML executor on a device (`tests/device.rs`, `--features
//! device`). Each case takes `&dyn Executor`, so both executors meet the same bar.
//!
//! Tolerance: NMSE against the ideal f64 product of the program's math ≤ `DEVICE_MAX_NMSE` (5e-4, the
//! test-backend-ops MUL_MAT bar), every entry finite.

#![allow(dead_code)] // each test binary uses a subset

use std::time::Instant;

use ggml_coreml_executor::coreml::check::{
    Agreement, DEVICE_MAX_NMSE, OwnedInputs, compare_ideal, compare_outputs,
};
use ggml_coreml_executor::{ExecError, Executor, ProgramDesc, ProgramInputs, Variant, WeightPart};
use half::f16;

pub fn desc(
    variant: Variant,
    m: usize,
    k: usize,
    n: usize,
    group: usize,
    offsets: bool,
) -> ProgramDesc {
    ProgramDesc {
        variant,
        m,
        k,
        n,
        group,
        offsets,
    }
}

/// Small shapes of every variant: cheap on the reference executor, and awkward where it matters (rows
/// that are not 64-byte multiples, one output row, groups of 16 and 32, with and without offsets).
pub fn small_shapes() -> Vec<ProgramDesc> {
    vec![
        desc(Variant::I8I8, 64, 64, 32, 0, false),
        desc(Variant::I8I8, 128, 256, 96, 0, false),
        desc(Variant::I8I8, 64, 96, 1, 0, false),
        desc(Variant::I8I8, 256, 640, 200, 0, false),
        desc(Variant::W8F16, 64, 256, 64, 32, false),
        desc(Variant::W8F16, 128, 512, 48, 32, true),
        desc(Variant::W8F16, 64, 256, 40, 16, false),
        desc(Variant::F16, 64, 128, 64, 0, false),
        desc(Variant::F16, 256, 256, 32, 0, false),
    ]
}

/// Model-sized shapes for timing on a device (too slow for the reference executor in a test).
pub fn large_shapes() -> Vec<ProgramDesc> {
    vec![
        desc(Variant::I8I8, 256, 2048, 2048, 0, false),
        desc(Variant::I8I8, 512, 4096, 4096, 0, false),
        desc(Variant::I8I8, 512, 4096, 14336, 0, false),
        desc(Variant::I8I8, 512, 14336, 4096, 0, false),
        desc(Variant::I8I8, 2048, 4096, 4096, 0, false),
        desc(Variant::W8F16, 512, 4096, 4096, 32, false),
        desc(Variant::W8F16, 512, 4096, 4096, 32, true),
        desc(Variant::W8F16, 512, 4096, 4096, 16, false),
        desc(Variant::F16, 512, 4096, 4096, 0, false),
    ]
}

/// One shape's outcome.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub desc: ProgramDesc,
    pub agreement: Agreement,
    /// First `prepare` (compile or cache load, placement and self-check on CoreML).
    pub prepare_ms: f64,
    /// Median of the timed runs.
    pub run_ms: f64,
}

impl CaseResult {
    pub fn print(&self) {
        let d = &self.desc;
        let tops = 2.0 * (d.m * d.k * d.n) as f64 / (self.run_ms * 1e-3) / 1e12;
        eprintln!(
            "{:<28} prepare {:>9.1} ms  run {:>8.3} ms  {:>6.2} TOPS  {}",
            d.key(),
            self.prepare_ms,
            self.run_ms,
            tops,
            self.agreement
        );
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Prepares and runs `d` on random inputs `runs` times; checks the result against the ideal product
/// (every entry, or `sampled` entries for large shapes) and that repeated runs agree bit for bit.
pub fn check_shape(
    exec: &dyn Executor,
    d: &ProgramDesc,
    runs: usize,
    sampled: Option<usize>,
) -> CaseResult {
    let t = Instant::now();
    exec.prepare(d)
        .unwrap_or_else(|e| panic!("{}: prepare {d}: {e}", exec.name()));
    let prepare_ms = ms(t);
    let inputs = OwnedInputs::random(d, 0xC0FFEE ^ d.k as u64 ^ ((d.n as u64) << 20));
    let mut first = vec![f16::ZERO; d.n * d.m];
    let mut times = Vec::with_capacity(runs.max(1));
    for i in 0..runs.max(1) {
        let mut out = vec![f16::ZERO; d.n * d.m];
        let t = Instant::now();
        exec.run(d, inputs.inputs(), WeightPart::NONE, &mut out)
            .unwrap_or_else(|e| panic!("{}: run {d}: {e}", exec.name()));
        times.push(ms(t));
        if i == 0 {
            first = out;
        } else {
            assert!(
                out.iter()
                    .zip(&first)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: {d}: run {i} differs from run 0",
                exec.name()
            );
        }
    }
    times.sort_by(f64::total_cmp);
    let agreement = compare_ideal(&inputs, &first, sampled, 11);
    assert!(
        agreement.within(DEVICE_MAX_NMSE),
        "{}: {d}: {agreement} (limit {DEVICE_MAX_NMSE:e})",
        exec.name()
    );
    CaseResult {
        desc: *d,
        agreement,
        prepare_ms,
        run_ms: times[times.len() / 2],
    }
}

/// The same inputs on two executors: their outputs side by side.
pub fn compare_executors(a: &dyn Executor, b: &dyn Executor, d: &ProgramDesc) -> Agreement {
    let inputs = OwnedInputs::random(d, 77);
    let run = |e: &dyn Executor| {
        let mut out = vec![f16::ZERO; d.n * d.m];
        e.run(d, inputs.inputs(), WeightPart::NONE, &mut out)
            .unwrap_or_else(|err| panic!("{}: {d}: {err}", e.name()));
        out
    };
    compare_outputs(&run(a), &run(b))
}

/// Bad inputs are errors, never panics or results.
pub fn check_bad_inputs(exec: &dyn Executor) {
    let d = desc(Variant::I8I8, 64, 64, 16, 0, false);
    let good = OwnedInputs::random(&d, 1);
    let mut out = vec![f16::ZERO; d.n * d.m];
    let bad = |r: Result<(), ExecError>, what: &str| match r {
        Err(ExecError::BadInputs(..)) => {}
        other => panic!("{}: {what}: expected BadInputs, got {other:?}", exec.name()),
    };
    bad(
        exec.run(
            &d,
            ProgramInputs::I8I8 {
                w: &good.w_i8[1..],
                x: &good.x_i8,
            },
            WeightPart::NONE,
            &mut out,
        ),
        "short w",
    );
    bad(
        exec.run(
            &d,
            ProgramInputs::I8I8 {
                w: &good.w_i8,
                x: &good.x_i8[..10],
            },
            WeightPart::NONE,
            &mut out,
        ),
        "short x",
    );
    bad(
        exec.run(
            &d,
            ProgramInputs::I8I8 {
                w: &good.w_i8,
                x: &good.x_i8,
            },
            WeightPart::NONE,
            &mut out[1..],
        ),
        "short out",
    );
    let xf = vec![f16::ZERO; d.k * d.m];
    let wf = vec![f16::ZERO; d.n * d.k];
    bad(
        exec.run(
            &d,
            ProgramInputs::F16 { w: &wf, x: &xf },
            WeightPart::NONE,
            &mut out,
        ),
        "wrong variant",
    );

    let dw = desc(Variant::W8F16, 64, 64, 16, 32, true);
    let g = OwnedInputs::random(&dw, 2);
    let no_offsets = ProgramInputs::W8F16 {
        w: &g.w_i8,
        scales: &g.scales,
        offsets: None,
        x: &g.x_f16,
    };
    bad(
        exec.run(&dw, no_offsets, WeightPart::NONE, &mut out),
        "missing offsets",
    );
    let short_scales = ProgramInputs::W8F16 {
        w: &g.w_i8,
        scales: &g.scales[1..],
        offsets: g.offsets.as_deref(),
        x: &g.x_f16,
    };
    bad(
        exec.run(&dw, short_scales, WeightPart::NONE, &mut out),
        "short scales",
    );

    // Invalid descriptions: refused, not run.
    for d in [
        desc(Variant::I8I8, 65, 64, 16, 0, false),
        desc(Variant::W8F16, 64, 48, 16, 32, false),
        desc(Variant::F16, 64, 64, 16, 32, false),
        desc(Variant::I8I8, 64, 20000, 16, 0, false),
    ] {
        assert!(
            exec.prepare(&d).is_err(),
            "{}: prepare {d} must fail",
            exec.name()
        );
    }
}

/// `prepare` twice is cheap and still fine; different programs do not disturb each other.
pub fn check_prepare_idempotent(exec: &dyn Executor) {
    let d = desc(Variant::F16, 64, 64, 8, 0, false);
    exec.prepare(&d).unwrap();
    let t = Instant::now();
    for _ in 0..100 {
        exec.prepare(&d).unwrap();
    }
    assert!(
        ms(t) < 1000.0,
        "{}: 100 prepares of a ready program took {:.0} ms",
        exec.name(),
        ms(t)
    );
}

/// Several threads run the same program and other programs at once; every result stays right.
pub fn check_concurrent(exec: &dyn Executor) {
    let shapes = [
        desc(Variant::I8I8, 128, 256, 64, 0, false),
        desc(Variant::F16, 64, 128, 32, 0, false),
    ];
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let d = shapes[(t % 2) as usize];
            s.spawn(move || {
                for i in 0..3u64 {
                    let inputs = OwnedInputs::random(&d, t * 100 + i);
                    let mut out = vec![f16::ZERO; d.n * d.m];
                    exec.run(&d, inputs.inputs(), WeightPart::NONE, &mut out)
                        .unwrap();
                    let a = compare_ideal(&inputs, &out, None, 0);
                    assert!(
                        a.within(DEVICE_MAX_NMSE),
                        "{}: thread {t} call {i} {d}: {a}",
                        exec.name()
                    );
                }
            });
        }
    });
}

/// Every shared case on `exec`; returns the per-shape results (printed as they come).
pub fn run_all(exec: &dyn Executor) -> Vec<CaseResult> {
    eprintln!(
        "executor {}: {}",
        exec.name(),
        exec.capabilities().description
    );
    let results: Vec<CaseResult> = small_shapes()
        .iter()
        .map(|d| {
            let r = check_shape(exec, d, 3, None);
            r.print();
            r
        })
        .collect();
    check_bad_inputs(exec);
    check_prepare_idempotent(exec);
    check_concurrent(exec);
    results
}
