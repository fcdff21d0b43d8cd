//! The `serve` test stage and `cargo xtask serve-bench`: llama-server with continuous batching (`-np 4`) on
//! Gemma-3-270M Q8_0, driven by 8 concurrent HTTP clients with streamed and non-streamed greedy
//! `/completion` requests whose prompts span 16..600 tokens, so prefill ubatches of every size interleave
//! with decode steps. Stock (no `GGML_BACKEND_PATH`) against ours through the ACCEL face (`-ngl 0`), with the
//! library's default policy and with `always`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::face;
use crate::log;
use crate::models::{Model, model_path};
use crate::paths;
use crate::proc::{DeadlineGuard, Spawned, bounded, free_port, request, wait_port};

/// Tokens generated per request (greedy, `ignore_eos`, so every request generates exactly this many).
pub const N_PREDICT: usize = 4;
/// Concurrent clients.
pub const CLIENTS: usize = 8;
/// Server slots (continuous batching).
pub const SLOTS: usize = 4;
/// Context per slot: the longest prompt plus `N_PREDICT`, rounded up.
const CTX_PER_SLOT: usize = 640;
/// Prompt lengths (tokens) of the stage's requests: short and long mixed, so a long prefill (two ubatches
/// at 600) shares batches with decode steps of the short ones. Mostly short: prefill is most of the
/// stage's time (1144 prompt tokens per pass, 8 passes and a bit).
pub const STAGE_LENS: &[usize] = &[16, 600, 48, 200, 96, 32, 24, 128];
/// Timeout of one HTTP request (the server may queue it behind others).
const REQ_TIMEOUT: Duration = Duration::from_secs(180);
/// Hard limit of the `serve` stage: every wait in it (server start, each HTTP read) ends by then, so a
/// hung server fails the stage, whose guards then kill every process, instead of hanging it. The stage
/// takes about 2.5 minutes on 2 shared cores; the limit leaves room for a loaded machine.
pub const STAGE_LIMIT: Duration = Duration::from_secs(420);
/// One `/completion` request: a prompt given as token ids (exact lengths, no tokenizer involved).
#[derive(Clone, Debug)]
pub struct Req {
    pub id: usize,
    pub prompt: Vec<u32>,
    pub stream: bool,
}

/// Deterministic prompts: token ids from a fixed LCG in an ordinary part of Gemma's vocabulary;
/// even requests are streamed.
pub fn requests(lens: &[usize]) -> Vec<Req> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    lens.iter()
        .enumerate()
        .map(|(id, &n)| Req {
            id,
            prompt: (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    1000 + ((x >> 33) % 20000) as u32
                })
                .collect(),
            stream: id % 2 == 0,
        })
        .collect()
}

/// What a request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub content: String,
    pub tokens: Vec<i64>,
}

fn body(req: &Req) -> String {
    json!({
        "prompt": req.prompt,
        "n_predict": N_PREDICT,
        "temperature": 0.0,
        "seed": 42,
        "ignore_eos": true,
        "cache_prompt": false,
        "return_tokens": true,
        "stream": req.stream,
    })
    .to_string()
}

/// Sends one request and returns its HTTP status and output (the body as text for a non-200).
pub fn completion(port: u16, req: &Req) -> Result<(u16, Output)> {
    let mut r = request(
        port,
        "POST",
        "/completion",
        Some(&body(req)),
        bounded(REQ_TIMEOUT)?,
    )?;
    let status = r.status;
    if status != 200 {
        let b = r.body().unwrap_or_default();
        return Ok((
            status,
            Output {
                content: String::from_utf8_lossy(&b).into_owned(),
                tokens: Vec::new(),
            },
        ));
    }
    let mut out = Output {
        content: String::new(),
        tokens: Vec::new(),
    };
    let take = |v: &Value, out: &mut Output| {
        if let Some(c) = v.get("content").and_then(Value::as_str) {
            out.content.push_str(c);
        }
        if let Some(t) = v.get("tokens").and_then(Value::as_array) {
            out.tokens.extend(t.iter().filter_map(Value::as_i64));
        }
    };
    if req.stream {
        let mut stopped = false;
        r.sse(|data| {
            let v: Value =
                serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
            if v.get("stop").and_then(Value::as_bool) == Some(true) {
                // The final event repeats nothing when streaming; take it only if it carries text anyway.
                if out.tokens.is_empty() {
                    take(&v, &mut out);
                }
                stopped = true;
                return Ok(false);
            }
            take(&v, &mut out);
            Ok(true)
        })?;
        if !stopped {
            bail!("request {}: the stream ended without a final event", req.id);
        }
    } else {
        let b = r.body()?;
        let v: Value = serde_json::from_slice(&b).context("bad /completion JSON")?;
        take(&v, &mut out);
    }
    Ok((status, out))
}

