//! The pages, rendered from the [`View`] as complete HTML documents.
//!
//! Rule: every string that comes from a record (tenants, versions, reasons,
//! messages, dead-letter bytes) goes through [`esc`]; links through
//! [`query`]. Numbers a person (or a test) checks carry stable hooks
//! (`id`, `data-*`, `class`) so they can be found without parsing prose.

use std::collections::BTreeSet;
use std::fmt::Write;

use flywheel_core::records::{ModelCandidate, ReleaseAction, TrainRequest};

use crate::svg::{Chart, Point, Scale, Series, bar_chart, line_chart};
use crate::text::{duration, esc, num, p_value, query, utc};
use crate::view::{Episode, PairView, TestSettings, View, WindowStats};

/// Windows per version drawn in the charts (the newest; the table counts all).
pub(crate) const CHART_WINDOWS: usize = 600;

/// What a page needs besides the view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    /// How often the page asks whether it is stale.
    pub refresh_ms: u64,
    /// The release policies (window length, α and τ of the gate's tests).
    pub policies: &'a flywheel_gate::service::Policies,
    /// Names of the `interactions` and `rewards` topics (for rates).
    pub throughput_topics: [&'a str; 2],
}

impl Ctx<'_> {
    fn settings(&self, tenant: &str, model: &str) -> TestSettings {
        TestSettings::from(self.policies.of(tenant, model))
    }
}

/// What a page's freshness depends on: records only, or offset probes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    Records,
    RecordsAndProbes,
    RecordsAndTrainer,
}

fn action_name(a: ReleaseAction) -> &'static str {
    match a {
        ReleaseAction::Rejected => "rejected",
        ReleaseAction::CanaryStarted => "canary started",
        ReleaseAction::Promoted => "promoted",
        ReleaseAction::RolledBack => "rolled back",
        ReleaseAction::Expired => "expired",
    }
}

fn action_class(a: ReleaseAction) -> &'static str {
    match a {
        ReleaseAction::Rejected => "rejected",
        ReleaseAction::CanaryStarted => "canary",
        ReleaseAction::Promoted => "promoted",
        ReleaseAction::RolledBack => "rolled-back",
        ReleaseAction::Expired => "expired",
    }
}

fn objective_name(k: flywheel_core::records::ObjectiveKind) -> &'static str {
    match k {
        flywheel_core::records::ObjectiveKind::Reinforce => "REINFORCE",
        flywheel_core::records::ObjectiveKind::Kto => "KTO",
        flywheel_core::records::ObjectiveKind::Sft => "SFT",
    }
}

fn version_label(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "base model".into())
}

fn layout(title: &str, live: Live, view: &View, ctx: &Ctx<'_>, pair: Option<(&str, &str)>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let (live_attr, version) = match live {
        Live::Records => ("records", view.changes),
        Live::RecordsAndProbes => ("records probes", view.changes + view.probes),
        Live::RecordsAndTrainer => ("records trainer", view.changes + view.trainer_changes),
    };
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{} · Flywheel console</title><link rel="stylesheet" href="/static/console.css"><link rel="icon" href="/favicon.svg" type="image/svg+xml"><script src="/static/live.js" defer></script></head>"#,
        esc(title)
    );
    let _ = write!(
        out,
        r#"<body data-live="{live_attr}" data-version="{version}" data-refresh-ms="{}"><header><nav><a class="brand" href="/">Flywheel console</a> <a href="/">Overview</a> <a href="/pipeline">Pipeline</a>"#,
        ctx.refresh_ms
    );
    if let Some((t, m)) = pair {
        let q = [("tenant", t), ("model", m)];
        let _ = write!(
            out,
            r#" <span class="pair">{} / {}</span> <a href="{}">Models</a> <a href="{}">Training</a>"#,
            esc(t),
            esc(m),
            query("/models", &q),
            query("/training", &q)
        );
    }
    out.push_str("</nav>");
    let read: u64 = view.read.values().sum();
    let state = if view.caught_up { "live" } else { "reading history…" };
    let _ = write!(
        out,
        r#"<p class="status"><span id="caught-up" data-caught-up="{}">{state}</span> · <span id="records-read">{read}</span> records read"#,
        view.caught_up
    );
    if let Some((at, e)) = &view.probe.error {
        let _ = write!(
            out,
            r#" · <span class="warn" id="broker-error">broker unreachable since {}: {}</span>"#,
            utc(*at),
            esc(e)
        );
    }
    let _ = write!(out, "</p></header><main><h1>{}</h1>{body}</main>", esc(title));
    out.push_str(r#"<footer>Read-only view of the flywheel's topics. Times are UTC. Charts are drawn on the server.</footer></body></html>"#);
    out
}

