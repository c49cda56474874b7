//! Turning one JSON event of a batch into an [`Interaction`], or a rejection
//! with a machine-readable code and a reason a client developer can act on.

use std::collections::BTreeMap;

use flywheel_core::records::{EpochMillis, Interaction, InteractionPayload};
use serde::{Deserialize, Serialize};

/// Limits on what one event may contain.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest text field (prompt, completion, final text, details), in characters.
    pub max_text_chars: usize,
    /// Longest id field (event, user, session, suggestion, model...), in characters.
    pub max_id_chars: usize,
    /// Most free-form attributes per event.
    pub max_attributes: usize,
    /// How far in the future an event time may lie (client clock skew), in ms.
    pub max_future_ms: i64,
    /// How far in the past an event time may lie, in ms.
    pub max_past_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_chars: 32_768,
            max_id_chars: 256,
            max_attributes: 32,
            max_future_ms: 24 * 3600 * 1000,
            max_past_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// An event as a product sends it: the interaction's JSON form without
/// `received_time` (the collector sets it), with the product's own user id
/// (pseudonymised before it leaves the collector) and an optional tenant
/// (which must match the token's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingEvent {
    /// UUID chosen by the product; the idempotency key for retries.
    pub event_id: String,
    /// Client-side event time, ms since epoch.
    pub event_time: EpochMillis,
    /// Optional; must equal the token's tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The product's user id (raw; pseudonymised here).
    pub user_id: String,
    /// Optional session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Suggestion the event is about.
    pub suggestion_id: String,
    /// What happened.
    pub payload: InteractionPayload,
    /// Free-form attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Ignored if sent: the collector stamps its own.
    #[serde(default)]
    pub received_time: Option<EpochMillis>,
}

/// Why an event was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Stable machine-readable code (also a metrics label).
    pub code: &'static str,
    /// Human-readable reason.
    pub reason: String,
}

impl Rejection {
    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Rejection { code, reason: reason.into() }
    }
}

/// Every rejection code, for documentation and metric pre-registration.
pub const REJECTION_CODES: &[&str] = &[
    "invalid_event",
    "invalid_event_id",
    "tenant_mismatch",
    "event_time_out_of_range",
    "field_too_long",
    "empty_field",
    "too_many_attributes",
    "invalid_value",
    "duplicate_in_batch",
];

fn check_id(field: &str, value: &str, limits: &Limits) -> Result<(), Rejection> {
    if value.trim().is_empty() {
        return Err(Rejection::new("empty_field", format!("{field} must not be empty")));
    }
    let n = value.chars().count();
    if n > limits.max_id_chars {
        return Err(Rejection::new(
            "field_too_long",
            format!("{field} has {n} characters; the limit is {}", limits.max_id_chars),
        ));
    }
    Ok(())
}

fn check_text(field: &str, value: &str, limits: &Limits) -> Result<(), Rejection> {
    let n = value.chars().count();
    if n > limits.max_text_chars {
        return Err(Rejection::new(
            "field_too_long",
            format!("{field} has {n} characters; the limit is {}", limits.max_text_chars),
        ));
    }
    Ok(())
}

fn check_non_negative(field: &str, value: i64) -> Result<(), Rejection> {
    if value < 0 {
        return Err(Rejection::new("invalid_value", format!("{field} must be >= 0, got {value}")));
    }
    Ok(())
}

fn check_payload(payload: &InteractionPayload, limits: &Limits) -> Result<(), Rejection> {
    match payload {
        InteractionPayload::Shown(s) => {
            check_id("payload.shown.model_id", &s.model_id, limits)?;
            check_id("payload.shown.surface", &s.surface, limits)?;
            for (field, value) in [("adapter_version", &s.adapter_version), ("experiment_arm", &s.experiment_arm)] {
                if let Some(v) = value {
                    check_id(&format!("payload.shown.{field}"), v, limits)?;
                }
            }
            check_text("payload.shown.prompt", &s.prompt, limits)?;
            check_text("payload.shown.completion", &s.completion, limits)?;
            check_non_negative("payload.shown.latency_ms", s.latency_ms)?;
            if let Some(lp) = s.behavior_logprob
                && !(lp.is_finite() && lp <= 0.0)
            {
                return Err(Rejection::new(
                    "invalid_value",
                    format!("payload.shown.behavior_logprob must be a finite log-probability <= 0, got {lp}"),
                ));
            }
        }
        InteractionPayload::Accepted(a) => {
            check_non_negative("payload.accepted.time_to_accept_ms", a.time_to_accept_ms)?
        }
        InteractionPayload::Rejected(r) => {
            if let Some(reason) = &r.reason {
                check_id("payload.rejected.reason", reason, limits)?;
            }
        }
        InteractionPayload::Dismissed(d) => {
            if let Some(reason) = &d.reason {
                check_id("payload.dismissed.reason", reason, limits)?;
            }
        }
        InteractionPayload::Edited(e) => {
            if e.final_text.is_none() && e.edit_distance.is_none() {
                return Err(Rejection::new("invalid_value", "payload.edited needs final_text, edit_distance or both"));
            }
            if let Some(t) = &e.final_text {
                check_text("payload.edited.final_text", t, limits)?;
            }
            if let Some(d) = e.edit_distance {
                check_non_negative("payload.edited.edit_distance", d)?;
            }
        }
        InteractionPayload::Rated(r) => {
            if r.normalized().is_none() {
                return Err(Rejection::new(
                    "invalid_value",
                    format!(
                        "payload.rated: score {} must lie within a non-empty scale [{}, {}]",
                        r.score, r.scale_min, r.scale_max
                    ),
                ));
            }
        }
        InteractionPayload::FollowUp(f) => {
            if let Some(d) = &f.detail {
                check_text("payload.follow_up.detail", d, limits)?;
            }
        }
        InteractionPayload::TaskCompleted(t) => {
            check_non_negative("payload.task_completed.duration_ms", t.duration_ms)?
        }
    }
    Ok(())
}