/// Starts a request, reads its first streamed event and hangs up (a client going away mid-stream).
fn disconnect_mid_stream(port: u16, req: &Req) -> Result<()> {
    let mut r = request(
        port,
        "POST",
        "/completion",
        Some(&body(req)),
        bounded(REQ_TIMEOUT)?,
    )?;
    if r.status != 200 {
        bail!("the disconnecting client got HTTP {}", r.status);
    }
    let mut events = 0;
    r.sse(|_| {
        events += 1;
        Ok(false)
    })?;
    drop(r);
    if events == 0 {
        bail!("the disconnecting client saw no event before hanging up");
    }
    Ok(())
}

/// One result of a round.
pub struct Done {
    pub id: usize,
    pub status: u16,
    pub out: Output,
    pub ms: f64,
}

/// A round: every request of `reqs` through `clients` concurrent clients.
pub struct Round {
    pub done: Vec<Done>,
    pub wall_s: f64,
}

impl Round {
    pub fn req_per_s(&self) -> f64 {
        self.done.len() as f64 / self.wall_s
    }
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self.done.iter().map(|d| d.ms).collect();
        percentile(&mut v, q)
    }
}

/// Nearest-rank percentile.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Runs `reqs` through `clients` threads (each takes the next request when its last one is done).
/// `during` runs on its own thread alongside (faults); its error fails the round.
pub fn round(
    port: u16,
    reqs: &[Req],
    clients: usize,
    during: Option<&(dyn Fn() -> Result<()> + Sync)>,
) -> Result<Round> {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        if let Some(f) = during {
            let errors = &errors;
            s.spawn(move || {
                if let Err(e) = f() {
                    errors.lock().unwrap().push(format!("{e:#}"));
                }
            });
        }
        for _ in 0..clients {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(r) = reqs.get(i) else { break };
                    let t = Instant::now();
                    match completion(port, r) {
                        Ok((status, out)) => done.lock().unwrap().push(Done {
                            id: r.id,
                            status,
                            out,
                            ms: t.elapsed().as_secs_f64() * 1e3,
                        }),
                        Err(e) => errors
                            .lock()
                            .unwrap()
                            .push(format!("request {}: {e:#}", r.id)),
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let mut done = done.into_inner().unwrap();
    done.sort_by_key(|d| d.id);
    Ok(Round {
        done,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// The outputs of each request served alone (one at a time), by id.
pub fn alone(
    port: u16,
    reqs: &[Req],
    mut after_each: impl FnMut(&Req) -> Result<()>,
) -> Result<BTreeMap<usize, Output>> {
    let mut m = BTreeMap::new();
    for r in reqs {
        let (status, out) = completion(port, r)?;
        if status != 200 {
            bail!(
                "request {} served alone: HTTP {status}: {}",
                r.id,
                out.content
            );
        }
        check_len(r, &out)?;
        after_each(r)?;
        m.insert(r.id, out);
    }
    Ok(m)
}

fn check_len(r: &Req, out: &Output) -> Result<()> {
    if out.tokens.len() != N_PREDICT {
        bail!(
            "request {}: {} tokens generated, expected {N_PREDICT} ({:?})",
            r.id,
            out.tokens.len(),
            out.content
        );
    }
    Ok(())
}

/// Requests of a round whose output differs from `reference` (ids), after checking every one is a 200 with
/// `N_PREDICT` tokens.
pub fn mismatches(
    reqs: &[Req],
    round: &Round,
    reference: &BTreeMap<usize, Output>,
) -> Result<Vec<usize>> {
    if round.done.len() != reqs.len() {
        bail!("{} of {} requests completed", round.done.len(), reqs.len());
    }
    let mut bad = Vec::new();
    for d in &round.done {
        if d.status != 200 {
            bail!("request {}: HTTP {}: {}", d.id, d.status, d.out.content);
        }
        check_len(&reqs[d.id], &d.out)?;
        if reference.get(&d.id) != Some(&d.out) {
            bad.push(d.id);
        }
    }
    Ok(bad)
}

/// How a server is configured.
#[derive(Clone)]
pub struct ServerCfg {
    pub label: &'static str,
    /// None: stock (the library is not loaded).
    pub lib: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl ServerCfg {
    pub fn stock() -> ServerCfg {
        ServerCfg {
            label: "stock",
            lib: None,
            env: Vec::new(),
        }
    }
    pub fn ours(label: &'static str, lib: &Path, policy: Option<&str>) -> ServerCfg {
        let mut env = Vec::new();
        if let Some(p) = policy {
            env.push(("GGML_COREML_POLICY".into(), p.into()));
        }
        ServerCfg {
            label,
            lib: Some(lib.to_path_buf()),
            env,
        }
    }
    pub fn with(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> ServerCfg {
        self.env
            .push((k.into(), v.as_ref().to_string_lossy().into_owned()));
        self
    }
}

/// A running llama-server.
pub struct Server {
    pub proc: Spawned,
    pub port: u16,
}

/// Starts llama-server for `cfg` and waits until `/health` answers 200 (model loaded).
pub fn start_server(bin: &Path, model: &Path, cfg: &ServerCfg, dir: &Path) -> Result<Server> {
    let port = free_port()?;
    let mut c = Command::new(bin.join("llama-server"));
    c.arg("-m").arg(model).args([
        "-ngl",
        "0",
        "-np",
        &SLOTS.to_string(),
        "-c",
        &(SLOTS * CTX_PER_SLOT).to_string(),
        "-t",
        "2",
        "-tb",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--no-webui",
        "--cache-ram",
        "0",
    ]);
    face::clean_env(&mut c);
    // ggml's OpenMP workers wait for each other at every node; spinning (libgomp's default) on 2 cores
    // shared with other jobs turns each wait into a lost time slice (decode 3-30x slower, stock
    // included). Blocking waits change no result.
    c.env("OMP_WAIT_POLICY", "passive");
    if let Some(lib) = &cfg.lib {
        c.env("GGML_BACKEND_PATH", lib);
    }
    for (k, v) in &cfg.env {
        c.env(k, v);
    }
    let mut proc = Spawned::start(
        &c,
        &format!("llama-server ({})", cfg.label),
        &dir.join(format!("server-{}-{port}.log", cfg.label)),
    )?;
    wait_port(&mut proc, port, bounded(Duration::from_secs(60))?)?;
    let t = Instant::now();
    loop {
        if !proc.alive() {
            bail!("{} exited while loading:\n{}", proc.name, proc.log_tail(30));
        }
        if let Ok(r) = request(
            port,
            "GET",
            "/health",
            None,
            bounded(Duration::from_secs(5))?,
        ) && r.status == 200
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!(
                "{} not ready after 180 s:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    log!(
        "{} ready on port {port} in {:.1} s",
        proc.name,
        t.elapsed().as_secs_f64()
    );
    Ok(Server { proc, port })
}

impl Server {
    /// SIGTERM; the server must exit with status 0 within 30 s.
    pub fn stop_cleanly(&mut self) -> Result<()> {
        let st = self.proc.terminate(bounded(Duration::from_secs(30))?)?;
        if !st.success() {
            bail!(
                "{} exited with {st} on SIGTERM:\n{}",
                self.proc.name,
                self.proc.log_tail(20)
            );
        }
        Ok(())
    }
}

/// `ane_ops` of a stats file, polling until it is at least `min` (the library rewrites it at most every
/// 500 ms) or `wait` passes.
fn ane_ops(stats: &Path, min: u64, wait: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let n = face::read_stats(stats).map(|(n, _)| n).unwrap_or(0);
        if n >= min || t.elapsed() >= wait {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn faults(stats: &Path) -> u64 {
    fs::read(stats)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("faults").and_then(Value::as_u64))
        .unwrap_or(0)
}

/// A scratch directory for logs, stats and the program cache (kept when a stage fails).
fn scratch_dir(what: &str) -> Result<PathBuf> {
    let d = paths::workspace_root().join("target").join(format!(
        "{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    fs::create_dir_all(&d)?;
    Ok(d)
}

/// Wall-clock time per phase of a stage, logged as each phase ends.
pub struct Phases {
    what: &'static str,
    load_start: String,
    t0: Instant,
    last: Instant,
    done: Vec<(String, f64)>,
}

impl Phases {
    pub fn new(what: &'static str) -> Phases {
        let now = Instant::now();
        Phases {
            what,
            load_start: loadavg(),
            t0: now,
            last: now,
            done: Vec::new(),
        }
    }
    /// Ends the phase that ran since the last mark.
    pub fn mark(&mut self, what: impl Into<String>) {
        let now = Instant::now();
        let s = (now - self.last).as_secs_f64();
        self.last = now;
        let what = what.into();
        log!(
            "{}: phase {what}: {s:.1} s (stage so far {:.0} s)",
            self.what,
            (now - self.t0).as_secs_f64()
        );
        self.done.push((what, s));
    }
    /// Every phase's time, the total and the load average at the start and now.
    pub fn summary(&self) -> String {
        format!(
            "phases: {}; {:.0} s in all, load average {} → {}",
            self.done
                .iter()
                .map(|(w, s)| format!("{w} {s:.0} s"))
                .collect::<Vec<_>>()
                .join(", "),
            self.t0.elapsed().as_secs_f64(),
            self.load_start,
            loadavg()
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ids(v: &[usize]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `serve` stage.
pub fn stage(env: &crate::test::Env) -> Result<String> {
    let model = model_path(&env.models, Model::Gemma3_270m, "Q8_0");
    if !model.is_file() {
        bail!("model {} missing (cargo xtask models)", model.display());
    }
    let dir = scratch_dir("serve")?;
    let _deadline = DeadlineGuard::set("serve", STAGE_LIMIT);
    let res = stage_in(env, &model, &dir).map_err(crate::proc::note_deadline);
    match &res {
        Ok(_) => {
            let _ = fs::remove_dir_all(&dir);
        }
        Err(_) => log!("serve: logs kept in {}", dir.display()),
    }
    res
}

fn stage_in(env: &crate::test::Env, model: &Path, dir: &Path) -> Result<String> {
    let reqs = requests(STAGE_LENS);
    let mut notes = Vec::new();
    let mut ph = Phases::new("serve");

    // Stock first: is llama.cpp itself batch-invariant here? Its answer decides what "identical to the
    // same request served alone" can demand of ours.
    let mut srv = start_server(&env.bin, model, &ServerCfg::stock(), dir)?;
    ph.mark("stock start");
    let stock_alone = alone(srv.port, &reqs, |_| Ok(()))?;
    ph.mark("stock alone");
    let r = round(srv.port, &reqs, CLIENTS, None)?;
    ph.mark("stock round");
    let stock_bad = mismatches(&reqs, &r, &stock_alone)?;
    srv.stop_cleanly()?;
    ph.mark("stock stop");
    notes.push(format!(
        "stock: {:.2} req/s, p50 {:.0} ms, p95 {:.0} ms, {} of {} differ from alone{}",
        r.req_per_s(),
        r.latency_ms(0.5),
        r.latency_ms(0.95),
        stock_bad.len(),
        reqs.len(),
        if stock_bad.is_empty() {
            String::new()
        } else {
            format!(" (ids {})", ids(&stock_bad))
        }
    ));
    log!("serve: {}", notes.last().unwrap());

    // Default policy: nothing is offloaded on Linux, so outputs must equal stock's too.
    let cache = dir.join("program-cache");
    let stats = dir.join("stats-default.json");
    let cfg = ServerCfg::ours("default", &env.lib, None)
        .with("GGML_COREML_CACHE_DIR", &cache)
        .with("GGML_COREML_STATS_FILE", &stats);
    let note = run_ours(
        env,
        model,
        dir,
        &reqs,
        &cfg,
        &stock_alone,
        &stock_bad,
        None,
        &mut ph,
    )?;
    log!("serve: {note}");
    notes.push(note);

    // Policy always: every weight MUL_MAT through the executor, faults injected in the second round.
    let stats = dir.join("stats-always.json");
    let cfg = ServerCfg::ours("always", &env.lib, Some("always"))
        .with("GGML_COREML_CACHE_DIR", &cache)
        .with("GGML_COREML_STATS_FILE", &stats);
    let note = run_ours(
        env,
        model,
        dir,
        &reqs,
        &cfg,
        &stock_alone,
        &stock_bad,
        Some(&stats),
        &mut ph,
    )?;
    notes.push(note);
    notes.push(ph.summary());
    Ok(notes.join("; "))
}

/// One configuration of ours: requests alone, a concurrent round, a second concurrent round (with faults
/// under `always`), RSS, SIGTERM.
#[allow(clippy::too_many_arguments)]
fn run_ours(
    env: &crate::test::Env,
    model: &Path,
    dir: &Path,
    reqs: &[Req],
    cfg: &ServerCfg,
    stock_alone: &BTreeMap<usize, Output>,
    stock_bad: &[usize],
    always_stats: Option<&Path>,
    ph: &mut Phases,
) -> Result<String> {
    let label = cfg.label;
    let mut srv = start_server(&env.bin, model, cfg, dir)?;
    ph.mark(format!("{label} start"));
    let port = srv.port;
    // Alone; under `always` each request must move the offload counter.
    let mut per_req = Vec::new();
    let reference = alone(port, reqs, |r| {
        if let Some(stats) = always_stats {
            let before = per_req.last().copied().unwrap_or(0);
            let n = ane_ops(stats, before + 1, Duration::from_secs(3));
            if n <= before {
                bail!("request {}: no MUL_MAT offloaded (stats ane_ops {n})", r.id);
            }
            per_req.push(n);
        }
        Ok(())
    })?;
    let vs_stock: Vec<usize> = reqs
        .iter()
        .filter(|r| stock_alone.get(&r.id) != reference.get(&r.id))
        .map(|r| r.id)
        .collect();
    if always_stats.is_none() && !vs_stock.is_empty() {
        bail!(
            "{label}: served alone, requests {} differ from stock (nothing is offloaded under the default policy)",
            ids(&vs_stock)
        );
    }
    ph.mark(format!("{label} alone"));
    let r1 = round(port, reqs, CLIENTS, None)?;
    ph.mark(format!("{label} round 1"));
    let bad1 = mismatches(reqs, &r1, &reference)?;
    check_invariance(label, 1, &bad1, stock_bad)?;
    let rss1 = srv.proc.rss_kib().context("cannot read the server's RSS")?;
    let ane1 = always_stats.map(|s| ane_ops(s, 0, Duration::from_millis(700)));

    // Round 2. Under `always`: a client hangs up mid-stream, the program cache is deleted mid-round, and a
    // second server on the same cache (with every 3rd executor call failing) serves every third request
    // while the first one is under load.
    let mut fault_note = String::new();
    let r2 = if always_stats.is_some() {
        // A 200-token prompt: the hang-up comes after its prefill, while other slots decode.
        let hangup = Req {
            id: usize::MAX,
            prompt: reqs[3].prompt.clone(),
            stream: true,
        };
        let cache = PathBuf::from(
            cfg.env
                .iter()
                .find(|(k, _)| k == "GGML_COREML_CACHE_DIR")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        );
        let second_stats = dir.join("stats-second.json");
        let second_cfg = cfg
            .clone()
            .with("GGML_COREML_FAULT_INJECT", "3")
            .with("GGML_COREML_STATS_FILE", &second_stats);
        let second_cfg = ServerCfg {
            label: "always-second",
            ..second_cfg
        };
        let second: Mutex<Option<BTreeMap<usize, Output>>> = Mutex::new(None);
        let faults_during = || -> Result<()> {
            let t = Instant::now();
            disconnect_mid_stream(port, &hangup)?;
            log!(
                "serve: client hung up after {:.1} s",
                t.elapsed().as_secs_f64()
            );
            if cache.as_os_str().is_empty() {
                bail!("no program cache configured");
            }
            // The reference executor keeps no programs on disk (only CoreML compiles), so the folder
            // may not exist yet: make it, then delete it under the running server either way.
            fs::create_dir_all(&cache)?;
            fs::remove_dir_all(&cache)
                .with_context(|| format!("cannot delete {}", cache.display()))?;
            // Started, used and stopped on this thread: with `setpriv --pdeathsig` a child dies with the
            // thread that spawned it.
            let mut s = start_server(&env.bin, model, &second_cfg, dir)?;
            let sub: Vec<Req> = reqs.iter().step_by(3).cloned().collect();
            let outs = alone(s.port, &sub, |_| Ok(()))?;
            // Let the statistics file catch up before the server goes.
            ane_ops(&second_stats, 1, Duration::from_secs(2));
            std::thread::sleep(Duration::from_millis(600));
            s.stop_cleanly()?;
            log!(
                "serve: second server done after {:.1} s",
                t.elapsed().as_secs_f64()
            );
            *second.lock().unwrap() = Some(outs);
            Ok(())
        };
        let r2 = round(port, reqs, CLIENTS, Some(&faults_during))?;
        let outs2 = second
            .into_inner()
            .unwrap()
            .context("the second server did not run")?;
        let f = faults(&second_stats);
        let n2 = ane_ops(&second_stats, 1, Duration::from_secs(2));
        let differ: Vec<usize> = outs2
            .iter()
            .filter(|(id, o)| reference.get(id) != Some(o))
            .map(|(id, _)| *id)
            .collect();
        if f == 0 || n2 == 0 {
            bail!("second server: {f} injected faults, {n2} MUL_MATs offloaded (want both > 0)");
        }
        fault_note = format!(
            "; round 2 with a client hanging up mid-stream, the program cache deleted and a second server on it \
             ({} requests, {f} injected executor faults run on the host, {n2} MUL_MATs offloaded, {} differ from \
             the first server alone{})",
            outs2.len(),
            differ.len(),
            if differ.is_empty() {
                String::new()
            } else {
                format!(": ids {}", ids(&differ))
            }
        );
        // Injected faults send single nodes to the host (other rounding), so the second server's greedy
        // tokens may legitimately differ; each request still completed with HTTP 200 and 8 tokens.
        r2
    } else {
        round(port, reqs, CLIENTS, None)?
    };
    ph.mark(format!("{label} round 2"));
    let bad2 = mismatches(reqs, &r2, &reference)?;
    check_invariance(label, 2, &bad2, stock_bad)?;
    // One more request alone after the faults: the server still answers exactly as before.
    let (st, o) = completion(port, &reqs[0])?;
    if st != 200 || reference.get(&0) != Some(&o) {
        bail!("{label}: after round 2, request 0 alone gives HTTP {st} {o:?}");
    }
    let rss2 = srv.proc.rss_kib().context("cannot read the server's RSS")?;
    let limit = rss1 as f64 * 1.05 + 16.0 * 1024.0;
    if rss2 as f64 > limit {
        bail!(
            "{label}: RSS grew from {:.1} MiB after round 1 to {:.1} MiB (limit {:.1} MiB)",
            mib(rss1),
            mib(rss2),
            limit / 1024.0
        );
    }
    let mut ane_note = String::new();
    if let (Some(stats), Some(a1)) = (always_stats, ane1) {
        let a2 = ane_ops(stats, a1 + 1, Duration::from_secs(2));
        if a1 == 0 || a2 <= a1 {
            bail!("{label}: offloaded MUL_MATs {a1} after round 1, {a2} after round 2");
        }
        ane_note = format!(", {a2} MUL_MATs offloaded");
    }
    srv.stop_cleanly()?;
    ph.mark(format!("{label} checks and stop"));
    Ok(format!(
        "{label}: {:.2} req/s, p50 {:.0} ms, p95 {:.0} ms; {} requests × 2 rounds HTTP 200, {} + {} differ from alone; \
         {} differ from stock alone{ane_note}; RSS {:.0} → {:.0} MiB; clean exit on SIGTERM{fault_note}",
        r1.req_per_s(),
        r1.latency_ms(0.5),
        r1.latency_ms(0.95),
        reqs.len(),
        bad1.len(),
        bad2.len(),
        vs_stock.len(),
        mib(rss1),
        mib(rss2),
    ))
}

/// Under load, outputs must equal the same request served alone. Stock llama.cpp itself is not
/// batch-invariant on this host (its CPU matmuls take other code paths for batched ubatches, so a near-tie
/// of the greedy choice can flip): when stock showed `k` requests differing from alone, ours may show at
/// most `k + 2` (the set varies from run to run with how requests happen to share batches); when stock
/// showed none, ours must show none.
fn check_invariance(label: &str, round: usize, bad: &[usize], stock_bad: &[usize]) -> Result<()> {
    let allowed = if stock_bad.is_empty() {
        0
    } else {
        stock_bad.len() + 2
    };
    if bad.len() > allowed {
        bail!(
            "{label}, round {round}: requests {} differ from the same requests served alone (stock: {}; allowed {allowed})",
            ids(bad),
            if stock_bad.is_empty() {
                "none".to_string()
            } else {
                ids(stock_bad)
            }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// cargo xtask serve-bench

#[derive(clap::Args, Debug)]
pub struct ServeBenchArgs {
    /// Requests per round.
    #[arg(long, default_value_t = 24)]
    pub requests: usize,
    /// Measured rounds per configuration (after one warm-up request).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Do not write docs/benchmarks.md.
    #[arg(long)]
    pub no_doc: bool,
}

/// Prompt lengths of the benchmark: `n` requests spread over 16..600 tokens.
fn bench_lens(n: usize) -> Vec<usize> {
    let base = STAGE_LENS;
    (0..n).map(|i| base[(i * 7) % base.len()]).collect()
}

struct BenchRow {
    label: &'static str,
    req_s: Vec<f64>,
    p50: f64,
    p95: f64,
    prompt_tok_s: f64,
    rss_mib: f64,
    ane_ops: Option<u64>,
}

pub fn serve_bench(args: &ServeBenchArgs) -> Result<Option<PathBuf>> {
    let bin = crate::host::ensure_host(None)?;
    let models = crate::models::ensure_models(&crate::models::ModelSet::default_set())?;
    let lib = crate::backend::build_backend(true)?;
    let model = model_path(&models, Model::Gemma3_270m, "Q8_0");
    let dir = scratch_dir("serve-bench")?;
    let reqs = requests(&bench_lens(args.requests));
    let prompt_tokens: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let t0 = Instant::now();
    let load_start = loadavg();
    let mut rows = Vec::new();
    for (label, policy) in [
        ("stock", None),
        ("ours, default policy", Some("")),
        ("ours, always", Some("always")),
    ] {
        let stats = dir.join(format!("stats-{}.json", rows.len()));
        let cfg = match policy {
            None => ServerCfg::stock(),
            Some(p) => ServerCfg::ours("ours", &lib, (!p.is_empty()).then_some(p))
                .with("GGML_COREML_STATS_FILE", &stats)
                .with("GGML_COREML_CACHE_DIR", dir.join("program-cache")),
        };
        let mut srv = start_server(&bin, &model, &cfg, &dir)?;
        let (st, _) = completion(srv.port, &reqs[0])?;
        if st != 200 {
            bail!("warm-up request: HTTP {st}");
        }
        let mut req_s = Vec::new();
        let mut lat = Vec::new();
        let mut wall = 0.0;
        for _ in 0..args.rounds {
            let r = round(srv.port, &reqs, CLIENTS, None)?;
            if let Some(d) = r.done.iter().find(|d| d.status != 200) {
                bail!("{label}: request {} HTTP {}", d.id, d.status);
            }
            req_s.push(r.req_per_s());
            wall += r.wall_s;
            lat.extend(r.done.iter().map(|d| d.ms));
        }
        let rss = srv.proc.rss_kib().unwrap_or(0);
        let ane = policy.map(|_| ane_ops(&stats, 1, Duration::from_millis(700)));
        srv.stop_cleanly()?;
        let row = BenchRow {
            label,
            req_s,
            p50: percentile(&mut lat.clone(), 0.5),
            p95: percentile(&mut lat, 0.95),
            prompt_tok_s: (prompt_tokens * args.rounds) as f64 / wall,
            rss_mib: mib(rss),
            ane_ops: ane,
        };
        log!(
            "serve-bench: {label}: {:.2} req/s (rounds {:?}), p50 {:.0} ms, p95 {:.0} ms",
            median(&row.req_s),
            row.req_s,
            row.p50,
            row.p95
        );
        rows.push(row);
    }
    let md = render(args, &reqs, &rows, t0.elapsed().as_secs_f64(), &load_start);
    fs::write(dir.join("report.md"), &md)?;
    println!("{md}");
    if !args.no_doc {
        let doc = paths::workspace_root().join("docs").join("benchmarks.md");
        let old = fs::read_to_string(&doc).unwrap_or_default();
        fs::write(&doc, splice_serve(&old, &md))?;
        log!("serve-bench: wrote {}", doc.display());
    }
    Ok(Some(dir))
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    percentile(&mut v, 0.5)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Bounds of the serving section in docs/benchmarks.md (kept by `cargo xtask bench`).
pub const SERVE_BEGIN: &str = "<!-- serving: generated by `cargo xtask serve-bench` -->";
pub const SERVE_END: &str = "<!-- end of the serving section -->";

fn render(
    args: &ServeBenchArgs,
    reqs: &[Req],
    rows: &[BenchRow],
    secs: f64,
    load_start: &str,
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{SERVE_BEGIN}");
    let _ = writeln!(o, "## Serving: llama-server under concurrent load\n");
    let _ = writeln!(
        o,
        "_Generated by `cargo xtask serve-bench` (this section is replaced by each such run and kept by \
         `cargo xtask bench`)._\n"
    );
    let stamp = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let m = crate::bench::Machine::probe();
    let lens: Vec<usize> = reqs.iter().map(|r| r.prompt.len()).collect();
    let _ = writeln!(
        o,
        "- Command: `cargo xtask serve-bench --requests {} --rounds {}`",
        args.requests, args.rounds
    );
    let _ = writeln!(
        o,
        "- Date: {stamp}; {secs:.0} s in all; repo {}; load average at start {load_start}, at end {}",
        m.git,
        loadavg()
    );
    let _ = writeln!(
        o,
        "- Machine: {} ({}), `nproc` {}, {} (the reference executor's fp16 GEMM {})",
        m.cpu,
        m.os,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if avx512() { "AVX-512" } else { "no AVX-512" },
        if avx512() {
            "uses its AVX-512 kernels"
        } else {
            "runs its AVX2 + F16C kernels"
        }
    );
    let _ = writeln!(
        o,
        "- Server: `OMP_WAIT_POLICY=passive llama-server -m gemma-3-270m-Q8_0.gguf -ngl 0 -np {SLOTS} -c {} -t 2 -tb 2 \
         --cache-ram 0` (continuous batching, {SLOTS} slots; blocking OpenMP waits, as in the `serve` stage: \
         spinning workers on shared cores make every configuration several times slower and noisier); ours adds \
         `GGML_BACKEND_PATH=<libggml-coreml>` (the ACCEL face) and, for `always`, `GGML_COREML_POLICY=always`.",
        SLOTS * CTX_PER_SLOT
    );
    let _ = writeln!(
        o,
        "- Load: {CLIENTS} concurrent clients, {} `/completion` requests per round (half streamed), prompts of \
         {:?} tokens ({} in all), greedy (`temperature` 0, `seed` 42), `n_predict` {N_PREDICT} with `ignore_eos`, \
         `cache_prompt` false; one warm-up request, then {} rounds. Latency = request sent to last byte received.\n",
        reqs.len(),
        lens,
        lens.iter().sum::<usize>(),
        args.rounds
    );
    let _ = writeln!(
        o,
        "| server | requests/s (median of rounds) | rounds | p50 latency ms | p95 latency ms | prompt tokens/s | RSS at end MiB | MUL_MATs offloaded |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            o,
            "| {} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            r.label,
            median(&r.req_s),
            r.req_s
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.p50,
            r.p95,
            r.prompt_tok_s,
            r.rss_mib,
            r.ane_ops.map_or("—".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(
        o,
        "\nOn Linux the executor is the portable reference executor (a CPU GEMM on the same 2 cores), so these \
         numbers measure what the integration costs under a real server's batching, not the Neural Engine. On \
         shared cores the absolute rates follow the machine's load (the load average above): compare the rows of \
         one run; docs/serving.md keeps earlier runs. The correctness side of the same setup (every request HTTP 200, greedy output identical to the request \
         served alone, faults) is the `serve` test stage (docs/testing.md, docs/serving.md)."
    );
    let _ = writeln!(o, "{SERVE_END}");
    o
}

/// The serving section of a docs/benchmarks.md, markers included.
pub fn serve_section(doc: &str) -> Option<&str> {
    crate::bench::doc_section(doc, SERVE_BEGIN, SERVE_END)
}

/// `doc` with its serving section replaced by `section` (placed before the projection, or at the end).
pub fn splice_serve(doc: &str, section: &str) -> String {
    crate::bench::splice_section(
        doc,
        SERVE_BEGIN,
        SERVE_END,
        section,
        &["## Projection (not a measurement)"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_deterministic_and_sized() {
        let a = requests(STAGE_LENS);
        let b = requests(STAGE_LENS);
        assert_eq!(a.len(), STAGE_LENS.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.prompt, y.prompt);
        }
        assert!(a.iter().all(|r| r.prompt.len() <= CTX_PER_SLOT - N_PREDICT));
        assert_eq!(*STAGE_LENS.iter().min().unwrap(), 16);
        assert_eq!(*STAGE_LENS.iter().max().unwrap(), 600);
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.95), 5.0);
    }

    #[test]
    fn serve_section_round_trips() {
        let doc = "# B\n\ntext\n\n## Projection (not a measurement): x\n";
        let s = format!("{SERVE_BEGIN}\nA\n{SERVE_END}\n");
        let d1 = splice_serve(doc, &s);
        assert!(d1.contains("A\n") && d1.find(SERVE_BEGIN) < d1.find("## Projection"));
        let s2 = format!("{SERVE_BEGIN}\nB\n{SERVE_END}\n");
        let d2 = splice_serve(&d1, &s2);
        assert!(!d2.contains("\nA\n") && d2.contains("\nB\n"));
        assert_eq!(d2.matches(SERVE_BEGIN).count(), 1);
    }
}
