//! `flywheel broker`: the embedded broker in the foreground.

use std::time::Duration;

use flywheel_devkit::LocalBroker;
use tokio_util::sync::CancellationToken;

use crate::cli::BrokerArgs;
use crate::{CliError, Result};

/// Runs the broker until `shutdown`; an exit of its own is an error.
pub(crate) async fn run_broker(args: &BrokerArgs, shutdown: CancellationToken) -> Result<()> {
    let mut broker = LocalBroker::start(&args.tansu_bin, args.listen, &args.data_dir, Duration::from_secs(30))?;
    println!(
        "broker listening on {} (data in {}, log {}); Ctrl-C stops it",
        broker.bootstrap(),
        args.data_dir.display(),
        broker.log_path().display()
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                broker.stop();
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(status) = broker.exit_status() {
                    return Err(CliError::Usage(format!(
                        "broker exited unexpectedly ({status}); see {}",
                        broker.log_path().display()
                    )));
                }
            }
        }
    }
}
