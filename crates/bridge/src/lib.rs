//! The quantisation bridge: ggml weight blocks to the forms the ANE programs take, and activation
//! quantisation. Pure functions over byte slices; no unsafe.
//!
//! - [`dequantize_row`]: ggml's reference dequantisation, bit-identical to `to_float`.
//! - [`block_form`]: the exact block form (`scale * q (+ offset)` per group) for the `w8f16` variant.
//! - [`rowwise_int8`]: one scale per output row ("8-bit S") for the `i8i8` variant.
//! - [`to_f16`]: fp16 copy of the exact values for the `f16` variant.
//! - [`quantize_rows_i8`]: per-token symmetric int8 activations for the `i8i8` variant.
//! - [`Rotation`]: the randomised block Hadamard rotation along K of the `i8i8r` variant.
//!
//! Every conversion has a `*_par(…, threads)` form; the caller decides the threads. See
//! `docs/quantization.md` for the formats, formulas and measured error and speed.

mod activation;
pub mod blocks;
mod error;
mod form;
mod metrics;
mod outlier;
mod par;
mod rotate;
mod rowwise;
mod weight_type;

pub use activation::{
    abs_max, quantize_row_i8, quantize_rows_i8, quantize_rows_i8_par, try_quantize_rows_i8,
};
pub use error::BridgeError;
pub use form::{BlockForm, block_form, block_form_par, dequantize, dequantize_row};
pub use metrics::{nmse, scale_spread};
pub use outlier::{quantize_rows_i8_split, select_outlier_channels};
pub use rotate::{DEFAULT_MAX_BLOCK, Rotation, SIGN_SEED, rotation_block, sign_at};
pub use rowwise::{
    RowwiseInt8, rowwise_from_block_form, rowwise_int8, rowwise_int8_par, rowwise_int8_rotated_par,
    to_f16, to_f16_par,
};
pub use weight_type::WeightType;

