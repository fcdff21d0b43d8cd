//! The host path: nodes the ANE does not take run on an inner ggml backend (the CPU backend for the
//! ACCEL face), through the public ggml API, on the original bytes — so they run at that backend's speed.

use std::ffi::{CString, c_int, c_void};
use std::ptr;

use crate::ffi::abi::*;
use crate::ffi::ggml::{GgmlApi, api, cstr_or};
use crate::log;

/// Nodes per inner-backend call; longer runs are cut into several calls.
const GRAPH_SIZE: usize = 4096;

type SetThreads = unsafe extern "C" fn(*mut GgmlBackend, c_int);

/// An inner backend plus a private graph used to hand it a list of nodes.
pub struct HostBackend {
    backend: *mut GgmlBackend,
    ctx: *mut GgmlContext,
    graph: *mut GgmlCgraph,
    set_threads: Option<SetThreads>,
    pub name: String,
}

// SAFETY: the pointers are owned by this value and only used by the thread that drives the backend
// (ggml never runs one backend's graph_compute concurrently).
unsafe impl Send for HostBackend {}

impl HostBackend {
    /// The CPU backend, or the device named `name`.
    pub fn new(dev_name: Option<&str>) -> Result<HostBackend, String> {
        let api = api().ok_or("ggml not bound")?;
        // SAFETY: ggml registry lookups; NULL when absent.
        let dev = unsafe {
            match dev_name {
                Some(n) => {
                    let c = CString::new(n).map_err(|_| "bad device name")?;
                    (api.dev_by_name)(c.as_ptr())
                }
                None => (api.dev_by_type)(DEV_TYPE_CPU),
            }
        };
        if dev.is_null() {
            return Err(format!(
                "no {} device registered",
                dev_name.unwrap_or("CPU")
            ));
        }
        // SAFETY: `dev` is a registered device; params NULL as llama.cpp does.
        let backend = unsafe { (api.dev_init)(dev, ptr::null()) };
        if backend.is_null() {
            return Err("inner backend failed to initialise".into());
        }
        // SAFETY: `dev` is a live device; name is a static string.
        let name = unsafe { cstr_or((api.dev_name)(dev), "?") };
        // SAFETY: registry proc lookup by name.
        let set_threads = unsafe {
            let reg = (api.dev_backend_reg)(dev);
            let p = if reg.is_null() {
                ptr::null_mut()
            } else {
                (api.reg_get_proc_address)(reg, c"ggml_backend_set_n_threads".as_ptr())
            };
            if p.is_null() {
                None
            } else {
                Some(std::mem::transmute::<*mut c_void, SetThreads>(p))
            }
        };
        let (ctx, graph) = new_graph(api).inspect_err(|_| {
            // SAFETY: backend was created above and is not used elsewhere.
            unsafe { (api.backend_free)(backend) };
        })?;
        Ok(HostBackend {
            backend,
            ctx,
            graph,
            set_threads,
            name,
        })
    }

    pub fn set_threads(&self, n: c_int) {
        if let Some(f) = self.set_threads {
            // SAFETY: the inner reg's own setter, called on its own backend.
            unsafe { f(self.backend, n) };
        }
    }

    pub fn raw(&self) -> *mut GgmlBackend {
        self.backend
    }

    /// Hands a whole graph to the inner backend.
    ///
    /// # Safety
    /// `graph` is a live graph whose tensors are allocated where the inner backend can use them.
    pub unsafe fn compute_graph(&mut self, graph: *mut GgmlCgraph) -> i32 {
        let Some(api) = api() else {
            return GGML_STATUS_FAILED;
        };
        // SAFETY: the graph ggml gave us; the inner backend computes it synchronously.
        unsafe { (api.backend_graph_compute)(self.backend, graph) }
    }

    /// Waits for the inner backend.
    pub fn synchronize(&self) {
        if let Some(api) = api() {
            // SAFETY: our live inner backend.
            unsafe { (api.synchronize)(self.backend) };
        }
    }

    /// Computes `nodes` in order on the inner backend.
    pub fn compute(&mut self, nodes: &[*mut GgmlTensor]) -> i32 {
        let Some(api) = api() else {
            return GGML_STATUS_FAILED;
        };
        for chunk in nodes.chunks(GRAPH_SIZE) {
            // SAFETY: our private graph has room for GRAPH_SIZE nodes; nodes are live tensors of the
            // caller's graph, already allocated.
            let st = unsafe {
                (api.graph_clear)(self.graph);
                for &n in chunk {
                    (api.graph_add_node)(self.graph, n);
                }
                (api.backend_graph_compute)(self.backend, self.graph)
            };
            if st != GGML_STATUS_SUCCESS {
                log::error(&format!(
                    "inner backend {} failed with status {st}",
                    self.name
                ));
                return st;
            }
        }
        GGML_STATUS_SUCCESS
    }
}

fn new_graph(api: &GgmlApi) -> Result<(*mut GgmlContext, *mut GgmlCgraph), String> {
    // SAFETY: plain ggml context creation with no tensor data; the graph lives in the context.
    unsafe {
        let size = (api.graph_overhead_custom)(GRAPH_SIZE, false) + 4096;
        let ctx = (api.init)(GgmlInitParams {
            mem_size: size,
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        });
        if ctx.is_null() {
            return Err("ggml_init failed".into());
        }
        let g = (api.new_graph_custom)(ctx, GRAPH_SIZE, false);
        if g.is_null() {
            (api.free)(ctx);
            return Err("ggml_new_graph_custom failed".into());
        }
        Ok((ctx, g))
    }
}

impl Drop for HostBackend {
    fn drop(&mut self) {
        if let Some(api) = api() {
            // SAFETY: both were created by us and are dropped once.
            unsafe {
                (api.backend_free)(self.backend);
                (api.free)(self.ctx);
            }
        }
    }
}
