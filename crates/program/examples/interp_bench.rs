//! Times the reference interpreter on one program: `cargo run --release -p ggml-coreml-program
//! --example interp_bench -- [variant] [m] [k] [n] [threads]` (default i8i8 512 640 2048 1).

use std::time::Instant;

use ggml_coreml_program::{
    DType, Interpreter, ProgramDesc, TensorRef, Variant, emit_model, input_specs,
};
use half::f16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let variant = a
        .first()
        .and_then(|s| Variant::parse(s))
        .unwrap_or(Variant::I8I8);
    let (m, k, n, threads) = (arg(1, 512), arg(2, 640), arg(3, 2048), arg(4, 1));
    let group = if variant == Variant::W8F16 { 32 } else { 0 };
    let desc = ProgramDesc {
        variant,
        m,
        k,
        n,
        group,
        offsets: false,
    };
    let it = Interpreter::new(&emit_model(&desc)?)?;
    let specs = input_specs(&desc);
    let i8s: Vec<Vec<i8>> = specs
        .iter()
        .map(|s| {
            (0..s.elements())
                .map(|i| (i * 31 % 255) as u8 as i8)
                .collect()
        })
        .collect();
    let f16s: Vec<Vec<f16>> = specs
        .iter()
        .map(|s| {
            (0..s.elements())
                .map(|i| f16::from_f32((i % 17) as f32 / 64.0))
                .collect()
        })
        .collect();
    let inputs: Vec<(&str, TensorRef<'_>)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| match s.dtype {
            DType::Int8 => (s.name, TensorRef::Int8(&i8s[i])),
            _ => (s.name, TensorRef::Float16(&f16s[i])),
        })
        .collect();
    let mut out = vec![f16::ZERO; it.output_len()];
    it.run_into(&inputs, threads, &mut out)?;
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        it.run_into(&inputs, threads, &mut out)?;
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let gops = 2.0 * (m * k * n) as f64 / s / 1e9;
    println!(
        "{desc} threads={threads}: {:.2} ms/run, {gops:.1} GOP/s",
        s * 1e3
    );
    Ok(())
}
