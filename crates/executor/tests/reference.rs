//! The reference executor on every variant: against f64 ground truth, exactness of the int8 path,
//! and rejection of bad inputs.

use ggml_coreml_executor::reference::ReferenceExecutor;
use ggml_coreml_executor::{ExecError, Executor, ProgramDesc, ProgramInputs, Variant, WeightPart};
use half::f16;

/// Small deterministic generator (keeps the test free of extra dependencies).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn i8_in(&mut self, lo: i32, hi: i32) -> i8 {
        (lo + (self.next() % (hi - lo + 1) as u32) as i32) as i8
    }
    fn f(&mut self, lo: f32, hi: f32) -> f16 {
        f16::from_f32(lo + (hi - lo) * (self.next() as f32 / u32::MAX as f32))
    }
}

fn d(variant: Variant, m: usize, k: usize, n: usize, group: usize, offsets: bool) -> ProgramDesc {
    ProgramDesc {
        variant,
        m,
        k,
        n,
        group,
        offsets,
    }
}

struct Data {
    wq: Vec<i8>,
    xq: Vec<i8>,
    wf: Vec<f16>,
    xf: Vec<f16>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

impl Data {
    fn new(desc: &ProgramDesc, rng: &mut Lcg) -> Data {
        let (nk, km) = (desc.n * desc.k, desc.k * desc.m);
        let blocks = desc.n * (desc.k / desc.group.max(1));
        let (lo, hi) = if desc.offsets { (0, 63) } else { (-128, 127) };
        Data {
            wq: (0..nk).map(|_| rng.i8_in(lo, hi)).collect(),
            xq: (0..km).map(|_| rng.i8_in(-128, 127)).collect(),
            wf: (0..nk).map(|_| rng.f(-1.0, 1.0)).collect(),
            xf: (0..km).map(|_| rng.f(-1.0, 1.0)).collect(),
            scales: (0..blocks).map(|_| rng.f(0.001, 0.02)).collect(),
            offsets: (0..blocks).map(|_| rng.f(-0.3, 0.0)).collect(),
        }
    }

    fn inputs(&self, desc: &ProgramDesc) -> ProgramInputs<'_> {
        match desc.variant {
            Variant::I8I8 => ProgramInputs::I8I8 {
                w: &self.wq,
                x: &self.xq,
            },
            Variant::W8F16 => ProgramInputs::W8F16 {
                w: &self.wq,
                scales: &self.scales,
                offsets: desc.offsets.then_some(self.offsets.as_slice()),
                x: &self.xf,
            },
            Variant::F16 => ProgramInputs::F16 {
                w: &self.wf,
                x: &self.xf,
            },
            // Covered by `coreml::check`'s reference_i8i8o_is_the_ideal_product (unit test).
            Variant::I8I8O => unreachable!("not in this file's descriptions"),
        }
    }

    /// f64 ground truth of `y = W · X` and a tolerance derived from fp16 rounding.
    fn truth(&self, desc: &ProgramDesc) -> (Vec<f64>, Vec<f64>) {
        let (n, k, m) = (desc.n, desc.k, desc.m);
        let s = f64::from(desc.i8_scale().to_f32());
        let g = desc.group.max(1);
        let w = |r: usize, t: usize| -> f64 {
            let i = r * k + t;
            match desc.variant {
                Variant::I8I8 => f64::from(self.wq[i]) * s,
                Variant::W8F16 => {
                    let b = r * (k / g) + t / g;
                    let o = if desc.offsets {
                        f64::from(self.offsets[b].to_f32())
                    } else {
                        0.0
                    };
                    f64::from(self.wq[i]) * f64::from(self.scales[b].to_f32()) + o
                }
                Variant::F16 => f64::from(self.wf[i].to_f32()),
                Variant::I8I8O => unreachable!("not in this file's descriptions"),
            }
        };
        let x = |t: usize, c: usize| -> f64 {
            match desc.variant {
                Variant::I8I8 => f64::from(self.xq[t * m + c]) * s,
                _ => f64::from(self.xf[t * m + c].to_f32()),
            }
        };
        let u = 2f64.powi(-11);
        let mut y = vec![0.0; n * m];
        let mut tol = vec![0.0; n * m];
        for r in 0..n {
            for c in 0..m {
                let (mut sum, mut abs) = (0.0, 0.0);
                for t in 0..k {
                    let p = w(r, t) * x(t, c);
                    sum += p;
                    abs += p.abs();
                }
                y[r * m + c] = sum;
                // fp16 output rounding + f32 accumulation + (w8f16) the fp16 roundings of mul and add.
                let weights = if desc.variant == Variant::W8F16 {
                    3.0 * u * abs
                } else {
                    0.0
                };
                tol[r * m + c] = u * sum.abs() + k as f64 * 2f64.powi(-24) * abs + weights + 1e-7;
            }
        }
        (y, tol)
    }
}

