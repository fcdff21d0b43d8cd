//! The `rpc` test stage (placeholder, filled below).
use anyhow::Result;

pub fn stage(_env: &crate::test::Env) -> Result<String> {
    anyhow::bail!("not yet")
}
