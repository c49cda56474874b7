//! The console's in-memory view of the topics, free of I/O: records go in
//! (in any order, any number of times), and the numbers every page shows come
//! out. Replays are harmless: each record is kept under its identity (a
//! registry revision, a metrics window's full id, a request or shard id).

use std::collections::{BTreeMap, VecDeque};

use flywheel_core::records::{
    DeadLetter, EpochMillis, ModelCandidate, RegistryEntry, ReleaseAction, RewardMetrics, ShardManifest, TrainRequest,
    TriggerDecision,
};
use flywheel_core::stats::{Z_95, wilson_interval};
use flywheel_core::topics::Topic;
use flywheel_gate::sequential::{Moments, msprt};

/// Trigger decisions kept per (tenant, base model), newest last.
pub(crate) const KEEP_DECISIONS: usize = 50;
/// Metrics windows kept per (tenant, base model); the oldest go first.
pub(crate) const KEEP_WINDOWS: usize = 100_000;
/// Dead-letter samples kept per (service, reason).
pub(crate) const SAMPLES_PER_REASON: usize = 3;
/// Bytes of a dead letter's key and value kept for its sample.
pub(crate) const SAMPLE_BYTES: usize = 4096;
/// Offset probes kept for rates (at the default 5 s, ten minutes).
pub(crate) const KEEP_PROBES: usize = 120;

/// The topics the console follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    /// `model-registry`.
    Registry,
    /// `reward-metrics`.
    Metrics,
    /// `trigger-decisions`.
    Decisions,
    /// `train-requests`.
    Requests,
    /// `model-candidates`.
    Candidates,
    /// `shards`.
    Shards,
    /// `dead-letters`.
    DeadLetters,
}

impl Source {
    /// Every followed topic.
    pub(crate) const ALL: [Source; 7] = [
        Source::Registry,
        Source::Metrics,
        Source::Decisions,
        Source::Requests,
        Source::Candidates,
        Source::Shards,
        Source::DeadLetters,
    ];

    /// The logical topic.
    pub(crate) fn topic(self) -> Topic {
        match self {
            Source::Registry => Topic::ModelRegistry,
            Source::Metrics => Topic::RewardMetrics,
            Source::Decisions => Topic::TriggerDecisions,
            Source::Requests => Topic::TrainRequests,
            Source::Candidates => Topic::ModelCandidates,
            Source::Shards => Topic::Shards,
            Source::DeadLetters => Topic::DeadLetters,
        }
    }
}

/// A decoded record of one of the followed topics.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    /// A registry revision.
    Registry(RegistryEntry),
    /// A metrics window and when it was published (the Kafka record's
    /// timestamp), which orders the gate's looks.
    Metrics(RewardMetrics, Option<EpochMillis>),
    /// A trigger evaluation.
    Decision(TriggerDecision),
    /// A train request.
    Request(TrainRequest),
    /// A trained candidate.
    Candidate(ModelCandidate),
    /// A shard manifest.
    Shard(ShardManifest),
    /// A dead letter.
    DeadLetter(DeadLetter),
}

impl Record {
    /// Decodes a record read from `source`, published at `timestamp`.
    pub(crate) fn decode(
        source: Source,
        bytes: &[u8],
        timestamp: Option<EpochMillis>,
    ) -> flywheel_core::Result<Record> {
        use flywheel_core::codec::decode;
        Ok(match source {
            Source::Registry => Record::Registry(decode(bytes)?),
            Source::Metrics => Record::Metrics(decode(bytes)?, timestamp),
            Source::Decisions => Record::Decision(decode(bytes)?),
            Source::Requests => Record::Request(decode(bytes)?),
            Source::Candidates => Record::Candidate(decode(bytes)?),
            Source::Shards => Record::Shard(decode(bytes)?),
            Source::DeadLetters => Record::DeadLetter(decode(bytes)?),
        })
    }
}

/// (tenant, base model).
pub(crate) type PairKey = (String, String);

/// One metrics record's identity, as the rewarder defines it (every field of
/// its `metrics_record_id`), ordered so one version's windows of one length
/// are a contiguous range in start order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WindowId {
    /// Adapter version (`None`: the base model).
    pub adapter: Option<String>,
    /// Window length.
    pub len_ms: i64,
    /// Window start.
    pub start: EpochMillis,
    /// Interactions partition the record covers.
    pub partition: i32,
    /// Input offset at emission.
    pub offset: i64,
    /// Experiment arm.
    pub arm: Option<String>,
    /// Product surface.
    pub surface: Option<String>,
}

/// The sufficient statistics the console reads from a metrics window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct WindowStats {
    /// Suggestions shown.
    pub shown: i64,
    /// Accepted.
    pub accepted: i64,
    /// Σ reward.
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
}

impl WindowStats {
    fn of(m: &RewardMetrics) -> WindowStats {
        WindowStats { shown: m.shown, accepted: m.accepted, reward_sum: m.reward_sum, reward_sum_sq: m.reward_sum_sq }
    }

