//! The hybrid face's buffer type: the inner device's own buffer type, wrapped so that we see every
//! buffer it makes and every write to it. The buffers themselves stay the inner device's (same struct,
//! same `buft`, same context — Metal and CUDA read both), with a few slots of their interface pointed at
//! trampolines that drop our prepared weights before forwarding:
//!
//! - `free_buffer`: the buffer's prepared weights go with it, so a later buffer at the same address
//!   (a second model, a server swapping models, test-backend-ops' next case) starts empty;
//! - `set_tensor`, `set_tensor_2d`, `memset_tensor`, `cpy_tensor`, `clear`: the written range is dropped.
//!
//! Prepared weights are therefore kept per live buffer, and a buffer the wrapper did not make has
//! none (its weights are prepared per call: correct, only slower).
//!
//! Cost of the trampolines: inner backends that recognise their own buffers by `iface.free_buffer`
//! (CUDA, Metal, RPC) no longer take their direct device-to-device copy *from* these buffers in
//! `cpy_tensor`; ggml falls back to a staged copy. Weights are written once, so this is rare.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::engine::engine;
use crate::ffi::abi::*;
use crate::ffi::ggml::{Layout, api};
use crate::ffi::guard::guard;
use crate::log;
use crate::weights::WeightRegistry;

/// Context of a wrapper buffer type: the inner buffer type it forwards to.
struct WrapCtx {
    inner: BuftPtr,
    /// `CoreML-<inner buffer type>`. Never the inner type's own name: llama.cpp's model loader keys its
    /// contexts by buffer type *name*, so a wrapper named like its inner type (`CPU`) would share the
    /// inner type's context, and the weights would land in buffers the inner type makes, untracked.
    name: std::ffi::CString,
}

/// A buffer made through a wrapper: its original interface and its prepared weights.
struct Tracked {
    orig: GgmlBackendBufferI,
    weights: Arc<WeightRegistry>,
}

static TRACKED: Mutex<Option<HashMap<usize, Tracked>>> = Mutex::new(None);

fn with_tracked<R>(f: impl FnOnce(&mut HashMap<usize, Tracked>) -> R) -> R {
    let mut g = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

fn released(n: usize) {
    engine()
        .stats
        .weight_bytes_held
        .fetch_sub(n as u64, Ordering::Relaxed);
}

/// `GGML_COREML_HYBRID_MARK_WEIGHTS=1` (tests): every buffer the wrapper makes is marked WEIGHTS, so
/// test-backend-ops' operands reach the ANE path through the hybrid face as model weights do.
fn mark_weights() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_HYBRID_MARK_WEIGHTS").is_ok_and(|v| v == "1"))
}

/// The prepared-weight registry of a buffer made through a wrapper (None: not ours to track).
pub fn registry(buf: *mut GgmlBackendBuffer) -> Option<Arc<WeightRegistry>> {
    if buf.is_null() {
        return None;
    }
    with_tracked(|m| m.get(&(buf as usize)).map(|t| t.weights.clone()))
}

/// Drops the prepared weights overlapping `[addr, addr + len)` of a tracked buffer.
pub fn invalidate(buf: *mut GgmlBackendBuffer, addr: usize, len: usize) {
    if let Some(w) = registry(buf) {
        released(w.invalidate(addr, len));
    }
}

/// Bytes a 2-D write (`n_copies` runs of `size` bytes, `stride` apart) spans in the tensor.
pub fn span_2d(size: usize, n_copies: usize, stride: usize) -> usize {
    stride.saturating_mul(n_copies.saturating_sub(1)) + size
}

