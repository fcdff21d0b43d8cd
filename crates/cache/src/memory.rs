//! The in-process layer: `shape -> ready program`, generic over what the executor keeps (a loaded
//! `MLModel`, an interpreter plan, …).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use ggml_coreml_program::ProgramDesc;

/// A map from key to ready value where each value is built once per process even when many threads ask
/// for it at the same time: the first builds, the others wait for its result. A failed build is not
/// remembered (the next caller tries again); remember failures by storing them in `V` if needed.
pub struct ReadyMap<K, V: ?Sized> {
    slots: Mutex<HashMap<K, Slot<V>>>,
}

/// One key's value; its own lock is held while the value is built.
type Slot<V> = Arc<Mutex<Option<Arc<V>>>>;

/// The usual instance: programs by description.
pub type ReadyPrograms<V> = ReadyMap<ProgramDesc, V>;

impl<K: Eq + Hash + Clone, V: ?Sized> Default for ReadyMap<K, V> {
    fn default() -> Self {
        ReadyMap {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: ?Sized> ReadyMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, key: &K) -> Slot<V> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.entry(key.clone()).or_default().clone()
    }

    /// The ready value, if built.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.get(key)?.clone();
        drop(slots);
        slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The ready value, building it with `build` when absent. Concurrent callers for the same key wait
    /// for one build; callers for other keys are not blocked.
    pub fn get_or_try_insert<E>(
        &self,
        key: &K,
        build: impl FnOnce() -> Result<Arc<V>, E>,
    ) -> Result<Arc<V>, E> {
        let slot = self.slot(key);
        let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        let v = build()?;
        *guard = Some(v.clone());
        Ok(v)
    }

    /// Stores a value (replacing any).
    pub fn insert(&self, key: K, value: Arc<V>) {
        *self
            .slot(&key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(value);
    }

    pub fn remove(&self, key: &K) -> Option<Arc<V>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.remove(key)?;
        drop(slots);
        slot.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Number of ready values.
    pub fn len(&self) -> usize {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .filter(|s| s.lock().unwrap_or_else(PoisonError::into_inner).is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::any::Any;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn one_build_per_key_across_threads() {
        let map: Arc<ReadyMap<u32, dyn Any + Send + Sync>> = Arc::new(ReadyMap::new());
        let builds = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (map, builds) = (map.clone(), builds.clone());
                std::thread::spawn(move || {
                    let v = map
                        .get_or_try_insert(&7, || {
                            builds.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok::<_, ()>(Arc::new(42u64) as Arc<dyn Any + Send + Sync>)
                        })
                        .unwrap();
                    *v.downcast_ref::<u64>().unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 42);
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert_eq!(map.len(), 1);
        assert!(
            map.get_or_try_insert(&8, || Err::<Arc<dyn Any + Send + Sync>, _>("no"))
                .is_err()
        );
        assert!(map.get(&8).is_none());
    }
}
