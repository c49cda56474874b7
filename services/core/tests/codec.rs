//! Codec tests: every fixture round-trips, arbitrary valid records round-trip,
//! bad bytes give typed errors (never panics).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::PathBuf;

use flywheel_core::Error;
use flywheel_core::codec::{AvroRecord, Codec, HEADER_LEN, RecordKind, decode, encode};
use flywheel_core::records::*;
use proptest::prelude::*;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures")
}

/// JSON → record → Avro → record, and the record's JSON equals the fixture's.
fn roundtrip_fixture<R: AvroRecord + PartialEq + Debug>(json: &serde_json::Value) {
    let record: R =
        serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("fixture does not parse as {}: {e}", R::KIND));
    let bytes = encode(&record).unwrap();
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    assert_eq!(Codec::global().identify(&bytes).unwrap().0, R::KIND);
    let back: R = decode(&bytes).unwrap();
    assert_eq!(back, record);
    assert_eq!(&serde_json::to_value(&back).unwrap(), json, "the fixture is not in canonical JSON form");
}

#[test]
fn every_fixture_round_trips_and_every_kind_has_one() {
    let mut kinds_seen = BTreeSet::new();
    let mut payloads_seen = BTreeSet::new();
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let stem = name.split('.').next().unwrap();
        let kind = RecordKind::ALL
            .into_iter()
            .find(|k| k.file_stem() == stem)
            .unwrap_or_else(|| panic!("{name}: unknown kind"));
        match kind {
            RecordKind::Interaction => {
                roundtrip_fixture::<Interaction>(&json);
                let i: Interaction = serde_json::from_value(json).unwrap();
                payloads_seen.insert(i.payload.kind());
            }
            RecordKind::Reward => roundtrip_fixture::<Reward>(&json),
            RecordKind::RewardMetrics => roundtrip_fixture::<RewardMetrics>(&json),
            RecordKind::ShardManifest => roundtrip_fixture::<ShardManifest>(&json),
            RecordKind::TriggerDecision => roundtrip_fixture::<TriggerDecision>(&json),
            RecordKind::TrainRequest => roundtrip_fixture::<TrainRequest>(&json),
            RecordKind::ModelCandidate => roundtrip_fixture::<ModelCandidate>(&json),
            RecordKind::RegistryEntry => roundtrip_fixture::<RegistryEntry>(&json),
            RecordKind::DeadLetter => roundtrip_fixture::<DeadLetter>(&json),
        }
        // The generic JSON path used by `flywheel produce` agrees.
        let via_json = Codec::global()
            .encode_json(kind, &serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap())
            .unwrap();
        assert_eq!(Codec::global().decode_to_json(&via_json).unwrap().0, kind);
        kinds_seen.insert(kind.file_stem());
    }
    let all: BTreeSet<_> = RecordKind::ALL.iter().map(|k| k.file_stem()).collect();
    assert_eq!(kinds_seen, all, "every record kind needs a fixture");
    let all_payloads: BTreeSet<_> =
        ["shown", "accepted", "rejected", "dismissed", "edited", "rated", "follow_up", "task_completed"].into();
    assert_eq!(payloads_seen, all_payloads, "every interaction kind needs a fixture");
}

#[test]
fn reward_components_sum_in_fixture_matches_reward() {
    let json = std::fs::read_to_string(fixtures_dir().join("reward.accepted.json")).unwrap();
    let r: Reward = serde_json::from_str(&json).unwrap();
    assert!((r.components.sum() - r.reward).abs() < 1e-9);
    let rated = SuggestionRated { score: 4.0, scale_min: 1.0, scale_max: 5.0 };
    assert_eq!(rated.normalized(), Some(0.5));
    assert_eq!(SuggestionRated { score: 6.0, ..rated.clone() }.normalized(), None);
    assert_eq!(SuggestionRated { scale_max: 1.0, ..rated }.normalized(), None);
}

// ---- arbitrary valid records ----

fn text() -> impl Strategy<Value = String> {
    // Unicode, including empty strings and multi-byte characters.
    "\\PC{0,40}"
}

fn opt<T: Debug + Clone + 'static>(s: impl Strategy<Value = T> + 'static) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn finite() -> impl Strategy<Value = f64> {
    prop::num::f64::NORMAL | prop::num::f64::ZERO | prop::num::f64::SUBNORMAL
}

