//! Executor memory kept between calls, portable so its rules are tested on Linux: resident weight
//! inputs (filled once per weight part, bound to every call of every M bucket of that part) and the
//! idle per-call I/O sets of every program, under one byte budget, dropped least recently used first.
//!
//! The CoreML executor keeps IOSurface-backed buffers here (`coreml::surfaces`); the reference
//! executor keeps zero-byte markers, so the same bookkeeping (keys, parts, forgetting a dropped
//! weight) runs in every Linux test.
//!
//! A call holds an `Arc` to the resident entries it binds and owns the I/O set it took, so an eviction
//! never pulls memory from under a prediction: the bytes leave the count at once and the memory when
//! the last call using it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ggml_coreml_program::ProgramDesc;

use crate::{SurfaceBytes, WeightPart};

/// Something kept by a [`Store`], with its size.
pub trait Held {
    fn bytes(&self) -> u64;
}

/// Program inputs that come from the weight (the same bytes at every call of one weight part). The
/// outlier columns (`wo`) are chosen per call from the activations, so they are not among them.
pub fn is_weight_input(name: &str) -> bool {
    matches!(name, "w" | "scales" | "offsets")
}

/// Identity of one resident input: the weight part, the part's shape and program family (M left out:
/// every bucket binds the same input), and the input's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResidentKey {
    part: WeightPart,
    shape: ProgramDesc,
    input: &'static str,
}

impl ResidentKey {
    pub fn new(part: WeightPart, desc: &ProgramDesc, input: &'static str) -> ResidentKey {
        ResidentKey {
            part,
            shape: ProgramDesc { m: 0, ..*desc },
            input,
        }
    }
}

/// How hard the OS asks for memory back ([`Store::relieve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Drop the idle I/O sets (remade at the next call of their program).
    Warn,
    /// Drop everything idle, resident weight inputs too (filled again at their next call).
    Critical,
}

struct ResidentEntry<W> {
    value: Arc<W>,
    bytes: u64,
    used: u64,
}

struct Pooled<Io> {
    io: Io,
    bytes: u64,
    used: u64,
}

struct State<W, Io> {
    clock: u64,
    resident: HashMap<ResidentKey, ResidentEntry<W>>,
    pools: HashMap<ProgramDesc, Vec<Pooled<Io>>>,
    resident_bytes: u64,
    pooled_bytes: u64,
    evictions: u64,
    forgotten: u64,
    fills: u64,
}

impl<W, Io> Default for State<W, Io> {
    fn default() -> Self {
        State {
            clock: 0,
            resident: HashMap::new(),
            pools: HashMap::new(),
            resident_bytes: 0,
            pooled_bytes: 0,
            evictions: 0,
            forgotten: 0,
            fills: 0,
        }
    }
}

impl<W, Io> State<W, Io> {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Drops least recently used entries (resident inputs or idle I/O sets) until under `budget`.
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

/// Resident weight inputs and pooled I/O sets under one budget (see the module documentation).
pub struct Store<W, Io> {
    budget: u64,
    state: Mutex<State<W, Io>>,
}

impl<W: Held, Io: Held> std::fmt::Debug for Store<W, Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("budget", &self.budget)
            .field("held", &self.bytes())
            .finish()
    }
}

