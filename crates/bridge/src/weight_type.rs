//! The ggml weight types the bridge understands.

use crate::BridgeError;

/// A ggml weight type accepted by the ANE path.
#[allow(non_camel_case_types)] // ggml's own names
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F16,
    Q4_0,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl WeightType {
    /// Every supported type, in ggml id order.
    pub const ALL: [WeightType; 6] = [
        WeightType::F16,
        WeightType::Q4_0,
        WeightType::Q8_0,
        WeightType::Q4_K,
        WeightType::Q5_K,
        WeightType::Q6_K,
    ];

    /// Maps a `ggml_type` id; `None` for types the bridge does not handle.
    pub fn from_ggml(type_id: u32) -> Option<WeightType> {
        match type_id {
            1 => Some(WeightType::F16),
            2 => Some(WeightType::Q4_0),
            8 => Some(WeightType::Q8_0),
            12 => Some(WeightType::Q4_K),
            13 => Some(WeightType::Q5_K),
            14 => Some(WeightType::Q6_K),
            _ => None,
        }
    }

    /// Like [`WeightType::from_ggml`], with an error that names the id.
    pub fn try_from_ggml(type_id: u32) -> Result<WeightType, BridgeError> {
        Self::from_ggml(type_id).ok_or(BridgeError::UnsupportedType(type_id))
    }

    /// The `ggml_type` id.
    pub fn ggml_id(self) -> u32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q8_0 => 8,
            WeightType::Q4_K => 12,
            WeightType::Q5_K => 13,
            WeightType::Q6_K => 14,
        }
    }

    /// ggml's type name (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F16 => "f16",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_K => "q4_K",
            WeightType::Q5_K => "q5_K",
            WeightType::Q6_K => "q6_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            WeightType::F16 => 1,
            WeightType::Q4_0 | WeightType::Q8_0 => 32,
            WeightType::Q4_K | WeightType::Q5_K | WeightType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F16 => 2,
            WeightType::Q4_0 => 18,
            WeightType::Q8_0 => 34,
            WeightType::Q4_K => 144,
            WeightType::Q5_K => 176,
            WeightType::Q6_K => 210,
        }
    }

    /// Bytes of one row of `k` elements (`ggml_row_size`).
    pub fn row_bytes(self, k: usize) -> Result<usize, BridgeError> {
        let block = self.block_len();
        if k % block != 0 {
            return Err(BridgeError::KNotMultiple {
                ty: self.name(),
                k,
                block,
            });
        }
        // k / block * bytes <= 2k for f16 and < k for the quants, so it only overflows for absurd f16 rows.
        (k / block)
            .checked_mul(self.block_bytes())
            .ok_or(BridgeError::TooLarge { n: 1, k })
    }

    /// Bytes of an `[n, k]` tensor, checked for overflow.
    pub fn tensor_bytes(self, n: usize, k: usize) -> Result<usize, BridgeError> {
        self.row_bytes(k)?
            .checked_mul(n)
            .ok_or(BridgeError::TooLarge { n, k })
    }

    /// Scale group along K in the exact block form: one scale (and offset) per `group` elements.
    pub fn group(self) -> usize {
        match self {
            WeightType::F16 => 1,
            WeightType::Q4_0 | WeightType::Q8_0 | WeightType::Q4_K | WeightType::Q5_K => 32,
            WeightType::Q6_K => 16,
        }
    }

    /// Whether the exact block form carries per-group offsets (`-dmin * m`).
    pub fn has_offsets(self) -> bool {
        matches!(self, WeightType::Q4_K | WeightType::Q5_K)
    }

    /// Range of the integer values in the exact block form (inclusive).
    pub fn q_range(self) -> Option<(i8, i8)> {
        match self {
            WeightType::F16 => None,
            WeightType::Q4_0 => Some((-8, 7)),
            WeightType::Q8_0 => Some((-128, 127)),
            WeightType::Q4_K => Some((0, 15)),
            WeightType::Q5_K => Some((0, 31)),
            WeightType::Q6_K => Some((-32, 31)),
        }
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
