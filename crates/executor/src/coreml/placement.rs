//! The placement verdict from a compute plan: which device CoreML prefers for each program operation,
//! and whether the program as a whole runs on the Neural Engine.
//!
//! The Apple side walks `MLComputePlan.modelStructure.program.functions["main"].block.operations` and
//! fills a [`PlanReport`]; the verdict ([`PlanReport::verdict`]) is a pure function of that table, so
//! Linux tests it from recorded plans.
//!
//! The rule (docs/apple.md §3):
//! 1. There is a `matmul`, and every `matmul` prefers the Neural Engine.
//! 2. Every other operation except `const` is judged by its share of the plan's estimated cost
//!    (`MLComputePlanCost.weight`): the shares of operations that do not prefer the Neural Engine add up
//!    to at most [`MAX_OFF_ANE_SHARE`].
//! 3. An operation CoreML reports no device for (`computeDeviceUsageForMLProgramOperation` answers nil:
//!    "could not be determined") counts as on the Neural Engine when it is one CoreML folds into the
//!    neighbouring matmul ([`FOLDABLE`]: `dequantize`, `constexpr_*`, casts and shape-only ops) and the
//!    matmul is on the Neural Engine; any other nil counts against the program with its cost share.
//! 4. An off-Neural-Engine operation without a cost counts as free when it is shape-only ([`SHAPE_ONLY`]:
//!    a `reshape` the CPU does is a view, not work); otherwise the plan cannot be judged and is refused.

use std::fmt;

/// Preferred device of one operation (`MLComputePlanDeviceUsage.preferredComputeDevice`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    NeuralEngine,
    Gpu,
    Cpu,
    /// A device class this code does not know.
    Other,
    /// No usage reported (nil): `const`, which runs nowhere, or an op CoreML folded into another.
    None,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::NeuralEngine => "ane",
            Device::Gpu => "gpu",
            Device::Cpu => "cpu",
            Device::Other => "other",
            Device::None => "-",
        }
    }

    /// Parses [`Device::name`] (recorded plan tables).
    pub fn parse(s: &str) -> Option<Device> {
        Some(match s {
            "ane" => Device::NeuralEngine,
            "gpu" => Device::Gpu,
            "cpu" => Device::Cpu,
            "other" => Device::Other,
            "-" | "nil" => Device::None,
            _ => return None,
        })
    }
}

/// One operation of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct OpPlacement {
    /// `MLModelStructureProgramOperation.operatorName`, e.g. `ios18.matmul` or `matmul`.
    pub op: String,
    pub device: Device,
    /// `MLComputePlanCost.weight` (share of the program's estimated cost, 0–1), when reported.
    pub cost: Option<f64>,
}

impl OpPlacement {
    /// The operator without its opset prefix, lower-case.
    pub fn base_name(&self) -> String {
        self.op
            .rsplit('.')
            .next()
            .unwrap_or(&self.op)
            .to_ascii_lowercase()
    }
}

/// Operators CoreML may fold into the matmul they feed (no device of their own: nil usage is fine).
pub const FOLDABLE: &[&str] = &[
    "dequantize",
    "constexpr_blockwise_shift_scale",
    "constexpr_affine_dequantize",
    "constexpr_lut_to_dense",
    "constexpr_sparse_to_dense",
    "cast",
    "reshape",
    "transpose",
    "expand_dims",
    "squeeze",
];

/// Operators that only change how a tensor is viewed: free wherever they run.
pub const SHAPE_ONLY: &[&str] = &["reshape", "transpose", "expand_dims", "squeeze", "identity"];

/// Largest share of the plan's estimated cost that may run off the Neural Engine.
pub const MAX_OFF_ANE_SHARE: f64 = 0.05;

/// How one operation counts in the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// `const`: runs nowhere.
    Ignored,
    /// Prefers the Neural Engine.
    OnAne,
    /// Nil usage, folded into the matmul.
    Folded,
    /// Off the Neural Engine; counts with its cost share.
    Off,
    /// Off the Neural Engine without a cost, shape-only: counts as free.
    OffFree,
    /// Off the Neural Engine (or nil, not foldable) without a cost: the plan cannot be judged.
    Unjudgeable,
}

impl Judgement {
    pub fn name(self) -> &'static str {
        match self {
            Judgement::Ignored => "ignored",
            Judgement::OnAne => "ane",
            Judgement::Folded => "folded",
            Judgement::Off => "OFF",
            Judgement::OffFree => "off, free",
            Judgement::Unjudgeable => "OFF, no cost",
        }
    }
}

