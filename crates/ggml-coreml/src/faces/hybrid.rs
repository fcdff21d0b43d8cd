//! The hybrid face (opt-in): a GPU-type device `CoreML-<inner>` that wraps the host's primary device
//! (Metal on Apple; on Linux, for tests, the CPU device). Its buffer type is the inner device's, so
//! weights stay where the inner device wants them; its backend receives the whole graph, hands decode
//! graphs to the inner backend unsplit, and splits prefill graphs only around the MUL_MATs the policy
//! sends to the ANE. The same router serves both faces.
//!
//! Opt in with `GGML_COREML_HYBRID=<inner device name>` (e.g. `Metal`, `MTL0`, `CPU`) before the library
//! is loaded, or call `ggml_backend_coreml_enable_hybrid("<name>")` at any time before model load
//! (the device is then registered with ggml on the spot). Select it with llama.cpp's `--device`.

use std::ffi::{CString, c_char, c_int, c_void};
use std::ptr;
use std::sync::Mutex;

use crate::engine::engine;
use crate::faces::BackendCtx;
use crate::faces::hybrid_buffer;
use crate::ffi::abi::*;
use crate::ffi::ggml::{api, cstr_or};
use crate::ffi::guard::guard;
use crate::host::HostBackend;
use crate::log;
use crate::router::{self, Face, RouterCtx};
use crate::weights::RegistryRef;

pub(crate) static GUID: [u8; 16] = *b"ggml-coreml-hyb\0";

/// Context of one hybrid device (leaked: devices live as long as the process).
pub struct HybridDev {
    pub inner: *mut Dev,
    /// The inner device's default buffer type, wrapped (see `hybrid_buffer`).
    buft: BuftPtr,
    pub inner_name: String,
    name: CString,
    description: CString,
}

struct HybridList(Vec<*mut Dev>);
// SAFETY: the devices are immutable once created; ggml reads them from any thread.
unsafe impl Send for HybridList {}

static DEVICES: Mutex<HybridList> = Mutex::new(HybridList(Vec::new()));

/// Finds the inner device by device name, then by registry name (first device of that registry).
fn find_inner(name: &str) -> Option<*mut Dev> {
    let api = api()?;
    let c = CString::new(name).ok()?;
    // SAFETY: registry lookups by name; NULL when absent.
    unsafe {
        let d = (api.dev_by_name)(c.as_ptr());
        if !d.is_null() {
            return Some(d);
        }
        let reg = (api.reg_by_name)(c.as_ptr());
        if !reg.is_null() && (api.reg_dev_count)(reg) > 0 {
            let d = (api.reg_dev_get)(reg, 0);
            if !d.is_null() {
                return Some(d);
            }
        }
    }
    None
}

/// Creates (once per inner name) the hybrid device wrapping `inner_name`.
pub fn create(inner_name: &str, reg: *mut Reg) -> Result<*mut Dev, String> {
    let mut list = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    for &d in &list.0 {
        // SAFETY: our own devices carry a HybridDev context.
        let h = unsafe { &*(*d).context.cast::<HybridDev>() };
        if h.inner_name.eq_ignore_ascii_case(inner_name) {
            return Ok(d);
        }
    }
    let inner = find_inner(inner_name)
        .ok_or_else(|| format!("no device or registry named {inner_name:?}"))?;
    if crate::faces::accel::is_ours(inner) || list.0.contains(&inner) {
        return Err("cannot wrap a CoreML device".into());
    }
    let api = api().ok_or("ggml not bound")?;
    // SAFETY: live device; static strings.
    let (iname, idesc) = unsafe {
        (
            cstr_or((api.dev_name)(inner), "?"),
            cstr_or((api.dev_description)(inner), "?"),
        )
    };
    // SAFETY: a live device's default buffer type (static in its backend).
    let inner_buft = unsafe { (api.dev_buffer_type)(inner) };
    if inner_buft.is_null() {
        return Err(format!("{iname} has no default buffer type"));
    }
    let ctx = Box::into_raw(Box::new(HybridDev {
        inner,
        buft: ptr::null_mut(),
        inner_name: inner_name.to_string(),
        name: CString::new(format!("CoreML-{inner_name}")).map_err(|_| "bad name")?,
        description: CString::new(format!("ANE matmuls + {iname} ({idesc})")).unwrap_or_default(),
    }));
    let dev = Box::into_raw(Box::new(GgmlBackendDevice {
        iface: DEVICE_IFACE,
        reg,
        context: ctx.cast(),
    }));
    // SAFETY: `ctx` was just made and is not shared yet; the wrapper names our device as its own;
    // `inner_buft` is the inner device's live default buffer type.
    unsafe { (*ctx).buft = hybrid_buffer::new_buft(api.layout, dev, inner_buft) };
    list.0.push(dev);
    log::info(&format!("hybrid device CoreML-{inner_name} wraps {iname}"));
    Ok(dev)
}