/// Makes the wrapper of `inner` for the host's layout; leaked (it lives as long as the process).
///
/// # Safety
/// `inner` is a live buffer type (ggml's buffer types live as long as their backend).
pub unsafe fn new_buft(layout: Layout, device: *mut Dev, inner: BuftPtr) -> BuftPtr {
    let inner_name = api()
        // SAFETY: per the contract; its name is a static string.
        .map(|a| unsafe { crate::ffi::ggml::cstr_or((a.buft_name)(inner), "inner") })
        .unwrap_or_default();
    let name = std::ffi::CString::new(format!("CoreML-{inner_name}")).unwrap_or_default();
    let ctx = Box::into_raw(Box::new(WrapCtx { inner, name })).cast::<c_void>();
    let p: *mut c_void = match layout {
        Layout::V2 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV2 {
                get_name: Some(w_get_name),
                alloc_buffer: Some(w_alloc_buffer),
                get_alignment: Some(w_get_alignment),
                get_max_size: Some(w_get_max_size),
                get_alloc_size: Some(w_get_alloc_size),
                is_host: Some(w_is_host),
            },
            device,
            context: ctx,
        }))
        .cast(),
        // v3's `alloc_buffer_n` / `get_alloc_size_n` are optional: ggml-base falls back to the
        // one-buffer entry points.
        Layout::V3 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV3 {
                get_name: Some(w_get_name),
                alloc_buffer: Some(w_alloc_buffer),
                alloc_buffer_n: None,
                get_alignment: Some(w_get_alignment),
                get_max_size: Some(w_get_max_size),
                get_alloc_size: Some(w_get_alloc_size),
                get_alloc_size_n: None,
                is_host: Some(w_is_host),
            },
            device,
            context: ctx,
        }))
        .cast(),
        Layout::V6 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV6 {
                get_name: Some(w_get_name),
                alloc_buffer: Some(w_alloc_buffer),
                get_alignment: Some(w_get_alignment),
                get_max_size: Some(w_get_max_size),
                get_alloc_size: Some(w_get_alloc_size),
                is_host: Some(w_is_host),
                get_alloc_interface: None,
            },
            device,
            context: ctx,
        }))
        .cast(),
    };
    p.cast()
}

/// The inner buffer type of a wrapper.
///
/// # Safety
/// `buft` was made by [`new_buft`] (every layout puts `context` right after the interface, and the
/// `Buft<I>` prefix up to the interface differs only in the interface's size).
unsafe fn inner_of(buft: BuftPtr, layout: Layout) -> BuftPtr {
    // SAFETY: per the contract.
    unsafe { wrap_ctx(buft, layout) }.inner
}

/// # Safety
/// `buft` is a wrapper made by [`new_buft`] for `layout` (they live as long as the process).
unsafe fn wrap_ctx(buft: BuftPtr, layout: Layout) -> &'static WrapCtx {
    // SAFETY: per the contract, the struct is a Buft<I> for the host's layout, its context a WrapCtx.
    unsafe {
        let ctx = match layout {
            Layout::V2 => (*buft.cast::<Buft<BuftIfaceV2>>()).context,
            Layout::V3 => (*buft.cast::<Buft<BuftIfaceV3>>()).context,
            Layout::V6 => (*buft.cast::<Buft<BuftIfaceV6>>()).context,
        };
        &*ctx.cast::<WrapCtx>()
    }
}

fn inner(buft: BuftPtr) -> Option<(&'static crate::ffi::ggml::GgmlApi, BuftPtr)> {
    let api = api()?;
    // SAFETY: ggml calls the wrapper's interface with the wrapper itself.
    Some((api, unsafe { inner_of(buft, api.layout) }))
}

unsafe extern "C" fn w_get_name(buft: BuftPtr) -> *const c_char {
    guard("hybrid buft get_name", c"CoreML-hybrid".as_ptr(), || {
        // SAFETY: ggml calls the wrapper's interface with the wrapper itself; the name lives as long.
        api().map_or(c"CoreML-hybrid".as_ptr(), |a| unsafe {
            wrap_ctx(buft, a.layout).name.as_ptr()
        })
    })
}

unsafe extern "C" fn w_get_alignment(buft: BuftPtr) -> usize {
    guard("hybrid buft get_alignment", 64, || {
        // SAFETY: forwards to the inner buffer type.
        inner(buft).map_or(64, |(a, i)| unsafe { (a.buft_get_alignment)(i) })
    })
}

