//! Where does a MUL_MAT go, and why — all in this file.
//!
//! [`eligible`] says whether the ANE path can compute a node at all (types, layout, op hints).
//! [`claim`] answers ggml's `supports_op` (scheduling and weight placement).
//! [`route`] decides, per node at compute time, between the executor and the host.
//! [`compute`] walks the graph a face receives: ANE nodes go to the driver/executor, host nodes are
//! batched into one call of the inner (host) backend, and an executor error sends that node to the host.

use std::sync::atomic::Ordering;
use std::time::Instant;

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::driver::{self, Activations, PreparedWeight, Scratch};
use ggml_coreml_policy::{Decision, HostKind, MatmulShape};

use crate::engine::{ParityEntry, engine};
use crate::ffi::abi::*;
use crate::ffi::ggml::{GgmlApi, api};
use crate::ffi::tensor::{RowsF32, TensorRef};
use crate::host::HostBackend;
use crate::log;
use crate::weights::RegistryRef;

/// GGML_PREC_F32 in `op_params[0]`: the graph asks for f32 accumulation.
const PREC_F32: i32 = 10;
/// `op_params[3]`: smallest precision src1 may be converted to; Q8 = 30.
const PREC_Q8: i32 = 30;

/// A MUL_MAT the ANE path can compute.
#[derive(Clone, Copy, Debug)]
pub struct Eligible {
    pub wtype: WeightType,
    /// The route of the weight's kind on int8 chips (`driver::kind_route`).
    pub kind_route: driver::KindRoute,
    pub k: usize,
    pub n: usize,
    pub m: usize,
}

/// Can the ANE path compute this node? `Err` carries the reason it cannot.
pub fn eligible(node: &TensorRef<'_>) -> Result<Eligible, &'static str> {
    if node.op() != GGML_OP_MUL_MAT {
        return Err("not a MUL_MAT");
    }
    let (Some(w), Some(x)) = (node.src(0), node.src(1)) else {
        return Err("missing source");
    };
    let wtype = WeightType::from_ggml(w.type_id() as u32).ok_or("weight type not supported")?;
    if x.type_id() != GGML_TYPE_F32 || node.type_id() != GGML_TYPE_F32 {
        return Err("activations or output not F32");
    }
    // The weight's kind matters only on the int8 route of int8 chips; reading its name costs an
    // allocation per MUL_MAT per graph, which other chips must not pay.
    let kind_route = if engine().routes_by_kind() {
        driver::kind_route(&w.name())
    } else {
        driver::KindRoute::default()
    };
    let (wne, wnb, xne) = (w.ne(), w.nb(), x.ne());
    if wne.iter().chain(xne.iter()).any(|&d| d < 0) || wne[0] <= 0 || wne[1] <= 0 {
        return Err("empty or negative shape");
    }
    let (k, n) = (wne[0] as usize, wne[1] as usize);
    let row = wtype
        .row_bytes(k)
        .map_err(|_| "K is not a multiple of the block size")?;
    // Rows must be runs of whole blocks; rows themselves may be strided (views, permutes).
    if wnb[0] != wtype.block_bytes() || wnb[1] < row {
        return Err("weight rows not contiguous");
    }
    if xne[0] as usize != k {
        return Err("inner dimensions differ");
    }
    if wne[2] == 0 || wne[3] == 0 || xne[2] % wne[2] != 0 || xne[3] % wne[3] != 0 {
        return Err("batch dims do not broadcast");
    }
    if node.nb()[0] != 4 {
        return Err("output not contiguous in rows");
    }
    if node.op_param(1) != 0 {
        return Err("op hint (e.g. Hadamard) set");
    }
    if node.op_param(0) == PREC_F32 {
        return Err("f32 accumulation requested");
    }
    let src1_prec = node.op_param(3);
    if src1_prec > 0 && src1_prec < PREC_Q8 {
        if engine().mode_for(wtype, kind_route).int8() {
            return Err("graph forbids int8 activations");
        }
        if src1_prec < 20 {
            return Err("graph forbids fp16 activations");
        }
    }
    Ok(Eligible {
        wtype,
        kind_route,
        k,
        n,
        m: xne[1] as usize,
    })
}

/// `supports_op` of the ACCEL face for a MUL_MAT. `ours` says whether a buffer type is our weight buft.
///
/// - Weight placement (llama.cpp's probe uses a zero-size buffer) and unallocated queries
///   (test-backend-ops asks before allocating): accept only what the ANE path could ever take under
///   the current policy, so llama.cpp keeps every other weight in its own CPU buffers (CPU_REPACK too).
/// - Scheduling (src0 already in our buffer): accept everything the host can run as well, because only
///   we can read our buffer: declined shapes run on the inner host backend at its speed.
pub fn claim(
    node: &TensorRef<'_>,
    ours: impl Fn(BuftPtr) -> bool,
    host_supports: impl Fn() -> bool,
) -> bool {
    let Some(w) = node.src(0) else { return false };
    let probe = match w.buffer_size() {
        None => {
            // Unallocated: only leaves (weights) and views of them can be ours; a computed src0 is
            // someone else's.
            if !is_view_of_leaf(&w) {
                return false;
            }
            true
        }
        Some(0) => ours(w.buft()),
        Some(_) => {
            if !ours(w.buft()) {
                return false;
            }
            false
        }
    };
    let e = eligible(node);
    if probe {
        // Weight placement happens before any compute: pick up a control-file policy switch now.
        engine().poll_control();
        return match e {
            Ok(e) => {
                let eng = engine();
                eng.policy.would_offload_weight_for(
                    e.k,
                    e.n,
                    eng.variant_for(e.wtype, e.kind_route),
                )
            }
            Err(why) => {
                log::debug(&format!("declining {} at placement: {why}", node.name()));
                false
            }
        };
    }
    e.is_ok() || host_supports()
}

fn is_view_of_leaf(t: &TensorRef<'_>) -> bool {
    let mut cur = *t;
    for _ in 0..8 {
        match cur.op() {
            GGML_OP_NONE => return true,
            GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE => {
                match cur.src(0) {
                    Some(s) => cur = s,
                    None => return false,
                }
            }
            _ => return false,
        }
    }
    false
}

/// Which face a graph came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    /// The ACCEL device: only MUL_MATs over weights in our buffer type reach us.
    Accel,
    /// The hybrid device: the whole graph reaches us; we split out the offloaded MUL_MATs.
    Hybrid,
}