/// Whether a hybrid device for `inner_name` exists already.
pub fn is_known(inner_name: &str) -> bool {
    let list = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    list.0.iter().any(|&d| {
        // SAFETY: our own devices carry a HybridDev context.
        unsafe { &*(*d).context.cast::<HybridDev>() }
            .inner_name
            .eq_ignore_ascii_case(inner_name)
    })
}

pub fn is_hybrid(dev: *mut Dev) -> bool {
    DEVICES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .contains(&dev)
}

/// # Safety
/// `dev` is one of our hybrid devices.
unsafe fn hctx<'a>(dev: *mut Dev) -> &'a HybridDev {
    // SAFETY: per the contract.
    unsafe { &*(*dev).context.cast::<HybridDev>() }
}

const DEVICE_IFACE: GgmlBackendDeviceI = GgmlBackendDeviceI {
    get_name: Some(dev_get_name),
    get_description: Some(dev_get_description),
    get_memory: Some(dev_get_memory),
    get_type: Some(dev_get_type),
    get_props: Some(dev_get_props),
    init_backend: Some(dev_init_backend),
    get_buffer_type: Some(dev_get_buffer_type),
    get_host_buffer_type: Some(dev_get_host_buffer_type),
    buffer_from_host_ptr: Some(dev_buffer_from_host_ptr),
    supports_op: Some(dev_supports_op),
    supports_buft: Some(dev_supports_buft),
    offload_op: Some(dev_offload_op),
    event_new: Some(dev_event_new),
    event_free: Some(dev_event_free),
    event_synchronize: Some(dev_event_synchronize),
};

// Events are the inner device's own (their `device` field names it, so ggml-base sends
// `event_free` / `event_synchronize` straight there); ours only forward.
unsafe extern "C" fn dev_event_new(dev: *mut Dev) -> *mut GgmlBackendEvent {
    guard("hybrid event_new", ptr::null_mut(), || {
        // SAFETY: forwards to the inner device (NULL when it has no events).
        api().map_or(ptr::null_mut(), |a| unsafe {
            (a.event_new)(hctx(dev).inner)
        })
    })
}

unsafe extern "C" fn dev_event_free(_dev: *mut Dev, event: *mut GgmlBackendEvent) {
    guard("hybrid event_free", (), || {
        if let Some(a) = api() {
            // SAFETY: an event made by the inner device.
            unsafe { (a.event_free)(event) };
        }
    })
}

unsafe extern "C" fn dev_event_synchronize(_dev: *mut Dev, event: *mut GgmlBackendEvent) {
    guard("hybrid event_synchronize", (), || {
        if let Some(a) = api() {
            // SAFETY: an event made by the inner device.
            unsafe { (a.event_synchronize)(event) };
        }
    })
}

unsafe extern "C" fn dev_get_name(dev: *mut Dev) -> *const c_char {
    // SAFETY: ggml calls our iface with our device.
    unsafe { hctx(dev) }.name.as_ptr()
}

unsafe extern "C" fn dev_get_description(dev: *mut Dev) -> *const c_char {
    // SAFETY: as above.
    unsafe { hctx(dev) }.description.as_ptr()
}

unsafe extern "C" fn dev_get_memory(dev: *mut Dev, free: *mut usize, total: *mut usize) {
    guard("hybrid get_memory", (), || {
        if let Some(api) = api() {
            // SAFETY: forwards to the inner device with ggml's out pointers.
            unsafe { (api.dev_memory)(hctx(dev).inner, free, total) };
        }
    })
}

unsafe extern "C" fn dev_get_type(_dev: *mut Dev) -> c_int {
    DEV_TYPE_GPU
}