/// Parses and validates one event of a batch (its JSON text) for `tenant`.
/// The user id is left raw; the caller pseudonymises it.
pub fn validate(raw: &str, tenant: &str, now: EpochMillis, limits: &Limits) -> Result<Interaction, Rejection> {
    let event: IncomingEvent = serde_json::from_str(raw).map_err(|e| Rejection::new("invalid_event", e.to_string()))?;
    let parsed = uuid::Uuid::parse_str(&event.event_id)
        .map_err(|e| Rejection::new("invalid_event_id", format!("event_id '{}' is not a UUID: {e}", event.event_id)))?;
    if parsed.hyphenated().to_string() != event.event_id.to_ascii_lowercase() {
        return Err(Rejection::new(
            "invalid_event_id",
            format!("event_id '{}' must be a UUID in canonical hyphenated form", event.event_id),
        ));
    }
    if let Some(body_tenant) = &event.tenant
        && body_tenant != tenant
    {
        return Err(Rejection::new(
            "tenant_mismatch",
            format!("event names tenant '{body_tenant}' but the token belongs to '{tenant}'"),
        ));
    }
    if event.event_time > now + limits.max_future_ms || event.event_time < now - limits.max_past_ms {
        return Err(Rejection::new(
            "event_time_out_of_range",
            format!(
                "event_time {} is outside [now - {} h, now + {} h] (now = {now})",
                event.event_time,
                limits.max_past_ms / 3_600_000,
                limits.max_future_ms / 3_600_000
            ),
        ));
    }
    check_id("user_id", &event.user_id, limits)?;
    check_id("suggestion_id", &event.suggestion_id, limits)?;
    if let Some(s) = &event.session_id {
        check_id("session_id", s, limits)?;
    }
    if event.attributes.len() > limits.max_attributes {
        return Err(Rejection::new(
            "too_many_attributes",
            format!("{} attributes; the limit is {}", event.attributes.len(), limits.max_attributes),
        ));
    }
    for (k, v) in &event.attributes {
        check_id("attribute name", k, limits)?;
        check_text(&format!("attributes.{k}"), v, limits)?;
    }
    check_payload(&event.payload, limits)?;
    Ok(Interaction {
        event_id: event.event_id.to_ascii_lowercase(),
        event_time: event.event_time,
        received_time: now,
        tenant: tenant.to_string(),
        user_id: event.user_id,
        session_id: event.session_id,
        suggestion_id: event.suggestion_id,
        payload: event.payload,
        attributes: event.attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_795_424_400_000;

    fn event() -> serde_json::Value {
        json!({
            "event_id": "1f0c0000-0000-4000-8000-000000000001",
            "event_time": NOW - 1000,
            "user_id": "alice@example.com",
            "suggestion_id": "s1",
            "payload": {"rated": {"score": 4.0, "scale_min": 1.0, "scale_max": 5.0}}
        })
    }

    fn check(v: &serde_json::Value, tenant: &str, limits: &Limits) -> Result<Interaction, Rejection> {
        validate(&v.to_string(), tenant, NOW, limits)
    }

    fn code(v: serde_json::Value) -> &'static str {
        check(&v, "acme", &Limits::default()).unwrap_err().code
    }

    #[test]
    fn valid_events_get_the_token_tenant_and_receive_time() {
        let i = check(&event(), "acme", &Limits::default()).unwrap();
        assert_eq!((i.tenant.as_str(), i.received_time), ("acme", NOW));
        let mut e = event();
        e["tenant"] = json!("acme");
        assert!(check(&e, "acme", &Limits::default()).is_ok());
    }

    #[test]
    fn each_problem_has_its_code() {
        let mut e = event();
        e["tenant"] = json!("other");
        assert_eq!(code(e), "tenant_mismatch");
        let mut e = event();
        e["event_time"] = json!(NOW + 25 * 3600 * 1000);
        assert_eq!(code(e), "event_time_out_of_range");
        let mut e = event();
        e["event_id"] = json!("42");
        assert_eq!(code(e), "invalid_event_id");
        let mut e = event();
        e["payload"] = json!({"teleported": {}});
        assert_eq!(code(e), "invalid_event");
        let mut e = event();
        e["payload"] = json!({"rated": {"score": 9.0, "scale_min": 1.0, "scale_max": 5.0}});
        assert_eq!(code(e), "invalid_value");
        let mut e = event();
        e["user_id"] = json!(" ");
        assert_eq!(code(e), "empty_field");
        let mut e = event();
        e["payload"] = json!({"follow_up": {"action": "DANCE"}});
        assert_eq!(code(e), "invalid_event");
        let mut e = event();
        e["payload"] = json!({"edited": {}});
        assert_eq!(code(e), "invalid_value");
        let mut e = event();
        e["unexpected"] = json!(1);
        assert_eq!(code(e), "invalid_event");
        let limits = Limits { max_text_chars: 3, ..Limits::default() };
        let mut e = event();
        e["attributes"] = json!({"k": "long value"});
        assert_eq!(check(&e, "acme", &limits).unwrap_err().code, "field_too_long");
        for c in ["tenant_mismatch", "event_time_out_of_range", "invalid_event_id", "invalid_event", "invalid_value"] {
            assert!(REJECTION_CODES.contains(&c));
        }
    }
}
