//! Where does a MUL_MAT go, and why — all in this file.
//!
//! [`eligible`] says whether the ANE path can compute a node at all (types, layout, op hints).
//! [`claim`] answers ggml's `supports_op` (scheduling and weight placement).
//! [`route`] decides, per node at compute time, between the executor and the host.
//! [`compute`] walks the graph a face receives: ANE nodes go to the driver/executor, host nodes are
//! batched into one call of the inner (host) backend, and an executor error sends that node to the host.

use std::time::Instant;

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::driver::{self, Activations, Scratch};
use ggml_coreml_policy::{Decision, MatmulShape};

use crate::engine::{ParityEntry, engine};
use crate::ffi::abi::*;
use crate::ffi::ggml::{GgmlApi, api};
use crate::ffi::tensor::{RowsF32, TensorRef};
use crate::host::HostBackend;
use crate::log;
use crate::weights::WeightRegistry;

/// GGML_PREC_F32 in `op_params[0]`: the graph asks for f32 accumulation.
const PREC_F32: i32 = 10;
/// `op_params[3]`: smallest precision src1 may be converted to; Q8 = 30.
const PREC_Q8: i32 = 30;

/// A MUL_MAT the ANE path can compute.
#[derive(Clone, Copy, Debug)]
pub struct Eligible {
    pub wtype: WeightType,
    /// The weight's kind keeps w8f16 on int8 chips (`driver::keeps_w8f16`).
    pub fp16_kind: bool,
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
    let fp16_kind = driver::keeps_w8f16(&w.name());
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
        if engine().mode_for(wtype, fp16_kind).int8() {
            return Err("graph forbids int8 activations");
        }
        if src1_prec < 20 {
            return Err("graph forbids fp16 activations");
        }
    }
    Ok(Eligible {
        wtype,
        fp16_kind,
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
                eng.policy
                    .would_offload_weight_for(e.k, e.n, eng.variant_for(e.wtype, e.fp16_kind))
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

pub fn route(node: &TensorRef<'_>, face: Face) -> Route {
    let e = match eligible(node) {
        Ok(e) => e,
        Err(why) => return Route::Host(why),
    };
    // The hybrid face sees every matmul of the graph; only those over model weights may go to the ANE
    // (prepared weights are cached by address, and a KV-cache operand changes every step).
    if face == Face::Hybrid
        && node.src(0).and_then(|w| w.buffer_usage()) != Some(BUFFER_USAGE_WEIGHTS)
    {
        return Route::Host("not a weight");
    }
    let eng = engine();
    match eng.policy.decide_for(
        &MatmulShape {
            m: e.m,
            k: e.k,
            n: e.n,
        },
        eng.variant_for(e.wtype, e.fp16_kind),
    ) {
        Decision::Ane => Route::Ane(e),
        Decision::Host(r) => Route::Host(r.as_str()),
    }
}

/// Per-backend state the router needs.
pub struct RouterCtx {
    pub host: HostBackend,
    pub scratch: Scratch,
    pub out: Vec<f32>,
    /// Weights whose buffer is not one of ours (hybrid face): prepared and kept here.
    pub foreign: WeightRegistry,
    /// Hybrid face: graphs handed to the inner backend whole / split around offloaded MUL_MATs.
    pub unsplit_graphs: u64,
    pub split_graphs: u64,
    /// Inner-backend calls made by the last split graph (for tests and the debug log).
    pub last_host_calls: usize,
    /// Split graphs in which the inner backend was called more often than once per offloaded
    /// MUL_MAT plus one — i.e. split somewhere else than around an offloaded MUL_MAT. Should stay 0.
    pub oversplit_graphs: u64,
}

impl RouterCtx {
    pub fn new(host: HostBackend) -> RouterCtx {
        RouterCtx {
            host,
            scratch: Scratch::default(),
            out: Vec::new(),
            foreign: WeightRegistry::default(),
            unsplit_graphs: 0,
            split_graphs: 0,
            last_host_calls: 0,
            oversplit_graphs: 0,
        }
    }
}

/// Runs the nodes of a graph: returns a ggml status.
///
/// `registry_of` maps a weight tensor to the registry of prepared weights of its buffer (None: the
/// backend's own registry). A graph in which no node goes to the ANE is handed to the inner backend
/// whole (`graph`), so decode costs nothing extra.
///
/// # Safety
/// `graph` is the live graph ggml passed to a face's `graph_compute`.
pub unsafe fn compute(
    ctx: &mut RouterCtx,
    graph: *mut GgmlCgraph,
    face: Face,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<&'t WeightRegistry>,
) -> i32 {
    let Some(api) = api() else {
        return GGML_STATUS_FAILED;
    };
    // SAFETY: ggml's graph accessors on the graph it passed us.
    let nodes: Vec<*mut GgmlTensor> = unsafe {
        let n = (api.graph_n_nodes)(graph);
        (0..n).map(|i| (api.graph_node)(graph, i)).collect()
    };
    let nodes = &nodes[..];
    let eng = engine();
    eng.poll_control();
    eng.refresh_device_state();
    if face == Face::Hybrid {
        let any_ane = nodes.iter().any(|&p| {
            // SAFETY: live graph nodes.
            let Some(n) = (unsafe { TensorRef::from_ptr(p) }) else {
                return false;
            };
            n.op() == GGML_OP_MUL_MAT
                && n.flags() & GGML_TENSOR_FLAG_COMPUTE != 0
                && matches!(route(&n, face), Route::Ane(_))
        });
        if !any_ane {
            ctx.unsplit_graphs += 1;
            // SAFETY: the graph ggml gave the hybrid face, allocated in the inner device's buffers.
            return unsafe { ctx.host.compute_graph(graph) };
        }
        ctx.split_graphs += 1;
    }
    ctx.last_host_calls = 0;
    let mut ane_nodes = 0usize;
    let mut pending: Vec<*mut GgmlTensor> = Vec::new();
    let mut pending_reason: Vec<&'static str> = Vec::new();
    for &p in nodes {
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
        match route(&node, face) {
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
                let variant = eng.variant_for(e.wtype, e.fp16_kind);
                match run_ane(ctx, &node, e, face, registry_of) {
                    Ok(batches) => {
                        let dt = t0.elapsed();
                        let flops = 2 * (e.m * e.k * e.n) as u64 * batches as u64;
                        eng.stats.ane(dt, flops);
                        eng.stats.variant(eng.mode_for(e.wtype, e.fp16_kind), flops);
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
    }
    let st = flush(ctx, &mut pending, &mut pending_reason);
    if face == Face::Hybrid && ctx.last_host_calls > ane_nodes + 1 {
        ctx.oversplit_graphs += 1;
    }
    eng.write_files(false);
    st
}

/// Is `t`'s memory plain host memory? Always for the ACCEL face (our buffer type, CPU buffers); for the
/// hybrid face only when the inner device's buffer says so (Metal's may not).
fn host_visible(t: &TensorRef<'_>, face: Face) -> bool {
    face == Face::Accel
        || api().is_some_and(|api| {
            // SAFETY: an allocated tensor's live buffer.
            !t.buffer().is_null() && unsafe { (api.buffer_is_host)(t.buffer()) }
        })
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
        variant: eng.mode_for(e.wtype, e.fp16_kind).name(),
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
fn run_ane(
    ctx: &mut RouterCtx,
    node: &TensorRef<'_>,
    e: Eligible,
    face: Face,
    registry_of: &dyn for<'t> Fn(&TensorRef<'t>) -> Option<&'t WeightRegistry>,
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
    let visible = |t: &TensorRef<'_>| host_visible(t, face);
    let (w_host, x_host, d_host) = (visible(&w), visible(&x), visible(node));
    let (wne, xne) = (w.ne(), x.ne());
    let (r2, r3) = ((xne[2] / wne[2]) as usize, (xne[3] / wne[3]) as usize);
    let row = e.wtype.row_bytes(e.k).map_err(|err| err.to_string())?;
    let registry = registry_of(&w);
    // Non-host activations: one copy of the whole tensor.
    let x_copy: Option<Vec<u8>> = if x_host {
        None
    } else {
        // SAFETY: live allocated tensor; ggml_nbytes bytes are readable through the backend API.
        let nbytes = unsafe { (api.nbytes)(x.ptr()) };
        let mut v = vec![0u8; nbytes];
        // SAFETY: `v` has nbytes bytes; the backend copies the tensor into it.
        unsafe { (api.tensor_get)(x.ptr(), v.as_mut_ptr().cast(), 0, nbytes) };
        Some(v)
    };
    let pool = ctx.host.pool();
    let mut batches = 0;
    for i13 in 0..xne[3] as usize {
        for i12 in 0..xne[2] as usize {
            let (i02, i03) = (i12 / r2, i13 / r3);
            // SAFETY: eligible() checked rows of whole blocks; indices are within ne[2], ne[3].
            let (addr, stride) = unsafe { w.slice2d_addr(i02, i03) };
            let reg = registry.unwrap_or(&ctx.foreign);
            let pw = match reg.get(addr, eng.mode_for(e.wtype, e.fp16_kind), stride) {
                Some(pw) => pw,
                None if w_host => {
                    // SAFETY: as above.
                    let bytes = unsafe { w.slice2d_rows(i02, i03, row) };
                    eng.prepared(reg, addr, stride, e.wtype, &bytes, e.n, e.k, e.fp16_kind)?
                }
                None => {
                    let bytes = copy_rows(api, &w, i02, i03, row);
                    eng.prepared(reg, addr, stride, e.wtype, &bytes, e.n, e.k, e.fp16_kind)?
                }
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
            ggml_coreml_program::pool::with_pool(pool.clone(), || {
                driver::matmul(exec, &pw, &act, out, stride, scratch)
            })
            .map_err(|err| err.to_string())?;
            if copy_back && d_host {
                // SAFETY: as above.
                unsafe { node.write_f32_rows(i12, i13, &ctx.out, e.n) };
            } else if copy_back {
                write_rows_via_api(api, node, i12, i13, &ctx.out, e.n);
            }
            batches += 1;
        }
    }
    Ok(batches)
}

/// Do two f32 slices share memory?
fn overlaps(a: &[f32], b: &[f32]) -> bool {
    let (a0, b0) = (a.as_ptr() as usize, b.as_ptr() as usize);
    a0 < b0 + std::mem::size_of_val(b) && b0 < a0 + std::mem::size_of_val(a)
}

/// Rows of a weight slice in a non-host buffer, compacted to `row` bytes each.
fn copy_rows(api: &GgmlApi, w: &TensorRef<'_>, i2: usize, i3: usize, row: usize) -> Vec<u8> {
    let (ne, nb) = (w.ne(), w.nb());
    let rows = ne[1] as usize;
    let off = i2 * nb[2] + i3 * nb[3];
    let mut out = vec![0u8; rows * row];
    for r in 0..rows {
        // SAFETY: the row lies within the tensor (ggml strides); tensor_get checks bounds itself.
        unsafe {
            (api.tensor_get)(
                w.ptr(),
                out[r * row..].as_mut_ptr().cast(),
                off + r * nb[1],
                row,
            )
        };
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

/// Writes `m` rows of `n` f32 into batch `(i2, i3)` of a tensor in a non-host buffer.
fn write_rows_via_api(
    api: &GgmlApi,
    dst: &TensorRef<'_>,
    i2: usize,
    i3: usize,
    src: &[f32],
    n: usize,
) {
    let (ne, nb) = (dst.ne(), dst.nb());
    let m = ne[1] as usize;
    let off = i2 * nb[2] + i3 * nb[3];
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
    }
}
