//! `flywheel simulate`: a synthetic product whose users have hidden
//! preferences. For each request it asks the collector's `/v1/route` which
//! version to serve, samples a completion from that version (the base model
//! plus adapter, on the CPU, in process) and sends what the user does
//! (shown, then accepted or rejected, sometimes rated or edited) to
//! `/v1/events` when it happens.
//!
//! The task: every user likes a personal subset of a shared "house style"
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
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;
use flywheel_trainer::sample::sample;
use flywheel_trainer::tokenize::TextTokenizer;
use tokio_util::sync::CancellationToken;

use crate::CliError;
use crate::http::request;

/// The shared alphabet users draw their tastes from.
pub const HOUSE_STYLE: &[u8] = b"etaoinsrhl";

/// `flywheel simulate` settings.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// The collector's API address.
    #[arg(long, env = "FLYWHEEL_SIM_COLLECTOR", default_value = "127.0.0.1:8080")]
    pub collector: SocketAddr,
    /// Bearer token of the tenant to simulate.
    #[arg(long, env = "FLYWHEEL_SIM_TOKEN", default_value = "demo-token-change-me-0001")]
    pub token: String,
    /// Models: `<root>/<base model>/` (config, weights, tokenizer).
    #[arg(long, env = "FLYWHEEL_SIM_MODELS_ROOT", default_value = ".flywheel/models")]
    pub models_root: PathBuf,
    /// The simulated product.
    #[command(flatten)]
    pub product: ProductArgs,
}

/// The simulated product and its users (also flags of `flywheel up`).
#[derive(Debug, Clone, Args)]
pub struct ProductArgs {
    /// Base model served (as the collector's route answers it).
    #[arg(long, env = "FLYWHEEL_SIM_BASE_MODEL", default_value = "flywheel/tiny")]
    pub base_model: String,
    /// Simulated users.
    #[arg(long, env = "FLYWHEEL_SIM_USERS", default_value_t = 200)]
    pub users: usize,
    /// Suggestion requests per second (Poisson arrivals).
    #[arg(long, env = "FLYWHEEL_SIM_RATE", default_value_t = 20.0)]
    pub rate: f64,
    /// How much each liked character raises the chance of accepting (0–1).
    #[arg(long, env = "FLYWHEEL_SIM_PREFERENCE_STRENGTH", default_value_t = 0.3)]
    pub preference_strength: f64,
    /// Share of decisions replaced by a coin flip (0–1).
    #[arg(long, env = "FLYWHEEL_SIM_LABEL_NOISE", default_value_t = 0.0)]
    pub label_noise: f64,
    /// Share of suggestions the user rates (1–5 stars).
    #[arg(long, env = "FLYWHEEL_SIM_RATING_SHARE", default_value_t = 0.15)]
    pub rating_share: f64,
    /// Completion length in tokens.
    #[arg(long, env = "FLYWHEEL_SIM_COMPLETION_TOKENS", default_value_t = 8)]
    pub completion_tokens: usize,
    /// Seed of users, prompts and sampling.
    #[arg(long, env = "FLYWHEEL_SIM_SEED", default_value_t = 7)]
    pub seed: u64,
    /// Stop after this many requests (0: until interrupted).
    #[arg(long, env = "FLYWHEEL_SIM_REQUESTS", default_value_t = 0)]
    pub requests: u64,
}

/// One simulated user.
#[derive(Debug, Clone)]
pub struct User {
    /// Product user id.
    pub id: String,
    /// Which bytes this user likes.
    pub likes: [bool; 256],
}

/// The population, drawn from a seed.
pub fn population(users: usize, seed: u64) -> Vec<User> {
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
            User { id: format!("sim-user-{i:05}"), likes }
        })
        .collect()
}

/// The chance `user` accepts `completion`: 2 % floor, and each liked
/// character independently convinces with probability `strength`.
pub fn accept_probability(user: &User, completion: &[u8], strength: f64) -> f64 {
    let liked = completion.iter().filter(|&&b| user.likes[b as usize]).count() as i32;
    1.0 - 0.98 * (1.0 - strength.clamp(0.0, 1.0)).powi(liked)
}

/// Training settings the demo's trigger policy uses for the simulated
/// product (checked to learn its task by this module's tests).
pub fn demo_objective() -> flywheel_trigger::policy::ObjectiveSettings {
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
    pub rating: Option<f64>,
    /// Time from shown to the decision.
    pub decision_ms: i64,
    /// Edited final text after an accept.
    pub edited: Option<String>,
}

