//! A small MIL program builder over the protobuf types: inputs, consts, ops, one output.
//!
//! It writes what coremltools writes for the same program: every parameter is its own `const` op
//! with `name` and `val` attributes, every op carries a `name` attribute, every output a full tensor
//! type. Consts of 10 or more int8/uint8/fp16 elements go to blob storage (`weights/weight.bin`),
//! smaller ones inline, the same rule coremltools applies.

use half::f16;

use crate::blob::{BlobDType, BlobEntry, BlobWriter};
use crate::error::ProgramError;
use crate::proto::specification::mil_spec::{
    self as mil, DataType, argument, dimension, tensor_value, value, value_type,
};
use crate::proto::specification::{
    self as spec, ArrayFeatureType, FeatureDescription, FeatureType, Metadata, ModelDescription,
    array_feature_type, feature_type,
};
use crate::spec::{DType, TensorSpec};

/// Where a package keeps its weights; the name CoreML resolves inside the package.
pub const WEIGHTS_FILE: &str = "@model_path/weights/weight.bin";

/// Fewest elements a const needs to be stored in the blob file instead of inline.
pub const BLOB_MIN_ELEMENTS: usize = 10;

/// Data of a const tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstData {
    Int8(Vec<i8>),
    Float16(Vec<f16>),
    Int32(Vec<i32>),
    Bool(Vec<bool>),
}

impl ConstData {
    pub fn dtype(&self) -> DType {
        match self {
            ConstData::Int8(_) => DType::Int8,
            ConstData::Float16(_) => DType::Float16,
            ConstData::Int32(_) => DType::Int32,
            ConstData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ConstData::Int8(v) => v.len(),
            ConstData::Float16(v) => v.len(),
            ConstData::Int32(v) => v.len(),
            ConstData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blob element type and little-endian bytes, when this kind of const may live in blob storage.
    fn blob_bytes(&self) -> Option<(BlobDType, Vec<u8>)> {
        match self {
            ConstData::Int8(v) => Some((BlobDType::Int8, v.iter().map(|&x| x as u8).collect())),
            ConstData::Float16(v) => Some((
                BlobDType::Float16,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )),
            _ => None,
        }
    }

    /// Inline encoding: fp16 and int8 as raw `bytes`, int32 as `ints`, bool as `bools`.
    fn tensor_value(&self) -> mil::TensorValue {
        use tensor_value::{RepeatedBools, RepeatedBytes, RepeatedInts, Value};
        let v = match self {
            ConstData::Int8(v) => Value::Bytes(RepeatedBytes {
                values: v.iter().map(|&x| x as u8).collect(),
            }),
            ConstData::Float16(v) => Value::Bytes(RepeatedBytes {
                values: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }),
            ConstData::Int32(v) => Value::Ints(RepeatedInts { values: v.clone() }),
            ConstData::Bool(v) => Value::Bools(RepeatedBools { values: v.clone() }),
        };
        mil::TensorValue { value: Some(v) }
    }
}

/// A MIL tensor type; `shape` empty = scalar (rank 0).
pub fn tensor_type(dtype: DataType, shape: &[usize]) -> mil::ValueType {
    mil::ValueType {
        r#type: Some(value_type::Type::TensorType(mil::TensorType {
            data_type: dtype as i32,
            rank: shape.len() as i64,
            dimensions: shape
                .iter()
                .map(|&d| mil::Dimension {
                    dimension: Some(dimension::Dimension::Constant(
                        dimension::ConstantDimension { size: d as u64 },
                    )),
                })
                .collect(),
            attributes: Default::default(),
        })),
    }
}

fn string_value(s: &str) -> mil::Value {
    mil::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(DataType::String, &[])),
        value: Some(value::Value::ImmediateValue(value::ImmediateValue {
            value: Some(value::immediate_value::Value::Tensor(mil::TensorValue {
                value: Some(tensor_value::Value::Strings(
                    tensor_value::RepeatedStrings {
                        values: vec![s.to_string()],
                    },
                )),
            })),
        })),
    }
}

fn named(name: &str, ty: mil::ValueType) -> mil::NamedValueType {
    mil::NamedValueType {
        name: name.to_string(),
        r#type: Some(ty),
    }
}