unsafe extern "C" fn dev_get_props(dev: *mut Dev, props: *mut GgmlBackendDevProps) {
    guard("hybrid get_props", (), || {
        let Some(api) = api() else { return };
        // SAFETY: ggml passes a zeroed props struct; the inner device fills it first.
        unsafe {
            let h = hctx(dev);
            (api.dev_get_props)(h.inner, props);
            let p = &mut *props;
            p.name = h.name.as_ptr();
            p.description = h.description.as_ptr();
            p.type_ = DEV_TYPE_GPU;
            p.device_id = ptr::null();
            // Asynchronous copies, events and buffers over host memory (llama.cpp's mapping of the
            // model file: Metal wraps it without a copy) are the inner device's, forwarded.
        }
    })
}

unsafe extern "C" fn dev_buffer_from_host_ptr(
    dev: *mut Dev,
    ptr: *mut c_void,
    size: usize,
    max_tensor_size: usize,
) -> *mut GgmlBackendBuffer {
    guard("hybrid buffer_from_host_ptr", ptr::null_mut(), || {
        let Some(api) = api() else {
            return ptr::null_mut();
        };
        // SAFETY: forwards to the inner device (NULL if it cannot); the new buffer is tracked like the
        // wrapper's own, so its prepared weights go when it is freed.
        unsafe {
            let buf = (api.dev_buffer_from_host_ptr)(hctx(dev).inner, ptr, size, max_tensor_size);
            hybrid_buffer::track_foreign(buf, ptr as usize, size);
            buf
        }
    })
}

unsafe extern "C" fn dev_get_buffer_type(dev: *mut Dev) -> BuftPtr {
    // SAFETY: our device; the wrapper was made with it.
    unsafe { hctx(dev) }.buft
}

unsafe extern "C" fn dev_get_host_buffer_type(dev: *mut Dev) -> BuftPtr {
    // SAFETY: forwards to the inner device.
    api().map_or(ptr::null_mut(), |a| unsafe {
        (a.dev_host_buffer_type)(hctx(dev).inner)
    })
}

unsafe extern "C" fn dev_supports_op(dev: *mut Dev, op: *const GgmlTensor) -> bool {
    // SAFETY: forwards to the inner device; the router decides per node at compute time.
    guard("hybrid supports_op", false, || {
        api().is_some_and(|a| unsafe { (a.dev_supports_op)(hctx(dev).inner, op) })
    })
}

unsafe extern "C" fn dev_supports_buft(dev: *mut Dev, buft: BuftPtr) -> bool {
    // SAFETY: forwards to the inner device.
    guard("hybrid supports_buft", false, || {
        let h = unsafe { hctx(dev) };
        buft == h.buft || api().is_some_and(|a| unsafe { (a.dev_supports_buft)(h.inner, buft) })
    })
}

unsafe extern "C" fn dev_offload_op(dev: *mut Dev, op: *const GgmlTensor) -> bool {
    // SAFETY: forwards to the inner device.
    guard("hybrid offload_op", false, || {
        api().is_some_and(|a| unsafe { (a.dev_offload_op)(hctx(dev).inner, op) })
    })
}

const BACKEND_IFACE: GgmlBackendI = GgmlBackendI {
    get_name: Some(backend_get_name),
    free: Some(backend_free),
    set_tensor_async: None,
    get_tensor_async: None,
    set_tensor_2d_async: None,
    get_tensor_2d_async: None,
    cpy_tensor_async: None,
    synchronize: Some(backend_synchronize),
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
    guard("hybrid init_backend", ptr::null_mut(), || {
        // SAFETY: our device.
        let h = unsafe { hctx(dev) };
        let Some(api) = api() else {
            return ptr::null_mut();
        };
        // SAFETY: static name of a live device.
        let inner_dev_name = unsafe { cstr_or((api.dev_name)(h.inner), "CPU") };
        let host = match HostBackend::new(Some(&inner_dev_name)) {
            Ok(host) => host,
            Err(e) => {
                log::error(&format!(
                    "hybrid: cannot create the inner backend {inner_dev_name}: {e}"
                ));
                return ptr::null_mut();
            }
        };
        let _ = engine();
        let iface = backend_iface(host.raw());
        let ctx = Box::new(BackendCtx {
            router: RouterCtx::new(host),
            name: h.name.clone(),
        });
        Box::into_raw(Box::new(GgmlBackend {
            guid: &GUID,
            iface,
            device: dev,
            context: Box::into_raw(ctx).cast(),
        }))
    })
}

