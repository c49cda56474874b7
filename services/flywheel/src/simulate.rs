//! `flywheel simulate`: a synthetic product whose users have hidden
//! preferences. For each request it asks the collector's `/v1/route` which
//! version to serve, generates a completion from that version (the base
//! model plus adapter, on the CPU, in process; the requests that arrived
//! meanwhile are decoded together) and sends what the user does (shown, then
//! accepted or rejected, sometimes rated or edited) to `/v1/events` when it
//! happens.
//!
//! Two products: the *chat* product for a real chat model
//! ([`crate::chat_product`]: everyday questions, users who judge properties
//! of the answer text), and the *characters* product for the tiny model
//! described here.
//!
//! The characters task: every user likes a personal subset of a shared "house style"
//! alphabet, and each liked character in a suggestion raises the chance of
//! accepting it. A random base model emits liked characters rarely, so the
//! base accept rate is low but not zero (about 20 % at the defaults) and
//! there is signal to learn from; an adapter that emits them more is
//! accepted more. Label noise replaces a share of decisions by a coin flip;
//! ratings always follow the true preference, so noise shows up as
//! rating/outcome disagreement.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use flywheel_trainer::SplitMix;
use flywheel_trainer::cpu::engine::CpuModel;
use flywheel_trainer::cpu::gemm::{Precision, PrecisionChoice};
use flywheel_trainer::cpu::generate::{GenerateRequest, Sampling};
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::{LlamaConfig, Model};
use flywheel_trainer::tokenize::TextTokenizer;
use tokio_util::sync::CancellationToken;

use crate::CliError;
use crate::http::request;

/// The shared alphabet users draw their tastes from.
pub(crate) const HOUSE_STYLE: &[u8] = b"etaoinsrhl";

/// `flywheel simulate` settings.
#[derive(Debug, Clone, Args)]
pub(crate) struct SimulateArgs {
    /// The collector's API address.
    #[arg(long, env = "FLYWHEEL_SIM_COLLECTOR", default_value = "127.0.0.1:8080")]
    pub(crate) collector: SocketAddr,
    /// Bearer token of the tenant to simulate.
    #[arg(long, env = "FLYWHEEL_SIM_TOKEN", default_value = "demo-token-change-me-0001")]
    pub(crate) token: String,
    /// Models: `<root>/<base model>/` (config, weights, tokenizer).
    #[arg(long, env = "FLYWHEEL_SIM_MODELS_ROOT", default_value = ".flywheel/models")]
    pub(crate) models_root: PathBuf,
    /// The simulated product.
    #[command(flatten)]
    pub(crate) product: ProductArgs,
}

/// Which simulated product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProductKind {
    /// `chat` when the base model has a chat template, else `characters`.
    #[default]
    Auto,
    /// Users who like certain characters (the tiny model's task).
    Characters,
    /// An assistant answering everyday questions, judged on its text.
    Chat,
}

/// The simulated product and its users (also flags of `flywheel up`).
#[derive(Debug, Clone, Args)]
pub struct ProductArgs {
    /// Which product to simulate.
    #[arg(long = "product", env = "FLYWHEEL_SIM_PRODUCT", value_enum, default_value_t = ProductKind::Auto)]
    pub(crate) product: ProductKind,
    /// Base model served (as the collector's route answers it).
    #[arg(long, env = "FLYWHEEL_SIM_BASE_MODEL", default_value = "flywheel/tiny")]
    pub(crate) base_model: String,
    /// Simulated users.
    #[arg(long, env = "FLYWHEEL_SIM_USERS", default_value_t = 200)]
    pub(crate) users: usize,
    /// Suggestion requests per second (Poisson arrivals).
    #[arg(long, env = "FLYWHEEL_SIM_RATE", default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// How much each liked character raises the chance of accepting (0–1).
    #[arg(long, env = "FLYWHEEL_SIM_PREFERENCE_STRENGTH", default_value_t = 0.3)]
    pub(crate) preference_strength: f64,
    /// Share of decisions replaced by a coin flip (0–1).
    #[arg(long, env = "FLYWHEEL_SIM_LABEL_NOISE", default_value_t = 0.0)]
    pub(crate) label_noise: f64,
    /// Share of suggestions the user rates (1–5 stars).
    #[arg(long, env = "FLYWHEEL_SIM_RATING_SHARE", default_value_t = 0.15)]
    pub(crate) rating_share: f64,
    /// Completion length in tokens: exactly this for `characters`, at most
    /// this for `chat` (default 8 and 40).
    #[arg(long, env = "FLYWHEEL_SIM_COMPLETION_TOKENS")]
    pub(crate) completion_tokens: Option<usize>,
    /// Most requests decoded together.
    #[arg(long, env = "FLYWHEEL_SIM_BATCH_MAX", default_value_t = 48)]
    pub(crate) batch_max: usize,
    /// Seed of users, prompts and sampling.
    #[arg(long, env = "FLYWHEEL_SIM_SEED", default_value_t = 7)]
    pub seed: u64,
    /// Stop after this many requests (0: until interrupted).
    #[arg(long, env = "FLYWHEEL_SIM_REQUESTS", default_value_t = 0)]
    pub(crate) requests: u64,
}

