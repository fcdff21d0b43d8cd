//! The `CoreML` buffer type: plain host memory that ggml must treat as non-host (so llama.cpp loads
//! weights through `set_tensor`, where we repack them), plus the prepared forms of the weights in it.

use std::alloc::{Layout as AllocLayout, alloc, dealloc};
use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::Ordering;

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::driver;

use crate::engine::{Repack, engine};
use crate::ffi::abi::*;
use crate::ffi::ggml::{Layout, api};
use crate::ffi::guard::guard;
use crate::ffi::tensor::TensorRef;
use crate::log;
use crate::weights::WeightRegistry;

pub const ALIGNMENT: usize = 64;

/// Context of one buffer of our buffer type.
pub struct BufferCtx {
    mem: *mut u8,
    /// None: the memory is borrowed (llama.cpp's mapping of the model file, see [`from_host_ptr`]).
    layout: Option<AllocLayout>,
    /// Size of borrowed memory (0 for our own).
    borrowed: usize,
    pub weights: WeightRegistry,
}

impl Drop for BufferCtx {
    fn drop(&mut self) {
        let released = self.weights.clear();
        engine()
            .stats
            .weight_bytes_held
            .fetch_sub(released as u64, Ordering::Relaxed);
        let stats = &engine().stats;
        match self.layout {
            Some(layout) => {
                stats
                    .raw_bytes_owned
                    .fetch_sub(layout.size() as u64, Ordering::Relaxed);
                // SAFETY: `mem` was allocated with exactly `layout` in `alloc_buffer`.
                unsafe { dealloc(self.mem, layout) };
            }
            None => {
                stats
                    .raw_bytes_borrowed
                    .fetch_sub(self.borrowed as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Makes the buffer type struct for the host's layout; leaked (it lives as long as the process).
pub fn new_buft(layout: Layout, device: *mut Dev) -> BuftPtr {
    let ctx = ptr::null_mut();
    let p: *mut c_void = match layout {
        Layout::V2 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV2 {
                get_name: Some(buft_get_name),
                alloc_buffer: Some(buft_alloc_buffer),
                get_alignment: Some(buft_get_alignment),
                get_max_size: None,
                get_alloc_size: None,
                is_host: Some(buft_is_host),
            },
            device,
            context: ctx,
        }))
        .cast(),
        Layout::V3 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV3 {
                get_name: Some(buft_get_name),
                alloc_buffer: Some(buft_alloc_buffer),
                alloc_buffer_n: None,
                get_alignment: Some(buft_get_alignment),
                get_max_size: None,
                get_alloc_size: None,
                get_alloc_size_n: None,
                is_host: Some(buft_is_host),
            },
            device,
            context: ctx,
        }))
        .cast(),
        Layout::V6 => Box::into_raw(Box::new(Buft {
            iface: BuftIfaceV6 {
                get_name: Some(buft_get_name),
                alloc_buffer: Some(buft_alloc_buffer),
                get_alignment: Some(buft_get_alignment),
                get_max_size: None,
                get_alloc_size: None,
                is_host: Some(buft_is_host),
                get_alloc_interface: None,
            },
            device,
            context: ctx,
        }))
        .cast(),
    };
    p.cast()
}

unsafe extern "C" fn buft_get_name(_buft: BuftPtr) -> *const c_char {
    c"CoreML".as_ptr()
}

unsafe extern "C" fn buft_get_alignment(_buft: BuftPtr) -> usize {
    ALIGNMENT
}

unsafe extern "C" fn buft_is_host(_buft: BuftPtr) -> bool {
    // Our memory is host memory, but saying so would let llama.cpp's loader bypass set_tensor.
    false
}

const BUFFER_IFACE: GgmlBackendBufferI = GgmlBackendBufferI {
    free_buffer: Some(buffer_free),
    get_base: Some(buffer_get_base),
    init_tensor: None,
    memset_tensor: Some(buffer_memset_tensor),
    set_tensor: Some(buffer_set_tensor),
    get_tensor: Some(buffer_get_tensor),
    set_tensor_2d: None,
    get_tensor_2d: None,
    cpy_tensor: None,
    clear: Some(buffer_clear),
    reset: None,
};