/// Our interface, with the inner backend's asynchronous entry points forwarded where it has them (a
/// NULL slot tells ggml-base to fall back to the synchronous path, as it would for the inner backend).
fn backend_iface(inner: *mut GgmlBackend) -> GgmlBackendI {
    let mut i = BACKEND_IFACE;
    // SAFETY: the inner backend was just created and is live.
    let ii = unsafe { &(*inner).iface };
    if ii.set_tensor_async.is_some() {
        i.set_tensor_async = Some(backend_set_tensor_async);
    }
    if ii.get_tensor_async.is_some() {
        i.get_tensor_async = Some(backend_get_tensor_async);
    }
    if ii.set_tensor_2d_async.is_some() {
        i.set_tensor_2d_async = Some(backend_set_tensor_2d_async);
    }
    if ii.get_tensor_2d_async.is_some() {
        i.get_tensor_2d_async = Some(backend_get_tensor_2d_async);
    }
    if ii.cpy_tensor_async.is_some() {
        i.cpy_tensor_async = Some(backend_cpy_tensor_async);
    }
    if ii.event_record.is_some() {
        i.event_record = Some(backend_event_record);
    }
    if ii.event_wait.is_some() {
        i.event_wait = Some(backend_event_wait);
    }
    i
}

/// The inner backend of one of our hybrid backends (NULL for any other backend).
///
/// # Safety
/// `b` is NULL or a live backend.
unsafe fn inner_backend(b: *mut GgmlBackend) -> *mut GgmlBackend {
    // SAFETY: compare guid pointers before touching the context.
    match unsafe { b.as_ref() } {
        Some(be) if ptr::eq(be.guid, &GUID) => {
            // SAFETY: our backends carry a BackendCtx.
            unsafe { &*be.context.cast::<BackendCtx>() }
                .router
                .host
                .raw()
        }
        _ => ptr::null_mut(),
    }
}

/// A write through the backend API into a tracked weight buffer drops what we prepared from it.
///
/// # Safety
/// `t` is a live, allocated tensor.
unsafe fn written(t: *mut GgmlTensor, offset: usize, len: usize) {
    // SAFETY: per the contract.
    let (buf, data) = unsafe { ((*t).buffer, (*t).data) };
    hybrid_buffer::invalidate(buf, data as usize + offset, len);
}

unsafe extern "C" fn backend_set_tensor_async(
    b: *mut GgmlBackend,
    t: *mut GgmlTensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    guard("hybrid set_tensor_async", (), || {
        // SAFETY: our backend; its inner backend has this slot (backend_iface); ggml-base checked bounds.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.set_tensor_async {
                f(inner, t, data, offset, size);
            }
            written(t, offset, size);
        }
    })
}

unsafe extern "C" fn backend_get_tensor_async(
    b: *mut GgmlBackend,
    t: *const GgmlTensor,
    data: *mut c_void,
    offset: usize,
    size: usize,
) {
    guard("hybrid get_tensor_async", (), || {
        // SAFETY: as above.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.get_tensor_async {
                f(inner, t, data, offset, size);
            }
        }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn backend_set_tensor_2d_async(
    b: *mut GgmlBackend,
    t: *mut GgmlTensor,
    data: *const c_void,
    offset: usize,
    size: usize,
    n_copies: usize,
    stride_tensor: usize,
    stride_data: usize,
) {
    guard("hybrid set_tensor_2d_async", (), || {
        // SAFETY: as above.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.set_tensor_2d_async {
                f(
                    inner,
                    t,
                    data,
                    offset,
                    size,
                    n_copies,
                    stride_tensor,
                    stride_data,
                );
            }
            written(
                t,
                offset,
                hybrid_buffer::span_2d(size, n_copies, stride_tensor),
            );
        }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn backend_get_tensor_2d_async(
    b: *mut GgmlBackend,
    t: *const GgmlTensor,
    data: *mut c_void,
    offset: usize,
    size: usize,
    n_copies: usize,
    stride_tensor: usize,
    stride_data: usize,
) {
    guard("hybrid get_tensor_2d_async", (), || {
        // SAFETY: as above.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.get_tensor_2d_async {
                f(
                    inner,
                    t,
                    data,
                    offset,
                    size,
                    n_copies,
                    stride_tensor,
                    stride_data,
                );
            }
        }
    })
}

