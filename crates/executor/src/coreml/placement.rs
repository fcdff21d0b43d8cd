//! The placement verdict from a compute plan: which device CoreML prefers for each program operation.
//!
//! The Apple side walks `MLComputePlan.modelStructure.program.functions["main"].block.operations` and
//! fills a [`PlanReport`]; the verdict is pure so Linux tests it.

use std::fmt;

/// Preferred device of one operation (`MLComputePlanDeviceUsage.preferredComputeDevice`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    NeuralEngine,
    Gpu,
    Cpu,
    /// A device class this code does not know.
    Other,
    /// No usage reported (e.g. `const`, which runs nowhere).
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

/// Operators that must prefer the Neural Engine for a program to be accepted.
pub const MUST_BE_ON_ANE: &[&str] = &["matmul", "dequantize"];

/// The plan of one program's main function.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanReport {
    pub ops: Vec<OpPlacement>,
}

impl PlanReport {
    /// `Ok` when every matmul and dequantize prefers the Neural Engine (and there is a matmul at all);
    /// otherwise why not, naming the operations and their devices.
    pub fn verdict(&self) -> Result<(), String> {
        if !self.ops.iter().any(|o| o.base_name() == "matmul") {
            return Err(format!("no matmul in the compute plan ({self})"));
        }
        let off: Vec<String> = self
            .ops
            .iter()
            .filter(|o| {
                MUST_BE_ON_ANE.contains(&o.base_name().as_str()) && o.device != Device::NeuralEngine
            })
            .map(|o| format!("{} on {}", o.op, o.device.name()))
            .collect();
        if off.is_empty() {
            Ok(())
        } else {
            Err(format!("{} ({self})", off.join(", ")))
        }
    }
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ops
            .iter()
            .filter(|o| o.device != Device::None)
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

    fn op(op: &str, device: Device) -> OpPlacement {
        OpPlacement {
            op: op.into(),
            device,
            cost: Some(0.5),
        }
    }

    #[test]
    fn all_on_ane_passes() {
        let p = PlanReport {
            ops: vec![
                op("const", Device::None),
                op("ios17.dequantize", Device::NeuralEngine),
                op("ios18.matmul", Device::NeuralEngine),
            ],
        };
        assert_eq!(p.verdict(), Ok(()));
        assert_eq!(p.to_string(), "dequantize:ane:0.50 matmul:ane:0.50");
    }

    #[test]
    fn matmul_on_cpu_is_refused_with_the_reason() {
        let p = PlanReport {
            ops: vec![
                op("dequantize", Device::NeuralEngine),
                op("ios18.matmul", Device::Cpu),
            ],
        };
        let why = p.verdict().unwrap_err();
        assert!(why.starts_with("ios18.matmul on cpu"), "{why}");
    }

    #[test]
    fn dequantize_off_ane_is_refused_and_other_ops_are_not_judged() {
        let p = PlanReport {
            ops: vec![
                op("dequantize", Device::Gpu),
                op("reshape", Device::Cpu),
                op("MatMul", Device::NeuralEngine),
            ],
        };
        assert!(p.verdict().unwrap_err().contains("dequantize on gpu"));
        let p = PlanReport {
            ops: vec![
                op("reshape", Device::Cpu),
                op("matmul", Device::NeuralEngine),
            ],
        };
        assert_eq!(p.verdict(), Ok(()));
    }

    #[test]
    fn a_plan_without_matmul_is_refused() {
        assert!(PlanReport::default().verdict().is_err());
        let p = PlanReport {
            ops: vec![op("dequantize", Device::NeuralEngine)],
        };
        assert!(p.verdict().unwrap_err().contains("no matmul"));
    }
}