fn feature(spec: &TensorSpec) -> Result<FeatureDescription, ProgramError> {
    let dt = spec.dtype.array().ok_or_else(|| {
        ProgramError::InvalidDesc(format!("{} cannot be a model input or output", spec.dtype))
    })?;
    Ok(FeatureDescription {
        name: spec.name.to_string(),
        short_description: String::new(),
        r#type: Some(FeatureType {
            r#type: Some(feature_type::Type::MultiArrayType(ArrayFeatureType {
                shape: spec.shape.iter().map(|&d| d as i64).collect(),
                data_type: dt as i32,
            })),
            is_optional: false,
        }),
    })
}

/// A program being built, plus the blob storage its large consts go to.
pub struct ProgramBuilder {
    spec_version: i32,
    opset: String,
    inputs: Vec<TensorSpec>,
    ops: Vec<mil::Operation>,
    types: std::collections::HashMap<String, (DType, Vec<usize>)>,
    blobs: BlobWriter,
    metadata: Vec<(String, String)>,
}

/// A finished program: the model protobuf and, when a const needed it, the `weight.bin` bytes.
#[derive(Clone, Debug)]
pub struct BuiltProgram {
    pub model: spec::Model,
    pub weights: Option<Vec<u8>>,
    pub blobs: Vec<BlobEntry>,
}

impl ProgramBuilder {
    /// `spec_version` is `Model.specificationVersion`, `opset` the function's opset (e.g. `CoreML9`).
    pub fn new(spec_version: i32, opset: &str) -> ProgramBuilder {
        ProgramBuilder {
            spec_version,
            opset: opset.to_string(),
            inputs: Vec::new(),
            ops: Vec::new(),
            types: Default::default(),
            blobs: BlobWriter::new(),
            metadata: Vec::new(),
        }
    }

    /// A `userDefined` metadata entry of the model description.
    pub fn metadata(&mut self, key: &str, value: &str) {
        self.metadata.push((key.to_string(), value.to_string()));
    }

    fn define(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
    ) -> Result<String, ProgramError> {
        if self
            .types
            .insert(name.to_string(), (dtype, shape.to_vec()))
            .is_some()
        {
            return Err(ProgramError::Malformed(format!(
                "variable {name} defined twice"
            )));
        }
        Ok(name.to_string())
    }

    /// Type of a defined variable.
    pub fn type_of(&self, name: &str) -> Result<(DType, Vec<usize>), ProgramError> {
        self.types
            .get(name)
            .cloned()
            .ok_or_else(|| ProgramError::Malformed(format!("variable {name} is not defined")))
    }

    /// A function input (and model input of the same name and shape).
    pub fn input(&mut self, spec: TensorSpec) -> Result<String, ProgramError> {
        let name = self.define(spec.name, spec.dtype, &spec.shape)?;
        self.inputs.push(spec);
        Ok(name)
    }

    /// A `const` op. `shape` empty = scalar.
    pub fn constant(
        &mut self,
        name: &str,
        shape: &[usize],
        data: ConstData,
    ) -> Result<String, ProgramError> {
        let elements: usize = shape.iter().product();
        if data.len() != elements {
            return Err(ProgramError::Malformed(format!(
                "const {name}: {} values for shape {shape:?}",
                data.len()
            )));
        }
        let dtype = data.dtype();
        let ty = tensor_type(dtype.mil(), shape);
        let val = match data.blob_bytes() {
            Some((bdt, bytes)) if !shape.is_empty() && elements >= BLOB_MIN_ELEMENTS => {
                let offset = self.blobs.add(bdt, &bytes)?;
                value::Value::BlobFileValue(value::BlobFileValue {
                    file_name: WEIGHTS_FILE.to_string(),
                    offset,
                })
            }
            _ => value::Value::ImmediateValue(value::ImmediateValue {
                value: Some(value::immediate_value::Value::Tensor(data.tensor_value())),
            }),
        };
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("name".to_string(), string_value(name));
        attributes.insert(
            "val".to_string(),
            mil::Value {
                doc_string: String::new(),
                r#type: Some(ty.clone()),
                value: Some(val),
            },
        );
        self.ops.push(mil::Operation {
            r#type: "const".to_string(),
            inputs: Default::default(),
            outputs: vec![named(name, ty)],
            blocks: Vec::new(),
            attributes,
        });
        self.define(name, dtype, shape)
    }

