//! Schema evolution: BACKWARD_TRANSITIVE across every version kept in
//! `schemas/history/`, the history kept up to date, docs on every field, and a
//! synthetic next version proving the rule is actually checked.

use std::path::PathBuf;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::writer::datum::GenericDatumWriter;
use flywheel_core::codec::{Codec, RecordKind, check_evolution, encode, header_of};
use flywheel_core::records::Interaction;
use serde_json::{Value, json};

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn parse(text: &str) -> Schema {
    Schema::parse_str(text).unwrap()
}

#[test]
fn history_on_disk_is_what_the_codec_embeds_and_is_current() {
    for kind in RecordKind::ALL {
        let dir = schemas_dir().join("history").join(kind.file_stem());
        let mut files: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort_by_key(|f| f.trim_start_matches('v').trim_end_matches(".avsc").parse::<u32>().unwrap());
        let expected: Vec<String> = (1..=files.len()).map(|n| format!("v{n}.avsc")).collect();
        assert_eq!(files, expected, "{kind}: history files must be v1.avsc, v2.avsc, ... without gaps");
        assert_eq!(files.len(), kind.history().len(), "{kind}: a history file is not embedded in codec.rs");
        for (file, embedded) in files.iter().zip(kind.history()) {
            assert_eq!(&std::fs::read_to_string(dir.join(file)).unwrap(), embedded, "{kind}/{file}");
        }
        let latest = parse(kind.history().last().unwrap());
        assert_eq!(
            latest.canonical_form(),
            parse(kind.current_schema()).canonical_form(),
            "{kind}: schemas/{}.avsc changed; copy it to history/{}/v{}.avsc once it is compatible",
            kind.file_stem(),
            kind.file_stem(),
            files.len() + 1
        );
    }
}

#[test]
fn every_version_is_readable_by_every_later_one() {
    for kind in RecordKind::ALL {
        let versions: Vec<Schema> = kind.history().iter().chain([&kind.current_schema()]).map(|t| parse(t)).collect();
        for (i, writer) in versions.iter().enumerate() {
            for (j, reader) in versions.iter().enumerate().skip(i) {
                if let Err(e) = SchemaCompatibility::can_read(writer, reader) {
                    panic!("{kind}: version {} cannot read data written with version {}: {e}", j + 1, i + 1);
                }
                let texts: Vec<&str> = kind.history().iter().copied().chain([kind.current_schema()]).collect();
                if let Err(problems) = check_evolution(texts[i], texts[j]) {
                    panic!("{kind}: v{} → v{} breaks the evolution rule: {problems:?}", i + 1, j + 1);
                }
            }
        }
    }
}

fn check_docs(node: &Value, path: &str, missing: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            let is_named = matches!(map.get("type"), Some(Value::String(t)) if t == "record" || t == "enum");
            let is_field = map.contains_key("name") && map.contains_key("type") && !is_named;
            let here = map.get("name").and_then(Value::as_str).map_or(path.to_string(), |n| format!("{path}.{n}"));
            if (is_named || is_field) && map.get("doc").and_then(Value::as_str).is_none_or(|d| d.trim().is_empty()) {
                missing.push(here.clone());
            }
            for (k, v) in map {
                if k != "doc" && k != "default" {
                    check_docs(v, &here, missing);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_docs(v, path, missing)),
        _ => {}
    }
}

#[test]
fn every_field_record_and_enum_has_a_doc() {
    for kind in RecordKind::ALL {
        let json: Value = serde_json::from_str(kind.current_schema()).unwrap();
        let mut missing = Vec::new();
        check_docs(&json, "", &mut missing);
        assert!(missing.is_empty(), "{kind}: no doc on {missing:?}");
    }
}

fn field_mut<'a>(record: &'a mut Value, name: &str) -> &'a mut Value {
    record["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == name).unwrap()
}

/// A plausible next version of the interaction schema: an optional field on
/// the envelope, one inside the `SuggestionShown` branch, and a new payload
/// kind appended to the union.
fn interaction_v_next() -> Value {
    let mut v: Value = serde_json::from_str(RecordKind::Interaction.current_schema()).unwrap();
    v["fields"].as_array_mut().unwrap().push(json!({
        "name": "client_version", "type": ["null", "string"], "default": null, "doc": "Client build."
    }));
    let payload = field_mut(&mut v, "payload");
    let branches = payload["type"].as_array_mut().unwrap();
    branches[0]["fields"].as_array_mut().unwrap().push(json!({
        "name": "completion_tokens", "type": "long", "default": 0, "doc": "Tokens in the completion."
    }));
    branches.push(json!({"type": "record", "name": "SuggestionCopied", "doc": "Copied.", "fields": [
        {"name": "chars", "type": "long", "doc": "Characters copied."}
    ]}));
    v
}

