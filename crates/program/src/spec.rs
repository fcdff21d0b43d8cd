//! Input and output tensors of each program variant: names, element types, shapes.
//!
//! One source of truth for the emitter (model description and function signature), the interpreter
//! tests and the Apple executor (which builds one array per input with exactly these shapes).

use crate::desc::{ProgramDesc, Variant};
use crate::proto::specification::array_feature_type::ArrayDataType;
use crate::proto::specification::mil_spec::DataType;

/// Rank of every program tensor. Rank 4 `[1, 1, rows, cols]` is the layout Draw Things ships on the
/// ANE (BC1S-like, innermost axis contiguous); the bytes are the same as the row-major 2-D array.
pub const PROGRAM_RANK: usize = 4;

/// Element types that appear in our programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Int8,
    Float16,
    Int32,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Int8 => "int8",
            DType::Float16 => "fp16",
            DType::Int32 => "int32",
            DType::Bool => "bool",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::Int8 | DType::Bool => 1,
            DType::Float16 => 2,
            DType::Int32 => 4,
        }
    }

    pub(crate) fn mil(self) -> DataType {
        match self {
            DType::Int8 => DataType::Int8,
            DType::Float16 => DataType::Float16,
            DType::Int32 => DataType::Int32,
            DType::Bool => DataType::Bool,
        }
    }

    pub(crate) fn from_mil(code: i32) -> Option<DType> {
        match DataType::try_from(code).ok()? {
            DataType::Int8 => Some(DType::Int8),
            DataType::Float16 => Some(DType::Float16),
            DataType::Int32 => Some(DType::Int32),
            DataType::Bool => Some(DType::Bool),
            _ => None,
        }
    }

    /// Model I/O array type; only int8 and fp16 are model inputs/outputs here.
    pub(crate) fn array(self) -> Option<ArrayDataType> {
        match self {
            DType::Int8 => Some(ArrayDataType::Int8),
            DType::Float16 => Some(ArrayDataType::Float16),
            DType::Int32 => Some(ArrayDataType::Int32),
            DType::Bool => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One program input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }
}

fn t(name: &'static str, dtype: DType, rows: usize, cols: usize) -> TensorSpec {
    TensorSpec {
        name,
        dtype,
        shape: vec![1, 1, rows, cols],
    }
}

/// Inputs of the program for `desc`, in signature order.
pub fn input_specs(desc: &ProgramDesc) -> Vec<TensorSpec> {
    let (n, k, m) = (desc.n, desc.k, desc.m);
    match desc.variant {
        Variant::I8I8 => vec![t("w", DType::Int8, n, k), t("x", DType::Int8, k, m)],
        Variant::W8F16 => {
            let blocks = k / desc.group.max(1);
            let mut v = vec![
                t("w", DType::Int8, n, k),
                t("scales", DType::Float16, n, blocks),
            ];
            if desc.offsets {
                v.push(t("offsets", DType::Float16, n, blocks));
            }
            v.push(t("x", DType::Float16, k, m));
            v
        }
        Variant::F16 => vec![t("w", DType::Float16, n, k), t("x", DType::Float16, k, m)],
        Variant::I8I8O => {
            let c = desc.group;
            vec![
                t("w", DType::Int8, n, k),
                t("x", DType::Int8, k, m),
                t("wo", DType::Int8, n, c),
                t("xo", DType::Float16, c, m),
                t("t", DType::Float16, 1, m),
            ]
        }
    }
}

/// The single output `y`, fp16 `[1, 1, N, Mp]`.
pub fn output_spec(desc: &ProgramDesc) -> TensorSpec {
    t("y", DType::Float16, desc.n, desc.m)
}