/// One simulated user.
#[derive(Debug, Clone)]
pub struct User {
    /// Product user id.
    pub(crate) id: String,
    /// Which bytes this user likes (the tiny model's task).
    pub(crate) likes: [bool; 256],
    /// Properties of answer text this user likes and how much (the chat
    /// product's task, [`crate::chat_product`]).
    pub tastes: Vec<(crate::chat_product::Property, f64)>,
}

/// The population, drawn from a seed.
pub(crate) fn population(users: usize, seed: u64) -> Vec<User> {
    let mut rng = SplitMix(seed ^ 0x5EED_0F05_E125);
    (0..users)
        .map(|i| {
            let mut likes = [false; 256];
            // Each user likes 7 of the 10 house-style characters.
            let mut pool = HOUSE_STYLE.to_vec();
            for _ in 0..3 {
                pool.swap_remove(rng.below(pool.len() as u64) as usize);
            }
            pool.iter().for_each(|&b| likes[b as usize] = true);
            User { id: format!("sim-user-{i:05}"), likes, tastes: Vec::new() }
        })
        .collect()
}

/// The chance `user` accepts `completion`: 2 % floor, and each liked
/// character independently convinces with probability `strength`.
pub(crate) fn accept_probability(user: &User, completion: &[u8], strength: f64) -> f64 {
    let liked = completion.iter().filter(|&&b| user.likes[b as usize]).count() as i32;
    1.0 - 0.98 * (1.0 - strength.clamp(0.0, 1.0)).powi(liked)
}

/// Training settings the demo's trigger policy uses for the simulated
/// product (checked to learn its task by this module's tests).
pub(crate) fn demo_objective() -> flywheel_trigger::policy::ObjectiveSettings {
    flywheel_trigger::policy::ObjectiveSettings {
        kind: Some(flywheel_core::records::ObjectiveKind::Reinforce),
        lora_rank: Some(8),
        lora_alpha: Some(16.0),
        target_modules: Some(["q_proj", "v_proj", "o_proj", "down_proj"].map(String::from).into()),
        learning_rate: Some(2e-2),
        weight_decay: None,
        warmup_steps: Some(5),
        max_steps: Some(60),
        batch_size: Some(32),
        max_grad_norm: Some(1.0),
        kl_coef: Some(0.0),
        ppo_clip: None,
        reject_floor: None,
        kto_beta: None,
    }
}

/// Prompts of the simulated product (the preference ignores them).
const PROMPTS: &[&str] = &["fn main() {\n    ", "let total = ", "// TODO: ", "def handle(request):\n    ", "SELECT "];

/// What the user did with one suggestion.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Accepted (else rejected).
    pub accepted: bool,
    /// Stars 1–5 when rated.
    pub(crate) rating: Option<f64>,
    /// Time from shown to the decision.
    pub(crate) decision_ms: i64,
    /// Edited final text after an accept.
    pub(crate) edited: Option<String>,
}

