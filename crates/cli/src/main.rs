//! `ggml-coreml`: program cache management (`cache warm|ls|clear|export|import`) and `info`.
//!
//! One module per subcommand; a new subcommand (e.g. `bench`) adds a module, a variant of [`Command`]
//! and one arm in [`main`].

mod cache_cmd;
mod env;
mod info;
mod prepare;
mod shapes;
mod warm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ggml-coreml",
    version,
    about = "CoreML / Neural Engine backend for ggml: program cache and tools"
)]
pub struct Cli {
    /// Cache directory (default: GGML_COREML_CACHE_DIR, else the platform cache directory).
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Program cache: warm it from a model, list, clear, export, import.
    Cache(cache_cmd::CacheArgs),
    /// Cache directory, env key and executor of this machine.
    Info,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Cache(args) => cache_cmd::run(&cli, args),
        Command::Info => info::run(&cli),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ggml-coreml: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
