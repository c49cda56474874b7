//! `flywheel`: parse flags, set up tracing, run the command until done or SIGTERM/SIGINT.

use clap::Parser;
use flywheel_cli::{Cli, run};
use flywheel_core::runtime::{init_tracing, shutdown_on_signals};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log)?;
    let shutdown = shutdown_on_signals();
    run(cli, shutdown).await?;
    Ok(())
}
