//! ggml-coreml: a ggml backend that runs llama.cpp's int8 matmuls on the Apple Neural Engine through
//! public CoreML, and everything it declines on the host at the host's speed.
//!
//! Layers (arrows point down only): [`ffi`] (ggml ABI, panic guard) → [`faces`] (what ggml sees) →
//! [`router`] (where each MUL_MAT goes, and why) → policy / bridge / program / executor crates.
//! See docs/architecture.md.

pub mod engine;
pub mod faces;
pub mod ffi;
pub mod host;
pub mod log;
pub mod router;
pub mod stats;
pub mod weights;

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

use ffi::abi::Reg;
use ffi::guard::guard;

/// Dynamic loading entry point (`GGML_BACKEND_PATH`, `ggml_backend_load`): the same registry pointer on
/// every call, or NULL with one log line when the host's ggml cannot be served.
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_init() -> *mut Reg {
    guard(
        "ggml_backend_init",
        std::ptr::null_mut(),
        faces::reg::registry,
    )
}

/// Score for `ggml_backend_load`: 0 would make the host refuse the library, so any machine this
/// library can load on gets 1 (the reference executor runs anywhere; capability decides routing).
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_score() -> c_int {
    guard("ggml_backend_score", 0, || 1)
}

/// Static registration (iOS, static hosts): `ggml_backend_register(ggml_backend_coreml_reg())`.
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_coreml_reg() -> *mut Reg {
    guard(
        "ggml_backend_coreml_reg",
        std::ptr::null_mut(),
        faces::reg::registry,
    )
}

/// Sets the policy (`latency`, `energy`, `off`, `always`). Returns 0 on success, -1 for an unknown name.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_coreml_set_policy(name: *const c_char) -> c_int {
    guard("ggml_backend_coreml_set_policy", -1, || {
        if name.is_null() {
            return -1;
        }
        // SAFETY: per the contract.
        let s = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        if faces::reg::set_policy(&s) { 0 } else { -1 }
    })
}

/// The current policy name (static string).
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_coreml_get_policy() -> *const c_char {
    guard(
        "ggml_backend_coreml_get_policy",
        c"latency".as_ptr(),
        || match engine::engine().policy.mode() {
            ggml_coreml_policy::Mode::Latency => c"latency".as_ptr(),
            ggml_coreml_policy::Mode::Energy => c"energy".as_ptr(),
            ggml_coreml_policy::Mode::Off => c"off".as_ptr(),
            ggml_coreml_policy::Mode::Always => c"always".as_ptr(),
        },
    )
}

/// Writes the statistics as JSON into `buf` (NUL-terminated, truncated to `len`); returns the full
/// length needed (excluding the NUL), so a caller can retry with a larger buffer.
///
/// # Safety
/// `buf` is NULL (with `len` 0) or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_coreml_get_stats(buf: *mut c_char, len: usize) -> usize {
    guard("ggml_backend_coreml_get_stats", 0, || {
        let e = engine::engine();
        let json = e.stats.to_json(
            e.policy.mode().name(),
            e.executor.name(),
            e.executor.surface_bytes(),
        );
        if !buf.is_null() && len > 0 {
            let n = json.len().min(len - 1);
            // SAFETY: `buf` has `len` bytes; we write n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        json.len()
    })
}

/// Resets the statistics.
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_coreml_reset_stats() {
    guard("ggml_backend_coreml_reset_stats", (), || {
        engine::engine().stats.reset()
    })
}

/// Opts in to the hybrid face: registers the GPU-type device `CoreML-<inner>` wrapping the device (or
/// first device of the registry) named `inner` — e.g. "Metal" / "MTL0" on Apple, "CPU" for tests.
/// Call before loading a model, then select the device (llama.cpp: `--device CoreML-<inner>`).
/// Returns 0 on success, -1 on failure (logged). Equivalent to `GGML_COREML_HYBRID=<inner>` at load.
///
/// # Safety
/// `inner` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ggml_backend_coreml_enable_hybrid(inner: *const c_char) -> c_int {
    guard("ggml_backend_coreml_enable_hybrid", -1, || {
        if inner.is_null() {
            return -1;
        }
        // SAFETY: per the contract.
        let s = unsafe { CStr::from_ptr(inner) }.to_string_lossy();
        match faces::reg::enable_hybrid(s.trim()) {
            Ok(()) => 0,
            Err(e) => {
                log::warn(&format!("enable_hybrid({s}): {e}"));
                -1
            }
        }
    })
}

/// The library version (static string).
/// Most bytes of prepared weights kept resident; past it, weights are prepared per call. `usize::MAX`
/// (SIZE_MAX): unbounded. Returns the previous value.
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_coreml_set_weight_budget(bytes: usize) -> usize {
    guard("ggml_backend_coreml_set_weight_budget", 0, || {
        let v = if bytes == usize::MAX {
            u64::MAX
        } else {
            bytes as u64
        };
        let old = engine::engine()
            .weight_budget
            .swap(v, std::sync::atomic::Ordering::Relaxed);
        usize::try_from(old).unwrap_or(usize::MAX)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_coreml_version() -> *const c_char {
    static V: OnceLock<std::ffi::CString> = OnceLock::new();
    V.get_or_init(|| std::ffi::CString::new(env!("CARGO_PKG_VERSION")).expect("no NUL"))
        .as_ptr()
}