unsafe extern "C" fn backend_cpy_tensor_async(
    b_src: *mut GgmlBackend,
    b_dst: *mut GgmlBackend,
    src: *const GgmlTensor,
    dst: *mut GgmlTensor,
) -> bool {
    guard("hybrid cpy_tensor_async", false, || {
        // SAFETY: ggml-base calls the destination backend's slot: `b_dst` is ours; a source that is
        // one of ours is replaced by its inner backend, so the inner device sees its own kind.
        unsafe {
            let inner = inner_backend(b_dst);
            let src_inner = match inner_backend(b_src) {
                p if p.is_null() => b_src,
                p => p,
            };
            let Some(f) = (*inner).iface.cpy_tensor_async else {
                return false;
            };
            let done = f(src_inner, inner, src, dst);
            if done && let Some(api) = api() {
                written(dst, 0, (api.nbytes)(dst));
            }
            done
        }
    })
}

unsafe extern "C" fn backend_event_record(b: *mut GgmlBackend, event: *mut GgmlBackendEvent) {
    guard("hybrid event_record", (), || {
        // SAFETY: our backend; an event of the inner device.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.event_record {
                f(inner, event);
            }
        }
    })
}

unsafe extern "C" fn backend_event_wait(b: *mut GgmlBackend, event: *mut GgmlBackendEvent) {
    guard("hybrid event_wait", (), || {
        // SAFETY: as above.
        unsafe {
            let inner = inner_backend(b);
            if let Some(f) = (*inner).iface.event_wait {
                f(inner, event);
            }
        }
    })
}

unsafe extern "C" fn backend_get_name(b: *mut GgmlBackend) -> *const c_char {
    // SAFETY: our backend.
    unsafe { &*(*b).context.cast::<BackendCtx>() }.name.as_ptr()
}

unsafe extern "C" fn backend_free(b: *mut GgmlBackend) {
    guard("hybrid backend_free", (), || {
        if b.is_null() {
            return;
        }
        // SAFETY: created by dev_init_backend; freed once by ggml.
        let backend = unsafe { Box::from_raw(b) };
        // SAFETY: as above.
        let ctx = unsafe { Box::from_raw(backend.context.cast::<BackendCtx>()) };
        engine().write_files(true);
        log::info(&format!(
            "hybrid summary: {} graphs unsplit to {}, {} split ({} split elsewhere than around offloaded MUL_MATs); {}",
            ctx.router.unsplit_graphs,
            ctx.router.host.name,
            ctx.router.split_graphs,
            ctx.router.oversplit_graphs,
            engine().stats.summary(engine().executor.surface_bytes())
        ));
    })
}

unsafe extern "C" fn backend_synchronize(b: *mut GgmlBackend) {
    guard("hybrid synchronize", (), || {
        // SAFETY: our backend.
        unsafe { &*(*b).context.cast::<BackendCtx>() }
            .router
            .host
            .synchronize();
    })
}

unsafe extern "C" fn backend_graph_compute(b: *mut GgmlBackend, g: *mut GgmlCgraph) -> c_int {
    guard("hybrid graph_compute", GGML_STATUS_FAILED, || {
        // SAFETY: our backend; ggml drives one graph_compute at a time per backend.
        let ctx = unsafe { &mut *(*b).context.cast::<BackendCtx>() };
        // SAFETY: the graph ggml passed to graph_compute.
        unsafe {
            router::compute(&mut ctx.router, g, Face::Hybrid, &|w| {
                hybrid_buffer::registry(w.buffer()).map(RegistryRef::Shared)
            })
        }
    })
}

/// Registers the hybrid device with ggml now (for `ggml_backend_coreml_enable_hybrid` after load).
///
/// # Safety
/// `dev` is a device made by [`create`].
pub unsafe fn register_now(dev: *mut Dev) {
    if let Some(api) = api() {
        // SAFETY: a fully built device of our registry; ggml appends it to its device list.
        unsafe { (api.device_register)(dev) };
    }
}