    /// Adds another window's statistics.
    pub(crate) fn add(&mut self, o: &WindowStats) {
        self.shown += o.shown;
        self.accepted += o.accepted;
        self.reward_sum += o.reward_sum;
        self.reward_sum_sq += o.reward_sum_sq;
    }

    /// Accepted / shown.
    pub(crate) fn accept_rate(&self) -> Option<f64> {
        (self.shown > 0).then(|| self.accepted as f64 / self.shown as f64)
    }

    /// Wilson 95 % interval of the accept rate.
    pub(crate) fn accept_rate_95(&self) -> Option<(f64, f64)> {
        wilson_interval(self.accepted.max(0) as u64, self.shown.max(0) as u64, Z_95)
    }

    /// Mean reward per shown suggestion.
    pub(crate) fn mean_reward(&self) -> Option<f64> {
        (self.shown > 0).then(|| self.reward_sum / self.shown as f64)
    }

    /// Normal 95 % interval of the mean reward (needs two suggestions).
    pub(crate) fn mean_reward_95(&self) -> Option<(f64, f64)> {
        let m = self.moments();
        let mean = self.mean_reward()?;
        (self.shown > 1).then(|| {
            let half = Z_95 * (m.variance() / m.n).sqrt();
            (mean - half, mean + half)
        })
    }

    /// The reward moments (the gate's test input).
    pub(crate) fn moments(&self) -> Moments {
        Moments { n: self.shown as f64, sum: self.reward_sum, sum_sq: self.reward_sum_sq }
    }
}

/// A metrics record as kept: its statistics and when it was published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Window {
    /// Sufficient statistics.
    pub stats: WindowStats,
    /// The Kafka record's timestamp (the earliest, if replayed).
    pub published: Option<EpochMillis>,
}

/// One version's windows of one length added up over partitions, arms and
/// surfaces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    /// Window start.
    pub start: EpochMillis,
    /// Window end (exclusive).
    pub end: EpochMillis,
    /// Sums.
    pub stats: WindowStats,
}

/// Everything known about one (tenant, base model).
#[derive(Debug, Default)]
pub(crate) struct PairView {
    /// The registry entry with the highest revision.
    pub registry: Option<RegistryEntry>,
    /// The live adapter of every revision read (compaction may have removed some).
    pub live_at_revision: BTreeMap<i64, Option<String>>,
    /// Metrics windows by identity.
    pub windows: BTreeMap<WindowId, Window>,
    /// Trigger decisions, newest last (at most [`KEEP_DECISIONS`]).
    pub decisions: VecDeque<TriggerDecision>,
    /// Train requests by id.
    pub requests: BTreeMap<String, TrainRequest>,
    /// Candidates by adapter version.
    pub candidates: BTreeMap<String, ModelCandidate>,
}

/// One release decision with the revision it produced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decided<'a> {
    /// Registry revision.
    pub revision: i64,
    /// The decision.
    pub decision: &'a flywheel_core::records::ReleaseDecision,
}

/// One look at a canary: the gate's test over every window read so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CanaryLook {
    /// When the newest window included was published (its window end if
    /// the record carried no timestamp).
    pub at: EpochMillis,
    /// Canary suggestions shown so far.
    pub canary_shown: i64,
    /// Control suggestions shown so far.
    pub control_shown: i64,
    /// Always-valid p-value of the accept-rate difference.
    pub accept_p: f64,
    /// Always-valid p-value of the mean-reward difference.
    pub reward_p: f64,
}

/// A p-value the gate recorded in a decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecordedLook {
    /// Decision time.
    pub at: EpochMillis,
    /// The decision's action.
    pub action: ReleaseAction,
    /// `accept_rate_p_value`, when recorded.
    pub accept_p: Option<f64>,
    /// `mean_reward_p_value`, when recorded.
    pub reward_p: Option<f64>,
}

/// One canary from its start to its end (or now).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Episode {
    /// The canary's adapter.
    pub adapter: String,
    /// The live adapter it was compared with (`Some(None)`: the base model;
    /// `None`: unknown, the history before it was compacted away).
    pub control: Option<Option<String>>,
    /// Start (the canary decision's time).
    pub started_at: EpochMillis,
    /// How and when it ended; `None` while running.
    pub ended: Option<(ReleaseAction, EpochMillis)>,
    /// Looks recomputed from the metrics windows, in time order.
    pub looks: Vec<CanaryLook>,
    /// What the gate recorded in its decisions about this canary.
    pub recorded: Vec<RecordedLook>,
    /// The test level (the gate's recorded `alpha`, else the policy's).
    pub alpha: f64,
}

/// The gate's test settings the console needs to redraw a canary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TestSettings {
    /// Window length the gate reads.
    pub window_ms: i64,
    /// Level.
    pub alpha: f64,
    /// Mixing sd of the mean-reward test.
    pub reward_tau: f64,
    /// Mixing sd of the accept-rate test.
    pub accept_rate_tau: f64,
}

impl From<&flywheel_gate::policy::ReleasePolicy> for TestSettings {
    fn from(p: &flywheel_gate::policy::ReleasePolicy) -> Self {
        TestSettings {
            window_ms: p.metrics_window_ms,
            alpha: p.alpha,
            reward_tau: p.reward_tau,
            accept_rate_tau: p.accept_rate_tau,
        }
    }
}

