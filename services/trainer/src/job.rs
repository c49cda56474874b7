//! One training job: a train request in, a PEFT adapter and a model
//! candidate out. Reads exactly the shards the request pins (refusing any
//! whose content hash differs, or that the Delta commit the request names
//! did not add: the files the trigger saw, still readable after compaction
//! until vacuum), splits train/holdout deterministically by a
//! salted hash of `suggestion_id`, trains the request's objective, and
//! evaluates candidate and parent on the holdout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Float64Type, Int32Type};
use arrow_array::{Array as _, RecordBatch};
use flywheel_core::records::{ModelCandidate, ObjectiveKind, TrainRequest, TrainingObjective};
use flywheel_lake::store::{Storage, open_storage};
use flywheel_lake::table::Lake;
use serde::Serialize;

use crate::TrainerError;
use crate::backend::{Backend, Device, StepSettings, open_backend};
use crate::cpu::gemm::PrecisionChoice;
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::objective::{Example, Objective, pairwise_accuracy};
use crate::optim::learning_rate;
use crate::tokenize::TextTokenizer;

/// Version of the training code, part of every adapter version.
pub(crate) const CODE_VERSION: &str = concat!("flywheel-trainer/", env!("CARGO_PKG_VERSION"));

/// Where models and adapters live, limits and device: the flags of the
/// trainer service and of `flywheel train`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobSettings {
    /// Base models by name: `<root>/<base_model>/config.json`, `model.safetensors`, `tokenizer.json`.
    #[arg(long = "models-root", env = "FLYWHEEL_TRAINER_MODELS_ROOT", default_value = ".flywheel/models")]
    pub models_root: PathBuf,
    /// Where adapters are written: `<root>/<tenant>/<adapter_version>/`.
    #[arg(long = "adapters-root", env = "FLYWHEEL_TRAINER_ADAPTERS_ROOT", default_value = ".flywheel/adapters")]
    pub adapters_root: PathBuf,
    /// Longest training example in tokens (prompts are cut from the left).
    #[arg(long = "max-tokens", env = "FLYWHEEL_TRAINER_MAX_TOKENS", default_value_t = 512)]
    pub max_tokens: usize,
    /// Where training runs.
    #[arg(long, env = "FLYWHEEL_TRAINER_DEVICE", value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// How the CPU stores the frozen base: `auto` takes bf16 where this
    /// CPU's bf16 dot products are clearly faster than f32 FMAs, bf16-stored
    /// weights multiplied in f32 on other AVX-512 CPUs, else f32.
    #[arg(long = "cpu-precision", env = "FLYWHEEL_TRAINER_CPU_PRECISION", value_enum, default_value_t = PrecisionChoice::Auto)]
    pub cpu_precision: PrecisionChoice,
}

fn safe_relative(name: &str) -> Result<&str, TrainerError> {
    let ok = !name.is_empty()
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok { Ok(name) } else { Err(TrainerError::Format(format!("'{name}' cannot name a directory"))) }
}