/// Draws the user's reaction to `completion`, which they like with
/// probability `p`.
pub fn react(p: f64, completion: &str, args: &ProductArgs, rng: &mut SplitMix) -> Outcome {
    let liked = rng.unit() < p;
    let accepted = if rng.unit() < args.label_noise { rng.unit() < 0.5 } else { liked };
    // Ratings say what the user really thought (noise is in the clicks
    // only), so noisy clicks show up as rating/outcome disagreement.
    let stars = rng.unit().round();
    let rating = (rng.unit() < args.rating_share).then_some(if liked { 4.0 + stars } else { 1.0 + stars });
    let edited = (accepted && rng.unit() < 0.1).then(|| completion.trim_end().to_string());
    Outcome { accepted, rating, decision_ms: 300 + (rng.unit() * 2500.0) as i64, edited }
}

/// Counts per served version, as the simulated users saw them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SimStats {
    /// Requests served.
    pub(crate) requests: u64,
    /// Events the collector accepted.
    pub(crate) events: u64,
    /// Requests or batches that failed (the collector down, a 4xx/5xx).
    pub(crate) errors: u64,
    /// (shown, accepted) per version ("base" or the adapter version).
    pub(crate) by_version: BTreeMap<String, (u64, u64)>,
}

impl SimStats {
    /// Accept rate of a version as the users saw it.
    pub(crate) fn accept_rate(&self, version: &str) -> Option<f64> {
        self.by_version.get(version).filter(|(s, _)| *s > 0).map(|(s, a)| *a as f64 / *s as f64)
    }

    /// Counts a failed exchange with the collector; logs it at the 1st, 2nd,
    /// 4th, 8th, ... failure: visible, not a flood.
    fn failure(&mut self, what: &str, detail: &dyn std::fmt::Display) {
        self.errors += 1;
        if self.errors.is_power_of_two() {
            tracing::warn!(errors = self.errors, %detail, "{what}");
        }
    }
}

/// Posts `events` to the collector in one batch and counts the outcome.
async fn post_events(
    args: &SimulateArgs,
    headers: &[(&str, &str)],
    events: Vec<serde_json::Value>,
    stats: &mut SimStats,
) -> Result<(), CliError> {
    if events.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(&events).map_err(|e| CliError::Usage(e.to_string()))?;
    match request(args.collector, "POST", "/v1/events", headers, body).await {
        Ok(r) if r.status < 300 => stats.events += events.len() as u64,
        Ok(r) => stats.failure("events refused", &format!("{}: {}", r.status, String::from_utf8_lossy(&r.body))),
        Err(e) => stats.failure("collector unreachable; events dropped", &e),
    }
    Ok(())
}

struct Due {
    at: Instant,
    event: serde_json::Value,
}

/// A completion as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The text as recorded in the `shown` event (for the chat product, with
    /// the end-of-turn marker when the model ended its turn, so training
    /// sees where it stopped).
    pub(crate) recorded: String,
    /// The text the user reads.
    pub shown: String,
    /// Behaviour log-probability (temperature 1, whole vocabulary).
    pub(crate) logprob: f64,
    /// Whether the model ended its turn (else it hit the length limit).
    pub finished: bool,
}

/// The serving side: base model (packed for serving), tokenizer, adapters
/// by version, and the product's decoding settings.
#[derive(Debug)]
pub struct Server {
    model: CpuModel,
    /// The base model's config (adapters are checked against it).
    pub(crate) config: LlamaConfig,
    /// The base model's tokenizer.
    pub tokenizer: TextTokenizer,
    adapters: HashMap<String, Arc<LoraAdapter>>,
    /// The product served.
    pub kind: ProductKind,
    /// Tokens the characters product may show (printable ASCII).
    allowed: Vec<bool>,
    /// The chat product's end-of-turn token.
    end_of_turn: Option<(u32, String)>,
}

impl Server {
    /// Loads `<models_root>/<base_model>`, stored as `auto` picks on this
    /// CPU; `kind` `Auto` becomes `Chat` when the model has a chat template.
    pub fn load(models_root: &Path, base_model: &str, kind: ProductKind) -> Result<Server, CliError> {
        Self::load_in(models_root, base_model, kind, PrecisionChoice::Auto.resolve())
    }