#[test]
fn a_compatible_next_version_reads_old_data_and_old_readers_read_its_field_additions() {
    let current = parse(RecordKind::Interaction.current_schema());
    let next = parse(&interaction_v_next().to_string());
    check_evolution(RecordKind::Interaction.current_schema(), &interaction_v_next().to_string())
        .expect("next version must be an allowed evolution");

    let fixture = std::fs::read_to_string(schemas_dir().join("fixtures/interaction.shown.json")).unwrap();
    let record: Interaction = serde_json::from_str(&fixture).unwrap();
    let bytes = encode(&record).unwrap();
    // Old writer → new reader: defaults fill the new fields.
    let as_next = GenericDatumReader::builder(&current)
        .reader_schema(&next)
        .build()
        .unwrap()
        .read_value(&mut &bytes[10..])
        .unwrap();
    let dbg = format!("{as_next:?}");
    assert!(dbg.contains("\"client_version\"") && dbg.contains("\"completion_tokens\", Long(0)"), "{dbg}");

    // New writer → current reader (forward compatibility of field additions):
    // the codec resolves by fingerprint once the version is known, so here we
    // resolve directly.
    let next_bytes = GenericDatumWriter::builder(&next).build().unwrap().write_value_to_vec(as_next).unwrap();
    let back = GenericDatumReader::builder(&next)
        .reader_schema(&current)
        .build()
        .unwrap()
        .read_value(&mut &next_bytes[..])
        .unwrap();
    let back: Interaction = apache_avro::from_value(&back).unwrap();
    assert_eq!(back, record);

    // Data written by the next version is unknown to this binary until its
    // schema lands in history: a typed error, never a mis-read.
    let mut framed = header_of(&next).to_vec();
    framed.extend_from_slice(&next_bytes);
    assert_eq!(Codec::global().identify(&framed).unwrap_err().reason_code(), "unknown_schema");
}

#[test]
fn incompatible_changes_are_caught() {
    let current = RecordKind::Interaction.current_schema();
    let violations = |next: &Value| check_evolution(current, &next.to_string()).unwrap_err().join("; ");
    // A new required field without a default breaks old data.
    let mut required = interaction_v_next();
    required["fields"].as_array_mut().unwrap().push(json!({"name": "region", "type": "string", "doc": "Region."}));
    assert!(violations(&required).contains("cannot read old data"));
    // Narrowing a type breaks old data.
    let mut narrowed: Value = serde_json::from_str(current).unwrap();
    field_mut(&mut narrowed, "event_time")["type"] = json!("int");
    assert!(violations(&narrowed).contains("cannot read old data"));
    // Dropping a payload kind breaks old data of that kind.
    let mut dropped: Value = serde_json::from_str(current).unwrap();
    field_mut(&mut dropped, "payload")["type"].as_array_mut().unwrap().pop();
    assert!(violations(&dropped).contains("union branch 7 (TaskCompleted) was removed"), "{}", violations(&dropped));
    // Reordering branches would silently change the meaning of old data.
    let mut reordered: Value = serde_json::from_str(current).unwrap();
    field_mut(&mut reordered, "payload")["type"].as_array_mut().unwrap().swap(2, 3);
    let v = violations(&reordered);
    assert!(v.contains(".payload: union branch 2 changed from SuggestionRejected to SuggestionDismissed"), "{v}");
}

/// The interaction schema as an imagined earlier release: no session id, no
/// attributes, no behaviour log-prob. Written through serde with a struct of
/// that shape, exactly as an old producer binary would.
mod v_prev {
    use serde::Serialize;

    #[derive(Serialize)]
    pub struct Interaction {
        pub event_id: String,
        pub event_time: i64,
        pub received_time: i64,
        pub tenant: String,
        pub user_id: String,
        pub suggestion_id: String,
        pub payload: Payload,
    }

    #[derive(Serialize)]
    pub enum Payload {
        Shown(Shown),
        #[allow(dead_code)] // present so the union has the old shape
        Accepted(Accepted),
        Rejected(Reason),
        Dismissed(Reason),
    }

