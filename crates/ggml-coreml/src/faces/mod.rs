//! What ggml sees: the registry `CoreML`, the ACCEL device `CoreML` with its own buffer type
//! (weights placed in it are ours to run), and (opt-in) the hybrid device wrapping another device.
//! Thin: every call is translated into router / engine calls.

pub mod accel;
pub mod buffer;
pub mod hybrid;
pub mod hybrid_buffer;
pub mod reg;

use std::ffi::{CString, c_int};
use std::ptr;

use crate::engine::engine;
use crate::ffi::abi::GgmlBackend;
use crate::router::RouterCtx;

/// Context of one backend instance of either face.
pub struct BackendCtx {
    pub router: RouterCtx,
    pub name: CString,
}

/// `ggml_backend_set_n_threads` for a backend of either face: the inner host backend and the executor
/// get the thread count. False when `b` is not one of ours.
///
/// # Safety
/// `b` is NULL or a live backend.
pub unsafe fn set_threads(b: *mut GgmlBackend, n: c_int) -> bool {
    // SAFETY: compare guid pointers before touching the context.
    let Some(be) = (unsafe { b.as_ref() }) else {
        return false;
    };
    if !ptr::eq(be.guid, &accel::GUID) && !ptr::eq(be.guid, &hybrid::GUID) {
        return false;
    }
    // SAFETY: backends of both faces carry a BackendCtx.
    let ctx = unsafe { &*be.context.cast::<BackendCtx>() };
    ctx.router.host.set_threads(n);
    engine().set_threads(n.max(1) as usize);
    true
}
