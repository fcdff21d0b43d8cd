//! Executor-wide surface memory: resident weight surfaces (filled once per weight part, bound to every
//! call of every M bucket of that part) and the idle per-call I/O sets of every program, under one
//! byte budget (`GGML_COREML_SURFACE_BUDGET_MB`), evicted least recently used first.
//!
//! A call holds an `Arc` to the resident surfaces it binds and owns the I/O set it took, so an eviction
//! never pulls a surface from under a prediction: the bytes leave the count at once and the memory when
//! the last call using it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ggml_coreml_program::{ProgramDesc, TensorSpec};

use super::io::Surface;
use crate::SurfaceBytes;

/// Program inputs that come from the weight (the same bytes at every call of one weight part). The
/// outlier columns (`wo`) are chosen per call from the activations, so they are not among them.
pub(super) fn is_weight_input(name: &str) -> bool {
    matches!(name, "w" | "scales" | "offsets")
}

/// Identity of one resident surface: the driver's key of the weight part (it mixes the part's K/N
/// offsets into the weight's key), the part's shape and program family (M left out: every bucket
/// binds the same surface), and the input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ResidentKey {
    weight: u64,
    shape: ProgramDesc,
    input: &'static str,
}

impl ResidentKey {
    pub fn new(weight: u64, desc: &ProgramDesc, spec: &TensorSpec) -> ResidentKey {
        ResidentKey {
            weight,
            shape: ProgramDesc { m: 0, ..*desc },
            input: spec.name,
        }
    }
}

/// A filled weight surface, shared read-only by every call that binds it.
pub(super) struct Resident(Surface);

// SAFETY: after `Store::resident` fills it, a Resident is never written again: calls only make
// `MLMultiArray` views of it (`Surface::array`, which neither locks nor touches the bytes) and hand
// those to predictions, which read it. The pixel buffer is a reference-counted CoreVideo object with
// no thread affinity.
unsafe impl Sync for Resident {}

impl Resident {
    pub fn surface(&self) -> &Surface {
        &self.0
    }
}

/// Input and output surfaces for one call of a program. Inputs are made on first use, so a set used
/// only with resident weights holds no weight surfaces.
pub(super) struct IoSet {
    pub inputs: Vec<Option<Surface>>,
    pub output: Surface,
}

impl IoSet {
    fn bytes(&self) -> u64 {
        self.inputs
            .iter()
            .flatten()
            .map(Surface::bytes)
            .sum::<u64>()
            + self.output.bytes()
    }
}

struct ResidentEntry {
    surface: Arc<Resident>,
    bytes: u64,
    used: u64,
}

struct Pooled {
    io: IoSet,
    bytes: u64,
    used: u64,
}

#[derive(Default)]
struct State {
    clock: u64,
    resident: HashMap<ResidentKey, ResidentEntry>,
    pools: HashMap<ProgramDesc, Vec<Pooled>>,
    resident_bytes: u64,
    pooled_bytes: u64,
    evictions: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Drops least recently used entries (resident surfaces or idle I/O sets) until under `budget`.
    fn trim(&mut self, budget: u64) {
        while self.resident_bytes + self.pooled_bytes > budget {
            let oldest_resident = self
                .resident
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, e)| (e.used, k.clone()));
            let oldest_pooled = self
                .pools
                .iter()
                .filter_map(|(d, v)| {
                    v.iter()
                        .enumerate()
                        .min_by_key(|(_, p)| p.used)
                        .map(|(i, p)| (p.used, *d, i))
                })
                .min_by_key(|&(used, ..)| used);
            match (oldest_resident, oldest_pooled) {
                (Some((ru, key)), Some((pu, ..))) if ru <= pu => self.drop_resident(&key),
                (_, Some((_, desc, i))) => self.drop_pooled(&desc, i),
                (Some((_, key)), None) => self.drop_resident(&key),
                (None, None) => break,
            }
            self.evictions += 1;
        }
    }

    fn drop_resident(&mut self, key: &ResidentKey) {
        if let Some(e) = self.resident.remove(key) {
            self.resident_bytes -= e.bytes;
        }
    }

    fn drop_pooled(&mut self, desc: &ProgramDesc, i: usize) {
        if let Some(v) = self.pools.get_mut(desc) {
            let p = v.swap_remove(i);
            self.pooled_bytes -= p.bytes;
            if v.is_empty() {
                self.pools.remove(desc);
            }
        }
    }
}

/// The executor's surface memory (see the module documentation).
pub(super) struct Store {
    budget: u64,
    state: Mutex<State>,
}

impl Store {
    /// `budget`: most bytes kept between calls (`u64::MAX`: unbounded).
    pub fn new(budget: u64) -> Store {
        Store {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The resident surface of `key`, filled by `fill` when not held (first call, or evicted since).
    /// The fill runs outside the lock; when two calls fill the same key at once, the first kept wins.
    pub fn resident(
        &self,
        key: ResidentKey,
        fill: impl FnOnce() -> Result<Surface, String>,
    ) -> Result<Arc<Resident>, String> {
        {
            let mut st = self.state();
            let now = st.tick();
            if let Some(e) = st.resident.get_mut(&key) {
                e.used = now;
                return Ok(Arc::clone(&e.surface));
            }
        }
        let surface = Arc::new(Resident(fill()?));
        let bytes = surface.0.bytes();
        let mut st = self.state();
        let now = st.tick();
        if let Some(e) = st.resident.get_mut(&key) {
            e.used = now;
            return Ok(Arc::clone(&e.surface));
        }
        st.resident.insert(
            key,
            ResidentEntry {
                surface: Arc::clone(&surface),
                bytes,
                used: now,
            },
        );
        st.resident_bytes += bytes;
        // May drop the surface just made when it alone exceeds the budget: this call still binds it,
        // the next call fills it again.
        st.trim(self.budget);
        Ok(surface)
    }

    /// An idle I/O set of `desc` (the most recently used one), or `None`.
    pub fn take_io(&self, desc: &ProgramDesc) -> Option<IoSet> {
        let mut st = self.state();
        let v = st.pools.get_mut(desc)?;
        let i = v
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.used)
            .map(|(i, _)| i)?;
        let p = v.swap_remove(i);
        if v.is_empty() {
            st.pools.remove(desc);
        }
        st.pooled_bytes -= p.bytes;
        Some(p.io)
    }

    /// Keeps an I/O set for the next call of `desc`, within the budget.
    pub fn give_back(&self, desc: &ProgramDesc, io: IoSet) {
        let bytes = io.bytes();
        let mut st = self.state();
        let used = st.tick();
        st.pools
            .entry(*desc)
            .or_default()
            .push(Pooled { io, bytes, used });
        st.pooled_bytes += bytes;
        st.trim(self.budget);
    }

    pub fn bytes(&self) -> SurfaceBytes {
        let st = self.state();
        SurfaceBytes {
            weights: st.resident_bytes,
            io: st.pooled_bytes,
        }
    }

    /// Entries dropped to stay under the budget so far.
    pub fn evictions(&self) -> u64 {
        self.state().evictions
    }
}
