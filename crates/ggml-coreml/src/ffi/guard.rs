//! No panic may unwind into C: every `extern "C"` entry runs its body through [`guard`].

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f`; a panic becomes `fallback` plus one error line naming the entry point.
pub fn guard<T>(entry: &'static str, fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            crate::log::error(&format!(
                "internal error in {entry}: {msg}; declining the call"
            ));
            fallback
        }
    }
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_fallback() {
        assert_eq!(guard("test", 7, || panic!("boom")), 7);
        assert_eq!(guard("test", 7, || 3), 3);
    }
}
