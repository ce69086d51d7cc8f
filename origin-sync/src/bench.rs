//! `origin-sync bench`: whole-system figures against a broker it starts.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}
pub async fn bench(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