/// The decision for one node at compute time.
pub enum Route {
    Ane(Eligible),
    Host(&'static str),
}

/// `host` is the kind of device that runs what the ANE does not (the CPU for the ACCEL face, the inner
/// device for the hybrid face): the policy never moves work to a GPU because the app went to the
/// background (iOS aborts Metal work submitted from there).
pub fn route(
    node: &TensorRef<'_>,
    face: Face,
    host: HostKind,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> Route {
    let e = match eligible(node) {
        Ok(e) => e,
        Err(why) => return Route::Host(why),
    };
    // The hybrid face sees every matmul of the graph; only those over model weights may go to the ANE
    // (prepared weights are cached by address, and a KV-cache operand changes every step).
    if face == Face::Hybrid && !node.src(0).is_some_and(|w| w.is_model_weight()) {
        return Route::Host("not a weight");
    }
    let eng = engine();
    let shape = MatmulShape {
        m: e.m,
        k: e.k,
        n: e.n,
    };
    let variant = eng.variant_for(e.wtype, e.kind_route);
    // Bounded mode: a weight that is not (and will not be) resident is prepared for this call, which
    // the policy charges to the ANE path.
    let decision = if eng.bounded() && !kept(node, &e, registry_of) {
        eng.policy.decide_on_per_call(&shape, variant, host)
    } else {
        eng.policy.decide_on(&shape, variant, host)
    };
    match decision {
        Decision::Ane => Route::Ane(e),
        Decision::Host(r) => Route::Host(r.as_str()),
    }
}

/// Is the weight of an eligible node resident, or would it be kept once prepared (a registry and
/// room in the budget)?
fn kept(
    node: &TensorRef<'_>,
    e: &Eligible,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> bool {
    let Some(w) = node.src(0) else {
        return false;
    };
    let eng = engine();
    let mode = eng.mode_for(e.wtype, e.kind_route);
    // SAFETY: eligible() checked the weight's layout; (0, 0) is its first 2-D slice.
    let (addr, stride) = unsafe { w.slice2d_addr(0, 0) };
    registry_of(&w).is_some_and(|r| {
        r.get(addr, mode, stride, e.n).is_some() || !eng.over_budget(mode, e.n, e.k)
    })
}

/// Per-backend state the router needs.
pub struct RouterCtx {
    pub host: HostBackend,
    /// What kind of device `host` is (for the policy's background rule).
    pub host_kind: HostKind,
    pub scratch: Scratch,
    pub out: Vec<f32>,
    /// Hybrid face: graphs handed to the inner backend whole / split around offloaded MUL_MATs.
    pub unsplit_graphs: u64,
    pub split_graphs: u64,
    /// Inner-backend calls made by the last split graph (for tests and the debug log).
    pub last_host_calls: usize,
    /// Split graphs in which the inner backend was called more often than once per offloaded
    /// MUL_MAT plus one — i.e. split somewhere else than around an offloaded MUL_MAT. Should stay 0.
    pub oversplit_graphs: u64,
    /// `GGML_COREML_SPLIT=auto`: the executor's share per weight shape (K, N).
    split_shares: std::collections::HashMap<(usize, usize), AutoShare>,
    /// Split mode: the inner device's scratch buffer for its share of a split MUL_MAT.
    split_buf: *mut GgmlBackendBuffer,
    split_cap: usize,
}

impl Drop for RouterCtx {
    fn drop(&mut self) {
        if !self.split_buf.is_null()
            && let Some(api) = api()
        {
            // SAFETY: a buffer we allocated and still own.
            unsafe { (api.buffer_free)(self.split_buf) };
        }
    }
}

impl RouterCtx {
    pub fn new(host: HostBackend) -> RouterCtx {
        let host_kind = if host.name.eq_ignore_ascii_case("CPU") {
            HostKind::Cpu
        } else {
            HostKind::Gpu
        };
        RouterCtx {
            host_kind,
            host,
            scratch: Scratch::default(),
            out: Vec::new(),
            unsplit_graphs: 0,
            split_graphs: 0,
            last_host_calls: 0,
            oversplit_graphs: 0,
            split_shares: std::collections::HashMap::new(),
            split_buf: std::ptr::null_mut(),
            split_cap: 0,
        }
    }
}

/// Runs the nodes of a graph: returns a ggml status.
///
/// `registry_of` maps a weight tensor to the registry of prepared weights of its buffer (None: a
/// buffer nobody watches for writes and frees, whose weights are prepared per call). A graph in which
/// no node goes to the ANE is handed to the inner backend whole (`graph`) and not waited for, so decode
/// costs nothing extra.
///
/// # Safety
/// `graph` is the live graph ggml passed to a face's `graph_compute`.
pub unsafe fn compute(
    ctx: &mut RouterCtx,
    graph: *mut GgmlCgraph,
    face: Face,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> i32 {
    let Some(api) = api() else {
        return GGML_STATUS_FAILED;
    };
    let eng = engine();
    if face == Face::Hybrid && hybrid_passthrough() {
        // SAFETY: the graph ggml gave the hybrid face, allocated in the inner device's buffers.
        return unsafe { ctx.host.compute_graph_async(graph) };
    }
    eng.poll_control();
    eng.refresh_device_state();
    // SAFETY: ggml's graph accessor on the graph it passed us.
    let n_nodes = unsafe { (api.graph_n_nodes)(graph) }.max(0);
    // SAFETY: index within the graph's node count.
    let node_at = |i: i32| unsafe { (api.graph_node)(graph, i) };
    if face == Face::Hybrid {
        // Decode runs this walk once per token over the whole graph: it reads each node's header only
        // and asks the lock-free `surely_host` before the full decision (the `router` stats time it).
        let t0 = Instant::now();
        let mut any_ane = false;
        for i in 0..n_nodes {
            // SAFETY: live graph nodes.
            let Some(n) = (unsafe { TensorRef::from_ptr(node_at(i)) }) else {
                continue;
            };
            // The op first: it shares a cache line with the shape, the flags sit on the next one.
            match n.op() {
                GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE
                | GGML_OP_TRANSPOSE => continue,
                _ => {}
            }
            if n.flags() & GGML_TENSOR_FLAG_COMPUTE == 0 {
                continue;
            }
            // A graph that writes into a weight buffer: what we prepared from those bytes is stale.
            if n.buffer_usage() == Some(BUFFER_USAGE_WEIGHTS) {
                // SAFETY: an allocated node of the live graph.
                let len = unsafe { (api.nbytes)(n.ptr()) };
                crate::faces::hybrid_buffer::invalidate(n.buffer(), n.data() as usize, len);
            }
            if !any_ane
                && n.op() == GGML_OP_MUL_MAT
                && !eng.policy.surely_host(n.ne()[1].max(0) as usize)
                && matches!(route(&n, face, ctx.host_kind, registry_of), Route::Ane(_))
            {
                any_ane = true;
            }
        }
        eng.stats.hybrid_walk(t0.elapsed(), !any_ane);
        if !any_ane {
            ctx.unsplit_graphs += 1;
            // SAFETY: the graph ggml gave the hybrid face, allocated in the inner device's buffers.
            // Not waited for: ggml synchronizes through our `synchronize` when it needs the results.
            return unsafe { ctx.host.compute_graph_async(graph) };
        }
        ctx.split_graphs += 1;
    }
    let nodes: Vec<*mut GgmlTensor> = (0..n_nodes).map(node_at).collect();
    let nodes = &nodes[..];
    ctx.last_host_calls = 0;
    let mut ane_nodes = 0usize;
    let mut pending: Vec<*mut GgmlTensor> = Vec::new();
    let mut pending_reason: Vec<&'static str> = Vec::new();
    // Bounded mode: the first slice of the next per-call weight is prepared while earlier nodes run. The
    // split mode prepares other row counts (its share), so it takes no part.
    let want_prefetch =
        eng.prefetch && eng.bounded() && !(face == Face::Hybrid && split_mode().is_some());
    let mut prefetch: Option<Prefetch> = None;
    // The later MUL_MATs that may take a form prepared ahead (found at the first offloaded node), and
    // how far into them prefetching has gone.
    let mut ahead: Option<Vec<(usize, Eligible)>> = None;
    let mut cursor = 0usize;
    for (idx, &p) in nodes.iter().enumerate() {
        // SAFETY: ggml hands us live graph nodes.
        let Some(node) = (unsafe { TensorRef::from_ptr(p) }) else {
            continue;
        };
        if node.flags() & GGML_TENSOR_FLAG_COMPUTE == 0 {
            continue;
        }
        match node.op() {
            GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE => {
                continue;
            }
            GGML_OP_MUL_MAT => {}
            _ => {
                pending.push(p);
                pending_reason.push("not a MUL_MAT");
                continue;
            }
        }
        match route(&node, face, ctx.host_kind, registry_of) {
            Route::Host(why) => {
                pending.push(p);
                pending_reason.push(why);
            }
            Route::Ane(e) => {
                ane_nodes += 1;
                // The ANE node may read what pending host nodes write: run them first.
                let st = flush(ctx, &mut pending, &mut pending_reason);
                if st != GGML_STATUS_SUCCESS {
                    return st;
                }
                let t0 = Instant::now();
                let shape = MatmulShape {
                    m: e.m,
                    k: e.k,
                    n: e.n,
                };
                let variant = eng.variant_for(e.wtype, e.kind_route);
                // The ANE node reads what the inner device computed: wait for it (a no-op on the CPU).
                ctx.host.synchronize();
                let mine = prefetch.take_if(|pf| pf.node == idx);
                if want_prefetch && prefetch.is_none() {
                    let cands = ahead.get_or_insert_with(|| {
                        ahead_candidates(nodes, face, ctx.host_kind, registry_of)
                    });
                    prefetch = start_prefetch(api, nodes, idx, cands, &mut cursor, registry_of);
                }
                // A panic inside one node (executor, driver, bridge) sends that node to the host; it
                // never fails the graph.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_ane(ctx, &node, idx, e, face, registry_of, mine)
                }))
                .unwrap_or_else(|payload| {
                    Err(format!(
                        "panic: {}",
                        crate::ffi::guard::panic_message(payload.as_ref())
                    ))
                });
                match ran {
                    Ok(batches) => {
                        let dt = t0.elapsed();
                        let flops = 2 * (e.m * e.k * e.n) as u64 * batches as u64;
                        eng.stats.ane(dt, flops);
                        eng.stats
                            .variant(eng.mode_for(e.wtype, e.kind_route), flops);
                        eng.policy.record(
                            &shape,
                            variant,
                            dt.as_secs_f64() * 1e3 / batches.max(1) as f64,
                            None,
                        );
                        if eng.parity_path.is_some() && host_visible(&node, face) {
                            parity_check(ctx, &node, e);
                        }
                    }
                    // Still being compiled off this thread: the host runs it meanwhile; no fault.
                    Err(err) if ggml_coreml_executor::is_not_ready_message(&err) => {
                        pending.push(p);
                        pending_reason.push("program not ready");
                    }
                    Err(err) => {
                        eng.stats
                            .faults
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if eng.policy.record_fault(&shape) {
                            log::warn(&format!(
                                "shape m={} k={} n={} disabled after {} executor faults; it stays on the host",
                                e.m,
                                e.k,
                                e.n,
                                eng.policy.max_faults()
                            ));
                        }
                        log::warn(&format!(
                            "executor failed on {} (m={} k={} n={} {}): {err}; running it on the host",
                            node.name(),
                            e.m,
                            e.k,
                            e.n,
                            e.wtype.name()
                        ));
                        pending.push(p);
                        pending_reason.push("executor error");
                    }
                }
            }
        }
        // Prepared ahead for a node that did not take it (it went to the host).
        if prefetch.as_ref().is_some_and(|pf| pf.node <= idx) {
            prefetch = None;
        }
    }
    let st = flush(ctx, &mut pending, &mut pending_reason);
    drop(prefetch);
    if face == Face::Hybrid && ctx.last_host_calls > ane_nodes + 1 {
        ctx.oversplit_graphs += 1;
    }
    eng.write_files(false);
    st
}

/// Offloaded MUL_MATs of the graph whose weight could be prepared ahead: one 2-D weight in host memory.
fn ahead_candidates(
    nodes: &[*mut GgmlTensor],
    face: Face,
    host: HostKind,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> Vec<(usize, Eligible)> {
    let mut v = Vec::new();
    for (j, &p) in nodes.iter().enumerate() {
        // SAFETY: live graph nodes.
        let Some(n) = (unsafe { TensorRef::from_ptr(p) }) else {
            continue;
        };
        if n.op() != GGML_OP_MUL_MAT || n.flags() & GGML_TENSOR_FLAG_COMPUTE == 0 {
            continue;
        }
        let Route::Ane(e) = route(&n, face, host, registry_of) else {
            continue;
        };
        if let Some(w) = n.src(0)
            && w.ne()[2] * w.ne()[3] == 1
            && !w.data().is_null()
            && host_visible(&w, face)
        {
            v.push((j, e));
        }
    }
    v
}

/// Starts preparing, on a second thread, the first slice of the next candidate after node `idx`
/// whose weight will be prepared per call (not resident, and no registry or over the budget: the
/// test of `run_ane`), unless a node before it writes into those bytes.
fn start_prefetch(
    api: &GgmlApi,
    nodes: &[*mut GgmlTensor],
    idx: usize,
    cands: &[(usize, Eligible)],
    cursor: &mut usize,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> Option<Prefetch> {
    let eng = engine();
    while let Some(&(j, e)) = cands.get(*cursor) {
        *cursor += 1;
        if j <= idx {
            continue;
        }
        // SAFETY: a live graph node (a candidate was one).
        let Some(node) = (unsafe { TensorRef::from_ptr(nodes[j]) }) else {
            continue;
        };
        let Some(w) = node.src(0) else { continue };
        // SAFETY: eligible() checked the weight's layout; (0, 0) is its only 2-D slice.
        let (addr, stride) = unsafe { w.slice2d_addr(0, 0) };
        let mode = eng.mode_for(e.wtype, e.kind_route);
        let registry = registry_of(&w);
        let cached = registry
            .as_ref()
            .is_some_and(|r| r.get(addr, mode, stride, e.n).is_some());
        if cached || registry.is_some() && !eng.over_budget(mode, e.n, e.k) {
            continue;
        }
        let rows = eng.slice_rows(mode, e.n, e.k);
        let Ok(row) = e.wtype.row_bytes(e.k) else {
            continue;
        };
        if written_between(api, &nodes[idx..j], addr, stride * (rows - 1) + row) {
            continue;
        }
        // SAFETY: as above; the first `rows` rows lie within the weight. Copied: the thread owns them.
        let raw = unsafe { w.slice2d_row_range(0, 0, row, 0, rows) }.into_owned();
        let key = AheadKey {
            addr,
            stride,
            wtype: e.wtype,
            mode,
            rows,
            k: e.k,
        };
        let (wtype, k, kind_route) = (e.wtype, e.k, e.kind_route);
        return Prefetch::spawn(j, key, raw, move |b| {
            engine().prepare_slice(wtype, b, rows, k, kind_route)
        });
    }
    None
}

/// Does any of `nodes` write into `[addr, addr + len)`? (Then bytes copied now would be stale later.)
fn written_between(api: &GgmlApi, nodes: &[*mut GgmlTensor], addr: usize, len: usize) -> bool {
    nodes.iter().any(|&p| {
        // SAFETY: live graph nodes.
        let Some(n) = (unsafe { TensorRef::from_ptr(p) }) else {
            return false;
        };
        match n.op() {
            GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE => {
                return false;
            }
            _ => {}
        }
        let d = n.data() as usize;
        if d == 0 {
            return false;
        }
        // SAFETY: an allocated node of the live graph.
        let nbytes = unsafe { (api.nbytes)(p) };
        d < addr + len && addr < d + nbytes
    })
}

/// Is `t`'s memory plain host memory? Always for the ACCEL face (our buffer type, CPU buffers); for the
/// hybrid face only when the inner device's buffer says so (Metal's may not).
fn host_visible(t: &TensorRef<'_>, face: Face) -> bool {
    face == Face::Accel
        || !force_copy()
            && api().is_some_and(|api| {
                // SAFETY: an allocated tensor's live buffer.
                !t.buffer().is_null() && unsafe { (api.buffer_is_host)(t.buffer()) }
            })
}

/// `GGML_COREML_SPLIT_PROFILE=1` (diagnosis): each split node runs its two parts once more, one
/// after the other, and the stats compare the overlapped wall time with the longer part alone.
fn split_profile() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_SPLIT_PROFILE").is_ok_and(|v| v == "1"))
}

/// `GGML_COREML_HYBRID_PASSTHROUGH=1` (diagnosis): the hybrid face hands every graph to the inner
/// device unexamined, so nothing is offloaded; measures what the wrapper alone costs against the walk.
fn hybrid_passthrough() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_HYBRID_PASSTHROUGH").is_ok_and(|v| v == "1"))
}

/// `GGML_COREML_HYBRID_FORCE_COPY=1` (tests): the hybrid face treats its inner buffers as non-host
/// memory, so the copy path that Metal's private buffers and CUDA take runs on Linux with the CPU inside.
fn force_copy() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_HYBRID_FORCE_COPY").is_ok_and(|v| v == "1"))
}

