//! The host path: nodes the ANE does not take run on an inner ggml backend (the CPU backend for the
//! ACCEL face), through the public ggml API, on the original bytes — so they run at that backend's speed.

use std::ffi::{CString, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use ggml_coreml_program::pool::Pool;

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
    /// The CPU backend's workers, lent to the executor's GEMM (None: not a CPU backend, or a host
    /// without `ggml_custom_4d`).
    pool: Option<Arc<GgmlPool>>,
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
        let (ctx, graph) = new_graph(api, GRAPH_SIZE, true).inspect_err(|_| {
            // SAFETY: backend was created above and is not used elsewhere.
            unsafe { (api.backend_free)(backend) };
        })?;
        // SAFETY: registry lookup; the CPU device is a static registered device.
        let is_cpu = dev == unsafe { (api.dev_by_type)(DEV_TYPE_CPU) };
        // GGML_COREML_POOL=0: threads of our own per matmul instead (for comparisons).
        let lend = std::env::var("GGML_COREML_POOL").map_or(true, |v| v != "0");
        let pool = if is_cpu && lend {
            match GgmlPool::new(api, backend) {
                Ok(p) => Some(Arc::new(p)),
                Err(why) => {
                    log::debug(&format!("executor threads are spawned per matmul: {why}"));
                    None
                }
            }
        } else {
            None
        };
        Ok(HostBackend {
            backend,
            ctx,
            graph,
            set_threads,
            pool,
            name,
        })
    }

    /// Worker threads of the inner CPU backend the executor may borrow (see [`GgmlPool`]).
    pub fn pool(&self) -> Option<Arc<dyn Pool>> {
        self.pool.clone().map(|p| p as Arc<dyn Pool>)
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

    /// Hands a whole graph to the inner backend without waiting for it ([`Self::synchronize`] does).
    ///
    /// # Safety
    /// `graph` is a live graph whose tensors are allocated where the inner backend can use them.
    pub unsafe fn compute_graph_async(&mut self, graph: *mut GgmlCgraph) -> i32 {
        let Some(api) = api() else {
            return GGML_STATUS_FAILED;
        };
        // SAFETY: the graph ggml gave us; an asynchronous inner backend queues it.
        unsafe { (api.graph_compute_async)(self.backend, graph) }
    }

    /// Waits for the inner backend.
    pub fn synchronize(&self) {
        if let Some(api) = api() {
            // SAFETY: our live inner backend.
            unsafe { (api.synchronize)(self.backend) };
        }
    }

    /// Computes `nodes` in order on the inner backend; an asynchronous inner backend may still be
    /// running them when this returns ([`Self::synchronize`] waits).
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
                (api.graph_compute_async)(self.backend, self.graph)
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

/// A ggml context holding an empty graph of `nodes` nodes; `no_alloc: false` leaves 64 KiB for tensors.
fn new_graph(
    api: &GgmlApi,
    nodes: usize,
    no_alloc: bool,
) -> Result<(*mut GgmlContext, *mut GgmlCgraph), String> {
    let tensors = if no_alloc { 4096 } else { 64 * 1024 };
    // SAFETY: plain ggml context creation; the graph lives in the context.
    unsafe {
        let ctx = (api.init)(GgmlInitParams {
            mem_size: (api.graph_overhead_custom)(nodes, false) + tensors,
            mem_buffer: ptr::null_mut(),
            no_alloc,
        });
        if ctx.is_null() {
            return Err("ggml_init failed".into());
        }
        let g = (api.new_graph_custom)(ctx, nodes, false);
        if g.is_null() {
            (api.free)(ctx);
            return Err("ggml_new_graph_custom failed".into());
        }
        Ok((ctx, g))
    }
}

impl Drop for HostBackend {
    fn drop(&mut self) {
        // The pool runs graphs on `backend`: it goes first (nothing else holds it outside a matmul).
        self.pool = None;
        if let Some(api) = api() {
            // SAFETY: both were created by us and are dropped once.
            unsafe {
                (api.backend_free)(self.backend);
                (api.free)(self.ctx);
            }
        }
    }
}

/// The CPU backend's own worker threads, lent to the executor's GEMM.
///
/// Between two host splits, ggml's CPU workers (OpenMP, or ggml's thread pool) keep spinning for a
/// while; GEMM threads of our own would then fight them for the same cores. Instead a one-node graph
/// — a `ggml_custom_4d` op whose function runs the job — is computed on the CPU backend, so the job
/// runs on exactly those workers, `nth` at a time.
pub struct GgmlPool {
    backend: *mut GgmlBackend,
    ctx: *mut GgmlContext,
    graph: *mut GgmlCgraph,
    /// Read by the workers: boxed so its address stays fixed for the graph's userdata.
    slot: Box<JobSlot>,
    /// One job at a time (the slot holds one).
    busy: Mutex<()>,
}

#[derive(Default)]
struct JobSlot {
    /// Points at a `&(dyn Fn(usize) + Sync)` on the stack of `run`, or NULL.
    job: AtomicPtr<c_void>,
    panicked: AtomicBool,
}

// SAFETY: the graph and context are only touched inside `run`, under `busy`; the backend is only
// driven by the thread that owns the HostBackend (ggml never computes one backend concurrently),
// and `run` is called from that thread.
unsafe impl Send for GgmlPool {}
// SAFETY: as above.
unsafe impl Sync for GgmlPool {}

impl GgmlPool {
    fn new(api: &GgmlApi, backend: *mut GgmlBackend) -> Result<GgmlPool, String> {
        let custom_4d = api.custom_4d.ok_or("the host has no ggml_custom_4d")?;
        let slot = Box::<JobSlot>::default();
        // An allocating context: the op's one F32 element (written by nobody) needs memory.
        let (ctx, graph) = new_graph(api, 8, false)?;
        // SAFETY: the context and graph above; the node's function reads the boxed slot.
        unsafe {
            let ud = ptr::from_ref::<JobSlot>(&slot).cast_mut().cast::<c_void>();
            // n_tasks -1 (GGML_N_TASKS_MAX): every worker of the backend calls the function.
            let node = custom_4d(
                ctx,
                GGML_TYPE_F32,
                1,
                1,
                1,
                1,
                ptr::null_mut(),
                0,
                pool_task,
                -1,
                ud,
            );
            if node.is_null() {
                (api.free)(ctx);
                return Err("could not build the pool graph".into());
            }
            // ggml's CPU loop skips nodes without the COMPUTE flag (set by ggml_build_forward_expand,
            // which we do not use for a one-node graph).
            (*node).flags |= GGML_TENSOR_FLAG_COMPUTE;
            (api.graph_add_node)(graph, node);
            Ok(GgmlPool {
                backend,
                ctx,
                graph,
                slot,
                busy: Mutex::new(()),
            })
        }
    }
}

impl Pool for GgmlPool {
    fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let Some(api) = api() else { return };
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let job_ref: &(dyn Fn(usize) + Sync) = job;
        self.slot.panicked.store(false, Ordering::Relaxed);
        self.slot
            .job
            .store(ptr::from_ref(&job_ref).cast_mut().cast(), Ordering::Release);
        // SAFETY: our one-node graph on the backend it was built for; the workers read the slot,
        // which points at `job_ref`, alive until the call returns (it is synchronous).
        let st = unsafe { (api.backend_graph_compute)(self.backend, self.graph) };
        self.slot.job.store(ptr::null_mut(), Ordering::Release);
        if st != GGML_STATUS_SUCCESS {
            // The caller finishes the job itself: jobs take their work on demand.
            log::debug(&format!("pool graph failed with status {st}"));
        }
        if self.slot.panicked.load(Ordering::Relaxed) {
            panic!("a matmul job panicked on a ggml worker thread");
        }
    }
}

impl Drop for GgmlPool {
    fn drop(&mut self) {
        if let Some(api) = api() {
            // SAFETY: created in `new`, freed once.
            unsafe { (api.free)(self.ctx) };
        }
    }
}

/// The custom op's function: runs the job of the slot on worker `ith`. A panic must not unwind into
/// ggml's worker loop: it is caught and re-raised on the calling thread by `run`.
unsafe extern "C" fn pool_task(_dst: *mut GgmlTensor, ith: c_int, _nth: c_int, ud: *mut c_void) {
    // SAFETY: `ud` is the pool's boxed slot, alive as long as the graph.
    let slot = unsafe { &*ud.cast::<JobSlot>() };
    let p = slot.job.load(Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: set by `run` to a `&(dyn Fn(usize) + Sync)` that outlives the graph computation.
    let job = unsafe { &*p.cast::<&(dyn Fn(usize) + Sync)>() };
    let r = catch_unwind(AssertUnwindSafe(|| job(ith.max(0) as usize)));
    if r.is_err() {
        slot.panicked.store(true, Ordering::Relaxed);
    }
}