unsafe extern "C" fn buft_alloc_buffer(buft: BuftPtr, size: usize) -> *mut GgmlBackendBuffer {
    guard("alloc_buffer", ptr::null_mut(), || {
        let Some(api) = api() else {
            return ptr::null_mut();
        };
        let Ok(layout) = AllocLayout::from_size_align(size.max(ALIGNMENT), ALIGNMENT) else {
            log::error(&format!("cannot allocate a buffer of {size} bytes"));
            return ptr::null_mut();
        };
        // Not zeroed, as ggml's own CPU buffers: zeroing would make every page of a buffer resident at
        // once (llama.cpp reserves compute buffers for its worst-case graph, 513 MiB for Gemma-3-270M's
        // output head at 512 tokens, and touches a fraction of it).
        // SAFETY: non-zero size, valid alignment.
        let mem = unsafe { alloc(layout) };
        if mem.is_null() {
            log::error(&format!("out of memory allocating {size} bytes"));
            return ptr::null_mut();
        }
        let ctx = Box::into_raw(Box::new(BufferCtx {
            mem,
            layout: Some(layout),
            borrowed: 0,
            weights: WeightRegistry::default(),
        }));
        engine()
            .stats
            .raw_bytes_owned
            .fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: ggml-base allocates the buffer struct and copies the interface by value.
        let buf = unsafe { (api.buffer_init)(buft, BUFFER_IFACE, ctx.cast(), size) };
        if buf.is_null() {
            // SAFETY: `ctx` came from Box::into_raw above and was not handed out.
            drop(unsafe { Box::from_raw(ctx) });
        }
        buf
    })
}

/// A buffer of our type over memory llama.cpp already holds: its mapping of the model file
/// (`buffer_from_host_ptr`, offered when the device says it can). Nothing is copied, so the ANE path
/// holds one extra form of each weight — the prepared one — and the host fallback reads the mapping.
/// Weights are prepared as llama.cpp places them (`init_tensor`), or at first use.
///
/// # Safety
/// `buft` is our buffer type; `mem` is NULL or `size` bytes of host memory that outlive the buffer.
pub unsafe fn from_host_ptr(
    buft: BuftPtr,
    mem: *mut c_void,
    size: usize,
) -> *mut GgmlBackendBuffer {
    let Some(api) = api() else {
        return ptr::null_mut();
    };
    if mem.is_null() {
        return ptr::null_mut();
    }
    let ctx = Box::into_raw(Box::new(BufferCtx {
        mem: mem.cast(),
        layout: None,
        borrowed: size,
        weights: WeightRegistry::over_lent(mem as usize, size),
    }));
    engine()
        .stats
        .raw_bytes_borrowed
        .fetch_add(size as u64, Ordering::Relaxed);
    let mut iface = BUFFER_IFACE;
    iface.init_tensor = Some(buffer_init_tensor);
    // SAFETY: ggml-base allocates the buffer struct and copies the interface by value.
    let buf = unsafe { (api.buffer_init)(buft, iface, ctx.cast(), size) };
    if buf.is_null() {
        // SAFETY: `ctx` came from Box::into_raw above and was not handed out.
        drop(unsafe { Box::from_raw(ctx) });
    }
    buf
}

/// `init_tensor` of a borrowed buffer: the tensor's bytes are already in place (the mapping).
unsafe extern "C" fn buffer_init_tensor(buf: *mut GgmlBackendBuffer, t: *mut GgmlTensor) -> c_int {
    guard("init_tensor", 0, || {
        // SAFETY: our buffer; `t` is a live tensor just placed in it.
        let (Some(c), Some(tr)) = (unsafe { ctx(buf) }, unsafe { TensorRef::from_ptr(t) }) else {
            return 0;
        };
        // Views share their parent's bytes; only whole weights are prepared.
        if engine().repack == Repack::Load && tr.op() == GGML_OP_NONE && !tr.data().is_null() {
            prepare_at_load(c, &tr);
        }
        0
    })
}

/// # Safety
/// `buf` is a buffer created by [`buft_alloc_buffer`] or [`from_host_ptr`].
unsafe fn ctx<'a>(buf: *mut GgmlBackendBuffer) -> Option<&'a BufferCtx> {
    // SAFETY: our buffers carry a BufferCtx as context.
    unsafe {
        buf.as_ref()
            .and_then(|b| b.context.cast::<BufferCtx>().as_ref())
    }
}

/// The prepared-weight registry of a buffer of ours.
///
/// # Safety
/// `buf` is a live buffer whose buffer type is ours.
pub unsafe fn registry<'a>(buf: *mut GgmlBackendBuffer) -> Option<&'a WeightRegistry> {
    // SAFETY: per the contract.
    unsafe { ctx(buf) }.map(|c| &c.weights)
}

unsafe extern "C" fn buffer_free(buf: *mut GgmlBackendBuffer) {
    guard("free_buffer", (), || {
        // SAFETY: called once by ggml-base before it deletes the struct.
        let b = unsafe { &mut *buf };
        if !b.context.is_null() {
            // SAFETY: context is the Box we leaked in alloc.
            drop(unsafe { Box::from_raw(b.context.cast::<BufferCtx>()) });
            b.context = ptr::null_mut();
        }
    })
}

