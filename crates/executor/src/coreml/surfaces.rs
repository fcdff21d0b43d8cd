//! The CoreML executor's surface memory: resident weight surfaces and idle per-call I/O sets, kept in
//! the portable [`crate::resident::Store`] (its rules, budget and tests live there).

use super::io::Surface;
use crate::resident::{self, Held};

pub(super) use crate::resident::{ResidentKey, is_weight_input};

/// A filled weight surface, shared read-only by every call that binds it.
pub(super) struct Resident(Surface);

// SAFETY: after `Store::resident` fills it, a Resident is never written again: calls only make
// `MLMultiArray` views of it (`Surface::array`, which neither locks nor touches the bytes) and hand
// those to predictions, which read it. The pixel buffer is a reference-counted CoreVideo object with
// no thread affinity.
unsafe impl Sync for Resident {}

impl Resident {
    pub fn new(surface: Surface) -> Resident {
        Resident(surface)
    }

    pub fn surface(&self) -> &Surface {
        &self.0
    }
}

impl Held for Resident {
    fn bytes(&self) -> u64 {
        self.0.bytes()
    }
}

/// Input and output surfaces for one call of a program. Inputs are made on first use, so a set used
/// only with resident weights holds no weight surfaces.
pub(super) struct IoSet {
    pub inputs: Vec<Option<Surface>>,
    pub output: Surface,
}

impl Held for IoSet {
    fn bytes(&self) -> u64 {
        self.inputs
            .iter()
            .flatten()
            .map(Surface::bytes)
            .sum::<u64>()
            + self.output.bytes()
    }
}

/// Resident weight surfaces and pooled I/O sets under `GGML_COREML_SURFACE_BUDGET_MB`.
pub(super) type Store = resident::Store<Resident, IoSet>;