fn follow_up_action() -> impl Strategy<Value = FollowUpAction> {
    prop_oneof![
        Just(FollowUpAction::Regenerate),
        Just(FollowUpAction::Undo),
        Just(FollowUpAction::Copy),
        Just(FollowUpAction::Complaint),
        Just(FollowUpAction::Thanks),
        Just(FollowUpAction::Other),
    ]
}

fn payload() -> impl Strategy<Value = InteractionPayload> {
    prop_oneof![
        (text(), opt(text()), opt(text()), text(), text(), text(), opt(finite()), any::<i64>()).prop_map(
            |(model_id, adapter_version, experiment_arm, surface, prompt, completion, behavior_logprob, latency_ms)| {
                InteractionPayload::Shown(SuggestionShown {
                    model_id,
                    adapter_version,
                    experiment_arm,
                    surface,
                    prompt,
                    completion,
                    behavior_logprob,
                    latency_ms,
                })
            }
        ),
        any::<i64>().prop_map(|t| InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: t })),
        opt(text()).prop_map(|reason| InteractionPayload::Rejected(SuggestionRejected { reason })),
        opt(text()).prop_map(|reason| InteractionPayload::Dismissed(SuggestionDismissed { reason })),
        (opt(text()), opt(any::<i64>())).prop_map(|(final_text, edit_distance)| InteractionPayload::Edited(
            SuggestionEdited { final_text, edit_distance }
        )),
        (finite(), finite(), finite()).prop_map(|(score, scale_min, scale_max)| InteractionPayload::Rated(
            SuggestionRated { score, scale_min, scale_max }
        )),
        (follow_up_action(), opt(text()))
            .prop_map(|(action, detail)| InteractionPayload::FollowUp(FollowUp { action, detail })),
        (any::<i64>(), opt(any::<bool>())).prop_map(|(duration_ms, success)| InteractionPayload::TaskCompleted(
            TaskCompleted { duration_ms, success }
        )),
    ]
}

fn interaction() -> impl Strategy<Value = Interaction> {
    (
        text(),
        any::<i64>(),
        any::<i64>(),
        text(),
        text(),
        opt(text()),
        text(),
        payload(),
        prop::collection::btree_map(text(), text(), 0..4),
    )
        .prop_map(
            |(event_id, event_time, received_time, tenant, user_id, session_id, suggestion_id, payload, attributes)| {
                Interaction {
                    event_id,
                    event_time,
                    received_time,
                    tenant,
                    user_id,
                    session_id,
                    suggestion_id,
                    payload,
                    attributes,
                }
            },
        )
}