/// Dequantises with `t` the tensor behind `bytes`, after checking it holds `[n, k]`
/// (convenience for callers that hold the type as a ggml id).
pub fn dequantize_ggml(
    type_id: u32,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Result<Vec<f32>, BridgeError> {
    dequantize(WeightType::try_from_ggml(type_id)?, bytes, n, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn type_table() {
        for t in WeightType::ALL {
            assert_eq!(WeightType::from_ggml(t.ggml_id()), Some(t));
            assert_eq!(t.row_bytes(t.block_len() * 3), Ok(3 * t.block_bytes()));
            assert_eq!(t.block_len() % t.group(), 0);
        }
        assert_eq!(WeightType::Q6_K.row_bytes(512), Ok(420));
        for id in [0, 3, 6, 7, 9, 10, 11, 15, 30, 99, u32::MAX] {
            assert_eq!(WeightType::from_ggml(id), None);
            assert_eq!(
                WeightType::try_from_ggml(id),
                Err(BridgeError::UnsupportedType(id))
            );
        }
        let e = WeightType::Q4_K.row_bytes(100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "q4_K: k = 100 is not a multiple of the block length 256"
        );
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&h(0.5));
        for (i, v) in b[2..].iter_mut().enumerate() {
            *v = (i as i8 - 16) as u8;
        }
        b[2] = 0x80; // -128
        let mut y = [0f32; 32];
        dequantize_row(WeightType::Q8_0, &b, &mut y).unwrap();
        assert_eq!(y[0], -64.0);
        assert_eq!(y[31], 7.5);
        let f = block_form(WeightType::Q8_0, &b, 1, 32).unwrap();
        assert_eq!(f.q[0], -128);
        assert_eq!(f.scales, vec![0.5]);
        assert!(f.offsets.is_none());
    }

    #[test]
    fn q4_0_by_hand() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&h(-2.0));
        b[2] = 0xF0; // element 0 = 0 - 8, element 16 = 15 - 8
        let mut y = [0f32; 32];
        dequantize_row(WeightType::Q4_0, &b, &mut y).unwrap();
        assert_eq!((y[0], y[16], y[1]), (16.0, -14.0, 16.0));
        let f = block_form(WeightType::Q4_0, &b, 1, 32).unwrap();
        assert_eq!((f.q[0], f.q[16]), (-8, 7));
    }

    #[test]
    fn q4_k_scale_unpacking() {
        // Sub-block 5: sc = (q[9] & 0xF) | (q[1] >> 6) << 4, m = (q[9] >> 4) | (q[5] >> 6) << 4.
        let mut sc = [0u8; 12];
        sc[9] = 0xA3;
        sc[1] = 0xC0;
        sc[5] = 0x40;
        assert_eq!(blocks::scale_min_k4(5, &sc), (0x33, 0x1A));
        assert_eq!(blocks::scale_min_k4(1, &sc), (0, 0));
    }

    #[test]
    fn f16_rows() {
        let vals = [1.0f32, -0.5, 65504.0, 6e-8];
        let bytes: Vec<u8> = vals.iter().flat_map(|&v| h(v)).collect();
        let mut y = [0f32; 4];
        dequantize_row(WeightType::F16, &bytes, &mut y).unwrap();
        assert_eq!(y[..3], vals[..3]);
        assert_eq!(y[3], f16::from_f32(6e-8).to_f32());
        assert_eq!(
            block_form(WeightType::F16, &bytes, 1, 4),
            Err(BridgeError::NoIntForm("f16"))
        );
        let hh = to_f16(WeightType::F16, &bytes, 2, 2).unwrap();
        assert_eq!(hh[2].to_f32(), 65504.0);
        let r = rowwise_int8(WeightType::F16, &bytes, 2, 2).unwrap();
        assert_eq!(r.q[..2], [127, -64]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let t = WeightType::Q4_K;
        let bytes = vec![0u8; 144 * 2];
        let e = block_form(t, &bytes[..100], 1, 256).unwrap_err();
        assert_eq!(
            e.to_string(),
            "weight tensor: truncated data, got 100 bytes, want 144"
        );
        assert!(matches!(
            block_form(t, &bytes, 1, 256),
            Err(BridgeError::ByteLength { .. })
        ));
        assert!(matches!(
            block_form(t, &bytes, 1, 255),
            Err(BridgeError::KNotMultiple { .. })
        ));
        assert!(matches!(
            rowwise_int8(t, &bytes, 3, 256),
            Err(BridgeError::ByteLength { .. })
        ));
        assert!(to_f16(t, &bytes, usize::MAX, 256).is_err());
        assert!(to_f16(WeightType::F16, &bytes, usize::MAX / 2, 4).is_err());
        let mut y = [0f32; 256];
        assert!(dequantize_row(t, &bytes[..143], &mut y).is_err());
        assert!(dequantize_row(t, &bytes[..144], &mut y[..255]).is_err());
        assert!(dequantize_ggml(3, &bytes, 2, 256).is_err());
        let f = block_form(t, &bytes, 2, 256).unwrap();
        assert!(f.try_dequantize_row(2, &mut y).is_err());
        assert!(f.try_dequantize_row(0, &mut y[..10]).is_err());
        let mut broken = f.clone();
        broken.scales.pop();
        assert!(broken.try_dequantize_row(0, &mut y).is_err());
        assert!(rowwise_from_block_form(&broken).is_err());
        broken.group = 0;
        assert!(broken.check().is_err());
    }

    #[test]
    fn empty_shapes() {
        for t in WeightType::ALL {
            assert_eq!(to_f16(t, &[], 0, t.block_len()).unwrap().len(), 0);
            assert_eq!(rowwise_int8(t, &[], 3, 0).unwrap().scales, vec![0.0; 3]);
            // Zero-width rows: the row count is not bounded by the bytes, and must not abort.
            assert!(rowwise_int8(t, &[], usize::MAX / 2, 0).is_err());
            assert_eq!(
                block_form(WeightType::Q8_0, &[], usize::MAX, 0).map(|f| f.q.len()),
                Ok(0)
            );
            assert_eq!(to_f16(t, &[], usize::MAX, 0).map(|v| v.len()), Ok(0));
            assert_eq!(
                to_f16(t, &[], 0, t.block_len() << 40).map(|v| v.len()),
                Ok(0)
            );
            let huge_k = BlockForm {
                n: 0,
                k: 1 << 40,
                group: 32,
                q: vec![],
                scales: vec![],
                offsets: None,
            };
            assert_eq!(rowwise_from_block_form(&huge_k).map(|r| r.q.len()), Ok(0));
            assert!(scale_spread(&huge_k).is_empty());
        }
    }

    #[test]
    fn parallel_matches_serial() {
        let mut seed = 0x1234_5678_u32;
        let bytes: Vec<u8> = (0..210 * 2 * 7)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed >> 24) as u8
            })
            .collect();
        // Keep d small and finite so values compare with ==.
        let mut bytes = bytes;
        for blk in bytes.chunks_exact_mut(210) {
            blk[208..].copy_from_slice(&h(0.01));
        }
        let t = WeightType::Q6_K;
        for threads in [0, 1, 2, 3, 8] {
            assert_eq!(
                block_form_par(t, &bytes, 7, 512, threads),
                block_form(t, &bytes, 7, 512)
            );
            assert_eq!(
                rowwise_int8_par(t, &bytes, 7, 512, threads),
                rowwise_int8(t, &bytes, 7, 512)
            );
            assert_eq!(
                to_f16_par(t, &bytes, 7, 512, threads),
                to_f16(t, &bytes, 7, 512)
            );
        }
        let f = block_form(t, &bytes, 7, 512).unwrap();
        assert_eq!(rowwise_from_block_form(&f), rowwise_int8(t, &bytes, 7, 512));
    }
}