/// Draws the user's reaction to `completion`.
pub fn react(user: &User, completion: &str, args: &ProductArgs, rng: &mut SplitMix) -> Outcome {
    let p = accept_probability(user, completion.as_bytes(), args.preference_strength);
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
pub struct SimStats {
    /// Requests served.
    pub requests: u64,
    /// Events the collector accepted.
    pub events: u64,
    /// Requests or batches that failed (the collector down, a 4xx/5xx).
    pub errors: u64,
    /// (shown, accepted) per version ("base" or the adapter version).
    pub by_version: BTreeMap<String, (u64, u64)>,
}

impl SimStats {
    /// Accept rate of a version as the users saw it.
    pub fn accept_rate(&self, version: &str) -> Option<f64> {
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

/// The serving side: base model, tokenizer and adapters by version.
#[derive(Debug)]
pub struct Server {
    model: Arc<Model>,
    tokenizer: TextTokenizer,
    adapters: HashMap<String, Arc<LoraAdapter>>,
    allowed: Vec<bool>,
}

impl Server {
    /// Loads `<models_root>/<base_model>`.
    pub fn load(models_root: &Path, base_model: &str) -> Result<Server, CliError> {
        let dir = models_root.join(base_model);
        let model = Model::load(&dir).map_err(|e| CliError::Usage(format!("simulator base model: {e}")))?;
        let tokenizer = TextTokenizer::load(&dir, model.config.vocab_size)
            .map_err(|e| CliError::Usage(format!("simulator tokenizer: {e}")))?;
        // The product shows printable ASCII only.
        let allowed = (0..model.config.vocab_size)
            .map(|id| {
                tokenizer.decode(&[id as u32]).is_ok_and(|t| t.len() == 1 && t.bytes().all(|b| (32..127).contains(&b)))
            })
            .collect();
        Ok(Server { model: Arc::new(model), tokenizer, adapters: HashMap::new(), allowed })
    }

    /// The adapter at `uri`, loaded once per version.
    pub fn adapter(&mut self, version: &str, uri: &str) -> Result<Arc<LoraAdapter>, CliError> {
        if let Some(a) = self.adapters.get(version) {
            return Ok(a.clone());
        }
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        let a = LoraAdapter::load_peft(Path::new(path), &self.model.config)
            .map_err(|e| CliError::Usage(format!("adapter {version} at {uri}: {e}")))?;
        let a = Arc::new(a);
        self.adapters.insert(version.to_string(), a.clone());
        Ok(a)
    }

    /// Samples a completion for `prompt`; returns its text and behaviour log-probability.
    pub fn complete(
        &self,
        prompt: &str,
        adapter: Option<&LoraAdapter>,
        tokens: usize,
        rng: &mut SplitMix,
    ) -> Result<(String, f64), CliError> {
        let ids = self.tokenizer.encode(prompt).map_err(|e| CliError::Usage(e.to_string()))?;
        let s = sample(&self.model, adapter, &ids, tokens, 1.0, &self.allowed, rng)
            .map_err(|e| CliError::Usage(format!("sampling: {e}")))?;
        let text = self.tokenizer.decode(&s.tokens).map_err(|e| CliError::Usage(e.to_string()))?;
        Ok((text, s.logprob))
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

/// Runs the simulated product until `shutdown` or `args.requests`; calls
/// `on_tick` about once a second with the counts so far.
pub async fn simulate(
    args: &SimulateArgs,
    shutdown: CancellationToken,
    mut on_tick: impl FnMut(&SimStats),
) -> Result<SimStats, CliError> {
    let product = &args.product;
    let mut server = Server::load(&args.models_root, &product.base_model)?;
    let users = population(product.users.max(1), product.seed);
    let mut rng = SplitMix(product.seed);
    let mut stats = SimStats::default();
    let mut pending: Vec<Due> = Vec::new();
    let auth = format!("Bearer {}", args.token);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let run_id = format!("{:08x}", rng.next_u64() as u32);
    let mut next_request = Instant::now();
    let mut last_tick = Instant::now();
    while !shutdown.is_cancelled() && (product.requests == 0 || stats.requests < product.requests) {
        if last_tick.elapsed() >= Duration::from_secs(1) {
            on_tick(&stats);
            last_tick = Instant::now();
        }
        let now = Instant::now();
        if now >= next_request {
            // Poisson arrivals at `rate`.
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
            let prompt = *rng.pick(PROMPTS);
            let (completion, logprob) = tokio::task::block_in_place(|| {
                server.complete(prompt, adapter.as_deref(), product.completion_tokens, &mut rng)
            })?;
            let outcome = react(user, &completion, product, &mut rng);
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
                "completion": completion,
                "behavior_logprob": logprob,
                "latency_ms": 40 + (rng.unit() * 80.0) as i64,
            }});
            // Each event is sent when it happens: `delay` ms after the suggestion was shown.
            let mut schedule = |delay: i64, payload: serde_json::Value| {
                let at = now + Duration::from_millis(delay as u64);
                pending
                    .push(Due { at, event: event(uuid(&mut rng), &user.id, &suggestion, shown_at + delay, payload) });
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
                let distance = completion.len().abs_diff(text.len()) as i64;
                schedule(decided + 500, serde_json::json!({"edited": {"final_text": text, "edit_distance": distance}}));
            }
            if let Some(score) = outcome.rating {
                schedule(
                    decided + 700,
                    serde_json::json!({"rated": {"score": score, "scale_min": 1.0, "scale_max": 5.0}}),
                );
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
    use flywheel_trainer::cpu::gemm::PrecisionChoice;
    use flywheel_trainer::backend::{Backend, CpuBackend};
    use flywheel_trainer::objective::Example;

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
    fn expected_accept(server: &Server, users: &[User], adapter: Option<&LoraAdapter>, n: usize, seed: u64) -> f64 {
        let a = args();
        let mut rng = SplitMix(seed);
        (0..n)
            .map(|i| {
                let user = &users[i % users.len()];
                let (text, _) =
                    server.complete(PROMPTS[i % PROMPTS.len()], adapter, a.completion_tokens, &mut rng).unwrap();
                accept_probability(user, text.as_bytes(), a.preference_strength)
            })
            .sum::<f64>()
            / n as f64
    }

    #[test]
    fn the_base_accept_rate_is_low_but_not_zero_and_training_on_the_feedback_raises_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = flywheel_trainer::tiny::tiny_model(7).unwrap();
        flywheel_trainer::tiny::save(&model, &dir.path().join("flywheel/tiny")).unwrap();
        let server = Server::load(dir.path(), "flywheel/tiny").unwrap();
        let users = population(100, 3);
        let a = args();
        let base = expected_accept(&server, &users, None, 300, 1);
        assert!((0.08..0.35).contains(&base), "base accept rate {base}");

        // One round of the flywheel, in process: serve, observe, train.
        let mut rng = SplitMix(5);
        let mut examples = Vec::new();
        for i in 0..1200 {
            let user = &users[i % users.len()];
            let prompt = PROMPTS[i % PROMPTS.len()];
            let (text, logprob) = server.complete(prompt, None, a.completion_tokens, &mut rng).unwrap();
            let outcome = react(user, &text, &a, &mut rng);
            let mut tokens = server.tokenizer.encode(prompt).unwrap();
            let prompt_len = tokens.len();
            tokens.extend(server.tokenizer.encode(&text).unwrap());
            let reward = if outcome.accepted { 0.75 } else { -0.25 };
            examples.push(Example {
                tokens,
                prompt_len,
                reward,
                accepted: outcome.accepted,
                behavior_logprob: Some(logprob),
            });
        }
        let mut objective = flywheel_trigger::service::default_objective(1);
        demo_objective().apply(&mut objective);
        let lora = LoraAdapter::init(
            &server.model.config,
            objective.lora_rank as usize,
            objective.lora_alpha,
            &objective.target_modules.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .unwrap();
        let mut backend =
            CpuBackend::new(&server.model, PrecisionChoice::F32, lora, objective.weight_decay).unwrap();
        flywheel_trainer::job::train_steps(&mut backend, &examples, &objective, &mut |_| {}).unwrap();
        let trained = backend.adapter().unwrap();
        let after = expected_accept(&server, &users, Some(&trained), 300, 1);
        eprintln!("accept rate: base {base:.3}, after one round {after:.3}");
        assert!(after > base + 0.1, "accept rate {base:.3} -> {after:.3}");
    }
}