fn shapes() -> Vec<ProgramDesc> {
    vec![
        d(Variant::I8I8, 64, 64, 16, 0, false),
        d(Variant::I8I8, 128, 96, 7, 0, false),
        d(Variant::W8F16, 64, 128, 12, 32, false),
        d(Variant::W8F16, 64, 256, 9, 32, true),
        d(Variant::W8F16, 128, 64, 5, 16, false),
        d(Variant::F16, 64, 48, 10, 0, false),
        d(Variant::F16, 128, 160, 3, 0, false),
    ]
}

#[test]
fn every_variant_matches_f64_truth() {
    let ex = ReferenceExecutor::new();
    let mut rng = Lcg(2024);
    for desc in shapes() {
        let data = Data::new(&desc, &mut rng);
        ex.prepare(&desc).unwrap();
        let mut out = vec![f16::ZERO; desc.n * desc.m];
        ex.run(&desc, data.inputs(&desc), WeightPart::NONE, &mut out)
            .unwrap();
        let (y, tol) = data.truth(&desc);
        for i in 0..out.len() {
            let got = f64::from(out[i].to_f32());
            assert!(
                (got - y[i]).abs() <= tol[i],
                "{desc} at {i}: {got} vs {} ± {}",
                y[i],
                tol[i]
            );
        }
        // More threads, same bits.
        ex.set_threads(3);
        let mut out3 = vec![f16::ZERO; out.len()];
        ex.run(&desc, data.inputs(&desc), WeightPart::NONE, &mut out3)
            .unwrap();
        assert_eq!(out, out3, "{desc}");
        ex.set_threads(1);
    }
    assert_eq!(ex.prepared(), shapes().len());
}

#[test]
fn i8i8_equals_the_scaled_integer_product() {
    let ex = ReferenceExecutor::new();
    let desc = d(Variant::I8I8, 64, 512, 6, 0, false);
    let data = Data::new(&desc, &mut Lcg(9));
    let mut out = vec![f16::ZERO; desc.n * desc.m];
    ex.run(&desc, data.inputs(&desc), WeightPart::NONE, &mut out)
        .unwrap();
    let s = f64::from(desc.i8_scale().to_f32());
    for r in 0..desc.n {
        for c in 0..desc.m {
            let dot: i64 = (0..desc.k)
                .map(|t| i64::from(data.wq[r * desc.k + t]) * i64::from(data.xq[t * desc.m + c]))
                .sum();
            // The host recovers the product as y · K · s_w · s_x; here y = fp16(dot · s²), exactly.
            assert_eq!(out[r * desc.m + c], f16::from_f64(dot as f64 * s * s));
        }
    }
}

#[test]
fn bad_inputs_are_rejected() {
    let ex = ReferenceExecutor::new();
    let desc = d(Variant::W8F16, 64, 64, 4, 32, true);
    let data = Data::new(&desc, &mut Lcg(1));
    let mut out = vec![f16::ZERO; desc.n * desc.m];
    let bad = |r: Result<(), ExecError>| matches!(r, Err(ExecError::BadInputs(..)));
    let short = &data.wq[1..];
    assert!(bad(ex.run(
        &desc,
        ProgramInputs::W8F16 {
            w: short,
            scales: &data.scales,
            offsets: Some(&data.offsets),
            x: &data.xf
        },
        WeightPart::NONE,
        &mut out
    )));
    assert!(bad(ex.run(
        &desc,
        ProgramInputs::W8F16 {
            w: &data.wq,
            scales: &data.scales,
            offsets: None,
            x: &data.xf
        },
        WeightPart::NONE,
        &mut out
    )));
    assert!(bad(ex.run(
        &desc,
        ProgramInputs::I8I8 {
            w: &data.wq,
            x: &data.xq
        },
        WeightPart::NONE,
        &mut out
    )));
    let mut short_out = vec![f16::ZERO; 3];
    assert!(bad(ex.run(
        &desc,
        data.inputs(&desc),
        WeightPart::NONE,
        &mut short_out
    )));
    assert!(
        ex.run(&desc, data.inputs(&desc), WeightPart::NONE, &mut out)
            .is_ok()
    );
}

#[test]
fn invalid_programs_are_unsupported_and_prepare_is_idempotent() {
    let ex = ReferenceExecutor::new();
    assert!(matches!(
        ex.prepare(&d(Variant::I8I8, 100, 64, 4, 0, false)),
        Err(ExecError::Unsupported(..))
    ));
    assert!(matches!(
        ex.prepare(&d(Variant::W8F16, 64, 48, 4, 32, false)),
        Err(ExecError::Unsupported(..))
    ));
    let ok = d(Variant::F16, 64, 64, 4, 0, false);
    ex.prepare(&ok).unwrap();
    ex.prepare(&ok).unwrap();
    assert_eq!(ex.prepared(), 1);
    let caps = ex.capabilities();
    assert_eq!(caps.variants, Variant::ALL.to_vec());
    assert!(!caps.accelerated);
    assert_eq!(ex.name(), "reference");
}
