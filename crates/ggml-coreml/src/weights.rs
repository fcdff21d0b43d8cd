//! Prepared weights, per buffer: the int8 / fp16 forms of the weights a buffer holds, keyed by the
//! address of each 2-D slice. Written at load (`set_tensor`) or on first use; invalidated by any write
//! that overlaps the slice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ggml_coreml_executor::driver::{Mode, PreparedWeight};

struct Entry {
    len: usize,
    /// Row stride in bytes of the slice the weight was prepared from.
    stride: usize,
    mode: Mode,
    weight: Arc<PreparedWeight>,
}

#[derive(Default)]
pub struct WeightRegistry {
    entries: Mutex<BTreeMap<usize, Entry>>,
    /// `[start, end)` of host memory lent to the buffer that the OS can give back and read again
    /// (llama.cpp's mapping of the model file, `buffer_from_host_ptr`): once a weight's prepared form
    /// is kept here, its raw pages inside this range are paged out (`Engine::prepared`).
    lent: Option<(usize, usize)>,
}

impl WeightRegistry {
    /// The registry of a buffer over `len` bytes of lent host memory at `base`.
    pub fn over_lent(base: usize, len: usize) -> WeightRegistry {
        WeightRegistry {
            entries: Mutex::default(),
            lent: base.checked_add(len).map(|end| (base, end)),
        }
    }

    /// The part of `[addr, addr + len)` inside lent host memory (None: not lent, or outside it).
    pub fn lent_part(&self, addr: usize, len: usize) -> Option<(usize, usize)> {
        let (lo, hi) = self.lent?;
        let (a, b) = (addr.max(lo), addr.saturating_add(len).min(hi));
        (a < b).then_some((a, b - a))
    }

    /// The form prepared from the `n` rows at `addr` (a split node prepares only its first rows).
    pub fn get(
        &self,
        addr: usize,
        mode: Mode,
        stride: usize,
        n: usize,
    ) -> Option<Arc<PreparedWeight>> {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.get(&addr)
            .filter(|x| x.mode == mode && x.stride == stride && x.weight.n == n)
            .map(|x| x.weight.clone())
    }

    /// Inserts (replacing any entry at `addr`); returns bytes no longer held by a replaced entry.
    /// `len` is the span of the source bytes (first row to end of last row).
    pub fn insert(
        &self,
        addr: usize,
        len: usize,
        stride: usize,
        weight: Arc<PreparedWeight>,
    ) -> usize {
        let mode = weight.mode;
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.insert(
            addr,
            Entry {
                len,
                stride,
                mode,
                weight,
            },
        )
        .map_or(0, |old| old.weight.bytes_held())
    }

    /// Drops every entry overlapping `[addr, addr + len)`; returns the bytes released.
    pub fn invalidate(&self, addr: usize, len: usize) -> usize {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let end = addr.saturating_add(len.max(1));
        // Entries never overlap each other, so walking back from `end` we can stop at the first one
        // that ends at or before `addr`.
        let doomed: Vec<usize> = e
            .range(..end)
            .rev()
            .take_while(|(start, x)| start.saturating_add(x.len) > addr)
            .map(|(k, _)| *k)
            .collect();
        doomed
            .iter()
            .filter_map(|k| e.remove(k))
            .map(|x| x.weight.bytes_held())
            .sum()
    }

    pub fn clear(&self) -> usize {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let n = e.values().map(|x| x.weight.bytes_held()).sum();
        e.clear();
        n
    }

    pub fn bytes_held(&self) -> usize {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.values().map(|x| x.weight.bytes_held()).sum()
    }
}

/// The registry a weight's prepared forms live in: borrowed from one of our buffers (ACCEL face), or
/// shared with a tracked inner buffer (hybrid face; see `faces::hybrid_buffer`).
pub enum RegistryRef<'a> {
    Borrowed(&'a WeightRegistry),
    Shared(Arc<WeightRegistry>),
}

impl std::ops::Deref for RegistryRef<'_> {
    type Target = WeightRegistry;

    fn deref(&self) -> &WeightRegistry {
        match self {
            RegistryRef::Borrowed(r) => r,
            RegistryRef::Shared(r) => r,
        }
    }
}
