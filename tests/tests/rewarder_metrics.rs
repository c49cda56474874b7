//! The rewarder's rolling metrics equal an independent recomputation from the
//! rewards it emitted, on a large random stream with out-of-order, duplicate,
//! late and very late events over several served versions (no broker needed;
//! the broker test in `rewarder.rs` checks the same on the topics).

use std::collections::BTreeMap;

use flywheel_core::records::*;
use flywheel_core::rng::SplitMix;
use flywheel_rewarder::join::{Emitted, JoinConfig, PartitionJoiner};
use flywheel_rewarder::reward_fn::RewardFunction;
use flywheel_tests::metrics_oracle::{assert_published_match, published, recompute};

const T0: i64 = 1_795_424_400_000;
const MIN: i64 = 60_000;

/// Events with the delivery time they reach the rewarder at.
fn random_stream(seed: u64, suggestions: usize) -> Vec<(i64, Interaction)> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::new();
    let mut n = 0u64;
    let mut ev = |rng: &mut SplitMix, s: &str, tenant: &str, t: i64, payload: InteractionPayload| {
        n += 1;
        Interaction {
            event_id: format!("00000000-0000-4000-8000-{n:012}"),
            event_time: t,
            received_time: t,
            tenant: tenant.into(),
            user_id: format!("user-{}", rng.below(40)),
            session_id: None,
            suggestion_id: s.into(),
            payload,
            attributes: BTreeMap::new(),
        }
    };
    for i in 0..suggestions {
        let s = format!("s-{i}");
        let tenant = *rng.pick(&["acme", "globex"]);
        let shown_at = T0 + i as i64 * 1500 + rng.below(1000) as i64;
        let completion: String = "x".repeat(5 + rng.below(60) as usize);
        let shown = InteractionPayload::Shown(SuggestionShown {
            model_id: "tiny".into(),
            adapter_version: rng.pick(&[None, Some("a1"), Some("a2")]).map(String::from),
            experiment_arm: rng.pick(&[None, Some("live"), Some("canary")]).map(String::from),
            surface: rng.pick(&["editor", "chat"]).to_string(),
            prompt: "p".into(),
            completion: completion.clone(),
            behavior_logprob: None,
            latency_ms: 3,
        });
        let mut events = vec![ev(&mut rng, &s, tenant, shown_at, shown)];
        let mut t = shown_at;
        match rng.below(4) {
            0 | 1 => {
                let tta = 50 + rng.below(20_000) as i64;
                t += tta;
                let accepted = InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: tta });
                events.push(ev(&mut rng, &s, tenant, t, accepted));
                if rng.below(2) == 0 {
                    t += 1000;
                    let edited = if rng.below(2) == 0 {
                        SuggestionEdited { final_text: None, edit_distance: Some(rng.below(30) as i64) }
                    } else {
                        SuggestionEdited { final_text: Some("y".repeat(rng.below(40) as usize)), edit_distance: None }
                    };
                    events.push(ev(&mut rng, &s, tenant, t, InteractionPayload::Edited(edited)));
                }
            }
            2 => {
                t += 400;
                events.push(ev(&mut rng, &s, tenant, t, InteractionPayload::Rejected(SuggestionRejected::default())));
            }
            _ => {}
        }
        if rng.below(5) == 0 {
            let rating = SuggestionRated { score: 1.0 + rng.below(5) as f64, scale_min: 1.0, scale_max: 5.0 };
            events.push(ev(&mut rng, &s, tenant, t + 2000, InteractionPayload::Rated(rating)));
        }
        if rng.below(10) == 0 {
            // A client retry.
            let again = events[rng.below(events.len() as u64) as usize].clone();
            events.push(again);
        }
        // Most events arrive within 90 s; one suggestion in 50 arrives half an
        // hour late, after its metrics window was published.
        let delay = if rng.below(50) == 0 { 30 * MIN } else { 0 };
        for e in events {
            let arrive = e.event_time + delay + rng.below(90_000) as i64;
            let arrive = if matches!(e.payload, InteractionPayload::Shown(_)) { arrive - 90_000 } else { arrive };
            out.push((arrive, e));
        }
    }
    out.sort_by_key(|(arrive, e)| (*arrive, e.event_id.clone()));
    out
}

#[test]
fn published_metrics_equal_a_recomputation_from_the_emitted_rewards() {
    for seed in [1, 2, 3] {
        let config = JoinConfig { metrics_windows_ms: vec![MIN, 60 * MIN], ..JoinConfig::default() };
        let mut joiners: Vec<PartitionJoiner> = (0..2)
            .map(|p| PartitionJoiner::new("interactions", p, config.clone(), RewardFunction::default()))
            .collect();
        let mut out = Vec::new();
        let stream = random_stream(seed, 6000);
        for (offset, (_, e)) in stream.iter().enumerate() {
            let p = e.suggestion_id.len() % 2;
            joiners[p].process(offset as i64, e.clone(), &mut out);
        }
        for j in &mut joiners {
            j.advance_to(T0 + 365 * 24 * 60 * MIN, stream.len() as i64, &mut out);
            assert_eq!((j.open_suggestions(), j.open_metrics_windows()), (0, 0), "everything closed");
        }
        let rewards: Vec<Reward> =
            out.iter().filter_map(|e| if let Emitted::Reward(r) = e { Some(*r.clone()) } else { None }).collect();
        let metrics: Vec<RewardMetrics> =
            out.iter().filter_map(|e| if let Emitted::Metrics(m) = e { Some(*m.clone()) } else { None }).collect();
        let suggestions: std::collections::BTreeSet<&str> = rewards.iter().map(|r| r.suggestion_id.as_str()).collect();
        assert_eq!(suggestions.len(), rewards.len(), "at most one reward per suggestion");
        assert!(rewards.len() > 5900, "nearly every suggestion rewarded: {}", rewards.len());
        for window in [MIN, 60 * MIN] {
            let p = published(&metrics, window);
            let r = recompute(&rewards, window);
            assert_eq!(p.keys().collect::<Vec<_>>(), r.keys().collect::<Vec<_>>(), "the same windows, seed {seed}");
            let compared = assert_published_match(&p, &r);
            assert!(compared > 10, "{compared} windows");
            if window == MIN {
                assert!(p.values().any(|t| t.records > 1), "very late rewards produced extra records");
            }
        }
    }
}