    /// [`Server::load`] with the base stored in `precision` (a test that
    /// compares sampled outcomes needs the same numbers on every CPU).
    pub fn load_in(
        models_root: &Path,
        base_model: &str,
        kind: ProductKind,
        precision: Precision,
    ) -> Result<Server, CliError> {
        let dir = models_root.join(base_model);
        let model = Model::load(&dir).map_err(|e| CliError::Usage(format!("simulator base model: {e}")))?;
        let tokenizer = TextTokenizer::load(&dir, model.config.vocab_size)
            .map_err(|e| CliError::Usage(format!("simulator tokenizer: {e}")))?;
        let kind = match kind {
            ProductKind::Auto if tokenizer.has_chat_template() => ProductKind::Chat,
            ProductKind::Auto => ProductKind::Characters,
            k => k,
        };
        let end_of_turn = match kind {
            ProductKind::Chat => {
                let marker = "<|im_end|>";
                let id = tokenizer.token_id(marker).ok_or_else(|| {
                    CliError::Usage(format!("the chat product needs a model with the {marker} token"))
                })?;
                Some((id, marker.to_string()))
            }
            _ => None,
        };
        // The characters product shows printable ASCII only.
        let allowed = match kind {
            ProductKind::Characters => (0..model.config.vocab_size)
                .map(|id| {
                    tokenizer
                        .decode(&[id as u32])
                        .is_ok_and(|t| t.len() == 1 && t.bytes().all(|b| (32..127).contains(&b)))
                })
                .collect(),
            _ => Vec::new(),
        };
        let packed = CpuModel::for_serving(&model, precision)
            .map_err(|e| CliError::Usage(format!("simulator base model: {e}")))?;
        Ok(Server {
            model: packed,
            config: model.config,
            tokenizer,
            adapters: HashMap::new(),
            kind,
            allowed,
            end_of_turn,
        })
    }

    /// The adapter at `uri`, loaded once per version.
    pub(crate) fn adapter(&mut self, version: &str, uri: &str) -> Result<Arc<LoraAdapter>, CliError> {
        if let Some(a) = self.adapters.get(version) {
            return Ok(a.clone());
        }
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        let a = LoraAdapter::load_peft(Path::new(path), &self.config)
            .map_err(|e| CliError::Usage(format!("adapter {version} at {uri}: {e}")))?;
        let a = Arc::new(a);
        self.adapters.insert(version.to_string(), a.clone());
        Ok(a)
    }

    /// The prompt text for a user request (the chat product wraps the
    /// question in the model's chat template).
    pub fn prompt(&self, request: &str) -> Result<String, CliError> {
        match self.kind {
            ProductKind::Chat => {
                self.tokenizer.chat_prompt(&[("user", request)]).map_err(|e| CliError::Usage(e.to_string()))
            }
            _ => Ok(request.to_string()),
        }
    }