impl PairView {
    fn add_window(&mut self, m: &RewardMetrics, published: Option<EpochMillis>) -> bool {
        let id = WindowId {
            adapter: m.adapter_version.clone(),
            len_ms: m.window_end - m.window_start,
            start: m.window_start,
            partition: m.source_partition,
            offset: m.emitted_at_offset,
            arm: m.experiment_arm.clone(),
            surface: m.surface.clone(),
        };
        let new = match self.windows.get_mut(&id) {
            Some(held) => {
                held.published = match (held.published, published) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                false
            }
            None => {
                self.windows.insert(id, Window { stats: WindowStats::of(m), published });
                true
            }
        };
        if self.windows.len() > KEEP_WINDOWS {
            // Drop the oldest tenth at once, so the cost is paid rarely.
            let mut starts: Vec<EpochMillis> = self.windows.keys().map(|k| k.start).collect();
            starts.sort_unstable();
            let cut = starts[KEEP_WINDOWS / 10];
            self.windows.retain(|k, _| k.start >= cut);
        }
        new
    }

    /// Served versions with metrics: the base model (`None`) first, then
    /// adapters in the order they were first served.
    pub(crate) fn versions(&self) -> Vec<Option<String>> {
        let mut first: Vec<(Option<String>, EpochMillis)> = Vec::new();
        for k in self.windows.keys() {
            match first.last_mut() {
                Some((v, start)) if *v == k.adapter => *start = (*start).min(k.start),
                _ => first.push((k.adapter.clone(), k.start)),
            }
        }
        first.sort_by(|a, b| (a.0.is_some(), a.1, &a.0).cmp(&(b.0.is_some(), b.1, &b.0)));
        first.into_iter().map(|(v, _)| v).collect()
    }

    /// Window lengths present.
    pub(crate) fn window_lengths(&self) -> Vec<i64> {
        let mut lens: Vec<i64> = self.windows.keys().map(|k| k.len_ms).collect();
        lens.sort_unstable();
        lens.dedup();
        lens
    }

    /// The window length to chart: `preferred` (the gate's) when present,
    /// else the shortest.
    pub(crate) fn chart_window_ms(&self, preferred: i64) -> Option<i64> {
        let lens = self.window_lengths();
        if lens.contains(&preferred) { Some(preferred) } else { lens.first().copied() }
    }

    /// One version's windows of `len_ms`, added up per window, in time order.
    pub(crate) fn buckets(&self, adapter: &Option<String>, len_ms: i64) -> Vec<Bucket> {
        let mut out: Vec<Bucket> = Vec::new();
        for (k, w) in self.windows.iter().filter(|(k, _)| &k.adapter == adapter && k.len_ms == len_ms) {
            match out.last_mut() {
                Some(b) if b.start == k.start => b.stats.add(&w.stats),
                _ => out.push(Bucket { start: k.start, end: k.start + len_ms, stats: w.stats }),
            }
        }
        out
    }

    /// One version's totals over its windows of `len_ms`.
    pub(crate) fn totals(&self, adapter: &Option<String>, len_ms: i64) -> (WindowStats, usize) {
        let buckets = self.buckets(adapter, len_ms);
        let mut total = WindowStats::default();
        buckets.iter().for_each(|b| total.add(&b.stats));
        (total, buckets.len())
    }

