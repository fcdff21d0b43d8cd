//! `cache warm|ls|clear|export|import`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use ggml_coreml_cache::Class;

use crate::shapes::VariantChoice;
use crate::{Cli, env, warm};

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Prepare every program a model's matmuls need (a second run is all cache hits).
    Warm(WarmArgs),
    /// List entries: class, form, size, last use, key, note.
    Ls {
        /// Verify every entry's checksums (read only).
        #[arg(long)]
        verify: bool,
        /// Only entries of this machine's env key.
        #[arg(long)]
        current: bool,
    },
    /// Remove entries (all classes unless some are named).
    Clear {
        #[arg(long)]
        programs: bool,
        #[arg(long)]
        artifacts: bool,
        #[arg(long)]
        measurements: bool,
    },
    /// Copy the program entries of this machine's env key and a manifest into DIR (what a release
    /// publishes so users start warm).
    Export { dir: PathBuf },
    /// Import entries exported by `cache export` (each is verified).
    Import { dir: PathBuf },
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// GGUF model file.
    pub model: PathBuf,
    /// Program variants to prepare.
    #[arg(long, value_enum, default_value = "auto")]
    pub variant: VariantChoice,
    /// Token counts to prepare for (each maps to its M bucket); default 512.
    #[arg(long, value_delimiter = ',', value_name = "M,...")]
    pub m: Vec<usize>,
}

pub fn run(cli: &Cli, args: &CacheArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        CacheCommand::Warm(w) => warm::run(cli, w),
        CacheCommand::Ls { verify, current } => ls(cli, *verify, *current),
        CacheCommand::Clear {
            programs,
            artifacts,
            measurements,
        } => {
            let mut classes = Vec::new();
            for (on, c) in [
                (programs, Class::Program),
                (artifacts, Class::Artifact),
                (measurements, Class::Measurement),
            ] {
                if *on {
                    classes.push(c);
                }
            }
            if classes.is_empty() {
                classes = Class::ALL.to_vec();
            }
            let cache = need_disk(cli)?;
            let n = cache.clear(&classes)?;
            let names: Vec<&str> = classes.iter().map(|c| c.dir()).collect();
            println!("removed {n} entries ({})", names.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Export { dir } => {
            let cache = need_disk(cli)?;
            let s = cache.export(dir)?;
            println!(
                "exported {} program entries ({}) for {} to {}",
                s.entries,
                human(s.bytes),
                cache.env(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Import { dir } => {
            let cache = need_disk(cli)?;
            let s = cache.import(dir)?;
            println!("imported {} entries, rejected {}", s.imported, s.rejected);
            Ok(if s.rejected > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn need_disk(cli: &Cli) -> anyhow::Result<ggml_coreml_cache::Cache> {
    let cache = env::open(cli);
    if cache.dir().is_none() {
        anyhow::bail!("no usable cache directory (see the warning above)");
    }
    Ok(cache)
}

fn ls(cli: &Cli, verify: bool, current: bool) -> anyhow::Result<ExitCode> {
    let cache = need_disk(cli)?;
    let items: Vec<_> = cache
        .list(verify)
        .into_iter()
        .filter(|i| !current || i.current_env)
        .collect();
    let dir = cache.dir().expect("checked");
    println!("cache {} ({})", dir.display(), cache.env());
    println!(
        "{:<11} {:<4} {:>9} {:>9} {:<5} {:<36} note",
        "class", "form", "size", "used", "env", "key"
    );
    let mut total = 0;
    let mut invalid = 0;
    for i in &items {
        total += i.bytes;
        let env = if i.current_env { "this" } else { "other" };
        let key = short_key(&i.key);
        let mut note = i.note.clone();
        if i.valid == Some(false) {
            invalid += 1;
            note = format!("INVALID {note}");
        }
        println!(
            "{:<11} {:<4} {:>9} {:>9} {:<5} {:<36} {}",
            i.class.name(),
            if i.is_dir { "dir" } else { "blob" },
            human(i.bytes),
            age(i.last_used),
            env,
            key,
            note
        );
    }
    println!(
        "{} entries, {} (cap {}){}",
        items.len(),
        human(total),
        human(cache.max_bytes()),
        if verify {
            format!(", {invalid} invalid")
        } else {
            String::new()
        }
    );
    Ok(if invalid > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The key without its env part: `program i8i8-m512-k4096-n4096`, `artifact model=…|quant=…|name`.
fn short_key(full: &str) -> String {
    let parts: Vec<&str> = full.split('|').collect();
    match parts.as_slice() {
        [] | [_] => full.to_owned(),
        [_, _, rest @ ..] => rest.join("|"),
    }
}

pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn age(t: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}
