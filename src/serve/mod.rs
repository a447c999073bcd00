//! The read service (`notifyd serve`). Being built in issue 3.

use clap::Args;
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "NOTIFYD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id (JWT `sub`).
    #[arg(long)]
    pub sub: String,
}

pub async fn run(
    _database_url: &str,
    _args: ServeArgs,
    _shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::bail!("serve is not built yet")
}

pub fn print_token(_args: TokenArgs) -> anyhow::Result<()> {
    anyhow::bail!("token is not built yet")
}