unsafe extern "C" fn w_get_max_size(buft: BuftPtr) -> usize {
    guard("hybrid buft get_max_size", usize::MAX, || {
        // SAFETY: forwards to the inner buffer type.
        inner(buft).map_or(usize::MAX, |(a, i)| unsafe { (a.buft_get_max_size)(i) })
    })
}

unsafe extern "C" fn w_get_alloc_size(buft: BuftPtr, t: *const GgmlTensor) -> usize {
    guard("hybrid buft get_alloc_size", 0, || {
        // SAFETY: forwards to the inner buffer type (which may pad, e.g. CUDA's quantised rows).
        inner(buft).map_or(0, |(a, i)| unsafe { (a.buft_get_alloc_size)(i, t) })
    })
}

unsafe extern "C" fn w_is_host(buft: BuftPtr) -> bool {
    guard("hybrid buft is_host", false, || {
        // SAFETY: forwards to the inner buffer type.
        inner(buft).is_some_and(|(a, i)| unsafe { (a.buft_is_host)(i) })
    })
}

unsafe extern "C" fn w_alloc_buffer(buft: BuftPtr, size: usize) -> *mut GgmlBackendBuffer {
    guard("hybrid alloc_buffer", ptr::null_mut(), || {
        let Some((api, inner)) = inner(buft) else {
            return ptr::null_mut();
        };
        // SAFETY: the inner buffer type allocates its own buffer (size > 0: ggml-base answers
        // zero-size requests itself before calling us).
        let buf = unsafe { (api.buft_alloc_buffer)(inner, size) };
        if !buf.is_null() {
            // SAFETY: a live buffer just made by ggml-base, not yet shared with anyone.
            unsafe { track(buf, WeightRegistry::default()) };
        }
        buf
    })
}

/// A buffer the inner device made over `size` bytes of host memory at `mem` (llama.cpp's mapping of the
/// model file), tracked like the wrapper's own; the raw pages of weights prepared from it are given
/// back to the OS (`WeightRegistry::over_lent`).
///
/// # Safety
/// `buf` is a live buffer just returned by the inner device, not yet used by anyone, over `mem`.
pub unsafe fn track_foreign(buf: *mut GgmlBackendBuffer, mem: usize, size: usize) {
    if !buf.is_null() {
        // SAFETY: per the contract.
        unsafe { track(buf, WeightRegistry::over_lent(mem, size)) };
    }
}

/// Points the write and free slots of a new buffer at our trampolines and starts its registry.
///
/// # Safety
/// `buf` is a live buffer nobody else uses yet.
unsafe fn track(buf: *mut GgmlBackendBuffer, registry: WeightRegistry) {
    // SAFETY: per the contract; the interface is a plain struct of function pointers owned by the
    // buffer (ggml-base copied it in `ggml_backend_buffer_init`).
    let b = unsafe { &mut *buf };
    let orig = b.iface;
    b.iface.free_buffer = Some(t_free_buffer);
    if orig.set_tensor.is_some() {
        b.iface.set_tensor = Some(t_set_tensor);
    }
    if orig.set_tensor_2d.is_some() {
        b.iface.set_tensor_2d = Some(t_set_tensor_2d);
    }
    if orig.memset_tensor.is_some() {
        b.iface.memset_tensor = Some(t_memset_tensor);
    }
    if orig.cpy_tensor.is_some() {
        b.iface.cpy_tensor = Some(t_cpy_tensor);
    }
    if orig.clear.is_some() {
        b.iface.clear = Some(t_clear);
    }
    if mark_weights() {
        b.usage = BUFFER_USAGE_WEIGHTS;
    }
    let stale = with_tracked(|m| {
        m.insert(
            buf as usize,
            Tracked {
                orig,
                weights: Arc::new(registry),
            },
        )
    });
    // A buffer at this address that was freed behind our back: nothing of it may be served again.
    if let Some(old) = stale {
        log::debug(
            "hybrid: a tracked buffer address was reused without a free; dropped its weights",
        );
        released(old.weights.clear());
    }
}

