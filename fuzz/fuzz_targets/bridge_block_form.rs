//! Arbitrary bytes and shape into `block_form`: errors or a form whose evaluation equals ggml's
//! dequantisation (NaN as NaN) and whose integers stay in the type's range.
#![no_main]

use ggml_coreml_bridge::{
    BlockForm, WeightType, block_form, block_form_par, dequantize, rowwise_from_block_form,
};
use libfuzzer_sys::fuzz_target;

/// Same bits everywhere (NaN scales compare equal to themselves).
fn same_form(a: &BlockForm, b: &BlockForm) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (a.n, a.k, a.group, &a.q) == (b.n, b.k, b.group, &b.q)
        && bits(&a.scales) == bits(&b.scales)
        && a.offsets.as_deref().map(bits) == b.offsets.as_deref().map(bits)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let t = WeightType::ALL[data[0] as usize % WeightType::ALL.len()];
    // Mostly valid shapes: k a small number of blocks, n inferred from the bytes.
    let blocks = (data[1] % 5) as usize;
    let k = if data[2] & 0x80 != 0 {
        blocks * t.block_len() + 1
    } else {
        blocks * t.block_len()
    };
    let bytes = &data[3..];
    let n = match t.row_bytes(k) {
        Ok(0) | Err(_) => data[2] as usize % 4,
        Ok(row) => bytes.len() / row + usize::from(data[2] & 0x40 != 0),
    };
    let Ok(form) = block_form(t, bytes, n, k) else {
        return;
    };
    assert!(same_form(
        &form,
        &block_form_par(t, bytes, n, k, 3).unwrap()
    ));
    form.check().unwrap();
    let (lo, hi) = t.q_range().unwrap();
    assert!(form.q.iter().all(|q| (lo..=hi).contains(q)));
    let exact = dequantize(t, bytes, n, k).unwrap();
    let mut y = vec![0f32; k];
    for (r, want) in exact.chunks(k.max(1)).enumerate().take(n) {
        form.dequantize_row(r, &mut y);
        for (a, b) in want.iter().zip(&y) {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        }
    }
    let rw = rowwise_from_block_form(&form).unwrap();
    assert!(rw.q.iter().all(|&q| q != i8::MIN));
});
