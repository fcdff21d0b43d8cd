//! Where the interpreter's GEMM threads come from.
//!
//! By default a matmul large enough to split spawns scoped threads for its duration. A host that
//! already owns worker threads — ggml's CPU backend, whose idle OpenMP workers otherwise keep
//! spinning on the very cores the GEMM needs — installs a [`Pool`] for the calling thread with
//! [`with_pool`], and the GEMM's row chunks then run on those workers.

use std::cell::RefCell;
use std::sync::Arc;

/// Worker threads a matmul may borrow.
pub trait Pool: Send + Sync {
    /// Runs `job(worker)` once on each worker of the pool (the caller may be one of them) and returns
    /// when all have returned. Jobs take their work on demand, so a pool may run fewer workers than
    /// asked — even none: the caller finishes whatever is left.
    fn run(&self, job: &(dyn Fn(usize) + Sync));
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<dyn Pool>>> = const { RefCell::new(None) };
}

/// Runs `f` with `pool` (None: spawned threads) serving the matmuls this thread starts.
pub fn with_pool<R>(pool: Option<Arc<dyn Pool>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<dyn Pool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| c.replace(pool));
    let _restore = Restore(prev);
    f()
}

/// The pool installed for this thread, if any.
pub(crate) fn current() -> Option<Arc<dyn Pool>> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Runs the job on two scoped threads and counts calls.
    struct Two(AtomicUsize);
    impl Pool for Two {
        fn run(&self, job: &(dyn Fn(usize) + Sync)) {
            self.0.fetch_add(1, Ordering::Relaxed);
            std::thread::scope(|s| {
                s.spawn(|| job(1));
                job(0);
            });
        }
    }

    #[test]
    fn installed_only_inside_and_restored() {
        assert!(current().is_none());
        let pool = Arc::new(Two(AtomicUsize::new(0)));
        with_pool(Some(pool.clone()), || {
            assert!(current().is_some());
            with_pool(None, || assert!(current().is_none()));
            assert!(current().is_some());
        });
        assert!(current().is_none());
    }
}