/// `GGML_COREML_PARITY`: runs the node again on the host, records NMSE(ours, host) under the weight's
/// name, and puts our result back so the model goes on with what the ANE path computed.
fn parity_check(ctx: &mut RouterCtx, node: &TensorRef<'_>, e: Eligible) {
    let eng = engine();
    // SAFETY: dst is an allocated F32 tensor in host-visible memory (ACCEL face) of ggml_nbytes bytes.
    let Some(ours) = (unsafe { node.host_bytes() }) else {
        return;
    };
    if ctx.host.compute(&[node.ptr().cast_mut()]) != GGML_STATUS_SUCCESS {
        return;
    }
    ctx.host.synchronize();
    // SAFETY: as above.
    let Some(host) = (unsafe { node.host_bytes() }) else {
        return;
    };
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let nmse = ggml_coreml_bridge::nmse(&f(&host), &f(&ours));
    // SAFETY: as above; restores our bytes.
    unsafe { node.write_host_bytes(&ours) };
    let name = node.src(0).map(|w| w.name()).unwrap_or_default();
    let name = name.strip_suffix(".weight").unwrap_or(&name).to_string();
    let entry = ParityEntry {
        m: e.m,
        k: e.k,
        n: e.n,
        wtype: e.wtype.name(),
        variant: eng.mode_for(e.wtype, e.kind_route).name(),
        ..Default::default()
    };
    eng.record_parity(&name, entry, nmse);
}