    /// Release decisions, oldest first, each with the revision it produced.
    pub(crate) fn release_history(&self) -> Vec<Decided<'_>> {
        let Some(e) = &self.registry else { return Vec::new() };
        let first = e.revision - e.history.len() as i64 + 1;
        e.history.iter().enumerate().map(|(i, d)| Decided { revision: first + i as i64, decision: d }).collect()
    }

    /// The live adapter right after `revision`, when it can be told.
    fn live_after(&self, revision: i64) -> Option<Option<String>> {
        if let Some(live) = self.live_at_revision.get(&revision) {
            return Some(live.clone());
        }
        let history = self.release_history();
        // Walk forward from what is known: the base before revision 1, or a
        // revision whose entry was read.
        let mut live: Option<Option<String>> = None;
        for d in history.iter().take_while(|d| d.revision <= revision) {
            if d.revision == 1 {
                live = Some(None);
            }
            if let Some(known) = self.live_at_revision.get(&(d.revision - 1)) {
                live = Some(known.clone());
            }
            if d.decision.action == ReleaseAction::Promoted {
                live = Some(Some(d.decision.adapter_version.clone()));
            }
        }
        live
    }

    /// Every canary in the release history, newest first, with the gate's
    /// always-valid tests recomputed after each metrics window (the looks the
    /// gate took) and the p-values it recorded.
    pub(crate) fn canary_episodes(&self, settings: &TestSettings) -> Vec<Episode> {
        let history = self.release_history();
        let mut out = Vec::new();
        for (i, start) in history.iter().enumerate() {
            if start.decision.action != ReleaseAction::CanaryStarted {
                continue;
            }
            let adapter = start.decision.adapter_version.clone();
            let end = history[i + 1..].iter().find(|d| {
                d.decision.adapter_version == adapter
                    && matches!(
                        d.decision.action,
                        ReleaseAction::Promoted | ReleaseAction::RolledBack | ReleaseAction::Expired
                    )
            });
            let started_at = start.decision.at;
            let ended = end.map(|d| (d.decision.action, d.decision.at));
            let recorded: Vec<RecordedLook> = history[i..]
                .iter()
                .take_while(|d| end.is_none_or(|e| d.revision <= e.revision))
                .filter(|d| d.decision.adapter_version == adapter)
                .filter(|d| d.decision.statistics.contains_key("mean_reward_p_value"))
                .map(|d| RecordedLook {
                    at: d.decision.at,
                    action: d.decision.action,
                    accept_p: d.decision.statistics.get("accept_rate_p_value").copied(),
                    reward_p: d.decision.statistics.get("mean_reward_p_value").copied(),
                })
                .collect();
            let alpha = end.and_then(|d| d.decision.statistics.get("alpha").copied()).unwrap_or(settings.alpha);
            let control = self.live_after(start.revision);
            let looks = match &control {
                Some(control) => self.looks(&adapter, control, started_at, ended.map(|e| e.1), settings),
                None => Vec::new(),
            };
            out.push(Episode { adapter, control, started_at, ended, looks, recorded, alpha });
        }
        out.reverse();
        out
    }

    /// The gate's looks at a canary: windows of the gate's length starting at
    /// or after the canary's start, canary against control, added up in the
    /// order they were published (as the gate read them), up to the decision
    /// that ended it. One look per publication time.
    fn looks(
        &self,
        canary: &str,
        control: &Option<String>,
        since: EpochMillis,
        until: Option<EpochMillis>,
        s: &TestSettings,
    ) -> Vec<CanaryLook> {
        let canary = Some(canary.to_string());
        let mut published: Vec<(EpochMillis, bool, WindowStats)> = self
            .windows
            .iter()
            .filter(|(k, _)| k.len_ms == s.window_ms && k.start >= since)
            .filter_map(|(k, w)| {
                let is_canary = k.adapter == canary;
                (is_canary || &k.adapter == control)
                    .then(|| (w.published.unwrap_or(k.start + k.len_ms), is_canary, w.stats))
            })
            .filter(|(at, _, _)| until.is_none_or(|u| *at <= u))
            .collect();
        published.sort_by_key(|(at, _, _)| *at);
        let (mut t, mut c) = (WindowStats::default(), WindowStats::default());
        let mut out = Vec::new();
        for (i, (at, is_canary, stats)) in published.iter().enumerate() {
            if *is_canary {
                t.add(stats)
            } else {
                c.add(stats)
            }
            if published.get(i + 1).is_some_and(|next| next.0 == *at) {
                continue;
            }
            let accept = msprt(&bernoulli(&t), &bernoulli(&c), s.accept_rate_tau);
            let reward = msprt(&t.moments(), &c.moments(), s.reward_tau);
            out.push(CanaryLook {
                at: *at,
                canary_shown: t.shown,
                control_shown: c.shown,
                accept_p: accept.p_value,
                reward_p: reward.p_value,
            });
        }
        out
    }

    /// The newest trigger decision.
    pub(crate) fn latest_decision(&self) -> Option<&TriggerDecision> {
        self.decisions.iter().max_by_key(|d| d.evaluated_at)
    }
}

fn bernoulli(s: &WindowStats) -> Moments {
    Moments::bernoulli(s.accepted, s.shown)
}

/// Dead letters of one (service, reason code).
#[derive(Debug, Default)]
pub(crate) struct ReasonView {
    /// Dead letters read.
    pub count: u64,
    /// The newest few, original bytes cut to [`SAMPLE_BYTES`].
    pub samples: VecDeque<DeadLetter>,
    /// Newest failure time.
    pub last_at: EpochMillis,
}

/// One consumer group's position on one topic, per partition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupLag {
    /// Consumer group.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// Partition → (end offset, committed offset if any).
    pub partitions: BTreeMap<i32, (i64, Option<i64>)>,
}

/// What the offset probe saw.
#[derive(Debug, Default)]
pub(crate) struct ProbeView {
    /// Wall-clock time and total end offset per topic name, oldest first.
    pub history: VecDeque<(EpochMillis, BTreeMap<String, i64>)>,
    /// Consumer-group positions of the last probe.
    pub lag: Vec<GroupLag>,
    /// The last probe's failure, with its time; cleared by a good probe.
    pub error: Option<(EpochMillis, String)>,
}

impl ProbeView {
    /// Records per second appended to `topic` over the probes of the last
    /// `span_ms` (at least two probes needed).
    pub(crate) fn rate(&self, topic: &str, span_ms: i64) -> Option<f64> {
        let (last_at, last) = self.history.back()?;
        let (first_at, first) = self.history.iter().find(|(at, _)| last_at - at <= span_ms)?;
        let dt = (last_at - first_at) as f64 / 1000.0;
        let (a, b) = (first.get(topic)?, last.get(topic)?);
        (dt > 0.0).then(|| (b - a).max(0) as f64 / dt)
    }

