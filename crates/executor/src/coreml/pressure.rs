//! Memory pressure from the OS: one process-wide dispatch memory-pressure source tells every live
//! CoreML executor's surface store to let go of what it keeps idle (`resident::Store::relieve`): idle
//! I/O sets at "warn", resident weight surfaces too at "critical" (they are filled again from the
//! prepared forms at their next call). On iOS this comes before jetsam ends the app.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use dispatch2::{
    _dispatch_source_type_memorypressure, DispatchObject, DispatchQoS, DispatchQueue,
    DispatchRetained, DispatchSource, GlobalQueueIdentifier,
    dispatch_source_memorypressure_flags_t as Flags,
};

use super::surfaces::Store;
use crate::resident::Pressure;

static STORES: Mutex<Vec<Weak<Store>>> = Mutex::new(Vec::new());
static SOURCE: OnceLock<DispatchRetained<DispatchSource>> = OnceLock::new();

/// Pressure events seen and bytes let go because of them, for the statistics.
pub(super) static EVENTS: AtomicU64 = AtomicU64::new(0);
pub(super) static RELIEVED: AtomicU64 = AtomicU64::new(0);

/// Has `store` relieved on memory pressure for as long as it lives; starts the source on first use.
pub(super) fn watch(store: &Arc<Store>) {
    {
        let mut v = STORES.lock().unwrap_or_else(PoisonError::into_inner);
        v.retain(|s| s.strong_count() > 0);
        v.push(Arc::downgrade(store));
    }
    SOURCE.get_or_init(|| {
        let queue = DispatchQueue::global_queue(GlobalQueueIdentifier::QualityOfService(
            DispatchQoS::Utility,
        ));
        let mask = (Flags::DISPATCH_MEMORYPRESSURE_WARN.0
            | Flags::DISPATCH_MEMORYPRESSURE_CRITICAL.0) as usize;
        // SAFETY: the memory-pressure source type takes handle 0 and a mask of pressure flags; the
        // type symbol is libdispatch's own static, valid for the process.
        let source = unsafe {
            DispatchSource::new(
                (&raw const _dispatch_source_type_memorypressure).cast_mut(),
                0,
                mask,
                Some(&queue),
            )
        };
        // The handler reads only statics (no context pointer to outlive); the source is never
        // cancelled: it lives as long as the process, like the engine that owns the executor.
        source.set_event_handler_f(on_pressure);
        source.resume();
        source
    });
}

extern "C" fn on_pressure(_context: *mut c_void) {
    // Nothing may unwind into libdispatch.
    let _ = std::panic::catch_unwind(|| {
        let Some(source) = SOURCE.get() else { return };
        let flags = source.data() as std::ffi::c_ulong;
        let level = if flags & Flags::DISPATCH_MEMORYPRESSURE_CRITICAL.0 != 0 {
            Pressure::Critical
        } else if flags & Flags::DISPATCH_MEMORYPRESSURE_WARN.0 != 0 {
            Pressure::Warn
        } else {
            return;
        };
        let live: Vec<Arc<Store>> = {
            let v = STORES.lock().unwrap_or_else(PoisonError::into_inner);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        let freed: u64 = live.iter().map(|s| s.relieve(level)).sum();
        EVENTS.fetch_add(1, Ordering::Relaxed);
        RELIEVED.fetch_add(freed, Ordering::Relaxed);
    });
}