    /// A string const (parameters such as `cast`'s `dtype`).
    pub fn string(&mut self, name: &str, v: &str) -> Result<String, ProgramError> {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("name".to_string(), string_value(name));
        attributes.insert("val".to_string(), string_value(v));
        self.ops.push(mil::Operation {
            r#type: "const".to_string(),
            inputs: Default::default(),
            outputs: vec![named(name, tensor_type(DataType::String, &[]))],
            blocks: Vec::new(),
            attributes,
        });
        // Strings are never tensors of the program; record them as a scalar placeholder.
        self.define(name, DType::Bool, &[])
    }

    pub fn scalar_f16(&mut self, name: &str, v: f16) -> Result<String, ProgramError> {
        self.constant(name, &[], ConstData::Float16(vec![v]))
    }

    pub fn scalar_bool(&mut self, name: &str, v: bool) -> Result<String, ProgramError> {
        self.constant(name, &[], ConstData::Bool(vec![v]))
    }

    pub fn ints(&mut self, name: &str, v: &[i32]) -> Result<String, ProgramError> {
        self.constant(name, &[v.len()], ConstData::Int32(v.to_vec()))
    }

    /// An op with named variable arguments and one output of the given type.
    pub fn op(
        &mut self,
        op_type: &str,
        name: &str,
        args: &[(&str, &str)],
        out_dtype: DType,
        out_shape: &[usize],
    ) -> Result<String, ProgramError> {
        let mut inputs = std::collections::BTreeMap::new();
        for &(param, var) in args {
            self.type_of(var)?;
            let arg = mil::Argument {
                arguments: vec![argument::Binding {
                    binding: Some(argument::binding::Binding::Name(var.to_string())),
                }],
            };
            if inputs.insert(param.to_string(), arg).is_some() {
                return Err(ProgramError::Malformed(format!(
                    "op {name}: parameter {param} given twice"
                )));
            }
        }
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("name".to_string(), string_value(name));
        self.ops.push(mil::Operation {
            r#type: op_type.to_string(),
            inputs,
            outputs: vec![named(name, tensor_type(out_dtype.mil(), out_shape))],
            blocks: Vec::new(),
            attributes,
        });
        self.define(name, out_dtype, out_shape)
    }

    /// Finishes with `output` as the single function and model output.
    pub fn finish(self, output: &str) -> Result<BuiltProgram, ProgramError> {
        let (dtype, shape) = self.type_of(output)?;
        let out_spec = TensorSpec {
            name: "",
            dtype,
            shape,
        };
        let mut out_feature = feature(&out_spec)?;
        out_feature.name = output.to_string();
        let inputs = self
            .inputs
            .iter()
            .map(|s| named(s.name, tensor_type(s.dtype.mil(), &s.shape)))
            .collect();
        let block = mil::Block {
            inputs: Vec::new(),
            outputs: vec![output.to_string()],
            operations: self.ops,
            attributes: Default::default(),
        };
        let function = mil::Function {
            inputs,
            opset: self.opset.clone(),
            block_specializations: [(self.opset.clone(), block)].into_iter().collect(),
            attributes: Default::default(),
        };
        let program = mil::Program {
            version: 1,
            functions: [("main".to_string(), function)].into_iter().collect(),
            doc_string: String::new(),
            attributes: Default::default(),
        };
        let metadata = (!self.metadata.is_empty()).then(|| Metadata {
            user_defined: self.metadata.into_iter().collect(),
            ..Default::default()
        });
        let description = ModelDescription {
            input: self.inputs.iter().map(feature).collect::<Result<_, _>>()?,
            output: vec![out_feature],
            metadata,
            ..Default::default()
        };
        let model = spec::Model {
            specification_version: self.spec_version,
            description: Some(description),
            is_updatable: false,
            r#type: Some(spec::model::Type::MlProgram(program)),
        };
        let blobs = self.blobs.entries().to_vec();
        let weights = (!self.blobs.is_empty()).then(|| self.blobs.finish());
        Ok(BuiltProgram {
            model,
            weights,
            blobs,
        })
    }
}

/// Keep the generated enum path reachable for callers matching model I/O types.
pub use array_feature_type::ArrayDataType;
