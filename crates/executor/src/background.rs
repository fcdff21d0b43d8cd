//! Never stall the model: programs are prepared (emitted, compiled, planned, loaded, self-checked) on a
//! background worker, never on ggml's compute thread.
//!
//! [`BackgroundExecutor`] wraps any [`Executor`]. Its `run` never compiles: a program that is not ready
//! yet is queued for the worker and the call returns [`ExecError::NotReady`] at once, so the node runs on
//! the host this time (the router treats it as a host route, not a fault). Once the worker has prepared
//! the program, calls go to the inner executor; a refusal is kept and returned like any other.
//!
//! The worker starts with the inner executor's [`Executor::probe`]: until it has passed every call is
//! "not ready"; if it fails the executor is unusable for the process (every call `Unsupported` with the
//! reason, `capabilities().accelerated == false`).
//!
//! [`CircuitBreaker`]: after the first compile that times out (reported by the inner executor, or seen
//! by the watchdog here: a program still being prepared after [`BackgroundExecutor::watchdog`]), no new
//! compile starts in this process — programs that need one stay on the host; cached programs still
//! load. A synchronous [`Executor::prepare`] (`ggml-coreml cache warm`, the device suite) is not held
//! back, and [`CircuitBreaker::reset`] closes it again once the cache is warm.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use half::f16;

use crate::{Capabilities, ExecError, Executor, ProgramDesc, ProgramInputs};

/// Stops new compiles after the first timeout. Process-wide by default ([`CircuitBreaker::global`]).
#[derive(Debug, Default)]
pub struct CircuitBreaker {
    open: Mutex<Option<String>>,
}

impl CircuitBreaker {
    pub const fn new() -> CircuitBreaker {
        CircuitBreaker {
            open: Mutex::new(None),
        }
    }

    /// The one breaker of this process (the CoreML executor trips it on a compile timeout).
    pub fn global() -> &'static CircuitBreaker {
        static GLOBAL: CircuitBreaker = CircuitBreaker::new();
        &GLOBAL
    }

    fn lock(&self) -> MutexGuard<'_, Option<String>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the breaker; true when this call opened it (the first timeout).
    pub fn trip(&self, why: &str) -> bool {
        let mut o = self.lock();
        if o.is_some() {
            return false;
        }
        *o = Some(why.to_owned());
        true
    }

    /// Why compiles are held back, when they are.
    pub fn open_reason(&self) -> Option<String> {
        self.lock().clone()
    }

    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Closes the breaker (the cache has been warmed).
    pub fn reset(&self) {
        *self.lock() = None;
    }
}

/// Where one program stands.
#[derive(Clone, Debug)]
enum Slot {
    /// Queued or being prepared since.
    Pending(Instant),
    /// Needs a compile while the breaker is open: on the host until it closes.
    Held,
    Done(Result<(), ExecError>),
}

/// The startup probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeState {
    Running,
    Passed,
    Failed(String),
}

/// Counts of programs by state, for logs and stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackgroundStats {
    pub pending: usize,
    pub held: usize,
    pub ready: usize,
    pub refused: usize,
}

type Log = Arc<dyn Fn(&str) + Send + Sync>;

struct Shared {
    inner: Arc<dyn Executor>,
    slots: Mutex<HashMap<ProgramDesc, Slot>>,
    queue: Mutex<VecDeque<ProgramDesc>>,
    wake: Condvar,
    probe: Mutex<ProbeState>,
    probe_done: Condvar,
    breaker: &'static CircuitBreaker,
    watchdog: Duration,
    stop: AtomicBool,
    log: Log,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prepares programs off the compute thread; see the module docs.
pub struct BackgroundExecutor {
    shared: Arc<Shared>,
}

impl BackgroundExecutor {
    /// Wraps `inner`, with the process-wide breaker. `watchdog`: how long a program may be in
    /// preparation before the breaker opens (the inner executor's own compile timeout is normally
    /// shorter). Starts the worker, which runs the probe first.
    pub fn new(inner: Arc<dyn Executor>, watchdog: Duration) -> BackgroundExecutor {
        // The backend's log callback lives above this crate: the two messages this wrapper has (a
        // failed probe, the breaker opening) go to stderr unless GGML_COREML_LOG=off; `health()`
        // carries them to the statistics.
        let quiet = std::env::var("GGML_COREML_LOG").is_ok_and(|v| v.trim() == "off");
        let log: Log = Arc::new(move |m: &str| {
            if !quiet {
                eprintln!("ggml-coreml: {m}");
            }
        });
        Self::with_breaker(inner, watchdog, CircuitBreaker::global(), log)
    }

