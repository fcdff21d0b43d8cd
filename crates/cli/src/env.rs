//! The env key and cache of this machine, as the backend computes them.

use ggml_coreml_cache::{Cache, CacheConfig, EnvKey};

use crate::Cli;

/// The env key the backend's executor uses here: on Apple the OS build and chip (as the CoreML executor
/// keys its cache), elsewhere the reference executor's key.
pub fn env_key() -> EnvKey {
    #[cfg(target_vendor = "apple")]
    {
        ggml_coreml_executor::coreml::env_key(&ggml_coreml_executor::platform::facts())
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        EnvKey::reference()
    }
}

pub fn config(cli: &Cli) -> CacheConfig {
    let mut c = CacheConfig::from_env(env_key());
    if let Some(d) = &cli.cache_dir {
        c.dir = Some(d.clone());
    }
    c
}

pub fn open(cli: &Cli) -> Cache {
    Cache::open(config(cli))
}
