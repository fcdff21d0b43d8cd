//! Decisions of the Apple path that need no device, on the reference executor: the f16 fallback of a
//! refused int8-input program, programs prepared off the compute thread (the host runs their nodes
//! meanwhile), the compile circuit breaker, and the startup probe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::background::{BackgroundExecutor, ProbeState, private_breaker};
use ggml_coreml_executor::driver::{self, Activations, Mode, PreparedWeight, Scratch};
use ggml_coreml_executor::reference::ReferenceExecutor;
use ggml_coreml_executor::{
    Capabilities, ExecError, Executor, ProgramDesc, ProgramInputs, Variant, WeightPart,
    is_not_ready_message,
};
use half::f16;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// `n` rows of `k` Q8_0 values.
fn q8_0(n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed);
    let mut b = Vec::new();
    for _ in 0..n * k / 32 {
        let d = f16::from_f32(0.001 + (rng.next() % 1000) as f32 * 1e-5);
        b.extend_from_slice(&d.to_le_bytes());
        b.extend((0..32).map(|_| rng.next() as u8));
    }
    b
}

fn acts(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..m * k)
        .map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn run(
    exec: &dyn Executor,
    w: &PreparedWeight,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>, ExecError> {
    let mut out = vec![f32::NAN; m * w.n];
    let act = Activations {
        x,
        m,
        x_stride: w.k,
    };
    driver::matmul(exec, w, &act, &mut out, w.n, &mut Scratch::default())?;
    Ok(out)
}

/// What the host computes: the exact product of ggml's dequantised weight.
fn host(bytes: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let w = PreparedWeight::prepare(Mode::ExactF32, WeightType::Q8_0, bytes, n, k, 0).unwrap();
    let mut out = vec![0.0; m * n];
    let act = Activations { x, m, x_stride: k };
    driver::matmul(
        &ReferenceExecutor::new(),
        &w,
        &act,
        &mut out,
        n,
        &mut Scratch::default(),
    )
    .unwrap();
    out
}

fn nmse(want: &[f32], got: &[f32]) -> f64 {
    let (mut e, mut s) = (0f64, 0f64);
    for (a, b) in want.iter().zip(got) {
        e += ((a - b) as f64).powi(2);
        s += (*a as f64).powi(2);
    }
    e / s.max(1e-30)
}

#[test]
fn refused_int8_program_falls_back_to_the_f16_program() {
    let (m, k, n) = (20, 256, 48);
    let bytes = q8_0(n, k, 1);
    let x = acts(m, k, 2);
    let plain = ReferenceExecutor::new();
    let refusing = ReferenceExecutor::new();
    refusing.set_refuse_int8(true);
    // The f16 program over the same weight, prepared the usual way: what the fallback must equal.
    let f16w = PreparedWeight::prepare(
        Mode::Program(Variant::F16),
        WeightType::Q8_0,
        &bytes,
        n,
        k,
        0,
    )
    .unwrap();
    let want = run(&plain, &f16w, &x, m).unwrap();
    for v in [Variant::W8F16, Variant::I8I8] {
        let w =
            PreparedWeight::prepare(Mode::Program(v), WeightType::Q8_0, &bytes, n, k, 7).unwrap();
        // Without the hook the int8 program runs and the weight keeps its form.
        run(&plain, &w, &x, m).unwrap();
        assert!(!w.on_f16_fallback());
        let got = run(&refusing, &w, &x, m).unwrap();
        assert!(w.on_f16_fallback(), "{v}");
        if v == Variant::W8F16 {
            // Block form dequantised with the program's own formula: bit-identical for Q8_0.
            assert_eq!(
                got.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            );
        }
        let e = nmse(&host(&bytes, n, k, &x, m), &got);
        assert!(e < 1e-4, "{v}: nmse {e:e}");
        // Later calls go straight to the f16 program.
        assert_eq!(run(&refusing, &w, &x, m).unwrap(), got);
        // The int8 program was never built; the f16 one was.
        let f16_desc = ProgramDesc {
            variant: Variant::F16,
            m: 64,
            k,
            n,
            group: 0,
            offsets: false,
        };
        assert!(refusing.is_prepared(&f16_desc));
    }
}

/// Refuses every program: the weight must reach the host with the refusal.
struct RefuseAll;

impl Executor for RefuseAll {
    fn name(&self) -> &'static str {
        "refuse-all"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            variants: vec![],
            accelerated: false,
            description: String::new(),
        }
    }
    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        Err(ExecError::Placement(desc.key(), "not on the ANE".into()))
    }
    fn run(
        &self,
        desc: &ProgramDesc,
        _: ProgramInputs<'_>,
        _: WeightPart,
        _: &mut [f16],
    ) -> Result<(), ExecError> {
        self.prepare(desc)
    }
}

#[test]
fn refused_f16_fallback_goes_to_the_host() {
    let (m, k, n) = (4, 64, 8);
    let bytes = q8_0(n, k, 3);
    let w = PreparedWeight::prepare(
        Mode::Program(Variant::W8F16),
        WeightType::Q8_0,
        &bytes,
        n,
        k,
        0,
    )
    .unwrap();
    let e = run(&RefuseAll, &w, &acts(m, k, 4), m).unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("f16-m"), "{e}");
}