    /// As [`Self::new`] with an explicit breaker (tests: a leaked one of their own) and log.
    pub fn with_breaker(
        inner: Arc<dyn Executor>,
        watchdog: Duration,
        breaker: &'static CircuitBreaker,
        log: Log,
    ) -> BackgroundExecutor {
        let shared = Arc::new(Shared {
            inner,
            slots: Mutex::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            probe: Mutex::new(ProbeState::Running),
            probe_done: Condvar::new(),
            breaker,
            watchdog,
            stop: AtomicBool::new(false),
            log,
        });
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ggml-coreml-prepare".into())
            .spawn(move || worker(&s));
        if let Err(e) = spawned {
            *lock(&shared.probe) =
                ProbeState::Failed(format!("cannot start the prepare worker: {e}"));
        }
        BackgroundExecutor { shared }
    }

    pub fn inner(&self) -> &Arc<dyn Executor> {
        &self.shared.inner
    }

    pub fn watchdog(&self) -> Duration {
        self.shared.watchdog
    }

    pub fn breaker(&self) -> &'static CircuitBreaker {
        self.shared.breaker
    }

    pub fn probe_state(&self) -> ProbeState {
        lock(&self.shared.probe).clone()
    }

    /// Waits for the probe to finish (at most `timeout`).
    pub fn wait_probe(&self, timeout: Duration) -> ProbeState {
        let g = lock(&self.shared.probe);
        let (g, _) = self
            .shared
            .probe_done
            .wait_timeout_while(g, timeout, |p| *p == ProbeState::Running)
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// Waits until nothing is queued or being prepared (at most `timeout`); true when idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.stats().pending == 0 {
                return true;
            }
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> BackgroundStats {
        let mut s = BackgroundStats::default();
        for slot in lock(&self.shared.slots).values() {
            match slot {
                Slot::Pending(_) => s.pending += 1,
                Slot::Held => s.held += 1,
                Slot::Done(Ok(())) => s.ready += 1,
                Slot::Done(Err(_)) => s.refused += 1,
            }
        }
        s
    }

    /// `Ok` when `desc` may run now; otherwise the error for this call (queues it when new).
    fn ready(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        let sh = &self.shared;
        // While the probe runs, programs are queued all the same (the worker takes them after it).
        let probing = match &*lock(&sh.probe) {
            ProbeState::Passed => false,
            ProbeState::Running => true,
            ProbeState::Failed(why) => {
                return Err(ExecError::Unsupported(
                    desc.key(),
                    format!("executor unusable: startup probe failed: {why}"),
                ));
            }
        };
        if probing {
            let mut slots = lock(&sh.slots);
            if !slots.contains_key(desc) {
                slots.insert(*desc, Slot::Pending(Instant::now()));
                lock(&sh.queue).push_back(*desc);
                sh.wake.notify_one();
            }
            return Err(ExecError::NotReady(
                desc.key(),
                "the startup probe is running".into(),
            ));
        }
        let mut slots = lock(&sh.slots);
        let queue = |slots: &mut HashMap<ProgramDesc, Slot>| {
            slots.insert(*desc, Slot::Pending(Instant::now()));
            lock(&sh.queue).push_back(*desc);
            sh.wake.notify_one();
        };
        match slots.get(desc) {
            Some(Slot::Done(r)) => r.clone(),
            Some(Slot::Pending(since)) => {
                let waited = since.elapsed();
                if waited > sh.watchdog {
                    let why = format!(
                        "preparing {desc} took more than {} s",
                        sh.watchdog.as_secs_f64()
                    );
                    if sh.breaker.trip(&why) {
                        (sh.log)(&format!(
                            "compile circuit breaker open: {why}; no new compiles in this process until the cache is warmed"
                        ));
                    }
                }
                Err(ExecError::NotReady(
                    desc.key(),
                    format!("being prepared for {:.0} ms", waited.as_secs_f64() * 1e3),
                ))
            }
            Some(Slot::Held) => {
                let why = sh.breaker.open_reason();
                if why.is_none() {
                    queue(&mut slots);
                }
                Err(ExecError::NotReady(
                    desc.key(),
                    format!(
                        "compile held back: {}",
                        why.unwrap_or_else(|| "breaker closed, queued".into())
                    ),
                ))
            }
            None => {
                queue(&mut slots);
                Err(ExecError::NotReady(
                    desc.key(),
                    "queued for preparation".into(),
                ))
            }
        }
    }
}