/// The examples of the pinned shards, read and hash-checked.
fn read_examples(
    req: &TrainRequest,
    tokenizer: &TextTokenizer,
    max_tokens: usize,
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<(String, Example)>, TrainerError> {
    let mut stores: HashMap<String, Arc<dyn Storage>> = HashMap::new();
    // Files each pinned commit added, by (lake root, table version).
    let mut commits: HashMap<(String, i64), HashSet<String>> = HashMap::new();
    let mut lakes: HashMap<String, Lake> = HashMap::new();
    let mut out = Vec::new();
    for shard in &req.shards {
        let store = match stores.get(&shard.lake_root) {
            Some(s) => s.clone(),
            None => {
                let s = open_storage(&shard.lake_root, runtime.clone())?;
                stores.insert(shard.lake_root.clone(), s.clone());
                s
            }
        };
        // The commit that made the shard part of the table must name it
        // (one log entry read per version, not a snapshot load).
        if let Some(version) = shard.table_version {
            let key = (shard.lake_root.clone(), version);
            if !commits.contains_key(&key) {
                let at = u64::try_from(version)
                    .map_err(|_| TrainerError::Format(format!("shard {}: table version {version}", shard.shard_id)))?;
                if !lakes.contains_key(&shard.lake_root) {
                    let lake = Lake::open(store.clone(), runtime.clone())?;
                    lakes.insert(shard.lake_root.clone(), lake);
                }
                let record = lakes[&shard.lake_root].commit(at)?;
                let added = record.map(|c| c.added).unwrap_or_default();
                commits.insert(key.clone(), added.into_iter().map(|f| f.path).collect());
            }
            if !commits[&key].contains(&shard.uri) {
                return Err(TrainerError::Shard {
                    shard_id: shard.shard_id.clone(),
                    code: "shard_not_in_commit",
                    detail: format!(
                        "{} is not in table version {version} of {}: not committed data",
                        shard.uri, shard.lake_root
                    ),
                });
            }
        }
        let bytes = store.get(&shard.uri)?.ok_or_else(|| TrainerError::Shard {
            shard_id: shard.shard_id.clone(),
            code: "shard_missing",
            detail: format!(
                "missing at {}: vacuumed before this request ran? keep `flywheel lake vacuum \
                 --retention-hours` above the age of pending train requests",
                shard.uri
            ),
        })?;
        let digest = flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if digest != shard.content_sha256 {
            return Err(TrainerError::Shard {
                shard_id: shard.shard_id.clone(),
                code: "shard_hash_mismatch",
                detail: format!("SHA-256 {digest}, the request pins {}", shard.content_sha256),
            });
        }
        let batches = flywheel_lake::shard::read_file(bytes)?;
        for batch in &batches {
            out.extend(examples_of(batch, tokenizer, max_tokens)?);
        }
    }
    Ok(out)
}

/// The training examples of one lake batch, keyed by suggestion id: prompt
/// and completion tokenized (the prompt cut from the left to fit
/// `max_tokens`), reward, outcome and behaviour log-prob as recorded.
pub fn examples_of(
    batch: &RecordBatch,
    tokenizer: &TextTokenizer,
    max_tokens: usize,
) -> Result<Vec<(String, Example)>, TrainerError> {
    let missing = |c: &str| TrainerError::Format(format!("shard column {c} is missing or mistyped"));
    let string =
        |c: &'static str| batch.column_by_name(c).and_then(|a| a.as_string_opt::<i32>()).ok_or_else(|| missing(c));
    let (ids, prompts, completions) = (string("suggestion_id")?, string("prompt")?, string("completion")?);
    let reward = batch
        .column_by_name("reward")
        .and_then(|a| a.as_primitive_opt::<Float64Type>())
        .ok_or_else(|| missing("reward"))?;
    let behavior = batch
        .column_by_name("behavior_logprob")
        .and_then(|a| a.as_primitive_opt::<Float64Type>())
        .ok_or_else(|| missing("behavior_logprob"))?;
    let outcome = batch
        .column_by_name("outcome")
        .and_then(|a| a.as_dictionary_opt::<Int32Type>())
        .ok_or_else(|| missing("outcome"))?;
    let symbols = outcome.values().as_string_opt::<i32>().ok_or_else(|| missing("outcome"))?;
    let newline = match tokenizer.encode("\n")? {
        ids if ids.is_empty() => vec![0],
        ids => ids,
    };
    let mut out = Vec::new();
    for i in 0..batch.num_rows() {
        let completion = tokenizer.encode(completions.value(i))?;
        if completion.is_empty() {
            continue; // nothing to learn from an empty completion
        }
        let mut prompt = tokenizer.encode(prompts.value(i))?;
        let keep = max_tokens.saturating_sub(completion.len()).max(1);
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
        if prompt.is_empty() {
            // The first completion token needs a context to be predicted from.
            prompt = newline.clone();
        }
        let prompt_len = prompt.len();
        let mut tokens = prompt;
        tokens.extend(completion);
        tokens.truncate(max_tokens.max(prompt_len + 1));
        out.push((
            ids.value(i).to_string(),
            Example {
                tokens,
                prompt_len,
                reward: reward.value(i),
                accepted: symbols.value(outcome.keys().value(i) as usize) == "ACCEPTED",
                behavior_logprob: (!behavior.is_null(i)).then(|| behavior.value(i)),
            },
        ));
    }
    Ok(out)
}

/// Whether `suggestion_id` is held out under `salt` and `fraction`.
pub(crate) fn held_out(salt: &str, suggestion_id: &str, fraction: f64) -> bool {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{salt}\\0{suggestion_id}").as_bytes());
    let x = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    x < fraction
}

/// Holdout metrics of an adapter; `base` holds the base model's
/// log-probabilities of the holdout completions.
fn evaluate(
    backend: &mut dyn Backend,
    lora: &LoraAdapter,
    holdout: &[Example],
    base: &[f64],
) -> Result<BTreeMap<String, f64>, TrainerError> {
    let mut m = BTreeMap::new();
    // Log-probability and implicit reward (versus the base) per example.
    let (mut acc, mut rej, mut kl, mut tokens) = (Vec::new(), Vec::new(), 0.0, 0usize);
    let logprobs = backend.completion_logprobs(holdout, Some(lora))?;
    for ((ex, lp), base_lp) in holdout.iter().zip(logprobs).zip(base) {
        let r = lp - base_lp;
        // The holdout was sampled by the serving policy (the base for a
        // first adapter), so `log π_base − log π` averages to KL(base ‖ π):
        // never negative in expectation, large when the adapter has made the
        // text users were shown unlikely.
        kl -= r;
        tokens += ex.tokens.len() - ex.prompt_len;
        if ex.accepted { acc.push((lp, r)) } else { rej.push((lp, r)) }
    }
    let mean = |v: &[(f64, f64)]| v.iter().map(|(lp, _)| lp).sum::<f64>() / v.len().max(1) as f64;
    m.insert("holdout_logprob_accepted".into(), mean(&acc));
    m.insert("holdout_logprob_rejected".into(), mean(&rej));
    m.insert("kl_to_base_per_token".into(), kl / tokens.max(1) as f64);
    let rewards = |v: &[(f64, f64)]| v.iter().map(|(_, r)| *r).collect::<Vec<f64>>();
    if let Some(accuracy) = pairwise_accuracy(&rewards(&acc), &rewards(&rej)) {
        m.insert("implicit_reward_accuracy".into(), accuracy);
    }
    Ok(m)
}

#[derive(Serialize)]
struct MetricsFile<'a> {
    request_id: &'a str,
    code_version: &'a str,
    steps: u64,
    losses: &'a [f64],
    candidate: &'a BTreeMap<String, f64>,
    parent: &'a BTreeMap<String, f64>,
}