fn bg(inner: Arc<dyn Executor>, watchdog: Duration) -> BackgroundExecutor {
    BackgroundExecutor::with_breaker(inner, watchdog, private_breaker(), Arc::new(|_| {}))
}

#[test]
fn first_prefill_runs_on_the_host_while_a_2s_compiler_works() {
    let slow = ReferenceExecutor::new();
    slow.set_compile_delay(Duration::from_secs(2));
    let exec = bg(Arc::new(slow), Duration::from_secs(60));
    // A "prefill" of three weights, then more until the programs are ready.
    let (m, k) = (16, 128);
    let weights: Vec<(Vec<u8>, PreparedWeight)> = [32usize, 40, 64]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let b = q8_0(n, k, 10 + i as u64);
            let w = PreparedWeight::prepare(
                Mode::Program(Variant::W8F16),
                WeightType::Q8_0,
                &b,
                n,
                k,
                0,
            )
            .unwrap();
            (b, w)
        })
        .collect();
    let x = acts(m, k, 5);
    let t0 = Instant::now();
    let (mut host_runs, mut worst) = (0, Duration::ZERO);
    let mut ane_runs = vec![0usize; weights.len()];
    while t0.elapsed() < Duration::from_secs(30) && ane_runs.iter().any(|&n| n < 2) {
        for (i, (bytes, w)) in weights.iter().enumerate() {
            let t = Instant::now();
            let r = run(&exec, w, &x, m);
            worst = worst.max(t.elapsed());
            match r {
                Ok(out) => {
                    ane_runs[i] += 1;
                    assert!(nmse(&host(bytes, w.n, k, &x, m), &out) < 1e-4);
                }
                Err(e) => {
                    // What the router does with it: the host runs the node, no fault counted.
                    assert!(
                        e.is_not_ready() && is_not_ready_message(&e.to_string()),
                        "{e}"
                    );
                    assert!(!e.is_refusal());
                    let _ = host(bytes, w.n, k, &x, m);
                    host_runs += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ane_runs.iter().all(|&n| n >= 2),
        "programs never became ready"
    );
    // The first prefill (all three nodes) ran on the host.
    assert!(host_runs >= weights.len(), "host runs {host_runs}");
    // No call waited on the compiler: the 2 s build is never on the calling thread. (Generous bound:
    // the test machine is shared; a waiting call would take ≥ 2 s.)
    assert!(worst < Duration::from_millis(500), "worst call {worst:?}");
    let s = exec.stats();
    assert!(exec.wait_idle(Duration::from_secs(5)), "{s:?}");
    let s = exec.stats();
    assert_eq!((s.ready, s.pending, s.held), (3, 0, 0), "{s:?}");
}

fn desc(n: usize) -> ProgramDesc {
    ProgramDesc {
        variant: Variant::F16,
        m: 64,
        k: 64,
        n,
        group: 0,
        offsets: false,
    }
}

fn call(exec: &dyn Executor, d: &ProgramDesc) -> Result<(), ExecError> {
    let w = vec![f16::ONE; d.n * d.k];
    let x = vec![f16::ONE; d.k * d.m];
    let mut out = vec![f16::ZERO; d.n * d.m];
    exec.run(
        d,
        ProgramInputs::F16 { w: &w, x: &x },
        WeightPart::NONE,
        &mut out,
    )
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn compile_timeout_opens_the_circuit_breaker_until_the_cache_is_warmed() {
    let slow = ReferenceExecutor::new();
    slow.set_compile_delay(Duration::from_millis(1500));
    let exec = bg(Arc::new(slow), Duration::from_millis(300));
    let breaker = exec.breaker();
    let (a, b) = (desc(16), desc(32));
    assert!(call(&exec, &a).unwrap_err().is_not_ready());
    assert!(!breaker.is_open());
    std::thread::sleep(Duration::from_millis(400));
    // Still compiling past the watchdog: the breaker opens (once).
    assert!(call(&exec, &a).unwrap_err().is_not_ready());
    let why = breaker.open_reason().expect("breaker open");
    assert!(why.contains(&a.key()), "{why}");
    // A new program that needs a compile is held back: it stays on the host.
    assert!(call(&exec, &b).unwrap_err().is_not_ready());
    wait_until("a to finish", || call(&exec, &a).is_ok());
    wait_until("b to be held", || exec.stats().held == 1);
    let e = call(&exec, &b).unwrap_err();
    assert!(
        e.is_not_ready() && e.to_string().contains("held back"),
        "{e}"
    );
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(exec.stats().held, 1, "nothing compiled while open");
    // Warming the cache (a synchronous prepare) is not held back; then the breaker closes.
    let c = desc(48);
    exec.prepare(&c).unwrap();
    call(&exec, &c).unwrap();
    breaker.reset();
    assert!(call(&exec, &b).unwrap_err().is_not_ready());
    wait_until("b after the reset", || call(&exec, &b).is_ok());
}

/// The reference executor with a probe and prepare that can fail.
struct Faulty {
    inner: ReferenceExecutor,
    probe: Result<(), String>,
    panic_in_prepare: bool,
}

impl Executor for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            variants: Variant::ALL.to_vec(),
            accelerated: true,
            description: "faulty".into(),
        }
    }
    fn probe(&self) -> Result<(), String> {
        self.probe.clone()
    }
    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        if self.panic_in_prepare {
            panic!("objc exception turned panic");
        }
        self.inner.prepare(desc)
    }
    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        key: WeightPart,
        out: &mut [f16],
    ) -> Result<(), ExecError> {
        self.inner.run(desc, inputs, key, out)
    }
}

