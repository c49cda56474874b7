//! `flywheel model` (the tiny test model, GGUF import) and `flywheel
//! train` (one train request here, with a progress bar).

use std::time::Duration;

use flywheel_core::kafka::KafkaArgs;
use flywheel_core::records::TrainRequest;
use flywheel_core::topics::{Topic, TopicsConfig};

use crate::cli::{ModelCommand, TrainArgs};
use crate::{CliError, Result};

/// The train request `args` name: from its file, or from the topic.
fn train_request(kafka: &KafkaArgs, topics: &TopicsConfig, args: &TrainArgs) -> Result<TrainRequest> {
    if let Some(path) = &args.request_file {
        let text = std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        return serde_json::from_slice(&text)
            .map_err(|e| CliError::Usage(format!("{} is not a train request: {e}", path.display())));
    }
    let topic = topics.name(Topic::TrainRequests);
    let requests: Vec<TrainRequest> =
        flywheel_core::kafka::read_topic(kafka, "flywheel-cli", &topic, Duration::from_secs(30))?;
    let found = match &args.request_id {
        Some(id) => requests.into_iter().rev().find(|r| &r.request_id == id),
        None => requests.into_iter().next_back(),
    };
    found.ok_or_else(|| {
        CliError::Usage(match &args.request_id {
            Some(id) => format!("no train request {id} on {topic}"),
            None => format!("{topic} holds no train request"),
        })
    })
}

/// `flywheel model tiny|import-gguf`.
pub(crate) fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Tiny { out, seed } => {
            let model = flywheel_trainer::tiny::tiny_model(seed).map_err(|e| CliError::Usage(e.to_string()))?;
            flywheel_trainer::tiny::save(&model, &out).map_err(|e| CliError::Usage(e.to_string()))?;
            let c = &model.config;
            println!(
                "wrote {} ({} layers, width {}, {} heads / {} kv heads, vocabulary {})",
                out.display(),
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.kv_heads(),
                c.vocab_size
            );
            Ok(())
        }
        ModelCommand::ImportGguf { file, out, dtype } => {
            let report = flywheel_trainer::import::import_gguf(&file, &out, dtype)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            println!("{report}");
            Ok(())
        }
    }
}

/// `flywheel train`: the job runs on this thread, its lake reads on the
/// current runtime.
pub(crate) fn train(kafka: &KafkaArgs, topics: &TopicsConfig, args: &TrainArgs) -> Result<()> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| train_here(kafka, topics, args, &runtime))
}

fn train_here(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    args: &TrainArgs,
    runtime: &tokio::runtime::Handle,
) -> Result<()> {
    let req = train_request(kafka, topics, args)?;
    // Drawn only on a terminal; logs and pipes get the tracing lines.
    let bar = indicatif::ProgressBar::new(req.objective.max_steps.max(1) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:32} {pos}/{len} steps  {msg}  ETA {eta}")
            .map_err(|e| CliError::Usage(e.to_string()))?,
    );
    let (candidate, dir) = flywheel_trainer::job::run_job(&req, &args.job, runtime, &mut |p| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.4}  {:.0} tokens/s", p.loss, p.tokens_per_second()));
    })
    .map_err(|e| CliError::Usage(format!("request {}: {e}", req.request_id)))?;
    bar.finish_and_clear();
    eprintln!("adapter written to {}", dir.display());
    let json = serde_json::to_string_pretty(&candidate).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{json}");
    Ok(())
}