fn orig(buf: *mut GgmlBackendBuffer) -> Option<GgmlBackendBufferI> {
    with_tracked(|m| m.get(&(buf as usize)).map(|t| t.orig))
}

unsafe extern "C" fn t_free_buffer(buf: *mut GgmlBackendBuffer) {
    guard("hybrid free_buffer", (), || {
        let Some(t) = with_tracked(|m| m.remove(&(buf as usize))) else {
            return;
        };
        released(t.weights.clear());
        if let Some(f) = t.orig.free_buffer {
            // SAFETY: the inner buffer's own free, once, as ggml-base would have called it.
            unsafe { f(buf) };
        }
    })
}

unsafe extern "C" fn t_set_tensor(
    buf: *mut GgmlBackendBuffer,
    t: *mut GgmlTensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    guard("hybrid set_tensor", (), || {
        if let Some(f) = orig(buf).and_then(|o| o.set_tensor) {
            // SAFETY: forwards ggml-base's checked call to the inner buffer.
            unsafe { f(buf, t, data, offset, size) };
        }
        // SAFETY: `t` is a live tensor of this buffer.
        invalidate(buf, unsafe { (*t).data } as usize + offset, size);
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_set_tensor_2d(
    buf: *mut GgmlBackendBuffer,
    t: *mut GgmlTensor,
    data: *const c_void,
    offset: usize,
    size: usize,
    n_copies: usize,
    stride_tensor: usize,
    stride_data: usize,
) {
    guard("hybrid set_tensor_2d", (), || {
        if let Some(f) = orig(buf).and_then(|o| o.set_tensor_2d) {
            // SAFETY: forwards ggml-base's checked call to the inner buffer.
            unsafe {
                f(
                    buf,
                    t,
                    data,
                    offset,
                    size,
                    n_copies,
                    stride_tensor,
                    stride_data,
                )
            };
        }
        let span = span_2d(size, n_copies, stride_tensor);
        // SAFETY: `t` is a live tensor of this buffer.
        invalidate(buf, unsafe { (*t).data } as usize + offset, span);
    })
}

unsafe extern "C" fn t_memset_tensor(
    buf: *mut GgmlBackendBuffer,
    t: *mut GgmlTensor,
    value: u8,
    offset: usize,
    size: usize,
) {
    guard("hybrid memset_tensor", (), || {
        if let Some(f) = orig(buf).and_then(|o| o.memset_tensor) {
            // SAFETY: forwards ggml-base's checked call to the inner buffer.
            unsafe { f(buf, t, value, offset, size) };
        }
        // SAFETY: `t` is a live tensor of this buffer.
        invalidate(buf, unsafe { (*t).data } as usize + offset, size);
    })
}

unsafe extern "C" fn t_cpy_tensor(
    buf: *mut GgmlBackendBuffer,
    src: *const GgmlTensor,
    dst: *mut GgmlTensor,
) -> bool {
    guard("hybrid cpy_tensor", false, || {
        let Some(f) = orig(buf).and_then(|o| o.cpy_tensor) else {
            return false;
        };
        // SAFETY: forwards ggml-base's call to the inner buffer.
        let done = unsafe { f(buf, src, dst) };
        if done && let Some(api) = api() {
            // SAFETY: `dst` is a live tensor of this buffer.
            unsafe { invalidate(buf, (*dst).data as usize, (api.nbytes)(dst)) };
        }
        done
    })
}

unsafe extern "C" fn t_clear(buf: *mut GgmlBackendBuffer, value: u8) {
    guard("hybrid clear", (), || {
        if let Some(f) = orig(buf).and_then(|o| o.clear) {
            // SAFETY: forwards ggml-base's call to the inner buffer.
            unsafe { f(buf, value) };
        }
        if let Some(w) = registry(buf) {
            released(w.clear());
        }
    })
}