fn flush(
    ctx: &mut RouterCtx,
    pending: &mut Vec<*mut GgmlTensor>,
    reasons: &mut Vec<&'static str>,
) -> i32 {
    if pending.is_empty() {
        return GGML_STATUS_SUCCESS;
    }
    let t0 = Instant::now();
    ctx.last_host_calls += 1;
    let st = ctx.host.compute(pending);
    let dt = t0.elapsed() / pending.len() as u32;
    for r in reasons.iter() {
        engine().stats.host(r, dt);
    }
    pending.clear();
    reasons.clear();
    st
}

/// One MUL_MAT through the driver, batch by batch (broadcasting src0 over dims 2 and 3).
///
/// Operands in host-visible memory (our buffers, CPU buffers) are read in place; others (e.g. Metal
/// buffers) are copied through `ggml_backend_tensor_get` / `_set`.
///
/// `ahead`: a form prepared ahead for node `idx` of the graph ([`Prefetch`]), used if it is this node's
/// weight and the node prepares it for this call.
#[allow(clippy::too_many_arguments)]
fn run_ane(
    ctx: &mut RouterCtx,
    node: &TensorRef<'_>,
    idx: usize,
    e: Eligible,
    face: Face,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
    mut ahead: Option<Prefetch>,
) -> Result<usize, String> {
    let eng = engine();
    let api = api().ok_or("ggml not bound")?;
    if eng.inject_fault() {
        return Err("injected fault (GGML_COREML_FAULT_INJECT)".into());
    }
    let (w, x) = (node.src(0).ok_or("no src0")?, node.src(1).ok_or("no src1")?);
    if w.data().is_null() || x.data().is_null() || node.data().is_null() {
        return Err("unallocated tensor".into());
    }
    if face == Face::Hybrid
        && let Some(mode) = split_mode()
    {
        let key = (e.k, e.n);
        let (share, auto) = match mode {
            SplitMode::Fixed(s) => (s, None),
            SplitMode::Auto => {
                let a = *ctx
                    .split_shares
                    .entry(key)
                    .or_insert_with(|| AutoShare::new(initial_share(&e)));
                (a.used(), Some(a))
            }
        };
        if let Some(t) = run_split(ctx, node, e, share, registry_of)? {
            if let Some(a) = auto
                && let Some(next) = t.next_share(a.share)
            {
                ctx.split_shares.insert(key, a.learn(next));
            }
            return Ok(1);
        }
    }
    let visible = |t: &TensorRef<'_>| host_visible(t, face);
    let (w_host, x_host, d_host) = (visible(&w), visible(&x), visible(node));
    let (wne, xne) = (w.ne(), x.ne());
    let (r2, r3) = ((xne[2] / wne[2]) as usize, (xne[3] / wne[3]) as usize);
    let row = e.wtype.row_bytes(e.k).map_err(|err| err.to_string())?;
    let registry = registry_of(&w);
    let mut xfer = Transfers::default();
    // Non-host activations: one copy of the whole tensor.
    let x_copy = (!x_host).then(|| read_whole(api, &x, &mut xfer));
    let pool = ctx.host.pool();
    let mut batches = 0;
    let mut w_copy: Option<Vec<u8>> = None;
    // Non-host dst in one piece (MUL_MAT's dst is a fresh contiguous tensor): an image of all
    // batches, written back with one call at the end.
    let (dne, dnb) = (node.ne(), node.nb());
    let d_contiguous = dnb[1] == e.n * 4
        && dnb[2] == dnb[1] * dne[1] as usize
        && dnb[3] == dnb[2] * dne[2] as usize;
    let mut d_image: Vec<f32> = if !d_host && d_contiguous {
        vec![0.0; e.n * e.m * (dne[2] * dne[3]) as usize]
    } else {
        Vec::new()
    };
    for i13 in 0..xne[3] as usize {
        for i12 in 0..xne[2] as usize {
            let (i02, i03) = (i12 / r2, i13 / r3);
            // SAFETY: eligible() checked rows of whole blocks; indices are within ne[2], ne[3].
            let (addr, stride) = unsafe { w.slice2d_addr(i02, i03) };
            let mode = eng.mode_for(e.wtype, e.kind_route);
            let cached = registry
                .as_ref()
                .and_then(|reg| reg.get(addr, mode, stride, e.n));
            // Not kept (no registry, or past the resident budget): prepared per call; larger than one
            // slice, in row slices, each run for its columns of the output (bounded mode).
            let per_call =
                cached.is_none() && (registry.is_none() || eng.over_budget(mode, e.n, e.k));
            let step = eng.slice_rows(mode, e.n, e.k);
            let sliced = per_call && step < e.n;
            // The first slice (or whole form) prepared ahead, if it is this weight's.
            let key = AheadKey {
                addr,
                stride,
                wtype: e.wtype,
                mode,
                rows: step,
                k: e.k,
            };
            let mut first = match ahead.take() {
                Some(a) => a.claim(idx, &key, per_call).transpose()?,
                None => None,
            };
            let gathered = (sliced && !w_host).then(|| {
                let whole = w_copy.get_or_insert_with(|| read_whole(api, &w, &mut xfer));
                slice_rows(whole, w.ne(), w.nb(), i02, i03, row)
            });
            // A whole form prepared ahead lives (and is counted) until this batch is done.
            let mut whole_ahead = None;
            let pw = match cached {
                Some(pw) => Some(pw),
                None if sliced => None,
                None if first.is_some() => {
                    let (w, alive) = first.take().expect("checked");
                    whole_ahead = Some(alive);
                    // As `Engine::prepared` counts a form made for one call because the budget was full.
                    if registry.is_some() {
                        eng.stats.prepared_per_call.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(std::sync::Arc::new(w))
                }
                None => Some({
                    let bytes = if w_host {
                        // SAFETY: as above.
                        unsafe { w.slice2d_rows(i02, i03, row) }
                    } else {
                        // Non-host weights: the whole tensor in one read, at the first miss.
                        let whole = w_copy.get_or_insert_with(|| read_whole(api, &w, &mut xfer));
                        std::borrow::Cow::Owned(slice_rows(whole, w.ne(), w.nb(), i02, i03, row))
                    };
                    match &registry {
                        Some(reg) => eng.prepared(
                            reg,
                            addr,
                            stride,
                            e.wtype,
                            &bytes,
                            e.n,
                            e.k,
                            e.kind_route,
                        )?,
                        None => eng.prepared_uncached(e.wtype, &bytes, e.n, e.k, e.kind_route)?,
                    }
                }),
            };
            let rows = match &x_copy {
                // SAFETY: src1 is F32 (eligible) and allocated; (i12, i13) in range.
                None => unsafe { x.f32_rows(i12, i13) },
                Some(bytes) => gather_f32(bytes, x.ne(), x.nb(), i12, i13),
            };
            let (xs, xstride) = rows.as_slice();
            let act = Activations {
                x: xs,
                m: e.m,
                x_stride: xstride,
            };
            // Host-visible dst with plain rows that do not overlap x: the driver writes straight into it;
            // otherwise into `ctx.out`, copied to dst afterwards.
            let direct = if d_host {
                // SAFETY: dst is F32 [n, m, ne12, ne13] (MUL_MAT contract), allocated in host memory,
                // batch in range, and nothing else touches it during this node (x: checked for overlap).
                unsafe { node.f32_rows_mut(i12, i13) }.filter(|(d, _)| !overlaps(d, xs))
            } else {
                None
            };
            let copy_back = direct.is_none();
            let (out, stride) = direct.unwrap_or_else(|| {
                ctx.out.resize(e.m * e.n, 0.0);
                (&mut ctx.out[..], e.n)
            });
            let (exec, scratch) = (eng.executor.as_ref(), &mut ctx.scratch);
            // The GEMM borrows the CPU backend's workers instead of competing with them.
            let rows_of = |r0: usize, rows: usize| -> std::borrow::Cow<'_, [u8]> {
                match &gathered {
                    Some(g) => std::borrow::Cow::Borrowed(&g[r0 * row..(r0 + rows) * row]),
                    // SAFETY: as above; the range is clamped to the slice's rows.
                    None => unsafe { w.slice2d_row_range(i02, i03, row, r0, rows) },
                }
            };
            ggml_coreml_program::pool::with_pool(pool.clone(), || match &pw {
                Some(pw) => {
                    driver::matmul(exec, pw, &act, out, stride, scratch).map_err(|e| e.to_string())
                }
                None => run_sliced(&e, &rows_of, &act, out, stride, scratch, first.take()),
            })?;
            drop(whole_ahead);
            if copy_back && d_host {
                // SAFETY: as above.
                unsafe { node.write_f32_rows(i12, i13, &ctx.out, e.n) };
            } else if copy_back && !d_image.is_empty() {
                let at = (i13 * dne[2] as usize + i12) * e.m * e.n;
                d_image[at..at + e.m * e.n].copy_from_slice(&ctx.out[..e.m * e.n]);
            } else if copy_back {
                write_rows_via_api(api, node, i12, i13, &ctx.out, e.n, &mut xfer);
            }
            batches += 1;
        }
    }
    if !d_image.is_empty() {
        // SAFETY: dst is contiguous and holds exactly d_image's bytes; tensor_set checks bounds.
        unsafe {
            (api.tensor_set)(
                node.ptr().cast_mut(),
                d_image.as_ptr().cast(),
                0,
                d_image.len() * 4,
            )
        };
        xfer.add(d_image.len() * 4);
    }
    eng.stats.transfers(xfer.calls, xfer.bytes);
    Ok(batches)
}

