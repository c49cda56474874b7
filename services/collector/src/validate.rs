//! Turning one JSON event of a batch into an [`Interaction`], or a rejection
//! with a machine-readable code and a reason a client developer can act on.
//!
//! Unknown fields are rejected wherever they appear, at the top level and
//! inside the payload (`invalid_event`, naming the field): a misspelt
//! optional field would otherwise be dropped without a trace.

use std::collections::BTreeMap;

use flywheel_core::records::{EpochMillis, Interaction, InteractionPayload};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
    /// What happened, as sent: parsed into an [`InteractionPayload`] by
    /// [`parse_payload`], which also refuses fields the payload kind lacks.
    pub payload: Box<RawValue>,
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
    "event_too_large",
];

/// Parses a payload (`{"<kind>": {...}}`), refusing fields its kind does not
/// have: the same rule as for unknown top-level fields.
pub fn parse_payload(raw: &RawValue) -> Result<InteractionPayload, Rejection> {
    let invalid = |e: serde_json::Error| Rejection::new("invalid_event", format!("payload: {e}"));
    let payload: InteractionPayload = serde_json::from_str(raw.get()).map_err(invalid)?;
    let sent: BTreeMap<String, BTreeMap<String, IgnoredAny>> = serde_json::from_str(raw.get()).map_err(|_| {
        Rejection::new("invalid_event", format!("payload.{} must be a JSON object of fields", payload.kind()))
    })?;
    // Every field of the kind, from its serialized form (optional ones appear as null).
    let known = serde_json::to_value(&payload).map_err(invalid)?;
    let known = known.get(payload.kind()).and_then(serde_json::Value::as_object);
    for (kind, fields) in &sent {
        for field in fields.keys() {
            if !known.is_some_and(|k| k.contains_key(field)) {
                let expected: Vec<String> =
                    known.map(|k| k.keys().map(|f| format!("`{f}`")).collect()).unwrap_or_default();
                return Err(Rejection::new(
                    "invalid_event",
                    format!(
                        "payload.{kind}: unknown field `{field}`, expected one of {}; unknown fields are rejected so \
                         a misspelt field never loses data",
                        expected.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(payload)
}

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
    // Before any other check, as when the payload was part of the event's type.
    let payload = parse_payload(&event.payload)?;
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
    check_payload(&payload, limits)?;
    Ok(Interaction {
        event_id: event.event_id.to_ascii_lowercase(),
        event_time: event.event_time,
        received_time: now,
        tenant: tenant.to_string(),
        user_id: event.user_id,
        session_id: event.session_id,
        suggestion_id: event.suggestion_id,
        payload,
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

    fn shown() -> serde_json::Value {
        let mut e = event();
        e["payload"] = json!({"shown": {
            "model_id": "m", "surface": "chat", "prompt": "p", "completion": "c", "latency_ms": 5
        }});
        e
    }

    #[test]
    fn unknown_payload_fields_are_rejected_like_unknown_top_level_fields() {
        // A misspelt optional field would otherwise vanish: rejected, naming it.
        let mut e = shown();
        e["payload"]["shown"]["behaviour_logprob"] = json!(-0.5);
        let r = check(&e, "acme", &Limits::default()).unwrap_err();
        assert_eq!(r.code, "invalid_event");
        assert!(r.reason.contains("payload.shown: unknown field `behaviour_logprob`"), "{}", r.reason);
        assert!(r.reason.contains("`behavior_logprob`"), "the known fields are listed: {}", r.reason);
        let mut e = event();
        e["payload"] = json!({"accepted": {"time_to_accept_ms": 5, "extra": true}});
        assert!(check(&e, "acme", &Limits::default()).unwrap_err().reason.contains("`extra`"));
        // The top level follows the same rule.
        let mut e = shown();
        e["sesion_id"] = json!("s");
        let r = check(&e, "acme", &Limits::default()).unwrap_err();
        assert_eq!(r.code, "invalid_event");
        assert!(r.reason.contains("unknown field `sesion_id`"), "{}", r.reason);
        // Known optional fields may be absent or null; every kind's fields are known.
        let mut e = shown();
        e["payload"]["shown"]["adapter_version"] = json!(null);
        e["payload"]["shown"]["behavior_logprob"] = json!(-0.5);
        assert!(check(&e, "acme", &Limits::default()).is_ok());
        for payload in [
            json!({"rejected": {}}),
            json!({"rejected": {"reason": "esc"}}),
            json!({"dismissed": {"reason": null}}),
            json!({"edited": {"final_text": "x", "edit_distance": 1}}),
            json!({"follow_up": {"action": "COPY", "detail": "d"}}),
            json!({"task_completed": {"duration_ms": 1, "success": true}}),
        ] {
            let mut e = event();
            e["payload"] = payload.clone();
            assert!(check(&e, "acme", &Limits::default()).is_ok(), "{payload}");
        }
        // A payload in array form is not the documented JSON form.
        let mut e = event();
        e["payload"] = json!({"accepted": [5]});
        assert_eq!(code(e), "invalid_event");
    }

    #[test]
    fn doubles_are_parsed_exactly() {
        // serde_json without `float_roundtrip` reads this one ULP off.
        let text = "-1.1031496661141227";
        let exact: f64 = text.parse().unwrap();
        let raw =
            shown().to_string().replace("\"latency_ms\":5", &format!("\"latency_ms\":5,\"behavior_logprob\":{text}"));
        let i = validate(&raw, "acme", NOW, &Limits::default()).unwrap();
        match i.payload {
            InteractionPayload::Shown(s) => assert_eq!(s.behavior_logprob.map(f64::to_bits), Some(exact.to_bits())),
            other => panic!("expected shown, got {other:?}"),
        }
    }
}