#[test]
fn failed_probe_makes_the_executor_unusable_with_the_reason() {
    let exec = bg(
        Arc::new(Faulty {
            inner: ReferenceExecutor::new(),
            probe: Err("int8 surface: initWithPixelBuffer returned nil".into()),
            panic_in_prepare: false,
        }),
        Duration::from_secs(60),
    );
    let st = exec.wait_probe(Duration::from_secs(10));
    assert!(
        matches!(st, ProbeState::Failed(ref w) if w.contains("returned nil")),
        "{st:?}"
    );
    let caps = exec.capabilities();
    assert!(!caps.accelerated && caps.description.contains("startup probe failed"));
    let e = call(&exec, &desc(16)).unwrap_err();
    assert!(matches!(e, ExecError::Unsupported(..)) && e.to_string().contains("returned nil"));
    assert!(exec.prepare(&desc(16)).is_err());
}

#[test]
fn a_panic_while_preparing_is_a_refusal_not_a_crash() {
    let exec = bg(
        Arc::new(Faulty {
            inner: ReferenceExecutor::new(),
            probe: Ok(()),
            panic_in_prepare: true,
        }),
        Duration::from_secs(60),
    );
    assert!(call(&exec, &desc(16)).unwrap_err().is_not_ready());
    let mut last = None;
    wait_until("the refusal", || {
        last = call(&exec, &desc(16)).err();
        last.as_ref().is_some_and(|e| !e.is_not_ready())
    });
    let e = last.unwrap();
    assert!(
        e.is_refusal() && e.to_string().contains("panic in prepare"),
        "{e}"
    );
    // The worker survived: the probe state is still good and the executor still answers.
    assert_eq!(exec.probe_state(), ProbeState::Passed);
}

#[test]
fn health_names_the_probe_and_the_breaker() {
    let exec = bg(
        Arc::new(Faulty {
            inner: ReferenceExecutor::new(),
            probe: Err("fp16 surface rejected".into()),
            panic_in_prepare: false,
        }),
        Duration::from_secs(60),
    );
    exec.wait_probe(Duration::from_secs(10));
    exec.breaker().trip("compile of f16-m64-k64-n16 timed out");
    let h = exec.health().expect("health");
    assert!(
        h.contains("startup probe failed: fp16 surface rejected")
            && h.contains("circuit breaker open"),
        "{h}"
    );
    assert_eq!(ReferenceExecutor::new().health(), None);
}

/// The resident-weight bookkeeping the CoreML executor keeps (one entry per weight part and
/// weight-side input, shared by every M bucket) runs on the reference executor too; dropping a
/// prepared form lets every entry of it go, through the background wrapper as well.
#[test]
fn dropped_weights_leave_the_executor() {
    let inner: Arc<dyn Executor> = Arc::new(ReferenceExecutor::new());
    let exec: Arc<dyn Executor> = Arc::new(BackgroundExecutor::new(inner, Duration::from_secs(60)));
    ggml_coreml_executor::watch_weights(&exec);
    // N past the ANE's largest dimension: two N parts.
    let (k, n) = (64, ggml_coreml_program::ANE_MAX_DIM + 64);
    let prep = |seed| {
        PreparedWeight::prepare(
            Mode::Program(Variant::W8F16),
            WeightType::Q8_0,
            &q8_0(n, k, seed),
            n,
            k,
            0x1000,
        )
        .unwrap()
    };
    let (a, b) = (prep(1), prep(2));
    assert_ne!(a.key, b.key, "one address, two forms, two keys");
    let wait = |w: &PreparedWeight, m| loop {
        match run(exec.as_ref(), w, &acts(m, k, 3), m) {
            Err(e) if e.is_not_ready() => std::thread::sleep(Duration::from_millis(5)),
            r => break r.unwrap(),
        }
    };
    wait(&a, 4);
    // Two parts × (w, scales); another M bucket binds the same entries.
    assert_eq!(exec.surface_bytes().weight_inputs, 4);
    wait(&a, 40);
    assert_eq!(exec.surface_bytes().weight_inputs, 4);
    wait(&b, 4);
    assert_eq!(exec.surface_bytes().weight_inputs, 8);
    drop(a);
    let s = exec.surface_bytes();
    assert_eq!((s.weight_inputs, s.forgotten), (4, 4));
    drop(b);
    assert_eq!(exec.surface_bytes().weight_inputs, 0);
}
