//! The ACCEL device `CoreML`: llama.cpp puts CPU-layer weights in its buffer type (ahead of
//! CPU_REPACK) when `supports_op` accepts them; its backend runs the MUL_MATs over those weights,
//! on the executor or — when the policy says host — on the CPU backend.

use std::ffi::{c_char, c_int};
use std::ptr;

use crate::engine::engine;
use crate::faces::BackendCtx;
use crate::faces::buffer;
use crate::faces::reg::{self, globals};
use crate::ffi::abi::*;
use crate::ffi::ggml::api;
use crate::ffi::guard::guard;
use crate::ffi::tensor::TensorRef;
use crate::host::HostBackend;
use crate::log;
use crate::router::{self, RouterCtx};
use crate::weights::RegistryRef;

pub const NAME: &std::ffi::CStr = c"CoreML";
pub(crate) static GUID: [u8; 16] = *b"ggml-coreml-ane\0";

pub const DEVICE_IFACE: GgmlBackendDeviceI = GgmlBackendDeviceI {
    get_name: Some(dev_get_name),
    get_description: Some(dev_get_description),
    get_memory: Some(dev_get_memory),
    get_type: Some(dev_get_type),
    get_props: Some(dev_get_props),
    init_backend: Some(dev_init_backend),
    get_buffer_type: Some(dev_get_buffer_type),
    get_host_buffer_type: None,
    buffer_from_host_ptr: Some(dev_buffer_from_host_ptr),
    supports_op: Some(dev_supports_op),
    supports_buft: Some(dev_supports_buft),
    offload_op: None,
    event_new: None,
    event_free: None,
    event_synchronize: None,
};

unsafe extern "C" fn dev_get_name(_dev: *mut Dev) -> *const c_char {
    NAME.as_ptr()
}

unsafe extern "C" fn dev_get_description(_dev: *mut Dev) -> *const c_char {
    match globals() {
        Some(g) => g.description.as_ptr(),
        None => NAME.as_ptr(),
    }
}

unsafe extern "C" fn dev_get_memory(_dev: *mut Dev, free: *mut usize, total: *mut usize) {
    // Nothing to report: weights live in host memory (as BLAS does).
    // SAFETY: ggml passes valid out pointers.
    unsafe {
        if !free.is_null() {
            *free = 0;
        }
        if !total.is_null() {
            *total = 0;
        }
    }
}

unsafe extern "C" fn dev_get_type(_dev: *mut Dev) -> c_int {
    DEV_TYPE_ACCEL
}

unsafe extern "C" fn dev_get_props(dev: *mut Dev, props: *mut GgmlBackendDevProps) {
    guard("get_props", (), || {
        // SAFETY: ggml passes a props struct it zeroed.
        let Some(p) = (unsafe { props.as_mut() }) else {
            return;
        };
        // SAFETY: our own getters.
        unsafe {
            p.name = dev_get_name(dev);
            p.description = dev_get_description(dev);
        }
        p.memory_free = 0;
        p.memory_total = 0;
        p.type_ = DEV_TYPE_ACCEL;
        p.device_id = ptr::null();
        // Host-pointer buffers: llama.cpp lends us its mapping of the model file instead of copying
        // weights into our memory (`buffer::from_host_ptr`).
        p.caps = GgmlBackendDevCaps {
            mmap_support: true,
            buffer_from_host_ptr: from_host_ptr_enabled(),
            ..Default::default()
        };
    })
}

/// `GGML_COREML_MMAP=0`: copy weights into our own memory at load (the behaviour before weights were
/// borrowed from llama.cpp's mapping; for comparisons).
fn from_host_ptr_enabled() -> bool {
    std::env::var("GGML_COREML_MMAP").map_or(true, |v| v != "0")
}

