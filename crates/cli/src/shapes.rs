//! Which programs a model needs: its MUL_MAT weights (from the GGUF tensor table), their shapes, and the
//! programs of each shape's split plan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ggml_coreml_cache::gguf::{GgmlType, Gguf, TensorInfo};
use ggml_coreml_program::{ProgramDesc, SplitPlan, Variant};

/// Which variants to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantChoice {
    /// The backend's default per weight type: w8f16 for quantised weights, f16 for F16 weights.
    Auto,
    I8i8,
    W8f16,
    F16,
    /// Every variant that can run each weight type.
    All,
}

/// The weight types the backend offloads.
pub const OFFLOADED: [GgmlType; 6] = [
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// How a weight type feeds a variant: (group, offsets, K alignment), or `None` when it cannot.
pub fn variant_params(ty: GgmlType, v: Variant) -> Option<(usize, bool, usize)> {
    let block = ty.block()?.0 as usize;
    match (v, ty) {
        (Variant::F16, GgmlType::F16) => Some((0, false, 1)),
        (Variant::F16, _) | (_, GgmlType::F16) => None,
        (Variant::I8I8, _) => Some((0, false, block)),
        (Variant::W8F16, GgmlType::Q4_0 | GgmlType::Q8_0) => Some((32, false, block)),
        (Variant::W8F16, GgmlType::Q4_K | GgmlType::Q5_K) => Some((32, true, block)),
        (Variant::W8F16, GgmlType::Q6_K) => Some((16, false, block)),
        _ => None,
    }
}

pub fn variants_for(ty: GgmlType, choice: VariantChoice) -> Vec<Variant> {
    let wanted: Vec<Variant> = match choice {
        VariantChoice::Auto if ty == GgmlType::F16 => vec![Variant::F16],
        VariantChoice::Auto => vec![Variant::W8F16],
        VariantChoice::I8i8 => vec![Variant::I8I8],
        VariantChoice::W8f16 => vec![Variant::W8F16],
        VariantChoice::F16 => vec![Variant::F16],
        VariantChoice::All => Variant::ALL.to_vec(),
    };
    wanted
        .into_iter()
        .filter(|&v| variant_params(ty, v).is_some())
        .collect()
}

/// A weight MUL_MAT uses: `[K, N]` of an offloaded type.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub k: usize,
    pub n: usize,
}

/// The MUL_MAT weights of a model: 2-D `*.weight` tensors of an offloaded type. Embedding tables are
/// row lookups (GET_ROWS), not matmuls, except `token_embd.weight` in a model without `output.weight`
/// (tied output), where it is also the output projection.
pub fn matmul_weights(g: &Gguf) -> Vec<Weight> {
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    g.tensors
        .iter()
        .filter(|t| is_matrix(t) && t.name.ends_with(".weight") && OFFLOADED.contains(&t.ty))
        .filter(|t| {
            let embedding = t.name.contains("token_embd")
                || t.name.contains("pos_embd")
                || t.name.contains("token_types");
            !embedding || (tied && t.name == "token_embd.weight")
        })
        .filter_map(|t| {
            let k = usize::try_from(t.dims[0]).ok()?;
            let n = usize::try_from(t.dims[1]).ok()?;
            Some(Weight {
                name: t.name.clone(),
                ty: t.ty,
                k,
                n,
            })
        })
        .collect()
}

/// 2-D, or higher with trailing 1s (3-D expert stacks are MUL_MAT_ID and not offloaded).
fn is_matrix(t: &TensorInfo) -> bool {
    t.dims.len() >= 2 && t.dims[2..].iter().all(|&d| d == 1)
}

/// One row of the shapes table: a (type, K, N) with its tensors and the programs per variant.
#[derive(Clone, Debug)]
pub struct ShapeRow {
    pub ty: GgmlType,
    pub k: usize,
    pub n: usize,
    pub tensors: usize,
    pub example: String,
    /// Per variant: its programs over all M, or why the shape cannot run it.
    pub plans: Vec<(Variant, Result<Vec<ProgramDesc>, String>)>,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub rows: Vec<ShapeRow>,
    /// Every distinct program, sorted.
    pub programs: Vec<ProgramDesc>,
}

