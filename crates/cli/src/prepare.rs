//! Making one program ready and in the cache: the hook `cache warm` calls per program.
//!
//! - Off Apple ([`PackagePreparer`]): emit the `.mlpackage` into the cache (what the reference executor
//!   and the Apple executor start from).
//! - On Apple ([`ExecutorPreparer`]): the CoreML executor's `prepare`, which compiles the package,
//!   checks placement and keeps the `.mlmodelc` + verdict in its cache.

use ggml_coreml_cache::{Built, Cache, EntryKey, Lookup};
use ggml_coreml_program::ProgramDesc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Already in the cache.
    Hit,
    /// Built now and stored.
    Built,
    /// Built, but there is no disk cache to keep it.
    BuiltUnstored,
    /// The platform refuses the program (remembered in the cache); the backend runs it on the host.
    #[cfg_attr(not(target_vendor = "apple"), allow(dead_code))]
    Declined(String),
}

pub trait Preparer {
    /// One line: what prepares programs here.
    fn describe(&self) -> String;
    fn prepare(&self, desc: &ProgramDesc) -> Result<Prepared, String>;
}

/// Emits `.mlpackage` directories into the cache (portable).
pub struct PackagePreparer {
    pub cache: Cache,
}

/// Note of a package entry: not compiled, so no placement verdict yet.
pub const PACKAGE_NOTE: &str = "mlpackage";

impl Preparer for PackagePreparer {
    fn describe(&self) -> String {
        "emit .mlpackage programs (no CoreML on this platform)".into()
    }

    fn prepare(&self, desc: &ProgramDesc) -> Result<Prepared, String> {
        let key = EntryKey::program(desc);
        let (_, how) = self.cache.get_or_build(&key, |dir| {
            ggml_coreml_program::write_mlpackage(desc, dir)
                .map(|_| Built::Dir {
                    note: PACKAGE_NOTE.into(),
                })
                .map_err(|e| format!("{desc}: {e}"))
        })?;
        Ok(match how {
            Lookup::Hit => Prepared::Hit,
            Lookup::Built { stored: true } => Prepared::Built,
            Lookup::Built { stored: false } => Prepared::BuiltUnstored,
        })
    }
}

/// The CoreML executor's prepare (compile, placement check, cache).
#[cfg(target_vendor = "apple")]
pub struct ExecutorPreparer {
    pub exec: ggml_coreml_executor::coreml::CoreMlExecutor,
}

#[cfg(target_vendor = "apple")]
impl Preparer for ExecutorPreparer {
    fn describe(&self) -> String {
        use ggml_coreml_executor::Executor;
        format!("CoreML executor: {}", self.exec.capabilities().description)
    }

    fn prepare(&self, desc: &ProgramDesc) -> Result<Prepared, String> {
        use ggml_coreml_executor::{ExecError, Executor};
        let key = EntryKey::program(desc);
        let cached = self.exec.cache().get(&key);
        if let Some(ggml_coreml_cache::Placement::Declined(r)) =
            cached.as_ref().and_then(|e| e.placement())
        {
            return Ok(Prepared::Declined(r));
        }
        match self.exec.prepare(desc) {
            Ok(()) if cached.is_some() => Ok(Prepared::Hit),
            Ok(()) if self.exec.cache().dir().is_none() => Ok(Prepared::BuiltUnstored),
            Ok(()) => Ok(Prepared::Built),
            Err(ExecError::Placement(_, r)) => Ok(Prepared::Declined(r)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The preparer for this platform. On Apple the CoreML executor when it can run here, else packages.
pub fn for_platform(cache: Cache, cli: &crate::Cli) -> Box<dyn Preparer> {
    #[cfg(target_vendor = "apple")]
    {
        use ggml_coreml_executor::Executor;
        let mut settings = ggml_coreml_executor::coreml::Settings::from_env();
        if let Some(d) = &cli.cache_dir {
            settings.cache_dir = Some(d.clone());
        }
        match ggml_coreml_executor::coreml::try_new_with(settings) {
            Ok(exec) if exec.capabilities().accelerated => {
                return Box::new(ExecutorPreparer { exec });
            }
            Ok(exec) => eprintln!(
                "ggml-coreml: CoreML executor unusable here: {}",
                exec.capabilities().description
            ),
            Err(e) => eprintln!("ggml-coreml: CoreML executor unavailable: {e}"),
        }
    }
    let _ = cli;
    Box::new(PackagePreparer { cache })
}
