//! What the backend did: ops offloaded, declined by reason, time in the executor.
//! Read by the summary at backend free, `ggml_backend_coreml_get_stats` and the QVAC package.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ggml_coreml_executor::driver::Mode;

#[derive(Default)]
pub struct Stats {
    pub ane_ops: AtomicU64,
    pub ane_ns: AtomicU64,
    pub ane_flops: AtomicU64,
    pub host_ops: AtomicU64,
    pub host_ns: AtomicU64,
    pub faults: AtomicU64,
    pub weights_prepared: AtomicU64,
    pub weight_bytes_held: AtomicU64,
    /// Bytes of our own buffers (weights copied into our memory) and of buffers over llama.cpp's
    /// mapping of the model file (borrowed: not ours, counted to show nothing was copied).
    pub raw_bytes_owned: AtomicU64,
    pub raw_bytes_borrowed: AtomicU64,
    /// Bytes of lent raw weight pages handed back to the OS once their prepared form was kept
    /// (`madvise(MADV_PAGEOUT)` on Linux; they come back if a node reads them again).
    pub raw_bytes_released: AtomicU64,
    /// Weights prepared per call in row slices (bounded mode), and the most bytes of prepared
    /// slices alive at once.
    pub sliced_calls: AtomicU64,
    pub slice_bytes_peak: AtomicU64,
    /// Bytes of per-call slices (and forms prepared ahead) alive now, process-wide
    /// (`router::Alive`); `slice_bytes_peak` is its maximum.
    pub slice_bytes_alive: AtomicU64,
    /// Per-call weights whose first slice (or whole form, when smaller) was prepared ahead on a second
    /// thread while an earlier matmul ran, and those of them not used (the node went elsewhere or its
    /// weight had become resident).
    pub prefetched: AtomicU64,
    pub prefetch_wasted: AtomicU64,
    /// Weights prepared for one call only because the resident budget was full.
    pub prepared_per_call: AtomicU64,
    /// MUL_MATs split between the executor and the inner device (`GGML_COREML_SPLIT`).
    pub split_nodes: AtomicU64,
    pub prepare_ns: AtomicU64,
    /// Offloaded nodes that copied operands to or from a non-host inner buffer, the copies (bulk
    /// `tensor_get` / `tensor_set` calls) they made, the most one node made, and the bytes moved.
    pub xfer_nodes: AtomicU64,
    pub xfer_calls: AtomicU64,
    pub xfer_max_per_node: AtomicU64,
    pub xfer_bytes: AtomicU64,
    /// Hybrid face: graphs walked, those handed on whole (nothing offloaded), time in that walk.
    pub hybrid_graphs: AtomicU64,
    pub hybrid_unsplit: AtomicU64,
    pub hybrid_walk_ns: AtomicU64,
    /// `GGML_COREML_SPLIT_PROFILE=1`: split nodes timed overlapped (wall) and each part alone, the
    /// sum over nodes of the longer part, and the worst node's wall / longer part (× 1e6).
    pub split_prof_nodes: AtomicU64,
    pub split_wall_ns: AtomicU64,
    pub split_inner_ns: AtomicU64,
    pub split_exec_ns: AtomicU64,
    pub split_longer_ns: AtomicU64,
    pub split_worst_ppm: AtomicU64,
    pub split_exec_inline_ns: AtomicU64,
    pub split_launch_ns: AtomicU64,
    pub split_wait_ns: AtomicU64,
    /// Executor's share of split nodes' rows: sum (× 1e6) over split nodes, and the last one (× 1e6).
    pub split_share_ppm_sum: AtomicU64,
    pub split_share_ppm_last: AtomicU64,
    /// Host ops by reason (small set of static strings).
    pub host_reasons: Mutex<Vec<(&'static str, u64)>>,
    /// Offloaded ops per program variant (mode name): (mode, ops, flops).
    pub variants: Mutex<Vec<(Mode, u64, u64)>>,
}

impl Stats {
    pub fn ane(&self, t: Duration, flops: u64) {
        self.ane_ops.fetch_add(1, Ordering::Relaxed);
        self.ane_ns
            .fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
        self.ane_flops.fetch_add(flops, Ordering::Relaxed);
    }

