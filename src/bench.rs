//! `notifyd bench`: drain throughput and latency. Being built.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Events to drain.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
}

pub async fn run(_database_url: &str, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not built yet")
}