/// The shapes of `weights` and the programs each needs for each M in `ms`.
pub fn plan(weights: &[Weight], choice: VariantChoice, ms: &[usize]) -> Plan {
    let mut groups: BTreeMap<(GgmlType, usize, usize), Vec<&Weight>> = BTreeMap::new();
    for w in weights {
        groups.entry((w.ty, w.k, w.n)).or_default().push(w);
    }
    let mut all = BTreeSet::new();
    let mut rows = Vec::new();
    for ((ty, k, n), ws) in groups {
        let mut plans = Vec::new();
        for v in variants_for(ty, choice) {
            let (group, offsets, align) = variant_params(ty, v).expect("filtered by variants_for");
            let mut progs = BTreeSet::new();
            let mut err = None;
            for &m in ms {
                match SplitPlan::new(v, m, k, n, group, offsets, align) {
                    Ok(p) => progs.extend(p.programs()),
                    Err(e) => err = Some(e),
                }
            }
            match err {
                Some(e) => plans.push((v, Err(e))),
                None => {
                    all.extend(progs.iter().copied());
                    plans.push((v, Ok(progs.into_iter().collect())));
                }
            }
        }
        rows.push(ShapeRow {
            ty,
            k,
            n,
            tensors: ws.len(),
            example: ws[0].name.clone(),
            plans,
        });
    }
    Plan {
        rows,
        programs: all.into_iter().collect(),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<6} {:>6} {:>7} {:>7}  {:<7} {:>8}  example",
            "type", "K", "N", "tensors", "variant", "programs"
        )?;
        for r in &self.rows {
            for (i, (v, p)) in r.plans.iter().enumerate() {
                let progs = match p {
                    Ok(p) => p.len().to_string(),
                    Err(e) => format!("skipped: {e}"),
                };
                if i == 0 {
                    writeln!(
                        f,
                        "{:<6} {:>6} {:>7} {:>7}  {:<7} {:>8}  {}",
                        r.ty.to_string(),
                        r.k,
                        r.n,
                        r.tensors,
                        v.name(),
                        progs,
                        r.example
                    )?;
                } else {
                    writeln!(
                        f,
                        "{:<6} {:>6} {:>7} {:>7}  {:<7} {:>8}",
                        "",
                        "",
                        "",
                        "",
                        v.name(),
                        progs
                    )?;
                }
            }
            if r.plans.is_empty() {
                writeln!(
                    f,
                    "{:<6} {:>6} {:>7} {:>7}  (no variant selected)",
                    r.ty.to_string(),
                    r.k,
                    r.n,
                    r.tensors
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_coreml_cache::gguf::write_fixture;

    fn model(tied: bool) -> Gguf {
        let mut tensors: Vec<(&str, &[u64], GgmlType)> = vec![
            ("token_embd.weight", &[256, 1000], GgmlType::Q8_0),
            ("blk.0.attn_norm.weight", &[256], GgmlType::F32),
            ("blk.0.attn_q.weight", &[256, 256], GgmlType::Q4_K),
            ("blk.1.attn_q.weight", &[256, 256], GgmlType::Q4_K),
            ("blk.0.ffn_down.weight", &[512, 256], GgmlType::Q6_K),
            ("blk.0.ffn_gate_exps.weight", &[256, 512, 8], GgmlType::Q4_K),
            ("blk.0.attn_k.weight", &[256, 64], GgmlType::F16),
            ("blk.0.attn_v.weight", &[256, 64], GgmlType(6)),
        ];
        if !tied {
            tensors.push(("output.weight", &[256, 1000], GgmlType::Q6_K));
        }
        let mut v = Vec::new();
        write_fixture(&mut v, &[("general.architecture", "llama")], &tensors).unwrap();
        Gguf::read(std::io::Cursor::new(&v), v.len() as u64).unwrap()
    }

    #[test]
    fn finds_matmul_weights() {
        let names =
            |g: &Gguf| -> Vec<String> { matmul_weights(g).into_iter().map(|w| w.name).collect() };
        let untied = names(&model(false));
        assert!(!untied.contains(&"token_embd.weight".to_owned()));
        assert!(untied.contains(&"output.weight".to_owned()));
        assert!(
            !untied
                .iter()
                .any(|n| n.contains("exps") || n.contains("norm") || n.contains("attn_v"))
        );
        assert_eq!(untied.len(), 5);
        let tied = names(&model(true));
        assert!(tied.contains(&"token_embd.weight".to_owned()));
    }

    #[test]
    fn plans_programs_per_variant() {
        let ws = matmul_weights(&model(false));
        let auto = plan(&ws, VariantChoice::Auto, &[512]);
        // Q4_K 256x256 (2 tensors), Q6_K 512x256, F16 256x64, Q6_K 256x1000: one program each.
        assert_eq!(auto.rows.len(), 4);
        assert_eq!(auto.programs.len(), 4);
        assert!(auto.programs.iter().any(|p| p.variant == Variant::F16));
        let all = plan(&ws, VariantChoice::All, &[512, 128]);
        // 3 quantised shapes x 2 variants + 1 F16 shape, each for 2 M buckets.
        assert_eq!(all.programs.len(), (3 * 2 + 1) * 2);
        assert!(
            all.programs
                .iter()
                .any(|p| p.key() == "w8f16-g32o-m512-k256-n256")
        );
        assert!(
            all.programs
                .iter()
                .any(|p| p.key() == "w8f16-g16-m128-k512-n256")
        );
        let text = all.to_string();
        assert!(text.contains("Q4_K") && text.contains("w8f16"));
    }
}