    /// One offloaded node's copies through the ggml buffer API (nothing when it read in place).
    pub fn transfers(&self, calls: u64, bytes: u64) {
        if calls == 0 {
            return;
        }
        self.xfer_nodes.fetch_add(1, Ordering::Relaxed);
        self.xfer_calls.fetch_add(calls, Ordering::Relaxed);
        self.xfer_max_per_node.fetch_max(calls, Ordering::Relaxed);
        self.xfer_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one offloaded op of `flops` under the variant (mode) that ran it.
    pub fn variant(&self, mode: Mode, flops: u64) {
        let mut v = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(m, _, _)| *m == mode) {
            Some((_, n, f)) => {
                *n += 1;
                *f += flops;
            }
            None => v.push((mode, 1, flops)),
        }
    }

    /// Share of offloaded FLOPs that ran through int8 × int8 programs (0 when nothing ran).
    pub fn int8_share(&self) -> f64 {
        let v = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        let all: u64 = v.iter().map(|x| x.2).sum();
        let int8: u64 = v.iter().filter(|x| x.0.int8()).map(|x| x.2).sum();
        if all == 0 {
            0.0
        } else {
            int8 as f64 / all as f64
        }
    }

    pub fn host(&self, reason: &'static str, t: Duration) {
        self.host_ops.fetch_add(1, Ordering::Relaxed);
        self.host_ns
            .fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
        let mut r = self.host_reasons.lock().unwrap_or_else(|e| e.into_inner());
        match r.iter_mut().find(|(k, _)| *k == reason) {
            Some((_, n)) => *n += 1,
            None => r.push((reason, 1)),
        }
    }

