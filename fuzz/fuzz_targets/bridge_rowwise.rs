//! Arbitrary bytes and shape into `rowwise_int8` and `to_f16` (serial and threaded): errors or
//! forms with the documented bounds.
#![no_main]

use ggml_coreml_bridge::{WeightType, rowwise_int8, rowwise_int8_par, to_f16, to_f16_par};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let t = WeightType::ALL[data[0] as usize % WeightType::ALL.len()];
    let blocks = (data[1] % 9) as usize;
    let k = blocks * t.block_len() + usize::from(data[2] & 0x80 != 0);
    let bytes = &data[3..];
    let n = match t.row_bytes(k) {
        Ok(0) | Err(_) => data[2] as usize % 4,
        Ok(row) => bytes.len() / row + usize::from(data[2] & 0x40 != 0),
    };
    let threads = 1 + (data[2] & 3) as usize;
    let rw = rowwise_int8(t, bytes, n, k);
    assert_eq!(rw, rowwise_int8_par(t, bytes, n, k, threads));
    if let Ok(rw) = rw {
        assert_eq!(rw.q.len(), n * k);
        assert_eq!(rw.scales.len(), n);
        assert!(rw.q.iter().all(|&q| q != i8::MIN));
        assert!(rw.scales.iter().all(|&s| s >= 0.0 || s.is_nan()));
    }
    let h = to_f16(t, bytes, n, k);
    let hp = to_f16_par(t, bytes, n, k, threads);
    match (&h, &hp) {
        (Ok(a), Ok(b)) => assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("to_f16 and to_f16_par disagree"),
    }
});