    /// A request (question or code prefix) of the product, drawn from `rng`.
    pub(crate) fn draw_request(&self, rng: &mut SplitMix) -> &'static str {
        match self.kind {
            ProductKind::Chat => {
                crate::chat_product::PROMPTS[rng.below(crate::chat_product::PROMPTS.len() as u64) as usize]
            }
            _ => PROMPTS[rng.below(PROMPTS.len() as u64) as usize],
        }
    }

    /// The default completion length of the product.
    pub fn completion_tokens(&self, args: &ProductArgs) -> usize {
        args.completion_tokens.unwrap_or(if self.kind == ProductKind::Chat { 40 } else { 8 })
    }

    /// Generates completions for `(prompt, adapter, seed)` requests together.
    pub fn complete_batch(
        &self,
        requests: &[(String, Option<Arc<LoraAdapter>>, u64)],
        tokens: usize,
    ) -> Result<Vec<Completion>, CliError> {
        let ids: Vec<Vec<u32>> = requests
            .iter()
            .map(|(p, _, _)| self.tokenizer.encode(p).map_err(|e| CliError::Usage(e.to_string())))
            .collect::<Result<_, _>>()?;
        let stop: Vec<u32> = self.end_of_turn.iter().map(|(id, _)| *id).collect();
        let sampling = |seed| match self.kind {
            // Lively but not wild: a small model sampled at 1.0 rambles.
            ProductKind::Chat => Sampling { temperature: 0.8, top_p: 0.95, seed },
            _ => Sampling { temperature: 1.0, top_p: 1.0, seed },
        };
        let batch: Vec<GenerateRequest<'_>> = requests
            .iter()
            .zip(&ids)
            .map(|((_, adapter, seed), prompt)| GenerateRequest {
                prompt,
                adapter: adapter.as_deref(),
                max_new_tokens: tokens,
                sampling: sampling(*seed),
                stop: &stop,
                allowed: (!self.allowed.is_empty()).then_some(self.allowed.as_slice()),
            })
            .collect();
        let out = self.model.generate(&batch).map_err(|e| CliError::Usage(format!("generating: {e}")))?;
        out.into_iter()
            .map(|g| {
                let body: Vec<u32> = g.tokens.iter().copied().filter(|t| !stop.contains(t)).collect();
                let shown = self.tokenizer.decode(&body).map_err(|e| CliError::Usage(e.to_string()))?;
                let recorded = match (&self.end_of_turn, g.stopped) {
                    (Some((_, marker)), true) => format!("{shown}{marker}"),
                    _ => shown.clone(),
                };
                Ok(Completion { recorded, shown, logprob: g.logprob, finished: g.stopped })
            })
            .collect()
    }

    /// A training example of `completion` served for `prompt`, with the
    /// in-process rounds' rewards (0.75 accepted, −0.25 not) and its
    /// log-probability at serving time.
    pub fn example(
        &self,
        prompt: &str,
        completion: &Completion,
        accepted: bool,
    ) -> Result<flywheel_trainer::objective::Example, CliError> {
        let encode = |text: &str| self.tokenizer.encode(text).map_err(|e| CliError::Usage(e.to_string()));
        let mut tokens = encode(prompt)?;
        let prompt_len = tokens.len();
        tokens.extend(encode(&completion.recorded)?);
        Ok(flywheel_trainer::objective::Example {
            tokens,
            prompt_len,
            reward: if accepted { 0.75 } else { -0.25 },
            accepted,
            behavior_logprob: Some(completion.logprob),
        })
    }

    /// The chance `user` accepts `completion` to `request` in this product.
    pub fn accept_probability(&self, user: &User, request: &str, completion: &Completion, args: &ProductArgs) -> f64 {
        match self.kind {
            ProductKind::Chat => {
                crate::chat_product::accept_probability(&user.tastes, request, &completion.shown, completion.finished)
            }
            _ => accept_probability(user, completion.shown.as_bytes(), args.preference_strength),
        }
    }

    /// The product's users.
    pub fn population(&self, args: &ProductArgs) -> Vec<User> {
        match self.kind {
            ProductKind::Chat => crate::chat_product::chat_population(args.users.max(1), args.seed),
            _ => population(args.users.max(1), args.seed),
        }
    }
}

/// A version-4-shaped UUID from the simulation's generator (reproducible).
fn uuid(rng: &mut SplitMix) -> String {
    let (a, b) = (rng.next_u64(), rng.next_u64());
    let b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0x0FFF,
        b >> 48,
        b & 0xFFFF_FFFF_FFFF
    )
}

fn event(id: String, user: &str, suggestion: &str, at_ms: i64, payload: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "event_id": id,
        "event_time": at_ms,
        "user_id": user,
        "session_id": format!("{user}-session"),
        "suggestion_id": suggestion,
        "payload": payload,
        "attributes": {"client": "flywheel-simulate"},
    })
}

/// `flywheel simulate`: the product until `shutdown` or `--requests`, then
/// the accept rate per served version.
pub(crate) async fn simulate_command(args: &SimulateArgs, shutdown: CancellationToken) -> Result<(), CliError> {
    let stats = simulate(args, shutdown, |s| {
        tracing::info!(requests = s.requests, events = s.events, errors = s.errors, "simulating")
    })
    .await?;
    for (version, (shown, _)) in &stats.by_version {
        let rate = stats.accept_rate(version).unwrap_or(f64::NAN);
        println!("{version}: {shown} shown, accept rate {rate:.3}");
    }
    Ok(())
}