    /// One hybrid graph walk; `unsplit`: handed to the inner device whole.
    pub fn hybrid_walk(&self, t: Duration, unsplit: bool) {
        self.hybrid_graphs.fetch_add(1, Ordering::Relaxed);
        self.hybrid_unsplit
            .fetch_add(unsplit as u64, Ordering::Relaxed);
        self.hybrid_walk_ns
            .fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The executor's share of one split node's rows.
    pub fn split_share(&self, share: f64) {
        let ppm = (share * 1e6) as u64;
        self.split_share_ppm_sum.fetch_add(ppm, Ordering::Relaxed);
        self.split_share_ppm_last.store(ppm, Ordering::Relaxed);
    }

    /// One profiled split node: its overlapped wall time, each part's time alone (re-run), and how the
    /// wall time divided as it ran: queueing the inner part, the executor's part, waiting at the join.
    /// "Longer part" is the longer of the inner part alone and the executor's part as it ran.
    pub fn split_profile(
        &self,
        wall: Duration,
        inner: Duration,
        exec: Duration,
        exec_inline: Duration,
        launch: Duration,
        wait: Duration,
    ) {
        let longer = inner.max(exec_inline).as_nanos().max(1) as u64;
        self.split_exec_inline_ns
            .fetch_add(exec_inline.as_nanos() as u64, Ordering::Relaxed);
        self.split_launch_ns
            .fetch_add(launch.as_nanos() as u64, Ordering::Relaxed);
        self.split_wait_ns
            .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        let wall_ns = wall.as_nanos() as u64;
        self.split_prof_nodes.fetch_add(1, Ordering::Relaxed);
        self.split_wall_ns.fetch_add(wall_ns, Ordering::Relaxed);
        self.split_inner_ns
            .fetch_add(inner.as_nanos() as u64, Ordering::Relaxed);
        self.split_exec_ns
            .fetch_add(exec.as_nanos() as u64, Ordering::Relaxed);
        self.split_longer_ns.fetch_add(longer, Ordering::Relaxed);
        self.split_worst_ppm.fetch_max(
            wall_ns.saturating_mul(1_000_000) / longer,
            Ordering::Relaxed,
        );
    }

    pub fn reset(&self) {
        for a in [
            &self.ane_ops,
            &self.ane_ns,
            &self.ane_flops,
            &self.host_ops,
            &self.host_ns,
            &self.faults,
            &self.xfer_nodes,
            &self.xfer_calls,
            &self.xfer_max_per_node,
            &self.xfer_bytes,
            &self.hybrid_graphs,
            &self.hybrid_unsplit,
            &self.hybrid_walk_ns,
            &self.split_prof_nodes,
            &self.split_wall_ns,
            &self.split_inner_ns,
            &self.split_exec_ns,
            &self.split_longer_ns,
            &self.split_worst_ppm,
            &self.split_exec_inline_ns,
            &self.split_launch_ns,
            &self.split_wait_ns,
            &self.split_share_ppm_sum,
            &self.split_share_ppm_last,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.host_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.variants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn variants_json(&self) -> String {
        let v = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        let items: Vec<String> = v
            .iter()
            .map(|(m, n, f)| {
                format!(
                    "\"{}\":{{\"ops\":{n},\"gflop\":{:.3},\"int8\":{}}}",
                    m.name(),
                    *f as f64 / 1e9,
                    m.int8()
                )
            })
            .collect();
        items.join(",")
    }

    /// JSON snapshot (no serde in the cdylib: the format is small and fixed).
    /// `surfaces`: what the executor keeps in its own buffers between calls
    /// ([`ggml_coreml_executor::Executor::surface_bytes`]), as `memory.executor_surfaces_mib` (with its
    /// weight and I/O shares), and the weight-side inputs it keeps (`executor_weight_inputs`) or let go
    /// when their prepared form was dropped (`executor_weight_inputs_forgotten`).
    pub fn to_json(
        &self,
        policy: &str,
        executor: &str,
        surfaces: ggml_coreml_executor::SurfaceBytes,
    ) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let reasons = self.host_reasons.lock().unwrap_or_else(|e| e.into_inner());
        let reasons: Vec<String> = reasons
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!(
            "{{\"policy\":\"{policy}\",\"executor\":\"{executor}\",\"ane_ops\":{},\"ane_ms\":{:.3},\"ane_gflop\":{:.3},\
             \"host_ops\":{},\"host_ms\":{:.3},\"host_reasons\":{{{}}},\"faults\":{},\"weights_prepared\":{},\
             \"weight_mib_held\":{:.1},\"prepare_ms\":{:.3},\"memory\":{{\"raw_owned_mib\":{:.1},\"raw_borrowed_mib\":{:.1},\"raw_released_mib\":{:.1},\"prepared_mib\":{:.1},\"prepared_per_call\":{},\"sliced_calls\":{},\"slice_peak_mib\":{:.2},\"prefetched\":{},\"prefetch_wasted\":{},\"executor_surfaces_mib\":{:.1},\"executor_weight_surfaces_mib\":{:.1},\"executor_io_surfaces_mib\":{:.1},\"executor_weight_inputs\":{},\"executor_weight_inputs_forgotten\":{},\"executor_weight_fills\":{},\"executor_surface_evictions\":{},\"programs_in_memory\":{}}},\"split_nodes\":{},\"variants\":{{{}}},\"int8_flop_share\":{:.4},\"transfers\":{{\"nodes\":{},\"calls\":{},\"max_per_node\":{},\"mib\":{:.3}}},\
             \"router\":{{\"hybrid_graphs\":{},\"hybrid_unsplit\":{},\"walk_us_per_graph\":{:.3}}},\
             \"split_profile\":{{\"nodes\":{},\"wall_ms\":{:.3},\"inner_alone_ms\":{:.3},\"executor_alone_ms\":{:.3},\
             \"executor_inline_ms\":{:.3},\"launch_ms\":{:.3},\"wait_ms\":{:.3},\"longer_part_ms\":{:.3},\"wall_over_longer\":{:.4},\"worst_node\":{:.4}}},\
             \"split_share\":{{\"mean\":{:.4},\"last\":{:.4}}}}}",
            g(&self.ane_ops),
            g(&self.ane_ns) as f64 / 1e6,
            g(&self.ane_flops) as f64 / 1e9,
            g(&self.host_ops),
            g(&self.host_ns) as f64 / 1e6,
            reasons.join(","),
            g(&self.faults),
            g(&self.weights_prepared),
            g(&self.weight_bytes_held) as f64 / (1024.0 * 1024.0),
            g(&self.prepare_ns) as f64 / 1e6,
            g(&self.raw_bytes_owned) as f64 / (1024.0 * 1024.0),
            g(&self.raw_bytes_borrowed) as f64 / (1024.0 * 1024.0),
            g(&self.raw_bytes_released) as f64 / (1024.0 * 1024.0),
            g(&self.weight_bytes_held) as f64 / (1024.0 * 1024.0),
            g(&self.prepared_per_call),
            g(&self.sliced_calls),
            g(&self.slice_bytes_peak) as f64 / (1024.0 * 1024.0),
            g(&self.prefetched),
            g(&self.prefetch_wasted),
            surfaces.total() as f64 / (1024.0 * 1024.0),
            surfaces.weights as f64 / (1024.0 * 1024.0),
            surfaces.io as f64 / (1024.0 * 1024.0),
            surfaces.weight_inputs,
            surfaces.forgotten,
            surfaces.fills,
            surfaces.evictions,
            surfaces.programs,
            g(&self.split_nodes),
            self.variants_json(),
            self.int8_share(),
            g(&self.xfer_nodes),
            g(&self.xfer_calls),
            g(&self.xfer_max_per_node),
            g(&self.xfer_bytes) as f64 / (1024.0 * 1024.0),
            g(&self.hybrid_graphs),
            g(&self.hybrid_unsplit),
            g(&self.hybrid_walk_ns) as f64 / 1e3 / g(&self.hybrid_graphs).max(1) as f64,
            g(&self.split_prof_nodes),
            g(&self.split_wall_ns) as f64 / 1e6,
            g(&self.split_inner_ns) as f64 / 1e6,
            g(&self.split_exec_ns) as f64 / 1e6,
            g(&self.split_exec_inline_ns) as f64 / 1e6,
            g(&self.split_launch_ns) as f64 / 1e6,
            g(&self.split_wait_ns) as f64 / 1e6,
            g(&self.split_longer_ns) as f64 / 1e6,
            g(&self.split_wall_ns) as f64 / g(&self.split_longer_ns).max(1) as f64,
            g(&self.split_worst_ppm) as f64 / 1e6,
            g(&self.split_share_ppm_sum) as f64 / 1e6 / g(&self.split_nodes).max(1) as f64,
            g(&self.split_share_ppm_last) as f64 / 1e6,
        )
    }

    /// One human line for the log; `surfaces` as in [`Stats::to_json`].
    pub fn summary(&self, surfaces: ggml_coreml_executor::SurfaceBytes) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let reasons = self.host_reasons.lock().unwrap_or_else(|e| e.into_inner());
        let reasons: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(
            "MUL_MAT offloaded {} ({:.1} ms in executor, {:.2} GFLOP), on host {} ({}), executor faults {}, \
             weights prepared {} ({:.1} MiB held, {:.1} ms), variants {} (int8 × int8 {:.1} % of offloaded FLOPs), \
             copies to/from the inner device {} in {} nodes (at most {} per node); memory: {:.1} MiB of weights \
             copied into our buffers, {:.1} MiB borrowed from the model mapping ({:.1} MiB of its pages released), \
             {:.1} MiB prepared, {} weights prepared per call ({} in row slices, {} prepared ahead, {} of them unused), \
             executor {:.1} MiB kept ({} weight inputs, {} let go with their weights), {} programs in memory",
            g(&self.ane_ops),
            g(&self.ane_ns) as f64 / 1e6,
            g(&self.ane_flops) as f64 / 1e9,
            g(&self.host_ops),
            if reasons.is_empty() {
                "none".to_string()
            } else {
                reasons.join(", ")
            },
            g(&self.faults),
            g(&self.weights_prepared),
            g(&self.weight_bytes_held) as f64 / (1024.0 * 1024.0),
            g(&self.prepare_ns) as f64 / 1e6,
            {
                let v = self.variants.lock().unwrap_or_else(|e| e.into_inner());
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.iter()
                        .map(|(m, n, f)| {
                            format!(
                                "{} {n} ops {:.2} GFLOP{}",
                                m.name(),
                                *f as f64 / 1e9,
                                if m.int8() { " int8" } else { "" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            },
            100.0 * self.int8_share(),
            g(&self.xfer_calls),
            g(&self.xfer_nodes),
            g(&self.xfer_max_per_node),
            g(&self.raw_bytes_owned) as f64 / (1024.0 * 1024.0),
            g(&self.raw_bytes_borrowed) as f64 / (1024.0 * 1024.0),
            g(&self.raw_bytes_released) as f64 / (1024.0 * 1024.0),
            g(&self.weight_bytes_held) as f64 / (1024.0 * 1024.0),
            g(&self.prepared_per_call),
            g(&self.sliced_calls),
            g(&self.prefetched),
            g(&self.prefetch_wasted),
            surfaces.total() as f64 / (1024.0 * 1024.0),
            surfaces.weight_inputs,
            surfaces.forgotten,
            surfaces.programs,
        )
    }
}
