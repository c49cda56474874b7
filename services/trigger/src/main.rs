//! `flywheel-trigger`: parse config, set up tracing, run until SIGTERM/SIGINT.

use clap::Parser;
use flywheel_core::runtime::{init_tracing, shutdown_on_signals};
use flywheel_trigger::{Config, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_tracing(&config.service.log)?;
    let shutdown = shutdown_on_signals();
    run(config, shutdown).await?;
    Ok(())
}