/// Runs the simulated product until `shutdown` or `args.requests`; calls
/// `on_tick` about once a second with the counts so far.
pub(crate) async fn simulate(
    args: &SimulateArgs,
    shutdown: CancellationToken,
    mut on_tick: impl FnMut(&SimStats),
) -> Result<SimStats, CliError> {
    let product = &args.product;
    let mut server = Server::load(&args.models_root, &product.base_model, product.product)?;
    let users = server.population(product);
    let tokens = server.completion_tokens(product);
    let mut rng = SplitMix(product.seed);
    let mut stats = SimStats::default();
    let mut pending: Vec<Due> = Vec::new();
    let auth = format!("Bearer {}", args.token);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let run_id = format!("{:08x}", rng.next_u64() as u32);
    let mut next_request = Instant::now();
    let mut last_tick = Instant::now();
    let limit = |done: u64| product.requests == 0 || done < product.requests;
    while !shutdown.is_cancelled() && limit(stats.requests) {
        if last_tick.elapsed() >= Duration::from_secs(1) {
            on_tick(&stats);
            last_tick = Instant::now();
        }
        // Every request that has arrived (Poisson arrivals at `rate`) is
        // routed, then all are decoded together.
        let mut arrived = Vec::new();
        while Instant::now() >= next_request
            && arrived.len() < product.batch_max.max(1)
            && limit(stats.requests + arrived.len() as u64)
        {
            next_request += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / product.rate.max(0.01));
            let user = rng.pick(&users);
            let path = format!("/v1/route?user_id={}&surface=editor&base_model={}", user.id, product.base_model);
            let routed = match request(args.collector, "GET", &path, &headers[..1], Vec::new()).await {
                Ok(r) if r.status == 200 => r.json(),
                Ok(r) => {
                    stats.failure("route refused", &format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)));
                    continue;
                }
                Err(e) => {
                    stats.failure("collector unreachable", &e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let version = routed["adapter_version"].as_str().map(str::to_string);
            let adapter = match (&version, routed["adapter_uri"].as_str()) {
                (Some(v), Some(uri)) => Some(server.adapter(v, uri)?),
                _ => None,
            };
            let asked = server.draw_request(&mut rng);
            let prompt = server.prompt(asked)?;
            arrived.push((user, routed, version, adapter, asked, prompt, rng.next_u64()));
        }
        if !arrived.is_empty() {
            let batch: Vec<(String, Option<Arc<LoraAdapter>>, u64)> =
                arrived.iter().map(|(_, _, _, a, _, p, seed)| (p.clone(), a.clone(), *seed)).collect();
            let completions = tokio::task::block_in_place(|| server.complete_batch(&batch, tokens))?;
            let now = Instant::now();
            for ((user, routed, version, _, asked, prompt, _), completion) in arrived.into_iter().zip(completions) {
                let p = server.accept_probability(user, asked, &completion, product);
                let outcome = react(p, &completion.shown, product, &mut rng);
                stats.requests += 1;
                let counts = stats.by_version.entry(version.clone().unwrap_or_else(|| "base".into())).or_default();
                counts.0 += 1;
                counts.1 += u64::from(outcome.accepted);
                let suggestion = format!("sim-{run_id}-{:08}", stats.requests);
                let shown_at = flywheel_core::now_millis();
                let shown = serde_json::json!({"shown": {
                    "model_id": routed["model_id"],
                    "adapter_version": version,
                    "experiment_arm": routed["experiment_arm"],
                    "surface": "editor",
                    "prompt": prompt,
                    "completion": completion.recorded,
                    "behavior_logprob": completion.logprob,
                    "latency_ms": 40 + (rng.unit() * 80.0) as i64,
                }});
                // Each event is sent when it happens: `delay` ms after the suggestion was shown.
                let mut schedule = |delay: i64, payload: serde_json::Value| {
                    let at = now + Duration::from_millis(delay as u64);
                    pending.push(Due {
                        at,
                        event: event(uuid(&mut rng), &user.id, &suggestion, shown_at + delay, payload),
                    });
                };
                schedule(0, shown);
                let decided = outcome.decision_ms;
                schedule(
                    decided,
                    if outcome.accepted {
                        serde_json::json!({"accepted": {"time_to_accept_ms": decided}})
                    } else {
                        serde_json::json!({"rejected": {"reason": "escape_key"}})
                    },
                );
                if let Some(text) = outcome.edited {
                    let distance = completion.shown.len().abs_diff(text.len()) as i64;
                    schedule(
                        decided + 500,
                        serde_json::json!({"edited": {"final_text": text, "edit_distance": distance}}),
                    );
                }
                if let Some(score) = outcome.rating {
                    schedule(
                        decided + 700,
                        serde_json::json!({"rated": {"score": score, "scale_min": 1.0, "scale_max": 5.0}}),
                    );
                }
            }
        }
        // Send what is due, in one batch.
        let now = Instant::now();
        let (due, later): (Vec<Due>, Vec<Due>) = std::mem::take(&mut pending).into_iter().partition(|d| d.at <= now);
        pending = later;
        post_events(args, &headers, due.into_iter().map(|d| d.event).collect(), &mut stats).await?;
        let wait = next_request.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
        tokio::time::sleep(wait).await;
    }
    // Interrupted: what users already did is sent now rather than lost.
    post_events(args, &headers, pending.into_iter().map(|d| d.event).collect(), &mut stats).await?;
    on_tick(&stats);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_trainer::backend::{Backend, CpuBackend};

    fn args() -> ProductArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: ProductArgs,
        }
        Wrap::parse_from(["x"]).a
    }

    /// Expected accept rate of `adapter` over `n` fresh suggestions.
    fn expected_accept(
        server: &Server,
        users: &[User],
        adapter: Option<&Arc<LoraAdapter>>,
        n: usize,
        seed: u64,
    ) -> f64 {
        let a = args();
        let requests: Vec<(String, Option<Arc<LoraAdapter>>, u64)> =
            (0..n).map(|i| (PROMPTS[i % PROMPTS.len()].to_string(), adapter.cloned(), seed + i as u64)).collect();
        let done = server.complete_batch(&requests, server.completion_tokens(&a)).unwrap();
        let users_at = |i: usize| &users[i % users.len()];
        done.iter().enumerate().map(|(i, c)| server.accept_probability(users_at(i), &requests[i].0, c, &a)).sum::<f64>()
            / n as f64
    }

    #[test]
    fn the_base_accept_rate_is_low_but_not_zero_and_training_on_the_feedback_raises_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = flywheel_trainer::tiny::tiny_model(7).unwrap();
        flywheel_trainer::tiny::save(&model, &dir.path().join("flywheel/tiny")).unwrap();
        // Served in f32, as the adapter below is trained: the same sampled
        // outcomes on every CPU (`auto` serves bf16 on AMD Zen 4 and
        // bf16-stored weights on Intel; measured on Zen 4: 0.18 -> 0.33 in
        // f32, 0.18 -> 0.27 served in bf16 with the f32-trained adapter).
        let server = Server::load_in(dir.path(), "flywheel/tiny", ProductKind::Auto, Precision::F32).unwrap();
        assert_eq!(server.kind, ProductKind::Characters, "the tiny model has no chat template");
        let users = server.population(&args());
        let a = args();
        let base = expected_accept(&server, &users, None, 300, 1);
        assert!((0.08..0.35).contains(&base), "base accept rate {base}");

        // One round of the flywheel, in process: serve, observe, train.
        let mut rng = SplitMix(5);
        let requests: Vec<(String, Option<Arc<LoraAdapter>>, u64)> =
            (0..1200).map(|i| (PROMPTS[i % PROMPTS.len()].to_string(), None, rng.next_u64())).collect();
        let served = server.complete_batch(&requests, server.completion_tokens(&a)).unwrap();
        let mut examples = Vec::new();
        for (i, ((prompt, _, _), c)) in requests.iter().zip(&served).enumerate() {
            let p = server.accept_probability(&users[i % users.len()], prompt, c, &a);
            let outcome = react(p, &c.shown, &a, &mut rng);
            examples.push(server.example(prompt, c, outcome.accepted).unwrap());
        }
        let mut objective = flywheel_trigger::service::default_objective(1);
        demo_objective().apply(&mut objective);
        let lora = LoraAdapter::init(
            &server.config,
            objective.lora_rank as usize,
            objective.lora_alpha,
            &objective.target_modules.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .unwrap();
        let mut backend = CpuBackend::new(&model, PrecisionChoice::F32, lora, objective.weight_decay).unwrap();
        flywheel_trainer::job::train_steps(&mut backend, &examples, &objective, &mut |_| {}).unwrap();
        let trained = Arc::new(backend.adapter().unwrap());
        let after = expected_accept(&server, &users, Some(&trained), 300, 1);
        eprintln!("accept rate: base {base:.3}, after one round {after:.3}");
        assert!(after > base + 0.1, "accept rate {base:.3} -> {after:.3}");
    }
}
