//! The rewarder's Prometheus metrics: record counts by result, open
//! suggestions, checkpoints, and gauges of the latest metrics window per version.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use flywheel_core::records::RewardMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Labels of the per-version window gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    tenant: String,
    model_id: String,
    adapter_version: String,
    experiment_arm: String,
    surface: String,
    window: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Gauges of the latest published window per version and window length,
/// merged over this instance's partitions.
#[derive(Debug, Clone, Default)]
pub(crate) struct WindowGauges {
    window_end: Family<VersionLabels, FloatGauge>,
    shown: Family<VersionLabels, FloatGauge>,
    accept_rate: Family<VersionLabels, FloatGauge>,
    accept_rate_low: Family<VersionLabels, FloatGauge>,
    accept_rate_high: Family<VersionLabels, FloatGauge>,
    mean_reward: Family<VersionLabels, FloatGauge>,
    mean_edit_distance: Family<VersionLabels, FloatGauge>,
    time_to_accept_p50: Family<VersionLabels, FloatGauge>,
    latest: Arc<Mutex<HashMap<VersionLabels, RewardMetrics>>>,
}

impl WindowGauges {
    fn register(&self, r: &mut Registry) {
        let families = [
            (
                "window_end_seconds",
                "End of the latest published metrics window (event time, Unix seconds)",
                &self.window_end,
            ),
            ("window_shown", "Suggestions shown in the latest window", &self.shown),
            ("window_accept_rate", "Accepted / shown in the latest window", &self.accept_rate),
            (
                "window_accept_rate_wilson_low",
                "Lower end of the Wilson 95% interval of the accept rate",
                &self.accept_rate_low,
            ),
            (
                "window_accept_rate_wilson_high",
                "Upper end of the Wilson 95% interval of the accept rate",
                &self.accept_rate_high,
            ),
            ("window_mean_reward", "Mean reward per shown suggestion in the latest window", &self.mean_reward),
            (
                "window_mean_edit_distance",
                "Mean edit distance after accept in the latest window (characters)",
                &self.mean_edit_distance,
            ),
            (
                "window_time_to_accept_p50_seconds",
                "Exact median time to accept in the latest window",
                &self.time_to_accept_p50,
            ),
        ];
        for (name, help, family) in families {
            r.register(name, help, family.clone());
        }
    }

    /// Folds a published record in: a newer window replaces the shown one, the
    /// same window (another partition, or a late delta) is added to it.
    pub(crate) fn observe(&self, m: &RewardMetrics) {
        let labels = VersionLabels {
            tenant: m.tenant.clone(),
            model_id: m.model_id.clone(),
            adapter_version: m.adapter_version.clone().unwrap_or_default(),
            experiment_arm: m.experiment_arm.clone().unwrap_or_default(),
            surface: m.surface.clone().unwrap_or_default(),
            window: format!("{}s", (m.window_end - m.window_start) / 1000),
        };
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let shown = match latest.get_mut(&labels) {
            Some(cur) if cur.window_start == m.window_start => {
                cur.absorb(m);
                cur.clone()
            }
            Some(cur) if cur.window_start > m.window_start => return,
            _ => {
                latest.insert(labels.clone(), m.clone());
                m.clone()
            }
        };
        drop(latest);
        let set = |f: &Family<VersionLabels, FloatGauge>, v: Option<f64>| {
            f.get_or_create(&labels).set(v.unwrap_or(f64::NAN));
        };
        set(&self.window_end, Some(shown.window_end as f64 / 1000.0));
        set(&self.shown, Some(shown.shown as f64));
        set(&self.accept_rate, shown.accept_rate());
        let wilson = shown.accept_rate_wilson_95();
        set(&self.accept_rate_low, wilson.map(|w| w.0));
        set(&self.accept_rate_high, wilson.map(|w| w.1));
        set(&self.mean_reward, shown.mean_reward());
        set(&self.mean_edit_distance, shown.mean_edit_distance());
        set(&self.time_to_accept_p50, shown.p50_time_to_accept_ms().map(|t| t as f64 / 1000.0));
    }
}

/// The rewarder's metrics, registered under `rewarder_`.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    records: Family<ResultLabels, Counter>,
    pub(crate) open: Gauge,
    pub(crate) checkpoints: Counter,
    pub(crate) windows_published: Counter,
    pub(crate) windows: WindowGauges,
}

impl Metrics {
    pub(crate) fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            records: Family::default(),
            open: Gauge::default(),
            checkpoints: Counter::default(),
            windows_published: Counter::default(),
            windows: WindowGauges::default(),
        };
        let r = registry.sub_registry_with_prefix("rewarder");
        r.register("records", "Input records by result", m.records.clone());
        r.register("open_suggestions", "Suggestions waiting for their window to close", m.open.clone());
        r.register("checkpoints", "Checkpoints written", m.checkpoints.clone());
        r.register("metrics_windows_published", "Reward metrics records published", m.windows_published.clone());
        m.windows.register(r);
        m
    }

    /// Counts `n` input records with `result` (none: no series is created).
    pub(crate) fn count(&self, result: &str, n: u64) {
        if n > 0 {
            self.records.get_or_create(&ResultLabels { result: result.into() }).inc_by(n);
        }
    }
}
