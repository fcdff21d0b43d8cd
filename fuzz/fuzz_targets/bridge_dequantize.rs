//! Arbitrary type id, shape and bytes into `dequantize_row` / `dequantize`: errors, never panics,
//! and row by row equals the whole tensor.
#![no_main]

use ggml_coreml_bridge::{WeightType, dequantize, dequantize_ggml, dequantize_row};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let type_id = data[0] as u32 % 16;
    let bytes = &data[3..];
    // Mostly consistent shapes (n from the byte count), sometimes off by one element or row.
    let block = WeightType::from_ggml(type_id).map_or(32, |t| t.block_len());
    let k = (data[1] % 9) as usize * block + usize::from(data[2] & 0x80 != 0);
    let n = match WeightType::from_ggml(type_id).map(|t| t.row_bytes(k)) {
        Some(Ok(row)) if row > 0 => bytes.len() / row + usize::from(data[2] & 0x40 != 0),
        _ => data[2] as usize % 4,
    };
    let _ = dequantize_ggml(type_id, bytes, n, k);
    let Some(t) = WeightType::from_ggml(type_id) else {
        return;
    };
    let mut out = vec![0f32; k];
    let _ = dequantize_row(t, bytes, &mut out);
    let _ = dequantize_row(
        t,
        bytes.get(..bytes.len().min(t.block_bytes())).unwrap_or(&[]),
        &mut out,
    );
    if let Ok(all) = dequantize(t, bytes, n, k) {
        assert_eq!(all.len(), n * k);
        let row = t.row_bytes(k).unwrap();
        for (i, want) in all.chunks(k.max(1)).enumerate().take(n) {
            dequantize_row(t, &bytes[i * row..(i + 1) * row], &mut out).unwrap();
            assert!(
                want.iter()
                    .zip(&out)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }
});