/// Where a job stands after a training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Steps in the job.
    pub steps: u64,
    /// Loss of the last step.
    pub loss: f64,
    /// Tokens trained on so far.
    pub tokens: i64,
    /// Time since training started (loading and reading shards excluded).
    pub elapsed: Duration,
}

impl Progress {
    /// Training throughput so far.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Time left at the mean step time so far.
    pub fn eta(&self) -> Duration {
        let per_step = self.elapsed.as_secs_f64() / self.step.max(1) as f64;
        Duration::from_secs_f64(per_step * self.steps.saturating_sub(self.step) as f64)
    }
}

/// Trains `backend` for the objective's steps (warm-up + cosine learning
/// rate, clipping) on batches taken from `train` in order, wrapping
/// around; reports each step. Returns the per-step losses and the tokens
/// seen.
pub fn train_steps(
    backend: &mut dyn Backend,
    train: &[Example],
    o: &TrainingObjective,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(Vec<f64>, i64), TrainerError> {
    train_steps_with(backend, train, o, 0.0, on_step)
}

/// [`train_steps`] with batches that hold at least `positive_share` of
/// accepted examples while the data has them (accepted and other examples
/// each taken in order, wrapping around). When few suggestions are
/// accepted, plain batches hold one or none and REINFORCE's batch-mean
/// baseline then learns from almost nothing; balanced batches reuse the
/// accepted examples across steps instead. 0 takes batches in order.
pub fn train_steps_with(
    backend: &mut dyn Backend,
    train: &[Example],
    o: &TrainingObjective,
    positive_share: f64,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(Vec<f64>, i64), TrainerError> {
    train_steps_until(backend, train, o, positive_share, &|| false, on_step)
}

/// [`train_steps_with`] that stops before the next step once `stop()` is
/// true ([`TrainerError::Cancelled`]): how a shutdown ends a long job.
pub(crate) fn train_steps_until(
    backend: &mut dyn Backend,
    train: &[Example],
    o: &TrainingObjective,
    positive_share: f64,
    stop: &dyn Fn() -> bool,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(Vec<f64>, i64), TrainerError> {
    let objective = match o.kind {
        ObjectiveKind::Reinforce => {
            Objective::Reinforce { kl_coef: o.kl_coef, ppo_clip: o.ppo_clip, reject_floor: o.reject_floor }
        }
        ObjectiveKind::Kto => Objective::Kto {
            beta: o.kto_beta,
            desirable_weight: o.kto_desirable_weight,
            undesirable_weight: o.kto_undesirable_weight,
        },
        ObjectiveKind::Sft => Objective::Sft,
    };
    // Reward-weighted SFT learns only from accepted completions with a
    // positive reward: every other example would cost a forward and a
    // backward pass to contribute a zero gradient.
    let sft_kept: Vec<Example>;
    let train = if o.kind == ObjectiveKind::Sft {
        sft_kept = train.iter().filter(|e| e.accepted && e.reward > 0.0).cloned().collect();
        if sft_kept.is_empty() {
            return Err(TrainerError::Format(
                "SFT needs accepted examples with a positive reward; there are none".into(),
            ));
        }
        &sft_kept[..]
    } else {
        train
    };
    let steps = o.max_steps.max(1) as u64;
    let batch = (o.batch_size.max(1) as usize).min(train.len());
    let mut losses = Vec::new();
    let mut tokens = 0i64;
    let (accepted, others): (Vec<&Example>, Vec<&Example>) = train.iter().partition(|e| e.accepted);
    let wanted = ((positive_share.clamp(0.0, 1.0) * batch as f64).ceil() as usize).min(batch);
    let balanced =
        wanted > 0 && !accepted.is_empty() && !others.is_empty() && accepted.len() < train.len() * wanted / batch;
    let training = Instant::now();
    for step in 0..steps {
        if stop() {
            return Err(TrainerError::Cancelled { after_steps: step });
        }
        let items: Vec<Example> = if balanced {
            let (a0, o0) = (step as usize * wanted, step as usize * (batch - wanted));
            (0..wanted)
                .map(|i| accepted[(a0 + i) % accepted.len()].clone())
                .chain((0..batch - wanted).map(|i| others[(o0 + i) % others.len()].clone()))
                .collect()
        } else {
            let start = (step as usize * batch) % train.len();
            (0..batch).map(|i| train[(start + i) % train.len()].clone()).collect()
        };
        tokens += items.iter().map(|e| e.tokens.len() as i64).sum::<i64>();
        let lr = learning_rate(step, o.warmup_steps.max(0) as u64, steps, o.learning_rate);
        let loss = backend.train_step(
            &items,
            &objective,
            StepSettings { learning_rate: lr, max_grad_norm: o.max_grad_norm },
        )?;
        losses.push(loss);
        on_step(&Progress { step: step + 1, steps, loss, tokens, elapsed: training.elapsed() });
    }
    Ok((losses, tokens))
}

/// Runs one request to completion; returns the candidate and the adapter
/// directory. Errors publish nothing. `on_step` sees every step's progress.
pub fn run_job(
    req: &TrainRequest,
    settings: &JobSettings,
    runtime: &tokio::runtime::Handle,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(ModelCandidate, PathBuf), TrainerError> {
    run_job_until(req, settings, runtime, &|| false, on_step)
}

/// [`run_job`] that gives up before the next training step once `stop()` is
/// true ([`TrainerError::Cancelled`]; nothing is written).
pub(crate) fn run_job_until(
    req: &TrainRequest,
    settings: &JobSettings,
    runtime: &tokio::runtime::Handle,
    stop: &dyn Fn() -> bool,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(ModelCandidate, PathBuf), TrainerError> {
    let started = Instant::now();
    let base_dir = settings.models_root.join(safe_relative(&req.base_model)?);
    let model = Model::load(&base_dir)?;
    let tokenizer = TextTokenizer::load(&base_dir, model.config.vocab_size)?;
    let tenant = safe_relative(&req.tenant)?;
    let o = &req.objective;
    let targets: Vec<&str> = o.target_modules.iter().map(String::as_str).collect();
    let parent = match &req.parent_adapter_version {
        Some(v) => LoraAdapter::load_peft(&settings.adapters_root.join(tenant).join(safe_relative(v)?), &model.config)?,
        None => LoraAdapter::init(&model.config, o.lora_rank.max(1) as usize, o.lora_alpha, &targets, o.seed as u64)?,
    };
    let mut examples = read_examples(req, &tokenizer, settings.max_tokens, runtime)?;
    // A fixed order independent of shard order: by suggestion id.
    examples.sort_by(|a, b| a.0.cmp(&b.0));
    let (holdout, train): (Vec<_>, Vec<_>) =
        examples.into_iter().partition(|(id, _)| held_out(&req.holdout.salt, id, req.holdout.fraction));
    let holdout: Vec<Example> = holdout.into_iter().map(|(_, e)| e).collect();
    let train: Vec<Example> = train.into_iter().map(|(_, e)| e).collect();
    if train.is_empty() {
        return Err(TrainerError::Format(format!("request {} has no training examples", req.request_id)));
    }
    let mut backend = open_backend(settings.device, &model, settings.cpu_precision, parent.clone(), o.weight_decay)?;
    // The backend holds its own (packed) copy of the base.
    let config = model.config.clone();
    drop(model);
    let (losses, tokens) = train_steps_until(backend.as_mut(), &train, o, 0.0, stop, &mut |progress| {
        if progress.step % 10 == 1 || progress.step == progress.steps {
            tracing::info!(
                request = %req.request_id,
                step = progress.step,
                steps = progress.steps,
                loss = progress.loss,
                tokens_per_second = progress.tokens_per_second(),
                eta_seconds = progress.eta().as_secs_f64(),
                "training"
            );
        }
        on_step(progress);
    })?;
    let steps = losses.len() as u64;
    let lora = backend.adapter()?;
    let base = backend.completion_logprobs(&holdout, None)?;
    let candidate_metrics = evaluate(backend.as_mut(), &lora, &holdout, &base)?;
    let parent_metrics = evaluate(backend.as_mut(), &parent, &holdout, &base)?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{}\0{CODE_VERSION}", req.request_id).as_bytes());
    let version = format!("a-{}", &flywheel_core::hex(&digest)[..16]);
    let dir = settings.adapters_root.join(tenant).join(&version);
    lora.save_peft(&dir, &config, &req.base_model)?;
    let metrics = MetricsFile {
        request_id: &req.request_id,
        code_version: CODE_VERSION,
        steps,
        losses: &losses,
        candidate: &candidate_metrics,
        parent: &parent_metrics,
    };
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| TrainerError::Format(e.to_string()))?;
    std::fs::write(dir.join("metrics.json"), json).map_err(|e| TrainerError::io(&dir.join("metrics.json"), e))?;
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).map_err(|e| TrainerError::io(&dir, e))?;
    let kl = candidate_metrics.get("kl_to_base_per_token").copied().unwrap_or_default()
        - parent_metrics.get("kl_to_base_per_token").copied().unwrap_or_default();
    let candidate = ModelCandidate {
        adapter_version: version,
        request_id: req.request_id.clone(),
        tenant: req.tenant.clone(),
        base_model: req.base_model.clone(),
        parent_adapter_version: req.parent_adapter_version.clone(),
        adapter_uri: dir.display().to_string(),
        adapter_sha256: flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&weights)),
        objective: o.kind,
        train_examples: train.len() as i64,
        holdout_examples: holdout.len() as i64,
        steps: steps as i32,
        tokens,
        train_seconds: started.elapsed().as_secs_f64(),
        device: backend.device().into(),
        candidate_metrics,
        parent_metrics,
        kl_to_parent: kl,
        created_at: flywheel_core::now_millis(),
    };
    Ok((candidate, dir))
}
