//! `info`: what the backend would use on this machine.

use std::process::ExitCode;

use ggml_coreml_executor::platform;

use crate::cache_cmd::human;
use crate::{Cli, env};

pub fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = env::config(cli);
    println!("ggml-coreml {}", env!("CARGO_PKG_VERSION"));
    println!("program format   {}", ggml_coreml_program::FORMAT_VERSION);
    println!("platform         {}", platform::describe());
    let (_, why) = platform::best_executor();
    println!("executor         {why}");
    println!("env key          {}", config.env);
    println!("env directory    {}", config.env.dir_name());
    let cache = ggml_coreml_cache::Cache::open(config);
    match cache.dir() {
        Some(d) => {
            let items = cache.list(false);
            let here = items.iter().filter(|i| i.current_env).count();
            let bytes: u64 = items.iter().map(|i| i.bytes).sum();
            println!("cache directory  {}", d.display());
            println!(
                "cache contents   {} entries ({here} for this env key), {} of {} cap",
                items.len(),
                human(bytes),
                human(cache.max_bytes())
            );
        }
        None => println!("cache directory  none (memory only)"),
    }
    Ok(ExitCode::SUCCESS)
}