/// Bounded mode: runs `x · wᵀ` for a weight that is not kept, preparing it per call in row slices of
/// [`crate::engine::SLICE_BYTES`] at most, each run through the executor for its columns of `out`.
/// With `Engine::prefetch` (accelerated executors, or `GGML_COREML_PREFETCH=1`) the next slice is
/// prepared on a second thread while the executor runs the current one; otherwise (the reference
/// executor's GEMM already uses every core) the slices are prepared in turn. At most two of this
/// weight's slices are alive at once (a third, the next matmul's first slice, may be on its way:
/// [`Prefetch`]). `rows_of(r0, rows)` gives a slice's raw bytes; `first`, the first slice prepared ahead.
fn run_sliced<'b>(
    e: &Eligible,
    rows_of: &dyn Fn(usize, usize) -> std::borrow::Cow<'b, [u8]>,
    act: &Activations<'_>,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Scratch,
    first: Option<Counted>,
) -> Result<(), String> {
    let eng = engine();
    let exec = eng.executor.as_ref();
    let mode = eng.mode_for(e.wtype, e.kind_route);
    let step = eng.slice_rows(mode, e.n, e.k);
    eng.stats.prepared_per_call.fetch_add(1, Ordering::Relaxed);
    eng.stats.sliced_calls.fetch_add(1, Ordering::Relaxed);
    let prep = |r0: usize, bytes: &[u8]| -> Result<Counted, String> {
        let w = eng.prepare_slice(e.wtype, bytes, step.min(e.n - r0), e.k, e.kind_route)?;
        let alive = Alive::new(&w);
        Ok((w, alive))
    };
    let mut cur = match first {
        Some(f) if f.0.n == step.min(e.n) => f,
        _ => prep(0, &rows_of(0, step))?,
    };
    let mut r0 = 0;
    loop {
        let next_r0 = r0 + cur.0.n;
        let more = next_r0 < e.n;
        let next_bytes = more.then(|| rows_of(next_r0, step));
        let next = if eng.prefetch {
            std::thread::scope(|s| {
                let h = next_bytes
                    .as_deref()
                    .map(|b| s.spawn(move || prep(next_r0, b)));
                let ran = driver::matmul(exec, &cur.0, act, &mut out[r0..], out_stride, scratch)
                    .map_err(|err| err.to_string());
                let next = h.map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("slice repack panicked".into()))
                });
                ran.map(|()| next)
            })?
        } else {
            driver::matmul(exec, &cur.0, act, &mut out[r0..], out_stride, scratch)
                .map_err(|err| err.to_string())?;
            next_bytes.as_deref().map(|b| prep(next_r0, b))
        };
        match next {
            None => return Ok(()),
            Some(n) => {
                cur = n?;
                r0 = next_r0;
            }
        }
    }
}

/// Bytes of one per-call prepared form, counted in `slice_bytes_alive` (and its peak) while it lives.
struct Alive(u64);

impl Alive {
    fn new(w: &PreparedWeight) -> Alive {
        let n = w.bytes_held() as u64;
        let st = &engine().stats;
        let now = st.slice_bytes_alive.fetch_add(n, Ordering::Relaxed) + n;
        st.slice_bytes_peak.fetch_max(now, Ordering::Relaxed);
        Alive(n)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        engine()
            .stats
            .slice_bytes_alive
            .fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// A per-call prepared form with its count in the stats.
type Counted = (PreparedWeight, Alive);

/// Which weight part a form prepared ahead is: its first `rows` rows at `addr` (row stride `stride`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AheadKey {
    addr: usize,
    stride: usize,
    wtype: WeightType,
    mode: driver::Mode,
    rows: usize,
    k: usize,
}

/// Bounded mode: the first slice (or the whole form, when smaller than a slice) of a later node's
/// per-call weight, prepared on a second thread while the nodes before it run. The thread owns a copy
/// of the raw rows, so nothing it reads can go away with the graph. Dropped unclaimed, it is joined and
/// counted as wasted.
struct Prefetch {
    /// Index of the node in the graph.
    node: usize,
    key: AheadKey,
    handle: Option<std::thread::JoinHandle<Result<Counted, String>>>,
}

impl Prefetch {
    /// Starts preparing `raw` with `prep` on a new thread; None when no thread could be started.
    fn spawn(
        node: usize,
        key: AheadKey,
        raw: Vec<u8>,
        prep: impl FnOnce(&[u8]) -> Result<PreparedWeight, String> + Send + 'static,
    ) -> Option<Prefetch> {
        let handle = std::thread::Builder::new()
            .name("coreml-prefetch".into())
            .spawn(move || {
                let w = prep(&raw)?;
                drop(raw);
                let alive = Alive::new(&w);
                Ok((w, alive))
            })
            .ok()?;
        engine().stats.prefetched.fetch_add(1, Ordering::Relaxed);
        Some(Prefetch {
            node,
            key,
            handle: Some(handle),
        })
    }

    /// The form for node `node` over weight part `key`, if this is it and the node prepares that
    /// weight for this call (`usable`); otherwise None (dropped, counted as wasted). Waits for the
    /// thread; a panic there comes back as an error (the node then runs on the host).
    fn claim(
        mut self,
        node: usize,
        key: &AheadKey,
        usable: bool,
    ) -> Option<Result<Counted, String>> {
        if self.node != node || self.key != *key || !usable {
            return None;
        }
        let h = self.handle.take()?;
        let r = h
            .join()
            .unwrap_or_else(|_| Err("prepared-ahead repack panicked".into()));
        if r.is_err() {
            engine()
                .stats
                .prefetch_wasted
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(r)
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Joined so that its memory is gone when the graph is done; a panic there is dropped with it.
            let _ = h.join();
            engine()
                .stats
                .prefetch_wasted
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Copies between host memory and a non-host inner buffer made for one node.
#[derive(Default)]
struct Transfers {
    calls: u64,
    bytes: u64,
}

impl Transfers {
    fn add(&mut self, n: usize) {
        self.calls += 1;
        self.bytes += n as u64;
    }
}

/// `GGML_COREML_SPLIT` (hybrid face, opt-in): the executor takes a share of an offloaded MUL_MAT's
/// output rows (N), the inner device the rest, at the same time. A number in (0, 1) fixes the share;
/// `auto` starts each weight shape from the cost model and then balances the two parts' measured times.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SplitMode {
    Fixed(f64),
    Auto,
}

fn split_mode() -> Option<SplitMode> {
    static V: std::sync::OnceLock<Option<SplitMode>> = std::sync::OnceLock::new();
    *V.get_or_init(|| parse_split(&std::env::var("GGML_COREML_SPLIT").ok()?))
}

fn parse_split(v: &str) -> Option<SplitMode> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("auto") {
        return Some(SplitMode::Auto);
    }
    let s = v.parse::<f64>().ok().filter(|s| *s > 0.0 && *s < 1.0);
    if s.is_none() {
        log::warn(&format!(
            "GGML_COREML_SPLIT={v} is neither a share in (0, 1) nor `auto`; not splitting"
        ));
    }
    s.map(SplitMode::Fixed)
}

/// Bounds of an automatic share: each side keeps some rows, so both times stay measured.
const SHARE_MIN: f64 = 0.05;
const SHARE_MAX: f64 = 0.95;

/// The executor's share from predicted times of the whole MUL_MAT on each side: each part's time is
/// proportional to its rows over its rate, so they are equal at `host / (ane + host)`. 0.5 where either
/// side has no prediction (the reference executor has none).
fn initial_share(e: &Eligible) -> f64 {
    let eng = engine();
    let shape = MatmulShape {
        m: e.m,
        k: e.k,
        n: e.n,
    };
    let p = eng
        .policy
        .predict(&shape, eng.variant_for(e.wtype, e.kind_route));
    match (p.ane_ms, p.host_ms) {
        (Some(a), Some(h)) if a > 0.0 && h > 0.0 => (h / (a + h)).clamp(SHARE_MIN, SHARE_MAX),
        _ => 0.5,
    }
}

/// `GGML_COREML_SPLIT=auto` state of one weight shape. The share used is the learned one rounded to
/// 1/16: each distinct row count is a program (compiled on a Mac) and a prepared form, so the share
/// moves in steps, and stops moving after [`AutoShare::MAX_STEPS`] steps.
#[derive(Clone, Copy, Debug)]
struct AutoShare {
    share: f64,
    steps: u8,
}

impl AutoShare {
    const MAX_STEPS: u8 = 8;