fn reward() -> impl Strategy<Value = Reward> {
    let components = prop::array::uniform6(finite()).prop_map(|c| RewardComponents {
        outcome: c[0],
        edit_penalty: c[1],
        rating: c[2],
        follow_up: c[3],
        time_to_accept: c[4],
        task_completion: c[5],
    });
    let signals = (
        opt(any::<i64>()),
        opt(any::<i64>()),
        opt(text()),
        opt(finite()),
        prop::collection::vec(follow_up_action(), 0..5),
        opt(any::<bool>()),
        any::<i32>(),
    )
        .prop_map(
            |(time_to_accept_ms, edit_distance, final_text, rating, follow_ups, task_completed, event_count)| {
                RewardSignals {
                    time_to_accept_ms,
                    edit_distance,
                    final_text,
                    rating,
                    follow_ups,
                    task_completed,
                    event_count,
                }
            },
        );
    let outcome =
        prop_oneof![Just(Outcome::Accepted), Just(Outcome::Rejected), Just(Outcome::Dismissed), Just(Outcome::Ignored)];
    let lineage =
        (text(), any::<i32>(), any::<i64>(), any::<i64>()).prop_map(|(topic, partition, first_offset, last_offset)| {
            Lineage { topic, partition, first_offset, last_offset }
        });
    (
        (text(), text(), text(), opt(text()), text(), text(), opt(text()), opt(text())),
        (text(), text(), text(), opt(finite()), any::<i64>(), any::<i64>(), outcome, finite()),
        (components, signals, text(), lineage),
    )
        .prop_map(
            |(
                (reward_id, tenant, user_id, session_id, suggestion_id, model_id, adapter_version, experiment_arm),
                (surface, prompt, completion, behavior_logprob, shown_time, window_close_time, outcome, reward),
                (components, signals, reward_fn_version, lineage),
            )| Reward {
                reward_id,
                tenant,
                user_id,
                session_id,
                suggestion_id,
                model_id,
                adapter_version,
                experiment_arm,
                surface,
                prompt,
                completion,
                behavior_logprob,
                shown_time,
                window_close_time,
                outcome,
                reward,
                components,
                signals,
                reward_fn_version,
                lineage,
            },
        )
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        text(),
        text(),
        text(),
        (text(), any::<i32>(), any::<i64>()),
        opt(prop::collection::vec(any::<u8>(), 0..64)),
        opt(prop::collection::vec(any::<u8>(), 0..256)),
        any::<i64>(),
    )
        .prop_map(
            |(service, reason_code, reason, (topic, partition, offset), original_key, original_value, failed_at)| {
                DeadLetter {
                    service,
                    reason_code,
                    reason,
                    source: SourcePosition { topic, partition, offset },
                    original_key,
                    original_value,
                    failed_at,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_interactions_round_trip(record in interaction()) {
        let bytes = encode(&record).unwrap();
        prop_assert_eq!(decode::<Interaction>(&bytes).unwrap(), record);
    }

    #[test]
    fn arbitrary_rewards_round_trip(record in reward()) {
        let bytes = encode(&record).unwrap();
        prop_assert_eq!(decode::<Reward>(&bytes).unwrap(), record);
    }

    #[test]
    fn arbitrary_dead_letters_round_trip(record in dead_letter()) {
        let bytes = encode(&record).unwrap();
        prop_assert_eq!(decode::<DeadLetter>(&bytes).unwrap(), record);
    }

    /// Random bytes never panic the decoder, with or without a valid header.
    #[test]
    fn random_bytes_give_typed_errors(noise in prop::collection::vec(any::<u8>(), 0..512), with_header in any::<bool>()) {
        let mut bytes = Vec::new();
        if with_header {
            bytes.extend_from_slice(&[0xC3, 0x01]);
            bytes.extend_from_slice(&Codec::global().fingerprint(RecordKind::Interaction));
        }
        bytes.extend_from_slice(&noise);
        match decode::<Interaction>(&bytes) {
            // Random bytes can happen to be a valid datum; then it must re-encode to the same bytes.
            Ok(record) => prop_assert_eq!(encode(&record).unwrap(), bytes),
            Err(e) => prop_assert!(matches!(
                e,
                Error::Truncated { .. } | Error::BadMagic { .. } | Error::UnknownFingerprint { .. } | Error::Malformed { .. }
            ), "unexpected error {e:?}"),
        }
    }

    /// Every strict prefix of a valid record is rejected, never mis-decoded.
    #[test]
    fn truncated_records_are_rejected(record in interaction(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&record).unwrap();
        let cut = cut.index(bytes.len());
        let err = decode::<Interaction>(&bytes[..cut]).unwrap_err();
        if cut < HEADER_LEN {
            prop_assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
        } else {
            prop_assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
        }
    }
}

#[test]
fn specific_bad_inputs_name_the_problem() {
    let json = std::fs::read_to_string(fixtures_dir().join("interaction.shown.json")).unwrap();
    let record: Interaction = serde_json::from_str(&json).unwrap();
    let good = encode(&record).unwrap();

    let mut wrong_magic = good.clone();
    wrong_magic[0] = b'{';
    let e = decode::<Interaction>(&wrong_magic).unwrap_err();
    assert!(matches!(e, Error::BadMagic { found: [b'{', 0x01] }), "{e:?}");
    assert_eq!(e.reason_code(), "bad_magic");

    let mut unknown = good.clone();
    unknown[2..HEADER_LEN].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    let e = decode::<Interaction>(&unknown).unwrap_err();
    assert!(matches!(e, Error::UnknownFingerprint { fingerprint: 0xdead_beef }), "{e:?}");
    assert!(e.to_string().contains("0x00000000deadbeef"), "{e}");

    let e = decode::<Reward>(&good).unwrap_err();
    assert!(matches!(e, Error::WrongKind { expected: RecordKind::Reward, found: RecordKind::Interaction }), "{e:?}");

    let mut trailing = good.clone();
    trailing.push(0);
    let e = decode::<Interaction>(&trailing).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");

    // An absurd length prefix must fail fast instead of reserving memory.
    let mut huge = good[..HEADER_LEN].to_vec();
    huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(decode::<Interaction>(&huge).unwrap_err(), Error::Malformed { .. }));

    assert!(matches!(decode::<Interaction>(&[]).unwrap_err(), Error::Truncated { len: 0 }));
}
