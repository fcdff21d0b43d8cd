//! `cargo xtask`: developer tasks for ggml-coreml — the llama.cpp host, the Python venv,
//! test models, the backend build, and test orchestration.
//!
//! Every command prints the path it produced as the last line on stdout
//! (`BIN=$(cargo xtask host | tail -1)`); progress goes to stderr.

mod backend;
mod bench;
mod cuda;
mod device_report;
mod equivalence;
mod face;
mod gguf;
mod host;
mod host_v3;
mod models;
mod overhead;
mod parity;
mod paths;
mod proc;
mod qvac;
mod rpc;
mod run;
mod serve;
mod test;
mod two_models;
mod util;
mod venv;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use models::{ModelSet, ensure_models};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ggml-coreml developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build llama.cpp (from PyPI's llama-cpp-python sdist) as the test host; prints its bin dir.
    Host {
        /// Print the state of the host and build nothing.
        #[arg(long)]
        check: bool,
        /// Parallel build jobs (default: all cores).
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Build the second conformance host instead: ggml 0.26 (backend API version 3) from
        /// crates.io's llama-cpp-sys-2 0.1.161, with test-backend-ops.
        #[arg(long)]
        v3: bool,
    },
    /// Create the Python venv (coremltools, gguf, numpy, matplotlib); prints its python.
    Venv,
    /// Fetch/generate GGUF models and requantise them; prints the models dir.
    Models {
        /// The parity set: Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K and F16.
        #[arg(long, conflicts_with = "quants")]
        full: bool,
        /// Comma-separated llama-quantize types (default: Q8_0).
        #[arg(long, value_delimiter = ',')]
        quants: Vec<String>,
        /// Comma-separated models (default: all): gemma-3-270m, smollm2-135m, qwen3-tiny, qwen3-tiny-moe.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build the backend cdylib and copy it to libggml-coreml.so/.dylib; prints that path.
    Build {
        /// Debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Test orchestration; arguments (including --help) go to the test command.
    #[command(disable_help_flag = true)]
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the QVAC suite: Bare with @qvac/llm-llamacpp and @qvac/embed-llamacpp, stock vs ggml-coreml.
    Qvac,
    /// Run llama.cpp tools with the backend loaded; arguments (including --help) go to it.
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// End-to-end parity on real models (per-layer NMSE, perplexity, KL divergence, greedy text) vs stock;
    /// writes docs/parity.md.
    Parity(parity::ParityArgs),
    /// Stock vs ggml-coreml llama-bench runs, alternating, over a model × type × policy matrix; writes
    /// bench-out/<time>/ and (default matrix) docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Mac only: the device suite, `cargo xtask run`, a llama-bench comparison (Metal, hybrid
    /// CoreML-Metal, ACCEL at -ngl 0, each vs stock) and `parity --quick`, into one markdown + JSON
    /// report (docs/apple.md §1). Elsewhere: prints what it would run and fails.
    DeviceReport(device_report::DeviceReportArgs),
    /// Instructions the host executes per prefill / decode test, stock vs ggml-coreml (valgrind's
    /// callgrind): the load-independent measure of what the backend's presence costs.
    Overhead(overhead::OverheadArgs),
    /// llama-server under 8 concurrent clients (`-np 4`, Gemma-3-270M Q8_0): requests/s and p50/p95 latency,
    /// stock vs ours (default policy and `always`); writes the serving section of docs/benchmarks.md.
    ServeBench(serve::ServeBenchArgs),
    /// Pack .device/ for the hybrid face's CUDA run on the lent GPU machine and print the command.
    #[command(disable_help_flag = true)]
    CudaBundle {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(Some(path)) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> anyhow::Result<Option<PathBuf>> {
    Ok(Some(match cmd {
        Cmd::Host { check: true, .. } => host::check()?,
        Cmd::Host { v3: true, .. } => host_v3::ensure_host_v3()?,
        Cmd::Host {
            check: false, jobs, ..
        } => host::ensure_host(jobs)?,
        Cmd::Venv => venv::ensure_venv()?,
        Cmd::CudaBundle { args } => {
            cuda::main(&args)?;
            return Ok(None);
        }
        Cmd::Models { full, quants, only } => {
            let mut set = if full {
                ModelSet::full()
            } else {
                ModelSet::default_set()
            };
            if !quants.is_empty() {
                set.quants = quants;
            }
            if !only.is_empty() {
                set.models = only
                    .iter()
                    .map(|name| name.parse())
                    .collect::<anyhow::Result<_>>()?;
            }
            ensure_models(&set)?
        }
        Cmd::Build { debug } => backend::build_backend(!debug)?,
        Cmd::Qvac => qvac::main()?,
        Cmd::Test { args } => {
            test::main(&args)?;
            return Ok(None);
        }
        Cmd::Run { args } => {
            run::main(&args)?;
            return Ok(None);
        }
        Cmd::Parity(args) => return parity::main(args),
        Cmd::Bench(args) => return bench::main(args),
        Cmd::Overhead(args) => return overhead::main(args),
        Cmd::ServeBench(args) => return serve::serve_bench(&args),
        Cmd::DeviceReport(args) => return device_report::main(args),
    }))
}
