//! `cargo xtask run` (owned by the lead; stub).

pub fn main(args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("not yet: cargo xtask run {}", args.join(" "))
}
