//! NMSE of each bridge against ggml's exact dequantisation, and of whole matmuls against f32.
//!
//! Random mode (needs `GGML_COREML_HOST_BIN`, the host's libggml-base, for ggml's own quantisers):
//!     cargo run -p ggml-coreml-bridge --example error_table --release
//! Model mode (every 2-D weight tensor of GGUF files; no host needed):
//!     cargo run -p ggml-coreml-bridge --example error_table --release -- model.gguf [more.gguf …]
//!
//! Bridges: `rowwise` = row-wise int8 (i8i8 variant); `w8f16` = exact block form with fp16
//! scales/offsets as the program dequantises it (`fp16(fp16(fp16(s)·q) + fp16(o))`); `f16` = to_f16.
//! Matmul emulations (N = M = 64): i8i8 = row-wise weights × per-token int8 activations, each
//! operand dequantised by fp16(1/√K) into fp16, f32 accumulation, output rounded to fp16, rescaled
//! by s_w·s_x/fp16(1/√K)²; w8f16/f16 = fp16 weights × fp16 activations, f32 accumulation, fp16
//! output; `cpu` = what ggml-cpu computes (exact weights × Q8_0 / Q8_K activations). All against
//! the exact f32 matmul (exact weights × f32 activations, f64 sums).

#[path = "../tests/common/ggml_host.rs"]
mod ggml_host;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ggml_coreml_bridge::{
    BlockForm, RowwiseInt8, WeightType, block_form_par, dequantize, nmse, quantize_rows_i8,
    rowwise_int8_par, to_f16_par,
};
use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |p| p.get())
}

fn round16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn rowwise_values(r: &RowwiseInt8) -> Vec<f32> {
    r.q.chunks_exact(r.k.max(1))
        .zip(&r.scales)
        .flat_map(|(q, &s)| q.iter().map(move |&q| s * q as f32))
        .collect()
}

/// The w8f16 program's dequantisation in fp16: scale and offset rounded to fp16, each op rounded.
fn w8f16_values(f: &BlockForm) -> Vec<f32> {
    let s = f.scales_f16();
    let o = f.offsets_f16();
    let g = f.group;
    f.q.iter()
        .enumerate()
        .map(|(i, &q)| {
            let gi = i / g;
            let v = round16(s[gi].to_f32() * q as f32);
            match &o {
                Some(o) => round16(v + o[gi].to_f32()),
                None => v,
            }
        })
        .collect()
}

/// Per-bridge weight NMSE against the exact values: (rowwise, w8f16, f16).
fn weight_nmse(t: WeightType, bytes: &[u8], n: usize, k: usize) -> (f64, f64, f64, Vec<f32>) {
    let exact = dequantize(t, bytes, n, k).expect("dequantize");
    let th = threads();
    let rw = rowwise_values(&rowwise_int8_par(t, bytes, n, k, th).expect("rowwise"));
    let w8 = if t == WeightType::F16 {
        f64::NAN
    } else {
        nmse(
            &exact,
            &w8f16_values(&block_form_par(t, bytes, n, k, th).expect("block form")),
        )
    };
    let h: Vec<f32> = to_f16_par(t, bytes, n, k, th)
        .expect("to_f16")
        .iter()
        .map(|h| h.to_f32())
        .collect();
    (nmse(&exact, &rw), w8, nmse(&exact, &h), exact)
}