    fn new(share: f64) -> AutoShare {
        AutoShare { share, steps: 0 }
    }

    fn quantized(s: f64) -> f64 {
        ((s * 16.0).round() / 16.0).clamp(1.0 / 16.0, 15.0 / 16.0)
    }

    fn used(&self) -> f64 {
        AutoShare::quantized(self.share)
    }

    fn learn(self, next: f64) -> AutoShare {
        if self.steps >= AutoShare::MAX_STEPS {
            return self;
        }
        let step = AutoShare::quantized(next) != self.used();
        AutoShare {
            share: next,
            steps: self.steps + step as u8,
        }
    }
}

/// What one split node measured: rows on each side, the time to queue the inner device's part (its
/// whole time when the inner device computes synchronously, as the CPU does), the executor's part,
/// and the wait for the inner device at the join.
#[derive(Clone, Copy, Debug)]
struct SplitTimes {
    n_ane: usize,
    n_inner: usize,
    launch_s: f64,
    exec_s: f64,
    wait_s: f64,
    /// The executor's part included preparing its weight (not its steady-state time).
    prepared: bool,
}

impl SplitTimes {
    /// The share that balances both parts, half-way from `share` (smoothing); None when this node
    /// says nothing (weight prepared in it). An inner part that finished before the executor's, on an
    /// asynchronous device, has no measured time: the share then moves 10 % towards the inner device,
    /// until the join waits again.
    fn next_share(&self, share: f64) -> Option<f64> {
        if self.prepared || self.exec_s <= 0.0 || self.n_ane == 0 || self.n_inner == 0 {
            return None;
        }
        let inner_s = if self.wait_s > 0.02 * self.exec_s {
            Some(self.launch_s + self.exec_s + self.wait_s)
        } else if self.launch_s > 0.5 * self.exec_s {
            Some(self.launch_s)
        } else {
            None
        };
        let next = match inner_s {
            Some(t) => {
                let r_ane = self.n_ane as f64 / self.exec_s;
                let r_inner = self.n_inner as f64 / t.max(1e-9);
                0.5 * share + 0.5 * r_ane / (r_ane + r_inner)
            }
            None => share * 0.9,
        };
        Some(next.clamp(SHARE_MIN, SHARE_MAX))
    }
}

/// One MUL_MAT split along N between the inner device and the executor: the inner device computes
/// rows `[n_ane, N)` of the output asynchronously (a small graph: a view of the weight rows, MUL_MAT,
/// copy into a view of dst), while the executor computes rows `[0, n_ane)`; then both join. `None`
/// when the node does not split (batched, or too few rows for two parts); else what it measured.
fn run_split(
    ctx: &mut RouterCtx,
    node: &TensorRef<'_>,
    e: Eligible,
    share: f64,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<RegistryRef<'t>>,
) -> Result<Option<SplitTimes>, String> {
    const ALIGN: usize = 32;
    let eng = engine();
    let api = api().ok_or("ggml not bound")?;
    let (w, x) = (node.src(0).ok_or("no src0")?, node.src(1).ok_or("no src1")?);
    let (wne, xne) = (w.ne(), x.ne());
    if wne[2] * wne[3] != 1 || xne[2] * xne[3] != 1 {
        return Ok(None);
    }
    // Rounded to whole 32-row blocks, at least one: any share gives the executor some rows.
    let n_ane = (((e.n as f64 * share / ALIGN as f64).round() as usize).max(1) * ALIGN).min(e.n);
    if n_ane < ALIGN || e.n - n_ane < ALIGN {
        return Ok(None);
    }
    let n_gpu = e.n - n_ane;
    let t0 = Instant::now();
    let row = e.wtype.row_bytes(e.k).map_err(|err| err.to_string())?;
    let (wnb, dnb) = (w.nb(), node.nb());
    // The inner device's part, queued first so that it runs while the executor computes.
    // SAFETY: a private no-alloc context; every tensor made in it is a view of a live allocated tensor
    // or the one intermediate placed in our scratch buffer below; the context is freed before return,
    // after the inner device has finished.
    let gctx = unsafe {
        (api.init)(GgmlInitParams {
            mem_size: (api.graph_overhead_custom)(16, false) + 16 * 1024,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        })
    };
    if gctx.is_null() {
        return Err("ggml_init failed".into());
    }
    struct Ctx(*mut GgmlContext, &'static crate::ffi::ggml::GgmlApi);
    impl Drop for Ctx {
        fn drop(&mut self) {
            // SAFETY: the context made above, freed once.
            unsafe { (self.1.free)(self.0) };
        }
    }
    let _guard = Ctx(gctx, api);
    let wp = w.ptr().cast_mut();
    let xp = x.ptr().cast_mut();
    let dp = node.ptr().cast_mut();
    // SAFETY: views within the tensors' extents (rows n_ane..N of the weight, columns n_ane..N of dst).
    let (status, g) = unsafe {
        let wv = (api.view_2d)(gctx, wp, e.k as i64, n_gpu as i64, wnb[1], n_ane * wnb[1]);
        let t = (api.mul_mat)(gctx, wv, xp);
        let dv = (api.view_2d)(gctx, dp, n_gpu as i64, e.m as i64, dnb[1], n_ane * 4);
        let c = (api.cpy)(gctx, t, dv);
        let g = (api.new_graph_custom)(gctx, 16, false);
        if wv.is_null() || t.is_null() || dv.is_null() || c.is_null() || g.is_null() {
            return Err("cannot build the inner device's part".into());
        }
        // The two nodes only: expanding from `c` would walk x's producers, the whole model graph. Nodes
        // added by hand carry no compute flag, and backends skip nodes without it.
        (*t).flags |= GGML_TENSOR_FLAG_COMPUTE;
        (*c).flags |= GGML_TENSOR_FLAG_COMPUTE;
        (api.graph_add_node)(g, t);
        (api.graph_add_node)(g, c);
        (api.view_init)(wv);
        (api.view_init)(dv);
        // The intermediate lives in a scratch buffer of dst's buffer type, grown when too small.
        let buft = (*node.buffer()).buft;
        let need = (api.buft_get_alloc_size)(buft, t) + 256;
        if ctx.split_cap < need {
            if !ctx.split_buf.is_null() {
                (api.buffer_free)(ctx.split_buf);
            }
            ctx.split_buf = (api.buft_alloc_buffer)(buft, need);
            ctx.split_cap = if ctx.split_buf.is_null() { 0 } else { need };
        }
        if ctx.split_buf.is_null() {
            return Err("no scratch buffer for the inner device's part".into());
        }
        let base = (api.buffer_get_base)(ctx.split_buf) as usize;
        let align = (api.buft_get_alignment)(buft).max(1);
        let at = base.div_ceil(align) * align;
        (api.tensor_alloc)(ctx.split_buf, t, at as *mut std::ffi::c_void);
        ((api.graph_compute_async)(ctx.host.raw(), g), g)
    };
    let launch = t0.elapsed();
    if status != GGML_STATUS_SUCCESS {
        return Err(format!("inner device part failed with status {status}"));
    }
    // The executor's part: the first n_ane rows of the weight.
    let (addr, stride) = {
        // SAFETY: eligible() checked rows of whole blocks; one 2-D slice.
        unsafe { w.slice2d_addr(0, 0) }
    };
    let mode = eng.mode_for(e.wtype, e.kind_route);
    let registry = registry_of(&w);
    let mut xfer = Transfers::default();
    let cached = registry
        .as_ref()
        .and_then(|r| r.get(addr, mode, stride, n_ane));
    let prepared_now = cached.is_none();
    // Bounded mode: the executor's rows of a weight that is not kept, larger than one slice, are
    // prepared in row slices as in `run_ane`.
    let e_ane = Eligible { n: n_ane, ..e };
    let sliced = prepared_now
        && (registry.is_none() || eng.over_budget(mode, n_ane, e.k))
        && eng.slice_rows(mode, n_ane, e.k) < n_ane;
    // Non-host weights: the executor's rows in one read, compacted.
    let gathered = (prepared_now && !host_visible(&w, Face::Hybrid)).then(|| {
        let span = wnb[1] * (n_ane - 1) + row;
        let mut raw = vec![0u8; span];
        // SAFETY: the first n_ane rows lie within the tensor; tensor_get checks bounds.
        unsafe { (api.tensor_get)(wp, raw.as_mut_ptr().cast(), 0, span) };
        xfer.add(span);
        slice_rows(&raw, [e.k as i64, n_ane as i64, 1, 1], wnb, 0, 0, row)
    });
    // Rows r0 .. r0 + rows of the executor's part (clamped to n_ane).
    let rows_of = |r0: usize, rows: usize| -> std::borrow::Cow<'_, [u8]> {
        let rows = rows.min(n_ane.saturating_sub(r0));
        match &gathered {
            Some(g) => std::borrow::Cow::Borrowed(&g[r0 * row..(r0 + rows) * row]),
            // SAFETY: as above; rows within the first n_ane.
            None => unsafe { w.slice2d_row_range(0, 0, row, r0, rows) },
        }
    };
    let pw = match cached {
        Some(pw) => Some(pw),
        None if sliced => None,
        None => {
            let bytes = rows_of(0, n_ane);
            Some(match &registry {
                Some(reg) => {
                    eng.prepared(reg, addr, stride, e.wtype, &bytes, n_ane, e.k, e.kind_route)?
                }
                None => eng.prepared_uncached(e.wtype, &bytes, n_ane, e.k, e.kind_route)?,
            })
        }
    };
    let x_host = host_visible(&x, Face::Hybrid);
    let x_copy = (!x_host).then(|| read_whole(api, &x, &mut xfer));
    let rows = match &x_copy {
        // SAFETY: src1 is F32 and allocated.
        None => unsafe { x.f32_rows(0, 0) },
        Some(bytes) => gather_f32(bytes, xne, x.nb(), 0, 0),
    };
    let (xs, xstride) = rows.as_slice();
    let act = Activations {
        x: xs,
        m: e.m,
        x_stride: xstride,
    };
    ctx.out.resize(e.m * n_ane, 0.0);
    let pool = ctx.host.pool();
    let (exec, scratch) = (eng.executor.as_ref(), &mut ctx.scratch);
    let ran = ggml_coreml_program::pool::with_pool(pool.clone(), || match &pw {
        Some(pw) => driver::matmul(exec, pw, &act, &mut ctx.out[..], n_ane, scratch)
            .map_err(|err| err.to_string()),
        None => run_sliced(
            &e_ane,
            &rows_of,
            &act,
            &mut ctx.out[..],
            n_ane,
            scratch,
            None,
        ),
    });
    let exec_done = t0.elapsed();
    // Join: the inner device's part is done before dst is touched or the graph freed.
    ctx.host.synchronize();
    let waited = t0.elapsed() - exec_done;
    ran?;
    if host_visible(node, Face::Hybrid) {
        for m in 0..e.m {
            // SAFETY: row m of dst holds N f32 at stride nb[1]; we write its first n_ane.
            unsafe {
                let d = node.data().cast::<u8>().add(m * dnb[1]).cast::<f32>();
                std::ptr::copy_nonoverlapping(ctx.out[m * n_ane..].as_ptr(), d, n_ane);
            }
        }
    } else {
        // SAFETY: m rows of n_ane f32 at dst's row stride; tensor_set_2d checks bounds.
        unsafe {
            (api.tensor_set_2d)(
                dp,
                ctx.out.as_ptr().cast(),
                0,
                n_ane * 4,
                e.m,
                dnb[1],
                n_ane * 4,
            )
        };
        xfer.add(e.m * n_ane * 4);
    }
    eng.stats.transfers(xfer.calls, xfer.bytes);
    // Profiling (not on by default): each part again alone, to compare with the overlapped wall time.
    // Nodes that prepared their weight this call are left out (the parts alone would not include it).
    if split_profile()
        && !prepared_now
        && let Some(pw) = &pw
    {
        let wall = t0.elapsed();
        let t = Instant::now();
        // SAFETY: the same two-node graph, its context and scratch still alive; it rewrites the same
        // values into the same rows of dst.
        let st = unsafe { (api.graph_compute_async)(ctx.host.raw(), g) };
        ctx.host.synchronize();
        let inner = t.elapsed();
        let t = Instant::now();
        let again = ggml_coreml_program::pool::with_pool(pool, || {
            driver::matmul(exec, pw, &act, &mut ctx.out[..], n_ane, &mut ctx.scratch)
        });
        let alone = t.elapsed();
        if st == GGML_STATUS_SUCCESS && again.is_ok() {
            // The executor's part as it ran: everything but queueing the inner part and waiting for it
            // (reading x, the matmul, writing dst), with the caches as they were, unlike the re-run.
            let exec_inline = wall.saturating_sub(launch + waited);
            eng.stats
                .split_profile(wall, inner, alone, exec_inline, launch, waited);
        }
    }
    eng.stats
        .split_nodes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    eng.stats.split_share(n_ane as f64 / e.n as f64);
    Ok(Some(SplitTimes {
        n_ane,
        n_inner: n_gpu,
        launch_s: launch.as_secs_f64(),
        exec_s: (exec_done - launch).as_secs_f64(),
        wait_s: waited.as_secs_f64(),
        prepared: prepared_now,
    }))
}

/// Do two f32 slices share memory?
fn overlaps(a: &[f32], b: &[f32]) -> bool {
    let (a0, b0) = (a.as_ptr() as usize, b.as_ptr() as usize);
    a0 < b0 + std::mem::size_of_val(b) && b0 < a0 + std::mem::size_of_val(a)
}

/// A whole tensor of a non-host buffer, in one bulk read.
fn read_whole(api: &GgmlApi, t: &TensorRef<'_>, xfer: &mut Transfers) -> Vec<u8> {
    // SAFETY: a live allocated tensor; ggml_nbytes bytes are readable through the backend API.
    let nbytes = unsafe { (api.nbytes)(t.ptr()) };
    let mut v = vec![0u8; nbytes];
    // SAFETY: `v` has nbytes bytes; the backend copies the tensor into it.
    unsafe { (api.tensor_get)(t.ptr(), v.as_mut_ptr().cast(), 0, nbytes) };
    xfer.add(nbytes);
    v
}

/// Rows of the 2-D slice `(i2, i3)` of a host copy of a whole weight tensor, compacted to `row` bytes.
fn slice_rows(
    whole: &[u8],
    ne: [i64; 4],
    nb: [usize; 4],
    i2: usize,
    i3: usize,
    row: usize,
) -> Vec<u8> {
    let rows = ne[1] as usize;
    let off = i2 * nb[2] + i3 * nb[3];
    let mut out = vec![0u8; rows * row];
    for (r, dst) in out.chunks_exact_mut(row).enumerate() {
        let at = off + r * nb[1];
        if let Some(src) = whole.get(at..at + row) {
            dst.copy_from_slice(src);
        }
    }
    out
}

/// f32 rows of batch `(i2, i3)` from a host copy of a whole tensor.
fn gather_f32(
    bytes: &[u8],
    ne: [i64; 4],
    nb: [usize; 4],
    i2: usize,
    i3: usize,
) -> RowsF32<'static> {
    let (k, m) = (ne[0] as usize, ne[1] as usize);
    let mut x = Vec::with_capacity(m * k);
    for r in 0..m {
        for c in 0..k {
            let o = i2 * nb[2] + i3 * nb[3] + r * nb[1] + c * nb[0];
            let v = bytes
                .get(o..o + 4)
                .map_or(0.0, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            x.push(v);
        }
    }
    RowsF32::Gathered { x, stride: k }
}

/// Writes `m` rows of `n` f32 into batch `(i2, i3)` of a tensor in a non-host buffer: one bulk write
/// when its rows are contiguous (the usual case), else one per row.
fn write_rows_via_api(
    api: &GgmlApi,
    dst: &TensorRef<'_>,
    i2: usize,
    i3: usize,
    src: &[f32],
    n: usize,
    xfer: &mut Transfers,
) {
    let (ne, nb) = (dst.ne(), dst.nb());
    let m = ne[1] as usize;
    let off = i2 * nb[2] + i3 * nb[3];
    if nb[1] == n * 4 || m == 1 {
        // SAFETY: m contiguous rows of n f32 lie within the tensor; tensor_set checks bounds itself.
        unsafe { (api.tensor_set)(dst.ptr().cast_mut(), src.as_ptr().cast(), off, m * n * 4) };
        xfer.add(m * n * 4);
        return;
    }
    for r in 0..m {
        let row = &src[r * n..(r + 1) * n];
        // SAFETY: the destination row lies within the tensor; tensor_set checks bounds itself.
        unsafe {
            (api.tensor_set)(
                dst.ptr().cast_mut(),
                row.as_ptr().cast(),
                off + r * nb[1],
                n * 4,
            )
        };
        xfer.add(n * 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(launch: f64, exec: f64, wait: f64) -> SplitTimes {
        SplitTimes {
            n_ane: 512,
            n_inner: 512,
            launch_s: launch,
            exec_s: exec,
            wait_s: wait,
            prepared: false,
        }
    }

    /// Q8_0 rows with small scales and pseudo-random values (no NaN, no infinity).
    fn q8_0(n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(n * (k / 32) * 34);
        for _ in 0..n * (k / 32) {
            out.extend_from_slice(&0x2c00u16.to_le_bytes()); // fp16 0.0625
            for _ in 0..32 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                out.push((x >> 16) as u8);
            }
        }
        out
    }

    fn key(rows: usize, k: usize) -> AheadKey {
        AheadKey {
            addr: 0x1000,
            stride: WeightType::Q8_0.row_bytes(k).unwrap(),
            wtype: WeightType::Q8_0,
            mode: engine().mode_for(WeightType::Q8_0, driver::KindRoute::default()),
            rows,
            k,
        }
    }

    fn prep(rows: usize, k: usize) -> impl FnOnce(&[u8]) -> Result<PreparedWeight, String> + Send {
        move |b| engine().prepare_slice(WeightType::Q8_0, b, rows, k, driver::KindRoute::default())
    }

    #[test]
    fn prefetch_is_claimed_only_by_its_node_and_weight() {
        let st = &engine().stats;
        let (rows, k) = (32, 64);
        let wasted = || st.prefetch_wasted.load(Ordering::Relaxed);
        let spawn = || Prefetch::spawn(7, key(rows, k), q8_0(rows, k, 1), prep(rows, k)).unwrap();
        // Its node and weight, prepared for this call: the form, counted while alive.
        let (w, alive) = spawn().claim(7, &key(rows, k), true).unwrap().unwrap();
        assert_eq!((w.n, w.k), (rows, k));
        assert!(st.slice_bytes_alive.load(Ordering::Relaxed) >= w.bytes_held() as u64);
        assert!(st.slice_bytes_peak.load(Ordering::Relaxed) >= w.bytes_held() as u64);
        drop((w, alive));
        // Another node, another weight part (address, rows), or a node that keeps its weight: dropped
        // and counted as wasted (other tests may count too, hence `>=`).
        let mut other = key(rows, k);
        other.addr += 64;
        let mut fewer = key(rows, k);
        fewer.rows = 16;
        for (node, key, usable) in [
            (8, key(rows, k), true),
            (7, other, true),
            (7, fewer, true),
            (7, key(rows, k), false),
        ] {
            let before = wasted();
            assert!(spawn().claim(node, &key, usable).is_none());
            assert!(wasted() > before);
        }
        // Never claimed (the graph ended first): joined and counted at drop.
        let before = wasted();
        drop(spawn());
        assert!(wasted() > before);
    }

    #[test]
    fn prefetch_panic_becomes_an_error_for_its_node() {
        let (rows, k) = (32, 64);
        let p = Prefetch::spawn(3, key(rows, k), q8_0(rows, k, 2), |_: &[u8]| {
            panic!("test panic in a prefetch thread")
        })
        .unwrap();
        let r = p.claim(3, &key(rows, k), true).unwrap();
        assert!(r.is_err_and(|e| e.contains("panicked")));
    }

    #[test]
    fn sliced_run_with_a_first_slice_prepared_ahead_equals_the_whole_product() {
        let eng = engine();
        let k = 256;
        let mode = eng.mode_for(WeightType::Q8_0, driver::KindRoute::default());
        // One slice and a half, so there is a second (shorter) slice.
        let step = eng.slice_rows(mode, usize::MAX, k);
        let (n, m) = (step + step / 2, 3);
        let row = WeightType::Q8_0.row_bytes(k).unwrap();
        let bytes = q8_0(n, k, 3);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let act = Activations {
            x: &x,
            m,
            x_stride: k,
        };
        let e = Eligible {
            wtype: WeightType::Q8_0,
            kind_route: driver::KindRoute::default(),
            k,
            n,
            m,
        };
        let exec = eng.executor.as_ref();
        let mut scratch = Scratch::default();
        let whole = eng
            .prepare_slice(WeightType::Q8_0, &bytes, n, k, e.kind_route)
            .unwrap();
        let mut want = vec![0f32; m * n];
        driver::matmul(exec, &whole, &act, &mut want, n, &mut scratch).unwrap();
        let rows_of = |r0: usize, rows: usize| {
            let rows = rows.min(n - r0);
            std::borrow::Cow::Borrowed(&bytes[r0 * row..(r0 + rows) * row])
        };
        for ahead in [false, true] {
            let first = ahead.then(|| {
                let w = prep(step, k)(&bytes[..step * row]).unwrap();
                let alive = Alive::new(&w);
                (w, alive)
            });
            let mut got = vec![0f32; m * n];
            run_sliced(&e, &rows_of, &act, &mut got, n, &mut scratch, first).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "prepared ahead: {ahead}"
            );
        }
    }

    #[test]
    fn split_knob_parses_shares_and_auto() {
        assert_eq!(parse_split("auto"), Some(SplitMode::Auto));
        assert_eq!(parse_split(" AUTO "), Some(SplitMode::Auto));
        assert_eq!(parse_split("0.25"), Some(SplitMode::Fixed(0.25)));
        for bad in ["0", "1", "1.5", "-0.1", "half", ""] {
            assert_eq!(parse_split(bad), None, "{bad}");
        }
    }

    #[test]
    fn auto_share_balances_the_measured_parts() {
        // Synchronous inner device (the CPU) twice as fast per row as the executor: the balance is 1/3.
        let mut share = 0.5;
        for _ in 0..20 {
            let n_ane = (1024.0 * share) as usize;
            let t = SplitTimes {
                n_ane,
                n_inner: 1024 - n_ane,
                launch_s: (1024 - n_ane) as f64 * 1e-6,
                exec_s: n_ane as f64 * 2e-6,
                wait_s: 0.0,
                prepared: false,
            };
            share = t.next_share(share).unwrap();
        }
        assert!((share - 1.0 / 3.0).abs() < 0.01, "{share}");
        // Asynchronous inner device that the executor waited for: its time is launch + exec + wait, here
        // twice the executor's for as many rows, so the executor should take 2/3.
        let s = times(0.0, 1.0, 1.0).next_share(0.5).unwrap();
        assert!((s - (0.5 * 0.5 + 0.5 * (2.0 / 3.0))).abs() < 1e-9, "{s}");
        // Asynchronous inner part done before the executor's: no time known, move towards it.
        assert!((times(0.0, 1.0, 0.0).next_share(0.5).unwrap() - 0.45).abs() < 1e-9);
        // Bounds, and nothing learned from a node that prepared its weight.
        assert_eq!(times(0.0, 1.0, 0.0).next_share(0.05), Some(SHARE_MIN));
        let mut prepared = times(0.0, 1.0, 1.0);
        prepared.prepared = true;
        assert_eq!(prepared.next_share(0.5), None);
    }

    #[test]
    fn auto_share_moves_in_sixteenths_and_settles() {
        let mut a = AutoShare::new(0.5);
        assert_eq!(a.used(), 0.5);
        // A move inside one step changes the learned share, not the rows used, and is not a step.
        a = a.learn(0.52);
        assert_eq!((a.used(), a.steps), (0.5, 0));
        // Alternating far moves: each is a step, and after MAX_STEPS the share stays put.
        for i in 0..20 {
            a = a.learn(if i % 2 == 0 { 0.2 } else { 0.8 });
        }
        assert_eq!(a.steps, AutoShare::MAX_STEPS);
        let frozen = a.used();
        assert_eq!(a.learn(0.5).used(), frozen);
        assert_eq!(AutoShare::quantized(0.0), 1.0 / 16.0);
        assert_eq!(AutoShare::quantized(1.0), 15.0 / 16.0);
    }
}
