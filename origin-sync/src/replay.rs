//! `origin-sync replay`: rebuilds the store from the earliest offsets.
pub async fn replay(_config: &origin_sync::config::Config) -> anyhow::Result<()> {
    anyhow::bail!("replay is not implemented yet")
}