/// The overview: every (tenant, base model) with its serving state.
pub(crate) fn index(view: &View, ctx: &Ctx<'_>) -> String {
    let mut b = String::new();
    if view.pairs.is_empty() {
        b.push_str(r#"<p class="empty">No registry entries, metrics, decisions or candidates yet.</p>"#);
    } else {
        b.push_str(r#"<table id="pairs"><thead><tr><th>tenant</th><th>base model</th><th>revision</th><th>live</th><th>canary</th><th>last release decision</th><th>trigger</th><th></th></tr></thead><tbody>"#);
        for ((t, m), p) in &view.pairs {
            let q = [("tenant", t.as_str()), ("model", m.as_str())];
            let e = p.registry.as_ref();
            let live = e.and_then(|e| e.live.as_ref()).map(|a| a.adapter_version.clone());
            let canary = e.and_then(|e| e.canary.as_ref());
            let last = e.and_then(|e| e.history.last());
            let _ = write!(
                b,
                r#"<tr data-tenant="{}" data-model="{}"><td>{}</td><td>{}</td><td class="revision">{}</td><td class="live">{}</td><td class="canary">{}</td><td>{}</td><td>{}</td><td><a href="{}">models</a> · <a href="{}">training</a></td></tr>"#,
                esc(t),
                esc(m),
                esc(t),
                esc(m),
                e.map(|e| e.revision.to_string()).unwrap_or_else(|| "—".into()),
                esc(&version_label(&live)),
                canary
                    .map(|c| format!("{} ({:.0} %)", esc(&c.adapter.adapter_version), c.traffic_share * 100.0))
                    .unwrap_or_else(|| "—".into()),
                last.map(|d| format!("{} {} · {}", action_name(d.action), esc(&d.adapter_version), utc(d.at)))
                    .unwrap_or_else(|| "—".into()),
                p.latest_decision()
                    .map(|d| if d.fired {
                        "fired".to_string()
                    } else {
                        format!("waiting ({} failing)", d.checks.iter().filter(|g| !g.passed).count())
                    })
                    .unwrap_or_else(|| "—".into()),
                query("/models", &q),
                query("/training", &q),
            );
        }
        b.push_str("</tbody></table>");
    }
    layout("Overview", Live::Records, view, ctx, None, &b)
}

/// The models page of one pair; `None` when nothing is known about it.
pub(crate) fn models(view: &View, ctx: &Ctx<'_>, tenant: &str, model: &str) -> Option<String> {
    let p = view.pairs.get(&(tenant.to_string(), model.to_string()))?;
    let settings = ctx.settings(tenant, model);
    let mut b = String::new();
    serving(&mut b, p, tenant, model);
    match p.chart_window_ms(settings.window_ms) {
        None => b.push_str(r#"<p class="empty">No reward-metrics windows for this model yet.</p>"#),
        Some(len) => version_charts(&mut b, p, len),
    }
    let episodes = p.canary_episodes(&settings);
    b.push_str(r#"<section id="canaries"><h2>Canaries: always-valid p-values over time</h2>"#);
    if episodes.is_empty() {
        b.push_str(r#"<p class="empty">No canary yet.</p>"#);
    }
    for e in episodes.iter().take(5) {
        canary(&mut b, e, &settings);
    }
    b.push_str("</section>");
    history(&mut b, p, tenant, model);
    Some(layout(&format!("Models · {tenant} / {model}"), Live::Records, view, ctx, Some((tenant, model)), &b))
}

fn serving(b: &mut String, p: &PairView, tenant: &str, model: &str) {
    b.push_str(r#"<section id="serving" class="cards">"#);
    match &p.registry {
        None => b.push_str(r#"<div class="card"><h3>Live</h3><p><span id="live-version" data-version="">base model</span></p><p class="note">no registry entry yet</p></div>"#),
        Some(e) => {
            let live = e.live.as_ref().map(|a| a.adapter_version.clone());
            let _ = write!(
                b,
                r#"<div class="card"><h3>Live</h3><p><span id="live-version" data-version="{}">{}</span></p><p class="note">registry revision <span id="registry-revision">{}</span> · updated {}</p>"#,
                esc(live.as_deref().unwrap_or("")),
                esc(&version_label(&live)),
                e.revision,
                utc(e.updated_at)
            );
            if let Some(v) = &live {
                let _ = write!(b, r#"<p><a href="{}">lineage</a></p>"#, query("/lineage", &[("tenant", tenant), ("model", model), ("adapter", v)]));
            }
            b.push_str("</div>");
            match &e.canary {
                None => b.push_str(r#"<div class="card"><h3>Canary</h3><p><span id="canary-version" data-version="">none</span></p></div>"#),
                Some(c) => {
                    let v = &c.adapter.adapter_version;
                    let _ = write!(
                        b,
                        r#"<div class="card"><h3>Canary</h3><p><span id="canary-version" data-version="{}">{}</span></p><p class="note"><span id="canary-share">{:.0}</span> % of users since {}</p><p><a href="{}">lineage</a></p></div>"#,
                        esc(v),
                        esc(v),
                        c.traffic_share * 100.0,
                        utc(c.started_at),
                        query("/lineage", &[("tenant", tenant), ("model", model), ("adapter", v)])
                    );
                }
            }
        }
    }
    b.push_str("</section>");
}

fn version_charts(b: &mut String, p: &PairView, len: i64) {
    let versions = p.versions();
    let mut rate = Vec::new();
    let mut reward = Vec::new();
    for v in &versions {
        let label = version_label(v);
        let all = p.buckets(v, len);
        let buckets = &all[all.len().saturating_sub(CHART_WINDOWS)..];
        let point = |bk: &crate::view::Bucket, y: Option<f64>, band: Option<(f64, f64)>, what: &str| Point {
            x: bk.end as f64,
            y: y.unwrap_or(f64::NAN),
            band,
            tip: format!(
                "{label} · window ending {} · {what} {} [{}, {}] · {} shown",
                utc(bk.end),
                num(y, 4),
                num(band.map(|b| b.0), 4),
                num(band.map(|b| b.1), 4),
                bk.stats.shown
            ),
        };
        rate.push(Series {
            label: label.clone(),
            points: buckets
                .iter()
                .map(|bk| point(bk, bk.stats.accept_rate(), bk.stats.accept_rate_95(), "accept rate"))
                .collect(),
        });
        reward.push(Series {
            label: label.clone(),
            points: buckets
                .iter()
                .map(|bk| point(bk, bk.stats.mean_reward(), bk.stats.mean_reward_95(), "mean reward"))
                .collect(),
        });
    }
    let _ = write!(
        b,
        r#"<section id="versions-over-time"><h2>Accept rate per version <small>({} windows, the newest {CHART_WINDOWS} per version, 95 % Wilson bands)</small></h2><div id="accept-rate-chart">{}</div>"#,
        duration(len),
        line_chart(&Chart {
            title: "accept rate per version".into(),
            scale: Scale::Linear,
            y_bounds: Some((0.0, 1.0)),
            series: rate,
            threshold: None,
            markers: Vec::new(),
            max_gap: Some(1.5 * len as f64),
        })
    );
    let _ = write!(
        b,
        r#"<h2>Mean reward per version <small>(95 % normal bands)</small></h2><div id="mean-reward-chart">{}</div>"#,
        line_chart(&Chart {
            title: "mean reward per version".into(),
            scale: Scale::Linear,
            y_bounds: None,
            series: reward,
            threshold: None,
            markers: Vec::new(),
            max_gap: Some(1.5 * len as f64),
        })
    );
    let _ = write!(
        b,
        r#"<table id="versions" data-window-ms="{len}"><thead><tr><th>version</th><th>windows</th><th>shown</th><th>accepted</th><th>accept rate</th><th>95 % interval</th><th>mean reward</th><th>95 % interval</th></tr></thead><tbody>"#
    );
    for v in &versions {
        let (t, windows): (WindowStats, usize) = p.totals(v, len);
        let ar = t.accept_rate_95();
        let mr = t.mean_reward_95();
        let _ = write!(
            b,
            r#"<tr data-version="{}"><td>{}</td><td class="windows">{windows}</td><td class="shown">{}</td><td class="accepted">{}</td><td class="accept-rate">{}</td><td class="accept-ci">[{}, {}]</td><td class="mean-reward">{}</td><td class="reward-ci">[{}, {}]</td></tr>"#,
            esc(v.as_deref().unwrap_or("")),
            esc(&version_label(v)),
            t.shown,
            t.accepted,
            num(t.accept_rate(), 4),
            num(ar.map(|x| x.0), 4),
            num(ar.map(|x| x.1), 4),
            num(t.mean_reward(), 4),
            num(mr.map(|x| x.0), 4),
            num(mr.map(|x| x.1), 4),
        );
    }
    b.push_str("</tbody></table></section>");
}

fn canary(b: &mut String, e: &Episode, s: &TestSettings) {
    let control = match &e.control {
        Some(c) => esc(&version_label(c)),
        None => "unknown (history compacted)".into(),
    };
    let state = match e.ended {
        None => format!("running since {}", utc(e.started_at)),
        Some((a, at)) => format!("{} {} → {} {}", "started", utc(e.started_at), action_name(a), utc(at)),
    };
    let _ = write!(
        b,
        r#"<article class="canary" data-adapter="{}" data-state="{}"><h3>{} vs {control} <small>{state}</small></h3>"#,
        esc(&e.adapter),
        e.ended.map(|x| action_class(x.0)).unwrap_or("running"),
        esc(&e.adapter)
    );
    let point = |at: i64, y: f64, what: &str, shown: Option<(i64, i64)>| Point {
        x: at as f64,
        y,
        band: None,
        tip: match shown {
            Some((t, c)) => format!("{what} p = {} at {} · {t} vs {c} shown", p_value(y), utc(at)),
            None => format!("{what} p = {} recorded by the gate at {}", p_value(y), utc(at)),
        },
    };
    let series = vec![
        Series {
            label: "accept rate".into(),
            points: e
                .looks
                .iter()
                .map(|l| point(l.at, l.accept_p, "accept rate", Some((l.canary_shown, l.control_shown))))
                .collect(),
        },
        Series {
            label: "mean reward".into(),
            points: e
                .looks
                .iter()
                .map(|l| point(l.at, l.reward_p, "mean reward", Some((l.canary_shown, l.control_shown))))
                .collect(),
        },
    ];
    let mut markers = Vec::new();
    for r in &e.recorded {
        if let Some(p) = r.accept_p {
            markers.push((0, point(r.at, p, "accept rate", None)));
        }
        if let Some(p) = r.reward_p {
            markers.push((1, point(r.at, p, "mean reward", None)));
        }
    }
    b.push_str(&line_chart(&Chart {
        title: format!("always-valid p-values of {}", e.adapter),
        scale: Scale::Log { floor: 1e-10 },
        y_bounds: None,
        series,
        threshold: Some((e.alpha, format!("α = {}", e.alpha))),
        markers,
        max_gap: None,
    }));
    match e.looks.last() {
        Some(l) => {
            let _ = write!(
                b,
                r#"<p class="look">Last look ({} windows, recomputed with the gate's mSPRT, τ = {} / {}): canary <span class="canary-shown">{}</span> vs control <span class="control-shown">{}</span> shown; accept-rate p = <span class="accept-p">{}</span>, mean-reward p = <span class="reward-p">{}</span>; α = <span class="alpha">{}</span>.</p>"#,
                duration(s.window_ms),
                s.accept_rate_tau,
                s.reward_tau,
                l.canary_shown,
                l.control_shown,
                p_value(l.accept_p),
                p_value(l.reward_p),
                e.alpha
            );
        }
        None => {
            b.push_str(r#"<p class="look empty">No metrics window of the gate's length since the canary started.</p>"#)
        }
    }
    if e.ended.is_some() && !e.recorded.is_empty() {
        b.push_str(r#"<p class="note">Recomputed from every window published by the decision's time; the gate decides on the first record that crosses α, so records published in the same instant can make its numbers (below) differ slightly.</p>"#);
    }
    for r in &e.recorded {
        let _ = write!(
            b,
            r#"<p class="recorded">Gate at {} ({}): accept-rate p = <span class="accept-p">{}</span>, mean-reward p = <span class="reward-p">{}</span>.</p>"#,
            utc(r.at),
            action_name(r.action),
            r.accept_p.map(p_value).unwrap_or_else(|| "—".into()),
            r.reward_p.map(p_value).unwrap_or_else(|| "—".into())
        );
    }
    b.push_str("</article>");
}

/// A decision statistic, short: integers whole, others to four places (or
/// three significant digits when tiny). The exact value is in the title.
pub(crate) fn short_number(v: f64) -> String {
    if !v.is_finite() {
        format!("{v}")
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

fn statistics(stats: &std::collections::BTreeMap<String, f64>) -> String {
    let items: Vec<String> = stats
        .iter()
        .map(|(k, v)| {
            format!(
                r#"<span class="stat" data-key="{}" data-value="{v}" title="{v}">{} = {}</span>"#,
                esc(k),
                esc(k),
                short_number(*v)
            )
        })
        .collect();
    items.join(" ")
}

fn history(b: &mut String, p: &PairView, tenant: &str, model: &str) {
    b.push_str(r#"<section id="history"><h2>Release history</h2>"#);
    let h = p.release_history();
    if h.is_empty() {
        b.push_str(r#"<p class="empty">No release decision yet.</p></section>"#);
        return;
    }
    b.push_str(r#"<table id="release-history"><thead><tr><th>revision</th><th>time</th><th>action</th><th>adapter</th><th>reason</th><th>statistics</th></tr></thead><tbody>"#);
    for d in h.iter().rev() {
        let v = &d.decision.adapter_version;
        let _ = write!(
            b,
            r#"<tr data-revision="{}" class="{}"><td>{}</td><td>{}</td><td class="action">{}</td><td><a href="{}">{}</a></td><td class="reason">{}</td><td class="stats">{}</td></tr>"#,
            d.revision,
            action_class(d.decision.action),
            d.revision,
            utc(d.decision.at),
            action_name(d.decision.action),
            query("/lineage", &[("tenant", tenant), ("model", model), ("adapter", v)]),
            esc(v),
            esc(&d.decision.reason),
            statistics(&d.decision.statistics)
        );
    }
    b.push_str("</tbody></table></section>");
}

/// The lineage of one adapter: candidate → train request → shards → offsets.
pub(crate) fn lineage(view: &View, ctx: &Ctx<'_>, tenant: &str, model: &str, adapter: &str) -> Option<String> {
    let p = view.pairs.get(&(tenant.to_string(), model.to_string()))?;
    let mut b = String::new();
    let decisions: Vec<_> = p.release_history().into_iter().filter(|d| d.decision.adapter_version == adapter).collect();
    let candidate = p.candidates.get(adapter);
    if candidate.is_none() && decisions.is_empty() {
        return None;
    }
    match candidate {
        None => {
            b.push_str(r#"<p class="empty" id="candidate">The candidate record is not on the topic (retention).</p>"#)
        }
        Some(c) => {
            let _ = write!(
                b,
                r#"<section id="candidate"><h2>Candidate</h2><dl><dt>adapter</dt><dd>{}</dd><dt>parent</dt><dd>{}</dd><dt>trained</dt><dd>{} · {} · {} steps, {} tokens, {:.1} s on {}</dd><dt>adapter files</dt><dd>{} (sha256 {})</dd><dt>train request</dt><dd id="request-id">{}</dd></dl></section>"#,
                esc(&c.adapter_version),
                esc(c.parent_adapter_version.as_deref().unwrap_or("base model")),
                utc(c.created_at),
                objective_name(c.objective),
                c.steps,
                c.tokens,
                c.train_seconds,
                esc(&c.device),
                esc(&c.adapter_uri),
                esc(&c.adapter_sha256),
                esc(&c.request_id)
            );
            match p.requests.get(&c.request_id) {
                None => b.push_str(
                    r#"<p class="empty" id="request">The train request is not on the topic (retention).</p>"#,
                ),
                Some(r) => request_lineage(&mut b, view, r),
            }
        }
    }
    if !decisions.is_empty() {
        b.push_str(r#"<section><h2>Release decisions about it</h2><ul id="adapter-decisions">"#);
        for d in &decisions {
            let _ = write!(
                b,
                "<li>revision {} · {} · {}: {}</li>",
                d.revision,
                utc(d.decision.at),
                action_name(d.decision.action),
                esc(&d.decision.reason)
            );
        }
        b.push_str("</ul></section>");
    }
    Some(layout(&format!("Lineage · {adapter}"), Live::Records, view, ctx, Some((tenant, model)), &b))
}

fn request_lineage(b: &mut String, view: &View, r: &TrainRequest) {
    let _ = write!(
        b,
        r#"<section id="request"><h2>Train request</h2><dl><dt>id</dt><dd>{}</dd><dt>created</dt><dd>{}</dd><dt>events</dt><dd>{} → {}</dd><dt>policy</dt><dd>{}</dd><dt>objective</dt><dd>{} · rank {} · lr {} · {} steps × {}</dd><dt>holdout</dt><dd>{:.0} % (salt {})</dd></dl></section>"#,
        esc(&r.request_id),
        utc(r.created_at),
        utc(r.window_start),
        utc(r.window_end),
        esc(&r.policy_version),
        objective_name(r.objective.kind),
        r.objective.lora_rank,
        r.objective.learning_rate,
        r.objective.max_steps,
        r.objective.batch_size,
        r.holdout.fraction * 100.0,
        esc(&r.holdout.salt)
    );
    b.push_str(r#"<section id="shards"><h2>Shards and the reward offsets they hold</h2><table id="lineage-shards"><thead><tr><th>shard</th><th>rows</th><th>source</th><th>first offset</th><th>last offset</th><th>events</th><th>committed</th><th>file</th></tr></thead><tbody>"#);
    let mut rows = 0;
    for s in &r.shards {
        rows += s.rows;
        match view.shards.get(&s.shard_id) {
            Some(m) => {
                let _ = write!(
                    b,
                    r#"<tr data-shard="{}"><td>{}</td><td class="rows">{}</td><td class="source">{} / {}</td><td class="first-offset">{}</td><td class="last-offset">{}</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>"#,
                    esc(&s.shard_id),
                    esc(&s.shard_id),
                    s.rows,
                    esc(&m.source.topic),
                    m.source.partition,
                    m.source.first_offset,
                    m.source.last_offset,
                    utc(m.min_event_time),
                    utc(m.max_event_time),
                    utc(m.committed_at),
                    esc(&s.uri)
                );
            }
            None => {
                let _ = write!(
                    b,
                    r#"<tr data-shard="{}"><td>{}</td><td class="rows">{}</td><td colspan="5" class="note">manifest not on the shards topic</td><td>{}</td></tr>"#,
                    esc(&s.shard_id),
                    esc(&s.shard_id),
                    s.rows,
                    esc(&s.uri)
                );
            }
        }
    }
    let _ = write!(
        b,
        r#"</tbody><tfoot><tr><td>{} shards</td><td id="lineage-rows">{rows}</td><td colspan="6"></td></tr></tfoot></table></section>"#,
        r.shards.len()
    );
}

/// The training page of one pair: the trigger's decision, requests, candidates.
pub(crate) fn training(view: &View, ctx: &Ctx<'_>, tenant: &str, model: &str) -> Option<String> {
    let p = view.pairs.get(&(tenant.to_string(), model.to_string()))?;
    let mut b = String::new();
    b.push_str(r#"<section id="trigger"><h2>The trigger's latest decision</h2>"#);
    match p.latest_decision() {
        None => b.push_str(r#"<p class="empty">No trigger decision yet.</p>"#),
        Some(d) => {
            let failing: Vec<String> = d.checks.iter().filter(|g| !g.passed).map(|g| esc(&g.check)).collect();
            let verdict = if d.fired {
                format!("fired: train request {}", esc(d.train_request_id.as_deref().unwrap_or("?")))
            } else if failing.is_empty() {
                "not fired".into()
            } else {
                format!("not training because: {}", failing.join(", "))
            };
            let _ = write!(
                b,
                r#"<p><span id="trigger-fired" data-fired="{}">{verdict}</span> · evaluated {} · policy {} · {} shards pending</p>"#,
                d.fired,
                utc(d.evaluated_at),
                esc(&d.policy_version),
                d.shard_ids.len()
            );
            b.push_str(r#"<table id="checks"><thead><tr><th>check</th><th>verdict</th><th>observed</th><th></th><th>threshold</th><th>message</th></tr></thead><tbody>"#);
            for g in &d.checks {
                let _ = write!(
                    b,
                    r#"<tr data-check="{}" class="{}"><td>{}</td><td class="verdict">{}</td><td class="observed">{}</td><td class="comparison">{}</td><td class="threshold">{}</td><td class="message">{}</td></tr>"#,
                    esc(&g.check),
                    if g.passed { "pass" } else { "fail" },
                    esc(&g.check),
                    if g.passed { "✓ passed" } else { "✗ failed" },
                    esc(&format!("{}", g.observed)),
                    esc(&g.comparison),
                    esc(&format!("{}", g.threshold)),
                    esc(&g.message)
                );
            }
            b.push_str("</tbody></table>");
        }
    }
    if p.decisions.len() > 1 {
        b.push_str(r#"<h3>Earlier decisions</h3><ul id="earlier-decisions">"#);
        for d in p.decisions.iter().rev().skip(1).take(10) {
            let failing: Vec<String> = d.checks.iter().filter(|g| !g.passed).map(|g| esc(&g.check)).collect();
            let _ = write!(
                b,
                "<li>{} · {}</li>",
                utc(d.evaluated_at),
                if d.fired { "fired".to_string() } else { format!("not fired ({})", failing.join(", ")) }
            );
        }
        b.push_str("</ul>");
    }
    b.push_str("</section>");
    running_job(&mut b, view);
    requests(&mut b, p, tenant, model);
    candidates(&mut b, p, tenant, model);
    Some(layout(
        &format!("Training · {tenant} / {model}"),
        Live::RecordsAndTrainer,
        view,
        ctx,
        Some((tenant, model)),
        &b,
    ))
}

/// The trainers' last scrapes: busy or idle, step / steps with a progress
/// bar, loss, tokens/s and ETA (a job's progress is on no topic).
fn running_job(b: &mut String, view: &View) {
    b.push_str(r#"<section id="running-job"><h2>Running job</h2>"#);
    if view.trainers.is_empty() {
        b.push_str(r#"<p class="note" id="trainer-not-configured">trainer progress: not configured (--trainer-metrics-url)</p></section>"#);
        return;
    }
    for t in &view.trainers {
        let _ = write!(b, r#"<div class="trainer" data-url="{}">"#, esc(&t.url));
        match &t.last {
            None => {
                let _ =
                    write!(b, r#"<p class="note">trainer metrics: not scraped yet (<code>{}</code>)</p>"#, esc(&t.url));
            }
            Some((at, Err(e))) => {
                let _ = write!(
                    b,
                    r#"<p class="trainer-error">trainer metrics unreachable: {}</p><p class="note">at {} · <code>{}</code></p>"#,
                    esc(e),
                    utc(*at),
                    esc(&t.url)
                );
            }
            Some((at, Ok(p))) => {
                let _ = write!(
                    b,
                    r#"<p><span class="trainer-state" data-busy="{}">{}</span> · scraped {} · <code>{}</code></p>"#,
                    p.busy,
                    if p.busy { "busy: a job is running" } else { "idle" },
                    utc(*at),
                    esc(&t.url)
                );
                match (p.step, p.steps) {
                    (Some(step), Some(steps)) if steps > 0.0 => {
                        let _ = write!(
                            b,
                            r#"<p class="job">{}<progress class="job-progress" max="{steps:.0}" value="{step:.0}">{:.0} %</progress> step <span class="job-step">{step:.0}</span> / <span class="job-steps">{steps:.0}</span> · loss <span class="job-loss">{}</span> · <span class="job-tokens-per-second">{}</span> tokens/s · ETA <span class="job-eta">{}</span></p>"#,
                            if p.busy { "" } else { "last job: " },
                            100.0 * step / steps,
                            num(p.loss, 4),
                            num(p.tokens_per_second, 1),
                            match p.eta_seconds {
                                Some(s) if p.busy => duration((s * 1000.0) as i64),
                                _ => "—".into(),
                            }
                        );
                    }
                    _ => b.push_str(r#"<p class="empty">No job since the trainer started.</p>"#),
                }
            }
        }
        b.push_str("</div>");
    }
    b.push_str(r#"<p class="note">The trainer's metrics do not name the pair: the job may be another tenant's or model's.</p></section>"#);
}

fn requests(b: &mut String, p: &PairView, tenant: &str, model: &str) {
    b.push_str(r#"<section id="requests"><h2>Train requests</h2>"#);
    if p.requests.is_empty() {
        b.push_str(r#"<p class="empty">No train request yet.</p></section>"#);
        return;
    }
    let mut list: Vec<&TrainRequest> = p.requests.values().collect();
    list.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    b.push_str(r#"<table id="train-requests"><thead><tr><th>request</th><th>created</th><th>parent</th><th>shards</th><th>rows</th><th>objective</th><th>candidate</th></tr></thead><tbody>"#);
    for r in list {
        let candidate = p.candidates.values().find(|c| c.request_id == r.request_id);
        let _ = write!(
            b,
            r#"<tr data-request="{}"><td class="id">{}</td><td>{}</td><td>{}</td><td class="shards">{}</td><td class="rows">{}</td><td>{} · {} steps</td><td>{}</td></tr>"#,
            esc(&r.request_id),
            esc(&r.request_id),
            utc(r.created_at),
            esc(r.parent_adapter_version.as_deref().unwrap_or("base model")),
            r.shards.len(),
            r.shards.iter().map(|s| s.rows).sum::<i64>(),
            objective_name(r.objective.kind),
            r.objective.max_steps,
            match candidate {
                Some(c) => format!(
                    r#"<a href="{}">{}</a>"#,
                    query("/lineage", &[("tenant", tenant), ("model", model), ("adapter", &c.adapter_version)]),
                    esc(&c.adapter_version)
                ),
                None => "not yet".into(),
            }
        );
    }
    b.push_str("</tbody></table></section>");
}

fn candidates(b: &mut String, p: &PairView, tenant: &str, model: &str) {
    b.push_str(r#"<section id="candidates"><h2>Candidates and their holdout metrics</h2>"#);
    if p.candidates.is_empty() {
        b.push_str(r#"<p class="empty">No candidate yet.</p></section>"#);
        return;
    }
    let mut list: Vec<&ModelCandidate> = p.candidates.values().collect();
    list.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    let history = p.release_history();
    b.push_str(r#"<table id="candidate-table"><thead><tr><th>adapter</th><th>created</th><th>parent</th><th>objective</th><th>train / holdout</th><th>steps</th><th>tokens</th><th>seconds</th><th>KL to parent</th><th>holdout metrics (candidate vs parent)</th><th>release</th></tr></thead><tbody>"#);
    for c in list {
        let keys: BTreeSet<&String> = c.candidate_metrics.keys().chain(c.parent_metrics.keys()).collect();
        let metrics: Vec<String> = keys
            .into_iter()
            .map(|k| {
                format!(
                    r#"<span class="metric" data-key="{}">{}: <span class="candidate-value">{}</span> vs <span class="parent-value">{}</span></span>"#,
                    esc(k),
                    esc(k),
                    num(c.candidate_metrics.get(k).copied(), 4),
                    num(c.parent_metrics.get(k).copied(), 4)
                )
            })
            .collect();
        let release = history
            .iter()
            .rev()
            .find(|d| d.decision.adapter_version == c.adapter_version)
            .map(|d| action_name(d.decision.action))
            .unwrap_or("undecided");
        let _ = write!(
            b,
            r#"<tr data-adapter="{}"><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="examples">{} / {}</td><td class="steps">{}</td><td class="tokens">{}</td><td>{:.1}</td><td class="kl">{}</td><td class="metrics">{}</td><td class="release">{release}</td></tr>"#,
            esc(&c.adapter_version),
            query("/lineage", &[("tenant", tenant), ("model", model), ("adapter", &c.adapter_version)]),
            esc(&c.adapter_version),
            utc(c.created_at),
            esc(c.parent_adapter_version.as_deref().unwrap_or("base model")),
            objective_name(c.objective),
            c.train_examples,
            c.holdout_examples,
            c.steps,
            c.tokens,
            c.train_seconds,
            num(Some(c.kl_to_parent), 4),
            metrics.join("<br>")
        );
    }
    b.push_str("</tbody></table></section>");
}

/// Shows dead-letter bytes safely: a known record as its JSON form, other
/// bytes as text with control characters spelled out. The caller escapes.
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    if let Ok((kind, json)) = flywheel_core::Codec::global().decode_to_json(bytes) {
        let pretty = serde_json::to_string_pretty(&json).unwrap_or_default();
        return format!("{kind} record:\n{pretty}");
    }
    let mut out = String::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

fn hex_preview(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
    format!("{}{}", head.join(" "), if bytes.len() > 32 { " …" } else { "" })
}

/// The pipeline page: throughput, lag, rows landed, dead letters.
pub(crate) fn pipeline(view: &View, ctx: &Ctx<'_>) -> String {
    let mut b = String::new();
    let [interactions, rewards] = ctx.throughput_topics;
    let _ = write!(
        b,
        r#"<section id="throughput" class="cards"><div class="card"><h3>Events/s</h3><p id="events-per-s">{}</p><p class="note">{} in <code>{}</code></p></div><div class="card"><h3>Rewards/s</h3><p id="rewards-per-s">{}</p><p class="note">{} in <code>{}</code></p></div><div class="card"><h3>Dead letters</h3><p id="dead-letter-total">{}</p></div><div class="card"><h3>Shards</h3><p id="shard-total">{}</p><p class="note"><span id="rows-total">{}</span> rows</p></div></section>"#,
        num(view.probe.rate(interactions, 60_000), 1),
        view.probe.end(interactions).map(|n| n.to_string()).unwrap_or_else(|| "—".into()),
        esc(interactions),
        num(view.probe.rate(rewards, 60_000), 1),
        view.probe.end(rewards).map(|n| n.to_string()).unwrap_or_else(|| "—".into()),
        esc(rewards),
        view.dead_letter_total(),
        view.shards.len(),
        view.shards.values().map(|s| s.rows).sum::<i64>()
    );
    b.push_str(r#"<p class="note">Rates: growth of the topics' end offsets over the last minute.</p>"#);

    b.push_str(r#"<section id="lag"><h2>Consumer lag</h2>"#);
    if view.probe.lag.is_empty() {
        b.push_str(r#"<p class="empty">No probe yet.</p>"#);
    } else {
        b.push_str(r#"<table id="lag-table"><thead><tr><th>group</th><th>topic</th><th>partition</th><th>end</th><th>committed</th><th>lag</th></tr></thead><tbody>"#);
        for g in &view.probe.lag {
            for (p, (end, committed)) in &g.partitions {
                let _ = write!(
                    b,
                    r#"<tr data-group="{}" data-partition="{p}"><td>{}</td><td>{}</td><td>{p}</td><td class="end">{end}</td><td class="committed">{}</td><td class="lag">{}</td></tr>"#,
                    esc(&g.group),
                    esc(&g.group),
                    esc(&g.topic),
                    committed.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                    committed.map(|c| (end - c).max(0).to_string()).unwrap_or_else(|| "—".into())
                );
            }
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");

    shards(&mut b, view);
    dead_letters(&mut b, view);
    if !view.undecodable.is_empty() {
        b.push_str(r#"<section><h2>Records the console could not decode</h2><ul id="undecodable">"#);
        for (s, n) in &view.undecodable {
            let _ = write!(b, "<li>{}: {n}</li>", s.topic().default_name());
        }
        b.push_str("</ul></section>");
    }
    layout("Pipeline", Live::RecordsAndProbes, view, ctx, None, &b)
}

fn shards(b: &mut String, view: &View) {
    b.push_str(r#"<section id="rows-per-hour"><h2>Rows landed in the lake per hour and tenant</h2>"#);
    let per = view.rows_per_hour();
    let hours: Vec<i64> = per.keys().map(|k| k.0).collect::<BTreeSet<_>>().into_iter().rev().take(24).rev().collect();
    let tenants: BTreeSet<&String> = per.keys().map(|k| &k.1).collect();
    let categories: Vec<String> = hours.iter().map(|h| crate::text::day_clock(*h)).collect();
    let series: Vec<(String, Vec<f64>)> = tenants
        .iter()
        .map(|t| {
            let values = hours.iter().map(|h| per.get(&(*h, (*t).clone())).map_or(0.0, |v| v.0 as f64)).collect();
            ((*t).clone(), values)
        })
        .collect();
    b.push_str(&bar_chart("rows landed per hour and tenant", &categories, &series));
    if !per.is_empty() {
        b.push_str(r#"<table id="rows-table"><thead><tr><th>hour (UTC, commit time)</th><th>tenant</th><th>shards</th><th>rows</th></tr></thead><tbody>"#);
        for ((h, t), (rows, n)) in per.iter().rev() {
            let _ = write!(
                b,
                r#"<tr data-hour="{h}" data-tenant="{}"><td>{}</td><td>{}</td><td class="shards">{n}</td><td class="rows">{rows}</td></tr>"#,
                esc(t),
                utc(*h),
                esc(t)
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
}

fn dead_letters(b: &mut String, view: &View) {
    b.push_str(r#"<section id="dead-letters"><h2>Dead letters per reason</h2>"#);
    if view.dead_letters.is_empty() {
        b.push_str(r#"<p class="empty">No dead letters.</p></section>"#);
        return;
    }
    b.push_str(r#"<table id="dead-letter-table"><thead><tr><th>service</th><th>reason</th><th>count</th><th>last</th></tr></thead><tbody>"#);
    for ((service, code), r) in &view.dead_letters {
        let _ = write!(
            b,
            r#"<tr data-service="{}" data-reason="{}"><td>{}</td><td>{}</td><td class="count">{}</td><td>{}</td></tr>"#,
            esc(service),
            esc(code),
            esc(service),
            esc(code),
            r.count,
            utc(r.last_at)
        );
    }
    b.push_str("</tbody></table>");
    for ((service, code), r) in &view.dead_letters {
        let Some(d) = r.samples.back() else { continue };
        let _ = write!(
            b,
            r#"<details class="sample" data-service="{}" data-reason="{}"><summary>{} · {}: newest of {}</summary><p class="dl-reason">{}</p><p>from {} partition {} offset {} · failed {}</p>"#,
            esc(service),
            esc(code),
            esc(service),
            esc(code),
            r.count,
            esc(&d.reason),
            esc(&d.source.topic),
            d.source.partition,
            d.source.offset,
            utc(d.failed_at)
        );
        if let Some(k) = &d.original_key {
            let _ = write!(b, r#"<p>key: <code class="dl-key">{}</code></p>"#, esc(&show_bytes(k)));
        }
        if let Some(v) = &d.original_value {
            let _ = write!(
                b,
                r#"<pre class="dl-value">{}</pre><p class="note">{} bytes shown · <code>{}</code></p>"#,
                esc(&show_bytes(v)),
                v.len(),
                hex_preview(v)
            );
        }
        b.push_str("</details>");
    }
    b.push_str("</section>");
}

/// A small page for errors (unknown pair, missing token).
pub(crate) fn message(title: &str, text: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · Flywheel console</title><link rel="stylesheet" href="/static/console.css"></head><body><header><nav><a class="brand" href="/">Flywheel console</a></nav></header><main><h1>{}</h1><p>{}</p></main></body></html>"#,
        esc(title),
        esc(title),
        esc(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::{registry_entries, window};
    use crate::view::{Record, Source};
    use flywheel_core::records::{CheckResult, DeadLetter, Interaction, SourcePosition, TriggerDecision};

    const XSS: &str = "<script>alert('owned')</script>";

    fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/../../schemas/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// A view with a promoted a1, a running a2, metrics, a decision, a
    /// request with its shard, a candidate, and hostile strings everywhere
    /// a record carries text.
    fn hostile_view() -> View {
        let mut v = View::default();
        let mut entries = registry_entries();
        entries[2].history[1].reason = format!("significantly better {XSS}");
        for e in entries {
            v.apply(Source::Registry, Some(Record::Registry(e)));
        }
        for i in 0..10 {
            let start = 60_000 + i * 60_000;
            v.apply(Source::Metrics, Some(Record::Metrics(window(Some("a1"), start, 60_000, 40, 24, 0), None)));
            v.apply(Source::Metrics, Some(Record::Metrics(window(None, start, 60_000, 120, 24, 0), None)));
        }
        let mut d: TriggerDecision = fixture("trigger_decision.not_fired.json");
        (d.tenant, d.base_model) = ("acme".into(), "tiny".into());
        d.checks.push(CheckResult {
            check: "distinct_users".into(),
            passed: false,
            observed: 3.0,
            threshold: 20.0,
            comparison: ">=".into(),
            message: format!("users {XSS}"),
        });
        v.apply(Source::Decisions, Some(Record::Decision(d)));
        let mut r: TrainRequest = fixture("train_request.reinforce.json");
        (r.tenant, r.base_model, r.request_id) = ("acme".into(), "tiny".into(), "req-a1".into());
        v.apply(Source::Requests, Some(Record::Request(r.clone())));
        let mut s: flywheel_core::records::ShardManifest = fixture("shard_manifest.committed.json");
        s.shard_id = r.shards[0].shard_id.clone();
        v.apply(Source::Shards, Some(Record::Shard(s)));
        let mut c: ModelCandidate = fixture("model_candidate.trained.json");
        (c.tenant, c.base_model, c.adapter_version, c.request_id) =
            ("acme".into(), "tiny".into(), "a1".into(), "req-a1".into());
        v.apply(Source::Candidates, Some(Record::Candidate(c)));
        let mut shown: Interaction = fixture("interaction.shown.json");
        if let flywheel_core::records::InteractionPayload::Shown(s) = &mut shown.payload {
            s.completion = XSS.into();
        }
        let dl = DeadLetter {
            service: "rewarder".into(),
            reason_code: "orphan_event".into(),
            reason: format!("no shown event {XSS}"),
            source: SourcePosition { topic: "interactions".into(), partition: 0, offset: 7 },
            original_key: Some(XSS.as_bytes().to_vec()),
            original_value: Some(flywheel_core::codec::encode(&shown).unwrap()),
            failed_at: 1,
        };
        v.apply(Source::DeadLetters, Some(Record::DeadLetter(dl)));
        let raw = DeadLetter {
            reason_code: "malformed_avro".into(),
            original_value: Some(format!("\u{1b}[31m{XSS}\u{0}").into_bytes()),
            original_key: None,
            ..fixture("dead_letter.malformed.json")
        };
        v.apply(Source::DeadLetters, Some(Record::DeadLetter(raw)));
        v.caught_up = true;
        v
    }

    fn pages(v: &View) -> Vec<(&'static str, String)> {
        let policies = flywheel_gate::service::Policies::default();
        let ctx = Ctx { refresh_ms: 5000, policies: &policies, throughput_topics: ["interactions", "rewards"] };
        vec![
            ("index", index(v, &ctx)),
            ("models", models(v, &ctx, "acme", "tiny").unwrap()),
            ("training", training(v, &ctx, "acme", "tiny").unwrap()),
            ("lineage", lineage(v, &ctx, "acme", "tiny", "a1").unwrap()),
            ("pipeline", pipeline(v, &ctx)),
        ]
    }

    #[test]
    fn no_page_lets_a_records_markup_through() {
        let v = hostile_view();
        for (name, html) in pages(&v) {
            // Our only script is the external live.js.
            assert_eq!(html.matches("<script").count(), 1, "{name}: {html}");
            assert!(!html.contains("alert('owned')") && !html.contains("onerror"), "{name}");
            assert!(html.starts_with("<!doctype html>") && html.ends_with("</html>"), "{name}");
        }
        let pipeline = &pages(&v)[4].1;
        // The completion inside a dead-lettered interaction is shown as text, as is the reason.
        assert!(
            pipeline
                .contains("&quot;completion&quot;: &quot;&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;&quot;"),
            "{pipeline}"
        );
        assert!(pipeline.contains("no shown event &lt;script&gt;"), "{pipeline}");
        // Raw bytes: control characters spelled out, markup escaped.
        assert!(pipeline.contains("\\u{1b}[31m&lt;script&gt;") && pipeline.contains("\\u{0}"), "{pipeline}");
        let models = &pages(&v)[1].1;
        assert!(models.contains("significantly better &lt;script&gt;"));
        let training = &pages(&v)[2].1;
        assert!(training.contains("users &lt;script&gt;"));
    }

    #[test]
    fn the_training_page_shows_each_trainers_progress_or_why_not() {
        use crate::trainer::Progress;
        use crate::view::TrainerScrape;
        let mut v = hostile_view();
        let training = |v: &View| pages(v)[2].1.clone();
        let html = training(&v);
        assert!(html.contains("trainer progress: not configured (--trainer-metrics-url)"), "{html}");
        assert!(html.contains(r#"data-live="records trainer""#));
        v.trainers =
            ["http://a:1/metrics", "http://b:2/metrics"].map(|u| TrainerScrape { url: u.into(), last: None }).to_vec();
        let busy = Progress {
            busy: true,
            step: Some(12.0),
            steps: Some(40.0),
            loss: Some(0.8125),
            tokens_per_second: Some(1534.25),
            eta_seconds: Some(74.0),
        };
        v.trainer_scraped(0, 0, Ok(busy.clone()));
        v.trainer_scraped(1, 0, Err(format!("connecting: refused {XSS}")));
        let changes = v.trainer_changes;
        v.trainer_scraped(0, 5_000, Ok(busy));
        assert_eq!(v.trainer_changes, changes, "the same progress again changes nothing");
        let html = training(&v);
        assert!(html.contains(&format!(r#"data-version="{}""#, v.changes + v.trainer_changes)));
        assert!(!html.contains("not configured"));
        assert!(html.contains(r#"<span class="trainer-state" data-busy="true">busy: a job is running</span>"#));
        assert!(html.contains(r#"<progress class="job-progress" max="40" value="12">30 %</progress>"#), "{html}");
        assert!(html.contains(r#"<span class="job-step">12</span> / <span class="job-steps">40</span>"#));
        assert!(html.contains(r#"<span class="job-loss">0.8125</span>"#));
        assert!(html.contains(r#"<span class="job-tokens-per-second">1534.2</span> tokens/s"#));
        assert!(html.contains(r#"<span class="job-eta">74 s</span>"#));
        assert!(html.contains("trainer metrics unreachable: connecting: refused &lt;script&gt;"), "{html}");
        assert_eq!(html.matches("<script").count(), 1);
        // Idle with no job yet, then idle after one: the last job, no ETA.
        let idle = Progress { steps: Some(0.0), ..Progress::default() };
        v.trainer_scraped(1, 0, Ok(idle));
        assert!(training(&v).contains("No job since the trainer started."));
        let done = Progress { step: Some(40.0), steps: Some(40.0), eta_seconds: Some(0.0), ..Progress::default() };
        v.trainer_scraped(0, 0, Ok(done));
        let html = training(&v);
        assert!(html.contains(r#"data-busy="false">idle</span>"#) && html.contains("last job: <progress"), "{html}");
        assert!(html.contains(r#"<span class="job-eta">—</span>"#));
    }

    #[test]
    fn the_models_page_shows_the_registry_and_the_numbers_of_the_windows() {
        let v = hostile_view();
        let html = &pages(&v)[1].1;
        assert!(html.contains(r#"<span id="live-version" data-version="a1">a1</span>"#), "{html}");
        assert!(html.contains(r#"<span id="canary-version" data-version="a2">a2</span>"#));
        assert!(html.contains(r#"<span id="registry-revision">3</span>"#));
        // a1: 10 windows × 40 shown, 24 accepted.
        assert!(html.contains(r#"<tr data-version="a1"><td>a1</td><td class="windows">10</td><td class="shown">400</td><td class="accepted">240</td><td class="accept-rate">0.6000</td>"#), "{html}");
        assert!(html.contains(r#"<tr data-version=""><td>base model</td><td class="windows">10</td><td class="shown">1200</td><td class="accepted">240</td><td class="accept-rate">0.2000</td>"#));
        // Two charts of 20 points each, a canary chart per episode.
        assert_eq!(html.matches(r#"data-points="20""#).count(), 2, "{html}");
        assert_eq!(html.matches(r#"<article class="canary""#).count(), 2);
        assert!(html.contains(r#"data-adapter="a1" data-state="promoted""#));
        assert!(html.contains(r#"data-adapter="a2" data-state="running""#));
        // Release history newest first, with lineage links.
        let r3 = html.find(r#"data-revision="3""#).unwrap();
        let r1 = html.find(r#"data-revision="1""#).unwrap();
        assert!(r3 < r1);
        assert!(html.contains(r#"href="/lineage?tenant=acme&amp;model=tiny&amp;adapter=a1""#));
        let stat = r#"<span class="stat" data-key="mean_reward_p_value" data-value="0.01" title="0.01">mean_reward_p_value = 0.0100</span>"#;
        assert!(html.contains(stat), "{html}");
        let short = [2674.0, 0.024676789, 0.0000123, -0.5].map(short_number);
        assert_eq!(short, ["2674", "0.0247", "1.23e-5", "-0.5000"]);
    }

    #[test]
    fn the_training_and_lineage_pages_explain_and_trace() {
        let v = hostile_view();
        let all = pages(&v);
        let training = &all[2].1;
        assert!(training.contains(r#"<tr data-check="reward_variance" class="fail"><td>reward_variance</td><td class="verdict">✗ failed</td><td class="observed">0.001</td><td class="comparison">&gt;=</td><td class="threshold">0.01</td>"#), "{training}");
        assert!(training.contains("not training because: reward_variance, distinct_users"));
        assert!(
            training.contains(r#"<tr data-request="req-a1">"#) && training.contains(r#"<td class="rows">2000</td>"#)
        );
        assert!(training.contains(r#"<span class="metric" data-key="holdout_loss">holdout_loss: <span class="candidate-value">1.8200</span> vs <span class="parent-value">1.9100</span></span>"#));
        assert!(training.contains(r#"<td class="release">promoted</td>"#));
        let lineage = &all[3].1;
        assert!(lineage.contains(r#"<td class="first-offset">100</td><td class="last-offset">2099</td>"#), "{lineage}");
        assert!(lineage.contains(r#"<td id="lineage-rows">2000</td>"#));
    }

    #[test]
    fn the_pipeline_page_counts_dead_letters_and_rows() {
        let v = hostile_view();
        let html = &pages(&v)[4].1;
        assert!(html.contains(r#"<tr data-service="rewarder" data-reason="orphan_event"><td>rewarder</td><td>orphan_event</td><td class="count">1</td>"#), "{html}");
        assert!(html.contains(r#"<p id="dead-letter-total">2</p>"#));
        assert!(html.contains(r#"<p id="shard-total">1</p>"#) && html.contains(r#"<span id="rows-total">2000</span>"#));
        assert!(html.contains(r#"data-live="records probes""#));
    }

    #[test]
    fn unknown_pairs_and_adapters_have_no_page() {
        let v = hostile_view();
        let policies = flywheel_gate::service::Policies::default();
        let ctx = Ctx { refresh_ms: 5000, policies: &policies, throughput_topics: ["i", "r"] };
        assert!(models(&v, &ctx, "nobody", "tiny").is_none());
        assert!(lineage(&v, &ctx, "acme", "tiny", "a9").is_none());
        assert!(message("<x>", "<y>").contains("&lt;x&gt;"));
    }
}