unsafe extern "C" fn buffer_get_base(buf: *mut GgmlBackendBuffer) -> *mut c_void {
    // SAFETY: our buffer.
    match unsafe { ctx(buf) } {
        Some(c) => c.mem.cast(),
        None => ptr::null_mut(),
    }
}

fn released(n: usize) {
    engine()
        .stats
        .weight_bytes_held
        .fetch_sub(n as u64, Ordering::Relaxed);
}

unsafe extern "C" fn buffer_memset_tensor(
    buf: *mut GgmlBackendBuffer,
    t: *mut GgmlTensor,
    value: u8,
    offset: usize,
    size: usize,
) {
    guard("memset_tensor", (), || {
        // SAFETY: ggml-base checked offset + size <= nbytes; tensor data lies in this buffer.
        unsafe {
            let dst = (*t).data.cast::<u8>().add(offset);
            ptr::write_bytes(dst, value, size);
            if let Some(c) = ctx(buf) {
                released(c.weights.invalidate(dst as usize, size));
            }
        }
    })
}

unsafe extern "C" fn buffer_set_tensor(
    buf: *mut GgmlBackendBuffer,
    t: *mut GgmlTensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    guard("set_tensor", (), || {
        // SAFETY: ggml-base checked bounds; source and destination do not overlap (distinct buffers).
        let dst = unsafe {
            let dst = (*t).data.cast::<u8>().add(offset);
            ptr::copy_nonoverlapping(data.cast::<u8>(), dst, size);
            dst
        };
        // SAFETY: our buffer; `t` is a live tensor in it.
        let (Some(c), Some(tr)) = (unsafe { ctx(buf) }, unsafe { TensorRef::from_ptr(t) }) else {
            return;
        };
        released(c.weights.invalidate(dst as usize, size));
        let eng = engine();
        if eng.repack == Repack::Load && offset == 0 {
            // SAFETY: live tensor.
            let whole = api().is_some_and(|a| unsafe { (a.nbytes)(t) } == size);
            if whole {
                prepare_at_load(c, &tr);
            }
        }
    })
}

/// Repacks every 2-D slice of a weight as it is loaded, when the policy may ever offload it.
fn prepare_at_load(c: &BufferCtx, t: &TensorRef<'_>) {
    let Some(wtype) = WeightType::from_ggml(t.type_id() as u32) else {
        return;
    };
    let ne = t.ne();
    if ne.iter().any(|&d| d <= 0) {
        return;
    }
    let (k, n) = (ne[0] as usize, ne[1] as usize);
    let Ok(row) = wtype.row_bytes(k) else { return };
    if t.nb()[0] != wtype.block_bytes() || t.nb()[1] < row {
        return;
    }
    let eng = engine();
    let kind_route = if eng.routes_by_kind() {
        driver::kind_route(&t.name())
    } else {
        driver::KindRoute::default()
    };
    // Past the resident budget, weights are prepared per call: nothing to keep from load.
    if !eng.policy.would_offload_weight(k, n)
        || eng.over_budget(eng.mode_for(wtype, kind_route), n, k)
    {
        return;
    }
    for i3 in 0..ne[3] as usize {
        for i2 in 0..ne[2] as usize {
            // SAFETY: rows of whole blocks checked above; indices in range; the tensor is fully written.
            let (addr, stride) = unsafe { t.slice2d_addr(i2, i3) };
            // SAFETY: as above.
            let bytes = unsafe { t.slice2d_rows(i2, i3, row) };
            if let Err(e) = eng.prepared(&c.weights, addr, stride, wtype, &bytes, n, k, kind_route)
            {
                log::warn(&format!("{}: {e}; it will run on the host", t.name()));
                return;
            }
        }
    }
}

unsafe extern "C" fn buffer_get_tensor(
    _buf: *mut GgmlBackendBuffer,
    t: *const GgmlTensor,
    data: *mut c_void,
    offset: usize,
    size: usize,
) {
    guard("get_tensor", (), || {
        // SAFETY: ggml-base checked bounds; we keep the original bytes, so this round-trips.
        unsafe {
            ptr::copy_nonoverlapping((*t).data.cast::<u8>().add(offset), data.cast::<u8>(), size)
        };
    })
}

unsafe extern "C" fn buffer_clear(buf: *mut GgmlBackendBuffer, value: u8) {
    guard("clear", (), || {
        // SAFETY: our buffer; the whole allocation is ours to write.
        unsafe {
            if let Some(c) = ctx(buf) {
                ptr::write_bytes(c.mem, value, (*buf).size);
                released(c.weights.clear());
            }
        }
    })
}
