//! The `flywheel` command-line tool: runs the embedded broker, creates the
//! topic map, produces and tails Avro records as JSON, maintains the lake,
//! trains one request, and runs the whole loop locally (`flywheel up`).

// Printing results to stdout is what a CLI is for; logs go to stderr.
#![allow(clippy::print_stdout)]

mod broker;
pub mod chat_product;
mod cli;
mod error;
pub mod http;
mod lake;
mod model;
mod records;
pub mod simulate;
mod topics;
mod up;

use tokio_util::sync::CancellationToken;

pub use crate::cli::{Cli, TailArgs};
use crate::cli::{Command, TopicsCommand};
pub use crate::error::{CliError, Result};
pub use crate::records::{produce_file, read_json_records, tail};
pub use crate::topics::strimzi_topics;

/// Runs a parsed command until done or until `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<()> {
    let topics = cli.topics.load()?;
    let topics_file = cli.topics.topics_config.as_deref();
    match cli.command {
        Command::Broker(args) => broker::run_broker(&args, shutdown).await,
        Command::Topics(TopicsCommand::Create) => topics::create(&cli.kafka, &topics).await,
        Command::Topics(TopicsCommand::List) => topics::list_topics(&cli.kafka, &topics),
        Command::Topics(TopicsCommand::Strimzi(args)) => topics::print_strimzi(&topics, topics_file, &args),
        Command::Produce(args) => records::produce(&cli.kafka, &topics, &args).await,
        Command::Tail(args) => records::tail_to_stdout(&cli.kafka, &topics, &args, &shutdown),
        Command::Lake(command) => lake::lake(command).await,
        Command::Model(command) => model::model(command),
        Command::Train(args) => model::train(&cli.kafka, &topics, &args),
        Command::Simulate(args) => simulate::simulate_command(&args, shutdown).await,
        Command::Up(args) => up::up(&cli.kafka, &topics, topics_file, &args, shutdown).await.map(|_| ()),
    }
}