    /// Total records in `topic` at the last probe.
    pub(crate) fn end(&self, topic: &str) -> Option<i64> {
        self.history.back().and_then(|(_, ends)| ends.get(topic).copied())
    }
}

/// The whole view.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Records applied that changed the view (pages poll this).
    pub changes: u64,
    /// Offset probes taken (the pipeline page also polls this).
    pub probes: u64,
    /// Records read per topic.
    pub read: BTreeMap<Source, u64>,
    /// Records that did not decode, per topic.
    pub undecodable: BTreeMap<Source, u64>,
    /// Whether every topic was read to the end it had when the console started.
    pub caught_up: bool,
    /// Per (tenant, base model).
    pub pairs: BTreeMap<PairKey, PairView>,
    /// Shard manifests by shard id (per-user row counts dropped).
    pub shards: BTreeMap<String, ShardManifest>,
    /// Dead letters per (service, reason code).
    pub dead_letters: BTreeMap<(String, String), ReasonView>,
    /// End offsets, rates and lag.
    pub probe: ProbeView,
    /// The trainers' `/metrics` (`--trainer-metrics-url`), in flag order.
    pub trainers: Vec<TrainerScrape>,
    /// Trainer scrapes that changed what the Training page shows (it polls this).
    pub trainer_changes: u64,
}

/// A trainer's `/metrics` and its last scrape: when, and the progress or
/// why it failed (`None` before the first).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrainerScrape {
    /// The URL scraped.
    pub url: String,
    /// The last scrape.
    pub last: Option<(EpochMillis, Result<crate::trainer::Progress, String>)>,
}

impl View {
    /// Applies one record read from `source`; `None` is a record that did
    /// not decode. Returns whether the view changed.
    pub(crate) fn apply(&mut self, source: Source, record: Option<Record>) -> bool {
        *self.read.entry(source).or_default() += 1;
        let Some(record) = record else {
            *self.undecodable.entry(source).or_default() += 1;
            self.changes += 1;
            return true;
        };
        let changed = match record {
            Record::Registry(e) => {
                let pair = self.pair(&e.tenant, &e.base_model);
                let live = e.live.as_ref().map(|a| a.adapter_version.clone());
                let seen = pair.live_at_revision.insert(e.revision, live).is_some();
                let newest = pair.registry.as_ref().is_none_or(|held| held.revision < e.revision);
                if newest {
                    pair.registry = Some(e);
                }
                newest || !seen
            }
            Record::Metrics(m, published) => self.pair(&m.tenant, &m.model_id).add_window(&m, published),
            Record::Decision(d) => {
                let pair = self.pair(&d.tenant, &d.base_model);
                if pair.decisions.iter().any(|held| held.decision_id == d.decision_id) {
                    false
                } else {
                    pair.decisions.push_back(d);
                    pair.decisions.make_contiguous().sort_by_key(|d| d.evaluated_at);
                    if pair.decisions.len() > KEEP_DECISIONS {
                        pair.decisions.pop_front();
                    }
                    true
                }
            }
            Record::Request(r) => {
                let pair = self.pair(&r.tenant, &r.base_model);
                pair.requests.insert(r.request_id.clone(), r).is_none()
            }
            Record::Candidate(c) => {
                let pair = self.pair(&c.tenant, &c.base_model);
                pair.candidates.insert(c.adapter_version.clone(), c).is_none()
            }
            Record::Shard(mut s) => {
                s.stats.user_rows.clear();
                self.shards.insert(s.shard_id.clone(), s).is_none()
            }
            Record::DeadLetter(mut d) => {
                let r = self.dead_letters.entry((d.service.clone(), d.reason_code.clone())).or_default();
                r.count += 1;
                r.last_at = r.last_at.max(d.failed_at);
                for bytes in [&mut d.original_key, &mut d.original_value].into_iter().flatten() {
                    bytes.truncate(SAMPLE_BYTES);
                }
                r.samples.push_back(d);
                if r.samples.len() > SAMPLES_PER_REASON {
                    r.samples.pop_front();
                }
                true
            }
        };
        if changed {
            self.changes += 1;
        }
        changed
    }

    fn pair(&mut self, tenant: &str, base_model: &str) -> &mut PairView {
        self.pairs.entry((tenant.to_string(), base_model.to_string())).or_default()
    }

    /// Records an offset probe: the total end offset per topic name and the
    /// groups' positions.
    pub(crate) fn probed(&mut self, at: EpochMillis, ends: BTreeMap<String, i64>, lag: Vec<GroupLag>) {
        self.probe.history.push_back((at, ends));
        while self.probe.history.len() > KEEP_PROBES {
            self.probe.history.pop_front();
        }
        self.probe.lag = lag;
        self.probe.error = None;
        self.probes += 1;
    }

    /// Records a failed probe (a page changes only when the broker first
    /// becomes unreachable, not on every failed probe).
    pub(crate) fn probe_failed(&mut self, at: EpochMillis, error: String) {
        if self.probe.error.is_none() {
            self.probes += 1;
        }
        self.probe.error = Some((at, error));
    }

