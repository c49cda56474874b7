//! The interaction stream both rewarder benchmarks replay (`join_bench`
//! in this crate, `rewarder_bench` in the CLI's), included by `#[path]`:
//! suggestions 10 ms apart from `T0`; 80 % get an outcome, 10 % a
//! follow-up, 5 % a rating, interleaved as a product would send them.

use flywheel_core::records::*;

/// Event time of the first suggestion.
pub const T0: i64 = 1_795_424_400_000;

/// One event of suggestion `s` at `t`.
pub fn event(n: usize, s: &str, t: i64, payload: InteractionPayload) -> Interaction {
    Interaction {
        event_id: format!("8e000000-0000-4000-8000-{n:012}"),
        event_time: t,
        received_time: t,
        tenant: "bench".into(),
        user_id: format!("{:064x}", n % 5003),
        session_id: None,
        suggestion_id: s.into(),
        payload,
        attributes: Default::default(),
    }
}

/// A suggestion shown at `t`.
pub fn shown(n: usize, s: &str, t: i64) -> Interaction {
    event(
        n,
        s,
        t,
        InteractionPayload::Shown(SuggestionShown {
            model_id: "flywheel/tiny-llama".into(),
            adapter_version: Some("a1".into()),
            experiment_arm: Some("live".into()),
            surface: "editor-inline".into(),
            prompt: "def fibonacci(n):\n    ".into(),
            completion: "if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)".into(),
            behavior_logprob: Some(-7.25),
            latency_ms: 180,
        }),
    )
}

/// The stream of `suggestions` suggestions, in event-time order.
pub fn bench_stream(suggestions: usize) -> Vec<Interaction> {
    let mut events = Vec::new();
    for i in 0..suggestions {
        let s = format!("sugg-{i}");
        let t = T0 + i as i64 * 10;
        events.push(shown(4 * i, &s, t));
        match i % 10 {
            0..=4 => events.push(event(
                4 * i + 1,
                &s,
                t + 400,
                InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 400 }),
            )),
            5..=7 => events.push(event(4 * i + 1, &s, t + 300, InteractionPayload::Rejected(Default::default()))),
            _ => {}
        }
        if i % 10 == 0 {
            let f = FollowUp { action: FollowUpAction::Regenerate, detail: None };
            events.push(event(4 * i + 2, &s, t + 900, InteractionPayload::FollowUp(f)));
        }
        if i % 20 == 0 {
            let r = SuggestionRated { score: 4.0, scale_min: 1.0, scale_max: 5.0 };
            events.push(event(4 * i + 3, &s, t + 1500, InteractionPayload::Rated(r)));
        }
    }
    events.sort_by_key(|e| (e.event_time, e.event_id.clone()));
    events
}