unsafe extern "C" fn dev_buffer_from_host_ptr(
    _dev: *mut Dev,
    ptr: *mut std::ffi::c_void,
    size: usize,
    _max_tensor_size: usize,
) -> *mut GgmlBackendBuffer {
    guard("buffer_from_host_ptr", ptr::null_mut(), || {
        match globals() {
            // SAFETY: our buffer type; llama.cpp keeps its mapping alive as long as the buffer.
            Some(g) if from_host_ptr_enabled() => unsafe {
                buffer::from_host_ptr(g.buft, ptr, size)
            },
            _ => ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn dev_get_buffer_type(_dev: *mut Dev) -> BuftPtr {
    globals().map_or(ptr::null_mut(), |g| g.buft)
}

unsafe extern "C" fn dev_supports_buft(_dev: *mut Dev, buft: BuftPtr) -> bool {
    globals().is_some_and(|g| g.buft == buft)
}

unsafe extern "C" fn dev_supports_op(_dev: *mut Dev, op: *const GgmlTensor) -> bool {
    guard("supports_op", false, || {
        // SAFETY: ggml passes a live tensor.
        let Some(node) = (unsafe { TensorRef::from_ptr(op) }) else {
            return false;
        };
        match node.op() {
            GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE => {
                true
            }
            GGML_OP_MUL_MAT => {
                let Some(g) = globals() else { return false };
                router::claim(&node, |b| b == g.buft, || cpu_supports(op))
            }
            _ => false,
        }
    })
}

fn cpu_supports(op: *const GgmlTensor) -> bool {
    let Some(api) = api() else { return false };
    // SAFETY: registry lookup; the CPU device is always registered last by ggml.
    unsafe {
        let cpu = (api.dev_by_type)(DEV_TYPE_CPU);
        !cpu.is_null() && (api.dev_supports_op)(cpu, op)
    }
}

const BACKEND_IFACE: GgmlBackendI = GgmlBackendI {
    get_name: Some(backend_get_name),
    free: Some(backend_free),
    set_tensor_async: None,
    get_tensor_async: None,
    set_tensor_2d_async: None,
    get_tensor_2d_async: None,
    cpy_tensor_async: None,
    synchronize: None,
    graph_plan_create: None,
    graph_plan_free: None,
    graph_plan_update: None,
    graph_plan_compute: None,
    graph_compute: Some(backend_graph_compute),
    event_record: None,
    event_wait: None,
    graph_optimize: None,
};

unsafe extern "C" fn dev_init_backend(dev: *mut Dev, _params: *const c_char) -> *mut GgmlBackend {
    guard("init_backend", ptr::null_mut(), || {
        let host = match HostBackend::new(None) {
            Ok(h) => h,
            Err(e) => {
                log::error(&format!("cannot create the host delegate: {e}"));
                return ptr::null_mut();
            }
        };
        let _ = engine();
        let ctx = Box::new(BackendCtx {
            router: RouterCtx::new(host),
            name: NAME.to_owned(),
        });
        Box::into_raw(Box::new(GgmlBackend {
            guid: &GUID,
            iface: BACKEND_IFACE,
            device: dev,
            context: Box::into_raw(ctx).cast(),
        }))
    })
}

unsafe extern "C" fn backend_get_name(_b: *mut GgmlBackend) -> *const c_char {
    NAME.as_ptr()
}

unsafe extern "C" fn backend_free(b: *mut GgmlBackend) {
    guard("backend_free", (), || {
        if b.is_null() {
            return;
        }
        // SAFETY: `b` and its context were created by dev_init_backend; ggml frees a backend once.
        let backend = unsafe { Box::from_raw(b) };
        drop(unsafe { Box::from_raw(backend.context.cast::<BackendCtx>()) });
        let eng = engine();
        eng.write_files(true);
        log::info(&format!(
            "summary: {}",
            eng.stats.summary(eng.executor.surface_bytes())
        ));
    })
}

unsafe extern "C" fn backend_graph_compute(b: *mut GgmlBackend, g: *mut GgmlCgraph) -> c_int {
    guard("graph_compute", GGML_STATUS_FAILED, || {
        // SAFETY: our backend; ggml drives one graph_compute at a time per backend.
        let ctx = unsafe { &mut *(*b).context.cast::<BackendCtx>() };
        // SAFETY: the graph ggml passed to graph_compute.
        unsafe { router::compute(&mut ctx.router, g, router::Face::Accel, &registry_of) }
    })
}

/// The prepared-weight registry of a tensor's buffer, if that buffer is one of ours.
pub fn registry_of<'t>(t: &TensorRef<'t>) -> Option<RegistryRef<'t>> {
    let buft = globals()?.buft;
    if buft.is_null() || t.buft() != buft {
        return None;
    }
    // SAFETY: the tensor's buffer has our buffer type, so its context is a BufferCtx.
    unsafe { buffer::registry(t.buffer()) }.map(RegistryRef::Borrowed)
}

pub fn is_ours(dev: *mut Dev) -> bool {
    reg::globals().is_some_and(|g| g.accel_dev == dev)
}