    /// Records a scrape of the `i`th trainer (a page changes only when the
    /// progress or the failure differs from the last scrape's).
    pub(crate) fn trainer_scraped(
        &mut self,
        i: usize,
        at: EpochMillis,
        result: Result<crate::trainer::Progress, String>,
    ) {
        let Some(t) = self.trainers.get_mut(i) else { return };
        if t.last.as_ref().is_none_or(|(_, held)| *held != result) {
            self.trainer_changes += 1;
        }
        t.last = Some((at, result));
    }

    /// Rows and shards landed per (hour of commit, tenant).
    pub(crate) fn rows_per_hour(&self) -> BTreeMap<(EpochMillis, String), (i64, usize)> {
        let mut out: BTreeMap<(EpochMillis, String), (i64, usize)> = BTreeMap::new();
        for s in self.shards.values() {
            let hour = s.committed_at.div_euclid(3_600_000) * 3_600_000;
            let slot = out.entry((hour, s.tenant.clone())).or_default();
            slot.0 += s.rows;
            slot.1 += 1;
        }
        out
    }

    /// Dead letters read.
    pub(crate) fn dead_letter_total(&self) -> u64 {
        self.dead_letters.values().map(|r| r.count).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flywheel_core::records::{AdapterRef, Canary, ReleaseDecision};

    pub(crate) fn window(
        adapter: Option<&str>,
        start: i64,
        len: i64,
        shown: i64,
        accepted: i64,
        p: i32,
    ) -> RewardMetrics {
        RewardMetrics {
            tenant: "acme".into(),
            model_id: "tiny".into(),
            adapter_version: adapter.map(str::to_string),
            experiment_arm: Some("live".into()),
            window_start: start,
            window_end: start + len,
            shown,
            accepted,
            rejected: shown - accepted,
            dismissed: 0,
            ignored: 0,
            reward_sum: 0.75 * accepted as f64 - 0.25 * (shown - accepted) as f64,
            reward_sum_sq: 0.5625 * accepted as f64 + 0.0625 * (shown - accepted) as f64,
            rated: 0,
            rating_sum: 0.0,
            completion_chars_sum: 0,
            distinct_users: 1,
            reward_fn_version: "v1".into(),
            emitted_at_offset: start / 1000,
            source_partition: p,
            surface: Some("editor".into()),
            edit_measured: 0,
            edit_distance_sum: 0,
            time_to_accept_ms: Vec::new(),
        }
    }

    fn adapter(v: &str) -> AdapterRef {
        AdapterRef { adapter_version: v.into(), adapter_uri: format!("file:///a/{v}"), adapter_sha256: "00".into() }
    }

    fn decision(at: i64, action: ReleaseAction, v: &str, stats: &[(&str, f64)]) -> ReleaseDecision {
        ReleaseDecision {
            at,
            action,
            adapter_version: v.into(),
            reason: format!("{action:?} {v}"),
            statistics: stats.iter().map(|(k, x)| (k.to_string(), *x)).collect(),
        }
    }

    /// Revisions 1..=3: a1 canary, a1 promoted, a2 canary (running).
    pub(crate) fn registry_entries() -> Vec<RegistryEntry> {
        let d1 = decision(60_000, ReleaseAction::CanaryStarted, "a1", &[("kl_to_parent", 0.01)]);
        let d2 = decision(
            600_000,
            ReleaseAction::Promoted,
            "a1",
            &[("accept_rate_p_value", 0.02), ("mean_reward_p_value", 0.01), ("alpha", 0.05)],
        );
        let d3 = decision(700_000, ReleaseAction::CanaryStarted, "a2", &[]);
        let entry = |revision: i64, live: Option<&str>, canary: Option<(&str, i64)>, history: Vec<ReleaseDecision>| {
            RegistryEntry {
                tenant: "acme".into(),
                base_model: "tiny".into(),
                revision,
                live: live.map(adapter),
                canary: canary.map(|(v, at)| Canary { adapter: adapter(v), traffic_share: 0.25, started_at: at }),
                history,
                updated_at: history_time(revision),
            }
        };
        vec![
            entry(1, None, Some(("a1", 60_000)), vec![d1.clone()]),
            entry(2, Some("a1"), None, vec![d1.clone(), d2.clone()]),
            entry(3, Some("a1"), Some(("a2", 700_000)), vec![d1, d2, d3]),
        ]
    }

    fn history_time(revision: i64) -> i64 {
        [0, 60_000, 600_000, 700_000][revision as usize]
    }

    #[test]
    fn the_newest_revision_wins_whatever_the_order_and_replays_change_nothing() {
        let mut v = View::default();
        let entries = registry_entries();
        for e in [&entries[2], &entries[0], &entries[1], &entries[2]] {
            v.apply(Source::Registry, Some(Record::Registry(e.clone())));
        }
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        let e = pair.registry.as_ref().unwrap();
        assert_eq!((e.revision, e.live.as_ref().unwrap().adapter_version.as_str()), (3, "a1"));
        assert_eq!(v.changes, 3, "three revisions; the replay of revision 3 changes nothing");
        let revisions: Vec<i64> = pair.release_history().iter().map(|d| d.revision).collect();
        assert_eq!(revisions, [1, 2, 3]);
    }

    #[test]
    fn windows_add_up_per_version_and_window_and_a_replayed_record_counts_once() {
        let mut v = View::default();
        for m in [
            window(None, 0, 60_000, 30, 6, 0),
            window(None, 0, 60_000, 20, 4, 1),
            window(None, 0, 60_000, 20, 4, 1), // replay: same identity
            window(None, 60_000, 60_000, 10, 5, 0),
            window(None, 0, 3_600_000, 99, 9, 0), // another length, charted apart
            window(Some("a1"), 0, 60_000, 10, 9, 0),
            window(Some("a0"), 60_000, 60_000, 10, 9, 0), // served later: charted after a1
        ] {
            v.apply(Source::Metrics, Some(Record::Metrics(m, None)));
        }
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        assert_eq!(pair.versions(), [None, Some("a1".to_string()), Some("a0".to_string())]);
        assert_eq!(pair.window_lengths(), [60_000, 3_600_000]);
        assert_eq!(pair.chart_window_ms(10_000), Some(60_000), "absent preference: the shortest");
        let b = pair.buckets(&None, 60_000);
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].stats.shown, b[0].stats.accepted, b[1].stats.shown), (50, 10, 10));
        let (total, windows) = pair.totals(&None, 60_000);
        assert_eq!((total.shown, total.accepted, windows), (60, 15, 2));
        assert_eq!(total.accept_rate(), Some(0.25));
        let (lo, hi) = total.accept_rate_95().unwrap();
        assert!(lo < 0.25 && hi > 0.25);
        let (lo, hi) = total.mean_reward_95().unwrap();
        let mean = total.mean_reward().unwrap();
        assert!(lo < mean && mean < hi);
    }

    #[test]
    fn canary_episodes_recompute_the_gates_looks_against_the_live_adapter_of_their_start() {
        let mut v = View::default();
        for e in registry_entries() {
            v.apply(Source::Registry, Some(Record::Registry(e)));
        }
        // a1's canary (from 60 s) against the base; a2's (from 700 s) against a1.
        for i in 0..8 {
            let start = 60_000 + i * 60_000;
            v.apply(Source::Metrics, Some(Record::Metrics(window(Some("a1"), start, 60_000, 40, 24, 0), None)));
            v.apply(Source::Metrics, Some(Record::Metrics(window(None, start, 60_000, 120, 24, 0), None)));
        }
        v.apply(Source::Metrics, Some(Record::Metrics(window(Some("a2"), 720_000, 60_000, 40, 10, 0), None)));
        v.apply(Source::Metrics, Some(Record::Metrics(window(Some("a1"), 720_000, 60_000, 120, 60, 0), None)));
        let s = TestSettings { window_ms: 60_000, alpha: 0.05, reward_tau: 0.1, accept_rate_tau: 0.05 };
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        let episodes = pair.canary_episodes(&s);
        assert_eq!(episodes.len(), 2);
        let (running, done) = (&episodes[0], &episodes[1]);
        assert_eq!(
            (running.adapter.as_str(), running.ended, running.control.clone()),
            ("a2", None, Some(Some("a1".into())))
        );
        assert_eq!(running.looks.len(), 1);
        assert_eq!((running.looks[0].canary_shown, running.looks[0].control_shown), (40, 120));
        assert_eq!(done.adapter, "a1");
        assert_eq!(done.control, Some(None));
        assert_eq!(done.ended, Some((ReleaseAction::Promoted, 600_000)));
        // Windows ending by the promotion: starts 60 s..480 s (ends ≤ 600 s) = 8 looks.
        assert_eq!(done.looks.len(), 8);
        let last = done.looks.last().unwrap();
        assert_eq!((last.canary_shown, last.control_shown), (320, 960));
        let expected = msprt(&Moments::bernoulli(192, 320), &Moments::bernoulli(192, 960), 0.05).p_value;
        assert!((last.accept_p - expected).abs() < 1e-15);
        assert!(done.looks.first().unwrap().accept_p >= last.accept_p, "evidence accumulates");
        assert_eq!(done.recorded.len(), 1);
        assert_eq!((done.recorded[0].accept_p, done.recorded[0].reward_p, done.alpha), (Some(0.02), Some(0.01), 0.05));
    }

    #[test]
    fn looks_follow_publication_order_and_stop_at_the_decision() {
        let mut v = View::default();
        for e in registry_entries() {
            v.apply(Source::Registry, Some(Record::Registry(e)));
        }
        let mut put = |adapter: Option<&str>, start: i64, accepted: i64, published: i64| {
            let m = window(adapter, start, 60_000, 40, accepted, 0);
            v.apply(Source::Metrics, Some(Record::Metrics(m, Some(published))));
        };
        // a1's canary ran from 60 s to its promotion at 600 s. The window of
        // 120 s was published before the one of 60 s; the window of 480 s
        // only after the promotion, so the gate never saw it.
        put(Some("a1"), 120_000, 30, 200_000);
        put(None, 120_000, 10, 200_000);
        put(Some("a1"), 60_000, 30, 250_000);
        put(None, 60_000, 10, 260_000);
        put(Some("a1"), 480_000, 0, 601_000);
        put(None, 480_000, 40, 601_000);
        let s = TestSettings { window_ms: 60_000, alpha: 0.05, reward_tau: 0.1, accept_rate_tau: 0.05 };
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        let done = pair.canary_episodes(&s).pop().unwrap();
        let at: Vec<(i64, i64, i64)> = done.looks.iter().map(|l| (l.at, l.canary_shown, l.control_shown)).collect();
        assert_eq!(at, [(200_000, 40, 40), (250_000, 80, 40), (260_000, 80, 80)]);
        let expected = msprt(&Moments::bernoulli(60, 80), &Moments::bernoulli(20, 80), 0.05).p_value;
        assert_eq!(done.looks[2].accept_p, expected);
        // A replay keeps the earliest publication time.
        let m = window(Some("a1"), 120_000, 60_000, 40, 30, 0);
        assert!(!v.apply(Source::Metrics, Some(Record::Metrics(m, Some(900_000)))));
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        assert_eq!(pair.canary_episodes(&s).pop().unwrap().looks[0].at, 200_000);
    }

    #[test]
    fn a_compacted_history_leaves_the_control_unknown_unless_a_revision_was_read() {
        let mut v = View::default();
        let mut e = registry_entries().pop().unwrap();
        e.revision = 13; // ten earlier decisions compacted away
        v.apply(Source::Registry, Some(Record::Registry(e.clone())));
        let s = TestSettings { window_ms: 60_000, alpha: 0.05, reward_tau: 0.1, accept_rate_tau: 0.05 };
        let pair = &v.pairs[&("acme".to_string(), "tiny".to_string())];
        let episodes = pair.canary_episodes(&s);
        assert_eq!(episodes[1].control, None, "a1 started at revision 11: the live then is unknown");
        assert_eq!(episodes[0].control, Some(Some("a1".into())), "a1 was promoted at revision 12");
    }

    #[test]
    fn dead_letters_count_per_reason_and_keep_a_few_short_samples() {
        let mut v = View::default();
        for i in 0..5 {
            let d = DeadLetter {
                service: "rewarder".into(),
                reason_code: "malformed_avro".into(),
                reason: format!("bad {i}"),
                source: flywheel_core::records::SourcePosition {
                    topic: "interactions".into(),
                    partition: 0,
                    offset: i,
                },
                original_key: Some(vec![b'k'; 10]),
                original_value: Some(vec![b'x'; SAMPLE_BYTES * 2]),
                failed_at: i,
            };
            v.apply(Source::DeadLetters, Some(Record::DeadLetter(d)));
        }
        v.apply(Source::DeadLetters, None);
        let r = &v.dead_letters[&("rewarder".to_string(), "malformed_avro".to_string())];
        assert_eq!((r.count, r.samples.len(), r.last_at), (5, SAMPLES_PER_REASON, 4));
        assert_eq!(r.samples[0].original_value.as_ref().unwrap().len(), SAMPLE_BYTES);
        assert_eq!(r.samples.back().unwrap().reason, "bad 4");
        assert_eq!(
            (v.dead_letter_total(), v.undecodable[&Source::DeadLetters], v.read[&Source::DeadLetters]),
            (5, 1, 6)
        );
    }

    #[test]
    fn rates_come_from_the_probes_and_lag_sums_committed_partitions() {
        let mut v = View::default();
        assert_eq!(v.probe.rate("interactions", 60_000), None);
        let ends = |n: i64| BTreeMap::from([("interactions".to_string(), n)]);
        v.probed(0, ends(100), Vec::new());
        v.probed(5_000, ends(150), Vec::new());
        v.probed(10_000, ends(300), Vec::new());
        assert_eq!(v.probe.rate("interactions", 60_000), Some(20.0));
        assert_eq!(v.probe.rate("interactions", 5_000), Some(30.0));
        assert_eq!(v.probe.end("interactions"), Some(300));
    }

    #[test]
    fn rows_land_per_hour_of_commit_and_tenant() {
        let mut v = View::default();
        let fixture = include_str!("../../../schemas/fixtures/shard_manifest.committed.json");
        let base: ShardManifest = serde_json::from_str(fixture).unwrap();
        for (id, tenant, at, rows) in [("s1", "a", 3_600_000, 10), ("s2", "a", 3_700_000, 5), ("s3", "b", 7_300_000, 7)]
        {
            let mut s = base.clone();
            (s.shard_id, s.tenant, s.committed_at, s.rows) = (id.into(), tenant.into(), at, rows);
            v.apply(Source::Shards, Some(Record::Shard(s)));
        }
        let per = v.rows_per_hour();
        assert_eq!(per[&(3_600_000, "a".to_string())], (15, 2));
        assert_eq!(per[&(7_200_000, "b".to_string())], (7, 1));
        assert!(v.shards["s1"].stats.user_rows.is_empty(), "per-user counts are not kept");
    }
}