impl Drop for BackgroundExecutor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Taking the queue lock orders the store before the worker's next check.
        drop(lock(&self.shared.queue));
        self.shared.wake.notify_all();
    }
}

/// Runs `f`, turning a panic into an error message.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown payload".into());
        format!("panic in {what}: {msg}")
    })
}

fn worker(sh: &Shared) {
    let probe = match guarded("the startup probe", || sh.inner.probe()) {
        Ok(Ok(())) => ProbeState::Passed,
        Ok(Err(why)) | Err(why) => {
            (sh.log)(&format!(
                "executor {} unusable for this process: startup probe failed: {why}",
                sh.inner.name()
            ));
            ProbeState::Failed(why)
        }
    };
    *lock(&sh.probe) = probe;
    sh.probe_done.notify_all();
    loop {
        let desc = {
            let mut q = lock(&sh.queue);
            loop {
                if sh.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(d) = q.pop_front() {
                    break d;
                }
                q = sh.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        if sh.breaker.is_open() && sh.inner.needs_compile(&desc) {
            lock(&sh.slots).insert(desc, Slot::Held);
            continue;
        }
        let r = guarded("prepare", || sh.inner.prepare(&desc))
            .unwrap_or_else(|why| Err(ExecError::Compile(desc.key(), why)));
        lock(&sh.slots).insert(desc, Slot::Done(r));
    }
}

impl Executor for BackgroundExecutor {
    fn name(&self) -> &'static str {
        self.shared.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self.shared.inner.capabilities();
        if let ProbeState::Failed(why) = self.probe_state() {
            c.accelerated = false;
            c.variants.clear();
            c.description = format!("{}; unusable: startup probe failed: {why}", c.description);
        }
        c
    }

    fn set_threads(&self, n: usize) {
        self.shared.inner.set_threads(n);
    }

    /// Blocking, not held back by the breaker (this is how the cache gets warmed).
    fn prepare(&self, desc: &ProgramDesc) -> Result<(), ExecError> {
        if let ProbeState::Failed(why) = self.probe_state() {
            return Err(ExecError::Unsupported(
                desc.key(),
                format!("executor unusable: startup probe failed: {why}"),
            ));
        }
        if let Some(Slot::Done(r)) = lock(&self.shared.slots).get(desc) {
            return r.clone();
        }
        let r = self.shared.inner.prepare(desc);
        lock(&self.shared.slots).insert(*desc, Slot::Done(r.clone()));
        r
    }

    fn needs_compile(&self, desc: &ProgramDesc) -> bool {
        self.shared.inner.needs_compile(desc)
    }

    fn surface_bytes(&self) -> crate::SurfaceBytes {
        self.shared.inner.surface_bytes()
    }

    fn forget(&self, key: u64) {
        self.shared.inner.forget(key);
    }

    fn probe(&self) -> Result<(), String> {
        match self.probe_state() {
            ProbeState::Failed(why) => Err(why),
            _ => Ok(()),
        }
    }

    fn health(&self) -> Option<String> {
        let mut parts = Vec::new();
        match self.probe_state() {
            ProbeState::Failed(why) => parts.push(format!("unusable: startup probe failed: {why}")),
            ProbeState::Running => parts.push("startup probe running".to_owned()),
            ProbeState::Passed => {}
        }
        if let Some(why) = self.shared.breaker.open_reason() {
            parts.push(format!("compile circuit breaker open: {why}"));
        }
        let s = self.stats();
        if s.pending > 0 || s.held > 0 {
            parts.push(format!(
                "{} programs being prepared, {} held back",
                s.pending, s.held
            ));
        }
        if let Some(h) = self.shared.inner.health() {
            parts.push(h);
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn run(
        &self,
        desc: &ProgramDesc,
        inputs: ProgramInputs<'_>,
        weight: crate::WeightPart,
        out: &mut [f16],
    ) -> Result<(), ExecError> {
        self.ready(desc)?;
        self.shared.inner.run(desc, inputs, weight, out)
    }
}

/// A leaked breaker of its own, for tests and for executors that must not share the process's.
pub fn private_breaker() -> &'static CircuitBreaker {
    Box::leak(Box::new(CircuitBreaker::new()))
}

/// The process-wide background executor choice: `GGML_COREML_COMPILE=sync` prepares on the calling
/// thread (as before), anything else in the background.
pub fn background_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !std::env::var("GGML_COREML_COMPILE").is_ok_and(|v| v.trim().eq_ignore_ascii_case("sync"))
    })
}