    #[derive(Serialize)]
    pub struct Shown {
        pub model_id: String,
        pub adapter_version: Option<String>,
        pub experiment_arm: Option<String>,
        pub surface: String,
        pub prompt: String,
        pub completion: String,
        pub latency_ms: i64,
    }

    #[derive(Serialize)]
    pub struct Accepted {
        pub time_to_accept_ms: i64,
    }

    #[derive(Serialize)]
    pub struct Reason {
        pub reason: Option<String>,
    }
}

fn interaction_v_prev() -> Value {
    let mut v: Value = serde_json::from_str(RecordKind::Interaction.current_schema()).unwrap();
    let fields = v["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "session_id" && f["name"] != "attributes");
    let payload = field_mut(&mut v, "payload");
    let branches = payload["type"].as_array_mut().unwrap();
    branches.truncate(4);
    branches[0]["fields"].as_array_mut().unwrap().retain(|f| f["name"] != "behavior_logprob");
    v
}

#[test]
fn the_codec_decodes_older_and_newer_writers_into_the_current_type() {
    use flywheel_core::records::{InteractionPayload, SuggestionDismissed, SuggestionRejected};
    let prev_text = interaction_v_prev().to_string();
    check_evolution(&prev_text, RecordKind::Interaction.current_schema())
        .expect("prev → current is an allowed evolution");
    let prev = parse(&prev_text);
    let mut codec = Codec::new().unwrap();
    codec.register_writer(RecordKind::Interaction, &prev_text).unwrap();

    let writer = GenericDatumWriter::builder(&prev).build().unwrap();
    let old_event = |payload| v_prev::Interaction {
        event_id: "e-1".into(),
        event_time: 10,
        received_time: 11,
        tenant: "t".into(),
        user_id: "u".into(),
        suggestion_id: "s".into(),
        payload,
    };
    let frame = |event: &v_prev::Interaction| {
        let mut bytes = header_of(&prev).to_vec();
        bytes.extend(writer.write_ser_to_vec(event).unwrap());
        bytes
    };
    // Same-shaped branches keep their identity (index mapping, not shape).
    let rejected = frame(&old_event(v_prev::Payload::Rejected(v_prev::Reason { reason: None })));
    let dismissed = frame(&old_event(v_prev::Payload::Dismissed(v_prev::Reason { reason: Some("typed".into()) })));
    let r: Interaction = codec.decode(&rejected).unwrap();
    let d: Interaction = codec.decode(&dismissed).unwrap();
    assert_eq!(r.payload, InteractionPayload::Rejected(SuggestionRejected { reason: None }));
    assert_eq!(d.payload, InteractionPayload::Dismissed(SuggestionDismissed { reason: Some("typed".into()) }));
    // Fields the old writer lacked take their defaults.
    assert_eq!((r.session_id, r.attributes.len()), (None, 0));
    let shown = frame(&old_event(v_prev::Payload::Shown(v_prev::Shown {
        model_id: "m".into(),
        adapter_version: None,
        experiment_arm: Some("live".into()),
        surface: "chat".into(),
        prompt: "p".into(),
        completion: "c".into(),
        latency_ms: 5,
    })));
    match codec.decode::<Interaction>(&shown).unwrap().payload {
        InteractionPayload::Shown(s) => {
            assert_eq!((s.behavior_logprob, s.experiment_arm.as_deref()), (None, Some("live")))
        }
        other => panic!("expected shown, got {other:?}"),
    }
    // The global codec, which does not know this writer, refuses it by name.
    assert_eq!(Codec::global().identify(&rejected).unwrap_err().reason_code(), "unknown_schema");

    // A newer writer with extra fields is read by skipping them; a payload
    // kind this binary does not know is a typed error, not a wrong kind.
    let next_text = interaction_v_next().to_string();
    codec.register_writer(RecordKind::Interaction, &next_text).unwrap();
    let next = parse(&next_text);
    let fixture: Interaction =
        serde_json::from_str(&std::fs::read_to_string(schemas_dir().join("fixtures/interaction.rated.json")).unwrap())
            .unwrap();
    // A newer producer fills the new fields with their defaults.
    let mut next_bytes = header_of(&next).to_vec();
    next_bytes.extend(GenericDatumWriter::builder(&next).build().unwrap().write_ser_to_vec(&fixture).unwrap());
    assert_eq!(codec.decode::<Interaction>(&next_bytes).unwrap(), fixture);
}