/// `out[m][n] = Σ_k w[n][k] x[m][k]` in f64.
fn matmul_exact(w: &[f32], x: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for mi in 0..m {
        let xr = &x[mi * k..(mi + 1) * k];
        for ni in 0..n {
            let wr = &w[ni * k..(ni + 1) * k];
            out[mi * n + ni] = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

/// fp16 operands, f32 accumulation, fp16 output.
fn matmul_f16(w: &[f32], x: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    let x16: Vec<f32> = x.iter().map(|&v| round16(v)).collect();
    let mut out = vec![0f32; m * n];
    for mi in 0..m {
        let xr = &x16[mi * k..(mi + 1) * k];
        for ni in 0..n {
            let wr = &w[ni * k..(ni + 1) * k];
            out[mi * n + ni] = round16(wr.iter().zip(xr).map(|(&a, &b)| a * b).sum::<f32>());
        }
    }
    out
}

/// The i8i8 program and its host rescale.
fn matmul_i8i8(rw: &RowwiseInt8, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (rw.n, rw.k);
    let (mut qx, mut sx) = (vec![0i8; m * k], vec![0f32; m]);
    quantize_rows_i8(x, m, k, k, &mut qx, &mut sx);
    let c = round16(1.0 / (k as f32).sqrt());
    let wh: Vec<f32> = rw.q.iter().map(|&q| round16(q as f32 * c)).collect();
    let xh: Vec<f32> = qx.iter().map(|&q| round16(q as f32 * c)).collect();
    let inv = 1.0 / (c * c);
    let mut out = vec![0f32; m * n];
    for mi in 0..m {
        let xr = &xh[mi * k..(mi + 1) * k];
        for ni in 0..n {
            let wr = &wh[ni * k..(ni + 1) * k];
            let y = round16(wr.iter().zip(xr).map(|(&a, &b)| a * b).sum::<f32>());
            out[mi * n + ni] = y * inv * rw.scales[ni] * sx[mi];
        }
    }
    out
}

/// ggml's `quantize_row_q8_0_ref` + dequant: per 32, d = amax/127 stored as fp16, q = roundf(x/d).
fn q8_0_activations(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (xb, yb) in x.chunks(32).zip(out.chunks_mut(32)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = round16(d);
        for (y, &v) in yb.iter_mut().zip(xb) {
            *y = (v * id).round() * dh;
        }
    }
    out
}

/// ggml's `quantize_row_q8_K_ref` + dequant: per 256, iscale = -127/max (signed max), fp32 d.
fn q8_k_activations(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (xb, yb) in x.chunks(256).zip(out.chunks_mut(256)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        let d = 1.0 / iscale;
        for (y, &v) in yb.iter_mut().zip(xb) {
            *y = ((iscale * v).round_ties_even().min(127.0)) * d;
        }
    }
    out
}

fn cpu_activations(t: WeightType, x: &[f32], k: usize) -> Vec<f32> {
    match t {
        WeightType::F16 => x.iter().map(|&v| round16(v)).collect(),
        WeightType::Q4_0 | WeightType::Q8_0 => q8_0_activations(x),
        _ if k % 256 == 0 => q8_k_activations(x),
        _ => q8_0_activations(x),
    }
}

fn gaussian(r: &mut StdRng) -> f32 {
    let (u1, u2): (f32, f32) = (r.random_range(f32::EPSILON..1.0), r.random());
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Activations: uniform [-1, 1] (test-backend-ops) or Gaussian with 4 outlier channels ×30.
fn activations(r: &mut StdRng, llm: bool, m: usize, k: usize) -> Vec<f32> {
    if !llm {
        return (0..m * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
    }
    let outliers: Vec<usize> = (0..4).map(|i| (i * 997 + 13) % k).collect();
    let mut x: Vec<f32> = (0..m * k).map(|_| gaussian(r)).collect();
    for row in x.chunks_exact_mut(k) {
        for &c in &outliers {
            row[c] *= 30.0;
        }
    }
    x
}

struct MatmulNmse {
    i8i8: f64,
    i8i8_vs_cpu: f64,
    w8f16: f64,
    f16: f64,
    cpu: f64,
}

fn matmul_nmse(t: WeightType, bytes: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> MatmulNmse {
    let exact_w = dequantize(t, bytes, n, k).expect("dequantize");
    let reference = matmul_exact(&exact_w, x, n, m, k);
    let cpu = matmul_exact(&exact_w, &cpu_activations(t, x, k), n, m, k);
    let rw = rowwise_int8_par(t, bytes, n, k, 1).expect("rowwise");
    let i8i8 = matmul_i8i8(&rw, x, m);
    let w8 = if t == WeightType::F16 {
        f64::NAN
    } else {
        let w = w8f16_values(&block_form_par(t, bytes, n, k, 1).expect("block form"));
        nmse(&reference, &matmul_f16(&w, x, n, m, k))
    };
    let h: Vec<f32> = to_f16_par(t, bytes, n, k, 1)
        .expect("to_f16")
        .iter()
        .map(|h| h.to_f32())
        .collect();
    MatmulNmse {
        i8i8: nmse(&reference, &i8i8),
        i8i8_vs_cpu: nmse(&cpu, &i8i8),
        w8f16: w8,
        f16: nmse(&reference, &matmul_f16(&h, x, n, m, k)),
        cpu: nmse(&reference, &cpu),
    }
}

fn random_mode() -> Result<(), String> {
    let Some(g) = ggml_host::GgmlBase::open()? else {
        eprintln!(
            "skipped: random mode needs GGML_COREML_HOST_BIN (the host's libggml-base.so for ggml's quantisers)"
        );
        return Ok(());
    };
    let mut r = StdRng::seed_from_u64(42);
    println!(
        "# weights: uniform [-1, 1] quantised by ggml_quantize_chunk ({}), N = 256, K = 4096",
        g.path.display()
    );
    println!("| type | rowwise int8 | w8f16 (fp16 scales) | f16 |");
    println!("|---|---|---|---|");
    let (n, k) = (256, 4096);
    let src: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
    for t in WeightType::ALL {
        let bytes = g.quantize(t, &src, n, k);
        let (rw, w8, h, _) = weight_nmse(t, &bytes, n, k);
        println!("| {t} | {rw:.2e} | {w8:.2e} | {h:.2e} |");
    }

    println!();
    println!("# matmul NMSE vs exact f32 (N = M = 64); i8i8/cpu = i8i8 vs ggml-cpu's own result");
    println!("| type | x | K | i8i8 | w8f16 | f16 | ggml-cpu | i8i8/cpu |");
    println!("|---|---|---|---|---|---|---|---|");
    let (n, m) = (64, 64);
    for t in WeightType::ALL {
        for llm in [false, true] {
            for k in [256, 1024, 4096] {
                let w: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let bytes = g.quantize(t, &w, n, k);
                let x = activations(&mut r, llm, m, k);
                let e = matmul_nmse(t, &bytes, n, k, &x, m);
                println!(
                    "| {t} | {} | {k} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} |",
                    if llm { "llm-like" } else { "uniform" },
                    e.i8i8,
                    e.w8f16,
                    e.f16,
                    e.cpu,
                    e.i8i8_vs_cpu
                );
            }
        }
    }
    Ok(())
}

/// A GGUF tensor: name, ggml type id, dims (ne0 first), absolute data offset.
struct TensorInfo {
    name: String,
    type_id: u32,
    dims: Vec<u64>,
    offset: u64,
}

/// Reads the GGUF header and tensor table (v2/v3, little-endian).
fn read_gguf(path: &Path) -> Result<Vec<TensorInfo>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rd = GgufReader { f: &mut f };
    if rd.bytes(4)? != b"GGUF" {
        return Err(format!("{}: not a GGUF file", path.display()));
    }
    let version = rd.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} not supported"));
    }
    let (n_tensors, n_kv) = (rd.u64()?, rd.u64()?);
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = rd.string()?;
        let ty = rd.u32()?;
        if key == "general.alignment" && ty == 4 {
            alignment = rd.u32()? as u64;
        } else {
            rd.skip_value(ty)?;
        }
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = rd.string()?;
        let nd = rd.u32()?;
        let dims = (0..nd).map(|_| rd.u64()).collect::<Result<Vec<_>, _>>()?;
        let type_id = rd.u32()?;
        let offset = rd.u64()?;
        infos.push(TensorInfo {
            name,
            type_id,
            dims,
            offset,
        });
    }
    let pos = rd.f.stream_position().map_err(|e| e.to_string())?;
    let data = pos.div_ceil(alignment) * alignment;
    for t in &mut infos {
        t.offset += data;
    }
    Ok(infos)
}

struct GgufReader<'a> {
    f: &'a mut std::fs::File,
}

impl GgufReader<'_> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        self.f
            .read_exact(&mut b)
            .map_err(|e| format!("GGUF truncated: {e}"))?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(format!("GGUF string of {n} bytes"));
        }
        Ok(String::from_utf8_lossy(&self.bytes(n as usize)?).into_owned())
    }
    fn skip(&mut self, n: u64) -> Result<(), String> {
        self.f
            .seek(SeekFrom::Current(n as i64))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn skip_value(&mut self, ty: u32) -> Result<(), String> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string().map(|_| ()),
            9 => {
                let (inner, count) = (self.u32()?, self.u64()?);
                for _ in 0..count {
                    self.skip_value(inner)?;
                }
                Ok(())
            }
            _ => Err(format!("unknown GGUF value type {ty}")),
        }
    }
}