impl<W: Held, Io: Held> Store<W, Io> {
    /// `budget`: most bytes kept between calls (`u64::MAX`: unbounded).
    pub fn new(budget: u64) -> Store<W, Io> {
        Store {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<W, Io>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The resident input of `key`, made by `fill` when not held (first call, or evicted since).
    /// The fill runs outside the lock; when two calls fill the same key at once, the first kept wins.
    pub fn resident(
        &self,
        key: ResidentKey,
        fill: impl FnOnce() -> Result<W, String>,
    ) -> Result<Arc<W>, String> {
        {
            let mut st = self.state();
            let now = st.tick();
            if let Some(e) = st.resident.get_mut(&key) {
                e.used = now;
                return Ok(Arc::clone(&e.value));
            }
        }
        let value = Arc::new(fill()?);
        let bytes = value.bytes();
        let mut st = self.state();
        let now = st.tick();
        if let Some(e) = st.resident.get_mut(&key) {
            e.used = now;
            return Ok(Arc::clone(&e.value));
        }
        st.resident.insert(
            key,
            ResidentEntry {
                value: Arc::clone(&value),
                bytes,
                used: now,
            },
        );
        st.resident_bytes += bytes;
        st.fills += 1;
        // May drop the entry just made when it alone exceeds the budget: this call still binds it,
        // the next call fills it again.
        st.trim(self.budget);
        Ok(value)
    }

    /// Drops every resident input of the prepared form `key` (all parts, programs and inputs);
    /// returns how many. Calls still running keep what they bound until they return.
    pub fn forget(&self, key: u64) -> usize {
        if key == 0 {
            return 0;
        }
        let mut st = self.state();
        let doomed: Vec<ResidentKey> = st
            .resident
            .keys()
            .filter(|k| k.part.key == key)
            .cloned()
            .collect();
        for k in &doomed {
            st.drop_resident(k);
        }
        st.forgotten += doomed.len() as u64;
        doomed.len()
    }

    /// The OS asks for memory back: drops idle I/O sets, and at [`Pressure::Critical`] the resident
    /// inputs too. Returns the bytes let go.
    pub fn relieve(&self, level: Pressure) -> u64 {
        let mut st = self.state();
        let before = st.resident_bytes + st.pooled_bytes;
        st.pools.clear();
        st.pooled_bytes = 0;
        if level == Pressure::Critical {
            st.resident.clear();
            st.resident_bytes = 0;
        }
        before - (st.resident_bytes + st.pooled_bytes)
    }

    /// An idle I/O set of `desc` (the most recently used one), or `None`.
    pub fn take_io(&self, desc: &ProgramDesc) -> Option<Io> {
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
    pub fn give_back(&self, desc: &ProgramDesc, io: Io) {
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
            weight_inputs: st.resident.len() as u64,
            forgotten: st.forgotten,
            fills: st.fills,
            evictions: st.evictions,
            programs: 0,
        }
    }

    /// Entries dropped to stay under the budget so far.
    pub fn evictions(&self) -> u64 {
        self.state().evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_coreml_program::Variant;

    /// A stand-in for a surface: its size, and a tag to tell fills apart.
    #[derive(Debug, PartialEq)]
    struct Buf(u64, u32);

    impl Held for Buf {
        fn bytes(&self) -> u64 {
            self.0
        }
    }

    fn desc(n: usize, m: usize) -> ProgramDesc {
        ProgramDesc {
            variant: Variant::W8F16,
            m,
            k: 64,
            n,
            group: 32,
            offsets: false,
        }
    }

    fn part(key: u64, n0: usize) -> WeightPart {
        WeightPart { key, k0: 0, n0 }
    }

    fn fill(store: &Store<Buf, Buf>, key: ResidentKey, bytes: u64, tag: u32) -> Arc<Buf> {
        store.resident(key, || Ok(Buf(bytes, tag))).unwrap()
    }

    #[test]
    fn every_m_bucket_binds_one_input_and_parts_are_apart() {
        let s: Store<Buf, Buf> = Store::new(u64::MAX);
        let a = fill(&s, ResidentKey::new(part(7, 0), &desc(64, 16), "w"), 10, 1);
        // Another M bucket of the same part: the same input, no fill.
        let b = s
            .resident(ResidentKey::new(part(7, 0), &desc(64, 512), "w"), || {
                panic!("filled twice")
            })
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // Another N part, another input, another weight: each its own.
        fill(&s, ResidentKey::new(part(7, 64), &desc(64, 16), "w"), 10, 2);
        fill(
            &s,
            ResidentKey::new(part(7, 0), &desc(64, 16), "scales"),
            4,
            3,
        );
        fill(&s, ResidentKey::new(part(8, 0), &desc(64, 16), "w"), 10, 4);
        let b = s.bytes();
        assert_eq!((b.weights, b.weight_inputs, b.io, b.fills), (34, 4, 0, 4));
    }

    #[test]
    fn forget_drops_every_part_of_one_weight_only() {
        let s: Store<Buf, Buf> = Store::new(u64::MAX);
        for n0 in [0, 64, 128] {
            for input in ["w", "scales"] {
                fill(
                    &s,
                    ResidentKey::new(part(7, n0), &desc(64, 16), input),
                    5,
                    0,
                );
            }
        }
        // The f16 fallback program of the same weight keys the same form.
        let f16 = ProgramDesc {
            variant: Variant::F16,
            group: 0,
            ..desc(64, 16)
        };
        fill(&s, ResidentKey::new(part(7, 0), &f16, "w"), 8, 0);
        let other = fill(&s, ResidentKey::new(part(9, 0), &desc(64, 16), "w"), 5, 9);
        assert_eq!(s.forget(7), 7);
        assert_eq!(s.forget(7), 0);
        assert_eq!(s.forget(0), 0);
        let b = s.bytes();
        assert_eq!((b.weights, b.weight_inputs, b.forgotten), (5, 1, 7));
        let again = fill(&s, ResidentKey::new(part(9, 0), &desc(64, 16), "w"), 5, 10);
        assert!(
            Arc::ptr_eq(&other, &again),
            "the other weight kept its input"
        );
    }

    #[test]
    fn budget_drops_the_least_recently_used_of_inputs_and_io_sets() {
        let s: Store<Buf, Buf> = Store::new(30);
        let k = |key| ResidentKey::new(part(key, 0), &desc(64, 16), "w");
        fill(&s, k(1), 10, 1);
        s.give_back(&desc(64, 16), Buf(10, 100));
        fill(&s, k(2), 10, 2);
        // Touch weight 1: the I/O set is now the oldest.
        fill(&s, k(1), 10, 0);
        fill(&s, k(3), 10, 3);
        let b = s.bytes();
        assert_eq!((b.weights, b.io), (30, 0));
        assert!(s.take_io(&desc(64, 16)).is_none());
        assert_eq!(s.evictions(), 1);
        // Next, weight 2 is the oldest.
        fill(&s, k(4), 10, 4);
        assert_eq!(fill(&s, k(1), 10, 0).1, 1, "weight 1 was kept");
        assert_eq!(fill(&s, k(2), 10, 20).1, 20, "weight 2 was filled again");
    }

    #[test]
    fn an_input_larger_than_the_budget_still_serves_its_call() {
        let s: Store<Buf, Buf> = Store::new(8);
        let key = ResidentKey::new(part(1, 0), &desc(64, 16), "w");
        let held = fill(&s, key.clone(), 100, 1);
        assert_eq!(held.0, 100);
        assert_eq!(s.bytes().weights, 0);
        assert_eq!(fill(&s, key, 100, 2).1, 2, "filled again at the next call");
    }

    #[test]
    fn io_sets_are_pooled_per_program_most_recent_first() {
        let s: Store<Buf, Buf> = Store::new(u64::MAX);
        let (a, b) = (desc(64, 16), desc(64, 32));
        s.give_back(&a, Buf(3, 1));
        s.give_back(&a, Buf(3, 2));
        s.give_back(&b, Buf(5, 3));
        assert_eq!(s.bytes().io, 11);
        assert_eq!(s.take_io(&a), Some(Buf(3, 2)));
        assert_eq!(s.take_io(&a), Some(Buf(3, 1)));
        assert_eq!(s.take_io(&a), None);
        assert_eq!(s.bytes().io, 5);
    }

    #[test]
    fn pressure_drops_io_sets_then_inputs() {
        let s: Store<Buf, Buf> = Store::new(u64::MAX);
        let key = ResidentKey::new(part(1, 0), &desc(64, 16), "w");
        let bound = fill(&s, key.clone(), 10, 1);
        s.give_back(&desc(64, 16), Buf(4, 2));
        assert_eq!(s.relieve(Pressure::Warn), 4);
        assert_eq!(s.bytes().weights, 10);
        assert_eq!(s.relieve(Pressure::Critical), 10);
        let b = s.bytes();
        assert_eq!((b.weights, b.io, b.weight_inputs), (0, 0, 0));
        // A call that bound it before keeps it; the next call fills it again.
        assert_eq!(bound.1, 1);
        assert_eq!(fill(&s, key, 10, 3).1, 3);
    }
}
