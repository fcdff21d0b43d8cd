//! Sampled fingerprints of weights the hybrid face prepared outside its own buffers.
//!
//! Prepared weights of the hybrid face are kept by address for the life of the backend. In llama.cpp's own
//! tools a backend never outlives the model whose weights it prepared, but an RPC server keeps its backends
//! across client connections: the next client's tensors, possibly another model's, can land at addresses the
//! last client's weights had. Before a prepared weight is reused, a fingerprint of the bytes it was made from
//! (16 words spread over the slice) is compared with the bytes there now; a different one drops the entry, so
//! the weight is prepared again from what the address holds now.

use std::collections::HashMap;

/// Words sampled per slice.
const SAMPLES: usize = 16;

/// Fingerprint per slice address.
#[derive(Default)]
pub struct Fingerprints {
    seen: HashMap<usize, u64>,
}

impl Fingerprints {
    /// Whether the `len` bytes at `addr` look as they did the last time this address was checked (true for
    /// an address seen for the first time); remembers their look now.
    ///
    /// # Safety
    /// `len` bytes at `addr` are readable.
    pub unsafe fn unchanged(&mut self, addr: usize, len: usize) -> bool {
        // SAFETY: per the caller's contract.
        let fp = unsafe { fingerprint(addr as *const u8, len) };
        self.seen.insert(addr, fp).is_none_or(|old| old == fp)
    }
}

/// # Safety
/// `len` bytes at `p` are readable.
unsafe fn fingerprint(p: *const u8, len: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ len as u64;
    if len == 0 {
        return h;
    }
    let word = len.min(8);
    for i in 0..SAMPLES {
        let off = ((len - 1) * i / (SAMPLES - 1)).min(len - word);
        let mut b = [0u8; 8];
        // SAFETY: off + word <= len.
        unsafe { std::ptr::copy_nonoverlapping(p.add(off), b.as_mut_ptr(), word) };
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_other_bytes_at_the_same_address() {
        let mut a: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut f = Fingerprints::default();
        let addr = a.as_ptr() as usize;
        // SAFETY: `a` is alive and 4096 bytes long.
        unsafe {
            assert!(f.unchanged(addr, a.len()));
            assert!(f.unchanged(addr, a.len()));
        }
        a.iter_mut().for_each(|b| *b = b.wrapping_add(1));
        // SAFETY: as above.
        unsafe {
            assert!(!f.unchanged(addr, a.len()));
            assert!(f.unchanged(addr, a.len()));
        }
        let tiny = [1u8, 2, 3];
        // SAFETY: 3 readable bytes.
        unsafe { assert!(f.unchanged(tiny.as_ptr() as usize, 3)) };
    }
}