#[derive(Default)]
struct Agg {
    count: usize,
    norm: f64,
    e_rw: f64,
    e_w8: f64,
    w8_norm: f64,
    e_h: f64,
    mm_u: f64,
    mm_l: f64,
}

impl Agg {
    fn add(&mut self, sq: f64, rw: f64, w8: f64, h: f64, mu: f64, ml: f64) {
        self.count += 1;
        self.norm += sq;
        self.e_rw += rw * sq;
        self.e_h += h * sq;
        if !w8.is_nan() {
            self.e_w8 += w8 * sq;
            self.w8_norm += sq;
        }
        self.mm_u += mu;
        self.mm_l += ml;
    }
}

fn ggml_type_name(id: u32) -> String {
    match id {
        0 => "f32".into(),
        3 => "q4_1".into(),
        6 => "q5_0".into(),
        7 => "q5_1".into(),
        10 => "q2_K".into(),
        11 => "q3_K".into(),
        30 => "bf16".into(),
        id => WeightType::from_ggml(id).map_or_else(|| format!("type {id}"), |t| t.name().into()),
    }
}

fn model_mode(path: &Path) -> Result<(), String> {
    let infos = read_gguf(path)?;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    println!(
        "# {name}: per-tensor weight NMSE vs exact dequantisation; i8i8 matmul on the first ≤ 64 rows, M = 16"
    );
    println!(
        "| tensor | type | N×K | rowwise | w8f16 | f16 | i8i8 (uniform x) | i8i8 (llm-like x) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Aggregates per type and overall, weighted by Σ w² (so each equals the NMSE of its tensors
    // concatenated); matmul NMSEs are plain means over tensors.
    let mut aggs: std::collections::BTreeMap<&'static str, Agg> = Default::default();
    let mut skipped: std::collections::BTreeMap<String, usize> = Default::default();
    let mut r = StdRng::seed_from_u64(7);
    for t in &infos {
        let Some(wt) = WeightType::from_ggml(t.type_id) else {
            if t.dims.len() >= 2 {
                *skipped.entry(ggml_type_name(t.type_id)).or_default() += 1;
            }
            continue;
        };
        if t.dims.len() < 2 || t.dims[2..].iter().any(|&d| d != 1) {
            *skipped.entry(format!("{}-D", t.dims.len())).or_default() += 1;
            continue;
        }
        let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
        let len = wt.tensor_bytes(n, k).map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(t.offset))
            .map_err(|e| e.to_string())?;
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes)
            .map_err(|e| format!("{}: {e}", t.name))?;
        let (rw, w8, h, exact) = weight_nmse(wt, &bytes, n, k);
        let sq: f64 = exact.iter().map(|&v| v as f64 * v as f64).sum();
        let rows = n.min(64);
        let sub = &bytes[..rows * wt.row_bytes(k).map_err(|e| e.to_string())?];
        let xu = activations(&mut r, false, 16, k);
        let xl = activations(&mut r, true, 16, k);
        let mu = matmul_nmse(wt, sub, rows, k, &xu, 16).i8i8;
        let ml = matmul_nmse(wt, sub, rows, k, &xl, 16).i8i8;
        for key in [wt.name(), "all"] {
            aggs.entry(key).or_default().add(sq, rw, w8, h, mu, ml);
        }
        println!(
            "| {} | {wt} | {n}×{k} | {rw:.2e} | {w8:.2e} | {h:.2e} | {mu:.2e} | {ml:.2e} |",
            t.name
        );
    }
    for (key, a) in &aggs {
        println!(
            "| **{key} ({} tensors)** | | | **{:.2e}** | **{:.2e}** | **{:.2e}** | **{:.2e}** (mean) | **{:.2e}** (mean) |",
            a.count,
            a.e_rw / a.norm,
            if a.w8_norm > 0.0 {
                a.e_w8 / a.w8_norm
            } else {
                f64::NAN
            },
            a.e_h / a.norm,
            a.mm_u / a.count as f64,
            a.mm_l / a.count as f64
        );
    }
    if !skipped.is_empty() {
        let list: Vec<String> = skipped.iter().map(|(t, c)| format!("{c} × {t}")).collect();
        println!(
            "\nmatrices not handled by the bridge (other types stay on the host): {}",
            list.join(", ")
        );
    }
    println!();
    Ok(())
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let result = if paths.is_empty() {
        random_mode()
    } else {
        paths.iter().try_for_each(|p| model_mode(Path::new(p)))
    };
    if let Err(e) = result {
        eprintln!("error_table: {e}");
        std::process::exit(1);
    }
}
