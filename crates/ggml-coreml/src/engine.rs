//! Process-wide state shared by every face and backend instance: the executor, the policy, the
//! statistics and the configuration read from the environment.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ggml_coreml_bridge::WeightType;
use ggml_coreml_executor::Executor;
use ggml_coreml_executor::driver::{Mode, PreparedWeight};
use ggml_coreml_executor::reference::ReferenceExecutor;
use ggml_coreml_policy::Policy;

use crate::log;
use crate::stats::Stats;
use crate::weights::WeightRegistry;

/// When weights are repacked into their program form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repack {
    /// In the buffer's `set_tensor`, as llama.cpp loads the model (first inference is not slowed).
    Load,
    /// At first use, from the bytes ggml gave us.
    Lazy,
}

pub struct Engine {
    pub executor: Arc<dyn Executor>,
    reference: Option<Arc<ReferenceExecutor>>,
    pub policy: Policy,
    pub stats: Stats,
    pub repack: Repack,
    /// `GGML_COREML_VARIANT`: a program variant (or `exact`) for every weight type.
    pub mode_override: Option<Mode>,
}

static ENGINE: OnceLock<Engine> = OnceLock::new();

pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(Engine::from_env)
}

impl Engine {
    fn from_env() -> Engine {
        let reference = Arc::new(ReferenceExecutor::new());
        let executor: Arc<dyn Executor> = reference.clone();
        let caps = executor.capabilities();
        let (policy, warning) = Policy::from_env(caps.accelerated);
        if let Some(w) = warning {
            log::warn(&w);
        }
        let repack = match std::env::var("GGML_COREML_REPACK").ok().as_deref() {
            None | Some("load") => Repack::Load,
            Some("lazy") => Repack::Lazy,
            Some(other) => {
                log::warn(&format!("GGML_COREML_REPACK={other} is not load|lazy; using load"));
                Repack::Load
            }
        };
        let mode_override = match std::env::var("GGML_COREML_VARIANT").ok() {
            None => None,
            Some(v) => match Mode::parse(&v) {
                Some(m) => Some(m),
                None => {
                    log::warn(&format!("GGML_COREML_VARIANT={v} is not i8i8|w8f16|f16|exact; using defaults"));
                    None
                }
            },
        };
        log::info(&format!(
            "executor {} ({}), policy {}, repack at {:?}, variant {}",
            executor.name(),
            caps.description,
            policy.mode().name(),
            repack,
            mode_override.map_or("default per type", |m| m.name())
        ));
        Engine { executor, reference: Some(reference), policy, stats: Stats::default(), repack, mode_override }
    }

    pub fn set_threads(&self, n: usize) {
        if let Some(r) = &self.reference {
            r.set_threads(n.max(1));
        }
    }

    pub fn mode_for(&self, wtype: WeightType) -> Mode {
        Mode::for_type(wtype, self.mode_override)
    }

    /// The prepared form of the 2-D weight whose rows (`bytes`, gathered) start at `addr` with row stride
    /// `stride`, from `registry` or made now.
    #[allow(clippy::too_many_arguments)]
    pub fn prepared(
        &self,
        registry: &WeightRegistry,
        addr: usize,
        stride: usize,
        wtype: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Arc<PreparedWeight>, String> {
        let mode = self.mode_for(wtype);
        if let Some(w) = registry.get(addr, mode, stride) {
            return Ok(w);
        }
        let t0 = Instant::now();
        let w = PreparedWeight::prepare(mode, wtype, bytes, n, k, addr as u64)
            .map_err(|e| format!("repack of {} [{n}x{k}] failed: {e}", wtype.name()))?;
        let w = Arc::new(w);
        let span = stride * n.saturating_sub(1) + bytes.len() / n.max(1);
        let released = registry.insert(addr, span, stride, w.clone());
        self.stats.weights_prepared.fetch_add(1, Ordering::Relaxed);
        self.stats.prepare_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let held = w.bytes_held() as u64;
        self.stats.weight_bytes_held.fetch_add(held, Ordering::Relaxed);
        self.stats.weight_bytes_held.fetch_sub((released as u64).min(held), Ordering::Relaxed);
        Ok(w)
    }
}