/// The plan of one program's main function.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanReport {
    pub ops: Vec<OpPlacement>,
}

impl PlanReport {
    /// Parses a recorded table: one op per line, `op device [cost]` (`device` as [`Device::name`],
    /// `-` or `nil` for no usage; `cost` a number or `-`). Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<PlanReport, String> {
        let mut ops = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || format!("line {}: {line:?}", i + 1);
            if f.len() < 2 || f.len() > 3 {
                return Err(bad());
            }
            let device = Device::parse(f[1]).ok_or_else(bad)?;
            let cost = match f.get(2) {
                None | Some(&"-") => None,
                Some(c) => Some(c.parse::<f64>().map_err(|_| bad())?),
            };
            ops.push(OpPlacement {
                op: f[0].to_owned(),
                device,
                cost,
            });
        }
        Ok(PlanReport { ops })
    }

    fn matmul_on_ane(&self) -> bool {
        let mut matmuls = self.ops.iter().filter(|o| o.base_name() == "matmul");
        let first = matmuls.next();
        first.is_some_and(|o| o.device == Device::NeuralEngine)
            && matmuls.all(|o| o.device == Device::NeuralEngine)
    }

    /// How each operation counts (same order as `ops`).
    pub fn judgements(&self) -> Vec<Judgement> {
        let ane_matmul = self.matmul_on_ane();
        self.ops
            .iter()
            .map(|o| {
                let base = o.base_name();
                if base == "const" {
                    return Judgement::Ignored;
                }
                match o.device {
                    Device::NeuralEngine => Judgement::OnAne,
                    Device::None if ane_matmul && FOLDABLE.contains(&base.as_str()) => {
                        Judgement::Folded
                    }
                    _ if o.cost.is_some() => Judgement::Off,
                    _ if SHAPE_ONLY.contains(&base.as_str()) => Judgement::OffFree,
                    _ => Judgement::Unjudgeable,
                }
            })
            .collect()
    }

    /// Share of the estimated cost off the Neural Engine (ops without a cost count 0).
    pub fn off_ane_share(&self) -> f64 {
        let j = self.judgements();
        let total: f64 = self
            .ops
            .iter()
            .zip(&j)
            .filter(|(_, j)| **j != Judgement::Ignored)
            .filter_map(|(o, _)| o.cost)
            .sum();
        let off: f64 = self
            .ops
            .iter()
            .zip(&j)
            .filter(|(_, j)| **j == Judgement::Off)
            .filter_map(|(o, _)| o.cost)
            .sum();
        if total > 0.0 { off / total } else { off }
    }

    /// `Ok` when the program runs on the Neural Engine by the rule in the module docs; otherwise why
    /// not, naming the operations and their devices.
    pub fn verdict(&self) -> Result<(), String> {
        if !self.ops.iter().any(|o| o.base_name() == "matmul") {
            return Err(format!("no matmul in the compute plan ({self})"));
        }
        let off_matmul: Vec<String> = self
            .ops
            .iter()
            .filter(|o| o.base_name() == "matmul" && o.device != Device::NeuralEngine)
            .map(|o| format!("{} on {}", o.op, o.device.name()))
            .collect();
        if !off_matmul.is_empty() {
            return Err(format!("{} ({self})", off_matmul.join(", ")));
        }
        let j = self.judgements();
        let unjudged: Vec<String> = self
            .ops
            .iter()
            .zip(&j)
            .filter(|(_, j)| **j == Judgement::Unjudgeable)
            .map(|(o, _)| format!("{} on {} without a cost", o.op, o.device.name()))
            .collect();
        if !unjudged.is_empty() {
            return Err(format!("{} ({self})", unjudged.join(", ")));
        }
        let share = self.off_ane_share();
        if share > MAX_OFF_ANE_SHARE {
            let off: Vec<String> = self
                .ops
                .iter()
                .zip(&j)
                .filter(|(_, j)| **j == Judgement::Off)
                .map(|(o, _)| format!("{} on {}", o.op, o.device.name()))
                .collect();
            return Err(format!(
                "{:.0}% of the estimated cost off the Neural Engine (limit {:.0}%): {} ({self})",
                share * 100.0,
                MAX_OFF_ANE_SHARE * 100.0,
                off.join(", ")
            ));
        }
        Ok(())
    }

    /// The per-operation table (for `GGML_COREML_LOG=debug`): op, device, cost, how it counts.
    pub fn table(&self) -> String {
        let mut s = format!("{:<40} {:<6} {:>6}  counts as\n", "op", "device", "cost");
        for (o, j) in self.ops.iter().zip(self.judgements()) {
            let cost = o.cost.map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"));
            s.push_str(&format!(
                "{:<40} {:<6} {:>6}  {}\n",
                o.op,
                o.device.name(),
                cost,
                j.name()
            ));
        }
        s.push_str(&format!(
            "off the Neural Engine: {:.1}% of the estimated cost; verdict: {}",
            self.off_ane_share() * 100.0,
            match self.verdict() {
                Ok(()) => "ane".to_owned(),
                Err(_) => "refused".to_owned(),
            }
        ));
        s
    }
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ops
            .iter()
            .filter(|o| o.base_name() != "const")
            .map(|o| match o.cost {
                Some(c) => format!("{}:{}:{c:.2}", o.base_name(), o.device.name()),
                None => format!("{}:{}", o.base_name(), o.device.name()),
            })
            .collect();
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(t: &str) -> PlanReport {
        PlanReport::parse(t).unwrap()
    }

    #[test]
    fn all_on_ane_passes() {
        let p = plan("const -\n ios17.dequantize ane 0.5\n ios18.matmul ane 0.5 # the product\n");
        assert_eq!(p.verdict(), Ok(()));
        assert_eq!(p.to_string(), "dequantize:ane:0.50 matmul:ane:0.50");
    }

    #[test]
    fn nil_dequantize_folded_into_an_ane_matmul_passes() {
        // What the review expects CoreML to answer for the w8f16 program: the dequantize has no
        // usage of its own.
        let p = plan(
            "const -\nconst -\nios18.dequantize nil\nios18.matmul ane 0.97\nios18.mul ane 0.03\n",
        );
        assert_eq!(p.verdict(), Ok(()));
        assert_eq!(p.judgements()[2], Judgement::Folded);
        assert!(p.table().contains("folded"), "{}", p.table());
    }

    #[test]
    fn nil_dequantize_next_to_a_cpu_matmul_is_refused() {
        let p = plan("ios18.dequantize nil\nios18.matmul cpu 0.9\n");
        assert!(p.verdict().unwrap_err().starts_with("ios18.matmul on cpu"));
    }

    #[test]
    fn nil_for_a_real_op_counts_against_the_program() {
        // A nil `mul` is not folded: its cost counts as off the Neural Engine.
        let p = plan("matmul ane 0.6\nmul nil 0.4\n");
        let why = p.verdict().unwrap_err();
        assert!(why.contains("40% of the estimated cost"), "{why}");
        // Without a cost it cannot be judged at all.
        let p = plan("matmul ane 0.6\nmul nil\n");
        assert!(p.verdict().unwrap_err().contains("without a cost"));
    }

    #[test]
    fn cpu_placed_reshape_is_accepted_by_its_cost() {
        let p = plan("reshape cpu 0.01\ntranspose cpu -\nmatmul ane 0.98\nreshape cpu 0.01\n");
        assert_eq!(p.verdict(), Ok(()), "{}", p.table());
        assert!((p.off_ane_share() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn expensive_ops_off_the_ane_are_refused() {
        // The old rule judged only matmul and dequantize: a CPU `add` carrying most of the cost passed.
        let p = plan("matmul ane 0.3\nadd cpu 0.5\nmul gpu 0.2\n");
        let why = p.verdict().unwrap_err();
        assert!(why.contains("70%") && why.contains("add on cpu") && why.contains("mul on gpu"));
        let p = plan("dequantize gpu 0.1\nmatmul ane 0.9\n");
        assert!(p.verdict().unwrap_err().contains("dequantize on gpu"));
    }

    #[test]
    fn matmul_on_cpu_or_nil_is_refused_with_the_reason() {
        let p = plan("dequantize ane 0.5\nios18.matmul cpu 0.5\n");
        assert!(p.verdict().unwrap_err().starts_with("ios18.matmul on cpu"));
        let p = plan("ios18.matmul nil 1.0\n");
        assert!(p.verdict().unwrap_err().starts_with("ios18.matmul on -"));
    }

    #[test]
    fn a_plan_without_matmul_is_refused() {
        assert!(PlanReport::default().verdict().is_err());
        let p = plan("dequantize ane 1\n");
        assert!(p.verdict().unwrap_err().contains("no matmul"));
    }

    #[test]
    fn recorded_tables_parse_strictly() {
        assert!(PlanReport::parse("matmul tpu 1\n").is_err());
        assert!(PlanReport::parse("matmul ane x\n").is_err());
        assert!(PlanReport::parse("matmul\n").is_err());
    }
}
